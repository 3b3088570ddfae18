//! The environment the engine runs in: the only way it touches hardware.
//!
//! The engine is a state machine over two devices. The kernel glue implements
//! these traits over a DAX mapping (`copy_mc_to_kernel`, `memcpy_flushcache`/
//! `arch_wb_cache_pmem`, `pmem_wmb`) and a backing `dm_dev` (`submit_bio_wait` from
//! the cache's workqueue); the host test crate implements them with the crash
//! simulator, whose pmem only makes a store durable once it is flushed *and*
//! fenced.
//!
//! Beyond the two devices, the host supplies primitives and no policy: mutual
//! exclusion over the engine ([`Locked`]), sleeping, waking, deferred work and a
//! clock ([`Waiting`]). What to do with them (when a request waits for room, when
//! writeback copies without the lock, when GC runs) is the engine's, in
//! [`super::request`] and [`super::background`], and the simulator runs that same
//! code. The `cpu` argument of `write` picks the data head, so the per-CPU data
//! layout is already the upstream one.

use super::writeback::WbExtent;

/// A device error (media poison on pmem, a failed bio on the backing device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError;

/// The persistent-memory cache device, addressed by byte offset.
pub trait Pmem {
    /// Size of the mapped device in bytes.
    fn size(&self) -> u64;
    /// Copy bytes out (machine-check safe in the kernel); `Err` on poison.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Store bytes. Not durable until [`Pmem::flush`] of the range and a [`Pmem::fence`].
    /// Shared (`&self`), as the device is: every CPU stores into its own
    /// reservations at once, and what orders stores to one place is the
    /// engine's locks, not the handle.
    fn write(&self, off: u64, data: &[u8]);
    /// Write back the CPU cache lines covering `off..off+len`.
    fn flush(&self, off: u64, len: u64);
    /// Wait for preceding flushes to reach the persistence domain (`pmem_wmb`).
    fn fence(&self);
    /// CRC32C of `data` continuing from `crc`, raw (no inversion): the kernel's
    /// `crc32c(crc, data, len)`. The default is the table-driven `meta::crc32c`;
    /// the kernel glue should forward to the kernel's (hardware accelerated)
    /// function, which is several times faster on a 4 KiB block.
    fn crc32c(&self, crc: u32, data: &[u8]) -> u32 {
        crate::meta::crc32c::crc32c(crc, data)
    }
    /// [`Pmem::write`] `data` and return its CRC32C continuing from `crc`
    /// ([`Pmem::crc32c`]), both of the very bytes stored. Memory that can
    /// change while it is read (a bio's pages: a process may rewrite its
    /// `O_DIRECT` buffer during the write) must be read once for both, or the
    /// key's CRC may not match its data, which then fails every read and every
    /// writeback. The default reads `data` twice, for memory that cannot change
    /// under the call (`&[u8]` of the host's own buffers).
    fn write_crc(&self, off: u64, data: &[u8], crc: u32) -> u32 {
        self.write(off, data);
        self.crc32c(crc, data)
    }
    /// [`Pmem::read`] into `buf` and return the CRC32C of the bytes read,
    /// continuing from `crc`: the read side of [`Pmem::write_crc`]. `buf` may be
    /// a bio's page, which its owner may rewrite while the read is in flight;
    /// a CRC taken over `buf` after the copy would then fail data that is
    /// sound (an IO error and a CRC error counted). The kernel's reads pmem
    /// into a buffer of its own, CRCs that and copies it to `buf`. The default
    /// reads `buf` back, for memory that cannot change under the call.
    fn read_crc(&self, off: u64, buf: &mut [u8], crc: u32) -> Result<u32, IoError> {
        self.read(off, buf)?;
        Ok(self.crc32c(crc, buf))
    }
    /// A read is to copy from cache segment `seg` ([`super::io::Hit`]): until
    /// as many [`Pmem::unpin`]s, the engine does not hand the segment out again
    /// (the data stays where the read finds it, even if GC invalidates the
    /// segment meanwhile). All three run on any CPU with no lock held, so the
    /// kernel counts in atomics. The defaults count nothing: for a pmem no
    /// other thread reuses segments of while a read copies (images, tools).
    fn pin(&self, _seg: u32) {}
    /// See [`Pmem::pin`]; after the read's last access to the segment.
    fn unpin(&self, _seg: u32) {}
    /// Whether a read still holds a pin on segment `seg` (see [`Pmem::pin`]).
    fn pinned(&self, _seg: u32) -> bool {
        false
    }
}

/// The backing block device, addressed by byte offset (sector aligned by callers).
pub trait Backing {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read. Shared (`&self`), as the device is: requests, writeback and
    /// messages send it bios at once.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Write; may sit in the device's volatile cache until [`Backing::flush`].
    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError>;
    /// REQ_PREFLUSH: make every completed write durable.
    fn flush(&self) -> Result<(), IoError>;
    /// Write each of `extents` (at most [`WRITE_BATCH_MAX`], never overlapping)
    /// at its `off`, their data one after another in `data` (see
    /// [`each_batch_write`]): the kernel glue submits them all at once and
    /// waits, so that writeback overlaps the backing device's latency. In any
    /// order.
    fn write_batch(&self, data: &[u8], extents: &[WbExtent]) -> Result<(), IoError> {
        each_batch_write(data, extents, |off, d| self.write(off, d))
    }
    /// [`Backing::write_batch`] with each extent's data taken where it is on
    /// the cache device, `pmem` (`e.len` bytes at `e.addr`), with no copy,
    /// as upstream writes back from the pmem pages: the device reads the
    /// cache's memory itself. The caller keeps that data where it is until
    /// this returns. `Ok(false)`: this device cannot (nothing written); the
    /// caller copies.
    fn write_batch_from<P: Pmem>(&self, _pmem: &P, _extents: &[WbExtent]) -> Result<bool, IoError> {
        Ok(false)
    }
}

/// Most writes in one [`Backing::write_batch`]: a writeback step's worth of
/// keys, so that a step of small keys goes out in one round trip.
pub const WRITE_BATCH_MAX: usize = super::writeback::WB_EXTENTS_MAX;

/// Calls `f(off, data)` for each extent of a [`Backing::write_batch`], in
/// order; an error if `data` is shorter than the extents.
pub fn each_batch_write(
    data: &[u8],
    extents: &[WbExtent],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), IoError>,
) -> Result<(), IoError> {
    let mut rest = data;
    for e in extents {
        let (this, more) = rest.split_at_checked(e.len as usize).ok_or(IoError)?;
        f(e.off, this)?;
        rest = more;
    }
    Ok(())
}

/// A shared or unique reference to a device is the device: callers lend the
/// engine theirs (the tool's devices, a test's).
macro_rules! forward_devices {
    ($($r:tt)+) => {
        impl<T: Pmem + ?Sized> Pmem for $($r)+ T {
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
                (**self).read(off, buf)
            }
            fn write(&self, off: u64, data: &[u8]) {
                (**self).write(off, data)
            }
            fn flush(&self, off: u64, len: u64) {
                (**self).flush(off, len)
            }
            fn fence(&self) {
                (**self).fence()
            }
            fn crc32c(&self, crc: u32, data: &[u8]) -> u32 {
                (**self).crc32c(crc, data)
            }
            fn write_crc(&self, off: u64, data: &[u8], crc: u32) -> u32 {
                (**self).write_crc(off, data, crc)
            }
            fn read_crc(&self, off: u64, buf: &mut [u8], crc: u32) -> Result<u32, IoError> {
                (**self).read_crc(off, buf, crc)
            }
            fn pin(&self, seg: u32) {
                (**self).pin(seg)
            }
            fn unpin(&self, seg: u32) {
                (**self).unpin(seg)
            }
            fn pinned(&self, seg: u32) -> bool {
                (**self).pinned(seg)
            }
        }

        impl<T: Backing + ?Sized> Backing for $($r)+ T {
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
                (**self).read(off, buf)
            }
            fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
                (**self).write(off, data)
            }
            fn flush(&self) -> Result<(), IoError> {
                (**self).flush()
            }
            fn write_batch(&self, data: &[u8], extents: &[WbExtent]) -> Result<(), IoError> {
                (**self).write_batch(data, extents)
            }
            fn write_batch_from<P: Pmem>(
                &self,
                pmem: &P,
                extents: &[WbExtent],
            ) -> Result<bool, IoError> {
                (**self).write_batch_from(pmem, extents)
            }
        }
    };
}

forward_devices!(&);
forward_devices!(&mut);

/// A lock for each subtree of the key index, guarding no data of its own
/// (upstream: each subtree's `tree_lock`): spinlocks in the kernel. The index
/// holds one for a single treap operation, never two at once, and never across
/// IO or a data copy; whatever runs under it (the callbacks of
/// [`super::Index::insert`] and [`super::Index::retain_from`]) must not sleep.
pub trait SubtreeLocks {
    /// How many subtrees have a lock.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Takes subtree `sub`'s lock (nothing for `sub >= len()`).
    fn lock(&self, sub: usize);
    /// Gives back the lock [`SubtreeLocks::lock`] took.
    fn unlock(&self, sub: usize);
}

/// Mutual exclusion over a `T` (the engine, or the engine with the glue's
/// request buffers): a kernel mutex in the module, a `RefCell` in the
/// single-threaded simulator.
pub trait Locked<T> {
    /// Runs `f` with `T` locked.
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

/// Sleeping, waking and deferred work.
pub trait Waiting {
    /// A ticket for [`Waiting::wait`]. Take it before checking the condition
    /// waited for, so that a wake between the check and the wait is not lost.
    fn ticket(&self) -> u64;
    /// Sleeps until [`Waiting::wake_all`] is called after `ticket` was taken
    /// (returns true at once if it already was), or `timeout_ms` pass (false).
    fn wait(&self, ticket: u64, timeout_ms: u32) -> bool;
    /// Wakes every waiter.
    fn wake_all(&self);
    /// Asks for [`super::background::Background::run`] to run soon (the
    /// simulator may run it at once).
    fn kick(&self);
    /// A clock: milliseconds since some fixed point, never going back.
    fn now_ms(&self) -> u64;
}

/// Store `data` at `off`, flush it and fence: `memcpy_flushcache` + `pmem_wmb`.
pub(crate) fn persist<P: Pmem>(pmem: &P, off: u64, data: &[u8]) {
    pmem.write(off, data);
    pmem.flush(off, data.len() as u64);
    pmem.fence();
}
