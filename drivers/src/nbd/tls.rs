//! NBD over TLS, for the server and the backup client alike: the TLS contexts (x509
//! certificates, or pre-shared keys in the `username:hexkey` files nbdkit, qemu-nbd and libnbd
//! read) and [`TlsStream`], a TLS session on a non-blocking socket for the transmission phase.
//!
//! The `openssl` crate (OpenSSL underneath) does both kinds: rustls has no external PSK, and
//! the GnuTLS clients and servers NBD is used with (libnbd, nbdkit, qemu) offer PSK.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use openssl::ssl::{
    ErrorCode, SslAcceptor, SslConnector, SslFiletype, SslMethod, SslOptions, SslStream,
    SslVerifyMode, SslVersion,
};
use zeroize::Zeroizing;

use super::stream::Stream;

/// The socket under a TLS session: while a deadline is set (a server's handshake), each read
/// and write first sets the socket's timeout to the time left, and fails once it has passed.
pub struct Socket {
    stream: Stream,
    deadline: Option<Instant>,
}

impl Socket {
    fn time_left(&self) -> std::io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        self.stream.set_mode(Some(left))
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "socket {}",
            std::os::fd::AsRawFd::as_raw_fd(&self.stream.as_fd())
        )
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.time_left()?;
        self.stream.read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.time_left()?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Plaintext a [`TlsStream`] takes before its records are on the socket.
const OUT_BUF: usize = 256 << 10;
/// The PSK cipher suites of TLS 1.2.
const PSK_CIPHERS: &str = "ECDHE-PSK:DHE-PSK:PSK";
/// The TLS 1.3 suites offered with a PSK (whose hash is SHA-256), AES first: left to
/// themselves, GnuTLS peers and OpenSSL settle on ChaCha20, at less than half AES-GCM's rate
/// where the CPU has AES instructions.
const PSK_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// Why a TLS setting cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{what} {path}: {source}")]
    File {
        /// Which parameter.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not what it should hold.
    #[error("{what} {path}: {detail}")]
    Content {
        /// Which parameter.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A PSK file is malformed (the secret is never quoted).
    #[error("PSK file: {0}")]
    Psk(String),
    /// OpenSSL refused the setting.
    #[error("TLS: {0}")]
    Ssl(#[from] openssl::error::ErrorStack),
}

/// Pre-shared keys: `username:hexkey` lines, as nbdkit, qemu-nbd and libnbd read them. The keys
/// are zeroed when dropped; neither `Debug` nor `Display` shows them.
#[derive(Clone)]
pub struct PskFile {
    entries: Vec<(String, Zeroizing<Vec<u8>>)>,
}

impl PskFile {
    /// Parses the file's bytes; a message that names a line, never a key, when malformed.
    pub fn parse(bytes: &[u8]) -> Result<Self, TlsError> {
        let text = std::str::from_utf8(bytes).map_err(|_| TlsError::Psk("not UTF-8".into()))?;
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let bad = |what: &str| TlsError::Psk(format!("line {}: {what}", i + 1));
            let (user, hex) = line.split_once(':').ok_or_else(|| bad("no ':'"))?;
            if user.is_empty() || user.len() > 127 {
                return Err(bad("a username has 1 to 127 bytes"));
            }
            if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * 256 {
                return Err(bad(
                    "the key is not an even number (2 to 512) of hex digits",
                ));
            }
            let mut key = Zeroizing::new(Vec::with_capacity(hex.len() / 2));
            for pair in hex.as_bytes().chunks_exact(2) {
                let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| bad("not hex"));
                key.push((digit(pair[0])? * 16 + digit(pair[1])?) as u8);
            }
            entries.push((user.to_string(), key));
        }
        if entries.is_empty() {
            return Err(TlsError::Psk("no username:hexkey line".into()));
        }
        Ok(Self { entries })
    }

    /// The key of `user`.
    fn key(&self, user: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(u, _)| u.as_bytes() == user)
            .map(|(_, k)| k.as_slice())
    }

    /// The first line's username.
    pub fn first_user(&self) -> &str {
        self.entries.first().map_or("", |(u, _)| u.as_str())
    }
}

/// Checks that `path` can be read now, naming the parameter when it cannot.
fn readable(what: &'static str, path: &Path) -> Result<(), TlsError> {
    let file = |source| TlsError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(file)?;
    if !meta.is_file() {
        return Err(TlsError::Content {
            what,
            path: path.to_path_buf(),
            detail: "not a regular file".into(),
        });
    }
    std::fs::File::open(path).map(drop).map_err(file)
}

/// Wraps an OpenSSL refusal of one file with the parameter and path.
fn content(what: &'static str, path: &Path) -> impl Fn(openssl::error::ErrorStack) -> TlsError {
    let path = path.to_path_buf();
    move |e| TlsError::Content {
        what,
        path: path.clone(),
        detail: e.to_string(),
    }
}

/// Where a server's pre-shared keys come from: read again for each handshake, so they are in
/// memory only while one runs (and a file rotated in place is picked up). Its error says why
/// they cannot be read, never a key.
pub type PskSource = Arc<dyn Fn() -> Result<PskFile, String> + Send + Sync>;

/// A server's TLS: a certificate and its key (clients verified against `ca_file` when given),
/// or pre-shared keys.
pub enum ServerTls<'a> {
    /// x509.
    X509 {
        /// The certificate chain (PEM).
        cert_file: &'a Path,
        /// Its private key (PEM).
        key_file: &'a Path,
        /// When given, clients must show a certificate this CA signed.
        ca_file: Option<&'a Path>,
    },
    /// PSK.
    Psk(PskSource),
}

/// The TLS context of a server.
pub fn server_context(tls: ServerTls<'_>) -> Result<Arc<SslAcceptor>, TlsError> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF);
    match tls {
        ServerTls::X509 {
            cert_file,
            key_file,
            ca_file,
        } => {
            readable("cert_file", cert_file)?;
            readable("key_file", key_file)?;
            b.set_certificate_chain_file(cert_file)
                .map_err(content("cert_file", cert_file))?;
            let unusable = |e: openssl::error::ErrorStack| TlsError::Content {
                what: "key_file",
                path: key_file.to_path_buf(),
                detail: format!(
                    "cannot be used with cert_file (not a PEM private key, or not its key): {e}"
                ),
            };
            b.set_private_key_file(key_file, SslFiletype::PEM)
                .map_err(unusable)?;
            b.check_private_key().map_err(unusable)?;
            if let Some(ca) = ca_file {
                readable("ca_file", ca)?;
                b.set_ca_file(ca).map_err(content("ca_file", ca))?;
                b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            }
        }
        ServerTls::Psk(source) => {
            b.set_cipher_list(PSK_CIPHERS)?;
            b.set_ciphersuites(PSK_SUITES)?;
            b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE);
            b.set_psk_server_callback(move |_ssl, identity, psk| {
                let keys = match source() {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(%e, "TLS handshake refused: the PSK file cannot be read");
                        return Ok(0);
                    }
                };
                let key = identity.and_then(|u| keys.key(u)).unwrap_or_default();
                // An unknown user (or a key longer than OpenSSL takes) fails the handshake.
                if key.len() > psk.len() {
                    return Ok(0);
                }
                psk[..key.len()].copy_from_slice(key);
                Ok(key.len())
            });
        }
    }
    Ok(Arc::new(b.build()))
}

/// A client's TLS: the server verified against `ca_file` (the system's CAs when none), with a
/// client certificate when given; or a pre-shared key.
pub enum ClientTls<'a> {
    /// x509.
    X509 {
        /// The CA the server's certificate must be signed by.
        ca_file: Option<&'a Path>,
        /// The client's certificate (PEM), with `key_file`.
        cert_file: Option<&'a Path>,
        /// The client's private key (PEM).
        key_file: Option<&'a Path>,
    },
    /// PSK as `username`.
    Psk {
        /// The keys.
        keys: PskFile,
        /// The username; the file's first when none.
        username: Option<&'a str>,
    },
}

/// Runs a client's TLS handshake on `stream` (blocking) with server `host` (checked against the
/// server's certificate for x509).
pub fn connect(tls: ClientTls<'_>, host: &str, stream: Stream) -> Result<TlsStream, String> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF);
    let mut verify_host = true;
    match tls {
        ClientTls::X509 {
            ca_file,
            cert_file,
            key_file,
        } => {
            if let Some(ca) = ca_file {
                readable("ca_file", ca).map_err(|e| e.to_string())?;
                b.set_ca_file(ca)
                    .map_err(|e| content("ca_file", ca)(e).to_string())?;
            }
            match (cert_file, key_file) {
                (Some(c), Some(k)) => {
                    readable("cert_file", c).map_err(|e| e.to_string())?;
                    readable("key_file", k).map_err(|e| e.to_string())?;
                    b.set_certificate_chain_file(c)
                        .map_err(|e| content("cert_file", c)(e).to_string())?;
                    b.set_private_key_file(k, SslFiletype::PEM)
                        .map_err(|e| content("key_file", k)(e).to_string())?;
                }
                (None, None) => {}
                _ => return Err("give both cert_file and key_file, or neither".into()),
            }
        }
        ClientTls::Psk { keys, username } => {
            let user = username.unwrap_or(keys.first_user()).to_string();
            if keys.key(user.as_bytes()).is_none() {
                return Err(format!("no key for PSK username '{user}' in the PSK file"));
            }
            b.set_cipher_list(PSK_CIPHERS).map_err(|e| e.to_string())?;
            b.set_ciphersuites(PSK_SUITES).map_err(|e| e.to_string())?;
            b.set_verify(SslVerifyMode::NONE);
            verify_host = false;
            b.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
                let key = keys.key(user.as_bytes()).unwrap_or_default();
                let id = user.as_bytes();
                if id.len() + 1 > identity.len() || key.len() > psk.len() {
                    return Ok(0);
                }
                identity[..id.len()].copy_from_slice(id);
                identity[id.len()] = 0;
                psk[..key.len()].copy_from_slice(key);
                Ok(key.len())
            });
        }
    }
    // With PSK, the TLS 1.3 handshake of OpenSSL's PSK callbacks and GnuTLS agree; no
    // certificate is involved.
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| e.to_string())?;
    let connector = b.build();
    let config = connector
        .configure()
        .map_err(|e| e.to_string())?
        .verify_hostname(verify_host);
    let socket = Socket {
        stream,
        deadline: None,
    };
    config
        .connect(host.trim_start_matches('[').trim_end_matches(']'), socket)
        .map(TlsStream::new)
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// Runs a server's TLS handshake on `stream` with `acceptor`, within `deadline` (which goes on
/// for the rest of the negotiation, until [`TlsStream::end_deadline`]).
pub fn accept(
    acceptor: &SslAcceptor,
    stream: Stream,
    deadline: Instant,
) -> Result<TlsStream, String> {
    let socket = Socket {
        stream,
        deadline: Some(deadline),
    };
    acceptor
        .accept(socket)
        .map(TlsStream::new)
        .map_err(|e| e.to_string())
}

/// A TLS session on a socket, driven non-blocking: what the transmission phase reads and sends
/// through. Sent bytes are copied into a plaintext buffer, so the caller's buffers are free at
/// once; the records go out as the socket takes them.
pub struct TlsStream {
    ssl: SslStream<Socket>,
    out: Vec<u8>,
    out_at: usize,
    /// Why the session failed, for the connection's last log line.
    failure: Option<String>,
}

/// An `errno` for what OpenSSL said, keeping its message when it is a TLS failure.
fn errno_of(e: openssl::ssl::Error, failure: &mut Option<String>) -> rustix::io::Errno {
    match e.code() {
        ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => rustix::io::Errno::AGAIN,
        _ => {
            if let Some(io) = e.io_error() {
                if let Some(n) = io.raw_os_error() {
                    return rustix::io::Errno::from_raw_os_error(n);
                }
            }
            failure.get_or_insert_with(|| format!("TLS: {e}"));
            rustix::io::Errno::PROTO
        }
    }
}

impl TlsStream {
    fn new(ssl: SslStream<Socket>) -> Self {
        Self {
            ssl,
            out: Vec::new(),
            out_at: 0,
            failure: None,
        }
    }

    /// The socket under it.
    pub fn socket(&self) -> &Stream {
        &self.ssl.get_ref().stream
    }

    /// The protocol version and cipher suite agreed, for log lines.
    pub fn describe(&self) -> String {
        let ssl = self.ssl.ssl();
        let cipher = ssl.current_cipher().map_or("none", |c| c.name());
        format!("{} {cipher}", ssl.version_str())
    }

    /// The negotiation is over: no deadline, and the socket non-blocking for a reactor.
    pub fn end_deadline(&mut self) -> std::io::Result<()> {
        self.ssl.get_mut().deadline = None;
        self.socket().set_mode(None)
    }

    /// Reads decrypted bytes into `buf` until it is full or nothing more is there now: `Ok(0)`
    /// at the end of the session, `AGAIN` when nothing came.
    pub fn recv(&mut self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.ssl.ssl_read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => break,
                Err(e) => {
                    let errno = errno_of(e, &mut self.failure);
                    if n > 0 && errno == rustix::io::Errno::AGAIN {
                        return Ok(n);
                    }
                    return Err(errno);
                }
            }
        }
        Ok(n)
    }

    /// True when decrypted bytes wait in the session (the socket will not say so).
    pub fn input_pending(&self) -> bool {
        self.ssl.ssl().pending() > 0
    }

    /// True when plaintext taken is not all on the socket yet.
    pub fn output_pending(&self) -> bool {
        self.out_at < self.out.len()
    }

    /// Room for more plaintext now (none while the buffer is full).
    pub fn room(&self) -> usize {
        OUT_BUF.saturating_sub(self.out.len() - self.out_at)
    }

    /// Takes `fill`'s bytes (it appends at most [`TlsStream::room`]) and sends what it can.
    pub fn take(&mut self, fill: impl FnOnce(&mut Vec<u8>)) -> rustix::io::Result<()> {
        if self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
        } else if self.out_at > OUT_BUF / 2 {
            self.out.drain(..self.out_at);
            self.out_at = 0;
        }
        fill(&mut self.out);
        self.flush_out()
    }

    /// Sends what was taken until the socket takes no more.
    pub fn flush_out(&mut self) -> rustix::io::Result<()> {
        while self.out_at < self.out.len() {
            match self.ssl.ssl_write(&self.out[self.out_at..]) {
                Ok(n) => self.out_at += n,
                Err(e) => match errno_of(e, &mut self.failure) {
                    rustix::io::Errno::AGAIN => return Ok(()),
                    errno => return Err(errno),
                },
            }
        }
        Ok(())
    }

    /// Why the session failed, when it was TLS (not the socket) that failed.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Sends a close_notify, if the socket takes it now.
    pub fn shutdown(&mut self) {
        let _ = self.ssl.shutdown();
    }
}

impl AsFd for TlsStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket().as_fd()
    }
}

/// Blocking reads and writes for the handshake that follows TLS.
impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.ssl.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.ssl.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.ssl.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_as_nbdkit_reads_them() {
        let f = PskFile::parse(b"alice:0aff\n\nbob:00112233\n").unwrap();
        assert_eq!(f.key(b"alice"), Some(&[0x0a, 0xff][..]));
        assert_eq!(f.key(b"bob"), Some(&[0, 0x11, 0x22, 0x33][..]));
        assert_eq!(f.key(b"carol"), None);
        assert_eq!(f.first_user(), "alice");
    }

    #[test]
    fn malformed_psk_files_name_the_line_not_the_key() {
        let msg = |b: &[u8]| PskFile::parse(b).err().map(|e| e.to_string());
        assert_eq!(
            msg(b"alice:0g12").as_deref(),
            Some("PSK file: line 1: not hex")
        );
        assert_eq!(
            msg(b"a:00\nbob").as_deref(),
            Some("PSK file: line 2: no ':'")
        );
        assert_eq!(
            msg(b":00").as_deref(),
            Some("PSK file: line 1: a username has 1 to 127 bytes")
        );
        assert_eq!(
            msg(b"a:123").as_deref(),
            Some("PSK file: line 1: the key is not an even number (2 to 512) of hex digits")
        );
        assert_eq!(
            msg(b"\n").as_deref(),
            Some("PSK file: no username:hexkey line")
        );
    }
}
