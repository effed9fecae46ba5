//! The NBD protocol on the export layer: exports of bdevs and of pairs' images on Unix sockets
//! and TCP.
//!
//! Each accepted connection's handshake runs on a short-lived control thread (blocking, with a
//! timeout); the transmission phase is then handed to a reactor as a poller over the
//! non-blocking socket ([`conn::NbdConn`]), round robin over the reactors. Several exports may
//! share one address.

pub mod conn;
pub mod handshake;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drivers::Bdev;

use crate::export::{Address, Export, ExportError, Protocol, Registry, Source, Stream};

/// Handshakes in progress at once.
const MAX_HANDSHAKES: usize = 64;
/// A handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The NBD server's exports.
pub type NbdServer = Registry<Nbd>;

/// The NBD protocol's own state: the handshakes running.
#[derive(Default)]
pub struct Nbd {
    handshakes: Arc<AtomicUsize>,
}

impl Protocol for Nbd {
    const NAME: &'static str = "NBD";
    const EXPORT: &'static str = "NBD export named";
    const NAME_KEY: &'static str = "name";
    const START_METHOD: &'static str = "nbd_export_start";
    /// Requests are split into pieces of at most this.
    const BUF_SIZE: usize = 64 << 10;
    const BUFS: usize = 1024;

    fn check(&self, name: &str, _bdev: &dyn Bdev, _address: &Address) -> Result<(), ExportError> {
        if name.is_empty() || name.len() > 4096 {
            return Err(ExportError::Invalid(
                "an export name has 1 to 4096 bytes".into(),
            ));
        }
        Ok(())
    }

    /// Runs the connection's handshake on its own thread (blocking, with a timeout), at most
    /// `MAX_HANDSHAKES` at once.
    fn accept(registry: &Arc<Registry<Self>>, stream: Stream, address: &Address) {
        let handshakes = &registry.protocol().handshakes;
        if handshakes.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            return;
        }
        handshakes.fetch_add(1, Ordering::SeqCst);
        let (registry, address) = (Arc::clone(registry), address.clone());
        let running = Arc::clone(handshakes);
        let spawned = std::thread::Builder::new()
            .name("nbd_handshake".into())
            .spawn(move || {
                handshake_then_serve(&registry, stream, &address);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            handshakes.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// What `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` say of an export.
pub fn description(export: &Export) -> String {
    match &export.source {
        Source::Bdev(b) => format!("quicksplit bdev {b}"),
        Source::Pair(p) => format!("quicksplit image of pair {p}"),
    }
}

fn handshake_then_serve(registry: &NbdServer, mut stream: Stream, address: &Address) {
    if stream.set_mode(Some(HANDSHAKE_TIMEOUT)).is_err() {
        return;
    }
    let agreed = match handshake::negotiate(&mut stream, registry, address) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%e, "NBD handshake ended");
            return;
        }
    };
    if stream.set_mode(None).is_err() {
        return;
    }
    registry.place(move |pool| {
        Box::new(conn::NbdConn::new(
            stream,
            agreed.export,
            agreed.structured,
            pool,
        ))
    });
}
