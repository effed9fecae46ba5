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
