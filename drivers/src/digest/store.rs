//! A backup's chunk digests on disk (`<state-dir>/digests/<backup-id>.sha256tree`), so a later
//! backup can compute its root from them and the chunks it changed.
//!
//! Layout, integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `QSTREE01` |
//! | 8 | 8 | chunk size in bytes (1 MiB) |
//! | 16 | 8 | image size in bytes |
//! | 24 | 8 | number of chunks (the image size over the chunk size, rounded up) |
//! | 32 | 32 | the root |
//! | 64 | 32 per chunk | the chunk digests in order |
//! | end | 4 | CRC-32C of everything before it |
//!
//! A file that fails any check (magic, sizes, count, CRC, a root that is not the chunks') is
//! refused, never trusted.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{chunk_count, root_of, ChunkDigest, TreeRoot, TREE_CHUNK_SIZE};

const MAGIC: &[u8; 8] = b"QSTREE01";
const HEADER: usize = 64;

/// Why a chunk digest file cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum DigestFileError {
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid chunk digest file.
    #[error("{}: not a valid chunk digest file: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// An image's chunk digests, with the geometry they describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkDigests {
    /// Bytes per chunk ([`TREE_CHUNK_SIZE`]).
    pub chunk_size: u64,
    /// The image's size in bytes.
    pub image_size: u64,
    /// One digest per chunk, in order.
    pub digests: Vec<ChunkDigest>,
}

impl ChunkDigests {
    /// The digests of an image of `image_size` bytes in [`TREE_CHUNK_SIZE`] chunks; `None` when
    /// their number does not match the size.
    pub fn new(image_size: u64, digests: Vec<ChunkDigest>) -> Option<Self> {
        (digests.len() as u64 == chunk_count(image_size)).then_some(Self {
            chunk_size: TREE_CHUNK_SIZE,
            image_size,
            digests,
        })
    }

    /// The digests, one per chunk in order.
    pub fn digests(&self) -> &[ChunkDigest] {
        &self.digests
    }

    /// The tree root.
    pub fn root(&self) -> TreeRoot {
        root_of(&self.digests)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.digests.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.root().0);
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a file's bytes; `path` names it in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, DigestFileError> {
        let bad = |reason: String| DigestFileError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER + 4 {
            return Err(bad(format!(
                "{} bytes, shorter than its header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("wrong magic".into()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32c::crc32c(body) != stored {
            return Err(bad("CRC-32C mismatch".into()));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let (chunk_size, image_size, count) = (u64_at(8), u64_at(16), u64_at(24));
        if chunk_size != TREE_CHUNK_SIZE {
            return Err(bad(format!(
                "chunk size {chunk_size}, expected {TREE_CHUNK_SIZE}"
            )));
        }
        if count != chunk_count(image_size) {
            return Err(bad(format!(
                "{count} chunks for an image of {image_size} bytes"
            )));
        }
        let listed = (body.len() - HEADER) / 32;
        if !(body.len() - HEADER).is_multiple_of(32) || listed as u64 != count {
            return Err(bad(format!(
                "{} bytes of digests for {count} chunks",
                body.len() - HEADER
            )));
        }
        let digests: Vec<ChunkDigest> = body[HEADER..]
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        let d = Self {
            chunk_size,
            image_size,
            digests,
        };
        if d.root().0[..] != body[32..64] {
            return Err(bad("the root is not the chunk digests' root".into()));
        }
        Ok(d)
    }

    /// Loads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, DigestFileError> {
        let bytes = std::fs::read(path).map_err(|source| DigestFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::decode(&bytes, path)
    }

    /// Writes the file at `path` durably: a new file beside it, synced, renamed over `path`,
    /// and the directory synced, so a power cut leaves the old file or the whole new one.
    pub fn write_durably(&self, path: &Path) -> Result<(), DigestFileError> {
        let io = |source| DigestFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&self.encode())?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::super::chunk_digest;
    use super::*;

    fn sample(image_size: u64) -> ChunkDigests {
        let digests = (0..chunk_count(image_size))
            .map(|i| chunk_digest(&i.to_le_bytes()))
            .collect();
        ChunkDigests::new(image_size, digests).unwrap()
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("qs-digest-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for size in [1, TREE_CHUNK_SIZE, 3 * TREE_CHUNK_SIZE + 5] {
            let d = sample(size);
            let path = dir.join(format!("{size}.sha256tree"));
            d.write_durably(&path).unwrap();
            assert_eq!(ChunkDigests::load(&path).unwrap(), d);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                64 + 32 * chunk_count(size) + 4
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_count_that_does_not_match_the_size_is_refused() {
        assert!(ChunkDigests::new(TREE_CHUNK_SIZE + 1, vec![[0; 32]]).is_none());
    }

    #[test]
    fn damage_is_refused() {
        let p = Path::new("x.sha256tree");
        let good = sample(2 * TREE_CHUNK_SIZE).encode();
        // Any flipped byte: the CRC (or, for the CRC itself, the mismatch) catches it.
        for at in [0, 9, 17, 25, 40, 70, good.len() - 1] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            assert!(ChunkDigests::decode(&b, p).is_err(), "byte {at}");
        }
        assert!(ChunkDigests::decode(&good[..good.len() - 1], p).is_err());
        assert!(ChunkDigests::decode(&[], p).is_err());
        // A consistent CRC over a wrong root is still refused.
        let mut b = good[..good.len() - 4].to_vec();
        b[33] ^= 1;
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let err = ChunkDigests::decode(&b, p).unwrap_err().to_string();
        assert!(err.contains("root"), "{err}");
    }
}
