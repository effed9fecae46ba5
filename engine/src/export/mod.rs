//! The export layer: what every front end that serves bdevs over a socket shares, whatever its
//! protocol.
//!
//! An export shows a [`Source`] (a bdev, or a pair's image) under a name at an [`Address`]. The
//! [`Registry`] of one protocol keeps its exports and the listener of each address (start, stop,
//! the in-use checks, the list and the configuration); [`listener`] accepts connections on a
//! thread per address; the `SocketPump` moves a connection's bytes on its reactor (receive,
//! vectored transmit, close, idle staging buffers, busy or idle). A protocol module (NBD,
//! NVMe/TCP) implements [`Protocol`]: it checks a new export, takes each accepted connection,
//! and parses and executes its requests, nothing more. Each export owns the list of metadata
//! contexts it offers ([`contexts`]).

pub mod contexts;
pub mod listener;
mod pump;
mod registry;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use drivers::iostat::{IoStat, IoStats};
use drivers::{Bdev, IoChannel, IoCompletion, IoError, IoRequest, SubmitErrorKind};
use serde::Serialize;

pub use contexts::MetaContext;
pub use drivers::nbd::stream::Stream;
pub use pump::Transport;
pub(crate) use pump::{CloseReason, Flow, Outgoing, SocketPump, TurnEnd};
pub use registry::{ExportSet, Registry};

/// Submits a connection's request to its channel; one the channel refuses completes at once
/// with the error (a full queue as `EAGAIN`), so the protocol answers it like any other.
pub(crate) fn submit_or_complete(
    channel: &mut dyn IoChannel,
    req: IoRequest,
    done: &mut Vec<IoCompletion>,
) {
    if let Err(e) = channel.submit(req) {
        let e = *e;
        let error = match e.error {
            SubmitErrorKind::QueueFull => IoError::Device(libc::EAGAIN),
            SubmitErrorKind::Invalid(err) => err,
        };
        done.push(IoCompletion {
            tag: e.req.tag,
            result: Err(error),
            bufs: e.req.bufs,
        });
    }
}

/// Where an export listens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Address {
    /// A Unix socket path.
    #[serde(rename = "socket")]
    Unix(PathBuf),
    /// A TCP host:port.
    #[serde(rename = "listen")]
    Tcp(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// What an export shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Source {
    /// A bdev (through its pair when it is a pair's primary).
    #[serde(rename = "bdev")]
    Bdev(String),
    /// A pair's image.
    #[serde(rename = "pair")]
    Pair(String),
}

/// A protocol's own settings of one export (NVMe/TCP: the hosts it allows): reported by the
/// listing and saved in the configuration beside the export's common parameters.
pub trait ExportOptions: std::fmt::Debug + Send + Sync + 'static {
    /// Adds its parameters, as the protocol's start method takes them.
    fn params(&self, m: &mut serde_json::Map<String, serde_json::Value>);
    /// The settings as their own type, for the protocol that made them.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// No settings of its own.
impl ExportOptions for () {
    fn params(&self, _: &mut serde_json::Map<String, serde_json::Value>) {}

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// One export of some protocol.
pub struct Export {
    /// The name clients ask for (an NBD export name, an NVMe subsystem NQN).
    pub name: String,
    /// What it shows.
    pub source: Source,
    /// The bdev the connections open channels on, counted in `stats`.
    pub bdev: Arc<dyn Bdev>,
    /// What its connections read and wrote.
    pub stats: Arc<IoStats>,
    /// Writes allowed.
    pub writable: bool,
    /// Where it listens.
    pub address: Address,
    /// The metadata contexts it always offers, in order.
    pub contexts: Vec<Arc<dyn MetaContext>>,
    /// An image export's checkpoints, offered as dirty bitmaps after `contexts`.
    pub dirty_bitmaps: Option<Arc<dyn contexts::DirtyBitmaps>>,
    /// The protocol's own settings.
    pub options: Arc<dyn ExportOptions>,
    closed: AtomicBool,
    /// Open connections.
    pub connections: AtomicUsize,
}

impl Export {
    /// The metadata contexts it offers now: its own, then a dirty bitmap per checkpoint of an
    /// image export's pair.
    pub fn offered_contexts(&self) -> Vec<Arc<dyn MetaContext>> {
        let mut all = self.contexts.clone();
        if let Some(d) = &self.dirty_bitmaps {
            all.extend(contexts::dirty_bitmaps(d));
        }
        all
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.bdev.geometry().size()
    }

    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.bdev.geometry().block_size
    }

    /// Size of the pieces requests are split into: the staging buffer size `buf`, or the
    /// bdev's boundary (a pair's tracks) when smaller.
    pub fn piece_size(&self, buf: u64) -> u64 {
        match self.bdev.io_boundary() {
            Some(b) if b < buf => b,
            _ => buf,
        }
    }

    /// True once stopped.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// A connection starts using it.
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::SeqCst);
    }

    /// A connection that used it is gone.
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What `nbd_get_exports` and `nvmf_get_exports` report of an export; the name goes under the
/// protocol's key (`name`, `nqn`).
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// The protocol's key for the name.
    pub name_key: &'static str,
    /// Name.
    pub name: String,
    /// `bdev` or `pair` it shows.
    pub source: Source,
    /// Writes allowed.
    pub writable: bool,
    /// `socket` or `listen`.
    pub address: Address,
    /// Open connections.
    pub connections: usize,
    /// What its connections read and wrote.
    pub io: IoStat,
    /// The protocol's own settings.
    pub options: Arc<dyn ExportOptions>,
}

impl ExportInfo {
    /// The export's start parameters, as the start method takes them.
    fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(self.name_key.into(), self.name.clone().into());
        match &self.source {
            Source::Bdev(b) => m.insert("bdev".into(), b.clone().into()),
            Source::Pair(p) => m.insert("pair".into(), p.clone().into()),
        };
        m.insert("writable".into(), self.writable.into());
        match &self.address {
            Address::Unix(p) => m.insert("socket".into(), p.display().to_string().into()),
            Address::Tcp(a) => m.insert("listen".into(), a.clone().into()),
        };
        self.options.params(&mut m);
        m
    }
}

impl Serialize for ExportInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = self.params();
        m.insert("connections".into(), self.connections.into());
        for (k, v) in [
            ("num_read_ops", self.io.num_read_ops),
            ("bytes_read", self.io.bytes_read),
            ("num_write_ops", self.io.num_write_ops),
            ("bytes_written", self.io.bytes_written),
            ("num_errors", self.io.num_errors),
        ] {
            m.insert(k.into(), v.into());
        }
        m.serialize(s)
    }
}

/// Errors of export management, for every protocol.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A name is taken.
    #[error("an {what} '{name}' already exists")]
    Exists {
        /// How the protocol calls its exports ("NBD export named").
        what: &'static str,
        /// The name.
        name: String,
    },
    /// No such export.
    #[error("no {what} '{name}'")]
    NotFound {
        /// How the protocol calls its exports.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A parameter is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The address cannot be listened on.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A front end's protocol: what the [`Registry`] needs to know of it.
pub trait Protocol: Send + Sync + Sized + 'static {
    /// Its name in logs and messages ("NBD", "NVMe/TCP").
    const NAME: &'static str;
    /// How messages call one export before its name ("NBD export named").
    const EXPORT: &'static str;
    /// The key of an export's name in its parameters and listings (`name`, `nqn`).
    const NAME_KEY: &'static str;
    /// The RPC method that starts an export (what `save_config` records).
    const START_METHOD: &'static str;
    /// Size of the staging buffers its connections share.
    const BUF_SIZE: usize;
    /// Number of those buffers.
    const BUFS: usize;

    /// Checks a new export before it is registered.
    fn check(&self, name: &str, bdev: &dyn Bdev, address: &Address) -> Result<(), ExportError>;

    /// Takes a connection accepted on `address`: hands it to a reactor, or to a handshake
    /// first.
    fn accept(registry: &Arc<Registry<Self>>, stream: Stream, address: &Address);
}
