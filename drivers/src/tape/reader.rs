//! Reading an archive's structure as it streams from a file or a tape: its headers, manifests
//! and the sparse map of its image; and, on a file, its manifests alone ([`read_manifests`]).

use std::io::{ErrorKind, Read, Seek, SeekFrom};

use super::format::{check_record_size, pad512, parse_header, BLOCK, TYPE_PAX, TYPE_REGULAR};
use super::pax::{parse_pax, PaxOverrides};
use super::sparse::{map_count, map_lines, max_map_entries, max_map_len, parse_map, Layout};
use super::{Manifest, TapeError, BLOCK_SIZE, MANIFEST_NAME, VOLUME_NAME};

/// The largest initial manifest accepted (it has no checksum list: a few hundred bytes).
const MAX_INITIAL_MANIFEST: u64 = 1 << 20;
/// The largest pax extended header accepted (its padding comment is at most a record long).
const MAX_PAX_HEADER: u64 = 256 << 20;

/// Reads an archive in `record_size` reads and hands it out as a byte stream.
pub(crate) struct RecordStream<R> {
    input: R,
    buf: Vec<u8>,
    /// The unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The archive offset of `buf[start]`.
    offset: u64,
}

impl<R: Read> RecordStream<R> {
    pub(crate) fn new(input: R, record_size: usize) -> Self {
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
    pub(crate) fn for_each(
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
    pub(crate) fn skip(&mut self, n: u64, what: &str) -> Result<(), TapeError> {
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

impl<R: Read + Seek> RecordStream<R> {
    /// Skips `n` bytes, seeking past what is not buffered (a file: the image is not read).
    fn seek_forward(&mut self, n: u64) -> Result<(), TapeError> {
        let buffered = (self.end - self.start) as u64;
        if n <= buffered {
            self.start += n as usize;
        } else {
            let rest = i64::try_from(n - buffered).map_err(|_| TapeError::Truncated {
                what: "a member's data".into(),
                offset: self.offset,
            })?;
            self.input
                .seek(SeekFrom::Current(rest))
                .map_err(|source| TapeError::Io {
                    context: format!("seeking in the archive at offset {}", self.offset),
                    source,
                })?;
            self.start = self.end;
        }
        self.offset += n;
        Ok(())
    }
}

/// A member of the archive, its pax overrides applied; its data follows in the stream.
pub(crate) struct Entry {
    pub name: String,
    /// The size of its data in the archive.
    pub size: u64,
    /// The archive offset of its (first) header.
    pub offset: u64,
    /// The real size of a GNU.sparse 1.0 member, whose data starts with its sparse map.
    pub sparse_realsize: Option<u64>,
}

/// The next thing in the archive.
pub(crate) enum Next {
    Entry(Entry),
    /// The end-of-archive marker, at this offset.
    End(u64),
}

/// Reads the next member's headers (a pax extended header, if any, then its ustar header), or
/// the end-of-archive marker.
pub(crate) fn next_entry<R: Read>(s: &mut RecordStream<R>) -> Result<Next, TapeError> {
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
                return entry(pax, header.name, header.size, first).map(Next::Entry)
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

/// The member a ustar header of `name` and `size` at `offset` and the pax records before it
/// describe: a GNU.sparse 1.0 member has its real name and size in its records.
fn entry(pax: PaxOverrides, name: String, size: u64, offset: u64) -> Result<Entry, TapeError> {
    let size = pax.size.unwrap_or(size);
    if pax.sparse_version == (None, None) {
        return Ok(Entry {
            name: pax.path.unwrap_or(name),
            size,
            offset,
            sparse_realsize: None,
        });
    }
    let bad = |reason: String| TapeError::BadSparseMember { offset, reason };
    if pax.sparse_version != (Some(1), Some(0)) {
        let v = |n: Option<u64>| n.map_or("?".into(), |n| n.to_string());
        return Err(bad(format!(
            "GNU.sparse format {}.{}: only 1.0 is read",
            v(pax.sparse_version.0),
            v(pax.sparse_version.1)
        )));
    }
    let name = pax
        .sparse_name
        .ok_or_else(|| bad("no GNU.sparse.name record".into()))?;
    let realsize = pax
        .sparse_realsize
        .ok_or_else(|| bad("no GNU.sparse.realsize record".into()))?;
    Ok(Entry {
        name,
        size,
        offset,
        sparse_realsize: Some(realsize),
    })
}

/// Reads the next member, which must be `name` (described as `what` in errors).
pub(crate) fn expect_entry<R: Read>(
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
pub(crate) fn read_manifest<R: Read>(
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
pub(crate) fn differing_fields(a: &Manifest, b: &Manifest) -> String {
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

/// The start of an archive, up to the image data: the initial manifest and the layout of the
/// data of `volume.img` (after its sparse map, if it is sparse).
pub(crate) struct Head {
    pub initial: Manifest,
    pub layout: Layout,
}

/// Reads the initial manifest and the headers (and sparse map) of `volume.img`; the stream is
/// left at the image data.
pub(crate) fn read_head<R: Read>(s: &mut RecordStream<R>) -> Result<Head, TapeError> {
    let e = expect_entry(s, MANIFEST_NAME, "the initial manifest")?;
    let initial = read_manifest(s, &e, "initial", MAX_INITIAL_MANIFEST)?;
    initial
        .check_initial()
        .map_err(|reason| TapeError::BadManifest {
            which: "initial",
            offset: e.offset,
            reason,
        })?;
    let volume = expect_entry(s, VOLUME_NAME, "the volume image")?;
    let image_size = volume.sparse_realsize.unwrap_or(volume.size);
    if image_size != initial.volume_size {
        return Err(TapeError::VolumeSizeMismatch {
            expected: initial.volume_size,
            found: image_size,
        });
    }
    let layout = match volume.sparse_realsize {
        None => Layout::whole(volume.size),
        Some(realsize) => read_map(s, &volume, realsize)?,
    };
    Ok(Head { initial, layout })
}

/// Reads the sparse map at the start of the data of the sparse member `e` (of `realsize`
/// bytes) and checks that the map and the data it announces make the member's size.
fn read_map<R: Read>(
    s: &mut RecordStream<R>,
    e: &Entry,
    realsize: u64,
) -> Result<Layout, TapeError> {
    let bad = |reason: String| TapeError::BadSparseMember {
        offset: e.offset,
        reason,
    };
    let mut text = Vec::new();
    let mut count = None;
    loop {
        if text.len() as u64 >= e.size {
            return Err(bad(format!(
                "the sparse map runs past the member's {} bytes",
                e.size
            )));
        }
        text.extend_from_slice(&s.read_block("the sparse map")?);
        if count.is_none() {
            match map_count(&text) {
                Some(Ok(n)) if n <= max_map_entries(realsize) => count = Some(n),
                Some(Ok(n)) => {
                    return Err(bad(format!(
                        "the map has {n} entries: more than one per chunk of {realsize} bytes"
                    )))
                }
                Some(Err(reason)) => return Err(bad(format!("sparse map: {reason}"))),
                None => return Err(bad("the sparse map has no entry count".into())),
            }
        }
        let n = count.unwrap_or(0);
        if map_lines(&text) > 2 * n {
            break;
        }
        if text.len() as u64 >= max_map_len(n) {
            return Err(bad(format!(
                "the sparse map is longer than {n} entries can be"
            )));
        }
    }
    let layout = parse_map(&text, realsize).map_err(|r| bad(format!("sparse map: {r}")))?;
    let map_len = text.len() as u64;
    if map_len + layout.stored_bytes() != e.size {
        return Err(bad(format!(
            "the map ({map_len} bytes) and the {} bytes it stores do not make the member's {} \
             bytes",
            layout.stored_bytes(),
            e.size
        )));
    }
    Ok(layout)
}

/// Reads the final manifest (the stream is past the image data and its padding) and checks it
/// against the initial one and the data `layout` stores.
pub(crate) fn read_tail<R: Read>(
    s: &mut RecordStream<R>,
    initial: &Manifest,
    layout: &Layout,
) -> Result<Manifest, TapeError> {
    let e = expect_entry(s, MANIFEST_NAME, "the final manifest")?;
    // Room for one CRC per chunk at up to 32 bytes each (however the JSON is laid out).
    let max = MAX_INITIAL_MANIFEST.saturating_add(initial.chunk_count().saturating_mul(32));
    let manifest = read_manifest(s, &e, "final", max)?;
    manifest
        .check_final(layout.stored_bytes())
        .map_err(|reason| TapeError::BadManifest {
            which: "final",
            offset: e.offset,
            reason,
        })?;
    if manifest.without_checksums() != *initial {
        return Err(TapeError::ManifestMismatch {
            fields: differing_fields(initial, &manifest.without_checksums()),
        });
    }
    Ok(manifest)
}

/// An archive's manifests and the layout of its image, read without reading the image.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiveManifests {
    /// The final manifest (checked against the initial one).
    pub manifest: Manifest,
    /// The ranges of the image the archive stores.
    pub layout: Layout,
}

/// Reads an archive's manifests from a file, seeking past the image data: what a restore of a
/// chain checks before it writes anything. Only the headers, the sparse map and the manifests
/// are read (and checked as [`super::restore`] checks them); the data is not verified.
pub fn read_manifests(input: impl Read + Seek) -> Result<ArchiveManifests, TapeError> {
    let mut s = RecordStream::new(input, 64 * BLOCK_SIZE);
    let head = read_head(&mut s)?;
    let stored = head.layout.stored_bytes();
    s.seek_forward(pad512(stored))?;
    let manifest = read_tail(&mut s, &head.initial, &head.layout)?;
    Ok(ArchiveManifests {
        manifest,
        layout: head.layout,
    })
}

/// Checks `record_size` for a reader.
pub(crate) fn stream<R: Read>(input: R, record_size: usize) -> Result<RecordStream<R>, TapeError> {
    check_record_size(record_size)?;
    Ok(RecordStream::new(input, record_size))
}
