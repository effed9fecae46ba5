//! What the uring bdev's file stores: its holes, found with `lseek(SEEK_DATA)` and
//! `lseek(SEEK_HOLE)`, a few lookups per query.
//!
//! The file systems answer from their extent maps without I/O (ext4, XFS, btrfs, tmpfs); a
//! block device, or a file system without holes, has its whole size as data. Unwritten extents
//! (what `FALLOC_FL_ZERO_RANGE` leaves) read as zeroes and count as holes, as `lseek` reports
//! them.

use std::fs::File;

use rustix::fs::{seek, SeekFrom};
use rustix::io::Errno;

use crate::bdev::{push_extent, Allocation, Extent, MAX_QUERY_EXTENTS};

/// Appends the extents of `len` bytes at `offset` of `file` to `out`: from `offset` on, up to
/// the end of the range or until [`MAX_QUERY_EXTENTS`] lookups are done. Extents start and end
/// on multiples of `block` (a power of two dividing `offset` and `len`): a hole counts only for
/// the blocks it covers whole, the rest as data.
pub(super) fn file_extents(file: &File, offset: u64, len: u64, block: u64, out: &mut Vec<Extent>) {
    let end = offset + len;
    let mut at = offset;
    let mut lookups = 0;
    while at < end {
        if lookups >= MAX_QUERY_EXTENTS {
            return;
        }
        lookups += 2;
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data from `at` to the end of the file.
            Err(Errno::NXIO) => end,
            Err(e) => return unknown(at, end, e, out),
        };
        let hole_end = round_down(data.min(end), block).max(at);
        push_extent(out, hole_end - at, Allocation::Hole);
        at = hole_end;
        if at >= end {
            return;
        }
        // Data starts at `data` (`at` may be a little before it, inside a block the hole does
        // not cover whole): the next hole starts after it, at the end of the file at the latest.
        let hole = match seek(file, SeekFrom::Hole(data.max(at))) {
            Ok(h) => h,
            Err(e) => return unknown(at, end, e, out),
        };
        let data_end = round_up(hole, block).clamp(at + block, end);
        push_extent(out, data_end - at, Allocation::Data);
        at = data_end;
    }
}

/// The rest of the range when `lseek` failed: data, as for a driver that cannot tell.
fn unknown(at: u64, end: u64, e: Errno, out: &mut Vec<Extent>) {
    tracing::debug!(%e, "lseek for holes failed: the rest of the range counts as data");
    push_extent(out, end - at, Allocation::Data);
}

fn round_down(x: u64, block: u64) -> u64 {
    x & !(block - 1)
}

fn round_up(x: u64, block: u64) -> u64 {
    x.saturating_add(block - 1) & !(block - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::PathBuf;

    const KIB: u64 = 1024;

    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A sparse file of `size` bytes with data at `writes` (offset, length), or `None` when the
    /// file system of the temporary directory keeps no holes.
    fn sparse_file(tag: &str, size: u64, writes: &[(u64, u64)]) -> Option<(TempFile, File)> {
        let path = std::env::temp_dir().join(format!("qs-alloc-{tag}-{}", std::process::id()));
        let guard = TempFile(path.clone());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        file.set_len(size).expect("size");
        for &(off, len) in writes {
            file.write_all_at(&vec![0xa5; len as usize], off)
                .expect("write");
        }
        file.sync_all().expect("sync");
        let stored = file.metadata().expect("stat").blocks() * 512;
        if stored >= size {
            eprintln!("skipped: {} keeps no holes", std::env::temp_dir().display());
            return None;
        }
        Some((guard, file))
    }

    fn extents(file: &File, offset: u64, len: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        file_extents(file, offset, len, 4096, &mut out);
        out
    }

    fn ext(len: u64, allocation: Allocation) -> Extent {
        Extent { len, allocation }
    }

    #[test]
    fn holes_and_data_of_a_sparse_file() {
        let Some((_guard, file)) = sparse_file(
            "map",
            1024 * KIB,
            &[(64 * KIB, 4 * KIB), (512 * KIB, 128 * KIB)],
        ) else {
            return;
        };
        use Allocation::{Data, Hole};
        assert_eq!(
            extents(&file, 0, 1024 * KIB),
            vec![
                ext(64 * KIB, Hole),
                ext(4 * KIB, Data),
                ext(444 * KIB, Hole),
                ext(128 * KIB, Data),
                ext(384 * KIB, Hole),
            ]
        );
        // A range starting inside data, and one ending inside it.
        assert_eq!(
            extents(&file, 576 * KIB, 128 * KIB),
            vec![ext(64 * KIB, Data), ext(64 * KIB, Hole)]
        );
        assert_eq!(
            extents(&file, 8 * KIB, 60 * KIB),
            vec![ext(56 * KIB, Hole), ext(4 * KIB, Data)]
        );
        // With 64 KiB blocks, the 4 KiB of data make their whole block data.
        let mut out = Vec::new();
        file_extents(&file, 0, 256 * KIB, 64 * KIB, &mut out);
        assert_eq!(
            out,
            vec![
                ext(64 * KIB, Hole),
                ext(64 * KIB, Data),
                ext(128 * KIB, Hole)
            ]
        );
    }

    #[test]
    fn a_query_looks_up_a_bounded_number_of_extents_and_resumes() {
        // 200 data blocks with holes between them: 400 extents.
        let writes: Vec<(u64, u64)> = (0..200).map(|i| (i * 8 * KIB + 4 * KIB, 4 * KIB)).collect();
        let size = 200 * 8 * KIB;
        let Some((_guard, file)) = sparse_file("bounded", size, &writes) else {
            return;
        };
        let first = extents(&file, 0, size);
        assert!(first.len() <= MAX_QUERY_EXTENTS, "{} extents", first.len());
        let covered: u64 = first.iter().map(|e| e.len).sum();
        assert!(covered > 0 && covered < size, "covered {covered}");
        // Asking again from where an answer ends gives the whole map.
        let (mut at, mut all) = (0, Vec::new());
        while at < size {
            let part = extents(&file, at, size - at);
            assert!(!part.is_empty());
            at += part.iter().map(|e| e.len).sum::<u64>();
            all.extend(part);
        }
        assert_eq!(at, size);
        assert_eq!(all.len(), 400);
        for (i, e) in all.iter().enumerate() {
            let want = if i % 2 == 0 {
                Allocation::Hole
            } else {
                Allocation::Data
            };
            assert_eq!(*e, ext(4 * KIB, want), "extent {i}");
        }
    }
}
