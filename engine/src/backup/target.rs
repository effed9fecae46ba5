//! Backup targets: where a backup goes, and what must be made ready before its job starts on a
//! reactor. An NBD or NVMe/TCP target is connected on the control thread (the handshake,
//! Connect and Identify block) and checked against the image with [`connect`]; the sink over
//! it, or over a file or a tape, is opened by the job on its reactor with [`open_sink`].

use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use drivers::sink::nbd::{NbdConnection, NbdSink};
use drivers::sink::nvmf::{NvmfConnection, NvmfSink};
use drivers::sink::{file::FileSink, tape::TapeSink, tape_device, Sink};
use drivers::tape::Manifest;
use drivers::ChannelContext;
use serde::{Deserialize, Serialize};

use crate::keyring::Keyring;
use crate::pair::Pair;
use drivers::nbd::tls::{ClientTls, PskFile};

fn default_record_size() -> usize {
    drivers::tape::DEFAULT_RECORD_SIZE
}

/// Where a backup goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// A raw image file (or block device).
    File {
        /// Path.
        path: PathBuf,
    },
    /// A pax archive in fixed records on a file standing for a tape.
    Tape {
        /// Path.
        path: PathBuf,
        /// Record size in bytes (a multiple of 512).
        #[serde(default = "default_record_size")]
        record_size: usize,
    },
    /// An NBD server's export.
    Nbd {
        /// `nbd://host[:port]/export`, `nbds://host[:port]/export` (TLS) or
        /// `nbd+unix:///export?socket=PATH`.
        uri: String,
        /// TLS settings of an `nbds://` URI (x509 with the system's CAs when none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<NbdTls>,
    },
    /// An NVMe/TCP namespace.
    Nvmf {
        /// Target address.
        traddr: String,
        /// Target port, a number or a string.
        #[serde(default, deserialize_with = "drivers::nvmf::port::deserialize")]
        trsvcid: Option<u16>,
        /// Subsystem NQN.
        subnqn: String,
        /// Namespace id.
        #[serde(default)]
        nsid: Option<u32>,
        /// Host NQN.
        #[serde(default)]
        hostnqn: Option<String>,
        /// The keyring key the host authenticates with (DH-HMAC-CHAP).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dhchap_key: Option<String>,
        /// The keyring key the controller authenticates with (bidirectional).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dhchap_ctrlr_key: Option<String>,
        /// The secrets of those keys, read from the keyring when the backup was asked for.
        #[serde(skip)]
        dhchap: Option<std::sync::Arc<drivers::nvmf::auth::HostKeys>>,
    },
}

/// `tls` of an NBD target: `{ca_file?, cert_file?, key_file?}` (x509) or `{psk_key,
/// username?}` (a keyring key holding `username:hexkey` lines; the username is the file's
/// first when not given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTls {
    /// The CA the server's certificate must be signed by (the system's CAs when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The client's certificate (PEM), with `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The client's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The keyring key holding the PSKs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_key: Option<String>,
    /// The PSK username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

impl NbdTls {
    /// Checks the combination of settings.
    fn check(&self) -> Result<(), String> {
        let x509 = self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some();
        match (&self.psk_key, x509) {
            (Some(_), true) => Err(
                "parameter 'tls': give either x509 files (ca_file, cert_file, key_file) or \
                 psk_key, not both"
                    .into(),
            ),
            (None, _) if self.username.is_some() => {
                Err("parameter 'tls': username goes with psk_key".into())
            }
            (None, _) if self.cert_file.is_some() != self.key_file.is_some() => {
                Err("parameter 'tls': give both cert_file and key_file, or neither".into())
            }
            _ => Ok(()),
        }
    }
}

impl Target {
    /// Where the bytes land, for telling two targets that are the same place: a file by its
    /// directory's real path and its name, an NBD server by its URI, an NVMe/TCP namespace by
    /// address, port, subsystem and namespace.
    pub(crate) fn place(&self) -> String {
        let file = |path: &std::path::Path| {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            format!(
                "file:{}",
                dir.join(path.file_name().unwrap_or_default()).display()
            )
        };
        match self {
            Target::File { path } | Target::Tape { path, .. } => file(path),
            Target::Nbd { uri, .. } => format!("nbd:{uri}"),
            Target::Nvmf {
                traddr,
                trsvcid,
                subnqn,
                nsid,
                ..
            } => format!(
                "nvmf:{traddr}:{}:{subnqn}:{}",
                trsvcid.unwrap_or(drivers::nvmf::DEFAULT_PORT),
                nsid.unwrap_or(1)
            ),
        }
    }
}

/// A network target's connection, made before the job starts.
pub enum Connection {
    /// To an NBD server's export.
    Nbd(NbdConnection),
    /// To an NVMe/TCP namespace.
    Nvmf(Box<NvmfConnection>),
}

/// Why a target's parameters are refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A parameter is unusable (a bad path, a bad record size).
    #[error("{0}")]
    Invalid(String),
    /// The target is another process's file (served, restored, opened by qemu).
    #[error(transparent)]
    InUse(#[from] drivers::file_lock::LockError),
}

/// Checks a target's own parameters, and a file or tape target's path, before the backup
/// starts: a path that cannot be written is refused now rather than failing the backup later.
pub fn check_params(target: &Target) -> Result<(), TargetError> {
    match target {
        Target::Tape { record_size, .. }
            if *record_size == 0 || record_size % 512 != 0 || *record_size > 64 << 20 =>
        {
            Err(TargetError::Invalid(format!(
                "record_size {record_size} must be a multiple of 512 up to 64 MiB"
            )))
        }
        Target::File { path } => check_path(path, false),
        Target::Tape { path, .. } => check_path(path, true),
        Target::Nbd { uri, tls: Some(t) } => {
            t.check().map_err(TargetError::Invalid)?;
            if !uri.starts_with("nbds://") {
                return Err(TargetError::Invalid(format!(
                    "parameter 'tls' needs an nbds:// URI, not {uri}"
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A file target may be a regular file (new or not) or a block device; a tape target a
/// regular file, a tape (character device) or a pipe. Devices and pipes are written in place;
/// a regular file is written as `PATH.partial` in its directory and renamed, so that
/// directory must exist and be writable, and an existing file must not be in use.
fn check_path(path: &Path, tape: bool) -> Result<(), TargetError> {
    let invalid =
        |why: &str| TargetError::Invalid(format!("target path {}: {why}", path.display()));
    if path.as_os_str().is_empty() {
        return Err(invalid("empty"));
    }
    match std::fs::metadata(path) {
        Ok(m) => {
            let ft = m.file_type();
            if ft.is_dir() {
                return Err(invalid("is a directory"));
            }
            if ft.is_block_device() && !tape {
                return Ok(());
            }
            if (ft.is_char_device() || ft.is_fifo()) && tape {
                return Ok(());
            }
            if !ft.is_file() {
                return Err(invalid(if tape {
                    "is neither a regular file, a tape nor a pipe"
                } else {
                    "is neither a regular file nor a block device"
                }));
            }
            drivers::file_lock::check_unlocked(path)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(invalid(&e.to_string())),
    }
    let partial = drivers::sink::partial::partial_path(path);
    if std::fs::symlink_metadata(&partial).is_ok_and(|m| !m.is_file()) {
        return Err(TargetError::Invalid(format!(
            "{} exists and is not a regular file",
            partial.display()
        )));
    }
    drivers::file_lock::check_unlocked(&partial)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(invalid(&format!("{} is not a directory", dir.display()))),
        Err(e) => return Err(invalid(&format!("directory {}: {e}", dir.display()))),
    }
    rustix::fs::access(
        dir,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    )
    .map_err(|e| invalid(&format!("directory {} is not writable: {e}", dir.display())))
}

/// Connects a network target for a backup of `pair` and checks it against the image (blocking:
/// the handshake, Connect and Identify run on the control thread); `None` for a file or tape.
pub fn connect(
    target: &Target,
    pair: &Pair,
    keyring: &Keyring,
) -> Result<Option<Connection>, String> {
    let g = pair.geometry();
    match target {
        Target::File { .. } | Target::Tape { .. } => Ok(None),
        Target::Nbd { uri, tls } => {
            let psk = match tls.as_ref().and_then(|t| t.psk_key.as_deref()) {
                Some(key) => {
                    let secret = keyring
                        .secret(key)
                        .map_err(|e| format!("parameter 'tls': psk_key: {e}"))?;
                    Some(
                        PskFile::parse(secret.expose())
                            .map_err(|e| format!("parameter 'tls': psk_key '{key}': {e}"))?,
                    )
                }
                None => None,
            };
            let client = tls.as_ref().map(|t| match psk {
                Some(keys) => ClientTls::Psk {
                    keys,
                    username: t.username.as_deref(),
                },
                None => ClientTls::X509 {
                    ca_file: t.ca_file.as_deref(),
                    cert_file: t.cert_file.as_deref(),
                    key_file: t.key_file.as_deref(),
                },
            });
            let conn = NbdConnection::connect(uri, client)?;
            conn.check(g.size())?;
            Ok(Some(Connection::Nbd(conn)))
        }
        Target::Nvmf {
            traddr,
            trsvcid,
            subnqn,
            nsid,
            hostnqn,
            dhchap,
            ..
        } => {
            let t = drivers::sink::nvmf::NvmfTarget {
                traddr: traddr.clone(),
                trsvcid: trsvcid.unwrap_or(drivers::nvmf::DEFAULT_PORT),
                subnqn: subnqn.clone(),
                nsid: nsid.unwrap_or(1),
                hostnqn: hostnqn.clone(),
                dhchap: dhchap.clone(),
            };
            let conn = NvmfConnection::connect(&t)?;
            conn.check(g.size(), g.block_size)?;
            Ok(Some(Connection::Nvmf(Box::new(conn))))
        }
    }
}

/// Opens the sink of `target` for an image of `size` bytes in blocks of `block_size`, on the
/// job's reactor (`ctx`), over the connection [`connect`] made for a network target. The job
/// writes the ranges `stored` of the image, in order.
pub fn open_sink(
    target: &Target,
    connection: Option<Connection>,
    manifest: &Manifest,
    (size, block_size): (u64, u32),
    stored: &[Range<u64>],
    ctx: &ChannelContext,
) -> Result<Box<dyn Sink>, String> {
    Ok(match (target, connection) {
        (Target::File { path }, _) => {
            let in_place = !manifest.kind.is_full();
            Box::new(FileSink::open(path, size, block_size, in_place, ctx)?)
        }
        (Target::Tape { path, record_size }, _) if tape_device::is_sequential(path) => Box::new(
            tape_device::TapeDeviceSink::open(path, manifest, *record_size, stored)?,
        ),
        (Target::Tape { path, record_size }, _) => {
            Box::new(TapeSink::open(path, manifest, *record_size, stored, ctx)?)
        }
        (Target::Nbd { .. }, Some(Connection::Nbd(conn))) => Box::new(NbdSink::new(conn, size)?),
        (Target::Nvmf { .. }, Some(Connection::Nvmf(conn))) => {
            Box::new(NvmfSink::new(*conn, size, block_size)?)
        }
        (Target::Nbd { uri, .. }, _) => return Err(format!("{uri}: not connected")),
        (Target::Nvmf { subnqn, .. }, _) => return Err(format!("{subnqn}: not connected")),
    })
}
