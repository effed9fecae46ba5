//! Channels of NVMe/TCP bdevs. An I/O queue is the controller's, not a namespace's (each
//! command names its namespace), so every channel a thread opens on one controller shares one
//! I/O queue, as SPDK's bdev_nvme shares a queue pair per poll group: one TCP connection per
//! reactor and controller however many namespaces and users it serves, and the controller's
//! queues (64 at most) are not used up by the number of volumes. Requests carry the queue's own
//! tags; completions go back to the channel that submitted them. Each channel still takes
//! requests up to its own depth, as when it had a queue of its own (callers size their work by
//! it, and a host must not be refused because a copy filled the queue): what the shared queue
//! has no room for waits, in order, and goes out as commands complete.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use slab::Slab;

use super::host::{Done, HostController, IoQueue, Namespace, Refused};
use crate::bdev::{
    invalid, queue_full, BdevError, ChannelContext, Geometry, IoChannel, IoCompletion, IoRequest,
    SubmitResult,
};
use crate::{IoBufs, IoError};

/// A thread's shared queue on one controller (by address) for one reactor wake-up eventfd (a
/// thread doing blocking I/O has none).
struct Registered {
    ctrl: usize,
    wake_fd: Option<RawFd>,
    queue: Weak<SharedQueue>,
}

thread_local! {
    /// This thread's shared queues.
    static QUEUES: RefCell<Vec<Registered>> = const { RefCell::new(Vec::new()) };
}

/// A channel's place in its shared queue.
struct Member {
    /// Told apart from an earlier member in the same slot.
    generation: u64,
    /// Requests taken and not yet given back (sent or waiting).
    in_flight: usize,
    /// Most requests it takes at once.
    depth: usize,
    done: Vec<Done>,
}

/// A request taken while the queue had no room for it (its tag is the queue's).
struct Waiting {
    ns: Namespace,
    req: IoRequest,
}

/// Submits `req` on namespace `ns` of `q` under the request's tag. A refusal gives the request
/// back with why: no error when the queue is full, else the error. `None`: taken.
fn submit_on(
    q: &mut IoQueue,
    ns: &Namespace,
    mut req: IoRequest,
) -> Option<(Option<IoError>, IoRequest)> {
    let bufs = std::mem::replace(&mut req.bufs, IoBufs::new());
    let (error, bufs) = match q.submit_to(ns, req.op, req.offset, req.len, bufs, req.tag) {
        Ok(()) => return None,
        Err(Refused::Full(bufs)) => (None, bufs),
        Err(Refused::Failed(e, bufs)) => (Some(e), bufs),
    };
    req.bufs = bufs;
    Some((error, req))
}

/// Why a request the queue can never take fails: more commands than it has entries.
fn too_large() -> IoError {
    IoError::Device(libc::EINVAL)
}

struct Inner {
    q: IoQueue,
    members: Slab<Member>,
    generations: u64,
    /// The submitter of each request taken: member slot, its generation, its tag.
    requests: Slab<(usize, u64, u64)>,
    waiting: VecDeque<Waiting>,
    scratch: Vec<Done>,
}

/// One I/O queue shared by a thread's channels on one controller.
pub(super) struct SharedQueue {
    inner: RefCell<Inner>,
}

impl SharedQueue {
    /// This thread's queue on `ctrl`, connected on first use (or again after it failed), for
    /// channels opened with `ctx`.
    fn for_thread(
        ctrl: &Arc<HostController>,
        nsid: u32,
        ctx: &ChannelContext,
    ) -> Result<Rc<SharedQueue>, BdevError> {
        let key = Arc::as_ptr(ctrl) as usize;
        let found = QUEUES.with(|qs| {
            let mut qs = qs.borrow_mut();
            qs.retain(|r| r.queue.strong_count() > 0);
            qs.iter()
                .filter(|r| r.ctrl == key && r.wake_fd == ctx.wake_fd)
                .filter_map(|r| r.queue.upgrade())
                .find(|q| q.inner.borrow().q.failure().is_none())
        });
        if let Some(q) = found {
            return Ok(q);
        }
        let mut q = ctrl.open_io_queue(nsid)?;
        if let Some(watch) = &ctx.fd_watch {
            if let Err(e) = q.wake_on_input(watch) {
                // The queue works without it; a parked reactor then sees its completions only
                // when something else wakes it.
                tracing::warn!(subnqn = %ctrl.options().subnqn, error = %e, "NVMe/TCP queue socket not watched");
            }
        }
        let shared = Rc::new(SharedQueue {
            inner: RefCell::new(Inner {
                q,
                members: Slab::new(),
                generations: 0,
                requests: Slab::new(),
                waiting: VecDeque::new(),
                scratch: Vec::new(),
            }),
        });
        QUEUES.with(|qs| {
            qs.borrow_mut().push(Registered {
                ctrl: key,
                wake_fd: ctx.wake_fd,
                queue: Rc::downgrade(&shared),
            })
        });
        Ok(shared)
    }

    fn join(&self, depth: usize) -> (usize, u64) {
        let mut inner = self.inner.borrow_mut();
        inner.generations += 1;
        let generation = inner.generations;
        let slot = inner.members.insert(Member {
            generation,
            in_flight: 0,
            depth: depth.max(1),
            done: Vec::new(),
        });
        (slot, generation)
    }

    fn leave(&self, slot: usize) {
        // Requests still in flight complete into nothing: their buffers are dropped then.
        self.inner.borrow_mut().members.try_remove(slot);
    }
}

impl Inner {
    /// Sends what waits for room, polls the queue and hands each finished request to its
    /// member; then sends what the finished ones made room for.
    fn poll(&mut self) {
        self.send_waiting();
        self.q.poll(&mut self.scratch);
        self.send_waiting();
        let mut done = std::mem::take(&mut self.scratch);
        for d in done.drain(..) {
            self.finish(d);
        }
        self.scratch = done;
    }

    /// Gives a finished request back to its member (nothing if the member left).
    fn finish(&mut self, d: Done) {
        let Some((slot, generation, tag)) = self.requests.try_remove(d.tag as usize) else {
            return;
        };
        if let Some(m) = self.members.get_mut(slot) {
            if m.generation == generation {
                m.in_flight -= 1;
                m.done.push(Done { tag, ..d });
            }
        }
    }

    /// Submits waiting requests, oldest first, while the queue takes them.
    fn send_waiting(&mut self) {
        while let Some(Waiting { ns, req }) = self.waiting.pop_front() {
            let (e, req) = match submit_on(&mut self.q, &ns, req) {
                None => continue,
                Some((None, req)) if self.q.in_flight() > 0 => {
                    self.waiting.push_front(Waiting { ns, req });
                    return;
                }
                // Failed, or full with nothing in flight (it can never be taken).
                Some((e, req)) => (e.unwrap_or_else(too_large), req),
            };
            self.finish(Done {
                tag: req.tag,
                result: Err(e),
                bufs: req.bufs,
            });
        }
    }
}

/// A channel of an NVMe/TCP namespace: its share of the thread's queue on the controller.
pub(super) struct NvmfChannel {
    q: Rc<SharedQueue>,
    slot: usize,
    generation: u64,
    ns: Namespace,
    geometry: Geometry,
}

impl NvmfChannel {
    pub(super) fn open(
        ctrl: &Arc<HostController>,
        nsid: u32,
        geometry: Geometry,
        ctx: &ChannelContext,
    ) -> Result<Self, BdevError> {
        let ns = *ctrl
            .namespaces()
            .iter()
            .find(|n| n.nsid == nsid)
            .ok_or_else(|| BdevError::Invalid(format!("no namespace {nsid}")))?;
        let q = SharedQueue::for_thread(ctrl, nsid, ctx)?;
        let (slot, generation) = q.join(ctx.queue_depth as usize);
        Ok(NvmfChannel {
            q,
            slot,
            generation,
            ns,
            geometry,
        })
    }
}

impl Drop for NvmfChannel {
    fn drop(&mut self) {
        self.q.leave(self.slot);
    }
}

impl IoChannel for NvmfChannel {
    fn submit(&mut self, mut req: IoRequest) -> SubmitResult {
        if let Err(e) = self.geometry.validate(&req) {
            return invalid(req, e);
        }
        let mut inner = self.q.inner.borrow_mut();
        let inner = &mut *inner;
        let Some(m) = inner.members.get_mut(self.slot) else {
            return queue_full(req);
        };
        if m.in_flight >= m.depth {
            return queue_full(req);
        }
        let entry = inner.requests.vacant_entry();
        // Under the queue's tag while it is the queue's.
        let tag = std::mem::replace(&mut req.tag, entry.key() as u64);
        // Behind what already waits, to keep the order requests were taken in.
        let refused = if inner.waiting.is_empty() {
            submit_on(&mut inner.q, &self.ns, req)
        } else {
            Some((None, req))
        };
        match refused {
            None => {}
            Some((None, req)) if inner.q.in_flight() > 0 || !inner.waiting.is_empty() => {
                inner.waiting.push_back(Waiting { ns: self.ns, req });
            }
            // Failed, or full with nothing in flight (it can never be taken).
            Some((e, mut req)) => {
                req.tag = tag;
                return invalid(req, e.unwrap_or_else(too_large));
            }
        }
        entry.insert((self.slot, self.generation, tag));
        m.in_flight += 1;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let mut inner = self.q.inner.borrow_mut();
        inner.poll();
        let Some(m) = inner.members.get_mut(self.slot) else {
            return 0;
        };
        let n = m.done.len();
        out.extend(m.done.drain(..).map(|d| IoCompletion {
            tag: d.tag,
            result: d.result,
            bufs: d.bufs,
        }));
        n
    }

    fn in_flight(&self) -> usize {
        self.q
            .inner
            .borrow()
            .members
            .get(self.slot)
            .map_or(0, |m| m.in_flight)
    }
}
