//! NBD block status (`base:allocation`) with real clients: `nbdinfo --map`, `qemu-img map` and
//! `nbdcopy` see the holes of a sparse file behind a uring bdev, a RAM disk's unwritten chunks
//! read as zeroes, a pair's image answers per track; bad block status requests and malformed
//! metadata context options get their errors while the connection goes on.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use quicksplit_tests::nbd::{
    self, contexts_of, meta_context_data, NbdClient, Negotiation, EINVAL, FLAG_REQ_ONE,
    OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
};
use quicksplit_tests::{nbd_unix_uri, nbdinfo_map, run_ok, start_empty, RpcConn, Server, TempDir};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Where the sparse volume holds data (offset, length); holes everywhere else.
const WRITTEN: [(u64, u64); 3] = [(MIB, 64 * KIB), (10 * MIB, 2 * MIB), (SIZE - MIB, MIB)];
/// `base:allocation` types as nbdinfo prints them.
const DATA: u32 = 0;
const ZERO: u32 = 2;
const HOLE_ZERO: u32 = 3;

/// Bytes the file system stores for `path`.
fn stored(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A sparse file of `SIZE` bytes with random data at `WRITTEN`: its content, or `None` (with a
/// message) when the file system keeps no holes.
fn sparse_volume(path: &Path) -> Option<Vec<u8>> {
    let f = File::create(path).expect("create");
    f.set_len(SIZE).expect("size");
    let mut content = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (off, len) in WRITTEN {
        let piece = &mut content[off as usize..(off + len) as usize];
        rng.fill(piece);
        f.write_all_at(piece, off).expect("write");
    }
    f.sync_all().expect("sync");
    if stored(path) >= SIZE / 2 {
        eprintln!(
            "skipped: the file system of {} keeps no holes",
            path.display()
        );
        return None;
    }
    Some(content)
}

/// The map of `size` bytes holding data at `data` (sorted) and `gap` elsewhere.
fn map_of(data: &[(u64, u64)], size: u64, gap: u32) -> Vec<(u64, u64, u32)> {
    let (mut out, mut at) = (Vec::new(), 0);
    for &(off, len) in data {
        if off > at {
            out.push((at, off - at, gap));
        }
        out.push((off, len, DATA));
        at = off + len;
    }
    if at < size {
        out.push((at, size - at, gap));
    }
    out
}

/// An engine with its NBD socket.
struct Engine {
    dir: TempDir,
    _server: Server,
    rpc: RpcConn,
    nbd: PathBuf,
}

fn engine(dir: TempDir) -> Engine {
    let (server, sock) = start_empty(dir.path());
    let rpc = RpcConn::connect(&sock);
    let nbd = dir.path().join("nbd.sock");
    Engine {
        dir,
        _server: server,
        rpc,
        nbd,
    }
}

impl Engine {
    fn export(&mut self, name: &str, what: Value) {
        let mut params = what;
        params["name"] = json!(name);
        params["socket"] = json!(self.nbd);
        self.rpc.ok("nbd_export_start", params);
    }
}

#[test]
fn a_sparse_uring_volume_shows_its_holes_to_nbdinfo_qemu_img_and_nbdcopy() {
    let dir = TempDir::new("bs-uring");
    let vol = dir.path().join("vol.img");
    let Some(content) = sparse_volume(&vol) else {
        return;
    };
    let mut e = engine(dir);
    e.rpc
        .ok("bdev_uring_create", json!({"name": "u", "filename": vol}));
    e.export("u", json!({"bdev": "u"}));
    let u = nbd_unix_uri(&e.nbd, "u");

    assert_eq!(nbdinfo_map(&u, None), map_of(&WRITTEN, SIZE, HOLE_ZERO));

    // qemu-img: data exactly where it was written, holes reading as zeroes elsewhere.
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &u]));
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
    let mut data: Vec<(u64, u64)> = Vec::new();
    for m in &map {
        let (start, len) = (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap());
        if m["data"] == json!(true) {
            match data.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => data.push((start, len)),
            }
        } else {
            assert_eq!(
                m["zero"],
                json!(true),
                "a hole that does not read as zeroes: {m}"
            );
        }
    }
    assert_eq!(data, WRITTEN, "qemu-img map: {map:?}");

    // nbdcopy copies the data and leaves the holes: the copy is sparse and equal.
    let copy = e.dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").args([&u, copy.to_str().unwrap()]));
    let got = std::fs::read(&copy).expect("read copy");
    assert!(got == content, "nbdcopy's copy differs from the volume");
    let written: u64 = WRITTEN.iter().map(|w| w.1).sum();
    assert!(
        stored(&copy) <= written + 4 * MIB,
        "the copy stores {} bytes for {written} of data",
        stored(&copy)
    );

    // A trim punches a hole; a write fills one: the map follows.
    let mut c = NbdClient::connect(&e.nbd, "u").expect("connect");
    c.command(nbd::TRIM, 10 * MIB, 2 * MIB as u32)
        .expect("trim");
    c.write(30 * MIB, &[0x5a; 4096]).expect("write");
    c.command(nbd::FLUSH, 0, 0).expect("flush");
    let now = [WRITTEN[0], (30 * MIB, 4 * KIB), WRITTEN[2]];
    assert_eq!(nbdinfo_map(&u, None), map_of(&now, SIZE, HOLE_ZERO));
}

#[test]
fn a_ram_disk_lists_its_context_and_maps_the_chunks_written() {
    let mut e = engine(TempDir::new("bs-malloc"));
    e.rpc.ok(
        "bdev_malloc_create",
        json!({"name": "m", "size": SIZE, "block_size": 512}),
    );
    e.export("m", json!({"bdev": "m"}));
    let list_uri = format!("nbd+unix://?socket={}", e.nbd.display());
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &list_uri]));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    let exports = listed["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{listed}");
    assert_eq!(exports[0]["export-name"], "m");
    assert_eq!(
        exports[0]["contexts"],
        json!(["base:allocation"]),
        "{listed}"
    );

    let m = nbd_unix_uri(&e.nbd, "m");
    // Nothing written yet: all zeroes (RAM is allocated, so no hole).
    assert_eq!(nbdinfo_map(&m, None), vec![(0, SIZE, ZERO)]);
    let mut c = NbdClient::connect(&e.nbd, "m").expect("connect");
    c.write(4 * MIB, &vec![1u8; MIB as usize]).expect("write");
    c.write(20 * MIB + 512, &[2u8; 512]).expect("write");
    let data = [(4 * MIB, MIB), (20 * MIB, 4 * KIB)];
    assert_eq!(nbdinfo_map(&m, None), map_of(&data, SIZE, ZERO));
    // Zeroing or trimming whole chunks makes them zeroes again; part of a chunk stays data.
    c.command(nbd::TRIM, 4 * MIB, 512 * KIB as u32)
        .expect("trim");
    c.command(nbd::WRITE_ZEROES, 20 * MIB, 4096).expect("zero");
    c.command(nbd::WRITE_ZEROES, 5 * MIB - 4096, 2048)
        .expect("zero");
    assert_eq!(
        nbdinfo_map(&m, None),
        map_of(&[(4 * MIB + 512 * KIB, 512 * KIB)], SIZE, ZERO)
    );
}

#[test]
fn a_pair_image_answers_from_p_where_tracks_are_pending() {
    let dir = TempDir::new("bs-pair");
    let p_file = dir.path().join("p.img");
    let Some(content) = sparse_volume(&p_file) else {
        return;
    };
    let s_file = dir.path().join("s.img");
    let mut e = engine(dir);
    e.rpc.ok(
        "bdev_uring_create",
        json!({"name": "p", "filename": p_file}),
    );
    e.rpc.ok(
        "bdev_uring_create",
        json!({"name": "s", "filename": s_file, "size": SIZE}),
    );
    // Copying a byte a second: the tracks stay pending, the image reads them from P.
    e.rpc.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s", "copy_rate": 1}),
    );
    e.rpc.ok("pair_split", json!({"name": "pr"}));
    e.export("img", json!({"pair": "pr"}));
    e.export("p", json!({"bdev": "p"}));
    let img = nbd_unix_uri(&e.nbd, "img");

    // P moves on after the split (a pending track is copied to S first); the image does not.
    let mut c = NbdClient::connect(&e.nbd, "p").expect("connect");
    c.write(20 * MIB, &[9u8; 64 * 1024]).expect("write");
    let p_now = [WRITTEN[0], WRITTEN[1], (20 * MIB, 64 * KIB), WRITTEN[2]];
    assert_eq!(
        nbdinfo_map(&nbd_unix_uri(&e.nbd, "p"), None),
        map_of(&p_now, SIZE, HOLE_ZERO)
    );

    let map = nbdinfo_map(&img, None);
    let mut holes = 0;
    for &(off, len, kind) in &map {
        if kind & 1 != 0 {
            holes += len;
            for (w_off, w_len) in WRITTEN {
                assert!(
                    off + len <= w_off || w_off + w_len <= off,
                    "the image reports a hole over data: {map:?}"
                );
            }
        }
    }
    // Every hole of P is reported but for the tracks copied meanwhile (at most a few at a
    // byte a second, and the one the write copied).
    let written: u64 = WRITTEN.iter().map(|w| w.1).sum();
    assert!(
        holes >= SIZE - written - 8 * 64 * KIB,
        "{holes} bytes of holes reported: {map:?}"
    );
    let copy = e.dir.path().join("image.img");
    run_ok(Command::new("nbdcopy").args([&img, copy.to_str().unwrap()]));
    assert!(
        std::fs::read(&copy).expect("read") == content,
        "image differs"
    );
}

#[test]
fn bad_block_status_requests_get_einval_and_the_connection_goes_on() {
    let mut e = engine(TempDir::new("bs-bad"));
    for name in ["m", "m2"] {
        e.rpc
            .ok("bdev_malloc_create", json!({"name": name, "size": SIZE}));
        e.export(name, json!({"bdev": name}));
    }
    // No structured replies, no context: a simple EINVAL, then the connection serves.
    let mut c = NbdClient::connect(&e.nbd, "m").expect("connect");
    let r = c.block_status(0, 0, 4096).expect("reply");
    assert_eq!(r.map_err(|e| e.0), Err(EINVAL));
    c.command(nbd::FLUSH, 0, 0).expect("still serving");

    // Structured replies without a context selected: EINVAL with a message.
    let mut n = Negotiation::start(&e.nbd).expect("connect");
    assert_eq!(
        n.option(OPT_STRUCTURED_REPLY, &[]).expect("reply")[0].0,
        REP_ACK
    );
    let mut c = n.go("m").expect("go");
    let r = c.block_status(0, 0, 4096).expect("reply");
    let (errno, msg) = r.expect_err("no context");
    assert_eq!(errno, EINVAL);
    assert!(msg.contains("metadata context"), "{msg}");
    c.command(nbd::FLUSH, 0, 0).expect("still serving");

    // With base:allocation: bad ranges are EINVAL, good ones answer.
    let (mut c, ctx) =
        NbdClient::connect_with_contexts(&e.nbd, "m", &["base:allocation"]).expect("connect");
    assert_eq!(ctx, vec![(1, "base:allocation".to_string())]);
    for (offset, len) in [
        (SIZE, 4096),
        (SIZE - 4096, 8192),
        (u64::MAX - 4095, 8192),
        (100, 4096),
        (0, 100),
        (0, 0),
    ] {
        let r = c.block_status(0, offset, len).expect("reply");
        assert_eq!(r.map_err(|e| e.0), Err(EINVAL), "{len} bytes at {offset}");
    }
    c.write(8192, &[7u8; 4096]).expect("write");
    // The whole 64 MiB in one request (longer than a read may be).
    let r = c.block_status(0, 0, SIZE as u32).expect("reply");
    let rest = (SIZE - 12288) as u32;
    assert_eq!(
        r,
        Ok(vec![(1, vec![(8192, ZERO), (4096, DATA), (rest, ZERO)])])
    );
    let r = c.block_status(FLAG_REQ_ONE, 0, SIZE as u32).expect("reply");
    assert_eq!(r, Ok(vec![(1, vec![(8192, ZERO)])]));
    let r = c.block_status(0, 4096, 8192).expect("reply");
    assert_eq!(r, Ok(vec![(1, vec![(4096, ZERO), (4096, DATA)])]));

    // Contexts selected for one export do not hold for another.
    let mut n = Negotiation::start(&e.nbd).expect("connect");
    n.option(OPT_STRUCTURED_REPLY, &[]).expect("reply");
    assert_eq!(
        n.set_meta_context("m", &["base:allocation"])
            .expect("set")
            .len(),
        1
    );
    let mut c = n.go("m2").expect("go");
    let r = c.block_status(0, 0, 4096).expect("reply");
    assert_eq!(r.map_err(|e| e.0), Err(EINVAL));
}

#[test]
fn malformed_meta_context_options_get_errors_and_the_handshake_goes_on() {
    let mut e = engine(TempDir::new("bs-opts"));
    e.rpc
        .ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    e.export("m", json!({"bdev": "m"}));
    let last = |r: Vec<(u32, Vec<u8>)>| r.last().expect("a reply").0;
    let good = meta_context_data("m", &["base:allocation"]);

    let mut n = Negotiation::start(&e.nbd).expect("connect");
    // Before structured replies: refused.
    for opt in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
        assert_eq!(last(n.option(opt, &good).expect("reply")), REP_ERR_INVALID);
    }
    assert_eq!(
        last(n.option(OPT_STRUCTURED_REPLY, &[]).expect("reply")),
        REP_ACK
    );
    let mut huge_count = meta_context_data("m", &[]);
    huge_count[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
    for bad in [
        good[..good.len() - 3].to_vec(),
        [good.clone(), vec![0]].concat(),
        huge_count,
        meta_context_data("m", &["allocation"]),
        vec![0, 0],
    ] {
        for opt in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
            let r = n.option(opt, &bad).expect("reply");
            assert_eq!(r.len(), 1, "{r:?}");
            assert_eq!(r[0].0, REP_ERR_INVALID, "{bad:?}");
            assert!(!r[0].1.is_empty(), "an error without a message");
        }
    }
    let unknown = meta_context_data("nope", &["base:allocation"]);
    assert_eq!(
        last(n.option(OPT_SET_META_CONTEXT, &unknown).expect("reply")),
        REP_ERR_UNKNOWN
    );

    // Listing: everything, a namespace, exact names; unknown ones skipped silently.
    let list = |n: &mut Negotiation, export: &str, queries: &[&str]| {
        let data = meta_context_data(export, queries);
        contexts_of(n.option(OPT_LIST_META_CONTEXT, &data).expect("reply")).expect("list")
    };
    let base = vec![(0, "base:allocation".to_string())];
    assert_eq!(list(&mut n, "m", &[]), base);
    assert_eq!(list(&mut n, "", &["base:"]), base);
    assert_eq!(list(&mut n, "m", &["x-other:a", "base:allocation"]), base);
    assert!(list(&mut n, "m", &["qemu:", "nbd-server:", "base:nothing"]).is_empty());
    // Selecting: exact names only.
    assert!(n
        .set_meta_context("m", &["base:", "qemu:dirty-bitmap:x"])
        .expect("set")
        .is_empty());
    let set = n.set_meta_context("m", &["base:allocation"]).expect("set");
    assert_eq!(set, vec![(1, "base:allocation".to_string())]);
    // A failed selection replaces the one before: none is left.
    let r = n.option(OPT_SET_META_CONTEXT, &good[..6]).expect("reply");
    assert_eq!(last(r), REP_ERR_INVALID);
    let mut c = n.go("m").expect("the handshake goes on");
    let r = c.block_status(0, 0, 4096).expect("reply");
    assert_eq!(r.map_err(|e| e.0), Err(EINVAL));

    // And a client that negotiates properly gets its answer.
    let (mut c, _) =
        NbdClient::connect_with_contexts(&e.nbd, "m", &["base:allocation"]).expect("connect");
    let r = c.block_status(0, 0, 4 * MIB as u32).expect("reply");
    assert_eq!(r, Ok(vec![(1, vec![(4 * MIB as u32, ZERO)])]));
}
