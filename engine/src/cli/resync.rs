//! `quicksplit resync PAIR [--reverse] [--full] [--wait]`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::progress::{nap, Interrupt, Progress};
use super::{complain, connect, fail, say, EXIT_ERROR};

/// What `resync` was asked for.
pub struct ResyncArgs<'a> {
    /// The pair.
    pub pair: &'a str,
    /// Copy S onto P (a restore) instead of P onto S.
    pub reverse: bool,
    /// Copy every track, not only the changed ones.
    pub full: bool,
    /// Wait until the pair is in PAIR again, showing progress.
    pub wait: bool,
}

/// `quicksplit resync`.
pub fn resync(socket: Option<PathBuf>, args: &ResyncArgs<'_>) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let direction = if args.reverse { "reverse" } else { "forward" };
    let mut params = json!({"name": args.pair, "direction": direction});
    if args.full {
        params["full"] = json!(true);
    }
    if let Err(e) = c.call("pair_resync", params) {
        return fail(e);
    }
    let pair = args.pair;
    let get = |c: &mut engine::rpc::client::Client| {
        c.call("pair_get", json!({ "name": pair }))
            .map(|v| v.get(0).cloned().unwrap_or(Value::Null))
    };
    let info = match get(&mut c) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let track_size = n(&info, "track_size");
    let mut total = n(&info, "pending_tracks");
    if !args.wait {
        say!("resync of {pair} ({direction}) started: {total} tracks to copy");
        return 0;
    }
    let interrupt = Interrupt::catch();
    let mut progress = Progress::new(format!("resync {pair} ({direction})"));
    let mut info = info;
    loop {
        let pending = n(&info, "pending_tracks");
        // Hosts keep writing: the set to copy can grow while the resync runs.
        total = total.max(pending);
        let (done, all) = ((total - pending) * track_size, total * track_size);
        let state = info.get("state").and_then(Value::as_str).unwrap_or("?");
        match state {
            "PAIR" if pending == 0 => {
                progress.finish(all, all);
                say!("resync of {pair} done: PAIR");
                return 0;
            }
            "COPY" | "PAIR" => progress.update(done, all),
            _ => {
                progress.break_line();
                complain!(
                    "resync of {pair} stopped: the pair is {state}{}",
                    info.get("error")
                        .and_then(Value::as_str)
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                return EXIT_ERROR;
            }
        }
        nap(Duration::from_millis(200), &interrupt);
        if interrupt.pressed() {
            return interrupt.leave(&mut progress, &format!("the resync of {pair}"), None);
        }
        info = match get(&mut c) {
            Ok(v) => v,
            Err(e) => {
                progress.break_line();
                return fail(e);
            }
        };
    }
}
