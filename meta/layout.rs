//! Where everything lives on the cache device, mirroring upstream `cache_dev.h`,
//! `cache.h` and `segment.h`.
//!
//! ```text
//! 0      4K        8K             16K          20K
//! | -    | sb      | cache_info x2 | cache_ctrl | segment 0 | segment 1 | ...
//! segment: | seg_info x2 (4K each) | seg_ctrl (gen x2) 4K | data ...           |
//! ```
//!
//! The segment size is fixed at 16 MiB by the format. [`Geometry`] carries it as a
//! value so that the simulator can run the *same* code over small segments
//! (thousands of crash images per second); the kernel always uses
//! [`Geometry::UPSTREAM`], and nothing on media records the segment size.

use super::error::{MetaError, MetaErrorKind};

pub const KB: u64 = 1024;
pub const MB: u64 = 1024 * KB;

/// Number of copies of each duplicated metadata structure.
pub const META_INDEX_MAX: usize = 2;

pub const SB_OFF: u64 = 4 * KB;
pub const SB_SIZE: u64 = 4 * KB;
pub const CACHE_INFO_OFF: u64 = SB_OFF + SB_SIZE;
/// Stride between the two cache_info slots.
pub const CACHE_INFO_SIZE: u64 = 4 * KB;
pub const CACHE_CTRL_OFF: u64 = CACHE_INFO_OFF + CACHE_INFO_SIZE * META_INDEX_MAX as u64;
pub const CACHE_CTRL_SIZE: u64 = 4 * KB;
pub const SEGMENTS_OFF: u64 = CACHE_CTRL_OFF + CACHE_CTRL_SIZE;
/// Stride between the two segment-info slots at the start of each segment.
pub const SEG_INFO_SIZE: u64 = 4 * KB;
/// Offset of `pcache_cache_seg_ctrl` inside a segment.
pub const CACHE_SEG_CTRL_OFF: u64 = SEG_INFO_SIZE * META_INDEX_MAX as u64;
pub const CACHE_SEG_CTRL_SIZE: u64 = 4 * KB;
/// Offset of the data area inside a cache segment.
pub const SEG_DATA_OFF: u64 = CACHE_SEG_CTRL_OFF + CACHE_SEG_CTRL_SIZE;

pub const CACHE_DEV_SIZE_MIN: u64 = 512 * MB;
pub const SEG_SIZE: u64 = 16 * MB;
/// At most 1 Mi segments (16 TiB of cache).
pub const CACHE_SEGS_MAX: u32 = 1024 * 1024;

/// Logical space is striped into subtrees of this size (4 MiB).
pub const SUBTREE_SIZE: u64 = 4 * MB;
pub const SUBTREE_SHIFT: u32 = 22;

const _: () = assert!(SB_OFF == 0x1000);
const _: () = assert!(CACHE_INFO_OFF == 0x2000);
const _: () = assert!(CACHE_CTRL_OFF == 0x4000);
const _: () = assert!(SEGMENTS_OFF == 0x5000);
const _: () = assert!(SEG_DATA_OFF == 0x3000);
const _: () = assert!(1u64 << SUBTREE_SHIFT == SUBTREE_SIZE);

/// Segment geometry of a cache device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per segment (16 MiB on real devices).
    pub seg_size: u64,
    /// Smallest cache device accepted.
    pub min_dev_size: u64,
}

impl Geometry {
    /// The on-media format of upstream dm-pcache.
    pub const UPSTREAM: Geometry = Geometry {
        seg_size: SEG_SIZE,
        min_dev_size: CACHE_DEV_SIZE_MIN,
    };

    /// A reduced geometry for simulation. `seg_size` must be a multiple of 4 KiB and
    /// leave room for at least two full ksets after the segment header.
    pub fn small(seg_size: u64) -> Result<Geometry, MetaError> {
        let g = Geometry {
            seg_size,
            min_dev_size: SEGMENTS_OFF + 2 * seg_size,
        };
        if !seg_size.is_multiple_of(4 * KB)
            || seg_size > SEG_SIZE
            || seg_size < SEG_DATA_OFF + 4 * super::kset::KSET_ONMEDIA_SIZE_MAX as u64
        {
            return Err(MetaError::new(
                "geometry",
                "seg_size",
                MetaErrorKind::OutOfRange,
            ));
        }
        Ok(g)
    }

    /// Bytes of data (keys and cached data) per segment.
    pub const fn seg_data_size(&self) -> u32 {
        (self.seg_size - SEG_DATA_OFF) as u32
    }

    /// Device offset of physical segment `seg_id`.
    pub const fn seg_off(&self, seg_id: u32) -> u64 {
        SEGMENTS_OFF + seg_id as u64 * self.seg_size
    }

    /// Device offset of the data area of physical segment `seg_id`.
    pub const fn seg_data_off(&self, seg_id: u32) -> u64 {
        self.seg_off(seg_id) + SEG_DATA_OFF
    }

    /// How many segments a device of `dev_size` bytes holds.
    pub fn max_segs(&self, dev_size: u64) -> u64 {
        if dev_size < SEGMENTS_OFF {
            0
        } else {
            // `checked_div`: a zero segment size (never built by this crate) gives no segments
            // rather than a division panic.
            (dev_size - SEGMENTS_OFF)
                .checked_div(self.seg_size)
                .unwrap_or(0)
        }
    }
}
