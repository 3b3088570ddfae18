//! Per-segment metadata: `pcache_segment_info` (two 4 KiB slots at the start of the
//! segment, linking cache segments into a chain by physical id) and the
//! generation control `pcache_cache_seg_ctrl` at 8 KiB (two 16-byte
//! `pcache_cache_seg_gen` slots). The generation is bumped when a segment is
//! reclaimed, so keys still pointing at its old contents are recognised as stale.

use super::error::{put_u32, put_u64, Le, MetaError};
use super::header::{meta_crc, MetaHeader, Slotted};
use super::layout::{Geometry, CACHE_SEG_CTRL_OFF, SEG_INFO_SIZE};

pub const SEG_INFO_FLAGS_HAS_NEXT: u32 = 1 << 0;
pub const SEG_INFO_FLAGS_TYPE_SHIFT: u32 = 1;
pub const SEG_INFO_FLAGS_TYPE_MASK: u32 = 0xF << SEG_INFO_FLAGS_TYPE_SHIFT;
pub const SEGMENT_TYPE_CACHE_DATA: u32 = 1;

/// `struct pcache_segment_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    pub header: MetaHeader,
    pub flags: u32,
    pub next_seg: u32,
}

pub const SEG_INFO_STRUCT_SIZE: usize = 16;
const _: () = assert!(core::mem::size_of::<SegmentInfo>() == SEG_INFO_STRUCT_SIZE);
const _: () = assert!(core::mem::offset_of!(SegmentInfo, flags) == 8);
const _: () = assert!(core::mem::offset_of!(SegmentInfo, next_seg) == 12);

impl SegmentInfo {
    pub fn has_next(&self) -> bool {
        self.flags & SEG_INFO_FLAGS_HAS_NEXT != 0
    }
    pub fn set_type(&mut self, t: u32) {
        self.flags &= !SEG_INFO_FLAGS_TYPE_MASK;
        self.flags |= (t << SEG_INFO_FLAGS_TYPE_SHIFT) & SEG_INFO_FLAGS_TYPE_MASK;
    }
    /// Device offset of slot `i` of physical segment `seg_id`.
    pub fn slot_off(geo: &Geometry, seg_id: u32, i: usize) -> u64 {
        geo.seg_off(seg_id) + i as u64 * SEG_INFO_SIZE
    }
}

impl Slotted for SegmentInfo {
    const SIZE: usize = SEG_INFO_STRUCT_SIZE;
    fn header(&self) -> MetaHeader {
        self.header
    }
    fn decode_raw(bytes: &[u8]) -> Result<Self, MetaError> {
        let r = Le::new(bytes, "pcache_segment_info");
        Ok(SegmentInfo {
            header: MetaHeader::decode(&r)?,
            flags: r.u32(8, "flags")?,
            next_seg: r.u32(12, "next_seg")?,
        })
    }
    fn encode_with_crc(&self, out: &mut [u8]) {
        self.header.encode(out);
        put_u32(out, 8, self.flags);
        put_u32(out, 12, self.next_seg);
        let crc = out.get(..Self::SIZE).map(meta_crc).unwrap_or(0);
        put_u32(out, 0, crc);
    }
}

/// `struct pcache_cache_seg_gen`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegGen {
    pub header: MetaHeader,
    pub gen: u64,
}

pub const SEG_GEN_STRUCT_SIZE: usize = 16;
const _: () = assert!(core::mem::size_of::<SegGen>() == SEG_GEN_STRUCT_SIZE);
const _: () = assert!(core::mem::offset_of!(SegGen, gen) == 8);
/// `struct pcache_cache_seg_ctrl`: gen[2] + u64 res[64].
pub const SEG_CTRL_STRUCT_SIZE: usize = 2 * SEG_GEN_STRUCT_SIZE + 64 * 8;
const _: () = assert!(SEG_CTRL_STRUCT_SIZE == 544);

impl SegGen {
    /// Device offset of gen slot `i` of physical segment `seg_id`.
    pub fn slot_off(geo: &Geometry, seg_id: u32, i: usize) -> u64 {
        geo.seg_off(seg_id) + CACHE_SEG_CTRL_OFF + (i * SEG_GEN_STRUCT_SIZE) as u64
    }
}

impl Slotted for SegGen {
    const SIZE: usize = SEG_GEN_STRUCT_SIZE;
    fn header(&self) -> MetaHeader {
        self.header
    }
    fn decode_raw(bytes: &[u8]) -> Result<Self, MetaError> {
        let r = Le::new(bytes, "pcache_cache_seg_gen");
        Ok(SegGen {
            header: MetaHeader::decode(&r)?,
            gen: r.u64(8, "gen")?,
        })
    }
    fn encode_with_crc(&self, out: &mut [u8]) {
        self.header.encode(out);
        put_u64(out, 8, self.gen);
        let crc = out.get(..Self::SIZE).map(meta_crc).unwrap_or(0);
        put_u32(out, 0, crc);
    }
}
