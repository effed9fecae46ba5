//! I/O statistics: `bdev_get_iostat` counts exactly what clients sent through NBD (fio with a
//! known number of requests, on a RAM disk, whose requests are served in place, and on a file)
//! and NVMe/TCP (qsbench, which reports how many requests completed); exports and pairs count
//! theirs in `nbd_get_exports`, `nvmf_get_exports` and `pair_get`.

use std::path::Path;
use std::process::Command;

use quicksplit_tests::{binary, run_ok, start_empty, RpcConn, TempDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// fio through NBD: exactly `n` requests of 4 KiB (`rw` is randread or randwrite).
fn fio(sock: &Path, export: &str, rw: &str, n: u64) {
    let out = run_ok(Command::new("fio").args([
        "--name=count",
        "--ioengine=nbd",
        &format!("--uri=nbd+unix:///{export}?socket={}", sock.display()),
        &format!("--rw={rw}"),
        "--bs=4k",
        "--iodepth=8",
        "--size=8m",
        &format!("--number_ios={n}"),
        "--output-format=json",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).expect("JSON");
    let job = &v["jobs"][0];
    let dir = if rw == "randread" { "read" } else { "write" };
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job[dir]["total_ios"], n, "fio issued another count: {job}");
}

fn iostat(rpc: &mut RpcConn, bdev: &str) -> Value {
    let r = rpc.ok("bdev_get_iostat", json!({ "name": bdev }));
    assert!(r["tick_rate"].as_u64().unwrap() > 0, "{r}");
    assert!(r["ticks"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["bdevs"].as_array().unwrap().len(), 1, "{r}");
    r["bdevs"][0].clone()
}

fn export<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e[key] == name)
        .unwrap_or_else(|| panic!("no export {name} in {list}"))
}

#[test]
fn fio_through_nbd_is_counted_exactly_on_malloc_and_uring_bdevs() {
    let dir = TempDir::new("iostat-nbd");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd = dir.path().join("nbd.sock");
    let file = dir.path().join("u.img");
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 16 * MIB}));
    rpc.ok(
        "bdev_uring_create",
        json!({"name": "u", "filename": file, "size": 16 * MIB}),
    );
    for b in ["m", "u"] {
        rpc.ok(
            "nbd_export_start",
            json!({"name": b, "bdev": b, "socket": nbd}),
        );
        let before = iostat(&mut rpc, b);
        assert_eq!(
            (
                before["num_read_ops"].as_u64(),
                before["num_write_ops"].as_u64()
            ),
            (Some(0), Some(0)),
            "{before}"
        );
        fio(&nbd, b, "randwrite", 1000);
        fio(&nbd, b, "randread", 700);
        let s = iostat(&mut rpc, b);
        assert_eq!(s["name"], b);
        assert_eq!(s["num_write_ops"], 1000, "{b}: {s}");
        assert_eq!(s["bytes_written"], 1000 * 4096, "{b}: {s}");
        assert_eq!(s["num_read_ops"], 700, "{b}: {s}");
        assert_eq!(s["bytes_read"], 700 * 4096, "{b}: {s}");
        assert_eq!(s["num_errors"], 0, "{b}: {s}");
        // SPDK's latency fields, and percentiles in microseconds.
        for op in ["read", "write"] {
            let sum = s[format!("{op}_latency_ticks")].as_u64().unwrap();
            let max = s[format!("max_{op}_latency_ticks")].as_u64().unwrap();
            let min = s[format!("min_{op}_latency_ticks")].as_u64().unwrap();
            assert!(min <= max && max <= sum && sum > 0, "{b} {op}: {s}");
            let p = &s[format!("{op}_latency_us")];
            let (p50, p99, p999) = (
                p["p50"].as_f64().unwrap(),
                p["p99"].as_f64().unwrap(),
                p["p99_9"].as_f64().unwrap(),
            );
            assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{b} {op}: {p}");
        }
        // The export counted the same requests.
        let list = rpc.ok("nbd_get_exports", json!({}));
        let e = export(&list, "name", b);
        assert_eq!(
            (e["num_write_ops"].as_u64(), e["bytes_written"].as_u64()),
            (Some(1000), Some(1000 * 4096)),
            "{e}"
        );
        assert_eq!(
            (e["num_read_ops"].as_u64(), e["bytes_read"].as_u64()),
            (Some(700), Some(700 * 4096)),
            "{e}"
        );
    }
    // Every bdev without a name, in SPDK's shape.
    let all = rpc.ok("bdev_get_iostat", json!({}));
    let names: Vec<&str> = all["bdevs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["m", "u"]);
    // An unknown bdev is an error reply; the engine goes on.
    let (code, msg) = rpc.err("bdev_get_iostat", json!({"name": "nope"}));
    assert_eq!(code, -32001, "{msg}");
    let (code, _) = rpc.err("bdev_get_iostat", json!({"name": 5}));
    assert_eq!(code, -32602);
    assert_eq!(iostat(&mut rpc, "m")["num_write_ops"], 1000);
}

#[test]
fn host_io_through_a_pair_is_counted_on_the_pair_and_on_its_devices() {
    let dir = TempDir::new("iostat-pair");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd = dir.path().join("nbd.sock");
    rpc.ok("bdev_malloc_create", json!({"name": "p", "size": 16 * MIB}));
    rpc.ok("bdev_malloc_create", json!({"name": "s", "size": 16 * MIB}));
    rpc.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s"}),
    );
    assert!(quicksplit_tests::wait_for(
        std::time::Duration::from_secs(30),
        || { rpc.ok("pair_get", json!({"name": "pr"}))[0]["state"] == "PAIR" }
    ));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "p", "bdev": "p", "socket": nbd}),
    );
    let s_before = iostat(&mut rpc, "s");
    fio(&nbd, "p", "randwrite", 600);
    fio(&nbd, "p", "randread", 300);
    let pair = rpc.ok("pair_get", json!({"name": "pr"}))[0].clone();
    assert_eq!(pair["host_num_write_ops"], 600, "{pair}");
    assert_eq!(pair["host_bytes_written"], 600 * 4096, "{pair}");
    assert_eq!(pair["host_num_read_ops"], 300, "{pair}");
    assert_eq!(pair["host_bytes_read"], 300 * 4096, "{pair}");
    // P's device: each host write reaches it once (the copier only reads P), each host read
    // once too; S's: the copier's writes, whole tracks.
    let p = iostat(&mut rpc, "p");
    assert_eq!(p["num_write_ops"], 600, "{p}");
    assert!(p["num_read_ops"].as_u64().unwrap() >= 300, "{p}");
    assert!(quicksplit_tests::wait_for(
        std::time::Duration::from_secs(30),
        || { rpc.ok("pair_get", json!({"name": "pr"}))[0]["pending_tracks"] == 0 }
    ));
    let s = iostat(&mut rpc, "s");
    let copied = s["bytes_written"].as_u64().unwrap() - s_before["bytes_written"].as_u64().unwrap();
    assert!(
        copied > 0 && copied.is_multiple_of(65536),
        "S gets whole tracks: {s}"
    );
}

#[test]
fn qsbench_through_nvme_tcp_is_counted_exactly() {
    let dir = TempDir::new("iostat-nvmf");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let nqn = "nqn.2026-11.io.quicksplit:iostat";
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 16 * MIB}));
    rpc.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": "m", "listen": format!("127.0.0.1:{port}")}),
    );
    let mut done = [0u64; 2];
    for (i, workload) in ["randwrite", "randread"].iter().enumerate() {
        let out = run_ok(Command::new(binary("qsbench")).args([
            "--bdev",
            &format!("nvmf:127.0.0.1:{port}:{nqn}"),
            "--workload",
            workload,
            "--qd",
            "4",
            "--time",
            "1",
            "--cores",
            "0",
            "--idle",
            "adaptive",
            "--json",
        ]));
        let v: Value = serde_json::from_slice(&out.stdout).expect("qsbench JSON");
        assert_eq!(v["errors"], 0, "{v}");
        done[i] = v["ios"].as_u64().unwrap();
        assert!(done[i] > 0, "{v}");
    }
    let s = iostat(&mut rpc, "m");
    assert_eq!(s["num_write_ops"], done[0], "{s}");
    assert_eq!(s["bytes_written"], done[0] * 4096, "{s}");
    assert_eq!(s["num_read_ops"], done[1], "{s}");
    assert_eq!(s["bytes_read"], done[1] * 4096, "{s}");
    let list = rpc.ok("nvmf_get_exports", json!({}));
    let e = export(&list, "nqn", nqn);
    assert_eq!(
        (e["num_write_ops"].as_u64(), e["num_read_ops"].as_u64()),
        (Some(done[0]), Some(done[1])),
        "{e}"
    );
}

#[test]
fn serve_no_stats_counts_nothing_and_serves_as_usual() {
    let dir = TempDir::new("iostat-off");
    let cfg = dir.path().join("empty.json");
    std::fs::write(&cfg, r#"{"config": []}"#).expect("config");
    let sock = dir.path().join("rpc.sock");
    let state = dir.path().join("state");
    let _server = quicksplit_tests::Server::start(&[
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
        "--no-stats",
    ]);
    let mut rpc = RpcConn::connect(&sock);
    let nbd = dir.path().join("nbd.sock");
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 16 * MIB}));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "socket": nbd}),
    );
    fio(&nbd, "m", "randwrite", 200);
    let s = iostat(&mut rpc, "m");
    assert_eq!(
        (s["num_write_ops"].as_u64(), s["bytes_written"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    let list = rpc.ok("nbd_get_exports", json!({}));
    assert_eq!(export(&list, "name", "m")["num_write_ops"], 0, "{list}");
}
