//! Backups of a split pair's image to a target, in the three modes of the design:
//!
//! - `wait`: the copier runs at full speed until no track is pending, then S is streamed;
//! - `reflect`: S is streamed in order; a track still pending is first copied P to S on demand
//!   (through the copier's urgent ring, ahead of the background copy);
//! - `merge`: each piece is read into a staging buffer from S where copied and from P (under the
//!   track's lock) where pending, and that same buffer goes to the target: nothing is written to
//!   S and no payload byte is copied by the CPU.
//!
//! The job (the "transferrer") is a poller on a reactor. Staging buffers are one track long
//! (capped at 1 MiB) and never cross a track boundary, so a read never mixes P and S in one
//! buffer. Writes to S by hosts on tracks the backup has not read yet wait until it has (the
//! backup holds the image as it was at the split).

pub mod hasher;
pub mod job;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// A backup mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Reflect everything into S first, then stream S.
    Wait,
    /// Stream S, copying pending tracks on demand first.
    Reflect,
    /// Stream a merge of S and P without writing S.
    Merge,
}

impl Mode {
    /// The name in RPCs and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Wait => "wait",
            Mode::Reflect => "reflect",
            Mode::Merge => "merge",
        }
    }
}

fn default_record_size() -> usize {
    drivers::tape::DEFAULT_RECORD_SIZE
}

/// Where a backup goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// A raw image file (or block device).
    File {
        /// Path.
        path: PathBuf,
    },
    /// A pax archive in fixed records on a file standing for a tape.
    Tape {
        /// Path.
        path: PathBuf,
        /// Record size in bytes (a multiple of 512).
        #[serde(default = "default_record_size")]
        record_size: usize,
    },
    /// An NBD server's export.
    Nbd {
        /// `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
        uri: String,
    },
    /// An NVMe/TCP namespace.
    Nvmf {
        /// Target address.
        traddr: String,
        /// Target port.
        #[serde(default)]
        trsvcid: Option<u16>,
        /// Subsystem NQN.
        subnqn: String,
        /// Namespace id.
        #[serde(default)]
        nsid: Option<u32>,
        /// Host NQN.
        #[serde(default)]
        hostnqn: Option<String>,
    },
}

/// A backup's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Streaming.
    Running,
    /// Complete: every byte written and durable, the SHA-256 recorded.
    Done,
    /// Ended on an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

/// What `backup_get` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    /// Id.
    pub id: u64,
    /// Pair.
    pub pair: String,
    /// Mode.
    pub mode: Mode,
    /// State.
    pub state: BackupState,
    /// Image bytes the target has acknowledged.
    pub bytes_done: u64,
    /// Image size.
    pub bytes_total: u64,
    /// SHA-256 of the image written (once done).
    pub sha256: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// The target.
    pub target: Target,
    /// Payload bytes the CPU copied (the goal in merge is zero).
    pub cpu_copied_bytes: u64,
    /// The split instant the image stands for.
    pub split_at_ns: u64,
    /// Throughput limit in bytes per second (0 = none).
    pub rate: u64,
    /// Nanoseconds from start to end (0 while running).
    pub elapsed_ns: u64,
}

struct Status {
    state: BackupState,
    sha256: Option<String>,
    error: Option<String>,
    elapsed_ns: u64,
}

/// A backup as the control plane and its job share it.
pub struct Backup {
    /// Id.
    pub id: u64,
    /// Pair name.
    pub pair: String,
    /// Mode.
    pub mode: Mode,
    /// Target.
    pub target: Target,
    /// Image size.
    pub bytes_total: u64,
    /// Split instant.
    pub split_at_ns: u64,
    /// Throughput limit in bytes per second (0 = none), so hosts keep the disk's attention.
    pub rate: u64,
    bytes_done: AtomicU64,
    cpu_copied: AtomicU64,
    cancel: AtomicBool,
    status: Mutex<Status>,
}

impl Backup {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Current state.
    pub fn state(&self) -> BackupState {
        self.status().state
    }

    /// Asks the job to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// What `backup_get` reports.
    pub fn info(&self) -> BackupInfo {
        let st = self.status();
        BackupInfo {
            id: self.id,
            pair: self.pair.clone(),
            mode: self.mode,
            state: st.state,
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total,
            sha256: st.sha256.clone(),
            error: st.error.clone(),
            target: self.target.clone(),
            cpu_copied_bytes: self.cpu_copied.load(Ordering::Relaxed),
            split_at_ns: self.split_at_ns,
            rate: self.rate,
            elapsed_ns: st.elapsed_ns,
        }
    }

    pub(crate) fn end(
        &self,
        state: BackupState,
        sha256: Option<String>,
        error: Option<String>,
        elapsed_ns: u64,
    ) {
        let mut st = self.status();
        st.state = state;
        st.sha256 = sha256;
        st.error = error;
        st.elapsed_ns = elapsed_ns;
    }
}

/// Every backup of the engine, by id.
#[derive(Default)]
pub struct Backups {
    list: Mutex<BTreeMap<u64, Arc<Backup>>>,
    next: AtomicU64,
}

impl Backups {
    fn list(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Backup>>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new running backup.
    pub fn add(
        &self,
        pair: &str,
        mode: Mode,
        target: Target,
        bytes_total: u64,
        split_at_ns: u64,
        rate: u64,
    ) -> Arc<Backup> {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let b = Arc::new(Backup {
            id,
            pair: pair.to_string(),
            mode,
            target,
            bytes_total,
            split_at_ns,
            rate,
            bytes_done: AtomicU64::new(0),
            cpu_copied: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            status: Mutex::new(Status {
                state: BackupState::Running,
                sha256: None,
                error: None,
                elapsed_ns: 0,
            }),
        });
        self.list().insert(id, Arc::clone(&b));
        b
    }

    /// A backup by id.
    pub fn get(&self, id: u64) -> Option<Arc<Backup>> {
        self.list().get(&id).cloned()
    }

    /// Every backup, or one.
    pub fn infos(&self, id: Option<u64>) -> Option<Vec<BackupInfo>> {
        let l = self.list();
        match id {
            Some(i) => l.get(&i).map(|b| vec![b.info()]),
            None => Some(l.values().map(|b| b.info()).collect()),
        }
    }

    /// True while a backup of `pair` runs.
    pub fn running_for(&self, pair: &str) -> Option<u64> {
        self.list()
            .values()
            .find(|b| b.pair == pair && b.state() == BackupState::Running)
            .map(|b| b.id)
    }
}
