//! The keyring: secrets kept in files, registered by name (SPDK's `keyring_file`).
//!
//! Everything else names a key and never holds its secret: exports' hosts, initiators, the
//! configuration. A key is a name and the absolute path of a regular file owned by the engine's
//! user with no access for group or other (0600 or stricter). The secret is not kept in memory:
//! it is read from the file each time it is needed ([`Keyring::secret`], the file checked again
//! then, so a key rotated in place is picked up), into a buffer zeroed when dropped. No secret
//! appears in a log line, an error message or an RPC result: errors name the key and its path.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use zeroize::Zeroizing;

/// Longest secret file read (DH-HMAC-CHAP keys and PSK files are far smaller).
pub const MAX_SECRET: u64 = 64 << 10;

/// Errors of the keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The name is empty or unusable.
    #[error(
        "key name '{0}': must be non-empty, at most 255 bytes, without '/' or control characters"
    )]
    BadName(String),
    /// The name is taken.
    #[error("a key named '{0}' already exists")]
    Exists(String),
    /// No such key.
    #[error("no key named '{0}' in the keyring")]
    NotFound(String),
    /// The key is named by something.
    #[error("key '{name}' is in use by {user}")]
    InUse {
        /// The key.
        name: String,
        /// What names it.
        user: String,
    },
    /// The key's secret is not what the parameter naming it needs.
    #[error("parameter '{param}': key '{name}' is unusable: {why}")]
    Unusable {
        /// The parameter.
        param: &'static str,
        /// The key.
        name: String,
        /// Why (never the secret).
        why: String,
    },
    /// The file cannot hold a secret.
    #[error("key '{name}': {path}: {why}")]
    BadFile {
        /// The key.
        name: String,
        /// Its file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// One key as `keyring_get_keys` reports it: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Name.
    pub name: String,
    /// The file holding the secret.
    pub path: PathBuf,
}

/// A secret read from its file, zeroed when dropped; not `Debug` nor `Display`, so it cannot
/// end up in a log line by accident.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// The secret's bytes, as the file holds them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// The keys, by name.
#[derive(Default)]
pub struct Keyring {
    keys: Mutex<BTreeMap<String, PathBuf>>,
}

fn check_name(name: &str) -> Result<(), KeyringError> {
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name.chars().any(char::is_control)
    {
        return Err(KeyringError::BadName(name.escape_debug().to_string()));
    }
    Ok(())
}

/// Checks the key file and reads it (at most [`MAX_SECRET`] bytes).
pub(crate) fn read_key_file(name: &str, path: &Path) -> Result<Secret, KeyringError> {
    let bad = |why: String| KeyringError::BadFile {
        name: name.to_string(),
        path: path.to_path_buf(),
        why,
    };
    if !path.is_absolute() {
        return Err(bad("the path must be absolute".into()));
    }
    // Opened first and checked through the descriptor: the file checked is the file read.
    // Non-blocking, so a FIFO named by mistake is refused as not a regular file instead of
    // holding the caller until something writes to it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(bad(format!(
            "owned by uid {}, not by the engine's user (uid {euid})",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "mode {mode:04o} gives group or other access: it must be 0600 or stricter"
        )));
    }
    if meta.len() > MAX_SECRET {
        return Err(bad(format!(
            "{} bytes: a key file holds at most {MAX_SECRET}",
            meta.len()
        )));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    use std::io::Read;
    file.take(MAX_SECRET)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    Ok(Secret(bytes))
}

impl Keyring {
    fn keys(&self) -> MutexGuard<'_, BTreeMap<String, PathBuf>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `keyring_file_add_key`: registers `path` under `name`, once the file is checked and
    /// read (the secret read is dropped at once).
    pub fn add(&self, name: &str, path: &Path) -> Result<(), KeyringError> {
        check_name(name)?;
        if self.keys().contains_key(name) {
            return Err(KeyringError::Exists(name.to_string()));
        }
        // Read without the lock held; the name is checked again before it is taken.
        drop(read_key_file(name, path)?);
        let mut keys = self.keys();
        if keys.contains_key(name) {
            return Err(KeyringError::Exists(name.to_string()));
        }
        keys.insert(name.to_string(), path.to_path_buf());
        tracing::info!(key = name, path = %path.display(), "key added to the keyring");
        Ok(())
    }

    /// `keyring_file_remove_key`: refused while `user_of` names something using the key.
    pub fn remove(
        &self,
        name: &str,
        user_of: impl FnOnce(&str) -> Option<String>,
    ) -> Result<(), KeyringError> {
        let mut keys = self.keys();
        if !keys.contains_key(name) {
            return Err(KeyringError::NotFound(name.to_string()));
        }
        if let Some(user) = user_of(name) {
            return Err(KeyringError::InUse {
                name: name.to_string(),
                user,
            });
        }
        keys.remove(name);
        tracing::info!(key = name, "key removed from the keyring");
        Ok(())
    }

    /// Fails unless a key `name` is registered.
    pub fn check(&self, name: &str) -> Result<(), KeyringError> {
        match self.keys().contains_key(name) {
            true => Ok(()),
            false => Err(KeyringError::NotFound(name.to_string())),
        }
    }

    /// The secret of key `name`, read from its file now (checked again first).
    pub fn secret(&self, name: &str) -> Result<Secret, KeyringError> {
        let path = self
            .keys()
            .get(name)
            .cloned()
            .ok_or_else(|| KeyringError::NotFound(name.to_string()))?;
        read_key_file(name, &path)
    }

    /// `keyring_get_keys`: names and paths, by name.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys()
            .iter()
            .map(|(name, path)| KeyInfo {
                name: name.clone(),
                path: path.clone(),
            })
            .collect()
    }

    /// The calls that register every key again (for `save_config`): names and paths only.
    /// The call that registers key `name` again, if it is registered.
    pub fn config_of(&self, name: &str) -> Option<serde_json::Value> {
        let path = self.keys().get(name).cloned()?;
        Some(serde_json::json!({
            "method": "keyring_file_add_key",
            "params": {"name": name, "path": path},
        }))
    }

    pub fn config(&self) -> Vec<serde_json::Value> {
        self.list()
            .into_iter()
            .map(|k| {
                serde_json::json!({
                    "method": "keyring_file_add_key",
                    "params": {"name": k.name, "path": k.path},
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, name: &str, mode: u32, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qs-keyring-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keys_are_checked_read_when_needed_and_removed_only_when_unused() {
        let dir = temp_dir("unit");
        let ring = Keyring::default();
        let good = key_file(&dir, "k", 0o600, "DHHC-1:00:secret-bytes:");
        ring.add("k", &good).unwrap();
        assert!(matches!(ring.add("k", &good), Err(KeyringError::Exists(_))));
        let open = key_file(&dir, "open", 0o640, "x");
        let e = ring.add("open", &open).unwrap_err().to_string();
        assert!(e.contains("mode 0640"), "{e}");
        let e = ring.add("rel", Path::new("k")).unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = ring.add("dir", &dir).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = ring.add("fifo", &fifo).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        assert!(matches!(
            ring.add("a/b", &good),
            Err(KeyringError::BadName(_))
        ));
        assert_eq!(
            ring.secret("k").unwrap().expose(),
            b"DHHC-1:00:secret-bytes:"
        );
        // Rotated in place: the next use reads the new secret.
        std::fs::write(&good, "new").unwrap();
        assert_eq!(ring.secret("k").unwrap().expose(), b"new");
        // A file opened up after it was added is refused when used.
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(ring.secret("k").is_err());
        let e = ring
            .remove("k", |_| Some("NVMe/TCP export 'nqn.x' host 'nqn.h'".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use by NVMe/TCP export 'nqn.x'"), "{e}");
        ring.remove("k", |_| None).unwrap();
        assert!(matches!(ring.check("k"), Err(KeyringError::NotFound(_))));
        assert!(ring.list().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
