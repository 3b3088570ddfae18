// SPDX-License-Identifier: GPL-2.0

//! The claim table: which cache devices have a running `pcache_rs` instance, and for which mapped
//! device, so two instances never drive one pmem device.
//!
//! A table loaded for the mapped device that already runs on the cache device (a reload, in LVM's
//! order: load, suspend, resume) is not refused: its constructor only validates, and the instance
//! starts in `preresume`. By then device-mapper has suspended the device, so the old instance has
//! persisted everything and marked its claim quiesced; it is destroyed only after the resume, and
//! touches the cache device no more. A table of another mapped device naming a claimed cache
//! device is refused. The table is one global mutex: looking for a claim and taking a slot happen under it,
//! so of two constructors racing for one device exactly one succeeds.

use super::target_type::CtrError;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::prelude::*;

/// Most cache devices in use at once.
const SLOTS: usize = 64;

/// A claimed cache device, the mapped device whose table holds it, and whether that instance is
/// quiesced (suspended, everything persisted); `devt == 0`: free.
#[derive(Clone, Copy)]
struct Slot {
    devt: u32,
    md: usize,
    quiesced: bool,
}

const FREE: Slot = Slot {
    devt: 0,
    md: 0,
    quiesced: false,
};

kernel::sync::global_lock! {
    // SAFETY: initialised by `init` from the module initialiser, before any constructor runs.
    unsafe(uninit) static ACTIVE: Mutex<[Slot; SLOTS]> = [FREE; SLOTS];
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

/// Why a cache device cannot be claimed now.
pub(crate) enum Held {
    /// The same mapped device has an instance on it: a reload, which takes over at resume.
    ByThisDevice,
    /// Another mapped device runs on it.
    ByOther,
    /// Every slot is taken.
    Full,
}

impl Held {
    /// The constructor's error for a refusal.
    pub(crate) fn ctr_error(&self) -> CtrError {
        match self {
            Held::ByThisDevice | Held::ByOther => {
                CtrError::new(c"Cache device is in use by another pcache_rs device", EBUSY)
            }
            Held::Full => CtrError::new(c"Too many pcache_rs devices", ENOSPC),
        }
    }
}

/// A claim on a slot of the table, released on drop.
///
/// # Invariants
///
/// Slot `self.0` holds this claim's device until drop.
pub(crate) struct ActiveClaim(usize);

impl ActiveClaim {
    /// Claims the cache device `devt` for the mapped device `md`
    /// ([`super::target_type::Target::mapped_device_id`]) if no instance has it.
    pub(crate) fn claim(devt: u32, md: usize) -> Result<Self, Held> {
        Self::claim_if(devt, md, |_| false)
    }

    /// Claims the cache device `devt` for `md` in `preresume`: a quiesced instance of the same
    /// mapped device (the old table, destroyed after the resume) does not stand in the way.
    pub(crate) fn take_over(devt: u32, md: usize) -> Result<Self, Held> {
        Self::claim_if(devt, md, |s| s.md == md && s.quiesced)
    }

    fn claim_if(devt: u32, md: usize, yields: impl Fn(&Slot) -> bool) -> Result<Self, Held> {
        let mut slots = ACTIVE.lock();
        if let Some(s) = slots
            .iter()
            .find(|s| s.devt == devt && devt != 0 && !yields(s))
        {
            return Err(if s.md == md {
                Held::ByThisDevice
            } else {
                Held::ByOther
            });
        }
        let Some(i) = slots.iter().position(|s| s.devt == 0) else {
            return Err(Held::Full);
        };
        if let Some(slot) = slots.get_mut(i) {
            *slot = Slot {
                devt,
                md,
                quiesced: false,
            };
        }
        // INVARIANT: slot `i` holds the device from here until drop.
        Ok(Self(i))
    }

    /// Marks the instance quiesced (suspended, everything persisted) or running again.
    pub(crate) fn set_quiesced(&self, quiesced: bool) {
        if let Some(slot) = ACTIVE.lock().get_mut(self.0) {
            slot.quiesced = quiesced;
        }
    }
}

impl Drop for ActiveClaim {
    fn drop(&mut self) {
        if let Some(slot) = ACTIVE.lock().get_mut(self.0) {
            *slot = FREE;
        }
    }
}
