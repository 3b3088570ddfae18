//! Userspace build of the dm-pcache engine: the very same `meta/` and `cache_core/`
//! files the kernel module compiles, plus the simulator that tests them.

#[path = "../../meta/mod.rs"]
pub mod meta;

#[path = "../../cache_core/mod.rs"]
pub mod cache_core;

pub mod fuzz_bodies;
pub mod sim;
