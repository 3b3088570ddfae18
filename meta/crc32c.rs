//! CRC32C (Castagnoli), as the kernel's `crc32c(seed, data, len)` computes it.
//!
//! The kernel routine is the raw reflected CRC: no initial or final inversion, the
//! seed is the running CRC. Upstream dm-pcache seeds every checksum with
//! [`PCACHE_CRC_SEED`]. The table is built at compile time, so the module needs no
//! crate and no allocation. The standard check value (`crc32c("123456789") =
//! 0xE3069283`) is `!crc32c(!0, ..)` in these terms; the host tests check it.

/// Seed of every metadata and data checksum in dm-pcache.
pub const PCACHE_CRC_SEED: u32 = 0x3B15A;

const POLY_REFLECTED: u32 = 0x82F6_3B78;

// `i < 256` indexes a 256-entry array; const fns cannot use `get_mut`.
#[allow(clippy::indexing_slicing)]
const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY_REFLECTED
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static TABLE: [u32; 256] = build_table();

/// Continue a CRC32C over `data` from `seed` (kernel `crc32c()` semantics).
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    let mut crc = seed;
    for &b in data {
        let idx = (crc as u8 ^ b) as usize;
        // A u8 index into a 256-entry table cannot be out of bounds.
        #[allow(clippy::indexing_slicing)]
        let t = TABLE[idx];
        crc = t ^ (crc >> 8);
    }
    crc
}

/// The checksum dm-pcache stores: CRC32C seeded with [`PCACHE_CRC_SEED`].
pub fn pcache_crc(data: &[u8]) -> u32 {
    crc32c(PCACHE_CRC_SEED, data)
}
