//! Errors the engine returns to the glue.

use crate::meta::MetaError;
use core::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheError {
    /// The media holds something invalid (names structure and field).
    Meta(MetaError),
    /// A device IO failed, or cached data failed its CRC check.
    Io(&'static str),
    /// No space right now (no free segment, key pool or kset room): retry after
    /// writeback and GC made progress (upstream's -EBUSY / deferred request).
    Busy(&'static str),
    /// A request or option outside what the device or format allows.
    Invalid(&'static str),
    /// The memory handed to the engine at construction is too small.
    NoMem(&'static str),
}

impl From<MetaError> for CacheError {
    fn from(e: MetaError) -> Self {
        CacheError::Meta(e)
    }
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Meta(e) => write!(f, "corrupted metadata: {}", e),
            CacheError::Io(s) => write!(f, "io error: {}", s),
            CacheError::Busy(s) => write!(f, "busy: {}", s),
            CacheError::Invalid(s) => write!(f, "invalid: {}", s),
            CacheError::NoMem(s) => write!(f, "not enough memory reserved: {}", s),
        }
    }
}
