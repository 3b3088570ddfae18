// SPDX-License-Identifier: GPL-2.0

//! A device that a target holds open: `dm_get_device` on creation, `dm_put_device` on drop.

use super::bindings;
use super::dax::DaxMapping;
use crate::cache_core::{env::each_batch_write, IoError, WbExtent};
use core::ptr::NonNull;
use kernel::prelude::*;

/// A block device opened through device-mapper for one target instance.
///
/// # Invariants
///
/// `dev` was returned by a successful `dm_get_device(ti, ...)` and has not been put; `ti` is the
/// target it was opened for, which device-mapper keeps alive until after the target's `dtr` has
/// dropped every `TargetDevice` it owns (or, on a failed `ctr`, until `ctr` returns).
pub(crate) struct TargetDevice {
    ti: NonNull<bindings::dm_target>,
    dev: NonNull<bindings::dm_dev>,
}

// SAFETY: `dm_put_device` may be called from any process context, and the accessors only read
// fields that device-mapper does not change while the device is held.
unsafe impl Send for TargetDevice {}
// SAFETY: all methods take `&self` and only read immutable fields of the `dm_dev`.
unsafe impl Sync for TargetDevice {}

/// Room to describe the writes of one [`TargetDevice::write_batch`] to the C side, reserved
/// once by the background writer: a writeback step's worth is too large for the stack.
pub(crate) struct WriteSlots(KVVec<bindings::pcache_rs_write>);

// SAFETY: the slots hold pointers into a batch's data only while `write_batch` runs, which
// borrows that data and waits for every write; in between they are never read.
unsafe impl Send for WriteSlots {}

impl WriteSlots {
    /// Room for `n` writes.
    pub(crate) fn new(n: usize) -> Result<Self> {
        let mut v = KVVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            v.push(bindings::pcache_rs_write::default(), GFP_KERNEL)?;
        }
        Ok(Self(v))
    }
}

impl TargetDevice {
    /// Opens `path` (a device path or `major:minor`) for reading and writing on behalf of `ti`.
    ///
    /// # Safety
    ///
    /// `ti` must be the target being constructed, and the returned device must be dropped before
    /// that target's `dtr` returns (or before a failing `ctr` returns).
    pub(crate) unsafe fn open(ti: NonNull<bindings::dm_target>, path: &CStr) -> Result<Self> {
        let mut dev: *mut bindings::dm_dev = core::ptr::null_mut();
        // SAFETY: `ti` is valid (caller's guarantee), `path` is NUL-terminated, and `dev` is a
        // valid place for the result.
        let ret = unsafe {
            bindings::dm_get_device(
                ti.as_ptr(),
                path.as_char_ptr(),
                bindings::PCACHE_RS_BLK_OPEN_RW,
                &mut dev,
            )
        };
        kernel::error::to_result(ret)?;
        let dev = NonNull::new(dev).ok_or(EINVAL)?;
        // INVARIANT: `dev` came from a successful `dm_get_device` for `ti`.
        Ok(Self { ti, dev })
    }

    fn raw(&self) -> &bindings::dm_dev {
        // SAFETY: the device is held (type invariant), so the `dm_dev` is valid.
        unsafe { self.dev.as_ref() }
    }

    /// The block device, for remapping bios to it.
    pub(crate) fn bdev(&self) -> *mut kernel::bindings::block_device {
        self.raw().bdev
    }

    /// Device-mapper's name for the device: `major:minor`, which a table line accepts back.
    pub(crate) fn name(&self) -> &str {
        let name = &self.raw().name;
        let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        // The name is formatted by device-mapper as `%u:%u`, so it is ASCII.
        let bytes = name.get(..len).unwrap_or(&[]);
        // SAFETY: `c_char` and `u8` have the same layout; `bytes` is a sub-slice of the name.
        let bytes = unsafe { core::slice::from_raw_parts(bytes.as_ptr().cast::<u8>(), len) };
        core::str::from_utf8(bytes).unwrap_or("?")
    }

    /// Size of the device in bytes.
    /// Whether the device takes discards (`bdev_max_discard_sectors` is not zero).
    pub(crate) fn supports_discard(&self) -> bool {
        // SAFETY: the device is open for as long as `self` lives.
        unsafe { bindings::pcache_rs_bdev_max_discard_sectors(self.bdev()) != 0 }
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        // SAFETY: the block device is open while the device is held (type invariant).
        unsafe { bindings::pcache_rs_bdev_nr_bytes(self.bdev()) }
    }

    /// Whether `self` and `other` are the same block device (opened twice under two names).
    pub(crate) fn is_same(&self, other: &TargetDevice) -> bool {
        // SAFETY: both block devices are open while the devices are held.
        unsafe { bindings::pcache_rs_bdev_is_same(self.bdev(), other.bdev()) }
    }

    /// The device number, which identifies the device whatever path named it.
    pub(crate) fn devt(&self) -> u32 {
        // SAFETY: the block device is open while the device is held (type invariant).
        unsafe { (*self.bdev()).bd_dev }
    }

    /// The DAX device behind this block device, if it has one.
    pub(crate) fn dax_dev(&self) -> Option<NonNull<bindings::dax_device>> {
        NonNull::new(self.raw().dax_dev)
    }

    /// Raw pointers for `iterate_devices`.
    pub(crate) fn as_raw(&self) -> *mut bindings::dm_dev {
        self.dev.as_ptr()
    }
}

impl Drop for TargetDevice {
    fn drop(&mut self) {
        // SAFETY: `dev` was obtained by `dm_get_device` for `ti`, is put exactly once here, and
        // `ti` is still alive (type invariant).
        unsafe { bindings::dm_put_device(self.ti.as_ptr(), self.dev.as_ptr()) };
    }
}

impl TargetDevice {
    fn sync_io(
        &self,
        write: bool,
        flags: (bool, bool),
        off: u64,
        buf: *mut u8,
        len: usize,
    ) -> Result {
        if off % 512 != 0 || len % 512 != 0 {
            return Err(EINVAL);
        }
        let end = off.checked_add(len as u64).ok_or(EINVAL)?;
        if end > self.size_bytes() {
            return Err(EINVAL);
        }
        // SAFETY: the block device is open (type invariant); `buf` is valid for `len` bytes
        // for the duration of the call, which waits for the IO to finish.
        let ret = unsafe {
            bindings::pcache_rs_sync_io(
                self.bdev(),
                write,
                flags.0,
                flags.1,
                off >> 9,
                buf.cast(),
                len,
            )
        };
        kernel::error::to_result(ret)
    }

    /// Reads `buf.len()` bytes at byte offset `off` (both sector aligned); sleeps.
    pub(crate) fn read_at(&self, off: u64, buf: &mut [u8]) -> Result {
        self.sync_io(false, (false, false), off, buf.as_mut_ptr(), buf.len())
    }

    /// Writes `buf` at byte offset `off` (both sector aligned); sleeps. The data may sit in the
    /// device's volatile cache until [`TargetDevice::flush`].
    pub(crate) fn write_at(&self, off: u64, buf: &[u8]) -> Result {
        // The C side only reads the buffer of a write.
        self.sync_io(
            true,
            (false, false),
            off,
            buf.as_ptr().cast_mut(),
            buf.len(),
        )
    }

    /// Writes each of `extents` (sector aligned; their data one after another in `data`) at
    /// once and waits for all of them; sleeps. They must not overlap: they may land in any
    /// order. At most as many as `slots` holds.
    pub(crate) fn write_batch(
        &self,
        data: &[u8],
        extents: &[WbExtent],
        slots: &mut WriteSlots,
    ) -> Result {
        let c = slots.0.get_mut(..extents.len()).ok_or(EINVAL)?;
        let mut slots = c.iter_mut();
        each_batch_write(data, extents, |off, d| {
            let end = off.checked_add(d.len() as u64).ok_or(IoError)?;
            let slot = slots.next().ok_or(IoError)?;
            if off % 512 != 0 || d.len() % 512 != 0 || end > self.size_bytes() {
                return Err(IoError);
            }
            *slot = bindings::pcache_rs_write {
                sector: off >> 9,
                buf: d.as_ptr().cast(),
                len: d.len(),
            };
            Ok(())
        })
        .map_err(|_| EINVAL)?;
        // SAFETY: the block device is open (type invariant); the first `extents.len()` entries
        // of `c` describe pieces of `data`, borrowed for the duration of the call, which waits
        // for every write to finish and only reads them.
        let ret = unsafe {
            bindings::pcache_rs_write_batch(self.bdev(), c.as_ptr(), extents.len() as u32)
        };
        kernel::error::to_result(ret)
    }

    /// Writes each of `extents` (at most as many as `slots` has) from the cache device's mapping
    /// `map`: `e.len` bytes at `e.addr`, handed to the backing device as the mapping's own pages
    /// (upstream's writeback does the same), all submitted at once, and waits for them. The
    /// caller keeps those bytes unchanged until this returns (writeback holds the dirty tail, so
    /// GC gives none of their segments out again). A media error in them is met by the device's
    /// read of the memory, not by a machine-check-safe copy: keys with a data CRC are copied and
    /// checked instead (see `cache_core::writeback::writeback_extents`).
    pub(crate) fn write_batch_mapped(
        &self,
        map: &DaxMapping,
        extents: &[WbExtent],
        slots: &mut WriteSlots,
    ) -> Result {
        let c = slots.0.get_mut(..extents.len()).ok_or(EINVAL)?;
        for (slot, e) in c.iter_mut().zip(extents) {
            let end = e.off.checked_add(u64::from(e.len)).ok_or(EINVAL)?;
            if e.off % 512 != 0 || e.len % 512 != 0 || end > self.size_bytes() {
                return Err(EINVAL);
            }
            *slot = bindings::pcache_rs_write {
                sector: e.off >> 9,
                buf: map.mapped(e.addr, e.len as usize)?.cast(),
                len: e.len as usize,
            };
        }
        // The mapping has a `struct page` for each of its pages (`DaxMapping` takes only
        // pfn-backed memory): the bios are built on them.
        // SAFETY: the bdev is open (type invariant); `c`'s first `extents.len()` entries lie in
        // `map` (checked by `mapped`), which stays mapped for this call, which waits for every
        // write and only reads those ranges.
        let ret = unsafe {
            bindings::pcache_rs_write_batch(self.bdev(), c.as_ptr(), extents.len() as u32)
        };
        kernel::error::to_result(ret)
    }

    /// Zeroes `len` bytes at `off` (sector aligned), with the device's write-zeroes where it
    /// has one; sleeps.
    pub(crate) fn zero_out(&self, off: u64, len: u64) -> Result {
        // SAFETY: the block device is open while the device is held (type invariant); the
        // caller is in process context, where the C side may sleep.
        kernel::error::to_result(unsafe { bindings::pcache_rs_bdev_zeroout(self.bdev(), off, len) })
    }

    /// Makes every completed write durable (an empty `REQ_PREFLUSH` write); sleeps.
    pub(crate) fn flush(&self) -> Result {
        self.sync_io(true, (true, false), 0, core::ptr::null_mut(), 0)
    }
}
