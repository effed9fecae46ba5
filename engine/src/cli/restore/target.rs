//! Where `quicksplit restore` writes: a regular file under its partial name, renamed once every
//! archive verified, or a block device written in place.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use drivers::file_lock::{self, Access};
use drivers::sink::partial::{partial_path, rename_durably};
use drivers::tape::ImageTarget;
use rustix::fs::FallocateFlags;

use super::super::progress::Interrupt;

/// Where the image goes.
pub(super) enum Destination {
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

/// Checks `to` and opens what the image is written to: `to.partial` for a regular file (or a
/// file yet to be made), `to` itself for a block device.
pub(super) fn prepare(to: &Path, force: bool) -> Result<(Destination, File), String> {
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
            // Read access too: the lock takes read locks (as QEMU does), which need it.
            let dev = OpenOptions::new()
                .read(true)
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

impl Destination {
    /// Removes the partial file of a restore that did not complete.
    pub(super) fn discard(&self) {
        if let Destination::File { partial, .. } = self {
            let _ = std::fs::remove_file(partial);
        }
    }

    /// Puts the verified image under its final name (a file), durably.
    pub(super) fn commit(&self) -> std::io::Result<()> {
        match self {
            Destination::File { path, partial, .. } => rename_durably(partial, path),
            Destination::Device => Ok(()),
        }
    }
}

/// The output file or device, written at image offsets. Its next write fails once Ctrl-C was
/// pressed, so the restore stops and cleans up instead of being killed half-way.
pub(super) struct Output<'a> {
    file: File,
    interrupt: &'a Interrupt,
    /// A regular file (new and empty before the full archive), not a device.
    regular: bool,
    /// The full archive is being applied to a new file: whole blocks of zeroes are not written
    /// but left as holes (they read as zeroes), so a restored image keeps the holes its volume
    /// had. Incrementals write every byte they store (zeroes included: the base may differ).
    fresh: bool,
}

/// The granularity of the holes a restore leaves.
const HOLE_BLOCK: u64 = 4096;

/// Zeros written where a device cannot zero a range itself.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

impl<'a> Output<'a> {
    pub(super) fn new(file: File, dest: &Destination, interrupt: &'a Interrupt) -> Self {
        let regular = matches!(dest, Destination::File { .. });
        Self {
            file,
            interrupt,
            regular,
            fresh: regular,
        }
    }

    /// Writes `buf` at `pos`, skipping whole aligned blocks of zeroes; each run of data goes in
    /// one positional write.
    fn write_sparse(&mut self, pos: u64, buf: &[u8]) -> std::io::Result<()> {
        let (mut at, mut run) = (0usize, None::<usize>);
        while at < buf.len() {
            let offset = pos + at as u64;
            let piece = ((HOLE_BLOCK - offset % HOLE_BLOCK) as usize).min(buf.len() - at);
            let block = &buf[at..at + piece];
            let hole = piece as u64 == HOLE_BLOCK && block.iter().all(|&b| b == 0);
            match (hole, run) {
                (true, Some(start)) => {
                    self.file
                        .write_all_at(&buf[start..at], pos + start as u64)?;
                    run = None;
                }
                (false, None) => run = Some(at),
                _ => {}
            }
            at += piece;
        }
        if let Some(start) = run {
            self.file.write_all_at(&buf[start..], pos + start as u64)?;
        }
        Ok(())
    }

    /// An archive of an image of `size` bytes is applied: a new file gets the image's full
    /// length (it may end in a hole) and everything is made durable; later archives are
    /// incrementals onto it.
    pub(super) fn finish_archive(&mut self, size: u64) -> std::io::Result<()> {
        if self.regular && self.fresh {
            self.file.set_len(size)?;
        }
        self.fresh = false;
        self.file.sync_all()
    }

    fn check_interrupt(&self) -> std::io::Result<()> {
        if self.interrupt.pressed() {
            return Err(std::io::Error::other("interrupted"));
        }
        Ok(())
    }
}

impl ImageTarget for Output<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check_interrupt()?;
        if self.fresh {
            return self.write_sparse(offset, data);
        }
        self.file.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check_interrupt()?;
        if self.fresh {
            // A new file reads zeros where nothing was written; its length is set at the end.
            return Ok(());
        }
        // A device (or a file written before): zero the range in place, or write zeros.
        let flags = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(&self.file, flags, offset, len).is_ok() {
            return Ok(());
        }
        let mut done = 0;
        while done < len {
            self.check_interrupt()?;
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}
