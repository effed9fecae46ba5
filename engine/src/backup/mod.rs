//! Backups of a split pair's image to a target, in the three modes of the design:
//!
//! - `wait`: the copier runs at full speed until no track is pending, then S is streamed;
//! - `reflect`: S is streamed in order; a track still pending is first copied P to S on demand
//!   (through the copier's urgent ring, ahead of the background copy);
//! - `merge`: each piece is read into a staging buffer from S where copied and from P (under the
//!   track's lock) where pending, and that same buffer goes to the target: nothing is written to
//!   S and no payload byte is copied by the CPU.
//!
//! Every backup records the image's `sha256-tree` digest ([`tree`], hashed in parallel on every
//! reactor) and keeps its chunk digests in the state directory ([`digests_path`]); the flat
//! SHA-256 ([`hasher`]) only when asked for.
//!
//! The job (the "transferrer") is a poller on a reactor. Staging buffers are one track long
//! (capped at 1 MiB) and never cross a track boundary, so a read never mixes P and S in one
//! buffer. Writes to S by hosts on tracks the backup has not read yet wait until it has (the
//! backup holds the image as it was at the split).

pub mod hasher;
pub mod job;
pub mod plan;
pub mod target;
pub mod tree;

pub use target::Target;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// A backup's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Streaming.
    Running,
    /// Complete: every byte written and durable, the digest recorded and the chunk digests kept.
    Done,
    /// Ended on an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

/// A backup's options: how fast it may go, bytes per second (0 = no limit), always and while
/// hosts use the pair; and whether the flat SHA-256 is computed besides the tree digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// At all times.
    pub rate: u64,
    /// While hosts use the pair.
    pub host_rate: u64,
    /// Compute the flat SHA-256 too (one stream: at most one core's hashing rate).
    pub flat_sha256: bool,
    /// Give the pair a checkpoint of this name at the image's split once the backup is done.
    pub checkpoint: Option<String>,
    /// Store only the tracks changed since this checkpoint of the pair (an incremental backup
    /// onto a target holding the checkpoint's image).
    pub since: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rate: 0,
            host_rate: DEFAULT_HOST_RATE,
            flat_sha256: false,
            checkpoint: None,
            since: None,
        }
    }
}

/// The folder of the state directory holding the backups' chunk digests.
pub const DIGESTS_DIR: &str = "digests";

/// Where backup `id`'s chunk digests are kept: `<state-dir>/digests/<id>.sha256tree`
/// ([`drivers::digest::ChunkDigests`] reads and writes the file).
pub fn digests_path(state_dir: &Path, id: u64) -> PathBuf {
    state_dir.join(DIGESTS_DIR).join(format!("{id}.sha256tree"))
}

/// Removes the chunk digest files of backups that are not done (a crash after the file was
/// written, before the backup was recorded done): only a done backup has chunk digests.
pub fn remove_incomplete_digests(state_dir: &Path, records: &[BackupInfo]) {
    for b in records.iter().filter(|b| b.state != BackupState::Done) {
        let path = digests_path(state_dir, b.id);
        let mut new = path.clone().into_os_string();
        new.push(".new");
        for p in [path, PathBuf::from(new)] {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!(backup = b.id, path = %p.display(),
                    "removed the chunk digests of a backup that did not complete"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(backup = b.id, path = %p.display(), %e,
                    "cannot remove the chunk digests of a backup that did not complete"),
            }
        }
    }
}

/// A done backup's checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksums {
    /// The `sha256-tree` digest, `sha256-tree:<hex>`.
    pub digest: String,
    /// The flat SHA-256 (hex), when asked for.
    pub sha256: Option<String>,
}

/// Default throughput limit of a backup while hosts use its pair, bytes per second: enough
/// to finish a backup in a working day's spare bandwidth, low enough that host requests keep
/// their latency (what md's `speed_limit_min` is to a resync).
pub const DEFAULT_HOST_RATE: u64 = 100 << 20;

/// What `backup_get` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    /// Id.
    pub id: u64,
    /// Pair.
    pub pair: String,
    /// Mode.
    pub mode: Mode,
    /// State.
    pub state: BackupState,
    /// Image bytes done: acknowledged by the target, or not stored and passed.
    pub bytes_done: u64,
    /// Image size.
    pub bytes_total: u64,
    /// Image bytes the backup writes to the target (the rest are holes, or an incremental's
    /// unchanged tracks).
    #[serde(default)]
    pub bytes_stored: u64,
    /// The checkpoint an incremental backup stores the changes since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The image's `sha256-tree` digest, `sha256-tree:<hex>` (once done).
    #[serde(default)]
    pub digest: Option<String>,
    /// The flat SHA-256 of the image is computed too.
    #[serde(default)]
    pub flat_sha256: bool,
    /// The flat SHA-256 of the image written (once done, when `flat_sha256`).
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
    /// Throughput limit while hosts use the pair, bytes per second (0 = none).
    #[serde(default)]
    pub host_rate: u64,
    /// Times the backup held its reads back because hosts were using the pair.
    #[serde(default)]
    pub host_yields: u64,
    /// Nanoseconds from start to end (0 while running).
    pub elapsed_ns: u64,
    /// The checkpoint the pair gets at the image's split once the backup is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

struct Status {
    state: BackupState,
    digest: Option<String>,
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
    /// Image bytes written to the target.
    pub bytes_stored: u64,
    /// The checkpoint an incremental stores the changes since.
    pub since: Option<String>,
    /// Split instant.
    pub split_at_ns: u64,
    /// Throughput limit in bytes per second (0 = none), so hosts keep the disk's attention.
    pub rate: u64,
    /// Throughput limit while hosts use the pair (0 = none): host requests first.
    pub host_rate: u64,
    /// The checkpoint the pair gets once the backup is done.
    pub checkpoint: Option<String>,
    /// The flat SHA-256 is computed too.
    pub flat_sha256: bool,
    bytes_done: AtomicU64,
    cpu_copied: AtomicU64,
    pub(crate) host_yields: AtomicU64,
    cancel: AtomicBool,
    status: Mutex<Status>,
    journal: Option<Arc<Journal>>,
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
            bytes_stored: self.bytes_stored,
            since: self.since.clone(),
            digest: st.digest.clone(),
            flat_sha256: self.flat_sha256,
            sha256: st.sha256.clone(),
            error: st.error.clone(),
            target: self.target.clone(),
            cpu_copied_bytes: self.cpu_copied.load(Ordering::Relaxed),
            split_at_ns: self.split_at_ns,
            rate: self.rate,
            host_rate: self.host_rate,
            host_yields: self.host_yields.load(Ordering::Relaxed),
            elapsed_ns: st.elapsed_ns,
            checkpoint: self.checkpoint.clone(),
        }
    }

    /// Ends the backup in `state`. A backup with a journal is reported done only once its
    /// record says so durably (written by a thread: the caller may be a reactor), so a restart
    /// never turns a backup reported done into an interrupted one.
    pub(crate) fn end(
        self: &Arc<Self>,
        state: BackupState,
        checksums: Option<Checksums>,
        error: Option<String>,
        elapsed_ns: u64,
    ) {
        let digest = checksums.as_ref().map(|c| c.digest.clone());
        let sha256 = checksums.and_then(|c| c.sha256);
        let finish = move |st: &mut Status, state| {
            st.state = state;
            st.digest = digest;
            st.sha256 = sha256;
            st.error = error;
            st.elapsed_ns = elapsed_ns;
        };
        let Some(j) = self.journal.clone() else {
            finish(&mut self.status(), state);
            return;
        };
        if state != BackupState::Done {
            finish(&mut self.status(), state);
            j.record_in_background(self.info());
            return;
        }
        let mut done = Status {
            state: BackupState::Running,
            digest: None,
            sha256: None,
            error: None,
            elapsed_ns: 0,
        };
        finish(&mut done, BackupState::Done);
        let mut info = self.info();
        info.state = done.state;
        info.digest = done.digest.clone();
        info.sha256 = done.sha256.clone();
        info.error = done.error.clone();
        info.elapsed_ns = done.elapsed_ns;
        let backup = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("backup-journal".into())
            .spawn(move || {
                let recorded = j.record(info);
                let mut st = backup.status();
                *st = done;
                if let Err(e) = recorded {
                    tracing::error!(backup = backup.id, %e, "recording a backup done failed");
                    st.state = BackupState::Failed;
                    st.digest = None;
                    st.sha256 = None;
                    st.error = Some(format!(
                        "the backup was written, but its record cannot be made durable: {e}"
                    ));
                }
            });
        if let Err(e) = spawned {
            let mut st = self.status();
            st.state = BackupState::Failed;
            st.error = Some(format!("no thread to record the backup done: {e}"));
        }
    }
}

/// The backups' records in the state directory (`backups.json`), so a restart reports a
/// backup that was running as failed, never as done, and keeps the others' outcomes.
pub struct Journal {
    path: PathBuf,
    records: Mutex<BTreeMap<u64, BackupInfo>>,
    /// Serialises writers; each writes the newest records, so the last one leaves them all.
    write: Mutex<()>,
}

/// The error of a backup a restart interrupted.
pub const INTERRUPTED: &str = "interrupted by restart";

impl Journal {
    /// Opens the journal at `path`, turning every backup it shows running into a failed one.
    pub fn open(path: PathBuf) -> std::io::Result<Arc<Self>> {
        let mut records = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let list: Vec<BackupInfo> = serde_json::from_slice(&bytes)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
                for mut b in list {
                    if b.state == BackupState::Running {
                        b.state = BackupState::Failed;
                        b.error = Some(INTERRUPTED.into());
                        b.digest = None;
                        b.sha256 = None;
                    }
                    records.insert(b.id, b);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let j = Arc::new(Self {
            path,
            records: Mutex::new(records),
            write: Mutex::new(()),
        });
        j.write_out()?;
        Ok(j)
    }

    /// The records loaded at open (and since).
    pub fn records(&self) -> Vec<BackupInfo> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Records a backup and waits until the record is durable.
    pub fn record(&self, info: BackupInfo) -> std::io::Result<()> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(info.id, info);
        self.write_out()
    }

    fn forget(&self, id: u64) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    fn record_in_background(self: &Arc<Self>, info: BackupInfo) {
        let j = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("backup-journal".into())
            .spawn(move || {
                if let Err(e) = j.record(info) {
                    tracing::error!(%e, "recording a backup's end failed");
                }
            });
        if let Err(e) = spawned {
            tracing::error!(%e, "no thread to record a backup's end");
        }
    }

    /// Writes every record: a new file, made durable, renamed over the old one.
    fn write_out(&self) -> std::io::Result<()> {
        use std::io::Write;
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let list = self.records();
        let text = serde_json::to_vec_pretty(&list).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.new");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Every backup of the engine, by id.
#[derive(Default)]
pub struct Backups {
    list: Mutex<BTreeMap<u64, Arc<Backup>>>,
    next: AtomicU64,
    journal: Option<Arc<Journal>>,
}

impl Backups {
    fn list(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Backup>>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new running backup.
    /// Backups recorded in `journal`: earlier ones come back with their outcome (running ones
    /// as failed), and ids go on after theirs.
    pub fn with_journal(journal: Arc<Journal>) -> Self {
        let mut list = BTreeMap::new();
        let mut last = 0;
        for info in journal.records() {
            last = last.max(info.id);
            let b = Backup {
                id: info.id,
                pair: info.pair,
                mode: info.mode,
                target: info.target,
                bytes_total: info.bytes_total,
                bytes_stored: info.bytes_stored,
                since: info.since,
                split_at_ns: info.split_at_ns,
                rate: info.rate,
                host_rate: info.host_rate,
                checkpoint: info.checkpoint,
                flat_sha256: info.flat_sha256,
                bytes_done: AtomicU64::new(info.bytes_done),
                cpu_copied: AtomicU64::new(info.cpu_copied_bytes),
                host_yields: AtomicU64::new(info.host_yields),
                cancel: AtomicBool::new(false),
                status: Mutex::new(Status {
                    state: info.state,
                    digest: info.digest,
                    sha256: info.sha256,
                    error: info.error,
                    elapsed_ns: info.elapsed_ns,
                }),
                journal: None,
            };
            list.insert(info.id, Arc::new(b));
        }
        Self {
            list: Mutex::new(list),
            next: AtomicU64::new(last),
            journal: Some(journal),
        }
    }

    /// Takes the next job id. Backups and verifications share the sequence, so an id names
    /// one job (ids go on after the backups recorded in the journal).
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Adds a running backup of an image of `bytes_total` bytes, `bytes_stored` of which go to
    /// the target; with a journal, its record is durable before this returns.
    pub fn add(
        &self,
        pair: &str,
        (mode, target): (Mode, Target),
        (bytes_total, bytes_stored): (u64, u64),
        split_at_ns: u64,
        opts: Options,
    ) -> std::io::Result<Arc<Backup>> {
        let id = self.next_id();
        let b = Arc::new(Backup {
            id,
            pair: pair.to_string(),
            mode,
            target,
            bytes_total,
            bytes_stored,
            since: opts.since,
            split_at_ns,
            rate: opts.rate,
            host_rate: opts.host_rate,
            flat_sha256: opts.flat_sha256,
            checkpoint: opts.checkpoint,
            bytes_done: AtomicU64::new(0),
            cpu_copied: AtomicU64::new(0),
            host_yields: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            status: Mutex::new(Status {
                state: BackupState::Running,
                digest: None,
                sha256: None,
                error: None,
                elapsed_ns: 0,
            }),
            journal: self.journal.clone(),
        });
        self.list().insert(id, Arc::clone(&b));
        if let Some(j) = &self.journal {
            if let Err(e) = j.record(b.info()) {
                j.forget(id);
                self.list().remove(&id);
                return Err(e);
            }
        }
        Ok(b)
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

    /// The running backup writing to the same place as `target`, if any.
    pub fn running_to(&self, target: &Target) -> Option<u64> {
        let place = target.place();
        self.list()
            .values()
            .find(|b| b.state() == BackupState::Running && b.target.place() == place)
            .map(|b| b.id)
    }

    /// The running backup of `pair` that is to make checkpoint `name`, if any.
    pub fn running_with_checkpoint(&self, pair: &str, name: &str) -> Option<u64> {
        self.list()
            .values()
            .find(|b| {
                b.pair == pair
                    && b.state() == BackupState::Running
                    && b.checkpoint.as_deref() == Some(name)
            })
            .map(|b| b.id)
    }

    /// True while a backup of `pair` runs.
    pub fn running_for(&self, pair: &str) -> Option<u64> {
        self.list()
            .values()
            .find(|b| b.pair == pair && b.state() == BackupState::Running)
            .map(|b| b.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, state: &str) -> BackupInfo {
        serde_json::from_value(serde_json::json!({
            "id": id, "pair": "p", "mode": "merge", "state": state, "bytes_done": 0,
            "bytes_total": 1, "sha256": null, "error": null,
            "target": {"type": "file", "path": "/x"}, "cpu_copied_bytes": 0,
            "split_at_ns": 0, "rate": 0, "elapsed_ns": 0
        }))
        .expect("a record")
    }

    #[test]
    fn only_done_backups_keep_their_chunk_digests() {
        let dir = std::env::temp_dir().join(format!("qs-digests-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(DIGESTS_DIR)).unwrap();
        let records: Vec<BackupInfo> = [(1, "done"), (2, "failed"), (3, "cancelled")]
            .into_iter()
            .map(|(id, state)| record(id, state))
            .collect();
        for r in &records {
            std::fs::write(digests_path(&dir, r.id), b"x").unwrap();
        }
        let mut leftover = digests_path(&dir, 2).into_os_string();
        leftover.push(".new");
        std::fs::write(&leftover, b"x").unwrap();
        remove_incomplete_digests(&dir, &records);
        assert!(digests_path(&dir, 1).exists());
        assert!(!digests_path(&dir, 2).exists());
        assert!(!std::path::Path::new(&leftover).exists());
        assert!(!digests_path(&dir, 3).exists());
        // An older record (before digests) reads with neither field.
        assert_eq!(records[0].digest, None);
        assert!(!records[0].flat_sha256);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
