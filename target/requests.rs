// SPDX-License-Identifier: GPL-2.0

//! Serving bios: in `map` when that needs neither the backing device nor waiting for room, on
//! the request worker otherwise. Waiting for room is the engine's
//! ([`crate::cache_core::request::with_room`]); this file only moves bytes between bios and the
//! engine.

use super::{
    bio::{BioOp, HeldBio},
    live::{Core, Count, ErrorText, LiveCache},
};
use crate::cache_core::{request, CacheError};
use core::sync::atomic::Ordering;
use kernel::prelude::*;

/// Where a request is served.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServeContext {
    /// In `map`, in the submitter's context, where waiting for a bio of our own would deadlock
    /// (device-mapper defers bios submitted from `map` until it returns).
    Map,
    /// On the request worker, which may wait for the backing device and for room.
    Worker,
}

impl LiveCache {
    /// The request worker: drains the queue of held bios.
    pub(crate) fn run_requests(&self) {
        loop {
            // The queue's spinlock is released at the end of this statement, before the bio is
            // handled (which sleeps): a `while let` on the guard would hold it for the body.
            let next = self.pending.lock().pop();
            let Some(mut bio) = next else {
                break;
            };
            let result = self.handle(&mut bio);
            bio.end(result);
        }
    }

    /// Serves a bio the worker took from the queue, waiting for room if the cache is full.
    fn handle(&self, bio: &mut HeldBio) -> Result {
        self.with_room(|core| self.serve(core, bio, ServeContext::Worker))
    }

    /// Runs `attempt` until it completes, waiting for room while the cache is full; fails
    /// with `EIO` only when writeback has made no progress for [`request::STALL_MS`].
    pub(crate) fn with_room(&self, attempt: impl FnMut(&mut Core) -> Option<Result>) -> Result {
        request::with_room(self, self, attempt).unwrap_or_else(|request::Stalled| {
            pr_err!(
                "pcache_rs: cache full and writeback made no progress for {} s (backing device failing?); failing the request\n",
                request::STALL_MS / 1000
            );
            Err(EIO)
        })
    }

    /// Serves `bio` in `map` if that needs neither the backing device nor waiting for room (a
    /// write or flush with room in the cache, a read the cache holds entirely): no context
    /// switch to the worker, as upstream and dm-writecache do. `None` hands it to the worker.
    pub(crate) fn serve_inline(&self, bio: &mut HeldBio) -> Option<Result> {
        let mut core = self.core.lock();
        self.serve(&mut core, bio, ServeContext::Map)
    }

    /// One attempt at `bio` under the engine lock. `None`: it cannot complete here and now:
    /// the cache is full, or (in `map`) it needs the backing device. A write that stops on a
    /// full cache may have cached a leading part; serving it again rewrites the same bytes.
    fn serve(&self, core: &mut Core, bio: &mut HeldBio, at: ServeContext) -> Option<Result> {
        let off = (bio.sector().saturating_sub(self.begin)) << 9;
        let len = bio.size() as usize;
        let op = bio.op();
        if bio.is_preflush() || op == BioOp::Flush {
            let done = outcome(core.engine.flush())?;
            if done.is_err() || op == BioOp::Flush {
                return Some(done);
            }
        }
        let fua = bio.is_fua();
        let Core { engine, staging } = core;
        match op {
            BioOp::Flush => Some(Ok(())),
            BioOp::Write => {
                let Some(buf) = staging.get_mut(..len) else {
                    return Some(Err(EINVAL));
                };
                if let Err(e) = bio.copy_to(buf) {
                    return Some(Err(e));
                }
                // Every bio comes to `map` first: count it there, before any of it is written
                // (a write that waits for room is served again on the worker).
                if at == ServeContext::Map {
                    self.count(if engine.holds_any(off, len as u64) {
                        Count::WriteHit
                    } else {
                        Count::WriteMiss
                    });
                }
                outcome(engine.write(off, buf, fua, 0))
            }
            BioOp::Read => {
                let Some(buf) = staging.get_mut(..len) else {
                    return Some(Err(EINVAL));
                };
                let read = match at {
                    ServeContext::Map => engine.read_cached(off, buf),
                    ServeContext::Worker => engine.read(off, buf, true, 0).map(Some),
                };
                // Counted where the read completes: `map` serves only full hits.
                if let Ok(Some(r)) = &read {
                    self.count(if r.miss_bytes > 0 {
                        Count::ReadMiss
                    } else {
                        Count::ReadHit
                    });
                }
                match read {
                    Ok(Some(_)) => Some(bio.copy_from(buf)),
                    Ok(None) => None,
                    Err(e) => Some(Err(failed(&e))),
                }
            }
            BioOp::Discard | BioOp::WriteZeroes | BioOp::Other => Some(Err(EOPNOTSUPP)),
        }
    }

    /// Persists everything acknowledged, so a later instance (reload) or a power cut finds it.
    pub(crate) fn quiesce(&self) {
        self.quiesced.store(true, Ordering::Release);
        if let Err(e) = self.with_room(|core| outcome(core.engine.flush())) {
            pr_err!("pcache_rs: persisting the key log failed: {:?}\n", e);
        }
    }
}

/// An engine result as a bio's: `None` when the cache is full.
fn outcome(r: Result<(), CacheError>) -> Option<Result> {
    match r {
        Ok(()) => Some(Ok(())),
        Err(CacheError::Busy(_)) => None,
        Err(e) => Some(Err(failed(&e))),
    }
}

fn failed(e: &CacheError) -> Error {
    pr_err!("pcache_rs: request failed: {}\n", ErrorText(e));
    EIO
}
