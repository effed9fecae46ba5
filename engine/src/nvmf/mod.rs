//! The NVMe/TCP target: bdevs and pair images exported as namespaces of NVMe subsystems.
//!
//! Each export is a subsystem (its NQN) with one namespace, served on a TCP address; several
//! exports may share an address, which also answers the discovery subsystem's NQN. A listener
//! thread per address accepts connections and hands each one, round robin, to a reactor, where
//! a [`conn::NvmfConn`] poller runs the queue over its non-blocking socket. Per the transport
//! specification every queue is its own connection: the admin queue's Connect creates a
//! controller (dynamic model), and the host's I/O queues join it by controller id, each on
//! whichever reactor took its connection.

pub mod conn;

use std::collections::{BTreeMap, HashMap};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use drivers::nvmf::fabrics::{self, DiscoveryEntry};
use drivers::Bdev;
use hugepages::BufferPool;
use serde::Serialize;

use crate::app::{resolve_export, Engine, EngineError, ExportOf};
use crate::listener::{AcceptThread, ConnectionPool, ReactorRoundRobin, Stopping};
use crate::nbd::Source;
use crate::reactor::ReactorHandle;

/// Size of the data buffers (a command's data is split into pieces of at most this).
const BUF_SIZE: usize = 64 << 10;
/// Buffers shared by all NVMe/TCP connections.
const BUFS: usize = 1024;
/// Default address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4420";
const _: () = assert!(
    drivers::nvmf::DEFAULT_PORT == 4420,
    "DEFAULT_LISTEN names the default port"
);

/// Errors of export management.
#[derive(Debug, thiserror::Error)]
pub enum NvmfError {
    /// An NQN is taken.
    #[error("an NVMe/TCP export with NQN '{0}' already exists")]
    Exists(String),
    /// No such export.
    #[error("no NVMe/TCP export with NQN '{0}'")]
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

impl From<NvmfError> for EngineError {
    fn from(e: NvmfError) -> Self {
        match e {
            NvmfError::Exists(_) => EngineError::InUse(e.to_string()),
            NvmfError::NotFound(_) => EngineError::NotFound(e.to_string()),
            NvmfError::Invalid(m) => EngineError::Bdev(drivers::BdevError::Invalid(m)),
            NvmfError::Listen { .. } => EngineError::Target(e.to_string()),
        }
    }
}

/// One export: a subsystem with one namespace.
pub struct NvmfExport {
    /// Subsystem NQN.
    pub nqn: String,
    /// What it shows.
    pub source: Source,
    /// The bdev connections open channels on.
    pub bdev: Arc<dyn Bdev>,
    /// Writes allowed.
    pub writable: bool,
    /// Address (host:port).
    pub listen: String,
    /// Namespace identifier (NGUID/UUID).
    pub ns_id: [u8; 16],
    closed: AtomicBool,
    /// Open connections (queues).
    pub connections: AtomicUsize,
}

impl NvmfExport {
    /// True once stopped.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Size of the pieces a command's data is split into: the buffer size, or the bdev's
    /// boundary (a pair's tracks).
    pub fn piece_size(&self) -> u64 {
        match self.bdev.io_boundary() {
            Some(b) if b < BUF_SIZE as u64 => b,
            _ => BUF_SIZE as u64,
        }
    }
}

/// What `nvmf_get_exports` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    /// NQN.
    pub nqn: String,
    /// `bdev` or `pair`.
    #[serde(flatten)]
    pub source: Source,
    /// Writes allowed.
    pub writable: bool,
    /// Address.
    pub listen: String,
    /// Open queues (connections).
    pub connections: usize,
}

/// A controller: created by an admin queue's Connect, joined by I/O queues.
pub struct Ctrl {
    /// Controller id.
    pub cntlid: u16,
    /// The export (None: the discovery controller).
    pub export: Option<Arc<NvmfExport>>,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Address it was connected on.
    pub listen: String,
    /// CC.
    pub cc: AtomicU32,
    /// CSTS.
    pub csts: AtomicU32,
    /// I/O queues granted by Set Features (0: not asked yet).
    pub io_queues: AtomicU32,
    /// Keep Alive Timeout (ms, 0: none).
    pub kato_ms: u32,
    /// The admin queue is gone: the I/O queues close too.
    pub dead: AtomicBool,
    /// I/O queue ids connected.
    pub qids: Mutex<Vec<u16>>,
}

/// The NVMe/TCP service of an engine.
pub struct NvmfService {
    exports: Mutex<BTreeMap<String, Arc<NvmfExport>>>,
    listeners: Mutex<BTreeMap<String, AcceptThread>>,
    ctrls: Mutex<HashMap<u16, Weak<Ctrl>>>,
    next_cntlid: AtomicU16,
    generation: AtomicU64,
    reactors: ReactorRoundRobin,
    stopping: Stopping<NvmfExport>,
    pool: ConnectionPool,
}

impl NvmfService {
    /// A service whose connections run on `reactors`.
    pub fn new(reactors: Vec<ReactorHandle>) -> Arc<Self> {
        Arc::new(Self {
            exports: Mutex::new(BTreeMap::new()),
            listeners: Mutex::new(BTreeMap::new()),
            ctrls: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
            generation: AtomicU64::new(1),
            reactors: ReactorRoundRobin::new(reactors),
            stopping: Stopping::new(),
            pool: ConnectionPool::new(BUF_SIZE, BUFS),
        })
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<NvmfExport>>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pool(&self) -> Result<BufferPool, NvmfError> {
        self.pool
            .get()
            .map_err(|e| NvmfError::Invalid(format!("NVMe/TCP buffers: {e}")))
    }

    /// The export `nqn` served at `listen`.
    pub fn lookup(&self, listen: &str, nqn: &str) -> Option<Arc<NvmfExport>> {
        self.exports()
            .get(nqn)
            .filter(|e| e.listen == listen && !e.is_closed())
            .cloned()
    }

    /// The discovery log of `listen`: every export served there.
    pub fn discovery_log(&self, listen: &str) -> Vec<u8> {
        let default_port = drivers::nvmf::DEFAULT_PORT.to_string();
        let (traddr, trsvcid) = listen
            .rsplit_once(':')
            .unwrap_or((listen, default_port.as_str()));
        let entries: Vec<DiscoveryEntry> = self
            .exports()
            .values()
            .filter(|e| e.listen == listen && !e.is_closed())
            .map(|e| DiscoveryEntry {
                subnqn: e.nqn.clone(),
                traddr: traddr.trim_matches(['[', ']']).to_string(),
                trsvcid: trsvcid.to_string(),
                portid: 1,
            })
            .collect();
        fabrics::discovery_log(self.generation.load(Ordering::SeqCst), &entries)
    }

    /// Registers a new controller.
    pub fn new_ctrl(
        &self,
        export: Option<Arc<NvmfExport>>,
        subnqn: &str,
        hostnqn: &str,
        listen: &str,
        kato_ms: u32,
    ) -> Option<Arc<Ctrl>> {
        let mut ctrls = self.ctrls.lock().unwrap_or_else(PoisonError::into_inner);
        ctrls.retain(|_, w| w.strong_count() > 0);
        // Controller ids 1..=0xffef, the first free one from a rotating start.
        let cntlid = (0..0xffefu32).find_map(|_| {
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            (id != 0 && id < 0xfff0 && !ctrls.contains_key(&id)).then_some(id)
        })?;
        let ctrl = Arc::new(Ctrl {
            cntlid,
            export,
            subnqn: subnqn.to_string(),
            hostnqn: hostnqn.to_string(),
            listen: listen.to_string(),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            io_queues: AtomicU32::new(0),
            kato_ms,
            dead: AtomicBool::new(false),
            qids: Mutex::new(Vec::new()),
        });
        ctrls.insert(cntlid, Arc::downgrade(&ctrl));
        Some(ctrl)
    }

    /// The live controller `cntlid`.
    pub fn ctrl(&self, cntlid: u16) -> Option<Arc<Ctrl>> {
        self.ctrls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&cntlid)
            .and_then(Weak::upgrade)
            .filter(|c| !c.dead.load(Ordering::SeqCst))
    }

    /// Starts an export (and its address's listener if it is the first export there).
    pub fn start(
        self: &Arc<Self>,
        nqn: &str,
        source: Source,
        bdev: Arc<dyn Bdev>,
        writable: bool,
        listen: &str,
    ) -> Result<(), NvmfError> {
        check_nqn(nqn)?;
        let bs = bdev.geometry().block_size;
        if bs as usize > BUF_SIZE {
            return Err(NvmfError::Invalid(format!(
                "block size {bs} is larger than the target's buffers"
            )));
        }
        self.pool()?;
        let mut exports = self.exports();
        if exports.contains_key(nqn) {
            return Err(NvmfError::Exists(nqn.to_string()));
        }
        {
            let mut listeners = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !listeners.contains_key(listen) {
                let r = self.listen(listen)?;
                listeners.insert(listen.to_string(), r);
            }
        }
        exports.insert(
            nqn.to_string(),
            Arc::new(NvmfExport {
                nqn: nqn.to_string(),
                source,
                bdev,
                writable,
                listen: listen.to_string(),
                ns_id: fabrics::id_from_name(nqn),
                closed: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
            }),
        );
        self.generation.fetch_add(1, Ordering::SeqCst);
        tracing::info!(nqn, listen, writable, "NVMe/TCP export started");
        Ok(())
    }

    /// Stops an export: its connections close once their commands in flight are answered.
    pub fn stop(&self, nqn: &str) -> Result<(), NvmfError> {
        let e = self
            .exports()
            .remove(nqn)
            .ok_or_else(|| NvmfError::NotFound(nqn.to_string()))?;
        e.closed.store(true, Ordering::SeqCst);
        self.stopping.add(Arc::clone(&e));
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.reactors.wake_all();
        let still_used = self.exports().values().any(|x| x.listen == e.listen);
        if !still_used {
            let removed = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&e.listen);
            drop(removed);
        }
        tracing::info!(nqn, "NVMe/TCP export stopped");
        Ok(())
    }

    /// Stops every export.
    pub fn stop_all(&self) {
        let nqns: Vec<String> = self.exports().keys().cloned().collect();
        for n in nqns {
            let _ = self.stop(&n);
        }
    }

    /// The name of an export whose source satisfies `pred`.
    pub fn uses(&self, pred: impl Fn(&NvmfExport) -> bool) -> Option<String> {
        self.exports()
            .values()
            .find(|e| pred(e))
            .map(|e| e.nqn.clone())
            .or_else(|| {
                self.stopping
                    .find(|e| e.connections.load(Ordering::SeqCst), pred)
                    .map(|e| format!("{} (stopped, its connections still closing)", e.nqn))
            })
    }

    /// `nvmf_get_exports`.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.exports()
            .values()
            .map(|e| ExportInfo {
                nqn: e.nqn.clone(),
                source: e.source.clone(),
                writable: e.writable,
                listen: e.listen.clone(),
                connections: e.connections.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// The `nvmf_export_start` calls that rebuild every export.
    pub fn config(&self) -> Vec<serde_json::Value> {
        self.list()
            .into_iter()
            .map(|e| {
                let mut params = serde_json::json!({
                    "nqn": e.nqn, "writable": e.writable, "listen": e.listen,
                });
                match &e.source {
                    Source::Bdev(b) => params["bdev"] = b.clone().into(),
                    Source::Pair(p) => params["pair"] = p.clone().into(),
                }
                serde_json::json!({"method": "nvmf_export_start", "params": params})
            })
            .collect()
    }

    fn listen(self: &Arc<Self>, listen: &str) -> Result<AcceptThread, NvmfError> {
        let err = |source| NvmfError::Listen {
            address: listen.to_string(),
            source,
        };
        let l = TcpListener::bind(listen).map_err(err)?;
        l.set_nonblocking(true).map_err(err)?;
        let (svc, key) = (Arc::clone(self), listen.to_string());
        AcceptThread::spawn(
            "nvmf_listen",
            "NVMe/TCP",
            move || l.accept(),
            move |(s, peer)| {
                tracing::debug!(%peer, listen = key, "NVMe/TCP connection");
                svc.hand_over(s, &key);
            },
            None,
        )
        .map_err(err)
    }

    fn hand_over(self: &Arc<Self>, s: TcpStream, key: &str) {
        if s.set_nonblocking(true).is_err() || s.set_nodelay(true).is_err() {
            return;
        }
        let pool = match self.pool() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(%e, "NVMe/TCP connection dropped");
                return;
            }
        };
        let Some(reactor) = self.reactors.next() else {
            return;
        };
        let (svc, key) = (Arc::clone(self), key.to_string());
        let sent = reactor.send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(conn::NvmfConn::new(s, svc, key, pool)))
        }));
        if let Err(e) = sent {
            tracing::warn!(%e, "NVMe/TCP connection dropped: reactor stopped");
        }
    }
}

impl Drop for NvmfService {
    fn drop(&mut self) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Checks an NQN given to `nvmf_export_start`.
pub fn check_nqn(nqn: &str) -> Result<(), NvmfError> {
    if nqn.is_empty() || nqn.len() > 223 || !nqn.starts_with("nqn.") {
        return Err(NvmfError::Invalid(
            "an NQN starts with 'nqn.' and has at most 223 bytes".into(),
        ));
    }
    if nqn == fabrics::DISCOVERY_NQN {
        return Err(NvmfError::Invalid(
            "the discovery NQN cannot be exported".into(),
        ));
    }
    Ok(())
}

/// For a backup to an `nvmf` target: the controller and I/O queue, connected here on the
/// control thread (Connect and Identify block), checked against the image.
pub(crate) fn backup_connection(
    target: &crate::backup::Target,
    pair: &crate::pair::Pair,
) -> Result<Option<drivers::sink::nvmf::NvmfConnection>, EngineError> {
    let crate::backup::Target::Nvmf {
        traddr,
        trsvcid,
        subnqn,
        nsid,
        hostnqn,
    } = target
    else {
        return Ok(None);
    };
    let t = drivers::sink::nvmf::NvmfTarget {
        traddr: traddr.clone(),
        trsvcid: trsvcid.unwrap_or(drivers::nvmf::DEFAULT_PORT),
        subnqn: subnqn.clone(),
        nsid: nsid.unwrap_or(1),
        hostnqn: hostnqn.clone(),
    };
    let conn = drivers::sink::nvmf::NvmfConnection::connect(&t).map_err(EngineError::Target)?;
    let g = pair.geometry();
    conn.check(g.size(), g.block_size)
        .map_err(EngineError::Target)?;
    Ok(Some(conn))
}

impl Engine {
    /// `nvmf_export_start`: exports a bdev (through its pair when it is a pair's primary) or a
    /// pair's image as namespace 1 of subsystem `nqn`. `writable` defaults to true for a bdev
    /// and false for an image.
    pub fn nvmf_export_start(
        &self,
        nqn: &str,
        bdev: Option<&str>,
        pair: Option<&str>,
        writable: Option<bool>,
        listen: Option<&str>,
    ) -> Result<(), EngineError> {
        check_nqn(nqn)?;
        let of = match (bdev, pair) {
            (Some(b), None) => ExportOf::Bdev(b),
            (None, Some(p)) => ExportOf::Pair(p),
            _ => {
                return Err(
                    NvmfError::Invalid("give exactly one of 'bdev' and 'pair'".into()).into(),
                )
            }
        };
        // The state stays locked until the export is registered (see `nbd_export_start`).
        let st = self.state();
        let (source, target, writable) = resolve_export(&st, of, writable)?;
        self.nvmf().start(
            nqn,
            source,
            target,
            writable,
            listen.unwrap_or(DEFAULT_LISTEN),
        )?;
        Ok(())
    }
}
