//! Attaching a cache device: format a blank one or load and validate an existing
//! one, then replay (upstream `cache_dev_start` + `pcache_cache_start`).

use super::barriers::Barriers;
use super::ctrl::Held;
use super::env::{persist, Backing, Locked, Pmem, SubtreeLocks};
use super::error::CacheError;
use super::index::Index;
use super::key::Pos;
use super::options::CacheOptions;
use super::segment::SegMap;
use super::{roots_needed, Cache, CacheMem, Counters, Memory, Mode, Tail, SCRATCH_BYTES};
use crate::meta::cache_info::{
    CacheInfo, CachePosOnmedia, CtrlPos, CACHE_FLAGS_DATA_CRC, CACHE_FLAGS_INIT_DONE,
    CACHE_INFO_STRUCT_SIZE, CACHE_POS_STRUCT_SIZE, GC_PERCENT_DEFAULT, GC_PERCENT_MAX,
};
use crate::meta::header::{pick_latest, MetaHeader, SlotIndex, Slotted};
use crate::meta::kset::{KSET_HEADER_SIZE, KSET_KEYS_MAX};
use crate::meta::layout::{
    Geometry, CACHE_CTRL_SIZE, CACHE_INFO_OFF, CACHE_INFO_SIZE, META_INDEX_MAX, SB_OFF,
    SEG_DATA_OFF,
};
use crate::meta::segment::{SegGen, SegmentInfo, SEGMENT_TYPE_CACHE_DATA};
use crate::meta::superblock::{Superblock, SB_STRUCT_SIZE};
use crate::meta::{MetaError, MetaErrorKind};
use core::sync::atomic::AtomicBool;

const ZERO_4K: [u8; 4096] = [0u8; 4096];

fn zero_range<P: Pmem>(pmem: &P, off: u64, len: u64) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(4096);
        pmem.write(off + done, ZERO_4K.get(..n as usize).unwrap_or(&[]));
        done += n;
    }
    pmem.flush(off, len);
    pmem.fence();
}

fn read_slot<P: Pmem, const N: usize>(pmem: &P, off: u64) -> Result<[u8; N], CacheError> {
    let mut b = [0u8; N];
    pmem.read(off, &mut b)
        .map_err(|_| CacheError::Io("media error reading metadata"))?;
    Ok(b)
}

/// Why [`Cache::start`] refused a table whose cache mode differs from the cache's.
pub const MODE_MISMATCH: &str =
    "the table's cache_mode differs from the cache device's, which holds dirty data";

/// The `PCACHE_CACHE_MODE_*` values the engine runs.
fn mode_supported(mode: u32) -> bool {
    super::Mode::from_bits(mode).is_some()
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Attach: format the device if its superblock is blank, otherwise validate the
    /// metadata and replay the key log. `geo` is [`Geometry::UPSTREAM`] in the
    /// kernel. `opts.data_crc` need not match what the cache was created with:
    /// data written from now on follows it (a table reload can switch it, and the
    /// line `dmsetup table` prints loads back), as [`Self::set_data_crc`] would.
    pub fn start(
        pmem: P,
        backing: B,
        geo: Geometry,
        mem: CacheMem<M>,
        opts: &CacheOptions,
    ) -> Result<Self, CacheError> {
        let dev_size = pmem.size();
        if dev_size < geo.min_dev_size {
            return Err(CacheError::Invalid("cache device is too small"));
        }
        if !mode_supported(opts.cache_mode) {
            return Err(CacheError::Invalid("unknown cache_mode"));
        }
        let sb_bytes: [u8; SB_STRUCT_SIZE] = read_slot(&pmem, SB_OFF)?;
        let raw = Superblock::decode_raw(&sb_bytes)?;
        let mut format_sb = None;
        if raw.magic == 0 {
            let sb = Superblock::format(&geo, dev_size)?;
            zero_range(
                &pmem,
                CACHE_INFO_OFF,
                CACHE_INFO_SIZE * META_INDEX_MAX as u64 + CACHE_CTRL_SIZE,
            );
            format_sb = Some(sb);
        }
        let sb = match format_sb {
            Some(sb) => sb,
            None => Superblock::parse(&sb_bytes, &geo, dev_size)?,
        };
        if let Some(sb) = format_sb {
            let mut b = [0u8; SB_STRUCT_SIZE];
            sb.encode(&mut b);
            persist(&pmem, SB_OFF, &b);
        }

        let dev_bytes = backing.size();
        if dev_bytes == 0 {
            return Err(CacheError::Invalid("backing device is empty"));
        }
        if mem.ctrl.with(|t| t.segs.len()) < sb.seg_num as usize
            || mem.seg_map.len() < sb.seg_num as usize
        {
            return Err(CacheError::NoMem("segment table smaller than seg_num"));
        }
        if mem.roots.len() < roots_needed(dev_bytes) {
            return Err(CacheError::NoMem("fewer subtree roots than 4 MiB stripes"));
        }
        if mem.locks.len() < roots_needed(dev_bytes) {
            return Err(CacheError::NoMem("fewer subtree locks than 4 MiB stripes"));
        }
        if mem.log.n_ksets() == 0 || mem.space.n_heads() == 0 {
            return Err(CacheError::NoMem(
                "need at least one kset and one data head",
            ));
        }
        if mem.ctrl.with(|t| t.scratch.len()) < SCRATCH_BYTES || mem.bounce.len() < 4096 {
            return Err(CacheError::NoMem("scratch or bounce buffer too small"));
        }
        if mem.wb_extents.len() < KSET_KEYS_MAX {
            return Err(CacheError::NoMem(
                "fewer writeback extents than keys in a kset",
            ));
        }
        let n_roots = roots_needed(dev_bytes);
        mem.ctrl.with(|t| t.reset());
        mem.log.reset();
        mem.space.reset();
        mem.space.set_data_crc(opts.data_crc);
        mem.in_flight.with(|f| *f = Default::default());

        let mut cache: Cache<P, B, M> = Cache {
            pmem,
            backing,
            geo,
            dev_bytes,
            n_segs: 0,
            mode: Mode::Writeback,
            seg_map: SegMap::new(mem.seg_map),
            index: Index::new(mem.nodes, mem.roots, mem.locks, mem.free, n_roots),
            log: mem.log,
            space: mem.space,
            ctrl: mem.ctrl,
            in_flight: mem.in_flight,
            wb_bufs: Some((mem.wb_extents, mem.bounce)),
            need_clean: AtomicBool::new(false),
            stats: Counters::default(),
        };

        // The recorded mode until the log is replayed (a mode that writes
        // through replays nothing into the index), the table's after.
        let (n_segs, recorded) = cache.held(|h| {
            h.cache_info_init(opts, sb.seg_num)?;
            Ok::<_, CacheError>((h.t.info.n_segs, h.t.info.cache_mode()))
        })?;
        cache.n_segs = n_segs;
        cache.mode = Mode::from_bits(recorded).unwrap_or(Mode::Writeback);
        cache.held(|h| {
            let new_cache = !h.t.info.init_done();
            h.segs_init(new_cache, sb.seg_num)?;
            h.tail_init(new_cache)?;
            h.replay()
        })?;
        cache
            .log
            .with_head(|h| h.barriers = Barriers::attached(h.seq_head));
        // The table's data_crc applies from now on; the media flag follows it as
        // far as the keys already in the log allow (see `set_data_crc`), but only
        // from the first write (or GC step) on: a constructor that never serves
        // IO — a table load that is cleared again while the old instance stays
        // — must not change the flag under the instance that owns the device.
        cache.held(|h| {
            let pending = h.media_crc_allowed() != h.t.info.data_crc();
            h.space.set_crc_flag_pending(pending);
            let crc_wanted = opts.data_crc || h.t.info.data_crc();
            h.log.set_crc_wanted(crc_wanted);
            // Another mode than the one recorded: only for a cache without dirty data,
            // whose keys all match the backing device (the modes that write through
            // never have any), so no mode takes over data it would handle otherwise.
            if h.t.info.cache_mode() != opts.cache_mode {
                if h.log.dirty_bytes() != 0 {
                    return Err(CacheError::Invalid(MODE_MISMATCH));
                }
                h.t.info.set_cache_mode(opts.cache_mode);
            }
            h.t.info.flags |= CACHE_FLAGS_INIT_DONE;
            h.cache_info_write();
            Ok(())
        })?;
        cache.mode = Mode::from_bits(opts.cache_mode).unwrap_or(Mode::Writeback);
        Ok(cache)
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// `pcache_cache_set_gc_percent` (message `gc_percent N`).
    pub fn set_gc_percent(&self, percent: u8) -> Result<(), CacheError> {
        if percent > GC_PERCENT_MAX {
            return Err(CacheError::Invalid("gc_percent must be between 0 and 90"));
        }
        self.held(|h| {
            h.t.info.set_gc_percent(percent);
            h.cache_info_write();
        });
        Ok(())
    }

    /// `dmsetup message <dev> 0 data_crc true|false`: data written from now on
    /// carries a CRC (checked on read and before writeback) or not; keys record
    /// which (`KEY_FLAGS_DATA_CRC`), so data already cached keeps its own setting.
    ///
    /// The on-media `cache_info` flag `DATA_CRC` keeps upstream's meaning — every
    /// key in the log has a valid CRC, which the C module checks when it decodes
    /// a key — so a device stays attachable by the C module: switching off clears
    /// the flag (persisted before any key without a CRC can be), switching on sets
    /// it only once the key tail has passed every key without a CRC (now, or later
    /// from GC). Until then the C module attaches with `data_crc false`.
    pub fn set_data_crc(&self, on: bool) -> Result<(), CacheError> {
        self.held(|h| {
            h.space.set_data_crc(on);
            h.sync_crc_flag();
        });
        Ok(())
    }

    /// [`Held::sync_crc_flag`] when a reservation finds it pending.
    pub(crate) fn sync_crc_flag(&self) {
        self.held(|h| h.sync_crc_flag());
    }
}

impl<P: Pmem, B: Backing, M: Memory> Held<'_, P, B, M> {
    fn cache_info_init(&mut self, opts: &CacheOptions, seg_num: u32) -> Result<(), CacheError> {
        let s0: [u8; CACHE_INFO_STRUCT_SIZE] = read_slot(&self.pmem, CacheInfo::slot_off(0))?;
        let s1: [u8; CACHE_INFO_STRUCT_SIZE] = read_slot(&self.pmem, CacheInfo::slot_off(1))?;
        match pick_latest::<CacheInfo>(&s0, &s1)? {
            Some((idx, info)) => {
                // A data_crc differing from the media is not an error (unlike
                // upstream): `start` switches to the table's value after replay.
                self.t.info = info;
                self.t.info_index = idx;
                const CI: &str = "pcache_cache_info";
                if info.n_segs == 0 || info.n_segs > seg_num {
                    return Err(MetaError::new(CI, "n_segs", MetaErrorKind::OutOfRange).into());
                }
                if info.gc_percent() > GC_PERCENT_MAX {
                    return Err(
                        MetaError::new(CI, "flags.gc_percent", MetaErrorKind::OutOfRange).into(),
                    );
                }
                if !mode_supported(info.cache_mode()) {
                    return Err(
                        MetaError::new(CI, "flags.cache_mode", MetaErrorKind::Unsupported).into(),
                    );
                }
                if info.init_done() && info.seg_id >= seg_num {
                    return Err(MetaError::new(CI, "seg_id", MetaErrorKind::OutOfRange).into());
                }
            }
            None => {
                // No valid slot: a new cache only if both slots are blank (format zeroes
                // them); anything else is corrupt metadata and must not be overwritten.
                if s0.iter().chain(s1.iter()).any(|&b| b != 0) {
                    return Err(MetaError::new(
                        "pcache_cache_info",
                        "header.crc",
                        MetaErrorKind::NoValidSlot,
                    )
                    .into());
                }
                let mut info = CacheInfo {
                    n_segs: seg_num,
                    ..CacheInfo::default()
                };
                info.set_gc_percent(GC_PERCENT_DEFAULT);
                info.set_cache_mode(opts.cache_mode);
                if opts.data_crc {
                    info.flags |= CACHE_FLAGS_DATA_CRC;
                }
                self.t.info = info;
                // Upstream starts at slot 0 and writes the next one first.
                self.t.info_index = SlotIndex::FIRST;
            }
        }
        Ok(())
    }

    /// `cache_info_write`: seq+1, next slot, persist.
    pub(crate) fn cache_info_write(&mut self) {
        self.t.info.header.seq = self.t.info.header.seq.wrapping_add(1);
        self.t.info_index = self.t.info_index.other();
        let mut b = [0u8; CACHE_INFO_STRUCT_SIZE];
        self.t.info.encode_with_crc(&mut b);
        let off = CacheInfo::slot_off(self.t.info_index.get());
        persist(&self.pmem, off, &b);
    }

    /// The on-media `DATA_CRC` flag may be set: data CRC is on, no open kset
    /// holds a key without a CRC, and the key tail has passed every logged one.
    pub(crate) fn media_crc_allowed(&self) -> bool {
        // The open ksets first, then the head: a kset closed after its look
        // has counted its keys in `nocrc_until` by the time the head is read.
        self.data_crc()
            && !self.log.any_nocrc()
            && self.t.log_seq_tail >= self.log.with_head(|h| h.nocrc_until)
    }

    /// Set or clear the on-media `DATA_CRC` flag as [`Self::media_crc_allowed`] says.
    ///
    /// The key log's `crc_wanted` keeps commits made outside the engine
    /// in step: it is set before the look at the open ksets that found no key
    /// without a CRC, each under its kset's lock, and the flag persisted after
    /// it, so none is appended after the look (a commit reads it under its
    /// kset's lock); and cleared only once a cleared flag is persisted.
    pub(crate) fn sync_crc_flag(&mut self) {
        self.space.set_crc_flag_pending(false);
        let data_crc = self.data_crc();
        if data_crc {
            self.log.set_crc_wanted(true);
        }
        let want = self.media_crc_allowed();
        if want != self.t.info.data_crc() {
            self.t.info.flags ^= CACHE_FLAGS_DATA_CRC;
            self.cache_info_write();
        }
        let media = self.t.info.data_crc();
        self.log.set_crc_wanted(media || data_crc);
    }

    fn segs_init(&mut self, new_cache: bool, seg_num: u32) -> Result<(), CacheError> {
        const SI: &str = "pcache_segment_info";
        let geo = self.geo;
        for i in 0..self.n_segs {
            // Cache segment `i` (the loop bound is the segment count) and the one before.
            let (Some(id), prev_id) = (
                self.seg_id(i),
                i.checked_sub(1).and_then(|p| self.seg_id(p)),
            ) else {
                break;
            };
            let phys = if new_cache {
                // A blank device hands out physical segments in order.
                let phys = i;
                if i == 0 {
                    self.t.info.seg_id = phys;
                } else {
                    if let Some(prev_id) = prev_id {
                        if let Some(prev) = self.seg_mut(prev_id) {
                            prev.info.flags |= crate::meta::segment::SEG_INFO_FLAGS_HAS_NEXT;
                            prev.info.next_seg = phys;
                        }
                        self.seg_info_write(prev_id);
                    }
                }
                phys
            } else {
                let phys = if i == 0 {
                    self.t.info.seg_id
                } else {
                    let prev = prev_id.map(|p| self.seg(p).info).unwrap_or_default();
                    if !prev.has_next() {
                        return Err(MetaError::new(
                            SI,
                            "flags.has_next",
                            MetaErrorKind::OutOfRange,
                        )
                        .into());
                    }
                    prev.next_seg
                };
                if phys >= seg_num {
                    return Err(MetaError::new(SI, "next_seg", MetaErrorKind::OutOfRange).into());
                }
                phys
            };
            // The `claimed` flags, indexed by physical segment, find two cache segments on one
            // physical segment, which would overwrite each other.
            let phys_entry = self.seg_id(phys).ok_or(MetaError::new(
                SI,
                "next_seg",
                MetaErrorKind::OutOfRange,
            ))?;
            if self.seg(phys_entry).claimed {
                return Err(MetaError::new(SI, "next_seg", MetaErrorKind::Cycle).into());
            }
            if let Some(s) = self.seg_mut(phys_entry) {
                s.claimed = true;
            }
            self.seg_map.set_phys(id, phys);

            if new_cache {
                zero_range(&self.pmem, geo.seg_off(phys), SEG_DATA_OFF);
                self.seg_map.set_gen(id, 0);
                if let Some(s) = self.seg_mut(id) {
                    s.gen_seq = 0;
                    s.gen_index = SlotIndex::FIRST;
                }
                self.seg_gen_write(id);
                if let Some(s) = self.seg_mut(id) {
                    s.info = SegmentInfo::default();
                    s.info.set_type(SEGMENT_TYPE_CACHE_DATA);
                    s.info_index = SlotIndex::FIRST;
                }
                self.seg_info_write(id);
                // Clear any stale kset at the start of the data area.
                persist(&self.pmem, geo.seg_data_off(phys), &[0u8; KSET_HEADER_SIZE]);
            } else {
                let a: [u8; 16] = read_slot(&self.pmem, SegmentInfo::slot_off(&geo, phys, 0))?;
                let b: [u8; 16] = read_slot(&self.pmem, SegmentInfo::slot_off(&geo, phys, 1))?;
                let (idx, info) = pick_latest::<SegmentInfo>(&a, &b)?.ok_or(MetaError::new(
                    SI,
                    "header.crc",
                    MetaErrorKind::NoValidSlot,
                ))?;
                let a: [u8; 16] = read_slot(&self.pmem, SegGen::slot_off(&geo, phys, 0))?;
                let b: [u8; 16] = read_slot(&self.pmem, SegGen::slot_off(&geo, phys, 1))?;
                let gen = pick_latest::<SegGen>(&a, &b)?;
                self.seg_map.set_gen(id, gen.map_or(0, |(_, g)| g.gen));
                let Some(s) = self.seg_mut(id) else {
                    continue;
                };
                s.info = info;
                s.info_index = idx;
                match gen {
                    Some((gidx, g)) => {
                        s.gen_seq = g.header.seq;
                        s.gen_index = gidx;
                    }
                    None => {
                        s.gen_seq = 0;
                        s.gen_index = SlotIndex::FIRST;
                    }
                }
            }
        }
        Ok(())
    }

    fn tail_init(&mut self, new_cache: bool) -> Result<(), CacheError> {
        if new_cache {
            let head = Pos::default();
            self.log.with_head(|h| h.head = head);
            self.set_used(head.seg, true);
            self.t.key_tail = Tail {
                pos: head,
                seq: 0,
                // Upstream writes the position at the current index, then flips.
                index: SlotIndex::SECOND,
            };
            self.t.dirty_tail = self.t.key_tail;
            self.encode_tail(CtrlPos::DirtyTail);
            self.encode_tail(CtrlPos::KeyTail);
        } else {
            self.t.key_tail = self.decode_tail(CtrlPos::KeyTail)?;
            self.t.dirty_tail = self.decode_tail(CtrlPos::DirtyTail)?;
            self.verify_dirty_tail()?;
        }
        Ok(())
    }

    /// `cache_pos_encode`: persist a tail position in its next slot.
    pub(crate) fn encode_tail(&mut self, which: CtrlPos) {
        let t = match which {
            CtrlPos::KeyTail => &mut self.t.key_tail,
            CtrlPos::DirtyTail => &mut self.t.dirty_tail,
        };
        t.seq = t.seq.wrapping_add(1);
        t.index = t.index.other();
        let p = CachePosOnmedia {
            header: MetaHeader {
                seq: t.seq,
                ..MetaHeader::default()
            },
            cache_seg_id: t.pos.seg.get(),
            seg_off: t.pos.off,
        };
        let off = which.slot_off(t.index.get());
        let mut b = [0u8; CACHE_POS_STRUCT_SIZE];
        p.encode_with_crc(&mut b);
        persist(&self.pmem, off, &b);
    }

    fn decode_tail(&self, which: CtrlPos) -> Result<Tail, CacheError> {
        let a: [u8; CACHE_POS_STRUCT_SIZE] = read_slot(&self.pmem, which.slot_off(0))?;
        let b: [u8; CACHE_POS_STRUCT_SIZE] = read_slot(&self.pmem, which.slot_off(1))?;
        let (idx, p) = pick_latest::<CachePosOnmedia>(&a, &b)?.ok_or(MetaError::new(
            which.name(),
            "header.crc",
            MetaErrorKind::NoValidSlot,
        ))?;
        let Some(seg) = self.seg_id(p.cache_seg_id) else {
            return Err(
                MetaError::new(which.name(), "cache_seg_id", MetaErrorKind::OutOfRange).into(),
            );
        };
        if p.seg_off >= self.geo.seg_data_size() {
            return Err(MetaError::new(which.name(), "seg_off", MetaErrorKind::OutOfRange).into());
        }
        Ok(Tail {
            pos: Pos {
                seg,
                off: p.seg_off,
            },
            seq: p.header.seq,
            // The next write goes to the other slot, keeping the newest copy intact.
            index: idx,
        })
    }
}
