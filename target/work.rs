// SPDX-License-Identifier: GPL-2.0

//! Work on the target's own workqueue: the request worker that `map` kicks, and the periodic
//! background work (writeback, GC, idle kset flush) that re-arms itself until stopped.
//!
//! Each work item lives in its own heap cell with an `Arc` of the handler and an `Arc` of the
//! workqueue, so neither moves nor goes while queued; dropping a [`Worker`] or [`Ticker`]
//! cancels it synchronously first, so no callback can run after the owner is gone (and none
//! after the module is unloaded).
//!
//! Why not `kernel::workqueue`: in Linux 7.3 it queues on the system workqueues only (it cannot
//! allocate a queue of our own, and a block device's IO path needs `WQ_MEM_RECLAIM`), and its
//! work items cannot be cancelled (`cancel_work_sync`), which dropping an instance needs so
//! that no callback runs on freed memory.

use super::bindings;
use core::{
    ptr::NonNull,
    sync::atomic::{AtomicBool, Ordering},
};
use kernel::{prelude::*, sync::Arc, types::Opaque};

/// The target's workqueue (unbound, usable for memory reclaim, as upstream's).
///
/// # Invariants
///
/// `wq` came from `alloc_workqueue` and is destroyed only on drop.
pub(crate) struct WorkQueue {
    wq: NonNull<kernel::bindings::workqueue_struct>,
}

// SAFETY: workqueues may be used and destroyed from any process context.
unsafe impl Send for WorkQueue {}
// SAFETY: queueing work is thread-safe.
unsafe impl Sync for WorkQueue {}

impl WorkQueue {
    /// Allocates a workqueue named `pcache_rs-<name>`.
    pub(crate) fn new(name: &CStr) -> Result<Self> {
        // SAFETY: `name` is NUL-terminated; `alloc_workqueue` copies the formatted name.
        let wq = unsafe { bindings::pcache_rs_alloc_workqueue(name.as_char_ptr()) };
        Ok(Self {
            wq: NonNull::new(wq).ok_or(ENOMEM)?,
        })
    }

    /// The C workqueue, for items queued from C.
    pub(crate) fn raw(&self) -> *mut kernel::bindings::workqueue_struct {
        self.wq.as_ptr()
    }

    /// Waits until every queued work item has run, including ones queued meanwhile.
    pub(crate) fn drain(&self) {
        // SAFETY: `wq` is live (type invariant).
        unsafe { kernel::bindings::drain_workqueue(self.wq.as_ptr()) };
    }
}

impl Drop for WorkQueue {
    fn drop(&mut self) {
        // SAFETY: `wq` is live and destroyed once; `destroy_workqueue` drains it first.
        unsafe { kernel::bindings::destroy_workqueue(self.wq.as_ptr()) };
    }
}

/// What a work item runs on its handler; in process context on the target's workqueue, so it
/// may sleep.
pub(crate) type WorkFn<T> = fn(&T);

/// What a [`Ticker`] runs; `true` asks for the next run at once rather than a period later
/// (there is more work).
pub(crate) type TickFn<T> = fn(&T) -> bool;

/// A heap cell holding the C work item first, so the callback can find the rest from it.
#[repr(C)]
struct Cell<W, T, F> {
    work: Opaque<W>,
    handler: Arc<T>,
    run: F,
    /// The queue the item goes on; held so that it outlives every queueing.
    wq: Arc<WorkQueue>,
    /// For a [`Ticker`]: re-arm after each run, and the period.
    rearm: AtomicBool,
    period_ms: u32,
}

impl<W, T, F> Cell<W, T, F> {
    /// A pinned heap cell whose work item is still to be initialised by the C side.
    fn boxed(
        wq: &Arc<WorkQueue>,
        handler: Arc<T>,
        run: F,
        period_ms: u32,
    ) -> Result<Pin<KBox<Self>>> {
        Ok(KBox::pin(
            Cell {
                work: Opaque::uninit(),
                handler,
                run,
                wq: wq.clone(),
                rearm: AtomicBool::new(false),
                period_ms,
            },
            GFP_KERNEL,
        )?)
    }
}

/// A work item that runs `T::run` once per [`Worker::queue`] (coalescing queued calls).
///
/// # Invariants
///
/// The cell's work item is initialised before the worker is returned; the cell is pinned on the
/// heap and holds the handler and the workqueue, so both outlive every queueing; `drop` cancels
/// the work synchronously before the cell is freed.
pub(crate) struct Worker<T: Send + Sync + 'static> {
    cell: Pin<KBox<Cell<kernel::bindings::work_struct, T, WorkFn<T>>>>,
}

// SAFETY: the cell is only touched through the thread-safe workqueue API and `Arc<T>`.
unsafe impl<T: Send + Sync + 'static> Send for Worker<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync + 'static> Sync for Worker<T> {}

impl<T: Send + Sync + 'static> Worker<T> {
    /// A work item for `handler` on `wq`.
    pub(crate) fn new(wq: &Arc<WorkQueue>, handler: Arc<T>, run: WorkFn<T>) -> Result<Self> {
        let cell = Cell::boxed(wq, handler, run, 0)?;
        // SAFETY: the cell is pinned on the heap, so the work item never moves; it is
        // initialised before it is queued.
        unsafe { bindings::pcache_rs_init_work(cell.work.get(), Some(Self::callback)) };
        Ok(Self { cell })
    }

    /// `work_struct` callback.
    ///
    /// # Safety
    ///
    /// Called by the workqueue with the `work_struct` at the start of a live `Cell`.
    unsafe extern "C" fn callback(work: *mut kernel::bindings::work_struct) {
        // SAFETY: `work` is the first field of a `#[repr(C)]` cell that stays alive until the
        // work is cancelled in `drop`, which waits for this callback.
        let cell = unsafe { &*work.cast::<Cell<kernel::bindings::work_struct, T, WorkFn<T>>>() };
        (cell.run)(&cell.handler);
    }

    /// Queues the work unless it is already queued.
    pub(crate) fn queue(&self) {
        // SAFETY: the work item is initialised and pinned; the cell holds the workqueue.
        unsafe { bindings::pcache_rs_queue_work(self.cell.wq.wq.as_ptr(), self.cell.work.get()) };
    }
}

impl<T: Send + Sync + 'static> Drop for Worker<T> {
    fn drop(&mut self) {
        // SAFETY: the work item is initialised; after this returns it is neither queued nor
        // running, so the cell can be freed.
        unsafe { kernel::bindings::cancel_work_sync(self.cell.work.get()) };
    }
}

/// A delayed work item that runs `T::run` every `period_ms` while started, and at once again
/// when a run says there is more to do.
///
/// # Invariants
///
/// As for [`Worker`]; a run re-arms the item only while `rearm` is set, and [`Ticker::stop`]
/// clears it before cancelling synchronously, so after `stop` the item is neither queued nor
/// running.
pub(crate) struct Ticker<T: Send + Sync + 'static> {
    cell: Pin<KBox<Cell<kernel::bindings::delayed_work, T, TickFn<T>>>>,
}

// SAFETY: as for `Worker`.
unsafe impl<T: Send + Sync + 'static> Send for Ticker<T> {}
// SAFETY: as for `Worker`.
unsafe impl<T: Send + Sync + 'static> Sync for Ticker<T> {}

impl<T: Send + Sync + 'static> Ticker<T> {
    /// A stopped ticker for `handler` on `wq`.
    pub(crate) fn new(
        wq: &Arc<WorkQueue>,
        handler: Arc<T>,
        run: TickFn<T>,
        period_ms: u32,
    ) -> Result<Self> {
        let cell = Cell::boxed(wq, handler, run, period_ms)?;
        // SAFETY: as in `Worker::new`.
        unsafe { bindings::pcache_rs_init_delayed_work(cell.work.get(), Some(Self::callback)) };
        Ok(Self { cell })
    }

    /// `delayed_work` callback.
    ///
    /// # Safety
    ///
    /// Called by the workqueue with the `work_struct` at the start of the `delayed_work` at the
    /// start of a live `Cell`.
    unsafe extern "C" fn callback(work: *mut kernel::bindings::work_struct) {
        // SAFETY: `work` is the first field of the `delayed_work`, itself the first field of a
        // `#[repr(C)]` cell kept alive until `stop`/`drop` cancels the work synchronously.
        let cell = unsafe { &*work.cast::<Cell<kernel::bindings::delayed_work, T, TickFn<T>>>() };
        let more = (cell.run)(&cell.handler);
        if cell.rearm.load(Ordering::Acquire) {
            let delay = if more { 0 } else { cell.period_ms };
            // SAFETY: as in `start`; `cancel_delayed_work_sync` copes with self-requeueing.
            unsafe {
                bindings::pcache_rs_queue_delayed_work(cell.wq.wq.as_ptr(), cell.work.get(), delay)
            };
        }
    }

    /// Starts ticking: the first run is one period from now.
    pub(crate) fn start(&self) {
        self.cell.rearm.store(true, Ordering::Release);
        // SAFETY: the work item is initialised and pinned; the cell holds the workqueue.
        unsafe {
            bindings::pcache_rs_queue_delayed_work(
                self.cell.wq.wq.as_ptr(),
                self.cell.work.get(),
                self.cell.period_ms,
            )
        };
    }

    /// Stops ticking and waits for a running tick to finish.
    pub(crate) fn stop(&self) {
        self.cell.rearm.store(false, Ordering::Release);
        // SAFETY: the work item is initialised; afterwards it is neither pending nor running.
        unsafe { kernel::bindings::cancel_delayed_work_sync(self.cell.work.get()) };
    }
}

impl<T: Send + Sync + 'static> Drop for Ticker<T> {
    fn drop(&mut self) {
        self.stop();
    }
}
