//! Writes through to the backing device in flight, as the module runs them in
//! writethrough and writearound mode: started in the engine
//! ([`Cache::through_start`]), applied by the device whenever it likes and in
//! any order, completed later ([`Cache::through_done`]); beside them, reads
//! whose gaps are read from the device at one moment and filled at another,
//! writes served synchronously, and discards, all interleaved by a seeded
//! scheduler. A completion or a fill copies its data into reserved room at one
//! step ([`Cache::fill_start`], [`fill_copy`]), as the module does outside the
//! engine, and commits it at the same step or a later one
//! ([`Cache::fill_end`]).
//!
//! The property, checked after every step: every byte the cache holds is the
//! byte the backing device holds now. (A write in flight may be on the device
//! or not, so a read of its range may bring back either; caching either could
//! make the range read one way now and the other once the key is gone.)

use pcache_engine::cache_core::fill::{fill_copy, Fill};
use pcache_engine::cache_core::io::{Gap, Hit};
use pcache_engine::cache_core::{Backing, Cache, CacheError, CacheOptions};
use pcache_engine::host_mem::Borrowed;
use pcache_engine::meta::cache_info::{CACHE_MODE_WRITEAROUND, CACHE_MODE_WRITETHROUGH};
use pcache_engine::meta::layout::Geometry;
use pcache_engine::sim::{OwnedMem, Rng, SimBacking, SimPmem, World};

const SEG: u64 = 64 * 1024;
const N_SEGS: u64 = 8;
const BACKING: u64 = 1 << 20;
/// The writes and reads go to the first 64 KiB, so that they overlap often.
const SPAN: u64 = 64 * 1024;

type Engine<'a> = Cache<SimPmem, SimBacking, Borrowed<'a>>;

/// A write through in flight.
struct Out {
    gap: Gap,
    data: Vec<u8>,
    applied: bool,
}

/// A read whose gaps are out: each is read from the device (`data` set) at
/// one step and filled at a later one.
struct ReadGap {
    gap: Gap,
    data: Option<Vec<u8>>,
}

/// Caches what the device returned or took for `gap`: copied now, committed
/// now (`now`) or left in `fills` for a later step; whether it was left.
fn fill(c: &mut Engine<'_>, gap: &Gap, data: &[u8], now: bool, fills: &mut Vec<Fill>) -> bool {
    let mut f = c.fill_start(gap, 0);
    if !f.is_open() {
        return false;
    }
    fill_copy(c.pmem_mut(), &mut f, data);
    if now {
        c.fill_end(f);
        return false;
    }
    fills.push(f);
    true
}

fn span_io(rng: &mut Rng) -> (u64, usize) {
    let len = 512 * (1 + rng.below(16)) as usize;
    let off = rng.below((SPAN - len as u64) / 512) * 512;
    (off, len)
}

/// The cache holds nothing the backing device does not: a read that caches
/// nothing returns the device's bytes.
fn check_coherent(c: &mut Engine<'_>, step: usize) -> Result<(), String> {
    let mut through = vec![0u8; SPAN as usize];
    c.read(0, &mut through, false, 0)
        .map_err(|e| format!("step {step}: read: {e}"))?;
    let mut device = vec![0u8; SPAN as usize];
    c.backing_mut()
        .read(0, &mut device)
        .map_err(|_| format!("step {step}: backing read failed"))?;
    if let Some(i) = (0..through.len()).find(|&i| through[i] != device[i]) {
        return Err(format!(
            "step {step}: the cache holds {:#x} at byte {i}, the backing device {:#x}",
            through[i], device[i]
        ));
    }
    Ok(())
}

/// One seeded run; how many writes through completed with their data, and
/// how many parts of fills ended at a later step than they were copied.
fn run(seed: u64, mode: u32) -> Result<(usize, usize), String> {
    let mut rng = Rng(seed);
    let world = World::blank(N_SEGS, SEG, BACKING);
    let mut mem = OwnedMem::new(
        N_SEGS as usize,
        512 + rng.below(1024) as usize,
        BACKING,
        2,
        2,
    );
    let opts = CacheOptions {
        cache_mode: mode,
        data_crc: rng.chance(1, 2),
    };
    let mut c = Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        Geometry::small(SEG).map_err(|e| e.to_string())?,
        mem.borrow(),
        &opts,
    )
    .map_err(|e| format!("start: {e}"))?;
    let mut out: Vec<Out> = Vec::new();
    let mut reads: Vec<ReadGap> = Vec::new();
    let mut fills: Vec<Fill> = Vec::new();
    let mut completed = 0usize;
    // Parts of fills committed (or given back) at a later step than their copy.
    let mut late = 0usize;
    let mut value = 1u8;
    for step in 0..1500 {
        value = value.wrapping_add(1).max(1);
        match rng.below(22) {
            0..=4 => {
                let (off, len) = span_io(&mut rng);
                let data = vec![value; len];
                match c.through_start(off, len) {
                    Ok(gap) => out.push(Out {
                        gap,
                        data,
                        applied: false,
                    }),
                    // The module serves it synchronously then.
                    Err(CacheError::Busy(_)) => c
                        .write(off, &data, false, 0)
                        .map_err(|e| format!("step {step}: write: {e}"))?,
                    Err(e) => return Err(format!("step {step}: through_start: {e}")),
                }
            }
            5..=7 if !out.is_empty() => {
                // The device applies one of the writes in flight, in any order.
                let i = rng.below(out.len() as u64) as usize;
                let o = &mut out[i];
                if !o.applied {
                    c.backing_mut()
                        .write(o.gap.off, &o.data)
                        .map_err(|_| format!("step {step}: backing write failed"))?;
                    o.applied = true;
                }
            }
            8..=9 if !out.is_empty() => {
                // One completes: applied, or failed (and not applied).
                let i = rng.below(out.len() as u64) as usize;
                let o = out.swap_remove(i);
                if o.applied {
                    let before = c.in_flight_len();
                    let left = fill(&mut c, &o.gap, &o.data, rng.chance(1, 2), &mut fills);
                    if c.in_flight_len() + 1 != before + usize::from(left) {
                        return Err(format!("step {step}: completion left the write in flight"));
                    }
                    completed += 1;
                } else {
                    c.through_failed(&o.gap);
                }
            }
            10..=12 => {
                let (off, len) = span_io(&mut rng);
                let mut buf = vec![0u8; len];
                let mut gaps = [Gap::default(); 8];
                let mut hits: [Hit; 0] = [];
                match c
                    .read_start(off, &mut buf[..], &mut gaps, &mut hits)
                    .map_err(|e| format!("step {step}: read_start: {e}"))?
                {
                    Some(s) => reads.extend(gaps[..s.gaps].iter().map(|g| ReadGap {
                        gap: Gap { at: 0, ..*g },
                        data: None,
                    })),
                    None => {
                        c.read(off, &mut buf, true, 0)
                            .map_err(|e| format!("step {step}: read: {e}"))?;
                    }
                }
            }
            13..=14 if !reads.is_empty() => {
                // A gap is read from the device: what it holds now.
                let i = rng.below(reads.len() as u64) as usize;
                let r = &mut reads[i];
                if r.data.is_none() {
                    let mut d = vec![0u8; r.gap.len];
                    c.backing_mut()
                        .read(r.gap.off, &mut d)
                        .map_err(|_| format!("step {step}: backing read failed"))?;
                    r.data = Some(d);
                }
            }
            15..=16 if !reads.is_empty() => {
                let i = rng.below(reads.len() as u64) as usize;
                if reads[i].data.is_some() {
                    let r = reads.swap_remove(i);
                    if let Some(d) = r.data {
                        fill(&mut c, &r.gap, &d, rng.chance(1, 2), &mut fills);
                    }
                }
            }
            17 => {
                let (off, len) = span_io(&mut rng);
                c.write(off, &vec![value; len], false, 0)
                    .map_err(|e| format!("step {step}: write: {e}"))?;
            }
            18 => {
                let (off, len) = span_io(&mut rng);
                // The module drops the cached range, then passes the discard on;
                // here the device zeroes it.
                c.discard(off, len as u64)
                    .map_err(|e| format!("step {step}: discard: {e}"))?;
                c.backing_mut()
                    .write(off, &vec![0u8; len])
                    .map_err(|_| format!("step {step}: backing write failed"))?;
            }
            19..=20 if !fills.is_empty() => {
                let i = rng.below(fills.len() as u64) as usize;
                let f = fills.swap_remove(i);
                late += f.parts();
                c.fill_end(f);
            }
            _ => {
                let _ = c.gc_step();
            }
        }
        check_coherent(&mut c, step)?;
        c.check_invariants()
            .map_err(|b| format!("step {step}: invariant broken: {}", b.0))?;
    }
    // Everything lands and completes, every read fills.
    for f in fills.drain(..) {
        c.fill_end(f);
    }
    for mut o in out.drain(..) {
        if !o.applied {
            c.backing_mut()
                .write(o.gap.off, &o.data)
                .map_err(|_| "backing write failed".to_string())?;
            o.applied = true;
        }
        c.through_done(&o.gap, Some(&o.data[..]), 0);
    }
    for r in reads.drain(..) {
        let mut d = vec![0u8; r.gap.len];
        c.backing_mut()
            .read(r.gap.off, &mut d)
            .map_err(|_| "backing read failed".to_string())?;
        c.read_fill(&r.gap, &d[..], 0);
    }
    check_coherent(&mut c, usize::MAX)?;
    if c.in_flight_len() != 0 {
        return Err("writes still in flight after they all completed".into());
    }
    Ok((completed, late))
}

fn seeds(default: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    match std::env::var("PCACHE_SEED") {
        Ok(s) => s.parse().map(|n| vec![n]).unwrap_or_default(),
        Err(_) => default.collect(),
    }
}

/// Seeds 1..=100 in each mode that writes through; `PCACHE_SEED=<n>` runs one.
#[test]
fn writes_through_in_flight_keep_the_cache_coherent() {
    for mode in [CACHE_MODE_WRITETHROUGH, CACHE_MODE_WRITEAROUND] {
        let (mut total, mut late) = (0, 0);
        for seed in seeds(1..=100) {
            match run(seed, mode) {
                Ok((n, l)) => {
                    total += n;
                    late += l;
                }
                Err(e) => panic!("mode {mode} seed {seed}: {e}"),
            }
        }
        assert!(total > 0, "mode {mode}: no write through completed");
        assert!(
            late > 0,
            "mode {mode}: no fill was committed at a later step"
        );
    }
}
