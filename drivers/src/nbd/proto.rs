//! NBD wire format (NetworkBlockDevice/nbd doc/proto.md): the fixed newstyle handshake, options,
//! transmission requests and simple and structured replies. All integers are big-endian.

/// "NBDMAGIC": the server's first eight bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server omits the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client accepts no zeroes after NBD_OPT_EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    /// Select an export, old style (no reply on error: the server closes).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Start TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Select an export and start transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// An information item of INFO/GO.
    pub const INFO: u32 = 3;
    /// A metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown or unsupported option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// The option is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types of NBD_REP_INFO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// A flush on one connection covers writes completed on all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Flag: force unit access.
    pub const FLAG_FUA: u16 = 1 << 0;
    /// Flag: write zeroes must not punch holes.
    pub const FLAG_NO_HOLE: u16 = 1 << 1;
    /// Flag: reply in one chunk.
    pub const FLAG_DF: u16 = 1 << 2;
    /// Flag: one block status descriptor per context, within the request's length.
    pub const FLAG_REQ_ONE: u16 = 1 << 3;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// This is the last chunk.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Success without payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Block status descriptors of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// Status flags of the `base:allocation` metadata context.
pub mod state {
    /// Not allocated (a hole).
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The namespace and colon of the metadata contexts the NBD protocol document defines.
pub const BASE_NAMESPACE: &str = "base:";
/// The `base:allocation` metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Errors of transmission replies (errno values as the protocol defines them).
pub mod err {
    /// Not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid request.
    pub const EINVAL: u32 = 22;
    /// No space (a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Largest request payload the server accepts (and advertises).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Parses a 28-byte header; `None` if the magic is wrong.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let be64 = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        if be32(0) != REQUEST_MAGIC {
            return None;
        }
        Some(Self {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(8),
            offset: be64(16),
            length: be32(24),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header announcing `length` payload bytes.
pub fn structured_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// An option reply: header and payload.
pub fn option_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Longest string (export name, metadata context query) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export whose contexts are listed or selected (empty: the default export).
    pub export: String,
    /// The queries, each a namespace, a colon and the rest.
    pub queries: Vec<String>,
}

/// Why metadata context option data is malformed (answered with NBD_REP_ERR_INVALID).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaContextRequestError {
    /// A length field reaches past the end of the option.
    #[error("the option data ends inside its {0}")]
    Truncated(&'static str),
    /// Bytes are left after the last query.
    #[error("{0} bytes follow the last query")]
    Trailing(usize),
    /// A string is longer than the protocol allows.
    #[error("a string of {0} bytes is over the 4096 the protocol allows")]
    TooLong(usize),
    /// A string is not UTF-8.
    #[error("a string is not UTF-8")]
    NotUtf8,
    /// A query does not start with a namespace and a colon.
    #[error("query '{0}' does not start with a namespace and a colon")]
    NoNamespace(String),
}

impl MetaContextRequest {
    /// Parses the option data: export name length and name, number of queries, then each
    /// query's length and text.
    pub fn parse(data: &[u8]) -> Result<Self, MetaContextRequestError> {
        let mut rest = data;
        let export = take_string(&mut rest, "export name")?;
        let count = take_u32(&mut rest, "number of queries")? as usize;
        // Each query takes at least its 4-byte length: a count the data cannot hold is caught
        // before anything is allocated for it.
        if count > rest.len() / 4 {
            return Err(MetaContextRequestError::Truncated("queries"));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            let q = take_string(&mut rest, "query")?;
            match q.split_once(':') {
                Some((ns, _))
                    if !ns.is_empty()
                        && ns.chars().all(|c| c.is_ascii_graphic() || !c.is_ascii()) =>
                {
                    queries.push(q)
                }
                _ => return Err(MetaContextRequestError::NoNamespace(q)),
            }
        }
        if !rest.is_empty() {
            return Err(MetaContextRequestError::Trailing(rest.len()));
        }
        Ok(Self { export, queries })
    }

    /// Encodes the option data (what a client sends).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.export.len() as u32).to_be_bytes());
        b.extend_from_slice(self.export.as_bytes());
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }
}

fn take_u32(rest: &mut &[u8], what: &'static str) -> Result<u32, MetaContextRequestError> {
    let Some((n, tail)) = rest.split_first_chunk::<4>() else {
        return Err(MetaContextRequestError::Truncated(what));
    };
    *rest = tail;
    Ok(u32::from_be_bytes(*n))
}

fn take_string(rest: &mut &[u8], what: &'static str) -> Result<String, MetaContextRequestError> {
    let len = take_u32(rest, what)? as usize;
    if len > rest.len() {
        return Err(MetaContextRequestError::Truncated(what));
    }
    if len > MAX_STRING {
        return Err(MetaContextRequestError::TooLong(len));
    }
    let (bytes, tail) = rest.split_at(len);
    *rest = tail;
    String::from_utf8(bytes.to_vec()).map_err(|_| MetaContextRequestError::NotUtf8)
}

/// An NBD_REP_META_CONTEXT payload: the context's id and name.
pub fn meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Appends an NBD_REPLY_TYPE_BLOCK_STATUS chunk to `out`: context `id` and its descriptors,
/// each a (length, status flags) pair.
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    id: u32,
    descriptors: &[(u32, u32)],
) {
    let len = 4 + 8 * descriptors.len() as u32;
    out.extend_from_slice(&structured_header(flags, chunk::BLOCK_STATUS, cookie, len));
    out.extend_from_slice(&id.to_be_bytes());
    for (length, status) in descriptors {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
    }
}

/// Maps an engine I/O error to the protocol's errno.
pub fn errno_of(e: &crate::IoError) -> u32 {
    match e {
        crate::IoError::OutOfRange { .. } => err::EINVAL,
        crate::IoError::Unaligned { .. } | crate::IoError::BufferMismatch { .. } => err::EINVAL,
        crate::IoError::ReadOnly | crate::IoError::Refused(_) => err::EPERM,
        crate::IoError::NotSupported => err::ENOTSUP,
        crate::IoError::Device(e) if *e == libc::ENOSPC => err::ENOSPC,
        crate::IoError::Device(e) if *e == libc::ENOMEM => err::ENOMEM,
        crate::IoError::Device(_) | crate::IoError::Aborted(_) => err::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: cmd::FLAG_FUA,
            kind: cmd::WRITE,
            cookie: 0xdead_beef,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    fn meta(export: &str, queries: &[&str]) -> MetaContextRequest {
        MetaContextRequest {
            export: export.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        }
    }

    #[test]
    fn meta_context_requests_parse() {
        for m in [
            meta("", &[]),
            meta("p0", &["base:allocation"]),
            meta(
                "pair0-image",
                &["base:", "qemu:dirty-bitmap:", "x-ours:anything:at:all"],
            ),
        ] {
            assert_eq!(MetaContextRequest::parse(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn malformed_meta_context_requests_are_refused() {
        use MetaContextRequestError::*;
        let good = meta("m", &["base:allocation"]).encode();
        // Cut anywhere, the data is short of what its lengths announce.
        for cut in 0..good.len() {
            assert!(
                matches!(MetaContextRequest::parse(&good[..cut]), Err(Truncated(_))),
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(MetaContextRequest::parse(&long), Err(Trailing(1)));
        // A query count far beyond the data.
        let mut many = meta("m", &[]).encode();
        many[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(MetaContextRequest::parse(&many), Err(Truncated("queries")));
        // An export name length past the end.
        assert_eq!(
            MetaContextRequest::parse(&[0, 0, 0, 9, b'm']),
            Err(Truncated("export name"))
        );
        for bad in ["allocation", ":allocation", "ba se:allocation", ""] {
            assert_eq!(
                MetaContextRequest::parse(&meta("m", &[bad]).encode()),
                Err(NoNamespace(bad.into()))
            );
        }
        let mut not_utf8 = meta("m", &["base:a"]).encode();
        let last = not_utf8.len() - 1;
        not_utf8[last] = 0xff;
        assert_eq!(MetaContextRequest::parse(&not_utf8), Err(NotUtf8));
        let huge = "x".repeat(MAX_STRING + 1);
        assert_eq!(
            MetaContextRequest::parse(&meta(&huge, &[]).encode()),
            Err(TooLong(MAX_STRING + 1))
        );
    }

    #[test]
    fn block_status_chunks_encode() {
        let mut out = Vec::new();
        block_status_chunk(&mut out, chunk::FLAG_DONE, 7, 1, &[(4096, 0), (8192, 3)]);
        assert_eq!(out.len(), STRUCTURED_HEADER_LEN + 4 + 16);
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &chunk::FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &chunk::BLOCK_STATUS.to_be_bytes());
        assert_eq!(&out[8..16], &7u64.to_be_bytes());
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[24..32], &[0, 0, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(&out[32..40], &[0, 0, 0x20, 0, 0, 0, 0, 3]);
    }
}
