//! Cache modes: what a write does, and what the cache keeps across an attach.
//!
//! - writeback (upstream's only mode): a write completes once in pmem; writeback copies it to the
//!   backing device later.
//! - writeonly: as writeback, but reads the cache does not hold are not cached.
//! - writethrough: a write goes into the cache as a clean key and then to the backing device, and
//!   completes when both hold it; nothing is ever dirty.
//! - writearound: a write goes to the backing device and drops what the cache holds of its range;
//!   reads fill the cache.
//!
//! In the two modes that write through, the backing device holds every completed write, so the
//! cache holds nothing that is not also there, and a cache attached in (or recorded in) one of
//! them starts empty: its logged keys are not replayed into the index. A clean key whose write
//! was not covered by a flush may not match the backing device after a power cut (the backing
//! device's volatile cache lost the write, or the key's kset was never persisted while an older
//! key for the range was), and serving it would let the range read one way and then, once the key
//! is reclaimed, the other. Starting empty costs the warm cache on every attach; it is never
//! wrong. (Replay still counts the keys' segment references, which GC gives back.)
//!
//! The mode is recorded in the mode bits of `cache_info.flags` with upstream's values.

use super::env::{Backing, Pmem};
use super::{Cache, Memory};
use crate::meta::cache_info::{
    CACHE_MODE_WRITEAROUND, CACHE_MODE_WRITEBACK, CACHE_MODE_WRITEONLY, CACHE_MODE_WRITETHROUGH,
};

/// A cache mode, from the mode bits of `cache_info.flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Writeback,
    Writethrough,
    Writearound,
    Writeonly,
}

impl Mode {
    /// The mode of `PCACHE_CACHE_MODE_*` value `bits`, if it is one.
    pub fn from_bits(bits: u32) -> Option<Mode> {
        match bits {
            CACHE_MODE_WRITEBACK => Some(Mode::Writeback),
            CACHE_MODE_WRITETHROUGH => Some(Mode::Writethrough),
            CACHE_MODE_WRITEAROUND => Some(Mode::Writearound),
            CACHE_MODE_WRITEONLY => Some(Mode::Writeonly),
            _ => None,
        }
    }

    /// Writes go to the backing device before they complete.
    pub fn writes_through(self) -> bool {
        matches!(self, Mode::Writethrough | Mode::Writearound)
    }

    /// Reads the cache does not hold are cached.
    pub fn caches_misses(self) -> bool {
        self != Mode::Writeonly
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// The mode the cache runs in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Writes and flushes need the backing device (so they cannot be served where waiting for
    /// it would deadlock, device-mapper's `map`).
    pub fn writes_need_backing(&self) -> bool {
        self.mode().writes_through()
    }
}
