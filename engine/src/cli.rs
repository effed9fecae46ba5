//! The friendly commands of the `quicksplit` binary: thin wrappers over the JSON-RPC methods.
//! Exit codes: 0 success, 1 error reply, 2 usage, 3 cannot connect.

use std::path::PathBuf;

use engine::rpc::client::{Client, ClientError};
use serde_json::{json, Value};

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

/// `quicksplit status`: a table of pairs and backups.
pub fn status(socket: Option<PathBuf>) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let pairs = match c.call("pair_get", json!({})) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    println!(
        "{:<16} {:<6} {:<12} {:<12} {:>10} {:>10} {:>10}  error",
        "PAIR", "STATE", "PRIMARY", "SECONDARY", "TRACKS", "PENDING", "CHANGED"
    );
    for p in pairs.as_array().into_iter().flatten() {
        let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let n = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        println!(
            "{:<16} {:<6} {:<12} {:<12} {:>10} {:>10} {:>10}  {}",
            s("name"),
            s("state"),
            s("primary"),
            s("secondary"),
            n("tracks"),
            n("pending_tracks"),
            n("changed_tracks"),
            p.get("error").and_then(Value::as_str).unwrap_or("")
        );
    }
    match c.call("backup_get", json!({})) {
        Ok(v) => {
            println!();
            println!(
                "{:<6} {:<16} {:<7} {:<10} {:>8}  sha256",
                "BACKUP", "PAIR", "MODE", "STATE", "DONE"
            );
            for b in v.as_array().into_iter().flatten() {
                let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
                let n = |k: &str| b.get(k).and_then(Value::as_u64).unwrap_or(0);
                let pct = if n("bytes_total") > 0 {
                    100.0 * n("bytes_done") as f64 / n("bytes_total") as f64
                } else {
                    0.0
                };
                println!(
                    "{:<6} {:<16} {:<7} {:<10} {:>7.1}%  {}",
                    n("id"),
                    s("pair"),
                    s("mode"),
                    s("state"),
                    pct,
                    b.get("sha256").and_then(Value::as_str).unwrap_or("")
                );
            }
            0
        }
        Err(ClientError::Reply { code: -32004, .. }) => 0,
        Err(e) => fail(e),
    }
}

/// Turns `file:PATH`, `tape:PATH[:RECORD_SIZE]`, `nbd:URI` or a JSON object into a target.
fn parse_target(to: &str) -> Result<Value, String> {
    if to.trim_start().starts_with('{') {
        return serde_json::from_str(to).map_err(|e| format!("--to is not JSON: {e}"));
    }
    let (kind, rest) = to
        .split_once(':')
        .ok_or_else(|| format!("--to {to}: expected file:PATH, tape:PATH or nbd:URI"))?;
    match kind {
        "file" => Ok(json!({"type": "file", "path": rest})),
        "tape" => match rest.rsplit_once(':') {
            Some((path, rs)) if rs.chars().all(|c| c.is_ascii_digit()) && !rs.is_empty() => {
                let record_size: u64 = rs.parse().map_err(|_| format!("bad record size {rs}"))?;
                Ok(json!({"type": "tape", "path": path, "record_size": record_size}))
            }
            _ => Ok(json!({"type": "tape", "path": rest})),
        },
        "nbd" => Ok(json!({"type": "nbd", "uri": rest})),
        other => Err(format!("--to: unknown target type '{other}'")),
    }
}

/// `quicksplit backup PAIR --to TARGET [--mode M] [--wait] [--rate BYTES_PER_SEC]`.
pub fn backup(
    socket: Option<PathBuf>,
    pair: &str,
    to: &str,
    mode: &str,
    wait: bool,
    rate: u64,
) -> i32 {
    let target = match parse_target(to) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("quicksplit: {e}");
            return EXIT_USAGE;
        }
    };
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let id = match c.call(
        "backup_start",
        json!({"pair": pair, "mode": mode, "target": target, "rate": rate}),
    ) {
        Ok(v) => v.get("id").and_then(Value::as_u64).unwrap_or(0),
        Err(e) => return fail(e),
    };
    if !wait {
        println!("backup {id} started");
        return 0;
    }
    use std::io::Write;
    loop {
        let info = match c.call("backup_get", json!({ "id": id })) {
            Ok(v) => v.get(0).cloned().unwrap_or(Value::Null),
            Err(e) => return fail(e),
        };
        let done = info.get("bytes_done").and_then(Value::as_u64).unwrap_or(0);
        let total = info
            .get("bytes_total")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1);
        let state = info.get("state").and_then(Value::as_str).unwrap_or("?");
        let width = 40usize;
        let filled = (done as u128 * width as u128 / total as u128) as usize;
        eprint!(
            "\rbackup {id} [{}{}] {:5.1}% {:>8} MiB {state:<10}",
            "#".repeat(filled),
            " ".repeat(width - filled),
            100.0 * done as f64 / total as f64,
            done >> 20
        );
        let _ = std::io::stderr().flush();
        match state {
            "running" => std::thread::sleep(std::time::Duration::from_millis(200)),
            "done" => {
                eprintln!();
                println!(
                    "backup {id} done: sha256 {}",
                    info.get("sha256").and_then(Value::as_str).unwrap_or("")
                );
                return 0;
            }
            _ => {
                eprintln!();
                eprintln!(
                    "quicksplit: backup {id} {state}: {}",
                    info.get("error").and_then(Value::as_str).unwrap_or("")
                );
                return EXIT_ERROR;
            }
        }
    }
}

/// `quicksplit restore ARCHIVE --to PATH`: restores and verifies every CRC and the SHA-256.
pub fn restore(archive: &std::path::Path, to: &std::path::Path, record_size: usize) -> i32 {
    let input = match std::fs::File::open(archive) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("quicksplit: {}: {e}", archive.display());
            return EXIT_ERROR;
        }
    };
    let output = match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("quicksplit: {}: {e}", to.display());
            return EXIT_ERROR;
        }
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, output);
    match drivers::tape::restore(
        std::io::BufReader::with_capacity(1 << 20, input),
        &mut out,
        record_size,
    ) {
        Ok(report) => {
            use std::io::Write;
            // A regular file ends where the image ends (an older, longer file is cut).
            let finished = out.flush().and_then(|()| {
                let f = out.get_ref();
                if f.metadata()?.file_type().is_file() {
                    f.set_len(report.bytes)?;
                }
                f.sync_all()
            });
            if let Err(e) = finished {
                eprintln!("quicksplit: {}: {e}", to.display());
                return EXIT_ERROR;
            }
            println!(
                "restored {} bytes of pair {} (split at {} ns, mode {}) to {}: sha256 {} verified",
                report.bytes,
                report.manifest.pair,
                report.manifest.split_at_ns,
                report.manifest.mode,
                to.display(),
                report.sha256
            );
            0
        }
        Err(e) => {
            eprintln!("quicksplit: restore of {} FAILED: {e}", archive.display());
            EXIT_ERROR
        }
    }
}
