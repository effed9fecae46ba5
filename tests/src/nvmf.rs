//! Helpers for the NVMe/TCP tests: I/O through quicksplit's initiator.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drivers::nvmf::host::HostController;
use drivers::{IoBufs, IoOp};
use hugepages::BufferPool;
use serde_json::json;

use crate::{free_port, start_empty, wait_for, RpcConn, Server};

/// One buffer of `pool`, every byte `fill`.
pub fn filled_buffer(pool: &BufferPool, fill: u8) -> IoBufs {
    let mut b = pool.get().expect("buffer");
    b.as_mut_slice().fill(fill);
    let mut bufs = IoBufs::new();
    bufs.push(b);
    bufs
}

/// Writes `fill` at `offset` and reads it back through an I/O queue of `ctrl`.
pub fn write_read(ctrl: &Arc<HostController>, pool: &BufferPool, offset: u64, fill: u8) {
    let mut q = ctrl.open_io_queue(1).expect("I/O queue");
    for op in [IoOp::Write { fua: false }, IoOp::Read] {
        let read = matches!(op, IoOp::Read);
        let bufs = filled_buffer(pool, if read { 0 } else { fill });
        q.submit(op, offset, pool.buf_size() as u64, bufs, 1)
            .map_err(|_| "submit refused")
            .unwrap();
        let mut out = Vec::new();
        assert!(
            wait_for(Duration::from_secs(10), || {
                q.poll(&mut out);
                !out.is_empty()
            }),
            "I/O did not complete"
        );
        let d = out.pop().unwrap();
        d.result.expect("I/O failed");
        if read {
            assert!(d.bufs[0].as_slice().iter().all(|&b| b == fill));
        }
    }
}

/// A quicksplit exporting over NVMe/TCP on a free port of 127.0.0.1: a writable 4 MiB RAM disk
/// `m` as the subsystem it gives, and a read-only one `ro` as `nqn.2026-11.io.quicksplit:ro`.
/// Gives the server, an RPC connection to it, the port and the first subsystem's NQN.
pub fn target(dir: &Path) -> (Server, RpcConn, u16, &'static str) {
    let (server, sock) = start_empty(dir);
    let mut rpc = RpcConn::connect(&sock);
    let port = free_port();
    let nqn = "nqn.2026-11.io.quicksplit:proto";
    rpc.ok("bdev_malloc_create", json!({"name": "m", "size": 4 << 20}));
    rpc.ok("bdev_malloc_create", json!({"name": "ro", "size": 4 << 20}));
    rpc.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": "m", "listen": format!("127.0.0.1:{port}")}),
    );
    rpc.ok(
        "nvmf_export_start",
        json!({"nqn": "nqn.2026-11.io.quicksplit:ro", "bdev": "ro", "writable": false,
               "listen": format!("127.0.0.1:{port}")}),
    );
    (server, rpc, port, nqn)
}

/// Exports a new RAM disk `name` of `size` bytes on the target answering on `rpc`, as `nqn` on
/// `port` of 127.0.0.1.
pub fn export_ram_disk(rpc: &mut RpcConn, port: u16, nqn: &str, name: &str, size: u64) {
    rpc.ok("bdev_malloc_create", json!({"name": name, "size": size}));
    rpc.ok(
        "nvmf_export_start",
        json!({"nqn": nqn, "bdev": name, "listen": format!("127.0.0.1:{port}")}),
    );
}
