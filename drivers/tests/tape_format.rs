//! The backup archive format: round trips through `restore`, extraction by GNU tar, and
//! corrupted, truncated and garbage archives.

use std::path::{Path, PathBuf};
use std::process::Command;

use drivers::digest::tree_root;
use drivers::tape::{
    epilogue, prologue, restore, ImageChecksums, ImageDigest, Layout, Manifest, TapeError,
    CHUNK_SIZE, DEFAULT_RECORD_SIZE, FORMAT, FORMAT_V1,
};
use sha2::{Digest, Sha256};

const MTIME: u64 = 1_700_000_000;
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const VOLUME_SIZES: [u64; 5] = [4096, MIB, MIB + 4096, 3 * 256 * KIB, 5 * MIB + 12288];
const RECORD_SIZES: [usize; 3] = [512, 10240, DEFAULT_RECORD_SIZE];

fn initial_manifest(volume_size: u64) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        pair: "db0".into(),
        volume_size,
        block_size: 4096,
        track_size: 256 * KIB,
        split_at_ns: 1_700_000_000_123_456_789,
        mode: "reflect".into(),
        created_at_ns: 1_700_000_001_000_000_000,
        chunk_size: CHUNK_SIZE,
        flat_sha256: true,
        digest: None,
        sha256: None,
        chunks_crc32c: None,
        kind: Default::default(),
        checkpoint: None,
        base_checkpoint: None,
        base_digest: None,
    }
}

/// Deterministic, incompressible-looking bytes (xorshift).
fn volume_bytes(size: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(size as usize);
    while (v.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size as usize);
    v
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Built {
    archive: Vec<u8>,
    volume: Vec<u8>,
    final_manifest: Manifest,
    prologue_len: usize,
}

/// Builds an archive the way the engine does: prologue, the image fed through an ImageDigest,
/// epilogue; with the tree digest and the flat SHA-256.
fn build(volume_size: u64, record_size: usize) -> Built {
    build_from(initial_manifest(volume_size), record_size)
}

/// [`build`] from another initial manifest (another format, no flat SHA-256).
fn build_from(initial: Manifest, record_size: usize) -> Built {
    let volume_size = initial.volume_size;
    let volume = volume_bytes(volume_size, volume_size ^ record_size as u64);
    let mut archive = prologue(
        &initial,
        &Layout::whole(initial.volume_size),
        record_size,
        MTIME,
    )
    .unwrap();
    let prologue_len = archive.len();
    let mut digest = ImageDigest::for_manifest(&initial).unwrap();
    for piece in volume.chunks(record_size) {
        digest.update(piece);
        archive.extend_from_slice(piece);
    }
    let final_manifest = initial.finalized(digest.finish());
    archive.extend(
        epilogue(
            &final_manifest,
            &Layout::whole(final_manifest.volume_size),
            record_size,
            MTIME,
        )
        .unwrap(),
    );
    Built {
        archive,
        volume,
        final_manifest,
        prologue_len,
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("quicksplit-tape-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tar(args: &[&str], file: &Path) -> (String, String) {
    let out = Command::new("tar")
        .args(args)
        .arg("-f")
        .arg(file)
        .output()
        .expect("GNU tar must be installed to run these tests");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "tar {args:?} failed: {}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

#[test]
fn round_trip() {
    for rs in RECORD_SIZES {
        for vs in VOLUME_SIZES {
            let b = build(vs, rs);
            assert_eq!(b.archive.len() % rs, 0, "volume {vs}, record {rs}");
            assert_eq!(b.prologue_len % rs, 0, "volume {vs}, record {rs}");
            assert_eq!(
                &b.archive[b.prologue_len..b.prologue_len + vs as usize],
                &b.volume[..]
            );
            let mut out = Vec::new();
            let report = restore(&b.archive[..], &mut out, rs).unwrap();
            assert!(
                out == b.volume,
                "volume {vs}, record {rs}: restored bytes differ"
            );
            assert_eq!(report.bytes, vs);
            assert_eq!(report.manifest, b.final_manifest);
            assert_eq!(report.sha256, Some(sha256_hex(&b.volume)));
            assert_eq!(report.digest, Some(tree_root(&b.volume).to_string()));
            assert_eq!(report.manifest.digest, report.digest);
            assert_eq!(
                report.manifest.chunks_crc32c.as_ref().unwrap().len() as u64,
                vs.div_ceil(CHUNK_SIZE)
            );
        }
    }
}

#[test]
fn default_record_size_prologue_is_one_record() {
    for vs in VOLUME_SIZES {
        let b = build(vs, DEFAULT_RECORD_SIZE);
        assert_eq!(b.prologue_len, DEFAULT_RECORD_SIZE);
    }
}

#[test]
fn initial_manifest_has_null_checksums() {
    let b = build(MIB + 4096, DEFAULT_RECORD_SIZE);
    let end = b.archive[512..1024].iter().position(|&c| c == 0).unwrap() + 512;
    let json: serde_json::Value = serde_json::from_slice(&b.archive[512..end]).unwrap();
    assert_eq!(json["sha256"], serde_json::Value::Null);
    assert_eq!(json["digest"], serde_json::Value::Null);
    assert_eq!(json["flat_sha256"], true);
    assert_eq!(json["chunks_crc32c"], serde_json::Value::Null);
    assert_eq!(json["volume_size"], MIB + 4096);
    assert_eq!(json["format"], FORMAT);
}

#[test]
fn restore_with_another_record_size_than_written() {
    let b = build(5 * MIB + 12288, DEFAULT_RECORD_SIZE);
    for read_rs in [512, 10240, 4 * DEFAULT_RECORD_SIZE] {
        let mut out = Vec::new();
        let report = restore(&b.archive[..], &mut out, read_rs).unwrap();
        assert!(out == b.volume);
        assert_eq!(report.manifest, b.final_manifest);
    }
    let b = build(MIB + 4096, 512);
    let mut out = Vec::new();
    restore(&b.archive[..], &mut out, DEFAULT_RECORD_SIZE).unwrap();
    assert!(out == b.volume);
}

#[test]
fn restore_rejects_bad_record_size() {
    let b = build(4096, 512);
    let err = restore(&b.archive[..], std::io::sink(), 1000).unwrap_err();
    assert!(matches!(err, TapeError::InvalidRecordSize(1000)), "{err}");
}

#[test]
fn gnu_tar_extracts_and_lists() {
    let cases: &[(u64, usize, &str)] = &[
        (4096, DEFAULT_RECORD_SIZE, "512"),
        (MIB, DEFAULT_RECORD_SIZE, "512"),
        (MIB + 4096, DEFAULT_RECORD_SIZE, "512"),
        (3 * 256 * KIB, DEFAULT_RECORD_SIZE, "512"),
        (5 * MIB + 12288, DEFAULT_RECORD_SIZE, "512"),
        (4096, 10240, "20"),
        (MIB + 4096, 10240, "20"),
        (5 * MIB + 12288, 10240, "20"),
        (MIB + 4096, 512, "1"),
    ];
    for &(vs, rs, blocking) in cases {
        let name = format!("tar-{vs}-{rs}");
        let scratch = Scratch::new(&name);
        let b = build(vs, rs);
        let file = scratch.0.join("backup.tar");
        std::fs::write(&file, &b.archive).unwrap();
        let dir = scratch.0.join("out");
        std::fs::create_dir(&dir).unwrap();

        let (_, stderr) = tar(&["-x", "-b", blocking, "-C", dir.to_str().unwrap()], &file);
        assert_eq!(stderr, "", "{name}: tar -x warned");
        let image = std::fs::read(dir.join("volume.img")).unwrap();
        assert!(image == b.volume, "{name}: extracted volume.img differs");
        assert_eq!(sha256_hex(&image), sha256_hex(&b.volume));
        let manifest: Manifest =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest, b.final_manifest, "{name}");
        assert_eq!(
            manifest.sha256.as_deref(),
            Some(sha256_hex(&b.volume).as_str())
        );
        let mtime = std::fs::metadata(dir.join("volume.img"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(mtime, MTIME, "{name}");
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        assert_eq!(entries, ["manifest.json", "volume.img"], "{name}");

        let (listing, stderr) = tar(&["-t", "-v", "-b", blocking], &file);
        assert_eq!(stderr, "", "{name}: tar -t warned");
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{name}: {listing}");
        assert!(lines[0].ends_with(" manifest.json"), "{name}: {listing}");
        assert!(lines[2].ends_with(" manifest.json"), "{name}: {listing}");
        let fields: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(fields.last(), Some(&"volume.img"), "{name}: {listing}");
        assert_eq!(fields[0], "-rw-r--r--", "{name}: {listing}");
        assert_eq!(fields[1], "root/root", "{name}: {listing}");
        assert_eq!(fields[2], vs.to_string(), "{name}: {listing}");
    }
}

/// A 10 GiB image declared in the pax header, as a sparse file: GNU tar lists it with the right
/// size and finds the final manifest after it (tar seeks over the data; nothing is written).
#[test]
fn gnu_tar_lists_a_sparse_ten_gib_archive() {
    let vs = 10 * 1024 * MIB;
    let rs = DEFAULT_RECORD_SIZE;
    let initial = initial_manifest(vs);
    let p = prologue(&initial, &Layout::whole(initial.volume_size), rs, MTIME).unwrap();
    // The checksums do not matter to tar; the CRC list has the right length.
    let fin = initial.finalized(ImageChecksums {
        digest: Some(format!("sha256-tree:{}", "0".repeat(64))),
        sha256: Some("0".repeat(64)),
        chunks_crc32c: vec![0; vs.div_ceil(CHUNK_SIZE) as usize],
    });
    let e = epilogue(&fin, &Layout::whole(fin.volume_size), rs, MTIME).unwrap();
    assert_eq!((p.len() as u64 + vs + e.len() as u64) % rs as u64, 0);

    let scratch = Scratch::new("sparse-10g");
    let path = scratch.0.join("big.tar");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&p).unwrap();
        f.seek(SeekFrom::Start(p.len() as u64 + vs)).unwrap();
        f.write_all(&e).unwrap();
    }
    let (listing, stderr) = tar(&["-t", "-v", "-b", "512"], &path);
    assert_eq!(stderr, "");
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 3, "{listing}");
    let fields: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(fields[2], vs.to_string(), "{listing}");
    assert!(lines[1].ends_with(" volume.img"), "{listing}");
    assert!(lines[2].ends_with(" manifest.json"), "{listing}");
}

#[test]
fn flipped_volume_byte_fails_the_digest_and_names_the_chunk() {
    let b = build(5 * MIB + 12288, DEFAULT_RECORD_SIZE);
    let want = tree_root(&b.volume).to_string();
    for (at, chunk) in [(0u64, 0u64), (3 * MIB + 5, 3), (5 * MIB + 12287, 5)] {
        let mut a = b.archive.clone();
        a[b.prologue_len + at as usize] ^= 0x40;
        let err = restore(&a[..], std::io::sink(), DEFAULT_RECORD_SIZE).unwrap_err();
        let msg = err.to_string();
        let mut flipped = b.volume.clone();
        flipped[at as usize] ^= 0x40;
        let got = tree_root(&flipped).to_string();
        assert!(
            matches!(&err, TapeError::DigestMismatch { expected, actual, damaged }
                if *expected == want && *actual == got
                    && *damaged == Some((chunk, chunk * CHUNK_SIZE))),
            "{msg}"
        );
        assert_eq!(
            msg,
            format!(
                "image digest mismatch: manifest {want}, data {got}; chunk {chunk} (offset {}) \
                 fails its CRC-32C too",
                chunk * CHUNK_SIZE
            )
        );
    }
}

#[test]
fn flipped_final_manifest_digest_is_an_error() {
    let b = build(MIB + 4096, DEFAULT_RECORD_SIZE);
    let key = b"\"digest\":\"sha256-tree:";
    let at = b
        .archive
        .windows(key.len())
        .rposition(|w| w == key)
        .unwrap()
        + key.len();
    let mut a = b.archive.clone();
    a[at + 3] = if a[at + 3] == b'0' { b'1' } else { b'0' };
    let err = restore(&a[..], std::io::sink(), DEFAULT_RECORD_SIZE).unwrap_err();
    // The data is whole (every CRC holds): no chunk is named.
    assert!(
        matches!(err, TapeError::DigestMismatch { damaged: None, .. }),
        "{err}"
    );
}

#[test]
fn archives_without_a_flat_sha256_have_none() {
    let mut initial = initial_manifest(3 * MIB + 4096);
    initial.flat_sha256 = false;
    let b = build_from(initial, DEFAULT_RECORD_SIZE);
    let tail = String::from_utf8_lossy(&b.archive[b.prologue_len + 3 * MIB as usize..]);
    assert!(!tail.contains("sha256\""), "{tail}");
    let mut out = Vec::new();
    let report = restore(&b.archive[..], &mut out, DEFAULT_RECORD_SIZE).unwrap();
    assert!(out == b.volume);
    assert_eq!(report.sha256, None);
    assert_eq!(report.digest, Some(tree_root(&b.volume).to_string()));
}

/// Archives written before the tree digest (format 1: a flat SHA-256 only) still restore and
/// verify.
#[test]
fn first_format_archives_restore_and_verify() {
    let mut initial = initial_manifest(2 * MIB + 512);
    initial.format = FORMAT_V1.into();
    initial.flat_sha256 = false;
    let b = build_from(initial, 10240);
    assert_eq!(b.final_manifest.digest, None);
    let mut out = Vec::new();
    let report = restore(&b.archive[..], &mut out, 10240).unwrap();
    assert!(out == b.volume);
    assert_eq!(report.digest, None);
    assert_eq!(report.sha256, Some(sha256_hex(&b.volume)));
    // Its checks hold: a flipped byte is caught by its chunk's CRC.
    let mut a = b.archive.clone();
    a[b.prologue_len + MIB as usize + 1] ^= 1;
    let err = restore(&a[..], std::io::sink(), 10240).unwrap_err();
    assert!(
        matches!(err, TapeError::ChunkCrcMismatch { index: 1, .. }),
        "{err}"
    );
    // A digest is not part of that format.
    let mut fin = b.final_manifest.clone();
    fin.digest = Some(tree_root(&b.volume).to_string());
    assert!(epilogue(&fin, &Layout::whole(fin.volume_size), 10240, MTIME).is_err());
}

/// The byte offset of the final manifest's sha256 value in the archive.
fn final_sha_offset(a: &[u8]) -> usize {
    let key = b"\"sha256\":\"";
    a.windows(key.len()).rposition(|w| w == key).unwrap() + key.len()
}

#[test]
fn flipped_final_manifest_sha256_is_an_error() {
    let b = build(MIB + 4096, DEFAULT_RECORD_SIZE);
    let at = final_sha_offset(&b.archive);
    // Another hex digit: a well-formed manifest with the wrong digest.
    let mut a = b.archive.clone();
    a[at + 10] = if a[at + 10] == b'0' { b'1' } else { b'0' };
    let err = restore(&a[..], std::io::sink(), DEFAULT_RECORD_SIZE).unwrap_err();
    assert!(matches!(err, TapeError::Sha256Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("SHA-256 mismatch"), "{err}");
    // A bit flip that leaves no hex digit: a malformed manifest.
    let mut a = b.archive.clone();
    a[at] ^= 0x80;
    let err = restore(&a[..], std::io::sink(), DEFAULT_RECORD_SIZE).unwrap_err();
    assert!(
        matches!(err, TapeError::BadManifest { which: "final", .. }),
        "{err}"
    );
}

#[test]
fn flipped_chunk_crc_in_final_manifest_is_an_error() {
    let b = build(3 * 256 * KIB, 10240);
    let key = b"\"chunks_crc32c\":[";
    let at = b
        .archive
        .windows(key.len())
        .rposition(|w| w == key)
        .unwrap()
        + key.len();
    let mut a = b.archive.clone();
    // The first digit of the first CRC: 1..9 -> another digit 1..9 keeps it a valid u32 here.
    a[at] = if a[at] == b'1' { b'2' } else { b'1' };
    let err = restore(&a[..], std::io::sink(), 10240).unwrap_err();
    assert!(
        matches!(err, TapeError::ChunkCrcMismatch { index: 0, .. }),
        "{err}"
    );
}

#[test]
fn manifests_that_disagree_are_an_error() {
    let vs = MIB + 4096;
    let rs = 10240;
    let volume = volume_bytes(vs, 1);
    let initial = initial_manifest(vs);
    let mut a = prologue(&initial, &Layout::whole(initial.volume_size), rs, MTIME).unwrap();
    a.extend_from_slice(&volume);
    let mut d = ImageDigest::new(CHUNK_SIZE, true).unwrap();
    d.update(&volume);
    let mut other = initial.finalized(d.finish());
    other.pair = "db1".into();
    other.mode = "wait".into();
    a.extend(epilogue(&other, &Layout::whole(other.volume_size), rs, MTIME).unwrap());
    let err = restore(&a[..], std::io::sink(), rs).unwrap_err();
    assert!(
        matches!(&err, TapeError::ManifestMismatch { fields } if fields == "mode, pair"),
        "{err}"
    );
}

#[test]
fn truncated_archives_are_errors() {
    // Small enough to try every block boundary and odd offsets in between.
    let b = build(4096 + 100, 512);
    // With 512-byte records there is no padding after the end marker: every cut loses a part.
    for cut in (0..b.archive.len()).filter(|c| c % 512 == 0 || c % 97 == 0) {
        let res = restore(&b.archive[..cut], std::io::sink(), 512);
        let err = match res {
            Ok(_) => panic!("archive cut at {cut} of {} restored", b.archive.len()),
            Err(e) => e,
        };
        assert!(
            matches!(
                err,
                TapeError::Truncated { .. } | TapeError::MissingMember { .. }
            ),
            "cut at {cut}: {err}"
        );
    }
    // A big archive cut in the middle of the image.
    let b = build(5 * MIB + 12288, DEFAULT_RECORD_SIZE);
    let cut = b.prologue_len + 2 * MIB as usize + 3;
    let err = restore(&b.archive[..cut], std::io::sink(), DEFAULT_RECORD_SIZE).unwrap_err();
    assert!(
        matches!(err, TapeError::Truncated { offset, .. } if offset == cut as u64),
        "{err}"
    );
    assert!(err.to_string().contains("volume.img"), "{err}");
    // Cut right after the image: the final manifest is missing.
    let cut = b.prologue_len + 5 * MIB as usize + 12288;
    let err = restore(&b.archive[..cut], std::io::sink(), DEFAULT_RECORD_SIZE).unwrap_err();
    assert!(matches!(err, TapeError::Truncated { .. }), "{err}");
}

#[test]
fn a_missing_final_manifest_is_an_error() {
    let b = build(4096, 512);
    // Replace the final manifest member by the end-of-archive marker.
    let after_volume = b.prologue_len + 4096;
    let mut a = b.archive[..after_volume].to_vec();
    a.extend_from_slice(&[0; 1024]);
    let err = restore(&a[..], std::io::sink(), 512).unwrap_err();
    assert!(matches!(err, TapeError::MissingMember { .. }), "{err}");
    assert!(err.to_string().contains("final manifest"), "{err}");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0; 10],
        vec![0; 1024],
        vec![0; 512],
        vec![0xff; 4096],
        b"hello, this is not a tar archive".to_vec(),
    ];
    for seed in 1..40u64 {
        inputs.push(volume_bytes(seed * 311, seed));
    }
    // Valid prologue, then garbage.
    let b = build(MIB, 10240);
    let mut a = b.archive[..b.prologue_len].to_vec();
    a.extend(volume_bytes(3 * MIB, 7));
    inputs.push(a);
    // Headers with a flipped byte each.
    let volume_header = b.prologue_len - 512;
    let offsets = [
        0,
        100,
        124,
        148,
        156,
        257,
        263,
        512 + 10,      // the initial manifest's JSON
        1024 + 10,     // the pax header's name
        1536,          // the first pax record's length
        volume_header, // volume.img's name
        volume_header + 124,
    ];
    for at in offsets {
        let mut a = b.archive.clone();
        a[at] ^= 0x5a;
        inputs.push(a);
    }
    for (i, input) in inputs.iter().enumerate() {
        for rs in [512, 10240] {
            assert!(
                restore(&input[..], std::io::sink(), rs).is_err(),
                "input {i} (len {}) restored",
                input.len()
            );
        }
    }
}

#[test]
fn pax_size_disagreeing_with_the_manifest_is_an_error() {
    // The pax size= of volume.img overrides the ustar size field.
    let b = build(4096, 512);
    let mut a = b.archive[..b.prologue_len].to_vec();
    let text = String::from_utf8_lossy(&a).into_owned();
    let at = text.find("size=4096\n").unwrap();
    // Same length: "size=9999" keeps the record length valid.
    a[at..at + 9].copy_from_slice(b"size=9999");
    let err = restore(&a[..], std::io::sink(), 512).unwrap_err();
    assert!(matches!(err, TapeError::VolumeSizeMismatch { .. }), "{err}");
}
