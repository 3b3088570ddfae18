//! `pcache_cache_info` (two 4 KiB slots at 8 KiB) and the cache ctrl area at 16 KiB
//! holding the persisted key tail and dirty tail (`pcache_cache_pos_onmedia`, two
//! 16-byte slots each).

use super::error::{put_u32, Le, MetaError};
use super::header::{meta_crc, MetaHeader, Slotted, META_HEADER_SIZE};
use super::layout::{CACHE_CTRL_OFF, CACHE_INFO_OFF, CACHE_INFO_SIZE};

pub const CACHE_FLAGS_DATA_CRC: u32 = 1 << 0;
pub const CACHE_FLAGS_INIT_DONE: u32 = 1 << 1;
pub const CACHE_FLAGS_CACHE_MODE_SHIFT: u32 = 2;
pub const CACHE_FLAGS_CACHE_MODE_MASK: u32 = 0xF << CACHE_FLAGS_CACHE_MODE_SHIFT;
pub const CACHE_FLAGS_GC_PERCENT_SHIFT: u32 = 6;
pub const CACHE_FLAGS_GC_PERCENT_MASK: u32 = 0x7F << CACHE_FLAGS_GC_PERCENT_SHIFT;

pub const CACHE_MODE_WRITEBACK: u32 = 0;
pub const CACHE_MODE_WRITETHROUGH: u32 = 1;
pub const CACHE_MODE_WRITEAROUND: u32 = 2;
pub const CACHE_MODE_WRITEONLY: u32 = 3;

pub const GC_PERCENT_MIN: u8 = 0;
pub const GC_PERCENT_MAX: u8 = 90;
pub const GC_PERCENT_DEFAULT: u8 = 70;

/// `struct pcache_cache_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheInfo {
    pub header: MetaHeader,
    /// Physical id of the first cache segment.
    pub seg_id: u32,
    pub n_segs: u32,
    pub flags: u32,
    pub reserved: u32,
}

pub const CACHE_INFO_STRUCT_SIZE: usize = 24;
const _: () = assert!(core::mem::size_of::<CacheInfo>() == CACHE_INFO_STRUCT_SIZE);
const _: () = assert!(core::mem::offset_of!(CacheInfo, seg_id) == 8);
const _: () = assert!(core::mem::offset_of!(CacheInfo, n_segs) == 12);
const _: () = assert!(core::mem::offset_of!(CacheInfo, flags) == 16);

impl CacheInfo {
    pub fn gc_percent(&self) -> u8 {
        ((self.flags & CACHE_FLAGS_GC_PERCENT_MASK) >> CACHE_FLAGS_GC_PERCENT_SHIFT) as u8
    }
    pub fn set_gc_percent(&mut self, p: u8) {
        self.flags &= !CACHE_FLAGS_GC_PERCENT_MASK;
        self.flags |= (u32::from(p) << CACHE_FLAGS_GC_PERCENT_SHIFT) & CACHE_FLAGS_GC_PERCENT_MASK;
    }
    pub fn cache_mode(&self) -> u32 {
        (self.flags & CACHE_FLAGS_CACHE_MODE_MASK) >> CACHE_FLAGS_CACHE_MODE_SHIFT
    }
    pub fn set_cache_mode(&mut self, m: u32) {
        self.flags &= !CACHE_FLAGS_CACHE_MODE_MASK;
        self.flags |= (m << CACHE_FLAGS_CACHE_MODE_SHIFT) & CACHE_FLAGS_CACHE_MODE_MASK;
    }
    pub fn data_crc(&self) -> bool {
        self.flags & CACHE_FLAGS_DATA_CRC != 0
    }
    pub fn init_done(&self) -> bool {
        self.flags & CACHE_FLAGS_INIT_DONE != 0
    }

    /// Device offset of slot `i` (0 or 1).
    pub const fn slot_off(i: usize) -> u64 {
        CACHE_INFO_OFF + i as u64 * CACHE_INFO_SIZE
    }
}

impl Slotted for CacheInfo {
    const SIZE: usize = CACHE_INFO_STRUCT_SIZE;
    fn header(&self) -> MetaHeader {
        self.header
    }
    fn decode_raw(bytes: &[u8]) -> Result<Self, MetaError> {
        let r = Le::new(bytes, "pcache_cache_info");
        Ok(CacheInfo {
            header: MetaHeader::decode(&r)?,
            seg_id: r.u32(8, "seg_id")?,
            n_segs: r.u32(12, "n_segs")?,
            flags: r.u32(16, "flags")?,
            reserved: r.u32(20, "reserved")?,
        })
    }
    fn encode_with_crc(&self, out: &mut [u8]) {
        self.header.encode(out);
        put_u32(out, 8, self.seg_id);
        put_u32(out, 12, self.n_segs);
        put_u32(out, 16, self.flags);
        put_u32(out, 20, self.reserved);
        let crc = out.get(..Self::SIZE).map(meta_crc).unwrap_or(0);
        put_u32(out, 0, crc);
    }
}

/// `struct pcache_cache_pos_onmedia`: a persisted (cache segment, offset) position.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachePosOnmedia {
    pub header: MetaHeader,
    pub cache_seg_id: u32,
    pub seg_off: u32,
}

pub const CACHE_POS_STRUCT_SIZE: usize = 16;
const _: () = assert!(core::mem::size_of::<CachePosOnmedia>() == CACHE_POS_STRUCT_SIZE);
const _: () = assert!(core::mem::offset_of!(CachePosOnmedia, cache_seg_id) == META_HEADER_SIZE);
const _: () = assert!(core::mem::offset_of!(CachePosOnmedia, seg_off) == 12);

impl Slotted for CachePosOnmedia {
    const SIZE: usize = CACHE_POS_STRUCT_SIZE;
    fn header(&self) -> MetaHeader {
        self.header
    }
    fn decode_raw(bytes: &[u8]) -> Result<Self, MetaError> {
        let r = Le::new(bytes, "pcache_cache_pos_onmedia");
        Ok(CachePosOnmedia {
            header: MetaHeader::decode(&r)?,
            cache_seg_id: r.u32(8, "cache_seg_id")?,
            seg_off: r.u32(12, "seg_off")?,
        })
    }
    fn encode_with_crc(&self, out: &mut [u8]) {
        self.header.encode(out);
        put_u32(out, 8, self.cache_seg_id);
        put_u32(out, 12, self.seg_off);
        let crc = out.get(..Self::SIZE).map(meta_crc).unwrap_or(0);
        put_u32(out, 0, crc);
    }
}

/// Which persisted position in `struct pcache_cache_ctrl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlPos {
    /// Updated by GC.
    KeyTail,
    /// Updated by writeback.
    DirtyTail,
}

/// `struct pcache_cache_ctrl`: key_tail_pos[2] then dirty_tail_pos[2].
pub const CACHE_CTRL_STRUCT_SIZE: usize = 4 * CACHE_POS_STRUCT_SIZE;

impl CtrlPos {
    /// Device offset of slot `i` of this position (slots are 16 bytes apart).
    pub const fn slot_off(self, i: usize) -> u64 {
        let base = match self {
            CtrlPos::KeyTail => 0,
            CtrlPos::DirtyTail => 2 * CACHE_POS_STRUCT_SIZE as u64,
        };
        CACHE_CTRL_OFF + base + (i * CACHE_POS_STRUCT_SIZE) as u64
    }
    pub const fn name(self) -> &'static str {
        match self {
            CtrlPos::KeyTail => "key_tail_pos",
            CtrlPos::DirtyTail => "dirty_tail_pos",
        }
    }
}
