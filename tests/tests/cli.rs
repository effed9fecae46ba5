//! The CLI as operators and scripts use it: exit codes when the reader goes away, `status
//! --json`, parameters from files and stdin, `resync --wait`, progress lines, Ctrl-C during a
//! wait and `cancel`, and `serve --config`'s word about pairs it no longer serves.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use quicksplit_tests::{binary, start_empty, start_on, wait_for, RpcConn, TempDir};
use serde_json::{json, Value};

fn q(sock: &Path, args: &[&str]) -> Output {
    Command::new(binary("quicksplit"))
        .args(args)
        .arg("--socket")
        .arg(sock)
        .output()
        .expect("run quicksplit")
}

/// Two 64 MiB RAM disks paired as `ab`, in PAIR.
fn paired(c: &mut RpcConn) {
    for n in ["a", "b"] {
        c.ok("bdev_malloc_create", json!({"name": n, "size": 64 << 20}));
    }
    c.ok(
        "pair_create",
        json!({"name": "ab", "primary": "a", "secondary": "b"}),
    );
    assert!(wait_for(Duration::from_secs(30), || {
        c.ok("pair_get", json!({"name": "ab"}))[0]["state"] == "PAIR"
    }));
}

#[test]
fn every_subcommand_exits_141_when_its_reader_is_gone() {
    let dir = TempDir::new("cli-pipe");
    let (_server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    paired(&mut c);
    let img = dir.path().join("ab.img");
    let target = format!("file:{}", img.display());
    let tape = format!("tape:{}", dir.path().join("ab.tar").display());
    let runs: Vec<Vec<&str>> = vec![
        vec!["status"],
        vec!["status", "--json"],
        vec!["rpc", "bdev_get_bdevs"],
        vec!["split", "ab"],
        // Every byte read (the volume holds no data: a sparse backup would end at once), so
        // it is still running for the cancel.
        vec![
            "backup",
            "ab",
            "--to",
            &target,
            "--rate",
            "1M",
            "--flat-sha256",
        ],
        vec!["cancel", "1"],
        vec!["resync", "ab", "--wait"],
        vec!["split", "ab"],
        vec!["resync", "ab"],
        vec!["split", "ab"],
        vec!["backup", "ab", "--to", &tape, "--wait"],
    ];
    for args in runs {
        if args[0] == "split" {
            assert!(wait_for(Duration::from_secs(30), || {
                c.ok("pair_get", json!({"name": "ab"}))[0]["state"] == "PAIR"
            }));
        }
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(binary("quicksplit"))
            .args(&args)
            .arg("--socket")
            .arg(&sock)
            .stdout(writer)
            .output()
            .expect("run quicksplit");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{args:?}: {out:?}"
        );
    }
    // Through a shell, as in the README: `status | head -1` gets its line; the command ends
    // quietly, with 141 when the reader left before it finished (nearly always: each table
    // waits for its own request after its header), never with a panic.
    let script = format!(
        "for i in 1 2 3 4 5; do {} status --socket {} | head -1 >/dev/null; \
         echo ${{PIPESTATUS[0]}}; done",
        binary("quicksplit").display(),
        sock.display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        codes.split_whitespace().all(|c| c == "141" || c == "0"),
        "{codes}"
    );
    assert!(codes.contains("141"), "{codes}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
}

#[test]
fn status_json_params_from_files_and_resync_wait() {
    let dir = TempDir::new("cli-status");
    let (_server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    paired(&mut c);

    // status --json: the three lists, each as its method returns it.
    let out = q(&sock, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(v["pairs"], c.ok("pair_get", json!({})));
    assert_eq!(v["backups"], json!([]));
    assert!(v["verifies"].is_array(), "{v}");

    // Parameters from a file (@FILE) and from stdin (-).
    let params = dir.path().join("params.json");
    std::fs::write(&params, r#"{"name": "f", "size": 1048576}"#).unwrap();
    let at = format!("@{}", params.display());
    let out = q(&sock, &["rpc", "bdev_malloc_create", &at]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"f\"");
    let mut child = Command::new(binary("quicksplit"))
        .args(["rpc", "bdev_get_bdevs", "-", "--socket"])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run quicksplit");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"name": "f"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["name"], "f");
    // A missing file: a usage error naming it.
    let out = q(&sock, &["rpc", "bdev_get_bdevs", "@/nonexistent/p.json"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/p.json"));

    // resync --wait: back in PAIR when it returns.
    assert_eq!(q(&sock, &["split", "ab"]).status.code(), Some(0));
    let out = q(&sock, &["resync", "ab", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resync of ab done: PAIR"),
        "{out:?}"
    );
    assert_eq!(c.ok("pair_get", json!({"name": "ab"}))[0]["state"], "PAIR");
    // A pair that is not split cannot be resynced: the engine's reason, exit 1.
    let out = q(&sock, &["resync", "ab", "--reverse"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // The status table shows the direction, and a backup's target and state.
    assert_eq!(q(&sock, &["split", "ab"]).status.code(), Some(0));
    let tape = dir.path().join("t.tar");
    let to = format!("tape:{}", tape.display());
    let out = q(&sock, &["backup", "ab", "--to", &to, "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // stdout is not a terminal: plain lines, the last with the whole image.
    assert!(
        text.lines()
            .all(|l| !l.contains('\r') && !l.contains('\x1b')),
        "{text:?}"
    );
    assert!(
        text.contains("backup 1: 64.0 MiB of 64.0 MiB (100.0%),") && text.contains("elapsed"),
        "{text}"
    );
    assert!(text.contains("backup 1 done: sha256-tree:"), "{text}");
    let out = q(&sock, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pair_row = text.lines().find(|l| l.starts_with("ab ")).unwrap_or("");
    assert!(
        pair_row.contains("PSUS") && pair_row.contains("forward"),
        "{text}"
    );
    let backup_row = text.lines().find(|l| l.starts_with("1 ")).unwrap_or("");
    assert!(
        backup_row.contains("done") && backup_row.contains(&to),
        "{text}"
    );
}

#[test]
fn ctrl_c_during_wait_leaves_the_backup_running_and_cancel_stops_it() {
    let dir = TempDir::new("cli-ctrlc");
    let (_server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    paired(&mut c);
    c.ok("pair_split", json!({"names": ["ab"]}));
    let img = dir.path().join("slow.img");
    let to = format!("file:{}", img.display());
    // The volume holds no data, so only with the flat SHA-256 (every byte read) does the backup
    // run long enough at 2 MB/s to be interrupted.
    let child = Command::new(binary("quicksplit"))
        .args([
            "backup",
            "ab",
            "--to",
            &to,
            "--rate",
            "2M",
            "--flat-sha256",
            "--wait",
            "--socket",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run quicksplit");
    assert!(wait_for(Duration::from_secs(10), || {
        c.ok("backup_get", json!({}))
            .as_array()
            .is_some_and(|l| !l.is_empty())
    }));
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backup 1 goes on in the engine") && err.contains("quicksplit cancel 1"),
        "{err}"
    );
    assert_eq!(c.ok("backup_get", json!({"id": 1}))[0]["state"], "running");

    let out = q(&sock, &["cancel", "1"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "backup 1 cancelled"
    );
    assert_eq!(
        c.ok("backup_get", json!({"id": 1}))[0]["state"],
        "cancelled"
    );
    // Cancelling it again, or an id that never was: the engine's reason, exit 1.
    assert_eq!(q(&sock, &["cancel", "99"]).status.code(), Some(1));
}

#[test]
fn serve_with_config_names_the_pairs_it_no_longer_serves() {
    let dir = TempDir::new("cli-unnamed");
    let state = dir.path().join("state");
    let sock = dir.path().join("rpc.sock");
    let vol = |n: &str| dir.path().join(format!("{n}.img"));
    let cfg = dir.path().join("two.json");
    std::fs::write(
        &cfg,
        json!({"config": [
            {"method": "bdev_uring_create", "params": {"name": "p", "filename": vol("p"), "size": 1 << 20}},
            {"method": "bdev_uring_create", "params": {"name": "s", "filename": vol("s"), "size": 1 << 20}},
            {"method": "pair_create", "params": {"name": "kept", "primary": "p", "secondary": "s"}}]})
        .to_string(),
    )
    .unwrap();
    let mut first = start_on(&state, &sock, Some(&cfg));
    let _ = RpcConn::connect(&sock);
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(20)).is_some());
    assert!(state.join("pairs/kept.meta").exists());

    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"config": []}"#).unwrap();
    let mut second = Command::new(binary("quicksplit"))
        .args([
            "serve",
            "--cores",
            "0",
            "--idle",
            "adaptive",
            "--rpc-socket",
        ])
        .arg(&sock)
        .arg("--state-dir")
        .arg(&state)
        .arg("--config")
        .arg(&empty)
        .env("QUICKSPLIT_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start quicksplit serve");
    let _ = RpcConn::connect(&sock);
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(second.id() as i32, libc::SIGTERM) }, 0);
    let _ = second.wait();
    let mut err = String::new();
    use std::io::Read;
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("metadata of pair 'kept'") && err.contains("not served"),
        "{err}"
    );
    // The metadata is left alone.
    assert!(state.join("pairs/kept.meta").exists());
}
