//! The crash simulator: seeded random workloads against the engine, with power cut
//! between device operations, replay, and the issue's four properties checked
//! against a model of the device (sector -> data). Run with `cargo test --release`.
//!
//! - `PCACHE_SOAK=<seconds>`: keep running new seeds for that long.
//! - `PCACHE_SEED=<n>`: replay one seed (printed by every failure).
//! - `PCACHE_THREADS=<n>`: worker threads (default 2).

use pcache_engine::cache_core::fill::{fill_copy, Fill};
use pcache_engine::cache_core::io::{copy_hits, copy_in, Gap, Hit, Reservation};
use pcache_engine::cache_core::request::{until_room, with_room, Stalled};
use pcache_engine::cache_core::write_path::Placed;
use pcache_engine::cache_core::{Backing, Committed, Locked, Pmem, Progress, Reader, WritePath};
use pcache_engine::cache_core::{Cache, CacheError, CacheOptions, Pos, SegId};
use pcache_engine::host_mem::Borrowed;
use pcache_engine::meta::cache_info::{CacheInfo, CACHE_FLAGS_DATA_CRC, CACHE_INFO_STRUCT_SIZE};
use pcache_engine::meta::crc32c::{crc32c, PCACHE_CRC_SEED};
use pcache_engine::meta::header::pick_latest;
use pcache_engine::meta::kset::{kset_key, kset_read, KsetRead, KEY_FLAGS_DATA_CRC};
use pcache_engine::meta::layout::{Geometry, SEGMENTS_OFF, SEG_DATA_OFF};
use pcache_engine::sim::{
    BackingModel, CrashImage, OwnedMem, Rng, Sector, SimBacking, SimHost, SimLock, SimPmem, World,
    SECTOR,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEG_SIZE: u64 = 64 * 1024;
const N_SEGS: u64 = 16;
const BACKING: u64 = 12 << 20;
const NODES: usize = 4096;

fn geo() -> Geometry {
    Geometry::small(SEG_SIZE).expect("geometry")
}

fn pmem_size() -> usize {
    (SEGMENTS_OFF + N_SEGS * SEG_SIZE) as usize
}

/// Sector contents that name the write and the sector they belong to: word 0 is
/// the write id, word 1 the sector, every other word a mix of both and its index.
fn fill(id: u64, sector: u64, out: &mut [u8]) {
    if id == 0 {
        out.fill(0);
        return;
    }
    let base = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sector.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    for (i, c) in out.chunks_mut(8).enumerate() {
        let w = match i {
            0 => id,
            1 => sector,
            _ => base ^ (i as u64).wrapping_mul(0x1656_67B1_9E37_79F9),
        };
        c.copy_from_slice(&w.to_le_bytes()[..c.len()]);
    }
}

/// Which write a sector's bytes came from; `None` for bytes no write produced
/// (torn, stale or foreign data).
fn identify(sector: u64, data: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(data[..8].try_into().ok()?);
    let mut want = [0u8; SECTOR];
    fill(id, sector, &mut want);
    if want[..] == data[..SECTOR] {
        Some(id)
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug)]
struct WriteRec {
    issue_op: u64,
    ack_op: Option<u64>,
    fua: bool,
}

#[derive(Clone, Copy, Debug)]
struct FlushRec {
    issue_op: u64,
    complete_op: Option<u64>,
}

/// What the application did in one life of the cache (between two attaches).
#[derive(Default)]
struct Model {
    writes: HashMap<u64, WriteRec>,
    flushes: Vec<FlushRec>,
    /// Per sector, the writes to it in issue order; entry 0 is the base version.
    hist: HashMap<u64, Vec<u64>>,
}

impl Model {
    fn base(values: &HashMap<u64, u64>) -> Model {
        let mut m = Model::default();
        for (&s, &id) in values {
            m.hist.insert(s, vec![id]);
            m.writes.insert(
                id,
                WriteRec {
                    issue_op: 0,
                    ack_op: Some(0),
                    fua: true,
                },
            );
        }
        m
    }

    fn versions(&self, s: u64) -> &[u64] {
        self.hist.get(&s).map(|v| v.as_slice()).unwrap_or(&[0])
    }

    /// Index of the newest version of `s` that must be visible at `at_op` after a
    /// crash (durable): acked before a completed flush was issued, or FUA-acked.
    fn last_flush_issue(&self, at_op: u64) -> Option<u64> {
        self.flushes
            .iter()
            .rev()
            .find(|f| f.complete_op.is_some_and(|c| c < at_op))
            .map(|f| f.issue_op)
    }

    fn durable_floor(&self, s: u64, at_op: u64, flush_issue: Option<u64>) -> usize {
        let v = self.versions(s);
        let mut floor = 0;
        for (j, id) in v.iter().enumerate() {
            let Some(w) = self.writes.get(id) else {
                continue;
            };
            let Some(ack) = w.ack_op else { continue };
            if w.issue_op == 0 && ack == 0 {
                floor = j;
                continue;
            }
            if ack >= at_op {
                continue;
            }
            if w.fua || flush_issue.is_some_and(|fi| ack <= fi) {
                floor = j;
            }
        }
        floor
    }

    /// Index of the newest acked version (what a read must at least return now).
    fn acked_floor(&self, s: u64) -> usize {
        let v = self.versions(s);
        let mut floor = 0;
        for (j, id) in v.iter().enumerate() {
            if self.writes.get(id).is_some_and(|w| w.ack_op.is_some()) {
                floor = j;
            }
        }
        floor
    }

    /// Ordinal (1-based) of the latest flush completed at or before `op`.
    fn issue_epoch(&self, op: u64) -> usize {
        self.flushes
            .iter()
            .rposition(|f| f.complete_op.is_some_and(|c| c <= op))
            .map(|p| p + 1)
            .unwrap_or(0)
    }

    /// Ordinal of the first flush issued after the write was acked.
    fn durable_epoch(&self, id: u64) -> usize {
        let Some(w) = self.writes.get(&id) else {
            return 0;
        };
        if w.issue_op == 0 && w.ack_op == Some(0) {
            return 0;
        }
        match w.ack_op {
            None => usize::MAX,
            Some(a) => {
                let p = self.flushes.partition_point(|f| f.issue_op < a);
                if p < self.flushes.len() {
                    p + 1
                } else {
                    usize::MAX
                }
            }
        }
    }
}

struct Cfg {
    opts: CacheOptions,
    n_ksets: usize,
    n_heads: usize,
}

fn mem(cfg: &Cfg) -> OwnedMem {
    OwnedMem::new(N_SEGS as usize, NODES, BACKING, cfg.n_ksets, cfg.n_heads)
}

type Sim<'a> = Cache<SimPmem, SimBacking, pcache_engine::host_mem::Borrowed<'a>>;

/// An engine result as `with_room` wants it: `None` while the cache is full.
fn busy_is_none(r: Result<(), CacheError>) -> Option<Result<(), CacheError>> {
    match r {
        Err(CacheError::Busy(_)) => None,
        r => Some(r),
    }
}

fn read_sectors(
    cache: &mut Sim<'_>,
    s0: u64,
    n: u64,
    cache_misses: bool,
) -> Result<Vec<u8>, CacheError> {
    let mut buf = vec![0u8; (n as usize) * SECTOR];
    cache.read(s0 * SECTOR as u64, &mut buf, cache_misses, 0)?;
    Ok(buf)
}

/// A read miss in flight, as the module runs it: the read's hits were copied
/// and each gap got a placeholder; the gap's backing data is read, and the
/// cache is filled from it any number of operations later.
struct PendingFill {
    gap: Gap,
    data: Vec<u8>,
}

/// A read through the module's split path: the hits found and pinned
/// outside the engine ([`Reader::hits`]), and from the first piece that
/// is not one on, by the engine ([`Cache::read_resume`]); each gap read from
/// the backing device now and left to fill later; the hits pinned `hits_room`
/// at a time, as the module does. The hits of every round but the last are
/// copied and given back before the next round; the last round's are copied
/// now or any number of operations later (`Pinned`). With no room the engine
/// copies every hit itself.
fn split_read(
    cache: &mut Sim<'_>,
    (reader, write_path): (&Reader<Borrowed<'_>>, Option<&WritePath<Borrowed<'_>>>),
    s0: u64,
    n: u64,
    pending: &mut Vec<PendingFill>,
    hits_room: usize,
) -> Result<SplitRead, CacheError> {
    let mut buf = vec![0u8; (n as usize) * SECTOR];
    let off = s0 * SECTOR as u64;
    let end = off + buf.len() as u64;
    let mut gaps = [Gap::default(); 8];
    let mut hits = [Hit::default(); 8];
    let room = hits_room.min(hits.len());
    let (mut from, mut placed) = (off, 0usize);
    let held = loop {
        let found = reader.hits(cache.pmem(), off, buf.len(), from, &mut hits[..room]);
        // In the modes that cache writes, as the module: the gap placed
        // without the engine (`WritePath::place_gap`) when it can be.
        let here = match write_path {
            Some(wp) if found.hits == 0 => wp.place_gap(off, buf.len(), from, true),
            _ => Placed::Engine,
        };
        let (n, next) = if found.hits > 0 {
            (found.hits, found.next)
        } else if let (Placed::Gap { gap, next }, Some(slot)) = (here, gaps.get_mut(placed)) {
            *slot = gap;
            placed += 1;
            (0, next)
        } else {
            if let Placed::Gap { gap, .. } = here {
                // No room for it: the engine reads the rest as below.
                cache.read_abandon(&gap);
            }
            let started = cache.read_resume(
                off,
                from,
                &mut buf[..],
                &mut gaps[placed..],
                &mut hits[..room],
            )?;
            let Some(started) = started else {
                cache.read_cancel(&gaps[..placed], &[]);
                cache.read(off, &mut buf, true, 0)?;
                return Ok(SplitRead::Done(buf));
            };
            placed += started.gaps;
            (started.hits, started.next)
        };
        let held = &hits[..n];
        if next >= end {
            break held.to_vec();
        }
        let copied = copy_hits(cache.pmem(), held, &mut buf[..]);
        if copied.is_ok() && held.iter().any(Hit::checks) {
            reader.verified(held);
        }
        cache.read_done(held);
        if copied.is_err() {
            cache.read_cancel(&gaps[..placed], &[]);
            return Err(CacheError::Io("pmem media error"));
        }
        from = next;
    };
    let (gaps, held) = (&gaps[..placed], &held[..]);
    for g in gaps {
        let part = &mut buf[g.at..g.at + g.len];
        if cache.backing_mut().read(g.off, part).is_err() {
            // The module fails the read and gives up every placeholder and pin of it.
            cache.read_failed(g);
            cache.read_cancel(gaps, held);
            return Err(CacheError::Io("backing device read failed"));
        }
    }
    for g in gaps {
        pending.push(PendingFill {
            gap: *g,
            data: buf.clone(),
        });
    }
    Ok(if held.is_empty() {
        SplitRead::Done(buf)
    } else {
        SplitRead::Pinned(buf, held.to_vec())
    })
}

enum SplitRead {
    /// All of the read's data is in the buffer.
    Done(Vec<u8>),
    /// The hits are pinned and not copied yet.
    Pinned(Vec<u8>, Vec<Hit>),
}

/// A read whose hits are pinned and not yet copied: in the module the
/// submitting CPU copies them outside the engine while the other CPUs go
/// on. The pins must keep GC from handing the data's segment to new writes.
struct PendingRead {
    s: u64,
    buf: Vec<u8>,
    hits: Vec<Hit>,
    /// Per sector, the oldest version the read may return: the newest one
    /// acknowledged when it was issued.
    floors: Vec<usize>,
    /// Each hit's segment and its generation when it was pinned.
    pins: Vec<(u32, u64)>,
}

/// A pinned segment is not handed out again while a read is still to copy
/// from it: GC may invalidate and free it (its data stays), but no data head
/// or key log may take it, which would show as the segment in use in a newer
/// generation.
fn check_pins(cache: &Sim<'_>, pending: &[PendingRead]) -> Result<(), String> {
    for &(seg, gen) in pending.iter().flat_map(|r| &r.pins) {
        if cache.seg_used(seg) && cache.seg_gen(seg) != gen {
            return Err(format!(
                "segment {seg} was handed out again while a read was still to copy from it"
            ));
        }
    }
    Ok(())
}

/// Copies a pending read's hits, gives back their pins, and checks what it
/// read against the model as it was when the read was issued.
fn finish_read(
    (engine, reader): (&SimLock<Sim<'_>>, &Reader<Borrowed<'_>>),
    model: &Model,
    mut r: PendingRead,
) -> Result<(), String> {
    let copied = engine.with(|c| {
        let copied = copy_hits(c.pmem(), &r.hits, &mut r.buf[..]);
        if copied.is_ok() && r.hits.iter().any(Hit::checks) {
            reader.verified(&r.hits);
        }
        c.read_done(&r.hits);
        copied
    });
    copied.map_err(|_| "pinned read: pmem read failed")?;
    check_live_read(model, r.s, &r.buf, |i| r.floors[i])
}

/// Copies every pending read's hits (see [`finish_read`]): in the module the
/// copier never waits, so nothing waits for room while a pin is out.
fn settle_reads(
    engine: (&SimLock<Sim<'_>>, &Reader<Borrowed<'_>>),
    model: &Model,
    pending: &mut Vec<PendingRead>,
) -> Result<(), String> {
    for r in pending.drain(..) {
        finish_read(engine, model, r)?;
    }
    Ok(())
}

/// Checks that a live read of sectors `s..` returned, for each sector `i`, a
/// version written there and no older than `floor(i)`.
fn check_live_read(
    model: &Model,
    s: u64,
    buf: &[u8],
    floor: impl Fn(usize) -> usize,
) -> Result<(), String> {
    for (i, d) in buf.chunks(SECTOR).enumerate() {
        let sec = s + i as u64;
        let id = identify(sec, d).ok_or_else(|| format!("live read of sector {sec}: garbage"))?;
        let v = model.versions(sec);
        let j = v
            .iter()
            .rposition(|&x| x == id)
            .ok_or_else(|| format!("live read of sector {sec}: write {id} never written there"))?;
        if j < floor(i) {
            return Err(format!(
                "live read of sector {sec} returned a superseded version"
            ));
        }
    }
    Ok(())
}

/// Room for a chunk as the module reserves it: outside the engine, or
/// under it when that needs the engine.
fn reserve(
    (engine, write_path): (&SimLock<Sim<'_>>, &WritePath<Borrowed<'_>>),
    pmem: &mut SimPmem,
    (off, len): (u64, usize),
    cpu: usize,
) -> Result<Reservation, CacheError> {
    match write_path.reserve(pmem, off, len, 0, cpu) {
        Some(r) => Ok(r),
        None => engine.with(|c| c.write_reserve(off, len, 0, cpu)),
    }
}

/// A chunk copied into `r` committed as the module commits it: outside the
/// engine, or in it when that needs the engine.
fn commit(
    (engine, write_path): (&SimLock<Sim<'_>>, &WritePath<Borrowed<'_>>),
    pmem: &mut SimPmem,
    r: &Reservation,
    crc: u32,
    fua: bool,
) -> Result<Committed, CacheError> {
    match write_path.commit(pmem, r, crc, fua) {
        Some(c) => Ok(c),
        None => engine.with(|c| c.write_commit(r, crc, fua)),
    }
}

/// A write as the module serves it in `map`: the room for its first chunk is
/// reserved, and the copy into it and the commit come any number of
/// operations later, all outside the engine unless that needs the engine.
struct PendingWrite {
    id: u64,
    s: u64,
    data: Vec<u8>,
    fua: bool,
    cpu: usize,
    /// How far it got: bytes committed, a kset to persist.
    progress: Progress,
    /// The room reserved for the next chunk, if any.
    held: Option<Reservation>,
}

/// Copies and commits a pending write's reserved chunk, if it has one: in the
/// module the copier runs on its own CPU and never waits for room, so before
/// the simulation lets anything wait for room, every reservation is settled.
/// A commit that finds the cache full gives the room back.
fn settle_write(
    engine: (&SimLock<Sim<'_>>, &WritePath<Borrowed<'_>>),
    pmem: &mut SimPmem,
    w: &mut PendingWrite,
) -> Result<(), String> {
    let Some(r) = w.held.take() else {
        return Ok(());
    };
    let crc = copy_in(pmem, &r, &w.data[..], w.progress.done).map_err(|_| "copy_in failed")?;
    // The copier's own fence: the commit may run on another CPU.
    pmem.fence();
    match commit(engine, pmem, &r, crc, w.fua) {
        Ok(c) => w.progress.committed(&r, c),
        Err(CacheError::Busy(_)) => {}
        Err(e) => return Err(format!("commit: {e}")),
    }
    Ok(())
}

/// Ends the fills copied and not yet committed, before anything waits for
/// room: their reservations hold segments GC cannot take (in the module they
/// end on their own).
fn settle_fills(engine: &SimLock<Sim<'_>>, filling: &mut Vec<Fill>) {
    for f in filling.drain(..) {
        engine.with(|c| c.fill_end(f));
    }
}

/// Settles every pending write's reservation (see [`settle_write`]).
fn settle_writes(
    engine: (&SimLock<Sim<'_>>, &WritePath<Borrowed<'_>>),
    pmem: &mut SimPmem,
    pending: &mut [PendingWrite],
) -> Result<(), String> {
    for w in pending.iter_mut() {
        settle_write(engine, pmem, w)?;
    }
    Ok(())
}

/// Finishes a pending write as `map` does, chunk by chunk; once a chunk finds
/// the cache full, the rest is written as the module's worker writes it
/// (`until_room`: chunk by chunk, waiting for room, from where it stopped). The
/// other pending writes must hold no reservation (see [`settle_write`]).
/// Returns the write's id once acked.
fn finish_write(
    (engine, write_path): (&SimLock<Sim<'_>>, &WritePath<Borrowed<'_>>),
    host: &SimHost<'_, pcache_engine::host_mem::Borrowed<'_>>,
    pmem: &mut SimPmem,
    mut w: PendingWrite,
) -> Result<u64, String> {
    let off = w.s * SECTOR as u64;
    loop {
        let (had, before) = (w.held.is_some(), w.progress.done);
        settle_write((engine, write_path), pmem, &mut w)?;
        // A FUA chunk's kset the commit could not persist: the worker does.
        // As the module: the engine only when a persist is owed.
        if w.progress.persist.is_some() && engine.with(|c| c.persist_owed(&mut w.progress)).is_err()
        {
            break;
        }
        // Done, or the commit found the cache full.
        let done = w.progress.done;
        if done == w.data.len() || (had && done == before) {
            break;
        }
        let left = w.data.len() - done;
        let at = off + done as u64;
        match reserve((engine, write_path), pmem, (at, left), w.cpu) {
            Ok(r) => w.held = Some(r),
            Err(_) => break,
        }
    }
    // The rest as the module's worker writes it: chunk by chunk, each copied
    // without the lock, waiting for room whenever a chunk finds none and going
    // on from there.
    let rest = until_room(host, || loop {
        match w
            .progress
            .persist
            .map_or(Ok(()), |_| engine.with(|c| c.persist_owed(&mut w.progress)))
        {
            Ok(()) => {}
            Err(CacheError::Busy(_)) => return None,
            Err(e) => return Some(Err(e)),
        }
        let done = w.progress.done;
        if done == w.data.len() {
            return Some(Ok(()));
        }
        let left = w.data.len() - done;
        let at = off + done as u64;
        let r = match reserve((engine, write_path), pmem, (at, left), w.cpu) {
            Ok(r) => r,
            Err(CacheError::Busy(_)) => return None,
            Err(e) => return Some(Err(e)),
        };
        let Ok(crc) = copy_in(pmem, &r, &w.data[..], done) else {
            engine.with(|c| c.write_cancel(&r));
            return Some(Err(CacheError::Invalid("copy_in failed")));
        };
        pmem.fence();
        match commit((engine, write_path), pmem, &r, crc, w.fua) {
            Ok(c) => w.progress.committed(&r, c),
            Err(CacheError::Busy(_)) => return None,
            Err(e) => return Some(Err(e)),
        }
    });
    match rest {
        Ok(Ok(())) => Ok(w.id),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(Stalled) => Err("write stalled waiting for room".into()),
    }
}

/// Sorted runs of touched sectors, so verification reads are large.
fn runs(model: &Model) -> Vec<(u64, u64)> {
    let mut secs: Vec<u64> = model.hist.keys().copied().collect();
    secs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in secs {
        match out.last_mut() {
            Some((a, n)) if *a + *n == s && *n < 256 => *n += 1,
            _ => out.push((s, 1)),
        }
    }
    out
}

/// After a checked crash: the images as replay left them and each sector's value.
struct Replayed {
    pmem: Vec<u8>,
    backing: HashMap<u64, Sector>,
    values: HashMap<u64, u64>,
}

/// The on-media `cache_info` DATA_CRC flag of a pmem image.
fn media_crc_flag(pmem: &[u8]) -> bool {
    let slot = |i: usize| {
        let at = CacheInfo::slot_off(i) as usize;
        &pmem[at..at + CACHE_INFO_STRUCT_SIZE]
    };
    matches!(pick_latest::<CacheInfo>(slot(0), slot(1)), Ok(Some((_, i))) if i.flags & CACHE_FLAGS_DATA_CRC != 0)
}

/// Upstream compatibility of data CRCs: the C module checks the CRC of every key
/// it decodes (replay, writeback, GC) while `cache_info` has DATA_CRC, so with
/// `flag_on` every key from the key tail to the key head must carry a valid CRC;
/// and a key marked KEY_FLAGS_DATA_CRC must in any case. Returns the keys checked.
fn check_log_crcs(cache: &Sim<'_>, pmem: &[u8], flag_on: bool) -> Result<u64, String> {
    let st = cache.status();
    let seg_data = (SEG_SIZE - SEG_DATA_OFF) as usize;
    let data_off = |seg: u32| -> usize {
        (SEGMENTS_OFF + u64::from(cache.seg_phys(seg)) * SEG_SIZE + SEG_DATA_OFF) as usize
    };
    let mut pos = st.key_tail;
    let mut checked = 0;
    for _ in 0..100_000 {
        if pos == st.key_head {
            return Ok(checked);
        }
        let a = data_off(pos.seg.get()) + pos.off as usize;
        let buf = &pmem[a..data_off(pos.seg.get()) + seg_data];
        match kset_read(buf, st.n_segs) {
            Ok(KsetRead::Keys { key_num, size }) => {
                for i in 0..key_num as usize {
                    let k = kset_key(buf, i).map_err(|e| e.to_string())?;
                    if flag_on || k.flags & KEY_FLAGS_DATA_CRC != 0 {
                        let d = data_off(k.cache_seg_id) + k.cache_seg_off as usize;
                        let crc = crc32c(PCACHE_CRC_SEED, &pmem[d..d + k.len as usize]);
                        if crc != k.data_crc {
                            return Err(format!(
                                "key {k:?} in the log at {pos:?} has a bad data CRC \
                                 (cache_info DATA_CRC {flag_on}): the C module would refuse it"
                            ));
                        }
                        checked += 1;
                    }
                }
                pos.off += size;
            }
            Ok(KsetRead::Last { next_cache_seg_id }) => {
                pos = Pos {
                    seg: SegId::checked(next_cache_seg_id, st.n_segs)
                        .ok_or("LAST kset out of range")?,
                    off: 0,
                }
            }
            other => {
                return Err(format!(
                    "log walk ends at {pos:?} before the key head {:?}: {other:?}",
                    st.key_head
                ))
            }
        }
    }
    Err("log walk does not terminate".into())
}

/// Properties 1 and 2 for one crash image.
fn check_crash(img: CrashImage, model: &Model, cfg: &Cfg) -> Result<Replayed, String> {
    // Property 2: the backing device holds a log prefix (flush order respected).
    let mut on_backing: HashMap<u64, usize> = HashMap::new();
    let mut k_epoch = 0usize;
    for (&s, v) in &model.hist {
        let data: [u8; SECTOR] = img.backing.get(&s).map(|d| **d).unwrap_or([0u8; SECTOR]);
        let id = identify(s, &data)
            .ok_or_else(|| format!("backing sector {s} holds bytes no write produced"))?;
        let j = v
            .iter()
            .rposition(|&x| x == id)
            .ok_or_else(|| format!("backing sector {s} holds write {id}, never written there"))?;
        on_backing.insert(s, j);
        if let Some(w) = model.writes.get(&id) {
            if w.issue_op != 0 {
                k_epoch = k_epoch.max(model.issue_epoch(w.issue_op));
            }
        }
    }
    for (&s, v) in &model.hist {
        let need = v
            .iter()
            .rposition(|&id| model.durable_epoch(id) <= k_epoch)
            .unwrap_or(0);
        let _ = &s;
        if on_backing[&s] < need {
            return Err(format!(
                "flush order violated on backing: sector {s} holds version {} but a write \
                 issued after flush #{k_epoch} reached the backing device, which needs version {need}",
                on_backing[&s]
            ));
        }
    }

    // Property 1: replay succeeds and every sector reads a permitted version.
    let at_op = img.at_op;
    let flag_before = media_crc_flag(&img.pmem);
    let world = World::untracked(img.pmem, BackingModel::new(BACKING, img.backing));
    let mut m = mem(cfg);
    // The table given after the crash may switch data_crc either way.
    let opts = CacheOptions {
        data_crc: at_op.is_multiple_of(2),
        ..cfg.opts
    };
    let mut cache = Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        geo(),
        m.borrow(),
        &opts,
    )
    .map_err(|e| format!("replay after crash at op {at_op} failed: {e}"))?;
    let flag_after = cache.status().cache_flags & CACHE_FLAGS_DATA_CRC != 0;
    check_log_crcs(
        &cache,
        &world.borrow().pmem.volatile,
        flag_before || flag_after,
    )
    .map_err(|e| format!("crash at op {at_op}: {e}"))?;
    let mut values = HashMap::new();
    let flush_issue = model.last_flush_issue(at_op);
    for (s0, n) in runs(model) {
        let buf = read_sectors(&mut cache, s0, n, false)
            .map_err(|e| format!("read after replay failed: {e}"))?;
        for i in 0..n {
            let s = s0 + i;
            let data = &buf[i as usize * SECTOR..(i as usize + 1) * SECTOR];
            let id = identify(s, data)
                .ok_or_else(|| format!("sector {s} reads bytes no write produced"))?;
            let v = model.versions(s);
            let j = v
                .iter()
                .rposition(|&x| x == id)
                .ok_or_else(|| format!("sector {s} reads write {id}, never written there"))?;
            let floor = model.durable_floor(s, at_op, flush_issue);
            if j < floor {
                let mut ks = String::new();
                cache.for_each_key(|k| {
                    if k.off <= s * 512 && k.end() > s * 512 {
                        ks += &format!("{k:?}");
                    }
                });
                eprintln!("keys covering: {ks}");
                dump_log(&world.borrow().pmem.volatile, s * 512);
                for i in 0..4 {
                    eprintln!("seg {i}: {:?}", cache.segment(i));
                }
                return Err(format!(
                    "sector {s} lost a durable write: reads version {j} (write {id}), \
                     durable version is {floor} (write {} {:?}), crash at op {}; status {:?}; flushes {:?}",
                    v[floor], model.writes.get(&v[floor]), at_op, cache.status(), model.flushes
                ));
            }
            values.insert(s, id);
        }
    }
    drop(cache);
    let w = std::mem::replace(
        &mut *world.borrow_mut(),
        std::rc::Rc::try_unwrap(World::untracked(
            Vec::new(),
            BackingModel::new(0, HashMap::new()),
        ))
        .ok()
        .expect("fresh world")
        .into_inner(),
    );
    Ok(Replayed {
        pmem: w.pmem.volatile,
        backing: w.backing.durable,
        values,
    })
}

fn dump_log(pmem: &[u8], byte: u64) {
    use pcache_engine::meta::kset::{kset_key, kset_read, KsetRead};
    let data_off = |seg: u64| (SEGMENTS_OFF + seg * SEG_SIZE + 0x3000) as usize;
    let (mut seg, mut off) = (0u64, 0usize);
    for _ in 0..10000 {
        let a = data_off(seg) + off;
        let end = data_off(seg) + (SEG_SIZE as usize - 0x3000);
        let buf = &pmem[a..end.min(a + 5144)];
        match kset_read(buf, N_SEGS as u32) {
            Ok(KsetRead::Keys { key_num, size }) => {
                for i in 0..key_num as usize {
                    let k = kset_key(buf, i).unwrap();
                    if k.off <= byte && k.off + u64::from(k.len) > byte {
                        eprintln!("  log {seg}:{off} key#{i} {k:?}");
                    }
                }
                off += size as usize;
            }
            Ok(KsetRead::Last { next_cache_seg_id }) => {
                eprintln!("  log {seg}:{off} LAST -> {next_cache_seg_id}");
                seg = u64::from(next_cache_seg_id);
                off = 0;
            }
            other => {
                eprintln!("  log {seg}:{off} end {other:?}");
                return;
            }
        }
    }
}

/// Bring the cache back after a crash and reset the model to what it holds.
fn settle(
    cache: &mut Sim<'_>,
    world: &std::rc::Rc<std::cell::RefCell<World>>,
    values: &HashMap<u64, u64>,
) -> Result<(), String> {
    cache.flush().map_err(|e| format!("flush: {e}"))?;
    cache
        .writeback_all()
        .map_err(|e| format!("writeback after replay: {e}"))?;
    let w = world.borrow();
    for (&s, &id) in values {
        let d = w.backing.read_sector(s);
        if identify(s, &d) != Some(id) {
            return Err(format!(
                "after full writeback sector {s} differs from the cache"
            ));
        }
    }
    Ok(())
}

struct Outcome {
    crash_points: u64,
}

fn pick_range(rng: &mut Rng) -> (u64, u64) {
    // Two hot regions, one straddling the 4 MiB stripe boundary.
    let stripe = (4 << 20) / SECTOR as u64;
    let base = if rng.chance(1, 2) { 64 } else { stripe - 256 };
    let s = base + rng.below(256);
    let n = match rng.below(10) {
        0 => 1 + rng.below(256),
        1..=3 => 1 + rng.below(64),
        _ => 1 + rng.below(16),
    };
    (s, n)
}

fn run_seed(seed: u64, lives: usize, ops_per_life: usize) -> Result<Outcome, String> {
    let mut rng = Rng(seed);
    let mut cfg = Cfg {
        opts: CacheOptions {
            data_crc: rng.chance(1, 2),
            // Every cache mode, a seed each in turn (a seed keeps its mode across lives).
            cache_mode: (seed % 4) as u32,
        },
        n_ksets: 1 + rng.below(3) as usize,
        n_heads: 1 + rng.below(2) as usize,
    };
    let mut pmem_img = vec![0u8; pmem_size()];
    let mut backing_img: HashMap<u64, Sector> = HashMap::new();
    let mut values: HashMap<u64, u64> = HashMap::new();
    let mut next_id = seed.wrapping_mul(1_000_003) | 1;
    let mut crash_points = 0u64;
    for life in 0..lives {
        // Each life's table may switch data_crc.
        cfg.opts.data_crc = rng.chance(1, 2);
        let world = World::new(
            pmem_img.clone(),
            BackingModel::new(BACKING, backing_img.clone()),
            rng.next_u64(),
        );
        let mut m = mem(&cfg);
        let mut cache = Cache::start(
            SimPmem(world.clone()),
            SimBacking(world.clone()),
            geo(),
            m.borrow(),
            &cfg.opts,
        )
        .map_err(|e| format!("life {life}: start failed: {e}"))?;
        if life > 0 {
            settle(&mut cache, &world, &values)?;
        }
        if rng.chance(1, 2) {
            let p = rng.below(91) as u8;
            cache.set_gc_percent(p).map_err(|e| e.to_string())?;
        }
        // From here on the module's paths: requests wait for room through
        // `with_room`, writeback runs as the background's plan/copy/commit, and a
        // planned batch may stay out across any number of other operations.
        let reader = &cache.reader();
        let write_path = &cache.write_path();
        let engine = SimLock(RefCell::new(cache));
        let host = SimHost::new(&engine, &world, rng.next_u64());
        let mut model = Model::base(&values);
        world.borrow_mut().crash_ppm = if std::env::var("NOCRASH").is_ok() {
            0
        } else {
            60_000 + rng.below(100_000)
        };
        let mut last_crash: Option<Replayed> = None;
        let final_life = life + 1 == lives;
        let mut pending: Vec<PendingFill> = Vec::new();
        let mut filling: Vec<Fill> = Vec::new();
        let mut pending_writes: Vec<PendingWrite> = Vec::new();
        let mut pending_reads: Vec<PendingRead> = Vec::new();
        let mut copier = SimPmem(world.clone());
        let cfg_writes_through = matches!(cfg.opts.cache_mode, 1 | 2);
        for _ in 0..ops_per_life {
            if !pending.is_empty() && rng.chance(1, 3) {
                let p = pending.swap_remove(rng.below(pending.len() as u64) as usize);
                let cpu = rng.below(2) as usize;
                if !cfg_writes_through && rng.chance(1, 2) {
                    // As the module in the modes that cache writes: no engine
                    // lock, unless the fill gives back a segment's last reference.
                    if let Some(seg) = write_path.fill(&copier, &p.gap, &p.data[..], cpu) {
                        engine.with(|c| c.segment_released(seg));
                    }
                } else if rng.chance(1, 2) {
                    engine.with(|c| c.read_fill(&p.gap, &p.data[..], cpu));
                } else {
                    // As the module: room under the lock, the copy without it,
                    // the commit at some later point.
                    let mut f = engine.with(|c| c.fill_start(&p.gap, cpu));
                    if f.is_open() {
                        fill_copy(&copier, &mut f, &p.data[..]);
                        filling.push(f);
                    }
                }
            }
            if !filling.is_empty() && rng.chance(1, 3) {
                let f = filling.swap_remove(rng.below(filling.len() as u64) as usize);
                engine.with(|c| c.fill_end(f));
            }
            if !pending_reads.is_empty() && rng.chance(1, 3) {
                let r = pending_reads.swap_remove(rng.below(pending_reads.len() as u64) as usize);
                finish_read((&engine, reader), &model, r)?;
            }
            if !pending_writes.is_empty() && rng.chance(1, 3) {
                let w = pending_writes.swap_remove(rng.below(pending_writes.len() as u64) as usize);
                settle_fills(&engine, &mut filling);
                settle_reads((&engine, reader), &model, &mut pending_reads)?;
                settle_writes((&engine, write_path), &mut copier, &mut pending_writes)?;
                let id = finish_write((&engine, write_path), &host, &mut copier, w)?;
                let now = world.borrow().ops;
                model.writes.get_mut(&id).unwrap().ack_op = Some(now);
            }
            let op = rng.below(100);
            let now = || world.borrow().ops;
            match op {
                0..=59 => {
                    let (s, n) = pick_range(&mut rng);
                    // Overlapping writes in flight together may land in either order;
                    // the model orders writes by issue, so the older one finishes first.
                    while let Some(i) = pending_writes
                        .iter()
                        .position(|w| w.s < s + n && s < w.s + (w.data.len() / SECTOR) as u64)
                    {
                        let w = pending_writes.swap_remove(i);
                        settle_fills(&engine, &mut filling);
                        settle_reads((&engine, reader), &model, &mut pending_reads)?;
                        settle_writes((&engine, write_path), &mut copier, &mut pending_writes)?;
                        let id = finish_write((&engine, write_path), &host, &mut copier, w)?;
                        model.writes.get_mut(&id).unwrap().ack_op = Some(now());
                    }
                    let fua = rng.chance(1, 8);
                    let id = next_id;
                    next_id += 1;
                    let mut data = vec![0u8; n as usize * SECTOR];
                    for i in 0..n {
                        fill(
                            id,
                            s + i,
                            &mut data[i as usize * SECTOR..(i as usize + 1) * SECTOR],
                        );
                        model.hist.entry(s + i).or_insert_with(|| vec![0]).push(id);
                    }
                    model.writes.insert(
                        id,
                        WriteRec {
                            issue_op: now(),
                            ack_op: None,
                            fua,
                        },
                    );
                    let cpu = rng.below(2) as usize;
                    // As `map` does in the modes that cache writes: reserve now,
                    // copy and commit later.
                    let split = !cfg_writes_through && rng.chance(1, 3);
                    let first = if split {
                        let at = (s * SECTOR as u64, data.len());
                        reserve((&engine, write_path), &mut copier, at, cpu).ok()
                    } else {
                        None
                    };
                    if let Some(first) = first {
                        pending_writes.push(PendingWrite {
                            id,
                            s,
                            data,
                            fua,
                            cpu,
                            progress: Progress::default(),
                            held: Some(first),
                        });
                    } else {
                        settle_fills(&engine, &mut filling);
                        settle_reads((&engine, reader), &model, &mut pending_reads)?;
                        settle_writes((&engine, write_path), &mut copier, &mut pending_writes)?;
                        let mut progress = Progress::default();
                        let r = with_room(&engine, &host, |c: &mut Sim<'_>| {
                            busy_is_none(c.write_resume(
                                s * SECTOR as u64,
                                &data[..],
                                fua,
                                cpu,
                                &mut progress,
                            ))
                        });
                        match r {
                            Ok(Ok(())) => model.writes.get_mut(&id).unwrap().ack_op = Some(now()),
                            Ok(Err(e)) => return Err(format!("write failed: {e}")),
                            Err(Stalled) => return Err("write stalled waiting for room".into()),
                        }
                    }
                }
                60..=79 => {
                    let (s, n) = pick_range(&mut rng);
                    let hits_room = [0, 1, 8][rng.below(3) as usize];
                    let read = match rng.below(4) {
                        0 => engine
                            .with(|c| read_sectors(c, s, n, false))
                            .map(SplitRead::Done),
                        1 => engine
                            .with(|c| read_sectors(c, s, n, true))
                            .map(SplitRead::Done),
                        _ => {
                            let wp = (!cfg_writes_through).then_some(write_path);
                            engine.with(|c| {
                                split_read(c, (reader, wp), s, n, &mut pending, hits_room)
                            })
                        }
                    }
                    .map_err(|e| format!("read: {e}"))?;
                    match read {
                        SplitRead::Done(buf) => {
                            check_live_read(&model, s, &buf, |i| model.acked_floor(s + i as u64))?
                        }
                        SplitRead::Pinned(buf, hits) => {
                            let pins = engine.with(|c| {
                                hits.iter()
                                    .filter_map(|h| h.segment())
                                    .map(|id| (id.get(), c.seg_gen(id.get())))
                                    .collect()
                            });
                            let r = PendingRead {
                                s,
                                buf,
                                hits,
                                floors: (0..n).map(|i| model.acked_floor(s + i)).collect(),
                                pins,
                            };
                            if rng.chance(1, 2) {
                                finish_read((&engine, reader), &model, r)?;
                            } else {
                                pending_reads.push(r);
                            }
                        }
                    }
                }
                80..=86 => {
                    model.flushes.push(FlushRec {
                        issue_op: now(),
                        complete_op: None,
                    });
                    settle_fills(&engine, &mut filling);
                    settle_reads((&engine, reader), &model, &mut pending_reads)?;
                    settle_writes((&engine, write_path), &mut copier, &mut pending_writes)?;
                    // As the module in the modes that cache writes: outside the
                    // engine, unless a close needs a new log segment.
                    let r = if !cfg_writes_through && write_path.flush(&copier) {
                        Ok(Ok(()))
                    } else {
                        with_room(&engine, &host, |c: &mut Sim<'_>| busy_is_none(c.flush()))
                    };
                    match r {
                        Ok(Ok(())) => model.flushes.last_mut().unwrap().complete_op = Some(now()),
                        Ok(Err(e)) => return Err(format!("flush: {e}")),
                        Err(Stalled) => return Err("flush stalled waiting for room".into()),
                    }
                }
                87..=89 => host.plan()?,
                90 | 91 => {
                    host.finish()?;
                }
                92 => {
                    host.round(false)?;
                }
                93..=97 => {
                    for _ in 0..1 + rng.below(8) {
                        engine
                            .with(|c| c.gc_step())
                            .map_err(|e| format!("gc: {e}"))?;
                    }
                }
                98 => {
                    // `dmsetup message <dev> 0 data_crc true|false`
                    let on = rng.chance(1, 2);
                    engine
                        .with(|c| c.set_data_crc(on))
                        .map_err(|e| format!("set_data_crc: {e}"))?;
                }
                _ => {
                    let p = rng.below(91) as u8;
                    engine
                        .with(|c| c.set_gc_percent(p))
                        .map_err(|e| e.to_string())?;
                }
            }
            engine
                .with(|c| c.check_invariants())
                .map_err(|b| format!("life {life}: invariant broken: {}", b.0))?;
            engine
                .with(|c| check_pins(c, &pending_reads))
                .map_err(|e| format!("life {life}: {e}"))?;
            let crashes: Vec<CrashImage> = std::mem::take(&mut world.borrow_mut().crashes);
            for img in crashes {
                let r = check_crash(img, &model, &cfg).map_err(|e| format!("life {life}: {e}"))?;
                crash_points += 1;
                last_crash = Some(r);
            }
        }
        world.borrow_mut().crash_ppm = 0;
        // The misses in flight come back before the instance goes (device-mapper
        // ends every bio before a suspend completes).
        for p in pending.drain(..) {
            engine.with(|c| c.read_fill(&p.gap, &p.data[..], 0));
        }
        settle_fills(&engine, &mut filling);
        settle_reads((&engine, reader), &model, &mut pending_reads)?;
        settle_writes((&engine, write_path), &mut copier, &mut pending_writes)?;
        for w in pending_writes.drain(..) {
            finish_write((&engine, write_path), &host, &mut copier, w)?;
        }
        // The background finishes the copy it had planned, as the module's
        // suspend or destroy waits for it.
        host.finish()?;
        drop(host);
        let mut cache = engine.0.into_inner();
        if final_life || last_crash.is_none() {
            // No crash: a full writeback leaves the backing device equal to the model.
            cache.flush().map_err(|e| format!("final flush: {e}"))?;
            cache
                .writeback_all()
                .map_err(|e| format!("final writeback: {e}"))?;
            let mut vals = HashMap::new();
            for (s0, n) in runs(&model) {
                let buf = read_sectors(&mut cache, s0, n, false)
                    .map_err(|e| format!("final read: {e}"))?;
                let w = world.borrow();
                for i in 0..n {
                    let s = s0 + i;
                    let d = &buf[i as usize * SECTOR..(i as usize + 1) * SECTOR];
                    let b = w.backing.read_sector(s);
                    let id = identify(s, d).ok_or("final read: garbage")?;
                    if identify(s, &b) != Some(id) {
                        return Err(format!(
                            "after full writeback backing sector {s} differs from the cache"
                        ));
                    }
                    let v = model.versions(s);
                    let j = v
                        .iter()
                        .rposition(|&x| x == id)
                        .ok_or("final: unknown write")?;
                    if j < model.acked_floor(s) {
                        return Err(format!(
                            "final read of sector {s} lost an acknowledged write"
                        ));
                    }
                    vals.insert(s, id);
                }
            }
            drop(cache);
            let w = world.borrow();
            pmem_img = w.pmem.volatile.clone();
            backing_img = w.backing.durable.clone();
            for (s, d) in &w.backing.cached {
                backing_img.insert(*s, d.clone());
            }
            values = vals;
        } else if let Some(r) = last_crash {
            drop(cache);
            pmem_img = r.pmem;
            backing_img = r.backing;
            values = r.values;
        }
    }
    Ok(Outcome { crash_points })
}

/// Property 4: data written with CRC on and then corrupted is an IO error on
/// read and is never written back, whatever data_crc was switched to since (by
/// message or by the table of a later attach); keys record their own setting.
fn check_data_crc(seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed);
    let mut cfg = Cfg {
        opts: CacheOptions {
            data_crc: rng.chance(1, 2),
            ..Default::default()
        },
        n_ksets: 1 + rng.below(2) as usize,
        n_heads: 1,
    };
    let world = World::new(
        vec![0u8; pmem_size()],
        BackingModel::new(BACKING, HashMap::new()),
        seed,
    );
    let mut m = mem(&cfg);
    let mut cache = Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        geo(),
        m.borrow(),
        &cfg.opts,
    )
    .map_err(|e| e.to_string())?;
    // Writes to disjoint ranges, data_crc switched at random before each.
    let mut writes = Vec::new();
    for i in 0..2 + rng.below(8) {
        if rng.chance(1, 2) {
            cache
                .set_data_crc(rng.chance(1, 2))
                .map_err(|e| e.to_string())?;
        }
        let n = 1 + rng.below(32);
        let s = i * 64 + rng.below(32);
        let mut data = vec![0u8; n as usize * SECTOR];
        for j in 0..n {
            fill(
                7 + i,
                s + j,
                &mut data[j as usize * SECTOR..(j as usize + 1) * SECTOR],
            );
        }
        cache
            .write(s * SECTOR as u64, &data, rng.chance(1, 4), 0)
            .map_err(|e| e.to_string())?;
        writes.push((s, n, cache.data_crc()));
    }
    cache.flush().map_err(|e| e.to_string())?;
    if rng.chance(1, 2) {
        // Attach again with a table that may say otherwise.
        drop(cache);
        cfg.opts.data_crc = rng.chance(1, 2);
        cache = Cache::start(
            SimPmem(world.clone()),
            SimBacking(world.clone()),
            geo(),
            m.borrow(),
            &cfg.opts,
        )
        .map_err(|e| e.to_string())?;
    }
    let (s, n, with_crc) = writes[rng.below(writes.len() as u64) as usize];
    let mut key = None;
    cache.for_each_key(|k| {
        if k.off == s * SECTOR as u64 {
            key = Some(*k);
        }
    });
    let k = key.ok_or("no key for the write")?;
    if k.has_crc() != with_crc {
        return Err(format!(
            "key {k:?} was written with data_crc {with_crc} but says otherwise"
        ));
    }
    let at = rng.below(u64::from(k.len));
    let phys = u64::from(cache.seg_phys(k.pos.seg.get()));
    let addr = SEGMENTS_OFF + phys * SEG_SIZE + SEG_DATA_OFF + u64::from(k.pos.off) + at;
    world.borrow_mut().pmem.volatile[addr as usize] ^= 1 << rng.below(8);
    let mut buf = vec![0u8; n as usize * SECTOR];
    let r = cache.read(s * SECTOR as u64, &mut buf, false, 0);
    match (with_crc, r) {
        (true, Err(CacheError::Io(_))) | (false, Ok(_)) => {}
        (true, other) => return Err(format!("corrupted cached data was not reported: {other:?}")),
        (false, other) => return Err(format!("read of data without CRC failed: {other:?}")),
    }
    let r = cache.writeback_all();
    let sector = (k.off + at) / SECTOR as u64;
    if with_crc {
        if !matches!(r, Err(CacheError::Io(_))) {
            return Err(format!("corrupted dirty data was written back: {r:?}"));
        }
        if world.borrow().backing.cached.contains_key(&sector) {
            return Err("corrupted data reached the backing device".into());
        }
    } else {
        r.map_err(|e| format!("writeback of data without CRC: {e}"))?;
    }
    Ok(())
}

/// Property 3: corrupted metadata makes attach recover or fail with an error.
fn check_corruption(seed: u64) -> Result<u64, String> {
    let mut rng = Rng(seed);
    let cfg = Cfg {
        opts: CacheOptions::default(),
        n_ksets: 2,
        n_heads: 1,
    };
    let world = World::new(
        vec![0u8; pmem_size()],
        BackingModel::new(BACKING, HashMap::new()),
        seed,
    );
    {
        let mut m = mem(&cfg);
        let mut cache = Cache::start(
            SimPmem(world.clone()),
            SimBacking(world.clone()),
            geo(),
            m.borrow(),
            &cfg.opts,
        )
        .map_err(|e| e.to_string())?;
        for i in 0..200 + rng.below(400) {
            let (s, n) = pick_range(&mut rng);
            let mut data = vec![0u8; n as usize * SECTOR];
            for j in 0..n {
                fill(
                    i + 1,
                    s + j,
                    &mut data[j as usize * SECTOR..(j as usize + 1) * SECTOR],
                );
            }
            if cache
                .write(s * SECTOR as u64, &data, rng.chance(1, 4), 0)
                .is_err()
            {
                let _ = cache.flush();
                let _ = cache.writeback_all();
                let _ = cache.gc_all();
            }
            if rng.chance(1, 20) {
                let _ = cache.writeback_step();
                let _ = cache.gc_step();
            }
        }
        let _ = cache.flush();
    }
    let clean = world.borrow().pmem.volatile.clone();
    let meta_len = SEGMENTS_OFF as usize;
    let mut cases = 0;
    for _ in 0..64 {
        let mut img = clean.clone();
        match rng.below(6) {
            0 => {
                // bit flips in the device metadata
                for _ in 0..1 + rng.below(4) {
                    let at = 0x1000 + rng.below(meta_len as u64 - 0x1000) as usize;
                    img[at] ^= 1 << rng.below(8);
                }
            }
            1 => {
                // bit flips in segment headers and the key log
                for _ in 0..1 + rng.below(8) {
                    let seg = rng.below(N_SEGS);
                    let base = (SEGMENTS_OFF + seg * SEG_SIZE) as usize;
                    let at = base
                        + if rng.chance(1, 2) {
                            rng.below(0x3000 + 0x2000) as usize
                        } else {
                            rng.below(SEG_SIZE) as usize
                        };
                    img[at] ^= 1 << rng.below(8);
                }
            }
            2 => {
                // a zeroed slot
                let slots = [0x2000usize, 0x3000, 0x4000, 0x4010, 0x4020, 0x4030];
                let at = slots[rng.below(slots.len() as u64) as usize];
                img[at..at + 16].fill(0);
            }
            3 => {
                // a stale slot: an older copy of a different structure's bytes
                let at = 0x4000 + 16 * rng.below(4) as usize;
                let from = 0x4000 + 16 * rng.below(4) as usize;
                let tmp: Vec<u8> = clean[from..from + 16].to_vec();
                img[at..at + 16].copy_from_slice(&tmp);
            }
            4 => {
                // truncate or loop the key log: rewrite a kset header as a LAST kset
                let seg = rng.below(N_SEGS);
                let at =
                    (SEGMENTS_OFF + seg * SEG_SIZE + 0x3000) as usize + 8 * rng.below(64) as usize;
                let mut last = [0u8; 24];
                pcache_engine::meta::kset::encode_last_kset(
                    rng.below(N_SEGS + 2) as u32,
                    &mut last,
                );
                img[at..at + 24].copy_from_slice(&last);
            }
            _ => {
                // random garbage over a whole region
                let at = rng.below(img.len() as u64 - 4096) as usize;
                for b in &mut img[at..at + 1 + rng.below(4096) as usize] {
                    *b = rng.next_u64() as u8;
                }
            }
        }
        let w2 = World::new(img, BackingModel::new(BACKING, HashMap::new()), 0);
        let mut m = mem(&cfg);
        let started = Instant::now();
        if let Ok(mut c) = Cache::start(
            SimPmem(w2.clone()),
            SimBacking(w2.clone()),
            geo(),
            m.borrow(),
            &cfg.opts,
        ) {
            // Whatever replay accepted must be usable without panics.
            let mut buf = vec![0u8; 64 * SECTOR];
            let _ = c.read(64 * SECTOR as u64, &mut buf, true, 0);
            let _ = c.writeback_all();
            let _ = c.gc_all();
            let _ = c.write(0, &buf, true, 0);
        }
        if started.elapsed() > Duration::from_secs(5) {
            return Err("attach of a corrupted image took over 5 s (hang?)".into());
        }
        cases += 1;
    }
    Ok(cases)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    // Respect libtest's `--list`/filters loosely: this harness runs everything.
    if std::env::args().any(|a| a == "--list") {
        println!("crash_sim: test");
        return;
    }
    let soak = env_u64("PCACHE_SOAK");
    let threads = env_u64("PCACHE_THREADS").unwrap_or(2).max(1);
    let start = Instant::now();

    if let Some(seed) = env_u64("PCACHE_SEED") {
        let r = check_data_crc(seed)
            .and_then(|()| {
                if seed % 8 == 0 {
                    check_corruption(seed).map(|_| ())
                } else {
                    Ok(())
                }
            })
            .and_then(|()| run_seed(seed, 4, 300));
        match r {
            Ok(o) => println!("seed {seed}: ok, {} crash points", o.crash_points),
            Err(e) => {
                println!("seed {seed}: FAILED: {e}");
                std::process::exit(1);
            }
        }
        return;
    }

    let target_points: u64 = 100_000;
    let deadline = soak.map(|s| start + Duration::from_secs(s));
    let next_seed = Arc::new(AtomicU64::new(1));
    let points = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (next_seed, points, failed) = (next_seed.clone(), points.clone(), failed.clone());
        handles.push(std::thread::spawn(move || -> Result<(), String> {
            loop {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let done = match deadline {
                    Some(d) => Instant::now() >= d,
                    None => points.load(Ordering::Relaxed) >= target_points,
                };
                if done {
                    return Ok(());
                }
                let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                let r = std::panic::catch_unwind(|| {
                    check_data_crc(seed)?;
                    if seed % 8 == 0 {
                        check_corruption(seed)?;
                    }
                    run_seed(seed, 4, 300)
                });
                match r {
                    Ok(Ok(o)) => {
                        points.fetch_add(o.crash_points, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(format!(
                            "seed {seed} FAILED (rerun: PCACHE_SEED={seed}): {e}"
                        ));
                    }
                    Err(_) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(format!("seed {seed} PANICKED (rerun: PCACHE_SEED={seed})"));
                    }
                }
            }
        }));
    }
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("worker thread panicked".into()),
        }
    }
    let n = points.load(Ordering::Relaxed);
    let seeds = next_seed.load(Ordering::Relaxed) - 1;
    println!(
        "{n} crash points ({seeds} seeds, {:.1} s)",
        start.elapsed().as_secs_f64()
    );
    if errors.is_empty() {
        println!("test result: ok. 1 passed; 0 failed");
    } else {
        for e in &errors {
            println!("{e}");
        }
        println!("test result: FAILED. 0 passed; 1 failed");
        std::process::exit(1);
    }
}
