//! Copying a track whose source holds only zeroes, known from the source's allocation without
//! reading it: over a destination that reads as zeroes the same way (holes over holes, stored
//! zeroes over stored zeroes) nothing is written, over anything else a write-zeroes that
//! deallocates where the source is holes. So a thin primary leaves a thin secondary, and copying its holes
//! (the initial copy, a copy before write into a region never written) costs a few lookups.
//!
//! The caller holds the track's lock, as it would for the read: a write racing the lookup is
//! caught the same way as one racing a read (the track is pending again).

use drivers::{Allocation, Bdev, Extent, IoOp};

/// How a track of zeroes is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroCopy {
    /// The destination already reads as zeroes, holes where the source has holes: nothing to
    /// write.
    Nothing,
    /// This write-zeroes to the destination (deallocating where the source is holes).
    Write(IoOp),
}

/// How to copy `len` bytes at `offset` from `source` to `destination` without reading them, or
/// `None` when the source holds data there (or cannot tell for all of it): read it.
pub(crate) fn zero_copy(
    source: &dyn Bdev,
    destination: &dyn Bdev,
    offset: u64,
    len: u64,
    scratch: &mut Vec<Extent>,
) -> Option<ZeroCopy> {
    let holes = reads_as_zeroes(source, offset, len, scratch)?;
    if reads_as_zeroes(destination, offset, len, scratch) == Some(holes) {
        return Some(ZeroCopy::Nothing);
    }
    Some(ZeroCopy::Write(IoOp::WriteZeroes { deallocate: holes }))
}

/// Whether `len` bytes at `offset` of `bdev` read as zeroes by its allocation alone:
/// `Some(true)` when all of it is holes, `Some(false)` when some of those zeroes are stored,
/// `None` when it holds data or the answer does not cover all of it.
pub(crate) fn reads_as_zeroes(
    bdev: &dyn Bdev,
    offset: u64,
    len: u64,
    scratch: &mut Vec<Extent>,
) -> Option<bool> {
    scratch.clear();
    bdev.allocation(offset, len, scratch).ok()?;
    let mut covered = 0;
    let mut holes = true;
    for e in scratch.iter() {
        match e.allocation {
            Allocation::Data => return None,
            Allocation::Zero => holes = false,
            Allocation::Hole => {}
        }
        covered += e.len;
    }
    (covered >= len).then_some(holes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use drivers::malloc::MallocBdev;
    use drivers::{Bdev, ChannelContext, IoRequest};
    use hugepages::BufferPool;

    use super::*;

    const BLOCK: u64 = 4096;

    fn written(bdev: &Arc<dyn Bdev>, offset: u64, fill: u8) {
        let pool = BufferPool::new(BLOCK as usize, 1).expect("pool");
        let mut buf = pool.get().expect("buffer");
        buf.as_mut_slice().fill(fill);
        let mut bufs = drivers::IoBufs::new();
        bufs.push(buf);
        let ctx = ChannelContext {
            queue_depth: 1,
            ..Default::default()
        };
        let mut ch = bdev.open_channel(&ctx).expect("channel");
        assert!(ch.submit(IoRequest::write(offset, bufs, 0)).is_ok());
        let mut done = Vec::new();
        while done.is_empty() {
            ch.poll(&mut done);
        }
        assert!(done[0].result.is_ok());
    }

    /// RAM disks: what was never written reads as stored zeroes (nothing is a hole).
    #[test]
    fn zeroes_over_zeroes_need_nothing_and_data_must_be_read() {
        let ram = |name: &str| -> Arc<dyn Bdev> {
            Arc::new(MallocBdev::create(name, 4 << 20, BLOCK as u32).expect("malloc"))
        };
        let (p, s) = (ram("p"), ram("s"));
        let mut scratch = Vec::new();
        let track = 1 << 20;
        assert_eq!(
            zero_copy(&*p, &*s, 0, track, &mut scratch),
            Some(ZeroCopy::Nothing)
        );
        // S holds something there: it gets zeroes, stored as P's are.
        written(&s, 0, 7);
        assert_eq!(
            zero_copy(&*p, &*s, 0, track, &mut scratch),
            Some(ZeroCopy::Write(IoOp::WriteZeroes { deallocate: false }))
        );
        // P holds data in the track: it must be read.
        written(&p, track + 8 * BLOCK, 9);
        assert_eq!(zero_copy(&*p, &*s, track, track, &mut scratch), None);
        assert_eq!(
            zero_copy(&*p, &*s, 2 * track, track, &mut scratch),
            Some(ZeroCopy::Nothing)
        );
    }
}
