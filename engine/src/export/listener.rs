//! Listening sockets: a thread per address accepting connections and handing each to its
//! protocol, and the care a Unix socket path needs (a stale socket is replaced, anything else
//! is left alone and refused).

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Address, Stream};

/// How long the accept thread sleeps when no connection is waiting.
const ACCEPT_IDLE: Duration = Duration::from_millis(2);
/// How long it backs off after an accept error (out of descriptors, say).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A bound, non-blocking listening socket.
pub(crate) enum Listener {
    /// On a Unix socket path (removed when the listener goes).
    Unix(UnixListener, PathBuf),
    /// On a TCP address.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `address`: a stale Unix socket left by an earlier server is replaced first.
    pub(crate) fn bind(address: &Address) -> std::io::Result<Self> {
        let l = match address {
            Address::Unix(p) => {
                clear_stale_socket(p)?;
                let l = UnixListener::bind(p)?;
                l.set_nonblocking(true)?;
                Listener::Unix(l, p.clone())
            }
            Address::Tcp(a) => {
                let l = TcpListener::bind(a.as_str())?;
                l.set_nonblocking(true)?;
                Listener::Tcp(l)
            }
        };
        Ok(l)
    }

    /// A waiting connection and its peer, or `WouldBlock`.
    fn accept(&self) -> std::io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| {
                let peer = peer_of(&s);
                (Stream::Unix(s), peer)
            }),
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Stream::Tcp(s), a.to_string())),
        }
    }

    fn path(&self) -> Option<PathBuf> {
        match self {
            Listener::Unix(_, p) => Some(p.clone()),
            Listener::Tcp(_) => None,
        }
    }
}

/// A thread accepting connections on one listening socket until dropped; dropping it stops and
/// joins the thread and removes the socket's path, if it has one.
pub(crate) struct AcceptThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    remove_on_drop: Option<PathBuf>,
}

impl AcceptThread {
    /// Accepts on `listener` and hands each connection to `on_accept`; `protocol` names the
    /// thread and the log lines.
    pub(crate) fn spawn(
        protocol: &'static str,
        listener: Listener,
        mut on_accept: impl FnMut(Stream) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let remove_on_drop = listener.path();
        let name: String = protocol
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_lowercase();
        let thread = std::thread::Builder::new()
            .name(format!("{name}_listen"))
            .spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            tracing::debug!(protocol, peer, "connection accepted");
                            on_accept(conn)
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(ACCEPT_IDLE);
                        }
                        Err(e) => {
                            tracing::warn!(%e, "{protocol} accept failed");
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

/// Who is on the other end of a connected socket, for log lines: its TCP address
/// (`127.0.0.1:40312`), or on a Unix socket the client process (`pid 4242 uid 0`, from
/// `SO_PEERCRED`).
pub fn peer_of(sock: impl AsFd) -> String {
    let fd = sock.as_fd();
    if let Ok(Some(addr)) = rustix::net::getpeername(fd) {
        if let Ok(a) = std::net::SocketAddr::try_from(addr) {
            return a.to_string();
        }
    }
    match rustix::net::sockopt::socket_peercred(fd) {
        Ok(c) => format!("pid {} uid {}", c.pid.as_raw_nonzero(), c.uid.as_raw()),
        Err(_) => "unknown".into(),
    }
}

/// Clears the way to bind a Unix socket at `path`: a stale socket left by an earlier server is
/// removed; a socket a live server answers on, or any other kind of file (a volume, a config),
/// is an error and stays.
pub fn clear_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
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
