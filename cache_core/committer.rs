//! Commits of writes without the engine lock (upstream's `cache_key_insert`
//! and `cache_key_append` under the subtree and kset locks alone).
//!
//! A write reserves its room under the engine lock, copies into it on its
//! own CPU, and then makes it a key here: into the index under the subtree's
//! lock and into its kset under the key log's ([`super::key_log::commit_key`]),
//! while the engine lock may be held by the background. What needs the engine
//! (a new segment for the key log, a data CRC computed after the fact, a key
//! pool found empty) is left to [`super::Cache::write_commit`] under that lock.

use super::env::Pmem;
use super::index::Index;
use super::io::Reservation;
use super::key_log::{commit_key, Append, KeyLog, LogIo};
use super::segment::SegMap;
use super::Memory;
use crate::meta::layout::Geometry;

/// What [`Committer::commit`] did.
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

/// What a commit needs of the engine, shared with it (see [`super::Cache::committer`]).
pub struct Committer<M: Memory> {
    index: Index<M>,
    log: M::Lock<KeyLog<M>>,
    seg_map: SegMap<M>,
    geo: Geometry,
}

impl<M: Memory> Committer<M> {
    pub(crate) fn new(
        index: Index<M>,
        log: M::Lock<KeyLog<M>>,
        seg_map: SegMap<M>,
        geo: Geometry,
    ) -> Self {
        Committer {
            index,
            log,
            seg_map,
            geo,
        }
    }

    /// Makes the data copied into `r` (with CRC `crc`, see
    /// [`super::io::copy_in`]) a key, with no engine lock: see
    /// [`super::Cache::write_commit`], which this does the same as, when it
    /// can. A caller that copied on another CPU fences first.
    pub fn commit<P: Pmem>(&self, pmem: &mut P, r: &Reservation, crc: u32, fua: bool) -> Commit {
        self.commit_with(pmem, r, crc, fua, &mut || {})
    }

    /// [`Committer::commit`], running `on_insert` under the subtree's lock as
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
