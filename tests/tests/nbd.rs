//! The NBD server with real clients (fio, qemu-img, qemu-io, nbdcopy, nbdinfo) and with
//! malformed input.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use quicksplit_tests::nbd::{self, NbdClient};
use quicksplit_tests::{run_ok, start_empty, wait_for, RpcConn, TempDir};
use rand::{Rng, SeedableRng};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    std::fs::write(path, &data).unwrap();
    data
}

struct Setup {
    dir: TempDir,
    _server: quicksplit_tests::Server,
    rpc: RpcConn,
    nbd_sock: std::path::PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let (server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd_sock = dir.path().join("nbd.sock");
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 64 * MIB}));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "socket": nbd_sock}),
    );
    Setup {
        dir,
        _server: server,
        rpc,
        nbd_sock,
    }
}

#[test]
fn fio_writes_and_verifies_through_nbd() {
    let s = setup("nbd-fio");
    let out = run_ok(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", uri(&s.nbd_sock, "m")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let json_start = text.find('{').expect("fio JSON");
    let v: serde_json::Value = serde_json::from_str(&text[json_start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 16 * MIB);
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 16 * MIB,
        "verify read back"
    );
}

#[test]
fn qemu_img_and_nbdcopy_both_ways_and_nbdinfo_lists() {
    let s = setup("nbd-copy");
    let src = s.dir.path().join("src.img");
    let data = random_file(&src, 8 * MIB as usize, 7);
    // qemu-img into the export, nbdcopy out of it.
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &uri(&s.nbd_sock, "m"),
    ]));
    let out1 = s.dir.path().join("out1.img");
    run_ok(Command::new("nbdcopy").args([&uri(&s.nbd_sock, "m"), out1.to_str().unwrap()]));
    let got = std::fs::read(&out1).unwrap();
    assert_eq!(got.len() as u64, 64 * MIB);
    assert!(got[..data.len()] == data[..], "nbdcopy read back differs");
    assert!(got[data.len()..].iter().all(|&b| b == 0));
    // nbdcopy into the export, qemu-img out of it.
    let src2 = s.dir.path().join("src2.img");
    let data2 = random_file(&src2, 64 * MIB as usize, 8);
    run_ok(Command::new("nbdcopy").args([src2.to_str().unwrap(), &uri(&s.nbd_sock, "m")]));
    let out2 = s.dir.path().join("out2.img");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri(&s.nbd_sock, "m"),
        out2.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&out2).unwrap() == data2,
        "qemu-img read back differs"
    );
    // nbdinfo lists the exports of the socket.
    let mut rpc = s.rpc;
    rpc.ok(
        "bdev_malloc_create",
        json!({"name": "second", "size": 4 * MIB}),
    );
    rpc.ok(
        "nbd_export_start",
        json!({"name": "second", "bdev": "second", "socket": s.nbd_sock}),
    );
    let out = run_ok(Command::new("nbdinfo").args([
        "--list",
        &format!("nbd+unix://?socket={}", s.nbd_sock.display()),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("export=\"m\"") || text.contains("export: m") || text.contains("\"m\""),
        "{text}"
    );
    assert!(text.contains("second"), "{text}");
    let exports = rpc.ok("nbd_get_exports", json!({}));
    assert_eq!(exports.as_array().unwrap().len(), 2);
}

#[test]
fn qemu_io_at_odd_offsets_and_lengths() {
    let s = setup("nbd-qemu-io");
    let u = uri(&s.nbd_sock, "m");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1000 3000",
        "-c",
        "write -P 0xcd 8191 2",
        "-c",
        "read -P 0xab 1000 3000",
        "-c",
        "read -P 0xcd 8191 2",
        "-c",
        "read -P 0 0 1000",
        &u,
    ]));
    // Check with our own client, aligned.
    let mut c = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    let block = c.read(0, 12288).unwrap();
    assert!(block[..1000].iter().all(|&b| b == 0));
    assert!(block[1000..4000].iter().all(|&b| b == 0xab));
    assert!(block[4000..8191].iter().all(|&b| b == 0));
    assert_eq!(&block[8191..8193], &[0xcd, 0xcd]);
    assert!(block[8193..].iter().all(|&b| b == 0));
}

#[test]
fn a_read_only_export_refuses_writes_and_stays_usable() {
    let s = setup("nbd-ro");
    let mut rpc = s.rpc;
    rpc.ok(
        "nbd_export_start",
        json!({"name": "ro", "bdev": "m", "writable": false, "socket": s.nbd_sock}),
    );
    let mut rw = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    rw.write(4096, &[0x5a; 4096]).unwrap();
    let mut ro = NbdClient::connect(&s.nbd_sock, "ro").unwrap();
    assert!(ro.flags & 2 != 0, "READ_ONLY flag");
    assert_eq!(ro.write(0, &[1; 4096]), Err(1), "EPERM");
    assert_eq!(ro.command(nbd::WRITE_ZEROES, 0, 4096), Err(1));
    assert_eq!(ro.command(nbd::TRIM, 0, 4096), Err(1));
    assert_eq!(ro.read(4096, 4096).unwrap(), vec![0x5a; 4096]);
    assert_eq!(
        ro.read(0, 4096).unwrap(),
        vec![0; 4096],
        "the refused write did not land"
    );
    // qemu-io cannot open it for writing.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4096", &uri(&s.nbd_sock, "ro")])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || all.to_lowercase().contains("denied")
            || all.contains("read-only")
            || all.contains("Read-only"),
        "{all}"
    );
    assert_eq!(ro.read(0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn flush_trim_write_zeroes_and_fua() {
    let s = setup("nbd-cmds");
    let mut c = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    assert_eq!(c.size, 64 * MIB);
    c.write(0, &[7; 16384]).unwrap();
    c.command(nbd::WRITE_ZEROES, 4096, 4096).unwrap();
    let cookie = c.send(nbd::WRITE, 1, 8192, 4096, &[9; 4096]);
    let (got, err, _) = c.recv(0).unwrap();
    assert_eq!((got, err), (cookie, 0));
    c.command(nbd::FLUSH, 0, 0).unwrap();
    let d = c.read(0, 16384).unwrap();
    assert!(d[..4096].iter().all(|&b| b == 7));
    assert!(d[4096..8192].iter().all(|&b| b == 0));
    assert!(d[8192..12288].iter().all(|&b| b == 9));
    c.command(nbd::TRIM, 0, 4096).unwrap();
    // Disconnect cleanly.
    c.send(nbd::DISC, 0, 0, 0, &[]);
    let mut byte = [0u8; 1];
    use std::io::Read;
    assert_eq!(
        c.sock.read(&mut byte).unwrap_or(0),
        0,
        "the server closes after DISC"
    );
}

#[test]
fn malformed_input_fails_one_connection_and_others_keep_being_served() {
    let s = setup("nbd-bad");
    let mut good = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    good.write(0, &[1; 4096]).unwrap();
    let size = 64 * MIB;

    // Out-of-range offsets, unaligned ranges, unknown commands: errors, connection usable.
    let mut c = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    assert_eq!(c.read(size, 4096), Err(22), "read past the end: EINVAL");
    assert_eq!(c.read(u64::MAX - 100, 4096), Err(22));
    assert_eq!(
        c.write(size - 4096, &[0; 8192]),
        Err(28),
        "write past the end: ENOSPC"
    );
    assert_eq!(c.read(100, 4096), Err(22), "unaligned: EINVAL");
    assert_eq!(c.command(99, 0, 4096), Err(22), "unknown command: EINVAL");
    assert_eq!(
        c.command(7, 0, 4096),
        Err(22),
        "block status not negotiated"
    );
    assert_eq!(c.read(0, (32 << 20) + 4096), Err(22), "a read over 32 MiB");
    assert_eq!(c.read(0, 4096).unwrap(), vec![1; 4096]);

    // A write over 32 MiB: an error reply, then the server closes that connection.
    let mut big = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    let cookie = big.send(nbd::WRITE, 0, 0, (32 << 20) + 4096, &[]);
    let (got, err, _) = big.recv(0).unwrap();
    assert_eq!((got, err), (cookie, 22));

    // Bad magic: closed.
    let mut bad = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    use std::io::{Read, Write};
    bad.sock.write_all(&[0xde; 28]).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(bad.sock.read(&mut byte).unwrap_or(0), 0);

    // Closes mid-request: a header alone, half a payload, half a header.
    for cut in [10usize, 28, 28 + 2000] {
        let mut m = NbdClient::connect(&s.nbd_sock, "m").unwrap();
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&nbd::WRITE.to_be_bytes());
        req.extend_from_slice(&1u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        req.extend_from_slice(&[0xee; 4096]);
        m.sock.write_all(&req[..cut]).unwrap();
        drop(m);
    }
    // Handshake garbage.
    for junk in [&b"not nbd at all"[..], &[0u8; 4][..], &[0xff; 200][..]] {
        if let Ok(mut raw) = std::os::unix::net::UnixStream::connect(&s.nbd_sock) {
            let _ = raw.write_all(junk);
        }
    }
    // A random-bytes storm on fresh connections after a proper handshake.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let mut m = NbdClient::connect(&s.nbd_sock, "m").unwrap();
        let junk: Vec<u8> = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect();
        let _ = m.sock.write_all(&junk);
    }
    // The first client is still served, and the half-written writes never landed.
    assert_eq!(good.read(0, 4096).unwrap(), vec![1; 4096]);
    good.write(8192, &[3; 4096]).unwrap();
    assert_eq!(good.read(8192, 4096).unwrap(), vec![3; 4096]);
    let mut rpc = s.rpc;
    assert!(wait_for(Duration::from_secs(10), || {
        rpc.ok("nbd_get_exports", json!({}))[0]["connections"].as_u64() <= Some(2)
    }));
}

#[test]
fn tcp_export_and_stopping_an_export() {
    let dir = TempDir::new("nbd-tcp");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    rpc.ok("bdev_malloc_create", json!({"name": "t", "size": 4 * MIB}));
    let port = 20000 + (std::process::id() % 20000) as u16;
    rpc.ok(
        "nbd_export_start",
        json!({"name": "t", "bdev": "t", "listen": format!("127.0.0.1:{port}")}),
    );
    let src = dir.path().join("s.img");
    let data = random_file(&src, 4 * MIB as usize, 1);
    let u = format!("nbd://127.0.0.1:{port}/t");
    run_ok(Command::new("nbdcopy").args([src.to_str().unwrap(), &u]));
    let out = dir.path().join("o.img");
    run_ok(Command::new("nbdcopy").args([&u, out.to_str().unwrap()]));
    assert!(std::fs::read(&out).unwrap() == data);
    assert_eq!(rpc.err("bdev_delete", json!({"name": "t"})).0, -32002);
    rpc.ok("nbd_export_stop", json!({"name": "t"}));
    assert_eq!(rpc.err("nbd_export_stop", json!({"name": "t"})).0, -32001);
    let refused = Command::new("nbdinfo").arg(&u).output().unwrap();
    assert!(
        !refused.status.success(),
        "the stopped export still answers"
    );
    rpc.ok("bdev_delete", json!({"name": "t"}));
}

/// A listen address beyond loopback without `tls` is refused unless the export is asked for
/// `insecure`, which it then keeps in the listing and the saved configuration.
#[test]
fn a_non_loopback_listen_needs_insecure() {
    let dir = TempDir::new("nbd-insecure");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    rpc.ok("bdev_malloc_create", json!({"name": "t", "size": 4 * MIB}));
    let port = 20000 + (std::process::id() % 20000) as u16 + 1;
    let listen = format!("0.0.0.0:{port}");
    let (code, msg) = rpc.err(
        "nbd_export_start",
        json!({"name": "t", "bdev": "t", "listen": listen}),
    );
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("insecure: true"), "{msg}");
    assert_eq!(rpc.ok("nbd_get_exports", json!({})), json!([]));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "t", "bdev": "t", "listen": listen, "insecure": true}),
    );
    assert_eq!(rpc.ok("nbd_get_exports", json!({}))[0]["insecure"], true);
    let saved = rpc.ok("save_config", json!({}));
    let start = saved["config"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["method"] == "nbd_export_start")
        .cloned()
        .unwrap();
    assert_eq!(start["params"]["insecure"], true, "{start}");
    let u = format!("nbd://127.0.0.1:{port}/t");
    run_ok(Command::new("nbdinfo").arg(&u));
    // A loopback listen needs nothing, and says nothing of it.
    rpc.ok(
        "nbd_export_start",
        json!({"name": "l", "bdev": "t", "writable": false,
               "listen": format!("127.0.0.1:{}", port + 1)}),
    );
    let exports = rpc.ok("nbd_get_exports", json!({}));
    let l = exports
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "l")
        .unwrap();
    assert!(l.get("insecure").is_none(), "{l}");
}

/// A RAM disk's reads are sent from its memory; one that waits behind a full socket returns
/// the blocks as they were when it ran, even when a write to them completes first.
#[test]
fn a_ram_disk_read_waiting_for_the_socket_keeps_the_blocks_as_they_were() {
    let s = setup("nbd-in-place");
    let mut reader = NbdClient::connect(&s.nbd_sock, "m").expect("connect");
    const LEN: u32 = 128 << 10;
    // 12 MiB of reads the client does not take yet fill the socket's buffers.
    let first: Vec<u64> = (0..96u64).map(|i| i * LEN as u64).collect();
    for &off in &first {
        reader.send(nbd::READ, 0, off, LEN, &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    // These run now, with nowhere to send their data but the connection's queue.
    let second: Vec<u64> = (0..8u64).map(|i| (32 << 20) + i * LEN as u64).collect();
    for &off in &second {
        reader.send(nbd::READ, 0, off, LEN, &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut writer = NbdClient::connect(&s.nbd_sock, "m").expect("connect");
    for &off in &second {
        writer.write(off, &[0xab; LEN as usize]).expect("write");
    }
    for _ in 0..first.len() + second.len() {
        let (cookie, err, data) = reader.recv(LEN as usize).expect("reply");
        assert_eq!(err, 0, "read {cookie}");
        assert!(
            data.iter().all(|&b| b == 0),
            "read {cookie} returned bytes written after it ran"
        );
    }
    for &off in &second {
        let back = writer.read(off, LEN).expect("read");
        assert!(back.iter().all(|&b| b == 0xab));
    }
}

/// A stopped export whose connection still holds requests it read counts as in use: a pair
/// made of its bdev could otherwise receive writes that bypass it. A client that never reads
/// its last replies does not hold it forever.
#[test]
fn a_stopped_export_with_a_connection_closing_keeps_its_bdev_out_of_pairs() {
    let mut s = setup("nbd-stopping");
    s.rpc.ok(
        "bdev_malloc_create",
        json!({"name": "s2", "size": 64 * MIB}),
    );
    let mut client = NbdClient::connect(&s.nbd_sock, "m").expect("connect");
    // Replies the client does not read keep its connection busy after the stop.
    for i in 0..96u64 {
        client.send(nbd::READ, 0, i * (128 << 10), 128 << 10, &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    s.rpc.ok("nbd_export_stop", json!({"name": "m"}));
    let pair = json!({"name": "pm", "primary": "m", "secondary": "s2"});
    let (code, msg) = s.rpc.err("pair_create", pair.clone());
    assert_eq!(code, -32002, "{msg}");
    assert!(msg.contains("still closing"), "{msg}");
    // A closing connection whose client does not read is given up after 5 s.
    assert!(
        wait_for(Duration::from_secs(15), || s
            .rpc
            .call("pair_create", pair.clone())
            .get("error")
            .is_none()),
        "the pair is made once the connection is gone"
    );
    drop(client);
}

/// The descriptors process `pid` watches in its epoll sets, with their event masks.
fn epoll_masks(pid: u32) -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.flatten() {
        let is_epoll =
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().contains("eventpoll"));
        if !is_epoll {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
        // A set closed since the listing is simply gone.
        let Ok(info) = std::fs::read_to_string(info) else {
            continue;
        };
        out.extend(
            quicksplit_tests::epoll_fdinfo_watches(&info)
                .into_iter()
                .map(|(fd, events, _)| (fd, events)),
        );
    }
    out
}

/// Replies waiting for room in the socket have the reactor woken once the client reads: the
/// connection's socket is watched for output (EPOLLOUT) while they wait, and no longer once
/// they are sent. (A parked reactor woken only by input sent the rest of 1 MiB replies at its
/// next timer: fio read 1 MiB blocks at 80 MiB/s.) The replies are whole and in order.
#[test]
fn replies_waiting_for_room_have_the_socket_watched_for_output() {
    const EPOLLOUT: u32 = 0x4;
    let s = setup("nbd-output-watch");
    let pid = s._server.pid();
    let mut c = NbdClient::connect(&s.nbd_sock, "m").unwrap();
    let data: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i + 1; MIB as usize]).collect();
    for (i, d) in data.iter().enumerate() {
        c.write(i as u64 * MIB, d).unwrap();
    }
    assert!(epoll_masks(pid).iter().all(|&(_, m)| m & EPOLLOUT == 0));
    // 16 MiB of reads, their replies left unread: far more than the socket holds.
    let cookies: Vec<u64> = (0..16u64)
        .map(|i| c.send(nbd::READ, 0, i * MIB, MIB as u32, &[]))
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || epoll_masks(pid)
            .iter()
            .any(|&(_, m)| m & EPOLLOUT != 0)),
        "{:?}",
        epoll_masks(pid)
    );
    for (i, want) in cookies.iter().enumerate() {
        let (cookie, err, got) = c.recv(MIB as usize).unwrap();
        assert_eq!((cookie, err), (*want, 0));
        assert!(got == data[i], "reply {i} holds other data");
    }
    assert!(
        wait_for(Duration::from_secs(10), || epoll_masks(pid)
            .iter()
            .all(|&(_, m)| m & EPOLLOUT == 0)),
        "{:?}",
        epoll_masks(pid)
    );
}
