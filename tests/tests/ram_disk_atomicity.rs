//! A RAM disk's blocks are read and written whole: a read through an export returns each block
//! as it was entirely before or entirely after a concurrent write of it (NVMe's single-block
//! atomicity), also when the read is sent from the RAM disk's memory in place.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicksplit_tests::nbd::{self, NbdClient};
use quicksplit_tests::{start_empty, RpcConn, TempDir};
use serde_json::json;

const BLOCK: usize = 4096;
/// Blocks the writer and the reader fight over.
const BLOCKS: usize = 16;
const SPAN: u32 = (BLOCK * BLOCKS) as u32;
/// Writes the writer keeps in flight.
const DEPTH: usize = 8;
/// Reads the reader keeps in flight: their replies fit in the socket's buffer, so the reactor
/// never waits for the reader to make room.
const READ_DEPTH: usize = 2;
const RUN: Duration = Duration::from_secs(4);

/// `BLOCKS` blocks, block `i` filled with the stamp `round * BLOCKS + i` (8 bytes, repeated).
fn stamped(round: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(SPAN as usize);
    for i in 0..BLOCKS as u64 {
        let stamp = (round * BLOCKS as u64 + i).to_le_bytes();
        for _ in 0..BLOCK / 8 {
            data.extend_from_slice(&stamp);
        }
    }
    data
}

/// The blocks of `data` that hold more than one stamp.
fn torn_blocks(data: &[u8]) -> Vec<usize> {
    data.chunks_exact(BLOCK)
        .enumerate()
        .filter(|(_, b)| b.chunks_exact(8).any(|w| w != &b[..8]))
        .map(|(i, _)| i)
        .collect()
}

/// One writer connection rewrites 16 blocks in a loop while another reads them; the two
/// connections run on the engine's two reactors, and the RAM disk serves the reads in place.
#[test]
fn a_ram_disk_read_never_returns_a_block_torn_by_a_concurrent_write() {
    let dir = TempDir::new("ram-atomic");
    let (_server, sock) = start_empty(dir.path());
    let mut rpc = RpcConn::connect(&sock);
    let nbd_sock = dir.path().join("nbd.sock");
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 1 << 20}));
    rpc.ok(
        "nbd_export_start",
        json!({"name": "m", "bdev": "m", "socket": nbd_sock}),
    );
    let mut writer = NbdClient::connect(&nbd_sock, "m").expect("writer connects");
    writer.write(0, &stamped(0)).expect("first write");
    // Connections are placed on the reactors in turn: these two run on different ones.
    let mut reader = NbdClient::connect(&nbd_sock, "m").expect("reader connects");

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writing = {
        let (stop, writes) = (Arc::clone(&stop), Arc::clone(&writes));
        std::thread::spawn(move || {
            let mut round = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..DEPTH {
                    writer.send(nbd::WRITE, 0, 0, SPAN, &stamped(round));
                    round += 1;
                }
                for _ in 0..DEPTH {
                    let (_, err, _) = writer.recv(0).expect("write reply");
                    assert_eq!(err, 0, "write failed");
                }
                writes.fetch_add(DEPTH as u64, Ordering::Relaxed);
            }
        })
    };

    let started = Instant::now();
    let (mut reads, mut torn_reads, mut torn) = (0u64, 0u64, Vec::new());
    while started.elapsed() < RUN {
        for _ in 0..READ_DEPTH {
            reader.send(nbd::READ, 0, 0, SPAN, &[]);
        }
        for _ in 0..READ_DEPTH {
            let (cookie, err, data) = reader.recv(SPAN as usize).expect("read reply");
            assert_eq!(err, 0, "read {cookie} failed");
            let blocks = torn_blocks(&data);
            if !blocks.is_empty() {
                torn_reads += 1;
                if torn.len() < 10 {
                    torn.push((cookie, blocks));
                }
            }
            reads += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writing.join().expect("writer thread");
    let writes = writes.load(Ordering::Relaxed);
    assert!(
        torn_reads == 0,
        "{torn_reads} of {reads} reads (against {writes} writes) returned torn blocks, \
         the first (cookie, blocks): {torn:?}"
    );
    assert!(
        reads > 200 && writes > 200,
        "too little contention to show anything: {reads} reads, {writes} writes"
    );
}
