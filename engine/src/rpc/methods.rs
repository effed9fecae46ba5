//! The RPC methods: parameters (declared once, as serde structs), and the glue from JSON to the
//! engine and back.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::audit::Audit;
use super::config::LoadConfigParams;
use super::{codes, keyring, nbd, nvmf, RpcError};
use crate::app::{Engine, EngineError};
use crate::backup::Mode;
use crate::export::ExportError;
use crate::keyring::KeyringError;
use crate::logging::{self, LogError};
use crate::pair::{PairConfig, PairError, DEFAULT_TRACK_SIZE};
use drivers::{BdevError, CreateError};

/// One RPC method: its name, whether a call changes the engine's state (it is then logged at
/// info with its parameters and result) and whether a success changes the running
/// configuration (which is then written to the state directory), the parameters never to log
/// beyond those `audit` hides by name, and its handler, whose second argument is the type its
/// parameters are parsed into.
pub struct Method {
    /// The method's name.
    pub name: &'static str,
    /// A call changes the engine's state: what it serves, a pair's state, a job.
    pub changes_state: bool,
    /// A success changes the running configuration.
    pub changes_config: bool,
    /// Parameters whose values are never logged, at any depth (besides every name containing
    /// `key`, `secret`, `psk` or `password`).
    pub redact: &'static [&'static str],
    call: fn(&Engine, Value) -> Result<Value, RpcError>,
}

/// A [`Method`] entry: parses the parameters into the handler's parameter type, then runs it.
/// `changes_state` marks a method whose calls change the engine's state, `changes_config` one
/// that also changes the configuration; `redact = [...]` names parameters to keep out of logs.
macro_rules! method {
    ($name:literal, $handler:path) => {
        method!(@ $name, $handler, false, false, [])
    };
    ($name:literal, $handler:path, changes_state $(, redact = [$($r:literal),*])?) => {
        method!(@ $name, $handler, true, false, [$($($r),*)?])
    };
    ($name:literal, $handler:path, changes_config $(, redact = [$($r:literal),*])?) => {
        method!(@ $name, $handler, true, true, [$($($r),*)?])
    };
    (@ $name:literal, $handler:path, $state:expr, $config:expr, [$($r:literal),*]) => {
        Method {
            name: $name,
            changes_state: $state,
            changes_config: $config,
            redact: &[$($r),*],
            call: |engine, p| $handler(engine, params(p)?),
        }
    };
}

/// Every method, in the order `rpc_get_methods` lists them: the one place a method is declared.
pub static METHODS: &[Method] = &[
    method!("bdev_malloc_create", bdev_malloc_create, changes_config),
    method!("bdev_uring_create", bdev_uring_create, changes_config),
    method!(
        "bdev_nvme_attach_controller",
        bdev_nvme_attach_controller,
        changes_config
    ),
    method!(
        "bdev_nvme_detach_controller",
        bdev_nvme_detach_controller,
        changes_config
    ),
    method!("bdev_delete", bdev_delete, changes_config),
    method!("bdev_get_bdevs", bdev_get_bdevs),
    method!("bdev_get_iostat", bdev_get_iostat),
    method!("pair_create", pair_create, changes_config),
    method!("pair_split", pair_split, changes_state),
    method!("pair_resync", pair_resync, changes_state),
    method!("pair_delete", pair_delete, changes_config),
    method!("pair_get", pair_get),
    method!("backup_start", backup_start, changes_state),
    method!("backup_get", backup_get),
    method!("backup_cancel", backup_cancel, changes_state),
    method!("checkpoint_list", checkpoint_list),
    method!("checkpoint_delete", checkpoint_delete, changes_state),
    method!("pair_verify", pair_verify, changes_state),
    method!("verify_get", verify_get),
    method!("verify_cancel", verify_cancel, changes_state),
    method!("nbd_export_start", nbd::nbd_export_start, changes_config),
    method!("nbd_export_stop", nbd::nbd_export_stop, changes_config),
    method!("nbd_get_exports", nbd::nbd_get_exports),
    method!("nvmf_export_start", nvmf::nvmf_export_start, changes_config),
    method!("nvmf_export_stop", nvmf::nvmf_export_stop, changes_config),
    method!("nvmf_get_exports", nvmf::nvmf_get_exports),
    method!(
        "nvmf_export_add_host",
        nvmf::nvmf_export_add_host,
        changes_config
    ),
    method!(
        "nvmf_export_remove_host",
        nvmf::nvmf_export_remove_host,
        changes_config
    ),
    method!(
        "keyring_file_add_key",
        keyring::keyring_file_add_key,
        changes_config
    ),
    method!(
        "keyring_file_remove_key",
        keyring::keyring_file_remove_key,
        changes_config
    ),
    method!("keyring_get_keys", keyring::keyring_get_keys),
    method!("framework_get_reactors", framework_get_reactors),
    method!("save_config", save_config),
    method!("load_config", load_config, changes_config),
    method!("log_set_level", log_set_level, changes_state),
    method!("log_get_level", log_get_level),
    method!("rpc_get_methods", rpc_get_methods),
];

/// The method named `name`.
pub fn method(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

impl From<BdevError> for RpcError {
    fn from(e: BdevError) -> Self {
        let code = match &e {
            BdevError::Exists(_) | BdevError::Claimed { .. } | BdevError::Locked(_) => {
                codes::CONFLICT
            }
            BdevError::NotFound(_) => codes::NOT_FOUND,
            BdevError::Invalid(_) => codes::INVALID_PARAMS,
            BdevError::Io { .. } => codes::IO_ERROR,
            BdevError::Dma(_) => codes::FAILED,
            BdevError::Unavailable(_) => codes::UNAVAILABLE,
        };
        RpcError::new(code, e.to_string())
    }
}

impl From<PairError> for RpcError {
    fn from(e: PairError) -> Self {
        let code = match &e {
            PairError::Invalid(_) => codes::INVALID_PARAMS,
            PairError::WrongState { .. } => codes::WRONG_STATE,
            PairError::NotFound(_) => codes::NOT_FOUND,
            PairError::Stopping => codes::FAILED,
        };
        RpcError::new(code, e.to_string())
    }
}

impl From<EngineError> for RpcError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Bdev(b) => b.into(),
            EngineError::Pair(p) => p.into(),
            EngineError::Reactor(r) => RpcError::new(codes::FAILED, r.to_string()),
            EngineError::InUse(m) => RpcError::new(codes::CONFLICT, m),
            EngineError::NotFound(m) => RpcError::new(codes::NOT_FOUND, m),
            EngineError::Unavailable(m) => RpcError::new(codes::UNAVAILABLE, m),
            e @ EngineError::Target(_) => RpcError::new(codes::IO_ERROR, e.to_string()),
            EngineError::Keyring(k) => {
                let code = match &k {
                    KeyringError::BadName(_)
                    | KeyringError::BadFile { .. }
                    | KeyringError::Unusable { .. } => codes::INVALID_PARAMS,
                    KeyringError::Exists(_) | KeyringError::InUse { .. } => codes::CONFLICT,
                    KeyringError::NotFound(_) => codes::NOT_FOUND,
                };
                RpcError::new(code, k.to_string())
            }
            EngineError::Export(x) => {
                let code = match &x {
                    ExportError::Exists { .. } => codes::CONFLICT,
                    ExportError::NotFound { .. } => codes::NOT_FOUND,
                    ExportError::Invalid(_) => codes::INVALID_PARAMS,
                    ExportError::Listen { .. } => codes::IO_ERROR,
                };
                RpcError::new(code, x.to_string())
            }
        }
    }
}

impl From<CreateError> for RpcError {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::Params(m) => RpcError::new(codes::INVALID_PARAMS, m),
            CreateError::Bdev(b) => b.into(),
        }
    }
}

fn params<T: serde::de::DeserializeOwned>(p: Value) -> Result<T, RpcError> {
    drivers::table::parse_params(p).map_err(RpcError::from)
}

fn unavailable(what: &str) -> RpcError {
    RpcError::new(
        codes::UNAVAILABLE,
        format!("{what} is not part of this build of quicksplit yet"),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameParam {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptionalName {
    #[serde(default)]
    name: Option<String>,
}

/// Parameters of `pair_create`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairCreateParams {
    /// Pair name.
    pub name: String,
    /// Primary bdev.
    pub primary: String,
    /// Secondary bdev.
    pub secondary: String,
    /// Track size in bytes.
    #[serde(default = "default_track_size")]
    pub track_size: u64,
    /// Copy rate in bytes per second (0 = unlimited).
    #[serde(default)]
    pub copy_rate: u64,
}

fn default_track_size() -> u64 {
    DEFAULT_TRACK_SIZE
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitParams {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    names: Option<Vec<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Direction {
    Forward,
    Reverse,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResyncParams {
    name: String,
    #[serde(default = "forward")]
    direction: Direction,
    #[serde(default)]
    full: bool,
}

fn forward() -> Direction {
    Direction::Forward
}

/// Runs `method` with `params`; keeps the configuration in the state directory up to date and
/// logs the call (see [`super::audit`]).
pub fn call(engine: &Engine, method: &str, p: Value) -> Result<Value, RpcError> {
    let Some(m) = self::method(method) else {
        tracing::debug!(method, "rpc call of an unknown method");
        return dispatch(engine, method, p);
    };
    let audit = Audit::new(m.name, m.changes_state, m.redact, &p);
    let touched = touched_by(m.name, &p);
    let result = persisted(engine, m, touched, dispatch(engine, method, p));
    audit.record(&result);
    result
}

/// The one object a call of `method` changes in the configuration, by kind and name; `None`
/// when it may change more (or its name is not given), and the whole configuration is compared.
fn touched_by(method: &str, p: &Value) -> Option<(&'static str, String)> {
    let kind = match method {
        "bdev_malloc_create" | "bdev_uring_create" => "bdev",
        "bdev_nvme_attach_controller" | "bdev_nvme_detach_controller" => "nvme",
        "pair_create" | "pair_delete" => "pair",
        "nbd_export_start" | "nbd_export_stop" => "nbd",
        "nvmf_export_start"
        | "nvmf_export_stop"
        | "nvmf_export_add_host"
        | "nvmf_export_remove_host" => "nvmf",
        "keyring_file_add_key" | "keyring_file_remove_key" => "key",
        // bdev_delete may take an NVMe namespace (its controller's call), load_config anything.
        _ => return None,
    };
    let name = p
        .get(if kind == "nvmf" { "nqn" } else { "name" })?
        .as_str()?;
    Some((kind, name.to_string()))
}

/// A call's result once the configuration is saved after a method that changes it.
fn persisted(
    engine: &Engine,
    m: &Method,
    touched: Option<(&'static str, String)>,
    result: Result<Value, RpcError>,
) -> Result<Value, RpcError> {
    // Saved after a failure too: the file must say what runs, whatever the failure left.
    if m.changes_config {
        if let Err(e) = engine.persist_change(touched) {
            tracing::error!(%e, "the configuration could not be saved in the state directory");
            if result.is_ok() {
                return Err(RpcError::new(
                    codes::IO_ERROR,
                    format!(
                        "{} succeeded but the configuration could not be saved: {e}",
                        m.name
                    ),
                ));
            }
        }
    }
    result
}

/// Applies a configuration at startup and keeps it in the state directory. A failure saves
/// nothing: the engine does not start, and the configuration it was given must still be there,
/// whole, for the next try.
pub fn apply_config(engine: &Engine, config: Value) -> Result<(), RpcError> {
    dispatch(engine, "load_config", config)?;
    engine.persist_config().map_err(|e| {
        RpcError::new(
            codes::IO_ERROR,
            format!("the configuration could not be saved in the state directory: {e}"),
        )
    })
}

fn load_config(engine: &Engine, p: LoadConfigParams) -> Result<Value, RpcError> {
    super::config::load_config(engine, p, dispatch)
}

fn dispatch(engine: &Engine, method: &str, p: Value) -> Result<Value, RpcError> {
    match self::method(method) {
        Some(m) => (m.call)(engine, p),
        None => Err(RpcError::new(
            codes::METHOD_NOT_FOUND,
            format!("method '{method}' not found"),
        )),
    }
}

/// A driver's create method: its parameters are declared by the driver (see
/// `drivers::table::register`).
fn bdev_create(engine: &Engine, method: &str, p: Value) -> Result<Value, RpcError> {
    if let Some(f) = p.get("filename").and_then(Value::as_str) {
        engine.check_bdev_file(std::path::Path::new(f))?;
    }
    let create = engine
        .state()
        .drivers
        .get(method)
        .ok_or_else(|| unavailable(method))?;
    let bdev = create(p)?;
    let name = bdev.name().to_string();
    engine.bdev_add(bdev)?;
    Ok(json!(name))
}

fn bdev_malloc_create(engine: &Engine, p: Value) -> Result<Value, RpcError> {
    bdev_create(engine, "bdev_malloc_create", p)
}

fn bdev_uring_create(engine: &Engine, p: Value) -> Result<Value, RpcError> {
    bdev_create(engine, "bdev_uring_create", p)
}

/// Its parameters are the driver's (`drivers::nvme::rpc::AttachParams`).
fn bdev_nvme_attach_controller(engine: &Engine, p: Value) -> Result<Value, RpcError> {
    let keys = nvmf::initiator_keys(engine, &p)?;
    Ok(json!(engine.nvme_attach(p, keys)?))
}

fn bdev_nvme_detach_controller(engine: &Engine, p: NameParam) -> Result<Value, RpcError> {
    engine.nvme_detach(&p.name)?;
    Ok(json!(true))
}

fn bdev_delete(engine: &Engine, p: NameParam) -> Result<Value, RpcError> {
    engine.bdev_delete(&p.name)?;
    Ok(json!(true))
}

fn bdev_get_bdevs(engine: &Engine, p: OptionalName) -> Result<Value, RpcError> {
    let list = engine.state().bdevs.list(p.name.as_deref())?;
    Ok(json!(list))
}

fn bdev_get_iostat(engine: &Engine, p: OptionalName) -> Result<Value, RpcError> {
    let bdevs = engine.state().bdevs.iostat(p.name.as_deref())?;
    Ok(json!({
        "tick_rate": drivers::iostat::tick_rate(),
        "ticks": drivers::iostat::ticks(),
        "bdevs": bdevs,
    }))
}

fn pair_create(engine: &Engine, p: PairCreateParams) -> Result<Value, RpcError> {
    engine.pair_create(
        &PairConfig {
            name: p.name.clone(),
            track_size: p.track_size,
            copy_rate: p.copy_rate,
        },
        &p.primary,
        &p.secondary,
    )?;
    Ok(json!(p.name))
}

fn pair_split(engine: &Engine, p: SplitParams) -> Result<Value, RpcError> {
    let names = match (p.name, p.names) {
        (Some(n), None) => vec![n],
        (None, Some(ns)) if !ns.is_empty() => ns,
        _ => {
            return Err(RpcError::new(
                codes::INVALID_PARAMS,
                "give either 'name' or a non-empty 'names'",
            ))
        }
    };
    let out = engine.pair_split(&names)?;
    let total: u64 = out.pending_tracks.iter().sum();
    // Built by moving values in: `json!` would serialize a group's thousand entries again.
    let per_pair: Vec<Value> = names
        .into_iter()
        .zip(out.pending_tracks)
        .map(|(name, tracks)| {
            let mut entry = Map::new();
            entry.insert("name".into(), Value::String(name));
            entry.insert("pending_tracks".into(), tracks.into());
            Value::Object(entry)
        })
        .collect();
    let mut reply = Map::new();
    reply.insert("split_at_ns".into(), out.split_at_ns.into());
    reply.insert("pending_tracks".into(), total.into());
    reply.insert("pairs".into(), Value::Array(per_pair));
    reply.insert("engine_ns".into(), out.engine_ns.into());
    Ok(Value::Object(reply))
}

fn pair_resync(engine: &Engine, p: ResyncParams) -> Result<Value, RpcError> {
    engine.pair_resync_with(&p.name, p.direction == Direction::Reverse, p.full)?;
    Ok(json!(true))
}

fn pair_delete(engine: &Engine, p: NameParam) -> Result<Value, RpcError> {
    engine.pair_delete(&p.name)?;
    Ok(json!(true))
}

fn pair_get(engine: &Engine, p: OptionalName) -> Result<Value, RpcError> {
    Ok(json!(engine.pair_get(p.name.as_deref())?))
}

fn backup_start(engine: &Engine, p: BackupStartParams) -> Result<Value, RpcError> {
    let opts = crate::backup::Options {
        rate: p.rate,
        host_rate: p.host_rate,
        flat_sha256: p.flat_sha256,
        checkpoint: p.checkpoint,
        since: p.since,
    };
    let target = nvmf::backup_target(engine, p.target)?;
    let id = engine.backup_start_with(&p.pair, p.mode, target, opts)?;
    Ok(json!({ "id": id }))
}

fn checkpoint_list(engine: &Engine, p: CheckpointListParams) -> Result<Value, RpcError> {
    Ok(json!(engine.checkpoint_list(p.pair.as_deref())?))
}

fn checkpoint_delete(engine: &Engine, p: CheckpointParams) -> Result<Value, RpcError> {
    engine.checkpoint_delete(&p.pair, &p.name)?;
    Ok(json!(true))
}

fn backup_get(engine: &Engine, p: OptionalId) -> Result<Value, RpcError> {
    Ok(json!(engine.backup_get(p.id)?))
}

fn backup_cancel(engine: &Engine, p: IdParam) -> Result<Value, RpcError> {
    engine.backup_cancel(p.id)?;
    Ok(json!(true))
}

fn pair_verify(engine: &Engine, p: VerifyParams) -> Result<Value, RpcError> {
    let params = crate::verify::VerifyParams {
        repair: p.repair,
        rate: p.rate,
        host_rate: p.host_rate,
    };
    let id = engine.verify_start(&p.name, params)?;
    Ok(json!({ "id": id }))
}

fn verify_get(engine: &Engine, p: OptionalId) -> Result<Value, RpcError> {
    Ok(json!(engine.verify_get(p.id)?))
}

fn verify_cancel(engine: &Engine, p: IdParam) -> Result<Value, RpcError> {
    engine.verify_cancel(p.id)?;
    Ok(json!(true))
}

fn framework_get_reactors(engine: &Engine, _: OptionalNothing) -> Result<Value, RpcError> {
    let list: Vec<Value> = engine
        .reactors()
        .handles()
        .iter()
        .map(|r| {
            let s = r.stats();
            json!({
                "core": r.core(),
                "numa_node": r.numa_node(),
                "busy_ns": s.busy_ns.load(std::sync::atomic::Ordering::Relaxed),
                "idle_ns": s.idle_ns.load(std::sync::atomic::Ordering::Relaxed),
                "pollers": r.poller_names(),
            })
        })
        .collect();
    Ok(Value::Array(list))
}

fn save_config(engine: &Engine, _: OptionalNothing) -> Result<Value, RpcError> {
    Ok(engine.save_config())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelParam {
    level: String,
}

fn log_error(e: LogError) -> RpcError {
    match &e {
        LogError::Invalid(_) => {
            RpcError::new(codes::INVALID_PARAMS, format!("parameter 'level': {e}"))
        }
        LogError::NotInstalled => RpcError::new(codes::UNAVAILABLE, e.to_string()),
        LogError::Reload(_) => RpcError::new(codes::FAILED, e.to_string()),
    }
}

/// Gives the filter now in force.
fn log_set_level(_: &Engine, p: LevelParam) -> Result<Value, RpcError> {
    Ok(json!(logging::set_level(&p.level).map_err(log_error)?))
}

fn log_get_level(_: &Engine, _: OptionalNothing) -> Result<Value, RpcError> {
    Ok(json!(logging::level().map_err(log_error)?))
}

fn rpc_get_methods(_: &Engine, _: OptionalNothing) -> Result<Value, RpcError> {
    Ok(json!(METHODS.iter().map(|m| m.name).collect::<Vec<_>>()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptionalNothing {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupStartParams {
    pair: String,
    #[serde(default = "merge")]
    mode: Mode,
    /// A [`crate::backup::Target`], once an `nvmf` target's key names are checked.
    target: Value,
    #[serde(default)]
    rate: u64,
    #[serde(default = "default_host_rate")]
    host_rate: u64,
    /// Compute the flat SHA-256 of the image besides its tree digest.
    #[serde(default)]
    flat_sha256: bool,
    #[serde(default)]
    checkpoint: Option<String>,
    /// Store only the tracks changed since this checkpoint.
    #[serde(default)]
    since: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointListParams {
    #[serde(default)]
    pair: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointParams {
    pair: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    name: String,
    #[serde(default)]
    repair: bool,
    #[serde(default)]
    rate: u64,
    #[serde(default = "default_verify_host_rate")]
    host_rate: u64,
}

fn default_verify_host_rate() -> u64 {
    crate::verify::DEFAULT_HOST_RATE
}

fn default_host_rate() -> u64 {
    crate::backup::DEFAULT_HOST_RATE
}

fn merge() -> Mode {
    Mode::Merge
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptionalId {
    #[serde(default)]
    id: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdParam {
    id: u64,
}
