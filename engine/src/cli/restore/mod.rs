//! `quicksplit restore`: an archive, or a chain of them (a full archive and then its
//! incrementals, in order), back into an image file or device.
//!
//! A regular file is restored as `PATH.partial` and renamed to `PATH` only once every archive
//! verified, so `PATH` is either what it was before or the whole verified image; the partial is
//! removed on any failure (Ctrl-C included). An existing file is replaced only with `--force`,
//! and never while another process holds its lock (a quicksplit serving it, qemu). A block
//! device is written in place, only with `--force`: it cannot be renamed, so a failed restore
//! leaves it partly written.
//!
//! A chain is checked from the archives' final manifests before anything is written ([`chain`]):
//! a missing, reordered or foreign archive is refused with nothing written. Each archive is then
//! applied and verified in turn: a full one fills the image (holes stay holes in a file, are
//! zeroed on a device), an incremental writes the chunks it stores, and the image's digest after
//! each must be the archive's.

mod chain;
mod target;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drivers::tape::{ArchiveKind, ImageChain, Manifest, RestoreReport};

use self::chain::check_chain;
use self::target::{prepare, Output};
use super::progress::{human_bytes, Interrupt, Progress, EXIT_INTERRUPTED};
use super::{complain, say, EXIT_ERROR};

/// `quicksplit restore ARCHIVE [ARCHIVE...] --to PATH [--force]`: restores the archives in
/// order and verifies each one's digest (the flat SHA-256 of a full archive that has one) and
/// every CRC. One archive may be a tape device or a pipe; a chain's archives are files.
pub fn restore(archives: &[PathBuf], to: &Path, record_size: usize, force: bool) -> i32 {
    // A chain is checked before anything is written; a single archive streams as it comes.
    let checked: Vec<Option<Manifest>> = if archives.len() > 1 {
        match check_chain(archives) {
            Ok(links) => links.into_iter().map(|l| Some(l.manifest)).collect(),
            Err(e) => {
                complain!("{e}");
                return EXIT_ERROR;
            }
        }
    } else {
        vec![None; archives.len()]
    };
    let mut inputs = Vec::with_capacity(archives.len());
    for archive in archives {
        match File::open(archive) {
            Ok(f) => inputs.push(f),
            Err(e) => {
                complain!("{}: {e}", archive.display());
                return EXIT_ERROR;
            }
        }
    }
    let (dest, output) = match prepare(to, force) {
        Ok(d) => d,
        Err(e) => {
            complain!("{e}");
            return EXIT_ERROR;
        }
    };
    let interrupt = Interrupt::catch();
    let mut out = Output::new(output, &dest, &interrupt);
    let mut chain = ImageChain::new();
    let mut reports = Vec::with_capacity(archives.len());
    for ((archive, input), expected) in archives.iter().zip(inputs).zip(&checked) {
        let applied = apply(archive, input, &mut out, &mut chain, record_size);
        let outcome = applied.and_then(|report| match expected {
            Some(m) if *m != report.manifest => Err(format!(
                "{}: the archive changed since its manifest was checked",
                archive.display()
            )),
            _ => Ok(report),
        });
        match outcome {
            Ok(report) => reports.push((archive, report)),
            Err(e) => {
                dest.discard();
                if interrupt.pressed() {
                    complain!("restore of {} interrupted", archive.display());
                    return EXIT_INTERRUPTED;
                }
                complain!("{e}");
                return EXIT_ERROR;
            }
        }
    }
    if let Err(e) = dest.commit() {
        dest.discard();
        complain!("{}: {e}", to.display());
        return EXIT_ERROR;
    }
    summarize(&reports, to);
    0
}

/// Restores one archive onto `out` and makes it durable; an error is the message to print.
fn apply(
    archive: &Path,
    input: File,
    out: &mut Output<'_>,
    chain: &mut ImageChain,
    record_size: usize,
) -> Result<RestoreReport, String> {
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
    let restored = drivers::tape::restore_into(
        std::io::BufReader::with_capacity(1 << 20, &mut reader),
        out,
        record_size,
        chain,
    );
    let report = match restored {
        Ok(r) => r,
        Err(e) => {
            reader.progress.break_line();
            return Err(format!("restore of {} FAILED: {e}", archive.display()));
        }
    };
    let finished = out.finish_archive(report.bytes);
    reader.progress.finish(reader.read, reader.total);
    finished.map_err(|e| format!("writing the restored image: {e}"))?;
    Ok(report)
}

/// What was verified of `report`.
fn verified(report: &RestoreReport) -> String {
    let checked: Vec<String> = [
        report.digest.clone(),
        report.sha256.as_ref().map(|s| format!("sha256 {s}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    checked.join(" and ")
}

/// Says what each archive of a chain brought, then what the image is.
fn summarize(reports: &[(&PathBuf, RestoreReport)], to: &Path) {
    let Some((_, last)) = reports.last() else {
        return;
    };
    if reports.len() > 1 {
        for (archive, r) in reports {
            let kind = match r.manifest.kind {
                ArchiveKind::Full => "full",
                ArchiveKind::Incremental => "incremental",
            };
            say!(
                "applied {} ({kind}, checkpoint {}): {} of {} stored, {} verified",
                archive.display(),
                r.manifest.checkpoint.as_deref().unwrap_or("none"),
                human_bytes(r.stored),
                human_bytes(r.bytes),
                verified(r)
            );
        }
    }
    let m = &last.manifest;
    let from = match reports.len() {
        1 => String::new(),
        n => format!(" from {n} archives"),
    };
    say!(
        "restored {} bytes of pair {} (split at {} ns, mode {}){from} to {}: {} verified",
        last.bytes,
        m.pair,
        m.split_at_ns,
        m.mode,
        to.display(),
        verified(last)
    );
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
