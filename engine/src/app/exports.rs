//! Exports over NBD and NVMe/TCP: what an export of a bdev or of a pair's image shows, and the
//! checks that keep a bdev exported as itself out of pairs and deletion.

use std::sync::Arc;

use super::{Engine, EngineError, State};
use crate::export::contexts::DirtyBitmaps;
use crate::export::{Address, Export, ExportError, ExportSet, Source};
use crate::nbd::tls::{ExportTls, TlsParams};
use crate::nbd::{NbdOptions, NbdServer};
use crate::nvmf::hosts::{self, AllowedHost, HostAccess};
use crate::nvmf::{check_nqn, NvmfServer, DEFAULT_LISTEN};
use crate::pair::channel::{PairView, View};
use crate::pair::{Pair, PairError};

/// An image export's dirty bitmaps: its pair's checkpoints.
struct PairCheckpoints(Arc<Pair>);

impl DirtyBitmaps for PairCheckpoints {
    fn checkpoints(&self) -> Vec<String> {
        self.0
            .checkpoint_infos()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }

    fn changed_since(&self, name: &str) -> Option<(Vec<u64>, u64)> {
        let words = self.0.changed_since_for_incremental(name).ok()?;
        Some((words, self.0.track_size()))
    }
}

/// What an export shows.
pub(crate) enum ExportOf<'a> {
    /// A bdev, through its pair when it is a pair's primary.
    Bdev(&'a str),
    /// A pair's image.
    Pair(&'a str),
}

/// The source, the bdev connections open and the access of an export of `of`, with the state
/// locked by the caller until the export is registered. `writable` defaults to true for a bdev
/// and false for an image; a pair's secondary cannot be exported.
pub(crate) fn resolve_export(
    st: &State,
    of: ExportOf<'_>,
    writable: Option<bool>,
) -> Result<(Source, Arc<dyn drivers::Bdev>, bool), EngineError> {
    match of {
        ExportOf::Bdev(b) => {
            let raw = st.bdevs.get(b)?;
            let owner = st
                .pairs
                .values()
                .find(|p| p.primary().name() == b || p.secondary().name() == b);
            let shown: Arc<dyn drivers::Bdev> = match owner {
                Some(p) if p.secondary().name() == b => {
                    return Err(EngineError::InUse(format!(
                        "bdev '{b}' is the secondary of pair '{}': export the pair's image \
                         instead",
                        p.name()
                    )))
                }
                Some(p) => Arc::new(PairView::new(Arc::clone(p), View::Primary)),
                None => raw,
            };
            Ok((Source::Bdev(b.to_string()), shown, writable.unwrap_or(true)))
        }
        ExportOf::Pair(name) => {
            let p = st
                .pairs
                .get(name)
                .cloned()
                .ok_or_else(|| PairError::NotFound(name.to_string()))?;
            Ok((
                Source::Pair(name.to_string()),
                Arc::new(PairView::new(p, View::Image)),
                writable.unwrap_or(false),
            ))
        }
    }
}

impl Engine {
    /// The NBD server's exports.
    pub fn nbd(&self) -> &Arc<NbdServer> {
        &self.nbd
    }

    /// The NVMe/TCP target's exports.
    pub fn nvmf(&self) -> &Arc<NvmfServer> {
        &self.nvmf
    }

    /// Every protocol's exports, for the checks that span them.
    pub(super) fn export_sets(&self) -> [&dyn ExportSet; 2] {
        [self.nbd.as_ref(), self.nvmf.as_ref()]
    }

    /// Stops every export of every protocol.
    pub fn stop_exports(&self) {
        for set in self.export_sets() {
            set.stop_all();
        }
    }

    /// What an export of exactly one of `bdev` and `pair` shows, its bdev and its access,
    /// resolved under the state lock, which `register` runs under too: a pair made in between
    /// would not see the export (`pair_create` refuses bdevs exported as themselves).
    fn start_export(
        &self,
        bdev: Option<&str>,
        pair: Option<&str>,
        writable: Option<bool>,
        register: impl FnOnce(
            Source,
            Arc<dyn drivers::Bdev>,
            bool,
            Option<Arc<dyn DirtyBitmaps>>,
        ) -> Result<(), ExportError>,
    ) -> Result<(), EngineError> {
        let of = match (bdev, pair) {
            (Some(b), None) => ExportOf::Bdev(b),
            (None, Some(p)) => ExportOf::Pair(p),
            _ => {
                return Err(
                    ExportError::Invalid("give exactly one of 'bdev' and 'pair'".into()).into(),
                )
            }
        };
        let st = self.state();
        let dirty = match of {
            ExportOf::Pair(p) => st
                .pairs
                .get(p)
                .map(|p| Arc::new(PairCheckpoints(Arc::clone(p))) as Arc<dyn DirtyBitmaps>),
            ExportOf::Bdev(_) => None,
        };
        let (source, shown, writable) = resolve_export(&st, of, writable)?;
        register(source, shown, writable, dirty)?;
        Ok(())
    }

    /// Starts an NBD export of a bdev (through its pair when it is a pair's primary) or of a
    /// pair's image. `writable` defaults to true for a bdev and false for an image; the address
    /// defaults to `<state-dir>/nbd.sock`. With `tls`, every client at the address must start
    /// TLS (exports sharing an address share its TLS); a listen address that is not loopback
    /// needs `tls` or `insecure`.
    pub fn nbd_export_start(
        &self,
        name: &str,
        (bdev, pair): (Option<&str>, Option<&str>),
        writable: Option<bool>,
        (address, insecure): (Option<Address>, bool),
        tls: Option<TlsParams>,
    ) -> Result<(), EngineError> {
        let address = address.unwrap_or_else(|| Address::Unix(self.state_dir.join("nbd.sock")));
        if let Address::Tcp(listen) = &address {
            if tls.is_none() && !insecure && !hosts::is_loopback_listen(listen) {
                return Err(ExportError::Invalid(format!(
                    "listen address {listen} is not loopback: give tls, or insecure: true to \
                     serve it in clear"
                ))
                .into());
            }
        }
        let tls = match tls {
            Some(_) if matches!(address, Address::Unix(_)) => {
                return Err(ExportError::Invalid(
                    "parameter 'tls': TLS is for TCP listen addresses, not Unix sockets".into(),
                )
                .into())
            }
            Some(p) => Some(ExportTls::load(p, &self.keyring)?),
            None => None,
        };
        let wanted = tls.as_ref().map(ExportTls::tls_params);
        for other in self.nbd.exports_at(&address) {
            let theirs = other
                .options
                .as_any()
                .downcast_ref::<NbdOptions>()
                .and_then(|o| o.tls.as_ref().map(ExportTls::tls_params));
            if theirs != wanted {
                return Err(ExportError::Invalid(format!(
                    "export '{}' at {address} has other TLS settings: exports sharing an \
                     address share its TLS",
                    other.name
                ))
                .into());
            }
        }
        self.start_export(bdev, pair, writable, |source, shown, writable, dirty| {
            let options = Arc::new(NbdOptions { insecure, tls });
            self.nbd
                .start(name, source, shown, writable, address, dirty, options)
        })
    }

    /// `nvmf_export_start`: exports a bdev (through its pair when it is a pair's primary) or a
    /// pair's image as namespace 1 of subsystem `nqn`. `writable` defaults to true for a bdev
    /// and false for an image. The hosts allowed: `hosts`, or any when `allow_any_host`, which
    /// defaults to true only with no `hosts` on a loopback listen; any other listen needs one
    /// of them.
    pub fn nvmf_export_start(
        &self,
        nqn: &str,
        (bdev, pair): (Option<&str>, Option<&str>),
        writable: Option<bool>,
        listen: Option<&str>,
        (hosts, allow_any_host): (Vec<AllowedHost>, Option<bool>),
    ) -> Result<(), EngineError> {
        check_nqn(nqn)?;
        let listen = listen.unwrap_or(DEFAULT_LISTEN);
        let loopback = hosts::is_loopback_listen(listen);
        if !loopback && hosts.is_empty() && allow_any_host.is_none() {
            return Err(ExportError::Invalid(format!(
                "listen address {listen} is not loopback: give the host NQNs allowed ('hosts') \
                 or allow_any_host: true"
            ))
            .into());
        }
        for (i, h) in hosts.iter().enumerate() {
            if hosts[..i].iter().any(|o| o.nqn == h.nqn) {
                return Err(ExportError::Invalid(format!(
                    "parameter 'hosts': host '{}' is given twice",
                    h.nqn
                ))
                .into());
            }
        }
        let allow_any_host = allow_any_host.unwrap_or(loopback && hosts.is_empty());
        let mut with_keys = Vec::with_capacity(hosts.len());
        for h in hosts {
            let keys = self.dhchap_keys(h.dhchap_key.as_deref(), h.dhchap_ctrlr_key.as_deref())?;
            with_keys.push((h, keys));
        }
        let access = Arc::new(HostAccess::new(allow_any_host, with_keys));
        let address = Address::Tcp(listen.to_string());
        self.start_export(bdev, pair, writable, |source, shown, writable, _dirty| {
            self.nvmf
                .start(nqn, source, shown, writable, address, None, access)
        })
    }

    /// The running NVMe/TCP export `nqn`.
    fn nvmf_export(&self, nqn: &str) -> Result<Arc<Export>, EngineError> {
        let e = self.nvmf.get(nqn).ok_or_else(|| ExportError::NotFound {
            what: <crate::nvmf::NvmeTcp as crate::export::Protocol>::EXPORT,
            name: nqn.to_string(),
        })?;
        Ok(e)
    }

    /// `nvmf_export_add_host`: allows one more host on a running export.
    pub fn nvmf_export_add_host(&self, nqn: &str, host: AllowedHost) -> Result<(), EngineError> {
        hosts::check_host_nqn(&host.nqn)?;
        let e = self.nvmf_export(nqn)?;
        let keys =
            self.dhchap_keys(host.dhchap_key.as_deref(), host.dhchap_ctrlr_key.as_deref())?;
        let access = crate::nvmf::access_of(&e)
            .ok_or_else(|| ExportError::Invalid(format!("export '{nqn}' has no host list")))?;
        let added = host.nqn.clone();
        access.add(host, keys)?;
        self.nvmf.changed();
        tracing::info!(nqn, host = %added, "NVMe/TCP export allows one more host");
        Ok(())
    }

    /// `nvmf_export_remove_host`: the host may no longer connect, and its connections to the
    /// export close.
    pub fn nvmf_export_remove_host(&self, nqn: &str, host: &str) -> Result<(), EngineError> {
        let e = self.nvmf_export(nqn)?;
        let removed = crate::nvmf::access_of(&e).and_then(|a| a.remove(host));
        if removed.is_none() {
            return Err(EngineError::NotFound(format!(
                "host '{host}' is not in the hosts of NVMe/TCP export '{nqn}'"
            )));
        }
        self.nvmf.changed();
        // Parked reactors wake so the host's connections see it.
        for r in self.reactors.handles() {
            r.wake_if_parked();
        }
        tracing::info!(nqn, host, "NVMe/TCP export no longer allows a host");
        Ok(())
    }

    /// The export, of any protocol, that shows bdev `name` itself, if one does. (Stopped
    /// exports count while their connections finish the requests they read.)
    pub(super) fn raw_export_of(&self, name: &str) -> Option<String> {
        let shows = |e: &Export| matches!(&e.source, Source::Bdev(b) if b == name);
        self.export_sets().into_iter().find_map(|set| {
            set.uses(&shows)
                .map(|e| format!("{} export '{e}'", set.protocol_name()))
        })
    }

    /// Fails when bdev `name` is exported as itself (over any protocol).
    pub(super) fn check_not_exported(&self, name: &str) -> Result<(), EngineError> {
        match self.raw_export_of(name) {
            Some(export) => Err(EngineError::InUse(format!(
                "bdev '{name}' is exported ({export}): stop the export first"
            ))),
            None => Ok(()),
        }
    }

    /// Fails when pair `name` is exported: its image, or its primary (`primary`) through it.
    pub(super) fn check_pair_not_exported(
        &self,
        name: &str,
        primary: &str,
    ) -> Result<(), EngineError> {
        let shows = |e: &Export| match &e.source {
            Source::Pair(p) => p == name,
            Source::Bdev(b) => b == primary,
        };
        for set in self.export_sets() {
            if let Some(e) = set.uses(&shows) {
                return Err(EngineError::InUse(format!(
                    "pair '{name}' is exported over {} as '{e}': stop the export first",
                    set.protocol_name()
                )));
            }
        }
        Ok(())
    }
}
