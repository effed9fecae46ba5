//! `quicksplit backup`: the target syntax and the wait with progress.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::progress::{nap, Interrupt, Progress};
use super::{complain, connect, fail, say, EXIT_ERROR, EXIT_USAGE};

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
            complain!("{e}");
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
        say!("backup {id} started");
        return 0;
    }
    let interrupt = Interrupt::catch();
    let mut progress = Progress::new(format!("backup {id}"));
    loop {
        let info = match c.call("backup_get", json!({ "id": id })) {
            Ok(v) => v.get(0).cloned().unwrap_or(Value::Null),
            Err(e) => {
                progress.break_line();
                return fail(e);
            }
        };
        let n = |k: &str| info.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (done, total) = (n("bytes_done"), n("bytes_total"));
        match info.get("state").and_then(Value::as_str).unwrap_or("?") {
            "running" => {
                progress.update(done, total);
                nap(Duration::from_millis(200), &interrupt);
                if interrupt.pressed() {
                    let stop = format!("quicksplit cancel {id}");
                    return interrupt.leave(&mut progress, &format!("backup {id}"), Some(&stop));
                }
            }
            "done" => {
                progress.finish(done, total);
                say!(
                    "backup {id} done: sha256 {}",
                    info.get("sha256").and_then(Value::as_str).unwrap_or("")
                );
                return 0;
            }
            state => {
                progress.break_line();
                complain!(
                    "backup {id} {state}: {}",
                    info.get("error").and_then(Value::as_str).unwrap_or("")
                );
                return EXIT_ERROR;
            }
        }
    }
}

/// A target as the CLI's `--to` writes it: `file:PATH`, `tape:PATH`, `nbd:URI`,
/// `nvmf:ADDR:PORT:NQN`.
pub fn describe_target(t: &Value) -> String {
    let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("");
    match s("type") {
        "file" | "tape" => format!("{}:{}", s("type"), s("path")),
        "nbd" => format!("nbd:{}", s("uri")),
        "nvmf" => {
            let port = t
                .get("trsvcid")
                .map(|p| p.as_str().map_or(p.to_string(), str::to_string))
                .unwrap_or_default();
            format!("nvmf:{}:{port}:{}", s("traddr"), s("subnqn"))
        }
        "" => "-".to_string(),
        other => other.to_string(),
    }
}
