//! The copier: a poller that copies pending tracks P to S (and, during a restore, S to P) in the
//! background, at most `copy_rate` bytes per second unless a backup waits for it, with tracks a
//! backup asks for first.
//!
//! A track whose source stores nothing but zeroes is not read ([`super::zero_copy`]); one read
//! as all zeroes is written as zeroes that keep their space.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use drivers::{Extent, IoBufs, IoChannel, IoCompletion, IoOp, IoRequest, SubmitErrorKind};
use hugepages::{BufferPool, DmaBuf};
use slab::Slab;

use super::zero_copy::{tracks_needing_nothing, zero_copy, DataAhead, ZeroCopy};
use super::{HostWatch, Pair, PairState};
use crate::rate::TokenBucket;
use crate::reactor::{PollStatus, Poller, PollerWaker, ReactorContext};

/// Copies in flight at once in the background (a gentle load next to hosts' I/O).
const COPY_DEPTH: usize = 4;
/// Copies in flight at once while a backup waits for them (`wait` at full speed, `reflect`
/// asking for tracks).
const URGENT_DEPTH: usize = 32;
/// Tracks gone through in one poll at most (holes over holes need no I/O, only lookups).
const TRACKS_PER_POLL: u64 = 512;
/// Tracks one allocation lookup answers for at most when they need nothing written.
const ZERO_RUN: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// P to S (pending tracks).
    Forward = 0,
    /// S to P (restore tracks).
    Reverse = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Reading,
    Writing,
}

struct TrackCopy {
    track: u64,
    dir: Direction,
    stage: Stage,
    /// The source was read (not known to be zeroes from its allocation).
    read: bool,
}

/// The copier poller of one pair.
pub struct Copier {
    pair: Arc<Pair>,
    name: String,
    p: Option<Box<dyn IoChannel>>,
    s: Option<Box<dyn IoChannel>>,
    pool: Option<BufferPool>,
    copies: Slab<TrackCopy>,
    cursor: u64,
    restore_cursor: u64,
    bucket: TokenBucket,
    /// Urgent tracks that were locked when asked for: tried again on the next poll.
    urgent_later: Vec<u64>,
    scratch: Vec<IoCompletion>,
    extents: Vec<Extent>,
    runs: [Vec<Extent>; 2],
    /// Data seen ahead on P (forward) and on S (restores).
    data_ahead: [DataAhead; 2],
    /// Whether hosts use the pair.
    hosts: HostWatch,
}

impl Copier {
    /// A copier for `pair`; channels open on the reactor that polls it.
    pub fn new(pair: Arc<Pair>) -> Self {
        let hosts = HostWatch::new(&pair);
        let name = format!("copier:{}", pair.name());
        Self {
            pair,
            name,
            p: None,
            s: None,
            pool: None,
            copies: Slab::new(),
            cursor: 0,
            restore_cursor: 0,
            bucket: TokenBucket::default(),
            urgent_later: Vec::new(),
            scratch: Vec::new(),
            extents: Vec::new(),
            runs: [Vec::new(), Vec::new()],
            data_ahead: Default::default(),
            hosts,
        }
    }

    fn open(&mut self, cx: &ReactorContext) -> bool {
        if self.p.is_some() {
            return true;
        }
        let ctx = cx.channel_context(URGENT_DEPTH as u32 * 2);
        let opened = (|| {
            let p = self.pair.primary().open_channel(&ctx)?;
            let s = self.pair.secondary().open_channel(&ctx)?;
            let pool = crate::staging::shared_pool(self.pair.track_size() as usize)?;
            Ok::<_, drivers::BdevError>((p, s, pool))
        })();
        match opened {
            Ok((p, s, pool)) => {
                self.p = Some(p);
                self.s = Some(s);
                self.pool = Some(pool);
                true
            }
            Err(e) => {
                self.pair
                    .fail(format!("copier cannot open its channels: {e}"));
                false
            }
        }
    }

    /// Tokens for the rate limit; true if a track may be copied now. A `wait` backup lifts the
    /// limit only while no host uses the pair: hosts then get the background copy they get
    /// with no backup, which finishes the tracks their writes would otherwise copy themselves.
    fn may_copy(&mut self, cx: &mut ReactorContext, bytes: u64) -> bool {
        (self.pair.full_speed.load(Ordering::Relaxed) && !self.hosts.active(&self.pair))
            || self.bucket.take(cx, self.pair.copy_rate(), bytes)
    }

    /// Picks the next track to copy, locked; `None` when nothing can start now.
    fn next_track(&mut self, cx: &mut ReactorContext) -> Option<(u64, Direction)> {
        let pair = Arc::clone(&self.pair);
        // Tracks a backup is waiting for come first, and ignore the rate limit.
        let mut asked: Vec<u64> = std::mem::take(&mut self.urgent_later);
        while let Some(t) = pair.urgent.pop() {
            asked.push(t);
        }
        // In image order (a backup streams that way), each track once: what is kept for later
        // is scanned again on every call.
        asked.sort_unstable();
        asked.dedup();
        let mut found = None;
        for t in asked {
            if found.is_some() || !pair.pending.is_pending(t) {
                if found.is_some() {
                    self.urgent_later.push(t);
                }
                continue;
            }
            if pair.locks.try_lock(t) {
                let pending = pair.pending.is_pending(t);
                if pending && !self.mirrored_write_on(t) {
                    found = Some((t, Direction::Forward));
                } else {
                    pair.unlock_track(t);
                    if pending {
                        self.urgent_later.push(t);
                    }
                }
            } else {
                self.urgent_later.push(t);
            }
        }
        if found.is_some() {
            return found;
        }
        if !self.may_copy(cx, pair.track_size()) {
            return None;
        }
        let tracks = pair.tracks();
        // A restore changes P: only once the checkpoints hold its tracks durably.
        let restoring = pair.restore.count() > 0 && pair.restore_allowed();
        if let Some(t) = restoring
            .then(|| pair.restore.next_member(self.restore_cursor, tracks))
            .flatten()
        {
            self.restore_cursor = t + 1;
            if pair.locks.try_lock(t) {
                if pair.restore.contains(t) {
                    return Some((t, Direction::Reverse));
                }
                pair.unlock_track(t);
            }
        }
        let (t, scanned) = pair.pending.next_pending(self.cursor);
        pair.stats
            .words_scanned
            .fetch_add(scanned, Ordering::Relaxed);
        let t = t?;
        self.cursor = t + 1;
        if pair.locks.try_lock(t) {
            if pair.pending.is_pending(t) && !self.mirrored_write_on(t) {
                return Some((t, Direction::Forward));
            }
            pair.unlock_track(t);
        }
        None
    }

    /// Nothing copying, nothing asked for, nothing pending or to restore.
    fn has_nothing_to_copy(&self) -> bool {
        self.copies.is_empty()
            && self.urgent_later.is_empty()
            && self.pair.urgent.is_empty()
            && self.pair.pending.count() == 0
            && self.pair.restore.count() == 0
    }

    /// After a split, a track with a pre-split write still in flight is copied once that write
    /// is done (copying it earlier would only be undone).
    fn mirrored_write_on(&self, t: u64) -> bool {
        self.pair.state() == PairState::Psus && self.pair.mirrored_writes_in_flight(t..t + 1)
    }

    /// Starts copying `track` (locked), or copies it and the pending tracks after it that need
    /// nothing written; how many tracks that was.
    fn start_copy(&mut self, track: u64, dir: Direction, buf: DmaBuf) -> u64 {
        let (off, len) = self.pair.track_range(track);
        let mut buf = buf;
        let _ = buf.set_len(len as usize);
        if dir == Direction::Forward {
            self.pair.pending.begin_copy(track);
        }
        let (source, destination) = match dir {
            Direction::Forward => (self.pair.primary(), self.pair.secondary()),
            Direction::Reverse => (self.pair.secondary(), self.pair.primary()),
        };
        let ahead = &mut self.data_ahead[dir as usize];
        let without_reading = if ahead.covers(off, len) {
            None
        } else {
            let found = zero_copy(&**source, &**destination, off, len, &mut self.extents);
            if found.is_none() {
                ahead.look(&**source, off, &mut self.extents);
            }
            found
        };
        if without_reading == Some(ZeroCopy::Nothing) {
            self.finish_track(track, dir, false);
            // Holes come in runs: the tracks after it, with one lookup a side.
            let more = match dir {
                Direction::Forward => self.copy_run_needing_nothing(track),
                Direction::Reverse => 0,
            };
            return 1 + more;
        }
        let key = self.copies.insert(TrackCopy {
            track,
            dir,
            stage: Stage::Reading,
            read: without_reading.is_none(),
        });
        if let Some(ZeroCopy::Write(op)) = without_reading {
            drop(buf);
            let req = IoRequest::without_data(op, off, len, key as u64);
            self.write(key, track, dir, req);
            return 1;
        }
        let mut bufs = IoBufs::new();
        bufs.push(buf);
        let req = IoRequest::read(off, bufs, key as u64);
        let ch = match dir {
            Direction::Forward => self.p.as_mut(),
            Direction::Reverse => self.s.as_mut(),
        };
        if let Some(ch) = ch {
            if let Err(e) = ch.submit(req) {
                self.copies.remove(key);
                self.pair.unlock_track(track);
                if let SubmitErrorKind::Invalid(err) = e.error {
                    self.pair
                        .fail(format!("copy of track {track} refused: {err}"));
                }
            }
        }
        1
    }

    fn complete(&mut self, c: IoCompletion, from_p: bool) {
        let key = c.tag as usize;
        let Some(copy) = self.copies.get_mut(key) else {
            return;
        };
        let (track, dir, stage) = (copy.track, copy.dir, copy.stage);
        if let Err(e) = c.result {
            self.copies.remove(key);
            self.pair.unlock_track(track);
            let side = if from_p { "primary" } else { "secondary" };
            self.pair.fail(format!(
                "copy of track {track}: I/O error on the {side}: {e}"
            ));
            return;
        }
        let (off, len) = self.pair.track_range(track);
        match stage {
            Stage::Reading => {
                // Zeroes read (allocated ones: a hole would have been seen before the read)
                // are written as zeroes that keep their space: no data moves.
                let zero = c.bufs.iter().all(|b| is_zero(b.as_slice()));
                let req = if zero {
                    drop(c.bufs);
                    let op = IoOp::WriteZeroes { deallocate: false };
                    IoRequest::without_data(op, off, len, key as u64)
                } else {
                    IoRequest::write(off, c.bufs, key as u64)
                };
                self.write(key, track, dir, req);
            }
            Stage::Writing => self.finish(key),
        }
    }

    /// Copies with no I/O the pending tracks right after `after` (a track that needed nothing)
    /// that need nothing written either ([`tracks_needing_nothing`]): up to [`ZERO_RUN`] of
    /// them are locked and their copies begun, and one allocation lookup a side answers for
    /// all. How many were copied; the run's other tracks are unlocked, still pending.
    fn copy_run_needing_nothing(&mut self, after: u64) -> u64 {
        let pair = Arc::clone(&self.pair);
        // Without a rate limit only: tracks joining the run take no tokens.
        if pair.copy_rate() != 0 {
            return 0;
        }
        let first = after + 1;
        let mut end = first;
        while end < pair.tracks() && end - first < ZERO_RUN && pair.pending.is_pending(end) {
            if !pair.locks.try_lock(end) {
                break;
            }
            if !pair.pending.is_pending(end) || self.mirrored_write_on(end) {
                pair.unlock_track(end);
                break;
            }
            pair.pending.begin_copy(end);
            end += 1;
        }
        if end == first {
            return 0;
        }
        let n = tracks_needing_nothing(&pair, first..end, &mut self.runs);
        for t in first..first + n {
            self.finish_track(t, Direction::Forward, false);
        }
        for t in first + n..end {
            pair.unlock_track(t);
        }
        n
    }

    /// Copy `key` is done: its track is copied (or restored) and unlocked.
    fn finish(&mut self, key: usize) {
        if let Some(copy) = self.copies.try_remove(key) {
            self.finish_track(copy.track, copy.dir, copy.read);
        }
    }

    /// `track` is copied (or restored; `read`: its source was read): marked so and unlocked.
    fn finish_track(&mut self, track: u64, dir: Direction, read: bool) {
        let (_, len) = self.pair.track_range(track);
        // Noted before the track is marked copied: metadata relying on the copy
        // flushes the device first.
        self.pair.note_write(dir == Direction::Reverse);
        let stats = &self.pair.stats;
        if read {
            stats.bytes_read.fetch_add(len, Ordering::Relaxed);
        }
        stats.bytes_copied.fetch_add(len, Ordering::Relaxed);
        match dir {
            Direction::Forward => {
                let pending = &self.pair.pending;
                stats.move_to_copied(|| {
                    let copied = pending.finish_copy(track);
                    tracing::trace!(pair = %self.pair.name(), track, copied, "track copied");
                    copied
                });
            }
            Direction::Reverse => {
                if self.pair.restore.remove(track) {
                    stats.tracks_restored.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.pair.unlock_track(track);
    }

    /// Submits the write of copy `key` (of `track`) to its destination.
    fn write(&mut self, key: usize, track: u64, dir: Direction, req: IoRequest) {
        if let Some(copy) = self.copies.get_mut(key) {
            copy.stage = Stage::Writing;
        }
        let ch = match dir {
            Direction::Forward => self.s.as_mut(),
            Direction::Reverse => self.p.as_mut(),
        };
        if let Some(ch) = ch {
            if let Err(e) = ch.submit(req) {
                self.copies.remove(key);
                self.pair.unlock_track(track);
                self.pair.fail(format!(
                    "copy of track {track}: write refused: {:?}",
                    e.error
                ));
            }
        }
    }
}

/// True when every byte is zero (compared eight bytes at a time).
fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

impl Poller for Copier {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.pair.is_deleted() && self.copies.is_empty() {
            return PollStatus::Done;
        }
        if !self.open(cx) {
            return PollStatus::Done;
        }
        let mut busy = false;
        for from_p in [true, false] {
            let mut scratch = std::mem::take(&mut self.scratch);
            let ch = if from_p {
                self.p.as_mut()
            } else {
                self.s.as_mut()
            };
            if let Some(ch) = ch {
                ch.poll(&mut scratch);
            }
            for c in scratch.drain(..) {
                busy = true;
                self.complete(c, from_p);
            }
            self.scratch = scratch;
        }
        let state = self.pair.state();
        if state == PairState::Psue || self.pair.is_deleted() {
            return if busy {
                PollStatus::Busy
            } else if self.copies.is_empty() {
                // Suspended: a resync (a state change) wakes it.
                PollStatus::Rest(None)
            } else {
                PollStatus::Idle
            };
        }
        let urgent = self.pair.full_speed.load(Ordering::Relaxed)
            || !self.urgent_later.is_empty()
            || !self.pair.urgent.is_empty();
        // Urgent copies go at full depth only while no host uses the pair: host requests
        // must not queue behind a backup's copies.
        let depth = if urgent && !self.hosts.active(&self.pair) {
            URGENT_DEPTH
        } else {
            COPY_DEPTH
        };
        // Tracks with nothing to write finish at once: a bound keeps a poll short.
        let mut started = 0;
        while self.copies.len() < depth && started < TRACKS_PER_POLL {
            let Some(buf) = self.pool.as_ref().and_then(BufferPool::get) else {
                break;
            };
            match self.next_track(cx) {
                Some((t, dir)) => {
                    started += self.start_copy(t, dir, buf);
                    busy = true;
                }
                None => break,
            }
        }
        if self.copies.is_empty() && state == PairState::Copy {
            self.pair.copy_finished();
        }
        if !self.urgent_later.is_empty() {
            busy = true;
        }
        if busy {
            PollStatus::Busy
        } else if self.has_nothing_to_copy() {
            // New pending tracks, a backup's request and state changes wake it.
            PollStatus::Rest(None)
        } else {
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn attach_waker(&mut self, waker: PollerWaker) {
        self.pair.set_copier_waker(waker);
    }
}
