//! The DH-HMAC-CHAP messages (AUTH_Send and AUTH_Receive data): their layout, encoding and
//! checked parsing. A message may be followed by padding (AUTH_Receive returns the whole
//! allocation), so parsing reads the lengths the header gives and ignores what follows.

use super::AuthError;

/// AUTH_TYPE: messages common to the authentication protocols (Negotiate, Failure).
pub const COMMON: u8 = 0x00;
/// AUTH_TYPE: DH-HMAC-CHAP messages.
pub const DHCHAP: u8 = 0x01;

/// AUTH_ID of each message.
pub mod id {
    /// AUTH_Negotiate (host to controller, common).
    pub const NEGOTIATE: u8 = 0x00;
    /// DH-HMAC-CHAP_Challenge (controller to host).
    pub const CHALLENGE: u8 = 0x01;
    /// DH-HMAC-CHAP_Reply (host to controller).
    pub const REPLY: u8 = 0x02;
    /// DH-HMAC-CHAP_Success1 (controller to host).
    pub const SUCCESS1: u8 = 0x03;
    /// DH-HMAC-CHAP_Success2 (host to controller).
    pub const SUCCESS2: u8 = 0x04;
    /// AUTH_Failure2 (host to controller, common).
    pub const FAILURE2: u8 = 0xf0;
    /// AUTH_Failure1 (controller to host, common).
    pub const FAILURE1: u8 = 0xf1;
}

/// Reason code of a failure: "authentication failure".
pub const REASON_FAILED: u8 = 0x01;

/// Reason code explanations of a failure.
pub mod why {
    /// Authentication failed.
    pub const FAILED: u8 = 0x01;
    /// Authentication protocol not usable.
    pub const NOT_USABLE: u8 = 0x02;
    /// Secure channel concatenation mismatch.
    pub const CONCAT_MISMATCH: u8 = 0x03;
    /// Hash function not usable.
    pub const HASH_UNUSABLE: u8 = 0x04;
    /// DH group not usable.
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    /// Incorrect payload.
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    /// Incorrect protocol message.
    pub const INCORRECT_MESSAGE: u8 = 0x07;
}

/// A failure explanation in words.
pub fn explain(code: u8) -> &'static str {
    match code {
        why::FAILED => "authentication failed",
        why::NOT_USABLE => "authentication protocol not usable",
        why::CONCAT_MISMATCH => "secure channel concatenation mismatch",
        why::HASH_UNUSABLE => "hash function not usable",
        why::DHGROUP_UNUSABLE => "DH group not usable",
        why::INCORRECT_PAYLOAD => "incorrect payload",
        why::INCORRECT_MESSAGE => "incorrect protocol message",
        _ => "unknown reason",
    }
}

/// The DH-HMAC-CHAP protocol identifier in a Negotiate descriptor (AUTHID).
const AUTHID_DHCHAP: u8 = 0x01;
/// Bytes of a protocol descriptor: AUTHID, reserved, HALEN, DHLEN, 30 hash ids, 30 group ids.
const DESCRIPTOR: usize = 64;
const HEADER: usize = 16;

/// One message of the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The host offers hash functions and DH groups.
    Negotiate {
        /// Transaction id.
        tid: u16,
        /// Secure channel concatenation asked for (SC_C); 0 is none.
        sc_c: u8,
        /// Hash ids offered.
        hashes: Vec<u8>,
        /// DH group ids offered.
        groups: Vec<u8>,
    },
    /// The controller's choice, its challenge C1, sequence number S1 and DH public value.
    Challenge {
        /// Transaction id.
        tid: u16,
        /// Hash id.
        hash: u8,
        /// DH group id.
        group: u8,
        /// S1.
        seqnum: u32,
        /// C1 (hash length bytes).
        challenge: Vec<u8>,
        /// The controller's DH public value (empty for the null group).
        dh_value: Vec<u8>,
    },
    /// The host's response R1, and its challenge C2 when it authenticates the controller.
    Reply {
        /// Transaction id.
        tid: u16,
        /// R1.
        response: Vec<u8>,
        /// C2, with CVALID set (bidirectional).
        challenge: Option<Vec<u8>>,
        /// S2 (0: no controller authentication).
        seqnum: u32,
        /// The host's DH public value.
        dh_value: Vec<u8>,
    },
    /// The host is authenticated; R2 when the host asked the controller to authenticate.
    Success1 {
        /// Transaction id.
        tid: u16,
        /// Hash length.
        hl: u8,
        /// R2 (RVALID set).
        response: Option<Vec<u8>>,
    },
    /// The host accepted R2.
    Success2 {
        /// Transaction id.
        tid: u16,
    },
    /// The controller ends the exchange as failed.
    Failure1 {
        /// Transaction id.
        tid: u16,
        /// Reason code explanation.
        why: u8,
    },
    /// The host ends the exchange as failed.
    Failure2 {
        /// Transaction id.
        tid: u16,
        /// Reason code explanation.
        why: u8,
    },
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn head(auth_type: u8, auth_id: u8, tid: u16, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[0] = auth_type;
    v[1] = auth_id;
    v[4..6].copy_from_slice(&tid.to_le_bytes());
    v
}

fn short(what: &str) -> AuthError {
    AuthError::Protocol(format!("{what} message too short"))
}

impl Message {
    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Negotiate { .. } => "Negotiate",
            Self::Challenge { .. } => "Challenge",
            Self::Reply { .. } => "Reply",
            Self::Success1 { .. } => "Success1",
            Self::Success2 { .. } => "Success2",
            Self::Failure1 { .. } => "Failure1",
            Self::Failure2 { .. } => "Failure2",
        }
    }

    /// Its transaction id.
    pub fn tid(&self) -> u16 {
        match self {
            Self::Negotiate { tid, .. }
            | Self::Challenge { tid, .. }
            | Self::Reply { tid, .. }
            | Self::Success1 { tid, .. }
            | Self::Success2 { tid }
            | Self::Failure1 { tid, .. }
            | Self::Failure2 { tid, .. } => *tid,
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Negotiate {
                tid,
                sc_c,
                hashes,
                groups,
            } => {
                let mut v = head(COMMON, id::NEGOTIATE, *tid, 8 + DESCRIPTOR);
                v[6] = *sc_c;
                v[7] = 1;
                let d = &mut v[8..];
                d[0] = AUTHID_DHCHAP;
                let (h, g) = (hashes.len().min(30), groups.len().min(30));
                d[2] = h as u8;
                d[3] = g as u8;
                d[4..4 + h].copy_from_slice(&hashes[..h]);
                d[34..34 + g].copy_from_slice(&groups[..g]);
                v
            }
            Self::Challenge {
                tid,
                hash,
                group,
                seqnum,
                challenge,
                dh_value,
            } => {
                let mut v = head(DHCHAP, id::CHALLENGE, *tid, HEADER);
                v[6] = challenge.len() as u8;
                v[8] = *hash;
                v[9] = *group;
                v[10..12].copy_from_slice(&(dh_value.len() as u16).to_le_bytes());
                v[12..16].copy_from_slice(&seqnum.to_le_bytes());
                v.extend_from_slice(challenge);
                v.extend_from_slice(dh_value);
                v
            }
            Self::Reply {
                tid,
                response,
                challenge,
                seqnum,
                dh_value,
            } => {
                let mut v = head(DHCHAP, id::REPLY, *tid, HEADER);
                v[6] = response.len() as u8;
                v[8] = challenge.is_some() as u8;
                v[10..12].copy_from_slice(&(dh_value.len() as u16).to_le_bytes());
                v[12..16].copy_from_slice(&seqnum.to_le_bytes());
                v.extend_from_slice(response);
                match challenge {
                    Some(c) => v.extend_from_slice(c),
                    None => v.resize(v.len() + response.len(), 0),
                }
                v.extend_from_slice(dh_value);
                v
            }
            Self::Success1 { tid, hl, response } => {
                let mut v = head(DHCHAP, id::SUCCESS1, *tid, HEADER);
                v[6] = *hl;
                if let Some(r) = response {
                    v[8] = 1;
                    v.extend_from_slice(r);
                }
                v
            }
            Self::Success2 { tid } => head(DHCHAP, id::SUCCESS2, *tid, HEADER),
            Self::Failure1 { tid, why } | Self::Failure2 { tid, why } => {
                let auth_id = match self {
                    Self::Failure1 { .. } => id::FAILURE1,
                    _ => id::FAILURE2,
                };
                let mut v = head(COMMON, auth_id, *tid, 8);
                v[6] = REASON_FAILED;
                v[7] = *why;
                v
            }
        }
    }

    /// Parses a message, checking every length against the bytes there are.
    pub fn parse(b: &[u8]) -> Result<Self, AuthError> {
        if b.len() < 8 {
            return Err(AuthError::Protocol("a message shorter than 8 bytes".into()));
        }
        let (auth_type, auth_id, tid) = (b[0], b[1], le16(b, 4));
        let m = match (auth_type, auth_id) {
            (COMMON, id::NEGOTIATE) => {
                if b.len() < 8 + DESCRIPTOR {
                    return Err(short("Negotiate"));
                }
                let napd = b[7];
                if napd == 0 {
                    return Err(AuthError::Protocol("Negotiate offers no protocol".into()));
                }
                // The DH-HMAC-CHAP descriptor among those offered.
                let descriptors = b[8..].chunks_exact(DESCRIPTOR).take(napd as usize);
                let Some(d) = descriptors.into_iter().find(|d| d[0] == AUTHID_DHCHAP) else {
                    return Err(AuthError::Protocol(
                        "Negotiate does not offer DH-HMAC-CHAP".into(),
                    ));
                };
                let (h, g) = (d[2] as usize, d[3] as usize);
                if h > 30 || g > 30 {
                    return Err(AuthError::Protocol(
                        "Negotiate lists more than 30 ids".into(),
                    ));
                }
                Self::Negotiate {
                    tid,
                    sc_c: b[6],
                    hashes: d[4..4 + h].to_vec(),
                    groups: d[34..34 + g].to_vec(),
                }
            }
            (DHCHAP, id::CHALLENGE) => {
                if b.len() < HEADER {
                    return Err(short("Challenge"));
                }
                let (hl, dhvlen) = (b[6] as usize, le16(b, 10) as usize);
                if b.len() < HEADER + hl + dhvlen {
                    return Err(short("Challenge"));
                }
                Self::Challenge {
                    tid,
                    hash: b[8],
                    group: b[9],
                    seqnum: le32(b, 12),
                    challenge: b[HEADER..HEADER + hl].to_vec(),
                    dh_value: b[HEADER + hl..HEADER + hl + dhvlen].to_vec(),
                }
            }
            (DHCHAP, id::REPLY) => {
                if b.len() < HEADER {
                    return Err(short("Reply"));
                }
                let (hl, dhvlen) = (b[6] as usize, le16(b, 10) as usize);
                if b.len() < HEADER + 2 * hl + dhvlen {
                    return Err(short("Reply"));
                }
                let at = HEADER + 2 * hl;
                Self::Reply {
                    tid,
                    response: b[HEADER..HEADER + hl].to_vec(),
                    challenge: (b[8] & 1 == 1).then(|| b[HEADER + hl..at].to_vec()),
                    seqnum: le32(b, 12),
                    dh_value: b[at..at + dhvlen].to_vec(),
                }
            }
            (DHCHAP, id::SUCCESS1) => {
                if b.len() < HEADER {
                    return Err(short("Success1"));
                }
                let hl = b[6] as usize;
                let rvalid = b[8] & 1 == 1;
                if rvalid && b.len() < HEADER + hl {
                    return Err(short("Success1"));
                }
                Self::Success1 {
                    tid,
                    hl: b[6],
                    response: rvalid.then(|| b[HEADER..HEADER + hl].to_vec()),
                }
            }
            (DHCHAP, id::SUCCESS2) => Self::Success2 { tid },
            (COMMON, id::FAILURE1) => Self::Failure1 { tid, why: b[7] },
            (COMMON, id::FAILURE2) => Self::Failure2 { tid, why: b[7] },
            _ => {
                return Err(AuthError::Protocol(format!(
                    "unknown message type {auth_type:#x} id {auth_id:#x}"
                )))
            }
        };
        Ok(m)
    }
}
