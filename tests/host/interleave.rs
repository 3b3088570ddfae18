//! The module's request and background paths, interleaved by a seeded
//! scheduler: requests that wait for room ([`request::with_room`]), writeback
//! that plans under the lock, copies without it and commits ([`Background`]),
//! GC, and reuse of freed segments, switched between plan and commit.
//!
//! The property: after a full writeback the backing device holds exactly the
//! last write of every sector, and every read meanwhile returns it. This is the
//! regression test for the race of issue 12, where a copy planned before
//! make-room wrote the kset back, GC freed its segments and new writes filled
//! them, wrote the new bytes to the old kset's backing offsets.

use pcache_engine::cache_core::background::Background;
use pcache_engine::cache_core::request::{with_room, Stalled};
use pcache_engine::cache_core::writeback::{WbBatch, WbExtent};
use pcache_engine::cache_core::{Borrowed, Cache, CacheError, CacheOptions, Locked, Waiting};
use pcache_engine::meta::kset::KSET_KEYS_MAX;
use pcache_engine::meta::layout::{Geometry, SEGMENTS_OFF};
use pcache_engine::sim::{BackingModel, OwnedMem, Rng, SimBacking, SimLock, SimPmem, World};
use std::cell::{Cell, RefCell};

const SEG: u64 = 64 * 1024;
const N_SEGS: u64 = 8;
const BACKING: u64 = 4 << 20;

type Engine<'a> = Cache<SimPmem, SimBacking, Borrowed<'a>>;
type Writer = Background<SimPmem, SimBacking, Vec<WbExtent>, Vec<u8>>;

/// The simulated host: the scheduler decides, when a request sleeps, what the
/// other contexts do meanwhile.
struct Sched<'e, 'a> {
    engine: &'e SimLock<Engine<'a>>,
    writer: RefCell<Writer>,
    /// A batch the background planned and has not copied yet.
    held: RefCell<Option<WbBatch>>,
    rng: RefCell<Rng>,
    wakes: Cell<u64>,
}

impl Sched<'_, '_> {
    /// The background's writeback, stopped between plan and copy.
    fn plan(&self) -> Result<(), String> {
        if self.held.borrow().is_some() {
            return Ok(());
        }
        let b = self
            .writer
            .borrow_mut()
            .plan(self.engine)
            .map_err(|e| format!("plan: {e}"))?;
        *self.held.borrow_mut() = b;
        Ok(())
    }

    /// The background's writeback, resumed: copy, then commit.
    fn finish(&self) -> Result<bool, String> {
        let Some(batch) = self.held.borrow_mut().take() else {
            return Ok(false);
        };
        let copied = self.writer.borrow_mut().copy(&batch);
        match copied {
            Ok(()) => self.engine.with(|c| c.writeback_commit(batch)),
            Err(e) => {
                return Err(format!(
                    "copy: {:?}",
                    self.engine.with(|c| c.writeback_failed(batch, e))
                ))
            }
        }
        self.wake_all();
        Ok(true)
    }

    /// A background round (which makes room the only way the module does).
    fn round(&self) -> Result<(), String> {
        let r = self.writer.borrow_mut().run(self.engine, self);
        if let Some(e) = r.writeback_error.or(r.gc_error) {
            return Err(format!("background: {e}"));
        }
        Ok(())
    }
}

impl Waiting for Sched<'_, '_> {
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
        let _ = self.round();
        if !finish_first && self.rng.borrow_mut().chance(1, 2) {
            let _ = self.finish();
        }
        self.wakes.get() != ticket
    }
    fn wake_all(&self) {
        self.wakes.set(self.wakes.get() + 1);
    }
    fn kick(&self) {}
}

fn run(seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed);
    let world = World::untracked(
        vec![0u8; (SEGMENTS_OFF + N_SEGS * SEG) as usize],
        BackingModel::new(BACKING, Default::default()),
    );
    // Few keys as well as few segments, so both kinds of pressure happen.
    let mut mem = OwnedMem::new(
        N_SEGS as usize,
        1024 + rng.below(2048) as usize,
        BACKING,
        2,
        2,
    );
    let opts = CacheOptions {
        data_crc: rng.chance(1, 2),
        ..Default::default()
    };
    let cache = Cache::start(
        SimPmem(world.clone()),
        SimBacking(world.clone()),
        Geometry::small(SEG).map_err(|e| e.to_string())?,
        mem.borrow(),
        &opts,
    )
    .map_err(|e| format!("start: {e}"))?;
    let engine = SimLock(RefCell::new(cache));
    engine
        .with(|c| c.set_gc_percent(rng.below(80) as u8))
        .map_err(|e| e.to_string())?;
    let sched = Sched {
        engine: &engine,
        writer: RefCell::new(Background::new(
            SimPmem(world.clone()),
            SimBacking(world.clone()),
            vec![WbExtent::default(); KSET_KEYS_MAX],
            vec![0u8; 16 << 10],
        )),
        held: RefCell::new(None),
        rng: RefCell::new(Rng(rng.next_u64())),
        wakes: Cell::new(0),
    };
    let mut model = vec![0u8; BACKING as usize];
    for op in 0..600 {
        match rng.below(20) {
            0..=10 => {
                // Scattered small writes and larger ones.
                let len = if rng.chance(1, 2) {
                    512 * (1 + rng.below(2))
                } else {
                    4096 * (1 + rng.below(8))
                } as usize;
                let off = rng.below((BACKING - len as u64) / 512) * 512;
                let v = (rng.next_u64() as u8) | 1;
                let data = vec![v; len];
                let cpu = rng.below(2) as usize;
                let r = with_room(&engine, &sched, |c: &mut Engine<'_>| {
                    match c.write(off, &data, rng.chance(1, 8), cpu) {
                        Ok(()) => Some(Ok(())),
                        Err(CacheError::Busy(_)) => None,
                        Err(e) => Some(Err(e)),
                    }
                });
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("op {op}: write: {e}")),
                    Err(Stalled) => return Err(format!("op {op}: write stalled")),
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            11..=13 => sched.plan()?,
            14 | 15 => {
                sched.finish()?;
            }
            16 => {
                engine
                    .with(|c| c.gc_step())
                    .map_err(|e| format!("gc: {e}"))?;
            }
            17 => sched.round()?,
            _ => {
                let len = 4096usize;
                let off = rng.below((BACKING - len as u64) / 512) * 512;
                let mut buf = vec![0u8; len];
                engine
                    .with(|c| c.read(off, &mut buf, rng.chance(1, 2), 0))
                    .map_err(|e| format!("op {op}: read: {e}"))?;
                if buf[..] != model[off as usize..off as usize + len] {
                    return Err(format!("op {op}: read at {off} returned stale data"));
                }
            }
        }
    }
    sched.finish()?;
    if std::env::var("PCACHE_VERBOSE").is_ok() {
        let st = engine.with(|c| c.status());
        eprintln!("seed {seed}: wakes {} {:?}", sched.wakes.get(), st.stats);
    }
    engine
        .with(|c| -> Result<(), CacheError> {
            c.flush()?;
            c.writeback_all()
        })
        .map_err(|e| format!("final writeback: {e}"))?;
    let w = world.borrow();
    for s in 0..BACKING / 512 {
        let at = s as usize * 512;
        if w.backing.read_sector(s)[..] != model[at..at + 512] {
            return Err(format!(
                "backing sector {s} is not the last write after a full writeback"
            ));
        }
    }
    Ok(())
}

/// Seeds 1..=300; `PCACHE_SEED=<n>` runs one.
#[test]
fn writeback_planned_before_make_room_never_writes_reused_segments() {
    let seeds: Vec<u64> = match std::env::var("PCACHE_SEED") {
        Ok(s) => vec![s.parse().expect("PCACHE_SEED is a number")],
        Err(_) => (1..=300).collect(),
    };
    for seed in seeds {
        if let Err(e) = run(seed) {
            panic!("seed {seed}: {e}");
        }
    }
}
