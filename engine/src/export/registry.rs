//! One protocol's exports and listeners: start, stop, the in-use checks (stopped exports count
//! while their connections finish), the list and the configuration, the staging pool its
//! connections share and the round robin placing them on reactors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use drivers::iostat::{CountedBdev, IoStats};
use drivers::Bdev;
use hugepages::BufferPool;

use super::contexts::DirtyBitmaps;
use super::listener::{AcceptThread, Listener};
use super::{Address, Export, ExportError, ExportInfo, ExportOptions, Protocol, Source};
use crate::reactor::{Poller, ReactorHandle};

/// The exports and listeners of protocol `P`.
pub struct Registry<P: Protocol> {
    protocol: P,
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    listeners: Mutex<BTreeMap<Address, AcceptThread>>,
    /// Stopped exports whose connections still finish the requests they read: they still count
    /// as users of their bdev (for the checks that keep raw exports out of pairs) until their
    /// last connection closes.
    stopping: Mutex<Vec<Arc<Export>>>,
    /// Bumped whenever an export starts or stops (the NVMe discovery log's generation).
    generation: AtomicU64,
    reactors: Vec<ReactorHandle>,
    next_reactor: AtomicUsize,
    /// The staging pool of the connections, mapped when the first export starts.
    pool: Mutex<Option<BufferPool>>,
}

impl<P: Protocol> Registry<P> {
    /// A registry whose connections run on `reactors`.
    pub fn new(protocol: P, reactors: Vec<ReactorHandle>) -> Arc<Self> {
        Arc::new(Self {
            protocol,
            exports: Mutex::new(BTreeMap::new()),
            listeners: Mutex::new(BTreeMap::new()),
            stopping: Mutex::new(Vec::new()),
            generation: AtomicU64::new(1),
            reactors,
            next_reactor: AtomicUsize::new(0),
            pool: Mutex::new(None),
        })
    }

    /// The protocol's own state.
    pub fn protocol(&self) -> &P {
        &self.protocol
    }

    fn exports(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The staging pool, mapped now if this is the first call.
    pub fn pool(&self) -> Result<BufferPool, ExportError> {
        let mut p = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = p.as_ref() {
            return Ok(pool.clone());
        }
        let pool = BufferPool::new(P::BUF_SIZE, P::BUFS)
            .map_err(|e| ExportError::Invalid(format!("{} buffers: {e}", P::NAME)))?;
        *p = Some(pool.clone());
        Ok(pool)
    }

    /// Places a connection on the next reactor, taken in turn: `make` builds its poller with
    /// the staging pool. The connection is dropped (with a log line) when the pool cannot be
    /// mapped or the reactor has stopped.
    pub fn place(&self, make: impl FnOnce(BufferPool) -> Box<dyn Poller> + Send + 'static) {
        let pool = match self.pool() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(%e, "{} connection dropped", P::NAME);
                return;
            }
        };
        let i = self.next_reactor.fetch_add(1, Ordering::Relaxed) % self.reactors.len().max(1);
        let Some(reactor) = self.reactors.get(i) else {
            return;
        };
        let sent = reactor.send_blocking(Box::new(move |cx| cx.add_poller(make(pool))));
        if let Err(e) = sent {
            tracing::warn!(%e, "{} connection dropped: reactor stopped", P::NAME);
        }
    }

    /// The export `name` served at `address`.
    pub fn lookup(&self, address: &Address, name: &str) -> Option<Arc<Export>> {
        self.exports()
            .get(name)
            .filter(|e| e.address == *address && !e.is_closed())
            .cloned()
    }

    /// The export `name`, wherever it is served.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports().get(name).cloned()
    }

    /// Exports served at `address`, by name.
    pub fn exports_at(&self, address: &Address) -> Vec<Arc<Export>> {
        self.exports()
            .values()
            .filter(|e| e.address == *address && !e.is_closed())
            .cloned()
            .collect()
    }

    /// The generation of the export list (changes whenever an export starts or stops).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Marks a change of what the exports show (the NVMe discovery log's generation), besides
    /// starts and stops: a host allowed or removed.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Starts an export (and its address's listener if it is the first export there), with
    /// the protocol's own `options`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        self: &Arc<Self>,
        name: &str,
        source: Source,
        bdev: Arc<dyn Bdev>,
        writable: bool,
        address: Address,
        dirty_bitmaps: Option<Arc<dyn DirtyBitmaps>>,
        options: Arc<dyn ExportOptions>,
    ) -> Result<(), ExportError> {
        self.protocol.check(name, bdev.as_ref(), &address)?;
        self.pool()?;
        let mut exports = self.exports();
        if exports.contains_key(name) {
            return Err(ExportError::Exists {
                what: P::EXPORT,
                name: name.to_string(),
            });
        }
        {
            let mut listeners = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !listeners.contains_key(&address) {
                let thread = self.listen(&address)?;
                listeners.insert(address.clone(), thread);
            }
        }
        tracing::info!(
            protocol = P::NAME,
            export = name,
            %address,
            writable,
            "export started"
        );
        // The export's own counts: its connections' channels go through them.
        let stats = IoStats::new(false);
        let contexts = super::contexts::contexts_of(&bdev);
        let bdev: Arc<dyn Bdev> = Arc::new(CountedBdev::new(bdev, Arc::clone(&stats)));
        exports.insert(
            name.to_string(),
            Arc::new(Export {
                name: name.to_string(),
                source,
                bdev,
                stats,
                writable,
                address,
                contexts,
                dirty_bitmaps,
                options,
                closed: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
            }),
        );
        drop(exports);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Stops an export: its connections close once their requests in flight are answered, and
    /// its address stops listening when no export is left there.
    pub fn stop(&self, name: &str) -> Result<(), ExportError> {
        let e = self
            .exports()
            .remove(name)
            .ok_or_else(|| ExportError::NotFound {
                what: P::EXPORT,
                name: name.to_string(),
            })?;
        e.closed.store(true, Ordering::SeqCst);
        self.stopping
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&e));
        self.generation.fetch_add(1, Ordering::SeqCst);
        // Parked reactors wake so the export's connections see it closed.
        for r in &self.reactors {
            r.wake_if_parked();
        }
        if self.exports_at(&e.address).is_empty() {
            let removed = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&e.address);
            // Joined outside the lock.
            drop(removed);
        }
        tracing::info!(protocol = P::NAME, export = name, "export stopped");
        Ok(())
    }

    /// `nbd_get_exports`, `nvmf_get_exports`.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.exports().values().map(|e| info::<P>(e)).collect()
    }

    fn listen(self: &Arc<Self>, address: &Address) -> Result<AcceptThread, ExportError> {
        let err = |source| ExportError::Listen {
            address: address.to_string(),
            source,
        };
        let listener = Listener::bind(address).map_err(err)?;
        let (registry, at) = (Arc::clone(self), address.clone());
        AcceptThread::spawn(P::NAME, listener, move |stream| {
            P::accept(&registry, stream, &at)
        })
        .map_err(err)
    }
}

/// What the listing shows of export `e`.
fn info<P: Protocol>(e: &Export) -> ExportInfo {
    ExportInfo {
        name_key: P::NAME_KEY,
        name: e.name.clone(),
        source: e.source.clone(),
        writable: e.writable,
        address: e.address.clone(),
        connections: e.connections.load(Ordering::SeqCst),
        io: e.stats.snapshot(),
        options: Arc::clone(&e.options),
    }
}

/// What the engine asks of every protocol's registry alike: the checks that span protocols,
/// the configuration, the stop.
pub trait ExportSet: Send + Sync {
    /// The protocol's name ("NBD", "NVMe/TCP").
    fn protocol_name(&self) -> &'static str;
    /// The name of an export, or of a stopped one whose connections are still closing, that
    /// satisfies `pred`.
    fn uses(&self, pred: &dyn Fn(&Export) -> bool) -> Option<String>;
    /// The start calls that rebuild every export.
    fn config(&self) -> Vec<serde_json::Value>;
    /// The start call that rebuilds export `name`, if it runs.
    fn config_of(&self, name: &str) -> Option<serde_json::Value>;
    /// Stops every export.
    fn stop_all(&self);
}

impl<P: Protocol> ExportSet for Registry<P> {
    fn protocol_name(&self) -> &'static str {
        P::NAME
    }

    fn uses(&self, pred: &dyn Fn(&Export) -> bool) -> Option<String> {
        if let Some(e) = self.exports().values().find(|e| pred(e)) {
            return Some(e.name.clone());
        }
        let mut stopping = self.stopping.lock().unwrap_or_else(PoisonError::into_inner);
        stopping.retain(|e| e.connections.load(Ordering::SeqCst) > 0);
        stopping
            .iter()
            .find(|e| pred(e))
            .map(|e| format!("{} (stopped, its connections still closing)", e.name))
    }

    fn config(&self) -> Vec<serde_json::Value> {
        self.list()
            .iter()
            .map(|e| serde_json::json!({"method": P::START_METHOD, "params": e.params()}))
            .collect()
    }

    fn config_of(&self, name: &str) -> Option<serde_json::Value> {
        let e = self.get(name)?;
        let params = info::<P>(&e).params();
        Some(serde_json::json!({"method": P::START_METHOD, "params": params}))
    }

    fn stop_all(&self) {
        let names: Vec<String> = self.exports().keys().cloned().collect();
        for n in names {
            let _ = self.stop(&n);
        }
    }
}

impl<P: Protocol> Drop for Registry<P> {
    fn drop(&mut self) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}
