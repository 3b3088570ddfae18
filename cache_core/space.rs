//! Room for data: the data heads, each under a lock of its own, and the free
//! segments under another (upstream: each data head's lock and
//! `seg_map_lock`), so that writes reserve their room outside the engine
//! ([`super::WritePath::reserve`]), two data heads at once.
//!
//! Which segments are in use, and their references, are atomics in the
//! [`SegMap`]: a segment's flag changes only under the segments' lock, and
//! its references change wherever a reservation takes or gives one (a data
//! head holds one on its segment, so a reservation never takes the last away).

use super::env::{Locked, Pmem};
use super::error::CacheError;
use super::io::Reservation;
use super::key::{Pos, SegId};
use super::segment::SegMap;
use super::through::THROUGH_TAG;
use super::{DataHead, Memory};
use crate::meta::layout::{Geometry, SUBTREE_SIZE};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Segments a data head keeps free for the key log, so closing a kset can always
/// find a segment even when data filled the cache.
pub(crate) const LOG_RESERVE_SEGS: u32 = 1;

/// The data heads, each under a lock of its own, the count of segments in use
/// under another, and what a reservation reads of the engine's settings.
pub struct Space<M: Memory> {
    heads: M::Buf<M::Slot<DataHead>>,
    segs: M::Lock<SegCount>,
    /// A write found no data space: GC collects whatever is written back,
    /// whatever `gc_percent` says (see `Cache::need_gc`).
    room_wanted: AtomicBool,
    /// Data written from now on gets a CRC (the table's `data_crc`).
    data_crc: AtomicBool,
    /// The table's `data_crc` differs from the media flag: the engine syncs
    /// it before the next reservation (see `Cache::sync_crc_flag`).
    crc_flag_pending: AtomicBool,
    /// The tag of the last read-miss placeholder (see [`super::io::Gap`]).
    last_tag: AtomicU32,
}

/// The segments in use, under their lock (upstream `seg_map_lock`): a data
/// head that needs a new segment takes it inside its own.
#[derive(Debug, Default)]
pub struct SegCount {
    /// Segments in use (each with its flag set in the segment map).
    used: u32,
    /// Where the search for a free segment starts.
    last: u32,
}

impl<M: Memory> Space<M> {
    /// Room for data through `heads` (at least one); `segs` counts the
    /// segments in use.
    pub fn new(heads: M::Buf<M::Slot<DataHead>>, segs: M::Lock<SegCount>) -> Self {
        Space {
            heads,
            segs,
            room_wanted: AtomicBool::new(false),
            data_crc: AtomicBool::new(false),
            crc_flag_pending: AtomicBool::new(false),
            last_tag: AtomicU32::new(0),
        }
    }

    /// A tag for a new read-miss placeholder: never 0, never with
    /// [`THROUGH_TAG`] (which names writes in flight, see `super::through`),
    /// and not again before 2^31 more placeholders.
    pub(crate) fn next_tag(&self) -> u32 {
        let next = |t: u32| (t.wrapping_add(1) & !THROUGH_TAG).max(1);
        let last = self
            .last_tag
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(next(t)));
        next(last.unwrap_or_else(|t| t))
    }

    pub(crate) fn n_heads(&self) -> usize {
        self.heads.len()
    }

    /// Forgets every head and segment (at start).
    pub(crate) fn reset(&self) {
        for h in self.heads.iter() {
            h.with(|h| h.pos = None);
        }
        self.segs.with(|s| *s = SegCount::default());
        self.room_wanted.store(false, Ordering::Relaxed);
        self.data_crc.store(false, Ordering::Relaxed);
        self.crc_flag_pending.store(false, Ordering::SeqCst);
    }

    /// Segments in use.
    pub(crate) fn used_segs(&self) -> u32 {
        self.segs.with(|s| s.used)
    }

    pub(crate) fn room_wanted(&self) -> bool {
        self.room_wanted.load(Ordering::Relaxed)
    }

    pub(crate) fn set_room_wanted(&self, wanted: bool) {
        self.room_wanted.store(wanted, Ordering::Relaxed);
    }

    /// Whether data written from now on gets a CRC (the table's `data_crc`).
    pub(crate) fn data_crc(&self) -> bool {
        self.data_crc.load(Ordering::SeqCst)
    }

    pub(crate) fn set_data_crc(&self, on: bool) {
        self.data_crc.store(on, Ordering::SeqCst);
    }

    pub(crate) fn crc_flag_pending(&self) -> bool {
        self.crc_flag_pending.load(Ordering::SeqCst)
    }

    pub(crate) fn set_crc_flag_pending(&self, pending: bool) {
        self.crc_flag_pending.store(pending, Ordering::SeqCst);
    }

    /// Marks segment `id` in use or free.
    pub(crate) fn set_used(&self, seg_map: &SegMap<M>, id: SegId, used: bool) {
        self.segs.with(|s| s.set_used(seg_map, id, used));
    }

    /// `get_cache_segment`: a free segment, searched from the last hint,
    /// leaving `keep` free. A segment a read still copies from is not free yet
    /// (see [`Pmem::pin`]): it is looked at after the flag says free, and the
    /// flag is cleared after the segment's new generation is stored (see
    /// [`SegMap::gen`]).
    pub(crate) fn alloc<P: Pmem>(
        &self,
        seg_map: &SegMap<M>,
        pins: &P,
        n_segs: u32,
        keep: u32,
    ) -> Option<SegId> {
        self.segs.with(|s| {
            if n_segs.saturating_sub(s.used) <= keep {
                return None;
            }
            for step in 0..n_segs {
                let id = SegId::checked((s.last + step) % n_segs, n_segs)?;
                if !seg_map.used(id) && !pins.pinned(id.get()) {
                    s.set_used(seg_map, id, true);
                    s.last = id.get();
                    return Some(id);
                }
            }
            None
        })
    }

    /// `cache_data_alloc`: room for up to `len` bytes from data head `cpu`,
    /// under its lock; may be shorter when the head's segment runs out. Takes
    /// a segment reference, and the segment's generation with it. `Err` when
    /// the cache has no free segment for data (`room_wanted` is set then).
    pub(crate) fn data_alloc<P: Pmem>(
        &self,
        seg_map: &SegMap<M>,
        pins: &P,
        n_segs: u32,
        cpu: usize,
        len: u32,
        data_size: u32,
    ) -> Result<(Pos, u64, u32), CacheError> {
        let h = cpu % self.heads.len().max(1);
        let head = self.heads.get(h).ok_or(CacheError::NoMem("no data head"))?;
        head.with(|d| loop {
            match d.pos {
                Some(pos) => {
                    let remain = data_size - pos.off;
                    let gen = seg_map.gen(pos.seg);
                    seg_map.get(pos.seg);
                    let (next, took) = if remain > len {
                        let next = Pos {
                            seg: pos.seg,
                            off: pos.off + len,
                        };
                        (Some(next), len)
                    } else {
                        // Take the rest of the segment; the head lets go of
                        // it. Never the last reference: the reservation holds
                        // one.
                        let last = seg_map.put(pos.seg);
                        debug_assert!(!last, "segment {}: a head held the last reference", pos.seg);
                        (None, remain)
                    };
                    d.pos = next;
                    return Ok((pos, gen, took));
                }
                None => {
                    let Some(seg) = self.alloc(seg_map, pins, n_segs, LOG_RESERVE_SEGS) else {
                        self.set_room_wanted(true);
                        return Err(CacheError::Busy("cache full"));
                    };
                    seg_map.get(seg);
                    d.pos = Some(Pos { seg, off: 0 });
                }
            }
        })
    }

    /// Room for the first chunk of a write of `len` bytes at `off` with
    /// `flags`, through data head `cpu`: up to the end of the subtree, and of
    /// the head's segment (see [`super::Cache::write_reserve`]).
    pub(crate) fn reserve<P: Pmem>(
        &self,
        seg_map: &SegMap<M>,
        pins: &P,
        geo: &Geometry,
        n_segs: u32,
        (off, len, flags): (u64, usize, u32),
        cpu: usize,
    ) -> Result<Reservation, CacheError> {
        let to_stripe = SUBTREE_SIZE - (off & (SUBTREE_SIZE - 1));
        let want = (len as u64).min(to_stripe) as u32;
        if want == 0 {
            return Err(CacheError::Invalid("empty write"));
        }
        let (pos, gen, len) =
            self.data_alloc(seg_map, pins, n_segs, cpu, want, geo.seg_data_size())?;
        Ok(Reservation::new(
            off,
            len,
            seg_map.addr(geo, pos),
            pos,
            gen,
            self.data_crc.load(Ordering::SeqCst),
            flags,
        ))
    }
}

impl SegCount {
    /// Marks segment `id` in use or free, and counts it.
    fn set_used<M: Memory>(&mut self, seg_map: &SegMap<M>, id: SegId, used: bool) {
        if seg_map.set_used(id, used) != used {
            if used {
                self.used += 1;
            } else {
                self.used = self.used.saturating_sub(1);
            }
        }
    }
}
