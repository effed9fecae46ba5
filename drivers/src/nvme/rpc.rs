//! `bdev_nvme_attach_controller` and `bdev_nvme_detach_controller`: parameters and glue.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{vfio, Controller, ControllerOptions, NvmeBdev};
use crate::bdev::{Bdev, BdevError};
use crate::table::{parse_params, CreateError};

/// Parameters of `bdev_nvme_attach_controller`. A local controller is named by `pci_addr`
/// (VFIO); a remote one by `trtype: "tcp"`, `traddr`, `trsvcid`, `subnqn` (NVMe/TCP).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachParams {
    /// Controller name; namespaces become `<name>n<nsid>`.
    pub name: String,
    /// PCI address of a controller bound to vfio-pci.
    #[serde(default)]
    pub pci_addr: Option<String>,
    /// Transport: `pcie` (default) or `tcp`.
    #[serde(default)]
    pub trtype: Option<String>,
    /// NVMe/TCP target address.
    #[serde(default)]
    pub traddr: Option<String>,
    /// NVMe/TCP target port, a number or a string.
    #[serde(default, deserialize_with = "crate::nvmf::port::deserialize")]
    pub trsvcid: Option<u16>,
    /// NVMe/TCP subsystem NQN.
    #[serde(default)]
    pub subnqn: Option<String>,
    /// Milliseconds an I/O command may take before it is aborted (default 30000).
    #[serde(default)]
    pub io_timeout_ms: Option<u64>,
    /// NVMe/TCP: the host NQN sent in Connect (default: this host's, derived from its name).
    #[serde(default)]
    pub hostnqn: Option<String>,
    /// NVMe/TCP: the keyring key to authenticate with (DH-HMAC-CHAP).
    #[serde(default)]
    pub dhchap_key: Option<String>,
    /// NVMe/TCP: the keyring key the controller authenticates with (bidirectional).
    #[serde(default)]
    pub dhchap_ctrlr_key: Option<String>,
    /// The secrets those keys hold, read from the keyring by the caller.
    #[serde(skip)]
    pub dhchap: Option<Arc<crate::nvmf::auth::HostKeys>>,
}

/// Where a controller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A local PCI function through VFIO.
    Pcie {
        /// Its address.
        pci_addr: String,
    },
    /// A remote controller over NVMe/TCP.
    Tcp {
        /// Target address.
        traddr: String,
        /// Target port.
        trsvcid: u16,
        /// Subsystem.
        subnqn: String,
    },
}

impl AttachParams {
    /// The transport the parameters name.
    pub fn transport(&self) -> Result<Transport, CreateError> {
        let bad = |m: &str| Err(CreateError::Params(m.to_string()));
        match self
            .trtype
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("pcie") => {
                if self.traddr.is_some()
                    || self.trsvcid.is_some()
                    || self.subnqn.is_some()
                    || self.hostnqn.is_some()
                {
                    return bad("traddr, trsvcid, subnqn and hostnqn go with trtype \"tcp\"");
                }
                match &self.pci_addr {
                    Some(a) => Ok(Transport::Pcie {
                        pci_addr: vfio::canonical_pci_addr(a).map_err(|e| {
                            CreateError::Params(format!("parameter 'pci_addr': {e}"))
                        })?,
                    }),
                    None => bad("give 'pci_addr' (or trtype \"tcp\" with traddr and subnqn)"),
                }
            }
            Some("tcp") => {
                if self.pci_addr.is_some() {
                    return bad("pci_addr does not go with trtype \"tcp\"");
                }
                match (&self.traddr, &self.subnqn) {
                    (Some(traddr), Some(subnqn)) => Ok(Transport::Tcp {
                        traddr: traddr.clone(),
                        trsvcid: self.trsvcid.unwrap_or(crate::nvmf::DEFAULT_PORT),
                        subnqn: subnqn.clone(),
                    }),
                    _ => bad("trtype \"tcp\" needs traddr and subnqn"),
                }
            }
            Some(other) => Err(CreateError::Params(format!(
                "parameter 'trtype': unknown transport '{other}' (pcie or tcp)"
            ))),
        }
    }
}

/// Parameters of `bdev_nvme_detach_controller`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachParams {
    /// Controller name.
    pub name: String,
}

/// Attaches the controller the JSON parameters name; gives its namespaces' bdevs.
pub fn attach(params: serde_json::Value) -> Result<Vec<Arc<dyn Bdev>>, CreateError> {
    attach_with(parse_params(params)?)
}

/// Attaches the controller parsed parameters name; gives its namespaces' bdevs.
pub fn attach_with(p: AttachParams) -> Result<Vec<Arc<dyn Bdev>>, CreateError> {
    if p.name.is_empty() || p.name.contains('/') {
        return Err(CreateError::Params(
            "parameter 'name': must be non-empty, without '/'".into(),
        ));
    }
    let pci_addr = match p.transport()? {
        Transport::Pcie { pci_addr } => pci_addr,
        Transport::Tcp {
            traddr,
            trsvcid,
            subnqn,
        } => return attach_tcp(&p, &traddr, trsvcid, &subnqn),
    };
    let mut options = ControllerOptions::default();
    if let Some(ms) = p.io_timeout_ms {
        if ms == 0 {
            return Err(CreateError::Params(
                "parameter 'io_timeout_ms': must be positive".into(),
            ));
        }
        options.io_timeout = Duration::from_millis(ms);
    }
    let bdevs = attach_pci(&p.name, &pci_addr, options)?;
    Ok(bdevs
        .into_iter()
        .map(|b| Arc::new(b) as Arc<dyn Bdev>)
        .collect())
}

/// Connects an NVMe/TCP controller; its namespaces become bdevs.
fn attach_tcp(
    p: &AttachParams,
    traddr: &str,
    trsvcid: u16,
    subnqn: &str,
) -> Result<Vec<Arc<dyn Bdev>>, CreateError> {
    let mut opts = crate::nvmf::host::HostOptions::new(traddr, trsvcid, subnqn);
    let mut params = serde_json::json!({
        "name": p.name, "trtype": "tcp", "traddr": traddr, "trsvcid": trsvcid, "subnqn": subnqn,
    });
    if p.dhchap_key.is_some() != p.dhchap.is_some() {
        // Never connect without the authentication a key asks for.
        return Err(CreateError::Params(
            "parameter 'dhchap_key': its secret was not read from the keyring".into(),
        ));
    }
    opts.dhchap = p.dhchap.clone();
    // The configuration names the keys, never their secrets.
    for (param, key) in [
        ("dhchap_key", &p.dhchap_key),
        ("dhchap_ctrlr_key", &p.dhchap_ctrlr_key),
    ] {
        if let Some(k) = key {
            params[param] = serde_json::json!(k);
        }
    }
    if let Some(h) = &p.hostnqn {
        crate::nvmf::fabrics::check_host_nqn(h)
            .map_err(|e| CreateError::Params(format!("parameter 'hostnqn': {e}")))?;
        opts.hostnqn = h.clone();
        params["hostnqn"] = serde_json::json!(h);
    }
    if let Some(ms) = p.io_timeout_ms {
        if ms == 0 {
            return Err(CreateError::Params(
                "parameter 'io_timeout_ms': must be positive".into(),
            ));
        }
        opts.io_timeout = Duration::from_millis(ms);
        params["io_timeout_ms"] = serde_json::json!(ms);
    }
    let config = serde_json::json!({ "method": "bdev_nvme_attach_controller", "params": params });
    let bdevs = crate::nvmf::attach(&p.name, opts, config)?;
    Ok(bdevs
        .into_iter()
        .map(|b| Arc::new(b) as Arc<dyn Bdev>)
        .collect())
}

/// Opens the controller at `pci_addr` through VFIO and gives a bdev per namespace.
pub fn attach_pci(
    name: &str,
    pci_addr: &str,
    options: ControllerOptions,
) -> Result<Vec<NvmeBdev>, BdevError> {
    let dev = vfio::VfioPci::open(pci_addr)?;
    let (ctrl, namespaces) = Controller::start(name, Arc::new(dev), options)?;
    if namespaces.is_empty() {
        return Err(BdevError::Invalid(format!(
            "controller {pci_addr} has no usable namespace"
        )));
    }
    let mut params = serde_json::json!({ "name": name, "pci_addr": pci_addr });
    if options.io_timeout != ControllerOptions::default().io_timeout {
        params["io_timeout_ms"] = serde_json::json!(options.io_timeout.as_millis() as u64);
    }
    let config = serde_json::json!({ "method": "bdev_nvme_attach_controller", "params": params });
    Ok(NvmeBdev::for_namespaces(&ctrl, &namespaces, config))
}
