//! Thin volumes stay thin: the initial copy of a sparse primary reads only what it stores and
//! leaves the secondary's space as the primary's (holes punched over old data, stored zeroes
//! kept stored), byte for byte equal; NBD's write-zeroes punches a hole unless the client asks
//! for none (NO_HOLE), and NVMe/TCP's unless DEAC is clear.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use quicksplit_tests::nbd::{self, NbdClient};
use quicksplit_tests::{start_empty, wait_for, RpcConn, Server, TempDir};
use rand::{RngCore, SeedableRng};
use serde_json::json;

const MIB: u64 = 1 << 20;
const TRACK: u64 = 64 << 10;
const SIZE: u64 = 64 * MIB;

/// Bytes `path` has allocated on its file system.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// `path` has `want` bytes allocated for its data (and at most a few blocks more: the file
/// system counts the blocks of its extent tree too).
fn assert_space(path: &Path, want: u64) {
    let got = allocated(path);
    assert!(
        (want..=want + 16 * 4096).contains(&got),
        "{}: {got} bytes allocated, {want} wanted",
        path.display()
    );
}

/// Whether `len` bytes at `offset` of `path` are a hole (no data from `offset` to its end).
fn is_hole(path: &Path, offset: u64, len: u64) -> bool {
    let f = File::open(path).expect("open");
    match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(offset)) {
        Ok(data) => data >= offset + len,
        Err(rustix::io::Errno::NXIO) => true,
        Err(e) => panic!("lseek: {e}"),
    }
}

/// Whether the file system under `dir` zeroes a range in place (`FALLOC_FL_ZERO_RANGE`); where
/// it cannot, zeroes that must keep their space are a punched hole too.
fn zero_range_supported(dir: &Path) -> bool {
    let path = dir.join("zero-range-probe");
    let f = File::create(&path).expect("create");
    f.set_len(TRACK).expect("size");
    let flags = rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE;
    let ok = rustix::fs::fallocate(&f, flags, 0, TRACK).is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
    f.sync_all().expect("sync");
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .expect("open")
        .read_to_end(&mut v)
        .expect("read");
    v
}

/// Serves the uring files `p` and `s` as a pair "pr" of 64 KiB tracks, copying at `copy_rate`
/// bytes a second (0: no limit).
fn serve_pair(dir: &Path, p: &Path, s: &Path, copy_rate: u64) -> (Server, RpcConn) {
    let (server, sock) = start_empty(dir);
    let mut rpc = RpcConn::connect(&sock);
    for (name, path) in [("p", p), ("s", s)] {
        rpc.ok("bdev_uring_create", json!({"name": name, "filename": path}));
    }
    rpc.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s", "track_size": TRACK,
               "copy_rate": copy_rate}),
    );
    (server, rpc)
}

/// Waits until `pair` is in PAIR with nothing pending.
fn wait_mirrored(rpc: &mut RpcConn, pair: &str) {
    assert!(wait_for(Duration::from_secs(60), || {
        let pr = rpc.ok("pair_get", json!({ "name": pair }))[0].clone();
        pr["state"] == "PAIR" && pr["pending_tracks"] == 0
    }));
}

fn bytes_read(rpc: &mut RpcConn, bdev: &str) -> u64 {
    let r = rpc.ok("bdev_get_iostat", json!({ "name": bdev }));
    r["bdevs"][0]["bytes_read"].as_u64().expect("bytes_read")
}

/// A sparse primary (two tracks of data, four tracks of stored zeroes, one track with 4 KiB of
/// data, the rest holes) mirrored to a new sparse secondary and over one full of old data.
#[test]
fn the_initial_copy_of_a_thin_primary_reads_what_it_stores_and_leaves_a_thin_secondary() {
    let dir = TempDir::new("thin-initial-copy");
    let p = dir.path().join("p.img");
    File::create(&p)
        .expect("create")
        .set_len(SIZE)
        .expect("size");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut data = vec![0u8; TRACK as usize];
    for track in [3u64, 100] {
        rng.fill_bytes(&mut data);
        write_at(&p, track * TRACK, &data);
    }
    write_at(&p, 200 * TRACK, &vec![0u8; 4 * TRACK as usize]);
    rng.fill_bytes(&mut data[..4096]);
    write_at(&p, 500 * TRACK + 8192, &data[..4096]);
    let stored_tracks = 2 + 4 + 1;
    let p_data = read_all(&p);

    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    rpc.ok("bdev_uring_create", json!({"name": "p", "filename": p}));
    for (n, old_data) in [(0, false), (1, true)] {
        let s = dir.path().join(format!("s{n}.img"));
        if old_data {
            std::fs::write(&s, vec![0xab; SIZE as usize]).expect("old data");
            assert_eq!(allocated(&s), SIZE);
        } else {
            File::create(&s)
                .expect("create")
                .set_len(SIZE)
                .expect("size");
        }
        let (bdev, pair) = (format!("s{n}"), format!("pr{n}"));
        rpc.ok("bdev_uring_create", json!({"name": bdev, "filename": s}));
        let read_before = bytes_read(&mut rpc, "p");
        rpc.ok(
            "pair_create",
            json!({"name": pair, "primary": "p", "secondary": bdev, "track_size": TRACK}),
        );
        wait_mirrored(&mut rpc, &pair);

        // Only the tracks P stores were read (holes are known from its allocation).
        assert_eq!(
            bytes_read(&mut rpc, "p") - read_before,
            stored_tracks * TRACK
        );
        assert!(
            read_all(&s) == p_data,
            "S differs from P (old data: {old_data})"
        );
        // P's holes are holes of S: old data's space is given back.
        for (from, to) in [
            (0, 3),
            (4, 100),
            (101, 200),
            (204, 500),
            (501, SIZE / TRACK),
        ] {
            assert!(
                is_hole(&s, from * TRACK, (to - from) * TRACK),
                "tracks {from}..{to} of S are not a hole (old data: {old_data})"
            );
        }
        // What P stores S stores (its stored zeroes too, where the file system can keep them).
        let want = if zero_range_supported(dir.path()) {
            stored_tracks * TRACK
        } else {
            3 * TRACK
        };
        assert_space(&s, want);
        rpc.ok("pair_delete", json!({"name": pair}));
    }
}

/// `file` (4 MiB of 0xcd) after write-zeroes of its first MiB that may deallocate and of its
/// second that must not: both read as zeroes, the first is a hole, the second keeps its space
/// (where the file system can zero in place).
fn zeroed_with_a_hole_then_kept(file: &Path) {
    let got = read_all(file);
    assert!(got[..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(got[2 * MIB as usize..].iter().all(|&b| b == 0xcd));
    assert!(is_hole(file, 0, MIB), "the first MiB is not a hole");
    let dir = file.parent().expect("a directory");
    let kept = if zero_range_supported(dir) {
        3 * MIB
    } else {
        2 * MIB
    };
    assert_space(file, kept);
}

/// Write-zeroes through NBD: a hole without flags, stored zeroes with NO_HOLE; both read back
/// as zeroes.
#[test]
fn nbd_write_zeroes_punches_a_hole_unless_no_hole_is_asked() {
    let dir = TempDir::new("thin-nbd-zeroes");
    let file = dir.path().join("u.img");
    std::fs::write(&file, vec![0xcd; 4 * MIB as usize]).expect("data");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd_sock = dir.path().join("nbd.sock");
    rpc.ok("bdev_uring_create", json!({"name": "u", "filename": file}));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "u", "bdev": "u", "socket": nbd_sock}),
    );
    let mut c = NbdClient::connect(&nbd_sock, "u").expect("connect");
    for (offset, flags) in [(0, 0), (MIB, nbd::FLAG_NO_HOLE)] {
        c.send(nbd::WRITE_ZEROES, flags, offset, MIB as u32, &[]);
        let (_, err, _) = c.recv(0).expect("reply");
        assert_eq!(err, 0);
    }
    zeroed_with_a_hole_then_kept(&file);
}

/// Write-zeroes through NVMe/TCP, from quicksplit's initiator to its target: a hole with DEAC
/// set, stored zeroes without it.
#[test]
fn nvmf_write_zeroes_punches_a_hole_only_with_deac() {
    let dir = TempDir::new("thin-nvmf-zeroes");
    let file = dir.path().join("u.img");
    std::fs::write(&file, vec![0xcd; 4 * MIB as usize]).expect("data");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let port = quicksplit_tests::free_port();
    let nqn = "nqn.2026-12.io.quicksplit:thin";
    rpc.ok("bdev_uring_create", json!({"name": "u", "filename": file}));
    rpc.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": "u", "listen": format!("127.0.0.1:{port}")}),
    );
    let bdev = drivers::nvmf::attach(
        "n",
        drivers::nvmf::host::HostOptions::new("127.0.0.1", port, nqn),
        serde_json::Value::Null,
    )
    .expect("attach")
    .remove(0);
    let ctx = drivers::ChannelContext {
        queue_depth: 8,
        ..Default::default()
    };
    let mut ch = drivers::Bdev::open_channel(&bdev, &ctx).expect("channel");
    for (tag, deallocate) in [(0u64, true), (1, false)] {
        let op = drivers::IoOp::WriteZeroes { deallocate };
        let req = drivers::IoRequest::without_data(op, tag * MIB, MIB, tag);
        if let Err(e) = ch.submit(req) {
            panic!("write-zeroes {tag} refused: {:?}", e.error);
        }
    }
    let mut done = Vec::new();
    assert!(wait_for(Duration::from_secs(10), || {
        ch.poll(&mut done);
        done.len() == 2
    }));
    for d in &done {
        assert!(d.result.is_ok(), "{:?}", d.result);
    }
    zeroed_with_a_hole_then_kept(&file);
}

/// After a split with tracks still pending, a host write into a hole of P copies nothing before
/// it (P stores nothing there and S is a hole too), while one into P's data copies the old
/// track first, as always.
#[test]
fn a_copy_before_write_into_a_hole_reads_and_writes_nothing() {
    let dir = TempDir::new("thin-cow");
    let (p, s) = (dir.path().join("p.img"), dir.path().join("s.img"));
    for f in [&p, &s] {
        File::create(f)
            .expect("create")
            .set_len(16 * MIB)
            .expect("size");
    }
    let mut old = vec![0u8; TRACK as usize];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut old);
    write_at(&p, 100 * TRACK, &old);

    // One byte a second: the tracks stay pending.
    let (_server, mut rpc) = serve_pair(dir.path(), &p, &s, 1);
    let nbd_sock = dir.path().join("nbd.sock");
    rpc.ok(
        "nbd_export_start",
        json!({"name": "p", "bdev": "p", "socket": nbd_sock}),
    );
    rpc.ok("pair_split", json!({"name": "pr"}));
    let mut c = NbdClient::connect(&nbd_sock, "p").expect("connect");
    let new = vec![0x5au8; 4096];

    let before = bytes_read(&mut rpc, "p");
    c.write(150 * TRACK + 4096, &new)
        .expect("write into a hole");
    assert_eq!(bytes_read(&mut rpc, "p"), before, "the hole was read");
    assert!(is_hole(&s, 150 * TRACK, TRACK), "S's track was written");

    c.write(100 * TRACK + 4096, &new).expect("write over data");
    assert_eq!(bytes_read(&mut rpc, "p"), before + TRACK);
    let pr = rpc.ok("pair_get", json!({"name": "pr"}))[0].clone();
    assert_eq!(pr["cow_copies"], 2, "{pr}");
    assert_eq!(pr["state"], "PSUS", "{pr}");

    // The image keeps the split point's data, P has the new writes.
    let (s_data, p_data) = (read_all(&s), read_all(&p));
    let track = |v: &[u8], t: u64| v[(t * TRACK) as usize..((t + 1) * TRACK) as usize].to_vec();
    assert!(track(&s_data, 100) == old, "the image lost track 100");
    assert!(track(&s_data, 150).iter().all(|&b| b == 0));
    let mut want = old.clone();
    want[4096..8192].copy_from_slice(&new);
    assert!(track(&p_data, 100) == want);
    assert!(track(&p_data, 150)[4096..8192] == new[..]);
}

/// A verification of a thin pair reads only the tracks P or S stores something in (both
/// sides' holes are equal by their allocation), and still finds what differs there: S written
/// behind the engine's back in one of P's data tracks and in one of P's holes.
#[test]
fn a_verification_of_thin_volumes_reads_only_what_they_store() {
    let dir = TempDir::new("thin-verify");
    let (p, s) = (dir.path().join("p.img"), dir.path().join("s.img"));
    for f in [&p, &s] {
        File::create(f)
            .expect("create")
            .set_len(SIZE)
            .expect("size");
    }
    let mut data = vec![0u8; TRACK as usize];
    rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut data);
    for track in [3u64, 100] {
        write_at(&p, track * TRACK, &data);
    }
    let (_server, mut rpc) = serve_pair(dir.path(), &p, &s, 0);
    wait_mirrored(&mut rpc, "pr");
    // Behind the engine's back (the locks are advisory).
    for track in [100u64, 300] {
        write_at(&s, track * TRACK + 4096, &[0xee; 4096]);
    }
    let before = (bytes_read(&mut rpc, "p"), bytes_read(&mut rpc, "s"));
    let id = rpc.ok("pair_verify", json!({"name": "pr"}))["id"]
        .as_u64()
        .expect("id");
    let mut info = json!(null);
    assert!(wait_for(Duration::from_secs(60), || {
        info = rpc.ok("verify_get", json!({ "id": id }))[0].clone();
        info["state"] != "running"
    }));
    assert_eq!(info["state"], "done", "{info}");
    assert_eq!(info["tracks_checked"], SIZE / TRACK, "{info}");
    assert_eq!(info["mismatched_tracks"], 2, "{info}");
    assert_eq!(info["first_mismatches"], json!([100, 300]), "{info}");
    // Tracks 3, 100 and 300 were read on each side, nothing else.
    let after = (bytes_read(&mut rpc, "p"), bytes_read(&mut rpc, "s"));
    assert_eq!(after.0 - before.0, 3 * TRACK, "P");
    assert_eq!(after.1 - before.1, 3 * TRACK, "S");
}
