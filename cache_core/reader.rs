//! Reads that hit, served outside the engine.
//!
//! A [`Reader`] holds what a read hit needs and nothing of the control state: the index's subtrees (each under its own lock) and the segment map
//! (atomics). It looks each piece of a read up under its subtree's lock, pins
//! the segment of the key it found ([`Pmem::pin`]) and only then checks the
//! key's generation against the segment's: GC stores a new generation before
//! it looks at the pins to hand the segment out again (see [`SegMap::gen`]),
//! so a key that passes the check stays readable until the pin is given back,
//! whatever GC does meanwhile. A key the index replaces meanwhile is read as
//! it was when found: its data stays where it is.
//!
//! Whatever a read hit does not cover — a gap, a miss's placeholder, a stale
//! key (which the engine drops from the index) — stops the reader where it
//! is, and the caller goes on from there in the engine
//! ([`super::Cache::read_resume`]), which places the placeholders and counts.

use super::env::Pmem;
use super::index::Trees;
use super::io::{mark_verified, Hit};
use super::segment::SegMap;
use super::Memory;
use crate::meta::layout::Geometry;

/// The part of the cache a read hit needs (see the module doc), shared with
/// the engine.
pub struct Reader<M: Memory> {
    trees: Trees<M>,
    seg_map: SegMap<M>,
    geo: Geometry,
    dev_bytes: u64,
}

/// What [`Reader::hits`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Found {
    /// How many of the hits to copy ([`super::io::copy_hits`]), check
    /// ([`Reader::verified`]) and give back ([`super::io::release_hits`]).
    pub hits: usize,
    /// Where it stopped: the end of the read, or the first byte it left to
    /// the engine (or to the next call, once `hits` was full).
    pub next: u64,
}

impl<M: Memory> Reader<M> {
    pub(crate) fn new(trees: Trees<M>, seg_map: SegMap<M>, geo: Geometry, dev_bytes: u64) -> Self {
        Reader {
            trees,
            seg_map,
            geo,
            dev_bytes,
        }
    }

    /// Pins and describes, in `hits`, the cached pieces of the read of `len`
    /// bytes at `off` from `from` on, up to the first piece that is not a hit
    /// of a current key, or until `hits` is full. A read out of range finds
    /// nothing (the engine fails it). A key whose CRC is still to be checked
    /// is a hit with its check, as in the engine.
    pub fn hits<P: Pmem + ?Sized>(
        &self,
        pmem: &P,
        off: u64,
        len: usize,
        from: u64,
        hits: &mut [Hit],
    ) -> Found {
        let mut found = Found {
            hits: 0,
            next: from,
        };
        let Some(end) = off.checked_add(len as u64).filter(|&e| e <= self.dev_bytes) else {
            return found;
        };
        let mut cur = from.max(off);
        while cur < end {
            let Some(slot) = hits.get_mut(found.hits) else {
                break;
            };
            let Some((sub, to)) = self.trees.stripe(cur, end) else {
                break;
            };
            let Some(k) = self.trees.read_overlap(sub, cur, to) else {
                break;
            };
            if k.off > cur || k.empty() {
                break;
            }
            let n = to.min(k.end()) - cur;
            let at = (cur - off) as usize;
            let Ok(hit) = Hit::of_key(&self.geo, &self.seg_map, &k, cur, at, n as usize) else {
                break;
            };
            if !self.seg_map.pin_current(pmem, &k) {
                break;
            }
            *slot = hit;
            found.hits += 1;
            cur += n;
        }
        found.next = cur;
        found
    }

    /// The hits' CRC checks passed ([`super::io::copy_hits`]): marks their
    /// keys verified, as [`super::Cache::read_verified`] does.
    pub fn verified(&self, hits: &[Hit]) {
        mark_verified(&self.trees, hits);
    }
}
