//! Parsers for the table's optional arguments and for `dmsetup message`, shared by
//! the kernel target and the fuzzers. Pure functions over `&str` slices; every
//! error is a message suitable for `ti->error`.
//!
//! Table: `pcache <cache_dev> <backing_dev> [<#opt args> cache_mode writeback
//! data_crc true|false]`; the glue passes the words after `<backing_dev>`.
//! Message: `gc_percent <0-90>`.

use crate::meta::cache_info::{CACHE_MODE_WRITEBACK, GC_PERCENT_MAX};

/// Options fixed at table load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// `PCACHE_CACHE_MODE_*`; only writeback is implemented (as upstream).
    pub cache_mode: u32,
    pub data_crc: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            cache_mode: CACHE_MODE_WRITEBACK,
            data_crc: false,
        }
    }
}

/// A parsed `dmsetup message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    GcPercent(u8),
}

fn parse_u32(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 {
        return None;
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    u32::try_from(v).ok()
}

/// Parse `[<#opt args> <opt args>...]` (the words after the two devices).
pub fn parse_table_options(args: &[&str]) -> Result<CacheOptions, &'static str> {
    let mut opts = CacheOptions::default();
    let (count, rest) = match args.split_first() {
        None => return Ok(opts),
        Some((c, rest)) => (
            parse_u32(c).ok_or("Invalid number of optional arguments")?,
            rest,
        ),
    };
    if count as usize != rest.len() {
        return Err("Optional argument count does not match the arguments given");
    }
    let mut i = 0;
    while i < rest.len() {
        let name = rest.get(i).copied().unwrap_or("");
        let value = rest
            .get(i + 1)
            .copied()
            .ok_or("Missing value for optional argument")?;
        match name {
            "cache_mode" => {
                if value != "writeback" {
                    return Err("Invalid cache_mode parameter");
                }
                opts.cache_mode = CACHE_MODE_WRITEBACK;
            }
            "data_crc" => {
                opts.data_crc = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err("Invalid data_crc parameter"),
                };
            }
            _ => return Err("Unknown optional argument"),
        }
        i += 2;
    }
    Ok(opts)
}

/// Parse the words of a `dmsetup message`.
pub fn parse_message(args: &[&str]) -> Result<Message, &'static str> {
    match args {
        ["gc_percent", v] => {
            let p = parse_u32(v).ok_or("Invalid gc_percent value")?;
            if p > u32::from(GC_PERCENT_MAX) {
                return Err("gc_percent must be between 0 and 90");
            }
            Ok(Message::GcPercent(p as u8))
        }
        _ => Err("Unknown message"),
    }
}

/// Write the table's optional arguments the way `parse_table_options` reads them
/// (so `dmsetup table` output loads back; upstream prints `crc`, we print `data_crc`).
pub fn format_table_options(
    opts: &CacheOptions,
    out: &mut dyn core::fmt::Write,
) -> core::fmt::Result {
    write!(
        out,
        "4 cache_mode writeback data_crc {}",
        if opts.data_crc { "true" } else { "false" }
    )
}
