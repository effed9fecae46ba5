//! The Diffie-Hellman groups of DH-HMAC-CHAP: the null group (no exchange) and RFC 7919's
//! ffdhe2048 (generator 2). The arithmetic is crypto-bigint's constant-time Montgomery
//! exponentiation; values travel as big-endian numbers of the prime's length.

use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::{Encoding, U2048};
use zeroize::Zeroizing;

use super::AuthError;

/// Group identifiers (DH Group ID in the Negotiate and Challenge messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhGroup {
    /// No Diffie-Hellman exchange: the challenges are used as they are.
    Null,
    /// RFC 7919 ffdhe2048.
    Ffdhe2048,
}

impl DhGroup {
    /// The group with identifier `id`, if this side has it.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(Self::Null),
            1 => Some(Self::Ffdhe2048),
            _ => None,
        }
    }

    /// The identifier on the wire.
    pub fn id(self) -> u8 {
        match self {
            Self::Null => 0,
            Self::Ffdhe2048 => 1,
        }
    }

    /// Bytes of a public value (0 for the null group).
    pub fn value_len(self) -> usize {
        match self {
            Self::Null => 0,
            Self::Ffdhe2048 => PRIME_BYTES,
        }
    }

    /// The name nvme-cli and the kernel use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Ffdhe2048 => "ffdhe2048",
        }
    }
}

const PRIME_BYTES: usize = 256;

/// RFC 7919, appendix A.1: p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1.
const FFDHE2048_P: U2048 = U2048::from_be_hex(concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1",
    "D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9",
    "7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD6561",
    "2433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE735",
    "30ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB",
    "B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB19",
    "0B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD73",
    "3BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA",
    "886B423861285C97FFFFFFFFFFFFFFFF"
));

/// Bits of a private exponent: RFC 7919 asks at least 225 for ffdhe2048 (section 5.2).
const EXPONENT_BITS: usize = 320;

fn power(base: &U2048, exponent: &U2048) -> U2048 {
    let params = DynResidueParams::new(&FFDHE2048_P);
    DynResidue::new(base, params)
        .pow_bounded_exp(exponent, EXPONENT_BITS)
        .retrieve()
}

/// One side's ephemeral ffdhe2048 key pair.
pub struct KeyPair {
    private: Zeroizing<[u8; PRIME_BYTES]>,
    public: [u8; PRIME_BYTES],
}

impl KeyPair {
    /// A fresh key pair from the system's random numbers.
    pub fn generate() -> Result<Self, AuthError> {
        let mut private = Zeroizing::new([0u8; PRIME_BYTES]);
        let bytes = EXPONENT_BITS / 8;
        super::random(&mut private[PRIME_BYTES - bytes..])?;
        let x = Zeroizing::new(U2048::from_be_slice(&private[..]));
        let public = power(&U2048::from_u8(2), &x).to_be_bytes();
        Ok(Self { private, public })
    }

    /// The public value g^x mod p, big-endian, 256 bytes.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The shared secret (the session key KS) with the peer's public value, 256 bytes. The
    /// value is checked first: it must be 256 bytes and 1 < y < p - 1 (SP 800-56A's check for
    /// a safe prime group), or the peer could force a known secret.
    pub fn shared(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, AuthError> {
        if peer.len() != PRIME_BYTES {
            return Err(AuthError::BadDhValue(format!(
                "{} bytes, not {PRIME_BYTES}",
                peer.len()
            )));
        }
        let y = U2048::from_be_slice(peer);
        let p_minus_1 = FFDHE2048_P.wrapping_sub(&U2048::ONE);
        if y <= U2048::ONE || y >= p_minus_1 {
            return Err(AuthError::BadDhValue("out of range".into()));
        }
        let x = Zeroizing::new(U2048::from_be_slice(&self.private[..]));
        let z = Zeroizing::new(power(&y, &x).to_be_bytes());
        Ok(Zeroizing::new(z.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prime_is_rfc_7919s() {
        let b = FFDHE2048_P.to_be_bytes();
        // All ones in its top and bottom 64 bits, 2048 bits long, odd.
        assert!(b[..8].iter().chain(&b[248..]).all(|&x| x == 0xff));
        // A Fermat test to base 3: 3^(p-1) = 1 mod p.
        let params = DynResidueParams::new(&FFDHE2048_P);
        let p_minus_1 = FFDHE2048_P.wrapping_sub(&U2048::ONE);
        let r = DynResidue::new(&U2048::from_u8(3), params)
            .pow(&p_minus_1)
            .retrieve();
        assert_eq!(r, U2048::ONE);
        // q = (p-1)/2 is the order of the subgroup 2 generates: 2^q = 1 mod p.
        let q = p_minus_1.shr_vartime(1);
        let r = DynResidue::new(&U2048::from_u8(2), params)
            .pow(&q)
            .retrieve();
        assert_eq!(r, U2048::ONE);
    }

    #[test]
    fn both_sides_agree_and_bad_values_are_refused() {
        let (a, b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        assert_ne!(a.public(), b.public());
        let (ka, kb) = (a.shared(b.public()).unwrap(), b.shared(a.public()).unwrap());
        assert_eq!(*ka, *kb);
        assert_eq!(ka.len(), 256);
        let one = U2048::ONE.to_be_bytes();
        assert!(a.shared(&one).is_err());
        let p1 = FFDHE2048_P.wrapping_sub(&U2048::ONE).to_be_bytes();
        assert!(a.shared(&p1).is_err());
        assert!(a.shared(&FFDHE2048_P.to_be_bytes()).is_err());
        assert!(a.shared(&[7u8; 255]).is_err());
    }
}
