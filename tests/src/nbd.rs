//! A small blocking NBD client for tests: fixed newstyle handshake with NBD_OPT_GO (and, for
//! block status, structured replies and metadata contexts), simple replies, and raw access to
//! the socket for malformed-input tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Request types.
pub const READ: u16 = 0;
/// Write.
pub const WRITE: u16 = 1;
/// Disconnect.
pub const DISC: u16 = 2;
/// Flush.
pub const FLUSH: u16 = 3;
/// Trim.
pub const TRIM: u16 = 4;
/// Write zeroes.
pub const WRITE_ZEROES: u16 = 6;

/// A connected client in the transmission phase.
pub struct NbdClient {
    /// The socket (tests may write raw bytes to it).
    pub sock: UnixStream,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    cookie: u64,
}

fn rd<const N: usize>(s: &mut UnixStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Block status.
pub const BLOCK_STATUS: u16 = 7;
/// Command flag: write-zeroes must leave the range allocated (no hole).
pub const FLAG_NO_HOLE: u16 = 1 << 1;
/// Request flag: one block status descriptor per context.
pub const FLAG_REQ_ONE: u16 = 1 << 3;

/// Options.
pub const OPT_GO: u32 = 7;
/// Structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: a metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply: malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Option reply: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// NBD errno: invalid request.
pub const EINVAL: u32 = 22;

/// The data of a metadata context option: export name and queries.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// A connection in the handshake: options sent one at a time, their replies read.
pub struct Negotiation {
    sock: UnixStream,
}

impl Negotiation {
    /// Connects and reads the greeting (fixed newstyle, no zeroes).
    pub fn start(path: &Path) -> std::io::Result<Self> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let hello: [u8; 18] = rd(&mut s)?;
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?;
        Ok(Self { sock: s })
    }

    /// Sends option `option` with `data` and reads its replies up to the last one (an ACK or
    /// an error): the type and payload of each.
    pub fn option(&mut self, option: u32, data: &[u8]) -> std::io::Result<Vec<(u32, Vec<u8>)>> {
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&option.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(data);
        self.sock.write_all(&opt)?;
        let mut replies = Vec::new();
        loop {
            let h: [u8; 20] = rd(&mut self.sock)?;
            assert_eq!(&h[8..12], &option.to_be_bytes(), "reply to another option");
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut payload = vec![0u8; len];
            self.sock.read_exact(&mut payload)?;
            replies.push((kind, payload));
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return Ok(replies);
            }
        }
    }

    /// The metadata contexts NBD_OPT_SET_META_CONTEXT selects for `export` with `queries`:
    /// (id, name) each; an option error as an error.
    pub fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> std::io::Result<Vec<(u32, String)>> {
        let data = meta_context_data(export, queries);
        contexts_of(self.option(OPT_SET_META_CONTEXT, &data)?)
    }

    /// Sends NBD_OPT_GO for `export` (asking for its block sizes) and enters transmission.
    pub fn go(mut self, export: &str) -> std::io::Result<NbdClient> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
        let (mut size, mut flags) = (0, 0);
        for (kind, payload) in self.option(OPT_GO, &data)? {
            match kind {
                3 if u16::from_be_bytes([payload[0], payload[1]]) == 0 => {
                    size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                    flags = u16::from_be_bytes([payload[10], payload[11]]);
                }
                k if k & (1 << 31) != 0 => {
                    return Err(std::io::Error::other(format!(
                        "option error {k:#x}: {}",
                        String::from_utf8_lossy(&payload)
                    )))
                }
                _ => {}
            }
        }
        Ok(NbdClient {
            sock: self.sock,
            size,
            flags,
            cookie: 1,
        })
    }
}

/// The (id, name) of each NBD_REP_META_CONTEXT among `replies`, or the option's error.
pub fn contexts_of(replies: Vec<(u32, Vec<u8>)>) -> std::io::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for (kind, payload) in replies {
        match kind {
            REP_META_CONTEXT => out.push((
                u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")),
                String::from_utf8_lossy(&payload[4..]).into_owned(),
            )),
            REP_ACK => {}
            k => {
                return Err(std::io::Error::other(format!(
                    "option error {k:#x}: {}",
                    String::from_utf8_lossy(&payload)
                )))
            }
        }
    }
    Ok(out)
}

/// What a block status request got: per context id, its (length, flags) descriptors; or the
/// NBD error and its message.
pub type BlockStatus = Result<Vec<(u32, Vec<(u32, u32)>)>, (u32, String)>;

impl NbdClient {
    /// Connects and selects `export` with NBD_OPT_GO.
    pub fn connect(path: &Path, export: &str) -> std::io::Result<Self> {
        Negotiation::start(path)?.go(export)
    }

    /// Connects with structured replies, selects the metadata contexts `queries` name for
    /// `export`, then enters transmission with it; the contexts selected, (id, name) each.
    pub fn connect_with_contexts(
        path: &Path,
        export: &str,
        queries: &[&str],
    ) -> std::io::Result<(Self, Vec<(u32, String)>)> {
        let mut n = Negotiation::start(path)?;
        let r = n.option(OPT_STRUCTURED_REPLY, &[])?;
        assert_eq!(r[0].0, REP_ACK, "structured replies refused");
        let contexts = n.set_meta_context(export, queries)?;
        Ok((n.go(export)?, contexts))
    }

    /// Sends NBD_CMD_BLOCK_STATUS and reads its reply: structured chunks up to the one flagged
    /// done, or a simple reply (an error).
    pub fn block_status(
        &mut self,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> std::io::Result<BlockStatus> {
        let c = self.send(BLOCK_STATUS, flags, offset, len, &[]);
        let mut contexts = Vec::new();
        let mut error = None;
        loop {
            let magic: [u8; 4] = rd(&mut self.sock)?;
            if magic == 0x6744_6698u32.to_be_bytes() {
                let rest: [u8; 12] = rd(&mut self.sock)?;
                let err = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
                assert_eq!(&rest[4..], &c.to_be_bytes(), "cookie");
                return Ok(if err == 0 {
                    Ok(contexts)
                } else {
                    Err((err, String::new()))
                });
            }
            assert_eq!(magic, 0x668e_33efu32.to_be_bytes(), "reply magic");
            let h: [u8; 16] = rd(&mut self.sock)?;
            let chunk_flags = u16::from_be_bytes([h[0], h[1]]);
            let kind = u16::from_be_bytes([h[2], h[3]]);
            assert_eq!(&h[4..12], &c.to_be_bytes(), "cookie");
            let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
            let mut p = vec![0u8; len];
            self.sock.read_exact(&mut p)?;
            let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
            match kind {
                5 => {
                    assert!(
                        len >= 12 && (len - 4).is_multiple_of(8),
                        "block status length {len}"
                    );
                    let d = p[4..]
                        .chunks_exact(8)
                        .map(|d| (be32(d), be32(&d[4..])))
                        .collect();
                    contexts.push((be32(&p), d));
                }
                k if k & (1 << 15) != 0 => {
                    let msg_len = u16::from_be_bytes([p[4], p[5]]) as usize;
                    let msg = String::from_utf8_lossy(&p[6..6 + msg_len]).into_owned();
                    error = Some((be32(&p), msg));
                }
                k => panic!("unexpected chunk type {k}"),
            }
            if chunk_flags & 1 != 0 {
                return Ok(match error {
                    Some(e) => Err(e),
                    None => Ok(contexts),
                });
            }
        }
    }

    /// Sends a request header (and payload) without reading the reply.
    pub fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        self.try_send(kind, flags, offset, len, payload)
            .expect("send request")
    }

    /// Like [`NbdClient::send`], giving the error when the connection is gone.
    pub fn try_send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        let cookie = self.cookie;
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.sock.write_all(&b)?;
        Ok(cookie)
    }

    /// Reads one simple reply: (cookie, error), and `data_len` bytes of data if no error.
    pub fn recv(&mut self, data_len: usize) -> std::io::Result<(u64, u32, Vec<u8>)> {
        let h: [u8; 16] = rd(&mut self.sock)?;
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
        let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let mut data = Vec::new();
        if err == 0 && data_len > 0 {
            data = vec![0u8; data_len];
            self.sock.read_exact(&mut data)?;
        }
        Ok((cookie, err, data))
    }

    /// Reads `len` bytes at `offset`: the data or the NBD error.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.send(READ, 0, offset, len, &[]);
        let (cookie, err, data) = self.recv(len as usize).expect("reply");
        assert_eq!(cookie, c);
        if err == 0 {
            Ok(data)
        } else {
            Err(err)
        }
    }

    /// Writes `data` at `offset`: Ok or the NBD error.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        let c = self.send(WRITE, 0, offset, data.len() as u32, data);
        let (cookie, err, _) = self.recv(0).expect("reply");
        assert_eq!(cookie, c);
        if err == 0 {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// A request without payload or data (flush, trim, write-zeroes, unknown types).
    pub fn command(&mut self, kind: u16, offset: u64, len: u32) -> Result<(), u32> {
        let c = self.send(kind, 0, offset, len, &[]);
        let (cookie, err, _) = self.recv(0).expect("reply");
        assert_eq!(cookie, c);
        if err == 0 {
            Ok(())
        } else {
            Err(err)
        }
    }
}
