//! Open ksets and the key log head (upstream `cache_key_append` /
//! `cache_kset_close`).
//!
//! Closing a kset persists, in this order: the data of its keys (stored and
//! flushed by the write path, fenced here) together with an empty header after
//! the kset's place (so replay stops there), then the kset with its CRC. Each
//! step is flushed and fenced before the next, so one close costs two fences
//! however many keys it logs, so a crash can never leave a valid kset followed by a
//! stale one from an earlier pass over the segment. When the segment is too full
//! for the kset plus a LAST kset, the log moves to a fresh segment: the new
//! segment's first header is cleared, then the LAST kset pointing at it is written.

use super::env::{persist, Backing, Pmem};
use super::error::CacheError;
use super::key::{Key, Pos, KEY_FLAGS_VERIFIED};
use super::{Cache, Memory};
use crate::meta::kset::{
    encode_last_kset, kset_key, kset_size, seal_kset, KeyOnmedia, KEY_FLAGS_CLEAN,
    KEY_FLAGS_DATA_CRC, KEY_FLAGS_EMPTY, KEY_ONMEDIA_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX,
    KSET_ONMEDIA_SIZE_MAX,
};

/// An open kset: keys encoded in place, ready to be sealed and copied to pmem.
#[derive(Clone)]
pub struct KsetBuf {
    key_num: usize,
    /// Some key in it has no data CRC (see [`Cache::set_data_crc`]).
    nocrc: bool,
    buf: [u8; KSET_ONMEDIA_SIZE_MAX],
}

impl Default for KsetBuf {
    fn default() -> Self {
        KsetBuf {
            key_num: 0,
            nocrc: false,
            buf: [0u8; KSET_ONMEDIA_SIZE_MAX],
        }
    }
}

impl KsetBuf {
    pub fn reset(&mut self) {
        self.key_num = 0;
        self.nocrc = false;
    }
    pub fn key_num(&self) -> usize {
        self.key_num
    }
    /// Holds a key without a data CRC.
    pub fn has_nocrc(&self) -> bool {
        self.nocrc
    }
    pub fn is_full(&self) -> bool {
        self.key_num >= KSET_KEYS_MAX
    }
    /// Bytes of the dirty keys in it (for the invariants); `None` if one does not decode.
    pub fn dirty_bytes(&self) -> Option<u64> {
        let mut sum = 0u64;
        for i in 0..self.key_num {
            let k = kset_key(&self.buf, i).ok()?;
            if k.flags & (KEY_FLAGS_CLEAN | KEY_FLAGS_EMPTY) == 0 {
                sum += u64::from(k.len);
            }
        }
        Some(sum)
    }
    /// Encode `key` as the next key. Returns false when full.
    pub fn push(&mut self, key: &KeyOnmedia) -> bool {
        if self.is_full() {
            return false;
        }
        let start = kset_size(self.key_num);
        match self.buf.get_mut(start..start + KEY_ONMEDIA_SIZE) {
            Some(s) => key.encode(s),
            None => return false,
        }
        self.nocrc |= key.flags & KEY_FLAGS_DATA_CRC == 0;
        self.key_num += 1;
        true
    }
    /// Seal (magic + CRC) and return the bytes to persist.
    pub fn seal(&mut self) -> Result<&[u8], CacheError> {
        let size = seal_kset(&mut self.buf, self.key_num)?;
        Ok(self.buf.get(..size).unwrap_or(&[]))
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    pub(crate) fn kset_id(&self, off: u64) -> usize {
        let n = self.ksets.len().max(1) as u64;
        ((off >> crate::meta::layout::SUBTREE_SHIFT) % n) as usize
    }

    pub(crate) fn key_to_onmedia(&self, key: &Key) -> KeyOnmedia {
        KeyOnmedia {
            off: key.off,
            len: key.len,
            flags: key.flags & !KEY_FLAGS_VERIFIED,
            cache_seg_id: key.pos.seg.get(),
            cache_seg_off: key.pos.off,
            seg_gen: key.gen,
            data_crc: if key.has_crc() { key.crc } else { 0 },
            reserved: 0,
        }
    }

    /// Persist open kset `id` at the key head. Nothing to do if it is empty.
    pub(crate) fn kset_close(&mut self, id: usize) -> Result<(), CacheError> {
        let key_num = match self.ksets.get(id) {
            Some(k) => k.key_num(),
            None => return Ok(()),
        };
        if key_num == 0 {
            return Ok(());
        }
        let size = kset_size(key_num) as u32;
        let data_size = self.geo.seg_data_size();
        // Room for this kset and the LAST kset that may have to follow it.
        if data_size - self.key_head.off < size + KSET_HEADER_SIZE as u32 {
            let next = self
                .get_cache_segment()
                .ok_or(CacheError::Busy("no free segment for the key log"))?;
            let next_addr = self.pos_addr(Pos { seg: next, off: 0 });
            persist(&mut self.pmem, next_addr, &[0u8; KSET_HEADER_SIZE]);
            let mut last = [0u8; KSET_HEADER_SIZE];
            encode_last_kset(next.get(), &mut last);
            let head = self.pos_addr(self.key_head);
            persist(&mut self.pmem, head, &last);
            self.key_head = Pos { seg: next, off: 0 };
        }
        let head = self.pos_addr(self.key_head);
        // Clear the header after the new kset first (see the module docs). Its
        // fence also makes the data of the kset's keys durable — the write path
        // stores and flushes data without a fence of its own — before the kset
        // that points at it is stored.
        if self.key_head.off + size + KSET_HEADER_SIZE as u32 <= data_size {
            persist(
                &mut self.pmem,
                head + u64::from(size),
                &[0u8; KSET_HEADER_SIZE],
            );
        } else {
            self.pmem.fence();
        }
        let Cache { ksets, pmem, .. } = self;
        let k = match ksets.get_mut(id) {
            Some(k) => k,
            None => return Ok(()),
        };
        let bytes = k.seal()?;
        persist(pmem, head, bytes);
        let nocrc = k.nocrc;
        k.reset();
        self.key_head.off += size;
        if nocrc {
            self.nocrc_until = self.log_seq_head + 1;
        }
        self.log_seq_head += 1;
        self.stats.ksets_written += 1;
        Ok(())
    }

    /// Append `key` to its kset; close it when full or when `force` (FUA).
    /// Callers check [`Cache::kset_room`] first, so the push cannot fail.
    pub(crate) fn key_append(&mut self, key: &Key, force: bool) -> Result<(), CacheError> {
        let id = self.kset_id(key.off);
        let om = self.key_to_onmedia(key);
        let full = match self.ksets.get_mut(id) {
            Some(k) => {
                if !k.push(&om) {
                    return Err(CacheError::Busy("kset full"));
                }
                k.is_full()
            }
            None => return Err(CacheError::NoMem("no kset")),
        };
        // Logged from here on (the kset is written when it closes), so writeback will copy it.
        if key.dirty() {
            self.dirty_bytes += u64::from(key.len);
        }
        if full || force {
            self.kset_close(id)?;
        }
        Ok(())
    }

    /// Make sure the kset for `off` can take one more key (closing it if full).
    pub(crate) fn kset_room(&mut self, off: u64) -> Result<(), CacheError> {
        let id = self.kset_id(off);
        if self.ksets.get(id).map(|k| k.is_full()).unwrap_or(true) {
            self.kset_close(id)?;
        }
        Ok(())
    }

    /// REQ_PREFLUSH: persist every open kset (`pcache_cache_flush`).
    /// In the modes that write through, the backing device holds the data: it
    /// is flushed too.
    pub fn flush(&mut self) -> Result<(), CacheError> {
        self.flush_idle()?;
        // Writeback may not put a kset from before this FLUSH and one from
        // after it in one batch.
        self.barriers.record(self.log_seq_head);
        if self.mode().writes_through() && self.backing.flush().is_err() {
            self.stats.backing_errors += 1;
            return Err(CacheError::Io("backing device flush failed"));
        }
        Ok(())
    }

    /// The periodic kset flush (upstream's 1 s `kset_flush_fn`): persists the
    /// open ksets.
    pub fn flush_idle(&mut self) -> Result<(), CacheError> {
        for id in 0..self.ksets.len() {
            self.kset_close(id)?;
        }
        Ok(())
    }

    /// CRC of a key's data as stored (`cache_key_data_crc`).
    pub(crate) fn data_crc_at(&mut self, pos: Pos, len: u32) -> Result<u32, CacheError> {
        let mut crc_state = crate::meta::crc32c::PCACHE_CRC_SEED;
        let addr = self.pos_addr(pos);
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(self.bounce.len() as u32);
            let chunk = self
                .bounce
                .get_mut(..n as usize)
                .ok_or(CacheError::NoMem("bounce"))?;
            self.pmem
                .read(addr + u64::from(done), chunk)
                .map_err(|_| CacheError::Io("pmem media error"))?;
            crc_state = self.pmem.crc32c(crc_state, chunk);
            done += n;
        }
        Ok(crc_state)
    }
}
