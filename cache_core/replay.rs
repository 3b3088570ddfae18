//! Rebuilding the index from the key log (upstream `cache_replay`).
//!
//! The walk starts at the persisted key tail and follows ksets, hopping through
//! LAST ksets to the next segment, until a position holds no valid kset: that is
//! the key head. Keys whose generation is older than their segment's were
//! reclaimed by GC and are skipped. The walk is bounded: every kset advances the
//! position within a segment, and more segment hops than segments is a cycle.

use super::ctrl::Held;
use super::env::{Backing, Pmem};
use super::error::CacheError;
use super::key::{Key, Pos, KEY_FLAGS_IN_MEMORY};
use super::log_cursor::{LogCursor, LogEntry};
use super::{Cache, Memory};
use crate::meta::kset::{
    kset_key, kset_read_with, kset_span, KsetRead, KEY_FLAGS_DATA_CRC, KSET_HEADER_SIZE,
    KSET_ONMEDIA_SIZE_MAX,
};
use crate::meta::{MetaError, MetaErrorKind};

impl<P: Pmem, B: Backing, M: Memory> Held<'_, P, B, M> {
    /// Read the kset at `pos` into the scratch buffer and classify it.
    pub(crate) fn read_kset(&mut self, pos: Pos) -> Result<KsetRead, CacheError> {
        self.t.forward_kset = None;
        let remain = self.geo.seg_data_size().saturating_sub(pos.off) as usize;
        let n = remain.min(KSET_ONMEDIA_SIZE_MAX);
        let addr = self.pos_addr(pos);
        // The header first, then only as much as the kset it announces: a
        // kset closed early (a FLUSH, an idle flush) is a fraction of the
        // largest one.
        let head = n.min(KSET_HEADER_SIZE);
        let (scratch, pmem) = (&mut *self.t.scratch, &self.c.pmem);
        let media = |_| CacheError::Io("pmem media error reading kset");
        let hdr = scratch
            .get_mut(..head)
            .ok_or(CacheError::NoMem("scratch"))?;
        pmem.read(addr, hdr).map_err(media)?;
        let n = n.min(kset_span(hdr)).max(head);
        let rest = scratch
            .get_mut(head..n)
            .ok_or(CacheError::NoMem("scratch"))?;
        pmem.read(addr + head as u64, rest).map_err(media)?;
        let buf = scratch.get(..n).ok_or(CacheError::NoMem("scratch"))?;
        Ok(kset_read_with(buf, self.c.n_segs, |c, b| {
            pmem.crc32c(c, b)
        })?)
    }

    /// Key `i` of the kset in the scratch buffer, validated and converted.
    /// Under the on-media `DATA_CRC` flag every logged key has a CRC (upstream's
    /// rule); otherwise only keys with `KEY_FLAGS_DATA_CRC` do.
    pub(crate) fn scratch_key(&self, i: usize) -> Result<Key, CacheError> {
        let om = kset_key(&self.t.scratch, i)?;
        om.validate(self.dev_bytes, self.n_segs, self.geo.seg_data_size())?;
        let seg = self.seg_id(om.cache_seg_id).ok_or(MetaError::new(
            "pcache_cache_key_onmedia",
            "cache_seg_id",
            MetaErrorKind::OutOfRange,
        ))?;
        // Nothing read from the media is verified yet.
        let flags = om.flags & !KEY_FLAGS_IN_MEMORY;
        let flags = if self.t.info.data_crc() {
            flags | KEY_FLAGS_DATA_CRC
        } else {
            flags
        };
        Ok(Key {
            off: om.off,
            len: om.len,
            flags,
            pos: Pos {
                seg,
                off: om.cache_seg_off,
            },
            gen: om.seg_gen,
            crc: om.data_crc,
            crc_back: 0,
            crc_len: om.len,
        })
    }

    pub(crate) fn replay(&mut self) -> Result<(), CacheError> {
        let mut cur = LogCursor::new(self.t.key_tail.pos);
        self.set_used(cur.pos.seg, true);
        let mut dirty_tail_seen = false;
        let cold = self.mode().writes_through();
        // What the key log gets once the walk is done.
        let (mut seq_head, mut dirty_bytes, mut nocrc_until) = (0u64, 0u64, 0u64);
        loop {
            if cur.pos == self.t.dirty_tail.pos && !dirty_tail_seen {
                dirty_tail_seen = true;
                self.t.dirty_seq = seq_head;
            }
            // A LAST kset leads to the next segment of the log, which is in use.
            let entry = self.log_next(&mut cur, |c, pos| {
                if pos == c.t.dirty_tail.pos && !dirty_tail_seen {
                    dirty_tail_seen = true;
                    c.t.dirty_seq = seq_head;
                }
                c.set_used(pos.seg, true);
            })?;
            let LogEntry::Keys { key_num, size } = entry else {
                break;
            };
            for i in 0..key_num as usize {
                let key = self.scratch_key(i)?;
                // Writeback will copy every dirty key from the dirty tail on (and
                // counts them the same way when it commits).
                if dirty_tail_seen && key.dirty() {
                    dirty_bytes += u64::from(key.len);
                }
                // Counted before the staleness check: the C module
                // checks the CRC of every key it decodes.
                if !key.has_crc() {
                    nocrc_until = seq_head + 1;
                }
                // A key into the key log itself or past the key head would
                // be corrupt, but only its range is checkable here.
                if key.gen < self.seg_map.gen(key.pos.seg) {
                    continue;
                }
                if key.key_stale_check_subtree(self.c) {
                    return Err(MetaError::new(
                        "pcache_cache_key_onmedia",
                        "off/len",
                        MetaErrorKind::OutOfRange,
                    )
                    .into());
                }
                self.set_used(key.pos.seg, true);
                self.seg_get(key.pos.seg);
                // Recorded in a mode that writes through: the cache starts empty
                // (see `super::mode`); the reference above is GC's to give back.
                if cold {
                    continue;
                }
                self.index
                    .insert(key, |_| {})
                    .map_err(|_| CacheError::NoMem("key pool too small to replay the log"))?;
            }
            cur.advance(size);
            seq_head += 1;
        }
        if !dirty_tail_seen {
            // Writeback would walk a chain that is not the log.
            return Err(MetaError::new(
                "pcache_cache_ctrl",
                "dirty_tail_pos",
                MetaErrorKind::OutOfRange,
            )
            .into());
        }
        self.log.with_head(|h| {
            h.head = cur.pos;
            h.seq_head = seq_head;
            h.nocrc_until = nocrc_until;
        });
        self.log.set_dirty_bytes(dirty_bytes);
        Ok(())
    }

    /// `cache_verify_dirty_tail`: the dirty tail's chain must terminate.
    pub(crate) fn verify_dirty_tail(&mut self) -> Result<(), CacheError> {
        let mut cur = LogCursor::new(self.t.dirty_tail.pos);
        while let LogEntry::Keys { size, .. } = self.log_next(&mut cur, |_, _| {})? {
            cur.advance(size);
        }
        Ok(())
    }
}

impl Key {
    /// A logged key must not cross a 4 MiB stripe (writes are split there), or
    /// the index could not hold it.
    fn key_stale_check_subtree<P: Pmem, B: Backing, M: Memory>(&self, c: &Cache<P, B, M>) -> bool {
        c.index.subtree_of(self.off) != c.index.subtree_of(self.end() - 1)
    }
}
