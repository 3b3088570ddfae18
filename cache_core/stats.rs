//! Statistics: the engine's counters, and the fields `dmsetup status` appends
//! after upstream's nine.
//!
//! The appended part is a count and then the values, in the order of
//! [`STATUS_STATS`], so a tool that reads upstream's fields by position keeps
//! working, and one that knows ours can tell how many follow. The module builds
//! the values with [`status_stats`]; `pcache-rs status` names them with the same
//! list.

use super::Status;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters for `dmsetup status` and tests: a snapshot of [`Counters`]. None
/// changes on the hot path of a hit (the module counts hits, misses and writes
/// per CPU, outside the engine: [`RequestCounts`]).
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
    /// Bytes of live clean data GC copied forward rather than drop (see
    /// [`super::forward`]).
    pub gc_kept_bytes: u64,
    /// Reads that hit, and that missed, as the engine served them: each call
    /// of [`super::Cache::read_resume`] counts as a read. Hits a
    /// [`super::Reader`] serves outside the engine are not counted here
    /// (the module counts every request itself: [`RequestCounts`]).
    pub read_hits: u64,
    pub read_misses: u64,
}

/// One of the engine's counters (see [`Stats`] for what each counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    WritebackErrors,
    GcErrors,
    CrcErrors,
    BackingErrors,
    RefUnderflows,
    KsetsWrittenBack,
    BytesWrittenBack,
    KsetsGced,
    GcKeptBytes,
    ReadHits,
    ReadMisses,
}

const COUNTERS: usize = Counter::ReadMisses as usize + 1;

/// The engine's counters, atomics: requests, the background work and the
/// messages count from any CPU without a lock. A snapshot is not one instant
/// (each counter is read on its own), as upstream's status is not.
#[derive(Debug, Default)]
pub struct Counters([AtomicU64; COUNTERS]);

impl Counters {
    pub(crate) fn add(&self, c: Counter, n: u64) {
        if let Some(a) = self.0.get(c as usize) {
            a.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    pub(crate) fn get(&self, c: Counter) -> u64 {
        self.0.get(c as usize).map_or(0, |a| a.load(Relaxed))
    }

    /// The counters as [`Stats`] (`ksets_written` is the key log's: 0 here).
    pub(crate) fn snapshot(&self) -> Stats {
        let g = |c| self.get(c);
        Stats {
            writeback_errors: g(Counter::WritebackErrors) as u32,
            gc_errors: g(Counter::GcErrors) as u32,
            crc_errors: g(Counter::CrcErrors),
            backing_errors: g(Counter::BackingErrors),
            ref_underflows: g(Counter::RefUnderflows),
            ksets_written: 0,
            ksets_written_back: g(Counter::KsetsWrittenBack),
            bytes_written_back: g(Counter::BytesWrittenBack),
            ksets_gced: g(Counter::KsetsGced),
            gc_kept_bytes: g(Counter::GcKeptBytes),
            read_hits: g(Counter::ReadHits),
            read_misses: g(Counter::ReadMisses),
        }
    }

    /// `stats reset`: zeroes the counters an operator reads. Leaves alone what
    /// steers the engine (`gc_errors`) and what counts bugs (`ref_underflows`).
    pub(crate) fn reset(&self) {
        for (i, a) in self.0.iter().enumerate() {
            if i != Counter::GcErrors as usize && i != Counter::RefUnderflows as usize {
                a.store(0, Relaxed);
            }
        }
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
pub const STATUS_STATS: [&str; 11] = [
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
    "gc_kept_bytes",
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
        s.stats.gc_kept_bytes,
    ]
}
