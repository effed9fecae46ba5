//! The `sha256-tree` image digest.
//!
//! An image is cut in [`TREE_CHUNK_SIZE`] (1 MiB) chunks, the last one possibly shorter; each
//! chunk gets its own SHA-256, and the root is the SHA-256 of the chunks' 32-byte digests
//! concatenated in order. Unlike one SHA-256 over the whole stream, the chunks hash
//! independently (on as many cores as there are), and an image that differs from another in a
//! few chunks has its root computed from the other's chunk digests plus the changed chunks'.
//!
//! The root is written `sha256-tree:<64 lowercase hex digits>` ([`TreeRoot`]'s `Display` and
//! `FromStr`). An empty image has no chunks: its root is the SHA-256 of nothing.
//!
//! [`store`] holds the file format the engine keeps a backup's chunk digests in.

pub mod store;

use sha2::{Digest, Sha256};

pub use store::{ChunkDigests, DigestFileError};

/// The chunk size of the tree digest: 1 MiB.
pub const TREE_CHUNK_SIZE: u64 = 1 << 20;

/// The algorithm's name, the prefix of a root's text form.
pub const ALGORITHM: &str = "sha256-tree";

/// The SHA-256 of one chunk.
pub type ChunkDigest = [u8; 32];

/// The number of chunks of an image of `image_size` bytes.
pub fn chunk_count(image_size: u64) -> u64 {
    image_size.div_ceil(TREE_CHUNK_SIZE)
}

/// The SHA-256 of one chunk's bytes.
pub fn chunk_digest(data: &[u8]) -> ChunkDigest {
    Sha256::digest(data).into()
}

/// One chunk's SHA-256, fed in pieces (so a poller can hash a chunk over several turns).
#[derive(Clone, Default)]
pub struct ChunkHasher {
    sha: Sha256,
    bytes: u64,
}

impl ChunkHasher {
    /// Adds the chunk's next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.bytes += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The chunk's digest; the hasher is ready for the next chunk.
    pub fn finish_reset(&mut self) -> ChunkDigest {
        self.bytes = 0;
        self.sha.finalize_reset().into()
    }
}

impl std::fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkHasher")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// The root of the tree: the SHA-256 of the chunk digests in order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TreeRoot(pub [u8; 32]);

impl TreeRoot {
    /// The 64 lowercase hex digits, without the algorithm's prefix.
    pub fn hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl std::fmt::Display for TreeRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{ALGORITHM}:{}", self.hex())
    }
}

impl std::fmt::Debug for TreeRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// Why a text is not a tree root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not sha256-tree: followed by 64 lowercase hexadecimal digits")]
pub struct BadRoot(pub String);

impl std::str::FromStr for TreeRoot {
    type Err = BadRoot;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadRoot(s.to_string());
        let hex = s
            .strip_prefix(ALGORITHM)
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(bad)?;
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut root = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            let (Some(hi), Some(lo)) = (digit(pair[0]), digit(pair[1])) else {
                return Err(bad());
            };
            root[i] = (hi << 4) | lo;
        }
        Ok(TreeRoot(root))
    }
}

/// The root, fed the chunk digests in order.
#[derive(Clone, Default)]
pub struct RootBuilder {
    sha: Sha256,
    chunks: u64,
}

impl RootBuilder {
    /// Adds the next chunk's digest.
    pub fn push(&mut self, digest: &ChunkDigest) {
        self.sha.update(digest);
        self.chunks += 1;
    }

    /// Chunk digests fed so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The root.
    pub fn finish(self) -> TreeRoot {
        TreeRoot(self.sha.finalize().into())
    }
}

impl std::fmt::Debug for RootBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootBuilder")
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

/// The root of an image whose chunk digests are `digests`, in order.
pub fn root_of(digests: &[ChunkDigest]) -> TreeRoot {
    let mut r = RootBuilder::default();
    for d in digests {
        r.push(d);
    }
    r.finish()
}

/// The tree digest of an image fed in order, in pieces of any size, on one core (restore
/// verifies with it; the engine and `quicksplit digest` hash chunks in parallel instead).
#[derive(Clone, Debug, Default)]
pub struct TreeHasher {
    chunk: ChunkHasher,
    root: RootBuilder,
    bytes: u64,
}

impl TreeHasher {
    /// Adds the image's next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            let room = (TREE_CHUNK_SIZE - self.chunk.bytes()) as usize;
            let (head, rest) = data.split_at(room.min(data.len()));
            self.chunk.update(head);
            data = rest;
            if self.chunk.bytes() == TREE_CHUNK_SIZE {
                self.root.push(&self.chunk.finish_reset());
            }
        }
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The root (a short last chunk is hashed as it is).
    pub fn finish(mut self) -> TreeRoot {
        if self.chunk.bytes() > 0 {
            self.root.push(&self.chunk.finish_reset());
        }
        self.root.finish()
    }
}

/// The tree root of `data`, computed in one go.
pub fn tree_root(data: &[u8]) -> TreeRoot {
    let digests: Vec<ChunkDigest> = data
        .chunks(TREE_CHUNK_SIZE as usize)
        .map(chunk_digest)
        .collect();
    root_of(&digests)
}

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// The reference, spelled out with sha2 alone: the SHA-256 of the concatenated SHA-256s of
    /// the 1 MiB chunks.
    fn reference(data: &[u8]) -> [u8; 32] {
        let mut concatenated = Vec::new();
        for chunk in data.chunks(MIB) {
            concatenated.extend_from_slice(&Sha256::digest(chunk));
        }
        Sha256::digest(&concatenated).into()
    }

    fn bytes(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn layouts_match_the_reference() {
        for len in [
            1,
            4096,
            MIB - 1,
            MIB,
            MIB + 1,
            2 * MIB,
            3 * MIB + 12345,
            5 * MIB,
        ] {
            let data = bytes(len, len as u32);
            let want = reference(&data);
            assert_eq!(tree_root(&data).0, want, "{len} bytes");
            for piece in [1000, 4096, 65536, MIB, 3 * MIB] {
                let mut t = TreeHasher::default();
                for p in data.chunks(piece) {
                    t.update(p);
                }
                assert_eq!(t.bytes(), len as u64);
                assert_eq!(t.finish().0, want, "{len} bytes in pieces of {piece}");
            }
        }
    }

    #[test]
    fn one_chunk_is_the_sha256_of_its_digest() {
        // A single chunk: the root is SHA-256(SHA-256(data)), not SHA-256(data).
        let data = b"abc";
        let inner = Sha256::digest(data);
        assert_eq!(tree_root(data).0, <[u8; 32]>::from(Sha256::digest(inner)));
        assert_ne!(tree_root(data).0, <[u8; 32]>::from(Sha256::digest(data)));
        // Known value: sha256(ba7816bf...15ad), the digest of "abc" as 32 bytes.
        assert_eq!(
            tree_root(data).hex(),
            "4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358"
        );
    }

    #[test]
    fn empty_image_is_the_sha256_of_nothing() {
        let want = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(tree_root(&[]).hex(), want);
        assert_eq!(TreeHasher::default().finish().hex(), want);
        assert_eq!(chunk_count(0), 0);
    }

    #[test]
    fn short_last_chunk_is_hashed_as_it_is() {
        let data = bytes(2 * MIB + 7, 9);
        let mut padded = data.clone();
        padded.resize(3 * MIB, 0);
        assert_ne!(tree_root(&data), tree_root(&padded));
        let d: Vec<ChunkDigest> = vec![
            chunk_digest(&data[..MIB]),
            chunk_digest(&data[MIB..2 * MIB]),
            chunk_digest(&data[2 * MIB..]),
        ];
        assert_eq!(root_of(&d), tree_root(&data));
        assert_eq!(chunk_count(data.len() as u64), 3);
    }

    #[test]
    fn chunks_in_any_order_give_the_same_root() {
        // Hashed out of order (as parallel hashers do), assembled in order.
        let data = bytes(4 * MIB + 100, 3);
        let mut slots = vec![[0u8; 32]; 5];
        for i in [3usize, 0, 4, 2, 1] {
            let end = ((i + 1) * MIB).min(data.len());
            let mut h = ChunkHasher::default();
            for p in data[i * MIB..end].chunks(300_000) {
                h.update(p);
            }
            slots[i] = h.finish_reset();
        }
        assert_eq!(root_of(&slots).0, reference(&data));
    }

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        let r = tree_root(b"x");
        let text = r.to_string();
        assert!(text.starts_with("sha256-tree:"));
        assert_eq!(text.len(), 12 + 64);
        assert_eq!(text.parse::<TreeRoot>().unwrap(), r);
        for bad in [
            "",
            "sha256-tree:",
            &r.hex(),
            &format!("sha256:{}", r.hex()),
            &format!("sha256-tree:{}", r.hex().to_uppercase()),
            &format!("sha256-tree:{}0", r.hex()),
            &format!("sha256-tree:{}", &r.hex()[1..]),
            &format!("sha256-tree:{}g", &r.hex()[1..]),
        ] {
            assert!(bad.parse::<TreeRoot>().is_err(), "{bad:?} parsed");
        }
    }
}
