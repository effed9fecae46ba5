//! The bridge between a pair in memory and its persisted metadata ([`super::metadata`]): the
//! header the metadata writer persists, what a host write needs durable before it is issued
//! (write-intent, changed and pending bits) and whether it is, the durability of transitions
//! and of a resync's marks, the dirty marks of P and S, and putting a pair back in the state
//! loaded metadata holds.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::metadata::{self, HeaderRecord, Loaded, MapKind, Metadata, PersistedState};
use super::state::{DIR_FORWARD, DIR_REVERSE};
use super::{Pair, PairState};

/// What a host write means in the state it relied on: the metadata it needs durable before it
/// is issued ([`Pair::prepare_write`]) and the track sets it marks when it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostWrite {
    /// A write to P in COPY or PAIR: its tracks' write-intent bits; done, its tracks become
    /// pending for the copier.
    Mirror,
    /// A write to P after the split (`split`: PSUS, the image must be kept; else PSUE); its
    /// tracks are changed on P.
    ChangedP {
        /// The pair is in PSUS.
        split: bool,
    },
    /// A write to S (the image) in PSUS; its tracks are changed on S.
    ChangedS,
}

/// Whether the metadata a host write needs is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Issue the write.
    Ready,
    /// Wait for the metadata writer.
    Wait,
    /// The metadata cannot be written: fail the write.
    Failed(String),
}

impl Pair {
    /// The persisted metadata, if the pair has some.
    pub fn metadata(&self) -> Option<&Arc<Metadata>> {
        self.meta.as_ref()
    }

    /// True when the pair's metadata can no longer be written.
    pub fn metadata_failed(&self) -> bool {
        self.meta.as_ref().is_some_and(|m| m.failure().is_some())
    }

    /// The header the metadata writer persists as number `seq`.
    pub fn header_record(&self, seq: u64) -> HeaderRecord {
        HeaderRecord {
            seq,
            name: self.name.clone(),
            primary: self.primary.name().to_string(),
            secondary: self.secondary.name().to_string(),
            track_size: self.track_size,
            tracks: self.tracks,
            state: self.state().into(),
            reverse: self.reversing(),
            split_at_ns: self.split_at_ns(),
            error: self.error(),
            instance: self.meta.as_ref().map_or(0, |m| m.instance()),
            checkpoints: self.checkpoints.records(),
        }
    }

    /// True when the header of the last transition is durable (host writes may rely on it).
    pub fn state_durable(&self) -> bool {
        self.meta
            .as_ref()
            .is_none_or(|m| m.state_durable_seq() >= self.state_seq.load(Ordering::SeqCst))
    }

    /// A line describing the persistence state, for diagnostics: header numbers and, per
    /// track that differs, the wanted and on-disk bits of each map.
    pub fn persistence_report(&self) -> String {
        let Some(m) = &self.meta else {
            return "no metadata".into();
        };
        let mut out = format!(
            "state {} seq {} durable {} idle {} failure {:?} writer polls {} stage {:#x};",
            self.state().as_str(),
            self.state_seq.load(Ordering::SeqCst),
            m.header_durable(),
            m.idle(),
            m.failure(),
            m.stats.writer_polls.load(Ordering::Relaxed),
            m.stats.writer_stage.load(Ordering::Relaxed),
        );
        for map in metadata::MAP_KINDS {
            let set = m.map(map);
            for t in 0..self.tracks {
                if set.wanted(t) != set.on_disk(t) {
                    out.push_str(&format!(
                        " {map:?}[{t}] want {} disk {};",
                        set.wanted(t),
                        set.on_disk(t)
                    ));
                }
            }
        }
        out
    }

    /// A write to P (`on_p`) or S completed: the device needs a flush before the metadata
    /// relies on it.
    pub(crate) fn note_write(&self, on_p: bool) {
        let flag = if on_p { &self.p_dirty } else { &self.s_dirty };
        if !flag.load(Ordering::Relaxed) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Takes the dirty mark of P (`on_p`) or S: true when it needs a flush.
    pub(crate) fn take_dirty(&self, on_p: bool) -> bool {
        let flag = if on_p { &self.p_dirty } else { &self.s_dirty };
        flag.swap(false, Ordering::SeqCst)
    }

    /// Records in the metadata what a host write on `tracks` needs durable before it is issued.
    pub(crate) fn prepare_write(&self, kind: HostWrite, tracks: std::ops::Range<u64>) {
        let Some(m) = &self.meta else {
            if kind != HostWrite::ChangedS {
                tracks.for_each(|t| self.mark_checkpoints(t));
            }
            return;
        };
        for t in tracks {
            match kind {
                HostWrite::Mirror => {
                    m.touch(t);
                    m.want_set_region(MapKind::Pending, t, self.tracks);
                    self.mark_checkpoints(t);
                }
                HostWrite::ChangedP { split } => {
                    m.want_set_region(MapKind::ChangedP, t, self.tracks);
                    self.mark_checkpoints(t);
                    if split {
                        // P changes: the track must not read as "P holds the image" after a
                        // crash.
                        m.want_clear(MapKind::Pending, t);
                    }
                }
                HostWrite::ChangedS => {
                    m.want_set_region(MapKind::ChangedS, t, self.tracks);
                    m.want_clear(MapKind::Pending, t);
                }
            }
        }
        self.wake_copier();
    }

    /// Whether what [`Pair::prepare_write`] asked for is durable.
    pub(crate) fn write_durability(
        &self,
        kind: HostWrite,
        tracks: std::ops::Range<u64>,
    ) -> Durability {
        let Some(m) = &self.meta else {
            return Durability::Ready;
        };
        if let Some(e) = m.failure() {
            return Durability::Failed(e);
        }
        let pending = m.map(MapKind::Pending);
        let ready = match kind {
            HostWrite::Mirror => tracks
                .into_iter()
                .all(|t| pending.durable(t) == Some(true) && self.checkpoint_marks_durable(t)),
            HostWrite::ChangedP { split } => {
                let changed = m.map(MapKind::ChangedP);
                tracks.into_iter().all(|t| {
                    changed.durable(t) == Some(true)
                        && (!split || pending.durable(t) == Some(false))
                        && self.checkpoint_marks_durable(t)
                })
            }
            HostWrite::ChangedS => {
                let changed = m.map(MapKind::ChangedS);
                tracks
                    .into_iter()
                    .all(|t| changed.durable(t) == Some(true) && pending.durable(t) == Some(false))
            }
        };
        if ready {
            Durability::Ready
        } else {
            Durability::Wait
        }
    }

    /// A verification found S differing from P on `track` where the pair holds them equal:
    /// makes the track pending again so the copier copies it, with its pending bit durable
    /// first (as a mirrored write's). `Wait` until that bit is durable (call again); `Failed`
    /// when the metadata cannot be written or the pair no longer mirrors (nothing marked).
    pub(crate) fn mark_for_recopy(&self, track: u64) -> Durability {
        if let Some(m) = &self.meta {
            if let Some(e) = m.failure() {
                return Durability::Failed(format!("pair metadata cannot be written: {e}"));
            }
            // Touched: the cleaner leaves the region's bits alone while the bit is written.
            m.touch(track);
            m.want_set_region(MapKind::Pending, track, self.tracks);
            if m.map(MapKind::Pending).durable(track) != Some(true) {
                self.wake_copier();
                return Durability::Wait;
            }
        }
        // Counted on the track like a mirrored write while it trusts the state: a split landing
        // now makes post-split users of the track wait until it is marked, so it is pending
        // (copied before P changes) in the image too.
        let tracks = track..track + 1;
        self.begin_mirrored_write(tracks.clone());
        let mirroring =
            matches!(self.state(), PairState::Pair | PairState::Copy) && !self.reversing();
        if mirroring && self.pending.mark_pending(track) {
            self.wake_copier();
        }
        self.end_mirrored_write(tracks);
        if mirroring {
            Durability::Ready
        } else {
            Durability::Failed(format!(
                "pair '{}' is in {}, no longer mirroring",
                self.name,
                self.state().as_str()
            ))
        }
    }

    /// Puts a pair just created with loaded metadata in the state the disk holds. In COPY and
    /// PAIR, tracks marked changed are pending too (a suspension or split whose header never
    /// became durable left them); in PSUS and PSUE the pending map is exactly what S lacks.
    pub fn apply_loaded(&self, loaded: &Loaded) -> Result<(), String> {
        let h = &loaded.header;
        if h.name != self.name
            || h.primary != self.primary.name()
            || h.secondary != self.secondary.name()
            || h.track_size != self.track_size
            || h.tracks != self.tracks
        {
            return Err(format!(
                "the metadata is of another pair ({} over {} and {}, {} tracks of {} bytes)",
                h.name, h.primary, h.secondary, h.tracks, h.track_size
            ));
        }
        let state = match &h.state {
            PersistedState::Known(state) => *state,
            PersistedState::Unknown(other) => return Err(format!("unknown state {other}")),
        };
        let [pending, changed_p, changed_s, restore] = match &loaded.maps[..] {
            [p, cp, cs, r, ..] => [p, cp, cs, r],
            _ => return Err("the metadata lacks maps".into()),
        };
        let reverse = h.reverse && state == PairState::Copy;
        match state {
            PairState::Copy | PairState::Pair => {
                let merged: Vec<u64> = (0..pending.len())
                    .map(|w| {
                        let changed = changed_p[w] | changed_s[w];
                        if reverse {
                            pending[w]
                        } else {
                            pending[w] | changed
                        }
                    })
                    .collect();
                self.pending.load_words(&merged);
                if reverse {
                    let r: Vec<u64> = (0..restore.len())
                        .map(|w| restore[w] | changed_p[w] | changed_s[w])
                        .collect();
                    self.restore.load_words(&r);
                } else {
                    self.restore.load_words(&[]);
                }
                self.changed_p.load_words(&[]);
                self.changed_s.load_words(&[]);
            }
            PairState::Psus | PairState::Psue => {
                self.pending.load_words(pending);
                self.changed_p.load_words(changed_p);
                self.changed_s.load_words(changed_s);
                // A split follows PAIR or a forward copy, never a restore: restore bits under a
                // PSUS header are a finished restore's the cleaner had not cleared yet. Taken
                // as live, the copier would copy S over P's newer writes. (PSUE keeps them: a
                // restore that failed leaves tracks where P and S differ.)
                if state == PairState::Psue {
                    self.restore.load_words(restore);
                } else {
                    self.restore.load_words(&[]);
                }
            }
        }
        self.restore_state(state, reverse, h.split_at_ns, h.error.clone());
        // A restore under way, or cut short, changed P on the tracks it restores.
        let restoring = (self.restore.count() > 0).then(|| {
            (0..self.tracks.div_ceil(64) as usize)
                .map(|w| self.restore.raw_word(w))
                .collect()
        });
        self.load_checkpoints(&h.checkpoints, &loaded.maps, restoring)?;
        if let Some(m) = &self.meta {
            // The maps on disk move to what memory now holds; none of it is on a write path.
            m.want_exactly(MapKind::Pending, |w| {
                pending.get(w).copied().unwrap_or(0) | self.pending.bits64(w)
            });
            // Changed bits stay on disk until the next resync empties them (a superset costs
            // a few extra copies, clearing them before the pending bits are durable could lose
            // tracks); restore bits go through the cleaner's rules (P flushed first).
            m.want_exactly(MapKind::Restore, |w| self.restore.raw_word(w));
        }
        Ok(())
    }

    /// Sets state, direction, split point and error from loaded metadata (before the pair
    /// serves).
    pub(crate) fn restore_state(
        &self,
        state: PairState,
        reverse: bool,
        split_at_ns: u64,
        error: Option<String>,
    ) {
        self.direction.store(
            if reverse { DIR_REVERSE } else { DIR_FORWARD },
            Ordering::SeqCst,
        );
        self.split_at_ns.store(split_at_ns, Ordering::SeqCst);
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = error;
        self.set_state(state);
    }

    /// Marks every track pending and suspends the pair (untrusted metadata): a forward resync
    /// then copies everything.
    pub fn distrust(&self, error: String) {
        self.pending.mark_all();
        if let Some(m) = &self.meta {
            m.want_exactly(MapKind::Pending, |w| self.pending.bits64(w));
        }
        self.fail(error);
    }

    /// After a resync's header is durable (gate still closed, writes drained): the tracks it
    /// copies are marked in the persisted maps, and the changed maps emptied once those marks
    /// are durable ([`Pair::resync_persisted`] tells when).
    pub(crate) fn persist_resync(&self) {
        let Some(m) = &self.meta else { return };
        let words = self.tracks.div_ceil(64) as usize;
        for w in 0..words {
            m.want_set_word(MapKind::Pending, w, self.pending.bits64(w));
            m.want_set_word(MapKind::Restore, w, self.restore.raw_word(w));
        }
        self.persist_checkpoint_marks();
        self.wake_copier();
    }

    /// True once the marks of [`Pair::persist_resync`] are durable; then empties the changed
    /// maps on disk (lazily).
    pub(crate) fn resync_persisted(&self) -> bool {
        let Some(m) = &self.meta else { return true };
        if m.failure().is_some() {
            return true;
        }
        let words = self.tracks.div_ceil(64) as usize;
        let (d, r) = (m.map(MapKind::Pending), m.map(MapKind::Restore));
        let durable = (0..words).all(|w| {
            !d.word_in_flight(w)
                && !r.word_in_flight(w)
                && d.disk_word(w) & self.pending.bits64(w) == self.pending.bits64(w)
                && r.disk_word(w) & self.restore.raw_word(w) == self.restore.raw_word(w)
        });
        let durable = durable && self.checkpoint_marks_persisted();
        if durable {
            m.want_exactly(MapKind::ChangedP, |_| 0);
            m.want_exactly(MapKind::ChangedS, |_| 0);
            self.wake_copier();
        }
        durable
    }

    /// For a clean stop (gate closed, writes drained): the checkpoints' maps, and a split
    /// pair's changed maps, supersets by region on disk while hosts write, become exactly what
    /// memory holds. (In COPY and PAIR memory holds no changed track, and bits a restart merged
    /// into pending stay on disk until those pending bits are durable: they are left alone.)
    pub fn exact_changed_for_stop(&self) {
        self.exact_checkpoints_for_stop();
        if !matches!(self.state(), PairState::Psus | PairState::Psue) {
            return;
        }
        if let Some(m) = &self.meta {
            m.want_exactly(MapKind::ChangedP, |w| self.changed_p.raw_word(w));
            m.want_exactly(MapKind::ChangedS, |w| self.changed_s.raw_word(w));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use drivers::malloc::MallocBdev;
    use drivers::Bdev;

    use crate::pair::metadata::{HeaderRecord, Metadata, PersistedState};
    use crate::pair::{Pair, PairConfig, PairState};

    /// A new pair given metadata whose header holds `state`, written and loaded back.
    fn apply(state: PersistedState) -> (Arc<Pair>, Result<(), String>) {
        let bdev = |name: &str| -> Arc<dyn Bdev> {
            Arc::new(MallocBdev::create(name, 1 << 20, 4096).unwrap())
        };
        let rec = HeaderRecord {
            seq: 1,
            name: "t".into(),
            primary: "p".into(),
            secondary: "s".into(),
            track_size: 65536,
            tracks: 16,
            state,
            reverse: false,
            split_at_ns: 7,
            error: None,
            instance: 0,
            checkpoints: Vec::new(),
        };
        let m = bdev("m");
        Metadata::initialize(Arc::clone(&m), &rec).unwrap();
        let (meta, loaded) = Metadata::load(m, 16).unwrap();
        let cfg = PairConfig {
            name: "t".into(),
            track_size: 65536,
            copy_rate: 0,
        };
        let meta = Some(Arc::new(meta));
        let pair = Pair::with_metadata(&cfg, bdev("p"), bdev("s"), Vec::new(), None, meta).unwrap();
        let applied = pair.apply_loaded(&loaded);
        (pair, applied)
    }

    #[test]
    fn loaded_metadata_sets_the_state_it_holds_and_an_unknown_state_is_refused() {
        let (pair, applied) = apply(PairState::Psus.into());
        assert_eq!(applied, Ok(()));
        assert_eq!(pair.state(), PairState::Psus);
        assert_eq!(pair.split_at_ns(), 7);
        let (_, applied) = apply(PersistedState::Unknown("SPLIT".into()));
        assert_eq!(applied, Err("unknown state SPLIT".to_string()));
    }
}
