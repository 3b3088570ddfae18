//! GC keeps live clean data: before it collects the kset at the key tail, the
//! parts of that kset's keys the index still maps are copied to a data head
//! as new clean keys, instead of being dropped with their segment.
//!
//! GC collects in log order, so without this the oldest data goes first
//! whether or not reads still want it: a working set written once and then
//! read and partly overwritten loses its untouched blocks each time GC passes
//! them, and every read of one then misses to the backing device. Upstream
//! drops them (`cache_gc.c`); this is not a format change: the copies are
//! ordinary clean keys, logged in the kset of their subtree like a read miss's
//! fill, and a module that knows nothing of this replays them.
//!
//! Why it is safe:
//! - Everything GC collects lies behind the dirty tail, so the data of a live
//!   piece is on the backing device: a copy of it is clean.
//! - The copy commits only if the index still maps its range to the same
//!   bytes (see [`Over::Data`]), checked under the subtree's lock as the key
//!   goes in, and a subtree's keys all go to one kset: a write that replaced
//!   any of it first wins, and one that comes after is logged after the copy,
//!   so replay rebuilds the same index.
//! - A crash before the copy's kset is persisted loses the copy, and GC may
//!   already have passed the original: the range is then not cached, which is
//!   what GC did before. Nothing older comes back: the piece was the newest
//!   key of its range, and every key before it lies behind the key tail.
//!
//! With data CRC, only data checked against its CRC since attach is copied (a
//! copy's CRC is of the bytes copied, so copying unchecked data would vouch
//! for it), and a copy is checked by its first read: so GC keeps what was
//! read since it was last copied.
//!
//! What it costs and how it is bounded: a pmem-to-pmem copy of the live bytes,
//! made in the background with no lock but the subtree's (as a write's), and
//! keys for the copies (none when keys run short, or segments: it leaves a free
//! segment to each data head and the key log). All of a kset's live data is
//! copied when it is at most half of what the kset holds (GC then frees more
//! than it copies), or while the ksets GC collected over its last pass say the
//! cache's live data fits well within `gc_percent` (a working set that fits is
//! kept however many times GC passes it); from any other kset, only data GC
//! has not copied since attach. So in a cache full of live data, or whose
//! segments stay in use whatever GC does (room the requests hold), the ksets
//! GC collects come to be all copies, the estimate climbs, and GC drops them,
//! as upstream: it does not copy the same data round the log for ever.

use super::data::Source;
use super::env::{Backing, IoError, Pmem};
use super::error::CacheError;
use super::io::copy_in;
use super::key::{Key, Pos, KEY_FLAGS_FORWARDED};
use super::key_log::Over;
use super::kset::SUPERSEDED;
use super::stats::Counter;
use super::writeback::WbExtent;
use super::{Cache, Memory};
use crate::meta::kset::{KsetRead, KEY_FLAGS_CLEAN};
use core::cell::RefCell;

/// What GC saw of the ksets it collected over about its last pass: the
/// sectors of their keys, and the part of them the index still mapped, each
/// sum decayed by what GC collects after, so that together they cover about a
/// window of the used segments at `gc_percent`.
///
/// Weighed by bytes, over a pass, rather than by kset over the last few: a
/// working set that GC met as a run of ksets in a row (copies come as a run,
/// and a kset of small keys holds little data) made an average over the last
/// eight ksets say the cache was full of live data when its live data was a
/// few percent of it, and GC dropped the rest of the working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveSeen {
    live: u64,
    total: u64,
}

impl LiveSeen {
    pub(crate) const NONE: Self = LiveSeen { live: 0, total: 0 };

    /// Adds a kset whose keys hold `total` bytes, `live` of them still
    /// mapped, to what was seen over `window` sectors: what was seen before
    /// decays by the share of the window the kset takes.
    fn see(&mut self, total: u64, live: u64, window: u64) {
        let window = window.max(1);
        let t = total / SECTOR;
        let l = live.min(total) / SECTOR;
        let decay = |x: u64| x - (x.saturating_mul(t) / window).min(x);
        self.total = decay(self.total).saturating_add(t);
        self.live = decay(self.live).saturating_add(l).min(self.total);
    }

    /// How live what was seen is, in 1/1024; what has not yet been seen of a
    /// window counts as dead (after attach, GC keeps everything until it has
    /// seen about a window).
    fn fraction(&self, window: u64) -> u64 {
        (self.live.saturating_mul(1024))
            .checked_div(self.total.max(window))
            .unwrap_or(0)
    }
}

/// [`LiveSeen`] counts in sectors (keys are whole sectors): its decay
/// multiplies two counts, which in bytes could overflow for a large cache.
const SECTOR: u64 = 512;

/// The data head GC's copies go through. Writes use theirs by CPU; this is
/// one of them, so the copies share its lock with that CPU's writes.
const FORWARD_HEAD: usize = 0;

/// The flags of a copy: clean, and copied.
const COPY_FLAGS: u32 = KEY_FLAGS_CLEAN | KEY_FLAGS_FORWARDED;

/// Live parts found per hold of the control lock (on the stack: the
/// background's extent buffer may hold a planned writeback batch).
const FORWARD_BATCH: usize = 16;

/// `len` bytes of pmem at device offset `from`, as the source of a copy
/// ([`copy_in`] stores and CRCs them as it does a write's): read a `bounce`
/// buffer at a time, with the machine-check-safe copy.
struct Staged<'a, P> {
    pmem: &'a P,
    from: u64,
    len: usize,
    bounce: RefCell<&'a mut [u8]>,
}

impl<P: Pmem> Source for Staged<'_, P> {
    fn len(&self) -> usize {
        self.len
    }

    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or(IoError)?;
        let mut bounce = self.bounce.try_borrow_mut().map_err(|_| IoError)?;
        let mut cur = at;
        while cur < end {
            let n = (end - cur).min(bounce.len());
            let buf = bounce
                .get_mut(..n)
                .filter(|b| !b.is_empty())
                .ok_or(IoError)?;
            self.pmem.read(self.from + cur as u64, buf)?;
            f(buf)?;
            cur += n;
        }
        Ok(())
    }
}

/// Where finding the live parts of the kset at the key tail goes on.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// The key tail it started at: once GC passed it, there is nothing to go
    /// on with.
    tail: Pos,
    /// The key of the kset, and the logical offset in it.
    key: usize,
    off: u64,
    /// Only parts GC did not copy before (see [`KEY_FLAGS_FORWARDED`]).
    first_only: bool,
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Finds the live parts of the keys of the kset at the key tail that GC is
    /// about to collect, and copies each to a data head as a clean key
    /// (see the [module](self) comment), a few parts per hold of the control
    /// lock. `bounce` (at least 512 bytes) stages the copy. Best effort:
    /// anything it cannot copy GC drops, as it would without it. Returns the
    /// bytes copied.
    pub fn gc_forward(&self, bounce: &mut [u8]) -> u64 {
        let mut parts = [WbExtent::default(); FORWARD_BATCH];
        let mut cursor = None;
        let mut kept = 0;
        loop {
            let (n, next) = self.held(|h| h.forward_plan(&mut parts, cursor));
            for e in parts.iter().take(n) {
                match self.forward_extent(e, bounce) {
                    Ok(bytes) => kept += bytes,
                    Err(()) => return self.forward_kept(kept),
                }
            }
            match next {
                Some(c) => cursor = Some(c),
                None => return self.forward_kept(kept),
            }
        }
    }

    fn forward_kept(&self, kept: u64) -> u64 {
        self.stats.add(Counter::GcKeptBytes, kept);
        kept
    }

    /// Copies extent `e` (logical offset, its data's device offset, length)
    /// to new room, a chunk per reservation, and commits each over the data
    /// it copied. `Err`: stop copying (no room, no keys); a chunk a write
    /// replaced meanwhile is skipped.
    fn forward_extent(&self, e: &WbExtent, bounce: &mut [u8]) -> Result<u64, ()> {
        let mut done = 0u32;
        let mut kept = 0u64;
        while done < e.len {
            if !self.forward_has_room() {
                return Err(());
            }
            let off = e.off + u64::from(done);
            let from = e.addr + u64::from(done);
            let r = self
                .write_reserve(off, (e.len - done) as usize, COPY_FLAGS, FORWARD_HEAD)
                .map_err(|_| ())?;
            done += r.len;
            let src = Staged {
                pmem: &self.pmem,
                from,
                len: r.len as usize,
                bounce: RefCell::new(&mut *bounce),
            };
            let Ok(crc) = copy_in(&self.pmem, &r, &src, 0) else {
                self.write_cancel(&r);
                continue;
            };
            self.pmem.fence();
            // Err: a write replaced some of it (the room went back), or no key.
            match self.commit_over(&r, crc, false, Some(Over::Data(from)), &mut || {}) {
                Ok(_) => kept += u64::from(r.len),
                Err(CacheError::Busy(SUPERSEDED)) => {}
                Err(_) => return Err(()),
            }
        }
        Ok(kept)
    }

    /// Room for a copy leaves a free segment for each data head and one for
    /// the key log to the requests. (A request waiting for room does not stop
    /// the copies: it wants a free segment, which this leaves it, and which
    /// only collecting dead data makes; dropping live data for it would empty
    /// the cache of what reads want whenever writes outrun writeback.)
    fn forward_has_room(&self) -> bool {
        let reserve = self.space.n_heads() as u32 + 1;
        self.n_segs.saturating_sub(self.used_segs()) > reserve && !self.key_pressure()
    }
}

impl<P: Pmem, B: Backing, M: Memory> super::ctrl::Held<'_, P, B, M> {
    /// The kset at the key tail of this pass, if the scratch buffer holds it
    /// from the read GC's copies made (see `Ctrl::forward_kset`).
    pub(crate) fn tail_kset_read(&self) -> Option<KsetRead> {
        let (at, seq, read) = self.t.forward_kset?;
        (at == self.t.key_tail.pos && seq == self.t.log_seq_tail).then_some(read)
    }

    /// The live parts of the keys of the kset at the key tail, if GC is about
    /// to collect it, into `out`, from `cursor` on: all of them if they are
    /// at most half of what its keys hold, else those GC did not copy before
    /// (see the [module](self) comment). Only parts whose data has no CRC or was
    /// checked against it since attach (a copy's CRC is of the bytes copied,
    /// so copying unchecked data would vouch for it). Returns how many, and
    /// where the next call goes on if `out` filled.
    fn forward_plan(
        &mut self,
        out: &mut [WbExtent],
        cursor: Option<Cursor>,
    ) -> (usize, Option<Cursor>) {
        if !self.need_gc() || self.key_pressure() {
            return (0, None);
        }
        let tail = self.t.key_tail.pos;
        if cursor.is_some_and(|c| c.tail != tail) {
            return (0, None);
        }
        let seq = self.t.log_seq_tail;
        let read = match self.tail_kset_read().filter(|_| cursor.is_some()) {
            Some(read) => read,
            None => self.read_kset(tail).unwrap_or(KsetRead::End),
        };
        let KsetRead::Keys { key_num, .. } = read else {
            return (0, None);
        };
        self.t.forward_kset = Some((tail, seq, read));
        let key_num = key_num as usize;
        let mut c = match cursor {
            Some(c) => c,
            None => {
                let (mut total, mut live) = (0u64, 0u64);
                for i in 0..key_num {
                    if let Some(key) = self.kset_key(i) {
                        total += u64::from(key.len);
                        self.each_piece(&key, key.off, false, &mut |from, upto, _| {
                            live += upto - from;
                            true
                        });
                    }
                }
                if live == 0 {
                    self.forward_estimate(total, live);
                    return (0, None);
                }
                Cursor {
                    tail,
                    key: 0,
                    off: 0,
                    first_only: !self.forward_all(total, live),
                }
            }
        };
        let mut n = 0usize;
        while c.key < key_num {
            let Some(key) = self.kset_key(c.key) else {
                c.key += 1;
                continue;
            };
            let mut full = None;
            self.each_piece(
                &key,
                c.off.max(key.off),
                c.first_only,
                &mut |from, upto, addr| {
                    let Some(slot) = out.get_mut(n) else {
                        full = Some(from);
                        return false;
                    };
                    *slot = WbExtent {
                        off: from,
                        addr,
                        len: (upto - from) as u32,
                        crc: None,
                        order: 0,
                    };
                    n += 1;
                    true
                },
            );
            if let Some(from) = full {
                c.off = from;
                return (n, Some(c));
            }
            c.key += 1;
            c.off = 0;
        }
        (n, None)
    }

    /// Whether to copy all the `live` bytes of a kset whose keys hold
    /// `total`, rather than only those GC did not copy before. Yes if they
    /// are at most half: GC then frees more than it copies. Yes too while the
    /// ksets GC collected over its last pass were live in a proportion that
    /// puts the live data of the cache within three quarters of what
    /// `gc_percent` keeps: a working set that fits is kept each time GC
    /// passes it.
    fn forward_all(&mut self, total: u64, live: u64) -> bool {
        let est = self.forward_estimate(total, live);
        let threshold = self.gc_threshold();
        live * 2 <= total || est * u64::from(self.used_segs()) * 4 <= threshold * 3 * 1024
    }

    /// Adds a kset GC is about to collect, `live` bytes of `total` live, to
    /// what GC saw over its last pass (see [`LiveSeen`]). Returns how live
    /// that was, in 1/1024.
    fn forward_estimate(&mut self, total: u64, live: u64) -> u64 {
        let window = self.gc_threshold().max(1) * u64::from(self.seg_data_size()) / SECTOR;
        self.t.gc_seen.see(total, live, window);
        self.t.gc_seen.fraction(window)
    }

    /// Key `i` of the kset in the scratch buffer, if it is one GC drops a
    /// reference of (not stale).
    fn kset_key(&self, i: usize) -> Option<Key> {
        self.scratch_key(i)
            .ok()
            .filter(|k| !k.empty() && !self.key_stale(k))
    }

    /// Calls `f(from, upto, addr)` on each part of `key`'s range from `start`
    /// on that the index maps to `key`'s data (at device offset `addr`) and
    /// that may be copied (no CRC, or checked; with `first_only`, not copied
    /// before), in order, until it returns false.
    fn each_piece(
        &self,
        key: &Key,
        start: u64,
        first_only: bool,
        f: &mut dyn FnMut(u64, u64, u64) -> bool,
    ) {
        self.each_part_mapped(key, start, &mut |k, from, upto| {
            let copied_before = k.flags & KEY_FLAGS_FORWARDED != 0;
            if k.unverified() || (first_only && copied_before) {
                return true;
            }
            f(from, upto, self.pos_addr(k.pos) + (from - k.off))
        });
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Calls `f(entry, from, upto)` on each part `from..upto` of logged key
    /// `key`'s range from `start` on that the index still maps to `key`'s
    /// data (through `entry`, a piece of `key`: see [`piece_of`]), in order,
    /// until it returns false.
    pub(crate) fn each_part_mapped(
        &self,
        key: &Key,
        start: u64,
        f: &mut dyn FnMut(&Key, u64, u64) -> bool,
    ) {
        self.index
            .each_overlap(start, key.end(), &mut |k, from, upto| {
                !piece_of(k, key) || f(k, from, upto)
            });
    }

    /// Whether the index still maps any part of logged key `key`'s range to
    /// `key`'s data.
    pub(crate) fn maps_part_of(&self, key: &Key) -> bool {
        let mut mapped = false;
        self.each_part_mapped(key, key.off, &mut |_, _, _| {
            mapped = true;
            false
        });
        mapped
    }
}

/// Whether index entry `k` maps part of logged key `key`'s range to the same
/// bytes: the same segment generation, and the same place in it.
fn piece_of(k: &Key, key: &Key) -> bool {
    !k.empty()
        && k.pos.seg == key.pos.seg
        && k.gen == key.gen
        && k.off >= key.off
        && k.pos.off.checked_sub(key.pos.off) == u32::try_from(k.off - key.off).ok()
}
