//! `quicksplit digest FILE`: a file's or block device's `sha256-tree` root, the digest a backup
//! of that image reports, hashed by several threads at once.
//!
//! Each thread takes the next few chunks (a counter shared by all), reads them with `pread` into
//! its own buffer and hashes them; the chunk digests land in their slots, and the root is taken
//! over them in order at the end.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use drivers::digest::{chunk_count, chunk_digest, root_of, ChunkDigest, TreeRoot, TREE_CHUNK_SIZE};

use super::{complain, say, EXIT_ERROR};

/// Chunks a thread reads with one `pread` (4 MiB).
const CHUNKS_PER_READ: u64 = 4;
/// Threads at most: beyond that the disk, not the hashing, is the limit.
const MAX_THREADS: usize = 16;

/// Why a file's digest cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// Opening or reading failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("{0}: neither a regular file nor a block device")]
    NotAFile(String),
    /// The file got shorter while it was read.
    #[error("{path}: ended at {at} bytes while reading, {size} bytes at the start")]
    Shrunk {
        /// The file.
        path: String,
        /// Where it ended.
        at: u64,
        /// Its size at the start.
        size: u64,
    },
}

/// `quicksplit digest FILE`.
pub fn digest(path: &Path, threads: Option<usize>) -> i32 {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
    });
    match file_root(path, threads.max(1)) {
        Ok(root) => {
            say!("{root}");
            0
        }
        Err(e) => {
            complain!("{e}");
            EXIT_ERROR
        }
    }
}

/// The tree root of the file or block device at `path`, hashed by `threads` threads.
pub fn file_root(path: &Path, threads: usize) -> Result<TreeRoot, DigestError> {
    let name = path.display().to_string();
    let io = |source| DigestError::Io {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let ft = file.metadata().map_err(io)?.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(DigestError::NotAFile(name));
    }
    // A block device's metadata says 0 bytes; its end says its size.
    let size = file.seek(SeekFrom::End(0)).map_err(io)?;
    let chunks = chunk_count(size);
    let next = AtomicU64::new(0);
    let results: Vec<Result<Vec<(u64, ChunkDigest)>, DigestError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| hash_chunks(&file, &name, size, &next)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(DigestError::Io {
                        path: name.clone(),
                        source: std::io::Error::other("a hashing thread panicked"),
                    })
                })
            })
            .collect()
    });
    let mut digests = vec![[0u8; 32]; chunks as usize];
    for r in results {
        for (i, d) in r? {
            digests[i as usize] = d;
        }
    }
    Ok(root_of(&digests))
}

/// One thread's share: batches of chunks taken from `next` until none is left.
fn hash_chunks(
    file: &File,
    name: &str,
    size: u64,
    next: &AtomicU64,
) -> Result<Vec<(u64, ChunkDigest)>, DigestError> {
    let chunks = chunk_count(size);
    let mut buf = vec![0u8; (CHUNKS_PER_READ * TREE_CHUNK_SIZE) as usize];
    let mut out = Vec::new();
    loop {
        let first = next.fetch_add(CHUNKS_PER_READ, Ordering::Relaxed);
        if first >= chunks {
            return Ok(out);
        }
        let offset = first * TREE_CHUNK_SIZE;
        let len = (size - offset).min(buf.len() as u64) as usize;
        read_full(file, &mut buf[..len], offset).map_err(|e| match e {
            ReadError::Io(source) => DigestError::Io {
                path: name.to_string(),
                source,
            },
            ReadError::Eof(at) => DigestError::Shrunk {
                path: name.to_string(),
                at,
                size,
            },
        })?;
        for (i, chunk) in buf[..len].chunks(TREE_CHUNK_SIZE as usize).enumerate() {
            out.push((first + i as u64, chunk_digest(chunk)));
        }
    }
}

enum ReadError {
    Io(std::io::Error),
    /// The file ended at this offset.
    Eof(u64),
}

/// Fills `buf` from `offset`, through short reads and interruptions.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(ReadError::Eof(offset + done as u64)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_of_a_file_is_the_tree_root_of_its_bytes() {
        let dir = std::env::temp_dir().join(format!("qs-cli-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut x = 7u32;
        for (i, len) in [0usize, 1, 4096, 1 << 20, (5 << 20) + 4097, 9 << 20]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let path = dir.join(format!("f{i}"));
            std::fs::write(&path, &data).unwrap();
            let want = drivers::digest::tree_root(&data);
            for threads in [1, 3, 8] {
                assert_eq!(file_root(&path, threads).unwrap(), want, "{len} bytes");
            }
        }
        assert!(matches!(file_root(&dir, 2), Err(DigestError::NotAFile(_))));
        assert!(matches!(
            file_root(&dir.join("missing"), 2),
            Err(DigestError::Io { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
