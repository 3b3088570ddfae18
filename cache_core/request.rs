//! Serving a request that may have to wait for room.
//!
//! A write (or a flush, or a read miss that caches its data) can find the cache
//! full: no free segment, no free key, or no segment for the key log. It then
//! does not fail and does not spin: it asks for the background work
//! ([`super::background`]) and sleeps until that work makes progress and wakes
//! it, then tries again. Only when nothing has moved for [`STALL_MS`] (the
//! backing device keeps failing, so nothing can be written back) does it give
//! up, and the caller fails the request with a log line that says so.

use super::env::{Locked, Waiting};

/// How long a request waits for room with no progress at all before it fails.
pub const STALL_MS: u32 = 30_000;

/// How long one sleep lasts before the request looks again (a wake ends it
/// earlier).
const WAIT_SLICE_MS: u32 = 1_000;

/// Writeback and GC made no progress for [`STALL_MS`] while the request waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled;

/// Runs `attempt` on the locked `T` until it completes (`Some`). While it
/// cannot (`None`: the cache is full), kicks the background work and sleeps
/// until it makes progress. A write that stops on a full cache may have cached
/// a leading part: its attempt keeps a [`super::Progress`] and goes on after
/// it ([`super::Cache::write_resume`]).
pub fn with_room<T, L, W, R>(
    engine: &L,
    waiting: &W,
    mut attempt: impl FnMut(&mut T) -> Option<R>,
) -> Result<R, Stalled>
where
    L: Locked<T>,
    W: Waiting,
{
    until_room(waiting, || engine.with(&mut attempt))
}

/// [`with_room`] for an attempt that takes the locks it needs itself, as often as
/// it needs: a write that copies into reserved room without the lock and
/// commits under it, chunk by chunk, and goes on where it stopped.
pub fn until_room<W, R>(waiting: &W, mut attempt: impl FnMut() -> Option<R>) -> Result<R, Stalled>
where
    W: Waiting,
{
    let mut idle_ms = 0u32;
    loop {
        let ticket = waiting.ticket();
        if let Some(r) = attempt() {
            return Ok(r);
        }
        waiting.kick();
        if waiting.wait(ticket, WAIT_SLICE_MS) {
            idle_ms = 0;
        } else {
            idle_ms += WAIT_SLICE_MS;
            if idle_ms >= STALL_MS {
                return Err(Stalled);
            }
        }
    }
}
