//! The key index: logical space striped into 4 MiB subtrees, each a treap of
//! non-overlapping keys, with all nodes taken from one preallocated slab.
//!
//! Inserting resolves overlaps (`cache_key_insert` with fixup): keys the new key
//! covers are freed, keys overlapping its head or tail are trimmed, a key that
//! contains it is split in two. Nodes are `u32` indices into the slab; the free
//! list threads through `left`. A treap (priority = hash of the slot) keeps
//! split/merge simple and the expected depth logarithmic; recursion depth is the
//! tree depth. Every slab access goes through `get`, so a corrupted link can only
//! misbehave, never index out of bounds.

use super::key::Key;
use super::memory::Memory;
use crate::meta::layout::SUBTREE_SHIFT;

const NIL: u32 = u32::MAX;

/// A slab slot. Create with `Node::default()`.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    key: Key,
    left: u32,
    right: u32,
    prio: u32,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            key: Key::default(),
            left: NIL,
            right: NIL,
            prio: 0,
        }
    }
}

/// The slab has no free node for an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexFull;

/// The whole index over the preallocated slab and subtree roots.
pub struct Index<M: Memory> {
    nodes: M::Buf<Node>,
    roots: M::Buf<u32>,
    /// Subtrees in use (the device's 4 MiB stripes; `roots` may be longer).
    n_roots: usize,
    free: u32,
    n_free: u32,
    sink: Node,
}

fn prio_of(i: u32) -> u32 {
    let mut x = i.wrapping_mul(0x9E37_79B9) ^ 0x5bd1_e995;
    x ^= x >> 15;
    x = x.wrapping_mul(0x2c1b_3c6d);
    x ^= x >> 12;
    x
}

impl<M: Memory> Index<M> {
    /// `nodes` is the key slab; `roots` needs one entry per 4 MiB of backing device.
    pub fn new(mut nodes: M::Buf<Node>, mut roots: M::Buf<u32>, n_roots: usize) -> Self {
        let n = nodes.len().min(NIL as usize - 1);
        for (i, node) in nodes.iter_mut().enumerate().take(n) {
            node.left = if i + 1 < n { (i + 1) as u32 } else { NIL };
            node.right = NIL;
            node.prio = prio_of(i as u32);
        }
        for r in roots.iter_mut() {
            *r = NIL;
        }
        let n_roots = n_roots.min(roots.len());
        Index {
            nodes,
            roots,
            n_roots,
            free: if n > 0 { 0 } else { NIL },
            n_free: n as u32,
            sink: Node::default(),
        }
    }

    pub fn n_subtrees(&self) -> usize {
        self.n_roots
    }

    pub fn free_nodes(&self) -> u32 {
        self.n_free
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

    fn n(&self, i: u32) -> &Node {
        self.nodes.get(i as usize).unwrap_or(&self.sink)
    }

    fn nm(&mut self, i: u32) -> &mut Node {
        let Index { nodes, sink, .. } = self;
        nodes.get_mut(i as usize).unwrap_or(sink)
    }

    fn root(&self, sub: usize) -> u32 {
        self.roots.get(sub).copied().unwrap_or(NIL)
    }

    fn set_root(&mut self, sub: usize, r: u32) {
        if let Some(slot) = self.roots.get_mut(sub).filter(|_| sub < self.n_roots) {
            *slot = r;
        }
    }

    fn alloc(&mut self, key: Key) -> u32 {
        let i = self.free;
        if i == NIL {
            return NIL;
        }
        self.free = self.n(i).left;
        self.n_free -= 1;
        let prio = prio_of(i);
        *self.nm(i) = Node {
            key,
            left: NIL,
            right: NIL,
            prio,
        };
        i
    }

    fn release(&mut self, i: u32) {
        if i == NIL || i as usize >= self.nodes.len() {
            return;
        }
        let free = self.free;
        let n = self.nm(i);
        n.left = free;
        n.right = NIL;
        self.free = i;
        self.n_free += 1;
    }

    /// Free a whole subtree (iteratively via the right spine to bound recursion).
    fn release_tree(&mut self, mut t: u32) {
        while t != NIL {
            let l = self.n(t).left;
            let r = self.n(t).right;
            self.release_tree(l);
            self.release(t);
            t = r;
        }
    }

    /// Split `t` into (start < k, start >= k).
    fn split(&mut self, t: u32, k: u64) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.n(t).key.off < k {
            let r = self.n(t).right;
            let (a, b) = self.split(r, k);
            self.nm(t).right = a;
            (t, b)
        } else {
            let l = self.n(t).left;
            let (a, b) = self.split(l, k);
            self.nm(t).left = b;
            (a, t)
        }
    }

    /// Merge two treaps where every key of `a` starts before every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.n(a).prio >= self.n(b).prio {
            let ar = self.n(a).right;
            let m = self.merge(ar, b);
            self.nm(a).right = m;
            a
        } else {
            let bl = self.n(b).left;
            let m = self.merge(a, bl);
            self.nm(b).left = m;
            b
        }
    }

    fn rightmost(&self, mut t: u32) -> u32 {
        while t != NIL && self.n(t).right != NIL {
            t = self.n(t).right;
        }
        t
    }

    /// Node starting exactly at `x`.
    fn find(&self, mut t: u32, x: u64) -> u32 {
        while t != NIL {
            let n = self.n(t);
            if n.key.off == x {
                return t;
            }
            t = if n.key.off < x { n.right } else { n.left };
        }
        NIL
    }

    /// Node with the smallest start >= `x`.
    fn ceil(&self, mut t: u32, x: u64) -> u32 {
        let mut best = NIL;
        while t != NIL {
            let n = self.n(t);
            if n.key.off >= x {
                best = t;
                t = n.left;
            } else {
                t = n.right;
            }
        }
        best
    }

    /// Insert `key` into its subtree, trimming, splitting or dropping the keys it
    /// overlaps so that keys never intersect. The key must not cross a subtree
    /// boundary. Needs two free nodes (one for the key, one for a split), checked
    /// before anything changes; `on_drop` sees every key (or piece) the new key
    /// replaces.
    pub fn insert(&mut self, key: Key, mut on_drop: impl FnMut(&Key)) -> Result<(), IndexFull> {
        let sub = self.subtree_of(key.off).ok_or(IndexFull)?;
        if key.len == 0 || self.subtree_of(key.end() - 1) != Some(sub) || self.n_free < 2 {
            return Err(IndexFull);
        }
        let (s, e) = (key.off, key.end());
        let root = self.root(sub);
        // Rewriting exactly the range of one cached key (the common case of
        // block-sized overwrites): replace it in place, no split or merge.
        let same = self.find(root, s);
        if same != NIL && self.n(same).key.end() == e {
            let old = self.n(same).key;
            on_drop(&old);
            self.nm(same).key = key;
            return Ok(());
        }
        let (a, b) = self.split(root, s);
        let (m, mut c) = self.split(b, e);

        // The key starting before `s` may reach into the new key, or contain it.
        let last = self.rightmost(a);
        if last != NIL {
            let old = self.n(last).key;
            if old.end() > s {
                let mut dropped = old;
                dropped.cut_front((s - old.off) as u32);
                if old.end() > e {
                    dropped.keep_front((e - s) as u32);
                    let mut tail = old;
                    tail.cut_front((e - old.off) as u32);
                    let t = self.alloc(tail);
                    c = self.merge(t, c);
                }
                on_drop(&dropped);
                self.nm(last).key.keep_front((s - old.off) as u32);
            }
        }

        // Keys starting inside the new key are covered, except the last one may
        // stick out past its end.
        let mut m = m;
        let mlast = self.rightmost(m);
        if mlast != NIL {
            let old = self.n(mlast).key;
            if old.end() > e {
                let (rest, one) = self.split(m, old.off);
                m = rest;
                let mut dropped = old;
                dropped.keep_front((e - old.off) as u32);
                on_drop(&dropped);
                self.nm(one).key.cut_front((e - old.off) as u32);
                c = self.merge(one, c);
            }
        }
        self.visit_tree(m, &mut on_drop);
        self.release_tree(m);

        let k = self.alloc(key);
        let left = self.merge(a, k);
        let r = self.merge(left, c);
        self.set_root(sub, r);
        Ok(())
    }

    fn visit_tree(&self, mut t: u32, f: &mut impl FnMut(&Key)) {
        while t != NIL {
            let n = self.n(t);
            self.visit_tree(n.left, f);
            f(&n.key);
            t = n.right;
        }
    }

    /// The first key in `sub` that overlaps `[from, to)`, in logical order.
    ///
    /// One descent finds both the floor of `from` (the last key starting at or
    /// before it, which overlaps if it reaches past `from`) and its successor
    /// (which overlaps if it starts before `to`): the two searches take the
    /// same path.
    pub fn first_overlap(&self, sub: usize, from: u64, to: u64) -> Option<Key> {
        let mut t = self.root(sub);
        let (mut floor, mut succ) = (NIL, NIL);
        while t != NIL {
            let n = self.n(t);
            if n.key.off <= from {
                if n.key.off == from {
                    // Keys are never empty, so it covers `from`.
                    return Some(n.key);
                }
                floor = t;
                t = n.right;
            } else {
                succ = t;
                t = n.left;
            }
        }
        if floor != NIL && self.n(floor).key.end() > from {
            return Some(self.n(floor).key);
        }
        if succ != NIL && self.n(succ).key.off < to {
            return Some(self.n(succ).key);
        }
        None
    }

    /// Sets `flags` on the key starting exactly at `off` in `sub` (if any).
    /// Flags do not order keys, so the tree stays as it is.
    pub fn add_flags(&mut self, sub: usize, off: u64, flags: u32) {
        let mut t = self.root(sub);
        while t != NIL {
            let n = self.n(t);
            if n.key.off == off {
                self.nm(t).key.flags |= flags;
                return;
            }
            t = if off < n.key.off { n.left } else { n.right };
        }
    }

    /// Remove the key starting exactly at `off` in `sub` (if any).
    pub fn remove(&mut self, sub: usize, off: u64) -> Option<Key> {
        let root = self.root(sub);
        let (a, b) = self.split(root, off);
        let (x, c) = self.split(b, off.saturating_add(1));
        let found = if x != NIL { Some(self.n(x).key) } else { None };
        self.release_tree(x);
        let r = self.merge(a, c);
        self.set_root(sub, r);
        found
    }

    /// Number of keys in use.
    pub fn len(&self) -> usize {
        self.nodes.len() - self.n_free as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the keys for which `stale` returns true, in logical order from
    /// offset `from` of subtree `sub` on, looking at no more than `budget`
    /// keys and subtrees. Returns where to go on (`None`: past the last
    /// subtree) and how many it removed.
    pub fn retain_from(
        &mut self,
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
            let c = self.ceil(self.root(sub), from);
            if c == NIL {
                sub += 1;
                from = 0;
                continue;
            }
            let k = self.n(c).key;
            from = k.off.saturating_add(1);
            if stale(&k) {
                self.remove(sub, k.off);
                removed += 1;
            }
        }
        ((sub < self.n_roots).then_some((sub, from)), removed)
    }

    /// Visit every key of every subtree in logical order.
    pub fn for_each(&self, mut f: impl FnMut(&Key)) {
        for sub in 0..self.n_roots {
            self.visit_tree(self.root(sub), &mut f);
        }
    }
}
