//! Checkpoints: named split points of completed backups, and the tracks P changed since each,
//! what an incremental backup copies.
//!
//! Each checkpoint owns a slot: the tracks P changed from its split to the next checkpoint's
//! (the newest's: to now), exact in memory and persisted in a map of its own (set by region
//! while hosts write, like the changed maps: a superset). The tracks changed since a checkpoint
//! are the union of its slot and every newer one's. Host writes to P mark only the newest slot
//! (two while a checkpoint is being made or merged), so they cost the same with one checkpoint
//! or eight, and a split touches none of them.
//!
//! Making checkpoint N at the end of its backup (the backup still running, so the pair is still
//! in the backup's split and `changed_p` holds what P changed since it):
//! 1. gate closed, writes drained: N's slot becomes `changed_p`, and host writes to P from then
//!    on mark N's slot besides the newest one's;
//! 2. gate open, until N's slot is durable;
//! 3. gate closed, drained: N is listed and its slot is the only one marked; the gate opens
//!    once the header listing N is durable.
//!
//! A crash before that header leaves the former newest slot, marked all along, covering
//! everything since its split; one after it leaves N's slot complete. Deleting a checkpoint
//! merges its slot into the next older one's (if any) the same way. A reverse resync changes P:
//! the tracks it restores join the newest slot before the copy starts.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use super::bitmap::TrackSet;
use super::metadata::{CheckpointRecord, MapKind, CHECKPOINT_SLOTS};
use super::{Pair, PairError};

/// A pair holds this many checkpoints at most.
pub const MAX_CHECKPOINTS: usize = CHECKPOINT_SLOTS;
/// Longest checkpoint name.
const MAX_NAME: usize = 64;

/// What `checkpoint_list` reports of a checkpoint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The pair.
    pub pair: String,
    /// Name.
    pub name: String,
    /// The split instant it stands for, ns since the epoch.
    pub split_at_ns: u64,
    /// The backup that made it.
    pub backup_id: u64,
    /// Tracks P changed since it.
    pub changed_tracks: u64,
}

/// A pair's checkpoints.
pub(crate) struct Checkpoints {
    /// Per slot, the tracks P changed in the span it covers.
    slots: Vec<TrackSet>,
    /// Listed checkpoints, oldest first.
    list: Mutex<Vec<CheckpointRecord>>,
    /// The slots host writes to P mark, one bit each. Grows only while host writes are drained
    /// (a write checks the durability of the slots it marked).
    marking: AtomicU32,
    /// A restore's tracks were added to the marked slots: the copier restores none until they
    /// are durable.
    restore_held: AtomicBool,
}

impl Checkpoints {
    pub(crate) fn new(tracks: u64) -> Self {
        Self {
            slots: (0..CHECKPOINT_SLOTS)
                .map(|_| TrackSet::new(tracks))
                .collect(),
            list: Mutex::new(Vec::new()),
            marking: AtomicU32::new(0),
            restore_held: AtomicBool::new(false),
        }
    }

    fn list(&self) -> MutexGuard<'_, Vec<CheckpointRecord>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The listed checkpoints, oldest first (for the header).
    pub(crate) fn records(&self) -> Vec<CheckpointRecord> {
        self.list().clone()
    }

    /// The slots host writes to P mark now.
    pub(crate) fn marking(&self) -> impl Iterator<Item = usize> {
        let mask = self.marking.load(Ordering::SeqCst);
        (0..CHECKPOINT_SLOTS).filter(move |s| mask >> s & 1 != 0)
    }
}

/// Checks a checkpoint name: 1 to 64 letters, digits, `.`, `_` or `-` (it appears in NBD
/// context names and archive manifests).
pub fn check_name(name: &str) -> Result<(), PairError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(PairError::Invalid(format!(
            "checkpoint name '{name}' must be 1 to {MAX_NAME} letters, digits, '.', '_' or '-'"
        )))
    }
}

impl Pair {
    fn has_checkpoint_slots(&self) -> bool {
        self.meta
            .as_ref()
            .is_none_or(|m| m.layout().has_checkpoints())
    }

    /// Checks that a checkpoint `name` can be made: a valid name no checkpoint of the pair
    /// has, a free slot, and metadata with room for it.
    pub fn check_new_checkpoint(&self, name: &str) -> Result<(), PairError> {
        check_name(name)?;
        if !self.has_checkpoint_slots() {
            return Err(PairError::Invalid(format!(
                "pair '{}' has metadata made before checkpoints existed (format 1): delete and \
                 create the pair again to use checkpoints",
                self.name
            )));
        }
        let list = self.checkpoints.list();
        if list.iter().any(|c| c.name == name) {
            return Err(PairError::Invalid(format!(
                "pair '{}' already has a checkpoint named '{name}'",
                self.name
            )));
        }
        if list.len() >= MAX_CHECKPOINTS {
            return Err(PairError::Invalid(format!(
                "pair '{}' holds {MAX_CHECKPOINTS} checkpoints, the most it can: delete one first \
                 (checkpoint_delete)",
                self.name
            )));
        }
        Ok(())
    }

    /// The pair's checkpoints, oldest first.
    pub fn checkpoint_infos(&self) -> Vec<CheckpointInfo> {
        let list = self.checkpoints.records();
        list.iter()
            .enumerate()
            .map(|(i, c)| CheckpointInfo {
                pair: self.name.clone(),
                name: c.name.clone(),
                split_at_ns: c.split_at_ns,
                backup_id: c.backup_id,
                changed_tracks: self
                    .union_of(&list[i..])
                    .iter()
                    .map(|w| w.count_ones() as u64)
                    .sum(),
            })
            .collect()
    }

    /// The union of the slots of `records`, 64 tracks a word.
    fn union_of(&self, records: &[CheckpointRecord]) -> Vec<u64> {
        let words = self.tracks.div_ceil(64) as usize;
        let mut out = vec![0u64; words];
        for c in records {
            let slot = &self.checkpoints.slots[c.slot as usize];
            for (w, v) in out.iter_mut().enumerate() {
                *v |= slot.raw_word(w);
            }
        }
        out
    }

    /// The listed checkpoints and the place of the one named `name` among them.
    fn checkpoint_named(&self, name: &str) -> Result<(Vec<CheckpointRecord>, usize), PairError> {
        let list = self.checkpoints.records();
        match list.iter().position(|c| c.name == name) {
            Some(i) => Ok((list, i)),
            None => Err(PairError::Invalid(format!(
                "pair '{}' has no checkpoint named '{name}'",
                self.name
            ))),
        }
    }

    /// The tracks P changed since checkpoint `name` (a superset), 64 tracks a word, and the
    /// checkpoint's split instant.
    pub fn changed_since(&self, name: &str) -> Result<(Vec<u64>, u64), PairError> {
        let (list, i) = self.checkpoint_named(name)?;
        Ok((self.union_of(&list[i..]), list[i].split_at_ns))
    }

    /// The tracks where the image now may differ from checkpoint `name`'s image (a superset),
    /// 64 tracks a word: what P changed since the checkpoint and what hosts wrote to the
    /// image since the split. What an incremental backup stores and a dirty bitmap shows.
    pub fn changed_since_for_incremental(&self, name: &str) -> Result<Vec<u64>, PairError> {
        let (mut words, _) = self.changed_since(name)?;
        for (w, v) in words.iter_mut().enumerate() {
            *v |= self.changed_s.raw_word(w);
        }
        Ok(words)
    }

    /// A host write to P is about to change track `t`: the slots marked now get it, in memory
    /// exactly and on disk by region.
    pub(crate) fn mark_checkpoints(&self, t: u64) {
        for s in self.checkpoints.marking() {
            self.checkpoints.slots[s].insert(t);
            if let Some(m) = &self.meta {
                m.want_set_region(MapKind::checkpoint(s), t, self.tracks);
            }
        }
    }

    /// True when the marks of [`Pair::mark_checkpoints`] for `t` are durable.
    pub(crate) fn checkpoint_marks_durable(&self, t: u64) -> bool {
        let Some(m) = &self.meta else { return true };
        self.checkpoints
            .marking()
            .all(|s| m.map(MapKind::checkpoint(s)).durable(t) == Some(true))
    }

    /// For a clean stop (gate closed, writes drained): each checkpoint's map on disk becomes
    /// exactly its slot in memory (host writes set them by region).
    pub(crate) fn exact_checkpoints_for_stop(&self) {
        let Some(m) = &self.meta else { return };
        for c in self.checkpoints.records() {
            let slot = &self.checkpoints.slots[c.slot as usize];
            m.want_exactly(MapKind::checkpoint(c.slot as usize), |w| slot.raw_word(w));
        }
    }

    /// The tracks of word `w` whose bits every marked slot surely holds on disk.
    pub(crate) fn checkpoint_marks_durable_word(&self, w: usize) -> u64 {
        let Some(m) = &self.meta else { return u64::MAX };
        self.checkpoints.marking().fold(u64::MAX, |acc, s| {
            let map = m.map(MapKind::checkpoint(s));
            if map.word_in_flight(w) {
                0
            } else {
                acc & map.disk_word(w)
            }
        })
    }

    /// A reverse resync is about to restore the tracks of `restore` onto P (gate closed,
    /// drained): they are changes of P since every checkpoint.
    pub(crate) fn mark_checkpoints_restored(&self, restore: &TrackSet) {
        for s in self.checkpoints.marking() {
            self.checkpoints.slots[s].absorb(restore);
            self.checkpoints.restore_held.store(true, Ordering::SeqCst);
        }
        self.persist_checkpoint_marks();
    }

    /// Asks for the marked slots' bits on disk (a restore added tracks to them).
    pub(crate) fn persist_checkpoint_marks(&self) {
        let Some(m) = &self.meta else { return };
        let words = self.tracks.div_ceil(64) as usize;
        for s in self.checkpoints.marking() {
            let slot = &self.checkpoints.slots[s];
            for w in 0..words {
                m.want_set_word(MapKind::checkpoint(s), w, slot.raw_word(w));
            }
        }
    }

    /// True when the copier may restore tracks onto P: the checkpoints hold them durably.
    pub(crate) fn restore_allowed(&self) -> bool {
        if !self.checkpoints.restore_held.load(Ordering::SeqCst) {
            return true;
        }
        if self.checkpoint_marks_persisted() {
            self.checkpoints.restore_held.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// True once the disk holds every bit the marked slots hold in memory.
    pub(crate) fn checkpoint_marks_persisted(&self) -> bool {
        self.checkpoints.marking().all(|s| self.slot_durable(s))
    }

    fn slot_durable(&self, s: usize) -> bool {
        let Some(m) = &self.meta else { return true };
        if m.failure().is_some() {
            return true;
        }
        let map = m.map(MapKind::checkpoint(s));
        let slot = &self.checkpoints.slots[s];
        (0..self.tracks.div_ceil(64) as usize).all(|w| {
            let want = slot.raw_word(w);
            want == 0 || (!map.word_in_flight(w) && map.disk_word(w) & want == want)
        })
    }

    /// Step 1 of making a checkpoint (gate closed, writes drained): takes a free slot, fills it
    /// with what P changed since the split and what hosts wrote to the image (the checkpoint's
    /// image differs from P at the split there), and has host writes mark it. Returns the slot.
    pub(crate) fn begin_checkpoint(
        &self,
        name: &str,
        split_at_ns: u64,
    ) -> Result<usize, PairError> {
        self.check_new_checkpoint(name)?;
        if self.split_at_ns() != split_at_ns {
            return Err(PairError::Invalid(format!(
                "pair '{}' was resynced since the backup's split: no checkpoint can stand for it",
                self.name
            )));
        }
        let used: u32 = self
            .checkpoints
            .records()
            .iter()
            .fold(self.checkpoints.marking.load(Ordering::SeqCst), |m, c| {
                m | 1 << c.slot
            });
        let slot = (0..CHECKPOINT_SLOTS)
            .find(|s| used >> s & 1 == 0)
            .ok_or_else(|| PairError::Invalid("no free checkpoint slot".into()))?;
        let set = &self.checkpoints.slots[slot];
        set.clear();
        set.absorb(&self.changed_p);
        set.absorb(&self.changed_s);
        if let Some(m) = &self.meta {
            m.want_exactly(MapKind::checkpoint(slot), |w| set.raw_word(w));
        }
        self.checkpoints
            .marking
            .fetch_or(1 << slot, Ordering::SeqCst);
        self.wake_copier();
        Ok(slot)
    }

    /// True once the slot of a checkpoint being made (or merged into) is durable.
    pub(crate) fn checkpoint_slot_durable(&self, slot: usize) -> bool {
        self.slot_durable(slot)
    }

    /// Step 3 of making a checkpoint (gate closed, drained): lists it, makes its slot the only
    /// one marked, and asks for the header.
    pub(crate) fn commit_checkpoint(&self, record: CheckpointRecord) {
        let slot = record.slot;
        self.transition(
            false,
            || true,
            || {
                self.checkpoints.list().push(record);
                self.checkpoints.marking.store(1 << slot, Ordering::SeqCst);
            },
        );
    }

    /// A checkpoint listed whose header can never be written (the metadata failed): unlisted,
    /// host writes mark the newest remaining slot.
    pub(crate) fn forget_checkpoint(&self, name: &str) {
        let mut list = self.checkpoints.list();
        list.retain(|c| c.name != name);
        let mask = list.last().map_or(0, |c| 1 << c.slot);
        self.checkpoints.marking.store(mask, Ordering::SeqCst);
    }

    /// A failed step 1 or 2: host writes stop marking `slot` (gate closed, drained).
    pub(crate) fn abandon_checkpoint(&self, slot: usize) {
        self.checkpoints
            .marking
            .fetch_and(!(1 << slot), Ordering::SeqCst);
    }

    /// Step 1 of deleting checkpoint `name` (gate closed, drained): merges its slot into the
    /// next older checkpoint's, which host writes then mark too if the deleted one was the
    /// newest. Returns that older slot, if any, to wait for.
    pub(crate) fn begin_checkpoint_delete(&self, name: &str) -> Result<Option<usize>, PairError> {
        let (list, i) = self.checkpoint_named(name)?;
        if i == 0 {
            return Ok(None);
        }
        let (older, gone) = (list[i - 1].slot as usize, list[i].slot as usize);
        let into = &self.checkpoints.slots[older];
        into.absorb(&self.checkpoints.slots[gone]);
        if let Some(m) = &self.meta {
            for w in 0..self.tracks.div_ceil(64) as usize {
                m.want_set_word(MapKind::checkpoint(older), w, into.raw_word(w));
            }
        }
        if i + 1 == list.len() {
            self.checkpoints
                .marking
                .fetch_or(1 << older, Ordering::SeqCst);
        }
        self.wake_copier();
        Ok(Some(older))
    }

    /// Step 2 of deleting checkpoint `name` (gate closed, drained): unlists it and asks for the
    /// header; host writes mark the newest remaining slot only.
    pub(crate) fn commit_checkpoint_delete(&self, name: &str) {
        self.transition(
            false,
            || true,
            || {
                let mut list = self.checkpoints.list();
                list.retain(|c| c.name != name);
                let mask = list.last().map_or(0, |c| 1 << c.slot);
                self.checkpoints.marking.store(mask, Ordering::SeqCst);
            },
        );
    }

    /// Puts back the checkpoints loaded metadata lists: each slot as the disk holds it, the
    /// newest marked; a reverse resync the crash interrupted adds what it restores (and what it
    /// was about to) to the newest, as the resync did before its copy started.
    pub(crate) fn load_checkpoints(
        &self,
        records: &[CheckpointRecord],
        maps: &[Vec<u64>],
        restoring: Option<Vec<u64>>,
    ) -> Result<(), String> {
        let mut seen = 0u32;
        for c in records {
            let s = c.slot as usize;
            if s >= CHECKPOINT_SLOTS || seen >> s & 1 != 0 {
                return Err(format!("checkpoint '{}' has a bad slot {s}", c.name));
            }
            seen |= 1 << s;
            let words = maps
                .get(super::metadata::BASE_MAPS + s)
                .ok_or_else(|| format!("checkpoint '{}' has no map", c.name))?;
            self.checkpoints.slots[s].load_words(words);
        }
        if let (Some(newest), Some(extra)) = (records.last(), restoring) {
            let s = newest.slot as usize;
            let set = &self.checkpoints.slots[s];
            let words: Vec<u64> = extra
                .iter()
                .enumerate()
                .map(|(w, v)| v | set.raw_word(w))
                .collect();
            set.load_words(&words);
            if let Some(m) = &self.meta {
                for (w, v) in words.iter().enumerate() {
                    m.want_set_word(MapKind::checkpoint(s), w, *v);
                }
            }
            self.checkpoints.restore_held.store(true, Ordering::SeqCst);
        }
        *self.checkpoints.list() = records.to_vec();
        let mask = records.last().map_or(0, |c| 1 << c.slot);
        self.checkpoints.marking.store(mask, Ordering::SeqCst);
        Ok(())
    }
}
