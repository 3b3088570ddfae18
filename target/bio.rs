// SPDX-License-Identifier: GPL-2.0

//! The view of a `struct bio` that a target's `map` and `end_io` get.

use super::{bindings, device::TargetDevice};
use core::{marker::PhantomData, ptr::NonNull};

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

    fn raw_mut(&mut self) -> &mut bindings::bio {
        // SAFETY: as in `raw`, and `&mut self` makes this access exclusive.
        unsafe { self.ptr.as_mut() }
    }

    /// First sector addressed, relative to the start of the mapped device.
    pub(crate) fn sector(&self) -> u64 {
        self.raw().bi_iter.bi_sector
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

    /// The bio's own data must be durable when it completes.
    pub(crate) fn is_fua(&self) -> bool {
        self.raw().bi_opf & bindings::PCACHE_RS_REQ_FUA != 0
    }

    /// Points the bio at `dev`, starting at `sector` of that device.
    pub(crate) fn remap(&mut self, dev: &TargetDevice, sector: u64) {
        // SAFETY: the bio is valid and exclusively ours (type invariant); `dev` holds an open
        // block device for as long as the target that owns it lives, which outlives its bios.
        unsafe { bindings::pcache_rs_bio_set_dev(self.ptr.as_ptr(), dev.bdev()) };
        self.raw_mut().bi_iter.bi_sector = sector;
    }
}
