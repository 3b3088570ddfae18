//! The request path: writes into the cache, reads from cache and backing device,
//! and data-head allocation (upstream `cache_req.c`).

use super::env::{Backing, Pmem};
use super::error::CacheError;
use super::key::{Key, Pos, KEY_FLAGS_VERIFIED};
use super::{Cache, Memory, Mode};
use crate::meta::crc32c::PCACHE_CRC_SEED;
use crate::meta::kset::{KEY_FLAGS_CLEAN, KEY_FLAGS_DATA_CRC, KEY_FLAGS_EMPTY};
use crate::meta::layout::SUBTREE_SIZE;

/// What a read found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadResult {
    pub hit_bytes: u64,
    pub miss_bytes: u64,
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

/// Segments a data head keeps free for the key log, so closing a kset can always
/// find a segment even when data filled the cache.
const LOG_RESERVE_SEGS: u32 = 1;

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// The subtree of `cur` and where the range up to `end` leaves it (keys and
    /// requests are cut at subtree boundaries, every 4 MiB).
    pub(crate) fn stripe(&self, cur: u64, end: u64) -> Result<(usize, u64), CacheError> {
        let sub = self
            .index
            .subtree_of(cur)
            .ok_or(CacheError::Invalid("offset beyond the backing device"))?;
        let stripe_end =
            ((cur >> crate::meta::layout::SUBTREE_SHIFT) + 1) << crate::meta::layout::SUBTREE_SHIFT;
        Ok((sub, end.min(stripe_end)))
    }

    fn check_range(&self, off: u64, len: usize) -> Result<(), CacheError> {
        let end = off
            .checked_add(len as u64)
            .ok_or(CacheError::Invalid("range overflows"))?;
        if end > self.dev_bytes {
            return Err(CacheError::Invalid("request beyond the backing device"));
        }
        Ok(())
    }

    /// `cache_data_alloc`: room for up to `len` bytes from data head `cpu`; may be
    /// shorter when the head's segment runs out. Takes a segment reference.
    fn data_alloc(&mut self, cpu: usize, len: u32) -> Result<(Pos, u64, u32), CacheError> {
        let h = cpu % self.heads.len().max(1);
        let data_size = self.geo.seg_data_size();
        loop {
            let cur = self.heads.get(h).and_then(|d| d.pos);
            match cur {
                Some(pos) => {
                    let remain = data_size - pos.off;
                    let gen = self.seg(pos.seg).gen;
                    self.seg_get(pos.seg);
                    if remain > len {
                        if let Some(d) = self.heads.get_mut(h) {
                            d.pos = Some(Pos {
                                seg: pos.seg,
                                off: pos.off + len,
                            });
                        }
                        return Ok((pos, gen, len));
                    }
                    // Take the rest of the segment; the head lets go of it.
                    if let Some(d) = self.heads.get_mut(h) {
                        d.pos = None;
                    }
                    self.seg_put(pos.seg);
                    return Ok((pos, gen, remain));
                }
                None => {
                    if self.free_segs() <= LOG_RESERVE_SEGS {
                        return Err(CacheError::Busy("cache full"));
                    }
                    let seg = self
                        .get_cache_segment()
                        .ok_or(CacheError::Busy("cache full"))?;
                    self.seg_get(seg);
                    if let Some(d) = self.heads.get_mut(h) {
                        d.pos = Some(Pos { seg, off: 0 });
                    }
                }
            }
        }
    }

    /// Writes `data` at `off` as the cache mode says (see [`super::mode`]). In
    /// writeback and writeonly mode: copies it into the cache as one or more
    /// keys and logs them; with `fua` the keys' ksets are persisted before
    /// returning; on `Err` some leading part may already be cached (as
    /// upstream). In the modes that write through, the backing device holds the
    /// data when this returns `Ok` (with `fua`, durably), and on `Err` the cache
    /// holds none of the range.
    pub fn write(
        &mut self,
        off: u64,
        data: &[u8],
        fua: bool,
        cpu: usize,
    ) -> Result<(), CacheError> {
        self.check_range(off, data.len())?;
        let len = data.len() as u64;
        match self.mode() {
            Mode::Writeback | Mode::Writeonly => self.insert_data(off, data, 0, fua, cpu),
            Mode::Writethrough => {
                // The cache first, so that a read meanwhile finds the new data; its keys
                // are clean, and need no persisting (see `super::mode`).
                if let Err(e) = self.insert_data(off, data, KEY_FLAGS_CLEAN, false, cpu) {
                    self.drop_range(off, len)?;
                    return Err(e);
                }
                self.write_backing(off, data, fua)
            }
            Mode::Writearound => {
                self.drop_range(off, len)?;
                self.write_backing(off, data, fua)
            }
        }
    }

    /// Writes through to the backing device (flushing it for `fua`). On a
    /// failure the cache gives up what it holds of the range: it must not serve
    /// data the backing device may not have.
    fn write_backing(&mut self, off: u64, data: &[u8], fua: bool) -> Result<(), CacheError> {
        let written =
            self.backing
                .write(off, data)
                .and_then(|()| if fua { self.backing.flush() } else { Ok(()) });
        if written.is_err() {
            self.stats.backing_errors += 1;
            self.drop_range(off, data.len() as u64)?;
            return Err(CacheError::Io("backing device write failed"));
        }
        Ok(())
    }

    fn insert_data(
        &mut self,
        off: u64,
        data: &[u8],
        flags: u32,
        fua: bool,
        cpu: usize,
    ) -> Result<(), CacheError> {
        if self.crc_flag_pending {
            self.sync_crc_flag();
        }
        let mut done = 0usize;
        while done < data.len() {
            let koff = off + done as u64;
            let to_stripe = SUBTREE_SIZE - (koff & (SUBTREE_SIZE - 1));
            let want = ((data.len() - done) as u64).min(to_stripe) as u32;
            if self.index.free_nodes() < 2 {
                return Err(CacheError::Busy("key pool exhausted"));
            }
            self.kset_room(koff)?;
            let (pos, gen, len) = self.data_alloc(cpu, want)?;
            let chunk = data
                .get(done..done + len as usize)
                .ok_or(CacheError::Invalid("chunk"))?;
            let addr = self.pos_addr(pos);
            // No fence here: only a kset makes the data reachable, and closing
            // one fences before the kset is stored (see `kset_close`).
            self.pmem.write(addr, chunk);
            self.pmem.flush(addr, u64::from(len));
            let (crc, flags) = if self.data_crc {
                (
                    self.pmem.crc32c(PCACHE_CRC_SEED, chunk),
                    flags | KEY_FLAGS_DATA_CRC,
                )
            } else {
                (0, flags)
            };
            let key = Key {
                off: koff,
                len,
                flags,
                pos,
                gen,
                crc,
                crc_back: 0,
                crc_len: len,
            };
            if self.index.insert(key, |_| {}).is_err() {
                self.seg_put(pos.seg);
                return Err(CacheError::Busy("key pool exhausted"));
            }
            done += len as usize;
            let last = done == data.len();
            self.key_append(&key, fua && last)?;
            if fua && !last {
                // FUA covers every key of the request.
                let id = self.kset_id(koff);
                self.kset_close(id)?;
            }
        }
        Ok(())
    }

    /// `REQ_OP_DISCARD`: drops every cached key in `off..off + len`, dirty ones
    /// too. A discarded range's content is undefined until it is written again,
    /// so neither reads nor writeback need that data: writeback skips a logged
    /// dirty key that nothing in the index covers any more (see
    /// [`Cache::writeback_plan`]). Nothing is logged, so the on-media format is
    /// upstream's: after a crash, replay brings the dropped keys back (and
    /// writeback then copies the dirty ones), which a discard allows.
    pub fn discard(&mut self, off: u64, len: u64) -> Result<(), CacheError> {
        off.checked_add(len)
            .filter(|&e| e <= self.dev_bytes)
            .ok_or(CacheError::Invalid("discard beyond the backing device"))?;
        self.drop_range(off, len)
    }

    /// Drops every key in `off..off + len` from the index (trimming the keys
    /// that stick out); logs nothing.
    fn drop_range(&mut self, off: u64, len: u64) -> Result<(), CacheError> {
        let end = off.saturating_add(len).min(self.dev_bytes);
        let mut cur = off;
        while cur < end {
            let (sub, to) = self.stripe(cur, end)?;
            // A placeholder over the range resolves every overlap (trimming the
            // keys that stick out), then goes itself.
            let hole = Key {
                off: cur,
                len: (to - cur) as u32,
                flags: KEY_FLAGS_EMPTY,
                ..Key::default()
            };
            if self.index.insert(hole, |_| {}).is_err() {
                return Err(CacheError::Busy("key pool exhausted"));
            }
            self.index.remove(sub, cur);
            cur = to;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `off`: hits from pmem, misses from the backing
    /// device. With `cache_misses`, data read from the backing device is inserted
    /// as clean keys (best effort). A hit whose data fails its CRC is an IO error.
    pub fn read(
        &mut self,
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
    pub fn read_cached(
        &mut self,
        off: u64,
        buf: &mut [u8],
    ) -> Result<Option<ReadResult>, CacheError> {
        self.read_with(off, buf, Misses::Stop)
    }

    fn read_with(
        &mut self,
        off: u64,
        buf: &mut [u8],
        misses: Misses,
    ) -> Result<Option<ReadResult>, CacheError> {
        self.check_range(off, buf.len())?;
        let end = off + buf.len() as u64;
        let mut res = ReadResult::default();
        let mut cur = off;
        while cur < end {
            let (sub, to) = self.stripe(cur, end)?;
            let found = self.index.first_overlap(sub, cur, to);
            let (hit, seg_end) = match found {
                Some(k) if k.off <= cur => (Some(k), to.min(k.end())),
                Some(k) => (None, k.off),
                None => (None, to),
            };
            let b0 = (cur - off) as usize;
            let b1 = (seg_end - off) as usize;
            let out = buf.get_mut(b0..b1).ok_or(CacheError::Invalid("buffer"))?;
            match hit {
                Some(k) if self.key_stale(&k) => {
                    // The segment was reclaimed: drop the key and look again.
                    self.index.remove(sub, k.off);
                    continue;
                }
                Some(k) => {
                    self.read_hit(&k, cur, out)?;
                    res.hit_bytes += out.len() as u64;
                }
                None => {
                    if misses == Misses::Stop {
                        return Ok(None);
                    }
                    if self.backing.read(cur, out).is_err() {
                        self.stats.backing_errors += 1;
                        return Err(CacheError::Io("backing device read failed"));
                    }
                    res.miss_bytes += out.len() as u64;
                    if let Misses::ReadAndCache(cpu) = misses {
                        // Best effort: a full cache simply does not cache this read,
                        // and clean data never takes the last keys from writes.
                        if !self.key_pressure() {
                            let _ = self.insert_data(cur, out, KEY_FLAGS_CLEAN, false, cpu);
                        }
                    }
                }
            }
            cur = seg_end;
        }
        if res.hit_bytes > 0 {
            self.stats.read_hits += 1;
        }
        if res.miss_bytes > 0 {
            self.stats.read_misses += 1;
        }
        Ok(Some(res))
    }

    pub(crate) fn key_stale(&self, k: &Key) -> bool {
        !k.empty() && k.gen < self.seg(k.pos.seg).gen
    }

    /// Reads `out` from key `k` at logical offset `cur`. A key whose CRC was not
    /// checked since attach is checked first, over its whole CRC extent, and
    /// marked verified (see [`KEY_FLAGS_VERIFIED`]): a partial read of a large
    /// extent pays for the extent once, not on every read.
    fn read_hit(&mut self, k: &Key, cur: u64, out: &mut [u8]) -> Result<(), CacheError> {
        let addr = self.pos_addr(k.pos) + (cur - k.off);
        let verified = |c: &mut Self| {
            if let Some(sub) = c.index.subtree_of(k.off) {
                c.index.add_flags(sub, k.off, KEY_FLAGS_VERIFIED);
            }
        };
        if k.unverified()
            && k.crc_back == 0
            && cur == k.off
            && out.len() as u64 == u64::from(k.crc_len)
        {
            // The read is exactly the extent the CRC covers (a block read of a
            // block write): copy once and check the copy.
            self.pmem
                .read(addr, out)
                .map_err(|_| CacheError::Io("pmem media error"))?;
            if self.pmem.crc32c(PCACHE_CRC_SEED, out) != k.crc {
                out.fill(0);
                self.stats.crc_errors += 1;
                return Err(CacheError::Io("cached data failed its crc check"));
            }
            verified(self);
            return Ok(());
        }
        if k.unverified() {
            let start = Pos {
                seg: k.pos.seg,
                off: k
                    .pos
                    .off
                    .checked_sub(k.crc_back)
                    .ok_or(CacheError::Io("key crc range"))?,
            };
            let crc = self.data_crc_at(start, k.crc_len)?;
            if crc != k.crc {
                self.stats.crc_errors += 1;
                return Err(CacheError::Io("cached data failed its crc check"));
            }
            verified(self);
        }
        self.pmem
            .read(addr, out)
            .map_err(|_| CacheError::Io("pmem media error"))
    }

    /// Drop keys whose segment was reclaimed (upstream `clean_fn`).
    pub fn clean(&mut self) -> usize {
        if !self.need_clean {
            return 0;
        }
        self.need_clean = false;
        let Cache { index, segs, .. } = self;
        index.retain(|k| {
            !k.empty()
                && segs
                    .get(k.pos.seg.index())
                    .map(|s| k.gen < s.gen)
                    .unwrap_or(true)
        })
    }
}
