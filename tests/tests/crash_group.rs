//! Process crashes during splits of several pairs in one call: the real binary, four pairs of
//! files, each round writes every P through NBD, asks for a split of all four in one request
//! and kills the engine with SIGKILL a random instant later (`QS_GROUP_KILLS` rounds, 30 by
//! default). After each restart:
//! - the four pairs are all split at one common instant, or none is; a split whose reply came
//!   before the kill is there, at the instant the reply gave;
//! - a pair split has its image (read through NBD) equal to P at the split, block for block;
//! - a pair not split is copying or mirroring.

use std::path::Path;
use std::time::Duration;

use quicksplit_tests::nbd::NbdClient;
use quicksplit_tests::{start_on, RpcConn, Server, TempDir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const BS: u64 = 4096;
const SIZE: u64 = 1 << 20;
const BLOCKS: u64 = SIZE / BS;
const PAIRS: usize = 4;

fn block_of(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    for chunk in b.chunks_exact_mut(16) {
        chunk[..8].copy_from_slice(&id.to_le_bytes());
        chunk[8..].copy_from_slice(&block.to_le_bytes());
    }
    b
}

/// The write id each block of an export holds (0: never written).
fn ids_of(nbd: &Path, export: &str) -> Vec<u64> {
    let mut c = NbdClient::connect(nbd, export).expect("connect");
    let data = c.read(0, SIZE as u32).expect("read the export");
    (0..BLOCKS)
        .map(|b| {
            let block = &data[(b * BS) as usize..((b + 1) * BS) as usize];
            let id = u64::from_le_bytes(block[..8].try_into().unwrap());
            let whole = if id == 0 {
                block.iter().all(|&x| x == 0)
            } else {
                block == block_of(id, b).as_slice()
            };
            assert!(whole, "{export} block {b} is torn or misplaced");
            id
        })
        .collect()
}

fn pairs(rpc: &mut RpcConn) -> Vec<Value> {
    let mut all = rpc.ok("pair_get", json!({})).as_array().unwrap().clone();
    all.sort_by_key(|p| p["name"].as_str().unwrap_or("").to_string());
    all
}

#[test]
fn sigkill_during_a_group_split_leaves_all_of_the_group_split_or_none() {
    let rounds: u64 = std::env::var("QS_GROUP_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut rng = StdRng::seed_from_u64(7);
    let dir = TempDir::new("crash-group");
    let state = dir.path().join("state");
    let sock = dir.path().join("rpc.sock");
    let nbd = state.join("nbd.sock");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"config": []}"#).unwrap();
    let mut server: Server = start_on(&state, &sock, Some(&empty));
    let mut rpc = RpcConn::connect(&sock);
    let names: Vec<String> = (0..PAIRS).map(|i| format!("vol{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        for side in ["p", "s"] {
            rpc.ok(
                "bdev_uring_create",
                json!({"name": format!("{side}{i}"), "filename": state.join(format!("{side}{i}.img")),
                       "size": SIZE}),
            );
        }
        rpc.ok(
            "pair_create",
            json!({"name": name, "primary": format!("p{i}"), "secondary": format!("s{i}"),
                   "track_size": 65536}),
        );
        rpc.ok(
            "nbd_export_start",
            json!({"name": format!("p{i}"), "bdev": format!("p{i}")}),
        );
        rpc.ok(
            "nbd_export_start",
            json!({"name": format!("img{i}"), "pair": name}),
        );
    }
    let mut p_model = vec![vec![0u64; BLOCKS as usize]; PAIRS];
    let mut next_id = 0u64;
    let (mut split_back, mut not_split_back) = (0, 0);
    for round in 0..rounds {
        // Pairs split by the last round mirror again.
        for p in pairs(&mut rpc) {
            if p["state"] == "PSUS" {
                rpc.ok("pair_resync", json!({"name": p["name"]}));
            }
        }
        for (i, model) in p_model.iter_mut().enumerate() {
            let mut c = NbdClient::connect(&nbd, &format!("p{i}")).expect("connect to P");
            for _ in 0..rng.gen_range(1..4) {
                let b = rng.gen_range(0..BLOCKS);
                next_id += 1;
                c.write(b * BS, &block_of(next_id, b)).expect("write P");
                model[b as usize] = next_id;
            }
        }
        let request = json!({"jsonrpc": "2.0", "id": 1, "method": "pair_split",
                             "params": {"names": names}});
        rpc.send(format!("{request}\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..4000)));
        server.signal(libc::SIGKILL);
        server.wait_exit(Duration::from_secs(10)).expect("killed");
        let acked = rpc
            .reply()
            .and_then(|r| r["result"]["split_at_ns"].as_u64());

        server = start_on(&state, &sock, None);
        rpc = RpcConn::connect(&sock);
        let back = pairs(&mut rpc);
        let states: Vec<(String, u64)> = back
            .iter()
            .map(|p| {
                let state = p["state"].as_str().unwrap().to_string();
                (state, p["split_at_ns"].as_u64().unwrap_or(0))
            })
            .collect();
        let split = states.iter().filter(|s| s.0 == "PSUS").count();
        assert!(
            split == 0 || split == PAIRS,
            "round {round}: {split} of {PAIRS} pairs came back split: {states:?}"
        );
        if let Some(at) = acked {
            assert!(
                states.iter().all(|s| s.0 == "PSUS" && s.1 == at),
                "round {round}: the split at {at} was acknowledged, the pairs came back {states:?}"
            );
        }
        if split == PAIRS {
            split_back += 1;
            assert!(
                states.iter().all(|s| s.1 == states[0].1),
                "round {round}: split at different instants: {states:?}"
            );
            for (i, model) in p_model.iter().enumerate() {
                assert_eq!(
                    &ids_of(&nbd, &format!("img{i}")),
                    model,
                    "round {round}: image {i} is not P at the split"
                );
            }
        } else {
            not_split_back += 1;
            assert!(
                states.iter().all(|s| s.0 == "COPY" || s.0 == "PAIR"),
                "round {round}: {states:?}"
            );
        }
    }
    println!(
        "{rounds} kills: the group came back split {split_back} times, not split {not_split_back}"
    );
    assert!(
        rounds < 20 || (split_back > 0 && not_split_back > 0),
        "the kills must land before and after the split is durable"
    );
}
