//! Every RPC method through the real binary's socket, errors included; the CLI's exit codes; the
//! configuration round trip.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use quicksplit_tests::{binary, start_empty, start_on, wait_for, RpcConn, Server, TempDir};
use serde_json::{json, Value};

const PARSE: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const NO_METHOD: i64 = -32601;
const PARAMS: i64 = -32602;
const NOT_FOUND: i64 = -32001;
const CONFLICT: i64 = -32002;
const WRONG_STATE: i64 = -32003;
const UNAVAILABLE: i64 = -32004;
const IO_ERROR: i64 = -32005;

fn pair_state(c: &mut RpcConn, name: &str) -> Value {
    c.ok("pair_get", json!({"name": name}))[0].clone()
}

#[test]
fn every_method_through_the_socket() {
    let dir = TempDir::new("rpc");
    let (_server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the RPC socket must be private");

    // The server lists exactly the methods of the one table that declares them, in its order.
    let methods = c.ok("rpc_get_methods", json!({}));
    let declared: Vec<&str> = engine::rpc::methods::METHODS
        .iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(methods, json!(declared));
    for m in [
        "bdev_malloc_create",
        "bdev_uring_create",
        "bdev_nvme_attach_controller",
        "bdev_nvme_detach_controller",
        "bdev_delete",
        "bdev_get_bdevs",
        "pair_create",
        "pair_split",
        "pair_resync",
        "pair_delete",
        "pair_get",
        "backup_start",
        "backup_get",
        "backup_cancel",
        "checkpoint_list",
        "checkpoint_delete",
        "bdev_get_iostat",
        "log_set_level",
        "log_get_level",
        "pair_verify",
        "verify_get",
        "verify_cancel",
        "nbd_export_start",
        "nbd_export_stop",
        "nbd_get_exports",
        "nvmf_export_start",
        "nvmf_export_stop",
        "nvmf_get_exports",
        "framework_get_reactors",
        "save_config",
        "load_config",
        "rpc_get_methods",
    ] {
        assert!(declared.contains(&m), "{m} missing");
    }

    // bdevs
    assert_eq!(
        c.ok("bdev_malloc_create", json!({"name": "m0", "size": 4 << 20})),
        json!("m0")
    );
    assert_eq!(
        c.err("bdev_malloc_create", json!({"name": "m0", "size": 4 << 20}))
            .0,
        CONFLICT
    );
    let (code, msg) = c.err("bdev_malloc_create", json!({"name": "m1", "size": 1000}));
    assert_eq!(code, PARAMS, "{msg}");
    let (code, msg) = c.err(
        "bdev_malloc_create",
        json!({"name": "m1", "size": 1u64 << 50}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("available memory"), "{msg}");
    let file = dir.path().join("u0.img");
    assert_eq!(
        c.ok(
            "bdev_uring_create",
            json!({"name": "u0", "filename": file, "size": 4 << 20})
        ),
        json!("u0")
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 4 << 20);
    let list = c.ok("bdev_get_bdevs", json!({}));
    assert_eq!(list.as_array().unwrap().len(), 2);
    let u0 = c.ok("bdev_get_bdevs", json!({"name": "u0"}));
    assert_eq!(u0[0]["driver"], "uring");
    assert_eq!(u0[0]["num_blocks"], 1024);
    assert_eq!(u0[0]["block_size"], 4096);
    assert_eq!(c.err("bdev_get_bdevs", json!({"name": "zz"})).0, NOT_FOUND);
    assert_eq!(c.err("bdev_delete", json!({"name": "zz"})).0, NOT_FOUND);
    let (code, msg) = c.err("bdev_nvme_attach_controller", json!({"name": "n"}));
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("pci_addr"), "{msg}");
    let (code, msg) = c.err(
        "bdev_nvme_attach_controller",
        json!({"name": "n", "pci_addr": "../../x"}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    // No such PCI function on this machine (guest tests attach real ones).
    let (code, msg) = c.err(
        "bdev_nvme_attach_controller",
        json!({"name": "n", "pci_addr": "0000:7f:1f.7"}),
    );
    assert_eq!(code, UNAVAILABLE, "{msg}");
    assert!(msg.contains("no PCI device"), "{msg}");
    // Nothing listens on a port just freed: the connection is refused, nothing is attached.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let (code, msg) = c.err(
        "bdev_nvme_attach_controller",
        json!({"name": "n", "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": closed,
               "subnqn": "nqn.x"}),
    );
    assert_eq!(code, IO_ERROR, "{msg}");
    assert!(msg.contains("refused"), "{msg}");
    let (code, msg) = c.err("bdev_nvme_detach_controller", json!({"name": "n"}));
    assert_eq!(code, NOT_FOUND, "{msg}");

    // pairs
    assert_eq!(
        c.ok(
            "pair_create",
            json!({"name": "pr", "primary": "m0", "secondary": "u0", "track_size": 65536})
        ),
        json!("pr")
    );
    assert_eq!(c.err("bdev_delete", json!({"name": "m0"})).0, CONFLICT);
    let claimed = c.ok("bdev_get_bdevs", json!({"name": "m0"}));
    assert_eq!(claimed[0]["claimed_by"], "pr");
    assert!(wait_for(Duration::from_secs(20), || pair_state(
        &mut c, "pr"
    )["state"]
        == "PAIR"));
    let info = pair_state(&mut c, "pr");
    for k in [
        "name",
        "state",
        "primary",
        "secondary",
        "track_size",
        "tracks",
        "pending_tracks",
        "changed_tracks",
        "split_at_ns",
        "error",
    ] {
        assert!(info.get(k).is_some(), "pair_get lacks {k}: {info}");
    }
    assert_eq!(info["tracks"], 64);
    let split = c.ok("pair_split", json!({"name": "pr"}));
    assert!(split["split_at_ns"].as_u64().unwrap() > 0);
    assert!(split["pending_tracks"].is_u64());
    assert_eq!(pair_state(&mut c, "pr")["state"], "PSUS");
    let (code, msg) = c.err("pair_split", json!({"names": ["pr"]}));
    assert_eq!(code, WRONG_STATE, "{msg}");
    assert_eq!(c.err("pair_split", json!({})).0, PARAMS);
    assert_eq!(c.err("pair_split", json!({"names": ["nope"]})).0, NOT_FOUND);
    let (code, msg) = c.err("pair_resync", json!({"name": "pr", "direction": "up"}));
    assert_eq!(code, PARAMS);
    assert!(msg.contains("direction"), "{msg}");
    assert_eq!(c.ok("pair_resync", json!({"name": "pr"})), json!(true));
    assert!(wait_for(Duration::from_secs(20), || pair_state(
        &mut c, "pr"
    )["state"]
        == "PAIR"));
    c.ok("pair_split", json!({"names": ["pr"]}));
    assert_eq!(
        c.ok("pair_resync", json!({"name": "pr", "direction": "reverse"})),
        json!(true)
    );
    assert!(wait_for(Duration::from_secs(20), || pair_state(
        &mut c, "pr"
    )["state"]
        == "PAIR"));
    assert_eq!(c.err("pair_get", json!({"name": "zz"})).0, NOT_FOUND);
    assert_eq!(c.err("pair_delete", json!({"name": "zz"})).0, NOT_FOUND);
    assert_eq!(
        c.err(
            "pair_create",
            json!({"name": "pr", "primary": "m0", "secondary": "u0"})
        )
        .0,
        PARAMS
    );
    assert_eq!(c.ok("pair_delete", json!({"name": "pr"})), json!(true));
    assert_eq!(c.ok("bdev_delete", json!({"name": "m0"})), json!(true));

    // Wrong types and unknown parameters name the parameter.
    let (code, msg) = c.err(
        "pair_create",
        json!({"name": "x", "primary": "u0", "secondary": "u0", "track_size": "big"}),
    );
    assert_eq!(code, PARAMS);
    assert!(msg.contains("track_size"), "{msg}");
    let (code, msg) = c.err("pair_get", json!({"nmae": "x"}));
    assert_eq!(code, PARAMS);
    assert!(msg.contains("nmae"), "{msg}");
    let (code, msg) = c.err("bdev_malloc_create", json!({"name": 5, "size": 4096}));
    assert_eq!(code, PARAMS);
    assert!(msg.contains("name"), "{msg}");

    // NVMe/TCP exports: parameters checked, an unknown NQN not found.
    for m in ["nvmf_export_start", "nvmf_export_stop"] {
        let (code, msg) = c.err(m, json!({}));
        assert_eq!(code, PARAMS, "{m}: {msg}");
        assert!(msg.contains("nqn"), "{msg}");
    }
    assert_eq!(c.ok("nvmf_get_exports", json!({})), json!([]));
    let (code, msg) = c.err("nvmf_export_stop", json!({"nqn": "nqn.x"}));
    assert_eq!(code, NOT_FOUND, "{msg}");
    let (code, msg) = c.err("nvmf_export_start", json!({"nqn": "bad", "bdev": "m0"}));
    assert_eq!(code, PARAMS, "{msg}");

    // Backups and NBD exports: errors of each kind.
    assert_eq!(c.ok("backup_get", json!({})), json!([]));
    assert_eq!(c.err("backup_get", json!({"id": 99})).0, NOT_FOUND);
    assert_eq!(c.err("backup_cancel", json!({"id": 99})).0, NOT_FOUND);
    assert_eq!(c.err("backup_cancel", json!({})).0, PARAMS);
    c.ok("bdev_malloc_create", json!({"name": "bp", "size": 1 << 20}));
    c.ok("bdev_malloc_create", json!({"name": "bs", "size": 1 << 20}));
    c.ok(
        "pair_create",
        json!({"name": "bk", "primary": "bp", "secondary": "bs"}),
    );
    let file = dir.path().join("b.img");
    let (code, msg) = c.err(
        "backup_start",
        json!({"pair": "bk", "target": {"type": "file", "path": file}}),
    );
    assert_eq!(code, WRONG_STATE, "{msg}");
    let (code, msg) = c.err(
        "backup_start",
        json!({"pair": "bk", "target": {"type": "floppy", "path": file}}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("target"), "{msg}");
    assert_eq!(
        c.err(
            "backup_start",
            json!({"pair": "bk", "mode": "eager", "target": {"type": "file", "path": file}})
        )
        .0,
        PARAMS
    );
    assert!(wait_for(Duration::from_secs(20), || pair_state(
        &mut c, "bk"
    )["state"]
        == "PAIR"));
    c.ok("pair_split", json!({"name": "bk"}));
    let id = c.ok(
        "backup_start",
        json!({"pair": "bk", "mode": "wait", "target": {"type": "file", "path": file}}),
    )["id"]
        .as_u64()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || c
        .ok("backup_get", json!({"id": id}))[0]["state"]
        == "done"));
    let b = c.ok("backup_get", json!({"id": id}))[0].clone();
    for k in [
        "id",
        "pair",
        "mode",
        "state",
        "bytes_done",
        "bytes_total",
        "digest",
        "flat_sha256",
        "sha256",
        "error",
    ] {
        assert!(b.get(k).is_some(), "backup_get lacks {k}: {b}");
    }
    assert_eq!(b["bytes_done"], 1 << 20);
    assert!(
        b["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256-tree:")),
        "{b}"
    );
    assert_eq!(
        b["sha256"],
        Value::Null,
        "no flat SHA-256 was asked for: {b}"
    );
    assert_eq!(c.err("backup_cancel", json!({"id": id})).0, CONFLICT);
    // Checkpoints: one made by a backup, listed, refused twice, deleted.
    assert_eq!(c.ok("checkpoint_list", json!({})), json!([]));
    let id = c.ok(
        "backup_start",
        json!({"pair": "bk", "target": {"type": "file", "path": file}, "checkpoint": "night1"}),
    )["id"]
        .as_u64()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || c
        .ok("backup_get", json!({"id": id}))[0]["state"]
        == "done"));
    assert_eq!(
        c.ok("backup_get", json!({"id": id}))[0]["checkpoint"],
        "night1"
    );
    let list = c.ok("checkpoint_list", json!({"pair": "bk"}));
    assert_eq!(list[0]["name"], "night1", "{list}");
    assert_eq!(list[0]["backup_id"], id, "{list}");
    assert_eq!(list[0]["changed_tracks"], 0, "{list}");
    let (code, msg) = c.err(
        "backup_start",
        json!({"pair": "bk", "target": {"type": "file", "path": file}, "checkpoint": "night1"}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("already has a checkpoint"), "{msg}");
    let (code, msg) = c.err("checkpoint_delete", json!({"pair": "bk", "name": "nope"}));
    assert_eq!(code, PARAMS, "{msg}");
    assert_eq!(
        c.err("checkpoint_delete", json!({"pair": "nope", "name": "x"}))
            .0,
        NOT_FOUND
    );
    assert_eq!(c.err("checkpoint_list", json!({"pair": 5})).0, PARAMS);
    c.ok("checkpoint_delete", json!({"pair": "bk", "name": "night1"}));
    assert_eq!(c.ok("checkpoint_list", json!({"pair": "bk"})), json!([]));
    let (code, msg) = c.err(
        "backup_start",
        json!({"pair": "bk", "target": {"type": "nvmf", "traddr": "127.0.0.1",
                                        "trsvcid": closed, "subnqn": "x"}}),
    );
    assert_eq!(code, IO_ERROR, "{msg}");
    assert_eq!(c.ok("nbd_get_exports", json!({})), json!([]));
    let nbd = dir.path().join("n.sock");
    c.ok(
        "nbd_export_start",
        json!({"name": "e", "pair": "bk", "socket": nbd}),
    );
    assert_eq!(
        c.err(
            "nbd_export_start",
            json!({"name": "e", "bdev": "u0", "socket": nbd})
        )
        .0,
        CONFLICT
    );
    assert_eq!(
        c.err(
            "nbd_export_start",
            json!({"name": "e2", "bdev": "bs", "socket": nbd})
        )
        .0,
        CONFLICT,
        "the secondary of a pair cannot be exported as a bdev"
    );
    assert_eq!(
        c.err("nbd_export_start", json!({"name": "e3", "bdev": "nope"}))
            .0,
        NOT_FOUND
    );
    assert_eq!(
        c.err(
            "nbd_export_start",
            json!({"name": "e4", "bdev": "u0", "pair": "bk"})
        )
        .0,
        PARAMS
    );
    let exports = c.ok("nbd_get_exports", json!({}));
    assert_eq!(exports[0]["name"], "e");
    assert_eq!(exports[0]["pair"], "bk");
    assert_eq!(exports[0]["writable"], false);
    assert_eq!(c.err("pair_delete", json!({"name": "bk"})).0, CONFLICT);
    assert_eq!(c.ok("nbd_export_stop", json!({"name": "e"})), json!(true));
    assert_eq!(c.err("nbd_export_stop", json!({"name": "e"})).0, NOT_FOUND);
    assert_eq!(c.ok("pair_delete", json!({"name": "bk"})), json!(true));
    // A bdev exported as itself cannot join a pair: its export's writes would bypass the pair.
    c.ok(
        "nbd_export_start",
        json!({"name": "raw", "bdev": "bp", "socket": nbd}),
    );
    let (code, msg) = c.err(
        "pair_create",
        json!({"name": "bk", "primary": "bp", "secondary": "bs"}),
    );
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(msg.contains("NBD export 'raw'"), "{msg}");
    c.ok("nbd_export_stop", json!({"name": "raw"}));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.ok(
        "nvmf_export_start",
        json!({"nqn": "nqn.2026-11.io.quicksplit:raw", "bdev": "bs",
               "listen": format!("127.0.0.1:{port}")}),
    );
    let (code, msg) = c.err(
        "pair_create",
        json!({"name": "bk", "primary": "bp", "secondary": "bs"}),
    );
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(msg.contains("NVMe/TCP export"), "{msg}");
    c.ok(
        "nvmf_export_stop",
        json!({"nqn": "nqn.2026-11.io.quicksplit:raw"}),
    );
    c.ok(
        "pair_create",
        json!({"name": "bk", "primary": "bp", "secondary": "bs"}),
    );
    assert_eq!(c.ok("pair_delete", json!({"name": "bk"})), json!(true));

    let reactors = c.ok("framework_get_reactors", json!({}));
    let reactors = reactors.as_array().unwrap();
    assert_eq!(reactors.len(), 2);
    assert_eq!(reactors[0]["core"], 0);
    assert!(reactors[0]["pollers"]
        .as_array()
        .unwrap()
        .contains(&json!("pair_control")));
    assert!(reactors[1]["idle_ns"].as_u64().unwrap() > 0);

    assert_eq!(c.err("no_such_method", json!({})).0, NO_METHOD);
    let r = c.call("rpc_get_methods", json!([1, 2]));
    assert_eq!(r["error"]["code"], PARAMS);

    // load_config applies a configuration; a bad entry says which.
    let cfg = json!({"config": [{"method": "bdev_malloc_create", "params": {"name": "m9", "size": 1 << 20}}]});
    assert_eq!(c.ok("load_config", cfg), json!(true));
    // A method without an inverse cannot be in a configuration: refused before anything runs.
    let (code, msg) = c.err(
        "load_config",
        json!({"config": [
            {"method": "bdev_malloc_create", "params": {"name": "m11", "size": 1 << 20}},
            {"method": "bdev_delete", "params": {"name": "m9"}}]}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(
        msg.contains("entry 1") && msg.contains("bdev_delete"),
        "{msg}"
    );
    let names = |c: &mut RpcConn| -> Vec<String> {
        c.ok("bdev_get_bdevs", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(names(&mut c).contains(&"m9".to_string()));
    assert!(!names(&mut c).contains(&"m11".to_string()));
    // All or nothing: a failing entry takes back every entry before it (a new file, a pair, an
    // export), and the state directory's configuration does not name them.
    let vol = |n: &str| dir.path().join(format!("{n}.img"));
    std::fs::write(vol("old"), vec![7u8; 1 << 20]).unwrap();
    let before = names(&mut c);
    let pairs_before = c.ok("pair_get", json!({}));
    let exports_before = c.ok("nbd_get_exports", json!({}));
    let (code, msg) = c.err(
        "load_config",
        json!({"config": [
            {"method": "bdev_malloc_create", "params": {"name": "m10", "size": 1 << 20}},
            {"method": "bdev_uring_create", "params": {"name": "u1", "filename": vol("new"), "size": 1 << 20}},
            {"method": "bdev_uring_create", "params": {"name": "u2", "filename": vol("new2"), "size": 1 << 20}},
            {"method": "bdev_uring_create", "params": {"name": "u3", "filename": vol("old"), "size": 2 << 20}},
            {"method": "pair_create", "params": {"name": "lp", "primary": "u1", "secondary": "u2"}},
            {"method": "nbd_export_start", "params": {"name": "lp-img", "pair": "lp"}},
            {"method": "bdev_delete_typo", "params": {"name": "none"}}]}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("entry 6"), "{msg}");
    let (code, msg) = c.err(
        "load_config",
        json!({"config": [
            {"method": "bdev_malloc_create", "params": {"name": "m10", "size": 1 << 20}},
            {"method": "bdev_uring_create", "params": {"name": "u1", "filename": vol("new"), "size": 1 << 20}},
            {"method": "bdev_uring_create", "params": {"name": "u2", "filename": vol("new2"), "size": 1 << 20}},
            {"method": "bdev_uring_create", "params": {"name": "u3", "filename": vol("old"), "size": 2 << 20}},
            {"method": "pair_create", "params": {"name": "lp", "primary": "u1", "secondary": "u2"}},
            {"method": "nbd_export_start", "params": {"name": "lp-img", "pair": "lp"}},
            {"method": "bdev_malloc_create", "params": {"name": "m10", "size": 1 << 20}}]}),
    );
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(
        msg.contains("entry 6") && msg.contains("nothing of the configuration was applied"),
        "{msg}"
    );
    assert_eq!(names(&mut c), before);
    assert_eq!(c.ok("pair_get", json!({})), pairs_before);
    assert_eq!(c.ok("nbd_get_exports", json!({})), exports_before);
    assert!(
        !vol("new").exists() && !vol("new2").exists(),
        "the files the configuration created are removed"
    );
    let old = std::fs::read(vol("old")).unwrap();
    assert!(
        old.len() == 1 << 20 && old.iter().all(|&b| b == 7),
        "the file it extended has its length and bytes back"
    );
    assert!(!dir.path().join("state/pairs/lp.meta").exists());
    let saved = std::fs::read_to_string(dir.path().join("state").join("config.json")).unwrap();
    assert!(
        !saved.contains("\"m10\"") && !saved.contains("\"lp\""),
        "{saved}"
    );
    // The same configuration without the bad entry applies whole.
    assert_eq!(
        c.ok(
            "load_config",
            json!({"config": [
                {"method": "bdev_uring_create", "params": {"name": "u1", "filename": vol("new"), "size": 1 << 20}},
                {"method": "bdev_uring_create", "params": {"name": "u2", "filename": vol("new2"), "size": 1 << 20}},
                {"method": "pair_create", "params": {"name": "lp", "primary": "u1", "secondary": "u2"}}]}),
        ),
        json!(true)
    );
    assert_eq!(c.ok("pair_get", json!({"name": "lp"}))[0]["name"], "lp");
}

#[test]
fn protocol_errors_notifications_batches_and_framing() {
    let dir = TempDir::new("rpc-proto");
    let (_server, sock) = start_empty(dir.path());

    // Back to back without separators, then newline-separated: replies in order.
    let mut c = RpcConn::connect(&sock);
    let a = json!({"jsonrpc": "2.0", "id": "a", "method": "rpc_get_methods"});
    let b = json!({"jsonrpc": "2.0", "id": 7, "method": "bdev_get_bdevs"});
    c.send(format!("{a}{b}\n{a}").as_bytes()).unwrap();
    assert_eq!(c.reply().unwrap()["id"], "a");
    assert_eq!(c.reply().unwrap()["id"], 7);
    assert_eq!(c.reply().unwrap()["id"], "a");

    // A notification gets no reply: the next reply is for the next request.
    let note = json!({"jsonrpc": "2.0", "method": "bdev_get_bdevs"});
    c.send(format!("{note}\n{b}\n").as_bytes()).unwrap();
    assert_eq!(c.reply().unwrap()["id"], 7);

    // A batch gets an array of replies.
    c.send(format!("[{a}, {b}]\n").as_bytes()).unwrap();
    let r = c.reply().unwrap();
    assert_eq!(r.as_array().unwrap().len(), 2);

    // Invalid requests: -32600 with the id when it could be read; the connection stays open.
    for bad in [
        json!({"id": 1, "method": "rpc_get_methods"}),
        json!({"jsonrpc": "1.0", "id": 1, "method": "rpc_get_methods"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": 5}),
        json!({"jsonrpc": "2.0", "id": {"x": 1}, "method": "rpc_get_methods"}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "rpc_get_methods", "extra": 1}),
        json!([]),
        json!(42),
    ] {
        c.send(format!("{bad}\n").as_bytes()).unwrap();
        let r = c.reply().unwrap();
        assert_eq!(r["error"]["code"], INVALID_REQUEST, "{bad} -> {r}");
    }
    assert_eq!(
        c.ok("rpc_get_methods", json!({})).as_array().unwrap().len(),
        engine::rpc::methods::METHODS.len()
    );

    // Not JSON: -32700, then the connection is closed.
    c.send(b"{\"jsonrpc\": 2.0, oops}\n").unwrap();
    let r = c.reply().unwrap();
    assert_eq!(r["error"]["code"], PARSE);
    assert!(c.reply().is_none());

    // Over 1 MiB: -32600, closed.
    let mut c = RpcConn::connect(&sock);
    let big = format!(
        "{{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"pair_get\", \"params\": {{\"name\": \"{}\"}}}}",
        "x".repeat(2 << 20)
    );
    let _ = c.send(big.as_bytes());
    let r = c.reply().expect("an error reply before closing");
    assert_eq!(r["error"]["code"], INVALID_REQUEST);
    assert!(r["error"]["message"].as_str().unwrap().contains("larger"));
}

#[test]
fn a_silent_or_half_open_client_does_not_stall_others() {
    let dir = TempDir::new("rpc-slow");
    let (_server, sock) = start_empty(dir.path());
    // Silent: half a request, then nothing.
    let mut silent = RpcConn::connect(&sock);
    silent
        .send(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"meth")
        .unwrap();
    // Half-open: many requests, never reading a reply.
    let mut deaf = RpcConn::connect(&sock);
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": "rpc_get_methods"}).to_string();
    std::thread::spawn(move || {
        for _ in 0..100_000 {
            if deaf.send(req.as_bytes()).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut other = RpcConn::connect(&sock);
    for _ in 0..20 {
        other.ok("bdev_get_bdevs", json!({}));
    }
    drop(silent);
}

#[test]
fn cli_commands_and_exit_codes() {
    let dir = TempDir::new("rpc-cli");
    let (_server, sock) = start_empty(dir.path());
    let _ = RpcConn::connect(&sock);
    let q = |args: &[&str]| {
        Command::new(binary("quicksplit"))
            .args(args)
            .output()
            .expect("run quicksplit")
    };
    let s = sock.to_str().unwrap();
    let out = q(&[
        "rpc",
        "--socket",
        s,
        "bdev_malloc_create",
        r#"{"name": "a", "size": 1048576}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"a\"");
    q(&[
        "rpc",
        "--socket",
        s,
        "bdev_malloc_create",
        r#"{"name": "b", "size": 1048576}"#,
    ]);
    let out = q(&[
        "rpc",
        "--socket",
        s,
        "pair_create",
        r#"{"name": "ab", "primary": "a", "secondary": "b"}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = q(&["split", "--socket", s, "ab"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("split ab"));
    let out = q(&["status", "--socket", s]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ab") && text.contains("PSUS"), "{text}");
    // An error reply: 1, with the message.
    let out = q(&["split", "--socket", s, "ab"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PSUS"));
    // Usage: 2.
    assert_eq!(
        q(&["rpc", "--socket", s, "pair_get", "{oops"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(q(&["frobnicate"]).status.code(), Some(2));
    // A reader that has gone (`| grep -q`): a quiet exit, no panic on stderr.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(binary("quicksplit"))
        .args(["rpc", "--socket", s, "bdev_get_bdevs"])
        .stdout(writer)
        .output()
        .expect("run quicksplit");
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    // Cannot connect: 3.
    let nowhere = dir.path().join("nowhere.sock");
    assert_eq!(
        q(&["status", "--socket", nowhere.to_str().unwrap()])
            .status
            .code(),
        Some(3)
    );
}

#[test]
fn save_config_then_restart_with_it_gives_the_same_bdevs_and_pairs() {
    let dir = TempDir::new("rpc-config");
    let (server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    let f = dir.path().join("v.img");
    c.ok(
        "bdev_malloc_create",
        json!({"name": "m", "size": 8 << 20, "block_size": 512}),
    );
    c.ok(
        "bdev_uring_create",
        json!({"name": "u", "filename": f, "size": 8 << 20, "block_size": 512}),
    );
    c.ok(
        "pair_create",
        json!({"name": "mu", "primary": "m", "secondary": "u", "track_size": 131072, "copy_rate": 1048576}),
    );
    let nbd = dir.path().join("cfg-nbd.sock");
    c.ok(
        "nbd_export_start",
        json!({"name": "img", "pair": "mu", "socket": nbd}),
    );
    c.ok(
        "nbd_export_start",
        json!({"name": "prim", "bdev": "m", "socket": nbd, "writable": true}),
    );
    let config = c.ok("save_config", json!({}));
    let exports = c.ok("nbd_get_exports", json!({}));
    let bdevs = c.ok("bdev_get_bdevs", json!({}));
    let pair = c.ok("pair_get", json!({}))[0].clone();
    drop(c);
    drop(server);

    let cfg_file = dir.path().join("saved.json");
    std::fs::write(&cfg_file, config.to_string()).unwrap();
    let sock2 = dir.path().join("rpc2.sock");
    let state2 = dir.path().join("state2");
    let _server2 = start_on(&state2, &sock2, Some(&cfg_file));
    let mut c2 = RpcConn::connect(&sock2);
    assert_eq!(c2.ok("bdev_get_bdevs", json!({})), bdevs);
    let pair2 = c2.ok("pair_get", json!({}))[0].clone();
    for k in [
        "name",
        "primary",
        "secondary",
        "track_size",
        "tracks",
        "copy_rate",
    ] {
        assert_eq!(pair2[k], pair[k], "{k}");
    }
    assert_eq!(c2.ok("save_config", json!({})), config);
    assert_eq!(c2.ok("nbd_get_exports", json!({})), exports);
    assert!(nbd.exists(), "the restored exports listen again");

    // A broken config file is a usage error, and the server does not start.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    let mut s3 = Server::start(&[
        "--config",
        bad.to_str().unwrap(),
        "--state-dir",
        state2.to_str().unwrap(),
    ]);
    assert_eq!(
        s3.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(2)
    );
}

/// The engine's own files (a bdev's file, a pair's metadata, the configuration) are never
/// opened as a second bdev, replaced by a socket, or overwritten by a backup; pair names
/// cannot reach outside the state directory.
#[test]
fn the_engines_own_files_are_not_reused_or_overwritten() {
    let dir = TempDir::new("rpc-own-files");
    let (_server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    let state = dir.path().join("state");
    let img = dir.path().join("u.img");
    c.ok(
        "bdev_uring_create",
        json!({"name": "u", "filename": img, "size": 1 << 20}),
    );
    // The same file again, by its name or another one.
    let link = dir.path().join("link.img");
    std::fs::hard_link(&img, &link).unwrap();
    for f in [&img, &link] {
        let (code, msg) = c.err(
            "bdev_uring_create",
            json!({"name": "u2", "filename": f, "size": 2 << 20}),
        );
        assert_eq!(code, CONFLICT, "{msg}");
        assert!(msg.contains("bdev 'u'"), "{msg}");
    }
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        1 << 20,
        "not extended"
    );
    // An NBD socket path on a file: refused, and the file stays.
    let (code, msg) = c.err(
        "nbd_export_start",
        json!({"name": "e", "bdev": "u", "socket": img}),
    );
    assert_eq!(code, IO_ERROR, "{msg}");
    assert!(msg.contains("not a socket"), "{msg}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    // Backups over a bdev's file, a pair's metadata or the configuration are refused.
    c.ok("bdev_malloc_create", json!({"name": "bp", "size": 1 << 20}));
    c.ok("bdev_malloc_create", json!({"name": "bs", "size": 1 << 20}));
    c.ok(
        "pair_create",
        json!({"name": "pk", "primary": "bp", "secondary": "bs"}),
    );
    let meta = state.join("pairs").join("pk.meta");
    let meta_len = std::fs::metadata(&meta).unwrap().len();
    for target in [
        json!({"type": "file", "path": img}),
        json!({"type": "tape", "path": link}),
        json!({"type": "tape", "path": meta}),
        json!({"type": "file", "path": state.join("config.json")}),
    ] {
        let (code, msg) = c.err("backup_start", json!({"pair": "pk", "target": target}));
        assert_eq!(code, CONFLICT, "{target}: {msg}");
    }
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    assert_eq!(std::fs::metadata(&meta).unwrap().len(), meta_len);
    let (code, msg) = c.err("bdev_uring_create", json!({"name": "m2", "filename": meta}));
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(msg.contains("metadata of pair 'pk'"), "{msg}");
    let journal = state.join("splits.journal");
    let (code, msg) = c.err(
        "bdev_uring_create",
        json!({"name": "j", "filename": journal}),
    );
    assert_eq!(code, CONFLICT, "{msg}");
    assert!(msg.contains("state directory"), "{msg}");
    // Pair names are file names in the state directory.
    for name in ["../x", ".hidden", "a/b", ""] {
        let (code, msg) = c.err(
            "pair_create",
            json!({"name": name, "primary": "bp", "secondary": "bs"}),
        );
        assert_eq!(code, PARAMS, "{name}: {msg}");
    }
    // Files of deleted bdevs and pairs can be opened again.
    c.ok("pair_delete", json!({"name": "pk"}));
    c.ok("bdev_delete", json!({"name": "u"}));
    c.ok("bdev_uring_create", json!({"name": "u2", "filename": link}));
    std::fs::write(&meta, b"").unwrap();
    c.ok(
        "bdev_uring_create",
        json!({"name": "m3", "filename": meta, "size": 1 << 20}),
    );
}

/// Two running backups never write one target: their bytes would interleave under one SHA-256.
#[test]
fn two_running_backups_cannot_write_one_target() {
    let dir = TempDir::new("rpc-one-target");
    let (_server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    for n in ["a", "b"] {
        let (p, s) = (format!("{n}p"), format!("{n}s"));
        c.ok("bdev_malloc_create", json!({"name": p, "size": 4 << 20}));
        c.ok("bdev_malloc_create", json!({"name": s, "size": 4 << 20}));
        c.ok(
            "pair_create",
            json!({"name": n, "primary": p, "secondary": s}),
        );
        c.ok("pair_split", json!({"name": n}));
    }
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let target = dir.path().join("t.img");
    // Slow enough to be running throughout.
    let id = c.ok(
        "backup_start",
        json!({"pair": "a", "target": {"type": "file", "path": target}, "rate": 65536}),
    )["id"]
        .as_u64()
        .unwrap();
    let same_place = dir.path().join("sub").join("..").join("t.img");
    for t in [
        json!({"type": "file", "path": target}),
        json!({"type": "tape", "path": same_place}),
    ] {
        let (code, msg) = c.err("backup_start", json!({"pair": "b", "target": t}));
        assert_eq!(code, CONFLICT, "{t}: {msg}");
        assert!(msg.contains(&format!("backup {id}")), "{msg}");
    }
    c.ok("backup_cancel", json!({"id": id}));
    assert!(
        wait_for(Duration::from_secs(10), || {
            c.ok("backup_get", json!({"id": id}))[0]["state"] != "running"
        }),
        "the cancelled backup ends"
    );
    c.ok(
        "backup_start",
        json!({"pair": "b", "target": {"type": "file", "path": target}}),
    );
}

/// A RAM disk comes back from a restart empty: a pair on one is not taken back as a mirror.
#[test]
fn a_pair_on_a_ram_disk_is_not_trusted_after_a_restart() {
    let dir = TempDir::new("rpc-ram-restart");
    let (server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    c.ok(
        "bdev_uring_create",
        json!({"name": "p", "filename": dir.path().join("p.img"), "size": 4 << 20}),
    );
    c.ok("bdev_malloc_create", json!({"name": "s", "size": 4 << 20}));
    c.ok(
        "pair_create",
        json!({"name": "r", "primary": "p", "secondary": "s"}),
    );
    assert!(
        wait_for(Duration::from_secs(20), || pair_state(&mut c, "r")["state"]
            == "PAIR"),
        "the first copy ends"
    );
    drop(c);
    drop(server);
    // Restarted on the same state directory, without --config: its configuration comes back.
    let state = dir.path().join("state");
    let _server = start_on(&state, &sock, None);
    let mut c = RpcConn::connect(&sock);
    let p = pair_state(&mut c, "r");
    assert_eq!(p["state"], "PSUE", "{p}");
    assert!(
        p["error"].as_str().unwrap_or_default().contains("RAM disk"),
        "{p}"
    );
    assert_eq!(p["pending_tracks"], p["tracks"], "{p}");
}
