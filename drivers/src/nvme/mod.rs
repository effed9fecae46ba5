//! The nvme bdev: NVMe namespaces driven from user space through VFIO, polled from the
//! reactors like SPDK's driver.
//!
//! - [`vfio`] opens the PCI device (container, group, device), maps BAR0 and maps every DMA
//!   region into the IOMMU with IOVA = address (the hugepages crate's mapper hook).
//! - [`controller`] resets and enables the controller, runs the admin queue, identifies the
//!   controller and its namespaces and asks for I/O queues; it also recovers from a fatal status.
//! - Each namespace is a [`NvmeBdev`]; opening a channel on a reactor creates that reactor's own
//!   I/O queue pair ([`NvmeChannel`]), so the data path takes no lock. Requests become one or
//!   more commands (cut at the transfer limit) with PRP lists, or SGLs for buffers that are not
//!   page-shaped; completions are found by their phase tag. A command that outlives its timeout
//!   is aborted, and if the abort does not end it the controller is reset.
//! - When the reactor may park (`--idle adaptive`), the queue's MSI-X vector signals the
//!   reactor's eventfd, so completions wake it; otherwise the queue is purely polled.
//!
//! Register access goes through the [`Device`] trait, so everything above VFIO runs in host
//! tests against a controller model.

pub mod controller;
pub mod datapath;
mod dma;
pub mod queue;
pub mod rpc;
pub mod spec;
pub mod vfio;

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hugepages::BufferPool;
use slab::Slab;

use crate::bdev::{
    invalid, queue_full, Bdev, BdevError, ChannelContext, Geometry, IoBufs, IoChannel,
    IoCompletion, IoError, IoOp, IoRequest, SubmitResult,
};
pub use controller::{Controller, ControllerOptions, Namespace};
use dma::DeviceMemory;
pub use queue::Device;
use queue::QueuePair;
use spec::{Command, Status, PAGE_SIZE};

/// Errors of the NVMe driver.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The OS refused a call.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The device is not set up for VFIO (the message says what to do).
    #[error("{0}")]
    Setup(String),
    /// The controller did not answer in time.
    #[error("timed out after {limit:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// CSTS.CFS is set.
    #[error("the controller reports a fatal status (CSTS.CFS)")]
    Fatal,
    /// Registers read as all ones: the device is gone.
    #[error("the device no longer answers")]
    Gone,
    /// A reset failed earlier: the controller is cut off.
    #[error("the controller failed and could not be reset")]
    Failed,
    /// A command completed with an error status.
    #[error("command {opcode:#04x} failed: {status}")]
    Command {
        /// The opcode.
        opcode: u8,
        /// The status.
        status: Status,
    },
    /// Every I/O queue is in use.
    #[error("no I/O queue left on the controller")]
    NoQueues,
    /// Something the driver does not support.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// DMA memory could not be had or mapped.
    #[error(transparent)]
    Dma(#[from] hugepages::DmaError),
}

impl From<NvmeError> for BdevError {
    fn from(e: NvmeError) -> Self {
        match e {
            NvmeError::Os { what, source } => BdevError::Io { what, source },
            NvmeError::Setup(m) => BdevError::Unavailable(m),
            NvmeError::Dma(d) => BdevError::Dma(d),
            other => BdevError::io("nvme", std::io::Error::other(other.to_string())),
        }
    }
}

/// One namespace of a controller as a bdev, named `<controller>n<nsid>`.
#[derive(Debug)]
pub struct NvmeBdev {
    name: String,
    ctrl: Arc<Controller>,
    ns: Namespace,
    /// The attach call that recreates the controller, kept by its first namespace only.
    attach_config: Option<serde_json::Value>,
}

impl NvmeBdev {
    /// The bdevs of every namespace of `ctrl`; the first one records `attach_config`.
    pub fn for_namespaces(
        ctrl: &Arc<Controller>,
        namespaces: &[Namespace],
        attach_config: serde_json::Value,
    ) -> Vec<NvmeBdev> {
        namespaces
            .iter()
            .enumerate()
            .map(|(i, ns)| NvmeBdev {
                name: format!("{}n{}", ctrl.name(), ns.nsid),
                ctrl: Arc::clone(ctrl),
                ns: *ns,
                attach_config: (i == 0).then(|| attach_config.clone()),
            })
            .collect()
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }

    /// The namespace.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    /// Opens this reactor's queue pair with the concrete type (tests use its extra calls).
    pub fn open_nvme_channel(&self, ctx: &ChannelContext) -> Result<NvmeChannel, NvmeError> {
        NvmeChannel::open(Arc::clone(&self.ctrl), self.ns, ctx)
    }
}

impl Bdev for NvmeBdev {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &'static str {
        "nvme"
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            block_size: self.ns.block_size,
            num_blocks: self.ns.num_blocks,
        }
    }

    fn open_channel(&self, ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(self.open_nvme_channel(ctx)?))
    }

    fn config(&self) -> serde_json::Value {
        self.attach_config
            .clone()
            .unwrap_or(serde_json::Value::Null)
    }
}

/// A request in flight: its buffers, how many of its commands are still out, its first error.
struct Pending {
    tag: u64,
    bufs: IoBufs,
    commands_left: u32,
    error: Option<IoError>,
}

/// What a command's data pointer describes.
enum Payload {
    /// Nothing.
    None,
    /// Data buffers.
    Data(datapath::Segments),
    /// One deallocate range, written into the command's list page.
    Range {
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u32,
    },
}

/// A command in flight, by command id.
struct Slot {
    request: usize,
    deadline: Instant,
    abort_sent: bool,
}

/// How often a channel with commands in flight looks at timeouts and the controller status.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// A reactor's I/O queue pair on one namespace.
pub struct NvmeChannel {
    ctrl: Arc<Controller>,
    ns: Namespace,
    geometry: Geometry,
    queue: QueuePair,
    /// One list page per command id, for PRP lists, SGL segments and deallocate ranges.
    lists: Vec<DeviceMemory>,
    _list_pool: BufferPool,
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    requests: Slab<Pending>,
    ready: Vec<IoCompletion>,
    generation: u64,
    live: bool,
    vector: Option<u16>,
    next_check: Instant,
    max_transfer: u64,
}

impl NvmeChannel {
    fn open(ctrl: Arc<Controller>, ns: Namespace, ctx: &ChannelContext) -> Result<Self, NvmeError> {
        if ctrl.failed() {
            return Err(NvmeError::Failed);
        }
        let qid = ctrl.take_queue_id()?;
        let made = Self::build(&ctrl, ns, qid, ctx);
        if made.is_err() {
            ctrl.release_queue_id(qid);
        }
        made
    }

    fn build(
        ctrl: &Arc<Controller>,
        ns: Namespace,
        qid: u16,
        ctx: &ChannelContext,
    ) -> Result<Self, NvmeError> {
        let entries = ctrl.io_queue_entries();
        let queue = QueuePair::new(Arc::clone(ctrl.device()), ctrl.capabilities(), qid, entries)?;
        let commands = entries as usize - 1;
        let list_pool = BufferPool::new(PAGE_SIZE, commands)?;
        let lists: Vec<DeviceMemory> =
            std::iter::from_fn(|| list_pool.get().map(DeviceMemory::new))
                .take(commands)
                .collect();
        let vector = match ctx.wake_fd {
            Some(fd) if ctrl.device().interrupt_vectors() > qid => {
                match ctrl.device().route_interrupt(qid, Some(fd)) {
                    Ok(()) => Some(qid),
                    Err(e) => {
                        tracing::info!(%e, qid, "no interrupt for this queue: polled only");
                        None
                    }
                }
            }
            _ => None,
        };
        let generation = ctrl.generation();
        if let Err(e) = ctrl.create_io_queue(&queue, vector) {
            if let Some(v) = vector {
                let _ = ctrl.device().route_interrupt(v, None);
            }
            return Err(e);
        }
        tracing::debug!(
            controller = ctrl.name(),
            qid,
            entries,
            interrupt = vector.is_some(),
            "I/O queue pair created"
        );
        Ok(Self {
            geometry: Geometry {
                block_size: ns.block_size,
                num_blocks: ns.num_blocks,
            },
            max_transfer: ctrl.max_transfer() / ns.block_size as u64 * ns.block_size as u64,
            ctrl: Arc::clone(ctrl),
            ns,
            queue,
            lists,
            _list_pool: list_pool,
            slots: (0..commands).map(|_| None).collect(),
            free: (0..commands as u16).rev().collect(),
            requests: Slab::with_capacity(commands),
            ready: Vec::new(),
            generation,
            live: true,
            vector,
            next_check: Instant::now() + CHECK_EVERY,
        })
    }

    /// The queue id of this channel's queue pair.
    pub fn queue_id(&self) -> u16 {
        self.queue.qid
    }

    /// Submits without checking the request against the namespace's size, so the controller's
    /// own checks can be exercised (an LBA beyond the namespace completes with an error).
    pub fn submit_unchecked(&mut self, req: IoRequest) -> SubmitResult {
        self.submit_commands(req)
    }

    fn io_error(&self, why: impl Into<String>) -> IoError {
        IoError::Aborted(format!("{}: {}", self.ctrl.name(), why.into()))
    }

    /// The commands of a request, each with what its data pointer must describe.
    fn plan(&self, req: &IoRequest) -> Result<Vec<(Command, Payload)>, IoError> {
        let bs = self.ns.block_size as u64;
        let nsid = self.ns.nsid;
        let ident = self.ctrl.identify();
        let lba = |off: u64| off / bs;
        let mut out = Vec::new();
        match req.op {
            IoOp::Read | IoOp::Write { .. } => {
                let bufs: Vec<(u64, u64)> = req
                    .bufs
                    .iter()
                    .map(|b| (b.iova(), b.len() as u64))
                    .collect();
                for (start, len) in datapath::pieces(req.len, self.max_transfer.max(bs)) {
                    let blocks = (len / bs) as u32;
                    let at = lba(req.offset + start);
                    let cmd = match req.op {
                        IoOp::Write { fua } => Command::write(nsid, at, blocks, fua),
                        _ => Command::read(nsid, at, blocks),
                    };
                    out.push((cmd, Payload::Data(datapath::slice(&bufs, start, len))));
                }
            }
            IoOp::Flush => out.push((Command::flush(nsid), Payload::None)),
            IoOp::WriteZeroes { deallocate } => {
                if !ident.supports_write_zeroes() {
                    return Err(IoError::NotSupported);
                }
                for (start, len) in datapath::pieces(req.len, 0x10000 * bs) {
                    let at = lba(req.offset + start);
                    let cmd = Command::write_zeroes(nsid, at, (len / bs) as u32, deallocate);
                    out.push((cmd, Payload::None));
                }
            }
            IoOp::Unmap => {
                if !ident.supports_deallocate() {
                    return Err(IoError::NotSupported);
                }
                for (start, len) in datapath::pieces(req.len, 0x8000_0000 * bs) {
                    let range = Payload::Range {
                        lba: lba(req.offset + start),
                        blocks: (len / bs) as u32,
                    };
                    out.push((Command::deallocate(nsid, 1, 0), range));
                }
            }
        }
        Ok(out)
    }

    fn submit_commands(&mut self, req: IoRequest) -> SubmitResult {
        if self.ctrl.failed() {
            let e = self.io_error("the controller failed");
            return invalid(req, e);
        }
        self.follow_reset();
        if !self.live {
            let e = self.io_error("the I/O queue could not be recreated after a reset");
            return invalid(req, e);
        }
        let plan = match self.plan(&req) {
            Ok(p) => p,
            Err(e) => return invalid(req, e),
        };
        if plan.len() > self.slots.len() {
            let e = IoError::Refused(format!(
                "a request of {} bytes needs {} commands; the queue holds {}",
                req.len,
                plan.len(),
                self.slots.len()
            ));
            return invalid(req, e);
        }
        if plan.len() > self.free.len() {
            return queue_full(req);
        }
        let sgl = self.ctrl.identify().supports_sgl();
        // Build every command first: a request whose data cannot be described is refused whole.
        let mut ready = Vec::with_capacity(plan.len());
        for (i, (cmd, segs)) in plan.into_iter().enumerate() {
            let cid = self.free[self.free.len() - 1 - i];
            let list = &self.lists[cid as usize];
            let cmd = match segs {
                Payload::None => cmd,
                Payload::Range { lba, blocks } => {
                    // One range: context attributes, length in blocks, starting LBA.
                    list.write_u32s(0, &[0, blocks]);
                    list.write_u64(8, lba);
                    cmd.with_data(spec::DataPointer::Prp(list.iova(), 0))
                }
                Payload::Data(segs) => {
                    let mut write = |off: usize, v: u64| list.write_u64(off, v);
                    match datapath::build(&segs, sgl, list.iova(), &mut write) {
                        Ok(data) => cmd.with_data(data),
                        Err(e) => {
                            let e = IoError::Refused(format!("{}: {e}", self.ctrl.name()));
                            return invalid(req, e);
                        }
                    }
                }
            };
            ready.push(cmd.with_cid(cid));
        }
        let now = Instant::now();
        let deadline = now + self.ctrl.options().io_timeout;
        let key = self.requests.insert(Pending {
            tag: req.tag,
            bufs: req.bufs,
            commands_left: ready.len() as u32,
            error: None,
        });
        for cmd in &ready {
            let cid = cmd.cid();
            self.free.pop();
            self.slots[cid as usize] = Some(Slot {
                request: key,
                deadline,
                abort_sent: false,
            });
            self.queue.push(cmd);
        }
        self.queue.ring();
        if self.next_check < now {
            self.next_check = now + CHECK_EVERY;
        }
        Ok(())
    }

    fn complete_command(&mut self, cid: u16, status: Status) {
        let Some(slot) = self.slots.get_mut(cid as usize).and_then(Option::take) else {
            tracing::warn!(
                controller = self.ctrl.name(),
                cid,
                "completion for no command"
            );
            return;
        };
        self.free.push(cid);
        let Some(p) = self.requests.get_mut(slot.request) else {
            return;
        };
        if !status.is_success() && p.error.is_none() {
            p.error = Some(if slot.abort_sent && controller::was_aborted(status) {
                IoError::Aborted(format!("{}: timed out and aborted", self.ctrl.name()))
            } else {
                tracing::debug!(controller = self.ctrl.name(), cid, %status, "I/O command failed");
                IoError::Device(status.errno())
            });
        }
        p.commands_left -= 1;
        if p.commands_left == 0 {
            let p = self.requests.remove(slot.request);
            self.ready.push(IoCompletion {
                tag: p.tag,
                result: p.error.map_or(Ok(()), Err),
                bufs: p.bufs,
            });
        }
    }

    /// After a controller reset (ours or another channel's): every command in flight ended with
    /// the reset, so its request fails and its buffers come back; the queue is created again.
    fn follow_reset(&mut self) {
        let generation = self.ctrl.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        self.fail_all("the controller was reset");
        if self.ctrl.failed() {
            self.live = false;
            return;
        }
        self.queue.reset();
        match self.ctrl.create_io_queue(&self.queue, self.vector) {
            Ok(()) => self.live = true,
            Err(e) => {
                tracing::error!(controller = self.ctrl.name(), %e, "recreating an I/O queue after a reset failed");
                self.live = false;
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.take().is_some() {
                self.free.push(i as u16);
            }
        }
        for p in self.requests.drain() {
            self.ready.push(IoCompletion {
                tag: p.tag,
                result: Err(IoError::Aborted(format!("{}: {why}", self.ctrl.name()))),
                bufs: p.bufs,
            });
        }
    }

    /// Timeouts and the controller's health, looked at every few milliseconds while commands
    /// are in flight.
    fn check(&mut self, now: Instant) {
        self.next_check = now + CHECK_EVERY;
        if self.ctrl.fatal_status() {
            tracing::error!(
                controller = self.ctrl.name(),
                "fatal controller status: failing I/O and resetting"
            );
            let _ = self.ctrl.reset(self.generation);
            self.follow_reset();
            return;
        }
        let grace = (self.ctrl.options().io_timeout / 2).max(Duration::from_millis(100));
        let mut reset = false;
        for cid in 0..self.slots.len() {
            let Some(slot) = self.slots[cid].as_mut() else {
                continue;
            };
            if slot.deadline > now {
                continue;
            }
            if slot.abort_sent {
                reset = true;
                break;
            }
            slot.abort_sent = true;
            slot.deadline = now + grace;
            tracing::warn!(
                controller = self.ctrl.name(),
                qid = self.queue.qid,
                cid,
                "I/O command timed out: aborting it"
            );
            self.ctrl.abort(self.queue.qid, cid as u16);
        }
        if reset {
            tracing::error!(
                controller = self.ctrl.name(),
                qid = self.queue.qid,
                "an aborted command did not end: resetting the controller"
            );
            let _ = self.ctrl.reset(self.generation);
            self.follow_reset();
        }
    }
}

impl IoChannel for NvmeChannel {
    fn submit(&mut self, req: IoRequest) -> SubmitResult {
        if let Err(e) = self.geometry.validate(&req) {
            return invalid(req, e);
        }
        self.submit_commands(req)
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        self.follow_reset();
        let mut reaped = 0;
        if self.live {
            while let Some(c) = self.queue.next_completion() {
                self.complete_command(c.cid, c.status);
                reaped += 1;
            }
            if reaped > 0 {
                self.queue.ring_completions();
            }
            if !self.requests.is_empty() {
                let now = Instant::now();
                if now >= self.next_check {
                    self.check(now);
                }
            }
        }
        let n = self.ready.len();
        out.append(&mut self.ready);
        n
    }

    fn in_flight(&self) -> usize {
        self.requests.len() + self.ready.len()
    }
}

impl Drop for NvmeChannel {
    fn drop(&mut self) {
        let qid = self.queue.qid;
        if self.live && !self.ctrl.failed() && self.ctrl.generation() == self.generation {
            // Deleting the submission queue ends its outstanding commands; only then may their
            // buffers be reused.
            if let Err(e) = self.ctrl.delete_io_queue(qid) {
                // The device might still reach this queue's memory and buffers: a reset ends
                // that (or cuts the device off) before they are freed.
                tracing::error!(controller = self.ctrl.name(), qid, %e, "deleting an I/O queue failed: resetting");
                let _ = self.ctrl.reset(self.generation);
            }
        }
        if let Some(v) = self.vector {
            let _ = self.ctrl.device().route_interrupt(v, None);
        }
        self.ctrl.release_queue_id(qid);
    }
}
