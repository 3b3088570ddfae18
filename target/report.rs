// SPDX-License-Identifier: GPL-2.0

//! The lines `dmsetup status` and `dmsetup table` print.

use super::{
    status::StatusWriter,
    table::{self, TableOptions},
};
use crate::cache_core::{stats::status_stats, RequestCounts, Status, STATUS_STATS};
use core::fmt::{self, Write};

/// Upstream's status fields, in upstream's order: sb flags, segments on the device, segments
/// of the cache, used segments, gc_percent, cache_info flags, key head, dirty tail, key tail.
/// Then ours: their count and the statistics ([`STATUS_STATS`]).
pub(crate) fn write_status(
    out: &mut StatusWriter<'_>,
    seg_num: u64,
    s: &Status,
    req: &RequestCounts,
) -> fmt::Result {
    write!(
        out,
        "{:x} {} {} {} {} {:x} {}:{} {}:{} {}:{}",
        0,
        seg_num,
        s.n_segs,
        s.used_segs,
        s.gc_percent,
        s.cache_flags,
        s.key_head.seg,
        s.key_head.off,
        s.dirty_tail.seg,
        s.dirty_tail.off,
        s.key_tail.seg,
        s.key_tail.off
    )?;
    write!(out, " {}", STATUS_STATS.len())?;
    for v in status_stats(req, s) {
        write!(out, " {}", v)?;
    }
    Ok(())
}

/// The table line, with the options in effect now (a `data_crc` message changes them), in a
/// form the constructor accepts back.
pub(crate) fn write_table_line(
    out: &mut StatusWriter<'_>,
    cache_dev: &str,
    backing_dev: &str,
    options: &TableOptions,
    data_crc: bool,
) -> fmt::Result {
    let options = TableOptions {
        data_crc,
        ..*options
    };
    table::write_table(out, cache_dev, backing_dev, &options)
}
