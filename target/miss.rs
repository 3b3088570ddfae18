// SPDX-License-Identifier: GPL-2.0

//! Read misses and writes through in flight: each gap of a read bio that the cache does not
//! hold goes to the backing device as a clone of the bio, trimmed to the gap, and so does a
//! write in the modes that write through (one gap, the whole bio, with its flush and FUA
//! flags); nothing waits for them. The clone's completion puts it on a lock-free list and
//! queues the [`MissQueue`]'s work item, which hands the list back to Rust in process context
//! ([`MissQueue::bind`]): there the cache is filled from the bio's pages, and the bio ends
//! after its last gap.
//!
//! The bio stays the target's while its gaps are out: its per-bio data counts them (one more
//! for the submitter, so that a gap completing during submission cannot end the bio).

use super::{bindings, bio::HeldBio, device::TargetDevice, work::WorkQueue};
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
    /// without the bio's flush flags; a write's one gap goes with them.
    pub(crate) fn submit(&self, bio: HeldBio, backing: &TargetDevice, gaps: &[Gap]) {
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
                )
            };
        }
        // SAFETY: `raw` is still ours: this function's part is not yet put.
        unsafe { part_done(raw, 0) };
    }

    /// Takes the completed gaps, each with its bio, and passes them to `fill`: `Ok` with the
    /// gap to fill, or the error the backing device returned. Ends each bio after its last
    /// gap, with the first error of its gaps. Returns whether any came.
    pub(crate) fn complete(&self, mut fill: impl FnMut(&Gap, Result<&SplitBio, Error>)) -> bool {
        // SAFETY: the queue is live.
        let mut next = unsafe { bindings::pcache_rs_missq_take(self.q.as_ptr()) };
        let any = !next.is_null();
        while let Some(m) = NonNull::new(next) {
            let (mut off, mut at, mut len, mut tag) = (0u64, 0u32, 0u32, 0u32);
            // SAFETY: `m` is a completed miss taken off the list: ours until `miss_put`.
            let (orig, err) = unsafe {
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
                )
            };
            let gap = Gap {
                off,
                at: at as usize,
                len: len as usize,
                tag,
            };
            // SAFETY: `m` is not used after this; the clone goes back to the bio_set.
            unsafe { bindings::pcache_rs_miss_put(m.as_ptr()) };
            let Some(orig) = orig else {
                continue;
            };
            let data = SplitBio(orig);
            if err == 0 {
                fill(&gap, Ok(&data));
            } else {
                fill(&gap, Err(Error::from_errno(err)));
            }
            // SAFETY: the bio is ours until its last part is done; this gap's part is.
            unsafe { part_done(orig, err) };
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

/// A bio with gaps in flight, as the data of a completed gap: what a read brought back, or
/// what a write through wrote.
///
/// # Invariants
///
/// The bio is live while this exists: the backing device has completed the gap (its clone is
/// done) and the bio ends only after its last gap. Its pages are the bio owner's, though: the
/// other gaps of a read write other bytes, and the page cache keeps a write's pages stable (the
/// target asks for stable writes), but a process may rewrite its own `O_DIRECT` buffer at any
/// time. The fill then caches whatever the pages hold when it copies them (a known limit, shared
/// with upstream, which fills from the request's pages too).
pub(crate) struct SplitBio(NonNull<bindings::bio>);

impl Source for SplitBio {
    fn len(&self) -> usize {
        // SAFETY: the bio is live (type invariant).
        unsafe { self.0.as_ref().bi_iter.bi_size as usize }
    }

    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        // SAFETY: the bio is live; only its pages are read (type invariant).
        unsafe { HeldBio::pieces_of(self.0, at, len, f) }
    }
}
