//! The NVMe/TCP target: the image written to a namespace of an NVMe/TCP subsystem (another
//! quicksplit's `nvmf_export_start`, or the Linux kernel's nvmet). The controller is connected
//! with blocking I/O on the control thread that starts the backup; the I/O queue then runs on
//! the reactor over its non-blocking socket. Each write goes out with vectored sends straight
//! from the backup's DMA buffers (in the capsule when it fits, else on the target's R2T): no
//! payload byte is copied by the CPU. The backup ends with a Flush.

use std::sync::Arc;
use std::time::Duration;

use super::{Sink, SinkDone, SinkFull};
use crate::nvmf::host::{Done, HostController, HostOptions, IoQueue, Refused};
use crate::tape::Manifest;
use crate::{IoBufs, IoError, IoOp};

/// Tag of the final flush.
const FLUSH_TAG: u64 = u64::MAX;

/// Where an `nvmf` backup goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmfTarget {
    /// Target address.
    pub traddr: String,
    /// Port (4420).
    pub trsvcid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Namespace (1).
    pub nsid: u32,
    /// Host NQN (default: this host's).
    pub hostnqn: Option<String>,
    /// DH-HMAC-CHAP keys, when the target asks the host to authenticate.
    pub dhchap: Option<Arc<crate::nvmf::auth::HostKeys>>,
}

impl NvmfTarget {
    fn describe(&self) -> String {
        format!(
            "NVMe/TCP {}:{} {} namespace {}",
            self.traddr, self.trsvcid, self.subnqn, self.nsid
        )
    }
}

/// A connected controller and I/O queue, made on a control thread.
pub struct NvmfConnection {
    ctrl: Arc<HostController>,
    queue: IoQueue,
    target: NvmfTarget,
}

impl NvmfConnection {
    /// True when the controller takes Write Zeroes (ONCS bit 3).
    pub fn writes_zeroes(&self) -> bool {
        self.ctrl.identify().supports_write_zeroes()
    }

    /// Connects the controller and an I/O queue to the namespace (blocking, with timeouts).
    pub fn connect(target: &NvmfTarget) -> Result<Self, String> {
        let mut opts = HostOptions::new(&target.traddr, target.trsvcid, &target.subnqn);
        if let Some(h) = &target.hostnqn {
            opts.hostnqn = h.clone();
        }
        opts.dhchap = target.dhchap.clone();
        opts.queue_depth = 64;
        opts.io_timeout = Duration::from_secs(30);
        let what = target.describe();
        let ctrl = HostController::connect(opts).map_err(|e| format!("{what}: {e}"))?;
        let queue = ctrl
            .open_io_queue(target.nsid)
            .map_err(|e| format!("{what}: {e}"))?;
        Ok(Self {
            ctrl,
            queue,
            target: target.clone(),
        })
    }

    /// Checks that the namespace can take an image of `size` bytes in blocks of `block_size`.
    pub fn check(&self, size: u64, block_size: u32) -> Result<(), String> {
        let ns = self.queue.namespace();
        let what = self.target.describe();
        if ns.blocks * (ns.block_size as u64) < size {
            return Err(format!(
                "{what}: the namespace holds {} bytes, the image needs {size}",
                ns.blocks * ns.block_size as u64
            ));
        }
        if !(block_size as u64).is_multiple_of(ns.block_size as u64) {
            return Err(format!(
                "{what}: namespace block size {} does not divide the image's {block_size}",
                ns.block_size
            ));
        }
        if ns.read_only {
            return Err(format!("{what}: the namespace is write protected"));
        }
        Ok(())
    }
}

/// The NVMe/TCP backup target.
pub struct NvmfSink {
    conn: NvmfConnection,
    done: Vec<Done>,
    failed: Option<IoError>,
    flushing: bool,
    finished: Option<Result<(), IoError>>,
    lens: std::collections::HashMap<u64, u64>,
}

impl NvmfSink {
    /// Takes a connection for an image of `size` bytes in blocks of `block_size`.
    pub fn new(conn: NvmfConnection, size: u64, block_size: u32) -> Result<Self, String> {
        conn.check(size, block_size)?;
        Ok(Self {
            conn,
            done: Vec::new(),
            failed: None,
            flushing: false,
            finished: None,
            lens: std::collections::HashMap::new(),
        })
    }

    /// The controller (kept alive while the sink lives).
    pub fn controller(&self) -> &Arc<HostController> {
        &self.conn.ctrl
    }
}

impl Sink for NvmfSink {
    fn submit(&mut self, offset: u64, bufs: IoBufs) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), bufs));
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        match self
            .conn
            .queue
            .submit(IoOp::Write { fua: false }, offset, len, bufs, offset)
        {
            Ok(()) => {
                self.lens.insert(offset, len);
                Ok(())
            }
            Err(Refused::Full(bufs)) => Err(SinkFull::Busy(bufs)),
            Err(Refused::Failed(e, bufs)) => {
                self.failed = Some(e.clone());
                Err(SinkFull::Failed(e, bufs))
            }
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), SinkFull> {
        if let Some(e) = &self.failed {
            return Err(SinkFull::Failed(e.clone(), IoBufs::new()));
        }
        match self.conn.queue.submit(
            IoOp::WriteZeroes { deallocate: true },
            offset,
            len,
            IoBufs::new(),
            offset,
        ) {
            Ok(()) => {
                self.lens.insert(offset, 0);
                Ok(())
            }
            Err(Refused::Full(bufs)) => Err(SinkFull::Busy(bufs)),
            Err(Refused::Failed(e, bufs)) => {
                self.failed = Some(e.clone());
                Err(SinkFull::Failed(e, bufs))
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<SinkDone>) {
        self.conn.queue.poll(&mut self.done);
        for d in self.done.drain(..) {
            if d.tag == FLUSH_TAG && self.flushing {
                self.finished = Some(d.result);
                continue;
            }
            if let Err(e) = &d.result {
                self.failed.get_or_insert(e.clone());
            }
            out.push(SinkDone {
                offset: d.tag,
                len: self.lens.remove(&d.tag).unwrap_or(0),
                bufs: d.bufs,
                result: d.result,
            });
        }
    }

    fn in_flight(&self) -> usize {
        self.lens.len()
    }

    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.conn.queue.socket())
    }

    fn finish(&mut self, _manifest: &Manifest) -> Result<(), IoError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.flushing {
            self.flushing = true;
            match self
                .conn
                .queue
                .submit(IoOp::Flush, 0, 0, IoBufs::new(), FLUSH_TAG)
            {
                Ok(()) => {}
                Err(Refused::Full(_)) => {
                    return Err(IoError::Aborted(
                        "no free command slot for the final flush".into(),
                    ))
                }
                Err(Refused::Failed(e, _)) => return Err(e),
            }
        }
        Ok(())
    }

    fn finished(&mut self) -> Option<Result<(), IoError>> {
        self.finished.clone()
    }

    fn describe(&self) -> String {
        self.conn.target.describe()
    }

    fn abandon(&mut self) {
        // Dropping the queue and the controller closes the connections; the namespace keeps
        // what was written, and the backup is reported failed or cancelled.
    }
}
