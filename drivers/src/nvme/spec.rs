//! What the NVMe base specification defines and the driver uses: controller registers, admin
//! and I/O command layouts (typed builders), completion entries and status codes, and the
//! Identify data structures. Pure data: nothing here touches a device.

/// Controller Capabilities (64-bit).
pub const REG_CAP: usize = 0x00;
/// Version.
pub const REG_VS: usize = 0x08;
/// Interrupt Mask Set.
pub const REG_INTMS: usize = 0x0c;
/// Controller Configuration.
pub const REG_CC: usize = 0x14;
/// Controller Status.
pub const REG_CSTS: usize = 0x1c;
/// Admin Queue Attributes.
pub const REG_AQA: usize = 0x24;
/// Admin Submission Queue base address (64-bit).
pub const REG_ASQ: usize = 0x28;
/// Admin Completion Queue base address (64-bit).
pub const REG_ACQ: usize = 0x30;
/// First doorbell.
pub const DOORBELL_BASE: usize = 0x1000;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.SHN = normal shutdown.
pub const CC_SHN_NORMAL: u32 = 1 << 14;
/// CC.SHN mask.
pub const CC_SHN_MASK: u32 = 3 << 14;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS: controller fatal status.
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST mask and "shutdown complete".
pub const CSTS_SHST_MASK: u32 = 3 << 2;
/// CSTS.SHST = shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Bytes of one submission queue entry (2^6).
pub const SQE_SIZE: usize = 64;
/// Bytes of one completion queue entry (2^4).
pub const CQE_SIZE: usize = 16;
/// The memory page size the driver configures (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;

/// The fields of CAP the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum queue entries supported (1-based here; the register is 0-based).
    pub max_queue_entries: u32,
    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds.
    pub timeout_ms: u64,
    /// Doorbell stride: doorbells are `4 << dstrd` bytes apart.
    pub doorbell_stride: usize,
    /// The NVM command set is supported.
    pub nvm_command_set: bool,
    /// Smallest memory page size, in bytes.
    pub min_page_size: usize,
    /// Largest memory page size, in bytes.
    pub max_page_size: usize,
}

impl Capabilities {
    /// Decodes the CAP register.
    pub fn parse(cap: u64) -> Self {
        Self {
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            timeout_ms: ((cap >> 24) & 0xff) * 500,
            doorbell_stride: 4 << ((cap >> 32) & 0xf),
            nvm_command_set: (cap >> 37) & 1 == 1,
            min_page_size: 1 << (12 + ((cap >> 48) & 0xf)),
            max_page_size: 1 << (12 + ((cap >> 52) & 0xf)),
        }
    }

    /// Offset of the submission queue tail doorbell of queue `qid`.
    pub fn sq_doorbell(&self, qid: u16) -> usize {
        DOORBELL_BASE + 2 * qid as usize * self.doorbell_stride
    }

    /// Offset of the completion queue head doorbell of queue `qid`.
    pub fn cq_doorbell(&self, qid: u16) -> usize {
        DOORBELL_BASE + (2 * qid as usize + 1) * self.doorbell_stride
    }
}

/// CC value enabling the controller: NVM command set, 4 KiB pages, round robin, 64-byte SQEs
/// and 16-byte CQEs.
pub fn cc_enable() -> u32 {
    CC_EN | (6 << 16) | (4 << 20)
}

/// Admin opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command set opcodes.
pub mod nvm {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (deallocate).
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NAMESPACES: u8 = 0x02;
}

/// Feature identifier "Number of Queues".
pub const FEATURE_NUMBER_OF_QUEUES: u8 = 0x07;

/// How a command's data is described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPointer {
    /// No data.
    None,
    /// PRP entry 1 and 2 (entry 2 may point at a PRP list).
    Prp(u64, u64),
    /// One SGL descriptor (a data block, or a last segment pointing at a list of them).
    Sgl([u32; 4]),
}

/// A submission queue entry, built by the constructors below and refined by setters, like
/// io_uring's opcode builders. Building is pure; only pushing it to a queue reaches a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// The sixteen command dwords.
    pub dw: [u32; 16],
}

impl Command {
    /// A command with `opcode` and everything else zero.
    pub fn new(opcode: u8) -> Self {
        let mut dw = [0u32; 16];
        dw[0] = opcode as u32;
        Self { dw }
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        (self.dw[0] & 0xff) as u8
    }

    /// The command identifier.
    pub fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }

    /// Sets the command identifier.
    pub fn with_cid(mut self, cid: u16) -> Self {
        self.dw[0] = (self.dw[0] & 0xffff) | ((cid as u32) << 16);
        self
    }

    /// Sets the namespace.
    pub fn with_nsid(mut self, nsid: u32) -> Self {
        self.dw[1] = nsid;
        self
    }

    /// Sets the data pointer (and PSDT for SGLs).
    pub fn with_data(mut self, data: DataPointer) -> Self {
        self.dw[0] &= !(3 << 14);
        match data {
            DataPointer::None => self.dw[6..10].copy_from_slice(&[0; 4]),
            DataPointer::Prp(p1, p2) => {
                self.dw[6] = p1 as u32;
                self.dw[7] = (p1 >> 32) as u32;
                self.dw[8] = p2 as u32;
                self.dw[9] = (p2 >> 32) as u32;
            }
            DataPointer::Sgl(desc) => {
                self.dw[0] |= 1 << 14;
                self.dw[6..10].copy_from_slice(&desc);
            }
        }
        self
    }

    /// The data pointer as set.
    pub fn data(&self) -> DataPointer {
        let lo = |i: usize| self.dw[i] as u64 | (self.dw[i + 1] as u64) << 32;
        match (self.dw[0] >> 14) & 3 {
            0 if lo(6) == 0 && lo(8) == 0 => DataPointer::None,
            0 => DataPointer::Prp(lo(6), lo(8)),
            _ => DataPointer::Sgl([self.dw[6], self.dw[7], self.dw[8], self.dw[9]]),
        }
    }

    /// Identify with `cns` for `nsid` into the 4 KiB page at `page`.
    pub fn identify(cns: u8, nsid: u32, page: u64) -> Self {
        let mut c = Self::new(admin::IDENTIFY)
            .with_nsid(nsid)
            .with_data(DataPointer::Prp(page, 0));
        c.dw[10] = cns as u32;
        c
    }

    /// Create I/O Completion Queue `qid` of `entries` at `base`, physically contiguous,
    /// interrupting on `vector` when given.
    pub fn create_io_cq(qid: u16, entries: u16, base: u64, vector: Option<u16>) -> Self {
        let mut c = Self::new(admin::CREATE_CQ).with_data(DataPointer::Prp(base, 0));
        c.dw[10] = ((entries as u32 - 1) << 16) | qid as u32;
        c.dw[11] = match vector {
            Some(v) => ((v as u32) << 16) | 0b11,
            None => 0b01,
        };
        c
    }

    /// Create I/O Submission Queue `qid` of `entries` at `base`, completing on `cqid`.
    pub fn create_io_sq(qid: u16, entries: u16, base: u64, cqid: u16) -> Self {
        let mut c = Self::new(admin::CREATE_SQ).with_data(DataPointer::Prp(base, 0));
        c.dw[10] = ((entries as u32 - 1) << 16) | qid as u32;
        c.dw[11] = ((cqid as u32) << 16) | 0b01;
        c
    }

    /// Delete I/O Submission Queue `qid`.
    pub fn delete_io_sq(qid: u16) -> Self {
        let mut c = Self::new(admin::DELETE_SQ);
        c.dw[10] = qid as u32;
        c
    }

    /// Delete I/O Completion Queue `qid`.
    pub fn delete_io_cq(qid: u16) -> Self {
        let mut c = Self::new(admin::DELETE_CQ);
        c.dw[10] = qid as u32;
        c
    }

    /// Set Features, Number of Queues: ask for `count` submission and completion queues.
    pub fn set_number_of_queues(count: u16) -> Self {
        let mut c = Self::new(admin::SET_FEATURES);
        c.dw[10] = FEATURE_NUMBER_OF_QUEUES as u32;
        let n = count.max(1) as u32 - 1;
        c.dw[11] = (n << 16) | n;
        c
    }

    /// Abort command `cid` of submission queue `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> Self {
        let mut c = Self::new(admin::ABORT);
        c.dw[10] = ((cid as u32) << 16) | sqid as u32;
        c
    }

    /// Read `blocks` blocks at `lba` (blocks >= 1).
    pub fn read(nsid: u32, lba: u64, blocks: u32) -> Self {
        Self::new(nvm::READ).with_nsid(nsid).with_range(lba, blocks)
    }

    /// Write `blocks` blocks at `lba`; `fua` forces them to media before completion.
    pub fn write(nsid: u32, lba: u64, blocks: u32, fua: bool) -> Self {
        let mut c = Self::new(nvm::WRITE)
            .with_nsid(nsid)
            .with_range(lba, blocks);
        if fua {
            c.dw[12] |= 1 << 30;
        }
        c
    }

    /// Write Zeroes, command dword 12: the blocks may be deallocated.
    const DEAC: u32 = 1 << 25;

    /// Write Zeroes over `blocks` blocks at `lba`; with `deallocate` (DEAC) the controller may
    /// deallocate them.
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u32, deallocate: bool) -> Self {
        let mut c = Self::new(nvm::WRITE_ZEROES)
            .with_nsid(nsid)
            .with_range(lba, blocks);
        if deallocate {
            c.dw[12] |= Self::DEAC;
        }
        c
    }

    /// Whether a Write Zeroes may deallocate its blocks (DEAC).
    pub fn deallocates(&self) -> bool {
        self.dw[12] & Self::DEAC != 0
    }

    /// Flush the volatile write cache of `nsid`.
    pub fn flush(nsid: u32) -> Self {
        Self::new(nvm::FLUSH).with_nsid(nsid)
    }

    /// Dataset Management, deallocate the `ranges` ranges listed in the page at `list`.
    pub fn deallocate(nsid: u32, ranges: u32, list: u64) -> Self {
        let mut c = Self::new(nvm::DATASET_MANAGEMENT)
            .with_nsid(nsid)
            .with_data(DataPointer::Prp(list, 0));
        c.dw[10] = ranges.max(1) - 1;
        c.dw[11] = 1 << 2;
        c
    }

    fn with_range(mut self, lba: u64, blocks: u32) -> Self {
        self.dw[10] = lba as u32;
        self.dw[11] = (lba >> 32) as u32;
        self.dw[12] = (self.dw[12] & !0xffff) | (blocks.max(1) - 1);
        self
    }

    /// Starting LBA and block count of a read, write or write-zeroes.
    pub fn range(&self) -> (u64, u32) {
        (
            self.dw[10] as u64 | (self.dw[11] as u64) << 32,
            (self.dw[12] & 0xffff) + 1,
        )
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Command specific result (DW0).
    pub result: u32,
    /// The submission queue head the controller has consumed to.
    pub sq_head: u16,
    /// The submission queue the command came from.
    pub sq_id: u16,
    /// The command identifier.
    pub cid: u16,
    /// The phase tag.
    pub phase: bool,
    /// The status.
    pub status: Status,
}

impl Completion {
    /// Decodes the four dwords of an entry.
    pub fn parse(dw: [u32; 4]) -> Self {
        Self {
            result: dw[0],
            sq_head: dw[2] as u16,
            sq_id: (dw[2] >> 16) as u16,
            cid: dw[3] as u16,
            phase: (dw[3] >> 16) & 1 == 1,
            status: Status((dw[3] >> 17) as u16),
        }
    }

    /// Encodes an entry (controller models in tests).
    pub fn encode(&self) -> [u32; 4] {
        [
            self.result,
            0,
            self.sq_head as u32 | (self.sq_id as u32) << 16,
            self.cid as u32 | (self.phase as u32) << 16 | (self.status.0 as u32) << 17,
        ]
    }
}

/// A completion's 15-bit status field: code, code type, do-not-retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status(0);
    /// Generic: invalid field in command.
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    /// Generic: command abort requested.
    pub const ABORT_REQUESTED: Status = Status::generic(0x07);
    /// Generic: invalid namespace or format.
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b);
    /// Generic: LBA out of range.
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
    /// Command specific: invalid queue identifier.
    pub const INVALID_QUEUE_ID: Status = Status::new(1, 0x01);

    /// Status of code type `sct` and code `sc`.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Status(sc as u16 | ((sct as u16 & 7) << 8))
    }

    const fn generic(sc: u8) -> Self {
        Self::new(0, sc)
    }

    /// Status code.
    pub fn code(self) -> u8 {
        self.0 as u8
    }

    /// Status code type.
    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// True for success.
    pub fn is_success(self) -> bool {
        self.code() == 0 && self.code_type() == 0
    }

    /// Ignores the retry and more bits.
    pub fn kind(self) -> Status {
        Status(self.0 & 0x7ff)
    }

    /// The errno a failed I/O reports.
    pub fn errno(self) -> i32 {
        match self.kind() {
            s if s == Status::LBA_OUT_OF_RANGE => libc::ERANGE,
            s if s == Status::INVALID_FIELD || s == Status::INVALID_NAMESPACE => libc::EINVAL,
            s if s == Status::ABORT_REQUESTED => libc::ECANCELED,
            s if s.code_type() == 2 => libc::EIO,
            _ => libc::EIO,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status type {:#x} code {:#04x}",
            self.code_type(),
            self.code()
        )
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) as u64 | (le32(b, at + 4) as u64) << 32
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// What the driver uses of the Identify Controller data structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI vendor id.
    pub vendor_id: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page size (0: no limit).
    pub mdts: u8,
    /// Number of namespaces.
    pub namespaces: u32,
    /// Optional NVM command support (bit 2: dataset management, bit 3: write zeroes).
    pub oncs: u16,
    /// A volatile write cache is present.
    pub volatile_write_cache: bool,
    /// SGL support (bits 1:0 non-zero: SGLs are supported for the NVM command set).
    pub sgls: u32,
}

impl IdentifyController {
    /// Decodes a 4096-byte Identify Controller page.
    pub fn parse(b: &[u8; 4096]) -> Self {
        Self {
            vendor_id: le16(b, 0),
            serial: text(&b[4..24]),
            model: text(&b[24..64]),
            firmware: text(&b[64..72]),
            mdts: b[77],
            namespaces: le32(b, 516),
            oncs: le16(b, 520),
            volatile_write_cache: b[525] & 1 == 1,
            sgls: le32(b, 536),
        }
    }

    /// True when SGLs can describe data of NVM commands.
    pub fn supports_sgl(&self) -> bool {
        self.sgls & 3 != 0
    }

    /// True when Dataset Management (deallocate) is supported.
    pub fn supports_deallocate(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    /// True when Write Zeroes is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
}

/// What the driver uses of the Identify Namespace data structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Size in logical blocks.
    pub size_blocks: u64,
    /// Bytes per logical block of the formatted LBA format.
    pub block_size: u32,
    /// Metadata bytes per block of that format.
    pub metadata_size: u16,
}

impl IdentifyNamespace {
    /// Decodes a 4096-byte Identify Namespace page.
    pub fn parse(b: &[u8; 4096]) -> Self {
        let format = (b[26] & 0xf) as usize;
        let lbaf = le32(b, 128 + 4 * format);
        let lbads = (lbaf >> 16) & 0xff;
        Self {
            size_blocks: le64(b, 0),
            block_size: if (9..=16).contains(&lbads) {
                1 << lbads
            } else {
                0
            },
            metadata_size: lbaf as u16,
        }
    }
}

/// Decodes an Active Namespace ID list: the non-zero ids, in order.
pub fn parse_namespace_list(b: &[u8; 4096]) -> Vec<u32> {
    (0..1024)
        .map(|i| le32(b, 4 * i))
        .take_while(|&id| id != 0)
        .collect()
}
