//! The engine on real threads, as the module runs it: request threads write
//! with the copy outside the engine (reserve, copy, fence, commit), read
//! with their misses sent out without the lock (start, backing read, fill), and
//! wait for room through `with_room`; a background thread runs the module's
//! background round (idle kset flush, writeback with its copy outside the lock,
//! GC) back to back. Every commit records, under its subtree's lock, the new
//! version of its sectors in a shared history: a read must return, per sector,
//! a version that was the last one at some point between its start and its end
//! (exactly the last one written when each thread owns its region), and at the
//! end a full writeback leaves the backing device with the last versions.
//!
//! The threads run as the OS schedules them, and under the seeded scheduler of
//! `sched.rs`, each in its own region or all in one shared range.
//!
//! The devices are the crash simulator's models behind one mutex, so copies of
//! two threads interleave at the granularity of the pieces the engine hands
//! them, and a crash image can be taken at any device operation of any thread:
//! each is replayed after the run and must have lost no write committed before
//! a FLUSH that completed before the crash ([`check_crash`]).

mod sched;

use pcache_engine::cache_core::background::Background;
use pcache_engine::cache_core::fill::fill_copy;
use pcache_engine::cache_core::io::{copy_hits, copy_in, release_hits, Gap, Hit};
use pcache_engine::cache_core::request::until_room;
use pcache_engine::cache_core::write_path::Placed;
use pcache_engine::cache_core::{
    Backing, Cache, CacheError, CacheOptions, IoError, Locked, Pmem, Progress, Reader, Waiting,
    WbExtent, WritePath,
};
use pcache_engine::host_mem::{Borrowed, HostLock};
use pcache_engine::meta::layout::{Geometry, SEGMENTS_OFF};
use pcache_engine::sim::{BackingModel, CrashImage, OwnedMem, Rng, SimBacking, SimPmem, World};
use sched::Sched;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const SEG: u64 = 64 << 10;
const N_SEGS: u64 = 24;
const BACKING: u64 = 16 << 20;
const SECTOR: usize = 512;
/// Each request thread's region: 1 MiB, 4 MiB apart (a subtree each, and
/// more than the cache holds together).
const REGION: u64 = 1 << 20;
const THREADS: u64 = 3;

/// Both devices: the crash simulator's models (`sim.rs`: a pmem whose stores
/// are durable only once flushed and fenced, a backing device with a volatile
/// write cache) behind one mutex. Under a [`Sched`], every device access
/// is a point where another thread may be given the turn; with
/// crashes on, the world takes a crash image at random device operations of any
/// thread, inside a lock or not, and the history marks what had been
/// committed and flushed at that moment (only the thread whose turn it is
/// runs, so the image and the mark are of one instant).
struct Devices {
    world: Mutex<World>,
    sched: Option<Arc<Sched>>,
    history: History,
}

impl Devices {
    fn op<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        if let Some(s) = &self.sched {
            s.switch();
        }
        let mut w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        let crashes = w.crashes.len();
        let r = f(&mut w);
        if w.crashes.len() > crashes {
            self.history.mark();
        }
        r
    }

    /// A point where another thread may be given the turn.
    fn switch(&self) {
        if let Some(s) = &self.sched {
            s.switch();
        }
    }

    /// The world, without a switch (pins, sizes, the checks after a run).
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The pmem, and the pins of reads copying from it outside the engine.
#[derive(Clone)]
struct TPmem(Arc<Devices>);

impl Pmem for TPmem {
    fn size(&self) -> u64 {
        self.0.world().pmem_size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.op(|w| w.pmem_read(off, buf))
    }
    fn write(&self, off: u64, data: &[u8]) {
        self.0.op(|w| w.pmem_write(off, data))
    }
    fn flush(&self, off: u64, len: u64) {
        self.0.world().pmem_flush(off, len)
    }
    fn fence(&self) {
        self.0.op(|w| w.pmem_fence())
    }
    // A read outside the engine looks the key up, pins its segment and
    // checks the key's generation: other threads may run in between.
    fn pin(&self, seg: u32) {
        self.0.switch();
        self.0.world().pin(seg);
        self.0.switch();
    }
    fn unpin(&self, seg: u32) {
        self.0.world().unpin(seg)
    }
    fn pinned(&self, seg: u32) -> bool {
        self.0.world().pinned(seg)
    }
}

#[derive(Clone)]
struct TBacking(Arc<Devices>);

impl Backing for TBacking {
    fn size(&self) -> u64 {
        BACKING
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.op(|w| w.backing_read(off, buf))
    }
    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        self.0.op(|w| w.backing_write(off, data))
    }
    fn flush(&self) -> Result<(), IoError> {
        self.0.op(|w| w.backing_flush())
    }
    fn write_batch_from<P: Pmem>(
        &self,
        pmem: &P,
        extents: &[pcache_engine::cache_core::WbExtent],
    ) -> Result<bool, IoError> {
        pcache_engine::sim::write_batch_reading(self, pmem, extents)
    }
}

type Engine<'a> = Cache<TPmem, TBacking, pcache_engine::host_mem::Borrowed<'a>>;

/// The engine, shared by every thread as the module shares it: it has no
/// lock of its own, only the locks inside it. Under a [`Sched`], each call into
/// it is a point where another thread may be given the turn (and so is every
/// lock it takes inside).
struct Shared<'e, 'a>(&'e Engine<'a>, Option<Arc<Sched>>);

impl<'a> Shared<'_, 'a> {
    fn with<R>(&self, f: impl FnOnce(&Engine<'a>) -> R) -> R {
        if let Some(s) = &self.1 {
            s.switch();
        }
        f(self.0)
    }
}

/// The background writer: its own handles on both devices, its plan and its
/// bounce buffer, under a lock a request's `kick` only tries, as the module's.
type Writer = Background<TPmem, TBacking, Vec<WbExtent>, Vec<u8>>;

/// The module's wait queue for requests waiting for room, and what its `kick`
/// runs: a short round in the waiting request's thread, unless the background
/// writer is busy in a round of its own (see `LiveCache::kick`).
struct Room<'r, 'a> {
    events: Mutex<u64>,
    cv: Condvar,
    start: Instant,
    /// The engine, and the writer the background thread runs its rounds
    /// with. None: `kick` does nothing (a test with no background writer).
    inline: Option<(&'r Engine<'a>, &'r HostLock<Writer>)>,
    /// The first error of a round a request ran for itself.
    error: Mutex<Option<String>>,
    /// Rounds requests ran for themselves.
    inline_rounds: AtomicU64,
    /// Waits and time are the scheduler's.
    sched: Option<Arc<Sched>>,
}

impl<'r, 'a> Room<'r, 'a> {
    fn new(
        sched: Option<Arc<Sched>>,
        inline: Option<(&'r Engine<'a>, &'r HostLock<Writer>)>,
    ) -> Self {
        Room {
            events: Mutex::new(0),
            cv: Condvar::new(),
            start: Instant::now(),
            inline,
            error: Mutex::new(None),
            inline_rounds: AtomicU64::new(0),
            sched,
        }
    }

    /// The first error of a round run in `kick`, if any.
    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Waiting for Room<'_, '_> {
    fn ticket(&self) -> u64 {
        if let Some(s) = &self.sched {
            return s.ticket();
        }
        *self.events.lock().unwrap()
    }
    fn wait(&self, ticket: u64, timeout_ms: u32) -> bool {
        if let Some(s) = &self.sched {
            return s.wait(ticket, timeout_ms);
        }
        let g = self.events.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, Duration::from_millis(u64::from(timeout_ms)), |e| {
                *e == ticket
            })
            .unwrap();
        *g != ticket
    }
    fn wake_all(&self) {
        if let Some(s) = &self.sched {
            return s.wake_all();
        }
        *self.events.lock().unwrap() += 1;
        self.cv.notify_all();
    }
    // As the module's: one writeback step and the GC after it, here, in the
    // waiting request's thread, unless the background thread is in a round
    // (which wakes the waiters when it makes progress).
    fn kick(&self) {
        let Some((engine, writer)) = self.inline else {
            return;
        };
        let round = writer.try_with(|w| w.run_for_waiter(engine, self));
        if round.is_some() {
            self.inline_rounds.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(e) = round.and_then(|r| r.writeback_error.or(r.gc_error)) {
            let mut first = self.error.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| format!("a request's round: {e}"));
        }
    }
    fn now_ms(&self) -> u64 {
        match &self.sched {
            Some(s) => s.now_ms(),
            None => self.start.elapsed().as_millis() as u64,
        }
    }
}

/// Sector `s` holding version `v`: both in every 8 bytes.
fn fill(s: u64, v: u64, out: &mut [u8]) {
    for w in out.chunks_mut(16) {
        w[..8].copy_from_slice(&s.to_le_bytes());
        w[8..].copy_from_slice(&v.to_le_bytes());
    }
}

fn version_of(s: u64, d: &[u8]) -> Option<u64> {
    let v = u64::from_le_bytes(d[8..16].try_into().ok()?);
    let mut want = vec![0u8; SECTOR];
    fill(s, v, &mut want);
    (d == &want[..] || (v == 0 && d.iter().all(|&b| b == 0))).then_some(v)
}

/// The order in which the engine took the writes: each commit records, under
/// its subtree's lock, the new version of its sectors with the next sequence
/// number. A read must return, for each sector, a version that was the
/// sector's last one at some point between the read's start and its end (with
/// no other thread writing there, exactly the last one written).
#[derive(Default)]
struct History(Mutex<HistoryState>);

#[derive(Default)]
struct HistoryState {
    seq: u64,
    /// Per sector, its versions in commit order with their sequence numbers.
    sectors: std::collections::HashMap<u64, Vec<(u64, u64)>>,
    /// The sequence number at the start of the last FLUSH that completed.
    flushed: u64,
    /// Per sector, the sequence number of its newest version written with
    /// FUA that completed: it must survive, as a flushed one.
    fua: std::collections::HashMap<u64, u64>,
    /// One per crash image, in the order the world took them.
    marks: Vec<Mark>,
    /// The first sector and version committed twice, if any.
    twice: Option<(u64, u64)>,
}

/// What the history held when a crash image was taken.
#[derive(Debug, Clone)]
struct Mark {
    /// Commits so far.
    seq: u64,
    /// See [`HistoryState::flushed`]: every commit up to it must survive.
    flushed: u64,
    /// See [`HistoryState::fua`]: these must survive too.
    fua: std::collections::HashMap<u64, u64>,
}

impl History {
    fn state(&self) -> std::sync::MutexGuard<'_, HistoryState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called under the subtree's lock, as the commit that makes it so. A
    /// write commits each of its chunks once, however often it waits for room
    /// (see `Progress`): a version committed twice is recorded as an error.
    fn commit(&self, off: u64, len: u64, version: u64) {
        let mut st = self.state();
        st.seq += 1;
        let seq = st.seq;
        for s in off / SECTOR as u64..(off + len) / SECTOR as u64 {
            let hist = st.sectors.entry(s).or_default();
            let again = hist.iter().any(|&(v, _)| v == version);
            hist.push((version, seq));
            if again && st.twice.is_none() {
                st.twice = Some((s, version));
            }
        }
    }

    /// The commits so far: a read's start or end, a FLUSH's start.
    fn now(&self) -> u64 {
        self.state().seq
    }

    /// Called as the FLUSH that started at `start`
    /// (a [`History::now`]) completes.
    fn flushed(&self, start: u64) {
        let mut st = self.state();
        st.flushed = st.flushed.max(start);
    }

    /// The write of `version` to `off..off + len` with FUA completed.
    fn fua_done(&self, off: u64, len: u64, version: u64) {
        let mut st = self.state();
        for s in off / SECTOR as u64..(off + len) / SECTOR as u64 {
            let seq = st
                .sectors
                .get(&s)
                .and_then(|h| h.iter().find(|&&(v, _)| v == version))
                .map(|&(_, seq)| seq);
            if let Some(seq) = seq {
                let at = st.fua.entry(s).or_default();
                *at = (*at).max(seq);
            }
        }
    }

    /// A crash image was just taken.
    fn mark(&self) {
        let mut st = self.state();
        let m = Mark {
            seq: st.seq,
            flushed: st.flushed,
            fua: st.fua.clone(),
        };
        st.marks.push(m);
    }

    /// Whether `version` was sector `s`'s last one at some point in
    /// `from..=to` (version 0: never written).
    fn current_between(&self, s: u64, version: u64, from: u64, to: u64) -> bool {
        let st = self.state();
        let hist = st.sectors.get(&s).map(Vec::as_slice).unwrap_or_default();
        let at = if version == 0 {
            Some((0, 0))
        } else {
            hist.iter()
                .position(|&(v, _)| v == version)
                .map(|i| (i + 1, hist[i].1))
        };
        let Some((next, since)) = at else {
            return false;
        };
        since <= to && hist.get(next).is_none_or(|&(_, until)| until > from)
    }

    /// Sector `s`'s last version.
    fn last(&self, s: u64) -> u64 {
        self.state()
            .sectors
            .get(&s)
            .and_then(|h| h.last())
            .map_or(0, |&(v, _)| v)
    }
}

/// A write as the module serves it: each chunk reserved under the lock, copied
/// and fenced without it, committed under it, first in `map`; once a chunk
/// finds the cache full, the worker goes on from there each time room is made
/// (what is committed stays, and each commit is in the history at once).
fn write(
    (lock, write_path): (&Shared<'_, '_>, &WritePath<Borrowed<'_>>),
    room: &Room<'_, '_>,
    pmem: &mut TPmem,
    history: &History,
    w: (u64, &[u8], u64),
    fua: bool,
) -> Result<(), String> {
    let mut progress = Progress::default();
    until_room(room, || {
        write_chunks((lock, write_path), pmem, history, w, fua, &mut progress)
    })
    .unwrap_or_else(|_| Err("write stalled waiting for room".into()))?;
    if fua {
        history.fua_done(w.0, w.1.len() as u64, w.2);
    }
    Ok(())
}

/// The chunks of a write from where `progress` got on; `None` when the cache
/// is full.
fn write_chunks(
    (lock, write_path): (&Shared<'_, '_>, &WritePath<Borrowed<'_>>),
    pmem: &mut TPmem,
    history: &History,
    (off, data, version): (u64, &[u8], u64),
    fua: bool,
    progress: &mut Progress,
) -> Option<Result<(), String>> {
    loop {
        // As the module: the engine only when a persist is owed.
        match progress
            .persist
            .map_or(Ok(()), |_| lock.with(|c| c.persist_owed(progress)))
        {
            Ok(()) => {}
            Err(CacheError::Busy(_)) => return None,
            Err(e) => return Some(Err(format!("persist: {e}"))),
        }
        let at = progress.done;
        if at >= data.len() {
            return Some(Ok(()));
        }
        let (from, rest) = (off + at as u64, data.len() - at);
        // As the module: outside the engine, unless that needs the engine.
        let reserved = match write_path.reserve(pmem, from, rest, 0, 0) {
            Some(r) => Ok(r),
            None => lock.with(|c| c.write_reserve(from, rest, 0, 0)),
        };
        let r = match reserved {
            Ok(r) => r,
            Err(CacheError::Busy(_)) => return None,
            Err(e) => return Some(Err(format!("reserve: {e}"))),
        };
        let Ok(crc) = copy_in(pmem, &r, data, at) else {
            return Some(Err("copy_in".into()));
        };
        pmem.fence();
        // As the module: outside the engine, unless the commit needs the
        // engine. The history records each commit as its key goes in.
        let mut record = || history.commit(r.off, u64::from(r.len), version);
        let committed = match write_path.commit_with(pmem, &r, crc, fua, &mut record) {
            Some(c) => Ok(c),
            None => lock.with(|c| c.write_commit_with(&r, crc, fua, &mut record)),
        };
        match committed {
            Ok(c) => progress.committed(&r, c),
            Err(CacheError::Busy(_)) => return None,
            Err(e) => return Some(Err(format!("commit: {e}"))),
        }
    }
}

/// A FLUSH as `map` serves it: under the key log's lock, or when a close
/// needs a new key segment in the engine, through `until_room`. Every
/// write committed before it must survive a crash after it.
fn flush(
    (lock, write_path): (&Shared<'_, '_>, &WritePath<Borrowed<'_>>),
    pmem: &mut TPmem,
    room: &Room<'_, '_>,
    history: &History,
) -> Result<(), String> {
    // As the module: outside the engine, unless a close needs a new log
    // segment. Every commit recorded before it started is in a kset it closes.
    let start = history.now();
    if write_path.flush(pmem) {
        history.flushed(start);
        return Ok(());
    }
    match until_room(room, || {
        lock.with(|c| {
            let start = history.now();
            match c.flush() {
                Err(CacheError::Busy(_)) => None,
                r => {
                    if r.is_ok() {
                        history.flushed(start);
                    }
                    Some(r)
                }
            }
        })
    }) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("flush: {e}")),
        Err(_) => Err("flush stalled waiting for room".into()),
    }
}

/// A read as `map` serves it: hits found and pinned outside the engine
/// (each lookup under its subtree's lock), from the first piece that is not
/// one on under the lock, where gaps are placeheld too; the hits copied and
/// checked, the gaps read from the backing device, and the pins given back
/// without it; the fills under it. Returns the history's sequence numbers at
/// its start and its end.
fn read(
    (lock, reader, write_path): (
        &Shared<'_, '_>,
        &Reader<Borrowed<'_>>,
        &WritePath<Borrowed<'_>>,
    ),
    pmem: &TPmem,
    backing: &mut TBacking,
    history: &History,
    off: u64,
    buf: &mut [u8],
) -> Result<(u64, u64), String> {
    let mut gaps = [Gap::default(); 8];
    let mut hits = [Hit::default(); 8];
    let (len, end) = (buf.len(), off + buf.len() as u64);
    let start = history.now();
    let mut placed = 0;
    let mut from = off;
    let mut looked_again = false;
    let abandon = |gaps: &[Gap]| gaps.iter().for_each(|g| write_path.abandon(g));
    loop {
        pmem.0.switch();
        let found = reader.hits(pmem, off, len, from, &mut hits);
        // As the module: the gap placed outside the engine when it can be.
        let placed_here = if found.hits == 0 && !looked_again {
            write_path.place_gap(off, len, from, true)
        } else {
            Placed::Engine
        };
        looked_again = false;
        let (n, next) = if found.hits > 0 {
            (found.hits, found.next)
        } else if let Placed::Gap { gap, next } = placed_here {
            match gaps.get_mut(placed) {
                Some(slot) => {
                    *slot = gap;
                    placed += 1;
                    (0, next)
                }
                None => {
                    write_path.abandon(&gap);
                    abandon(&gaps[..placed]);
                    return lock.with(|c| {
                        c.read(off, buf, true, 0)
                            .map(|_| (history.now(), history.now()))
                            .map_err(|e| format!("read: {e}"))
                    });
                }
            }
        } else if placed_here == Placed::Hit {
            looked_again = true;
            continue;
        } else {
            let started =
                lock.with(|c| c.read_resume(off, from, &mut *buf, &mut gaps[placed..], &mut hits));
            match started.map_err(|e| format!("read_resume: {e}"))? {
                Some(s) => {
                    placed += s.gaps;
                    (s.hits, s.next)
                }
                None => {
                    abandon(&gaps[..placed]);
                    return lock.with(|c| {
                        c.read(off, buf, true, 0)
                            .map(|_| (history.now(), history.now()))
                            .map_err(|e| format!("read: {e}"))
                    });
                }
            }
        };
        let held = &hits[..n];
        let copied = copy_hits(pmem, held, &mut *buf);
        // As the module: a check that passed is recorded under the subtree lock.
        if copied.is_ok() && held.iter().any(Hit::checks) {
            reader.verified(held);
        }
        release_hits(pmem, held);
        if copied.is_err() {
            abandon(&gaps[..placed]);
            return Err("pmem read".into());
        }
        if next >= end {
            break;
        }
        from = next;
    }
    for g in &gaps[..placed] {
        backing
            .read(g.off, &mut buf[g.at..g.at + g.len])
            .map_err(|_| "backing read")?;
    }
    // As the module: the fills outside the engine (room, copy,
    // commit), unless one gives back a segment's last reference.
    for g in &gaps[..placed] {
        if let Some(seg) = write_path.fill(&pmem.clone(), g, &buf[..], 0) {
            lock.with(|c| c.segment_released(seg));
        }
    }
    Ok((start, history.now()))
}

/// Request thread `t`: random writes and reads of its own region, or with
/// `shared` of the region every thread uses, each read checked against the
/// history.
fn request_thread(
    t: u64,
    shared: bool,
    (lock, reader, room, history): (
        &Shared<'_, '_>,
        &Reader<Borrowed<'_>>,
        &Room<'_, '_>,
        &History,
    ),
    write_path: &WritePath<Borrowed<'_>>,
    (pmem, backing): (TPmem, TBacking),
    ops: u64,
) -> Result<(), String> {
    let (mut pmem, mut backing) = (pmem, backing);
    let mut rng = Rng(0x5eed ^ ((t + 1) * 0x9e37_79b9));
    let base = if shared { 0 } else { t * 4 * REGION };
    // Threads that share a range share less of it, so that they meet.
    let region = if shared { REGION / 8 } else { REGION };
    let sectors = region / SECTOR as u64;
    let mut next = (t + 1) << 40;
    for _ in 0..ops {
        let s = rng.below(sectors);
        let n = (1 + rng.below(64)).min(sectors - s);
        let off = base + s * SECTOR as u64;
        let first = off / SECTOR as u64;
        let mut buf = vec![0u8; n as usize * SECTOR];
        if rng.chance(1, 64) {
            // What `dmsetup message` and `dmsetup status` do meanwhile, from
            // any CPU: the engine takes them beside the requests.
            let (crc, percent, pick) = (rng.chance(1, 2), rng.below(91) as u8, rng.below(3));
            lock.with(|c| match pick {
                0 => c.set_data_crc(crc).map_err(|e| format!("data_crc: {e}")),
                1 => c
                    .set_gc_percent(percent)
                    .map_err(|e| format!("gc_percent: {e}")),
                _ => {
                    let st = c.status();
                    if st.used_segs > st.n_segs || st.keys > st.key_capacity {
                        return Err(format!("thread {t}: status out of range: {st:?}"));
                    }
                    Ok(())
                }
            })?;
        } else if rng.chance(1, 16) {
            flush((lock, write_path), &mut pmem, room, history)?;
        } else if rng.chance(1, 2) {
            next += 1;
            let fua = rng.chance(1, 8);
            for i in 0..n {
                let at = i as usize * SECTOR;
                fill(first + i, next, &mut buf[at..at + SECTOR]);
            }
            write(
                (lock, write_path),
                room,
                &mut pmem,
                history,
                (off, &buf, next),
                fua,
            )?;
        } else {
            let (from, to) = read(
                (lock, reader, write_path),
                &pmem,
                &mut backing,
                history,
                off,
                &mut buf,
            )?;
            for i in 0..n {
                let at = i as usize * SECTOR;
                let sec = first + i;
                let got = version_of(sec, &buf[at..at + SECTOR]);
                if !got.is_some_and(|v| history.current_between(sec, v, from, to)) {
                    return Err(format!(
                        "thread {t}: sector {sec} read {got:?}, not its last version at any \
                         point of the read (last now {})",
                        history.last(sec)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Crash images a run takes at most, and how often (per million device
/// operations): a run of the seeded tests does about 100,000 operations.
const CRASH_LIMIT: usize = 12;
const CRASH_PPM: u64 = 100;

/// Runs [`THREADS`] request threads of `ops` operations each (each in its own
/// region, or with `shared` all in one) and the background thread until they
/// are done, on real threads, interleaved by the OS or (with `sched`) by the
/// seeded scheduler, taking crash images along the way (see [`Devices`]); then
/// checks the engine's invariants, that it wrote back and collected, that a
/// full writeback leaves the backing device with every sector's last version,
/// and that each crash image replays to a cache that lost no flushed write
/// ([`check_crash`]).
fn run_threads(sched: Option<Arc<Sched>>, shared: bool, ops: u64) -> Result<Outcome, String> {
    let seed = sched.as_ref().map_or(0, |s| s.seed());
    let mut world = World::tracked(
        vec![0u8; (SEGMENTS_OFF + N_SEGS * SEG) as usize],
        BackingModel::new(BACKING, Default::default()),
        seed ^ 0xc7a5,
    );
    world.crash_ppm = CRASH_PPM;
    world.crash_limit = CRASH_LIMIT;
    let devices = Arc::new(Devices {
        world: Mutex::new(world),
        sched: sched.clone(),
        history: History::default(),
    });
    let pmem = TPmem(devices.clone());
    let backing = TBacking(devices.clone());
    let history = &devices.history;
    let mut mem = OwnedMem::new(N_SEGS as usize, 2048, BACKING, 2, 1);
    // Odd seeds keep a data CRC, whose keys writeback copies and checks; the
    // others' go to the backing device straight from the pmem.
    let opts = CacheOptions {
        data_crc: seed % 2 == 1,
        ..opts()
    };
    let cache = Cache::start(
        pmem.clone(),
        backing.clone(),
        Geometry::small(SEG).map_err(|e| e.to_string())?,
        mem.borrow(),
        &opts,
    )
    .map_err(|e| format!("start: {e}"))?;
    let reader = &cache.reader();
    let write_path = &cache.write_path();
    let lock = Shared(&cache, sched.clone());
    let writer = HostLock::new(Background::new(
        pmem.clone(),
        backing.clone(),
        vec![WbExtent::default(); pcache_engine::cache_core::writeback::WB_EXTENTS_MAX],
        vec![0u8; 16 << 10],
    ));
    let room = Room::new(sched.clone(), Some((&cache, &writer)));
    let running = AtomicU64::new(THREADS);
    let rounds = AtomicU64::new(0);
    std::thread::scope(|sc| {
        let bg = sc.spawn(|| {
            let _turn = sched.as_ref().map(|s| s.enter(THREADS as usize));
            while running.load(Ordering::Acquire) > 0 {
                // As the module's work item: not urgent, whatever waits.
                let round = writer.with(|w| w.run(lock.0, &room, false));
                if let Some(e) = round.writeback_error.or(round.gc_error) {
                    return Err(format!("background: {e}"));
                }
                rounds.fetch_add(1, Ordering::Relaxed);
                if !round.progress {
                    // As the module's tick, only much sooner.
                    match &sched {
                        Some(s) => s.idle(1),
                        None => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            }
            Ok(())
        });
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (p, b, lock, room, running) =
                    (pmem.clone(), backing.clone(), &lock, &room, &running);
                let sched = sched.clone();
                sc.spawn(move || {
                    let _turn = sched.as_ref().map(|s| s.enter(t as usize));
                    let r = request_thread(
                        t,
                        shared,
                        (lock, reader, room, history),
                        write_path,
                        (p, b),
                        ops,
                    );
                    running.fetch_sub(1, Ordering::AcqRel);
                    r
                })
            })
            .collect();
        let requests: Result<Vec<()>, String> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("request thread panicked".into()))
            })
            .collect();
        let bg = bg
            .join()
            .unwrap_or_else(|_| Err("background thread panicked".into()));
        requests.and(bg)
    })?;
    if let Some(e) = room.error() {
        return Err(e);
    }
    let inline_rounds = room.inline_rounds.load(Ordering::Relaxed);
    let (images, ops_done) = {
        let mut w = devices.world();
        w.crash_ppm = 0;
        (std::mem::take(&mut w.crashes), w.ops)
    };
    if let Some((s, v)) = history.state().twice {
        return Err(format!("sector {s}: version {v} committed twice"));
    }
    let marks = std::mem::take(&mut history.state().marks);
    if marks.len() != images.len() {
        return Err(format!(
            "{} crash images, {} marks",
            images.len(),
            marks.len()
        ));
    }
    let n_images = images.len();
    for (img, mark) in images.into_iter().zip(marks) {
        let at_op = img.at_op;
        check_crash(img, mark, history).map_err(|e| format!("crash at op {at_op}: {e}"))?;
    }
    drop(lock);
    let mut cache = cache;
    cache
        .check_invariants()
        .map_err(|e| format!("invariants: {e:?}"))?;
    let st = cache.status();
    if st.stats.ksets_gced == 0 || st.stats.bytes_written_back == 0 {
        return Err(format!("the cache never wrote back or collected: {st:?}"));
    }
    cache.flush().map_err(|e| format!("flush: {e}"))?;
    cache
        .writeback_all()
        .map_err(|e| format!("writeback: {e}"))?;
    let mut buf = vec![0u8; SECTOR];
    for sec in 0..BACKING / SECTOR as u64 {
        devices
            .world()
            .backing_read(sec * SECTOR as u64, &mut buf)
            .map_err(|_| "backing read")?;
        let (got, last) = (version_of(sec, &buf), history.last(sec));
        if got != Some(last) {
            return Err(format!(
                "backing sector {sec} after full writeback: {got:?}, last written {last}"
            ));
        }
    }
    Ok(Outcome {
        summary: format!(
            "{} background rounds, {inline_rounds} rounds run by waiting requests, \
             {ops_done} device operations, {n_images} crash images; {:?}",
            rounds.load(Ordering::Relaxed),
            cache.status().stats
        ),
        inline_rounds,
    })
}

/// What [`run_threads`] saw.
#[derive(Debug, PartialEq)]
struct Outcome {
    summary: String,
    /// Rounds run by requests waiting for room, in their own thread.
    inline_rounds: u64,
}

fn opts() -> CacheOptions {
    CacheOptions {
        data_crc: true,
        ..Default::default()
    }
}

/// Replays a crash image taken during a run and reads every sector the run
/// wrote: each must hold a version written there (or never written: zeros),
/// torn or foreign data being none, and none older than the last version
/// committed before the last FLUSH that completed before the crash. The
/// backing device's sectors, before replay, hold written versions only too.
fn check_crash(img: CrashImage, mark: Mark, history: &History) -> Result<(), String> {
    let st = history.state();
    let mut sectors: Vec<u64> = st.sectors.keys().copied().collect();
    sectors.sort_unstable();
    let written = |s: u64, v: u64| {
        let hist = st.sectors.get(&s).map(Vec::as_slice).unwrap_or_default();
        if v == 0 {
            return Some(None);
        }
        hist.iter().position(|&(x, _)| x == v).map(Some)
    };
    for &s in &sectors {
        let data = img.backing.get(&s).map_or([0u8; SECTOR], |d| **d);
        let v = version_of(s, &data);
        if v.and_then(|v| written(s, v)).is_none() {
            return Err(format!(
                "backing sector {s} holds {v:?}, never written there"
            ));
        }
    }
    let world = World::untracked(img.pmem, BackingModel::new(BACKING, img.backing));
    let mut mem = OwnedMem::new(N_SEGS as usize, 2048, BACKING, 2, 1);
    let cache = Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        Geometry::small(SEG).map_err(|e| e.to_string())?,
        mem.borrow(),
        &opts(),
    )
    .map_err(|e| format!("replay: {e}"))?;
    cache
        .check_invariants()
        .map_err(|e| format!("invariants after replay: {e:?}"))?;
    let mut buf = vec![0u8; SECTOR];
    for &s in &sectors {
        cache
            .read(s * SECTOR as u64, &mut buf, false, 0)
            .map_err(|e| format!("read of sector {s} after replay: {e}"))?;
        let hist = st.sectors.get(&s).map(Vec::as_slice).unwrap_or_default();
        let got = version_of(s, &buf);
        let Some(at) = got.and_then(|v| written(s, v)) else {
            return Err(format!("sector {s} reads {got:?}, never written there"));
        };
        // A commit records itself after the engine's stores, in the same hold
        // of the lock: a crash may come between, no later.
        if at.is_some_and(|at| hist[at].1 > mark.seq + 1) {
            let mut ks = String::new();
            cache.for_each_key(|k| {
                if k.off <= s * 512 && k.end() > s * 512 {
                    ks += &format!("{k:?}");
                }
            });
            return Err(format!(
                "sector {s} reads {got:?}, committed after the crash ({mark:?}, key {ks}, status {:?}, versions {hist:?})", cache.status()
            ));
        }
        // The last version that had to survive, if any: flushed, or written
        // with FUA.
        let fua = mark.fua.get(&s).copied().unwrap_or(0);
        let floor = hist
            .iter()
            .rposition(|&(_, seq)| seq <= mark.flushed || seq <= fua);
        if floor.is_some_and(|f| at.is_none_or(|at| at < f)) {
            return Err(format!(
                "sector {s} lost a flushed or FUA write: reads {got:?}, the last version \
                 committed before the last completed FLUSH is {:?} ({mark:?}, versions {hist:?})",
                floor.map(|f| hist[f])
            ));
        }
    }
    Ok(())
}

#[test]
fn request_and_background_threads_keep_every_write() {
    let ops = std::env::var("PCACHE_THREAD_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000u64);
    match run_threads(None, false, ops) {
        Ok(run) => eprintln!("{}", run.summary),
        Err(e) => panic!("{e}"),
    }
}

/// Runs the threads under the seeded scheduler, which switches at every
/// call into the engine, every lock and every device access: many
/// interleavings, each one replayable from its seed (`PCACHE_SEED=<seed>`;
/// `PCACHE_SCHED_SEEDS=<n>` runs more). The first seed is run twice and must
/// replay: the same switches, rounds and counters.
fn seeded(shared: bool) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("PCACHE_SEED") {
        Some(seed) => vec![seed],
        None => (1..=env("PCACHE_SCHED_SEEDS").unwrap_or(10)).collect(),
    };
    let ops = env("PCACHE_SCHED_OPS").unwrap_or(1_500);
    let (mut switches, mut inline_rounds) = (0u64, 0u64);
    let mut first = None;
    for &seed in &seeds {
        let sched = Arc::new(Sched::new(THREADS as usize + 1, seed));
        match run_threads(Some(sched.clone()), shared, ops) {
            Ok(run) => {
                inline_rounds += run.inline_rounds;
                first = first.or(Some((seed, run, sched.switches())));
            }
            Err(e) => panic!("seed {seed} FAILED (rerun: PCACHE_SEED={seed}): {e}"),
        }
        switches += sched.switches();
    }
    if let Some((seed, run, n)) = first {
        let sched = Arc::new(Sched::new(THREADS as usize + 1, seed));
        let again = run_threads(Some(sched.clone()), shared, ops).map(|s| (s, sched.switches()));
        assert_eq!(again, Ok((run, n)), "seed {seed} did not replay");
    }
    eprintln!(
        "{} seeds, {switches} switches, {inline_rounds} rounds run by waiting requests",
        seeds.len()
    );
    // The seeds run what the module runs: a request that waits for room
    // runs a round itself, beside the other requests and the background
    // thread's rounds.
    if env("PCACHE_SEED").is_none() {
        assert!(
            inline_rounds > 0,
            "no request ran a round of its own in {} seeds",
            seeds.len()
        );
    }
}

/// Each thread in its own region: every read returns the last data written.
#[test]
fn seeded_schedules_of_request_and_background_threads_keep_every_write() {
    seeded(false);
}

/// All threads in one 128 KiB range: writes overlap writes of other threads,
/// reads miss while other threads write the same sectors, and fills race
/// writes; every read returns, per sector, a version that was the last one at
/// some point of the read, and the backing device ends with the last ones.
#[test]
fn seeded_schedules_of_threads_sharing_a_range_read_only_current_data() {
    seeded(true);
}

/// Blank devices for `threads` threads under the seeded scheduler.
fn scheduled_threads(threads: usize, seed: u64) -> (Arc<Sched>, Arc<Devices>, TPmem, TBacking) {
    let sched = Arc::new(Sched::new(threads, seed));
    let world = World::tracked(
        vec![0u8; (SEGMENTS_OFF + N_SEGS * SEG) as usize],
        BackingModel::new(BACKING, Default::default()),
        seed,
    );
    let devices = Arc::new(Devices {
        world: Mutex::new(world),
        sched: Some(sched.clone()),
        history: History::default(),
    });
    let (pmem, backing) = (TPmem(devices.clone()), TBacking(devices.clone()));
    (sched, devices, pmem, backing)
}

/// Two threads commit overlapping writes to one range at once, outside the
/// engine, as the module does (`WritePath`), under the seeded scheduler
/// (which may switch before each lock a thread takes and inside it): the index
/// takes one key over the other in some order, and the key log must hold them
/// in that order, since replay applies it in order. After the commits, the
/// cache replayed from the pmem must read what the live one reads.
#[test]
fn commits_on_two_threads_log_overlapping_keys_in_index_order() {
    // Thread 0 writes 0..8 KiB, thread 1 4..12 KiB: they overlap in 4..8 KiB.
    const SPAN: usize = 8 << 10;
    const RANGE: usize = 12 << 10;
    for seed in 0..300u64 {
        let (sched, devices, pmem, backing) = scheduled_threads(2, seed);
        let mut mem = OwnedMem::new(N_SEGS as usize, 2048, BACKING, 2, 1);
        let geo = Geometry::small(SEG).expect("geometry");
        let cache =
            Cache::start(pmem.clone(), backing.clone(), geo, mem.borrow(), &opts()).expect("start");
        let write_path = &cache.write_path();
        let lock = &Shared(&cache, Some(sched.clone()));
        std::thread::scope(|sc| {
            for t in 0..2u64 {
                let (pmem, sched) = (pmem.clone(), sched.clone());
                sc.spawn(move || {
                    let _turn = sched.enter(t as usize);
                    let off = t * 4096;
                    let mut data = vec![0u8; SPAN];
                    for i in 0..4u64 {
                        let v = (t << 16) | (i + 1);
                        for (s, d) in data.chunks_mut(SECTOR).enumerate() {
                            fill(off / SECTOR as u64 + s as u64, v, d);
                        }
                        let mut at = 0usize;
                        while at < SPAN {
                            let (from, rest) = (off + at as u64, SPAN - at);
                            let r = match write_path.reserve(&pmem, from, rest, 0, 0) {
                                Some(r) => r,
                                None => lock
                                    .with(|c| c.write_reserve(from, rest, 0, 0))
                                    .expect("reserve"),
                            };
                            let crc = copy_in(&pmem, &r, &data[..], at).expect("copy");
                            pmem.fence();
                            if write_path.commit(&pmem, &r, crc, false).is_none() {
                                lock.with(|c| c.write_commit(&r, crc, false))
                                    .expect("commit");
                            }
                            at += r.len as usize;
                        }
                    }
                });
            }
        });
        let c = lock.0;
        c.flush().expect("flush");
        let mut live = vec![0u8; RANGE];
        c.read(0, &mut live, false, 0).expect("live read");
        let mut image = vec![0u8; (SEGMENTS_OFF + N_SEGS * SEG) as usize];
        devices.world().pmem_read(0, &mut image).expect("image");
        let replayed_world =
            World::untracked(image, BackingModel::new(BACKING, Default::default()));
        let mut mem2 = OwnedMem::new(N_SEGS as usize, 2048, BACKING, 2, 1);
        let replayed = Cache::start(
            SimPmem(replayed_world.clone()),
            SimBacking(replayed_world),
            geo,
            mem2.borrow(),
            &opts(),
        )
        .expect("replay");
        let mut again = vec![0u8; RANGE];
        replayed
            .read(0, &mut again, false, 0)
            .expect("replayed read");
        for s in 0..RANGE / SECTOR {
            let at = s * SECTOR;
            assert_eq!(
                version_of(s as u64, &again[at..at + SECTOR]),
                version_of(s as u64, &live[at..at + SECTOR]),
                "seed {seed}: sector {s} replays to another write than the live cache holds"
            );
        }
    }
}

/// Two threads reserve room and commit outside the engine, under the
/// seeded scheduler, through one data head and through two: no two
/// reservations share a byte of the cache, and each lies in a segment in use.
#[test]
fn reservations_on_two_threads_never_share_room() {
    for seed in 0..100u64 {
        let (sched, _devices, pmem, backing) = scheduled_threads(2, seed);
        let heads = 1 + (seed % 2) as usize;
        let mut mem = OwnedMem::new(N_SEGS as usize, 2048, BACKING, 2, heads);
        let geo = Geometry::small(SEG).expect("geometry");
        let cache =
            Cache::start(pmem.clone(), backing.clone(), geo, mem.borrow(), &opts()).expect("start");
        let write_path = &cache.write_path();
        let lock = &Shared(&cache, Some(sched.clone()));
        let rooms = Mutex::new(Vec::new());
        std::thread::scope(|sc| {
            for t in 0..2u64 {
                let (pmem, sched, rooms) = (pmem.clone(), sched.clone(), &rooms);
                sc.spawn(move || {
                    let _turn = sched.enter(t as usize);
                    let data = vec![t as u8; 12 << 10];
                    for i in 0..8u64 {
                        // Each thread in its own subtree, 12 KiB a write.
                        let off = (t << 22) + i * (12 << 10);
                        let r = match write_path.reserve(&pmem, off, data.len(), 0, t as usize) {
                            Some(r) => r,
                            None => lock
                                .with(|c| c.write_reserve(off, data.len(), 0, t as usize))
                                .expect("reserve"),
                        };
                        rooms
                            .lock()
                            .expect("rooms")
                            .push((r.addr, u64::from(r.len)));
                        let crc = copy_in(&pmem, &r, &data[..], 0).expect("copy");
                        pmem.fence();
                        if write_path.commit(&pmem, &r, crc, false).is_none() {
                            lock.with(|c| c.write_commit(&r, crc, false))
                                .expect("commit");
                        }
                    }
                });
            }
        });
        let mut rooms = rooms.into_inner().expect("rooms");
        rooms.sort_unstable();
        for w in rooms.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "seed {seed}: rooms {:?} and {:?} overlap",
                w[0],
                w[1]
            );
        }
        let c = lock.0;
        let seg_bytes = geo.seg_data_size() as u64;
        for &(addr, _) in &rooms {
            let used = (0..N_SEGS as u32).any(|id| {
                let start = geo.seg_data_off(c.seg_phys(id));
                c.seg_used(id) && addr >= start && addr < start + seg_bytes
            });
            assert!(used, "seed {seed}: room at {addr} is in no segment in use");
        }
    }
}

/// Two threads write with FUA into two subtrees, whose keys go to two open
/// ksets, under a deep schedule (switches inside locks, as on two CPUs): the
/// ksets close at once, each persisted at the key head in turn. A crash at any
/// device operation must keep every FUA write that completed before it: a
/// kset persisted after one placed behind it would leave a hole in the log
/// where replay stops.
#[test]
fn fua_writes_to_two_ksets_survive_a_crash_at_any_point() {
    for seed in 0..40u64 {
        let (sched, devices, pmem, backing) = scheduled_threads(2, seed);
        let mut mem = OwnedMem::new(N_SEGS as usize, 2048, BACKING, 2, 1);
        let geo = Geometry::small(SEG).expect("geometry");
        let cache =
            Cache::start(pmem.clone(), backing.clone(), geo, mem.borrow(), &opts()).expect("start");
        devices.world().crash_ppm = 1_000_000;
        let write_path = &cache.write_path();
        let lock = &Shared(&cache, Some(sched.clone()));
        let room = &Room::new(Some(sched.clone()), None);
        let history = &devices.history;
        std::thread::scope(|sc| {
            for t in 0..2u64 {
                let (mut pmem, sched) = (pmem.clone(), sched.clone());
                sc.spawn(move || {
                    let _turn = sched.enter(t as usize);
                    let mut buf = vec![0u8; 4096];
                    for i in 0..6u64 {
                        let (off, v) = ((t << 22) + i * 4096, (t << 16) | (i + 1));
                        for (s, d) in buf.chunks_mut(SECTOR).enumerate() {
                            fill(off / SECTOR as u64 + s as u64, v, d);
                        }
                        write(
                            (lock, write_path),
                            room,
                            &mut pmem,
                            history,
                            (off, &buf, v),
                            true,
                        )
                        .expect("write");
                    }
                });
            }
        });
        let images = std::mem::take(&mut devices.world().crashes);
        let marks = std::mem::take(&mut history.state().marks);
        assert_eq!(
            images.len(),
            marks.len(),
            "seed {seed}: a mark per crash image"
        );
        assert!(
            images.len() > 20,
            "seed {seed}: {} crash images",
            images.len()
        );
        for (img, mark) in images.into_iter().zip(marks) {
            let at_op = img.at_op;
            if let Err(e) = check_crash(img, mark, history) {
                panic!("seed {seed}: crash at op {at_op}: {e}");
            }
        }
    }
}

/// A write through as the module serves it in writethrough and writearound
/// mode: recorded in flight (the range dropped), written to the backing
/// device outside the engine, then its data cached (writethrough) and its
/// record given up. `Busy` (the table full) is skipped: the module waits.
fn write_through_once(
    lock: &Shared<'_, '_>,
    (pmem, backing): (&TPmem, &TBacking),
    off: u64,
    data: &[u8],
) -> Result<(), String> {
    let gap = match lock.with(|c| c.through_start(off, data.len())) {
        Ok(gap) => gap,
        Err(CacheError::Busy(_)) => return Ok(()),
        Err(e) => return Err(format!("through_start: {e}")),
    };
    if backing.write(off, data).is_err() {
        lock.with(|c| c.through_failed(&gap));
        return Err("backing write".into());
    }
    fill_gap(lock, pmem, &gap, data);
    Ok(())
}

/// Caches what the backing device returned or took for `gap` (`data` holds
/// the gap's bytes at `gap.at`), as the module's completion does: room
/// reserved in the engine, the copy outside it, the commit in it.
fn fill_gap(lock: &Shared<'_, '_>, pmem: &TPmem, gap: &Gap, data: &[u8]) {
    let mut fill = lock.with(|c| c.fill_start(gap, 0));
    if fill.is_open() {
        fill_copy(pmem, &mut fill, data);
        lock.with(|c| c.fill_end(fill));
    }
}

/// A read as the module serves it in the modes that write through: in the
/// engine (`read_resume`), which pins the hits and places the gaps, the hits
/// copied outside it, each gap read from the backing device and filled.
fn read_through_once(
    lock: &Shared<'_, '_>,
    (pmem, backing): (&TPmem, &TBacking),
    off: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let mut gaps = [Gap::default(); 8];
    let mut hits = [Hit::default(); 8];
    let mut from = off;
    let end = off + buf.len() as u64;
    let mut placed = 0usize;
    while from < end {
        let started = lock
            .with(|c| c.read_resume(off, from, &mut *buf, &mut gaps[placed..], &mut hits))
            .map_err(|e| format!("read_resume: {e}"))?;
        let Some(s) = started else {
            // More gaps than room: give up the ones placed, as the module does.
            lock.with(|c| c.read_cancel(&gaps[..placed], &[]));
            return Ok(());
        };
        placed += s.gaps;
        let held = &hits[..s.hits];
        let copied = copy_hits(pmem, held, &mut *buf);
        release_hits(pmem, held);
        copied.map_err(|_| "pmem read")?;
        from = s.next;
    }
    for g in &gaps[..placed] {
        let mut d = vec![0u8; g.len];
        if backing.read(g.off, &mut d).is_err() {
            lock.with(|c| c.read_failed(g));
            return Err("backing read".into());
        }
        fill_gap(lock, pmem, &Gap { at: 0, ..*g }, &d);
    }
    Ok(())
}

/// Two threads write through and read one 64 KiB range, in writethrough and
/// in writearound mode, while a third runs GC and the clean pass, all sharing
/// the engine as the module does, under the seeded scheduler (switches at
/// every call into the engine, every lock inside it and every device access).
/// The writes through in flight have a lock of their own: a write records
/// itself before it drops the cached range, a read places its gaps under
/// that lock, and a completion commits its data and gives up its record in
/// one hold of it. Any interleaving must leave the cache coherent: once every
/// request is done, each sector reads through the cache as the backing device
/// holds it (a fill of old data after a newer write would not).
#[test]
fn seeded_writes_through_and_reads_leave_the_cache_coherent() {
    use pcache_engine::meta::cache_info::{CACHE_MODE_WRITEAROUND, CACHE_MODE_WRITETHROUGH};
    const RANGE: u64 = 64 << 10;
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("PCACHE_SEED") {
        Some(seed) => vec![seed],
        None => (1..=env("PCACHE_SCHED_SEEDS").unwrap_or(300)).collect(),
    };
    let mut switches = 0u64;
    for seed in seeds {
        let (sched, devices, pmem, backing) = scheduled_threads(3, seed);
        let mut mem = OwnedMem::new(N_SEGS as usize, 2048, BACKING, 2, 1);
        let mode = if seed % 2 == 0 {
            CACHE_MODE_WRITETHROUGH
        } else {
            CACHE_MODE_WRITEAROUND
        };
        let opts = CacheOptions {
            cache_mode: mode,
            data_crc: seed % 3 == 0,
        };
        let geo = Geometry::small(SEG).expect("geometry");
        let cache =
            Cache::start(pmem.clone(), backing.clone(), geo, mem.borrow(), &opts).expect("start");
        let lock = &Shared(&cache, Some(sched.clone()));
        let running = &AtomicU64::new(2);
        let failed = std::thread::scope(|sc| {
            let bg = {
                let sched = sched.clone();
                sc.spawn(move || {
                    let _turn = sched.enter(2);
                    while running.load(Ordering::Acquire) > 0 {
                        if let Err(e) = lock.with(|c| c.gc_step()) {
                            return Err(format!("gc: {e}"));
                        }
                        lock.with(|c| c.clean_step());
                        sched.idle(1);
                    }
                    Ok(())
                })
            };
            let threads: Vec<_> = (0..2u64)
                .map(|t| {
                    let (pmem, backing, sched) = (pmem.clone(), backing.clone(), sched.clone());
                    sc.spawn(move || {
                        let _turn = sched.enter(t as usize);
                        let mut rng = Rng(seed ^ ((t + 1) * 0x9e37_79b9));
                        let mut r = Ok(());
                        for i in 0..60u64 {
                            let s = rng.below(RANGE / SECTOR as u64);
                            let n = (1 + rng.below(24)).min(RANGE / SECTOR as u64 - s);
                            let off = s * SECTOR as u64;
                            let mut buf = vec![0u8; n as usize * SECTOR];
                            r = if rng.chance(1, 2) {
                                let v = (t << 32) | (i + 1);
                                for (k, d) in buf.chunks_mut(SECTOR).enumerate() {
                                    fill(s + k as u64, v, d);
                                }
                                write_through_once(lock, (&pmem, &backing), off, &buf)
                            } else {
                                read_through_once(lock, (&pmem, &backing), off, &mut buf)
                            };
                            if r.is_err() {
                                break;
                            }
                        }
                        running.fetch_sub(1, Ordering::AcqRel);
                        r
                    })
                })
                .collect();
            let mut out = Vec::new();
            for h in threads {
                out.push(h.join().unwrap_or_else(|_| Err("thread panicked".into())));
            }
            out.push(
                bg.join()
                    .unwrap_or_else(|_| Err("gc thread panicked".into())),
            );
            out.into_iter().find_map(Result::err)
        });
        if let Some(e) = failed {
            panic!("seed {seed} (rerun: PCACHE_SEED={seed}): {e}");
        }
        switches += sched.switches();
        assert_eq!(
            cache.in_flight_len(),
            0,
            "seed {seed}: writes left in flight"
        );
        cache
            .check_invariants()
            .unwrap_or_else(|b| panic!("seed {seed}: invariant broken: {}", b.0));
        let (mut via_cache, mut on_disk) = (vec![0u8; SECTOR], vec![0u8; SECTOR]);
        for s in 0..RANGE / SECTOR as u64 {
            let off = s * SECTOR as u64;
            cache
                .read(off, &mut via_cache, false, 0)
                .unwrap_or_else(|e| panic!("seed {seed}: read: {e}"));
            devices
                .world()
                .backing_read(off, &mut on_disk)
                .expect("backing read");
            assert!(
                via_cache == on_disk,
                "seed {seed}: sector {s} reads {:?} through the cache, the backing device holds {:?}",
                version_of(s, &via_cache),
                version_of(s, &on_disk)
            );
        }
    }
    eprintln!("{switches} switches");
}
