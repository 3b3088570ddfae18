//! Unit properties of the on-media format and the index.

use pcache_engine::cache_core::index::{Index, Node, Root};
use pcache_engine::cache_core::key::{Key, Pos, SegId};
use pcache_engine::cache_core::writeback::{
    writeback_extents, Step, WbExtent, WbPlan, WB_EXTENTS_MAX,
};
use pcache_engine::cache_core::Pmem;
use pcache_engine::host_mem::{Borrowed, SpinLocks};
use pcache_engine::meta::crc32c::{crc32c, pcache_crc};
use pcache_engine::meta::header::{find_latest, seq_after, SlotIndex};
use pcache_engine::meta::kset::{kset_read, KsetRead, KSET_ONMEDIA_SIZE_MAX};
use pcache_engine::meta::layout::Geometry;
use pcache_engine::meta::superblock::Superblock;
use pcache_engine::table::{
    parse_message, parse_table, write_table, CacheMode, Message, MessageError, TableError,
    TableOptions,
};
use std::sync::atomic::AtomicBool;

#[test]
fn crc32c_matches_known_vectors() {
    // Standard CRC-32C check value, in the kernel's raw (no inversion) form.
    assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    // RFC 3720 B.4: 32 bytes of zeros -> 0x8A9136AA.
    assert_eq!(!crc32c(!0, &[0u8; 32]), 0x8A91_36AA);
    assert_eq!(!crc32c(!0, &[0xFFu8; 32]), 0x62A8_AB43);
    let inc: Vec<u8> = (0u8..32).collect();
    assert_eq!(!crc32c(!0, &inc), 0x46DD_794E);
    // Chaining equals one pass.
    assert_eq!(
        crc32c(crc32c(7, b"1234"), b"56789"),
        crc32c(7, b"123456789")
    );
    assert_eq!(pcache_crc(b""), 0x3B15A);
}

#[test]
fn seq_after_wraps_around() {
    assert!(seq_after(1, 0));
    assert!(seq_after(0, 255));
    assert!(!seq_after(255, 0));
    assert!(!seq_after(5, 5));
    assert!(seq_after(127, 0));
    assert!(!seq_after(128, 0));
}

#[test]
fn find_latest_picks_newest_valid_slot() {
    assert_eq!(find_latest([None, None]), None);
    assert_eq!(find_latest([Some(3), None]), Some(SlotIndex::FIRST));
    assert_eq!(find_latest([None, Some(3)]), Some(SlotIndex::SECOND));
    assert_eq!(find_latest([Some(3), Some(4)]), Some(SlotIndex::SECOND));
    assert_eq!(find_latest([Some(255), Some(0)]), Some(SlotIndex::SECOND));
    assert_eq!(find_latest([Some(0), Some(255)]), Some(SlotIndex::FIRST));
}

#[test]
fn superblock_round_trips_and_rejects_bad_fields() {
    let geo = Geometry::UPSTREAM;
    let dev = 1u64 << 30;
    let sb = Superblock::format(&geo, dev).unwrap();
    assert_eq!(sb.seg_num, ((dev - 0x5000) / (16 << 20)) as u32);
    let mut b = [0u8; 24];
    sb.encode(&mut b);
    assert_eq!(Superblock::parse(&b, &geo, dev).unwrap(), sb);
    // Every single-bit flip is rejected with an error, never a panic.
    for bit in 0..24 * 8 {
        let mut c = b;
        c[bit / 8] ^= 1 << (bit % 8);
        assert!(Superblock::parse(&c, &geo, dev).is_err(), "bit {bit}");
    }
    assert!(Superblock::parse(&b[..10], &geo, dev).is_err());
}

#[test]
fn kset_parser_never_panics_on_garbage() {
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut buf = vec![0u8; KSET_ONMEDIA_SIZE_MAX + 64];
    for round in 0..20000 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if round % 2 == 0 {
            buf[8..16].copy_from_slice(&pcache_engine::meta::kset::KSET_MAGIC.to_le_bytes());
        }
        let len = (x as usize) % buf.len();
        let _ = kset_read(&buf[..len], 1 + (x >> 40) as u32 % 64);
    }
    assert_eq!(kset_read(&[], 4).unwrap(), KsetRead::End);
}

/// A kset reads the same from the header and the span it announces
/// ([`kset_span`]) as from the rest of the segment: for ksets of every size,
/// LAST ksets, torn ones and garbage.
#[test]
fn kset_reads_the_same_from_its_span() {
    use pcache_engine::meta::kset::{
        encode_last_kset, kset_span, seal_kset, KeyOnmedia, KEY_ONMEDIA_SIZE, KSET_HEADER_SIZE,
        KSET_KEYS_MAX,
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut seen_keys = 0;
    for round in 0..4000 {
        let mut buf = vec![0u8; KSET_ONMEDIA_SIZE_MAX + 512];
        for b in buf.iter_mut() {
            *b = next() as u8;
        }
        match round % 4 {
            0 | 1 => {
                let n = 1 + next() as usize % KSET_KEYS_MAX;
                for i in 0..n {
                    let key = KeyOnmedia {
                        off: (i as u64) << 12,
                        len: 4096,
                        ..KeyOnmedia::default()
                    };
                    let at = KSET_HEADER_SIZE + i * KEY_ONMEDIA_SIZE;
                    key.encode(&mut buf[at..at + KEY_ONMEDIA_SIZE]);
                }
                seal_kset(&mut buf, n).unwrap();
                if round % 4 == 1 {
                    // Torn: one byte of it changed.
                    let at = next() as usize % (KSET_HEADER_SIZE + n * KEY_ONMEDIA_SIZE);
                    buf[at] ^= 1 << (next() % 8);
                }
            }
            2 => {
                let mut last = [0u8; KSET_HEADER_SIZE];
                encode_last_kset(next() as u32 % 8, &mut last);
                buf[..KSET_HEADER_SIZE].copy_from_slice(&last);
            }
            _ => buf[8..16].copy_from_slice(&pcache_engine::meta::kset::KSET_MAGIC.to_le_bytes()),
        }
        // As much as the segment has left, as the engine reads it.
        let remain = KSET_HEADER_SIZE + next() as usize % (buf.len() - KSET_HEADER_SIZE);
        let whole = &buf[..remain.min(KSET_ONMEDIA_SIZE_MAX)];
        let span = kset_span(&whole[..KSET_HEADER_SIZE]).min(whole.len());
        let (a, b) = (kset_read(whole, 8), kset_read(&whole[..span], 8));
        assert_eq!(a, b, "round {round}: span {span} of {}", whole.len());
        seen_keys += usize::from(matches!(a, Ok(KsetRead::Keys { .. })));
    }
    assert!(seen_keys > 500, "only {seen_keys} ksets read back");
}

fn words(s: &str) -> Vec<&[u8]> {
    s.split_ascii_whitespace().map(str::as_bytes).collect()
}

#[test]
fn table_and_messages_parse() {
    let l = parse_table(&words(
        "/dev/pmem0 /dev/sdb 4 cache_mode writeback data_crc true",
    ))
    .unwrap();
    assert_eq!(
        (l.cache_dev, l.backing_dev),
        (&b"/dev/pmem0"[..], &b"/dev/sdb"[..])
    );
    assert!(l.options.data_crc);
    assert!(!parse_table(&words("a b")).unwrap().options.data_crc);
    let err = |s: &str| parse_table(&words(s)).unwrap_err();
    assert_eq!(err("a"), TableError::ArgCount);
    assert_eq!(err("a b 2 cache_mode writeahead"), TableError::BadCacheMode);
    assert_eq!(err("a b 3 data_crc true x"), TableError::OptArgCount);
    assert_eq!(err("a b 2 data_crc"), TableError::OptArgCount);
    assert_eq!(err("a b 2 data_crc yes"), TableError::BadDataCrc);
    assert_eq!(
        parse_table(&words("a b 2 cache_mode writeonly"))
            .unwrap()
            .options
            .cache_mode,
        CacheMode::Writeonly
    );
    assert_eq!(
        err("a b 4 data_crc true data_crc false"),
        TableError::DuplicateOption
    );
    assert_eq!(err("a b 99999999999999999999"), TableError::OptArgCount);
    assert_eq!(
        parse_message(&words("gc_percent 90")),
        Ok(Message::GcPercent(90))
    );
    assert_eq!(
        parse_message(&words("data_crc false")),
        Ok(Message::DataCrc(false))
    );
    assert_eq!(
        parse_message(&words("gc_percent 91")),
        Err(MessageError::BadGcPercent)
    );
    assert_eq!(
        parse_message(&words("gc_percent")),
        Err(MessageError::ArgCount)
    );
    assert_eq!(
        parse_message(&words("data_crc 1")),
        Err(MessageError::BadDataCrc)
    );
    assert_eq!(
        parse_message(&words("stats reset")),
        Ok(Message::StatsReset)
    );
    assert_eq!(
        parse_message(&words("stats clear")),
        Err(MessageError::BadStats)
    );
    assert_eq!(parse_message(&words("stats")), Err(MessageError::ArgCount));
}

/// `dmsetup table` output (`write_table`) loads back as the same table.
#[test]
fn write_table_output_parses_back_to_the_same_options() {
    for (cache_mode, data_crc) in [
        (CacheMode::Writeback, false),
        (CacheMode::Writeback, true),
        (CacheMode::Writeonly, true),
    ] {
        let options = TableOptions {
            cache_mode,
            data_crc,
        };
        let mut out = String::new();
        write_table(&mut out, "/dev/pmem0", "253:3", &options).unwrap();
        let l = parse_table(&words(&out)).unwrap_or_else(|e| panic!("{out:?}: {e:?}"));
        assert_eq!(l.options, options, "{out:?}");
        assert_eq!(
            (l.cache_dev, l.backing_dev),
            (&b"/dev/pmem0"[..], &b"253:3"[..])
        );
    }
}

fn key(off: u64, len: u32, tag: u32) -> Key {
    Key {
        off,
        len,
        flags: 0,
        pos: Pos {
            seg: SegId::checked(tag, u32::MAX).unwrap(),
            off: 0,
        },
        gen: 0,
        crc: 0,
        crc_back: 0,
        crc_len: len,
    }
}

/// Index inserts keep keys disjoint and every byte maps to the newest key that
/// covered it (checked against a byte-map model).
#[test]
fn index_overlap_resolution_matches_model() {
    let mut nodes = vec![Node::default(); 4096];
    let mut roots = vec![Root::default(); 2];
    let locks: Vec<AtomicBool> = (0..2).map(|_| AtomicBool::new(false)).collect();
    let idx = Index::<Borrowed<'_>>::new(
        &mut nodes,
        &mut roots,
        SpinLocks(&locks),
        Default::default(),
        2,
    );
    const SPAN: usize = 8192;
    let mut model = vec![u32::MAX; SPAN];
    let mut x = 42u64;
    for tag in 0..3000u32 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 33) as usize % (SPAN - 1);
        let len = 1 + ((x >> 17) as usize % 300).min(SPAN - off - 1);
        if idx.free_nodes() < 2 {
            break;
        }
        idx.insert(key(off as u64, len as u32, tag), |_| {})
            .unwrap();
        for m in &mut model[off..off + len] {
            *m = tag;
        }
    }
    let mut seen = vec![u32::MAX; SPAN];
    let mut prev_end = 0u64;
    idx.for_each(|k| {
        assert!(k.off >= prev_end, "keys overlap at {}", k.off);
        prev_end = k.end();
        // pos.off tracks how much was cut from the front of the original key
        for i in k.off..k.end() {
            seen[i as usize] = k.pos.seg.get();
        }
    });
    assert_eq!(seen, model);
}

/// An insert takes a node from the shared free list for the key, and a second
/// only when it splits a key that contains it: with one node left, an insert
/// into a gap or over a key's head or tail goes in, one inside a key fails and
/// changes nothing, and a rewrite of a key's exact range takes none.
#[test]
fn index_insert_takes_a_second_node_only_to_split_a_containing_key() {
    let idx = leaked_index(4, 1);
    // [0, 100) tag 1, [200, 300) tag 2: two nodes taken, two left.
    idx.insert(key(0, 100, 1), |_| {}).unwrap();
    idx.insert(key(200, 100, 2), |_| {}).unwrap();
    assert_eq!(idx.free_nodes(), 2);
    // Over the tail of the first key and into the gap: one node.
    idx.insert(key(50, 100, 3), |_| {}).unwrap();
    assert_eq!(idx.free_nodes(), 1);
    let keys = || {
        let mut v = Vec::new();
        idx.for_each(|k| v.push((k.off, k.len, k.pos.seg.get())));
        v
    };
    let before = keys();
    assert_eq!(before, vec![(0, 50, 1), (50, 100, 3), (200, 100, 2)]);
    // Inside the last key: its tail needs a node of its own, and there is none.
    assert!(idx.insert(key(220, 10, 4), |_| {}).is_err());
    assert_eq!(keys(), before);
    assert_eq!(idx.free_nodes(), 1);
    // Exactly over a key: replaced in place.
    idx.insert(key(50, 100, 5), |_| {}).unwrap();
    assert_eq!(idx.free_nodes(), 1);
    // Over the head of the last key: the last node.
    idx.insert(key(190, 20, 6), |_| {}).unwrap();
    assert_eq!(idx.free_nodes(), 0);
    assert_eq!(idx.free_list_len(), 0);
    assert_eq!(
        keys(),
        vec![(0, 50, 1), (50, 100, 5), (190, 20, 6), (210, 90, 2)]
    );
}

/// Lookups of a key's start go first to the node its bucket's hint names,
/// and a hint is never cleared: it may name a node since trimmed, freed, or
/// reused by another subtree. With a slab of 48 nodes (48 buckets, nodes
/// recycled across 4 subtrees at every step), every lookup, overwrite and
/// removal must still find what a per-sector model says.
#[test]
fn index_lookups_through_stale_hints_match_model() {
    const SUBS: u64 = 4;
    const SECTORS: u64 = 48;
    let sector = |sub: u64, s: u64| (sub << 22) + s * 512;
    let idx = leaked_index(48, SUBS as usize);
    // Per subtree and sector: the tag and the start of the key covering it.
    let mut model = vec![vec![None::<(u32, u64)>; SECTORS as usize]; SUBS as usize];
    let mut x = 7u64;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let mut exact_hits = 0;
    for tag in 0..20_000u32 {
        let sub = next() % SUBS;
        let m = &mut model[sub as usize];
        let s = next() % SECTORS;
        match next() % 4 {
            // Remove the key starting at `s`, if any.
            0 => {
                let got = idx.remove(sub as usize, sector(sub, s));
                let starts = m[s as usize].is_some_and(|(_, ks)| ks == sector(sub, s));
                assert_eq!(got.is_some(), starts, "remove at {sub}/{s}");
                if starts {
                    for c in m.iter_mut().skip(s as usize) {
                        match c {
                            Some((_, ks)) if *ks == sector(sub, s) => *c = None,
                            _ => break,
                        }
                    }
                }
            }
            // Insert 1-6 sectors; half of them overwrite a key's exact range.
            _ => {
                let (off, len) = match m[s as usize] {
                    Some((_, ks)) if next() % 2 == 0 => {
                        let end = m
                            .iter()
                            .skip(s as usize)
                            .take_while(|c| c.is_some_and(|(_, k)| k == ks))
                            .count() as u64
                            + s;
                        (ks, (end - (ks - sector(sub, 0)) / 512) * 512)
                    }
                    _ => (sector(sub, s), (1 + next() % 6).min(SECTORS - s) * 512),
                };
                if idx.free_nodes() < 2 {
                    continue;
                }
                idx.insert(key(off, len as u32, tag), |_| {}).unwrap();
                let (from, to) = (
                    (off - sector(sub, 0)) / 512,
                    (off - sector(sub, 0) + len) / 512,
                );
                for c in &mut m[from as usize..to as usize] {
                    *c = Some((tag, off));
                }
                // What is left of a key that reached past the new one now
                // starts where the new one ends.
                for c in m.iter_mut().skip(to as usize) {
                    match c {
                        Some((_, ks)) if *ks < off + len => *ks = off + len,
                        _ => break,
                    }
                }
            }
        }
        // Look up from a few sectors: the first key overlapping the next 1-4.
        for _ in 0..4 {
            let (lsub, ls) = (next() % SUBS, next() % SECTORS);
            let lm = &model[lsub as usize];
            let n = (1 + next() % 4).min(SECTORS - ls);
            let (from, to) = (sector(lsub, ls), sector(lsub, ls + n));
            let want = (ls..ls + n).find_map(|c| lm[c as usize].map(|v| (c, v)));
            let got = idx.first_overlap(lsub as usize, from, to);
            // A read's lookup neither tries nor sets a hint, and finds the same.
            assert_eq!(
                idx.read_overlap(lsub as usize, from, to),
                got,
                "read lookup {lsub}/{ls}+{n}"
            );
            match (want, got) {
                (None, None) => {}
                (Some((c, (tag, ks))), Some(k)) => {
                    assert_eq!(
                        (k.off, k.pos.seg.get()),
                        (ks, tag),
                        "lookup {lsub}/{ls}+{n}: {k:?}"
                    );
                    assert!(k.off <= sector(lsub, c) && sector(lsub, c) < k.end());
                    exact_hits += usize::from(k.off == from);
                }
                (w, g) => panic!("lookup {lsub}/{ls}+{n}: want {w:?}, got {g:?}"),
            }
        }
    }
    assert!(exact_hits > 5_000, "{exact_hits} lookups of a key's start");
    assert_eq!(idx.free_list_len() + idx.len(), 48);
}

/// An index over leaked memory, for threads that may outlive a failed test.
fn leaked_index(nodes: usize, subs: usize) -> &'static Index<Borrowed<'static>> {
    let nodes: &[Node] = Vec::leak(vec![Node::default(); nodes]);
    let roots: &[Root] = Vec::leak(vec![Root::default(); subs]);
    let locks = Vec::leak((0..subs).map(|_| AtomicBool::new(false)).collect());
    Box::leak(Box::new(Index::new(
        nodes,
        roots,
        SpinLocks(locks),
        Default::default(),
        subs,
    )))
}

/// Runs `f(t)` on `n` threads and collects what they return; fails the test
/// if they have not all returned within a minute (a broken tree tends to loop
/// rather than fail).
fn on_threads<R: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = std::sync::Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..n {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(t)));
            let _ = tx.send((t, r));
        });
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((t, Ok(r))) => out[t] = Some(r),
            Ok((_, Err(e))) => std::panic::resume_unwind(e),
            Err(_) => panic!("threads still running after a minute (a tree loops?)"),
        }
    }
    out.into_iter().map(|r| r.unwrap()).collect()
}

/// Threads working on different subtrees at once, their nodes coming from and
/// going back to one shared free list that runs nearly dry: each subtree ends
/// as its thread's byte-map model says, inserts that found the list empty
/// changed nothing, and every node is either in a tree or free.
#[test]
fn index_subtrees_change_at_once_on_threads_sharing_one_slab() {
    const THREADS: usize = 4;
    const SUBS_PER_THREAD: usize = 2;
    const SPAN: usize = 64 << 10;
    const SUBTREE: u64 = 4 << 20;
    let idx = leaked_index(1400, THREADS * SUBS_PER_THREAD);
    let full: &'static std::sync::atomic::AtomicUsize =
        Box::leak(Box::new(std::sync::atomic::AtomicUsize::new(0)));
    // Thread `t` owns subtrees `t`, `t + THREADS`, ...
    let models: Vec<Vec<Vec<u32>>> = on_threads(THREADS, move |t| {
        let mut model = vec![vec![u32::MAX; SPAN]; SUBS_PER_THREAD];
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
        for op in 0..200_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let which = (x >> 60) as usize % SUBS_PER_THREAD;
            let sub = t + which * THREADS;
            let base = sub as u64 * SUBTREE;
            let off = (x >> 33) as usize % (SPAN - 1);
            let m = &mut model[which];
            if (x >> 8).is_multiple_of(3) {
                // Remove whatever key covers or follows `off`.
                let at = base + off as u64;
                if let Some(k) = idx.first_overlap(sub, at, base + SPAN as u64) {
                    assert_eq!(idx.remove(sub, k.off), Some(k), "thread {t} op {op}");
                    for b in &mut m[(k.off - base) as usize..(k.end() - base) as usize] {
                        *b = u32::MAX;
                    }
                }
                continue;
            }
            let len = 1 + ((x >> 17) as usize % 600).min(SPAN - off - 1);
            let tag = (t as u32) << 24 | op;
            let mut dropped = 0usize;
            let r = idx.insert(key(base + off as u64, len as u32, tag), |k| {
                dropped += k.len as usize
            });
            let covered = m[off..off + len].iter().filter(|&&b| b != u32::MAX).count();
            match r {
                Ok(()) => {
                    assert_eq!(dropped, covered, "thread {t} op {op}: drops");
                    m[off..off + len].fill(tag);
                }
                Err(_) => {
                    assert_eq!(dropped, 0, "thread {t} op {op}: a failed insert dropped");
                    full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        model
    });
    let mut keys = 0;
    let mut seen = vec![vec![u32::MAX; SPAN]; THREADS * SUBS_PER_THREAD];
    idx.for_each(|k| {
        keys += 1;
        let sub = (k.off / SUBTREE) as usize;
        let at = (k.off % SUBTREE) as usize;
        for b in &mut seen[sub][at..at + k.len as usize] {
            assert_eq!(*b, u32::MAX, "keys overlap at {}", k.off);
            *b = k.pos.seg.get();
        }
    });
    for (t, model) in models.iter().enumerate() {
        for (which, m) in model.iter().enumerate() {
            assert!(
                seen[t + which * THREADS] == *m,
                "thread {t}: subtree {which} differs"
            );
        }
    }
    assert_eq!(keys, idx.len());
    assert_eq!(idx.len() + idx.free_nodes() as usize, idx.capacity());
    assert_eq!(idx.free_list_len(), idx.free_nodes() as usize);
    // The list did run dry, so the failing path ran too.
    let full = full.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{keys} keys at the end, {full} inserts found no free node");
    assert!(full > 0);
}

/// Threads inserting, removing and looking up keys in the same two subtrees at
/// once, each operation under its subtree's lock: the trees stay whole (keys
/// disjoint and in order, every node in a tree or free), every key left is a
/// piece of the insert it came from, lookups only return keys that overlap,
/// and bytes are conserved: what the inserts put in, less what they replaced
/// and what the removes took, is what the index holds.
#[test]
fn index_threads_sharing_subtrees_keep_every_tree_whole() {
    const THREADS: usize = 4;
    const SUBS: usize = 2;
    const SPAN: u64 = 64 << 10;
    const SUBTREE: u64 = 4 << 20;
    let idx = leaked_index(1400, SUBS);
    // Per thread: the range of each insert that went in, by op; bytes in and out.
    type Run = (Vec<Option<(u64, u32)>>, u64, u64);
    let runs: Vec<Run> = on_threads(THREADS, move |t| {
        let mut inserted = Vec::new();
        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (t as u64) << 40;
        for op in 0..100_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let sub = (x >> 61) as usize % SUBS;
            let base = sub as u64 * SUBTREE;
            let at = base + (x >> 33) % (SPAN - 1);
            inserted.push(None);
            match (x >> 8) % 6 {
                0 | 1 => {
                    if let Some(k) = idx.first_overlap(sub, at, at + 1) {
                        assert!(k.off <= at && k.end() > at, "thread {t} op {op}: {k:?}");
                        if let Some(gone) = idx.remove(sub, k.off) {
                            bytes_out += u64::from(gone.len);
                        }
                    }
                }
                _ => {
                    let len = 1 + ((x >> 17) % 600).min(base + SPAN - at - 1) as u32;
                    let tag = (t as u32) << 24 | op;
                    let mut dropped = 0u64;
                    if idx
                        .insert(key(at, len, tag), |k| dropped += u64::from(k.len))
                        .is_ok()
                    {
                        bytes_in += u64::from(len);
                        bytes_out += dropped;
                        inserted[op as usize] = Some((at, len));
                    } else {
                        assert_eq!(dropped, 0, "thread {t} op {op}: a failed insert dropped");
                    }
                }
            }
        }
        (inserted, bytes_in, bytes_out)
    });
    let (mut keys, mut held) = (0usize, 0u64);
    let mut prev: Option<Key> = None;
    idx.for_each(|k| {
        keys += 1;
        held += u64::from(k.len);
        if let Some(p) = prev.filter(|p| p.off / SUBTREE == k.off / SUBTREE) {
            assert!(
                p.end() <= k.off,
                "keys overlap or are out of order: {p:?} {k:?}"
            );
        }
        prev = Some(*k);
        let tag = k.pos.seg.get();
        let (t, op) = ((tag >> 24) as usize, (tag & 0xff_ffff) as usize);
        let (off, len) = runs[t].0[op].expect("a key from an insert that failed");
        assert!(
            k.off >= off && k.end() <= off + u64::from(len) && k.off - off == u64::from(k.pos.off),
            "key {k:?} is not a piece of its insert at {off}+{len}"
        );
    });
    let bytes_in: u64 = runs.iter().map(|r| r.1).sum();
    let bytes_out: u64 = runs.iter().map(|r| r.2).sum();
    assert_eq!(held, bytes_in - bytes_out, "bytes are not conserved");
    assert_eq!(keys, idx.len());
    assert_eq!(idx.len() + idx.free_nodes() as usize, idx.capacity());
    assert_eq!(idx.free_list_len(), idx.free_nodes() as usize);
}

/// The fuzz target bodies over a few thousand random inputs (libFuzzer not needed).
#[test]
fn fuzz_bodies_survive_random_inputs() {
    let mut x = 0xDEADBEEFu64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..300 {
        let len = (next() % 2048) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        pcache_engine::fuzz_bodies::parsers(&data);
        pcache_engine::fuzz_bodies::kset(&data);
        // Aim patches at the metadata and segment headers most of the time.
        if data.len() >= 4 {
            let off = (next() % 0x5000 + 0x1000) as u32;
            data[..4].copy_from_slice(&off.to_le_bytes());
        }
        pcache_engine::fuzz_bodies::replay(&data);
    }
    for s in [
        "/dev/pmem0 /dev/sdb 4 cache_mode writeback data_crc false",
        "/dev/pmem0 /dev/sdb 2 data_crc true",
        "/dev/pmem0 /dev/sdb",
        "gc_percent 5",
        "data_crc true",
        "a b 2 data_crc maybe",
        "a b 0",
        "",
    ] {
        pcache_engine::fuzz_bodies::parsers(s.as_bytes());
    }
    // Word salad from the grammar's own vocabulary reaches the accepting paths
    // (and so the write_table round trip) far more often than random bytes.
    let vocab = [
        "p",
        "253:0",
        "0",
        "2",
        "4",
        "6",
        "cache_mode",
        "writeback",
        "data_crc",
        "true",
        "false",
        "gc_percent",
        "90",
        "91",
    ];
    for _ in 0..20_000 {
        let n = 1 + next() % 8;
        let line: Vec<&str> = (0..n)
            .map(|_| vocab[(next() % vocab.len() as u64) as usize])
            .collect();
        pcache_engine::fuzz_bodies::parsers(line.join(" ").as_bytes());
    }
}

/// Formatting a 512 MiB device with the upstream geometry lays the metadata out
/// where the C module expects it, and the result attaches again with its data.
#[test]
fn upstream_geometry_format_and_reattach() {
    use pcache_engine::cache_core::{Cache, CacheOptions};
    use pcache_engine::meta::crc32c::pcache_crc;
    use pcache_engine::sim::{BackingModel, OwnedMem, SimBacking, SimPmem, World};
    use std::collections::HashMap;
    let size = 512usize << 20;
    let backing = 64u64 << 20;
    let world = World::untracked(vec![0u8; size], BackingModel::new(backing, HashMap::new()));
    let opts = CacheOptions {
        data_crc: true,
        ..Default::default()
    };
    let mut mem = OwnedMem::new(32, 1024, backing, 2, 2);
    {
        let c = Cache::start(
            SimPmem(world.clone()),
            SimBacking(world.clone()),
            Geometry::UPSTREAM,
            mem.borrow(),
            &opts,
        )
        .unwrap();
        assert_eq!(c.status().n_segs, 31);
        c.write(4 << 20, &[0xA5u8; 8192], true, 0).unwrap();
    }
    {
        let w = world.borrow();
        let img = &w.pmem.volatile;
        // superblock at 4 KiB: crc, flags, magic, seg_num
        assert_eq!(
            u64::from_le_bytes(img[0x1008..0x1010].try_into().unwrap()),
            0x65B0_5EFA_96C5_96EF
        );
        assert_eq!(
            u32::from_le_bytes(img[0x1010..0x1014].try_into().unwrap()),
            31
        );
        assert_eq!(
            u32::from_le_bytes(img[0x1000..0x1004].try_into().unwrap()),
            pcache_crc(&img[0x1004..0x1018])
        );
        // cache_info: written once at the end of a new cache's start, into slot 1
        // with seq 1 (upstream cache_info_write flips the index before writing).
        assert_eq!(&img[0x2000..0x2018], &[0u8; 24]);
        assert_eq!(img[0x3000 + 4], 1);
        let flags = u32::from_le_bytes(img[0x3010..0x3014].try_into().unwrap());
        assert_eq!(flags & 0b11, 0b11, "DATA_CRC and INIT_DONE");
        assert_eq!((flags >> 6) & 0x7F, 70, "default gc_percent");
        // key tail / dirty tail slot 0 at 16 KiB and 16 KiB + 32
        assert_eq!(img[0x4000 + 4], 1);
        assert_eq!(img[0x4020 + 4], 1);
        // segment 1 (at 20 KiB + 16 MiB): segment info slot 1, gen slot 1 at +8 KiB +16
        let seg1 = 0x5000 + (16 << 20);
        assert_eq!(img[seg1 + 0x1000 + 4], 1, "seg info seq");
        assert_eq!(img[seg1 + 0x2010 + 4], 1, "seg gen seq");
        // first kset at the start of segment 0's data area (20 KiB + 12 KiB)
        assert_eq!(
            u64::from_le_bytes(img[0x8000 + 8..0x8000 + 16].try_into().unwrap()),
            0x6768_94a6_4e16_4f1a
        );
    }
    let mut mem = OwnedMem::new(32, 1024, backing, 2, 2);
    let c = Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        Geometry::UPSTREAM,
        mem.borrow(),
        &opts,
    )
    .unwrap();
    let mut buf = vec![0u8; 8192];
    let r = c.read(4 << 20, &mut buf, false, 0).unwrap();
    assert_eq!(r.hit_bytes, 8192);
    assert!(buf.iter().all(|&b| b == 0xA5));
}

/// Both simulated devices, shared by the engine and the test.
type SharedWorld = std::rc::Rc<std::cell::RefCell<pcache_engine::sim::World>>;

/// A small simulated device: eight 64 KiB segments of pmem, 8 MiB of backing.
fn small_world() -> (SharedWorld, pcache_engine::sim::OwnedMem) {
    sized_world(8, 256)
}

/// [`small_world`] with `segs` segments and `keys` keys.
fn sized_world(segs: u64, keys: usize) -> (SharedWorld, pcache_engine::sim::OwnedMem) {
    world_of(segs, keys, 8 << 20, 1)
}

/// [`sized_world`] over `backing` bytes, with `ksets` open ksets.
fn world_of(
    segs: u64,
    keys: usize,
    backing: u64,
    ksets: usize,
) -> (SharedWorld, pcache_engine::sim::OwnedMem) {
    use pcache_engine::meta::layout::SEGMENTS_OFF;
    use pcache_engine::sim::{BackingModel, OwnedMem, World};
    let world = World::untracked(
        vec![0u8; (SEGMENTS_OFF + segs * SMALL_SEG) as usize],
        BackingModel::new(backing, std::collections::HashMap::new()),
    );
    (world, OwnedMem::new(segs as usize, keys, backing, ksets, 1))
}

/// The background writer of the tests over a [`SharedWorld`].
type SimBackground = pcache_engine::cache_core::background::Background<
    pcache_engine::sim::SimPmem,
    pcache_engine::sim::SimBacking,
    Vec<WbExtent>,
    Vec<u8>,
>;

/// Writes `data` at `off`, running urgent background rounds while the cache
/// has no room for it.
fn write_making_room(
    c: &pcache_engine::cache_core::Cache<
        pcache_engine::sim::SimPmem,
        pcache_engine::sim::SimBacking,
        pcache_engine::host_mem::Borrowed<'_>,
    >,
    bg: &mut SimBackground,
    off: u64,
    data: &[u8],
) {
    write_making_room_at(c, bg, &ByHand::default(), off, data);
}

/// [`write_making_room`] with the rounds on `clock`, for a test whose
/// background rounds keep time (the writeback watermark's idle drain does).
fn write_making_room_at(
    c: &pcache_engine::cache_core::Cache<
        pcache_engine::sim::SimPmem,
        pcache_engine::sim::SimBacking,
        pcache_engine::host_mem::Borrowed<'_>,
    >,
    bg: &mut SimBackground,
    clock: &ByHand,
    off: u64,
    data: &[u8],
) {
    loop {
        match c.write(off, data, false, 0) {
            Ok(()) => return,
            Err(pcache_engine::cache_core::CacheError::Busy(_)) => {
                bg.run(c, clock, true);
            }
            Err(e) => panic!("write at {off}: {e}"),
        }
    }
}

/// A background writer over `world`, with a small bounce buffer.
fn background(world: &SharedWorld) -> SimBackground {
    pcache_engine::cache_core::background::Background::new(
        pcache_engine::sim::SimPmem(world.clone()),
        pcache_engine::sim::SimBacking(world.clone()),
        vec![WbExtent::default(); WB_EXTENTS_MAX],
        vec![0u8; 16 << 10],
    )
}

const SMALL_SEG: u64 = 64 * 1024;

/// A fresh cache with data CRC on over [`small_world`].
fn small_cache<'a>(
    world: &SharedWorld,
    mem: &'a mut pcache_engine::sim::OwnedMem,
) -> pcache_engine::cache_core::Cache<
    pcache_engine::sim::SimPmem,
    pcache_engine::sim::SimBacking,
    pcache_engine::host_mem::Borrowed<'a>,
> {
    let opts = pcache_engine::cache_core::CacheOptions {
        data_crc: true,
        ..Default::default()
    };
    start_small(world, mem, &opts).unwrap()
}

/// Attaches a cache over [`small_world`] with `opts`.
fn start_small<'a>(
    world: &SharedWorld,
    mem: &'a mut pcache_engine::sim::OwnedMem,
    opts: &pcache_engine::cache_core::CacheOptions,
) -> Result<
    pcache_engine::cache_core::Cache<
        pcache_engine::sim::SimPmem,
        pcache_engine::sim::SimBacking,
        pcache_engine::host_mem::Borrowed<'a>,
    >,
    pcache_engine::cache_core::CacheError,
> {
    use pcache_engine::sim::{SimBacking, SimPmem};
    pcache_engine::cache_core::Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        Geometry::small(SMALL_SEG).unwrap(),
        mem.borrow(),
        opts,
    )
}

/// A backing device that fails and recovers gets every dirty byte: writeback
/// counts the error and retries the same kset on the next step.
#[test]
fn writeback_retries_after_backing_errors() {
    let (world, mut mem) = small_world();
    let mut c = small_cache(&world, &mut mem);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    c.write(4096, &data, true, 0).unwrap();
    world.borrow_mut().backing_fails = true;
    assert!(c.writeback_step().is_err());
    assert!(c.writeback_step().is_err());
    assert_eq!(c.status().stats.writeback_errors, 2);
    world.borrow_mut().backing_fails = false;
    c.writeback_all().unwrap();
    assert!(c.is_clean());
    let w = world.borrow();
    for (i, chunk) in data.chunks(512).enumerate() {
        assert_eq!(&w.backing.read_sector(8 + i as u64)[..], chunk);
    }
}

/// The statistics the status line shows: dirty bytes count every logged dirty
/// key until writeback copies it (an overwritten one too), bytes written back
/// follow, a failed miss counts as a backing error, and `stats reset` zeroes the
/// counters but not the dirty bytes, which are state.
#[test]
fn stats_count_dirty_and_written_back_bytes_and_reset() {
    let (world, mut mem) = small_world();
    let mut c = small_cache(&world, &mut mem);
    let data = vec![0x5au8; 8192];
    assert!(!c.holds_any(4096, 8192));
    c.write(4096, &data, false, 0).unwrap();
    assert!(c.holds_any(4096 + 8191, 1) && !c.holds_any(4096 + 8192, 4096));
    c.write(8192, &data[..4096], false, 0).unwrap();
    assert_eq!(c.status().dirty_bytes, 12288);
    c.flush().unwrap();
    c.writeback_all().unwrap();
    let st = c.status();
    assert_eq!((st.dirty_bytes, st.stats.bytes_written_back), (0, 12288));
    world.borrow_mut().backing_fails = true;
    let mut buf = vec![0u8; 4096];
    assert!(c.read(1 << 20, &mut buf, false, 0).is_err());
    world.borrow_mut().backing_fails = false;
    assert_eq!(c.status().stats.backing_errors, 1);
    c.write(0, &data[..4096], false, 0).unwrap();
    c.reset_stats();
    let st = c.status();
    assert_eq!(
        (
            st.stats.bytes_written_back,
            st.stats.backing_errors,
            st.stats.read_misses
        ),
        (0, 0, 0)
    );
    assert_eq!(st.dirty_bytes, 4096);
    c.check_invariants().unwrap();
}

/// Flips byte `i` of the extent `data` was written as, where it sits in pmem
/// (its bytes are unique there); a second flip of the same byte mends it.
fn corrupter<'a>(world: &'a SharedWorld, data: &[u8]) -> impl Fn(usize) + 'a {
    let at = world
        .borrow()
        .pmem
        .volatile
        .windows(64)
        .position(|win| win == &data[..64])
        .unwrap();
    move |i| world.borrow_mut().pmem.volatile[at + i] ^= 0xff
}

/// A read started for the caller to copy (`read_start`) hands out a key whose
/// CRC is still to be checked as a hit that carries the check: `copy_hits`
/// checks the whole extent without the engine, fails and zeroes on a
/// mismatch, and `read_verified` marks the key verified only while the index
/// holds the key the read found.
#[test]
fn hits_check_crcs_outside_the_engine_and_mark_the_key_they_found() {
    use pcache_engine::cache_core::io::{copy_hits, release_hits, Hit, HitError};
    let (world, mut mem) = small_world();
    let mut c = small_cache(&world, &mut mem);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 29 + 3) as u8 ^ 0x5a).collect();
    c.write(0, &data, true, 0).unwrap();
    let corrupt = corrupter(&world, &data);
    let mut buf = vec![0u8; 4096];
    let start = |c: &mut pcache_engine::cache_core::Cache<_, _, _>, off: u64, buf: &mut [u8]| {
        let mut hits = [Hit::default(); 1];
        let s = c.read_start(off, buf, &mut [], &mut hits).unwrap().unwrap();
        assert_eq!(s.hits, 1);
        hits
    };
    // A flipped byte 40 KiB in fails a read of the first 4 KiB.
    corrupt(40 << 10);
    let hits = start(&mut c, 0, &mut buf);
    assert!(hits[0].checks());
    buf.fill(0xee);
    assert_eq!(copy_hits(c.pmem(), &hits, &mut buf[..]), Err(HitError::Crc));
    assert_eq!(
        buf,
        vec![0u8; 4096],
        "data that failed its check is handed out"
    );
    c.read_crc_failed();
    c.read_cancel(&[], &hits);
    assert_eq!(c.status().stats.crc_errors, 1);
    corrupt(40 << 10);
    // Intact: the check passes, but the key was trimmed at the front
    // meanwhile, so it is not the key the read found and stays unverified.
    let hits = start(&mut c, 4096, &mut buf);
    copy_hits(c.pmem(), &hits, &mut buf[..]).unwrap();
    assert_eq!(buf, data[4096..8192]);
    c.write(0, &[1u8; 4096], true, 0).unwrap();
    c.read_verified(&hits);
    release_hits(c.pmem(), &hits);
    for off in [0, 8192] {
        let hits = start(&mut c, off, &mut buf);
        assert!(
            hits[0].checks(),
            "a key at {off} that the read did not find was marked verified"
        );
        release_hits(c.pmem(), &hits);
    }
    let hits = start(&mut c, 8192, &mut buf);
    // This time the key stays: it is verified, and later reads carry no check.
    copy_hits(c.pmem(), &hits, &mut buf[..]).unwrap();
    c.read_verified(&hits);
    release_hits(c.pmem(), &hits);
    assert_eq!(buf, data[8192..12288]);
    let hits = start(&mut c, 32768, &mut buf);
    assert!(!hits[0].checks());
    release_hits(c.pmem(), &hits);
    assert_eq!(c.status().stats.crc_errors, 1);
    c.check_invariants().unwrap();
}

/// With data CRC on, the first read of a key checks the whole extent its CRC
/// covers, even for a 4 KiB read of a 64 KiB write; once checked, the key (and
/// what an overwrite leaves of it) is read without checking again, until the
/// cache is attached anew.
#[test]
fn partial_reads_check_an_extent_once_per_attach() {
    let (world, mut mem) = small_world();
    let c = small_cache(&world, &mut mem);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 31 + 7) as u8 ^ 0xa5).collect();
    c.write(0, &data, true, 0).unwrap();
    let corrupt = corrupter(&world, &data);
    let mut buf = vec![0u8; 4096];
    // A flipped byte 40 KiB in fails a read of the first 4 KiB: the whole extent is checked.
    corrupt(40 << 10);
    assert!(c.read(0, &mut buf, false, 0).is_err());
    assert_eq!(c.status().stats.crc_errors, 1);
    corrupt(40 << 10);
    // Intact again: read, and the key is verified.
    c.read(0, &mut buf, false, 0).unwrap();
    assert_eq!(&buf[..], &data[..4096]);
    // An overwrite in the middle leaves two verified pieces of the old extent.
    c.write(16384, &[1u8; 4096], true, 0).unwrap();
    corrupt(40 << 10);
    c.read(0, &mut buf, false, 0).unwrap();
    assert_eq!(&buf[..], &data[..4096]);
    c.read(32768, &mut buf, false, 0).unwrap();
    assert_eq!(&buf[..], &data[32768..32768 + 4096]);
    assert_eq!(c.status().stats.crc_errors, 1);
    c.check_invariants().unwrap();
}

/// A discard drops the keys in its range, dirty ones included, trimming the
/// keys that stick out; writeback then skips what is no longer held (a
/// discarded range needs no data) but still copies a key that is held in part.
#[test]
fn discard_drops_keys_and_writeback_skips_them() {
    let (world, mut mem) = small_world();
    let mut c = small_cache(&world, &mut mem);
    let a = vec![0xa1u8; 16384];
    let b = vec![0xb2u8; 8192];
    c.write(0, &a, false, 0).unwrap();
    c.write(65536, &b, false, 0).unwrap();
    // All of b, and the middle of a.
    c.discard(65536, 8192).unwrap();
    c.discard(4096, 4096).unwrap();
    assert!(!c.holds_any(65536, 8192) && !c.holds_any(4096, 4096));
    assert!(c.holds_any(0, 4096) && c.holds_any(8192, 8192));
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        c.read_cached(0, &mut buf).unwrap().map(|r| r.hit_bytes),
        Some(4096)
    );
    assert_eq!(&buf[..], &a[..4096]);
    assert_eq!(c.read_cached(4096, &mut buf).unwrap(), None);
    c.check_invariants().unwrap();
    c.flush().unwrap();
    c.writeback_all().unwrap();
    let st = c.status();
    assert_eq!((st.dirty_bytes, st.stats.bytes_written_back), (0, 16384));
    let w = world.borrow();
    assert_eq!(&w.backing.read_sector(0)[..], &a[..512]);
    assert_eq!(&w.backing.read_sector(128)[..], &[0u8; 512][..]);
    drop(w);
    // Past the end of the 8 MiB backing device.
    assert!(c.discard((8 << 20) - 4096, 8192).is_err());
    c.check_invariants().unwrap();
}

/// `cache_mode writeonly`: recorded in the mode bits of `cache_flags`; reads
/// that miss are not cached; a table naming another mode than the cache's
/// attaches only when the cache is clean.
#[test]
fn writeonly_mode_is_recorded_and_switches_only_when_clean() {
    use pcache_engine::cache_core::{start::MODE_MISMATCH, CacheError, CacheOptions};
    use pcache_engine::meta::cache_info::{CACHE_MODE_WRITEBACK, CACHE_MODE_WRITEONLY};
    let (world, mut mem) = small_world();
    let attach = |mem: &mut pcache_engine::sim::OwnedMem, mode: u32| {
        let opts = CacheOptions {
            cache_mode: mode,
            ..Default::default()
        };
        start_small(&world, mem, &opts).map(|c| {
            c.check_invariants().unwrap();
            let mode = (c.status().cache_flags >> 2) & 0xf;
            let mut buf = vec![0u8; 4096];
            // A read miss: cached in writeback mode, not in writeonly mode.
            c.read(1 << 20, &mut buf, true, 0).unwrap();
            (mode, c.holds_any(1 << 20, 4096))
        })
    };
    {
        let c = small_cache(&world, &mut mem);
        c.write(0, &[7u8; 8192], false, 0).unwrap();
        c.flush().unwrap();
    }
    // Dirty: another mode is refused, and the cache is left as it was.
    let refused = attach(&mut mem, CACHE_MODE_WRITEONLY).err();
    assert_eq!(refused, Some(CacheError::Invalid(MODE_MISMATCH)));
    {
        let mut c = small_cache(&world, &mut mem);
        c.writeback_all().unwrap();
        assert!(c.is_clean());
    }
    assert_eq!(
        attach(&mut mem, CACHE_MODE_WRITEONLY).unwrap(),
        (CACHE_MODE_WRITEONLY, false)
    );
    assert_eq!(
        attach(&mut mem, CACHE_MODE_WRITEBACK).unwrap(),
        (CACHE_MODE_WRITEBACK, true)
    );
}

/// The modes that write through: the backing device holds every write when
/// it returns, nothing is ever dirty, and a cache attached in such a mode
/// starts empty. Writethrough caches what it writes; writearound drops what the
/// cache held of a write's range and caches what reads bring in. A failed
/// backing write leaves nothing of its range in the cache.
#[test]
fn writethrough_and_writearound_hold_every_write_on_the_backing_device() {
    use pcache_engine::cache_core::{CacheOptions, Mode};
    use pcache_engine::meta::cache_info::{CACHE_MODE_WRITEAROUND, CACHE_MODE_WRITETHROUGH};
    for mode in [CACHE_MODE_WRITETHROUGH, CACHE_MODE_WRITEAROUND] {
        let (world, mut mem) = small_world();
        let opts = CacheOptions {
            cache_mode: mode,
            ..Default::default()
        };
        let a = vec![0x3cu8; 8192];
        let b = vec![0x4du8; 4096];
        let mut buf = vec![0u8; 4096];
        {
            let c = start_small(&world, &mut mem, &opts).unwrap();
            assert!(c.writes_need_backing());
            c.write(0, &a, false, 0).unwrap();
            assert_eq!(&world.borrow().backing.read_sector(15)[..], &a[..512]);
            let cached = c.read_cached(0, &mut buf).unwrap().is_some();
            assert_eq!(cached, c.mode() == Mode::Writethrough, "{mode}");
            // A read brings the range in (both modes cache misses).
            c.read(0, &mut buf, true, 0).unwrap();
            assert!(c.read_cached(0, &mut buf).unwrap().is_some());
            assert_eq!(&buf[..], &a[..4096]);
            c.write(0, &b, false, 0).unwrap();
            assert_eq!(&world.borrow().backing.read_sector(0)[..], &b[..512]);
            match c.read_cached(0, &mut buf).unwrap() {
                Some(_) => assert_eq!((&buf[..], c.mode()), (&b[..], Mode::Writethrough)),
                None => assert_eq!(c.mode(), Mode::Writearound),
            }
            // A failing backing device: the write fails, and the cache drops the range.
            world.borrow_mut().backing_fails = true;
            assert!(c.write(4096, &b, false, 0).is_err());
            world.borrow_mut().backing_fails = false;
            assert!(!c.holds_any(4096, 4096));
            assert_eq!(c.status().stats.backing_errors, 1);
            c.flush().unwrap();
            assert_eq!(c.status().dirty_bytes, 0);
            c.check_invariants().unwrap();
        }
        // Attached again: empty, and reads come from the backing device.
        let c = start_small(&world, &mut mem, &opts).unwrap();
        assert_eq!(c.status().keys, 0);
        c.read(0, &mut buf, true, 0).unwrap();
        assert_eq!(&buf[..], &b[..]);
        c.check_invariants().unwrap();
    }
}

/// `read_cached` serves a range the cache holds entirely and stops at the first
/// gap without reading the backing device (it runs where backing IO would
/// deadlock: device-mapper's `map`).
#[test]
fn read_cached_serves_full_hits_and_never_reads_backing() {
    let (world, mut mem) = small_world();
    let c = small_cache(&world, &mut mem);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    c.write(4096, &data, false, 0).unwrap();
    // A failing backing device proves that no path below reads it.
    world.borrow_mut().backing_fails = true;
    let mut buf = vec![0u8; 4096];
    let r = c.read_cached(4096 + 2048, &mut buf).unwrap().unwrap();
    assert_eq!(r.hit_bytes, 4096);
    assert_eq!(r.miss_bytes, 0);
    assert_eq!(&buf[..], &data[2048..2048 + 4096]);
    // Straddling the end of the cached extent: a gap, so no answer.
    assert_eq!(c.read_cached(4096 + 6144, &mut buf).unwrap(), None);
    // Entirely uncached.
    assert_eq!(c.read_cached(1 << 20, &mut buf).unwrap(), None);
    // The full read still works once the backing device is back.
    world.borrow_mut().backing_fails = false;
    let r = c.read(4096 + 6144, &mut buf, false, 0).unwrap();
    assert_eq!(r.hit_bytes, 2048);
    assert_eq!(r.miss_bytes, 2048);
    assert_eq!(&buf[..2048], &data[6144..]);
}

/// A read that misses leaves a tagged placeholder over each gap while the
/// backing device is read; the fill caches the backing data only where the
/// placeholder is still there, so a write that came meanwhile wins. Reads treat
/// a placeholder as a miss, and no placeholder outlives its fill or abandon.
#[test]
fn split_reads_fill_only_what_no_write_replaced() {
    use pcache_engine::cache_core::io::{copy_hits, Gap, Hit};
    use pcache_engine::cache_core::Backing;
    let (world, mut mem) = small_world();
    let mut c = small_cache(&world, &mut mem);
    // The backing device holds a pattern at 1 MiB..1 MiB + 16 KiB.
    let old: Vec<u8> = (0..16384u32).map(|i| (i * 7 + 1) as u8).collect();
    c.backing_mut().write(1 << 20, &old).unwrap();
    let keys0 = c.status().keys;
    // A cached 4 KiB in the middle: two gaps around one hit.
    let mid = vec![0x5au8; 4096];
    c.write((1 << 20) + 8192, &mid, false, 0).unwrap();
    let mut buf = vec![0u8; 16384];
    let mut gaps = [Gap::default(); 4];
    let mut hits = [Hit::default(); 4];
    let started = c
        .read_start(1 << 20, &mut buf[..], &mut gaps, &mut hits)
        .unwrap()
        .unwrap();
    let (r, n) = (started.res, started.gaps);
    // The key's CRC was not checked yet: the hit carries the check, which the
    // caller's copy runs.
    assert_eq!(
        (r.hit_bytes, r.miss_bytes, n, started.hits),
        (4096, 12288, 2, 1)
    );
    assert!(hits[0].checks());
    copy_hits(c.pmem(), &hits[..1], &mut buf[..]).unwrap();
    c.read_verified(&hits[..1]);
    c.read_done(&hits[..1]);
    assert_eq!(&buf[8192..12288], &mid[..]);
    // Checked now: the next read leaves the hit to the caller to copy with no
    // check, and pins its segment meanwhile.
    let mut again = vec![0u8; 4096];
    let pinned = c
        .read_start((1 << 20) + 8192, &mut again[..], &mut [], &mut hits)
        .unwrap()
        .unwrap();
    assert_eq!((pinned.gaps, pinned.hits), (0, 1));
    assert_eq!((hits[0].at, hits[0].len), (0, 4096));
    assert!(!hits[0].checks());
    assert!(again.iter().all(|&b| b == 0));
    let seg = hits[0].segment().unwrap().get();
    assert!(c.pmem().pinned(seg));
    copy_hits(c.pmem(), &hits[..1], &mut again[..]).unwrap();
    c.read_done(&hits[..1]);
    assert!(!c.pmem().pinned(seg));
    assert_eq!(again, mid);
    assert_eq!((gaps[0].off, gaps[0].at, gaps[0].len), (1 << 20, 0, 8192));
    assert_eq!((gaps[1].at, gaps[1].len), (12288, 4096));
    assert!(gaps[0].tag != 0 && gaps[1].tag != 0 && gaps[0].tag != gaps[1].tag);
    // A placeholder is a miss to other reads, and holds nothing for a write.
    let mut probe = vec![0u8; 4096];
    assert_eq!(c.read_cached(1 << 20, &mut probe).unwrap(), None);
    assert!(!c.holds_any(1 << 20, 8192));
    assert!(c.holds_any(1 << 20, 12288));
    // A write lands in the first gap while it is out.
    let new = vec![0xe1u8; 4096];
    c.write((1 << 20) + 4096, &new, false, 0).unwrap();
    // The backing reads complete: the caller put the data in its buffer.
    c.backing_mut().read(1 << 20, &mut buf[..8192]).unwrap();
    c.backing_mut()
        .read((1 << 20) + 12288, &mut buf[12288..])
        .unwrap();
    for g in &gaps[..n] {
        c.read_fill(g, &buf[..], 0);
    }
    // Everything is cached now, and the write came after the miss's data.
    let mut all = vec![0u8; 16384];
    let r = c.read_cached(1 << 20, &mut all).unwrap().unwrap();
    assert_eq!(r.hit_bytes, 16384);
    assert_eq!(&all[..4096], &old[..4096]);
    assert_eq!(&all[4096..8192], &new[..]);
    assert_eq!(&all[8192..12288], &mid[..]);
    assert_eq!(&all[12288..], &old[12288..]);
    let mut empties = 0;
    c.for_each_key(|k| empties += usize::from(k.empty()));
    assert_eq!(empties, 0);
    c.check_invariants().unwrap();

    // A failed miss gives its placeholder up and caches nothing.
    let started = c
        .read_start(2 << 20, &mut buf[..4096], &mut gaps, &mut hits)
        .unwrap()
        .unwrap();
    assert_eq!((started.gaps, started.hits), (1, 0));
    c.read_abandon(&gaps[0]);
    assert!(!c.holds_any(2 << 20, 4096));
    // More gaps than the caller has room for: nothing placed, nothing left.
    let before = c.status().keys;
    let started = c
        .read_start(3 << 20, &mut buf[..4096], &mut [], &mut hits)
        .unwrap();
    assert_eq!(started, None);
    assert_eq!(c.status().keys, before);
    assert!(c.status().keys > keys0);
    c.check_invariants().unwrap();
}

/// A commit says whether its key replaced data the cache held: that is how
/// `map` counts a write as a hit without a lookup of its own. A read miss's
/// placeholder holds no data.
#[test]
fn write_commit_tells_a_hit() {
    use pcache_engine::cache_core::io::{copy_in, Gap, Hit};
    let (world, mut mem) = small_world();
    let mut c = small_cache(&world, &mut mem);
    let data = vec![0x3cu8; 8192];
    let commit = |c: &mut pcache_engine::cache_core::Cache<
        pcache_engine::sim::SimPmem,
        pcache_engine::sim::SimBacking,
        Borrowed<'_>,
    >,
                  off: u64,
                  len: usize| {
        let r = c.write_reserve(off, len, 0, 0).unwrap();
        let pmem = pcache_engine::sim::SimPmem(world.clone());
        let crc = copy_in(&pmem, &r, &data[..], 0).unwrap();
        c.write_commit(&r, crc, false).unwrap() == pcache_engine::cache_core::Committed::Done(true)
    };
    assert!(!commit(&mut c, 1 << 20, 4096));
    assert!(commit(&mut c, 1 << 20, 4096));
    // Half over cached data, half over nothing.
    assert!(commit(&mut c, (1 << 20) + 2048, 4096));
    assert!(!commit(&mut c, 2 << 20, 8192));
    // Over a placeholder only: a miss.
    let mut buf = vec![0u8; 4096];
    let mut gaps = [Gap::default(); 2];
    let s = c
        .read_start(3 << 20, &mut buf[..], &mut gaps, &mut [Hit::default(); 2])
        .unwrap()
        .unwrap();
    assert_eq!((s.gaps, gaps[0].tag != 0), (1, true));
    assert!(!commit(&mut c, 3 << 20, 4096));
    c.read_abandon(&gaps[0]);
    c.check_invariants().unwrap();
}

/// A segment a read still copies from outside the engine (a pinned
/// hit) is not handed out again: GC invalidates and frees it once its keys
/// are overwritten, but writes cycling through every other segment never get
/// it, and the read copies the data it found. Once the pin is given back, the
/// segment is used again.
#[test]
fn a_pinned_segment_is_not_handed_out_again() {
    use pcache_engine::cache_core::io::{copy_hits, release_hits, Hit};
    use pcache_engine::cache_core::CacheError;
    let (world, mut mem) = small_world();
    let mut c = start_small(&world, &mut mem, &Default::default()).unwrap();
    let old = vec![0x11u8; 4096];
    c.write(0, &old, false, 0).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut hits = [Hit::default(); 1];
    let s = c
        .read_start(0, &mut buf[..], &mut [], &mut hits)
        .unwrap()
        .unwrap();
    assert_eq!(s.hits, 1);
    let seg = hits[0].segment().unwrap().get();
    // Writes over and beside it, written back and collected, many times the
    // cache's size: GC frees the pinned segment early on.
    let mut freed = false;
    for i in 0..200u64 {
        let data = vec![(i % 250) as u8 + 2; 32768];
        loop {
            match c.write((i % 64) * 32768, &data, false, 0) {
                Ok(()) => break,
                Err(CacheError::Busy(_)) => {
                    c.flush().unwrap();
                    c.writeback_all().unwrap();
                    c.gc_all().unwrap();
                }
                Err(e) => panic!("write {i}: {e}"),
            }
        }
        let now_used = c.seg_used(seg);
        freed |= !now_used;
        assert!(
            !(freed && now_used),
            "write {i}: segment {seg} handed out again while pinned"
        );
    }
    assert!(freed, "GC never freed segment {seg}");
    copy_hits(c.pmem(), &hits, &mut buf[..]).unwrap();
    release_hits(c.pmem(), &hits);
    assert_eq!(buf, old, "the pinned read copied overwritten data");
    let mut reused = false;
    for i in 0..200u64 {
        let data = vec![0x77u8; 32768];
        while let Err(CacheError::Busy(_)) = c.write((i % 64) * 32768, &data, false, 0) {
            c.flush().unwrap();
            c.writeback_all().unwrap();
            c.gc_all().unwrap();
        }
        reused |= c.seg_used(seg);
    }
    assert!(
        reused,
        "segment {seg} was never used again after its pin went"
    );
    c.check_invariants().unwrap();
}

/// A read with more hits than the caller pins at once is started in rounds
/// (`Cache::read_resume`): each round pins up to the caller's room, stops at
/// the next hit, and says where; the gaps of every round add up; no hit is
/// copied by the engine itself, and the data read is the data written.
#[test]
fn a_read_with_many_hits_is_started_in_rounds() {
    use pcache_engine::cache_core::io::{copy_hits, release_hits, Gap, Hit};
    use pcache_engine::cache_core::CacheOptions;
    let (world, mut mem) = small_world();
    let opts = CacheOptions {
        data_crc: false,
        ..Default::default()
    };
    let c = start_small(&world, &mut mem, &opts).unwrap();
    // 20 cached blocks of 4 KiB, each followed by a hole of 4 KiB.
    let base = 1u64 << 20;
    for i in 0..20u64 {
        c.write(base + i * 8192, &vec![i as u8 + 1; 4096], false, 0)
            .unwrap();
    }
    let mut buf = vec![0u8; 20 * 8192];
    let mut gaps = [Gap::default(); 24];
    let mut hits = [Hit::default(); 8];
    let (mut from, mut placed, mut rounds) = (base, 0usize, 0);
    let end = base + buf.len() as u64;
    while from < end {
        let s = c
            .read_resume(base, from, &mut buf[..], &mut gaps[placed..], &mut hits)
            .unwrap()
            .unwrap();
        rounds += 1;
        assert!(s.next > from, "round {rounds} made no progress");
        // Nothing was copied into the buffer by the engine.
        assert!(buf.iter().all(|&b| b == 0));
        assert!(s.hits <= hits.len());
        let held = &hits[..s.hits];
        let mut copy = vec![0u8; buf.len()];
        copy_hits(c.pmem(), held, &mut copy[..]).unwrap();
        release_hits(c.pmem(), held);
        for h in held {
            let i = h.at / 8192;
            assert_eq!((h.at % 8192, h.len), (0, 4096));
            assert!(copy[h.at..h.at + h.len].iter().all(|&b| b == i as u8 + 1));
        }
        placed += s.gaps;
        from = s.next;
    }
    // 8 + 8 + 4 hits; one gap after each block.
    assert_eq!((rounds, placed), (3, 20));
    for (i, g) in gaps[..placed].iter().enumerate() {
        assert_eq!((g.at, g.len), (i * 8192 + 4096, 4096));
    }
    c.read_cancel(&gaps[..placed], &[]);
    // Resuming outside the read is refused.
    assert!(c
        .read_resume(base, base - 512, &mut buf[..], &mut gaps, &mut hits)
        .is_err());
    c.check_invariants().unwrap();
}

/// Writes `n` 512-byte keys at sectors `first..first + n`, sector `s` filled
/// with `s as u8 ^ tag`.
fn write_sectors(
    c: &mut pcache_engine::cache_core::Cache<
        pcache_engine::sim::SimPmem,
        pcache_engine::sim::SimBacking,
        pcache_engine::host_mem::Borrowed<'_>,
    >,
    first: u64,
    n: u64,
    tag: u8,
) {
    for s in first..first + n {
        c.write(s * 512, &[s as u8 ^ tag; 512], false, 0).unwrap();
    }
}

/// Writeback takes the ksets between two FLUSHes in one step, with one backing
/// flush, and never a kset from each side of a FLUSH; the ksets found by replay,
/// whose FLUSHes nobody recorded, go one a step.
#[test]
fn writeback_batches_the_ksets_between_flushes() {
    use pcache_engine::meta::kset::KSET_KEYS_MAX;
    let keys = KSET_KEYS_MAX as u64;
    let room = || sized_world(16, 4 * KSET_KEYS_MAX);
    let (world, mut mem) = room();
    let mut c = small_cache(&world, &mut mem);
    // Two full ksets, a FLUSH, a third kset, a FLUSH.
    write_sectors(&mut c, 0, 2 * keys, 0x11);
    c.flush().unwrap();
    write_sectors(&mut c, 2 * keys, keys, 0x22);
    c.flush().unwrap();
    let back = |c: &pcache_engine::cache_core::Cache<_, _, _>| c.status().stats.ksets_written_back;
    assert_eq!(c.writeback_step().unwrap(), Step::Progress);
    assert_eq!(back(&c), 2, "the ksets before the first FLUSH, together");
    assert_eq!(c.writeback_step().unwrap(), Step::Progress);
    assert_eq!(back(&c), 3, "the kset after it, alone");
    assert!(c.is_clean());
    for s in 0..3 * keys {
        let tag = if s < 2 * keys { 0x11 } else { 0x22 };
        assert_eq!(world.borrow().backing.read_sector(s), [s as u8 ^ tag; 512]);
    }
    // Two more full ksets, not written back before the cache goes away.
    write_sectors(&mut c, 0, 2 * keys, 0x33);
    c.flush().unwrap();
    drop(c);
    let mut mem2 = room().1;
    let mut c = small_cache(&world, &mut mem2);
    assert_eq!(c.writeback_step().unwrap(), Step::Progress);
    assert_eq!(back(&c), 1, "a replayed kset goes alone");
    c.writeback_all().unwrap();
    assert_eq!(back(&c), 2);
    for s in 0..2 * keys {
        assert_eq!(world.borrow().backing.read_sector(s), [s as u8 ^ 0x33; 512]);
    }
    c.check_invariants().unwrap();
}

/// The module plans a step a kset per hold of the control lock, and requests
/// run between: each call adds one kset, its extents after the ones before in
/// log order, and a FLUSH that comes between two calls ends the batch there.
#[test]
fn writeback_plans_a_kset_per_call_and_a_flush_between_ends_the_batch() {
    use pcache_engine::meta::kset::KSET_KEYS_MAX;
    let keys = KSET_KEYS_MAX as u64;
    let (world, mut mem) = sized_world(16, 4 * KSET_KEYS_MAX);
    let mut c = small_cache(&world, &mut mem);
    // Two full ksets with no FLUSH between them.
    write_sectors(&mut c, 0, 2 * keys, 0x11);
    let mut ext = vec![WbExtent::default(); WB_EXTENTS_MAX];
    let WbPlan::Batch(mut batch) = c.writeback_plan(&mut ext).unwrap() else {
        panic!("nothing planned");
    };
    assert_eq!(batch.n, KSET_KEYS_MAX, "the first call plans one kset");
    assert_eq!(c.writeback_plan(&mut ext).unwrap(), WbPlan::Idle);
    // Between the calls: a FLUSH, then a kset that overwrites the first.
    c.flush().unwrap();
    write_sectors(&mut c, 0, keys, 0x22);
    assert!(c.writeback_plan_more(&mut batch, &mut ext).unwrap());
    assert_eq!(batch.n, 2 * KSET_KEYS_MAX, "the second kset joins");
    assert!(
        !c.writeback_plan_more(&mut batch, &mut ext).unwrap(),
        "the kset after the FLUSH does not"
    );
    for (i, e) in ext[..batch.n].iter().enumerate() {
        assert_eq!((e.off, e.order), (i as u64 * 512, i as u32));
    }
    let backing = pcache_engine::sim::SimBacking(world.clone());
    let mut bounce = vec![0u8; 64 << 10];
    writeback_extents(c.pmem(), &backing, &mut bounce, &mut ext[..batch.n]).unwrap();
    c.writeback_commit(batch);
    assert_eq!(c.status().stats.ksets_written_back, 2);
    for s in 0..2 * keys {
        assert_eq!(world.borrow().backing.read_sector(s), [s as u8 ^ 0x11; 512]);
    }
    c.writeback_all().unwrap();
    assert_eq!(c.status().stats.ksets_written_back, 3);
    for s in 0..keys {
        assert_eq!(world.borrow().backing.read_sector(s), [s as u8 ^ 0x22; 512]);
    }
    c.check_invariants().unwrap();
}

/// The keys of the segments GC frees leave the index a bounded step at a
/// time: each clean step looks at no more than `CLEAN_KEYS_PER_STEP` keys
/// (one hold of the control lock), and the pass drops every stale key.
#[test]
fn the_clean_pass_drops_stale_keys_a_bounded_step_at_a_time() {
    use pcache_engine::cache_core::io::CLEAN_KEYS_PER_STEP;
    let (world, mut mem) = sized_world(32, 4096);
    let mut c = small_cache(&world, &mut mem);
    // 1,000 keys of 512 bytes, 4 KiB apart: both 4 MiB subtrees.
    for s in 0..1000u64 {
        c.write(s * 4096, &[s as u8; 512], false, 0).unwrap();
    }
    c.flush().unwrap();
    c.writeback_all().unwrap();
    c.set_gc_percent(0).unwrap();
    while c.gc_step().unwrap() == Step::Progress {}
    let stale = |c: &pcache_engine::cache_core::Cache<_, _, _>| {
        let mut n = 0;
        c.for_each_key(|k| n += usize::from(k.gen < c.seg_gen(k.pos.seg.get())));
        n
    };
    let before = stale(&c);
    assert!(
        before > 2 * CLEAN_KEYS_PER_STEP,
        "GC left {before} stale keys"
    );
    let keys = c.status().keys;
    let mut steps = 0;
    let mut removed = 0;
    while let Some(n) = c.clean_step() {
        assert!(n <= CLEAN_KEYS_PER_STEP);
        removed += n;
        steps += 1;
    }
    assert!(
        steps > before / CLEAN_KEYS_PER_STEP,
        "{steps} steps for {before} keys"
    );
    assert_eq!((removed, stale(&c)), (before, 0));
    assert_eq!(c.status().keys, keys - before);
    assert_eq!(c.clean_step(), None, "a pass with nothing freed since");
    c.check_invariants().unwrap();
    // What is left reads back: the backing device has the rest.
    let mut buf = [0u8; 512];
    for s in (0..1000u64).step_by(97) {
        c.read(s * 4096, &mut buf, false, 0).unwrap();
        assert_eq!(buf, [s as u8; 512]);
    }
}

/// A backing device that records the writes it is given.
struct Writes<B>(B, std::cell::RefCell<Vec<(u64, usize)>>);

impl<B: pcache_engine::cache_core::Backing> pcache_engine::cache_core::Backing for Writes<B> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), pcache_engine::cache_core::IoError> {
        self.0.read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) -> Result<(), pcache_engine::cache_core::IoError> {
        self.1.borrow_mut().push((off, data.len()));
        self.0.write(off, data)
    }
    fn flush(&self) -> Result<(), pcache_engine::cache_core::IoError> {
        self.0.flush()
    }
}

/// Within one step, a key that a later key of the step overwrites whole is not
/// written back at all (the later one lands either way); one the later key
/// overwrites in part is, before it.
#[test]
fn writeback_skips_keys_a_later_key_of_the_step_covers() {
    let (world, mut mem) = small_world();
    let c = small_cache(&world, &mut mem);
    c.write(0, &[1u8; 4096], false, 0).unwrap();
    c.write(0, &[2u8; 4096], false, 0).unwrap();
    c.write(8192, &[3u8; 8192], false, 0).unwrap();
    c.write(12288, &[4u8; 8192], false, 0).unwrap();
    c.flush().unwrap();
    let mut ext = vec![WbExtent::default(); WB_EXTENTS_MAX];
    let WbPlan::Batch(batch) = c.writeback_plan(&mut ext).unwrap() else {
        panic!("nothing planned");
    };
    assert_eq!(batch.n, 4);
    let backing = Writes(
        pcache_engine::sim::SimBacking(world.clone()),
        Default::default(),
    );
    let mut bounce = vec![0u8; 64 << 10];
    writeback_extents(c.pmem(), &backing, &mut bounce, &mut ext[..batch.n]).unwrap();
    c.writeback_commit(batch);
    assert!(c.is_clean());
    // The first 4 KiB once, then the two that overlap in part, in log order.
    let mut writes = backing.1.into_inner();
    writes[..2].sort();
    assert_eq!(writes, [(0, 4096), (8192, 8192), (12288, 8192)]);
    let w = world.borrow();
    assert_eq!(w.backing.read_sector(0), [2u8; 512]);
    assert_eq!(w.backing.read_sector(16), [3u8; 512]);
    assert_eq!(w.backing.read_sector(24), [4u8; 512]);
    assert_eq!(w.backing.read_sector(39), [4u8; 512]);
}

/// A key that writes since overwrote whole, with no FLUSH and no FUA write
/// between, is not written back at all: the application was owed nothing of
/// it, and the newer data lands later. A FLUSH after it, or a FUA write in its
/// kset or one before, promised it durable: it is written back, so that the
/// backing device stays a prefix of the history across FLUSHes.
#[test]
fn writeback_passes_over_keys_overwritten_before_any_flush_or_fua() {
    use pcache_engine::meta::kset::KSET_KEYS_MAX;
    let keys = KSET_KEYS_MAX as u64;
    let (world, mut mem) = sized_world(16, 8 * KSET_KEYS_MAX);
    let mut c = small_cache(&world, &mut mem);
    let backing = Writes(
        pcache_engine::sim::SimBacking(world.clone()),
        Default::default(),
    );
    let mut ext = vec![WbExtent::default(); WB_EXTENTS_MAX];
    let mut bounce = vec![0u8; 64 << 10];
    // Plans the kset at the dirty tail alone and writes it back; returns the
    // extents written.
    let mut step = |c: &pcache_engine::cache_core::Cache<_, _, _>| {
        let WbPlan::Batch(batch) = c.writeback_plan(&mut ext).unwrap() else {
            panic!("nothing planned");
        };
        let n = batch.n;
        writeback_extents(c.pmem(), &backing, &mut bounce, &mut ext[..n]).unwrap();
        c.writeback_commit(batch);
        n
    };
    // Kset 0, overwritten whole by kset 1, no FLUSH: passed over.
    write_sectors(&mut c, 0, keys, 0x11);
    write_sectors(&mut c, 0, keys, 0x22);
    assert_eq!(step(&c), 0, "an overwritten kset before any FLUSH");
    // Kset 1 overwritten by kset 2, with a FLUSH between: written back.
    c.flush().unwrap();
    write_sectors(&mut c, 0, keys, 0x33);
    assert_eq!(step(&c), KSET_KEYS_MAX, "a kset a FLUSH made durable");
    // Kset 3 ends with a FUA write (which closes it); kset 4 overwrites it
    // whole, and kset 5 overwrites kset 4.
    write_sectors(&mut c, 0, keys - 1, 0x44);
    c.write((keys - 1) * 512, &[0x55; 512], true, 0).unwrap();
    write_sectors(&mut c, 0, keys, 0x66);
    write_sectors(&mut c, 0, keys, 0x77);
    assert_eq!(
        step(&c),
        KSET_KEYS_MAX,
        "kset 2, overwritten after the FLUSH"
    );
    assert_eq!(step(&c), KSET_KEYS_MAX, "the kset of a FUA write");
    assert_eq!(step(&c), 0, "a kset after it, overwritten");
    assert_eq!(step(&c), KSET_KEYS_MAX, "the newest");
    assert!(c.is_clean());
    for s in 0..keys {
        assert_eq!(world.borrow().backing.read_sector(s), [s as u8 ^ 0x77; 512]);
    }
    assert_eq!(backing.1.borrow().len(), 4 * KSET_KEYS_MAX);
    c.check_invariants().unwrap();
}

/// The barrier record: a kset joins the one before it unless a FLUSH fell
/// between them; ksets up to the floor (from replay, or forgotten barriers)
/// never join; barriers behind the dirty tail are let go, and forgetting one
/// when the record is full raises the floor past it.
#[test]
fn barriers_split_batches_at_flushes_only() {
    use pcache_engine::cache_core::barriers::{Barriers, BARRIERS_MAX};
    let mut b = Barriers::attached(3);
    assert!(!b.joins(3) && b.joins(4));
    b.record(6);
    b.record(6);
    assert!(b.joins(5) && !b.joins(6) && b.joins(7));
    b.passed(6);
    assert!(b.joins(6));
    for i in 0..BARRIERS_MAX as u64 + 1 {
        b.record(10 + 2 * i);
    }
    // The oldest two (10, 12) went under the floor; every barrier after stays.
    assert!(!b.joins(11) && !b.joins(12) && b.joins(13) && !b.joins(14));
    assert!(!b.joins(10 + 2 * BARRIERS_MAX as u64) && b.joins(11 + 2 * BARRIERS_MAX as u64));
}

/// The cache device for [`Reader::hits`](pcache_engine::cache_core::Reader::hits)
/// with a race: the first pin runs `race` just before it pins.
struct RacingPmem<'r> {
    pmem: pcache_engine::sim::SimPmem,
    race: std::cell::RefCell<Option<Box<dyn FnOnce() + 'r>>>,
}

impl Pmem for RacingPmem<'_> {
    fn size(&self) -> u64 {
        self.pmem.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), pcache_engine::cache_core::IoError> {
        self.pmem.read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) {
        self.pmem.write(off, data)
    }
    fn flush(&self, off: u64, len: u64) {
        self.pmem.flush(off, len)
    }
    fn fence(&self) {
        self.pmem.fence()
    }
    fn pin(&self, seg: u32) {
        let race = self.race.borrow_mut().take();
        if let Some(race) = race {
            race();
        }
        self.pmem.pin(seg)
    }
    fn unpin(&self, seg: u32) {
        self.pmem.unpin(seg)
    }
    fn pinned(&self, seg: u32) -> bool {
        self.pmem.pinned(seg)
    }
}

/// A read hit served outside the engine finds a key, and before it pins
/// the key's segment, the key's data is written back, GC frees the segment and
/// new writes take it. The read pins and then checks the key's generation, so
/// it leaves that piece to the engine; it never copies another write's data.
/// (Checking before pinning copies the new writes' data here.)
#[test]
fn read_hits_without_the_lock_never_copy_from_a_segment_handed_out_again() {
    use pcache_engine::cache_core::io::{copy_hits, release_hits, Hit};
    use pcache_engine::cache_core::CacheError;
    let (world, mut mem) = small_world();
    let cache = std::cell::RefCell::new(small_cache(&world, &mut mem));
    let old = vec![0xa5u8; 4096];
    cache.borrow_mut().write(0, &old, true, 0).unwrap();
    let reader = cache.borrow().reader();
    let mut key = None;
    cache.borrow().for_each_key(|k| key = Some(*k));
    let key = key.unwrap();
    let seg = key.pos.seg.get();
    assert_eq!(cache.borrow().seg_gen(seg), key.gen);
    let pmem = RacingPmem {
        pmem: pcache_engine::sim::SimPmem(world.clone()),
        race: std::cell::RefCell::new(Some(Box::new(|| {
            let mut c = cache.borrow_mut();
            let new = vec![0x5au8; 4096];
            let mut off = 1u64 << 20;
            for _ in 0..10_000 {
                if c.seg_gen(seg) > key.gen && c.seg_used(seg) {
                    return;
                }
                match c.write(off, &new, false, 0) {
                    // Anywhere in 1..8 MiB: away from the key the read found.
                    Ok(()) => off = (1 << 20) + (off - (1 << 20) + 4096) % (7 << 20),
                    Err(CacheError::Busy(_)) => {
                        c.flush().unwrap();
                        c.writeback_all().unwrap();
                        c.gc_all().unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("segment {seg} was never handed out again");
        }))),
    };
    let mut hits = [Hit::default(); 4];
    let found = reader.hits(&pmem, 0, 4096, 0, &mut hits);
    assert!(pmem.race.borrow().is_none(), "the race did not run");
    assert!(cache.borrow().seg_gen(seg) > key.gen && cache.borrow().seg_used(seg));
    let mut buf = vec![0u8; 4096];
    let copied = copy_hits(&pmem, &hits[..found.hits], &mut buf[..]);
    release_hits(&pmem, &hits[..found.hits]);
    // With the data CRC on, the check fails on another write's data.
    assert!(
        found.hits == 0 || (copied.is_ok() && buf == old),
        "the read copied another write's data ({copied:?})"
    );
    assert_eq!(
        found.hits, 0,
        "a hit of a key whose segment went: {found:?}"
    );
    assert_eq!(found.next, 0);
}

/// GC collects below `gc_percent` for a write that found no data space only
/// until that write gets a segment: once writeback has caught up, the cache
/// holds the most recent writes, as upstream's does. (Collecting everything
/// written back instead left every read after a burst of writes a miss.)
#[test]
fn gc_for_a_write_that_found_no_room_stops_at_gc_percent() {
    use pcache_engine::cache_core::CacheError;
    let (world, mut mem) = sized_world(16, 4096);
    let mut c = small_cache(&world, &mut mem);
    let blocks = 128u64;
    let data = vec![0x11u8; 4096];
    let mut waited = 0;
    for i in 0..8 * blocks {
        let off = (i % blocks) * 4096;
        loop {
            match c.write(off, &data, false, 0) {
                Ok(()) => break,
                // What the background round a waiting write kicks does.
                Err(CacheError::Busy(_)) => {
                    waited += 1;
                    c.flush().unwrap();
                    while c.writeback_step().unwrap() == Step::Progress {}
                    c.gc_step().unwrap();
                }
                Err(e) => panic!("write: {e}"),
            }
        }
    }
    assert!(waited > 0, "no write found the cache full");
    c.flush().unwrap();
    c.writeback_all().unwrap();
    c.gc_all().unwrap();
    let st = c.status();
    let threshold = st.n_segs * u32::from(st.gc_percent) / 100;
    assert!(
        st.used_segs + 1 >= threshold,
        "GC left {} of {} segments in use (gc_percent {})",
        st.used_segs,
        st.n_segs,
        st.gc_percent
    );
    let held = (0..blocks).filter(|b| c.holds_any(b * 4096, 4096)).count();
    assert!(
        held as u64 >= blocks / 2,
        "the cache holds {held} of the {blocks} blocks written last"
    );
}

/// A host for [`Background::run`] in a test that runs it by hand: nothing
/// waits, and the clock (milliseconds) moves only when the test sets it.
#[derive(Default)]
struct ByHand(std::cell::Cell<u64>);

impl pcache_engine::cache_core::Waiting for ByHand {
    fn ticket(&self) -> u64 {
        0
    }
    fn wait(&self, _ticket: u64, _timeout_ms: u32) -> bool {
        true
    }
    fn wake_all(&self) {}
    fn kick(&self) {}
    fn now_ms(&self) -> u64 {
        self.0.get()
    }
}

/// GC copies the live clean data of the ksets it collects forward instead of
/// dropping it: a working set written once, partly overwritten and read now
/// and then stays cached, every block of it, while writes elsewhere take the
/// log round several times, with and without data CRC. (Dropping it made
/// every read of an untouched block a miss once GC had passed it.)
#[test]
fn gc_keeps_live_clean_data_it_collects() {
    use pcache_engine::cache_core::CacheOptions;
    const BLOCK: usize = 4096;
    for data_crc in [false, true] {
        let (world, mut mem) = sized_world(32, 4096);
        let opts = CacheOptions {
            data_crc,
            ..Default::default()
        };
        let c = start_small(&world, &mut mem, &opts).unwrap();
        let mut bg = background(&world);
        let block = |i: u64, v: u8| vec![v ^ (i as u8); BLOCK];
        let write =
            |off: u64, data: &[u8], bg: &mut SimBackground| write_making_room(&c, bg, off, data);
        // The working set: 48 blocks in 32 KiB writes, then every fourth
        // block written again, so that its first keys are partly live.
        let ws = 48u64;
        for i in (0..ws).step_by(8) {
            let data: Vec<u8> = (i..i + 8).flat_map(|b| block(b, 0x5a)).collect();
            write(i * BLOCK as u64, &data, &mut bg);
        }
        for i in (0..ws).step_by(4) {
            write(i * BLOCK as u64, &block(i, 0xa5), &mut bg);
        }
        let want = |i: u64| block(i, if i.is_multiple_of(4) { 0xa5 } else { 0x5a });
        // GC collects in log order: once it has collected this many, it has
        // passed every kset that holds a key of the working set.
        c.flush().unwrap();
        let ws_ksets = c.status().stats.ksets_written;
        // Read once: the keys' CRCs are checked, as a workload's reads would.
        let mut buf = vec![0u8; BLOCK];
        for i in 0..ws {
            c.read_cached(i * BLOCK as u64, &mut buf).unwrap();
        }
        // 16 MiB of writes to 32 other blocks, through a 2 MiB cache.
        let hot = 1u64 << 20;
        for n in 0..4096u64 {
            let i = (n * 37) % 32;
            write(hot + i * BLOCK as u64, &block(i, n as u8), &mut bg);
            if n % 32 == 0 {
                bg.run(&c, &ByHand::default(), true);
            }
            // The working set is read now and then, as a workload's would
            // be: with data CRC, a copy's CRC is checked by its first read.
            if n % 64 == 0 {
                for i in 0..ws {
                    c.read_cached(i * BLOCK as u64, &mut buf).unwrap();
                }
            }
        }
        c.flush().unwrap();
        while bg.run(&c, &ByHand::default(), true).progress {}
        let st = c.status();
        assert!(
            st.stats.ksets_gced > ws_ksets,
            "crc {data_crc}: GC collected {} ksets, the working set is in the first {ws_ksets}",
            st.stats.ksets_gced
        );
        for i in 0..ws {
            let got = c.read_cached(i * BLOCK as u64, &mut buf).unwrap();
            assert!(
                got.is_some(),
                "crc {data_crc}: block {i} of the working set is no longer cached ({st:?})"
            );
            assert_eq!(buf, want(i), "crc {data_crc}: block {i}");
        }
        assert!(
            st.stats.gc_kept_bytes > 0,
            "crc {data_crc}: GC kept nothing"
        );
    }
}

/// GC keeps a working set that fits well within `gc_percent` however GC
/// meets it: here as a run of ksets in a row, each of small keys (4 KiB
/// writes), so that the ksets GC collects while it passes the working set, and
/// the copies it makes of it, are all live. What GC saw of its whole last pass
/// says the cache's live data is an eighth of what `gc_percent` keeps, so it
/// copies all of it each time. (An average over the last eight ksets GC
/// collected climbed to all-live halfway through the run of copies, and GC
/// dropped the rest of them on its second pass.)
#[test]
fn gc_keeps_a_working_set_it_meets_as_a_run_of_live_ksets() {
    use pcache_engine::cache_core::CacheOptions;
    const BLOCK: u64 = 4096;
    const SUBTREE: u64 = 4 << 20;
    // 64 MiB of cache over 16 MiB of backing, two ksets: subtrees 0 and 2 log
    // to kset 0, subtree 1 to kset 1.
    let (world, mut mem) = world_of(1024, 1 << 15, 16 << 20, 2);
    let c = start_small(&world, &mut mem, &CacheOptions::default()).unwrap();
    let mut bg = background(&world);
    let write =
        |off: u64, data: &[u8], bg: &mut SimBackground| write_making_room(&c, bg, off, data);
    // The working set: 8 MiB in 4 KiB writes over subtrees 0 and 2, all of
    // whose keys go to kset 0: 16 full ksets in a row, then as many of copies.
    let ws: Vec<u64> = (0..1024)
        .flat_map(|i| [i * BLOCK, 2 * SUBTREE + i * BLOCK])
        .collect();
    let block = |off: u64| vec![(off / BLOCK) as u8 ^ 0x5a; BLOCK as usize];
    for &off in &ws {
        write(off, &block(off), &mut bg);
    }
    // 256 MiB of 64 KiB writes over 1 MiB of subtree 1 (kset 1): GC passes
    // the working set's ksets, and then those of its copies, several times.
    let hot = SUBTREE;
    for n in 0..4096u64 {
        let off = hot + (n % 16) * (64 << 10);
        write(off, &vec![n as u8; 64 << 10], &mut bg);
        if n % 64 == 0 {
            bg.run(&c, &ByHand::default(), true);
        }
    }
    c.flush().unwrap();
    while bg.run(&c, &ByHand::default(), true).progress {}
    let st = c.status();
    let ws_bytes = ws.len() as u64 * BLOCK;
    assert!(
        st.stats.gc_kept_bytes >= 3 * ws_bytes,
        "GC copied {} bytes: it did not pass the working set three times",
        st.stats.gc_kept_bytes
    );
    let mut buf = vec![0u8; BLOCK as usize];
    let mut lost = 0;
    for &off in &ws {
        match c.read_cached(off, &mut buf).unwrap() {
            Some(_) => assert_eq!(buf, block(off), "block at {off}"),
            None => lost += 1,
        }
    }
    assert_eq!(lost, 0, "blocks of the working set GC dropped ({st:?})");
}

/// The other side of keeping live data: when the data written is live and
/// more than `gc_percent` keeps, GC does not copy the same data round the log
/// for ever. 256 MiB of distinct 64 KiB writes through a 64 MiB cache: every
/// kset GC collects is live, and GC copies a byte at most once more after it
/// has seen that about a window of its pass (it keeps everything until then).
#[test]
fn gc_stops_copying_when_the_live_data_outgrows_gc_percent() {
    use pcache_engine::cache_core::CacheOptions;
    let backing = 256u64 << 20;
    let (world, mut mem) = world_of(1024, 1 << 15, backing, 2);
    let c = start_small(&world, &mut mem, &CacheOptions::default()).unwrap();
    let mut bg = background(&world);
    let chunk = 64u64 << 10;
    for n in 0..backing / chunk {
        write_making_room(&c, &mut bg, n * chunk, &vec![n as u8; chunk as usize]);
        if n % 64 == 0 {
            bg.run(&c, &ByHand::default(), true);
        }
    }
    c.flush().unwrap();
    // Bounded: GC that copied round the log for ever would never go idle.
    let idle = (0..1_000).any(|_| !bg.run(&c, &ByHand::default(), true).progress);
    let st = c.status();
    assert!(idle, "GC is still busy after 1,000 rounds ({st:?})");
    let window = u64::from(st.n_segs) * u64::from(st.gc_percent) / 100 * SMALL_SEG;
    assert!(
        st.stats.gc_kept_bytes <= backing + window,
        "GC copied {} bytes of {backing} written ({st:?})",
        st.stats.gc_kept_bytes
    );
}

/// GC reads each kset it collects once: its copies read the kset at the key
/// tail (and check its CRC) to find the live data, and the collection that
/// follows takes the kset from that read, not from the media again. A cache
/// full of clean data (written, written back) is collected by rounds that
/// only collect: one kset CRC per kset collected.
#[test]
fn gc_reads_each_kset_it_collects_once() {
    use pcache_engine::cache_core::CacheOptions;
    let (world, mut mem) = world_of(64, 1 << 14, 64 << 20, 2);
    let mut c = start_small(&world, &mut mem, &CacheOptions::default()).unwrap();
    let mut bg = background(&world);
    // Each write its own kset (FUA), half of them overwritten (dead).
    for n in 0..600u64 {
        let off = (n % 300) * 4096;
        while c.write(off, &[n as u8; 4096], true, 0).is_err() {
            bg.run(&c, &ByHand::default(), true);
        }
    }
    c.writeback_all().unwrap();
    c.set_gc_percent(1).unwrap();
    let before = (world.borrow().pmem_crcs, c.status().stats.ksets_gced);
    for _ in 0..1_000 {
        if !bg.run(&c, &ByHand::default(), false).progress {
            break;
        }
    }
    let after = (world.borrow().pmem_crcs, c.status().stats.ksets_gced);
    let (crcs, collected) = (after.0 - before.0, after.1 - before.1);
    assert!(
        collected > 100,
        "GC collected {collected} ksets: {:?}",
        c.status()
    );
    // And one for each LAST kset passed, at the end of each log segment.
    assert!(
        (collected..collected + collected / 50).contains(&crcs),
        "{crcs} kset CRCs checked for {collected} ksets collected"
    );
}

/// A write that waits for room gets it a writeback step after writeback
/// passes it, not a round later. The cache is filled with dirty data until a
/// write finds no room. The round the waiting request runs itself
/// (`run_for_waiter`, when no other runs) makes one writeback step, and GC
/// collects after it. A work item's round, with a request waiting
/// (`room_wanted`), runs GC after each writeback step: GC first collects a
/// kset (and wakes the waiters) after the round's first backing flush, not
/// after its sixteenth.
#[test]
fn a_write_waiting_for_room_gets_it_after_one_writeback_step() {
    use pcache_engine::cache_core::background::STEPS_PER_ROUND;
    use pcache_engine::cache_core::{CacheError, CacheOptions};
    use std::cell::Cell;
    /// Notes how many backing flushes came before the first wake.
    struct Probe<'a> {
        world: &'a SharedWorld,
        first_wake: Cell<Option<u64>>,
    }
    impl pcache_engine::cache_core::Waiting for Probe<'_> {
        fn ticket(&self) -> u64 {
            0
        }
        fn wait(&self, _ticket: u64, _timeout_ms: u32) -> bool {
            true
        }
        fn wake_all(&self) {
            let flushes = self.world.borrow().backing_flushes;
            self.first_wake.set(self.first_wake.get().or(Some(flushes)));
        }
        fn kick(&self) {}
        fn now_ms(&self) -> u64 {
            0
        }
    }
    let (world, mut mem) = sized_world(64, 1 << 14);
    let c = start_small(&world, &mut mem, &CacheOptions::default()).unwrap();
    let mut bg = background(&world);
    // Small writes, each closing its kset (FUA), so that a writeback step
    // (WB_KSETS_MAX ksets) covers little and a round has many steps to do.
    let mut n = 0u64;
    let mut fill = || loop {
        match c.write(n * 4096, &[n as u8; 4096], true, 0) {
            Ok(()) => n += 1,
            Err(CacheError::Busy(_)) => return n,
            Err(e) => panic!("write {n}: {e}"),
        }
    };
    // Both rounds: (backing flushes, the flushes before GC's first wake).
    let mut measure = |waiter: bool| {
        let probe = Probe {
            world: &world,
            first_wake: Cell::new(None),
        };
        let before = world.borrow().backing_flushes;
        let round = if waiter {
            bg.run_for_waiter(&c, &probe)
        } else {
            bg.run(&c, &probe, false)
        };
        assert!(round.writeback_error.is_none() && round.gc_error.is_none());
        let flushes = world.borrow().backing_flushes - before;
        (flushes, probe.first_wake.get().map(|f| f - before))
    };
    let written = fill();
    assert_eq!(
        measure(true),
        (1, Some(1)),
        "the waiter's round after {written} writes: (backing flushes, flushes before GC woke the waiters)"
    );
    let written = fill();
    let (flushes, first) = measure(false);
    assert!(
        flushes >= u64::from(STEPS_PER_ROUND),
        "the round wrote back in {flushes} steps after {written} writes: too few to tell"
    );
    assert_eq!(
        first,
        Some(1),
        "GC first woke the waiting writes after {first:?} of the round's {flushes} backing flushes"
    );
}

/// A FUA commit whose key went in but whose kset found no segment for the key
/// log (data filled the cache, and the log used up its reserve) is counted as
/// committed, with its kset left to persist (`Committed::Persist`): the write
/// waits for room only to persist it (`Cache::persist_owed`), commits nothing
/// again, and the data survives a restart once it returned.
#[test]
fn a_fua_commit_that_finds_no_log_segment_persists_its_kset_not_its_data_again() {
    use pcache_engine::cache_core::io::copy_in;
    use pcache_engine::cache_core::{CacheError, CacheOptions, Committed, Progress};
    use pcache_engine::meta::kset::kset_size;
    let (world, mut mem) = sized_world(24, 4096);
    let opts = CacheOptions::default();
    let mut c = start_small(&world, &mut mem, &opts).unwrap();
    let pmem = pcache_engine::sim::SimPmem(world.clone());
    // Room for more one-key ksets than two log segments take, reserved first.
    let n = 2 * SMALL_SEG as usize / kset_size(1) + 64;
    let rooms: Vec<_> = (0..n as u64)
        .map(|i| c.write_reserve(i * 512, 512, 0, 0).unwrap())
        .collect();
    // Data fills the rest, but for the segment kept for the key log.
    let big = vec![0x5au8; 32768];
    let mut off = 6 << 20;
    loop {
        match c.write(off, &big, false, 0) {
            Ok(()) => off += big.len() as u64,
            Err(CacheError::Busy(_)) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    // Each FUA commit closes a kset of its own, until the log finds no segment.
    let data = vec![0xf0u8; 512];
    let mut owed = None;
    let mut rest = rooms.into_iter();
    for r in rest.by_ref() {
        let crc = copy_in(&pmem, &r, &data[..], 0).unwrap();
        match c.write_commit(&r, crc, true).unwrap() {
            Committed::Done(_) => {}
            persist @ Committed::Persist(_) => {
                owed = Some((r, persist));
                break;
            }
        }
    }
    let (r, persist) = owed.expect("the key log never ran out of segments");
    let mut p = Progress::default();
    p.committed(&r, persist);
    assert_eq!((p.done, p.persist), (512, Some(r.off)));
    assert!(matches!(c.persist_owed(&mut p), Err(CacheError::Busy(_))));
    assert_eq!(p.persist, Some(r.off), "a failed persist is still owed");
    // Room made: the kset is persisted, and the write is done with one key.
    for r in rest {
        c.write_cancel(&r);
    }
    c.writeback_all().unwrap();
    while c.gc_step().unwrap() == pcache_engine::cache_core::writeback::Step::Progress {}
    c.persist_owed(&mut p).unwrap();
    assert_eq!((p.done, p.persist), (512, None));
    let mut keys = 0;
    c.for_each_key(|k| keys += usize::from(k.off < r.off + 512 && k.end() > r.off));
    assert_eq!(keys, 1);
    c.check_invariants().unwrap();
    // What a restart replays: the FUA write, persisted before it returned.
    drop(c);
    let c = start_small(&world, &mut mem, &opts).unwrap();
    let mut buf = vec![0u8; 512];
    c.read(r.off, &mut buf, false, 0).unwrap();
    assert_eq!(buf, data);
}

/// The writeback policy alone: lazy below the high watermark, down to the low
/// one once past it, at once when room is short or nothing is dirty, and a
/// drain after `IDLE_MS` without new dirty data.
#[test]
fn writeback_watermark_policy() {
    use pcache_engine::cache_core::watermark::{
        Watermark, Why, HIGH_PERCENT, IDLE_MS, LOW_PERCENT,
    };
    let cap = 1000u64 << 20;
    let pct = |p: u64| cap / 100 * p;
    let mut w = Watermark::default();
    w.observe(0, 10);
    assert_eq!(
        w.wants(0, 10, cap, false),
        None,
        "a little dirty data waits"
    );
    assert_eq!(w.wants(0, 10, cap, true), Some(Why::Room));
    // Writes keep coming: no drain however long it runs.
    for t in 1..=10 {
        w.observe(t * IDLE_MS / 2, 10 + t);
        assert_eq!(w.wants(t * IDLE_MS / 2, 10 + t, cap, false), None, "at {t}");
    }
    // Past the high watermark: writeback until down to the low one.
    let now = 5 * IDLE_MS + 1;
    w.observe(now, pct(HIGH_PERCENT) + 100);
    assert_eq!(
        w.wants(now, pct(HIGH_PERCENT), cap, false),
        Some(Why::Watermark)
    );
    assert_eq!(
        w.wants(now, pct(LOW_PERCENT) + 1, cap, false),
        Some(Why::Watermark)
    );
    assert_eq!(w.wants(now, pct(LOW_PERCENT), cap, false), None);
    assert_eq!(
        w.wants(now, pct(HIGH_PERCENT) - 1, cap, false),
        None,
        "below high again, not above it since"
    );
    // No new dirty data for IDLE_MS: drain what is left.
    let later = now + IDLE_MS;
    w.observe(later, pct(HIGH_PERCENT) + 100);
    assert_eq!(w.wants(later - 1, 1, cap, false), None);
    assert_eq!(w.wants(later, 1, cap, false), Some(Why::Idle));
    assert_eq!(
        w.wants(later, 0, cap, false),
        Some(Why::Clean),
        "nothing dirty: moving the dirty tail copies nothing"
    );
}

/// The background rounds follow the watermark on a live cache: dirty data
/// under the low watermark stays dirty while writes go on (nothing written
/// back, the dirty tail where it was), a cache left idle for `IDLE_MS` drains
/// to the backing device, and writes past the high watermark are written back
/// down to the low one without waiting for the cache to go idle.
#[test]
fn background_writeback_waits_for_the_watermark_or_idle() {
    use pcache_engine::cache_core::watermark::{HIGH_PERCENT, IDLE_MS, LOW_PERCENT};
    use pcache_engine::cache_core::CacheOptions;
    let (world, mut mem) = world_of(64, 1 << 14, 8 << 20, 2);
    let c = start_small(&world, &mut mem, &CacheOptions::default()).unwrap();
    let cap = c.capacity();
    let clock = ByHand::default();
    let mut bg = background(&world);
    let block = 4096u64;
    let mut n = 0u64;
    // Writes to a working set of a quarter of the cache, a round every 100 ms.
    let mut write_until =
        |c: &pcache_engine::cache_core::Cache<_, _, _>, bg: &mut SimBackground, dirty: u64| {
            let start = n;
            while c.dirty_bytes() < dirty {
                assert!(
                    n - start < 4 * cap / block,
                    "dirty data never reached {dirty} bytes in {} writes: {:?}",
                    n - start,
                    c.status()
                );
                let off = (n % (cap / 4 / block)) * block;
                write_making_room_at(c, bg, &clock, off, &[n as u8; 4096]);
                n += 1;
                if n.is_multiple_of(16) {
                    clock.0.set(clock.0.get() + 100);
                    let r = bg.run(c, &clock, false);
                    assert!(r.writeback_error.is_none() && r.gc_error.is_none(), "{r:?}");
                }
            }
        };
    let low = cap / 100 * LOW_PERCENT;
    write_until(&c, &mut bg, low - 8 * block);
    let st = c.status();
    assert_eq!(
        st.stats.bytes_written_back, 0,
        "wrote back under the low watermark while writes came: {st:?}"
    );
    // Idle: rounds every 100 ms and no writes; the rounds from IDLE_MS after
    // the last write on drain it.
    let mut drained_at = None;
    for i in 1..1000 {
        clock.0.set(clock.0.get() + 100);
        bg.run(&c, &clock, false);
        if c.dirty_bytes() == 0 {
            drained_at = Some(i * 100);
            break;
        }
    }
    assert!(
        drained_at.is_some_and(|t| t >= IDLE_MS),
        "drained {drained_at:?} ms after the last write (idle after {IDLE_MS} ms)"
    );
    let st = c.status();
    assert_eq!(st.dirty_bytes, 0, "an idle cache did not drain: {st:?}");
    assert_eq!(st.dirty_tail, st.key_head, "{st:?}");
    // Past the high watermark, with writes going on: written back to the low.
    let high = cap / 100 * HIGH_PERCENT;
    let before = c.status().stats.ksets_written_back;
    write_until(&c, &mut bg, high);
    for _ in 0..1000 {
        if !bg.run(&c, &clock, false).more {
            break;
        }
    }
    let st = c.status();
    assert!(
        st.stats.ksets_written_back > before && st.dirty_bytes <= low,
        "past the high watermark ({high}), wrote back {} ksets, dirty now {} (low {low}): {st:?}",
        st.stats.ksets_written_back - before,
        st.dirty_bytes
    );
    assert!(
        st.dirty_bytes > low / 2,
        "wrote back far past the low watermark ({low}): {st:?}"
    );
}
