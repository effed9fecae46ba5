//! Track bitmaps: bitvec vectors of atomic words, so any reactor can test or change a track's
//! bits without a lock, with per-map counters kept exact at every transition (no scanning to
//! answer `pair_get`).

use std::sync::atomic::{AtomicU64, Ordering};

use bitvec::prelude::{BitVec, Lsb0};

type Bits = BitVec<AtomicU64, Lsb0>;

/// Bits of the pending-track map, two per track: `PENDING` (S lacks what it should hold) and
/// `REWRITTEN` (P was written after the copy of the track started).
///
/// A copy clears `REWRITTEN` when it starts and clears `PENDING` at its end only if `REWRITTEN`
/// is still clear, in one compare-and-swap on the word holding both bits. A write to P in
/// PAIR state sets both after it completes. So a copy that overlapped a write never clears the
/// track, and a track is never shown as copied before S holds its data.
pub struct PendingMap {
    bits: Bits,
    tracks: u64,
    count: AtomicU64,
    visited: AtomicU64,
}

const PENDING: u64 = 0b01;
const REWRITTEN: u64 = 0b10;
const PENDING_MASK: u64 = 0x5555_5555_5555_5555;
const TRACKS_PER_WORD: u64 = 32;

impl PendingMap {
    /// A map of `tracks` tracks, none pending.
    pub fn new(tracks: u64) -> Self {
        Self {
            bits: Bits::repeat(false, (tracks * 2) as usize),
            tracks,
            count: AtomicU64::new(0),
            visited: AtomicU64::new(0),
        }
    }

    fn word(&self, track: u64) -> (&AtomicU64, u32) {
        let words = self.bits.as_raw_slice();
        (
            &words[(track / TRACKS_PER_WORD) as usize],
            ((track % TRACKS_PER_WORD) * 2) as u32,
        )
    }

    /// Number of tracks.
    pub fn tracks(&self) -> u64 {
        self.tracks
    }

    /// Words visited by scans and bulk operations so far.
    pub fn words_visited(&self) -> u64 {
        self.visited.load(Ordering::Relaxed)
    }

    /// Tracks pending now.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// True when S does not hold the track yet.
    pub fn is_pending(&self, track: u64) -> bool {
        let (w, shift) = self.word(track);
        w.load(Ordering::SeqCst) >> shift & PENDING != 0
    }

    /// A write to P completed on the track (PAIR/COPY): mark it pending and rewritten. True when
    /// it was not pending before.
    pub fn mark_written(&self, track: u64) -> bool {
        let (w, shift) = self.word(track);
        let old = w.fetch_or((PENDING | REWRITTEN) << shift, Ordering::SeqCst);
        let newly = old >> shift & PENDING == 0;
        if newly {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        newly
    }

    /// Marks a track pending (resync, create). True when newly pending.
    pub fn mark_pending(&self, track: u64) -> bool {
        let (w, shift) = self.word(track);
        let old = w.fetch_or(PENDING << shift, Ordering::SeqCst);
        let newly = old >> shift & PENDING == 0;
        if newly {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        newly
    }

    /// A copy of the track starts: forget earlier rewrites.
    pub fn begin_copy(&self, track: u64) {
        let (w, shift) = self.word(track);
        w.fetch_and(!(REWRITTEN << shift), Ordering::SeqCst);
    }

    /// A copy of the track finished with S written: clear the track unless P was rewritten since
    /// `begin_copy`. True when the track is now clear (by this call).
    pub fn finish_copy(&self, track: u64) -> bool {
        let (w, shift) = self.word(track);
        let mut cur = w.load(Ordering::SeqCst);
        loop {
            let bits = cur >> shift & (PENDING | REWRITTEN);
            if bits != PENDING {
                // Rewritten (copy again later) or already clear (someone else finished it).
                return false;
            }
            match w.compare_exchange_weak(
                cur,
                cur & !(PENDING << shift),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    self.count.fetch_sub(1, Ordering::SeqCst);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Clears the track whatever its bits (a copy made while P cannot change, after a split).
    /// True when it was pending.
    pub fn clear(&self, track: u64) -> bool {
        let (w, shift) = self.word(track);
        let old = w.fetch_and(!((PENDING | REWRITTEN) << shift), Ordering::SeqCst);
        let was = old >> shift & PENDING != 0;
        if was {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        was
    }

    /// Marks every track pending (pair creation: the initial copy; a full resync). The count
    /// goes up by the tracks newly marked, so a copy finishing meanwhile keeps it exact.
    pub fn mark_all(&self) {
        let words = self.bits.as_raw_slice();
        self.visited
            .fetch_add(words.len() as u64, Ordering::Relaxed);
        let mut newly = 0;
        for (i, w) in words.iter().enumerate() {
            let first = i as u64 * TRACKS_PER_WORD;
            let n = self.tracks.saturating_sub(first).min(TRACKS_PER_WORD);
            let mask = if n == TRACKS_PER_WORD {
                PENDING_MASK
            } else {
                PENDING_MASK & ((1u64 << (n * 2)) - 1)
            };
            let old = w.fetch_or(mask, Ordering::SeqCst);
            newly += (mask & !old).count_ones() as u64;
        }
        self.count.fetch_add(newly, Ordering::SeqCst);
    }

    /// The first pending track at or after `from`, wrapping around once; `None` if none is.
    /// Returns how many words it looked at too (for the scan counters).
    pub fn next_pending(&self, from: u64) -> (Option<u64>, u64) {
        let words = self.bits.as_raw_slice();
        let n = words.len() as u64;
        if n == 0 || self.count() == 0 {
            return (None, 0);
        }
        let from = from % self.tracks;
        let first_word = from / TRACKS_PER_WORD;
        for i in 0..=n {
            let wi = (first_word + i) % n;
            let mut bits = words[wi as usize].load(Ordering::SeqCst) & PENDING_MASK;
            if i == 0 {
                // Skip tracks before `from` in the first word (they are seen on wrap-around).
                let skip = (from % TRACKS_PER_WORD) * 2;
                bits &= !0u64 << skip;
            }
            if bits != 0 {
                let t = wi * TRACKS_PER_WORD + bits.trailing_zeros() as u64 / 2;
                if t < self.tracks {
                    self.visited.fetch_add(i + 1, Ordering::Relaxed);
                    return (Some(t), i + 1);
                }
            }
        }
        self.visited.fetch_add(n + 1, Ordering::Relaxed);
        (None, n + 1)
    }

    /// Marks pending every track set in `other` (resync: the changed tracks).
    pub fn absorb(&self, other: &TrackSet) {
        other.visit_all();
        for t in other.bits.iter_ones() {
            self.mark_pending(t as u64);
        }
    }

    /// The pending bits of tracks `64 * w .. 64 * w + 64`, one per track.
    pub fn bits64(&self, w: usize) -> u64 {
        let words = self.bits.as_raw_slice();
        let lo = words.get(2 * w).map_or(0, |x| x.load(Ordering::SeqCst));
        let hi = words.get(2 * w + 1).map_or(0, |x| x.load(Ordering::SeqCst));
        even_bits(lo) | even_bits(hi) << 32
    }

    /// Makes exactly the tracks set in `words` pending (metadata being loaded).
    pub fn load_words(&self, words: &[u64]) {
        let raw = self.bits.as_raw_slice();
        for w in raw {
            w.store(0, Ordering::SeqCst);
        }
        let mut count = 0;
        for t in 0..self.tracks {
            let set = words
                .get((t / 64) as usize)
                .is_some_and(|w| w >> (t % 64) & 1 == 1);
            if set {
                let (w, shift) = self.word(t);
                w.fetch_or(PENDING << shift, Ordering::SeqCst);
                count += 1;
            }
        }
        self.count.store(count, Ordering::SeqCst);
    }

    /// Pending tracks, in order (for persistence and tests).
    pub fn pending_tracks(&self) -> Vec<u64> {
        self.visited
            .fetch_add(self.bits.as_raw_slice().len() as u64, Ordering::Relaxed);
        (0..self.tracks).filter(|&t| self.is_pending(t)).collect()
    }
}

/// Packs the even bits of `x` (the PENDING bits of 32 tracks) into the low 32 bits.
fn even_bits(x: u64) -> u64 {
    let mut x = x & PENDING_MASK;
    x = (x | x >> 1) & 0x3333_3333_3333_3333;
    x = (x | x >> 2) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | x >> 4) & 0x00ff_00ff_00ff_00ff;
    x = (x | x >> 8) & 0x0000_ffff_0000_ffff;
    (x | x >> 16) & 0x0000_0000_ffff_ffff
}

/// A set of tracks (changed on P, changed on S, to restore) with an exact count.
pub struct TrackSet {
    bits: Bits,
    count: AtomicU64,
    visited: AtomicU64,
}

impl TrackSet {
    /// An empty set over `tracks` tracks.
    pub fn new(tracks: u64) -> Self {
        Self {
            bits: Bits::repeat(false, tracks as usize),
            count: AtomicU64::new(0),
            visited: AtomicU64::new(0),
        }
    }

    /// Words visited by scans and bulk operations so far.
    pub fn words_visited(&self) -> u64 {
        self.visited.load(Ordering::Relaxed)
    }

    fn visit_all(&self) {
        self.visited
            .fetch_add(self.bits.as_raw_slice().len() as u64, Ordering::Relaxed);
    }

    fn word(&self, track: u64) -> (&AtomicU64, u32) {
        (
            &self.bits.as_raw_slice()[(track / 64) as usize],
            (track % 64) as u32,
        )
    }

    /// Members now.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// True when the track is in the set.
    pub fn contains(&self, track: u64) -> bool {
        let (w, b) = self.word(track);
        w.load(Ordering::SeqCst) >> b & 1 != 0
    }

    /// Adds the track; true when newly added.
    pub fn insert(&self, track: u64) -> bool {
        let (w, b) = self.word(track);
        let newly = w.fetch_or(1 << b, Ordering::SeqCst) >> b & 1 == 0;
        if newly {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        newly
    }

    /// Removes the track; true when it was in.
    pub fn remove(&self, track: u64) -> bool {
        let (w, b) = self.word(track);
        let was = w.fetch_and(!(1 << b), Ordering::SeqCst) >> b & 1 != 0;
        if was {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        was
    }

    /// Adds every member of `other`.
    pub fn absorb(&self, other: &TrackSet) {
        other.visit_all();
        for t in other.bits.iter_ones() {
            self.insert(t as u64);
        }
    }

    /// Adds every track that is not pending in `pending` (a full restore: S holds the image
    /// of every track P does not, and P holds it where S is still pending).
    pub fn insert_all_not_pending(&self, pending: &PendingMap) {
        self.visit_all();
        let bits = self.bits.len();
        let mut newly = 0;
        for (i, w) in self.bits.as_raw_slice().iter().enumerate() {
            let first = i * 64;
            let valid = if first + 64 > bits {
                (1u64 << (bits - first)) - 1
            } else {
                u64::MAX
            };
            let add = !pending.bits64(i) & valid;
            let old = w.fetch_or(add, Ordering::SeqCst);
            newly += (add & !old).count_ones() as u64;
        }
        self.count.fetch_add(newly, Ordering::SeqCst);
    }

    /// Empties the set.
    pub fn clear(&self) {
        self.visit_all();
        for w in self.bits.as_raw_slice() {
            w.store(0, Ordering::SeqCst);
        }
        self.count.store(0, Ordering::SeqCst);
    }

    /// The first member at or after `from`, wrapping around once.
    pub fn next_member(&self, from: u64, tracks: u64) -> Option<u64> {
        if self.count() == 0 || tracks == 0 {
            return None;
        }
        self.visit_all();
        let from = from % tracks;
        self.bits[from as usize..]
            .first_one()
            .map(|i| i as u64 + from)
            .or_else(|| self.bits[..from as usize].first_one().map(|i| i as u64))
    }

    /// Word `w` of the set (tracks `64 * w ..`), 0 past the end.
    pub fn raw_word(&self, w: usize) -> u64 {
        self.bits
            .as_raw_slice()
            .get(w)
            .map_or(0, |x| x.load(Ordering::SeqCst))
    }

    /// Makes the set exactly the bits of `words` (metadata being loaded).
    pub fn load_words(&self, words: &[u64]) {
        let raw = self.bits.as_raw_slice();
        let bits = self.bits.len();
        let mut count = 0;
        for (i, w) in raw.iter().enumerate() {
            let mut v = words.get(i).copied().unwrap_or(0);
            // Bits past the last track stay clear.
            let first = i * 64;
            if first + 64 > bits {
                v &= (1u64 << (bits - first)) - 1;
            }
            count += v.count_ones() as u64;
            w.store(v, Ordering::SeqCst);
        }
        self.count.store(count, Ordering::SeqCst);
    }

    /// Members in order.
    pub fn members(&self) -> Vec<u64> {
        self.visit_all();
        self.bits.iter_ones().map(|t| t as u64).collect()
    }
}

/// Per-track locks: held while a track's image data is read from P or copied to S, so that a
/// copy before write and a read of the image never interleave on one track.
pub struct TrackLocks {
    bits: Bits,
}

impl TrackLocks {
    /// No track locked.
    pub fn new(tracks: u64) -> Self {
        Self {
            bits: Bits::repeat(false, tracks as usize),
        }
    }

    fn word(&self, track: u64) -> (&AtomicU64, u64) {
        (
            &self.bits.as_raw_slice()[(track / 64) as usize],
            1u64 << (track % 64),
        )
    }

    /// Takes the lock if free.
    pub fn try_lock(&self, track: u64) -> bool {
        let (w, m) = self.word(track);
        w.fetch_or(m, Ordering::SeqCst) & m == 0
    }

    /// Releases a lock this caller holds.
    pub fn unlock(&self, track: u64) {
        let (w, m) = self.word(track);
        w.fetch_and(!m, Ordering::SeqCst);
    }

    /// True while locked.
    pub fn is_locked(&self, track: u64) -> bool {
        let (w, m) = self.word(track);
        w.load(Ordering::SeqCst) & m != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_during_a_copy_keeps_the_track_pending() {
        let m = PendingMap::new(100);
        assert!(m.mark_written(40));
        m.begin_copy(40);
        assert!(!m.mark_written(40), "already pending");
        assert!(!m.finish_copy(40), "rewritten during the copy");
        assert!(m.is_pending(40));
        m.begin_copy(40);
        assert!(m.finish_copy(40));
        assert!(!m.is_pending(40));
        assert_eq!(m.count(), 0);
    }

    #[test]
    fn next_pending_wraps_and_counts() {
        let m = PendingMap::new(100);
        assert_eq!(m.next_pending(0).0, None);
        m.mark_pending(3);
        m.mark_pending(70);
        m.mark_pending(99);
        assert_eq!(m.count(), 3);
        assert_eq!(m.next_pending(0).0, Some(3));
        assert_eq!(m.next_pending(4).0, Some(70));
        assert_eq!(m.next_pending(71).0, Some(99));
        m.clear(99);
        assert_eq!(m.next_pending(71).0, Some(3));
        m.mark_all();
        assert_eq!(m.count(), 100);
        assert_eq!(m.pending_tracks().len(), 100);
    }

    #[test]
    fn a_full_restore_takes_every_track_not_pending() {
        let m = PendingMap::new(130);
        m.mark_pending(1);
        m.mark_pending(129);
        let r = TrackSet::new(130);
        r.insert(5);
        r.insert_all_not_pending(&m);
        assert_eq!(r.count(), 128);
        assert!(!r.contains(1) && !r.contains(129) && r.contains(0) && r.contains(128));
        assert_eq!(r.members().len(), 128);
    }

    #[test]
    fn bits64_packs_the_pending_bits_of_64_tracks() {
        let m = PendingMap::new(200);
        for t in [0u64, 5, 31, 32, 63, 64, 130, 199] {
            m.mark_written(t);
        }
        let expect = |w: u64| {
            (0..64)
                .filter(|b| w * 64 + b < 200 && m.is_pending(w * 64 + b))
                .fold(0u64, |acc, b| acc | 1 << b)
        };
        for w in 0..4 {
            assert_eq!(m.bits64(w as usize), expect(w), "word {w}");
        }
    }

    #[test]
    fn sets_and_locks() {
        let s = TrackSet::new(200);
        assert!(s.insert(150));
        assert!(!s.insert(150));
        assert_eq!(s.next_member(151, 200), Some(150));
        let o = TrackSet::new(200);
        o.insert(3);
        s.absorb(&o);
        assert_eq!(s.members(), vec![3, 150]);
        assert!(s.remove(3));
        assert_eq!(s.count(), 1);
        s.clear();
        assert_eq!(s.count(), 0);
        let l = TrackLocks::new(200);
        assert!(l.try_lock(199));
        assert!(!l.try_lock(199));
        l.unlock(199);
        assert!(l.try_lock(199));
    }
}
