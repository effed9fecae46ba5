//! DH-HMAC-CHAP secrets in the representation `nvme gen-dhchap-key` prints and the kernel's
//! `dhchap_secret=` takes: `DHHC-1:XX:<base64 of the key and its CRC-32>:`, where XX names
//! the hash the secret is transformed with before use (00 none, 01 SHA-256, 02 SHA-384,
//! 03 SHA-512) and the key is 32, 48 or 64 bytes.

use base64::Engine as _;
use zeroize::Zeroizing;

use super::{AuthError, HashId};

/// A DH-HMAC-CHAP secret. Neither `Display` nor a `Debug` that shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct DhchapSecret {
    key: Zeroizing<Vec<u8>>,
    transform: Option<HashId>,
}

impl std::fmt::Debug for DhchapSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DhchapSecret({} bytes, redacted)", self.key.len())
    }
}

impl DhchapSecret {
    /// Parses the `DHHC-1:` representation (surrounding white space ignored).
    pub fn parse(text: &[u8]) -> Result<Self, AuthError> {
        let bad = |why: &str| AuthError::BadSecret(why.to_string());
        let text = std::str::from_utf8(text)
            .map_err(|_| bad("not text"))?
            .trim();
        let rest = text
            .strip_prefix("DHHC-1:")
            .ok_or_else(|| bad("it does not start with 'DHHC-1:'"))?;
        let (hash, rest) = rest
            .split_once(':')
            .ok_or_else(|| bad("no ':' after the hash"))?;
        let transform = match hash {
            "00" => None,
            "01" | "02" | "03" => HashId::from_id(hash.as_bytes()[1] - b'0'),
            _ => return Err(bad("the hash is not 00, 01, 02 or 03")),
        };
        let encoded = rest.strip_suffix(':').unwrap_or(rest);
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| bad("the key is not base64"))?,
        );
        if !matches!(raw.len(), 36 | 52 | 68) {
            return Err(bad("the key is not 32, 48 or 64 bytes"));
        }
        let (key, crc) = raw.split_at(raw.len() - 4);
        if crc32fast::hash(key).to_le_bytes() != crc {
            return Err(bad("its CRC-32 does not match"));
        }
        Ok(Self {
            key: Zeroizing::new(key.to_vec()),
            transform,
        })
    }

    /// The representation of `key` transformed with `transform` (as nvme-cli prints it).
    pub fn encode(key: &[u8], transform: Option<HashId>) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(key.to_vec());
        raw.extend_from_slice(&crc32fast::hash(key).to_le_bytes());
        let hash = transform.map_or(0, HashId::id);
        Zeroizing::new(format!(
            "DHHC-1:{hash:02}:{}:",
            base64::engine::general_purpose::STANDARD.encode(&raw[..])
        ))
    }

    /// The key as it is used: transformed with `nqn` (its owner's NQN) when it says so,
    /// HMAC(key, NQN || "NVMe-over-Fabrics"), else as it is.
    pub(super) fn transformed(&self, nqn: &str) -> Zeroizing<Vec<u8>> {
        match self.transform {
            None => self.key.clone(),
            Some(h) => Zeroizing::new(h.hmac(&self.key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"])),
        }
    }
}

/// What a host authenticates with: its own secret and, for bidirectional authentication, the
/// secret the controller must prove it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKeys {
    /// The host's secret (`dhchap_key`).
    pub key: DhchapSecret,
    /// The controller's secret (`dhchap_ctrlr_key`): asked for, the controller authenticates.
    pub ctrl_key: Option<DhchapSecret>,
}
