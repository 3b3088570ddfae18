//! Writes in flight to the backing device, in the modes that write through
//! (see [`super::mode`]), for a caller that sends them itself
//! ([`Cache::through_start`], then [`Cache::fill_start`] and
//! [`Cache::fill_end`], or [`Cache::through_failed`]).
//!
//! While such a write is out, the backing device may hold the old data of its
//! range or the new, and what a read of the range brings back is either. So:
//!
//! - the write first drops what the cache holds of its range (and with it the
//!   placeholders of reads already out there, which then fill nothing);
//! - a read of the range meanwhile is not cached (its gap gets no placeholder);
//! - two writes to overlapping ranges in flight at once *contest* each other:
//!   the device may apply them in either order, whatever order they complete
//!   in, so neither caches its data. The same goes for a write served
//!   synchronously and for a discard of the range.
//!
//! Once the write completes, writethrough caches its data as clean keys unless
//! it was contested; writearound caches nothing. Either way the cache then
//! holds, for the range, nothing or exactly what the backing device holds, and
//! a later read that misses fills it from there.
//!
//! The record of writes in flight is a fixed table ([`THROUGH_MAX`] slots), so
//! the IO path never allocates; a write that finds it full waits for a slot
//! (the kernel target) or is served synchronously ([`Cache::write_from`]).

use super::data::Source;
use super::env::Locked;
use super::env::{Backing, Pmem};
use super::error::CacheError;
use super::io::Gap;
use super::stats::Counter;
use super::{Cache, Memory};

/// Most writes through to the backing device in flight at once.
pub const THROUGH_MAX: usize = 32;

/// The tag bit of a write in flight's [`Gap`]; its slot is in the low bits.
/// Read placeholders' tags never have it (see [`Cache::read_start`]).
pub const THROUGH_TAG: u32 = 1 << 31;

/// One write in flight.
#[derive(Debug, Clone, Copy, Default)]
struct Through {
    off: u64,
    end: u64,
    live: bool,
    /// Another write to an overlapping range ran meanwhile: the order the
    /// device applied them in is unknown, so this one caches nothing.
    contested: bool,
}

impl Through {
    fn overlaps(&self, off: u64, end: u64) -> bool {
        self.live && self.off < end && off < self.end
    }
}

/// The writes through to the backing device in flight.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    slots: [Through; THROUGH_MAX],
    live: usize,
}

impl Default for InFlight {
    fn default() -> Self {
        Self {
            slots: [Through::default(); THROUGH_MAX],
            live: 0,
        }
    }
}

impl InFlight {
    /// Whether a write in flight overlaps `off..end`.
    pub(crate) fn overlaps(&self, off: u64, end: u64) -> bool {
        self.live > 0 && self.slots.iter().any(|t| t.overlaps(off, end))
    }

    /// Marks every write in flight that overlaps `off..end` contested; whether
    /// there was one.
    pub(crate) fn contest(&mut self, off: u64, end: u64) -> bool {
        if self.live == 0 {
            return false;
        }
        let mut any = false;
        for t in self.slots.iter_mut().filter(|t| t.overlaps(off, end)) {
            t.contested = true;
            any = true;
        }
        any
    }

    /// Records a write of `off..end`; its slot, `None` when the table is full.
    fn claim(&mut self, off: u64, end: u64, contested: bool) -> Option<usize> {
        let slot = self.slots.iter().position(|t| !t.live)?;
        let t = self.slots.get_mut(slot)?;
        *t = Through {
            off,
            end,
            live: true,
            contested,
        };
        self.live += 1;
        Some(slot)
    }

    /// Whether the write in `slot` was contested; `None` if it is not live.
    pub(crate) fn get(&self, slot: usize) -> Option<bool> {
        self.slots.get(slot).filter(|t| t.live).map(|t| t.contested)
    }

    /// Ends the write in `slot`; whether it was contested, `None` if it was
    /// not live.
    pub(crate) fn release(&mut self, slot: usize) -> Option<bool> {
        let t = self.slots.get_mut(slot).filter(|t| t.live)?;
        t.live = false;
        self.live -= 1;
        Some(t.contested)
    }

    /// How many writes are in flight.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Starts a write of `len` bytes at `off` that the caller sends to the
    /// backing device itself (see the [module](self) comment): drops what the
    /// cache holds of the range and records the write as in flight. The
    /// returned [`Gap`] (the whole write: `at` 0) goes back to
    /// [`Cache::through_done`] when the backing device completes it.
    ///
    /// `Busy` when [`THROUGH_MAX`] writes are in flight or the key pool has no
    /// room to drop the range (the caller waits and tries again, or serves the
    /// write synchronously, [`Cache::write_from`]); `Invalid` outside the
    /// writethrough and writearound modes.
    pub fn through_start(&self, off: u64, len: usize) -> Result<Gap, CacheError> {
        if !self.mode().writes_through() {
            return Err(CacheError::Invalid(
                "write through in a mode that caches writes",
            ));
        }
        self.check_range(off, len)?;
        let end = off + len as u64;
        // In flight first, then the range dropped: a read that looked before
        // the claim placed its placeholder before the drop, which takes it; one
        // that looks after sees the write and places none (see
        // `Cache::place_unless_through`).
        let slot = self
            .in_flight
            .with(|f| {
                let contested = f.contest(off, end);
                f.claim(off, end, contested)
            })
            .ok_or(CacheError::Busy("writes through in flight"))?;
        let gap = Gap {
            off,
            at: 0,
            len,
            tag: THROUGH_TAG | slot as u32,
        };
        if let Err(e) = self.drop_range(off, len as u64) {
            self.through_release(&gap);
            return Err(e);
        }
        Ok(gap)
    }

    /// The backing device completed the write `gap` came from
    /// ([`Cache::through_start`]): with `Some(data)` (its bytes) it holds
    /// them, and writethrough caches them as clean keys through data head
    /// `cpu` unless the write was contested (best effort, as a read fill);
    /// with `None` it failed, which is counted. Either way the write is no
    /// longer in flight. All under the lock: the module copies the data without
    /// it ([`Cache::fill_start`]).
    pub fn through_done<S: Source + ?Sized>(&self, gap: &Gap, data: Option<&S>, cpu: usize) {
        match data {
            Some(data) => self.fill_now(gap, data, cpu),
            None => self.through_failed(gap),
        }
    }

    /// The write `gap` came from failed ([`Cache::through_start`]): counts the
    /// error; the write is no longer in flight.
    pub fn through_failed(&self, gap: &Gap) {
        self.through_release(gap);
        self.stats.inc(Counter::BackingErrors);
    }

    /// The write `gap` came from is no longer in flight.
    pub(crate) fn through_release(&self, gap: &Gap) {
        let released = self
            .in_flight
            .with(|f| f.release((gap.tag & !THROUGH_TAG) as usize));
        debug_assert!(released.is_some(), "write through {gap:?} is not in flight");
    }

    /// How many writes through to the backing device are in flight.
    pub fn in_flight_len(&self) -> usize {
        self.in_flight.with(|f| f.len())
    }
}
