//! The state directory's lock: `<state-dir>/lock`, holding the PID of the `serve` that owns
//! the directory under an OFD write lock. It is taken before anything else in the directory is
//! read or written, so a second `serve` on the directory leaves it exactly as it found it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drivers::file_lock::{self, LockError};

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "lock";

/// How long a second `serve` waits for the owner's PID to appear in the lock file (the owner
/// writes it right after taking the lock).
const PID_WAIT: Duration = Duration::from_secs(2);

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    /// Another `serve` owns the directory.
    #[error("state directory {} is in use by quicksplit PID {pid}", dir.display())]
    InUse {
        /// The directory, as it was named.
        dir: PathBuf,
        /// The owner's PID.
        pid: u32,
    },
    /// Another process holds the lock and has not written its PID.
    #[error("state directory {} is in use by another process (its lock file holds no PID)", dir.display())]
    InUseUnknown {
        /// The directory, as it was named.
        dir: PathBuf,
    },
    /// The lock file could not be opened, locked or written.
    #[error("state directory {}: lock file: {source}", dir.display())]
    Io {
        /// The directory, as it was named.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Takes `<dir>/lock` for this process and writes its PID there; the lock lasts as long as the
/// returned file is open.
pub fn lock_state_dir(dir: &Path) -> Result<File, StateLockError> {
    let io = |source| StateLockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file_lock::lock_whole(&file, &path) {
        Ok(()) => {}
        Err(LockError::InUse { .. }) => return Err(owner(&mut file, dir)),
        Err(LockError::Os { source, .. }) => return Err(io(source)),
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io)?;
    Ok(file)
}

/// The error naming who holds the lock, read from the lock file.
fn owner(file: &mut File, dir: &Path) -> StateLockError {
    let end = Instant::now() + PID_WAIT;
    loop {
        let mut text = String::new();
        let pid = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_string(&mut text))
            .ok()
            .and_then(|_| text.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            return StateLockError::InUse {
                dir: dir.to_path_buf(),
                pid,
            };
        }
        if Instant::now() >= end {
            return StateLockError::InUseUnknown {
                dir: dir.to_path_buf(),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
