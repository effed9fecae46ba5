//! The synchronous queue: an NVMe/TCP connection driven with blocking I/O, one command at a
//! time. It owns connection setup (ICReq/ICResp, then Connect) for the admin queue and for every
//! I/O queue; the admin queue stays one for good (Property Get/Set, Identify, Set Features, Keep
//! Alive), an I/O queue is handed over to [`super::IoQueue`] once connected. A Connect whose
//! response asks for it is followed by DH-HMAC-CHAP on the queue, before anything else.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{io, HostOptions, NvmfError};
use crate::nvme::spec::{Command, Completion, Status};
use crate::nvmf::auth;
use crate::nvmf::fabrics::{self, ConnectData};
use crate::nvmf::pdu::{self, CapsuleCmd, Digests, Frame, Header, IcReq, Side};

/// Blocking operations give up after this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

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
        let (mut q, cqe) = Self::connect_raw(opts, qid, sqsize, cntlid, kato_ms, cattr)?;
        // Authenticate when the controller asks, and also when the controller must prove
        // itself (a controller key): a controller that does not ask is not let off.
        let asked = cqe.result & fabrics::CONNECT_AUTH_REQUIRED != 0;
        let bidirectional = opts.dhchap.as_ref().is_some_and(|k| k.ctrl_key.is_some());
        if asked || bidirectional {
            let Some(keys) = &opts.dhchap else {
                return Err(NvmfError::Unusable(format!(
                    "'{}' requires DH-HMAC-CHAP authentication of host '{}', and no dhchap_key \
                     is set",
                    opts.subnqn, opts.hostnqn
                )));
            };
            auth::authenticate(&mut q, keys, &opts.hostnqn, &opts.subnqn, qid).map_err(|e| {
                NvmfError::AuthFailed {
                    hostnqn: opts.hostnqn.clone(),
                    subnqn: opts.subnqn.clone(),
                    qid,
                    source: e,
                }
            })?;
        }
        Ok((q, cqe.result as u16))
    }

    /// ICReq and Connect alone, nothing after: the Connect's completion comes back as it is
    /// (its result holds the controller id and whether the queue must authenticate).
    pub fn connect_raw(
        opts: &HostOptions,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        kato_ms: u32,
        cattr: u8,
    ) -> Result<(Self, Completion), NvmfError> {
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
        let invalid_host = fabrics::status::CONNECT_INVALID_HOST.0 & 0x7ff;
        let (cqe, _) = q.command("Connect", c, &data, 0).map_err(|e| match e {
            NvmfError::Status { status, .. } if status.0 & 0x7ff == invalid_host => {
                NvmfError::HostNotAllowed {
                    hostnqn: opts.hostnqn.clone(),
                    subnqn: opts.subnqn.clone(),
                    status,
                }
            }
            e => e,
        })?;
        Ok((q, cqe))
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
            // A signal to this thread interrupts the read without it having read anything.
            let n = match (&self.stream).read(&mut self.rx[self.rx_len..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.map_err(io("NVMe/TCP receive"))?,
            };
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

    /// Gives up the connection once connected, for an I/O queue to drive.
    pub(super) fn into_connection(self) -> Result<Connection, NvmfError> {
        if self.rx_len != 0 {
            return Err(NvmfError::Protocol("unexpected bytes after Connect".into()));
        }
        Ok(Connection {
            stream: self.stream,
            rx: self.rx,
            digests: self.digests,
            maxh2cdata: self.maxh2cdata,
        })
    }
}

/// DH-HMAC-CHAP messages travel as AUTH_Send and AUTH_Receive commands on the queue.
impl auth::AuthTransport for SyncQueue {
    fn auth_send(&mut self, data: &[u8]) -> Result<(), auth::AuthError> {
        self.command("AUTH_Send", fabrics::auth_send(data.len() as u32), data, 0)
            .map(drop)
            .map_err(|e| auth::AuthError::Transport(e.to_string()))
    }

    fn auth_receive(&mut self, len: u32) -> Result<Vec<u8>, auth::AuthError> {
        self.command(
            "AUTH_Receive",
            fabrics::auth_receive(len),
            &[],
            len as usize,
        )
        .map(|(_, data)| data)
        .map_err(|e| auth::AuthError::Transport(e.to_string()))
    }
}

/// A connected queue's connection, as a [`SyncQueue`] leaves it.
pub(super) struct Connection {
    /// The socket, still blocking.
    pub stream: TcpStream,
    /// The receive buffer (empty).
    pub rx: Vec<u8>,
    /// Digests in use.
    pub digests: Digests,
    /// Largest H2CData PDU the controller takes.
    pub maxh2cdata: u32,
}
