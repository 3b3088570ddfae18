//! The devices the tool hands the engine: a cache image (a pmem device, an image
//! file, or bytes in memory for tests and the fuzzer) and a backing device.
//!
//! Read-only subcommands attach through [`OverlayPmem`]: the engine's stores
//! (`Cache::start` rewrites `cache_info` on every attach) land in an in-memory
//! copy-on-write page map, never on the device. Their backing device is
//! [`NoBacking`], which has a size (it bounds the keys) and refuses all IO.
//! Only `writeback` opens both devices for writing ([`WritePmem`],
//! [`FileBacking`]).

use crate::cache_core::{Backing, IoError, Pmem};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::ToolError;

const PAGE: u64 = 4096;

/// `O_EXCL` on Linux: without `O_CREAT` it makes the open of a block device fail
/// with `EBUSY` while the kernel holds it (a live dm-pcache table, a mount), so
/// `writeback` cannot write under the module. Regular files ignore it.
const O_EXCL: i32 = 0o200;

enum Source {
    File(File),
    Bytes(Vec<u8>),
}

/// A cache device or image, read with `pread`.
pub struct Image {
    src: Source,
    size: u64,
    writable: bool,
}

fn size_of(f: &mut File) -> std::io::Result<u64> {
    // A block device reports length 0 in its metadata; seeking to the end works
    // for both block devices and files.
    f.seek(SeekFrom::End(0))
}

impl Image {
    /// Open a device or image file read-only.
    pub fn open(path: &Path) -> Result<Image, ToolError> {
        let mut f = File::open(path)
            .map_err(|e| ToolError::Io(format!("cannot open {}: {e}", path.display())))?;
        let size = size_of(&mut f)
            .map_err(|e| ToolError::Io(format!("cannot size {}: {e}", path.display())))?;
        Ok(Image {
            src: Source::File(f),
            size,
            writable: false,
        })
    }

    /// Open a device or image file for writing, exclusively (see [`O_EXCL`]).
    pub fn open_rw(path: &Path) -> Result<Image, ToolError> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_EXCL)
            .open(path)
            .map_err(|e| {
                ToolError::Io(format!(
                    "cannot open {} for writing (is it in use by a dm-pcache table?): {e}",
                    path.display()
                ))
            })?;
        let size = size_of(&mut f)
            .map_err(|e| ToolError::Io(format!("cannot size {}: {e}", path.display())))?;
        Ok(Image {
            src: Source::File(f),
            size,
            writable: true,
        })
    }

    /// An image held in memory (tests, the fuzzer).
    pub fn from_bytes(bytes: Vec<u8>) -> Image {
        Image {
            size: bytes.len() as u64,
            src: Source::Bytes(bytes),
            writable: false,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read `buf.len()` bytes at `off`; anything outside the image is an error.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let end = off.checked_add(buf.len() as u64).ok_or(IoError)?;
        if end > self.size {
            return Err(IoError);
        }
        match &self.src {
            Source::File(f) => f.read_exact_at(buf, off).map_err(|_| IoError),
            Source::Bytes(b) => {
                let s = b.get(off as usize..end as usize).ok_or(IoError)?;
                buf.copy_from_slice(s);
                Ok(())
            }
        }
    }

    /// `len` bytes at `off`, or `None` past the end of the image.
    pub fn bytes(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.read_at(off, &mut b).ok().map(|_| b)
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        match &self.src {
            Source::File(f) if self.writable => f.write_all_at(data, off).map_err(|_| IoError),
            _ => Err(IoError),
        }
    }

    fn sync(&self) -> Result<(), IoError> {
        match &self.src {
            Source::File(f) if self.writable => f.sync_data().map_err(|_| IoError),
            _ => Ok(()),
        }
    }
}

/// The image behind a copy-on-write overlay: the engine may store, the image
/// never changes.
pub struct OverlayPmem<'i> {
    img: &'i Image,
    /// The pages stored to (the engine's handle is shared, so the overlay is
    /// a cell; the tool runs one thread).
    pages: RefCell<HashMap<u64, Box<[u8; PAGE as usize]>>>,
}

impl<'i> OverlayPmem<'i> {
    pub fn new(img: &'i Image) -> Self {
        OverlayPmem {
            img,
            pages: RefCell::new(HashMap::new()),
        }
    }

    /// Pages the engine stored to (never written to the image).
    pub fn dirty_pages(&self) -> usize {
        self.pages.borrow().len()
    }
}

impl Pmem for OverlayPmem<'_> {
    fn size(&self) -> u64 {
        self.img.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let pages = self.pages.borrow();
        if pages.is_empty() {
            return self.img.read_at(off, buf);
        }
        let end = off.checked_add(buf.len() as u64).ok_or(IoError)?;
        if end > self.img.size() {
            return Err(IoError);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let a = off + done as u64;
            let in_page = (a % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let out = buf.get_mut(done..done + n).ok_or(IoError)?;
            match pages.get(&(a / PAGE)) {
                Some(p) => out.copy_from_slice(p.get(in_page..in_page + n).ok_or(IoError)?),
                None => self.img.read_at(a, out)?,
            }
            done += n;
        }
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8]) {
        let Some(end) = off.checked_add(data.len() as u64) else {
            return;
        };
        if end > self.img.size() {
            // Out of the device: the engine never does this; a store that
            // cannot land is dropped, like a store past a DAX mapping would fault.
            return;
        }
        let mut done = 0usize;
        while done < data.len() {
            let a = off + done as u64;
            let page = a / PAGE;
            let in_page = (a % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let img = self.img;
            let mut pages = self.pages.borrow_mut();
            let p = pages.entry(page).or_insert_with(|| {
                let mut b = Box::new([0u8; PAGE as usize]);
                // The last page of an odd-sized image is partly outside it.
                let len = (img.size() - page * PAGE).min(PAGE) as usize;
                if let Some(dst) = b.get_mut(..len) {
                    let _ = img.read_at(page * PAGE, dst);
                }
                b
            });
            if let (Some(dst), Some(src)) =
                (p.get_mut(in_page..in_page + n), data.get(done..done + n))
            {
                dst.copy_from_slice(src);
            }
            done += n;
        }
    }
    fn flush(&self, _off: u64, _len: u64) {}
    fn fence(&self) {}
}

/// The image, written in place (`writeback` only). A fence is an `fdatasync`,
/// so the engine's persist order (backing flush, then the dirty tail) holds on
/// the device as it does on pmem.
pub struct WritePmem<'i> {
    img: &'i Image,
    /// Stores or syncs that failed: the run must not claim success.
    pub errors: Cell<u64>,
}

impl<'i> WritePmem<'i> {
    pub fn new(img: &'i Image) -> Self {
        WritePmem {
            img,
            errors: Cell::new(0),
        }
    }
}

impl Pmem for WritePmem<'_> {
    fn size(&self) -> u64 {
        self.img.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.img.read_at(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) {
        if self.img.write_at(off, data).is_err() {
            self.errors.set(self.errors.get() + 1);
        }
    }
    fn flush(&self, _off: u64, _len: u64) {}
    fn fence(&self) {
        if self.img.sync().is_err() {
            self.errors.set(self.errors.get() + 1);
        }
    }
}

/// A backing device of a given size that refuses every IO: read-only
/// subcommands attach without one (the size only bounds the keys).
pub struct NoBacking {
    pub size: u64,
}

impl Backing for NoBacking {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, _off: u64, _buf: &mut [u8]) -> Result<(), IoError> {
        Err(IoError)
    }
    fn write(&self, _off: u64, _data: &[u8]) -> Result<(), IoError> {
        Err(IoError)
    }
    fn flush(&self) -> Result<(), IoError> {
        Err(IoError)
    }
}

/// A backing device or image file, opened for writing (`writeback`). A flush is
/// an `fdatasync`. Counts what went through it, for progress reports.
pub struct FileBacking {
    img: Image,
    pub bytes_written: Cell<u64>,
    pub flushes: Cell<u64>,
    /// Called after each flush (one per kset written back) with the totals.
    pub on_flush: Option<Box<dyn Fn(u64, u64)>>,
}

impl FileBacking {
    pub fn open_rw(path: &Path) -> Result<FileBacking, ToolError> {
        let img = Image::open_rw(path)?;
        if img.size() == 0 {
            return Err(ToolError::Io(format!(
                "backing device {} is empty",
                path.display()
            )));
        }
        Ok(FileBacking {
            img,
            bytes_written: Cell::new(0),
            flushes: Cell::new(0),
            on_flush: None,
        })
    }
}

impl Backing for FileBacking {
    fn size(&self) -> u64 {
        self.img.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.img.read_at(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        let end = off.checked_add(data.len() as u64).ok_or(IoError)?;
        if end > self.img.size() {
            return Err(IoError);
        }
        self.img.write_at(off, data)?;
        self.bytes_written
            .set(self.bytes_written.get() + data.len() as u64);
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        self.img.sync()?;
        self.flushes.set(self.flushes.get() + 1);
        if let Some(f) = &self.on_flush {
            f(self.flushes.get(), self.bytes_written.get());
        }
        Ok(())
    }
}
