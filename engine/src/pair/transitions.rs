//! How a pair changes state without racing host writes: the numbered transition, the gate
//! host writes pass, the count of mirrored writes in flight, and the transitions themselves
//! (split, forward and reverse resync, the end of a copy, suspension on an error), plus the
//! backup frontier that holds host writes to the image behind a running backup.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::state::{DIR_FORWARD, DIR_REVERSE};
use super::{Pair, PairError, PairState};

impl Pair {
    /// Runs a transition, which changes what host writes mean, when `applies` says so (checked
    /// under the transition lock). Its header number is taken before `change`, so a host that
    /// sees the new state also sees that it must wait for it; the header is asked for after
    /// (`flush_data`: P and S flushed first). The writer reads the state after the number it
    /// writes, so the newest header holds the newest state as long as states change in the
    /// order of their numbers, which the lock keeps.
    /// Returns the header number the transition took (`None`: it did not apply, or the pair has
    /// no metadata).
    pub(super) fn transition(
        &self,
        flush_data: bool,
        applies: impl FnOnce() -> bool,
        change: impl FnOnce(),
    ) -> Option<u64> {
        let _ordered = self
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !applies() {
            return None;
        }
        let seq = self.meta.as_ref().map(|m| {
            let seq = m.next_seq();
            self.state_seq.fetch_max(seq, Ordering::SeqCst);
            seq
        });
        #[cfg(test)]
        tests::numbered();
        change();
        if let (Some(m), Some(seq)) = (&self.meta, seq) {
            m.request_header(seq, flush_data);
            if self.state() != PairState::Psus {
                self.wake_copier();
            }
        }
        seq
    }

    /// Enters the gate for a host write: false if a transition holds it closed (retry later).
    pub(crate) fn enter_gate(&self) -> bool {
        if self.gate.load(Ordering::SeqCst) {
            return false;
        }
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.gate.load(Ordering::SeqCst) {
            self.leave_gate();
            return false;
        }
        true
    }

    /// A host write that entered the gate has finished (or given up).
    pub(crate) fn leave_gate(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn close_gate(&self) {
        self.gate.store(true, Ordering::SeqCst);
    }

    pub(crate) fn open_gate(&self) {
        self.gate.store(false, Ordering::SeqCst);
        self.wake_all();
    }

    pub(crate) fn drained(&self) -> bool {
        self.inflight.load(Ordering::SeqCst) == 0
    }

    /// Closes the gate for good and waits (up to `limit`) for host writes in flight: the pair's
    /// metadata can then be written out for a clean stop.
    pub fn quiesce(&self, limit: std::time::Duration) -> bool {
        self.close_gate();
        let end = std::time::Instant::now() + limit;
        while !self.drained() {
            if std::time::Instant::now() > end {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    }

    /// A mirrored write is about to touch `tracks`.
    pub(crate) fn begin_mirrored_write(&self, tracks: std::ops::Range<u64>) {
        for slot in self.mirrored_slots(tracks) {
            slot.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A mirrored write on `tracks` finished (its tracks are marked pending).
    pub(crate) fn end_mirrored_write(&self, tracks: std::ops::Range<u64>) {
        for slot in self.mirrored_slots(tracks) {
            slot.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// True while a write mirrored before the split may still be in flight on `tracks`.
    pub(crate) fn mirrored_writes_in_flight(&self, tracks: std::ops::Range<u64>) -> bool {
        self.mirrored_slots(tracks)
            .any(|slot| slot.load(Ordering::SeqCst) != 0)
    }

    /// The counters of `tracks` (each slot once at most: a range longer than the slots
    /// covers them all).
    fn mirrored_slots(
        &self,
        tracks: std::ops::Range<u64>,
    ) -> impl Iterator<Item = &std::sync::atomic::AtomicU32> {
        let slots = self.mirrored.len() as u64;
        tracks
            .take(slots as usize)
            .map(move |t| &self.mirrored[(t % slots) as usize])
    }

    fn wrong_state(&self, what: &str) -> PairError {
        PairError::WrongState {
            name: self.name.clone(),
            state: self.state().as_str(),
            what: what.to_string(),
        }
    }

    /// Checks that a split applies now (gate closed, writes drained).
    pub(crate) fn check_split(&self) -> Result<(), PairError> {
        match self.state() {
            PairState::Pair | PairState::Copy if !self.reversing() => Ok(()),
            _ => Err(self.wrong_state("only a pair in PAIR or COPY can be split")),
        }
    }

    /// Applies the split (gate closed, writes drained): S now stands for P as it is.
    pub(crate) fn apply_split(&self, at_ns: u64) -> Option<u64> {
        // The changed sets are empty outside PSUS/PSUE (a resync empties them), so nothing is
        // cleared here: the split touches no bitmap. Persisting it is one header write.
        debug_assert_eq!(self.changed_p.count() + self.changed_s.count(), 0);
        self.transition(
            false,
            || true,
            || {
                self.split_at_ns.store(at_ns, Ordering::SeqCst);
                self.set_state(PairState::Psus);
            },
        )
    }

    /// Applies a split made durable by a record of the split journal, with the other pairs of
    /// its group: the pair's header writes are held back until the record is durable (see
    /// [`Metadata::release_header`](super::metadata::Metadata::release_header)). Returns the
    /// header number the split took; `None` when the pair has no metadata (nothing to hold).
    pub(crate) fn apply_group_split(&self, at_ns: u64) -> Option<u64> {
        let Some(meta) = &self.meta else {
            self.apply_split(at_ns);
            return None;
        };
        meta.hold_header();
        let seq = self.apply_split(at_ns);
        if seq.is_none() {
            meta.release_header(None);
        }
        seq
    }

    /// Checks that a resync applies now. A full resync forward also applies to a pair in PAIR
    /// or COPY (S is copied again from P); a reverse one, like any reverse resync, needs a
    /// split pair.
    pub(crate) fn check_resync(&self, reverse: bool, full: bool) -> Result<(), PairError> {
        if self.backup_running() {
            return Err(self.wrong_state("a backup of its image is running"));
        }
        match (self.state(), reverse) {
            (PairState::Psus, _) => Ok(()),
            (PairState::Psue, false) => Ok(()),
            (PairState::Psue, true) => {
                Err(self.wrong_state("a suspended pair can only be resynced forward"))
            }
            (PairState::Pair | PairState::Copy, false) if full => Ok(()),
            (_, true) => {
                Err(self.wrong_state("only a split pair (PSUS) can be resynced in reverse"))
            }
            _ => Err(self.wrong_state(
                "only a split or suspended pair can be resynced (a full resync copies a mirrored \
                 one again)",
            )),
        }
    }

    /// Applies a resync (gate closed, writes drained). Forward: the changed tracks become
    /// pending (P to S), every track with `full`. Reverse: they are restored S to P, with
    /// `full` every track not pending; tracks still pending keep being copied P to S (P holds
    /// their image data).
    pub(crate) fn apply_resync(&self, reverse: bool, full: bool) {
        self.transition(false, || true, || self.resync_in_memory(reverse, full));
        self.wake_copier();
    }

    fn resync_in_memory(&self, reverse: bool, full: bool) {
        if reverse {
            if full {
                self.restore.insert_all_not_pending(&self.pending);
            }
            self.restore.absorb(&self.changed_p);
            self.restore.absorb(&self.changed_s);
            self.mark_checkpoints_restored(&self.restore);
            self.direction.store(DIR_REVERSE, Ordering::SeqCst);
        } else {
            if full {
                self.pending.mark_all();
            }
            self.pending.absorb(&self.changed_p);
            self.pending.absorb(&self.changed_s);
            // A restore cut short by an error leaves tracks whose P and S differ: with the
            // forward direction chosen, P's content wins and they are copied to S.
            self.pending.absorb(&self.restore);
            self.restore.clear();
            self.direction.store(DIR_FORWARD, Ordering::SeqCst);
        }
        self.changed_p.clear();
        self.changed_s.clear();
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.set_state(PairState::Copy);
    }

    /// Called by the copier when nothing is left to copy: COPY becomes PAIR.
    pub(crate) fn copy_finished(&self) {
        let done = || {
            self.pending.count() == 0
                && self.restore.count() == 0
                && self.state() == PairState::Copy
        };
        // Checked first without the lock: the copier asks on every idle poll in COPY.
        if !done() {
            return;
        }
        // PAIR is durable only after the copied data is.
        self.transition(true, done, || {
            self.set_state(PairState::Pair);
            self.direction.store(DIR_FORWARD, Ordering::SeqCst);
            tracing::info!(pair = %self.name, "copy complete: PAIR");
        });
    }

    /// Moves the pair to PSUE with `error` (the first error is kept).
    pub fn fail(&self, error: String) {
        self.transition(
            false,
            || self.state() != PairState::Psue,
            || {
                tracing::error!(pair = %self.name, %error, "pair suspended on error (PSUE)");
                *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                self.set_state(PairState::Psue);
            },
        );
        self.wake_all();
    }

    /// Checks that a backup may start: the pair is split and no backup runs.
    pub(crate) fn check_backup(&self) -> Result<(), PairError> {
        if self.state() != PairState::Psus {
            return Err(self.wrong_state("only a split pair (PSUS) can be backed up"));
        }
        if self.backup_running() {
            return Err(self.wrong_state("a backup of its image is already running"));
        }
        Ok(())
    }

    /// Marks a backup as running (one at a time); false if one already is.
    pub(crate) fn begin_backup(&self) -> bool {
        self.backup_frontier
            .compare_exchange(u64::MAX, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The backup has read every track before `track`.
    pub(crate) fn set_backup_frontier(&self, track: u64) {
        let old = self.backup_frontier.swap(track, Ordering::SeqCst);
        if old != track {
            self.wake_all();
        }
    }

    /// The backup ended.
    pub(crate) fn end_backup(&self) {
        self.backup_frontier.store(u64::MAX, Ordering::SeqCst);
        self.full_speed.store(false, Ordering::SeqCst);
        self.wake_all();
    }

    /// True while a backup runs.
    pub fn backup_running(&self) -> bool {
        self.backup_frontier.load(Ordering::SeqCst) != u64::MAX
    }

    /// True when a write to S on `tracks` must wait for the running backup to read them first.
    pub(crate) fn backup_holds(&self, tracks: std::ops::Range<u64>) -> bool {
        let f = self.backup_frontier.load(Ordering::SeqCst);
        f != u64::MAX && tracks.end > f
    }
}

#[cfg(test)]
mod tests {
    use crate::pair::metadata::{HeaderRecord, Metadata};
    use crate::pair::{Pair, PairConfig, PairState};
    use drivers::malloc::MallocBdev;
    use drivers::Bdev;
    use std::cell::RefCell;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    thread_local! {
        /// Run in a transition of this thread between taking its number and changing the state.
        static ON_NUMBERED: RefCell<Option<Box<dyn FnMut()>>> = RefCell::new(None);
    }

    pub(super) fn numbered() {
        ON_NUMBERED.with(|hook| {
            if let Some(f) = hook.borrow_mut().as_mut() {
                f();
            }
        });
    }

    /// A persisted pair in COPY with nothing left to copy.
    fn copied_pair() -> Arc<Pair> {
        let bdev = |name: &str| -> Arc<dyn Bdev> {
            Arc::new(MallocBdev::create(name, 1 << 20, 4096).unwrap())
        };
        let cfg = PairConfig {
            name: "t".into(),
            track_size: 65536,
            copy_rate: 0,
        };
        let (p, s) = (bdev("p"), bdev("s"));
        let rec = HeaderRecord {
            seq: 1,
            name: "t".into(),
            primary: "p".into(),
            secondary: "s".into(),
            track_size: 65536,
            tracks: 16,
            state: PairState::Copy.into(),
            reverse: false,
            split_at_ns: 0,
            error: None,
            instance: 0,
            checkpoints: Vec::new(),
        };
        let meta = Arc::new(Metadata::initialize(bdev("m"), &rec).unwrap());
        let pair = Pair::with_metadata(&cfg, p, s, Vec::new(), None, Some(meta)).unwrap();
        for t in 0..16 {
            pair.pending.clear(t);
        }
        pair
    }

    #[test]
    fn a_copy_ending_while_a_split_applies_leaves_the_split_state_to_a_newer_header() {
        let pair = copied_pair();
        let meta = Arc::clone(pair.metadata().unwrap());
        let (numbered_tx, numbered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let p = Arc::clone(&pair);
        let split = std::thread::spawn(move || {
            ON_NUMBERED.with(|hook| {
                *hook.borrow_mut() = Some(Box::new(move || {
                    let _ = numbered_tx.send(());
                    let _ = go_rx.recv();
                }))
            });
            p.apply_split(42);
        });
        // The split holds its header number and has not changed the state yet; the copy ends
        // now on the copier's thread.
        numbered_rx.recv().unwrap();
        let p = Arc::clone(&pair);
        let copy = std::thread::spawn(move || p.copy_finished());
        std::thread::sleep(Duration::from_millis(50));
        // What the metadata writer would write now: the newest header asked for, holding the
        // state read after it.
        let (written, holding) = (meta.header_wanted(), pair.state());
        go_tx.send(()).unwrap();
        split.join().unwrap();
        copy.join().unwrap();
        assert_eq!(pair.state(), PairState::Psus);
        assert!(
            pair.state() == holding || meta.header_wanted() > written,
            "header {written} was written holding {holding:?}, and the pair went to {:?} with \
             no newer header asked for",
            pair.state()
        );
    }
}
