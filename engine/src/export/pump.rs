//! The socket pump: one connection's bytes on its reactor, whatever the protocol. It reads the
//! non-blocking socket into a receive buffer the protocol parses in place, sends what the
//! protocol queued with vectored writes straight from its buffers (giving the staging buffers
//! back once sent), closes once the protocol's work is done (or the peer stops reading its
//! replies), releases cached staging buffers when the connection is idle, and tells the reactor
//! whether the turn was busy. It also keeps the connection's account, for every protocol alike:
//! once the protocol attaches it to an export it counts among the export's connections and a
//! line at info says who connected; when it goes, a line says why (the first reason given: the
//! client closed, an error, idle, stop) and how many requests it served.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::in_place::SharedHold;
use drivers::iov::{IoVecs, SendPart, Written};
use drivers::nbd::stream::Stream;
use drivers::nbd::tls::TlsStream;
use drivers::IoBufs;
use hugepages::{BufferCache, BufferPool};

use super::listener::peer_of;
use super::Export;
use crate::reactor::{PollStatus, ReactorContext};

/// A closing connection whose peer does not read its last replies is dropped after this.
const CLOSE_GIVE_UP: Duration = Duration::from_secs(5);
/// Freed staging buffers a connection keeps for its next requests (a queue's depth of them).
const CACHED_BUFS: usize = 32;

/// What a connection's bytes go through: the socket itself, or a TLS session over it. The
/// plain socket's methods are the system calls the pump always made, inlined; a TLS session
/// copies what it sends into its own buffer and may hold input or output the socket does not
/// show, which the pump asks about only through the `holds_*` methods (always false for a plain
/// socket, so they cost it nothing).
pub trait Transport: AsFd {
    /// Reads what is there into `buf`: `Ok(0)` at the end of the stream, `AGAIN` for nothing.
    fn recv(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize>;
    /// Sends the gathered pieces, or part of them.
    fn send<const IOV: usize>(&mut self, iov: &IoVecs<'_, IOV>) -> rustix::io::Result<Written>;
    /// Sends output held back from earlier sends.
    fn flush_held(&mut self) -> rustix::io::Result<()> {
        Ok(())
    }
    /// Output taken but not on the socket yet.
    fn holds_output(&self) -> bool {
        false
    }
    /// Input received but not yet read by [`Transport::recv`] (the socket will not wake the
    /// reactor for it).
    fn holds_input(&self) -> bool {
        false
    }
    /// Why the transport failed, when it was more than the socket's error.
    fn failure(&self) -> Option<&str> {
        None
    }
    /// Closes the transport's own session before the socket is shut down.
    fn close(&mut self) {}
}

impl Transport for Stream {
    #[inline]
    fn recv(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        rustix::io::read(&*self, buf)
    }

    #[inline]
    fn send<const IOV: usize>(&mut self, iov: &IoVecs<'_, IOV>) -> rustix::io::Result<Written> {
        iov.writev(&*self)
    }
}

impl Transport for std::net::TcpStream {
    #[inline]
    fn recv(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        rustix::io::read(&*self, buf)
    }

    #[inline]
    fn send<const IOV: usize>(&mut self, iov: &IoVecs<'_, IOV>) -> rustix::io::Result<Written> {
        iov.writev(&*self)
    }
}

impl Transport for TlsStream {
    fn recv(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        TlsStream::recv(self, buf)
    }

    fn send<const IOV: usize>(&mut self, iov: &IoVecs<'_, IOV>) -> rustix::io::Result<Written> {
        self.flush_out()?;
        let room = self.room();
        if room == 0 {
            return Err(rustix::io::Errno::AGAIN);
        }
        let mut written = None;
        self.take(|out| written = Some(iov.copy_out(out, room)))?;
        // `take` always runs its closure.
        Ok(written.unwrap_or(Written {
            bytes: 0,
            cut: None,
        }))
    }

    fn flush_held(&mut self) -> rustix::io::Result<()> {
        self.flush_out()
    }

    fn holds_output(&self) -> bool {
        self.output_pending()
    }

    fn holds_input(&self) -> bool {
        self.input_pending()
    }

    fn failure(&self) -> Option<&str> {
        TlsStream::failure(self)
    }

    fn close(&mut self) {
        self.shutdown();
    }
}

/// What a protocol queues to send: a reply or a PDU made of byte pieces.
pub(crate) trait Outgoing {
    /// Its pieces, in order.
    fn parts(&self) -> impl Iterator<Item = SendPart<'_>>;
    /// Its length in bytes.
    fn total(&self) -> usize;
    /// Copies what it sends in place (a RAM disk's blocks) into its own buffers, so a write
    /// completing in a later turn cannot change it. Runs at the end of every turn.
    fn settle(&mut self);
    /// The same, when the socket took the first part of its RAM disk bytes and `hold` still
    /// holds them: the rest comes from the same snapshot as what was sent.
    fn settle_held(&mut self, hold: &SharedHold);
    /// The staging buffers it holds, given back once it is sent.
    fn into_bufs(self) -> Option<IoBufs>;
}

/// What a receive or a transmit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Bytes moved.
    Moved,
    /// Nothing to move now.
    Nothing,
    /// The peer is gone (end of stream, or a socket error): nothing more is read or sent.
    Closed,
}

/// How a protocol's poll turn ended, for [`SocketPump::end_turn`].
pub(crate) struct TurnEnd {
    /// The turn did work.
    pub busy: bool,
    /// The connection is closing.
    pub closing: bool,
    /// Work that must finish before the connection closes (I/O in flight).
    pub io_in_flight: bool,
    /// Requests not yet answered (the staging buffers cached are still wanted).
    pub requests_open: bool,
}

/// Why a connection closed, as its last log line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client closed it (end of stream, a disconnect request).
    ClientClosed,
    /// A socket error, or a request the connection cannot go on after.
    Error(String),
    /// The client was silent for too long.
    Idle,
    /// Its export, or the engine, stopped.
    Stop,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::ClientClosed => write!(f, "client closed"),
            CloseReason::Error(e) => write!(f, "error: {e}"),
            CloseReason::Idle => write!(f, "idle"),
            CloseReason::Stop => write!(f, "stop"),
        }
    }
}

/// The export a connection serves, once its protocol attached it.
struct Attached {
    /// The export's name (an NBD export, a subsystem NQN).
    name: String,
    /// The export it counts in (none for NVMe discovery).
    export: Option<Arc<Export>>,
    /// What else the protocol says of the connection (an NVMe queue and host).
    detail: String,
}

/// One connection's socket with its receive buffer, its send queue and its staging buffers.
pub(crate) struct SocketPump<S, O> {
    sock: S,
    /// Staging buffers, the recently freed ones first.
    bufs: BufferCache,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    input_closed: bool,
    tx: VecDeque<O>,
    tx_sent: usize,
    watched: bool,
    /// The socket also wakes the reactor when it can be written (replies wait for room).
    watching_output: bool,
    closing_since: Option<Instant>,
    /// The protocol's name ("NBD", "NVMe/TCP").
    protocol: &'static str,
    /// Who is on the other end.
    peer: String,
    attached: Option<Attached>,
    requests: u64,
    close_reason: Option<CloseReason>,
}

impl<S: Transport, O: Outgoing> SocketPump<S, O> {
    /// A pump over the non-blocking `sock` of a `protocol` connection, receiving up to
    /// `rx_size` bytes at once, with staging buffers from `pool`.
    pub(crate) fn new(protocol: &'static str, sock: S, pool: BufferPool, rx_size: usize) -> Self {
        let peer = peer_of(&sock);
        Self {
            protocol,
            peer,
            attached: None,
            requests: 0,
            close_reason: None,
            sock,
            bufs: BufferCache::new(pool, CACHED_BUFS),
            rx: vec![0u8; rx_size],
            rx_start: 0,
            rx_end: 0,
            input_closed: false,
            tx: VecDeque::new(),
            tx_sent: 0,
            watched: false,
            watching_output: false,
            closing_since: None,
        }
    }

    /// The connection now serves the export `name` (`export`: the one it counts in): logged
    /// at info with the peer and `detail` (empty, or what the protocol says of it).
    pub(crate) fn attach(&mut self, name: &str, export: Option<Arc<Export>>, detail: String) {
        if let Some(e) = &export {
            e.connection_opened();
        }
        let (protocol, peer) = (self.protocol, self.peer.as_str());
        if detail.is_empty() {
            tracing::info!(protocol, export = name, peer, "client connected");
        } else {
            tracing::info!(protocol, export = name, peer, detail, "client connected");
        }
        // Attached once: a second attach would count the connection twice.
        if let Some(old) = self.attached.replace(Attached {
            name: name.to_string(),
            export,
            detail,
        }) {
            if let Some(e) = old.export {
                e.connection_closed();
            }
        }
    }

    /// A request was answered.
    pub(crate) fn request_served(&mut self) {
        self.requests += 1;
    }

    /// The connection is closing for `reason`; the first reason given is the one logged.
    pub(crate) fn closing_because(&mut self, reason: CloseReason) {
        self.close_reason.get_or_insert(reason);
    }

    /// The staging buffer cache.
    pub(crate) fn bufs(&mut self) -> &mut BufferCache {
        &mut self.bufs
    }

    /// Staging buffers for `len` bytes at byte `offset`, split at multiples of `piece` (a
    /// pair's tracks, the pool's buffer size); `None` when the cache and pool cannot give them
    /// all now (with two to spare, so one request cannot take the last ones).
    pub(crate) fn staging(&mut self, offset: u64, len: u64, piece: u64) -> Option<IoBufs> {
        if (len / piece + 2) as usize > self.bufs.available() {
            return None;
        }
        let mut bufs = IoBufs::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let next = ((pos / piece + 1) * piece).min(end);
            let mut b = self.bufs.get()?;
            b.set_len((next - pos) as usize).ok()?;
            bufs.push(b);
            pos = next;
        }
        Some(bufs)
    }

    /// Has the reactor wake for input on the socket (once; a failure leaves it polling).
    pub(crate) fn watch(&mut self, cx: &ReactorContext) {
        if !self.watched {
            self.watched = cx.watch_fd(self.sock.as_fd()).is_ok();
        }
    }

    /// Reads what the socket has into the receive buffer.
    pub(crate) fn receive(&mut self) -> Flow {
        if self.input_closed {
            return Flow::Nothing;
        }
        let cap = self.rx.len();
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > cap / 2 || (self.rx_end == cap && self.rx_start > 0) {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        if self.rx_end == cap {
            return Flow::Nothing;
        }
        match self.sock.recv(&mut self.rx[self.rx_end..]) {
            Ok(0) => {
                self.input_closed = true;
                self.closing_because(CloseReason::ClientClosed);
                Flow::Closed
            }
            Ok(n) => {
                self.rx_end += n;
                Flow::Moved
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Flow::Nothing,
            Err(e) => {
                self.input_closed = true;
                let why = self
                    .sock
                    .failure()
                    .map_or_else(|| e.to_string(), str::to_string);
                self.closing_because(CloseReason::Error(format!("receive: {why}")));
                Flow::Closed
            }
        }
    }

    /// The bytes received and not yet consumed.
    pub(crate) fn input(&self) -> &[u8] {
        &self.rx[self.rx_start..self.rx_end]
    }

    /// Marks the first `n` bytes of [`SocketPump::input`] consumed.
    pub(crate) fn consume(&mut self, n: usize) {
        self.rx_start = (self.rx_start + n).min(self.rx_end);
    }

    /// True when the last receive filled the buffer to its end: the socket may hold more.
    pub(crate) fn input_at_end(&self) -> bool {
        self.rx_end == self.rx.len()
    }

    /// Stops reading (the protocol will not take more input).
    pub(crate) fn close_input(&mut self) {
        self.input_closed = true;
    }

    /// Queues `out` to be sent.
    pub(crate) fn send(&mut self, out: O) {
        self.tx.push_back(out);
    }

    /// The last thing queued.
    pub(crate) fn last_queued(&mut self) -> Option<&mut O> {
        self.tx.back_mut()
    }

    /// Drops everything queued (a fatal error replaces it).
    pub(crate) fn discard_output(&mut self) {
        self.tx.clear();
        self.tx_sent = 0;
    }

    /// Sends what is queued, `IOV` pieces per vectored write, until the socket takes no more.
    pub(crate) fn transmit<const IOV: usize>(&mut self) -> Flow {
        let mut flow = Flow::Nothing;
        if self.sock.holds_output() {
            if let Err(e) = self.sock.flush_held() {
                if !matches!(e, rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) {
                    return self.send_failed(e);
                }
            }
        }
        while !self.tx.is_empty() {
            let mut iov = IoVecs::<IOV>::new();
            iov.gather(self.tx.iter().flat_map(Outgoing::parts), self.tx_sent);
            let written = match self.sock.send(&iov) {
                Ok(w) => w,
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                Err(e) => return self.send_failed(e),
            };
            flow = Flow::Moved;
            self.tx_sent += written.bytes;
            while let Some(front) = self.tx.front() {
                let t = front.total();
                if self.tx_sent < t {
                    break;
                }
                self.tx_sent -= t;
                if let Some(bufs) = self.tx.pop_front().and_then(Outgoing::into_bufs) {
                    self.bufs.put_all(bufs);
                }
            }
            if let Some(hold) = written.cut {
                // The socket stopped inside the RAM disk bytes of what is now first.
                if let Some(front) = self.tx.front_mut() {
                    front.settle_held(&hold);
                }
            }
        }
        flow
    }

    /// The peer is gone: nothing more can be sent.
    fn send_failed(&mut self, e: rustix::io::Errno) -> Flow {
        self.tx.clear();
        self.input_closed = true;
        let why = self
            .sock
            .failure()
            .map_or_else(|| e.to_string(), str::to_string);
        self.closing_because(CloseReason::Error(format!("send: {why}")));
        Flow::Closed
    }

    /// The end of a poll turn: what is still queued stops pointing into device memory; a
    /// closing connection closes once its I/O is done and its replies are sent (or its peer
    /// has not read them for a while); an idle one gives its cached staging buffers back to
    /// the pool other connections share.
    pub(crate) fn end_turn(&mut self, cx: &mut ReactorContext, turn: TurnEnd) -> PollStatus {
        self.tx.iter_mut().for_each(Outgoing::settle);
        if turn.closing {
            let since = *self.closing_since.get_or_insert_with(Instant::now);
            let gave_up = since.elapsed() > CLOSE_GIVE_UP;
            let unsent = !self.tx.is_empty() || self.sock.holds_output();
            if !turn.io_in_flight && (!unsent || gave_up) {
                if unsent {
                    self.closing_because(CloseReason::Error(
                        "the client did not read its last replies".into(),
                    ));
                }
                if self.watched {
                    cx.unwatch_fd(self.sock.as_fd());
                    self.watched = false;
                }
                self.sock.close();
                let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
                return PollStatus::Done;
            }
            cx.wake_at(since + CLOSE_GIVE_UP);
        }
        if let Some(at) = self
            .bufs
            .note_idle(!turn.requests_open && self.tx.is_empty(), cx.turn_started())
        {
            cx.wake_at(at);
        }
        // Replies waiting for room in the socket go out on later turns without keeping the
        // reactor from parking: while some wait, the socket wakes it once it can be written
        // (a peer reading large replies is not left to the next timer), and a peer that reads
        // nothing costs nothing.
        let unsent = !self.tx.is_empty() || self.sock.holds_output();
        if self.watched {
            cx.watch_fd_output(self.sock.as_fd(), unsent, &mut self.watching_output);
        }
        // Input a TLS session holds does not wake the reactor: the next turn reads it.
        if turn.busy || (!turn.closing && self.sock.holds_input()) {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

impl<S, O> Drop for SocketPump<S, O> {
    /// The connection is gone: it no longer counts in its export, and a line says why and
    /// what it did (at debug for one that never reached an export).
    fn drop(&mut self) {
        let (protocol, peer, requests) = (self.protocol, self.peer.as_str(), self.requests);
        // Dropped with no reason given: its reactor, so the engine, stopped.
        let reason = self
            .close_reason
            .take()
            .unwrap_or(CloseReason::Stop)
            .to_string();
        let reason = reason.as_str();
        let Some(a) = self.attached.take() else {
            tracing::debug!(
                protocol,
                peer,
                reason,
                "connection closed before reaching an export"
            );
            return;
        };
        if let Some(e) = &a.export {
            e.connection_closed();
        }
        let (export, detail) = (a.name.as_str(), a.detail.as_str());
        if detail.is_empty() {
            tracing::info!(
                protocol,
                export,
                peer,
                reason,
                requests,
                "client disconnected"
            );
        } else {
            tracing::info!(
                protocol,
                export,
                peer,
                detail,
                reason,
                requests,
                "client disconnected"
            );
        }
    }
}
