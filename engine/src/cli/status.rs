//! `quicksplit status [--json]`: pairs, backups and verifications.

use std::path::PathBuf;

use engine::rpc::client::ClientError;
use serde_json::{json, Value};

use super::backup::describe_target;
use super::{connect, fail, print_json, say};

/// The reply of a listing method, or an empty list when the engine does not have it (method
/// not found) or cannot give it now (unavailable).
fn list(c: &mut engine::rpc::client::Client, method: &str) -> Result<Value, ClientError> {
    match c.call(method, json!({})) {
        Err(ClientError::Reply {
            code: -32601 | -32004,
            ..
        }) => Ok(json!([])),
        other => other,
    }
}

/// `quicksplit status`: a table of pairs, backups and verifications, or with `json` the three
/// lists as one JSON object (`pairs`, `backups`, `verifies`: what `pair_get`, `backup_get` and
/// `verify_get` return).
pub fn status(socket: Option<PathBuf>, as_json: bool) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if as_json {
        let mut lists = Vec::new();
        for method in ["pair_get", "backup_get", "verify_get"] {
            match list(&mut c, method) {
                Ok(v) => lists.push(v),
                Err(e) => return fail(e),
            }
        }
        let [pairs, backups, verifies] = <[Value; 3]>::try_from(lists).unwrap_or_default();
        return print_json(&json!({"pairs": pairs, "backups": backups, "verifies": verifies}));
    }
    // A table's header goes out before its request, as a line-by-line reader expects:
    // `status | head -1` has its line at once, and the rest meets the closed pipe (141).
    print_pair_header();
    match list(&mut c, "pair_get") {
        Ok(v) => print_pairs(&v),
        Err(e) => return fail(e),
    }
    say!();
    print_backup_header();
    match list(&mut c, "backup_get") {
        Ok(v) => print_backups(&v),
        Err(e) => return fail(e),
    }
    match list(&mut c, "verify_get") {
        Ok(v) => print_verifies(&v),
        Err(e) => return fail(e),
    }
    0
}

fn text(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("-").to_string()
}

fn num(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * done as f64 / total as f64
    }
}

fn print_pair_header() {
    say!(
        "{:<16} {:<6} {:<8} {:<12} {:<12} {:>10} {:>10} {:>10}  error",
        "PAIR",
        "STATE",
        "DIR",
        "PRIMARY",
        "SECONDARY",
        "TRACKS",
        "PENDING",
        "CHANGED"
    );
}

fn print_pairs(pairs: &Value) {
    for p in pairs.as_array().into_iter().flatten() {
        say!(
            "{:<16} {:<6} {:<8} {:<12} {:<12} {:>10} {:>10} {:>10}  {}",
            text(p, "name"),
            text(p, "state"),
            text(p, "direction"),
            text(p, "primary"),
            text(p, "secondary"),
            num(p, "tracks"),
            num(p, "pending_tracks"),
            num(p, "changed_tracks"),
            p.get("error").and_then(Value::as_str).unwrap_or("")
        );
    }
}

fn print_backup_header() {
    say!(
        "{:<6} {:<16} {:<7} {:<10} {:>7}  {:<32} digest or error",
        "BACKUP",
        "PAIR",
        "MODE",
        "STATE",
        "DONE",
        "TARGET"
    );
}

fn print_backups(backups: &Value) {
    for b in backups.as_array().into_iter().flatten() {
        let outcome = b
            .get("error")
            .and_then(Value::as_str)
            .or_else(|| b.get("digest").and_then(Value::as_str))
            .unwrap_or("");
        say!(
            "{:<6} {:<16} {:<7} {:<10} {:>6.1}%  {:<32} {}",
            num(b, "id"),
            text(b, "pair"),
            text(b, "mode"),
            text(b, "state"),
            percent(num(b, "bytes_done"), num(b, "bytes_total")),
            describe_target(b.get("target").unwrap_or(&Value::Null)),
            outcome
        );
    }
}

fn print_verifies(verifies: &Value) {
    let Some(list) = verifies.as_array().filter(|l| !l.is_empty()) else {
        return;
    };
    say!();
    say!(
        "{:<6} {:<16} {:<10} {:>7} {:>10} {:>10}  error",
        "VERIFY",
        "PAIR",
        "STATE",
        "DONE",
        "MISMATCH",
        "REPAIRED"
    );
    for v in list {
        say!(
            "{:<6} {:<16} {:<10} {:>6.1}% {:>10} {:>10}  {}",
            num(v, "id"),
            text(v, "pair"),
            text(v, "state"),
            percent(num(v, "tracks_checked"), num(v, "tracks_total")),
            num(v, "mismatched_tracks"),
            num(v, "repaired"),
            v.get("error").and_then(Value::as_str).unwrap_or("")
        );
    }
}
