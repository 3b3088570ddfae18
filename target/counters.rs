// SPDX-License-Identifier: GPL-2.0

//! Event counters kept per CPU (`alloc_percpu`, `this_cpu_add`): counting a request touches
//! only the counting CPU's cache line, and reading them sums over the CPUs.

use super::bindings;
use core::ptr::NonNull;
use kernel::{ffi::c_void, prelude::*};

/// `N` counters per CPU.
///
/// # Invariants
///
/// `ptr` is a per-CPU allocation of `N` `u64`s from `pcache_rs_counters_alloc`, owned by this
/// value and freed on drop.
pub(crate) struct PerCpuCounters<const N: usize> {
    ptr: NonNull<c_void>,
}

// SAFETY: the counters are per-CPU memory that `this_cpu_add` updates and that readers sum with
// plain loads; any thread and CPU may do either.
unsafe impl<const N: usize> Send for PerCpuCounters<N> {}
// SAFETY: as for `Send`: every operation is safe to run concurrently.
unsafe impl<const N: usize> Sync for PerCpuCounters<N> {}

impl<const N: usize> PerCpuCounters<N> {
    /// `N` counters at zero on every CPU.
    pub(crate) fn new() -> Result<Self> {
        let n = u32::try_from(N).map_err(|_| EINVAL)?;
        // SAFETY: plain allocation; a null return is handled.
        let ptr = NonNull::new(unsafe { bindings::pcache_rs_counters_alloc(n) }).ok_or(ENOMEM)?;
        // INVARIANT: `ptr` is a fresh per-CPU allocation of `N` u64s (`__alloc_percpu` zeroes it).
        Ok(Self { ptr })
    }

    /// Adds `v` to counter `i` on this CPU; an `i` out of range counts nothing.
    pub(crate) fn add(&self, i: usize, v: u64) {
        if i < N {
            // SAFETY: `ptr` holds `N > i` counters per CPU (type invariant).
            unsafe { bindings::pcache_rs_counter_add(self.ptr.as_ptr(), i as u32, v) };
        }
    }

    /// Counter `i` summed over the CPUs (0 when out of range).
    pub(crate) fn sum(&self, i: usize) -> u64 {
        if i >= N {
            return 0;
        }
        // SAFETY: `ptr` holds `N > i` counters per CPU (type invariant).
        unsafe { bindings::pcache_rs_counter_sum(self.ptr.as_ptr(), i as u32) }
    }

    /// Sets every counter to zero on every CPU (adds racing with it may survive).
    pub(crate) fn reset(&self) {
        // SAFETY: `ptr` holds `N` counters per CPU (type invariant); `N` fit in a u32 at `new`.
        unsafe { bindings::pcache_rs_counters_zero(self.ptr.as_ptr(), N as u32) };
    }
}

impl<const N: usize> Drop for PerCpuCounters<N> {
    fn drop(&mut self) {
        // SAFETY: the allocation is ours and freed once (type invariant).
        unsafe { bindings::pcache_rs_counters_free(self.ptr.as_ptr()) };
    }
}
