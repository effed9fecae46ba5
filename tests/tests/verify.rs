//! Verification and full resync through the real binary, on uring bdevs over files: S
//! corrupted behind the engine's back is found track for track and repaired byte for byte; a
//! pair written by fio through NBD while verified shows no mismatch; a full resync copies
//! every track (forward, and in reverse onto a damaged P); bad requests get clear errors.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use quicksplit_tests::{binary, start_empty, wait_for, RpcConn, Server, TempDir};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const TRACK: u64 = 64 << 10;
const TRACKS: u64 = SIZE / TRACK;

struct Setup {
    _server: Server,
    rpc: RpcConn,
    sock: PathBuf,
    p: PathBuf,
    s: PathBuf,
    dir: TempDir,
}

/// P holds random data, S zeroes; the pair `pr` over them is mirrored (PAIR, nothing pending).
fn mirrored_pair(tag: &str, seed: u64) -> Setup {
    let dir = TempDir::new(tag);
    let (p, s) = (dir.path().join("p.img"), dir.path().join("s.img"));
    let mut data = vec![0u8; SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    std::fs::write(&p, &data).expect("write P");
    std::fs::write(&s, vec![0u8; SIZE as usize]).expect("write S");
    let (server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    for (name, file) in [("p", &p), ("s", &s)] {
        rpc.ok(
            "bdev_uring_create",
            json!({"name": name, "filename": file, "size": SIZE}),
        );
    }
    rpc.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s"}),
    );
    wait_mirrored(&mut rpc);
    Setup {
        _server: server,
        rpc,
        sock,
        p,
        s,
        dir,
    }
}

fn pair(rpc: &mut RpcConn) -> Value {
    rpc.ok("pair_get", json!({"name": "pr"}))[0].clone()
}

/// Waits until the pair is in PAIR with nothing pending.
fn wait_mirrored(rpc: &mut RpcConn) {
    let mut last = Value::Null;
    assert!(
        wait_for(Duration::from_secs(60), || {
            last = pair(rpc);
            last["state"] == "PAIR" && last["pending_tracks"] == 0
        }),
        "the pair did not reach PAIR: {last}"
    );
}

/// Polls `verify_get` until verification `id` has ended; its last report.
fn wait_verify(rpc: &mut RpcConn, id: u64) -> Value {
    let mut info = Value::Null;
    assert!(
        wait_for(Duration::from_secs(60), || {
            info = rpc.ok("verify_get", json!({ "id": id }))[0].clone();
            info["state"] != "running"
        }),
        "verification {id} did not end: {info}"
    );
    info
}

/// Flips bytes of `count` distinct random tracks of `file`, straight into the file (the
/// engine does not see it); returns the tracks.
fn corrupt(file: &Path, count: usize, seed: u64) -> BTreeSet<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tracks = BTreeSet::new();
    while tracks.len() < count {
        tracks.insert(rng.gen_range(0..TRACKS));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open for corruption");
    for &t in &tracks {
        let at = t * TRACK + rng.gen_range(0..TRACK - 512);
        let mut bytes = vec![0u8; 512];
        f.read_exact_at(&mut bytes, at).expect("read");
        bytes.iter_mut().for_each(|b| *b ^= 0xa5);
        f.write_all_at(&bytes, at).expect("write");
    }
    // On the disk, not only in the page cache: the engine may read with O_DIRECT.
    f.sync_all().expect("sync");
    tracks
}

fn same_files(a: &Path, b: &Path) -> bool {
    let (a, b) = (
        std::fs::read(a).expect("read"),
        std::fs::read(b).expect("read"),
    );
    a[..SIZE as usize] == b[..SIZE as usize]
}

fn cli(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("quicksplit"))
        .args(args)
        .args(["--socket", sock.to_str().expect("utf-8")])
        .output()
        .expect("run quicksplit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn id_of(v: &Value) -> u64 {
    v["id"].as_u64().expect("an id")
}

#[test]
fn corrupted_tracks_of_s_are_found_exactly_and_repaired_byte_for_byte() {
    let mut t = mirrored_pair("verify-repair", 1);
    let intact = t.rpc.ok("pair_verify", json!({"name": "pr"}));
    let info = wait_verify(&mut t.rpc, id_of(&intact));
    assert_eq!(info["state"], "done", "{info}");
    assert_eq!(info["mismatched_tracks"], 0, "{info}");
    assert_eq!(info["tracks_checked"], TRACKS, "{info}");
    assert_eq!(
        info["bytes_checked"], SIZE,
        "nothing pending, every byte compared: {info}"
    );

    let bad = corrupt(&t.s, 20, 2);
    // Without --repair the CLI reports the mismatches and exits 1.
    let (code, out, err) = cli(&t.sock, &["verify", "pr", "--wait"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("done: 20 mismatched tracks (repaired 0)"),
        "{out}{err}"
    );
    let id: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no id in {out}"));
    let info = t.rpc.ok("verify_get", json!({ "id": id }))[0].clone();
    let found: BTreeSet<u64> = info["first_mismatches"]
        .as_array()
        .expect("first_mismatches")
        .iter()
        .map(|v| v.as_u64().expect("a track"))
        .collect();
    assert_eq!(found, bad, "{info}");
    assert_eq!(info["repaired"], 0, "{info}");
    assert_eq!(pair(&mut t.rpc)["state"], "PAIR");
    assert!(!same_files(&t.p, &t.s));

    // --repair: every mismatched track is copied again, and S equals P.
    let (code, out, err) = cli(&t.sock, &["verify", "pr", "--repair", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("done: 20 mismatched tracks (repaired 20)"),
        "{out}{err}"
    );
    wait_mirrored(&mut t.rpc);
    assert!(same_files(&t.p, &t.s), "S differs from P after the repair");
    let again = t.rpc.ok("pair_verify", json!({"name": "pr"}));
    let info = wait_verify(&mut t.rpc, id_of(&again));
    assert_eq!(
        (info["state"].clone(), info["mismatched_tracks"].clone()),
        (json!("done"), json!(0)),
        "{info}"
    );
}

#[test]
fn verifying_while_fio_writes_through_nbd_finds_no_mismatch() {
    let mut t = mirrored_pair("verify-fio", 3);
    let nbd = t.dir.path().join("nbd.sock");
    t.rpc.ok(
        "nbd_export_start",
        json!({"name": "p", "bdev": "p", "socket": nbd}),
    );
    let uri = format!("nbd+unix:///p?socket={}", nbd.display());
    let fio = Command::new("fio")
        .args([
            "--name=hosts",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={SIZE}"),
            "--time_based",
            "--runtime=8",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio (Debian package fio)");
    // Verifications one after another while fio writes; hosts active, so each goes at the
    // host rate and with few reads in flight.
    let mut runs = Vec::new();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let id = id_of(&t.rpc.ok(
            "pair_verify",
            json!({"name": "pr", "rate": 1u64 << 30, "host_rate": 64 * MIB}),
        ));
        runs.push(wait_verify(&mut t.rpc, id));
    }
    let out = fio.wait_with_output().expect("fio");
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value =
        serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).expect("fio JSON");
    let writes = report["jobs"][0]["write"]["total_ios"]
        .as_u64()
        .unwrap_or(0);
    assert!(writes > 1000, "fio wrote only {writes} blocks");
    for info in &runs {
        assert_eq!(info["state"], "done", "{info}");
        assert_eq!(info["mismatched_tracks"], 0, "{info}");
        assert_eq!(info["tracks_checked"], TRACKS, "{info}");
        let compared = TRACKS - info["tracks_skipped"].as_u64().expect("tracks_skipped");
        assert!(compared > 0, "nothing compared: {info}");
    }
    assert!(
        runs.iter().any(|i| i["host_yields"].as_u64() > Some(0)),
        "no verification yielded to fio: {runs:?}"
    );
    // Once the copier has caught up, S equals P.
    t.rpc.ok("nbd_export_stop", json!({"name": "p"}));
    wait_mirrored(&mut t.rpc);
    assert!(same_files(&t.p, &t.s));
}

#[test]
fn a_full_resync_copies_every_track_forward_and_in_reverse() {
    let mut t = mirrored_pair("verify-full", 4);
    // Forward, from PAIR: S damaged behind the engine's back is copied again everywhere.
    corrupt(&t.s, 10, 5);
    let before = pair(&mut t.rpc)["copied_tracks"].as_u64().expect("copied");
    t.rpc.ok("pair_resync", json!({"name": "pr", "full": true}));
    wait_mirrored(&mut t.rpc);
    let after = pair(&mut t.rpc)["copied_tracks"].as_u64().expect("copied");
    assert!(
        after - before >= TRACKS,
        "copied {} of {TRACKS} tracks",
        after - before
    );
    assert!(
        same_files(&t.p, &t.s),
        "S differs from P after a full resync"
    );

    // Reverse, from a split: P damaged behind the engine's back is restored from S.
    t.rpc.ok("pair_split", json!({"name": "pr"}));
    let image = std::fs::read(&t.s).expect("read S");
    corrupt(&t.p, 10, 6);
    t.rpc.ok(
        "pair_resync",
        json!({"name": "pr", "direction": "reverse", "full": true}),
    );
    wait_mirrored(&mut t.rpc);
    assert_eq!(pair(&mut t.rpc)["restored_tracks"], TRACKS);
    let p = std::fs::read(&t.p).expect("read P");
    assert!(
        p[..SIZE as usize] == image[..SIZE as usize],
        "P is not the image after a full restore"
    );
    assert!(same_files(&t.p, &t.s));
}

#[test]
fn bad_verify_requests_get_clear_errors_and_the_engine_keeps_serving() {
    let mut t = mirrored_pair("verify-bad", 7);
    let (code, msg) = t.rpc.err("pair_verify", json!({"name": "nope"}));
    assert_eq!(code, -32001, "{msg}");
    assert!(msg.contains("nope"), "{msg}");
    let (code, msg) = t
        .rpc
        .err("pair_verify", json!({"name": "pr", "rate": "fast"}));
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("rate"), "{msg}");
    let (code, msg) = t.rpc.err("pair_verify", json!({"name": "pr", "speed": 1}));
    assert_eq!(code, -32602, "{msg}");
    let (code, _) = t.rpc.err("verify_get", json!({"id": 999}));
    assert_eq!(code, -32001);
    let (code, _) = t.rpc.err("verify_cancel", json!({"id": 999}));
    assert_eq!(code, -32001);
    let (code, msg) = t.rpc.err(
        "pair_resync",
        json!({"name": "pr", "direction": "reverse", "full": true}),
    );
    assert_eq!(code, -32003, "{msg}");

    // A slow verification: a second one is refused, the pair cannot be deleted, and
    // `quicksplit cancel` stops it.
    let id = id_of(&t.rpc.ok("pair_verify", json!({"name": "pr", "rate": MIB})));
    let (code, msg) = t.rpc.err("pair_verify", json!({"name": "pr"}));
    assert_eq!(code, -32002, "{msg}");
    let (code, msg) = t.rpc.err("pair_delete", json!({"name": "pr"}));
    assert_eq!(code, -32002, "{msg}");
    let (code, out, err) = cli(&t.sock, &["cancel", &id.to_string()]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("verify {id} cancelled").as_str()),
        "{err}"
    );
    let info = t.rpc.ok("verify_get", json!({ "id": id }))[0].clone();
    assert_eq!(info["state"], "cancelled", "{info}");
    assert!(info["tracks_checked"].as_u64() < Some(TRACKS), "{info}");

    // A split pair is not verified: P and S differ there by design.
    t.rpc.ok("pair_split", json!({"name": "pr"}));
    let (code, msg) = t.rpc.err("pair_verify", json!({"name": "pr"}));
    assert_eq!(code, -32003, "{msg}");
    assert!(msg.contains("PSUS"), "{msg}");
    let (code, _, err) = cli(&t.sock, &["verify", "pr"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("PSUS"), "{err}");

    // Still serving; the ids of backups and verifications do not collide.
    assert_eq!(pair(&mut t.rpc)["state"], "PSUS");
    t.rpc.ok("pair_resync", json!({"name": "pr"}));
    wait_mirrored(&mut t.rpc);
    let next = id_of(&t.rpc.ok("pair_verify", json!({"name": "pr"})));
    assert!(next > id);
    let info = wait_verify(&mut t.rpc, next);
    assert_eq!(info["mismatched_tracks"], 0, "{info}");
    assert_eq!(
        t.rpc.ok("verify_get", json!({})).as_array().map(Vec::len),
        Some(2)
    );
}
