//! `pcache-rs check`: verifies every metadata slot (CRC, sequence), the segment
//! chain, both tails, the kset chain of the key log (bounds, cycles,
//! generations, the dirty tail on it) and every logged key's bounds, then
//! attaches with the engine (replay) as the last word. With `--data`, the data of
//! every live key that carries a CRC is read and checked against it.
//!
//! Like fsck and `cache_check`: exit 0 when nothing is wrong, non-zero with one
//! line per problem naming the structure, the field and where it is.

use super::device::{Image, NoBacking, OverlayPmem};
use super::scan::{scan, walk_log};
use super::{attach, Finding, Options, Severity, ToolError};
use crate::cache_core::{Key, Pmem};
use crate::meta::crc32c::PCACHE_CRC_SEED;
use serde::Serialize;
use std::fmt;

/// What `--data` looked at.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DataCheck {
    /// Live keys whose data matched their CRC.
    pub keys_ok: u64,
    pub keys_bad: u64,
    /// Live keys written without a data CRC: nothing to check them against.
    pub keys_without_crc: u64,
    pub bytes_checked: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub device_bytes: u64,
    /// Ksets and keys in the log from the key tail to the key head.
    pub ksets: u64,
    pub logged_keys: usize,
    /// Live keys after replay (None when the engine refused the device).
    pub live_keys: Option<usize>,
    pub data: Option<DataCheck>,
    pub errors: usize,
    pub warnings: usize,
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// No error found (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.errors == 0
    }
}

/// The body of `check` (a library function: the fuzzer runs it on any image).
pub fn check(img: &Image, opts: &Options, data: bool) -> Result<CheckReport, ToolError> {
    let sc = scan(img, opts)?;
    let walk = walk_log(img, &sc, opts);
    let mut findings = sc.findings.clone();
    findings.extend(walk.findings.iter().cloned());

    let geo = opts.geo;
    let mut backing = NoBacking {
        size: opts.backing_bytes,
    };
    let attached = attach(
        opts,
        sc.sb.seg_num,
        sc.info.data_crc(),
        || OverlayPmem::new(img),
        &mut backing,
        |c| {
            let live = c.status().keys;
            if !data {
                return (live, None, Vec::new());
            }
            let mut keys: Vec<Key> = Vec::new();
            c.for_each_key(|k| keys.push(*k));
            keys.sort_unstable_by_key(|k| k.off);
            let mut dc = DataCheck::default();
            let mut bad = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut extents: std::collections::HashMap<(u64, u64), Option<u32>> =
                std::collections::HashMap::new();
            for k in &keys {
                if !k.has_crc() {
                    dc.keys_without_crc += 1;
                    continue;
                }
                // The CRC covers the extent as first written; the key may have
                // been trimmed since (`crc_back`, `crc_len`).
                let phys = c.seg_phys(k.pos.seg.get());
                let loc = format!(
                    "key off {} len {} at cache {}:{}",
                    k.off, k.len, k.pos.seg, k.pos.off
                );
                let Some(start) = k.pos.off.checked_sub(k.crc_back) else {
                    bad.push(Finding::error(
                        "data",
                        "crc_back",
                        loc,
                        "the CRC extent starts before its segment".into(),
                    ));
                    dc.keys_bad += 1;
                    continue;
                };
                let addr = geo.seg_data_off(phys) + u64::from(start);
                let len = u64::from(k.crc_len);
                // The pieces an overwrite left of one extent share its CRC: read it once.
                let crc = *extents.entry((addr, len)).or_insert_with(|| {
                    let mut crc = PCACHE_CRC_SEED;
                    let mut done = 0u64;
                    while done < len {
                        let n = (len - done).min(buf.len() as u64) as usize;
                        let Some(chunk) = buf.get_mut(..n) else { break };
                        if c.pmem().read(addr + done, chunk).is_err() {
                            dc.bytes_checked += done;
                            return None;
                        }
                        crc = c.pmem().crc32c(crc, chunk);
                        done += n as u64;
                    }
                    dc.bytes_checked += done;
                    Some(crc)
                });
                let Some(crc) = crc else {
                    dc.keys_bad += 1;
                    bad.push(Finding::error(
                        "data",
                        "-",
                        format!("{loc} (device offset {addr:#x})"),
                        "the data cannot be read".into(),
                    ));
                    continue;
                };
                if crc != k.crc {
                    dc.keys_bad += 1;
                    bad.push(Finding::error(
                        "pcache_cache_key_onmedia",
                        "data_crc",
                        format!("{loc} (device offset {addr:#x}, {len} bytes)"),
                        format!(
                            "the data's CRC is {crc:#010x}, the key says {:#010x}",
                            k.crc
                        ),
                    ));
                } else {
                    dc.keys_ok += 1;
                }
            }
            if dc.keys_without_crc > 0 {
                bad.push(Finding::warning(
                    "data",
                    "-",
                    "live keys".into(),
                    format!(
                        "{} keys were written without a data CRC: their data is not checked",
                        dc.keys_without_crc
                    ),
                ));
            }
            (live, Some(dc), bad)
        },
    );
    let (live_keys, data_check) = match attached {
        Ok((live, dc, bad)) => {
            findings.extend(bad);
            (Some(live), dc)
        }
        Err(e) => {
            findings.push(Finding::from_cache_error(&e, "attach (replay)"));
            (None, None)
        }
    };
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    Ok(CheckReport {
        device_bytes: sc.device_bytes,
        ksets: walk.ksets,
        logged_keys: walk.keys.len(),
        live_keys,
        data: data_check,
        errors,
        warnings: findings.len() - errors,
        findings,
    })
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for x in &self.findings {
            writeln!(f, "{x}")?;
        }
        write!(
            f,
            "{} ksets, {} keys logged, {} live keys",
            self.ksets,
            self.logged_keys,
            self.live_keys
                .map(|k| k.to_string())
                .unwrap_or_else(|| "?".into())
        )?;
        if let Some(d) = &self.data {
            write!(
                f,
                "; data: {} keys ok, {} bad, {} without CRC ({} bytes checked)",
                d.keys_ok, d.keys_bad, d.keys_without_crc, d.bytes_checked
            )?;
        }
        writeln!(f)?;
        if self.is_clean() {
            writeln!(f, "clean: no errors, {} warnings", self.warnings)
        } else {
            writeln!(
                f,
                "{} errors, {} warnings: the cache device needs attention",
                self.errors, self.warnings
            )
        }
    }
}
