//! What the NBD server and the NVMe/TCP target share: a thread accepting connections on each
//! listening socket, the staging pool their connections use (made on first use) and how a
//! request takes buffers from it, and the round robin over the reactors that places each
//! connection's poller.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use drivers::IoBufs;
use hugepages::{BufferCache, BufferPool, DmaError};

use crate::reactor::ReactorHandle;

/// How long the accept thread sleeps when no connection is waiting.
const ACCEPT_IDLE: Duration = Duration::from_millis(2);
/// How long it backs off after an accept error (out of descriptors, say).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A thread accepting connections on one non-blocking listening socket until dropped; dropping
/// it stops and joins the thread and removes the socket's path, if it has one.
pub(crate) struct AcceptThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    remove_on_drop: Option<PathBuf>,
}

impl AcceptThread {
    /// Calls `accept` (a non-blocking accept) on a thread named `name` and hands each
    /// connection to `on_accept`; `what` names the service in logs.
    pub(crate) fn spawn<C>(
        name: &str,
        what: &'static str,
        mut accept: impl FnMut() -> std::io::Result<C> + Send + 'static,
        mut on_accept: impl FnMut(C) + Send + 'static,
        remove_on_drop: Option<PathBuf>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    match accept() {
                        Ok(conn) => on_accept(conn),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(ACCEPT_IDLE);
                        }
                        Err(e) => {
                            tracing::warn!(%e, "{what} accept failed");
                            std::thread::sleep(ACCEPT_ERROR_BACKOFF);
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            remove_on_drop,
        })
    }
}

impl Drop for AcceptThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.remove_on_drop {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Clears the way to bind a Unix socket at `path`: a stale socket left by an earlier server is
/// removed; a socket a live server answers on, or any other kind of file (a volume, a config),
/// is an error and stays.
pub(crate) fn clear_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by another server", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Exports stopped while connections still use them. A connection finishes the requests it
/// has already read after its export stops, so the export still counts as in use (for the
/// checks that keep raw exports out of pairs) until its last connection closes.
pub(crate) struct Stopping<E> {
    list: Mutex<Vec<Arc<E>>>,
}

impl<E> Stopping<E> {
    pub(crate) fn new() -> Self {
        Self {
            list: Mutex::new(Vec::new()),
        }
    }

    /// Keeps a stopped export until `open` says it has no connection left.
    pub(crate) fn add(&self, export: Arc<E>) {
        self.list
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(export);
    }

    /// A stopped export matching `pred` that still has connections (`open`), forgetting those
    /// that have none.
    pub(crate) fn find(
        &self,
        open: impl Fn(&E) -> usize,
        pred: impl Fn(&E) -> bool,
    ) -> Option<Arc<E>> {
        let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|e| open(e) > 0);
        list.iter().find(|e| pred(e)).cloned()
    }
}

/// The staging pool of a service's connections, mapped when the first export starts.
pub(crate) struct ConnectionPool {
    pool: Mutex<Option<BufferPool>>,
    buf_size: usize,
    count: usize,
}

impl ConnectionPool {
    /// `count` buffers of `buf_size` bytes, once asked for.
    pub(crate) fn new(buf_size: usize, count: usize) -> Self {
        Self {
            pool: Mutex::new(None),
            buf_size,
            count,
        }
    }

    /// The pool, mapped now if this is the first call.
    pub(crate) fn get(&self) -> Result<BufferPool, DmaError> {
        let mut p = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = p.as_ref() {
            return Ok(pool.clone());
        }
        let pool = BufferPool::new(self.buf_size, self.count)?;
        *p = Some(pool.clone());
        Ok(pool)
    }
}

/// Staging buffers for `len` bytes at byte `offset`, split at multiples of `piece` (a pair's
/// tracks, the pool's buffer size); `None` when the cache and pool cannot give them all now
/// (with two to spare, so one request cannot take the last ones).
pub(crate) fn staging_buffers(
    cache: &mut BufferCache,
    offset: u64,
    len: u64,
    piece: u64,
) -> Option<IoBufs> {
    if (len / piece + 2) as usize > cache.available() {
        return None;
    }
    let mut bufs = IoBufs::new();
    let (mut pos, end) = (offset, offset + len);
    while pos < end {
        let next = ((pos / piece + 1) * piece).min(end);
        let mut b = cache.get()?;
        b.set_len((next - pos) as usize).ok()?;
        bufs.push(b);
        pos = next;
    }
    Some(bufs)
}

/// The reactors connections go to, taken in turn.
pub(crate) struct ReactorRoundRobin {
    reactors: Vec<ReactorHandle>,
    next: AtomicUsize,
}

impl ReactorRoundRobin {
    /// Turns over `reactors`.
    pub(crate) fn new(reactors: Vec<ReactorHandle>) -> Self {
        Self {
            reactors,
            next: AtomicUsize::new(0),
        }
    }

    /// Wakes the parked ones (an export closed: its connections must see it).
    pub(crate) fn wake_all(&self) {
        for r in &self.reactors {
            r.wake_if_parked();
        }
    }

    /// The reactor for the next connection; `None` when there is none.
    pub(crate) fn next(&self) -> Option<&ReactorHandle> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.reactors.len().max(1);
        self.reactors.get(i)
    }
}
