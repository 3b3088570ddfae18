//! Writes without the engine lock (upstream's `cache_data_alloc`,
//! `cache_key_insert` and `cache_key_append` under the data head, subtree and
//! kset locks alone).
//!
//! A write reserves its room here, under the lock of the data heads and free
//! segments ([`super::space::Space`]), copies into it on its own CPU, and then
//! makes it a key: into the index under the subtree's lock and into its kset
//! under the key log's ([`super::key_log::commit_key`]), while the engine lock
//! may be held by the background. What needs the engine (a new segment for
//! the key log, the on-media CRC flag to sync, a data CRC computed after the
//! fact, a full cache or an empty key pool, which wait for GC) is left to
//! [`super::Cache::write_reserve`] and [`super::Cache::write_commit`] under
//! that lock.

use super::env::{Locked, Pmem};
use super::index::Index;
use super::io::Reservation;
use super::key_log::{commit_key, Append, Closed, KeyLog, LogIo};
use super::segment::SegMap;
use super::space::Space;
use super::Memory;
use crate::meta::layout::Geometry;

/// What [`WritePath::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The key is in; `true`: it replaced data the cache held (a write hit).
    Done(bool),
    /// The key is in, but its kset, which `fua` wants persisted, needs a new
    /// log segment first: the caller has the engine persist it
    /// ([`super::Cache::kset_persist`]) before the write completes.
    Persist(bool),
    /// Nothing done: the engine commits it ([`super::Cache::write_commit`]).
    Engine,
}

/// What a write needs of the engine, shared with it (see [`super::Cache::write_path`]).
pub struct WritePath<M: Memory> {
    pub(crate) index: Index<M>,
    pub(crate) log: M::Lock<KeyLog<M>>,
    pub(crate) space: M::Lock<Space<M>>,
    pub(crate) seg_map: SegMap<M>,
    pub(crate) geo: Geometry,
    pub(crate) n_segs: u32,
    pub(crate) dev_bytes: u64,
}

impl<M: Memory> WritePath<M> {
    /// Room for the first chunk of a write of `len` bytes at `off`, as
    /// [`super::Cache::write_reserve`] takes it, with no engine lock; `None`
    /// when that needs the engine (the caller asks it, under its lock). A kset
    /// found full is closed if the log's segment has room for it.
    pub fn reserve<P: Pmem>(
        &self,
        pmem: &mut P,
        off: u64,
        len: usize,
        flags: u32,
        cpu: usize,
    ) -> Option<Reservation> {
        let end = off.checked_add(len as u64)?;
        if end > self.dev_bytes || self.index.free_nodes() < 2 {
            return None;
        }
        let id = self.log.with(|l| l.kset_id(off));
        let mut spare = None;
        let mut io = LogIo {
            pmem,
            seg_map: &self.seg_map,
            geo: &self.geo,
            spare: &mut spare,
        };
        let room = self.log.with(|l| {
            if l.kset_full(id) {
                l.close(id, &mut io)
            } else {
                Ok(Closed::Done)
            }
        });
        if room != Ok(Closed::Done) {
            return None;
        }
        let (seg_map, geo, n_segs) = (&self.seg_map, &self.geo, self.n_segs);
        self.space.with(|sp| {
            if sp.crc_flag_pending {
                return None;
            }
            sp.reserve(seg_map, &*io.pmem, geo, n_segs, (off, len, flags), cpu)
                .ok()
        })
    }

    /// Makes the data copied into `r` (with CRC `crc`, see
    /// [`super::io::copy_in`]) a key, with no engine lock: see
    /// [`super::Cache::write_commit`], which this does the same as, when it
    /// can. A caller that copied on another CPU fences first.
    pub fn commit<P: Pmem>(&self, pmem: &mut P, r: &Reservation, crc: u32, fua: bool) -> Commit {
        self.commit_with(pmem, r, crc, fua, &mut || {})
    }

    /// [`WritePath::commit`], running `on_insert` under the subtree's lock as
    /// the key goes in (see [`super::Cache::write_commit_with`]).
    pub fn commit_with<P: Pmem>(
        &self,
        pmem: &mut P,
        r: &Reservation,
        crc: u32,
        fua: bool,
        on_insert: &mut dyn FnMut(),
    ) -> Commit {
        let key = r.key(r.crc.then_some(crc));
        let mut spare = None;
        let mut io = LogIo {
            pmem,
            seg_map: &self.seg_map,
            geo: &self.geo,
            spare: &mut spare,
        };
        match commit_key(&self.index, &self.log, &mut io, &key, fua, None, on_insert) {
            Ok(Append::Done { replaced }) => Commit::Done(replaced),
            Ok(Append::CloseWantsSegment { replaced }) if fua => Commit::Persist(replaced),
            // Full and left open: the next commit to it, or the next flush,
            // closes it with the engine.
            Ok(Append::CloseWantsSegment { replaced }) => Commit::Done(replaced),
            Ok(Append::RoomWantsSegment | Append::CrcWanted | Append::Superseded) | Err(_) => {
                Commit::Engine
            }
        }
    }
}
