//! Pull-mode incremental backup over NBD, as libvirt's backup API does it with QEMU: a pair's
//! image export offers `qemu:dirty-bitmap:<checkpoint>` for each checkpoint; `nbdinfo --map`
//! shows exactly the tracks P changed since the checkpoint, and copying only those extents of
//! the image (nbdcopy, through nbdkit's offset filter on both ends) over the checkpoint's full
//! backup gives P at the new split byte for byte.

use std::process::Command;
use std::time::Duration;

use quicksplit_tests::nbd::NbdClient;
use quicksplit_tests::{
    nbd_unix_uri, nbdinfo_map, run_ok, start_empty, wait_backup, wait_for, RpcConn, TempDir,
};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const TRACK: u64 = 64 << 10;

fn pair_is(rpc: &mut RpcConn, state: &str) -> bool {
    let p = rpc.ok("pair_get", json!({"name": "pr"}));
    p[0]["state"] == state && p[0]["pending_tracks"] == 0
}

fn backup(rpc: &mut RpcConn, params: Value) {
    let id = rpc.ok("backup_start", params)["id"].as_u64().unwrap();
    let b = wait_backup(rpc, id, Duration::from_secs(60));
    assert_eq!(b["state"], "done", "{b}");
}

#[test]
fn a_pull_mode_incremental_over_the_dirty_bitmap_equals_p_at_the_split() {
    let dir = TempDir::new("dirty");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd = dir.path().join("nbd.sock");
    for n in ["p", "s"] {
        let file = dir.path().join(format!("{n}.img"));
        rpc.ok(
            "bdev_uring_create",
            json!({"name": n, "filename": file, "size": SIZE}),
        );
    }
    rpc.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s", "track_size": TRACK}),
    );
    rpc.ok(
        "nbd_export_start",
        json!({"name": "p", "bdev": "p", "socket": nbd}),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut first = vec![0u8; SIZE as usize];
    rng.fill(&mut first[..]);
    let src = dir.path().join("first.img");
    std::fs::write(&src, &first).unwrap();
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &nbd_unix_uri(&nbd, "p")]));
    assert!(wait_for(Duration::from_secs(60), || pair_is(
        &mut rpc, "PAIR"
    )));

    // The full backup makes checkpoint c1.
    rpc.ok("pair_split", json!({"name": "pr"}));
    let full = dir.path().join("full.img");
    backup(
        &mut rpc,
        json!({"pair": "pr", "target": {"type": "file", "path": full}, "checkpoint": "c1"}),
    );
    rpc.ok("pair_resync", json!({"name": "pr"}));
    assert!(wait_for(Duration::from_secs(60), || pair_is(
        &mut rpc, "PAIR"
    )));

    // Writes to P, in a few tracks; then the next split.
    let mut c = NbdClient::connect(&nbd, "p").expect("connect");
    let offsets = [
        0,
        5 * TRACK + 4096,
        5 * TRACK + 8192,
        9 * TRACK - 4096,
        SIZE - 4096,
    ];
    let mut dirty: Vec<u64> = offsets.iter().map(|o| o / TRACK).collect();
    dirty.dedup();
    for &o in &offsets {
        c.write(o, &[rng.gen::<u8>() | 1; 4096]).expect("write");
    }
    drop(c);
    rpc.ok("pair_split", json!({"name": "pr"}));
    // After the split, P changes again: the image keeps the split.
    let mut c = NbdClient::connect(&nbd, "p").expect("connect");
    c.write(7 * TRACK, &[0xee; 4096]).expect("write");
    drop(c);
    rpc.ok(
        "nbd_export_start",
        json!({"name": "img", "pair": "pr", "socket": nbd}),
    );
    let img = nbd_unix_uri(&nbd, "img");

    // The listing names the checkpoint's bitmap on the image export, not on P's.
    let list_uri = format!("nbd+unix://?socket={}", nbd.display());
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &list_uri]));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    for e in listed["exports"].as_array().unwrap() {
        let contexts = e["contexts"].to_string();
        let has = contexts.contains("qemu:dirty-bitmap:c1");
        assert_eq!(has, e["export-name"] == "img", "{e}");
    }

    // The dirty extents are the tracks written since c1 (and the one written after the split:
    // a superset the copy handles, it reads the image).
    let extents = nbdinfo_map(&img, Some("qemu:dirty-bitmap:c1"));
    let mut got: Vec<u64> = Vec::new();
    let mut at = 0;
    for &(off, len, kind) in &extents {
        assert_eq!(off, at, "{extents:?}");
        at += len;
        if kind == 1 {
            got.extend((off / TRACK)..(off + len) / TRACK);
        }
    }
    assert_eq!(at, SIZE, "{extents:?}");
    let mut want = dirty.clone();
    want.push(7);
    want.sort_unstable();
    assert_eq!(got, want, "{extents:?}");

    // The pull: the full backup, then only the dirty extents of the image over it.
    let inc = dir.path().join("inc.img");
    std::fs::copy(&full, &inc).unwrap();
    for &(off, len, kind) in &extents {
        if kind != 1 {
            continue;
        }
        let (off, range) = (off.to_string(), len.to_string());
        run_ok(Command::new("nbdcopy").args([
            "--",
            "[",
            "nbdkit",
            "--exit-with-parent",
            "--filter=offset",
            "nbd",
            &format!("socket={}", nbd.display()),
            "export=img",
            &format!("offset={off}"),
            &format!("range={range}"),
            "]",
            "[",
            "nbdkit",
            "--exit-with-parent",
            "--filter=offset",
            "file",
            inc.to_str().unwrap(),
            &format!("offset={off}"),
            &format!("range={range}"),
            "]",
        ]));
    }
    let whole = dir.path().join("whole.img");
    run_ok(Command::new("nbdcopy").args([&img, whole.to_str().unwrap()]));
    let (a, b) = (std::fs::read(&inc).unwrap(), std::fs::read(&whole).unwrap());
    assert!(
        a == b,
        "the incremental over the full backup is not the image"
    );
    // And the image is not the full backup: the incremental carried the changes.
    assert!(std::fs::read(&full).unwrap() != b);

    // No such checkpoint: no such context.
    let out = Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:nope", &img])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a map of an unknown bitmap succeeded"
    );
    // A deleted checkpoint's bitmap is gone from new connections.
    rpc.ok("checkpoint_delete", json!({"pair": "pr", "name": "c1"}));
    let out = Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:c1", &img])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a deleted checkpoint's bitmap is still offered"
    );
}
