//! The NVM I/O commands of a queue: Read, Write, Flush, Write Zeroes and Dataset Management
//! checked and carried out on the export's channel (or in place on a RAM disk), and their
//! completions turned into responses.

use super::*;

/// Data of a command from the host.
pub(super) enum Payload {
    None,
    Dma(IoBufs),
    Small(Vec<u8>),
}

impl Payload {
    pub(super) fn write_at(&mut self, at: usize, src: &[u8]) {
        match self {
            Payload::None => {}
            Payload::Small(v) => v[at..at + src.len()].copy_from_slice(src),
            Payload::Dma(bufs) => drivers::iov::copy_into(bufs, at, src),
        }
    }
}

#[derive(PartialEq, Eq)]
pub(super) enum Stage {
    /// Waiting for H2CData.
    Data,
    /// Submitted to the channel.
    Io,
}

/// A command being served.
pub(super) struct Pending {
    pub(super) cmd: Command,
    pub(super) payload: Payload,
    pub(super) expected: usize,
    pub(super) received: usize,
    pub(super) stage: Stage,
    /// Set when a data digest failed: the rest of the data is taken and dropped.
    pub(super) failed: Option<Status>,
    /// Channel requests outstanding (Dataset Management may issue several).
    pub(super) left: u32,
    pub(super) result: Status,
    /// Read data to send back.
    pub(super) read_bufs: IoBufs,
}

pub(super) fn io_status(e: &IoError) -> Status {
    match e {
        IoError::OutOfRange { .. } => status::LBA_OUT_OF_RANGE,
        IoError::Unaligned { .. } | IoError::BufferMismatch { .. } => status::INVALID_FIELD,
        IoError::ReadOnly | IoError::Refused(_) => status::WRITE_PROTECTED,
        IoError::NotSupported => status::INVALID_OPCODE,
        IoError::Device(_) | IoError::Aborted(_) => status::INTERNAL,
    }
}

impl NvmfConn {
    /// An in-capsule write to a RAM disk, carried out from the receive buffer.
    pub(super) fn write_in_place(&mut self, cmd: &Command, f: &Frame) {
        let cid = cmd.cid();
        if let Some(st) = self.check_rw(cmd, true) {
            self.respond(cid, st, 0);
            return;
        }
        let bs = self
            .export
            .as_ref()
            .map_or(4096, |e| e.bdev.geometry().block_size as u64);
        let offset = cmd.range().0.saturating_mul(bs);
        let data = &self.pump.input()[f.data_at..f.data_at + f.data_len];
        let done = self
            .channel
            .as_mut()
            .and_then(|ch| ch.write_in_place(offset, data));
        let st = match done {
            Some(Ok(())) => Status::SUCCESS,
            Some(Err(e)) => io_status(&e),
            // The channel said it was memory: it cannot refuse.
            None => status::INTERNAL,
        };
        self.respond(cid, st, 0);
    }

    /// True when the export's channel is memory the CPU reaches (a RAM disk). Not before the
    /// queue has authenticated: writes in place skip [`NvmfConn::execute`], which checks that.
    pub(super) fn in_place(&self) -> bool {
        self.auth.as_ref().is_none_or(|a| a.done())
            && self.channel.as_ref().is_some_and(|c| c.in_place())
    }

    pub(super) fn read_in_place(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Option<Result<InPlaceRead, IoError>> {
        self.channel.as_mut()?.read_in_place(offset, len)
    }

    /// Checks a read or write's namespace, range, length and access; the status if bad.
    pub(super) fn check_rw(&self, cmd: &Command, write: bool) -> Option<Status> {
        let e = self.export.as_ref()?;
        if cmd.dw[1] != 1 {
            return Some(status::INVALID_NAMESPACE);
        }
        let g = e.bdev.geometry();
        let (lba, blocks) = cmd.range();
        if lba
            .checked_add(blocks as u64)
            .is_none_or(|end| end > g.num_blocks)
        {
            return Some(status::LBA_OUT_OF_RANGE);
        }
        let bytes = blocks as u64 * g.block_size as u64;
        if matches!(cmd.opcode(), nvm::READ | nvm::WRITE) {
            let (_, sgl_len, _) = fabrics::sgl(cmd);
            if bytes > MAX_XFER as u64 {
                return Some(status::INVALID_FIELD);
            }
            if sgl_len as u64 != bytes {
                return Some(status::SGL_LENGTH_INVALID);
            }
        }
        if write && !e.writable {
            return Some(status::WRITE_PROTECTED);
        }
        None
    }

    pub(super) fn execute(&mut self, cmd: Command, payload: Payload) {
        let cid = cmd.cid();
        let payload = match self.qid {
            Some(_) => match self.auth_gate(&cmd, payload) {
                Some(p) => p,
                None => return,
            },
            None => payload,
        };
        if self.qid.is_none_or(|q| q == 0) {
            self.admin(cmd, payload);
            return;
        }
        if cmd.opcode() == fabrics::OPC_FABRICS {
            // A second Connect on a connected queue; Property Get/Set only go to the admin queue.
            let st = if fabrics::fabrics_type(&cmd) == fctype::CONNECT {
                status::SEQUENCE_ERROR
            } else {
                status::INVALID_OPCODE
            };
            self.respond(cid, st, 0);
            return;
        }
        let Some(export) = self.export.clone() else {
            self.respond(cid, status::SEQUENCE_ERROR, 0);
            return;
        };
        let bs = export.bdev.geometry().block_size as u64;
        let (lba, blocks) = cmd.range();
        let (offset, len) = (lba.saturating_mul(bs), blocks as u64 * bs);
        let mut reqs = std::mem::take(&mut self.reqs);
        reqs.clear();
        let read_bufs = IoBufs::new();
        match cmd.opcode() {
            nvm::READ | nvm::WRITE => {
                let write = cmd.opcode() == nvm::WRITE;
                if let Some(st) = self.check_rw(&cmd, write) {
                    self.respond(cid, st, 0);
                    return;
                }
                let Payload::Dma(bufs) = payload else {
                    self.respond(cid, status::SGL_LENGTH_INVALID, 0);
                    return;
                };
                // A RAM disk's blocks are sent from where they are (unless a data digest has
                // to be computed over them first).
                if !write && !self.digests.data && self.in_place() {
                    if let Some(done) = self.read_in_place(offset, len) {
                        match done {
                            Ok(r) => self.respond_data(cid, Body::Region(r, bufs), len as usize),
                            Err(e) => {
                                self.pump.bufs().put_all(bufs);
                                self.respond(cid, io_status(&e), 0);
                            }
                        }
                        self.reqs = reqs;
                        return;
                    }
                }
                let op = if write {
                    IoOp::Write {
                        fua: cmd.dw[12] & (1 << 30) != 0,
                    }
                } else {
                    IoOp::Read
                };
                reqs.push((op, offset, len, bufs));
            }
            nvm::FLUSH => {
                if cmd.dw[1] != 1 && cmd.dw[1] != u32::MAX {
                    self.respond(cid, status::INVALID_NAMESPACE, 0);
                    return;
                }
                reqs.push((IoOp::Flush, 0, 0, IoBufs::new()));
            }
            nvm::WRITE_ZEROES => {
                if let Some(st) = self.check_rw(&cmd, true) {
                    self.respond(cid, st, 0);
                    return;
                }
                let op = IoOp::WriteZeroes {
                    deallocate: cmd.deallocates(),
                };
                reqs.push((op, offset, len, IoBufs::new()));
            }
            nvm::DATASET_MANAGEMENT => {
                if cmd.dw[1] != 1 {
                    self.respond(cid, status::INVALID_NAMESPACE, 0);
                    return;
                }
                if cmd.dw[11] & (1 << 2) == 0 {
                    // Only deallocate does anything; hints are accepted and ignored.
                    self.respond(cid, Status::SUCCESS, 0);
                    return;
                }
                if !export.writable {
                    self.respond(cid, status::WRITE_PROTECTED, 0);
                    return;
                }
                let ranges = (cmd.dw[10] & 0xff) as usize + 1;
                let Payload::Small(list) = payload else {
                    self.respond(cid, status::SGL_LENGTH_INVALID, 0);
                    return;
                };
                if list.len() < ranges * 16 {
                    self.respond(cid, status::SGL_LENGTH_INVALID, 0);
                    return;
                }
                let g = export.bdev.geometry();
                for r in list.chunks_exact(16).take(ranges) {
                    let nlb = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as u64;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&r[8..16]);
                    let slba = u64::from_le_bytes(b);
                    if slba.checked_add(nlb).is_none_or(|e| e > g.num_blocks) {
                        self.respond(cid, status::LBA_OUT_OF_RANGE, 0);
                        return;
                    }
                    if nlb > 0 {
                        reqs.push((IoOp::Unmap, slba * bs, nlb * bs, IoBufs::new()));
                    }
                }
                if reqs.is_empty() {
                    self.respond(cid, Status::SUCCESS, 0);
                    return;
                }
            }
            _ => {
                self.respond(cid, status::INVALID_OPCODE, 0);
                return;
            }
        }
        let key = self.pending.insert(Pending {
            cmd,
            payload: Payload::None,
            expected: 0,
            received: 0,
            stage: Stage::Io,
            failed: None,
            left: reqs.len() as u32,
            result: Status::SUCCESS,
            read_bufs,
        });
        for (op, offset, len, bufs) in reqs.drain(..) {
            let req = IoRequest {
                op,
                offset,
                len,
                bufs,
                tag: key as u64,
            };
            let Some(ch) = self.channel.as_mut() else {
                return;
            };
            crate::export::submit_or_complete(ch.as_mut(), req, &mut self.done);
        }
        self.reqs = reqs;
    }

    pub(super) fn on_completion(&mut self, c: IoCompletion) {
        let key = c.tag as usize;
        let Some(p) = self.pending.get_mut(key) else {
            return;
        };
        if let Err(e) = &c.result {
            if p.result.is_success() {
                p.result = io_status(e);
            }
        } else if p.cmd.opcode() == nvm::READ {
            p.read_bufs = c.bufs;
        } else {
            self.pump.bufs().put_all(c.bufs);
        }
        p.left = p.left.saturating_sub(1);
        if p.left > 0 {
            return;
        }
        let p = self.pending.remove(key);
        let cid = p.cmd.cid();
        if p.result.is_success() && p.cmd.opcode() == nvm::READ {
            let len = p.read_bufs.iter().map(DmaBuf::len).sum();
            self.respond_data(cid, Body::Bufs(p.read_bufs), len);
        } else {
            self.respond(cid, p.result, 0);
        }
    }
}

/// True for commands whose data goes from host to controller.
pub(super) fn host_to_controller(cmd: &Command) -> bool {
    if cmd.opcode() == fabrics::OPC_FABRICS {
        return fabrics::fabrics_type(cmd) & 3 == 1;
    }
    cmd.opcode() & 3 == 1
}
