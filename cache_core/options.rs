//! What the table line asks of the engine when it attaches a cache.
//!
//! The table and message grammar lives in one place, `target/table.rs` (the
//! kernel target parses with it, the host crate fuzzes it); the glue turns its
//! `TableOptions` into a [`CacheOptions`] for [`super::Cache::start`].

use crate::meta::cache_info::CACHE_MODE_WRITEBACK;

/// Options given at table load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// `PCACHE_CACHE_MODE_*`: writeback (upstream's only mode) or writeonly.
    /// A cache recorded in another mode switches only when it is clean (see
    /// [`super::Cache::start`]).
    pub cache_mode: u32,
    /// Whether data written from now on carries a CRC. It may differ from what
    /// the cache was created with: [`super::Cache::start`] switches to it.
    pub data_crc: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            cache_mode: CACHE_MODE_WRITEBACK,
            data_crc: false,
        }
    }
}
