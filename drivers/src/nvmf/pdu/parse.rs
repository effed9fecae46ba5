//! The parser of received PDUs: a whole PDU found at the start of a receive buffer, its header
//! decoded for the side that receives it, its lengths and digests checked.

use super::*;

/// Which end a parser sits on: it accepts only the PDUs the other end may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The controller (target): receives ICReq, command capsules, H2CData, H2CTermReq.
    Controller,
    /// The host (initiator): receives ICResp, response capsules, C2HData, R2T, C2HTermReq.
    Host,
}

/// A received PDU's header, decoded.
#[derive(Debug, Clone, Copy)]
pub enum Header {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// A command capsule (its data, if any, is the PDU's data).
    Cmd(Command),
    /// A response capsule.
    Resp(Completion),
    /// H2CData.
    H2cData(DataPdu),
    /// C2HData.
    C2hData(DataPdu),
    /// R2T.
    R2t(R2t),
    /// A terminate request from the other end.
    Term(TermReq),
}

/// A whole PDU found at the start of a receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// Its header.
    pub header: Header,
    /// Where its data starts in the buffer.
    pub data_at: usize,
    /// Its data bytes.
    pub data_len: usize,
    /// Its total length (consume this many bytes once done with it).
    pub plen: usize,
    /// False when its data digest does not match its data (not fatal: the command it belongs
    /// to fails with a transient transport error).
    pub data_digest_ok: bool,
}

/// Looks for a whole PDU at the start of `buf`: `Ok(None)` until all its bytes are there (the
/// caller reads more), a fatal error when its header or digests are wrong. PDUs longer than
/// `max_plen` are refused before their bytes are awaited. Before the connection is initialized
/// (`digests` is `None`) only ICReq/ICResp are accepted; afterwards only the other PDUs.
pub fn parse_frame(
    buf: &[u8],
    side: Side,
    digests: Option<Digests>,
    max_plen: usize,
) -> Result<Option<Frame>, PduError> {
    if buf.len() < CH_LEN {
        return Ok(None);
    }
    let mut chb = [0u8; CH_LEN];
    chb.copy_from_slice(&buf[..CH_LEN]);
    let ch = CommonHeader::parse(&chb);
    let t = ch.pdu_type;
    let allowed = match (side, digests.is_some()) {
        (Side::Controller, false) => t == pdu_type::IC_REQ,
        (Side::Host, false) => t == pdu_type::IC_RESP,
        (Side::Controller, true) => matches!(
            t,
            pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::H2C_TERM_REQ
        ),
        (Side::Host, true) => matches!(
            t,
            pdu_type::CAPSULE_RESP | pdu_type::C2H_DATA | pdu_type::R2T | pdu_type::C2H_TERM_REQ
        ),
    };
    if !allowed {
        return Err(PduError::new(
            fes::INVALID_HEADER_FIELD,
            0,
            "PDU type not expected here",
        ));
    }
    let hlen = match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => IC_LEN,
        pdu_type::CAPSULE_CMD => CMD_HLEN,
        _ => HLEN_24,
    };
    if ch.hlen as usize != hlen {
        return Err(PduError::new(fes::INVALID_HEADER_FIELD, 2, "bad HLEN"));
    }
    let plen = ch.plen as usize;
    let term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    if term {
        if !(HLEN_24..=MAX_TERM_PLEN).contains(&plen) {
            return Err(PduError::new(fes::INVALID_HEADER_FIELD, 4, "bad PLEN"));
        }
        if buf.len() < plen {
            return Ok(None);
        }
        return Ok(Some(Frame {
            header: Header::Term(TermReq {
                fes: u16::from_le_bytes([buf[8], buf[9]]),
                fei: u32::from_le_bytes([buf[10], buf[11], buf[12], buf[13]]),
            }),
            data_at: plen,
            data_len: 0,
            plen,
            data_digest_ok: true,
        }));
    }
    let dg = digests.unwrap_or_default();
    let hd = if digests.is_some() { dg.hd_len() } else { 0 };
    if digests.is_some() && (ch.flags & flags::HDGSTF != 0) != dg.header {
        return Err(PduError::new(
            fes::INVALID_HEADER_FIELD,
            1,
            "HDGSTF does not match the negotiated header digest",
        ));
    }
    let may_carry_data = matches!(
        t,
        pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::C2H_DATA
    );
    let (data_at, data_len, dd) = if plen == hlen + hd {
        (plen, 0, 0)
    } else if may_carry_data && plen > hlen + hd {
        let pdo = ch.pdo as usize;
        let dd = if ch.flags & flags::DDGSTF != 0 {
            DIGEST_LEN
        } else {
            0
        };
        if (dd != 0) != dg.data {
            return Err(PduError::new(
                fes::INVALID_HEADER_FIELD,
                1,
                "DDGSTF does not match the negotiated data digest",
            ));
        }
        if pdo < hlen + hd || pdo + dd >= plen {
            return Err(PduError::new(fes::INVALID_HEADER_FIELD, 3, "bad PDO"));
        }
        (pdo, plen - pdo - dd, dd)
    } else {
        return Err(PduError::new(fes::INVALID_HEADER_FIELD, 4, "bad PLEN"));
    };
    if plen > max_plen {
        return Err(PduError::new(fes::DATA_LIMIT, 4, "PDU longer than allowed"));
    }
    if buf.len() < plen {
        return Ok(None);
    }
    if hd != 0 {
        let want = crc32c([&buf[..hlen]]);
        let got = u32::from_le_bytes([buf[hlen], buf[hlen + 1], buf[hlen + 2], buf[hlen + 3]]);
        if want != got {
            return Err(PduError::new(
                fes::HEADER_DIGEST,
                0,
                "header digest mismatch",
            ));
        }
    }
    let mut data_digest_ok = true;
    if dd != 0 {
        let at = data_at + data_len;
        let want = crc32c([&buf[data_at..at]]);
        let got = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        data_digest_ok = want == got;
    }
    let b = &buf[..hlen];
    let header = match t {
        pdu_type::IC_REQ => Header::IcReq(IcReq::parse(b)?),
        pdu_type::IC_RESP => Header::IcResp(IcResp::parse(b)?),
        pdu_type::CAPSULE_CMD => {
            let mut dw = [0u32; 16];
            for (i, d) in dw.iter_mut().enumerate() {
                let at = CH_LEN + 4 * i;
                *d = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            }
            Header::Cmd(Command { dw })
        }
        pdu_type::CAPSULE_RESP => {
            let mut dw = [0u32; 4];
            for (i, d) in dw.iter_mut().enumerate() {
                let at = CH_LEN + 4 * i;
                *d = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            }
            Header::Resp(Completion::parse(dw))
        }
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let d = DataPdu::parse(&ch, b);
            if d.len as usize != data_len {
                return Err(PduError::new(
                    fes::INVALID_HEADER_FIELD,
                    16,
                    "DATAL does not match the PDU's data",
                ));
            }
            if t == pdu_type::H2C_DATA {
                Header::H2cData(d)
            } else {
                Header::C2hData(d)
            }
        }
        _ => Header::R2t(R2t {
            cccid: u16::from_le_bytes([b[8], b[9]]),
            ttag: u16::from_le_bytes([b[10], b[11]]),
            offset: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            len: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        }),
    };
    Ok(Some(Frame {
        header,
        data_at,
        data_len,
        plen,
        data_digest_ok,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capsule_round_trip_with_digests() {
        let d = Digests {
            header: true,
            data: true,
        };
        let cmd = Command::write(1, 7, 1, false).with_cid(9);
        let data = [0x5au8; 512];
        let h = CapsuleCmd::new(cmd).with_data_len(data.len()).encode(d);
        let mut wire = h.as_slice().to_vec();
        wire.extend_from_slice(&data);
        wire.extend_from_slice(&crc32c([&data[..]]).to_le_bytes());
        let f = parse_frame(&wire, Side::Controller, Some(d), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(f.plen, wire.len());
        assert_eq!(f.data_len, 512);
        assert_eq!(f.data_at, CMD_HLEN + 4);
        match f.header {
            Header::Cmd(c) => assert_eq!(c, cmd),
            other => panic!("{other:?}"),
        }
        // A flipped data bit is a data digest error; a flipped header bit a header digest one.
        let mut bad = wire.clone();
        bad[100] ^= 1;
        assert!(
            !parse_frame(&bad, Side::Controller, Some(d), 1 << 20)
                .unwrap()
                .unwrap()
                .data_digest_ok
        );
        let mut bad = wire.clone();
        bad[20] ^= 1;
        assert_eq!(
            parse_frame(&bad, Side::Controller, Some(d), 1 << 20)
                .unwrap_err()
                .fes,
            fes::HEADER_DIGEST
        );
        // Incomplete: wait for more.
        assert!(
            parse_frame(&wire[..wire.len() - 1], Side::Controller, Some(d), 1 << 20)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn icreq_and_wrong_side() {
        let req = IcReq::new(Digests {
            header: true,
            data: false,
        });
        let wire = req.encode();
        let f = parse_frame(&wire, Side::Controller, None, 4096)
            .unwrap()
            .unwrap();
        assert!(matches!(f.header, Header::IcReq(r) if r == req));
        assert!(parse_frame(&wire, Side::Host, None, 4096).is_err());
        assert!(parse_frame(&wire, Side::Controller, Some(Digests::default()), 4096).is_err());
    }

    #[test]
    fn crc32c_known_value() {
        // The check value of CRC-32C.
        assert_eq!(crc32c([&b"123456789"[..]]), 0xe306_9283);
        assert_eq!(crc32c([&b"1234"[..], &b"56789"[..]]), 0xe306_9283);
    }
}
