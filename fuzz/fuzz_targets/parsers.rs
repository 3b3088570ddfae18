#![no_main]
//! `cargo +nightly fuzz run parsers`: see tests/host/fuzz_bodies.rs.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pcache_engine::fuzz_bodies::parsers(data);
});
