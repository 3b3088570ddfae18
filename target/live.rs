// SPDX-License-Identifier: GPL-2.0

//! A running cache: the engine, shared by every CPU with no lock of ours around it (its parts
//! have their own), the bios waiting for the request worker, the background writer, and the wait
//! queue of requests waiting for room.
//!
//! [`LiveCache`] gives the engine the host primitives it asks for ([`Waiting`]); the decisions
//! (when to wait, what a background round does) are the engine's. The request glue is in
//! [`super::requests`], the background glue in [`super::background`].

use super::{
    bio::BioQueue,
    counters::PerCpuCounters,
    dax::DaxMapping,
    device::TargetDevice,
    engine::{Dax, DaxRef, HitReader, KernelWritePath, PcacheEngine, SegmentPins, Writer},
    miss::MissQueue,
};
use crate::cache_core::{io::Gap, CacheError, Mode, RequestCounts, Waiting};
use core::sync::atomic::{AtomicBool, AtomicU32};
use kernel::{
    new_condvar, new_mutex, new_spinlock,
    prelude::*,
    sync::{Arc, CondVar, Mutex, SpinLock},
    time::{Instant, Monotonic},
};

/// The request worker's buffers, reserved at construction so that serving never allocates.
pub(crate) struct WorkerBuffers {
    /// The gaps of a read, room for every gap a read can have.
    pub(crate) gaps: KVVec<Gap>,
}

/// What the per-CPU request counters count (see [`RequestCounts`]).
#[derive(Clone, Copy)]
pub(crate) enum Count {
    ReadHit,
    ReadMiss,
    WriteHit,
    WriteMiss,
}

/// The per-CPU request counters of a running cache.
pub(crate) type RequestCounters = PerCpuCounters<4>;

/// A running cache instance, shared by `map`, the request worker and the background work.
#[pin_data]
pub(crate) struct LiveCache {
    /// Read misses in flight. First, so that it goes first: dropping it waits for the fills,
    /// which use the rest.
    pub(crate) misses: MissQueue,
    /// The engine: `&self` throughout, each of its parts under its own lock.
    pub(crate) engine: PcacheEngine,
    /// The request worker's gaps of a read: room for every gap a read can have.
    #[pin]
    pub(crate) worker_gaps: Mutex<KVVec<Gap>>,
    /// Bios `map` handed to the request worker.
    #[pin]
    pub(crate) pending: SpinLock<BioQueue>,
    /// The one background writer; whoever holds it runs a round.
    #[pin]
    pub(crate) writer: Mutex<Writer>,
    /// Counts wakes of requests waiting for room (see [`Waiting::ticket`]).
    #[pin]
    room_events: Mutex<u64>,
    #[pin]
    room: CondVar,
    /// Set once the instance is quiesced (suspended) or being destroyed: background work stops.
    pub(crate) quiesced: AtomicBool,
    /// First sector of the target in the mapped device.
    pub(crate) begin: u64,
    /// The engine's clock counts from here.
    started: Instant<Monotonic>,
    pub(crate) writeback_errors: AtomicU32,
    pub(crate) gc_errors: AtomicU32,
    /// Requests served, by kind: counted per CPU, outside the engine.
    counts: RequestCounters,
    /// The backing device, for discards passed down to it.
    pub(crate) backing: Arc<TargetDevice>,
    /// The backing device takes discards: pass ours on after dropping the cached keys.
    pub(crate) discard_passdown: bool,
    /// The cache device, and the pins of reads on its segments, for copies made outside the
    /// engine.
    pub(crate) dax: Arc<DaxMapping>,
    pub(crate) pins: Arc<SegmentPins>,
    /// Serves read hits outside the engine: the index's subtrees and the segment map.
    pub(crate) reader: HitReader,
    /// Commits writes outside the engine: the index and the key log.
    pub(crate) write_path: KernelWritePath,
    /// The cache mode caches writes (writeback, writeonly): `map` copies them outside the
    /// engine. Fixed for the life of the instance (the table sets the mode).
    pub(crate) caches_writes: bool,
    /// The cache mode caches what reads miss (all but writeonly). Fixed as `caches_writes` is.
    pub(crate) caches_misses: bool,
    /// The cache mode caches what writes through to the backing device took (writethrough).
    /// Fixed as `caches_writes` is.
    pub(crate) caches_writes_through: bool,
}

impl LiveCache {
    pub(crate) fn new(
        misses: MissQueue,
        engine: PcacheEngine,
        buffers: WorkerBuffers,
        writer: Writer,
        begin: u64,
        counts: RequestCounters,
        backing: Arc<TargetDevice>,
    ) -> impl PinInit<Self> {
        let discard_passdown = backing.supports_discard();
        let dax = engine.pmem().map.clone();
        let pins = engine.pmem().pins.clone();
        let caches_writes = !engine.writes_need_backing();
        let caches_misses = engine.mode().caches_misses();
        let caches_writes_through = engine.mode() == Mode::Writethrough;
        let reader = engine.reader();
        let write_path = engine.write_path();
        pin_init!(Self {
            misses,
            engine,
            worker_gaps <- new_mutex!(buffers.gaps),
            pending <- new_spinlock!(BioQueue::new()),
            writer <- new_mutex!(writer),
            room_events <- new_mutex!(0),
            room <- new_condvar!(),
            quiesced: AtomicBool::new(false),
            begin,
            started: Instant::now(),
            writeback_errors: AtomicU32::new(0),
            gc_errors: AtomicU32::new(0),
            counts,
            backing,
            discard_passdown,
            dax,
            pins,
            reader,
            write_path,
            caches_writes,
            caches_misses,
            caches_writes_through,
        })
    }

    /// The cache device as requests copy through it outside the engine.
    pub(crate) fn pmem(&self) -> DaxRef<'_> {
        Dax {
            map: &*self.dax,
            pins: &*self.pins,
        }
    }

    /// Counts one request of kind `c`.
    pub(crate) fn count(&self, c: Count) {
        self.counts.add(c as usize, 1);
    }

    /// The request counters, summed over the CPUs.
    pub(crate) fn request_counts(&self) -> RequestCounts {
        let n = |c: Count| self.counts.sum(c as usize);
        RequestCounts {
            read_hits: n(Count::ReadHit),
            read_misses: n(Count::ReadMiss),
            write_hits: n(Count::WriteHit),
            write_misses: n(Count::WriteMiss),
        }
    }

    /// `stats reset`: the request counters and the engine's.
    pub(crate) fn reset_stats(&self) {
        self.counts.reset();
        self.engine.reset_stats();
    }
}

impl Waiting for LiveCache {
    fn ticket(&self) -> u64 {
        *self.room_events.lock()
    }

    fn wait(&self, ticket: u64, timeout_ms: u32) -> bool {
        let mut events = self.room_events.lock();
        if *events == ticket {
            // Only kworkers wait here, and they take no signals; a spurious wake is a look
            // at the cache that finds it still full.
            let _ = self.room.wait_interruptible_timeout(
                &mut events,
                kernel::time::msecs_to_jiffies(timeout_ms),
            );
        }
        *events != ticket
    }

    fn wake_all(&self) {
        *self.room_events.lock() += 1;
        self.room.notify_all();
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis().unsigned_abs()
    }

    fn kick(&self) {
        // Run a short round here unless one is running (it wakes us when it makes progress):
        // one writeback step and the GC after it, so that this request waits for one step of
        // backing IO, not a round's. A request waits for room: the open ksets are persisted at
        // once, so that writeback can take their keys.
        if let Some(mut writer) = self.writer.try_lock() {
            let round = writer.run_for_waiter(&self.engine, self);
            drop(writer);
            self.report(&round);
        }
    }
}

/// [`super::miss::FillFn`] of a running cache's miss queue.
///
/// # Safety
///
/// `ctx` must point to the live [`LiveCache`] that owns the queue.
pub(crate) unsafe extern "C" fn fill_misses(ctx: *mut core::ffi::c_void) {
    // SAFETY: the queue is bound to its `LiveCache` (`Running::start`), which drops the queue,
    // waiting for this work, before anything else of it goes.
    let live = unsafe { &*ctx.cast::<LiveCache>() };
    live.run_fills();
}

/// Prints an engine error with the engine's own wording.
pub(crate) struct ErrorText<'a>(pub(crate) &'a CacheError);

impl kernel::fmt::Display for ErrorText<'_> {
    fn fmt(&self, f: &mut kernel::fmt::Formatter<'_>) -> kernel::fmt::Result {
        core::fmt::Display::fmt(self.0, f)
    }
}
