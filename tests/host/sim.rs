//! The crash simulator's devices.
//!
//! [`World`] holds a pmem model and a backing-device model behind one operation
//! counter, so a crash can be taken between any two device operations the engine
//! performs. Pmem keeps two images: stores land in `volatile`; a word becomes
//! durable only when flushed and then fenced. A crash image is the durable image
//! plus a random subset of the not-yet-durable 8-byte words (torn and reordered
//! stores, as pmreorder models them). The backing device has a volatile write
//! cache: a crash keeps a random subset of the writes since the last flush.

use pcache_engine_env::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

mod pcache_engine_env {
    pub use crate::cache_core::env::{Backing, IoError, Pmem};
}

pub const SECTOR: usize = 512;

/// SplitMix64: the simulator's only source of randomness, so a seed replays a run.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

const W_CLEAN: u8 = 0;
const W_DIRTY: u8 = 1;
const W_FLUSHED: u8 = 2;

/// Persistent memory with a volatile and a durable image.
pub struct PmemModel {
    pub volatile: Vec<u8>,
    pub durable: Vec<u8>,
    state: Vec<u8>,
    pending: Vec<u32>,
    flushed: Vec<u32>,
}

impl PmemModel {
    pub fn new(image: Vec<u8>) -> Self {
        let words = image.len() / 8;
        PmemModel {
            durable: image.clone(),
            volatile: image,
            state: vec![W_CLEAN; words],
            pending: Vec::new(),
            flushed: Vec::new(),
        }
    }

    /// A pmem that never crashes again (replay checks): stores are not tracked.
    pub fn untracked(image: Vec<u8>) -> Self {
        PmemModel {
            volatile: image,
            durable: Vec::new(),
            state: Vec::new(),
            pending: Vec::new(),
            flushed: Vec::new(),
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let off = off as usize;
        self.volatile[off..off + data.len()].copy_from_slice(data);
        if data.is_empty() || self.state.is_empty() {
            return;
        }
        for w in off / 8..=(off + data.len() - 1) / 8 {
            match self.state[w] {
                W_CLEAN => {
                    self.state[w] = W_DIRTY;
                    self.pending.push(w as u32);
                }
                _ => self.state[w] = W_DIRTY,
            }
        }
    }

    fn flush(&mut self, off: u64, len: u64) {
        if len == 0 || self.state.is_empty() {
            return;
        }
        // Cache-line granularity, like clwb.
        let start = (off as usize / 64) * 8;
        let end = (((off + len) as usize).div_ceil(64) * 8).min(self.state.len());
        for w in start..end {
            if self.state[w] == W_DIRTY {
                self.state[w] = W_FLUSHED;
                self.flushed.push(w as u32);
            }
        }
    }

    fn fence(&mut self) {
        for &w in &self.flushed {
            let w = w as usize;
            if self.state[w] == W_FLUSHED {
                self.durable[w * 8..w * 8 + 8].copy_from_slice(&self.volatile[w * 8..w * 8 + 8]);
                self.state[w] = W_CLEAN;
            }
        }
        self.flushed.clear();
        if self.pending.len() > 4096 {
            let state = &self.state;
            self.pending.retain(|&w| state[w as usize] != W_CLEAN);
        }
    }

    /// The image after a power cut now: durable plus some of the pending words.
    pub fn crash_image(&self, rng: &mut Rng) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mode = rng.below(4);
        for &w in &self.pending {
            let w = w as usize;
            if self.state[w] == W_CLEAN {
                continue;
            }
            let keep = match mode {
                0 => false,
                1 => true,
                _ => rng.chance(1, 2),
            };
            if keep {
                img[w * 8..w * 8 + 8].copy_from_slice(&self.volatile[w * 8..w * 8 + 8]);
            }
        }
        img
    }
}

/// Sectors are shared between images (crash images clone the map, not the data);
/// `Arc`, so that a [`World`] can be shared by threads (`threads.rs`).
pub type Sector = Arc<[u8; SECTOR]>;

/// A block device with a volatile write cache, stored sparsely by sector.
#[derive(Clone)]
pub struct BackingModel {
    pub size: u64,
    pub durable: HashMap<u64, Sector>,
    pub cache: Vec<(u64, Sector)>,
    pub cached: HashMap<u64, Sector>,
}

impl BackingModel {
    pub fn new(size: u64, durable: HashMap<u64, Sector>) -> Self {
        BackingModel {
            size,
            durable,
            cache: Vec::new(),
            cached: HashMap::new(),
        }
    }

    pub fn read_sector(&self, s: u64) -> [u8; SECTOR] {
        if let Some(d) = self.cached.get(&s) {
            return **d;
        }
        match self.durable.get(&s) {
            Some(d) => **d,
            None => [0u8; SECTOR],
        }
    }

    pub fn flush(&mut self) {
        for (s, d) in self.cache.drain(..) {
            self.durable.insert(s, d);
        }
        self.cached.clear();
    }

    pub fn crash_image(&self, rng: &mut Rng) -> HashMap<u64, Sector> {
        let mut img = self.durable.clone();
        for (s, d) in &self.cache {
            if rng.chance(1, 2) {
                img.insert(*s, d.clone());
            }
        }
        img
    }
}

/// A crash taken between two device operations.
pub struct CrashImage {
    pub at_op: u64,
    pub pmem: Vec<u8>,
    pub backing: HashMap<u64, Sector>,
}

/// Both devices behind one operation counter.
pub struct World {
    pub pmem: PmemModel,
    pub backing: BackingModel,
    pub ops: u64,
    /// Take a crash image with this probability (per million) at each operation.
    pub crash_ppm: u64,
    /// Take no more crash images than this.
    pub crash_limit: usize,
    pub rng: Rng,
    pub crashes: Vec<CrashImage>,
    /// When set, every backing-device IO fails (error-path testing).
    pub backing_fails: bool,
    /// Reads' pins per cache segment (see `Pmem::pin`).
    pub pins: std::collections::BTreeMap<u32, u32>,
    /// Backing-device flushes that succeeded (a writeback step ends with one).
    pub backing_flushes: u64,
    /// CRCs the engine had the pmem compute (`Pmem::crc32c`: a kset read
    /// back is checked with one).
    pub pmem_crcs: u64,
}

impl World {
    pub fn new(pmem: Vec<u8>, backing: BackingModel, seed: u64) -> Rc<RefCell<World>> {
        Rc::new(RefCell::new(World::tracked(pmem, backing, seed)))
    }

    /// A world whose pmem tracks its stores, so that crash images can be taken.
    pub fn tracked(pmem: Vec<u8>, backing: BackingModel, seed: u64) -> World {
        World {
            pmem: PmemModel::new(pmem),
            backing,
            ops: 0,
            crash_ppm: 0,
            crash_limit: usize::MAX,
            rng: Rng(seed),
            crashes: Vec::new(),
            backing_fails: false,
            pins: Default::default(),
            backing_flushes: 0,
            pmem_crcs: 0,
        }
    }

    fn tick(&mut self) {
        self.ops += 1;
        if self.crash_ppm > 0
            && self.crashes.len() < self.crash_limit
            && self.rng.below(1_000_000) < self.crash_ppm
        {
            self.take_crash();
        }
    }

    /// A zeroed pmem of `n_segs` segments of `seg` bytes (after the metadata
    /// area) and a zeroed backing device of `backing` bytes, untracked.
    pub fn blank(n_segs: u64, seg: u64, backing: u64) -> Rc<RefCell<World>> {
        let pmem = crate::meta::layout::SEGMENTS_OFF + n_segs * seg;
        World::untracked(
            vec![0u8; pmem as usize],
            BackingModel::new(backing, HashMap::new()),
        )
    }

    /// A world for checking a crash image: no further crashes, no store tracking.
    pub fn untracked(pmem: Vec<u8>, backing: BackingModel) -> Rc<RefCell<World>> {
        let mut w = World::tracked(Vec::new(), backing, 0);
        w.pmem = PmemModel::untracked(pmem);
        Rc::new(RefCell::new(w))
    }

    pub fn take_crash(&mut self) {
        let mut r = Rng(self.rng.next_u64());
        let img = CrashImage {
            at_op: self.ops,
            pmem: self.pmem.crash_image(&mut r),
            backing: self.backing.crash_image(&mut r),
        };
        self.crashes.push(img);
    }

    // The devices' operations, for the engine's views of them here and in
    // `threads.rs`. Every store, fence, write and flush is an operation a crash
    // may come before.

    pub fn pmem_size(&self) -> u64 {
        self.pmem.volatile.len() as u64
    }

    pub fn pmem_read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let off = off as usize;
        let s = self
            .pmem
            .volatile
            .get(off..off + buf.len())
            .ok_or(IoError)?;
        buf.copy_from_slice(s);
        Ok(())
    }

    pub fn pmem_write(&mut self, off: u64, data: &[u8]) {
        self.tick();
        self.pmem.write(off, data);
    }

    pub fn pmem_flush(&mut self, off: u64, len: u64) {
        self.pmem.flush(off, len);
    }

    pub fn pmem_fence(&mut self) {
        self.tick();
        self.pmem.fence();
    }

    pub fn pin(&mut self, seg: u32) {
        *self.pins.entry(seg).or_default() += 1;
    }

    pub fn unpin(&mut self, seg: u32) {
        match self.pins.get_mut(&seg) {
            Some(1) => {
                self.pins.remove(&seg);
            }
            Some(n) => *n -= 1,
            None => panic!("segment {seg}: unpinned more often than pinned"),
        }
    }

    pub fn pinned(&self, seg: u32) -> bool {
        self.pins.contains_key(&seg)
    }

    pub fn backing_read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        if self.backing_fails
            || !off.is_multiple_of(SECTOR as u64)
            || !buf.len().is_multiple_of(SECTOR)
        {
            return Err(IoError);
        }
        for (i, chunk) in buf.chunks_mut(SECTOR).enumerate() {
            chunk.copy_from_slice(&self.backing.read_sector(off / SECTOR as u64 + i as u64));
        }
        Ok(())
    }

    pub fn backing_write(&mut self, off: u64, data: &[u8]) -> Result<(), IoError> {
        if self.backing_fails
            || !off.is_multiple_of(SECTOR as u64)
            || !data.len().is_multiple_of(SECTOR)
        {
            return Err(IoError);
        }
        self.tick();
        for (i, chunk) in data.chunks(SECTOR).enumerate() {
            let s = off / SECTOR as u64 + i as u64;
            let mut raw = [0u8; SECTOR];
            raw.copy_from_slice(chunk);
            let b: Sector = Arc::new(raw);
            self.backing.cached.insert(s, b.clone());
            self.backing.cache.push((s, b));
        }
        Ok(())
    }

    pub fn backing_flush(&mut self) -> Result<(), IoError> {
        if self.backing_fails {
            return Err(IoError);
        }
        self.tick();
        self.backing.flush();
        self.backing_flushes += 1;
        Ok(())
    }
}

/// The engine's view of the pmem.
pub struct SimPmem(pub Rc<RefCell<World>>);
/// The engine's view of the backing device.
pub struct SimBacking(pub Rc<RefCell<World>>);

impl Pmem for SimPmem {
    fn size(&self) -> u64 {
        self.0.borrow().pmem_size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.borrow().pmem_read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) {
        self.0.borrow_mut().pmem_write(off, data)
    }
    fn flush(&self, off: u64, len: u64) {
        self.0.borrow_mut().pmem_flush(off, len)
    }
    fn fence(&self) {
        self.0.borrow_mut().pmem_fence()
    }
    fn pin(&self, seg: u32) {
        self.0.borrow_mut().pin(seg)
    }
    fn unpin(&self, seg: u32) {
        self.0.borrow_mut().unpin(seg)
    }
    fn pinned(&self, seg: u32) -> bool {
        self.0.borrow().pinned(seg)
    }
    fn crc32c(&self, crc: u32, data: &[u8]) -> u32 {
        self.0.borrow_mut().pmem_crcs += 1;
        crate::meta::crc32c::crc32c(crc, data)
    }
}

impl Backing for SimBacking {
    fn size(&self) -> u64 {
        self.0.borrow().backing.size
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.borrow().backing_read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8]) -> Result<(), IoError> {
        self.0.borrow_mut().backing_write(off, data)
    }
    fn flush(&self) -> Result<(), IoError> {
        self.0.borrow_mut().backing_flush()
    }
    /// The kernel submits a batch at once, so its writes may land in any order:
    /// model the worst by writing it backwards (the engine promises no overlaps).
    fn write_batch(
        &self,
        data: &[u8],
        extents: &[crate::cache_core::WbExtent],
    ) -> Result<(), IoError> {
        assert!(extents.len() <= crate::cache_core::env::WRITE_BATCH_MAX);
        let mut writes = Vec::new();
        crate::cache_core::env::each_batch_write(data, extents, |off, d| {
            writes.push((off, d.to_vec()));
            Ok(())
        })?;
        for (i, (off, data)) in writes.iter().enumerate() {
            for (off2, data2) in writes.iter().take(i) {
                assert!(
                    off + data.len() as u64 <= *off2 || off2 + data2.len() as u64 <= *off,
                    "overlapping writes in one batch"
                );
            }
        }
        for (off, data) in writes.iter().rev() {
            self.write(*off, data)?;
        }
        Ok(())
    }
    fn write_batch_from<P: Pmem>(
        &self,
        pmem: &P,
        extents: &[crate::cache_core::WbExtent],
    ) -> Result<bool, IoError> {
        write_batch_reading(self, pmem, extents)
    }
}

/// [`Backing::write_batch_from`] for the host's models: a device that reads
/// the cache's memory itself, as a DMA does, sees what the pmem holds at that
/// moment (the stores, durable or not): [`Pmem::read`], then the batch as
/// [`Backing::write_batch`] writes it.
pub fn write_batch_reading<B: Backing, P: Pmem>(
    backing: &B,
    pmem: &P,
    extents: &[crate::cache_core::WbExtent],
) -> Result<bool, IoError> {
    let mut data = Vec::new();
    for e in extents {
        let at = data.len();
        data.resize(at + e.len as usize, 0);
        pmem.read(e.addr, &mut data[at..])?;
    }
    backing.write_batch(&data, extents)?;
    Ok(true)
}

/// Owned memory for one engine instance.
pub struct OwnedMem {
    pub segs: Vec<crate::cache_core::SegState>,
    pub seg_map: Vec<crate::cache_core::SegMapEntry>,
    pub nodes: Vec<crate::cache_core::Node>,
    pub roots: Vec<crate::cache_core::Root>,
    pub locks: Vec<std::sync::atomic::AtomicBool>,
    pub ksets: Vec<crate::host_mem::HostLock<crate::cache_core::KsetBuf>>,
    pub heads: Vec<crate::host_mem::HostLock<crate::cache_core::DataHead>>,
    pub scratch: Vec<u8>,
    pub bounce: Vec<u8>,
    pub wb_extents: Vec<crate::cache_core::WbExtent>,
}

impl OwnedMem {
    pub fn new(segs: usize, nodes: usize, backing_bytes: u64, ksets: usize, heads: usize) -> Self {
        OwnedMem {
            segs: vec![Default::default(); segs],
            seg_map: vec![Default::default(); segs],
            nodes: vec![Default::default(); nodes],
            roots: vec![Default::default(); crate::cache_core::roots_needed(backing_bytes)],
            locks: (0..crate::cache_core::roots_needed(backing_bytes))
                .map(|_| Default::default())
                .collect(),
            ksets: (0..ksets)
                .map(|_| crate::host_mem::HostLock::new(Default::default()))
                .collect(),
            heads: (0..heads)
                .map(|_| crate::host_mem::HostLock::new(Default::default()))
                .collect(),
            scratch: vec![0; crate::cache_core::SCRATCH_BYTES],
            // Small enough that large keys take the piecewise path, large enough
            // that writeback batches several extents.
            bounce: vec![0; 16 << 10],
            wb_extents: vec![Default::default(); crate::cache_core::writeback::WB_EXTENTS_MAX],
        }
    }

    pub fn borrow(&mut self) -> crate::cache_core::CacheMem<crate::host_mem::Borrowed<'_>> {
        crate::cache_core::CacheMem {
            ctrl: crate::host_mem::HostLock::new(crate::cache_core::Ctrl::new(
                &mut self.segs[..],
                &mut self.scratch[..],
            )),
            in_flight: crate::host_mem::HostLock::new(Default::default()),
            seg_map: &self.seg_map,
            nodes: &self.nodes,
            roots: &self.roots,
            locks: crate::host_mem::SpinLocks(&self.locks),
            free: Default::default(),
            log: std::sync::Arc::new(crate::cache_core::KeyLog::new(
                &mut self.ksets[..],
                crate::host_mem::HostLock::new(Default::default()),
            )),
            space: std::sync::Arc::new(crate::cache_core::Space::new(
                &mut self.heads[..],
                crate::host_mem::HostLock::new(Default::default()),
            )),
            bounce: &mut self.bounce,
            wb_extents: &mut self.wb_extents,
        }
    }
}

/// A request's turn at the engine in the single-threaded simulator: a
/// `RefCell`, so that a request's attempt and a background round never
/// overlap (the engine itself takes `&self`; the threaded tests share it
/// with no lock at all, as the module does).
pub struct SimLock<T>(pub RefCell<T>);

impl<T> crate::cache_core::Locked<T> for SimLock<T> {
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0.borrow_mut())
    }
}

/// The module's host, simulated: the scheduler decides what the background does
/// while a request sleeps for room, and can stop the background's writeback
/// between plan and copy ([`SimHost::plan`]) for any number of other steps.
pub struct SimHost<'e, M: crate::cache_core::Memory> {
    pub engine: &'e SimLock<crate::cache_core::Cache<SimPmem, SimBacking, M>>,
    pub writer: RefCell<SimWriter>,
    /// A batch the background is planning or planned (true) and has not
    /// copied yet.
    pub held: RefCell<Option<(crate::cache_core::writeback::WbBatch, bool)>>,
    pub rng: RefCell<Rng>,
    pub wakes: std::cell::Cell<u64>,
    pub clock_ms: std::cell::Cell<u64>,
}

/// The simulated background writer.
pub type SimWriter = crate::cache_core::background::Background<
    SimPmem,
    SimBacking,
    Vec<crate::cache_core::WbExtent>,
    Vec<u8>,
>;

impl<'e, M: crate::cache_core::Memory> SimHost<'e, M> {
    /// The engine, shared, as the background's steps take it (`&Cache`).
    fn cache(&self) -> std::cell::Ref<'_, crate::cache_core::Cache<SimPmem, SimBacking, M>> {
        self.engine.0.borrow()
    }

    pub fn new(
        engine: &'e SimLock<crate::cache_core::Cache<SimPmem, SimBacking, M>>,
        world: &Rc<RefCell<World>>,
        seed: u64,
    ) -> Self {
        SimHost {
            engine,
            writer: RefCell::new(crate::cache_core::background::Background::new(
                SimPmem(world.clone()),
                SimBacking(world.clone()),
                vec![Default::default(); crate::cache_core::writeback::WB_EXTENTS_MAX],
                vec![0u8; 16 << 10],
            )),
            held: RefCell::new(None),
            rng: RefCell::new(Rng(seed)),
            wakes: std::cell::Cell::new(0),
            clock_ms: std::cell::Cell::new(0),
        }
    }

    /// The background's writeback, stopped after planning one more kset (the
    /// module takes the control lock once per kset, and requests run between):
    /// the first call plans the kset at the dirty tail, each further one adds
    /// the next kset that may join, until the batch is complete.
    pub fn plan(&self) -> Result<(), String> {
        let held = self.held.borrow_mut().take();
        let mut writer = self.writer.borrow_mut();
        let next = match held {
            None => writer
                .plan_start(&self.cache())
                .map(|b| b.map(|b| (b, false))),
            Some((b, true)) => Ok(Some((b, true))),
            Some((mut b, false)) => writer
                .plan_more(&self.cache(), &mut b)
                .map(|more| Some((b, !more))),
        };
        *self.held.borrow_mut() = next.map_err(|e| format!("plan: {e}"))?;
        Ok(())
    }

    /// The background's writeback, resumed: the rest of the plan, copy, then
    /// commit. True if a batch was held.
    pub fn finish(&self) -> Result<bool, String> {
        use crate::cache_core::Locked;
        let Some((mut batch, planned)) = self.held.borrow_mut().take() else {
            return Ok(false);
        };
        if !planned {
            let mut writer = self.writer.borrow_mut();
            while writer
                .plan_more(&self.cache(), &mut batch)
                .map_err(|e| format!("plan: {e}"))?
            {}
        }
        let copied = self.writer.borrow_mut().copy(&batch);
        match copied {
            Ok(()) => self.engine.with(|c| c.writeback_commit(batch)),
            Err(e) => {
                let e = self.engine.with(|c| c.writeback_failed(batch, e));
                return Err(format!("writeback copy: {e}"));
            }
        }
        crate::cache_core::Waiting::wake_all(self);
        Ok(true)
    }

    /// A background round, as the module's work item runs it (`urgent`: for a
    /// request waiting for room, as the module's `kick`).
    pub fn round(&self, urgent: bool) -> Result<crate::cache_core::background::Round, String> {
        let r = self.writer.borrow_mut().run(&self.cache(), self, urgent);
        if let Some(e) = &r.writeback_error {
            return Err(format!("background writeback: {e}"));
        }
        if let Some(e) = &r.gc_error {
            return Err(format!("background gc: {e}"));
        }
        Ok(r)
    }
}

impl<M: crate::cache_core::Memory> crate::cache_core::Waiting for SimHost<'_, M> {
    fn ticket(&self) -> u64 {
        self.wakes.get()
    }
    fn wait(&self, ticket: u64, _timeout_ms: u32) -> bool {
        // While the request sleeps, the background may finish its held copy or
        // run a round (which cannot pass a held batch), in either order.
        let finish_first = self.rng.borrow_mut().chance(1, 2);
        if finish_first {
            let _ = self.finish();
        }
        let _ = self.round(true);
        if !finish_first && self.rng.borrow_mut().chance(1, 2) {
            let _ = self.finish();
        }
        self.wakes.get() != ticket
    }
    fn wake_all(&self) {
        self.wakes.set(self.wakes.get() + 1);
    }
    fn kick(&self) {}
    fn now_ms(&self) -> u64 {
        // Simulated time: every look at the clock is 50 ms later, so the
        // background persists open ksets every few rounds.
        self.clock_ms.set(self.clock_ms.get() + 50);
        self.clock_ms.get()
    }
}
