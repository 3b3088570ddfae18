//! Where the engine's memory comes from.
//!
//! The engine reserves everything it works in at construction ([`CacheMem`]), so
//! the IO path never allocates. It owns those buffers for its whole life: the
//! kernel hands it `KVVec`s, the host tests `Vec`s or slices they lend for the
//! length of a test. The buffer type is the [`Memory`] parameter of
//! [`Cache`](super::Cache), so no caller ever has to promise that a buffer
//! outlives the engine.

use super::ctrl::Ctrl;
use super::env::{Locked, SubtreeLocks};
use super::index::FreeList;
use super::key_log::KeyLog;
use super::space::Space;
use super::through::InFlight;
use super::{Node, Root, SegMapEntry, WbExtent};
use core::ops::{Deref, DerefMut};

/// A kind of buffer the engine can own.
pub trait Memory {
    /// A fixed-size buffer of `T`s.
    type Buf<T: 'static>: DerefMut<Target = [T]> + Unpin;
    /// A fixed-size buffer of `T`s that the engine shares with the reads it
    /// serves without its lock ([`super::reader::Reader`]): the key slab, the
    /// subtree roots, the segment map, all atomics.
    type Shared<T: Sync + 'static>: Deref<Target = [T]> + Clone;
    /// The locks of the index's subtrees, shared the same way.
    type Locks: SubtreeLocks + Clone;
    /// One object the engine shares with the requests it serves without its
    /// lock (the free list of the key slab, the key log).
    type One<T>: Deref<Target = T> + Clone;
    /// A `T` under a lock of its own, shared the same way (the key head, the
    /// segments in use: a spinlock in the kernel). Nothing under it sleeps or
    /// waits for IO.
    type Lock<T: Unpin>: Locked<T> + Clone;
    /// A `T` under a lock of its own, as [`Memory::Lock`], one of many in a
    /// [`Memory::Buf`] (the open ksets, the data heads).
    type Slot<T: Unpin + 'static>: Locked<T> + 'static;
}

/// The memory an engine works in, handed over at construction.
pub struct CacheMem<M: Memory> {
    /// The control state ([`Ctrl::new`]: one [`SegState`](super::SegState) per cache segment,
    /// at least the superblock's `seg_num`, and the buffer ksets are read
    /// back into, at least `KSET_ONMEDIA_SIZE_MAX` bytes), under its lock.
    pub ctrl: M::Lock<Ctrl<M>>,
    /// The writes through in flight, under their lock (empty).
    pub in_flight: M::Lock<InFlight>,
    /// One per cache segment too: where each lives and its generation, for
    /// reads outside the engine.
    pub seg_map: M::Shared<SegMapEntry>,
    /// The key slab: the most keys the index can hold (see [`key_capacity`]).
    pub nodes: M::Shared<Node>,
    /// One subtree root per 4 MiB of backing device.
    pub roots: M::Shared<Root>,
    /// A lock for each of those subtrees.
    pub locks: M::Locks,
    /// The free list of the key slab.
    pub free: M::One<FreeList>,
    /// The key log: the open ksets (upstream: one per CPU; keys go to
    /// `(off >> 22) % len`) and the key head, each under its lock.
    pub log: M::One<KeyLog<M>>,
    /// The data heads (upstream: per CPU) and the free segments, each under
    /// its lock.
    pub space: M::One<Space<M>>,
    /// The bounce buffer of [`Cache::writeback_step`](super::Cache::writeback_step)
    /// (4 KiB or more), for callers that own the engine.
    pub bounce: M::Buf<u8>,
    /// Room for its plan (at least `KSET_KEYS_MAX`).
    pub wb_extents: M::Buf<WbExtent>,
}

/// Bytes of cache device per key of the index: one key per 2 KiB (about 32 MiB
/// of key memory per GiB of cache, see [`key_capacity`]).
pub const CACHE_BYTES_PER_KEY: u64 = 2048;

/// Most keys any cache gets (4M keys, 256 MiB of key memory: an 8 GiB cache).
pub const KEYS_MAX: u64 = 1 << 22;

/// How many keys the index of a cache of `data_bytes` holds. Key memory grows
/// with the cache and is capped; it is not a limit on what the cache can take:
/// when keys run short, writeback and GC free them as they free segments
/// ([`Cache::key_pressure`](super::Cache::key_pressure)).
pub fn key_capacity(data_bytes: u64) -> usize {
    (data_bytes / CACHE_BYTES_PER_KEY).clamp(1024, KEYS_MAX) as usize
}
