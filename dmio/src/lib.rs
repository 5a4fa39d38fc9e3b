//! # dmio: the Linux dm-io service in userspace
//!
//! Synchronous and asynchronous block I/O to one or many regions of block
//! devices (or regular files) opened with `O_DIRECT`, through io_uring, with the
//! kernel dm-io's semantics: a read names one region, a write fans the same
//! memory out to up to 64 regions, one notification per request carries the
//! per-region error bits, flush and FUA pass through, discard and write-zeroes
//! report "not supported" per region, and a failed read leaves zeros, never stale
//! bytes, in the memory.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dmio::{AlignedBuf, BlockDevice, DmIoClient, DmIoRegion, DmIoRequest, ReqFlags};
//!
//! // Two "devices": regular files on a filesystem with O_DIRECT support.
//! let dir = tempfile::tempdir_in(std::env::temp_dir())?;
//! let open = |name: &str| -> Result<_, Box<dyn std::error::Error>> {
//!     let path = dir.path().join(name);
//!     std::fs::File::create(&path)?.set_len(4 << 20)?;
//!     Ok(BlockDevice::open(&path)?)
//! };
//! let (a, b) = (open("a.img")?, open("b.img")?);
//! let client = DmIoClient::new()?;
//!
//! // One write, fanned out to two regions, durable on completion (FUA).
//! let data = AlignedBuf::from_slice(&[0xc3; 64 * 1024]);
//! let regions = [DmIoRegion::new(&a, 0, 128), DmIoRegion::new(&b, 2048, 128)];
//! let done = client.io_sync(DmIoRequest::write(data).with_flags(ReqFlags::FUA), &regions)?;
//! assert!(done.error_bits.is_empty());
//!
//! // Read one of them back into pool pages.
//! let pages = client.page_pool().alloc_list(16);
//! let done = client.io_sync(DmIoRequest::read(pages), &[DmIoRegion::new(&b, 2048, 128)])?;
//! let bytes = done.into_result()?.unwrap().to_vec();
//! assert!(bytes.iter().all(|&x| x == 0xc3));
//! # Ok(()) }
//! ```
//!
//! ## Kernel names and their Rust counterparts
//!
//! | kernel (`include/linux/dm-io.h`) | dmio |
//! |---|---|
//! | `struct dm_io_client`, `dm_io_client_create()` | [`DmIoClient`], [`DmIoClient::new`], [`DmIoClient::with_config`] |
//! | `dm_io_client_destroy()` | [`DmIoClient::close`] / `Drop` (waits for in-flight I/O) |
//! | `struct dm_io_region { bdev, sector, count }` | [`DmIoRegion`] `{ device, sector, count }` |
//! | `struct block_device` | [`BlockDevice`] (block device or regular file, `O_DIRECT`) |
//! | `struct dm_io_request { bi_opf, mem, notify, client }` | [`DmIoRequest`] `{ op, flags, ioprio, memory, notify }` |
//! | `REQ_OP_READ` / `WRITE` / `DISCARD` / `WRITE_ZEROES` | [`DmIoOp::Read`] / [`Write`](DmIoOp::Write) / [`Discard`](DmIoOp::Discard) / [`WriteZeroes`](DmIoOp::WriteZeroes) |
//! | `REQ_OP_WRITE \| REQ_PREFLUSH` with `count = 0` | [`DmIoOp::Flush`], or a write with [`ReqFlags::PREFLUSH`] and zero-count regions |
//! | `REQ_PREFLUSH`, `REQ_FUA`, `REQ_SYNC`, `REQ_ATOMIC` | [`ReqFlags`] |
//! | `ioprio` argument | [`IoPriority`] |
//! | `struct dm_io_memory`, `DM_IO_PAGE_LIST` / `DM_IO_BIO` / `DM_IO_VMA` / `DM_IO_KMEM` | [`DmIoMemory`]`::{`[`PageList`], [`Bvec`], [`Vma`](DmIoMemory::Vma), [`Kmem`](DmIoMemory::Kmem)`}` |
//! | `struct page_list`, `struct bio_vec` | [`PageList`], [`BioVec`] |
//! | vmalloc'd area, kmalloc'd buffer | [`VirtualArea`], [`AlignedBuf`] |
//! | the client's mempool of `struct io` and bios | request slots ([`DmIoConfig::reserve`]) and op slots ([`DmIoConfig::ring_entries`]) |
//! | page mempool | [`PagePool`] (its reserve is registered with the ring) |
//! | `io_notify_fn(error_bits, context)`, `struct dm_io_notify` | [`Notify`], [`NotifyHandler`], [`CompletionState`], [`DmIoCompletion`] |
//! | `dm_io()` with `notify.fn` | [`DmIoClient::submit`] |
//! | `dm_io()` without `notify.fn`, `sync_error_bits` | [`DmIoClient::io_sync`], [`DmIoCompletion::error_bits`] |
//! | `unsigned long error_bits`, `DM_IO_MAX_REGIONS` | [`ErrorBits`], [`MAX_REGIONS`] |
//! | (none) | [`DmIoClient::submit_future`], [`DmIoFuture`] |
//!
//! ## Contracts
//!
//! - **Units.** Regions count 512-byte sectors, but each region's start and length
//!   must be multiples of its device's logical block size, and each memory
//!   segment must meet the device's direct-I/O alignment. Both are probed
//!   ([`DeviceInfo`]), never assumed, and checked before submission: the kernel
//!   does not reliably reject misaligned direct I/O.
//! - **Validation.** Bad input ([`DmIoError`]) is reported before anything is
//!   submitted; the callback is then not called (as in current kernels).
//! - **Ownership.** An asynchronous request owns its memory and hands it back in
//!   the completion, so nothing the kernel still uses can be freed or read.
//! - **Completion.** Exactly one notification per request, after every operation
//!   of every region completed; bit *i* of [`ErrorBits`] is region *i*. Callbacks
//!   run on the client's completion thread and must not block.
//! - **Backpressure.** When all request slots are busy, submission waits for one;
//!   it never allocates and never fails for lack of resources. In steady state a
//!   request allocates nothing on the heap (with a [`Notify::shared`] handler).
//! - **Userspace facts.** Short transfers are resubmitted from the last block
//!   boundary; `EINTR`, `EAGAIN` and `EBUSY` are retried; a full ring waits.
//!   Where io_uring cannot be set up, the sync engine (worker threads) serves, with
//!   one line on standard error saying why; `DMIO_ENGINE=sync` forces it.
//!
//! ## Where dmio differs from the kernel
//!
//! - Flush is also a named operation ([`DmIoOp::Flush`]); a PREFLUSH is sent once
//!   per distinct device of the request and completes before any data is written.
//!   A failed preflush fails every region on that device and their data is not
//!   written.
//! - More than 64 regions, or a read with several, is an error, not a crash or a
//!   warning. An atomic write ([`ReqFlags::ATOMIC`]) that would need splitting is
//!   refused before submission, and a short atomic transfer fails instead of
//!   being completed in pieces.
//! - The error bits come with the errno and sector of each failure
//!   ([`RegionFailure`]).
//! - A request refused by validation is dropped (its memory with it) and its
//!   callback is not called; pool pages go back to their pool on drop.
//! - Zero-count regions are never checked for alignment or range: no data moves
//!   through them (they only name a device to flush).
//! - FUA on a regular file is `RWF_DSYNC`; discard and write-zeroes on a regular
//!   file punch holes (write-zeroes with [`ReqFlags::NOUNMAP`] uses
//!   `FALLOC_FL_ZERO_RANGE`). On a block device, write-zeroes is
//!   `fallocate(PUNCH_HOLE)`, which never falls back to writing zero pages; a
//!   NOUNMAP write-zeroes is reported as EOPNOTSUPP there, because the kernel's
//!   only no-unmap zeroing call does fall back.
//! - The I/O priority is carried by reads and writes only: userspace flushes,
//!   discards and write-zeroes have no priority field.
//! - A read-write open of a read-only block device fails at open
//!   ([`DmIoError::DeviceReadOnly`]) rather than at the first write.
//!
//! ## Threads and performance
//!
//! Each client has one completion thread. It owns the io_uring (created with
//! `SINGLE_ISSUER | DEFER_TASKRUN`), turns requests into operations, submits them
//! in batches with one `io_uring_enter`, reaps completions and runs callbacks.
//! Requests submitted from a callback go straight back into the same loop, so a
//! callback-driven pipeline never crosses threads; requests from other threads are
//! handed over through a preallocated queue and an eventfd wake-up. With many
//! operations in flight the thread waits for a batch of completions (bounded to
//! a few microseconds once one has arrived, on Linux 6.12 and later) rather than
//! waking for each one. The client's page pool is registered with the ring, so
//! single-page and contiguous transfers from it use the fixed-buffer opcodes.
//! Measured against fio in `BENCHMARKS.md`.
//!
//! ## Features
//!
//! - `fault-injection`: the [`fault`] module: per-device failure rules, dropped
//!   writes, delays, short transfers, limit overrides, an operation trace and a
//!   write log that rebuilds the device image as of any entry.

#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod client;
mod device;
mod dispatch;
mod engine;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod loopdev;
mod memory;
mod notify;
mod region;
mod request;
mod sys;

pub use client::{ClientStats, DmIoClient, DmIoConfig, SubmitRefused, in_notify_callback};
pub use device::{
    AlignmentSource, BlockDevice, DeviceInfo, DeviceKind, DeviceOptions, SECTOR_SIZE, ZonedModel,
};
pub use engine::{EngineChoice, EngineKind};
pub use error::{DmIoError, Errno, ErrorBits, MAX_REGIONS, RegionFailure, RegionFailures};
pub use memory::{
    AlignedBuf, BioVec, Bvec, DmIoMemory, PAGE_SIZE, Page, PageList, PagePool, VirtualArea,
};
pub use notify::{CompletionState, DmIoCompletion, DmIoFuture, Notify, NotifyHandler};
pub use region::DmIoRegion;
pub use request::{DmIoOp, DmIoRequest, IoPriority, IoPriorityClass, ReqFlags};

/// The channel crate used by [`Notify::channel`], re-exported so that callers
/// use the same version.
pub use crossbeam_channel;
