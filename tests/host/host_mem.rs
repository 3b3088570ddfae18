//! The engine's memory on the host: buffers lent by a test for the length of
//! one engine's life ([`Borrowed`]), the subtree locks as flags, and the
//! locks the engine shares with requests served without its lock
//! ([`HostLock`]), which a seeded scheduler can watch ([`set_lock_hook`]).

use crate::cache_core::{Locked, Memory, SubtreeLocks};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex, TryLockError};

/// Buffers lent for `'a` (host tests that reuse their memory between lives);
/// the shared objects and locks are the engine's own.
pub struct Borrowed<'a>(PhantomData<&'a mut ()>);

impl<'a> Memory for Borrowed<'a> {
    type Buf<T: 'static> = &'a mut [T];
    type Shared<T: Sync + 'static> = &'a [T];
    type Locks = SpinLocks<'a>;
    type One<T> = Arc<T>;
    type Lock<T: Unpin> = HostLock<T>;
    type Slot<T: Unpin + 'static> = HostLock<T>;
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
                if !contended() {
                    std::hint::spin_loop();
                }
            }
        }
    }

    fn unlock(&self, sub: usize) {
        if let Some(l) = self.0.get(sub) {
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

impl<T> HostLock<T> {
    /// [`Locked::with`], unless another thread holds the lock: then `None`, at
    /// once (the module's `try_lock`).
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        before_lock();
        match self.0.try_lock() {
            Ok(mut g) => Some(f(&mut g)),
            Err(TryLockError::Poisoned(e)) => Some(f(&mut e.into_inner())),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

impl<T> Locked<T> for HostLock<T> {
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        before_lock();
        let mut g = loop {
            match self.0.try_lock() {
                Ok(g) => break g,
                Err(TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(TryLockError::WouldBlock) if !contended() => {
                    break self.0.lock().unwrap_or_else(|e| e.into_inner());
                }
                Err(TryLockError::WouldBlock) => {}
            }
        };
        f(&mut g)
    }
}

/// What a seeded scheduler does at a host lock (see [`set_lock_hook`]).
pub trait LockHook {
    /// Before each host lock this thread takes: a point where another thread
    /// may be given the turn.
    fn before(&self);
    /// The lock is held by another thread: give it the turn (the caller tries
    /// again when it comes back).
    fn contended(&self);
}

thread_local! {
    /// What a seeded scheduler does at this thread's host locks.
    static HOOK: RefCell<Option<Box<dyn LockHook>>> = const { RefCell::new(None) };
}

/// Has `hook` see each host lock this thread takes; `None` removes it.
pub fn set_lock_hook(hook: Option<Box<dyn LockHook>>) {
    HOOK.with(|h| *h.borrow_mut() = hook);
}

fn before_lock() {
    HOOK.with(|h| {
        if let Some(f) = h.borrow().as_ref() {
            f.before();
        }
    });
}

/// The lock is busy: the hook gives its holder the turn (`true`), or there is
/// no hook and the caller waits as any thread does (`false`).
fn contended() -> bool {
    HOOK.with(|h| match h.borrow().as_ref() {
        Some(f) => {
            f.contended();
            true
        }
        None => false,
    })
}
