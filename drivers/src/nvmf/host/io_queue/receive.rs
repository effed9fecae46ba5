//! What comes back on an I/O queue's connection: whole PDUs parsed from the receive buffer,
//! responses completing commands, C2HData copied into the read's buffers, and R2Ts answered
//! with H2CData PDUs queued for the next send.

use super::{Done, IoQueue, Piece};
use crate::nvme::spec::Status;
use crate::nvmf::fabrics;
use crate::nvmf::pdu::{self, DataPdu, Frame, Header, Side};
use crate::IoError;

impl IoQueue {
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
                    size: p.ns_size,
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
                    crate::iov::copy_into(&mut p.bufs, start, src);
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

    /// Parses and handles what has arrived, then reads more until the socket has nothing;
    /// true if anything moved.
    pub(super) fn receive(&mut self) -> bool {
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
}
