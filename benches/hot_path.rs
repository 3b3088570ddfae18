//! Micro-benchmarks of the hot path: ns per index insert (with overlap), per
//! lookup, per kset encode/decode, and per 4 KiB `Cache::write` / `Cache::read`
//! over RAM-backed devices (upstream 16 MiB segments), with the number of pmem
//! fences per request. `cargo bench` (criterion-style output without the
//! dependency: median of several timed batches).

use pcache_engine::cache_core::index::{Index, Node, Root};
use pcache_engine::cache_core::key::{Key, Pos, SegId};
use pcache_engine::cache_core::{Backing, Cache, CacheError, CacheOptions, IoError, KsetBuf, Pmem};
use pcache_engine::host_mem::{Borrowed, SpinLocks};
use pcache_engine::meta::kset::{kset_key, kset_read, KeyOnmedia, KSET_KEYS_MAX};
use pcache_engine::meta::layout::Geometry;
use pcache_engine::sim::OwnedMem;
use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::sync::atomic::AtomicBool;
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
        pos: Pos {
            seg: SegId::checked(1, 2).unwrap_or_default(),
            off: 0,
        },
        gen: 0,
        crc: 0,
        crc_back: 0,
        crc_len: len,
    }
}

/// Pmem in RAM: `write` is the copy (`memcpy_flushcache` in the kernel, so
/// `flush` is free) and `fence` a real store fence (`pmem_wmb`).
/// Cells: the engine's device handle is shared (`&self`); this bench runs one
/// thread.
struct RamPmem {
    mem: RefCell<Vec<u8>>,
    fences: Cell<u64>,
}

impl Pmem for RamPmem {
    fn size(&self) -> u64 {
        self.mem.borrow().len() as u64
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let off = off as usize;
        buf.copy_from_slice(self.mem.borrow().get(off..off + buf.len()).ok_or(IoError)?);
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8]) {
        let off = off as usize;
        self.mem.borrow_mut()[off..off + data.len()].copy_from_slice(data);
    }
    fn flush(&self, _off: u64, _len: u64) {}
    fn fence(&self) {
        self.fences.set(self.fences.get() + 1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// A backing device in RAM.
struct RamBacking(RefCell<Vec<u8>>);

impl Backing for RamBacking {
    fn size(&self) -> u64 {
        self.0.borrow().len() as u64
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let off = off as usize;
        buf.copy_from_slice(self.0.borrow().get(off..off + buf.len()).ok_or(IoError)?);
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        let off = off as usize;
        self.0
            .borrow_mut()
            .get_mut(off..off + data.len())
            .ok_or(IoError)?
            .copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
}

/// 4 KiB requests through the whole engine: random writes over a 64 MiB working
/// set into a 512 MiB cache, then reads of the same set (hits).
fn bench_requests(data_crc: bool) {
    const PMEM: usize = 512 << 20;
    const BACKING: usize = 256 << 20;
    const SPAN: u64 = 64 << 20;
    let geo = Geometry::UPSTREAM;
    let segs = geo.max_segs(PMEM as u64) as usize;
    let mut mem = OwnedMem::new(segs, 1 << 18, BACKING as u64, 4, 1);
    mem.bounce = vec![0u8; 256 << 10];
    // Touch every page up front: first-touch faults are not the engine's cost.
    let mut ram = vec![0u8; PMEM];
    ram.iter_mut().step_by(4096).for_each(|b| *b = black_box(0));
    let pmem = RamPmem {
        mem: RefCell::new(ram),
        fences: Cell::new(0),
    };
    let opts = CacheOptions {
        data_crc,
        ..Default::default()
    };
    let mut c = Cache::start(
        pmem,
        RamBacking(RefCell::new(vec![0u8; BACKING])),
        geo,
        mem.borrow(),
        &opts,
    )
    .expect("start");
    let crc = if data_crc { "crc" } else { "no crc" };
    let mut rng = Lcg(7);
    let buf = vec![0xA5u8; 4096];
    let mut out = vec![0u8; 4096];
    let fences0 = c.pmem().fences.get();
    let mut writes = 0u64;
    // 9 batches of 10,000 writes fit the cache: no writeback or GC is timed.
    bench(&format!("cache write 4 KiB ({crc})"), 10_000, 9, |_| {
        let off = (rng.next() % (SPAN / 4096)) * 4096;
        loop {
            match c.write(off, &buf, false, 0) {
                Ok(()) => break,
                Err(CacheError::Busy(_)) => {
                    let _ = c.flush();
                    c.writeback_all().expect("writeback");
                    c.gc_all().expect("gc");
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        writes += 1;
    });
    println!(
        "  {:.2} pmem fences per write",
        (c.pmem().fences.get() - fences0) as f64 / writes as f64
    );
    c.flush().expect("flush");
    // Make every offset of the span a hit.
    for off in (0..SPAN).step_by(4096) {
        c.write(off, &buf, false, 0)
            .or_else(|_| {
                c.flush()?;
                c.writeback_all()?;
                c.gc_all()?;
                c.write(off, &buf, false, 0)
            })
            .expect("fill");
    }
    bench(&format!("cache read 4 KiB hit ({crc})"), 20_000, 15, |_| {
        let off = (rng.next() % (SPAN / 4096)) * 4096;
        black_box(c.read(off, &mut out, true, 0).expect("read"));
    });
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    bench_requests(false);
    bench_requests(true);
    // 64 MiB of logical space (16 subtrees), 4 KiB-aligned keys of 4-64 KiB.
    let span: u64 = 64 << 20;
    let mut nodes = vec![Node::default(); 1 << 16];
    let mut roots = vec![Root::default(); 16];
    let locks: Vec<AtomicBool> = (0..16).map(|_| AtomicBool::new(false)).collect();
    let idx = Index::<Borrowed<'_>>::new(
        &mut nodes,
        &mut roots,
        SpinLocks(&locks),
        Default::default(),
        16,
    );
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
