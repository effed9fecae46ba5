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
//! **Sparse and incremental images.** An archive may store only some ranges of the image (a
//! [`Layout`]: whole [`CHUNK_SIZE`] chunks, the last one possibly short at the image's end): a
//! sparse full image leaves out holes and all-zero chunks, which read as zeros; an incremental
//! ([`ArchiveKind::Incremental`]) stores the chunks changed since its base checkpoint, and what it
//! leaves out is the base's data. Then `volume.img` is a GNU.sparse 1.0 member: the pax header
//! carries `GNU.sparse.major=1`, `GNU.sparse.minor=0`, `GNU.sparse.name=volume.img`,
//! `GNU.sparse.realsize=<volume_size>` and `size=` (the member's stored size) instead of `path=`;
//! the ustar name is `./GNUSparseFile.0/volume.img`; the member's data is the sparse map (see
//! [`sparse`]), padded to a block and counted in the prologue, then the stored ranges back to
//! back. GNU tar extracts a file of `volume_size` bytes with the data at its offsets and holes
//! elsewhere; a reader that does not know the format stops at a member of an unexpected name. An
//! archive storing every byte has a plain member, exactly as above.
//!
//! `chunks_crc32c` holds one CRC-32C per [`CHUNK_SIZE`] chunk of the *stored* data, in archive
//! order (for a whole image, of the image). The `digest` is always the `sha256-tree` root of the
//! whole image: for a sparse full image the chunks left out count as zeros; for an incremental,
//! as the base's. An incremental's `base_digest` is its base image's `digest`, so a chain of
//! archives is checked link by link ([`ImageChain`]).
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

mod checksums;
mod format;
mod pax;
mod reader;
mod restore;
mod sparse;

use serde::{Deserialize, Serialize};

use crate::digest::TreeRoot;

pub use checksums::{ChunkCrcs, ImageChecksums, ImageDigest, ImageSha};
pub use format::{epilogue, prologue};
pub use reader::{read_manifests, ArchiveManifests};
pub use restore::{restore, restore_into, ImageChain, ImageTarget, RestoreReport};
pub use sparse::{parse_map, Layout};

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
        if self.kind == ArchiveKind::Incremental {
            if self.is_v1() {
                return Err(format!("a {FORMAT_V1:?} archive cannot be incremental"));
            }
            if self.base_checkpoint.is_none() {
                return Err("an incremental manifest has no base_checkpoint".into());
            }
            let base = self
                .base_digest
                .as_deref()
                .ok_or("an incremental manifest has no base_digest")?;
            base.parse::<TreeRoot>()
                .map_err(|e| format!("base_digest: {e}"))?;
        }
        Ok(())
    }

    /// The number of `chunk_size` chunks `stored_bytes` of image data make (the last may be
    /// short): the number of CRC-32Cs of an archive storing that much.
    pub fn stored_chunk_count(&self, stored_bytes: u64) -> u64 {
        stored_bytes.div_ceil(self.chunk_size.max(1))
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

    /// Checks that this is a valid final manifest of an archive storing `stored_bytes` of image
    /// data: a well-formed digest (and SHA-256 where the format or `flat_sha256` calls for one)
    /// and one CRC per chunk of stored data.
    pub(crate) fn check_final(&self, stored_bytes: u64) -> Result<(), String> {
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
                let chunks = self.stored_chunk_count(stored_bytes);
                if c.len() as u64 != chunks {
                    return Err(format!(
                        "chunks_crc32c has {} entries, but {stored_bytes} stored bytes in chunks \
                         of {} make {chunks}",
                        c.len(),
                        self.chunk_size,
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
    /// The stored ranges given to the writer break the rules of a [`Layout`].
    #[error("invalid layout: {0}")]
    InvalidLayout(String),
    /// A sparse `volume.img` member has a malformed header or map, or sizes that do not add up.
    #[error("sparse volume.img at offset {offset}: {reason}")]
    BadSparseMember {
        /// The archive offset of the member's (first) header.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// An archive does not apply onto what was restored before it (an incremental without its
    /// base, or onto another image).
    #[error("{0}")]
    WrongBase(String),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_of_both_formats_check() {
        let initial = sample_manifest(4096, "merge");
        let tree = crate::digest::tree_root(&[0; 4096]).to_string();
        let fin = initial.finalized(ImageChecksums {
            digest: Some(tree.clone()),
            sha256: None,
            chunks_crc32c: vec![0],
        });
        assert_eq!(fin.check_final(4096), Ok(()));
        let json = String::from_utf8(fin.to_json().unwrap()).unwrap();
        assert!(json.contains("\"digest\":\"sha256-tree:"), "{json}");
        assert!(!json.contains("sha256\":"), "{json}");
        // A flat SHA-256 the initial manifest did not announce, or one missing, is refused.
        let sha = "0".repeat(64);
        let mut extra = fin.clone();
        extra.sha256 = Some(sha.clone());
        assert!(extra.check_final(4096).is_err());
        let mut flat = initial.clone();
        flat.flat_sha256 = true;
        assert_eq!(flat.check_initial(), Ok(()));
        let mut missing = fin.clone();
        missing.flat_sha256 = true;
        assert!(missing.check_final(4096).is_err());
        missing.sha256 = Some(sha.clone());
        assert_eq!(missing.check_final(4096), Ok(()));
        // No digest, or a malformed one, is refused in this format.
        let mut none = fin.clone();
        none.digest = None;
        assert!(none.check_final(4096).is_err());
        let mut bad = fin.clone();
        bad.digest = Some(tree.replace("sha256-tree", "sha256"));
        assert!(bad.check_final(4096).is_err());
        // The first format: a flat SHA-256 and no digest.
        let mut v1 = fin.clone();
        v1.format = FORMAT_V1.into();
        assert!(v1.check_final(4096).is_err());
        v1.digest = None;
        assert!(v1.check_final(4096).is_err());
        v1.sha256 = Some(sha);
        assert_eq!(v1.check_final(4096), Ok(()));
    }
}
