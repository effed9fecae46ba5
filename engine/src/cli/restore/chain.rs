//! The check of a chain of archives (a full one, then its incrementals in order) that
//! `quicksplit restore` makes from the archives' manifests before it writes anything.

use std::fs::File;
use std::path::{Path, PathBuf};

use drivers::tape::{read_manifests, ArchiveKind, Manifest};

/// One archive of a checked chain.
pub(super) struct Link {
    /// The archive's path.
    pub path: PathBuf,
    /// Its final manifest.
    pub manifest: Manifest,
}

/// Reads the final manifest of each archive (regular files only: the manifest follows the image
/// and is reached by seeking past it) and checks that they make a chain: the first is a full
/// archive; each next one an incremental of the same pair and size whose base is the archive
/// before it (its checkpoint and its digest).
pub(super) fn check_chain(archives: &[PathBuf]) -> Result<Vec<Link>, String> {
    let mut links: Vec<Link> = Vec::with_capacity(archives.len());
    for path in archives {
        let manifest = final_manifest(path)?;
        match links.last() {
            None => check_first(path, &manifest)?,
            Some(prev) => check_next(prev, path, &manifest)?,
        }
        links.push(Link {
            path: path.clone(),
            manifest,
        });
    }
    Ok(links)
}

/// The final manifest of the archive in the regular file `path`.
fn final_manifest(path: &Path) -> Result<Manifest, String> {
    let name = path.display();
    // Not opened before it is known to be a file: opening a pipe waits for its writer.
    let meta = std::fs::metadata(path).map_err(|e| format!("{name}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{name} is not a regular file: a chain of archives is checked from their final \
             manifests before anything is written, and those follow the images (copy the \
             archive from the tape into a file first)"
        ));
    }
    let file = File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let read = read_manifests(std::io::BufReader::new(file)).map_err(|e| format!("{name}: {e}"))?;
    Ok(read.manifest)
}

/// What an archive is, for messages.
fn describe(m: &Manifest) -> String {
    let kind = match m.kind {
        ArchiveKind::Full => "a full archive",
        ArchiveKind::Incremental => "an incremental archive",
    };
    match &m.checkpoint {
        Some(c) => format!("{kind} of pair {} (checkpoint {c:?})", m.pair),
        None => format!("{kind} of pair {} (no checkpoint)", m.pair),
    }
}

fn check_first(path: &Path, m: &Manifest) -> Result<(), String> {
    if m.kind != ArchiveKind::Full {
        return Err(format!(
            "{} is {}, the changes since checkpoint {:?}: a chain starts with the full archive \
             that incremental applies onto",
            path.display(),
            describe(m),
            m.base_checkpoint.as_deref().unwrap_or_default()
        ));
    }
    Ok(())
}

fn check_next(prev: &Link, path: &Path, m: &Manifest) -> Result<(), String> {
    let (name, prev_name) = (path.display(), prev.path.display());
    let p = &prev.manifest;
    if m.kind != ArchiveKind::Incremental {
        return Err(format!(
            "{name} is {}: only the first archive of a chain is a full one",
            describe(m)
        ));
    }
    if m.pair != p.pair || m.volume_size != p.volume_size {
        return Err(format!(
            "{name} is of pair {} ({} bytes), but {prev_name} is of pair {} ({} bytes): they \
             are not one chain",
            m.pair, m.volume_size, p.pair, p.volume_size
        ));
    }
    if m.base_checkpoint.is_none() || m.base_checkpoint != p.checkpoint {
        return Err(format!(
            "{name} applies onto checkpoint {:?}, but the archive before it, {prev_name}, is {}: \
             an archive of the chain is missing or out of order",
            m.base_checkpoint.as_deref().unwrap_or_default(),
            describe(p)
        ));
    }
    if m.base_digest.is_none() || m.base_digest != p.digest {
        return Err(format!(
            "{name} applies onto an image of digest {}, but {prev_name} (checkpoint {:?}) holds \
             {}: it is another image of that checkpoint",
            m.base_digest.as_deref().unwrap_or("(none)"),
            p.checkpoint.as_deref().unwrap_or_default(),
            p.digest.as_deref().unwrap_or("(none)")
        ));
    }
    Ok(())
}
