//! The NBD protocol on the export layer: exports of bdevs and of pairs' images on Unix sockets
//! and TCP.
//!
//! Each accepted connection's handshake runs on a short-lived control thread (blocking, with a
//! deadline), within the limits [`admission`] sets; the transmission phase is then handed to a
//! reactor as a poller over the non-blocking socket ([`conn::NbdConn`]), round robin over the
//! reactors. Several exports may share one address.
//!
//! Block status: the handshake negotiates metadata contexts ([`meta`]) among those the export
//! offers, and `NBD_CMD_BLOCK_STATUS` reports them (`block_status.rs`).

pub mod admission;
mod block_status;
pub mod conn;
pub mod handshake;
pub mod meta;

use std::sync::Arc;

use drivers::Bdev;

use crate::export::{Address, Export, ExportError, Protocol, Registry, Source, Stream};
use admission::{Deadlined, Handshakes, Peer, Ticket};

/// The NBD server's exports.
pub type NbdServer = Registry<Nbd>;

/// An NBD export's own settings: `insecure`, served in clear on a listen address that is not
/// loopback (NBD over TLS is not there yet, so such a listen needs it said).
#[derive(Debug, Default, Clone, Copy)]
pub struct NbdOptions {
    /// Served in clear beyond this machine, as asked.
    pub insecure: bool,
}

impl crate::export::ExportOptions for NbdOptions {
    fn params(&self, m: &mut serde_json::Map<String, serde_json::Value>) {
        if self.insecure {
            m.insert("insecure".into(), true.into());
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The NBD protocol's own state: the handshakes running.
#[derive(Default)]
pub struct Nbd {
    handshakes: Arc<Handshakes>,
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

    /// Runs the connection's handshake on its own thread (blocking, with a deadline), or
    /// refuses it with a reason when its peer has too many in progress.
    fn accept(registry: &Arc<Registry<Self>>, stream: Stream, address: &Address) {
        let handshakes = &registry.protocol().handshakes;
        let peer = Peer::of(&stream);
        let ticket = match handshakes.admit(&peer, &stream) {
            Ok(t) => t,
            Err(refusal) => return handshakes.refuse(stream, &peer, refusal),
        };
        let (registry, address, who) = (Arc::clone(registry), address.clone(), peer.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd_handshake".into())
            .spawn(move || handshake_then_serve(&registry, stream, &address, ticket, &who));
        if let Err(e) = spawned {
            tracing::warn!(%e, %peer, "NBD connection dropped: no thread for its handshake");
        }
    }
}

/// The export a client names at `address`; the empty name selects the first one there.
fn select(server: &NbdServer, address: &Address, name: &str) -> Option<Arc<Export>> {
    if name.is_empty() {
        server.exports_at(address).into_iter().next()
    } else {
        server.lookup(address, name)
    }
}

/// What `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` say of an export.
pub fn description(export: &Export) -> String {
    match &export.source {
        Source::Bdev(b) => format!("quicksplit bdev {b}"),
        Source::Pair(p) => format!("quicksplit image of pair {p}"),
    }
}

/// Negotiates on `stream` within `ticket`'s deadline, then gives the connection to a reactor
/// (and its place in the table back).
fn handshake_then_serve(
    registry: &NbdServer,
    mut stream: Stream,
    address: &Address,
    ticket: Ticket,
    peer: &Peer,
) {
    let negotiated = {
        let mut s = Deadlined::new(&mut stream, ticket.deadline());
        handshake::negotiate(&mut s, registry, address)
    };
    drop(ticket);
    let agreed = match negotiated {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%e, %peer, "NBD handshake ended before an export");
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
            agreed.meta,
            pool,
        ))
    });
}
