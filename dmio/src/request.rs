//! Requests: an operation, flags, a priority, memory and a notify callback.

use std::fmt;

use crate::memory::DmIoMemory;
use crate::notify::Notify;

/// The operation of a request (the kernel's `REQ_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmIoOp {
    /// Read one region into the memory (`REQ_OP_READ`).
    Read,
    /// Write the memory to up to 64 regions (`REQ_OP_WRITE`).
    Write,
    /// Discard the regions (`REQ_OP_DISCARD`); no memory.
    Discard,
    /// Zero the regions without sending data (`REQ_OP_WRITE_ZEROES`); no memory.
    WriteZeroes,
    /// Flush the volatile cache of every region's device (an empty
    /// `REQ_OP_WRITE | REQ_PREFLUSH`, named explicitly); no memory.
    Flush,
}

impl DmIoOp {
    /// Whether the operation changes the device (the kernel's `op_is_write`).
    pub fn is_write(self) -> bool {
        !matches!(self, DmIoOp::Read)
    }

    /// Whether the operation moves data through memory.
    pub fn has_data(self) -> bool {
        matches!(self, DmIoOp::Read | DmIoOp::Write)
    }
}

impl fmt::Display for DmIoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DmIoOp::Read => "read",
            DmIoOp::Write => "write",
            DmIoOp::Discard => "discard",
            DmIoOp::WriteZeroes => "write-zeroes",
            DmIoOp::Flush => "flush",
        })
    }
}

bitflags::bitflags! {
    /// Request flags (the kernel's `REQ_*` modifier bits).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ReqFlags: u32 {
        /// Flush each region's device before the data (`REQ_PREFLUSH`). With only
        /// zero-count regions, the request is a pure flush of every named device.
        const PREFLUSH = 1 << 0;
        /// Every write of the request reaches stable storage before it completes
        /// (`REQ_FUA`; `RWF_DSYNC` on the write).
        const FUA = 1 << 1;
        /// Synchronous-I/O hint (`REQ_SYNC`). Added to blocking calls as in the
        /// kernel; it has no further effect in userspace.
        const SYNC = 1 << 2;
        /// Metadata hint (`REQ_META`); recorded, no effect in userspace.
        const META = 1 << 3;
        /// Write each region untorn (`REQ_ATOMIC`, `RWF_ATOMIC`): a region that the
        /// device cannot write in one atomic operation is refused, never split.
        const ATOMIC = 1 << 4;
        /// For write-zeroes: keep the blocks allocated (`REQ_NOUNMAP`). On a file
        /// this is `FALLOC_FL_ZERO_RANGE` instead of a hole punch. A block device
        /// reports EOPNOTSUPP for the region: the kernel's only no-unmap zeroing
        /// call falls back to writing zero pages, which dm-io never does silently.
        const NOUNMAP = 1 << 5;
    }
}

/// The I/O priority stamped on every read and write operation of a request (the
/// kernel's `ioprio` argument of `dm_io()`; `sqe->ioprio` with io_uring, the
/// worker thread's `ioprio_set` with the sync engine). Flushes, discards and
/// write-zeroes carry no priority in userspace: io_uring's fsync and fallocate
/// opcodes have no field for it.
///
/// ```
/// use dmio::{IoPriority, IoPriorityClass};
/// let p = IoPriority::new(IoPriorityClass::BestEffort, 2);
/// assert_eq!(p.class(), IoPriorityClass::BestEffort);
/// assert_eq!(p.level(), 2);
/// assert_eq!(IoPriority::DEFAULT.raw(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IoPriority(u16);

/// The scheduling class of an [`IoPriority`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoPriorityClass {
    /// No class: the process's default (`IOPRIO_CLASS_NONE`).
    None,
    /// Real time (`IOPRIO_CLASS_RT`).
    RealTime,
    /// Best effort (`IOPRIO_CLASS_BE`).
    BestEffort,
    /// Idle (`IOPRIO_CLASS_IDLE`).
    Idle,
}

impl IoPriority {
    /// The default priority (`IOPRIO_DEFAULT`, class none, level 0).
    pub const DEFAULT: IoPriority = IoPriority(0);

    /// A priority of `class` at `level` (0 highest ... 7 lowest; clamped).
    pub fn new(class: IoPriorityClass, level: u8) -> IoPriority {
        let class = match class {
            IoPriorityClass::None => 0u16,
            IoPriorityClass::RealTime => 1,
            IoPriorityClass::BestEffort => 2,
            IoPriorityClass::Idle => 3,
        };
        IoPriority((class << 13) | u16::from(level.min(7)))
    }

    /// A priority from its raw `ioprio` value.
    pub const fn from_raw(raw: u16) -> IoPriority {
        IoPriority(raw)
    }

    /// The raw `ioprio` value.
    pub const fn raw(self) -> u16 {
        self.0
    }

    /// The class.
    pub fn class(self) -> IoPriorityClass {
        match self.0 >> 13 {
            1 => IoPriorityClass::RealTime,
            2 => IoPriorityClass::BestEffort,
            3 => IoPriorityClass::Idle,
            _ => IoPriorityClass::None,
        }
    }

    /// The level within the class.
    pub fn level(self) -> u8 {
        (self.0 & 0x7) as u8
    }
}

/// One dm-io request (the kernel's `struct dm_io_request` plus the `ioprio`
/// argument): what to do, with which flags and priority, on which memory, and
/// whom to notify. The regions are passed next to it, as in `dm_io()`.
///
/// ```
/// use dmio::{DmIoRequest, DmIoOp, ReqFlags, AlignedBuf};
/// let req = DmIoRequest::write(AlignedBuf::new(4096)).with_flags(ReqFlags::FUA);
/// assert_eq!(req.op, DmIoOp::Write);
/// let flush = DmIoRequest::flush();
/// assert!(flush.memory.is_none());
/// ```
#[derive(Debug)]
pub struct DmIoRequest {
    /// The operation.
    pub op: DmIoOp,
    /// Modifier flags.
    pub flags: ReqFlags,
    /// The I/O priority of every operation of the request.
    pub ioprio: IoPriority,
    /// The memory (reads and writes; data-less requests take none).
    pub memory: Option<DmIoMemory>,
    /// The completion callback of an asynchronous request (`None` for blocking calls).
    pub notify: Option<Notify>,
}

impl DmIoRequest {
    /// A request of `op` with no flags, default priority, no memory and no notify.
    pub fn new(op: DmIoOp) -> DmIoRequest {
        DmIoRequest {
            op,
            flags: ReqFlags::empty(),
            ioprio: IoPriority::DEFAULT,
            memory: None,
            notify: None,
        }
    }

    /// A read into `memory`.
    pub fn read(memory: impl Into<DmIoMemory>) -> DmIoRequest {
        Self::new(DmIoOp::Read).with_memory(memory)
    }

    /// A write of `memory`.
    pub fn write(memory: impl Into<DmIoMemory>) -> DmIoRequest {
        Self::new(DmIoOp::Write).with_memory(memory)
    }

    /// A flush of every region's device.
    pub fn flush() -> DmIoRequest {
        Self::new(DmIoOp::Flush)
    }

    /// A discard.
    pub fn discard() -> DmIoRequest {
        Self::new(DmIoOp::Discard)
    }

    /// A write-zeroes.
    pub fn write_zeroes() -> DmIoRequest {
        Self::new(DmIoOp::WriteZeroes)
    }

    /// Sets the memory.
    pub fn with_memory(mut self, memory: impl Into<DmIoMemory>) -> DmIoRequest {
        self.memory = Some(memory.into());
        self
    }

    /// Adds flags.
    pub fn with_flags(mut self, flags: ReqFlags) -> DmIoRequest {
        self.flags |= flags;
        self
    }

    /// Sets the I/O priority.
    pub fn with_ioprio(mut self, ioprio: IoPriority) -> DmIoRequest {
        self.ioprio = ioprio;
        self
    }

    /// Sets the notify callback.
    pub fn with_notify(mut self, notify: Notify) -> DmIoRequest {
        self.notify = Some(notify);
        self
    }

    /// Sets a one-shot closure as the notify callback.
    pub fn on_complete(
        self,
        f: impl FnOnce(crate::DmIoCompletion) + Send + 'static,
    ) -> DmIoRequest {
        self.with_notify(Notify::new(f))
    }
}
