//! The mark a file target carries once a backup completes: which image it holds (the pair, the
//! image's digest, the checkpoint the backup made), in the extended attribute
//! `user.quicksplit.image`. An incremental backup onto a file checks the mark against its base
//! (a file holding another image is refused), removes it before writing, and sets the new one
//! once complete: a file an incremental left half written carries no mark to trust.
//!
//! Marks are best effort: a file system without user extended attributes (tmpfs before Linux
//! 6.6), a block device, or a file copied by a tool that drops them has none, and an incremental
//! onto it is taken on trust.

use std::path::Path;

use rustix::io::Errno;
use serde::{Deserialize, Serialize};

/// The extended attribute's name.
pub const ATTRIBUTE: &str = "user.quicksplit.image";

/// What a file target holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMark {
    /// The pair the image is of.
    pub pair: String,
    /// The image's digest (`sha256-tree:<hex>`).
    pub digest: String,
    /// The checkpoint the backup made, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// True for the errors that mean "no mark here, and none can be kept".
fn unsupported(e: Errno) -> bool {
    e == Errno::NODATA || e == Errno::NOTSUP || e == Errno::PERM || e == Errno::OPNOTSUPP
}

/// The mark `path` carries, if any (a mark that does not parse is reported as an error).
pub fn read(path: &Path) -> Result<Option<ImageMark>, String> {
    let mut buf = vec![0u8; 4096];
    match rustix::fs::getxattr(path, ATTRIBUTE, &mut buf[..]) {
        Ok(n) => serde_json::from_slice(&buf[..n])
            .map(Some)
            .map_err(|e| format!("{}: its {ATTRIBUTE} is not a mark: {e}", path.display())),
        Err(e) if unsupported(e) => Ok(None),
        Err(e) => Err(format!("{}: reading {ATTRIBUTE}: {e}", path.display())),
    }
}

/// Marks `path` as holding `mark`'s image (nothing where marks cannot be kept).
pub fn set(path: &Path, mark: &ImageMark) -> Result<(), String> {
    let value = serde_json::to_vec(mark).map_err(|e| e.to_string())?;
    match rustix::fs::setxattr(path, ATTRIBUTE, &value, rustix::fs::XattrFlags::empty()) {
        Ok(()) => Ok(()),
        Err(e) if unsupported(e) => Ok(()),
        Err(e) => Err(format!("{}: setting {ATTRIBUTE}: {e}", path.display())),
    }
}

/// Removes `path`'s mark, if any.
pub fn clear(path: &Path) -> Result<(), String> {
    match rustix::fs::removexattr(path, ATTRIBUTE) {
        Ok(()) => Ok(()),
        Err(e) if unsupported(e) => Ok(()),
        Err(e) => Err(format!("{}: removing {ATTRIBUTE}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reads_back_and_goes() {
        let path = std::env::temp_dir().join(format!("mark-test-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let mark = ImageMark {
            pair: "p".into(),
            digest: "sha256-tree:00".into(),
            checkpoint: Some("c".into()),
        };
        set(&path, &mark).unwrap();
        // Where the file system keeps no user attributes, there is nothing to read back.
        if let Some(got) = read(&path).unwrap() {
            assert_eq!(got, mark);
            clear(&path).unwrap();
            assert_eq!(read(&path).unwrap(), None);
        }
        std::fs::remove_file(&path).unwrap();
    }
}
