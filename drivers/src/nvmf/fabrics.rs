//! What NVMe over Fabrics adds to the base specification: the Fabrics commands (Connect,
//! Property Get/Set), the Connect data, SGL descriptors of the TCP transport, Keep Alive, Get Log
//! Page (the discovery log), the statuses the target answers with, and encoders of the Identify
//! data structures a controller returns (the parsers are in [`crate::nvme::spec`]).

use crate::nvme::spec::{Command, DataPointer, Status};

/// Opcode of every Fabrics command.
pub const OPC_FABRICS: u8 = 0x7f;
/// Admin opcodes the target serves beyond those of the PCIe driver.
pub mod admin {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// Fabrics command types (byte 4 of a Fabrics command).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send (host to controller data).
    pub const AUTH_SEND: u8 = 0x05;
    /// Authentication Receive (controller to host data).
    pub const AUTH_RECEIVE: u8 = 0x06;
}

/// Connect response, dword 0: the host must authenticate this queue (ATR).
pub const CONNECT_AUTH_REQUIRED: u32 = 1 << 17;

/// The discovery subsystem's NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Bytes of the Connect data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// CNTLID a host gives on the admin queue's Connect to be given any controller (dynamic model).
pub const CNTLID_DYNAMIC: u16 = 0xffff;
/// Log page id of the discovery log.
pub const LOG_DISCOVERY: u8 = 0x70;
/// Connect attribute: the host asks that SQ flow control be disabled (it never looks at SQHD),
/// which lets a controller end a read with a C2HData PDU carrying SUCCESS instead of a response.
pub const CATTR_DISABLE_SQ_FLOW: u8 = 1 << 2;
/// SQHD of completions on a queue whose SQ flow control is disabled.
pub const SQHD_DISABLED: u16 = 0xffff;

/// SGL descriptor type byte: data block, address is an offset into the capsule's data.
pub const SGL_INCAPSULE: u8 = 0x01;
/// SGL descriptor type byte: transport SGL data block (TCP: the data comes by R2T/H2CData or
/// C2HData).
pub const SGL_TRANSPORT: u8 = 0x5a;

/// Statuses the target completes commands with (the DNR bit set where a retry cannot help).
pub mod status {
    use super::Status;
    /// Do Not Retry.
    pub const DNR: u16 = 1 << 14;
    /// Generic: invalid command opcode.
    pub const INVALID_OPCODE: Status = Status(0x01 | DNR);
    /// Generic: invalid field in command.
    pub const INVALID_FIELD: Status = Status(0x02 | DNR);
    /// Generic: command sequence error.
    pub const SEQUENCE_ERROR: Status = Status(0x0c | DNR);
    /// Generic: invalid namespace or format.
    pub const INVALID_NAMESPACE: Status = Status(0x0b | DNR);
    /// Generic: data SGL length invalid.
    pub const SGL_LENGTH_INVALID: Status = Status(0x0f | DNR);
    /// Generic: SGL descriptor type invalid.
    pub const SGL_TYPE_INVALID: Status = Status(0x11 | DNR);
    /// Generic: SGL offset invalid.
    pub const SGL_OFFSET_INVALID: Status = Status(0x16 | DNR);
    /// Generic: transient transport error (a data digest mismatch; retry may help).
    pub const TRANSIENT_TRANSPORT: Status = Status(0x22);
    /// Generic: namespace is write protected.
    pub const WRITE_PROTECTED: Status = Status(0x20 | DNR);
    /// Generic: internal error.
    pub const INTERNAL: Status = Status(0x06);
    /// Generic: data transfer error.
    pub const DATA_TRANSFER: Status = Status(0x04);
    /// Generic: LBA out of range.
    pub const LBA_OUT_OF_RANGE: Status = Status(0x80 | DNR);
    /// Command specific: asynchronous event request limit exceeded.
    pub const AER_LIMIT: Status = Status(0x105 | DNR);
    /// Command specific (Fabrics): incompatible format.
    pub const CONNECT_FORMAT: Status = Status(0x180 | DNR);
    /// Command specific (Fabrics): connect invalid parameters.
    pub const CONNECT_INVALID_PARAMS: Status = Status(0x182 | DNR);
    /// Command specific (Fabrics): connect invalid host.
    pub const CONNECT_INVALID_HOST: Status = Status(0x184 | DNR);
    /// Command specific (Fabrics): the queue must authenticate first.
    pub const AUTH_REQUIRED: Status = Status(0x191 | DNR);
    /// Generic: unrecoverable error (media/device).
    pub const MEDIA_ERROR: Status = Status(0x281);
}

/// The Fabrics type of a Fabrics command.
pub fn fabrics_type(cmd: &Command) -> u8 {
    (cmd.dw[1] & 0xff) as u8
}

/// The SGL descriptor of a command: its type byte, length and address (offset).
pub fn sgl(cmd: &Command) -> (u8, u32, u64) {
    (
        (cmd.dw[9] >> 24) as u8,
        cmd.dw[8],
        cmd.dw[6] as u64 | (cmd.dw[7] as u64) << 32,
    )
}

/// Gives a command the data of `len` bytes, in the capsule or by the transport.
pub fn with_sgl(cmd: Command, len: u32, in_capsule: bool) -> Command {
    let kind = if in_capsule {
        SGL_INCAPSULE
    } else {
        SGL_TRANSPORT
    };
    cmd.with_data(DataPointer::Sgl([0, 0, len, (kind as u32) << 24]))
}

/// A command as NVMe/TCP carries it: commands without data still name their (empty) data with
/// a transport SGL descriptor, as every command over Fabrics uses SGLs (PSDT 01b).
pub fn sgl_command(cmd: Command) -> Command {
    if (cmd.dw[0] >> 14) & 3 == 0 {
        with_sgl(cmd, 0, false)
    } else {
        cmd
    }
}

/// Connect: open queue `qid` of `sqsize` entries (1-based here) on controller `cntlid`'s
/// subsystem; the Connect data goes in the capsule.
pub fn connect(qid: u16, sqsize: u16, kato_ms: u32) -> Command {
    connect_with(qid, sqsize, kato_ms, 0)
}

/// Connect with connect attributes `cattr` (such as [`CATTR_DISABLE_SQ_FLOW`]).
pub fn connect_with(qid: u16, sqsize: u16, kato_ms: u32, cattr: u8) -> Command {
    let mut c = Command::new(OPC_FABRICS);
    c.dw[1] = fctype::CONNECT as u32;
    // RECFMT 0, QID, SQSIZE (0-based), CATTR.
    c.dw[10] = (qid as u32) << 16;
    c.dw[11] = (sqsize.max(2) as u32 - 1) | ((cattr as u32) << 16);
    c.dw[12] = kato_ms;
    with_sgl(c, CONNECT_DATA_LEN as u32, true)
}

/// The fields of a Connect command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectCmd {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue id.
    pub qid: u16,
    /// Queue entries, 0-based.
    pub sqsize: u16,
    /// Connect attributes.
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds.
    pub kato_ms: u32,
}

impl ConnectCmd {
    /// Decodes a Connect command.
    pub fn parse(c: &Command) -> Self {
        Self {
            recfmt: c.dw[10] as u16,
            qid: (c.dw[10] >> 16) as u16,
            sqsize: c.dw[11] as u16,
            cattr: (c.dw[11] >> 16) as u8,
            kato_ms: c.dw[12],
        }
    }
}

/// Property Get of the 4- or 8-byte property at `offset`.
pub fn property_get(offset: u32, eight: bool) -> Command {
    let mut c = Command::new(OPC_FABRICS);
    c.dw[1] = fctype::PROPERTY_GET as u32;
    c.dw[10] = eight as u32;
    c.dw[11] = offset;
    c
}

/// AUTH_Send (DH-HMAC-CHAP) of `len` bytes, which go in the capsule.
pub fn auth_send(len: u32) -> Command {
    auth(fctype::AUTH_SEND, len, true)
}

/// AUTH_Receive (DH-HMAC-CHAP) of at most `len` bytes.
pub fn auth_receive(len: u32) -> Command {
    auth(fctype::AUTH_RECEIVE, len, false)
}

fn auth(fctype: u8, len: u32, in_capsule: bool) -> Command {
    let mut c = Command::new(OPC_FABRICS);
    c.dw[1] = fctype as u32;
    // SECP, SPSP1, SPSP0 (the protocol's 01h 01h), then the transfer or allocation length.
    c.dw[10] = (crate::nvmf::auth::SECP_DHCHAP as u32) << 24 | 1 << 16 | 1 << 8;
    c.dw[11] = len;
    with_sgl(c, len, in_capsule)
}

/// The security protocol fields of an AUTH_Send or AUTH_Receive are DH-HMAC-CHAP's.
pub fn is_dhchap(cmd: &Command) -> bool {
    cmd.dw[10] >> 8 == (crate::nvmf::auth::SECP_DHCHAP as u32) << 16 | 1 << 8 | 1
}

/// Property Set of the 4-byte property at `offset`.
pub fn property_set(offset: u32, value: u32) -> Command {
    let mut c = Command::new(OPC_FABRICS);
    c.dw[1] = fctype::PROPERTY_SET as u32;
    c.dw[11] = offset;
    c.dw[12] = value;
    c
}

/// Keep Alive.
pub fn keep_alive() -> Command {
    Command::new(admin::KEEP_ALIVE)
}

/// Identify with `cns` for `nsid`; its 4096 bytes come back by C2HData.
pub fn identify(cns: u8, nsid: u32) -> Command {
    let mut c = Command::new(admin::IDENTIFY).with_nsid(nsid);
    c.dw[10] = cns as u32;
    with_sgl(c, 4096, false)
}

/// The Connect data: host id, controller id, subsystem and host NQNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Controller id (0xFFFF on the admin queue of a dynamic controller).
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
}

/// Checks a host NQN to send in Connect or to allow on an export: it starts with `nqn.` and
/// has at most 223 bytes, none a control character.
pub fn check_host_nqn(nqn: &str) -> Result<(), String> {
    if !nqn.starts_with("nqn.") || nqn.len() > 223 || nqn.chars().any(char::is_control) {
        return Err(format!(
            "'{}' is not an NQN (it starts with 'nqn.' and has at most 223 bytes)",
            nqn.escape_debug()
        ));
    }
    Ok(())
}

/// An NQN field: UTF-8 up to a NUL within its 256 bytes; `None` when not terminated or not
/// UTF-8. It may be empty: SPDK's initiator sends an empty host NQN unless given one, and the
/// Linux and SPDK targets take it.
fn nqn_field(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&b[..end]).ok().map(str::to_string)
}

impl ConnectData {
    /// The 1024 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; CONNECT_DATA_LEN];
        b[..16].copy_from_slice(&self.hostid);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        let s = self.subnqn.as_bytes();
        let n = s.len().min(255);
        b[256..256 + n].copy_from_slice(&s[..n]);
        let h = self.hostnqn.as_bytes();
        let n = h.len().min(255);
        b[512..512 + n].copy_from_slice(&h[..n]);
        b
    }

    /// Decodes them; `Err` gives the byte offset of the bad field.
    pub fn parse(b: &[u8]) -> Result<Self, u16> {
        if b.len() < CONNECT_DATA_LEN {
            return Err(0);
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[..16]);
        Ok(Self {
            hostid,
            cntlid: u16::from_le_bytes([b[16], b[17]]),
            subnqn: nqn_field(&b[256..512]).ok_or(256u16)?,
            hostnqn: nqn_field(&b[512..768]).ok_or(512u16)?,
        })
    }
}

fn put_text(b: &mut [u8], s: &str) {
    b.fill(b' ');
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn put_nqn(b: &mut [u8], s: &str) {
    let n = s.len().min(b.len() - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// What a target's Identify Controller says.
#[derive(Debug, Clone)]
pub struct ControllerIdentity {
    /// Controller id.
    pub cntlid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// A discovery controller (no namespaces, serves the discovery log).
    pub discovery: bool,
    /// MDTS as a power of two of 4 KiB.
    pub mdts: u8,
    /// Queue entries (MAXCMD).
    pub maxcmd: u16,
    /// Bytes of in-capsule data an I/O command capsule may carry.
    pub in_capsule: u32,
}

/// Version the target reports (NVMe 1.3).
pub const TARGET_VERSION: u32 = 0x0001_0300;

impl ControllerIdentity {
    /// The 4096-byte Identify Controller page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        put_text(&mut b[4..24], &self.serial);
        put_text(&mut b[24..64], &self.model);
        put_text(&mut b[64..72], env!("CARGO_PKG_VERSION"));
        b[77] = self.mdts;
        b[78..80].copy_from_slice(&self.cntlid.to_le_bytes());
        b[80..84].copy_from_slice(&TARGET_VERSION.to_le_bytes());
        // CNTRLTYPE: 1 I/O controller, 2 discovery controller.
        b[111] = if self.discovery { 2 } else { 1 };
        // ACL, AERL (0-based).
        b[258] = 3;
        b[259] = 3;
        // LPA: extended data for Get Log Page.
        b[261] = 1 << 2;
        // KAS: keep alive granularity of 100 ms.
        b[320..322].copy_from_slice(&1u16.to_le_bytes());
        // SQES, CQES.
        b[512] = 0x66;
        b[513] = 0x44;
        b[514..516].copy_from_slice(&self.maxcmd.to_le_bytes());
        if !self.discovery {
            // NN: one namespace; ONCS: dataset management and write zeroes; VWC present.
            b[516..520].copy_from_slice(&1u32.to_le_bytes());
            b[520..522].copy_from_slice(&((1u16 << 2) | (1 << 3)).to_le_bytes());
            b[525] = 1;
        }
        // SGLS: supported, offsets in data block descriptors.
        b[536..540].copy_from_slice(&(1u32 | 1 << 20).to_le_bytes());
        put_nqn(&mut b[768..1024], &self.subnqn);
        // IOCCSZ (16-byte units), IORCSZ, ICDOFF 0, FCATT 0 (dynamic), MSDBD 1.
        let ioccsz = (64 + self.in_capsule) / 16;
        b[1792..1796].copy_from_slice(&ioccsz.to_le_bytes());
        b[1796..1800].copy_from_slice(&1u32.to_le_bytes());
        b[1803] = 1;
        b
    }
}

/// The fabrics fields of a received Identify Controller page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FabricsIdentity {
    /// Controller id.
    pub cntlid: u16,
    /// I/O command capsule size in bytes (command and in-capsule data).
    pub ioccsz: u32,
    /// In-capsule data offset.
    pub icdoff: u16,
    /// MAXCMD.
    pub maxcmd: u16,
}

impl FabricsIdentity {
    /// Decodes them from an Identify Controller page.
    pub fn parse(b: &[u8; 4096]) -> Self {
        Self {
            cntlid: u16::from_le_bytes([b[78], b[79]]),
            ioccsz: u32::from_le_bytes([b[1792], b[1793], b[1794], b[1795]]).saturating_mul(16),
            icdoff: u16::from_le_bytes([b[1800], b[1801]]),
            maxcmd: u16::from_le_bytes([b[514], b[515]]),
        }
    }
}

/// A 16-byte identifier derived from a name (namespace NGUID/UUID of an export).
pub fn id_from_name(name: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, chunk) in id.chunks_mut(4).enumerate() {
        let crc = crc32c::crc32c_append(i as u32, name.as_bytes());
        chunk.copy_from_slice(&crc.to_le_bytes());
    }
    // RFC 4122 version 4 / variant bits, so it reads as a UUID.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// The 4096-byte Identify Namespace page of a namespace of `blocks` blocks of `block_size`.
pub fn identify_namespace(blocks: u64, block_size: u32, read_only: bool, id: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for at in [0, 8, 16] {
        b[at..at + 8].copy_from_slice(&blocks.to_le_bytes());
    }
    // NSFEAT 0, NLBAF 0 (one format), FLBAS 0.
    // DLFEAT: deallocated blocks read as zeroes is not promised.
    // NSATTR bit 0: write protected.
    b[99] = read_only as u8;
    b[104..120].copy_from_slice(&id);
    let lbads = block_size.trailing_zeros();
    b[128..132].copy_from_slice(&(lbads << 16).to_le_bytes());
    b
}

/// The Namespace Identification Descriptor list: one UUID descriptor.
pub fn namespace_descriptors(id: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0] = 3;
    b[1] = 16;
    b[4..20].copy_from_slice(&id);
    b
}

/// One entry of the discovery log.
#[derive(Debug, Clone)]
pub struct DiscoveryEntry {
    /// Subsystem NQN.
    pub subnqn: String,
    /// Address.
    pub traddr: String,
    /// Port.
    pub trsvcid: String,
    /// Port id.
    pub portid: u16,
}

/// The discovery log page: a 1024-byte header and 1024 bytes per entry.
pub fn discovery_log(generation: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; 1024 * (1 + entries.len())];
    b[0..8].copy_from_slice(&generation.to_le_bytes());
    b[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let r = &mut b[1024 * (i + 1)..1024 * (i + 2)];
        r[0] = 3; // TRTYPE TCP
        r[1] = if e.traddr.contains(':') { 2 } else { 1 }; // ADRFAM IPv6 / IPv4
        r[2] = 2; // SUBTYPE NVM subsystem
                  // TREQ: secure channel not required; SQ flow control can be disabled.
        r[3] = 2 | 1 << 2;
        r[4..6].copy_from_slice(&e.portid.to_le_bytes());
        r[6..8].copy_from_slice(&0xffffu16.to_le_bytes());
        r[8..10].copy_from_slice(&32u16.to_le_bytes());
        put_text(&mut r[32..64], &e.trsvcid);
        put_nqn(&mut r[256..512], &e.subnqn);
        put_text(&mut r[512..768], &e.traddr);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::{IdentifyController, IdentifyNamespace};

    #[test]
    fn connect_data_round_trip_and_bad_nqn() {
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: "nqn.2024-01.io.quicksplit:x".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let b = d.encode();
        assert_eq!(ConnectData::parse(&b), Ok(d));
        let mut bad = b.clone();
        bad[256..512].fill(b'a');
        assert_eq!(ConnectData::parse(&bad), Err(256));
        let mut bad = b.clone();
        bad[512..515].copy_from_slice(&[0xff, 0xfe, 0]);
        assert_eq!(ConnectData::parse(&bad), Err(512), "not UTF-8");
        let mut anonymous = b.clone();
        anonymous[512..768].fill(0);
        let parsed = ConnectData::parse(&anonymous).map(|d| d.hostnqn);
        assert_eq!(parsed, Ok(String::new()), "an empty host NQN is taken");
    }

    #[test]
    fn identify_pages_parse_back() {
        let id = ControllerIdentity {
            cntlid: 5,
            serial: "qs".into(),
            model: "quicksplit".into(),
            subnqn: "nqn.x".into(),
            discovery: false,
            mdts: 5,
            maxcmd: 128,
            in_capsule: 8192,
        };
        let page: [u8; 4096] = id.encode().try_into().unwrap();
        let c = IdentifyController::parse(&page);
        assert_eq!((c.mdts, c.namespaces), (5, 1));
        assert!(c.supports_deallocate() && c.supports_write_zeroes() && c.supports_sgl());
        let f = FabricsIdentity::parse(&page);
        assert_eq!(
            (f.cntlid, f.ioccsz, f.icdoff, f.maxcmd),
            (5, 64 + 8192, 0, 128)
        );
        let ns: [u8; 4096] = identify_namespace(100, 4096, true, [1; 16])
            .try_into()
            .unwrap();
        let n = IdentifyNamespace::parse(&ns);
        assert_eq!((n.size_blocks, n.block_size), (100, 4096));
        assert_eq!(ns[99], 1);
    }

    #[test]
    fn connect_command_fields() {
        let c = ConnectCmd::parse(&connect(3, 128, 5000));
        assert_eq!(
            (c.qid, c.sqsize, c.kato_ms, c.recfmt, c.cattr),
            (3, 127, 5000, 0, 0)
        );
        let c = ConnectCmd::parse(&connect_with(2, 64, 0, CATTR_DISABLE_SQ_FLOW));
        assert_eq!((c.qid, c.sqsize, c.cattr), (2, 63, CATTR_DISABLE_SQ_FLOW));
        let (t, len, _) = sgl(&connect(0, 32, 0));
        assert_eq!((t, len), (SGL_INCAPSULE, 1024));
    }
}
