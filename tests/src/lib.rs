//! Helpers for quicksplit's integration tests: locating the built binaries, temporary state
//! directories, a running `quicksplit serve` that is stopped when dropped, an RPC connection and
//! a small NBD client.

pub mod logged;
pub mod nbd;
pub mod nvmf;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of a binary built by `cargo build --workspace` next to this test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Makes a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        let n: u64 = rand::random();
        let p = std::env::temp_dir().join(format!("qs-{tag}-{}-{n:x}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `quicksplit serve`, killed on drop if still running.
pub struct Server {
    child: Option<Child>,
}

impl Server {
    /// Starts `quicksplit serve` with extra arguments (reactors adaptive on at most 2 cores).
    pub fn start(args: &[&str]) -> Self {
        let child = Command::new(binary("quicksplit"))
            .arg("serve")
            .args(args)
            .env(
                "QUICKSPLIT_LOG",
                std::env::var("QUICKSPLIT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start quicksplit serve");
        Server { child: Some(child) }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `f` is true or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A TCP port on 127.0.0.1 free a moment ago (the listener that found it is closed).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The descriptors an epoll set watches, as its `/proc/PID/fdinfo/FD` lists them: (fd,
/// events, data).
pub fn epoll_fdinfo_watches(fdinfo: &str) -> Vec<(i32, u32, u64)> {
    fdinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[0] == "tfd:" && f[2] == "events:" && f[4] == "data:").then(|| {
                (
                    f[1].parse().expect("tfd"),
                    u32::from_str_radix(f[3], 16).expect("events"),
                    u64::from_str_radix(f[5], 16).expect("data"),
                )
            })
        })
        .collect()
}

/// Runs a client command that must succeed; its output (the failure shows both its streams).
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `nbdinfo --map[=CONTEXT] URI`: (offset, length, type) of each extent it prints
/// (`base:allocation` when `context` is `None`).
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let arg = context.map_or("--map".to_string(), |c| format!("--map={c}"));
    let out = run_ok(Command::new("nbdinfo").args([&arg, uri]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap_or_else(|_| panic!("line '{l}'"));
            (n(0), n(1), n(2) as u32)
        })
        .collect()
}

/// The NBD URI of `export` on the Unix socket `sock`, as libnbd and QEMU write it.
pub fn nbd_unix_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// The SHA-256 of a file, as GNU coreutils' `sha256sum` computes it (hex).
pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("sha256sum {}: {e}", path.display()));
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The `sha256-tree` digest of a file as `quicksplit digest` prints it (what `backup_get`
/// reports as `digest`).
pub fn tree_digest_of(path: &Path) -> String {
    let out = Command::new(binary("quicksplit"))
        .arg("digest")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("quicksplit digest {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "quicksplit digest {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// Polls `backup_get` until backup `id` is no longer running (at most `limit`); its last report.
pub fn wait_backup(rpc: &mut RpcConn, id: u64, limit: Duration) -> serde_json::Value {
    let mut info = serde_json::Value::Null;
    assert!(
        wait_for(limit, || {
            info = rpc.ok("backup_get", serde_json::json!({ "id": id }))[0].clone();
            info["state"] != "running"
        }),
        "backup {id} did not end"
    );
    info
}

/// A raw JSON-RPC connection to the engine's socket.
pub struct RpcConn {
    stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    next_id: u64,
}

impl RpcConn {
    /// Connects (retrying for up to 10 s while the server starts).
    pub fn connect(path: &Path) -> Self {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("timeout");
                    let reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                    return RpcConn {
                        stream,
                        reader,
                        next_id: 1,
                    };
                }
                Err(e) if Instant::now() > end => panic!("connect {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.stream.write_all(bytes)
    }

    /// Shuts down the sending side (the server sees end of file).
    pub fn finish_sending(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Reads one reply line, JSON or not; `None` at end of file or after 5 s of silence.
    pub fn reply_raw(&mut self) -> Option<String> {
        use std::io::BufRead;
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    /// Reads one reply line as JSON; `None` when the server closed the connection.
    pub fn reply(&mut self) -> Option<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("reply is JSON")),
        }
    }

    /// Calls a method and returns the whole reply object.
    pub fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send(format!("{req}\n").as_bytes()).expect("send");
        let r = self.reply().expect("a reply");
        assert_eq!(r["id"], id, "reply out of order: {r}");
        r
    }

    /// Calls and returns the result, panicking on an error reply.
    pub fn ok(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let r = self.call(method, params);
        assert!(r.get("error").is_none(), "{method} failed: {r}");
        r["result"].clone()
    }

    /// Calls and returns the error code and message, panicking on success.
    pub fn err(&mut self, method: &str, params: serde_json::Value) -> (i64, String) {
        let r = self.call(method, params);
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{method} succeeded: {r}"));
        (
            e["code"].as_i64().expect("code"),
            e["message"].as_str().expect("message").to_string(),
        )
    }
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Starts `quicksplit serve` on two adaptive reactors with its state in `state` and its RPC
/// socket at `sock`, from `config` (none: what the state directory holds).
pub fn start_on(state: &Path, sock: &Path, config: Option<&Path>) -> Server {
    let mut args = vec![
        "--rpc-socket",
        sock.to_str().expect("utf-8"),
        "--state-dir",
        state.to_str().expect("utf-8"),
        "--cores",
        "0-1",
        "--idle",
        "adaptive",
    ];
    if let Some(c) = config {
        args.extend(["--config", c.to_str().expect("utf-8")]);
    }
    Server::start(&args)
}

/// Starts `quicksplit serve` with an empty configuration in `dir`, its socket at `dir/rpc.sock`.
pub fn start_empty(dir: &Path) -> (Server, PathBuf) {
    let cfg = dir.join("empty.json");
    std::fs::write(&cfg, r#"{"config": []}"#).expect("write config");
    let sock = dir.join("rpc.sock");
    (start_on(&dir.join("state"), &sock, Some(&cfg)), sock)
}

/// Makes pair "pr" of two RAM disks "p" and "s" of `size` bytes (with `copy_rate` when given)
/// and exports P over NBD as "p" on the socket `nbd`.
pub fn ram_pair(rpc: &mut RpcConn, size: u64, copy_rate: Option<u64>, nbd: &Path) {
    rpc.ok(
        "bdev_malloc_create",
        serde_json::json!({"name": "p", "size": size}),
    );
    rpc.ok(
        "bdev_malloc_create",
        serde_json::json!({"name": "s", "size": size}),
    );
    let mut pair = serde_json::json!({"name": "pr", "primary": "p", "secondary": "s"});
    if let Some(rate) = copy_rate {
        pair["copy_rate"] = serde_json::json!(rate);
    }
    rpc.ok("pair_create", pair);
    rpc.ok(
        "nbd_export_start",
        serde_json::json!({"name": "p", "bdev": "p", "socket": nbd}),
    );
}
