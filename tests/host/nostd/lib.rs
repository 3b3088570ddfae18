//! Compile check: the engine as a `#![no_std]` crate root, like the kernel module.
#![no_std]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "../../../meta/mod.rs"]
pub mod meta;

#[path = "../../../cache_core/mod.rs"]
pub mod cache_core;

#[allow(clippy::manual_is_multiple_of)]
#[path = "../../../target/table.rs"]
pub mod table;
