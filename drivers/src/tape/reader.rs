//! Restoring and verifying a backup archive as it streams from a file or a tape.

use std::io::{ErrorKind, Read, Write};

use super::format::{
    check_record_size, pad512, parse_header, parse_pax, PaxOverrides, BLOCK, TYPE_PAX, TYPE_REGULAR,
};
use super::{ImageDigest, Manifest, TapeError, BLOCK_SIZE, MANIFEST_NAME, VOLUME_NAME};

/// The largest initial manifest accepted (it has no checksum list: a few hundred bytes).
const MAX_INITIAL_MANIFEST: u64 = 1 << 20;
/// The largest pax extended header accepted (its padding comment is at most a record long).
const MAX_PAX_HEADER: u64 = 256 << 20;

/// What [`restore`] restored and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    /// The final manifest of the archive.
    pub manifest: Manifest,
    /// The number of bytes of the image written out.
    pub bytes: u64,
    /// The image's `sha256-tree` digest, equal to the manifest's (`None` for an archive of the
    /// first format, which has none).
    pub digest: Option<String>,
    /// The flat SHA-256 of the image (lowercase hex), equal to the manifest's, when the archive
    /// has one.
    pub sha256: Option<String>,
}

/// Reads an archive in `record_size` reads and hands it out as a byte stream.
struct RecordStream<R> {
    input: R,
    buf: Vec<u8>,
    /// The unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The archive offset of `buf[start]`.
    offset: u64,
}

impl<R: Read> RecordStream<R> {
    fn new(input: R, record_size: usize) -> Self {
        Self {
            input,
            buf: vec![0; record_size],
            start: 0,
            end: 0,
            offset: 0,
        }
    }

    /// Reads the next record (or whatever one read gives) if the buffer is empty; false at the
    /// end of the input.
    fn fill(&mut self) -> Result<bool, TapeError> {
        if self.start < self.end {
            return Ok(true);
        }
        loop {
            match self.input.read(&mut self.buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.start = 0;
                    self.end = n.min(self.buf.len());
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(TapeError::Io {
                        context: format!("reading the archive at offset {}", self.offset),
                        source,
                    })
                }
            }
        }
    }

    /// Passes the next `n` bytes to `f`, in pieces, straight from the record buffer.
    fn for_each(
        &mut self,
        mut n: u64,
        what: &str,
        mut f: impl FnMut(&[u8]) -> Result<(), TapeError>,
    ) -> Result<(), TapeError> {
        while n > 0 {
            if !self.fill()? {
                return Err(TapeError::Truncated {
                    what: what.to_string(),
                    offset: self.offset,
                });
            }
            let take = ((self.end - self.start) as u64).min(n) as usize;
            f(&self.buf[self.start..self.start + take])?;
            self.start += take;
            self.offset += take as u64;
            n -= take as u64;
        }
        Ok(())
    }

    /// Skips `n` bytes.
    fn skip(&mut self, n: u64, what: &str) -> Result<(), TapeError> {
        self.for_each(n, what, |_| Ok(()))
    }

    /// Reads `n` bytes into a vector (grown as the bytes arrive, so a huge `n` from a corrupt
    /// header fails on truncation rather than on allocation).
    fn read_vec(&mut self, n: u64, what: &str) -> Result<Vec<u8>, TapeError> {
        let mut v = Vec::new();
        self.for_each(n, what, |d| {
            v.extend_from_slice(d);
            Ok(())
        })?;
        Ok(v)
    }

    /// Reads one 512-byte block.
    fn read_block(&mut self, what: &str) -> Result<[u8; BLOCK_SIZE], TapeError> {
        let mut block = [0u8; BLOCK_SIZE];
        let mut at = 0;
        self.for_each(BLOCK, what, |d| {
            block[at..at + d.len()].copy_from_slice(d);
            at += d.len();
            Ok(())
        })?;
        Ok(block)
    }
}

/// A member of the archive, its pax overrides applied; its data follows in the stream.
struct Entry {
    name: String,
    size: u64,
    /// The archive offset of its (first) header.
    offset: u64,
}

/// The next thing in the archive.
enum Next {
    Entry(Entry),
    /// The end-of-archive marker, at this offset.
    End(u64),
}

/// Reads the next member's headers (a pax extended header, if any, then its ustar header), or
/// the end-of-archive marker.
fn next_entry<R: Read>(s: &mut RecordStream<R>) -> Result<Next, TapeError> {
    let first = s.offset;
    let mut pax = PaxOverrides::default();
    let mut had_pax = false;
    loop {
        let offset = s.offset;
        let block = s.read_block("a member header")?;
        if block.iter().all(|&b| b == 0) {
            if had_pax {
                return Err(TapeError::MalformedHeader {
                    offset,
                    reason: "end-of-archive marker right after a pax extended header".into(),
                });
            }
            let second = s.read_block("the end-of-archive marker")?;
            if second.iter().any(|&b| b != 0) {
                return Err(TapeError::MalformedHeader {
                    offset: offset + BLOCK,
                    reason: "a single zero block followed by a non-zero block".into(),
                });
            }
            return Ok(Next::End(offset));
        }
        let header = parse_header(&block, offset)?;
        match header.typeflag {
            TYPE_PAX => {
                if header.size > MAX_PAX_HEADER {
                    return Err(TapeError::MalformedHeader {
                        offset,
                        reason: format!("pax extended header of {} bytes", header.size),
                    });
                }
                let data = s.read_vec(header.size, "a pax extended header")?;
                s.skip(pad512(header.size) - header.size, "a pax extended header")?;
                parse_pax(&data, offset, &mut pax)?;
                had_pax = true;
            }
            TYPE_REGULAR | 0 => {
                return Ok(Next::Entry(Entry {
                    name: pax.path.unwrap_or(header.name),
                    size: pax.size.unwrap_or(header.size),
                    offset: first,
                }))
            }
            other => {
                return Err(TapeError::MalformedHeader {
                    offset,
                    reason: format!(
                        "member {:?} has typeflag {:?}; this format has only regular files",
                        header.name,
                        char::from(other)
                    ),
                })
            }
        }
    }
}

/// Reads the next member, which must be `name` (described as `what` in errors).
fn expect_entry<R: Read>(
    s: &mut RecordStream<R>,
    name: &str,
    what: &str,
) -> Result<Entry, TapeError> {
    let expected = format!("{name} ({what})");
    match next_entry(s)? {
        Next::End(offset) => Err(TapeError::MissingMember { expected, offset }),
        Next::Entry(e) if e.name == name => Ok(e),
        Next::Entry(e) => Err(TapeError::UnexpectedMember {
            expected,
            found: e.name,
            offset: e.offset,
        }),
    }
}

/// Reads a manifest member's data and parses it.
fn read_manifest<R: Read>(
    s: &mut RecordStream<R>,
    e: &Entry,
    which: &'static str,
    max: u64,
) -> Result<Manifest, TapeError> {
    let bad = |reason: String| TapeError::BadManifest {
        which,
        offset: e.offset,
        reason,
    };
    if e.size > max {
        return Err(bad(format!(
            "{} bytes, more than the {max} expected",
            e.size
        )));
    }
    let what = format!("the {which} manifest");
    let json = s.read_vec(e.size, &what)?;
    s.skip(pad512(e.size) - e.size, &what)?;
    serde_json::from_slice(&json).map_err(|err| bad(format!("not a valid manifest: {err}")))
}

/// The fields on which two manifests differ.
fn differing_fields(a: &Manifest, b: &Manifest) -> String {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return "their content".into();
    };
    let mut fields: Vec<&str> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .collect();
    fields.sort_unstable();
    fields.join(", ")
}

/// Reads an archive stream (a file or a tape device, read in `record_size` reads), writes
/// `volume.img`'s bytes to `out`, verifies the `sha256-tree` digest, every chunk's CRC-32C and
/// the flat SHA-256 (when the archive has one) against the final manifest, and checks that the
/// initial and final manifests agree on everything but the checksums. Archives of the first
/// format, which have a flat SHA-256 and no digest, are verified against that.
///
/// The image streams through: only the computed per-chunk CRCs are kept, and the comparison
/// happens once the final manifest (which follows the image) has been read. The archive is parsed
/// as a byte stream, so `record_size` (a positive multiple of 512) need not be the one it was
/// written with. Any mismatch, truncation, missing member or malformed header is an error naming
/// what failed. `out` may have received the image (or part of it) even when this fails.
pub fn restore(
    input: impl Read,
    mut out: impl Write,
    record_size: usize,
) -> Result<RestoreReport, TapeError> {
    check_record_size(record_size)?;
    let mut s = RecordStream::new(input, record_size);

    let e = expect_entry(&mut s, MANIFEST_NAME, "the initial manifest")?;
    let initial = read_manifest(&mut s, &e, "initial", MAX_INITIAL_MANIFEST)?;
    initial
        .check_initial()
        .map_err(|reason| TapeError::BadManifest {
            which: "initial",
            offset: e.offset,
            reason,
        })?;

    let volume = expect_entry(&mut s, VOLUME_NAME, "the volume image")?;
    let volume_size = volume.size;
    if volume_size != initial.volume_size {
        return Err(TapeError::VolumeSizeMismatch {
            expected: initial.volume_size,
            found: volume_size,
        });
    }
    let mut digest = ImageDigest::for_manifest(&initial)?;
    s.for_each(volume_size, "the data of volume.img", |data| {
        out.write_all(data).map_err(|source| TapeError::Io {
            context: format!("writing the restored image at offset {}", digest.bytes()),
            source,
        })?;
        digest.update(data);
        Ok(())
    })?;
    s.skip(
        pad512(volume_size) - volume_size,
        "the padding of volume.img",
    )?;

    let e = expect_entry(&mut s, MANIFEST_NAME, "the final manifest")?;
    // Room for one CRC per chunk at up to 32 bytes each (however the JSON is laid out).
    let max = MAX_INITIAL_MANIFEST.saturating_add(initial.chunk_count().saturating_mul(32));
    let manifest = read_manifest(&mut s, &e, "final", max)?;
    manifest
        .check_final()
        .map_err(|reason| TapeError::BadManifest {
            which: "final",
            offset: e.offset,
            reason,
        })?;
    if manifest.without_checksums() != initial {
        return Err(TapeError::ManifestMismatch {
            fields: differing_fields(&initial, &manifest.without_checksums()),
        });
    }

    let computed = digest.finish();
    let crcs = &computed.chunks_crc32c;
    let expected_crcs = manifest.chunks_crc32c.as_deref().unwrap_or_default();
    let crc_mismatch = expected_crcs
        .iter()
        .zip(crcs)
        .enumerate()
        .find(|(_, (e, a))| e != a)
        .map(|(index, (&expected, &actual))| (index as u64, expected, actual));
    // The digest is the image's proof; the CRCs then tell where a damaged image is damaged.
    if manifest.digest != computed.digest {
        return Err(TapeError::DigestMismatch {
            expected: manifest.digest.clone().unwrap_or_default(),
            actual: computed.digest.unwrap_or_default(),
            damaged: crc_mismatch.map(|(i, _, _)| (i, i * manifest.chunk_size)),
        });
    }
    if let Some((index, expected, actual)) = crc_mismatch {
        return Err(TapeError::ChunkCrcMismatch {
            index,
            offset: index * manifest.chunk_size,
            expected,
            actual,
        });
    }
    if expected_crcs.len() != crcs.len() {
        // Not reachable after the checks above (sizes agree); kept as a guard.
        return Err(TapeError::BadManifest {
            which: "final",
            offset: e.offset,
            reason: format!(
                "{} chunk CRCs for {} chunks of data",
                expected_crcs.len(),
                crcs.len()
            ),
        });
    }
    if manifest.sha256 != computed.sha256 {
        return Err(TapeError::Sha256Mismatch {
            expected: manifest.sha256.clone().unwrap_or_default(),
            actual: computed.sha256.unwrap_or_default(),
        });
    }

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
    out.flush().map_err(|source| TapeError::Io {
        context: "flushing the restored image".into(),
        source,
    })?;
    Ok(RestoreReport {
        manifest,
        bytes: volume_size,
        digest: computed.digest,
        sha256: computed.sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{epilogue, prologue, CHUNK_SIZE};
    use super::*;

    fn manifest(volume_size: u64) -> Manifest {
        super::super::sample_manifest(volume_size, "merge")
    }

    fn archive(volume: &[u8], record_size: usize) -> Vec<u8> {
        let initial = manifest(volume.len() as u64);
        let mut d = ImageDigest::new(CHUNK_SIZE, false).unwrap();
        d.update(volume);
        let mut a = prologue(&initial, record_size, 5).unwrap();
        a.extend_from_slice(volume);
        a.extend(epilogue(&initial.finalized(d.finish()), record_size, 5).unwrap());
        a
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
