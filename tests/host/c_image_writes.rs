//! What `tests/images/make-c-image.sh` wrote into the C module's image
//! (`tests/images/c-pcache-1g.img.zst`): the sector pattern and the writes in
//! order. Shared by the replay test (`c_image.rs`) and the tool's writeback test
//! (`tool.rs`).

use std::collections::BTreeMap;

/// The sector the script writes: see the header of `tests/images/make-c-image.sh`.
pub fn pattern(sector: u64, gen: u8) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b[8..15].copy_from_slice(b"CIMGGEN");
    b[15] = b'0' + gen;
    for (i, x) in b.iter_mut().enumerate().skip(16) {
        *x = (sector + i as u64 + u64::from(gen)) as u8;
    }
    b
}

/// `(start sector, count, gen)` in write order.
pub const WRITES: [(u64, u64, u8); 6] = [
    (0, 512, 1),
    (204800, 256, 1),
    (1048584, 128, 1),
    (128, 64, 2),
    (1843201, 11, 1),
    (205000, 7, 2),
];

/// What each written sector should hold now (later writes win): its gen.
pub fn expected() -> BTreeMap<u64, u8> {
    let mut m = BTreeMap::new();
    for (s, n, g) in WRITES {
        for k in s..s + n {
            m.insert(k, g);
        }
    }
    m
}
