// SPDX-License-Identifier: GPL-2.0

//! The cache engine of `cache_core/` bound to kernel devices.
//!
//! [`DaxPmem`] and [`BackingIo`] implement the engine's device traits over the DAX mapping and
//! the backing `dm_dev`. [`start`] reserves the memory the engine works in (once, at
//! construction, so the IO path never allocates) and hands it to the engine, which owns it.

use super::{
    dax::DaxMapping,
    device::{TargetDevice, WriteSlots},
    subtree_locks::SubtreeSpinLocks,
};
use crate::cache_core::{
    self, background::Background, through::InFlight, Backing, Cache, CacheError, CacheMem,
    CacheOptions, Ctrl, DataHead, FreeList, IoError, KeyLog, KsetBuf, Locked, LogHead, Memory,
    Node, Pmem, Root, SegCount, SegMapEntry, SegState, Space, SubtreeLocks, WbExtent,
};
use crate::cache_core::{env::WRITE_BATCH_MAX, writeback::WB_EXTENTS_MAX};
use crate::meta::{kset::KSET_KEYS_MAX, layout::Geometry};
use core::cell::RefCell;
use core::ops::Deref;
use core::sync::atomic::{AtomicU32, Ordering};
use kernel::{
    new_spinlock,
    prelude::*,
    sync::{Arc, SpinLock},
};

/// The pins of reads copying from cache segments outside the engine (see [`Pmem::pin`]):
/// a counter per segment, in atomics, since reads pin and unpin on their own CPUs.
pub(crate) struct SegmentPins(KVVec<AtomicU32>);

impl SegmentPins {
    fn new(n_segs: usize) -> Result<Self, StartError> {
        let mut pins = KVVec::with_capacity(n_segs, GFP_KERNEL).map_err(|_| StartError::NoMem)?;
        for _ in 0..n_segs {
            pins.push(AtomicU32::new(0), GFP_KERNEL)
                .map_err(|_| StartError::NoMem)?;
        }
        Ok(Self(pins))
    }

    fn pin(&self, seg: u32) {
        // Sequentially consistent, as the segment's generation that the read loads next and
        // the engine's look at the pins before it hands a segment out again: see
        // `cache_core::SegMap::gen`.
        if let Some(p) = self.0.get(seg as usize) {
            p.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn unpin(&self, seg: u32) {
        // Release: the read's copy out of the segment happens before a new owner's stores.
        if let Some(p) = self.0.get(seg as usize) {
            p.fetch_sub(1, Ordering::Release);
        }
    }

    fn pinned(&self, seg: u32) -> bool {
        // Sequentially consistent: see `pin`.
        self.0
            .get(seg as usize)
            .is_some_and(|p| p.load(Ordering::SeqCst) != 0)
    }
}

/// Bytes of a bio's page [`Dax::write_crc`] and [`Dax::read_crc`] take at a time into a buffer of
/// their own: one sector.
const STAGE_BYTES: usize = 512;

/// The pmem side of the engine: byte copies into the DAX mapping, and the pins of reads. The
/// engine owns one over `Arc`s ([`DaxPmem`]); a request copies through a borrowed one
/// ([`DaxRef`], [`super::live::LiveCache::pmem`]) outside the engine.
pub(crate) struct Dax<D, S> {
    pub(crate) map: D,
    pub(crate) pins: S,
}

/// The engine's pmem.
pub(crate) type DaxPmem = Dax<Arc<DaxMapping>, Arc<SegmentPins>>;

/// The pmem borrowed: what a request copies through outside the engine (see
/// [`crate::cache_core::io::Reservation`] and [`crate::cache_core::io::Hit`]).
pub(crate) type DaxRef<'a> = Dax<&'a DaxMapping, &'a SegmentPins>;

impl<D: Deref<Target = DaxMapping>, S: Deref<Target = SegmentPins>> Pmem for Dax<D, S> {
    fn size(&self) -> u64 {
        self.map.len()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.map.read(off, buf).map_err(|_| IoError)
    }

    fn write(&self, off: u64, data: &[u8]) {
        // `memcpy_flushcache` both stores and writes back the cache lines, so `flush` has
        // nothing left to do; `fence` orders it. The engine never writes out of range; if it
        // did, dropping the store is safer than scribbling, and the log says so.
        if self.map.write(off, data).is_err() {
            pr_err!(
                "pcache_rs: engine store out of range: {}+{}\n",
                off,
                data.len()
            );
        }
    }

    fn flush(&self, _off: u64, _len: u64) {}

    fn fence(&self) {
        self.map.fence();
    }

    fn crc32c(&self, crc: u32, data: &[u8]) -> u32 {
        super::crc::crc32c(crc, data)
    }

    fn write_crc(&self, off: u64, data: &[u8], mut crc: u32) -> u32 {
        // `data` is a bio's page, which its owner may be rewriting meanwhile: each byte must be
        // read once, and what is stored is what is CRC'd. The single pass does that with no
        // copy of our own; where it is not available each sector is read once into a buffer of
        // our own, which is stored and CRC'd. The buffer stays in the L1 cache, and the stack of
        // `map` has room for it.
        if let Some(crc) = self.map.write_crc(off, data, crc) {
            return crc;
        }
        let mut stage = [0u8; STAGE_BYTES];
        let mut to = off;
        for piece in data.chunks(STAGE_BYTES) {
            let Some(staged) = stage.get_mut(..piece.len()) else {
                break;
            };
            staged.copy_from_slice(piece);
            self.write(to, staged);
            crc = self.crc32c(crc, staged);
            to += staged.len() as u64;
        }
        crc
    }

    fn read_crc(&self, off: u64, buf: &mut [u8], mut crc: u32) -> Result<u32, IoError> {
        // `buf` is a bio's page, which its owner may be rewriting meanwhile: each sector is read
        // from pmem into a buffer of our own, and what is CRC'd is that, the bytes the cache
        // holds, before it is handed out.
        let mut stage = [0u8; STAGE_BYTES];
        let mut from = off;
        for piece in buf.chunks_mut(STAGE_BYTES) {
            let Some(staged) = stage.get_mut(..piece.len()) else {
                break;
            };
            self.read(from, staged)?;
            crc = self.crc32c(crc, staged);
            piece.copy_from_slice(staged);
            from += staged.len() as u64;
        }
        Ok(crc)
    }

    fn pin(&self, seg: u32) {
        self.pins.pin(seg)
    }

    fn unpin(&self, seg: u32) {
        self.pins.unpin(seg)
    }

    fn pinned(&self, seg: u32) -> bool {
        self.pins.pinned(seg)
    }
}

/// The backing side of the engine: synchronous bios from the target's workqueue.
pub(crate) struct BackingIo(pub(crate) Arc<TargetDevice>);

impl Backing for BackingIo {
    fn size(&self) -> u64 {
        self.0.size_bytes()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.read_at(off, buf).map_err(|_| IoError)
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        self.0.write_at(off, data).map_err(|_| IoError)
    }

    fn flush(&self) -> Result<(), IoError> {
        self.0.flush().map_err(|_| IoError)
    }
}

/// The background writer's side of the backing device: [`BackingIo`], room to send a
/// writeback step's extents to the device all at once, and the cache device's mapping, which
/// the backing device writes them out from with no copy ([`Backing::write_batch_from`]).
pub(crate) struct WritebackIo {
    dev: BackingIo,
    /// A cell: the device handle is shared (`&self`), and only the writer that owns this one
    /// ever sends a batch through it, one at a time.
    slots: RefCell<WriteSlots>,
    map: Arc<DaxMapping>,
}

impl Backing for WritebackIo {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.dev.read(off, buf)
    }

    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        self.dev.write(off, data)
    }

    fn flush(&self) -> Result<(), IoError> {
        self.dev.flush()
    }

    fn write_batch(&self, data: &[u8], extents: &[WbExtent]) -> Result<(), IoError> {
        let mut slots = self.slots.try_borrow_mut().map_err(|_| IoError)?;
        self.dev
            .0
            .write_batch(data, extents, &mut slots)
            .map_err(|_| IoError)
    }

    /// From this writer's own mapping of the cache device (the same device as the engine's
    /// pmem), so that the pages handed to the backing device are the mapping's, whatever `P`.
    fn write_batch_from<P: Pmem>(&self, _pmem: &P, extents: &[WbExtent]) -> Result<bool, IoError> {
        let mut slots = self.slots.try_borrow_mut().map_err(|_| IoError)?;
        self.dev
            .0
            .write_batch_mapped(&self.map, extents, &mut slots)
            .map(|()| true)
            .map_err(|_| IoError)
    }
}

/// The engine's buffers in the kernel: `KVVec`s it owns (vmalloc for the large ones), and
/// those it shares with the reads it serves without its lock behind an `Arc`.
pub(crate) struct KernelMem;

impl Memory for KernelMem {
    type Buf<T: 'static> = KVVec<T>;
    type Shared<T: Sync + 'static> = SharedBuf<T>;
    type Locks = SharedLocks;
    type One<T> = Arc<T>;
    type Lock<T: Unpin> = SharedSpinLock<T>;
    type Slot<T: Unpin + 'static> = SharedSpinLock<T>;
}

// SAFETY: every field of a `KsetBuf` (a count, a flag and a byte array) is valid all zeroes, and
// all zeroes is an empty kset: so an open kset is made in place in its lock's allocation
// ([`pin_init::init_zeroed`]), not built on the stack, which its 5 KiB buffer would overflow.
unsafe impl Zeroable for KsetBuf {}

/// A `T` under a spinlock, shared by the engine and the requests it serves without its lock
/// (an open kset, the key head, the data heads, see [`Memory::Lock`]); the last clone frees it.
pub(crate) struct SharedSpinLock<T>(Arc<SpinLock<T>>);

impl<T> Clone for SharedSpinLock<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Unpin> Locked<T> for SharedSpinLock<T> {
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut guard = self.0.lock();
        f(&mut guard)
    }
}

/// A buffer shared by the engine and the reads it serves without its lock (see
/// [`Memory::Shared`]); the last clone frees it.
pub(crate) struct SharedBuf<T>(Arc<KVVec<T>>);

impl<T> Clone for SharedBuf<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Deref for SharedBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.0
    }
}

/// The subtree locks, shared as the slab they guard is.
#[derive(Clone)]
pub(crate) struct SharedLocks(Arc<SubtreeSpinLocks>);

impl SubtreeLocks for SharedLocks {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn lock(&self, sub: usize) {
        self.0.lock(sub)
    }

    fn unlock(&self, sub: usize) {
        self.0.unlock(sub)
    }
}

/// The engine the target runs. It owns its memory: dropping it frees everything.
pub(crate) type PcacheEngine = Cache<DaxPmem, BackingIo, KernelMem>;

/// What serves read hits outside the engine (see [`cache_core::reader`]).
pub(crate) type HitReader = cache_core::Reader<KernelMem>;

/// What commits writes outside the engine (see [`cache_core::write_path`]).
pub(crate) type KernelWritePath = cache_core::WritePath<KernelMem>;

/// The background writer: its own handles on both devices, its writeback plan and bounce
/// buffer (see [`cache_core::background`]).
pub(crate) type Writer = Background<DaxPmem, WritebackIo, KVVec<WbExtent>, KVVec<u8>>;

/// How much memory an engine gets.
pub(crate) struct Sizing {
    /// Most keys the index can hold.
    pub(crate) keys: usize,
    /// Open ksets.
    pub(crate) ksets: usize,
    /// Data heads.
    pub(crate) heads: usize,
    /// Bounce buffer of the engine's own synchronous writeback.
    pub(crate) bounce: usize,
}

/// Why an engine did not start.
pub(crate) enum StartError {
    /// Reserving its memory failed.
    NoMem,
    /// The engine refused the device (corrupt or foreign metadata, IO error, ...).
    Cache(CacheError),
}

/// A [`SharedSpinLock`] named `name`, made in place from `init` (a value or an initialiser), or
/// `Err(StartError::NoMem)` from the enclosing function. A macro, not a function, so that each
/// place that makes a lock gives it its own lock class (`new_spinlock!` names one per expansion):
/// lockdep then tells the engine's locks apart and checks the order they nest in.
macro_rules! spinlock {
    ($init:expr, $name:literal) => {
        SharedSpinLock(
            Arc::pin_init(new_spinlock!($init, $name), GFP_KERNEL)
                .map_err(|_| StartError::NoMem)?,
        )
    };
}

fn filled<T: Clone>(n: usize, v: T) -> Result<KVVec<T>, StartError> {
    KVVec::from_elem(v, n, GFP_KERNEL).map_err(|_| StartError::NoMem)
}

fn shared<T: Clone>(n: usize, v: T) -> Result<SharedBuf<T>, StartError> {
    let buf = filled(n, v)?;
    Ok(SharedBuf(
        Arc::new(buf, GFP_KERNEL).map_err(|_| StartError::NoMem)?,
    ))
}

/// Reserves the engine's memory and attaches it to the cache device `map`: formats a blank
/// device, or validates and replays an existing one.
pub(crate) fn start(
    map: Arc<DaxMapping>,
    backing: BackingIo,
    sizing: &Sizing,
    opts: &CacheOptions,
) -> Result<PcacheEngine, StartError> {
    let geo = Geometry::UPSTREAM;
    let n_segs = geo.max_segs(map.len()) as usize;
    let pins = Arc::new(SegmentPins::new(n_segs)?, GFP_KERNEL).map_err(|_| StartError::NoMem)?;
    let pmem = Dax { map, pins };
    let mut ksets =
        KVVec::with_capacity(sizing.ksets, GFP_KERNEL).map_err(|_| StartError::NoMem)?;
    for _ in 0..sizing.ksets {
        // One lock class for all: no path holds two open ksets' locks at once.
        let kset = spinlock!(pin_init::init_zeroed(), "pcache_rs_kset");
        ksets
            .push(kset, GFP_KERNEL)
            .map_err(|_| StartError::NoMem)?;
    }
    let head = spinlock!(LogHead::default(), "pcache_rs_key_head");
    let log = Arc::new(KeyLog::new(ksets, head), GFP_KERNEL).map_err(|_| StartError::NoMem)?;
    let mut heads =
        KVVec::with_capacity(sizing.heads, GFP_KERNEL).map_err(|_| StartError::NoMem)?;
    for _ in 0..sizing.heads {
        // One lock class for all: no path holds two data heads' locks at once.
        let head = spinlock!(DataHead::default(), "pcache_rs_data_head");
        heads
            .push(head, GFP_KERNEL)
            .map_err(|_| StartError::NoMem)?;
    }
    let segs = spinlock!(SegCount::default(), "pcache_rs_segs_in_use");
    let space = Arc::new(Space::new(heads, segs), GFP_KERNEL).map_err(|_| StartError::NoMem)?;
    let ctrl = Ctrl::new(
        filled(n_segs, SegState::default())?,
        filled(cache_core::SCRATCH_BYTES, 0u8)?,
    );
    let mem = CacheMem::<KernelMem> {
        ctrl: spinlock!(ctrl, "pcache_rs_ctrl"),
        in_flight: spinlock!(InFlight::default(), "pcache_rs_in_flight"),
        seg_map: shared(n_segs, SegMapEntry::default())?,
        nodes: shared(sizing.keys, Node::default())?,
        roots: shared(cache_core::roots_needed(backing.size()), Root::default())?,
        locks: SharedLocks(
            Arc::new(
                SubtreeSpinLocks::new(cache_core::roots_needed(backing.size()))
                    .map_err(|_| StartError::NoMem)?,
                GFP_KERNEL,
            )
            .map_err(|_| StartError::NoMem)?,
        ),
        free: Arc::new(FreeList::default(), GFP_KERNEL).map_err(|_| StartError::NoMem)?,
        log,
        space,
        bounce: filled(sizing.bounce, 0u8)?,
        // Only the engine's own synchronous writeback uses these, which the target never
        // runs (its writer has its own, [`writer`]): the least the engine takes.
        wb_extents: filled(KSET_KEYS_MAX, WbExtent::default())?,
    };
    Cache::start(pmem, backing, geo, mem, opts).map_err(StartError::Cache)
}

/// A background writer over the two devices (`pmem` as the engine has it, whose pins it
/// shares but never takes); `bounce` bytes of staging (extents that fit go out together).
pub(crate) fn writer(
    pmem: &DaxPmem,
    backing: Arc<TargetDevice>,
    bounce: usize,
) -> Result<Writer, StartError> {
    Ok(Background::new(
        Dax {
            map: pmem.map.clone(),
            pins: pmem.pins.clone(),
        },
        WritebackIo {
            dev: BackingIo(backing),
            slots: RefCell::new(WriteSlots::new(WRITE_BATCH_MAX).map_err(|_| StartError::NoMem)?),
            map: pmem.map.clone(),
        },
        filled(WB_EXTENTS_MAX, WbExtent::default())?,
        filled(bounce, 0u8)?,
    ))
}
