//! What a pair reports and counts: the counters of the work its machinery did
//! ([`PairStats`]), the `pair_get` report ([`PairInfo`]), and the watch the engine's own work
//! keeps on host activity ([`HostWatch`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use drivers::iostat::IoStats;

use serde::Serialize;

use super::{Pair, PairState};

/// Counters of the work a pair's machinery did.
#[derive(Debug, Default)]
pub struct PairStats {
    /// Tracks copied P to S (background copy and copy before write).
    pub tracks_copied: AtomicU64,
    /// Of those, copies made before a host write (or an S write) on a pending track.
    pub cow_copies: AtomicU64,
    /// Tracks copied S to P by a restore.
    pub tracks_restored: AtomicU64,
    /// Bytes the pair machinery read from P or S (copies and image reads).
    pub bytes_read: AtomicU64,
    /// Bytes the pair machinery wrote to P or S on its own behalf (copies).
    pub bytes_copied: AtomicU64,
    /// Payload bytes copied by the CPU (bounce buffers of reads mixing P and S).
    pub cpu_copied_bytes: AtomicU64,
    /// Bitmap words the copier scanned looking for work.
    pub words_scanned: AtomicU64,
    /// Splits applied, and the nanoseconds the last one took inside the engine.
    pub splits: AtomicU64,
    /// Nanoseconds of the last split, from request to gates reopened.
    pub last_split_ns: AtomicU64,
    /// Requests hosts sent through the pair's views (a backup watches it to yield to them).
    pub host_requests: AtomicU64,
    /// What hosts read and wrote through the pair's views (P through the pair, and the image),
    /// counted by their channels; `pair_get` reports the reads and writes.
    pub host_io: Arc<IoStats>,
    /// Tracks that started and finished moving from pending to copied: `pair_get` reads the
    /// pending and copied counts when none is between the two, so each track is in exactly one.
    moves_started: AtomicU64,
    moves_finished: AtomicU64,
}

impl PairStats {
    /// Marks track `track` copied to S: `clear` takes it out of the pending set (true when it
    /// was pending, which counts it as copied). Readers of both counts never see it in neither
    /// or both.
    pub(crate) fn move_to_copied(&self, clear: impl FnOnce() -> bool) {
        self.moves_started.fetch_add(1, Ordering::SeqCst);
        if clear() {
            self.tracks_copied.fetch_add(1, Ordering::SeqCst);
        }
        self.moves_finished.fetch_add(1, Ordering::SeqCst);
    }

    /// `(pending, copied)` taken while no track was moving between them. A mover is never
    /// blocked: the reader retries, and waits for a mover that was preempted mid-move (up to
    /// [`PairStats::CONSISTENT_WAIT`], after which the last reading is returned).
    fn pending_and_copied(&self, pending: impl Fn() -> u64) -> (u64, u64) {
        let deadline = std::time::Instant::now() + Self::CONSISTENT_WAIT;
        let mut tries = 0u32;
        loop {
            let finished = self.moves_finished.load(Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            let reading = (pending(), self.tracks_copied.load(Ordering::SeqCst));
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.moves_started.load(Ordering::SeqCst) == finished {
                return reading;
            }
            tries += 1;
            if tries < 256 {
                std::hint::spin_loop();
            } else if std::time::Instant::now() >= deadline {
                return reading;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// How long `pair_get` waits for a track move to finish; a move takes well under a
    /// microsecond unless its thread is preempted.
    const CONSISTENT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
}

/// Watches a pair's host requests for the engine's own work on it (backups, urgent copies),
/// which keeps less I/O in flight while hosts are active so host requests do not queue behind
/// it.
#[derive(Debug)]
pub(crate) struct HostWatch {
    seen: u64,
    until: std::time::Instant,
    /// A host request was seen since the watch began.
    any: bool,
}

impl HostWatch {
    /// Hosts count as active until this long after their last request.
    const QUIET: std::time::Duration = std::time::Duration::from_millis(100);

    /// Hosts count as active for a first quiet period: a request made just before the watch
    /// began is not seen, and the work must not start at full depth under a busy host.
    pub(crate) fn new(pair: &Pair) -> Self {
        Self {
            seen: pair.stats.host_requests.load(Ordering::Relaxed),
            until: std::time::Instant::now() + Self::QUIET,
            any: false,
        }
    }

    /// True once a host request was seen since the watch began.
    pub(crate) fn seen_any(&self) -> bool {
        self.any
    }

    /// True while hosts use `pair` (a request seen within the last [`HostWatch::QUIET`]).
    pub(crate) fn active(&mut self, pair: &Pair) -> bool {
        let seen = pair.stats.host_requests.load(Ordering::Relaxed);
        let now = std::time::Instant::now();
        if seen != self.seen {
            self.seen = seen;
            self.until = now + Self::QUIET;
            self.any = true;
        }
        now < self.until
    }
}

/// What `pair_get` reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PairInfo {
    /// Name.
    pub name: String,
    /// State.
    pub state: PairState,
    /// `forward` or `reverse` while copying.
    pub direction: &'static str,
    /// Primary bdev.
    pub primary: String,
    /// Secondary bdev.
    pub secondary: String,
    /// Track size in bytes.
    pub track_size: u64,
    /// Number of tracks.
    pub tracks: u64,
    /// Tracks S still lacks (plus tracks P still lacks in a restore).
    pub pending_tracks: u64,
    /// Tracks written on P or S since the split (what a resync copies).
    pub changed_tracks: u64,
    /// Split instant, nanoseconds since the Unix epoch (0 before the first split).
    pub split_at_ns: u64,
    /// The error that suspended the pair.
    pub error: Option<String>,
    /// Copy rate limit in bytes per second (0 = unlimited).
    pub copy_rate: u64,
    /// Tracks copied P to S so far.
    pub copied_tracks: u64,
    /// Of those, copies before write.
    pub cow_copies: u64,
    /// Tracks copied S to P by restores.
    pub restored_tracks: u64,
    /// Bytes the pair's copies wrote (background copy, copy before write, restores): the copy
    /// rate is its change over time.
    pub bytes_copied: u64,
    /// Reads hosts made through the pair (its primary's exports and its image's).
    pub host_num_read_ops: u64,
    /// Bytes of those reads.
    pub host_bytes_read: u64,
    /// Writes hosts made through the pair (write-zeroes and unmaps not included).
    pub host_num_write_ops: u64,
    /// Bytes of those writes.
    pub host_bytes_written: u64,
}

impl Pair {
    /// What `pair_get` reports.
    pub fn info(&self) -> PairInfo {
        let reverse = self.last_resync_reversed();
        let (pending_tracks, copied_tracks) = self
            .stats
            .pending_and_copied(|| self.pending.count() + self.restore.count());
        let host = self.stats.host_io.snapshot();
        PairInfo {
            name: self.name.clone(),
            state: self.state(),
            direction: if reverse { "reverse" } else { "forward" },
            primary: self.primary.name().to_string(),
            secondary: self.secondary.name().to_string(),
            track_size: self.track_size,
            tracks: self.tracks,
            pending_tracks,
            changed_tracks: self.changed_tracks(),
            split_at_ns: self.split_at_ns(),
            error: self.error(),
            copy_rate: self.copy_rate(),
            copied_tracks,
            cow_copies: self.stats.cow_copies.load(Ordering::Relaxed),
            restored_tracks: self.stats.tracks_restored.load(Ordering::Relaxed),
            bytes_copied: self.stats.bytes_copied.load(Ordering::Relaxed),
            host_num_read_ops: host.num_read_ops,
            host_bytes_read: host.bytes_read,
            host_num_write_ops: host.num_write_ops,
            host_bytes_written: host.bytes_written,
        }
    }

    /// Tracks in the union of the changed sets. Exact without a scan when one set is empty
    /// (the usual case); otherwise counted over the smaller set.
    fn changed_tracks(&self) -> u64 {
        let (p, s) = (self.changed_p.count(), self.changed_s.count());
        if p == 0 || s == 0 {
            return p + s;
        }
        let (small, other) = if p <= s {
            (&self.changed_p, &self.changed_s)
        } else {
            (&self.changed_s, &self.changed_p)
        };
        let both = small
            .members()
            .into_iter()
            .filter(|&t| other.contains(t))
            .count() as u64;
        p + s - both
    }
}

#[cfg(test)]
mod tests {
    use super::PairStats;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn pending_plus_copied_is_exact_while_tracks_move() {
        const TRACKS: u64 = 20_000;
        let stats = Arc::new(PairStats::default());
        let pending = Arc::new(AtomicU64::new(TRACKS));
        let done = Arc::new(AtomicBool::new(false));
        let (s, p, d) = (Arc::clone(&stats), Arc::clone(&pending), Arc::clone(&done));
        let mover = std::thread::spawn(move || {
            for _ in 0..TRACKS {
                s.move_to_copied(|| {
                    p.fetch_sub(1, Ordering::SeqCst);
                    // A copy's bookkeeping is not instant: widen the window a reader can hit.
                    for _ in 0..50 {
                        std::hint::spin_loop();
                    }
                    true
                });
                for _ in 0..200 {
                    std::hint::spin_loop();
                }
            }
            d.store(true, Ordering::SeqCst);
        });
        let mut reads = 0u64;
        while !done.load(Ordering::SeqCst) {
            let (pe, co) = stats.pending_and_copied(|| pending.load(Ordering::SeqCst));
            assert_eq!(pe + co, TRACKS, "after {reads} reads");
            reads += 1;
        }
        mover.join().expect("mover");
        assert!(reads > 0);
    }
}
