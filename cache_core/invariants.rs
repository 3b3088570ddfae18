//! The engine's invariants, checked as a whole.
//!
//! [`Cache::check_invariants`] walks everything: the simulator calls it after
//! every step, and debug builds of the engine assert the cheap ones where they
//! must hold (`debug_assert!` in writeback, GC and the segment code).
//!
//! - The log runs key tail, then dirty tail, then key head, in log order.
//! - A planned writeback batch pins the dirty tail (it is where the pin is).
//! - The used-segment count matches the segments marked used.
//! - The keys of a subtree are sorted, do not overlap and stay in the subtree;
//!   the key slab's free count and the keys in the index add up to its size.
//! - A key that is not stale points into a segment in use.
//! - The dirty-byte count is the length of the dirty keys from the dirty tail
//!   to the key head, and in the open ksets.

use super::ctrl::Held;
use super::env::{Backing, Pmem};
use super::key::Key;
use super::log_cursor::{LogCursor, LogEntry};
use super::{Cache, Memory};
use crate::meta::layout::SUBTREE_SHIFT;

/// Which invariant does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken(pub &'static str);

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Checks every invariant (see the module docs), under the control lock
    /// (it reads the key log back into the control state's buffer). It
    /// changes nothing.
    pub fn check_invariants(&self) -> Result<(), Broken> {
        self.held(|h| h.check_invariants())
    }
}

impl<P: Pmem, B: Backing, M: Memory> Held<'_, P, B, M> {
    fn check_invariants(&mut self) -> Result<(), Broken> {
        if let Some(pinned) = self.t.wb_pinned {
            if pinned != self.t.dirty_tail.pos {
                return Err(Broken("a writeback batch is out but the dirty tail moved"));
            }
        }
        let used = (0..self.n_segs)
            .filter_map(|i| self.seg_id(i))
            .filter(|&id| self.seg_map.used(id))
            .count();
        if used != self.used_segs() as usize {
            return Err(Broken("used_segs does not count the segments in use"));
        }
        self.check_log_order()?;
        self.check_dirty_bytes()?;
        self.check_index()
    }

    fn check_dirty_bytes(&mut self) -> Result<(), Broken> {
        let unreadable = Broken("the key log between the dirty tail and head is unreadable");
        // One snapshot of the log: commits made outside the engine only
        // add ksets past this head, and count them in as they add them.
        let (open, head, dirty_bytes) = self.log.snapshot(|open, head, d| (open, head, d));
        let mut sum = open.ok_or(unreadable)?;
        let mut cur = LogCursor::new(self.t.dirty_tail.pos);
        while cur.pos != head {
            let entry = self.log_next(&mut cur, |_, _| {}).map_err(|_| unreadable)?;
            // A hop to the next segment may land on the head.
            if cur.pos == head {
                break;
            }
            match entry {
                LogEntry::Keys { key_num, size } => {
                    for i in 0..key_num as usize {
                        let k = self.scratch_key(i).map_err(|_| unreadable)?;
                        if k.dirty() {
                            sum += u64::from(k.len);
                        }
                    }
                    cur.advance(size);
                }
                LogEntry::End => break,
            }
        }
        if sum != dirty_bytes {
            return Err(Broken("dirty_bytes does not count the dirty keys"));
        }
        Ok(())
    }

    /// Key tail, dirty tail, key head: each reached walking the log from the
    /// one before.
    fn check_log_order(&mut self) -> Result<(), Broken> {
        let (dirty, head) = (self.t.dirty_tail.pos, self.key_head());
        let mut cur = LogCursor::new(self.t.key_tail.pos);
        let mut seen_dirty = cur.pos == dirty;
        loop {
            if cur.pos == head {
                break;
            }
            let entry = self
                .log_next(&mut cur, |_, pos| seen_dirty |= pos == dirty)
                .map_err(|_| Broken("the key log between the key tail and head is unreadable"))?;
            seen_dirty |= cur.pos == dirty;
            if cur.pos == head {
                break;
            }
            match entry {
                LogEntry::Keys { size, .. } => cur.advance(size),
                LogEntry::End => return Err(Broken("the key log ends before the key head")),
            }
            seen_dirty |= cur.pos == dirty;
        }
        if !seen_dirty {
            return Err(Broken(
                "the dirty tail is not between the key tail and head",
            ));
        }
        Ok(())
    }

    fn check_index(&self) -> Result<(), Broken> {
        let mut count = 0usize;
        let mut prev: Option<Key> = None;
        let mut broken = None;
        self.index.for_each(|k| {
            count += 1;
            if broken.is_some() {
                return;
            }
            if k.len == 0 || k.off >> SUBTREE_SHIFT != (k.end() - 1) >> SUBTREE_SHIFT {
                broken = Some(Broken("a key is empty or crosses its subtree"));
            }
            if let Some(p) = prev {
                if p.off >> SUBTREE_SHIFT == k.off >> SUBTREE_SHIFT && p.end() > k.off {
                    broken = Some(Broken("two keys of a subtree overlap or are out of order"));
                }
            }
            if !k.empty() && !self.key_stale(k) && !self.seg_map.used(k.pos.seg) {
                broken = Some(Broken("a live key points into a free segment"));
            }
            prev = Some(*k);
        });
        if let Some(b) = broken {
            return Err(b);
        }
        if count + self.index.free_nodes() as usize != self.index.capacity() {
            return Err(Broken("keys in the index and free key slots do not add up"));
        }
        if self.index.free_list_len() != self.index.free_nodes() as usize {
            return Err(Broken("the free key list does not hold the free key slots"));
        }
        Ok(())
    }
}
