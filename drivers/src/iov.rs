//! Gathering queued byte pieces into an iovec array for one vectored socket write, the way the
//! NBD server and the NVMe/TCP target and initiator send what a poll turn queued.
//!
//! A piece is either bytes the sender owns or an [`InPlaceRead`] of a RAM disk sent in place:
//! other reactors may write such memory while it is queued, so no Rust reference to it is made.
//! The iovecs carry addresses, and only the kernel reads through them, during a `writev` that
//! holds the pieces' stripe locks so that no block is sent half written.

use std::marker::PhantomData;
use std::os::fd::AsFd;

use hugepages::DmaBuf;
use smallvec::SmallVec;

use crate::in_place::{back_off, InPlaceRead, SharedHold, StripeGuard};

/// One piece of a vectored write: an address and a length, borrowed for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct SendPart<'a> {
    addr: *const u8,
    len: usize,
    /// The RAM disk read it is, when it is one.
    in_place: Option<&'a InPlaceRead>,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> From<&'a [u8]> for SendPart<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Self {
            addr: bytes.as_ptr(),
            len: bytes.len(),
            in_place: None,
            _borrow: PhantomData,
        }
    }
}

impl<'a> From<&'a InPlaceRead> for SendPart<'a> {
    fn from(read: &'a InPlaceRead) -> Self {
        Self {
            addr: read.addr(),
            len: read.len(),
            in_place: Some(read),
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

/// What one [`IoVecs::writev`] sent.
#[derive(Debug)]
pub struct Written {
    /// Bytes the socket took.
    pub bytes: usize,
    /// When the socket took part of a RAM disk read only: a hold on its blocks, still taken,
    /// so the sender copies the rest of it ([`InPlaceRead::read_into_held`]) from the same
    /// snapshot before a write can change them.
    pub cut: Option<SharedHold>,
}

/// An iovec array for [`IoVecs::writev`]: slots filled by [`IoVecs::gather`], borrowing the
/// pieces for `'a`.
pub struct IoVecs<'a, const N: usize> {
    iov: [libc::iovec; N],
    in_place: [Option<&'a InPlaceRead>; N],
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
            in_place: [None; N],
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
            self.in_place[self.filled] = part.in_place;
            self.filled += 1;
            skip = 0;
        }
        self.filled
    }

    /// Shared holds on the blocks of every RAM disk read gathered, each with its slot: taken
    /// all at once or not at all, so this never waits while holding a stripe (a writer waiting
    /// for one of them could be waiting for another this holds).
    fn hold_in_place(&self) -> SmallVec<[(usize, StripeGuard<'a>); 8]> {
        let mut spins = 0;
        'retry: loop {
            let mut held = SmallVec::new();
            for (slot, read) in self.in_place[..self.filled].iter().enumerate() {
                let Some(read) = read else { continue };
                match read.try_hold() {
                    Some(g) => held.push((slot, g)),
                    None => {
                        drop(held);
                        back_off(&mut spins);
                        continue 'retry;
                    }
                }
            }
            return held;
        }
    }

    /// One `writev` of the filled slots on `fd`, holding the blocks of the RAM disk reads among
    /// them for its duration: the kernel copies whole blocks, each as before or as after any
    /// write of it.
    pub fn writev(&self, fd: impl AsFd) -> rustix::io::Result<Written> {
        let fd = fd.as_fd();
        let count = self.filled as libc::c_int;
        let held = self.hold_in_place();
        // SAFETY: the first `filled` slots were made by `gather` from pieces borrowed for 'a,
        // and `self` cannot outlive 'a: byte slices, or RAM disk reads whose region `Arc` keeps
        // the mapping. The kernel only reads through them, during the call.
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
        let bytes = n as usize;
        // The slot the socket stopped inside, if it is a RAM disk read.
        let cut = self.cut_at(bytes, &held);
        Ok(Written { bytes, cut })
    }

    /// Copies the filled slots, at most `max` bytes, to the end of `out` instead of writing them
    /// to a socket (what a TLS session sends goes through its own buffer), holding the blocks
    /// of the RAM disk reads among them as [`IoVecs::writev`] does; the same [`Written`].
    pub fn copy_out(&self, out: &mut Vec<u8>, max: usize) -> Written {
        let held = self.hold_in_place();
        let mut bytes = 0;
        for iov in &self.iov[..self.filled] {
            let n = iov.iov_len.min(max - bytes);
            if n == 0 {
                break;
            }
            out.reserve(n);
            // SAFETY: the slot was made by `gather` from a piece borrowed for 'a (a byte slice,
            // or a RAM disk read whose region `Arc` keeps the mapping, its blocks held above so
            // that no write changes them during the copy); `out` has room for `n` more bytes,
            // and the two cannot overlap (`out` is this call's own vector).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iov.iov_base.cast::<u8>().cast_const(),
                    out.as_mut_ptr().add(out.len()),
                    n,
                );
                out.set_len(out.len() + n);
            }
            bytes += n;
        }
        Written {
            bytes,
            cut: self.cut_at(bytes, &held),
        }
    }

    /// After `bytes` were sent: a hold on the RAM disk read the sending stopped inside, if any.
    fn cut_at(&self, bytes: usize, held: &[(usize, StripeGuard<'a>)]) -> Option<SharedHold> {
        let mut begin = 0;
        for slot in 0..self.filled {
            if held.is_empty() {
                break;
            }
            let len = self.iov[slot].iov_len;
            if bytes < begin + len {
                if bytes > begin {
                    if let Some((_, guard)) = held.iter().find(|(s, _)| *s == slot) {
                        return self.in_place[slot].map(|read| read.hold_again(guard));
                    }
                }
                break;
            }
            begin += len;
        }
        None
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
    use std::sync::Arc;

    use hugepages::{DmaRegion, RegionSlice};

    use super::{copy_into, IoVecs};
    use crate::in_place::{InPlaceRead, StripeLocks};

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

    fn ram_read(
        region: &Arc<DmaRegion>,
        locks: &Arc<StripeLocks>,
        at: usize,
        len: usize,
    ) -> InPlaceRead {
        let slice = RegionSlice::new(Arc::clone(region), at, len).expect("slice");
        InPlaceRead::new(slice, Arc::clone(locks), at as u64)
    }

    #[test]
    fn writev_sends_the_gathered_bytes_in_order() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let region = Arc::new(DmaRegion::allocate(4096).expect("region"));
        let locks = Arc::new(StripeLocks::new(4096));
        region.write_at(100, b"region").expect("write");
        let read = ram_read(&region, &locks, 100, 6);
        let head: &[u8] = b"head:";
        let parts = [super::SendPart::from(head), super::SendPart::from(&read)];
        let mut iov = IoVecs::<4>::new();
        assert_eq!(iov.gather(parts, 2), 2);
        let written = iov.writev(&a).expect("writev");
        assert_eq!(written.bytes, 9);
        assert!(written.cut.is_none(), "sent whole");
        let mut got = [0u8; 9];
        std::io::Read::read_exact(&mut &b, &mut got).expect("read");
        assert_eq!(&got, b"ad:region");
        // Nothing stays held: a writer gets the blocks.
        drop(locks.write(0, 4096));
    }

    /// What goes through a TLS session is copied out: the same bytes a writev sends, up to
    /// the room given, with a hold on a RAM disk read cut by that limit.
    #[test]
    fn copy_out_takes_the_gathered_bytes_up_to_the_room_given() {
        let region = Arc::new(DmaRegion::allocate(4096).expect("region"));
        let locks = Arc::new(StripeLocks::new(4096));
        region.write_at(100, b"region").expect("write");
        let read = ram_read(&region, &locks, 100, 6);
        let head: &[u8] = b"head:";
        let parts = [super::SendPart::from(head), super::SendPart::from(&read)];
        let mut iov = IoVecs::<4>::new();
        assert_eq!(iov.gather(parts, 2), 2);
        let mut out = b"old".to_vec();
        let whole = iov.copy_out(&mut out, 100);
        assert_eq!((whole.bytes, whole.cut.is_none()), (9, true));
        assert_eq!(out, b"oldad:region");
        drop(locks.write(0, 4096));

        let mut out = Vec::new();
        let part = iov.copy_out(&mut out, 5);
        assert_eq!(out, b"ad:re");
        assert_eq!(part.bytes, 5);
        let hold = part.cut.expect("cut inside the RAM disk read");
        let writer = {
            let locks = Arc::clone(&locks);
            std::thread::spawn(move || drop(locks.write(0, 4096)))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!writer.is_finished(), "a writer waits for the rest");
        drop(hold);
        writer.join().expect("writer");
    }

    /// A socket that takes part of a RAM disk read hands back a hold on its blocks, which
    /// keeps writers out until the sender has copied the rest.
    #[test]
    fn a_ram_disk_read_cut_by_a_full_socket_stays_held() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        a.set_nonblocking(true).expect("non-blocking");
        let len = 8 << 20;
        let region = Arc::new(DmaRegion::allocate(len).expect("region"));
        let locks = Arc::new(StripeLocks::new(len as u64));
        let read = ram_read(&region, &locks, 0, len);
        let mut iov = IoVecs::<2>::new();
        iov.gather([&read], 0);
        let written = iov.writev(&a).expect("writev");
        assert!(
            written.bytes > 0 && written.bytes < len,
            "{} bytes",
            written.bytes
        );
        let hold = written.cut.expect("cut inside the read");
        assert!(locks.try_read(0, 4096).is_some(), "readers share");
        let writer = {
            let locks = Arc::clone(&locks);
            std::thread::spawn(move || drop(locks.write(0, 4096)))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!writer.is_finished(), "a writer waits for the hold");
        drop(hold);
        writer.join().expect("writer");
        drop(b);
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
