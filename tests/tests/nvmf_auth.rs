//! DH-HMAC-CHAP between quicksplit's initiator and its NVMe/TCP target, through the real
//! binary: hosts whose entry names keys authenticate every queue (null and ffdhe2048 groups,
//! one way and both ways) and then read and write; a missing or wrong key, or a controller
//! that cannot prove its own key, is refused and logged, while other hosts keep being served;
//! nothing but authentication is served to a queue before it has authenticated; a generated
//! set of malformed authentication messages ends only the connections that sent them; and
//! `bdev_nvme_attach_controller` and the `nvmf` backup target authenticate with keyring keys,
//! the backup landing byte for byte. (The Linux kernel's host and target are in the guest
//! tests.)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drivers::nvmf::auth::{self, AuthError, AuthTransport, DhchapSecret, HashId, HostKeys};
use drivers::nvmf::fabrics::{self, status};
use drivers::nvmf::host::{HostController, HostOptions, NvmfError, SyncQueue};
use drivers::{IoBufs, IoOp};
use hugepages::BufferPool;
use quicksplit_tests::logged::Logged;
use quicksplit_tests::nbd::NbdClient;
use quicksplit_tests::nvmf::write_read;
use quicksplit_tests::{wait_backup, wait_for, TempDir};
use rand::{Rng, SeedableRng};
use serde_json::json;

const MIB: u64 = 1 << 20;
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-0000000000a1";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-0000000000b1";
const HOST_C: &str = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-0000-0000-0000000000c1";
const NQN: &str = "nqn.2026-12.io.quicksplit:auth";

/// The secret of `fill` bytes, as `nvme gen-dhchap-key` would print it.
fn secret(fill: u8, len: usize, transform: Option<HashId>) -> String {
    DhchapSecret::encode(&vec![fill; len], transform).to_string()
}

fn parsed(text: &str) -> DhchapSecret {
    DhchapSecret::parse(text.as_bytes()).expect("a secret")
}

/// A key file (mode 0600) holding `text`.
fn key_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn options(port: u16, host: &str, keys: Option<HostKeys>) -> HostOptions {
    let mut o = HostOptions::new("127.0.0.1", port, NQN);
    o.hostnqn = host.to_string();
    o.dhchap = keys.map(Arc::new);
    o
}

/// A Property Get of CAP on a raw admin queue: its status (0 when it succeeds).
fn property_get_status(q: &mut SyncQueue) -> Option<u16> {
    match q.command("Property Get", fabrics::property_get(0, true), &[], 0) {
        Ok(_) => Some(0),
        Err(NvmfError::Status { status, .. }) => Some(status.0 & 0x7ff),
        // The controller closed the connection.
        Err(_) => None,
    }
}

struct Rig {
    _dir: TempDir,
    server: Logged,
    port: u16,
    keys_a: HostKeys,
    keys_b: HostKeys,
}

/// An export of a RAM disk allowing A (host key, SHA-256 transformed), B (host and controller
/// keys) and C (no key).
fn rig(tag: &str) -> Rig {
    let dir = TempDir::new(tag);
    let server = Logged::empty(dir.path(), "target");
    let mut c = server.rpc();
    let (a, b, bc) = (
        secret(0xa1, 32, Some(HashId::Sha256)),
        secret(0xb1, 48, Some(HashId::Sha384)),
        secret(0xbc, 32, None),
    );
    for (name, text) in [("ka", &a), ("kb", &b), ("kbc", &bc)] {
        let path = key_file(dir.path(), name, text);
        c.ok("keyring_file_add_key", json!({"name": name, "path": path}));
    }
    c.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    let port = quicksplit_tests::free_port();
    c.ok(
        "nvmf_export_start",
        json!({"nqn": NQN, "bdev": "m", "listen": format!("127.0.0.1:{port}"), "hosts": [
            {"nqn": HOST_A, "dhchap_key": "ka"},
            {"nqn": HOST_B, "dhchap_key": "kb", "dhchap_ctrlr_key": "kbc"},
            HOST_C]}),
    );
    Rig {
        _dir: dir,
        server,
        port,
        keys_a: HostKeys {
            key: parsed(&a),
            ctrl_key: None,
        },
        keys_b: HostKeys {
            key: parsed(&b),
            ctrl_key: Some(parsed(&bc)),
        },
    }
}

#[test]
fn hosts_with_keys_authenticate_and_wrong_keys_are_refused() {
    let r = rig("nvmf-auth");
    let pool = BufferPool::new(4096, 4).unwrap();
    // A (one way), B (both ways) and C (no key) connect and do I/O on an I/O queue (which
    // authenticates too).
    let a = HostController::connect(options(r.port, HOST_A, Some(r.keys_a.clone()))).unwrap();
    write_read(&a, &pool, 0, 0x11);
    let b = HostController::connect(options(r.port, HOST_B, Some(r.keys_b.clone()))).unwrap();
    write_read(&b, &pool, 8192, 0x22);
    let c = HostController::connect(options(r.port, HOST_C, None)).unwrap();
    write_read(&c, &pool, 16384, 0x33);
    let log = r.server.text();
    assert!(
        log.contains("NVMe/TCP host authenticated") && log.contains(HOST_B),
        "{log}"
    );

    // A without a key: the controller asks, the initiator cannot.
    let e = HostController::connect(options(r.port, HOST_A, None)).unwrap_err();
    assert!(e.to_string().contains("requires DH-HMAC-CHAP"), "{e}");
    // A with B's key: refused with Failure1, logged with the host.
    let wrong = HostController::connect(options(r.port, HOST_A, Some(r.keys_b.clone())));
    match wrong {
        Err(NvmfError::AuthFailed {
            source: AuthError::Refused(w),
            qid: 0,
            ..
        }) => assert_eq!(w, auth::messages::why::FAILED),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // B expecting another controller key: the host refuses the controller.
    let mut k = r.keys_b.clone();
    k.ctrl_key = Some(parsed(&secret(0x99, 32, None)));
    let e = HostController::connect(options(r.port, HOST_B, Some(k))).unwrap_err();
    assert!(
        matches!(
            e,
            NvmfError::AuthFailed {
                source: AuthError::ControllerNotAuthentic(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || {
            let log = r.server.text();
            log.contains("DH-HMAC-CHAP authentication failed")
                && log.contains("does not match its key")
                && log.contains("the host refused the controller")
        }),
        "{}",
        r.server.text()
    );
    // The hosts connected before are still served.
    write_read(&a, &pool, 0, 0x44);
    write_read(&b, &pool, 8192, 0x55);
    write_read(&c, &pool, 16384, 0x66);
}

#[test]
fn a_queue_gets_nothing_but_authentication_until_it_has_authenticated() {
    let r = rig("nvmf-auth-gate");
    let o = options(r.port, HOST_A, None);
    let (mut q, cqe) = SyncQueue::connect_raw(&o, 0, 32, fabrics::CNTLID_DYNAMIC, 0, 0).unwrap();
    assert_ne!(cqe.result & fabrics::CONNECT_AUTH_REQUIRED, 0, "ATR");
    assert_eq!(
        property_get_status(&mut q),
        Some(status::AUTH_REQUIRED.0 & 0x7ff)
    );
    auth::authenticate(&mut q, &r.keys_a, HOST_A, NQN, 9).unwrap();
    assert_eq!(property_get_status(&mut q), Some(0));
    // A host without keys on the export is not asked, and an AUTH_Send from it is refused.
    let o = options(r.port, HOST_C, None);
    let (mut q, cqe) = SyncQueue::connect_raw(&o, 0, 32, fabrics::CNTLID_DYNAMIC, 0, 0).unwrap();
    assert_eq!(cqe.result & fabrics::CONNECT_AUTH_REQUIRED, 0);
    let e = q.auth_send(&[0u8; 72]).unwrap_err();
    assert!(e.to_string().contains("AUTH_Send failed"), "{e}");
    assert_eq!(property_get_status(&mut q), Some(0));
}

/// A malformed exchange: garbage, or a valid message cut short or with bytes flipped, sent at
/// any step, with AUTH_Receive lengths that are wrong now and then.
fn malformed_exchange(q: &mut SyncQueue, rng: &mut rand::rngs::SmallRng) {
    let negotiate = auth::messages::Message::Negotiate {
        tid: 1,
        sc_c: 0,
        hashes: vec![1, 2, 3],
        groups: vec![1, 0],
    }
    .encode();
    for _ in 0..rng.gen_range(1..5) {
        let mut m: Vec<u8> = match rng.gen_range(0..4) {
            0 => (0..rng.gen_range(1..700)).map(|_| rng.gen()).collect(),
            1 => negotiate[..rng.gen_range(1..negotiate.len())].to_vec(),
            2 => negotiate.clone(),
            _ => {
                // A reply-shaped message with lengths that lie.
                let mut v = vec![0u8; rng.gen_range(16..400)];
                rng.fill(&mut v[..]);
                v[0] = 1;
                v[1] = 2;
                v
            }
        };
        if rng.gen_bool(0.5) {
            let at = rng.gen_range(0..m.len());
            m[at] ^= 1 << rng.gen_range(0..8);
        }
        if q.auth_send(&m).is_err() && rng.gen_bool(0.5) {
            return;
        }
        let len = match rng.gen_range(0..6) {
            0 => 0,
            1 => rng.gen_range(1..16),
            2 => 1 << 20,
            _ => auth::RECEIVE_LEN,
        };
        let cmd = fabrics::auth_receive(len);
        if q.command("AUTH_Receive", cmd, &[], len as usize).is_err() && rng.gen_bool(0.3) {
            return;
        }
    }
}

#[test]
fn malformed_authentication_ends_only_its_connection() {
    let r = rig("nvmf-auth-fuzz");
    let pool = BufferPool::new(4096, 4).unwrap();
    let a = HostController::connect(options(r.port, HOST_A, Some(r.keys_a.clone()))).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0xdcac);
    for round in 0..150 {
        let o = options(r.port, HOST_A, None);
        let (mut q, _) = SyncQueue::connect_raw(&o, 0, 32, fabrics::CNTLID_DYNAMIC, 0, 0).unwrap();
        malformed_exchange(&mut q, &mut rng);
        // Never authenticated: the queue refuses other commands, or is closed.
        match property_get_status(&mut q) {
            None => {}
            Some(st) => assert_eq!(st, status::AUTH_REQUIRED.0 & 0x7ff, "round {round}"),
        }
        if round % 50 == 0 {
            write_read(&a, &pool, 0, round as u8);
        }
    }
    // The engine still authenticates and serves a good host.
    let again = HostController::connect(options(r.port, HOST_A, Some(r.keys_a.clone()))).unwrap();
    write_read(&again, &pool, 4096, 0x77);
    write_read(&a, &pool, 0, 0x78);
}

#[test]
fn the_initiator_and_the_backup_target_authenticate_with_keyring_keys() {
    let r = rig("nvmf-auth-rpc");
    let init_dir = TempDir::new("nvmf-auth-initiator");
    let init = Logged::empty(init_dir.path(), "initiator");
    let mut i = init.rpc();
    let b_key = key_file(
        init_dir.path(),
        "b",
        &secret(0xb1, 48, Some(HashId::Sha384)),
    );
    let bc_key = key_file(init_dir.path(), "bc", &secret(0xbc, 32, None));
    let a_key = key_file(
        init_dir.path(),
        "a",
        &secret(0xa1, 32, Some(HashId::Sha256)),
    );
    for (name, path) in [("b", &b_key), ("bc", &bc_key), ("a", &a_key)] {
        i.ok("keyring_file_add_key", json!({"name": name, "path": path}));
    }
    let attach = json!({"name": "n", "trtype": "tcp", "traddr": "127.0.0.1",
                        "trsvcid": r.port, "subnqn": NQN, "hostnqn": HOST_B,
                        "dhchap_key": "b", "dhchap_ctrlr_key": "bc"});
    assert_eq!(
        i.ok("bdev_nvme_attach_controller", attach.clone()),
        json!(["nn1"])
    );
    let saved = i.ok("save_config", json!({})).to_string();
    assert!(
        saved.contains(r#""dhchap_key":"b""#) && saved.contains(r#""dhchap_ctrlr_key":"bc""#),
        "{saved}"
    );
    assert!(!saved.contains("DHHC-1"), "no secret in the configuration");
    i.ok("bdev_nvme_detach_controller", json!({"name": "n"}));
    // With the wrong key (A's, for B): refused, nothing attached.
    let mut wrong = attach.clone();
    wrong["name"] = json!("w");
    wrong["dhchap_key"] = json!("a");
    let (_, msg) = i.err("bdev_nvme_attach_controller", wrong);
    assert!(
        msg.contains("DH-HMAC-CHAP authentication") && msg.contains("refused"),
        "{msg}"
    );

    // A backup of a pair to the export as A: the namespace then holds the image.
    let nbd = init_dir.path().join("nbd.sock");
    quicksplit_tests::ram_pair(&mut i, 4 * MIB, None, &nbd);
    let mut image = vec![0u8; (4 * MIB) as usize];
    rand::rngs::SmallRng::seed_from_u64(3).fill(&mut image[..]);
    let mut w = NbdClient::connect(&nbd, "p").unwrap();
    for (n, chunk) in image.chunks(256 << 10).enumerate() {
        w.write((n as u64) * (256 << 10), chunk).unwrap();
    }
    drop(w);
    i.ok("pair_split", json!({"name": "pr"}));
    let id = i.ok(
        "backup_start",
        json!({"pair": "pr", "target": {"type": "nvmf", "traddr": "127.0.0.1",
               "trsvcid": r.port, "subnqn": NQN, "hostnqn": HOST_A, "dhchap_key": "a"}}),
    )["id"]
        .as_u64()
        .unwrap();
    let done = wait_backup(&mut i, id, Duration::from_secs(60));
    assert_eq!(done["state"], "done", "{done}");
    let shown = done.to_string();
    assert!(!shown.contains("DHHC-1"), "{shown}");
    let ctrl = HostController::connect(options(r.port, HOST_A, Some(r.keys_a.clone()))).unwrap();
    let got = read_all(&ctrl, 4 * MIB);
    assert!(got == image, "the namespace holds something else");
    let log = init.text();
    assert!(!log.contains("DHHC-1"), "a secret in the initiator's log");
}

/// Reads `size` bytes of namespace 1 in 64 KiB pieces.
fn read_all(ctrl: &Arc<HostController>, size: u64) -> Vec<u8> {
    let pool = BufferPool::new(64 << 10, 4).unwrap();
    let mut q = ctrl.open_io_queue(1).expect("I/O queue");
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let mut bufs = IoBufs::new();
        bufs.push(pool.get().expect("buffer"));
        q.submit(IoOp::Read, at, 64 << 10, bufs, 1)
            .map_err(|_| "submit refused")
            .unwrap();
        let mut done = Vec::new();
        assert!(wait_for(Duration::from_secs(10), || {
            q.poll(&mut done);
            !done.is_empty()
        }));
        let d = done.pop().unwrap();
        d.result.expect("read failed");
        out.extend_from_slice(d.bufs[0].as_slice());
        at += 64 << 10;
    }
    out
}
