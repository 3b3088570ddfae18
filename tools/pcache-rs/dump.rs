//! `pcache-rs dump`: the keys of the key log in log order (key tail to key head),
//! each with its kset position and whether it is dirty, clean or stale — as a
//! table for people or JSON for scripts.

use super::device::Image;
use super::scan::{scan, walk_log, KeyState, LogKey};
use super::{Finding, Options, PosReport, ToolError};
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    pub key_tail: Option<PosReport>,
    pub dirty_tail: Option<PosReport>,
    pub key_head: Option<PosReport>,
    pub keys: Vec<LogKey>,
    /// Why the walk stopped early, if it did.
    pub findings: Vec<Finding>,
}

/// The body of `dump`.
pub fn dump(img: &Image, opts: &Options) -> Result<DumpReport, ToolError> {
    let sc = scan(img, opts)?;
    let walk = walk_log(img, &sc, opts);
    let mut findings = sc.findings.clone();
    findings.extend(walk.findings);
    Ok(DumpReport {
        key_tail: sc.key_tail_pos(),
        dirty_tail: sc.dirty_tail_pos(),
        key_head: walk.key_head,
        keys: walk.keys,
        findings,
    })
}

impl fmt::Display for DumpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = |x: Option<PosReport>| x.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
        writeln!(
            f,
            "key tail {}, dirty tail {}, key head {}: {} keys",
            p(self.key_tail),
            p(self.dirty_tail),
            p(self.key_head),
            self.keys.len()
        )?;
        writeln!(
            f,
            "{:>12} {:>3} {:>14} {:>8} {:>10} {:>12} {:>5} {:>10}  state",
            "kset", "#", "off", "len", "flags", "cache", "gen", "data_crc"
        )?;
        for k in &self.keys {
            let state = match k.state {
                KeyState::Dirty => "dirty",
                KeyState::Clean => "clean",
                KeyState::Stale => "stale",
            };
            writeln!(
                f,
                "{:>12} {:>3} {:>14} {:>8} {:>#10x} {:>12} {:>5} {:>#10x}  {state}",
                k.kset.to_string(),
                k.index,
                k.off,
                k.len,
                k.flags,
                k.cache.to_string(),
                k.gen,
                k.data_crc
            )?;
        }
        for x in &self.findings {
            writeln!(f, "{x}")?;
        }
        Ok(())
    }
}
