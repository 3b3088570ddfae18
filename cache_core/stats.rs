//! Statistics: the engine's counters, and the fields `dmsetup status` appends
//! after upstream's nine.
//!
//! The appended part is a count and then the values, in the order of
//! [`STATUS_STATS`], so a tool that reads upstream's fields by position keeps
//! working, and one that knows ours can tell how many follow. The module builds
//! the values with [`status_stats`]; `pcache-rs status` names them with the same
//! list.

use super::Status;

/// Counters for `dmsetup status` and tests. All of them change under the
/// engine's lock, and none on the hot path of a hit (the module counts hits,
/// misses and writes per CPU, outside the engine: [`RequestCounts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub writeback_errors: u32,
    /// Not a statistic: GC stops at its first error ([`super::Cache::gc_step`]).
    pub gc_errors: u32,
    pub crc_errors: u64,
    /// Reads of the backing device that failed (on a read miss).
    pub backing_errors: u64,
    pub ref_underflows: u64,
    pub ksets_written: u64,
    pub ksets_written_back: u64,
    /// Bytes of dirty keys written back to the backing device.
    pub bytes_written_back: u64,
    pub ksets_gced: u64,
    /// Reads that hit, and that missed, as the engine served them: each call
    /// of [`super::Cache::read_resume`] counts as a read. Hits a
    /// [`super::Reader`] serves without the engine lock are not counted here
    /// (the module counts every request itself: [`RequestCounts`]).
    pub read_hits: u64,
    pub read_misses: u64,
}

impl Stats {
    /// `stats reset`: zeroes the counters an operator reads. Leaves alone what
    /// steers the engine (`gc_errors`) and what counts bugs (`ref_underflows`).
    pub fn reset(&mut self) {
        *self = Stats {
            gc_errors: self.gc_errors,
            ref_underflows: self.ref_underflows,
            ..Stats::default()
        };
    }
}

/// Requests, counted by the host per bio: a read is a hit when the cache held
/// all of it, a write is a hit when the cache held any of its range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub read_hits: u64,
    pub read_misses: u64,
    pub write_hits: u64,
    pub write_misses: u64,
}

/// The names of the fields appended to the status line, in order.
pub const STATUS_STATS: [&str; 10] = [
    "read_hits",
    "read_misses",
    "write_hits",
    "write_misses",
    "dirty_bytes",
    "bytes_written_back",
    "gc_ksets",
    "crc_errors",
    "writeback_errors",
    "backing_errors",
];

/// The values of [`STATUS_STATS`].
pub fn status_stats(req: &RequestCounts, s: &Status) -> [u64; STATUS_STATS.len()] {
    [
        req.read_hits,
        req.read_misses,
        req.write_hits,
        req.write_misses,
        s.dirty_bytes,
        s.stats.bytes_written_back,
        s.stats.ksets_gced,
        s.stats.crc_errors,
        u64::from(s.stats.writeback_errors),
        s.stats.backing_errors,
    ]
}
