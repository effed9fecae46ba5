//! `quicksplit restore FULL INC1 INC2 --to PATH`: a sparse full archive and two incrementals
//! give back the last image byte for byte (holes kept); a reordered chain, a missing middle
//! archive, a foreign archive and an incremental alone are refused with nothing written.

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use drivers::digest::tree_root;
use drivers::tape::{
    epilogue, prologue, ArchiveKind, ChunkCrcs, ImageChecksums, Layout, Manifest, CHUNK_SIZE,
    DEFAULT_RECORD_SIZE, FORMAT,
};
use quicksplit_tests::{binary, TempDir};

const MIB: u64 = CHUNK_SIZE;
/// Six chunks and a short seventh.
const SIZE: u64 = 6 * MIB + 4096;

fn quicksplit(args: &[&Path]) -> Output {
    Command::new(binary("quicksplit"))
        .arg("restore")
        .args(args)
        .output()
        .expect("run quicksplit")
}

fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Deterministic bytes (xorshift).
fn pattern(size: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(size as usize + 8);
    while (v.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size as usize);
    v
}

fn chunk(i: u64) -> Range<usize> {
    (i * MIB) as usize..((i + 1) * MIB).min(SIZE) as usize
}

/// One archive of a chain: what it stores of `image`, the checkpoint it makes and its base.
struct Archive<'a> {
    image: &'a [u8],
    stored: Vec<Range<u64>>,
    checkpoint: &'a str,
    base: Option<(&'a str, &'a [u8])>,
}

/// Writes the archive the way the tape sink lays it out.
fn write(path: &Path, a: &Archive<'_>) {
    let initial = Manifest {
        format: FORMAT.into(),
        pair: "pair0".into(),
        volume_size: SIZE,
        block_size: 4096,
        track_size: MIB,
        split_at_ns: 1_700_000_000_000_000_000,
        mode: "merge".into(),
        created_at_ns: 1_700_000_001_000_000_000,
        chunk_size: CHUNK_SIZE,
        flat_sha256: false,
        digest: None,
        sha256: None,
        chunks_crc32c: None,
        kind: if a.base.is_some() {
            ArchiveKind::Incremental
        } else {
            ArchiveKind::Full
        },
        checkpoint: Some(a.checkpoint.into()),
        base_checkpoint: a.base.map(|(c, _)| c.into()),
        base_digest: a.base.map(|(_, img)| tree_root(img).to_string()),
    };
    let layout = Layout::new(SIZE, &a.stored).unwrap();
    let mut bytes = prologue(&initial, &layout, DEFAULT_RECORD_SIZE, 1_700_000_001).unwrap();
    let mut crcs = ChunkCrcs::new(CHUNK_SIZE).unwrap();
    for r in &a.stored {
        let data = &a.image[r.start as usize..r.end as usize];
        crcs.update(data);
        bytes.extend_from_slice(data);
    }
    let fin = initial.finalized(ImageChecksums {
        digest: Some(tree_root(a.image).to_string()),
        sha256: None,
        chunks_crc32c: crcs.finish(),
    });
    bytes.extend(epilogue(&fin, &layout, DEFAULT_RECORD_SIZE, 1_700_000_001).unwrap());
    std::fs::write(path, bytes).unwrap();
}

/// The refusal of a chain: exit code 1, the message, and nothing written at `to`.
fn assert_refused(args: &[&Path], to: &Path, want: &str) {
    let out = quicksplit(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err}");
    assert!(!to.exists(), "{args:?}: {} was written", to.display());
    assert!(!partial(to).exists(), "{args:?}: a partial file is left");
}

/// The archives of a chain (full, inc1, inc2, and a foreign inc1 onto another image of c0)
/// written in `dir`, and the images after each.
struct Chain {
    full: PathBuf,
    inc1: PathBuf,
    inc2: PathBuf,
    foreign: PathBuf,
    image0: Vec<u8>,
    image2: Vec<u8>,
}

fn write_chain(dir: &Path) -> Chain {
    let d = |name: &str| dir.join(name);
    // c0: chunks 2 and 4 are holes (a sparse full archive leaves them out).
    let mut image0 = pattern(SIZE, 1);
    image0[chunk(2)].fill(0);
    image0[chunk(4)].fill(0);
    // c1: chunk 1 changed, chunk 4 now holds data.
    let mut image1 = image0.clone();
    image1[chunk(1)].copy_from_slice(&pattern(MIB, 2));
    image1[chunk(4)].copy_from_slice(&pattern(MIB, 3));
    // c2: chunk 1 zeroed (stored: unchanged is not zero) and the short last chunk changed.
    let mut image2 = image1.clone();
    image2[chunk(1)].fill(0);
    image2[chunk(6)].copy_from_slice(&pattern(4096, 4));

    let (full, inc1, inc2) = (d("full.tar"), d("inc1.tar"), d("inc2.tar"));
    write(
        &full,
        &Archive {
            image: &image0,
            stored: vec![0..2 * MIB, 3 * MIB..4 * MIB, 5 * MIB..SIZE],
            checkpoint: "c0",
            base: None,
        },
    );
    write(
        &inc1,
        &Archive {
            image: &image1,
            stored: vec![MIB..2 * MIB, 4 * MIB..5 * MIB],
            checkpoint: "c1",
            base: Some(("c0", &image0)),
        },
    );
    write(
        &inc2,
        &Archive {
            image: &image2,
            stored: vec![MIB..2 * MIB, 6 * MIB..SIZE],
            checkpoint: "c2",
            base: Some(("c1", &image1)),
        },
    );
    // c1 again, but onto another image of c0.
    let other0 = pattern(SIZE, 99);
    let foreign = d("foreign.tar");
    write(
        &foreign,
        &Archive {
            image: &image1,
            stored: vec![MIB..2 * MIB, 4 * MIB..5 * MIB],
            checkpoint: "c1",
            base: Some(("c0", &other0)),
        },
    );

    Chain {
        full,
        inc1,
        inc2,
        foreign,
        image0,
        image2,
    }
}

#[test]
fn a_full_archive_and_two_incrementals_restore_the_last_image() {
    let dir = TempDir::new("restore-chain");
    let d = |name: &str| dir.path().join(name);
    let Chain {
        full,
        inc1,
        inc2,
        foreign,
        image0,
        image2,
    } = write_chain(dir.path());

    let to = d("restored.img");
    let out = quicksplit(&[&full, &inc1, &inc2, Path::new("--to"), &to]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = std::fs::read(&to).unwrap();
    assert_eq!(restored.len() as u64, SIZE);
    assert!(restored == image2, "the restored image is not the last one");
    assert!(!partial(&to).exists());
    let want = tree_root(&image2).to_string();
    assert!(
        said.contains(&format!(
            "from 3 archives to {}: {want} verified",
            to.display()
        )),
        "{said}"
    );
    assert!(
        said.contains("applied") && said.contains("incremental"),
        "{said}"
    );
    // Chunk 2, a hole of the full archive that no incremental stores, is still a hole (the
    // zeros chunk 1 became are written by the incremental: they take blocks).
    let blocks = std::fs::metadata(&to).unwrap().blocks() * 512;
    assert!(blocks <= SIZE - MIB + 64 * 1024, "{blocks} bytes allocated");

    // One archive of the chain: the full one restores its own image.
    let to0 = d("c0.img");
    let out = quicksplit(&[&full, Path::new("--to"), &to0]);
    assert!(out.status.success());
    assert!(std::fs::read(&to0).unwrap() == image0);

    let to_bad = d("bad.img");
    let dash_to = Path::new("--to");
    assert_refused(
        &[&full, &inc2, &inc1, dash_to, &to_bad],
        &to_bad,
        "missing or out of order",
    );
    assert_refused(
        &[&full, &inc2, dash_to, &to_bad],
        &to_bad,
        "missing or out of order",
    );
    assert_refused(
        &[&full, &foreign, &inc2, dash_to, &to_bad],
        &to_bad,
        "another image of that checkpoint",
    );
    assert_refused(
        &[&inc1, &inc2, dash_to, &to_bad],
        &to_bad,
        "a chain starts with the full archive",
    );
    assert_refused(
        &[&full, &full, dash_to, &to_bad],
        &to_bad,
        "only the first archive of a chain is a full one",
    );
    // An incremental alone: refused before its data is written.
    assert_refused(
        &[&inc1, dash_to, &to_bad],
        &to_bad,
        "restore the full archive first",
    );

    // An existing file replaced with --force is kept as it was when the chain is refused.
    let keep = d("keep.img");
    std::fs::write(&keep, b"keep me").unwrap();
    let out = quicksplit(&[&full, &foreign, dash_to, &keep, Path::new("--force")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&keep).unwrap(), b"keep me");
    assert!(!partial(&keep).exists());
}

#[test]
fn a_chain_restored_onto_a_block_device_zeroes_the_holes_of_the_full_archive() {
    let dir = TempDir::new("restore-chain-dev");
    let chain = write_chain(dir.path());
    // The device starts full of other bytes: the full archive's holes must become zeros.
    let backing = dir.path().join("disk.img");
    std::fs::write(&backing, pattern(SIZE, 77)).unwrap();
    let dev = match Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        other => {
            eprintln!("skipping: losetup cannot attach a loop device ({other:?})");
            return;
        }
    };
    let dev_path = PathBuf::from(&dev);
    let without_force = quicksplit(&[&chain.full, &chain.inc1, Path::new("--to"), &dev_path]);
    let out = quicksplit(&[
        &chain.full,
        &chain.inc1,
        &chain.inc2,
        Path::new("--to"),
        &dev_path,
        Path::new("--force"),
    ]);
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert_eq!(without_force.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&without_force.stderr).contains("--force"),
        "{without_force:?}"
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read(&backing).unwrap() == chain.image2,
        "the device does not hold the last image"
    );
}
