// SPDX-License-Identifier: GPL-2.0

//! The background work of a running cache: a delayed work item that runs the engine's
//! background round ([`crate::cache_core::background`]) every [`TICK_MS`], at once again while
//! the round says there is more, and whose errors it logs.

use super::live::{ErrorText, LiveCache};
use crate::cache_core::background::Round;
use core::sync::atomic::{AtomicU32, Ordering};
use kernel::prelude::*;

/// Period of the background work when it has nothing left to do.
pub(crate) const TICK_MS: u32 = 200;

impl LiveCache {
    /// The background tick: one round; `true` asks for the next one at once.
    pub(crate) fn tick(&self) -> bool {
        if self.quiesced.load(Ordering::Acquire) {
            return false;
        }
        let round = self.writer.lock().run(&self.engine, self, false);
        self.report(&round);
        round.more
    }

    /// Logs what went wrong in a round. A dead backing device fails every round, so only the
    /// 1st, 2nd, 4th, 8th, ... error of each kind is logged. Nothing is dropped: writeback
    /// retries the same kset next round.
    pub(crate) fn report(&self, round: &Round) {
        let count = |n: &AtomicU32| {
            let c = n.fetch_add(1, Ordering::Relaxed) + 1;
            c.is_power_of_two().then_some(c)
        };
        if let Some(e) = &round.writeback_error {
            if let Some(n) = count(&self.writeback_errors) {
                pr_warn!(
                    "pcache_rs: writeback: {} ({} errors so far)\n",
                    ErrorText(e),
                    n
                );
            }
        }
        if let Some(e) = &round.gc_error {
            if let Some(n) = count(&self.gc_errors) {
                pr_warn!("pcache_rs: gc: {} ({} errors so far)\n", ErrorText(e), n);
            }
        }
    }
}
