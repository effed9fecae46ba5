//! The NVMe/TCP initiator: a controller reached over TCP.
//!
//! - [`SyncQueue`]: a queue used with blocking I/O on a control thread: ICReq/ICResp, Connect,
//!   and one command at a time (Property Get/Set, Identify, Set Features, Keep Alive).
//! - [`HostController`]: the admin queue brought up (CC.EN, Identify, number of queues, the
//!   namespaces), kept alive by a small thread sending Keep Alive every half KATO.
//! - [`IoQueue`]: an I/O queue on its own TCP connection, driven by polling from one reactor
//!   over the non-blocking socket. Writes go out from the caller's DMA buffers with vectored
//!   sends (in the capsule when they fit, else on the controller's R2T as H2CData PDUs); read
//!   data is received into the caller's buffers. Every command has a deadline.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use slab::Slab;

use super::fabrics::{self, ConnectData, FabricsIdentity, CNTLID_DYNAMIC};
use super::pdu::{self, CapsuleCmd, DataPdu, Digests, Frame, Header, HeaderBytes, IcReq, Side};
use crate::nvme::spec::{self, Command, Completion, IdentifyController, IdentifyNamespace, Status};
use crate::{IoBufs, IoError, IoOp};

/// Blocking operations give up after this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep Alive Timeout the host asks for.
const KATO_MS: u32 = 10_000;
/// Entries of the admin queue.
const ADMIN_QUEUE: u16 = 32;
/// Largest transfer of one command this initiator issues.
const MAX_CMD_BYTES: usize = 128 << 10;
/// Period of the I/O queues' command timeout checks.
const TICK: Duration = Duration::from_millis(10);
/// Vectors per writev (a turn's worth of 4 KiB writes: a header and the data each).
const MAX_IOV: usize = 256;

/// Errors of the initiator.
#[derive(Debug, thiserror::Error)]
pub enum NvmfError {
    /// The socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The controller broke the protocol.
    #[error("NVMe/TCP protocol error: {0}")]
    Protocol(String),
    /// A command failed.
    #[error("{what} failed: {status}")]
    Status {
        /// The command.
        what: &'static str,
        /// Its status.
        status: Status,
    },
    /// The controller cannot be used as asked.
    #[error("{0}")]
    Unusable(String),
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> NvmfError + '_ {
    move |source| NvmfError::Io {
        what: what.to_string(),
        source,
    }
}

/// Where a controller is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOptions {
    /// Target address.
    pub traddr: String,
    /// Target port.
    pub trsvcid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Digests to ask for.
    pub digests: Digests,
    /// Longest a command may take.
    pub io_timeout: Duration,
    /// Entries of each I/O queue.
    pub queue_depth: u16,
}

impl HostOptions {
    /// Options for `subnqn` at `traddr:trsvcid` with defaults for the rest.
    pub fn new(traddr: &str, trsvcid: u16, subnqn: &str) -> Self {
        Self {
            traddr: traddr.to_string(),
            trsvcid,
            subnqn: subnqn.to_string(),
            hostnqn: default_hostnqn(),
            digests: Digests::default(),
            io_timeout: Duration::from_secs(30),
            queue_depth: 128,
        }
    }

    fn addr(&self) -> String {
        if self.traddr.contains(':') && !self.traddr.starts_with('[') {
            format!("[{}]:{}", self.traddr, self.trsvcid)
        } else {
            format!("{}:{}", self.traddr, self.trsvcid)
        }
    }
}

/// This host's NQN when none is given: a UUID NQN derived from the host name.
pub fn default_hostnqn() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let id = fabrics::id_from_name(host);
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "nqn.2014-08.org.nvmexpress:uuid:{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A queue driven with blocking I/O, one command at a time.
pub struct SyncQueue {
    stream: TcpStream,
    digests: Digests,
    maxh2cdata: u32,
    qid: u16,
    cid: u16,
    rx: Vec<u8>,
    rx_len: usize,
}

impl SyncQueue {
    /// Opens a TCP connection, initializes it and connects queue `qid` of controller `cntlid`.
    pub fn connect(
        opts: &HostOptions,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        kato_ms: u32,
    ) -> Result<(Self, u16), NvmfError> {
        Self::connect_with(opts, qid, sqsize, cntlid, kato_ms, 0)
    }

    /// As [`SyncQueue::connect`], with connect attributes `cattr` (such as
    /// [`fabrics::CATTR_DISABLE_SQ_FLOW`]).
    pub fn connect_with(
        opts: &HostOptions,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        kato_ms: u32,
        cattr: u8,
    ) -> Result<(Self, u16), NvmfError> {
        let addr = opts.addr();
        let sa = addr
            .to_socket_addrs()
            .map_err(io(&addr))?
            .next()
            .ok_or_else(|| NvmfError::Unusable(format!("{addr}: no address")))?;
        let stream = TcpStream::connect_timeout(&sa, SETUP_TIMEOUT).map_err(io(&addr))?;
        stream.set_nodelay(true).map_err(io(&addr))?;
        stream
            .set_read_timeout(Some(SETUP_TIMEOUT))
            .map_err(io(&addr))?;
        stream
            .set_write_timeout(Some(SETUP_TIMEOUT))
            .map_err(io(&addr))?;
        let mut q = Self {
            stream,
            digests: Digests::default(),
            maxh2cdata: pdu::MIN_MAXH2CDATA,
            qid,
            cid: 0,
            rx: vec![0u8; 64 << 10],
            rx_len: 0,
        };
        (&q.stream)
            .write_all(&IcReq::new(opts.digests).encode())
            .map_err(io("ICReq"))?;
        let f = q.frame(None)?;
        let Header::IcResp(resp) = f.header else {
            return Err(NvmfError::Protocol("expected ICResp".into()));
        };
        q.consume(f.plen);
        if resp.digests != opts.digests {
            return Err(NvmfError::Unusable(format!(
                "the controller enabled digests {:?}, not the {:?} asked for",
                resp.digests, opts.digests
            )));
        }
        if resp.cpda != 0 {
            return Err(NvmfError::Unusable(
                "the controller asks for PDU data alignment (CPDA), not supported".into(),
            ));
        }
        q.digests = resp.digests;
        q.maxh2cdata = resp.maxh2cdata;
        let data = ConnectData {
            hostid: fabrics::id_from_name(&opts.hostnqn),
            cntlid,
            subnqn: opts.subnqn.clone(),
            hostnqn: opts.hostnqn.clone(),
        }
        .encode();
        let c = fabrics::connect_with(qid, sqsize, kato_ms, cattr);
        let (cqe, _) = q.command("Connect", c, &data, 0)?;
        Ok((q, cqe.result as u16))
    }

    fn consume(&mut self, n: usize) {
        self.rx.copy_within(n..self.rx_len, 0);
        self.rx_len -= n;
    }

    fn frame(&mut self, digests: Option<Digests>) -> Result<Frame, NvmfError> {
        loop {
            match pdu::parse_frame(&self.rx[..self.rx_len], Side::Host, digests, self.rx.len()) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(NvmfError::Protocol(e.to_string())),
            }
            let n = (&self.stream)
                .read(&mut self.rx[self.rx_len..])
                .map_err(io("NVMe/TCP receive"))?;
            if n == 0 {
                return Err(NvmfError::Protocol(
                    "the controller closed the connection".into(),
                ));
            }
            self.rx_len += n;
        }
    }

    /// Runs one command: `out` goes in the capsule (when not empty), `in_len` bytes come back.
    pub fn command(
        &mut self,
        what: &'static str,
        cmd: Command,
        out: &[u8],
        in_len: usize,
    ) -> Result<(Completion, Vec<u8>), NvmfError> {
        self.cid = self.cid.wrapping_add(1);
        let cid = self.cid;
        let cmd = fabrics::sgl_command(cmd.with_cid(cid));
        let h = CapsuleCmd::new(cmd)
            .with_data_len(out.len())
            .encode(self.digests);
        let dd = pdu::crc32c([out]).to_le_bytes();
        let mut wire = h.as_slice().to_vec();
        if !out.is_empty() {
            wire.extend_from_slice(out);
            if self.digests.data {
                wire.extend_from_slice(&dd);
            }
        }
        (&self.stream).write_all(&wire).map_err(io(what))?;
        let mut data = vec![0u8; in_len];
        loop {
            let f = self.frame(Some(self.digests))?;
            if !f.data_digest_ok {
                return Err(NvmfError::Protocol(format!("{what}: data digest mismatch")));
            }
            let bytes = &self.rx[f.data_at..f.data_at + f.data_len];
            match f.header {
                Header::C2hData(d) if d.cccid == cid => {
                    let end = d.offset as usize + d.len as usize;
                    if end > data.len() {
                        return Err(NvmfError::Protocol(format!(
                            "{what}: C2HData beyond the command's {in_len} bytes"
                        )));
                    }
                    data[d.offset as usize..end].copy_from_slice(bytes);
                    let success = d.success;
                    self.consume(f.plen);
                    if success {
                        let cqe = Completion {
                            result: 0,
                            sq_head: 0,
                            sq_id: self.qid,
                            cid,
                            phase: false,
                            status: Status::SUCCESS,
                        };
                        return Ok((cqe, data));
                    }
                }
                Header::Resp(cqe) if cqe.cid == cid => {
                    self.consume(f.plen);
                    if !cqe.status.is_success() {
                        return Err(NvmfError::Status {
                            what,
                            status: cqe.status,
                        });
                    }
                    return Ok((cqe, data));
                }
                Header::Term(t) => {
                    return Err(NvmfError::Protocol(format!(
                        "the controller ended the connection (fatal error {:#x})",
                        t.fes
                    )))
                }
                other => {
                    return Err(NvmfError::Protocol(format!(
                        "{what}: unexpected PDU {other:?}"
                    )))
                }
            }
        }
    }

    fn into_stream(self) -> Result<(TcpStream, Vec<u8>), NvmfError> {
        if self.rx_len != 0 {
            return Err(NvmfError::Protocol("unexpected bytes after Connect".into()));
        }
        Ok((self.stream, self.rx))
    }
}

/// A namespace of a remote controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Its id.
    pub nsid: u32,
    /// Blocks.
    pub blocks: u64,
    /// Bytes per block.
    pub block_size: u32,
    /// Write protected.
    pub read_only: bool,
}

/// A controller whose admin queue is up and kept alive.
pub struct HostController {
    opts: HostOptions,
    cntlid: u16,
    in_capsule: usize,
    max_cmd_bytes: usize,
    namespaces: Vec<Namespace>,
    identify: IdentifyController,
    free_qids: Mutex<Vec<u16>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for HostController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostController({} at {})",
            self.opts.subnqn,
            self.opts.addr()
        )
    }
}

impl HostController {
    /// Connects the admin queue, enables the controller, reads its identity and namespaces,
    /// asks for I/O queues and starts the keep-alive thread.
    pub fn connect(opts: HostOptions) -> Result<Arc<Self>, NvmfError> {
        let (mut admin, cntlid) =
            SyncQueue::connect(&opts, 0, ADMIN_QUEUE, CNTLID_DYNAMIC, KATO_MS)?;
        let (cap, _) = admin.command("Property Get CAP", fabrics::property_get(0, true), &[], 0)?;
        let caps = spec::Capabilities::parse(cap.result as u64);
        admin.command(
            "Property Set CC",
            fabrics::property_set(spec::REG_CC as u32, spec::cc_enable()),
            &[],
            0,
        )?;
        let end = Instant::now() + Duration::from_millis(caps.timeout_ms.max(500));
        loop {
            let (csts, _) = admin.command(
                "Property Get CSTS",
                fabrics::property_get(spec::REG_CSTS as u32, false),
                &[],
                0,
            )?;
            if csts.result & spec::CSTS_CFS != 0 {
                return Err(NvmfError::Unusable(
                    "the controller reports a fatal status".into(),
                ));
            }
            if csts.result & spec::CSTS_RDY != 0 {
                break;
            }
            if Instant::now() > end {
                return Err(NvmfError::Unusable(
                    "the controller did not become ready".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let page = |q: &mut SyncQueue, cns: u8, nsid: u32| -> Result<[u8; 4096], NvmfError> {
            let (_, d) = q.command("Identify", fabrics::identify(cns, nsid), &[], 4096)?;
            d.try_into()
                .map_err(|_| NvmfError::Protocol("short Identify page".into()))
        };
        let ctrl_page = page(&mut admin, spec::cns::CONTROLLER, 0)?;
        let identify = IdentifyController::parse(&ctrl_page);
        let fab = FabricsIdentity::parse(&ctrl_page);
        if fab.icdoff != 0 {
            return Err(NvmfError::Unusable(
                "in-capsule data offset (ICDOFF) not supported".into(),
            ));
        }
        let (q, _) = admin.command(
            "Set Features (number of queues)",
            Command::set_number_of_queues(64),
            &[],
            0,
        )?;
        let granted = ((q.result & 0xffff).min(q.result >> 16) + 1).min(64) as u16;
        let list = page(&mut admin, spec::cns::ACTIVE_NAMESPACES, 0)?;
        let mut namespaces = Vec::new();
        for nsid in spec::parse_namespace_list(&list) {
            let p = page(&mut admin, spec::cns::NAMESPACE, nsid)?;
            let ns = IdentifyNamespace::parse(&p);
            if ns.block_size == 0 || ns.metadata_size != 0 || ns.size_blocks == 0 {
                tracing::warn!(nsid, "NVMe/TCP namespace with an unusable format skipped");
                continue;
            }
            namespaces.push(Namespace {
                nsid,
                blocks: ns.size_blocks,
                block_size: ns.block_size,
                read_only: p[99] & 1 != 0,
            });
        }
        let mdts_bytes = if identify.mdts == 0 {
            usize::MAX
        } else {
            caps.min_page_size << identify.mdts
        };
        let stop = Arc::new(AtomicBool::new(false));
        let ctrl = Arc::new(Self {
            in_capsule: fab.ioccsz.saturating_sub(64) as usize,
            max_cmd_bytes: MAX_CMD_BYTES.min(mdts_bytes),
            opts,
            cntlid,
            namespaces,
            identify,
            free_qids: Mutex::new((1..=granted).rev().collect()),
            stop: Arc::clone(&stop),
        });
        let name = ctrl.opts.subnqn.clone();
        std::thread::Builder::new()
            .name("nvmf_keepalive".into())
            .spawn(move || keep_alive(admin, &stop, &name))
            .map_err(io("keep-alive thread"))?;
        tracing::info!(subnqn = %ctrl.opts.subnqn, cntlid, io_queues = granted, "NVMe/TCP controller connected");
        Ok(ctrl)
    }

    /// Its controller id.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// The namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Options it was connected with.
    pub fn options(&self) -> &HostOptions {
        &self.opts
    }

    /// What Identify Controller said.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// Connects a new I/O queue (blocking: on a control thread, or once per reactor).
    pub fn open_io_queue(self: &Arc<Self>, nsid: u32) -> Result<IoQueue, NvmfError> {
        let ns = *self
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .ok_or_else(|| NvmfError::Unusable(format!("no namespace {nsid}")))?;
        let qid = self
            .free_qids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or_else(|| NvmfError::Unusable("no I/O queue left on the controller".into()))?;
        let depth = self.opts.queue_depth.clamp(2, 1024);
        // This queue never looks at SQHD: asking for SQ flow control to be disabled lets the
        // controller end reads with C2HData SUCCESS and no response capsule. A controller that
        // refuses the attribute gets a plain Connect.
        let sq_flow = fabrics::CATTR_DISABLE_SQ_FLOW;
        let q = match SyncQueue::connect_with(&self.opts, qid, depth, self.cntlid, 0, sq_flow) {
            Err(NvmfError::Status { status, .. })
                if status.kind() == fabrics::status::CONNECT_INVALID_PARAMS.kind() =>
            {
                SyncQueue::connect(&self.opts, qid, depth, self.cntlid, 0)
            }
            other => other,
        };
        let q = q.and_then(|(q, _)| {
            let digests = q.digests;
            let maxh2cdata = q.maxh2cdata;
            let (stream, rx) = q.into_stream()?;
            stream
                .set_nonblocking(true)
                .map_err(io("set non-blocking"))?;
            Ok((stream, rx, digests, maxh2cdata))
        });
        let (stream, mut rx, digests, maxh2cdata) = match q {
            Ok(x) => x,
            Err(e) => {
                self.release_qid(qid);
                return Err(e);
            }
        };
        rx.resize(self.max_cmd_bytes + 4096, 0);
        let max_cmd_bytes = self
            .max_cmd_bytes
            .min(ns.block_size as usize * 65536)
            .max(ns.block_size as usize);
        Ok(IoQueue {
            ctrl: Arc::clone(self),
            qid,
            stream,
            digests,
            maxh2cdata: maxh2cdata as usize,
            in_capsule: self.in_capsule,
            max_cmd_bytes: max_cmd_bytes - max_cmd_bytes % ns.block_size as usize,
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
            waker: None,
        })
    }

    fn release_qid(&self, qid: u16) {
        self.free_qids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(qid);
    }
}

impl Drop for HostController {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn keep_alive(mut admin: SyncQueue, stop: &AtomicBool, name: &str) {
    let period = Duration::from_millis(KATO_MS as u64 / 2);
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + period;
        if let Err(e) = admin.command("Keep Alive", fabrics::keep_alive(), &[], 0) {
            tracing::warn!(subnqn = name, %e, "NVMe/TCP keep alive failed");
            return;
        }
    }
    // Clean shutdown of the controller (CC.SHN) before the admin connection closes.
    let _ = admin.command(
        "Property Set CC",
        fabrics::property_set(spec::REG_CC as u32, spec::CC_EN | spec::CC_SHN_NORMAL),
        &[],
        0,
    );
}

/// One request of the queue's user, made of one or more commands.
struct Parent {
    tag: u64,
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
    max_cmd_bytes: usize,
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
    waker: Option<Waker>,
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

    /// Has a parked reactor woken (through `wake_fd`) when the socket becomes readable.
    pub fn wake_on_input(&mut self, wake_fd: RawFd) {
        if self.waker.is_none() {
            self.waker = Waker::start(self.stream.as_fd(), wake_fd);
        }
    }

    /// Starts `op` over `len` bytes at byte `offset` with `bufs` (reads and writes). Its PDUs
    /// are queued and go out on the next [`IoQueue::poll`], batched with the others.
    pub fn submit(
        &mut self,
        op: IoOp,
        offset: u64,
        len: u64,
        bufs: IoBufs,
        tag: u64,
    ) -> Result<(), Refused> {
        if let Some(e) = &self.failed {
            return Err(Refused::Failed(e.clone(), bufs));
        }
        let bs = self.ns.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Refused::Failed(
                IoError::Unaligned {
                    offset,
                    len,
                    block_size: self.ns.block_size,
                },
                bufs,
            ));
        }
        let size = self.ns.blocks * bs;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Refused::Failed(
                IoError::OutOfRange { offset, len, size },
                bufs,
            ));
        }
        if op.is_write() && self.ns.read_only {
            return Err(Refused::Failed(IoError::ReadOnly, bufs));
        }
        // Commands this request needs.
        let step = match op {
            IoOp::Read | IoOp::Write { .. } => self.max_cmd_bytes as u64,
            IoOp::WriteZeroes => bs * 65536,
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
            bufs,
            left: count as u32,
            result: Ok(()),
        });
        let nsid = self.ns.nsid;
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
                IoOp::WriteZeroes => {
                    self.push_head(
                        CapsuleCmd::new(Command::write_zeroes(nsid, lba, blocks).with_cid(cid)),
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
                Ok(sent) => {
                    self.tx_sent += sent;
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

    fn complete(&mut self, cid: u16, status: Status) {
        let Some(cmd) = self.cmds.try_remove(cid as usize) else {
            self.fail(IoError::Aborted(format!(
                "response for unknown command {cid}"
            )));
            return;
        };
        let Some(p) = self.parents.get_mut(cmd.parent) else {
            return;
        };
        if !status.is_success() && p.result.is_ok() {
            p.result = Err(match status.kind() {
                s if s == Status::LBA_OUT_OF_RANGE => IoError::OutOfRange {
                    offset: 0,
                    len: 0,
                    size: self.ns.blocks * self.ns.block_size as u64,
                },
                s if s.0 & 0x7ff == fabrics::status::WRITE_PROTECTED.0 & 0x7ff => IoError::ReadOnly,
                s => IoError::Device(s.errno()),
            });
        }
        p.left -= 1;
        if p.left == 0 {
            let p = self.parents.remove(cmd.parent);
            self.done.push(Done {
                tag: p.tag,
                result: p.result,
                bufs: p.bufs,
            });
        }
    }

    fn handle(&mut self, f: Frame) -> Result<(), IoError> {
        let proto = |m: String| IoError::Aborted(format!("NVMe/TCP protocol error: {m}"));
        if !f.data_digest_ok {
            return Err(proto("data digest mismatch".into()));
        }
        match f.header {
            Header::Resp(cqe) => self.complete(cqe.cid, cqe.status),
            Header::C2hData(d) => {
                let Some(cmd) = self.cmds.get(d.cccid as usize) else {
                    return Err(proto(format!("C2HData for unknown command {}", d.cccid)));
                };
                let end = d.offset as usize + d.len as usize;
                if !cmd.read || end > cmd.len {
                    return Err(proto("C2HData out of the command's range".into()));
                }
                let (parent, start) = (cmd.parent, cmd.start + d.offset as usize);
                let src = &self.rx[f.data_at..f.data_at + f.data_len];
                if let Some(p) = self.parents.get_mut(parent) {
                    let mut pos = 0usize;
                    let mut src = src;
                    for b in p.bufs.iter_mut() {
                        let (bs, be) = (pos, pos + b.len());
                        pos = be;
                        if src.is_empty() || be <= start {
                            continue;
                        }
                        let at = start.max(bs) - bs;
                        let k = (b.len() - at).min(src.len());
                        b.as_mut_slice()[at..at + k].copy_from_slice(&src[..k]);
                        src = &src[k..];
                    }
                }
                if d.success {
                    if !d.last {
                        return Err(proto("C2HData SUCCESS without LAST_PDU".into()));
                    }
                    self.complete(d.cccid, Status::SUCCESS);
                }
            }
            Header::R2t(r) => {
                let Some(cmd) = self.cmds.get(r.cccid as usize) else {
                    return Err(proto(format!("R2T for unknown command {}", r.cccid)));
                };
                let end = r.offset as usize + r.len as usize;
                if cmd.read || cmd.len == 0 || end > cmd.len || r.len == 0 {
                    return Err(proto("R2T out of the command's range".into()));
                }
                let (parent, base) = (cmd.parent, cmd.start);
                let mut at = r.offset as usize;
                while at < end {
                    let n = (end - at).min(self.maxh2cdata);
                    let h = DataPdu {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        offset: at as u32,
                        len: n as u32,
                        last: at + n == end,
                        success: false,
                    }
                    .encode_h2c(self.digests);
                    self.tx.push_back(Piece::Head(h));
                    self.push_data(parent, base + at, n);
                    at += n;
                }
            }
            Header::Term(t) => {
                return Err(IoError::Aborted(format!(
                    "the NVMe/TCP controller ended the connection (fatal error {:#x})",
                    t.fes
                )))
            }
            other => return Err(proto(format!("unexpected PDU {other:?}"))),
        }
        Ok(())
    }

    fn receive(&mut self) -> bool {
        let mut progress = false;
        while self.failed.is_none() {
            // Whole PDUs first.
            let mut at = 0;
            loop {
                match pdu::parse_frame(
                    &self.rx[at..self.rx_len],
                    Side::Host,
                    Some(self.digests),
                    self.rx.len(),
                ) {
                    Ok(Some(mut f)) => {
                        f.data_at += at;
                        let plen = f.plen;
                        if let Err(e) = self.handle(f) {
                            self.fail(e);
                            return true;
                        }
                        at += plen;
                        progress = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(IoError::Aborted(e.to_string()));
                        return true;
                    }
                }
            }
            if at > 0 {
                self.rx.copy_within(at..self.rx_len, 0);
                self.rx_len -= at;
            }
            match rustix::io::read(&self.stream, &mut self.rx[self.rx_len..]) {
                Ok(0) => {
                    self.fail(IoError::Aborted(
                        "the NVMe/TCP controller closed the connection".into(),
                    ));
                    return true;
                }
                Ok(n) => {
                    self.rx_len += n;
                    progress = true;
                }
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                Err(e) => {
                    self.fail(IoError::Device(e.raw_os_error()));
                    return true;
                }
            }
        }
        progress
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
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.ctrl.release_qid(self.qid);
    }
}

/// A thread that wakes a parked reactor when a socket has input: edge-triggered epoll on the
/// socket, a write to the reactor's eventfd per edge.
struct Waker {
    stop: Arc<AtomicBool>,
}

impl Waker {
    fn start(sock: std::os::fd::BorrowedFd<'_>, wake_fd: RawFd) -> Option<Self> {
        use rustix::event::epoll;
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).ok()?;
        epoll::add(
            &ep,
            sock,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN | epoll::EventFlags::ET | epoll::EventFlags::RDHUP,
        )
        .ok()?;
        // The eventfd belongs to the reactor, which outlives its channels; a duplicate keeps
        // this thread's writes safe even if it does not.
        let wake: OwnedFd = super::sys::dup_fd(wake_fd).ok()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("nvmf_wake".into())
            .spawn(move || {
                let mut events: Vec<epoll::Event> = Vec::with_capacity(4);
                let ts = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                while !s.load(Ordering::Relaxed) {
                    events.clear();
                    match epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), Some(&ts)) {
                        Ok(n) if n > 0 => {
                            let _ = rustix::io::write(&wake, &1u64.to_ne_bytes());
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
            .ok()?;
        Some(Self { stop })
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
