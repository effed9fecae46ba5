//! The bdev interface: a block device, and the per-reactor I/O channel through which requests are
//! submitted and, by polling, completed.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use hugepages::DmaBuf;

use crate::in_place::InPlaceRead;
use rustix::event::epoll;
use smallvec::SmallVec;

/// The buffers of one request, in order (a vectored request has several).
pub type IoBufs = SmallVec<[DmaBuf; 2]>;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read `len` bytes at `offset` into the buffers.
    Read,
    /// Write the buffers' `len` bytes at `offset`; `fua` makes them durable before completion.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Make `len` bytes at `offset` read back as zeroes; with `deallocate` the bdev may also
    /// release their space (a punched hole, NVMe's DEAC), without it they stay allocated where
    /// they were (NBD's NO_HOLE).
    WriteZeroes {
        /// The range may be deallocated.
        deallocate: bool,
    },
    /// Discard `len` bytes at `offset`; they read back as unspecified data.
    Unmap,
}

impl IoOp {
    /// True for the operations that carry data buffers.
    pub fn has_data(self) -> bool {
        matches!(self, IoOp::Read | IoOp::Write { .. })
    }

    /// True for operations that change the medium.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            IoOp::Write { .. } | IoOp::WriteZeroes { .. } | IoOp::Unmap
        )
    }
}

/// One I/O request. `tag` is the submitter's key (a slab index), returned in the completion.
#[derive(Debug)]
pub struct IoRequest {
    /// The operation.
    pub op: IoOp,
    /// Byte offset on the device; a multiple of the block size.
    pub offset: u64,
    /// Byte length; a multiple of the block size. For reads and writes the buffers' lengths
    /// add up to it.
    pub len: u64,
    /// Data buffers (reads and writes only).
    pub bufs: IoBufs,
    /// The submitter's key.
    pub tag: u64,
}

impl IoRequest {
    /// A read of `bufs`' total length at `offset`.
    pub fn read(offset: u64, bufs: IoBufs, tag: u64) -> Self {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        Self {
            op: IoOp::Read,
            offset,
            len,
            bufs,
            tag,
        }
    }

    /// A write of `bufs` at `offset`.
    pub fn write(offset: u64, bufs: IoBufs, tag: u64) -> Self {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        Self {
            op: IoOp::Write { fua: false },
            offset,
            len,
            bufs,
            tag,
        }
    }

    /// A request without data (flush, write-zeroes, unmap).
    pub fn without_data(op: IoOp, offset: u64, len: u64, tag: u64) -> Self {
        Self {
            op,
            offset,
            len,
            bufs: IoBufs::new(),
            tag,
        }
    }
}

/// A finished request: its tag, its outcome and its buffers back.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Success, or why it failed.
    pub result: Result<(), IoError>,
    /// The request's buffers (for a read, now holding the data).
    pub bufs: IoBufs,
}

/// Why one request failed. Failing one request never affects another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The range reaches past the end of the device.
    #[error("range {offset}+{len} is beyond the end of the device ({size} bytes)")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },
    /// Offset or length is not a multiple of the block size.
    #[error("range {offset}+{len} is not aligned to the block size {block_size}")]
    Unaligned {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Device block size.
        block_size: u32,
    },
    /// The buffers do not add up to the request's length, or a buffer is misaligned.
    #[error("the buffers ({buffers} bytes) do not match the request length {len}")]
    BufferMismatch {
        /// Bytes the buffers hold.
        buffers: u64,
        /// Bytes the request names.
        len: u64,
    },
    /// The device or view does not accept writes.
    #[error("the device is read-only")]
    ReadOnly,
    /// The driver cannot perform this operation.
    #[error("operation not supported by this device")]
    NotSupported,
    /// The device reported an error (an errno).
    #[error("device I/O error: {}", std::io::Error::from_raw_os_error(*.0))]
    Device(i32),
    /// The request was cancelled before it ran (device removed, reset).
    #[error("request aborted: {0}")]
    Aborted(String),
    /// A layer above the device refused the request (a pair state, for example).
    #[error("{0}")]
    Refused(String),
}

impl IoError {
    /// The errno a protocol server reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::OutOfRange { .. } | IoError::Unaligned { .. } => libc::EINVAL,
            IoError::BufferMismatch { .. } => libc::EINVAL,
            IoError::ReadOnly => libc::EPERM,
            IoError::NotSupported => libc::EOPNOTSUPP,
            IoError::Device(e) => *e,
            IoError::Aborted(_) => libc::EIO,
            IoError::Refused(_) => libc::EPERM,
        }
    }
}

/// Why a submission was not accepted. The request comes back so nothing is lost.
#[derive(Debug)]
pub struct SubmitError {
    /// `QueueFull` is retryable once completions have been polled; anything else is final.
    pub error: SubmitErrorKind,
    /// The request, untouched.
    pub req: IoRequest,
}

/// The two kinds of submission failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitErrorKind {
    /// No room in the queue now: poll completions and submit again.
    QueueFull,
    /// The request itself is invalid for this device.
    Invalid(IoError),
}

/// Result of `submit`.
pub type SubmitResult = Result<(), Box<SubmitError>>;

/// Rejects `req` as invalid.
pub fn invalid(req: IoRequest, error: IoError) -> SubmitResult {
    Err(Box::new(SubmitError {
        error: SubmitErrorKind::Invalid(error),
        req,
    }))
}

/// Says the queue is full.
pub fn queue_full(req: IoRequest) -> SubmitResult {
    Err(Box::new(SubmitError {
        error: SubmitErrorKind::QueueFull,
        req,
    }))
}

/// A bdev's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block (a power of two, at least 512).
    pub block_size: u32,
    /// Number of blocks.
    pub num_blocks: u64,
}

impl Geometry {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }

    /// Checks that `len` bytes at `offset` are whole blocks inside the device.
    pub fn validate_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(IoError::Unaligned {
                offset,
                len,
                block_size: self.block_size,
            });
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(IoError::OutOfRange { offset, len, size }),
        }
    }

    /// Checks alignment, range and buffer lengths of a request against this geometry.
    pub fn validate(&self, req: &IoRequest) -> Result<(), IoError> {
        if req.op == IoOp::Flush {
            return Ok(());
        }
        self.validate_range(req.offset, req.len)?;
        if req.op.has_data() {
            let buffers: u64 = req.bufs.iter().map(|b| b.len() as u64).sum();
            if buffers != req.len || req.len == 0 {
                return Err(IoError::BufferMismatch {
                    buffers,
                    len: req.len,
                });
            }
        }
        Ok(())
    }
}

/// The epoll set a reactor parks on, shared with what runs on it: a descriptor watched here
/// wakes the parked reactor while it is readable. Clones share the one set.
#[derive(Debug, Clone)]
pub struct FdWatch {
    epoll: Arc<OwnedFd>,
}

impl FdWatch {
    /// A new, empty epoll set.
    pub fn new() -> std::io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        Ok(Self {
            epoll: Arc::new(epoll),
        })
    }

    /// Wakes the reactor while `fd` has input or its peer has hung up (level-triggered); the
    /// event carries the descriptor's number.
    pub fn watch(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        epoll::add(
            &*self.epoll,
            fd,
            epoll::EventData::new_u64(fd.as_raw_fd() as u64),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        )?;
        Ok(())
    }

    /// Has a watched `fd` also wake the reactor while it can be written as long as `unsent`
    /// (output waits for room in its socket), and no longer once it is not: the reactor that
    /// parked wakes as soon as the peer has read, and a peer that reads nothing still costs
    /// nothing. `watching` is the caller's record of what the set holds for `fd`, so the set
    /// changes only when that does; a change that fails is tried again on the next call.
    pub fn watch_output(&self, fd: BorrowedFd<'_>, unsent: bool, watching: &mut bool) {
        if unsent == *watching {
            return;
        }
        let mut flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        if unsent {
            flags |= epoll::EventFlags::OUT;
        }
        let data = epoll::EventData::new_u64(fd.as_raw_fd() as u64);
        match epoll::modify(&*self.epoll, fd, data, flags) {
            Ok(()) => *watching = unsent,
            Err(e) => tracing::debug!(%e, "epoll modify for output failed"),
        }
    }

    /// Stops watching `fd` (nothing if it was not watched). Call it before `fd` is closed: its
    /// number may be reused by another descriptor watched on the same reactor.
    pub fn unwatch(&self, fd: BorrowedFd<'_>) {
        let _ = epoll::delete(&*self.epoll, fd);
    }
}

/// The epoll descriptor itself, for the reactor that waits on it.
impl AsFd for FdWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

/// What a reactor gives a channel it opens.
#[derive(Debug, Clone, Default)]
pub struct ChannelContext {
    /// The reactor's eventfd: drivers whose completions arrive asynchronously signal it so a
    /// parked reactor wakes up.
    pub wake_fd: Option<RawFd>,
    /// The reactor's epoll set: drivers whose completions arrive on a socket watch it there
    /// (and stop before closing it) so a parked reactor wakes up when it is readable.
    pub fd_watch: Option<FdWatch>,
    /// Queue depth the channel should support.
    pub queue_depth: u32,
}

/// What a range of a bdev holds, as an allocation query answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data, or nothing is known: read it to know.
    Data,
    /// Stored, and reads as zeroes.
    Zero,
    /// Not stored (a hole of a sparse file): reads as zeroes, and writing it may need space.
    Hole,
}

/// A run of bytes in one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run (never 0).
    pub len: u64,
    /// Their state.
    pub allocation: Allocation,
}

/// Most extents one allocation query looks up: it runs on a reactor, so its work is bounded
/// and the caller asks again from where the answer ends.
pub const MAX_QUERY_EXTENTS: usize = 128;

/// Appends `len` bytes in state `allocation` to `out`, lengthening the last extent when it is
/// in the same state.
pub fn push_extent(out: &mut Vec<Extent>, len: u64, allocation: Allocation) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.allocation == allocation => last.len += len,
        _ => out.push(Extent { len, allocation }),
    }
}

/// A reactor's private queue to a bdev. Not shared between threads: no lock on the data path.
pub trait IoChannel {
    /// Queues a request. It runs once the channel is polled (or sooner).
    fn submit(&mut self, req: IoRequest) -> SubmitResult;
    /// Moves finished requests into `out`; returns how many it added.
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize;
    /// Requests submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
    /// True when the device is memory the CPU reaches directly (a RAM disk), so that
    /// [`IoChannel::read_in_place`] and [`IoChannel::write_in_place`] work: a caller holding
    /// write data elsewhere (a socket's receive buffer), or sending read data (to a socket),
    /// needs no copy through a staging buffer.
    fn in_place(&self) -> bool {
        false
    }
    /// The device memory holding `len` bytes at `offset`, to send from directly; it reads what
    /// the memory holds when it is sent (whole blocks, see [`crate::in_place`]). `None` when the
    /// device is not memory.
    fn read_in_place(&mut self, _offset: u64, _len: u64) -> Option<Result<InPlaceRead, IoError>> {
        None
    }
    /// Writes `data` at `offset` before returning, taking it from any memory. `None` when the
    /// device is not memory.
    fn write_in_place(&mut self, _offset: u64, _data: &[u8]) -> Option<Result<(), IoError>> {
        None
    }
    /// Counts this channel's requests in `stats` too, besides what it already counts in: true
    /// when the channel counts (one count serves two views, an export's and its bdev's, at the
    /// cost of one), false when it does not count at all (the caller wraps it).
    fn count_also(&mut self, _stats: &Arc<crate::iostat::IoStats>) -> bool {
        false
    }
}

/// A block device.
pub trait Bdev: Send + Sync {
    /// Unique name.
    fn name(&self) -> &str;
    /// Driver name as `bdev_get_bdevs` reports it.
    fn driver(&self) -> &'static str;
    /// Block size and count.
    fn geometry(&self) -> Geometry;
    /// Opens the calling reactor's channel.
    fn open_channel(&self, ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError>;
    /// Opens the calling reactor's channel, its requests counted in `stats`. Drivers on the
    /// fastest paths wrap their own channel type ([`crate::iostat::counted_direct`]).
    fn open_counted_channel(
        &self,
        ctx: &ChannelContext,
        stats: &Arc<crate::iostat::IoStats>,
    ) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(crate::iostat::counted(self.open_channel(ctx)?, stats))
    }
    /// Driver-specific parameters `save_config` records to create it again.
    fn config(&self) -> serde_json::Value;
    /// A byte boundary requests should not cross with one buffer (a pair's track size): users
    /// split their buffers on it so no data has to be staged and copied.
    fn io_boundary(&self) -> Option<u64> {
        None
    }
    /// The file or block device holding the data, for bdevs that have one: the engine refuses
    /// to open it a second time or to write a backup over it.
    fn backing_file(&self) -> Option<&std::path::Path> {
        None
    }
    /// How `len` bytes at `offset` (whole blocks inside the device, checked by the caller) are
    /// stored: extents appended to `out` (through [`push_extent`]) that cover the range from
    /// `offset` on, all of it or, when looking further would take long, a non-empty part of
    /// it. Called on reactors: it does not wait for I/O and looks up at most about
    /// [`MAX_QUERY_EXTENTS`] extents. Drivers that cannot tell answer "data" (the default).
    fn allocation(&self, _offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), IoError> {
        push_extent(out, len, Allocation::Data);
        Ok(())
    }
}

/// Errors creating, opening or deleting bdevs.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// A name is used twice.
    #[error("a bdev named '{0}' already exists")]
    Exists(String),
    /// No bdev has that name.
    #[error("no bdev named '{0}'")]
    NotFound(String),
    /// The bdev is in use.
    #[error("bdev '{name}' is claimed by {by}")]
    Claimed {
        /// The bdev.
        name: String,
        /// Who holds it.
        by: String,
    },
    /// A parameter is unusable.
    #[error("invalid parameter: {0}")]
    Invalid(String),
    /// The OS refused something.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// DMA memory could not be had.
    #[error(transparent)]
    Dma(#[from] hugepages::DmaError),
    /// The driver is not available on this machine or build.
    #[error("{0}")]
    Unavailable(String),
    /// The file is locked by another open of it (another process, or qemu).
    #[error(transparent)]
    Locked(#[from] crate::file_lock::LockError),
}

impl BdevError {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        BdevError::Io {
            what: what.into(),
            source,
        }
    }
}
