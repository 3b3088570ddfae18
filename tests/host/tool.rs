//! The offline tool `pcache-rs` over images the engine itself writes (small
//! segments, in memory and in temporary files), each structure corrupted in
//! turn, and over the C module's image (`tests/images/c-pcache-1g.img.zst`):
//! library bodies, then the binary end to end (exit codes, JSON shape).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use pcache_engine::c_image_writes;
use pcache_engine::cache_core::{Cache, CacheOptions};
use pcache_engine::meta::cache_info::{CachePosOnmedia, CtrlPos, CACHE_POS_STRUCT_SIZE};
use pcache_engine::meta::header::{MetaHeader, Slotted};
use pcache_engine::meta::kset::{encode_last_kset, kset_size, seal_kset, KSET_HEADER_SIZE};
use pcache_engine::meta::layout::{Geometry, SB_OFF, SEGMENTS_OFF};
use pcache_engine::sim::{BackingModel, OwnedMem, SimBacking, SimPmem, World, SECTOR};
use pcache_engine::tool::check::check;
use pcache_engine::tool::device::Image;
use pcache_engine::tool::dump::dump;
use pcache_engine::tool::scan::KeyState;
use pcache_engine::tool::show::show;
use pcache_engine::tool::status::{explain, parse_status, DmStatus};
use pcache_engine::tool::{Options, PosReport, Severity, ToolError};

const SEG: u64 = 256 << 10;
const SEGS: u64 = 24;
const BACKING: u64 = 16 << 20;
const SIZE: usize = (SEGMENTS_OFF + SEGS * SEG) as usize;

fn geo() -> Geometry {
    Geometry::small(SEG).unwrap()
}

fn opts() -> Options {
    Options {
        geo: geo(),
        backing_bytes: BACKING,
    }
}

/// The sector pattern the images hold: sector number and a version tag.
fn pattern(sector: u64, ver: u8) -> [u8; SECTOR] {
    let mut b = [0u8; SECTOR];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(8) {
        *x = (sector as usize + i) as u8 ^ ver;
    }
    b
}

/// `(byte offset, sectors, version)` in write order: two ranges overwritten in
/// part, one crossing a 4 MiB stripe (the engine splits it), one near the end.
const WRITES: [(u64, u64, u8); 6] = [
    (0, 64, 1),
    (1 << 20, 16, 1),
    (8 * 512, 8, 2),
    ((4 << 20) - 4096, 16, 1),
    (BACKING - 8192, 16, 1),
    ((1 << 20) + 1024, 1, 3),
];

fn expected() -> std::collections::BTreeMap<u64, u8> {
    let mut m = std::collections::BTreeMap::new();
    for (off, n, v) in WRITES {
        for s in off / 512..off / 512 + n {
            m.insert(s, v);
        }
    }
    m
}

/// A cache written by the engine: the pmem image and the backing device.
/// `dirty`: stop before writeback. `many`: enough small FUA writes that the key
/// log spans several segments.
fn build(dirty: bool, data_crc: bool, many: bool) -> (Vec<u8>, BackingModel) {
    let world = World::untracked(vec![0u8; SIZE], BackingModel::new(BACKING, HashMap::new()));
    let mut mem = OwnedMem::new(SEGS as usize, 8192, BACKING, 2, 2);
    let o = CacheOptions {
        data_crc,
        ..Default::default()
    };
    {
        let mut c = Cache::start(
            SimPmem(world.clone()),
            SimBacking(world.clone()),
            geo(),
            mem.borrow(),
            &o,
        )
        .unwrap();
        for (off, n, v) in WRITES {
            let mut buf = Vec::new();
            for s in off / 512..off / 512 + n {
                buf.extend_from_slice(&pattern(s, v));
            }
            c.write(off, &buf, false, 0).unwrap();
            c.flush().unwrap();
        }
        if many {
            // One kset per FUA write: about 100 ksets of 64 bytes, plus the LAST
            // ksets between key-log segments.
            for i in 0..900u64 {
                let s = 6144 + (i % 64) * 8;
                c.write(s * 512, &pattern(s, 4), true, 0).unwrap();
            }
        }
        if !dirty {
            c.writeback_all().unwrap();
            assert!(c.is_clean());
        }
    }
    // Attach once more, as a reboot would: cache_info then has two valid slots.
    Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        geo(),
        mem.borrow(),
        &o,
    )
    .unwrap();
    let w = world.borrow();
    (w.pmem.volatile.clone(), w.backing.clone())
}

fn img(b: &[u8]) -> Image {
    Image::from_bytes(b.to_vec())
}

fn errors(r: &pcache_engine::tool::check::CheckReport) -> Vec<(String, String)> {
    r.findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| (f.structure.clone(), f.field.clone()))
        .collect()
}

/// Check must fail and name `structure.field` among its errors.
fn assert_finds(image: &[u8], data: bool, structure: &str, field: &str) {
    let r = check(&img(image), &opts(), data).unwrap();
    let e = errors(&r);
    assert!(!r.is_clean(), "check passed a corrupted image: {r}");
    assert!(
        e.iter().any(|(s, f)| s == structure && f == field),
        "expected {structure}.{field} among the errors, got:\n{r}"
    );
}

fn current_slot_off<T: Slotted + Copy>(image: &[u8], offs: [u64; 2]) -> (usize, u64, T) {
    let a = &image[offs[0] as usize..offs[0] as usize + T::SIZE];
    let b = &image[offs[1] as usize..offs[1] as usize + T::SIZE];
    let (i, v) = pcache_engine::meta::header::pick_latest::<T>(a, b)
        .unwrap()
        .unwrap();
    (i.get(), offs[i.get()], v)
}

#[test]
fn clean_image_checks_clean_and_shows_no_dirty_bytes() {
    let (image, _) = build(false, true, false);
    let r = check(&img(&image), &opts(), true).unwrap();
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.warnings, 0, "{r}");
    let d = r.data.unwrap();
    assert!(
        d.keys_ok > 0 && d.keys_bad == 0 && d.keys_without_crc == 0,
        "{r}"
    );
    let s = show(&img(&image), &opts()).unwrap();
    assert_eq!(s.clean, Some(true));
    assert_eq!(s.dirty_bytes, 0);
    let cached: u64 = expected().len() as u64 * 512;
    assert_eq!(s.cached_bytes, cached, "{s}");
    assert_eq!(s.key_head, s.dirty_tail.pos);
    let dm = dump(&img(&image), &opts()).unwrap();
    assert!(dm.keys.iter().all(|k| k.state == KeyState::Clean));
    assert_eq!(dm.keys.len(), s.logged_keys);
}

#[test]
fn dirty_image_shows_its_dirty_bytes_per_range() {
    let (image, _) = build(true, false, false);
    let r = check(&img(&image), &opts(), true).unwrap();
    assert!(r.is_clean(), "{r}");
    // Written without data CRC: a warning, not an error.
    assert!(
        r.warnings > 0 && r.data.unwrap().keys_without_crc > 0,
        "{r}"
    );
    let s = show(&img(&image), &opts()).unwrap();
    assert_eq!(s.clean, Some(false));
    let all = expected().len() as u64 * 512;
    assert_eq!((s.cached_bytes, s.dirty_bytes), (all, all), "{s}");
    // Ranges: contiguous runs of keys, sorted.
    let starts: Vec<u64> = s.ranges.iter().map(|r| r.start).collect();
    assert_eq!(
        starts,
        vec![0, 1 << 20, (4 << 20) - 4096, BACKING - 8192],
        "{s}"
    );
    assert!(s.ranges.iter().all(|r| r.cached_bytes == r.dirty_bytes));
    let dm = dump(&img(&image), &opts()).unwrap();
    assert!(dm.keys.iter().all(|k| k.state == KeyState::Dirty));
    // Log order: the first write's keys first.
    assert_eq!(dm.keys.first().map(|k| k.off), Some(0));
}

#[test]
fn read_only_subcommands_never_write_the_image() {
    let (image, _) = build(true, true, true);
    let dir = TempDir::new("ro");
    let p = dir.file("cache.img", &image);
    for args in [vec!["show"], vec!["check", "--data"], vec!["dump"]] {
        let o = run_bin(&args, &p, &[]);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    }
    assert!(fs::read(&p).unwrap() == image, "the image changed");
}

#[test]
fn superblock_damage_is_reported() {
    let (image, _) = build(false, false, false);
    let mut bad = image.clone();
    bad[SB_OFF as usize] ^= 1; // crc
    match check(&img(&bad), &opts(), false) {
        Err(ToolError::Corrupt(m)) => assert!(m.contains("pcache_sb.crc"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut bad = image.clone();
    bad[SB_OFF as usize + 8] ^= 1; // magic
    assert!(matches!(
        check(&img(&bad), &opts(), false),
        Err(ToolError::NotPcache(_))
    ));
}

#[test]
fn cache_info_slot_damage_is_reported_with_its_slot() {
    let (image, _) = build(false, false, false);
    let offs = [
        pcache_engine::meta::cache_info::CacheInfo::slot_off(0),
        pcache_engine::meta::cache_info::CacheInfo::slot_off(1),
    ];
    let (cur, off, _) =
        current_slot_off::<pcache_engine::meta::cache_info::CacheInfo>(&image, offs);
    let mut bad = image.clone();
    bad[off as usize + 12] ^= 0x40; // n_segs
    assert_finds(&bad, false, "pcache_cache_info", "header.crc");
    let r = check(&img(&bad), &opts(), false).unwrap();
    assert!(
        r.findings
            .iter()
            .any(|f| f.location.contains(&format!("slot {cur}"))),
        "{r}"
    );
    // Both slots gone: not a usable cache.
    let mut bad = image.clone();
    for o in offs {
        bad[o as usize] ^= 0xFF;
    }
    assert!(matches!(
        check(&img(&bad), &opts(), false),
        Err(ToolError::Corrupt(_))
    ));
}

#[test]
fn segment_info_and_generation_damage_is_reported() {
    use pcache_engine::meta::segment::{SegGen, SegmentInfo};
    let (image, _) = build(false, false, false);
    let g = geo();
    // Segment 1 is physical 1 on a fresh device.
    let (_, off, _) = current_slot_off::<SegmentInfo>(
        &image,
        [
            SegmentInfo::slot_off(&g, 1, 0),
            SegmentInfo::slot_off(&g, 1, 1),
        ],
    );
    let mut bad = image.clone();
    bad[off as usize + 8] ^= 1;
    assert_finds(&bad, false, "pcache_segment_info", "header.crc");
    let (_, off, _) = current_slot_off::<SegGen>(
        &image,
        [SegGen::slot_off(&g, 1, 0), SegGen::slot_off(&g, 1, 1)],
    );
    let mut bad = image.clone();
    bad[off as usize + 8] ^= 1;
    assert_finds(&bad, false, "pcache_cache_seg_gen", "header.crc");
}

#[test]
fn kset_crc_damage_is_reported_where_the_log_ends() {
    let (image, _) = build(false, false, false);
    // The first kset of the log is at the start of cache segment 0 (physical 0).
    let at = geo().seg_data_off(0) as usize;
    let mut bad = image.clone();
    bad[at + KSET_HEADER_SIZE + 3] ^= 1;
    assert_finds(&bad, false, "pcache_cache_kset_onmedia", "crc");
    assert_finds(&bad, false, "pcache_cache_ctrl", "dirty_tail_pos");
}

#[test]
fn kset_chain_cycle_is_reported() {
    let (image, _) = build(false, false, true);
    let s = show(&img(&image), &opts()).unwrap();
    assert!(s.ksets > 50, "{s}");
    // Make the key head a LAST kset leading back to the key tail's segment.
    let head = s.key_head.unwrap();
    let tail = s.key_tail.pos.unwrap();
    let phys = s.segment_list[head.seg as usize].phys;
    let at = (geo().seg_data_off(phys) + u64::from(head.off)) as usize;
    let mut last = [0u8; KSET_HEADER_SIZE];
    encode_last_kset(tail.seg, &mut last);
    let mut bad = image.clone();
    bad[at..at + KSET_HEADER_SIZE].copy_from_slice(&last);
    let r = check(&img(&bad), &opts(), false).unwrap();
    assert_finds(
        &bad,
        false,
        "pcache_cache_kset_onmedia",
        "next_cache_seg_id",
    );
    assert!(
        r.findings.iter().any(|f| f.problem.contains("cycle")),
        "{r}"
    );
}

#[test]
fn key_out_of_bounds_is_reported() {
    let (image, _) = build(false, false, false);
    let at = geo().seg_data_off(0) as usize;
    let key_num = u32::from_le_bytes(image[at + 4..at + 8].try_into().unwrap()) as usize;
    assert!(key_num >= 1);
    let mut bad = image.clone();
    // Key 0's off: past the backing device; then reseal the kset's CRC.
    let k = at + kset_size(0);
    bad[k..k + 8].copy_from_slice(&(BACKING - 512).to_le_bytes());
    let size = kset_size(key_num);
    seal_kset(&mut bad[at..at + size], key_num).unwrap();
    assert_finds(&bad, false, "pcache_cache_key_onmedia", "off/len");
    let r = check(&img(&bad), &opts(), false).unwrap();
    assert!(
        r.findings
            .iter()
            .any(|f| f.location == "log position 0:0 key 0"),
        "{r}"
    );
}

#[test]
fn data_crc_damage_is_found_with_data_only() {
    let (image, _) = build(true, true, false);
    let dm = dump(&img(&image), &opts()).unwrap();
    let s = show(&img(&image), &opts()).unwrap();
    let k = dm.keys.iter().find(|k| k.off == 0).unwrap();
    let phys = s.segment_list[k.cache.seg as usize].phys;
    let at = (geo().seg_data_off(phys) + u64::from(k.cache.off)) as usize;
    let mut bad = image.clone();
    bad[at + 100] ^= 1;
    let r = check(&img(&bad), &opts(), false).unwrap();
    assert!(r.is_clean(), "metadata alone is fine: {r}");
    assert_finds(&bad, true, "pcache_cache_key_onmedia", "data_crc");
    let r = check(&img(&bad), &opts(), true).unwrap();
    // Sectors 8..16 were overwritten later, so the first write is two keys now,
    // both checked against the CRC of the whole extent.
    assert_eq!(r.data.unwrap().keys_bad, 2, "{r}");
}

#[test]
fn bad_input_is_an_error_never_a_panic() {
    let (image, _) = build(false, false, false);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("tiny", vec![1, 2, 3]),
        ("zeros", vec![0u8; SIZE]),
        (
            "garbage",
            (0..SIZE).map(|i| (i * 7 + i / 13) as u8).collect(),
        ),
        (
            "truncated at the superblock",
            image[..SB_OFF as usize + 10].to_vec(),
        ),
        (
            "truncated to three segments",
            image[..(SEGMENTS_OFF + 3 * SEG) as usize].to_vec(),
        ),
        ("half", image[..SIZE / 2].to_vec()),
    ];
    for (name, b) in cases {
        let e = check(&img(&b), &opts(), true).expect_err(name);
        assert!(
            matches!(e, ToolError::NotPcache(_) | ToolError::Corrupt(_)),
            "{name}: {e:?}"
        );
        assert!(show(&img(&b), &opts()).is_err(), "{name}");
        assert!(dump(&img(&b), &opts()).is_err(), "{name}");
    }
}

#[test]
fn tool_fuzz_body_survives_random_images() {
    // The `tool` fuzz target's body, over mutations of a formatted image and raw bytes.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let n = (next() % 400) as usize;
        let mut data: Vec<u8> = (0..n).map(|_| next() as u8).collect();
        if let Some(first) = data.first_mut() {
            *first = if round % 4 == 0 { 0 } else { 1 };
        }
        pcache_engine::fuzz_bodies::tool(&data);
    }
}

#[test]
fn status_line_parses_and_explains() {
    // The C module's line recorded with the C image.
    let line = "0 2097152 pcache 0 62 62 3 70 1183 0:5664 0:5360 0:0";
    let s = parse_status(line).unwrap();
    assert_eq!((s.start, s.length), (Some(0), Some(2097152)));
    assert_eq!(
        (s.segments_on_device, s.segments, s.used_segments),
        (62, 62, 3)
    );
    assert_eq!((s.gc_percent, s.cache_flags, s.sb_flags), (70, 0x1183, 0));
    assert_eq!(s.key_head, PosReport { seg: 0, off: 5664 });
    assert_eq!(s.dirty_tail, PosReport { seg: 0, off: 5360 });
    assert_eq!(s.key_tail, PosReport { seg: 0, off: 0 });
    let e = explain("pc", line, s.clone());
    assert!(e.data_crc && e.init_done && !e.clean);
    assert_eq!(e.cache_mode, "writeback");
    assert_eq!((e.dirty_log_bytes, e.log_bytes), (Some(304), Some(5664)));
    let text = e.to_string();
    assert!(text.contains("3 of 62 used (4.8%)"), "{text}");
    // This module's target name.
    assert_eq!(
        parse_status("0 2097152 pcache_rs 0 62 62 3 70 1183 0:5664 0:5360 0:0").unwrap(),
        s
    );
    // Only the fields, as `dmsetup status` prints them after the target name.
    assert_eq!(
        parse_status("0 62 62 3 70 1183 0:5664 0:5360 0:0").unwrap(),
        DmStatus {
            start: None,
            length: None,
            ..s.clone()
        }
    );
    // This module's line, with its statistics after upstream's fields.
    let ours =
        "0 2097152 pcache_rs 0 62 62 3 70 1183 0:5664 0:5360 0:0 11 7 3 2 5 4096 8192 1 0 0 0 65536";
    let r = parse_status(ours).unwrap();
    assert_eq!(
        DmStatus {
            stats: Vec::new(),
            ..r.clone()
        },
        s
    );
    let names: Vec<&str> = r.stats.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, pcache_engine::cache_core::STATUS_STATS);
    assert_eq!(
        (
            r.stat("read_hits"),
            r.stat("dirty_bytes"),
            r.stat("gc_ksets")
        ),
        (Some(7), Some(4096), Some(1))
    );
    let text = explain("pc", ours, r).to_string();
    assert!(
        text.contains("reads: 7 hits, 3 misses (70.0% hits)"),
        "{text}"
    );
    assert!(text.contains("dirty data: 4096 bytes"), "{text}");
    // A newer module may append more: they parse, named by position.
    let newer =
        parse_status("0 62 62 3 70 1183 0:5664 0:5360 0:0 12 0 0 0 0 0 0 0 0 0 0 0 9").unwrap();
    assert_eq!(newer.stat("field_11"), Some(9));
    for bad in [
        "",
        "0 2097152 pcache 0 62 62 3 70 1183 0:5664 0:5360 0:0 10 1 2 3",
        "0 2097152 pcache 0 62 62 3 70 1183 0:5664 0:5360 0:0 2 1 x",
        "0 2097152 linear 8:0 0",
        "0 2097152 pcache 0 62 62 3 70 1183 0:5664 0:5360",
        "0 2097152 pcache 0 62 62 3 70 1183 0:5664 0:5360 0:0 extra",
        "0 2097152 pcache 0 62 62 x 70 1183 0:5664 0:5360 0:0",
        "0 2097152 pcache 0 62 62 3 70 1183 05664 0:5360 0:0",
        "0 2097152 pcache 0 62 62 3 70 zz 0:5664 0:5360 0:0",
        "x 2097152 pcache 0 62 62 3 70 1183 0:5664 0:5360 0:0",
        "pcache 0 62 62 3 70 1183 0:5664 0:5360 0:0",
    ] {
        assert!(parse_status(bad).is_err(), "{bad:?} parsed");
    }
}

// ---- the binary, end to end ----

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pcache-rs-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    /// `PCACHE_TOOL_KEEP=1` keeps the images (to look at them with the tool).
    fn drop(&mut self) {
        if std::env::var_os("PCACHE_TOOL_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {}", self.0.display());
        }
    }
}

fn run_bin(args: &[&str], cache: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcache-rs"))
        .args(args)
        .arg(cache)
        .args(extra)
        .args(["--seg-size", &SEG.to_string()])
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// The backing model as a file of its full size.
fn backing_file(dir: &TempDir, b: &BackingModel) -> PathBuf {
    let mut bytes = vec![0u8; BACKING as usize];
    for s in 0..BACKING / 512 {
        let d = b.read_sector(s);
        if d.iter().any(|&x| x != 0) {
            bytes[(s * 512) as usize..(s * 512 + 512) as usize].copy_from_slice(&d);
        }
    }
    dir.file("backing.img", &bytes)
}

#[test]
fn binary_exit_codes_and_json_shape() {
    let dir = TempDir::new("bin");
    let (clean, backing) = build(false, true, false);
    let (dirty, _) = build(true, true, false);
    let clean_p = dir.file("clean.img", &clean);
    let dirty_p = dir.file("dirty.img", &dirty);
    let back_p = backing_file(&dir, &backing);
    let back = back_p.to_str().unwrap();

    let o = run_bin(&["--json", "show"], &clean_p, &["--backing", back]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let j = json(&o);
    for k in [
        "geometry",
        "superblock",
        "cache_info",
        "key_tail",
        "dirty_tail",
        "key_head",
        "used_segments",
        "segment_list",
        "keys",
        "ranges",
        "cached_bytes",
        "dirty_bytes",
    ] {
        assert!(j.get(k).is_some(), "show --json lacks {k}: {j}");
    }
    assert_eq!(j["superblock"]["magic"], "0x65b05efa96c596ef");
    assert_eq!(j["cache_info"]["slots"].as_array().unwrap().len(), 2);
    assert_eq!(j["geometry"]["backing_bytes"], BACKING);

    let o = run_bin(&["check", "--json", "--data"], &dirty_p, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let j = json(&o);
    assert_eq!(j["errors"], 0);
    assert!(j["data"]["keys_ok"].as_u64().unwrap() > 0);

    let o = run_bin(&["dump", "--json"], &dirty_p, &[]);
    let j = json(&o);
    let keys = j["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    for k in [
        "kset", "index", "off", "len", "flags", "cache", "gen", "data_crc", "state",
    ] {
        assert!(keys[0].get(k).is_some(), "dump key lacks {k}: {}", keys[0]);
    }
    assert_eq!(keys[0]["state"], "dirty");
    let o = run_bin(&["dump"], &dirty_p, &[]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.lines().nth(1).unwrap().contains("kset"), "{t}");

    // Damage: exit 4 with the structure named, in text and JSON.
    let mut bad = clean.clone();
    let at = geo().seg_data_off(0) as usize;
    bad[at + 30] ^= 1;
    let bad_p = dir.file("bad.img", &bad);
    let o = run_bin(&["check"], &bad_p, &[]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("error: pcache_cache_kset_onmedia.crc at log position 0:0"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = run_bin(&["check", "--json"], &bad_p, &[]);
    assert_eq!(o.status.code(), Some(4));
    assert!(json(&o)["errors"].as_u64().unwrap() > 0);
    let o = run_bin(&["show"], &bad_p, &[]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));

    // Not pcache, empty, missing, usage.
    let zero_p = dir.file("zero.img", &[]);
    let o = run_bin(&["check"], &zero_p, &[]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("not a pcache device"), "{}", stderr(&o));
    let o = run_bin(&["--json", "show"], &zero_p, &[]);
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(json(&o)["error"], "not_pcache");
    let o = run_bin(&["show"], &dir.0.join("missing.img"), &[]);
    assert_eq!(o.status.code(), Some(8));
    let o = run_bin(&["frobnicate"], &clean_p, &[]);
    assert_eq!(o.status.code(), Some(16));
    let o = run_bin(&["show"], &clean_p, &["--seg-size", "1000"]);
    assert_eq!(o.status.code(), Some(16), "{}", stderr(&o));
}

#[test]
fn binary_writeback_cleans_and_is_idempotent() {
    let dir = TempDir::new("wb");
    let (dirty, backing) = build(true, true, true);
    let cache_p = dir.file("cache.img", &dirty);
    let back_p = backing_file(&dir, &backing);
    let back = back_p.to_str().unwrap();
    // Before: the backing device does not hold the writes.
    let before = fs::read(&back_p).unwrap();
    assert_ne!(&before[..512], &pattern(0, 1)[..]);

    let o = run_bin(&["writeback"], &cache_p, &["--backing", back]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ksets flushed"),
        "progress: {}",
        stderr(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("clean"));
    let after = fs::read(&back_p).unwrap();
    for (s, v) in expected() {
        assert_eq!(
            &after[(s * 512) as usize..(s * 512 + 512) as usize],
            &pattern(s, v)[..],
            "sector {s}"
        );
    }
    for i in 0..64u64 {
        let s = 6144 + i * 8;
        assert_eq!(
            &after[(s * 512) as usize..(s * 512 + 512) as usize],
            &pattern(s, 4)[..]
        );
    }
    let o = run_bin(&["--json", "writeback"], &cache_p, &["--backing", back]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["was_clean"], true);
    assert_eq!(
        fs::read(&back_p).unwrap(),
        after,
        "second run changed the backing device"
    );
    let o = run_bin(&["--json", "show"], &cache_p, &["--backing", back]);
    let j = json(&o);
    assert_eq!(j["dirty_bytes"], 0);
    assert_eq!(j["clean"], true);
    let o = run_bin(&["check", "--data"], &cache_p, &["--backing", back]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

// ---- the C module's image ----

/// The fsdax namespace of the 1 GiB NVDIMM (c-pcache-1g.txt).
const C_DEV_BYTES: u64 = 1_054_867_456;
const C_BACKING_BYTES: u64 = 1 << 30;

/// Decompress the C image into a sparse file.
fn c_image_file(dir: &TempDir) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/c-pcache-1g.img.zst");
    let dst = dir.0.join("c.img");
    let st = Command::new("zstd")
        .args(["-q", "-d", "-f", "--sparse"])
        .arg(&src)
        .arg("-o")
        .arg(&dst)
        .stdin(Stdio::null())
        .status()
        .expect("the zstd command is needed to decompress the C image");
    assert!(st.success());
    assert_eq!(fs::metadata(&dst).unwrap().len(), C_DEV_BYTES);
    dst
}

fn c_run(args: &[&str], cache: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcache-rs"))
        .args(args)
        .arg(cache)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn c_image_shows_checks_and_writes_back() {
    let dir = TempDir::new("c");
    let cache = c_image_file(&dir);
    let back = dir.0.join("backing.img");
    fs::File::create(&back)
        .unwrap()
        .set_len(C_BACKING_BYTES)
        .unwrap();
    let back_s = back.to_str().unwrap();

    let o = c_run(&["check", "--data"], &cache, &["--backing", back_s]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = c_run(&["--json", "show"], &cache, &["--backing", back_s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let j = json(&o);
    assert_eq!(j["segments"], 62);
    assert_eq!(j["keys"], 64 + 32 + 16 + 11 + 7);
    assert_eq!(j["cache_info"]["flags"], "0x1183");

    // The C module had written everything back before the image was taken (its
    // dirty tail is at the key head), and the backing device is not in the
    // image. Rewind the dirty tail to the key tail, as it was before that
    // writeback: a new dirty_tail_pos copy in the other slot, seq + 1.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cache)
        .unwrap();
    let mut ctrl = [0u8; 4 * CACHE_POS_STRUCT_SIZE];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut ctrl, CtrlPos::KeyTail.slot_off(0))
        .unwrap();
    let slot = |w: CtrlPos, i: usize| {
        let o = (w.slot_off(i) - CtrlPos::KeyTail.slot_off(0)) as usize;
        ctrl[o..o + CACHE_POS_STRUCT_SIZE].to_vec()
    };
    let (ki, kt) = pcache_engine::meta::header::pick_latest::<CachePosOnmedia>(
        &slot(CtrlPos::KeyTail, 0),
        &slot(CtrlPos::KeyTail, 1),
    )
    .unwrap()
    .unwrap();
    let _ = ki;
    let (di, dt) = pcache_engine::meta::header::pick_latest::<CachePosOnmedia>(
        &slot(CtrlPos::DirtyTail, 0),
        &slot(CtrlPos::DirtyTail, 1),
    )
    .unwrap()
    .unwrap();
    let rewound = CachePosOnmedia {
        header: MetaHeader {
            seq: dt.header.seq.wrapping_add(1),
            ..MetaHeader::default()
        },
        cache_seg_id: kt.cache_seg_id,
        seg_off: kt.seg_off,
    };
    let mut b = [0u8; CACHE_POS_STRUCT_SIZE];
    rewound.encode_with_crc(&mut b);
    f.write_all_at(&b, CtrlPos::DirtyTail.slot_off(di.other().get()))
        .unwrap();
    drop(f);
    let o = c_run(&["--json", "show"], &cache, &["--backing", back_s]);
    let j = json(&o);
    assert_eq!(j["clean"], false, "{j}");
    assert!(j["dirty_bytes"].as_u64().unwrap() > 0);

    let o = c_run(&["writeback"], &cache, &["--backing", back_s]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));

    // The backing device alone holds every written sector, last write winning.
    let want = c_image_writes::expected();
    let bf = fs::File::open(&back).unwrap();
    let sector = |s: u64| {
        let mut b = [0u8; 512];
        bf.read_exact_at(&mut b, s * 512).unwrap();
        b
    };
    for (&s, &g) in &want {
        assert_eq!(sector(s), c_image_writes::pattern(s, g), "sector {s}");
    }
    // Nothing next to the written ranges.
    for (s, n, _) in c_image_writes::WRITES {
        for k in [s.wrapping_sub(1), s + n] {
            if k < C_BACKING_BYTES / 512 && !want.contains_key(&k) {
                assert_eq!(sector(k), [0u8; 512], "sector {k}");
            }
        }
    }
    let o = c_run(&["--json", "writeback"], &cache, &["--backing", back_s]);
    assert_eq!(json(&o)["was_clean"], true);
    let o = c_run(&["check", "--data"], &cache, &["--backing", back_s]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn binary_status_explains_dmsetup_output() {
    // A stand-in `dmsetup` first on PATH prints the C module's recorded line.
    let dir = TempDir::new("status");
    let script = dir.file(
        "dmsetup",
        b"#!/bin/sh\n[ \"$1\" = status ] && [ \"$2\" = pc ] || { echo \"Device does not exist.\" >&2; exit 1; }\necho '0 2097152 pcache_rs 0 62 62 3 70 1183 0:5664 0:5360 0:0'\n",
    );
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.0.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pcache-rs"))
            .args(args)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let o = run(&["status", "pc"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    eprintln!("{t}");
    assert!(t.contains("3 of 62 used (4.8%)"), "{t}");
    assert!(t.contains("data_crc on"), "{t}");
    assert!(t.contains("304 of 5664 log bytes"), "{t}");
    let o = run(&["status", "--json", "pc"]);
    let j = json(&o);
    assert_eq!(j["used_segments"], 3);
    assert_eq!(j["key_head"]["off"], 5664);
    assert_eq!(j["cache_mode"], "writeback");
    assert_eq!(j["clean"], false);
    let o = run(&["status", "other"]);
    assert_eq!(o.status.code(), Some(8));
}

#[test]
fn metadata_bit_flips_never_panic_and_check_sees_them() {
    // Flip bytes where metadata lives (superblock, cache_info, ctrl, segment
    // headers, the first ksets of each segment); show/check/dump must return,
    // and check must not call an image clean whose replay the engine refuses.
    let (image, _) = build(true, true, true);
    let g = geo();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..600 {
        let mut bad = image.clone();
        for _ in 0..1 + next() % 3 {
            let off = match next() % 3 {
                0 => SB_OFF + next() % (SEGMENTS_OFF - SB_OFF),
                1 => g.seg_off((next() % SEGS) as u32) + next() % (3 * 4096),
                _ => g.seg_data_off((next() % SEGS) as u32) + next() % 2048,
            } as usize;
            bad[off] ^= 1 << (next() % 8);
        }
        let i = img(&bad);
        let _ = show(&i, &opts()).map(|r| r.to_string());
        let _ = dump(&i, &opts()).map(|r| r.to_string());
        if let Ok(r) = check(&i, &opts(), true) {
            if r.is_clean() {
                assert!(
                    r.live_keys.is_some(),
                    "round {round}: clean but not attachable: {r}"
                );
            }
        }
    }
}
