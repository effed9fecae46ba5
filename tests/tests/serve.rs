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
