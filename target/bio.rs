// SPDX-License-Identifier: GPL-2.0

//! The view of a `struct bio` that a target's `map` and `end_io` get.

use super::{bindings, device::TargetDevice};
use crate::cache_core::{IoError, Progress, Sink, Source};
use core::{ffi::c_void, marker::PhantomData, ptr::NonNull};
use kernel::prelude::*;

/// What a bio asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BioOp {
    Read,
    Write,
    /// An empty flush (`REQ_OP_FLUSH`, or a `REQ_PREFLUSH` write with no data).
    Flush,
    Discard,
    WriteZeroes,
    /// Anything else (zone management, secure erase, ...): a target that does not know it
    /// must fail it rather than guess.
    Other,
}

/// A bio owned by device-mapper for the duration of a `map` or `end_io` call.
///
/// # Invariants
///
/// `ptr` points to a valid bio that device-mapper does not touch while `'a` lasts.
pub(crate) struct Bio<'a> {
    ptr: NonNull<bindings::bio>,
    _borrow: PhantomData<&'a mut bindings::bio>,
}

impl Bio<'_> {
    /// Wraps a bio passed to a device-mapper callback.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid bio that only the caller accesses for the life of the wrapper.
    pub(crate) unsafe fn from_raw(ptr: NonNull<bindings::bio>) -> Self {
        Self {
            ptr,
            _borrow: PhantomData,
        }
    }

    fn raw(&self) -> &bindings::bio {
        // SAFETY: the bio is valid and not touched by anyone else while we hold it (type
        // invariant).
        unsafe { self.ptr.as_ref() }
    }

    /// Bytes of data the bio carries (zero for an empty flush).
    pub(crate) fn size(&self) -> u32 {
        self.raw().bi_iter.bi_size
    }

    /// The operation, with an empty preflush write reported as [`BioOp::Flush`].
    pub(crate) fn op(&self) -> BioOp {
        // SAFETY: the bio is valid (type invariant); `bio_op` only reads `bi_opf`.
        let op = unsafe { bindings::pcache_rs_bio_op(self.ptr.as_ptr()) };
        match op {
            bindings::PCACHE_RS_REQ_OP_READ => BioOp::Read,
            bindings::PCACHE_RS_REQ_OP_WRITE if self.size() == 0 && self.is_preflush() => {
                BioOp::Flush
            }
            bindings::PCACHE_RS_REQ_OP_WRITE => BioOp::Write,
            bindings::PCACHE_RS_REQ_OP_FLUSH => BioOp::Flush,
            bindings::PCACHE_RS_REQ_OP_DISCARD => BioOp::Discard,
            bindings::PCACHE_RS_REQ_OP_WRITE_ZEROES => BioOp::WriteZeroes,
            _ => BioOp::Other,
        }
    }

    /// The bio asks that everything acknowledged before it be made durable first.
    pub(crate) fn is_preflush(&self) -> bool {
        self.raw().bi_opf & bindings::PCACHE_RS_REQ_PREFLUSH != 0
    }
}

/// Proof that `map` took its bio (see [`Bio::take`]); the only way to return
/// [`super::target_type::MapResult::Submitted`].
pub(crate) struct Taken(());

impl Bio<'_> {
    /// Takes the bio from device-mapper: the target now must end it, which [`HeldBio`] does
    /// exactly once (with `EIO` if dropped unended). Consumes the view, so nothing can touch
    /// the bio through it afterwards.
    pub(crate) fn take(self) -> (HeldBio, Taken) {
        // INVARIANT: `map` returns `Submitted` (it needs the `Taken` for that), so device-mapper
        // leaves the bio to us until we end it.
        let mut held = HeldBio { ptr: self.ptr };
        // A write the worker gets starts where `map` left it: at first, nothing done.
        held.set_resume(&Progress::default());
        (held, Taken(()))
    }
}

/// A bio the target took in `map` and ends later from its worker.
///
/// # Invariants
///
/// `ptr` is a live bio owned by the target: nobody else ends it, and it is ended exactly once,
/// by [`HeldBio::end`] or by drop.
pub(crate) struct HeldBio {
    ptr: NonNull<bindings::bio>,
}

// SAFETY: a bio may be completed from any context, and we own this one exclusively.
unsafe impl Send for HeldBio {}

impl HeldBio {
    fn raw(&self) -> &bindings::bio {
        // SAFETY: the bio is live and ours (type invariant).
        unsafe { self.ptr.as_ref() }
    }

    fn view(&mut self) -> Bio<'_> {
        // SAFETY: the bio is live and exclusively ours for the borrow of `self`.
        unsafe { Bio::from_raw(self.ptr) }
    }

    /// First sector, relative to the mapped device.
    pub(crate) fn sector(&self) -> u64 {
        self.raw().bi_iter.bi_sector
    }

    /// Bytes of data.
    pub(crate) fn size(&self) -> u32 {
        self.raw().bi_iter.bi_size
    }

    /// The operation (see [`Bio::op`]).
    pub(crate) fn op(&mut self) -> BioOp {
        self.view().op()
    }

    /// Whether the bio asks for a preflush.
    pub(crate) fn is_preflush(&mut self) -> bool {
        self.view().is_preflush()
    }

    /// Whether the bio asks for FUA (see [`Bio::is_fua`]).
    pub(crate) fn is_fua(&self) -> bool {
        self.raw().bi_opf & bindings::PCACHE_RS_REQ_FUA != 0
    }

    /// Whether its submitter must not wait in `map` (`REQ_NOWAIT`: io_uring's first attempt,
    /// `RWF_NOWAIT`); what would wait ends with `EAGAIN`, and the submitter tries again from a
    /// context that may.
    pub(crate) fn is_nowait(&self) -> bool {
        self.raw().bi_opf & bindings::PCACHE_RS_REQ_NOWAIT != 0
    }

    /// Keeps how far a write got in `map` in the bio's per-bio data, for the worker it is
    /// handed to ([`HeldBio::resume`]).
    pub(crate) fn set_resume(&mut self, p: &Progress) {
        // SAFETY: the bio is live and ours (type invariant), and was taken in `map`
        // (`Bio::take`), so device-mapper gave it the per-bio data the target asks for
        // (`miss::per_bio_data`); only this bio's holder touches its resume fields.
        unsafe {
            bindings::pcache_rs_io_set_resume(
                self.ptr.as_ptr(),
                p.done as u64,
                p.persist.unwrap_or(u64::MAX),
                p.hit,
            )
        };
    }

    /// What [`HeldBio::set_resume`] kept.
    pub(crate) fn resume(&mut self) -> Progress {
        let (mut done, mut persist, mut hit) = (0u64, u64::MAX, false);
        // SAFETY: as in `set_resume`; the fields were set as `map` took the bio (`Bio::take`).
        unsafe {
            bindings::pcache_rs_io_get_resume(self.ptr.as_ptr(), &mut done, &mut persist, &mut hit)
        };
        Progress {
            done: done as usize,
            persist: (persist != u64::MAX).then_some(persist),
            hit,
        }
    }

    /// Gives the bio up as a raw pointer, neither ended nor touched: the caller ends it later
    /// through [`HeldBio::from_raw`].
    pub(crate) fn into_raw(self) -> NonNull<bindings::bio> {
        let ptr = self.ptr;
        core::mem::forget(self);
        ptr
    }

    /// Takes back a bio given up by [`HeldBio::into_raw`].
    ///
    /// # Safety
    ///
    /// `ptr` must come from [`HeldBio::into_raw`], and nothing else may use it afterwards.
    pub(crate) unsafe fn from_raw(ptr: NonNull<bindings::bio>) -> Self {
        // INVARIANT: ownership comes back from `into_raw` (caller).
        Self { ptr }
    }

    /// Calls `f` on each mapped page piece of bytes `at..at + len` of `bio` (address, length).
    ///
    /// # Safety
    ///
    /// `bio` must be live for the call, with its `bi_iter` unchanged meanwhile.
    unsafe fn for_each_piece(
        bio: NonNull<bindings::bio>,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(*mut u8, usize) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        let (Ok(skip), Ok(len)) = (u32::try_from(at), u32::try_from(len)) else {
            return Err(IoError);
        };
        visit_pieces(
            |visit, ctx| {
                // SAFETY: the bio is live (caller); `visit` is called with `ctx` only, during
                // this call.
                unsafe {
                    bindings::pcache_rs_bio_for_each_piece(bio.as_ptr(), skip, len, visit, ctx)
                }
            },
            f,
        )
    }

    /// [`Source::pieces`] of a bio nobody writes meanwhile.
    ///
    /// # Safety
    ///
    /// `bio` must be live for the call, and neither its `bi_iter` nor the bytes `at..at + len`
    /// of its data may change meanwhile.
    unsafe fn pieces_of(
        bio: NonNull<bindings::bio>,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        // SAFETY: the bio is live (caller).
        unsafe {
            Self::for_each_piece(bio, at, len, &mut |p, n| {
                // SAFETY: `p..p + n` is one piece of a page of the bio, mapped for the
                // duration of the callback, and unchanged meanwhile (caller).
                f(core::slice::from_raw_parts(p, n))
            })
        }
    }

    /// Sends the bio on to `dev` at `sector` of it (`submit_bio_noacct`); it completes through
    /// device-mapper as if `map` had remapped it.
    pub(crate) fn submit_to(self, dev: &TargetDevice, sector: u64) {
        let mut ptr = self.ptr;
        core::mem::forget(self);
        // SAFETY: the bio is ours (type invariant); `self` is forgotten, so it is neither ended
        // nor touched again here: ownership passes to the block layer, which ends it.
        unsafe {
            bindings::pcache_rs_bio_set_dev(ptr.as_ptr(), dev.bdev());
            ptr.as_mut().bi_iter.bi_sector = sector;
            bindings::pcache_rs_bio_submit(ptr.as_ptr());
        }
    }

    /// Completes the bio with `result`.
    pub(crate) fn end(self, result: Result) {
        let err = match result {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        };
        let ptr = self.ptr;
        core::mem::forget(self);
        // SAFETY: the bio is ours and ended exactly once: `self` is forgotten, so drop does not
        // end it again.
        unsafe { bindings::pcache_rs_bio_endio(ptr.as_ptr(), err) };
    }
}

/// A write bio's data, for the engine to copy into pmem without staging.
impl Source for HeldBio {
    fn len(&self) -> usize {
        self.size() as usize
    }

    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        // SAFETY: the bio is live and ours (type invariant); its pages are only read. Their
        // owner may change them meanwhile (an `O_DIRECT` buffer): what a copy reads is then
        // whatever they held, and a CRC is taken of the bytes stored (`Pmem::write_crc`).
        unsafe { Self::pieces_of(self.ptr, at, len, f) }
    }
}

/// A read bio's pages, for the engine to fill from pmem without staging.
impl Sink for HeldBio {
    fn pieces_mut(
        &mut self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        // SAFETY: the bio is live and ours (type invariant).
        unsafe {
            Self::for_each_piece(self.ptr, at, len, &mut |p, n| {
                // SAFETY: `p..p + n` is one piece of a page of the bio, mapped for the duration
                // of the callback; a read bio's pages are the target's to fill until it ends
                // the bio, and `&mut self` makes this the only access of ours. Their owner may
                // write them meanwhile (an `O_DIRECT` buffer), so nothing is read back from them
                // to be trusted: a CRC is of the bytes copied (`Pmem::read_crc`).
                f(core::slice::from_raw_parts_mut(p, n))
            })
        }
    }
}

/// The visitor behind `ctx` of [`visit_piece`].
struct Visit<'a> {
    f: &'a mut dyn FnMut(*mut u8, usize) -> Result<(), IoError>,
}

/// Calls `f` on each page piece (address, length) a C walker of pieces maps: `walk(visit,
/// ctx)` is to call one of the helpers that take a `pcache_rs_piece_fn`
/// (`pcache_rs_bio_for_each_piece` and its kind) with `visit` and `ctx`, and return what it
/// returns.
pub(crate) fn visit_pieces(
    walk: impl FnOnce(bindings::pcache_rs_piece_fn, *mut c_void) -> i32,
    f: &mut dyn FnMut(*mut u8, usize) -> Result<(), IoError>,
) -> Result<(), IoError> {
    let mut visit = Visit { f };
    // `visit` outlives the walk, and `visit_piece` is the callback that expects it as `ctx`.
    if walk(Some(visit_piece), (&raw mut visit).cast()) == 0 {
        Ok(())
    } else {
        Err(IoError)
    }
}

/// `pcache_rs_piece_fn`: hands one piece to the visitor.
///
/// # Safety
///
/// `ctx` points to a live [`Visit`] that nothing else uses during the call.
unsafe extern "C" fn visit_piece(ctx: *mut c_void, piece: *mut c_void, len: usize) -> i32 {
    // SAFETY: the caller ([`visit_pieces`]'s walker) passes the walk's own `Visit`.
    let visit = unsafe { &mut *ctx.cast::<Visit<'_>>() };
    match (visit.f)(piece.cast(), len) {
        Ok(()) => 0,
        Err(IoError) => EIO.to_errno(),
    }
}

impl Drop for HeldBio {
    fn drop(&mut self) {
        // A held bio must never be lost: one that nobody ended fails.
        // SAFETY: the bio is ours and has not been ended (`end` forgets `self`).
        unsafe { bindings::pcache_rs_bio_endio(self.ptr.as_ptr(), EIO.to_errno()) };
    }
}

/// A FIFO of held bios, linked through the bios themselves (`bio_list`), so queueing in `map`
/// never allocates. Protect it with a spinlock.
///
/// # Invariants
///
/// Every bio on the list is a [`HeldBio`] whose ownership moved into the list.
pub(crate) struct BioQueue {
    list: bindings::bio_list,
}

// SAFETY: the list owns its bios (type invariant), which may be completed from any context.
unsafe impl Send for BioQueue {}

impl BioQueue {
    /// An empty queue.
    pub(crate) fn new() -> Self {
        Self {
            list: bindings::bio_list {
                head: core::ptr::null_mut(),
                tail: core::ptr::null_mut(),
            },
        }
    }

    /// Appends `bio`.
    pub(crate) fn push(&mut self, bio: HeldBio) {
        let ptr = bio.ptr;
        core::mem::forget(bio);
        // SAFETY: the list is valid; ownership of the bio moves into it (type invariant).
        unsafe { bindings::pcache_rs_bio_list_add(&mut self.list, ptr.as_ptr()) };
    }

    /// Removes the oldest bio.
    pub(crate) fn pop(&mut self) -> Option<HeldBio> {
        // SAFETY: the list is valid.
        let ptr = NonNull::new(unsafe { bindings::pcache_rs_bio_list_pop(&mut self.list) })?;
        // INVARIANT: the bio was a `HeldBio` whose ownership moved into the list.
        Some(HeldBio { ptr })
    }
}

impl Drop for BioQueue {
    fn drop(&mut self) {
        // Fail whatever is left rather than lose it.
        while self.pop().is_some() {}
    }
}
