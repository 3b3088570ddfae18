//! Userspace build of the dm-pcache engine: the very same `meta/` and `cache_core/`
//! files the kernel module compiles, the table/message grammar of the target
//! (`target/table.rs`), plus the simulator that tests them.

#[path = "../../meta/mod.rs"]
pub mod meta;

#[path = "../../cache_core/mod.rs"]
pub mod cache_core;

/// The kernel target's table-line and message parser, compiled unchanged.
// Owned by the target; `count % 2` trips clippy::manual_is_multiple_of on
// newer toolchains (reported to the target owner), not an engine issue.
#[allow(clippy::manual_is_multiple_of)]
#[path = "../../target/table.rs"]
pub mod table;

pub mod c_image_writes;
pub mod fuzz_bodies;
pub mod host_mem;
pub mod sim;

/// The offline tool `pcache-rs` (`tools/pcache-rs/`): its subcommand bodies, here
/// so that the tests and the fuzzer call them; `main.rs` is the binary.
#[path = "../../tools/pcache-rs/mod.rs"]
pub mod tool;
