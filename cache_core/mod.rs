//! The dm-pcache cache engine: a persistent-memory write-back cache as a pure
//! state machine over the [`env`] traits.
//!
//! Data is appended to cache segments through data heads; each write becomes a
//! [`key::Key`] inserted into the striped [`index`] and appended to an open kset.
//! A kset is made durable in order — data, then the kset with its CRC, then (for
//! segment changes) the head position — by [`Cache::flush`] (REQ_PREFLUSH), by a
//! FUA write, when it fills, or by [`Cache::flush_idle`]. [`Cache::start`] formats a
//! new device or validates and replays an existing one ([`replay`]).
//! [`Cache::writeback_step`] writes the dirty keys of the ksets up to the next
//! application FLUSH back ([`barriers`]) and advances the dirty tail only after a
//! backing flush ([`writeback`]);
//! [`Cache::gc_step`] reclaims from the key tail ([`gc`]).
//!
//! Memory: everything is handed in at construction ([`CacheMem`]); the IO path
//! never allocates. `core` only, no `unsafe`, no panicking paths on media input.

pub mod background;
pub mod barriers;
pub mod ctrl;
pub mod data;
pub mod env;
pub mod error;
pub mod fill;
pub mod forward;
pub mod gc;
pub mod index;
pub mod invariants;
pub mod io;
pub mod key;
pub mod key_log;
pub mod kset;
pub(crate) mod log_cursor;
pub mod memory;
pub mod mode;
pub mod options;
pub mod reader;
pub mod replay;
pub mod request;
pub mod segment;
pub mod space;
pub mod start;
pub mod stats;
pub mod through;
pub mod watermark;
pub mod write_path;
pub mod writeback;

use crate::meta::header::SlotIndex;
use crate::meta::kset::KSET_ONMEDIA_SIZE_MAX;
use crate::meta::layout::Geometry;
use core::sync::atomic::AtomicBool;

pub use ctrl::Ctrl;
pub use data::{Sink, Source, Zeros};
pub use env::{Backing, IoError, Locked, Pmem, SubtreeLocks, Waiting};
pub use error::CacheError;
pub use index::{FreeList, Index, Node, Root, Trees};
pub use key::{Key, Pos, SegId};
pub use key_log::{KeyLog, LogHead};
pub use kset::KsetBuf;
pub use memory::{key_capacity, CacheMem, Memory};
pub use mode::Mode;
pub use options::CacheOptions;
pub use reader::Reader;
pub use segment::{SegMap, SegMapEntry, SegState};
pub use space::{SegCount, Space};
pub use stats::{Counter, Counters, RequestCounts, Stats, STATUS_STATS};
pub use write_path::{Committed, Progress, WritePath};
pub use writeback::WbExtent;

/// A data head: where the next data of one CPU is appended.
#[derive(Debug, Clone, Copy, Default)]
pub struct DataHead {
    pub pos: Option<Pos>,
}

/// How much [`CacheMem`] a device needs.
pub fn roots_needed(backing_bytes: u64) -> usize {
    backing_bytes.div_ceil(crate::meta::layout::SUBTREE_SIZE) as usize
}

pub const SCRATCH_BYTES: usize = KSET_ONMEDIA_SIZE_MAX;

/// A snapshot for `dmsetup status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub n_segs: u32,
    pub used_segs: u32,
    pub gc_percent: u8,
    pub cache_flags: u32,
    pub key_head: Pos,
    pub dirty_tail: Pos,
    pub key_tail: Pos,
    /// Whether data written from now on gets a CRC (`cache_flags` holds the
    /// on-media `DATA_CRC` flag, which may lag behind; see [`Cache::set_data_crc`]).
    pub data_crc: bool,
    pub keys: usize,
    pub key_capacity: usize,
    /// Bytes of dirty keys logged and not yet written back (a key overwritten
    /// before writeback still counts: writeback copies it).
    pub dirty_bytes: u64,
    pub stats: Stats,
}

/// A persisted position and the slot its next write goes to.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tail {
    pub pos: Pos,
    pub seq: u8,
    pub index: SlotIndex,
}

/// The cache engine over pmem `P` and backing device `B`.
///
/// Shared: every method a running cache calls takes `&self`, and each part
/// of the engine is under a lock of its own or is atomic (the index's
/// subtrees, the open ksets and the key head, the data heads and the
/// segments in use, the control state ([`ctrl`]), the writes through in
/// flight). Only starting and the synchronous writeback of a caller that owns
/// the engine ([`Cache::writeback_all`]) take `&mut self`.
pub struct Cache<P: Pmem, B: Backing, M: Memory> {
    pub(crate) pmem: P,
    pub(crate) backing: B,
    pub(crate) geo: Geometry,
    pub(crate) dev_bytes: u64,
    pub(crate) n_segs: u32,
    /// The cache mode, fixed for the life of the engine (the table sets it).
    pub(crate) mode: Mode,
    pub(crate) seg_map: SegMap<M>,
    pub(crate) index: Index<M>,
    /// The open ksets and the key head, each under its own lock.
    pub(crate) log: M::One<KeyLog<M>>,
    /// The data heads and the free segments, each under its own lock.
    pub(crate) space: M::One<Space<M>>,
    /// The cache info, the tails and the segments' metadata slots.
    pub(crate) ctrl: M::Lock<ctrl::Ctrl<M>>,
    /// Writes through to the backing device in flight (see [`through`]).
    pub(crate) in_flight: M::Lock<through::InFlight>,
    /// The buffers of [`Cache::writeback_step`], for a caller that owns the
    /// engine; `None` only while it runs.
    pub(crate) wb_bufs: Option<(M::Buf<WbExtent>, M::Buf<u8>)>,
    /// GC freed a segment: the clean pass has keys to drop (see
    /// [`Cache::clean_step`]).
    pub(crate) need_clean: AtomicBool,
    pub(crate) stats: Counters,
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    pub fn status(&self) -> Status {
        let (key_head, written) = self.log.with_head(|h| (h.head, h.written));
        // Writeback moves bytes from `dirty_bytes` to `bytes_written_back`
        // under the control lock (`writeback_commit`): both are read under it.
        let (gc_percent, cache_flags, dirty_tail, key_tail, dirty_bytes, mut stats) =
            self.held(|h| {
                (
                    h.t.info.gc_percent(),
                    h.t.info.flags,
                    h.t.dirty_tail.pos,
                    h.t.key_tail.pos,
                    h.log.dirty_bytes(),
                    h.stats.snapshot(),
                )
            });
        stats.ksets_written = written;
        Status {
            n_segs: self.n_segs,
            used_segs: self.used_segs(),
            gc_percent,
            cache_flags,
            key_head,
            dirty_tail,
            key_tail,
            data_crc: self.data_crc(),
            keys: self.index.len(),
            key_capacity: self.index.capacity(),
            dirty_bytes,
            stats,
        }
    }

    /// Bytes of dirty keys logged and not yet written back.
    pub fn dirty_bytes(&self) -> u64 {
        self.log.dirty_bytes()
    }

    /// Bytes of dirty keys logged since start (see [`KeyLog::dirty_logged`]).
    pub fn dirty_logged(&self) -> u64 {
        self.log.dirty_logged()
    }

    /// Bytes of the cache device, in whole segments.
    pub fn capacity(&self) -> u64 {
        u64::from(self.n_segs).saturating_mul(self.geo.seg_size)
    }

    /// `stats reset` (see [`Stats::reset`]).
    pub fn reset_stats(&self) {
        self.stats.reset();
        self.log.with_head(|h| h.written = 0);
    }

    /// Whether the cache holds any of `off..off + len` (a write there is a write
    /// hit). A read miss's placeholder holds nothing.
    pub fn holds_any(&self, off: u64, len: u64) -> bool {
        let mut any = false;
        self.index
            .each_overlap(off, off.saturating_add(len), &mut |k, _, _| {
                any = !k.empty();
                !any
            });
        any
    }

    /// State of cache segment `id` (a default value when out of range).
    pub fn segment(&self, id: u32) -> SegState {
        self.seg_id(id)
            .map(|id| self.held(|h| h.seg(id)))
            .unwrap_or_default()
    }

    /// The physical segment cache segment `id` lives on (0 when out of range).
    pub fn seg_phys(&self, id: u32) -> u32 {
        self.seg_id(id).map_or(0, |id| self.seg_map.phys(id))
    }

    /// Whether cache segment `id` is in use (false when out of range).
    pub fn seg_used(&self, id: u32) -> bool {
        self.seg_id(id).is_some_and(|id| self.seg_map.used(id))
    }

    /// The references on cache segment `id` (0 when out of range).
    pub fn seg_refs(&self, id: u32) -> u32 {
        self.seg_id(id).map_or(0, |id| self.seg_map.refs(id))
    }

    /// The generation of cache segment `id` (0 when out of range).
    pub fn seg_gen(&self, id: u32) -> u64 {
        self.seg_id(id).map_or(0, |id| self.seg_map.gen(id))
    }

    pub fn pmem(&self) -> &P {
        &self.pmem
    }

    pub fn pmem_mut(&mut self) -> &mut P {
        &mut self.pmem
    }

    pub fn backing(&self) -> &B {
        &self.backing
    }

    pub fn backing_mut(&mut self) -> &mut B {
        &mut self.backing
    }

    /// Whether data written from now on gets a CRC (the table's `data_crc`).
    pub fn data_crc(&self) -> bool {
        self.space.data_crc()
    }

    /// What reads that hit need to be served outside the engine.
    pub fn reader(&self) -> Reader<M> {
        Reader::new(
            self.index.trees(),
            self.seg_map.clone(),
            self.geo,
            self.dev_bytes,
        )
    }

    /// What writes need to reserve and commit outside the engine.
    pub fn write_path(&self) -> WritePath<M> {
        WritePath {
            index: self.index.clone(),
            log: self.log.clone(),
            space: self.space.clone(),
            seg_map: self.seg_map.clone(),
            geo: self.geo,
            n_segs: self.n_segs,
            dev_bytes: self.dev_bytes,
        }
    }

    /// Visit every key of the index (tests, debugging).
    pub fn for_each_key(&self, f: impl FnMut(&Key)) {
        self.index.for_each(f)
    }

    /// Data-area size of one segment.
    pub fn seg_data_size(&self) -> u32 {
        self.geo.seg_data_size()
    }

    /// Device offset of a cache position.
    pub(crate) fn pos_addr(&self, pos: Pos) -> u64 {
        self.seg_map.addr(&self.geo, pos)
    }

    /// Give the devices back (tests take the pmem image after a run).
    pub fn into_env(self) -> (P, B) {
        (self.pmem, self.backing)
    }
}
