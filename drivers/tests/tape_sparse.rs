//! Sparse and incremental archives written by the tape sinks (a file, and a pipe read by GNU tar):
//! GNU tar extracts a file of the image's size with the stored data at its offsets and holes
//! elsewhere, and `restore` gives back the image (an incremental onto its base).

// Lists of stored ranges may be one range long.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drivers::digest::tree_root;
use drivers::sink::tape::TapeSink;
use drivers::sink::tape_device::TapeDeviceSink;
use drivers::sink::{Sink, SinkDone, SinkFull};
use drivers::tape::{
    read_manifests, restore, restore_into, ArchiveKind, ChunkCrcs, ImageChain, ImageChecksums,
    ImageTarget, Manifest, CHUNK_SIZE, DEFAULT_RECORD_SIZE, FORMAT,
};
use drivers::{ChannelContext, IoBufs};
use hugepages::BufferPool;

const MIB: u64 = CHUNK_SIZE;

fn initial_manifest(volume_size: u64, base: Option<&[u8]>) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        pair: "db0".into(),
        volume_size,
        block_size: 4096,
        track_size: MIB,
        split_at_ns: 1_700_000_000_123_456_789,
        mode: "merge".into(),
        created_at_ns: 1_700_000_001_000_000_000,
        chunk_size: CHUNK_SIZE,
        flat_sha256: false,
        digest: None,
        sha256: None,
        chunks_crc32c: None,
        kind: if base.is_some() {
            ArchiveKind::Incremental
        } else {
            ArchiveKind::Full
        },
        checkpoint: Some("next".into()),
        base_checkpoint: base.map(|_| "base".into()),
        base_digest: base.map(|b| tree_root(b).to_string()),
    }
}

/// Deterministic bytes (xorshift) with the chunks `holes` zeros.
fn image(size: u64, seed: u64, holes: &[u64]) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(size as usize + 8);
    while (v.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size as usize);
    for &h in holes {
        let end = ((h + 1) * MIB).min(size);
        v[(h * MIB) as usize..end as usize].fill(0);
    }
    v
}

/// The final manifest of an archive of `image` storing `stored`: the digest of the whole image,
/// one CRC per chunk of stored data.
fn final_manifest(initial: &Manifest, image: &[u8], stored: &[Range<u64>]) -> Manifest {
    let mut crcs = ChunkCrcs::new(CHUNK_SIZE).unwrap();
    for r in stored {
        crcs.update(&image[r.start as usize..r.end as usize]);
    }
    initial.finalized(ImageChecksums {
        digest: Some(tree_root(image).to_string()),
        sha256: None,
        chunks_crc32c: crcs.finish(),
    })
}

/// Feeds `stored` of `image` to `sink` in pieces of at most 1 MiB, as the backup job does, then
/// finishes it with `fin`.
fn drive(sink: &mut dyn Sink, image: &[u8], stored: &[Range<u64>], fin: &Manifest) {
    let pool = BufferPool::new(MIB as usize, 4).unwrap();
    let mut done: Vec<SinkDone> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let settle = |sink: &mut dyn Sink, done: &mut Vec<SinkDone>| {
        assert!(Instant::now() < deadline, "the sink does not complete");
        sink.poll(done);
        for d in done.drain(..) {
            assert!(d.result.is_ok(), "piece at {}: {:?}", d.offset, d.result);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    for r in stored {
        let mut at = r.start;
        while at < r.end {
            let len = (r.end - at).min(MIB) as usize;
            let mut buf = loop {
                match pool.get() {
                    Some(b) => break b,
                    None => settle(sink, &mut done),
                }
            };
            buf.set_len(len).unwrap();
            buf.as_mut_slice()
                .copy_from_slice(&image[at as usize..at as usize + len]);
            let mut bufs = IoBufs::new();
            bufs.push(buf);
            loop {
                match sink.submit(at, bufs) {
                    Ok(()) => break,
                    Err(SinkFull::Busy(back)) => {
                        bufs = back;
                        settle(sink, &mut done);
                    }
                    Err(SinkFull::Failed(e, _)) => panic!("submit at {at}: {e:?}"),
                }
            }
            at += len as u64;
        }
    }
    while sink.in_flight() > 0 {
        settle(sink, &mut done);
    }
    sink.finish(fin).unwrap();
    loop {
        if let Some(r) = sink.finished() {
            r.unwrap();
            break;
        }
        settle(sink, &mut done);
    }
}

/// Writes the archive of `image` storing `stored` with the file tape sink.
fn write_archive(path: &Path, initial: &Manifest, image: &[u8], stored: &[Range<u64>], rs: usize) {
    let ctx = ChannelContext {
        queue_depth: 32,
        ..Default::default()
    };
    let mut sink = TapeSink::open(path, initial, rs, stored, &ctx).unwrap();
    drive(
        &mut sink,
        image,
        stored,
        &final_manifest(initial, image, stored),
    );
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "quicksplit-tape-sparse-{}-{name}",
            std::process::id()
        ));
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

fn tar_extract(archive: &Path, blocking: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("tar")
        .args(["-x", "-b", blocking, "-C"])
        .arg(dir)
        .arg("-f")
        .arg(archive)
        .output()
        .expect("GNU tar must be installed to run these tests");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tar -x failed: {stderr}");
    assert_eq!(stderr, "", "tar -x warned");
}

/// What GNU tar extracts from an archive storing `stored` of `image`: the data at its offsets,
/// zeros elsewhere.
fn expected_extract(image: &[u8], stored: &[Range<u64>]) -> Vec<u8> {
    let mut v = vec![0u8; image.len()];
    for r in stored {
        let r = r.start as usize..r.end as usize;
        v[r.clone()].copy_from_slice(&image[r]);
    }
    v
}

/// Checks GNU tar's `volume.img` in `dir`: the image's size, the stored data at its offsets,
/// holes elsewhere (SEEK_DATA skips them and they take no blocks).
fn check_extracted(dir: &Path, image: &[u8], stored: &[Range<u64>], fin: &Manifest) {
    let path = dir.join("volume.img");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), image.len(), "extracted size");
    assert!(bytes == expected_extract(image, stored), "extracted bytes");
    let meta = std::fs::metadata(&path).unwrap();
    let stored_bytes: u64 = stored.iter().map(|r| r.end - r.start).sum();
    assert!(
        meta.blocks() * 512 <= stored_bytes + 64 * 1024,
        "{} bytes allocated for {stored_bytes} stored",
        meta.blocks() * 512
    );
    let file = std::fs::File::open(&path).unwrap();
    let first_data = seek_data(&file, 0);
    assert_eq!(
        first_data,
        stored.first().map(|r| r.start),
        "SEEK_DATA from 0"
    );
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(&manifest, fin);
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, ["manifest.json", "volume.img"]);
}

/// The offset of the first data at or after `from` (`None`: only holes follow).
fn seek_data(file: &std::fs::File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor owned by `file`; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "SEEK_DATA: {e}");
        return None;
    }
    Some(at as u64)
}

/// An image in memory.
struct Memory(Vec<u8>);

impl ImageTarget for Memory {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[test]
fn sparse_full_archive_from_the_sink_extracts_with_holes() {
    let size = 6 * MIB + 4096;
    // Holes at the start, in the middle and at the end (a short last chunk).
    let img = image(size, 11, &[0, 2, 3, 6]);
    let stored = [MIB..2 * MIB, 4 * MIB..6 * MIB];
    for (rs, blocking) in [(DEFAULT_RECORD_SIZE, "512"), (10240, "20")] {
        let scratch = Scratch::new(&format!("full-{rs}"));
        let archive = scratch.0.join("full.tar");
        let initial = initial_manifest(size, None);
        write_archive(&archive, &initial, &img, &stored, rs);
        let bytes = std::fs::read(&archive).unwrap();
        assert_eq!(bytes.len() % rs, 0, "whole records");
        let fin = final_manifest(&initial, &img, &stored);

        tar_extract(&archive, blocking, &scratch.0.join("out"));
        check_extracted(&scratch.0.join("out"), &img, &stored, &fin);

        let mut out = Vec::new();
        let report = restore(&bytes[..], &mut out, rs).unwrap();
        assert!(out == img, "restored bytes");
        assert_eq!(report.stored, 3 * MIB);
        assert_eq!(report.digest, fin.digest);
        let seen = read_manifests(std::fs::File::open(&archive).unwrap()).unwrap();
        assert_eq!(seen.manifest, fin);
        assert_eq!(seen.layout.stored(), &stored);
    }
}

#[test]
fn incremental_archive_from_the_sink_extracts_its_changes_and_restores_onto_its_base() {
    let size = 8 * MIB;
    let base = image(size, 3, &[7]);
    let mut next = base.clone();
    let fresh = image(size, 5, &[]);
    let changed = [MIB..2 * MIB, 5 * MIB..7 * MIB];
    for r in &changed {
        let r = r.start as usize..r.end as usize;
        next[r.clone()].copy_from_slice(&fresh[r]);
    }
    // A chunk changed to zeros is stored too: unchanged is not zero.
    next[(6 * MIB) as usize..(7 * MIB) as usize].fill(0);

    let scratch = Scratch::new("incremental");
    let full_path = scratch.0.join("full.tar");
    let inc_path = scratch.0.join("inc.tar");
    write_archive(
        &full_path,
        &initial_manifest(size, None),
        &base,
        &[0..size],
        DEFAULT_RECORD_SIZE,
    );
    let initial = initial_manifest(size, Some(&base));
    write_archive(&inc_path, &initial, &next, &changed, DEFAULT_RECORD_SIZE);
    let fin = final_manifest(&initial, &next, &changed);

    tar_extract(&inc_path, "512", &scratch.0.join("out"));
    check_extracted(&scratch.0.join("out"), &next, &changed, &fin);

    let mut target = Memory(vec![0xa5; size as usize]);
    let mut chain = ImageChain::new();
    let full = std::fs::read(&full_path).unwrap();
    let inc = std::fs::read(&inc_path).unwrap();
    restore_into(&full[..], &mut target, DEFAULT_RECORD_SIZE, &mut chain).unwrap();
    assert!(target.0 == base);
    let report = restore_into(&inc[..], &mut target, DEFAULT_RECORD_SIZE, &mut chain).unwrap();
    assert!(target.0 == next, "the base with the changes applied");
    assert_eq!(report.manifest.kind, ArchiveKind::Incremental);
    assert_eq!(chain.root(), Some(tree_root(&next)));
}

#[test]
fn an_incremental_with_nothing_changed_is_a_file_of_holes() {
    let size = 3 * MIB + 512;
    let base = image(size, 9, &[]);
    let scratch = Scratch::new("unchanged");
    let path = scratch.0.join("inc.tar");
    let initial = initial_manifest(size, Some(&base));
    write_archive(&path, &initial, &base, &[], 10240);
    tar_extract(&path, "20", &scratch.0.join("out"));
    check_extracted(
        &scratch.0.join("out"),
        &base,
        &[],
        &final_manifest(&initial, &base, &[]),
    );
}

#[test]
fn sparse_archive_through_a_pipe_is_read_by_gnu_tar() {
    let size = 5 * MIB + 8192;
    let img = image(size, 21, &[0, 1, 3]);
    let stored = [2 * MIB..3 * MIB, 4 * MIB..size];
    let scratch = Scratch::new("pipe");
    let fifo = scratch.0.join("tape.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let out = scratch.0.join("out");
    std::fs::create_dir(&out).unwrap();
    let tar = Command::new("tar")
        .args(["-x", "-b", "512", "-C"])
        .arg(&out)
        .arg("-f")
        .arg(&fifo)
        .stderr(Stdio::piped())
        .spawn()
        .expect("GNU tar must be installed to run these tests");
    let initial = initial_manifest(size, None);
    let fin = final_manifest(&initial, &img, &stored);
    let mut sink = TapeDeviceSink::open(&fifo, &initial, DEFAULT_RECORD_SIZE, &stored).unwrap();
    drive(&mut sink, &img, &stored, &fin);
    drop(sink);
    let tar_out = tar.wait_with_output().unwrap();
    assert!(
        tar_out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&tar_out.stderr)
    );
    check_extracted(&out, &img, &stored, &fin);
}

#[test]
fn sinks_refuse_layouts_and_pieces_outside_the_stored_ranges() {
    let size = 4 * MIB;
    let initial = initial_manifest(size, None);
    let scratch = Scratch::new("refuse");
    let path = scratch.0.join("a.tar");
    let ctx = ChannelContext::default();
    for bad in [
        vec![MIB..MIB + 4096],
        vec![2 * MIB..3 * MIB, 0..MIB],
        vec![0..5 * MIB],
    ] {
        let err = TapeSink::open(&path, &initial, DEFAULT_RECORD_SIZE, &bad, &ctx)
            .err()
            .expect("refused");
        assert!(err.contains("stored range"), "{err}");
    }
    let mut sink =
        TapeSink::open(&path, &initial, DEFAULT_RECORD_SIZE, &[MIB..2 * MIB], &ctx).unwrap();
    let pool = BufferPool::new(MIB as usize, 1).unwrap();
    let mut bufs = IoBufs::new();
    bufs.push(pool.get().unwrap());
    match sink.submit(0, bufs) {
        Err(SinkFull::Failed(e, _)) => assert!(format!("{e:?}").contains("stored range")),
        other => panic!("a piece in a hole was taken: {:?}", other.is_ok()),
    }
    sink.abandon();
}
