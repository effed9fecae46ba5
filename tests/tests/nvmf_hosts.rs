//! The keyring and the hosts allowed on NVMe/TCP exports, through the real binary: keys added,
//! listed, refused (bad mode, duplicate, relative path) and removed; a configuration with keys
//! and hosts saved and replayed after a restart, with the secret in no RPC result, saved file
//! or log line; an export with `hosts` serving its host and refusing another with Connect
//! Invalid Host (logged with the host and its address) while it keeps serving the first; the
//! discovery log showing a subsystem only to the hosts it allows; a host removed live losing
//! its connections; the default rule for a non-loopback listen; and DH-HMAC-CHAP key names
//! checked wherever they can be given (the exchange itself is tested in `nvmf_auth.rs`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drivers::nvme::spec::{self, Command as NvmeCmd};
use drivers::nvmf::fabrics::{self, status};
use drivers::nvmf::host::{HostController, HostOptions, NvmfError, SyncQueue};
use hugepages::BufferPool;
use quicksplit_tests::logged::Logged;
use quicksplit_tests::nvmf::write_read;
use quicksplit_tests::{wait_for, RpcConn, TempDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const PARAMS: i64 = -32602;
const NOT_FOUND: i64 = -32001;
const CONFLICT: i64 = -32002;
/// The secret's distinctive part (a DHHC-1 secret's base64): it must never show up anywhere
/// the engine writes.
const SECRET_BODY: &str = "cXVpY2tzcGxpdC10ZXN0LXNlY3JldC1uZXZlci1sb2fVIFV0";
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-00000000000a";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-00000000000b";
const HOST_C: &str = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-0000-0000-00000000000c";

/// An RPC connection that keeps every reply, to look for the secret in them.
struct Recorded {
    rpc: RpcConn,
    replies: String,
}

impl Recorded {
    fn new(rpc: RpcConn) -> Self {
        Self {
            rpc,
            replies: String::new(),
        }
    }

    fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.rpc.call(method, params);
        self.replies.push_str(&r.to_string());
        assert!(r.get("error").is_none(), "{method} failed: {r}");
        r["result"].clone()
    }

    fn err(&mut self, method: &str, params: Value) -> (i64, String) {
        let r = self.rpc.call(method, params);
        self.replies.push_str(&r.to_string());
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{method} succeeded: {r}"));
        (
            e["code"].as_i64().unwrap(),
            e["message"].as_str().unwrap().to_string(),
        )
    }
}

/// A key file holding the test secret, with `mode`.
fn key_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("DHHC-1:00:{SECRET_BODY}:\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn keys_are_added_listed_refused_and_removed_and_never_shown() {
    let dir = TempDir::new("keyring");
    let server = Logged::empty(dir.path(), "serve");
    let mut c = Recorded::new(server.rpc());
    let k1 = key_file(dir.path(), "k1.key", 0o600);
    let k2 = key_file(dir.path(), "k2.key", 0o400);
    assert_eq!(c.ok("keyring_get_keys", json!({})), json!([]));
    assert_eq!(
        c.ok("keyring_file_add_key", json!({"name": "k1", "path": k1})),
        true
    );
    c.ok("keyring_file_add_key", json!({"name": "k2", "path": k2}));
    assert_eq!(
        c.ok("keyring_get_keys", json!({})),
        json!([{"name": "k1", "path": k1}, {"name": "k2", "path": k2}])
    );
    // A duplicate name, a file others can read, a relative path, no file, a directory.
    let (code, msg) = c.err("keyring_file_add_key", json!({"name": "k1", "path": k2}));
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(msg.contains("already exists"), "{msg}");
    for (mode, shown) in [(0o644, "0644"), (0o640, "0640"), (0o602, "0602")] {
        let open = key_file(dir.path(), "open.key", mode);
        let (code, msg) = c.err(
            "keyring_file_add_key",
            json!({"name": "open", "path": open}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(msg.contains(&format!("mode {shown}")), "{msg}");
    }
    let (code, msg) = c.err(
        "keyring_file_add_key",
        json!({"name": "rel", "path": "k1.key"}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("absolute"), "{msg}");
    let none = dir.path().join("none.key");
    let (code, _) = c.err(
        "keyring_file_add_key",
        json!({"name": "none", "path": none}),
    );
    assert_eq!(code, PARAMS);
    let (code, msg) = c.err(
        "keyring_file_add_key",
        json!({"name": "dir", "path": dir.path()}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("not a regular file"), "{msg}");
    assert_eq!(
        c.ok("keyring_get_keys", json!({}))
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // A key named on an export's host is read from the keyring; the key cannot be removed
    // while the host names it.
    c.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    let port = quicksplit_tests::free_port();
    let keyed = "nqn.2026-12.io.quicksplit:keyed";
    let export = |host: Value| {
        json!({"nqn": keyed, "bdev": "m", "listen": format!("127.0.0.1:{port}"),
               "hosts": [host]})
    };
    c.ok(
        "nvmf_export_start",
        export(json!({"nqn": HOST_A, "dhchap_key": "k1"})),
    );
    let (code, msg) = c.err("keyring_file_remove_key", json!({"name": "k1"}));
    assert_eq!(code, CONFLICT, "{msg}");
    c.ok("nvmf_export_stop", json!({"nqn": keyed}));
    let (code, msg) = c.err(
        "nvmf_export_start",
        export(json!({"nqn": HOST_A, "dhchap_ctrlr_key": "nokey"})),
    );
    assert_eq!(code, NOT_FOUND, "{msg}");
    assert!(msg.contains("no key named 'nokey'"), "{msg}");
    // A controller key alone, and a key file that holds no DHHC-1 secret, are refused.
    let (code, msg) = c.err(
        "nvmf_export_start",
        export(json!({"nqn": HOST_A, "dhchap_ctrlr_key": "k2"})),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("needs a dhchap_key too"), "{msg}");
    let junk = dir.path().join("junk.key");
    std::fs::write(&junk, "not a secret\n").unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.ok(
        "keyring_file_add_key",
        json!({"name": "junk", "path": junk}),
    );
    let (code, msg) = c.err(
        "nvmf_export_start",
        export(json!({"nqn": HOST_A, "dhchap_key": "junk"})),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(
        msg.contains("'junk' is unusable") && msg.contains("DHHC-1"),
        "{msg}"
    );
    c.ok("keyring_file_remove_key", json!({"name": "junk"}));
    assert_eq!(c.ok("nvmf_get_exports", json!({})), json!([]));
    c.ok("keyring_file_remove_key", json!({"name": "k1"}));
    let (code, _) = c.err("keyring_file_remove_key", json!({"name": "k1"}));
    assert_eq!(code, NOT_FOUND);
    assert_eq!(
        c.ok("keyring_get_keys", json!({})),
        json!([{"name": "k2", "path": k2}])
    );
    assert!(!c.replies.contains(SECRET_BODY), "{}", c.replies);
    let config = c.ok("save_config", json!({})).to_string();
    assert!(!config.contains(SECRET_BODY), "{config}");
    assert!(
        !server.text().contains(SECRET_BODY),
        "the secret is in the log"
    );
}

/// The NQNs of the discovery log `hostnqn` gets at `port`.
fn discovery(port: u16, hostnqn: &str) -> Vec<String> {
    let mut opts = HostOptions::new("127.0.0.1", port, fabrics::DISCOVERY_NQN);
    opts.hostnqn = hostnqn.to_string();
    let (mut q, _) = SyncQueue::connect(&opts, 0, 32, fabrics::CNTLID_DYNAMIC, 0).unwrap();
    let en = fabrics::property_set(spec::REG_CC as u32, spec::cc_enable());
    q.command("enable", en, &[], 0).unwrap();
    let mut glp = NvmeCmd::new(fabrics::admin::GET_LOG_PAGE);
    glp.dw[10] = fabrics::LOG_DISCOVERY as u32 | ((4096 / 4 - 1) << 16);
    let glp = fabrics::with_sgl(glp, 4096, false);
    let (_, log) = q.command("get log page", glp, &[], 4096).unwrap();
    let records = u64::from_le_bytes(log[8..16].try_into().unwrap()) as usize;
    (1..=records.min(3))
        .map(|i| {
            let f = &log[1024 * i + 256..1024 * i + 512];
            let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
            String::from_utf8_lossy(&f[..end]).into_owned()
        })
        .collect()
}

fn connect_as(
    port: u16,
    nqn: &str,
    host: &str,
) -> Result<std::sync::Arc<HostController>, NvmfError> {
    let mut opts = HostOptions::new("127.0.0.1", port, nqn);
    opts.hostnqn = host.to_string();
    HostController::connect(opts)
}

fn connections(c: &mut RpcConn, nqn: &str) -> u64 {
    let list = c.ok("nvmf_get_exports", json!({}));
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e["nqn"] == nqn)
        .map_or(0, |e| e["connections"].as_u64().unwrap())
}

#[test]
fn an_export_serves_its_hosts_refuses_others_and_shows_itself_only_to_them() {
    let dir = TempDir::new("nvmf-hosts");
    let target_dir = dir.path().join("target");
    std::fs::create_dir_all(&target_dir).unwrap();
    let server = Logged::empty(&target_dir, "target");
    let mut c = server.rpc();
    let port = quicksplit_tests::free_port();
    let nqn = "nqn.2026-12.io.quicksplit:hosts";
    let open = "nqn.2026-12.io.quicksplit:open";
    c.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    c.ok("bdev_malloc_create", json!({"name": "o", "size": 4 * MIB}));
    c.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": "m", "listen": format!("127.0.0.1:{port}"),
               "hosts": [HOST_A]}),
    );
    // No hosts on a loopback listen: any host.
    c.ok(
        "nvmf_export_start",
        json!({"nqn": open, "bdev": "o", "listen": format!("127.0.0.1:{port}")}),
    );
    let list = c.ok("nvmf_get_exports", json!({}));
    let shown = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["nqn"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(shown(nqn)["hosts"], json!([{"nqn": HOST_A}]));
    assert_eq!(shown(nqn)["allow_any_host"], false);
    assert_eq!(shown(open)["hosts"], json!([]));
    assert_eq!(shown(open)["allow_any_host"], true);

    let pool = BufferPool::new(64 << 10, 4).unwrap();
    let a = connect_as(port, nqn, HOST_A).expect("host A connects");
    write_read(&a, &pool, 0, 0xa1);
    // Host B: Connect Invalid Host (SCT 1h, SC 84h), on the admin queue and on an I/O queue
    // naming A's controller.
    match connect_as(port, nqn, HOST_B) {
        Err(NvmfError::HostNotAllowed {
            hostnqn, status, ..
        }) => {
            assert_eq!(hostnqn, HOST_B);
            assert_eq!((status.code_type(), status.code()), (1, 0x84));
            assert_eq!(status.0 & 0x7ff, status::CONNECT_INVALID_HOST.0 & 0x7ff);
        }
        Err(e) => panic!("expected Connect Invalid Host, got {e}"),
        Ok(_) => panic!("host B was let in"),
    }
    let mut b_opts = HostOptions::new("127.0.0.1", port, nqn);
    b_opts.hostnqn = HOST_B.to_string();
    let r = SyncQueue::connect(&b_opts, 1, 32, a.cntlid(), 0);
    assert!(
        matches!(r, Err(NvmfError::HostNotAllowed { .. })),
        "{:?}",
        r.err()
    );
    // B may use the export open to any host; A still works.
    let b_open = connect_as(port, open, HOST_B).expect("host B on the open export");
    write_read(&b_open, &pool, MIB, 0xb2);
    write_read(&a, &pool, 2 * MIB, 0xa3);
    // The refusal is logged at warn with the host and its address.
    assert!(
        wait_for(Duration::from_secs(5), || server.text().lines().any(|l| l
            .contains("WARN")
            && l.contains("not allowed")
            && l.contains(HOST_B)
            && l.contains("127.0.0.1:"))),
        "no warning for host B:\n{}",
        server.text()
    );
    // Discovery: each host sees what it may connect to.
    assert_eq!(
        discovery(port, HOST_A),
        vec![nqn.to_string(), open.to_string()]
    );
    assert_eq!(discovery(port, HOST_B), vec![open.to_string()]);

    // Our initiator over RPC, from a second engine: hostnqn A attaches, B is told why not.
    let init_dir = dir.path().join("initiator");
    std::fs::create_dir_all(&init_dir).unwrap();
    let initiator = Logged::empty(&init_dir, "initiator");
    let mut i = initiator.rpc();
    let attach = |name: &str, host: &str| {
        json!({"name": name, "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port,
               "subnqn": nqn, "hostnqn": host})
    };
    assert_eq!(
        i.ok("bdev_nvme_attach_controller", attach("na", HOST_A)),
        json!(["nan1"])
    );
    let (_, msg) = i.err("bdev_nvme_attach_controller", attach("nb", HOST_B));
    assert!(
        msg.contains(&format!("the target does not allow host NQN '{HOST_B}'")),
        "{msg}"
    );
    let (code, msg) = i.err("bdev_nvme_attach_controller", attach("nb", "host-b"));
    assert_eq!(code, PARAMS, "{msg}");
    // Key names: an unknown one is unknown. With a controller key the controller must prove
    // itself even when it does not ask the host to authenticate: this export has no key for
    // A, so the attach fails.
    let mut keyed = attach("nk", HOST_A);
    keyed["dhchap_key"] = json!("k");
    let (code, msg) = i.err("bdev_nvme_attach_controller", keyed.clone());
    assert_eq!(code, NOT_FOUND, "{msg}");
    let key = key_file(&init_dir, "k.key", 0o600);
    i.ok("keyring_file_add_key", json!({"name": "k", "path": key}));
    keyed["dhchap_ctrlr_key"] = json!("k");
    let (_, msg) = i.err("bdev_nvme_attach_controller", keyed);
    assert!(msg.contains("DH-HMAC-CHAP authentication"), "{msg}");
    // The saved configuration attaches again with the same host NQN.
    let saved = i.ok("save_config", json!({}));
    let attached = saved["config"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["method"] == "bdev_nvme_attach_controller")
        .cloned()
        .unwrap();
    assert_eq!(attached["params"]["hostnqn"], HOST_A, "{saved}");
    // The nvmf backup target: B refused with the reason; key names refused (an unknown
    // one as unknown).
    i.ok("bdev_malloc_create", json!({"name": "p", "size": 4 * MIB}));
    i.ok("bdev_malloc_create", json!({"name": "s", "size": 4 * MIB}));
    i.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s"}),
    );
    let target = |host: &str| {
        json!({"type": "nvmf", "traddr": "127.0.0.1", "trsvcid": port, "subnqn": nqn,
               "hostnqn": host})
    };
    let (_, msg) = i.err(
        "backup_start",
        json!({"pair": "pr", "target": target(HOST_B)}),
    );
    assert!(
        msg.contains(&format!("the target does not allow host NQN '{HOST_B}'")),
        "{msg}"
    );
    let mut keyed = target(HOST_A);
    keyed["dhchap_ctrlr_key"] = json!("nokey");
    let (code, msg) = i.err("backup_start", json!({"pair": "pr", "target": keyed}));
    assert_eq!(code, NOT_FOUND, "an unknown key name: {msg}");
    assert!(msg.contains("no key named 'nokey'"), "{msg}");
    let mut keyed = target(HOST_A);
    keyed["dhchap_key"] = json!("k");
    keyed["dhchap_ctrlr_key"] = json!("k");
    let (_, msg) = i.err("backup_start", json!({"pair": "pr", "target": keyed}));
    assert!(msg.contains("DH-HMAC-CHAP authentication"), "{msg}");
    assert_eq!(i.ok("backup_get", json!({})), json!([]));

    // Removing A closes its connections (the attached controller's and ours) and refuses it.
    assert!(connections(&mut c, nqn) >= 2);
    c.ok(
        "nvmf_export_remove_host",
        json!({"nqn": nqn, "host": HOST_A}),
    );
    assert!(
        wait_for(Duration::from_secs(10), || connections(&mut c, nqn) == 0),
        "host A's connections stay open"
    );
    assert!(matches!(
        connect_as(port, nqn, HOST_A),
        Err(NvmfError::HostNotAllowed { .. })
    ));
    assert_eq!(discovery(port, HOST_A), vec![open.to_string()]);
    let (code, _) = c.err(
        "nvmf_export_remove_host",
        json!({"nqn": nqn, "host": HOST_A}),
    );
    assert_eq!(code, NOT_FOUND);
    c.ok("nvmf_export_add_host", json!({"nqn": nqn, "host": HOST_C}));
    let (code, msg) = c.err("nvmf_export_add_host", json!({"nqn": nqn, "host": HOST_C}));
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("already allowed"), "{msg}");
    let (code, msg) = c.err(
        "nvmf_export_add_host",
        json!({"nqn": nqn, "host": HOST_A, "dhchap_key": "k"}),
    );
    assert_eq!(code, NOT_FOUND, "{msg}");
    let (code, _) = c.err(
        "nvmf_export_add_host",
        json!({"nqn": "nqn.none", "host": HOST_C}),
    );
    assert_eq!(code, NOT_FOUND);
    // The engine still serves B on the open export.
    write_read(&b_open, &pool, 3 * MIB, 0xb4);
    assert!(
        !initiator.text().contains(SECRET_BODY),
        "the secret is in the log"
    );
}

/// The machine's address toward the outside, if it has one; 0.0.0.0 (every interface, not
/// loopback) otherwise.
fn non_loopback_address() -> String {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect("192.0.2.1:9")?;
        s.local_addr()
    });
    match probe {
        Ok(a) if !a.ip().is_loopback() && !a.ip().is_unspecified() => a.ip().to_string(),
        _ => "0.0.0.0".to_string(),
    }
}

#[test]
fn a_listen_beyond_loopback_needs_hosts_or_allow_any_host() {
    let dir = TempDir::new("nvmf-listen");
    let server = Logged::empty(dir.path(), "serve");
    let mut c = server.rpc();
    c.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    for host in [non_loopback_address(), "0.0.0.0".to_string()] {
        let listen = format!("{host}:{}", quicksplit_tests::free_port());
        let nqn = "nqn.2026-12.io.quicksplit:wide";
        let (code, msg) = c.err(
            "nvmf_export_start",
            json!({"nqn": nqn, "bdev": "m", "listen": listen}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(
            msg.contains("not loopback") && msg.contains("allow_any_host"),
            "{msg}"
        );
        // An explicit false with no hosts: closed until a host is added.
        c.ok(
            "nvmf_export_start",
            json!({"nqn": nqn, "bdev": "m", "listen": listen, "allow_any_host": false}),
        );
        let e = &c.ok("nvmf_get_exports", json!({}))[0];
        assert_eq!(
            (e["allow_any_host"].clone(), e["hosts"].clone()),
            (json!(false), json!([]))
        );
        c.ok("nvmf_export_stop", json!({"nqn": nqn}));
        c.ok(
            "nvmf_export_start",
            json!({"nqn": nqn, "bdev": "m", "listen": listen, "allow_any_host": true}),
        );
        let e = &c.ok("nvmf_get_exports", json!({}))[0];
        assert_eq!(
            (e["allow_any_host"].clone(), e["hosts"].clone()),
            (json!(true), json!([]))
        );
        c.ok("nvmf_export_stop", json!({"nqn": nqn}));
        c.ok(
            "nvmf_export_start",
            json!({"nqn": nqn, "bdev": "m", "listen": listen, "hosts": [{"nqn": HOST_A}]}),
        );
        let e = &c.ok("nvmf_get_exports", json!({}))[0];
        assert_eq!(e["allow_any_host"], false);
        c.ok("nvmf_export_stop", json!({"nqn": nqn}));
    }
    // 0.0.0.0 also answers on loopback: the host list holds there too.
    let port = quicksplit_tests::free_port();
    let nqn = "nqn.2026-12.io.quicksplit:any";
    c.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": "m", "listen": format!("0.0.0.0:{port}"),
               "hosts": [HOST_A]}),
    );
    assert!(connect_as(port, nqn, HOST_A).is_ok());
    assert!(matches!(
        connect_as(port, nqn, HOST_B),
        Err(NvmfError::HostNotAllowed { .. })
    ));
    // Bad host entries.
    for (hosts, needle) in [
        (json!(["host-a"]), "not an NQN"),
        (json!([{"nqn": HOST_A, "key": "k"}]), "key"),
        (json!([HOST_A, {"nqn": HOST_A}]), "twice"),
        (json!([7]), "host NQN or"),
    ] {
        let (code, msg) = c.err(
            "nvmf_export_start",
            json!({"nqn": "nqn.2026-12.io.quicksplit:bad", "bdev": "m", "hosts": hosts}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
}

#[test]
fn keys_and_hosts_are_saved_and_replayed_without_the_secret() {
    let dir = TempDir::new("nvmf-hosts-config");
    let server = Logged::empty(dir.path(), "first");
    let mut c = Recorded::new(server.rpc());
    let key = key_file(dir.path(), "host.key", 0o600);
    let port = quicksplit_tests::free_port();
    let nqn = "nqn.2026-12.io.quicksplit:saved";
    c.ok("keyring_file_add_key", json!({"name": "hk", "path": key}));
    c.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    c.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": "m", "listen": format!("127.0.0.1:{port}"),
               "hosts": [HOST_A, {"nqn": HOST_B}]}),
    );
    c.ok("nvmf_export_add_host", json!({"nqn": nqn, "host": HOST_C}));
    c.ok(
        "nvmf_export_remove_host",
        json!({"nqn": nqn, "host": HOST_B}),
    );
    let saved = c.ok("save_config", json!({}));
    let calls = saved["config"].as_array().unwrap();
    assert_eq!(
        calls[0],
        json!({"method": "keyring_file_add_key", "params": {"name": "hk", "path": key}}),
        "keys come first"
    );
    let export = calls
        .iter()
        .find(|e| e["method"] == "nvmf_export_start")
        .unwrap();
    assert_eq!(
        export["params"]["hosts"],
        json!([{"nqn": HOST_A}, {"nqn": HOST_C}])
    );
    assert_eq!(export["params"]["allow_any_host"], false);
    for file in ["config.json", "config.journal"] {
        let on_disk = std::fs::read_to_string(dir.path().join("state").join(file)).unwrap();
        assert!(!on_disk.contains(SECRET_BODY), "{file}");
    }
    let before = c.ok("nvmf_get_exports", json!({}));
    let replies = c.replies.clone();
    let first_log = server.text();
    server.stop();

    // Restarted from the state directory: the same keys and hosts.
    let server = Logged::start(dir.path(), "second", None);
    let mut c = Recorded::new(server.rpc());
    assert_eq!(
        c.ok("keyring_get_keys", json!({})),
        json!([{"name": "hk", "path": key}])
    );
    let after = c.ok("nvmf_get_exports", json!({}));
    assert_eq!(after[0]["hosts"], before[0]["hosts"]);
    assert_eq!(after[0]["allow_any_host"], false);
    assert!(connect_as(port, nqn, HOST_C).is_ok());
    assert!(matches!(
        connect_as(port, nqn, HOST_B),
        Err(NvmfError::HostNotAllowed { .. })
    ));
    // The same configuration through load_config on a fresh engine.
    let fresh_dir = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh_dir).unwrap();
    let fresh = Logged::empty(&fresh_dir, "fresh");
    let mut f = fresh.rpc();
    c.ok("nvmf_export_stop", json!({"nqn": nqn}));
    f.ok("load_config", saved.clone());
    assert_eq!(f.ok("save_config", json!({})), saved);
    // A key file that became readable by others fails the replay as a whole.
    f.ok("nvmf_export_stop", json!({"nqn": nqn}));
    f.ok("bdev_delete", json!({"name": "m"}));
    f.ok("keyring_file_remove_key", json!({"name": "hk"}));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, msg) = f.err("load_config", saved);
    assert_eq!(code, PARAMS, "{msg}");
    assert!(
        msg.contains("mode 0644") && msg.contains("nothing"),
        "{msg}"
    );
    assert_eq!(f.ok("keyring_get_keys", json!({})), json!([]));
    for text in [replies, c.replies, first_log, server.text(), fresh.text()] {
        assert!(!text.contains(SECRET_BODY), "the secret leaked:\n{text}");
    }
}
