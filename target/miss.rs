// SPDX-License-Identifier: GPL-2.0

//! Read misses and writes through in flight: each gap of a read bio that the cache does not
//! hold goes to the backing device, and so does a write in the modes that write through (one
//! gap, the whole bio, with its flush and FUA flags); nothing waits for them. A gap whose data
//! the cache is to hold goes as a bio over pages of the target's own, a write's data copied in
//! first: the bio's pages are their owner's, who may rewrite an `O_DIRECT` buffer at any time,
//! and the cache must hold what the backing device returned or took, not what the buffer holds
//! by the time the fill copies it. When such pages cannot be had without waiting (`map` must
//! not wait for memory that only bios not yet submitted may give back), the gap goes as a clone
//! of the bio trimmed to it, and the cache holds nothing of it. A completion puts the bio on a
//! lock-free list and queues the [`MissQueue`]'s work item, which hands the list back to Rust
//! in process context ([`MissQueue::bind`]): there a read's data is copied to its bio, the
//! cache is filled from the pages of its own, and the bio ends after its last gap.
//!
//! The bio stays the target's while its gaps are out: its per-bio data counts them (one more
//! for the submitter, so that a gap completing during submission cannot end the bio).

use super::{
    bindings,
    bio::{visit_pieces, HeldBio},
    device::TargetDevice,
    work::WorkQueue,
};
use crate::cache_core::{io::Gap, IoError, Source};
use core::{ffi::c_void, ptr::NonNull};
use kernel::{prelude::*, sync::Arc};

/// Bytes of per-bio data a target with a [`MissQueue`] asks device-mapper for.
pub(crate) fn per_bio_data() -> u32 {
    // SAFETY: returns a constant.
    unsafe { bindings::pcache_rs_io_size() }
}

/// Clones in flight to the backing device, their bio_set, and the list of completed ones.
///
/// # Invariants
///
/// `q` came from `pcache_rs_missq_create` and is destroyed only on drop, which waits for every
/// clone in flight and cancels the work item first.
pub(crate) struct MissQueue {
    q: NonNull<bindings::pcache_rs_missq>,
    /// The workqueue the completions are handed to; outlives every queueing.
    _wq: Arc<WorkQueue>,
}

// SAFETY: the C queue is used through the lock-free list, the bio_set's mempool and the
// workqueue API, all thread-safe.
unsafe impl Send for MissQueue {}
// SAFETY: as above.
unsafe impl Sync for MissQueue {}

/// What the work item calls with the context given to [`MissQueue::bind`].
pub(crate) type FillFn = unsafe extern "C" fn(ctx: *mut c_void);

impl MissQueue {
    /// A queue whose completions are handed over on `wq`.
    pub(crate) fn new(wq: &Arc<WorkQueue>) -> Result<Self> {
        // SAFETY: `wq.raw()` is a live workqueue, kept alive by the `Arc` held alongside.
        let q = unsafe { bindings::pcache_rs_missq_create(wq.raw()) };
        Ok(Self {
            q: NonNull::new(q).ok_or(ENOMEM)?,
            _wq: wq.clone(),
        })
    }

    /// Names what completions are handed to: `fill(ctx)`, in process context.
    ///
    /// # Safety
    ///
    /// `ctx` must stay valid for `fill` for as long as this queue exists, and be set before the
    /// first [`MissQueue::submit`].
    pub(crate) unsafe fn bind(&self, fill: FillFn, ctx: *const c_void) {
        // SAFETY: the queue is live (type invariant); nothing is in flight yet.
        unsafe { bindings::pcache_rs_missq_bind(self.q.as_ptr(), Some(fill), ctx.cast_mut()) };
    }

    /// Sends the gaps of `bio` to `backing` (whose offsets are the target's) and gives the bio
    /// up until they complete; ends it at once if there are none. A read's gaps go as reads
    /// without the bio's flush flags; a write's one gap goes with them. `fills`: the cache may
    /// hold what the gaps with a tag bring back, so they go through pages of their own.
    pub(crate) fn submit(&self, bio: HeldBio, backing: &TargetDevice, gaps: &[Gap], fills: bool) {
        let n = gaps.len() as u32;
        let raw = bio.into_raw();
        // SAFETY: `raw` came through `map`, so it has the per-bio data `per_bio_data` asks for.
        unsafe { bindings::pcache_rs_io_start(raw.as_ptr(), n + 1) };
        for g in gaps {
            // SAFETY: the queue is live; `raw` is ours until its count (this function's part
            // too) drops to zero; the gap is a sector-aligned part of the bio (the engine cut it
            // from the bio's range); `backing` is held by the target longer than any bio of it.
            unsafe {
                bindings::pcache_rs_miss_submit(
                    self.q.as_ptr(),
                    raw.as_ptr(),
                    backing.bdev(),
                    g.off,
                    g.at as u32,
                    g.len as u32,
                    g.tag,
                    fills,
                )
            };
        }
        // SAFETY: `raw` is still ours: this function's part is not yet put.
        unsafe { part_done(raw, 0) };
    }

    /// Takes the completed gaps, each with its bio, and passes them to `fill`: `Ok` with what
    /// the gap brought back, or the error the backing device returned. Copies a read's data
    /// to its bio first, and ends each bio after its last gap, with the first error of its
    /// gaps. Returns whether any came.
    pub(crate) fn complete(&self, mut fill: impl FnMut(&Gap, Result<GapData<'_>, Error>)) -> bool {
        // SAFETY: the queue is live.
        let mut next = unsafe { bindings::pcache_rs_missq_take(self.q.as_ptr()) };
        let any = !next.is_null();
        while let Some(m) = NonNull::new(next) {
            let (mut off, mut at, mut len, mut tag) = (0u64, 0u32, 0u32, 0u32);
            // SAFETY: `m` is a completed miss taken off the list: ours until `miss_put`.
            let (orig, err, own) = unsafe {
                next = bindings::pcache_rs_miss_next(m.as_ptr());
                let orig = bindings::pcache_rs_miss_info(
                    m.as_ptr(),
                    &mut off,
                    &mut at,
                    &mut len,
                    &mut tag,
                );
                (
                    NonNull::new(orig),
                    bindings::pcache_rs_miss_error(m.as_ptr()),
                    bindings::pcache_rs_miss_own(m.as_ptr()),
                )
            };
            let gap = Gap {
                off,
                at: at as usize,
                len: len as usize,
                tag,
            };
            if let Some(orig) = orig {
                let pages = MissPages {
                    m,
                    at: gap.at,
                    len: gap.len,
                };
                let done = match (err, own) {
                    (0, true) => {
                        // SAFETY: `m` is ours and completed without error; its bio is live
                        // (its part is still open).
                        unsafe { bindings::pcache_rs_miss_deliver(m.as_ptr()) };
                        Ok(GapData::Own(&pages))
                    }
                    (0, false) => Ok(GapData::Unknown),
                    (e, _) => Err(Error::from_errno(e)),
                };
                fill(&gap, done);
                // SAFETY: `m` is not used after this; its pages and the bio go back.
                unsafe { bindings::pcache_rs_miss_put(m.as_ptr()) };
                // SAFETY: the bio is ours until its last part is done; this gap's part is.
                unsafe { part_done(orig, err) };
            } else {
                // SAFETY: as above.
                unsafe { bindings::pcache_rs_miss_put(m.as_ptr()) };
            }
        }
        any
    }

    fn raw(&self) -> *mut bindings::pcache_rs_missq {
        self.q.as_ptr()
    }
}

impl Drop for MissQueue {
    fn drop(&mut self) {
        // Device-mapper ends every bio before a suspend completes, and a split bio ends only
        // after the fill of its last gap, so normally nothing is in flight here.
        // SAFETY: the queue is live (type invariant) and destroyed once; the C side waits for
        // the clones in flight and cancels the work item first.
        unsafe { bindings::pcache_rs_missq_destroy(self.raw()) };
    }
}

/// One part of `bio` is done with `err`; ends the bio after the last one.
///
/// # Safety
///
/// `bio` must be a bio given up by [`MissQueue::submit`] with this part still open.
unsafe fn part_done(bio: NonNull<bindings::bio>, err: i32) {
    let mut first = 0;
    // SAFETY: the bio is live: this part is still open (caller).
    if unsafe { bindings::pcache_rs_io_put(bio.as_ptr(), err, &mut first) } {
        // SAFETY: every part is done, so the bio is the target's alone again, and ended once.
        let held = unsafe { HeldBio::from_raw(bio) };
        held.end(if first == 0 {
            Ok(())
        } else {
            Err(Error::from_errno(first))
        });
    }
}

/// What a completed gap brought back.
pub(crate) enum GapData<'a> {
    /// The data the backing device returned or took, in pages of the target's own.
    Own(&'a MissPages),
    /// The gap went to or from the bio's own pages, which their owner may have rewritten
    /// since: what the backing device holds is unknown, so the cache holds nothing of it.
    Unknown,
}

/// The pages of a completed gap of its own, `len` bytes, addressed as its bio is (the gap's
/// first byte is at `at`, [`Gap::at`]).
///
/// # Invariants
///
/// `m` is a completed miss with pages of its own, not yet put: nothing writes its pages.
pub(crate) struct MissPages {
    m: NonNull<bindings::pcache_rs_miss>,
    at: usize,
    len: usize,
}

impl Source for MissPages {
    fn len(&self) -> usize {
        self.at + self.len
    }

    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        let skip = at.checked_sub(self.at).ok_or(IoError)?;
        let (Ok(skip), Ok(len)) = (u32::try_from(skip), u32::try_from(len)) else {
            return Err(IoError);
        };
        visit_pieces(
            |visit, ctx| {
                // SAFETY: the miss is live (type invariant); `visit` is called with `ctx` only,
                // during this call.
                unsafe {
                    bindings::pcache_rs_miss_for_each_piece(self.m.as_ptr(), skip, len, visit, ctx)
                }
            },
            // SAFETY: `p..p + n` is one piece of the miss's pages, mapped for the duration of
            // the callback, which nothing writes (type invariant).
            &mut |p, n| f(unsafe { core::slice::from_raw_parts(p, n) }),
        )
    }
}
