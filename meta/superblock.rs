//! `struct pcache_sb` at 4 KiB: magic, flags, segment count, CRC.

use super::crc32c::pcache_crc;
use super::error::{put_u32, put_u64, Le, MetaError, MetaErrorKind};
use super::layout::{Geometry, CACHE_SEGS_MAX};

pub const PCACHE_MAGIC: u64 = 0x65B0_5EFA_96C5_96EF;
/// The image was formatted on a big-endian machine (unsupported here).
pub const SB_F_BIGENDIAN: u32 = 1 << 0;

/// `struct pcache_sb` (the C struct is padded to 24 bytes; the CRC covers the pad).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Superblock {
    pub crc: u32,
    pub flags: u32,
    pub magic: u64,
    pub seg_num: u32,
    pub pad: u32,
}

pub const SB_STRUCT_SIZE: usize = 24;
const _: () = assert!(core::mem::size_of::<Superblock>() == SB_STRUCT_SIZE);
const _: () = assert!(core::mem::offset_of!(Superblock, flags) == 4);
const _: () = assert!(core::mem::offset_of!(Superblock, magic) == 8);
const _: () = assert!(core::mem::offset_of!(Superblock, seg_num) == 16);

const S: &str = "pcache_sb";

impl Superblock {
    /// A fresh superblock for a device of `dev_size` bytes (upstream `sb_init`).
    pub fn format(geo: &Geometry, dev_size: u64) -> Result<Superblock, MetaError> {
        if dev_size < geo.min_dev_size {
            return Err(MetaError::new(S, "dev_size", MetaErrorKind::OutOfRange));
        }
        let segs = geo.max_segs(dev_size).min(u64::from(CACHE_SEGS_MAX)) as u32;
        let mut sb = Superblock {
            crc: 0,
            flags: 0,
            magic: PCACHE_MAGIC,
            seg_num: segs,
            pad: 0,
        };
        let mut b = [0u8; SB_STRUCT_SIZE];
        sb.encode(&mut b);
        sb.crc = pcache_crc(&b[4..]);
        Ok(sb)
    }

    pub fn encode(&self, out: &mut [u8; SB_STRUCT_SIZE]) {
        put_u32(out, 0, self.crc);
        put_u32(out, 4, self.flags);
        put_u64(out, 8, self.magic);
        put_u32(out, 16, self.seg_num);
        put_u32(out, 20, self.pad);
    }

    /// Raw decode, no validation (used to tell "unformatted" (magic 0) apart).
    pub fn decode_raw(bytes: &[u8]) -> Result<Superblock, MetaError> {
        let r = Le::new(bytes, S);
        Ok(Superblock {
            crc: r.u32(0, "crc")?,
            flags: r.u32(4, "flags")?,
            magic: r.u64(8, "magic")?,
            seg_num: r.u32(16, "seg_num")?,
            pad: r.u32(20, "pad")?,
        })
    }

    /// Decode and validate against the geometry and the device size
    /// (`sb_validate` + the seg_num bound of `cache_dev_start`).
    pub fn parse(bytes: &[u8], geo: &Geometry, dev_size: u64) -> Result<Superblock, MetaError> {
        let sb = Self::decode_raw(bytes)?;
        if sb.magic != PCACHE_MAGIC {
            return Err(MetaError::new(S, "magic", MetaErrorKind::BadMagic));
        }
        let body = bytes.get(4..SB_STRUCT_SIZE).ok_or(MetaError::new(
            S,
            "crc",
            MetaErrorKind::Truncated,
        ))?;
        if pcache_crc(body) != sb.crc {
            return Err(MetaError::new(S, "crc", MetaErrorKind::BadCrc));
        }
        if sb.flags & SB_F_BIGENDIAN != 0 {
            return Err(MetaError::new(S, "flags", MetaErrorKind::Unsupported));
        }
        let max = geo.max_segs(dev_size);
        if sb.seg_num == 0 || u64::from(sb.seg_num) > max || sb.seg_num > CACHE_SEGS_MAX {
            return Err(MetaError::new(S, "seg_num", MetaErrorKind::OutOfRange));
        }
        Ok(sb)
    }
}
