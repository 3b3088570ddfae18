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
