//! NVMe/TCP through the real binary: backups in every mode from one quicksplit to a second
//! quicksplit's `nvmf_export_start` over 127.0.0.1, byte-identical to the image with the
//! manifest's SHA-256; the statuses the target answers bad commands with; more than a
//! thousand generated malformed PDUs while another connection keeps being served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::nvme::spec::{self, Command as NvmeCmd};
use drivers::nvmf::fabrics::{self, status};
use drivers::nvmf::host::{HostController, HostOptions, IoQueue, NvmfError, SyncQueue};
use drivers::nvmf::pdu::{self, CapsuleCmd, DataPdu, Digests, IcReq};
use drivers::{IoBufs, IoOp};
use hugepages::BufferPool;
use quicksplit_tests::nbd::NbdClient;
use quicksplit_tests::nvmf::{export_ram_disk, filled_buffer, target};
use quicksplit_tests::{start_empty, wait_for, RpcConn, TempDir};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

fn sha256_hex(data: &[u8], dir: &Path) -> String {
    let f = dir.join("sha-input");
    std::fs::write(&f, data).expect("write");
    quicksplit_tests::sha256_of(&f)
}

fn wait_backup(rpc: &mut RpcConn, id: u64) -> Value {
    quicksplit_tests::wait_backup(rpc, id, Duration::from_secs(120))
}

fn read_all(c: &mut NbdClient, size: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        v.extend(c.read(at, MIB as u32).expect("NBD read"));
        at += MIB;
    }
    v
}

#[test]
fn backups_to_another_quicksplit_over_nvmf_are_exact_in_every_mode() {
    let dir = TempDir::new("nvmf-backup");
    let src_dir = dir.path().join("src");
    let dst_dir = dir.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let (_src, src_sock) = start_empty(&src_dir);
    let (_dst, dst_sock) = start_empty(&dst_dir);
    let mut src = RpcConn::connect(&src_sock);
    let mut dst = RpcConn::connect(&dst_sock);

    // The source: a pair whose P holds random data, written through NBD.
    let nbd = src_dir.join("nbd.sock");
    quicksplit_tests::ram_pair(&mut src, SIZE, Some(1), &nbd);
    let mut image = vec![0u8; SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(8).fill_bytes(&mut image);
    let mut p = NbdClient::connect(&nbd, "p").expect("NBD connect");
    for (i, chunk) in image.chunks(MIB as usize).enumerate() {
        p.write(i as u64 * MIB, chunk).expect("NBD write");
    }

    // The destination: another quicksplit exporting a malloc bdev over NVMe/TCP (and NBD, to
    // read back what arrived).
    let port = quicksplit_tests::free_port();
    let nqn = "nqn.2026-11.io.quicksplit:backup-target";
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
    let exports = dst.ok("nvmf_get_exports", json!({}));
    assert_eq!(exports[0]["nqn"], nqn);
    assert_eq!(exports[0]["writable"], true);

    let want = sha256_hex(&image, dir.path());
    // One split; the background copy is throttled so tracks are still pending during the
    // backups, which each mode handles its own way.
    let split = src.ok("pair_split", json!({"name": "pr"}));
    assert!(
        split["pending_tracks"].as_u64().unwrap() * 2 >= SIZE / 65536,
        "{split}"
    );
    let mut d = NbdClient::connect(&dst_nbd, "d").expect("NBD connect");
    for mode in ["merge", "reflect", "wait"] {
        // Clear the destination so each mode proves itself.
        d.command(quicksplit_tests::nbd::WRITE_ZEROES, 0, SIZE as u32)
            .expect("zero");
        // P moves on after the split; the image must not.
        let stop = Arc::new(AtomicBool::new(false));
        let (nbd2, stop2) = (nbd.clone(), Arc::clone(&stop));
        let writer = std::thread::spawn(move || {
            let mut c = NbdClient::connect(&nbd2, "p").expect("NBD connect");
            let mut n = 0u64;
            while !stop2.load(Ordering::SeqCst) || n == 0 {
                let off = (n * 7 + 3) % (SIZE / 65536) * 65536;
                c.write(off, &vec![(n % 200 + 1) as u8; 65536])
                    .expect("write P");
                n += 1;
            }
            n
        });
        let id = src.ok(
            "backup_start",
            json!({"pair": "pr", "mode": mode, "flat_sha256": true, "target": {
                "type": "nvmf", "traddr": "127.0.0.1", "trsvcid": port, "subnqn": nqn}}),
        )["id"]
            .as_u64()
            .unwrap();
        let info = wait_backup(&mut src, id);
        stop.store(true, Ordering::SeqCst);
        assert!(writer.join().unwrap() > 0);
        assert_eq!(info["state"], "done", "{mode}: {info}");
        assert_eq!(info["bytes_done"], SIZE);
        assert_eq!(info["sha256"], want.as_str(), "{mode}: manifest SHA-256");
        if mode == "merge" {
            // The initiator sends the staging buffers themselves: no payload copy by the CPU.
            assert_eq!(info["cpu_copied_bytes"], 0, "{mode}: {info}");
        }
        let got = read_all(&mut d, SIZE);
        assert!(
            got == image,
            "{mode}: the NVMe/TCP namespace holds something else"
        );
        assert_eq!(sha256_hex(&got, dir.path()), want);
    }
}

fn status_of(r: Result<(spec::Completion, Vec<u8>), NvmfError>) -> u16 {
    match r {
        Ok(_) => 0,
        Err(NvmfError::Status { status, .. }) => status.0 & 0x7ff,
        Err(e) => panic!("expected an NVMe status, got {e}"),
    }
}

/// Writes and reads back through an I/O queue, polling until done.
fn io(q: &mut IoQueue, pool: &BufferPool, op: IoOp, offset: u64, fill: u8) -> Vec<u8> {
    let bufs = filled_buffer(pool, fill);
    let len = pool.buf_size() as u64;
    q.submit(op, offset, len, bufs, 1)
        .map_err(|_| "submit refused")
        .unwrap();
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while out.is_empty() {
        q.poll(&mut out);
        assert!(Instant::now() < end, "I/O did not complete");
    }
    let d = out.pop().unwrap();
    d.result.expect("I/O failed");
    d.bufs[0].as_slice().to_vec()
}

#[test]
fn the_target_answers_bad_commands_with_the_spec_statuses() {
    let dir = TempDir::new("nvmf-status");
    let (_server, _rpc, port, nqn) = target(dir.path());
    for digests in [
        Digests::default(),
        Digests {
            header: true,
            data: true,
        },
    ] {
        let mut opts = HostOptions::new("127.0.0.1", port, nqn);
        opts.digests = digests;
        let ctrl = HostController::connect(opts.clone()).expect("connect");
        let ns = ctrl.namespaces()[0];
        assert_eq!((ns.nsid, ns.block_size, ns.blocks), (1, 4096, 1024));
        let (mut q, _) = SyncQueue::connect(&opts, 40, 32, ctrl.cntlid(), 0).expect("I/O queue");
        let read = |lba: u64, n: u32| fabrics::with_sgl(NvmeCmd::read(1, lba, n), n * 4096, false);
        assert_eq!(status_of(q.command("read", read(0, 1), &[], 4096)), 0);
        assert_eq!(status_of(q.command("read", read(1023, 2), &[], 8192)), 0x80);
        let bad_ns = fabrics::with_sgl(NvmeCmd::read(7, 0, 1), 4096, false);
        assert_eq!(status_of(q.command("read", bad_ns, &[], 4096)), 0x0b);
        assert_eq!(
            status_of(q.command("opcode", NvmeCmd::new(0x7e), &[], 0)),
            0x01
        );
        let short = fabrics::with_sgl(NvmeCmd::write(1, 0, 2, false), 4096, true);
        assert_eq!(status_of(q.command("write", short, &[7u8; 4096], 0)), 0x0f);
        let w = fabrics::with_sgl(NvmeCmd::write(1, 5, 1, false), 4096, true);
        assert_eq!(status_of(q.command("write", w, &[9u8; 4096], 0)), 0);
        let (_, back) = q.command("read", read(5, 1), &[], 4096).unwrap();
        assert!(back.iter().all(|&b| b == 9));
        // In-capsule data on a command that does not say its data pointer is an SGL (PSDT
        // 10b) is refused, and nothing is written.
        let mut psdt = fabrics::with_sgl(NvmeCmd::write(1, 5, 1, false), 4096, true);
        psdt.dw[0] = (psdt.dw[0] & !(3 << 14)) | (2 << 14);
        assert_eq!(status_of(q.command("write", psdt, &[3u8; 4096], 0)), 0x0f);
        let (_, back) = q.command("read", read(5, 1), &[], 4096).unwrap();
        assert!(
            back.iter().all(|&b| b == 9),
            "a refused write changed the block"
        );
        assert_eq!(
            status_of(q.command("zeroes", NvmeCmd::write_zeroes(1, 5, 1, false), &[], 0)),
            0
        );
        let (_, back) = q.command("read", read(5, 1), &[], 4096).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // A second Connect on a connected queue is a sequence error.
        let again = fabrics::connect(1, 32, 0);
        assert_eq!(
            status_of(q.command("connect", again, &[0u8; 1024], 0)),
            0x0c
        );
        // Write protected namespace.
        let ro_opts = HostOptions::new("127.0.0.1", port, "nqn.2026-11.io.quicksplit:ro");
        let ro = HostController::connect(ro_opts.clone()).expect("connect ro");
        assert!(ro.namespaces()[0].read_only);
        let (mut rq, _) = SyncQueue::connect(&ro_opts, 1, 32, ro.cntlid(), 0).unwrap();
        let w = fabrics::with_sgl(NvmeCmd::write(1, 0, 1, false), 4096, true);
        assert_eq!(status_of(rq.command("write", w, &[1u8; 4096], 0)), 0x20);
        // An I/O queue naming a controller that does not exist is refused.
        let r = SyncQueue::connect(&opts, 1, 32, 0x7777, 0);
        assert!(matches!(r, Err(NvmfError::Status { status, .. }) if status.0 & 0x7ff == 0x182));
        // Unknown subsystem.
        let bad = HostOptions::new("127.0.0.1", port, "nqn.2026-11.io.quicksplit:none");
        assert!(HostController::connect(bad).is_err());
        // Large transfers through the initiator's I/O queue (R2T and several commands).
        let pool = BufferPool::new(1 << 20, 4).unwrap();
        let mut iq = ctrl.open_io_queue(1).expect("io queue");
        io(&mut iq, &pool, IoOp::Write { fua: false }, MIB, 0x3c);
        assert!(io(&mut iq, &pool, IoOp::Read, MIB, 0)
            .iter()
            .all(|&b| b == 0x3c));
    }
    // The discovery subsystem on the same address lists both exports.
    let disc_opts = HostOptions::new("127.0.0.1", port, fabrics::DISCOVERY_NQN);
    let (mut dq, _) = SyncQueue::connect(&disc_opts, 0, 32, fabrics::CNTLID_DYNAMIC, 0).unwrap();
    let en = fabrics::property_set(spec::REG_CC as u32, spec::cc_enable());
    assert_eq!(status_of(dq.command("enable", en, &[], 0)), 0);
    let (_, id) = dq
        .command("identify", fabrics::identify(1, 0), &[], 4096)
        .unwrap();
    assert_eq!(id[111], 2, "a discovery controller");
    let mut glp = NvmeCmd::new(fabrics::admin::GET_LOG_PAGE);
    glp.dw[10] = fabrics::LOG_DISCOVERY as u32 | ((3072 / 4 - 1) << 16);
    let glp = fabrics::with_sgl(glp, 3072, false);
    let (_, log) = dq.command("get log page", glp, &[], 3072).unwrap();
    assert_eq!(
        u64::from_le_bytes(log[8..16].try_into().unwrap()),
        2,
        "two records"
    );
    let subnqn = |i: usize| {
        let f = &log[1024 * i + 256..1024 * i + 512];
        String::from_utf8_lossy(&f[..f.iter().position(|&b| b == 0).unwrap()]).to_string()
    };
    let mut listed = vec![subnqn(1), subnqn(2)];
    listed.sort();
    assert_eq!(listed, [nqn, "nqn.2026-11.io.quicksplit:ro"]);
    assert_eq!(log[1024], 3, "TRTYPE TCP");
    // A data digest that does not match: the command fails with a transient transport error.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let dg = Digests {
        header: true,
        data: true,
    };
    s.write_all(&IcReq::new(dg).encode()).unwrap();
    let mut icresp = [0u8; 128];
    s.read_exact(&mut icresp).unwrap();
    let data = fabrics::ConnectData {
        hostid: [1; 16],
        cntlid: fabrics::CNTLID_DYNAMIC,
        subnqn: nqn.into(),
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:test".into(),
    }
    .encode();
    let c = fabrics::connect(0, 32, 0).with_cid(1);
    let mut wire = CapsuleCmd::new(c)
        .with_data_len(1024)
        .encode(dg)
        .as_slice()
        .to_vec();
    wire.extend_from_slice(&data);
    wire.extend_from_slice(&(pdu::crc32c([&data[..]]) ^ 1).to_le_bytes());
    s.write_all(&wire).unwrap();
    let mut resp = [0u8; 28];
    s.read_exact(&mut resp).unwrap();
    assert_eq!(resp[0], pdu::pdu_type::CAPSULE_RESP);
    let st = (u32::from_le_bytes([resp[20], resp[21], resp[22], resp[23]]) >> 17) & 0x7ff;
    assert_eq!(st, 0x22, "transient transport error");
    // A bad header digest is fatal: C2HTermReq (header digest error) and the connection closes.
    let mut h = CapsuleCmd::new(NvmeCmd::new(0x18).with_cid(2))
        .encode(dg)
        .as_slice()
        .to_vec();
    h[72] ^= 0xff;
    s.write_all(&h).unwrap();
    let mut term = Vec::new();
    let _ = s.read_to_end(&mut term);
    assert_eq!(term.first(), Some(&pdu::pdu_type::C2H_TERM_REQ), "{term:?}");
    assert_eq!(
        u16::from_le_bytes([term[8], term[9]]),
        pdu::fes::HEADER_DIGEST
    );
    let _ = status::DNR;
}

/// A generated PDU: mostly well-formed headers with one field broken, some pure noise.
fn generated_pdu(rng: &mut impl Rng, nqn: &str) -> Vec<u8> {
    let d = Digests::default();
    match rng.gen_range(0..10) {
        0 => {
            let n = rng.gen_range(1..300);
            (0..n).map(|_| rng.gen()).collect()
        }
        1 => {
            // A command capsule with random dwords.
            let mut c = NvmeCmd::new(rng.gen());
            for dw in c.dw.iter_mut() {
                *dw = rng.gen();
            }
            CapsuleCmd::new(c).encode(d).as_slice().to_vec()
        }
        2 => {
            // A read or write with a random range and length.
            let op = if rng.gen() { 1 } else { 2 };
            let mut c = NvmeCmd::new(op)
                .with_nsid(rng.gen_range(0..3))
                .with_cid(rng.gen());
            c.dw[10] = rng.gen_range(0..2000);
            c.dw[12] = rng.gen_range(0..64);
            let len = rng.gen_range(0..3) * 4096;
            let inline = rng.gen();
            let c = fabrics::with_sgl(c, len, inline);
            let data_len = if inline { len as usize } else { 0 };
            let mut v = CapsuleCmd::new(c)
                .with_data_len(data_len)
                .encode(d)
                .as_slice()
                .to_vec();
            v.resize(v.len() + data_len, 0xab);
            v
        }
        3 => {
            // H2CData nobody asked for.
            let h = DataPdu {
                cccid: rng.gen(),
                ttag: rng.gen(),
                offset: rng.gen_range(0..8192),
                len: 512,
                last: rng.gen(),
                success: false,
            }
            .encode_h2c(d);
            let mut v = h.as_slice().to_vec();
            v.resize(v.len() + 512, 1);
            v
        }
        4 => {
            // A valid-looking header with a broken length field.
            let mut v = CapsuleCmd::new(NvmeCmd::new(0x18))
                .encode(d)
                .as_slice()
                .to_vec();
            let at = rng.gen_range(1..8);
            v[at] = rng.gen();
            v
        }
        5 => {
            // A Connect with random connect data and parameters.
            let mut c = fabrics::connect(rng.gen_range(0..4), rng.gen_range(0..300), 0);
            c.dw[11] = rng.gen();
            let mut data = fabrics::ConnectData {
                hostid: [2; 16],
                cntlid: rng.gen(),
                subnqn: nqn.into(),
                hostnqn: "nqn.2014-08.org.nvmexpress:uuid:fuzz".into(),
            }
            .encode();
            for _ in 0..rng.gen_range(0..4) {
                let i = rng.gen_range(0..data.len());
                data[i] = rng.gen();
            }
            let mut v = CapsuleCmd::new(c)
                .with_data_len(1024)
                .encode(d)
                .as_slice()
                .to_vec();
            v.extend_from_slice(&data);
            v
        }
        6 => IcReq::new(Digests::default()).encode().to_vec(),
        7 => {
            // Property Get/Set of random offsets.
            let c = if rng.gen() {
                fabrics::property_get(rng.gen_range(0..64), rng.gen())
            } else {
                fabrics::property_set(rng.gen_range(0..64), rng.gen())
            };
            CapsuleCmd::new(c.with_cid(rng.gen()))
                .encode(d)
                .as_slice()
                .to_vec()
        }
        8 => {
            // Identify / Get Log Page / features with random fields.
            let mut c = NvmeCmd::new([0x02, 0x06, 0x09, 0x0a, 0x0c, 0x18][rng.gen_range(0..6)]);
            c.dw[1] = rng.gen_range(0..3);
            c.dw[10] = rng.gen();
            c.dw[11] = rng.gen();
            let c = fabrics::with_sgl(c, rng.gen_range(0..3) * 2048, false);
            CapsuleCmd::new(c.with_cid(rng.gen()))
                .encode(d)
                .as_slice()
                .to_vec()
        }
        _ => {
            // A terminate request or a PDU type the host never sends.
            let mut v = vec![0u8; 24];
            v[0] = rng.gen_range(0..12);
            v[2] = 24;
            v[4] = 24;
            v
        }
    }
}

#[test]
fn a_thousand_malformed_pdus_leave_the_target_serving_others() {
    let dir = TempDir::new("nvmf-fuzz");
    let (server, mut rpc, port, nqn) = target(dir.path());
    let opts = HostOptions::new("127.0.0.1", port, nqn);
    let ctrl = HostController::connect(opts).expect("connect");
    let mut good = ctrl.open_io_queue(1).expect("I/O queue");
    let pool = BufferPool::new(4096, 4).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut sent = 0usize;
    let mut conns = 0usize;
    while sent < 1200 {
        conns += 1;
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the target accepts");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut wire = Vec::new();
        // Most connections start properly (ICReq and an admin Connect) so the generated PDUs
        // reach the command parser; some start with garbage.
        if rng.gen_range(0..5) > 0 {
            wire.extend_from_slice(&IcReq::new(Digests::default()).encode());
            if rng.gen() {
                let data = fabrics::ConnectData {
                    hostid: [3; 16],
                    cntlid: fabrics::CNTLID_DYNAMIC,
                    subnqn: nqn.into(),
                    hostnqn: "nqn.2014-08.org.nvmexpress:uuid:fuzz".into(),
                }
                .encode();
                let c = fabrics::connect(0, 32, 0).with_cid(1);
                wire.extend_from_slice(
                    CapsuleCmd::new(c)
                        .with_data_len(1024)
                        .encode(Digests::default())
                        .as_slice(),
                );
                wire.extend_from_slice(&data);
                let en = fabrics::property_set(spec::REG_CC as u32, spec::cc_enable()).with_cid(2);
                wire.extend_from_slice(CapsuleCmd::new(en).encode(Digests::default()).as_slice());
            }
        }
        for _ in 0..rng.gen_range(5..20) {
            wire.extend(generated_pdu(&mut rng, nqn));
            sent += 1;
        }
        let _ = s.write_all(&wire);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        // The other connection is still served, with the right bytes.
        if conns.is_multiple_of(8) {
            let fill = (conns % 250) as u8 + 1;
            io(&mut good, &pool, IoOp::Write { fua: false }, 8192, fill);
            assert!(io(&mut good, &pool, IoOp::Read, 8192, 0)
                .iter()
                .all(|&b| b == fill));
        }
    }
    assert!(sent >= 1000);
    io(&mut good, &pool, IoOp::Write { fua: false }, 0, 0x42);
    assert!(io(&mut good, &pool, IoOp::Read, 0, 0)
        .iter()
        .all(|&b| b == 0x42));
    // The engine is up and answers RPCs; the fuzz connections are gone.
    assert!(wait_for(Duration::from_secs(10), || {
        let e = rpc.ok("nvmf_get_exports", json!({}));
        e.as_array()
            .unwrap()
            .iter()
            .map(|x| x["connections"].as_u64().unwrap())
            .sum::<u64>()
            <= 2
    }));
    assert!(server.pid() > 0);
}

/// Reads one whole PDU from a blocking socket.
fn read_pdu(s: &mut TcpStream) -> Vec<u8> {
    let mut pdu = vec![0u8; pdu::CH_LEN];
    s.read_exact(&mut pdu).expect("a PDU header");
    let plen = u32::from_le_bytes([pdu[4], pdu[5], pdu[6], pdu[7]]) as usize;
    pdu.resize(plen, 0);
    s.read_exact(&mut pdu[pdu::CH_LEN..])
        .expect("the rest of the PDU");
    pdu
}

/// (CID, status code, SQHD) of a response capsule.
fn resp_fields(p: &[u8]) -> (u16, u16, u16) {
    assert_eq!(
        p[0],
        pdu::pdu_type::CAPSULE_RESP,
        "a response capsule: {p:02x?}"
    );
    let dw3 = u32::from_le_bytes([p[20], p[21], p[22], p[23]]);
    let sqhd = u16::from_le_bytes([p[16], p[17]]);
    (dw3 as u16, ((dw3 >> 17) & 0x7ff) as u16, sqhd)
}

/// An I/O queue of controller `cntlid` on a raw socket, connected with `cattr`; the SQHD of
/// the Connect response.
fn raw_io_queue(opts: &HostOptions, cntlid: u16, qid: u16, cattr: u8) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(("127.0.0.1", opts.trsvcid)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&IcReq::new(Digests::default()).encode())
        .unwrap();
    let mut icresp = [0u8; 128];
    s.read_exact(&mut icresp).unwrap();
    let data = fabrics::ConnectData {
        hostid: fabrics::id_from_name(&opts.hostnqn),
        cntlid,
        subnqn: opts.subnqn.clone(),
        hostnqn: opts.hostnqn.clone(),
    }
    .encode();
    let c = fabrics::connect_with(qid, 32, 0, cattr).with_cid(1);
    let mut wire = CapsuleCmd::new(c)
        .with_data_len(data.len())
        .encode(Digests::default())
        .as_slice()
        .to_vec();
    wire.extend_from_slice(&data);
    s.write_all(&wire).unwrap();
    let (cid, sc, sqhd) = resp_fields(&read_pdu(&mut s));
    assert_eq!((cid, sc), (1, 0), "Connect succeeds");
    (s, sqhd)
}

fn send_cmd(s: &mut TcpStream, cmd: NvmeCmd, data: &[u8]) {
    let cmd = fabrics::sgl_command(cmd);
    let mut wire = CapsuleCmd::new(cmd)
        .with_data_len(data.len())
        .encode(Digests::default())
        .as_slice()
        .to_vec();
    wire.extend_from_slice(data);
    s.write_all(&wire).unwrap();
}

#[test]
fn reads_end_with_c2hdata_success_only_when_the_host_disables_sq_flow_control() {
    let dir = TempDir::new("nvmf-success");
    let (_server, _rpc, port, nqn) = target(dir.path());
    let opts = HostOptions::new("127.0.0.1", port, nqn);
    let ctrl = HostController::connect(opts.clone()).expect("connect");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let read3 = fabrics::with_sgl(NvmeCmd::read(1, 3, 1), 4096, false);
    for (qid, cattr) in [(50, fabrics::CATTR_DISABLE_SQ_FLOW), (51, 0)] {
        let disabled = cattr != 0;
        let (mut s, sqhd) = raw_io_queue(&opts, ctrl.cntlid(), qid, cattr);
        if disabled {
            assert_eq!(sqhd, fabrics::SQHD_DISABLED);
        } else {
            assert_eq!(sqhd, 1, "the Connect was the first entry");
        }
        // A write is still answered with a response capsule.
        let w = fabrics::with_sgl(NvmeCmd::write(1, 3, 1, false), 4096, true);
        send_cmd(&mut s, w.with_cid(7), &pattern);
        let (cid, sc, _) = resp_fields(&read_pdu(&mut s));
        assert_eq!((cid, sc), (7, 0));
        // The read's data comes in one C2HData PDU with LAST_PDU; SUCCESS only when asked for.
        send_cmd(&mut s, read3.with_cid(8), &[]);
        let p = read_pdu(&mut s);
        assert_eq!(p[0], pdu::pdu_type::C2H_DATA);
        let want_flags = if disabled {
            pdu::flags::LAST_PDU | pdu::flags::SUCCESS
        } else {
            pdu::flags::LAST_PDU
        };
        assert_eq!(p[1], want_flags, "C2HData flags");
        assert_eq!(u16::from_le_bytes([p[8], p[9]]), 8, "CCCID");
        let pdo = p[3] as usize;
        assert_eq!(&p[pdo..], &pattern[..], "the read's data");
        if !disabled {
            let (cid, sc, _) = resp_fields(&read_pdu(&mut s));
            assert_eq!((cid, sc), (8, 0), "the response capsule follows the data");
        }
        // The next PDU answers the next command: no response capsule was sent for the read.
        send_cmd(&mut s, NvmeCmd::flush(1).with_cid(9), &[]);
        let (cid, sc, _) = resp_fields(&read_pdu(&mut s));
        assert_eq!((cid, sc), (9, 0));
        // A failed read still gets a response capsule with its status, and no data.
        let past_end = fabrics::with_sgl(NvmeCmd::read(1, 1024, 1), 4096, false);
        send_cmd(&mut s, past_end.with_cid(10), &[]);
        let (cid, sc, _) = resp_fields(&read_pdu(&mut s));
        assert_eq!((cid, sc), (10, 0x80), "LBA out of range");
    }
    // The initiator's I/O queues ask for SQ flow control to be disabled, so their reads end
    // with SUCCESS; many reads in flight at once all get their own exact bytes.
    let pool = BufferPool::new(4096, 64).unwrap();
    let mut q = ctrl.open_io_queue(1).expect("I/O queue");
    let fill = |blk: u64, i: usize| (blk as usize * 31 + i * 13 + 1) as u8;
    let mut out = Vec::new();
    for (write, blocks) in [(true, 0..32u64), (false, 0..32u64)] {
        for blk in blocks {
            let mut b = pool.get().expect("buffer");
            if write {
                for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
                    *x = fill(blk, i);
                }
            } else {
                b.as_mut_slice().fill(0);
            }
            let mut bufs = IoBufs::new();
            bufs.push(b);
            let op = if write {
                IoOp::Write { fua: false }
            } else {
                IoOp::Read
            };
            q.submit(op, 8 * 4096 + blk * 4096, 4096, bufs, blk)
                .map_err(|_| "submit refused")
                .unwrap();
        }
        let end = Instant::now() + Duration::from_secs(10);
        out.clear();
        while out.len() < 32 {
            q.poll(&mut out);
            assert!(Instant::now() < end, "I/O did not complete");
        }
        for d in out.drain(..) {
            d.result.as_ref().expect("I/O succeeded");
            if !write {
                let got = d.bufs[0].as_slice();
                assert!(
                    got.iter().enumerate().all(|(i, &x)| x == fill(d.tag, i)),
                    "block {} read back other bytes",
                    d.tag
                );
            }
        }
    }
    assert!(q.failure().is_none());
    assert_eq!(q.in_flight(), 0);
}

/// A RAM disk's reads are sent from its memory. When the socket is full they wait there, and
/// the blocks must not change under them: a read returns what the blocks held when it ran,
/// even if a write to them completes before the read's data is sent.
#[test]
fn a_ram_disk_read_waiting_for_the_socket_keeps_the_blocks_as_they_were() {
    let dir = TempDir::new("nvmf-in-place");
    let (_server, mut rpc, port, _) = target(dir.path());
    let nqn = "nqn.2026-11.io.quicksplit:big";
    export_ram_disk(&mut rpc, port, nqn, "big", 32 * MIB);
    let opts = HostOptions::new("127.0.0.1", port, nqn);
    let ctrl = HostController::connect(opts.clone()).expect("connect");
    let (mut s, _) = raw_io_queue(&opts, ctrl.cntlid(), 1, 0);
    let read = |lba: u64| fabrics::with_sgl(NvmeCmd::read(1, lba, 32), 32 * 4096, false);
    // 12 MiB of reads the host does not take yet fill the socket's buffers on both ends.
    let first: Vec<u64> = (0..96u64).map(|i| i * 32).collect();
    for (i, &lba) in first.iter().enumerate() {
        send_cmd(&mut s, read(lba).with_cid(100 + i as u16), &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    // These run now, with nowhere to send their data but the connection's queue.
    let second: Vec<u64> = (0..8u64).map(|i| 4096 + i * 32).collect();
    for (i, &lba) in second.iter().enumerate() {
        send_cmd(&mut s, read(lba).with_cid(300 + i as u16), &[]);
    }
    std::thread::sleep(Duration::from_millis(300));
    // Another queue overwrites the blocks of the waiting reads, 4 KiB in-capsule writes.
    let (mut w, _) = SyncQueue::connect(&opts, 2, 32, ctrl.cntlid(), 0).expect("I/O queue");
    for &lba in &second {
        for b in 0..32u64 {
            let fill = if b < 16 { 0xaa } else { 0xbb };
            let cmd = fabrics::with_sgl(NvmeCmd::write(1, lba + b, 1, false), 4096, true);
            assert_eq!(
                status_of(w.command("write", cmd, &[fill; 4096], 0)),
                0,
                "write of block {}",
                lba + b
            );
        }
    }
    // Now take every reply: the reads ran before the writes, so all of them read zeroes.
    let mut data: std::collections::HashMap<u16, Vec<u8>> = Default::default();
    let mut answered = 0;
    while answered < first.len() + second.len() {
        let p = read_pdu(&mut s);
        if p[0] == pdu::pdu_type::C2H_DATA {
            let cid = u16::from_le_bytes([p[8], p[9]]);
            let pdo = p[3] as usize;
            data.entry(cid).or_default().extend_from_slice(&p[pdo..]);
        } else {
            let (cid, sc, _) = resp_fields(&p);
            assert_eq!(sc, 0, "read {cid} succeeds");
            answered += 1;
        }
    }
    for cid in (100..196).chain(300..308) {
        let got = data.get(&cid).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(got.len(), 32 * 4096, "read {cid} returned all its data");
        assert!(
            got.iter().all(|&b| b == 0),
            "read {cid} returned bytes written after it ran"
        );
    }
    // And the writes are there for reads that run after them.
    for &lba in &second {
        for b in 0..32u64 {
            let cmd = fabrics::with_sgl(NvmeCmd::read(1, lba + b, 1), 4096, false);
            let (_, back) = w.command("read", cmd, &[], 4096).expect("read");
            let fill = if b < 16 { 0xaa } else { 0xbb };
            assert!(back.iter().all(|&x| x == fill), "block {}", lba + b);
        }
    }
}

/// Attaching this engine's own export as an NVMe/TCP bdev is refused: it would be a second name
/// for one of its bdevs, and a restart would replay the attach before the export listens.
#[test]
fn attaching_the_engines_own_export_is_refused() {
    let dir = TempDir::new("nvmf-own");
    let (_server, mut rpc, port, nqn) = target(dir.path());
    let (code, msg) = rpc.err(
        "bdev_nvme_attach_controller",
        json!({"name": "self", "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port,
               "subnqn": nqn}),
    );
    assert_eq!(code, -32002, "{msg}");
    assert!(msg.contains("own NVMe/TCP export"), "{msg}");
    assert_eq!(
        rpc.ok("bdev_get_bdevs", json!({}))
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// A pair whose image, or whose primary, is exported over NVMe/TCP is not deleted under its
/// hosts: `pair_delete` answers a conflict until the export stops.
#[test]
fn a_pair_exported_over_nvmf_is_not_deleted() {
    const CONFLICT: i64 = -32002;
    let dir = TempDir::new("nvmf-pair-delete");
    let (_server, sock) = start_empty(dir.path());
    let mut c = RpcConn::connect(&sock);
    c.ok("bdev_malloc_create", json!({"name": "p", "size": MIB}));
    c.ok("bdev_malloc_create", json!({"name": "s", "size": MIB}));
    c.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "s"}),
    );
    let listen = format!("127.0.0.1:{}", quicksplit_tests::free_port());
    for (nqn, what) in [
        ("nqn.2026-11.io.quicksplit:image", json!({"pair": "pr"})),
        ("nqn.2026-11.io.quicksplit:primary", json!({"bdev": "p"})),
    ] {
        let mut params = json!({"nqn": nqn, "listen": listen});
        params
            .as_object_mut()
            .unwrap()
            .extend(what.as_object().unwrap().clone());
        c.ok("nvmf_export_start", params);
        let (code, msg) = c.err("pair_delete", json!({"name": "pr"}));
        assert_eq!(code, CONFLICT, "{msg}");
        assert!(msg.contains(nqn), "{msg}");
        c.ok("nvmf_export_stop", json!({"nqn": nqn}));
    }
    assert_eq!(c.ok("pair_delete", json!({"name": "pr"})), json!(true));
}

#[test]
fn trsvcid_as_a_number_or_a_string() {
    const PARAMS: i64 = -32602;
    let dir = TempDir::new("nvmf-trsvcid");
    for side in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(side)).expect("directory");
    }
    let (_server, sock) = start_empty(&dir.path().join("a"));
    let mut a = RpcConn::connect(&sock);
    a.ok("bdev_malloc_create", json!({"name": "m", "size": 4 * MIB}));
    let port = quicksplit_tests::free_port();
    let nqn = "nqn.2026-11.io.quicksplit:trsvcid";
    a.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": "m", "listen": {"trtype": "TCP", "adrfam": "IPv4",
               "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    assert_eq!(
        a.ok("nvmf_get_exports", json!({}))[0]["listen"],
        format!("127.0.0.1:{port}")
    );
    let (_other, sock) = start_empty(&dir.path().join("b"));
    let mut b = RpcConn::connect(&sock);
    for (name, trsvcid) in [("s", json!(port.to_string())), ("n", json!(port))] {
        let bdevs = b.ok(
            "bdev_nvme_attach_controller",
            json!({"name": name, "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": trsvcid,
                   "subnqn": nqn}),
        );
        assert_eq!(bdevs, json!([format!("{name}n1")]));
        b.ok("bdev_nvme_detach_controller", json!({"name": name}));
    }
    for bad in ["abc", "70000", "0", ""] {
        let (code, msg) = b.err(
            "bdev_nvme_attach_controller",
            json!({"name": "x", "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": bad,
                   "subnqn": nqn}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(
            msg.contains("trsvcid") && msg.contains("not a port number from 1 to 65535"),
            "{bad}: {msg}"
        );
        let (code, msg) = b.err(
            "backup_start",
            json!({"pair": "none", "target": {"type": "nvmf", "traddr": "127.0.0.1",
                   "trsvcid": bad, "subnqn": nqn}}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(msg.contains("not a port number"), "{bad}: {msg}");
        let (code, msg) = a.err(
            "nvmf_export_start",
            json!({"nqn": "nqn.2026-11.io.quicksplit:bad", "bdev": "m",
                   "listen": {"traddr": "127.0.0.1", "trsvcid": bad}}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(
            msg.contains("trsvcid") && msg.contains("not a port"),
            "{msg}"
        );
        let (code, msg) = a.err(
            "nvmf_export_start",
            json!({"nqn": "nqn.2026-11.io.quicksplit:bad", "bdev": "m",
                   "listen": format!("127.0.0.1:{bad}")}),
        );
        assert_eq!(code, PARAMS, "{msg}");
        assert!(
            msg.contains("listen") && msg.contains("not a port"),
            "{msg}"
        );
    }
    assert_eq!(b.ok("bdev_get_bdevs", json!({})), json!([]));
    assert_eq!(
        a.ok("nvmf_get_exports", json!({})).as_array().map(Vec::len),
        Some(1)
    );

    // A backup to the export with the port as a string runs to its end.
    b.ok("bdev_malloc_create", json!({"name": "p", "size": 4 * MIB}));
    b.ok("bdev_malloc_create", json!({"name": "q", "size": 4 * MIB}));
    b.ok(
        "pair_create",
        json!({"name": "pr", "primary": "p", "secondary": "q"}),
    );
    assert!(wait_for(Duration::from_secs(20), || {
        b.ok("pair_get", json!({"name": "pr"}))[0]["state"] == "PAIR"
    }));
    b.ok("pair_split", json!({"name": "pr"}));
    let id = b.ok(
        "backup_start",
        json!({"pair": "pr", "target": {"type": "nvmf", "traddr": "127.0.0.1",
               "trsvcid": port.to_string(), "subnqn": nqn}}),
    )["id"]
        .as_u64()
        .expect("id");
    let done = quicksplit_tests::wait_backup(&mut b, id, Duration::from_secs(60));
    assert_eq!(done["state"], "done", "{done}");
}
