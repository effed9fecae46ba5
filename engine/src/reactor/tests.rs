use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Counts its polls; rests (until `rest_for` from now, or until woken) after each.
struct Resting {
    polls: Arc<AtomicU64>,
    waker: Arc<Mutex<Option<PollerWaker>>>,
    rest_for: Option<Duration>,
    /// Wakes itself during its poll (as another thread might while it runs).
    wake_self_once: bool,
}

impl Poller for Resting {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if std::mem::take(&mut self.wake_self_once) {
            if let Some(w) = self.waker.lock().unwrap().as_ref() {
                w.wake();
            }
        }
        PollStatus::Rest(self.rest_for.map(|d| cx.turn_started() + d))
    }
    fn name(&self) -> &str {
        "resting"
    }
    fn attach_waker(&mut self, waker: PollerWaker) {
        *self.waker.lock().unwrap() = Some(waker);
    }
}

/// Always busy: keeps its reactor turning.
struct Spinner(Arc<AtomicU64>);

impl Poller for Spinner {
    fn poll(&mut self, _cx: &mut ReactorContext) -> PollStatus {
        self.0.fetch_add(1, Ordering::Relaxed);
        PollStatus::Busy
    }
    fn name(&self) -> &str {
        "spinner"
    }
}

fn one_reactor() -> Reactors {
    Reactors::start(&ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::Adaptive,
        inbox_size: 16,
    })
    .unwrap()
}

fn add_resting(
    reactors: &Reactors,
    rest_for: Option<Duration>,
    wake_self_once: bool,
) -> (Arc<AtomicU64>, Arc<Mutex<Option<PollerWaker>>>) {
    let polls = Arc::new(AtomicU64::new(0));
    let waker = Arc::new(Mutex::new(None));
    let poller = Resting {
        polls: Arc::clone(&polls),
        waker: Arc::clone(&waker),
        rest_for,
        wake_self_once,
    };
    reactors
        .get(0)
        .call(move |cx| cx.add_poller(Box::new(poller)))
        .unwrap();
    (polls, waker)
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    wait_up_to(Duration::from_secs(5), what, f)
}

fn wait_up_to(timeout: Duration, what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_resting_poller_is_polled_again_only_when_woken() {
    let reactors = one_reactor();
    let turns = Arc::new(AtomicU64::new(0));
    let spinner = Spinner(Arc::clone(&turns));
    reactors
        .get(0)
        .call(move |cx| cx.add_poller(Box::new(spinner)))
        .unwrap();
    let (polls, waker) = add_resting(&reactors, None, false);
    wait_for("the first poll", || polls.load(Ordering::SeqCst) == 1);
    let before = turns.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        turns.load(Ordering::SeqCst) > before + 100,
        "the reactor kept turning"
    );
    assert_eq!(polls.load(Ordering::SeqCst), 1, "polled while resting");
    for n in 2..5 {
        waker.lock().unwrap().as_ref().unwrap().wake();
        wait_for("a poll after the wake-up", || {
            polls.load(Ordering::SeqCst) == n
        });
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(polls.load(Ordering::SeqCst), 4, "one poll per wake-up");
    reactors.shutdown();
}

#[test]
fn a_parked_reactor_wakes_for_a_resting_poller() {
    let reactors = one_reactor();
    let (polls, waker) = add_resting(&reactors, None, false);
    wait_for("the first poll", || polls.load(Ordering::SeqCst) == 1);
    // Nothing else runs: the reactor parks.
    std::thread::sleep(Duration::from_millis(50));
    let woken = Instant::now();
    waker.lock().unwrap().as_ref().unwrap().wake();
    wait_for("a poll after the wake-up", || {
        polls.load(Ordering::SeqCst) == 2
    });
    // Well before the rest limit would have brought it back.
    assert!(woken.elapsed() < REST_LIMIT / 2, "woken by the waker");
    reactors.shutdown();
}

#[test]
fn a_rest_ends_at_its_deadline_and_at_the_limit() {
    let reactors = one_reactor();
    let started = Instant::now();
    let (polls, _waker) = add_resting(&reactors, Some(Duration::from_millis(30)), false);
    wait_for("three polls", || polls.load(Ordering::SeqCst) >= 3);
    assert!(started.elapsed() >= Duration::from_millis(60));
    let (limited, _w) = add_resting(&reactors, None, false);
    wait_for("the first poll", || limited.load(Ordering::SeqCst) == 1);
    let first = Instant::now();
    // The limit itself is the wait: allow it plus the usual margin.
    wait_up_to(
        REST_LIMIT + Duration::from_secs(5),
        "a poll at the rest limit",
        || limited.load(Ordering::SeqCst) == 2,
    );
    assert!(first.elapsed() >= REST_LIMIT - Duration::from_millis(50));
    reactors.shutdown();
}

#[test]
fn a_wake_up_during_the_poll_that_rests_is_not_lost() {
    let reactors = one_reactor();
    let (polls, _waker) = add_resting(&reactors, None, true);
    wait_for("the poll after the wake-up it gave itself", || {
        polls.load(Ordering::SeqCst) == 2
    });
    reactors.shutdown();
}

/// Busy, and done after `polls` polls (at once with 1).
struct Finishing {
    name: &'static str,
    polls: u32,
}

impl Poller for Finishing {
    fn poll(&mut self, _cx: &mut ReactorContext) -> PollStatus {
        self.polls = self.polls.saturating_sub(1);
        if self.polls == 0 {
            PollStatus::Done
        } else {
            PollStatus::Busy
        }
    }
    fn name(&self) -> &str {
        self.name
    }
}

#[test]
fn the_published_poller_names_follow_adds_and_removals() {
    let reactors = one_reactor();
    let r = reactors.get(0);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    r.call(|cx| {
        cx.add_poller(Box::new(Finishing {
            name: "stays",
            polls: u32::MAX,
        }));
        // Done in the turn it was added in: it never shows.
        cx.add_poller(Box::new(Finishing {
            name: "gone-at-once",
            polls: 1,
        }));
        cx.add_poller(Box::new(Finishing {
            name: "gone-soon",
            polls: 50,
        }));
    })
    .unwrap();
    wait_for("the short-lived pollers to finish", || {
        r.stats().pollers.load(Ordering::Relaxed) == 1
    });
    assert_eq!(sorted(r.poller_names()), vec!["stays".to_string()]);
    // A key freed by a finished poller is reused by the next one: its name replaces the old.
    r.call(|cx| {
        cx.add_poller(Box::new(Finishing {
            name: "later",
            polls: u32::MAX,
        }))
    })
    .unwrap();
    wait_for("the new poller", || {
        r.stats().pollers.load(Ordering::Relaxed) == 2
    });
    assert_eq!(
        sorted(r.poller_names()),
        vec!["later".to_string(), "stays".to_string()]
    );
}
