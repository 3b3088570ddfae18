//! A request's data where it lives: the pages of a bio in the kernel, a slice in
//! the tests. The engine copies between it and pmem piece by piece, so a bio's
//! data crosses the CPU once (`memcpy_flushcache` into pmem on a write, the
//! machine-check-safe copy out of pmem on a read) instead of going through a
//! staging buffer first.

use super::env::IoError;

/// Data a write takes from (a write bio's pages).
pub trait Source {
    /// Bytes held.
    fn len(&self) -> usize;
    /// Whether it holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Calls `f` on bytes `at..at + len` in order, as the contiguous pieces they
    /// are stored in; stops at the first error. `Err` also when the range is
    /// not all held.
    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError>;
}

/// Data a read fills (a read bio's pages); what it holds can be read back (a
/// read miss caches what the backing device put there).
pub trait Sink: Source {
    /// As [`Source::pieces`], with the pieces writable.
    fn pieces_mut(
        &mut self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError>;
}

impl Source for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        f(self
            .get(at..at.checked_add(len).ok_or(IoError)?)
            .ok_or(IoError)?)
    }
}

impl Sink for [u8] {
    fn pieces_mut(
        &mut self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        f(self
            .get_mut(at..at.checked_add(len).ok_or(IoError)?)
            .ok_or(IoError)?)
    }
}

/// `len` zero bytes (`REQ_OP_WRITE_ZEROES`), handed out a page at a time.
pub struct Zeros(pub usize);

const ZERO_PAGE: [u8; 4096] = [0; 4096];

impl Source for Zeros {
    fn len(&self) -> usize {
        self.0
    }

    fn pieces(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        if at.checked_add(len).is_none_or(|end| end > self.0) {
            return Err(IoError);
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(ZERO_PAGE.len());
            f(ZERO_PAGE.get(..n).ok_or(IoError)?)?;
            left -= n;
        }
        Ok(())
    }
}
