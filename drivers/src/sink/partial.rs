//! A backup written as `PATH.partial` and renamed to `PATH` once complete and durable, so a
//! cancelled or failed backup never leaves anything under the final name.
//!
//! An existing `PATH` is opened and locked for reading while the backup runs: a file that
//! another process serves or writes (a quicksplit, qemu) is refused, and nobody starts writing
//! it before the rename replaces it. The rename and the directory's fsync run on a short thread
//! of their own, not on the reactor.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, TryRecvError};

use crate::file_lock::{self, Access};

/// `PATH.partial`.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// A target file written under its partial name.
pub struct PartialFile {
    path: PathBuf,
    partial: PathBuf,
    /// The file already at `path`, locked until it is replaced.
    _existing: Option<File>,
    commit: Option<Receiver<std::io::Result<()>>>,
    renamed: bool,
}

impl PartialFile {
    /// Prepares a backup to `path`, locking the file already there, if any.
    pub fn new(path: &Path) -> Result<Self, String> {
        let existing = match File::open(path) {
            Ok(f) => {
                file_lock::lock(&f, path, Access::Read).map_err(|e| e.to_string())?;
                Some(f)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Self {
            path: path.to_path_buf(),
            partial: partial_path(path),
            _existing: existing,
            commit: None,
            renamed: false,
        })
    }

    /// Where the bytes go until the rename.
    pub fn partial(&self) -> &Path {
        &self.partial
    }

    /// Renames the (flushed) partial file to its final name and syncs the directory, on a
    /// thread; [`PartialFile::committed`] reports the outcome.
    pub fn commit(&mut self) {
        if self.commit.is_some() || self.renamed {
            return;
        }
        let (tx, rx) = channel();
        let (from, to) = (self.partial.clone(), self.path.clone());
        let spawned = std::thread::Builder::new()
            .name("backup_rename".into())
            .spawn(move || {
                let _ = tx.send(rename_durably(&from, &to));
            });
        if let Err(e) = spawned {
            tracing::warn!(%e, "no thread for the rename: renaming on the reactor");
            let (tx, rx) = channel();
            let _ = tx.send(rename_durably(&self.partial, &self.path));
            self.commit = Some(rx);
            return;
        }
        self.commit = Some(rx);
    }

    /// True while the rename runs.
    pub fn committing(&self) -> bool {
        self.commit.is_some()
    }

    /// `Some` once, when the rename finished: the backup is under its final name, or why not.
    pub fn committed(&mut self) -> Option<Result<(), String>> {
        let rx = self.commit.as_ref()?;
        let outcome = match rx.try_recv() {
            Err(TryRecvError::Empty) => return None,
            Ok(r) => r.map_err(|e| {
                format!(
                    "renaming {} to {}: {e}",
                    self.partial.display(),
                    self.path.display()
                )
            }),
            Err(TryRecvError::Disconnected) => Err("the rename thread stopped".into()),
        };
        self.commit = None;
        self.renamed = outcome.is_ok();
        Some(outcome)
    }

    /// The backup did not complete: removes the partial file, and the final one if this
    /// backup had already renamed it (a cancel that came as the rename finished).
    pub fn discard(&mut self) {
        if let Some(rx) = self.commit.take() {
            // A rename in flight must not land after the removal.
            if let Ok(Ok(())) = rx.recv() {
                self.renamed = true;
            }
        }
        let _ = std::fs::remove_file(&self.partial);
        if self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Renames `from` to `to` and makes the rename durable (fsync of the directory).
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let dir = to
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}
