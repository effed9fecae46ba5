//! The tape target on a real tape device (`/dev/nst0`) or a pipe: the same pax archive as
//! [`super::tape::TapeSink`], written strictly in order in records of exactly `record_size`
//! bytes, one `writev` per record, by a writer thread (tape I/O blocks for long; it never runs
//! on a reactor). A tape device gets a filemark at the end (MTIOCTOP MTWEOF).
//!
//! Records come straight from the backup's DMA buffers. Where a piece of the image ends inside a
//! record, the few bytes left over are kept in a carry buffer and start the next record (those
//! bytes are copied by the CPU and counted); with the default record size and 1 MiB pieces that
//! happens only at the end of the image.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Sink, SinkDone, SinkFull};
use crate::tape::{self, Layout, Manifest};
use crate::{IoBufs, IoError};

/// Pieces queued for the writer thread at most.
const QUEUE: usize = 64;

enum Work {
    Piece(u64, IoBufs),
    Finish(Vec<u8>),
}

enum Done {
    Piece(SinkDone),
    Finished(Result<(), IoError>),
}

/// A tape device or pipe target.
pub struct TapeDeviceSink {
    path: PathBuf,
    record_size: usize,
    mtime: u64,
    /// The ranges of the image the archive stores, written back to back.
    layout: Layout,
    /// Where the next piece starts in the stored data: pieces come in order.
    next_data: u64,
    work: Option<SyncSender<Work>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
    finished: Option<Result<(), IoError>>,
    failed: Option<IoError>,
    copied: Arc<AtomicU64>,
}

/// True when `path` is a character device (a tape) or a FIFO: written in order, in records.
pub fn is_sequential(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_char_device() || m.file_type().is_fifo())
        .unwrap_or(false)
}

impl TapeDeviceSink {
    /// Starts the writer thread, which opens the device (a pipe's open waits for its reader,
    /// a tape's may rewind: neither on a reactor) and writes the prologue. `stored` are the
    /// ranges of the image the archive holds (see [`super::tape::TapeSink::open`]).
    pub fn open(
        path: &Path,
        initial: &Manifest,
        record_size: usize,
        stored: &[Range<u64>],
    ) -> Result<Self, String> {
        let layout = Layout::new(initial.volume_size, stored)?;
        let mtime = initial.created_at_ns / 1_000_000_000;
        let prologue =
            tape::prologue(initial, &layout, record_size, mtime).map_err(|e| e.to_string())?;
        let (work_tx, work_rx) = sync_channel(QUEUE);
        let (done_tx, done_rx) = sync_channel(QUEUE * 2);
        let copied = Arc::new(AtomicU64::new(0));
        let (target, counter) = (path.to_path_buf(), Arc::clone(&copied));
        let thread = std::thread::Builder::new()
            .name("tape_writer".into())
            .spawn(move || {
                let writer = OpenOptions::new().write(true).open(&target).map(|file| {
                    let tape = file
                        .metadata()
                        .map(|m| m.file_type().is_char_device())
                        .unwrap_or(false);
                    Writer {
                        file,
                        tape,
                        record_size,
                        carry: Vec::new(),
                        copied: counter,
                    }
                });
                match writer {
                    Ok(w) => {
                        let first = w.stream(&prologue).map_err(|e| io_error(&e));
                        w.run(work_rx, done_tx, first.err());
                    }
                    Err(e) => fail_all(work_rx, done_tx, io_error(&e)),
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            path: path.to_path_buf(),
            record_size,
            mtime,
            layout,
            next_data: 0,
            work: Some(work_tx),
            done: done_rx,
            thread: Some(thread),
            in_flight: 0,
            finished: None,
            failed: None,
            copied,
        })
    }

    /// Payload bytes copied into carry buffers so far.
    pub fn cpu_copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}

impl Sink for TapeDeviceSink {
    fn submit(&mut self, offset: u64, bufs: IoBufs) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), bufs));
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let last = offset + len.max(1) - 1;
        if self.layout.data_offset(offset) != Some(self.next_data)
            || self.layout.data_offset(last) != Some(self.next_data + len.max(1) - 1)
        {
            let why = format!(
                "image bytes {offset}..{} are not the next stored bytes of the archive (from {} \
                 of {})",
                offset + len,
                self.next_data,
                self.layout.stored_bytes()
            );
            return Err(SinkFull::Failed(IoError::Refused(why), bufs));
        }
        let Some(tx) = self.work.as_ref() else {
            return Err(SinkFull::Failed(
                IoError::Aborted("the tape writer stopped".into()),
                bufs,
            ));
        };
        match tx.try_send(Work::Piece(offset, bufs)) {
            Ok(()) => {
                self.in_flight += 1;
                self.next_data += len;
                Ok(())
            }
            Err(std::sync::mpsc::TrySendError::Full(Work::Piece(_, bufs))) => {
                Err(SinkFull::Busy(bufs))
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(Work::Piece(_, bufs))) => Err(
                SinkFull::Failed(IoError::Aborted("the tape writer stopped".into()), bufs),
            ),
            Err(_) => Err(SinkFull::Busy(IoBufs::new())),
        }
    }

    fn poll(&mut self, out: &mut Vec<SinkDone>) {
        loop {
            match self.done.try_recv() {
                Ok(Done::Piece(d)) => {
                    self.in_flight -= 1;
                    if let Err(e) = &d.result {
                        self.failed.get_or_insert(e.clone());
                    }
                    out.push(d);
                }
                Ok(Done::Finished(r)) => self.finished = Some(r),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if self.finished.is_none() && self.work.is_none() {
                        self.finished =
                            Some(Err(IoError::Aborted("the tape writer stopped".into())));
                    }
                    break;
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn finish(&mut self, manifest: &Manifest) -> Result<(), IoError> {
        let epilogue = tape::epilogue(manifest, &self.layout, self.record_size, self.mtime)
            .map_err(|e| IoError::Refused(format!("archive epilogue: {e}")))?;
        let tx = self
            .work
            .take()
            .ok_or_else(|| IoError::Aborted("the tape writer stopped".into()))?;
        tx.send(Work::Finish(epilogue))
            .map_err(|_| IoError::Aborted("the tape writer stopped".into()))
    }

    fn finished(&mut self) -> Option<Result<(), IoError>> {
        self.finished.clone()
    }

    fn describe(&self) -> String {
        format!("tape device {}", self.path.display())
    }

    fn abandon(&mut self) {
        // No final manifest and no end marks are written: the archive is visibly truncated.
        self.work = None;
    }

    fn cpu_copied_bytes(&self) -> u64 {
        TapeDeviceSink::cpu_copied_bytes(self)
    }
}

impl Drop for TapeDeviceSink {
    fn drop(&mut self) {
        self.work = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    file: File,
    tape: bool,
    record_size: usize,
    /// Image bytes that start the next record (less than a record).
    carry: Vec<u8>,
    copied: Arc<AtomicU64>,
}

fn io_error(e: &std::io::Error) -> IoError {
    IoError::Device(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The device could not be opened: every piece and the finish fail with the error.
fn fail_all(work: Receiver<Work>, done: SyncSender<Done>, e: IoError) {
    while let Ok(w) = work.recv() {
        let d = match w {
            Work::Piece(offset, bufs) => Done::Piece(SinkDone {
                offset,
                len: bufs.iter().map(|b| b.len() as u64).sum(),
                bufs,
                result: Err(e.clone()),
            }),
            Work::Finish(_) => Done::Finished(Err(e.clone())),
        };
        if done.send(d).is_err() {
            return;
        }
    }
}

impl Writer {
    /// Writes archive metadata (a multiple of the record size, or the end): record by record.
    fn stream(&self, bytes: &[u8]) -> std::io::Result<()> {
        for record in bytes.chunks(self.record_size) {
            self.write_record(&[IoSlice::new(record)])?;
        }
        Ok(())
    }

    fn run(mut self, work: Receiver<Work>, done: SyncSender<Done>, first: Option<IoError>) {
        let mut failed: Option<IoError> = first;
        while let Ok(w) = work.recv() {
            match w {
                Work::Piece(offset, bufs) => {
                    let len = bufs.iter().map(|b| b.len() as u64).sum();
                    let result = match &failed {
                        Some(e) => Err(e.clone()),
                        None => self.piece(&bufs).map_err(|e| io_error(&e)),
                    };
                    if let Err(e) = &result {
                        failed.get_or_insert(e.clone());
                    }
                    let d = SinkDone {
                        offset,
                        len,
                        bufs,
                        result,
                    };
                    if done.send(Done::Piece(d)).is_err() {
                        return;
                    }
                }
                Work::Finish(epilogue) => {
                    let r = match failed {
                        Some(e) => Err(e),
                        None => self.finish(&epilogue).map_err(|e| io_error(&e)),
                    };
                    let _ = done.send(Done::Finished(r));
                    return;
                }
            }
        }
    }

    /// Writes every whole record the carry and this piece make; keeps the rest as carry.
    fn piece(&mut self, bufs: &IoBufs) -> std::io::Result<()> {
        let rs = self.record_size;
        let parts: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        let total: usize = self.carry.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        let whole = total / rs * rs;
        // Walk the bytes record by record: carry first, then the buffers.
        let (mut bi, mut bo) = (0usize, 0usize);
        let mut written = 0;
        while written < whole {
            let mut iov: Vec<IoSlice<'_>> = Vec::new();
            let mut need = rs;
            if written == 0 && !self.carry.is_empty() {
                iov.push(IoSlice::new(&self.carry));
                need -= self.carry.len();
            }
            while need > 0 {
                let p = parts[bi];
                let n = (p.len() - bo).min(need);
                iov.push(IoSlice::new(&p[bo..bo + n]));
                need -= n;
                bo += n;
                if bo == p.len() {
                    bi += 1;
                    bo = 0;
                }
            }
            self.write_record(&iov)?;
            written += rs;
        }
        // What is left (less than a record) becomes the carry.
        let mut rest = Vec::with_capacity(rs);
        if whole == 0 {
            rest.extend_from_slice(&self.carry);
        }
        let mut copied = 0;
        while bi < parts.len() {
            rest.extend_from_slice(&parts[bi][bo..]);
            copied += parts[bi].len() - bo;
            bi += 1;
            bo = 0;
        }
        self.copied.fetch_add(copied as u64, Ordering::Relaxed);
        self.carry = rest;
        Ok(())
    }

    fn write_record(&self, iov: &[IoSlice<'_>]) -> std::io::Result<()> {
        let want: usize = iov.iter().map(|s| s.len()).sum();
        let n = rustix::io::writev(&self.file, iov)?;
        if n != want {
            // A tape writes a record whole or not at all; a pipe may take part of it.
            if self.tape {
                return Err(std::io::Error::other(format!(
                    "short tape record: {n} of {want} bytes"
                )));
            }
            let mut bytes: Vec<u8> = Vec::with_capacity(want - n);
            let mut skip = n;
            for s in iov {
                if skip >= s.len() {
                    skip -= s.len();
                } else {
                    bytes.extend_from_slice(&s[skip..]);
                    skip = 0;
                }
            }
            use std::io::Write;
            (&self.file).write_all(&bytes)?;
        }
        Ok(())
    }

    fn finish(&mut self, epilogue: &[u8]) -> std::io::Result<()> {
        let mut tail = std::mem::take(&mut self.carry);
        tail.extend_from_slice(epilogue);
        // Everything after the final manifest is zeroes: the end-of-archive marker, then
        // padding to the record grid.
        let marker_start = tail
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| (i + 1).next_multiple_of(512));
        for (i, record) in tail.chunks(self.record_size).enumerate() {
            if let Err(e) = self.write_record(&[IoSlice::new(record)]) {
                // A pipe's reader (tar) stops once it has seen the end marker; the rest is
                // padding nobody needs.
                let end = (i + 1) * self.record_size;
                if !self.tape && e.raw_os_error() == Some(libc::EPIPE) && end > marker_start {
                    return Ok(());
                }
                return Err(e);
            }
        }
        if self.tape {
            write_filemark(&self.file)?;
        }
        Ok(())
    }
}

/// `struct mtop` of <sys/mtio.h>.
#[repr(C)]
struct MtOp {
    mt_op: libc::c_short,
    mt_count: libc::c_int,
}

/// `MTIOCTOP` = _IOW('m', 1, struct mtop).
const MTIOCTOP: libc::c_ulong = 0x4008_6d01;
/// Write filemarks.
const MTWEOF: libc::c_short = 5;

/// Writes one filemark on a tape device.
fn write_filemark(file: &File) -> std::io::Result<()> {
    let op = MtOp {
        mt_op: MTWEOF,
        mt_count: 1,
    };
    // SAFETY: MTIOCTOP reads one `struct mtop` from the pointer, which points to a live,
    // properly laid out (repr(C)) value for the duration of the call; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), MTIOCTOP as _, &op as *const MtOp) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
