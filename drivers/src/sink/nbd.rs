//! The NBD target: the image written to an NBD server's export. The handshake (fixed newstyle,
//! NBD_OPT_GO) runs with blocking I/O on the control thread that starts the backup; the
//! transmission then runs on the reactor over the non-blocking socket, each write sent with
//! one vectored send from the backup's DMA buffers (no copy), replies matched by cookie.

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use hugepages::DmaBuf;

use super::{Sink, SinkDone, SinkFull};
use crate::nbd::proto::{self, cmd, opt, rep, Request};
use crate::nbd::stream::Stream;
use crate::nbd::tls::{ClientTls, TlsStream};
use crate::tape::Manifest;
use crate::{IoBufs, IoError};

const TIMEOUT: Duration = Duration::from_secs(10);
const FLUSH_COOKIE: u64 = u64::MAX;
const MAX_INFLIGHT: usize = 64;

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdUri {
    /// `nbd://host[:port]/export`, or `nbds://...` (TLS).
    Tcp {
        /// host:port.
        addr: String,
        /// Export name.
        export: String,
        /// `nbds://`: TLS is required.
        tls: bool,
    },
    /// `nbd+unix:///export?socket=PATH`.
    Unix {
        /// Socket path.
        socket: String,
        /// Export name.
        export: String,
    },
}

impl NbdUri {
    /// Parses the URI forms NBD tools use.
    pub fn parse(uri: &str) -> Result<Self, String> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| format!("{uri}: nbd+unix needs ?socket=PATH"))?;
            let export = path.trim_start_matches('/').to_string();
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| format!("{uri}: nbd+unix needs ?socket=PATH"))?
                .to_string();
            return Ok(NbdUri::Unix { socket, export });
        }
        let (rest, tls) = match (uri.strip_prefix("nbd://"), uri.strip_prefix("nbds://")) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            (None, None) => {
                return Err(format!(
                    "{uri}: expected nbd://host[:port]/export, nbds://host[:port]/export or \
                     nbd+unix:///export?socket=PATH"
                ))
            }
        };
        let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() {
            return Err(format!("{uri}: no host"));
        }
        let addr = if host.contains(':') && !host.ends_with(']') {
            host.to_string()
        } else {
            format!("{host}:10809")
        };
        Ok(NbdUri::Tcp {
            addr,
            export: export.to_string(),
            tls,
        })
    }
}

/// The host part of `host:port` (an IPv6 address without its brackets).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The socket of a connection: plain, or a TLS session over it.
enum Conn {
    Plain(Stream),
    Tls(TlsStream),
}

impl Conn {
    fn socket(&self) -> &Stream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.socket(),
        }
    }
}

/// A connection in the transmission phase, made on a control thread.
pub struct NbdConnection {
    conn: Conn,
    size: u64,
    flags: u16,
    uri: String,
}

impl NbdConnection {
    /// Connects and selects the export with NBD_OPT_GO (blocking, with a timeout); an
    /// `nbds://` URI starts TLS first (NBD_OPT_STARTTLS) with `tls`, or with x509 and the
    /// system's CAs when `tls` is `None`. `tls` with another URI is refused.
    pub fn connect(uri: &str, tls: Option<ClientTls<'_>>) -> Result<Self, String> {
        let parsed = NbdUri::parse(uri)?;
        let e = |e: std::io::Error| format!("{uri}: {e}");
        let (stream, export, host) = match parsed {
            NbdUri::Tcp { addr, export, tls } => {
                let s = Stream::Tcp(TcpStream::connect(&addr).map_err(e)?);
                (s, export, tls.then(|| host_of(&addr).to_string()))
            }
            NbdUri::Unix { socket, export } => (
                Stream::Unix(UnixStream::connect(&socket).map_err(e)?),
                export,
                None,
            ),
        };
        let mut stream = stream;
        stream.set_mode(Some(TIMEOUT)).map_err(e)?;
        let ctx = |m: String| format!("{uri}: {m}");
        greet(&mut stream).map_err(ctx)?;
        let mut conn = match (host, tls) {
            (Some(host), tls) => {
                starttls(&mut stream).map_err(ctx)?;
                let tls = tls.unwrap_or(ClientTls::X509 {
                    ca_file: None,
                    cert_file: None,
                    key_file: None,
                });
                Conn::Tls(crate::nbd::tls::connect(tls, &host, stream).map_err(ctx)?)
            }
            (None, Some(_)) => return Err(ctx("TLS settings need an nbds:// URI".into())),
            (None, None) => Conn::Plain(stream),
        };
        let (size, flags) = match &mut conn {
            Conn::Plain(s) => go(s, &export),
            Conn::Tls(t) => go(t, &export),
        }
        .map_err(ctx)?;
        Ok(Self {
            conn,
            size,
            flags,
            uri: uri.to_string(),
        })
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True when the server takes NBD_CMD_WRITE_ZEROES.
    pub fn writes_zeroes(&self) -> bool {
        self.flags & proto::tflag::SEND_WRITE_ZEROES != 0
    }

    /// True when the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & proto::tflag::READ_ONLY != 0
    }

    /// Checks that the export can take an image of `size` bytes.
    pub fn check(&self, size: u64) -> Result<(), String> {
        if self.size < size {
            return Err(format!(
                "{}: the export holds {} bytes, the image needs {size}",
                self.uri, self.size
            ));
        }
        if self.read_only() {
            return Err(format!("{}: the export is read-only", self.uri));
        }
        Ok(())
    }
}

/// Reads the server's greeting and answers with the client's flags.
fn greet(s: &mut Stream) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).map_err(io)?;
    if u64::from_be_bytes(hello[..8].try_into().map_err(|_| "short")?) != proto::NBDMAGIC
        || u64::from_be_bytes(hello[8..16].try_into().map_err(|_| "short")?) != proto::IHAVEOPT
    {
        return Err("not an NBD newstyle server".into());
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle".into());
    }
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if server_flags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).map_err(io)
}

/// Sends an option.
fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> Result<(), String> {
    let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    s.write_all(&o).map_err(|e| e.to_string())
}

/// Reads one option reply: its type and payload.
fn option_reply(s: &mut impl Read) -> Result<(u32, Vec<u8>), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).map_err(io)?;
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    if len > 1 << 20 {
        return Err(format!("option reply of {len} bytes"));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).map_err(io)?;
    Ok((kind, payload))
}

/// Asks for TLS with NBD_OPT_STARTTLS; the TLS handshake follows.
fn starttls(s: &mut Stream) -> Result<(), String> {
    send_option(s, opt::STARTTLS, &[])?;
    match option_reply(s)? {
        (rep::ACK, _) => Ok(()),
        (kind, payload) => Err(format!(
            "the server refused TLS (reply {kind:#x}): {}",
            String::from_utf8_lossy(&payload)
        )),
    }
}

/// Selects `export` with NBD_OPT_GO: its size and transmission flags.
fn go<S: Read + Write>(s: &mut S, export: &str) -> Result<(u64, u16), String> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, opt::GO, &data)?;
    let (mut size, mut flags) = (None, 0);
    loop {
        let (kind, payload) = option_reply(s)?;
        match kind {
            rep::ACK => break,
            rep::INFO if payload.len() >= 12 && payload[..2] == [0, 0] => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&payload[2..10]);
                size = Some(u64::from_be_bytes(b));
                flags = u16::from_be_bytes([payload[10], payload[11]]);
            }
            k if k & (1 << 31) != 0 => {
                return Err(format!(
                    "the server refused export '{export}': {}",
                    String::from_utf8_lossy(&payload)
                ))
            }
            _ => {}
        }
    }
    let size = size.ok_or("the server sent no export size")?;
    Ok((size, flags))
}

struct Out {
    head: [u8; proto::REQUEST_LEN],
    cookie: u64,
    bufs: IoBufs,
    len: usize,
}

/// The NBD backup target.
pub struct NbdSink {
    conn: Conn,
    uri: String,
    tx: VecDeque<Out>,
    tx_sent: usize,
    waiting: HashMap<u64, (u64, IoBufs)>,
    rx: Vec<u8>,
    rx_len: usize,
    failed: Option<IoError>,
    flushing: bool,
    finished: Option<Result<(), IoError>>,
}

impl NbdSink {
    /// Takes a connection for an image of `size` bytes.
    pub fn new(conn: NbdConnection, size: u64) -> Result<Self, String> {
        conn.check(size)?;
        let mut sock = conn.conn;
        match &mut sock {
            Conn::Plain(s) => s.set_mode(None),
            Conn::Tls(t) => t.end_deadline(),
        }
        .map_err(|e| e.to_string())?;
        Ok(Self {
            conn: sock,
            uri: conn.uri,
            tx: VecDeque::new(),
            tx_sent: 0,
            waiting: HashMap::new(),
            rx: vec![0u8; 4096],
            rx_len: 0,
            failed: None,
            flushing: false,
            finished: None,
        })
    }

    /// Queues a request; `length` is its data's unless given (a write of zeroes has none).
    fn queue(&mut self, kind: u16, cookie: u64, offset: u64, bufs: IoBufs, length: Option<u32>) {
        let len: usize = bufs.iter().map(DmaBuf::len).sum();
        let head = Request {
            flags: 0,
            kind,
            cookie,
            offset,
            length: length.unwrap_or(len as u32),
        }
        .encode();
        self.tx.push_back(Out {
            head,
            cookie,
            bufs,
            len,
        });
    }

    /// The error of a failed send or receive: a TLS failure with its reason.
    fn io_failed(&self, e: rustix::io::Errno) -> IoError {
        match &self.conn {
            Conn::Tls(t) => match t.failure() {
                Some(why) => IoError::Aborted(why.to_string()),
                None => IoError::Device(e.raw_os_error()),
            },
            Conn::Plain(_) => IoError::Device(e.raw_os_error()),
        }
    }

    fn transmit(&mut self) {
        if let Conn::Tls(t) = &mut self.conn {
            // Records of earlier writes the socket did not take yet.
            if let Err(e) = t.flush_out() {
                let failed = self.io_failed(e);
                self.failed.get_or_insert(failed);
            }
        }
        while !self.tx.is_empty() && self.failed.is_none() {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(64);
            let mut skip = self.tx_sent;
            'all: for out in &self.tx {
                for part in
                    std::iter::once(&out.head[..]).chain(out.bufs.iter().map(DmaBuf::as_slice))
                {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    iov.push(IoSlice::new(&part[skip..]));
                    skip = 0;
                    if iov.len() == 64 {
                        break 'all;
                    }
                }
            }
            let sent = match &mut self.conn {
                Conn::Plain(s) => rustix::io::writev(&*s, &iov),
                Conn::Tls(t) => t.flush_out().and_then(|()| match t.room() {
                    0 => Err(rustix::io::Errno::AGAIN),
                    room => {
                        let mut n = 0;
                        t.take(|out| {
                            for part in &iov {
                                let k = part.len().min(room - n);
                                out.extend_from_slice(&part[..k]);
                                n += k;
                            }
                        })?;
                        Ok(n)
                    }
                }),
            };
            match sent {
                Ok(n) => {
                    drop(iov);
                    self.tx_sent += n;
                    while let Some(front) = self.tx.front() {
                        let total = front.head.len() + front.len;
                        if self.tx_sent < total {
                            break;
                        }
                        self.tx_sent -= total;
                        // Sent: the buffers wait with the request for its reply.
                        if let Some(out) = self.tx.pop_front() {
                            if let Some(w) = self.waiting.get_mut(&out.cookie) {
                                w.1 = out.bufs;
                            }
                        }
                    }
                }
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                Err(e) => {
                    self.failed = Some(self.io_failed(e));
                }
            }
        }
    }

    fn receive(&mut self, out: &mut Vec<SinkDone>) {
        loop {
            let got = match &mut self.conn {
                Conn::Plain(s) => rustix::io::read(&*s, &mut self.rx[self.rx_len..]),
                Conn::Tls(t) => t.recv(&mut self.rx[self.rx_len..]),
            };
            match got {
                Ok(0) => {
                    self.failed.get_or_insert(IoError::Aborted(
                        "the NBD server closed the connection".into(),
                    ));
                    break;
                }
                Ok(n) => self.rx_len += n,
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                Err(e) => {
                    self.failed = Some(self.io_failed(e));
                    break;
                }
            }
            let mut at = 0;
            while self.rx_len - at >= proto::SIMPLE_REPLY_LEN {
                let h = &self.rx[at..at + proto::SIMPLE_REPLY_LEN];
                at += proto::SIMPLE_REPLY_LEN;
                let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                let mut c = [0u8; 8];
                c.copy_from_slice(&h[8..16]);
                let cookie = u64::from_be_bytes(c);
                if magic != proto::SIMPLE_REPLY_MAGIC {
                    self.failed = Some(IoError::Aborted("bad NBD reply magic".into()));
                    break;
                }
                let result = if error == 0 {
                    Ok(())
                } else {
                    Err(IoError::Refused(format!("NBD server error {error}")))
                };
                if cookie == FLUSH_COOKIE {
                    let _ = self.stream_disconnect();
                    self.finished = Some(result);
                    continue;
                }
                if let Some((len, bufs)) = self.waiting.remove(&cookie) {
                    if let Err(e) = &result {
                        self.failed.get_or_insert(e.clone());
                    }
                    out.push(SinkDone {
                        offset: cookie,
                        len,
                        bufs,
                        result,
                    });
                }
            }
            self.rx.copy_within(at..self.rx_len, 0);
            self.rx_len -= at;
        }
    }

    fn stream_disconnect(&mut self) -> std::io::Result<()> {
        let head = Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        match &mut self.conn {
            Conn::Plain(s) => rustix::io::write(&*s, &head).map(|_| ()),
            Conn::Tls(t) => {
                t.take(|out| out.extend_from_slice(&head))?;
                t.shutdown();
                Ok(())
            }
        }
        .map_err(Into::into)
    }
}

impl Sink for NbdSink {
    fn submit(&mut self, offset: u64, bufs: IoBufs) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), bufs));
        }
        if self.waiting.len() >= MAX_INFLIGHT {
            return Err(SinkFull::Busy(bufs));
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        // Once the socket has taken their bytes the buffers wait for the server's reply, and go
        // back with it.
        self.queue(cmd::WRITE, offset, offset, bufs, None);
        self.waiting.insert(offset, (len, IoBufs::new()));
        self.transmit();
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), IoBufs::new()));
        }
        let length = u32::try_from(len).map_err(|_| {
            SinkFull::Failed(
                IoError::Refused(format!("{len} zeroes in one NBD request")),
                IoBufs::new(),
            )
        })?;
        if self.waiting.len() >= MAX_INFLIGHT {
            return Err(SinkFull::Busy(IoBufs::new()));
        }
        self.queue(
            cmd::WRITE_ZEROES,
            offset,
            offset,
            IoBufs::new(),
            Some(length),
        );
        self.waiting.insert(offset, (0, IoBufs::new()));
        self.transmit();
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<SinkDone>) {
        self.transmit();
        self.receive(out);
        if let Some(e) = self.failed.clone() {
            // Fail what is still waiting so the job can end.
            let waiting: Vec<u64> = self.waiting.keys().copied().collect();
            for cookie in waiting {
                if let Some((len, bufs)) = self.waiting.remove(&cookie) {
                    out.push(SinkDone {
                        offset: cookie,
                        len,
                        bufs,
                        result: Err(e.clone()),
                    });
                }
            }
            self.tx.clear();
            if self.flushing && self.finished.is_none() {
                self.finished = Some(Err(e));
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.waiting.len()
    }

    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.conn.socket().as_fd())
    }

    fn finish(&mut self, _manifest: &Manifest) -> Result<(), IoError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.flushing {
            self.flushing = true;
            self.queue(cmd::FLUSH, FLUSH_COOKIE, 0, IoBufs::new(), None);
            self.transmit();
        }
        Ok(())
    }

    fn finished(&mut self) -> Option<Result<(), IoError>> {
        self.finished.clone()
    }

    fn describe(&self) -> String {
        format!("NBD export {}", self.uri)
    }

    fn abandon(&mut self) {
        let _ = self.stream_disconnect();
    }
}
