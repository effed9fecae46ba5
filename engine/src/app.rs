//! The running engine: its reactors and the control-plane state (bdevs, and what later layers
//! add) behind one lock that the data path never takes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use drivers::{BdevError, BdevTable, DriverRegistry};

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backup::job::BackupJob;
use crate::backup::{BackupInfo, Backups, Journal, Mode, Target};
use crate::nbd::{Address, NbdError, NbdService, Source};
use crate::nvmf::NvmfService;
use crate::pair::channel::{PairView, View};
use crate::pair::control::{Action, ControlPoller, ControlQueue, ControlRequest, Outcome};
use crate::pair::copier::Copier;
use crate::pair::metadata::writer::MetaWriter;
use crate::pair::metadata::{HeaderRecord, Layout, Loaded, MetaError, Metadata};
use crate::pair::{Pair, PairConfig, PairError, PairInfo};
use crate::reactor::{ReactorError, ReactorOptions, Reactors};

/// Opens a pair's metadata file as a uring bdev. Buffered, not O_DIRECT: the writer makes
/// each batch durable with a flush (fdatasync) anyway, and concurrent O_DIRECT writes to this
/// small file through io_uring were seen never completing under heavy load on a 6.18 kernel.
fn metadata_bdev(
    name: &str,
    path: &Path,
    size: Option<u64>,
) -> Result<drivers::uring::UringBdev, BdevError> {
    drivers::uring::UringBdev::open_with(name, path, 4096, size, false, false)
}

/// Where a pair's metadata lives when it is not a file of the state directory.
pub enum MetadataDevice {
    /// Load it (the pair existed before).
    Existing(Arc<dyn drivers::Bdev>),
    /// Initialise it (a new pair).
    Fresh(Arc<dyn drivers::Bdev>),
    /// None: the pair lives in memory only and a restart starts it over (for comparing the
    /// cost of persistence).
    None,
}

/// Writes fresh metadata for a new pair on `bdev`: COPY, every track pending.
fn initialize_metadata(
    bdev: Arc<dyn drivers::Bdev>,
    cfg: &PairConfig,
    primary: &str,
    secondary: &str,
    tracks: u64,
) -> Result<Arc<Metadata>, EngineError> {
    let rec = HeaderRecord {
        seq: 1,
        name: cfg.name.clone(),
        primary: primary.to_string(),
        secondary: secondary.to_string(),
        track_size: cfg.track_size,
        tracks,
        state: crate::pair::PairState::Copy.into(),
        reverse: false,
        split_at_ns: 0,
        error: None,
    };
    Metadata::initialize(bdev, &rec)
        .map(Arc::new)
        .map_err(|e| EngineError::Bdev(BdevError::Invalid(e.to_string())))
}

/// What loading a pair's metadata gave.
type LoadOutcome = Result<Loaded, MetaError>;

/// The running configuration's file in the state directory.
pub const CONFIG_FILE: &str = "config.json";

/// Size of each volume of the embedded default.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Reactors could not start.
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    /// A bdev could not be created.
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// The embedded default could not be set up.
    #[error("embedded default: {0}")]
    Default(String),
    /// The state directory is unusable.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Control-plane state.
pub struct State {
    /// Named bdevs.
    pub bdevs: BdevTable,
    /// Drivers' create methods.
    pub drivers: DriverRegistry,
    /// Pairs by name.
    pub pairs: BTreeMap<String, Arc<Pair>>,
    /// Attached NVMe controllers and the bdevs of their namespaces.
    pub nvme_controllers: BTreeMap<String, Vec<String>>,
}

/// The engine: reactors plus control-plane state.
pub struct Engine {
    reactors: Reactors,
    state: Mutex<State>,
    state_dir: PathBuf,
    control: Arc<ControlQueue>,
    nbd: Arc<NbdService>,
    nvmf: Arc<NvmfService>,
    backups: Backups,
    /// Held while the configuration file is written: two RPCs finishing at once must not
    /// interleave their writes, nor rename an older snapshot over a newer one.
    config_file: Mutex<()>,
    /// Held while a backup starts, so two starts cannot both find a target free.
    backup_starts: Mutex<()>,
}

/// What an export shows.
pub(crate) enum ExportOf<'a> {
    /// A bdev, through its pair when it is a pair's primary.
    Bdev(&'a str),
    /// A pair's image.
    Pair(&'a str),
}

/// The source, the bdev connections open and the access of an export of `of`, with the state
/// locked by the caller until the export is registered. `writable` defaults to true for a bdev
/// and false for an image; a pair's secondary cannot be exported.
pub(crate) fn resolve_export(
    st: &State,
    of: ExportOf<'_>,
    writable: Option<bool>,
) -> Result<(Source, Arc<dyn drivers::Bdev>, bool), EngineError> {
    match of {
        ExportOf::Bdev(b) => {
            let raw = st.bdevs.get(b)?;
            let owner = st
                .pairs
                .values()
                .find(|p| p.primary().name() == b || p.secondary().name() == b);
            let target: Arc<dyn drivers::Bdev> = match owner {
                Some(p) if p.secondary().name() == b => {
                    return Err(EngineError::InUse(format!(
                        "bdev '{b}' is the secondary of pair '{}': export the pair's image \
                         instead",
                        p.name()
                    )))
                }
                Some(p) => Arc::new(PairView::new(Arc::clone(p), View::Primary)),
                None => raw,
            };
            Ok((
                Source::Bdev(b.to_string()),
                target,
                writable.unwrap_or(true),
            ))
        }
        ExportOf::Pair(name) => {
            let p = st
                .pairs
                .get(name)
                .cloned()
                .ok_or_else(|| PairError::NotFound(name.to_string()))?;
            Ok((
                Source::Pair(name.to_string()),
                Arc::new(PairView::new(p, View::Image)),
                writable.unwrap_or(false),
            ))
        }
    }
}

/// A file's identity, whatever the path naming it: device and inode, or the device number of
/// a block device.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    if m.file_type().is_block_device() {
        Some((u64::MAX, m.rdev()))
    } else {
        Some((m.dev(), m.ino()))
    }
}

/// Errors of engine operations (what RPC methods report).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A bdev operation failed.
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// A pair operation failed.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// The reactors are gone.
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    /// No such object.
    #[error("{0}")]
    NotFound(String),
    /// The feature is not part of this build.
    #[error("{0}")]
    Unavailable(String),
    /// A backup target cannot be used.
    #[error("backup target: {0}")]
    Target(String),
    /// An NBD export operation failed.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// The object is in use.
    #[error("{0}")]
    InUse(String),
}

impl Engine {
    /// Starts the reactors; no bdevs yet.
    pub fn start(opts: &ReactorOptions, state_dir: &Path) -> Result<Arc<Self>, AppError> {
        std::fs::create_dir_all(state_dir).map_err(|source| AppError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        // Absolute, so the configuration names files that outlive the working directory.
        let state_dir = std::fs::canonicalize(state_dir).map_err(|source| AppError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let state_dir = state_dir.as_path();
        let reactors = Reactors::start(opts)?;
        let mut drivers = DriverRegistry::default();
        drivers::register(&mut drivers);
        // The split acceptor lives on the first reactor; copiers go to the others when there
        // are others, so splitting and copying run on different cores.
        let control = ControlQueue::new(reactors.get(0).clone());
        let poller_queue = Arc::clone(&control);
        reactors.get(0).send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(ControlPoller::new(poller_queue)))
        }))?;
        let nbd = NbdService::new(reactors.handles().to_vec());
        let nvmf = NvmfService::new(reactors.handles().to_vec());
        Ok(Arc::new(Self {
            backups: Backups::with_journal(Journal::open(state_dir.join("backups.json")).map_err(
                |source| AppError::StateDir {
                    path: state_dir.to_path_buf(),
                    source,
                },
            )?),
            nbd,
            nvmf,
            reactors,
            state: Mutex::new(State {
                bdevs: BdevTable::new(),
                drivers,
                pairs: BTreeMap::new(),
                nvme_controllers: BTreeMap::new(),
            }),
            state_dir: state_dir.to_path_buf(),
            control,
            config_file: Mutex::new(()),
            backup_starts: Mutex::new(()),
        }))
    }

    /// Creates a pair over two unclaimed bdevs and starts its initial copy.
    pub fn pair_create(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
    ) -> Result<Arc<Pair>, EngineError> {
        self.pair_create_with(cfg, primary, secondary, None)
    }

    /// Creates a pair whose metadata lives on `meta` instead of a file in the state directory:
    /// `Existing` is loaded (a restart), `Fresh` is initialised. For tests that cut the power
    /// of the metadata's device too.
    pub fn pair_create_on(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
        meta: MetadataDevice,
    ) -> Result<Arc<Pair>, EngineError> {
        self.pair_create_with(cfg, primary, secondary, Some(meta))
    }

    fn pair_create_with(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
        device: Option<MetadataDevice>,
    ) -> Result<Arc<Pair>, EngineError> {
        // The name is a file name in the state directory (its metadata): one path component,
        // so no two names reach one file and none reaches outside.
        let n = &cfg.name;
        if n.is_empty() || n.len() > 200 || n.starts_with('.') || n.contains(['/', '\0']) {
            return Err(PairError::Invalid(format!(
                "parameter 'name': '{n}' must be 1 to 200 bytes without '/', not starting with '.'"
            ))
            .into());
        }
        let mut st = self.state();
        if st.pairs.contains_key(&cfg.name) {
            return Err(
                PairError::Invalid(format!("a pair named '{}' already exists", cfg.name)).into(),
            );
        }
        if primary == secondary {
            return Err(PairError::Invalid("primary and secondary must differ".into()).into());
        }
        let p = st.bdevs.get(primary)?;
        let s = st.bdevs.get(secondary)?;
        st.bdevs.check_unclaimed(primary)?;
        st.bdevs.check_unclaimed(secondary)?;
        // An export made before the pair writes the bdev itself, past the mirror and the copy
        // before write: the pair would not see those writes.
        for b in [primary, secondary] {
            if let Some(export) = self.raw_export_of(b) {
                return Err(EngineError::InUse(format!(
                    "bdev '{b}' is exported ({export}): stop the export before making it part \
                     of a pair"
                )));
            }
        }
        let tracks = Pair::check_geometry(cfg, p.as_ref(), s.as_ref())?;
        let copier_reactor = self.reactors.get(st.pairs.len() + 1).clone();
        let (meta, loaded): (Option<Arc<Metadata>>, _) = match device {
            None => {
                let (m, l) = self.open_metadata(cfg, primary, secondary, tracks)?;
                (Some(m), l)
            }
            Some(MetadataDevice::None) => (None, None),
            Some(MetadataDevice::Existing(bdev)) => match Metadata::load(Arc::clone(&bdev), tracks)
            {
                Ok((meta, l)) => (Some(Arc::new(meta)), Some(Ok(l))),
                Err(e) => {
                    let meta = initialize_metadata(bdev, cfg, primary, secondary, tracks)?;
                    (Some(meta), Some(Err(e)))
                }
            },
            Some(MetadataDevice::Fresh(bdev)) => (
                Some(initialize_metadata(bdev, cfg, primary, secondary, tracks)?),
                None,
            ),
        };
        let pair = Pair::with_metadata(
            cfg,
            p,
            s,
            self.reactors.handles().to_vec(),
            Some(copier_reactor.clone()),
            meta.clone(),
        )?;
        // A RAM disk comes back from a restart empty: metadata that calls it a mirror or an
        // image describes contents that are gone.
        let volatile = [pair.primary(), pair.secondary()]
            .into_iter()
            .find(|b| b.driver() == "malloc")
            .map(|b| b.name().to_string());
        match (loaded, volatile) {
            (None, _) => {}
            (Some(Ok(_)), Some(ram)) => pair.distrust(format!(
                "pair metadata not trusted: bdev '{ram}' is a RAM disk and lost its contents in \
                 the restart"
            )),
            (Some(Ok(l)), None) => match pair.apply_loaded(&l) {
                Ok(()) => tracing::info!(
                    pair = pair.name(),
                    state = pair.state().as_str(),
                    pending = pair.pending.count(),
                    "pair brought back from its metadata"
                ),
                Err(e) => pair.distrust(format!("pair metadata not trusted: {e}")),
            },
            (Some(Err(e)), _) => pair.distrust(format!("pair metadata not trusted: {e}")),
        }
        st.bdevs.claim(primary, &cfg.name)?;
        if let Err(e) = st.bdevs.claim(secondary, &cfg.name) {
            st.bdevs.release(primary, &cfg.name);
            return Err(e.into());
        }
        let for_copier = Arc::clone(&pair);
        let for_writer = Arc::clone(&pair);
        let started = copier_reactor.send_blocking(Box::new(move |cx| {
            if let Some(meta) = meta {
                cx.add_poller(Box::new(MetaWriter::new(for_writer, meta)));
            }
            cx.add_poller(Box::new(Copier::new(for_copier)))
        }));
        if let Err(e) = started {
            st.bdevs.release(primary, &cfg.name);
            st.bdevs.release(secondary, &cfg.name);
            return Err(e.into());
        }
        st.pairs.insert(cfg.name.clone(), Arc::clone(&pair));
        tracing::info!(pair = %cfg.name, primary, secondary, tracks = pair.tracks(), "pair created: COPY");
        Ok(pair)
    }

    /// Adds a bdev to the table.
    pub fn bdev_add(&self, bdev: Arc<dyn drivers::Bdev>) -> Result<(), EngineError> {
        let mut st = self.state();
        if let Some(f) = bdev.backing_file() {
            self.check_unused_file(&st, f)?;
        }
        st.bdevs.add(bdev)?;
        Ok(())
    }

    /// Fails when `path` is already one of the engine's files (checked before a bdev opens it,
    /// which may extend it): one file as two bdevs would let one write past the other's pair.
    pub fn check_bdev_file(&self, path: &Path) -> Result<(), EngineError> {
        self.check_unused_file(&self.state(), path)
    }

    fn check_unused_file(&self, st: &State, path: &Path) -> Result<(), EngineError> {
        match self.engine_file(st, path) {
            Some(what) => Err(EngineError::InUse(format!(
                "{} is {what}: a file is opened as one bdev only",
                path.display()
            ))),
            None => Ok(()),
        }
    }

    /// What of the engine's own `path` is, if anything: a bdev's file, a pair's metadata, or
    /// the state directory's configuration or backup records. Files are compared by identity,
    /// so another name for the same file (a link, `..`) is caught too.
    fn engine_file(&self, st: &State, path: &Path) -> Option<String> {
        let id = file_id(path)?;
        if let Some(b) = st
            .bdevs
            .all()
            .find(|b| b.backing_file().and_then(file_id) == Some(id))
        {
            return Some(format!("the file of bdev '{}'", b.name()));
        }
        for pair in st.pairs.keys() {
            if file_id(&self.metadata_path(pair)) == Some(id) {
                return Some(format!("the metadata of pair '{pair}'"));
            }
        }
        let own = [
            CONFIG_FILE,
            &format!("{CONFIG_FILE}.new"),
            "backups.json",
            "backups.json.new",
        ];
        if own
            .iter()
            .any(|f| file_id(&self.state_dir.join(f)) == Some(id))
        {
            return Some("a file of the engine's state directory".into());
        }
        None
    }

    /// Attaches an NVMe controller (`bdev_nvme_attach_controller`): every namespace becomes a
    /// bdev, or none does. Gives the bdevs' names.
    pub fn nvme_attach(&self, params: serde_json::Value) -> Result<Vec<String>, EngineError> {
        let create_error = |e| match e {
            drivers::CreateError::Bdev(b) => EngineError::Bdev(b),
            drivers::CreateError::Params(m) => EngineError::Bdev(BdevError::Invalid(m)),
        };
        let p: drivers::nvme::rpc::AttachParams =
            drivers::table::parse_params(params).map_err(create_error)?;
        let name = p.name.clone();
        if self.state().nvme_controllers.contains_key(&name) {
            return Err(EngineError::InUse(format!(
                "an NVMe controller named '{name}' is already attached"
            )));
        }
        // This engine's own export as a bdev would be a second name for a bdev it has (past
        // the checks that protect pairs), and a restart would replay the attach before the
        // export listens.
        if let Ok(drivers::nvme::rpc::Transport::Tcp {
            trsvcid, subnqn, ..
        }) = p.transport()
        {
            if let Some(own) = self.nvmf.list().into_iter().find(|e| {
                e.nqn == subnqn
                    && e.listen
                        .rsplit(':')
                        .next()
                        .and_then(|port| port.parse::<u16>().ok())
                        == Some(trsvcid)
            }) {
                return Err(EngineError::InUse(format!(
                    "'{}' is this engine's own NVMe/TCP export: use its bdev or pair directly",
                    own.nqn
                )));
            }
        }
        let bdevs = drivers::nvme::rpc::attach_with(p).map_err(create_error)?;
        let mut st = self.state();
        if st.nvme_controllers.contains_key(&name) {
            return Err(EngineError::InUse(format!(
                "an NVMe controller named '{name}' is already attached"
            )));
        }
        let names: Vec<String> = bdevs.iter().map(|b| b.name().to_string()).collect();
        if let Some(taken) = names.iter().find(|n| st.bdevs.contains(n)) {
            return Err(BdevError::Exists(taken.clone()).into());
        }
        for b in bdevs {
            st.bdevs.add(b)?;
        }
        st.nvme_controllers.insert(name, names.clone());
        Ok(names)
    }

    /// Detaches an NVMe controller: its namespaces' bdevs go, unless one is claimed or exported.
    pub fn nvme_detach(&self, name: &str) -> Result<(), EngineError> {
        // Checked and detached under one lock: an export starts under it too.
        let mut st = self.state();
        let names =
            st.nvme_controllers.get(name).cloned().ok_or_else(|| {
                EngineError::NotFound(format!("no NVMe controller named '{name}'"))
            })?;
        for n in &names {
            self.check_not_exported(n)?;
        }
        for n in &names {
            if let Some(by) = st
                .bdevs
                .list(Some(n))?
                .first()
                .and_then(|i| i.claimed_by.clone())
            {
                return Err(BdevError::Claimed {
                    name: n.clone(),
                    by,
                }
                .into());
            }
        }
        for n in &names {
            st.bdevs.delete(n)?;
        }
        st.nvme_controllers.remove(name);
        tracing::info!(
            controller = name,
            "NVMe controller detached from the bdev table"
        );
        Ok(())
    }

    /// Deletes an unclaimed, unexported bdev.
    pub fn bdev_delete(&self, name: &str) -> Result<(), EngineError> {
        // Checked and deleted under one lock: an export starts under it too.
        let mut st = self.state();
        if let Some((ctrl, _)) = st
            .nvme_controllers
            .iter()
            .find(|(_, ns)| ns.iter().any(|n| n == name))
        {
            return Err(EngineError::InUse(format!(
                "bdev '{name}' is a namespace of NVMe controller '{ctrl}': use \
                 bdev_nvme_detach_controller"
            )));
        }
        self.check_not_exported(name)?;
        st.bdevs.delete(name)?;
        Ok(())
    }

    /// The NBD service.
    pub fn nbd(&self) -> &Arc<NbdService> {
        &self.nbd
    }

    /// The NVMe/TCP target.
    pub fn nvmf(&self) -> &Arc<NvmfService> {
        &self.nvmf
    }

    /// Starts an NBD export of a bdev (through its pair when it is a pair's primary) or of a
    /// pair's image. `writable` defaults to true for a bdev and false for an image; the address
    /// defaults to `<state-dir>/nbd.sock`.
    pub fn nbd_export_start(
        &self,
        name: &str,
        bdev: Option<&str>,
        pair: Option<&str>,
        writable: Option<bool>,
        address: Option<Address>,
    ) -> Result<(), EngineError> {
        let of = match (bdev, pair) {
            (Some(b), None) => ExportOf::Bdev(b),
            (None, Some(p)) => ExportOf::Pair(p),
            _ => {
                return Err(
                    NbdError::Invalid("give exactly one of 'bdev' and 'pair'".into()).into(),
                )
            }
        };
        let address = address.unwrap_or_else(|| Address::Unix(self.state_dir.join("nbd.sock")));
        // The state stays locked until the export is registered: a pair made in between would
        // not see it (`pair_create` refuses bdevs exported as themselves).
        let st = self.state();
        let (source, target, writable) = resolve_export(&st, of, writable)?;
        self.nbd.start(name, source, target, writable, address)?;
        Ok(())
    }

    /// Where the running configuration is kept.
    pub fn config_path(&self) -> PathBuf {
        self.state_dir.join(CONFIG_FILE)
    }

    /// Writes the running configuration to the state directory, atomically (a new file, made
    /// durable, renamed over the old one, directory synced), so a restart finds it whole.
    pub fn persist_config(&self) -> std::io::Result<()> {
        let _writing = self
            .config_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let text = serde_json::to_vec_pretty(&self.save_config()).map_err(std::io::Error::other)?;
        let path = self.config_path();
        let tmp = self.state_dir.join(format!("{CONFIG_FILE}.new"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.state_dir)?.sync_all()
    }

    /// The running configuration: the calls that rebuild every bdev and pair, in order.
    pub fn save_config(&self) -> serde_json::Value {
        let st = self.state();
        let mut calls: Vec<serde_json::Value> = st
            .bdevs
            .config()
            .into_iter()
            .filter(|c| !c.is_null())
            .collect();
        for p in st.pairs.values() {
            calls.push(serde_json::json!({
                "method": "pair_create",
                "params": {
                    "name": p.name(),
                    "primary": p.primary().name(),
                    "secondary": p.secondary().name(),
                    "track_size": p.track_size(),
                    "copy_rate": p.copy_rate(),
                }
            }));
        }
        drop(st);
        calls.extend(self.nbd.config());
        calls.extend(self.nvmf.config());
        serde_json::json!({ "config": calls })
    }

    /// The NBD or NVMe/TCP export that shows bdev `name` itself, if one does.
    /// (Stopped exports count while their connections finish the requests they read.)
    fn raw_export_of(&self, name: &str) -> Option<String> {
        let shows = |s: &Source| matches!(s, Source::Bdev(b) if b == name);
        let nbd = self.nbd.uses(|e| shows(&e.source));
        let nvmf = self.nvmf.uses(|e| shows(&e.source));
        nbd.map(|e| format!("NBD export '{e}'"))
            .or_else(|| nvmf.map(|e| format!("NVMe/TCP export '{e}'")))
    }

    /// Fails when bdev `name` is exported as itself (over NBD or NVMe/TCP).
    fn check_not_exported(&self, name: &str) -> Result<(), EngineError> {
        match self.raw_export_of(name) {
            Some(export) => Err(EngineError::InUse(format!(
                "bdev '{name}' is exported ({export}): stop the export first"
            ))),
            None => Ok(()),
        }
    }

    /// Where a pair's metadata lives.
    pub fn metadata_path(&self, pair: &str) -> PathBuf {
        self.state_dir.join("pairs").join(format!("{pair}.meta"))
    }

    /// Opens the metadata of a pair being created: loads it when the state directory holds
    /// some (the load's outcome comes back with it), otherwise writes fresh metadata (every
    /// track pending) to a new file renamed into place once durable. Metadata that fails its
    /// checks is kept aside as `.meta.bad` and replaced by fresh metadata; the caller then
    /// suspends the pair with every track pending.
    fn open_metadata(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
        tracks: u64,
    ) -> Result<(Arc<Metadata>, Option<LoadOutcome>), EngineError> {
        let path = self.metadata_path(&cfg.name);
        let bdev_name = format!("{}.meta", cfg.name);
        let io_err = |e: std::io::Error| {
            EngineError::Bdev(BdevError::Invalid(format!(
                "pair metadata {}: {e}",
                path.display()
            )))
        };
        let mut loaded = None;
        if path.exists() {
            let bdev = metadata_bdev(&bdev_name, &path, None)?;
            match Metadata::load(Arc::new(bdev), tracks) {
                Ok((meta, l)) => return Ok((Arc::new(meta), Some(Ok(l)))),
                Err(e) => {
                    tracing::error!(pair = %cfg.name, %e, "pair metadata not trusted");
                    std::fs::rename(&path, path.with_extension("meta.bad")).map_err(io_err)?;
                    loaded = Some(Err(e));
                }
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let fresh = path.with_extension("meta.new");
        let _ = std::fs::remove_file(&fresh);
        let size = Layout::new(tracks).size();
        let bdev = metadata_bdev(&bdev_name, &fresh, Some(size))?;
        let meta = initialize_metadata(Arc::new(bdev), cfg, primary, secondary, tracks)?;
        std::fs::rename(&fresh, &path).map_err(io_err)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err)?;
        }
        Ok((meta, loaded))
    }

    /// For a clean stop: closes every pair's gate, waits for host writes in flight, and has
    /// each pair's metadata cleaned and written out, so the restart copies nothing it need
    /// not. (After a crash the metadata is still right, only less tidy.)
    pub fn persist_pairs_for_stop(&self) {
        let pairs: Vec<Arc<Pair>> = self.state().pairs.values().cloned().collect();
        for p in pairs {
            if !p.quiesce(Duration::from_secs(5)) {
                tracing::error!(pair = p.name(), "host writes did not drain before the stop");
                continue;
            }
            let Some(meta) = p.metadata() else { continue };
            p.exact_changed_for_stop();
            let n = meta.request_sync();
            for r in self.reactors.handles() {
                r.wake_if_parked();
            }
            let end = std::time::Instant::now() + Duration::from_secs(10);
            while !meta.synced(n) && meta.failure().is_none() {
                if std::time::Instant::now() > end {
                    tracing::error!(pair = p.name(), "pair metadata not written out in 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// A pair by name.
    pub fn pair(&self, name: &str) -> Result<Arc<Pair>, EngineError> {
        self.state()
            .pairs
            .get(name)
            .cloned()
            .ok_or_else(|| PairError::NotFound(name.to_string()).into())
    }

    /// Runs a transition on the control poller and waits for its outcome.
    fn transition(&self, names: &[String], action: Action) -> Result<Outcome, EngineError> {
        if names.is_empty() {
            return Err(PairError::Invalid("no pair named".into()).into());
        }
        let pairs = names
            .iter()
            .map(|n| self.pair(n))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut req = ControlRequest {
            pairs,
            action,
            reply: tx,
        };
        loop {
            match self.control.push(req) {
                Ok(()) => break,
                Err(r) => {
                    req = r;
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        match rx.recv() {
            Ok(r) => Ok(r?),
            Err(_) => Err(PairError::Stopping.into()),
        }
    }

    /// Splits one pair or several at one common instant.
    pub fn pair_split(&self, names: &[String]) -> Result<Outcome, EngineError> {
        self.transition(names, Action::Split)
    }

    /// Starts a backup of a split pair's image, at most `rate` bytes per second (0 = no limit);
    /// returns its id. The job runs on a reactor other than the copier's when there are two or
    /// more.
    pub fn backup_start(
        &self,
        pair: &str,
        mode: Mode,
        target: Target,
        rate: u64,
    ) -> Result<u64, EngineError> {
        self.backup_start_limited(pair, mode, target, rate, crate::backup::DEFAULT_HOST_RATE)
    }

    /// [`Engine::backup_start`] with a throughput limit for while hosts use the pair
    /// (`host_rate`, bytes per second, 0 = none).
    pub fn backup_start_limited(
        &self,
        pair: &str,
        mode: Mode,
        target: Target,
        rate: u64,
        host_rate: u64,
    ) -> Result<u64, EngineError> {
        let _starting = self
            .backup_starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let p = self.pair(pair)?;
        if let Target::File { path } | Target::Tape { path, .. } = &target {
            let mut partial = path.as_os_str().to_owned();
            partial.push(".partial");
            let st = self.state();
            for candidate in [path.as_path(), Path::new(&partial)] {
                if let Some(what) = self.engine_file(&st, candidate) {
                    return Err(EngineError::InUse(format!(
                        "backup target {} is {what}",
                        candidate.display()
                    )));
                }
            }
        }
        // Two backups into one place would interleave their bytes under one SHA-256.
        if let Some(other) = self.backups.running_to(&target) {
            return Err(EngineError::InUse(format!(
                "backup {other} is writing to that target"
            )));
        }
        if let Target::Tape { record_size, .. } = &target {
            if *record_size == 0 || record_size % 512 != 0 || *record_size > 64 << 20 {
                return Err(PairError::Invalid(format!(
                    "record_size {record_size} must be a multiple of 512 up to 64 MiB"
                ))
                .into());
            }
        }
        // An NBD target is connected here, on the control thread: the handshake blocks.
        let nbd = match &target {
            Target::Nbd { uri } => {
                let conn =
                    drivers::sink::nbd::NbdConnection::connect(uri).map_err(EngineError::Target)?;
                conn.check(p.geometry().size())
                    .map_err(EngineError::Target)?;
                Some(conn)
            }
            _ => None,
        };
        // So is an NVMe/TCP target: Connect and Identify block too.
        let nvmf = crate::nvmf::backup_connection(&target, &p)?;
        // And the staging buffers are mapped here, not on the reactor that serves hosts too.
        let pool = BackupJob::staging_pool(&p).map_err(|e| {
            EngineError::Unavailable(format!("no memory for the backup's staging buffers: {e}"))
        })?;
        let split_at_ns = self.pair_begin_backup(pair)?;
        let backup = match self.backups.add(
            pair,
            mode,
            target,
            p.geometry().size(),
            split_at_ns,
            crate::backup::Limits { rate, host_rate },
        ) {
            Ok(b) => b,
            Err(e) => {
                p.end_backup();
                return Err(EngineError::Target(format!(
                    "the backup's record cannot be written: {e}"
                )));
            }
        };
        // The transferrer goes next to the pair's copier, on another core when there is one.
        let reactor = self.reactors.get(p.copier_reactor_index() + 1).clone();
        // The SHA-256 on another reactor than the transferrer's, when there is one.
        let hash_reactor =
            (self.reactors.len() > 1).then(|| self.reactors.get(reactor.index() + 1).clone());
        let (b, pr) = (Arc::clone(&backup), Arc::clone(&p));
        let sent = reactor.send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(
                BackupJob::new(b, pr, pool, nbd, hash_reactor).with_nvmf(nvmf),
            ))
        }));
        if let Err(e) = sent {
            p.end_backup();
            backup.end(
                crate::backup::BackupState::Failed,
                None,
                Some(e.to_string()),
                0,
            );
            return Err(e.into());
        }
        tracing::info!(
            backup = backup.id,
            pair,
            mode = mode.as_str(),
            "backup started"
        );
        Ok(backup.id)
    }

    /// `backup_get`.
    pub fn backup_get(&self, id: Option<u64>) -> Result<Vec<BackupInfo>, EngineError> {
        self.backups
            .infos(id)
            .ok_or_else(|| EngineError::NotFound(format!("no backup with id {}", id.unwrap_or(0))))
    }

    /// `backup_cancel`: asks a running backup to stop (it ends `cancelled`).
    pub fn backup_cancel(&self, id: u64) -> Result<(), EngineError> {
        let b = self
            .backups
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no backup with id {id}")))?;
        if b.state() != crate::backup::BackupState::Running {
            return Err(EngineError::InUse(format!(
                "backup {id} is not running ({:?})",
                b.state()
            )));
        }
        b.cancel();
        for r in self.reactors.handles() {
            r.wake_if_parked();
        }
        Ok(())
    }

    /// Starts a backup of a pair's image: through the gate, so writes to S in flight drain
    /// first. Returns the split instant the image stands for.
    pub(crate) fn pair_begin_backup(&self, name: &str) -> Result<u64, EngineError> {
        self.transition(&[name.to_string()], Action::StartBackup)
            .map(|o| o.split_at_ns)
    }

    /// Resyncs a pair forward (P to S) or in reverse (restore S onto P).
    pub fn pair_resync(&self, name: &str, reverse: bool) -> Result<(), EngineError> {
        self.transition(&[name.to_string()], Action::Resync { reverse })
            .map(|_| ())
    }

    /// Deletes a pair (its bdevs stay, unclaimed). Refused while it is exported.
    pub fn pair_delete(&self, name: &str) -> Result<(), EngineError> {
        // Checked and deleted under the locks a backup start and an export start hold.
        let _starting = self
            .backup_starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut st = self.state();
        let primary = st
            .pairs
            .get(name)
            .ok_or_else(|| PairError::NotFound(name.to_string()))?
            .primary()
            .name()
            .to_string();
        // Its image, or its primary through it.
        let shows = |s: &Source| match s {
            Source::Pair(p) => p == name,
            Source::Bdev(b) => *b == primary,
        };
        if let Some(e) = self.nbd.uses(|e| shows(&e.source)) {
            return Err(EngineError::InUse(format!(
                "pair '{name}' is exported over NBD as '{e}': stop the export first"
            )));
        }
        if let Some(nqn) = self.nvmf.uses(|e| shows(&e.source)) {
            return Err(EngineError::InUse(format!(
                "'{name}' is exported over NVMe/TCP as '{nqn}': stop the export first"
            )));
        }
        if let Some(id) = self.backups.running_for(name) {
            return Err(EngineError::InUse(format!(
                "backup {id} of pair '{name}' is running: cancel it first"
            )));
        }
        let pair = st
            .pairs
            .remove(name)
            .ok_or_else(|| PairError::NotFound(name.to_string()))?;
        pair.mark_deleted();
        let _ = std::fs::remove_file(self.metadata_path(name));
        st.bdevs.release(pair.primary().name(), name);
        st.bdevs.release(pair.secondary().name(), name);
        tracing::info!(pair = %name, "pair deleted");
        Ok(())
    }

    /// `pair_get`: every pair, or one.
    pub fn pair_get(&self, name: Option<&str>) -> Result<Vec<PairInfo>, EngineError> {
        let st = self.state();
        match name {
            Some(n) => Ok(vec![st
                .pairs
                .get(n)
                .ok_or_else(|| PairError::NotFound(n.to_string()))?
                .info()]),
            None => Ok(st.pairs.values().map(|p| p.info()).collect()),
        }
    }

    /// A bdev hosts use to reach a pair: P through the pair, or the image.
    pub fn pair_view(&self, name: &str, view: View) -> Result<Arc<dyn drivers::Bdev>, EngineError> {
        Ok(Arc::new(PairView::new(self.pair(name)?, view)))
    }

    /// The reactors.
    pub fn reactors(&self) -> &Reactors {
        &self.reactors
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Locks the control-plane state.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates the embedded default: sparse 1 GiB files `p0.img` and `s0.img` in the state
    /// directory as uring bdevs `p0` and `s0`, paired as `pair0`; NBD exports `p0` (read-write,
    /// through the pair) and `pair0-image` (read-only) on `<state-dir>/nbd.sock`.
    pub fn create_default(&self) -> Result<(), AppError> {
        let mut st = self.state();
        for name in ["p0", "s0"] {
            let path = self.state_dir.join(format!("{name}.img"));
            let bdev =
                drivers::uring::UringBdev::open(name, &path, 4096, Some(DEFAULT_VOLUME_SIZE))?;
            st.bdevs.add(Arc::new(bdev))?;
        }
        drop(st);
        self.pair_create(
            &PairConfig {
                name: "pair0".into(),
                track_size: crate::pair::DEFAULT_TRACK_SIZE,
                copy_rate: 0,
            },
            "p0",
            "s0",
        )
        .map_err(|e| match e {
            EngineError::Bdev(b) => AppError::Bdev(b),
            other => AppError::Default(other.to_string()),
        })?;
        for (export, bdev, pair) in [
            ("p0", Some("p0"), None),
            ("pair0-image", None, Some("pair0")),
        ] {
            self.nbd_export_start(export, bdev, pair, None, None)
                .map_err(|e| AppError::Default(e.to_string()))?;
        }
        Ok(())
    }
}
