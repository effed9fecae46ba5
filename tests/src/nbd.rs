//! A small blocking NBD client for tests: fixed newstyle handshake with NBD_OPT_GO, simple
//! replies, and raw access to the socket for malformed-input tests.

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

impl NbdClient {
    /// Connects and selects `export` with NBD_OPT_GO.
    pub fn connect(path: &Path, export: &str) -> std::io::Result<Self> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let hello: [u8; 18] = rd(&mut s)?;
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let h: [u8; 20] = rd(&mut s)?;
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            match kind {
                1 => break, // ACK
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
        Ok(Self {
            sock: s,
            size,
            flags,
            cookie: 1,
        })
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
