//! CRC32C (Castagnoli), as the kernel's `crc32c(seed, data, len)` computes it
//! (slicing-by-8 over const-built tables).
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

// Slicing-by-8 tables: TABLES[k][i] is the CRC of byte i followed by k zero bytes.
// `i < 256` and `k < 8` index fixed-size arrays; const fns cannot use `get_mut`.
#[allow(clippy::indexing_slicing)]
const fn build_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    t[0] = build_table();
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static TABLES: [[u32; 256]; 8] = build_tables();

/// Continue a CRC32C over `data` from `seed` (kernel `crc32c()` semantics).
// Every index below is a `u8` widened to usize into a 256-entry table.
#[allow(clippy::indexing_slicing)]
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    let t = &TABLES;
    let mut crc = seed;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][lo as u8 as usize]
            ^ t[6][(lo >> 8) as u8 as usize]
            ^ t[5][(lo >> 16) as u8 as usize]
            ^ t[4][(lo >> 24) as u8 as usize]
            ^ t[3][hi as u8 as usize]
            ^ t[2][(hi >> 8) as u8 as usize]
            ^ t[1][(hi >> 16) as u8 as usize]
            ^ t[0][(hi >> 24) as u8 as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][(crc as u8 ^ b) as usize] ^ (crc >> 8);
    }
    crc
}

/// The checksum dm-pcache stores: CRC32C seeded with [`PCACHE_CRC_SEED`].
pub fn pcache_crc(data: &[u8]) -> u32 {
    crc32c(PCACHE_CRC_SEED, data)
}
