//! Host access to a pair, one channel per reactor: the primary view (P, with the mirror and the
//! copy before write) and the image view (S standing for P at the split point).
//!
//! Each host request is a small state machine in a slab: it may wait (gate closed by a
//! transition, a track locked by a copy, no staging buffer), copy tracks before it writes, and
//! fan out into sub-requests on the P and S channels of this reactor. Nothing here blocks.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use drivers::{
    Bdev, BdevError, ChannelContext, Geometry, IoBufs, IoChannel, IoCompletion, IoError, IoOp,
    IoRequest, SubmitErrorKind, SubmitResult,
};
use hugepages::{BufferPool, DmaBuf};
use slab::Slab;

use super::{Durability, HostWrite, Pair, PairState};

/// Which side of the pair a view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// P, as hosts write it.
    Primary,
    /// The image: P at the split point (S where copied, P where pending), plus S's own writes.
    Image,
}

/// A pair seen as a bdev (what exports and benchmarks open).
pub struct PairView {
    pair: Arc<Pair>,
    view: View,
    name: String,
}

impl PairView {
    /// The view `view` of `pair`.
    pub fn new(pair: Arc<Pair>, view: View) -> Self {
        let name = match view {
            View::Primary => pair.primary().name().to_string(),
            View::Image => format!("{}-image", pair.name()),
        };
        Self { pair, view, name }
    }
}

impl Bdev for PairView {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> &'static str {
        "pair"
    }

    fn geometry(&self) -> Geometry {
        self.pair.geometry()
    }

    fn open_channel(&self, ctx: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
        let mut ch = PairChannel::new(Arc::clone(&self.pair), self.view, ctx)?;
        ch.host = true;
        Ok(Box::new(ch))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn io_boundary(&self) -> Option<u64> {
        Some(self.pair.track_size())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    P,
    S,
}

/// What a finished write records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Post {
    /// PAIR/COPY: the tracks become pending for the copier.
    Mirror,
    /// PSUS/PSUE: P changed since the split.
    ChangedP,
    /// PSUS: S changed since the split.
    ChangedS,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started or waiting to retry.
    Start,
    /// Sub-reads in flight; `bounce` when data lands in staging buffers first.
    Reading {
        bounce: bool,
    },
    /// Copying track `cow[cow_next]` P to S before the write: reading P, then writing S.
    CowRead,
    CowWrite,
    /// The host's own operation on its target.
    TargetIo,
    /// Flushing P and S.
    Flushing,
    /// Waiting for the metadata the write needs to be durable.
    MetaWait,
}

/// Sub-request ids: low bits of the inner tag.
const SUB_BITS: u32 = 20;
const SUB_MASK: u64 = (1 << SUB_BITS) - 1;
const SUB_ALL: u64 = SUB_MASK;
const SUB_COW: u64 = SUB_MASK - 1;
const SUB_NODATA: u64 = SUB_MASK - 2;
const SUB_BOUNCE: u64 = 1 << 19;
/// Staging buffers per channel (copy before write, bounce reads).
const STAGING_BUFFERS: usize = 16;

struct Parent {
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    bufs: Vec<Option<DmaBuf>>,
    phase: Phase,
    locked: Vec<u64>,
    gated: bool,
    outstanding: u32,
    error: Option<IoError>,
    bounce: Vec<(Option<DmaBuf>, u64)>,
    cow: Vec<u64>,
    cow_next: usize,
    cow_buf: Option<DmaBuf>,
    target: Target,
    post: Option<Post>,
    /// Counted as a mirrored write in flight on its tracks.
    counted: bool,
    /// What the write needs persisted before it is issued.
    durable: Option<HostWrite>,
}

enum Step {
    /// Issued or completed; nothing to do until completions arrive.
    Running,
    /// Could not proceed now; retry on a later poll.
    Wait,
}

/// One reactor's channel to a pair view.
pub struct PairChannel {
    pair: Arc<Pair>,
    view: View,
    p: Box<dyn IoChannel>,
    s: Box<dyn IoChannel>,
    staging: Option<BufferPool>,
    parents: Slab<Parent>,
    deferred: VecDeque<usize>,
    /// Writes waiting for their metadata to be durable.
    meta_waiting: VecDeque<usize>,
    retry: VecDeque<(Target, IoRequest)>,
    done: Vec<IoCompletion>,
    scratch: Vec<IoCompletion>,
    cpu_copied: u64,
    /// A host's channel (an export's, a benchmark's), not the engine's own (a backup's):
    /// its requests count as host activity.
    host: bool,
}

impl PairChannel {
    /// Payload bytes this channel copied with the CPU (reads whose buffers mixed P and S).
    pub fn cpu_copied_bytes(&self) -> u64 {
        self.cpu_copied
    }

    /// Opens channels to P and S on the calling reactor.
    pub fn new(pair: Arc<Pair>, view: View, ctx: &ChannelContext) -> Result<Self, BdevError> {
        let p = pair.primary().open_channel(ctx)?;
        let s = pair.secondary().open_channel(ctx)?;
        Ok(Self {
            pair,
            view,
            p,
            s,
            staging: None,
            parents: Slab::new(),
            deferred: VecDeque::new(),
            meta_waiting: VecDeque::new(),
            retry: VecDeque::new(),
            done: Vec::new(),
            scratch: Vec::new(),
            cpu_copied: 0,
            host: false,
        })
    }

    fn staging(&mut self) -> Option<DmaBuf> {
        if self.staging.is_none() {
            match BufferPool::new(self.pair.track_size() as usize, STAGING_BUFFERS) {
                Ok(p) => self.staging = Some(p),
                Err(e) => {
                    tracing::error!(%e, "no staging memory for a pair channel");
                    return None;
                }
            }
        }
        self.staging.as_ref().and_then(BufferPool::get)
    }

    fn inner(&mut self, t: Target) -> &mut Box<dyn IoChannel> {
        match t {
            Target::P => &mut self.p,
            Target::S => &mut self.s,
        }
    }

    fn issue(&mut self, key: usize, t: Target, mut req: IoRequest, sub: u64) {
        req.tag = (key as u64) << SUB_BITS | sub;
        if let Some(p) = self.parents.get_mut(key) {
            p.outstanding += 1;
        }
        if !self.retry.is_empty() {
            self.retry.push_back((t, req));
            return;
        }
        if let Err(req) = self.submit_inner(t, req) {
            self.retry.push_back((t, req));
        }
    }

    /// Submits to P or S. A refused request completes with its error at once; a full queue
    /// gives the request back to be retried.
    fn submit_inner(&mut self, t: Target, req: IoRequest) -> Result<(), IoRequest> {
        let Err(e) = self.inner(t).submit(req) else {
            return Ok(());
        };
        let e = *e;
        match e.error {
            SubmitErrorKind::QueueFull => return Err(e.req),
            SubmitErrorKind::Invalid(err) => self.inner_done(
                t,
                IoCompletion {
                    tag: e.req.tag,
                    result: Err(err),
                    bufs: e.req.bufs,
                },
            ),
        }
        Ok(())
    }

    fn take_all_bufs(p: &mut Parent) -> IoBufs {
        p.bufs.iter_mut().filter_map(Option::take).collect()
    }

    /// Starts (or retries) a request.
    fn start(&mut self, key: usize) -> Step {
        let (op, view) = (self.parents[key].op, self.view);
        match (view, op) {
            (_, IoOp::Flush) => {
                self.parents[key].phase = Phase::Flushing;
                for t in [Target::P, Target::S] {
                    self.issue(
                        key,
                        t,
                        IoRequest::without_data(IoOp::Flush, 0, 0, 0),
                        SUB_NODATA,
                    );
                }
                Step::Running
            }
            (View::Primary, IoOp::Read) => {
                if self.pair.reversing() {
                    let pair = Arc::clone(&self.pair);
                    self.read_routed(key, &|t| {
                        if pair.restore.contains(t) {
                            Target::S
                        } else {
                            Target::P
                        }
                    })
                } else {
                    let p = &mut self.parents[key];
                    p.phase = Phase::Reading { bounce: false };
                    let bufs = Self::take_all_bufs(p);
                    let req = IoRequest::read(p.offset, bufs, 0);
                    self.issue(key, Target::P, req, SUB_ALL);
                    Step::Running
                }
            }
            (View::Image, IoOp::Read) => self.image_read(key),
            (View::Primary, _) => self.host_write(key, Target::P),
            (View::Image, _) => self.host_write(key, Target::S),
        }
    }

    fn refuse(&mut self, key: usize, msg: String) -> Step {
        self.parents[key].error = Some(IoError::Refused(msg));
        self.finish(key);
        Step::Running
    }

    /// A host write to P (primary view) or S (image view).
    fn host_write(&mut self, key: usize, target: Target) -> Step {
        if !self.pair.enter_gate() {
            return Step::Wait;
        }
        if target == Target::S {
            // A backup running on the image reads these tracks first. (Checked inside the gate:
            // a backup starts through the gate, after the S writes in flight have drained.)
            let p = &self.parents[key];
            if self.pair.backup_holds(self.pair.tracks_of(p.offset, p.len)) {
                self.pair.leave_gate();
                return Step::Wait;
            }
        }
        self.parents[key].gated = true;
        let tracks = {
            let p = &self.parents[key];
            self.pair.tracks_of(p.offset, p.len)
        };
        let mut state = self.pair.state();
        if target == Target::P
            && matches!(state, PairState::Copy | PairState::Pair)
            && !self.pair.reversing()
        {
            // A mirrored write counts itself on its tracks before it trusts the state, so a
            // split that lands meanwhile sees it and post-split users of those tracks wait for
            // it (it is then wholly in the image).
            self.pair.begin_mirrored_write(tracks.clone());
            state = self.pair.state();
            if matches!(state, PairState::Copy | PairState::Pair) {
                self.parents[key].counted = true;
            } else {
                self.pair.end_mirrored_write(tracks.clone());
            }
        }
        let post = match (target, state) {
            (Target::P, PairState::Copy) if self.pair.reversing() => {
                return self.refuse(
                    key,
                    format!(
                        "pair '{}' is restoring P from S: P is read-only until the pair is in PAIR",
                        self.pair.name()
                    ),
                );
            }
            (Target::P, PairState::Copy | PairState::Pair) => Post::Mirror,
            (Target::P, PairState::Psus | PairState::Psue) => Post::ChangedP,
            (Target::S, PairState::Psus) => Post::ChangedS,
            (Target::S, _) => {
                return self.refuse(
                    key,
                    format!(
                        "the image of pair '{}' is writable only while the pair is split (PSUS), \
                         not in {}",
                        self.pair.name(),
                        state.as_str()
                    ),
                );
            }
        };
        // A write relies on the state it saw: it waits until that state is durable.
        if !self.pair.state_durable() {
            if self.parents[key].counted {
                self.pair.end_mirrored_write(tracks.clone());
                self.parents[key].counted = false;
            }
            self.ungate(key);
            if let Some(e) = self.pair.metadata().and_then(|m| m.failure()) {
                return self.fail_unpersisted(key, e);
            }
            return Step::Wait;
        }
        let p = &mut self.parents[key];
        p.target = target;
        p.post = Some(post);
        p.durable = Some(match post {
            Post::Mirror => HostWrite::Mirror,
            Post::ChangedP => HostWrite::ChangedP {
                split: state == PairState::Psus,
            },
            Post::ChangedS => HostWrite::ChangedS,
        });
        if state != PairState::Psus {
            return self.write_when_durable(key);
        }
        // Writes mirrored before the split and still in flight belong to the image: wait for
        // them before looking at the tracks.
        if self.pair.mirrored_writes_in_flight(tracks.clone()) {
            self.ungate(key);
            return Step::Wait;
        }
        // Copy before write: every pending track the write touches is copied P to S first,
        // under its lock, so the image keeps P's data of the split point.
        if !self.lock_pending(key, tracks) {
            self.ungate(key);
            return Step::Wait;
        }
        let p = &mut self.parents[key];
        p.cow = p.locked.clone();
        p.cow_next = 0;
        if p.cow.is_empty() {
            return self.write_when_durable(key);
        }
        match self.staging() {
            Some(buf) => self.parents[key].cow_buf = Some(buf),
            None => {
                self.release_locks(key);
                self.ungate(key);
                return Step::Wait;
            }
        }
        self.cow_read(key);
        Step::Running
    }

    /// Locks the pending tracks among `tracks`; keeps only those still pending once locked.
    /// False (nothing held) if one is locked by someone else.
    fn lock_pending(&mut self, key: usize, tracks: std::ops::Range<u64>) -> bool {
        let pair = Arc::clone(&self.pair);
        let p = &mut self.parents[key];
        for t in tracks {
            if !pair.pending.is_pending(t) {
                continue;
            }
            if !pair.locks.try_lock(t) {
                for &l in &p.locked {
                    pair.unlock_track(l);
                }
                p.locked.clear();
                return false;
            }
            if pair.pending.is_pending(t) {
                p.locked.push(t);
            } else {
                pair.unlock_track(t);
            }
        }
        true
    }

    fn release_locks(&mut self, key: usize) {
        let p = &mut self.parents[key];
        for t in p.locked.drain(..) {
            self.pair.unlock_track(t);
        }
    }

    fn cow_read(&mut self, key: usize) {
        let p = &mut self.parents[key];
        let track = p.cow[p.cow_next];
        let (off, len) = self.pair.track_range(track);
        let Some(mut buf) = p.cow_buf.take() else {
            return;
        };
        // The staging buffer is one track long; the last track may be shorter.
        let _ = buf.set_len(len as usize);
        p.phase = Phase::CowRead;
        let mut bufs = IoBufs::new();
        bufs.push(buf);
        self.issue(key, Target::P, IoRequest::read(off, bufs, 0), SUB_COW);
    }

    fn cow_write(&mut self, key: usize) {
        let p = &mut self.parents[key];
        let track = p.cow[p.cow_next];
        let (off, _) = self.pair.track_range(track);
        let Some(buf) = p.cow_buf.take() else {
            return;
        };
        p.phase = Phase::CowWrite;
        let mut bufs = IoBufs::new();
        bufs.push(buf);
        // Not FUA: the metadata writer flushes S once for all the copies a metadata write
        // relies on (FUA copies through io_uring on ext4 were seen taking tens of ms each).
        self.issue(key, Target::S, IoRequest::write(off, bufs, 0), SUB_COW);
    }

    /// S holds the track: it is no longer pending; unlock it and copy the next one, or write.
    fn cow_track_done(&mut self, key: usize) {
        let pair = Arc::clone(&self.pair);
        let p = &mut self.parents[key];
        let track = p.cow[p.cow_next];
        let (_, len) = pair.track_range(track);
        pair.stats.move_to_copied(|| {
            pair.pending.clear(track);
            true
        });
        pair.stats.cow_copies.fetch_add(1, Ordering::Relaxed);
        pair.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
        pair.stats.bytes_copied.fetch_add(len, Ordering::Relaxed);
        p.locked.retain(|&t| t != track);
        pair.unlock_track(track);
        p.cow_next += 1;
        if p.cow_next < p.cow.len() {
            self.cow_read(key);
        } else {
            self.parents[key].cow_buf = None;
            self.write_when_durable(key);
        }
    }

    /// Persists what the write needs (write-intent, changed and pending bits, see
    /// [`super::metadata`]) and issues it once that is durable.
    fn write_when_durable(&mut self, key: usize) -> Step {
        let p = &self.parents[key];
        let Some(kind) = p.durable else {
            return self.target_io(key);
        };
        let tracks = self.pair.tracks_of(p.offset, p.len);
        self.pair.prepare_write(kind, tracks);
        self.meta_check(key)
    }

    /// Issues a write whose metadata is durable, fails it if the metadata cannot be written, or
    /// keeps it waiting.
    fn meta_check(&mut self, key: usize) -> Step {
        let p = &self.parents[key];
        let (kind, tracks) = match p.durable {
            Some(k) => (k, self.pair.tracks_of(p.offset, p.len)),
            None => return self.target_io(key),
        };
        match self.pair.write_durability(kind, tracks) {
            Durability::Ready => self.target_io(key),
            Durability::Wait => {
                self.parents[key].phase = Phase::MetaWait;
                self.meta_waiting.push_back(key);
                Step::Running
            }
            Durability::Failed(e) => self.fail_unpersisted(key, e),
        }
    }

    /// Fails a write whose metadata can no longer be written.
    fn fail_unpersisted(&mut self, key: usize, error: String) -> Step {
        self.parents[key].error = Some(IoError::Aborted(format!(
            "pair metadata cannot be written: {error}"
        )));
        self.finish(key);
        Step::Running
    }

    /// A write that entered the gate gives up for now (it starts over on a later poll).
    fn ungate(&mut self, key: usize) {
        self.pair.leave_gate();
        self.parents[key].gated = false;
    }

    fn target_io(&mut self, key: usize) -> Step {
        let p = &mut self.parents[key];
        tracing::trace!(pair = %self.pair.name(), offset = p.offset, len = p.len, post = ?p.post, "host write issued");
        p.phase = Phase::TargetIo;
        let (op, offset, len, target) = (p.op, p.offset, p.len, p.target);
        let req = if op.has_data() {
            let bufs = Self::take_all_bufs(p);
            let mut r = IoRequest::write(offset, bufs, 0);
            r.op = op;
            r
        } else {
            IoRequest::without_data(op, offset, len, 0)
        };
        let sub = if op.has_data() { SUB_ALL } else { SUB_NODATA };
        self.issue(key, target, req, sub);
        Step::Running
    }

    /// A read of the image: S for tracks copied, P (under the track's lock) for tracks pending.
    fn image_read(&mut self, key: usize) -> Step {
        if self.pair.state() == PairState::Psue {
            return self.refuse(
                key,
                format!(
                    "pair '{}' is suspended on an error (PSUE): its image is not valid",
                    self.pair.name()
                ),
            );
        }
        let (off, len) = (self.parents[key].offset, self.parents[key].len);
        let tracks = self.pair.tracks_of(off, len);
        // After a split, writes mirrored before it and still in flight belong to the image: wait
        // for them. (Before a split the image is not defined and a read does not wait, so busy
        // tracks cannot starve it.)
        if self.pair.state() == PairState::Psus
            && self.pair.mirrored_writes_in_flight(tracks.clone())
        {
            return Step::Wait;
        }
        if !self.lock_pending(key, tracks) {
            return Step::Wait;
        }
        let locked = self.parents[key].locked.clone();
        let step = self.read_routed(key, &|t| {
            if locked.contains(&t) {
                Target::P
            } else {
                Target::S
            }
        });
        if matches!(step, Step::Wait) {
            self.release_locks(key);
        }
        step
    }

    /// Reads each part of the request from the side `source` names for its track. Buffers that
    /// lie within one source go straight to that side; otherwise the data lands in staging
    /// buffers first and is copied (counted) into the host's buffers.
    fn read_routed(&mut self, key: usize, source: &dyn Fn(u64) -> Target) -> Step {
        let ts = self.pair.track_size();
        let p = &self.parents[key];
        let mut off = p.offset;
        let mut direct = true;
        let mut plan = Vec::with_capacity(p.bufs.len());
        for b in p.bufs.iter().flatten() {
            let (first, last) = (off / ts, (off + b.len() as u64 - 1) / ts);
            let src = source(first);
            if (first + 1..=last).any(|t| source(t) != src) {
                direct = false;
                break;
            }
            plan.push((off, src));
            off += b.len() as u64;
        }
        if direct {
            // Consecutive buffers from one side go as one vectored read; its sub id is the index
            // of its first buffer, and the buffers come back in order from there.
            self.parents[key].phase = Phase::Reading { bounce: false };
            let mut i = 0;
            while i < plan.len() {
                let (off, src) = plan[i];
                let mut j = i + 1;
                while j < plan.len() && plan[j].1 == src {
                    j += 1;
                }
                let bufs: IoBufs = self.parents[key].bufs[i..j]
                    .iter_mut()
                    .filter_map(Option::take)
                    .collect();
                self.issue(key, src, IoRequest::read(off, bufs, 0), i as u64);
                i = j;
            }
            return Step::Running;
        }
        // Bounce: one staging buffer per track piece.
        let (start, end) = (p.offset, p.offset + p.len);
        let pieces = self.pair.tracks_of(start, p.len);
        if pieces.end - pieces.start > STAGING_BUFFERS as u64 {
            return self.refuse(
                key,
                format!(
                    "a read crossing {} track boundaries must split its buffers on the {} byte \
                     tracks",
                    pieces.end - pieces.start - 1,
                    ts
                ),
            );
        }
        let mut staged = Vec::new();
        for t in pieces {
            let (lo, hi) = ((t * ts).max(start), ((t + 1) * ts).min(end));
            match self.staging() {
                Some(mut buf) => {
                    let _ = buf.set_len((hi - lo) as usize);
                    staged.push((buf, lo, source(t)));
                }
                None => return Step::Wait,
            }
        }
        self.parents[key].phase = Phase::Reading { bounce: true };
        for (i, (buf, lo, src)) in staged.into_iter().enumerate() {
            self.parents[key].bounce.push((None, lo));
            let mut bufs = IoBufs::new();
            bufs.push(buf);
            self.issue(
                key,
                src,
                IoRequest::read(lo, bufs, 0),
                SUB_BOUNCE + i as u64,
            );
        }
        Step::Running
    }

    /// Copies staged pieces into the host's buffers.
    fn unbounce(&mut self, key: usize) {
        let p = &mut self.parents[key];
        let mut copied = 0u64;
        for (piece, lo) in &p.bounce {
            let Some(piece) = piece else { continue };
            let mut src = piece.as_slice();
            let mut pos = *lo - p.offset;
            let mut buf_start = 0u64;
            for b in p.bufs.iter_mut().flatten() {
                let blen = b.len() as u64;
                if src.is_empty() {
                    break;
                }
                if pos < buf_start + blen && pos >= buf_start {
                    let at = (pos - buf_start) as usize;
                    let n = (b.len() - at).min(src.len());
                    b.as_mut_slice()[at..at + n].copy_from_slice(&src[..n]);
                    src = &src[n..];
                    pos += n as u64;
                    copied += n as u64;
                }
                buf_start += blen;
            }
        }
        p.bounce.clear();
        self.cpu_copied += copied;
        self.pair
            .stats
            .cpu_copied_bytes
            .fetch_add(copied, Ordering::Relaxed);
    }

    fn inner_done(&mut self, t: Target, c: IoCompletion) {
        let key = (c.tag >> SUB_BITS) as usize;
        let sub = c.tag & SUB_MASK;
        let Some(p) = self.parents.get_mut(key) else {
            tracing::error!(
                tag = c.tag,
                "pair channel: completion for an unknown request"
            );
            return;
        };
        p.outstanding = p.outstanding.saturating_sub(1);
        let mut bufs = c.bufs.into_iter();
        match sub {
            SUB_ALL => {
                for slot in p.bufs.iter_mut() {
                    *slot = bufs.next();
                }
            }
            SUB_COW => p.cow_buf = bufs.next(),
            SUB_NODATA => {}
            s if s >= SUB_BOUNCE => {
                if let Some(piece) = p.bounce.get_mut((s - SUB_BOUNCE) as usize) {
                    piece.0 = bufs.next();
                }
            }
            first => {
                for (slot, buf) in p.bufs.iter_mut().skip(first as usize).zip(bufs) {
                    *slot = Some(buf);
                }
            }
        }
        if let Err(e) = c.result {
            if matches!(e, IoError::Device(_) | IoError::Aborted(_)) {
                let side = if t == Target::P {
                    "primary"
                } else {
                    "secondary"
                };
                self.pair.fail(format!("I/O error on the {side}: {e}"));
            }
            p.error.get_or_insert(e);
        }
        if p.outstanding > 0 {
            return;
        }
        if p.error.is_some() {
            self.finish(key);
            return;
        }
        match p.phase {
            Phase::CowRead => self.cow_write(key),
            Phase::CowWrite => {
                // Noted before the track stops being pending: metadata relying on the copy
                // flushes S first.
                self.pair.note_write(false);
                self.cow_track_done(key)
            }
            Phase::Reading { bounce } => {
                if bounce {
                    self.unbounce(key);
                }
                self.finish(key);
            }
            Phase::TargetIo => {
                if p.op.is_write() {
                    self.pair.note_write(p.target == Target::P);
                }
                self.record_write(key);
                self.finish(key);
            }
            Phase::Flushing | Phase::Start | Phase::MetaWait => self.finish(key),
        }
    }

    /// Records a finished write in the pair's track sets.
    fn record_write(&mut self, key: usize) {
        let p = &self.parents[key];
        let tracks = self.pair.tracks_of(p.offset, p.len);
        match p.post {
            Some(Post::Mirror) => {
                let mut newly = false;
                tracing::trace!(pair = %self.pair.name(), ?tracks, "mirrored write done");
                for t in tracks {
                    newly |= self.pair.pending.mark_written(t);
                }
                if newly {
                    self.pair.wake_copier();
                }
            }
            Some(Post::ChangedP) => tracks.for_each(|t| {
                self.pair.changed_p.insert(t);
            }),
            Some(Post::ChangedS) => tracks.for_each(|t| {
                self.pair.changed_s.insert(t);
            }),
            None => {}
        }
    }

    fn finish(&mut self, key: usize) {
        self.release_locks(key);
        let mut p = self.parents.remove(key);
        if p.counted {
            // After the tracks were marked pending (record_write): from now on a post-split
            // user sees them pending.
            self.pair
                .end_mirrored_write(self.pair.tracks_of(p.offset, p.len));
        }
        if p.gated {
            self.pair.leave_gate();
        }
        let result = match p.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.done.push(IoCompletion {
            tag: p.tag,
            result,
            bufs: p.bufs.into_iter().flatten().collect(),
        });
    }
}

impl IoChannel for PairChannel {
    fn submit(&mut self, req: IoRequest) -> SubmitResult {
        if let Err(e) = self.pair.geometry().validate(&req) {
            return drivers::bdev::invalid(req, e);
        }
        if self.pair.is_deleted() {
            return drivers::bdev::invalid(req, IoError::Aborted("the pair was deleted".into()));
        }
        if self.host {
            self.pair
                .stats
                .host_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        if req.bufs.len() as u64 >= SUB_BOUNCE {
            let n = req.bufs.len();
            return drivers::bdev::invalid(
                req,
                IoError::BufferMismatch {
                    buffers: n as u64,
                    len: SUB_BOUNCE,
                },
            );
        }
        let key = self.parents.insert(Parent {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            len: req.len,
            bufs: req.bufs.into_iter().map(Some).collect(),
            phase: Phase::Start,
            locked: Vec::new(),
            gated: false,
            outstanding: 0,
            error: None,
            bounce: Vec::new(),
            cow: Vec::new(),
            cow_next: 0,
            cow_buf: None,
            target: Target::P,
            post: None,
            counted: false,
            durable: None,
        });
        if let Step::Wait = self.start(key) {
            self.deferred.push_back(key);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        // Inner submissions that found a full queue go first, in order.
        while let Some((t, req)) = self.retry.pop_front() {
            if let Err(req) = self.submit_inner(t, req) {
                self.retry.push_front((t, req));
                break;
            }
        }
        for _ in 0..self.deferred.len() {
            let Some(key) = self.deferred.pop_front() else {
                break;
            };
            if self.pair.is_deleted() {
                self.parents[key].error = Some(IoError::Aborted("the pair was deleted".into()));
                self.finish(key);
                continue;
            }
            if let Step::Wait = self.start(key) {
                self.deferred.push_back(key);
            }
        }
        for _ in 0..self.meta_waiting.len() {
            let Some(key) = self.meta_waiting.pop_front() else {
                break;
            };
            if self.pair.is_deleted() {
                self.parents[key].error = Some(IoError::Aborted("the pair was deleted".into()));
                self.finish(key);
                continue;
            }
            let _ = self.meta_check(key);
        }
        for t in [Target::P, Target::S] {
            let mut scratch = std::mem::take(&mut self.scratch);
            self.inner(t).poll(&mut scratch);
            for c in scratch.drain(..) {
                self.inner_done(t, c);
            }
            self.scratch = scratch;
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn in_flight(&self) -> usize {
        self.parents.len() + self.done.len()
    }
}
