//! Cache segments: where each lives (physical id), its generation, its reference
//! count and whether it is in use.
//!
//! A data segment holds one reference per logged key pointing into it (and one for
//! a data head still filling it). GC drops a key's reference when the key's kset
//! leaves the log; the last reference bumps and persists the generation, which
//! invalidates every key still pointing there, and frees the segment. Key-log
//! segments hold no references: GC frees them when the key tail leaves them.

use super::env::{persist, Pmem};
use super::{Cache, Memory};
use crate::meta::header::MetaHeader;
use crate::meta::header::{SlotIndex, Slotted};
use crate::meta::segment::{SegGen, SegmentInfo, SEG_GEN_STRUCT_SIZE, SEG_INFO_STRUCT_SIZE};

/// In-memory state of one cache segment. Create with `SegState::default()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SegState {
    /// Physical segment id on the device.
    pub phys: u32,
    pub gen: u64,
    pub gen_seq: u8,
    pub gen_index: SlotIndex,
    pub info: SegmentInfo,
    pub info_index: SlotIndex,
    pub refs: u32,
    pub used: bool,
    /// Scratch for chain validation at load.
    pub claimed: bool,
}

impl<P: Pmem, B: super::env::Backing, M: Memory> Cache<P, B, M> {
    pub(crate) fn seg(&self, id: u32) -> SegState {
        self.segs.get(id as usize).copied().unwrap_or_default()
    }

    pub(crate) fn seg_mut(&mut self, id: u32) -> &mut SegState {
        let Cache { segs, seg_sink, .. } = self;
        segs.get_mut(id as usize).unwrap_or(seg_sink)
    }

    /// `cache_seg_info_write`: next slot, seq+1, persist.
    pub(crate) fn seg_info_write(&mut self, id: u32) {
        let geo = self.geo;
        let s = self.seg_mut(id);
        s.info.header.seq = s.info.header.seq.wrapping_add(1);
        s.info_index = s.info_index.other();
        let (phys, idx, info) = (s.phys, s.info_index, s.info);
        let mut b = [0u8; SEG_INFO_STRUCT_SIZE];
        info.encode_with_crc(&mut b);
        persist(
            &mut self.pmem,
            SegmentInfo::slot_off(&geo, phys, idx.get()),
            &b,
        );
    }

    /// `cache_seg_ctrl_write`: persist the generation in the next slot.
    pub(crate) fn seg_gen_write(&mut self, id: u32) {
        let geo = self.geo;
        let s = self.seg_mut(id);
        s.gen_seq = s.gen_seq.wrapping_add(1);
        s.gen_index = s.gen_index.other();
        let g = SegGen {
            header: MetaHeader {
                seq: s.gen_seq,
                ..MetaHeader::default()
            },
            gen: s.gen,
        };
        let (phys, idx) = (s.phys, s.gen_index);
        let mut b = [0u8; SEG_GEN_STRUCT_SIZE];
        g.encode_with_crc(&mut b);
        persist(&mut self.pmem, SegGen::slot_off(&geo, phys, idx.get()), &b);
    }

    pub(crate) fn free_segs(&self) -> u32 {
        self.n_segs - self.used_segs
    }

    pub(crate) fn set_used(&mut self, id: u32, used: bool) {
        let was = self.seg(id).used;
        if was != used && (id as usize) < self.segs.len() {
            self.seg_mut(id).used = used;
            if used {
                self.used_segs += 1;
                debug_assert!(self.used_segs <= self.n_segs);
            } else {
                self.used_segs -= 1;
            }
        }
    }

    /// `get_cache_segment`: a free segment, searched from the last hint.
    pub(crate) fn get_cache_segment(&mut self) -> Option<u32> {
        let n = self.n_segs;
        for step in 0..n {
            let id = (self.last_seg + step) % n;
            if !self.seg(id).used {
                self.set_used(id, true);
                self.last_seg = id;
                return Some(id);
            }
        }
        None
    }

    pub(crate) fn seg_get(&mut self, id: u32) {
        let s = self.seg_mut(id);
        s.refs = s.refs.saturating_add(1);
    }

    /// `cache_seg_put`: the last reference invalidates and frees the segment.
    pub(crate) fn seg_put(&mut self, id: u32) {
        if self.seg_unref(id) {
            self.seg_invalidate(id);
        }
    }

    /// Drop one reference; true when it was the last.
    pub(crate) fn seg_unref(&mut self, id: u32) -> bool {
        let s = self.seg_mut(id);
        if s.refs == 0 {
            // An unbalanced put is a bug: the simulator asserts it; a release build
            // counts it and never underflows into a freed segment.
            debug_assert!(false, "segment {id}: reference count underflow");
            self.stats.ref_underflows += 1;
            return false;
        }
        s.refs -= 1;
        s.refs == 0
    }

    /// Bump and persist the generation (stale-ing every key into the segment), then
    /// free the segment.
    pub(crate) fn seg_invalidate(&mut self, id: u32) {
        let s = self.seg_mut(id);
        if s.refs != 0 {
            return;
        }
        s.gen = s.gen.wrapping_add(1);
        self.seg_gen_write(id);
        self.set_used(id, false);
        self.need_clean = true;
    }
}
