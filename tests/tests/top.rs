//! `quicksplit top` on a real terminal: tmux runs it in an 80x24 pane while fio writes
//! through an NBD export; the pane shows the engine, and `q` gives the shell its terminal
//! back as it was.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use quicksplit_tests::{binary, start_empty, wait_for, RpcConn, Server, TempDir};
use serde_json::json;

/// The bdev exported and shown.
const BDEV: &str = "topdisk0";

/// A tmux server of the test's own (its socket in the test's directory), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// A server with one detached 80x24 session, `top`, running `sh`.
    fn start(dir: &Path) -> Self {
        let t = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let out = t.run(&[
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            "-s",
            "top",
            "sh",
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        t
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux (Debian package tmux)")
    }

    /// Types `text` and Enter.
    fn type_line(&self, text: &str) {
        assert!(self
            .run(&["send-keys", "-t", "top", "-l", text])
            .status
            .success());
        assert!(self
            .run(&["send-keys", "-t", "top", "Enter"])
            .status
            .success());
    }

    /// The pane's text, one string per row.
    fn screen(&self) -> Vec<String> {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        assert!(out.status.success(), "capture-pane: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A tmux format about the pane, e.g. `#{alternate_on}`.
    fn pane(&self, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", "top", format]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// fio writing 4 KiB blocks through the export until dropped.
struct Fio(Child);

impl Fio {
    fn start(nbd: &Path) -> Self {
        let child = Command::new("fio")
            .args([
                "--name=top",
                "--ioengine=nbd",
                &format!("--uri=nbd+unix:///{BDEV}?socket={}", nbd.display()),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=4",
                "--size=64m",
                "--time_based",
                "--runtime=120",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio (Debian package fio)");
        Fio(child)
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An engine with a RAM disk exported over NBD, fio writing to it, and `top` in a tmux pane.
struct Setup {
    tmux: Tmux,
    _fio: Fio,
    dir: TempDir,
    _server: Server,
    sock: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let (server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    rpc.ok(
        "bdev_malloc_create",
        json!({"name": BDEV, "size": 64 << 20}),
    );
    let nbd = dir.path().join("nbd.sock");
    rpc.ok(
        "nbd_export_start",
        json!({"name": BDEV, "bdev": BDEV, "socket": nbd}),
    );
    let fio = Fio::start(&nbd);
    let tmux = Tmux::start(dir.path());
    let s = Setup {
        tmux,
        _fio: fio,
        dir,
        _server: server,
        sock,
    };
    s.launch();
    s
}

impl Setup {
    /// Runs top in the pane's shell, which then says how it ended (`top-exit=N`).
    fn launch(&self) {
        self.tmux.type_line(&format!(
            "clear; echo before-top; {} top --socket {} --interval 0.5; echo top-exit=$?",
            binary("quicksplit").display(),
            self.sock.display()
        ));
    }

    /// Waits until top shows the bdev; the pane's text.
    fn wait_shown(&self) -> Vec<String> {
        let mut screen = Vec::new();
        let shown = wait_for(Duration::from_secs(30), || {
            screen = self.tmux.screen();
            row(&screen, BDEV).is_some()
        });
        assert!(shown, "top did not show {BDEV}: {screen:#?}");
        screen
    }

    /// Waits until top has ended; its exit status, after checking that the shell has its
    /// screen, cursor and cooked terminal back.
    fn wait_ended(&self) -> String {
        let t = &self.tmux;
        let mut after = Vec::new();
        assert!(
            wait_for(Duration::from_secs(10), || {
                after = t.screen();
                after.iter().any(|l| l.starts_with("top-exit="))
            }),
            "top did not end: {after:#?}"
        );
        assert_eq!(t.pane("#{alternate_on}"), "0");
        assert_eq!(t.pane("#{cursor_flag}"), "1");
        assert!(after.iter().any(|l| l == "before-top"), "{after:#?}");
        assert!(
            !after.iter().any(|l| l.starts_with("Reactors")),
            "{after:#?}"
        );
        let stty = self.dir.path().join("stty.txt");
        let _ = std::fs::remove_file(&stty);
        t.type_line(&format!("stty -a > {}", stty.display()));
        let mut modes = String::new();
        assert!(wait_for(Duration::from_secs(10), || {
            modes = std::fs::read_to_string(&stty).unwrap_or_default();
            modes.contains("icanon")
        }));
        let words: Vec<&str> = modes
            .split(|c: char| c.is_whitespace() || c == ';')
            .collect();
        for mode in ["icanon", "echo", "isig", "icrnl", "opost"] {
            assert!(words.contains(&mode), "{mode} off after top: {modes}");
        }
        let status = after
            .iter()
            .find_map(|l| l.strip_prefix("top-exit="))
            .unwrap_or_default();
        status.to_string()
    }
}

/// The cells of the pane's row that starts with `name`.
fn row(screen: &[String], name: &str) -> Option<Vec<String>> {
    screen
        .iter()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
}

#[test]
fn top_shows_the_engine_in_80x24_and_q_gives_the_terminal_back() {
    let s = setup("top");
    let t = &s.tmux;
    // The export's connection is fio's: the screen is live, not a first picture.
    let mut screen = Vec::new();
    let shown = wait_for(Duration::from_secs(30), || {
        screen = t.screen();
        screen
            .iter()
            .any(|l| l.starts_with(BDEV) && l.contains("NBD") && l.contains(" 1 "))
    });
    assert!(
        shown,
        "top did not show {BDEV} and fio's connection: {screen:#?}"
    );
    assert_eq!(
        t.pane("#{alternate_on}"),
        "1",
        "top runs on the alternate screen"
    );
    // The whole screen fits the pane: the title on the first row across the full width,
    // and every panel below it.
    assert!(screen.len() <= 24, "{screen:#?}");
    assert!(
        screen.iter().all(|l| l.chars().count() <= 80),
        "{screen:#?}"
    );
    assert!(screen[0].starts_with("quicksplit top"), "{screen:#?}");
    assert!(screen[0].ends_with("q: quit"), "{screen:#?}");
    assert_eq!(screen[0].chars().count(), 80, "{screen:#?}");
    let mut at = 0;
    for header in [
        "Reactors",
        "Bdevs (1)",
        "Exports (1)",
        "Pairs (0)",
        "Jobs (0)",
    ] {
        let i = screen
            .iter()
            .position(|l| l.starts_with(header))
            .unwrap_or_else(|| panic!("no {header}: {screen:#?}"));
        assert!(i > at, "{header} out of order: {screen:#?}");
        at = i;
    }
    assert_eq!(row(&screen, BDEV).expect("bdev row")[1], "malloc");

    t.run(&["send-keys", "-t", "top", "q"]);
    assert_eq!(s.wait_ended(), "0");
}

#[test]
fn ctrl_c_esc_and_sigterm_also_give_the_terminal_back() {
    let s = setup("top-keys");
    let t = &s.tmux;
    for key in ["C-c", "Escape"] {
        s.wait_shown();
        t.run(&["send-keys", "-t", "top", key]);
        assert_eq!(s.wait_ended(), "0", "after {key}");
        s.launch();
    }
    s.wait_shown();
    // top is the child of the pane's shell.
    let shell = t.pane("#{pane_pid}");
    let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
        .expect("children of the pane's shell");
    let top: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("top's pid");
    // SAFETY: kill(2) on a process this test started has no memory effects.
    assert_eq!(unsafe { libc::kill(top, libc::SIGTERM) }, 0);
    assert_eq!(s.wait_ended(), "143", "128 + SIGTERM");
}

/// A terminal that goes away (tmux killed) ends top: it must not stay behind reading the dead
/// terminal's end of input.
#[test]
fn top_ends_when_its_terminal_goes_away() {
    let s = setup("top-hangup");
    let t = &s.tmux;
    // top as the session's own command, as a terminal window runs it.
    let command = format!(
        "{} top --socket {} --interval 0.5",
        binary("quicksplit").display(),
        s.sock.display()
    );
    let out = t.run(&[
        "new-session",
        "-d",
        "-x",
        "80",
        "-y",
        "24",
        "-s",
        "direct",
        &command,
    ]);
    assert!(out.status.success(), "tmux new-session: {out:?}");
    let shown = wait_for(Duration::from_secs(30), || {
        let out = t.run(&["capture-pane", "-p", "-t", "direct"]);
        String::from_utf8_lossy(&out.stdout).contains(BDEV)
    });
    assert!(shown, "top did not start in the second session");
    let out = t.run(&["display", "-p", "-t", "direct", "#{pane_pid}"]);
    let top: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("top's pid");
    let out = t.run(&["kill-session", "-t", "direct"]);
    assert!(out.status.success(), "tmux kill-session: {out:?}");
    let gone = wait_for(Duration::from_secs(10), || {
        match std::fs::read_to_string(format!("/proc/{top}/stat")) {
            Err(_) => true,
            // A zombie has ended; it waits only for its parent.
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        }
    });
    // SAFETY: kill(2) on a process this test started has no memory effects; it only cleans up.
    unsafe { libc::kill(top, libc::SIGKILL) };
    assert!(
        gone,
        "top (pid {top}) still runs after its terminal went away"
    );
}

/// A rate as top prints it: `950`, `12.3k`, `1.2M`.
fn rate(cell: &str) -> Option<f64> {
    let (digits, scale) = match cell.as_bytes().last()? {
        b'k' => (&cell[..cell.len() - 1], 1e3),
        b'M' => (&cell[..cell.len() - 1], 1e6),
        _ => (cell, 1.0),
    };
    digits.parse::<f64>().ok().map(|v| v * scale)
}

#[test]
fn top_shows_the_bdev_write_rate_while_fio_writes() {
    let s = setup("top-iops");
    let mut screen = Vec::new();
    // Columns: name, driver, r/s, w/s, rMiB/s, wMiB/s.
    let writing = wait_for(Duration::from_secs(30), || {
        screen = s.tmux.screen();
        row(&screen, BDEV)
            .and_then(|cells| cells.get(3).and_then(|c| rate(c)))
            .is_some_and(|w| w > 0.0)
    });
    assert!(
        writing,
        "no write rate for {BDEV} while fio writes: {screen:#?}"
    );
    s.tmux.run(&["send-keys", "-t", "top", "q"]);
}
