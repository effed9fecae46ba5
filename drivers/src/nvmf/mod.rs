//! NVMe over Fabrics on TCP: the protocol ([`pdu`], [`fabrics`]) shared by quicksplit's target
//! (in the engine) and its initiator ([`host`]), which is both a bdev driver ([`NvmfBdev`],
//! through `bdev_nvme_attach_controller` with `trtype: "tcp"`) and the `nvmf` backup target
//! ([`crate::sink::nvmf`]).

/// The port NVMe/TCP uses unless told otherwise (IANA's for NVMe over Fabrics).
pub const DEFAULT_PORT: u16 = 4420;

pub mod auth;
mod channel;
pub mod fabrics;
pub mod host;
pub mod pdu;
pub mod port;

use std::sync::Arc;

use crate::bdev::{Bdev, BdevError, ChannelContext, Geometry, IoChannel};
use host::{HostController, HostOptions, NvmfError};

impl From<NvmfError> for BdevError {
    fn from(e: NvmfError) -> Self {
        match e {
            NvmfError::Io { what, source } => BdevError::Io { what, source },
            other => BdevError::Invalid(other.to_string()),
        }
    }
}

/// A namespace of a remote NVMe/TCP controller as a bdev. Its channels on a reactor share that
/// reactor's I/O queue on the controller (a TCP connection, connected when the first opens)
/// with every other channel there on the same controller (`channel.rs`).
pub struct NvmfBdev {
    name: String,
    ctrl: Arc<HostController>,
    nsid: u32,
    geometry: Geometry,
    config: serde_json::Value,
}

impl NvmfBdev {
    /// A bdev per namespace of `ctrl`, named `<name>n<nsid>`; `config` is the call that
    /// attaches the controller again.
    pub fn for_namespaces(
        name: &str,
        ctrl: &Arc<HostController>,
        config: serde_json::Value,
    ) -> Vec<NvmfBdev> {
        ctrl.namespaces()
            .iter()
            .enumerate()
            .map(|(i, ns)| NvmfBdev {
                name: format!("{name}n{}", ns.nsid),
                ctrl: Arc::clone(ctrl),
                nsid: ns.nsid,
                geometry: Geometry {
                    block_size: ns.block_size,
                    num_blocks: ns.blocks,
                },
                // The first bdev carries the controller's config; the others come with it.
                config: if i == 0 {
                    config.clone()
                } else {
                    serde_json::Value::Null
                },
            })
            .collect()
    }
}

/// Connects to the controller of `opts` and gives a bdev per namespace.
pub fn attach(
    name: &str,
    opts: HostOptions,
    config: serde_json::Value,
) -> Result<Vec<NvmfBdev>, BdevError> {
    let ctrl = HostController::connect(opts)?;
    if ctrl.namespaces().is_empty() {
        return Err(BdevError::Invalid(format!(
            "NVMe/TCP subsystem {} has no usable namespace",
            ctrl.options().subnqn
        )));
    }
    Ok(NvmfBdev::for_namespaces(name, &ctrl, config))
}

impl Bdev for NvmfBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &'static str {
        "nvmf"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn open_channel(&self, ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
        let ch = channel::NvmfChannel::open(&self.ctrl, self.nsid, self.geometry, ctx)?;
        Ok(Box::new(ch))
    }

    fn config(&self) -> serde_json::Value {
        self.config.clone()
    }
}
