//! The checksums of an archive's image: its `sha256-tree` digest, its flat SHA-256 and the
//! CRC-32C of each chunk, computed as the data streams.

use sha2::{Digest, Sha256};

use super::{Manifest, TapeError};
use crate::digest::{to_hex, TreeHasher};

/// The checksums of an image that a final manifest carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageChecksums {
    /// The `sha256-tree` digest (`sha256-tree:<hex>`); `None` for a [`FORMAT_V1`] archive.
    pub digest: Option<String>,
    /// The flat SHA-256 (lowercase hex), when asked for (always in [`FORMAT_V1`]).
    pub sha256: Option<String>,
    /// The CRC-32C of each chunk, the last one possibly short.
    pub chunks_crc32c: Vec<u32>,
}

/// Incremental checksums of an image as it streams on one core: its tree digest, its flat
/// SHA-256 when asked for, and the CRC-32C of each chunk.
///
/// Feed the bytes in order with [`ImageDigest::update`], in pieces of any size. The parts are
/// also usable apart ([`TreeHasher`], [`ImageSha`], [`ChunkCrcs`]), so a backup computes them on
/// different cores.
#[derive(Clone, Debug)]
pub struct ImageDigest {
    tree: Option<TreeHasher>,
    sha: Option<ImageSha>,
    crcs: ChunkCrcs,
}

impl ImageDigest {
    /// The tree digest, the flat SHA-256 if `flat_sha256`, and one CRC-32C per `chunk_size`
    /// bytes ([`CHUNK_SIZE`] for backups).
    ///
    /// Fails with [`TapeError::InvalidChunkSize`] if `chunk_size` is 0.
    pub fn new(chunk_size: u64, flat_sha256: bool) -> Result<Self, TapeError> {
        Ok(Self {
            tree: Some(TreeHasher::default()),
            sha: flat_sha256.then(ImageSha::default),
            crcs: ChunkCrcs::new(chunk_size)?,
        })
    }

    /// The checksums an archive with the initial manifest `m` carries.
    pub fn for_manifest(m: &Manifest) -> Result<Self, TapeError> {
        Ok(Self {
            tree: (!m.is_v1()).then(TreeHasher::default),
            sha: (m.is_v1() || m.flat_sha256).then(ImageSha::default),
            crcs: ChunkCrcs::new(m.chunk_size)?,
        })
    }

    /// Adds the next bytes of the image.
    pub fn update(&mut self, data: &[u8]) {
        if let Some(t) = self.tree.as_mut() {
            t.update(data);
        }
        if let Some(s) = self.sha.as_mut() {
            s.update(data);
        }
        self.crcs.update(data);
    }

    /// The number of bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.crcs.bytes()
    }

    /// The checksums.
    pub fn finish(self) -> ImageChecksums {
        ImageChecksums {
            digest: self.tree.map(|t| t.finish().to_string()),
            sha256: self.sha.map(ImageSha::finish),
            chunks_crc32c: self.crcs.finish(),
        }
    }
}

/// The SHA-256 of an image, fed in order.
#[derive(Clone, Default)]
pub struct ImageSha {
    sha: Sha256,
    bytes: u64,
}

impl ImageSha {
    /// Adds the next bytes of the image.
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.bytes += data.len() as u64;
    }

    /// The number of bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The SHA-256 in lowercase hex.
    pub fn finish(self) -> String {
        to_hex(&self.sha.finalize())
    }
}

impl std::fmt::Debug for ImageSha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSha")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// The CRC-32C of each chunk of an image, fed in order in pieces of any size.
#[derive(Clone, Debug)]
pub struct ChunkCrcs {
    chunk_size: u64,
    /// Bytes of the current (incomplete) chunk seen so far.
    in_chunk: u64,
    /// CRC-32C of the current chunk so far.
    crc: u32,
    crcs: Vec<u32>,
    bytes: u64,
}

impl ChunkCrcs {
    /// One CRC-32C per `chunk_size` bytes.
    ///
    /// Fails with [`TapeError::InvalidChunkSize`] if `chunk_size` is 0.
    pub fn new(chunk_size: u64) -> Result<Self, TapeError> {
        if chunk_size == 0 {
            return Err(TapeError::InvalidChunkSize);
        }
        Ok(Self {
            chunk_size,
            in_chunk: 0,
            crc: 0,
            crcs: Vec::new(),
            bytes: 0,
        })
    }

    /// Adds the next bytes of the image.
    pub fn update(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            let room = self.chunk_size - self.in_chunk;
            let take = room.min(data.len() as u64) as usize;
            let (head, rest) = data.split_at(take);
            self.crc = crc32c::crc32c_append(self.crc, head);
            self.in_chunk += take as u64;
            data = rest;
            if self.in_chunk == self.chunk_size {
                self.crcs.push(self.crc);
                self.crc = 0;
                self.in_chunk = 0;
            }
        }
    }

    /// The number of bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The CRC-32C of each chunk, the last one possibly short.
    pub fn finish(mut self) -> Vec<u32> {
        if self.in_chunk > 0 {
            self.crcs.push(self.crc);
        }
        self.crcs
    }
}

#[cfg(test)]
mod tests {
    use super::super::CHUNK_SIZE;
    use super::*;

    #[test]
    fn digest_chunks_match_whole_computation() {
        let data: Vec<u8> = (0..(3 * 1024 * 1024 + 100))
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        for piece in [7usize, 512, 1024, 5000, 1 << 20] {
            let mut d = ImageDigest::new(1024, true).unwrap();
            for p in data.chunks(piece) {
                d.update(p);
            }
            assert_eq!(d.bytes(), data.len() as u64);
            let c = d.finish();
            let want: Vec<u32> = data.chunks(1024).map(crc32c::crc32c).collect();
            assert_eq!(c.chunks_crc32c, want, "piece {piece}");
            assert_eq!(c.sha256, Some(to_hex(&Sha256::digest(&data))));
            assert_eq!(c.digest, Some(crate::digest::tree_root(&data).to_string()));
        }
        let c = ImageDigest::new(CHUNK_SIZE, false).unwrap().finish();
        assert_eq!(c.sha256, None);
    }

    #[test]
    fn digest_rejects_zero_chunk_size() {
        assert!(matches!(
            ImageDigest::new(0, false),
            Err(TapeError::InvalidChunkSize)
        ));
    }

    #[test]
    fn digest_of_nothing() {
        let c = ImageDigest::new(CHUNK_SIZE, true).unwrap().finish();
        assert!(c.chunks_crc32c.is_empty());
        assert_eq!(
            c.sha256.as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
    }

    #[test]
    fn hex() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
