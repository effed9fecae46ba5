//! What `quicksplit serve` logs, read from its stderr as an operator reads it: one audit line
//! per state-changing RPC (with the error of a failing one), one line per NBD client connecting
//! and disconnecting with its peer, no escape bytes in a log file, JSON lines with
//! `--log-format json`, colours only on a terminal without `NO_COLOR`, and `log_set_level`.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quicksplit_tests::nbd::NbdClient;
use quicksplit_tests::{binary, wait_for, RpcConn, TempDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const INVALID_PARAMS: i64 = -32602;
const NOT_FOUND: i64 = -32001;

/// A `quicksplit serve` on an empty configuration whose stderr goes to `log`; killed on drop.
struct Logged {
    dir: TempDir,
    child: Child,
    log: PathBuf,
    sock: PathBuf,
}

impl Logged {
    /// Starts it at `QUICKSPLIT_LOG=info`, with `NO_COLOR` unset, and `extra` arguments.
    fn start(tag: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let log = dir.path().join("serve.log");
        let stderr = File::create(&log).expect("log file");
        let cmd = serve_command(dir.path(), extra);
        let child = with_stderr(cmd, Stdio::from(stderr))
            .env_remove("NO_COLOR")
            .spawn()
            .expect("start quicksplit serve");
        let sock = dir.path().join("rpc.sock");
        Logged {
            dir,
            child,
            log,
            sock,
        }
    }

    fn rpc(&self) -> RpcConn {
        RpcConn::connect(&self.sock)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).expect("read the log")).into_owned()
    }

    /// The log's lines holding every one of `needles`.
    fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// Waits until a line holds every one of `needles`.
    fn wait_line(&self, needles: &[&str]) {
        assert!(
            wait_for(Duration::from_secs(10), || !self
                .lines_with(needles)
                .is_empty()),
            "no line with {needles:?} in the log:\n{}",
            self.text()
        );
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `quicksplit serve` on an empty configuration in `dir`, at `QUICKSPLIT_LOG=info`.
fn serve_command(dir: &Path, extra: &[&str]) -> Command {
    let config = dir.join("empty.json");
    std::fs::write(&config, r#"{"config": []}"#).expect("write config");
    let mut cmd = Command::new(binary("quicksplit"));
    cmd.arg("serve")
        .arg("--rpc-socket")
        .arg(dir.join("rpc.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--cores", "0-1", "--idle", "adaptive", "--config"])
        .arg(&config)
        .args(extra)
        .env("QUICKSPLIT_LOG", "info")
        .stdout(Stdio::null());
    cmd
}

fn with_stderr(mut cmd: Command, stderr: Stdio) -> Command {
    cmd.stderr(stderr);
    cmd
}

/// RAM disks `p` and `s` paired as `pair0`, mirrored (PAIR).
fn mirrored_pair(rpc: &mut RpcConn) {
    for n in ["p", "s"] {
        rpc.ok("bdev_malloc_create", json!({"name": n, "size": 4 * MIB}));
    }
    rpc.ok(
        "pair_create",
        json!({"name": "pair0", "primary": "p", "secondary": "s"}),
    );
    assert!(wait_for(Duration::from_secs(10), || {
        rpc.ok("pair_get", json!({"name": "pair0"}))[0]["state"] == "PAIR"
    }));
}

#[test]
fn a_split_and_a_reverse_resync_each_log_one_audit_line_naming_the_pair() {
    let e = Logged::start("logs-audit", &[]);
    let mut rpc = e.rpc();
    mirrored_pair(&mut rpc);
    let split = Command::new(binary("quicksplit"))
        .args(["split", "--socket"])
        .arg(&e.sock)
        .arg("pair0")
        .output()
        .expect("quicksplit split");
    assert!(split.status.success(), "{split:?}");
    rpc.ok(
        "pair_resync",
        json!({"name": "pair0", "direction": "reverse"}),
    );
    // Each call's line is written before its reply.
    let splits = e.lines_with(&["rpc call done", r#"method="pair_split""#]);
    assert_eq!(splits.len(), 1, "{splits:#?}");
    assert!(splits[0].contains("INFO"), "{}", splits[0]);
    assert!(
        splits[0].contains(r#"params={"names":["pair0"]}"#),
        "{}",
        splits[0]
    );
    assert!(
        splits[0].contains("split_at_ns"),
        "the result: {}",
        splits[0]
    );
    let resyncs = e.lines_with(&["rpc call", r#"method="pair_resync""#]);
    assert_eq!(resyncs.len(), 1, "{resyncs:#?}");
    assert!(
        resyncs[0].contains(r#"params={"direction":"reverse","name":"pair0"}"#)
            && resyncs[0].contains("result=true"),
        "{}",
        resyncs[0]
    );
    // The pair's creation is in the trail too; reading calls are not (at info).
    assert_eq!(e.lines_with(&[r#"method="pair_create""#]).len(), 1);
    assert!(e.lines_with(&[r#"method="pair_get""#]).is_empty());
}

#[test]
fn a_failing_state_changing_call_logs_its_error_code_and_message() {
    let e = Logged::start("logs-fail", &[]);
    let mut rpc = e.rpc();
    let (code, message) = rpc.err("pair_split", json!({"name": "nowhere"}));
    assert_eq!(code, NOT_FOUND);
    let failed = e.lines_with(&["rpc call failed", r#"method="pair_split""#]);
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0].contains("error_code=-32001") && failed[0].contains(&message),
        "{}",
        failed[0]
    );
    assert!(failed[0].contains("nowhere"), "{}", failed[0]);
    // The engine goes on serving.
    assert_eq!(rpc.ok("pair_get", json!({})), json!([]));
}

#[test]
fn an_nbd_client_connecting_and_disconnecting_gives_one_line_each_with_its_peer() {
    let e = Logged::start("logs-nbd", &[]);
    let mut rpc = e.rpc();
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    let nbd_sock = e.dir.path().join("nbd.sock");
    rpc.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "socket": nbd_sock}),
    );
    let uri = format!("nbd+unix:///m?socket={}", nbd_sock.display());
    let client = Command::new("nbdinfo")
        .arg(&uri)
        .stdout(Stdio::null())
        .spawn()
        .expect("nbdinfo");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let peer = format!(r#"peer="pid {} uid {uid}""#, client.id());
    let done = client.wait_with_output().expect("nbdinfo ran");
    assert!(done.status.success(), "{done:?}");
    e.wait_line(&["client disconnected", &peer]);
    let connected = e.lines_with(&["client connected", &peer]);
    assert_eq!(connected.len(), 1, "{connected:#?}");
    assert!(
        connected[0].contains(r#"protocol="NBD""#) && connected[0].contains(r#"export="m""#),
        "{}",
        connected[0]
    );
    let gone = e.lines_with(&["client disconnected", &peer]);
    assert_eq!(gone.len(), 1, "{gone:#?}");
    assert!(
        gone[0].contains(r#"reason="client closed""#) && gone[0].contains(r#"export="m""#),
        "{}",
        gone[0]
    );
    assert!(gone[0].contains(" requests="), "{}", gone[0]);

    // On TCP the peer is the client's address.
    let port = 40000 + (std::process::id() % 20000) as u16;
    rpc.ok(
        "nbd_export_start",
        json!({"name": "t", "bdev": "m", "listen": format!("127.0.0.1:{port}")}),
    );
    let tcp = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{port}/t"))
        .output()
        .expect("nbdinfo");
    assert!(tcp.status.success(), "{tcp:?}");
    let tcp_peer = r#"peer="127.0.0.1:"#;
    e.wait_line(&["client disconnected", r#"export="t""#, tcp_peer]);
    assert_eq!(
        e.lines_with(&["client connected", r#"export="t""#, tcp_peer])
            .len(),
        1
    );

    // A client still connected when its export stops is told why it goes: stop.
    let mut held = NbdClient::connect(&nbd_sock, "m").expect("connect");
    held.read(0, 4096).expect("a read");
    let ours = format!(r#"peer="pid {} uid {uid}""#, std::process::id());
    e.wait_line(&["client connected", r#"export="m""#, &ours]);
    rpc.ok("nbd_export_stop", json!({"name": "m"}));
    e.wait_line(&[
        "client disconnected",
        &ours,
        r#"reason="stop""#,
        "requests=1",
    ]);
    drop(held);
}

#[test]
fn a_log_file_holds_no_escape_bytes() {
    let e = Logged::start("logs-plain", &[]);
    let mut rpc = e.rpc();
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": MIB}));
    rpc.err("bdev_delete", json!({"name": "absent"}));
    e.wait_line(&["rpc call failed", r#"method="bdev_delete""#]);
    let bytes = std::fs::read(&e.log).expect("read the log");
    assert!(
        !bytes.contains(&0x1b),
        "escape bytes in the log file:\n{}",
        e.text()
    );
}

#[test]
fn json_lines_each_parse_and_carry_the_call_fields() {
    let e = Logged::start("logs-json", &["--log-format", "json"]);
    let mut rpc = e.rpc();
    mirrored_pair(&mut rpc);
    rpc.ok("pair_split", json!({"name": "pair0"}));
    rpc.err("pair_split", json!({"name": "pair0"}));
    let lines: Vec<Value> = e
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|err| panic!("not JSON ({err}): {l}")))
        .collect();
    let splits: Vec<&Value> = lines
        .iter()
        .filter(|l| l["method"] == "pair_split")
        .collect();
    assert_eq!(splits.len(), 2, "{splits:#?}");
    assert_eq!(splits[0]["level"], "INFO");
    assert_eq!(splits[0]["message"], "rpc call done");
    assert_eq!(splits[0]["params"], r#"{"name":"pair0"}"#);
    let result: Value = serde_json::from_str(splits[0]["result"].as_str().expect("result"))
        .expect("the result is JSON");
    assert_eq!(result["pairs"][0]["name"], "pair0");
    assert_eq!(splits[1]["message"], "rpc call failed");
    assert_eq!(splits[1]["error_code"], -32003);
    assert!(
        splits[1]["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("pid ")),
        "{}",
        splits[1]
    );
}

#[test]
fn log_set_level_changes_what_appears_and_bad_levels_are_refused() {
    let e = Logged::start("logs-level", &[]);
    let mut rpc = e.rpc();
    assert_eq!(rpc.ok("log_get_level", json!({})), json!("info"));
    rpc.ok("pair_get", json!({}));
    let pair_get = [r#"method="pair_get""#];
    assert!(e.lines_with(&pair_get).is_empty(), "pair_get at info");

    assert_eq!(
        rpc.ok("log_set_level", json!({"level": "debug"})),
        json!("debug")
    );
    rpc.ok("pair_get", json!({}));
    let debug = e.lines_with(&pair_get);
    assert_eq!(debug.len(), 1, "{debug:#?}");
    assert!(debug[0].contains("DEBUG"), "{}", debug[0]);

    assert_eq!(
        rpc.ok("log_set_level", json!({"level": "warn"})),
        json!("warn")
    );
    rpc.ok("bdev_malloc_create", json!({"name": "quiet", "size": MIB}));
    rpc.ok("pair_get", json!({}));
    assert!(
        e.lines_with(&[r#"method="bdev_malloc_create""#]).is_empty(),
        "an info line at warn"
    );
    assert_eq!(e.lines_with(&pair_get).len(), 1, "a debug line at warn");

    for bad in [
        json!({"level": "verbose"}),
        json!({"level": ""}),
        json!({"level": "engine=loud"}),
        json!({"level": 3}),
        json!({}),
        json!({"level": "info", "extra": 1}),
    ] {
        let (code, message) = rpc.err("log_set_level", bad.clone());
        assert_eq!(code, INVALID_PARAMS, "{bad}: {message}");
    }
    // The level in force is unchanged, and the engine keeps serving.
    assert_eq!(rpc.ok("log_get_level", json!({})), json!("warn"));
    assert_eq!(rpc.ok("bdev_get_bdevs", json!({}))[0]["name"], "quiet");
    // Directives work too (given back in the filter's own order).
    let mixed = rpc.ok(
        "log_set_level",
        json!({"level": "warn,engine::rpc::audit=info"}),
    );
    let mut directives: Vec<&str> = mixed.as_str().expect("a string").split(',').collect();
    directives.sort_unstable();
    assert_eq!(directives, ["engine::rpc::audit=info", "warn"]);
    rpc.ok("bdev_delete", json!({"name": "quiet"}));
    assert_eq!(e.lines_with(&[r#"method="bdev_delete""#]).len(), 1);
}

/// A pseudo-terminal: the controlling side, and the terminal a child writes to.
fn pty() -> (File, File) {
    // SAFETY: posix_openpt takes flags only; the result is checked.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(master >= 0, "posix_openpt failed");
    // SAFETY: `master` is a descriptor we just opened and own from here on.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(master) });
    use std::os::fd::AsRawFd;
    let fd = master.as_raw_fd();
    // SAFETY: grantpt and unlockpt on a pty master we hold; results checked.
    assert_eq!(unsafe { libc::grantpt(fd) }, 0, "grantpt");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::unlockpt(fd) }, 0, "unlockpt");
    let mut name = [0u8; 128];
    // SAFETY: the buffer and its length are ours; ptsname_r writes a NUL-terminated name.
    let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr().cast(), name.len()) };
    assert_eq!(rc, 0, "ptsname_r");
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let path = String::from_utf8_lossy(&name[..end]).into_owned();
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    (master, terminal)
}

/// What `serve` writes on a terminal stderr, with `NO_COLOR` set to `no_color` (or unset),
/// while it runs one RPC call.
fn on_a_terminal(no_color: Option<&str>) -> Vec<u8> {
    let dir = TempDir::new("logs-tty");
    let (mut master, terminal) = pty();
    let mut cmd = with_stderr(serve_command(dir.path(), &[]), Stdio::from(terminal));
    match no_color {
        Some(v) => cmd.env("NO_COLOR", v),
        None => cmd.env_remove("NO_COLOR"),
    };
    let mut child = cmd.spawn().expect("start quicksplit serve");
    // Drop our copy of the terminal (moved into `cmd`) so the reader sees the end.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        // Ends with EIO once no process holds the terminal.
        let _ = master.read_to_end(&mut out);
        out
    });
    let mut rpc = RpcConn::connect(&dir.path().join("rpc.sock"));
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": MIB}));
    drop(rpc);
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("serve stopped");
    assert!(status.success(), "{status:?}");
    let out = reader.join().expect("reader");
    assert!(
        String::from_utf8_lossy(&out).contains("rpc call done"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    out
}

#[test]
fn colours_only_on_a_terminal_without_no_color() {
    assert!(
        on_a_terminal(None).contains(&0x1b),
        "no colours on a terminal"
    );
    assert!(
        !on_a_terminal(Some("1")).contains(&0x1b),
        "colours with NO_COLOR=1"
    );
}
