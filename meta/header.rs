//! `pcache_meta_header` and the two-slot scheme every duplicated structure uses.
//!
//! A structure is written alternately into slot 0 and slot 1 with an 8-bit `seq`
//! that grows by one per write; the newest valid slot wins, where "newer" is the
//! signed 8-bit difference (`seq_after`), so 0 is after 255.

use super::crc32c::pcache_crc;
use super::error::{put_u16, put_u32, put_u8, Le, MetaError};
use super::layout::META_INDEX_MAX;

/// `struct pcache_meta_header`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaHeader {
    pub crc: u32,
    pub seq: u8,
    pub version: u8,
    pub res: u16,
}

pub const META_HEADER_SIZE: usize = 8;
const _: () = assert!(core::mem::size_of::<MetaHeader>() == META_HEADER_SIZE);
const _: () = assert!(core::mem::offset_of!(MetaHeader, seq) == 4);
const _: () = assert!(core::mem::offset_of!(MetaHeader, version) == 5);
const _: () = assert!(core::mem::offset_of!(MetaHeader, res) == 6);

impl MetaHeader {
    pub(crate) fn decode(r: &Le<'_>) -> Result<Self, MetaError> {
        Ok(MetaHeader {
            crc: r.u32(0, "header.crc")?,
            seq: r.u8(4, "header.seq")?,
            version: r.u8(5, "header.version")?,
            res: r.u16(6, "header.res")?,
        })
    }

    pub(crate) fn encode(&self, buf: &mut [u8]) {
        put_u32(buf, 0, self.crc);
        put_u8(buf, 4, self.seq);
        put_u8(buf, 5, self.version);
        put_u16(buf, 6, self.res);
    }
}

/// Index of one of the two metadata slots (0 or 1): an index that cannot be 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotIndex(bool);

impl SlotIndex {
    pub const FIRST: SlotIndex = SlotIndex(false);
    pub const SECOND: SlotIndex = SlotIndex(true);

    /// 0 or 1.
    pub const fn get(self) -> usize {
        self.0 as usize
    }

    /// The other slot: where the next write of this structure goes.
    pub const fn other(self) -> SlotIndex {
        SlotIndex(!self.0)
    }

    pub const fn from_bool(second: bool) -> SlotIndex {
        SlotIndex(second)
    }
}

const _: () = assert!(META_INDEX_MAX == 2);

/// `pcache_meta_seq_after`: is `a` newer than `b`, with 8-bit wrap-around?
pub const fn seq_after(a: u8, b: u8) -> bool {
    (a.wrapping_sub(b) as i8) > 0
}

/// `pcache_meta_crc`: CRC over the structure bytes after the crc field.
pub fn meta_crc(bytes: &[u8]) -> u32 {
    match bytes.get(4..) {
        Some(rest) => pcache_crc(rest),
        None => 0,
    }
}

/// `pcache_meta_find_latest`: given each slot's `Some(seq)` when its CRC is valid,
/// return the newest valid slot, scanning in slot order like upstream.
pub fn find_latest(slots: [Option<u8>; 2]) -> Option<SlotIndex> {
    let mut latest: Option<(SlotIndex, u8)> = None;
    for (i, s) in slots.iter().enumerate() {
        if let Some(seq) = *s {
            let take = match latest {
                None => true,
                Some((_, l)) => seq_after(seq, l),
            };
            if take {
                latest = Some((SlotIndex::from_bool(i == 1), seq));
            }
        }
    }
    latest.map(|(i, _)| i)
}

/// A structure stored in the two-slot scheme: decode one slot's bytes and report
/// whether its CRC holds.
pub trait Slotted: Sized {
    /// Bytes covered by the CRC, starting at the header (`sizeof(struct)`).
    const SIZE: usize;
    fn header(&self) -> MetaHeader;
    fn decode_raw(bytes: &[u8]) -> Result<Self, MetaError>;
    /// Encode into exactly `SIZE` bytes, computing the crc.
    fn encode_with_crc(&self, out: &mut [u8]);
}

/// Decode a slot: `Ok(Some)` when its CRC matches, `Ok(None)` when it does not.
pub fn decode_slot<T: Slotted>(bytes: &[u8]) -> Result<Option<T>, MetaError> {
    let body = match bytes.get(..T::SIZE) {
        Some(b) => b,
        None => return Ok(None),
    };
    let v = T::decode_raw(body)?;
    if v.header().crc == meta_crc(body) {
        Ok(Some(v))
    } else {
        Ok(None)
    }
}

/// Pick the newest valid copy of `T` from the bytes of its two slots.
pub fn pick_latest<T: Slotted + Copy>(
    slot0: &[u8],
    slot1: &[u8],
) -> Result<Option<(SlotIndex, T)>, MetaError> {
    let a: Option<T> = decode_slot(slot0)?;
    let b: Option<T> = decode_slot(slot1)?;
    let idx = find_latest([a.map(|v| v.header().seq), b.map(|v| v.header().seq)]);
    Ok(match idx {
        Some(i) if i.get() == 0 => a.map(|v| (i, v)),
        Some(i) => b.map(|v| (i, v)),
        None => None,
    })
}
