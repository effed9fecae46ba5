//! `serve --metrics HOST:PORT`: the Prometheus endpoint scraped with curl and checked with
//! promtool, its counters rising under load, bad addresses refused at start, and clients that
//! stall, send garbage or never read unable to keep a scrape out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quicksplit_tests::{binary, wait_for, RpcConn, Server, TempDir};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// A served RAM disk `m` (exported over NBD) and a pair `pr`, with metrics on `port`.
struct Setup {
    dir: TempDir,
    _server: Server,
    rpc: RpcConn,
    port: u16,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let cfg = dir.path().join("cfg.json");
    let nbd = dir.path().join("nbd.sock");
    let config = json!({"config": [
        {"method": "bdev_malloc_create", "params": {"name": "m", "size": 16 * MIB}},
        {"method": "bdev_malloc_create", "params": {"name": "p", "size": 4 * MIB}},
        {"method": "bdev_malloc_create", "params": {"name": "s", "size": 4 * MIB}},
        {"method": "pair_create", "params": {"name": "pr", "primary": "p", "secondary": "s"}},
        {"method": "nbd_export_start", "params": {"name": "m", "bdev": "m", "socket": nbd}},
    ]});
    std::fs::write(&cfg, config.to_string()).expect("config");
    let sock = dir.path().join("rpc.sock");
    let state = dir.path().join("state");
    let port = quicksplit_tests::free_port();
    let server = Server::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--rpc-socket",
        sock.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--cores",
        "0-1",
        "--idle",
        "adaptive",
        "--metrics",
        &format!("127.0.0.1:{port}"),
    ]);
    let rpc = RpcConn::connect(&sock);
    Setup {
        dir,
        _server: server,
        rpc,
        port,
    }
}

/// `curl` of `path`: (HTTP status, body).
fn curl(port: u16, path: &str) -> (u32, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.parse().expect("status"), body.to_string())
}

fn scrape(port: u16) -> String {
    let (code, body) = curl(port, "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the series `name{labels}` in a scrape.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

/// `promtool check metrics` on `text`: the Prometheus project's own parser and linter.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package, see scripts/deps.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fio(sock: &Path, seconds: u32) -> Child {
    Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri=nbd+unix:///m?socket={}", sock.display()),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=4",
            "--size=8m",
            "--time_based",
            &format!("--runtime={seconds}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio")
}

#[test]
fn scrapes_parse_as_prometheus_text_and_counters_rise_under_load() {
    let mut s = setup("metrics-scrape");
    let first = scrape(s.port);
    promtool_check(&first);
    // Every family the contract names, with its HELP and TYPE.
    for (family, ty) in [
        ("quicksplit_bdev_read_ops_total", "counter"),
        ("quicksplit_bdev_write_ops_total", "counter"),
        ("quicksplit_bdev_read_bytes_total", "counter"),
        ("quicksplit_bdev_written_bytes_total", "counter"),
        ("quicksplit_bdev_read_latency_seconds", "histogram"),
        ("quicksplit_bdev_write_latency_seconds", "histogram"),
        ("quicksplit_pair_state", "gauge"),
        ("quicksplit_pair_pending_tracks", "gauge"),
        ("quicksplit_pair_changed_tracks", "gauge"),
        ("quicksplit_reactor_busy_seconds_total", "counter"),
        ("quicksplit_export_write_ops_total", "counter"),
    ] {
        assert!(
            first.contains(&format!("# HELP {family} ")),
            "{family}:\n{first}"
        );
        assert!(
            first.contains(&format!("# TYPE {family} {ty}\n")),
            "{family}:\n{first}"
        );
    }
    assert_eq!(
        value(&first, "quicksplit_bdev_write_ops_total{bdev=\"m\"}"),
        0.0
    );
    // Reactors on cores 0 and 1.
    value(&first, "quicksplit_reactor_busy_seconds_total{core=\"0\"}");
    value(&first, "quicksplit_reactor_busy_seconds_total{core=\"1\"}");

    // Under load, counters rise from one scrape to the next.
    let nbd = s.dir.path().join("nbd.sock");
    let mut load = fio(&nbd, 4);
    let writes = |t: &str| value(t, "quicksplit_bdev_write_ops_total{bdev=\"m\"}");
    let mut last = scrape(s.port);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let next = scrape(s.port);
            let rose = writes(&next) > writes(&last) && writes(&last) > 0.0;
            last = next;
            rose
        }),
        "write counter did not rise between two scrapes under load"
    );
    let _ = load.wait();
    let end = scrape(s.port);
    promtool_check(&end);
    let reads = value(&end, "quicksplit_bdev_read_ops_total{bdev=\"m\"}");
    let hist_count = value(
        &end,
        "quicksplit_bdev_read_latency_seconds_count{bdev=\"m\"}",
    );
    let inf = value(
        &end,
        "quicksplit_bdev_read_latency_seconds_bucket{bdev=\"m\",le=\"+Inf\"}",
    );
    assert!(reads > 0.0 && hist_count == reads && inf == reads, "{end}");
    // The figures are the RPC's.
    let st = s.rpc.ok("bdev_get_iostat", json!({"name": "m"}))["bdevs"][0].clone();
    assert_eq!(writes(&end) as u64, st["num_write_ops"].as_u64().unwrap());
    // The pair's state set: 1 for its state only.
    let state = s.rpc.ok("pair_get", json!({"name": "pr"}))[0]["state"].clone();
    let state = state.as_str().unwrap();
    for st in ["COPY", "PAIR", "PSUS", "PSUE"] {
        let v = value(
            &end,
            &format!("quicksplit_pair_state{{pair=\"pr\",state=\"{st}\"}}"),
        );
        assert_eq!(v, if st == state { 1.0 } else { 0.0 }, "{st}");
    }

    // Other paths and methods.
    assert_eq!(curl(s.port, "/").0, 404);
    assert_eq!(curl(s.port, "/metricsx").0, 404);
    assert_eq!(curl(s.port, "/metrics?x=1").0, 200);
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://127.0.0.1:{}/metrics", s.port))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "405");
}

#[test]
fn garbage_and_stalled_clients_do_not_keep_a_scrape_out() {
    let mut s = setup("metrics-clients");
    let addr = format!("127.0.0.1:{}", s.port);
    // More silent connections than the endpoint serves at once: the oldest make room.
    let silent: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Garbage, and a request that never ends.
    let mut garbage = TcpStream::connect(&addr).expect("connect");
    garbage.write_all(&[0xff; 3000]).expect("garbage");
    garbage.write_all(b"\r\n\r\n").expect("garbage");
    let mut endless = TcpStream::connect(&addr).expect("connect");
    endless.write_all(&[b'A'; 20_000]).expect("endless");
    // Clients that ask and never read their answer.
    let never_read: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).expect("connect");
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("ask");
            c
        })
        .collect();
    // A scrape still gets its answer, complete.
    promtool_check(&scrape(s.port));
    // The garbage got a 400, the endless request a 431 (or was closed to make room).
    let mut answer = String::new();
    garbage
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let _ = garbage.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400 "),
        "{answer}"
    );
    // The engine serves meanwhile.
    s.rpc.ok("bdev_get_iostat", json!({}));
    drop((silent, never_read, endless));
    promtool_check(&scrape(s.port));
}

/// `serve` with these arguments: its exit status and stderr, and whether it left a state
/// directory behind.
fn serve_fails(dir: &Path, metrics: &str) -> (Option<i32>, String, bool) {
    let state = dir.join("state");
    let cfg = dir.join("empty.json");
    std::fs::write(&cfg, r#"{"config": []}"#).expect("config");
    let out = Command::new(binary("quicksplit"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--rpc-socket", dir.join("rpc.sock").to_str().unwrap()])
        .args(["--cores", "0", "--idle", "adaptive", "--metrics", metrics])
        .output()
        .expect("serve");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        state.exists(),
    )
}

#[test]
fn bad_metrics_addresses_fail_serve_at_start() {
    let dir = TempDir::new("metrics-bad");
    for bad in [
        "nonsense",
        "127.0.0.1",
        "127.0.0.1:http",
        "127.0.0.1:70000",
        "no.such.host.invalid:9100",
    ] {
        let (code, err, started) = serve_fails(dir.path(), bad);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(
            err.contains("--metrics") && err.contains("HOST:PORT"),
            "{bad}: {err}"
        );
        assert!(!started, "{bad}: the state directory was made");
    }
    // A port in use: nothing else starts (no state directory, no RPC socket).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = taken.local_addr().expect("addr").to_string();
    let (code, err, started) = serve_fails(dir.path(), &at);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("--metrics {at}: cannot listen")),
        "{err}"
    );
    assert!(!started && !dir.path().join("rpc.sock").exists(), "{err}");
}
