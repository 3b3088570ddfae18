#![no_main]
//! `cargo +nightly fuzz run tool`: the bodies of `pcache-rs show`, `check --data`
//! and `dump` over arbitrary images; see `tool` in tests/host/fuzz_bodies.rs.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pcache_engine::fuzz_bodies::tool(data);
});
