//! `pcache-rs writeback --backing DEV`: writes every dirty key to the backing
//! device offline, in log order, with the engine's own `Cache::writeback_all` —
//! the policy the module runs (backing flush before each dirty-tail update), so a
//! crash in the middle leaves the backing device as consistent as the module's
//! writeback would, and a second run finds nothing left to do. Afterwards the
//! backing device alone holds all the data.
//!
//! The only subcommand that writes: the backing device, and on the cache device
//! the dirty tail (and the `cache_info` sequence that every attach bumps).

use super::device::{Image, WritePmem};
use super::scan::scan;
use super::{attach, Options, PosReport, ToolError};
use crate::cache_core::{Backing, CacheError};
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, Serialize)]
pub struct WritebackReport {
    pub dirty_tail_before: PosReport,
    pub dirty_tail_after: PosReport,
    pub key_head: PosReport,
    /// Ksets whose keys were written back by this run.
    pub ksets_written_back: u64,
    pub was_clean: bool,
    pub clean: bool,
}

/// The body of `writeback`: `img` must be opened for writing
/// ([`Image::open_rw`]); `backing` receives the data.
pub fn writeback<B: Backing>(
    img: &Image,
    backing: &mut B,
    opts: &Options,
) -> Result<WritebackReport, ToolError> {
    let sc = scan(img, opts)?;
    let opts = Options {
        backing_bytes: backing.size(),
        ..*opts
    };
    let r = attach(
        &opts,
        sc.sb.seg_num,
        sc.info.data_crc(),
        || WritePmem::new(img),
        backing,
        |c| {
            let before = c.status();
            let was_clean = c.is_clean();
            let res = c.writeback_all();
            let after = c.status();
            let pmem_errors = c.pmem().errors.get();
            (before, after, was_clean, c.is_clean(), res, pmem_errors)
        },
    );
    let (before, after, was_clean, clean, res, pmem_errors) = r.map_err(|e| match e {
        CacheError::Meta(m) => ToolError::Corrupt(format!("the engine refuses the device: {m}")),
        CacheError::Invalid(s) | CacheError::NoMem(s) => {
            ToolError::Corrupt(format!("the engine refuses the device: {s}"))
        }
        other => ToolError::Io(format!("attach failed: {other}")),
    })?;
    if pmem_errors > 0 {
        return Err(ToolError::Io(format!(
            "{pmem_errors} writes or syncs of the cache device failed"
        )));
    }
    if let Err(e) = res {
        return Err(ToolError::Io(format!(
            "writeback stopped at dirty tail {}: {e} ({} ksets written back before it; run again to retry)",
            PosReport::from(after.dirty_tail),
            after.stats.ksets_written_back
        )));
    }
    Ok(WritebackReport {
        dirty_tail_before: before.dirty_tail.into(),
        dirty_tail_after: after.dirty_tail.into(),
        key_head: after.key_head.into(),
        ksets_written_back: after.stats.ksets_written_back,
        was_clean,
        clean,
    })
}

impl fmt::Display for WritebackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.was_clean {
            return writeln!(
                f,
                "already clean: dirty tail {} is at the key head, nothing to write back",
                self.dirty_tail_after
            );
        }
        writeln!(
            f,
            "wrote back {} ksets: dirty tail {} -> {} (key head {}){}",
            self.ksets_written_back,
            self.dirty_tail_before,
            self.dirty_tail_after,
            self.key_head,
            if self.clean {
                "; clean: the backing device holds all the data"
            } else {
                "; NOT clean"
            }
        )
    }
}
