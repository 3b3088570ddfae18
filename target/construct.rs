// SPDX-License-Identifier: GPL-2.0

//! The constructor's work: parse the table line, open and check both devices and map the cache
//! device ([`open`]); then, once the cache device is claimed, start the engine on it ([`start`]),
//! in the constructor or, for a reload, in `preresume`. Every refusal sets a specific
//! `ti->error` and logs the detail.

use super::{
    args::Args,
    claim::ActiveClaim,
    cpu,
    dax::{DaxError, DaxMapping},
    device::TargetDevice,
    engine::{self, BackingIo, PcacheEngine, Sizing, StartError, Writer},
    live::{ErrorText, WorkerBuffers},
    table::{self, TableError, TableOptions, MAX_ARGS},
    target_type::{CtrError, Target},
};
use crate::cache_core::{
    io::Gap, key_capacity, start::MODE_MISMATCH, writeback::WB_STEP_BYTES, CacheError, CacheOptions,
};
use crate::meta::layout::{Geometry, CACHE_DEV_SIZE_MIN};
use kernel::{prelude::*, sync::Arc};

/// Largest bio the target handles at once; device-mapper splits larger ones. It sizes the
/// worker's room for a read's gaps.
pub(crate) const MAX_IO_SECTORS: u64 = 2048;

/// Most gaps a read can have: keys are whole sectors, so at most every other sector of a
/// [`MAX_IO_SECTORS`] bio is a gap, plus one where it crosses a subtree boundary. The worker
/// takes every read with more gaps than `map` does ([`super::requests`]) with room for them all.
pub(crate) const MAX_READ_GAPS: usize = (MAX_IO_SECTORS / 2 + 2) as usize;

/// Bytes of the writeback staging buffer: a whole step of small keys goes out at once.
const WRITEBACK_BOUNCE: usize = WB_STEP_BYTES as usize;

/// What a table line names, opened and checked.
pub(crate) struct Devices {
    pub(crate) cache_dev: Arc<DaxMapping>,
    pub(crate) backing: Arc<TargetDevice>,
    pub(crate) options: TableOptions,
    pub(crate) seg_num: u64,
}

/// The engine started on the claimed cache device.
pub(crate) struct Started {
    pub(crate) claim: ActiveClaim,
    pub(crate) engine: PcacheEngine,
    /// The request worker's buffers (its gaps: [`MAX_READ_GAPS`]).
    pub(crate) buffers: WorkerBuffers,
    pub(crate) writer: Writer,
}

fn cache_error(e: &CacheError) -> CtrError {
    match e {
        CacheError::Meta(_) => CtrError::new(c"Cache device metadata is invalid", EINVAL),
        CacheError::Io(_) => CtrError::new(c"Cache device IO error", EIO),
        CacheError::Invalid(why) if *why == MODE_MISMATCH => CtrError::new(
            c"Cache mode differs from the cache device's, which holds dirty data",
            EINVAL,
        ),
        CacheError::Invalid(_) => CtrError::new(c"Cache device does not match the table", EINVAL),
        CacheError::NoMem(_) | CacheError::Busy(_) => {
            CtrError::new(c"Cannot allocate cache memory", ENOMEM)
        }
    }
}

fn no_mem(_: StartError) -> CtrError {
    CtrError::new(c"Cannot allocate cache memory", ENOMEM)
}

/// Opens and checks everything a table line names; touches no cache metadata.
pub(crate) fn open(target: &mut Target<'_>, args: &Args<'_>) -> Result<Devices, CtrError> {
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
    let cache = DaxMapping::new(cache, CACHE_DEV_SIZE_MIN).map_err(|e| match e {
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
                CACHE_DEV_SIZE_MIN
            );
            CtrError::new(c"Cache device too small", ENOSPC)
        }
        DaxError::Map(e) => {
            pr_err!("pcache_rs: cannot map cache device through DAX: {:?}\n", e);
            CtrError::new(c"Cache device DAX mapping failed", e)
        }
    })?;
    let cache = Arc::new(cache, GFP_KERNEL)
        .map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))?;
    let backing = Arc::new(backing, GFP_KERNEL)
        .map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))?;
    let seg_num = Geometry::UPSTREAM.max_segs(cache.len());
    Ok(Devices {
        cache_dev: cache,
        backing,
        options: line.options,
        seg_num,
    })
}

/// Starts the engine on the cache device `claim` holds: replays the cache (or formats an empty
/// device) with the table's options.
pub(crate) fn start(devices: &Devices, claim: ActiveClaim) -> Result<Started, CtrError> {
    let Devices {
        cache_dev: cache,
        backing,
        options,
        seg_num,
    } = devices;
    let geo = Geometry::UPSTREAM;
    let seg_num = *seg_num;
    let sizing = Sizing {
        keys: key_capacity(seg_num * u64::from(geo.seg_data_size())),
        ksets: 4,
        heads: cpu::cpu_ids(),
        // The engine's own synchronous writeback, which the target never runs (its writer
        // has its own buffers): the least the engine takes.
        bounce: 4096,
    };
    let opts = CacheOptions {
        data_crc: options.data_crc,
        cache_mode: options.cache_mode.bits(),
    };
    let engine =
        engine::start(cache.clone(), BackingIo(backing.clone()), &sizing, &opts).map_err(|e| {
            match e {
                StartError::NoMem => CtrError::new(c"Cannot allocate cache memory", ENOMEM),
                StartError::Cache(e) => {
                    pr_err!(
                        "pcache_rs: cannot attach cache device {}: {}\n",
                        cache.device().name(),
                        ErrorText(&e)
                    );
                    cache_error(&e)
                }
            }
        })?;
    let gaps = KVVec::from_elem(Gap::default(), MAX_READ_GAPS, GFP_KERNEL)
        .map_err(|_| CtrError::new(c"Cannot allocate cache memory", ENOMEM))?;
    // Writeback stages a batch of up to `WRITE_BATCH_MAX` extents that fit here and sends them
    // all at once: 4 MiB holds a whole step of 4 KiB keys (eight ksets), and 32 keys of
    // 128 KiB.
    let writer =
        engine::writer(engine.pmem(), backing.clone(), WRITEBACK_BOUNCE).map_err(no_mem)?;
    Ok(Started {
        claim,
        engine,
        buffers: WorkerBuffers { gaps },
        writer,
    })
}
