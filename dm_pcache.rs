// SPDX-License-Identifier: GPL-2.0

//! dm-pcache-rs: a device-mapper target (`pcache_rs`) that caches a block device in persistent
//! memory mapped through DAX.
//!
//! At this stage the target opens both devices, maps the whole cache device through DAX, checks
//! the table line exactly as upstream dm-pcache does (and more strictly), and passes every bio
//! through to the backing device; the cache engine in `cache_core/` and `meta/` is wired in by a
//! later change. `target/` holds the only `unsafe` code: the bindings and their safe wrappers.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use kernel::prelude::*;

mod target;

use target::{
    args::Args,
    bio::Bio,
    dax::{DaxError, DaxMapping},
    device::TargetDevice,
    status::{StatusType, StatusWriter},
    table::{self, TableError, TableOptions, MAX_ARGS},
    target_type::{CtrError, DeviceVisitor, MapResult, Registration, Target, TargetOperations},
};

module! {
    type: PcacheModule,
    name: "dm_pcache_rs",
    authors: ["dm-pcache-rs developers"],
    description: "device-mapper persistent-memory cache target (pcache_rs)",
    license: "GPL",
}

/// Upstream dm-pcache's on-media geometry, needed here for the size check and status line
/// until the engine (which owns the format in `meta/`) is wired in.
mod geometry {
    /// The smallest cache device upstream accepts.
    pub(crate) const CACHE_DEV_SIZE_MIN: u64 = 512 << 20;
    /// Start of the first segment: superblock at 4 KiB, two cache_info slots, one cache ctrl.
    pub(crate) const SEGMENTS_OFF: u64 = 4096 + 4096 + 2 * 4096 + 4096;
    /// Size of one segment.
    pub(crate) const SEG_SIZE: u64 = 16 << 20;
    /// `cache_info.flags` bits.
    pub(crate) const FLAGS_DATA_CRC: u32 = 1 << 0;
    pub(crate) const FLAGS_INIT_DONE: u32 = 1 << 1;
    pub(crate) const FLAGS_GC_PERCENT_SHIFT: u32 = 6;
}

/// One `pcache_rs` target instance.
struct Pcache {
    cache: DaxMapping,
    backing: TargetDevice,
    options: TableOptions,
    data_crc: AtomicBool,
    gc_percent: AtomicU8,
}

impl Pcache {
    fn open_devices(target: &mut Target<'_>, args: &Args<'_>) -> Result<Self, CtrError> {
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

        let cache_name_len = cache.size_bytes();
        let cache = DaxMapping::new(cache, geometry::CACHE_DEV_SIZE_MIN).map_err(|e| match e {
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
                    cache_name_len,
                    geometry::CACHE_DEV_SIZE_MIN
                );
                CtrError::new(c"Cache device too small", ENOSPC)
            }
            DaxError::Map(e) => {
                pr_err!("pcache_rs: cannot map cache device through DAX: {:?}\n", e);
                CtrError::new(c"Cache device DAX mapping failed", e)
            }
        })?;

        Ok(Self {
            cache,
            backing,
            options: line.options,
            data_crc: AtomicBool::new(line.options.data_crc),
            gc_percent: AtomicU8::new(table::GC_PERCENT_DEFAULT),
        })
    }

    fn seg_num(&self) -> u64 {
        self.cache.len().saturating_sub(geometry::SEGMENTS_OFF) / geometry::SEG_SIZE
    }

    fn cache_info_flags(&self) -> u32 {
        let mut flags = geometry::FLAGS_INIT_DONE
            | (u32::from(self.gc_percent.load(Ordering::Relaxed))
                << geometry::FLAGS_GC_PERCENT_SHIFT);
        if self.data_crc.load(Ordering::Relaxed) {
            flags |= geometry::FLAGS_DATA_CRC;
        }
        flags
    }
}

#[vtable]
impl TargetOperations for Pcache {
    fn ctr(target: &mut Target<'_>, args: Args<'_>) -> Result<Pin<KBox<Self>>, CtrError> {
        let this = Self::open_devices(target, &args)?;
        target.set_num_flush_bios(1);
        target.set_flush_supported(true);
        target.set_num_discard_bios(1);
        KBox::pin(this, GFP_KERNEL).map_err(|_| CtrError::new(c"Cannot allocate target", ENOMEM))
    }

    fn map(&self, target: &Target<'_>, bio: &mut Bio<'_>) -> MapResult {
        // Pass-through: the same sector of the backing device.
        let sector = bio.sector().saturating_sub(target.begin());
        bio.remap(&self.backing, sector);
        MapResult::Remapped
    }

    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>) {
        // A full buffer cuts the line; device-mapper then asks again with a larger one.
        let _ = match kind {
            // Upstream's fields: sb flags, segments on the device, segments of the cache, used
            // segments, gc_percent, cache_info flags, key head, dirty tail, key tail.
            StatusType::Info => write!(
                out,
                "{:x} {} {} {} {} {:x} {}:{} {}:{} {}:{}",
                0,
                self.seg_num(),
                self.seg_num(),
                0,
                self.gc_percent.load(Ordering::Relaxed),
                self.cache_info_flags(),
                0,
                0,
                0,
                0,
                0,
                0
            ),
            StatusType::Table => {
                let options = TableOptions {
                    data_crc: self.data_crc.load(Ordering::Relaxed),
                    ..self.options
                };
                table::write_table(
                    out,
                    self.cache.device().name(),
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
            Ok(table::Message::GcPercent(p)) => self.gc_percent.store(p, Ordering::Relaxed),
            Ok(table::Message::DataCrc(on)) => self.data_crc.store(on, Ordering::Relaxed),
            Err(e) => {
                pr_err!("pcache_rs: message rejected: {}\n", e.as_str());
                return Err(EINVAL);
            }
        }
        Ok(())
    }

    fn iterate_devices(&self, target: &Target<'_>, visitor: &mut DeviceVisitor<'_>) -> c_int {
        // Only the backing device bounds the mapped device's limits: the cache device is
        // addressed by byte copies, never by bios of the upper layer.
        visitor.visit(&self.backing, 0, target.len())
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
                [0, 1, 0],
                u64::from(target::bindings::DM_TARGET_SINGLETON),
                module
            ),
        })
    }
}
