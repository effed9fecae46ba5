//! The running engine: its reactors and the control-plane state (bdevs, pairs, backups,
//! exports) behind one lock that the data path never takes. Each file of this module is one
//! subsystem's operations on the [`Engine`]: `bdevs`, `pairs`, `backups`, `verifies`,
//! `exports`, `keys` (the keyring), `config` and the embedded `default`.

mod backup_plans;
mod backups;
mod bdevs;
mod config;
pub mod config_store;
mod default;
mod exports;
mod keys;
mod pairs;
mod state_lock;
mod verifies;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use drivers::{BdevError, BdevTable, DriverRegistry};

use crate::backup::{Backups, Journal};
use crate::export::ExportError;
use crate::keyring::{Keyring, KeyringError};
use crate::nbd::{Nbd, NbdServer};
use crate::nvmf::{NvmeTcp, NvmfServer};
use crate::pair::control::{ControlPoller, ControlQueue};
use crate::pair::{Pair, PairError};
use crate::reactor::{ReactorError, ReactorOptions, Reactors};
use crate::verify::Verifies;

pub use config::CONFIG_FILE;
pub use default::DEFAULT_VOLUME_SIZE;
pub use pairs::MetadataDevice;
pub use state_lock::{StateLockError, LOCK_FILE};

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
    /// Another process owns the state directory, or its lock file is unusable.
    #[error(transparent)]
    StateLock(#[from] StateLockError),
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
    /// The files of the bdevs and of the pairs' metadata, by identity.
    pub files: bdevs::FileIndex,
}

/// The engine: reactors plus control-plane state.
pub struct Engine {
    reactors: Reactors,
    state: Mutex<State>,
    state_dir: PathBuf,
    control: Arc<ControlQueue>,
    nbd: Arc<NbdServer>,
    nvmf: Arc<NvmfServer>,
    /// Secrets by name, for everything that authenticates.
    keyring: Keyring,
    backups: Backups,
    verifies: Verifies,
    /// The configuration as written to the state directory, held while it is written: two
    /// RPCs finishing at once must not interleave their writes.
    config_file: Mutex<config_store::ConfigStore>,
    /// Held while a backup or a verification starts, so two starts cannot both find a target
    /// free, and a pair is not deleted while one starts.
    backup_starts: Mutex<()>,
    /// `<state-dir>/lock`, locked as long as the engine runs.
    _state_lock: std::fs::File,
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
    /// An export operation failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The object is in use.
    #[error("{0}")]
    InUse(String),
    /// A keyring operation failed, or a key is unusable.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

impl Engine {
    /// Starts the reactors; no bdevs yet. The state directory is locked first (see
    /// [`StateLockError`]): nothing in it is read or written by an engine that does not own it.
    pub fn start(opts: &ReactorOptions, state_dir: &Path) -> Result<Arc<Self>, AppError> {
        std::fs::create_dir_all(state_dir).map_err(|source| AppError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let state_lock = state_lock::lock_state_dir(state_dir)?;
        // Absolute, so the configuration names files that outlive the working directory.
        let state_dir = std::fs::canonicalize(state_dir).map_err(|source| AppError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let state_dir = state_dir.as_path();
        let reactors = Reactors::start(opts)?;
        // Measured once (20 ms), now rather than in the first request for statistics.
        drivers::iostat::tick_rate();
        let mut drivers = DriverRegistry::default();
        drivers::register(&mut drivers);
        // The split acceptor lives on the first reactor; copiers go to the others when there
        // are others, so splitting and copying run on different cores.
        let control = ControlQueue::new(reactors.get(0).clone());
        let poller_queue = Arc::clone(&control);
        reactors.get(0).send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(ControlPoller::new(poller_queue)))
        }))?;
        control.set_journal(pairs::open_split_journal(state_dir)?);
        let nbd = NbdServer::new(Nbd::default(), reactors.handles().to_vec());
        let nvmf = NvmfServer::new(NvmeTcp::default(), reactors.handles().to_vec());
        let journal =
            Journal::open(state_dir.join("backups.json")).map_err(|source| AppError::StateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        crate::backup::remove_incomplete_digests(state_dir, &journal.records());
        Ok(Arc::new(Self {
            backups: Backups::with_journal(journal),
            verifies: Verifies::default(),
            nbd,
            nvmf,
            keyring: Keyring::default(),
            reactors,
            state: Mutex::new(State {
                bdevs: BdevTable::new(),
                drivers,
                pairs: BTreeMap::new(),
                nvme_controllers: BTreeMap::new(),
                files: bdevs::FileIndex::default(),
            }),
            state_dir: state_dir.to_path_buf(),
            control,
            config_file: Mutex::new(config_store::ConfigStore::default()),
            backup_starts: Mutex::new(()),
            _state_lock: state_lock,
        }))
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
}
