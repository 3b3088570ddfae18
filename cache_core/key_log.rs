//! The key log's head: the open ksets, where the next closed one goes, and
//! what the log holds that the engine counts (upstream: the per-CPU ksets'
//! locks and `key_head_lock`). It has a lock of its own ([`super::Memory::Lock`]),
//! so that a write commits its key ([`commit_key`]) without the engine lock:
//! the index insert and the kset append of one key happen under its
//! subtree's lock and the log's, in that order, so the log holds overlapping
//! keys in the order the index took them, and replay rebuilds the same index.
//!
//! Closing a kset may need a new segment for the log, which only the engine
//! hands out: a close without one says so ([`Closed::WantsSegment`]) and the
//! caller takes the engine lock for it.

use super::barriers::Barriers;
use super::env::{persist, Pmem};
use super::error::CacheError;
use super::index::Index;
use super::key::{Key, Pos, SegId, KEY_FLAGS_VERIFIED};
use super::kset::KsetBuf;
use super::segment::SegMap;
use super::Memory;
use crate::meta::kset::{encode_last_kset, kset_size, KeyOnmedia, KSET_HEADER_SIZE};
use crate::meta::layout::{Geometry, SUBTREE_SHIFT};

/// The open ksets and the key head, under the log's lock.
pub struct KeyLog<M: Memory> {
    ksets: M::Buf<KsetBuf>,
    /// Where the next kset goes.
    pub(crate) head: Pos,
    /// Ordinal of the next key-carrying kset (see `Cache::log_seq_tail`).
    pub(crate) seq_head: u64,
    /// One past the ordinal of the newest logged kset holding a key without a
    /// CRC (0: none). The on-media `DATA_CRC` flag may only be set once the key
    /// tail has passed it.
    pub(crate) nocrc_until: u64,
    /// Bytes of dirty keys logged (open ksets included) and not yet written
    /// back (see [`super::Status::dirty_bytes`]).
    pub(crate) dirty_bytes: u64,
    /// Ksets closed since attach.
    pub(crate) written: u64,
    /// The application's FLUSHes ahead of the dirty tail: writeback batches
    /// ksets between them. Recorded in the same hold of the lock as the
    /// closes of the FLUSH, so a kset closed after them is after it.
    pub(crate) barriers: Barriers,
    /// Keys appended from now on need a data CRC: the table's `data_crc` is
    /// on, or the on-media `DATA_CRC` flag is (or is about to be) set. A key
    /// committed without one goes to the engine ([`Append::CrcWanted`]).
    pub(crate) crc_wanted: bool,
}

/// What closing a kset did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Persisted (or it was empty).
    Done,
    /// Nothing: the log's segment has no room for it, and no spare segment
    /// was handed in.
    WantsSegment,
}

/// What [`commit_key`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Append {
    /// In the index and in its kset (persisted, with `fua`). `replaced`: it
    /// replaced data the cache held.
    Done { replaced: bool },
    /// In the index and in its kset, which is to be closed (`fua`, or it is
    /// full) and needs a new log segment for that.
    CloseWantsSegment { replaced: bool },
    /// Nothing done: the kset is full, and closing it needs a new log segment.
    RoomWantsSegment,
    /// Nothing done: the key has no data CRC, and the log wants one now.
    CrcWanted,
    /// Nothing done: the placeholder the key was to go over no longer covers
    /// its range.
    Superseded,
}

/// What a kset close writes through: the pmem, where the log's segments
/// live, and a spare segment for the log if the caller has one.
pub(crate) struct LogIo<'a, P: Pmem, M: Memory> {
    pub pmem: &'a mut P,
    pub seg_map: &'a SegMap<M>,
    pub geo: &'a Geometry,
    /// Taken when the log needs a new segment.
    pub spare: &'a mut Option<SegId>,
}

impl<M: Memory> KeyLog<M> {
    /// A log over `ksets` (at least one), set up by the engine as it starts.
    pub fn new(ksets: M::Buf<KsetBuf>) -> Self {
        KeyLog {
            ksets,
            head: Pos::default(),
            seq_head: 0,
            nocrc_until: 0,
            dirty_bytes: 0,
            written: 0,
            barriers: Barriers::default(),
            crc_wanted: false,
        }
    }

    pub(crate) fn n_ksets(&self) -> usize {
        self.ksets.len()
    }

    /// Empties every open kset and forgets the log (at start, before replay).
    pub(crate) fn reset(&mut self) {
        for k in self.ksets.iter_mut() {
            k.reset();
        }
        self.head = Pos::default();
        self.seq_head = 0;
        self.nocrc_until = 0;
        self.dirty_bytes = 0;
        self.written = 0;
        self.barriers = Barriers::default();
        self.crc_wanted = false;
    }

    /// The kset keys at `off` go to: one subtree's keys always go to one.
    pub(crate) fn kset_id(&self, off: u64) -> usize {
        let n = self.ksets.len().max(1) as u64;
        ((off >> SUBTREE_SHIFT) % n) as usize
    }

    fn kset_full(&self, id: usize) -> bool {
        self.ksets.get(id).is_none_or(|k| k.is_full())
    }

    /// Some open kset holds a key without a data CRC.
    pub(crate) fn any_nocrc(&self) -> bool {
        self.ksets.iter().any(|k| k.has_nocrc())
    }

    /// Bytes of the dirty keys in the open ksets; `None` if one does not decode.
    pub(crate) fn open_dirty_bytes(&self) -> Option<u64> {
        self.ksets.iter().map(|k| k.dirty_bytes()).sum()
    }

    /// The kset keys at `off` go to, and room in it for one more: closed
    /// first if it is full.
    pub(crate) fn room<P: Pmem>(
        &mut self,
        off: u64,
        io: &mut LogIo<'_, P, M>,
    ) -> (usize, Result<Closed, CacheError>) {
        let id = self.kset_id(off);
        if !self.kset_full(id) {
            return (id, Ok(Closed::Done));
        }
        (id, self.close(id, io))
    }

    /// Persist open kset `id` at the key head (nothing if it is empty).
    ///
    /// In this order: the data of its keys (stored and flushed by the write
    /// path, fenced here) together with an empty header after the kset's
    /// place (so replay stops there), then the kset with its CRC. Each step
    /// is flushed and fenced before the next, so one close costs two fences
    /// however many keys it logs, and a crash never leaves a valid kset
    /// followed by a stale one from an earlier pass over the segment. When the
    /// segment is too full for the kset plus a LAST kset, the log moves to the
    /// spare segment: its first header is cleared, then the LAST kset pointing
    /// at it is written.
    pub(crate) fn close<P: Pmem>(
        &mut self,
        id: usize,
        io: &mut LogIo<'_, P, M>,
    ) -> Result<Closed, CacheError> {
        let key_num = self.ksets.get(id).map_or(0, |k| k.key_num());
        if key_num == 0 {
            return Ok(Closed::Done);
        }
        let size = kset_size(key_num) as u32;
        let data_size = io.geo.seg_data_size();
        let addr = |pos: Pos| io.seg_map.addr(io.geo, pos);
        // Room for this kset and the LAST kset that may have to follow it.
        if data_size - self.head.off < size + KSET_HEADER_SIZE as u32 {
            let Some(next) = io.spare.take() else {
                return Ok(Closed::WantsSegment);
            };
            persist(
                io.pmem,
                addr(Pos { seg: next, off: 0 }),
                &[0u8; KSET_HEADER_SIZE],
            );
            let mut last = [0u8; KSET_HEADER_SIZE];
            encode_last_kset(next.get(), &mut last);
            persist(io.pmem, addr(self.head), &last);
            self.head = Pos { seg: next, off: 0 };
        }
        let head = addr(self.head);
        // Clear the header after the new kset first (see above). Its fence
        // also makes the data of the kset's keys durable — the write path
        // stores and flushes data without a fence of its own, on this CPU or
        // fenced on its own — before the kset that points at it is stored.
        if self.head.off + size + KSET_HEADER_SIZE as u32 <= data_size {
            persist(io.pmem, head + u64::from(size), &[0u8; KSET_HEADER_SIZE]);
        } else {
            io.pmem.fence();
        }
        let Some(k) = self.ksets.get_mut(id) else {
            return Ok(Closed::Done);
        };
        let nocrc = k.has_nocrc();
        persist(io.pmem, head, k.seal()?);
        k.reset();
        self.head.off += size;
        if nocrc {
            self.nocrc_until = self.seq_head + 1;
        }
        self.seq_head += 1;
        self.written += 1;
        Ok(Closed::Done)
    }

    /// Closes every open kset, as far as the log's segment has room.
    pub(crate) fn close_all<P: Pmem>(
        &mut self,
        io: &mut LogIo<'_, P, M>,
    ) -> Result<Closed, CacheError> {
        for id in 0..self.ksets.len() {
            if self.close(id, io)? == Closed::WantsSegment {
                return Ok(Closed::WantsSegment);
            }
        }
        Ok(Closed::Done)
    }

    /// An application FLUSH: closes every open kset and records the FLUSH
    /// after them (see [`Barriers`]). Nothing is recorded when a close wants
    /// a segment.
    pub(crate) fn flush<P: Pmem>(
        &mut self,
        io: &mut LogIo<'_, P, M>,
    ) -> Result<Closed, CacheError> {
        let closed = self.close_all(io)?;
        if closed == Closed::Done {
            // Writeback may not put a kset from before this FLUSH and one
            // from after it in one batch.
            self.barriers.record(self.seq_head);
        }
        Ok(closed)
    }
}

/// The on-media form of `key`.
pub(crate) fn key_to_onmedia(key: &Key) -> KeyOnmedia {
    KeyOnmedia {
        off: key.off,
        len: key.len,
        flags: key.flags & !KEY_FLAGS_VERIFIED,
        cache_seg_id: key.pos.seg.get(),
        cache_seg_off: key.pos.off,
        seg_gen: key.gen,
        data_crc: if key.has_crc() { key.crc } else { 0 },
        reserved: 0,
    }
}

/// Makes `key` a key of the cache: into the index and appended to its kset,
/// as one step under the key's subtree lock and then the log's lock (so that
/// the log orders overlapping keys as the index does); the kset is persisted
/// when full or for `fua`. A kset found full is closed first, under the log's
/// lock alone. Needs no engine lock: a close that needs a new log segment
/// uses `io.spare`, or returns without it ([`Append`]).
///
/// With `over`, only if the read miss placeholder tagged `over` still covers
/// all of the key's range, checked under the subtree's lock. `on_insert` runs
/// under both locks once the key is in: what it records is in the order the
/// index took the keys (the threaded tests' history).
///
/// `Err` (the key pool is exhausted) and the results that say nothing was
/// done leave everything as it was.
pub(crate) fn commit_key<P: Pmem, M: Memory>(
    index: &Index<M>,
    log: &M::Lock<KeyLog<M>>,
    io: &mut LogIo<'_, P, M>,
    key: &Key,
    fua: bool,
    over: Option<u32>,
    on_insert: &mut dyn FnMut(),
) -> Result<Append, CacheError> {
    use super::env::Locked;
    let om = key_to_onmedia(key);
    loop {
        // Room first, without the subtree lock: a close copies the kset.
        let (id, room) = log.with(|l| l.room(key.off, io));
        let room = room?;
        if room == Closed::WantsSegment {
            return Ok(Append::RoomWantsSegment);
        }
        let mut replaced = false;
        let appended = index
            .insert_under(
                *key,
                |k| replaced |= !k.empty(),
                |insert| {
                    if let Some(tag) = over {
                        let (from, to) = (key.off, key.end());
                        let covered = index.subtree_of(from).is_some_and(|sub| {
                            index.first_overlap_held(sub, from, to).is_some_and(|k| {
                                k.placeholder_of(tag) && k.off <= from && k.end() >= to
                            })
                        });
                        if !covered {
                            return Ok(Some(Append::Superseded));
                        }
                    }
                    log.with(|l| {
                        if !key.has_crc() && l.crc_wanted {
                            return Ok(Some(Append::CrcWanted));
                        }
                        // Filled by a commit of another subtree meanwhile.
                        if l.kset_full(id) {
                            return Ok(None);
                        }
                        let Some(k) = l.ksets.get_mut(id) else {
                            return Err(CacheError::NoMem("no kset"));
                        };
                        if !k.push(&om) {
                            return Ok(None);
                        }
                        if insert().is_err() {
                            k.pop();
                            return Err(CacheError::Busy("key pool exhausted"));
                        }
                        // Logged from here on (the kset is written when it
                        // closes), so writeback will copy it.
                        if key.dirty() {
                            l.dirty_bytes += u64::from(key.len);
                        }
                        on_insert();
                        Ok(Some(Append::Done { replaced: false }))
                    })
                },
            )
            .map_err(|_| CacheError::Invalid("key beyond the index"))??;
        match appended {
            None => continue,
            Some(Append::Done { .. }) => {}
            Some(other) => return Ok(other),
        }
        let closed = log.with(|l| {
            if fua || l.kset_full(id) {
                l.close(id, io)
            } else {
                Ok(Closed::Done)
            }
        })?;
        return Ok(match closed {
            Closed::Done => Append::Done { replaced },
            Closed::WantsSegment => Append::CloseWantsSegment { replaced },
        });
    }
}
