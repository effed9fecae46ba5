//! The image digest through the real binary: a backup's `digest` (the `sha256-tree` root) equals
//! `quicksplit digest` of the source as it was at the split (a file written before the split,
//! the byte-for-byte model) and of what the target holds (a file target; a tape archive
//! restored), while P is written after the split; the chunk digests are kept in the state
//! directory; `flat_sha256: true` adds the SHA-256 `sha256sum` prints; `quicksplit restore`
//! fails on the digest when an image byte of the archive is flipped; `quicksplit digest` on
//! block devices, on bad paths and on a closed pipe.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use quicksplit_tests::{
    binary, sha256_of, start_empty, tree_digest_of, wait_backup, RpcConn, TempDir,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Nine whole chunks and a short one (256 KiB).
const SIZE: u64 = 9 * MIB + 256 * 1024;
/// Where the image starts in a tape archive with the default record size.
const TAPE_IMAGE_AT: usize = 262_144;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn quicksplit(args: &[&str]) -> Output {
    Command::new(binary("quicksplit"))
        .args(args)
        .output()
        .expect("run quicksplit")
}

/// A pair of RAM disks whose P holds random bytes (`model.img`, written through NBD), split
/// with tracks still pending, then P written again: `model.img` is the image. Returns it and
/// the state directory.
fn split_with_model(dir: &Path, rpc: &mut RpcConn) -> PathBuf {
    let nbd = dir.join("qs-nbd.sock");
    rpc.ok("bdev_malloc_create", json!({"name": "p", "size": SIZE}));
    rpc.ok("bdev_malloc_create", json!({"name": "s", "size": SIZE}));
    rpc.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s", "copy_rate": 1}),
    );
    rpc.ok(
        "nbd_export_start",
        json!({"name": "p", "bdev": "p", "socket": nbd}),
    );
    let model = dir.join("model.img");
    run(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", model.display()),
        &format!("bs={}", SIZE / 4),
        "count=4",
        "status=none",
    ]));
    let p_uri = format!("nbd+unix:///p?socket={}", nbd.display());
    run(Command::new("nbdcopy").args([model.to_str().unwrap(), &p_uri]));
    let split = rpc.ok("pair_split", json!({"name": "pr"}));
    assert!(split["pending_tracks"].as_u64().unwrap() > 0, "{split}");
    // P moves on after the split, in a whole chunk and in the short last one; the image must
    // not.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x55 1M 1M",
        "-c",
        &format!("write -P 0x66 {} 64k", SIZE - 65536),
        &p_uri,
    ]));
    model
}

fn backup(rpc: &mut RpcConn, target: Value, flat: bool) -> Value {
    let id = rpc.ok(
        "backup_start",
        json!({"pair": "pr", "mode": "merge", "target": target, "flat_sha256": flat}),
    )["id"]
        .as_u64()
        .expect("id");
    let info = wait_backup(rpc, id, Duration::from_secs(120));
    assert_eq!(info["state"], "done", "{info}");
    info
}

/// The chunk digest file of backup `id`: its header says 1 MiB chunks and the image's size,
/// holds the root, one digest per chunk and a CRC.
fn check_digest_file(state: &Path, id: u64, root: &str) {
    let path = state.join("digests").join(format!("{id}.sha256tree"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let chunks = SIZE.div_ceil(MIB);
    assert_eq!(bytes.len() as u64, 64 + 32 * chunks + 4);
    assert_eq!(&bytes[..8], b"QSTREE01");
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    assert_eq!(u64_at(8), MIB);
    assert_eq!(u64_at(16), SIZE);
    assert_eq!(u64_at(24), chunks);
    let hex: String = bytes[32..64].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(format!("sha256-tree:{hex}"), root);
}

#[test]
fn backups_report_the_tree_digest_of_the_image_for_tape_and_file() {
    let dir = TempDir::new("digest-backups");
    let (_server, sock) = start_empty(dir.path());
    let state = dir.path().join("state");
    let mut rpc = RpcConn::connect(&sock);
    let model = split_with_model(dir.path(), &mut rpc);
    let want = tree_digest_of(&model);
    assert!(
        want.starts_with("sha256-tree:") && want.len() == 12 + 64,
        "{want}"
    );
    assert_ne!(
        want,
        format!("sha256-tree:{}", sha256_of(&model)),
        "the tree root is not the flat SHA-256"
    );

    // A file target: the digest is the model's and the file's.
    let file = dir.path().join("backup.img");
    let info = backup(&mut rpc, json!({"type": "file", "path": file}), false);
    assert_eq!(info["digest"], want.as_str(), "{info}");
    assert_eq!(info["sha256"], Value::Null, "{info}");
    assert_eq!(info["flat_sha256"], false);
    assert_eq!(tree_digest_of(&file), want);
    check_digest_file(&state, info["id"].as_u64().unwrap(), &want);

    // A tape target: the reported digest, the manifest's and the restored image's agree.
    let tape = dir.path().join("backup.tar");
    let info = backup(&mut rpc, json!({"type": "tape", "path": tape}), false);
    assert_eq!(info["digest"], want.as_str(), "{info}");
    check_digest_file(&state, info["id"].as_u64().unwrap(), &want);
    let restored = dir.path().join("restored.img");
    let out = run(Command::new(binary("quicksplit")).args([
        "restore",
        tape.to_str().unwrap(),
        "--to",
        restored.to_str().unwrap(),
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("{want} verified")), "{said}");
    assert_eq!(tree_digest_of(&restored), want);
    assert_eq!(sha256_of(&restored), sha256_of(&model));

    // flat_sha256: both, the flat one as sha256sum prints it; the manifest has both.
    let flat = dir.path().join("flat.tar");
    let info = backup(&mut rpc, json!({"type": "tape", "path": flat}), true);
    assert_eq!(info["digest"], want.as_str(), "{info}");
    assert_eq!(info["sha256"], sha256_of(&model).as_str(), "{info}");
    assert_eq!(info["flat_sha256"], true);
    let x = dir.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    run(Command::new("tar").args([
        "-x",
        "-b",
        "512",
        "-f",
        flat.to_str().unwrap(),
        "-C",
        x.to_str().unwrap(),
    ]));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(x.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["digest"], want.as_str());
    assert_eq!(manifest["sha256"], sha256_of(&model).as_str());
    assert_eq!(manifest["format"], "quicksplit-backup-2");
    let out = run(Command::new(binary("quicksplit")).args([
        "restore",
        flat.to_str().unwrap(),
        "--to",
        dir.path().join("flat.img").to_str().unwrap(),
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("{want} and sha256 {} verified", sha256_of(&model))),
        "{said}"
    );

    // A flipped image byte in the archive: the restore fails on the digest, names the damaged
    // chunk, and leaves no image.
    for at in [5 * MIB as usize + 77, SIZE as usize - 1] {
        let mut bytes = std::fs::read(&tape).unwrap();
        bytes[TAPE_IMAGE_AT + at] ^= 0x20;
        let bad = dir.path().join("bad.tar");
        std::fs::write(&bad, &bytes).unwrap();
        let to = dir.path().join("bad.img");
        let out = quicksplit(&[
            "restore",
            bad.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "image digest mismatch: manifest {want}, data sha256-tree:"
            )),
            "{err}"
        );
        let chunk = at as u64 / MIB;
        assert!(
            err.contains(&format!("chunk {chunk} (offset {})", chunk * MIB)),
            "{err}"
        );
        assert!(!to.exists());
    }

    // The status table shows the digest.
    let out = quicksplit(&["status", "--socket", sock.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&want));
}

#[test]
fn a_failed_backup_keeps_no_digest() {
    let dir = TempDir::new("digest-failed");
    let (_server, sock) = start_empty(dir.path());
    let state = dir.path().join("state");
    let mut rpc = RpcConn::connect(&sock);
    split_with_model(dir.path(), &mut rpc);
    // Slow enough to be cancelled half-way.
    let id = rpc.ok(
        "backup_start",
        json!({"pair": "pr", "rate": MIB, "target": {"type": "file", "path": dir.path().join("c.img")}}),
    )["id"]
        .as_u64()
        .unwrap();
    rpc.ok("backup_cancel", json!({"id": id}));
    let info = wait_backup(&mut rpc, id, Duration::from_secs(30));
    assert_eq!(info["state"], "cancelled", "{info}");
    assert_eq!(info["digest"], Value::Null);
    assert!(!state
        .join("digests")
        .join(format!("{id}.sha256tree"))
        .exists());
}

#[test]
fn digest_reads_files_and_block_devices_and_says_what_is_wrong() {
    let dir = TempDir::new("digest-cli");
    let file = dir.path().join("data.img");
    let data: Vec<u8> = (0..(3 * MIB + 4096) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let want = tree_digest_of(&file);
    // One thread or many: the same root.
    for threads in ["1", "3"] {
        let out = run(Command::new(binary("quicksplit")).args([
            "digest",
            "--threads",
            threads,
            file.to_str().unwrap(),
        ]));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{want}\n"));
    }
    // An empty file: no chunks, the SHA-256 of nothing.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(
        tree_digest_of(&empty),
        "sha256-tree:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );

    // A block device (a loop device over the file) gives the file's root.
    match Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&file)
        .output()
    {
        Ok(out) if out.status.success() => {
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let got = quicksplit(&["digest", &dev]);
            let _ = Command::new("losetup").args(["-d", &dev]).status();
            assert!(got.status.success(), "{got:?}");
            assert_eq!(String::from_utf8_lossy(&got.stdout).trim_end(), want);
        }
        other => eprintln!("skipping the block device case: losetup cannot attach ({other:?})"),
    }

    // A missing file, a directory: exit 1 and a message naming them.
    let missing = dir.path().join("missing.img");
    let out = quicksplit(&["digest", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("No such file"),
        "{err}"
    );
    let out = quicksplit(&["digest", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither a regular file nor a block device"),
        "{out:?}"
    );
    assert_eq!(quicksplit(&["digest"]).status.code(), Some(2));

    // A reader that went away: 141, no panic.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(binary("quicksplit"))
        .args(["digest", file.to_str().unwrap()])
        .stdout(writer)
        .output()
        .expect("run quicksplit");
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
