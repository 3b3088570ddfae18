#![no_main]
//! `cargo +nightly fuzz run parsers`: target/table.rs (table lines, messages and the
//! write_table round trip); body in tests/host/fuzz_bodies.rs.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pcache_engine::fuzz_bodies::parsers(data);
});
