//! Walking the key log: one kset at a time from a position, across segments by
//! their LAST ksets, with the cycle check that upstream's replay lacked.
//!
//! Replay, the dirty-tail check at attach and the invariant check walk the log
//! with a [`LogCursor`]. Writeback and GC step their own tail one kset at a time
//! (each step persists the tail it moves), so they read one entry where their
//! tail is and never loop over the chain themselves.

use super::ctrl::Held;
use super::env::{Backing, Pmem};
use super::error::CacheError;
use super::key::Pos;
use super::Memory;
use crate::meta::kset::KsetRead;
use crate::meta::{MetaError, MetaErrorKind};

/// A position in the key log and how many segment hops led there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogCursor {
    pub(crate) pos: Pos,
    hops: u32,
}

/// What the log holds at a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogEntry {
    /// A kset of `key_num` keys, `size` bytes long, decoded into the engine's
    /// scratch buffer (see `Cache::scratch_key`).
    Keys { key_num: u32, size: u32 },
    /// The end of the log (the key head).
    End,
}

impl LogCursor {
    pub(crate) fn new(pos: Pos) -> Self {
        LogCursor { pos, hops: 0 }
    }

    /// Moves past the kset of a [`LogEntry::Keys`] of `size` bytes.
    pub(crate) fn advance(&mut self, size: u32) {
        self.pos.off += size;
    }
}

impl<P: Pmem, B: Backing, M: Memory> Held<'_, P, B, M> {
    /// The log entry at `cur`, following LAST ksets into their next segment
    /// (`on_hop` sees each segment entered). A chain that hops more often than
    /// the cache has segments is a cycle, and an error.
    pub(crate) fn log_next(
        &mut self,
        cur: &mut LogCursor,
        mut on_hop: impl FnMut(&mut Self, Pos),
    ) -> Result<LogEntry, CacheError> {
        loop {
            match self.read_kset(cur.pos)? {
                KsetRead::End => return Ok(LogEntry::End),
                KsetRead::Keys { key_num, size } => return Ok(LogEntry::Keys { key_num, size }),
                KsetRead::Last { next_cache_seg_id } => {
                    cur.hops += 1;
                    if cur.hops > self.n_segs {
                        return Err(MetaError::new(
                            "pcache_cache_kset_onmedia",
                            "next_cache_seg_id",
                            MetaErrorKind::Cycle,
                        )
                        .into());
                    }
                    cur.pos = Pos {
                        seg: self.next_log_seg(next_cache_seg_id)?,
                        off: 0,
                    };
                    on_hop(self, cur.pos);
                }
            }
        }
    }
}
