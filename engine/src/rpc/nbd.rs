//! The NBD export methods (`nbd_export_start`, `nbd_export_stop`, `nbd_get_exports`):
//! parameters and glue.

use serde::Deserialize;
use serde_json::{json, Value};

use super::nvmf::NoParams;
use super::{codes, RpcError};
use crate::app::{Engine, EngineError};
use crate::export::Address;

/// The export `nbd_export_stop` stops.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportName {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NbdExportParams {
    name: String,
    #[serde(default)]
    bdev: Option<String>,
    #[serde(default)]
    pair: Option<String>,
    #[serde(default)]
    writable: Option<bool>,
    #[serde(default)]
    socket: Option<std::path::PathBuf>,
    #[serde(default)]
    listen: Option<String>,
    /// Serve a listen address that is not loopback in clear.
    #[serde(default)]
    insecure: bool,
    /// Serve over TLS only.
    #[serde(default)]
    tls: Option<crate::nbd::tls::TlsParams>,
}

pub(super) fn nbd_export_start(engine: &Engine, p: NbdExportParams) -> Result<Value, RpcError> {
    let address = match (p.socket, p.listen) {
        (Some(s), None) => Some(Address::Unix(s)),
        (None, Some(l)) => Some(Address::Tcp(l)),
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(RpcError::new(
                codes::INVALID_PARAMS,
                "give at most one of 'socket' and 'listen'",
            ))
        }
    };
    engine.nbd_export_start(
        &p.name,
        (p.bdev.as_deref(), p.pair.as_deref()),
        p.writable,
        (address, p.insecure),
        p.tls,
    )?;
    Ok(json!(p.name))
}

pub(super) fn nbd_export_stop(engine: &Engine, p: ExportName) -> Result<Value, RpcError> {
    engine.nbd().stop(&p.name).map_err(EngineError::from)?;
    Ok(json!(true))
}

pub(super) fn nbd_get_exports(engine: &Engine, _: NoParams) -> Result<Value, RpcError> {
    Ok(json!(engine.nbd().list()))
}
