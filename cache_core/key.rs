//! The in-memory cache key: a logical range of the backing device mapped to a
//! position in a cache segment, with the generation it was written under.

use crate::meta::kset::{KEY_FLAGS_CLEAN, KEY_FLAGS_DATA_CRC, KEY_FLAGS_EMPTY};

/// In memory only, never on the media: the data the key's CRC covers was
/// checked against it since the cache was attached. Logged data does not change
/// until its segment is reclaimed (which makes the key stale), so the check
/// holds for every later read of the key and of the pieces an overwrite leaves.
pub const KEY_FLAGS_VERIFIED: u32 = 1 << 30;

/// In memory only, never on the media: GC copied this data forward since
/// attach (see [`super::forward`]); it copies it again only from a kset that
/// is at least half dead.
pub const KEY_FLAGS_FORWARDED: u32 = 1 << 29;

/// The flags the media never holds: stripped as a key is logged, and from
/// what is read back.
pub const KEY_FLAGS_IN_MEMORY: u32 = KEY_FLAGS_VERIFIED | KEY_FLAGS_FORWARDED;

/// The id of a cache segment, below the cache's segment count.
///
/// Made only where an id is parsed from the media, by [`SegId::checked`] against
/// the superblock's `seg_num`, or by the engine from its own segment table. So
/// the segment table is indexed without a fallback: an id out of range is a bug
/// the engine asserts, not a value it silently absorbs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegId(u32);

impl SegId {
    /// `raw` as a segment id of a cache with `n_segs` segments.
    pub const fn checked(raw: u32, n_segs: u32) -> Option<SegId> {
        if raw < n_segs {
            Some(SegId(raw))
        } else {
            None
        }
    }

    /// The id as stored on the media.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The index of this segment in the engine's segment table.
    pub(crate) const fn index(self) -> usize {
        self.0 as usize
    }

    /// An id the key index stored (as [`SegId::get`]) and reads back: it was a
    /// `SegId` when it went in.
    pub(super) const fn restored(raw: u32) -> SegId {
        SegId(raw)
    }
}

impl core::fmt::Display for SegId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.0, f)
    }
}

/// A position in the cache: cache segment id and byte offset in its data area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub seg: SegId,
    pub off: u32,
}

/// `struct pcache_cache_key` without the tree links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Key {
    /// Logical byte offset on the backing device.
    pub off: u64,
    pub len: u32,
    pub flags: u32,
    pub pos: Pos,
    pub gen: u64,
    /// CRC of the data extent as originally written (the key may since have been
    /// trimmed): it covers `crc_len` bytes starting `crc_back` bytes before `pos`.
    pub crc: u32,
    pub crc_back: u32,
    pub crc_len: u32,
}

impl Key {
    /// The key's data still has to be checked against its CRC before it is read.
    pub fn unverified(&self) -> bool {
        self.has_crc() && self.flags & KEY_FLAGS_VERIFIED == 0
    }
    pub fn end(&self) -> u64 {
        self.off + u64::from(self.len)
    }
    pub fn clean(&self) -> bool {
        self.flags & KEY_FLAGS_CLEAN != 0
    }
    pub fn empty(&self) -> bool {
        self.flags & KEY_FLAGS_EMPTY != 0
    }
    /// The read-miss placeholder tagged `tag` (see `super::io::Gap::tag`).
    pub fn placeholder_of(&self, tag: u32) -> bool {
        self.empty() && self.crc == tag
    }
    /// Writeback copies this key to the backing device once it is logged.
    pub fn dirty(&self) -> bool {
        !self.clean() && !self.empty()
    }
    /// `crc` is valid (written with data CRC on, or replayed under the cache-wide flag).
    pub fn has_crc(&self) -> bool {
        self.flags & KEY_FLAGS_DATA_CRC != 0
    }
    /// Where the extent its CRC covers starts, `crc_back` bytes before `pos`
    /// (`None` if the key says it starts before its segment).
    pub fn crc_start(&self) -> Option<Pos> {
        Some(Pos {
            seg: self.pos.seg,
            off: self.pos.off.checked_sub(self.crc_back)?,
        })
    }
    /// A read of `n` bytes at logical offset `cur` is that whole extent.
    pub fn crc_exact(&self, cur: u64, n: usize) -> bool {
        self.crc_back == 0 && cur == self.off && n as u64 == u64::from(self.crc_len)
    }
    /// `cache_key_cutfront`: drop the first `n` bytes.
    pub fn cut_front(&mut self, n: u32) {
        self.off += u64::from(n);
        self.len -= n;
        self.pos.off += n;
        self.crc_back += n;
    }
    /// `cache_key_cutback`: keep the first `n` bytes.
    pub fn keep_front(&mut self, n: u32) {
        self.len = n;
    }
}
