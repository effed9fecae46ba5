//! The on-tape format of quicksplit's backups.
//!
//! A backup is a POSIX pax (tar) archive written in fixed-size records (by default
//! [`DEFAULT_RECORD_SIZE`], 256 KiB = 512 tar blocks), so GNU tar reads it with
//! `tar -x -b 512 -f ARCHIVE`. It holds, in this order:
//!
//! 1. `manifest.json`: the *initial* manifest, describing the backup, with no `digest` and
//!    `"chunks_crc32c": null` (the checksums are not known before the image is written);
//! 2. a pax extended header (typeflag `x`) for `volume.img`, carrying `size=` (the image may
//!    exceed the 8 GiB limit of the ustar size field), `path=` and a `comment=` used as padding;
//! 3. `volume.img`: the image, `volume_size` bytes, padded with zeros to a 512-byte block;
//! 4. `manifest.json` again: the *final* manifest, with the image's `sha256-tree` digest
//!    ([`crate::digest`]), its flat SHA-256 when the initial manifest says `flat_sha256`, and the
//!    CRC-32C of each [`CHUNK_SIZE`] chunk filled in;
//! 5. the end-of-archive marker (two zero blocks) and zeros up to a whole record.
//!
//! The `comment=` record of the pax header is sized so that everything before the image data
//! (the [`prologue`]) is an exact multiple of the record size: the image data starts on a record
//! boundary, and the engine writes it to the tape straight from its DMA buffers, record by record,
//! with no copy to shift it into place. Only the last record of the image is shared with the
//! [`epilogue`], which completes it.
//!
//! The manifest appears twice because a tape is written once, front to back: the checksums are
//! only known after the image has streamed by, so they go into a second copy written after it.
//! The first copy tells a reader what it is about to restore before the image starts; GNU tar,
//! extracting the members in order, overwrites it with the second, so the extracted
//! `manifest.json` is the final one. [`restore`] checks that both copies agree on everything but
//! the checksums.
//!
//! Archives of the first format ([`FORMAT_V1`]) carry the flat SHA-256 alone; [`restore`] still
//! reads and verifies them.

mod format;
mod reader;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::digest::{TreeHasher, TreeRoot};

pub use format::{epilogue, prologue};
pub use reader::{restore, RestoreReport};

/// The default tape record size: 256 KiB, i.e. 512 tar blocks (`tar -b 512`).
pub const DEFAULT_RECORD_SIZE: usize = 262_144;

/// The CRC-32C granularity of the image: one checksum per chunk of this many bytes.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// The size of a tar block; every record size must be a multiple of it.
pub const BLOCK_SIZE: usize = 512;

/// The value of [`Manifest::format`] for this version of the format: the image's checksum is its
/// `sha256-tree` digest (and a flat SHA-256 only when asked for).
pub const FORMAT: &str = "quicksplit-backup-2";

/// The first format, still restored: the image's checksum is its flat SHA-256.
pub const FORMAT_V1: &str = "quicksplit-backup-1";

/// The archive member name of the manifests.
pub const MANIFEST_NAME: &str = "manifest.json";

/// The archive member name of the image.
pub const VOLUME_NAME: &str = "volume.img";

/// What a backup holds, stored as JSON in the archive's `manifest.json` members.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The format of the archive: [`FORMAT`].
    pub format: String,
    /// The name of the pair the image was split from.
    pub pair: String,
    /// The size of the image in bytes (not zero).
    pub volume_size: u64,
    /// The block size of the volume.
    pub block_size: u32,
    /// The track size of the pair.
    pub track_size: u64,
    /// When the split happened (nanoseconds since the Unix epoch).
    pub split_at_ns: u64,
    /// The split mode: "wait", "reflect" or "merge".
    pub mode: String,
    /// When the backup was started (nanoseconds since the Unix epoch).
    pub created_at_ns: u64,
    /// The CRC-32C granularity of [`Manifest::chunks_crc32c`]: [`CHUNK_SIZE`].
    pub chunk_size: u64,
    /// The final manifest carries the image's flat SHA-256 too (stated in both manifests, so a
    /// reader knows before the image which checksums to compute).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flat_sha256: bool,
    /// The image's `sha256-tree` digest (`sha256-tree:<hex>`); `None` in the initial manifest
    /// and in [`FORMAT_V1`] archives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The flat SHA-256 of the image, lowercase hex: in a final manifest that has
    /// `flat_sha256`, and in every final manifest of [`FORMAT_V1`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The CRC-32C of each `chunk_size` chunk of the image (the last may be short); `None` in the
    /// initial manifest.
    pub chunks_crc32c: Option<Vec<u32>>,
    /// A full image or an incremental one (the tracks changed since `base_checkpoint`).
    #[serde(default, skip_serializing_if = "ArchiveKind::is_full")]
    pub kind: ArchiveKind,
    /// The checkpoint the backup gave its pair at the image's split, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// An incremental's base: the checkpoint whose image it applies onto.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_checkpoint: Option<String>,
    /// An incremental's base: the digest of the checkpoint's image (what the previous archive of
    /// a restore chain must hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
}

/// Refuses a layout other than the whole image of `volume_size` bytes (archives of the current
/// format hold every byte).
pub fn check_whole(stored: &[std::ops::Range<u64>], volume_size: u64) -> Result<(), String> {
    if stored.len() != 1 || stored[0] != (0..volume_size) {
        return Err("an archive holds the whole image: sparse archives are not written".into());
    }
    Ok(())
}

/// What an archive's image is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveKind {
    /// The whole image (holes, if any, are zeros).
    #[default]
    Full,
    /// The tracks changed since the base checkpoint (holes are unchanged data).
    Incremental,
}

impl ArchiveKind {
    /// True for a full image.
    pub fn is_full(&self) -> bool {
        *self == ArchiveKind::Full
    }
}

impl Manifest {
    /// The number of `chunk_size` chunks of the image (the last may be short); 0 if `chunk_size`
    /// is 0.
    pub fn chunk_count(&self) -> u64 {
        if self.chunk_size == 0 {
            0
        } else {
            self.volume_size.div_ceil(self.chunk_size)
        }
    }

    /// This manifest with the checksums filled in: the final manifest, from the initial one and
    /// the results of [`ImageDigest::finish`].
    pub fn finalized(&self, checksums: ImageChecksums) -> Manifest {
        Manifest {
            digest: checksums.digest,
            sha256: checksums.sha256,
            chunks_crc32c: Some(checksums.chunks_crc32c),
            ..self.clone()
        }
    }

    /// This manifest with the checksums cleared: what the initial manifest must be.
    pub(crate) fn without_checksums(&self) -> Manifest {
        Manifest {
            digest: None,
            sha256: None,
            chunks_crc32c: None,
            ..self.clone()
        }
    }

    /// True for an archive of the first format (a flat SHA-256, no tree digest).
    pub fn is_v1(&self) -> bool {
        self.format == FORMAT_V1
    }

    /// Checks the fields both manifests must satisfy.
    fn check_common(&self) -> Result<(), String> {
        if self.format != FORMAT && self.format != FORMAT_V1 {
            return Err(format!(
                "format is {:?}, expected {FORMAT:?} (or {FORMAT_V1:?})",
                self.format
            ));
        }
        if self.is_v1() && self.flat_sha256 {
            return Err(format!("flat_sha256 is set in a {FORMAT_V1:?} manifest"));
        }
        if self.volume_size == 0 {
            return Err("volume_size is 0".into());
        }
        if self.chunk_size == 0 {
            return Err("chunk_size is 0".into());
        }
        Ok(())
    }

    /// Checks that this is a valid initial manifest: no checksums yet.
    pub(crate) fn check_initial(&self) -> Result<(), String> {
        self.check_common()?;
        if self.sha256.is_some() {
            return Err("sha256 is set in the initial manifest".into());
        }
        if self.digest.is_some() {
            return Err("digest is set in the initial manifest".into());
        }
        if self.chunks_crc32c.is_some() {
            return Err("chunks_crc32c is set in the initial manifest".into());
        }
        Ok(())
    }

    /// Checks that this is a valid final manifest: a well-formed digest (and SHA-256 where the
    /// format or `flat_sha256` calls for one) and one CRC per chunk.
    pub(crate) fn check_final(&self) -> Result<(), String> {
        self.check_common()?;
        match (&self.digest, self.is_v1()) {
            (None, false) => return Err("digest is missing from the final manifest".into()),
            (Some(_), true) => return Err(format!("digest is set in a {FORMAT_V1:?} manifest")),
            (Some(d), false) => {
                d.parse::<TreeRoot>().map_err(|e| format!("digest: {e}"))?;
            }
            (None, true) => {}
        }
        match (&self.sha256, self.is_v1() || self.flat_sha256) {
            (None, true) => return Err("sha256 is missing from the final manifest".into()),
            (Some(_), false) => {
                return Err("sha256 is set but the initial manifest has no flat_sha256".into())
            }
            (Some(h), true) => {
                if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(format!(
                        "sha256 {h:?} is not 64 lowercase hexadecimal digits"
                    ));
                }
            }
            (None, false) => {}
        }
        match &self.chunks_crc32c {
            None => return Err("chunks_crc32c is missing from the final manifest".into()),
            Some(c) => {
                if c.len() as u64 != self.chunk_count() {
                    return Err(format!(
                        "chunks_crc32c has {} entries, but {} bytes in chunks of {} make {}",
                        c.len(),
                        self.volume_size,
                        self.chunk_size,
                        self.chunk_count()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Serializes the manifest as the content of a `manifest.json` member.
    pub(crate) fn to_json(&self) -> Result<Vec<u8>, TapeError> {
        let mut json = serde_json::to_vec(self).map_err(TapeError::Serialize)?;
        json.push(b'\n');
        Ok(json)
    }
}

/// Errors of writing and reading backup archives.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapeError {
    /// The record size is not a positive multiple of 512.
    #[error("record size {0} is not a positive multiple of 512")]
    InvalidRecordSize(usize),
    /// A chunk size of 0 was given.
    #[error("chunk size must not be 0")]
    InvalidChunkSize,
    /// A manifest given to the writer is not valid for its place in the archive.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// A value does not fit its ustar header field.
    #[error("{field} {value} does not fit in its tar header field")]
    FieldOverflow {
        /// Which field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// The manifest could not be serialized.
    #[error("serializing the manifest: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Reading the archive or writing the restored image failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The archive ended early.
    #[error("archive truncated: input ends at offset {offset} while reading {what}")]
    Truncated {
        /// What was being read.
        what: String,
        /// The archive offset where the input ended.
        offset: u64,
    },
    /// A header (ustar or pax) is malformed.
    #[error("malformed header at offset {offset}: {reason}")]
    MalformedHeader {
        /// The archive offset of the header.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The archive ended (end-of-archive marker) before an expected member.
    #[error("missing member: the archive ends at offset {offset} before {expected}")]
    MissingMember {
        /// The member that was expected.
        expected: String,
        /// The offset of the end-of-archive marker.
        offset: u64,
    },
    /// A member is not the one expected at its place.
    #[error("unexpected member {found:?} at offset {offset}: expected {expected}")]
    UnexpectedMember {
        /// The member that was expected.
        expected: String,
        /// The member found.
        found: String,
        /// The archive offset of its header.
        offset: u64,
    },
    /// A manifest in the archive cannot be parsed or is not valid.
    #[error("{which} manifest at offset {offset}: {reason}")]
    BadManifest {
        /// "initial" or "final".
        which: &'static str,
        /// The archive offset of its header.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// `volume.img` does not have the size the initial manifest gives.
    #[error("volume.img is {found} bytes but the manifest says {expected}")]
    VolumeSizeMismatch {
        /// The manifest's `volume_size`.
        expected: u64,
        /// The member's size.
        found: u64,
    },
    /// The initial and final manifests differ in more than the checksums.
    #[error("the initial and final manifests disagree on {fields}")]
    ManifestMismatch {
        /// The fields that differ, comma-separated.
        fields: String,
    },
    /// A chunk of the image does not have the CRC-32C of the final manifest.
    #[error(
        "chunk {index} (offset {offset}): CRC-32C mismatch (manifest {expected:#010x}, data {actual:#010x})"
    )]
    ChunkCrcMismatch {
        /// The chunk number.
        index: u64,
        /// Its offset in the image.
        offset: u64,
        /// The CRC-32C in the final manifest.
        expected: u32,
        /// The CRC-32C of the data read.
        actual: u32,
    },
    /// The image does not have the `sha256-tree` digest of the final manifest.
    #[error("image digest mismatch: manifest {expected}, data {actual}{}", damaged_chunk(.damaged))]
    DigestMismatch {
        /// The digest in the final manifest.
        expected: String,
        /// The digest of the data read.
        actual: String,
        /// The first chunk whose CRC-32C fails too, and its offset: where the damage is.
        damaged: Option<(u64, u64)>,
    },
    /// The image does not have the SHA-256 of the final manifest.
    #[error("SHA-256 mismatch: manifest {expected}, data {actual}")]
    Sha256Mismatch {
        /// The SHA-256 in the final manifest.
        expected: String,
        /// The SHA-256 of the data read.
        actual: String,
    },
}

/// Where the damage is, after a digest mismatch.
fn damaged_chunk(damaged: &Option<(u64, u64)>) -> String {
    match damaged {
        Some((index, offset)) => {
            format!("; chunk {index} (offset {offset}) fails its CRC-32C too")
        }
        None => String::new(),
    }
}

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

/// An initial manifest for unit tests of the format and the reader.
#[cfg(test)]
pub(crate) fn sample_manifest(volume_size: u64, mode: &str) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        pair: "p0".into(),
        volume_size,
        block_size: 4096,
        track_size: 1 << 20,
        split_at_ns: 1,
        mode: mode.into(),
        created_at_ns: 2,
        chunk_size: CHUNK_SIZE,
        flat_sha256: false,
        digest: None,
        sha256: None,
        chunks_crc32c: None,
        kind: Default::default(),
        checkpoint: None,
        base_checkpoint: None,
        base_digest: None,
    }
}

use crate::digest::to_hex;

#[cfg(test)]
mod tests {
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
    fn manifests_of_both_formats_check() {
        let initial = sample_manifest(4096, "merge");
        let tree = crate::digest::tree_root(&[0; 4096]).to_string();
        let fin = initial.finalized(ImageChecksums {
            digest: Some(tree.clone()),
            sha256: None,
            chunks_crc32c: vec![0],
        });
        assert_eq!(fin.check_final(), Ok(()));
        let json = String::from_utf8(fin.to_json().unwrap()).unwrap();
        assert!(json.contains("\"digest\":\"sha256-tree:"), "{json}");
        assert!(!json.contains("sha256\":"), "{json}");
        // A flat SHA-256 the initial manifest did not announce, or one missing, is refused.
        let sha = "0".repeat(64);
        let mut extra = fin.clone();
        extra.sha256 = Some(sha.clone());
        assert!(extra.check_final().is_err());
        let mut flat = initial.clone();
        flat.flat_sha256 = true;
        assert_eq!(flat.check_initial(), Ok(()));
        let mut missing = fin.clone();
        missing.flat_sha256 = true;
        assert!(missing.check_final().is_err());
        missing.sha256 = Some(sha.clone());
        assert_eq!(missing.check_final(), Ok(()));
        // No digest, or a malformed one, is refused in this format.
        let mut none = fin.clone();
        none.digest = None;
        assert!(none.check_final().is_err());
        let mut bad = fin.clone();
        bad.digest = Some(tree.replace("sha256-tree", "sha256"));
        assert!(bad.check_final().is_err());
        // The first format: a flat SHA-256 and no digest.
        let mut v1 = fin.clone();
        v1.format = FORMAT_V1.into();
        assert!(v1.check_final().is_err());
        v1.digest = None;
        assert!(v1.check_final().is_err());
        v1.sha256 = Some(sha);
        assert_eq!(v1.check_final(), Ok(()));
    }

    #[test]
    fn hex() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
