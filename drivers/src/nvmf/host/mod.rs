//! The NVMe/TCP initiator: a controller reached over TCP.
//!
//! - [`SyncQueue`] (`sync_queue.rs`): a queue used with blocking I/O on a control thread:
//!   ICReq/ICResp, Connect, and one command at a time (Property Get/Set, Identify, Set Features,
//!   Keep Alive).
//! - [`HostController`] (`controller.rs`): the admin queue brought up (CC.EN, Identify, number of
//!   queues, the namespaces), kept alive by a small thread sending Keep Alive every half KATO.
//! - [`IoQueue`] (`io_queue/`): an I/O queue on its own TCP connection, driven by polling from
//!   one reactor over the non-blocking socket. Writes go out from the caller's DMA buffers with
//!   vectored sends (in the capsule when they fit, else on the controller's R2T as H2CData PDUs);
//!   read data is received into the caller's buffers. Every command has a deadline.
//!
//! This module holds what they share: the errors, and the options a controller is reached with.

mod controller;
mod io_queue;
mod sync_queue;

use std::time::Duration;

use super::fabrics;
use super::pdu::Digests;
use crate::nvme::spec::Status;

pub use controller::{HostController, Namespace};
pub use io_queue::{Done, IoQueue, Refused};
pub use sync_queue::SyncQueue;

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
    /// The target refused Connect with Connect Invalid Host: the host NQN is not allowed.
    #[error("the target does not allow host NQN '{hostnqn}' to connect to '{subnqn}' ({status})")]
    HostNotAllowed {
        /// The host NQN sent.
        hostnqn: String,
        /// The subsystem.
        subnqn: String,
        /// The status (Connect Invalid Host).
        status: Status,
    },
    /// DH-HMAC-CHAP authentication of a queue failed.
    #[error("DH-HMAC-CHAP authentication of host '{hostnqn}' to '{subnqn}' (queue {qid}) failed: {source}")]
    AuthFailed {
        /// The host NQN.
        hostnqn: String,
        /// The subsystem.
        subnqn: String,
        /// The queue.
        qid: u16,
        /// What went wrong.
        source: super::auth::AuthError,
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
    /// DH-HMAC-CHAP keys, used when the controller asks for authentication.
    pub dhchap: Option<std::sync::Arc<super::auth::HostKeys>>,
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
            dhchap: None,
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
