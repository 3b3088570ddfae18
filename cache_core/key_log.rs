//! The key log's head and its open ksets (upstream: the per-CPU ksets' locks
//! and `key_head_lock`). Each open kset has a lock of its own, and the key
//! head another ([`super::Memory::Lock`]), so that writes to two ksets commit
//! their keys ([`commit_key`]) at once and outside the engine: the index
//! insert and the kset append of one key happen under its subtree's lock and
//! its kset's, in that order, so the log holds overlapping keys (one subtree's
//! keys all go to one kset) in the order the index took them, and replay
//! rebuilds the same index. Only closing a kset takes the head's lock, inside
//! the kset's: the closes are persisted one after another, each at the head,
//! so the log on the media never has a hole.
//!
//! Closing a kset may need a new segment for the log, which only the engine
//! hands out: a close without one says so ([`Closed::WantsSegment`]) and the
//! caller asks the engine for it.

use super::barriers::Barriers;
use super::env::{persist, Locked, Pmem};
use super::error::CacheError;
use super::index::Index;
use super::key::{Key, Pos, SegId, KEY_FLAGS_IN_MEMORY};
use super::kset::KsetBuf;
use super::segment::SegMap;
use super::Memory;
use crate::meta::kset::{encode_last_kset, kset_size, KeyOnmedia, KSET_HEADER_SIZE};
use crate::meta::layout::{Geometry, SUBTREE_SHIFT};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The key log: its open ksets, each under its own lock, and its head.
pub struct KeyLog<M: Memory> {
    ksets: M::Buf<M::Slot<KsetBuf>>,
    head: M::Lock<LogHead>,
    /// Bytes of dirty keys logged (open ksets included) and not yet written
    /// back (see [`super::Status::dirty_bytes`]): added to under a kset's lock
    /// as a key is appended, taken from by writeback.
    dirty_bytes: AtomicU64,
    /// Bytes writeback took off [`KeyLog::dirty_bytes`] since start: with it,
    /// [`KeyLog::dirty_logged`] counts what was logged, and grows only while
    /// writes come (see [`super::watermark`]).
    dirty_retired: AtomicU64,
    /// Keys appended from now on need a data CRC: the table's `data_crc` is
    /// on, or the on-media `DATA_CRC` flag is (or is about to be) set. A key
    /// committed without one goes to the engine ([`Append::CrcWanted`]). Read
    /// under the kset's lock the key goes to, and set before the engine looks
    /// at each kset under its lock (see `Cache::sync_crc_flag`), so no key
    /// without a CRC gets past a look that found none.
    crc_wanted: AtomicBool,
}

/// Where the next closed kset goes, and what the closes count, under the
/// head's lock (upstream `key_head_lock`).
#[derive(Debug, Default)]
pub struct LogHead {
    /// Where the next kset goes.
    pub(crate) head: Pos,
    /// Ordinal of the next key-carrying kset (see `Cache::log_seq_tail`).
    pub(crate) seq_head: u64,
    /// One past the ordinal of the newest logged kset holding a key without a
    /// CRC (0: none). The on-media `DATA_CRC` flag may only be set once the key
    /// tail has passed it.
    pub(crate) nocrc_until: u64,
    /// One past the ordinal of the newest kset holding a FUA write's key (0:
    /// none since attach). Writeback passes over an overwritten key only in a
    /// kset at or after it (see [`LogHead::may_pass_over`]).
    pub(crate) fua_until: u64,
    /// Ksets closed since attach.
    pub(crate) written: u64,
    /// The application's FLUSHes ahead of the dirty tail: writeback batches
    /// ksets between them. A FLUSH is recorded after it has closed every open
    /// kset, so every kset closed before it is before the barrier; a kset
    /// closed by another CPU meanwhile holds writes that raced with the FLUSH,
    /// which may fall on either side of it.
    pub(crate) barriers: Barriers,
}

impl LogHead {
    /// Whether writeback may pass over a key of kset `seq` that a later write
    /// overwrote whole, rather than write it back: only when nothing
    /// promised it durable. A FLUSH since (a barrier after `seq`) did, and
    /// with it the backing device must get it before anything written after
    /// that FLUSH (see [`super::barriers`]); so did a FUA write in its kset or
    /// in one before it. Otherwise the key and the write over it belong to
    /// the same stretch between FLUSHes, in which the application is owed no
    /// order and a crash may keep any of its writes: the cache keeps the newer
    /// one until it is written back, and the backing device never holds the
    /// older.
    pub(crate) fn may_pass_over(&self, seq: u64) -> bool {
        seq >= self.fua_until && self.barriers.none_after(seq)
    }
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

/// What a conditional commit goes over: [`commit_key`] puts the key in only if
/// one entry of the index still covers all of the key's range and is this,
/// checked in the same hold of the subtree's lock as the insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// The placeholder tagged so: a read miss's fill, or a write through's
    /// (a write that replaced any of it meanwhile is newer than the backing
    /// device's data).
    Placeholder(u32),
    /// The cached data at this device offset, still current: GC copying live
    /// clean data forward (see [`super::forward`]). A write that replaced it
    /// meanwhile is newer; a segment freed and handed out again meanwhile
    /// made the entry stale, and what the copy read from it with it.
    Data(u64),
}

impl Over {
    /// Whether `k`, which covers `from` and the rest of the key's range, is
    /// what the commit goes over.
    fn holds<P: Pmem, M: Memory>(self, k: &Key, from: u64, io: &LogIo<'_, P, M>) -> bool {
        match self {
            Over::Placeholder(tag) => k.placeholder_of(tag),
            Over::Data(addr) => {
                !k.empty()
                    && !io.seg_map.stale(k)
                    && io.seg_map.addr(io.geo, k.pos) + (from - k.off) == addr
            }
        }
    }
}

/// What a kset close writes through: the pmem, where the log's segments
/// live, and a spare segment for the log if the caller has one.
pub(crate) struct LogIo<'a, P: Pmem, M: Memory> {
    pub pmem: &'a P,
    pub seg_map: &'a SegMap<M>,
    pub geo: &'a Geometry,
    /// Taken when the log needs a new segment.
    pub spare: &'a mut Option<SegId>,
}

impl<M: Memory> KeyLog<M> {
    /// A log over `ksets` (at least one) and `head`, set up by the engine as
    /// it starts.
    pub fn new(ksets: M::Buf<M::Slot<KsetBuf>>, head: M::Lock<LogHead>) -> Self {
        KeyLog {
            ksets,
            head,
            dirty_bytes: AtomicU64::new(0),
            dirty_retired: AtomicU64::new(0),
            crc_wanted: AtomicBool::new(false),
        }
    }

    pub(crate) fn n_ksets(&self) -> usize {
        self.ksets.len()
    }

    /// Empties every open kset and forgets the log (at start, before replay).
    pub(crate) fn reset(&self) {
        for k in self.ksets.iter() {
            k.with(|k| k.reset());
        }
        self.head.with(|h| *h = LogHead::default());
        self.dirty_bytes.store(0, Ordering::Relaxed);
        self.dirty_retired.store(0, Ordering::Relaxed);
        self.crc_wanted.store(false, Ordering::SeqCst);
    }

    /// Runs `f` on the head under its lock.
    pub(crate) fn with_head<R>(&self, f: impl FnOnce(&mut LogHead) -> R) -> R {
        self.head.with(f)
    }

    /// The kset keys at `off` go to: one subtree's keys always go to one.
    /// The number of ksets is fixed, so this needs no lock.
    pub(crate) fn kset_id(&self, off: u64) -> usize {
        let n = self.ksets.len().max(1) as u64;
        ((off >> SUBTREE_SHIFT) % n) as usize
    }

    /// Runs `f` on open kset `id` under its lock; `None` if there is no such kset.
    fn with_kset<R>(&self, id: usize, f: impl FnOnce(&mut KsetBuf) -> R) -> Option<R> {
        self.ksets.get(id).map(|k| k.with(f))
    }

    /// Bytes of dirty keys logged and not written back.
    pub(crate) fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    /// Sets [`KeyLog::dirty_bytes`] (replay).
    pub(crate) fn set_dirty_bytes(&self, bytes: u64) {
        self.dirty_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Bytes of dirty keys logged since start (replayed ones included), a
    /// count that grows with every dirty key appended and with nothing else.
    /// Read without a lock, it may count bytes writeback is taking off twice
    /// for a moment, never fewer than were logged.
    pub(crate) fn dirty_logged(&self) -> u64 {
        // Pairs with the release in `written_back`: a `dirty_bytes` after
        // writeback took bytes off comes with the `dirty_retired` that has them.
        let dirty = self.dirty_bytes.load(Ordering::Acquire);
        dirty.saturating_add(self.dirty_retired.load(Ordering::Relaxed))
    }

    /// Writeback took `bytes` of dirty keys off the log.
    pub(crate) fn written_back(&self, bytes: u64) {
        // Retired first, so that `dirty_logged` never reads less than before.
        self.dirty_retired.fetch_add(bytes, Ordering::Relaxed);
        let _ = self
            .dirty_bytes
            .fetch_update(Ordering::Release, Ordering::Relaxed, |d| {
                debug_assert!(d >= bytes);
                Some(d.saturating_sub(bytes))
            });
    }

    pub(crate) fn crc_wanted(&self) -> bool {
        self.crc_wanted.load(Ordering::SeqCst)
    }

    pub(crate) fn set_crc_wanted(&self, wanted: bool) {
        self.crc_wanted.store(wanted, Ordering::SeqCst);
    }

    /// Some open kset holds a key without a data CRC (each looked at under
    /// its lock).
    pub(crate) fn any_nocrc(&self) -> bool {
        self.ksets.iter().any(|k| k.with(|k| k.has_nocrc()))
    }

    /// Runs `f` with every kset's lock and then the head's held, on what the
    /// log counts: the open ksets' dirty bytes, the head and the dirty bytes
    /// logged, as one snapshot (for the invariants). Takes the kset locks
    /// nested, which no other path does: never in the module.
    pub(crate) fn snapshot<R>(&self, f: impl FnOnce(Option<u64>, Pos, u64) -> R) -> R {
        fn nest<M: Memory, R>(
            log: &KeyLog<M>,
            i: usize,
            open: Option<u64>,
            f: impl FnOnce(Option<u64>, Pos, u64) -> R,
        ) -> R {
            match log.ksets.get(i) {
                Some(k) => k.with(|k| {
                    let open = open.and_then(|o| Some(o + k.dirty_bytes()?));
                    nest(log, i + 1, open, f)
                }),
                None => log.head.with(|h| f(open, h.head, log.dirty_bytes())),
            }
        }
        nest(self, 0, Some(0), f)
    }

    /// The kset keys at `off` go to, and room in it for one more: closed
    /// first if it is full.
    pub(crate) fn room<P: Pmem>(
        &self,
        off: u64,
        io: &mut LogIo<'_, P, M>,
    ) -> (usize, Result<Closed, CacheError>) {
        let id = self.kset_id(off);
        let closed = self.with_kset(id, |k| {
            if k.is_full() {
                self.close_held(k, io)
            } else {
                Ok(Closed::Done)
            }
        });
        (id, closed.unwrap_or(Ok(Closed::Done)))
    }

    /// Persist open kset `id` at the key head (nothing if it is empty), under
    /// its lock (see [`KeyLog::close_held`]).
    pub(crate) fn close<P: Pmem>(
        &self,
        id: usize,
        io: &mut LogIo<'_, P, M>,
    ) -> Result<Closed, CacheError> {
        self.with_kset(id, |k| self.close_held(k, io))
            .unwrap_or(Ok(Closed::Done))
    }

    /// Persist open kset `k`, whose lock the caller holds, at the key head,
    /// under the head's lock (nothing if it is empty).
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
    fn close_held<P: Pmem>(
        &self,
        k: &mut KsetBuf,
        io: &mut LogIo<'_, P, M>,
    ) -> Result<Closed, CacheError> {
        let key_num = k.key_num();
        if key_num == 0 {
            return Ok(Closed::Done);
        }
        let size = kset_size(key_num) as u32;
        let data_size = io.geo.seg_data_size();
        let (nocrc, fua) = (k.has_nocrc(), k.has_fua());
        // Sealed (its CRC taken) before the head's lock, which every CPU's closes take in turn:
        // nothing in a kset depends on where it goes, so no other close waits for this CRC.
        let sealed = k.seal()?;
        let closed = self.head.with(|h| {
            let addr = |pos: Pos| io.seg_map.addr(io.geo, pos);
            // Room for this kset and the LAST kset that may have to follow it.
            if data_size - h.head.off < size + KSET_HEADER_SIZE as u32 {
                let Some(next) = io.spare.take() else {
                    return Closed::WantsSegment;
                };
                persist(
                    io.pmem,
                    addr(Pos { seg: next, off: 0 }),
                    &[0u8; KSET_HEADER_SIZE],
                );
                let mut last = [0u8; KSET_HEADER_SIZE];
                encode_last_kset(next.get(), &mut last);
                persist(io.pmem, addr(h.head), &last);
                h.head = Pos { seg: next, off: 0 };
            }
            let head = addr(h.head);
            // Clear the header after the new kset first (see above). Its fence
            // also makes the data of the kset's keys durable — the write path
            // stores and flushes data without a fence of its own, on this CPU
            // or fenced on its own — before the kset that points at it is
            // stored.
            if h.head.off + size + KSET_HEADER_SIZE as u32 <= data_size {
                persist(io.pmem, head + u64::from(size), &[0u8; KSET_HEADER_SIZE]);
            } else {
                io.pmem.fence();
            }
            persist(io.pmem, head, sealed);
            h.head.off += size;
            if nocrc {
                h.nocrc_until = h.seq_head + 1;
            }
            if fua {
                h.fua_until = h.seq_head + 1;
            }
            h.seq_head += 1;
            h.written += 1;
            Closed::Done
        });
        if closed == Closed::Done {
            k.reset();
        }
        Ok(closed)
    }

    /// Closes every open kset, one after another, as far as the log's segment
    /// has room.
    pub(crate) fn close_all<P: Pmem>(
        &self,
        io: &mut LogIo<'_, P, M>,
    ) -> Result<Closed, CacheError> {
        for id in 0..self.ksets.len() {
            if self.close(id, io)? == Closed::WantsSegment {
                return Ok(Closed::WantsSegment);
            }
        }
        Ok(Closed::Done)
    }

    /// An application FLUSH: closes every open kset and then records the
    /// FLUSH at the head (see [`LogHead::barriers`]). Nothing is recorded
    /// when a close wants a segment.
    pub(crate) fn flush<P: Pmem>(&self, io: &mut LogIo<'_, P, M>) -> Result<Closed, CacheError> {
        let closed = self.close_all(io)?;
        if closed == Closed::Done {
            // Writeback may not put a kset from before this FLUSH and one
            // from after it in one batch.
            self.head.with(|h| h.barriers.record(h.seq_head));
        }
        Ok(closed)
    }
}

/// The on-media form of `key`.
pub(crate) fn key_to_onmedia(key: &Key) -> KeyOnmedia {
    KeyOnmedia {
        off: key.off,
        len: key.len,
        flags: key.flags & !KEY_FLAGS_IN_MEMORY,
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
/// lock alone. Needs nothing of the engine: a close that needs a new log segment
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
    log: &KeyLog<M>,
    io: &mut LogIo<'_, P, M>,
    key: &Key,
    fua: bool,
    over: Option<Over>,
    on_insert: &mut dyn FnMut(),
) -> Result<Append, CacheError> {
    let om = key_to_onmedia(key);
    loop {
        // Room first, without the subtree lock: a close copies the kset.
        let (id, room) = log.room(key.off, io);
        if room? == Closed::WantsSegment {
            return Ok(Append::RoomWantsSegment);
        }
        let mut replaced = false;
        let appended = index
            .insert_under(
                *key,
                |k| replaced |= !k.empty(),
                |insert| {
                    if let Some(over) = over {
                        let (from, to) = (key.off, key.end());
                        let covered = index.subtree_of(from).is_some_and(|sub| {
                            index.first_overlap_held(sub, from, to).is_some_and(|k| {
                                k.off <= from && k.end() >= to && over.holds(&k, from, io)
                            })
                        });
                        if !covered {
                            return Ok(Some(Append::Superseded));
                        }
                    }
                    let pushed = log.with_kset(id, |k| {
                        if !key.has_crc() && log.crc_wanted() {
                            return Ok(Some(Append::CrcWanted));
                        }
                        // Filled by a commit of another subtree meanwhile.
                        if !k.push(&om) {
                            return Ok(None);
                        }
                        if insert().is_err() {
                            k.pop();
                            return Err(CacheError::Busy("key pool exhausted"));
                        }
                        if fua {
                            k.mark_fua();
                        }
                        // Logged from here on (the kset is written when it
                        // closes), so writeback will copy it.
                        if key.dirty() {
                            log.dirty_bytes
                                .fetch_add(u64::from(key.len), Ordering::Relaxed);
                        }
                        on_insert();
                        Ok(Some(Append::Done { replaced: false }))
                    });
                    pushed.unwrap_or(Err(CacheError::NoMem("no kset")))
                },
            )
            .map_err(|_| CacheError::Invalid("key beyond the index"))??;
        match appended {
            None => continue,
            Some(Append::Done { .. }) => {}
            Some(other) => return Ok(other),
        }
        let closed = log.with_kset(id, |k| {
            if fua || k.is_full() {
                log.close_held(k, io)
            } else {
                Ok(Closed::Done)
            }
        });
        return Ok(match closed.unwrap_or(Ok(Closed::Done))? {
            Closed::Done => Append::Done { replaced },
            Closed::WantsSegment => Append::CloseWantsSegment { replaced },
        });
    }
}
