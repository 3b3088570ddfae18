//! Writing dirty keys back to the backing device in log order (upstream
//! `cache_writeback.c`).
//!
//! One step handles the ksets from the dirty tail up to the next FLUSH barrier
//! (see [`super::barriers`]), at most [`WB_KSETS_MAX`] of them: their dirty keys
//! are written to the backing device, a later key's write never overtaken by an
//! earlier one it overlaps, the backing device is flushed once, and only then is
//! the dirty tail advanced past them and persisted. So the backing device always
//! holds a prefix of the log plus part of the ksets being written back, and the
//! writes the application separated by a FLUSH reach it in order.
//!
//! A step is three parts so that a caller can run the slow middle one without
//! the control lock: [`Cache::writeback_plan`] resolves the ksets' dirty keys
//! into extents, [`writeback_extents`] copies them and flushes the backing
//! device, [`Cache::writeback_commit`] moves the dirty tail.

use super::ctrl::Held;
use super::env::{Backing, Pmem, WRITE_BATCH_MAX};
use super::error::CacheError;
use super::key::Pos;
use super::stats::Counter;
use super::{Cache, Memory};
use crate::meta::cache_info::CtrlPos;
use crate::meta::crc32c::PCACHE_CRC_SEED;
use crate::meta::kset::{KsetRead, KSET_KEYS_MAX};

/// Most ksets one writeback step takes: their extents go out together and the
/// backing device is flushed once for all of them.
pub const WB_KSETS_MAX: usize = 8;

/// A step takes no further kset once it holds this many bytes to write back:
/// a step of large keys moves the dirty tail, and so frees room, as often as
/// a step of small ones (the module's staging buffer holds this much).
pub const WB_STEP_BYTES: u64 = 4 << 20;

/// Room for the extents of a full step (the size of the writeback extent
/// buffers; smaller ones, down to one kset's worth, take fewer ksets a step).
pub const WB_EXTENTS_MAX: usize = WB_KSETS_MAX * KSET_KEYS_MAX;

/// What one writeback or GC step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Idle,
    /// Made progress; call again.
    Progress,
}

/// One dirty extent of the ksets being written back, resolved under the engine's
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
    /// Its place in log order within the step (a later key overwrites an
    /// earlier one it overlaps).
    pub order: u32,
}

impl WbExtent {
    fn end(&self) -> u64 {
        self.off + u64::from(self.len)
    }

    fn overlaps(&self, o: &WbExtent) -> bool {
        self.off < o.end() && o.off < self.end()
    }

    fn covers(&self, o: &WbExtent) -> bool {
        self.off <= o.off && o.end() <= self.end()
    }
}

/// The ksets from the dirty tail on, planned for writeback: `n` extents in the
/// buffer [`Cache::writeback_plan`] filled.
///
/// A batch is the one right to move the dirty tail, and it is not `Clone`: while
/// it is out, [`Cache::writeback_plan`] plans nothing else, so no second writer
/// can commit the same ksets, and the dirty tail (which GC never passes) stays
/// on the first. Their data segments are therefore pinned until the batch is
/// handed back to [`Cache::writeback_commit`] or [`Cache::writeback_failed`],
/// and the copy in between, which runs without the control lock, reads only
/// the data the plan resolved.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a planned batch pins the dirty tail until it is committed or failed"]
pub struct WbBatch {
    tail: Pos,
    /// Where the dirty tail goes on commit: past the last kset of the batch, in
    /// the same key-log segment.
    end: Pos,
    /// Ksets in the batch.
    ksets: u32,
    pub n: usize,
    /// Bytes of the ksets' dirty keys (see [`super::Status::dirty_bytes`]).
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
/// Needs no engine state, so the target runs it without the control lock: the
/// data stays put, because only GC frees segments and it never passes the dirty
/// tail. `bounce` is at least 4 KiB.
///
/// An extent that a later one of the step covers whole is not written: the
/// step's ksets lie between two FLUSH barriers, so the backing device may end up
/// with any of their writes before the flush, and after it holds the later one
/// either way. What is left goes out in batches, in offset order when none of
/// them overlap (the block layer merges neighbours), and otherwise in log order
/// with a new batch at each extent that overlaps an earlier one of its batch,
/// so that a later key is never overtaken by an earlier one it overwrites.
/// Extents without a data CRC go out straight from the pmem where the backing
/// device can ([`Backing::write_batch_from`]), as upstream's writeback does;
/// the others are copied into `bounce`, as many as fit, and each one's CRC is
/// checked before its batch is written ([`Backing::write_batch`]). The extents
/// are reordered in place.
pub fn writeback_extents<P: Pmem, B: Backing>(
    pmem: &P,
    backing: &B,
    bounce: &mut [u8],
    extents: &mut [WbExtent],
) -> Result<(), WbError> {
    let (n, overlap) = drop_overwritten(extents);
    let extents = extents.get_mut(..n).unwrap_or_default();
    if overlap {
        heap_sort_by_key(extents, |e| e.order);
    }
    let mut rest: &[WbExtent] = extents;
    while let Some(first) = rest.first() {
        // Extents without a data CRC go out from the pmem itself where the
        // backing device can take them so: no copy. Those with one are copied
        // (machine-check safe) and checked before anything is written.
        let plain = rest.iter().take_while(|e| e.crc.is_none()).count();
        if plain > 0 {
            let n = batch_len(rest.get(..plain).unwrap_or_default(), usize::MAX, overlap);
            let (batch, next) = rest.split_at_checked(n).ok_or(WbError::Pmem)?;
            if backing
                .write_batch_from(pmem, batch)
                .map_err(|_| WbError::Backing)?
            {
                rest = next;
                continue;
            }
        }
        let n = batch_len(rest, bounce.len(), overlap);
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

/// Sorts `ext` by offset and drops (moves past the returned count) every
/// extent that a later one in log order covers whole. Returns how many are
/// left, and whether any two of those still overlap.
fn drop_overwritten(ext: &mut [WbExtent]) -> (usize, bool) {
    heap_sort_by_key(ext, |e| (e.off, e.order));
    let mut overlap = false;
    let mut kept = 0usize;
    for i in 0..ext.len() {
        let Some(&e) = ext.get(i) else { break };
        if e.len == 0 {
            // Dropped by an extent before it in offset order, later in log
            // order, that covers it.
            continue;
        }
        let mut dropped = false;
        // Sorted by offset: the extents that start inside `e` follow it, and
        // each of them overlaps it.
        for j in i + 1..ext.len() {
            let Some(&o) = ext.get(j) else { break };
            if o.off >= e.end() {
                break;
            }
            if o.len == 0 {
                continue;
            }
            if o.order > e.order && o.covers(&e) {
                dropped = true;
                break;
            } else if e.order > o.order && e.covers(&o) {
                if let Some(x) = ext.get_mut(j) {
                    x.len = 0;
                }
            } else {
                overlap = true;
            }
        }
        if dropped {
            continue;
        }
        ext.swap(kept, i);
        kept += 1;
    }
    (kept, overlap)
}

/// Sorts `v` by `key` in place, with a heapsort: its stack use does not grow
/// with the input. `core`'s sorts keep scratch arrays in recursive frames (over
/// 1.5 KiB each here), which overran the 16 KiB stack of the kernel's
/// writeback worker on a step of a thousand extents.
fn heap_sort_by_key<K: Ord>(v: &mut [WbExtent], key: impl Fn(&WbExtent) -> K) {
    let n = v.len();
    for root in (0..n / 2).rev() {
        sift_down(v, root, n, &key);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift_down(v, 0, end, &key);
    }
}

/// Moves `v[root]` down the max-heap `v[..end]` to its place.
fn sift_down<K: Ord>(
    v: &mut [WbExtent],
    mut root: usize,
    end: usize,
    key: &impl Fn(&WbExtent) -> K,
) {
    let at = |v: &[WbExtent], i: usize| v.get(i).map(key);
    loop {
        let mut child = 2 * root + 1;
        if child >= end {
            return;
        }
        if child + 1 < end && at(v, child) < at(v, child + 1) {
            child += 1;
        }
        if at(v, root) >= at(v, child) {
            return;
        }
        v.swap(root, child);
        root = child;
    }
}

/// How many leading extents of `ext` form one batch (0 if the first alone does
/// not fit in `room` bytes). With `overlap`, a batch ends before an extent that
/// overlaps an earlier one of it.
fn batch_len(ext: &[WbExtent], room: usize, overlap: bool) -> usize {
    let mut used = 0usize;
    for (i, e) in ext.iter().enumerate().take(WRITE_BATCH_MAX) {
        used += e.len as usize;
        if used > room || (overlap && ext.iter().take(i).any(|p| p.overlaps(e))) {
            return i;
        }
    }
    ext.len().min(WRITE_BATCH_MAX)
}

/// One extent larger than the bounce buffer: CRC checked over the whole extent
/// first, then copied piece by piece.
fn writeback_large<P: Pmem, B: Backing>(
    pmem: &P,
    backing: &B,
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
    /// Write back the ksets at the dirty tail (`cache_writeback_fn`) in one go:
    /// [`Self::writeback_plan`], [`writeback_extents`] and
    /// [`Self::writeback_commit`] with the engine's own buffers, for callers
    /// that own the engine (tests, the offline tool). An error is
    /// counted and leaves the dirty tail where it was, so the next step retries
    /// the same ksets (their writes are idempotent): a backing device that
    /// recovers gets every dirty byte. Data that failed its CRC fails again each
    /// time and is never written back. While a batch planned by someone else is
    /// out, there is nothing to do (`Idle`).
    pub fn writeback_step(&mut self) -> Result<Step, CacheError> {
        let Some((mut extents, mut bounce)) = self.wb_bufs.take() else {
            return Err(CacheError::NoMem("writeback buffers"));
        };
        let r = self.writeback_step_with(&mut extents, &mut bounce);
        self.wb_bufs = Some((extents, bounce));
        r
    }

    /// [`Self::writeback_step`] with the caller's buffers: `extents` at least
    /// `KSET_KEYS_MAX` long (more takes more ksets a step), `bounce` at least
    /// 4 KiB. The control lock is held while planning and committing, not
    /// while the backing device writes.
    pub fn writeback_step_with(
        &self,
        extents: &mut [WbExtent],
        bounce: &mut [u8],
    ) -> Result<Step, CacheError> {
        let batch = match self.held(|h| h.plan_pinned(extents))? {
            WbPlan::Idle => return Ok(Step::Idle),
            WbPlan::Moved => return Ok(Step::Progress),
            WbPlan::Batch(b) => b,
        };
        let planned = extents.get_mut(..batch.n).unwrap_or_default();
        if let Err(e) = writeback_extents(&self.pmem, &self.backing, bounce, planned) {
            return Err(self.writeback_failed(batch, e));
        }
        self.writeback_commit(batch);
        Ok(Step::Progress)
    }

    /// Looks at the kset at the dirty tail: an end-of-segment marker moves the
    /// tail on at once; a kset of keys has its dirty, live keys resolved into
    /// `out` (at least `KSET_KEYS_MAX` long) for [`writeback_extents`], and the
    /// returned [`WbBatch`] pins the dirty tail until it is committed or failed.
    /// [`Self::writeback_plan_more`] adds the ksets after it, one per call, so
    /// that a caller can let the control lock go between them.
    pub fn writeback_plan(&self, out: &mut [WbExtent]) -> Result<WbPlan, CacheError> {
        self.held(|h| h.pin_plan(|h| h.plan_first(out)))
    }

    /// Adds the kset after `batch` to it if it may join (see
    /// [`Held::plan_next`]), its extents in `out` after the batch's. False when
    /// the batch is complete. On an error the batch is failed: the dirty tail
    /// is free again and the next plan starts over from it.
    pub fn writeback_plan_more(
        &self,
        batch: &mut WbBatch,
        out: &mut [WbExtent],
    ) -> Result<bool, CacheError> {
        self.held(|h| {
            debug_assert_eq!(h.t.wb_pinned, Some(batch.tail));
            let r = h.plan_next(batch, out);
            if r.is_err() {
                h.t.wb_pinned = None;
                h.stats.inc(Counter::WritebackErrors);
            }
            r
        })
    }

    /// Takes back a batch whose copy failed and counts the error; the dirty
    /// tail stays, so the ksets are planned again.
    pub fn writeback_failed(&self, batch: WbBatch, e: WbError) -> CacheError {
        self.held(|h| {
            debug_assert_eq!(h.t.wb_pinned, Some(batch.tail));
            h.t.wb_pinned = None;
        });
        self.stats.inc(Counter::WritebackErrors);
        if e == WbError::Crc {
            self.stats.inc(Counter::CrcErrors);
        }
        e.into()
    }

    /// After [`writeback_extents`] succeeded (the backing device flushed),
    /// advances and persists the dirty tail past the batch's ksets.
    pub fn writeback_commit(&self, batch: WbBatch) {
        self.held(|h| {
            // The batch pinned the dirty tail: nothing else could have moved it.
            debug_assert_eq!(h.t.wb_pinned, Some(batch.tail));
            debug_assert_eq!(h.t.dirty_tail.pos, batch.tail);
            h.t.wb_pinned = None;
            if h.t.dirty_tail.pos != batch.tail {
                return;
            }
            h.t.dirty_tail.pos = batch.end;
            h.encode_tail(CtrlPos::DirtyTail);
            h.t.dirty_seq += u64::from(batch.ksets);
            let dirty_seq = h.t.dirty_seq;
            h.log.with_head(|lh| lh.barriers.passed(dirty_seq));
            // Under the lock `status` reads them under: a byte is dirty or
            // written back in every status line, never both or neither.
            h.stats
                .add(Counter::KsetsWrittenBack, u64::from(batch.ksets));
            h.stats.add(Counter::BytesWrittenBack, batch.bytes);
            h.log.written_back(batch.dirty);
        });
    }

    /// Write back everything logged so far (used at stop and by tests).
    pub fn writeback_all(&mut self) -> Result<(), CacheError> {
        while self.writeback_step()? == Step::Progress {}
        Ok(())
    }

    /// True when every logged key has been written back.
    pub fn is_clean(&self) -> bool {
        self.held(|h| h.t.dirty_tail.pos) == self.key_head()
    }
}

impl<P: Pmem, B: Backing, M: Memory> Held<'_, P, B, M> {
    /// Plans a whole step into `out` in one go, and pins the dirty tail for
    /// it.
    fn plan_pinned(&mut self, out: &mut [WbExtent]) -> Result<WbPlan, CacheError> {
        self.pin_plan(|h| match h.plan_first(out)? {
            WbPlan::Batch(mut b) => {
                while h.plan_next(&mut b, out)? {}
                Ok(WbPlan::Batch(b))
            }
            plan => Ok(plan),
        })
    }

    /// Runs `plan` unless a batch is out already (`Idle`), and pins the dirty
    /// tail for the batch it returns; an error is counted (and drops the batch,
    /// so the next plan starts over from the dirty tail).
    fn pin_plan(
        &mut self,
        plan: impl FnOnce(&mut Self) -> Result<WbPlan, CacheError>,
    ) -> Result<WbPlan, CacheError> {
        if self.t.wb_pinned.is_some() {
            return Ok(WbPlan::Idle);
        }
        let r = plan(self);
        match &r {
            Ok(WbPlan::Batch(b)) => self.t.wb_pinned = Some(b.tail),
            Ok(_) => {}
            Err(_) => self.stats.inc(Counter::WritebackErrors),
        }
        r
    }

    /// Plans the kset at the dirty tail into the start of `out`.
    fn plan_first(&mut self, out: &mut [WbExtent]) -> Result<WbPlan, CacheError> {
        let tail = self.t.dirty_tail.pos;
        if tail == self.key_head() {
            return Ok(WbPlan::Idle);
        }
        let (key_num, size) = match self.read_kset(tail)? {
            KsetRead::End => return Ok(WbPlan::Idle),
            KsetRead::Last { next_cache_seg_id } => {
                self.t.dirty_tail.pos = Pos {
                    seg: self.next_log_seg(next_cache_seg_id)?,
                    off: 0,
                };
                self.encode_tail(CtrlPos::DirtyTail);
                return Ok(WbPlan::Moved);
            }
            KsetRead::Keys { key_num, size } => (key_num, size),
        };
        let mut batch = WbBatch {
            tail,
            end: tail,
            ksets: 0,
            n: 0,
            dirty: 0,
            bytes: 0,
        };
        self.plan_kset(key_num, size, &mut batch, out)?;
        Ok(WbPlan::Batch(batch))
    }

    /// Plans the kset after `batch` into `out` after the batch's extents, if
    /// it may join (see [`super::barriers`]): up to [`WB_KSETS_MAX`] and
    /// [`WB_STEP_BYTES`], while `out` holds another kset's keys, within one
    /// key-log segment, short of the key head. False if it may not.
    ///
    /// Between two calls requests go on: the key head and the barriers are
    /// read afresh, and the ksets already planned lie behind the key head, so
    /// a FLUSH meanwhile only ever ends the batch.
    pub(crate) fn plan_next(
        &mut self,
        batch: &mut WbBatch,
        out: &mut [WbExtent],
    ) -> Result<bool, CacheError> {
        let next_seq = self.t.dirty_seq + u64::from(batch.ksets);
        if batch.ksets as usize >= WB_KSETS_MAX
            || batch.bytes >= WB_STEP_BYTES
            || batch.end == self.key_head()
            || out.len().saturating_sub(batch.n) < KSET_KEYS_MAX
            || !self.log.with_head(|h| h.barriers.joins(next_seq))
        {
            return Ok(false);
        }
        // A LAST kset ends the batch (the next step moves the tail past it),
        // and so does one that does not read back: the next step plans it
        // alone and reports what is wrong.
        match self.read_kset(batch.end) {
            Ok(KsetRead::Keys { key_num, size }) => {
                self.plan_kset(key_num, size, batch, out)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Resolves the dirty, live keys of the kset in the scratch buffer into
    /// `out` after the batch's extents, and adds the kset to the batch.
    fn plan_kset(
        &mut self,
        key_num: u32,
        size: u32,
        batch: &mut WbBatch,
        out: &mut [WbExtent],
    ) -> Result<(), CacheError> {
        let seq = self.t.dirty_seq + u64::from(batch.ksets);
        let pass_over = self.log.with_head(|h| h.may_pass_over(seq));
        for i in 0..key_num as usize {
            let key = self.scratch_key(i)?;
            if !key.dirty() {
                continue;
            }
            // Counted as `key_append` and replay counted it, stale or not.
            batch.dirty += u64::from(key.len);
            // Stale: GC reclaimed it (never past the dirty tail). Not held at
            // all: discarded. Overwritten whole by writes since, with no FLUSH
            // or FUA between (`pass_over`): those writes are written back
            // later, and the backing device may skip this one. Otherwise a key
            // that a later write overwrote is still planned:
            // [`writeback_extents`] drops it only if a later key of the same
            // step covers it, so the backing device only ever holds a prefix
            // of the write history across FLUSHes.
            let live = !self.key_stale(&key)
                && if pass_over {
                    self.maps_part_of(&key)
                } else {
                    self.holds_any(key.off, u64::from(key.len))
                };
            if !live {
                continue;
            }
            let e = WbExtent {
                off: key.off,
                addr: self.pos_addr(key.pos),
                len: key.len,
                crc: key.has_crc().then_some(key.crc),
                order: batch.n as u32,
            };
            let slot = out
                .get_mut(batch.n)
                .ok_or(CacheError::NoMem("writeback extents"))?;
            *slot = e;
            batch.n += 1;
            batch.bytes += u64::from(key.len);
        }
        batch.end.off += size;
        batch.ksets += 1;
        Ok(())
    }
}
