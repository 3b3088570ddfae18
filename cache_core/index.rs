//! The key index: logical space striped into 4 MiB subtrees, each a treap of
//! non-overlapping keys, with all nodes taken from one preallocated slab.
//!
//! Inserting resolves overlaps (`cache_key_insert` with fixup): keys the new key
//! covers are freed, keys overlapping its head or tail are trimmed, a key that
//! contains it is split in two. Nodes are `u32` indices into the slab. A treap
//! (priority = hash of the slot) keeps split/merge simple and the expected
//! depth logarithmic; recursion depth is the tree depth. Every slab access goes
//! through `n`, so a corrupted link can only misbehave, never index out of
//! bounds.
//!
//! A lookup of a key's start (a block-sized overwrite, a writeback liveness
//! check of a whole key, GC's copy check) first tries a hint: each slab slot also
//! holds one bucket of a hash table over the slab, naming the node last seen
//! starting at an offset that hashes there. In a tree of random treap nodes
//! every level of a descent is a cache miss (and, under an emulator, a page
//! walk); a hint that holds is two. A hint is never cleared, only checked:
//! see [`Trees::hinted`]. Reads do not: most start inside a key, where the
//! bucket would be one more miss before the descent ([`Trees::read_overlap`]).
//!
//! Subtrees are worked on at once: each operation holds its subtree's lock
//! ([`SubtreeLocks`], upstream's per-subtree `tree_lock`) and nothing else, so
//! the index works through `&self` and shares one slab, every field of a node
//! an atomic. A node has one owner at a time — a subtree's tree, an insert
//! under way, or the free list — and only its owner touches it: a subtree's
//! nodes under the subtree's lock, free nodes through the free list's
//! compare-and-swap, whose acquire and release order what the last owner wrote
//! before what the next one reads. So the owners' own loads and stores are
//! `Relaxed` (plain moves on x86), and free nodes come from one list whatever
//! subtree frees or takes them: none is stranded in a quiet subtree, as it
//! would be in per-subtree pools.

use super::env::SubtreeLocks;
use super::key::{Key, Pos, SegId};
use super::memory::Memory;
use crate::meta::kset::KEY_FLAGS_EMPTY;
use crate::meta::layout::SUBTREE_SHIFT;
use core::sync::atomic::{
    AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};

const NIL: u32 = u32::MAX;

/// A slab slot: a key, packed in words, and its two tree links. Create with
/// `Node::default()`. A cache line each (60 bytes would straddle lines: a
/// lookup touching one node would miss twice).
#[repr(align(64))]
pub struct Node {
    /// `off`; `len | flags << 32`; `pos.seg | pos.off << 32`; `gen`;
    /// `crc | crc_back << 32`; `crc_len` (see [`Node::key`]).
    key: [AtomicU64; 6],
    /// `left | right << 32`. In a tree, the children; on the free list, the
    /// next free node is on the left. One word, so that a descent loads both
    /// children at once and picks one without a branch.
    links: AtomicU64,
    /// The treap priority, fixed by the slot (see [`prio_of`]); set once by
    /// [`Index::new`], before anyone else sees the slab.
    prio: AtomicU32,
    /// Not this node's own: slot `i`'s hint is bucket `i` of a table over the
    /// whole slab, the node last seen holding a key that starts at an offset
    /// hashing to `i` ([`Trees::bucket`]), or `NIL`. Any thread may overwrite
    /// it; a lookup believes it only once the node it names starts at the
    /// offset looked for ([`Trees::hinted`]).
    hint: AtomicU32,
}

fn lo(w: u64) -> u32 {
    w as u32
}

fn hi(w: u64) -> u32 {
    (w >> 32) as u32
}

fn pair(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | u64::from(hi) << 32
}

impl Node {
    fn key(&self) -> Key {
        let [w0, w1, w2, w3, w4, w5] = self.key.each_ref().map(|w| w.load(Relaxed));
        Key {
            off: w0,
            len: lo(w1),
            flags: hi(w1),
            pos: Pos {
                seg: SegId::restored(lo(w2)),
                off: hi(w2),
            },
            gen: w3,
            crc: lo(w4),
            crc_back: hi(w4),
            crc_len: lo(w5),
        }
    }

    fn set_key(&self, k: &Key) {
        let words = [
            k.off,
            pair(k.len, k.flags),
            pair(k.pos.seg.get(), k.pos.off),
            k.gen,
            pair(k.crc, k.crc_back),
            u64::from(k.crc_len),
        ];
        for (a, w) in self.key.iter().zip(words) {
            a.store(w, Relaxed);
        }
    }

    /// The key's start, all a descent needs.
    fn off(&self) -> u64 {
        self.key[0].load(Relaxed)
    }

    fn end(&self) -> u64 {
        // Saturating: a node out of every tree starts at `NO_OFF`.
        self.off()
            .saturating_add(u64::from(lo(self.key[1].load(Relaxed))))
    }

    fn links(&self) -> (u32, u32) {
        let w = self.links.load(Relaxed);
        (lo(w), hi(w))
    }

    /// The child on the side of `x` from the key's start: the right one if the
    /// key starts before `x`.
    fn toward(&self, x: u64) -> u32 {
        let (l, r) = self.links();
        if self.off() < x {
            r
        } else {
            l
        }
    }

    fn left(&self) -> u32 {
        self.links().0
    }

    fn right(&self) -> u32 {
        self.links().1
    }

    fn set_links(&self, left: u32, right: u32) {
        self.links.store(pair(left, right), Relaxed)
    }

    fn set_left(&self, i: u32) {
        self.set_links(i, self.right())
    }
}

/// A node in no tree starts nowhere: no lookup's offset is `NO_OFF` (keys
/// end within the device), so no hint ever leads to it.
const NO_OFF: u64 = u64::MAX;

impl Default for Node {
    fn default() -> Self {
        let n = Node {
            key: Default::default(),
            links: AtomicU64::new(pair(NIL, NIL)),
            prio: AtomicU32::new(0),
            hint: AtomicU32::new(NIL),
        };
        n.key[0].store(NO_OFF, Relaxed);
        n
    }
}

/// Filling a slab before the index takes it over (nobody else sees it yet).
impl Clone for Node {
    fn clone(&self) -> Self {
        let n = Node {
            prio: AtomicU32::new(self.prio.load(Relaxed)),
            ..Node::default()
        };
        n.set_key(&self.key());
        n.links.store(self.links.load(Relaxed), Relaxed);
        n
    }
}

impl core::fmt::Debug for Node {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Node")
            .field("key", &self.key())
            .field("left", &self.left())
            .field("right", &self.right())
            .finish()
    }
}

/// The root of one subtree (none: the subtree is empty). Create with
/// `Root::default()`.
pub struct Root(AtomicU32);

impl Default for Root {
    fn default() -> Self {
        Root(AtomicU32::new(NIL))
    }
}

/// Filling the roots before the index takes them over.
impl Clone for Root {
    fn clone(&self) -> Self {
        Root(AtomicU32::new(self.0.load(Relaxed)))
    }
}

impl core::fmt::Debug for Root {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.load(Relaxed).fmt(f)
    }
}

/// The slab has no free node for an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexFull;

/// Nodes linked through `left`, from `head` to `tail`, on their way to the
/// free list (see [`Index::free_chain`]).
struct Chain {
    head: u32,
    tail: u32,
    count: u32,
}

impl Chain {
    const EMPTY: Chain = Chain {
        head: NIL,
        tail: NIL,
        count: 0,
    };
}

/// A subtree's lock, held until dropped.
struct Held<'a, L: SubtreeLocks> {
    locks: &'a L,
    sub: usize,
}

impl<L: SubtreeLocks> Drop for Held<'_, L> {
    fn drop(&mut self) {
        self.locks.unlock(self.sub);
    }
}

/// The subtrees over the slab: what a lookup needs, and all a read served
/// outside the engine holds of the index ([`super::reader::Reader`]). Every
/// operation holds its subtree's lock; a clone shares the slab, the roots and
/// the locks.
pub struct Trees<M: Memory> {
    nodes: M::Shared<Node>,
    roots: M::Shared<Root>,
    locks: M::Locks,
    /// Subtrees in use (the device's 4 MiB stripes; `roots` may be longer).
    n_roots: usize,
    sink: Node,
}

impl<M: Memory> Clone for Trees<M> {
    fn clone(&self) -> Self {
        Trees {
            nodes: self.nodes.clone(),
            roots: self.roots.clone(),
            locks: self.locks.clone(),
            n_roots: self.n_roots,
            sink: Node::default(),
        }
    }
}

/// The free list of the key slab, a stack linked through `left`, shared by
/// every [`Index`] handle of an engine.
#[derive(Debug, Default)]
pub struct FreeList {
    /// The node on top in the low 32 bits, and in the high 32 a count of the
    /// changes to it, so that a compare-and-swap whose node was taken and given
    /// back meanwhile fails (ABA).
    top: AtomicU64,
    /// Free nodes. Counted up before nodes go on the list and down after they
    /// come off, so it may run ahead of the list for a moment, never behind.
    n_free: AtomicU32,
}

/// The whole index over the preallocated slab and subtree roots: the
/// [`Trees`], and the free list that inserts take nodes from. A clone shares
/// them all (a commit outside the engine inserts through one, see
/// [`super::key_log::commit_key`]).
pub struct Index<M: Memory> {
    trees: Trees<M>,
    free: M::One<FreeList>,
}

impl<M: Memory> Clone for Index<M> {
    fn clone(&self) -> Self {
        Index {
            trees: self.trees.clone(),
            free: self.free.clone(),
        }
    }
}

/// An index is its trees, and a free list.
impl<M: Memory> core::ops::Deref for Index<M> {
    type Target = Trees<M>;

    fn deref(&self) -> &Trees<M> {
        &self.trees
    }
}

fn prio_of(i: u32) -> u32 {
    let mut x = i.wrapping_mul(0x9E37_79B9) ^ 0x5bd1_e995;
    x ^= x >> 15;
    x = x.wrapping_mul(0x2c1b_3c6d);
    x ^= x >> 12;
    x
}

impl<M: Memory> Trees<M> {
    pub fn n_subtrees(&self) -> usize {
        self.n_roots
    }

    pub fn capacity(&self) -> usize {
        self.nodes.len()
    }

    /// The subtree of logical offset `off`, if the device has it.
    pub fn subtree_of(&self, off: u64) -> Option<usize> {
        let s = (off >> SUBTREE_SHIFT) as usize;
        if s < self.n_roots {
            Some(s)
        } else {
            None
        }
    }

    /// The subtree of `cur` and where the part of `cur..end` in it ends.
    pub fn stripe(&self, cur: u64, end: u64) -> Option<(usize, u64)> {
        let sub = self.subtree_of(cur)?;
        let stripe_end = ((cur >> SUBTREE_SHIFT) + 1) << SUBTREE_SHIFT;
        Some((sub, end.min(stripe_end)))
    }

    fn n(&self, i: u32) -> &Node {
        self.nodes.get(i as usize).unwrap_or(&self.sink)
    }

    /// The slot whose [`Node::hint`] serves keys starting at `off`: the high
    /// bits of a Fibonacci hash, scaled to the slab.
    fn bucket(&self, off: u64) -> u32 {
        let h = (off >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((u128::from(h) * self.nodes.len() as u128) >> 64) as u32
    }

    /// The node of `sub`'s tree that starts exactly at `x`, if its bucket's
    /// hint still names it; `NIL` says nothing either way (nor for an `x`
    /// outside `sub`'s stripe). Under `sub`'s lock. The hint is believed
    /// because only the holder of a subtree's lock ever makes a node start
    /// inside the subtree's stripe, and a node leaves a tree only to the free
    /// list, starting at `NO_OFF` ([`Index::chain_node`]): so a node starting
    /// at `x` now is in `sub`'s tree, and was put there under this lock,
    /// whose release ordered it.
    fn hinted(&self, sub: usize, x: u64) -> u32 {
        if self.subtree_of(x) != Some(sub) {
            return NIL;
        }
        let h = self.n(self.bucket(x)).hint.load(Relaxed);
        if (h as usize) < self.nodes.len() && self.n(h).off() == x {
            h
        } else {
            NIL
        }
    }

    /// Node `i`, in a tree, is where lookups of its start look first.
    fn set_hint(&self, i: u32) {
        let off = self.n(i).off();
        self.n(self.bucket(off)).hint.store(i, Relaxed);
    }

    /// Subtree `sub`'s lock, until the guard goes.
    fn hold(&self, sub: usize) -> Held<'_, M::Locks> {
        self.locks.lock(sub);
        Held {
            locks: &self.locks,
            sub,
        }
    }

    fn root(&self, sub: usize) -> u32 {
        self.roots.get(sub).map_or(NIL, |r| r.0.load(Relaxed))
    }

    fn set_root(&self, sub: usize, r: u32) {
        if let Some(slot) = self.roots.get(sub).filter(|_| sub < self.n_roots) {
            slot.0.store(r, Relaxed);
        }
    }

    fn rightmost(&self, mut t: u32) -> u32 {
        while t != NIL && self.n(t).right() != NIL {
            t = self.n(t).right();
        }
        t
    }

    /// Node starting exactly at `x`.
    fn find(&self, t: u32, x: u64) -> u32 {
        self.find_or_before(t, x).0
    }

    /// The node starting exactly at `x` and `NIL`, or `NIL` and the last node
    /// starting before `x` (`NIL` too if none), in one descent.
    fn find_or_before(&self, mut t: u32, x: u64) -> (u32, u32) {
        let mut before = NIL;
        while t != NIL {
            let n = self.n(t);
            let off = n.off();
            if off == x {
                return (t, NIL);
            }
            if off < x {
                before = t;
            }
            t = n.toward(x);
        }
        (NIL, before)
    }

    /// Node with the smallest start >= `x`.
    fn ceil(&self, mut t: u32, x: u64) -> u32 {
        let mut best = NIL;
        while t != NIL {
            let n = self.n(t);
            if n.off() >= x {
                best = t;
                t = n.left();
            } else {
                t = n.right();
            }
        }
        best
    }

    fn visit_tree(&self, mut t: u32, f: &mut impl FnMut(&Key)) {
        while t != NIL {
            let n = self.n(t);
            let (l, r) = n.links();
            self.visit_tree(l, f);
            f(&n.key());
            t = r;
        }
    }

    /// The first key in `sub` that overlaps `[from, to)`, in logical order.
    ///
    /// One descent finds both the floor of `from` (the last key starting at or
    /// before it, which overlaps if it reaches past `from`) and its successor
    /// (which overlaps if it starts before `to`): the two searches take the
    /// same path.
    ///
    /// Where `from` is likely a key's start (writeback, GC, a key just
    /// found), this tries the hint first; a read, which mostly starts inside
    /// a key, uses [`Trees::read_overlap`].
    pub fn first_overlap(&self, sub: usize, from: u64, to: u64) -> Option<Key> {
        let _held = self.hold(sub);
        self.first_overlap_held(sub, from, to)
    }

    /// [`Trees::first_overlap`] without the hint, for a read: a 4 KiB read
    /// inside a larger key finds no hint at its start, and the bucket's load
    /// (a miss of its own: buckets are as scattered as the nodes) would come
    /// on top of the descent it makes anyway. Nor does it set one: a read's
    /// store would dirty a line other CPUs' lookups load.
    pub fn read_overlap(&self, sub: usize, from: u64, to: u64) -> Option<Key> {
        let _held = self.hold(sub);
        self.descend_overlap(sub, from, to, false)
    }

    /// Calls `f(entry, from, upto)` on each entry overlapping `off..end`, in
    /// order, with `from..upto` the part of the range it covers in its
    /// subtree, until `f` returns false. Each entry is looked up under its
    /// subtree's lock, which `f` runs without.
    pub fn each_overlap(&self, off: u64, end: u64, f: &mut dyn FnMut(&Key, u64, u64) -> bool) {
        let mut cur = off;
        while cur < end {
            let Some((sub, to)) = self.stripe(cur, end) else {
                return;
            };
            let Some(k) = self.first_overlap(sub, cur, to) else {
                cur = to;
                continue;
            };
            let (from, upto) = (k.off.max(cur), k.end().min(to));
            if !f(&k, from, upto) {
                return;
            }
            cur = upto.max(cur + 1);
        }
    }

    /// [`Trees::first_overlap`] by a caller that holds `sub`'s lock (inside
    /// [`Index::insert_under`]).
    pub(crate) fn first_overlap_held(&self, sub: usize, from: u64, to: u64) -> Option<Key> {
        // Keys are never empty, so one starting at `from` covers it.
        let same = self.hinted(sub, from);
        if same != NIL {
            return Some(self.n(same).key());
        }
        self.descend_overlap(sub, from, to, true)
    }

    /// The descent of [`Trees::first_overlap_held`]; with `hint`, a node
    /// found starting at `from` becomes its bucket's hint.
    fn descend_overlap(&self, sub: usize, from: u64, to: u64, hint: bool) -> Option<Key> {
        let mut t = self.root(sub);
        let (mut floor, mut succ) = (NIL, NIL);
        while t != NIL {
            let n = self.n(t);
            let off = n.off();
            if off == from {
                if hint {
                    self.set_hint(t);
                }
                return Some(n.key());
            }
            let (l, r) = n.links();
            // Without branches: the way down is a coin toss on random offsets.
            let before = off < from;
            floor = if before { t } else { floor };
            succ = if before { succ } else { t };
            t = if before { r } else { l };
        }
        if floor != NIL && self.n(floor).end() > from {
            return Some(self.n(floor).key());
        }
        if succ != NIL && self.n(succ).off() < to {
            return Some(self.n(succ).key());
        }
        None
    }

    /// Sets `flags` on the key starting exactly at `off` in `sub` (if any).
    /// Flags do not order keys, so the tree stays as it is.
    pub fn add_flags(&self, sub: usize, off: u64, flags: u32) {
        let _held = self.hold(sub);
        let t = match self.hinted(sub, off) {
            NIL => self.find(self.root(sub), off),
            t => t,
        };
        if t != NIL {
            self.n(t).key[1].fetch_or(pair(0, flags), Relaxed);
        }
    }

    /// Visit every key of every subtree in logical order (`f` under each
    /// subtree's lock in turn).
    pub fn for_each(&self, mut f: impl FnMut(&Key)) {
        for sub in 0..self.n_roots {
            let _held = self.hold(sub);
            self.visit_tree(self.root(sub), &mut f);
        }
    }
}

impl<M: Memory> Index<M> {
    /// `nodes` is the key slab; `roots` needs one entry per 4 MiB of backing device.
    /// `locks` too (the subtrees beyond the shortest of the two do not exist).
    /// Nobody else may use the slab and the roots yet.
    pub fn new(
        nodes: M::Shared<Node>,
        roots: M::Shared<Root>,
        locks: M::Locks,
        free: M::One<FreeList>,
        n_roots: usize,
    ) -> Self {
        let n = nodes.len().min(NIL as usize - 1);
        for (i, node) in nodes.iter().enumerate().take(n) {
            let next = if i + 1 < n { (i + 1) as u32 } else { NIL };
            node.links.store(pair(next, NIL), Relaxed);
            node.prio.store(prio_of(i as u32), Relaxed);
            node.key[0].store(NO_OFF, Relaxed);
            node.hint.store(NIL, Relaxed);
        }
        for r in roots.iter() {
            r.0.store(NIL, Relaxed);
        }
        let n_roots = n_roots.min(roots.len()).min(locks.len());
        let index: Self = Index {
            trees: Trees {
                nodes,
                roots,
                locks,
                n_roots,
                sink: Node::default(),
            },
            free,
        };
        let free: &FreeList = &index.free;
        free.top
            .store(if n > 0 { 0 } else { u64::from(NIL) }, Relaxed);
        free.n_free.store(n as u32, Relaxed);
        index
    }

    /// The subtrees, for reads outside the engine.
    pub fn trees(&self) -> Trees<M> {
        self.trees.clone()
    }

    pub fn free_nodes(&self) -> u32 {
        self.free.n_free.load(Relaxed)
    }

    /// Fewer than an eighth of the key slab is free: clean data (read fills,
    /// writethrough copies) does not take the last keys from writes, and GC
    /// collects whatever is written back.
    pub fn key_pressure(&self) -> bool {
        (self.free_nodes() as usize) < self.capacity() / 8 + 2
    }

    /// Takes the node on top of the free list (`NIL`: none left).
    fn pop_free(&self) -> u32 {
        let mut top = self.free.top.load(Acquire);
        loop {
            let i = lo(top);
            if i == NIL {
                return NIL;
            }
            // `i` may be taken by another thread before the swap: then the
            // link read here is stale, and the swap fails on the count.
            let next = self.n(i).left();
            let new = pair(next, hi(top).wrapping_add(1));
            match self
                .free
                .top
                .compare_exchange_weak(top, new, Acquire, Acquire)
            {
                Ok(_) => {
                    self.free.n_free.fetch_sub(1, Relaxed);
                    return i;
                }
                Err(now) => top = now,
            }
        }
    }

    /// Puts a chain of nodes nobody else holds on the free list.
    fn free_chain(&self, chain: Chain) {
        if chain.head == NIL {
            return;
        }
        self.free.n_free.fetch_add(chain.count, Relaxed);
        let mut top = self.free.top.load(Relaxed);
        loop {
            self.n(chain.tail).set_left(lo(top));
            let new = pair(chain.head, hi(top).wrapping_add(1));
            match self
                .free
                .top
                .compare_exchange_weak(top, new, Release, Relaxed)
            {
                Ok(_) => return,
                Err(now) => top = now,
            }
        }
    }

    /// Adds node `i` to `chain` (nothing for an index past the slab).
    fn chain_node(&self, chain: &mut Chain, i: u32) {
        if i as usize >= self.nodes.len() {
            return;
        }
        // Out of every tree: no hint may lead to it (see `Trees::hinted`).
        self.n(i).key[0].store(NO_OFF, Relaxed);
        self.n(i).set_links(chain.head, NIL);
        if chain.tail == NIL {
            chain.tail = i;
        }
        chain.head = i;
        chain.count += 1;
    }

    /// Adds a whole subtree to `chain` (iteratively via the right spine to
    /// bound recursion).
    fn chain_tree(&self, chain: &mut Chain, mut t: u32) {
        while t != NIL && (t as usize) < self.nodes.len() {
            let (l, r) = self.n(t).links();
            self.chain_tree(chain, l);
            self.chain_node(chain, t);
            t = r;
        }
    }

    fn release_tree(&self, t: u32) {
        let mut chain = Chain::EMPTY;
        self.chain_tree(&mut chain, t);
        self.free_chain(chain);
    }

    /// Makes free node `i` a leaf holding `key`, where lookups of its start
    /// look first.
    fn take(&self, i: u32, key: &Key) -> u32 {
        let n = self.n(i);
        n.set_key(key);
        n.set_links(NIL, NIL);
        self.set_hint(i);
        i
    }

    /// Split `t` into (start < k, start >= k).
    fn split(&self, t: u32, k: u64) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        let n = self.n(t);
        let (l, r) = n.links();
        if n.off() < k {
            let (a, b) = self.split(r, k);
            n.set_links(l, a);
            (t, b)
        } else {
            let (a, b) = self.split(l, k);
            n.set_links(b, r);
            (a, t)
        }
    }

    /// Merge two treaps where every key of `a` starts before every key of `b`.
    fn merge(&self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.n(a).prio.load(Relaxed) >= self.n(b).prio.load(Relaxed) {
            let (l, r) = self.n(a).links();
            let m = self.merge(r, b);
            self.n(a).set_links(l, m);
            a
        } else {
            let (l, r) = self.n(b).links();
            let m = self.merge(a, l);
            self.n(b).set_links(m, r);
            b
        }
    }

    /// Insert `key` into its subtree, trimming, splitting or dropping the keys it
    /// overlaps so that keys never intersect. The key must not cross a subtree
    /// boundary. Needs a free node for the key, and a second when it splits a
    /// key that contains it, taken before anything changes, and none when it
    /// replaces a key of exactly its range;
    /// `on_drop` sees every key (or piece) the new key replaces, under the
    /// subtree's lock.
    pub fn insert(&self, key: Key, on_drop: impl FnMut(&Key)) -> Result<(), IndexFull> {
        self.insert_under(key, on_drop, |insert| insert())?
    }

    /// [`Index::insert`] as part of `f`, which runs under the key's subtree
    /// lock and inserts when (and if) it calls `insert`: whatever else `f` does
    /// happens in the same order as the inserts into the subtree (a commit
    /// appends the key to its kset, see [`super::key_log::commit_key`]).
    /// `Err` when the key does not fit one subtree of the index, and `f` did
    /// not run.
    pub(crate) fn insert_under<R>(
        &self,
        key: Key,
        mut on_drop: impl FnMut(&Key),
        f: impl FnOnce(&mut dyn FnMut() -> Result<(), IndexFull>) -> R,
    ) -> Result<R, IndexFull> {
        let sub = self.subtree_of(key.off).ok_or(IndexFull)?;
        if key.len == 0 || self.subtree_of(key.end() - 1) != Some(sub) {
            return Err(IndexFull);
        }
        let _held = self.hold(sub);
        let mut done = false;
        Ok(f(&mut || {
            // Once: a second insert of the same key would drop the first.
            if core::mem::replace(&mut done, true) {
                return Err(IndexFull);
            }
            self.insert_held(sub, &key, &mut on_drop)
        }))
    }

    /// [`Index::insert`] with the subtree's lock held.
    fn insert_held(
        &self,
        sub: usize,
        key: &Key,
        on_drop: &mut impl FnMut(&Key),
    ) -> Result<(), IndexFull> {
        let key = *key;
        let (s, e) = (key.off, key.end());
        let root = self.root(sub);
        // Rewriting exactly the range of one cached key (the common case of
        // block-sized overwrites): replace it in place, no split or merge,
        // and, when the hint holds, no descent either.
        let (same, before) = match self.hinted(sub, s) {
            NIL => {
                let found = self.find_or_before(root, s);
                if found.0 != NIL {
                    self.set_hint(found.0);
                }
                found
            }
            same => (same, NIL),
        };
        if same != NIL && self.n(same).end() == e {
            on_drop(&self.n(same).key());
            self.n(same).set_key(&key);
            return Ok(());
        }
        // Only a key starting before `s` and ending after `e` (keys do not
        // overlap, so none does if a key starts at `s`) leaves a tail that needs
        // a node of its own. The free list is shared by every CPU: a node not
        // taken is a compare-and-swap saved, and another to give it back.
        let splits = before != NIL && self.n(before).end() > e;
        let node = self.pop_free();
        if node == NIL {
            return Err(IndexFull);
        }
        let mut spare = None;
        if splits {
            let t = self.pop_free();
            if t == NIL {
                let mut back = Chain::EMPTY;
                self.chain_node(&mut back, node);
                self.free_chain(back);
                return Err(IndexFull);
            }
            spare = Some(t);
        }
        let (a, b) = self.split(root, s);
        let (m, mut c) = self.split(b, e);

        // The key starting before `s` may reach into the new key, or contain it.
        let last = self.rightmost(a);
        if last != NIL {
            let mut old = self.n(last).key();
            if old.end() > s {
                let mut dropped = old;
                dropped.cut_front((s - old.off) as u32);
                if old.end() > e {
                    dropped.keep_front((e - s) as u32);
                    let mut tail = old;
                    tail.cut_front((e - old.off) as u32);
                    if let Some(t) = spare.take() {
                        c = self.merge(self.take(t, &tail), c);
                    }
                }
                on_drop(&dropped);
                old.keep_front((s - old.off) as u32);
                self.n(last).set_key(&old);
            }
        }

        // Keys starting inside the new key are covered, except the last one may
        // stick out past its end.
        let mut m = m;
        let mlast = self.rightmost(m);
        if mlast != NIL {
            let mut old = self.n(mlast).key();
            if old.end() > e {
                let (rest, one) = self.split(m, old.off);
                m = rest;
                let mut dropped = old;
                dropped.keep_front((e - old.off) as u32);
                on_drop(&dropped);
                old.cut_front((e - old.off) as u32);
                self.n(one).set_key(&old);
                self.set_hint(one);
                c = self.merge(one, c);
            }
        }
        self.visit_tree(m, on_drop);
        let mut freed = Chain::EMPTY;
        self.chain_tree(&mut freed, m);
        if let Some(t) = spare {
            self.chain_node(&mut freed, t);
        }
        self.free_chain(freed);

        let left = self.merge(a, self.take(node, &key));
        let r = self.merge(left, c);
        self.set_root(sub, r);
        Ok(())
    }

    /// Remove the key starting exactly at `off` in `sub` (if any).
    pub fn remove(&self, sub: usize, off: u64) -> Option<Key> {
        let _held = self.hold(sub);
        self.remove_held(sub, off)
    }

    /// Removes the key starting exactly at `off` in `sub` if `pred` says so,
    /// in one hold of the subtree's lock: the key looked at is the key
    /// removed, even with commits running beside (see
    /// [`super::key_log::commit_key`]).
    pub fn remove_if(&self, sub: usize, off: u64, pred: impl FnOnce(&Key) -> bool) -> Option<Key> {
        let _held = self.hold(sub);
        let k = self
            .first_overlap_held(sub, off, off.saturating_add(1))
            .filter(|k| k.off == off)?;
        if pred(&k) {
            self.remove_held(sub, off)
        } else {
            None
        }
    }

    /// Inserts placeholder `key` only where the index holds nothing of its
    /// range, in one hold of the subtree's lock (a commit beside may have
    /// filled the gap a read found). `Ok(false)`: something is there.
    pub fn insert_vacant(&self, key: Key) -> Result<bool, IndexFull> {
        let sub = self.subtree_of(key.off).ok_or(IndexFull)?;
        self.insert_under(
            key,
            |_| {},
            |insert| {
                if self.first_overlap_held(sub, key.off, key.end()).is_some() {
                    return Ok(false);
                }
                insert().map(|()| true)
            },
        )?
    }

    /// Drops every key in `from..to` (within one subtree), trimming those that
    /// stick out, in one hold of the subtree's lock.
    pub fn clear(&self, from: u64, to: u64) -> Result<(), IndexFull> {
        // A placeholder over the range resolves every overlap, then goes.
        let hole = Key {
            off: from,
            len: u32::try_from(to.saturating_sub(from)).map_err(|_| IndexFull)?,
            flags: KEY_FLAGS_EMPTY,
            ..Key::default()
        };
        self.insert_under(
            hole,
            |_| {},
            |insert| {
                insert()?;
                if let Some(sub) = self.subtree_of(from) {
                    self.remove_held(sub, from);
                }
                Ok(())
            },
        )?
    }

    /// [`Index::remove`] with the subtree's lock held.
    fn remove_held(&self, sub: usize, off: u64) -> Option<Key> {
        let root = self.root(sub);
        let (a, b) = self.split(root, off);
        let (x, c) = self.split(b, off.saturating_add(1));
        let found = if x != NIL {
            Some(self.n(x).key())
        } else {
            None
        };
        self.release_tree(x);
        let r = self.merge(a, c);
        self.set_root(sub, r);
        found
    }

    /// Number of keys in use.
    pub fn len(&self) -> usize {
        self.nodes.len().saturating_sub(self.free_nodes() as usize)
    }

    /// Nodes on the free list, counted by walking it (checks; at most one
    /// more than the slab holds, should the list loop). Only meaningful while
    /// nothing takes or frees nodes.
    pub fn free_list_len(&self) -> usize {
        let mut i = lo(self.free.top.load(Acquire));
        let mut n = 0;
        while i != NIL && n <= self.nodes.len() {
            n += 1;
            i = self.n(i).left();
        }
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the keys for which `stale` returns true, in logical order from
    /// offset `from` of subtree `sub` on, looking at no more than `budget`
    /// keys and subtrees. Returns where to go on (`None`: past the last
    /// subtree) and how many it removed. `stale` runs under the subtree's lock.
    pub fn retain_from(
        &self,
        mut sub: usize,
        mut from: u64,
        budget: usize,
        mut stale: impl FnMut(&Key) -> bool,
    ) -> (Option<(usize, u64)>, usize) {
        let mut removed = 0;
        for _ in 0..budget {
            if sub >= self.n_roots {
                return (None, removed);
            }
            let _held = self.hold(sub);
            let c = self.ceil(self.root(sub), from);
            if c == NIL {
                sub += 1;
                from = 0;
                continue;
            }
            let k = self.n(c).key();
            from = k.off.saturating_add(1);
            if stale(&k) {
                self.remove_held(sub, k.off);
                removed += 1;
            }
        }
        ((sub < self.n_roots).then_some((sub, from)), removed)
    }
}
