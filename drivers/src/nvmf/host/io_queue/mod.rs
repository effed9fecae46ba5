//! The I/O queue: one NVMe/TCP connection of its own, driven by polling from one thread (a
//! reactor) over the non-blocking socket. It splits requests into commands, sends their PDUs
//! in vectored writes straight from the caller's DMA buffers (write data in the capsule when it
//! fits, else on the controller's R2T as H2CData PDUs), receives read data into the caller's
//! buffers, and fails commands past their deadline. Given its reactor's [`FdWatch`], it keeps
//! its socket in the reactor's epoll set until it fails or is dropped, so the parked reactor
//! wakes when replies arrive. The receive side is in `receive.rs`.

mod receive;

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::sync_queue::Connection;
use super::{io, HostController, Namespace, NvmfError};
use crate::nvme::spec::{self, Command};
use crate::nvmf::fabrics;
use crate::nvmf::pdu::{self, CapsuleCmd, Digests, HeaderBytes};
use crate::{FdWatch, IoBufs, IoError, IoOp};

/// Period of the I/O queues' command timeout checks.
const TICK: Duration = Duration::from_millis(10);
/// Vectors per writev (a turn's worth of 4 KiB writes: a header and the data each).
const MAX_IOV: usize = 256;

/// One request of the queue's user, made of one or more commands.
struct Parent {
    tag: u64,
    /// Its namespace's size in bytes (for an out-of-range answer).
    ns_size: u64,
    bufs: IoBufs,
    left: u32,
    result: Result<(), IoError>,
}

/// One command in flight.
struct Cmd {
    parent: usize,
    /// Byte offset of its data in the parent's buffers.
    start: usize,
    /// Its data bytes (0 for commands without data).
    len: usize,
    read: bool,
    /// The queue's tick when it was issued.
    issued: u64,
}

/// A piece of what the queue sends.
enum Piece {
    Head(HeaderBytes),
    /// `len` bytes of a parent's buffers from `start`.
    Data {
        parent: usize,
        start: usize,
        len: usize,
    },
    Bytes(Vec<u8>),
    Digest([u8; 4]),
}

/// A finished request of an [`IoQueue`].
#[derive(Debug)]
pub struct Done {
    /// The submitter's tag.
    pub tag: u64,
    /// Outcome.
    pub result: Result<(), IoError>,
    /// Buffers back.
    pub bufs: IoBufs,
}

/// Why a submission was not taken.
#[derive(Debug)]
pub enum Refused {
    /// No free command slots now: poll and retry.
    Full(IoBufs),
    /// The queue failed, or the request is invalid.
    Failed(IoError, IoBufs),
}

/// An I/O queue on its own connection, polled from one thread.
pub struct IoQueue {
    ctrl: Arc<HostController>,
    qid: u16,
    stream: TcpStream,
    digests: Digests,
    maxh2cdata: usize,
    in_capsule: usize,
    ns: Namespace,
    depth: usize,
    parents: Slab<Parent>,
    cmds: Slab<Cmd>,
    tx: VecDeque<Piece>,
    tx_sent: usize,
    rx: Vec<u8>,
    rx_len: usize,
    failed: Option<IoError>,
    done: Vec<Done>,
    last_check: Instant,
    tick: u64,
    /// The reactor's epoll set the socket is watched in, if any.
    watch: Option<FdWatch>,
    /// The socket also wakes the reactor when it can be written (PDUs wait for room).
    watching_output: bool,
}

/// Most data bytes one read or write command of namespace `ns` carries: the controller's
/// limit, at most 65,536 blocks, whole blocks.
fn max_cmd_bytes(ctrl_limit: usize, ns: &Namespace) -> usize {
    let bs = ns.block_size as usize;
    let n = ctrl_limit.min(bs * 65536).max(bs);
    n - n % bs
}

/// Slices of `bufs` covering `len` bytes from `start`.
fn slices(bufs: &IoBufs, start: usize, len: usize) -> impl Iterator<Item = &[u8]> {
    let mut pos = 0usize;
    let end = start + len;
    bufs.iter().filter_map(move |b| {
        let (bs, be) = (pos, pos + b.len());
        pos = be;
        let (s, e) = (start.max(bs), end.min(be));
        (s < e).then(|| &b.as_slice()[s - bs..e - bs])
    })
}

/// The bytes of a piece, in order (a parent's data as its buffers' slices).
fn piece_parts<'a>(parents: &'a Slab<Parent>, p: &'a Piece) -> impl Iterator<Item = &'a [u8]> {
    let (one, data) = match p {
        Piece::Head(h) => (Some(h.as_slice()), None),
        Piece::Data { parent, start, len } => (
            None,
            parents
                .get(*parent)
                .map(|pp| slices(&pp.bufs, *start, *len)),
        ),
        Piece::Bytes(b) => (Some(b.as_slice()), None),
        Piece::Digest(d) => (Some(&d[..]), None),
    };
    one.into_iter().chain(data.into_iter().flatten())
}

fn piece_len(p: &Piece) -> usize {
    match p {
        Piece::Head(h) => h.as_slice().len(),
        Piece::Data { len, .. } => *len,
        Piece::Bytes(b) => b.len(),
        Piece::Digest(_) => 4,
    }
}

impl IoQueue {
    /// Takes over the connection of I/O queue `qid` of `ctrl`, connected with `depth` entries
    /// for namespace `ns`.
    pub(super) fn start(
        ctrl: Arc<HostController>,
        qid: u16,
        ns: Namespace,
        depth: u16,
        conn: Connection,
    ) -> Result<Self, NvmfError> {
        let Connection {
            stream,
            mut rx,
            digests,
            maxh2cdata,
        } = conn;
        stream
            .set_nonblocking(true)
            .map_err(io("set non-blocking"))?;
        rx.resize(ctrl.max_cmd_bytes + 4096, 0);
        Ok(IoQueue {
            qid,
            stream,
            digests,
            maxh2cdata: maxh2cdata as usize,
            in_capsule: ctrl.in_capsule,
            ns,
            depth: depth as usize,
            parents: Slab::new(),
            cmds: Slab::new(),
            tx: VecDeque::new(),
            tx_sent: 0,
            rx,
            rx_len: 0,
            failed: None,
            done: Vec::new(),
            last_check: Instant::now(),
            tick: 0,
            watch: None,
            watching_output: false,
            ctrl,
        })
    }

    /// The namespace it serves.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    /// Requests not yet returned.
    pub fn in_flight(&self) -> usize {
        self.parents.len()
    }

    /// The queue's socket (for a reactor to watch while parked).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Has a parked reactor woken when the socket has input: the socket joins the reactor's
    /// epoll set `watch` until the queue fails or is dropped.
    pub fn wake_on_input(&mut self, watch: &FdWatch) -> std::io::Result<()> {
        if self.watch.is_none() {
            watch.watch(self.stream.as_fd())?;
            self.watch = Some(watch.clone());
        }
        Ok(())
    }

    /// Takes the socket out of the reactor's epoll set, if it is in it.
    fn unwatch(&mut self) {
        if let Some(w) = self.watch.take() {
            w.unwatch(self.stream.as_fd());
        }
    }

    /// Starts `op` over `len` bytes at byte `offset` with `bufs` (reads and writes) on the
    /// queue's namespace. Its PDUs are queued and go out on the next [`IoQueue::poll`], batched
    /// with the others.
    pub fn submit(
        &mut self,
        op: IoOp,
        offset: u64,
        len: u64,
        bufs: IoBufs,
        tag: u64,
    ) -> Result<(), Refused> {
        let ns = self.ns;
        self.submit_to(&ns, op, offset, len, bufs, tag)
    }

    /// [`IoQueue::submit`] on namespace `ns` of the same controller: an I/O queue is the
    /// controller's, and each command names its namespace.
    pub fn submit_to(
        &mut self,
        ns: &Namespace,
        op: IoOp,
        offset: u64,
        len: u64,
        bufs: IoBufs,
        tag: u64,
    ) -> Result<(), Refused> {
        if let Some(e) = &self.failed {
            return Err(Refused::Failed(e.clone(), bufs));
        }
        let bs = ns.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Refused::Failed(
                IoError::Unaligned {
                    offset,
                    len,
                    block_size: ns.block_size,
                },
                bufs,
            ));
        }
        let size = ns.blocks * bs;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Refused::Failed(
                IoError::OutOfRange { offset, len, size },
                bufs,
            ));
        }
        if op.is_write() && ns.read_only {
            return Err(Refused::Failed(IoError::ReadOnly, bufs));
        }
        // Commands this request needs.
        let step = match op {
            IoOp::Read | IoOp::Write { .. } => max_cmd_bytes(self.ctrl.max_cmd_bytes, ns) as u64,
            IoOp::WriteZeroes { .. } => bs * 65536,
            IoOp::Unmap => bs * u32::MAX as u64,
            IoOp::Flush => u64::MAX,
        };
        let count = if op == IoOp::Flush || len == 0 {
            1
        } else {
            len.div_ceil(step)
        };
        if self.cmds.len() + count as usize > self.depth {
            return Err(Refused::Full(bufs));
        }
        let parent = self.parents.insert(Parent {
            tag,
            ns_size: size,
            bufs,
            left: count as u32,
            result: Ok(()),
        });
        let nsid = ns.nsid;
        let mut at = 0u64;
        for _ in 0..count {
            let n = (len - at).min(step);
            let lba = (offset + at) / bs;
            let blocks = (n / bs) as u32;
            let data = op.has_data();
            let key = self.cmds.insert(Cmd {
                parent,
                start: at as usize,
                len: if data { n as usize } else { 0 },
                read: op == IoOp::Read,
                issued: self.tick,
            });
            let cid = key as u16;
            match op {
                IoOp::Read => {
                    let c = fabrics::with_sgl(Command::read(nsid, lba, blocks), n as u32, false);
                    self.push_head(CapsuleCmd::new(c.with_cid(cid)), None);
                }
                IoOp::Write { fua } => {
                    let inline = n as usize <= self.in_capsule;
                    let c =
                        fabrics::with_sgl(Command::write(nsid, lba, blocks, fua), n as u32, inline);
                    let cap = CapsuleCmd::new(c.with_cid(cid));
                    if inline {
                        self.push_head(
                            cap.with_data_len(n as usize),
                            Some((parent, at as usize, n as usize)),
                        );
                    } else {
                        self.push_head(cap, None);
                    }
                }
                IoOp::WriteZeroes { deallocate } => {
                    self.push_head(
                        CapsuleCmd::new(
                            Command::write_zeroes(nsid, lba, blocks, deallocate).with_cid(cid),
                        ),
                        None,
                    );
                }
                IoOp::Unmap => {
                    let mut range = vec![0u8; 16];
                    range[4..8].copy_from_slice(&blocks.to_le_bytes());
                    range[8..16].copy_from_slice(&lba.to_le_bytes());
                    let mut c = Command::new(spec::nvm::DATASET_MANAGEMENT).with_nsid(nsid);
                    c.dw[11] = 1 << 2;
                    let c = fabrics::with_sgl(c, 16, true).with_cid(cid);
                    let h = CapsuleCmd::new(c).with_data_len(16).encode(self.digests);
                    self.tx.push_back(Piece::Head(h));
                    if self.digests.data {
                        let d = pdu::crc32c([&range[..]]).to_le_bytes();
                        self.tx.push_back(Piece::Bytes(range));
                        self.tx.push_back(Piece::Digest(d));
                    } else {
                        self.tx.push_back(Piece::Bytes(range));
                    }
                }
                IoOp::Flush => {
                    self.push_head(CapsuleCmd::new(Command::flush(nsid).with_cid(cid)), None);
                }
            }
            at += n;
        }
        // Sent by the next poll, with everything else queued before it.
        Ok(())
    }

    fn push_head(&mut self, mut cap: CapsuleCmd, data: Option<(usize, usize, usize)>) {
        cap.cmd = fabrics::sgl_command(cap.cmd);
        self.tx.push_back(Piece::Head(cap.encode(self.digests)));
        if let Some((parent, start, len)) = data {
            self.push_data(parent, start, len);
        }
    }

    fn push_data(&mut self, parent: usize, start: usize, len: usize) {
        self.tx.push_back(Piece::Data { parent, start, len });
        if self.digests.data {
            let d = self
                .parents
                .get(parent)
                .map(|p| pdu::crc32c(slices(&p.bufs, start, len)))
                .unwrap_or(0);
            self.tx.push_back(Piece::Digest(d.to_le_bytes()));
        }
    }

    fn fail(&mut self, e: IoError) {
        if self.failed.is_none() {
            tracing::warn!(qid = self.qid, error = %e, "NVMe/TCP I/O queue failed");
            // A shut down socket stays readable: watched, it would keep the reactor from
            // parking. A failed queue has nothing more to wait for.
            self.unwatch();
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
            self.failed = Some(e);
        }
    }

    /// Sends what is queued: every PDU queued since the last call goes out in as few vectored
    /// writes as the socket takes (one per poll turn when it keeps up).
    fn transmit(&mut self) {
        while !self.tx.is_empty() && self.failed.is_none() {
            let mut iov = crate::iov::IoVecs::<MAX_IOV>::new();
            let parents = &self.parents;
            let parts = self.tx.iter().flat_map(|p| piece_parts(parents, p));
            let n = iov.gather(parts, self.tx_sent);
            if n == 0 {
                // Only data of a request already finished is left: its header promised bytes
                // that no longer exist (the controller answered before taking them).
                self.fail(IoError::Aborted(
                    "NVMe/TCP protocol error: a command completed before its data was sent".into(),
                ));
                break;
            }
            match iov.writev(&self.stream) {
                // Only the caller's buffers are sent here, never a RAM disk's memory in place.
                Ok(sent) => {
                    self.tx_sent += sent.bytes;
                    while let Some(front) = self.tx.front() {
                        let l = piece_len(front);
                        if self.tx_sent < l {
                            break;
                        }
                        self.tx_sent -= l;
                        self.tx.pop_front();
                    }
                }
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                Err(e) => self.fail(IoError::Device(e.raw_os_error())),
            }
        }
    }

    /// Sends and receives what can be without blocking; finished requests go to `out`.
    pub fn poll(&mut self, out: &mut Vec<Done>) -> usize {
        self.transmit();
        self.receive();
        self.transmit();
        let now = Instant::now();
        if now.duration_since(self.last_check) > TICK {
            // Ticks count checks at least TICK apart: a command is late once more ticks than
            // the timeout holds passed since it was issued, without a clock read per command.
            self.last_check = now;
            self.tick += 1;
            let limit = self.ctrl.opts.io_timeout;
            let ticks = (limit.as_nanos() / TICK.as_nanos()) as u64;
            if self.cmds.iter().any(|(_, c)| self.tick - c.issued > ticks) {
                self.fail(IoError::Aborted(format!(
                    "an NVMe/TCP command took longer than {} ms",
                    limit.as_millis()
                )));
            }
        }
        if let Some(e) = self.failed.clone() {
            self.tx.clear();
            self.cmds.clear();
            for p in self.parents.drain() {
                self.done.push(Done {
                    tag: p.tag,
                    result: Err(e.clone()),
                    bufs: p.bufs,
                });
            }
        }
        // PDUs waiting for room in the socket: the reactor, should it park, wakes once the
        // controller has read (its answers to what it has not received would never come).
        let unsent = !self.tx.is_empty();
        if let Some(w) = &self.watch {
            w.watch_output(self.stream.as_fd(), unsent, &mut self.watching_output);
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    /// The failure that ended the queue, if any.
    pub fn failure(&self) -> Option<&IoError> {
        self.failed.as_ref()
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        // Out of the reactor's epoll set before the socket closes: its number may be reused by
        // another socket watched there.
        self.unwatch();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.ctrl.release_qid(self.qid);
    }
}
