//! Reading every metadata structure of a cache device with the `meta/` parsers,
//! slot by slot, keeping what each slot holds, and walking the key log with
//! `meta::kset`. Unlike `Cache::start`, which stops at the first bad field, the
//! scan goes on where it can and records a [`Finding`] for each problem, so
//! `check` can say everything that is wrong and where.

use super::device::Image;
use super::{Finding, Options, PosReport, ToolError};
use crate::meta::cache_info::{
    CacheInfo, CachePosOnmedia, CtrlPos, CACHE_MODE_WRITEBACK, GC_PERCENT_MAX,
};
use crate::meta::header::{decode_slot, find_latest, Slotted};
use crate::meta::kset::{
    kset_key, kset_read, KeyOnmedia, KsetRead, KEY_FLAGS_CLEAN, KSET_MAGIC, KSET_ONMEDIA_SIZE_MAX,
};
use crate::meta::layout::{SB_OFF, SUBTREE_SHIFT};
use crate::meta::segment::{SegGen, SegmentInfo};
use crate::meta::superblock::{Superblock, PCACHE_MAGIC, SB_STRUCT_SIZE};
use serde::Serialize;
use std::collections::BTreeSet;

/// What one metadata slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// All zeros: never written.
    Blank,
    /// CRC matches.
    Valid,
    /// Written, but the CRC does not match (a torn update or damage).
    BadCrc,
    /// Outside the device or unreadable.
    Unreadable,
}

/// One slot of a two-slot structure.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(bound = "")]
pub struct Slot<T> {
    pub slot: usize,
    /// Device offset.
    pub offset: u64,
    pub state: SlotState,
    /// The sequence number as stored (also for a slot with a bad CRC).
    pub seq: Option<u8>,
    /// The decoded structure when the CRC holds.
    #[serde(skip)]
    pub value: Option<T>,
}

/// Both slots of a structure and the one the engine uses (`pick_latest`).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(bound = "")]
pub struct Slots<T> {
    pub slots: [Slot<T>; 2],
    pub current: Option<usize>,
}

impl<T: Slotted + Copy> Slots<T> {
    fn read(img: &Image, offs: [u64; 2]) -> Slots<T> {
        let one = |i: usize| {
            let offset = offs.get(i).copied().unwrap_or(0);
            let Some(b) = img.bytes(offset, T::SIZE) else {
                return Slot {
                    slot: i,
                    offset,
                    state: SlotState::Unreadable,
                    seq: None,
                    value: None,
                };
            };
            let seq = T::decode_raw(&b).ok().map(|v| v.header().seq);
            let value = decode_slot::<T>(&b).ok().flatten();
            let state = if value.is_some() {
                SlotState::Valid
            } else if b.iter().all(|&x| x == 0) {
                SlotState::Blank
            } else {
                SlotState::BadCrc
            };
            Slot {
                slot: i,
                offset,
                state,
                seq,
                value,
            }
        };
        let slots = [one(0), one(1)];
        let current = find_latest([
            slots[0].value.map(|v| v.header().seq),
            slots[1].value.map(|v| v.header().seq),
        ])
        .map(|i| i.get());
        Slots { slots, current }
    }

    /// The structure in the current slot.
    pub fn value(&self) -> Option<T> {
        self.current
            .and_then(|i| self.slots.get(i))
            .and_then(|s| s.value)
    }

    /// Findings about the slots: damaged copies, and two valid copies whose
    /// sequence numbers are not one apart (each update goes to the other slot
    /// with seq + 1).
    fn check(&self, structure: &str, what: &str, out: &mut Vec<Finding>) {
        for s in &self.slots {
            let loc = format!("{what} slot {} (offset {:#x})", s.slot, s.offset);
            match s.state {
                SlotState::BadCrc => out.push(Finding::error(
                    structure,
                    "header.crc",
                    loc,
                    match self.current {
                        Some(c) => format!(
                            "bad CRC (seq {}): a damaged or torn copy; the engine uses slot {c}",
                            s.seq.map(|q| q.to_string()).unwrap_or_else(|| "?".into())
                        ),
                        None => "bad CRC, and the other slot holds no valid copy".into(),
                    },
                )),
                SlotState::Unreadable => out.push(Finding::error(
                    structure,
                    "-",
                    loc,
                    "cannot be read (past the end of the device?)".into(),
                )),
                _ => {}
            }
        }
        if let (Some(a), Some(b)) = (self.slots[0].value, self.slots[1].value) {
            let (sa, sb) = (a.header().seq, b.header().seq);
            let d = sa.wrapping_sub(sb);
            if d != 1 && d != 255 {
                out.push(Finding::error(
                    structure,
                    "header.seq",
                    format!("{what} slots 0 and 1"),
                    format!("sequence numbers {sa} and {sb} are not consecutive"),
                ));
            }
        }
    }
}

/// One cache segment as its metadata describes it.
#[derive(Debug, Clone)]
pub struct SegScan {
    /// Cache segment id (position in the chain).
    pub id: u32,
    /// Physical segment on the device.
    pub phys: u32,
    pub info: Slots<SegmentInfo>,
    pub gen_slots: Slots<SegGen>,
    /// The generation in force (0 when no gen slot is valid, as the engine does).
    pub gen: u64,
}

/// Everything the metadata says, slot by slot.
#[derive(Debug, Clone)]
pub struct Scan {
    pub device_bytes: u64,
    pub seg_size: u64,
    pub sb: Superblock,
    pub cache_info: Slots<CacheInfo>,
    /// The current `cache_info`.
    pub info: CacheInfo,
    /// The chain of cache segments, as far as it could be followed.
    pub segs: Vec<SegScan>,
    pub key_tail: Slots<CachePosOnmedia>,
    pub dirty_tail: Slots<CachePosOnmedia>,
    pub findings: Vec<Finding>,
}

impl Scan {
    pub fn key_tail_pos(&self) -> Option<PosReport> {
        tail_pos(&self.key_tail)
    }
    pub fn dirty_tail_pos(&self) -> Option<PosReport> {
        tail_pos(&self.dirty_tail)
    }
    pub fn seg(&self, id: u32) -> Option<&SegScan> {
        self.segs.get(id as usize)
    }
}

/// A tail as the media has it (its segment may be out of range: the scan
/// reports that instead of refusing it).
fn tail_pos(s: &Slots<CachePosOnmedia>) -> Option<PosReport> {
    s.value().map(|p| PosReport {
        seg: p.cache_seg_id,
        off: p.seg_off,
    })
}

/// Read the superblock, both `cache_info` slots, the segment chain with each
/// segment's info and generation slots, and both tails. Errors only when the
/// device is no pcache at all (or its `cache_info` is unusable); everything else
/// becomes a finding.
pub fn scan(img: &Image, opts: &Options) -> Result<Scan, ToolError> {
    let geo = opts.geo;
    let dev = img.size();
    if dev == 0 {
        return Err(ToolError::NotPcache("the device is empty (0 bytes)".into()));
    }
    let sb_bytes = img.bytes(SB_OFF, SB_STRUCT_SIZE).ok_or_else(|| {
        ToolError::NotPcache(format!(
            "{dev} bytes is too small to hold a superblock (at {SB_OFF:#x})"
        ))
    })?;
    let raw = Superblock::decode_raw(&sb_bytes).map_err(|e| ToolError::NotPcache(e.to_string()))?;
    if raw.magic == 0 {
        return Err(ToolError::NotPcache(
            "no superblock (magic is 0): the device was never formatted".into(),
        ));
    }
    if raw.magic != PCACHE_MAGIC {
        return Err(ToolError::NotPcache(format!(
            "superblock magic is {:#018x}, not {PCACHE_MAGIC:#018x}",
            raw.magic
        )));
    }
    if dev < geo.min_dev_size {
        return Err(ToolError::Corrupt(format!(
            "the device ({dev} bytes) is smaller than a cache device can be ({} bytes): truncated image?",
            geo.min_dev_size
        )));
    }
    let sb = Superblock::parse(&sb_bytes, &geo, dev).map_err(|e| {
        ToolError::Corrupt(format!(
            "{e} (superblock at {SB_OFF:#x}, {dev} bytes device)"
        ))
    })?;
    let mut findings = Vec::new();

    let cache_info =
        Slots::<CacheInfo>::read(img, [CacheInfo::slot_off(0), CacheInfo::slot_off(1)]);
    cache_info.check("pcache_cache_info", "cache_info", &mut findings);
    let info = match cache_info.value() {
        Some(i) => i,
        None => {
            let blank = cache_info.slots.iter().all(|s| s.state == SlotState::Blank);
            return Err(ToolError::Corrupt(if blank {
                "both cache_info slots are blank: the cache was formatted but never started".into()
            } else {
                format!(
                    "pcache_cache_info.header.crc: no valid slot (slot 0 {:?}, slot 1 {:?} at {:#x}/{:#x})",
                    cache_info.slots[0].state,
                    cache_info.slots[1].state,
                    CacheInfo::slot_off(0),
                    CacheInfo::slot_off(1)
                )
            }));
        }
    };
    let cur = format!("cache_info slot {}", cache_info.current.unwrap_or(0));
    const CI: &str = "pcache_cache_info";
    if info.n_segs == 0 || info.n_segs > sb.seg_num {
        findings.push(Finding::error(
            CI,
            "n_segs",
            cur.clone(),
            format!("{} is not in 1..={}", info.n_segs, sb.seg_num),
        ));
    }
    if info.gc_percent() > GC_PERCENT_MAX {
        findings.push(Finding::error(
            CI,
            "flags.gc_percent",
            cur.clone(),
            format!("{} is over {GC_PERCENT_MAX}", info.gc_percent()),
        ));
    }
    if info.cache_mode() != CACHE_MODE_WRITEBACK {
        findings.push(Finding::error(
            CI,
            "flags.cache_mode",
            cur.clone(),
            format!("mode {} is not writeback (0)", info.cache_mode()),
        ));
    }
    if !info.init_done() {
        findings.push(Finding::warning(
            CI,
            "flags.init_done",
            cur.clone(),
            "not set: the cache was never fully started".into(),
        ));
    }

    // The segment chain: cache segment i lives on physical segment phys(i).
    let n_segs = info.n_segs.min(sb.seg_num);
    let mut segs: Vec<SegScan> = Vec::new();
    let mut claimed = BTreeSet::new();
    let mut phys = info.seg_id;
    for id in 0..n_segs {
        const SI: &str = "pcache_segment_info";
        if id > 0 {
            let Some(prev) = segs.last() else { break };
            match prev.info.value() {
                Some(p) if p.has_next() => phys = p.next_seg,
                Some(_) => {
                    findings.push(Finding::error(
                        SI,
                        "flags.has_next",
                        format!("cache segment {} (physical {})", prev.id, prev.phys),
                        format!("the chain ends after {id} of {n_segs} segments"),
                    ));
                    break;
                }
                None => break,
            }
        }
        let loc = format!("cache segment {id} (physical {phys})");
        if phys >= sb.seg_num {
            findings.push(Finding::error(
                if id == 0 { CI } else { SI },
                if id == 0 { "seg_id" } else { "next_seg" },
                loc,
                format!(
                    "physical segment {phys} is not below seg_num {}",
                    sb.seg_num
                ),
            ));
            break;
        }
        if !claimed.insert(phys) {
            findings.push(Finding::error(
                SI,
                "next_seg",
                loc,
                format!("physical segment {phys} is already in the chain (a cycle)"),
            ));
            break;
        }
        let info_slots = Slots::<SegmentInfo>::read(
            img,
            [
                SegmentInfo::slot_off(&geo, phys, 0),
                SegmentInfo::slot_off(&geo, phys, 1),
            ],
        );
        info_slots.check(SI, &format!("{loc} segment_info"), &mut findings);
        let gen_slots = Slots::<SegGen>::read(
            img,
            [
                SegGen::slot_off(&geo, phys, 0),
                SegGen::slot_off(&geo, phys, 1),
            ],
        );
        gen_slots.check("pcache_cache_seg_gen", &format!("{loc} gen"), &mut findings);
        if info_slots.value().is_none() {
            findings.push(Finding::error(
                SI,
                "header.crc",
                loc.clone(),
                "no valid segment_info slot: the chain cannot be followed".into(),
            ));
        }
        let gen = gen_slots.value().map(|g| g.gen).unwrap_or(0);
        let valid_info = info_slots.value().is_some();
        segs.push(SegScan {
            id,
            phys,
            info: info_slots,
            gen_slots,
            gen,
        });
        if !valid_info {
            break;
        }
    }

    let key_tail = Slots::<CachePosOnmedia>::read(
        img,
        [CtrlPos::KeyTail.slot_off(0), CtrlPos::KeyTail.slot_off(1)],
    );
    let dirty_tail = Slots::<CachePosOnmedia>::read(
        img,
        [
            CtrlPos::DirtyTail.slot_off(0),
            CtrlPos::DirtyTail.slot_off(1),
        ],
    );
    for (which, t) in [
        (CtrlPos::KeyTail, &key_tail),
        (CtrlPos::DirtyTail, &dirty_tail),
    ] {
        t.check(which.name(), which.name(), &mut findings);
        match t.value() {
            None => findings.push(Finding::error(
                which.name(),
                "header.crc",
                format!("{} slots", which.name()),
                "no valid slot".into(),
            )),
            Some(p) => {
                if p.cache_seg_id >= info.n_segs {
                    findings.push(Finding::error(
                        which.name(),
                        "cache_seg_id",
                        format!("{} slot {}", which.name(), t.current.unwrap_or(0)),
                        format!("{} is not below n_segs {}", p.cache_seg_id, info.n_segs),
                    ));
                }
                if p.seg_off >= geo.seg_data_size() {
                    findings.push(Finding::error(
                        which.name(),
                        "seg_off",
                        format!("{} slot {}", which.name(), t.current.unwrap_or(0)),
                        format!(
                            "{} is past the segment data area ({} bytes)",
                            p.seg_off,
                            geo.seg_data_size()
                        ),
                    ));
                }
            }
        }
    }
    Ok(Scan {
        device_bytes: dev,
        seg_size: geo.seg_size,
        sb,
        cache_info,
        info,
        segs,
        key_tail,
        dirty_tail,
        findings,
    })
}

/// What a logged key is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Logged at or after the dirty tail: not yet on the backing device.
    Dirty,
    /// Written back already, or a read-cache (clean) key.
    Clean,
    /// Its segment was reclaimed since (older generation): ignored by replay.
    Stale,
}

/// A key as it sits in the log.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LogKey {
    /// Position of its kset in the log.
    pub kset: PosReport,
    /// Index of the key in its kset.
    pub index: usize,
    pub off: u64,
    pub len: u32,
    pub flags: u32,
    pub cache: PosReport,
    pub gen: u64,
    pub data_crc: u32,
    pub state: KeyState,
}

/// The key log from the key tail to the key head.
#[derive(Debug, Clone, Serialize)]
pub struct LogWalk {
    /// Ksets holding keys.
    pub ksets: u64,
    /// End-of-segment (LAST) ksets followed.
    pub hops: u32,
    pub keys: Vec<LogKey>,
    /// Where the log ends (None when the walk stopped at an error).
    pub key_head: Option<PosReport>,
    pub findings: Vec<Finding>,
}

/// Walk the key log from the key tail, following LAST ksets, until a position
/// holds no valid kset. Checks the chain (segment bounds, cycles, the dirty tail
/// on it) and each key (bounds against `opts.backing_bytes`, its generation
/// against its segment's, the 4 MiB stripe).
pub fn walk_log(img: &Image, scan: &Scan, opts: &Options) -> LogWalk {
    const KS: &str = "pcache_cache_kset_onmedia";
    const K: &str = "pcache_cache_key_onmedia";
    let geo = opts.geo;
    let data_size = geo.seg_data_size();
    let n_segs = scan.info.n_segs;
    let mut w = LogWalk {
        ksets: 0,
        hops: 0,
        keys: Vec::new(),
        key_head: None,
        findings: Vec::new(),
    };
    let (Some(mut pos), Some(dirty_tail)) = (scan.key_tail_pos(), scan.dirty_tail_pos()) else {
        return w;
    };
    let mut visited = BTreeSet::new();
    visited.insert(pos.seg);
    let mut dirty = false;
    loop {
        if pos == dirty_tail {
            dirty = true;
        }
        let here = pos;
        let Some(seg) = scan.seg(pos.seg) else {
            w.findings.push(Finding::error(
                KS,
                "-",
                format!("log position {here}"),
                format!(
                    "cache segment {} is not in the segment chain ({} segments followed)",
                    pos.seg,
                    scan.segs.len()
                ),
            ));
            return w;
        };
        let remain = data_size.saturating_sub(pos.off) as usize;
        let n = remain.min(KSET_ONMEDIA_SIZE_MAX);
        let Some(buf) = img.bytes(geo.seg_data_off(seg.phys) + u64::from(pos.off), n) else {
            w.findings.push(Finding::error(
                KS,
                "-",
                format!("log position {here}"),
                "cannot be read (past the end of the device?)".into(),
            ));
            return w;
        };
        match kset_read(&buf, n_segs) {
            Err(e) => {
                w.findings.push(Finding::error(
                    e.structure,
                    e.field,
                    format!("log position {here}"),
                    e.to_string(),
                ));
                return w;
            }
            Ok(KsetRead::End) => {
                // The log ends where no valid kset is. One that carries the kset
                // magic but fails its CRC is a kset torn by a power cut before it
                // was acknowledged, or damage: before the dirty tail it is damage.
                if buf.get(8..16) == Some(&KSET_MAGIC.to_le_bytes()[..]) {
                    let f = if dirty {
                        Finding::warning
                    } else {
                        Finding::error
                    };
                    w.findings.push(f(
                        KS,
                        "crc",
                        format!("log position {here}"),
                        format!(
                            "a kset with a bad CRC ends the log here{}",
                            if dirty {
                                " (a kset torn by a power cut, or damage)"
                            } else {
                                ", before the dirty tail: the rest of the log is lost"
                            }
                        ),
                    ));
                }
                break;
            }
            Ok(KsetRead::Last { next_cache_seg_id }) => {
                w.hops += 1;
                if !visited.insert(next_cache_seg_id) {
                    w.findings.push(Finding::error(
                        KS,
                        "next_cache_seg_id",
                        format!("log position {here}"),
                        format!(
                            "the log continues in cache segment {next_cache_seg_id}, which it already passed through (a cycle)"
                        ),
                    ));
                    return w;
                }
                pos = PosReport {
                    seg: next_cache_seg_id,
                    off: 0,
                };
            }
            Ok(KsetRead::Keys { key_num, size }) => {
                w.ksets += 1;
                for i in 0..key_num as usize {
                    let loc = format!("log position {here} key {i}");
                    let om: KeyOnmedia = match kset_key(&buf, i) {
                        Ok(k) => k,
                        Err(e) => {
                            w.findings.push(Finding::error(
                                e.structure,
                                e.field,
                                loc,
                                e.to_string(),
                            ));
                            continue;
                        }
                    };
                    if let Err(e) = om.validate(opts.backing_bytes, n_segs, data_size) {
                        w.findings.push(Finding::error(
                            e.structure,
                            e.field,
                            loc,
                            format!(
                                "{e}: off {} len {} at cache {}:{} (backing device {} bytes, {n_segs} segments of {data_size} data bytes)",
                                om.off, om.len, om.cache_seg_id, om.cache_seg_off, opts.backing_bytes
                            ),
                        ));
                        continue;
                    }
                    let seg_gen = scan.seg(om.cache_seg_id).map(|s| s.gen).unwrap_or(0);
                    let stale = om.seg_gen < seg_gen;
                    if om.seg_gen > seg_gen {
                        w.findings.push(Finding::error(
                            K,
                            "seg_gen",
                            loc.clone(),
                            format!(
                                "generation {} is newer than its segment's ({seg_gen}, cache segment {})",
                                om.seg_gen, om.cache_seg_id
                            ),
                        ));
                    }
                    let end = om.off + u64::from(om.len);
                    if !stale && om.off >> SUBTREE_SHIFT != (end - 1) >> SUBTREE_SHIFT {
                        w.findings.push(Finding::error(
                            K,
                            "off/len",
                            loc.clone(),
                            format!(
                                "off {} len {} crosses a 4 MiB stripe boundary",
                                om.off, om.len
                            ),
                        ));
                    }
                    let state = if stale {
                        KeyState::Stale
                    } else if dirty && om.flags & KEY_FLAGS_CLEAN == 0 {
                        KeyState::Dirty
                    } else {
                        KeyState::Clean
                    };
                    w.keys.push(LogKey {
                        kset: here,
                        index: i,
                        off: om.off,
                        len: om.len,
                        flags: om.flags,
                        cache: PosReport {
                            seg: om.cache_seg_id,
                            off: om.cache_seg_off,
                        },
                        gen: om.seg_gen,
                        data_crc: om.data_crc,
                        state,
                    });
                }
                pos.off += size;
            }
        }
    }
    w.key_head = Some(pos);
    if !dirty {
        w.findings.push(Finding::error(
            "pcache_cache_ctrl",
            "dirty_tail_pos",
            format!("dirty tail {}", dirty_tail),
            format!(
                "not on the key log between the key tail {} and the key head {}",
                scan.key_tail_pos().unwrap_or_default(),
                pos
            ),
        ));
    }
    w
}
