//! The request path: writes into the cache, reads from cache and backing device,
//! and data-head allocation (upstream `cache_req.c`).

use super::data::{Sink, Source};
use super::env::{Backing, IoError, Locked, Pmem};
use super::error::CacheError;
use super::index::{Index, Trees};
use super::key::{Key, Pos, SegId, KEY_FLAGS_VERIFIED};
use super::key_log::Over;
use super::kset::KEY_WITHOUT_CRC;
use super::segment::SegMap;
use super::stats::Counter;
use super::write_path::{Committed, Progress};
use super::{Cache, Memory, Mode};
use crate::meta::crc32c::PCACHE_CRC_SEED;
use crate::meta::kset::{KEY_FLAGS_DATA_CRC, KEY_FLAGS_EMPTY};
use crate::meta::layout::Geometry;
use core::sync::atomic::Ordering;

/// Keys (and empty subtrees) one step of the clean pass looks at: one hold of
/// the control lock (see [`Cache::clean_step`]).
pub const CLEAN_KEYS_PER_STEP: usize = 256;

/// What a read found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadResult {
    pub hit_bytes: u64,
    pub miss_bytes: u64,
}

/// Room in the cache for one chunk of a write (see [`Cache::write_reserve`]).
/// The module copies into it outside the engine, so writes on two CPUs
/// copy at once; the engine takes it back in [`Cache::write_commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Logical byte offset of the chunk.
    pub off: u64,
    pub len: u32,
    /// Device offset of the room in the cache.
    pub addr: u64,
    pos: Pos,
    gen: u64,
    /// The key gets a data CRC ([`copy_in`] computes it).
    pub crc: bool,
    flags: u32,
}

impl Reservation {
    /// Room at `pos` (device offset `addr`) of a segment of generation `gen`
    /// for `len` bytes at `off`.
    pub(crate) fn new(
        off: u64,
        len: u32,
        addr: u64,
        pos: Pos,
        gen: u64,
        crc: bool,
        flags: u32,
    ) -> Self {
        Reservation {
            off,
            len,
            addr,
            pos,
            gen,
            crc,
            flags,
        }
    }

    /// The segment its room is in (it holds a reference there).
    pub(crate) fn segment(&self) -> SegId {
        self.pos.seg
    }

    /// The key of the data copied into it, with its data CRC if it has one.
    pub(crate) fn key(&self, crc: Option<u32>) -> Key {
        let (crc, flags) = match crc {
            Some(crc) => (crc, self.flags | KEY_FLAGS_DATA_CRC),
            None => (0, self.flags),
        };
        Key {
            off: self.off,
            len: self.len,
            flags,
            pos: self.pos,
            gen: self.gen,
            crc,
            crc_back: 0,
            crc_len: self.len,
        }
    }
}

/// Copies `src[at..at + r.len]` into the room of `r`, one piece at a time as
/// `src` holds them, storing and flushing each (`memcpy_flushcache`) but not
/// fencing; returns the data CRC of the bytes stored (0 if `r` wants none):
/// [`Pmem::write_crc`] reads each piece once for both.
pub fn copy_in<P: Pmem, S: Source + ?Sized>(
    pmem: &P,
    r: &Reservation,
    src: &S,
    at: usize,
) -> Result<u32, IoError> {
    let mut crc = PCACHE_CRC_SEED;
    let mut to = r.addr;
    src.pieces(at, r.len as usize, &mut |p| {
        if r.crc {
            crc = pmem.write_crc(to, p, crc);
        } else {
            pmem.write(to, p);
        }
        to += p.len() as u64;
        Ok(())
    })?;
    pmem.flush(r.addr, u64::from(r.len));
    Ok(if r.crc { crc } else { 0 })
}

/// A part of a read the cache holds, for the caller to copy with no
/// lock held (see [`Cache::read_start`]). It holds a pin on its segment
/// ([`Pmem::pin`]), so the segment is not handed out again, and its data not
/// overwritten, before [`release_hits`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hit {
    /// Device offset of the data in the cache.
    pub addr: u64,
    /// Where it goes in the read's data.
    pub at: usize,
    pub len: usize,
    seg: Option<SegId>,
    /// The key's data was not checked against its CRC since attach:
    /// [`copy_hits`] checks it.
    check: Option<HitCheck>,
}

/// The CRC check a [`Hit`] carries, and what identifies its key afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HitCheck {
    /// The key's logical offset, cache position and generation when the read
    /// found it: [`Cache::read_verified`] marks it verified only if the index
    /// still holds that key.
    key_off: u64,
    pos: Pos,
    gen: u64,
    crc: u32,
    /// Device offset and length of the extent the CRC covers.
    start: u64,
    len: u32,
    /// The hit is that whole extent: the CRC runs over the copy.
    exact: bool,
}

impl Hit {
    /// The segment it pins.
    pub fn segment(&self) -> Option<SegId> {
        self.seg
    }

    /// [`copy_hits`] checks its data against the key's CRC; once it did,
    /// [`Cache::read_verified`] records that under the subtree's lock.
    pub fn checks(&self) -> bool {
        self.check.is_some()
    }
}

/// What [`Cache::read_start`] left to the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Started {
    pub res: ReadResult,
    /// How many of the gaps to read from the backing device.
    pub gaps: usize,
    /// How many of the hits to copy ([`copy_hits`]), then give back
    /// ([`Cache::read_done`]).
    pub hits: usize,
    /// Where [`Cache::read_resume`] stopped because `hits` was full: the
    /// next call starts there. The end of the read once it is all started.
    pub next: u64,
}

/// Why [`copy_hits`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitError {
    /// Reading pmem failed (a media error).
    Media,
    /// A hit's data does not match its key's CRC; the hit's part of the read
    /// is zeroed (see [`Cache::read_crc_failed`]).
    Crc,
}

/// Bytes of pmem a CRC check over a whole extent reads at a time, into a
/// buffer on the stack: the copy runs outside the engine and its buffers.
const CHECK_CHUNK: usize = 512;

/// Copies each hit from the cache into `dst`, one piece at a time as `dst`
/// holds them, and checks the hits that carry a CRC check ([`Hit::checks`]):
/// over the copy when the hit is the whole extent the CRC covers, otherwise
/// over the extent read from pmem again, in small pieces (a 4 KiB read of a
/// 128 KiB write pays for the extent once per attach, see
/// [`Cache::read_verified`]). The caller gives the hits back either way.
pub fn copy_hits<P: Pmem, S: Sink + ?Sized>(
    pmem: &P,
    hits: &[Hit],
    dst: &mut S,
) -> Result<(), HitError> {
    for h in hits {
        let exact = h.check.is_some_and(|c| c.exact);
        let mut crc = PCACHE_CRC_SEED;
        let mut from = h.addr;
        dst.pieces_mut(h.at, h.len, &mut |p| {
            if exact {
                crc = pmem.read_crc(from, p, crc)?;
            } else {
                pmem.read(from, p)?;
            }
            from += p.len() as u64;
            Ok(())
        })
        .map_err(|_| HitError::Media)?;
        let Some(c) = h.check else {
            continue;
        };
        if !c.exact {
            crc = extent_crc(pmem, c.start, c.len)?;
        }
        if crc != c.crc {
            // Hand out none of the data that failed.
            let _ = dst.pieces_mut(h.at, h.len, &mut |p| {
                p.fill(0);
                Ok(())
            });
            return Err(HitError::Crc);
        }
    }
    Ok(())
}

/// The data CRC of `len` bytes of pmem at `start`.
fn extent_crc<P: Pmem>(pmem: &P, start: u64, len: u32) -> Result<u32, HitError> {
    let mut chunk = [0u8; CHECK_CHUNK];
    let mut crc = PCACHE_CRC_SEED;
    let mut done = 0u64;
    while done < u64::from(len) {
        let n = (u64::from(len) - done).min(CHECK_CHUNK as u64) as usize;
        let piece = chunk.get_mut(..n).ok_or(HitError::Media)?;
        pmem.read(start + done, piece)
            .map_err(|_| HitError::Media)?;
        crc = pmem.crc32c(crc, piece);
        done += n as u64;
    }
    Ok(crc)
}

/// Gives back the pins of `hits` once they are copied (or the read gave up):
/// outside the engine, on the CPU that copied them (see [`Pmem::pin`]).
pub fn release_hits<P: Pmem + ?Sized>(pmem: &P, hits: &[Hit]) {
    for seg in hits.iter().filter_map(|h| h.seg) {
        pmem.unpin(seg.get());
    }
}

/// A part of a read that the cache does not hold (see [`Cache::read_start`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gap {
    /// Logical byte offset (on the backing device).
    pub off: u64,
    /// Where it starts in the read's data.
    pub at: usize,
    pub len: usize,
    /// The tag of its placeholder key; 0: none (the cache does not fill it).
    pub tag: u32,
}

/// Bytes `at..at + len` of `data`, as a source of their own.
struct Part<'a, S: ?Sized> {
    data: &'a S,
    at: usize,
    len: usize,
}

impl<S: Source + ?Sized> Source for Part<'_, S> {
    fn len(&self) -> usize {
        self.len
    }

    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(IoError);
        }
        self.data.pieces(self.at + at, len, f)
    }
}

/// What a read does with the parts the cache does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misses {
    /// Read them from the backing device.
    Read,
    /// Read them and insert them as clean keys through data head `cpu`.
    ReadAndCache(usize),
    /// Stop at the first one.
    Stop,
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// The subtree of `cur` and where the range up to `end` leaves it (keys and
    /// requests are cut at subtree boundaries, every 4 MiB).
    pub(crate) fn stripe(&self, cur: u64, end: u64) -> Result<(usize, u64), CacheError> {
        self.index
            .stripe(cur, end)
            .ok_or(CacheError::Invalid("offset beyond the backing device"))
    }

    pub(crate) fn check_range(&self, off: u64, len: usize) -> Result<(), CacheError> {
        let end = off
            .checked_add(len as u64)
            .ok_or(CacheError::Invalid("range overflows"))?;
        if end > self.dev_bytes {
            return Err(CacheError::Invalid("request beyond the backing device"));
        }
        Ok(())
    }

    /// Writes `data` at `off` as the cache mode says (see [`Cache::write_from`]).
    pub fn write(&self, off: u64, data: &[u8], fua: bool, cpu: usize) -> Result<(), CacheError> {
        self.write_from(off, data, fua, cpu)
    }

    /// Writes the bytes of `src` at `off` as the cache mode says (see
    /// [`super::mode`]). In writeback and writeonly mode: copies them into the
    /// cache as one or more keys, straight from `src`, and logs them; with `fua`
    /// the keys' ksets are persisted before returning; on `Err` some leading part
    /// may already be cached (as upstream). In the modes that write through, the
    /// backing device holds the data when this returns `Ok` (with `fua`,
    /// durably), and on `Err` the cache holds none of the range.
    pub fn write_from<S: Source + ?Sized>(
        &self,
        off: u64,
        src: &S,
        fua: bool,
        cpu: usize,
    ) -> Result<(), CacheError> {
        self.write_resume(off, src, fua, cpu, &mut Progress::default())
    }

    /// [`Cache::write_from`] for a caller that tries again when the cache is
    /// full (`Busy`): in writeback and writeonly mode it goes on from where
    /// the tries before got (`progress`, see [`Progress`]), as the module's
    /// worker does. Writing the whole range again instead could go on for
    /// ever: each try would take the room GC freed for its first chunk, and
    /// its second find none.
    pub fn write_resume<S: Source + ?Sized>(
        &self,
        off: u64,
        src: &S,
        fua: bool,
        cpu: usize,
        progress: &mut Progress,
    ) -> Result<(), CacheError> {
        self.check_range(off, src.len())?;
        let len = src.len() as u64;
        match self.mode() {
            Mode::Writeback | Mode::Writeonly => self.insert_data(off, src, 0, fua, cpu, progress),
            _ => {
                // As a write sent without the engine (see `super::through`): in
                // flight while the backing device writes, so that a read or
                // another write of the range meanwhile caches nothing, then
                // cached in writethrough mode unless contested.
                let gap = match self.through_start(off, len as usize) {
                    Ok(gap) => gap,
                    // The table is full: the write is not recorded, so it caches
                    // nothing and contests what overlaps it. Coherent for a
                    // caller with no read or write through of the range out
                    // meanwhile (one that owns the engine: the tests, the
                    // tool); the module waits for a slot instead.
                    Err(CacheError::Busy(_)) => {
                        self.in_flight.with(|f| f.contest(off, off + len));
                        self.drop_range(off, len)?;
                        return self.write_backing(off, src, fua);
                    }
                    Err(e) => return Err(e),
                };
                match self.write_backing(off, src, fua) {
                    Ok(()) => {
                        self.through_done(&gap, Some(src), cpu);
                        Ok(())
                    }
                    Err(e) => {
                        self.through_release(&gap);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Writes through to the backing device (flushing it for `fua`). On a
    /// failure the cache gives up what it holds of the range: it must not serve
    /// data the backing device may not have.
    fn write_backing<S: Source + ?Sized>(
        &self,
        off: u64,
        src: &S,
        fua: bool,
    ) -> Result<(), CacheError> {
        let mut at = off;
        let backing = &self.backing;
        let written = src
            .pieces(0, src.len(), &mut |p| {
                backing.write(at, p)?;
                at += p.len() as u64;
                Ok(())
            })
            .and_then(|()| if fua { backing.flush() } else { Ok(()) });
        if written.is_err() {
            self.stats.inc(Counter::BackingErrors);
            self.drop_range(off, src.len() as u64)?;
            return Err(CacheError::Io("backing device write failed"));
        }
        Ok(())
    }

    /// Copies `src[*done..]` into the cache as keys from `off + *done` on,
    /// with `flags`: reserve, copy and commit each chunk in turn (see
    /// [`Reservation`]), counting the commits in `progress`.
    pub(crate) fn insert_data<S: Source + ?Sized>(
        &self,
        off: u64,
        src: &S,
        flags: u32,
        fua: bool,
        cpu: usize,
        progress: &mut Progress,
    ) -> Result<(), CacheError> {
        let total = src.len();
        loop {
            self.persist_owed(progress)?;
            let done = progress.done;
            if done >= total {
                return Ok(());
            }
            let r = self.write_reserve(off + done as u64, total - done, flags, cpu)?;
            // No fence here: the copy and the commit run in one context, and
            // closing a kset fences before the kset is stored (see `kset_close`).
            let Ok(crc) = copy_in(&self.pmem, &r, src, done) else {
                self.write_cancel(&r);
                return Err(CacheError::Invalid("request data shorter than its length"));
            };
            let committed = self.write_commit(&r, crc, fua)?;
            progress.committed(&r, committed);
        }
    }

    /// Takes room for the first chunk of a write of `len` bytes at `off`: up to
    /// the end of the subtree, and of the data head's segment. The reservation
    /// holds a reference on its segment, so nothing reclaims the room before
    /// [`Cache::write_commit`] or [`Cache::write_cancel`].
    pub fn write_reserve(
        &self,
        off: u64,
        len: usize,
        flags: u32,
        cpu: usize,
    ) -> Result<Reservation, CacheError> {
        self.check_range(off, len)?;
        if self.space.crc_flag_pending() {
            self.sync_crc_flag();
        }
        if self.index.free_nodes() < 2 {
            return Err(CacheError::Busy("key pool exhausted"));
        }
        self.kset_room(off)?;
        let Cache {
            space,
            seg_map,
            pmem,
            geo,
            n_segs,
            ..
        } = self;
        space.reserve(seg_map, pmem, geo, *n_segs, (off, len, flags), cpu)
    }

    /// Makes the data copied into `r` (with CRC `crc`, see [`copy_in`]) a key:
    /// into the index, and logged; with `fua` its kset is persisted before this
    /// returns. A caller that copied on another CPU fences first (`pmem_wmb` only
    /// orders the stores of the CPU it runs on). On `Err` (nothing committed)
    /// the room is given back; see [`Committed`] for what `Ok` says.
    pub fn write_commit(
        &self,
        r: &Reservation,
        crc: u32,
        fua: bool,
    ) -> Result<Committed, CacheError> {
        self.commit_over(r, crc, fua, None, &mut || {})
    }

    /// [`Cache::write_commit`], running `on_insert` under the subtree's lock
    /// as the key goes in: what it records is in the order the index took the
    /// keys, with commits made outside the engine beside
    /// ([`super::WritePath::commit_with`]).
    pub fn write_commit_with(
        &self,
        r: &Reservation,
        crc: u32,
        fua: bool,
        on_insert: &mut dyn FnMut(),
    ) -> Result<Committed, CacheError> {
        self.commit_over(r, crc, fua, None, on_insert)
    }

    /// [`Cache::write_commit`]; with `over`, only if what it names still
    /// covers all of the key's range (see [`Over`]). `Err` (nothing
    /// committed) gives the room back.
    pub(crate) fn commit_over(
        &self,
        r: &Reservation,
        crc: u32,
        fua: bool,
        over: Option<Over>,
        on_insert: &mut dyn FnMut(),
    ) -> Result<Committed, CacheError> {
        // Other writes may have taken keys since the reservation.
        if self.index.free_nodes() < 2 {
            self.write_cancel(r);
            return Err(CacheError::Busy("key pool exhausted"));
        }
        // `data_crc` was switched on since the reservation, and the media flag may
        // be set already: every key logged from now on needs its CRC. The log
        // says so (`crc_wanted`), and says it again under the kset's lock as
        // the key goes in: a switch between the two has the key's CRC
        // computed then.
        let mut add_crc = !r.crc && self.log.crc_wanted();
        loop {
            let crc = if add_crc {
                match self.data_crc_at(r.pos, r.len) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        self.write_cancel(r);
                        return Err(e);
                    }
                }
            } else {
                r.crc.then_some(crc)
            };
            let key = r.key(crc);
            // FUA covers every key of the request: each chunk's kset is persisted.
            // A commit that did not get its key in gives the room back; one that
            // got it in keeps it (the key holds it).
            match self.key_commit(&key, fua, over, on_insert) {
                Ok(committed) => return Ok(committed),
                Err(CacheError::Invalid(KEY_WITHOUT_CRC)) if !add_crc && !r.crc => add_crc = true,
                Err(e) => {
                    self.write_cancel(r);
                    return Err(e);
                }
            }
        }
    }

    /// Gives back the room of a reservation that will not be committed.
    pub fn write_cancel(&self, r: &Reservation) {
        self.seg_put(r.pos.seg);
    }

    /// `REQ_OP_DISCARD`: drops every cached key in `off..off + len`, dirty ones
    /// too. A discarded range's content is undefined until it is written again,
    /// so neither reads nor writeback need that data: writeback skips a logged
    /// dirty key that nothing in the index covers any more (see
    /// [`Cache::writeback_plan`]). Nothing is logged, so the on-media format is
    /// upstream's: after a crash, replay brings the dropped keys back (and
    /// writeback then copies the dirty ones), which a discard allows.
    pub fn discard(&self, off: u64, len: u64) -> Result<(), CacheError> {
        off.checked_add(len)
            .filter(|&e| e <= self.dev_bytes)
            .ok_or(CacheError::Invalid("discard beyond the backing device"))?;
        self.in_flight.with(|f| f.contest(off, off + len));
        self.drop_range(off, len)
    }

    /// Drops every key in `off..off + len` from the index (trimming the keys
    /// that stick out); logs nothing.
    pub(crate) fn drop_range(&self, off: u64, len: u64) -> Result<(), CacheError> {
        let end = off.saturating_add(len).min(self.dev_bytes);
        let mut cur = off;
        while cur < end {
            let (_, to) = self.stripe(cur, end)?;
            if self.index.clear(cur, to).is_err() {
                return Err(CacheError::Busy("key pool exhausted"));
            }
            cur = to;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `off`: hits from pmem, misses from the backing
    /// device. With `cache_misses`, data read from the backing device is inserted
    /// as clean keys (best effort). A hit whose data fails its CRC is an IO error.
    pub fn read(
        &self,
        off: u64,
        buf: &mut [u8],
        cache_misses: bool,
        cpu: usize,
    ) -> Result<ReadResult, CacheError> {
        let misses = if cache_misses && self.mode().caches_misses() {
            Misses::ReadAndCache(cpu)
        } else {
            Misses::Read
        };
        self.read_with(off, buf, misses)
            .map(|r| r.unwrap_or_default())
    }

    /// Read `buf.len()` bytes at `off` if the cache holds all of them, without
    /// touching the backing device; `Ok(None)` at the first gap (`buf` then
    /// holds some of the hits). For callers that cannot wait for the backing
    /// device (device-mapper's `map`) and hand the request on when it misses.
    pub fn read_cached(&self, off: u64, buf: &mut [u8]) -> Result<Option<ReadResult>, CacheError> {
        self.read_with(off, buf, Misses::Stop)
    }

    fn read_with<S: Sink + ?Sized>(
        &self,
        off: u64,
        buf: &mut S,
        misses: Misses,
    ) -> Result<Option<ReadResult>, CacheError> {
        self.check_range(off, buf.len())?;
        let end = off + buf.len() as u64;
        let mut res = ReadResult::default();
        let mut cur = off;
        while cur < end {
            let (sub, to) = self.stripe(cur, end)?;
            let found = self.index.read_overlap(sub, cur, to);
            let (hit, seg_end) = match found {
                Some(k) if k.off <= cur => (Some(k), to.min(k.end())),
                Some(k) => (None, k.off),
                None => (None, to),
            };
            let b0 = (cur - off) as usize;
            let n = (seg_end - cur) as usize;
            match hit {
                Some(k) if self.key_stale(&k) => {
                    // The segment was reclaimed: drop the key and look again.
                    self.index.remove_if(sub, k.off, |x| *x == k);
                    continue;
                }
                // A placeholder holds no data: the range is a miss.
                Some(k) if !k.empty() => {
                    // Pinned, so that GC does not hand its segment out while
                    // the data is copied.
                    if !self.seg_map.pin_current(&self.pmem, &k) {
                        continue;
                    }
                    let read = self.read_hit(&k, cur, buf, b0, n);
                    self.pmem.unpin(k.pos.seg.get());
                    read?;
                    res.hit_bytes += n as u64;
                }
                _ => {
                    if misses == Misses::Stop {
                        return Ok(None);
                    }
                    // Cached as a read miss the caller sends itself is: a
                    // placeholder first, which a write meanwhile replaces, and
                    // the data only where it still covers the range.
                    let tag = match misses {
                        Misses::ReadAndCache(_) => self.place_unless_through(cur, n as u32),
                        _ => 0,
                    };
                    let gap = Gap {
                        off: cur,
                        at: 0,
                        len: n,
                        tag,
                    };
                    let mut at = cur;
                    let backing = &self.backing;
                    let read = buf.pieces_mut(b0, n, &mut |p| {
                        backing.read(at, p)?;
                        at += p.len() as u64;
                        Ok(())
                    });
                    if read.is_err() {
                        self.read_failed(&gap);
                        return Err(CacheError::Io("backing device read failed"));
                    }
                    res.miss_bytes += n as u64;
                    if let Misses::ReadAndCache(cpu) = misses {
                        let part = Part {
                            data: &*buf,
                            at: b0,
                            len: n,
                        };
                        self.fill_now(&gap, &part, cpu);
                    }
                }
            }
            cur = seg_end;
        }
        if res.hit_bytes > 0 {
            self.stats.inc(Counter::ReadHits);
        }
        if res.miss_bytes > 0 {
            self.stats.inc(Counter::ReadMisses);
        }
        Ok(Some(res))
    }

    /// Starts a read that may miss, for a caller that sends the misses to the
    /// backing device itself, all at once, without the engine (the kernel
    /// clones the bio per gap). Describes each gap in `gaps` and each hit in
    /// `hits`, for the caller to copy outside the engine (a hit of a key
    /// whose CRC is still to be checked carries the check: [`copy_hits`] runs
    /// it, [`Cache::read_verified`] records it); hits beyond what `hits` holds
    /// are copied (and checked) into `dst` here. `None` (with no placeholder and no hit left
    /// behind) when there are more gaps than `gaps` holds.
    ///
    /// When the mode caches misses, each gap gets a placeholder: an
    /// [`KEY_FLAGS_EMPTY`] key tagged with [`Gap::tag`], which reads treat as a
    /// miss. A write to the range while the gap is out replaces (part of) it, so
    /// [`Cache::read_fill`] later caches the backing device's data only where
    /// nothing newer came meanwhile (upstream's EMPTY keys).
    pub fn read_start<S: Sink + ?Sized>(
        &self,
        off: u64,
        dst: &mut S,
        gaps: &mut [Gap],
        hits: &mut [Hit],
    ) -> Result<Option<Started>, CacheError> {
        self.read_from(off, off, dst, gaps, hits, false)
    }

    /// [`Cache::read_start`] of `dst` (at `off`) from `from` on, that stops
    /// once `hits` is full rather than copy more hits itself
    /// ([`Started::next`]): the caller copies them, gives them back, and
    /// resumes there, with the room left in its gaps. Each call's gaps and
    /// hits are its own: a call that fails or returns `None` gives up only
    /// those, and the caller gives up what earlier calls placed
    /// ([`Cache::read_cancel`]). A key whose CRC is still to be checked is a
    /// hit like any other, with its check, as in `read_start`.
    pub fn read_resume<S: Sink + ?Sized>(
        &self,
        off: u64,
        from: u64,
        dst: &mut S,
        gaps: &mut [Gap],
        hits: &mut [Hit],
    ) -> Result<Option<Started>, CacheError> {
        self.read_from(off, from, dst, gaps, hits, !hits.is_empty())
    }

    fn read_from<S: Sink + ?Sized>(
        &self,
        off: u64,
        from: u64,
        dst: &mut S,
        gaps: &mut [Gap],
        hits: &mut [Hit],
        stop_when_full: bool,
    ) -> Result<Option<Started>, CacheError> {
        self.check_range(off, dst.len())?;
        let end = off + dst.len() as u64;
        if from < off || from > end {
            return Err(CacheError::Invalid("read resumed outside the read"));
        }
        let place = self.mode().caches_misses();
        let mut out = Started::default();
        let mut cur = from;
        while cur < end {
            let (sub, to) = match self.stripe(cur, end) {
                Ok(s) => s,
                Err(e) => return Err(self.read_unwind(gaps, hits, &out, e)),
            };
            let found = self.index.read_overlap(sub, cur, to);
            let (hit, seg_end) = match found {
                Some(k) if k.off <= cur => (Some(k), to.min(k.end())),
                Some(k) => (None, k.off),
                None => (None, to),
            };
            let at = (cur - off) as usize;
            let len = (seg_end - cur) as usize;
            match hit {
                Some(k) if self.key_stale(&k) => {
                    self.index.remove_if(sub, k.off, |x| *x == k);
                    continue;
                }
                Some(k) if !k.empty() => {
                    if stop_when_full && out.hits == hits.len() {
                        break;
                    }
                    // A key to check goes out with its check, which the copy
                    // runs without the lock; with no room left for it (only
                    // `read_start`), it is copied and checked here.
                    let hit = match Hit::of_key(&self.geo, &self.seg_map, &k, cur, at, len) {
                        Ok(h) => h,
                        Err(e) => return Err(self.read_unwind(gaps, hits, &out, e)),
                    };
                    // Pinned, and only then checked current: GC does not
                    // hand the segment out again until the pin goes.
                    if !self.seg_map.pin_current(&self.pmem, &k) {
                        continue;
                    }
                    match hits.get_mut(out.hits) {
                        Some(h) => {
                            *h = hit;
                            out.hits += 1;
                        }
                        None => {
                            let read = self.read_hit(&k, cur, dst, at, len);
                            self.pmem.unpin(k.pos.seg.get());
                            if let Err(e) = read {
                                return Err(self.read_unwind(gaps, hits, &out, e));
                            }
                        }
                    }
                    out.res.hit_bytes += len as u64;
                }
                _ => {
                    let Some(gap) = gaps.get_mut(out.gaps) else {
                        self.read_unwind(gaps, hits, &out, CacheError::Busy("gaps"));
                        return Ok(None);
                    };
                    // A write through in flight may or may not be on the
                    // backing device yet: what the read brings back is not cached.
                    let tag = if place {
                        self.place_unless_through(cur, len as u32)
                    } else {
                        0
                    };
                    *gap = Gap {
                        off: cur,
                        at,
                        len,
                        tag,
                    };
                    out.gaps += 1;
                    out.res.miss_bytes += len as u64;
                }
            }
            cur = seg_end;
        }
        out.next = cur;
        if out.res.hit_bytes > 0 {
            self.stats.inc(Counter::ReadHits);
        }
        if out.res.miss_bytes > 0 {
            self.stats.inc(Counter::ReadMisses);
        }
        Ok(Some(out))
    }

    /// Gives back what a read started: the placeholders of its gaps and the
    /// segment references of its hits; returns `e`.
    fn read_unwind(
        &self,
        gaps: &[Gap],
        hits: &[Hit],
        started: &Started,
        e: CacheError,
    ) -> CacheError {
        self.read_cancel(
            gaps.get(..started.gaps).unwrap_or_default(),
            hits.get(..started.hits).unwrap_or_default(),
        );
        e
    }

    /// A started read fails (its hits could not be copied, or a gap could not
    /// be read): gives up the placeholders of `gaps` and the pins of `hits`.
    pub fn read_cancel(&self, gaps: &[Gap], hits: &[Hit]) {
        for gap in gaps {
            self.read_abandon(gap);
        }
        self.read_done(hits);
    }

    /// The caller copied `hits` (or gave up): their segments may go (see
    /// [`release_hits`], which needs no lock).
    pub fn read_done(&self, hits: &[Hit]) {
        release_hits(&self.pmem, hits);
    }

    /// A placeholder over `off..off + len` (one subtree); its tag, 0 if the key
    /// pool has no room, or clean data is to leave the last keys to writes, or
    /// a write through in flight overlaps it (the backing device may hold its
    /// data or not yet: what a read brings back is not cached). Placed under
    /// the lock of the writes in flight, so that a write through that starts
    /// after the look drops it ([`Cache::through_start`]).
    fn place_unless_through(&self, off: u64, len: u32) -> u32 {
        if self.key_pressure() {
            return 0;
        }
        self.in_flight.with(|f| {
            if f.overlaps(off, off + u64::from(len)) {
                return 0;
            }
            let tag = self.space.next_tag();
            place(&self.index, off, len, tag)
        })
    }

    /// The backing device's data for `gap` arrived: `src[gap.at..]` holds it.
    /// Caches it as clean keys through data head `cpu` wherever the gap's
    /// placeholder is still in the index (best effort: a full cache leaves the
    /// rest uncached, and clean data never takes the last keys from writes),
    /// and gives up the placeholder. All under the lock: the module copies
    /// without it ([`Cache::fill_start`]).
    pub fn read_fill<S: Source + ?Sized>(&self, gap: &Gap, src: &S, cpu: usize) {
        self.fill_now(gap, src, cpu);
    }

    /// A fill made outside the engine gave back the last reference on
    /// `seg` (see [`super::WritePath::fill`]): the segment goes, as
    /// [`Cache::write_cancel`] would have let it.
    pub fn segment_released(&self, seg: SegId) {
        self.held(|h| h.seg_invalidate(seg));
    }

    /// The backing device failed to read `gap`: counts the error and gives the
    /// placeholder up.
    pub fn read_failed(&self, gap: &Gap) {
        self.stats.inc(Counter::BackingErrors);
        self.read_abandon(gap);
    }

    /// Drops what is left of `gap`'s placeholder (the miss failed, or was filled).
    pub fn read_abandon(&self, gap: &Gap) {
        abandon_placeholder(&self.index, gap);
    }

    /// Calls `f(self, subtree, piece)` on each piece of `gap`'s placeholder still
    /// in the index, in order, until it returns false.
    pub(crate) fn each_placeholder(
        &self,
        gap: &Gap,
        mut f: impl FnMut(&Self, usize, &Key) -> bool,
    ) {
        if gap.tag == 0 {
            return;
        }
        let end = gap.off + gap.len as u64;
        let mut cur = gap.off;
        while cur < end {
            let Ok((sub, to)) = self.stripe(cur, end) else {
                return;
            };
            let Some(k) = self.index.first_overlap(sub, cur, to) else {
                return;
            };
            if k.placeholder_of(gap.tag) && !f(self, sub, &k) {
                return;
            }
            cur = k.end().max(cur + 1);
        }
    }

    pub(crate) fn key_stale(&self, k: &Key) -> bool {
        self.seg_map.stale(k)
    }

    /// [`copy_hits`] checked `hits` (those that carry a check) and they
    /// passed: marks each key verified (see [`mark_verified`]).
    pub fn read_verified(&self, hits: &[Hit]) {
        mark_verified(&self.index, hits);
    }

    /// [`copy_hits`] found data that failed its CRC check: counts it (the
    /// caller fails the read and gives its hits and gaps back).
    pub fn read_crc_failed(&self) {
        self.stats.inc(Counter::CrcErrors);
    }

    /// Reads `dst[at..at + n]` from key `k` at logical offset `cur`. A key whose
    /// CRC was not checked since attach is checked first, over its whole CRC
    /// extent, and marked verified (see [`KEY_FLAGS_VERIFIED`]): a partial read
    /// of a large extent pays for the extent once, not on every read.
    fn read_hit<S: Sink + ?Sized>(
        &self,
        k: &Key,
        cur: u64,
        dst: &mut S,
        at: usize,
        n: usize,
    ) -> Result<(), CacheError> {
        let addr = self.pos_addr(k.pos) + (cur - k.off);
        let verified = |c: &Self| {
            if let Some(sub) = c.index.subtree_of(k.off) {
                c.index.add_flags(sub, k.off, KEY_FLAGS_VERIFIED);
            }
        };
        let exact = k.crc_exact(cur, n);
        if k.unverified() && !exact {
            let start = k.crc_start().ok_or(CacheError::Io("key crc range"))?;
            let crc = self.data_crc_at(start, k.crc_len)?;
            if crc != k.crc {
                self.stats.inc(Counter::CrcErrors);
                return Err(CacheError::Io("cached data failed its crc check"));
            }
            verified(self);
        }
        // One copy, pmem to `dst`. When the read is exactly the extent the CRC
        // covers (a block read of a block write), the check runs over the copy.
        let check = k.unverified() && exact;
        let mut crc = PCACHE_CRC_SEED;
        let mut from = addr;
        let pmem = &self.pmem;
        let copied = dst.pieces_mut(at, n, &mut |p| {
            if check {
                crc = pmem.read_crc(from, p, crc)?;
            } else {
                pmem.read(from, p)?;
            }
            from += p.len() as u64;
            Ok(())
        });
        if copied.is_err() {
            return Err(CacheError::Io("pmem media error"));
        }
        if check {
            if crc != k.crc {
                // Hand out none of the data that failed.
                let _ = dst.pieces_mut(at, n, &mut |p| {
                    p.fill(0);
                    Ok(())
                });
                self.stats.inc(Counter::CrcErrors);
                return Err(CacheError::Io("cached data failed its crc check"));
            }
            verified(self);
        }
        Ok(())
    }

    /// One step of the pass that drops the keys of reclaimed segments from
    /// the index (upstream `clean_fn`): looks at the next
    /// [`CLEAN_KEYS_PER_STEP`] keys. A segment GC frees starts a pass (or
    /// another, after the one under way). `None` when no pass is under way;
    /// otherwise how many keys the step dropped.
    ///
    /// Stale keys cost only their nodes: reads and writeback skip them by
    /// generation. So the pass goes a step per hold of the control lock rather
    /// than scan the whole index in one, which held every request up for the
    /// length of the index each time a segment was freed.
    pub fn clean_step(&self) -> Option<usize> {
        self.held(|h| {
            let (sub, from) = match h.t.clean_at {
                Some(at) => at,
                None if h.need_clean.swap(false, Ordering::Relaxed) => (0, 0),
                None => return None,
            };
            let (index, seg_map) = (&h.c.index, &h.c.seg_map);
            let (next, removed) =
                index.retain_from(sub, from, CLEAN_KEYS_PER_STEP, |k| seg_map.stale(k));
            h.t.clean_at = next;
            Some(removed)
        })
    }

    /// Runs the clean pass to its end (tests, the offline tool, [`Cache::gc_all`]).
    pub fn clean_all(&self) -> usize {
        let mut removed = 0;
        while let Some(n) = self.clean_step() {
            removed += n;
        }
        removed
    }
}

impl Hit {
    /// The hit of `len` bytes of key `k` at logical offset `cur`, going to
    /// `at` in the read's data, with the key's CRC check if it is still due.
    /// Its segment is not pinned yet.
    pub(crate) fn of_key<M: Memory>(
        geo: &Geometry,
        seg_map: &SegMap<M>,
        k: &Key,
        cur: u64,
        at: usize,
        len: usize,
    ) -> Result<Hit, CacheError> {
        let check = if k.unverified() {
            let start = k.crc_start().ok_or(CacheError::Io("key crc range"))?;
            Some(HitCheck {
                key_off: k.off,
                pos: k.pos,
                gen: k.gen,
                crc: k.crc,
                start: seg_map.addr(geo, start),
                len: k.crc_len,
                exact: k.crc_exact(cur, len),
            })
        } else {
            None
        };
        Ok(Hit {
            addr: seg_map.addr(geo, k.pos) + (cur - k.off),
            at,
            len,
            seg: Some(k.pos.seg),
            check,
        })
    }
}

/// Places a read-miss placeholder tagged `tag` over `off..off + len` (one
/// subtree) if the index holds nothing there; the tag, or 0.
pub(crate) fn place<M: Memory>(index: &Index<M>, off: u64, len: u32, tag: u32) -> u32 {
    let hole = Key {
        off,
        len,
        flags: KEY_FLAGS_EMPTY,
        crc: tag,
        ..Key::default()
    };
    match index.insert_vacant(hole) {
        Ok(true) => tag,
        Ok(false) | Err(_) => 0,
    }
}

/// Drops what is left of `gap`'s placeholder: index only, each piece looked
/// at and dropped in one hold of its subtree's lock (a commit may come
/// between two pieces, not within one).
pub(crate) fn abandon_placeholder<M: Memory>(index: &Index<M>, gap: &Gap) {
    if gap.tag == 0 {
        return;
    }
    let end = gap.off + gap.len as u64;
    let mut cur = gap.off;
    while cur < end {
        let Some((sub, to)) = index.stripe(cur, end) else {
            return;
        };
        let Some(k) = index.first_overlap(sub, cur, to) else {
            return;
        };
        index.remove_if(sub, k.off, |x| x.placeholder_of(gap.tag));
        cur = k.end().max(cur + 1);
    }
}

/// [`copy_hits`] checked `hits` (those that carry a check) and they passed:
/// marks each key verified, if the index still holds the key the read found.
/// One that was trimmed at the front or replaced meanwhile is checked again by
/// the next read of it. Needs only the subtree locks.
pub(crate) fn mark_verified<M: Memory>(trees: &Trees<M>, hits: &[Hit]) {
    for c in hits.iter().filter_map(|h| h.check) {
        let Some(sub) = trees.subtree_of(c.key_off) else {
            continue;
        };
        let same = trees
            .first_overlap(sub, c.key_off, c.key_off + 1)
            .is_some_and(|k| {
                k.off == c.key_off && k.pos == c.pos && k.gen == c.gen && k.crc == c.crc
            });
        if same {
            trees.add_flags(sub, c.key_off, KEY_FLAGS_VERIFIED);
        }
    }
}
