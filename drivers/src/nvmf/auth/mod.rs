//! NVMe in-band authentication, DH-HMAC-CHAP (NVMe Base Specification, "Authentication"):
//! secrets in the `DHHC-1:` representation nvme-cli prints ([`DhchapSecret`]), the messages
//! AUTH_Send and AUTH_Receive carry ([`messages`]), the Diffie-Hellman groups ([`dh`]), and the
//! two ends of the exchange as plain state machines over those messages: [`CtrlAuth`] for the
//! target's queues, [`authenticate`] for the initiator. Both transports drive them, and tests
//! run one against the other with no network.
//!
//! The primitives are crates' (hmac, sha2, crypto-bigint, getrandom); only the protocol is
//! written here.

mod ctrl;
pub mod dh;
mod host;
pub mod messages;
mod secret;

use hmac::{Mac, SimpleHmac};
use sha2::{Digest, Sha256, Sha384, Sha512};

pub use ctrl::{CtrlAuth, SendOutcome};
pub use host::{authenticate, AuthTransport};
pub use secret::{DhchapSecret, HostKeys};

/// Security protocol identifier of DH-HMAC-CHAP (SECP of AUTH_Send and AUTH_Receive).
pub const SECP_DHCHAP: u8 = 0xe9;
/// Bytes an AUTH_Receive asks for: every message of the exchange fits.
pub const RECEIVE_LEN: u32 = 4096;

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A `DHHC-1:` secret is malformed.
    #[error("not a DH-HMAC-CHAP secret in the DHHC-1 representation: {0}")]
    BadSecret(String),
    /// A peer's Diffie-Hellman value cannot be used.
    #[error("unusable Diffie-Hellman public value: {0}")]
    BadDhValue(String),
    /// The other side sent a message that breaks the protocol.
    #[error("DH-HMAC-CHAP protocol error: {0}")]
    Protocol(String),
    /// The controller refused the host (a Failure1 message).
    #[error("the controller refused authentication ({})", messages::explain(*.0))]
    Refused(u8),
    /// The controller's response did not prove it holds the controller key.
    #[error("the controller failed to authenticate itself ({0})")]
    ControllerNotAuthentic(&'static str),
    /// The system's random numbers could not be read.
    #[error("no random numbers: {0}")]
    Random(String),
    /// The transport failed while exchanging messages.
    #[error("{0}")]
    Transport(String),
}

/// Fills `buf` from the system's cryptographic random numbers.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), AuthError> {
    getrandom::getrandom(buf).map_err(|e| AuthError::Random(e.to_string()))
}

/// A random sequence number: never 0, which means "no controller authentication".
fn random_seqnum() -> Result<u32, AuthError> {
    loop {
        let mut b = [0u8; 4];
        random(&mut b)?;
        let n = u32::from_le_bytes(b);
        if n != 0 {
            return Ok(n);
        }
    }
}

/// The hash functions (Hash ID in the messages), used both as HMAC and as plain digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashId {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashId {
    /// The hash with identifier `id`.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::Sha256),
            2 => Some(Self::Sha384),
            3 => Some(Self::Sha512),
            _ => None,
        }
    }

    /// The identifier on the wire.
    pub fn id(self) -> u8 {
        match self {
            Self::Sha256 => 1,
            Self::Sha384 => 2,
            Self::Sha512 => 3,
        }
    }

    /// Bytes of a digest.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// HMAC of the concatenation of `parts` under `key`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            // HMAC takes keys of any length: this cannot fail.
            let Ok(mut m) = <M as hmac::digest::KeyInit>::new_from_slice(key) else {
                return Vec::new();
            };
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Self::Sha256 => run::<SimpleHmac<Sha256>>(key, parts),
            Self::Sha384 => run::<SimpleHmac<Sha384>>(key, parts),
            Self::Sha512 => run::<SimpleHmac<Sha512>>(key, parts),
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(data).to_vec(),
            Self::Sha384 => Sha384::digest(data).to_vec(),
            Self::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// The challenge a response is computed over: with a Diffie-Hellman group, the augmented
/// challenge Ca = HMAC(H(KS), C); with the null group, C itself.
fn augmented(hash: HashId, challenge: &[u8], session_key: Option<&[u8]>) -> Vec<u8> {
    match session_key {
        Some(ks) => {
            let hashed = zeroize::Zeroizing::new(hash.digest(ks));
            hash.hmac(&hashed, &[challenge])
        }
        None => challenge.to_vec(),
    }
}

/// Who computes a response: the host proves it holds its key (R1), the controller its own (R2).
#[derive(Debug, Clone, Copy)]
enum Role {
    Host,
    Controller,
}

/// Everything a response covers.
struct Transcript<'a> {
    hash: HashId,
    challenge: &'a [u8],
    session_key: Option<&'a [u8]>,
    seqnum: u32,
    tid: u16,
    hostnqn: &'a str,
    subnqn: &'a str,
}

impl Transcript<'_> {
    /// R1 = HMAC(Kh', Ca1 || S1 || T_ID || SC_C || "HostHost" || NQNh || 00h || NQNc), and R2
    /// the same with the controller's key, Ca2, S2, "Controller" and the NQNs swapped. Kh' and
    /// Kc' are the secrets transformed with their owner's NQN.
    fn response(&self, secret: &DhchapSecret, role: Role) -> Vec<u8> {
        let challenge = augmented(self.hash, self.challenge, self.session_key);
        let (label, first, second): (&[u8], &str, &str) = match role {
            Role::Host => (b"HostHost", self.hostnqn, self.subnqn),
            Role::Controller => (b"Controller", self.subnqn, self.hostnqn),
        };
        let key = secret.transformed(first);
        self.hash.hmac(
            &key,
            &[
                &challenge,
                &self.seqnum.to_le_bytes(),
                &self.tid.to_le_bytes(),
                &[0u8],
                label,
                first.as_bytes(),
                &[0u8],
                second.as_bytes(),
            ],
        )
    }
}

/// Compares two responses in constant time.
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests;
