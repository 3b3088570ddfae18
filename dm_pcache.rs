// SPDX-License-Identifier: GPL-2.0

//! dm-pcache-rs: a device-mapper target (`pcache_rs`) that caches a block device in persistent
//! memory mapped through DAX, with the on-media format of upstream dm-pcache.
//!
//! The cache engine (`cache_core/`, over the format in `meta/`) owns the cache's policy:
//! serving requests and waiting for room, writeback, GC and kset flushing. `target/` gives it
//! the kernel's primitives (pmem, backing IO, spinlocks, a wait queue, work items) and holds all
//! `unsafe` code. This file is the module and the target's `#[vtable]` operations.

use core::sync::atomic::Ordering;
use kernel::{
    prelude::*,
    sync::{Arc, SetOnce},
};

// The engine and the on-media format are shared with the host test crate, where they are
// public; here nothing outside the crate sees them, and some items serve only the host tests.
#[allow(unreachable_pub, dead_code, unused_imports)]
mod cache_core;
#[allow(unreachable_pub, dead_code)]
mod meta;
mod target;

use target::{
    args::Args,
    background::TICK_MS,
    bio::Bio,
    claim::{ActiveClaim, Held},
    construct::{self, Devices, MAX_IO_SECTORS},
    engine::PcacheEngine,
    live::{fill_misses, ErrorText, LiveCache, RequestCounters},
    miss::MissQueue,
    report,
    status::{StatusType, StatusWriter},
    table::{self, MAX_ARGS},
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

/// One `pcache_rs` target instance: the devices its table names and, once started, the running
/// cache. It starts in the constructor, or, when the table reloads a device that runs on the same
/// cache device (see [`target::claim`]), in `preresume`, after the old table is gone.
struct Pcache {
    run: SetOnce<Running>,
    devices: Devices,
    /// First sector of the target in the mapped device.
    begin: u64,
    /// The mapped device the table belongs to.
    md: usize,
}

/// A running cache and its work items.
///
/// Fields drop in order: the tick and the worker are cancelled before the running cache and its
/// claim on the cache device go.
struct Running {
    ticker: Ticker<LiveCache>,
    worker: Worker<LiveCache>,
    wq: Arc<WorkQueue>,
    live: Arc<LiveCache>,
    claim: ActiveClaim,
}

impl Running {
    /// Starts the engine on the claimed cache device and the work items around it.
    fn start(devices: &Devices, claim: ActiveClaim, begin: u64) -> Result<Self, CtrError> {
        let started = construct::start(devices, claim)?;
        let counts = RequestCounters::new()
            .map_err(|e| CtrError::new(c"Cannot allocate the statistics counters", e))?;
        let wq = WorkQueue::new(c"wq")
            .and_then(|wq| Ok(Arc::new(wq, GFP_KERNEL)?))
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        let misses = MissQueue::new(&wq)
            .map_err(|e| CtrError::new(c"Cannot allocate the read-miss bio set", e))?;
        let live = Arc::pin_init(
            LiveCache::new(
                misses,
                started.engine,
                started.buffers,
                started.writer,
                begin,
                counts,
                devices.backing.clone(),
            ),
            GFP_KERNEL,
        )
        .map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))?;
        // SAFETY: the queue is a field of `live`, which outlives it, and is bound before any
        // bio reaches the instance.
        unsafe {
            live.misses
                .bind(fill_misses, (&raw const *live).cast::<core::ffi::c_void>())
        };
        let worker = Worker::new(&wq, live.clone(), LiveCache::run_requests)
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        let ticker = Ticker::new(&wq, live.clone(), LiveCache::tick, TICK_MS)
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        ticker.start();
        Ok(Self {
            ticker,
            worker,
            wq,
            live,
            claim: started.claim,
        })
    }

    fn engine(&self) -> &PcacheEngine {
        &self.live.engine
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Device-mapper ends all IO before `dtr`; stop the tick, let queued work finish, and
        // persist what was acknowledged. A suspended instance already did (and a reloaded
        // table takes over the device once this one and its claim are gone).
        self.ticker.stop();
        self.wq.drain();
        if !self.live.quiesced.load(Ordering::Acquire) {
            self.live.quiesce();
        }
    }
}

impl Pcache {
    fn new(target: &mut Target<'_>, args: &Args<'_>) -> Result<Self, CtrError> {
        let devices = construct::open(target, args)?;
        target
            .set_max_io_len(MAX_IO_SECTORS)
            .map_err(|e| CtrError::new(c"Cannot set the maximum IO size", e))?;
        let this = Self {
            run: SetOnce::new(),
            devices,
            begin: target.begin(),
            md: target.mapped_device_id(),
        };
        match ActiveClaim::claim(this.devices.cache_dev.device().devt(), this.md) {
            Ok(claim) => {
                let running = Running::start(&this.devices, claim, this.begin)?;
                // A fresh `SetOnce` takes its first value.
                this.run.populate(running);
            }
            // A reload of this device: validated; it starts in `preresume`.
            Err(Held::ByThisDevice) => pr_info!(
                "pcache_rs: cache device {} is live: the new table takes over at resume\n",
                this.devices.cache_dev.device().name()
            ),
            Err(held) => {
                pr_err!(
                    "pcache_rs: cache device {} is already in use\n",
                    this.devices.cache_dev.device().name()
                );
                return Err(held.ctr_error());
            }
        }
        Ok(this)
    }

    fn running(&self) -> Option<&Running> {
        self.run.as_ref()
    }
}

#[vtable]
impl TargetOperations for Pcache {
    fn ctr(target: &mut Target<'_>, args: Args<'_>) -> Result<Pin<KBox<Self>>, CtrError> {
        let this = Self::new(target, &args)?;
        target.set_num_flush_bios(1);
        target.set_flush_supported(true);
        // Discards drop cached keys whether or not the backing device takes them too.
        target.set_num_discard_bios(1);
        target.set_discards_supported(true);
        target.set_num_write_zeroes_bios(1);
        target.set_per_io_data_size(target::miss::per_bio_data());
        KBox::pin(this, GFP_KERNEL).map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))
    }

    fn map(&self, _target: &Target<'_>, bio: Bio<'_>) -> MapResult {
        // Device-mapper maps bios only after a resume, which started the cache.
        let Some(run) = self.running() else {
            return MapResult::Kill;
        };
        let (mut held, taken) = bio.take();
        // A `REQ_NOWAIT` bio's submitter must not wait here; the test kernel checks that
        // nothing on its way (served, ended with `EAGAIN`, or queued for the worker) sleeps.
        let _no_sleep = target::cpu::NoSleep::enter(held.is_nowait());
        match run.live.serve_inline(&mut held) {
            Some(served) => run.live.dispatch(held, served),
            None => {
                run.live.pending.lock().push(held);
                run.worker.queue();
            }
        }
        MapResult::Submitted(taken)
    }

    fn postsuspend(&self) {
        if let Some(run) = self.running() {
            run.ticker.stop();
            run.wq.drain();
            run.live.quiesce();
            run.claim.set_quiesced(true);
        }
    }

    fn preresume(&self) -> Result {
        if self.running().is_some() {
            return Ok(());
        }
        // A reload: the old instance is suspended and quiesced (device-mapper destroys it after
        // the resume), so this one takes the cache device over.
        let name = self.devices.cache_dev.device().name();
        let started = ActiveClaim::take_over(self.devices.cache_dev.device().devt(), self.md)
            .map_err(|held| held.ctr_error())
            .and_then(|claim| Running::start(&self.devices, claim, self.begin));
        match started {
            Ok(running) => {
                self.run.populate(running);
                pr_info!(
                    "pcache_rs: cache device {} taken over by the new table\n",
                    name
                );
                Ok(())
            }
            Err(e) => {
                pr_err!(
                    "pcache_rs: cannot start the new table on {}: {}\n",
                    name,
                    e.msg.to_str().unwrap_or("?")
                );
                Err(e.err)
            }
        }
    }

    fn resume(&self) {
        if let Some(run) = self.running() {
            run.claim.set_quiesced(false);
            if run.live.quiesced.swap(false, Ordering::AcqRel) {
                run.ticker.start();
            }
        }
    }

    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>) {
        let d = &self.devices;
        // A full buffer cuts the line; device-mapper then asks again with a larger one.
        let _ = match (kind, self.running()) {
            (StatusType::Info, Some(run)) => {
                let s = run.engine().status();
                report::write_status(out, d.seg_num, &s, &run.live.request_counts())
            }
            // A loaded table that has not taken over yet has no state to show.
            (StatusType::Info, None) => Ok(()),
            (StatusType::Table, run) => report::write_table_line(
                out,
                d.cache_dev.device().name(),
                d.backing.name(),
                &d.options,
                run.map_or(d.options.data_crc, |r| r.engine().data_crc()),
            ),
            (StatusType::Ima, _) => Ok(()),
        };
    }

    fn message(&self, args: Args<'_>, _out: &mut StatusWriter<'_>) -> Result {
        let Some(run) = self.running() else {
            pr_err!("pcache_rs: message rejected: the table has not taken over the cache yet\n");
            return Err(EBUSY);
        };
        let mut words = [&[][..]; MAX_ARGS];
        let parsed = args
            .to_bytes(&mut words)
            .ok_or(table::MessageError::ArgCount)
            .and_then(table::parse_message);
        match parsed {
            Ok(table::Message::GcPercent(p)) => run.engine().set_gc_percent(p).map_err(|e| {
                pr_err!("pcache_rs: gc_percent: {}\n", ErrorText(&e));
                EIO
            }),
            Ok(table::Message::DataCrc(on)) => run.engine().set_data_crc(on).map_err(|e| {
                pr_err!("pcache_rs: data_crc: {}\n", ErrorText(&e));
                EIO
            }),
            Ok(table::Message::StatsReset) => {
                run.live.reset_stats();
                Ok(())
            }
            Err(e) => {
                pr_err!("pcache_rs: message rejected: {}\n", e.as_str());
                Err(EINVAL)
            }
        }
    }

    fn iterate_devices(&self, target: &Target<'_>, visitor: &mut DeviceVisitor<'_>) -> c_int {
        // Only the backing device bounds the mapped device's limits: the cache device is
        // addressed by byte copies, never by bios of the upper layer.
        visitor.visit(&self.devices.backing, 0, target.len())
    }

    fn io_hints(&self, limits: &mut QueueLimits<'_>) {
        // Requests are staged at most `MAX_IO_SECTORS` at a time (device-mapper splits larger
        // bios): say so, so that upper layers build bios of that size to begin with.
        limits.limit_max_sectors(MAX_IO_SECTORS as u32);
        // A write is copied into pmem straight from its bio's pages. Stable pages keep the page
        // cache from changing a page while its writeback is in flight, so a write through holds
        // the same bytes on both devices. They do not cover a process's own `O_DIRECT` buffer,
        // which it may rewrite at any time: the data CRC is therefore taken over the bytes as
        // stored (`Pmem::write_crc`), never over a second read of the pages.
        limits.set_stable_writes();
        // `REQ_NOWAIT` bios (io_uring's first attempt at each request) are served in `map` when
        // that needs no backing device: a write the cache takes, a read it holds whole. Without
        // the feature io_uring hands every request to a worker thread of its own (a context
        // switch each, and one thread for a whole queue); with it, only those that end with
        // `EAGAIN` (see `LiveCache::serve_inline`). The backing device's support does not
        // matter: nothing is sent to it with the flag.
        limits.set_nowait();
        // Write-zeroes are written as zeros through the cache (or the backing device's zeroing),
        // as much at a time as any bio.
        limits.limit_max_write_zeroes(MAX_IO_SECTORS as u32);
        // The backing device's discard limits came with the stacking; without them, take
        // discards anyway (they drop cached keys) in pages, as much at a time as any bio.
        if !limits.takes_discards() {
            limits.set_discard(MAX_IO_SECTORS as u32, 4096);
        }
    }
}

#[pin_data]
struct PcacheModule {
    #[pin]
    target: Registration<Pcache>,
}

impl kernel::InPlaceModule for PcacheModule {
    fn init(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        target::claim::init();
        target::crc::init();
        try_pin_init!(Self {
            target <- Registration::new(
                c"pcache_rs",
                [0, 2, 0],
                u64::from(target::bindings::DM_TARGET_SINGLETON | target::bindings::DM_TARGET_NOWAIT),
                module
            ),
        })
    }
}
