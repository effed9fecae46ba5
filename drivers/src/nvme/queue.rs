//! The register interface of a controller ([`Device`]) and one submission/completion queue pair
//! in DMA memory: entries written at the tail, doorbells rung, completions found by their phase
//! tag at the head.

use std::os::fd::RawFd;
use std::sync::Arc;

use hugepages::BufferPool;

use super::dma::{self, DeviceMemory};
use super::spec::{Capabilities, Command, Completion, CQE_SIZE, PAGE_SIZE, SQE_SIZE};
use super::NvmeError;

/// A controller as the driver reaches it: 32-bit register access to BAR0 and a few device-level
/// operations. The VFIO device implements it with volatile MMIO; tests use a controller model.
pub trait Device: Send + Sync {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32);
    /// Reads a 64-bit register as two dwords, low first.
    fn read64(&self, offset: usize) -> u64 {
        self.read32(offset) as u64 | (self.read32(offset + 4) as u64) << 32
    }
    /// Writes a 64-bit register as two dwords, low first.
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
    /// Bytes of BAR0 the driver can reach (limits the number of doorbells).
    fn register_space(&self) -> usize;
    /// Interrupt vectors that can signal an eventfd (0: none).
    fn interrupt_vectors(&self) -> u16 {
        0
    }
    /// Makes interrupt `vector` signal `fd`, or nothing with `None`.
    fn route_interrupt(&self, vector: u16, fd: Option<RawFd>) -> Result<(), NvmeError> {
        let _ = (vector, fd);
        Err(NvmeError::Unsupported("interrupt routing".into()))
    }
    /// Stops the device from reaching memory at all (bus mastering off); the last resort when
    /// a controller does not come back from a reset.
    fn stop_dma(&self) {}
}

/// One submission queue and its completion queue.
pub(crate) struct QueuePair {
    pub(crate) qid: u16,
    entries: u16,
    sq: DeviceMemory,
    cq: DeviceMemory,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
    unrung: bool,
    dev: Arc<dyn Device>,
    _pool: BufferPool,
}

impl QueuePair {
    /// Allocates the rings of queue `qid` with `entries` slots each (2 to 4096).
    pub(crate) fn new(
        dev: Arc<dyn Device>,
        cap: &Capabilities,
        qid: u16,
        entries: u16,
    ) -> Result<Self, NvmeError> {
        let sq_bytes = (entries as usize * SQE_SIZE).next_multiple_of(PAGE_SIZE);
        let cq_bytes = (entries as usize * CQE_SIZE).next_multiple_of(PAGE_SIZE);
        let pool = BufferPool::new(sq_bytes.max(cq_bytes), 2)?;
        let (sq, cq) = match (pool.get(), pool.get()) {
            (Some(sq), Some(cq)) => (DeviceMemory::new(sq), DeviceMemory::new(cq)),
            _ => return Err(NvmeError::Unsupported("queue memory".into())),
        };
        Ok(Self {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: cap.sq_doorbell(qid),
            cq_doorbell: cap.cq_doorbell(qid),
            unrung: false,
            dev,
            _pool: pool,
        })
    }

    /// Slots per ring.
    pub(crate) fn entries(&self) -> u16 {
        self.entries
    }

    /// Device address of the submission ring.
    pub(crate) fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }

    /// Device address of the completion ring.
    pub(crate) fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// Forgets every entry (after the controller deleted the queues or was reset).
    pub(crate) fn reset(&mut self) {
        self.sq.clear();
        self.cq.clear();
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        self.unrung = false;
    }

    /// Writes `cmd` at the tail. The caller keeps at most `entries - 1` commands outstanding,
    /// so the slot is free.
    pub(crate) fn push(&mut self, cmd: &Command) {
        self.sq
            .write_u32s(self.sq_tail as usize * SQE_SIZE, &cmd.dw);
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        self.unrung = true;
    }

    /// Tells the controller about pushed entries.
    pub(crate) fn ring(&mut self) {
        if self.unrung {
            dma::publish();
            self.dev.write32(self.sq_doorbell, self.sq_tail as u32);
            self.unrung = false;
        }
    }

    /// The next completion, if the controller has posted one; consumes it.
    pub(crate) fn next_completion(&mut self) -> Option<Completion> {
        let at = self.cq_head as usize * CQE_SIZE;
        let dw3 = self.cq.read_u32(at + 12);
        if ((dw3 >> 16) & 1 == 1) != self.phase {
            return None;
        }
        dma::acquire();
        let entry = Completion::parse([
            self.cq.read_u32(at),
            self.cq.read_u32(at + 4),
            self.cq.read_u32(at + 8),
            dw3,
        ]);
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(entry)
    }

    /// Releases consumed completion slots to the controller.
    pub(crate) fn ring_completions(&mut self) {
        self.dev.write32(self.cq_doorbell, self.cq_head as u32);
    }
}
