//! Bodies of the `cargo fuzz` targets (see `fuzz/`), kept here so the host tests
//! also run them over random inputs without libFuzzer.

use crate::cache_core::{Cache, CacheOptions};
use crate::meta::kset::kset_read;
use crate::meta::layout::{Geometry, SEGMENTS_OFF};
use crate::sim::{BackingModel, OwnedMem, SimBacking, SimPmem, World};
use crate::table::{parse_message, parse_table, write_table, MAX_ARGS};
use std::collections::HashMap;

const SEG: u64 = 64 * 1024;
const SEGS: u64 = 8;
const BACKING: u64 = 8 << 20;

/// `target/table.rs` over arbitrary words: never panics, and a table line it
/// accepts is written back by `write_table` as a line that parses to the same
/// devices and options (so `dmsetup table` output loads back unchanged).
pub fn parsers(data: &[u8]) {
    let words: Vec<&[u8]> = data
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    let _ = parse_message(&words);
    // The target hands at most MAX_ARGS words to the parser (more are an error there).
    let Some(args) = words.get(..words.len().min(MAX_ARGS)) else {
        return;
    };
    let Ok(line) = parse_table(args) else {
        return;
    };
    let (Ok(cache_dev), Ok(backing_dev)) = (
        std::str::from_utf8(line.cache_dev),
        std::str::from_utf8(line.backing_dev),
    ) else {
        return;
    };
    let mut out = String::new();
    write_table(&mut out, cache_dev, backing_dev, &line.options).expect("write_table");
    let words2: Vec<&[u8]> = out.split_ascii_whitespace().map(str::as_bytes).collect();
    let back = parse_table(&words2)
        .unwrap_or_else(|e| panic!("write_table output {out:?} does not parse: {e:?}"));
    assert_eq!(back, line, "write_table output {out:?} parses differently");
}

/// The kset parser over arbitrary bytes.
pub fn kset(data: &[u8]) {
    let n = u32::from(data.first().copied().unwrap_or(0));
    let _ = kset_read(data.get(1..).unwrap_or(&[]), n);
}

/// Attach over an arbitrary image. The input is laid over a freshly formatted
/// cache (as `(offset, bytes)` patches), so the fuzzer reaches replay instead of
/// stopping at the superblock; then some IO runs on whatever replay accepted.
pub fn replay(data: &[u8]) {
    let geo = match Geometry::small(SEG) {
        Ok(g) => g,
        Err(_) => return,
    };
    let size = (SEGMENTS_OFF + SEGS * SEG) as usize;
    let mut img = formatted(geo, size);
    let mut rest = data;
    while rest.len() >= 4 {
        let off = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize % size;
        let len = (rest.get(4).copied().unwrap_or(0) as usize).min(rest.len().saturating_sub(5));
        let bytes = rest.get(5..5 + len).unwrap_or(&[]);
        let end = (off + bytes.len()).min(size);
        img[off..end].copy_from_slice(&bytes[..end - off]);
        rest = rest.get(5 + len..).unwrap_or(&[]);
    }
    let world = World::untracked(img, BackingModel::new(BACKING, HashMap::new()));
    let mut mem = OwnedMem::new(SEGS as usize, 1024, BACKING, 2, 1);
    for data_crc in [false, true] {
        let opts = CacheOptions {
            data_crc,
            ..Default::default()
        };
        if let Ok(mut c) = Cache::start(
            SimPmem(world.clone()),
            SimBacking(world.clone()),
            geo,
            mem.borrow(),
            &opts,
        ) {
            let mut buf = vec![0u8; 8192];
            let _ = c.read(0, &mut buf, true, 0);
            let _ = c.writeback_all();
            let _ = c.gc_all();
            let _ = c.write(4096, &buf, true, 0);
            let _ = c.read(0, &mut buf, false, 0);
            return;
        }
    }
}

/// `pcache-rs show` and `check --data` over an arbitrary image: never panic.
/// The first byte picks the raw input as the image (any length, any bytes) or,
/// like [`replay`], patches laid over a formatted cache, so the fuzzer reaches
/// the slot, chain and log checks.
pub fn tool(data: &[u8]) {
    use crate::tool::{check::check, device::Image, dump::dump, show::show, Options};
    let geo = match Geometry::small(SEG) {
        Ok(g) => g,
        Err(_) => return,
    };
    let opts = Options {
        geo,
        backing_bytes: BACKING,
    };
    let img = match data.split_first() {
        Some((0, raw)) => raw.to_vec(),
        Some((_, patches)) => {
            let size = (SEGMENTS_OFF + SEGS * SEG) as usize;
            let mut img = formatted(geo, size);
            let mut rest = patches;
            while rest.len() >= 4 {
                let off = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize % size;
                let len =
                    (rest.get(4).copied().unwrap_or(0) as usize).min(rest.len().saturating_sub(5));
                let bytes = rest.get(5..5 + len).unwrap_or(&[]);
                let end = (off + bytes.len()).min(size);
                img[off..end].copy_from_slice(&bytes[..end - off]);
                rest = rest.get(5 + len..).unwrap_or(&[]);
            }
            img
        }
        None => Vec::new(),
    };
    let image = Image::from_bytes(img);
    let _ = show(&image, &opts).map(|r| r.to_string());
    let _ = check(&image, &opts, true).map(|r| r.to_string());
    let _ = dump(&image, &opts).map(|r| r.to_string());
}

/// A small formatted cache holding a few keys (the fuzzers' starting image).
pub fn formatted(geo: Geometry, size: usize) -> Vec<u8> {
    let world = World::untracked(vec![0u8; size], BackingModel::new(BACKING, HashMap::new()));
    let mut mem = OwnedMem::new(SEGS as usize, 1024, BACKING, 2, 1);
    if let Ok(c) = Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        geo,
        mem.borrow(),
        &CacheOptions::default(),
    ) {
        let buf = vec![0x5Au8; 16384];
        let _ = c.write(0, &buf, true, 0);
        let _ = c.write(1 << 20, &buf, false, 0);
        let _ = c.flush();
    }
    let w = world.borrow();
    w.pmem.volatile.clone()
}
