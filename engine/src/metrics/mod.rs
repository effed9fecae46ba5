//! The metrics endpoint (`serve --metrics HOST:PORT`): the engine's figures in the Prometheus
//! text format, over plain HTTP/1.x, `GET /metrics`.
//!
//! One control thread serves it, never a reactor: its socket is bound before the engine
//! starts (so a bad address or a port in use stops `serve` before anything else runs), and
//! every connection is non-blocking, polled by that one thread, so no client holds it. A
//! request is at most 8 KiB of headers ([`MAX_REQUEST`]); a connection has 10 s in all
//! ([`CONNECTION_TIMEOUT`]) to send its request and take the answer, whatever it does; at most
//! 16 are open at once ([`MAX_CONNECTIONS`]), the oldest making room for a newcomer, so clients
//! that connect and stall, send garbage or never read cannot keep a scrape out.

mod exposition;
mod http;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::app::Engine;

pub use exposition::{render, CONTENT_TYPE};

/// Longest request (its headers) the endpoint reads.
pub const MAX_REQUEST: usize = 8192;
/// What a connection has to send its request and read the answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Errors setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address does not parse or resolve.
    #[error("'{0}' is not HOST:PORT (an address or a host name, and a port)")]
    Address(String),
    /// The address cannot be listened on (in use, not local, no permission).
    #[error("--metrics {address}: cannot listen: {source}")]
    Listen {
        /// The address.
        address: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The thread could not be started.
    #[error("metrics thread: {0}")]
    Thread(std::io::Error),
}

/// Resolves `--metrics HOST:PORT` (`127.0.0.1:9100`, `[::1]:9100`, `localhost:9100`).
pub fn parse_address(s: &str) -> Result<SocketAddr, MetricsError> {
    let bad = || MetricsError::Address(s.to_string());
    let (_, port) = s.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    s.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// The endpoint's socket, bound and not yet served.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
}

impl MetricsListener {
    /// Binds `address`.
    pub fn bind(address: SocketAddr) -> Result<Self, MetricsError> {
        let err = |source| MetricsError::Listen {
            address: address.to_string(),
            source,
        };
        let listener = TcpListener::bind(address).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self { listener })
    }

    /// The address bound (its port, when port 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves the engine's metrics on a thread of its own until the server is dropped.
    pub fn serve(self, engine: Arc<Engine>) -> Result<MetricsServer, MetricsError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || http::run(self.listener, &engine, &flag))
            .map_err(MetricsError::Thread)?;
        Ok(MetricsServer {
            stop,
            thread: Some(thread),
        })
    }
}

/// The running endpoint; dropping it stops the thread and closes the socket.
#[derive(Debug)]
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
