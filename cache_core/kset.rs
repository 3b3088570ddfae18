//! Open ksets (upstream `cache_key_append` / `cache_kset_close`): the buffer
//! a kset is encoded in, and the engine's side of the key log
//! ([`super::key_log`]): closes and commits with the engine at hand for a new
//! log segment.

use super::env::{Backing, Pmem};
use super::error::CacheError;
use super::index::Index;
use super::key::{Key, Pos};
use super::key_log::{commit_key, Append, Closed, KeyLog, LogIo, Over};
use super::stats::Counter;
use super::write_path::{Committed, Progress};
use super::{Cache, Memory};
use crate::meta::kset::{
    kset_key, kset_size, seal_kset, KeyOnmedia, KEY_FLAGS_CLEAN, KEY_FLAGS_DATA_CRC,
    KEY_FLAGS_EMPTY, KEY_ONMEDIA_SIZE, KSET_KEYS_MAX, KSET_ONMEDIA_SIZE_MAX,
};

/// What a commit of a key without a CRC gets when the log wants one (the
/// engine computes the CRC then, see [`Cache::write_commit`]).
pub(crate) const KEY_WITHOUT_CRC: &str = "key without its data crc";

/// A conditional commit found what it was to go over replaced (see
/// [`super::key_log::Over`]).
pub(crate) const SUPERSEDED: &str = "replaced meanwhile";

/// An open kset: keys encoded in place, ready to be sealed and copied to pmem.
#[derive(Clone)]
pub struct KsetBuf {
    key_num: usize,
    /// Some key in it has no data CRC (see [`Cache::set_data_crc`]).
    nocrc: bool,
    /// It holds the key of a FUA write (see [`super::LogHead::may_pass_over`]).
    fua: bool,
    buf: [u8; KSET_ONMEDIA_SIZE_MAX],
}

impl Default for KsetBuf {
    fn default() -> Self {
        KsetBuf {
            key_num: 0,
            nocrc: false,
            fua: false,
            buf: [0u8; KSET_ONMEDIA_SIZE_MAX],
        }
    }
}

impl KsetBuf {
    pub fn reset(&mut self) {
        self.key_num = 0;
        self.nocrc = false;
        self.fua = false;
    }
    pub fn key_num(&self) -> usize {
        self.key_num
    }
    /// Holds a key without a data CRC.
    pub fn has_nocrc(&self) -> bool {
        self.nocrc
    }
    /// Holds the key of a FUA write.
    pub fn has_fua(&self) -> bool {
        self.fua
    }
    /// The key [`KsetBuf::push`] encoded last is a FUA write's.
    pub(crate) fn mark_fua(&mut self) {
        self.fua = true;
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
    /// Takes back the key [`KsetBuf::push`] encoded last (a commit whose index
    /// insert failed, under the same hold of the log's lock).
    pub(crate) fn pop(&mut self) {
        self.key_num = self.key_num.saturating_sub(1);
    }
    /// Seal (magic + CRC) and return the bytes to persist.
    pub fn seal(&mut self) -> Result<&[u8], CacheError> {
        let size = seal_kset(&mut self.buf, self.key_num)?;
        Ok(self.buf.get(..size).unwrap_or(&[]))
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// The key head: where the next kset goes.
    pub(crate) fn key_head(&self) -> Pos {
        self.log.with_head(|h| h.head)
    }

    /// Runs `step` on the index and the key log with the engine's pmem until
    /// it is done (`Some`); each time it wants a new segment for the log
    /// (`None`), it gets one from the engine's free segments. A segment it
    /// did not use goes back.
    fn with_log_segment<T>(
        &self,
        mut step: impl FnMut(
            &Index<M>,
            &KeyLog<M>,
            &mut LogIo<'_, P, M>,
        ) -> Result<Option<T>, CacheError>,
    ) -> Result<T, CacheError> {
        let mut spare = None;
        let r = loop {
            let Cache {
                index,
                log,
                pmem,
                seg_map,
                geo,
                ..
            } = self;
            let mut io = LogIo {
                pmem,
                seg_map,
                geo,
                spare: &mut spare,
            };
            match step(index, log, &mut io) {
                Ok(Some(t)) => break Ok(t),
                Ok(None) if spare.is_none() => match self.get_cache_segment() {
                    Some(seg) => spare = Some(seg),
                    None => break Err(CacheError::Busy("no free segment for the key log")),
                },
                // A step with a spare segment does not ask for another.
                Ok(None) => break Err(CacheError::Busy("the key log wants a second segment")),
                Err(e) => break Err(e),
            }
        };
        // Another close moved the log on meanwhile: the segment goes back.
        if let Some(seg) = spare {
            self.set_used(seg, false);
        }
        r
    }

    /// Runs `close` on the key log (see [`Cache::with_log_segment`]).
    fn log_close(
        &self,
        mut close: impl FnMut(&KeyLog<M>, &mut LogIo<'_, P, M>) -> Result<Closed, CacheError>,
    ) -> Result<(), CacheError> {
        self.with_log_segment(|_, log, io| {
            close(log, io).map(|c| (c == Closed::Done).then_some(()))
        })
    }

    /// Persist open kset `id` at the key head (see [`KeyLog::close`]).
    pub(crate) fn kset_close(&self, id: usize) -> Result<(), CacheError> {
        self.log_close(|l, io| l.close(id, io))
    }

    /// Make sure the kset for `off` can take one more key (closing it if full).
    pub(crate) fn kset_room(&self, off: u64) -> Result<(), CacheError> {
        self.log_close(|l, io| l.room(off, io).1)
    }

    /// Makes `key` a key of the cache (see [`commit_key`]), with the engine
    /// at hand for a new log segment. `Err`: nothing done.
    pub(crate) fn key_commit(
        &self,
        key: &Key,
        fua: bool,
        over: Option<Over>,
        on_insert: &mut dyn FnMut(),
    ) -> Result<Committed, CacheError> {
        let appended = self.with_log_segment(|index, log, io| {
            match commit_key(index, log, io, key, fua, over, on_insert)? {
                Append::RoomWantsSegment => Ok(None),
                done => Ok(Some(done)),
            }
        })?;
        match appended {
            Append::Done { replaced } => Ok(Committed::Done(replaced)),
            Append::CloseWantsSegment { replaced } => {
                let id = self.log.kset_id(key.off);
                Ok(match self.kset_close(id) {
                    Ok(()) => Committed::Done(replaced),
                    // The key is in. A FUA write persists its kset before it
                    // completes (without committing the chunk again); another
                    // leaves the full kset open, as a commit outside the engine
                    // does: the next commit to it, or the next flush, closes it
                    // (and meets what failed here).
                    Err(_) if fua => Committed::Persist(replaced),
                    Err(_) => Committed::Done(replaced),
                })
            }
            // The engine computed the CRC wherever the log wants one.
            Append::CrcWanted => Err(CacheError::Invalid(KEY_WITHOUT_CRC)),
            Append::Superseded => Err(CacheError::Busy(SUPERSEDED)),
            Append::RoomWantsSegment => Err(CacheError::Busy("the key log wants a segment")),
        }
    }

    /// Persists the kset of the keys at `off` (a FUA write whose commit
    /// found the log needing a new segment, see [`Committed::Persist`]).
    pub fn kset_persist(&self, off: u64) -> Result<(), CacheError> {
        let id = self.log.kset_id(off);
        self.kset_close(id)
    }

    /// Persists the kset a FUA commit of the write `p` counts left to it, if
    /// any (see [`Progress::persist`]).
    pub fn persist_owed(&self, p: &mut Progress) -> Result<(), CacheError> {
        if let Some(off) = p.persist {
            self.kset_persist(off)?;
            p.persist = None;
        }
        Ok(())
    }

    /// REQ_PREFLUSH: persist every open kset (`pcache_cache_flush`).
    /// In the modes that write through, the backing device holds the data: it
    /// is flushed too.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.log_close(|l, io| l.flush(io))?;
        if self.mode().writes_through() && self.backing.flush().is_err() {
            self.stats.inc(Counter::BackingErrors);
            return Err(CacheError::Io("backing device flush failed"));
        }
        Ok(())
    }

    /// The periodic kset flush (upstream's 1 s `kset_flush_fn`): persists the
    /// open ksets.
    pub fn flush_idle(&self) -> Result<(), CacheError> {
        self.log_close(|l, io| l.close_all(io))
    }

    /// Ksets closed since attach.
    pub(crate) fn ksets_written(&self) -> u64 {
        self.log.with_head(|h| h.written)
    }

    /// CRC of a key's data as stored (`cache_key_data_crc`).
    /// Read in pieces of a small buffer on the stack: a slow path (a commit
    /// that finds `data_crc` switched on since its copy, a read of part of an
    /// extent not checked yet), and one that takes no lock.
    pub(crate) fn data_crc_at(&self, pos: Pos, len: u32) -> Result<u32, CacheError> {
        let mut crc_state = crate::meta::crc32c::PCACHE_CRC_SEED;
        let addr = self.pos_addr(pos);
        let mut buf = [0u8; 512];
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(buf.len() as u32);
            let chunk = buf
                .get_mut(..n as usize)
                .ok_or(CacheError::NoMem("crc buffer"))?;
            self.pmem
                .read(addr + u64::from(done), chunk)
                .map_err(|_| CacheError::Io("pmem media error"))?;
            crc_state = self.pmem.crc32c(crc_state, chunk);
            done += n;
        }
        Ok(crc_state)
    }
}
