// SPDX-License-Identifier: GPL-2.0

//! dm-pcache-rs: a device-mapper target (`pcache_rs`) that caches a block device in persistent
//! memory mapped through DAX, with the on-media format of upstream dm-pcache.
//!
//! The cache engine (`cache_core/`, over the format in `meta/`) runs under one mutex. `map`
//! serves what needs no backing IO itself, in the submitter's context: writes are copied into
//! pmem and logged, flushes persist the key log, reads the cache holds entirely are copied out.
//! Read misses, and writes that find the cache full, go to the target's request worker, which
//! may wait for the backing device and for writeback to make room. A periodic background tick
//! writes dirty data back, collects free segments and persists idle ksets. `target/` holds all
//! `unsafe` code: the bindings and their safe wrappers.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use kernel::{
    new_mutex, new_spinlock,
    prelude::*,
    sync::{Arc, Mutex, SpinLock},
};

// The engine and the on-media format are shared with the host test crate, where they are
// public; here nothing outside the crate sees them, and some items serve only the host tests.
#[allow(unreachable_pub, dead_code, unused_imports)]
mod cache_core;
#[allow(unreachable_pub, dead_code)]
mod meta;
mod target;

use cache_core::{
    writeback::{Step, WbPlan},
    CacheError, CacheOptions,
};
use target::{
    args::Args,
    bio::{BioOp, BioQueue, HeldBio},
    dax::{DaxError, DaxMapping},
    device::TargetDevice,
    engine::{BackingIo, DaxPmem, Engine, Sizing, StartError, Writeback},
    status::{StatusType, StatusWriter},
    table::{self, TableError, TableOptions, MAX_ARGS},
    target_type::{
        CtrError, DeviceVisitor, MapResult, QueueLimits, Registration, Target, TargetOperations,
    },
    work::{Ticker, WorkQueue, Worker},
};

module! {
    type: PcacheModule,
    name: "dm_pcache_rs",
    authors: ["dm-pcache-rs developers"],
    description: "device-mapper persistent-memory cache target (pcache_rs)",
    license: "GPL",
}

/// Largest bio the worker handles at once; device-mapper splits larger ones. It sizes the
/// request bounce buffer.
const MAX_IO_SECTORS: u64 = 2048;
/// Period of the background tick (writeback, GC, idle kset flush).
const TICK_MS: u32 = 200;
/// Most writeback or GC steps per tick, so that requests are not starved of the engine lock.
const STEPS_PER_TICK: u32 = 16;
/// How long a request waits for space before it fails (only if writeback cannot progress,
/// i.e. the backing device keeps failing).
const BUSY_TIMEOUT_MS: u32 = 30_000;

/// Cache devices with a live instance, so two instances never drive one pmem device. A slot
/// holds `devt << 1 | quiesced`; a suspended (quiesced) instance lets a reloaded table attach.
static ACTIVE: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];

/// A claim on a slot of [`ACTIVE`], released on drop.
struct ActiveClaim(usize);

impl ActiveClaim {
    fn claim(devt: u32) -> Result<Self, CtrError> {
        let key = u64::from(devt) << 1;
        if ACTIVE.iter().any(|s| s.load(Ordering::Acquire) == key) {
            return Err(CtrError::new(
                c"Cache device is in use by another pcache_rs device",
                EBUSY,
            ));
        }
        for (i, slot) in ACTIVE.iter().enumerate() {
            if slot
                .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(Self(i));
            }
        }
        Err(CtrError::new(c"Too many pcache_rs devices", ENOSPC))
    }

    fn set_quiesced(&self, quiesced: bool) {
        if let Some(slot) = ACTIVE.get(self.0) {
            let v = slot.load(Ordering::Acquire);
            slot.store((v & !1) | u64::from(quiesced), Ordering::Release);
        }
    }
}

impl Drop for ActiveClaim {
    fn drop(&mut self) {
        if let Some(slot) = ACTIVE.get(self.0) {
            slot.store(0, Ordering::Release);
        }
    }
}

/// Prints an engine error with the engine's own wording.
struct Shown<'a>(&'a CacheError);

impl kernel::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut kernel::fmt::Formatter<'_>) -> kernel::fmt::Result {
        core::fmt::Display::fmt(self.0, f)
    }
}

/// Where a request is served: in `map`, in the submitter's context, where waiting for a bio of
/// our own would deadlock (device-mapper defers bios submitted from `map` until it returns); or
/// on the request worker, which may wait for the backing device and for space.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Where {
    Map,
    Worker,
}

/// What the request worker and the background tick share.
struct State {
    engine: Engine,
    /// Request data is staged here (bios are scattered pages; the engine takes slices).
    bounce: KVVec<u8>,
}

#[pin_data]
struct Inner {
    #[pin]
    state: Mutex<State>,
    #[pin]
    pending: SpinLock<BioQueue>,
    /// The tick's writeback, which copies outside `state` (only the tick takes this lock).
    #[pin]
    writeback: Mutex<Writeback>,
    /// Set once the instance is quiesced (suspended) or being destroyed: the tick stops writing.
    quiesced: AtomicBool,
    /// First sector of the target in the mapped device.
    begin: u64,
    writeback_errors: AtomicU32,
    gc_errors: AtomicU32,
}

impl Inner {
    /// The request worker: drains the queue of held bios.
    fn run_requests(&self) {
        loop {
            // The queue's spinlock is released at the end of this statement, before the bio is
            // handled (which sleeps): a `while let` on the guard would hold it for the body.
            let next = self.pending.lock().pop();
            let Some(mut bio) = next else {
                break;
            };
            let result = self.handle(&mut bio);
            bio.end(result);
        }
    }

    /// Serves a bio the worker took from the queue, waiting for room if the cache is full.
    fn handle(&self, bio: &mut HeldBio) -> Result {
        self.retry_busy(|st| self.serve(st, bio, Where::Worker))
    }

    /// Serves `bio` in `map` if that needs neither the backing device nor waiting for space
    /// (a write or flush with room in the cache, a read the cache holds entirely): no context
    /// switch to the worker, as upstream and dm-writecache do. `None` hands it to the worker.
    fn serve_inline(&self, bio: &mut HeldBio) -> Option<Result> {
        let mut st = self.state.lock();
        self.serve(&mut st, bio, Where::Map)
    }

    /// One attempt at `bio` under the engine lock. `None`: it cannot complete here and now:
    /// the cache is full, or (in `map`) it needs the backing device. A write that stops on a
    /// full cache may have cached a leading part; serving it again rewrites the same bytes.
    fn serve(&self, st: &mut State, bio: &mut HeldBio, at: Where) -> Option<Result> {
        let off = (bio.sector().saturating_sub(self.begin)) << 9;
        let len = bio.size() as usize;
        let op = bio.op();
        if bio.is_preflush() || op == BioOp::Flush {
            let done = Self::outcome(st.engine.flush())?;
            if done.is_err() || op == BioOp::Flush {
                return Some(done);
            }
        }
        let fua = bio.is_fua();
        let State { engine, bounce } = st;
        match op {
            BioOp::Flush => Some(Ok(())),
            BioOp::Write => {
                let Some(buf) = bounce.get_mut(..len) else {
                    return Some(Err(EINVAL));
                };
                if let Err(e) = bio.copy_to(buf) {
                    return Some(Err(e));
                }
                Self::outcome(engine.write(off, buf, fua))
            }
            BioOp::Read => {
                let Some(buf) = bounce.get_mut(..len) else {
                    return Some(Err(EINVAL));
                };
                let read = match at {
                    Where::Map => engine.read_cached(off, buf),
                    Where::Worker => engine.read(off, buf).map(Some),
                };
                match read {
                    Ok(Some(_)) => Some(bio.copy_from(buf)),
                    Ok(None) => None,
                    Err(e) => Some(Err(Self::failed(&e))),
                }
            }
            BioOp::Discard | BioOp::WriteZeroes | BioOp::Other => Some(Err(EOPNOTSUPP)),
        }
    }

    /// An engine result as a bio's: `None` when the cache is full.
    fn outcome(r: Result<(), CacheError>) -> Option<Result> {
        match r {
            Ok(()) => Some(Ok(())),
            Err(CacheError::Busy(_)) => None,
            Err(e) => Some(Err(Self::failed(&e))),
        }
    }

    fn failed(e: &CacheError) -> Error {
        pr_err!("pcache_rs: request failed: {}\n", Shown(e));
        EIO
    }

    /// Runs `attempt` under the engine lock until it completes (`Some`); while the cache is
    /// full (`None`) makes room by writeback and GC in between, so the submitter never sees
    /// `EBUSY`. The lock is let go while waiting, so that `map` goes on serving meanwhile.
    fn retry_busy(&self, mut attempt: impl FnMut(&mut State) -> Option<Result>) -> Result {
        let mut waited_ms = 0;
        loop {
            let mut st = self.state.lock();
            if let Some(result) = attempt(&mut st) {
                return result;
            }
            if Self::make_room(&mut st.engine) {
                continue;
            }
            drop(st);
            if waited_ms >= BUSY_TIMEOUT_MS {
                pr_err!("pcache_rs: cache full and writeback cannot make progress\n");
                return Err(EIO);
            }
            target::work::sleep_ms(10);
            waited_ms += 10;
        }
    }

    /// One round of making room in a full cache: persist open ksets (their keys cannot be
    /// written back before), write back, collect. Returns whether anything progressed.
    fn make_room(engine: &mut Engine) -> bool {
        // A Busy flush (no segment for the key log) is what writeback and GC then resolve.
        let _ = engine.flush();
        let wb = engine.writeback_step();
        let gc = engine.gc_step();
        matches!(wb, Ok(Step::Progress)) || matches!(gc, Ok(Step::Progress))
    }

    /// The background tick: idle kset flush, writeback, GC. The engine lock is taken per step
    /// (writeback waits for the backing device), so requests in `map` get in between.
    fn tick(&self) {
        if self.quiesced.load(Ordering::Acquire) {
            return;
        }
        if self.state.lock().engine.flush_idle().is_err() {
            self.writeback_errors.fetch_add(1, Ordering::Relaxed);
        }
        for _ in 0..STEPS_PER_TICK {
            match self.writeback_step() {
                Ok(Step::Progress) => {}
                Ok(Step::Idle) => break,
                Err(e) => {
                    // Counted and retried on the next tick: nothing is dropped. A dead backing
                    // device fails every tick, so only the 1st, 2nd, 4th, 8th, ... are logged.
                    let n = self.writeback_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        pr_warn!(
                            "pcache_rs: writeback: {} ({} errors so far)\n",
                            Shown(&e),
                            n
                        );
                    }
                    break;
                }
            }
        }
        for _ in 0..STEPS_PER_TICK {
            let step = self.state.lock().engine.gc_step();
            match step {
                Ok(Step::Progress) => {}
                Ok(Step::Idle) => break,
                Err(e) => {
                    let n = self.gc_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        pr_warn!("pcache_rs: gc: {} ({} errors so far)\n", Shown(&e), n);
                    }
                    break;
                }
            }
        }
    }

    /// Writes back the kset at the dirty tail, holding the engine lock only to plan and to
    /// commit: the copy waits for the backing device.
    fn writeback_step(&self) -> Result<Step, CacheError> {
        let mut wb = self.writeback.lock();
        let plan = self.state.lock().engine.writeback_plan(wb.extents_mut())?;
        let batch = match plan {
            WbPlan::Idle => return Ok(Step::Idle),
            WbPlan::Moved => return Ok(Step::Progress),
            WbPlan::Batch(b) => b,
        };
        let copied = wb.copy(batch.n);
        let mut st = self.state.lock();
        match copied {
            Ok(()) => {
                // False if the worker, making room, wrote the same kset back meanwhile.
                st.engine.writeback_commit(batch);
                Ok(Step::Progress)
            }
            Err(e) => Err(st.engine.writeback_failed(e)),
        }
    }

    /// Persists everything acknowledged, so a later instance (reload) or a power cut finds it.
    fn quiesce(&self) {
        self.quiesced.store(true, Ordering::Release);
        if let Err(e) = self.retry_busy(|st| Self::outcome(st.engine.flush())) {
            pr_err!("pcache_rs: persisting the key log failed: {:?}\n", e);
        }
    }
}

/// One `pcache_rs` target instance.
///
/// Fields drop in order: the tick and the worker are cancelled before the workqueue goes, and
/// all of them before the engine and the devices in `inner`.
struct Pcache {
    ticker: Ticker<Inner>,
    worker: Worker<Inner>,
    wq: WorkQueue,
    inner: Arc<Inner>,
    cache_dev: Arc<DaxMapping>,
    backing: Arc<TargetDevice>,
    options: TableOptions,
    seg_num: u64,
    claim: ActiveClaim,
}

fn cache_error(e: &CacheError) -> CtrError {
    match e {
        CacheError::Meta(_) => CtrError::new(c"Cache device metadata is invalid", EINVAL),
        CacheError::Io(_) => CtrError::new(c"Cache device IO error", EIO),
        CacheError::Invalid(_) => CtrError::new(c"Cache device does not match the table", EINVAL),
        CacheError::NoMem(_) | CacheError::Busy(_) => {
            CtrError::new(c"Cannot allocate cache memory", ENOMEM)
        }
    }
}

impl Pcache {
    fn new(target: &mut Target<'_>, args: &Args<'_>) -> Result<Self, CtrError> {
        let mut words = [&[][..]; MAX_ARGS];
        let line = args
            .to_bytes(&mut words)
            .ok_or(TableError::ArgCount)
            .and_then(table::parse_table)
            .map_err(|e| {
                pr_err!(
                    "pcache_rs: bad table line: {}\n",
                    e.message().to_str().unwrap_or("?")
                );
                CtrError::new(e.message(), EINVAL)
            })?;
        // `parse_table` succeeded, so the two device arguments exist.
        let (Some(cache_path), Some(backing_path)) = (args.get(0), args.get(1)) else {
            return Err(CtrError::new(TableError::ArgCount.message(), EINVAL));
        };

        let cache = target.get_device(cache_path).map_err(|e| {
            pr_err!(
                "pcache_rs: cannot open cache device {:?}: {:?}\n",
                cache_path,
                e
            );
            CtrError::new(c"Cache device lookup failed", e)
        })?;
        let backing = target.get_device(backing_path).map_err(|e| {
            pr_err!(
                "pcache_rs: cannot open backing device {:?}: {:?}\n",
                backing_path,
                e
            );
            CtrError::new(c"Backing device lookup failed", e)
        })?;
        if cache.is_same(&backing) {
            pr_err!(
                "pcache_rs: cache and backing device are both {}\n",
                cache.name()
            );
            return Err(CtrError::new(
                c"Cache and backing device are the same",
                EINVAL,
            ));
        }
        let backing_sectors = backing.size_bytes() >> 9;
        if target.len() > backing_sectors {
            pr_err!(
                "pcache_rs: target length {} exceeds backing device ({} sectors)\n",
                target.len(),
                backing_sectors
            );
            return Err(CtrError::new(
                c"Target length exceeds backing device",
                EINVAL,
            ));
        }

        let cache_bytes = cache.size_bytes();
        let cache =
            DaxMapping::new(cache, meta::layout::CACHE_DEV_SIZE_MIN).map_err(|e| match e {
                DaxError::NotDax => {
                    pr_err!(
                        "pcache_rs: cache device {:?} does not support DAX\n",
                        cache_path
                    );
                    CtrError::new(c"Cache device does not support DAX", EOPNOTSUPP)
                }
                DaxError::TooSmall => {
                    pr_err!(
                        "pcache_rs: cache device has {} bytes, at least {} needed\n",
                        cache_bytes,
                        meta::layout::CACHE_DEV_SIZE_MIN
                    );
                    CtrError::new(c"Cache device too small", ENOSPC)
                }
                DaxError::Map(e) => {
                    pr_err!("pcache_rs: cannot map cache device through DAX: {:?}\n", e);
                    CtrError::new(c"Cache device DAX mapping failed", e)
                }
            })?;
        let claim = ActiveClaim::claim(cache.device().devt()).inspect_err(|_| {
            pr_err!(
                "pcache_rs: cache device {} is already in use\n",
                cache.device().name()
            );
        })?;
        let cache = Arc::new(cache, GFP_KERNEL)
            .map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))?;
        let backing = Arc::new(backing, GFP_KERNEL)
            .map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))?;

        let geo = meta::layout::Geometry::UPSTREAM;
        let seg_num = geo.max_segs(cache.len());
        // The key pool bounds how many extents the index holds. One key per 2 KiB of cache
        // (about 32 MiB of keys per GiB) covers 4 KiB-and-larger writes with room to spare;
        // when small writes exhaust it, requests wait for writeback and GC like a full cache.
        let keys = (seg_num * u64::from(geo.seg_data_size()) / 2048).min(1 << 22) as usize;
        let sizing = Sizing {
            keys,
            ksets: 4,
            heads: 1,
            bounce: 256 << 10,
        };
        let opts = CacheOptions {
            data_crc: line.options.data_crc,
            ..CacheOptions::default()
        };
        let engine = Engine::start(
            DaxPmem(cache.clone()),
            BackingIo(backing.clone()),
            &sizing,
            &opts,
        )
        .map_err(|e| match e {
            StartError::NoMem => CtrError::new(c"Cannot allocate cache memory", ENOMEM),
            StartError::Cache(e) => {
                pr_err!(
                    "pcache_rs: cannot attach cache device {}: {}\n",
                    cache.device().name(),
                    Shown(&e)
                );
                cache_error(&e)
            }
        })?;
        let bounce = KVVec::from_elem(0u8, (MAX_IO_SECTORS << 9) as usize, GFP_KERNEL)
            .map_err(|_| CtrError::new(c"Cannot allocate cache memory", ENOMEM))?;
        let writeback = Writeback::new(
            cache.clone(),
            backing.clone(),
            (MAX_IO_SECTORS << 9) as usize,
        )
        .map_err(|_| CtrError::new(c"Cannot allocate cache memory", ENOMEM))?;

        let begin = target.begin();
        let inner = Arc::pin_init(
            pin_init!(Inner {
                state <- new_mutex!(State { engine, bounce }),
                pending <- new_spinlock!(BioQueue::new()),
                writeback <- new_mutex!(writeback),
                quiesced: AtomicBool::new(false),
                begin,
                writeback_errors: AtomicU32::new(0),
                gc_errors: AtomicU32::new(0),
            }),
            GFP_KERNEL,
        )
        .map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))?;
        let wq =
            WorkQueue::new(c"wq").map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        let worker = Worker::new(&wq, inner.clone(), Inner::run_requests)
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        let ticker = Ticker::new(&wq, inner.clone(), Inner::tick, TICK_MS)
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        target
            .set_max_io_len(MAX_IO_SECTORS)
            .map_err(|e| CtrError::new(c"Cannot set the maximum IO size", e))?;
        ticker.start();

        Ok(Self {
            ticker,
            worker,
            wq,
            inner,
            cache_dev: cache,
            backing,
            options: line.options,
            seg_num,
            claim,
        })
    }
}

impl Drop for Pcache {
    fn drop(&mut self) {
        // Device-mapper ends all IO before `dtr`; stop the tick, let queued work finish, and
        // persist what was acknowledged. A suspended instance already did (and a reloaded
        // table may own the device now), so it must not touch pmem again.
        self.ticker.stop();
        self.wq.drain();
        if !self.inner.quiesced.load(Ordering::Acquire) {
            self.inner.quiesce();
        }
    }
}

#[vtable]
impl TargetOperations for Pcache {
    fn ctr(target: &mut Target<'_>, args: Args<'_>) -> Result<Pin<KBox<Self>>, CtrError> {
        let this = Self::new(target, &args)?;
        target.set_num_flush_bios(1);
        target.set_flush_supported(true);
        KBox::pin(this, GFP_KERNEL).map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))
    }

    fn map(&self, _target: &Target<'_>, bio: &mut target::bio::Bio<'_>) -> MapResult {
        let (mut held, taken) = bio.take();
        match self.inner.serve_inline(&mut held) {
            Some(result) => held.end(result),
            None => {
                self.inner.pending.lock().push(held);
                self.worker.queue();
            }
        }
        MapResult::Submitted(taken)
    }

    fn postsuspend(&self) {
        self.ticker.stop();
        self.wq.drain();
        self.inner.quiesce();
        self.claim.set_quiesced(true);
    }

    fn resume(&self) {
        self.claim.set_quiesced(false);
        if self.inner.quiesced.swap(false, Ordering::AcqRel) {
            self.ticker.start();
        }
    }

    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>) {
        // A full buffer cuts the line; device-mapper then asks again with a larger one.
        let _ = match kind {
            StatusType::Info => {
                let s = self.inner.state.lock().engine.status();
                // Upstream's fields: sb flags, segments on the device, segments of the cache,
                // used segments, gc_percent, cache_info flags, key head, dirty tail, key tail.
                write!(
                    out,
                    "{:x} {} {} {} {} {:x} {}:{} {}:{} {}:{}",
                    0,
                    self.seg_num,
                    s.n_segs,
                    s.used_segs,
                    s.gc_percent,
                    s.cache_flags,
                    s.key_head.seg,
                    s.key_head.off,
                    s.dirty_tail.seg,
                    s.dirty_tail.off,
                    s.key_tail.seg,
                    s.key_tail.off
                )
            }
            StatusType::Table => {
                let options = TableOptions {
                    data_crc: self.inner.state.lock().engine.data_crc(),
                    ..self.options
                };
                table::write_table(
                    out,
                    self.cache_dev.device().name(),
                    self.backing.name(),
                    &options,
                )
            }
            StatusType::Ima => Ok(()),
        };
    }

    fn message(&self, args: Args<'_>, _out: &mut StatusWriter<'_>) -> Result {
        let mut words = [&[][..]; MAX_ARGS];
        let parsed = args
            .to_bytes(&mut words)
            .ok_or(table::MessageError::ArgCount)
            .and_then(table::parse_message);
        match parsed {
            Ok(table::Message::GcPercent(p)) => self
                .inner
                .state
                .lock()
                .engine
                .set_gc_percent(p)
                .map_err(|e| {
                    pr_err!("pcache_rs: gc_percent: {}\n", Shown(&e));
                    EIO
                }),
            Ok(table::Message::DataCrc(on)) => self
                .inner
                .state
                .lock()
                .engine
                .set_data_crc(on)
                .map_err(|e| {
                    pr_err!("pcache_rs: data_crc: {}\n", Shown(&e));
                    EIO
                }),
            Err(e) => {
                pr_err!("pcache_rs: message rejected: {}\n", e.as_str());
                Err(EINVAL)
            }
        }
    }

    fn iterate_devices(&self, target: &Target<'_>, visitor: &mut DeviceVisitor<'_>) -> c_int {
        // Only the backing device bounds the mapped device's limits: the cache device is
        // addressed by byte copies, never by bios of the upper layer.
        visitor.visit(&self.backing, 0, target.len())
    }

    fn io_hints(&self, limits: &mut QueueLimits<'_>) {
        // The request worker stages at most `MAX_IO_SECTORS` at a time (device-mapper splits
        // larger bios): say so, so that upper layers build bios of that size to begin with.
        limits.limit_max_sectors(MAX_IO_SECTORS as u32);
    }
}

#[pin_data]
struct PcacheModule {
    #[pin]
    target: Registration<Pcache>,
}

impl kernel::InPlaceModule for PcacheModule {
    fn init(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            target <- Registration::new(
                c"pcache_rs",
                [0, 2, 0],
                u64::from(target::bindings::DM_TARGET_SINGLETON),
                module
            ),
        })
    }
}
