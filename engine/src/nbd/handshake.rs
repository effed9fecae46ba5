//! The fixed newstyle handshake, on a control thread with blocking I/O and a timeout, before the
//! connection is handed to a reactor for the transmission phase.

use std::io::{Read, Write};
use std::sync::Arc;

use drivers::nbd::proto::{self, info, opt, rep, tflag};

use super::meta::{self, Selected, Selection};
use super::{description, select, NbdServer};
use crate::export::{Address, Export};

/// Largest option payload read; larger options get NBD_REP_ERR_TOO_BIG (up to a hard limit,
/// past which the connection is closed).
const MAX_OPTION: u32 = 64 << 10;
const MAX_OPTION_DISCARD: u32 = 1 << 20;

/// What the handshake agreed on.
pub struct Agreed {
    /// The export selected.
    pub export: Arc<Export>,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Metadata contexts selected for the export.
    pub meta: Selected,
}

/// Why a handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or timed out.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The client aborted or asked for an unknown export with NBD_OPT_EXPORT_NAME.
    #[error("client ended the negotiation: {0}")]
    Ended(String),
    /// The client did not start the TLS the address requires.
    #[error("TLS is required: {0}")]
    TlsRequired(String),
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// What the export takes. A read-only one advertises no command that writes (trim,
/// write-zeroes) nor FUA, which only means something on a write, as nbdkit does; flush stays
/// (harmless, and clients send it when they close).
pub fn transmission_flags(e: &Export) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        // Flush reaches the whole device (fsync of the file, or of P and S), whichever
        // connection sends it.
        | tflag::CAN_MULTI_CONN;
    if e.writable {
        f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
    } else {
        f |= tflag::READ_ONLY;
    }
    f
}

/// Options a refused client may send (each answered with the refusal) before it is closed.
const REFUSED_OPTIONS: usize = 8;

/// Sends the greeting and reads the client's flags: whether it asked for no zeroes.
pub fn greet<S: Read + Write>(s: &mut S) -> Result<bool, HandshakeError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = read_u32(s)?;
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & proto::FLAG_C_NO_ZEROES != 0)
}

/// Refuses a client the server will not negotiate with now, telling it why: the fixed newstyle
/// way to turn a client away is to error its options ("until the client gets the hint"), here
/// with NBD_REP_ERR_POLICY and `reason`, until it aborts, gives up or has sent a few. An
/// NBD_OPT_EXPORT_NAME cannot be answered with an error: the connection is closed.
pub fn refuse<S: Read + Write>(s: &mut S, reason: &str) -> Result<(), HandshakeError> {
    greet(s)?;
    for _ in 0..REFUSED_OPTIONS {
        if read_u64(s)? != proto::IHAVEOPT {
            return Err(HandshakeError::Protocol("option without IHAVEOPT".into()));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_DISCARD {
            return Err(HandshakeError::Protocol(format!("option of {len} bytes")));
        }
        std::io::copy(&mut Read::by_ref(s).take(len as u64), &mut std::io::sink())?;
        match option {
            opt::EXPORT_NAME => break,
            opt::ABORT => {
                s.write_all(&proto::option_reply(option, rep::ACK, &[]))?;
                break;
            }
            _ => s.write_all(&proto::option_reply(
                option,
                rep::ERR_POLICY,
                reason.as_bytes(),
            ))?,
        }
    }
    Err(HandshakeError::Ended(format!("refused: {reason}")))
}

/// Where a negotiation stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Not offered at this address (NBD_OPT_STARTTLS is unsupported).
    Off,
    /// Required and not started: every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT is
    /// refused with NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME closes the connection.
    Required,
    /// The options now arrive over TLS.
    Active,
}

/// How the option haggling ended.
pub enum Negotiated {
    /// An export was selected.
    Agreed(Agreed),
    /// The client asked for TLS and was told yes: the TLS handshake comes next, then the
    /// options again over it.
    StartTls,
}

/// Options answered with NBD_REP_ERR_TLS_REQD before the connection is closed.
const TLS_REQD_OPTIONS: usize = 16;

/// Reads and answers the client's options after the greeting (`no_zeroes`: its flag), as
/// `tls` says, until an export is selected or TLS is to start.
pub fn options<S: Read + Write>(
    s: &mut S,
    server: &NbdServer,
    address: &Address,
    no_zeroes: bool,
    tls: Tls,
) -> Result<Negotiated, HandshakeError> {
    let mut structured = false;
    let mut tls_refused = 0;
    let mut selection: Option<Selection> = None;
    loop {
        if read_u64(s)? != proto::IHAVEOPT {
            return Err(HandshakeError::Protocol("option without IHAVEOPT".into()));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION {
            if len > MAX_OPTION_DISCARD {
                return Err(HandshakeError::Protocol(format!("option of {len} bytes")));
            }
            std::io::copy(&mut Read::by_ref(s).take(len as u64), &mut std::io::sink())?;
            s.write_all(&proto::option_reply(
                option,
                rep::ERR_TOO_BIG,
                b"option too large",
            ))?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let reply = |s: &mut S, kind: u32, payload: &[u8]| -> std::io::Result<()> {
            s.write_all(&proto::option_reply(option, kind, payload))
        };
        if tls == Tls::Required && !matches!(option, opt::STARTTLS | opt::ABORT) {
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired(
                    "NBD_OPT_EXPORT_NAME before TLS: disconnected".into(),
                ));
            }
            reply(
                s,
                rep::ERR_TLS_REQD,
                b"TLS is required: send NBD_OPT_STARTTLS",
            )?;
            tls_refused += 1;
            if tls_refused == TLS_REQD_OPTIONS {
                return Err(HandshakeError::TlsRequired(format!(
                    "{tls_refused} options without NBD_OPT_STARTTLS"
                )));
            }
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = select(server, address, &name) else {
                    return Err(HandshakeError::Ended(format!("no export '{name}'")));
                };
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                let meta = meta::selected_for(selection, &export);
                return Ok(Negotiated::Agreed(Agreed {
                    export,
                    structured,
                    meta,
                }));
            }
            opt::ABORT => {
                let _ = reply(s, rep::ACK, &[]);
                if tls == Tls::Required {
                    return Err(HandshakeError::TlsRequired(
                        "the client aborted instead of starting TLS".into(),
                    ));
                }
                return Err(HandshakeError::Ended("NBD_OPT_ABORT".into()));
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(s, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in server.exports_at(address) {
                    let mut p = Vec::new();
                    p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(e.name.as_bytes());
                    p.extend_from_slice(description(&e).as_bytes());
                    reply(s, rep::SERVER, &p)?;
                }
                reply(s, rep::ACK, &[])?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        s,
                        rep::ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    structured = true;
                    reply(s, rep::ACK, &[])?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => meta::negotiate(
                s,
                server,
                address,
                option,
                &data,
                structured,
                &mut selection,
            )?,
            opt::INFO | opt::GO => match parse_info(&data) {
                Err(msg) => reply(s, rep::ERR_INVALID, msg.as_bytes())?,
                Ok((name, wanted)) => {
                    let Some(export) = select(server, address, &name) else {
                        reply(
                            s,
                            rep::ERR_UNKNOWN,
                            format!("no export named '{name}'").as_bytes(),
                        )?;
                        continue;
                    };
                    let mut p = Vec::with_capacity(12);
                    p.extend_from_slice(&info::EXPORT.to_be_bytes());
                    p.extend_from_slice(&export.size().to_be_bytes());
                    p.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                    reply(s, rep::INFO, &p)?;
                    if wanted.contains(&info::NAME) {
                        let mut p = info::NAME.to_be_bytes().to_vec();
                        p.extend_from_slice(export.name.as_bytes());
                        reply(s, rep::INFO, &p)?;
                    }
                    if wanted.contains(&info::DESCRIPTION) {
                        let mut p = info::DESCRIPTION.to_be_bytes().to_vec();
                        p.extend_from_slice(description(&export).as_bytes());
                        reply(s, rep::INFO, &p)?;
                    }
                    if wanted.contains(&info::BLOCK_SIZE) {
                        let bs = export.block_size();
                        let mut p = info::BLOCK_SIZE.to_be_bytes().to_vec();
                        p.extend_from_slice(&bs.to_be_bytes());
                        p.extend_from_slice(&bs.max(4096).to_be_bytes());
                        p.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
                        reply(s, rep::INFO, &p)?;
                    }
                    reply(s, rep::ACK, &[])?;
                    if option == opt::GO {
                        let meta = meta::selected_for(selection, &export);
                        return Ok(Negotiated::Agreed(Agreed {
                            export,
                            structured,
                            meta,
                        }));
                    }
                }
            },
            opt::STARTTLS => match tls {
                Tls::Off => reply(s, rep::ERR_UNSUP, b"TLS is not offered at this address")?,
                Tls::Active => reply(s, rep::ERR_INVALID, b"TLS is already on")?,
                Tls::Required if !data.is_empty() => {
                    reply(s, rep::ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?
                }
                Tls::Required => {
                    reply(s, rep::ACK, &[])?;
                    s.flush()?;
                    return Ok(Negotiated::StartTls);
                }
            },
            other => reply(
                s,
                rep::ERR_UNSUP,
                format!("option {other} is not supported").as_bytes(),
            )?,
        }
    }
}

/// Parses NBD_OPT_INFO/GO data: the export name and the information types asked for.
fn parse_info(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    if data.len() < 6 {
        return Err("option data too short".into());
    }
    let name_len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    if rest.len() < name_len + 2 {
        return Err("export name length exceeds the option".into());
    }
    let name = std::str::from_utf8(&rest[..name_len])
        .map_err(|_| "export name is not UTF-8".to_string())?
        .to_string();
    let rest = &rest[name_len..];
    let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let items = &rest[2..];
    if items.len() != n * 2 {
        return Err("information request count does not match the option length".into());
    }
    let wanted = items
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, wanted))
}
