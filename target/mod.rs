// SPDX-License-Identifier: GPL-2.0

//! Device-mapper, bio and DAX glue: the only part of dm-pcache-rs with `unsafe` and calls into C.
//!
//! The rest of the module sees safe types, in the shape of the kernel's own Rust drivers:
//! - [`target_type`]: the `#[vtable]` [`target_type::TargetOperations`] trait and its
//!   registration with device-mapper, withdrawn on drop;
//! - [`device`]: [`device::TargetDevice`], a `dm_get_device` reference that is put on drop;
//! - [`bio`]: [`bio::Bio`], the view of a bio that `map` and `end_io` get;
//! - [`dax`]: [`dax::DaxMapping`], the whole cache device mapped through DAX;
//! - [`args`] and [`status`]: the argument vectors and result buffers of `ctr`, `message` and
//!   `status`;
//! - [`table`]: the table-line and message grammar (pure, `core` only, fuzzed on the host);
//! - [`work`]: the target's workqueue and its work items;
//! - [`counters`]: [`counters::PerCpuCounters`], event counters kept per CPU.
//!
//! And the glue of a running cache, which holds no policy of its own: [`claim`] (which pmem
//! devices are in use), [`construct`] (parsing the table and opening the devices), [`engine`]
//! (the engine over the DAX mapping and the backing device), [`live`] (the shared engine and
//! wait queue), [`requests`] (bios in and out of the engine), [`miss`] (read misses in flight
//! to the backing device), [`background`] (the work item that runs the engine's background
//! rounds) and [`report`] (the status and table lines).

pub(crate) mod args;
pub(crate) mod background;
#[allow(
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    improper_ctypes,
    unused_imports,
    unreachable_pub,
    clippy::all,
    clippy::as_underscore,
    clippy::cast_lossless,
    clippy::ptr_as_ptr,
    clippy::ref_as_ptr,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn,
    missing_docs,
    rustdoc::all
)]
pub(crate) mod bindings;
pub(crate) mod bio;
pub(crate) mod claim;
pub(crate) mod construct;
pub(crate) mod counters;
pub(crate) mod cpu;
pub(crate) mod crc;
pub(crate) mod dax;
pub(crate) mod device;
pub(crate) mod engine;
pub(crate) mod live;
pub(crate) mod miss;
pub(crate) mod report;
pub(crate) mod requests;
pub(crate) mod status;
pub(crate) mod subtree_locks;
// `pub` so that the host crate can fuzz it; inside the module nothing outside the crate sees it.
#[allow(unreachable_pub)]
pub(crate) mod table;
pub(crate) mod target_type;
pub(crate) mod work;
