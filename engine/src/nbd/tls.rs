//! An NBD export's TLS: its parameters as `nbd_export_start` takes them (`{cert_file,
//! key_file, ca_file?}` for x509, `{psk_key}` for a keyring key holding `username:hexkey`
//! lines), checked and loaded when the export starts, and the TLS context its connections'
//! handshakes use. The listing and the saved configuration show the parameters (paths and a
//! key's name), never a secret. A PSK key is read from its file at each handshake, as the
//! keyring wants secrets read when they are needed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use drivers::nbd::tls::{self as dtls, PskFile, PskSource, ServerTls, TlsStream};
use openssl::ssl::SslAcceptor;
use serde::{Deserialize, Serialize};

use crate::export::{ExportError, Stream};
use crate::keyring::{read_key_file, Keyring};

/// `tls` of `nbd_export_start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsParams {
    /// The server's certificate chain (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Clients must show a certificate this CA signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The keyring key whose file holds the PSKs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_key: Option<String>,
}

/// An export's TLS, loaded.
#[derive(Clone)]
pub struct ExportTls {
    params: TlsParams,
    acceptor: Arc<SslAcceptor>,
}

impl std::fmt::Debug for ExportTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.params.fmt(f)
    }
}

fn invalid(msg: impl std::fmt::Display) -> ExportError {
    ExportError::Invalid(format!("parameter 'tls': {msg}"))
}

/// The PSKs of keyring key `key`: read and checked now, for a clear error, then read again
/// from the key's file at each handshake (the keyring keeps no secret in memory).
fn psk_source(key: &str, keyring: &Keyring) -> Result<PskSource, ExportError> {
    let secret = keyring
        .secret(key)
        .map_err(|e| invalid(format_args!("psk_key: {e}")))?;
    PskFile::parse(secret.expose()).map_err(|e| invalid(format_args!("psk_key '{key}': {e}")))?;
    let path = keyring
        .list()
        .into_iter()
        .find(|k| k.name == key)
        .map(|k| k.path)
        .ok_or_else(|| invalid(format_args!("psk_key: no key named '{key}'")))?;
    let name = key.to_string();
    Ok(Arc::new(move || {
        let secret = read_key_file(&name, &path).map_err(|e| e.to_string())?;
        PskFile::parse(secret.expose()).map_err(|e| format!("key '{name}': {e}"))
    }))
}

impl ExportTls {
    /// Checks `params` and loads the certificates or the keys (a PSK key from `keyring`).
    pub fn load(params: TlsParams, keyring: &Keyring) -> Result<Self, ExportError> {
        let x509 = params.cert_file.is_some() || params.key_file.is_some();
        let tls =
            match (&params.psk_key, x509 || params.ca_file.is_some()) {
                (Some(_), true) => return Err(invalid(
                    "give either x509 files (cert_file, key_file, ca_file) or psk_key, not both",
                )),
                (Some(key), false) => ServerTls::Psk(psk_source(key, keyring)?),
                (None, _) => match (&params.cert_file, &params.key_file) {
                    (Some(cert_file), Some(key_file)) => ServerTls::X509 {
                        cert_file,
                        key_file,
                        ca_file: params.ca_file.as_deref(),
                    },
                    _ => return Err(invalid("give cert_file and key_file (x509), or psk_key")),
                },
            };
        let acceptor = dtls::server_context(tls).map_err(invalid)?;
        Ok(Self { params, acceptor })
    }

    /// The parameters, as `nbd_export_start` takes them.
    pub fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).unwrap_or_default()
    }

    /// The parameters.
    pub fn tls_params(&self) -> &TlsParams {
        &self.params
    }

    /// Runs the TLS handshake of a client that sent NBD_OPT_STARTTLS, within `deadline`.
    pub fn accept(&self, stream: Stream, deadline: Instant) -> Result<TlsStream, String> {
        dtls::accept(&self.acceptor, stream, deadline)
    }
}
