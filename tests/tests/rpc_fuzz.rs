//! 10,000 generated malformed requests (random bytes, truncated JSON, wrong types, huge numbers,
//! deep nesting, a 10 MiB request, disconnects mid-request): the server stays up, still answers,
//! and its open file descriptors come back to their count before the test.

use std::time::Duration;

use quicksplit_tests::{fd_count, start_empty, wait_for, RpcConn, TempDir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const METHODS: &[&str] = &[
    "bdev_get_bdevs",
    "pair_get",
    "pair_split",
    "pair_resync",
    "pair_delete",
    "bdev_delete",
    "backup_get",
    "backup_cancel",
    "checkpoint_list",
    "checkpoint_delete",
    "nbd_get_exports",
    "framework_get_reactors",
    "rpc_get_methods",
    "load_config",
    "pair_create",
    "bdev_malloc_create",
];

#[test]
fn fuzzed_methods_are_declared() {
    for m in METHODS {
        assert!(
            engine::rpc::methods::method(m).is_some(),
            "{m} is not in the method table"
        );
    }
}

fn weird_value(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..12) {
        0 => json!(null),
        1 => json!(rng.gen::<bool>()),
        2 => json!(rng.gen::<i64>()),
        3 => json!(u64::MAX),
        4 => json!(-1),
        5 => json!(1.5e300),
        6 => json!("x".repeat(rng.gen_range(0..300))),
        7 => json!([1, "a", null]),
        8 => json!({"nested": {"deeper": [1, 2, 3]}}),
        9 => json!(""),
        10 => json!("../../../../etc/passwd"),
        _ => json!(rng.gen::<u32>()),
    }
}

fn malformed(rng: &mut StdRng, i: usize) -> (Vec<u8>, bool) {
    let method = METHODS[rng.gen_range(0..METHODS.len())];
    // (bytes, keep reading replies on this connection)
    match i % 10 {
        0 => {
            let n = rng.gen_range(1..512);
            ((0..n).map(|_| rng.gen()).collect(), false)
        }
        1 => {
            let full = json!({"jsonrpc": "2.0", "id": i, "method": method, "params": {"name": "x"}})
                .to_string();
            let cut = rng.gen_range(1..full.len());
            (full.as_bytes()[..cut].to_vec(), false)
        }
        2 | 3 => {
            let mut params = serde_json::Map::new();
            for key in ["name", "names", "primary", "secondary", "size", "track_size", "copy_rate", "direction", "config", "id", "bogus"] {
                if rng.gen_bool(0.3) {
                    params.insert(key.to_string(), weird_value(rng));
                }
            }
            // Never a real malloc create: sizes are kept out of the map's weird values above
            // except as wrong types or absurd numbers.
            if method == "bdev_malloc_create" {
                params.insert("size".into(), json!(["not", "a", "size"]));
            }
            (
                format!("{}\n", json!({"jsonrpc": "2.0", "id": i, "method": method, "params": params}))
                    .into_bytes(),
                true,
            )
        }
        4 => {
            let depth = rng.gen_range(200..20_000);
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(rng.gen_range(0..depth)));
            (s.into_bytes(), false)
        }
        5 => (
            format!(
                "{{\"jsonrpc\": \"2.0\", \"id\": {}, \"method\": \"pair_get\", \"params\": {{\"name\": 1{}}}}}\n",
                i,
                "0".repeat(rng.gen_range(20..400))
            )
            .into_bytes(),
            true,
        ),
        6 => (
            format!("{}\n", json!({"jsonrpc": "2.0", "id": weird_value(rng), "method": weird_value(rng)}))
                .into_bytes(),
            true,
        ),
        7 => (b"\xff\xfe{\"jsonrpc\"".to_vec(), false),
        8 => (
            format!("{}\n", json!({"jsonrpc": "2.0", "id": i, "method": method, "params": weird_value(rng)}))
                .into_bytes(),
            true,
        ),
        _ => (
            format!(
                "{{\"jsonrpc\": \"2.0\", \"id\": {i}, \"method\": \"{method}\", \"params\": {{\"name\": \"\\u{:04x}\"}}}}\n",
                rng.gen::<u16>()
            )
            .into_bytes(),
            true,
        ),
    }
}

#[test]
fn ten_thousand_malformed_requests_leave_the_server_serving() {
    let dir = TempDir::new("rpc-fuzz");
    let (server, sock) = start_empty(dir.path());
    let mut probe = RpcConn::connect(&sock);
    probe.ok(
        "bdev_malloc_create",
        json!({"name": "keep", "size": 1 << 20}),
    );
    drop(probe);
    std::thread::sleep(Duration::from_millis(200));
    let fds_before = fd_count(server.pid());
    let seed: u64 = std::env::var("QS_SEED").map_or(0xF00D, |s| s.parse().unwrap());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent = 0;
    let mut reused = RpcConn::connect(&sock);
    while sent < 10_000 {
        let (bytes, keep) = malformed(&mut rng, sent);
        sent += 1;
        if keep {
            // Well-framed JSON: the server answers (an error) and keeps the connection.
            reused.send(&bytes).unwrap();
            let r = reused.reply().unwrap_or_else(|| {
                panic!(
                    "seed {seed}: no reply to {}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            assert!(
                r.get("error").is_some() || r.get("result").is_some(),
                "seed {seed}: {r}"
            );
            if r["error"]["code"] == -32700 {
                // Not JSON after all (a number beyond f64): the server closed this connection.
                assert!(reused.reply().is_none());
                reused = RpcConn::connect(&sock);
            }
            continue;
        }
        // Garbage, truncated or nested: a fresh connection, dropped mid-request half the time.
        let mut c = RpcConn::connect(&sock);
        let _ = c.send(&bytes);
        if rng.gen_bool(0.5) {
            // Close our side and read whatever the server answers until it closes too.
            c.finish_sending();
            while c.reply_raw().is_some() {}
        }
    }
    // One 10 MiB request.
    let mut big = RpcConn::connect(&sock);
    let payload = format!(
        "{{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"pair_get\", \"params\": {{\"name\": \"{}\"}}}}",
        "y".repeat(10 << 20)
    );
    let _ = big.send(payload.as_bytes());
    let _ = big.reply();
    drop(big);
    drop(reused);

    let mut c = RpcConn::connect(&sock);
    let methods = c.ok("rpc_get_methods", json!({}));
    assert!(methods.as_array().unwrap().contains(&json!("pair_get")));
    assert_eq!(
        c.ok("bdev_get_bdevs", json!({"name": "keep"}))[0]["name"],
        "keep"
    );
    drop(c);
    assert!(
        wait_for(Duration::from_secs(10), || fd_count(server.pid())
            <= fds_before),
        "seed {seed}: open fds {} after the test, {fds_before} before",
        fd_count(server.pid())
    );
}
