//! `quicksplit serve` starts on the embedded default and stops cleanly on SIGINT and SIGTERM.

use std::time::Duration;

use quicksplit_tests::{wait_for, Server, TempDir};

fn starts_and_stops_on(sig: i32) {
    let dir = TempDir::new("serve");
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let mut server = Server::start(&[
        "--state-dir",
        state_arg,
        "--cores",
        "0-1",
        "--idle",
        "adaptive",
    ]);
    let ready = wait_for(Duration::from_secs(10), || {
        ["p0.img", "s0.img"]
            .iter()
            .all(|f| std::fs::metadata(state.join(f)).is_ok_and(|m| m.len() == 1 << 30))
    });
    assert!(ready, "the embedded default's 1 GiB volumes did not appear");
    // The volumes are sparse: creating them wrote no data.
    for f in ["p0.img", "s0.img"] {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(state.join(f)).unwrap();
        assert!(m.blocks() * 512 < 1 << 20, "{f} is not sparse");
    }
    server.signal(sig);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("did not stop");
    assert!(
        status.success(),
        "exit status {status:?} after signal {sig}"
    );
}

#[test]
fn stops_cleanly_on_sigterm() {
    starts_and_stops_on(libc::SIGTERM);
}

#[test]
fn stops_cleanly_on_sigint() {
    starts_and_stops_on(libc::SIGINT);
}

#[test]
fn bad_cores_are_a_usage_error() {
    let dir = TempDir::new("serve-bad");
    let state = dir.path().join("state");
    let mut server = Server::start(&["--state-dir", state.to_str().unwrap(), "--cores", "4096"]);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert_eq!(status.code(), Some(2));
}

fn restart_keeps_the_configuration(sig: i32) {
    use quicksplit_tests::RpcConn;
    use serde_json::json;
    let dir = TempDir::new("serve-restart");
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    let args = ["--state-dir", s, "--cores", "0-1", "--idle", "adaptive"];
    let mut server = Server::start(&args);
    let sock = state.join("rpc.sock");
    let mut rpc = RpcConn::connect(&sock);
    rpc.ok(
        "bdev_malloc_create",
        json!({"name": "extra", "size": 1 << 20}),
    );
    rpc.ok(
        "nbd_export_start",
        json!({"name": "extra", "bdev": "extra"}),
    );
    rpc.ok("nbd_export_stop", json!({"name": "pair0-image"}));
    let before = rpc.ok("save_config", json!({}));
    drop(rpc);
    server.signal(sig);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    let _server = Server::start(&args);
    let mut rpc = RpcConn::connect(&sock);
    assert!(wait_for(Duration::from_secs(10), || {
        rpc.ok("nbd_get_exports", json!({}))
            .as_array()
            .is_some_and(|a| a.len() == 2)
    }));
    assert_eq!(rpc.ok("save_config", json!({})), before);
    let names: Vec<String> = rpc
        .ok("bdev_get_bdevs", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["extra", "p0", "s0"]);
    assert_eq!(rpc.ok("pair_get", json!({}))[0]["name"], "pair0");
}

#[test]
fn a_restart_after_sigterm_brings_the_configuration_back() {
    restart_keeps_the_configuration(libc::SIGTERM);
}

#[test]
fn a_restart_after_sigkill_brings_the_configuration_back() {
    restart_keeps_the_configuration(libc::SIGKILL);
}

/// Hundreds of changes (past the point where the journal is folded into a new base), then a
/// SIGKILL: the restart brings back exactly what ran, including objects changed and removed
/// after the last base; and a journal with damage before its last line stops the start.
#[test]
fn many_changes_survive_a_sigkill_and_a_damaged_journal_stops_the_start() {
    use quicksplit_tests::RpcConn;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("serve-journal");
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    let args = ["--state-dir", s, "--cores", "0-1", "--idle", "adaptive"];
    let mut server = Server::start(&args);
    let sock = state.join("rpc.sock");
    let mut rpc = RpcConn::connect(&sock);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "x").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    for i in 0..400 {
        let name = format!("key{i}");
        rpc.ok(
            "keyring_file_add_key",
            json!({"name": name, "path": secret}),
        );
        if i % 7 == 3 {
            rpc.ok("keyring_file_remove_key", json!({"name": name}));
        }
    }
    for i in 0..20 {
        let name = format!("m{i}");
        rpc.ok("bdev_malloc_create", json!({"name": name, "size": 1 << 20}));
        rpc.ok("nbd_export_start", json!({"name": name, "bdev": name}));
    }
    rpc.ok("nbd_export_stop", json!({"name": "m5"}));
    rpc.ok("bdev_delete", json!({"name": "m5"}));
    rpc.ok("nbd_export_stop", json!({"name": "m1"}));
    rpc.ok("nbd_export_stop", json!({"name": "m2"}));
    rpc.ok(
        "pair_create",
        json!({"name": "pm", "primary": "m1", "secondary": "m2"}),
    );
    rpc.ok(
        "nbd_export_start",
        json!({"name": "pm-image", "pair": "pm"}),
    );
    let before = rpc.ok("save_config", json!({}));
    drop(rpc);
    server.signal(libc::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    let journal = std::fs::read_to_string(state.join("config.journal")).unwrap();
    assert!(
        journal.lines().count() > 1,
        "changes since the base are in the journal"
    );
    let mut server = Server::start(&args);
    let mut rpc = RpcConn::connect(&sock);
    assert!(wait_for(Duration::from_secs(10), || {
        rpc.ok("nbd_get_exports", json!({}))
            .as_array()
            .is_some_and(|a| a.len() >= 18)
    }));
    assert_eq!(rpc.ok("save_config", json!({})), before);
    drop(rpc);
    server.signal(libc::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    // Damage in the middle of the journal (not a torn last line): the start stops.
    let journal = std::fs::read_to_string(state.join("config.journal")).unwrap();
    let mut lines: Vec<&str> = journal.lines().collect();
    if lines.len() < 3 {
        lines.push(
            r#"{"put": {"method": "keyring_file_add_key", "params": {"name": "z", "path": "/z"}}}"#,
        );
        lines.push(
            r#"{"put": {"method": "keyring_file_add_key", "params": {"name": "y", "path": "/y"}}}"#,
        );
    }
    lines[1] = "{not json";
    std::fs::write(state.join("config.journal"), lines.join("\n") + "\n").unwrap();
    let mut server = Server::start(&args);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert_eq!(status.code(), Some(1));
}

#[test]
fn a_damaged_configuration_in_the_state_dir_stops_the_start() {
    let dir = TempDir::new("serve-damaged");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("config.json"), "{\"config\": [tru").unwrap();
    let mut server = Server::start(&["--state-dir", state.to_str().unwrap(), "--cores", "0"]);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert_eq!(status.code(), Some(1));
    // Nothing was created in its place.
    assert!(!state.join("p0.img").exists());
}

fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn nbd_copy(from: &str, to: &str) {
    let st = std::process::Command::new("nbdcopy")
        .args([from, to])
        .status()
        .expect("nbdcopy");
    assert!(st.success(), "nbdcopy {from} {to}");
}

#[test]
fn a_clean_restart_keeps_pairs_split_with_their_image_and_pending_tracks() {
    use quicksplit_tests::RpcConn;
    use serde_json::json;
    let dir = TempDir::new("serve-restart");
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();
    let args = ["--state-dir", s, "--cores", "0-1", "--idle", "adaptive"];
    let mut server = Server::start(&args);
    let sock = state.join("rpc.sock");
    let nbd = state.join("nbd.sock");
    let mut rpc = RpcConn::connect(&sock);
    // A second pair that copies 1 byte/s: its tracks stay pending across the restart.
    for (n, f) in [("p1", "p1.img"), ("s1", "s1.img")] {
        rpc.ok(
            "bdev_uring_create",
            json!({"name": n, "filename": state.join(f), "size": 16 << 20}),
        );
    }
    rpc.ok(
        "pair_create",
        json!({"name": "slow", "primary": "p1", "secondary": "s1", "copy_rate": 1}),
    );
    rpc.ok("nbd_export_start", json!({"name": "p1", "bdev": "p1"}));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "slow-image", "pair": "slow"}),
    );
    let src = dir.path().join("src.img");
    let st = std::process::Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", src.display()),
            "bs=1M",
            "count=8",
            "status=none",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", nbd.display());
    nbd_copy(src.to_str().unwrap(), &uri("p0"));
    nbd_copy(src.to_str().unwrap(), &uri("p1"));
    assert!(wait_for(Duration::from_secs(30), || {
        rpc.ok("pair_get", json!({"name": "pair0"}))[0]["state"] == "PAIR"
    }));
    rpc.ok("pair_split", json!({"names": ["pair0", "slow"]}));
    // P moves on after the split (copy before write on the slow pair's pending tracks).
    let later = dir.path().join("later.img");
    std::fs::write(&later, vec![0x5au8; 1 << 20]).unwrap();
    nbd_copy(later.to_str().unwrap(), &uri("p0"));
    nbd_copy(later.to_str().unwrap(), &uri("p1"));
    // (pair0's image is 1 GiB: its state is checked, the slow pair's 16 MiB image byte for byte.)
    let img1 = dir.path().join("img1-before.img");
    nbd_copy(&uri("slow-image"), img1.to_str().unwrap());
    let before: Vec<serde_json::Value> = ["pair0", "slow"]
        .iter()
        .map(|n| rpc.ok("pair_get", json!({ "name": n }))[0].clone())
        .collect();
    assert!(before[1]["pending_tracks"].as_u64().unwrap() > 100);
    drop(rpc);
    server.signal(libc::SIGTERM);
    assert!(server
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
    assert!(state.join("pairs/slow.meta").exists());

    let mut server = Server::start(&args);
    let mut rpc = RpcConn::connect(&sock);
    assert!(wait_for(Duration::from_secs(10), || nbd.exists()));
    for (i, n) in ["pair0", "slow"].iter().enumerate() {
        let after = rpc.ok("pair_get", json!({ "name": n }))[0].clone();
        assert_eq!(after["state"], "PSUS", "{n}: {after}");
        assert_eq!(after["split_at_ns"], before[i]["split_at_ns"]);
        assert_eq!(after["changed_tracks"], before[i]["changed_tracks"]);
        assert!(
            after["pending_tracks"].as_u64() <= before[i]["pending_tracks"].as_u64(),
            "{n}: no full copy after the restart: {after}"
        );
    }
    assert_eq!(
        rpc.ok("pair_get", json!({"name": "slow"}))[0]["copied_tracks"],
        0
    );
    let img1_after = dir.path().join("img1-after.img");
    nbd_copy(&uri("slow-image"), img1_after.to_str().unwrap());
    assert_eq!(
        sha256_of(&img1_after),
        sha256_of(&img1),
        "slow's image changed"
    );
    // The image is P as it was at the split: the 8 MiB written before, not the 1 MiB after.
    let image = std::fs::read(&img1_after).unwrap();
    assert!(
        image[..8 << 20] == std::fs::read(&src).unwrap()[..],
        "slow's image is not P at the split"
    );

    // Damaged metadata is not trusted: the pair comes back suspended, saying why.
    drop(rpc);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).is_some());
    let meta = state.join("pairs/slow.meta");
    let mut bytes = std::fs::read(&meta).unwrap();
    let mid = bytes.len() / 2 + 100;
    bytes[mid] ^= 0x10;
    std::fs::write(&meta, bytes).unwrap();
    let _server = Server::start(&args);
    let mut rpc = RpcConn::connect(&sock);
    let slow = rpc.ok("pair_get", json!({"name": "slow"}))[0].clone();
    assert_eq!(slow["state"], "PSUE", "{slow}");
    assert!(
        slow["error"].as_str().unwrap().contains("checksum"),
        "{slow}"
    );
    assert_eq!(
        rpc.ok("pair_get", json!({"name": "pair0"}))[0]["state"],
        "PSUS"
    );
}
