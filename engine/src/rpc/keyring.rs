//! The keyring methods (`keyring_file_add_key`, `keyring_file_remove_key`,
//! `keyring_get_keys`, as SPDK's): parameters and glue. No result holds a secret.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use super::RpcError;
use crate::app::Engine;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddKeyParams {
    name: String,
    path: PathBuf,
}

pub(super) fn keyring_file_add_key(engine: &Engine, p: AddKeyParams) -> Result<Value, RpcError> {
    engine.keyring_file_add_key(&p.name, &p.path)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoveKeyParams {
    name: String,
}

pub(super) fn keyring_file_remove_key(
    engine: &Engine,
    p: RemoveKeyParams,
) -> Result<Value, RpcError> {
    engine.keyring_file_remove_key(&p.name)?;
    Ok(json!(true))
}

/// Parameters of a method that takes none.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoParams {}

pub(super) fn keyring_get_keys(engine: &Engine, _: NoParams) -> Result<Value, RpcError> {
    Ok(json!(engine.keyring_get_keys()))
}
