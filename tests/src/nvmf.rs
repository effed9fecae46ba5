//! Helpers for the NVMe/TCP tests: I/O through quicksplit's initiator.

use std::sync::Arc;
use std::time::Duration;

use drivers::nvmf::host::HostController;
use drivers::{IoBufs, IoOp};
use hugepages::BufferPool;

use crate::wait_for;

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
