//! Reclaiming segments from the key tail (upstream `cache_gc.c`).
//!
//! GC runs when the used segments reach `gc_percent` of the cache. It only ever
//! consumes ksets behind the dirty tail (already written back): each key drops
//! its segment reference — the last reference bumps the segment's generation and
//! frees it — and then the key tail advances past the kset. A LAST kset frees the
//! key-log segment it ends once the dirty tail has left that segment.

use super::ctrl::Held;
use super::env::{Backing, Pmem};
use super::error::CacheError;
use super::key::{Pos, SegId};
use super::stats::Counter;
use super::writeback::Step;
use super::{Cache, Memory};
use crate::meta::cache_info::CtrlPos;
use crate::meta::kset::{KsetRead, KSET_KEYS_MAX};

impl<P: Pmem, B: Backing, M: Memory> Held<'_, P, B, M> {
    /// GC runs while there is a written-back kset to consume and either the
    /// used segments reach `gc_percent`, or keys run short (small writes can use
    /// up the key slab long before the data space, and only GC frees keys: a
    /// segment it frees drops every key that points into it), or a write found
    /// no data space (a write larger than the room `gc_percent` leaves would
    /// otherwise wait for ever).
    pub(super) fn need_gc(&self) -> bool {
        if self.t.key_tail.pos == self.t.dirty_tail.pos {
            return false;
        }
        self.over_gc_threshold() || self.gc_urgent()
    }

    /// The used segments reached `gc_percent` of the cache.
    pub(super) fn over_gc_threshold(&self) -> bool {
        u64::from(self.used_segs()) >= self.gc_threshold()
    }

    /// The used segments at which GC starts: `gc_percent` of the cache.
    pub(super) fn gc_threshold(&self) -> u64 {
        u64::from(self.n_segs) * u64::from(self.t.info.gc_percent()) / 100
    }

    /// Reclaim one kset at the key tail (see [`Cache::gc_step`]).
    fn gc_step(&mut self) -> Result<Step, CacheError> {
        if self.stats.get(Counter::GcErrors) > 0 {
            return Err(CacheError::Io("gc stopped after an error"));
        }
        let used = self.used_segs();
        let r = self.gc_one();
        if matches!(r, Ok(Step::Idle)) || self.used_segs() < used {
            // A segment is free for the write that wanted room (which asks
            // again if it needs more), or everything written back is
            // collected and it waits for writeback. Either way GC goes back to
            // `gc_percent`: collecting on would empty the cache of data that
            // reads still want.
            self.space.set_room_wanted(false);
        }
        if r.is_err() {
            self.stats.inc(Counter::GcErrors);
        }
        r
    }

    fn gc_one(&mut self) -> Result<Step, CacheError> {
        if !self.need_gc() {
            return Ok(Step::Idle);
        }
        let tail = self.t.key_tail.pos;
        // GC's copies may have just read it (and checked its CRC).
        let read = match self.tail_kset_read() {
            Some(read) => read,
            None => self.read_kset(tail)?,
        };
        match read {
            KsetRead::End => Ok(Step::Idle),
            KsetRead::Last { next_cache_seg_id } => {
                if self.t.dirty_tail.pos.seg == tail.seg {
                    return Ok(Step::Idle);
                }
                self.t.key_tail.pos = Pos {
                    seg: self.next_log_seg(next_cache_seg_id)?,
                    off: 0,
                };
                self.encode_tail(CtrlPos::KeyTail);
                self.set_used(tail.seg, false);
                Ok(Step::Progress)
            }
            KsetRead::Keys { key_num, size } => {
                // GC never passes the dirty tail (`need_gc`), so it never frees the
                // data of a kset that is not written back, or being written back.
                debug_assert!(tail != self.t.dirty_tail.pos);
                // Decode every key first: a bad key must not leave a half-done kset.
                for i in 0..key_num as usize {
                    self.scratch_key(i)?;
                }
                // Drop the references first, but invalidate (bump the generation
                // of) emptied segments only after the key tail has moved past this
                // kset. Otherwise a crash in between would replay this kset with a
                // later key dropped as stale while an earlier key it overwrote, in
                // a still-valid segment, comes back with old data.
                let mut emptied = [SegId::default(); KSET_KEYS_MAX];
                let mut n_emptied = 0usize;
                for i in 0..key_num as usize {
                    let key = self.scratch_key(i)?;
                    // Only keys replay or the write path counted hold a reference.
                    if key.gen >= self.seg_map.gen(key.pos.seg) && self.seg_unref(key.pos.seg) {
                        if let Some(slot) = emptied.get_mut(n_emptied) {
                            *slot = key.pos.seg;
                            n_emptied += 1;
                        }
                    }
                }
                self.t.key_tail.pos.off += size;
                self.encode_tail(CtrlPos::KeyTail);
                for &seg in emptied.iter().take(n_emptied) {
                    self.seg_invalidate(seg);
                }
                // The key tail (persisted above) may have passed the last key
                // without a CRC: the DATA_CRC flag can follow the table now.
                self.t.log_seq_tail += 1;
                let pending = self.space.crc_flag_pending();
                if pending || (self.data_crc() && !self.t.info.data_crc()) {
                    self.sync_crc_flag();
                }
                self.stats.inc(Counter::KsetsGced);
                Ok(Step::Progress)
            }
        }
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Fewer than an eighth of the key slab is free (see
    /// [`Index::key_pressure`](super::Index::key_pressure)).
    pub fn key_pressure(&self) -> bool {
        self.index.key_pressure()
    }

    /// A write waits for room, or keys run short: GC should not wait for the
    /// end of a round of writeback (see [`super::background::Background::run`]).
    pub(crate) fn gc_urgent(&self) -> bool {
        self.space.room_wanted() || self.key_pressure()
    }

    /// GC is over `gc_percent` and has collected everything written back: only
    /// writeback can make room now (see [`super::watermark`]).
    pub(crate) fn gc_waits_for_writeback(&self) -> bool {
        self.held(|h| h.t.key_tail.pos == h.t.dirty_tail.pos && h.over_gc_threshold())
    }

    /// Reclaim one kset at the key tail (`pcache_cache_gc_fn`, one iteration),
    /// under the control lock. One GC at a time: a second caller meanwhile
    /// waits for the lock, then finds the kset gone.
    pub fn gc_step(&self) -> Result<Step, CacheError> {
        self.held(|h| h.gc_step())
    }

    /// Run GC until it has nothing to do, and the clean pass to its end.
    pub fn gc_all(&self) -> Result<(), CacheError> {
        while self.gc_step()? == Step::Progress {}
        self.clean_all();
        Ok(())
    }
}
