// SPDX-License-Identifier: GPL-2.0

//! Serving bios: in `map` when that needs neither the backing device nor waiting for room, on
//! the request worker otherwise. Waiting for room is the engine's
//! ([`crate::cache_core::request::until_room`]); this file only moves bytes between bios and the
//! engine.

use super::{
    bio::{BioOp, HeldBio},
    cpu::this_cpu,
    live::{Count, ErrorText, LiveCache},
    miss::GapData,
};
use crate::cache_core::{
    fill::fill_copy,
    io::{copy_hits, copy_in, release_hits, Gap, Hit, HitError},
    request,
    through::{THROUGH_MAX, THROUGH_TAG},
    write_path::Placed,
    CacheError, Pmem, Progress, Source, Waiting, Zeros,
};
use core::sync::atomic::Ordering;
use kernel::prelude::*;

/// What serving a bio came to.
// It lives on the stack for one call; boxing the gaps would allocate on the IO path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Served {
    /// End it with this result.
    Done(Result),
    /// A discard whose cached keys are dropped, or a flush in the modes that write through:
    /// send it on to the backing device ([`LiveCache::pass_down`]).
    ToBacking,
    /// A read whose hits are copied, or a write through: send its gaps to the backing device
    /// ([`super::miss::MissQueue::submit`]).
    Misses(Gaps),
}

/// Most gaps of a read `map` sends to the backing device; the worker takes a read with more
/// (it has room for [`MAX_READ_GAPS`](super::construct::MAX_READ_GAPS)).
const MAX_GAPS: usize = 8;

/// Most hits a read pins at once; it copies them outside the engine, gives them back,
/// and goes on with the next ones ([`LiveCache::read_unlocked`]).
const MAX_HITS: usize = 8;

/// The gaps of a read (see [`Cache::read_start`](crate::cache_core::Cache::read_start)).
pub(crate) struct Gaps {
    gaps: [Gap; MAX_GAPS],
    n: usize,
}

impl Gaps {
    /// A write through's one gap.
    fn one(gap: Gap) -> Self {
        let mut gaps = [Gap::default(); MAX_GAPS];
        gaps[0] = gap;
        Self { gaps, n: 1 }
    }
}

/// How a read miss or a write through ended, for [`LiveCache::gap_complete`].
enum GapEnd<'a, S: ?Sized> {
    /// With the data the backing device returned or took.
    Data(&'a S),
    /// With no error, but what the backing device holds is unknown ([`GapData::Unknown`]):
    /// the cache holds nothing of it.
    Unknown,
    /// The backing device failed it.
    Failed,
}

/// What serving a read came to (see [`LiveCache::read_unlocked`]).
enum ReadServed {
    /// End it with this result.
    Done(Result),
    /// Its hits are copied; send this many gaps to the backing device.
    Misses(usize),
    /// It has more gaps than the caller has room for; nothing was done.
    TooManyGaps,
    /// It misses and must not wait (`REQ_NOWAIT`): its gaps are given up; end it with
    /// `EAGAIN`.
    WouldBlock,
}

/// Where a request is served.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServeContext {
    /// In `map`, in the submitter's context, where waiting for a bio of our own would deadlock
    /// (device-mapper defers bios submitted from `map` until it returns).
    Map,
    /// On the request worker, which may wait for the backing device and for room.
    Worker,
}

impl LiveCache {
    /// The request worker: drains the queue of held bios.
    pub(crate) fn run_requests(&self) {
        loop {
            // The queue's spinlock is released at the end of this statement, before the bio is
            // handled (which sleeps): a `while let` on the guard would hold it for the body.
            let next = self.pending.lock().pop();
            let Some(mut bio) = next else {
                break;
            };
            if bio.op() == BioOp::Read {
                self.read_on_worker(bio);
                continue;
            }
            let served = self.handle(&mut bio);
            self.dispatch(bio, served);
        }
    }

    /// A read `map` could not serve: with a preflush (which may wait for room), or with more
    /// gaps than `map` takes. The worker has room for every gap a read can have, so no read
    /// waits for the backing device here either.
    fn read_on_worker(&self, mut bio: HeldBio) {
        if bio.is_preflush() {
            if let Err(e) = self.until_room(|| outcome(self.engine.flush())) {
                bio.end(Err(e));
                return;
            }
        }
        let mut gaps = self.worker_gaps.lock();
        // The worker may wait: it sends a `REQ_NOWAIT` read's gaps as any other's.
        match self.read_unlocked(&mut bio, &mut gaps, false) {
            ReadServed::Done(r) => bio.end(r),
            ReadServed::WouldBlock => bio.end(Err(EAGAIN)),
            ReadServed::Misses(n) => {
                self.misses
                    .submit(bio, &self.backing, gaps.get(..n).unwrap_or_default(), true)
            }
            ReadServed::TooManyGaps => {
                pr_err!(
                    "pcache_rs: read of {} bytes at sector {} has more gaps than a read can have\n",
                    bio.size(),
                    bio.sector()
                );
                bio.end(Err(EIO));
            }
        }
    }

    /// Serves a bio the worker took from the queue, waiting for room if the cache is full.
    fn handle(&self, bio: &mut HeldBio) -> Served {
        if !self.caches_writes
            && matches!(bio.op(), BioOp::Write | BioOp::WriteZeroes)
            && bio.size() > 0
        {
            return self.through_on_worker(bio);
        }
        if self.caches_writes && matches!(bio.op(), BioOp::Write | BioOp::WriteZeroes) {
            return Served::Done(self.write_on_worker(bio));
        }
        let mut onward = None;
        let result = self.until_room(|| match self.serve(bio, ServeContext::Worker)? {
            Served::Done(r) => Some(r),
            other => {
                onward = Some(other);
                Some(Ok(()))
            }
        });
        match (result, onward) {
            (Ok(()), Some(served)) => served,
            (r, _) => Served::Done(r),
        }
    }

    /// Does what serving `bio` came to.
    pub(crate) fn dispatch(&self, mut bio: HeldBio, served: Served) {
        match served {
            Served::Done(result) => bio.end(result),
            Served::ToBacking => self.pass_down(bio),
            Served::Misses(g) => {
                // A read's gaps with a placeholder are cached; a write through's, in writethrough.
                let fills = bio.op() == BioOp::Read || self.caches_writes_through;
                self.misses.submit(
                    bio,
                    &self.backing,
                    g.gaps.get(..g.n).unwrap_or_default(),
                    fills,
                )
            }
        }
    }

    /// Fills the cache from the read misses that came back and the writes through that
    /// completed, and ends their bios.
    pub(crate) fn run_fills(&self) {
        while self.misses.complete(|gap, done| match done {
            Ok(GapData::Own(pages)) => self.gap_complete(gap, GapEnd::Data(pages)),
            Ok(GapData::Unknown) => self.gap_complete(gap, GapEnd::<Zeros>::Unknown),
            Err(e) => {
                let what = if gap.tag & THROUGH_TAG != 0 {
                    "write"
                } else {
                    "read"
                };
                pr_err!(
                    "pcache_rs: backing device {} failed at {}+{}: {:?}\n",
                    what,
                    gap.off,
                    gap.len,
                    e
                );
                self.gap_complete(gap, GapEnd::<Zeros>::Failed);
            }
        }) {}
    }

    /// Sends a discard, or a flush in the modes that write through, on to the backing device,
    /// at the same offset (the backing device starts where the target does).
    pub(crate) fn pass_down(&self, bio: HeldBio) {
        let sector = bio.sector().saturating_sub(self.begin);
        bio.submit_to(&self.backing, sector);
    }

    /// Runs `attempt` until it completes, waiting for room while the cache is full; fails
    /// with `EIO` only when writeback has made no progress for [`request::STALL_MS`].
    pub(crate) fn until_room(&self, attempt: impl FnMut() -> Option<Result>) -> Result {
        request::until_room(self, attempt).unwrap_or_else(stalled)
    }

    /// Serves `bio` in `map` if that needs neither waiting for the backing device nor waiting
    /// for room (a write or flush with room in the cache, a read with at most [`MAX_GAPS`]
    /// gaps): no context switch to the worker, as upstream and dm-writecache do. `None` hands
    /// it to the worker.
    ///
    /// A bio marked `REQ_NOWAIT` (see [`HeldBio::is_nowait`]) that needs the backing device
    /// ends here with `EAGAIN` before anything is done for it (a read, once its lookup finds a
    /// gap: its placeholders are given up). One the cache takes whole goes on as any other, and
    /// one that finds the cache full goes to the worker: its submitter does not wait for it.
    pub(crate) fn serve_inline(&self, bio: &mut HeldBio) -> Option<Served> {
        let nowait = bio.is_nowait();
        if nowait && self.needs_backing(bio.op()) {
            return Some(Served::Done(Err(EAGAIN)));
        }
        // A flush persists the open ksets under the key log's lock alone, unless a close needs a
        // new log segment.
        if self.caches_writes && bio.op() == BioOp::Flush && self.write_path.flush(&self.pmem()) {
            return Some(Served::Done(Ok(())));
        }
        if self.caches_writes && matches!(bio.op(), BioOp::Write | BioOp::WriteZeroes) {
            if bio.is_preflush() && !self.write_path.flush(&self.pmem()) {
                match outcome(self.engine.flush()) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return Some(Served::Done(Err(e))),
                    None => {
                        // The worker persists and writes it; it is counted here, in `map`.
                        self.count_write(self.offset_of(bio), bio.size() as usize);
                        return None;
                    }
                }
            }
            let zeroes = bio.op() == BioOp::WriteZeroes;
            return self.write_unlocked(bio, zeroes).map(Served::Done);
        }
        if !self.caches_writes {
            match bio.op() {
                BioOp::Write if bio.size() > 0 => return self.write_through(bio),
                // Every write completed on the backing device, and a cache in these modes
                // starts empty on attach (see `cache_core::mode`): a flush is the backing
                // device's alone.
                BioOp::Flush => return Some(Served::ToBacking),
                _ => {}
            }
        }
        if bio.op() == BioOp::Read {
            if bio.is_preflush() {
                return None;
            }
            let mut gaps = [Gap::default(); MAX_GAPS];
            return match self.read_unlocked(bio, &mut gaps, nowait) {
                ReadServed::Done(r) => Some(Served::Done(r)),
                ReadServed::WouldBlock => Some(Served::Done(Err(EAGAIN))),
                ReadServed::Misses(n) => Some(Served::Misses(Gaps { gaps, n })),
                ReadServed::TooManyGaps => None,
            };
        }
        self.serve(bio, ServeContext::Map)
    }

    /// A write served in `map` with its copy outside the engine (see
    /// [`LiveCache::write_chunks`]). `None`: the cache is full; the worker writes the rest
    /// ([`LiveCache::write_on_worker`]), from where this got (kept in the bio,
    /// [`HeldBio::set_resume`]).
    fn write_unlocked(&self, bio: &mut HeldBio, zeroes: bool) -> Option<Result> {
        let mut progress = Progress::default();
        let zeros = Zeros(bio.size() as usize);
        let src = write_source(bio, &zeros, zeroes);
        let result = self.write_chunks(bio, src, &mut progress);
        let Progress { done, mut hit, .. } = progress;
        if result.is_none() {
            bio.set_resume(&progress);
        }
        if !hit && result.is_none() {
            // The commits tell whether the write replaced cached data (a hit); the part not
            // committed here is looked up before the worker writes it.
            let (off, len) = (self.offset_of(bio), bio.size() as usize);
            hit = self
                .engine
                .holds_any(off + done as u64, (len - done) as u64);
        }
        self.count(if hit {
            Count::WriteHit
        } else {
            Count::WriteMiss
        });
        result
    }

    /// A write `map` found no room for (or one with a preflush, persisted first): copied as in
    /// `map`, outside the engine, from where `map` got ([`HeldBio::resume`]: no chunk is
    /// committed twice), waiting for room whenever a chunk finds none and going on from there.
    fn write_on_worker(&self, bio: &mut HeldBio) -> Result {
        if bio.is_preflush() {
            self.until_room(|| outcome(self.engine.flush()))?;
        }
        let mut progress = bio.resume();
        let zeroes = bio.op() == BioOp::WriteZeroes;
        let zeros = Zeros(bio.size() as usize);
        let src = write_source(bio, &zeros, zeroes);
        self.until_room(|| self.write_chunks(bio, src, &mut progress))
    }

    /// Copies `src` (what `bio` writes, see [`write_source`]) into the cache from where
    /// `progress` got on, so that writes on two CPUs copy at once: the room for each chunk is
    /// reserved, filled on this CPU and fenced here (`pmem_wmb` orders only this CPU's
    /// stores), then committed, all outside the engine unless the engine is needed
    /// ([`crate::cache_core::WritePath`]). `progress` counts the commits and keeps a FUA
    /// chunk's kset persist that found no room. `None`: the cache is full (what is committed
    /// stays, and is not committed again).
    fn write_chunks(
        &self,
        bio: &HeldBio,
        src: &dyn Source,
        progress: &mut Progress,
    ) -> Option<Result> {
        let off = self.offset_of(bio);
        let len = src.len();
        let fua = bio.is_fua();
        loop {
            if let Err(e) = self.engine.persist_owed(progress) {
                return outcome(Err(e));
            }
            let at = progress.done;
            if at >= len {
                return Some(Ok(()));
            }
            let (from, rest) = (off + at as u64, len - at);
            let pmem = self.pmem();
            // The room comes from the data head under its lock alone; only what needs more of
            // the engine (a full cache, the CRC flag to sync, a new log segment) asks it.
            let reserved = match self.write_path.reserve(&pmem, from, rest, 0, this_cpu()) {
                Some(r) => Ok(r),
                None => self.engine.write_reserve(from, rest, 0, this_cpu()),
            };
            let r = match reserved {
                Ok(r) => r,
                Err(e) => return outcome(Err(e)),
            };
            let Ok(crc) = copy_in(&pmem, &r, src, at) else {
                self.engine.write_cancel(&r);
                return Some(Err(EIO));
            };
            pmem.fence();
            // The key goes in under its subtree's lock and the key log's; only what needs more
            // of the engine (a new log segment, an empty key pool) asks it.
            let committed = match self.write_path.commit(&pmem, &r, crc, fua) {
                Some(c) => Ok(c),
                None => self.engine.write_commit(&r, crc, fua),
            };
            match committed {
                Ok(c) => progress.committed(&r, c),
                Err(e) => return outcome(Err(e)),
            }
        }
    }

    /// The byte offset of `bio` on the backing device.
    fn offset_of(&self, bio: &HeldBio) -> u64 {
        (bio.sector().saturating_sub(self.begin)) << 9
    }

    /// A write in the modes that write through, sent to the backing device as it is: the engine records the write in flight and drops the
    /// cached range
    /// ([`Cache::through_start`](crate::cache_core::Cache::through_start)); the bio goes to
    /// the backing device whole, with its flush and FUA flags, and its completion caches the
    /// data in writethrough mode ([`LiveCache::run_fills`]). `None` when the engine has no
    /// room to record it: the worker waits for room ([`LiveCache::through_on_worker`]).
    fn write_through(&self, bio: &HeldBio) -> Option<Served> {
        let off = (bio.sector().saturating_sub(self.begin)) << 9;
        let len = bio.size() as usize;
        self.count_write(off, len);
        match self.engine.through_start(off, len) {
            Ok(gap) => Some(Served::Misses(Gaps::one(gap))),
            Err(CacheError::Busy(_)) => None,
            Err(e) => Some(Served::Done(Err(failed(&e)))),
        }
    }

    /// A write or write-zeroes in the modes that write through, on the worker: `map` found no
    /// slot for it, or it is a write-zeroes (whose zeroing waits). Waits for a slot (a
    /// completion frees one, [`LiveCache::run_fills`]), then goes to the backing device as in
    /// `map` ([`LiveCache::write_through`]), with no lock held.
    fn through_on_worker(&self, bio: &mut HeldBio) -> Served {
        let off = (bio.sector().saturating_sub(self.begin)) << 9;
        let len = bio.size() as usize;
        let mut started = None;
        // A flush goes to the backing device with the write, or before the zeroing below: the
        // cache's own keys need no persisting in these modes (they start empty on attach).
        let r = self.until_room(|| match self.engine.through_start(off, len) {
            Ok(gap) => {
                started = Some(gap);
                Some(Ok(()))
            }
            Err(CacheError::Busy(_)) => None,
            Err(e) => Some(Err(failed(&e))),
        });
        let gap = match (r, started) {
            (Ok(()), Some(gap)) => gap,
            (r, _) => return Served::Done(r),
        };
        if bio.op() == BioOp::Write {
            return Served::Misses(Gaps::one(gap));
        }
        let flushed = if bio.is_preflush() {
            self.backing.flush()
        } else {
            Ok(())
        };
        let zeroed = flushed
            .and_then(|()| self.backing.zero_out(off, len as u64))
            .and_then(|()| {
                if bio.is_fua() {
                    self.backing.flush()
                } else {
                    Ok(())
                }
            });
        let zeros = Zeros(len);
        self.gap_complete(
            &gap,
            match zeroed {
                Ok(()) => GapEnd::Data(&zeros),
                Err(_) => GapEnd::Failed,
            },
        );
        if let Err(e) = zeroed {
            pr_err!(
                "pcache_rs: zeroing the backing device at {}+{} failed: {:?}\n",
                off,
                len,
                e
            );
        }
        Served::Done(zeroed)
    }

    /// A read miss or a write through came back from the backing device. Caches the data it
    /// returned or took, if known, with its copy into pmem outside any lock, as a write copies
    /// (see [`crate::cache_core::fill`]), and gives up the read's placeholder or the write's
    /// slot. Wakes the worker if that freed a slot it may be waiting for
    /// ([`LiveCache::through_on_worker`]).
    fn gap_complete<S: Source + ?Sized>(&self, gap: &Gap, end: GapEnd<'_, S>) {
        let through = gap.tag & THROUGH_TAG != 0;
        if gap.tag == 0 && !matches!(end, GapEnd::Failed) {
            // A read that caches nothing (no placeholder): nothing to give up either.
            return;
        }
        // In the modes that cache writes, a read's fill takes no engine path (see
        // `WritePath::fill`), unless it gave back a segment's last reference.
        if let (true, false, GapEnd::Data(data)) = (self.caches_writes, through, &end) {
            if let Some(seg) = self.write_path.fill(&self.pmem(), gap, *data, this_cpu()) {
                self.engine.segment_released(seg);
            }
            return;
        }
        // Was the table full before this write's slot goes? Then the worker may wait for a
        // slot: the first slot to go after it found the table full finds it full still (no
        // write takes one meanwhile), and wakes it.
        let full = through && self.engine.in_flight_len() == THROUGH_MAX;
        match end {
            GapEnd::Failed if through => self.engine.through_failed(gap),
            GapEnd::Failed => self.engine.read_failed(gap),
            GapEnd::Unknown if through => self.engine.through_release(gap),
            GapEnd::Unknown => self.engine.read_abandon(gap),
            GapEnd::Data(data) => {
                let mut fill = self.engine.fill_start(gap, this_cpu());
                if fill.is_open() {
                    fill_copy(&self.pmem(), &mut fill, data);
                    self.engine.fill_end(fill);
                }
            }
        }
        if full {
            self.wake_all();
        }
    }

    /// A read with its hits copied outside the engine, so that reads on two CPUs copy at
    /// once. The hits are found outside the engine too: the reader pins the segments of
    /// up to [`MAX_HITS`] current keys, looking each up under its subtree's lock
    /// ([`crate::cache_core::Reader::hits`]). From the first piece that is not such
    /// a hit, the engine goes on: it pins hits and places the gaps
    /// ([`Cache::read_resume`](crate::cache_core::Cache::read_resume)). Either way the hits are
    /// copied from pmem into the bio's pages on this CPU and their pins given back with no lock
    /// held, and the read goes on from there until it is all started. The caller sends the
    /// gaps, described in `gaps`, to the backing device; with `nowait`, a read that has any
    /// gives them up ([`ReadServed::WouldBlock`]).
    fn read_unlocked(&self, bio: &mut HeldBio, gaps: &mut [Gap], nowait: bool) -> ReadServed {
        let off = (bio.sector().saturating_sub(self.begin)) << 9;
        let len = bio.size() as usize;
        let end = off + len as u64;
        let mut hits = [Hit::default(); MAX_HITS];
        let mut from = off;
        let mut placed = 0usize;
        let mut looked_again = false;
        let pmem = self.pmem();
        loop {
            let found = self.reader.hits(&pmem, off, len, from, &mut hits);
            let placed_here = if found.hits == 0 && self.caches_writes && !looked_again {
                self.place_gap(off, len, from)
            } else {
                Placed::Engine
            };
            looked_again = false;
            let (n_hits, next) = if found.hits > 0 {
                (found.hits, found.next)
            } else if let Placed::Gap { gap, next } = placed_here {
                // Placed outside the engine (the modes that cache writes have no write
                // through in flight).
                match gaps.get_mut(placed) {
                    Some(slot) => {
                        *slot = gap;
                        placed += 1;
                    }
                    None => {
                        self.write_path.abandon(&gap);
                        self.abandon(gaps.get(..placed).unwrap_or_default());
                        return ReadServed::TooManyGaps;
                    }
                }
                (0, next)
            } else if placed_here == Placed::Hit {
                // A write put a key there since the reader looked: look once more.
                looked_again = true;
                continue;
            } else {
                let room = gaps.get_mut(placed..).unwrap_or_default();
                let started = self.engine.read_resume(off, from, bio, room, &mut hits);
                match started {
                    Ok(Some(s)) => {
                        placed += s.gaps;
                        (s.hits, s.next)
                    }
                    Ok(None) => {
                        self.abandon(gaps.get(..placed).unwrap_or_default());
                        return ReadServed::TooManyGaps;
                    }
                    Err(e) => {
                        self.abandon(gaps.get(..placed).unwrap_or_default());
                        return ReadServed::Done(Err(failed(&e)));
                    }
                }
            };
            let held = hits.get(..n_hits).unwrap_or_default();
            if let Err(e) = copy_hits(&pmem, held, bio) {
                let placed = gaps.get(..placed).unwrap_or_default();
                if e == HitError::Crc {
                    self.engine.read_crc_failed();
                }
                self.engine.read_cancel(placed, held);
                let what = match e {
                    HitError::Crc => "cached data failed its crc check",
                    HitError::Media => "pmem media error",
                };
                pr_err!("pcache_rs: {} reading {}+{}\n", what, off, bio.size());
                return ReadServed::Done(Err(EIO));
            }
            // The first read of a key since attach checked its CRC; marking the key needs only
            // its subtree's lock.
            if held.iter().any(Hit::checks) {
                self.reader.verified(held);
            }
            // The pins go back outside the engine (`Pmem::unpin`).
            release_hits(&pmem, held);
            if next >= end {
                break;
            }
            from = next;
        }
        if placed == 0 {
            self.count(Count::ReadHit);
            ReadServed::Done(Ok(()))
        } else if nowait {
            // Counted when it comes back without the flag.
            self.abandon(gaps.get(..placed).unwrap_or_default());
            ReadServed::WouldBlock
        } else {
            self.count(Count::ReadMiss);
            ReadServed::Misses(placed)
        }
    }

    /// The gap at `from` of the read of `len` bytes at `off`, placed outside the engine
    /// ([`crate::cache_core::WritePath::place_gap`]). Not inlined: `read_unlocked`'s frame
    /// holds its hits already.
    #[inline(never)]
    fn place_gap(&self, off: u64, len: usize, from: u64) -> Placed {
        self.write_path
            .place_gap(off, len, from, self.caches_misses)
    }

    /// Whether a bio of `op` needs the backing device whatever the cache holds: discards passed
    /// down and, in the modes that write through, writes and flushes (a read needs it for
    /// what it misses; an unknown operation fails at once).
    fn needs_backing(&self, op: BioOp) -> bool {
        match op {
            BioOp::Read | BioOp::Other => false,
            BioOp::Write | BioOp::WriteZeroes | BioOp::Flush => !self.caches_writes,
            BioOp::Discard => self.discard_passdown,
        }
    }

    /// Gives up the placeholders of gaps a read placed and will not send.
    fn abandon(&self, gaps: &[Gap]) {
        // Index only: nothing of the engine.
        for gap in gaps {
            self.write_path.abandon(gap);
        }
    }

    /// One attempt at `bio` in the engine. `None`: it cannot complete here and now:
    /// the cache is full, or (in `map`) it needs the backing device. A write that stops on a
    /// full cache may have cached a leading part; serving it again rewrites the same bytes.
    fn serve(&self, bio: &mut HeldBio, at: ServeContext) -> Option<Served> {
        let off = (bio.sector().saturating_sub(self.begin)) << 9;
        let len = bio.size() as usize;
        let op = bio.op();
        let writes = matches!(op, BioOp::Write | BioOp::WriteZeroes);
        if at == ServeContext::Map {
            // Every bio comes to `map` first: count a write there, before any of it is written
            // (a write that waits for room or for the backing device is served on the worker).
            if writes {
                self.count_write(off, len);
            }
            // In the modes that write through, writes and flushes wait for the backing device.
            if self.engine.writes_need_backing()
                && (writes || bio.is_preflush() || op == BioOp::Flush)
            {
                return None;
            }
        }
        if bio.is_preflush() || op == BioOp::Flush {
            let done = outcome(self.engine.flush())?;
            if done.is_err() || op == BioOp::Flush {
                return Some(Served::Done(done));
            }
        }
        if op == BioOp::Discard {
            let done = outcome(self.engine.discard(off, len as u64))?;
            return Some(match done {
                Ok(()) if self.discard_passdown => Served::ToBacking,
                r => Served::Done(r),
            });
        }
        // A flush is done (above). Reads are served by `read_unlocked`, writes and
        // write-zeroes by `write_chunks` (from `map` or the worker) or as writes through, all
        // outside the engine; nothing else gets here.
        Some(Served::Done(if op == BioOp::Flush {
            Ok(())
        } else {
            Err(EOPNOTSUPP)
        }))
    }

    /// Counts a write bio as a hit or a miss.
    fn count_write(&self, off: u64, len: usize) {
        self.count(if self.engine.holds_any(off, len as u64) {
            Count::WriteHit
        } else {
            Count::WriteMiss
        });
    }

    /// Persists everything acknowledged, so a later instance (reload) or a power cut finds it.
    pub(crate) fn quiesce(&self) {
        self.quiesced.store(true, Ordering::Release);
        if let Err(e) = self.until_room(|| outcome(self.engine.flush())) {
            pr_err!("pcache_rs: persisting the key log failed: {:?}\n", e);
        }
    }
}

/// An engine result as a bio's: `None` when the cache is full.
fn outcome(r: Result<(), CacheError>) -> Option<Result> {
    match r {
        Ok(()) => Some(Ok(())),
        Err(CacheError::Busy(_)) => None,
        Err(e) => Some(Err(failed(&e))),
    }
}

/// A request waited for room and writeback made no progress for [`request::STALL_MS`].
fn stalled(_: request::Stalled) -> Result {
    pr_err!(
        "pcache_rs: cache full and writeback made no progress for {} s (backing device failing?); failing the request\n",
        request::STALL_MS / 1000
    );
    Err(EIO)
}

fn failed(e: &CacheError) -> Error {
    pr_err!("pcache_rs: request failed: {}\n", ErrorText(e));
    EIO
}

/// What a write copies into the cache: the bio's pages, or for `REQ_OP_WRITE_ZEROES` (in the
/// modes that cache writes) zeros, which are data like any other, so they read back after a
/// remove and a crash, and the cache stays in upstream's format. (Passing the bio down instead
/// would let an older dirty key, written back later, overwrite the zeros.) In the modes that
/// write through, the worker zeroes the backing device ([`LiveCache::through_on_worker`]).
fn write_source<'a>(bio: &'a HeldBio, zeros: &'a Zeros, zeroes: bool) -> &'a dyn Source {
    if zeroes {
        zeros
    } else {
        bio
    }
}
