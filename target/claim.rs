// SPDX-License-Identifier: GPL-2.0

//! The claim table: which cache devices have a live `pcache_rs` instance, so two instances
//! never drive one pmem device.
//!
//! A slot holds `devt << 1 | quiesced`. A suspended (quiesced) instance has persisted
//! everything and lets a reloaded table attach to its device. The table is one global mutex:
//! checking for a live claim and taking a slot happen under it, so of two constructors racing
//! for one device exactly one succeeds.

use super::target_type::CtrError;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::prelude::*;

/// Most cache devices in use at once.
const SLOTS: usize = 64;

kernel::sync::global_lock! {
    // SAFETY: initialised by `init` from the module initialiser, before any constructor runs.
    unsafe(uninit) static ACTIVE: Mutex<[u64; SLOTS]> = [0; SLOTS];
}

/// Whether the claim table has been initialised.
static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Initialises the claim table; call it from the module initialiser, before the target type
/// is registered (later calls do nothing).
pub(crate) fn init() {
    if !INITIALISED.swap(true, Ordering::AcqRel) {
        // SAFETY: the flag lets exactly one call through, and the module initialiser makes it
        // before any constructor can run.
        unsafe { ACTIVE.init() };
    }
}

/// A claim on a slot of the table, released on drop.
///
/// # Invariants
///
/// Slot `self.0` holds this claim's device until drop.
pub(crate) struct ActiveClaim(usize);

impl ActiveClaim {
    /// Claims the cache device `devt`, or fails if a live instance holds it.
    pub(crate) fn claim(devt: u32) -> Result<Self, CtrError> {
        let live = u64::from(devt) << 1;
        let mut slots = ACTIVE.lock();
        if slots.contains(&live) {
            return Err(CtrError::new(
                c"Cache device is in use by another pcache_rs device",
                EBUSY,
            ));
        }
        let Some(i) = slots.iter().position(|&s| s == 0) else {
            return Err(CtrError::new(c"Too many pcache_rs devices", ENOSPC));
        };
        if let Some(slot) = slots.get_mut(i) {
            *slot = live;
        }
        // INVARIANT: slot `i` holds the device from here until drop.
        Ok(Self(i))
    }

    /// Marks the instance quiesced (suspended, everything persisted) or live again.
    pub(crate) fn set_quiesced(&self, quiesced: bool) {
        if let Some(slot) = ACTIVE.lock().get_mut(self.0) {
            *slot = (*slot & !1) | u64::from(quiesced);
        }
    }
}

impl Drop for ActiveClaim {
    fn drop(&mut self) {
        if let Some(slot) = ACTIVE.lock().get_mut(self.0) {
            *slot = 0;
        }
    }
}
