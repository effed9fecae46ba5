//! The NVMe/TCP export methods (`nvmf_export_start`, `nvmf_export_stop`, `nvmf_get_exports`,
//! `nvmf_export_add_host`, `nvmf_export_remove_host`) and the DH-HMAC-CHAP key names an
//! initiator (the `nvmf` backup target) is given: parameters and glue.

use std::sync::Arc;

use drivers::nvmf::auth::HostKeys;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{codes, RpcError};
use crate::app::{Engine, EngineError};
use crate::backup::Target;
use crate::nvmf::hosts::{self, AllowedHost};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NvmfExportParams {
    nqn: String,
    #[serde(default)]
    bdev: Option<String>,
    #[serde(default)]
    pair: Option<String>,
    #[serde(default)]
    writable: Option<bool>,
    /// `"host:port"` or SPDK's listen address object (see [`crate::nvmf::listen_address`]).
    #[serde(default)]
    listen: Option<Value>,
    /// Host NQNs, or `{nqn, dhchap_key?, dhchap_ctrlr_key?}`.
    #[serde(default)]
    hosts: Vec<Value>,
    #[serde(default)]
    allow_any_host: Option<bool>,
}

pub(super) fn nvmf_export_start(engine: &Engine, p: NvmfExportParams) -> Result<Value, RpcError> {
    let listen = p
        .listen
        .as_ref()
        .map(crate::nvmf::listen_address)
        .transpose()
        .map_err(EngineError::from)?;
    let hosts = p
        .hosts
        .into_iter()
        .map(hosts::host_from_json)
        .collect::<Result<Vec<_>, _>>()
        .map_err(EngineError::from)?;
    engine.nvmf_export_start(
        &p.nqn,
        (p.bdev.as_deref(), p.pair.as_deref()),
        p.writable,
        listen.as_deref(),
        (hosts, p.allow_any_host),
    )?;
    Ok(json!(p.nqn))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NqnParam {
    nqn: String,
}

pub(super) fn nvmf_export_stop(engine: &Engine, p: NqnParam) -> Result<Value, RpcError> {
    engine.nvmf().stop(&p.nqn).map_err(EngineError::from)?;
    Ok(json!(true))
}

/// Parameters of a method that takes none.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoParams {}

pub(super) fn nvmf_get_exports(engine: &Engine, _: NoParams) -> Result<Value, RpcError> {
    Ok(json!(engine.nvmf().list()))
}

/// `nvmf_export_add_host` (SPDK's `nvmf_subsystem_add_host`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddHostParams {
    nqn: String,
    host: String,
    #[serde(default)]
    dhchap_key: Option<String>,
    #[serde(default)]
    dhchap_ctrlr_key: Option<String>,
}

pub(super) fn nvmf_export_add_host(engine: &Engine, p: AddHostParams) -> Result<Value, RpcError> {
    let host = AllowedHost {
        nqn: p.host,
        dhchap_key: p.dhchap_key,
        dhchap_ctrlr_key: p.dhchap_ctrlr_key,
    };
    engine.nvmf_export_add_host(&p.nqn, host)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoveHostParams {
    nqn: String,
    host: String,
}

pub(super) fn nvmf_export_remove_host(
    engine: &Engine,
    p: RemoveHostParams,
) -> Result<Value, RpcError> {
    engine.nvmf_export_remove_host(&p.nqn, &p.host)?;
    Ok(json!(true))
}

/// The DH-HMAC-CHAP keys an initiator's parameters name (`bdev_nvme_attach_controller`),
/// read from the keyring.
pub(super) fn initiator_keys(
    engine: &Engine,
    params: &Value,
) -> Result<Option<Arc<HostKeys>>, RpcError> {
    let mut names = [None, None];
    for (slot, param) in names.iter_mut().zip(["dhchap_key", "dhchap_ctrlr_key"]) {
        *slot = match params.get(param) {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(other) => {
                return Err(RpcError::new(
                    codes::INVALID_PARAMS,
                    format!("parameter '{param}': a key name, not {other}"),
                ))
            }
        };
    }
    Ok(engine.dhchap_keys(names[0], names[1])?)
}

/// A backup target from `backup_start`'s `target`: an `nvmf` target's `dhchap_key` and
/// `dhchap_ctrlr_key` name keyring keys, read now.
pub(super) fn backup_target(engine: &Engine, target: Value) -> Result<Target, RpcError> {
    let keys = match target.get("type").and_then(Value::as_str) {
        Some("nvmf") => initiator_keys(engine, &target)?,
        _ => None,
    };
    let mut target: Target = serde_json::from_value(target)
        .map_err(|e| RpcError::new(codes::INVALID_PARAMS, format!("parameter 'target': {e}")))?;
    if let Target::Nvmf { dhchap, .. } = &mut target {
        *dhchap = keys;
    }
    Ok(target)
}
