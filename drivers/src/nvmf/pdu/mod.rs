//! NVMe/TCP PDUs (transport specification 1.0): the common header, typed builders for every PDU
//! the initiator and the target send, and a parser that checks a received PDU's header, its
//! lengths and its digests before anyone looks inside.
//!
//! Building is pure: a builder gives the header bytes (with the header digest when one was
//! negotiated); data goes out separately, from the caller's buffers, so nothing is copied.
//! Parsing is in `parse`: [`parse_frame`] finds a whole, checked PDU in a receive buffer.

use crate::nvme::spec::{Command, Completion};

mod parse;

pub use parse::{parse_frame, Frame, Header, Side};

/// PDU types.
pub mod pdu_type {
    /// Initialize Connection Request.
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response.
    pub const IC_RESP: u8 = 0x01;
    /// Host to controller terminate connection request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to host terminate connection request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command capsule.
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response capsule.
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to controller data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to host data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to transfer.
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub mod flags {
    /// A header digest follows the header.
    pub const HDGSTF: u8 = 1 << 0;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 1 << 1;
    /// Last data PDU of a transfer.
    pub const LAST_PDU: u8 = 1 << 2;
    /// C2HData: the command succeeded, no response capsule follows.
    pub const SUCCESS: u8 = 1 << 3;
}

/// Fatal error status of a terminate-connection request.
pub mod fes {
    /// Invalid PDU header field.
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// PDU sequence error.
    pub const SEQUENCE_ERROR: u16 = 0x02;
    /// Header digest error.
    pub const HEADER_DIGEST: u16 = 0x03;
    /// Data transfer out of range.
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// Data transfer limit exceeded.
    pub const DATA_LIMIT: u16 = 0x05;
    /// Unsupported parameter.
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Bytes of the common header.
pub const CH_LEN: usize = 8;
/// HLEN (and PLEN) of ICReq and ICResp.
pub const IC_LEN: usize = 128;
/// HLEN of a command capsule: the common header and a 64-byte submission queue entry.
pub const CMD_HLEN: usize = 72;
/// HLEN of a response capsule, data PDUs, R2T and terminate requests.
pub const HLEN_24: usize = 24;
/// Bytes of a digest.
pub const DIGEST_LEN: usize = 4;
/// Most header bytes any PDU has (a command capsule with its header digest).
pub const MAX_HEADER: usize = CMD_HLEN + DIGEST_LEN;
/// Smallest MAXH2CDATA a controller may announce.
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Longest terminate request (its header and up to 128 bytes of the offending header).
pub const MAX_TERM_PLEN: usize = 152;

/// CRC-32C (Castagnoli) over several pieces, as the digests are defined.
pub fn crc32c<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    parts.into_iter().fold(0u32, crc32c::crc32c_append)
}

/// The digests a connection negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// Header digests on every PDU after the connection's initialization.
    pub header: bool,
    /// Data digests on every PDU that carries data.
    pub data: bool,
}

impl Digests {
    /// The DGST byte of ICReq/ICResp.
    pub fn to_byte(self) -> u8 {
        self.header as u8 | (self.data as u8) << 1
    }

    /// From the DGST byte.
    pub fn from_byte(b: u8) -> Self {
        Self {
            header: b & 1 != 0,
            data: b & 2 != 0,
        }
    }

    fn hd_len(self) -> usize {
        if self.header {
            DIGEST_LEN
        } else {
            0
        }
    }

    fn dd_len(self) -> usize {
        if self.data {
            DIGEST_LEN
        } else {
            0
        }
    }
}

/// The eight bytes every PDU starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    /// PDU type.
    pub pdu_type: u8,
    /// Flags.
    pub flags: u8,
    /// Header length (without digest).
    pub hlen: u8,
    /// Offset of the data from the start of the PDU (0: no data).
    pub pdo: u8,
    /// Total length of the PDU.
    pub plen: u32,
}

impl CommonHeader {
    /// Decodes the first eight bytes.
    pub fn parse(b: &[u8; CH_LEN]) -> Self {
        Self {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    fn write(&self, b: &mut [u8]) {
        b[0] = self.pdu_type;
        b[1] = self.flags;
        b[2] = self.hlen;
        b[3] = self.pdo;
        b[4..8].copy_from_slice(&self.plen.to_le_bytes());
    }
}

/// The header bytes of one PDU to send (with its header digest), on the stack.
#[derive(Clone, Copy)]
pub struct HeaderBytes {
    bytes: [u8; MAX_HEADER],
    len: u8,
}

impl std::fmt::Debug for HeaderBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeaderBytes({:02x?})", self.as_slice())
    }
}

impl HeaderBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Builds a header of `hlen` bytes with `fill` writing the PDU-specific part, and a data
    /// part of `data_len` bytes following it.
    fn build(
        pdu_type: u8,
        mut pdu_flags: u8,
        hlen: usize,
        data_len: usize,
        digests: Digests,
        fill: impl FnOnce(&mut [u8]),
    ) -> Self {
        let mut bytes = [0u8; MAX_HEADER];
        let hd = digests.hd_len();
        if digests.header {
            pdu_flags |= flags::HDGSTF;
        }
        let (pdo, plen) = if data_len > 0 {
            if digests.data {
                pdu_flags |= flags::DDGSTF;
            }
            let pdo = hlen + hd;
            (pdo as u8, pdo + data_len + digests.dd_len())
        } else {
            (0, hlen + hd)
        };
        CommonHeader {
            pdu_type,
            flags: pdu_flags,
            hlen: hlen as u8,
            pdo,
            plen: plen as u32,
        }
        .write(&mut bytes);
        fill(&mut bytes[CH_LEN..hlen]);
        if digests.header {
            let crc = crc32c([&bytes[..hlen]]);
            bytes[hlen..hlen + DIGEST_LEN].copy_from_slice(&crc.to_le_bytes());
        }
        Self {
            bytes,
            len: (hlen + hd) as u8,
        }
    }
}

/// ICReq: the host opens a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    /// Host PDU data alignment (0: none).
    pub hpda: u8,
    /// Digests the host asks for.
    pub digests: Digests,
    /// Most R2Ts outstanding per command, 0-based.
    pub maxr2t: u32,
}

impl IcReq {
    /// An ICReq asking for `digests`.
    pub fn new(digests: Digests) -> Self {
        Self {
            hpda: 0,
            digests,
            maxr2t: 0,
        }
    }

    /// The 128 bytes on the wire.
    pub fn encode(&self) -> [u8; IC_LEN] {
        let mut b = [0u8; IC_LEN];
        CommonHeader {
            pdu_type: pdu_type::IC_REQ,
            flags: 0,
            hlen: IC_LEN as u8,
            pdo: 0,
            plen: IC_LEN as u32,
        }
        .write(&mut b);
        // PFV 0 at bytes 8-9.
        b[10] = self.hpda;
        b[11] = self.digests.to_byte();
        b[12..16].copy_from_slice(&self.maxr2t.to_le_bytes());
        b
    }

    /// Decodes the PDU-specific part of a received ICReq (the whole 128 bytes).
    pub fn parse(b: &[u8]) -> Result<Self, PduError> {
        if b.len() < IC_LEN || u16::from_le_bytes([b[8], b[9]]) != 0 {
            return Err(PduError::new(
                fes::UNSUPPORTED_PARAMETER,
                8,
                "ICReq PFV is not 0",
            ));
        }
        if b[10] > 31 {
            return Err(PduError::new(
                fes::INVALID_HEADER_FIELD,
                10,
                "ICReq HPDA > 31",
            ));
        }
        Ok(Self {
            hpda: b[10],
            digests: Digests::from_byte(b[11]),
            maxr2t: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        })
    }
}

/// ICResp: the controller accepts a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    /// Controller PDU data alignment (0: none).
    pub cpda: u8,
    /// Digests enabled.
    pub digests: Digests,
    /// Most data bytes in one H2CData PDU.
    pub maxh2cdata: u32,
}

impl IcResp {
    /// The 128 bytes on the wire.
    pub fn encode(&self) -> [u8; IC_LEN] {
        let mut b = [0u8; IC_LEN];
        CommonHeader {
            pdu_type: pdu_type::IC_RESP,
            flags: 0,
            hlen: IC_LEN as u8,
            pdo: 0,
            plen: IC_LEN as u32,
        }
        .write(&mut b);
        b[10] = self.cpda;
        b[11] = self.digests.to_byte();
        b[12..16].copy_from_slice(&self.maxh2cdata.to_le_bytes());
        b
    }

    /// Decodes a received ICResp (the whole 128 bytes).
    pub fn parse(b: &[u8]) -> Result<Self, PduError> {
        if b.len() < IC_LEN || u16::from_le_bytes([b[8], b[9]]) != 0 {
            return Err(PduError::new(
                fes::UNSUPPORTED_PARAMETER,
                8,
                "ICResp PFV is not 0",
            ));
        }
        let maxh2cdata = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if maxh2cdata < MIN_MAXH2CDATA || !maxh2cdata.is_multiple_of(4) {
            return Err(PduError::new(
                fes::INVALID_HEADER_FIELD,
                12,
                "ICResp MAXH2CDATA below 4096 or not a multiple of 4",
            ));
        }
        Ok(Self {
            cpda: b[10],
            digests: Digests::from_byte(b[11]),
            maxh2cdata,
        })
    }
}

/// A command capsule: a submission queue entry and, optionally, in-capsule data.
#[derive(Debug, Clone, Copy)]
pub struct CapsuleCmd {
    /// The command.
    pub cmd: Command,
    /// Bytes of in-capsule data that follow the header.
    pub data_len: usize,
}

impl CapsuleCmd {
    /// A capsule carrying `cmd` without data.
    pub fn new(cmd: Command) -> Self {
        Self { cmd, data_len: 0 }
    }

    /// With `len` bytes of in-capsule data (sent by the caller after the header).
    pub fn with_data_len(mut self, len: usize) -> Self {
        self.data_len = len;
        self
    }

    /// The header bytes.
    pub fn encode(&self, digests: Digests) -> HeaderBytes {
        let dw = self.cmd.dw;
        HeaderBytes::build(
            pdu_type::CAPSULE_CMD,
            0,
            CMD_HLEN,
            self.data_len,
            digests,
            |b| {
                for (i, d) in dw.iter().enumerate() {
                    b[4 * i..4 * i + 4].copy_from_slice(&d.to_le_bytes());
                }
            },
        )
    }
}

/// A response capsule: a completion queue entry.
#[derive(Debug, Clone, Copy)]
pub struct CapsuleResp {
    /// The completion.
    pub cqe: Completion,
    /// Dword 1 of the entry (the upper half of an 8-byte Property Get value).
    pub result_hi: u32,
}

impl CapsuleResp {
    /// A response carrying `cqe`.
    pub fn new(cqe: Completion) -> Self {
        Self { cqe, result_hi: 0 }
    }

    /// With dword 1 set.
    pub fn with_result_hi(mut self, v: u32) -> Self {
        self.result_hi = v;
        self
    }

    /// The header bytes.
    pub fn encode(&self, digests: Digests) -> HeaderBytes {
        let mut dw = self.cqe.encode();
        dw[1] = self.result_hi;
        HeaderBytes::build(pdu_type::CAPSULE_RESP, 0, HLEN_24, 0, digests, |b| {
            for (i, d) in dw.iter().enumerate() {
                b[4 * i..4 * i + 4].copy_from_slice(&d.to_le_bytes());
            }
        })
    }
}

/// H2CData or C2HData: a piece of a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPdu {
    /// Command capsule CID.
    pub cccid: u16,
    /// Transfer tag (H2CData: the R2T's; C2HData: reserved).
    pub ttag: u16,
    /// Offset of this piece in the command's data.
    pub offset: u32,
    /// Bytes in this piece.
    pub len: u32,
    /// Last piece of the transfer.
    pub last: bool,
    /// C2HData only: the command succeeded and no response capsule follows.
    pub success: bool,
}

impl DataPdu {
    fn encode(&self, pdu_type: u8, digests: Digests) -> HeaderBytes {
        let mut f = 0;
        if self.last {
            f |= flags::LAST_PDU;
        }
        if self.success {
            f |= flags::SUCCESS;
        }
        let s = *self;
        HeaderBytes::build(pdu_type, f, HLEN_24, self.len as usize, digests, |b| {
            b[0..2].copy_from_slice(&s.cccid.to_le_bytes());
            b[2..4].copy_from_slice(&s.ttag.to_le_bytes());
            b[4..8].copy_from_slice(&s.offset.to_le_bytes());
            b[8..12].copy_from_slice(&s.len.to_le_bytes());
        })
    }

    /// The header bytes of an H2CData PDU.
    pub fn encode_h2c(&self, digests: Digests) -> HeaderBytes {
        self.encode(pdu_type::H2C_DATA, digests)
    }

    /// The header bytes of a C2HData PDU.
    pub fn encode_c2h(&self, digests: Digests) -> HeaderBytes {
        self.encode(pdu_type::C2H_DATA, digests)
    }

    fn parse(ch: &CommonHeader, b: &[u8]) -> Self {
        Self {
            cccid: u16::from_le_bytes([b[8], b[9]]),
            ttag: u16::from_le_bytes([b[10], b[11]]),
            offset: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            len: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            last: ch.flags & flags::LAST_PDU != 0,
            success: ch.flags & flags::SUCCESS != 0,
        }
    }
}

/// R2T: the controller asks for a range of a command's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    /// Command capsule CID.
    pub cccid: u16,
    /// Transfer tag the H2CData PDUs carry back.
    pub ttag: u16,
    /// Offset of the range in the command's data.
    pub offset: u32,
    /// Bytes asked for.
    pub len: u32,
}

impl R2t {
    /// The header bytes.
    pub fn encode(&self, digests: Digests) -> HeaderBytes {
        let s = *self;
        HeaderBytes::build(pdu_type::R2T, 0, HLEN_24, 0, digests, |b| {
            b[0..2].copy_from_slice(&s.cccid.to_le_bytes());
            b[2..4].copy_from_slice(&s.ttag.to_le_bytes());
            b[4..8].copy_from_slice(&s.offset.to_le_bytes());
            b[8..12].copy_from_slice(&s.len.to_le_bytes());
        })
    }
}

/// H2CTermReq or C2HTermReq: one side ends the connection on a fatal error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal error status.
    pub fes: u16,
    /// Fatal error information (the offending field's byte offset for header errors).
    pub fei: u32,
}

impl TermReq {
    /// The 24 bytes of a C2HTermReq (controller to host).
    pub fn encode_c2h(&self) -> [u8; HLEN_24] {
        self.encode(pdu_type::C2H_TERM_REQ)
    }

    /// The 24 bytes of an H2CTermReq (host to controller).
    pub fn encode_h2c(&self) -> [u8; HLEN_24] {
        self.encode(pdu_type::H2C_TERM_REQ)
    }

    fn encode(&self, t: u8) -> [u8; HLEN_24] {
        let mut b = [0u8; HLEN_24];
        CommonHeader {
            pdu_type: t,
            flags: 0,
            hlen: HLEN_24 as u8,
            pdo: 0,
            plen: HLEN_24 as u32,
        }
        .write(&mut b);
        b[8..10].copy_from_slice(&self.fes.to_le_bytes());
        b[10..14].copy_from_slice(&self.fei.to_le_bytes());
        b
    }
}

/// A fatal transport error: the connection ends with a terminate request carrying it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NVMe/TCP fatal error {fes:#x} at byte {fei}: {msg}")]
pub struct PduError {
    /// Fatal error status.
    pub fes: u16,
    /// Fatal error information.
    pub fei: u32,
    /// What was wrong.
    pub msg: &'static str,
}

impl PduError {
    /// An error of status `fes` about the field at byte `fei`.
    pub fn new(fes: u16, fei: u32, msg: &'static str) -> Self {
        Self { fes, fei, msg }
    }

    /// The terminate request that reports it.
    pub fn term(&self) -> TermReq {
        TermReq {
            fes: self.fes,
            fei: self.fei,
        }
    }
}
