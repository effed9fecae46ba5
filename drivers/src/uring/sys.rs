//! The io_uring calls of the uring driver: ring setup, buffer registration, submission and
//! reaping. The unsafe contract of io_uring (buffers outlive their operation) is kept here:
//! every buffer and iovec array of a submitted request stays in the in-flight slab until its
//! completion is reaped, and dropping the ring waits for all of them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use slab::Slab;

use super::errno_error;
use crate::bdev::{
    queue_full, ChannelContext, IoBufs, IoCompletion, IoError, IoOp, IoRequest, SubmitResult,
};

const FIXED_FILE: types::Fixed = types::Fixed(0);

/// A registered DMA region: its id, fixed-buffer index and address range.
struct FixedRegion {
    id: u64,
    index: u16,
}

struct Inflight {
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    bufs: IoBufs,
    /// The iovec array of a vectored request; the kernel reads it until completion.
    _iov: Option<Box<[libc::iovec]>>,
    /// Write-zeroes falls back to punching a hole where ZERO_RANGE is unsupported.
    punched: bool,
}

pub(super) struct Ring {
    ring: IoUring,
    _file: Arc<File>,
    fixed: Vec<FixedRegion>,
    inflight: Slab<Inflight>,
    capacity: usize,
    unsubmitted: bool,
}

impl Ring {
    pub(super) fn new(file: Arc<File>, ctx: &ChannelContext) -> std::io::Result<Self> {
        let entries = ctx.queue_depth.clamp(32, 4096).next_power_of_two();
        // Cooperative task run: a completion does not interrupt the reactor with an IPI to
        // post it; the kernel flags the ring instead (`taskrun`), and `reap` enters the kernel
        // to run the work when the flag is up.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_single_issuer().build(entries))
            .or_else(|_| IoUring::new(entries))?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        if let Some(fd) = ctx.wake_fd {
            ring.submitter().register_eventfd(fd)?;
        }
        let regions = hugepages::live_regions();
        let iov: Vec<libc::iovec> = regions
            .iter()
            .map(|r| libc::iovec {
                iov_base: r.addr as *mut libc::c_void,
                iov_len: r.len,
            })
            .collect();
        let mut fixed = Vec::new();
        if !iov.is_empty() && iov.len() <= u16::MAX as usize {
            // SAFETY: each iovec describes a live DMA region; regions are unmapped only after
            // they are unregistered, and a registration is dropped with the ring. The kernel pins
            // the pages, so the memory stays valid for fixed operations.
            let res = unsafe { ring.submitter().register_buffers(&iov) };
            match res {
                Ok(()) => {
                    fixed = regions
                        .iter()
                        .enumerate()
                        .map(|(i, r)| FixedRegion {
                            id: r.id,
                            index: i as u16,
                        })
                        .collect()
                }
                Err(err) => tracing::debug!(%err, "io_uring fixed buffers unavailable"),
            }
        }
        let capacity = entries as usize;
        Ok(Self {
            ring,
            _file: file,
            fixed,
            inflight: Slab::with_capacity(capacity),
            capacity,
            unsubmitted: false,
        })
    }

    pub(super) fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn fixed_index(&self, region_id: u64) -> Option<u16> {
        self.fixed
            .iter()
            .find(|f| f.id == region_id)
            .map(|f| f.index)
    }

    pub(super) fn push(&mut self, req: IoRequest) -> SubmitResult {
        if self.inflight.len() >= self.capacity {
            return queue_full(req);
        }
        let IoRequest {
            op,
            offset,
            len,
            bufs,
            tag,
        } = req;
        let mut entry = Inflight {
            tag,
            op,
            offset,
            len,
            bufs,
            _iov: None,
            punched: false,
        };
        let sqe = self.build(&mut entry);
        let key = self.inflight.insert(entry);
        let sqe = sqe.user_data(key as u64);
        if self.push_sqe(&sqe).is_err() {
            let e = self.inflight.remove(key);
            return queue_full(IoRequest {
                op: e.op,
                offset: e.offset,
                len: e.len,
                bufs: e.bufs,
                tag: e.tag,
            });
        }
        Ok(())
    }

    fn push_sqe(&mut self, sqe: &io_uring::squeue::Entry) -> Result<(), ()> {
        for _ in 0..2 {
            // SAFETY: the buffers and iovecs the entry points to live in the in-flight slab
            // until its completion is reaped (slab entries never move: the slab is
            // preallocated to `capacity` and never grows past it).
            let pushed = unsafe { self.ring.submission().push(sqe) };
            if pushed.is_ok() {
                self.unsubmitted = true;
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try once more.
            if self.ring.submit().is_err() {
                break;
            }
        }
        Err(())
    }

    fn build(&self, e: &mut Inflight) -> io_uring::squeue::Entry {
        match e.op {
            IoOp::Read | IoOp::Write { .. } => self.build_rw(e),
            IoOp::Flush => opcode::Fsync::new(FIXED_FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::WriteZeroes if !e.punched => opcode::Fallocate::new(FIXED_FILE, e.len)
                .offset(e.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes | IoOp::Unmap => opcode::Fallocate::new(FIXED_FILE, e.len)
                .offset(e.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
    }

    fn build_rw(&self, e: &mut Inflight) -> io_uring::squeue::Entry {
        let rw_flags = match e.op {
            IoOp::Write { fua: true } => libc::RWF_DSYNC,
            _ => 0,
        };
        let is_read = e.op == IoOp::Read;
        if let [buf] = e.bufs.as_slice() {
            let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
            return match (self.fixed_index(buf.region_id()), is_read) {
                (Some(i), true) => opcode::ReadFixed::new(FIXED_FILE, ptr, len, i)
                    .offset(e.offset)
                    .build(),
                (Some(i), false) => opcode::WriteFixed::new(FIXED_FILE, ptr, len, i)
                    .offset(e.offset)
                    .rw_flags(rw_flags)
                    .build(),
                (None, true) => opcode::Read::new(FIXED_FILE, ptr, len)
                    .offset(e.offset)
                    .build(),
                (None, false) => opcode::Write::new(FIXED_FILE, ptr, len)
                    .offset(e.offset)
                    .rw_flags(rw_flags)
                    .build(),
            };
        }
        let iov: Box<[libc::iovec]> = e
            .bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
        e._iov = Some(iov);
        if is_read {
            opcode::Readv::new(FIXED_FILE, ptr, n)
                .offset(e.offset)
                .build()
        } else {
            opcode::Writev::new(FIXED_FILE, ptr, n)
                .offset(e.offset)
                .rw_flags(rw_flags)
                .build()
        }
    }

    /// Submits what is queued and moves finished requests into `out`.
    pub(super) fn reap(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        // An idle channel touches none of its ring's memory: with thousands of channels on a
        // reactor, reading every ring's completion queue each turn is what the turn costs.
        if self.inflight.is_empty() && !self.unsubmitted {
            return 0;
        }
        if self.unsubmitted || (!self.inflight.is_empty() && self.ring.submission().taskrun()) {
            match self.ring.submit() {
                Ok(_) => self.unsubmitted = false,
                Err(err) => tracing::debug!(%err, "io_uring submit deferred"),
            }
        }
        let mut done = 0;
        let mut retry = Vec::new();
        for cqe in self.ring.completion() {
            let key = cqe.user_data() as usize;
            let Some(mut e) = self.inflight.try_remove(key) else {
                tracing::error!(key, "io_uring completion for an unknown request");
                continue;
            };
            let res = cqe.result();
            let result = match e.op {
                _ if res == -libc::EOPNOTSUPP && e.op == IoOp::WriteZeroes && !e.punched => {
                    e.punched = true;
                    retry.push(e);
                    continue;
                }
                // Unmap is advisory: a file system without hole punching keeps the data.
                IoOp::Unmap if res == -libc::EOPNOTSUPP => Ok(()),
                _ if res < 0 => Err(errno_error(res)),
                IoOp::Read | IoOp::Write { .. } if res as u64 != e.len => {
                    tracing::warn!(expected = e.len, got = res, "short transfer");
                    Err(IoError::Device(libc::EIO))
                }
                _ => Ok(()),
            };
            out.push(IoCompletion {
                tag: e.tag,
                result,
                bufs: e.bufs,
            });
            done += 1;
        }
        for mut e in retry {
            let sqe = self.build(&mut e);
            let (tag, bufs) = (e.tag, std::mem::take(&mut e.bufs));
            let key = self.inflight.insert(e);
            if self.push_sqe(&sqe.user_data(key as u64)).is_err() {
                self.inflight.remove(key);
                out.push(IoCompletion {
                    tag,
                    result: Err(IoError::Device(libc::EAGAIN)),
                    bufs,
                });
                done += 1;
            }
        }
        done
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers of requests in flight: wait for them before
        // the buffers go back to their pool.
        let mut out = Vec::new();
        while !self.inflight.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                tracing::error!("io_uring wait failed while closing a channel");
                std::mem::forget(std::mem::take(&mut self.inflight));
                return;
            }
            out.clear();
            self.reap(&mut out);
        }
    }
}
