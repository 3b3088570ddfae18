// SPDX-License-Identifier: GPL-2.0

//! Serving bios: in `map` when that needs neither the backing device nor waiting for room, on
//! the request worker otherwise. Waiting for room is the engine's
//! ([`crate::cache_core::request::with_room`]); this file only moves bytes between bios and the
//! engine.

use super::{
    bio::{BioOp, HeldBio},
    engine::PcacheEngine,
    live::{Core, Count, ErrorText, LiveCache},
};
use crate::cache_core::{request, CacheError};
use core::sync::atomic::Ordering;
use kernel::prelude::*;

/// What serving a bio came to.
pub(crate) enum Served {
    /// End it with this result.
    Done(Result),
    /// A discard whose cached keys are dropped: send it on to the backing device
    /// ([`LiveCache::pass_down`]).
    ToBacking,
}

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
            match self.handle(&mut bio) {
                Served::Done(result) => bio.end(result),
                Served::ToBacking => self.pass_down(bio),
            }
        }
    }

    /// Serves a bio the worker took from the queue, waiting for room if the cache is full.
    fn handle(&self, bio: &mut HeldBio) -> Served {
        let mut to_backing = false;
        let result = self.with_room(|core| match self.serve(core, bio, ServeContext::Worker)? {
            Served::Done(r) => Some(r),
            Served::ToBacking => {
                to_backing = true;
                Some(Ok(()))
            }
        });
        match result {
            Ok(()) if to_backing => Served::ToBacking,
            r => Served::Done(r),
        }
    }

    /// Sends a discard on to the backing device, at the same offset (the backing device
    /// starts where the target does).
    pub(crate) fn pass_down(&self, bio: HeldBio) {
        let sector = bio.sector().saturating_sub(self.begin);
        bio.submit_to(&self.backing, sector);
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
    pub(crate) fn serve_inline(&self, bio: &mut HeldBio) -> Option<Served> {
        let mut core = self.core.lock();
        self.serve(&mut core, bio, ServeContext::Map)
    }

    /// One attempt at `bio` under the engine lock. `None`: it cannot complete here and now:
    /// the cache is full, or (in `map`) it needs the backing device. A write that stops on a
    /// full cache may have cached a leading part; serving it again rewrites the same bytes.
    fn serve(&self, core: &mut Core, bio: &mut HeldBio, at: ServeContext) -> Option<Served> {
        let off = (bio.sector().saturating_sub(self.begin)) << 9;
        let len = bio.size() as usize;
        let op = bio.op();
        let writes = matches!(op, BioOp::Write | BioOp::WriteZeroes);
        if at == ServeContext::Map {
            // Every bio comes to `map` first: count a write there, before any of it is written
            // (a write that waits for room or for the backing device is served on the worker).
            if writes {
                self.count_write(&core.engine, off, len);
            }
            // In the modes that write through, writes and flushes wait for the backing device.
            if core.engine.writes_need_backing()
                && (writes || bio.is_preflush() || op == BioOp::Flush)
            {
                return None;
            }
        }
        if bio.is_preflush() || op == BioOp::Flush {
            let done = outcome(core.engine.flush())?;
            if done.is_err() || op == BioOp::Flush {
                return Some(Served::Done(done));
            }
        }
        match op {
            BioOp::Discard => {
                let done = outcome(core.engine.discard(off, len as u64))?;
                return Some(match done {
                    Ok(()) if self.discard_passdown => Served::ToBacking,
                    r => Served::Done(r),
                });
            }
            BioOp::WriteZeroes => {
                return self
                    .write_zeroes(core, off, len, bio.is_fua())
                    .map(Served::Done);
            }
            _ => {}
        }
        self.serve_data(core, bio, at, off, len).map(Served::Done)
    }

    /// Counts a write bio as a hit or a miss.
    fn count_write(&self, engine: &PcacheEngine, off: u64, len: usize) {
        self.count(if engine.holds_any(off, len as u64) {
            Count::WriteHit
        } else {
            Count::WriteMiss
        });
    }

    /// `REQ_OP_WRITE_ZEROES`, served as writes of zeros through the cache: the zeros are data
    /// like any other, so they read back after a remove and a crash, and the cache stays in
    /// upstream's format. (Passing the bio down instead would let an older dirty key, written
    /// back later, overwrite the zeros.)
    fn write_zeroes(&self, core: &mut Core, off: u64, len: usize, fua: bool) -> Option<Result> {
        let Core { engine, staging } = core;
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(staging.len());
            let Some(zeros) = staging.get_mut(..n) else {
                return Some(Err(EINVAL));
            };
            zeros.fill(0);
            match outcome(engine.write(off + done as u64, zeros, fua, 0))? {
                Ok(()) => done += n,
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    /// Reads, writes and flushes with data.
    fn serve_data(
        &self,
        core: &mut Core,
        bio: &mut HeldBio,
        at: ServeContext,
        off: u64,
        len: usize,
    ) -> Option<Result> {
        let fua = bio.is_fua();
        let Core { engine, staging } = core;
        match bio.op() {
            BioOp::Flush => Some(Ok(())),
            BioOp::Write => {
                let Some(buf) = staging.get_mut(..len) else {
                    return Some(Err(EINVAL));
                };
                if let Err(e) = bio.copy_to(buf) {
                    return Some(Err(e));
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
