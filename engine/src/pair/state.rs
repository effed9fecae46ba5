//! The [`Pair`] type: what one pair is (its configuration and bdevs, its state and copy
//! direction, split point and error, its track sets and track locks, its counters), how it is
//! created, and the accessors the rest of the engine reads it through.
//!
//! How its state changes is in [`super::transitions`]; what is persisted of it and when, in
//! [`super::persistence`]; what it reports, in [`super::stats`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crossbeam_queue::ArrayQueue;
use drivers::{Bdev, Geometry};
use serde::Serialize;

use super::bitmap::{PendingMap, TrackLocks, TrackSet};
use super::metadata::Metadata;
use super::stats::PairStats;
use crate::reactor::{PollerWaker, ReactorHandle};

/// Hash slots counting mirrored writes in flight, at most (a small volume has one a track).
const MIRRORED_SLOTS: u64 = 4096;
/// Tracks a backup may ask the copier for at once, at most (a small volume: its tracks).
const URGENT_SLOTS: u64 = 1024;

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

    /// The name `pair_get` reports and the metadata header stores.
    pub fn as_str(self) -> &'static str {
        match self {
            PairState::Copy => "COPY",
            PairState::Pair => "PAIR",
            PairState::Psus => "PSUS",
            PairState::Psue => "PSUE",
        }
    }

    /// The state [`PairState::as_str`] names `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "COPY" => Some(PairState::Copy),
            "PAIR" => Some(PairState::Pair),
            "PSUS" => Some(PairState::Psus),
            "PSUE" => Some(PairState::Psue),
            _ => None,
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

pub(super) const DIR_FORWARD: u8 = 0;
pub(super) const DIR_REVERSE: u8 = 1;

/// One pair.
pub struct Pair {
    pub(super) name: String,
    pub(super) primary: Arc<dyn Bdev>,
    pub(super) secondary: Arc<dyn Bdev>,
    pub(super) geometry: Geometry,
    pub(super) track_size: u64,
    pub(super) tracks: u64,
    pub(super) state: AtomicU8,
    pub(super) direction: AtomicU8,
    /// Tracks S lacks (P to S copy outstanding).
    pub(crate) pending: PendingMap,
    /// Tracks P lacks during a restore (S to P copy outstanding).
    pub(crate) restore: TrackSet,
    /// Tracks written on P since the split.
    pub(crate) changed_p: TrackSet,
    /// Tracks written on S since the split.
    pub(crate) changed_s: TrackSet,
    /// Checkpoints and the tracks P changed since each.
    pub(crate) checkpoints: super::checkpoints::Checkpoints,
    pub(crate) locks: TrackLocks,
    /// Closed while a transition waits for host writes in flight to drain.
    pub(super) gate: AtomicBool,
    /// Host writes (to P or S) past the gate and not yet finished.
    pub(super) inflight: AtomicU64,
    /// Mirrored writes (PAIR/COPY) in flight, counted per track hash slot: after a split, users
    /// of a track wait until the writes mirrored before the split on it are done. A shared slot
    /// only makes someone wait a little longer, never skip a write.
    pub(super) mirrored: Box<[AtomicU32]>,
    pub(super) split_at_ns: AtomicU64,
    pub(super) error: Mutex<Option<String>>,
    pub(super) copy_rate: AtomicU64,
    /// Set when deleted: pollers and channels of the pair wind down.
    pub(super) deleted: AtomicBool,
    /// Tracks a backup needs copied ahead of the background copy.
    pub(crate) urgent: ArrayQueue<u64>,
    /// Copy at full speed, ignoring `copy_rate`, while no host uses the pair (a backup in `wait`
    /// mode is waiting).
    pub(crate) full_speed: AtomicBool,
    /// Counters.
    pub stats: PairStats,
    /// While a backup runs: the first track it has not read yet (host writes to S at or past it
    /// wait). `u64::MAX` when no backup runs.
    pub(super) backup_frontier: AtomicU64,
    /// Reactors to wake when a lock or the gate opens.
    pub(super) reactors: Vec<ReactorHandle>,
    /// Reactor of the copier, woken when new tracks become pending.
    pub(super) copier_reactor: Option<ReactorHandle>,
    /// Wakes the copier from its rest (set once it runs).
    copier_waker: OnceLock<PollerWaker>,
    /// Persisted metadata (none: the pair lives in memory only).
    pub(super) meta: Option<Arc<Metadata>>,
    /// Header number of the last transition: host writes wait until it is durable.
    pub(super) state_seq: AtomicU64,
    /// Held by a transition from taking its header number to asking for its header, so
    /// transitions on two threads (a copy ending while a split applies, an I/O error
    /// meanwhile) change the state in the order of their numbers.
    pub(super) transitions: Mutex<()>,
    /// P, S written since the metadata writer last flushed them.
    pub(super) p_dirty: AtomicBool,
    pub(super) s_dirty: AtomicBool,
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
            checkpoints: super::checkpoints::Checkpoints::new(tracks),
            locks: TrackLocks::new(tracks),
            gate: AtomicBool::new(false),
            inflight: AtomicU64::new(0),
            mirrored: (0..MIRRORED_SLOTS.min(tracks.next_power_of_two()))
                .map(|_| AtomicU32::new(0))
                .collect(),
            split_at_ns: AtomicU64::new(0),
            error: Mutex::new(None),
            copy_rate: AtomicU64::new(cfg.copy_rate),
            deleted: AtomicBool::new(false),
            urgent: ArrayQueue::new(URGENT_SLOTS.min(tracks).max(16) as usize),
            full_speed: AtomicBool::new(false),
            stats: PairStats::default(),
            backup_frontier: AtomicU64::new(u64::MAX),
            reactors,
            copier_reactor,
            copier_waker: OnceLock::new(),
            meta,
            state_seq: AtomicU64::new(seq),
            transitions: Mutex::new(()),
            p_dirty: AtomicBool::new(true),
            s_dirty: AtomicBool::new(true),
        });
        pair.pending.mark_all();
        Ok(pair)
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

    pub(super) fn set_state(&self, s: PairState) {
        self.state.store(s as u8, Ordering::SeqCst);
        tracing::trace!(pair = %self.name, state = s.as_str(), "pair state");
        // A split gives a resting copier nothing to copy (it rests only with no track
        // pending or to restore, and a split adds none): a split of a thousand pairs does not
        // wake a thousand copiers.
        if s != PairState::Psus {
            self.wake_copier();
        }
    }

    /// True when the last resync ran S to P (a restore), whether or not it is still copying.
    pub fn last_resync_reversed(&self) -> bool {
        self.direction.load(Ordering::SeqCst) == DIR_REVERSE
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

    /// True once deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::SeqCst);
        self.wake_all();
        self.wake_copier();
        if let Some(m) = &self.meta {
            m.wake_writer();
        }
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
        match self.copier_waker.get() {
            Some(w) => w.wake(),
            None => {
                if let Some(r) = &self.copier_reactor {
                    r.wake_if_parked();
                }
            }
        }
    }

    /// Gives the copier's waker: from now on, [`Pair::wake_copier`] wakes it from its rest.
    pub(crate) fn set_copier_waker(&self, waker: PollerWaker) {
        let _ = self.copier_waker.set(waker);
    }

    /// Releases a track lock and lets waiting requests retry.
    pub(crate) fn unlock_track(&self, track: u64) {
        self.locks.unlock(track);
        self.wake_all();
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
