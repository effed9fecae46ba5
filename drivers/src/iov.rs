//! Gathering queued byte pieces into an iovec array for one vectored socket write, the way the
//! NBD server and the NVMe/TCP target and initiator send what a poll turn queued.
//!
//! A piece is either bytes the sender owns or a [`RegionSlice`] of a RAM disk sent in place:
//! other reactors may write such memory while it is queued, so no Rust reference to it is made.
//! The iovecs carry addresses, and only the kernel reads through them.

use std::marker::PhantomData;
use std::os::fd::AsFd;

use hugepages::{DmaBuf, RegionSlice};

/// One piece of a vectored write: an address and a length, borrowed for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct SendPart<'a> {
    addr: *const u8,
    len: usize,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> From<&'a [u8]> for SendPart<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Self {
            addr: bytes.as_ptr(),
            len: bytes.len(),
            _borrow: PhantomData,
        }
    }
}

impl<'a> From<&'a RegionSlice> for SendPart<'a> {
    fn from(slice: &'a RegionSlice) -> Self {
        Self {
            addr: slice.addr(),
            len: slice.len(),
            _borrow: PhantomData,
        }
    }
}

impl SendPart<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty piece.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An iovec array for [`writev`]: slots filled by [`gather`], borrowing the pieces for `'a`.
pub struct IoVecs<'a, const N: usize> {
    iov: [libc::iovec; N],
    filled: usize,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a, const N: usize> IoVecs<'a, N> {
    /// An empty array.
    pub fn new() -> Self {
        Self {
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; N],
            filled: 0,
            _borrow: PhantomData,
        }
    }

    /// Slots filled.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// True when no slot is filled.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Fills the array with `parts` in order, leaving out their first `skip` bytes (sent by an
    /// earlier, partial write) and empty parts; returns how many slots it filled, stopping when
    /// the array is full.
    pub fn gather<P: Into<SendPart<'a>>>(
        &mut self,
        parts: impl IntoIterator<Item = P>,
        mut skip: usize,
    ) -> usize {
        self.filled = 0;
        for part in parts {
            if self.filled == N {
                break;
            }
            let part: SendPart<'a> = part.into();
            if skip >= part.len {
                skip -= part.len;
                continue;
            }
            self.iov[self.filled] = libc::iovec {
                iov_base: part.addr.wrapping_add(skip).cast_mut().cast(),
                iov_len: part.len - skip,
            };
            self.filled += 1;
            skip = 0;
        }
        self.filled
    }

    /// One `writev` of the filled slots on `fd`; the bytes written.
    pub fn writev(&self, fd: impl AsFd) -> rustix::io::Result<usize> {
        let fd = fd.as_fd();
        let count = self.filled as libc::c_int;
        // SAFETY: the first `filled` slots were made by `gather` from pieces borrowed for 'a,
        // and `self` cannot outlive 'a: byte slices, or region slices whose `Arc` keeps the
        // mapping. The kernel only reads through them, during the call.
        let n = unsafe {
            libc::writev(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                self.iov.as_ptr(),
                count,
            )
        };
        if n < 0 {
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            return Err(rustix::io::Errno::from_raw_os_error(errno));
        }
        Ok(n as usize)
    }

    #[cfg(test)]
    fn slot(&self, i: usize) -> &[u8] {
        // SAFETY: test helper; slot `i` < filled points at a byte slice still borrowed for 'a.
        unsafe { std::slice::from_raw_parts(self.iov[i].iov_base.cast(), self.iov[i].iov_len) }
    }
}

impl<const N: usize> Default for IoVecs<'_, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Copies `src` into `bufs`, taken as one byte range, from byte `at` of it on: what arrives on
/// a socket into the staging buffers of a request. Bytes past the buffers' end are dropped.
pub fn copy_into(bufs: &mut [DmaBuf], at: usize, src: &[u8]) {
    let mut pos = 0usize;
    let mut src = src;
    for b in bufs.iter_mut() {
        let (start, end) = (pos, pos + b.len());
        pos = end;
        if src.is_empty() {
            break;
        }
        if end <= at {
            continue;
        }
        let off = at.max(start) - start;
        let k = (b.len() - off).min(src.len());
        b.as_mut_slice()[off..off + k].copy_from_slice(&src[..k]);
        src = &src[k..];
    }
}

#[cfg(test)]
mod tests {
    use super::{copy_into, IoVecs};

    #[test]
    fn skips_sent_bytes_and_empty_parts_and_stops_when_full() {
        let parts: [&[u8]; 5] = [b"abc", b"", b"defg", b"h", b"ij"];
        let mut iov = IoVecs::<8>::new();
        let n = iov.gather(parts, 4);
        let got: Vec<&[u8]> = (0..n).map(|i| iov.slot(i)).collect();
        assert_eq!(got, vec![&b"efg"[..], b"h", b"ij"]);

        let mut small = IoVecs::<2>::new();
        let n = small.gather(parts, 0);
        let got: Vec<&[u8]> = (0..n).map(|i| small.slot(i)).collect();
        assert_eq!(got, vec![&b"abc"[..], b"defg"]);

        assert_eq!(iov.gather(parts, 10), 0);
    }

    #[test]
    fn writev_sends_the_gathered_bytes_in_order() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let region = std::sync::Arc::new(hugepages::DmaRegion::allocate(4096).expect("region"));
        region.write_at(100, b"region").expect("write");
        let slice = hugepages::RegionSlice::new(region, 100, 6).expect("slice");
        let head: &[u8] = b"head:";
        let parts = [super::SendPart::from(head), super::SendPart::from(&slice)];
        let mut iov = IoVecs::<4>::new();
        assert_eq!(iov.gather(parts, 2), 2);
        assert_eq!(iov.writev(&a).expect("writev"), 9);
        let mut got = [0u8; 9];
        std::io::Read::read_exact(&mut &b, &mut got).expect("read");
        assert_eq!(&got, b"ad:region");
    }

    #[test]
    fn copy_into_fills_the_buffers_as_one_range_from_an_offset() {
        let pool = hugepages::BufferPool::new(4096, 3).expect("pool");
        let mut bufs: Vec<hugepages::DmaBuf> = (0..3)
            .map(|_| {
                let mut b = pool.get().expect("buffer");
                b.set_len(4).expect("len");
                b.as_mut_slice().fill(0);
                b
            })
            .collect();
        // Bytes 3..9 of the 12: the end of the first buffer, the whole second, the third's start.
        copy_into(&mut bufs, 3, b"abcdef");
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect();
        assert_eq!(all, b"\0\0\0abcdef\0\0\0");
        // Past the end: only what fits is written.
        copy_into(&mut bufs, 10, b"XYZ");
        assert_eq!(&bufs[2].as_slice()[2..], b"XY");
    }
}
