//! One NVMe/TCP queue (one TCP connection) as a poller on a reactor: this file is the
//! transport (PDUs, data transfer, responses, the poll turn); `io` executes the NVM I/O
//! commands on the export's channel, `controller` emulates the controller (Connect, the admin
//! commands, Identify).
//!
//! Phases: `AwaitIcReq` → (ICReq/ICResp) → `Ready`, where the first command must be Connect,
//! which binds the queue to a controller (a new one for the admin queue, an existing one by
//! controller id for an I/O queue). In either phase the connection may start closing (a fatal
//! error sent as C2HTermReq, the host gone, the export stopped, the ICReq or keep-alive timeout
//! expired): it reads nothing more and closes once its I/O in flight is answered. Input is parsed a whole PDU at a
//! time from the receive buffer; commands whose data the host sends by the transport get an R2T
//! and wait for their H2CData; I/O goes to the export's channel on this reactor and the
//! replies (C2HData straight from the DMA buffers, or from a RAM disk itself, then the response
//! capsule, or C2HData with SUCCESS alone when the host disabled SQ flow control) are sent with
//! vectored writes. Nothing blocks: out of buffers or command slots, it stops parsing until
//! completions free some.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::in_place::{InPlaceRead, SharedHold};
use drivers::iov::SendPart;
use drivers::nvme::spec::{self, cns, nvm, Command, Completion, Status};
use drivers::nvmf::fabrics::{self, admin, fctype, status, ConnectCmd, ConnectData};
use drivers::nvmf::pdu::{
    self, CapsuleResp, DataPdu, Digests, Frame, Header, HeaderBytes, IcResp, PduError, R2t, Side,
};
use drivers::{IoBufs, IoChannel, IoCompletion, IoError, IoOp, IoRequest};
use hugepages::{BufferPool, DmaBuf};
use slab::Slab;

use super::{Ctrl, NvmeTcp, NvmfServer};
use crate::export::{Address, CloseReason, Export, Flow, Outgoing, Protocol, SocketPump, TurnEnd};
use crate::reactor::{PollStatus, Poller, ReactorContext};

mod auth;
mod controller;
mod io;

use io::{host_to_controller, Payload, Pending, Stage};

/// Most in-capsule data a command may carry.
pub const IN_CAPSULE: usize = 8192;
/// Most data bytes of one H2CData PDU (MAXH2CDATA).
pub const MAXH2CDATA: usize = 128 << 10;
/// MDTS: 2^5 pages of 4 KiB = 128 KiB per command.
pub const MDTS: u8 = 5;
const MAX_XFER: usize = 4096 << MDTS;
/// Queue entries a host may ask for (MAXCMD, CAP.MQES + 1).
pub const QUEUE_ENTRIES: u16 = 128;
/// I/O queues a controller grants at most.
pub const MAX_IO_QUEUES: u32 = 64;
/// Receive buffer: the largest PDU and then some.
const RX_BUF: usize = 2 * MAXH2CDATA + 4096;
/// Vectors per writev (a turn's replies: 32 reads are a header and a buffer each).
const MAX_IOV: usize = 256;
/// Asynchronous event requests held at once (AERL + 1).
const MAX_AERS: usize = 4;
/// A connection must send its ICReq within this.
const IC_TIMEOUT: Duration = Duration::from_secs(10);

enum Head {
    Pdu(HeaderBytes),
    Raw(Vec<u8>),
}

enum Body {
    None,
    Bufs(IoBufs),
    Bytes(Vec<u8>),
    /// A RAM disk's blocks, sent from where they are, with the staging buffers reserved for
    /// them (so memory stays bounded by the pool, as for any read). Never kept past the poll
    /// turn that made it: what is still queued then is copied into those buffers
    /// ([`Body::settle`]), so the read returns the blocks as they were at the end of that turn
    /// and a write completing later cannot change them.
    Region(InPlaceRead, IoBufs),
}

impl Body {
    /// The same bytes, copied out of a RAM disk into the reserved buffers if in place (under
    /// `hold` when the caller holds the blocks already).
    fn settle(self, hold: Option<&SharedHold>) -> Body {
        match self {
            Body::Region(read, mut bufs) => {
                // The buffers were reserved for exactly the read's length.
                let copied = match hold {
                    Some(h) => read.read_into_held(&mut bufs, h),
                    None => read.read_into(&mut bufs),
                };
                debug_assert!(copied.is_ok(), "staging buffers longer than the read");
                Body::Bufs(bufs)
            }
            other => other,
        }
    }
}

/// A PDU waiting to be sent.
struct Out {
    head: Head,
    body: Body,
    digest: Option<[u8; 4]>,
}

impl Outgoing for Out {
    fn parts(&self) -> impl Iterator<Item = SendPart<'_>> {
        let head: &[u8] = match &self.head {
            Head::Pdu(h) => h.as_slice(),
            Head::Raw(v) => v,
        };
        let (bytes, bufs) = match &self.body {
            Body::None => (None, None),
            Body::Bufs(b) => (None, Some(b.iter().map(|b| b.as_slice().into()))),
            Body::Bytes(v) => (Some(v.as_slice().into()), None),
            Body::Region(r, _) => (Some(r.into()), None),
        };
        std::iter::once(head.into())
            .chain(bytes)
            .chain(bufs.into_iter().flatten())
            .chain(self.digest.as_ref().map(|d| d[..].into()))
    }

    fn total(&self) -> usize {
        self.parts().map(|p| p.len()).sum()
    }

    fn settle(&mut self) {
        if matches!(self.body, Body::Region(..)) {
            self.body = std::mem::replace(&mut self.body, Body::None).settle(None);
        }
    }

    fn settle_held(&mut self, hold: &SharedHold) {
        if matches!(self.body, Body::Region(..)) {
            self.body = std::mem::replace(&mut self.body, Body::None).settle(Some(hold));
        }
    }

    fn into_bufs(self) -> Option<IoBufs> {
        match self.body {
            Body::Bufs(bufs) | Body::Region(_, bufs) => Some(bufs),
            Body::None | Body::Bytes(_) => None,
        }
    }
}

#[derive(PartialEq, Eq)]
enum Phase {
    AwaitIcReq,
    Ready,
}

/// One connection's poller.
pub struct NvmfConn {
    name: String,
    pump: SocketPump<TcpStream, Out>,
    server: Arc<NvmfServer>,
    listen: Address,
    /// The host's address and what was checked of it.
    host: controller::HostCheck,
    phase: Phase,
    digests: Digests,
    opened: Instant,
    qid: Option<u16>,
    sqsize: u16,
    sqhd: u16,
    /// The host asked for SQ flow control to be disabled: SQHD is not reported and successful
    /// reads end with a C2HData carrying SUCCESS instead of a response capsule.
    sq_flow_disabled: bool,
    ctrl: Option<Arc<Ctrl>>,
    export: Option<Arc<Export>>,
    channel: Option<Box<dyn IoChannel>>,
    pending: Slab<Pending>,
    aers: Vec<u16>,
    done: Vec<IoCompletion>,
    /// Channel requests of the command being executed (kept to reuse its allocation).
    reqs: Vec<(IoOp, u64, u64, IoBufs)>,
    closing: bool,
    last_keep_alive: Instant,
    /// DH-HMAC-CHAP, when the host must authenticate the queue.
    auth: Option<Box<auth::QueueAuth>>,
}

fn cqe(cid: u16, status: Status, result: u32, sqhd: u16, qid: u16) -> Completion {
    Completion {
        result,
        sq_head: sqhd,
        sq_id: qid,
        cid,
        phase: false,
        status,
    }
}

impl NvmfConn {
    /// A poller for an accepted connection on `listen` from `peer`.
    pub fn new(
        sock: TcpStream,
        server: Arc<NvmfServer>,
        listen: Address,
        peer: String,
        pool: BufferPool,
    ) -> Self {
        let now = Instant::now();
        Self {
            name: format!("nvmf:{listen}"),
            pump: SocketPump::new("NVMe/TCP", sock, pool, RX_BUF),
            server,
            listen,
            host: controller::HostCheck::new(peer),
            phase: Phase::AwaitIcReq,
            digests: Digests::default(),
            opened: now,
            qid: None,
            sqsize: 0,
            sqhd: 0,
            sq_flow_disabled: false,
            ctrl: None,
            export: None,
            channel: None,
            pending: Slab::new(),
            aers: Vec::new(),
            done: Vec::new(),
            reqs: Vec::new(),
            closing: false,
            last_keep_alive: now,
            auth: None,
        }
    }

    fn fatal(&mut self, e: PduError) {
        tracing::warn!(listen = %self.listen, error = %e, "NVMe/TCP connection ended");
        self.pump.closing_because(CloseReason::Error(e.to_string()));
        if !self.closing {
            self.pump.discard_output();
            self.pump.send(Out {
                head: Head::Raw(e.term().encode_c2h().to_vec()),
                body: Body::None,
                digest: None,
            });
            self.closing = true;
        }
    }

    fn respond(&mut self, cid: u16, st: Status, result: u32) {
        self.pump.request_served();
        let c = cqe(cid, st, result, self.sqhd, self.qid.unwrap_or(0));
        self.pump.send(Out {
            head: Head::Pdu(CapsuleResp::new(c).encode(self.digests)),
            body: Body::None,
            digest: None,
        });
    }

    /// C2HData with `body` (one PDU, LAST), then the response capsule; or, when SQ flow control
    /// is disabled, the C2HData alone with SUCCESS set.
    fn respond_data(&mut self, cid: u16, mut body: Body, len: usize) {
        if len > 0 {
            let success = self.sq_flow_disabled;
            if self.digests.data {
                // The digest must cover exactly the bytes sent: fix them now.
                body = body.settle(None);
            }
            let digest = self.digests.data.then(|| {
                let c = match &body {
                    Body::Bufs(b) => pdu::crc32c(b.iter().map(DmaBuf::as_slice)),
                    Body::Bytes(v) => pdu::crc32c([v.as_slice()]),
                    // Settled just above: never a region here.
                    Body::None | Body::Region(..) => 0,
                };
                c.to_le_bytes()
            });
            let h = DataPdu {
                cccid: cid,
                ttag: 0,
                offset: 0,
                len: len as u32,
                last: true,
                success,
            }
            .encode_c2h(self.digests);
            self.pump.send(Out {
                head: Head::Pdu(h),
                body,
                digest,
            });
            if success {
                self.pump.request_served();
                return;
            }
        }
        self.respond(cid, Status::SUCCESS, 0);
    }

    fn bump_sqhd(&mut self) {
        if self.sq_flow_disabled {
            return;
        }
        let entries = self.sqsize as u32 + 1;
        self.sqhd = ((self.sqhd as u32 + 1) % entries.max(1)) as u16;
    }

    /// DMA buffers for `len` bytes at byte `offset`, split at the export's pieces; `None`
    /// when the pool cannot give them now.
    fn buffers(&mut self, offset: u64, len: u64) -> Option<IoBufs> {
        let piece = self.export.as_ref()?.piece_size(NvmeTcp::BUF_SIZE as u64);
        self.pump.staging(offset, len, piece)
    }

    /// Handles one whole PDU. False: not now (no buffers), leave it in the buffer.
    fn handle(&mut self, f: Frame) -> bool {
        match f.header {
            Header::IcReq(req) => {
                if req.hpda != 0 {
                    // Alignment of the data we send is not offered: CPDA stays 0, HPDA ignored
                    // is not allowed by the host, so refuse.
                    self.fatal(PduError::new(
                        pdu::fes::UNSUPPORTED_PARAMETER,
                        10,
                        "HPDA is not supported",
                    ));
                    return true;
                }
                self.digests = req.digests;
                self.phase = Phase::Ready;
                let resp = IcResp {
                    cpda: 0,
                    digests: req.digests,
                    maxh2cdata: MAXH2CDATA as u32,
                };
                self.pump.send(Out {
                    head: Head::Raw(resp.encode().to_vec()),
                    body: Body::None,
                    digest: None,
                });
                true
            }
            Header::Cmd(cmd) => self.command(cmd, &f),
            Header::H2cData(d) => {
                self.h2c_data(d, &f);
                true
            }
            Header::Term(t) => {
                tracing::debug!(fes = t.fes, "the host ended the NVMe/TCP connection");
                self.pump.closing_because(CloseReason::ClientClosed);
                self.closing = true;
                true
            }
            _ => {
                self.fatal(PduError::new(
                    pdu::fes::INVALID_HEADER_FIELD,
                    0,
                    "unexpected PDU",
                ));
                true
            }
        }
    }

    fn h2c_data(&mut self, d: DataPdu, f: &Frame) {
        let key = d.ttag as usize;
        let ok = self
            .pending
            .get(key)
            .is_some_and(|p| p.stage == Stage::Data && p.cmd.cid() == d.cccid);
        if !ok {
            self.fatal(PduError::new(
                pdu::fes::INVALID_HEADER_FIELD,
                10,
                "H2CData for no outstanding R2T",
            ));
            return;
        }
        let Some(p) = self.pending.get_mut(key) else {
            return;
        };
        let (off, len) = (d.offset as usize, d.len as usize);
        if off != p.received || off + len > p.expected {
            self.fatal(PduError::new(
                pdu::fes::DATA_OUT_OF_RANGE,
                12,
                "H2CData outside the requested range",
            ));
            return;
        }
        if !f.data_digest_ok {
            p.failed.get_or_insert(status::TRANSIENT_TRANSPORT);
        } else if p.failed.is_none() {
            p.payload
                .write_at(off, &self.pump.input()[f.data_at..f.data_at + len]);
        }
        p.received += len;
        let complete = p.received == p.expected;
        if complete != d.last {
            self.fatal(PduError::new(
                pdu::fes::SEQUENCE_ERROR,
                1,
                "LAST_PDU does not match the end of the data",
            ));
            return;
        }
        if complete {
            let p = self.pending.remove(key);
            match p.failed {
                Some(st) => {
                    let cid = p.cmd.cid();
                    self.respond(cid, st, 0);
                }
                None => self.execute(p.cmd, p.payload),
            }
        }
    }

    /// A command capsule. False when it must wait for buffers.
    fn command(&mut self, cmd: Command, f: &Frame) -> bool {
        let cid = cmd.cid();
        let admin_q = self.qid.is_none_or(|q| q == 0);
        let (sgl_type, sgl_len, sgl_addr) = fabrics::sgl(&cmd);
        let h2c = host_to_controller(&cmd);
        let is_data_cmd = sgl_len > 0 && (cmd.dw[0] >> 14) & 3 == 1;
        // Reserve DMA buffers for reads and writes first: nothing is consumed until they exist.
        let io_rw = !admin_q && matches!(cmd.opcode(), nvm::READ | nvm::WRITE);
        // A RAM disk takes in-capsule write data straight from the receive buffer.
        let in_place = io_rw && h2c && is_data_cmd && f.data_len > 0 && self.in_place();
        let mut dma = None;
        if io_rw && is_data_cmd && !in_place && (sgl_len as usize) <= MAX_XFER {
            let (lba, _) = cmd.range();
            let bs = self
                .export
                .as_ref()
                .map_or(4096, |e| e.bdev.geometry().block_size as u64);
            match self.buffers(lba.saturating_mul(bs), sgl_len as u64) {
                Some(b) => dma = Some(b),
                None => return false,
            }
        }
        if self.qid.is_some() {
            self.bump_sqhd();
        }
        if !f.data_digest_ok {
            self.respond(cid, status::TRANSIENT_TRANSPORT, 0);
            return true;
        }
        if self.qid.is_none()
            && !(cmd.opcode() == fabrics::OPC_FABRICS
                && fabrics::fabrics_type(&cmd) == fctype::CONNECT)
        {
            self.respond(cid, status::SEQUENCE_ERROR, 0);
            return true;
        }
        if f.data_len > 0 {
            // In-capsule data: an offset data block of exactly that length, host to controller.
            if sgl_type != fabrics::SGL_INCAPSULE || !h2c {
                self.respond(cid, status::SGL_TYPE_INVALID, 0);
                return true;
            }
            if sgl_addr != 0 {
                self.respond(cid, status::SGL_OFFSET_INVALID, 0);
                return true;
            }
            if sgl_len as usize != f.data_len {
                self.respond(cid, status::SGL_LENGTH_INVALID, 0);
                return true;
            }
            if in_place {
                self.write_in_place(&cmd, f);
                return true;
            }
            let data = &self.pump.input()[f.data_at..f.data_at + f.data_len];
            let mut payload = match dma {
                Some(bufs) => Payload::Dma(bufs),
                None => Payload::Small(vec![0u8; data.len()]),
            };
            payload.write_at(0, data);
            self.execute(cmd, payload);
            return true;
        }
        if h2c && is_data_cmd {
            if sgl_type != fabrics::SGL_TRANSPORT {
                self.respond(cid, status::SGL_TYPE_INVALID, 0);
                return true;
            }
            let limit = if io_rw { MAX_XFER } else { IN_CAPSULE };
            if sgl_len as usize > limit {
                self.respond(cid, status::SGL_LENGTH_INVALID, 0);
                return true;
            }
            // Refuse before asking for data what cannot succeed.
            if io_rw {
                if let Some(st) = self.check_rw(&cmd, true) {
                    self.respond(cid, st, 0);
                    return true;
                }
            }
            if self.pending.len() >= QUEUE_ENTRIES as usize * 2 {
                self.fatal(PduError::new(
                    pdu::fes::SEQUENCE_ERROR,
                    0,
                    "more commands than the queue holds",
                ));
                return true;
            }
            let payload = match dma {
                Some(b) => Payload::Dma(b),
                None => Payload::Small(vec![0u8; sgl_len as usize]),
            };
            let key = self.pending.insert(Pending {
                cmd,
                payload,
                expected: sgl_len as usize,
                received: 0,
                stage: Stage::Data,
                failed: None,
                left: 0,
                result: Status::SUCCESS,
                read_bufs: IoBufs::new(),
            });
            if key > u16::MAX as usize {
                self.fatal(PduError::new(
                    pdu::fes::SEQUENCE_ERROR,
                    0,
                    "too many commands",
                ));
                return true;
            }
            let h = R2t {
                cccid: cid,
                ttag: key as u16,
                offset: 0,
                len: sgl_len,
            }
            .encode(self.digests);
            self.pump.send(Out {
                head: Head::Pdu(h),
                body: Body::None,
                digest: None,
            });
            return true;
        }
        if is_data_cmd && sgl_type != fabrics::SGL_TRANSPORT {
            self.respond(cid, status::SGL_TYPE_INVALID, 0);
            return true;
        }
        let payload = match dma {
            Some(b) => Payload::Dma(b),
            None => Payload::None,
        };
        self.execute(cmd, payload);
        true
    }

    /// Parses and handles whole PDUs from the receive buffer.
    fn parse(&mut self) {
        while !self.closing {
            if self.pending.len() >= QUEUE_ENTRIES as usize * 2 {
                break;
            }
            let digests = (self.phase == Phase::Ready).then_some(self.digests);
            let max = MAXH2CDATA.max(IN_CAPSULE) + pdu::MAX_HEADER + 8;
            match pdu::parse_frame(self.pump.input(), Side::Controller, digests, max) {
                Ok(Some(f)) => {
                    let plen = f.plen;
                    if !self.handle(f) {
                        break;
                    }
                    self.pump.consume(plen);
                }
                Ok(None) => break,
                Err(e) => {
                    self.fatal(e);
                    break;
                }
            }
        }
    }
}

impl Poller for NvmfConn {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        self.pump.watch(cx);
        if self.channel.is_none() {
            if let Some(e) = self.export.clone() {
                match e
                    .bdev
                    .open_channel(&cx.channel_context(QUEUE_ENTRIES as u32 * 2))
                {
                    Ok(c) => self.channel = Some(c),
                    Err(err) => {
                        tracing::error!(%err, nqn = %e.name, "NVMe/TCP queue cannot open its channel");
                        self.pump
                            .closing_because(CloseReason::Error(format!("no channel: {err}")));
                        self.closing = true;
                    }
                }
            }
        }
        if !self.closing {
            let now = Instant::now();
            if self.phase == Phase::AwaitIcReq && now.duration_since(self.opened) > IC_TIMEOUT {
                self.pump.closing_because(CloseReason::Idle);
                self.closing = true;
            }
            if self.export.as_ref().is_some_and(|e| e.is_closed()) {
                self.pump.closing_because(CloseReason::Stop);
                self.closing = true;
            }
            self.check_host_still_allowed();
            if let Some(c) = &self.ctrl {
                if self.qid != Some(0) && c.dead.load(Ordering::SeqCst) {
                    self.pump.closing_because(CloseReason::Error(
                        "its controller's admin queue closed".into(),
                    ));
                    self.closing = true;
                }
                if self.qid == Some(0) && c.kato_ms > 0 {
                    let limit = Duration::from_millis(c.kato_ms as u64) + Duration::from_secs(2);
                    if now.duration_since(self.last_keep_alive) > limit {
                        tracing::warn!(
                            cntlid = c.cntlid,
                            "NVMe/TCP keep alive timeout: controller dropped"
                        );
                        self.pump.closing_because(CloseReason::Idle);
                        self.closing = true;
                    } else {
                        cx.wake_at(self.last_keep_alive + limit);
                    }
                }
            }
            if self.phase == Phase::AwaitIcReq {
                cx.wake_at(self.opened + IC_TIMEOUT);
            }
        }
        let mut busy = false;
        for _ in 0..4 {
            if self.closing {
                break;
            }
            match self.pump.receive() {
                Flow::Moved => {}
                Flow::Closed => self.closing = true,
                Flow::Nothing => break,
            }
            busy = true;
            self.parse();
        }
        if let Some(ch) = self.channel.as_mut() {
            ch.poll(&mut self.done);
        }
        let mut done = std::mem::take(&mut self.done);
        for c in done.drain(..) {
            busy = true;
            self.on_completion(c);
        }
        // Keep the allocation unless handling the completions queued new ones.
        if self.done.is_empty() {
            self.done = done;
        }
        // Input held back for lack of buffers or slots can go on now.
        if !self.closing && !self.pump.input().is_empty() {
            self.parse();
        }
        match self.pump.transmit::<MAX_IOV>() {
            Flow::Moved => busy = true,
            Flow::Closed => {
                busy = true;
                self.closing = true;
            }
            Flow::Nothing => {}
        }
        let turn = TurnEnd {
            busy: busy || !self.done.is_empty(),
            closing: self.closing,
            io_in_flight: self.channel.is_some()
                && self.pending.iter().any(|(_, p)| p.stage == Stage::Io),
            requests_open: !self.pending.is_empty(),
        };
        self.pump.end_turn(cx, turn)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for NvmfConn {
    fn drop(&mut self) {
        if let (Some(c), Some(q)) = (&self.ctrl, self.qid) {
            if q == 0 {
                c.dead.store(true, Ordering::SeqCst);
            } else {
                c.qids
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|&x| x != q);
            }
        }
    }
}
