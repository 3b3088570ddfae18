// SPDX-License-Identifier: GPL-2.0

//! The cache device mapped whole into the kernel's address space through DAX.
//!
//! `dax_direct_access` usually returns the whole range as one contiguous kernel mapping; when it
//! does not (a namespace made of several ranges), the pages are collected and `vmap`ed into one
//! virtually contiguous range, as upstream dm-pcache does. Everything above sees byte offsets:
//! reads use the machine-check-safe copy, writes the cache-flushing copy, and [`DaxMapping::fence`]
//! orders them, which is all a crash-consistent log needs.

use super::{bindings, device::TargetDevice};
use kernel::prelude::*;

/// Why a device could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DaxError {
    /// The block device has no DAX device behind it.
    NotDax,
    /// Smaller than the minimum the caller asked for.
    TooSmall,
    /// `dax_direct_access`, `vmap` or an allocation failed.
    Map(Error),
}

/// A DAX mapping of a whole device, which it owns (the mapping never outlives the device).
///
/// # Invariants
///
/// `base` is the start of a kernel mapping of the first `len` bytes of `dev`, valid until drop;
/// if `vmapped`, it was created by `vmap` and is released with `vunmap`.
pub(crate) struct DaxMapping {
    base: *mut u8,
    len: u64,
    vmapped: bool,
    dev: TargetDevice,
}

// SAFETY: the mapping is plain memory; callers that write the same bytes from two CPUs order
// themselves (the engine never does), and the C copy routines are callable from any context.
unsafe impl Send for DaxMapping {}
// SAFETY: as above; no method hands out a Rust reference into the mapping.
unsafe impl Sync for DaxMapping {}

fn page_shift() -> u32 {
    bindings::PCACHE_RS_PAGE_SHIFT
}

impl DaxMapping {
    /// Maps all of `dev`, which must be DAX-capable and hold at least `min_len` bytes.
    pub(crate) fn new(dev: TargetDevice, min_len: u64) -> Result<Self, DaxError> {
        let dax = dev.dax_dev().ok_or(DaxError::NotDax)?;
        let len = dev.size_bytes();
        if len < min_len {
            return Err(DaxError::TooSmall);
        }
        let total_pages = (len >> page_shift()) as c_long;
        if total_pages <= 0 {
            return Err(DaxError::TooSmall);
        }
        let len = (total_pages as u64) << page_shift();

        let mut kaddr: *mut c_void = core::ptr::null_mut();
        let mut pfn: c_ulong = 0;
        // SAFETY: plain lock acquisition, released below on every path.
        let id = unsafe { bindings::dax_read_lock() };
        // SAFETY: `dax` is the live DAX device of an open block device; the out-pointers are
        // valid; the DAX read lock is held.
        let mapped = unsafe {
            bindings::dax_direct_access(
                dax.as_ptr(),
                0,
                total_pages,
                bindings::dax_access_mode_DAX_ACCESS,
                &mut kaddr,
                &mut pfn,
            )
        };
        let result = if mapped < 0 {
            Err(DaxError::Map(Error::from_errno(mapped as c_int)))
        // SAFETY: `pfn_valid` only inspects the memory map.
        } else if !unsafe { bindings::pcache_rs_pfn_valid(pfn) } {
            Err(DaxError::Map(EOPNOTSUPP))
        } else if mapped >= total_pages && !kaddr.is_null() {
            Ok((kaddr.cast::<u8>(), false))
        } else {
            Self::vmap_pages(dax, total_pages).map(|base| (base, true))
        };
        // SAFETY: `id` came from the `dax_read_lock` above.
        unsafe { bindings::dax_read_unlock(id) };

        let (base, vmapped) = result?;
        // INVARIANT: `base` maps `len` bytes of `dev`, directly or through `vmap`.
        Ok(Self {
            base,
            len,
            vmapped,
            dev,
        })
    }

    /// Collects the pages of the whole device and maps them contiguously.
    fn vmap_pages(
        dax: core::ptr::NonNull<bindings::dax_device>,
        total_pages: c_long,
    ) -> Result<*mut u8, DaxError> {
        let count = c_uint::try_from(total_pages).map_err(|_| DaxError::Map(E2BIG))?;
        // SAFETY: plain allocation; checked for NULL below.
        let pages = unsafe {
            bindings::pcache_rs_vmalloc_array(
                total_pages as usize,
                size_of::<*mut kernel::bindings::page>(),
            )
        }
        .cast::<*mut kernel::bindings::page>();
        if pages.is_null() {
            return Err(DaxError::Map(ENOMEM));
        }
        let mut i: c_long = 0;
        let mut result = Ok(());
        while i < total_pages {
            let mut pfn: c_ulong = 0;
            // SAFETY: as in `new`; the caller holds the DAX read lock.
            let chunk = unsafe {
                bindings::dax_direct_access(
                    dax.as_ptr(),
                    i as c_ulong,
                    total_pages - i,
                    bindings::dax_access_mode_DAX_ACCESS,
                    core::ptr::null_mut(),
                    &mut pfn,
                )
            };
            if chunk <= 0 {
                result = Err(DaxError::Map(if chunk < 0 {
                    Error::from_errno(chunk as c_int)
                } else {
                    EINVAL
                }));
                break;
            }
            // SAFETY: `pfn_valid` only inspects the memory map.
            if !unsafe { bindings::pcache_rs_pfn_valid(pfn) } {
                result = Err(DaxError::Map(EOPNOTSUPP));
                break;
            }
            let mut left = chunk;
            while left > 0 && i < total_pages {
                // SAFETY: `i < total_pages`, inside the array; `pfn` is valid (checked above for
                // the chunk start, and a chunk is physically contiguous).
                unsafe {
                    pages
                        .add(i as usize)
                        .write(bindings::pcache_rs_pfn_to_page(pfn))
                };
                i += 1;
                pfn += 1;
                left -= 1;
                if i & 1023 == 0 {
                    // SAFETY: we are in process context (ctr) and hold no spinlock.
                    unsafe { bindings::pcache_rs_cond_resched() };
                }
            }
        }
        let base = match result {
            // SAFETY: all `count` entries of `pages` are initialised with valid pages.
            Ok(()) => unsafe { bindings::pcache_rs_vmap(pages, count) }.cast::<u8>(),
            Err(_) => core::ptr::null_mut(),
        };
        // SAFETY: `pages` came from `vmalloc_array` and `vmap` does not keep it.
        unsafe { bindings::vfree(pages.cast()) };
        result?;
        if base.is_null() {
            return Err(DaxError::Map(ENOMEM));
        }
        Ok(base)
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The mapped device.
    pub(crate) fn device(&self) -> &TargetDevice {
        &self.dev
    }

    /// Where bytes `off..off + len` of the device are mapped (for a device to read them from,
    /// [`super::device::TargetDevice::write_batch_mapped`]): `EINVAL` out of range. The pointer
    /// is valid as long as `self`.
    pub(crate) fn mapped(&self, off: u64, len: usize) -> Result<*const u8> {
        self.range(off, len).map(<*mut u8>::cast_const)
    }

    fn range(&self, off: u64, len: usize) -> Result<*mut u8> {
        let end = off.checked_add(len as u64).ok_or(EINVAL)?;
        if end > self.len {
            return Err(EINVAL);
        }
        // SAFETY: `off + len <= self.len`, so the pointer stays inside the mapping (invariant).
        Ok(unsafe { self.base.add(off as usize) })
    }

    /// Copies `dst.len()` bytes at `off` out of pmem; a media error gives `EIO`, not a crash.
    pub(crate) fn read(&self, off: u64, dst: &mut [u8]) -> Result {
        let src = self.range(off, dst.len())?;
        let len = c_uint::try_from(dst.len()).map_err(|_| EINVAL)?;
        // SAFETY: `src..src+len` is inside the mapping (checked by `range`), `dst` is a valid
        // exclusive buffer of `len` bytes, and they cannot overlap (`dst` is not pmem memory
        // handed out by us).
        let left = unsafe {
            bindings::pcache_rs_copy_mc_to_kernel(dst.as_mut_ptr().cast(), src.cast(), len)
        };
        if left != 0 {
            return Err(EIO);
        }
        Ok(())
    }

    /// Copies `src` to pmem at `off`, flushing it out of the CPU caches (not yet ordered: see
    /// [`DaxMapping::fence`]).
    pub(crate) fn write(&self, off: u64, src: &[u8]) -> Result {
        let dst = self.range(off, src.len())?;
        // SAFETY: `dst..dst+len` is inside the mapping (checked by `range`); `src` is valid for
        // reads and is not pmem memory handed out by us.
        unsafe {
            bindings::pcache_rs_memcpy_flushcache(dst.cast(), src.as_ptr().cast(), src.len())
        };
        Ok(())
    }

    /// Stores `src` at `off` as [`DaxMapping::write`] does and returns its CRC32C continuing
    /// from `crc`, in one pass that reads each byte of `src` once (see
    /// [`super::crc::copy_flushcache_crc32c`]). `None`, with nothing stored, when out of range
    /// or where the single pass is not available: the caller stages.
    pub(crate) fn write_crc(&self, off: u64, src: &[u8], crc: u32) -> Option<u32> {
        let dst = self.range(off, src.len()).ok()?;
        // SAFETY: `dst..dst+len` is inside the mapping (checked by `range`) and is not `src`,
        // which is not pmem memory handed out by us.
        unsafe { super::crc::copy_flushcache_crc32c(dst, src, crc) }
    }

    /// Orders all earlier flushed writes before any later one (`pmem_wmb`).
    pub(crate) fn fence(&self) {
        // SAFETY: a store fence; no memory is accessed.
        unsafe { bindings::pcache_rs_pmem_wmb() };
    }
}

impl Drop for DaxMapping {
    fn drop(&mut self) {
        if self.vmapped {
            // SAFETY: `base` came from `vmap` and is unmapped exactly once (type invariant).
            unsafe { bindings::vunmap(self.base.cast()) };
        }
        // `dev` is dropped after this, so the device is put after the mapping is gone.
    }
}
