//! `pcache-rs show`: what a cache device holds — superblock, both `cache_info`
//! slots, geometry, segment usage and generations, the key head and both tails,
//! and the keys: how many, and the bytes cached and dirty per backing range.
//!
//! The metadata comes from [`scan`]; usage, the key head and the keys from the
//! engine itself, attached read-only (replay over a copy-on-write view).

use super::device::{Image, NoBacking, OverlayPmem};
use super::scan::{scan, walk_log, KeyState, Scan, Slots};
use super::{attach, human_bytes, Finding, Options, PosReport, ToolError};
use crate::cache_core::Key;
use crate::meta::cache_info::{CacheInfo, CachePosOnmedia};
use crate::meta::superblock::PCACHE_MAGIC;
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, Serialize)]
pub struct SuperblockReport {
    pub magic: String,
    pub crc: String,
    pub flags: String,
    /// Segments on the device.
    pub seg_num: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheInfoReport {
    /// Both slots (`slots`) and the one in use (`current`).
    #[serde(flatten)]
    pub slots: Slots<CacheInfo>,
    pub seq: u8,
    /// Physical id of the first cache segment.
    pub seg_id: u32,
    pub n_segs: u32,
    pub flags: String,
    pub data_crc: bool,
    pub init_done: bool,
    pub cache_mode: String,
    pub gc_percent: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct TailReport {
    /// Both slots (`slots`) and the one in use (`current`).
    #[serde(flatten)]
    pub slots: Slots<CachePosOnmedia>,
    pub pos: Option<PosReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GeometryReport {
    pub device_bytes: u64,
    pub seg_size: u64,
    pub seg_data_size: u32,
    pub backing_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SegmentReport {
    pub id: u32,
    pub phys: u32,
    pub gen: u64,
    pub used: bool,
    /// Live keys pointing into it.
    pub refs: u32,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RangeReport {
    /// Backing-device byte range `start..end` covered by contiguous keys.
    pub start: u64,
    pub end: u64,
    pub cached_bytes: u64,
    pub dirty_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShowReport {
    pub geometry: GeometryReport,
    pub superblock: SuperblockReport,
    pub cache_info: CacheInfoReport,
    pub key_tail: TailReport,
    pub dirty_tail: TailReport,
    /// From replay (the log walk when the engine refused the device).
    pub key_head: Option<PosReport>,
    pub segments_on_device: u32,
    pub segments: u32,
    pub used_segments: Option<u32>,
    pub segment_list: Vec<SegmentReport>,
    /// Live keys in the index.
    pub keys: Option<usize>,
    /// Keys in the log from the key tail to the key head (including stale ones).
    pub logged_keys: usize,
    pub ksets: u64,
    pub cached_bytes: u64,
    pub dirty_bytes: u64,
    pub clean: Option<bool>,
    pub ranges: Vec<RangeReport>,
    /// Why the engine refused to attach (then usage and keys are missing).
    pub attach_error: Option<String>,
    /// What the scan and the log walk found wrong (see `check`).
    pub findings: Vec<Finding>,
}

fn tail(s: &Slots<CachePosOnmedia>) -> TailReport {
    TailReport {
        slots: *s,
        pos: s.value().map(|p| PosReport {
            seg: p.cache_seg_id,
            off: p.seg_off,
        }),
    }
}

/// Bytes of `[start, end)` covered by the sorted, disjoint `set`.
fn overlap(set: &[(u64, u64)], start: u64, end: u64) -> u64 {
    set.iter()
        .map(|&(a, b)| b.min(end).saturating_sub(a.max(start)))
        .sum()
}

/// Sorted disjoint union of ranges.
fn union(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

pub(crate) fn cache_mode_name(m: u32) -> String {
    match m {
        0 => "writeback".into(),
        1 => "writethrough".into(),
        2 => "writearound".into(),
        3 => "writeonly".into(),
        n => format!("unknown ({n})"),
    }
}

/// The body of `show` (a library function: the fuzzer runs it on any image).
pub fn show(img: &Image, opts: &Options) -> Result<ShowReport, ToolError> {
    let sc: Scan = scan(img, opts)?;
    let walk = walk_log(img, &sc, opts);
    let info = sc.info;
    let mut findings = sc.findings.clone();
    findings.extend(walk.findings.iter().cloned());

    let mut backing = NoBacking {
        size: opts.backing_bytes,
    };
    let attached = attach(
        opts,
        sc.sb.seg_num,
        info.data_crc(),
        || OverlayPmem::new(img),
        &mut backing,
        |c| {
            let st = c.status();
            let segs: Vec<_> = (0..st.n_segs)
                .map(|i| SegmentReport {
                    id: i,
                    phys: c.seg_phys(i),
                    gen: c.seg_gen(i),
                    used: c.seg_used(i),
                    refs: c.seg_refs(i),
                })
                .collect();
            let mut keys: Vec<Key> = Vec::new();
            c.for_each_key(|k| keys.push(*k));
            (st, segs, keys, c.is_clean())
        },
    );

    // Dirty: what the log holds at or after the dirty tail.
    let dirty_set = union(
        walk.keys
            .iter()
            .filter(|k| k.state == KeyState::Dirty)
            .map(|k| (k.off, k.off + u64::from(k.len)))
            .collect(),
    );
    let (st, segment_list, keys, clean, attach_error) = match attached {
        Ok((st, segs, keys, clean)) => (Some(st), segs, keys, Some(clean), None),
        Err(e) => (None, Vec::new(), Vec::new(), None, Some(e.to_string())),
    };
    let mut ranges: Vec<RangeReport> = Vec::new();
    let mut sorted = keys.clone();
    sorted.sort_unstable_by_key(|k| k.off);
    for k in &sorted {
        match ranges.last_mut() {
            Some(r) if r.end == k.off => {
                r.end = k.end();
                r.cached_bytes += u64::from(k.len);
            }
            _ => ranges.push(RangeReport {
                start: k.off,
                end: k.end(),
                cached_bytes: u64::from(k.len),
                dirty_bytes: 0,
            }),
        }
    }
    for r in ranges.iter_mut() {
        r.dirty_bytes = overlap(&dirty_set, r.start, r.end);
    }
    let cached_bytes = ranges.iter().map(|r| r.cached_bytes).sum();
    let dirty_bytes = ranges.iter().map(|r| r.dirty_bytes).sum();

    Ok(ShowReport {
        geometry: GeometryReport {
            device_bytes: sc.device_bytes,
            seg_size: sc.seg_size,
            seg_data_size: opts.geo.seg_data_size(),
            backing_bytes: opts.backing_bytes,
        },
        superblock: SuperblockReport {
            magic: format!("{:#018x}", sc.sb.magic),
            crc: format!("{:#010x}", sc.sb.crc),
            flags: format!("{:#x}", sc.sb.flags),
            seg_num: sc.sb.seg_num,
        },
        cache_info: CacheInfoReport {
            slots: sc.cache_info,
            seq: info.header.seq,
            seg_id: info.seg_id,
            n_segs: info.n_segs,
            flags: format!("{:#x}", info.flags),
            data_crc: info.data_crc(),
            init_done: info.init_done(),
            cache_mode: cache_mode_name(info.cache_mode()),
            gc_percent: info.gc_percent(),
        },
        key_tail: tail(&sc.key_tail),
        dirty_tail: tail(&sc.dirty_tail),
        key_head: st.map(|s| s.key_head.into()).or(walk.key_head),
        segments_on_device: sc.sb.seg_num,
        segments: info.n_segs,
        used_segments: st.map(|s| s.used_segs),
        segment_list,
        keys: st.map(|s| s.keys),
        logged_keys: walk.keys.len(),
        ksets: walk.ksets,
        cached_bytes,
        dirty_bytes,
        clean,
        ranges,
        attach_error,
        findings,
    })
}

fn slot_line<T>(f: &mut fmt::Formatter<'_>, s: &Slots<T>) -> fmt::Result {
    for sl in &s.slots {
        let cur = if s.current == Some(sl.slot) {
            " (current)"
        } else {
            ""
        };
        let seq = sl.seq.map(|q| format!(" seq {q}")).unwrap_or_default();
        writeln!(
            f,
            "    slot {} at {:#x}: {:?}{seq}{cur}",
            sl.slot, sl.offset, sl.state
        )?;
    }
    Ok(())
}

fn opt_pos(p: Option<PosReport>) -> String {
    p.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
}

impl fmt::Display for ShowReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.geometry;
        writeln!(
            f,
            "device: {} bytes ({}), segments of {} ({} data bytes each)",
            g.device_bytes,
            human_bytes(g.device_bytes),
            human_bytes(g.seg_size),
            g.seg_data_size
        )?;
        let sb = &self.superblock;
        let magic_ok = if sb.magic == format!("{PCACHE_MAGIC:#018x}") {
            "pcache"
        } else {
            "?"
        };
        writeln!(
            f,
            "superblock: magic {} ({magic_ok}), crc {}, flags {}, {} segments on the device",
            sb.magic, sb.crc, sb.flags, sb.seg_num
        )?;
        let ci = &self.cache_info;
        writeln!(
            f,
            "cache_info: seq {}, first segment {} (physical), {} cache segments, flags {} = {}{}mode {}, gc_percent {}",
            ci.seq,
            ci.seg_id,
            ci.n_segs,
            ci.flags,
            if ci.data_crc { "data_crc, " } else { "" },
            if ci.init_done { "init_done, " } else { "" },
            ci.cache_mode,
            ci.gc_percent
        )?;
        slot_line(f, &ci.slots)?;
        writeln!(f, "key tail: {}", opt_pos(self.key_tail.pos))?;
        slot_line(f, &self.key_tail.slots)?;
        writeln!(f, "dirty tail: {}", opt_pos(self.dirty_tail.pos))?;
        slot_line(f, &self.dirty_tail.slots)?;
        writeln!(f, "key head: {}", opt_pos(self.key_head))?;
        match self.used_segments {
            Some(u) => writeln!(
                f,
                "segments: {u} of {} used ({:.1}%)",
                self.segments,
                f64::from(u) * 100.0 / f64::from(self.segments.max(1))
            )?,
            None => writeln!(f, "segments: {} (usage unknown)", self.segments)?,
        }
        for s in self.segment_list.iter().filter(|s| s.used || s.gen != 0) {
            writeln!(
                f,
                "    segment {:>5} (physical {:>5}): gen {}, {}, {} refs (logged keys)",
                s.id,
                s.phys,
                s.gen,
                if s.used { "used" } else { "free" },
                s.refs
            )?;
        }
        writeln!(
            f,
            "log: {} ksets, {} keys logged; {} live keys, {} cached, {} dirty{}",
            self.ksets,
            self.logged_keys,
            self.keys
                .map(|k| k.to_string())
                .unwrap_or_else(|| "?".into()),
            human_bytes(self.cached_bytes),
            human_bytes(self.dirty_bytes),
            match self.clean {
                Some(true) => " (clean: the backing device is up to date)",
                Some(false) => " (dirty: writeback pending)",
                None => "",
            }
        )?;
        if !self.ranges.is_empty() {
            writeln!(
                f,
                "    {:>14} {:>14} {:>12} {:>12}",
                "start", "end", "cached", "dirty"
            )?;
        }
        for r in &self.ranges {
            writeln!(
                f,
                "    {:>14} {:>14} {:>12} {:>12}",
                r.start, r.end, r.cached_bytes, r.dirty_bytes
            )?;
        }
        if let Some(e) = &self.attach_error {
            writeln!(f, "the engine refuses to attach: {e}")?;
        }
        for x in &self.findings {
            writeln!(f, "{x}")?;
        }
        Ok(())
    }
}
