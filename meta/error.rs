//! The error every parser in `meta/` returns: which structure, which field, what was wrong.
//!
//! A replay failure must say what was bad (STYLE.md); the kernel glue prints
//! [`MetaError`] with `{}` into its `ti->error`/log line.

use core::fmt;

/// What was wrong with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaErrorKind {
    /// The buffer ended before the structure did.
    Truncated,
    /// A magic number did not match.
    BadMagic,
    /// A checksum did not match.
    BadCrc,
    /// A value is outside the range the geometry allows.
    OutOfRange,
    /// Neither of the two metadata slots holds a valid copy.
    NoValidSlot,
    /// A value this implementation does not support (e.g. a big-endian image).
    Unsupported,
    /// A chain of structures loops or does not terminate.
    Cycle,
}

/// A parse or validation error naming the on-media structure and field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaError {
    /// The on-media structure, e.g. `"pcache_sb"`.
    pub structure: &'static str,
    /// The field in it, e.g. `"seg_num"`.
    pub field: &'static str,
    /// What was wrong.
    pub kind: MetaErrorKind,
}

impl MetaError {
    /// Build an error for `structure.field`.
    pub const fn new(structure: &'static str, field: &'static str, kind: MetaErrorKind) -> Self {
        MetaError {
            structure,
            field,
            kind,
        }
    }
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            MetaErrorKind::Truncated => "truncated",
            MetaErrorKind::BadMagic => "bad magic",
            MetaErrorKind::BadCrc => "bad crc",
            MetaErrorKind::OutOfRange => "out of range",
            MetaErrorKind::NoValidSlot => "no valid slot",
            MetaErrorKind::Unsupported => "unsupported",
            MetaErrorKind::Cycle => "chain does not terminate",
        };
        write!(f, "{}.{}: {}", self.structure, self.field, what)
    }
}

/// Little-endian field access over a byte slice that can never read out of bounds.
pub(crate) struct Le<'b> {
    buf: &'b [u8],
    structure: &'static str,
}

impl<'b> Le<'b> {
    pub(crate) fn new(buf: &'b [u8], structure: &'static str) -> Self {
        Le { buf, structure }
    }

    fn bytes<const N: usize>(&self, off: usize, field: &'static str) -> Result<[u8; N], MetaError> {
        let end = off.checked_add(N);
        match end.and_then(|e| self.buf.get(off..e)) {
            Some(s) => {
                let mut out = [0u8; N];
                out.copy_from_slice(s);
                Ok(out)
            }
            None => Err(MetaError::new(
                self.structure,
                field,
                MetaErrorKind::Truncated,
            )),
        }
    }

    pub(crate) fn u8(&self, off: usize, field: &'static str) -> Result<u8, MetaError> {
        Ok(self.bytes::<1>(off, field)?[0])
    }

    pub(crate) fn u16(&self, off: usize, field: &'static str) -> Result<u16, MetaError> {
        Ok(u16::from_le_bytes(self.bytes(off, field)?))
    }

    pub(crate) fn u32(&self, off: usize, field: &'static str) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(self.bytes(off, field)?))
    }

    pub(crate) fn u64(&self, off: usize, field: &'static str) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(self.bytes(off, field)?))
    }
}

/// Store helpers for encoders that write into fixed-size arrays (sizes are
/// compile-time asserted, so these cannot go out of bounds for the callers).
pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(s) = buf.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    if let Some(s) = buf.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    if let Some(s) = buf.get_mut(off..off + 2) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn put_u8(buf: &mut [u8], off: usize, v: u8) {
    if let Some(b) = buf.get_mut(off) {
        *b = v;
    }
}
