//! Room for data: the data heads and the free segments, under a lock of their
//! own (upstream: each data head's lock and `seg_map_lock`), so that a write
//! reserves its room without the engine lock ([`super::WritePath::reserve`]).
//!
//! Which segments are in use, and their references, are atomics in the
//! [`SegMap`]: a segment's flag changes only under this lock, and its
//! references change wherever a reservation takes or gives one (a data head
//! holds one on its segment, so a reservation never takes the last away).

use super::env::Pmem;
use super::error::CacheError;
use super::io::Reservation;
use super::key::{Pos, SegId};
use super::segment::SegMap;
use super::through::THROUGH_TAG;
use super::{DataHead, Memory};
use crate::meta::layout::{Geometry, SUBTREE_SIZE};

/// Segments a data head keeps free for the key log, so closing a kset can always
/// find a segment even when data filled the cache.
pub(crate) const LOG_RESERVE_SEGS: u32 = 1;

/// The data heads, the count of segments in use, and what a reservation
/// reads of the engine's settings, under the lock of [`super::Memory::Lock`].
pub struct Space<M: Memory> {
    heads: M::Buf<DataHead>,
    /// Segments in use (each with its flag set in the segment map).
    pub(crate) used_segs: u32,
    /// Where the search for a free segment starts.
    pub(crate) last_seg: u32,
    /// A write found no data space: GC collects whatever is written back,
    /// whatever `gc_percent` says (see `Cache::need_gc`).
    pub(crate) room_wanted: bool,
    /// Data written from now on gets a CRC (the table's `data_crc`).
    pub(crate) data_crc: bool,
    /// The table's `data_crc` differs from the media flag: the engine syncs
    /// it before the next reservation (see `Cache::sync_crc_flag`).
    pub(crate) crc_flag_pending: bool,
    /// The tag of the last read-miss placeholder (see [`super::io::Gap`]).
    last_tag: u32,
}

impl<M: Memory> Space<M> {
    /// Room for data through `heads` (at least one).
    pub fn new(heads: M::Buf<DataHead>) -> Self {
        Space {
            heads,
            used_segs: 0,
            last_seg: 0,
            room_wanted: false,
            data_crc: false,
            crc_flag_pending: false,
            last_tag: 0,
        }
    }

    /// A tag for a new read-miss placeholder: never 0, never with
    /// [`THROUGH_TAG`] (which names writes in flight, see `super::through`),
    /// and not again before 2^31 more placeholders.
    pub(crate) fn next_tag(&mut self) -> u32 {
        self.last_tag = (self.last_tag.wrapping_add(1) & !THROUGH_TAG).max(1);
        self.last_tag
    }

    pub(crate) fn n_heads(&self) -> usize {
        self.heads.len()
    }

    /// Forgets every head and segment (at start).
    pub(crate) fn reset(&mut self) {
        for h in self.heads.iter_mut() {
            h.pos = None;
        }
        self.used_segs = 0;
        self.last_seg = 0;
        self.room_wanted = false;
        self.data_crc = false;
        self.crc_flag_pending = false;
    }

    /// Marks segment `id` in use or free.
    pub(crate) fn set_used(&mut self, seg_map: &SegMap<M>, id: SegId, used: bool) {
        if seg_map.set_used(id, used) != used {
            if used {
                self.used_segs += 1;
            } else {
                self.used_segs = self.used_segs.saturating_sub(1);
            }
        }
    }

    /// `get_cache_segment`: a free segment, searched from the last hint,
    /// leaving `keep` free. A segment a read still copies from is not free yet
    /// (see [`Pmem::pin`]): it is looked at after the flag says free, and the
    /// flag is cleared after the segment's new generation is stored (see
    /// [`SegMap::gen`]).
    pub(crate) fn alloc<P: Pmem>(
        &mut self,
        seg_map: &SegMap<M>,
        pins: &P,
        n_segs: u32,
        keep: u32,
    ) -> Option<SegId> {
        if n_segs.saturating_sub(self.used_segs) <= keep {
            return None;
        }
        for step in 0..n_segs {
            let id = SegId::checked((self.last_seg + step) % n_segs, n_segs)?;
            if !seg_map.used(id) && !pins.pinned(id.get()) {
                self.set_used(seg_map, id, true);
                self.last_seg = id.get();
                return Some(id);
            }
        }
        None
    }

    /// `cache_data_alloc`: room for up to `len` bytes from data head `cpu`; may
    /// be shorter when the head's segment runs out. Takes a segment reference,
    /// and the segment's generation with it. `Err` when the cache has no free
    /// segment for data (`room_wanted` is set then).
    pub(crate) fn data_alloc<P: Pmem>(
        &mut self,
        seg_map: &SegMap<M>,
        pins: &P,
        n_segs: u32,
        cpu: usize,
        len: u32,
        data_size: u32,
    ) -> Result<(Pos, u64, u32), CacheError> {
        let h = cpu % self.heads.len().max(1);
        loop {
            match self.heads.get(h).and_then(|d| d.pos) {
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
                    if let Some(d) = self.heads.get_mut(h) {
                        d.pos = next;
                    }
                    return Ok((pos, gen, took));
                }
                None => {
                    let Some(seg) = self.alloc(seg_map, pins, n_segs, LOG_RESERVE_SEGS) else {
                        self.room_wanted = true;
                        return Err(CacheError::Busy("cache full"));
                    };
                    seg_map.get(seg);
                    if let Some(d) = self.heads.get_mut(h) {
                        d.pos = Some(Pos { seg, off: 0 });
                    }
                }
            }
        }
    }

    /// Room for the first chunk of a write of `len` bytes at `off` with
    /// `flags`, through data head `cpu`: up to the end of the subtree, and of
    /// the head's segment (see [`super::Cache::write_reserve`]).
    pub(crate) fn reserve<P: Pmem>(
        &mut self,
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
            self.data_crc,
            flags,
        ))
    }
}
