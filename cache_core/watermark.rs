//! When background writeback runs: lazily, between watermarks of dirty data,
//! as dm-writecache does, rather than at once as upstream's
//! `cache_writeback_fn` does.
//!
//! Writeback skips the keys the index no longer maps (a later write replaced
//! them), so the longer a dirty key waits in the log, the likelier it is dead
//! by the time writeback reaches it and the less writeback copies to the
//! backing device: for writes spread evenly over a working set of `W` bytes,
//! a key written back after `D` more bytes were logged is still live with
//! probability about `exp(-D / W)`. Writing back at once keeps `D` small and
//! copies nearly every key; waiting until half the cache is dirty copies a
//! fraction of them, and the backing device and the CPU that run writeback
//! are left to the requests.
//!
//! Writeback runs when any of these holds, and otherwise waits:
//! - the dirty data reached [`HIGH_PERCENT`] of the cache; it then goes on
//!   until the dirty data is down to [`LOW_PERCENT`];
//! - no dirty data was logged for [`IDLE_MS`]: an idle cache drains, so what
//!   was written reaches the backing device soon after the writes stop (and a
//!   test or an operator waiting for the dirty tail to reach the key head
//!   waits about that long);
//! - nothing logged is dirty (the modes that write through, a cache of
//!   clean data): writeback only moves the dirty tail past the ksets, which
//!   copies nothing and lets GC collect them;
//! - room is short: a request waits for room, keys run short, or GC is over
//!   `gc_percent` and waits for the dirty tail (the caller tells, see
//!   [`super::background::Background::run`]).
//!
//! Nothing here is on media: the policy is the running cache's, and a cache
//! written by either module attaches to the other as before.

/// Dirty data, in percent of the cache device, at which writeback starts.
pub const HIGH_PERCENT: u64 = 50;

/// Dirty data, in percent of the cache device, at which writeback started by
/// [`HIGH_PERCENT`] stops.
pub const LOW_PERCENT: u64 = 40;

/// With no dirty data logged for this long, writeback drains the cache.
pub const IDLE_MS: u64 = 1000;

/// Why writeback runs now (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Room is short.
    Room,
    /// Dirty data went past the high watermark and is not yet down to the
    /// low one.
    Watermark,
    /// No dirty data was logged for [`IDLE_MS`].
    Idle,
    /// Nothing logged is dirty.
    Clean,
}

/// The state of the policy between rounds: whether writeback is between the
/// watermarks on its way down, and when dirty data was last logged.
#[derive(Debug, Default)]
pub struct Watermark {
    /// Dirty data reached the high watermark and is not yet down to the low.
    above: bool,
    /// The bytes of dirty keys logged so far as last seen (see
    /// [`Self::observe`]), and when that count last grew.
    seen: Option<(u64, u64)>,
}

impl Watermark {
    /// Notes at time `now_ms` that `logged` bytes of dirty keys were logged
    /// so far (a count that only grows while the cache runs: see
    /// [`super::KeyLog::dirty_logged`]).
    pub fn observe(&mut self, now_ms: u64, logged: u64) {
        self.seen = match self.seen {
            Some((seen, at)) if logged <= seen => Some((seen, at)),
            _ => Some((logged, now_ms)),
        };
    }

    /// Whether writeback runs now, with `dirty` bytes of dirty keys in a cache
    /// of `capacity` bytes, `room_short` when room is short, at `now_ms`
    /// (after [`Self::observe`]). `None`: writeback waits.
    pub fn wants(
        &mut self,
        now_ms: u64,
        dirty: u64,
        capacity: u64,
        room_short: bool,
    ) -> Option<Why> {
        if dirty >= percent(capacity, HIGH_PERCENT) {
            self.above = true;
        } else if dirty <= percent(capacity, LOW_PERCENT) {
            self.above = false;
        }
        if room_short {
            return Some(Why::Room);
        }
        if self.above {
            return Some(Why::Watermark);
        }
        if dirty == 0 {
            return Some(Why::Clean);
        }
        let idle = self
            .seen
            .is_some_and(|(_, at)| now_ms.saturating_sub(at) >= IDLE_MS);
        idle.then_some(Why::Idle)
    }
}

fn percent(bytes: u64, p: u64) -> u64 {
    bytes / 100 * p
}
