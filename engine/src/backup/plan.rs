//! What a backup reads and writes: the ranges of the image it stores, and what stands for the
//! rest. A plain full backup stores the whole image; a sparse full one skips what the image's
//! allocation says holds no data (holes and known zeroes read as zeros: the target gets holes);
//! an incremental one stores only the tracks changed since its base checkpoint (the rest is the
//! base's, already on the target).
//!
//! Ranges are aligned on [`granule`]: whole tracks (a staging buffer never mixes two
//! tracks' sources) and whole chunks of the tree digest and of the CRCs (each chunk is hashed
//! whole, or not at all).

use std::ops::Range;

use drivers::digest::{chunk_count, chunk_digest, ChunkDigest, ChunkDigests, TREE_CHUNK_SIZE};
use drivers::tape::{ArchiveKind, CHUNK_SIZE};
use drivers::{Allocation, Bdev, Extent};

/// What the chunks a backup does not store hold.
#[derive(Debug, Clone)]
pub enum Unstored {
    /// Zeros (a full backup's holes).
    Zeros,
    /// The base checkpoint's image: its chunk digests.
    Base(ChunkDigests),
}

/// An incremental backup's base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    /// The checkpoint.
    pub checkpoint: String,
    /// The digest of its image.
    pub digest: String,
}

/// Largest write of zeroes a backup asks a target for at once.
pub const ZEROES_PIECE: u64 = 16 << 20;

/// The ranges of the image a backup stores.
#[derive(Debug, Clone)]
pub struct Plan {
    size: u64,
    stored: Vec<Range<u64>>,
    /// Ranges the target gets zeroes written over (a full backup's holes on a target that
    /// keeps what it held), at most [`ZEROES_PIECE`] each.
    zeroes: Vec<Range<u64>>,
    unstored: Unstored,
    base: Option<BaseImage>,
}

/// The alignment of a plan's ranges for a pair of tracks of `track_size` bytes: whole tracks,
/// whole chunks of the digests.
pub fn granule(track_size: u64) -> u64 {
    track_size.max(TREE_CHUNK_SIZE).max(CHUNK_SIZE)
}

/// Appends `range`, rounded out to `granule` and cut at `size`, to `out` (sorted input),
/// merging it with the last range when they touch.
fn push_aligned(out: &mut Vec<Range<u64>>, range: Range<u64>, granule: u64, size: u64) {
    let start = range.start - range.start % granule;
    let end = range.end.next_multiple_of(granule).min(size);
    if start >= end {
        return;
    }
    match out.last_mut() {
        Some(last) if last.end >= start => last.end = last.end.max(end),
        _ => out.push(start..end),
    }
}

impl Plan {
    /// Every byte of an image of `size` bytes.
    pub fn whole(size: u64) -> Self {
        Self {
            size,
            stored: std::iter::once(0..size).collect(),
            zeroes: Vec::new(),
            unstored: Unstored::Zeros,
            base: None,
        }
    }

    /// A full backup of `image` (`size` bytes, tracks of `track_size`) storing only what its
    /// allocation says may hold data. Asks `image` in bounded queries, as often as it takes.
    pub fn sparse(image: &dyn Bdev, size: u64, track_size: u64) -> Result<Self, String> {
        let g = granule(track_size);
        let mut stored = Vec::new();
        let mut extents: Vec<Extent> = Vec::new();
        let mut at = 0;
        while at < size {
            extents.clear();
            image
                .allocation(at, size - at, &mut extents)
                .map_err(|e| format!("the image's allocation at {at}: {e}"))?;
            if extents.is_empty() {
                return Err(format!("the image's allocation at {at}: no answer"));
            }
            for e in &extents {
                let len = e.len.min(size - at);
                if e.allocation == Allocation::Data {
                    push_aligned(&mut stored, at..at + len, g, size);
                }
                at += len;
                if at >= size {
                    break;
                }
            }
        }
        Ok(Self {
            size,
            stored,
            zeroes: Vec::new(),
            unstored: Unstored::Zeros,
            base: None,
        })
    }

    /// An incremental backup of an image of `size` bytes storing the tracks set in `tracks`
    /// (64 a word) over `base`, whose chunk digests are `base_chunks`.
    pub fn incremental(
        size: u64,
        track_size: u64,
        tracks: &[u64],
        base: BaseImage,
        base_chunks: ChunkDigests,
    ) -> Self {
        let g = granule(track_size);
        let mut stored = Vec::new();
        for (w, &word) in tracks.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let t = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = t * track_size;
                if start < size {
                    push_aligned(&mut stored, start..start + track_size, g, size);
                }
            }
        }
        Self {
            size,
            stored,
            zeroes: Vec::new(),
            unstored: Unstored::Base(base_chunks),
            base: Some(base),
        }
    }

    /// This full plan with zeroes written over what it does not store (for a target that
    /// keeps what it held: a block device, an NBD export, an NVMe namespace).
    pub fn zeroing_holes(mut self) -> Self {
        if self.base.is_some() {
            return self;
        }
        let mut zeroes = Vec::new();
        let mut at = 0;
        let ends = self.stored.iter().map(|r| (r.start, r.end));
        for (start, end) in ends.chain(std::iter::once((self.size, self.size))) {
            while at < start {
                let n = (start - at).min(ZEROES_PIECE);
                zeroes.push(at..at + n);
                at += n;
            }
            at = end;
        }
        self.zeroes = zeroes;
        self
    }

    /// The ranges the target gets zeroes over, in order.
    pub fn zeroes(&self) -> &[Range<u64>] {
        &self.zeroes
    }

    /// The ranges stored, sorted and disjoint.
    pub fn stored(&self) -> &[Range<u64>] {
        &self.stored
    }

    /// The bytes stored.
    pub fn stored_bytes(&self) -> u64 {
        self.stored.iter().map(|r| r.end - r.start).sum()
    }

    /// True when every byte of the image is stored.
    pub fn is_whole(&self) -> bool {
        self.stored.len() == 1 && self.stored[0] == (0..self.size)
    }

    /// Full or incremental.
    pub fn kind(&self) -> ArchiveKind {
        match self.base {
            Some(_) => ArchiveKind::Incremental,
            None => ArchiveKind::Full,
        }
    }

    /// An incremental's base.
    pub fn base(&self) -> Option<&BaseImage> {
        self.base.as_ref()
    }

    /// The digests of the tree chunks the backup does not store, by chunk (`None` for a
    /// chunk it stores and hashes); empty when it stores every one.
    pub fn unstored_digests(&self) -> Vec<Option<ChunkDigest>> {
        if self.is_whole() {
            return Vec::new();
        }
        let chunks = chunk_count(self.size);
        let mut out: Vec<Option<ChunkDigest>> = match &self.unstored {
            Unstored::Base(base) => base.digests().iter().copied().map(Some).collect(),
            Unstored::Zeros => {
                let zero = chunk_digest(&vec![0; TREE_CHUNK_SIZE.min(self.size) as usize]);
                let mut v = vec![Some(zero); chunks as usize];
                let tail = self.size % TREE_CHUNK_SIZE;
                if let (true, Some(last)) = (tail != 0, v.last_mut()) {
                    *last = Some(chunk_digest(&vec![0; tail as usize]));
                }
                v
            }
        };
        for r in &self.stored {
            let (first, end) = (r.start / TREE_CHUNK_SIZE, r.end.div_ceil(TREE_CHUNK_SIZE));
            for c in first..end.min(out.len() as u64) {
                out[c as usize] = None;
            }
        }
        out
    }
}

/// Walks a plan's ranges: the next offset to handle, in order.
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    range: usize,
    at: u64,
    skipped: u64,
}

impl Cursor {
    /// The offset next, and the bytes left in its range; `None` at the end.
    pub fn next(&mut self, plan: &Plan) -> Option<(u64, u64)> {
        while let Some(r) = plan.stored.get(self.range) {
            let at = self.at.max(r.start);
            if at < r.end {
                self.skipped += at - self.at;
                self.at = at;
                return Some((at, r.end - at));
            }
            self.range += 1;
        }
        self.skipped += plan.size.saturating_sub(self.at);
        self.at = self.at.max(plan.size);
        None
    }

    /// Where the cursor is: the image before it is handled or skipped.
    pub fn position(&self) -> u64 {
        self.at
    }

    /// Bytes of the image the cursor went past without storing them.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Moves past `len` bytes from the offset [`Cursor::next`] gave.
    pub fn advance(&mut self, len: u64) {
        self.at += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_ranges_round_out_to_chunks_and_merge() {
        let digests = ChunkDigests::new(10 << 20, vec![[7; 32]; 10]).unwrap();
        let base = BaseImage {
            checkpoint: "c".into(),
            digest: "d".into(),
        };
        // Tracks of 256 KiB: 1, 2 (chunk 0), 4 (chunk 1), 39 (chunk 9, the last).
        let words = [1u64 << 1 | 1 << 2 | 1 << 4 | 1 << 39];
        let p = Plan::incremental(10 << 20, 256 << 10, &words, base, digests);
        assert_eq!(p.stored(), &[0..2 << 20, 9 << 20..10 << 20]);
        assert_eq!(p.stored_bytes(), 3 << 20);
        assert_eq!(p.kind(), ArchiveKind::Incremental);
        let u = p.unstored_digests();
        assert_eq!(u[0], None);
        assert_eq!(u[1], None);
        assert_eq!(u[2], Some([7; 32]));
        assert_eq!(u[9], None);
        let mut c = Cursor::default();
        assert_eq!(c.next(&p), Some((0, 2 << 20)));
        c.advance(2 << 20);
        assert_eq!(c.next(&p), Some((9 << 20, 1 << 20)));
        assert_eq!(c.skipped(), 7 << 20);
        c.advance(1 << 20);
        assert_eq!(c.next(&p), None);
        assert_eq!((c.position(), c.skipped()), (10 << 20, 7 << 20));
    }

    #[test]
    fn holes_to_zero_are_the_gaps_between_stored_ranges_in_pieces() {
        let mut p = Plan::whole(40 << 20);
        p.stored = vec![1 << 20..2 << 20, 3 << 20..4 << 20];
        let p = p.zeroing_holes();
        assert_eq!(
            p.zeroes(),
            &[
                0..1 << 20,
                2 << 20..3 << 20,
                4 << 20..20 << 20,
                20 << 20..36 << 20,
                36 << 20..40 << 20
            ]
        );
        assert!(Plan::whole(8 << 20).zeroing_holes().zeroes().is_empty());
    }

    #[test]
    fn a_full_plans_unstored_chunks_are_zeros_with_a_short_last_one() {
        let mut p = Plan::whole((2 << 20) + 4096);
        p.stored = std::iter::once(0..1 << 20).collect();
        let u = p.unstored_digests();
        assert_eq!(u.len(), 3);
        assert_eq!(u[0], None);
        assert_eq!(u[1], Some(chunk_digest(&vec![0; 1 << 20])));
        assert_eq!(u[2], Some(chunk_digest(&[0; 4096])));
    }
}
