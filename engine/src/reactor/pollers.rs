//! A reactor's pollers, and the rest that keeps idle ones off the loop turn.
//!
//! A poller with nothing to do and nothing in flight answers [`PollStatus::Rest`]: it leaves
//! the active list and is polled again only when something wakes it through its
//! [`PollerWaker`] (new work, from any thread), when its deadline passes, or at the latest
//! [`REST_LIMIT`] later. A thousand idle pairs thus cost nothing per turn, as SPDK's timed and
//! interrupt-driven pollers do; the limit bounds what a forgotten wake-up could cost.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::{PollStatus, Poller, ReactorContext, ReactorHandle};

/// Longest rest without a wake-up: a resting poller is polled at least this often. (Ten
/// thousand idle pairs have twenty thousand resting pollers: at one second, polling them for
/// nothing kept the reactors 5% busy.)
pub const REST_LIMIT: Duration = Duration::from_secs(5);

/// Wakes one resting poller, from any thread.
#[derive(Clone)]
pub struct PollerWaker {
    reactor: ReactorHandle,
    key: usize,
    /// Set while the poller's key waits in the reactor's wake queue (one entry at most).
    queued: Arc<AtomicBool>,
}

impl std::fmt::Debug for PollerWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PollerWaker({} on {:?})", self.key, self.reactor)
    }
}

impl PollerWaker {
    /// Has the poller polled on its reactor's next turn (waking a parked reactor). Cheap when
    /// a wake-up is already on its way.
    pub fn wake(&self) {
        // The swap orders the work published before this call before the reactor's own swap
        // that takes the wake-up: the poll that follows sees it.
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.reactor.shared.woken.push(self.key);
            self.reactor.wake_if_parked();
        }
    }
}

struct Entry {
    poller: Box<dyn Poller>,
    queued: Arc<AtomicBool>,
    resting: bool,
    /// Counts rests, so that a deadline left over from an earlier rest is ignored.
    rests: u64,
}

/// The pollers of one reactor.
#[derive(Default)]
pub(super) struct Pollers {
    entries: Slab<Entry>,
    active: Vec<usize>,
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Pollers {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when every poller rests (or there is none): nothing can have work without a
    /// wake-up, a message or a deadline.
    pub(super) fn all_resting(&self) -> bool {
        self.active.is_empty()
    }

    /// Adds a poller, active, and hands it its waker; its key.
    pub(super) fn add(&mut self, mut poller: Box<dyn Poller>, reactor: &ReactorHandle) -> usize {
        let queued = Arc::new(AtomicBool::new(false));
        let key = self.entries.vacant_key();
        poller.attach_waker(PollerWaker {
            reactor: reactor.clone(),
            key,
            queued: Arc::clone(&queued),
        });
        let key = self.entries.insert(Entry {
            poller,
            queued,
            resting: false,
            rests: 0,
        });
        self.active.push(key);
        key
    }

    /// Brings back the resting pollers that were woken or whose deadline passed; true if any.
    pub(super) fn wake_due(&mut self, reactor: &ReactorHandle, now: Instant) -> bool {
        let mut any = false;
        while let Some(key) = reactor.shared.woken.pop() {
            if let Some(e) = self.entries.get_mut(key) {
                // Taken before the poll, so a wake-up during the poll queues it again.
                e.queued.swap(false, Ordering::AcqRel);
                if e.resting {
                    e.resting = false;
                    self.active.push(key);
                    any = true;
                }
            }
        }
        while let Some(&Reverse((at, key, rests))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if let Some(e) = self.entries.get_mut(key) {
                if e.resting && e.rests == rests {
                    e.resting = false;
                    self.active.push(key);
                    any = true;
                }
            }
        }
        any
    }

    /// The earliest deadline of a resting poller.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Polls every active poller once: (did work, the keys of pollers that were done).
    pub(super) fn poll_active(&mut self, cx: &mut ReactorContext) -> (bool, Vec<usize>) {
        let (mut busy, mut removed) = (false, Vec::new());
        let mut i = 0;
        while i < self.active.len() {
            let key = self.active[i];
            let Some(e) = self.entries.get_mut(key) else {
                self.active.swap_remove(i);
                continue;
            };
            match e.poller.poll(cx) {
                PollStatus::Busy => busy = true,
                PollStatus::Idle => {}
                PollStatus::Rest(until) => {
                    let limit = cx.turn_started() + REST_LIMIT;
                    let at = until.map_or(limit, |u| u.min(limit));
                    e.resting = true;
                    e.rests += 1;
                    self.deadlines.push(Reverse((at, key, e.rests)));
                    self.active.swap_remove(i);
                    continue;
                }
                PollStatus::Done => {
                    self.entries.remove(key);
                    self.active.swap_remove(i);
                    removed.push(key);
                    busy = true;
                    continue;
                }
            }
            i += 1;
        }
        // Deadlines of pollers gone or woken early pile up: drop them once they dominate.
        if self.deadlines.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.deadlines.retain(|Reverse((_, key, rests))| {
                entries
                    .get(*key)
                    .is_some_and(|e| e.resting && e.rests == *rests)
            });
        }
        (busy, removed)
    }
}
