//! The verification job: a poller that reads each track of P and S into staging buffers,
//! under the track's lock, compares them, and with `repair` makes mismatched tracks pending
//! again. A track both sides' allocation says reads as zeroes (holes of thin volumes) is equal
//! without reading, and takes none of the rate. It goes at the verification's rate, slower and
//! with fewer reads in flight while hosts use the pair, and never blocks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::{Extent, IoBufs, IoChannel, IoCompletion, IoRequest, SubmitErrorKind};
use hugepages::{BufferPool, DmaBuf};
use slab::Slab;

use super::{Verify, VerifyState};
use crate::pair::zero_copy::{tracks_of_zeroes_on_both, DataAhead};
use crate::pair::{Durability, HostWatch, Pair, PairState};
use crate::rate::{effective_rate, TokenBucket};
use crate::reactor::{PollStatus, Poller, ReactorContext};

/// Bytes of each side being read at once when no host uses the pair.
const WINDOW: u64 = 8 << 20;
/// The same while hosts use the pair (one track of the default size): a host request never
/// queues behind more than a track's reads.
const HOST_WINDOW: u64 = 64 << 10;
/// Most tracks compared at once.
const MAX_DEPTH: u64 = 64;
/// Most tracks looked at per poll (pending ones are skipped without I/O), so that a pair
/// with everything pending does not hold the reactor.
const SCAN_PER_POLL: usize = 4096;

/// Tracks compared at once within `window` bytes per side.
fn depth(window: u64, track_size: u64) -> usize {
    (window / track_size).clamp(1, MAX_DEPTH) as usize
}

/// True while P and S must be equal on every track that is not pending.
fn mirroring(pair: &Pair) -> bool {
    match pair.state() {
        PairState::Pair => true,
        PairState::Copy => !pair.reversing(),
        PairState::Psus | PairState::Psue => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    P = 0,
    S = 1,
}

/// One track being compared: its lock is held until both reads are back.
struct Check {
    track: u64,
    bufs: [Option<DmaBuf>; 2],
    outstanding: u8,
    error: Option<String>,
}

/// The verification job of one pair.
pub struct VerifyJob {
    verify: Arc<Verify>,
    pair: Arc<Pair>,
    name: String,
    p: Option<Box<dyn IoChannel>>,
    s: Option<Box<dyn IoChannel>>,
    pool: BufferPool,
    checks: Slab<Check>,
    /// Reads the channel had no room for, submitted again on the next poll.
    unsent: VecDeque<(Side, IoRequest)>,
    /// The next track not looked at yet.
    cursor: u64,
    /// Tracks that were locked (being copied) when their turn came.
    later: VecDeque<u64>,
    /// Mismatched tracks waiting for their pending bit to be durable.
    repairs: Vec<u64>,
    bucket: TokenBucket,
    hosts: HostWatch,
    /// Held back for hosts (counted once per stretch).
    yielding: bool,
    /// Ending in this state, once the reads in flight are back.
    ending: Option<(VerifyState, Option<String>)>,
    done: Vec<IoCompletion>,
    runs: [Vec<Extent>; 2],
    /// Data seen ahead on P and on S.
    data_ahead: [DataAhead; 2],
}

impl VerifyJob {
    /// The staging buffers a verification of `pair` compares in. Made by the caller, off the
    /// reactor (mapping fresh memory takes milliseconds that hosts would wait through).
    pub fn staging_pool(pair: &Pair) -> Result<BufferPool, String> {
        let ts = pair.track_size();
        BufferPool::new(ts as usize, 2 * depth(WINDOW, ts)).map_err(|e| e.to_string())
    }

    /// A job for `verify` of `pair`, comparing in `pool` (from [`VerifyJob::staging_pool`]).
    pub fn new(verify: Arc<Verify>, pair: Arc<Pair>, pool: BufferPool) -> Self {
        let hosts = HostWatch::new(&pair);
        Self {
            name: format!("verify:{}", verify.id),
            verify,
            pair,
            p: None,
            s: None,
            pool,
            checks: Slab::new(),
            unsent: VecDeque::new(),
            cursor: 0,
            later: VecDeque::new(),
            repairs: Vec::new(),
            bucket: TokenBucket::default(),
            hosts,
            yielding: false,
            ending: None,
            done: Vec::new(),
            runs: [Vec::new(), Vec::new()],
            data_ahead: Default::default(),
        }
    }

    fn open(&mut self, cx: &ReactorContext) -> Result<(), String> {
        let depth = depth(WINDOW, self.pair.track_size()) as u32;
        let ctx = cx.channel_context(2 * depth);
        self.p = Some(
            self.pair
                .primary()
                .open_channel(&ctx)
                .map_err(|e| e.to_string())?,
        );
        self.s = Some(
            self.pair
                .secondary()
                .open_channel(&ctx)
                .map_err(|e| e.to_string())?,
        );
        Ok(())
    }

    fn channel(&mut self, side: Side) -> Option<&mut Box<dyn IoChannel>> {
        match side {
            Side::P => self.p.as_mut(),
            Side::S => self.s.as_mut(),
        }
    }

    fn fail(&mut self, error: String) {
        if self.ending.is_none() {
            tracing::warn!(verify = self.verify.id, %error, "verification failed");
            self.ending = Some((VerifyState::Failed, Some(error)));
        }
    }

    /// Ends the job when it was cancelled or its pair no longer holds P and S equal.
    fn check_pair(&mut self) {
        if self.ending.is_some() {
            return;
        }
        if self.verify.cancelled() {
            self.ending = Some((VerifyState::Cancelled, Some("cancelled".into())));
        } else if self.pair.is_deleted() {
            self.fail(format!("pair '{}' was deleted", self.pair.name()));
        } else if !mirroring(&self.pair) {
            let state = self.pair.state();
            let why = match (state, self.pair.error()) {
                (PairState::Psue, Some(e)) => format!(" ({e})"),
                _ => String::new(),
            };
            self.fail(format!(
                "pair '{}' left PAIR: it is in {}{why}; P and S need not be equal any more",
                self.pair.name(),
                state.as_str()
            ));
        }
    }

    /// True when `bytes` may be compared now under the rate, and under the rate for while
    /// hosts use the pair.
    fn within_rate(&mut self, cx: &mut ReactorContext, bytes: u64, hosts: bool) -> bool {
        let rate = effective_rate(self.verify.rate, self.verify.host_rate, hosts);
        if rate == 0 {
            self.bucket.reset();
        }
        let ok = self.bucket.take(cx, rate, bytes);
        if !ok && rate != self.verify.rate {
            self.note_yield();
        }
        ok
    }

    fn note_yield(&mut self) {
        if !self.yielding && self.hosts.seen_any() {
            self.yielding = true;
            self.verify.note_yield();
        }
    }

    /// Submits a read, or keeps it for the next poll when the channel is full.
    fn submit(&mut self, side: Side, req: IoRequest) {
        if !self.unsent.is_empty() {
            self.unsent.push_back((side, req));
            return;
        }
        let Some(ch) = self.channel(side) else { return };
        if let Err(e) = ch.submit(req) {
            let e = *e;
            match e.error {
                SubmitErrorKind::QueueFull => self.unsent.push_back((side, e.req)),
                SubmitErrorKind::Invalid(err) => self.completed(IoCompletion {
                    tag: e.req.tag,
                    result: Err(err),
                    bufs: e.req.bufs,
                }),
            }
        }
    }

    fn resubmit(&mut self) {
        while let Some((side, req)) = self.unsent.pop_front() {
            let Some(ch) = self.channel(side) else { return };
            if let Err(e) = ch.submit(req) {
                let e = *e;
                match e.error {
                    SubmitErrorKind::QueueFull => {
                        self.unsent.push_front((side, e.req));
                        return;
                    }
                    SubmitErrorKind::Invalid(err) => self.completed(IoCompletion {
                        tag: e.req.tag,
                        result: Err(err),
                        bufs: e.req.bufs,
                    }),
                }
            }
        }
    }

    /// Starts comparing tracks, as many as the depth, the rate and the buffers allow; true
    /// when it went past any track (the job has more to do at once).
    fn issue(&mut self, cx: &mut ReactorContext) -> bool {
        let ts = self.pair.track_size();
        // `host_rate` 0: no holding back for hosts at all.
        let hosts = self.verify.host_rate != 0 && self.hosts.active(&self.pair);
        let depth = if hosts {
            depth(HOST_WINDOW, ts)
        } else {
            depth(WINDOW, ts)
        };
        let mut looked = 0;
        let retries = self.later.len();
        while looked < SCAN_PER_POLL {
            let from_later = looked < retries && !self.later.is_empty();
            let t = match (from_later, self.later.front()) {
                (true, Some(&t)) => t,
                _ if self.cursor < self.pair.tracks() => self.cursor,
                _ => break,
            };
            let advance = |job: &mut Self| {
                if from_later {
                    job.later.pop_front();
                } else {
                    job.cursor += 1;
                }
            };
            // A pending track is being brought up to date: P and S need not be equal there.
            if self.pair.pending.is_pending(t) {
                advance(self);
                looked += 1;
                self.verify.note_track(0);
                continue;
            }
            if self.checks.len() >= depth {
                if hosts {
                    self.note_yield();
                }
                break;
            }
            if self.pool.available() < 2 {
                break;
            }
            // Consecutive tracks from the cursor join a run; a retried one goes alone.
            let run = if from_later {
                1
            } else {
                (SCAN_PER_POLL - looked) as u64
            };
            let equal = self.equal_run_without_reading(t, run);
            if equal > 0 {
                if from_later {
                    self.later.pop_front();
                } else {
                    self.cursor += equal;
                }
                looked += equal as usize;
                continue;
            }
            let (offset, len) = self.pair.track_range(t);
            if !self.within_rate(cx, len, hosts) {
                break;
            }
            advance(self);
            looked += 1;
            if !self.pair.locks.try_lock(t) {
                // The copier is copying it: looked at again later.
                self.later.push_back(t);
                continue;
            }
            // Under the lock nothing clears the track's pending bit; a write to P in flight on
            // it marks it pending when done.
            if self.pair.pending.is_pending(t) || self.pair.mirrored_writes_in_flight(t..t + 1) {
                self.pair.unlock_track(t);
                self.verify.note_track(0);
                continue;
            }
            self.start_check(t, offset, len);
            self.yielding = false;
        }
        looked > 0
    }

    /// Compares without reading the tracks from `first` on (at most `max`) that P's and S's
    /// allocation both say read as zeroes: equal. `first` is looked up alone; when it reads as
    /// zeroes, the tracks after it join a run that one lookup a side answers for. Each track is
    /// locked and checked before and after, as for a read. How many tracks it went through
    /// (each noted); 0 when `first` must be read (or is locked, being copied).
    fn equal_run_without_reading(&mut self, first: u64, max: u64) -> u64 {
        let (offset, len) = self.pair.track_range(first);
        if self.data_ahead.iter().any(|a| a.covers(offset, len)) {
            return 0;
        }
        let n = self.equal_tracks_without_reading(first, 1);
        if n == 0 {
            // Data on one side at least: how far it runs, so the next tracks skip the lookup.
            let pair = Arc::clone(&self.pair);
            for (ahead, bdev) in self
                .data_ahead
                .iter_mut()
                .zip([pair.primary(), pair.secondary()])
            {
                ahead.look(&**bdev, offset, &mut self.runs[0]);
            }
        }
        if n == 0 || max <= 1 {
            return n;
        }
        n + self.equal_tracks_without_reading(first + 1, max - 1)
    }

    /// Locks up to `max` quiet tracks from `first`, notes the leading ones that read as zeroes
    /// on both sides by one lookup a side, unlocks them all; how many it noted.
    fn equal_tracks_without_reading(&mut self, first: u64, max: u64) -> u64 {
        let pair = Arc::clone(&self.pair);
        let quiet = |t: u64| {
            !pair.pending.is_pending(t)
                && !pair.mirrored_writes_in_flight(t..t + 1)
                && mirroring(&pair)
        };
        let mut end = first;
        while end < pair.tracks() && end - first < max && pair.locks.try_lock(end) {
            if !quiet(end) {
                pair.unlock_track(end);
                break;
            }
            end += 1;
        }
        if end == first {
            return 0;
        }
        let n = tracks_of_zeroes_on_both(&pair, first..end, &mut self.runs);
        for t in first..end {
            if t < first + n {
                // A write that came in meanwhile: nothing to compare.
                let checked = if quiet(t) { pair.track_range(t).1 } else { 0 };
                self.verify.note_track(checked);
            }
            pair.unlock_track(t);
        }
        n
    }

    fn start_check(&mut self, track: u64, offset: u64, len: u64) {
        let key = self.checks.insert(Check {
            track,
            bufs: [None, None],
            outstanding: 2,
            error: None,
        });
        for side in [Side::P, Side::S] {
            let Some(mut buf) = self.pool.get() else {
                // Counted before: cannot happen; ends the check with an error if it does.
                if let Some(c) = self.checks.get_mut(key) {
                    c.outstanding -= 1;
                    c.error = Some("no staging buffer".into());
                }
                continue;
            };
            let _ = buf.set_len(len as usize);
            let mut bufs = IoBufs::new();
            bufs.push(buf);
            let tag = (key as u64) << 1 | side as u64;
            self.submit(side, IoRequest::read(offset, bufs, tag));
        }
        if self.checks.get(key).is_some_and(|c| c.outstanding == 0) {
            self.finish_check(key);
        }
    }

    /// A read came back.
    fn completed(&mut self, c: IoCompletion) {
        let key = (c.tag >> 1) as usize;
        let side = if c.tag & 1 == 0 { Side::P } else { Side::S };
        let Some(check) = self.checks.get_mut(key) else {
            tracing::error!(tag = c.tag, "verification: completion for an unknown read");
            return;
        };
        check.bufs[side as usize] = c.bufs.into_iter().next();
        check.outstanding = check.outstanding.saturating_sub(1);
        if let Err(e) = c.result {
            let device = if side == Side::P {
                "primary"
            } else {
                "secondary"
            };
            check.error.get_or_insert(format!(
                "reading track {} of the {device}: {e}",
                check.track
            ));
        }
        if check.outstanding == 0 {
            self.finish_check(key);
        }
    }

    /// Both reads of a check are back: compares them if no host wrote the track meanwhile.
    fn finish_check(&mut self, key: usize) {
        let check = self.checks.remove(key);
        let t = check.track;
        if let Some(e) = check.error {
            self.pair.unlock_track(t);
            self.fail(e);
            return;
        }
        let written = self.pair.pending.is_pending(t)
            || self.pair.mirrored_writes_in_flight(t..t + 1)
            || !mirroring(&self.pair);
        self.pair.unlock_track(t);
        if written {
            self.verify.note_track(0);
            return;
        }
        let (_, len) = self.pair.track_range(t);
        let equal = match &check.bufs {
            [Some(p), Some(s)] => p.as_slice() == s.as_slice(),
            _ => {
                self.fail(format!("track {t}: a read came back without its buffer"));
                return;
            }
        };
        self.verify.note_track(len);
        if !equal {
            tracing::warn!(pair = %self.pair.name(), track = t, verify = self.verify.id, "S differs from P");
            self.verify.note_mismatch(t);
            if self.verify.repair {
                self.repairs.push(t);
            }
        }
    }

    /// Moves the repairs on: a track whose pending bit is durable is marked pending.
    fn repair(&mut self) -> bool {
        let mut progressed = false;
        let mut i = 0;
        while i < self.repairs.len() {
            match self.pair.mark_for_recopy(self.repairs[i]) {
                Durability::Ready => {
                    self.repairs.swap_remove(i);
                    self.verify.note_repaired();
                    progressed = true;
                }
                Durability::Wait => i += 1,
                Durability::Failed(e) => {
                    self.fail(e);
                    return progressed;
                }
            }
        }
        progressed
    }

    /// Polls both channels; true when reads came back.
    fn reap(&mut self) -> bool {
        self.resubmit();
        let mut any = false;
        for side in [Side::P, Side::S] {
            let mut done = std::mem::take(&mut self.done);
            if let Some(ch) = self.channel(side) {
                ch.poll(&mut done);
            }
            for c in done.drain(..) {
                any = true;
                self.completed(c);
            }
            self.done = done;
        }
        any
    }

    fn end(&mut self, state: VerifyState, error: Option<String>) -> PollStatus {
        let info = self.verify.info();
        tracing::info!(
            verify = self.verify.id,
            pair = %self.pair.name(),
            state = ?state,
            mismatched = info.mismatched_tracks,
            repaired = info.repaired,
            "verification ended"
        );
        self.verify.end(state, error);
        PollStatus::Done
    }
}

impl Poller for VerifyJob {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.p.is_none() || self.s.is_none() {
            if let Err(e) = self.open(cx) {
                return self.end(VerifyState::Failed, Some(format!("opening P and S: {e}")));
            }
        }
        let mut busy = self.reap();
        self.check_pair();
        if self.ending.is_none() {
            busy |= self.issue(cx);
            busy |= self.repair();
        }
        if let Some((state, error)) = self.ending.clone() {
            if self.checks.is_empty() {
                return self.end(state, error);
            }
        } else if self.cursor >= self.pair.tracks()
            && self.later.is_empty()
            && self.checks.is_empty()
            && self.repairs.is_empty()
        {
            return self.end(VerifyState::Done, None);
        }
        if !self.later.is_empty() || !self.repairs.is_empty() {
            // Copies and metadata writes finish on their own reactor: look again shortly.
            cx.wake_at(Instant::now() + Duration::from_millis(1));
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}
