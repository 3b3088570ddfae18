// SPDX-License-Identifier: GPL-2.0

//! The kernel's CRC32C (hardware-accelerated where the CPU has it), for data CRCs.

use super::bindings;

/// CRC32C of `data` continuing from `crc`, with no pre- or post-inversion, exactly as
/// upstream dm-pcache and `meta::crc32c` compute it.
pub(crate) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    // SAFETY: `data` is valid for reads of `data.len()` bytes; `crc32c` only reads them.
    unsafe { bindings::crc32c(crc, data.as_ptr().cast(), data.len()) }
}
