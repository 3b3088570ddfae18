// SPDX-License-Identifier: GPL-2.0

//! Which CPU a request runs on: the engine keeps a data head per CPU (upstream: `data_heads`
//! per CPU), so that writes on different CPUs append to different segments.

use super::bindings;

/// How many data heads: one per CPU id there can be (`nr_cpu_ids`).
pub(crate) fn cpu_ids() -> usize {
    // SAFETY: reads a variable fixed at boot; no preconditions.
    let n = unsafe { bindings::pcache_rs_nr_cpu_ids() };
    (n as usize).max(1)
}

/// The CPU this runs on now (`raw_smp_processor_id`). A hint for picking a data head: the task
/// may move right after, which costs locality, not correctness (each head has its lock).
pub(crate) fn this_cpu() -> usize {
    // SAFETY: no preconditions; callable with preemption on (the raw variant does not check).
    unsafe { bindings::pcache_rs_cpu_id() as usize }
}

/// A stretch of code that must not sleep, checked where the kernel can check it: with
/// `CONFIG_DEBUG_ATOMIC_SLEEP` (the test kernel) preemption is off while the guard lives, so
/// anything in it that sleeps or may sleep logs "sleeping function called from invalid
/// context", which fails the test that ran it. Without that option it does nothing.
pub(crate) struct NoSleep {
    on: bool,
    /// Not `Send`: preemption is enabled again on the task that disabled it.
    _task: core::marker::PhantomData<*mut ()>,
}

impl NoSleep {
    /// Starts the stretch if `on`.
    pub(crate) fn enter(on: bool) -> Self {
        let on = on && cfg!(CONFIG_DEBUG_ATOMIC_SLEEP);
        if on {
            // SAFETY: no preconditions; paired with the enable in `drop`, on the same task.
            unsafe { bindings::pcache_rs_preempt_disable() };
        }
        Self {
            on,
            _task: core::marker::PhantomData,
        }
    }
}

impl Drop for NoSleep {
    fn drop(&mut self) {
        if self.on {
            // SAFETY: `enter` disabled preemption on this task.
            unsafe { bindings::pcache_rs_preempt_enable() };
        }
    }
}
