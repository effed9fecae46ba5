//! The friendly commands of the `quicksplit` binary: thin wrappers over the JSON-RPC methods.
//! Exit codes: 0 success, 1 error reply, 2 usage, 3 cannot connect, 141 when the reader of our
//! output goes away.
//!
//! One file per command family: [`status`], [`backup`], [`restore`], [`digest`], [`resync`],
//! [`verify`],
//! the live view [`top`] (a folder: its screen model apart from the drawing), and the
//! progress display of the commands that wait ([`progress`]); this file holds the socket
//! lookup, the exit codes, the output helpers and the small commands (`rpc`, `split`,
//! `cancel`).

use std::path::PathBuf;

use engine::rpc::client::{Client, ClientError};
use serde_json::{json, Value};

mod backup;
mod digest;
mod progress;
mod restore;
mod resync;
mod status;
pub mod top;
mod verify;

pub use backup::{backup, BackupArgs};
pub use digest::digest;
pub use restore::restore;
pub use resync::{resync, ResyncArgs};
pub use status::status;
pub use verify::{verify, VerifyArgs};

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
        complain!("{e}");
        EXIT_CONNECT
    })
}

fn fail(e: ClientError) -> i32 {
    complain!("{e}");
    match e {
        ClientError::Connect { .. } => EXIT_CONNECT,
        _ => EXIT_ERROR,
    }
}

/// Exit status when the reader of our output went away (128 + SIGPIPE, as the shell reports
/// for tools the signal stops).
const EXIT_BROKEN_PIPE: i32 = 141;

/// Writes to stdout. A reader that stops early (`| grep -q`, `| head`) ends the command
/// quietly with 141, as it ends other tools; any other write error ends it with 1.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_BROKEN_PIPE);
        }
        // stderr may be gone too: nothing more to say then.
        let _ = writeln!(std::io::stderr(), "quicksplit: writing to stdout: {e}");
        std::process::exit(EXIT_ERROR);
    }
}

/// `println!` for the CLI's answers: see [`write_stdout`].
macro_rules! say {
    () => { $crate::cli::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
pub(crate) use say;

/// `eprintln!` that never panics: a closed stderr loses the message, nothing more.
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "quicksplit: {}", format_args!($($arg)*));
    }};
}
pub(crate) use complain;

/// Prints `v` to stdout as pretty JSON; the exit status.
fn print_json(v: &Value) -> i32 {
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    say!("{text}");
    0
}

/// The text of `--params`-like arguments: inline JSON, `@FILE` (read from a file) or `-`
/// (read from stdin).
fn params_text(arg: &str) -> Result<String, String> {
    let read = |what: &str, r: std::io::Result<String>| r.map_err(|e| format!("{what}: {e}"));
    if arg == "-" {
        let mut text = String::new();
        use std::io::Read;
        read(
            "stdin",
            std::io::stdin().read_to_string(&mut text).map(|_| text),
        )
    } else if let Some(path) = arg.strip_prefix('@') {
        read(path, std::fs::read_to_string(path))
    } else {
        Ok(arg.to_string())
    }
}

/// `quicksplit rpc METHOD [PARAMS | @FILE | -]`.
pub fn rpc(socket: Option<PathBuf>, method: &str, params: Option<&str>) -> i32 {
    let text = match params.map(params_text).transpose() {
        Ok(t) => t,
        Err(e) => {
            complain!("parameters: {e}");
            return EXIT_USAGE;
        }
    };
    let params: Value = match text {
        None => json!({}),
        Some(text) => match serde_json::from_str(&text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                complain!("parameters must be a JSON object");
                return EXIT_USAGE;
            }
            Err(e) => {
                complain!("parameters are not JSON: {e}");
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
            say!(
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

/// `quicksplit cancel ID`: cancels a running backup or verification (one id names one job)
/// and waits (a few seconds at most) until it has stopped.
pub fn cancel(socket: Option<PathBuf>, id: u64) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (kind, get) = match c.call("backup_cancel", json!({ "id": id })) {
        Ok(_) => ("backup", "backup_get"),
        Err(ClientError::Reply { code: -32001, .. }) => {
            match c.call("verify_cancel", json!({ "id": id })) {
                Ok(_) => ("verify", "verify_get"),
                Err(ClientError::Reply { code: -32001, .. }) => {
                    complain!("no backup or verification with id {id}");
                    return EXIT_ERROR;
                }
                Err(e) => return fail(e),
            }
        }
        Err(e) => return fail(e),
    };
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < end {
        let state = match c.call(get, json!({ "id": id })) {
            Ok(v) => v[0]["state"].as_str().unwrap_or("?").to_string(),
            Err(e) => return fail(e),
        };
        if state != "running" {
            say!("{kind} {id} {state}");
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    say!("{kind} {id}: cancel requested, still stopping");
    0
}
