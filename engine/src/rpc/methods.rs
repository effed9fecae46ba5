//! The RPC methods: parameters (declared once, as serde structs), and the glue from JSON to the
//! engine and back.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{codes, RpcError};
use crate::app::{Engine, EngineError};
use crate::backup::{Mode, Target};
use crate::nbd::{Address, NbdError};
use crate::pair::{PairConfig, PairError, DEFAULT_TRACK_SIZE};
use drivers::{BdevError, CreateError};

/// Every method, in the order `rpc_get_methods` lists them.
pub const METHODS: &[&str] = &[
    "bdev_malloc_create",
    "bdev_uring_create",
    "bdev_nvme_attach_controller",
    "bdev_nvme_detach_controller",
    "bdev_delete",
    "bdev_get_bdevs",
    "pair_create",
    "pair_split",
    "pair_resync",
    "pair_delete",
    "pair_get",
    "backup_start",
    "backup_get",
    "backup_cancel",
    "nbd_export_start",
    "nbd_export_stop",
    "nbd_get_exports",
    "nvmf_export_start",
    "nvmf_export_stop",
    "nvmf_get_exports",
    "framework_get_reactors",
    "save_config",
    "load_config",
    "rpc_get_methods",
];

impl From<BdevError> for RpcError {
    fn from(e: BdevError) -> Self {
        let code = match &e {
            BdevError::Exists(_) | BdevError::Claimed { .. } => codes::CONFLICT,
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
            EngineError::Nbd(n) => {
                let code = match &n {
                    NbdError::Exists(_) => codes::CONFLICT,
                    NbdError::NotFound(_) => codes::NOT_FOUND,
                    NbdError::Invalid(_) => codes::INVALID_PARAMS,
                    NbdError::Listen { .. } => codes::IO_ERROR,
                };
                RpcError::new(code, n.to_string())
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
}

fn forward() -> Direction {
    Direction::Forward
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadConfigParams {
    config: Vec<ConfigCall>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigCall {
    method: String,
    #[serde(default)]
    params: Value,
}

/// Methods that change the running configuration: after each success it is written to the
/// state directory.
const CHANGES_CONFIG: &[&str] = &[
    "bdev_malloc_create",
    "bdev_uring_create",
    "bdev_nvme_attach_controller",
    "bdev_nvme_detach_controller",
    "bdev_delete",
    "pair_create",
    "pair_delete",
    "nbd_export_start",
    "nbd_export_stop",
    "nvmf_export_start",
    "nvmf_export_stop",
    "load_config",
];

/// Runs `method` with `params`; keeps the configuration in the state directory up to date.
pub fn call(engine: &Engine, method: &str, p: Value) -> Result<Value, RpcError> {
    let result = dispatch(engine, method, p);
    // Saved after a failure too: a `load_config` that stopped at a bad entry has applied the
    // ones before it, and the file must say what runs.
    if CHANGES_CONFIG.contains(&method) {
        if let Err(e) = engine.persist_config() {
            tracing::error!(%e, "the configuration could not be saved in the state directory");
            if result.is_ok() {
                return Err(RpcError::new(
                    codes::IO_ERROR,
                    format!("{method} succeeded but the configuration could not be saved: {e}"),
                ));
            }
        }
    }
    result
}

fn dispatch(engine: &Engine, method: &str, p: Value) -> Result<Value, RpcError> {
    match method {
        "bdev_malloc_create" | "bdev_uring_create" => {
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
        "bdev_nvme_attach_controller" => Ok(json!(engine.nvme_attach(p)?)),
        "bdev_nvme_detach_controller" => {
            let p: NameParam = params(p)?;
            engine.nvme_detach(&p.name)?;
            Ok(json!(true))
        }
        "bdev_delete" => {
            let p: NameParam = params(p)?;
            engine.bdev_delete(&p.name)?;
            Ok(json!(true))
        }
        "bdev_get_bdevs" => {
            let p: OptionalName = params(p)?;
            let list = engine.state().bdevs.list(p.name.as_deref())?;
            Ok(json!(list))
        }
        "pair_create" => {
            let p: PairCreateParams = params(p)?;
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
        "pair_split" => {
            let p: SplitParams = params(p)?;
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
            let per_pair: Vec<Value> = names
                .iter()
                .zip(&out.pending_tracks)
                .map(|(n, t)| json!({"name": n, "pending_tracks": t}))
                .collect();
            Ok(json!({
                "split_at_ns": out.split_at_ns,
                "pending_tracks": out.pending_tracks.iter().sum::<u64>(),
                "pairs": per_pair,
                "engine_ns": out.engine_ns,
            }))
        }
        "pair_resync" => {
            let p: ResyncParams = params(p)?;
            engine.pair_resync(&p.name, p.direction == Direction::Reverse)?;
            Ok(json!(true))
        }
        "pair_delete" => {
            let p: NameParam = params(p)?;
            engine.pair_delete(&p.name)?;
            Ok(json!(true))
        }
        "pair_get" => {
            let p: OptionalName = params(p)?;
            Ok(json!(engine.pair_get(p.name.as_deref())?))
        }
        "backup_start" => {
            let p: BackupStartParams = params(p)?;
            let id = engine.backup_start_limited(&p.pair, p.mode, p.target, p.rate, p.host_rate)?;
            Ok(json!({ "id": id }))
        }
        "backup_get" => {
            let p: OptionalId = params(p)?;
            Ok(json!(engine.backup_get(p.id)?))
        }
        "backup_cancel" => {
            let p: IdParam = params(p)?;
            engine.backup_cancel(p.id)?;
            Ok(json!(true))
        }
        "nbd_export_start" => {
            let p: NbdExportParams = params(p)?;
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
                p.bdev.as_deref(),
                p.pair.as_deref(),
                p.writable,
                address,
            )?;
            Ok(json!(p.name))
        }
        "nbd_export_stop" => {
            let p: NameParam = params(p)?;
            engine.nbd().stop(&p.name).map_err(EngineError::from)?;
            Ok(json!(true))
        }
        "nbd_get_exports" => {
            let _: OptionalNothing = params(p)?;
            Ok(json!(engine.nbd().list()))
        }
        "nvmf_export_start" => {
            let p: NvmfExportParams = params(p)?;
            engine.nvmf_export_start(
                &p.nqn,
                p.bdev.as_deref(),
                p.pair.as_deref(),
                p.writable,
                p.listen.as_deref(),
            )?;
            Ok(json!(p.nqn))
        }
        "nvmf_export_stop" => {
            let p: NqnParam = params(p)?;
            engine.nvmf().stop(&p.nqn).map_err(EngineError::from)?;
            Ok(json!(true))
        }
        "nvmf_get_exports" => {
            let _: OptionalNothing = params(p)?;
            Ok(json!(engine.nvmf().list()))
        }
        "framework_get_reactors" => {
            let _: OptionalNothing = params(p)?;
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
            Ok(json!(list))
        }
        "save_config" => {
            let _: OptionalNothing = params(p)?;
            Ok(engine.save_config())
        }
        "load_config" => {
            let p: LoadConfigParams = params(p)?;
            load_config(engine, p)?;
            Ok(json!(true))
        }
        "rpc_get_methods" => {
            let _: OptionalNothing = params(p)?;
            Ok(json!(METHODS))
        }
        other => Err(RpcError::new(
            codes::METHOD_NOT_FOUND,
            format!("method '{other}' not found"),
        )),
    }
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
    target: Target,
    #[serde(default)]
    rate: u64,
    #[serde(default = "default_host_rate")]
    host_rate: u64,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NbdExportParams {
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NvmfExportParams {
    nqn: String,
    #[serde(default)]
    bdev: Option<String>,
    #[serde(default)]
    pair: Option<String>,
    #[serde(default)]
    writable: Option<bool>,
    #[serde(default)]
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NqnParam {
    nqn: String,
}

fn load_config(engine: &Engine, p: LoadConfigParams) -> Result<(), RpcError> {
    for (i, c) in p.config.into_iter().enumerate() {
        if matches!(c.method.as_str(), "load_config" | "save_config") {
            return Err(RpcError::new(
                codes::INVALID_PARAMS,
                format!("config entry {i}: '{}' cannot appear in a config", c.method),
            ));
        }
        let params = if c.params.is_null() {
            json!({})
        } else {
            c.params
        };
        dispatch(engine, &c.method, params).map_err(|e| RpcError {
            code: e.code,
            message: format!(
                "config entry {i} ({}): {} (entries before it are applied)",
                c.method, e.message
            ),
        })?;
    }
    Ok(())
}

/// Applies a configuration (what `save_config` returns) at startup and keeps it in the state
/// directory. Unlike the RPC, a failure saves nothing: the engine does not start, and the
/// configuration it was given must still be there, whole, for the next try.
pub fn apply_config(engine: &Engine, config: Value) -> Result<(), RpcError> {
    dispatch(engine, "load_config", config)?;
    engine.persist_config().map_err(|e| {
        RpcError::new(
            codes::IO_ERROR,
            format!("the configuration could not be saved in the state directory: {e}"),
        )
    })
}
