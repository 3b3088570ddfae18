//! Micro-benchmarks of the hot path: ns per index insert (with overlap), per
//! lookup, and per kset encode/decode. `cargo bench` (criterion-style output
//! without the dependency: median of several timed batches).

use pcache_engine::cache_core::index::{Index, Node};
use pcache_engine::cache_core::key::{Key, Pos};
use pcache_engine::cache_core::KsetBuf;
use pcache_engine::meta::kset::{kset_key, kset_read, KeyOnmedia, KSET_KEYS_MAX};
use std::hint::black_box;
use std::time::Instant;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
}

/// Median ns per iteration over `batches` runs of `iters` iterations.
fn bench(name: &str, iters: u64, batches: usize, mut f: impl FnMut(u64)) {
    let mut samples = Vec::with_capacity(batches);
    for b in 0..batches {
        let t = Instant::now();
        for i in 0..iters {
            f(b as u64 * iters + i);
        }
        samples.push(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = samples[samples.len() / 2];
    println!(
        "{name:<40} time: [{:.1} ns {:.1} ns {:.1} ns]",
        samples[0],
        med,
        samples[samples.len() - 1]
    );
}

fn key(off: u64, len: u32) -> Key {
    Key {
        off,
        len,
        flags: 0,
        pos: Pos { seg: 1, off: 0 },
        gen: 0,
        crc: 0,
        crc_back: 0,
        crc_len: len,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // 64 MiB of logical space (16 subtrees), 4 KiB-aligned keys of 4-64 KiB.
    let span: u64 = 64 << 20;
    let mut nodes = vec![Node::default(); 1 << 16];
    let mut roots = vec![0u32; 16];
    let mut idx = Index::new(&mut nodes, &mut roots);
    let mut rng = Lcg(1);
    // Warm the index to a steady state of a few thousand keys.
    for _ in 0..50_000 {
        let len = 4096 * (1 + rng.next() % 16) as u32;
        let off = (rng.next() % (span / 4096)) * 4096;
        let off = off.min(span - u64::from(len));
        if (off >> 22) != ((off + u64::from(len) - 1) >> 22) {
            continue;
        }
        let _ = idx.insert(key(off, len), |_| {});
    }
    println!("index holds {} keys", idx.len());
    bench("index insert (overlapping, 4-64 KiB)", 20_000, 15, |_| {
        let len = 4096 * (1 + rng.next() % 16) as u32;
        let off = ((rng.next() % (span / 4096)) * 4096).min(span - u64::from(len));
        let off = if (off >> 22) != ((off + u64::from(len) - 1) >> 22) {
            off & !((4 << 20) - 1)
        } else {
            off
        };
        let _ = black_box(idx.insert(key(off, len), |_| {}));
    });
    bench("index lookup (first overlap)", 100_000, 15, |_| {
        let off = rng.next() % span;
        black_box(idx.first_overlap((off >> 22) as usize, off, off + 4096));
    });

    let mut kset = KsetBuf::default();
    let om = KeyOnmedia {
        off: 123 << 12,
        len: 4096,
        flags: 0,
        cache_seg_id: 3,
        cache_seg_off: 8192,
        seg_gen: 7,
        data_crc: 0xABCD,
        reserved: 0,
    };
    bench("kset encode (128 keys + crc), per kset", 2_000, 15, |i| {
        kset.reset();
        for k in 0..KSET_KEYS_MAX as u64 {
            let mut o = om;
            o.off = (i + k) << 12;
            kset.push(&o);
        }
        black_box(kset.seal().map(|b| b.len()).unwrap_or(0));
    });
    kset.reset();
    for k in 0..KSET_KEYS_MAX as u64 {
        let mut o = om;
        o.off = k << 12;
        kset.push(&o);
    }
    let bytes = kset.seal().unwrap().to_vec();
    bench(
        "kset decode (crc check + 128 keys), per kset",
        2_000,
        15,
        |_| {
            let r = kset_read(black_box(&bytes), 64).unwrap();
            let mut sum = 0u64;
            if let pcache_engine::meta::kset::KsetRead::Keys { key_num, .. } = r {
                for i in 0..key_num as usize {
                    sum += kset_key(&bytes, i).unwrap().off;
                }
            }
            black_box(sum);
        },
    );
}
