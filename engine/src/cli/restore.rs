//! `quicksplit restore`: an archive back into an image file or device.
//!
//! A regular file is restored as `PATH.partial` and renamed to `PATH` only once the archive
//! verified, so `PATH` is either what it was before or the whole verified image; the partial is
//! removed on any failure (Ctrl-C included). An existing file is replaced only with `--force`,
//! and never while another process holds its lock (a quicksplit serving it, qemu). A block
//! device is written in place, only with `--force`: it cannot be renamed, so a failed restore
//! leaves it partly written.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drivers::file_lock::{self, Access};
use drivers::sink::partial::partial_path;

use super::progress::{Interrupt, Progress, EXIT_INTERRUPTED};
use super::{complain, say, EXIT_ERROR};

/// Where the image goes.
enum Destination {
    /// A regular file, new or replaced: written under its partial name, then renamed.
    File {
        /// The final name.
        path: PathBuf,
        /// `path.partial`, locked and empty.
        partial: PathBuf,
        /// The file being replaced, locked until the rename.
        _existing: Option<File>,
    },
    /// A block device, written in place.
    Device,
}

/// `quicksplit restore ARCHIVE --to PATH [--force]`: restores and verifies the digest (the
/// flat SHA-256 of an archive that has one) and every CRC.
pub fn restore(archive: &Path, to: &Path, record_size: usize, force: bool) -> i32 {
    let input = match File::open(archive) {
        Ok(f) => f,
        Err(e) => {
            complain!("{}: {e}", archive.display());
            return EXIT_ERROR;
        }
    };
    let (dest, output) = match prepare(to, force) {
        Ok(d) => d,
        Err(e) => {
            complain!("{e}");
            return EXIT_ERROR;
        }
    };
    // A tape device or a pipe has no length: the progress then shows bytes and rate only.
    let archive_len = input
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map_or(0, |m| m.len());
    let mut reader = ProgressReader {
        inner: input,
        read: 0,
        total: archive_len,
        progress: Progress::new(format!("restore of {}", archive.display())),
        shown: Instant::now(),
    };
    let interrupt = Interrupt::catch();
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        Interruptible {
            file: output,
            interrupt: &interrupt,
            sparse: matches!(dest, Destination::File { .. }),
            pos: 0,
        },
    );
    let restored = drivers::tape::restore(
        std::io::BufReader::with_capacity(1 << 20, &mut reader),
        &mut out,
        record_size,
    );
    let report = match restored {
        Ok(r) => r,
        Err(e) => {
            reader.progress.break_line();
            discard(&dest);
            if interrupt.pressed() {
                complain!("restore of {} interrupted", archive.display());
                return EXIT_INTERRUPTED;
            }
            complain!("restore of {} FAILED: {e}", archive.display());
            return EXIT_ERROR;
        }
    };
    let finished = out
        .flush()
        .and_then(|()| out.get_mut().finish())
        .and_then(|()| match &dest {
            Destination::File { path, partial, .. } => rename_durably(partial, path),
            Destination::Device => Ok(()),
        });
    reader.progress.finish(reader.read, reader.total);
    if let Err(e) = finished {
        discard(&dest);
        complain!("{}: {e}", to.display());
        return EXIT_ERROR;
    }
    let checked: Vec<String> = [
        report.digest.clone(),
        report.sha256.as_ref().map(|s| format!("sha256 {s}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    say!(
        "restored {} bytes of pair {} (split at {} ns, mode {}) to {}: {} verified",
        report.bytes,
        report.manifest.pair,
        report.manifest.split_at_ns,
        report.manifest.mode,
        to.display(),
        checked.join(" and ")
    );
    0
}

/// Checks `to` and opens what the image is written to: `to.partial` for a regular file (or a
/// file yet to be made), `to` itself for a block device.
fn prepare(to: &Path, force: bool) -> Result<(Destination, File), String> {
    let name = to.display();
    let meta = match std::fs::metadata(to) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{name}: {e}")),
    };
    let existing = match meta.map(|m| m.file_type()) {
        None => None,
        Some(ft) if ft.is_block_device() => {
            if !force {
                return Err(format!(
                    "{name} is a block device: it is written in place (no partial file is \
                     possible there); add --force to overwrite it"
                ));
            }
            let dev = OpenOptions::new()
                .write(true)
                .open(to)
                .map_err(|e| format!("{name}: {e}"))?;
            file_lock::lock(&dev, to, Access::Write).map_err(|e| e.to_string())?;
            return Ok((Destination::Device, dev));
        }
        Some(ft) if ft.is_file() => {
            let file = File::open(to).map_err(|e| format!("{name}: {e}"))?;
            // In use is refused even with --force: someone is serving or writing it.
            file_lock::lock(&file, to, Access::Read).map_err(|e| e.to_string())?;
            if !force {
                return Err(format!(
                    "{name} exists: restore does not overwrite a file without --force"
                ));
            }
            Some(file)
        }
        Some(ft) if ft.is_dir() => return Err(format!("{name} is a directory")),
        Some(_) => {
            return Err(format!(
                "{name} is neither a regular file nor a block device"
            ))
        }
    };
    // The rename replaces the file a symbolic link points to, not the link.
    let path = match existing {
        Some(_) => std::fs::canonicalize(to).map_err(|e| format!("{name}: {e}"))?,
        None => to.to_path_buf(),
    };
    let partial = partial_path(&path);
    // A partial file left by an interrupted restore is replaced, unless a restore still runs.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    file_lock::lock(&file, &partial, Access::Write).map_err(|e| e.to_string())?;
    file.set_len(0)
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    Ok((
        Destination::File {
            path,
            partial,
            _existing: existing,
        },
        file,
    ))
}

/// Removes the partial file of a restore that did not complete.
fn discard(dest: &Destination) {
    if let Destination::File { partial, .. } = dest {
        let _ = std::fs::remove_file(partial);
    }
}

/// Renames `from` to `to` and syncs the directory, so the rename survives a power cut.
fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let dir = to
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// The output file, failing its next write once Ctrl-C was pressed, so the restore stops and
/// cleans up instead of being killed half-way.
struct Interruptible<'a> {
    file: File,
    interrupt: &'a Interrupt,
    /// The file is new: whole blocks of zeroes are not written but left as holes (they read
    /// as zeroes), so a restored image keeps the holes its volume had.
    sparse: bool,
    /// Bytes of the image taken so far (where the next write goes).
    pos: u64,
}

/// The granularity of the holes a restore leaves.
const HOLE_BLOCK: u64 = 4096;

impl Interruptible<'_> {
    /// Writes `buf` at `self.pos`, skipping whole aligned blocks of zeroes; each run of data
    /// goes in one positional write.
    fn write_sparse(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (mut at, mut run) = (0usize, None::<usize>);
        while at < buf.len() {
            let pos = self.pos + at as u64;
            let piece = ((HOLE_BLOCK - pos % HOLE_BLOCK) as usize).min(buf.len() - at);
            let block = &buf[at..at + piece];
            let hole = piece as u64 == HOLE_BLOCK && block.iter().all(|&b| b == 0);
            match (hole, run) {
                (true, Some(start)) => {
                    self.file
                        .write_all_at(&buf[start..at], self.pos + start as u64)?;
                    run = None;
                }
                (false, None) => run = Some(at),
                _ => {}
            }
            at += piece;
        }
        if let Some(start) = run {
            self.file
                .write_all_at(&buf[start..], self.pos + start as u64)?;
        }
        Ok(())
    }

    /// The image is all written: a file ending in holes gets its full length.
    fn finish(&mut self) -> std::io::Result<()> {
        if self.sparse {
            self.file.set_len(self.pos)?;
        }
        self.file.sync_all()
    }
}

impl Write for Interruptible<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.interrupt.pressed() {
            return Err(std::io::Error::other("interrupted"));
        }
        if self.sparse {
            self.write_sparse(buf)?;
            self.pos += buf.len() as u64;
            return Ok(buf.len());
        }
        let n = self.file.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// How often the progress line is redrawn while the archive is read.
const SHOW_EVERY: Duration = Duration::from_millis(200);

/// The archive, counting what has been read of it for the progress line.
struct ProgressReader {
    inner: File,
    read: u64,
    /// The archive's length; 0 when it has none (a tape device, a pipe).
    total: u64,
    progress: Progress,
    shown: Instant,
}

impl Read for ProgressReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.shown.elapsed() >= SHOW_EVERY {
            self.progress.update(self.read, self.total);
            self.shown = Instant::now();
        }
        Ok(n)
    }
}
