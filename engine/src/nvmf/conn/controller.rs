//! The controller a queue emulates: the fabrics Connect (a new controller for an admin queue,
//! an existing one joined by an I/O queue), the admin commands (Identify, Get Log Page with the
//! discovery log, features, Keep Alive, asynchronous events) and the property registers.

use super::*;

/// The host of a connection: its address and what was checked of it.
pub(super) struct HostCheck {
    /// The host's address, for the log.
    pub(super) peer: String,
    /// A refused Connect was logged (once per connection).
    refused_logged: bool,
    /// The revision of the export's allowed hosts last checked.
    access_seen: Option<u64>,
}

impl HostCheck {
    pub(super) fn new(peer: String) -> Self {
        Self {
            peer,
            refused_logged: false,
            access_seen: None,
        }
    }
}

impl NvmfConn {
    /// Closes the queue when its host was removed from the export's allowed hosts.
    pub(super) fn check_host_still_allowed(&mut self) {
        let (Some(e), Some(seen), Some(c)) = (&self.export, self.host.access_seen, &self.ctrl)
        else {
            return;
        };
        let Some(access) = crate::nvmf::access_of(e) else {
            return;
        };
        let now = access.revision();
        if now == seen {
            return;
        }
        self.host.access_seen = Some(now);
        if !access.allows(&c.hostnqn) {
            tracing::warn!(
                nqn = %e.name,
                host = %c.hostnqn.escape_debug(),
                peer = %self.host.peer,
                "NVMe/TCP queue closed: its host was removed from the export's hosts"
            );
            self.pump
                .closing_because(CloseReason::Error("host no longer allowed".into()));
            self.closing = true;
        }
    }

    pub(super) fn connect(&mut self, cmd: Command, payload: Payload) {
        let cid = cmd.cid();
        let c = ConnectCmd::parse(&cmd);
        if c.recfmt != 0 {
            self.respond(cid, status::CONNECT_FORMAT, 0);
            return;
        }
        let Payload::Small(data) = payload else {
            self.respond(cid, status::SGL_LENGTH_INVALID, 0);
            return;
        };
        let invalid =
            |attr_data: bool, offset: u16| -> u32 { attr_data as u32 | (offset as u32) << 16 };
        let d = match ConnectData::parse(&data) {
            Ok(d) => d,
            Err(off) => {
                self.respond(cid, status::CONNECT_INVALID_PARAMS, invalid(true, off));
                return;
            }
        };
        if c.sqsize == 0 || c.sqsize >= QUEUE_ENTRIES {
            // SQSIZE is at byte 44 of the command.
            self.respond(cid, status::CONNECT_INVALID_PARAMS, invalid(false, 44));
            return;
        }
        let discovery = d.subnqn == fabrics::DISCOVERY_NQN;
        let export = if discovery {
            None
        } else {
            match self.server.lookup(&self.listen, &d.subnqn) {
                Some(e) => Some(e),
                None => {
                    self.respond(cid, status::CONNECT_INVALID_PARAMS, invalid(true, 256));
                    return;
                }
            }
        };
        // Read before the check: a change after it is seen by the next poll.
        let access_seen = export
            .as_deref()
            .and_then(crate::nvmf::access_of)
            .map(|a| a.revision());
        if let Some(e) = export
            .as_ref()
            .filter(|e| !crate::nvmf::allows(e, &d.hostnqn))
        {
            if !self.host.refused_logged {
                self.host.refused_logged = true;
                tracing::warn!(
                    nqn = %e.name,
                    host = %d.hostnqn.escape_debug(),
                    peer = %self.host.peer,
                    qid = c.qid,
                    "NVMe/TCP Connect refused: the host is not allowed"
                );
            }
            self.respond(cid, status::CONNECT_INVALID_HOST, 0);
            return;
        }
        let ctrl = if c.qid == 0 {
            match self.server.protocol().new_ctrl(
                export.clone(),
                &d.subnqn,
                &d.hostnqn,
                &self.listen,
                c.kato_ms,
            ) {
                Some(ctrl) => ctrl,
                None => {
                    self.respond(cid, status::INTERNAL, 0);
                    return;
                }
            }
        } else {
            let Some(ctrl) = self.server.protocol().ctrl(d.cntlid).filter(|ctrl| {
                ctrl.subnqn == d.subnqn && ctrl.hostnqn == d.hostnqn && ctrl.listen == self.listen
            }) else {
                self.respond(cid, status::CONNECT_INVALID_PARAMS, invalid(true, 16));
                return;
            };
            let granted = match ctrl.io_queues.load(Ordering::SeqCst) {
                0 => MAX_IO_QUEUES,
                n => n,
            };
            let mut qids = ctrl
                .qids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if discovery
                || c.qid as u32 > granted
                || qids.contains(&c.qid)
                || ctrl.cc.load(Ordering::SeqCst) & spec::CC_EN == 0
            {
                drop(qids);
                // QID is at byte 42 of the command.
                self.respond(cid, status::CONNECT_INVALID_PARAMS, invalid(false, 42));
                return;
            }
            qids.push(c.qid);
            drop(qids);
            ctrl
        };
        self.qid = Some(c.qid);
        self.sqsize = c.sqsize;
        self.sq_flow_disabled = c.cattr & fabrics::CATTR_DISABLE_SQ_FLOW != 0;
        // The Connect itself was the queue's first entry.
        self.sqhd = if self.sq_flow_disabled {
            fabrics::SQHD_DISABLED
        } else {
            1
        };
        let cntlid = ctrl.cntlid;
        // A host whose entry names a key authenticates every queue before anything else.
        let keys = export
            .as_deref()
            .and_then(crate::nvmf::access_of)
            .and_then(|a| a.keys_of(&d.hostnqn));
        let mut result = cntlid as u32;
        if let Some(keys) = keys {
            self.auth = Some(auth::QueueAuth::new(keys, &d.hostnqn, &d.subnqn));
            result |= fabrics::CONNECT_AUTH_REQUIRED;
        }
        let detail = format!("controller {cntlid} queue {} host {}", c.qid, ctrl.hostnqn);
        self.pump.attach(&ctrl.subnqn, export.clone(), detail);
        self.host.access_seen = access_seen;
        self.export = export;
        self.last_keep_alive = Instant::now();
        self.name = format!("nvmf:{}:{}q{}", ctrl.subnqn, cntlid, c.qid);
        self.ctrl = Some(ctrl);
        self.respond(cid, Status::SUCCESS, result);
    }

    pub(super) fn admin(&mut self, cmd: Command, payload: Payload) {
        let cid = cmd.cid();
        if self.qid.is_none() {
            self.connect(cmd, payload);
            return;
        }
        let Some(ctrl) = self.ctrl.clone() else {
            self.respond(cid, status::SEQUENCE_ERROR, 0);
            return;
        };
        self.last_keep_alive = Instant::now();
        let want = fabrics::sgl(&cmd).1 as usize;
        let enabled = ctrl.cc.load(Ordering::SeqCst) & spec::CC_EN != 0;
        match cmd.opcode() {
            fabrics::OPC_FABRICS => match fabrics::fabrics_type(&cmd) {
                fctype::PROPERTY_GET => {
                    let eight = cmd.dw[10] & 7 == 1;
                    let value: Option<u64> = match (cmd.dw[11], eight) {
                        (0x00, true) => {
                            Some((QUEUE_ENTRIES as u64 - 1) | 1 << 16 | 1 << 24 | 1 << 37)
                        }
                        (0x08, false) => Some(fabrics::TARGET_VERSION as u64),
                        (0x14, false) => Some(ctrl.cc.load(Ordering::SeqCst) as u64),
                        (0x1c, false) => Some(ctrl.csts.load(Ordering::SeqCst) as u64),
                        _ => None,
                    };
                    match value {
                        Some(v) => {
                            self.pump.request_served();
                            let c = cqe(cid, Status::SUCCESS, v as u32, self.sqhd, 0);
                            let h = CapsuleResp::new(c).with_result_hi((v >> 32) as u32);
                            self.pump.send(Out {
                                head: Head::Pdu(h.encode(self.digests)),
                                body: Body::None,
                                digest: None,
                            });
                        }
                        None => self.respond(cid, status::INVALID_FIELD, 0),
                    }
                }
                fctype::PROPERTY_SET => {
                    if cmd.dw[11] != 0x14 || cmd.dw[10] & 7 != 0 {
                        self.respond(cid, status::INVALID_FIELD, 0);
                        return;
                    }
                    let cc = cmd.dw[12];
                    ctrl.cc.store(cc, Ordering::SeqCst);
                    let mut csts = 0;
                    if cc & spec::CC_EN != 0 {
                        csts |= spec::CSTS_RDY;
                    }
                    if cc & spec::CC_SHN_MASK != 0 {
                        csts |= spec::CSTS_SHST_COMPLETE;
                    }
                    ctrl.csts.store(csts, Ordering::SeqCst);
                    self.respond(cid, Status::SUCCESS, 0);
                }
                fctype::CONNECT => self.respond(cid, status::SEQUENCE_ERROR, 0),
                _ => self.respond(cid, status::INVALID_OPCODE, 0),
            },
            _ if !enabled => self.respond(cid, status::SEQUENCE_ERROR, 0),
            admin::KEEP_ALIVE => self.respond(cid, Status::SUCCESS, 0),
            admin::IDENTIFY => {
                let page = self.identify(&ctrl, &cmd);
                match page {
                    Some(mut p) => {
                        p.truncate(want.min(4096));
                        let n = p.len();
                        self.respond_data(cid, Body::Bytes(p), n);
                    }
                    None => self.respond(cid, status::INVALID_FIELD, 0),
                }
            }
            admin::GET_LOG_PAGE => {
                let lid = cmd.dw[10] as u8;
                let numd = ((cmd.dw[10] >> 16) | (cmd.dw[11] & 0xffff) << 16) as usize + 1;
                let offset = cmd.dw[12] as u64 | (cmd.dw[13] as u64) << 32;
                if lid != fabrics::LOG_DISCOVERY || ctrl.export.is_some() {
                    self.respond(cid, status::INVALID_FIELD, 0);
                    return;
                }
                let log = crate::nvmf::discovery_log(&self.server, &self.listen, &ctrl.hostnqn);
                let len = (numd * 4).min(want);
                let mut out = vec![0u8; len];
                if (offset as usize) < log.len() {
                    let avail = &log[offset as usize..];
                    let n = avail.len().min(len);
                    out[..n].copy_from_slice(&avail[..n]);
                }
                self.respond_data(cid, Body::Bytes(out), len);
            }
            admin::SET_FEATURES | admin::GET_FEATURES => {
                let fid = cmd.dw[10] as u8;
                match fid {
                    spec::FEATURE_NUMBER_OF_QUEUES => {
                        if cmd.opcode() == admin::SET_FEATURES
                            && ctrl.io_queues.load(Ordering::SeqCst) == 0
                        {
                            let nsq = (cmd.dw[11] & 0xffff) + 1;
                            let ncq = (cmd.dw[11] >> 16) + 1;
                            let n = nsq.min(ncq).min(MAX_IO_QUEUES);
                            ctrl.io_queues.store(n, Ordering::SeqCst);
                        }
                        let n = match ctrl.io_queues.load(Ordering::SeqCst) {
                            0 => MAX_IO_QUEUES,
                            n => n,
                        } - 1;
                        self.respond(cid, Status::SUCCESS, n | n << 16);
                    }
                    // Asynchronous event configuration: accepted, nothing is ever reported.
                    0x0b => self.respond(cid, Status::SUCCESS, 0),
                    // Keep alive timer.
                    0x0f if cmd.opcode() == admin::GET_FEATURES => {
                        self.respond(cid, Status::SUCCESS, ctrl.kato_ms)
                    }
                    _ => self.respond(cid, status::INVALID_FIELD, 0),
                }
            }
            admin::ASYNC_EVENT => {
                if self.aers.len() >= MAX_AERS {
                    self.respond(cid, status::AER_LIMIT, 0);
                } else {
                    // Held until the connection ends: no event is ever reported.
                    self.aers.push(cid);
                }
            }
            _ => self.respond(cid, status::INVALID_OPCODE, 0),
        }
    }

    pub(super) fn identify(&self, ctrl: &Ctrl, cmd: &Command) -> Option<Vec<u8>> {
        let cnsv = cmd.dw[10] as u8;
        let nsid = cmd.dw[1];
        match (cnsv, &ctrl.export) {
            (cns::CONTROLLER, _) => Some(
                fabrics::ControllerIdentity {
                    cntlid: ctrl.cntlid,
                    serial: format!("qs{:08x}", crc32c::crc32c(ctrl.subnqn.as_bytes())),
                    model: "quicksplit".into(),
                    subnqn: ctrl.subnqn.clone(),
                    discovery: ctrl.export.is_none(),
                    mdts: MDTS,
                    maxcmd: QUEUE_ENTRIES,
                    in_capsule: IN_CAPSULE as u32,
                }
                .encode(),
            ),
            (cns::NAMESPACE, Some(e)) if nsid == 1 => {
                let g = e.bdev.geometry();
                Some(fabrics::identify_namespace(
                    g.num_blocks,
                    g.block_size,
                    !e.writable,
                    fabrics::id_from_name(&e.name),
                ))
            }
            (cns::ACTIVE_NAMESPACES, Some(_)) => {
                let mut p = vec![0u8; 4096];
                if nsid < 1 {
                    p[..4].copy_from_slice(&1u32.to_le_bytes());
                }
                Some(p)
            }
            (0x03, Some(e)) if nsid == 1 => Some(fabrics::namespace_descriptors(
                fabrics::id_from_name(&e.name),
            )),
            _ => None,
        }
    }
}
