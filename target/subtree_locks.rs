// SPDX-License-Identifier: GPL-2.0

//! The spinlocks of the key index's subtrees (upstream: each subtree's `tree_lock`): an
//! array of `spinlock_t`, one lockdep class for all, behind [`SubtreeLocks`].

use super::bindings;
use crate::cache_core::SubtreeLocks;
use core::ptr::NonNull;
use kernel::{ffi::c_void, prelude::*};

/// A spinlock for each of `n` subtrees.
///
/// # Invariants
///
/// `ptr` is an array of `n` initialised `spinlock_t`s from `pcache_rs_subtree_locks_alloc`,
/// owned by this value and freed on drop.
pub(crate) struct SubtreeSpinLocks {
    ptr: NonNull<c_void>,
    n: usize,
}

// SAFETY: the locks are plain kernel memory; taking and releasing a spinlock is safe from any
// thread, and the array is freed only on drop, when nobody else can hold a reference.
unsafe impl Send for SubtreeSpinLocks {}
// SAFETY: as for `Send`: spinlocks exist to be taken from several CPUs at once.
unsafe impl Sync for SubtreeSpinLocks {}

impl SubtreeSpinLocks {
    /// `n` unlocked spinlocks.
    pub(crate) fn new(n: usize) -> Result<Self> {
        let count = u32::try_from(n).map_err(|_| EINVAL)?;
        // SAFETY: plain allocation; a null return is handled.
        let ptr = NonNull::new(unsafe { bindings::pcache_rs_subtree_locks_alloc(count) })
            .ok_or(ENOMEM)?;
        // INVARIANT: `ptr` is a fresh array of `n` initialised spinlocks.
        Ok(Self { ptr, n })
    }
}

impl SubtreeLocks for SubtreeSpinLocks {
    fn len(&self) -> usize {
        self.n
    }

    fn lock(&self, sub: usize) {
        if sub < self.n {
            // SAFETY: `ptr` holds `n > sub` initialised spinlocks (type invariant); `sub` fits in
            // a u32 because `n` did at `new`.
            unsafe { bindings::pcache_rs_subtree_lock(self.ptr.as_ptr(), sub as u32) };
        }
    }

    fn unlock(&self, sub: usize) {
        if sub < self.n {
            // SAFETY: as in `lock`; the index releases only a lock it took (`Held` in the index
            // unlocks the subtree its `hold` locked, once).
            unsafe { bindings::pcache_rs_subtree_unlock(self.ptr.as_ptr(), sub as u32) };
        }
    }
}

impl Drop for SubtreeSpinLocks {
    fn drop(&mut self) {
        // SAFETY: the array is ours and freed once (type invariant); nobody holds a lock, since
        // the index that takes them is being dropped with it.
        unsafe { bindings::pcache_rs_subtree_locks_free(self.ptr.as_ptr()) };
    }
}
