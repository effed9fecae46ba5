//! Pairs: a primary volume P mirrored to a secondary S, split at an instant, resynced after.
//!
//! A [`Pair`] holds everything about one pair in one place (configuration, state, split point,
//! error, the pending, changed and restore track sets, per-track locks, counters), shaped so
//! that it can be persisted and restored as a whole.
//!
//! Who does what:
//! - hosts reach P and the image through [`channel::PairChannel`]s (the bdevs returned by
//!   [`Pair::primary_view`] and [`Pair::image_view`]), one per reactor;
//! - the copier poller ([`copier`]) copies pending tracks P to S (and, in a restore, S to P);
//! - the control poller ([`control`]) applies transitions that must not interleave with host
//!   writes (split, resync): it closes the gate of the pairs involved, waits for the writes in
//!   flight to finish, applies the transition and reopens the gate. That wait is bounded by one
//!   host write, not by the volume size or the pending set.

pub mod bitmap;
pub mod channel;
pub mod control;
pub mod copier;
pub mod metadata;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crossbeam_queue::ArrayQueue;
use drivers::{Bdev, Geometry};
use serde::Serialize;

use crate::reactor::ReactorHandle;
use bitmap::{PendingMap, TrackLocks, TrackSet};
use metadata::{HeaderRecord, Loaded, MapKind, Metadata};

/// Hash slots counting mirrored writes in flight.
const MIRRORED_SLOTS: u64 = 4096;

/// Most tracks a pair may have (its bitmaps take about 9 bits per track in memory).
pub const MAX_TRACKS: u64 = 1 << 28;

/// Default track size.
pub const DEFAULT_TRACK_SIZE: u64 = 64 << 10;

/// A pair's state (design section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PairState {
    /// Copying: the initial copy or a resync (forward P to S, or reverse S to P).
    #[serde(rename = "COPY")]
    Copy,
    /// Mirroring: writes to P are reflected to S in the background.
    #[serde(rename = "PAIR")]
    Pair,
    /// Split: S stands for P at the split point.
    #[serde(rename = "PSUS")]
    Psus,
    /// Suspended on an I/O error.
    #[serde(rename = "PSUE")]
    Psue,
}

impl PairState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => PairState::Copy,
            1 => PairState::Pair,
            2 => PairState::Psus,
            _ => PairState::Psue,
        }
    }

    /// The name `pair_get` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PairState::Copy => "COPY",
            PairState::Pair => "PAIR",
            PairState::Psus => "PSUS",
            PairState::Psue => "PSUE",
        }
    }
}

/// Errors of pair operations.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PairError {
    /// Parameters are unusable.
    #[error("{0}")]
    Invalid(String),
    /// The operation does not apply in the pair's state.
    #[error("pair '{name}' is in {state}: {what}")]
    WrongState {
        /// The pair.
        name: String,
        /// Its state.
        state: &'static str,
        /// What was refused.
        what: String,
    },
    /// No such pair.
    #[error("no pair named '{0}'")]
    NotFound(String),
    /// The engine is stopping.
    #[error("the engine is stopping")]
    Stopping,
}

/// Counters of the work a pair's machinery did.
#[derive(Debug, Default)]
pub struct PairStats {
    /// Tracks copied P to S (background copy and copy before write).
    pub tracks_copied: AtomicU64,
    /// Of those, copies made before a host write (or an S write) on a pending track.
    pub cow_copies: AtomicU64,
    /// Tracks copied S to P by a restore.
    pub tracks_restored: AtomicU64,
    /// Bytes the pair machinery read from P or S (copies and image reads).
    pub bytes_read: AtomicU64,
    /// Bytes the pair machinery wrote to P or S on its own behalf (copies).
    pub bytes_copied: AtomicU64,
    /// Payload bytes copied by the CPU (bounce buffers of reads mixing P and S).
    pub cpu_copied_bytes: AtomicU64,
    /// Bitmap words the copier scanned looking for work.
    pub words_scanned: AtomicU64,
    /// Splits applied, and the nanoseconds the last one took inside the engine.
    pub splits: AtomicU64,
    /// Nanoseconds of the last split, from request to gates reopened.
    pub last_split_ns: AtomicU64,
    /// Requests hosts sent through the pair's views (a backup watches it to yield to them).
    pub host_requests: AtomicU64,
    /// Tracks that started and finished moving from pending to copied: `pair_get` reads the
    /// pending and copied counts when none is between the two, so each track is in exactly one.
    moves_started: AtomicU64,
    moves_finished: AtomicU64,
}

impl PairStats {
    /// Marks track `track` copied to S: `clear` takes it out of the pending set (true when it
    /// was pending, which counts it as copied). Readers of both counts never see it in neither
    /// or both.
    pub(crate) fn move_to_copied(&self, clear: impl FnOnce() -> bool) {
        self.moves_started.fetch_add(1, Ordering::SeqCst);
        if clear() {
            self.tracks_copied.fetch_add(1, Ordering::SeqCst);
        }
        self.moves_finished.fetch_add(1, Ordering::SeqCst);
    }

    /// `(pending, copied)` taken while no track was moving between them. A mover is never
    /// blocked: the reader retries, and waits for a mover that was preempted mid-move (up to
    /// [`PairStats::CONSISTENT_WAIT`], after which the last reading is returned).
    fn pending_and_copied(&self, pending: impl Fn() -> u64) -> (u64, u64) {
        let deadline = std::time::Instant::now() + Self::CONSISTENT_WAIT;
        let mut tries = 0u32;
        loop {
            let finished = self.moves_finished.load(Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            let reading = (pending(), self.tracks_copied.load(Ordering::SeqCst));
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.moves_started.load(Ordering::SeqCst) == finished {
                return reading;
            }
            tries += 1;
            if tries < 256 {
                std::hint::spin_loop();
            } else if std::time::Instant::now() >= deadline {
                return reading;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// How long `pair_get` waits for a track move to finish; a move takes well under a
    /// microsecond unless its thread is preempted.
    const CONSISTENT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
}

/// Watches a pair's host requests for the engine's own work on it (backups, urgent copies),
/// which keeps less I/O in flight while hosts are active so host requests do not queue behind
/// it.
#[derive(Debug)]
pub(crate) struct HostWatch {
    seen: u64,
    until: std::time::Instant,
    /// A host request was seen since the watch began.
    any: bool,
}

impl HostWatch {
    /// Hosts count as active until this long after their last request.
    const QUIET: std::time::Duration = std::time::Duration::from_millis(100);

    /// Hosts count as active for a first quiet period: a request made just before the watch
    /// began is not seen, and the work must not start at full depth under a busy host.
    pub(crate) fn new(pair: &Pair) -> Self {
        Self {
            seen: pair.stats.host_requests.load(Ordering::Relaxed),
            until: std::time::Instant::now() + Self::QUIET,
            any: false,
        }
    }

    /// True once a host request was seen since the watch began.
    pub(crate) fn seen_any(&self) -> bool {
        self.any
    }

    /// True while hosts use `pair` (a request seen within the last [`HostWatch::QUIET`]).
    pub(crate) fn active(&mut self, pair: &Pair) -> bool {
        let seen = pair.stats.host_requests.load(Ordering::Relaxed);
        let now = std::time::Instant::now();
        if seen != self.seen {
            self.seen = seen;
            self.until = now + Self::QUIET;
            self.any = true;
        }
        now < self.until
    }
}

/// What `pair_get` reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PairInfo {
    /// Name.
    pub name: String,
    /// State.
    pub state: PairState,
    /// `forward` or `reverse` while copying.
    pub direction: &'static str,
    /// Primary bdev.
    pub primary: String,
    /// Secondary bdev.
    pub secondary: String,
    /// Track size in bytes.
    pub track_size: u64,
    /// Number of tracks.
    pub tracks: u64,
    /// Tracks S still lacks (plus tracks P still lacks in a restore).
    pub pending_tracks: u64,
    /// Tracks written on P or S since the split (what a resync copies).
    pub changed_tracks: u64,
    /// Split instant, nanoseconds since the Unix epoch (0 before the first split).
    pub split_at_ns: u64,
    /// The error that suspended the pair.
    pub error: Option<String>,
    /// Copy rate limit in bytes per second (0 = unlimited).
    pub copy_rate: u64,
    /// Tracks copied P to S so far.
    pub copied_tracks: u64,
    /// Of those, copies before write.
    pub cow_copies: u64,
    /// Tracks copied S to P by restores.
    pub restored_tracks: u64,
}

const DIR_FORWARD: u8 = 0;
const DIR_REVERSE: u8 = 1;

/// One pair.
pub struct Pair {
    name: String,
    primary: Arc<dyn Bdev>,
    secondary: Arc<dyn Bdev>,
    geometry: Geometry,
    track_size: u64,
    tracks: u64,
    state: AtomicU8,
    direction: AtomicU8,
    /// Tracks S lacks (P to S copy outstanding).
    pub(crate) pending: PendingMap,
    /// Tracks P lacks during a restore (S to P copy outstanding).
    pub(crate) restore: TrackSet,
    /// Tracks written on P since the split.
    pub(crate) changed_p: TrackSet,
    /// Tracks written on S since the split.
    pub(crate) changed_s: TrackSet,
    pub(crate) locks: TrackLocks,
    /// Closed while a transition waits for host writes in flight to drain.
    gate: AtomicBool,
    /// Host writes (to P or S) past the gate and not yet finished.
    inflight: AtomicU64,
    /// Mirrored writes (PAIR/COPY) in flight, counted per track hash slot: after a split, users
    /// of a track wait until the writes mirrored before the split on it are done. A shared slot
    /// only makes someone wait a little longer, never skip a write.
    mirrored: Box<[AtomicU32]>,
    split_at_ns: AtomicU64,
    error: Mutex<Option<String>>,
    copy_rate: AtomicU64,
    /// Set when deleted: pollers and channels of the pair wind down.
    deleted: AtomicBool,
    /// Tracks a backup needs copied ahead of the background copy.
    pub(crate) urgent: ArrayQueue<u64>,
    /// Copy at full speed, ignoring `copy_rate`, while no host uses the pair (a backup in `wait`
    /// mode is waiting).
    pub(crate) full_speed: AtomicBool,
    /// Counters.
    pub stats: PairStats,
    /// While a backup runs: the first track it has not read yet (host writes to S at or past it
    /// wait). `u64::MAX` when no backup runs.
    backup_frontier: AtomicU64,
    /// Reactors to wake when a lock or the gate opens.
    reactors: Vec<ReactorHandle>,
    /// Reactor of the copier, woken when new tracks become pending.
    copier_reactor: Option<ReactorHandle>,
    /// Persisted metadata (none: the pair lives in memory only).
    meta: Option<Arc<Metadata>>,
    /// Header number of the last transition: host writes wait until it is durable.
    state_seq: AtomicU64,
    /// Held by a transition from taking its header number to asking for its header, so
    /// transitions on two threads (a copy ending while a split applies, an I/O error
    /// meanwhile) change the state in the order of their numbers.
    transitions: Mutex<()>,
    /// P, S written since the metadata writer last flushed them.
    p_dirty: AtomicBool,
    s_dirty: AtomicBool,
}

/// What a host write records, for the metadata it needs durable before it is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostWrite {
    /// A write to P in COPY or PAIR: its tracks' write-intent bits.
    Mirror,
    /// A write to P after the split (`split`: PSUS, the image must be kept; else PSUE).
    ChangedP {
        /// The pair is in PSUS.
        split: bool,
    },
    /// A write to S (the image) in PSUS.
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

/// Parameters of a new pair.
#[derive(Debug, Clone)]
pub struct PairConfig {
    /// Name.
    pub name: String,
    /// Track size in bytes.
    pub track_size: u64,
    /// Copy rate limit, bytes per second, 0 for none.
    pub copy_rate: u64,
}

impl Pair {
    /// Creates a pair in COPY with every track pending, in memory only. P and S must have the
    /// same block size and S must be at least as large as P.
    pub fn new(
        cfg: &PairConfig,
        primary: Arc<dyn Bdev>,
        secondary: Arc<dyn Bdev>,
        reactors: Vec<ReactorHandle>,
        copier_reactor: Option<ReactorHandle>,
    ) -> Result<Arc<Self>, PairError> {
        Self::with_metadata(cfg, primary, secondary, reactors, copier_reactor, None)
    }

    /// Checks P and S against the configuration; returns the number of tracks.
    pub fn check_geometry(
        cfg: &PairConfig,
        primary: &dyn Bdev,
        secondary: &dyn Bdev,
    ) -> Result<u64, PairError> {
        let geometry = primary.geometry();
        let sg = secondary.geometry();
        if sg.block_size != geometry.block_size {
            return Err(PairError::Invalid(format!(
                "block sizes differ: primary {} bytes, secondary {} bytes",
                geometry.block_size, sg.block_size
            )));
        }
        if sg.size() < geometry.size() {
            return Err(PairError::Invalid(format!(
                "secondary ({} bytes) is smaller than primary ({} bytes)",
                sg.size(),
                geometry.size()
            )));
        }
        let ts = cfg.track_size;
        if !ts.is_power_of_two() || ts < geometry.block_size as u64 || ts > 16 << 20 {
            return Err(PairError::Invalid(format!(
                "track_size {ts} must be a power of two between the block size ({}) and 16 MiB",
                geometry.block_size
            )));
        }
        let tracks = geometry.size().div_ceil(ts);
        if tracks > MAX_TRACKS {
            return Err(PairError::Invalid(format!(
                "{tracks} tracks of {ts} bytes is more than {MAX_TRACKS}: use a larger track_size"
            )));
        }
        Ok(tracks)
    }

    /// Creates a pair in COPY with every track pending, persisted in `meta` when given (fresh
    /// metadata, or loaded metadata applied afterwards with [`Pair::apply_loaded`]).
    pub fn with_metadata(
        cfg: &PairConfig,
        primary: Arc<dyn Bdev>,
        secondary: Arc<dyn Bdev>,
        reactors: Vec<ReactorHandle>,
        copier_reactor: Option<ReactorHandle>,
        meta: Option<Arc<Metadata>>,
    ) -> Result<Arc<Self>, PairError> {
        let tracks = Self::check_geometry(cfg, primary.as_ref(), secondary.as_ref())?;
        let geometry = primary.geometry();
        let ts = cfg.track_size;
        let seq = meta.as_ref().map_or(0, |m| m.header_durable());
        let pair = Arc::new(Self {
            name: cfg.name.clone(),
            primary,
            secondary,
            geometry,
            track_size: ts,
            tracks,
            state: AtomicU8::new(PairState::Copy as u8),
            direction: AtomicU8::new(DIR_FORWARD),
            pending: PendingMap::new(tracks),
            restore: TrackSet::new(tracks),
            changed_p: TrackSet::new(tracks),
            changed_s: TrackSet::new(tracks),
            locks: TrackLocks::new(tracks),
            gate: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            mirrored: (0..MIRRORED_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            split_at_ns: AtomicU64::new(0),
            error: Mutex::new(None),
            copy_rate: AtomicU64::new(cfg.copy_rate),
            deleted: AtomicBool::new(false),
            urgent: ArrayQueue::new(1024),
            full_speed: AtomicBool::new(false),
            stats: PairStats::default(),
            backup_frontier: AtomicU64::new(u64::MAX),
            reactors,
            copier_reactor,
            meta,
            state_seq: AtomicU64::new(seq),
            transitions: Mutex::new(()),
            p_dirty: AtomicBool::new(true),
            s_dirty: AtomicBool::new(true),
        });
        pair.pending.mark_all();
        Ok(pair)
    }

    /// The persisted metadata, if the pair has some.
    pub fn metadata(&self) -> Option<&Arc<Metadata>> {
        self.meta.as_ref()
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
            state: self.state().as_str().to_string(),
            reverse: self.reversing(),
            split_at_ns: self.split_at_ns(),
            error: self.error(),
        }
    }

    /// Runs a transition, which changes what host writes mean, when `applies` says so (checked
    /// under the transition lock). Its header number is taken before `change`, so a host that
    /// sees the new state also sees that it must wait for it; the header is asked for after
    /// (`flush_data`: P and S flushed first). The writer reads the state after the number it
    /// writes, so the newest header holds the newest state as long as states change in the
    /// order of their numbers, which the lock keeps.
    fn transition(&self, flush_data: bool, applies: impl FnOnce() -> bool, change: impl FnOnce()) {
        let _ordered = self
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !applies() {
            return;
        }
        let seq = self.meta.as_ref().map(|m| {
            let seq = m.next_seq();
            self.state_seq.fetch_max(seq, Ordering::SeqCst);
            seq
        });
        #[cfg(test)]
        transition_tests::numbered();
        change();
        if let (Some(m), Some(seq)) = (&self.meta, seq) {
            m.request_header(seq, flush_data);
            self.wake_copier();
        }
    }

    /// True when the header of the last transition is durable (host writes may rely on it).
    pub fn state_durable(&self) -> bool {
        self.meta
            .as_ref()
            .is_none_or(|m| m.header_durable() >= self.state_seq.load(Ordering::SeqCst))
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

    /// True when the pair's metadata can no longer be written.
    pub fn metadata_failed(&self) -> bool {
        self.meta.as_ref().is_some_and(|m| m.failure().is_some())
    }

    /// Records in the metadata what a host write on `tracks` needs durable before it is issued.
    pub(crate) fn prepare_write(&self, kind: HostWrite, tracks: std::ops::Range<u64>) {
        let Some(m) = &self.meta else { return };
        for t in tracks {
            match kind {
                HostWrite::Mirror => {
                    m.touch(t);
                    m.want_set_region(MapKind::Pending, t, self.tracks);
                }
                HostWrite::ChangedP { split } => {
                    m.want_set_region(MapKind::ChangedP, t, self.tracks);
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
            HostWrite::Mirror => tracks.into_iter().all(|t| pending.durable(t) == Some(true)),
            HostWrite::ChangedP { split } => {
                let changed = m.map(MapKind::ChangedP);
                tracks.into_iter().all(|t| {
                    changed.durable(t) == Some(true)
                        && (!split || pending.durable(t) == Some(false))
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
        let state = match h.state.as_str() {
            "COPY" => PairState::Copy,
            "PAIR" => PairState::Pair,
            "PSUS" => PairState::Psus,
            "PSUE" => PairState::Psue,
            other => return Err(format!("unknown state {other}")),
        };
        let [pending, changed_p, changed_s, restore] = &loaded.maps;
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
                self.restore.load_words(restore);
            }
        }
        self.restore_state(state, reverse, h.split_at_ns, h.error.clone());
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

    /// Marks every track pending and suspends the pair (untrusted metadata): a forward resync
    /// then copies everything.
    pub fn distrust(&self, error: String) {
        self.pending.mark_all();
        if let Some(m) = &self.meta {
            m.want_exactly(MapKind::Pending, |w| self.pending.bits64(w));
        }
        self.fail(error);
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The primary bdev.
    pub fn primary(&self) -> &Arc<dyn Bdev> {
        &self.primary
    }

    /// The secondary bdev.
    pub fn secondary(&self) -> &Arc<dyn Bdev> {
        &self.secondary
    }

    /// Geometry of P (and of the image).
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Track size in bytes.
    pub fn track_size(&self) -> u64 {
        self.track_size
    }

    /// Number of tracks.
    pub fn tracks(&self) -> u64 {
        self.tracks
    }

    /// Current state.
    pub fn state(&self) -> PairState {
        PairState::from_u8(self.state.load(Ordering::SeqCst))
    }

    fn set_state(&self, s: PairState) {
        self.state.store(s as u8, Ordering::SeqCst);
        tracing::trace!(pair = %self.name, state = s.as_str(), "pair state");
    }

    /// True while a restore (reverse resync) is copying S to P.
    pub fn reversing(&self) -> bool {
        self.state() == PairState::Copy && self.direction.load(Ordering::SeqCst) == DIR_REVERSE
    }

    /// Split instant in nanoseconds since the epoch.
    pub fn split_at_ns(&self) -> u64 {
        self.split_at_ns.load(Ordering::SeqCst)
    }

    /// Copy rate limit in bytes per second (0 = none).
    pub fn copy_rate(&self) -> u64 {
        self.copy_rate.load(Ordering::Relaxed)
    }

    /// Changes the copy rate limit.
    pub fn set_copy_rate(&self, rate: u64) {
        self.copy_rate.store(rate, Ordering::Relaxed);
    }

    /// The error that suspended the pair.
    pub fn error(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Byte range of a track (the last one may be short).
    pub fn track_range(&self, track: u64) -> (u64, u64) {
        let start = track * self.track_size;
        (start, self.track_size.min(self.geometry.size() - start))
    }

    /// Tracks covered by a byte range.
    pub fn tracks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.track_size..(offset + len - 1) / self.track_size + 1
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

    /// True once deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// What `pair_get` reports.
    pub fn info(&self) -> PairInfo {
        let reverse = self.direction.load(Ordering::SeqCst) == DIR_REVERSE;
        let (pending_tracks, copied_tracks) = self
            .stats
            .pending_and_copied(|| self.pending.count() + self.restore.count());
        PairInfo {
            name: self.name.clone(),
            state: self.state(),
            direction: if reverse { "reverse" } else { "forward" },
            primary: self.primary.name().to_string(),
            secondary: self.secondary.name().to_string(),
            track_size: self.track_size,
            tracks: self.tracks,
            pending_tracks,
            changed_tracks: self.changed_tracks(),
            split_at_ns: self.split_at_ns(),
            error: self.error(),
            copy_rate: self.copy_rate(),
            copied_tracks,
            cow_copies: self.stats.cow_copies.load(Ordering::Relaxed),
            restored_tracks: self.stats.tracks_restored.load(Ordering::Relaxed),
        }
    }

    /// Tracks in the union of the changed sets. Exact without a scan when one set is empty
    /// (the usual case); otherwise counted over the smaller set.
    fn changed_tracks(&self) -> u64 {
        let (p, s) = (self.changed_p.count(), self.changed_s.count());
        if p == 0 || s == 0 {
            return p + s;
        }
        let (small, other) = if p <= s {
            (&self.changed_p, &self.changed_s)
        } else {
            (&self.changed_s, &self.changed_p)
        };
        let both = small
            .members()
            .into_iter()
            .filter(|&t| other.contains(t))
            .count() as u64;
        p + s - both
    }

    /// Bitmap words visited by scans and bulk operations of any of the pair's bitmaps (the
    /// split path must add nothing here).
    pub fn bitmap_words_visited(&self) -> u64 {
        self.pending.words_visited()
            + self.restore.words_visited()
            + self.changed_p.words_visited()
            + self.changed_s.words_visited()
    }

    /// Wakes every parked reactor (a lock or the gate opened; deferred requests can go on).
    pub(crate) fn wake_all(&self) {
        for r in &self.reactors {
            r.wake_if_parked();
        }
    }

    /// Index of the reactor the copier runs on (0 when none was given).
    pub fn copier_reactor_index(&self) -> usize {
        self.copier_reactor.as_ref().map_or(0, ReactorHandle::index)
    }

    /// Wakes the copier's reactor (new pending tracks).
    pub(crate) fn wake_copier(&self) {
        if let Some(r) = &self.copier_reactor {
            r.wake_if_parked();
        }
    }

    /// A mirrored write is about to touch `tracks`.
    pub(crate) fn begin_mirrored_write(&self, tracks: std::ops::Range<u64>) {
        for t in tracks.take(MIRRORED_SLOTS as usize) {
            self.mirrored[(t % MIRRORED_SLOTS) as usize].fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A mirrored write on `tracks` finished (its tracks are marked pending).
    pub(crate) fn end_mirrored_write(&self, tracks: std::ops::Range<u64>) {
        for t in tracks.take(MIRRORED_SLOTS as usize) {
            self.mirrored[(t % MIRRORED_SLOTS) as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// True while a write mirrored before the split may still be in flight on `tracks`.
    pub(crate) fn mirrored_writes_in_flight(&self, tracks: std::ops::Range<u64>) -> bool {
        tracks
            .take(MIRRORED_SLOTS as usize)
            .any(|t| self.mirrored[(t % MIRRORED_SLOTS) as usize].load(Ordering::SeqCst) != 0)
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

    /// Releases a track lock and lets waiting requests retry.
    pub(crate) fn unlock_track(&self, track: u64) {
        self.locks.unlock(track);
        self.wake_all();
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

    fn wrong_state(&self, what: &str) -> PairError {
        PairError::WrongState {
            name: self.name.clone(),
            state: self.state().as_str(),
            what: what.to_string(),
        }
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

    /// For a clean stop (gate closed, writes drained) of a split pair: the changed maps on
    /// disk, supersets by region while hosts write, become exactly what memory holds. (In COPY
    /// and PAIR memory holds none, and bits a restart merged into pending stay on disk until
    /// those pending bits are durable: they are left alone.)
    pub fn exact_changed_for_stop(&self) {
        if !matches!(self.state(), PairState::Psus | PairState::Psue) {
            return;
        }
        if let Some(m) = &self.meta {
            m.want_exactly(MapKind::ChangedP, |w| self.changed_p.raw_word(w));
            m.want_exactly(MapKind::ChangedS, |w| self.changed_s.raw_word(w));
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
    pub(crate) fn apply_split(&self, at_ns: u64) {
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
        );
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

    /// Checks that a resync applies now.
    pub(crate) fn check_resync(&self, reverse: bool) -> Result<(), PairError> {
        if self.backup_running() {
            return Err(self.wrong_state("a backup of its image is running"));
        }
        match (self.state(), reverse) {
            (PairState::Psus, _) => Ok(()),
            (PairState::Psue, false) => Ok(()),
            (PairState::Psue, true) => {
                Err(self.wrong_state("a suspended pair can only be resynced forward"))
            }
            _ => Err(self.wrong_state("only a split or suspended pair can be resynced")),
        }
    }

    /// Applies a resync (gate closed, writes drained). Forward: the changed tracks become
    /// pending (P to S). Reverse: they are restored S to P; tracks still pending keep being
    /// copied P to S (P holds their image data).
    pub(crate) fn apply_resync(&self, reverse: bool) {
        self.transition(false, || true, || self.resync_in_memory(reverse));
        self.wake_copier();
    }

    fn resync_in_memory(&self, reverse: bool) {
        if reverse {
            self.restore.absorb(&self.changed_p);
            self.restore.absorb(&self.changed_s);
            self.direction.store(DIR_REVERSE, Ordering::SeqCst);
        } else {
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
        if durable {
            m.want_exactly(MapKind::ChangedP, |_| 0);
            m.want_exactly(MapKind::ChangedS, |_| 0);
            self.wake_copier();
        }
        durable
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod stats_tests {
    use super::PairStats;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn pending_plus_copied_is_exact_while_tracks_move() {
        const TRACKS: u64 = 20_000;
        let stats = Arc::new(PairStats::default());
        let pending = Arc::new(AtomicU64::new(TRACKS));
        let done = Arc::new(AtomicBool::new(false));
        let (s, p, d) = (Arc::clone(&stats), Arc::clone(&pending), Arc::clone(&done));
        let mover = std::thread::spawn(move || {
            for _ in 0..TRACKS {
                s.move_to_copied(|| {
                    p.fetch_sub(1, Ordering::SeqCst);
                    // A copy's bookkeeping is not instant: widen the window a reader can hit.
                    for _ in 0..50 {
                        std::hint::spin_loop();
                    }
                    true
                });
                for _ in 0..200 {
                    std::hint::spin_loop();
                }
            }
            d.store(true, Ordering::SeqCst);
        });
        let mut reads = 0u64;
        while !done.load(Ordering::SeqCst) {
            let (pe, co) = stats.pending_and_copied(|| pending.load(Ordering::SeqCst));
            assert_eq!(pe + co, TRACKS, "after {reads} reads");
            reads += 1;
        }
        mover.join().expect("mover");
        assert!(reads > 0);
    }
}

#[cfg(test)]
mod transition_tests {
    use super::metadata::{HeaderRecord, Metadata};
    use super::{Pair, PairConfig, PairState};
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
            state: "COPY".into(),
            reverse: false,
            split_at_ns: 0,
            error: None,
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
