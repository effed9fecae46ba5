//! `quicksplit verify PAIR [--repair] [--rate R] [--wait]`: starts a verification and, with
//! `--wait`, shows its progress and ends with its outcome.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::progress::{nap, Interrupt, Progress};
use super::{complain, connect, fail, say, EXIT_ERROR};

/// What `verify` was asked for.
pub struct VerifyArgs<'a> {
    /// The pair.
    pub pair: &'a str,
    /// Make mismatched tracks pending so the copier copies them again.
    pub repair: bool,
    /// Bytes per second (0: the engine's default).
    pub rate: u64,
    /// Wait for the end, showing progress.
    pub wait: bool,
}

/// The exit status a finished verification gives: 0 when S matched P everywhere it was
/// compared or every mismatch was repaired, 1 otherwise.
fn outcome_status(mismatched: u64, repaired: u64) -> i32 {
    if mismatched == repaired {
        0
    } else {
        EXIT_ERROR
    }
}

/// `quicksplit verify`.
pub fn verify(socket: Option<PathBuf>, args: &VerifyArgs<'_>) -> i32 {
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let params = json!({"name": args.pair, "repair": args.repair, "rate": args.rate});
    let id = match c.call("pair_verify", params) {
        Ok(v) => v.get("id").and_then(Value::as_u64).unwrap_or(0),
        Err(e) => return fail(e),
    };
    say!("verify {id} started");
    if !args.wait {
        return 0;
    }
    let interrupt = Interrupt::catch();
    let mut progress = Progress::new(format!("verify {id}"));
    loop {
        let info = match c.call("verify_get", json!({ "id": id })) {
            Ok(v) => v.get(0).cloned().unwrap_or(Value::Null),
            Err(e) => {
                progress.break_line();
                return fail(e);
            }
        };
        let n = |k: &str| info.get(k).and_then(Value::as_u64).unwrap_or(0);
        // The share of the volume gone through (compared or skipped), in bytes.
        let total = n("bytes_total");
        let done = match n("tracks_total") {
            0 => 0,
            tracks => (total as u128 * n("tracks_checked") as u128 / tracks as u128) as u64,
        };
        let (mismatched, repaired) = (n("mismatched_tracks"), n("repaired"));
        match info.get("state").and_then(Value::as_str).unwrap_or("?") {
            "running" => {
                progress.update(done, total);
                nap(Duration::from_millis(200), &interrupt);
                if interrupt.pressed() {
                    let stop = format!("quicksplit cancel {id}");
                    return interrupt.leave(&mut progress, &format!("verify {id}"), Some(&stop));
                }
            }
            "done" => {
                progress.finish(done, total);
                let skipped = n("tracks_skipped");
                let mut line = format!(
                    "verify {id} done: {mismatched} mismatched tracks (repaired {repaired})"
                );
                if skipped > 0 {
                    line += &format!(", {skipped} tracks skipped as written or pending");
                }
                say!("{line}");
                if let Some(first) = info.get("first_mismatches").and_then(Value::as_array) {
                    if !first.is_empty() {
                        let list: Vec<String> = first.iter().map(Value::to_string).collect();
                        say!("first mismatched tracks: {}", list.join(" "));
                    }
                }
                return outcome_status(mismatched, repaired);
            }
            state => {
                progress.break_line();
                complain!(
                    "verify {id} {state}: {} ({mismatched} mismatched tracks so far, repaired \
                     {repaired})",
                    info.get("error").and_then(Value::as_str).unwrap_or("")
                );
                return EXIT_ERROR;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::outcome_status;

    #[test]
    fn mismatches_left_unrepaired_fail_the_command() {
        assert_eq!(outcome_status(0, 0), 0);
        assert_eq!(outcome_status(20, 20), 0);
        assert_eq!(outcome_status(20, 0), 1);
        assert_eq!(outcome_status(20, 19), 1);
    }
}
