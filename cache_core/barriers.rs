//! Where the application's FLUSHes fall in the key log, so that writeback can
//! take several ksets per backing flush.
//!
//! Writeback must keep the backing device a prefix of the application's
//! history across its FLUSHes: a write issued after a FLUSH completed may reach
//! the backing device only with everything acknowledged before that FLUSH. A
//! FLUSH closes every open kset, so the keys before it are in ksets with lower
//! log ordinals than the keys after it, and the ordinal the next kset gets at
//! that moment is a *barrier*. Ksets between two barriers may be written back
//! together, in any order but the overlapping writes', and flushed once;
//! a batch never spans a barrier.
//!
//! The log does not record the FLUSHes, so the ksets found by replay are each
//! taken as their own batch (below the *floor*), and only the barriers since
//! attach are kept: the newest [`BARRIERS_MAX`], with the floor raised past any
//! that has to be forgotten, which only ever splits batches more.

/// Barriers kept at once. Writeback forgets those behind the dirty tail, so
/// this bounds the FLUSHes that can pile up ahead of it before batches shrink.
pub const BARRIERS_MAX: usize = 32;

/// The barriers ahead of the dirty tail (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct Barriers {
    /// Every kset ordinal up to here is a barrier: each such kset is a batch
    /// of its own.
    floor: u64,
    /// Barriers above `floor`, oldest first, strictly increasing.
    at: [u64; BARRIERS_MAX],
    len: usize,
}

impl Barriers {
    /// After replay: the ksets up to `log_seq_head` came from the media, with
    /// FLUSHes nobody recorded between them.
    pub fn attached(log_seq_head: u64) -> Self {
        Barriers {
            floor: log_seq_head,
            ..Default::default()
        }
    }

    /// An application FLUSH closed the open ksets; the next kset will be
    /// `next_seq`.
    pub fn record(&mut self, next_seq: u64) {
        let newest = self.kept().last().copied().unwrap_or(self.floor);
        if next_seq <= newest {
            // No kset closed since the last barrier: the same one.
            return;
        }
        if self.len == BARRIERS_MAX {
            // Forget the oldest; the floor covers it and the next one, so no
            // batch spans either.
            self.floor = self.at.get(1).copied().unwrap_or(next_seq);
            self.drop_front(2);
        }
        if let Some(slot) = self.at.get_mut(self.len) {
            *slot = next_seq;
            self.len += 1;
        }
    }

    /// Whether kset `seq` may join a batch holding kset `seq - 1`.
    pub fn joins(&self, seq: u64) -> bool {
        seq > self.floor && !self.kept().contains(&seq)
    }

    /// Whether no barrier follows kset `seq`: it is in the newest stretch of
    /// ksets between FLUSHes (not one replay found: each of those is a batch
    /// of its own, as if a FLUSH followed it).
    pub fn none_after(&self, seq: u64) -> bool {
        seq >= self.floor && self.kept().last().is_none_or(|&b| b <= seq)
    }

    /// The dirty tail reached kset `seq`: barriers at or below it separate
    /// nothing that is still to be written back.
    pub fn passed(&mut self, seq: u64) {
        let n = self.kept().iter().take_while(|&&b| b <= seq).count();
        self.drop_front(n);
    }

    fn kept(&self) -> &[u64] {
        self.at.get(..self.len).unwrap_or_default()
    }

    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.at.copy_within(n..self.len, 0);
        self.len -= n;
    }
}
