//! The control poller (the split acceptor): applies split and resync to one or several pairs at
//! one instant. It closes their gates (host writes arriving meanwhile wait), applies the
//! transition to all, and reopens the gates. A split does not wait for the writes in flight and
//! copies and scans nothing; a resync waits for the writes in flight first.

use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use std::sync::atomic::Ordering;

use super::metadata::CheckpointRecord;
use super::split_journal::{JournalWriter, SplitJournal};
use super::{now_ns, Pair, PairError};
use crate::reactor::{PollStatus, Poller, PollerWaker, ReactorContext, ReactorHandle};

/// A transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Split: S stands for P as of now.
    Split,
    /// Resync: copy the changed tracks forward (P to S) or in reverse (restore S to P).
    Resync {
        /// Restore S onto P.
        reverse: bool,
        /// Copy every track, not only the changed ones.
        full: bool,
    },
    /// A backup of the image starts: from now on, writes to S wait for it on tracks it has not
    /// read yet. Applied after the writes in flight have drained.
    StartBackup,
    /// A backup of the image is done (and still holds the pair in its split): the pair gets
    /// checkpoint `name` at its split (see `pair::checkpoints`).
    Checkpoint {
        /// Name.
        name: String,
        /// The backup.
        backup_id: u64,
        /// The backup's split instant (the pair must still be in that split).
        split_at_ns: u64,
    },
    /// Checkpoint `name` goes; what it covered joins the next older one.
    DeleteCheckpoint {
        /// Name.
        name: String,
    },
}

/// What a transition reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The common split instant (nanoseconds since the epoch); 0 for a resync.
    pub split_at_ns: u64,
    /// Pending tracks of each pair right after the transition.
    pub pending_tracks: Vec<u64>,
    /// Nanoseconds from taking the request to reopening the gates.
    pub engine_ns: u64,
}

/// Where the outcome of a transition handed over with [`ControlQueue::submit`] comes.
pub type OutcomeReceiver = std::sync::mpsc::Receiver<Result<Outcome, PairError>>;

/// A request for the control poller.
pub struct ControlRequest {
    /// Pairs involved (one common instant).
    pub pairs: Vec<Arc<Pair>>,
    /// What to do.
    pub action: Action,
    /// Where the outcome goes.
    pub reply: SyncSender<Result<Outcome, PairError>>,
}

/// The ring through which control-plane threads hand transitions to the control poller.
pub struct ControlQueue {
    ring: ArrayQueue<ControlRequest>,
    reactor: ReactorHandle,
    /// Where splits of several pairs are made durable at once.
    journal: std::sync::Mutex<Option<Arc<SplitJournal>>>,
    /// Wakes the poller serving the queue when it rests.
    waker: std::sync::Mutex<Option<PollerWaker>>,
}

impl ControlQueue {
    /// A queue served by a poller on `reactor`.
    pub fn new(reactor: ReactorHandle) -> Arc<Self> {
        Arc::new(Self {
            ring: ArrayQueue::new(256),
            reactor,
            journal: std::sync::Mutex::new(None),
            waker: std::sync::Mutex::new(None),
        })
    }

    /// Makes `journal` the split journal (see `pair::split_journal`); without one, every pair
    /// of a split writes its own header.
    pub fn set_journal(&self, journal: Arc<SplitJournal>) {
        *self
            .journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(journal);
    }

    /// The split journal.
    pub fn journal(&self) -> Option<Arc<SplitJournal>> {
        self.journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Hands a request over; gives it back when the ring is full.
    pub fn push(&self, req: ControlRequest) -> Result<(), ControlRequest> {
        self.ring.push(req)?;
        match &*self
            .waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(waker) => waker.wake(),
            None => self.reactor.wake_if_parked(),
        }
        Ok(())
    }

    /// Hands `action` on `pairs` over without waiting for it; the receiver of its outcome.
    pub fn submit(&self, pairs: Vec<Arc<Pair>>, action: Action) -> Result<OutcomeReceiver, String> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        self.push(ControlRequest {
            pairs,
            action,
            reply,
        })
        .map_err(|_| "the pair control queue is full".to_string())?;
        Ok(rx)
    }

    /// The reactor serving it.
    pub fn reactor(&self) -> &ReactorHandle {
        &self.reactor
    }
}

/// Where a running transition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Gates closed; waiting for host writes in flight (resync, backup start).
    Draining,
    /// Applied; waiting for the pairs' headers to be durable (split: gates open already;
    /// resync: gates still closed).
    Header,
    /// Resync: waiting for the tracks it copies to be marked durably.
    Marks,
    /// Checkpoint made or deleted: gates open, waiting for a checkpoint slot to be durable.
    Slot(usize),
    /// Then gates closed again, waiting for host writes in flight to drain.
    SlotDrain,
}

/// A split journal record being written: the journal, the record's number, and each pair with
/// its held header.
type GroupRecord = (Arc<SplitJournal>, u64, Vec<(Arc<Pair>, u64)>);

struct Running {
    req: ControlRequest,
    started: Instant,
    stage: Stage,
    outcome: Result<u64, PairError>,
    /// The checkpoint slot being filled or merged into.
    slot: Option<usize>,
    /// A split of several pairs: the record that makes it durable.
    group: Option<GroupRecord>,
}

/// The control poller.
pub struct ControlPoller {
    queue: Arc<ControlQueue>,
    running: Option<Running>,
    /// Writes the split journal's records, on this reactor.
    journal_writer: JournalWriter,
}

impl ControlPoller {
    /// A poller serving `queue`.
    pub fn new(queue: Arc<ControlQueue>) -> Self {
        Self {
            queue,
            running: None,
            journal_writer: JournalWriter::default(),
        }
    }

    fn check(req: &ControlRequest) -> Result<(), PairError> {
        let mut named = std::collections::HashSet::with_capacity(req.pairs.len());
        for p in &req.pairs {
            if !named.insert(p.name()) {
                return Err(PairError::Invalid(format!(
                    "pair '{}' named twice",
                    p.name()
                )));
            }
            if p.is_deleted() {
                return Err(PairError::NotFound(p.name().to_string()));
            }
            match &req.action {
                Action::Split => p.check_split()?,
                Action::Resync { reverse, full } => p.check_resync(*reverse, *full)?,
                Action::StartBackup => p.check_backup()?,
                Action::Checkpoint { .. } | Action::DeleteCheckpoint { .. }
                    if req.pairs.len() != 1 =>
                {
                    return Err(PairError::Invalid(
                        "checkpoints are made and deleted one pair at a time".into(),
                    ))
                }
                Action::Checkpoint { name, .. } => p.check_new_checkpoint(name)?,
                Action::DeleteCheckpoint { .. } => {}
            }
        }
        Ok(())
    }

    /// Splits the pairs at one instant. Two or more with metadata are made durable by one
    /// split journal record, their headers held back until it is (see `pair::split_journal`);
    /// otherwise each pair's header is written.
    fn split(
        req: &ControlRequest,
        journal: Option<Arc<SplitJournal>>,
    ) -> (u64, Option<GroupRecord>) {
        let at = now_ns();
        let with_metadata = req.pairs.iter().filter(|p| p.metadata().is_some()).count();
        let Some(journal) = journal.filter(|_| with_metadata > 1) else {
            for p in &req.pairs {
                p.apply_split(at);
            }
            return (at, None);
        };
        let held: Vec<(Arc<Pair>, u64)> = req
            .pairs
            .iter()
            .filter_map(|p| p.apply_group_split(at).map(|seq| (Arc::clone(p), seq)))
            .collect();
        match journal.submit(at, held.clone()) {
            Ok(number) => (at, Some((journal, number, held))),
            Err(e) => {
                tracing::warn!(%e, "split of several pairs made durable pair by pair");
                release(&held, false);
                (at, None)
            }
        }
    }

    /// Applies the transition (gates closed, writes drained where needed).
    fn apply(
        req: &ControlRequest,
        journal: Option<Arc<SplitJournal>>,
    ) -> Result<(u64, Option<GroupRecord>), PairError> {
        Self::check(req)?;
        let at = match req.action {
            Action::Split => return Ok(Self::split(req, journal)),
            Action::Resync { reverse, full } => {
                for p in &req.pairs {
                    p.apply_resync(reverse, full);
                }
                0
            }
            Action::StartBackup => {
                for p in &req.pairs {
                    p.begin_backup();
                }
                req.pairs.first().map_or(0, |p| p.split_at_ns())
            }
            // Applied in steps by `step_checkpoint`.
            Action::Checkpoint { .. } | Action::DeleteCheckpoint { .. } => 0,
        };
        Ok((at, None))
    }

    /// Moves a checkpoint being made or deleted on (one pair, see `pair::checkpoints`); true
    /// when it replied.
    fn step_checkpoint(run: &mut Running) -> bool {
        let Some(pair) = run.req.pairs.first().cloned() else {
            run.outcome = Err(PairError::Invalid("no pair named".into()));
            return true;
        };
        loop {
            match run.stage {
                Stage::Draining => {
                    if !pair.drained() {
                        return false;
                    }
                    let begun = Self::check(&run.req).and_then(|()| match &run.req.action {
                        Action::Checkpoint {
                            name, split_at_ns, ..
                        } => pair.begin_checkpoint(name, *split_at_ns).map(Some),
                        Action::DeleteCheckpoint { name } => pair.begin_checkpoint_delete(name),
                        _ => Ok(None),
                    });
                    pair.open_gate();
                    match begun {
                        Err(e) => {
                            run.outcome = Err(e);
                            return true;
                        }
                        Ok(Some(slot)) => {
                            run.slot = Some(slot);
                            run.stage = Stage::Slot(slot);
                        }
                        Ok(None) => {
                            pair.close_gate();
                            run.stage = Stage::SlotDrain;
                        }
                    }
                }
                Stage::Slot(slot) => {
                    if !pair.checkpoint_slot_durable(slot) {
                        return false;
                    }
                    if let Some(e) = pair.metadata().and_then(|m| m.failure()) {
                        if let Action::Checkpoint { .. } = run.req.action {
                            pair.close_gate();
                            run.stage = Stage::SlotDrain;
                            run.outcome = Err(PairError::Invalid(format!(
                                "pair metadata cannot be written: {e}"
                            )));
                            continue;
                        }
                    }
                    pair.close_gate();
                    run.stage = Stage::SlotDrain;
                }
                Stage::SlotDrain => {
                    if !pair.drained() {
                        return false;
                    }
                    match (&run.req.action, &run.outcome) {
                        (Action::Checkpoint { .. }, Err(_)) => {
                            // Only a failed metadata write gets here: marking stops.
                            if let Some(slot) = run.slot {
                                pair.abandon_checkpoint(slot);
                            }
                            pair.open_gate();
                            return true;
                        }
                        (
                            Action::Checkpoint {
                                name,
                                backup_id,
                                split_at_ns,
                            },
                            Ok(_),
                        ) => {
                            if let Some(slot) = run.slot {
                                pair.commit_checkpoint(CheckpointRecord {
                                    name: name.clone(),
                                    split_at_ns: *split_at_ns,
                                    backup_id: *backup_id,
                                    slot: slot as u8,
                                });
                            }
                        }
                        (Action::DeleteCheckpoint { name }, _) => {
                            pair.commit_checkpoint_delete(name)
                        }
                        _ => {}
                    }
                    run.stage = Stage::Header;
                }
                Stage::Header => {
                    // Read once: a later transition's number would make it false again.
                    let durable = pair.state_durable();
                    if !(durable || pair.metadata_failed()) {
                        return false;
                    }
                    if !durable {
                        // The header will never be written: a checkpoint made here would be
                        // gone after a restart, so it is not made.
                        if let Action::Checkpoint { name, .. } = &run.req.action {
                            pair.forget_checkpoint(name);
                        }
                        run.outcome = Err(PairError::Invalid(format!(
                            "pair '{}' metadata cannot be written: {}",
                            pair.name(),
                            pair.metadata()
                                .and_then(|m| m.failure())
                                .unwrap_or_default()
                        )));
                    }
                    pair.open_gate();
                    return true;
                }
                Stage::Marks => return true,
            }
        }
    }

    /// Moves the running transition on as far as it can go now; true when it replied.
    fn step(&mut self) -> bool {
        let Some(run) = self.running.as_mut() else {
            return false;
        };
        let action = run.req.action.clone();
        if matches!(
            action,
            Action::Checkpoint { .. } | Action::DeleteCheckpoint { .. }
        ) {
            if !Self::step_checkpoint(run) {
                return false;
            }
            let Some(run) = self.running.take() else {
                return false;
            };
            let engine_ns = run.started.elapsed().as_nanos() as u64;
            let result = run.outcome.map(|_| Outcome {
                split_at_ns: run.req.pairs.first().map_or(0, |p| p.split_at_ns()),
                pending_tracks: run.req.pairs.iter().map(|p| p.pending.count()).collect(),
                engine_ns,
            });
            let _ = run.req.reply.send(result);
            return true;
        }
        if run.stage == Stage::Draining {
            // A split does not wait for writes in flight: those mirrored before it are counted
            // on their tracks, and post-split users of those tracks wait for them. The gates
            // are only closed so that every pair of the group flips between the same two
            // instants. A resync waits for the writes in flight, whose bookkeeping it changes.
            if action != Action::Split && !run.req.pairs.iter().all(|p| p.drained()) {
                return false;
            }
            let applied = Self::apply(&run.req, self.queue.journal());
            run.outcome = applied.map(|(at, group)| {
                run.group = group;
                at
            });
            if run.outcome.is_err() || !matches!(action, Action::Resync { .. }) {
                for p in &run.req.pairs {
                    p.open_gate();
                }
            }
            run.stage = Stage::Header;
        }
        if let Some((journal, number, held)) = &run.group {
            match journal.status(*number) {
                None => return false,
                Some(Ok(())) => release(held, true),
                Some(Err(e)) => {
                    tracing::warn!(%e, "split of several pairs made durable pair by pair");
                    release(held, false);
                }
            }
            run.group = None;
        }
        if run.outcome.is_ok() && run.stage == Stage::Header {
            // The transition is acknowledged only once it is durable.
            if !run
                .req
                .pairs
                .iter()
                .all(|p| p.state_durable() || p.metadata_failed())
            {
                return false;
            }
            // A split is acknowledged only durable: a pair whose metadata cannot be written
            // would come back from a restart not split.
            if action == Action::Split {
                if let Some(p) = run.req.pairs.iter().find(|p| !p.state_durable()) {
                    run.outcome = Err(PairError::Invalid(format!(
                        "pair '{}' metadata cannot be written: {}",
                        p.name(),
                        p.metadata().and_then(|m| m.failure()).unwrap_or_default()
                    )));
                }
            }
            if let Action::Resync { .. } = action {
                for p in &run.req.pairs {
                    p.persist_resync();
                }
                run.stage = Stage::Marks;
            }
        }
        if run.outcome.is_ok() && run.stage == Stage::Marks {
            if !run.req.pairs.iter().all(|p| p.resync_persisted()) {
                return false;
            }
            for p in &run.req.pairs {
                p.open_gate();
            }
        }
        let Some(Running {
            req,
            started,
            outcome,
            ..
        }) = self.running.take()
        else {
            return false;
        };
        let engine_ns = started.elapsed().as_nanos() as u64;
        let result = outcome.map(|split_at_ns| {
            if req.action == Action::Split {
                for p in &req.pairs {
                    p.stats.splits.fetch_add(1, Ordering::Relaxed);
                    p.stats.last_split_ns.store(engine_ns, Ordering::Relaxed);
                }
            }
            Outcome {
                split_at_ns,
                pending_tracks: req.pairs.iter().map(|p| p.pending.count()).collect(),
                engine_ns,
            }
        });
        let _ = req.reply.send(result);
        true
    }
}

/// Lets the held headers of a group split be written: the split is durable as the journal's
/// record (`journaled`), or their own headers must make it so.
fn release(held: &[(Arc<Pair>, u64)], journaled: bool) {
    for (p, seq) in held {
        if let Some(m) = p.metadata() {
            m.release_header(journaled.then_some(*seq));
        }
    }
}

impl Poller for ControlPoller {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        let journal = self.queue.journal();
        let wrote = journal
            .as_ref()
            .is_some_and(|journal| self.journal_writer.pump(journal, &cx.channel_context(4)));
        let mut moved = wrote;
        if self.running.is_none() {
            let Some(req) = self.queue.ring.pop() else {
                if wrote {
                    return PollStatus::Busy;
                }
                // Nothing to serve and no record on its way: rest until a request comes
                // (`ControlQueue::push` wakes it). Records are only queued by this poller's
                // own transitions.
                let journal_idle = self.journal_writer.is_idle()
                    && journal.as_ref().is_none_or(|j| !j.has_unwritten());
                return if journal_idle {
                    PollStatus::Rest(None)
                } else {
                    PollStatus::Idle
                };
            };
            let started = Instant::now();
            if let Err(e) = Self::check(&req) {
                let _ = req.reply.send(Err(e));
                return PollStatus::Busy;
            }
            for p in &req.pairs {
                p.close_gate();
            }
            self.running = Some(Running {
                req,
                started,
                stage: Stage::Draining,
                outcome: Ok(0),
                slot: None,
                group: None,
            });
            moved = true;
        }
        let before = self.running.as_ref().map(|r| (r.stage, r.group.is_some()));
        let replied = self.step();
        let after = self.running.as_ref().map(|r| (r.stage, r.group.is_some()));
        // Waiting on writes in flight or a record on its way is idle time: the reactor may
        // give its core to the threads doing that I/O.
        if moved || replied || before != after {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        "pair_control"
    }

    fn attach_waker(&mut self, waker: PollerWaker) {
        *self
            .queue
            .waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(waker);
    }
}
