//! Which chunks of a RAM disk hold data: a bit per chunk, set by writes and cleared when a
//! write-zeroes or an unmap covers the chunk whole. Chunks never written read as zeroes without
//! a look at the memory.
//!
//! Writers change the bits under the stripe locks of the blocks they write (so overlapping
//! requests change them in the order they change the memory); queries read them without a
//! lock: an answer is as of some instant during the query.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bdev::{push_extent, Allocation, Extent, MAX_QUERY_EXTENTS};

/// Bitmap words a query scans at most (a 16 GiB span at 4 KiB chunks).
const MAX_SCANNED_WORDS: usize = 1 << 16;

/// The chunks of a RAM disk that hold data.
#[derive(Debug)]
pub(super) struct WrittenChunks {
    size: u64,
    chunk_shift: u32,
    chunks: u64,
    words: Box<[AtomicU64]>,
}

impl WrittenChunks {
    /// None written, for a disk of `size` bytes cut in chunks of `chunk` bytes (a power of two).
    pub(super) fn new(size: u64, chunk: u64) -> Self {
        let chunks = size.div_ceil(chunk);
        let words = (0..chunks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            size,
            chunk_shift: chunk.trailing_zeros(),
            chunks,
            words,
        }
    }

    fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Marks the chunks `len` bytes at `offset` touch as holding data.
    pub(super) fn mark_written(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.chunk_shift;
        let last = (offset + len - 1) >> self.chunk_shift;
        self.update(first, last + 1, true);
    }

    /// Marks the chunks `len` bytes at `offset` cover whole as zeroes (the disk's last chunk
    /// may be short: zeroed to the end of the disk, it is whole).
    pub(super) fn mark_zeroed(&self, offset: u64, len: u64) {
        let first = offset.div_ceil(self.chunk_size());
        let end = if offset + len >= self.size {
            self.chunks
        } else {
            (offset + len) >> self.chunk_shift
        };
        if first < end {
            self.update(first, end, false);
        }
    }

    /// Sets or clears the bits of chunks `first..end`; a word already right is only read (the
    /// common case of a write into a chunk written before).
    fn update(&self, first: u64, end: u64, set: bool) {
        let mut c = first;
        while c < end {
            let w = (c / 64) as usize;
            let lo = c % 64;
            let hi = (end - w as u64 * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let Some(word) = self.words.get(w) else {
                return;
            };
            let bits = word.load(Ordering::Relaxed);
            if set && bits & mask != mask {
                word.fetch_or(mask, Ordering::Relaxed);
            } else if !set && bits & mask != 0 {
                word.fetch_and(!mask, Ordering::Relaxed);
            }
            c = w as u64 * 64 + hi;
        }
    }

    fn is_written(&self, chunk: u64) -> bool {
        self.words
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (chunk % 64)) != 0)
    }

    /// The first chunk from `from` (before `end`) whose bit is `written`, or `end`.
    fn next(&self, from: u64, end: u64, written: bool, scanned: &mut usize) -> u64 {
        let mut c = from;
        while c < end {
            let w = (c / 64) as usize;
            *scanned += 1;
            let Some(word) = self.words.get(w) else {
                return end;
            };
            let bits = word.load(Ordering::Relaxed);
            let bits = if written { bits } else { !bits };
            let found = bits >> (c % 64);
            if found != 0 {
                return (c + found.trailing_zeros() as u64).min(end);
            }
            c = (w as u64 + 1) * 64;
        }
        end
    }

    /// Appends the extents of `len` bytes at `offset` to `out`: data where written, zeroes
    /// elsewhere (the memory is allocated and pinned, so nothing is a hole). Stops early, at a
    /// chunk boundary, after [`MAX_QUERY_EXTENTS`] extents or [`MAX_SCANNED_WORDS`] words.
    pub(super) fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) {
        let end = offset + len;
        let last_chunk = (end - 1) >> self.chunk_shift;
        let mut at = offset;
        let (mut runs, mut scanned) = (0, 0);
        while at < end && runs < MAX_QUERY_EXTENTS && scanned < MAX_SCANNED_WORDS {
            let chunk = at >> self.chunk_shift;
            let written = self.is_written(chunk);
            let next = self.next(chunk + 1, last_chunk + 1, !written, &mut scanned);
            let run_end = (next << self.chunk_shift).min(end);
            let state = if written {
                Allocation::Data
            } else {
                Allocation::Zero
            };
            push_extent(out, run_end - at, state);
            at = run_end;
            runs += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    fn map(c: &WrittenChunks, offset: u64, len: u64) -> Vec<(u64, Allocation)> {
        let mut out = Vec::new();
        c.extents(offset, len, &mut out);
        out.iter().map(|e| (e.len, e.allocation)).collect()
    }

    #[test]
    fn writes_make_data_and_whole_zeroed_chunks_go_back_to_zero() {
        use Allocation::{Data, Zero};
        let c = WrittenChunks::new(1024 * KIB, 4 * KIB);
        assert_eq!(map(&c, 0, 1024 * KIB), vec![(1024 * KIB, Zero)]);
        // A 512-byte write makes its chunk data; a write across words marks every chunk.
        c.mark_written(8 * KIB + 512, 512);
        c.mark_written(200 * KIB, 120 * KIB);
        assert_eq!(
            map(&c, 0, 1024 * KIB),
            vec![
                (8 * KIB, Zero),
                (4 * KIB, Data),
                (188 * KIB, Zero),
                (120 * KIB, Data),
                (704 * KIB, Zero)
            ]
        );
        // Zeroing part of a chunk leaves it data; zeroing whole chunks clears them.
        c.mark_zeroed(8 * KIB, 2 * KIB);
        c.mark_zeroed(202 * KIB, 100 * KIB);
        assert_eq!(
            map(&c, 0, 1024 * KIB),
            vec![
                (8 * KIB, Zero),
                (4 * KIB, Data),
                (188 * KIB, Zero),
                (4 * KIB, Data),
                (96 * KIB, Zero),
                (20 * KIB, Data),
                (704 * KIB, Zero)
            ]
        );
        // A range inside one run, starting and ending off the chunks.
        assert_eq!(map(&c, 9 * KIB, 2 * KIB), vec![(2 * KIB, Data)]);
        assert_eq!(
            map(&c, 300 * KIB, 24 * KIB),
            vec![(20 * KIB, Data), (4 * KIB, Zero)]
        );
    }

    #[test]
    fn a_short_last_chunk_zeroed_to_the_end_is_cleared() {
        let c = WrittenChunks::new(10 * KIB, 4 * KIB);
        c.mark_written(0, 10 * KIB);
        c.mark_zeroed(8 * KIB, 2 * KIB);
        assert_eq!(
            map(&c, 0, 10 * KIB),
            vec![(8 * KIB, Allocation::Data), (2 * KIB, Allocation::Zero)]
        );
    }

    #[test]
    fn a_query_stops_after_a_bounded_number_of_extents() {
        let c = WrittenChunks::new(4096 * 4 * KIB, 4 * KIB);
        for i in (0..4096).step_by(2) {
            c.mark_written(i * 4 * KIB, 4 * KIB);
        }
        let first = map(&c, 0, 4096 * 4 * KIB);
        assert_eq!(first.len(), MAX_QUERY_EXTENTS);
        let covered: u64 = first.iter().map(|e| e.0).sum();
        assert_eq!(covered, MAX_QUERY_EXTENTS as u64 * 4 * KIB);
    }
}
