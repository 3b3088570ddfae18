//! A seeded, deterministic scheduler for the engine on real threads
//! (`threads.rs`): only the thread whose turn it is runs, and the turn passes,
//! to a thread the seed picks, at every boundary the module has: before each
//! call into the engine, before each acquisition of a host lock
//! (a subtree's, an open kset's, the key head's, the data heads'), and before
//! each device access, inside locks too, as on two CPUs: a thread that finds a
//! lock held gives the turn away until its holder has let it go (so a
//! lock-order inversion shows as a thread that never gets its lock:
//! [`CONTENDED_MAX`]). Since nothing else is shared, a seed replays the same
//! interleaving, and a failure names the seed that shows it.
//!
//! Until stop 28 no switch happened while a thread held a lock: a close that
//! persisted its kset after letting the key head go, leaving a hole in the log
//! for a moment, passed every seed then; with switches inside locks,
//! `fua_writes_to_two_ksets_survive_a_crash_at_any_point` fails on it (seed 7).
//!
//! Waiting for room ([`pcache_engine::cache_core::Waiting`]) blocks a thread
//! until another wakes it; time is virtual: it advances a little at every
//! switch, and jumps to the nearest timeout when every thread that could run is
//! waiting, so a stalled cache times out as it would in the module, at once.

use pcache_engine::host_mem;
use pcache_engine::sim::Rng;
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Microseconds of virtual time a switch takes.
const SWITCH_US: u64 = 5;

/// Times in a row a thread may find a lock held before the scheduler calls it
/// a deadlock (two threads each waiting for a lock the other holds).
pub const CONTENDED_MAX: u32 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// May be given the turn.
    Ready,
    /// Waiting for a wake after `ticket` (with none: the background between
    /// rounds that made no progress), or for the clock to reach `until_us`.
    Waiting {
        ticket: Option<u64>,
        until_us: u64,
    },
    Done,
}

struct State {
    rng: Rng,
    turn: usize,
    threads: Vec<Run>,
    /// Wakes so far (see [`Sched::ticket`]).
    wakes: u64,
    /// Whether the last wait of each thread ended with a wake.
    woken: Vec<bool>,
    clock_us: u64,
    switches: u64,
}

pub struct Sched {
    seed: u64,
    state: Mutex<State>,
    turn: Condvar,
}

thread_local! {
    /// This thread's number, once it [`Sched::enter`]ed.
    static ME: Cell<Option<usize>> = const { Cell::new(None) };
    /// Times in a row this thread found a lock held.
    static CONTENDED: Cell<u32> = const { Cell::new(0) };
}

/// A scheduled thread's [`host_mem::LockHook`].
struct Hook(Arc<Sched>);

impl host_mem::LockHook for Hook {
    fn before(&self) {
        self.0.switch();
    }

    fn contended(&self) {
        self.0.contended();
    }
}

impl Sched {
    /// A scheduler for `threads` threads (numbered from 0), thread 0 first.
    pub fn new(threads: usize, seed: u64) -> Self {
        Sched {
            seed,
            state: Mutex::new(State {
                rng: Rng(seed),
                turn: 0,
                threads: vec![Run::Ready; threads],
                wakes: 0,
                woken: vec![false; threads],
                clock_us: 0,
                switches: 0,
            }),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the calling thread number `id` and waits for its first turn. The
    /// returned guard ends the thread's part when dropped, on a panic too, so
    /// the others go on.
    pub fn enter(self: &Arc<Self>, id: usize) -> Leave<'_> {
        ME.with(|m| m.set(Some(id)));
        let me = Arc::clone(self);
        host_mem::set_lock_hook(Some(Box::new(Hook(me))));
        let st = self.lock();
        drop(self.wait_turn(st, id));
        Leave(self)
    }

    fn wait_turn<'a>(&'a self, mut st: MutexGuard<'a, State>, me: usize) -> MutexGuard<'a, State> {
        while st.turn != me {
            st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    /// Gives the turn to a thread the seed picks (perhaps this one) and waits
    /// until it comes back. Does nothing on a thread that is not scheduled.
    pub fn switch(&self) {
        let Some(me) = ME.with(Cell::get) else {
            return;
        };
        // Not in a row: this thread has got past a lock since.
        CONTENDED.with(|c| c.set(0));
        let mut st = self.lock();
        self.pass(&mut st);
        drop(self.wait_turn(st, me));
    }

    /// The lock this thread wants is held by another: gives the turn to a
    /// thread the seed picks (perhaps this one, which tries again).
    ///
    /// # Panics
    ///
    /// After [`CONTENDED_MAX`] tries in a row: a deadlock.
    pub fn contended(&self) {
        let Some(me) = ME.with(Cell::get) else {
            return;
        };
        let n = CONTENDED.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        assert!(
            n < CONTENDED_MAX,
            "seed {}: thread {me} found a lock held {n} times in a row: a deadlock",
            self.seed
        );
        let mut st = self.lock();
        self.pass(&mut st);
        drop(self.wait_turn(st, me));
    }

    /// [`Sched::switch`] for a thread that has nothing to do for `ms` of
    /// virtual time, unless woken.
    pub fn idle(&self, ms: u64) {
        let Some(me) = ME.with(Cell::get) else {
            return;
        };
        let mut st = self.lock();
        let until_us = st.clock_us + ms * 1000;
        if let Some(r) = st.threads.get_mut(me) {
            *r = Run::Waiting {
                ticket: None,
                until_us,
            };
        }
        self.pass(&mut st);
        drop(self.wait_turn(st, me));
    }

    /// Picks the next turn among the ready threads; with none ready, the
    /// clock jumps to the nearest end of a wait, and that thread runs.
    fn pass(&self, st: &mut State) {
        st.clock_us += SWITCH_US;
        st.switches += 1;
        let ready: Vec<usize> = (0..st.threads.len())
            .filter(|&i| st.threads.get(i) == Some(&Run::Ready))
            .collect();
        let next = if ready.is_empty() {
            let nearest = st
                .threads
                .iter()
                .enumerate()
                .filter_map(|(i, r)| match r {
                    Run::Waiting { until_us, .. } => Some((i, *until_us)),
                    _ => None,
                })
                .min_by_key(|&(_, u)| u);
            if let Some((i, until)) = nearest {
                st.clock_us = st.clock_us.max(until);
                if let Some(r) = st.threads.get_mut(i) {
                    *r = Run::Ready;
                }
                if let Some(w) = st.woken.get_mut(i) {
                    *w = false;
                }
            }
            nearest.map(|(i, _)| i)
        } else {
            let at = st.rng.below(ready.len() as u64) as usize;
            ready.get(at).copied()
        };
        if let Some(n) = next {
            st.turn = n;
        }
        self.turn.notify_all();
    }

    /// A ticket for [`Sched::wait`].
    pub fn ticket(&self) -> u64 {
        self.lock().wakes
    }

    /// Waits for a [`Sched::wake_all`] after `ticket` (true), or for
    /// `timeout_ms` of virtual time (false).
    pub fn wait(&self, ticket: u64, timeout_ms: u32) -> bool {
        let Some(me) = ME.with(Cell::get) else {
            return false;
        };
        let mut st = self.lock();
        if st.wakes != ticket {
            return true;
        }
        let until_us = st.clock_us + u64::from(timeout_ms) * 1000;
        if let Some(r) = st.threads.get_mut(me) {
            *r = Run::Waiting {
                ticket: Some(ticket),
                until_us,
            };
        }
        self.pass(&mut st);
        let st = self.wait_turn(st, me);
        st.woken.get(me).copied().unwrap_or(false)
    }

    /// Wakes every waiting thread, and the idle ones.
    pub fn wake_all(&self) {
        let mut st = self.lock();
        st.wakes += 1;
        let State { threads, woken, .. } = &mut *st;
        for (r, w) in threads.iter_mut().zip(woken.iter_mut()) {
            if let Run::Waiting { ticket, .. } = *r {
                *r = Run::Ready;
                *w = ticket.is_some();
            }
        }
    }

    /// Virtual milliseconds since the start.
    pub fn now_ms(&self) -> u64 {
        self.lock().clock_us / 1000
    }

    /// Switches so far.
    pub fn switches(&self) -> u64 {
        self.lock().switches
    }

    /// The seed the schedule comes from (other seeded choices of a run derive
    /// from it).
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

/// The end of a scheduled thread (see [`Sched::enter`]).
pub struct Leave<'a>(&'a Sched);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let Some(me) = ME.with(Cell::get) else {
            return;
        };
        ME.with(|m| m.set(None));
        host_mem::set_lock_hook(None);
        let mut st = self.0.lock();
        if let Some(r) = st.threads.get_mut(me) {
            *r = Run::Done;
        }
        self.0.pass(&mut st);
    }
}
