//! Bodies of the `cargo fuzz` targets (see `fuzz/`), kept here so the host tests
//! also run them over random inputs without libFuzzer.

use crate::cache_core::options::{parse_message, parse_table_options};
use crate::cache_core::{Cache, CacheOptions};
use crate::meta::kset::kset_read;
use crate::meta::layout::{Geometry, SEGMENTS_OFF};
use crate::sim::{BackingModel, OwnedMem, SimBacking, SimPmem, World};
use std::collections::HashMap;

const SEG: u64 = 64 * 1024;
const SEGS: u64 = 8;
const BACKING: u64 = 8 << 20;

/// The table/message parsers over arbitrary words: never panic.
pub fn parsers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let words: Vec<&str> = text.split_whitespace().collect();
    let _ = parse_table_options(&words);
    let _ = parse_message(&words);
}

/// The kset parser over arbitrary bytes.
pub fn kset(data: &[u8]) {
    let n = data.first().copied().unwrap_or(0) as u32;
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

fn formatted(geo: Geometry, size: usize) -> Vec<u8> {
    let world = World::untracked(vec![0u8; size], BackingModel::new(BACKING, HashMap::new()));
    let mut mem = OwnedMem::new(SEGS as usize, 1024, BACKING, 2, 1);
    if let Ok(mut c) = Cache::start(
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
