//! A model of an NVMe controller for host tests: registers, admin and I/O queues in the same
//! DMA memory a real controller would read, a RAM namespace, and knobs for the faults the driver
//! must survive (commands that never complete, aborts that do or do not work, a fatal status,
//! a controller that never becomes ready). It runs each command when its doorbell is written.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::datapath::Segment;
use super::dma;
use super::queue::Device;
use super::spec::{
    admin, cns, nvm, Command, Completion, DataPointer, Status, CQE_SIZE, CSTS_CFS, CSTS_RDY,
    CSTS_SHST_COMPLETE, DOORBELL_BASE, PAGE_SIZE, REG_ACQ, REG_AQA, REG_ASQ, REG_CAP, REG_CC,
    REG_CSTS, REG_VS, SQE_SIZE,
};

#[derive(Debug, Clone, Copy)]
struct Sq {
    base: u64,
    entries: u16,
    head: u16,
    cqid: u16,
}

#[derive(Debug, Clone, Copy)]
struct Cq {
    base: u64,
    entries: u16,
    tail: u16,
    phase: bool,
}

/// How the model behaves.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub block_size: u32,
    pub blocks: u64,
    pub mdts: u8,
    pub sgl: bool,
    pub max_queue_entries: u16,
    /// Never set CSTS.RDY.
    pub never_ready: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            block_size: 4096,
            blocks: 1024,
            mdts: 5,
            sgl: true,
            max_queue_entries: 1024,
            never_ready: false,
        }
    }
}

#[derive(Default)]
struct State {
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: HashMap<u16, Sq>,
    cqs: HashMap<u16, Cq>,
    disk: Vec<u8>,
    /// I/O commands to keep without completing, and those kept.
    swallow: u32,
    held: Vec<(u16, u16)>,
    abort_works: bool,
    enables: u32,
    io_commands: Vec<Command>,
}

/// The controller model.
pub struct Model {
    cfg: ModelConfig,
    state: Mutex<State>,
}

impl Model {
    pub fn new(cfg: ModelConfig) -> Self {
        let disk = vec![0u8; (cfg.block_size as u64 * cfg.blocks) as usize];
        Self {
            cfg,
            state: Mutex::new(State {
                disk,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps the next `n` I/O commands without completing them; `abort_works` says whether an
    /// Abort then ends them.
    pub fn swallow(&self, n: u32, abort_works: bool) {
        let mut st = self.state();
        st.swallow = n;
        st.abort_works = abort_works;
    }

    /// Raises CSTS.CFS.
    pub fn set_fatal(&self) {
        self.state().csts |= CSTS_CFS;
    }

    /// Times the controller was enabled.
    pub fn enables(&self) -> u32 {
        self.state().enables
    }

    /// I/O commands seen, in order.
    pub fn io_commands(&self) -> Vec<Command> {
        self.state().io_commands.clone()
    }

    /// Bytes of the namespace.
    pub fn disk(&self, offset: usize, len: usize) -> Vec<u8> {
        self.state().disk[offset..offset + len].to_vec()
    }

    fn identify_controller(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"MODEL-SERIAL        ");
        b[24..64].copy_from_slice(b"quicksplit controller model             ");
        b[64..72].copy_from_slice(b"1.0     ");
        b[77] = self.cfg.mdts;
        b[516..520].copy_from_slice(&1u32.to_le_bytes());
        b[520..522].copy_from_slice(&((1u16 << 2) | (1 << 3)).to_le_bytes());
        b[525] = 1;
        let sgls: u32 = if self.cfg.sgl { 1 } else { 0 };
        b[536..540].copy_from_slice(&sgls.to_le_bytes());
        b
    }

    fn identify_namespace(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE];
        b[0..8].copy_from_slice(&self.cfg.blocks.to_le_bytes());
        b[8..16].copy_from_slice(&self.cfg.blocks.to_le_bytes());
        let lbads = self.cfg.block_size.trailing_zeros();
        b[128..132].copy_from_slice(&(lbads << 16).to_le_bytes());
        b
    }
}

fn read_mem(iova: u64, len: usize) -> Option<Vec<u8>> {
    hugepages::translate(iova as usize, len)?;
    let mut out = vec![0u8; len];
    // SAFETY: the range lies inside a live registered DMA region (checked just above); the
    // driver accesses such memory only through raw pointers, never references.
    unsafe { dma::copy_from_iova(iova, &mut out) };
    Some(out)
}

fn write_mem(iova: u64, data: &[u8]) -> bool {
    if hugepages::translate(iova as usize, data.len()).is_none() {
        return false;
    }
    // SAFETY: as in `read_mem`.
    unsafe { dma::copy_to_iova(iova, data) };
    true
}

/// The data segments a command's data pointer describes for `len` bytes.
fn segments(cmd: &Command, len: u64) -> Option<Vec<Segment>> {
    let page = PAGE_SIZE as u64;
    match cmd.data() {
        DataPointer::None => None,
        DataPointer::Prp(p1, p2) => {
            let first = len.min(page - p1 % page);
            let mut out = vec![Segment {
                iova: p1,
                len: first,
            }];
            let mut left = len - first;
            if left == 0 {
                return Some(out);
            }
            if left <= page {
                out.push(Segment {
                    iova: p2,
                    len: left,
                });
                return Some(out);
            }
            let entries = left.div_ceil(page) as usize;
            let list = read_mem(p2, entries * 8)?;
            for i in 0..entries {
                let at = u64::from_le_bytes(list[8 * i..8 * i + 8].try_into().ok()?);
                let n = left.min(page);
                out.push(Segment { iova: at, len: n });
                left -= n;
            }
            Some(out)
        }
        DataPointer::Sgl(d) => {
            let addr = d[0] as u64 | (d[1] as u64) << 32;
            match d[3] >> 24 {
                0x00 => Some(vec![Segment {
                    iova: addr,
                    len: d[2] as u64,
                }]),
                0x30 => {
                    let list = read_mem(addr, d[2] as usize)?;
                    Some(
                        list.chunks(16)
                            .map(|c| Segment {
                                iova: u64::from_le_bytes(c[0..8].try_into().unwrap_or_default()),
                                len: u32::from_le_bytes(c[8..12].try_into().unwrap_or_default())
                                    as u64,
                            })
                            .collect(),
                    )
                }
                _ => None,
            }
        }
    }
}

const DATA_TRANSFER_ERROR: Status = Status::new(0, 0x04);

impl Model {
    fn run_admin(&self, st: &mut State, cmd: &Command) -> (Status, u32) {
        let ok = (Status::SUCCESS, 0);
        match cmd.opcode() {
            admin::IDENTIFY => {
                let page = match cmd.dw[10] as u8 {
                    cns::CONTROLLER => self.identify_controller(),
                    cns::NAMESPACE if cmd.dw[1] == 1 => self.identify_namespace(),
                    cns::NAMESPACE => return (Status::INVALID_NAMESPACE, 0),
                    cns::ACTIVE_NAMESPACES => {
                        let mut b = vec![0u8; PAGE_SIZE];
                        b[0..4].copy_from_slice(&1u32.to_le_bytes());
                        b
                    }
                    _ => return (Status::INVALID_FIELD, 0),
                };
                match cmd.data() {
                    DataPointer::Prp(p1, _) if write_mem(p1, &page) => ok,
                    _ => (DATA_TRANSFER_ERROR, 0),
                }
            }
            admin::SET_FEATURES if cmd.dw[10] & 0xff == 7 => {
                let n = (cmd.dw[11] & 0xffff).min(15);
                (Status::SUCCESS, n | n << 16)
            }
            admin::CREATE_CQ => {
                let qid = cmd.dw[10] as u16;
                let entries = (cmd.dw[10] >> 16) as u16 + 1;
                if qid == 0 || st.cqs.contains_key(&qid) || entries > self.cfg.max_queue_entries {
                    return (Status::INVALID_QUEUE_ID, 0);
                }
                let DataPointer::Prp(base, _) = cmd.data() else {
                    return (Status::INVALID_FIELD, 0);
                };
                st.cqs.insert(
                    qid,
                    Cq {
                        base,
                        entries,
                        tail: 0,
                        phase: true,
                    },
                );
                ok
            }
            admin::CREATE_SQ => {
                let qid = cmd.dw[10] as u16;
                let entries = (cmd.dw[10] >> 16) as u16 + 1;
                let cqid = (cmd.dw[11] >> 16) as u16;
                if qid == 0 || st.sqs.contains_key(&qid) || !st.cqs.contains_key(&cqid) {
                    return (Status::INVALID_QUEUE_ID, 0);
                }
                let DataPointer::Prp(base, _) = cmd.data() else {
                    return (Status::INVALID_FIELD, 0);
                };
                st.sqs.insert(
                    qid,
                    Sq {
                        base,
                        entries,
                        head: 0,
                        cqid,
                    },
                );
                ok
            }
            admin::DELETE_SQ => {
                let qid = cmd.dw[10] as u16;
                // Outstanding commands of the queue end, aborted.
                let held: Vec<(u16, u16)> =
                    st.held.iter().copied().filter(|h| h.0 == qid).collect();
                st.held.retain(|h| h.0 != qid);
                for (sqid, cid) in held {
                    self.post(st, sqid, cid, Status::new(0, 0x08), 0);
                }
                match st.sqs.remove(&qid) {
                    Some(_) => ok,
                    None => (Status::INVALID_QUEUE_ID, 0),
                }
            }
            admin::DELETE_CQ => match st.cqs.remove(&(cmd.dw[10] as u16)) {
                Some(_) => ok,
                None => (Status::INVALID_QUEUE_ID, 0),
            },
            admin::ABORT => {
                let sqid = cmd.dw[10] as u16;
                let cid = (cmd.dw[10] >> 16) as u16;
                let pos = st.held.iter().position(|&h| h == (sqid, cid));
                match pos {
                    Some(i) if st.abort_works => {
                        st.held.remove(i);
                        self.post(st, sqid, cid, Status::ABORT_REQUESTED, 0);
                        ok
                    }
                    _ => (Status::SUCCESS, 1),
                }
            }
            _ => (Status::INVALID_FIELD, 0),
        }
    }

    fn run_io(&self, st: &mut State, cmd: &Command) -> (Status, u32) {
        st.io_commands.push(*cmd);
        let bs = self.cfg.block_size as u64;
        if cmd.dw[1] != 1 {
            return (Status::INVALID_NAMESPACE, 0);
        }
        let (lba, blocks) = cmd.range();
        let in_range = lba
            .checked_add(blocks as u64)
            .is_some_and(|end| end <= self.cfg.blocks);
        match cmd.opcode() {
            nvm::FLUSH => (Status::SUCCESS, 0),
            nvm::READ | nvm::WRITE | nvm::WRITE_ZEROES if !in_range => {
                (Status::LBA_OUT_OF_RANGE, 0)
            }
            nvm::READ | nvm::WRITE => {
                let len = blocks as u64 * bs;
                let Some(segs) = segments(cmd, len) else {
                    return (DATA_TRANSFER_ERROR, 0);
                };
                if segs.iter().map(|s| s.len).sum::<u64>() != len {
                    return (DATA_TRANSFER_ERROR, 0);
                }
                let mut at = (lba * bs) as usize;
                for s in segs {
                    let n = s.len as usize;
                    if cmd.opcode() == nvm::WRITE {
                        let Some(data) = read_mem(s.iova, n) else {
                            return (DATA_TRANSFER_ERROR, 0);
                        };
                        st.disk[at..at + n].copy_from_slice(&data);
                    } else if !write_mem(s.iova, &st.disk[at..at + n]) {
                        return (DATA_TRANSFER_ERROR, 0);
                    }
                    at += n;
                }
                (Status::SUCCESS, 0)
            }
            nvm::WRITE_ZEROES => {
                let at = (lba * bs) as usize;
                st.disk[at..at + (blocks as u64 * bs) as usize].fill(0);
                (Status::SUCCESS, 0)
            }
            nvm::DATASET_MANAGEMENT => {
                let DataPointer::Prp(list, _) = cmd.data() else {
                    return (Status::INVALID_FIELD, 0);
                };
                let Some(range) = read_mem(list, 16) else {
                    return (DATA_TRANSFER_ERROR, 0);
                };
                let n = u32::from_le_bytes([range[4], range[5], range[6], range[7]]) as u64;
                let slba = u64::from_le_bytes(range[8..16].try_into().unwrap_or_default());
                if slba + n > self.cfg.blocks {
                    return (Status::LBA_OUT_OF_RANGE, 0);
                }
                st.disk[(slba * bs) as usize..((slba + n) * bs) as usize].fill(0);
                (Status::SUCCESS, 0)
            }
            _ => (Status::INVALID_FIELD, 0),
        }
    }

    fn post(&self, st: &mut State, sqid: u16, cid: u16, status: Status, result: u32) {
        let Some(sq) = st.sqs.get(&sqid).copied() else {
            return;
        };
        let Some(cq) = st.cqs.get_mut(&sq.cqid) else {
            return;
        };
        let entry = Completion {
            result,
            sq_head: sq.head,
            sq_id: sqid,
            cid,
            phase: cq.phase,
            status,
        }
        .encode();
        let bytes: Vec<u8> = entry.iter().flat_map(|d| d.to_le_bytes()).collect();
        write_mem(cq.base + cq.tail as u64 * CQE_SIZE as u64, &bytes);
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
    }

    fn ring_sq(&self, st: &mut State, qid: u16, tail: u16) {
        while let Some(sq) = st.sqs.get(&qid).copied() {
            if sq.head == tail || st.csts & CSTS_CFS != 0 {
                break;
            }
            let Some(raw) = read_mem(sq.base + sq.head as u64 * SQE_SIZE as u64, SQE_SIZE) else {
                break;
            };
            let mut cmd = Command::new(0);
            for (i, c) in raw.chunks(4).enumerate() {
                cmd.dw[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            if let Some(q) = st.sqs.get_mut(&qid) {
                q.head = (q.head + 1) % q.entries;
            }
            if qid != 0 && st.swallow > 0 {
                st.swallow -= 1;
                st.held.push((qid, cmd.cid()));
                st.io_commands.push(cmd);
                continue;
            }
            let (status, result) = if qid == 0 {
                self.run_admin(st, &cmd)
            } else {
                self.run_io(st, &cmd)
            };
            self.post(st, qid, cmd.cid(), status, result);
        }
    }
}

impl Device for Model {
    fn read32(&self, offset: usize) -> u32 {
        let st = self.state();
        let cap: u64 = (self.cfg.max_queue_entries as u64 - 1) | (1 << 24) | (1 << 37);
        match offset {
            REG_CAP => cap as u32,
            o if o == REG_CAP + 4 => (cap >> 32) as u32,
            REG_VS => 0x0001_0400,
            REG_CC => st.cc,
            REG_CSTS => st.csts,
            _ => 0,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut st = self.state();
        match offset {
            REG_CC => {
                let was = st.cc;
                st.cc = value;
                if value & 1 == 1 && was & 1 == 0 {
                    let entries = (st.aqa & 0xfff) as u16 + 1;
                    let (asq, acq) = (st.asq, st.acq);
                    st.cqs.insert(
                        0,
                        Cq {
                            base: acq,
                            entries,
                            tail: 0,
                            phase: true,
                        },
                    );
                    st.sqs.insert(
                        0,
                        Sq {
                            base: asq,
                            entries,
                            head: 0,
                            cqid: 0,
                        },
                    );
                    st.enables += 1;
                    if !self.cfg.never_ready {
                        st.csts = CSTS_RDY;
                    }
                } else if value & 1 == 0 {
                    st.sqs.clear();
                    st.cqs.clear();
                    st.held.clear();
                    st.swallow = 0;
                    st.csts = 0;
                }
                if value & (3 << 14) != 0 {
                    st.csts |= CSTS_SHST_COMPLETE;
                }
            }
            REG_AQA => st.aqa = value,
            REG_ASQ => st.asq = (st.asq & !0xffff_ffff) | value as u64,
            o if o == REG_ASQ + 4 => st.asq = (st.asq & 0xffff_ffff) | (value as u64) << 32,
            REG_ACQ => st.acq = (st.acq & !0xffff_ffff) | value as u64,
            o if o == REG_ACQ + 4 => st.acq = (st.acq & 0xffff_ffff) | (value as u64) << 32,
            o if o >= DOORBELL_BASE => {
                let index = (o - DOORBELL_BASE) / 4;
                if index.is_multiple_of(2) {
                    self.ring_sq(&mut st, (index / 2) as u16, value as u16);
                }
            }
            _ => {}
        }
    }

    fn register_space(&self) -> usize {
        0x2000
    }
}
