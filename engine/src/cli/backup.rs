//! `quicksplit backup`: the target syntax and the wait with progress.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::{connect, fail, EXIT_ERROR, EXIT_USAGE};

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
