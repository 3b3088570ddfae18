//! `pcache-rs`: inspecting and repairing a dm-pcache cache device offline.
//!
//! The subcommand bodies live here, in the library, so that the host tests and
//! the fuzzer call them directly; `main.rs` only parses the command line, opens
//! the devices and prints. Nothing here parses the on-media format itself: the
//! structures are read with the `meta/` parsers ([`scan`]), the key log is walked
//! with `meta::kset` ([`scan::walk_log`]), and the cache is attached with the
//! engine's own `Cache::start` (replay) over a copy-on-write view of the device
//! ([`device::OverlayPmem`]), so a read-only subcommand never writes.
//!
//! Exit codes follow fsck(8): [`EXIT_OK`], [`EXIT_CORRUPT`] (the metadata is
//! damaged, or the device is not a pcache device), [`EXIT_OPERATIONAL`] (a file
//! could not be opened or written, `dmsetup` failed), [`EXIT_USAGE`].

pub mod check;
pub mod device;
pub mod dump;
pub mod scan;
pub mod show;
pub mod status;
pub mod writeback;

use crate::cache_core::{Backing, Cache, CacheError, CacheOptions, Pmem, Pos};
use crate::host_mem::Borrowed;
use crate::meta::layout::{Geometry, SEG_SIZE};
use crate::sim::OwnedMem;
use serde::Serialize;
use std::fmt;

pub const EXIT_OK: i32 = 0;
pub const EXIT_CORRUPT: i32 = 4;
pub const EXIT_OPERATIONAL: i32 = 8;
pub const EXIT_USAGE: i32 = 16;

/// What stopped a subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolError {
    /// The device holds no pcache (blank, another format, too small).
    NotPcache(String),
    /// The metadata is damaged past what the subcommand can work with.
    Corrupt(String),
    /// A device could not be opened, read or written; `dmsetup` failed.
    Io(String),
    /// A bad argument.
    Usage(String),
}

impl ToolError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ToolError::NotPcache(_) | ToolError::Corrupt(_) => EXIT_CORRUPT,
            ToolError::Io(_) => EXIT_OPERATIONAL,
            ToolError::Usage(_) => EXIT_USAGE,
        }
    }
    /// One word for scripts (`"error"` in the JSON output).
    pub fn kind(&self) -> &'static str {
        match self {
            ToolError::NotPcache(_) => "not_pcache",
            ToolError::Corrupt(_) => "corrupt",
            ToolError::Io(_) => "io",
            ToolError::Usage(_) => "usage",
        }
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::NotPcache(s) => write!(f, "not a pcache device: {s}"),
            ToolError::Corrupt(s) => write!(f, "corrupted metadata: {s}"),
            ToolError::Io(s) => write!(f, "{s}"),
            ToolError::Usage(s) => write!(f, "{s}"),
        }
    }
}

/// Default size assumed for the backing device when none is given: it only
/// bounds the keys (and sizes the index's stripe table, 4 bytes per 4 MiB).
pub const DEFAULT_BACKING_BYTES: u64 = 16 << 40;

/// How to read a device.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Segment geometry (16 MiB segments on real devices; nothing on media says).
    pub geo: Geometry,
    /// Size of the backing device the keys must fit in.
    pub backing_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            geo: Geometry::UPSTREAM,
            backing_bytes: DEFAULT_BACKING_BYTES,
        }
    }
}

impl Options {
    /// Options for a segment size (test images use small segments).
    pub fn with_seg_size(seg_size: u64, backing_bytes: u64) -> Result<Options, ToolError> {
        let geo = if seg_size == SEG_SIZE {
            Geometry::UPSTREAM
        } else {
            Geometry::small(seg_size)
                .map_err(|e| ToolError::Usage(format!("--seg-size {seg_size}: {e}")))?
        };
        if backing_bytes == 0 {
            return Err(ToolError::Usage("the backing size must not be 0".into()));
        }
        Ok(Options { geo, backing_bytes })
    }
}

/// A cache position for reports (`seg:off` for people).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PosReport {
    pub seg: u32,
    pub off: u32,
}

impl From<Pos> for PosReport {
    fn from(p: Pos) -> Self {
        PosReport {
            seg: p.seg.get(),
            off: p.off,
        }
    }
}

impl fmt::Display for PosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seg, self.off)
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The metadata is wrong: `check` exits non-zero.
    Error,
    /// Worth knowing, not damage (e.g. keys without a data CRC under `--data`).
    Warning,
}

/// One thing found wrong: which structure, which field, where, what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// The on-media structure, e.g. `pcache_cache_info`.
    pub structure: String,
    /// The field in it, e.g. `header.crc`.
    pub field: String,
    /// Where: a slot and device offset, a log position, a key.
    pub location: String,
    pub problem: String,
}

impl Finding {
    pub fn error(structure: &str, field: &str, location: String, problem: String) -> Self {
        Finding {
            severity: Severity::Error,
            structure: structure.into(),
            field: field.into(),
            location,
            problem,
        }
    }
    pub fn warning(structure: &str, field: &str, location: String, problem: String) -> Self {
        Finding {
            severity: Severity::Warning,
            ..Finding::error(structure, field, location, problem)
        }
    }
    /// An error the engine returned (attach or replay), which names its field.
    pub fn from_cache_error(e: &CacheError, location: &str) -> Self {
        match e {
            CacheError::Meta(m) => Finding::error(
                m.structure,
                m.field,
                location.into(),
                format!("the engine refuses the device: {m}"),
            ),
            other => Finding::error(
                "cache",
                "-",
                location.into(),
                format!("the engine refuses the device: {other}"),
            ),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        // Data findings name no on-media field ("data", "-").
        if self.field == "-" {
            return write!(
                f,
                "{sev}: {} at {}: {}",
                self.structure, self.location, self.problem
            );
        }
        write!(
            f,
            "{sev}: {}.{} at {}: {}",
            self.structure, self.field, self.location, self.problem
        )
    }
}

/// Fewest key slots tried at attach; doubled while replay runs out of them.
const KEYS_FIRST_TRY: usize = 1 << 16;

/// Attach the cache with the engine (`Cache::start`, which validates and
/// replays), run `f` on it and return its result. `pmem` makes a fresh device
/// view per try; the index starts small and grows while replay finds more keys
/// than it holds (the engine stores nothing before replay has succeeded).
pub fn attach<P: Pmem, B: Backing, R>(
    opts: &Options,
    seg_num: u32,
    data_crc: bool,
    mut pmem: impl FnMut() -> P,
    backing: &mut B,
    f: impl FnOnce(&mut Cache<P, &mut B, Borrowed<'_>>) -> R,
) -> Result<R, CacheError> {
    // Live keys are disjoint and at least a sector each (never more than the
    // data the cache can hold), plus slack for keys of a few bytes.
    let data = u64::from(seg_num).saturating_mul(u64::from(opts.geo.seg_data_size()));
    let most = usize::try_from(data / 512)
        .unwrap_or(usize::MAX)
        .saturating_add(1024);
    let mut keys = KEYS_FIRST_TRY.min(most);
    loop {
        let backing_bytes = backing.size();
        let mut mem = OwnedMem::new(seg_num as usize, keys, backing_bytes, 1, 1);
        let copts = CacheOptions {
            data_crc,
            ..CacheOptions::default()
        };
        match Cache::start(pmem(), &mut *backing, opts.geo, mem.borrow(), &copts) {
            Ok(mut c) => return Ok(f(&mut c)),
            Err(CacheError::NoMem(m)) if m.contains("key pool") && keys < most => {
                keys = keys.saturating_mul(2).min(most);
            }
            Err(e) => return Err(e),
        }
    }
}

/// `n` bytes for people: `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS.get(u).copied().unwrap_or("B"))
    }
}
