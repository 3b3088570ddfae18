//! Writes outside the engine (upstream's `cache_data_alloc`,
//! `cache_key_insert` and `cache_key_append` under the data head, subtree and
//! kset locks alone).
//!
//! A write reserves its room here, under the lock of the data heads and free
//! segments ([`super::space::Space`]), copies into it on its own CPU, and then
//! makes it a key: into the index under the subtree's lock and into its kset
//! under the key log's ([`super::key_log::commit_key`]), while the background
//! may hold the control lock. What needs the engine (a new segment for
//! the key log, the on-media CRC flag to sync, a data CRC computed after the
//! fact, a full cache or an empty key pool, which wait for GC) is left to
//! [`super::Cache::write_reserve`] and [`super::Cache::write_commit`] under
//! that lock.

use super::data::Source;
use super::env::Pmem;
use super::index::Index;
use super::io::{abandon_placeholder, copy_in, place, Gap, Reservation};
use super::key::SegId;
use super::key_log::{commit_key, Append, Closed, KeyLog, LogIo, Over};
use super::segment::SegMap;
use super::space::Space;
use super::Memory;
use crate::meta::kset::KEY_FLAGS_CLEAN;
use crate::meta::layout::Geometry;

/// What a commit that got its key in did ([`WritePath::commit`],
/// [`super::Cache::write_commit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The key is in; `true`: it replaced data the cache held (a write hit).
    Done(bool),
    /// The key is in, but its kset, which `fua` wants persisted, needs a new
    /// log segment first: the write has the engine persist it
    /// ([`super::Cache::kset_persist`]) before it completes, and does not
    /// commit the chunk again (see [`Progress`]).
    Persist(bool),
}

/// How far a write got, kept by a caller that tries again when the cache is
/// full: it goes on after the bytes committed, and first persists the kset a
/// FUA commit left to it. Committing a chunk again instead would take room and
/// a key a second time, and a read meanwhile could see the range go back to
/// older data after another CPU wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes committed.
    pub done: usize,
    /// Whether a commit replaced data the cache held (a write hit).
    pub hit: bool,
    /// The offset of a FUA chunk whose key is in but whose kset is not yet
    /// persisted ([`Committed::Persist`]).
    pub persist: Option<u64>,
}

impl Progress {
    /// Counts the commit of `r`.
    pub fn committed(&mut self, r: &Reservation, c: Committed) {
        self.done += r.len as usize;
        let replaced = match c {
            Committed::Done(replaced) => replaced,
            Committed::Persist(replaced) => {
                self.persist = Some(r.off);
                replaced
            }
        };
        self.hit |= replaced;
    }
}

/// What a write needs of the engine, shared with it (see [`super::Cache::write_path`]).
pub struct WritePath<M: Memory> {
    pub(crate) index: Index<M>,
    pub(crate) log: M::One<KeyLog<M>>,
    pub(crate) space: M::One<Space<M>>,
    pub(crate) seg_map: SegMap<M>,
    pub(crate) geo: Geometry,
    pub(crate) n_segs: u32,
    pub(crate) dev_bytes: u64,
}

impl<M: Memory> WritePath<M> {
    /// What a kset close goes through: `pmem`, and no spare log segment (the
    /// engine hands those out).
    fn log_io<'a, P: Pmem>(&'a self, pmem: &'a P, spare: &'a mut Option<SegId>) -> LogIo<'a, P, M> {
        LogIo {
            pmem,
            seg_map: &self.seg_map,
            geo: &self.geo,
            spare,
        }
    }

    /// Room for the first chunk of a write of `len` bytes at `off`, as
    /// [`super::Cache::write_reserve`] takes it, outside the engine; `None`
    /// when that needs the engine (the caller asks it, under its lock). A kset
    /// found full is closed if the log's segment has room for it.
    pub fn reserve<P: Pmem>(
        &self,
        pmem: &P,
        off: u64,
        len: usize,
        flags: u32,
        cpu: usize,
    ) -> Option<Reservation> {
        let end = off.checked_add(len as u64)?;
        if end > self.dev_bytes || self.index.free_nodes() < 2 {
            return None;
        }
        let mut spare = None;
        let mut io = self.log_io(pmem, &mut spare);
        if self.log.room(off, &mut io).1 != Ok(Closed::Done) {
            return None;
        }
        // Set only as the engine starts, before any write (see `Cache::start`).
        if self.space.crc_flag_pending() {
            return None;
        }
        let (seg_map, geo, n_segs) = (&self.seg_map, &self.geo, self.n_segs);
        self.space
            .reserve(seg_map, io.pmem, geo, n_segs, (off, len, flags), cpu)
            .ok()
    }

    /// An application FLUSH (REQ_PREFLUSH) as [`super::Cache::flush`] does it
    /// in the modes that cache writes, outside the engine: every open kset
    /// persisted, and the FLUSH recorded for writeback. `false` when a close
    /// needs a new log segment: the caller has the engine flush.
    pub fn flush<P: Pmem>(&self, pmem: &P) -> bool {
        let mut spare = None;
        let mut io = self.log_io(pmem, &mut spare);
        self.log.flush(&mut io) == Ok(Closed::Done)
    }

    /// Makes the data copied into `r` (with CRC `crc`, see
    /// [`super::io::copy_in`]) a key, outside the engine: see
    /// [`super::Cache::write_commit`], which this does the same as, when it
    /// can; `None`: nothing done, the engine commits it. A caller that copied
    /// on another CPU fences first.
    pub fn commit<P: Pmem>(
        &self,
        pmem: &P,
        r: &Reservation,
        crc: u32,
        fua: bool,
    ) -> Option<Committed> {
        self.commit_with(pmem, r, crc, fua, &mut || {})
    }

    /// [`WritePath::commit`], running `on_insert` under the subtree's lock as
    /// the key goes in (see [`super::Cache::write_commit_with`]).
    pub fn commit_with<P: Pmem>(
        &self,
        pmem: &P,
        r: &Reservation,
        crc: u32,
        fua: bool,
        on_insert: &mut dyn FnMut(),
    ) -> Option<Committed> {
        let key = r.key(r.crc.then_some(crc));
        let mut spare = None;
        let mut io = self.log_io(pmem, &mut spare);
        match commit_key(&self.index, &self.log, &mut io, &key, fua, None, on_insert) {
            Ok(Append::Done { replaced }) => Some(Committed::Done(replaced)),
            Ok(Append::CloseWantsSegment { replaced }) if fua => Some(Committed::Persist(replaced)),
            // Full and left open: the next commit to it, or the next flush,
            // closes it with the engine.
            Ok(Append::CloseWantsSegment { replaced }) => Some(Committed::Done(replaced)),
            Ok(Append::RoomWantsSegment | Append::CrcWanted | Append::Superseded) | Err(_) => None,
        }
    }
}

/// What [`WritePath::place_gap`] found at the start of the rest of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// A part the cache does not hold, with its placeholder if it got one
    /// ([`super::io::Gap::tag`]); the read goes on at `next`.
    Gap { gap: Gap, next: u64 },
    /// A key is there now (a write came since the read looked): the read
    /// looks for hits again.
    Hit,
    /// What is there needs the engine (a key of a segment GC freed, to be
    /// dropped): the caller goes on in the engine.
    Engine,
}

impl<M: Memory> WritePath<M> {
    /// The part of the read of `len` bytes at `off` that starts at `from`,
    /// which holds no hit: as [`super::Cache::read_resume`] places a gap, with
    /// nothing of the engine. With `cache`, the gap gets a placeholder, which the
    /// fill of the backing device's data replaces ([`WritePath::fill`]), if
    /// the index holds nothing there and the key slab has room. For the modes
    /// that cache writes (no write goes through, so none is in flight).
    pub fn place_gap(&self, off: u64, len: usize, from: u64, cache: bool) -> Placed {
        let Some(end) = off.checked_add(len as u64).filter(|&e| e <= self.dev_bytes) else {
            return Placed::Engine;
        };
        if from < off || from >= end {
            return Placed::Engine;
        }
        let Some((sub, to)) = self.index.stripe(from, end) else {
            return Placed::Engine;
        };
        let (stop, place_it) = match self.index.first_overlap(sub, from, to) {
            Some(k) if k.off <= from && !k.empty() => {
                return if self.seg_map.stale(&k) {
                    Placed::Engine
                } else {
                    Placed::Hit
                };
            }
            // Another read's placeholder: its fill caches the data.
            Some(k) if k.off <= from => (to.min(k.end()), false),
            Some(k) => (k.off, true),
            None => (to, true),
        };
        let n = (stop - from) as u32;
        let tag = if place_it && cache && !self.index.key_pressure() {
            let tag = self.space.next_tag();
            place(&self.index, from, n, tag)
        } else {
            0
        };
        Placed::Gap {
            gap: Gap {
                off: from,
                at: (from - off) as usize,
                len: n as usize,
                tag,
            },
            next: stop,
        }
    }

    /// The backing device's data for read-miss `gap` arrived in
    /// `src[gap.at..]`: as [`super::Cache::read_fill`], outside the engine.
    /// Caches it as clean keys wherever the gap's placeholder still covers it
    /// (each checked as its key goes in, see [`super::key_log::commit_key`]),
    /// best effort, and drops what is left of the placeholder. Returns a
    /// segment whose last reference a reservation given back held, for the
    /// engine to free ([`super::Cache::segment_released`]).
    pub fn fill<P: Pmem, S: Source + ?Sized>(
        &self,
        pmem: &P,
        gap: &Gap,
        src: &S,
        cpu: usize,
    ) -> Option<SegId> {
        if gap.tag == 0 {
            return None;
        }
        let end = gap.off + gap.len as u64;
        let mut released = None;
        let mut cur = gap.off;
        while cur < end && !self.index.key_pressure() {
            let Some((sub, to)) = self.index.stripe(cur, end) else {
                break;
            };
            let Some(k) = self.index.first_overlap(sub, cur, to) else {
                break;
            };
            if !k.placeholder_of(gap.tag) {
                cur = k.end().max(cur + 1);
                continue;
            }
            let from = k.off.max(cur);
            let piece = k.end().min(to) - from;
            let Some(r) = self.reserve(pmem, from, piece as usize, KEY_FLAGS_CLEAN, cpu) else {
                break;
            };
            let at = gap.at + (r.off - gap.off) as usize;
            let committed = match copy_in(pmem, &r, src, at) {
                Ok(crc) => {
                    pmem.fence();
                    let key = r.key(r.crc.then_some(crc));
                    let mut spare = None;
                    let mut io = self.log_io(pmem, &mut spare);
                    let over = Some(Over::Placeholder(gap.tag));
                    matches!(
                        commit_key(
                            &self.index,
                            &self.log,
                            &mut io,
                            &key,
                            false,
                            over,
                            &mut || {}
                        ),
                        Ok(Append::Done { .. } | Append::CloseWantsSegment { .. })
                    )
                }
                Err(_) => false,
            };
            if !committed {
                // The room goes back; on the segment's last reference the
                // engine frees it, and the fill stops there (one at a time).
                if self.seg_map.put(r.segment()) {
                    released = Some(r.segment());
                    break;
                }
            }
            cur = r.off + u64::from(r.len);
        }
        self.abandon(gap);
        released
    }

    /// Drops what is left of `gap`'s placeholder (as
    /// [`super::Cache::read_abandon`]): index only, each piece looked at and
    /// dropped in one hold of its subtree's lock.
    pub fn abandon(&self, gap: &Gap) {
        abandon_placeholder(&self.index, gap);
    }
}
