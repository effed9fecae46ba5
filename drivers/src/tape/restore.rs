//! Restoring and verifying a backup archive as it streams from a file or a tape, alone or as a
//! link of a chain (a full archive, then its incrementals).

use std::io::{Read, Write};
use std::ops::Range;

use super::format::pad512;
use super::reader::{next_entry, read_head, read_tail, stream, Head, Next, RecordStream};
use super::{ArchiveKind, ChunkCrcs, ImageSha, Layout, Manifest, TapeError, CHUNK_SIZE};
use crate::digest::{chunk_digest, root_of, ChunkDigest, ChunkHasher, TreeRoot};

/// Where a restored image goes: written at image offsets, increasing from call to call.
pub trait ImageTarget {
    /// Writes `data` at `offset` of the image.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros: a hole of a full archive (a new file leaves
    /// it a hole, a device is written zeros). Holes of an incremental are not zeroed but left
    /// as the base has them: this is not called for them.
    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// A full image written in order to a stream (holes as zeros).
struct Sequential<W> {
    out: W,
    pos: u64,
}

/// Zeros written for the holes of a full image, and hashed for its flat SHA-256.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Passes `len` zeros to `f` in pieces.
fn for_zeros(mut len: u64, mut f: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        f(&ZEROS[..n])?;
        len -= n as u64;
    }
    Ok(())
}

impl<W: Write> ImageTarget for Sequential<W> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if offset != self.pos {
            return Err(std::io::Error::other(format!(
                "a stream is written in order: offset {offset}, expected {}",
                self.pos
            )));
        }
        self.out.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_at(offset, &[])?;
        for_zeros(len, |z| self.out.write_all(z))?;
        self.pos += len;
        Ok(())
    }
}

/// The chunk digests of the image restored so far along a chain: a full archive sets every
/// chunk (the holes' as zeros'), each incremental replaces the chunks it stores. After each
/// archive, their root must be the archive's digest; an incremental applies only onto the image
/// its `base_digest` names.
#[derive(Debug, Clone, Default)]
pub struct ImageChain {
    volume_size: u64,
    digests: Vec<ChunkDigest>,
    /// The verified digest of the image restored so far; `None` before a full archive (or
    /// after one of the first format, which has no chunk digests).
    root: Option<TreeRoot>,
}

impl ImageChain {
    /// No image yet: the next archive must be a full one.
    pub fn new() -> Self {
        Self::default()
    }

    /// The verified `sha256-tree` digest of the image restored so far, if any.
    pub fn root(&self) -> Option<TreeRoot> {
        self.root
    }

    /// Starts a full image of `volume_size` bytes: every chunk zeros until its data arrives.
    fn start_full(&mut self, volume_size: u64) {
        let count = crate::digest::chunk_count(volume_size);
        let zero = chunk_digest(&vec![0; CHUNK_SIZE as usize]);
        self.digests = vec![zero; count as usize];
        let tail = volume_size % CHUNK_SIZE;
        if tail != 0 {
            if let Some(last) = self.digests.last_mut() {
                *last = chunk_digest(&vec![0; tail as usize]);
            }
        }
        self.volume_size = volume_size;
        self.root = None;
    }

    /// Checks that the incremental `m` applies onto the image restored so far.
    fn check_base(&self, m: &Manifest) -> Result<(), TapeError> {
        let base = m.base_digest.as_deref().unwrap_or_default();
        let checkpoint = m.base_checkpoint.as_deref().unwrap_or_default();
        let Some(root) = self.root else {
            return Err(TapeError::WrongBase(format!(
                "an incremental archive (changes since checkpoint {checkpoint:?}) applies onto \
                 its base image: restore the full archive first"
            )));
        };
        if self.volume_size != m.volume_size {
            return Err(TapeError::WrongBase(format!(
                "the incremental archive is of a {}-byte image, the image restored so far has {}",
                m.volume_size, self.volume_size
            )));
        }
        if root.to_string() != base {
            return Err(TapeError::WrongBase(format!(
                "the incremental archive applies onto an image of digest {base} (checkpoint \
                 {checkpoint:?}), but the image restored so far has {root}"
            )));
        }
        Ok(())
    }
}

/// What [`restore`] restored and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    /// The final manifest of the archive.
    pub manifest: Manifest,
    /// The size of the image.
    pub bytes: u64,
    /// The bytes of image data the archive stored (less than `bytes` for a sparse or
    /// incremental archive).
    pub stored: u64,
    /// The image's `sha256-tree` digest, equal to the manifest's (`None` for an archive of the
    /// first format, which has none).
    pub digest: Option<String>,
    /// The flat SHA-256 of the image (lowercase hex), equal to the manifest's, when the archive
    /// has one and it could be checked (not for an incremental, whose unchanged data is not
    /// read).
    pub sha256: Option<String>,
}

/// Reads an archive stream (a file or a tape device, read in `record_size` reads) of a full
/// image and writes the image to `out` in order, holes as zeros; see [`restore_into`] for what
/// is verified. An incremental archive is refused: it needs its base image.
pub fn restore(
    input: impl Read,
    out: impl Write,
    record_size: usize,
) -> Result<RestoreReport, TapeError> {
    let mut target = Sequential { out, pos: 0 };
    let report = restore_into(input, &mut target, record_size, &mut ImageChain::new())?;
    target.out.flush().map_err(|source| TapeError::Io {
        context: "flushing the restored image".into(),
        source,
    })?;
    Ok(report)
}

/// The checksums computed as the data streams.
struct Computed {
    crcs: ChunkCrcs,
    /// The flat SHA-256, when the manifest has one and the archive is a full image.
    sha: Option<ImageSha>,
    /// The chunk being hashed for the tree digest (not for the first format).
    chunk: Option<ChunkHasher>,
}

/// Reads an archive stream (a file or a tape device, read in `record_size` reads), writes the
/// image data it stores to `target` at its offsets (and, for a full archive, zeros where it
/// stores none), and verifies it:
///
/// - the initial and final manifests agree on everything but the checksums;
/// - every chunk of stored data has its CRC-32C of the final manifest;
/// - `chain` (the image restored so far) then has the final manifest's `sha256-tree` digest:
///   a full archive starts `chain` anew, an incremental must apply onto the image `chain` holds
///   (its `base_digest`), which is checked before anything is written;
/// - the flat SHA-256, when a full archive has one.
///
/// Archives of the first format, which have a flat SHA-256 and no digest, are verified against
/// that. Any mismatch, truncation, missing member, malformed header or sparse map is an error
/// naming what failed; `target` may have received data even then, and `chain` is then no longer
/// usable.
pub fn restore_into(
    input: impl Read,
    target: &mut dyn ImageTarget,
    record_size: usize,
    chain: &mut ImageChain,
) -> Result<RestoreReport, TapeError> {
    let mut s = stream(input, record_size)?;
    let Head { initial, layout } = read_head(&mut s)?;
    let full = initial.kind == ArchiveKind::Full;
    if full {
        chain.start_full(initial.volume_size);
    } else {
        chain.check_base(&initial)?;
    }
    let mut computed = Computed {
        crcs: ChunkCrcs::new(initial.chunk_size)?,
        sha: (full && (initial.is_v1() || initial.flat_sha256)).then(ImageSha::default),
        chunk: (!initial.is_v1()).then(ChunkHasher::default),
    };
    stream_data(&mut s, &layout, full, target, chain, &mut computed)?;
    let stored = layout.stored_bytes();
    s.skip(pad512(stored) - stored, "the padding of volume.img")?;
    let manifest = read_tail(&mut s, &initial, &layout)?;

    let digest = (!initial.is_v1()).then(|| root_of(&chain.digests).to_string());
    verify(&manifest, &layout, computed, digest.as_deref())?;
    chain.root = digest.as_deref().and_then(|d| d.parse().ok());

    match next_entry(&mut s)? {
        Next::End(_) => {}
        Next::Entry(e) => {
            return Err(TapeError::UnexpectedMember {
                expected: "the end-of-archive marker".into(),
                found: e.name,
                offset: e.offset,
            })
        }
    }
    Ok(RestoreReport {
        bytes: manifest.volume_size,
        stored,
        digest,
        sha256: manifest.sha256.clone().filter(|_| full),
        manifest,
    })
}

/// Streams the stored ranges to `target`, zeroing a full image's holes, and computes the
/// checksums: the CRCs of the stored data, the digest of each stored chunk into `chain`.
fn stream_data<R: Read>(
    s: &mut RecordStream<R>,
    layout: &Layout,
    full: bool,
    target: &mut dyn ImageTarget,
    chain: &mut ImageChain,
    c: &mut Computed,
) -> Result<(), TapeError> {
    let write_error = |offset: u64| {
        move |source| TapeError::Io {
            context: format!("writing the restored image at offset {offset}"),
            source,
        }
    };
    let zero_hole = |hole: Range<u64>, target: &mut dyn ImageTarget, c: &mut Computed| {
        if full && !hole.is_empty() {
            let len = hole.end - hole.start;
            target
                .zero(hole.start, len)
                .map_err(write_error(hole.start))?;
            if let Some(sha) = c.sha.as_mut() {
                let _ = for_zeros(len, |z| {
                    sha.update(z);
                    Ok(())
                });
            }
        }
        Ok::<(), TapeError>(())
    };
    let mut hole_start = 0u64;
    for range in layout.stored() {
        zero_hole(hole_start..range.start, target, c)?;
        let mut at = range.start;
        s.for_each(range.end - range.start, "the data of volume.img", |data| {
            target.write_at(at, data).map_err(write_error(at))?;
            c.crcs.update(data);
            if let Some(sha) = c.sha.as_mut() {
                sha.update(data);
            }
            if let Some(hasher) = c.chunk.as_mut() {
                hash_chunks(hasher, at, data, range.end, &mut chain.digests);
            }
            at += data.len() as u64;
            Ok(())
        })?;
        hole_start = range.end;
    }
    zero_hole(hole_start..layout.volume_size(), target, c)
}

/// Feeds `data` (at image offset `at`, in a range ending at `range_end`) to the chunk hasher,
/// storing each chunk's digest as it completes: on a chunk boundary or at the range's end
/// (ranges hold whole chunks, the last one possibly short at the image's end).
fn hash_chunks(
    hasher: &mut ChunkHasher,
    mut at: u64,
    mut data: &[u8],
    range_end: u64,
    digests: &mut [ChunkDigest],
) {
    while !data.is_empty() {
        let chunk_end = ((at / CHUNK_SIZE) + 1) * CHUNK_SIZE;
        let take = (chunk_end.min(range_end) - at).min(data.len() as u64) as usize;
        hasher.update(&data[..take]);
        at += take as u64;
        data = &data[take..];
        if at == chunk_end || at == range_end {
            let index = ((at - 1) / CHUNK_SIZE) as usize;
            let digest = hasher.finish_reset();
            if let Some(slot) = digests.get_mut(index) {
                *slot = digest;
            }
        }
    }
}

/// Compares the computed checksums with the final manifest's: the digest is the image's proof;
/// the CRCs then tell where a damaged image is damaged.
fn verify(
    manifest: &Manifest,
    layout: &Layout,
    computed: Computed,
    digest: Option<&str>,
) -> Result<(), TapeError> {
    let crcs = computed.crcs.finish();
    let expected_crcs = manifest.chunks_crc32c.as_deref().unwrap_or_default();
    let crc_mismatch = expected_crcs
        .iter()
        .zip(&crcs)
        .enumerate()
        .find(|(_, (e, a))| e != a)
        .map(|(index, (&expected, &actual))| {
            let data_offset = index as u64 * manifest.chunk_size;
            let offset = layout.image_offset(data_offset).unwrap_or(data_offset);
            (index as u64, offset, expected, actual)
        });
    if manifest.digest.as_deref() != digest {
        return Err(TapeError::DigestMismatch {
            expected: manifest.digest.clone().unwrap_or_default(),
            actual: digest.unwrap_or_default().to_string(),
            damaged: crc_mismatch.map(|(i, offset, _, _)| (i, offset)),
        });
    }
    if let Some((index, offset, expected, actual)) = crc_mismatch {
        return Err(TapeError::ChunkCrcMismatch {
            index,
            offset,
            expected,
            actual,
        });
    }
    if expected_crcs.len() != crcs.len() {
        // Not reachable after the checks above (sizes agree); kept as a guard.
        return Err(TapeError::BadManifest {
            which: "final",
            offset: 0,
            reason: format!(
                "{} chunk CRCs for {} chunks of data",
                expected_crcs.len(),
                crcs.len()
            ),
        });
    }
    if let Some(sha) = computed.sha {
        let actual = sha.finish();
        if manifest.sha256.as_deref() != Some(actual.as_str()) {
            return Err(TapeError::Sha256Mismatch {
                expected: manifest.sha256.clone().unwrap_or_default(),
                actual,
            });
        }
    }
    Ok(())
}
#[cfg(test)]
// Lists of stored ranges may be one range long.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use std::io::ErrorKind;

    use sha2::Digest;

    use super::super::{epilogue, prologue, ImageChecksums, ImageDigest, CHUNK_SIZE};
    use super::*;
    use crate::digest::tree_root;

    const MIB: u64 = CHUNK_SIZE;

    fn manifest(volume_size: u64) -> Manifest {
        super::super::sample_manifest(volume_size, "merge")
    }

    fn archive(volume: &[u8], record_size: usize) -> Vec<u8> {
        let initial = manifest(volume.len() as u64);
        let mut d = ImageDigest::new(CHUNK_SIZE, false).unwrap();
        d.update(volume);
        let whole = Layout::whole(volume.len() as u64);
        let mut a = prologue(&initial, &whole, record_size, 5).unwrap();
        a.extend_from_slice(volume);
        a.extend(epilogue(&initial.finalized(d.finish()), &whole, record_size, 5).unwrap());
        a
    }

    /// An archive of `image` storing the ranges `stored`: a full one, or an incremental onto
    /// `base` (an image) when given.
    fn sparse_archive(image: &[u8], stored: &[Range<u64>], base: Option<&[u8]>) -> Vec<u8> {
        sparse_archive_with(image, stored, base, false)
    }

    /// [`sparse_archive`], with the flat SHA-256 of the image when `flat`.
    fn sparse_archive_with(
        image: &[u8],
        stored: &[Range<u64>],
        base: Option<&[u8]>,
        flat: bool,
    ) -> Vec<u8> {
        let mut initial = manifest(image.len() as u64);
        initial.flat_sha256 = flat;
        if let Some(base) = base {
            initial.kind = ArchiveKind::Incremental;
            initial.base_checkpoint = Some("c1".into());
            initial.base_digest = Some(tree_root(base).to_string());
        }
        let layout = Layout::new(image.len() as u64, stored).unwrap();
        let mut a = prologue(&initial, &layout, 512, 5).unwrap();
        let mut crcs = ChunkCrcs::new(CHUNK_SIZE).unwrap();
        for r in stored {
            let data = &image[r.start as usize..r.end as usize];
            crcs.update(data);
            a.extend_from_slice(data);
        }
        let fin = initial.finalized(ImageChecksums {
            digest: Some(tree_root(image).to_string()),
            sha256: flat.then(|| crate::digest::to_hex(&sha2::Sha256::digest(image))),
            chunks_crc32c: crcs.finish(),
        });
        a.extend(epilogue(&fin, &layout, 512, 5).unwrap());
        a
    }

    #[test]
    fn the_flat_sha256_of_a_sparse_full_image_counts_its_holes() {
        let size = 3 * MIB;
        let image = image_with_holes(size, 4, &[0, 2]);
        let a = sparse_archive_with(&image, &[MIB..2 * MIB], None, true);
        let report = restore(&a[..], std::io::sink(), 512).unwrap();
        let want = crate::digest::to_hex(&sha2::Sha256::digest(&image));
        assert_eq!(report.sha256, Some(want));
        // A wrong one fails.
        let mut other = image.clone();
        other[5] = 1;
        let mut b = sparse_archive_with(&other, &[0..2 * MIB], None, true);
        let key = b"\"sha256\":\"";
        let at = b.windows(key.len()).rposition(|w| w == key).unwrap() + key.len();
        b[at] = if b[at] == b'0' { b'1' } else { b'0' };
        let err = restore(&b[..], std::io::sink(), 512).unwrap_err();
        assert!(matches!(err, TapeError::Sha256Mismatch { .. }), "{err}");
        // An incremental's cannot be checked without its base's data: none is reported.
        let inc = sparse_archive_with(&other, &[0..MIB], Some(&image), true);
        let mut m = Memory {
            image: vec![0; size as usize],
            calls: 0,
        };
        let mut chain = ImageChain::new();
        restore_into(&a[..], &mut m, 512, &mut chain).unwrap();
        let report = restore_into(&inc[..], &mut m, 512, &mut chain).unwrap();
        assert_eq!(report.sha256, None);
        assert!(m.image == other);
    }

    /// An image in memory, counting the calls it gets.
    struct Memory {
        image: Vec<u8>,
        calls: usize,
    }

    impl ImageTarget for Memory {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.calls += 1;
            self.image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }

        fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
            self.calls += 1;
            self.image[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    /// `size` bytes of a pattern, with the chunks `holes` zeros.
    fn image_with_holes(size: u64, seed: u8, holes: &[u64]) -> Vec<u8> {
        let mut v: Vec<u8> = (0..size).map(|i| (i % 251) as u8 ^ seed).collect();
        for &h in holes {
            let end = ((h + 1) * MIB).min(size);
            v[(h * MIB) as usize..end as usize].fill(0);
        }
        v
    }

    #[test]
    fn sparse_full_restores_holes_as_zeros() {
        let size = 5 * MIB + 4096;
        let image = image_with_holes(size, 1, &[0, 2, 3]);
        let a = sparse_archive(&image, &[MIB..2 * MIB, 4 * MIB..size], None);
        let mut out = Vec::new();
        let report = restore(&a[..], &mut out, 512).unwrap();
        assert!(out == image);
        assert_eq!((report.bytes, report.stored), (size, MIB + MIB + 4096));
        assert_eq!(report.digest, Some(tree_root(&image).to_string()));
        // Into a positioned target that starts dirty: the holes are zeroed.
        let mut m = Memory {
            image: vec![0xee; size as usize],
            calls: 0,
        };
        let mut chain = ImageChain::new();
        restore_into(&a[..], &mut m, 4096, &mut chain).unwrap();
        assert!(m.image == image);
        assert_eq!(chain.root(), Some(tree_root(&image)));
        // Nothing stored at all: an image of zeros.
        let zeros = vec![0u8; size as usize];
        let a = sparse_archive(&zeros, &[], None);
        let mut out = Vec::new();
        assert_eq!(restore(&a[..], &mut out, 512).unwrap().stored, 0);
        assert!(out == zeros);
    }

    #[test]
    fn incrementals_apply_onto_their_base_only() {
        let size = 4 * MIB + 100;
        let base = image_with_holes(size, 1, &[]);
        let mut next = base.clone();
        next[MIB as usize..2 * MIB as usize].fill(7);
        next[(4 * MIB) as usize..].fill(9);
        let full = sparse_archive(&base, &[0..size], None);
        let inc = sparse_archive(&next, &[MIB..2 * MIB, 4 * MIB..size], Some(&base));

        let mut m = Memory {
            image: vec![0; size as usize],
            calls: 0,
        };
        let mut chain = ImageChain::new();
        // Without its base, an incremental is refused before anything is written.
        let err = restore_into(&inc[..], &mut m, 512, &mut chain).unwrap_err();
        assert!(matches!(err, TapeError::WrongBase(_)), "{err}");
        assert_eq!(m.calls, 0);
        let err = restore(&inc[..], std::io::sink(), 512).unwrap_err();
        assert!(err.to_string().contains("full archive first"), "{err}");

        restore_into(&full[..], &mut m, 512, &mut chain).unwrap();
        let report = restore_into(&inc[..], &mut m, 512, &mut chain).unwrap();
        assert!(m.image == next);
        assert_eq!(report.digest, Some(tree_root(&next).to_string()));
        assert_eq!(chain.root(), Some(tree_root(&next)));
        // Applied again, its base is no longer what the chain holds.
        let calls = m.calls;
        let err = restore_into(&inc[..], &mut m, 512, &mut chain).unwrap_err();
        assert!(
            err.to_string().contains("image restored so far has"),
            "{err}"
        );
        assert_eq!(m.calls, calls);
    }

    #[test]
    fn damaged_sparse_data_names_the_image_offset() {
        let size = 6 * MIB;
        let image = image_with_holes(size, 3, &[0, 1, 2, 4]);
        let mut a = sparse_archive(&image, &[3 * MIB..4 * MIB, 5 * MIB..6 * MIB], None);
        let first = &image[(3 * MIB) as usize..(3 * MIB) as usize + 4096];
        let data = a.windows(first.len()).position(|w| w == first).unwrap();
        // The second stored chunk: image offset 5 MiB.
        a[data + MIB as usize + 10] ^= 1;
        let err = restore(&a[..], std::io::sink(), 512).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("chunk 1 (offset {})", 5 * MIB)),
            "{text}"
        );
    }

    #[test]
    fn a_map_that_does_not_add_up_is_refused() {
        let size = 4 * MIB;
        let image = image_with_holes(size, 5, &[0, 2, 3]);
        let a = sparse_archive(&image, &[MIB..2 * MIB], None);
        let text = b"2\n1048576\n1048576\n4194304\n0\n";
        let at = a.windows(text.len()).position(|w| w == text).unwrap();
        let mut b = a.clone();
        b[at + 10..at + 17].copy_from_slice(b"2097152");
        let err = restore(&b[..], std::io::sink(), 512).unwrap_err();
        assert!(err.to_string().contains("do not make the member"), "{err}");
        let mut b = a.clone();
        b[at + 18..at + 25].copy_from_slice(b"1048576");
        let err = restore(&b[..], std::io::sink(), 512).unwrap_err();
        assert!(err.to_string().contains("size 0"), "{err}");
    }

    /// A reader that gives at most `max` bytes per read and fails with EINTR now and then.
    struct Dribble<'a> {
        data: &'a [u8],
        max: usize,
        calls: u32,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.max).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_and_interrupted_reads() {
        let volume: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let a = archive(&volume, 10240);
        let mut out = Vec::new();
        let input = Dribble {
            data: &a,
            max: 777,
            calls: 0,
        };
        let report = restore(input, &mut out, 10240).unwrap();
        assert_eq!(out, volume);
        assert_eq!(report.bytes, 70_000);
    }

    #[test]
    fn volume_size_mismatch_between_manifest_and_member() {
        let volume = vec![1u8; 4096];
        let mut a = archive(&volume, 512);
        // Rewrite the initial manifest to claim another size: same length of JSON.
        let text = String::from_utf8_lossy(&a[512..1024]).into_owned();
        let at = text.find("\"volume_size\":4096").unwrap() + 512;
        a[at..at + 18].copy_from_slice(b"\"volume_size\":4095");
        // The member header checksum does not cover the data: this parses.
        let err = restore(&a[..], std::io::sink(), 512).unwrap_err();
        assert!(
            matches!(
                err,
                TapeError::VolumeSizeMismatch {
                    expected: 4095,
                    found: 4096
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn write_errors_are_reported() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let a = archive(&[3u8; 2048], 512);
        let err = restore(&a[..], Full, 512).unwrap_err();
        assert!(
            err.to_string().contains("writing the restored image"),
            "{err}"
        );
    }

    #[test]
    fn trailing_member_is_rejected() {
        let volume = vec![9u8; 1024];
        let a = archive(&volume, 512);
        // Replace the end marker with another member.
        let end = a.len() - 1024;
        let mut b = a[..end].to_vec();
        b.extend_from_slice(&a[..1024]);
        b.extend_from_slice(&[0; 1024]);
        let err = restore(&b[..], std::io::sink(), 512).unwrap_err();
        assert!(matches!(err, TapeError::UnexpectedMember { .. }), "{err}");
    }
}
