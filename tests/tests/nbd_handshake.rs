//! The NBD handshake under clients that connect and stall, and what it advertises: stalled
//! connections cannot lock other clients out, a connection over its peer's limit is told why,
//! and a read-only export offers no command that writes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quicksplit_tests::nbd::NbdClient;
use quicksplit_tests::{start_empty, wait_for, RpcConn, TempDir};
use rand::{Rng, SeedableRng};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// The engine's limit of handshakes in progress per peer (`MAX_HANDSHAKES_PER_PEER`).
const PER_PEER: usize = 8;
/// Its limit of handshakes in progress in all (`MAX_HANDSHAKES`).
const ALL: usize = 128;
/// NBD_REP_ERR_POLICY.
const ERR_POLICY: u32 = (1 << 31) | 2;

/// Runs `cmd` to its end, failing the test when it fails or takes longer than a minute (a
/// client locked out would otherwise wait for the handshake table to drain).
fn run_within_a_minute(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An engine exporting a 4 MiB RAM disk `m` filled with random bytes on a Unix socket.
struct Setup {
    dir: TempDir,
    _server: quicksplit_tests::Server,
    rpc: RpcConn,
    nbd_sock: std::path::PathBuf,
    data: Vec<u8>,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let (server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd_sock = dir.path().join("nbd.sock");
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "socket": nbd_sock}),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let data: Vec<u8> = (0..4 * MIB).map(|_| rng.gen()).collect();
    let mut c = NbdClient::connect(&nbd_sock, "m").expect("connect");
    c.write(0, &data).expect("fill");
    Setup {
        dir,
        _server: server,
        rpc,
        nbd_sock,
        data,
    }
}

/// Makes every other connection send its flags (and nothing more); the others send nothing.
fn stall(mut s: &UnixStream, i: usize) {
    if i % 2 == 1 {
        let _ = s.write_all(&3u32.to_be_bytes());
    }
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Connections that connect and then stall, far more than one peer may have negotiating, do
/// not keep another client from connecting and reading.
#[test]
fn connections_that_stall_do_not_lock_other_clients_out() {
    let s = setup("nbd-stall");
    let stalled: Vec<UnixStream> = (0..80)
        .map(|_| UnixStream::connect(&s.nbd_sock).expect("connect"))
        .collect();
    for (i, c) in stalled.iter().enumerate() {
        stall(c, i);
    }
    // nbdcopy is another process, hence another peer: it connects (several connections) and
    // reads the whole export.
    let out = s.dir.path().join("out.img");
    run_within_a_minute(
        Command::new("nbdcopy").args([&uri(&s.nbd_sock, "m"), out.to_str().expect("utf-8")]),
    );
    assert!(
        std::fs::read(&out).expect("copy") == s.data,
        "nbdcopy read other bytes"
    );
    drop(stalled);
}

/// Reads the server's greeting, asks for `export` with NBD_OPT_GO, and gives the first reply's
/// type and payload.
fn go(s: &mut UnixStream, export: &str) -> std::io::Result<(u32, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes())?;
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(6 + export.len() as u32).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt)?;
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(
        &h[..8],
        &0x0003_e889_0455_65a9_u64.to_be_bytes(),
        "option reply magic"
    );
    assert_eq!(
        u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
        7,
        "reply to GO"
    );
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let mut payload = vec![0u8; u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize];
    s.read_exact(&mut payload)?;
    Ok((kind, payload))
}

/// A peer with as many handshakes in progress as it may have gets its next connection refused
/// with a reason (NBD_REP_ERR_POLICY with a message, the fixed newstyle way to turn a client
/// away), and is served again once those handshakes end.
#[test]
fn a_connection_over_its_peers_limit_is_told_why() {
    let s = setup("nbd-refuse");
    let stalled: Vec<UnixStream> = (0..PER_PEER)
        .map(|_| UnixStream::connect(&s.nbd_sock).expect("connect"))
        .collect();
    // Accepted in order: the stalled ones hold the peer's places when this one comes.
    let mut extra = UnixStream::connect(&s.nbd_sock).expect("connect");
    let (kind, message) = go(&mut extra, "m").expect("an answer");
    let message = String::from_utf8_lossy(&message);
    assert_eq!(kind, ERR_POLICY, "refused by policy: {message}");
    assert!(
        message.contains(&format!(
            "too many NBD handshakes in progress from process {}",
            std::process::id()
        )),
        "the reason names the limit and the peer: {message}"
    );
    // Closed after the refusal.
    let mut rest = Vec::new();
    let _ = extra.read_to_end(&mut rest);
    drop(stalled);
    let mut served = None;
    assert!(
        wait_for(Duration::from_secs(20), || {
            served = NbdClient::connect(&s.nbd_sock, "m").ok();
            served.is_some()
        }),
        "served again once the stalled handshakes are gone"
    );
    let mut c = served.expect("connected");
    assert_eq!(c.read(0, 4096).expect("read"), s.data[..4096]);
}

/// A stalled connection from source address 127.0.0.`host` to `port`.
fn connect_from(host: u8, port: u16) -> TcpStream {
    use rustix::net::{AddressFamily, Ipv4Addr, SocketAddrV4, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    rustix::net::bind(&fd, &SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, host), 0)).expect("bind");
    rustix::net::connect(&fd, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).expect("connect");
    TcpStream::from(fd)
}

/// Stalled connections from more peers than the handshake table holds: the newest take the
/// places of the oldest (whose connections are closed), and a new client still gets in.
#[test]
fn stalled_connections_from_many_addresses_make_room_for_new_clients() {
    let dir = TempDir::new("nbd-stall-tcp");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    rpc.ok("bdev_malloc_create", json!({"name": "t", "size": 4 * MIB}));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    rpc.ok(
        "nbd_export_start",
        json!({"name": "t", "bdev": "t", "listen": format!("127.0.0.1:{port}")}),
    );
    // 4 per address from 127.0.0.2 on: within each peer's limit, past the table's.
    let per_address = PER_PEER / 2;
    let addresses = ALL / per_address + 8;
    let mut stalled = Vec::new();
    for host in 0..addresses {
        for _ in 0..per_address {
            stalled.push(connect_from(2 + host as u8, port));
        }
    }
    // The first ones were closed to make room (after the server's greeting, if it got that
    // far); the last ones are being negotiated.
    let mut first = stalled.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut got = Vec::new();
    first.read_to_end(&mut got).expect("closed by the server");
    assert!(
        got.is_empty() || got.len() == 18,
        "at most the greeting: {got:?}"
    );
    let mut last = stalled.pop().expect("stalled");
    last.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    last.read_exact(&mut hello).expect("greeted");
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    // A client from 127.0.0.1 connects and is served while the table is full of stalled
    // handshakes.
    let out = run_within_a_minute(
        Command::new("nbdinfo").args(["--size", &format!("nbd://127.0.0.1:{port}/t")]),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (4 * MIB).to_string()
    );
    drop(stalled);
}

/// What nbdinfo says an export can do.
fn capabilities(sock: &Path, export: &str) -> serde_json::Value {
    let out = run_within_a_minute(Command::new("nbdinfo").args(["--json", &uri(sock, export)]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo prints JSON");
    info["exports"][0].clone()
}

/// A read-only export advertises no trim, write-zeroes or FUA (nothing it would accept), and
/// still flush, as nbdkit does; a writable one advertises them all.
#[test]
fn a_read_only_export_advertises_no_command_that_writes() {
    let mut s = setup("nbd-flags");
    s.rpc.ok(
        "nbd_export_start",
        json!({"name": "ro", "bdev": "m", "writable": false, "socket": s.nbd_sock}),
    );
    let ro = capabilities(&s.nbd_sock, "ro");
    assert_eq!(ro["is_read_only"], true, "{ro}");
    for what in ["can_trim", "can_zero", "can_fua"] {
        assert_eq!(ro[what], false, "{what} on a read-only export: {ro}");
    }
    assert_eq!(ro["can_flush"], true, "{ro}");
    assert_eq!(ro["can_multi_conn"], true, "{ro}");
    let rw = capabilities(&s.nbd_sock, "m");
    assert_eq!(rw["is_read_only"], false, "{rw}");
    for what in [
        "can_trim",
        "can_zero",
        "can_fua",
        "can_flush",
        "can_multi_conn",
    ] {
        assert_eq!(rw[what], true, "{what} on a writable export: {rw}");
    }
}
