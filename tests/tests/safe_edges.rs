//! The safe edges around a running engine, through the real binary: qemu-img cannot write a
//! served volume, a second serve leaves a state directory alone, restore never clobbers a file
//! in use (nor an existing one without --force) and never leaves a partial image, backup
//! targets are checked before a backup starts, and a cancelled tape backup leaves nothing
//! under the archive's name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use quicksplit_tests::{binary, sha256_of, start_empty, wait_backup, wait_for, RpcConn, TempDir};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
/// JSON-RPC: invalid params, and "name taken or in use".
const INVALID_PARAMS: i64 = -32602;
const CONFLICT: i64 = -32002;

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn quicksplit(args: &[&str]) -> Output {
    output(Command::new(binary("quicksplit")).args(args))
}

fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// A file of `SIZE` random bytes.
fn random_file(path: &Path) {
    use rand::Rng;
    let mut bytes = vec![0u8; SIZE as usize];
    rand::thread_rng().fill(&mut bytes[..]);
    std::fs::write(path, bytes).expect("write random file");
}

/// A uring bdev `p` over `dir/p.img` (random bytes) paired with a RAM disk, split at once: the
/// image is the file as it is. Returns the file.
fn split_pair(dir: &Path, rpc: &mut RpcConn) -> PathBuf {
    let file = dir.join("p.img");
    random_file(&file);
    rpc.ok(
        "bdev_uring_create",
        json!({"name": "p", "filename": file, "size": SIZE}),
    );
    rpc.ok("bdev_malloc_create", json!({"name": "s", "size": SIZE}));
    rpc.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s"}),
    );
    rpc.ok("pair_split", json!({"name": "pr"}));
    file
}

/// A completed tape backup of the pair to `archive`, with the flat SHA-256; that SHA-256.
fn tape_backup(rpc: &mut RpcConn, archive: &Path) -> String {
    let id = rpc.ok(
        "backup_start",
        json!({"pair": "pr", "target": {"type": "tape", "path": archive}, "flat_sha256": true}),
    )["id"]
        .as_u64()
        .expect("id");
    let info = wait_backup(rpc, id, Duration::from_secs(120));
    assert_eq!(info["state"], "done", "{info}");
    info["sha256"].as_str().expect("sha256").to_string()
}

#[test]
fn qemu_img_cannot_write_a_served_volume_nor_can_another_quicksplit() {
    let dir = TempDir::new("locks-qemu");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let file = dir.path().join("vol.img");
    random_file(&file);
    rpc.ok(
        "bdev_uring_create",
        json!({"name": "v", "filename": file, "size": SIZE}),
    );
    let before = sha256_of(&file);
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![0xabu8; SIZE as usize]).expect("write");
    let f = file.to_str().expect("utf-8");
    let attempts: [Vec<&str>; 3] = [
        vec![
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            other.to_str().expect("utf-8"),
            f,
        ],
        vec!["qemu-io", "-f", "raw", "-c", "write -P 0xcd 0 64k", f],
        vec!["qemu-img", "resize", "-f", "raw", f, "32M"],
    ];
    for args in &attempts {
        let out = output(Command::new(args[0]).args(&args[1..]));
        assert!(
            !out.status.success(),
            "{args:?} succeeded on a served volume"
        );
        let err = stderr(&out);
        assert!(
            err.contains("Failed to get \"write\" lock") && err.contains("another process"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(sha256_of(&file), before, "the served volume changed");
    assert_eq!(std::fs::metadata(&file).expect("stat").len(), SIZE);

    // Another quicksplit cannot open it as a bdev either.
    let dir2 = TempDir::new("locks-qemu-second");
    let (_second, sock2) = start_empty(dir2.path());
    let mut rpc2 = RpcConn::connect(&sock2);
    let (code, msg) = rpc2.err(
        "bdev_uring_create",
        json!({"name": "v", "filename": file, "size": 2 * SIZE}),
    );
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(msg.contains(f) && msg.contains("in use"), "{msg}");
    assert_eq!(
        std::fs::metadata(&file).expect("stat").len(),
        SIZE,
        "extended"
    );

    // The lock goes with the bdev: once deleted, qemu-io may write the file.
    rpc.ok("bdev_delete", json!({"name": "v"}));
    let out = output(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xcd 0 64k", f]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(sha256_of(&file), before);
}

/// Every entry under `dir` but sockets: its relative name, kind, size and a hash of its
/// contents. A file renamed or removed between the listing and the read (a journal's `.new`
/// being renamed into place) shows as gone: the directory is not still yet.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            let m = std::fs::symlink_metadata(&path).expect("stat");
            let name = path.strip_prefix(dir).expect("under dir").to_path_buf();
            let ft = m.file_type();
            if ft.is_socket() {
                continue;
            } else if ft.is_dir() {
                out.insert(name, "dir".into());
                todo.push(path);
            } else {
                let seen = match std::fs::read(&path) {
                    Ok(bytes) => {
                        use std::hash::{Hash, Hasher};
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        bytes.hash(&mut h);
                        format!("{} bytes {:016x}", bytes.len(), h.finish())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => "gone".into(),
                    Err(e) => panic!("{}: {e}", path.display()),
                };
                out.insert(name, seen);
            }
        }
    }
    out
}

#[test]
fn a_second_serve_on_a_state_directory_exits_and_leaves_it_untouched() {
    let dir = TempDir::new("locks-state");
    let (server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let state = dir.path().join("state");
    // Everything a state directory holds: configuration, pair metadata, backup records, and a
    // volume file.
    let file = split_pair(&state, &mut rpc);
    tape_backup(&mut rpc, &dir.path().join("b.tar"));
    assert!(file.starts_with(&state));
    assert_eq!(
        std::fs::read_to_string(state.join("lock")).expect("lock file"),
        format!("{}\n", server.pid())
    );
    // The running engine may still tidy its metadata: wait until the directory is still.
    let mut before = snapshot(&state);
    assert!(
        wait_for(Duration::from_secs(20), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = snapshot(&state);
            std::mem::replace(&mut before, now) == before
        }),
        "the state directory kept changing"
    );
    // Without --config a serve would create the embedded default there; with one it would
    // replace the configuration.
    let config = dir.path().join("empty.json");
    for extra in [&[][..], &["--config", config.to_str().expect("utf-8")][..]] {
        let s = state.to_str().expect("utf-8");
        let mut args = vec![
            "serve",
            "--state-dir",
            s,
            "--cores",
            "0",
            "--idle",
            "adaptive",
        ];
        args.extend_from_slice(extra);
        let out = quicksplit(&args);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let want = format!(
            "state directory {s} is in use by quicksplit PID {}",
            server.pid()
        );
        assert!(stderr(&out).contains(&want), "{}", stderr(&out));
        assert_eq!(snapshot(&state), before, "the state directory changed");
    }
    // The first engine still serves.
    assert_eq!(
        rpc.ok("pair_get", json!({"name": "pr"}))[0]["state"],
        "PSUS"
    );
}

#[test]
fn restore_refuses_a_served_or_existing_file_and_never_leaves_a_partial_image() {
    let dir = TempDir::new("locks-restore");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let primary = split_pair(dir.path(), &mut rpc);
    let archive = dir.path().join("pr.tar");
    let sha = tape_backup(&mut rpc, &archive);
    let a = archive.to_str().expect("utf-8");

    // Onto the live primary's file: refused, with or without --force.
    let before = sha256_of(&primary);
    for force in [false, true] {
        let mut args = vec!["restore", a, "--to", primary.to_str().expect("utf-8")];
        if force {
            args.push("--force");
        }
        let out = quicksplit(&args);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains(&format!("{} is in use", primary.display())),
            "{}",
            stderr(&out)
        );
        assert_eq!(sha256_of(&primary), before, "the served volume changed");
        assert!(!partial(&primary).exists());
    }

    // Onto an ordinary existing file: only with --force.
    let existing = dir.path().join("existing.img");
    std::fs::write(&existing, b"keep me").expect("write");
    let e = existing.to_str().expect("utf-8");
    let out = quicksplit(&["restore", a, "--to", e]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&existing).expect("read"), b"keep me");
    assert!(!partial(&existing).exists());
    let out = quicksplit(&["restore", a, "--to", e, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_of(&existing), sha);
    assert!(!partial(&existing).exists());

    // A corrupt archive: neither the image nor its partial file is left, and an existing
    // file stays as it was.
    let mut bytes = std::fs::read(&archive).expect("read archive");
    let at = 262_144 + 5 * MIB as usize + 3;
    bytes[at] ^= 0x40;
    let corrupt = dir.path().join("corrupt.tar");
    std::fs::write(&corrupt, &bytes).expect("write");
    let c = corrupt.to_str().expect("utf-8");
    let fresh = dir.path().join("fresh.img");
    let out = quicksplit(&["restore", c, "--to", fresh.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("FAILED"), "{}", stderr(&out));
    assert!(!fresh.exists() && !partial(&fresh).exists());
    let out = quicksplit(&["restore", c, "--to", e, "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        sha256_of(&existing),
        sha,
        "a failed restore changed the file"
    );
    assert!(!partial(&existing).exists());
}

#[test]
fn backup_targets_are_checked_before_the_backup_starts() {
    let dir = TempDir::new("locks-target");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    split_pair(dir.path(), &mut rpc);
    let d = dir.path().to_str().expect("utf-8");
    let bad = [
        (
            json!({"type": "tape", "path": "/nonexistent/dir/x.tar"}),
            "/nonexistent/dir",
        ),
        (json!({"type": "tape", "path": d}), "is a directory"),
        (json!({"type": "file", "path": d}), "is a directory"),
        (
            json!({"type": "file", "path": "/nonexistent/dir/x.img"}),
            "/nonexistent/dir",
        ),
    ];
    for (target, why) in &bad {
        let (code, msg) = rpc.err("backup_start", json!({"pair": "pr", "target": target}));
        assert_eq!(code, INVALID_PARAMS, "{target}: {msg}");
        assert!(msg.contains(why), "{target}: {msg}");
    }
    let sock_s = sock.to_str().expect("utf-8");
    for to in ["tape:/nonexistent/dir/x.tar", &format!("tape:{d}")] {
        let out = quicksplit(&["backup", "pr", "--to", to, "--socket", sock_s]);
        assert_eq!(out.status.code(), Some(1), "{to}");
        assert!(
            stderr(&out).contains("target path"),
            "{to}: {}",
            stderr(&out)
        );
    }
    // A file another process holds (served, restored, opened by qemu) is refused as in use.
    let held = dir.path().join("held.img");
    std::fs::write(&held, b"theirs").expect("write");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&held)
        .expect("open");
    drivers::file_lock::lock(&file, &held, drivers::file_lock::Access::Write).expect("lock");
    let (code, msg) = rpc.err(
        "backup_start",
        json!({"pair": "pr", "target": {"type": "tape", "path": held}}),
    );
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(msg.contains("in use"), "{msg}");
    assert_eq!(std::fs::read(&held).expect("read"), b"theirs");
    // Nothing was started.
    assert_eq!(rpc.ok("backup_get", json!({})), json!([]));
}

#[test]
fn a_cancelled_tape_backup_leaves_no_archive_and_a_completed_one_extracts() {
    let dir = TempDir::new("locks-cancel");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let primary = split_pair(dir.path(), &mut rpc);
    let want = sha256_of(&primary);

    for kind in ["tape", "file"] {
        let target = dir.path().join(format!("cancelled.{kind}"));
        let id = rpc.ok(
            "backup_start",
            json!({"pair": "pr", "rate": MIB, "target": {"type": kind, "path": target}}),
        )["id"]
            .as_u64()
            .expect("id");
        // While it runs, the bytes go to the partial file only.
        assert!(
            wait_for(Duration::from_secs(30), || {
                rpc.ok("backup_get", json!({"id": id}))[0]["bytes_done"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
            }),
            "the backup made no progress"
        );
        assert!(partial(&target).exists() && !target.exists());
        rpc.ok("backup_cancel", json!({"id": id}));
        let info = wait_backup(&mut rpc, id, Duration::from_secs(30));
        assert_eq!(info["state"], "cancelled", "{info}");
        assert!(
            !target.exists(),
            "{kind}: a cancelled backup left {}",
            target.display()
        );
        assert!(
            !partial(&target).exists(),
            "{kind}: the partial file was left"
        );
        if kind == "tape" {
            let out = output(Command::new("tar").arg("-tf").arg(&target));
            assert!(!out.status.success(), "tar listed a cancelled archive");
        }
    }

    let archive = dir.path().join("done.tar");
    assert_eq!(tape_backup(&mut rpc, &archive), want);
    assert!(!partial(&archive).exists());
    let x = dir.path().join("x");
    std::fs::create_dir(&x).expect("mkdir");
    let out = output(
        Command::new("tar")
            .args(["-x", "-b", "512", "-f"])
            .arg(&archive)
            .arg("-C")
            .arg(&x),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256_of(&x.join("volume.img")), want);
}
