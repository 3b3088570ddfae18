//! The cache's control state: its `cache_info`, its two tails, the metadata
//! slots of its segments and the buffer ksets are read back into, under one
//! lock of its own (upstream spreads these over `cache_info_lock`,
//! `key_tail_lock` and `dirty_tail_lock`).
//!
//! Who takes it: GC (which moves the key tail), writeback's planning and
//! commit (the dirty tail), the clean pass, the messages and `status`, and a
//! request only when it changes what lives here (a segment's last reference
//! going, the media `DATA_CRC` flag to sync). Writes and reads that hit never
//! do. Nothing under it sleeps or waits for the backing device.
//!
//! The engine's locks nest in one order: the writes through in flight
//! ([`super::through`]; a write through's fill commits and gives back room
//! under it), then this one, then a subtree of the index, an open kset (a key
//! is logged as it goes into its subtree), the key head (a kset closes under
//! it); and apart, a data head, then the segments in use. None is taken inside
//! a lock that comes after it.
//!
//! [`Held`] is the engine with this lock held: the code that moves a tail or
//! reads a kset back runs on it, and reaches the rest of the engine (which
//! takes `&self`) through it.

use super::env::{Backing, Pmem};
use super::forward::LiveSeen;
use super::key::Pos;
use super::{Cache, Memory, SegState, Tail};
use crate::meta::cache_info::CacheInfo;
use crate::meta::header::SlotIndex;
use crate::meta::kset::KsetRead;
use core::ops::Deref;

/// See the [module](self) comment.
pub struct Ctrl<M: Memory> {
    pub(crate) info: CacheInfo,
    pub(crate) info_index: SlotIndex,
    /// One per cache segment: the slots of its info and generation.
    pub(crate) segs: M::Buf<SegState>,
    /// A kset read back (GC, writeback planning, replay), at least
    /// `KSET_ONMEDIA_SIZE_MAX` bytes.
    pub(crate) scratch: M::Buf<u8>,
    pub(crate) key_tail: Tail,
    pub(crate) dirty_tail: Tail,
    /// The dirty tail of a planned writeback batch that is out (see
    /// [`super::writeback::WbBatch`]): nothing else moves the dirty tail meanwhile.
    pub(crate) wb_pinned: Option<Pos>,
    /// Where the clean pass under way goes on (subtree, offset).
    pub(crate) clean_at: Option<(usize, u64)>,
    /// Ordinal of the key-carrying kset at the key tail (the one the next
    /// close writes is the log's `seq_head`). Replay numbers the ksets it finds
    /// from 0; GC consumes them in the same order.
    pub(crate) log_seq_tail: u64,
    /// Ordinal of the key-carrying kset at (or, past a LAST kset, after) the
    /// dirty tail.
    pub(crate) dirty_seq: u64,
    /// How live the ksets GC collected lately were (see [`super::forward`]).
    pub(crate) gc_seen: LiveSeen,
    /// The scratch buffer holds the kset at this key tail, of this ordinal
    /// (`log_seq_tail`), as GC's copies read it (a [`KsetRead::Keys`]): they
    /// look at it again without reading it again, and so does GC, which
    /// collects it next. Any other read of a kset clears it.
    pub(crate) forward_kset: Option<(Pos, u64, KsetRead)>,
}

impl<M: Memory> Ctrl<M> {
    /// The control state over `segs` (one per cache segment) and `scratch`
    /// (at least `KSET_ONMEDIA_SIZE_MAX` bytes); the engine fills it in as it
    /// starts.
    pub fn new(segs: M::Buf<SegState>, scratch: M::Buf<u8>) -> Self {
        Ctrl {
            info: CacheInfo::default(),
            info_index: SlotIndex::FIRST,
            segs,
            scratch,
            key_tail: Tail::default(),
            dirty_tail: Tail::default(),
            wb_pinned: None,
            clean_at: None,
            log_seq_tail: 0,
            dirty_seq: 0,
            gc_seen: LiveSeen::NONE,
            forward_kset: None,
        }
    }
}

impl<M: Memory> Ctrl<M> {
    /// Forgets everything but the buffers (at start).
    pub(crate) fn reset(&mut self) {
        for s in self.segs.iter_mut() {
            *s = SegState::default();
        }
        self.info = CacheInfo::default();
        self.info_index = SlotIndex::FIRST;
        self.key_tail = Tail::default();
        self.dirty_tail = Tail::default();
        self.wb_pinned = None;
        self.clean_at = None;
        self.log_seq_tail = 0;
        self.dirty_seq = 0;
        self.gc_seen = LiveSeen::NONE;
        self.forward_kset = None;
    }
}

/// The engine with its control lock held (see the [module](self) comment).
pub(crate) struct Held<'a, P: Pmem, B: Backing, M: Memory> {
    pub(crate) c: &'a Cache<P, B, M>,
    pub(crate) t: &'a mut Ctrl<M>,
}

impl<P: Pmem, B: Backing, M: Memory> Deref for Held<'_, P, B, M> {
    type Target = Cache<P, B, M>;

    fn deref(&self) -> &Cache<P, B, M> {
        self.c
    }
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Runs `f` on the engine with its control lock held.
    pub(crate) fn held<R>(&self, f: impl FnOnce(&mut Held<'_, P, B, M>) -> R) -> R {
        use super::env::Locked;
        self.ctrl.with(|t| f(&mut Held { c: self, t }))
    }
}
