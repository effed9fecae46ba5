//! `quicksplit status`.

use std::path::PathBuf;

use engine::rpc::client::ClientError;
use serde_json::{json, Value};

use super::{connect, fail};

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
