//! Writing dirty keys back to the backing device in log order (upstream
//! `cache_writeback.c`).
//!
//! One step handles the kset at the dirty tail: its dirty keys are written to the
//! backing device in log order (a later key of the kset overwrites an earlier
//! one), the backing device is flushed, and only then is the dirty tail advanced
//! and persisted. So the backing device always holds a prefix of the log plus at
//! most part of the kset being written back, and writes the application
//! separated by a FLUSH (different ksets) reach it in order.

use super::env::{Backing, Pmem};
use super::error::CacheError;
use super::key::Key;
use super::Cache;
use crate::meta::cache_info::CtrlPos;
use crate::meta::kset::KsetRead;

/// What one writeback or GC step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Idle,
    /// Made progress; call again.
    Progress,
}

impl<'a, P: Pmem, B: Backing> Cache<'a, P, B> {
    /// Write back the kset at the dirty tail (`cache_writeback_fn`). An error is
    /// counted and leaves the dirty tail where it was, so the next step retries
    /// the same kset (its writes are idempotent): a backing device that recovers
    /// gets every dirty byte. Data that failed its CRC fails again each time and
    /// is never written back.
    pub fn writeback_step(&mut self) -> Result<Step, CacheError> {
        let r = self.writeback_one();
        if r.is_err() {
            self.stats.writeback_errors += 1;
        }
        r
    }

    fn writeback_one(&mut self) -> Result<Step, CacheError> {
        let tail = self.dirty_tail.pos;
        if tail == self.key_head {
            return Ok(Step::Idle);
        }
        match self.read_kset(tail)? {
            KsetRead::End => Ok(Step::Idle),
            KsetRead::Last { next_cache_seg_id } => {
                self.dirty_tail.pos = super::key::Pos {
                    seg: next_cache_seg_id,
                    off: 0,
                };
                self.encode_tail(CtrlPos::DirtyTail);
                Ok(Step::Progress)
            }
            KsetRead::Keys { key_num, size } => {
                for i in 0..key_num as usize {
                    // Re-read the kset each time: the scratch buffer is shared
                    // with the CRC check below only through `bounce`, not here.
                    let key = self.scratch_key(i)?;
                    if key.clean() || key.empty() || self.key_stale(&key) {
                        continue;
                    }
                    self.key_writeback(&key)?;
                }
                self.backing
                    .flush()
                    .map_err(|_| CacheError::Io("backing device flush failed"))?;
                self.dirty_tail.pos.off += size;
                self.encode_tail(CtrlPos::DirtyTail);
                self.stats.ksets_written_back += 1;
                Ok(Step::Progress)
            }
        }
    }

    fn key_writeback(&mut self, key: &Key) -> Result<(), CacheError> {
        if key.has_crc() {
            let crc = self.data_crc_at(key.pos, key.len)?;
            if crc != key.crc {
                self.stats.crc_errors += 1;
                return Err(CacheError::Io(
                    "dirty data failed its crc check; not written back",
                ));
            }
        }
        let addr = self.pos_addr(key.pos);
        let mut done = 0u32;
        while done < key.len {
            let n = (key.len - done).min(self.bounce.len() as u32);
            let chunk = self
                .bounce
                .get_mut(..n as usize)
                .ok_or(CacheError::NoMem("bounce"))?;
            self.pmem
                .read(addr + u64::from(done), chunk)
                .map_err(|_| CacheError::Io("pmem media error"))?;
            self.backing
                .write(key.off + u64::from(done), chunk)
                .map_err(|_| CacheError::Io("backing device write failed"))?;
            done += n;
        }
        Ok(())
    }

    /// Write back everything logged so far (used at stop and by tests).
    pub fn writeback_all(&mut self) -> Result<(), CacheError> {
        while self.writeback_step()? == Step::Progress {}
        Ok(())
    }

    /// True when every logged key has been written back.
    pub fn is_clean(&self) -> bool {
        self.dirty_tail.pos == self.key_head
    }
}
