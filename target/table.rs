// SPDX-License-Identifier: GPL-2.0

//! The grammar of a `pcache_rs` table line and of its messages.
//!
//! Pure functions over byte strings, using only `core`: the kernel target calls them from `ctr`
//! and `message`, and the host crate fuzzes them. No input can make them panic or allocate.
//!
//! Table line (upstream dm-pcache syntax):
//! `<cache_dev> <backing_dev> [<#opt_args> [cache_mode writeback|writethrough|writearound|writeonly] [data_crc true|false]]`
//!
//! Messages: `gc_percent <0-90>`, `data_crc true|false`, `stats reset`.

use core::ffi::CStr;
use core::fmt;

/// No valid table line has more arguments than this (two devices, a count, two option pairs).
pub const MAX_ARGS: usize = 7;
/// Most optional arguments a table line may carry.
pub const MAX_OPT_ARGS: usize = 4;
/// Highest accepted `gc_percent`.
pub const GC_PERCENT_MAX: u8 = 90;

/// How writes are cached. Upstream reserves bits for more modes; only write-back exists yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Writes complete once in pmem; written back to the backing device later.
    Writeback,
    /// A write goes into the cache and to the backing device before it completes.
    Writethrough,
    /// A write goes to the backing device and drops what the cache held of it.
    Writearound,
    /// As writeback, but reads the cache does not hold are not cached.
    Writeonly,
}

impl CacheMode {
    fn parse(s: &[u8]) -> Option<Self> {
        match s {
            b"writeback" => Some(Self::Writeback),
            b"writethrough" => Some(Self::Writethrough),
            b"writearound" => Some(Self::Writearound),
            b"writeonly" => Some(Self::Writeonly),
            _ => None,
        }
    }

    /// The table-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writeback => "writeback",
            Self::Writethrough => "writethrough",
            Self::Writearound => "writearound",
            Self::Writeonly => "writeonly",
        }
    }

    /// The mode bits of `cache_flags` (upstream's `PCACHE_CACHE_MODE_*`).
    pub fn bits(self) -> u32 {
        match self {
            Self::Writeback => crate::meta::cache_info::CACHE_MODE_WRITEBACK,
            Self::Writethrough => crate::meta::cache_info::CACHE_MODE_WRITETHROUGH,
            Self::Writearound => crate::meta::cache_info::CACHE_MODE_WRITEAROUND,
            Self::Writeonly => crate::meta::cache_info::CACHE_MODE_WRITEONLY,
        }
    }
}

/// The optional arguments of a table line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableOptions {
    /// `cache_mode`.
    pub cache_mode: CacheMode,
    /// `data_crc`: keep a CRC32C of the data of each key and check it on read.
    pub data_crc: bool,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self {
            cache_mode: CacheMode::Writeback,
            data_crc: false,
        }
    }
}

/// A parsed table line; the device paths borrow from the arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableLine<'a> {
    /// Path or `major:minor` of the pmem device.
    pub cache_dev: &'a [u8],
    /// Path or `major:minor` of the backing device.
    pub backing_dev: &'a [u8],
    /// Optional arguments, defaults filled in.
    pub options: TableOptions,
}

/// What is wrong with a table line; each has its own `ti->error` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Not two devices plus an optional-argument group.
    ArgCount,
    /// The optional-argument count is not a number, is odd, exceeds four, or does not match
    /// the number of arguments that follow.
    OptArgCount,
    /// An option name that is not known.
    UnknownOption,
    /// An option given without its value.
    MissingValue,
    /// An option given twice.
    DuplicateOption,
    /// `cache_mode` other than `writeback`, `writethrough`, `writearound` or `writeonly`.
    BadCacheMode,
    /// `data_crc` other than `true` or `false`.
    BadDataCrc,
}

impl TableError {
    /// The message for `ti->error`.
    pub fn message(self) -> &'static CStr {
        match self {
            Self::ArgCount => c"Invalid argument count",
            Self::OptArgCount => c"Invalid optional argument count",
            Self::UnknownOption => c"Unknown option",
            Self::MissingValue => c"Missing value for option",
            Self::DuplicateOption => c"Option given twice",
            Self::BadCacheMode => c"Invalid cache_mode",
            Self::BadDataCrc => c"Invalid data_crc value",
        }
    }
}

fn parse_bool(s: &[u8]) -> Option<bool> {
    match s {
        b"true" => Some(true),
        b"false" => Some(false),
        _ => None,
    }
}

/// Parses a decimal number of at most three digits, with no sign or spaces.
fn parse_small_decimal(s: &[u8]) -> Option<u16> {
    if s.is_empty() || s.len() > 3 {
        return None;
    }
    let mut v: u16 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u16::from(c - b'0');
    }
    Some(v)
}

/// Parses the arguments of a table line (everything after the target name).
pub fn parse_table<'a>(args: &[&'a [u8]]) -> Result<TableLine<'a>, TableError> {
    let (cache_dev, backing_dev, rest) = match args {
        [c, b, rest @ ..] => (*c, *b, rest),
        _ => return Err(TableError::ArgCount),
    };
    let mut options = TableOptions::default();
    let Some((count, opts)) = rest.split_first() else {
        return Ok(TableLine {
            cache_dev,
            backing_dev,
            options,
        });
    };
    let count = parse_small_decimal(count).ok_or(TableError::OptArgCount)? as usize;
    if count > MAX_OPT_ARGS || !count.is_multiple_of(2) {
        return Err(TableError::OptArgCount);
    }
    if opts.len() != count {
        // Fewer: the count promises arguments that are not there. More: trailing words that no
        // group accounts for, which upstream would silently ignore.
        return Err(if opts.len() < count {
            TableError::OptArgCount
        } else {
            TableError::ArgCount
        });
    }
    let (mut seen_mode, mut seen_crc) = (false, false);
    for pair in opts.chunks(2) {
        let (name, value) = match pair {
            [n, v] => (*n, *v),
            _ => return Err(TableError::MissingValue),
        };
        match name {
            b"cache_mode" => {
                if core::mem::replace(&mut seen_mode, true) {
                    return Err(TableError::DuplicateOption);
                }
                options.cache_mode = CacheMode::parse(value).ok_or(TableError::BadCacheMode)?;
            }
            b"data_crc" => {
                if core::mem::replace(&mut seen_crc, true) {
                    return Err(TableError::DuplicateOption);
                }
                options.data_crc = parse_bool(value).ok_or(TableError::BadDataCrc)?;
            }
            _ => return Err(TableError::UnknownOption),
        }
    }
    Ok(TableLine {
        cache_dev,
        backing_dev,
        options,
    })
}

/// Writes the table line that `dmsetup table` shows; [`parse_table`] accepts it back.
pub fn write_table(
    out: &mut impl fmt::Write,
    cache_dev: &str,
    backing_dev: &str,
    options: &TableOptions,
) -> fmt::Result {
    write!(
        out,
        "{} {} 4 cache_mode {} data_crc {}",
        cache_dev,
        backing_dev,
        options.cache_mode.as_str(),
        options.data_crc
    )
}

/// A `dmsetup message` the target understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// `gc_percent <0-90>`.
    GcPercent(u8),
    /// `data_crc true|false`.
    DataCrc(bool),
    /// `stats reset`: zero the statistics in the status line.
    StatsReset,
}

/// What is wrong with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageError {
    /// Not exactly a name and a value.
    ArgCount,
    /// A name the target does not know.
    Unknown,
    /// `gc_percent` that is not a number in 0..=90.
    BadGcPercent,
    /// `data_crc` other than `true` or `false`.
    BadDataCrc,
    /// `stats` other than `reset`.
    BadStats,
}

impl MessageError {
    /// A line for the kernel log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ArgCount => "expected <name> <value>",
            Self::Unknown => "unknown message",
            Self::BadGcPercent => "gc_percent must be a number from 0 to 90",
            Self::BadDataCrc => "data_crc must be true or false",
            Self::BadStats => "the only stats message is 'stats reset'",
        }
    }
}

/// Parses the arguments of `dmsetup message <dev> 0 ...`.
pub fn parse_message(args: &[&[u8]]) -> Result<Message, MessageError> {
    let [name, value] = args else {
        return Err(MessageError::ArgCount);
    };
    if name.eq_ignore_ascii_case(b"gc_percent") {
        let v = parse_small_decimal(value).ok_or(MessageError::BadGcPercent)?;
        if v > u16::from(GC_PERCENT_MAX) {
            return Err(MessageError::BadGcPercent);
        }
        Ok(Message::GcPercent(v as u8))
    } else if name.eq_ignore_ascii_case(b"data_crc") {
        Ok(Message::DataCrc(
            parse_bool(value).ok_or(MessageError::BadDataCrc)?,
        ))
    } else if name.eq_ignore_ascii_case(b"stats") {
        if value.eq_ignore_ascii_case(b"reset") {
            Ok(Message::StatsReset)
        } else {
            Err(MessageError::BadStats)
        }
    } else {
        Err(MessageError::Unknown)
    }
}
