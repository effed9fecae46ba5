//! `quicksplit backup`: the target syntax and the wait with progress.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::progress::{nap, Interrupt, Progress};
use super::{complain, connect, fail, say, EXIT_ERROR, EXIT_USAGE};

/// Turns `file:PATH`, `tape:PATH[:RECORD_SIZE]`, `nbd:URI`, `nvmf:TRADDR:PORT:NQN` or a JSON
/// object into a target.
fn parse_target(to: &str) -> Result<Value, String> {
    if to.trim_start().starts_with('{') {
        return serde_json::from_str(to).map_err(|e| format!("--to is not JSON: {e}"));
    }
    let (kind, rest) = to.split_once(':').ok_or_else(|| {
        format!("--to {to}: expected file:PATH, tape:PATH, nbd:URI or nvmf:TRADDR:PORT:NQN")
    })?;
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
        "nvmf" => parse_nvmf(rest),
        other => Err(format!("--to: unknown target type '{other}'")),
    }
}

/// `TRADDR:PORT:NQN` (an IPv6 address in brackets): the NQN keeps its own colons.
fn parse_nvmf(rest: &str) -> Result<Value, String> {
    let usage = || format!("--to nvmf:{rest}: expected nvmf:TRADDR:PORT:NQN");
    let (traddr, after) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6.split_once(']').ok_or_else(usage)?;
            (addr, after.strip_prefix(':').ok_or_else(usage)?)
        }
        None => rest.split_once(':').ok_or_else(usage)?,
    };
    let (port, nqn) = after.split_once(':').ok_or_else(usage)?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("--to nvmf:{rest}: '{port}' is not a port number"))?;
    if traddr.is_empty() || nqn.is_empty() {
        return Err(usage());
    }
    Ok(json!({"type": "nvmf", "traddr": traddr, "trsvcid": port, "subnqn": nqn}))
}

/// What `quicksplit backup` was asked.
pub struct BackupArgs<'a> {
    /// The pair.
    pub pair: &'a str,
    /// The target as `--to` writes it.
    pub to: &'a str,
    /// The mode.
    pub mode: &'a str,
    /// Wait for the end, with progress.
    pub wait: bool,
    /// Bytes per second at most (0 = no limit).
    pub rate: u64,
    /// The flat SHA-256 too.
    pub flat_sha256: bool,
    /// The checkpoint the pair gets once the backup is done.
    pub checkpoint: Option<&'a str>,
    /// The checkpoint an incremental backup stores the changes since.
    pub since: Option<&'a str>,
}

/// `quicksplit backup PAIR --to TARGET [--mode M] [--wait] [--rate BYTES_PER_SEC]
/// [--flat-sha256] [--checkpoint NAME] [--since NAME]`.
pub fn backup(socket: Option<PathBuf>, args: &BackupArgs<'_>) -> i32 {
    let BackupArgs {
        pair,
        to,
        mode,
        wait,
        rate,
        flat_sha256,
        checkpoint,
        since,
    } = *args;
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
    let mut params = json!({"pair": pair, "mode": mode, "target": target, "rate": rate,
                            "flat_sha256": flat_sha256});
    if let Some(name) = checkpoint {
        params["checkpoint"] = json!(name);
    }
    if let Some(name) = since {
        params["since"] = json!(name);
    }
    let id = match c.call("backup_start", params) {
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
                let text = |k: &str| info.get(k).and_then(Value::as_str).map(str::to_string);
                match text("sha256") {
                    Some(sha) => say!(
                        "backup {id} done: {} sha256 {sha}",
                        text("digest").unwrap_or_default()
                    ),
                    None => say!("backup {id} done: {}", text("digest").unwrap_or_default()),
                }
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
            let addr = s("traddr");
            if addr.contains(':') {
                format!("nvmf:[{addr}]:{port}:{}", s("subnqn"))
            } else {
                format!("nvmf:{addr}:{port}:{}", s("subnqn"))
            }
        }
        "" => "-".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_the_cli_writes_them() {
        assert_eq!(
            parse_target("tape:/t/x.tar:65536").unwrap(),
            json!({"type": "tape", "path": "/t/x.tar", "record_size": 65536})
        );
        let nqn = "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert_eq!(
            parse_target(&format!("nvmf:10.0.0.2:4420:{nqn}")).unwrap(),
            json!({"type": "nvmf", "traddr": "10.0.0.2", "trsvcid": 4420, "subnqn": nqn})
        );
        let v6 = parse_target("nvmf:[fd00::2]:4421:nqn.x:y").unwrap();
        assert_eq!(v6["traddr"], "fd00::2");
        assert_eq!(v6["trsvcid"], 4421);
        assert_eq!(v6["subnqn"], "nqn.x:y");
        // describe_target writes back what the CLI accepts.
        assert_eq!(describe_target(&v6), "nvmf:[fd00::2]:4421:nqn.x:y");
        for bad in [
            "nvmf:10.0.0.2",
            "nvmf:10.0.0.2:port:nqn.x",
            "nvmf:10.0.0.2:4420:",
            "nvmf:[fd00::2:4420:nqn",
            "disk:/x",
            "nowhere",
        ] {
            assert!(parse_target(bad).is_err(), "{bad} was accepted");
        }
    }
}
