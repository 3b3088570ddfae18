//! Keys and key-sets as they sit in the key log.
//!
//! A kset (`pcache_cache_kset_onmedia`) is a 24-byte header followed by up to 128
//! 40-byte keys (`pcache_cache_key_onmedia`). The CRC covers everything after the
//! crc field. A kset with the LAST flag holds no keys: its second word is the
//! cache segment id where the log continues. Replay stops at the first position
//! that does not hold a valid kset (bad magic or CRC): that is the key head.

use super::crc32c::{crc32c, PCACHE_CRC_SEED};
use super::error::{put_u32, put_u64, Le, MetaError, MetaErrorKind};

pub const KSET_KEYS_MAX: usize = 128;
pub const KSET_MAGIC: u64 = 0x6768_94a6_4e16_4f1a;
pub const KSET_FLAGS_LAST: u64 = 1 << 0;

pub const KEY_FLAGS_EMPTY: u32 = 1 << 0;
pub const KEY_FLAGS_CLEAN: u32 = 1 << 1;
/// dm-pcache-rs extension: this key's `data_crc` is valid. Upstream defines only
/// EMPTY and CLEAN; its `cache_key_decode` copies the flags and tests only those
/// two bits, so the C module carries this one along and ignores it. Upstream's
/// own rule is cache-wide instead: while `cache_info` has `DATA_CRC`, every key
/// in the log carries a valid CRC (the C module checks each key it decodes).
/// A key has a CRC when this bit is set, or when that flag is set.
pub const KEY_FLAGS_DATA_CRC: u32 = 1 << 31;

/// `struct pcache_cache_key_onmedia`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyOnmedia {
    /// Logical byte offset on the backing device.
    pub off: u64,
    pub len: u32,
    pub flags: u32,
    pub cache_seg_id: u32,
    pub cache_seg_off: u32,
    pub seg_gen: u64,
    pub data_crc: u32,
    pub reserved: u32,
}

pub const KEY_ONMEDIA_SIZE: usize = 40;
const _: () = assert!(core::mem::size_of::<KeyOnmedia>() == KEY_ONMEDIA_SIZE);
const _: () = assert!(core::mem::offset_of!(KeyOnmedia, len) == 8);
const _: () = assert!(core::mem::offset_of!(KeyOnmedia, flags) == 12);
const _: () = assert!(core::mem::offset_of!(KeyOnmedia, cache_seg_id) == 16);
const _: () = assert!(core::mem::offset_of!(KeyOnmedia, cache_seg_off) == 20);
const _: () = assert!(core::mem::offset_of!(KeyOnmedia, seg_gen) == 24);
const _: () = assert!(core::mem::offset_of!(KeyOnmedia, data_crc) == 32);

/// `struct pcache_cache_kset_onmedia` without its flexible key array.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KsetHeader {
    pub crc: u32,
    /// `key_num`, or `next_cache_seg_id` for a LAST kset.
    pub key_num: u32,
    pub magic: u64,
    pub flags: u64,
}

pub const KSET_HEADER_SIZE: usize = 24;
const _: () = assert!(core::mem::size_of::<KsetHeader>() == KSET_HEADER_SIZE);
const _: () = assert!(core::mem::offset_of!(KsetHeader, magic) == 8);
const _: () = assert!(core::mem::offset_of!(KsetHeader, flags) == 16);
/// `PCACHE_KSET_ONMEDIA_SIZE_MAX`.
pub const KSET_ONMEDIA_SIZE_MAX: usize = KSET_HEADER_SIZE + KSET_KEYS_MAX * KEY_ONMEDIA_SIZE;
const _: () = assert!(KSET_ONMEDIA_SIZE_MAX == 5144);

/// Bytes of a kset with `key_num` keys.
pub const fn kset_size(key_num: usize) -> usize {
    KSET_HEADER_SIZE + key_num * KEY_ONMEDIA_SIZE
}

impl KeyOnmedia {
    pub fn encode(&self, out: &mut [u8]) {
        put_u64(out, 0, self.off);
        put_u32(out, 8, self.len);
        put_u32(out, 12, self.flags);
        put_u32(out, 16, self.cache_seg_id);
        put_u32(out, 20, self.cache_seg_off);
        put_u64(out, 24, self.seg_gen);
        put_u32(out, 32, self.data_crc);
        put_u32(out, 36, self.reserved);
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyOnmedia, MetaError> {
        let r = Le::new(bytes, "pcache_cache_key_onmedia");
        Ok(KeyOnmedia {
            off: r.u64(0, "off")?,
            len: r.u32(8, "len")?,
            flags: r.u32(12, "flags")?,
            cache_seg_id: r.u32(16, "cache_seg_id")?,
            cache_seg_off: r.u32(20, "cache_seg_off")?,
            seg_gen: r.u64(24, "seg_gen")?,
            data_crc: r.u32(32, "data_crc")?,
            reserved: r.u32(36, "reserved")?,
        })
    }

    /// `cache_key_decode`'s checks: a non-empty range inside the backing device and a
    /// data position inside a cache segment.
    pub fn validate(
        &self,
        dev_bytes: u64,
        n_segs: u32,
        seg_data_size: u32,
    ) -> Result<(), MetaError> {
        const K: &str = "pcache_cache_key_onmedia";
        let len = u64::from(self.len);
        if len == 0 || len > dev_bytes || self.off > dev_bytes - len {
            return Err(MetaError::new(K, "off/len", MetaErrorKind::OutOfRange));
        }
        if self.cache_seg_id >= n_segs {
            return Err(MetaError::new(K, "cache_seg_id", MetaErrorKind::OutOfRange));
        }
        if u64::from(self.cache_seg_off) + len > u64::from(seg_data_size) {
            return Err(MetaError::new(
                K,
                "cache_seg_off",
                MetaErrorKind::OutOfRange,
            ));
        }
        Ok(())
    }
}

/// What the log holds at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsetRead {
    /// No valid kset here: the end of the log.
    End,
    /// The log continues at the start of cache segment `next_cache_seg_id`.
    Last { next_cache_seg_id: u32 },
    /// A kset of `key_num` keys occupying `size` bytes.
    Keys { key_num: u32, size: u32 },
}

const KS: &str = "pcache_cache_kset_onmedia";

/// Read the kset at the start of `buf` (the bytes from the position to the end of
/// the segment's data area). `n_segs` bounds the LAST kset's next segment id.
/// Never reads outside `buf`; a structure that would run past it is an error.
pub fn kset_read(buf: &[u8], n_segs: u32) -> Result<KsetRead, MetaError> {
    kset_read_with(buf, n_segs, crc32c)
}

/// How many bytes of the kset whose header starts `hdr` [`kset_read`] looks
/// at: the whole kset, or just the header if that is all it is (no kset, a
/// LAST kset, or a key count no kset has). A caller that copies the kset out of
/// the media copies the header first and then no more than this.
pub fn kset_span(hdr: &[u8]) -> usize {
    let r = Le::new(hdr, KS);
    match (r.u32(4, "key_num"), r.u64(8, "magic"), r.u64(16, "flags")) {
        (Ok(n), Ok(KSET_MAGIC), Ok(flags))
            if flags & KSET_FLAGS_LAST == 0 && n as usize <= KSET_KEYS_MAX =>
        {
            kset_size(n as usize)
        }
        _ => KSET_HEADER_SIZE,
    }
}

/// [`kset_read`] with the CRC32C function `crc` (the kernel's, accelerated,
/// in the module).
pub fn kset_read_with(
    buf: &[u8],
    n_segs: u32,
    crc32c: impl Fn(u32, &[u8]) -> u32,
) -> Result<KsetRead, MetaError> {
    let r = Le::new(buf, KS);
    let hdr = match (
        r.u32(0, "crc"),
        r.u32(4, "key_num"),
        r.u64(8, "magic"),
        r.u64(16, "flags"),
    ) {
        (Ok(crc), Ok(key_num), Ok(magic), Ok(flags)) => KsetHeader {
            crc,
            key_num,
            magic,
            flags,
        },
        // Not even a header fits: nothing can be logged here.
        _ => return Ok(KsetRead::End),
    };
    if hdr.magic != KSET_MAGIC {
        return Ok(KsetRead::End);
    }
    if hdr.flags & KSET_FLAGS_LAST != 0 {
        let crc = buf
            .get(4..KSET_HEADER_SIZE)
            .map(|b| crc32c(PCACHE_CRC_SEED, b))
            .unwrap_or(!hdr.crc);
        if crc != hdr.crc {
            return Ok(KsetRead::End);
        }
        if hdr.key_num >= n_segs {
            return Err(MetaError::new(
                KS,
                "next_cache_seg_id",
                MetaErrorKind::OutOfRange,
            ));
        }
        return Ok(KsetRead::Last {
            next_cache_seg_id: hdr.key_num,
        });
    }
    if hdr.key_num as usize > KSET_KEYS_MAX {
        // Upstream treats this as "not a kset" (kset_onmedia_valid).
        return Ok(KsetRead::End);
    }
    let size = kset_size(hdr.key_num as usize);
    // Upstream computes the CRC over a zero-filled buffer when the kset runs past
    // the segment; do the same, then reject such a kset as an error.
    let avail = buf.len().min(size);
    let mut crc = crc32c(PCACHE_CRC_SEED, buf.get(4..avail).unwrap_or(&[]));
    let mut missing = size - avail;
    while missing > 0 {
        let n = missing.min(64);
        crc = crc32c(crc, [0u8; 64].get(..n).unwrap_or(&[]));
        missing -= n;
    }
    if crc != hdr.crc {
        return Ok(KsetRead::End);
    }
    if size > buf.len() {
        return Err(MetaError::new(KS, "key_num", MetaErrorKind::OutOfRange));
    }
    Ok(KsetRead::Keys {
        key_num: hdr.key_num,
        size: size as u32,
    })
}

/// Key `i` of a kset whose header was accepted by [`kset_read`].
pub fn kset_key(buf: &[u8], i: usize) -> Result<KeyOnmedia, MetaError> {
    let start = kset_size(i);
    match buf.get(start..start + KEY_ONMEDIA_SIZE) {
        Some(b) => KeyOnmedia::decode(b),
        None => Err(MetaError::new(KS, "data", MetaErrorKind::Truncated)),
    }
}

/// Encode a LAST kset pointing at `next_cache_seg_id` (`append_last_kset`).
pub fn encode_last_kset(next_cache_seg_id: u32, out: &mut [u8; KSET_HEADER_SIZE]) {
    put_u32(out, 4, next_cache_seg_id);
    put_u64(out, 8, KSET_MAGIC);
    put_u64(out, 16, KSET_FLAGS_LAST);
    let crc = crc32c(PCACHE_CRC_SEED, &out[4..]);
    put_u32(out, 0, crc);
}

/// Encode a kset header for `key_num` keys already encoded at `out[24..]`, computing
/// the CRC over the whole kset. Returns the kset size, or an error if `out` is short.
pub fn seal_kset(out: &mut [u8], key_num: usize) -> Result<usize, MetaError> {
    if key_num > KSET_KEYS_MAX {
        return Err(MetaError::new(KS, "key_num", MetaErrorKind::OutOfRange));
    }
    let size = kset_size(key_num);
    let body = out
        .get_mut(..size)
        .ok_or(MetaError::new(KS, "data", MetaErrorKind::Truncated))?;
    put_u32(body, 4, key_num as u32);
    put_u64(body, 8, KSET_MAGIC);
    put_u64(body, 16, 0);
    let crc = crc32c(PCACHE_CRC_SEED, body.get(4..).unwrap_or(&[]));
    put_u32(body, 0, crc);
    Ok(size)
}
