//! `load_config`: a configuration (what `save_config` returns) applied all or nothing.
//!
//! Each entry is a method that creates or starts something, so each has an inverse; a failing
//! entry undoes every entry before it, newest first, and the engine is as it was. Entries that
//! delete, stop or change something (`bdev_delete`, `pair_split`, ...) have no inverse and are
//! refused before anything is applied.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{codes, RpcError};
use crate::app::Engine;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoadConfigParams {
    config: Vec<ConfigCall>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigCall {
    method: String,
    #[serde(default)]
    params: Value,
}

/// The methods a configuration may hold: every one has an inverse.
const UNDOABLE: &[&str] = &[
    "keyring_file_add_key",
    "bdev_malloc_create",
    "bdev_uring_create",
    "bdev_nvme_attach_controller",
    "pair_create",
    "nbd_export_start",
    "nvmf_export_start",
];

/// How to take back one applied entry.
/// How an entry reaches its method: given by the method table, so this file does not import it.
pub(super) type Dispatch = fn(&Engine, &str, Value) -> Result<Value, RpcError>;

enum Undo {
    /// Call a method (`bdev_delete`, `nbd_export_stop`, ...).
    Call(&'static str, Value),
    /// Take the pair out but keep its metadata: it was there before the entry brought it back.
    UnloadPair(String),
    /// Remove a file the entry created.
    RemoveFile(PathBuf),
    /// Give a file the entry extended its old length back.
    Shorten(PathBuf, u64),
}

/// What exists at `path` before an entry opens it: the file's length, or nothing.
fn file_len(path: &std::path::Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// The inverse of `method` with `params`, worked out before it runs (what existed before
/// decides it): its steps in the order the entry's effects happen, taken back in reverse.
fn undo_for(engine: &Engine, method: &str, params: &Value) -> Vec<Undo> {
    let name = || params.get("name").cloned().unwrap_or(Value::Null);
    match method {
        "keyring_file_add_key" => vec![Undo::Call(
            "keyring_file_remove_key",
            json!({ "name": name() }),
        )],
        "bdev_malloc_create" => vec![Undo::Call("bdev_delete", json!({ "name": name() }))],
        "bdev_uring_create" => {
            let mut undo = Vec::new();
            if let Some(path) = params.get("filename").and_then(Value::as_str) {
                let path = PathBuf::from(path);
                match file_len(&path) {
                    None if !path.exists() => undo.push(Undo::RemoveFile(path)),
                    Some(len) => undo.push(Undo::Shorten(path, len)),
                    None => {}
                }
            }
            undo.push(Undo::Call("bdev_delete", json!({ "name": name() })));
            undo
        }
        "bdev_nvme_attach_controller" => vec![Undo::Call(
            "bdev_nvme_detach_controller",
            json!({ "name": name() }),
        )],
        "pair_create" => {
            let pair = params.get("name").and_then(Value::as_str).unwrap_or("");
            if !pair.is_empty() && engine.metadata_path(pair).exists() {
                vec![Undo::UnloadPair(pair.to_string())]
            } else {
                vec![Undo::Call("pair_delete", json!({ "name": name() }))]
            }
        }
        "nbd_export_start" => vec![Undo::Call("nbd_export_stop", json!({ "name": name() }))],
        "nvmf_export_start" => vec![Undo::Call(
            "nvmf_export_stop",
            json!({ "nqn": params.get("nqn").cloned().unwrap_or(Value::Null) }),
        )],
        _ => Vec::new(),
    }
}

/// Takes back `undo`, newest first. A step that fails is logged and the others still run:
/// leaving less behind is better than stopping at the first.
fn roll_back(engine: &Engine, dispatch: Dispatch, undo: Vec<Undo>) {
    for step in undo.into_iter().rev() {
        let outcome = match &step {
            Undo::Call(method, params) => dispatch(engine, method, params.clone())
                .map(|_| ())
                .map_err(|e| format!("{method} {params}: {}", e.message)),
            Undo::UnloadPair(name) => engine
                .pair_unload(name)
                .map_err(|e| format!("unloading pair '{name}': {e}")),
            Undo::RemoveFile(path) => {
                std::fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))
            }
            Undo::Shorten(path, len) => std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(*len))
                .map_err(|e| format!("giving {} its length back: {e}", path.display())),
        };
        if let Err(e) = outcome {
            tracing::error!(%e, "load_config roll back: a step failed");
        }
    }
}

/// `load_config`: every entry, or none.
pub(super) fn load_config(
    engine: &Engine,
    p: LoadConfigParams,
    dispatch: Dispatch,
) -> Result<Value, RpcError> {
    for (i, c) in p.config.iter().enumerate() {
        if !UNDOABLE.contains(&c.method.as_str()) {
            return Err(RpcError::new(
                codes::INVALID_PARAMS,
                format!(
                    "config entry {i}: '{}' cannot appear in a configuration (it holds only \
                     methods that create or start something: {}); nothing was applied",
                    c.method,
                    UNDOABLE.join(", ")
                ),
            ));
        }
    }
    let mut undo = Vec::new();
    for (i, c) in p.config.into_iter().enumerate() {
        let params = if c.params.is_null() {
            json!({})
        } else {
            c.params
        };
        let inverse = undo_for(engine, &c.method, &params);
        if let Err(e) = dispatch(engine, &c.method, params) {
            roll_back(engine, dispatch, undo);
            return Err(RpcError {
                code: e.code,
                message: format!(
                    "config entry {i} ({}): {}; nothing of the configuration was applied",
                    c.method, e.message
                ),
            });
        }
        undo.extend(inverse);
    }
    Ok(json!(true))
}
