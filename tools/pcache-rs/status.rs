//! `pcache-rs status <dm-name>`: runs `dmsetup status <name>` and spells out the
//! status line of a `pcache_rs` (or upstream `pcache`) target. Upstream's fields,
//! which both modules print: sb flags (hex), segments on the device, segments of
//! the cache, used segments, gc_percent, cache_info flags (hex), key head, dirty
//! tail and key tail (each `seg:off`). `pcache_rs` then appends a count and that
//! many statistics, named by [`STATUS_STATS`]. [`parse_status`] is a pure function.

use super::show::cache_mode_name;
use super::{PosReport, ToolError};
use crate::cache_core::STATUS_STATS;
use crate::meta::cache_info::{
    CACHE_FLAGS_CACHE_MODE_MASK, CACHE_FLAGS_CACHE_MODE_SHIFT, CACHE_FLAGS_DATA_CRC,
    CACHE_FLAGS_GC_PERCENT_MASK, CACHE_FLAGS_GC_PERCENT_SHIFT, CACHE_FLAGS_INIT_DONE,
};
use serde::Serialize;
use std::fmt;
use std::process::Command;

/// A parsed `dmsetup status` line of a pcache target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DmStatus {
    /// Start and length (sectors) when the line carried them.
    pub start: Option<u64>,
    pub length: Option<u64>,
    pub sb_flags: u32,
    pub segments_on_device: u32,
    pub segments: u32,
    pub used_segments: u32,
    pub gc_percent: u32,
    pub cache_flags: u32,
    pub key_head: PosReport,
    pub dirty_tail: PosReport,
    pub key_tail: PosReport,
    /// The statistics `pcache_rs` appends (none from the C module).
    pub stats: Vec<StatField>,
}

/// One appended statistic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatField {
    /// From [`STATUS_STATS`]; `field_<n>` past its end (a newer module).
    pub name: String,
    pub value: u64,
}

impl DmStatus {
    /// The statistic called `name`, if the line has it.
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.stats.iter().find(|f| f.name == name).map(|f| f.value)
    }
}

/// Why a status line was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusParseError(pub String);

impl fmt::Display for StatusParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn num(field: &str, s: &str, radix: u32) -> Result<u32, StatusParseError> {
    u32::from_str_radix(s.trim_start_matches("0x"), radix)
        .map_err(|_| StatusParseError(format!("{field}: {s:?} is not a number")))
}

fn pos(field: &str, s: &str) -> Result<PosReport, StatusParseError> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| StatusParseError(format!("{field}: {s:?} is not seg:off")))?;
    Ok(PosReport {
        seg: num(field, a, 10)?,
        off: num(field, b, 10)?,
    })
}

/// The target names: upstream's C target and this module's.
fn is_pcache(w: &str) -> bool {
    w == "pcache" || w == "pcache_rs"
}

/// Parse one line of `dmsetup status`: either the whole line
/// (`0 2097152 pcache 0 62 62 3 70 1183 0:5664 0:5360 0:0`) or only the fields
/// after the target name. Nine fields must follow, then optionally a count and
/// exactly that many statistics.
pub fn parse_status(line: &str) -> Result<DmStatus, StatusParseError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (start, length, fields) = match words.iter().position(|w| is_pcache(w)) {
        Some(2) => {
            let s = words.first().copied().unwrap_or("");
            let l = words.get(1).copied().unwrap_or("");
            let p = |f: &str, v: &str| {
                v.parse::<u64>()
                    .map_err(|_| StatusParseError(format!("{f}: {v:?} is not a number")))
            };
            (
                Some(p("start", s)?),
                Some(p("length", l)?),
                words.get(3..).unwrap_or(&[]),
            )
        }
        Some(_) => {
            return Err(StatusParseError(
                "the target name (pcache or pcache_rs) is not the third word of the line".into(),
            ))
        }
        None => (None, None, &words[..]),
    };
    let (upstream, ours) = fields.split_at(fields.len().min(9));
    let [sb_flags, seg_num, n_segs, used, gc, flags, head, dirty, tail] = upstream else {
        return Err(StatusParseError(format!(
            "a pcache status has 9 fields, this one {}: {line:?}",
            fields.len()
        )));
    };
    let stats = match ours.split_first() {
        None => Vec::new(),
        Some((count, values)) => {
            let n = num("statistics count", count, 10)? as usize;
            if values.len() != n {
                return Err(StatusParseError(format!(
                    "the status announces {n} statistics and has {}: {line:?}",
                    values.len()
                )));
            }
            let mut stats = Vec::with_capacity(n);
            for (i, v) in values.iter().enumerate() {
                let name = STATUS_STATS
                    .get(i)
                    .map_or_else(|| format!("field_{i}"), |s| (*s).to_string());
                let value = v
                    .parse::<u64>()
                    .map_err(|_| StatusParseError(format!("{name}: {v:?} is not a number")))?;
                stats.push(StatField { name, value });
            }
            stats
        }
    };
    Ok(DmStatus {
        start,
        length,
        sb_flags: num("sb flags", sb_flags, 16)?,
        segments_on_device: num("segments on device", seg_num, 10)?,
        segments: num("cache segments", n_segs, 10)?,
        used_segments: num("used segments", used, 10)?,
        gc_percent: num("gc_percent", gc, 10)?,
        cache_flags: num("cache_info flags", flags, 16)?,
        key_head: pos("key head", head)?,
        dirty_tail: pos("dirty tail", dirty)?,
        key_tail: pos("key tail", tail)?,
        stats,
    })
}

/// `status` as printed: the parsed fields plus what they mean.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub name: String,
    pub line: String,
    #[serde(flatten)]
    pub status: DmStatus,
    pub used_percent: f64,
    /// Used share at which GC starts reclaiming.
    pub gc_starts_at_percent: u32,
    pub data_crc: bool,
    pub init_done: bool,
    pub cache_mode: String,
    /// The dirty tail has reached the key head: nothing to write back.
    pub clean: bool,
    /// Log bytes from the dirty tail to the key head, when both are in one
    /// segment (across segments the order of segments is not in the status).
    pub dirty_log_bytes: Option<u64>,
    pub log_bytes: Option<u64>,
}

/// Spell out a parsed status.
pub fn explain(name: &str, line: &str, s: DmStatus) -> StatusReport {
    let f = s.cache_flags;
    let same = |a: PosReport, b: PosReport| {
        (a.seg == b.seg && b.off >= a.off).then(|| u64::from(b.off - a.off))
    };
    StatusReport {
        name: name.into(),
        line: line.trim().into(),
        used_percent: f64::from(s.used_segments) * 100.0 / f64::from(s.segments.max(1)),
        gc_starts_at_percent: s.gc_percent,
        data_crc: f & CACHE_FLAGS_DATA_CRC != 0,
        init_done: f & CACHE_FLAGS_INIT_DONE != 0,
        cache_mode: cache_mode_name(
            (f & CACHE_FLAGS_CACHE_MODE_MASK) >> CACHE_FLAGS_CACHE_MODE_SHIFT,
        ),
        clean: s.dirty_tail == s.key_head,
        dirty_log_bytes: same(s.dirty_tail, s.key_head),
        log_bytes: same(s.key_tail, s.key_head),
        status: s,
    }
}

/// Run `dmsetup status <name>` and explain its pcache line.
pub fn status(name: &str) -> Result<StatusReport, ToolError> {
    let out = Command::new("dmsetup")
        .arg("status")
        .arg(name)
        .output()
        .map_err(|e| ToolError::Io(format!("cannot run dmsetup: {e}")))?;
    if !out.status.success() {
        return Err(ToolError::Io(format!(
            "dmsetup status {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2).is_some_and(is_pcache))
        .ok_or_else(|| ToolError::Usage(format!("{name} has no pcache target: {text:?}")))?;
    let s = parse_status(line)
        .map_err(|e| ToolError::Io(format!("cannot parse the status of {name}: {e}")))?;
    Ok(explain(name, line, s))
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.status;
        writeln!(f, "{}: {}", self.name, self.line)?;
        if let Some(text) = stats_text(s) {
            writeln!(f, "{text}")?;
        }
        writeln!(
            f,
            "segments: {} of {} used ({:.1}%), {} on the device; GC reclaims from {}% used",
            s.used_segments,
            s.segments,
            self.used_percent,
            s.segments_on_device,
            self.gc_starts_at_percent
        )?;
        writeln!(
            f,
            "cache_info flags {:#x}: mode {}, data_crc {}, init_done {}; sb flags {:#x}",
            s.cache_flags,
            self.cache_mode,
            if self.data_crc { "on" } else { "off" },
            if self.init_done { "yes" } else { "no" },
            s.sb_flags
        )?;
        writeln!(
            f,
            "key head {}, dirty tail {}, key tail {}",
            s.key_head, s.dirty_tail, s.key_tail
        )?;
        match (self.clean, self.dirty_log_bytes, self.log_bytes) {
            (true, _, _) => writeln!(f, "clean: everything is written back"),
            (false, Some(d), Some(l)) if l > 0 => writeln!(
                f,
                "dirty: {d} of {l} log bytes ({:.1}%) are not written back yet",
                d as f64 * 100.0 / l as f64
            ),
            _ => writeln!(
                f,
                "dirty: the log from the dirty tail to the key head is not written back yet"
            ),
        }
    }
}

/// The statistics in words, when the line has them.
fn stats_text(s: &DmStatus) -> Option<String> {
    let v = |n: &str| s.stat(n).unwrap_or(0);
    s.stat("read_hits")?;
    let share = |a: u64, b: u64| {
        if a + b == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", a as f64 * 100.0 / (a + b) as f64)
        }
    };
    let (rh, rm, wh, wm) = (
        v("read_hits"),
        v("read_misses"),
        v("write_hits"),
        v("write_misses"),
    );
    Some(format!(
        "reads: {rh} hits, {rm} misses ({} hits); writes: {wh} hits, {wm} misses ({} hits)\n\
         dirty data: {} bytes; written back: {} bytes; GC reclaimed {} ksets, kept {} bytes\n\
         errors: {} data CRC, {} writeback, {} backing reads",
        share(rh, rm),
        share(wh, wm),
        v("dirty_bytes"),
        v("bytes_written_back"),
        v("gc_ksets"),
        v("gc_kept_bytes"),
        v("crc_errors"),
        v("writeback_errors"),
        v("backing_errors"),
    ))
}

// The flag masks come from `meta::cache_info`; keep the gc_percent in the status
// and in the flags consistent for people reading both.
const _: () = assert!(CACHE_FLAGS_GC_PERCENT_MASK >> CACHE_FLAGS_GC_PERCENT_SHIFT == 0x7F);
