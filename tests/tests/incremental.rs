//! Incremental backups through the real binary onto real targets holding the base image: a
//! file, nbdkit's memory plugin (NBD) and another quicksplit's NVMe/TCP namespace; the CLI's
//! `--since`; and bad `since` requests over RPC. Every target is read back (nbdcopy, or the
//! file itself) and compared with the image byte for byte; the digest with `quicksplit digest`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quicksplit_tests::nbd::NbdClient;
use quicksplit_tests::{
    binary, nbd_unix_uri, ram_pair, run_ok, start_empty, tree_digest_of, wait_backup, wait_for,
    RpcConn, TempDir,
};
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit_memory(sock: &Path) -> Nbdkit {
    let child = Command::new("nbdkit")
        .args([
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "memory",
            &SIZE.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit (Debian package nbdkit)");
    assert!(
        wait_for(Duration::from_secs(10), || sock.exists()),
        "nbdkit did not start"
    );
    Nbdkit(child)
}

fn backup(
    rpc: &mut RpcConn,
    target: Value,
    checkpoint: Option<&str>,
    since: Option<&str>,
) -> Value {
    let mut params = json!({"pair": "pr", "target": target, "host_rate": 0});
    if let Some(c) = checkpoint {
        params["checkpoint"] = json!(c);
    }
    if let Some(s) = since {
        params["since"] = json!(s);
    }
    let id = rpc.ok("backup_start", params)["id"].as_u64().unwrap();
    let info = wait_backup(rpc, id, Duration::from_secs(120));
    assert_eq!(info["state"], "done", "{info}");
    info
}

/// Copies `uri`'s export into `file` with nbdcopy and returns its bytes.
fn read_export(uri: &str, file: &Path) -> Vec<u8> {
    run_ok(Command::new("nbdcopy").args([uri, file.to_str().unwrap()]));
    std::fs::read(file).unwrap()
}

/// A source quicksplit with pair "pr" on RAM disks (P exported over NBD as "p"), and the
/// targets: a file path, nbdkit's memory plugin and another quicksplit's NVMe/TCP namespace
/// (exported over NBD too, to read it back).
struct Rig {
    dir: TempDir,
    rpc: RpcConn,
    p: NbdClient,
    kit_uri: String,
    nvmf: Value,
    d_uri: String,
    _kit: Nbdkit,
    _servers: (quicksplit_tests::Server, quicksplit_tests::Server),
    src_sock: std::path::PathBuf,
}

impl Rig {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir_all(&src_dir).unwrap();
        std::fs::create_dir_all(&dst_dir).unwrap();
        let (src, src_sock) = start_empty(&src_dir);
        let (dst_server, dst_sock) = start_empty(&dst_dir);
        let mut rpc = RpcConn::connect(&src_sock);
        let mut dst = RpcConn::connect(&dst_sock);
        let nbd = src_dir.join("nbd.sock");
        ram_pair(&mut rpc, SIZE, None, &nbd);
        let p = NbdClient::connect(&nbd, "p").expect("NBD connect");
        let kit_sock = dir.path().join("kit.sock");
        let kit = nbdkit_memory(&kit_sock);
        let port = quicksplit_tests::free_port();
        let nqn = format!("nqn.2026-12.io.quicksplit:{tag}");
        let dst_nbd = dst_dir.join("nbd.sock");
        dst.ok("bdev_malloc_create", json!({"name": "d", "size": SIZE}));
        dst.ok(
            "nvmf_export_start",
            json!({"nqn": nqn, "bdev": "d", "listen": format!("127.0.0.1:{port}")}),
        );
        dst.ok(
            "nbd_export_start",
            json!({"name": "d", "bdev": "d", "socket": dst_nbd}),
        );
        Self {
            rpc,
            p,
            kit_uri: format!("nbd+unix:///?socket={}", kit_sock.display()),
            nvmf: json!({"type": "nvmf", "traddr": "127.0.0.1", "trsvcid": port, "subnqn": nqn}),
            d_uri: nbd_unix_uri(&dst_nbd, "d"),
            _kit: kit,
            _servers: (src, dst_server),
            src_sock,
            dir,
        }
    }

    /// Copies the file `from` onto the NBD and NVMe/TCP targets.
    fn fill_targets(&self, from: &Path) {
        for uri in [&self.kit_uri, &self.d_uri] {
            run_ok(Command::new("nbdcopy").args([from.to_str().unwrap(), uri]));
        }
    }

    /// Backs up (since `since`) to nbdkit and to the NVMe/TCP namespace: each must give
    /// `digest`, store `stored` bytes when given, and read back as `image`.
    fn backup_to_network(
        &mut self,
        since: Option<&str>,
        image: &[u8],
        digest: &Value,
        stored: Option<u64>,
    ) {
        let targets = [
            (
                json!({"type": "nbd", "uri": self.kit_uri}),
                self.kit_uri.clone(),
                "nbdkit",
            ),
            (self.nvmf.clone(), self.d_uri.clone(), "NVMe/TCP"),
        ];
        for (target, uri, what) in targets {
            let b = backup(&mut self.rpc, target, None, since);
            assert_eq!(&b["digest"], digest, "{what}");
            if let Some(n) = stored {
                assert_eq!(b["bytes_stored"].as_u64(), Some(n), "{what}: {b}");
            }
            let back = read_export(&uri, &self.dir.path().join("back.img"));
            assert!(back == image, "{what} holds something else");
        }
    }

    /// Waits for PAIR and splits.
    fn split(&mut self) {
        let rpc = &mut self.rpc;
        wait_for(Duration::from_secs(30), || {
            rpc.ok("pair_get", json!({"name": "pr"}))[0]["state"] == "PAIR"
        });
        rpc.ok("pair_split", json!({"name": "pr"}));
    }
}

#[test]
fn incrementals_onto_a_file_nbdkit_and_an_nvmf_namespace_equal_the_image() {
    let mut rig = Rig::new("incremental");
    let mut image = vec![0u8; SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(20).fill_bytes(&mut image);
    for (i, chunk) in image.chunks(MIB as usize).enumerate() {
        rig.p.write(i as u64 * MIB, chunk).expect("NBD write");
    }
    rig.split();

    // The full backup, checkpoint c0, to a file; the other targets get the same image.
    let base = rig.dir.path().join("base.img");
    let full = backup(
        &mut rig.rpc,
        json!({"type": "file", "path": base}),
        Some("c0"),
        None,
    );
    assert_eq!(std::fs::read(&base).unwrap(), image);
    rig.fill_targets(&base);

    // P changes in three places; resync, split again: the image moves on.
    for (at, byte) in [(3 * MIB + 4096, 0x11u8), (17 * MIB, 0x22), (31 * MIB, 0x33)] {
        let data = vec![byte; 8192];
        rig.p.write(at, &data).expect("NBD write");
        image[at as usize..at as usize + 8192].copy_from_slice(&data);
    }
    rig.rpc.ok("pair_resync", json!({"name": "pr"}));
    rig.split();
    let inc = backup(
        &mut rig.rpc,
        json!({"type": "file", "path": base}),
        Some("c1"),
        Some("c0"),
    );
    assert_eq!(inc["since"], "c0");
    let stored = inc["bytes_stored"].as_u64().unwrap();
    assert!(
        (3 * MIB..=6 * MIB).contains(&stored),
        "three changed tracks, {stored} bytes stored"
    );
    assert_eq!(inc["bytes_done"].as_u64(), Some(SIZE));
    assert_eq!(std::fs::read(&base).unwrap(), image, "the file");
    assert_eq!(inc["digest"].as_str(), Some(tree_digest_of(&base).as_str()));
    assert_ne!(inc["digest"], full["digest"]);

    rig.backup_to_network(Some("c0"), &image, &inc["digest"], None);
    let (rpc, src_sock) = (&mut rig.rpc, &rig.src_sock);

    // The CLI: nothing changed since c1, so nothing is stored and the file stays the image.
    let cli = binary("quicksplit");
    let out = run_ok(Command::new(&cli).args([
        "backup",
        "pr",
        "--socket",
        src_sock.to_str().unwrap(),
        "--to",
        &format!("file:{}", base.display()),
        "--since",
        "c1",
        "--wait",
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("done"), "{said}");
    assert_eq!(std::fs::read(&base).unwrap(), image);
    let last = rpc.ok("backup_get", json!({}));
    let last = last.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["since"], "c1");
    assert_eq!(last["bytes_stored"], 0);

    // Bad since: clear errors, nothing started.
    let before = rpc.ok("backup_get", json!({})).as_array().unwrap().len();
    let target = json!({"type": "file", "path": base});
    for (since, want) in [
        ("nope", "no checkpoint named 'nope'"),
        ("c0\u{0}", "no checkpoint named"),
    ] {
        let (code, msg) = rpc.err(
            "backup_start",
            json!({"pair": "pr", "target": target, "since": since}),
        );
        assert_eq!(code, -32602, "{msg}");
        assert!(msg.contains(want), "{msg}");
    }
    let (_, msg) = rpc.err(
        "backup_start",
        json!({"pair": "pr", "target": {"type": "file", "path": rig.dir.path().join("none.img")},
               "since": "c0"}),
    );
    assert!(msg.contains("none.img"), "{msg}");
    assert_eq!(
        rpc.ok("backup_get", json!({})).as_array().unwrap().len(),
        before
    );
}

#[test]
fn a_mostly_empty_volume_backs_up_sparse_to_a_file_nbdkit_and_nvmf() {
    use std::os::unix::fs::MetadataExt;
    let mut rig = Rig::new("sparse-full");
    // 3 MiB of 32 written, in three places.
    let mut image = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for at in [0, 13 * MIB, 29 * MIB] {
        let r = &mut image[at as usize..(at + MIB) as usize];
        rng.fill_bytes(r);
        rig.p.write(at, r).expect("NBD write");
    }
    rig.split();
    // Targets that held something else: what the image does not hold must read as zeroes.
    let garbage = rig.dir.path().join("garbage.img");
    let mut junk = vec![0u8; SIZE as usize];
    rng.fill_bytes(&mut junk);
    std::fs::write(&garbage, &junk).unwrap();
    rig.fill_targets(&garbage);
    let file = rig.dir.path().join("full.img");
    let f = backup(
        &mut rig.rpc,
        json!({"type": "file", "path": file}),
        None,
        None,
    );
    assert_eq!(std::fs::read(&file).unwrap(), image, "the file");
    assert_eq!(f["bytes_stored"].as_u64(), Some(3 * MIB), "{f}");
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(
        allocated <= 4 * MIB,
        "{allocated} bytes allocated for 3 MiB of data"
    );
    assert_eq!(f["digest"].as_str(), Some(tree_digest_of(&file).as_str()));

    rig.backup_to_network(None, &image, &f["digest"], Some(3 * MIB));
}
