// SPDX-License-Identifier: GPL-2.0

//! The argument vector that device-mapper hands to `ctr` and `message`.

use super::table::MAX_ARGS;
use core::marker::PhantomData;
use kernel::prelude::*;

/// The arguments of one `ctr` or `message` call: `argc` NUL-terminated strings.
///
/// # Invariants
///
/// `argv` points to `argc` valid, NUL-terminated C strings that are not modified while `'a`
/// lasts (device-mapper keeps them alive for the duration of the callback).
pub(crate) struct Args<'a> {
    argv: *const *mut c_char,
    argc: usize,
    _borrow: PhantomData<&'a CStr>,
}

impl<'a> Args<'a> {
    /// Wraps the arguments of a device-mapper callback.
    ///
    /// # Safety
    ///
    /// If `argc` is non-zero, `argv` must point to `argc` valid NUL-terminated strings that stay
    /// valid and unmodified for `'a`.
    pub(crate) unsafe fn from_raw(argc: c_uint, argv: *mut *mut c_char) -> Self {
        let argc = if argv.is_null() { 0 } else { argc as usize };
        // INVARIANT: guaranteed by the caller; a NULL vector is treated as empty.
        Self {
            argv,
            argc,
            _borrow: PhantomData,
        }
    }

    /// The `i`-th argument, or `None` past the end.
    pub(crate) fn get(&self, i: usize) -> Option<&'a CStr> {
        if i >= self.argc {
            return None;
        }
        // SAFETY: `i < argc`, so `argv.add(i)` is within the vector (type invariant).
        let ptr = unsafe { *self.argv.add(i) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: each element is a valid NUL-terminated string that lives for `'a` (type
        // invariant).
        Some(unsafe { CStr::from_char_ptr(ptr) })
    }

    /// Copies the arguments as byte strings into `out`, for the pure parsers in [`super::table`].
    ///
    /// Returns `None` if there are more than [`MAX_ARGS`] arguments: no valid line has that many.
    pub(crate) fn to_bytes<'b>(&self, out: &'b mut [&'a [u8]; MAX_ARGS]) -> Option<&'b [&'a [u8]]> {
        if self.argc > MAX_ARGS {
            return None;
        }
        for (i, slot) in out.iter_mut().enumerate().take(self.argc) {
            *slot = self.get(i)?.to_bytes();
        }
        out.get(..self.argc)
    }
}
