//! The NBD protocol on the export layer: exports of bdevs and of pairs' images on Unix sockets
//! and TCP.
//!
//! Each accepted connection's handshake runs on a short-lived control thread (blocking, with a
//! deadline), within the limits [`admission`] sets; the transmission phase is then handed to a
//! reactor as a poller over the non-blocking socket ([`conn::NbdConn`]), round robin over the
//! reactors. Several exports may share one address.
//!
//! TLS ([`tls`]): exports started with `tls` require it of every client at their address; the
//! handshake answers NBD_OPT_STARTTLS, runs the TLS handshake and the rest of the negotiation
//! over it, and the connection's poller then runs over the TLS session ([`conn::NbdConn`] over
//! a `TlsStream`), while plain connections keep their own path.
//!
//! Block status: the handshake negotiates metadata contexts ([`meta`]) among those the export
//! offers, and `NBD_CMD_BLOCK_STATUS` reports them (`block_status.rs`).

pub mod admission;
mod block_status;
pub mod conn;
pub mod handshake;
pub mod meta;
pub mod tls;

use std::sync::Arc;

use drivers::Bdev;

use crate::export::{Address, Export, ExportError, Protocol, Registry, Source, Stream};
use admission::{Deadlined, Handshakes, Peer, Ticket};

/// The NBD server's exports.
pub type NbdServer = Registry<Nbd>;

/// An NBD export's own settings: `insecure`, served in clear on a listen address that is not
/// loopback, as asked; `tls`, served over TLS only.
#[derive(Debug, Default, Clone)]
pub struct NbdOptions {
    /// Served in clear beyond this machine, as asked.
    pub insecure: bool,
    /// TLS, required of every client at the export's address.
    pub tls: Option<tls::ExportTls>,
}

impl crate::export::ExportOptions for NbdOptions {
    fn params(&self, m: &mut serde_json::Map<String, serde_json::Value>) {
        if self.insecure {
            m.insert("insecure".into(), true.into());
        }
        if let Some(t) = &self.tls {
            m.insert("tls".into(), t.params());
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The TLS that the exports at `address` require, if any (they all have the same).
fn tls_at(server: &NbdServer, address: &Address) -> Option<tls::ExportTls> {
    server.exports_at(address).iter().find_map(|e| {
        let o = e.options.as_any().downcast_ref::<NbdOptions>()?;
        o.tls.clone()
    })
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

/// Negotiates on `stream` within `ticket`'s deadline (starting TLS when the address requires
/// it), then gives the connection to a reactor (and its place in the table back). A client
/// refused for TLS is logged at warn with why, at most once a second as other refusals are.
fn handshake_then_serve(
    registry: &NbdServer,
    mut stream: Stream,
    address: &Address,
    ticket: Ticket,
    peer: &Peer,
) {
    let tls = tls_at(registry, address);
    let negotiated = {
        let mut s = Deadlined::new(&mut stream, ticket.deadline());
        let required = if tls.is_some() {
            handshake::Tls::Required
        } else {
            handshake::Tls::Off
        };
        handshake::greet(&mut s).and_then(|nz| {
            Ok((
                nz,
                handshake::options(&mut s, registry, address, nz, required)?,
            ))
        })
    };
    let (no_zeroes, negotiated) = match negotiated {
        Ok(n) => n,
        Err(e) => {
            if tls.is_some() {
                registry.protocol().handshakes.warn(format_args!(
                    "NBD client {peer} refused: TLS is required at this address and it did not \
                     start it ({e})"
                ));
            } else {
                tracing::debug!(%e, %peer, "NBD handshake ended before an export");
            }
            return;
        }
    };
    match (negotiated, tls) {
        (handshake::Negotiated::Agreed(agreed), _) => {
            drop(ticket);
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
        (handshake::Negotiated::StartTls, Some(tls)) => {
            let mut session = match tls.accept(stream, ticket.deadline()) {
                Ok(s) => s,
                Err(reason) => {
                    registry.protocol().handshakes.warn(format_args!(
                        "NBD client {peer} refused: TLS handshake failed: {reason}"
                    ));
                    return;
                }
            };
            let agreed = handshake::options(
                &mut session,
                registry,
                address,
                no_zeroes,
                handshake::Tls::Active,
            );
            drop(ticket);
            let agreed = match agreed {
                Ok(handshake::Negotiated::Agreed(a)) => a,
                Ok(handshake::Negotiated::StartTls) => return,
                Err(e) => {
                    tracing::debug!(%e, %peer, "NBD handshake over TLS ended before an export");
                    return;
                }
            };
            tracing::debug!(%peer, export = %agreed.export.name, tls = session.describe(), "NBD client negotiated over TLS");
            if session.end_deadline().is_err() {
                return;
            }
            registry.place(move |pool| {
                Box::new(conn::NbdConn::new(
                    session,
                    agreed.export,
                    agreed.structured,
                    agreed.meta,
                    pool,
                ))
            });
        }
        // TLS is only started where it is required.
        (handshake::Negotiated::StartTls, None) => {}
    }
}
