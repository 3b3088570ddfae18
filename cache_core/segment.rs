//! Cache segments: where each lives (physical id), its generation, its reference
//! count and whether it is in use.
//!
//! A data segment holds one reference per logged key pointing into it (and one for
//! a data head still filling it). GC drops a key's reference when the key's kset
//! leaves the log; the last reference bumps and persists the generation, which
//! invalidates every key still pointing there, and frees the segment. Key-log
//! segments hold no references: GC frees them when the key tail leaves them.

use super::env::{persist, Pmem};
use super::error::CacheError;
use super::key::SegId;
use super::{Cache, Memory};
use crate::meta::header::MetaHeader;
use crate::meta::header::{SlotIndex, Slotted};
use crate::meta::segment::{SegGen, SegmentInfo, SEG_GEN_STRUCT_SIZE, SEG_INFO_STRUCT_SIZE};
use crate::meta::{MetaError, MetaErrorKind};

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
    pub(crate) fn seg(&self, id: SegId) -> SegState {
        let s = self.segs.get(id.index()).copied();
        debug_assert!(s.is_some(), "segment {id} beyond the segment table");
        s.unwrap_or_default()
    }

    /// The table entry of segment `id`. A [`SegId`] is below the segment count
    /// by construction and the table has an entry per segment, so `None` is a
    /// bug: asserted in debug builds, and the caller does nothing.
    pub(crate) fn seg_mut(&mut self, id: SegId) -> Option<&mut SegState> {
        let s = self.segs.get_mut(id.index());
        debug_assert!(s.is_some(), "segment {id} beyond the segment table");
        s
    }

    /// Segment `raw` of this cache, if there is one.
    pub(crate) fn seg_id(&self, raw: u32) -> Option<SegId> {
        SegId::checked(raw, self.n_segs)
    }

    /// The segment a LAST kset names as the next one of the key log.
    pub(crate) fn next_log_seg(&self, raw: u32) -> Result<SegId, CacheError> {
        self.seg_id(raw).ok_or_else(|| {
            MetaError::new(
                "pcache_cache_kset_onmedia",
                "next_cache_seg_id",
                MetaErrorKind::OutOfRange,
            )
            .into()
        })
    }

    /// `cache_seg_info_write`: next slot, seq+1, persist.
    pub(crate) fn seg_info_write(&mut self, id: SegId) {
        let geo = self.geo;
        let Some(s) = self.seg_mut(id) else {
            return;
        };
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
    pub(crate) fn seg_gen_write(&mut self, id: SegId) {
        let geo = self.geo;
        let Some(s) = self.seg_mut(id) else {
            return;
        };
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

    pub(crate) fn set_used(&mut self, id: SegId, used: bool) {
        let Some(s) = self.seg_mut(id) else {
            return;
        };
        if s.used != used {
            s.used = used;
            if used {
                self.used_segs += 1;
                debug_assert!(self.used_segs <= self.n_segs);
            } else {
                self.used_segs -= 1;
            }
        }
    }

    /// `get_cache_segment`: a free segment, searched from the last hint. A
    /// segment a read still copies from is not free yet (see [`Pmem::pin`]).
    pub(crate) fn get_cache_segment(&mut self) -> Option<SegId> {
        let n = self.n_segs;
        for step in 0..n {
            let id = self.seg_id((self.last_seg + step) % n)?;
            if !self.seg(id).used && !self.pmem.pinned(id.get()) {
                self.set_used(id, true);
                self.last_seg = id.get();
                return Some(id);
            }
        }
        None
    }

    pub(crate) fn seg_get(&mut self, id: SegId) {
        if let Some(s) = self.seg_mut(id) {
            s.refs = s.refs.saturating_add(1);
        }
    }

    /// `cache_seg_put`: the last reference invalidates and frees the segment.
    pub(crate) fn seg_put(&mut self, id: SegId) {
        if self.seg_unref(id) {
            self.seg_invalidate(id);
        }
    }

    /// Drop one reference; true when it was the last.
    pub(crate) fn seg_unref(&mut self, id: SegId) -> bool {
        let Some(s) = self.seg_mut(id) else {
            return false;
        };
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
    pub(crate) fn seg_invalidate(&mut self, id: SegId) {
        let Some(s) = self.seg_mut(id) else {
            return;
        };
        if s.refs != 0 {
            return;
        }
        s.gen = s.gen.wrapping_add(1);
        self.seg_gen_write(id);
        self.set_used(id, false);
        self.need_clean = true;
    }
}
