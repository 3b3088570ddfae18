// SPDX-License-Identifier: GPL-2.0

//! The kernel's CRC32C (hardware-accelerated where the CPU has it), for data CRCs, and the
//! single-pass store-and-CRC of a data-CRC write.

use core::sync::atomic::{AtomicBool, Ordering};

use kernel::prelude::*;

use super::bindings;

/// CRC32C of `data` continuing from `crc`, with no pre- or post-inversion, exactly as
/// upstream dm-pcache and `meta::crc32c` compute it.
pub(crate) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    // SAFETY: `data` is valid for reads of `data.len()` bytes; `crc32c` only reads them.
    unsafe { bindings::crc32c(crc, data.as_ptr().cast(), data.len()) }
}

/// Whether [`copy_flushcache_crc32c`] may be used: set once at module load by [`init`], after
/// it gave the same bytes and CRC as `memcpy` and [`crc32c`] on a test pattern.
static STORE_CRC_CHECKED: AtomicBool = AtomicBool::new(false);

/// Bytes of the load-time check of [`copy_flushcache_crc32c`].
const CHECK_WORDS: usize = 64;

/// Checks the single-pass store-and-CRC against [`crc32c`] once, at module load: a CPU or
/// build where it is missing or disagrees falls back to the staged copy, with a warning when
/// it disagrees (which would be a bug here, not the user's problem).
pub(crate) fn init() {
    let mut src = [0u64; CHECK_WORDS];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in src.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let mut dst = [0u64; CHECK_WORDS];
    let bytes = CHECK_WORDS * 8;
    let seed = 0x1234_5678u32;
    let mut crc = seed;
    // SAFETY: both arrays are `bytes` long, 8-byte aligned, distinct, and live across the call.
    let done = unsafe {
        bindings::pcache_rs_memcpy_flushcache_crc32c(
            dst.as_mut_ptr().cast(),
            src.as_ptr().cast(),
            bytes,
            &mut crc,
        )
    };
    if !done {
        return;
    }
    // SAFETY: a store fence, no memory accessed: it orders the non-temporal stores above
    // before the comparison below reads `dst`.
    unsafe { bindings::pcache_rs_pmem_wmb() };
    // The same bytes in memory order, one word at a time: no byte view of `src` needed.
    let want = src.iter().fold(seed, |c, w| crc32c(c, &w.to_ne_bytes()));
    if crc == want && dst == src {
        STORE_CRC_CHECKED.store(true, Ordering::Relaxed);
    } else {
        pr_warn!(
            "pcache_rs: single-pass data CRC disagrees with crc32c ({:#x} != {:#x}); staging instead\n",
            crc,
            want
        );
    }
}

/// Stores `src` at `dst` with non-temporal stores and returns its CRC32C continuing from `crc`,
/// reading each byte of `src` once, so that what is stored is what is CRC'd even if `src`
/// changes meanwhile (a bio's page being rewritten by its owner). `None`, with nothing stored,
/// where the single pass is not available (see [`init`]) or the addresses or length are not
/// 8-byte aligned; the caller then stages.
///
/// # Safety
///
/// `dst` must be valid for writes of `src.len()` bytes and not overlap `src`.
pub(crate) unsafe fn copy_flushcache_crc32c(dst: *mut u8, src: &[u8], crc: u32) -> Option<u32> {
    if !STORE_CRC_CHECKED.load(Ordering::Relaxed) {
        return None;
    }
    let mut crc = crc;
    // SAFETY: `src` is valid for reads of its length; `dst` for writes of as many bytes (the
    // caller's contract); the helper checks alignment and touches nothing when it fails.
    let done = unsafe {
        bindings::pcache_rs_memcpy_flushcache_crc32c(
            dst.cast(),
            src.as_ptr().cast(),
            src.len(),
            &mut crc,
        )
    };
    done.then_some(crc)
}
