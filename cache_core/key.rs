//! The in-memory cache key: a logical range of the backing device mapped to a
//! position in a cache segment, with the generation it was written under.

use crate::meta::kset::{KEY_FLAGS_CLEAN, KEY_FLAGS_DATA_CRC, KEY_FLAGS_EMPTY};

/// A position in the cache: cache segment id and byte offset in its data area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub seg: u32,
    pub off: u32,
}

/// `struct pcache_cache_key` without the tree links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Key {
    /// Logical byte offset on the backing device.
    pub off: u64,
    pub len: u32,
    pub flags: u32,
    pub pos: Pos,
    pub gen: u64,
    /// CRC of the data extent as originally written (the key may since have been
    /// trimmed): it covers `crc_len` bytes starting `crc_back` bytes before `pos`.
    pub crc: u32,
    pub crc_back: u32,
    pub crc_len: u32,
}

impl Key {
    pub fn end(&self) -> u64 {
        self.off + u64::from(self.len)
    }
    pub fn clean(&self) -> bool {
        self.flags & KEY_FLAGS_CLEAN != 0
    }
    pub fn empty(&self) -> bool {
        self.flags & KEY_FLAGS_EMPTY != 0
    }
    /// `crc` is valid (written with data CRC on, or replayed under the cache-wide flag).
    pub fn has_crc(&self) -> bool {
        self.flags & KEY_FLAGS_DATA_CRC != 0
    }
    /// `cache_key_cutfront`: drop the first `n` bytes.
    pub fn cut_front(&mut self, n: u32) {
        self.off += u64::from(n);
        self.len -= n;
        self.pos.off += n;
        self.crc_back += n;
    }
    /// `cache_key_cutback`: keep the first `n` bytes.
    pub fn keep_front(&mut self, n: u32) {
        self.len = n;
    }
}
