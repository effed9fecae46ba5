//! A RAM disk's blocks read in place, and the stripe locks that keep every block whole.
//!
//! NVMe promises single-block atomicity: a read of a block returns it entirely as it was before
//! or entirely as it is after a concurrent write of that block. A RAM disk shared by several
//! reactors gets it from [`StripeLocks`], reader/writer spin locks over 64 KiB stripes: a write
//! (or write-zeroes) holds its stripes exclusively while it copies, a copy out of the disk holds
//! them shared. A read sent in place ([`InPlaceRead`]) is copied by the kernel, during the
//! vectored write that sends it: [`crate::iov::IoVecs::writev`] holds its stripes shared
//! across that one system call, so the bytes that reach the socket are a snapshot.
//!
//! Deadlock freedom: every waiting acquisition (writers, and copies) takes its stripes in
//! ascending order, and the vectored write only tries its locks, giving back all it took when
//! one is busy, so it never waits while holding a stripe. Writers take precedence: a writer
//! waiting for a stripe's readers to leave keeps new readers out, so a stream of reads cannot
//! hold a write back. Every hold is short (a copy, one non-blocking `writev`).

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use hugepages::{DmaBuf, DmaError, RegionSlice};

/// log2 of the stripe size: 64 KiB, so a 4 KiB request takes one lock and a 1 MiB one 16.
const STRIPE_SHIFT: u32 = 16;
/// The writer bit of a stripe's word; the bits below count its readers.
const WRITER: u32 = 1 << 31;
/// Spins before a waiting thread yields its core (the holder may be descheduled).
const SPINS_BEFORE_YIELD: u32 = 128;

/// Reader/writer spin locks over the 64 KiB stripes of a RAM disk.
#[derive(Debug)]
pub struct StripeLocks {
    words: Box<[AtomicU32]>,
}

/// Waits a little, then yields the core.
pub(crate) fn back_off(spins: &mut u32) {
    if *spins < SPINS_BEFORE_YIELD {
        *spins += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

impl StripeLocks {
    /// Locks for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let stripes = size.div_ceil(1 << STRIPE_SHIFT).max(1) as usize;
        Self {
            words: (0..stripes).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// The stripes `len` bytes at `offset` touch (clamped to the disk).
    fn span(&self, offset: u64, len: u64) -> Range<usize> {
        let n = self.words.len();
        let first = ((offset >> STRIPE_SHIFT) as usize).min(n);
        let last = (offset.saturating_add(len.max(1)) - 1) >> STRIPE_SHIFT;
        first..(last as usize + 1).min(n)
    }

    /// Holds the stripes of `len` bytes at `offset` exclusively, waiting for their readers and
    /// writers to leave.
    pub fn write(&self, offset: u64, len: u64) -> StripeGuard<'_> {
        let span = self.span(offset, len);
        for w in &self.words[span.clone()] {
            let mut spins = 0;
            // Claim the writer bit (one writer at a time), then wait for the readers to leave;
            // new readers stay out meanwhile.
            loop {
                let s = w.load(Ordering::Relaxed);
                if s & WRITER == 0
                    && w.compare_exchange_weak(s, s | WRITER, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    break;
                }
                back_off(&mut spins);
            }
            while w.load(Ordering::Acquire) != WRITER {
                back_off(&mut spins);
            }
        }
        StripeGuard {
            locks: self,
            span,
            exclusive: true,
        }
    }

    /// Holds the stripes of `len` bytes at `offset` shared, waiting for a writer to finish.
    pub fn read(&self, offset: u64, len: u64) -> StripeGuard<'_> {
        let span = self.span(offset, len);
        for w in &self.words[span.clone()] {
            let mut spins = 0;
            while !Self::try_share(w) {
                back_off(&mut spins);
            }
        }
        StripeGuard {
            locks: self,
            span,
            exclusive: false,
        }
    }

    /// Holds the stripes shared if no writer has or wants any of them; never waits.
    pub fn try_read(&self, offset: u64, len: u64) -> Option<StripeGuard<'_>> {
        let span = self.span(offset, len);
        for (i, w) in self.words[span.clone()].iter().enumerate() {
            if !Self::try_share(w) {
                self.release_shared(span.start..span.start + i);
                return None;
            }
        }
        Some(StripeGuard {
            locks: self,
            span,
            exclusive: false,
        })
    }

    /// One more reader on `w`, unless a writer has or wants it.
    fn try_share(w: &AtomicU32) -> bool {
        let mut s = w.load(Ordering::Relaxed);
        while s & WRITER == 0 {
            match w.compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
        false
    }

    fn release_shared(&self, span: Range<usize>) {
        for w in &self.words[span] {
            w.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Stripes held, given back when dropped.
#[derive(Debug)]
pub struct StripeGuard<'a> {
    locks: &'a StripeLocks,
    span: Range<usize>,
    exclusive: bool,
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        if self.exclusive {
            for w in &self.locks.words[self.span.clone()] {
                w.fetch_and(!WRITER, Ordering::Release);
            }
        } else {
            self.locks.release_shared(self.span.clone());
        }
    }
}

/// A shared hold on an [`InPlaceRead`]'s stripes that owns its locks, so it can outlive the
/// borrow of the read (see [`crate::iov::IoVecs::writev`]).
#[derive(Debug)]
pub struct SharedHold {
    locks: Arc<StripeLocks>,
    span: Range<usize>,
}

impl Drop for SharedHold {
    fn drop(&mut self) {
        self.locks.release_shared(self.span.clone());
    }
}

/// A RAM disk's blocks read in place: the memory a reply is sent from, with the locks that
/// keep a concurrent write from tearing them while they are copied out.
///
/// Like the region slice it wraps, it gives no Rust reference to the bytes (other reactors
/// write them): only their address, for the kernel to copy during a vectored write that holds
/// the stripes, and copies made under the locks.
#[derive(Debug, Clone)]
pub struct InPlaceRead {
    slice: RegionSlice,
    locks: Arc<StripeLocks>,
    offset: u64,
}

impl InPlaceRead {
    /// `slice`, which holds the disk's bytes at `offset`, guarded by `locks`.
    pub fn new(slice: RegionSlice, locks: Arc<StripeLocks>, offset: u64) -> Self {
        Self {
            slice,
            locks,
            offset,
        }
    }

    /// Address of the first byte, valid while `self` lives.
    pub fn addr(&self) -> *const u8 {
        self.slice.addr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// True for an empty read.
    pub fn is_empty(&self) -> bool {
        self.slice.is_empty()
    }

    /// Copies the bytes into `bufs` (staging buffers reserved for them), waiting for a write
    /// of them in progress: whole blocks as they are now.
    pub fn read_into(&self, bufs: &mut [DmaBuf]) -> Result<(), DmaError> {
        let _shared = self.locks.read(self.offset, self.len() as u64);
        self.slice.read_into(bufs)
    }

    /// Copies the bytes into `bufs` under `hold`, a hold the caller already has on them (taken
    /// again here would wait behind a waiting writer, which waits for `hold`).
    pub fn read_into_held(&self, bufs: &mut [DmaBuf], hold: &SharedHold) -> Result<(), DmaError> {
        debug_assert!(Arc::ptr_eq(&self.locks, &hold.locks));
        self.slice.read_into(bufs)
    }

    /// Tries to hold the stripes shared; `None` while a writer has or wants one of them.
    pub(crate) fn try_hold(&self) -> Option<StripeGuard<'_>> {
        self.locks.try_read(self.offset, self.len() as u64)
    }

    /// One more shared hold, owned, on stripes `_held` already holds: no writer can take them
    /// in between, so it is taken without waiting.
    pub(crate) fn hold_again(&self, _held: &StripeGuard<'_>) -> SharedHold {
        let span = self.locks.span(self.offset, self.len() as u64);
        for w in &self.locks.words[span.clone()] {
            w.fetch_add(1, Ordering::Acquire);
        }
        SharedHold {
            locks: Arc::clone(&self.locks),
            span,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn spans_cover_the_stripes_a_range_touches() {
        let l = StripeLocks::new(1 << 20);
        assert_eq!(l.words.len(), 16);
        assert_eq!(l.span(0, 4096), 0..1);
        assert_eq!(l.span(65536 - 4096, 8192), 0..2);
        assert_eq!(l.span(65536, 65536), 1..2);
        assert_eq!(l.span((1 << 20) - 4096, 4096), 15..16);
        assert_eq!(l.span(u64::MAX - 10, 100), 16..16);
    }

    #[test]
    fn a_writer_excludes_readers_and_other_writers() {
        let l = StripeLocks::new(1 << 20);
        let w = l.write(4096, 4096);
        assert!(l.try_read(0, 4096).is_none(), "same stripe");
        assert!(l.try_read(65536, 4096).is_some(), "another stripe");
        drop(w);
        let r1 = l.try_read(0, 131072).expect("free again");
        let r2 = l.try_read(0, 4096).expect("readers share");
        drop((r1, r2));
        assert!(l.words.iter().all(|w| w.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn a_waiting_writer_keeps_new_readers_out_and_gets_in_when_readers_leave() {
        let l = Arc::new(StripeLocks::new(1 << 20));
        let reader = l.try_read(0, 4096).expect("free");
        let wrote = Arc::new(AtomicBool::new(false));
        let writer = {
            let (l, wrote) = (Arc::clone(&l), Arc::clone(&wrote));
            std::thread::spawn(move || {
                let _w = l.write(0, 4096);
                wrote.store(true, Ordering::SeqCst);
            })
        };
        while l.words[0].load(Ordering::SeqCst) & WRITER == 0 {
            std::thread::yield_now();
        }
        assert!(
            l.try_read(0, 4096).is_none(),
            "a waiting writer comes first"
        );
        assert!(
            !wrote.load(Ordering::SeqCst),
            "the reader still holds the stripe"
        );
        drop(reader);
        writer.join().expect("writer");
        assert!(wrote.load(Ordering::SeqCst));
        assert!(l.try_read(0, 4096).is_some());
    }

    #[test]
    fn copies_never_see_half_a_write() {
        let region = Arc::new(hugepages::DmaRegion::allocate(1 << 16).expect("region"));
        let locks = Arc::new(StripeLocks::new(1 << 16));
        let read = InPlaceRead::new(
            RegionSlice::new(Arc::clone(&region), 0, 4096).expect("slice"),
            Arc::clone(&locks),
            0,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (region, locks, stop) = (Arc::clone(&region), Arc::clone(&locks), stop.clone());
            std::thread::spawn(move || {
                let mut stamp = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    stamp = stamp.wrapping_add(1);
                    let _w = locks.write(0, 4096);
                    region.write_at(0, &[stamp; 4096]).expect("write");
                }
            })
        };
        let pool = hugepages::BufferPool::new(4096, 1).expect("pool");
        let mut bufs = vec![pool.get().expect("buffer")];
        for _ in 0..20_000 {
            read.read_into(&mut bufs).expect("copy");
            let b = bufs[0].as_slice();
            assert!(b.iter().all(|&x| x == b[0]), "a torn block");
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
    }
}
