//! Encoding and decoding of the archive's tar structures: ustar headers, pax extended headers,
//! and the prologue and epilogue that surround the image data.
//!
//! A ustar header is one 512-byte block: name[100] mode[8] uid[8] gid[8] size[12] mtime[12]
//! chksum[8] typeflag[1] linkname[100] magic[6] version[2] uname[32] gname[32] devmajor[8]
//! devminor[8] prefix[155], then 12 unused bytes. Numeric fields are octal, zero-padded and
//! NUL-terminated; the checksum is the sum of the header's bytes with the checksum field counted
//! as 8 spaces, stored as 6 octal digits, NUL, space. A pax extended header is a ustar header of
//! typeflag `x` whose data is a sequence of records `LEN key=value\n`, where LEN (decimal) counts
//! the whole record including its own digits.

use super::pax::{pax_comment_of_len, pax_record, MIN_COMMENT};
use super::sparse::Layout;
use super::{Manifest, TapeError, BLOCK_SIZE, MANIFEST_NAME, VOLUME_NAME};

/// The block size as a u64.
pub(crate) const BLOCK: u64 = BLOCK_SIZE as u64;

/// The largest value of an 11-digit octal field (size, mtime): 8 GiB - 1.
pub(crate) const MAX_OCTAL_11: u64 = 0o777_7777_7777;

/// The name of the pax extended header of the image.
pub(crate) const PAX_NAME: &str = "PaxHeaders/volume.img";

/// The typeflag of a regular file.
pub(crate) const TYPE_REGULAR: u8 = b'0';
/// The typeflag of a pax extended header (for the next member).
pub(crate) const TYPE_PAX: u8 = b'x';

// Field offsets and lengths of the ustar header.
const NAME: (usize, usize) = (0, 100);
const MODE: (usize, usize) = (100, 8);
const UID: (usize, usize) = (108, 8);
const GID: (usize, usize) = (116, 8);
const SIZE: (usize, usize) = (124, 12);
const MTIME: (usize, usize) = (136, 12);
const CHKSUM: (usize, usize) = (148, 8);
const TYPEFLAG: usize = 156;
const MAGIC: (usize, usize) = (257, 6);
const VERSION: (usize, usize) = (263, 2);
const UNAME: (usize, usize) = (265, 32);
const GNAME: (usize, usize) = (297, 32);
const DEVMAJOR: (usize, usize) = (329, 8);
const DEVMINOR: (usize, usize) = (337, 8);
const PREFIX: (usize, usize) = (345, 155);

/// Rounds `n` up to a whole number of 512-byte blocks.
pub(crate) fn pad512(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Checks that `record_size` is a positive multiple of the block size.
pub(crate) fn check_record_size(record_size: usize) -> Result<(), TapeError> {
    if record_size == 0 || !record_size.is_multiple_of(BLOCK_SIZE) {
        return Err(TapeError::InvalidRecordSize(record_size));
    }
    Ok(())
}

fn field(h: &mut [u8; BLOCK_SIZE], (at, len): (usize, usize)) -> &mut [u8] {
    &mut h[at..at + len]
}

/// Writes `value` as zero-padded octal filling all but the last byte of `dst`, then a NUL.
fn put_octal(dst: &mut [u8], value: u64, what: &'static str) -> Result<(), TapeError> {
    let digits = dst.len() - 1;
    let text = format!("{value:0digits$o}");
    if text.len() != digits {
        return Err(TapeError::FieldOverflow { field: what, value });
    }
    dst[..digits].copy_from_slice(text.as_bytes());
    dst[digits] = 0;
    Ok(())
}

/// Writes `text` at the start of `dst` (the rest stays NUL); it must fit.
fn put_str(dst: &mut [u8], text: &str, what: &'static str) -> Result<(), TapeError> {
    if text.len() > dst.len() {
        return Err(TapeError::FieldOverflow {
            field: what,
            value: text.len() as u64,
        });
    }
    dst[..text.len()].copy_from_slice(text.as_bytes());
    Ok(())
}

/// The header checksum: the sum of all bytes with the checksum field counted as spaces.
pub(crate) fn header_checksum(h: &[u8; BLOCK_SIZE]) -> u64 {
    h.iter()
        .enumerate()
        .map(|(i, &b)| {
            if (CHKSUM.0..CHKSUM.0 + CHKSUM.1).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum()
}

/// A ustar header block for a member: mode 0644, owned by root, `size` bytes of data.
pub(crate) fn ustar_header(
    name: &str,
    size: u64,
    typeflag: u8,
    mtime: u64,
) -> Result<[u8; BLOCK_SIZE], TapeError> {
    let mut h = [0u8; BLOCK_SIZE];
    put_str(field(&mut h, NAME), name, "name length")?;
    put_octal(field(&mut h, MODE), 0o644, "mode")?;
    put_octal(field(&mut h, UID), 0, "uid")?;
    put_octal(field(&mut h, GID), 0, "gid")?;
    put_octal(field(&mut h, SIZE), size, "size")?;
    put_octal(field(&mut h, MTIME), mtime, "mtime")?;
    h[TYPEFLAG] = typeflag;
    put_str(field(&mut h, MAGIC), "ustar\0", "magic")?;
    put_str(field(&mut h, VERSION), "00", "version")?;
    put_str(field(&mut h, UNAME), "root", "uname")?;
    put_str(field(&mut h, GNAME), "root", "gname")?;
    put_octal(field(&mut h, DEVMAJOR), 0, "devmajor")?;
    put_octal(field(&mut h, DEVMINOR), 0, "devminor")?;
    let sum = header_checksum(&h);
    let chk = field(&mut h, CHKSUM);
    put_octal(&mut chk[..7], sum, "checksum")?;
    chk[7] = b' ';
    Ok(h)
}

/// A whole member: header, data, zero padding to a block.
fn member(name: &str, data: &[u8], mtime: u64) -> Result<Vec<u8>, TapeError> {
    let mut out = Vec::with_capacity(BLOCK_SIZE + pad512(data.len() as u64) as usize);
    out.extend_from_slice(&ustar_header(name, data.len() as u64, TYPE_REGULAR, mtime)?);
    out.extend_from_slice(data);
    out.resize(BLOCK_SIZE + pad512(data.len() as u64) as usize, 0);
    Ok(out)
}

/// The ustar name of a sparse `volume.img`, as GNU tar names the members it writes in the
/// GNU.sparse 1.0 format (`%d/GNUSparseFile.%p/%f`); the real name is in `GNU.sparse.name`.
/// A reader that does not know the format sees a member of another name and stops there.
pub(crate) const SPARSE_NAME: &str = "./GNUSparseFile.0/volume.img";

/// Checks that `layout` is one of an image of `volume_size` bytes.
fn check_layout(layout: &Layout, volume_size: u64) -> Result<(), TapeError> {
    if layout.volume_size() != volume_size {
        return Err(TapeError::InvalidLayout(format!(
            "the layout is of a {}-byte image, the manifest says {volume_size}",
            layout.volume_size()
        )));
    }
    Ok(())
}

/// The pax records of `volume.img` (all but the padding comment), its ustar name and the size
/// of its member data.
fn volume_records(layout: &Layout) -> (String, &'static str, u64) {
    let volume_size = layout.volume_size();
    if layout.is_whole() {
        let mut pax = pax_record("size", &volume_size.to_string());
        pax.push_str(&pax_record("path", VOLUME_NAME));
        return (pax, VOLUME_NAME, volume_size);
    }
    let member_size = layout.encode_map().len() as u64 + layout.stored_bytes();
    let mut pax = pax_record("GNU.sparse.major", "1");
    pax.push_str(&pax_record("GNU.sparse.minor", "0"));
    pax.push_str(&pax_record("GNU.sparse.name", VOLUME_NAME));
    pax.push_str(&pax_record("GNU.sparse.realsize", &volume_size.to_string()));
    pax.push_str(&pax_record("size", &member_size.to_string()));
    (pax, SPARSE_NAME, member_size)
}

/// The bytes that precede the volume data: the initial manifest member, the pax extended header
/// of `volume.img`, its ustar header and, for a sparse member (`layout` not the whole image),
/// its sparse map. Their length is a multiple of `record_size` (usually exactly one record), so
/// the volume data that follows starts on a record boundary.
///
/// `initial` must have `digest`, `sha256` and `chunks_crc32c` unset, a non-zero `volume_size` and
/// `chunk_size`, and `format` [`super::FORMAT`]; `layout` must be of `volume_size` bytes;
/// `record_size` must be a positive multiple of 512; `mtime` (seconds since the epoch) is the
/// modification time of every member.
pub fn prologue(
    initial: &Manifest,
    layout: &Layout,
    record_size: usize,
    mtime: u64,
) -> Result<Vec<u8>, TapeError> {
    check_record_size(record_size)?;
    initial
        .check_initial()
        .map_err(TapeError::InvalidManifest)?;
    check_layout(layout, initial.volume_size)?;
    let mut out = member(MANIFEST_NAME, &initial.to_json()?, mtime)?;

    let (mut pax, volume_name, member_size) = volume_records(layout);
    let map = if layout.is_whole() {
        Vec::new()
    } else {
        layout.encode_map()
    };
    // Before the pax data: the manifest member and the pax header; after it: the image header
    // and the map.
    let fixed = out.len() + 2 * BLOCK_SIZE + map.len();
    // The pax data is made a whole number of blocks (no padding) whose end, with the image header,
    // falls on a record boundary.
    let mut pax_len = pad512((pax.len() + MIN_COMMENT) as u64) as usize;
    let misalign = (fixed + pax_len) % record_size;
    if misalign != 0 {
        pax_len += record_size - misalign;
    }
    let comment = pax_comment_of_len(pax_len - pax.len()).ok_or(TapeError::FieldOverflow {
        field: "pax comment length",
        value: (pax_len - pax.len()) as u64,
    })?;
    pax.push_str(&comment);
    debug_assert_eq!(pax.len(), pax_len);

    out.extend_from_slice(&ustar_header(PAX_NAME, pax.len() as u64, TYPE_PAX, mtime)?);
    out.extend_from_slice(pax.as_bytes());
    // The ustar size field holds the size when it fits; the pax size= record always does.
    let ustar_size = if member_size <= MAX_OCTAL_11 {
        member_size
    } else {
        0
    };
    out.extend_from_slice(&ustar_header(volume_name, ustar_size, TYPE_REGULAR, mtime)?);
    out.extend_from_slice(&map);
    debug_assert_eq!(out.len() % record_size, 0);
    Ok(out)
}

/// The bytes that follow the volume data (the `layout.stored_bytes()` bytes of image data
/// written right after the [`prologue`]): the zero padding of `volume.img` to a block, the final
/// manifest member, the end-of-archive marker and zeros up to the record grid, so that the
/// prologue, the data and the epilogue make a multiple of `record_size`. Its first bytes complete
/// the last partial record of the data.
///
/// `final_manifest` must have a well-formed `digest` (and `sha256` when `flat_sha256`) and one
/// `chunks_crc32c` entry per chunk of stored data; `layout`, `record_size` and `mtime` must be
/// those given to [`prologue`].
pub fn epilogue(
    final_manifest: &Manifest,
    layout: &Layout,
    record_size: usize,
    mtime: u64,
) -> Result<Vec<u8>, TapeError> {
    check_record_size(record_size)?;
    check_layout(layout, final_manifest.volume_size)?;
    let stored = layout.stored_bytes();
    final_manifest
        .check_final(stored)
        .map_err(TapeError::InvalidManifest)?;
    let mut out = vec![0u8; (pad512(stored) - stored) as usize];
    out.extend_from_slice(&member(MANIFEST_NAME, &final_manifest.to_json()?, mtime)?);
    out.extend_from_slice(&[0u8; 2 * BLOCK_SIZE]);
    // The prologue is whole records, so the data ends at stored % record_size in its record.
    let end = (stored % record_size as u64) as usize + out.len();
    let pad = (record_size - end % record_size) % record_size;
    out.resize(out.len() + pad, 0);
    Ok(out)
}

/// A parsed ustar header.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Header {
    /// The name, with the prefix if any.
    pub name: String,
    /// The size field.
    pub size: u64,
    /// The typeflag.
    pub typeflag: u8,
    /// The mtime field.
    pub mtime: u64,
}

/// Parses a numeric field: octal digits (with optional leading spaces, ended by NUL or space),
/// or the base-256 form (first byte 0x80) some writers use for large values.
pub(crate) fn parse_numeric(f: &[u8]) -> Option<u64> {
    let (&first, rest) = f.split_first()?;
    if first == 0x80 {
        return rest.iter().try_fold(0u64, |acc, &b| {
            acc.checked_mul(256).map(|v| v | u64::from(b))
        });
    }
    if first & 0x80 != 0 {
        return None;
    }
    let start = f.iter().position(|&b| b != b' ').unwrap_or(f.len());
    let digits = &f[start..];
    let end = digits
        .iter()
        .position(|&b| b == 0 || b == b' ')
        .unwrap_or(digits.len());
    if !digits[end..].iter().all(|&b| b == 0 || b == b' ') {
        return None;
    }
    digits[..end].iter().try_fold(0u64, |acc, &b| {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        acc.checked_mul(8).map(|v| v | u64::from(b - b'0'))
    })
}

/// The text of a NUL-terminated string field.
fn parse_str(f: &[u8]) -> String {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    String::from_utf8_lossy(&f[..end]).into_owned()
}

/// Parses a ustar header block read at `offset`, checking its checksum and magic.
pub(crate) fn parse_header(h: &[u8; BLOCK_SIZE], offset: u64) -> Result<Header, TapeError> {
    let bad = |reason: String| TapeError::MalformedHeader { offset, reason };
    let at = |(start, len): (usize, usize)| &h[start..start + len];
    let stored = parse_numeric(at(CHKSUM))
        .ok_or_else(|| bad(format!("checksum field {:?} is not octal", at(CHKSUM))))?;
    let unsigned = header_checksum(h);
    // Some old writers summed signed bytes; accept that form too.
    let signed: i64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (CHKSUM.0..CHKSUM.0 + CHKSUM.1).contains(&i) {
                i64::from(b' ')
            } else {
                i64::from(b as i8)
            }
        })
        .sum();
    if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:o}, computed {unsigned:o})"
        )));
    }
    let magic = at(MAGIC);
    let posix = magic == b"ustar\0";
    // GNU tar's own headers have "ustar " + " \0" and no prefix field.
    let gnu = magic == b"ustar " && at(VERSION) == b" \0";
    if !posix && !gnu {
        return Err(bad(format!("not a ustar header (magic {magic:?})")));
    }
    let mut name = parse_str(at(NAME));
    if posix {
        let prefix = parse_str(at(PREFIX));
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
    }
    let size = parse_numeric(at(SIZE))
        .ok_or_else(|| bad(format!("size field {:?} is not a number", at(SIZE))))?;
    let mtime = parse_numeric(at(MTIME))
        .ok_or_else(|| bad(format!("mtime field {:?} is not a number", at(MTIME))))?;
    Ok(Header {
        name,
        size,
        typeflag: h[TYPEFLAG],
        mtime,
    })
}

#[cfg(test)]
mod tests {
    use super::super::pax::{parse_pax, PaxOverrides};
    use super::super::DEFAULT_RECORD_SIZE;
    use super::*;

    fn manifest(volume_size: u64) -> Manifest {
        super::super::sample_manifest(volume_size, "wait")
    }

    /// `m` finalized with the digest `sha256-tree:<hex>` and the CRCs `crcs`.
    fn finalized(m: &Manifest, hex: &str, crcs: Vec<u32>) -> Manifest {
        m.finalized(super::super::ImageChecksums {
            digest: Some(format!("sha256-tree:{hex}")),
            sha256: None,
            chunks_crc32c: crcs,
        })
    }

    fn block(bytes: &[u8], at: usize) -> &[u8; BLOCK_SIZE] {
        bytes[at..at + BLOCK_SIZE].try_into().unwrap()
    }

    #[test]
    fn header_fields_and_checksum() {
        let h = ustar_header("manifest.json", 1234, TYPE_REGULAR, 1_700_000_000).unwrap();
        assert_eq!(&h[100..108], b"0000644\0");
        assert_eq!(&h[108..116], b"0000000\0");
        assert_eq!(&h[124..136], b"00000002322\0");
        assert_eq!(&h[257..265], b"ustar\x0000");
        assert_eq!(&h[265..270], b"root\0");
        assert_eq!(h[154], 0);
        assert_eq!(h[155], b' ');
        let stored = parse_numeric(&h[148..156]).unwrap();
        assert_eq!(stored, header_checksum(&h));
        let parsed = parse_header(&h, 0).unwrap();
        assert_eq!(
            parsed,
            Header {
                name: "manifest.json".into(),
                size: 1234,
                typeflag: b'0',
                mtime: 1_700_000_000
            }
        );
        let mut corrupt = h;
        corrupt[3] ^= 1;
        assert!(parse_header(&corrupt, 0).is_err());
    }

    #[test]
    fn octal_overflow_is_an_error() {
        assert!(ustar_header("x", MAX_OCTAL_11, TYPE_REGULAR, 0).is_ok());
        assert!(matches!(
            ustar_header("x", MAX_OCTAL_11 + 1, TYPE_REGULAR, 0),
            Err(TapeError::FieldOverflow { field: "size", .. })
        ));
        assert!(ustar_header(&"n".repeat(101), 0, TYPE_REGULAR, 0).is_err());
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"   644 \0"), Some(0o644));
        assert_eq!(parse_numeric(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_numeric(b"0009\0"), None);
        assert_eq!(parse_numeric(b"12\x0034\0"), None);
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[7..].copy_from_slice(&[0x02, 0x80, 0, 0, 0]);
        assert_eq!(parse_numeric(&b256), Some(10 << 30));
        assert_eq!(parse_numeric(&[0xff; 12]), None);
        assert_eq!(
            parse_numeric(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn ten_gib_volume_size_goes_in_the_pax_header() {
        let size = 10u64 << 30;
        for rs in [512, 1024, 10240, DEFAULT_RECORD_SIZE, 1 << 20] {
            let p = prologue(&manifest(size), &Layout::whole(size), rs, 1_700_000_000).unwrap();
            assert_eq!(p.len() % rs, 0, "record size {rs}");
            // The manifest member.
            let m = parse_header(block(&p, 0), 0).unwrap();
            assert_eq!((m.name.as_str(), m.typeflag), (MANIFEST_NAME, b'0'));
            let json_end = BLOCK_SIZE + m.size as usize;
            let initial: Manifest = serde_json::from_slice(&p[BLOCK_SIZE..json_end]).unwrap();
            assert_eq!(initial, manifest(size));
            // The pax header.
            let at = BLOCK_SIZE + pad512(m.size) as usize;
            let x = parse_header(block(&p, at), at as u64).unwrap();
            assert_eq!((x.name.as_str(), x.typeflag), (PAX_NAME, b'x'));
            assert_eq!(x.size % BLOCK, 0);
            let data = &p[at + BLOCK_SIZE..at + BLOCK_SIZE + x.size as usize];
            let mut o = PaxOverrides::default();
            parse_pax(data, at as u64, &mut o).unwrap();
            assert_eq!(o.size, Some(size));
            assert_eq!(o.path.as_deref(), Some(VOLUME_NAME));
            assert!(std::str::from_utf8(data)
                .unwrap()
                .contains("size=10737418240\n"));
            // The image header, the last block of the prologue: size 0 (too big for ustar).
            let at = at + BLOCK_SIZE + x.size as usize;
            assert_eq!(at + BLOCK_SIZE, p.len());
            let v = parse_header(block(&p, at), at as u64).unwrap();
            assert_eq!(
                (v.name.as_str(), v.typeflag, v.size),
                (VOLUME_NAME, b'0', 0)
            );

            let fin = finalized(&manifest(size), &"ab".repeat(32), vec![7; 10 * 1024]);
            let e = epilogue(&fin, &Layout::whole(size), rs, 1_700_000_000).unwrap();
            assert_eq!((size + e.len() as u64) % rs as u64, 0);
        }
    }

    #[test]
    fn small_volume_keeps_its_size_in_ustar_too() {
        let p = prologue(
            &manifest(4096),
            &Layout::whole(4096),
            DEFAULT_RECORD_SIZE,
            0,
        )
        .unwrap();
        assert_eq!(p.len(), DEFAULT_RECORD_SIZE);
        let v = parse_header(block(&p, p.len() - BLOCK_SIZE), 0).unwrap();
        assert_eq!(v.size, 4096);
    }

    #[test]
    fn prologue_is_whole_records_for_every_record_size() {
        for blocks in 1..=600 {
            let rs = blocks * BLOCK_SIZE;
            let p = prologue(&manifest(12345), &Layout::whole(12345), rs, 0).unwrap();
            assert_eq!(p.len() % rs, 0, "record size {rs}");
            assert!(p.len() <= 2048 + rs, "record size {rs}: {} bytes", p.len());
        }
    }

    #[test]
    fn writer_rejects_bad_input() {
        assert!(matches!(
            prologue(&manifest(4096), &Layout::whole(4096), 1000, 0),
            Err(TapeError::InvalidRecordSize(1000))
        ));
        assert!(matches!(
            prologue(&manifest(4096), &Layout::whole(4096), 0, 0),
            Err(TapeError::InvalidRecordSize(0))
        ));
        assert!(prologue(&manifest(0), &Layout::whole(0), 512, 0).is_err());
        let m = manifest(4096);
        let whole = Layout::whole(4096);
        assert!(prologue(&finalized(&m, &"0".repeat(64), vec![0]), &whole, 512, 0).is_err());
        assert!(epilogue(&m, &whole, 512, 0).is_err());
        assert!(epilogue(&finalized(&m, &"0".repeat(64), vec![0]), &whole, 512, 0).is_ok());
        assert!(epilogue(&finalized(&m, &"0".repeat(64), vec![]), &whole, 512, 0).is_err());
        assert!(epilogue(&finalized(&m, &"0".repeat(63), vec![0]), &whole, 512, 0).is_err());
        assert!(epilogue(&finalized(&m, &"A".repeat(64), vec![0]), &whole, 512, 0).is_err());
        assert!(prologue(&manifest(4096), &Layout::whole(4096), 512, MAX_OCTAL_11 + 1).is_err());
    }

    #[test]
    fn sparse_prologue_ends_with_the_map_on_a_record_boundary() {
        use super::super::CHUNK_SIZE;
        let size = 64 * CHUNK_SIZE + 100;
        let ranges: Vec<_> = (0..40)
            .step_by(3)
            .map(|i| i * CHUNK_SIZE..(i + 1) * CHUNK_SIZE)
            .collect();
        let layout = Layout::new(size, &ranges).unwrap();
        let map = layout.encode_map();
        for rs in [512, 10240, DEFAULT_RECORD_SIZE] {
            let p = prologue(&manifest(size), &layout, rs, 0).unwrap();
            assert_eq!(p.len() % rs, 0, "record size {rs}");
            assert!(p.ends_with(&map));
            let at = p.len() - map.len() - BLOCK_SIZE;
            let v = parse_header(block(&p, at), 0).unwrap();
            let member = map.len() as u64 + layout.stored_bytes();
            assert_eq!((v.name.as_str(), v.size), (SPARSE_NAME, member));
            let text = String::from_utf8_lossy(&p);
            let realsize = format!("GNU.sparse.realsize={size}\n");
            for rec in [
                "GNU.sparse.major=1\n",
                "GNU.sparse.minor=0\n",
                "GNU.sparse.name=volume.img\n",
                &realsize,
                &format!("size={member}\n"),
            ] {
                assert!(text.contains(rec), "{rec:?}");
            }
            assert!(!text.contains("path="));
            let fin = finalized(&manifest(size), &"ab".repeat(32), vec![7; 14]);
            let e = epilogue(&fin, &layout, rs, 0).unwrap();
            assert_eq!((layout.stored_bytes() + e.len() as u64) % rs as u64, 0);
            // One CRC per chunk of stored data, not per chunk of the image.
            let fin = finalized(&manifest(size), &"ab".repeat(32), vec![7; 65]);
            assert!(epilogue(&fin, &layout, rs, 0).is_err());
        }
        assert!(matches!(
            prologue(&manifest(size + 1), &layout, 512, 0),
            Err(TapeError::InvalidLayout(_))
        ));
    }
}
