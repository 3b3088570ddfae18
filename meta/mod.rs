//! The on-media format of dm-pcache, byte-compatible with upstream Linux
//! `drivers/md/dm-pcache` (7.3).
//!
//! Each structure is declared once as a `#[repr(C)]` mirror of its C twin, with its
//! size and field offsets asserted at compile time, and is read through a parser
//! that returns [`MetaError`] (naming the structure and field) instead of
//! panicking: no byte pattern can make these functions panic, loop or read out of
//! bounds. Only `core` is used, so the same files build into the kernel module.
//! All integers are little-endian on media (upstream writes host order and refuses
//! big-endian images via the superblock flag; so do we).
//!
//! Files: [`crc32c`] (table-driven checksum), [`layout`] (offsets, geometry),
//! [`header`] (meta header and the two-slot scheme), [`superblock`],
//! [`cache_info`] (cache info and the key/dirty tail positions), [`segment`]
//! (segment info and generation), [`kset`] (keys and key-sets).

pub mod cache_info;
pub mod crc32c;
pub mod error;
pub mod header;
pub mod kset;
pub mod layout;
pub mod segment;
pub mod superblock;

pub use error::{MetaError, MetaErrorKind};
