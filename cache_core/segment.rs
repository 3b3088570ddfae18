//! Cache segments: where each lives (physical id), its generation, its reference
//! count and whether it is in use.
//!
//! A data segment holds one reference per logged key pointing into it (and one for
//! a data head still filling it). GC drops a key's reference when the key's kset
//! leaves the log; the last reference bumps and persists the generation, which
//! invalidates every key still pointing there, and frees the segment. Key-log
//! segments hold no references: GC frees them when the key tail leaves them.

use super::ctrl::Held;
use super::env::{persist, Pmem};
use super::error::CacheError;
use super::key::{Key, Pos, SegId};
use super::stats::Counter;
use super::{Cache, Memory};
use crate::meta::header::MetaHeader;
use crate::meta::header::{SlotIndex, Slotted};
use crate::meta::layout::Geometry;
use crate::meta::segment::{SegGen, SegmentInfo, SEG_GEN_STRUCT_SIZE, SEG_INFO_STRUCT_SIZE};
use crate::meta::{MetaError, MetaErrorKind};
use core::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, SeqCst},
};

/// In-memory state of one cache segment, under the control lock. Where it lives,
/// its generation, whether it is in use and its references are in the
/// [`SegMap`]. Create with `SegState::default()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SegState {
    pub gen_seq: u8,
    pub gen_index: SlotIndex,
    pub info: SegmentInfo,
    pub info_index: SlotIndex,
    /// Scratch for chain validation at load.
    pub claimed: bool,
}

/// What reads and writes outside the engine need of one cache segment
/// ([`super::reader::Reader`], [`super::WritePath`]): the physical segment it
/// lives on, its generation, whether it is in use, and its references.
/// Create with `SegMapEntry::default()`.
#[derive(Debug, Default)]
pub struct SegMapEntry {
    phys: AtomicU32,
    gen: AtomicU64,
    /// Changed only under the lock of [`super::space::Space`].
    used: AtomicBool,
    /// One per logged key pointing into it, per reservation in it, and one
    /// for a data head filling it.
    refs: AtomicU32,
}

/// Filling the map before the engine takes it over.
impl Clone for SegMapEntry {
    fn clone(&self) -> Self {
        SegMapEntry {
            phys: AtomicU32::new(self.phys.load(Relaxed)),
            gen: AtomicU64::new(self.gen.load(Relaxed)),
            used: AtomicBool::new(self.used.load(Relaxed)),
            refs: AtomicU32::new(self.refs.load(Relaxed)),
        }
    }
}

/// The segment map: a [`SegMapEntry`] per cache segment, shared by the engine
/// and the reads it serves without its lock. The physical segments are set
/// while the engine starts, before any read; a generation changes only under
/// the control lock ([`Held::seg_invalidate`]), and a read checks it after
/// pinning the segment: see [`SegMap::gen`].
pub struct SegMap<M: Memory>(M::Shared<SegMapEntry>);

impl<M: Memory> Clone for SegMap<M> {
    fn clone(&self) -> Self {
        SegMap(self.0.clone())
    }
}

impl<M: Memory> SegMap<M> {
    pub(crate) fn new(entries: M::Shared<SegMapEntry>) -> Self {
        for e in entries.iter() {
            e.phys.store(0, Relaxed);
            e.gen.store(0, Relaxed);
            e.used.store(false, Relaxed);
            e.refs.store(0, Relaxed);
        }
        SegMap(entries)
    }

    fn entry(&self, id: SegId) -> Option<&SegMapEntry> {
        let e = self.0.get(id.index());
        debug_assert!(e.is_some(), "segment {id} beyond the segment map");
        e
    }

    /// The physical segment cache segment `id` lives on.
    pub(crate) fn phys(&self, id: SegId) -> u32 {
        self.entry(id).map_or(0, |e| e.phys.load(Relaxed))
    }

    /// Device offset of cache position `pos`.
    pub(crate) fn addr(&self, geo: &Geometry, pos: Pos) -> u64 {
        geo.seg_data_off(self.phys(pos.seg)) + u64::from(pos.off)
    }

    pub(crate) fn set_phys(&self, id: SegId, phys: u32) {
        if let Some(e) = self.entry(id) {
            e.phys.store(phys, Relaxed);
        }
    }

    /// Segment `id`'s generation. Sequentially consistent, as are the
    /// store of a new one ([`SegMap::set_gen`]) and the pins of reads
    /// ([`super::Pmem::pin`], [`super::Pmem::pinned`]): a read pins the
    /// segment and then loads its generation, the engine stores a new
    /// generation and later (before handing the segment out again) loads the
    /// pins, so either the read sees the new generation and lets go of the
    /// stale key, or the engine sees the pin and keeps the segment.
    pub(crate) fn gen(&self, id: SegId) -> u64 {
        self.entry(id).map_or(0, |e| e.gen.load(SeqCst))
    }

    /// Whether key `k` points into a segment GC has freed since (a
    /// placeholder points nowhere, so it never is).
    pub(crate) fn stale(&self, k: &Key) -> bool {
        !k.empty() && k.gen < self.gen(k.pos.seg)
    }

    /// Pins the segment of `k` on `pmem` and only then checks that `k` is
    /// still current (see [`SegMap::gen`]): until the pin is given back, GC
    /// does not hand the segment out again. False (no pin) when GC reclaimed
    /// it first.
    pub(crate) fn pin_current<P: Pmem + ?Sized>(&self, pmem: &P, k: &Key) -> bool {
        pmem.pin(k.pos.seg.get());
        if self.stale(k) {
            pmem.unpin(k.pos.seg.get());
            return false;
        }
        true
    }

    pub(crate) fn set_gen(&self, id: SegId, gen: u64) {
        if let Some(e) = self.entry(id) {
            e.gen.store(gen, SeqCst);
        }
    }

    /// Whether segment `id` is in use. Sequentially consistent, as the store
    /// of the generation before a segment is freed and the look at the pins
    /// after it is taken (see [`super::space::Space::alloc`]).
    pub(crate) fn used(&self, id: SegId) -> bool {
        self.entry(id).is_some_and(|e| e.used.load(SeqCst))
    }

    /// Sets whether segment `id` is in use; returns what it was.
    pub(crate) fn set_used(&self, id: SegId, used: bool) -> bool {
        self.entry(id).is_some_and(|e| e.used.swap(used, SeqCst))
    }

    /// Segment `id`'s references.
    pub(crate) fn refs(&self, id: SegId) -> u32 {
        self.entry(id).map_or(0, |e| e.refs.load(Relaxed))
    }

    /// Takes a reference on segment `id`.
    pub(crate) fn get(&self, id: SegId) {
        if let Some(e) = self.entry(id) {
            e.refs.fetch_add(1, Relaxed);
        }
    }

    /// Drops a reference on segment `id`; true when it was the last. An
    /// unbalanced put is a bug: asserted in debug builds; a release build
    /// never underflows into a freed segment (`None`).
    pub(crate) fn put(&self, id: SegId) -> bool {
        self.try_put(id) == Some(true)
    }

    /// [`SegMap::put`]; `None` on an underflow.
    pub(crate) fn try_put(&self, id: SegId) -> Option<bool> {
        let e = self.entry(id)?;
        // AcqRel: the holder's stores into the segment happen before whoever
        // frees it on the last reference.
        match e.refs.fetch_update(AcqRel, Acquire, |r| r.checked_sub(1)) {
            Ok(r) => Some(r == 1),
            Err(_) => {
                debug_assert!(false, "segment {id}: reference count underflow");
                None
            }
        }
    }
}

impl<P: Pmem, B: super::env::Backing, M: Memory> Held<'_, P, B, M> {
    /// State of segment `id` (a default value if the table has no entry).
    pub(crate) fn seg(&self, id: SegId) -> SegState {
        let s = self.t.segs.get(id.index()).copied();
        debug_assert!(s.is_some(), "segment {id} beyond the segment table");
        s.unwrap_or_default()
    }

    /// The table entry of segment `id`. A [`SegId`] is below the segment count
    /// by construction and the table has an entry per segment, so `None` is a
    /// bug: asserted in debug builds, and the caller does nothing.
    pub(crate) fn seg_mut(&mut self, id: SegId) -> Option<&mut SegState> {
        let s = self.t.segs.get_mut(id.index());
        debug_assert!(s.is_some(), "segment {id} beyond the segment table");
        s
    }

    /// `cache_seg_info_write`: next slot, seq+1, persist.
    pub(crate) fn seg_info_write(&mut self, id: SegId) {
        let geo = self.geo;
        let phys = self.seg_map.phys(id);
        let Some(s) = self.seg_mut(id) else {
            return;
        };
        s.info.header.seq = s.info.header.seq.wrapping_add(1);
        s.info_index = s.info_index.other();
        let (idx, info) = (s.info_index, s.info);
        let mut b = [0u8; SEG_INFO_STRUCT_SIZE];
        info.encode_with_crc(&mut b);
        persist(&self.pmem, SegmentInfo::slot_off(&geo, phys, idx.get()), &b);
    }

    /// `cache_seg_ctrl_write`: persist the generation in the next slot.
    pub(crate) fn seg_gen_write(&mut self, id: SegId) {
        let geo = self.geo;
        let (phys, gen) = (self.seg_map.phys(id), self.seg_map.gen(id));
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
            gen,
        };
        let idx = s.gen_index;
        let mut b = [0u8; SEG_GEN_STRUCT_SIZE];
        g.encode_with_crc(&mut b);
        persist(&self.pmem, SegGen::slot_off(&geo, phys, idx.get()), &b);
    }

    /// Bump and persist the generation (stale-ing every key into the segment), then
    /// free the segment. Its last reference went (`seg_unref`): nothing takes
    /// a new one before it is free again, so only one caller gets here for it.
    pub(crate) fn seg_invalidate(&mut self, id: SegId) {
        if self.seg_map.refs(id) != 0 {
            return;
        }
        self.seg_map
            .set_gen(id, self.seg_map.gen(id).wrapping_add(1));
        self.seg_gen_write(id);
        self.set_used(id, false);
        self.need_clean.store(true, Relaxed);
    }
}

impl<P: Pmem, B: super::env::Backing, M: Memory> Cache<P, B, M> {
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

    /// Segments in use.
    pub(crate) fn used_segs(&self) -> u32 {
        self.space.used_segs()
    }

    pub(crate) fn set_used(&self, id: SegId, used: bool) {
        self.space.set_used(&self.seg_map, id, used);
    }

    /// `get_cache_segment`: a free segment (see [`Space::alloc`]).
    pub(crate) fn get_cache_segment(&self) -> Option<SegId> {
        self.space.alloc(&self.seg_map, &self.pmem, self.n_segs, 0)
    }

    pub(crate) fn seg_get(&self, id: SegId) {
        self.seg_map.get(id);
    }

    /// `cache_seg_put`: the last reference invalidates and frees the segment.
    pub(crate) fn seg_put(&self, id: SegId) {
        if self.seg_unref(id) {
            self.held(|h| h.seg_invalidate(id));
        }
    }

    /// Drop one reference; true when it was the last.
    pub(crate) fn seg_unref(&self, id: SegId) -> bool {
        match self.seg_map.try_put(id) {
            Some(last) => last,
            None => {
                // Counted: the simulator asserts it.
                self.stats.inc(Counter::RefUnderflows);
                false
            }
        }
    }
}
