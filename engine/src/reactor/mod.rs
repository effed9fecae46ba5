//! Reactors: one pinned thread per core, running its pollers in a loop that never blocks.
//!
//! Work reaches a reactor as messages on its bounded lock-free inbox (a crossbeam `ArrayQueue`);
//! a full inbox refuses the message and the sender retries, so nothing grows without bound.
//! With `--idle adaptive` a reactor that has found nothing to do for a while parks on an epoll
//! set holding its eventfd (written by message senders and by io_uring completions) and any
//! sockets its pollers and I/O channels watch (the set is the [`drivers::FdWatch`] channels get
//! in their [`drivers::ChannelContext`]); with `--idle spin` it never sleeps. Idle pollers rest
//! off the loop turn until woken ([`pollers`]).

mod pollers;

pub use pollers::{PollerWaker, REST_LIMIT};

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::{ArrayQueue, SegQueue};
use drivers::FdWatch;
use rustix::event::{epoll, eventfd, EventfdFlags};

/// What one poll of a poller found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// It did work.
    Busy,
    /// Nothing to do.
    Idle,
    /// It is finished: remove it.
    Done,
    /// Nothing to do and nothing in flight: poll it again only when its waker is used, or at
    /// the given instant (at the latest [`REST_LIMIT`] from now).
    Rest(Option<Instant>),
}

/// A unit of work a reactor runs on every turn of its loop.
pub trait Poller {
    /// Does what can be done now without blocking.
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus;
    /// Name for `framework_get_reactors`.
    fn name(&self) -> &str;
    /// Receives, as it joins its reactor, what wakes it from [`PollStatus::Rest`]: a poller
    /// that rests hands it to whoever gives it work.
    fn attach_waker(&mut self, _waker: PollerWaker) {}
}

/// A message: a closure run once on the reactor.
pub type Message = Box<dyn FnOnce(&mut ReactorContext) + Send>;

/// How an idle reactor waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdlePolicy {
    /// Never sleep (an appliance's dedicated cores).
    Spin,
    /// Spin briefly, then park until a message, a completion or a watched socket wakes it.
    #[default]
    Adaptive,
}

impl std::str::FromStr for IdlePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spin" => Ok(IdlePolicy::Spin),
            "adaptive" => Ok(IdlePolicy::Adaptive),
            other => Err(format!("unknown idle policy '{other}' (spin or adaptive)")),
        }
    }
}

/// How long a reactor with an active poller must have been idle before adaptive parking.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(1000);
/// How long a reactor whose pollers all rest spins before parking.
const SPIN_WHEN_RESTING: Duration = Duration::from_micros(200);
/// Longest park: pollers with timers ask for earlier wake-ups.
const MAX_PARK: Duration = Duration::from_millis(100);
/// Messages run per loop turn at most, so pollers keep running under a message flood.
const MESSAGES_PER_TURN: usize = 64;

/// Errors starting or talking to reactors.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// No cores were given.
    #[error("no cores given for reactors")]
    NoCores,
    /// The OS refused a resource.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The reactor stopped before answering.
    #[error("reactor {0} is not running")]
    Stopped(usize),
}

fn os(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ReactorError {
    move |e| ReactorError::Os {
        what,
        source: e.into(),
    }
}

/// Counters a reactor publishes.
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Nanoseconds spent in loop turns that did work.
    pub busy_ns: AtomicU64,
    /// Nanoseconds spent idle (spinning or parked).
    pub idle_ns: AtomicU64,
    /// Pollers registered.
    pub pollers: AtomicUsize,
}

struct Shared {
    index: usize,
    core: usize,
    numa_node: usize,
    inbox: ArrayQueue<Message>,
    /// Keys of resting pollers woken (see [`PollerWaker`]).
    woken: SegQueue<usize>,
    wake: OwnedFd,
    parked: AtomicBool,
    stop: AtomicBool,
    stats: ReactorStats,
    /// Its pollers' names by key.
    poller_names: std::sync::Mutex<std::collections::BTreeMap<usize, String>>,
}

/// A handle to a reactor, usable from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reactor({} on core {})",
            self.shared.index, self.shared.core
        )
    }
}

impl ReactorHandle {
    /// Index among the reactors (0-based).
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The core it is pinned to.
    pub fn core(&self) -> usize {
        self.shared.core
    }

    /// The NUMA node of its core.
    pub fn numa_node(&self) -> usize {
        self.shared.numa_node
    }

    /// Its counters.
    pub fn stats(&self) -> &ReactorStats {
        &self.shared.stats
    }

    /// Names of its pollers.
    pub fn poller_names(&self) -> Vec<String> {
        self.shared
            .poller_names
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Queues a message; a full inbox gives it back (push back, retry later).
    pub fn send(&self, msg: Message) -> Result<(), Message> {
        self.shared.inbox.push(msg)?;
        self.wake_if_parked();
        Ok(())
    }

    /// Queues a message, yielding the calling (non-reactor) thread while the inbox is full.
    pub fn send_blocking(&self, mut msg: Message) -> Result<(), ReactorError> {
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(ReactorError::Stopped(self.shared.index));
            }
            match self.send(msg) {
                Ok(()) => return Ok(()),
                Err(m) => {
                    msg = m;
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Runs `f` on the reactor and waits for its result. For control-plane threads only: a
    /// reactor calling this on itself would deadlock.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ReactorContext) -> R + Send + 'static,
    ) -> Result<R, ReactorError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send_blocking(Box::new(move |cx| {
            let _ = tx.send(f(cx));
        }))?;
        rx.recv()
            .map_err(|_| ReactorError::Stopped(self.shared.index))
    }

    /// Wakes the reactor if it is parked.
    pub fn wake_if_parked(&self) {
        if self.shared.parked.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    fn wake(&self) {
        let _ = rustix::io::write(&self.shared.wake, &1u64.to_ne_bytes());
    }
}

/// What a poller or message sees of its reactor.
pub struct ReactorContext {
    handle: ReactorHandle,
    /// The epoll set `park` waits on: the eventfd, and the descriptors pollers and channels
    /// watch.
    fd_watch: FdWatch,
    new_pollers: Vec<Box<dyn Poller>>,
    wake_at: Option<Instant>,
    idle: IdlePolicy,
    turn_started: Instant,
}

impl ReactorContext {
    /// This reactor's handle.
    pub fn handle(&self) -> &ReactorHandle {
        &self.handle
    }

    /// Index of this reactor.
    pub fn index(&self) -> usize {
        self.handle.shared.index
    }

    /// Adds a poller; it runs from the next turn of the loop.
    pub fn add_poller(&mut self, poller: Box<dyn Poller>) {
        self.new_pollers.push(poller);
    }

    /// The context drivers need to open an I/O channel on this reactor.
    pub fn channel_context(&self, queue_depth: u32) -> drivers::ChannelContext {
        use std::os::fd::AsRawFd;
        let adaptive = self.idle == IdlePolicy::Adaptive;
        drivers::ChannelContext {
            wake_fd: adaptive.then(|| self.handle.shared.wake.as_raw_fd()),
            fd_watch: adaptive.then(|| self.fd_watch.clone()),
            queue_depth,
        }
    }

    /// Wakes a parked reactor when `fd` becomes readable (sockets of pollers).
    pub fn watch_fd(&self, fd: BorrowedFd<'_>) -> Result<(), ReactorError> {
        self.fd_watch.watch(fd).map_err(|source| ReactorError::Os {
            what: "epoll add",
            source,
        })
    }

    /// Has a watched `fd` also wake the reactor while it can be written, as long as `unsent`
    /// ([`drivers::FdWatch::watch_output`]).
    pub fn watch_fd_output(&self, fd: BorrowedFd<'_>, unsent: bool, watching: &mut bool) {
        self.fd_watch.watch_output(fd, unsent, watching);
    }

    /// Stops watching `fd` (before closing it).
    pub fn unwatch_fd(&self, fd: BorrowedFd<'_>) {
        self.fd_watch.unwatch(fd);
    }

    /// When this loop turn began: the clock as of this turn, without reading it again.
    pub fn turn_started(&self) -> Instant {
        self.turn_started
    }

    /// Asks to be polled again no later than `at` even if nothing wakes the reactor.
    pub fn wake_at(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.handle.shared.stop.load(Ordering::Acquire)
    }
}

/// How to start the reactors.
#[derive(Debug, Clone)]
pub struct ReactorOptions {
    /// One reactor per core, in this order.
    pub cores: Vec<usize>,
    /// Idle policy.
    pub idle: IdlePolicy,
    /// Inbox capacity per reactor.
    pub inbox_size: usize,
}

/// The running reactors.
pub struct Reactors {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Starts one pinned reactor thread per core.
    pub fn start(opts: &ReactorOptions) -> Result<Self, ReactorError> {
        if opts.cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        let topo = crate::topology::Topology::detect();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (index, &core) in opts.cores.iter().enumerate() {
            let wake = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
                .map_err(os("eventfd"))?;
            let fd_watch = FdWatch::new().map_err(|source| ReactorError::Os {
                what: "epoll",
                source,
            })?;
            epoll::add(
                &fd_watch,
                &wake,
                epoll::EventData::new_u64(u64::MAX),
                epoll::EventFlags::IN,
            )
            .map_err(os("epoll add eventfd"))?;
            let shared = Arc::new(Shared {
                index,
                core,
                numa_node: topo.numa_node_of(core),
                inbox: ArrayQueue::new(opts.inbox_size.max(16)),
                woken: SegQueue::new(),
                wake,
                parked: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                stats: ReactorStats::default(),
                poller_names: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            });
            let handle = ReactorHandle { shared };
            let (h, idle) = (handle.clone(), opts.idle);
            let thread = std::thread::Builder::new()
                .name(format!("reactor_{index}"))
                .spawn(move || {
                    run(ReactorContext {
                        handle: h,
                        fd_watch,
                        new_pollers: Vec::new(),
                        wake_at: None,
                        idle,
                        turn_started: Instant::now(),
                    })
                })
                .map_err(|source| ReactorError::Os {
                    what: "spawn reactor thread",
                    source,
                })?;
            handles.push(handle);
            threads.push(thread);
        }
        Ok(Self { handles, threads })
    }

    /// Handles of all reactors, by index.
    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// Reactor `i`, wrapping around (so placement code can ask for "the next one").
    pub fn get(&self, i: usize) -> &ReactorHandle {
        &self.handles[i % self.handles.len()]
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never true: there is always at least one reactor.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops every reactor (pollers are dropped on their own thread) and joins the threads.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for h in &self.handles {
            h.shared.stop.store(true, Ordering::Release);
            h.wake();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a reactor thread panicked");
            }
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn run(mut cx: ReactorContext) {
    let shared = Arc::clone(&cx.handle.shared);
    if !core_affinity::set_for_current(core_affinity::CoreId { id: shared.core }) {
        tracing::warn!(
            core = shared.core,
            "could not pin reactor thread to its core"
        );
    }
    tracing::debug!(index = shared.index, core = shared.core, "reactor started");
    let mut pollers = pollers::Pollers::default();
    let mut idle_since: Option<Instant> = None;
    cx.turn_started = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let busy = turn(&mut cx, &mut pollers);
        let now = Instant::now();
        let spent = now.duration_since(cx.turn_started).as_nanos() as u64;
        cx.turn_started = now;
        if busy {
            shared.stats.busy_ns.fetch_add(spent, Ordering::Relaxed);
            idle_since = None;
            continue;
        }
        shared.stats.idle_ns.fetch_add(spent, Ordering::Relaxed);
        if cx.idle == IdlePolicy::Spin {
            continue;
        }
        let since = *idle_since.get_or_insert(now);
        // With every poller resting only a wake-up brings work: a short spin still catches
        // one that follows closely (a backup asking a copier for its next track), and the
        // core goes back to the rest (the RPC thread, the other reactor) sooner.
        let spin = if pollers.all_resting() {
            SPIN_WHEN_RESTING
        } else {
            SPIN_BEFORE_PARK
        };
        if now.duration_since(since) >= spin {
            park(&mut cx, &mut pollers);
            idle_since = None;
            let after = Instant::now();
            shared.stats.idle_ns.fetch_add(
                after.duration_since(cx.turn_started).as_nanos() as u64,
                Ordering::Relaxed,
            );
            cx.turn_started = after;
        }
    }
    // Drain messages so their senders are answered (with a dropped reply) and drop the pollers
    // here, on their own thread, where their channels live.
    while shared.inbox.pop().is_some() {}
    drop(pollers);
    tracing::debug!(index = shared.index, "reactor stopped");
}

/// One turn: messages, then every active poller. True if anything did work.
fn turn(cx: &mut ReactorContext, pollers: &mut pollers::Pollers) -> bool {
    let mut busy = false;
    for _ in 0..MESSAGES_PER_TURN {
        match cx.handle.shared.inbox.pop() {
            Some(msg) => {
                msg(cx);
                busy = true;
            }
            None => break,
        }
    }
    let mut added = Vec::new();
    for poller in std::mem::take(&mut cx.new_pollers) {
        let name = poller.name().to_string();
        added.push((pollers.add(poller, &cx.handle), name));
    }
    busy |= pollers.wake_due(&cx.handle, cx.turn_started);
    let (worked, removed) = pollers.poll_active(cx);
    busy |= worked;
    if !cx.new_pollers.is_empty() {
        busy = true;
    }
    if !added.is_empty() || !removed.is_empty() {
        publish_pollers(cx, pollers.len(), added, &removed);
    }
    busy
}

/// Updates the published poller list by what changed (a reactor may run tens of thousands of
/// pollers: adding one must not rebuild the list).
fn publish_pollers(
    cx: &ReactorContext,
    count: usize,
    added: Vec<(usize, String)>,
    removed: &[usize],
) {
    let shared = &cx.handle.shared;
    shared.stats.pollers.store(count, Ordering::Relaxed);
    if let Ok(mut names) = shared.poller_names.lock() {
        // In a turn's order: pollers are added before any is polled (and found done).
        names.extend(added);
        for key in removed {
            names.remove(key);
        }
    }
}

fn park(cx: &mut ReactorContext, pollers: &mut pollers::Pollers) {
    let shared = Arc::clone(&cx.handle.shared);
    shared.parked.store(true, Ordering::SeqCst);
    drain_eventfd(shared.wake.as_fd());
    // A completion or message that arrived before the drain would not wake us: look once more.
    cx.wake_at = None;
    if !shared.inbox.is_empty() || !shared.woken.is_empty() || turn(cx, pollers) {
        shared.parked.store(false, Ordering::SeqCst);
        return;
    }
    let wake_at = match (cx.wake_at, pollers.next_deadline()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let timeout = wake_at
        .map(|at| at.saturating_duration_since(Instant::now()))
        .unwrap_or(MAX_PARK)
        .min(MAX_PARK);
    let mut events: Vec<epoll::Event> = Vec::with_capacity(16);
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    let _ = epoll::wait(
        &cx.fd_watch,
        rustix::buffer::spare_capacity(&mut events),
        Some(&ts),
    );
    shared.parked.store(false, Ordering::SeqCst);
    drain_eventfd(shared.wake.as_fd());
}

fn drain_eventfd(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd, &mut buf);
}

#[cfg(test)]
mod tests;
