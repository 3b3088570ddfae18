// SPDX-License-Identifier: GPL-2.0

//! Device-mapper target types: the [`TargetOperations`] trait a target implements, the
//! [`Target`] it is constructed on, and the [`Registration`] that publishes it.
//!
//! The C callbacks are trampolines that recover the target's private data from `ti->private`
//! and call the trait with safe wrappers. The private data is a `Pin<KBox<T>>` made by `ctr`
//! and dropped by `dtr`, so everything a target holds (devices, mappings, work) is released by
//! its `Drop` implementations.

use super::{
    args::Args,
    bindings,
    bio::Bio,
    device::TargetDevice,
    status::{StatusType, StatusWriter},
};
use core::{marker::PhantomData, ptr::NonNull};
use kernel::{error::VTABLE_DEFAULT_ERROR, prelude::*, types::Opaque};

/// A failed constructor: the `ti->error` string and the error code.
pub(crate) struct CtrError {
    /// What `dmsetup` and the kernel log show.
    pub(crate) msg: &'static CStr,
    /// The errno returned to device-mapper.
    pub(crate) err: Error,
}

impl CtrError {
    /// A constructor failure with message `msg` and error `err`.
    pub(crate) fn new(msg: &'static CStr, err: Error) -> Self {
        Self { msg, err }
    }
}

/// What `map` did with a bio.
pub(crate) enum MapResult {
    /// The target took the bio ([`super::bio::Bio::take`]) and will end it itself.
    Submitted(super::bio::Taken),
    /// Fail the bio with an IO error.
    Kill,
}

impl MapResult {
    fn into_raw(self) -> c_int {
        (match self {
            Self::Submitted(_) => bindings::DM_MAPIO_SUBMITTED,
            Self::Kill => bindings::DM_MAPIO_KILL,
        }) as c_int
    }
}

/// The target instance as device-mapper sees it (`struct dm_target`).
///
/// # Invariants
///
/// `ti` points to a live `dm_target` for `'a`.
pub(crate) struct Target<'a> {
    ti: NonNull<bindings::dm_target>,
    _borrow: PhantomData<&'a mut bindings::dm_target>,
}

impl Target<'_> {
    /// # Safety
    ///
    /// `ti` must be a live target, not accessed elsewhere in ways that conflict with the
    /// methods used, for the life of the wrapper.
    unsafe fn from_raw(ti: NonNull<bindings::dm_target>) -> Self {
        Self {
            ti,
            _borrow: PhantomData,
        }
    }

    fn raw(&self) -> &bindings::dm_target {
        // SAFETY: `ti` is live (type invariant).
        unsafe { self.ti.as_ref() }
    }

    fn raw_mut(&mut self) -> &mut bindings::dm_target {
        // SAFETY: `ti` is live (type invariant); only `ctr` gets a `&mut Target`, while
        // device-mapper does not look at the target.
        unsafe { self.ti.as_mut() }
    }

    /// First sector of the mapped device that this target covers.
    pub(crate) fn begin(&self) -> u64 {
        self.raw().begin
    }

    /// Length of this target in sectors.
    pub(crate) fn len(&self) -> u64 {
        self.raw().len
    }

    /// Which mapped device the table is for, as a number that is the same for every table of
    /// that device (its `struct mapped_device` address), to tell a reload from another device.
    pub(crate) fn mapped_device_id(&self) -> usize {
        // SAFETY: `ti` is live and its table is set (device-mapper constructs targets of a
        // table); `dm_table_get_md` only reads the table's device pointer.
        unsafe { bindings::dm_table_get_md(self.raw().table) as usize }
    }

    /// Opens a device for this target (`dm_get_device`), read-write.
    pub(crate) fn get_device(&mut self, path: &CStr) -> Result<TargetDevice> {
        // SAFETY: `ti` is the target under construction; the device ends up in the target's
        // private data (dropped by `dtr`) or is dropped before a failing `ctr` returns, because
        // `ctr` can only return it inside `Self`.
        unsafe { TargetDevice::open(self.ti, path) }
    }

    /// Number of empty flush bios device-mapper sends for a flush of the mapped device.
    pub(crate) fn set_num_flush_bios(&mut self, n: u32) {
        self.raw_mut().num_flush_bios = n;
    }

    /// Number of discard bios device-mapper sends per discard.
    pub(crate) fn set_num_discard_bios(&mut self, n: u32) {
        self.raw_mut().num_discard_bios = n;
    }

    /// Number of write-zeroes bios device-mapper sends per write-zeroes.
    pub(crate) fn set_num_write_zeroes_bios(&mut self, n: u32) {
        self.raw_mut().num_write_zeroes_bios = n;
    }

    /// Receive discards even if the devices below do not take them.
    pub(crate) fn set_discards_supported(&mut self, on: bool) {
        self.raw_mut().set_discards_supported(on);
    }

    /// Receive flushes even if the devices below do not advertise a write cache.
    pub(crate) fn set_flush_supported(&mut self, on: bool) {
        self.raw_mut().set_flush_supported(on);
    }

    /// Bytes of per-bio data the target wants next to each bio.
    pub(crate) fn set_per_io_data_size(&mut self, n: u32) {
        self.raw_mut().per_io_data_size = n;
    }

    /// Split bios so none crosses a multiple of `sectors`.
    pub(crate) fn set_max_io_len(&mut self, sectors: u64) -> Result {
        // SAFETY: `ti` is live and under construction.
        kernel::error::to_result(unsafe {
            bindings::dm_set_target_max_io_len(self.ti.as_ptr(), sectors)
        })
    }
}

/// The limits of the mapped device, offered to a target to adjust (`io_hints`).
pub(crate) struct QueueLimits<'a>(&'a mut kernel::bindings::queue_limits);

impl QueueLimits<'_> {
    /// Whether the stacked limits let discards through.
    pub(crate) fn takes_discards(&self) -> bool {
        self.0.max_hw_discard_sectors != 0
    }

    /// Takes discards of up to `sectors`, in units of `granularity` bytes.
    pub(crate) fn set_discard(&mut self, sectors: u32, granularity: u32) {
        self.0.max_hw_discard_sectors = sectors;
        self.0.max_discard_sectors = sectors;
        self.0.discard_granularity = granularity;
    }

    /// Caps write-zeroes bios at `sectors` (device-mapper turns them off unless every device
    /// below takes them).
    pub(crate) fn limit_max_write_zeroes(&mut self, sectors: u32) {
        self.0.max_write_zeroes_sectors = self.0.max_write_zeroes_sectors.min(sectors);
    }

    /// Asks that a write bio's pages not change while it is in flight (upper layers wait for
    /// it before touching a page under writeback).
    pub(crate) fn set_stable_writes(&mut self) {
        // SAFETY: `self.0` is the live limits device-mapper handed to `io_hints`.
        unsafe { super::bindings::pcache_rs_limits_set_stable_writes(&mut *self.0) };
    }

    /// Takes bios marked `REQ_NOWAIT` whatever the underlying devices take (the stacking
    /// clears the feature when one of them lacks it): for a target that never sends such a
    /// bio on, and ends one with `EAGAIN` where it would wait.
    pub(crate) fn set_nowait(&mut self) {
        // SAFETY: `self.0` is the live limits device-mapper handed to `io_hints`.
        unsafe { super::bindings::pcache_rs_limits_set_nowait(&mut *self.0) };
    }

    /// Caps the size of bios the device accepts at `sectors`.
    pub(crate) fn limit_max_sectors(&mut self, sectors: u32) {
        self.0.max_hw_sectors = self.0.max_hw_sectors.min(sectors);
        self.0.max_sectors = self.0.max_sectors.min(sectors);
    }
}

/// The callout that `iterate_devices` calls for each underlying device.
pub(crate) struct DeviceVisitor<'a> {
    ti: NonNull<bindings::dm_target>,
    callout: bindings::iterate_devices_callout_fn,
    data: *mut c_void,
    _borrow: PhantomData<&'a ()>,
}

impl DeviceVisitor<'_> {
    /// Reports `len` sectors of `dev` from `start` as used by this target; a non-zero return
    /// stops the iteration and must be passed back.
    pub(crate) fn visit(&mut self, dev: &TargetDevice, start: u64, len: u64) -> c_int {
        let Some(callout) = self.callout else {
            return 0;
        };
        // SAFETY: device-mapper gave us `callout` and `data` for this `ti`; `dev` is held by the
        // target, so its `dm_dev` is valid.
        unsafe { callout(self.ti.as_ptr(), dev.as_raw(), start, len, self.data) }
    }
}

/// The operations of a device-mapper target.
///
/// `ctr` makes the instance from a table line; device-mapper then calls the other methods on
/// it, concurrently for `map`, `end_io` and `status`, so the instance is `Send + Sync`. The
/// instance is dropped when the target is destroyed.
#[vtable]
pub(crate) trait TargetOperations: Sized + Send + Sync {
    /// Constructs an instance from the table line's arguments.
    fn ctr(target: &mut Target<'_>, args: Args<'_>) -> Result<Pin<KBox<Self>>, CtrError>;

    /// Maps a bio. The view is the target's for the call: [`Bio::take`] consumes it.
    fn map(&self, target: &Target<'_>, bio: Bio<'_>) -> MapResult;

    /// Sees a bio completed by the device below; returns `true` if the target takes it back.
    fn end_io(&self, _bio: &mut Bio<'_>, _error: &mut u8) -> bool {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Before a suspend: stop starting work that needs the devices.
    fn presuspend(&self) {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// After a suspend has drained IO: quiesce background work.
    fn postsuspend(&self) {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Before a resume, after a new table was swapped in: a non-zero errno fails the resume.
    fn preresume(&self) -> Result {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// After a resume: restart background work.
    fn resume(&self) {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Writes the status line or the table line.
    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>);

    /// Handles `dmsetup message`.
    fn message(&self, _args: Args<'_>, _out: &mut StatusWriter<'_>) -> Result {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Visits the underlying devices whose limits the mapped device inherits.
    fn iterate_devices(&self, _target: &Target<'_>, _visitor: &mut DeviceVisitor<'_>) -> c_int {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Adjusts the limits of the mapped device.
    fn io_hints(&self, _limits: &mut QueueLimits<'_>) {
        build_error!(VTABLE_DEFAULT_ERROR)
    }
}

/// Recovers the instance from a target's private data.
///
/// # Safety
///
/// `ti` must be a live target whose `ctr` succeeded for `T` and whose `dtr` has not run.
unsafe fn instance<'a, T: TargetOperations>(ti: *mut bindings::dm_target) -> &'a T {
    // SAFETY: `ctr` stored a `Pin<KBox<T>>` turned into a raw pointer in `private`, freed only
    // by `dtr` (caller's guarantee).
    unsafe { &*((*ti).private as *const T) }
}

struct Callbacks<T>(PhantomData<T>);

impl<T: TargetOperations> Callbacks<T> {
    /// `ctr` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn ctr(
        ti: *mut bindings::dm_target,
        argc: c_uint,
        argv: *mut *mut c_char,
    ) -> c_int {
        let Some(ti) = NonNull::new(ti) else {
            return EINVAL.to_errno();
        };
        // SAFETY: device-mapper passes a live target under construction.
        let mut target = unsafe { Target::from_raw(ti) };
        // SAFETY: device-mapper passes `argc` NUL-terminated strings that live for the call.
        let args = unsafe { Args::from_raw(argc, argv) };
        match T::ctr(&mut target, args) {
            Ok(instance) => {
                // SAFETY: the instance is never moved out of the box; `dtr` rebuilds the pin.
                let raw = KBox::into_raw(unsafe { Pin::into_inner_unchecked(instance) });
                target.raw_mut().private = raw.cast();
                0
            }
            Err(e) => {
                // Device-mapper only reads `error`; the string is static.
                target.raw_mut().error = e.msg.as_char_ptr().cast_mut();
                e.err.to_errno()
            }
        }
    }

    /// `dtr` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn dtr(ti: *mut bindings::dm_target) {
        // SAFETY: `dtr` is called once, after a successful `ctr`, with no other callback
        // running; `private` holds the box `ctr` leaked.
        let raw = unsafe { (*ti).private }.cast::<T>();
        if raw.is_null() {
            return;
        }
        // SAFETY: see above; the pin is restored for the drop.
        drop(unsafe { Pin::new_unchecked(KBox::from_raw(raw)) });
        // SAFETY: `ti` is live until `dtr` returns.
        unsafe { (*ti).private = core::ptr::null_mut() };
    }

    /// `map` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn map(ti: *mut bindings::dm_target, bio: *mut bindings::bio) -> c_int {
        let (Some(tip), Some(biop)) = (NonNull::new(ti), NonNull::new(bio)) else {
            return MapResult::Kill.into_raw();
        };
        // SAFETY: `map` runs between `ctr` and `dtr`.
        let this = unsafe { instance::<T>(ti) };
        // SAFETY: device-mapper passes a live target; `map` only reads it.
        let target = unsafe { Target::from_raw(tip) };
        // SAFETY: the bio belongs to this call until we return.
        let bio = unsafe { Bio::from_raw(biop) };
        this.map(&target, bio).into_raw()
    }

    /// `end_io` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn end_io(
        ti: *mut bindings::dm_target,
        bio: *mut bindings::bio,
        error: *mut kernel::bindings::blk_status_t,
    ) -> c_int {
        let (Some(biop), false) = (NonNull::new(bio), error.is_null()) else {
            return bindings::DM_ENDIO_DONE as c_int;
        };
        // SAFETY: `end_io` runs between `ctr` and `dtr`.
        let this = unsafe { instance::<T>(ti) };
        // SAFETY: the bio belongs to this call until we return.
        let mut bio = unsafe { Bio::from_raw(biop) };
        // SAFETY: `error` points to the bio's status for the duration of the call.
        let status = unsafe { &mut *error };
        if this.end_io(&mut bio, status) {
            bindings::DM_ENDIO_INCOMPLETE as c_int
        } else {
            bindings::DM_ENDIO_DONE as c_int
        }
    }

    /// `presuspend` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn presuspend(ti: *mut bindings::dm_target) {
        // SAFETY: suspend callbacks run between `ctr` and `dtr`.
        unsafe { instance::<T>(ti) }.presuspend()
    }

    /// `postsuspend` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn postsuspend(ti: *mut bindings::dm_target) {
        // SAFETY: suspend callbacks run between `ctr` and `dtr`.
        unsafe { instance::<T>(ti) }.postsuspend()
    }

    /// `preresume` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn preresume(ti: *mut bindings::dm_target) -> c_int {
        // SAFETY: preresume runs between `ctr` and `dtr`.
        match unsafe { instance::<T>(ti) }.preresume() {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    /// `resume` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn resume(ti: *mut bindings::dm_target) {
        // SAFETY: resume runs between `ctr` and `dtr`.
        unsafe { instance::<T>(ti) }.resume()
    }

    /// `status` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn status(
        ti: *mut bindings::dm_target,
        kind: bindings::status_type_t,
        _flags: c_uint,
        result: *mut c_char,
        maxlen: c_uint,
    ) {
        // SAFETY: `status` runs between `ctr` and `dtr`.
        let this = unsafe { instance::<T>(ti) };
        // SAFETY: device-mapper passes a buffer of `maxlen` bytes.
        let mut out = unsafe { StatusWriter::from_raw(result, maxlen) };
        let kind = match kind {
            bindings::status_type_t_STATUSTYPE_INFO => StatusType::Info,
            bindings::status_type_t_STATUSTYPE_TABLE => StatusType::Table,
            _ => StatusType::Ima,
        };
        this.status(kind, &mut out);
    }

    /// `message` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn message(
        ti: *mut bindings::dm_target,
        argc: c_uint,
        argv: *mut *mut c_char,
        result: *mut c_char,
        maxlen: c_uint,
    ) -> c_int {
        // SAFETY: `message` runs between `ctr` and `dtr`.
        let this = unsafe { instance::<T>(ti) };
        // SAFETY: device-mapper passes `argc` NUL-terminated strings that live for the call.
        let args = unsafe { Args::from_raw(argc, argv) };
        // SAFETY: device-mapper passes a buffer of `maxlen` bytes.
        let mut out = unsafe { StatusWriter::from_raw(result, maxlen) };
        match this.message(args, &mut out) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    /// `iterate_devices` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn iterate_devices(
        ti: *mut bindings::dm_target,
        callout: bindings::iterate_devices_callout_fn,
        data: *mut c_void,
    ) -> c_int {
        let Some(tip) = NonNull::new(ti) else {
            return 0;
        };
        // SAFETY: `iterate_devices` runs between `ctr` and `dtr`.
        let this = unsafe { instance::<T>(ti) };
        // SAFETY: device-mapper passes a live target; it is only read.
        let target = unsafe { Target::from_raw(tip) };
        let mut visitor = DeviceVisitor {
            ti: tip,
            callout,
            data,
            _borrow: PhantomData,
        };
        this.iterate_devices(&target, &mut visitor)
    }

    /// `io_hints` callback of `struct target_type`.
    ///
    /// # Safety
    ///
    /// Only device-mapper calls it, with the arguments `device-mapper.h` documents for it.
    unsafe extern "C" fn io_hints(
        ti: *mut bindings::dm_target,
        limits: *mut kernel::bindings::queue_limits,
    ) {
        if limits.is_null() {
            return;
        }
        // SAFETY: `io_hints` runs between `ctr` and `dtr`.
        let this = unsafe { instance::<T>(ti) };
        // SAFETY: device-mapper passes the limits being computed, ours for the call.
        let mut limits = QueueLimits(unsafe { &mut *limits });
        this.io_hints(&mut limits);
    }

    fn target_type(
        name: &'static CStr,
        version: [u32; 3],
        features: u64,
        module: &'static ThisModule,
    ) -> bindings::target_type {
        bindings::target_type {
            features,
            name: name.as_char_ptr(),
            module: module.as_ptr(),
            version,
            ctr: Some(Self::ctr),
            dtr: Some(Self::dtr),
            map: Some(Self::map),
            end_io: if T::HAS_END_IO {
                Some(Self::end_io)
            } else {
                None
            },
            presuspend: if T::HAS_PRESUSPEND {
                Some(Self::presuspend)
            } else {
                None
            },
            postsuspend: if T::HAS_POSTSUSPEND {
                Some(Self::postsuspend)
            } else {
                None
            },
            preresume: if T::HAS_PRERESUME {
                Some(Self::preresume)
            } else {
                None
            },
            resume: if T::HAS_RESUME {
                Some(Self::resume)
            } else {
                None
            },
            status: Some(Self::status),
            message: if T::HAS_MESSAGE {
                Some(Self::message)
            } else {
                None
            },
            iterate_devices: if T::HAS_ITERATE_DEVICES {
                Some(Self::iterate_devices)
            } else {
                None
            },
            io_hints: if T::HAS_IO_HINTS {
                Some(Self::io_hints)
            } else {
                None
            },
            ..Default::default()
        }
    }
}

/// A target type registered with device-mapper; unregistered on drop.
///
/// # Invariants
///
/// `tt` is registered with device-mapper for as long as `self` lives.
#[pin_data(PinnedDrop)]
pub(crate) struct Registration<T: TargetOperations> {
    #[pin]
    tt: Opaque<bindings::target_type>,
    _ops: PhantomData<T>,
}

// SAFETY: device-mapper serialises registration and lookup of target types internally; the
// `target_type` is not touched by us after registration.
unsafe impl<T: TargetOperations> Send for Registration<T> {}
// SAFETY: as above; `&Registration` gives no access to the `target_type`.
unsafe impl<T: TargetOperations> Sync for Registration<T> {}

impl<T: TargetOperations> Registration<T> {
    /// Registers target type `name`, version `version`, implemented by `T`.
    pub(crate) fn new(
        name: &'static CStr,
        version: [u32; 3],
        features: u64,
        module: &'static ThisModule,
    ) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            tt <- Opaque::try_ffi_init(move |slot: *mut bindings::target_type| {
                // SAFETY: `slot` is valid for writes and pinned for the life of `Self`.
                unsafe { slot.write(Callbacks::<T>::target_type(name, version, features, module)) };
                // SAFETY: `slot` is initialised and stays put until `drop` unregisters it.
                kernel::error::to_result(unsafe { bindings::dm_register_target(slot) })
            }),
            _ops: PhantomData,
        })
    }
}

#[pinned_drop]
impl<T: TargetOperations> PinnedDrop for Registration<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: `tt` was registered in `new` (type invariant) and is unregistered only here.
        unsafe { bindings::dm_unregister_target(self.tt.get()) };
    }
}
