//! A `quicksplit serve` whose log (at debug) goes to a file the test reads, on a state
//! directory that outlives it (for restarts).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::RpcConn;

/// `quicksplit serve` logging at debug to a file, on a state directory that outlives it.
pub struct Logged {
    child: Child,
    log: PathBuf,
    sock: PathBuf,
}

impl Logged {
    /// Starts on `dir/state`, from `config` or (none) what the state directory holds; the
    /// log goes to `dir/<tag>.log`.
    pub fn start(dir: &Path, tag: &str, config: Option<&Path>) -> Self {
        let log = dir.join(format!("{tag}.log"));
        let sock = dir.join("rpc.sock");
        let mut cmd = Command::new(crate::binary("quicksplit"));
        cmd.arg("serve")
            .arg("--rpc-socket")
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--cores", "0-1", "--idle", "adaptive"]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .env("QUICKSPLIT_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log).expect("log file")))
            .spawn()
            .expect("start quicksplit serve");
        assert!(
            crate::wait_for(Duration::from_secs(20), || sock.exists()),
            "no RPC socket"
        );
        Logged { child, log, sock }
    }

    pub fn empty(dir: &Path, tag: &str) -> Self {
        let cfg = dir.join("empty.json");
        std::fs::write(&cfg, r#"{"config": []}"#).expect("write config");
        Self::start(dir, tag, Some(&cfg))
    }

    pub fn rpc(&self) -> RpcConn {
        RpcConn::connect(&self.sock)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).expect("read the log")).into_owned()
    }

    /// Waits (up to 10 s) for the log to hold `needle` `count` times or more.
    pub fn wait_logged(&self, needle: &str, count: usize) -> bool {
        crate::wait_for(Duration::from_secs(10), || {
            self.text().matches(needle).count() >= count
        })
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
