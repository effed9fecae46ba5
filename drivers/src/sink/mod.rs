//! Backup targets ("sinks"): where a backup job streams the image. Each is polled on a reactor
//! like an I/O channel: the job submits the image's bytes in order, straight from its DMA
//! buffers, and gets the buffers back with the outcome.
//!
//! - [`file::FileSink`]: a raw image in a file or block device, through io_uring;
//! - [`tape::TapeSink`]: a pax archive in fixed records (see [`crate::tape`]) on a file standing
//!   for a tape;
//! - [`tape_device::TapeDeviceSink`]: the same archive on a tape device or a pipe, in exact
//!   records;
//! - [`nbd::NbdSink`]: an NBD server's export;
//! - [`nvmf::NvmfSink`]: a namespace of an NVMe/TCP subsystem.

pub mod file;
pub mod image_mark;
pub mod nbd;
pub mod nvmf;
pub mod partial;
pub mod tape;
pub mod tape_device;

use crate::tape::Manifest;
use crate::{IoBufs, IoChannel, IoError, IoRequest, SubmitErrorKind};

/// One submission finished (a write of zeroes comes back with no buffers).
#[derive(Debug)]
pub struct SinkDone {
    /// Image offset of the submission.
    pub offset: u64,
    /// Its bytes.
    pub len: u64,
    /// The buffers, back.
    pub bufs: IoBufs,
    /// Written, or why not.
    pub result: Result<(), IoError>,
}

/// Why a sink could not take a submission now.
#[derive(Debug)]
pub enum SinkFull {
    /// Poll and submit again (the buffers come back).
    Busy(IoBufs),
    /// The sink failed; it will take nothing more.
    Failed(IoError, IoBufs),
}

/// A backup target.
pub trait Sink {
    /// Writes the next `bufs` of the image at `offset` (offsets arrive in increasing order).
    fn submit(&mut self, offset: u64, bufs: IoBufs) -> Result<(), SinkFull>;
    /// Writes zeroes over `len` bytes of the image at `offset` (a full backup's holes on a
    /// target that keeps what it held): the target writes no data it is sent. Comes back as a
    /// [`SinkDone`] without buffers.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), SinkFull> {
        let _ = (offset, len);
        Err(SinkFull::Failed(
            IoError::Refused(format!("{} cannot write zeroes", self.describe())),
            IoBufs::new(),
        ))
    }
    /// Moves finished submissions into `out`.
    fn poll(&mut self, out: &mut Vec<SinkDone>);
    /// Submissions not yet returned.
    fn in_flight(&self) -> usize;
    /// Every byte of the image was written: close the backup (the tape's final manifest and
    /// end marks) and make it durable. `finished` reports when that is done.
    fn finish(&mut self, manifest: &Manifest) -> Result<(), IoError>;
    /// `Some` once `finish` completed (or failed).
    fn finished(&mut self) -> Option<Result<(), IoError>>;
    /// Where the backup went (for logs and `backup_get`).
    fn describe(&self) -> String;
    /// The job was cancelled or failed: leave nothing that could pass for a complete backup.
    fn abandon(&mut self);
    /// The socket whose input (a reply) means the sink has work, for a parked reactor to
    /// wake on; none for sinks whose completions wake the reactor themselves (io_uring).
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Payload bytes the sink copied with the CPU (0 for sinks that write from the buffers).
    fn cpu_copied_bytes(&self) -> u64 {
        0
    }
}

/// Submits a write of `len` zeroes at `at` on a channel, tagged `tag`, in the sinks' terms.
pub(crate) fn submit_zeroes(
    channel: &mut dyn IoChannel,
    at: u64,
    len: u64,
    tag: u64,
) -> Result<(), SinkFull> {
    channel
        .submit(IoRequest::without_data(
            crate::IoOp::WriteZeroes { deallocate: true },
            at,
            len,
            tag,
        ))
        .map_err(|e| {
            let e = *e;
            match e.error {
                SubmitErrorKind::QueueFull => SinkFull::Busy(e.req.bufs),
                SubmitErrorKind::Invalid(err) => SinkFull::Failed(err, e.req.bufs),
            }
        })
}

/// Submits a write of `bufs` at `at` on a channel, tagged `tag`, in the sinks' terms: a full
/// queue gives the buffers back to retry, an invalid request fails the sink.
pub(crate) fn submit_write(
    channel: &mut dyn IoChannel,
    at: u64,
    bufs: IoBufs,
    tag: u64,
) -> Result<(), SinkFull> {
    channel
        .submit(IoRequest::write(at, bufs, tag))
        .map_err(|e| {
            let e = *e;
            match e.error {
                SubmitErrorKind::QueueFull => SinkFull::Busy(e.req.bufs),
                SubmitErrorKind::Invalid(err) => SinkFull::Failed(err, e.req.bufs),
            }
        })
}
