//! Verification of a pair (md's `check` and `repair`): a job that compares P and S track by
//! track where the pair holds them equal, while hosts keep writing, and with `repair` makes
//! every mismatched track pending again so the copier copies it P to S.
//!
//! Where P and S must be equal: in PAIR, and in a forward COPY, every track that is not
//! pending. A split or suspended pair is refused (its P and S differ by design where it
//! changed, and P is written there without the mirror's bookkeeping); a pair that leaves PAIR
//! or COPY during the verification ends it as failed.
//!
//! Why a host write never shows as a mismatch: the job compares a track only while holding its
//! lock (the copier cannot copy it meanwhile) and only if, before the reads and after both
//! completed, the track is not pending and no mirrored write is in flight on it. A write to P
//! in PAIR counts itself on its tracks before it is issued and marks them pending when it
//! completes, before it uncounts itself, so a write overlapping the reads is seen by the
//! second check; the track is then skipped (it is pending: the copier copies it anyway).
//!
//! The job (`job.rs`) is a poller on a reactor, next to the pair's copier; this file holds what
//! the control plane and the job share and what `verify_get` reports.

pub mod job;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde::Serialize;

use std::sync::Arc;

/// Default comparison rate, bytes of the volume per second (each byte is read from P and from
/// S): what md's `speed_limit_max` is to a check, a background pace that a volume of a few TiB
/// finishes overnight.
pub const DEFAULT_RATE: u64 = 200 << 20;

/// Default comparison rate while hosts use the pair, bytes per second: host requests first.
pub const DEFAULT_HOST_RATE: u64 = 16 << 20;

/// Mismatched tracks `verify_get` lists by number (the first ones found).
pub const FIRST_MISMATCHES: usize = 64;

/// A verification's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyState {
    /// Comparing.
    Running,
    /// Every track went through.
    Done,
    /// Ended on an error (an I/O error, the pair leaving PAIR).
    Failed,
    /// Cancelled.
    Cancelled,
}

/// What `verify_get` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyInfo {
    /// Id (shared with backups: one id names one job).
    pub id: u64,
    /// Pair.
    pub pair: String,
    /// State.
    pub state: VerifyState,
    /// Mismatched tracks are made pending and copied again.
    pub repair: bool,
    /// Comparison rate, bytes of the volume per second.
    pub rate: u64,
    /// Comparison rate while hosts use the pair (0 = no other limit than `rate`).
    pub host_rate: u64,
    /// Tracks gone through: compared, or skipped.
    pub tracks_checked: u64,
    /// Of those, tracks not compared because they were pending (S is being brought up to date
    /// there) or were written while compared.
    pub tracks_skipped: u64,
    /// Tracks of the pair.
    pub tracks_total: u64,
    /// Bytes of the volume.
    pub bytes_total: u64,
    /// Tracks where S differed from P.
    pub mismatched_tracks: u64,
    /// The first of them (up to 64), in the order found.
    pub first_mismatches: Vec<u64>,
    /// Mismatched tracks made pending again (their pending bit durable) with `repair`.
    pub repaired: u64,
    /// Bytes compared (each read from P and from S).
    pub bytes_checked: u64,
    /// Times the job held back because hosts were using the pair.
    pub host_yields: u64,
    /// Nanoseconds since the start (until the end once ended).
    pub elapsed_ns: u64,
    /// Why it failed.
    pub error: Option<String>,
}

struct Status {
    state: VerifyState,
    error: Option<String>,
    elapsed_ns: u64,
    first_mismatches: Vec<u64>,
}

/// A verification as the control plane and its job share it.
pub struct Verify {
    /// Id.
    pub id: u64,
    /// Pair name.
    pub pair: String,
    /// Make mismatched tracks pending.
    pub repair: bool,
    /// Comparison rate, bytes per second (0 = none).
    pub rate: u64,
    /// Comparison rate while hosts use the pair (0 = no other limit).
    pub host_rate: u64,
    /// Tracks of the pair.
    pub tracks_total: u64,
    /// Bytes of the volume.
    pub bytes_total: u64,
    tracks_checked: AtomicU64,
    tracks_skipped: AtomicU64,
    mismatched: AtomicU64,
    repaired: AtomicU64,
    bytes_checked: AtomicU64,
    host_yields: AtomicU64,
    cancel: AtomicBool,
    started: Instant,
    status: Mutex<Status>,
}

/// What a verification was asked for.
#[derive(Debug, Clone, Copy)]
pub struct VerifyParams {
    /// Make mismatched tracks pending.
    pub repair: bool,
    /// Bytes per second, 0 for [`DEFAULT_RATE`].
    pub rate: u64,
    /// Bytes per second while hosts use the pair (0 = no other limit than `rate`).
    pub host_rate: u64,
}

impl Default for VerifyParams {
    fn default() -> Self {
        Self {
            repair: false,
            rate: 0,
            host_rate: DEFAULT_HOST_RATE,
        }
    }
}

impl Verify {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A running verification of `pair` (`tracks` tracks, `bytes` bytes).
    pub fn new(id: u64, pair: &str, tracks: u64, bytes: u64, params: VerifyParams) -> Self {
        Self {
            id,
            pair: pair.to_string(),
            repair: params.repair,
            rate: if params.rate == 0 {
                DEFAULT_RATE
            } else {
                params.rate
            },
            host_rate: params.host_rate,
            tracks_total: tracks,
            bytes_total: bytes,
            tracks_checked: AtomicU64::new(0),
            tracks_skipped: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            bytes_checked: AtomicU64::new(0),
            host_yields: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            started: Instant::now(),
            status: Mutex::new(Status {
                state: VerifyState::Running,
                error: None,
                elapsed_ns: 0,
                first_mismatches: Vec::new(),
            }),
        }
    }

    /// Current state.
    pub fn state(&self) -> VerifyState {
        self.status().state
    }

    /// Asks the job to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// A track went through: compared (`bytes` of it) or skipped (`bytes` 0).
    fn note_track(&self, bytes: u64) {
        if bytes == 0 {
            self.tracks_skipped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bytes_checked.fetch_add(bytes, Ordering::Relaxed);
        }
        self.tracks_checked.fetch_add(1, Ordering::Relaxed);
    }

    fn note_mismatch(&self, track: u64) {
        self.mismatched.fetch_add(1, Ordering::Relaxed);
        let mut st = self.status();
        if st.first_mismatches.len() < FIRST_MISMATCHES {
            st.first_mismatches.push(track);
        }
    }

    fn note_repaired(&self) {
        self.repaired.fetch_add(1, Ordering::Relaxed);
    }

    fn note_yield(&self) {
        self.host_yields.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self, state: VerifyState, error: Option<String>) {
        let mut st = self.status();
        st.state = state;
        st.error = error;
        st.elapsed_ns = self.started.elapsed().as_nanos() as u64;
    }

    /// What `verify_get` reports.
    pub fn info(&self) -> VerifyInfo {
        let st = self.status();
        VerifyInfo {
            id: self.id,
            pair: self.pair.clone(),
            state: st.state,
            repair: self.repair,
            rate: self.rate,
            host_rate: self.host_rate,
            tracks_checked: self.tracks_checked.load(Ordering::Relaxed),
            tracks_skipped: self.tracks_skipped.load(Ordering::Relaxed),
            tracks_total: self.tracks_total,
            bytes_total: self.bytes_total,
            mismatched_tracks: self.mismatched.load(Ordering::Relaxed),
            first_mismatches: st.first_mismatches.clone(),
            repaired: self.repaired.load(Ordering::Relaxed),
            bytes_checked: self.bytes_checked.load(Ordering::Relaxed),
            host_yields: self.host_yields.load(Ordering::Relaxed),
            elapsed_ns: if st.state == VerifyState::Running {
                self.started.elapsed().as_nanos() as u64
            } else {
                st.elapsed_ns
            },
            error: st.error.clone(),
        }
    }
}

/// Every verification of the engine since it started, by id.
#[derive(Default)]
pub struct Verifies {
    list: Mutex<BTreeMap<u64, Arc<Verify>>>,
}

impl Verifies {
    fn list(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Verify>>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a verification.
    pub fn add(&self, v: Arc<Verify>) {
        self.list().insert(v.id, v);
    }

    /// Forgets one that never started.
    pub fn remove(&self, id: u64) {
        self.list().remove(&id);
    }

    /// A verification by id.
    pub fn get(&self, id: u64) -> Option<Arc<Verify>> {
        self.list().get(&id).cloned()
    }

    /// Every verification, or one.
    pub fn infos(&self, id: Option<u64>) -> Option<Vec<VerifyInfo>> {
        let l = self.list();
        match id {
            Some(i) => l.get(&i).map(|v| vec![v.info()]),
            None => Some(l.values().map(|v| v.info()).collect()),
        }
    }

    /// The running verification of `pair`, if any.
    pub fn running_for(&self, pair: &str) -> Option<u64> {
        self.list()
            .values()
            .find(|v| v.pair == pair && v.state() == VerifyState::Running)
            .map(|v| v.id)
    }
}
