//! `pcache-rs`: inspect a dm-pcache cache device (or an image of one) offline,
//! check it like fsck, dump its keys, write its dirty data back, or explain the
//! status of a live target. The bodies are in `pcache_engine::tool`; this file
//! parses the command line, opens the devices and prints.

use clap::{Parser, Subcommand};
use pcache_engine::tool::device::{FileBacking, Image};
use pcache_engine::tool::{
    check, dump, show, status, writeback, Options, ToolError, DEFAULT_BACKING_BYTES, EXIT_CORRUPT,
    EXIT_OK, EXIT_USAGE,
};
use serde::Serialize;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Inspect a dm-pcache cache device offline (read-only unless a subcommand says).
#[derive(Parser, Debug)]
#[command(name = "pcache-rs", version)]
struct Cli {
    /// Print JSON (for scripts) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Segment size of the cache device in bytes (16 MiB on every real device;
    /// smaller only for test images).
    #[arg(long, global = true, default_value_t = 16 << 20)]
    seg_size: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Superblock, cache_info, geometry, segment usage, tails, keys and bytes cached/dirty.
    Show {
        /// The pmem device or image file.
        cache_dev: PathBuf,
        /// Backing device (only its size is used, to bound the keys; it is not opened for writing).
        #[arg(long)]
        backing: Option<PathBuf>,
    },
    /// Verify all metadata (exit 0 clean, 4 errors found, 8 operational error).
    Check {
        /// The pmem device or image file.
        cache_dev: PathBuf,
        /// Also verify the data of every key against its CRC.
        #[arg(long)]
        data: bool,
        /// Backing device (only its size is used, to bound the keys).
        #[arg(long)]
        backing: Option<PathBuf>,
    },
    /// The keys in log order, as a table or JSON.
    Dump {
        /// The pmem device or image file.
        cache_dev: PathBuf,
        /// Backing device (only its size is used, to bound the keys).
        #[arg(long)]
        backing: Option<PathBuf>,
    },
    /// Write every dirty key to the backing device (WRITES both devices).
    Writeback {
        /// The pmem device or image file (its dirty tail is updated).
        cache_dev: PathBuf,
        /// The backing device the cache belongs to.
        #[arg(long)]
        backing: PathBuf,
    },
    /// Run `dmsetup status <name>` and explain it.
    Status {
        /// The device-mapper name of a pcache target.
        name: String,
    },
}

fn backing_size(p: &Option<PathBuf>) -> Result<u64, ToolError> {
    match p {
        Some(p) => {
            let img = Image::open(p)?;
            if img.size() == 0 {
                return Err(ToolError::Io(format!(
                    "backing device {} is empty",
                    p.display()
                )));
            }
            Ok(img.size())
        }
        None => Ok(DEFAULT_BACKING_BYTES),
    }
}

fn print<T: Serialize + Display>(json: bool, r: &T) -> Result<(), ToolError> {
    if json {
        let s = serde_json::to_string_pretty(r)
            .map_err(|e| ToolError::Io(format!("cannot encode JSON: {e}")))?;
        println!("{s}");
    } else {
        print!("{r}");
    }
    Ok(())
}

fn opts(seg_size: u64, backing: &Option<PathBuf>) -> Result<Options, ToolError> {
    Options::with_seg_size(seg_size, backing_size(backing)?)
}

fn run(cli: &Cli) -> Result<i32, ToolError> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Show { cache_dev, backing } => {
            let o = opts(cli.seg_size, backing)?;
            let r = show::show(&Image::open(cache_dev)?, &o)?;
            print(json, &r)?;
            Ok(if r.attach_error.is_some() {
                EXIT_CORRUPT
            } else {
                EXIT_OK
            })
        }
        Cmd::Check {
            cache_dev,
            data,
            backing,
        } => {
            let o = opts(cli.seg_size, backing)?;
            let r = check::check(&Image::open(cache_dev)?, &o, *data)?;
            print(json, &r)?;
            Ok(if r.is_clean() { EXIT_OK } else { EXIT_CORRUPT })
        }
        Cmd::Dump { cache_dev, backing } => {
            let o = opts(cli.seg_size, backing)?;
            let r = dump::dump(&Image::open(cache_dev)?, &o)?;
            print(json, &r)?;
            Ok(EXIT_OK)
        }
        Cmd::Writeback { cache_dev, backing } => {
            let o = Options::with_seg_size(cli.seg_size, DEFAULT_BACKING_BYTES)?;
            let img = Image::open_rw(cache_dev)?;
            let mut b = FileBacking::open_rw(backing)?;
            if !json {
                let name = Path::new(backing).display().to_string();
                b.on_flush = Some(Box::new(move |flushes, bytes| {
                    eprintln!("{name}: {flushes} ksets flushed, {bytes} bytes written");
                }));
            }
            let r = writeback::writeback(&img, &mut b, &o)?;
            print(json, &r)?;
            Ok(EXIT_OK)
        }
        Cmd::Status { name } => {
            let r = status::status(name)?;
            print(json, &r)?;
            Ok(EXIT_OK)
        }
    }
}

#[derive(Serialize)]
struct JsonError {
    error: &'static str,
    message: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    let code = match run(&cli) {
        Ok(c) => c,
        Err(e) => {
            if cli.json {
                let j = JsonError {
                    error: e.kind(),
                    message: e.to_string(),
                };
                match serde_json::to_string_pretty(&j) {
                    Ok(s) => println!("{s}"),
                    Err(_) => eprintln!("pcache-rs: {e}"),
                }
            }
            eprintln!("pcache-rs: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
