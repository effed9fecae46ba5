//! The JSON-RPC 2.0 control plane on a Unix socket.
//!
//! Requests arrive back to back or newline-separated (as SPDK's rpc.py sends them), or as
//! JSON-RPC batches; replies go out in order on each connection. Each connection has its own
//! thread, off the reactors, so a slow, silent or half-open client holds only its own thread
//! (and is dropped after [`IDLE_TIMEOUT`]); the number of connections is bounded. A request
//! larger than [`MAX_REQUEST`] or that is not JSON gets its error reply and the connection is
//! closed, since the byte stream cannot be resynchronised after it.

pub mod audit;
pub mod client;
pub mod config;
mod keyring;
pub mod methods;
mod nbd;
mod nvmf;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::app::Engine;

/// Largest request accepted.
pub const MAX_REQUEST: usize = 1 << 20;
/// Connections served at once; more are refused with an error reply.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// JSON-RPC error codes.
pub mod codes {
    /// Not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// JSON but not a request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The operation failed (generic).
    pub const FAILED: i64 = -32000;
    /// A named object does not exist.
    pub const NOT_FOUND: i64 = -32001;
    /// A name is taken or an object is in use.
    pub const CONFLICT: i64 = -32002;
    /// The object's state does not allow the operation.
    pub const WRONG_STATE: i64 = -32003;
    /// The driver or feature is not part of this build.
    pub const UNAVAILABLE: i64 = -32004;
    /// The OS or a device reported an error.
    pub const IO_ERROR: i64 = -32005;
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// JSON-RPC code.
    pub code: i64,
    /// Message for people.
    pub message: String,
}

impl RpcError {
    /// An error with a code and message.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The running server: stops accepting and removes its socket when dropped.
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl RpcServer {
    /// Binds `path` (mode 0600; an existing stale socket is replaced) and serves `engine`.
    pub fn start(engine: Arc<Engine>, path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        crate::export::listener::clear_stale_socket(path)?;
        let listener = bind_private(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("rpc_accept".into())
            .spawn(move || accept_loop(listener, engine, stop2))?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            accept: Some(accept),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds with a umask that makes the socket 0600 from its first instant, then checks the mode.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn accept_loop(listener: UnixListener, engine: Arc<Engine>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    let _ = stream.set_nonblocking(false);
                    let reply = error_reply(
                        Value::Null,
                        &RpcError::new(codes::FAILED, "too many RPC connections"),
                    );
                    let _ = stream.write_all(reply.to_string().as_bytes());
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (engine, active2, stop2) =
                    (Arc::clone(&engine), Arc::clone(&active), Arc::clone(&stop));
                let peer = crate::export::listener::peer_of(&stream);
                let spawned =
                    std::thread::Builder::new()
                        .name("rpc_conn".into())
                        .spawn(move || {
                            // The client's calls log within this span, naming who made them.
                            let span = tracing::info_span!("rpc_client", peer = peer.as_str());
                            span.in_scope(|| {
                                tracing::debug!("RPC connection opened");
                                let reason = serve_connection(stream, &engine, &stop2);
                                tracing::debug!(reason, "RPC connection closed");
                            });
                            active2.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::error!("cannot start an RPC connection thread");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(%e, "RPC accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// What parsing the buffered bytes gave.
enum Parsed {
    /// A complete JSON value and the bytes it used.
    Value(Value, usize),
    /// More bytes are needed.
    Incomplete,
    /// Not JSON: reply and close.
    Invalid(String),
}

fn parse_next(buf: &[u8]) -> Parsed {
    let start = buf
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(buf.len());
    if start == buf.len() {
        return Parsed::Incomplete;
    }
    let mut stream = serde_json::Deserializer::from_slice(&buf[start..]).into_iter::<Value>();
    match stream.next() {
        Some(Ok(v)) => Parsed::Value(v, start + stream.byte_offset()),
        Some(Err(e)) if e.is_eof() => Parsed::Incomplete,
        Some(Err(e)) => Parsed::Invalid(e.to_string()),
        None => Parsed::Incomplete,
    }
}

/// Serves one connection until it ends; gives why it ended.
fn serve_connection(mut stream: UnixStream, engine: &Engine, stop: &AtomicBool) -> &'static str {
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .is_err()
    {
        return "error: the socket could not be set up";
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut idle = Duration::ZERO;
    loop {
        // Answer every complete request already buffered, in order.
        loop {
            match parse_next(&buf) {
                Parsed::Value(v, used) => {
                    buf.drain(..used);
                    if let Some(reply) = handle_value(engine, v) {
                        let mut out = reply.to_string();
                        out.push('\n');
                        if stream.write_all(out.as_bytes()).is_err() {
                            return "client closed before its reply";
                        }
                    }
                }
                Parsed::Incomplete => break,
                Parsed::Invalid(msg) => {
                    let reply = error_reply(
                        Value::Null,
                        &RpcError::new(codes::PARSE_ERROR, format!("parse error: {msg}")),
                    );
                    let _ = stream.write_all(format!("{reply}\n").as_bytes());
                    return "error: not JSON";
                }
            }
        }
        if buf.len() > MAX_REQUEST {
            let reply = error_reply(
                Value::Null,
                &RpcError::new(
                    codes::INVALID_REQUEST,
                    format!("request larger than {MAX_REQUEST} bytes"),
                ),
            );
            let _ = stream.write_all(format!("{reply}\n").as_bytes());
            return "error: request too large";
        }
        if stop.load(Ordering::SeqCst) {
            return "stop";
        }
        match stream.read(&mut chunk) {
            Ok(0) => return "client closed",
            Ok(n) => {
                idle = Duration::ZERO;
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                idle += Duration::from_millis(500);
                if idle >= IDLE_TIMEOUT {
                    return "idle";
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return "error: read failed",
        }
    }
}

/// Handles one JSON value (a request, a notification or a batch); `None` when nothing is owed.
pub fn handle_value(engine: &Engine, v: Value) -> Option<Value> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Some(error_reply(
                    Value::Null,
                    &RpcError::new(codes::INVALID_REQUEST, "empty batch"),
                ));
            }
            let replies: Vec<Value> = items
                .into_iter()
                .filter_map(|i| handle_request(engine, i))
                .collect();
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        other => handle_request(engine, other),
    }
}

fn handle_request(engine: &Engine, v: Value) -> Option<Value> {
    let Value::Object(mut obj) = v else {
        return Some(error_reply(
            Value::Null,
            &RpcError::new(codes::INVALID_REQUEST, "a request must be a JSON object"),
        ));
    };
    let id = obj.remove("id");
    let id_valid = matches!(
        id,
        None | Some(Value::Null | Value::Number(_) | Value::String(_))
    );
    let reply_id = if id_valid {
        id.clone().unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let invalid = |msg: &str| {
        Some(error_reply(
            reply_id.clone(),
            &RpcError::new(codes::INVALID_REQUEST, msg),
        ))
    };
    if !id_valid {
        return invalid("'id' must be a string, a number or null");
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("'jsonrpc' must be \"2.0\"");
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return invalid("'method' must be a string"),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Some(error_reply(
                reply_id,
                &RpcError::new(codes::INVALID_PARAMS, "'params' must be an object"),
            ))
        }
    };
    if let Some(extra) = obj.keys().find(|k| *k != "jsonrpc") {
        return invalid(&format!("unknown request member '{extra}'"));
    }
    let result = methods::call(engine, &method, params);
    // A request without an id is a notification: run it, owe no reply.
    id.as_ref()?;
    Some(match result {
        Ok(r) => success_reply(reply_id, r),
        Err(e) => error_reply(reply_id, &e),
    })
}

/// The reply carrying `result`, moved in (`json!` would serialize a large result again).
fn success_reply(id: Value, result: Value) -> Value {
    let mut reply = serde_json::Map::new();
    reply.insert("jsonrpc".into(), "2.0".into());
    reply.insert("id".into(), id);
    reply.insert("result".into(), result);
    Value::Object(reply)
}

fn error_reply(id: Value, e: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}
