//! The NBD server: exports of bdevs and of pairs' images on Unix sockets and TCP.
//!
//! A listener thread per address accepts connections; each connection's handshake runs on a
//! short-lived control thread (blocking, with a timeout), and the transmission phase is then
//! handed to a reactor as a poller over the non-blocking socket ([`conn::NbdConn`]), round
//! robin over the reactors. Several exports may share one address.

pub mod conn;
pub mod handshake;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use drivers::nbd::stream::Stream;
use drivers::Bdev;
use hugepages::BufferPool;
use serde::Serialize;

use crate::listener::{AcceptThread, ConnectionPool, ReactorRoundRobin, Stopping};
use crate::reactor::ReactorHandle;

/// Size of the NBD data buffers (requests are split into pieces of at most this).
const NBD_BUF: usize = 64 << 10;
/// Buffers shared by all NBD connections.
const NBD_BUFS: usize = 1024;
/// Handshakes in progress at once.
const MAX_HANDSHAKES: usize = 64;
/// A handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

impl Address {
    fn key(&self) -> String {
        match self {
            Address::Unix(p) => format!("unix:{}", p.display()),
            Address::Tcp(a) => format!("tcp:{a}"),
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

/// One export.
pub struct Export {
    /// Export name (what clients ask for).
    pub name: String,
    /// What it shows.
    pub source: Source,
    /// The bdev the connections open channels on.
    pub bdev: Arc<dyn Bdev>,
    /// Writes allowed.
    pub writable: bool,
    /// Where it listens.
    pub address: Address,
    closed: AtomicBool,
    /// Open connections.
    pub connections: AtomicUsize,
}

impl Export {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.bdev.geometry().size()
    }

    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.bdev.geometry().block_size
    }

    /// What `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` say.
    pub fn description(&self) -> String {
        match &self.source {
            Source::Bdev(b) => format!("quicksplit bdev {b}"),
            Source::Pair(p) => format!("quicksplit image of pair {p}"),
        }
    }

    /// Size of the pieces requests are split into: the buffer size, or the bdev's boundary.
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
}

/// What `nbd_get_exports` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    /// Name.
    pub name: String,
    /// `bdev` or `pair` it shows.
    #[serde(flatten)]
    pub source: Source,
    /// Writes allowed.
    pub writable: bool,
    /// `socket` or `listen`.
    #[serde(flatten)]
    pub address: Address,
    /// Open connections.
    pub connections: usize,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

/// Errors of export management.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A name is taken.
    #[error("an NBD export named '{0}' already exists")]
    Exists(String),
    /// No such export.
    #[error("no NBD export named '{0}'")]
    NotFound(String),
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

/// The NBD service of an engine.
pub struct NbdService {
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    listeners: Mutex<BTreeMap<String, AcceptThread>>,
    reactors: ReactorRoundRobin,
    stopping: Stopping<Export>,
    handshakes: Arc<AtomicUsize>,
    pool: ConnectionPool,
}

impl NbdService {
    /// A service whose connections run on `reactors`.
    pub fn new(reactors: Vec<ReactorHandle>) -> Arc<Self> {
        Arc::new(Self {
            exports: Mutex::new(BTreeMap::new()),
            listeners: Mutex::new(BTreeMap::new()),
            reactors: ReactorRoundRobin::new(reactors),
            stopping: Stopping::new(),
            handshakes: Arc::new(AtomicUsize::new(0)),
            pool: ConnectionPool::new(NBD_BUF, NBD_BUFS),
        })
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pool(&self) -> Result<BufferPool, NbdError> {
        self.pool
            .get()
            .map_err(|e| NbdError::Invalid(format!("NBD buffers: {e}")))
    }

    /// The export `name` served at `address` (empty name: the first one there).
    pub fn lookup(&self, address: &str, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports();
        exports
            .values()
            .filter(|e| e.address.key() == address && !e.is_closed())
            .find(|e| name.is_empty() || e.name == name)
            .cloned()
    }

    /// Exports served at `address`.
    pub fn exports_at(&self, address: &str) -> Vec<Arc<Export>> {
        self.exports()
            .values()
            .filter(|e| e.address.key() == address && !e.is_closed())
            .cloned()
            .collect()
    }

    /// True when any export shows `source`.
    pub fn uses(&self, pred: impl Fn(&Export) -> bool) -> Option<String> {
        self.exports()
            .values()
            .find(|e| pred(e))
            .map(|e| e.name.clone())
            .or_else(|| {
                self.stopping
                    .find(|e| e.connections.load(Ordering::SeqCst), pred)
                    .map(|e| format!("{} (stopped, its connections still closing)", e.name))
            })
    }

    /// Starts an export (and its address's listener if it is the first export there).
    pub fn start(
        self: &Arc<Self>,
        name: &str,
        source: Source,
        bdev: Arc<dyn Bdev>,
        writable: bool,
        address: Address,
    ) -> Result<(), NbdError> {
        if name.is_empty() || name.len() > 4096 {
            return Err(NbdError::Invalid(
                "an export name has 1 to 4096 bytes".into(),
            ));
        }
        self.pool()?;
        let mut exports = self.exports();
        if exports.contains_key(name) {
            return Err(NbdError::Exists(name.to_string()));
        }
        let key = address.key();
        {
            let mut listeners = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let std::collections::btree_map::Entry::Vacant(slot) = listeners.entry(key) {
                slot.insert(self.listen(&address)?);
            }
        }
        exports.insert(
            name.to_string(),
            Arc::new(Export {
                name: name.to_string(),
                source,
                bdev,
                writable,
                address,
                closed: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
            }),
        );
        tracing::info!(export = name, "NBD export started");
        Ok(())
    }

    /// Stops an export: its connections close once their requests in flight are answered, and
    /// its address stops listening when no export is left there.
    pub fn stop(&self, name: &str) -> Result<(), NbdError> {
        let e = self
            .exports()
            .remove(name)
            .ok_or_else(|| NbdError::NotFound(name.to_string()))?;
        e.closed.store(true, Ordering::SeqCst);
        self.stopping.add(Arc::clone(&e));
        self.reactors.wake_all();
        let key = e.address.key();
        if self.exports_at(&key).is_empty() {
            let removed = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
            drop(removed);
        }
        Ok(())
    }

    /// Stops every export.
    pub fn stop_all(&self) {
        let names: Vec<String> = self.exports().keys().cloned().collect();
        for n in names {
            let _ = self.stop(&n);
        }
    }

    /// `nbd_get_exports`.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.exports()
            .values()
            .map(|e| ExportInfo {
                name: e.name.clone(),
                source: e.source.clone(),
                writable: e.writable,
                address: e.address.clone(),
                connections: e.connections.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// The `nbd_export_start` calls that rebuild every export.
    pub fn config(&self) -> Vec<serde_json::Value> {
        self.list()
            .into_iter()
            .map(|e| {
                let mut params = serde_json::json!({"name": e.name, "writable": e.writable});
                match &e.source {
                    Source::Bdev(b) => params["bdev"] = b.clone().into(),
                    Source::Pair(p) => params["pair"] = p.clone().into(),
                }
                match &e.address {
                    Address::Unix(p) => params["socket"] = p.display().to_string().into(),
                    Address::Tcp(a) => params["listen"] = a.clone().into(),
                }
                serde_json::json!({"method": "nbd_export_start", "params": params})
            })
            .collect()
    }

    fn listen(self: &Arc<Self>, address: &Address) -> Result<AcceptThread, NbdError> {
        let err = |source| NbdError::Listen {
            address: address.key(),
            source,
        };
        let (listener, path) = match address {
            Address::Unix(p) => {
                crate::listener::clear_stale_socket(p).map_err(err)?;
                let l = UnixListener::bind(p).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                (Listener::Unix(l), Some(p.clone()))
            }
            Address::Tcp(a) => {
                let l = TcpListener::bind(a.as_str()).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                (Listener::Tcp(l), None)
            }
        };
        let (svc, key) = (Arc::clone(self), address.key());
        AcceptThread::spawn(
            "nbd_listen",
            "NBD",
            move || listener.accept(),
            move |stream| svc.start_handshake(stream, &key),
            path,
        )
        .map_err(err)
    }

    /// Runs a new connection's handshake on its own thread (blocking, with a timeout), at most
    /// `MAX_HANDSHAKES` at once.
    fn start_handshake(self: &Arc<Self>, stream: Stream, key: &str) {
        if self.handshakes.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            return;
        }
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        let (svc, key) = (Arc::clone(self), key.to_string());
        let spawned = std::thread::Builder::new()
            .name("nbd_handshake".into())
            .spawn(move || {
                svc.handshake(stream, &key);
                svc.handshakes.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.handshakes.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn handshake(&self, mut stream: Stream, key: &str) {
        if stream.set_mode(Some(HANDSHAKE_TIMEOUT)).is_err() {
            return;
        }
        let agreed = match handshake::negotiate(&mut stream, self, key) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%e, "NBD handshake ended");
                return;
            }
        };
        if stream.set_mode(None).is_err() {
            return;
        }
        let pool = match self.pool() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(%e, "NBD connection dropped");
                return;
            }
        };
        let Some(reactor) = self.reactors.next() else {
            return;
        };
        let sent = reactor.send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(conn::NbdConn::new(
                stream,
                agreed.export,
                agreed.structured,
                pool,
            )))
        }));
        if let Err(e) = sent {
            tracing::warn!(%e, "NBD connection dropped: reactor stopped");
        }
    }
}

impl Drop for NbdService {
    fn drop(&mut self) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}
