//! The cache's background work: persisting idle ksets, writeback and GC, and
//! waking the requests that wait for room (upstream's `kset_flush_fn`,
//! `cache_writeback_fn` and `pcache_cache_gc_fn`, in one round).
//!
//! Writeback runs between watermarks of dirty data, when the cache goes
//! idle, or when room is short ([`super::watermark`]); GC and the persisting
//! of idle ksets run every round.
//!
//! There is one writeback path. [`Background::writeback_step`] plans the ksets at
//! the dirty tail under the control lock (taken once per kset), copies their extents to the backing
//! device with the lock let go (the copy waits for the backing device, and
//! requests are served meanwhile), and commits under the lock. The plan's
//! [`WbBatch`] pins the dirty tail while the copy runs, so no other writer
//! commits that kset and GC, which never passes the dirty tail, cannot free its
//! data segments for new writes to fill before the copy reads them.

use super::env::{Backing, Pmem, Waiting};
use super::error::CacheError;
use super::watermark::Watermark;
use super::writeback::{writeback_extents, Step, WbBatch, WbExtent, WbPlan, WB_KSETS_MAX};
use super::{Cache, Memory};
use core::ops::DerefMut;

/// Most writeback steps in one round, so that a round ends and a caller that
/// stops the work (suspend) does not wait long.
pub const STEPS_PER_ROUND: u32 = 16;

/// Most GC steps in one round: a GC step collects one kset and a writeback step
/// writes back up to [`WB_KSETS_MAX`], so GC keeps up with a round's writeback.
pub const GC_STEPS_PER_ROUND: u32 = STEPS_PER_ROUND * WB_KSETS_MAX as u32;

/// Bytes GC copies forward in one round before the round ends (the next
/// comes at once): ksets of large live keys would otherwise keep a round,
/// and a suspend waiting for it, copying for long.
pub const KEPT_BYTES_PER_ROUND: u64 = 16 << 20;

/// Most clean steps in one round (each looks at
/// [`super::io::CLEAN_KEYS_PER_STEP`] keys under one hold of the lock): a
/// round gets through 16K keys, and a longer pass goes on next round.
pub const CLEAN_STEPS_PER_ROUND: u32 = 64;

/// How long an open kset waits for more keys before a round persists it
/// (upstream: 1 s). Rounds come back to back while writeback has work, and
/// closing half-empty ksets at each would cost log space and keys per step
/// written back.
pub const KSET_IDLE_MS: u64 = 200;

/// What one round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Something moved: a kset was persisted, written back or collected.
    pub progress: bool,
    /// A step budget ran out with work left: run again soon.
    pub more: bool,
    /// Persisting idle ksets failed (no segment for the key log yet).
    pub flush_error: Option<CacheError>,
    /// Writeback failed; it retries the same kset next round.
    pub writeback_error: Option<CacheError>,
    pub gc_error: Option<CacheError>,
}

/// The writer's own handles on the two devices and its buffers: the part of
/// writeback that runs without the control lock.
pub struct Background<P, B, E, U> {
    pmem: P,
    backing: B,
    extents: E,
    bounce: U,
    /// When a round last persisted the open ksets.
    last_kset_flush_ms: Option<u64>,
    /// Whether writeback runs (see [`super::watermark`]).
    watermark: Watermark,
}

impl<P, B, E, U> Background<P, B, E, U>
where
    P: Pmem,
    B: Backing,
    E: DerefMut<Target = [WbExtent]>,
    U: DerefMut<Target = [u8]>,
{
    /// `extents` holds at least `KSET_KEYS_MAX` (up to
    /// [`super::writeback::WB_EXTENTS_MAX`]: more ksets a step); `bounce` at
    /// least 4 KiB (extents
    /// that fit in it together go out as one batch).
    pub fn new(pmem: P, backing: B, extents: E, bounce: U) -> Self {
        Background {
            pmem,
            backing,
            extents,
            bounce,
            last_kset_flush_ms: None,
            watermark: Watermark::default(),
        }
    }

    /// Plans the writeback of the ksets at the dirty tail, taking the engine's
    /// lock once per kset: resolving a kset's keys is an index lookup each, and
    /// a step of up to [`WB_KSETS_MAX`] ksets in one hold kept requests out for
    /// milliseconds. `Ok(None)`: nothing to copy now.
    pub fn plan<CP, CB, M>(
        &mut self,
        engine: &Cache<CP, CB, M>,
    ) -> Result<Option<WbBatch>, CacheError>
    where
        CP: Pmem,
        CB: Backing,
        M: Memory,
    {
        let Some(mut batch) = self.plan_start(engine)? else {
            return Ok(None);
        };
        while self.plan_more(engine, &mut batch)? {}
        Ok(Some(batch))
    }

    /// The first part of [`Self::plan`]: the kset at the dirty tail, in one
    /// hold of the control lock.
    pub fn plan_start<CP, CB, M>(
        &mut self,
        engine: &Cache<CP, CB, M>,
    ) -> Result<Option<WbBatch>, CacheError>
    where
        CP: Pmem,
        CB: Backing,
        M: Memory,
    {
        loop {
            match engine.writeback_plan(&mut self.extents)? {
                WbPlan::Idle => return Ok(None),
                WbPlan::Moved => continue,
                WbPlan::Batch(b) => return Ok(Some(b)),
            }
        }
    }

    /// The rest of [`Self::plan`], a kset per call and per hold of the engine's
    /// lock: false once `batch` is complete. After an error the batch is
    /// failed (see [`Cache::writeback_plan_more`]) and is dropped.
    pub fn plan_more<CP, CB, M>(
        &mut self,
        engine: &Cache<CP, CB, M>,
        batch: &mut WbBatch,
    ) -> Result<bool, CacheError>
    where
        CP: Pmem,
        CB: Backing,
        M: Memory,
    {
        engine.writeback_plan_more(batch, &mut self.extents)
    }

    /// Copies a planned batch to the backing device and flushes it (engine not
    /// locked: the batch pins the data it reads).
    pub fn copy(&mut self, batch: &WbBatch) -> Result<(), super::writeback::WbError> {
        let planned = self.extents.get_mut(..batch.n).unwrap_or_default();
        writeback_extents(&self.pmem, &self.backing, &mut self.bounce, planned)
    }

    /// Writes back the ksets at the dirty tail: plan, copy, commit.
    pub fn writeback_step<CP, CB, M>(
        &mut self,
        engine: &Cache<CP, CB, M>,
    ) -> Result<Step, CacheError>
    where
        CP: Pmem,
        CB: Backing,
        M: Memory,
    {
        let Some(batch) = self.plan(engine)? else {
            return Ok(Step::Idle);
        };
        match self.copy(&batch) {
            Ok(()) => {
                engine.writeback_commit(batch);
                Ok(Step::Progress)
            }
            Err(e) => Err(engine.writeback_failed(batch, e)),
        }
    }

    /// One round of background work: persist open ksets if [`KSET_IDLE_MS`]
    /// passed since the last time, or at once when `urgent` (a request waits
    /// for room, and the dirty keys of the open ksets cannot be written back
    /// before they are persisted), run up to [`STEPS_PER_ROUND`] writeback
    /// steps while [`super::watermark`] wants writeback (always when
    /// `urgent`), collect up to [`GC_STEPS_PER_ROUND`] ksets (fewer once GC
    /// copied [`KEPT_BYTES_PER_ROUND`] forward) and run up to
    /// [`CLEAN_STEPS_PER_ROUND`] steps of the clean pass, and wake the
    /// requests waiting for room if anything moved. While a request waits for
    /// room, or keys run short, GC also collects after each writeback step what
    /// that step passed: the room a write waits for comes a step of backing IO
    /// after writeback frees it, not a round's.
    pub fn run<CP, CB, M, W>(
        &mut self,
        engine: &Cache<CP, CB, M>,
        waiting: &W,
        urgent: bool,
    ) -> Round
    where
        CP: Pmem,
        CB: Backing,
        M: Memory,
        W: Waiting,
    {
        self.round(engine, waiting, urgent, STEPS_PER_ROUND)
    }

    /// The round a request that waits for room runs itself when no other is
    /// running ([`Waiting::kick`]): as [`Self::run`] with `urgent`, but one
    /// writeback step, after which GC collects what it passed. The request
    /// looks for its room after a step of backing IO, not after a round of
    /// them; the work item's rounds do the rest.
    pub fn run_for_waiter<CP, CB, M, W>(&mut self, engine: &Cache<CP, CB, M>, waiting: &W) -> Round
    where
        CP: Pmem,
        CB: Backing,
        M: Memory,
        W: Waiting,
    {
        self.round(engine, waiting, true, 1)
    }

    /// [`Self::run`] with at most `steps` writeback steps.
    fn round<CP, CB, M, W>(
        &mut self,
        engine: &Cache<CP, CB, M>,
        waiting: &W,
        urgent: bool,
        steps: u32,
    ) -> Round
    where
        CP: Pmem,
        CB: Backing,
        M: Memory,
        W: Waiting,
    {
        let mut round = Round::default();
        let now = waiting.now_ms();
        let due = urgent
            || self
                .last_kset_flush_ms
                .is_none_or(|t| now.saturating_sub(t) >= KSET_IDLE_MS);
        if due {
            self.last_kset_flush_ms = Some(now);
            let before = engine.ksets_written();
            match engine
                .flush_idle()
                .map(|()| engine.ksets_written() != before)
            {
                Ok(persisted) => round.progress |= persisted,
                Err(e) => round.flush_error = Some(e),
            }
        }
        let mut gc = GcBudget::default();
        self.watermark.observe(now, engine.dirty_logged());
        for i in 0..=steps {
            if i == steps {
                round.more = true;
                break;
            }
            let room_short = urgent || engine.gc_urgent() || engine.gc_waits_for_writeback();
            let wanted =
                self.watermark
                    .wants(now, engine.dirty_bytes(), engine.capacity(), room_short);
            if wanted.is_none() {
                break;
            }
            match self.writeback_step(engine) {
                Ok(Step::Progress) => {
                    round.progress = true;
                    if engine.gc_urgent() {
                        self.collect(engine, waiting, &mut round, &mut gc);
                    }
                }
                Ok(Step::Idle) => break,
                Err(e) => {
                    round.writeback_error = Some(e);
                    break;
                }
            }
        }
        self.collect(engine, waiting, &mut round, &mut gc);
        // The keys of the segments GC freed: only their nodes are held, so the
        // pass goes a step per hold of the lock, and wakes the requests waiting
        // for keys as it frees them.
        for i in 0..=CLEAN_STEPS_PER_ROUND {
            if i == CLEAN_STEPS_PER_ROUND {
                round.more = true;
                break;
            }
            match engine.clean_step() {
                Some(0) => {}
                Some(_) => round.progress = true,
                None => break,
            }
        }
        if round.progress {
            waiting.wake_all();
        }
        round
    }

    /// GC steps until GC has nothing to do or the round's GC budget (`gc`) is
    /// spent, copying forward the live clean data of each kset first (see
    /// [`super::forward`]).
    fn collect<CP, CB, M, W>(
        &mut self,
        engine: &Cache<CP, CB, M>,
        waiting: &W,
        round: &mut Round,
        gc: &mut GcBudget,
    ) where
        CP: Pmem,
        CB: Backing,
        M: Memory,
        W: Waiting,
    {
        while round.gc_error.is_none() {
            if gc.steps == GC_STEPS_PER_ROUND || gc.kept >= KEPT_BYTES_PER_ROUND {
                round.more = true;
                return;
            }
            gc.steps += 1;
            gc.kept += engine.gc_forward(&mut self.bounce);
            match engine.gc_step() {
                Ok(Step::Progress) => {
                    round.progress = true;
                    // Requests waiting for room look again now, not at the end of the
                    // round: a kset collected may have freed the segment they need.
                    waiting.wake_all();
                }
                Ok(Step::Idle) => return,
                Err(e) => round.gc_error = Some(e),
            }
        }
    }
}

/// What GC has spent of a round: steps, and bytes copied forward.
#[derive(Default)]
struct GcBudget {
    steps: u32,
    kept: u64,
}
