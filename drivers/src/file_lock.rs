//! Advisory locks on the files quicksplit opens, compatible with QEMU's image locking.
//!
//! Locks are open file description locks (`F_OFD_SETLK`): they belong to the open file, not
//! to the process, so they last as long as the [`File`] holding them (and its clones), and
//! closing another descriptor of the same file in the same process does not drop them. Two
//! opens of one file in one process conflict like two processes do. A file given to io_uring
//! is a [`LockedFile`], which unlocks as it is dropped.
//!
//! Two sets of bytes are locked:
//!
//! - one byte of quicksplit's own ([`OWN_BYTE`]), with a write lock for a writer and a read
//!   lock for a reader, so that two quicksplit writers (or a writer and a reader) exclude each
//!   other atomically;
//! - the bytes QEMU's `file-posix` driver uses (QEMU 7.2): byte `100 + bit` for each
//!   permission held and byte `200 + bit` for each permission not shared with others, all as
//!   read locks, then the test QEMU makes: nobody holds `200 + bit` for a permission we use,
//!   nor `100 + bit` for one we do not share. A writer holds read and write and shares neither
//!   write nor resize, so `qemu-img` refuses to write the file ("Failed to get "write" lock")
//!   and, without `-U`, to open it at all.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// quicksplit's own lock byte, past the two ranges QEMU uses.
pub const OWN_BYTE: u64 = 300;
/// QEMU's byte for a permission held: `100 + bit`.
const QEMU_PERM_BASE: u64 = 100;
/// QEMU's byte for a permission not shared: `200 + bit`.
const QEMU_SHARED_BASE: u64 = 200;
/// QEMU's permission bits (`BLK_PERM_*` as bit numbers).
const PERM_CONSISTENT_READ: u64 = 0;
const PERM_WRITE: u64 = 1;
const PERM_RESIZE: u64 = 3;

/// What the opener does with the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only; other readers are welcome, writers are not.
    Read,
    /// Writes; nobody else may write it or resize it.
    Write,
}

impl Access {
    /// QEMU's view: the permissions held, and the ones not shared with anyone else.
    fn qemu_bits(self) -> (&'static [u64], &'static [u64]) {
        match self {
            Access::Read => (&[PERM_CONSISTENT_READ], &[PERM_WRITE]),
            Access::Write => (
                &[PERM_CONSISTENT_READ, PERM_WRITE],
                &[PERM_WRITE, PERM_RESIZE],
            ),
        }
    }
}

/// Errors taking or testing a lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open of the file holds a conflicting lock.
    #[error(
        "{} is in use: another process holds its lock (a quicksplit serving, restoring or \
         backing up to it, or qemu)",
        path.display()
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The lock could not be taken or tested.
    #[error("locking {}: {source}", path.display())]
    Os {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl LockError {
    fn os(path: &Path, source: io::Error) -> Self {
        LockError::Os {
            path: path.to_path_buf(),
            source,
        }
    }

    fn in_use(path: &Path) -> Self {
        LockError::InUse {
            path: path.to_path_buf(),
        }
    }
}

/// An open file locked for writing or reading, unlocked as it is dropped.
///
/// The lock is dropped explicitly rather than with the last reference to the open file: an
/// io_uring ring that had the file in its fixed-file table lets go of it only once the kernel's
/// deferred clean-up has run, and the file must be free for its next user (qemu-img, a
/// restore) as soon as quicksplit is done with it.
#[derive(Debug)]
pub struct LockedFile {
    file: File,
    /// Closed without unlocking: another reference to the open file keeps the lock.
    keep_lock: bool,
}

impl LockedFile {
    /// Locks `file` (just opened from `path`) for `access`, waiting up to the current lock
    /// patience ([`set_lock_patience`]) for another holder to let go.
    pub fn lock(file: File, path: &Path, access: Access) -> Result<Self, LockError> {
        let deadline = Instant::now() + lock_patience();
        loop {
            match lock(&file, path, access) {
                Err(LockError::InUse { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e),
                Ok(()) => {
                    return Ok(Self {
                        file,
                        keep_lock: false,
                    })
                }
            }
        }
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Closes this descriptor but leaves the lock on the open file, for a holder that keeps
    /// another reference to it (and unlocks it when done).
    pub fn close_keeping_lock(mut self) {
        self.keep_lock = true;
    }
}

impl Drop for LockedFile {
    fn drop(&mut self) {
        if self.keep_lock {
            return;
        }
        if let Err(err) = unlock(&self.file) {
            tracing::warn!(%err, "unlocking a file failed: it stays locked until the kernel closes it");
        }
    }
}

/// How long a lock held by someone else is waited for, in milliseconds.
static LOCK_PATIENCE_MS: AtomicU64 = AtomicU64::new(0);

/// Sets how long [`LockedFile::lock`] waits for a lock held elsewhere before it answers
/// [`LockError::InUse`]. Zero (the default) answers at once. A restarting engine waits while it
/// opens its saved configuration's files: after a kill, the kernel tears down the old
/// process's io_uring rings, and the files they held, a moment after the process is gone.
pub fn set_lock_patience(patience: Duration) {
    let ms = u64::try_from(patience.as_millis()).unwrap_or(u64::MAX);
    LOCK_PATIENCE_MS.store(ms, Ordering::Relaxed);
}

fn lock_patience() -> Duration {
    Duration::from_millis(LOCK_PATIENCE_MS.load(Ordering::Relaxed))
}

/// Locks `file` (opened from `path`, readable for [`Access::Read`], writable for
/// [`Access::Write`]) for `access`. Take it right after opening, before anything changes
/// the file. On failure the file holds none of these locks.
pub fn lock(file: &File, path: &Path, access: Access) -> Result<(), LockError> {
    let taken = take(file.as_fd(), access);
    if !matches!(taken, Ok(true)) {
        let _ = unlock(file);
    }
    match taken {
        Ok(true) => Ok(()),
        Ok(false) => Err(LockError::in_use(path)),
        Err(e) => Err(LockError::os(path, e)),
    }
}

fn take(fd: BorrowedFd<'_>, access: Access) -> io::Result<bool> {
    let own = match access {
        Access::Read => libc::F_RDLCK,
        Access::Write => libc::F_WRLCK,
    };
    if !set(fd, own, OWN_BYTE, 1)? {
        return Ok(false);
    }
    let (held, unshared) = access.qemu_bits();
    for bit in held {
        if !set(fd, libc::F_RDLCK, QEMU_PERM_BASE + bit, 1)? {
            return Ok(false);
        }
    }
    for bit in unshared {
        if !set(fd, libc::F_RDLCK, QEMU_SHARED_BASE + bit, 1)? {
            return Ok(false);
        }
    }
    // Applied first, tested after (as QEMU does): two openers racing may both fail, never
    // both succeed.
    for bit in held {
        if held_elsewhere(fd, QEMU_SHARED_BASE + bit, 1)? {
            return Ok(false);
        }
    }
    for bit in unshared {
        if held_elsewhere(fd, QEMU_PERM_BASE + bit, 1)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Locks the whole of `file` (opened writable from `path`) for writing: for a lock file that
/// stands for something else (a state directory).
pub fn lock_whole(file: &File, path: &Path) -> Result<(), LockError> {
    match set(file.as_fd(), libc::F_WRLCK, 0, 0) {
        Ok(true) => Ok(()),
        Ok(false) => Err(LockError::in_use(path)),
        Err(e) => Err(LockError::os(path, e)),
    }
}

/// Drops every lock this open of `file` holds.
pub fn unlock(file: &File) -> io::Result<()> {
    set(file.as_fd(), libc::F_UNLCK, 0, 0).map(|_| ())
}

/// Fails with [`LockError::InUse`] when any other open of the regular file at `path` holds a
/// lock on it (quicksplit's or QEMU's): it is being served, restored or used by qemu. A path
/// that does not exist is not in use. Only for regular files: opening a FIFO would wait.
pub fn check_unlocked(path: &Path) -> Result<(), LockError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LockError::os(path, e)),
    };
    match held_elsewhere(file.as_fd(), 0, 0) {
        Ok(false) => Ok(()),
        Ok(true) => Err(LockError::in_use(path)),
        Err(e) => Err(LockError::os(path, e)),
    }
}

/// Sets (or clears, with `F_UNLCK`) a lock on `len` bytes at `start` (0: to the end, and
/// beyond); false when another open file holds a conflicting lock.
fn set(fd: BorrowedFd<'_>, kind: i32, start: u64, len: u64) -> io::Result<bool> {
    let mut lock = flock(kind, start, len);
    match fcntl_lock(fd, libc::F_OFD_SETLK, &mut lock) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// True when another open file holds any lock on `len` bytes at `start` (0: to the end).
fn held_elsewhere(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<bool> {
    // Asking about a write lock reports readers as well as writers.
    let mut lock = flock(libc::F_WRLCK, start, len);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut lock)?;
    Ok(i32::from(lock.l_type) != libc::F_UNLCK)
}

fn flock(kind: i32, start: u64, len: u64) -> libc::flock {
    libc::flock {
        // The lock types are 0..=2: they fit.
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: len as libc::off_t,
        // OFD locks require 0 here.
        l_pid: 0,
    }
}

fn fcntl_lock(fd: BorrowedFd<'_>, cmd: i32, lock: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor for the duration of the call, and `lock` points to
    // a valid flock that we borrow exclusively; the kernel reads it (and for F_OFD_GETLK
    // writes it) during the call only.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, lock as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn temp_file(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "qs-lock-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&p, b"data").expect("create");
        p
    }

    fn open_rw(p: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("open")
    }

    #[test]
    fn a_writer_excludes_a_second_writer_and_readers_until_it_closes() {
        let p = temp_file("writer");
        let first = open_rw(&p);
        lock(&first, &p, Access::Write).expect("first writer");
        let second = open_rw(&p);
        assert!(matches!(
            lock(&second, &p, Access::Write),
            Err(LockError::InUse { .. })
        ));
        assert!(matches!(
            lock(&second, &p, Access::Read),
            Err(LockError::InUse { .. })
        ));
        assert!(matches!(check_unlocked(&p), Err(LockError::InUse { .. })));
        drop(first);
        lock(&second, &p, Access::Write).expect("free once the first is closed");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn readers_share_and_keep_writers_out() {
        let p = temp_file("readers");
        let (a, b) = (File::open(&p).expect("a"), File::open(&p).expect("b"));
        lock(&a, &p, Access::Read).expect("reader a");
        lock(&b, &p, Access::Read).expect("reader b");
        let w = open_rw(&p);
        assert!(lock(&w, &p, Access::Write).is_err());
        drop((a, b));
        lock(&w, &p, Access::Write).expect("writer after the readers");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_failed_lock_leaves_nothing_behind_and_closing_a_clone_keeps_the_lock() {
        let p = temp_file("clone");
        let holder = open_rw(&p);
        lock(&holder, &p, Access::Write).expect("holder");
        let loser = open_rw(&p);
        assert!(lock(&loser, &p, Access::Read).is_err());
        // The loser's partial locks (QEMU's bytes) were dropped: after the holder goes,
        // a check from a third open finds the file free while the loser stays open.
        drop(holder.try_clone().expect("clone"));
        assert!(check_unlocked(&p).is_err(), "a clone's close kept the lock");
        drop(holder);
        check_unlocked(&p).expect("free");
        drop(loser);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_locked_file_unlocks_when_dropped_while_its_open_file_lives_on() {
        let p = temp_file("own");
        let held = LockedFile::lock(open_rw(&p), &p, Access::Write).expect("lock");
        // Another reference to the same open file, as an io_uring ring's fixed-file table
        // keeps one for a moment after the file is closed.
        let ring_ref = held.file().try_clone().expect("dup");
        let other = open_rw(&p);
        assert!(lock(&other, &p, Access::Read).is_err());
        assert!(LockedFile::lock(open_rw(&p), &p, Access::Write).is_err());
        drop(held);
        check_unlocked(&p).expect("free once the locked file is dropped");
        drop((ring_ref, other));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn with_patience_a_lock_released_meanwhile_is_taken() {
        let p = temp_file("patience");
        let held = LockedFile::lock(open_rw(&p), &p, Access::Write).expect("lock");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        set_lock_patience(Duration::from_secs(5));
        let taken = LockedFile::lock(open_rw(&p), &p, Access::Write);
        set_lock_patience(Duration::ZERO);
        releaser.join().expect("releaser");
        taken.expect("taken once the holder let go");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_missing_file_is_not_in_use() {
        let p = std::env::temp_dir().join(format!("qs-lock-none-{}", std::process::id()));
        check_unlocked(&p).expect("missing is free");
    }
}
