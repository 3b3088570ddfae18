//! Writing dirty keys back to the backing device in log order (upstream
//! `cache_writeback.c`).
//!
//! One step handles the kset at the dirty tail: its dirty keys are written to the
//! backing device in log order (a later key of the kset overwrites an earlier
//! one), the backing device is flushed, and only then is the dirty tail advanced
//! and persisted. So the backing device always holds a prefix of the log plus at
//! most part of the kset being written back, and writes the application
//! separated by a FLUSH (different ksets) reach it in order.
//!
//! A step is three parts so that a caller can run the slow middle one without
//! the engine's lock: [`Cache::writeback_plan`] resolves the kset's dirty keys
//! into extents, [`writeback_extents`] copies them and flushes the backing
//! device, [`Cache::writeback_commit`] moves the dirty tail.

use super::env::{Backing, Pmem, WRITE_BATCH_MAX};
use super::error::CacheError;
use super::key::Pos;
use super::{Cache, Memory};
use crate::meta::cache_info::CtrlPos;
use crate::meta::crc32c::PCACHE_CRC_SEED;
use crate::meta::kset::KsetRead;

/// What one writeback or GC step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Idle,
    /// Made progress; call again.
    Progress,
}

/// One dirty extent of the kset being written back, resolved under the engine's
/// lock so that the copy can run without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WbExtent {
    /// Byte offset on the backing device.
    pub off: u64,
    /// Byte address of the data on the cache device.
    pub addr: u64,
    pub len: u32,
    /// The key's data CRC, checked before anything is written back.
    pub crc: Option<u32>,
}

/// The kset at the dirty tail, planned for writeback: its first `n` extents in
/// the buffer [`Cache::writeback_plan`] filled.
///
/// A batch is the one right to move the dirty tail, and it is not `Clone`: while
/// it is out, [`Cache::writeback_plan`] plans nothing else, so no second writer
/// can commit the same kset, and the dirty tail (which GC never passes) stays on
/// it. The kset's data segments are therefore pinned until the batch is handed
/// back to [`Cache::writeback_commit`] or [`Cache::writeback_failed`], and the
/// copy in between, which runs without the engine's lock, reads only the data
/// the plan resolved.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a planned batch pins the dirty tail until it is committed or failed"]
pub struct WbBatch {
    tail: Pos,
    size: u32,
    pub n: usize,
    /// Bytes of the kset's dirty keys (see [`super::Status::dirty_bytes`]).
    dirty: u64,
    /// Bytes of the planned extents.
    bytes: u64,
}

/// What [`Cache::writeback_plan`] found at the dirty tail.
#[derive(Debug, PartialEq, Eq)]
pub enum WbPlan {
    /// Nothing to write back, or a batch is already out (see [`WbBatch`]).
    Idle,
    /// The tail crossed to the next key-log segment; plan again.
    Moved,
    /// Copy these extents ([`writeback_extents`]), then [`Cache::writeback_commit`].
    Batch(WbBatch),
}

/// Why copying a batch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WbError {
    Pmem,
    Crc,
    Backing,
}

impl From<WbError> for CacheError {
    fn from(e: WbError) -> Self {
        match e {
            WbError::Pmem => CacheError::Io("pmem media error"),
            WbError::Crc => CacheError::Io("dirty data failed its crc check; not written back"),
            WbError::Backing => CacheError::Io("backing device write failed"),
        }
    }
}

/// Copies planned extents from the cache to the backing device and flushes it.
/// Needs no engine state, so the target runs it without the engine's lock: the
/// data stays put, because only GC frees segments and it never passes the dirty
/// tail. Extents go out in batches ([`Backing::write_batch`]) of ones that fit in
/// `bounce` together and overlap no other of the batch; a later extent that
/// overlaps an earlier one starts a new batch, so log order holds where it
/// matters (a later key overwrites an earlier one). Every extent's CRC is checked
/// before its batch is written. `bounce` is at least 4 KiB.
pub fn writeback_extents<P: Pmem, B: Backing>(
    pmem: &P,
    backing: &mut B,
    bounce: &mut [u8],
    extents: &[WbExtent],
) -> Result<(), WbError> {
    let mut rest = extents;
    while let Some(first) = rest.first() {
        let n = batch_len(rest, bounce.len());
        if n == 0 {
            // Larger than the bounce buffer: on its own, in pieces.
            writeback_large(pmem, backing, bounce, first)?;
            rest = rest.get(1..).unwrap_or_default();
            continue;
        }
        let (batch, next) = rest.split_at_checked(n).ok_or(WbError::Pmem)?;
        let mut at = 0usize;
        for e in batch {
            let chunk = bounce
                .get_mut(at..at + e.len as usize)
                .ok_or(WbError::Pmem)?;
            pmem.read(e.addr, chunk).map_err(|_| WbError::Pmem)?;
            if e.crc
                .is_some_and(|want| pmem.crc32c(PCACHE_CRC_SEED, chunk) != want)
            {
                return Err(WbError::Crc);
            }
            at += e.len as usize;
        }
        backing
            .write_batch(bounce.get(..at).unwrap_or_default(), batch)
            .map_err(|_| WbError::Backing)?;
        rest = next;
    }
    backing.flush().map_err(|_| WbError::Backing)
}

/// How many leading extents of `ext` form one batch (0 if the first alone does
/// not fit in `room` bytes).
fn batch_len(ext: &[WbExtent], room: usize) -> usize {
    let mut used = 0usize;
    for (i, e) in ext.iter().enumerate().take(WRITE_BATCH_MAX) {
        let overlaps =
            |p: &WbExtent| p.off < e.off + u64::from(e.len) && e.off < p.off + u64::from(p.len);
        used += e.len as usize;
        if used > room || ext.iter().take(i).any(overlaps) {
            return i;
        }
    }
    ext.len().min(WRITE_BATCH_MAX)
}

/// One extent larger than the bounce buffer: CRC checked over the whole extent
/// first, then copied piece by piece.
fn writeback_large<P: Pmem, B: Backing>(
    pmem: &P,
    backing: &mut B,
    bounce: &mut [u8],
    e: &WbExtent,
) -> Result<(), WbError> {
    if let Some(want) = e.crc {
        let mut crc = PCACHE_CRC_SEED;
        for_chunks(e, bounce.len(), |at, n| {
            let chunk = bounce.get_mut(..n).ok_or(WbError::Pmem)?;
            pmem.read(e.addr + at, chunk).map_err(|_| WbError::Pmem)?;
            crc = pmem.crc32c(crc, chunk);
            Ok(())
        })?;
        if crc != want {
            return Err(WbError::Crc);
        }
    }
    for_chunks(e, bounce.len(), |at, n| {
        let chunk = bounce.get_mut(..n).ok_or(WbError::Pmem)?;
        pmem.read(e.addr + at, chunk).map_err(|_| WbError::Pmem)?;
        backing
            .write(e.off + at, chunk)
            .map_err(|_| WbError::Backing)
    })
}

/// Calls `f(offset, len)` over `e` in pieces of at most `max` bytes.
fn for_chunks(
    e: &WbExtent,
    max: usize,
    mut f: impl FnMut(u64, usize) -> Result<(), WbError>,
) -> Result<(), WbError> {
    let mut done = 0u64;
    while done < u64::from(e.len) {
        let n = (u64::from(e.len) - done).min(max as u64) as usize;
        if n == 0 {
            return Err(WbError::Pmem);
        }
        f(done, n)?;
        done += n as u64;
    }
    Ok(())
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Write back the kset at the dirty tail (`cache_writeback_fn`) in one go:
    /// [`Self::writeback_plan`], [`writeback_extents`] and
    /// [`Self::writeback_commit`] with the engine's own buffers, for callers
    /// that hold the engine throughout (tests, the offline tool). An error is
    /// counted and leaves the dirty tail where it was, so the next step retries
    /// the same kset (its writes are idempotent): a backing device that recovers
    /// gets every dirty byte. Data that failed its CRC fails again each time and
    /// is never written back. While a batch planned by someone else is out,
    /// there is nothing to do (`Idle`).
    pub fn writeback_step(&mut self) -> Result<Step, CacheError> {
        let batch = match self.plan_pinned()? {
            WbPlan::Idle => return Ok(Step::Idle),
            WbPlan::Moved => return Ok(Step::Progress),
            WbPlan::Batch(b) => b,
        };
        let Cache {
            pmem,
            backing,
            bounce,
            wb_extents,
            ..
        } = self;
        let planned = wb_extents.get(..batch.n).unwrap_or_default();
        if let Err(e) = writeback_extents(pmem, backing, bounce, planned) {
            return Err(self.writeback_failed(batch, e));
        }
        self.writeback_commit(batch);
        Ok(Step::Progress)
    }

    /// Looks at the kset at the dirty tail: an end-of-segment marker moves the
    /// tail on at once; a kset of keys has its dirty, live keys resolved into
    /// `out` (at least `KSET_KEYS_MAX` long) for [`writeback_extents`], and the
    /// returned [`WbBatch`] pins the dirty tail until it is committed or failed.
    pub fn writeback_plan(&mut self, out: &mut [WbExtent]) -> Result<WbPlan, CacheError> {
        let plan = self.plan_pinned()?;
        if let WbPlan::Batch(b) = &plan {
            let copied = match (self.wb_extents.get(..b.n), out.get_mut(..b.n)) {
                (Some(planned), Some(o)) => {
                    // Not `copy_from_slice`: its length check panics (the lengths match).
                    for (d, s) in o.iter_mut().zip(planned) {
                        *d = *s;
                    }
                    true
                }
                _ => false,
            };
            if !copied {
                self.wb_pinned = None;
                return Err(CacheError::NoMem("writeback extents"));
            }
        }
        Ok(plan)
    }

    /// Plans into `self.wb_extents` and pins the dirty tail for a batch.
    fn plan_pinned(&mut self) -> Result<WbPlan, CacheError> {
        if self.wb_pinned.is_some() {
            return Ok(WbPlan::Idle);
        }
        let r = self.plan_one();
        match &r {
            Ok(WbPlan::Batch(b)) => self.wb_pinned = Some(b.tail),
            Ok(_) => {}
            Err(_) => self.stats.writeback_errors += 1,
        }
        r
    }

    fn plan_one(&mut self) -> Result<WbPlan, CacheError> {
        let tail = self.dirty_tail.pos;
        if tail == self.key_head {
            return Ok(WbPlan::Idle);
        }
        match self.read_kset(tail)? {
            KsetRead::End => Ok(WbPlan::Idle),
            KsetRead::Last { next_cache_seg_id } => {
                self.dirty_tail.pos = Pos {
                    seg: self.next_log_seg(next_cache_seg_id)?,
                    off: 0,
                };
                self.encode_tail(CtrlPos::DirtyTail);
                Ok(WbPlan::Moved)
            }
            KsetRead::Keys { key_num, size } => {
                let mut n = 0;
                let mut dirty = 0u64;
                let mut bytes = 0u64;
                for i in 0..key_num as usize {
                    let key = self.scratch_key(i)?;
                    if !key.dirty() {
                        continue;
                    }
                    // Counted as `key_append` and replay counted it, stale or not.
                    dirty += u64::from(key.len);
                    // Stale: GC reclaimed it (never past the dirty tail). Not held
                    // at all: discarded. A key that a later write overwrote is
                    // still copied (the later key covers the range), so the backing
                    // device only ever holds a prefix of the write history.
                    if self.key_stale(&key) || !self.holds_any(key.off, u64::from(key.len)) {
                        continue;
                    }
                    let e = WbExtent {
                        off: key.off,
                        addr: self.pos_addr(key.pos),
                        len: key.len,
                        crc: key.has_crc().then_some(key.crc),
                    };
                    let slot = self
                        .wb_extents
                        .get_mut(n)
                        .ok_or(CacheError::NoMem("writeback extents"))?;
                    *slot = e;
                    n += 1;
                    bytes += u64::from(key.len);
                }
                Ok(WbPlan::Batch(WbBatch {
                    tail,
                    size,
                    n,
                    dirty,
                    bytes,
                }))
            }
        }
    }

    /// Takes back a batch whose copy failed and counts the error; the dirty
    /// tail stays, so the kset is planned again.
    pub fn writeback_failed(&mut self, batch: WbBatch, e: WbError) -> CacheError {
        debug_assert_eq!(self.wb_pinned, Some(batch.tail));
        self.wb_pinned = None;
        self.stats.writeback_errors += 1;
        if e == WbError::Crc {
            self.stats.crc_errors += 1;
        }
        e.into()
    }

    /// After [`writeback_extents`] succeeded (the backing device flushed),
    /// advances and persists the dirty tail past the batch's kset.
    pub fn writeback_commit(&mut self, batch: WbBatch) {
        // The batch pinned the dirty tail: nothing else could have moved it.
        debug_assert_eq!(self.wb_pinned, Some(batch.tail));
        debug_assert_eq!(self.dirty_tail.pos, batch.tail);
        self.wb_pinned = None;
        if self.dirty_tail.pos != batch.tail {
            return;
        }
        self.dirty_tail.pos.off += batch.size;
        self.encode_tail(CtrlPos::DirtyTail);
        self.stats.ksets_written_back += 1;
        self.stats.bytes_written_back += batch.bytes;
        debug_assert!(self.dirty_bytes >= batch.dirty);
        self.dirty_bytes = self.dirty_bytes.saturating_sub(batch.dirty);
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
