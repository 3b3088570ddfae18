// SPDX-License-Identifier: GPL-2.0

//! dm-pcache-rs: a device-mapper target (`pcache_rs`) that caches a block device in persistent
//! memory mapped through DAX, with the on-media format of upstream dm-pcache.
//!
//! The cache engine (`cache_core/`, over the format in `meta/`) owns the cache's policy:
//! serving requests and waiting for room, writeback, GC and kset flushing. `target/` gives it
//! the kernel's primitives (pmem, backing IO, a lock, a wait queue, work items) and holds all
//! `unsafe` code. This file is the module and the target's `#[vtable]` operations.

use core::sync::atomic::Ordering;
use kernel::{prelude::*, sync::Arc};

// The engine and the on-media format are shared with the host test crate, where they are
// public; here nothing outside the crate sees them, and some items serve only the host tests.
#[allow(unreachable_pub, dead_code, unused_imports)]
mod cache_core;
#[allow(unreachable_pub, dead_code)]
mod meta;
mod target;

use cache_core::Locked;
use target::{
    args::Args,
    background::TICK_MS,
    bio::Bio,
    claim::ActiveClaim,
    construct::{self, MAX_IO_SECTORS},
    dax::DaxMapping,
    device::TargetDevice,
    engine::PcacheEngine,
    live::{ErrorText, LiveCache, RequestCounters},
    report,
    requests::Served,
    status::{StatusType, StatusWriter},
    table::{self, TableOptions, MAX_ARGS},
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

/// One `pcache_rs` target instance.
///
/// Fields drop in order: the tick and the worker are cancelled before the running cache and
/// the devices go.
struct Pcache {
    ticker: Ticker<LiveCache>,
    worker: Worker<LiveCache>,
    wq: Arc<WorkQueue>,
    live: Arc<LiveCache>,
    cache_dev: Arc<DaxMapping>,
    backing: Arc<TargetDevice>,
    options: TableOptions,
    seg_num: u64,
    claim: ActiveClaim,
}

impl Pcache {
    fn new(target: &mut Target<'_>, args: &Args<'_>) -> Result<Self, CtrError> {
        let opened = construct::open(target, args)?;
        let counts = RequestCounters::new()
            .map_err(|e| CtrError::new(c"Cannot allocate the statistics counters", e))?;
        let live = Arc::pin_init(
            LiveCache::new(
                opened.engine,
                opened.staging,
                opened.writer,
                target.begin(),
                counts,
                opened.backing.clone(),
            ),
            GFP_KERNEL,
        )
        .map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))?;
        let wq = WorkQueue::new(c"wq")
            .and_then(|wq| Ok(Arc::new(wq, GFP_KERNEL)?))
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        let worker = Worker::new(&wq, live.clone(), LiveCache::run_requests)
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        let ticker = Ticker::new(&wq, live.clone(), LiveCache::tick, TICK_MS)
            .map_err(|e| CtrError::new(c"Cannot allocate workqueue", e))?;
        target
            .set_max_io_len(MAX_IO_SECTORS)
            .map_err(|e| CtrError::new(c"Cannot set the maximum IO size", e))?;
        ticker.start();
        Ok(Self {
            ticker,
            worker,
            wq,
            live,
            cache_dev: opened.cache_dev,
            backing: opened.backing,
            options: opened.options,
            seg_num: opened.seg_num,
            claim: opened.claim,
        })
    }

    fn engine<R>(&self, f: impl FnOnce(&mut PcacheEngine) -> R) -> R {
        self.live.with(f)
    }
}

impl Drop for Pcache {
    fn drop(&mut self) {
        // Device-mapper ends all IO before `dtr`; stop the tick, let queued work finish, and
        // persist what was acknowledged. A suspended instance already did (and a reloaded
        // table may own the device now), so it must not touch pmem again.
        self.ticker.stop();
        self.wq.drain();
        if !self.live.quiesced.load(Ordering::Acquire) {
            self.live.quiesce();
        }
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
        KBox::pin(this, GFP_KERNEL).map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))
    }

    fn map(&self, _target: &Target<'_>, bio: Bio<'_>) -> MapResult {
        let (mut held, taken) = bio.take();
        match self.live.serve_inline(&mut held) {
            Some(Served::Done(result)) => held.end(result),
            Some(Served::ToBacking) => self.live.pass_down(held),
            None => {
                self.live.pending.lock().push(held);
                self.worker.queue();
            }
        }
        MapResult::Submitted(taken)
    }

    fn postsuspend(&self) {
        self.ticker.stop();
        self.wq.drain();
        self.live.quiesce();
        self.claim.set_quiesced(true);
    }

    fn resume(&self) {
        self.claim.set_quiesced(false);
        if self.live.quiesced.swap(false, Ordering::AcqRel) {
            self.ticker.start();
        }
    }

    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>) {
        // A full buffer cuts the line; device-mapper then asks again with a larger one.
        let _ = match kind {
            StatusType::Info => {
                let s = self.engine(|e| e.status());
                report::write_status(out, self.seg_num, &s, &self.live.request_counts())
            }
            StatusType::Table => report::write_table_line(
                out,
                self.cache_dev.device().name(),
                self.backing.name(),
                &self.options,
                self.engine(|e| e.data_crc()),
            ),
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
            Ok(table::Message::GcPercent(p)) => self.engine(|e| e.set_gc_percent(p)).map_err(|e| {
                pr_err!("pcache_rs: gc_percent: {}\n", ErrorText(&e));
                EIO
            }),
            Ok(table::Message::DataCrc(on)) => self.engine(|e| e.set_data_crc(on)).map_err(|e| {
                pr_err!("pcache_rs: data_crc: {}\n", ErrorText(&e));
                EIO
            }),
            Ok(table::Message::StatsReset) => {
                self.live.reset_stats();
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
        visitor.visit(&self.backing, 0, target.len())
    }

    fn io_hints(&self, limits: &mut QueueLimits<'_>) {
        // Requests are staged at most `MAX_IO_SECTORS` at a time (device-mapper splits larger
        // bios): say so, so that upper layers build bios of that size to begin with.
        limits.limit_max_sectors(MAX_IO_SECTORS as u32);
        // Write-zeroes are written as zeros through the cache, one staging buffer at a time.
        limits.limit_max_write_zeroes(MAX_IO_SECTORS as u32);
        // The backing device's discard limits came with the stacking; without them, take
        // discards anyway (they drop cached keys) in pages, one staging size at a time.
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
