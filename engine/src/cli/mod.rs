//! The friendly commands of the `quicksplit` binary: thin wrappers over the JSON-RPC methods.
//! Exit codes: 0 success, 1 error reply, 2 usage, 3 cannot connect, 141 when the reader of our
//! output goes away.
//!
//! One file per command family: [`status`], [`backup`], [`restore`]; this file holds the
//! socket lookup, the exit codes and the generic `rpc` and `split` commands.

use std::path::PathBuf;

use engine::rpc::client::{Client, ClientError};
use serde_json::{json, Value};

mod backup;
mod restore;
mod status;

pub use backup::backup;
pub use restore::restore;
pub use status::status;

const EXIT_ERROR: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_CONNECT: i32 = 3;

/// The socket to use: `--socket`, `$QUICKSPLIT_SOCKET`, `./quicksplit-state/rpc.sock` when it
/// exists (the embedded default), else `/var/tmp/quicksplit.sock`.
fn socket_path(socket: Option<PathBuf>) -> PathBuf {
    if let Some(s) = socket {
        return s;
    }
    if let Some(s) = std::env::var_os("QUICKSPLIT_SOCKET") {
        return PathBuf::from(s);
    }
    let local = PathBuf::from("quicksplit-state/rpc.sock");
    if local.exists() {
        return local;
    }
    PathBuf::from("/var/tmp/quicksplit.sock")
}

fn connect(socket: Option<PathBuf>) -> Result<Client, i32> {
    Client::connect(&socket_path(socket)).map_err(|e| {
        eprintln!("quicksplit: {e}");
        EXIT_CONNECT
    })
}

fn fail(e: ClientError) -> i32 {
    eprintln!("quicksplit: {e}");
    match e {
        ClientError::Connect { .. } => EXIT_CONNECT,
        _ => EXIT_ERROR,
    }
}

/// Exit status when the reader of our output went away (128 + SIGPIPE, as the shell reports
/// for tools the signal stops).
const EXIT_BROKEN_PIPE: i32 = 141;

/// Prints `v` to stdout; the exit status. A reader that stops early (`| grep -q`, `| head`)
/// ends the command quietly, as it ends other tools.
fn print_json(v: &Value) -> i32 {
    use std::io::Write;
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_BROKEN_PIPE,
        Err(e) => {
            eprintln!("quicksplit: writing the answer: {e}");
            EXIT_ERROR
        }
    }
}

/// `quicksplit rpc METHOD [PARAMS]`.
pub fn rpc(socket: Option<PathBuf>, method: &str, params: Option<&str>) -> i32 {
    let params: Value = match params {
        None => json!({}),
        Some(text) => match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                eprintln!("quicksplit: parameters must be a JSON object");
                return EXIT_USAGE;
            }
            Err(e) => {
                eprintln!("quicksplit: parameters are not JSON: {e}");
                return EXIT_USAGE;
            }
        },
    };
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call(method, params) {
        Ok(v) => print_json(&v),
        Err(e) => fail(e),
    }
}

/// `quicksplit split PAIR...`.
pub fn split(socket: Option<PathBuf>, pairs: &[String]) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call("pair_split", json!({ "names": pairs })) {
        Ok(v) => {
            let pending = v.get("pending_tracks").and_then(Value::as_u64).unwrap_or(0);
            let at = v.get("split_at_ns").and_then(Value::as_u64).unwrap_or(0);
            println!(
                "split {} at {} ns since the epoch; {} tracks still to copy in the background",
                pairs.join(", "),
                at,
                pending
            );
            0
        }
        Err(e) => fail(e),
    }
}
