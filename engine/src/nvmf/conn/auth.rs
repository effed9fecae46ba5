//! DH-HMAC-CHAP on a queue: a host whose entry in the export's `hosts` names a `dhchap_key`
//! gets "authentication required" in its Connect response, and until it has authenticated
//! (AUTH_Send and AUTH_Receive, run by [`CtrlAuth`]) every other command on the queue fails
//! with Authentication Required. A failed exchange is logged and ends the connection once its
//! Failure message is sent.

use drivers::nvmf::auth::{CtrlAuth, HostKeys, SendOutcome};

use super::*;

/// Largest AUTH_Receive allocation served (every message fits in far less).
const MAX_RECEIVE: usize = 64 << 10;

/// A queue's authentication and what was logged of it.
pub(super) struct QueueAuth {
    state: CtrlAuth,
    logged: bool,
}

impl QueueAuth {
    pub(super) fn new(keys: Arc<HostKeys>, hostnqn: &str, subnqn: &str) -> Box<Self> {
        Box::new(Self {
            state: CtrlAuth::new(keys, hostnqn, subnqn),
            logged: false,
        })
    }

    /// The host has authenticated.
    pub(super) fn done(&self) -> bool {
        self.state.authenticated()
    }
}

impl NvmfConn {
    /// Runs AUTH_Send and AUTH_Receive, and refuses other commands on a queue that has not
    /// authenticated yet. Gives the payload back for a command that goes on.
    pub(super) fn auth_gate(&mut self, cmd: &Command, payload: Payload) -> Option<Payload> {
        let cid = cmd.cid();
        let kind = fabrics::fabrics_type(cmd);
        if cmd.opcode() != fabrics::OPC_FABRICS
            || !matches!(kind, fctype::AUTH_SEND | fctype::AUTH_RECEIVE)
        {
            if self.auth.as_ref().is_some_and(|a| !a.state.authenticated()) {
                self.respond(cid, status::AUTH_REQUIRED, 0);
                return None;
            }
            return Some(payload);
        }
        let Some(auth) = self.auth.as_mut() else {
            // Nothing to authenticate: this host was not asked to.
            self.respond(cid, status::INVALID_FIELD, 0);
            return None;
        };
        let len = cmd.dw[11] as usize;
        if !fabrics::is_dhchap(cmd) || len == 0 {
            self.respond(cid, status::INVALID_FIELD, 0);
            return None;
        }
        if kind == fctype::AUTH_SEND {
            let data = match payload {
                Payload::Small(d) if d.len() == len => d,
                _ => {
                    self.respond(cid, status::SGL_LENGTH_INVALID, 0);
                    return None;
                }
            };
            let outcome = auth.state.send(&data);
            self.respond(cid, Status::SUCCESS, 0);
            if let SendOutcome::HostGaveUp(_) = outcome {
                self.auth_ended();
            }
            self.log_auth();
            return None;
        }
        if len > MAX_RECEIVE || fabrics::sgl(cmd).1 as usize != len {
            self.respond(cid, status::INVALID_FIELD, 0);
            return None;
        }
        let mut message = auth.state.receive();
        let failed = auth.state.failure().is_some() && !auth.state.authenticated();
        if message.len() > len {
            self.respond(cid, status::INVALID_FIELD, 0);
        } else {
            // The whole allocation, zero padded.
            message.resize(len, 0);
            self.respond_data(cid, Body::Bytes(message), len);
        }
        self.log_auth();
        if failed {
            self.auth_ended();
        }
        None
    }

    /// The exchange failed: the connection closes once what is queued is sent.
    fn auth_ended(&mut self) {
        self.pump.closing_because(CloseReason::Error(
            "DH-HMAC-CHAP authentication failed".into(),
        ));
        self.closing = true;
    }

    /// One line when the queue authenticated or failed to.
    fn log_auth(&mut self) {
        let Some(auth) = self.auth.as_mut() else {
            return;
        };
        let Some(ctrl) = &self.ctrl else {
            return;
        };
        if auth.logged {
            return;
        }
        let (hash, group) = auth.state.chosen();
        if auth.state.authenticated() {
            auth.logged = true;
            tracing::info!(
                nqn = %ctrl.subnqn,
                host = %ctrl.hostnqn.escape_debug(),
                peer = %self.host.peer,
                qid = self.qid.unwrap_or(0),
                hash = ?hash,
                dhgroup = group.name(),
                "NVMe/TCP host authenticated (DH-HMAC-CHAP)"
            );
        } else if let Some(why) = auth.state.failure() {
            auth.logged = true;
            tracing::warn!(
                nqn = %ctrl.subnqn,
                host = %ctrl.hostnqn.escape_debug(),
                peer = %self.host.peer,
                qid = self.qid.unwrap_or(0),
                reason = why,
                "NVMe/TCP DH-HMAC-CHAP authentication failed"
            );
        }
    }
}
