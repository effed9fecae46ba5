//! The NVMe/TCP protocol on the export layer: bdevs and pair images exported as namespaces of
//! NVMe subsystems.
//!
//! Each export is a subsystem (its NQN) with one namespace, served on a TCP address; several
//! exports may share an address, which also answers the discovery subsystem's NQN. The export
//! layer accepts connections and this module hands each one, round robin, to a reactor, where
//! a [`conn::NvmfConn`] poller runs the queue over its non-blocking socket. Per the transport
//! specification every queue is its own connection: the admin queue's Connect creates a
//! controller (dynamic model), and the host's I/O queues join it by controller id, each on
//! whichever reactor took its connection.

pub mod conn;
pub mod hosts;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use drivers::nvmf::fabrics::{self, DiscoveryEntry};
use drivers::Bdev;

use crate::export::{Address, Export, ExportError, Protocol, Registry, Stream};
use hosts::HostAccess;

/// Default address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4420";
const _: () = assert!(
    drivers::nvmf::DEFAULT_PORT == 4420,
    "DEFAULT_LISTEN names the default port"
);

/// The address `nvmf_export_start` listens on, from its `listen` parameter: `"host:port"`, or
/// SPDK's listen address object `{"trtype": "tcp", "adrfam": "ipv4", "traddr": host,
/// "trsvcid": port}` (trtype and adrfam optional; the port a number or a string, 4420 when
/// left out). Gives `host:port`, an IPv6 host in brackets.
pub fn listen_address(listen: &serde_json::Value) -> Result<String, ExportError> {
    let bad = |m: String| ExportError::Invalid(format!("parameter 'listen': {m}"));
    if let Some(at) = listen.as_str() {
        let Some((host, port)) = at.rsplit_once(':') else {
            return Err(bad(format!("'{at}' is not host:port")));
        };
        drivers::nvmf::port::parse(port).map_err(|e| bad(format!("'{at}': port {e}")))?;
        if host.is_empty() {
            return Err(bad(format!("'{at}' has no host")));
        }
        return Ok(at.to_string());
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ListenAddress {
        #[serde(default)]
        trtype: Option<String>,
        #[serde(default)]
        adrfam: Option<String>,
        traddr: String,
        #[serde(default, deserialize_with = "drivers::nvmf::port::deserialize")]
        trsvcid: Option<u16>,
    }
    let a: ListenAddress =
        drivers::table::parse_params(listen.clone()).map_err(|e| bad(e.to_string()))?;
    if let Some(t) = a.trtype.filter(|t| !t.eq_ignore_ascii_case("tcp")) {
        return Err(bad(format!("trtype '{t}': only tcp is served")));
    }
    let v6 = match a.adrfam.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => a.traddr.contains(':'),
        Some("ipv4") => false,
        Some("ipv6") => true,
        Some(other) => return Err(bad(format!("adrfam '{other}': ipv4 or ipv6"))),
    };
    let port = a.trsvcid.unwrap_or(drivers::nvmf::DEFAULT_PORT);
    let host = a.traddr.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(bad("'traddr' is empty".into()));
    }
    Ok(match v6 {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    })
}

/// The NVMe/TCP server's exports: each a subsystem (its NQN) with one namespace.
pub type NvmfServer = Registry<NvmeTcp>;

/// A controller: created by an admin queue's Connect, joined by I/O queues.
pub struct Ctrl {
    /// Controller id.
    pub cntlid: u16,
    /// The export (None: the discovery controller).
    pub export: Option<Arc<Export>>,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Address it was connected on.
    pub listen: Address,
    /// CC.
    pub cc: AtomicU32,
    /// CSTS.
    pub csts: AtomicU32,
    /// I/O queues granted by Set Features (0: not asked yet).
    pub io_queues: AtomicU32,
    /// Keep Alive Timeout (ms, 0: none).
    pub kato_ms: u32,
    /// The admin queue is gone: the I/O queues close too.
    pub dead: AtomicBool,
    /// I/O queue ids connected.
    pub qids: Mutex<Vec<u16>>,
}

/// The NVMe/TCP protocol's own state: its controllers.
pub struct NvmeTcp {
    ctrls: Mutex<HashMap<u16, Weak<Ctrl>>>,
    next_cntlid: AtomicU16,
}

impl Default for NvmeTcp {
    fn default() -> Self {
        Self {
            ctrls: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
        }
    }
}

impl Protocol for NvmeTcp {
    const NAME: &'static str = "NVMe/TCP";
    const EXPORT: &'static str = "NVMe/TCP export with NQN";
    const NAME_KEY: &'static str = "nqn";
    const START_METHOD: &'static str = "nvmf_export_start";
    /// A command's data is split into pieces of at most this.
    const BUF_SIZE: usize = 64 << 10;
    const BUFS: usize = 1024;

    fn check(&self, nqn: &str, bdev: &dyn Bdev, address: &Address) -> Result<(), ExportError> {
        check_nqn(nqn)?;
        let bs = bdev.geometry().block_size;
        if bs as usize > Self::BUF_SIZE {
            return Err(ExportError::Invalid(format!(
                "block size {bs} is larger than the NVMe/TCP server's buffers"
            )));
        }
        if !matches!(address, Address::Tcp(_)) {
            return Err(ExportError::Invalid(
                "an NVMe/TCP export listens on a TCP address".into(),
            ));
        }
        Ok(())
    }

    fn accept(registry: &Arc<Registry<Self>>, stream: Stream, address: &Address) {
        let Stream::Tcp(s) = stream else {
            return;
        };
        if s.set_nonblocking(true).is_err() || s.set_nodelay(true).is_err() {
            return;
        }
        let peer = s
            .peer_addr()
            .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
        let (server, address) = (Arc::clone(registry), address.clone());
        registry.place(move |pool| Box::new(conn::NvmfConn::new(s, server, address, peer, pool)));
    }
}

impl NvmeTcp {
    /// Registers a new controller.
    pub fn new_ctrl(
        &self,
        export: Option<Arc<Export>>,
        subnqn: &str,
        hostnqn: &str,
        listen: &Address,
        kato_ms: u32,
    ) -> Option<Arc<Ctrl>> {
        let mut ctrls = self.ctrls.lock().unwrap_or_else(PoisonError::into_inner);
        ctrls.retain(|_, w| w.strong_count() > 0);
        // Controller ids 1..=0xffef, the first free one from a rotating start.
        let cntlid = (0..0xffefu32).find_map(|_| {
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            (id != 0 && id < 0xfff0 && !ctrls.contains_key(&id)).then_some(id)
        })?;
        let ctrl = Arc::new(Ctrl {
            cntlid,
            export,
            subnqn: subnqn.to_string(),
            hostnqn: hostnqn.to_string(),
            listen: listen.clone(),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            io_queues: AtomicU32::new(0),
            kato_ms,
            dead: AtomicBool::new(false),
            qids: Mutex::new(Vec::new()),
        });
        ctrls.insert(cntlid, Arc::downgrade(&ctrl));
        Some(ctrl)
    }

    /// The live controller `cntlid`.
    pub fn ctrl(&self, cntlid: u16) -> Option<Arc<Ctrl>> {
        self.ctrls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&cntlid)
            .and_then(Weak::upgrade)
            .filter(|c| !c.dead.load(Ordering::SeqCst))
    }
}

/// The hosts an NVMe/TCP export allows (every export has them; `None` only for an export
/// made without).
pub fn access_of(export: &Export) -> Option<&HostAccess> {
    export.options.as_any().downcast_ref::<HostAccess>()
}

/// True when host `hostnqn` may connect to `export`.
pub fn allows(export: &Export, hostnqn: &str) -> bool {
    access_of(export).is_none_or(|a| a.allows(hostnqn))
}

/// The discovery log of `listen` for host `hostnqn`: every export served there that the host
/// may connect to.
pub fn discovery_log(server: &NvmfServer, listen: &Address, hostnqn: &str) -> Vec<u8> {
    let default_port = drivers::nvmf::DEFAULT_PORT.to_string();
    let at = match listen {
        Address::Tcp(a) => a.as_str(),
        Address::Unix(_) => "",
    };
    let (traddr, trsvcid) = at.rsplit_once(':').unwrap_or((at, default_port.as_str()));
    let entries: Vec<DiscoveryEntry> = server
        .exports_at(listen)
        .iter()
        .filter(|e| allows(e, hostnqn))
        .map(|e| DiscoveryEntry {
            subnqn: e.name.clone(),
            traddr: traddr.trim_matches(['[', ']']).to_string(),
            trsvcid: trsvcid.to_string(),
            portid: 1,
        })
        .collect();
    fabrics::discovery_log(server.generation(), &entries)
}

/// Checks an NQN given to `nvmf_export_start`.
pub fn check_nqn(nqn: &str) -> Result<(), ExportError> {
    if nqn.is_empty() || nqn.len() > 223 || !nqn.starts_with("nqn.") {
        return Err(ExportError::Invalid(
            "an NQN starts with 'nqn.' and has at most 223 bytes".into(),
        ));
    }
    if nqn == fabrics::DISCOVERY_NQN {
        return Err(ExportError::Invalid(
            "the discovery NQN cannot be exported".into(),
        ));
    }
    Ok(())
}
