//! The running engine: its reactors and the control-plane state (bdevs, and what later layers
//! add) behind one lock that the data path never takes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use drivers::{BdevError, BdevTable, DriverRegistry};

use crate::reactor::{ReactorError, ReactorOptions, Reactors};

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
}

/// The engine: reactors plus control-plane state.
pub struct Engine {
    reactors: Reactors,
    state: Mutex<State>,
    state_dir: PathBuf,
}

impl Engine {
    /// Starts the reactors; no bdevs yet.
    pub fn start(opts: &ReactorOptions, state_dir: &Path) -> Result<Arc<Self>, AppError> {
        std::fs::create_dir_all(state_dir).map_err(|source| AppError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let reactors = Reactors::start(opts)?;
        let mut drivers = DriverRegistry::default();
        drivers::register(&mut drivers);
        Ok(Arc::new(Self {
            reactors,
            state: Mutex::new(State {
                bdevs: BdevTable::new(),
                drivers,
            }),
            state_dir: state_dir.to_path_buf(),
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

    /// Creates the embedded default: sparse 1 GiB files `p0.img` and `s0.img` in the state
    /// directory as uring bdevs `p0` and `s0`.
    pub fn create_default(&self) -> Result<(), AppError> {
        let mut st = self.state();
        for name in ["p0", "s0"] {
            let path = self.state_dir.join(format!("{name}.img"));
            let bdev =
                drivers::uring::UringBdev::open(name, &path, 4096, Some(DEFAULT_VOLUME_SIZE))?;
            st.bdevs.add(Arc::new(bdev))?;
        }
        Ok(())
    }
}
