// SPDX-License-Identifier: GPL-2.0

//! The cache engine of `cache_core/` bound to kernel devices.
//!
//! [`DaxPmem`] and [`BackingIo`] implement the engine's environment traits over the DAX mapping
//! and the backing `dm_dev`. [`Engine`] owns the memory the engine works in (reserved once at
//! construction, so the IO path never allocates) together with the engine that borrows it: the
//! engine is dropped first, then the memory.

use super::{
    dax::DaxMapping,
    device::{TargetDevice, WRITE_BATCH_MAX},
};
use crate::cache_core::{
    self,
    io::ReadResult,
    writeback::{self as wb, Step, WbBatch, WbError, WbExtent, WbPlan},
    Backing, Cache, CacheError, CacheMem, CacheOptions, DataHead, IoError, KsetBuf, Node, Pmem,
    SegState, Status,
};
use crate::meta::{kset::KSET_KEYS_MAX, layout::Geometry};
use core::mem::ManuallyDrop;
use kernel::{prelude::*, sync::Arc};

/// The pmem side of the engine: byte copies into the DAX mapping.
pub(crate) struct DaxPmem(pub(crate) Arc<DaxMapping>);

impl Pmem for DaxPmem {
    fn size(&self) -> u64 {
        self.0.len()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.read(off, buf).map_err(|_| IoError)
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        // `memcpy_flushcache` both stores and writes back the cache lines, so `flush` has
        // nothing left to do; `fence` orders it. The engine never writes out of range; if it
        // did, dropping the store is safer than scribbling, and the log says so.
        if self.0.write(off, data).is_err() {
            pr_err!(
                "pcache_rs: engine store out of range: {}+{}\n",
                off,
                data.len()
            );
        }
    }

    fn flush(&mut self, _off: u64, _len: u64) {}

    fn fence(&mut self) {
        self.0.fence();
    }

    fn crc32c(&self, crc: u32, data: &[u8]) -> u32 {
        super::crc::crc32c(crc, data)
    }
}

/// The backing side of the engine: synchronous bios from the target's workqueue.
pub(crate) struct BackingIo(pub(crate) Arc<TargetDevice>);

impl Backing for BackingIo {
    fn size(&self) -> u64 {
        self.0.size_bytes()
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.read_at(off, buf).map_err(|_| IoError)
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), IoError> {
        self.0.write_at(off, data).map_err(|_| IoError)
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.0.flush().map_err(|_| IoError)
    }

    fn write_batch(&mut self, writes: &[(u64, &[u8])]) -> Result<(), IoError> {
        for part in writes.chunks(WRITE_BATCH_MAX) {
            self.0.write_batch(part).map_err(|_| IoError)?;
        }
        Ok(())
    }
}

/// The engine type the target runs.
type PcacheCache = Cache<'static, DaxPmem, BackingIo>;

/// How much memory an engine gets.
pub(crate) struct Sizing {
    /// Most keys the index can hold.
    pub(crate) keys: usize,
    /// Open ksets.
    pub(crate) ksets: usize,
    /// Data heads.
    pub(crate) heads: usize,
    /// Bounce buffer for writeback and CRC checks.
    pub(crate) bounce: usize,
}

/// An engine together with the memory it borrows.
///
/// # Invariants
///
/// `cache` borrows (with a `'static` lifetime that is really the life of `self`) only the
/// buffers in the `KVVec`s below, which are neither moved nor touched while `cache` exists;
/// `cache` is dropped before them, and no method hands out a reference to it (only forwarding
/// methods), so it can neither leave `self` nor be swapped with another engine's.
pub(crate) struct Engine {
    cache: ManuallyDrop<PcacheCache>,
    _segs: KVVec<SegState>,
    _nodes: KVVec<Node>,
    _roots: KVVec<u32>,
    _ksets: KVVec<KsetBuf>,
    _heads: KVVec<DataHead>,
    _scratch: KVVec<u8>,
    _bounce: KVVec<u8>,
    _wb_extents: KVVec<WbExtent>,
}

/// Why an engine did not start.
pub(crate) enum StartError {
    /// Reserving its memory failed.
    NoMem,
    /// The engine refused the device (corrupt or foreign metadata, IO error, ...).
    Cache(CacheError),
}

fn filled<T: Clone>(n: usize, v: T) -> Result<KVVec<T>, StartError> {
    KVVec::from_elem(v, n, GFP_KERNEL).map_err(|_| StartError::NoMem)
}

/// Lends the buffer of `v` for the life of the engine that owns `v`.
///
/// # Safety
///
/// `v` must not be moved out of, resized, dropped or accessed while the returned slice (or
/// anything derived from it) is alive.
unsafe fn lend<T>(v: &mut KVVec<T>) -> &'static mut [T] {
    let len = v.len();
    // SAFETY: the pointer and length describe the vector's initialised elements; its heap
    // buffer does not move when the `KVVec` value itself moves; exclusivity is the caller's
    // guarantee.
    unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr(), len) }
}

impl Engine {
    /// Reserves the engine's memory and attaches it to the cache device: formats a blank
    /// device, or validates and replays an existing one.
    pub(crate) fn start(
        pmem: DaxPmem,
        backing: BackingIo,
        sizing: &Sizing,
        opts: &CacheOptions,
    ) -> Result<Self, StartError> {
        let geo = Geometry::UPSTREAM;
        let n_segs = geo.max_segs(pmem.size()) as usize;
        let mut segs = filled(n_segs, SegState::default())?;
        let mut nodes = filled(sizing.keys, Node::default())?;
        let mut roots = filled(cache_core::roots_needed(backing.size()), 0u32)?;
        let mut ksets =
            KVVec::with_capacity(sizing.ksets, GFP_KERNEL).map_err(|_| StartError::NoMem)?;
        for _ in 0..sizing.ksets {
            ksets
                .push(KsetBuf::default(), GFP_KERNEL)
                .map_err(|_| StartError::NoMem)?;
        }
        let mut heads = filled(sizing.heads, DataHead::default())?;
        let mut scratch = filled(cache_core::SCRATCH_BYTES, 0u8)?;
        let mut bounce = filled(sizing.bounce, 0u8)?;
        let mut wb_extents = filled(KSET_KEYS_MAX, WbExtent::default())?;

        // SAFETY: each vector is moved into the returned `Engine` unchanged and kept there,
        // untouched, until after `cache` is dropped (type invariant); on error the engine was
        // not created, so nothing borrows them when they are dropped here.
        let mem = unsafe {
            CacheMem {
                segs: lend(&mut segs),
                nodes: lend(&mut nodes),
                roots: lend(&mut roots),
                ksets: lend(&mut ksets),
                heads: lend(&mut heads),
                scratch: lend(&mut scratch),
                bounce: lend(&mut bounce),
                wb_extents: lend(&mut wb_extents),
            }
        };
        let cache = Cache::start(pmem, backing, geo, mem, opts).map_err(StartError::Cache)?;
        // INVARIANT: `cache` borrows exactly these vectors, whose buffers stay put.
        Ok(Self {
            cache: ManuallyDrop::new(cache),
            _segs: segs,
            _nodes: nodes,
            _roots: roots,
            _ksets: ksets,
            _heads: heads,
            _scratch: scratch,
            _bounce: bounce,
            _wb_extents: wb_extents,
        })
    }

    /// Caches `data` for byte offset `off` (see `Cache::write`).
    pub(crate) fn write(&mut self, off: u64, data: &[u8], fua: bool) -> Result<(), CacheError> {
        self.cache.write(off, data, fua, 0)
    }

    /// Reads `buf.len()` bytes at `off`, misses from the backing device and cached as clean.
    pub(crate) fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<ReadResult, CacheError> {
        self.cache.read(off, buf, true, 0)
    }

    /// Reads `buf.len()` bytes at `off` if the cache holds them all, never touching the backing
    /// device; `None` at the first gap.
    pub(crate) fn read_cached(
        &mut self,
        off: u64,
        buf: &mut [u8],
    ) -> Result<Option<ReadResult>, CacheError> {
        self.cache.read_cached(off, buf)
    }

    /// Persists every open kset (REQ_PREFLUSH).
    pub(crate) fn flush(&mut self) -> Result<(), CacheError> {
        self.cache.flush()
    }

    /// Persists open ksets that have waited (periodic).
    pub(crate) fn flush_idle(&mut self) -> Result<(), CacheError> {
        self.cache.flush_idle()
    }

    /// Writes back the kset at the dirty tail.
    pub(crate) fn writeback_step(&mut self) -> Result<Step, CacheError> {
        self.cache.writeback_step()
    }

    /// Plans writeback of the kset at the dirty tail into `out` (see [`Writeback`]).
    pub(crate) fn writeback_plan(&mut self, out: &mut [WbExtent]) -> Result<WbPlan, CacheError> {
        self.cache.writeback_plan(out)
    }

    /// Moves the dirty tail past a batch that [`Writeback::copy`] wrote back.
    pub(crate) fn writeback_commit(&mut self, batch: WbBatch) -> bool {
        self.cache.writeback_commit(batch)
    }

    /// Counts a batch whose copy failed.
    pub(crate) fn writeback_failed(&mut self, e: WbError) -> CacheError {
        self.cache.writeback_failed(e)
    }

    /// Reclaims segments from the key tail if `gc_percent` says so.
    pub(crate) fn gc_step(&mut self) -> Result<Step, CacheError> {
        self.cache.gc_step()
    }

    /// Sets `gc_percent` (persisted in `cache_info`).
    pub(crate) fn set_gc_percent(&mut self, percent: u8) -> Result<(), CacheError> {
        self.cache.set_gc_percent(percent)
    }

    /// Turns data CRC on or off for data written from now on.
    pub(crate) fn set_data_crc(&mut self, on: bool) -> Result<(), CacheError> {
        self.cache.set_data_crc(on)
    }

    /// Whether new data gets a CRC.
    pub(crate) fn data_crc(&self) -> bool {
        self.cache.data_crc()
    }

    /// Positions and counters for `dmsetup status`.
    pub(crate) fn status(&self) -> Status {
        self.cache.status()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here, before the memory it borrows (the fields below
        // are dropped after this function returns).
        unsafe { ManuallyDrop::drop(&mut self.cache) };
    }
}

/// What the background tick needs to write a kset back without holding the engine: its own
/// handles on the two devices, room for the plan, and a bounce buffer. The engine plans and
/// commits under its lock; [`Writeback::copy`], the part that waits for the backing device,
/// runs outside it, so requests are served meanwhile.
pub(crate) struct Writeback {
    pmem: DaxPmem,
    backing: BackingIo,
    extents: KVVec<WbExtent>,
    bounce: KVVec<u8>,
}

impl Writeback {
    /// `bounce` bytes of staging: extents that fit go out together.
    pub(crate) fn new(
        cache: Arc<DaxMapping>,
        backing: Arc<TargetDevice>,
        bounce: usize,
    ) -> Result<Self, StartError> {
        Ok(Self {
            pmem: DaxPmem(cache),
            backing: BackingIo(backing),
            extents: filled(KSET_KEYS_MAX, WbExtent::default())?,
            bounce: filled(bounce, 0u8)?,
        })
    }

    /// Where [`Engine::writeback_plan`] puts its plan.
    pub(crate) fn extents_mut(&mut self) -> &mut [WbExtent] {
        &mut self.extents
    }

    /// Copies the first `n` planned extents to the backing device and flushes it.
    pub(crate) fn copy(&mut self, n: usize) -> Result<(), WbError> {
        let Self {
            pmem,
            backing,
            extents,
            bounce,
        } = self;
        let planned = extents.get(..n).unwrap_or_default();
        wb::writeback_extents(pmem, backing, bounce, planned)
    }
}
