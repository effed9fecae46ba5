//! Host access to a pair, one channel per reactor: the primary view (P, with the mirror and the
//! copy before write) and the image view (S standing for P at the split point).
//!
//! Each host request is a small state machine in a slab: it may wait (gate closed by a
//! transition, a track locked by a copy, no staging buffer), copy tracks before it writes, and
//! fan out into sub-requests on the P and S channels of this reactor. Nothing here blocks.
//!
//! Where things are: this file holds the view, the request state and what every request goes
//! through (submission to P and S, completions, finishing); `read.rs` the reads of P and of the
//! image; `write.rs` the host writes (the gate, the state a write relies on, its metadata, its
//! track sets); `copy_before_write.rs` the copy of pending tracks P to S before a write in PSUS;
//! `allocation.rs` the allocation queries (block status) of both views.

mod allocation;
mod copy_before_write;
mod read;
mod write;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use drivers::iostat::counted;
use drivers::{
    Bdev, BdevError, ChannelContext, Extent, Geometry, IoBufs, IoChannel, IoCompletion, IoError,
    IoOp, IoRequest, SubmitErrorKind, SubmitResult,
};
use hugepages::{BufferPool, DmaBuf};
use slab::Slab;

use super::{HostWrite, Pair};

/// What a view shows: P as hosts write it, or the image.
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
        Ok(counted(Box::new(ch), &self.pair.stats.host_io))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn io_boundary(&self) -> Option<u64> {
        Some(self.pair.track_size())
    }

    /// Per track, from the side a read goes to (see `allocation.rs`).
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), IoError> {
        allocation::allocation(&self.pair, self.view, offset, len, out)
    }
}

/// A side of the pair: the device a sub-request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The primary, P.
    P,
    /// The secondary, S.
    S,
}

/// Where a host request stands.
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
    /// The host's own write on its side.
    Writing,
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
/// Staging buffers one bounce read takes at most (one per track piece), from the reactor's
/// shared pool (see [`crate::staging`]).
const STAGING_BUFFERS: usize = 16;

/// A host request in progress: what the host asked for, where it stands, and what it holds
/// (track locks, its place past the gate, staging buffers) until it finishes. Its sub-requests
/// to P and S carry its slab key in their tags.
struct HostRequest {
    /// The host's tag, returned in the completion.
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    /// The host's buffers; a slot is empty while its buffer is lent to a sub-request.
    bufs: Vec<Option<DmaBuf>>,
    phase: Phase,
    /// Tracks whose lock the request holds.
    locked: Vec<u64>,
    /// A write past the gate (counted among the host writes in flight).
    gated: bool,
    /// Sub-requests not completed yet.
    outstanding: u32,
    /// The first error, which the host gets.
    error: Option<IoError>,
    /// Staging buffers of a read mixing P and S, with the offset each starts at.
    bounce: Vec<(Option<DmaBuf>, u64)>,
    /// Tracks to copy before the write, the next of them, and the staging buffer of the copy.
    cow: Vec<u64>,
    cow_next: usize,
    cow_buf: Option<DmaBuf>,
    /// The side a write goes to: P from the primary view, S from the image view.
    side: Side,
    /// Counted as a mirrored write in flight on its tracks.
    counted: bool,
    /// What the write means in the state it relied on: the metadata it needs durable before
    /// it is issued and the track sets it marks when it is done (none for reads and flushes).
    write_kind: Option<HostWrite>,
}

/// What trying to move a host request on gave.
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
    requests: Slab<HostRequest>,
    deferred: VecDeque<usize>,
    /// Writes waiting for their metadata to be durable.
    meta_waiting: VecDeque<usize>,
    retry: VecDeque<(Side, IoRequest)>,
    done: Vec<IoCompletion>,
    scratch: Vec<IoCompletion>,
    /// Allocation answers of copies before write.
    extents: Vec<Extent>,
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
            requests: Slab::new(),
            deferred: VecDeque::new(),
            meta_waiting: VecDeque::new(),
            retry: VecDeque::new(),
            done: Vec::new(),
            scratch: Vec::new(),
            extents: Vec::new(),
            cpu_copied: 0,
            host: false,
        })
    }

    fn staging(&mut self) -> Option<DmaBuf> {
        if self.staging.is_none() {
            match crate::staging::shared_pool(self.pair.track_size() as usize) {
                Ok(p) => self.staging = Some(p),
                Err(e) => {
                    tracing::error!(%e, "no staging memory for a pair channel");
                    return None;
                }
            }
        }
        self.staging.as_ref().and_then(BufferPool::get)
    }

    fn inner(&mut self, side: Side) -> &mut Box<dyn IoChannel> {
        match side {
            Side::P => &mut self.p,
            Side::S => &mut self.s,
        }
    }

    fn issue(&mut self, key: usize, side: Side, mut req: IoRequest, sub: u64) {
        req.tag = (key as u64) << SUB_BITS | sub;
        if let Some(p) = self.requests.get_mut(key) {
            p.outstanding += 1;
        }
        if !self.retry.is_empty() {
            self.retry.push_back((side, req));
            return;
        }
        if let Err(req) = self.submit_inner(side, req) {
            self.retry.push_back((side, req));
        }
    }

    /// Submits to P or S. A refused request completes with its error at once; a full queue
    /// gives the request back to be retried.
    fn submit_inner(&mut self, side: Side, req: IoRequest) -> Result<(), IoRequest> {
        let Err(e) = self.inner(side).submit(req) else {
            return Ok(());
        };
        let e = *e;
        match e.error {
            SubmitErrorKind::QueueFull => return Err(e.req),
            SubmitErrorKind::Invalid(err) => self.inner_done(
                side,
                IoCompletion {
                    tag: e.req.tag,
                    result: Err(err),
                    bufs: e.req.bufs,
                },
            ),
        }
        Ok(())
    }

    fn take_all_bufs(p: &mut HostRequest) -> IoBufs {
        p.bufs.iter_mut().filter_map(Option::take).collect()
    }

    /// Starts (or retries) a request.
    fn start(&mut self, key: usize) -> Step {
        let (op, view) = (self.requests[key].op, self.view);
        match (view, op) {
            (_, IoOp::Flush) => {
                self.requests[key].phase = Phase::Flushing;
                for side in [Side::P, Side::S] {
                    self.issue(
                        key,
                        side,
                        IoRequest::without_data(IoOp::Flush, 0, 0, 0),
                        SUB_NODATA,
                    );
                }
                Step::Running
            }
            (View::Primary, IoOp::Read) => self.primary_read(key),
            (View::Image, IoOp::Read) => self.image_read(key),
            (View::Primary, _) => self.host_write(key, Side::P),
            (View::Image, _) => self.host_write(key, Side::S),
        }
    }

    fn refuse(&mut self, key: usize, msg: String) -> Step {
        self.requests[key].error = Some(IoError::Refused(msg));
        self.finish(key);
        Step::Running
    }

    /// Locks the pending tracks among `tracks`; keeps only those still pending once locked.
    /// False (nothing held) if one is locked by someone else.
    fn lock_pending(&mut self, key: usize, tracks: std::ops::Range<u64>) -> bool {
        let pair = Arc::clone(&self.pair);
        let p = &mut self.requests[key];
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
        let p = &mut self.requests[key];
        for t in p.locked.drain(..) {
            self.pair.unlock_track(t);
        }
    }

    fn inner_done(&mut self, side: Side, c: IoCompletion) {
        let key = (c.tag >> SUB_BITS) as usize;
        let sub = c.tag & SUB_MASK;
        let Some(p) = self.requests.get_mut(key) else {
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
                let device = if side == Side::P {
                    "primary"
                } else {
                    "secondary"
                };
                self.pair.fail(format!("I/O error on the {device}: {e}"));
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
            Phase::Writing => {
                if p.op.is_write() {
                    self.pair.note_write(p.side == Side::P);
                }
                self.record_write(key);
                self.finish(key);
            }
            Phase::Flushing | Phase::Start | Phase::MetaWait => self.finish(key),
        }
    }

    fn finish(&mut self, key: usize) {
        self.release_locks(key);
        let mut p = self.requests.remove(key);
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
        let key = self.requests.insert(HostRequest {
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
            side: Side::P,
            counted: false,
            write_kind: None,
        });
        if let Step::Wait = self.start(key) {
            self.deferred.push_back(key);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        // Inner submissions that found a full queue go first, in order.
        while let Some((side, req)) = self.retry.pop_front() {
            if let Err(req) = self.submit_inner(side, req) {
                self.retry.push_front((side, req));
                break;
            }
        }
        for _ in 0..self.deferred.len() {
            let Some(key) = self.deferred.pop_front() else {
                break;
            };
            if self.pair.is_deleted() {
                self.requests[key].error = Some(IoError::Aborted("the pair was deleted".into()));
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
                self.requests[key].error = Some(IoError::Aborted("the pair was deleted".into()));
                self.finish(key);
                continue;
            }
            let _ = self.meta_check(key);
        }
        for side in [Side::P, Side::S] {
            let mut scratch = std::mem::take(&mut self.scratch);
            self.inner(side).poll(&mut scratch);
            for c in scratch.drain(..) {
                self.inner_done(side, c);
            }
            self.scratch = scratch;
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn in_flight(&self) -> usize {
        self.requests.len() + self.done.len()
    }
}
