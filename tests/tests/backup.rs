//! Backups through the real binary to real peers: nbdkit as the NBD target (read back with
//! nbdcopy), GNU tar extracting the tape archive, `quicksplit restore` catching a flipped byte,
//! and nbdkit's error filter failing a backup while the pair keeps serving. The digests are
//! checked against `sha256sum` (the flat SHA-256) and `quicksplit digest` (the tree digest).
//! tests/tests/digest.rs has more on the digests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quicksplit_tests::{
    binary, ram_pair, sha256_of, start_empty, tree_digest_of, wait_for, RpcConn, TempDir,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Nbdkit {
    child: Child,
    socket: PathBuf,
}

impl Nbdkit {
    fn start(dir: &Path, name: &str, extra: &[&str]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let mut args: Vec<String> = vec!["-f".into(), "-U".into(), socket.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("nbdkit")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit (Debian package nbdkit)");
        assert!(
            wait_for(Duration::from_secs(10), || socket.exists()),
            "nbdkit did not start"
        );
        Self { child, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_backup(rpc: &mut RpcConn, id: u64) -> Value {
    quicksplit_tests::wait_backup(rpc, id, Duration::from_secs(60))
}

/// A pair whose P holds random data, split; P is written again after the split. Returns the
/// image file (P as it was at the split) and the NBD socket of the engine's exports.
fn prepared(dir: &Path, rpc: &mut RpcConn) -> (PathBuf, PathBuf) {
    let nbd = dir.join("qs-nbd.sock");
    ram_pair(rpc, SIZE, Some(1), &nbd);
    let src = dir.join("random.img");
    run(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", src.display()),
        "bs=1M",
        "count=16",
        "status=none",
    ]));
    let p_uri = format!("nbd+unix:///p?socket={}", nbd.display());
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), &p_uri]));
    let split = rpc.ok("pair_split", json!({"name": "pr"}));
    assert!(split["pending_tracks"].as_u64().unwrap() * 2 >= SIZE / 65536);
    // P moves on after the split; the image must not.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 0 1M",
        "-c",
        "write -P 0x78 5M 64k",
        &p_uri,
    ]));
    (src, nbd)
}

/// Writes P through its NBD export with qemu-io, at spread offsets, until stopped.
fn keep_writing_p(
    nbd: &Path,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    let uri = format!("nbd+unix:///p?socket={}", nbd.display());
    let stop = std::sync::Arc::clone(stop);
    std::thread::spawn(move || {
        let mut n = 0u32;
        loop {
            let off = (n as u64 * 7 + 3) % (SIZE / 65536) * 65536;
            let cmd = format!("write -P {} {off} 64k", n % 200 + 1);
            run(Command::new("qemu-io").args(["-f", "raw", "-c", &cmd, &uri]));
            n += 1;
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return n;
            }
        }
    })
}

#[test]
fn backups_to_nbdkit_in_every_mode_are_exact() {
    let dir = TempDir::new("backup-nbdkit");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let (image, nbd) = prepared(dir.path(), &mut rpc);
    let want = sha256_of(&image);
    let want_tree = tree_digest_of(&image);
    for mode in ["merge", "reflect", "wait"] {
        let kit = Nbdkit::start(dir.path(), mode, &["memory", "16M"]);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = keep_writing_p(&nbd, &stop);
        let id = rpc.ok(
            "backup_start",
            json!({"pair": "pr", "mode": mode, "flat_sha256": true,
                   "target": {"type": "nbd", "uri": kit.uri()}}),
        )["id"]
            .as_u64()
            .unwrap();
        let info = wait_backup(&mut rpc, id);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            writer.join().unwrap() > 0,
            "P was written during the backup"
        );
        assert_eq!(info["state"], "done", "{info}");
        assert_eq!(info["sha256"], want.as_str(), "{mode}");
        assert_eq!(info["digest"], want_tree.as_str(), "{mode}");
        assert_eq!(info["bytes_done"], SIZE);
        let out = dir.path().join(format!("{mode}.img"));
        run(Command::new("nbdcopy").args([&kit.uri(), out.to_str().unwrap()]));
        assert_eq!(sha256_of(&out), want, "{mode}: nbdkit holds something else");
    }
}

#[test]
fn tape_archive_extracts_with_gnu_tar_and_restore_catches_a_flipped_byte() {
    let dir = TempDir::new("backup-tape");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let (image, _) = prepared(dir.path(), &mut rpc);
    let want = sha256_of(&image);
    let want_tree = tree_digest_of(&image);
    let archive = dir.path().join("tape0");
    let out = run(Command::new(binary("quicksplit")).args([
        "backup",
        "--socket",
        sock.to_str().unwrap(),
        "pr",
        "--to",
        &format!("tape:{}", archive.display()),
        "--mode",
        "merge",
        "--wait",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&want_tree), "{text}");
    assert!(
        !text.contains(&want),
        "a flat SHA-256 nobody asked for: {text}"
    );
    let x = dir.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    run(Command::new("tar").args([
        "-x",
        "-b",
        "512",
        "-f",
        archive.to_str().unwrap(),
        "-C",
        x.to_str().unwrap(),
    ]));
    assert_eq!(sha256_of(&x.join("volume.img")), want);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(x.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["digest"], want_tree.as_str());
    assert_eq!(manifest["sha256"], Value::Null);
    assert_eq!(manifest["pair"], "pr");
    assert_eq!(manifest["mode"], "merge");
    assert_eq!(manifest["volume_size"], SIZE);

    let restored = dir.path().join("restored.img");
    run(Command::new(binary("quicksplit")).args([
        "restore",
        archive.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]));
    assert_eq!(sha256_of(&restored), want);

    // Flip one byte of the image inside the archive.
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes[262_144 + 3 * MIB as usize + 17] ^= 0x01;
    let flipped = dir.path().join("tape-flipped");
    std::fs::write(&flipped, &bytes).unwrap();
    let out = Command::new(binary("quicksplit"))
        .args([
            "restore",
            flipped.to_str().unwrap(),
            "--to",
            dir.path().join("bad.img").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("image digest mismatch") && err.contains(&want_tree),
        "{err}"
    );
    assert!(err.contains("chunk 3") && err.contains("CRC-32C"), "{err}");
}

#[test]
fn a_target_write_error_fails_the_backup_and_hosts_keep_going() {
    let dir = TempDir::new("backup-target-error");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let (_, nbd) = prepared(dir.path(), &mut rpc);
    let kit = Nbdkit::start(
        dir.path(),
        "broken",
        &[
            "--filter=error",
            "memory",
            "16M",
            "error-pwrite-rate=100%",
            "error=EIO",
        ],
    );
    let id = rpc.ok(
        "backup_start",
        json!({"pair": "pr", "target": {"type": "nbd", "uri": kit.uri()}}),
    )["id"]
        .as_u64()
        .unwrap();
    let info = wait_backup(&mut rpc, id);
    assert_eq!(info["state"], "failed", "{info}");
    assert!(info["error"].as_str().unwrap().contains("NBD"), "{info}");
    assert_eq!(info["sha256"], Value::Null);
    assert_eq!(info["digest"], Value::Null);
    // A target too small and an unreachable target are refused at once.
    let small = Nbdkit::start(dir.path(), "small", &["memory", "1M"]);
    assert_eq!(
        rpc.err(
            "backup_start",
            json!({"pair": "pr", "target": {"type": "nbd", "uri": small.uri()}})
        )
        .0,
        -32005
    );
    let (code, msg) = rpc.err(
        "backup_start",
        json!({"pair": "pr", "target": {"type": "nbd", "uri": "nbd+unix:///?socket=/nonexistent"}}),
    );
    assert_eq!(code, -32005, "{msg}");
    // The pair keeps serving hosts and another backup works.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 4k",
        "-c",
        "read -P 0x11 0 4k",
        &format!("nbd+unix:///p?socket={}", nbd.display()),
    ]));
    assert_eq!(
        rpc.ok("pair_get", json!({"name": "pr"}))[0]["state"],
        "PSUS"
    );
    let file = dir.path().join("ok.img");
    let id = rpc.ok(
        "backup_start",
        json!({"pair": "pr", "mode": "wait", "target": {"type": "file", "path": file}}),
    )["id"]
        .as_u64()
        .unwrap();
    assert_eq!(wait_backup(&mut rpc, id)["state"], "done");
}

#[test]
fn a_restored_image_keeps_the_holes_of_a_mostly_empty_volume() {
    let dir = TempDir::new("backup-holes");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd = dir.path().join("qs-nbd.sock");
    ram_pair(&mut rpc, SIZE, None, &nbd);
    // 1 MiB of data in 16 MiB, the rest never written (zeroes).
    let p_uri = format!("nbd+unix:///p?socket={}", nbd.display());
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 3M 512k",
        "-c",
        "write -P 0xa5 9M 512k",
        &p_uri,
    ]));
    rpc.ok("pair_split", json!({"name": "pr"}));
    let archive = dir.path().join("tape0");
    run(Command::new(binary("quicksplit")).args([
        "backup",
        "--socket",
        sock.to_str().unwrap(),
        "pr",
        "--to",
        &format!("tape:{}", archive.display()),
        "--wait",
    ]));
    let restored = dir.path().join("restored.img");
    run(Command::new(binary("quicksplit")).args([
        "restore",
        archive.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]));
    let got = std::fs::read(&restored).unwrap();
    let mut want = vec![0u8; SIZE as usize];
    want[3 * MIB as usize..(3 * MIB + 512 * 1024) as usize].fill(0x5a);
    want[9 * MIB as usize..(9 * MIB + 512 * 1024) as usize].fill(0xa5);
    assert!(got == want, "the restored image differs");
    // The zeroes are holes, where the file system keeps them.
    use std::os::unix::fs::MetadataExt;
    let stored = std::fs::metadata(&restored).unwrap().blocks() * 512;
    let probe = dir.path().join("probe");
    let f = std::fs::File::create(&probe).unwrap();
    f.set_len(SIZE).unwrap();
    if std::fs::metadata(&probe).unwrap().blocks() == 0 {
        assert!(
            stored <= 2 * MIB,
            "the restored image stores {stored} bytes for 1 MiB of data"
        );
    }
}
