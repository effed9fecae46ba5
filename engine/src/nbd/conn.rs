//! The transmission phase of one NBD connection: a poller on a reactor with a non-blocking
//! socket. It reads requests in bulk, submits them to the export's channel, and sends replies
//! with vectored writes straight from the DMA buffers the data was read into (or, for a RAM
//! disk, from the RAM disk itself). It never blocks: when buffers or queue slots run out it
//! stops reading until completions free them.

use std::sync::Arc;

use drivers::in_place::{InPlaceRead, SharedHold};
use drivers::iov::SendPart;
use drivers::nbd::proto::{self, chunk, cmd, err, Request, REQUEST_LEN};
use drivers::{IoBufs, IoChannel, IoCompletion, IoError, IoOp, IoRequest};
use hugepages::{BufferPool, DmaBuf};
use slab::Slab;

use super::block_status;
use super::meta::Selected;
use crate::export::{
    submit_or_complete, CloseReason, Export, Flow, Outgoing, SocketPump, Stream, Transport, TurnEnd,
};
use crate::reactor::{PollStatus, Poller, ReactorContext};

/// Bytes of socket input buffered at once.
const RX_BUF: usize = 256 << 10;
/// Requests in flight per connection.
const MAX_INFLIGHT: usize = 256;
/// Vectors per writev.
const MAX_IOV: usize = 128;

/// A reply waiting to be sent: header bytes, then optional data buffers.
struct Out {
    head: [u8; 32],
    head_len: usize,
    data: IoBufs,
    data_len: usize,
    /// A RAM disk's blocks sent in place of `data` (which is reserved for them). Never kept
    /// past the poll turn that made it: [`Out::settle`] copies what is still queued then, so
    /// the read returns the blocks as they were at the end of that turn.
    region: Option<InPlaceRead>,
    tail: Vec<u8>,
}

impl Outgoing for Out {
    fn total(&self) -> usize {
        self.head_len + self.data_len + self.tail.len()
    }

    fn parts(&self) -> impl Iterator<Item = SendPart<'_>> {
        let (region, data) = match &self.region {
            Some(r) => (Some(r.into()), None),
            None => (None, Some(self.data.iter().map(|b| b.as_slice().into()))),
        };
        std::iter::once(self.head[..self.head_len].into())
            .chain(region)
            .chain(data.into_iter().flatten())
            .chain(std::iter::once(self.tail.as_slice().into()))
    }

    /// Copies RAM disk bytes sent in place into the reserved buffers, so a write that completes
    /// in a later turn cannot change what this read returns.
    fn settle(&mut self) {
        if let Some(r) = self.region.take() {
            // The buffers were reserved for exactly the read's length.
            let copied = r.read_into(&mut self.data);
            debug_assert!(copied.is_ok(), "staging buffers longer than the read");
        }
    }

    fn settle_held(&mut self, hold: &SharedHold) {
        if let Some(r) = self.region.take() {
            let copied = r.read_into_held(&mut self.data, hold);
            debug_assert!(copied.is_ok(), "staging buffers longer than the read");
        }
    }

    fn into_bufs(self) -> Option<IoBufs> {
        Some(self.data)
    }
}

/// A write request whose payload is still arriving.
struct Incoming {
    req: Request,
    bufs: IoBufs,
    filled: usize,
    /// Discard the payload and answer this error instead (read-only export, bad range).
    reject: Option<u32>,
}

struct Inflight {
    req: Request,
}

/// One connection's poller, over a plain socket or (`T` = [`drivers::nbd::tls::TlsStream`]) a
/// TLS session.
pub struct NbdConn<T = Stream> {
    name: String,
    pump: SocketPump<T, Out>,
    export: Arc<Export>,
    structured: bool,
    /// Metadata contexts selected in the handshake, for block status.
    meta: Selected,
    channel: Option<Box<dyn IoChannel>>,
    incoming: Option<Incoming>,
    inflight: Slab<Inflight>,
    done: Vec<IoCompletion>,
    /// No new request is taken; the connection closes once those in flight are answered.
    closing: bool,
}

impl<T: Transport> NbdConn<T> {
    /// A poller for a connection that finished its handshake.
    pub fn new(
        sock: T,
        export: Arc<Export>,
        structured: bool,
        meta: Selected,
        pool: BufferPool,
    ) -> Self {
        let mut pump = SocketPump::new("NBD", sock, pool, RX_BUF);
        pump.attach(&export.name, Some(Arc::clone(&export)), String::new());
        Self {
            name: format!("nbd:{}", export.name),
            pump,
            export,
            structured,
            meta,
            channel: None,
            incoming: None,
            inflight: Slab::new(),
            done: Vec::new(),
            closing: false,
        }
    }

    /// Stops taking requests and reading, for `reason`: the connection closes once those in
    /// flight are answered.
    fn close(&mut self, reason: CloseReason) {
        self.pump.closing_because(reason);
        self.closing = true;
        self.pump.close_input();
    }

    /// Buffers for `len` bytes at `offset`, split at the export's boundary (a pair's tracks) and
    /// at the pool's buffer size; `None` when the pool cannot give them all now.
    fn buffers(&mut self, offset: u64, len: u64) -> Option<IoBufs> {
        let piece = self
            .export
            .piece_size(self.pump.bufs().pool().buf_size() as u64);
        self.pump.staging(offset, len, piece)
    }

    fn reply(&mut self, req: &Request, error: u32, data: IoBufs, msg: &str) {
        self.pump.request_served();
        let data_len: usize = data.iter().map(DmaBuf::len).sum();
        let mut head = [0u8; 32];
        let mut tail = Vec::new();
        let head_len;
        // Errors of block status go in a structured chunk with their message too.
        if self.structured && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS) {
            if error == 0 {
                let h = proto::structured_header(
                    chunk::FLAG_DONE,
                    chunk::OFFSET_DATA,
                    req.cookie,
                    8 + data_len as u32,
                );
                head[..20].copy_from_slice(&h);
                head[20..28].copy_from_slice(&req.offset.to_be_bytes());
                head_len = 28;
            } else {
                let msg = &msg.as_bytes()[..msg.len().min(4096)];
                let h = proto::structured_header(
                    chunk::FLAG_DONE,
                    chunk::ERROR,
                    req.cookie,
                    6 + msg.len() as u32,
                );
                head[..20].copy_from_slice(&h);
                head[20..24].copy_from_slice(&error.to_be_bytes());
                head[24..26].copy_from_slice(&(msg.len() as u16).to_be_bytes());
                head_len = 26;
                tail.extend_from_slice(msg);
            }
        } else {
            head[..16].copy_from_slice(&proto::simple_reply(error, req.cookie));
            head_len = 16;
        }
        let (data, data_len) = if error == 0 && req.kind == cmd::READ {
            (data, data_len)
        } else {
            self.pump.bufs().put_all(data);
            (IoBufs::new(), 0)
        };
        self.pump.send(Out {
            head,
            head_len,
            data,
            data_len,
            region: None,
            tail,
        });
    }

    fn submit(&mut self, req: Request, op: IoOp, bufs: IoBufs) {
        let key = self.inflight.insert(Inflight { req });
        let io = IoRequest {
            op,
            offset: req.offset,
            len: req.length as u64,
            bufs,
            tag: key as u64,
        };
        if let Some(ch) = self.channel.as_mut() {
            submit_or_complete(ch.as_mut(), io, &mut self.done);
        }
    }

    /// Checks a request's range; the NBD errno if it is bad.
    fn range_error(&self, req: &Request) -> Option<u32> {
        let bs = self.export.block_size() as u64;
        let size = self.export.size();
        let writes = matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        if req.length > proto::MAX_PAYLOAD
            && !matches!(req.kind, cmd::TRIM | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS)
        {
            return Some(err::EINVAL);
        }
        match req.offset.checked_add(req.length as u64) {
            Some(end) if end <= size => {}
            _ => return Some(if writes { err::ENOSPC } else { err::EINVAL }),
        }
        if !req.offset.is_multiple_of(bs) || !(req.length as u64).is_multiple_of(bs) {
            return Some(err::EINVAL);
        }
        if req.length == 0 && req.kind != cmd::FLUSH {
            return Some(err::EINVAL);
        }
        None
    }

    /// Parses and starts requests from the input buffer. False when it must wait for buffers.
    fn handle_input(&mut self) -> bool {
        loop {
            if let Some(mut inc) = self.incoming.take() {
                let avail = self.pump.input().len();
                let want = inc.req.length as usize - inc.filled;
                let n = avail.min(want);
                if inc.reject.is_none() {
                    // Copy the payload into the request's DMA buffers.
                    drivers::iov::copy_into(&mut inc.bufs, inc.filled, &self.pump.input()[..n]);
                }
                inc.filled += n;
                self.pump.consume(n);
                if inc.filled < inc.req.length as usize {
                    self.incoming = Some(inc);
                    return true;
                }
                let req = inc.req;
                match inc.reject {
                    Some(e) => self.reply(&req, e, IoBufs::new(), "write refused"),
                    None => {
                        let fua = req.flags & cmd::FLAG_FUA != 0;
                        self.submit(req, IoOp::Write { fua }, inc.bufs);
                    }
                }
                continue;
            }
            if self.closing || self.inflight.len() >= MAX_INFLIGHT {
                return true;
            }
            if self.pump.input().len() < REQUEST_LEN {
                return true;
            }
            let mut h = [0u8; REQUEST_LEN];
            h.copy_from_slice(&self.pump.input()[..REQUEST_LEN]);
            let Some(req) = Request::parse(&h) else {
                tracing::warn!(export = %self.export.name, "NBD request with a bad magic: closing");
                self.close(CloseReason::Error("a request with a bad magic".into()));
                return true;
            };
            let bad_range = self.range_error(&req);
            match req.kind {
                cmd::READ => {
                    if let Some(e) = bad_range {
                        self.pump.consume(REQUEST_LEN);
                        self.reply(&req, e, IoBufs::new(), "bad range");
                        continue;
                    }
                    let Some(bufs) = self.buffers(req.offset, req.length as u64) else {
                        return false;
                    };
                    self.pump.consume(REQUEST_LEN);
                    // A RAM disk's blocks are sent from where they are.
                    match self.read_in_place(req.offset, req.length as u64) {
                        Some(Ok(r)) => {
                            self.reply(&req, 0, bufs, "");
                            if let Some(out) = self.pump.last_queued() {
                                out.region = Some(r);
                            }
                        }
                        Some(Err(e)) => {
                            self.pump.bufs().put_all(bufs);
                            self.reply(&req, proto::errno_of(&e), IoBufs::new(), &e.to_string());
                        }
                        None => self.submit(req, IoOp::Read, bufs),
                    }
                }
                cmd::WRITE => {
                    if req.length > proto::MAX_PAYLOAD {
                        // The payload cannot be skipped safely: answer and close.
                        self.pump.consume(REQUEST_LEN);
                        self.reply(&req, err::EINVAL, IoBufs::new(), "write too large");
                        self.close(CloseReason::Error(format!(
                            "a write of {} bytes, over the limit",
                            req.length
                        )));
                        return true;
                    }
                    let reject = if !self.export.writable {
                        Some(err::EPERM)
                    } else {
                        bad_range
                    };
                    // A RAM disk takes a payload that is all here straight from the input.
                    let whole = REQUEST_LEN + req.length as usize;
                    if reject.is_none() && self.pump.input().len() >= whole && self.in_place() {
                        let data = &self.pump.input()[REQUEST_LEN..whole];
                        let done = self
                            .channel
                            .as_mut()
                            .and_then(|ch| ch.write_in_place(req.offset, data));
                        self.pump.consume(whole);
                        match done {
                            Some(Ok(())) => self.reply(&req, 0, IoBufs::new(), ""),
                            Some(Err(e)) => {
                                let msg = e.to_string();
                                self.reply(&req, proto::errno_of(&e), IoBufs::new(), &msg);
                            }
                            // The channel said it was memory: it cannot refuse.
                            None => self.reply(&req, err::EIO, IoBufs::new(), "write failed"),
                        }
                        continue;
                    }
                    let bufs = if reject.is_some() {
                        IoBufs::new()
                    } else {
                        match self.buffers(req.offset, req.length as u64) {
                            Some(b) => b,
                            None => return false,
                        }
                    };
                    self.pump.consume(REQUEST_LEN);
                    self.incoming = Some(Incoming {
                        req,
                        bufs,
                        filled: 0,
                        reject,
                    });
                }
                cmd::BLOCK_STATUS => {
                    self.pump.consume(REQUEST_LEN);
                    self.block_status(&req, bad_range);
                }
                cmd::DISC => {
                    self.pump.consume(REQUEST_LEN);
                    self.pump.closing_because(CloseReason::ClientClosed);
                    self.closing = true;
                    return true;
                }
                cmd::FLUSH => {
                    self.pump.consume(REQUEST_LEN);
                    self.submit(req, IoOp::Flush, IoBufs::new());
                }
                cmd::TRIM | cmd::WRITE_ZEROES => {
                    self.pump.consume(REQUEST_LEN);
                    let e = if !self.export.writable {
                        Some(err::EPERM)
                    } else {
                        bad_range
                    };
                    if let Some(e) = e {
                        self.reply(&req, e, IoBufs::new(), "refused");
                        continue;
                    }
                    let op = if req.kind == cmd::TRIM {
                        IoOp::Unmap
                    } else {
                        IoOp::WriteZeroes {
                            deallocate: req.flags & cmd::FLAG_NO_HOLE == 0,
                        }
                    };
                    self.submit(req, op, IoBufs::new());
                }
                _ => {
                    self.pump.consume(REQUEST_LEN);
                    self.reply(&req, err::EINVAL, IoBufs::new(), "unsupported command");
                }
            }
        }
    }

    /// Answers a block status request at once (each context's lookup is bounded).
    fn block_status(&mut self, req: &Request, bad_range: Option<u32>) {
        match block_status::reply(&self.meta, req, bad_range) {
            Ok(chunks) => {
                self.pump.request_served();
                self.pump.send(Out {
                    head: [0; 32],
                    head_len: 0,
                    data: IoBufs::new(),
                    data_len: 0,
                    region: None,
                    tail: chunks,
                });
            }
            Err((errno, msg)) => self.reply(req, errno, IoBufs::new(), &msg),
        }
    }

    /// True when the export's channel is memory the CPU reaches (a RAM disk).
    fn in_place(&self) -> bool {
        self.channel.as_ref().is_some_and(|c| c.in_place())
    }

    fn read_in_place(&mut self, offset: u64, len: u64) -> Option<Result<InPlaceRead, IoError>> {
        self.channel.as_mut()?.read_in_place(offset, len)
    }
}

impl<T: Transport + Send + 'static> Poller for NbdConn<T> {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.channel.is_none() {
            match self
                .export
                .bdev
                .open_channel(&cx.channel_context(MAX_INFLIGHT as u32))
            {
                Ok(c) => self.channel = Some(c),
                Err(e) => {
                    tracing::error!(%e, export = %self.export.name, "NBD connection cannot open its channel");
                    self.pump
                        .closing_because(CloseReason::Error(format!("no channel: {e}")));
                    return PollStatus::Done;
                }
            }
        }
        self.pump.watch(cx);
        if self.export.is_closed() && !self.closing {
            self.close(CloseReason::Stop);
        }
        let mut busy = false;
        for _ in 0..4 {
            if !self.closing {
                match self.pump.receive() {
                    Flow::Moved => busy = true,
                    Flow::Closed => {
                        busy = true;
                        self.close(CloseReason::ClientClosed);
                    }
                    Flow::Nothing => {}
                }
            }
            if !self.pump.input().is_empty() || self.incoming.is_some() {
                self.handle_input();
            }
            if !self.pump.input_at_end() || self.closing {
                break;
            }
        }
        if let Some(ch) = self.channel.as_mut() {
            ch.poll(&mut self.done);
        }
        let done = std::mem::take(&mut self.done);
        for c in done {
            busy = true;
            let Some(f) = self.inflight.try_remove(c.tag as usize) else {
                continue;
            };
            match c.result {
                Ok(()) => self.reply(&f.req, 0, c.bufs, ""),
                Err(e) => {
                    let msg = e.to_string();
                    let errno = proto::errno_of(&e);
                    self.reply(&f.req, errno, IoBufs::new(), &msg);
                }
            }
        }
        // Input held back for lack of buffers can go on now that completions freed some.
        if !self.closing && !self.pump.input().is_empty() {
            self.handle_input();
        }
        match self.pump.transmit::<MAX_IOV>() {
            Flow::Moved => busy = true,
            Flow::Closed => {
                busy = true;
                self.close(CloseReason::ClientClosed);
            }
            Flow::Nothing => {}
        }
        let turn = TurnEnd {
            busy: busy || !self.done.is_empty(),
            closing: self.closing,
            io_in_flight: !self.inflight.is_empty(),
            requests_open: !self.inflight.is_empty(),
        };
        self.pump.end_turn(cx, turn)
    }

    fn name(&self) -> &str {
        &self.name
    }
}
