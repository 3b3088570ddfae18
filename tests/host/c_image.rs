//! Cross-check of the on-media format against the real thing: a pmem image written
//! by the in-tree C dm-pcache (`tests/images/make-c-image.sh`, run once in the VM)
//! is attached by the engine and every sector of the written pattern is read back.
//!
//! The image is the whole pmem namespace of a 1 GiB NVDIMM (1006 MiB), mostly
//! zeros, zstd-compressed; only its non-zero pages are kept in memory.
//! Decompression runs the `zstd` command (no crate dependency for one test).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use pcache_engine::c_image_writes::{expected, pattern, WRITES};
use pcache_engine::cache_core::{Backing, Cache, CacheOptions, IoError, Pmem};
use pcache_engine::meta::cache_info::{CacheInfo, CACHE_MODE_WRITEBACK, GC_PERCENT_DEFAULT};
use pcache_engine::meta::header::pick_latest;
use pcache_engine::meta::layout::{Geometry, SB_OFF};
use pcache_engine::meta::superblock::{Superblock, PCACHE_MAGIC, SB_STRUCT_SIZE};
use pcache_engine::sim::OwnedMem;

/// The fsdax namespace of the 1 GiB NVDIMM (recorded in c-pcache-1g.txt).
const DEV_BYTES: u64 = 1_054_867_456;
const BACKING_BYTES: u64 = 1 << 30;
const PAGE: u64 = 4096;

/// Pmem over the image's non-zero 4 KiB pages; every other page reads as zeros.
struct SparsePmem {
    pages: RefCell<HashMap<u64, Box<[u8; PAGE as usize]>>>,
}

impl Pmem for SparsePmem {
    fn size(&self) -> u64 {
        DEV_BYTES
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > DEV_BYTES)
        {
            return Err(IoError);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let a = off + done as u64;
            let in_page = (a % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.pages.borrow().get(&(a / PAGE)) {
                Some(p) => out.copy_from_slice(&p[in_page..in_page + n]),
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8]) {
        let mut pages = self.pages.borrow_mut();
        let mut done = 0usize;
        while done < data.len() {
            let a = off + done as u64;
            let in_page = (a % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let p = pages
                .entry(a / PAGE)
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            p[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }
    fn flush(&self, _off: u64, _len: u64) {}
    fn fence(&self) {}
}

/// An empty backing device: whatever the C module wrote back is not in the image.
#[derive(Default)]
struct ZeroBacking {
    sectors: RefCell<HashMap<u64, [u8; 512]>>,
}

impl Backing for ZeroBacking {
    fn size(&self) -> u64 {
        BACKING_BYTES
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        for (i, c) in buf.chunks_mut(512).enumerate() {
            let s = off / 512 + i as u64;
            match self.sectors.borrow().get(&s) {
                Some(d) => c.copy_from_slice(&d[..c.len()]),
                None => c.fill(0),
            }
        }
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        for (i, c) in data.chunks(512).enumerate() {
            let mut d = [0u8; 512];
            d[..c.len()].copy_from_slice(c);
            self.sectors.borrow_mut().insert(off / 512 + i as u64, d);
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
}

/// Decompress the image, keeping only its non-zero pages.
fn load_image() -> SparsePmem {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/c-pcache-1g.img.zst");
    assert!(path.exists(), "{} missing", path.display());
    let mut child = Command::new("zstd")
        .arg("-dc")
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the zstd command is needed to decompress the C image");
    let mut out = child.stdout.take().unwrap();
    let mut pages = HashMap::new();
    let mut page = [0u8; PAGE as usize];
    let mut total = 0u64;
    loop {
        let mut got = 0;
        while got < page.len() {
            match out.read(&mut page[got..]).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        if got == 0 {
            break;
        }
        assert_eq!(got, page.len(), "image is not a whole number of pages");
        if page.iter().any(|&b| b != 0) {
            pages.insert(total / PAGE, Box::new(page));
        }
        total += PAGE;
    }
    assert!(child.wait().unwrap().success(), "zstd -dc failed");
    assert_eq!(total, DEV_BYTES, "image size");
    eprintln!("image: {} non-zero pages of {}", pages.len(), total / PAGE);
    SparsePmem {
        pages: RefCell::new(pages),
    }
}

#[test]
fn c_image_replays_with_its_data() {
    let pmem = load_image();
    let geo = Geometry::UPSTREAM;
    let meta = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        pmem.read(off, &mut b).unwrap();
        b
    };

    // Superblock and cache_info as the C module wrote them.
    let sb = Superblock::parse(&meta(SB_OFF, SB_STRUCT_SIZE), &geo, DEV_BYTES)
        .expect("superblock written by the C module");
    assert_eq!(sb.magic, PCACHE_MAGIC);
    assert_eq!(sb.seg_num as u64, geo.max_segs(DEV_BYTES));
    assert_eq!(
        sb.seg_num,
        Superblock::format(&geo, DEV_BYTES).unwrap().seg_num
    );
    let (slot, info) = pick_latest::<CacheInfo>(
        &meta(CacheInfo::slot_off(0), 4096),
        &meta(CacheInfo::slot_off(1), 4096),
    )
    .expect("cache_info decodes")
    .expect("a valid cache_info slot");
    eprintln!("superblock: {sb:?}");
    eprintln!("cache_info (slot {}): {info:?}", slot.get());
    assert!(info.init_done());
    assert!(info.data_crc());
    assert_eq!(info.cache_mode(), CACHE_MODE_WRITEBACK);
    assert_eq!(info.gc_percent(), GC_PERCENT_DEFAULT);
    assert_eq!(info.n_segs, sb.seg_num);

    // Attach and replay.
    let mut mem = OwnedMem::new(sb.seg_num as usize, 8192, BACKING_BYTES, 2, 2);
    let opts = CacheOptions {
        cache_mode: CACHE_MODE_WRITEBACK,
        data_crc: true,
    };
    let cache = Cache::start(pmem, ZeroBacking::default(), geo, mem.borrow(), &opts)
        .expect("the engine attaches the C module's cache");
    let st = cache.status();
    eprintln!("status after replay: {st:?}");
    assert_eq!(st.n_segs, sb.seg_num);
    let mut keys = Vec::new();
    cache.for_each_key(|k| keys.push(*k));
    keys.sort_by_key(|k| k.off);
    for k in &keys {
        assert!(k.has_crc(), "key {k:?} has no data crc");
    }

    // The index covers exactly the written sectors, without overlaps.
    let exp = expected();
    let mut covered = std::collections::BTreeSet::new();
    let mut last_end = 0;
    for k in &keys {
        assert!(k.off >= last_end, "overlapping keys at {}", k.off);
        last_end = k.end();
        for s in k.off / 512..k.end() / 512 {
            covered.insert(s);
        }
    }
    let written: std::collections::BTreeSet<u64> = exp.keys().copied().collect();
    let dirty_or_clean = |c: bool| keys.iter().filter(|k| k.clean() == c).count();
    eprintln!(
        "replayed keys: {} ({} dirty, {} clean), {} sectors covered of {} written",
        keys.len(),
        dirty_or_clean(false),
        dirty_or_clean(true),
        covered.len(),
        written.len()
    );
    assert_eq!(
        covered, written,
        "replayed keys cover exactly the written sectors"
    );
    // 4 KiB writes: 64 (range 1, 8 of them overwritten by range 4) + 32 (range 2,
    // block 25 trimmed to one sector by range 6) + 16 (range 3); 512-byte writes:
    // 11 (range 5) + 7 (range 6).
    assert_eq!(keys.len(), 64 + 32 + 16 + 11 + 7);

    // Every written sector reads back, as a hit, with the data of its last write.
    let mut hit_sectors = 0u64;
    for (s, n, _) in WRITES {
        let mut buf = vec![0u8; (n * 512) as usize];
        let r = cache
            .read(s * 512, &mut buf, false, 0)
            .unwrap_or_else(|e| panic!("read of sectors {s}+{n}: {e:?}"));
        assert_eq!(r.miss_bytes, 0, "range {s}+{n} missed");
        hit_sectors += r.hit_bytes / 512;
        for (i, got) in buf.chunks(512).enumerate() {
            let k = s + i as u64;
            assert_eq!(got, pattern(k, exp[&k]), "sector {k}");
        }
    }
    // And sector by sector (reads inside keys, not just whole extents).
    for (&k, &g) in &exp {
        let mut buf = [0u8; 512];
        let r = cache.read(k * 512, &mut buf, false, 1).unwrap();
        assert_eq!((r.hit_bytes, r.miss_bytes), (512, 0), "sector {k}");
        assert_eq!(buf, pattern(k, g), "sector {k}");
    }
    eprintln!(
        "{hit_sectors} sectors hit in range reads, {} sectors verified one by one",
        exp.len()
    );
    assert_eq!(cache.status().stats.crc_errors, 0);
    // Around the ranges: nothing cached.
    let mut buf = [0u8; 512];
    let r = cache.read(512 * 512, &mut buf, false, 0).unwrap();
    assert_eq!(r.hit_bytes, 0);
}
