//! `quicksplit restore`: an archive back into an image file or device.

use super::EXIT_ERROR;

/// `quicksplit restore ARCHIVE --to PATH`: restores and verifies every CRC and the SHA-256.
pub fn restore(archive: &std::path::Path, to: &std::path::Path, record_size: usize) -> i32 {
    let input = match std::fs::File::open(archive) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("quicksplit: {}: {e}", archive.display());
            return EXIT_ERROR;
        }
    };
    let output = match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("quicksplit: {}: {e}", to.display());
            return EXIT_ERROR;
        }
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, output);
    match drivers::tape::restore(
        std::io::BufReader::with_capacity(1 << 20, input),
        &mut out,
        record_size,
    ) {
        Ok(report) => {
            use std::io::Write;
            // A regular file ends where the image ends (an older, longer file is cut).
            let finished = out.flush().and_then(|()| {
                let f = out.get_ref();
                if f.metadata()?.file_type().is_file() {
                    f.set_len(report.bytes)?;
                }
                f.sync_all()
            });
            if let Err(e) = finished {
                eprintln!("quicksplit: {}: {e}", to.display());
                return EXIT_ERROR;
            }
            println!(
                "restored {} bytes of pair {} (split at {} ns, mode {}) to {}: sha256 {} verified",
                report.bytes,
                report.manifest.pair,
                report.manifest.split_at_ns,
                report.manifest.mode,
                to.display(),
                report.sha256
            );
            0
        }
        Err(e) => {
            eprintln!("quicksplit: restore of {} FAILED: {e}", archive.display());
            EXIT_ERROR
        }
    }
}
