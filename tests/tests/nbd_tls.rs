//! NBD over TLS through the real binary and real clients, with certificates and keys made by
//! `openssl` here: an x509 export (client certificates required) read and written by
//! `nbdinfo`, `nbdcopy` and `qemu-img`; a PSK export (a keyring key) read and written by
//! `nbdcopy`; backups to `nbdkit --tls=require` with x509 and with PSK whose data equals the
//! image; a plain client, a certificate from another CA, a client that does not trust the
//! server and a wrong PSK each refused with a logged reason while a good client is served after
//! each; bad `tls` parameters refused by `nbd_export_start`; the option haggling before TLS as
//! the NBD protocol says; and a generated set of TLS garbage that ends only its own connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quicksplit_tests::logged::Logged;
use quicksplit_tests::{run_ok, wait_backup, wait_for, RpcConn, TempDir};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const PARAMS: i64 = -32602;
/// A backup target that cannot be reached or refuses.
const TARGET: i64 = -32005;
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

/// Fails the test when a tool it needs is not on the PATH (scripts/deps.sh installs them all):
/// a missing tool must not pass for a tested interoperation.
fn require(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} not installed (scripts/deps.sh installs them)",
        missing.join(", ")
    );
}

/// A child process killed when dropped (an nbdkit).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// A CA `name` in `dir`: `name-cert.pem`, `name-key.pem`.
fn make_ca(dir: &Path, name: &str) {
    let (cert, key) = (format!("{name}-cert.pem"), format!("{name}-key.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// A certificate `name` signed by CA `ca`, for `usage` (serverAuth, clientAuth) with `san`.
fn make_cert(dir: &Path, ca: &str, name: &str, usage: &str, san: Option<&str>) {
    let (csr, key, cert) = (
        format!("{name}.csr"),
        format!("{name}-key.pem"),
        format!("{name}-cert.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    let mut ext = format!("extendedKeyUsage={usage}\n");
    if let Some(san) = san {
        ext.push_str(&format!("subjectAltName={san}\n"));
    }
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext).expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &ext_file,
        ],
    );
}

/// The certificates of a test: a CA, a server certificate for 127.0.0.1 and localhost, a
/// client certificate; another CA with its own client and server certificates. Directories in
/// the layouts libnbd and qemu (`client`: ca-cert.pem, client-cert.pem, client-key.pem) and
/// nbdkit (`server`: ca-cert.pem, server-cert.pem, server-key.pem) read.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make(dir: &Path) -> Self {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).expect("pki dir");
        make_ca(&dir, "ca");
        make_ca(&dir, "rogue");
        let san = Some("IP:127.0.0.1,DNS:localhost");
        make_cert(&dir, "ca", "server", "serverAuth", san);
        make_cert(&dir, "ca", "client", "clientAuth", None);
        make_cert(&dir, "rogue", "rogue-client", "clientAuth", None);
        let pki = Pki { dir };
        // libnbd and qemu: trusts our CA, shows our client certificate.
        pki.layout("client", "ca", "client", "client");
        // A client whose certificate another CA signed.
        pki.layout("foreign-client", "ca", "rogue-client", "client");
        // A client that trusts another CA only.
        pki.layout("distrustful-client", "rogue", "client", "client");
        // nbdkit.
        pki.layout("server", "ca", "server", "server");
        pki
    }

    /// A directory `name` holding ca-cert.pem (CA `ca`) and `role`-cert/key.pem (of `cert`).
    fn layout(&self, name: &str, ca: &str, cert: &str, role: &str) {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).expect("layout dir");
        let copy = |from: String, to: String| {
            std::fs::copy(self.dir.join(from), d.join(to)).expect("copy pem");
        };
        copy(format!("{ca}-cert.pem"), "ca-cert.pem".into());
        copy(format!("{cert}-cert.pem"), format!("{role}-cert.pem"));
        copy(format!("{cert}-key.pem"), format!("{role}-key.pem"));
        let key = d.join(format!("{role}-key.pem"));
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn client_dir(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `tls` of an x509 export, client certificates required.
    fn export_tls(&self) -> Value {
        json!({"cert_file": self.file("server-cert.pem"), "key_file": self.file("server-key.pem"),
               "ca_file": self.file("ca-cert.pem")})
    }
}

/// A PSK file of `user` with a random 32-byte key, mode 0600; its hex key.
fn psk_file(path: &Path, user: &str, seed: u64) -> String {
    let mut key = [0u8; 32];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(path, format!("{user}:{hex}\n")).expect("write psk file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    hex
}

fn random_file(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, &data).expect("write data");
    data
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read file")
}

/// A command that must fail; its stderr.
fn run_fails(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn nbdinfo_size(uri: &str) -> u64 {
    let out = run_ok(Command::new("nbdinfo").args(["--size", uri]));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a size")
}

#[test]
fn an_x509_export_serves_real_clients_and_refuses_others_with_a_reason() {
    require(&["openssl", "nbdinfo", "nbdcopy", "qemu-img"]);
    let dir = TempDir::new("nbd-tls-x509");
    let pki = Pki::make(dir.path());
    let server = Logged::empty(dir.path(), "serve");
    let mut c = server.rpc();
    let size = 8 * MIB;
    c.ok("bdev_malloc_create", json!({"name": "m", "size": size}));
    let port = quicksplit_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    c.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "listen": listen, "tls": pki.export_tls()}),
    );
    let export = &c.ok("nbd_get_exports", json!({}))[0];
    assert_eq!(export["tls"], pki.export_tls(), "{export}");
    let saved = c.ok("save_config", json!({}));
    let start = saved["config"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["method"] == "nbd_export_start")
        .cloned()
        .unwrap();
    assert_eq!(start["params"]["tls"], pki.export_tls(), "{start}");

    let uri = format!(
        "nbds://127.0.0.1:{port}/m?tls-certificates={}",
        pki.client_dir("client")
    );
    assert_eq!(nbdinfo_size(&uri), size);
    // nbdcopy writes and reads back byte for byte.
    let data = random_file(&dir.path().join("data.img"), size, 1);
    run_ok(
        Command::new("nbdcopy")
            .arg(dir.path().join("data.img"))
            .arg(&uri),
    );
    let out = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(read(&out) == data, "nbdcopy read back other bytes");
    // qemu-img writes other bytes and reads them back; nbdcopy sees them too.
    let data2 = random_file(&dir.path().join("data2.img"), size, 2);
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.client_dir("client")
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=m,tls-creds=tls0");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "--object", &creds, "-f", "raw"])
            .arg(dir.path().join("data2.img"))
            .args(["--target-image-opts", &opts]),
    );
    let q = dir.path().join("q.img");
    run_ok(
        Command::new("qemu-img")
            .args([
                "convert",
                "--object",
                &creds,
                "-O",
                "raw",
                "--image-opts",
                &opts,
            ])
            .arg(&q),
    );
    assert!(read(&q) == data2, "qemu-img read back other bytes");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(read(&out) == data2, "nbdcopy did not see qemu-img's bytes");

    // Refusals, each logged with its reason; a good client is served after each.
    let plain = format!("nbd://127.0.0.1:{port}/m");
    run_fails(Command::new("nbdinfo").arg(&plain));
    assert!(
        server.wait_logged("TLS is required at this address and it did not start it", 1),
        "{}",
        server.text()
    );
    assert_eq!(nbdinfo_size(&uri), size);
    let foreign = format!(
        "nbds://127.0.0.1:{port}/m?tls-certificates={}",
        pki.client_dir("foreign-client")
    );
    run_fails(Command::new("nbdinfo").arg(&foreign));
    assert!(
        server.wait_logged("certificate verify failed", 1),
        "{}",
        server.text()
    );
    assert_eq!(nbdinfo_size(&uri), size);
    let distrustful = format!(
        "nbds://127.0.0.1:{port}/m?tls-certificates={}",
        pki.client_dir("distrustful-client")
    );
    let before = server.text().matches("TLS handshake failed").count();
    let err = run_fails(Command::new("nbdinfo").arg(&distrustful));
    assert!(err.contains("certificate"), "{err}");
    assert!(
        server.wait_logged("TLS handshake failed", before + 1),
        "{}",
        server.text()
    );
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(read(&out) == data2, "served other bytes after the refusals");
}

#[test]
fn bad_tls_parameters_are_refused_and_a_wide_listen_takes_tls() {
    require(&["openssl"]);
    let dir = TempDir::new("nbd-tls-params");
    let pki = Pki::make(dir.path());
    let server = Logged::empty(dir.path(), "serve");
    let mut c = server.rpc();
    c.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    let keys = dir.path().join("psk.keys");
    psk_file(&keys, "alice", 3);
    c.ok("keyring_file_add_key", json!({"name": "psk", "path": keys}));
    let bad_psk = dir.path().join("bad.keys");
    std::fs::write(&bad_psk, "alice:zz\n").unwrap();
    std::fs::set_permissions(&bad_psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.ok(
        "keyring_file_add_key",
        json!({"name": "bad", "path": bad_psk}),
    );
    let unreadable = dir.path().join("garbage.pem");
    std::fs::write(&unreadable, "not a certificate").unwrap();
    let listen = format!("127.0.0.1:{}", quicksplit_tests::free_port());
    let cert = pki.file("server-cert.pem");
    let key = pki.file("server-key.pem");
    for (tls, needle) in [
        (
            json!({"cert_file": dir.path().join("none.pem"), "key_file": key}),
            "cert_file",
        ),
        (
            json!({"cert_file": unreadable, "key_file": key}),
            "cert_file",
        ),
        (
            json!({"cert_file": cert, "key_file": pki.file("client-key.pem")}),
            "cannot be used with cert_file",
        ),
        (json!({"cert_file": cert}), "give cert_file and key_file"),
        (json!({"psk_key": "nosuch"}), "no key named 'nosuch'"),
        (json!({"psk_key": "bad"}), "line 1: not hex"),
        (
            json!({"psk_key": "psk", "cert_file": cert, "key_file": key}),
            "not both",
        ),
        (json!({"psk": "psk"}), "unknown field"),
    ] {
        let (code, msg) = c.err(
            "nbd_export_start",
            json!({"name": "t", "bdev": "m", "listen": listen, "tls": tls}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    let (code, msg) = c.err(
        "nbd_export_start",
        json!({"name": "t", "bdev": "m", "socket": dir.path().join("nbd.sock"),
               "tls": {"psk_key": "psk"}}),
    );
    assert_eq!(code, PARAMS, "{msg}");
    assert!(msg.contains("not Unix sockets"), "{msg}");
    // Every interface, with TLS: no need to say insecure.
    let wide = format!("0.0.0.0:{}", quicksplit_tests::free_port());
    c.ok(
        "nbd_export_start",
        json!({"name": "w", "bdev": "m", "listen": wide, "tls": {"psk_key": "psk"}}),
    );
    // Exports on one address share its TLS.
    for tls in [Value::Null, json!({"cert_file": cert, "key_file": key})] {
        let (code, msg) = c.err(
            "nbd_export_start",
            json!({"name": "w2", "bdev": "m", "writable": false, "listen": wide,
                   "tls": tls, "insecure": true}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(
            msg.contains("export 'w' at tcp:0.0.0.0:") && msg.contains("share its TLS"),
            "{msg}"
        );
    }
    c.ok(
        "nbd_export_start",
        json!({"name": "w2", "bdev": "m", "writable": false, "listen": wide,
               "tls": {"psk_key": "psk"}}),
    );
    assert_eq!(
        c.ok("nbd_get_exports", json!({})).as_array().unwrap().len(),
        2
    );
    // The key cannot go while an export uses it.
    let (_, msg) = c.err("keyring_file_remove_key", json!({"name": "psk"}));
    assert!(msg.contains("NBD export"), "{msg}");
}

#[test]
fn a_psk_export_serves_libnbd_and_refuses_a_wrong_key() {
    require(&["nbdinfo", "nbdcopy"]);
    let dir = TempDir::new("nbd-tls-psk");
    let server = Logged::empty(dir.path(), "serve");
    let mut c = server.rpc();
    let size = 8 * MIB;
    c.ok("bdev_malloc_create", json!({"name": "m", "size": size}));
    let keys = dir.path().join("psk.keys");
    let hex = psk_file(&keys, "alice", 4);
    let wrong = dir.path().join("wrong.keys");
    psk_file(&wrong, "alice", 5);
    let stranger = dir.path().join("stranger.keys");
    std::fs::write(&stranger, format!("mallory:{hex}\n")).unwrap();
    c.ok(
        "keyring_file_add_key",
        json!({"name": "nbd-psk", "path": keys}),
    );
    let port = quicksplit_tests::free_port();
    c.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "listen": format!("127.0.0.1:{port}"),
               "tls": {"psk_key": "nbd-psk"}}),
    );
    // libnbd 1.14 looks the login name up even with tls-username= in the query (and fails
    // without a terminal), so the username goes in the URI's user part.
    let psk_uri = |user: &str, file: &Path| {
        format!(
            "nbds://{user}@127.0.0.1:{port}/m?tls-psk-file={}",
            file.display()
        )
    };
    let uri = psk_uri("alice", &keys);
    let data = random_file(&dir.path().join("data.img"), size, 6);
    run_ok(
        Command::new("nbdcopy")
            .arg(dir.path().join("data.img"))
            .arg(&uri),
    );
    let out = dir.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(read(&out) == data, "nbdcopy read back other bytes");

    run_fails(Command::new("nbdinfo").arg(psk_uri("alice", &wrong)));
    assert!(
        server.wait_logged("binder does not verify", 1),
        "{}",
        server.text()
    );
    assert_eq!(nbdinfo_size(&uri), size);
    let before = server.text().matches("TLS handshake failed").count();
    run_fails(Command::new("nbdinfo").arg(psk_uri("mallory", &stranger)));
    assert!(
        server.wait_logged("TLS handshake failed", before + 1),
        "{}",
        server.text()
    );
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(read(&out) == data, "served other bytes after the refusals");
    // The key's name is everywhere it should be, the key nowhere.
    let listing = c.ok("nbd_get_exports", json!({}));
    assert_eq!(listing[0]["tls"], json!({"psk_key": "nbd-psk"}));
    let saved = c.ok("save_config", json!({})).to_string();
    assert!(
        saved.contains("nbd-psk") && !saved.contains(&hex),
        "{saved}"
    );
    assert!(!listing.to_string().contains(&hex));
    assert!(!server.text().contains(&hex), "the key is in the log");
    // The key file is read at each handshake: a key rotated in place is the one that works.
    let old = dir.path().join("old.keys");
    std::fs::copy(&keys, &old).unwrap();
    std::fs::copy(&wrong, &keys).unwrap();
    assert_eq!(nbdinfo_size(&psk_uri("alice", &wrong)), size);
    run_fails(Command::new("nbdinfo").arg(psk_uri("alice", &old)));
}

/// Pair "pr" of two RAM disks holding `data` (written through a plain export on a Unix
/// socket), split.
fn split_pair_with(c: &mut RpcConn, dir: &Path, data: &[u8]) {
    let size = data.len() as u64;
    c.ok("bdev_malloc_create", json!({"name": "p", "size": size}));
    c.ok("bdev_malloc_create", json!({"name": "s", "size": size}));
    c.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s"}),
    );
    let sock = dir.join("nbd.sock");
    c.ok(
        "nbd_export_start",
        json!({"name": "p", "bdev": "p", "socket": sock}),
    );
    let file = dir.join("image.img");
    std::fs::write(&file, data).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg(&file)
            .arg(quicksplit_tests::nbd_unix_uri(&sock, "p")),
    );
    c.ok("pair_split", json!({"name": "pr"}));
}

fn nbdkit(args: &[&str], port: u16, size: u64) -> Killed {
    let child = Command::new("nbdkit")
        .args([
            "-f",
            "--exit-with-parent",
            "--tls=require",
            "-i",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .args(args)
        .args(["memory", &size.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let k = Killed(child);
    assert!(
        wait_for(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "nbdkit does not listen"
    );
    k
}

#[test]
fn backups_reach_nbdkit_over_tls_with_certificates_and_with_a_psk() {
    require(&["openssl", "nbdkit", "nbdcopy"]);
    let dir = TempDir::new("nbd-tls-backup");
    let pki = Pki::make(dir.path());
    let server = Logged::empty(dir.path(), "serve");
    let mut c = server.rpc();
    let size = 16 * MIB;
    let mut data = vec![0u8; size as usize];
    // Data with holes between, so both writes and zeroes go over TLS.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for chunk in data.chunks_mut(MIB as usize).step_by(2) {
        rng.fill_bytes(chunk);
    }
    split_pair_with(&mut c, dir.path(), &data);

    // x509: nbdkit verifies our client certificate.
    let port = quicksplit_tests::free_port();
    let server_dir = pki.client_dir("server");
    let _x509 = nbdkit(
        &["--tls-certificates", &server_dir, "--tls-verify-peer"],
        port,
        size,
    );
    let target = json!({"type": "nbd", "uri": format!("nbds://127.0.0.1:{port}/"),
        "tls": {"ca_file": pki.file("ca-cert.pem"), "cert_file": pki.file("client-cert.pem"),
                "key_file": pki.file("client-key.pem")}});
    let id = c.ok("backup_start", json!({"pair": "pr", "target": target}))["id"]
        .as_u64()
        .unwrap();
    let b = wait_backup(&mut c, id, Duration::from_secs(60));
    assert_eq!(b["state"], "done", "{b}");
    let out = dir.path().join("x509.img");
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        pki.client_dir("client")
    );
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(
        read(&out) == data,
        "nbdkit holds other bytes than the image"
    );
    // Without the client certificate nbdkit refuses (with TLS 1.3, once the handshake is over
    // on the client's side): the backup is refused at once, naming the target.
    let target = json!({"type": "nbd", "uri": format!("nbds://127.0.0.1:{port}/"),
        "tls": {"ca_file": pki.file("ca-cert.pem")}});
    let r = c.call("backup_start", json!({"pair": "pr", "target": target}));
    let msg = r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(r["error"]["code"], TARGET, "{r}");
    assert!(msg.contains(&format!("nbds://127.0.0.1:{port}/")), "{r}");
    // Nor does a client that trusts another CA get to nbdkit.
    let target = json!({"type": "nbd", "uri": format!("nbds://127.0.0.1:{port}/"),
        "tls": {"ca_file": pki.file("rogue-cert.pem"), "cert_file": pki.file("client-cert.pem"),
                "key_file": pki.file("client-key.pem")}});
    let r = c.call("backup_start", json!({"pair": "pr", "target": target}));
    let msg = r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(r["error"]["code"], TARGET, "{r}");
    assert!(msg.contains("certificate verify failed"), "{r}");

    // PSK: the keyring's key, as user alice.
    let keys = dir.path().join("psk.keys");
    let hex = psk_file(&keys, "alice", 8);
    c.ok(
        "keyring_file_add_key",
        json!({"name": "backup-psk", "path": keys}),
    );
    let port = quicksplit_tests::free_port();
    let keys_arg = format!("--tls-psk={}", keys.display());
    let _psk = nbdkit(&[&keys_arg], port, size);
    let target = json!({"type": "nbd", "uri": format!("nbds://127.0.0.1:{port}/"),
        "tls": {"psk_key": "backup-psk", "username": "alice"}});
    let id = c.ok("backup_start", json!({"pair": "pr", "target": target}))["id"]
        .as_u64()
        .unwrap();
    let b = wait_backup(&mut c, id, Duration::from_secs(60));
    assert_eq!(b["state"], "done", "{b}");
    assert_eq!(
        b["target"]["tls"],
        json!({"psk_key": "backup-psk", "username": "alice"})
    );
    let out = dir.path().join("psk.img");
    let uri = format!(
        "nbds://alice@127.0.0.1:{port}/?tls-psk-file={}",
        keys.display()
    );
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(
        read(&out) == data,
        "nbdkit holds other bytes than the image"
    );
    assert!(!server.text().contains(&hex), "the key is in the log");
    // Settings that do not fit together are refused before anything connects.
    for (target, needle) in [
        (
            json!({"type": "nbd", "uri": format!("nbd://127.0.0.1:{port}/"),
                   "tls": {"psk_key": "backup-psk"}}),
            "needs an nbds:// URI",
        ),
        (
            json!({"type": "nbd", "uri": format!("nbds://127.0.0.1:{port}/"),
                   "tls": {"psk_key": "backup-psk", "ca_file": pki.file("ca-cert.pem")}}),
            "not both",
        ),
        (
            json!({"type": "nbd", "uri": format!("nbds://127.0.0.1:{port}/"),
                   "tls": {"psk_key": "backup-psk", "username": "bob"}}),
            "no key for PSK username 'bob'",
        ),
    ] {
        let r = c.call("backup_start", json!({"pair": "pr", "target": target}));
        let msg = r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains(needle), "{needle}: {r}");
    }
}

/// The greeting read and the client's flags sent, on a fresh connection.
fn greeted(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
    assert_eq!(
        u64::from_be_bytes(hello[8..16].try_into().unwrap()),
        IHAVEOPT
    );
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    s.write_all(&o).unwrap();
}

/// One option reply: the option it answers and its type.
fn reply(s: &mut TcpStream) -> (u32, u32) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    std::io::copy(&mut s.take(len as u64), &mut std::io::sink()).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
    )
}

/// True once the server has closed `s` (within the handshake deadline).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// A real ClientHello, as `openssl s_client` sends it after STARTTLS (captured by a listener
/// that reads it and closes).
fn client_hello() -> Vec<u8> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut client = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 22, "a handshake record");
    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
    let mut hello = head.to_vec();
    hello.resize(5 + len, 0);
    s.read_exact(&mut hello[5..]).unwrap();
    drop(s);
    let _ = client.kill();
    let _ = client.wait();
    hello
}

#[test]
fn the_haggling_before_tls_follows_the_protocol_and_tls_garbage_ends_only_its_connection() {
    require(&["openssl", "nbdinfo"]);
    let dir = TempDir::new("nbd-tls-fuzz");
    let pki = Pki::make(dir.path());
    let server = Logged::empty(dir.path(), "serve");
    let mut c = server.rpc();
    c.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    let port = quicksplit_tests::free_port();
    c.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "listen": format!("127.0.0.1:{port}"),
               "tls": pki.export_tls()}),
    );
    let good = format!(
        "nbds://127.0.0.1:{port}/m?tls-certificates={}",
        pki.client_dir("client")
    );
    // Before TLS: options are answered NBD_REP_ERR_TLS_REQD, STARTTLS with data is invalid,
    // and NBD_OPT_EXPORT_NAME is a hard disconnect.
    let mut s = greeted(port);
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"m");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, OPT_GO, &go);
    assert_eq!(reply(&mut s), (OPT_GO, REP_ERR_TLS_REQD));
    send_option(&mut s, OPT_LIST, &[]);
    assert_eq!(reply(&mut s), (OPT_LIST, REP_ERR_TLS_REQD));
    send_option(&mut s, OPT_STARTTLS, b"x");
    assert_eq!(reply(&mut s), (OPT_STARTTLS, REP_ERR_INVALID));
    send_option(&mut s, OPT_EXPORT_NAME, b"m");
    assert!(closed_by_server(&mut s), "EXPORT_NAME before TLS left open");
    assert!(
        server.wait_logged("NBD_OPT_EXPORT_NAME before TLS", 1),
        "{}",
        server.text()
    );

    let hello = client_hello();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut cases: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for i in 0..6 {
        let mut junk = vec![0u8; rng.gen_range(1..20_000)];
        rng.fill_bytes(&mut junk);
        cases.push((format!("random bytes {i}"), junk, false));
    }
    for cut in [1, 5, hello.len() / 2, hello.len() - 1] {
        cases.push((
            format!("ClientHello cut at {cut}"),
            hello[..cut].to_vec(),
            false,
        ));
    }
    for i in 0..4 {
        let mut bytes = hello.clone();
        let mut junk = vec![0u8; rng.gen_range(1..3000)];
        rng.fill_bytes(&mut junk);
        if i % 2 == 0 {
            // As an application data record.
            bytes.extend_from_slice(&[23, 3, 3]);
            bytes.extend_from_slice(&(junk.len() as u16).to_be_bytes());
        }
        bytes.extend_from_slice(&junk);
        cases.push((format!("ClientHello then garbage {i}"), bytes, false));
    }
    cases.push(("ClientHello then close".into(), hello.clone(), true));
    for (what, bytes, close_early) in cases {
        let mut s = greeted(port);
        send_option(&mut s, OPT_STARTTLS, &[]);
        assert_eq!(reply(&mut s), (OPT_STARTTLS, REP_ACK), "{what}");
        let _ = s.write_all(&bytes);
        if close_early {
            // Mid handshake: the ServerHello is on its way, the client goes.
            let mut some = [0u8; 5];
            let _ = s.read(&mut some);
            drop(s);
        } else {
            let _ = s.shutdown(std::net::Shutdown::Write);
            assert!(closed_by_server(&mut s), "{what}: left open");
        }
        assert_eq!(nbdinfo_size(&good), 4 * MIB, "{what}");
    }
    assert!(
        server.wait_logged("TLS handshake failed", 10),
        "{}",
        server.text()
    );
    // Nothing crashed: the engine still answers its RPC and lists its export.
    assert!(wait_for(Duration::from_secs(10), || {
        c.ok("nbd_get_exports", json!({}))[0]["connections"] == 0
    }));
}
