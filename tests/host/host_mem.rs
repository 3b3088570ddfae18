//! The engine's memory on the host: buffers lent by a test for the length of
//! one engine's life ([`Borrowed`]), the subtree locks as flags, and the
//! locks the engine shares with requests served without its lock
//! ([`HostLock`]), which a seeded scheduler can watch ([`set_lock_hook`]).

use crate::cache_core::{Locked, Memory, SubtreeLocks};
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};

/// Buffers lent for `'a` (host tests that reuse their memory between lives);
/// the shared objects and locks are the engine's own.
pub struct Borrowed<'a>(PhantomData<&'a mut ()>);

impl<'a> Memory for Borrowed<'a> {
    type Buf<T: 'static> = &'a mut [T];
    type Shared<T: Sync + 'static> = &'a [T];
    type Locks = SpinLocks<'a>;
    type One<T> = Arc<T>;
    type Lock<T: Unpin> = HostLock<T>;
    type KsetLock = HostLock<crate::cache_core::KsetBuf>;
}

/// Subtree locks for hosts: a flag each, taken by spinning. Never in the
/// kernel, whose spinlocks also keep the holder on its CPU and tell lockdep.
#[derive(Clone, Copy)]
pub struct SpinLocks<'a>(pub &'a [AtomicBool]);

impl SubtreeLocks for SpinLocks<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn lock(&self, sub: usize) {
        if let Some(l) = self.0.get(sub) {
            before_lock();
            while l
                .compare_exchange_weak(false, true, Acquire, Relaxed)
                .is_err()
            {
                std::hint::spin_loop();
            }
            HELD.with(|h| h.set(h.get() + 1));
        }
    }

    fn unlock(&self, sub: usize) {
        if let Some(l) = self.0.get(sub) {
            HELD.with(|h| h.set(h.get().saturating_sub(1)));
            l.store(false, Release);
        }
    }
}

/// A `T` under a mutex, shared: the engine's [`Memory::Lock`] on the host.
pub struct HostLock<T>(Arc<Mutex<T>>);

impl<T> HostLock<T> {
    pub fn new(v: T) -> Self {
        HostLock(Arc::new(Mutex::new(v)))
    }
}

impl<T> Clone for HostLock<T> {
    fn clone(&self) -> Self {
        HostLock(self.0.clone())
    }
}

impl<T> Locked<T> for HostLock<T> {
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        before_lock();
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        HELD.with(|h| h.set(h.get() + 1));
        let r = f(&mut g);
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
        r
    }
}

thread_local! {
    /// Host locks (subtree and [`HostLock`]s) this thread holds.
    static HELD: Cell<u32> = const { Cell::new(0) };
    /// Called before this thread takes a host lock it does not hold yet.
    static HOOK: RefCell<Option<Box<dyn Fn()>>> = const { RefCell::new(None) };
}

/// How many host locks this thread holds: a seeded scheduler gives the turn
/// away only when it holds none, since a thread waiting for a lock whose
/// holder never gets the turn back would wait forever.
pub fn locks_held() -> u32 {
    HELD.with(|h| h.get())
}

/// Has `hook` run before each host lock this thread takes while it holds none
/// (a seeded scheduler's switch point); `None` removes it.
pub fn set_lock_hook(hook: Option<Box<dyn Fn()>>) {
    HOOK.with(|h| *h.borrow_mut() = hook);
}

fn before_lock() {
    if locks_held() == 0 {
        HOOK.with(|h| {
            if let Some(f) = h.borrow().as_ref() {
                f();
            }
        });
    }
}
