// SPDX-License-Identifier: GPL-2.0

//! The result buffer of `status` and `message`: what `DMEMIT` writes to in C.

use core::fmt;
use kernel::prelude::*;

/// What `status` is asked for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusType {
    /// `dmsetup status`: run-time state.
    Info,
    /// `dmsetup table`: the table line, which must load back unchanged.
    Table,
    /// The IMA measurement string.
    Ima,
}

/// A bounded, always NUL-terminated writer over a device-mapper result buffer.
///
/// Output that does not fit is cut, as `DMEMIT` does; device-mapper notices the full buffer and
/// asks again with a larger one.
///
/// # Invariants
///
/// `buf` is valid for writes of `maxlen` bytes for `'a`, and `len < maxlen` whenever `maxlen > 0`.
pub(crate) struct StatusWriter<'a> {
    buf: *mut c_char,
    maxlen: usize,
    len: usize,
    _borrow: core::marker::PhantomData<&'a mut [u8]>,
}

impl StatusWriter<'_> {
    /// Wraps a device-mapper result buffer and makes it an empty string.
    ///
    /// # Safety
    ///
    /// `buf` must be valid for writes of `maxlen` bytes for the life of the writer.
    pub(crate) unsafe fn from_raw(buf: *mut c_char, maxlen: c_uint) -> Self {
        let maxlen = if buf.is_null() { 0 } else { maxlen as usize };
        if maxlen > 0 {
            // SAFETY: `buf` is valid for `maxlen > 0` bytes (caller's guarantee).
            unsafe { buf.write(0) };
        }
        Self {
            buf,
            maxlen,
            len: 0,
            _borrow: core::marker::PhantomData,
        }
    }
}

impl fmt::Write for StatusWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.maxlen == 0 {
            return Ok(());
        }
        let room = self.maxlen - 1 - self.len;
        let n = s.len().min(room);
        // SAFETY: `len + n <= maxlen - 1`, so the copy and the terminating NUL stay inside the
        // buffer of `maxlen` bytes (type invariant); `s` cannot overlap a buffer we own.
        unsafe {
            core::ptr::copy_nonoverlapping(s.as_ptr(), self.buf.add(self.len).cast::<u8>(), n);
            self.len += n;
            self.buf.add(self.len).write(0);
        }
        Ok(())
    }
}
