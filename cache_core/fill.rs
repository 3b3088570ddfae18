//! Caching what the backing device returned (a read miss) or took (a write
//! through, in writethrough mode), with the copy into pmem outside the engine
//! lock, as a write copies:
//!
//! 1. [`Cache::fill_start`], under the lock, reserves room for each part the
//!    cache is to hold ([`Cache::write_reserve`]; each reservation holds a
//!    reference on its segment, so GC does not take the room meanwhile);
//! 2. [`fill_copy`], without the lock, copies the data in, computes the data
//!    CRC over the same pieces and fences;
//! 3. [`Cache::fill_end`], under the lock, commits each part that is still
//!    wanted and gives the room of the others back.
//!
//! What may happen while the lock is let go, and how the end sees it:
//!
//! - A read miss: a write or a discard replaces (part of) the gap's
//!   placeholder. A part is committed only if the placeholder still covers all
//!   of it; a write that came meanwhile is newer than the backing device's data.
//! - A write through: another write to an overlapping range, or a discard,
//!   starts and contests it ([`super::through`]). The write stays in flight
//!   until the end, so that the contest is seen there, and then nothing is
//!   committed.
//!
//! Room given back stays unused until GC reclaims its segment, as when
//! upstream gives up a miss fill. A fill is best effort: a full cache, a key
//! pool under pressure or more than [`FILL_MAX`] parts leave the rest
//! uncached, and the next read misses there again.

use super::data::Source;
use super::env::Locked;
use super::env::{Backing, IoError, Pmem};
use super::io::{copy_in, Gap, Reservation};
use super::key_log::Over;
use super::mode::Mode;
use super::through::THROUGH_TAG;
use super::{Cache, Memory};
use crate::meta::kset::KEY_FLAGS_CLEAN;

/// Most parts one fill reserves: a gap's placeholder split by writes, or a
/// gap that crosses a subtree or data head segment end.
pub const FILL_MAX: usize = 8;

/// A fill between [`Cache::fill_start`] and [`Cache::fill_end`]: the room
/// reserved for it and, once [`fill_copy`] ran, the data CRC of each part.
/// Not `Copy`: `fill_end` takes it, so no fill ends twice.
#[derive(Debug)]
pub struct Fill {
    gap: Gap,
    rooms: [Option<Reservation>; FILL_MAX],
    crcs: [u32; FILL_MAX],
    /// [`fill_copy`] copied every part and fenced.
    copied: bool,
    /// [`Cache::fill_end`] has work to do: `fill_start` left the placeholder
    /// or the write in flight for it.
    open: bool,
}

impl Fill {
    fn new(gap: Gap) -> Self {
        Self {
            gap,
            rooms: [None; FILL_MAX],
            crcs: [0; FILL_MAX],
            copied: false,
            open: false,
        }
    }

    /// Whether [`Cache::fill_end`] has anything to do (a caller may skip the
    /// copy and the lock when not).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// How many parts have room.
    pub fn parts(&self) -> usize {
        self.rooms.iter().flatten().count()
    }

    /// Takes room for `off..end` in parts; false when some of it got none.
    fn reserve<P: Pmem, B: Backing, M: Memory>(
        &mut self,
        c: &Cache<P, B, M>,
        mut off: u64,
        end: u64,
        cpu: usize,
    ) -> bool {
        while off < end {
            let Some(slot) = self.rooms.iter_mut().find(|r| r.is_none()) else {
                return false;
            };
            match c.write_reserve(off, (end - off) as usize, KEY_FLAGS_CLEAN, cpu) {
                Ok(r) => {
                    off += u64::from(r.len);
                    *slot = Some(r);
                }
                Err(_) => return false,
            }
        }
        true
    }
}

/// Copies the data of `fill` from `src` (the gap's bytes at [`Gap::at`]) into
/// its room, outside the engine, and fences, so that the commit finds the
/// data durable whichever CPU it runs on. A source shorter than the gap
/// leaves the fill uncopied: its end commits nothing.
pub fn fill_copy<P: Pmem, S: Source + ?Sized>(pmem: &P, fill: &mut Fill, src: &S) {
    let gap = fill.gap;
    let copied = fill
        .rooms
        .iter()
        .zip(fill.crcs.iter_mut())
        .try_for_each(|(room, crc)| {
            if let Some(r) = room {
                let at = gap.at + (r.off - gap.off) as usize;
                *crc = copy_in(pmem, r, src, at)?;
            }
            Ok::<(), IoError>(())
        });
    pmem.fence();
    fill.copied = copied.is_ok();
}

impl<P: Pmem, B: Backing, M: Memory> Cache<P, B, M> {
    /// Starts caching the data of `gap`, which the backing device returned (a
    /// read miss) or took (a write through, [`Cache::through_start`]), through
    /// data head `cpu`: reserves room for the parts the cache is to hold (see
    /// the [module](self) comment). When there are none, the fill is over at
    /// once (its placeholder is given up, or the write is no longer in flight)
    /// and [`Fill::is_open`] is false.
    pub fn fill_start(&self, gap: &Gap, cpu: usize) -> Fill {
        let mut fill = Fill::new(*gap);
        let end = gap.off + gap.len as u64;
        if gap.tag & THROUGH_TAG != 0 {
            let wanted = self
                .in_flight
                .with(|f| f.get((gap.tag & !THROUGH_TAG) as usize))
                .is_some_and(|contested| !contested)
                && self.mode() == Mode::Writethrough
                && !self.key_pressure();
            if wanted {
                fill.reserve(self, gap.off, end, cpu);
            }
        } else if gap.tag != 0 && !self.key_pressure() {
            self.each_placeholder(gap, |c, _, k| {
                fill.reserve(c, k.off.max(gap.off), k.end().min(end), cpu)
            });
        }
        fill.open = true;
        if fill.parts() > 0 {
            return fill;
        }
        self.fill_end(fill);
        Fill::new(*gap)
    }

    /// The three steps of a fill in one go, all under the lock (callers that
    /// copy under it: the simulator's and the engine's own paths).
    pub fn fill_now<S: Source + ?Sized>(&self, gap: &Gap, src: &S, cpu: usize) {
        let mut fill = self.fill_start(gap, cpu);
        if fill.is_open() {
            fill_copy(&self.pmem, &mut fill, src);
            self.fill_end(fill);
        }
    }

    /// Ends `fill` (see [`Cache::fill_start`]): commits each part, as clean
    /// keys, that is still wanted, and gives back the room of the others; the
    /// read's placeholder is given up, or the write is no longer in flight.
    /// Nothing to do when the fill is not open.
    pub fn fill_end(&self, fill: Fill) {
        if !fill.open {
            return;
        }
        let gap = &fill.gap;
        if gap.tag & THROUGH_TAG != 0 {
            // A write through is contested by any write or discard that
            // overlapped it meanwhile. Its parts go in, or back, before its
            // slot goes, in one hold of the lock of the writes in flight: a
            // write of the range that starts later drops them (it claims its
            // slot first, see `Cache::through_start`).
            self.in_flight.with(|f| {
                let slot = (gap.tag & !THROUGH_TAG) as usize;
                let uncontested = f.get(slot).is_some_and(|contested| !contested);
                self.fill_commit(&fill, uncontested, None);
                f.release(slot);
            });
            return;
        }
        // A read's part goes in only where its placeholder still covers it,
        // checked as it goes in (writes commit outside the engine).
        self.fill_commit(&fill, true, Some(Over::Placeholder(gap.tag)));
        self.read_abandon(gap);
    }

    /// Commits each part of `fill`, as clean keys, if `wanted` and copied
    /// (over placeholder `over`), or gives back its room.
    fn fill_commit(&self, fill: &Fill, wanted: bool, over: Option<Over>) {
        for (room, crc) in fill.rooms.iter().zip(fill.crcs.iter()) {
            let Some(r) = room else { continue };
            if fill.copied && wanted {
                // Best effort: a commit that fails gives the room back, or
                // leaves it to the key it inserted (see `write_commit`).
                let _ = self.commit_over(r, *crc, false, over, &mut || {});
            } else {
                self.write_cancel(r);
            }
        }
    }
}
