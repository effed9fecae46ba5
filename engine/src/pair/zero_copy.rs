//! Copying a track whose source holds only zeroes, known from the source's allocation without
//! reading it: over a destination that reads as zeroes the same way (holes over holes, stored
//! zeroes over stored zeroes) nothing is written, over anything else a write-zeroes that
//! deallocates where the source is holes. So a thin primary leaves a thin secondary, and
//! copying its holes (the initial copy, a copy before write into a region never written) costs
//! a few lookups; [`tracks_needing_nothing`] answers for a run of tracks with one lookup a side.
//!
//! The caller holds the tracks' locks and has begun their copies, as it would for a read: a
//! write racing the lookup is caught the same way as one racing a read (the track is pending
//! again).

use std::ops::Range;

use drivers::{Allocation, Bdev, Extent, IoOp};

use super::Pair;

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
    Walk::new(scratch).class(0, len)
}

/// How many of `tracks` of `pair`, in order, need nothing copied P to S (P's and S's
/// allocation say they read as zeroes the same way): one lookup on each side for the run.
pub(crate) fn tracks_needing_nothing(
    pair: &Pair,
    tracks: Range<u64>,
    scratch: &mut [Vec<Extent>; 2],
) -> u64 {
    leading_zero_tracks(pair, tracks, scratch, |p, s| p == s)
}

/// How many of `tracks` of `pair`, in order, read as zeroes on P and on S by their
/// allocation (and are so equal): one lookup on each side for the run.
pub(crate) fn tracks_of_zeroes_on_both(
    pair: &Pair,
    tracks: Range<u64>,
    scratch: &mut [Vec<Extent>; 2],
) -> u64 {
    leading_zero_tracks(pair, tracks, scratch, |_, _| true)
}

/// How many of `tracks` (not empty), in order, read as zeroes on P and on S in a way `accept`
/// takes (it is given, for each side, whether the track is all holes).
fn leading_zero_tracks(
    pair: &Pair,
    tracks: Range<u64>,
    scratch: &mut [Vec<Extent>; 2],
    accept: impl Fn(bool, bool) -> bool,
) -> u64 {
    let (offset, _) = pair.track_range(tracks.start);
    let (last, last_len) = pair.track_range(tracks.end - 1);
    let (len, track_size) = (last + last_len - offset, pair.track_size());
    let (source, destination) = (pair.primary(), pair.secondary());
    let [src, dst] = scratch;
    src.clear();
    dst.clear();
    if source.allocation(offset, len, src).is_err()
        || destination.allocation(offset, len, dst).is_err()
    {
        return 0;
    }
    let (mut src, mut dst) = (Walk::new(src), Walk::new(dst));
    let mut n = 0;
    let mut at = 0;
    while at < len {
        let end = (at + track_size).min(len);
        match (src.class(at, end), dst.class(at, end)) {
            (Some(s), Some(d)) if accept(s, d) => n += 1,
            _ => break,
        }
        at = end;
    }
    n
}

/// Walks a query's extents over ranges in increasing order.
struct Walk<'a> {
    extents: &'a [Extent],
    /// The extent the last range ended in, and where it starts.
    index: usize,
    start: u64,
}

impl<'a> Walk<'a> {
    fn new(extents: &'a [Extent]) -> Self {
        Self {
            extents,
            index: 0,
            start: 0,
        }
    }

    /// Bytes `from..to` (from the query's offset; after the last range asked): `Some(true)`
    /// when all holes, `Some(false)` when zeroes some of which are stored, `None` when any is
    /// data or the answer does not reach `to`.
    fn class(&mut self, from: u64, to: u64) -> Option<bool> {
        let mut holes = true;
        let mut at = from;
        while at < to {
            let e = self.extents.get(self.index)?;
            let end = self.start + e.len;
            if end <= at {
                self.index += 1;
                self.start = end;
                continue;
            }
            match e.allocation {
                Allocation::Data => return None,
                Allocation::Zero => holes = false,
                Allocation::Hole => {}
            }
            at = end.min(to);
        }
        Some(holes)
    }
}

/// How far data was seen to run on one bdev: tracks inside it are read without looking up
/// their allocation again, so a volume full of data pays a lookup per stretch of data, not per
/// track. A hint only: were it stale (the data since trimmed), a track of zeroes is read, which
/// is always right.
#[derive(Debug, Default)]
pub(crate) struct DataAhead {
    until: u64,
}

/// Bytes one look ahead covers at most.
const LOOK_AHEAD: u64 = 1 << 30;

impl DataAhead {
    /// True when `offset..offset + len` lies inside data seen before.
    pub(crate) fn covers(&self, offset: u64, len: u64) -> bool {
        offset + len <= self.until
    }

    /// Looks up how far data runs on `bdev` from `offset` (a range found to hold data).
    pub(crate) fn look(&mut self, bdev: &dyn Bdev, offset: u64, scratch: &mut Vec<Extent>) {
        scratch.clear();
        let span = LOOK_AHEAD.min(bdev.geometry().size().saturating_sub(offset));
        if span == 0 || bdev.allocation(offset, span, scratch).is_err() {
            return;
        }
        if let Some(e) = scratch.first().filter(|e| e.allocation == Allocation::Data) {
            self.until = offset + e.len;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use drivers::malloc::MallocBdev;
    use drivers::{Bdev, ChannelContext, IoRequest};
    use hugepages::BufferPool;

    use super::*;
    use crate::pair::PairConfig;

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
        // Runs are asked of a pair of them in half-MiB tracks.
        let cfg = PairConfig {
            name: "z".into(),
            track_size: 512 << 10,
            copy_rate: 0,
        };
        let pair = Pair::new(&cfg, Arc::clone(&p), Arc::clone(&s), Vec::new(), None).unwrap();
        let mut scratch = Vec::new();
        let mut runs = [Vec::new(), Vec::new()];
        let track = 1 << 20;
        assert_eq!(
            zero_copy(&*p, &*s, 0, track, &mut scratch),
            Some(ZeroCopy::Nothing)
        );
        assert_eq!(tracks_needing_nothing(&pair, 0..8, &mut runs), 8);
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
        // A run stops at the first track that needs something: S's data, then P's.
        assert_eq!(tracks_needing_nothing(&pair, 0..8, &mut runs), 0);
        let from_1 = tracks_needing_nothing(&pair, 1..7, &mut runs);
        assert_eq!(from_1, 1, "the half track before P's data");
        assert_eq!(tracks_needing_nothing(&pair, 4..8, &mut runs), 4);
        // Verification: zeroes on both sides, whether stored or holes.
        assert_eq!(tracks_of_zeroes_on_both(&pair, 4..8, &mut runs), 4);
        assert_eq!(tracks_of_zeroes_on_both(&pair, 1..8, &mut runs), 1);
    }
}
