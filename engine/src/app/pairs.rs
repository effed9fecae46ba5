//! Pairs: creation over two bdevs (with their metadata file in the state directory, loaded
//! after a restart), the transitions run on the control poller (split, resync, the start of a
//! backup), deletion, and the clean stop that writes every pair's metadata out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use drivers::BdevError;

use super::{Engine, EngineError};
use crate::pair::channel::{PairView, View};
use crate::pair::control::{Action, ControlRequest, Outcome};
use crate::pair::copier::Copier;
use crate::pair::metadata::writer::MetaWriter;
use crate::pair::metadata::{HeaderRecord, Layout, Loaded, MetaError, Metadata, PersistedState};
use crate::pair::split_journal::{self, SplitJournal};
use crate::pair::{Pair, PairConfig, PairError, PairInfo};

/// Opens a pair's metadata file as a uring bdev. Buffered, not O_DIRECT: the writer makes
/// each batch durable with a flush (fdatasync) anyway, and concurrent O_DIRECT writes to this
/// small file through io_uring were seen never completing under heavy load on a 6.18 kernel.
fn metadata_bdev(
    name: &str,
    path: &Path,
    size: Option<u64>,
) -> Result<drivers::uring::UringBdev, BdevError> {
    let bdev = drivers::uring::UringBdev::open_with(name, path, 4096, size, false, false)?;
    tracing::debug!(
        path = %path.display(),
        "pair metadata opened through the page cache, by design: each batch ends with a flush"
    );
    Ok(bdev)
}

/// Opens the split journal of the state directory (`splits.journal`, made sparse when missing).
pub(super) fn open_split_journal(state_dir: &Path) -> Result<Arc<SplitJournal>, super::AppError> {
    let path = state_dir.join(split_journal::FILE);
    let fail = |e: String| super::AppError::StateDir {
        path: path.clone(),
        source: std::io::Error::other(e),
    };
    let size = (!path.exists()).then_some(split_journal::DEFAULT_SIZE);
    let bdev = metadata_bdev(split_journal::FILE, &path, size).map_err(|e| fail(e.to_string()))?;
    SplitJournal::open(Arc::new(bdev)).map_err(|e| fail(e.to_string()))
}

/// Where a pair's metadata lives when it is not a file of the state directory.
pub enum MetadataDevice {
    /// Load it (the pair existed before).
    Existing(Arc<dyn drivers::Bdev>),
    /// Initialise it (a new pair).
    Fresh(Arc<dyn drivers::Bdev>),
    /// None: the pair lives in memory only and a restart starts it over (for comparing the
    /// cost of persistence).
    None,
}

/// Writes fresh metadata for a new pair on `bdev`: COPY, every track pending.
fn initialize_metadata(
    bdev: Arc<dyn drivers::Bdev>,
    cfg: &PairConfig,
    primary: &str,
    secondary: &str,
    tracks: u64,
) -> Result<Arc<Metadata>, EngineError> {
    let rec = HeaderRecord {
        seq: 1,
        name: cfg.name.clone(),
        primary: primary.to_string(),
        secondary: secondary.to_string(),
        track_size: cfg.track_size,
        tracks,
        state: crate::pair::PairState::Copy.into(),
        reverse: false,
        split_at_ns: 0,
        error: None,
        instance: new_instance(),
        checkpoints: Vec::new(),
    };
    Metadata::initialize(bdev, &rec)
        .map(Arc::new)
        .map_err(|e| EngineError::Bdev(BdevError::Invalid(e.to_string())))
}

/// A number for a new pair's metadata that no earlier pair of this state directory had: the
/// time, made unique within the process.
fn new_instance() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::pair::now_ns().max(1);
    let prev = LAST
        .fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |last| Some(now.max(last + 1)),
        )
        .unwrap_or(0);
    now.max(prev + 1)
}

/// What loading a pair's metadata gave.
type LoadOutcome = Result<Loaded, MetaError>;

impl Engine {
    /// Creates a pair over two unclaimed bdevs and starts its initial copy.
    pub fn pair_create(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
    ) -> Result<Arc<Pair>, EngineError> {
        self.pair_create_with(cfg, primary, secondary, None)
    }

    /// Creates a pair whose metadata lives on `meta` instead of a file in the state directory:
    /// `Existing` is loaded (a restart), `Fresh` is initialised. For tests that cut the power
    /// of the metadata's device too.
    pub fn pair_create_on(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
        meta: MetadataDevice,
    ) -> Result<Arc<Pair>, EngineError> {
        self.pair_create_with(cfg, primary, secondary, Some(meta))
    }

    fn pair_create_with(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
        device: Option<MetadataDevice>,
    ) -> Result<Arc<Pair>, EngineError> {
        // The name is a file name in the state directory (its metadata): one path component,
        // so no two names reach one file and none reaches outside.
        let n = &cfg.name;
        if n.is_empty() || n.len() > 200 || n.starts_with('.') || n.contains(['/', '\0']) {
            return Err(PairError::Invalid(format!(
                "parameter 'name': '{n}' must be 1 to 200 bytes without '/', not starting with '.'"
            ))
            .into());
        }
        let mut st = self.state();
        if st.pairs.contains_key(&cfg.name) {
            return Err(
                PairError::Invalid(format!("a pair named '{}' already exists", cfg.name)).into(),
            );
        }
        if primary == secondary {
            return Err(PairError::Invalid("primary and secondary must differ".into()).into());
        }
        let p = st.bdevs.get(primary)?;
        let s = st.bdevs.get(secondary)?;
        st.bdevs.check_unclaimed(primary)?;
        st.bdevs.check_unclaimed(secondary)?;
        // An export made before the pair writes the bdev itself, past the mirror and the copy
        // before write: the pair would not see those writes.
        for b in [primary, secondary] {
            if let Some(export) = self.raw_export_of(b) {
                return Err(EngineError::InUse(format!(
                    "bdev '{b}' is exported ({export}): stop the export before making it part \
                     of a pair"
                )));
            }
        }
        let tracks = Pair::check_geometry(cfg, p.as_ref(), s.as_ref())?;
        let copier_reactor = self.reactors.get(st.pairs.len() + 1).clone();
        let state_dir_metadata = device.is_none();
        let (meta, loaded): (Option<Arc<Metadata>>, _) = match device {
            None => {
                let (m, l) = self.open_metadata(cfg, primary, secondary, tracks)?;
                (Some(m), l)
            }
            Some(MetadataDevice::None) => (None, None),
            Some(MetadataDevice::Existing(bdev)) => match Metadata::load(Arc::clone(&bdev), tracks)
            {
                Ok((meta, l)) => (Some(Arc::new(meta)), Some(Ok(l))),
                Err(e) => {
                    let meta = initialize_metadata(bdev, cfg, primary, secondary, tracks)?;
                    (Some(meta), Some(Err(e)))
                }
            },
            Some(MetadataDevice::Fresh(bdev)) => (
                Some(initialize_metadata(bdev, cfg, primary, secondary, tracks)?),
                None,
            ),
        };
        let loaded = match (&meta, loaded) {
            (Some(m), Some(Ok(l))) => Some(self.recover_group_split(m, l)),
            (_, l) => l,
        };
        let pair = Pair::with_metadata(
            cfg,
            p,
            s,
            self.reactors.handles().to_vec(),
            Some(copier_reactor.clone()),
            meta.clone(),
        )?;
        // A RAM disk comes back from a restart empty: metadata that calls it a mirror or an
        // image describes contents that are gone.
        let volatile = [pair.primary(), pair.secondary()]
            .into_iter()
            .find(|b| b.driver() == "malloc")
            .map(|b| b.name().to_string());
        match (loaded, volatile) {
            (None, _) => {}
            (Some(Ok(_)), Some(ram)) => pair.distrust(format!(
                "pair metadata not trusted: bdev '{ram}' is a RAM disk and lost its contents in \
                 the restart"
            )),
            (Some(Ok(l)), None) => match pair.apply_loaded(&l) {
                Ok(()) => tracing::info!(
                    pair = pair.name(),
                    state = pair.state().as_str(),
                    pending = pair.pending.count(),
                    "pair brought back from its metadata"
                ),
                Err(e) => pair.distrust(format!("pair metadata not trusted: {e}")),
            },
            (Some(Err(e)), _) => pair.distrust(format!("pair metadata not trusted: {e}")),
        }
        st.bdevs.claim(primary, &cfg.name)?;
        if let Err(e) = st.bdevs.claim(secondary, &cfg.name) {
            st.bdevs.release(primary, &cfg.name);
            return Err(e.into());
        }
        let for_copier = Arc::clone(&pair);
        let for_writer = Arc::clone(&pair);
        let started = copier_reactor.send_blocking(Box::new(move |cx| {
            if let Some(meta) = meta {
                cx.add_poller(Box::new(MetaWriter::new(for_writer, meta)));
            }
            cx.add_poller(Box::new(Copier::new(for_copier)))
        }));
        if let Err(e) = started {
            st.bdevs.release(primary, &cfg.name);
            st.bdevs.release(secondary, &cfg.name);
            return Err(e.into());
        }
        st.pairs.insert(cfg.name.clone(), Arc::clone(&pair));
        if state_dir_metadata {
            let path = self.metadata_path(&cfg.name);
            st.files
                .insert(super::bdevs::FileOwner::Metadata(cfg.name.clone()), &path);
        }
        tracing::info!(pair = %cfg.name, primary, secondary, tracks = pair.tracks(), "pair created: COPY");
        Ok(pair)
    }

    /// Uses `bdev` as the split journal from now on (scanned first): for tests that cut the
    /// power of the journal's device too.
    pub fn use_split_journal(&self, bdev: Arc<dyn drivers::Bdev>) -> Result<(), EngineError> {
        let journal = SplitJournal::open(bdev)
            .map_err(|e| EngineError::Bdev(BdevError::Invalid(e.to_string())))?;
        self.control.set_journal(journal);
        Ok(())
    }

    /// A pair's loaded metadata, with the split of its group applied when the split journal
    /// holds one newer than its header (the header is written now, before the pair serves).
    fn recover_group_split(&self, meta: &Metadata, mut loaded: Loaded) -> LoadOutcome {
        let h = &loaded.header;
        let Some(split) = self
            .control
            .journal()
            .and_then(|j| j.recovered_split(&h.name, h.instance, h.seq))
        else {
            return Ok(loaded);
        };
        let from_mirror = [
            PersistedState::Known(crate::pair::PairState::Copy),
            PersistedState::Known(crate::pair::PairState::Pair),
        ];
        if !from_mirror.contains(&h.state) || h.reverse {
            tracing::warn!(pair = %h.name, state = ?h.state, "split journal record not applied: the pair was not mirroring");
            return Ok(loaded);
        }
        let rec = HeaderRecord {
            seq: split.seq,
            state: crate::pair::PairState::Psus.into(),
            split_at_ns: split.split_at_ns,
            error: None,
            ..h.clone()
        };
        meta.adopt_header(&rec)?;
        tracing::info!(pair = %rec.name, split_at_ns = rec.split_at_ns, "split with its group, from the split journal");
        loaded.header = rec;
        Ok(loaded)
    }

    /// Where a pair's metadata lives.
    pub fn metadata_path(&self, pair: &str) -> PathBuf {
        self.state_dir.join("pairs").join(format!("{pair}.meta"))
    }

    /// Opens the metadata of a pair being created: loads it when the state directory holds
    /// some (the load's outcome comes back with it), otherwise writes fresh metadata (every
    /// track pending) to a new file renamed into place once durable. Metadata that fails its
    /// checks is kept aside as `.meta.bad` and replaced by fresh metadata; the caller then
    /// suspends the pair with every track pending.
    fn open_metadata(
        &self,
        cfg: &PairConfig,
        primary: &str,
        secondary: &str,
        tracks: u64,
    ) -> Result<(Arc<Metadata>, Option<LoadOutcome>), EngineError> {
        let path = self.metadata_path(&cfg.name);
        let bdev_name = format!("{}.meta", cfg.name);
        let io_err = |e: std::io::Error| {
            EngineError::Bdev(BdevError::Invalid(format!(
                "pair metadata {}: {e}",
                path.display()
            )))
        };
        let mut loaded = None;
        if path.exists() {
            let bdev = metadata_bdev(&bdev_name, &path, None)?;
            match Metadata::load(Arc::new(bdev), tracks) {
                Ok((meta, l)) => return Ok((Arc::new(meta), Some(Ok(l)))),
                Err(e) => {
                    tracing::error!(pair = %cfg.name, %e, "pair metadata not trusted");
                    std::fs::rename(&path, path.with_extension("meta.bad")).map_err(io_err)?;
                    loaded = Some(Err(e));
                }
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let fresh = path.with_extension("meta.new");
        let _ = std::fs::remove_file(&fresh);
        let size = Layout::new(tracks).size();
        let bdev = metadata_bdev(&bdev_name, &fresh, Some(size))?;
        let meta = initialize_metadata(Arc::new(bdev), cfg, primary, secondary, tracks)?;
        std::fs::rename(&fresh, &path).map_err(io_err)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err)?;
        }
        Ok((meta, loaded))
    }

    /// For a clean stop: closes every pair's gate, waits for host writes in flight, and has
    /// each pair's metadata cleaned and written out, so the restart copies nothing it need
    /// not. (After a crash the metadata is still right, only less tidy.) All pairs at once:
    /// one after the other, 10,000 pairs' syncs took most of a minute.
    pub fn persist_pairs_for_stop(&self) {
        let pairs: Vec<Arc<Pair>> = self.state().pairs.values().cloned().collect();
        // Every gate first: no pair takes writes while earlier ones drain.
        for p in &pairs {
            p.close_gate();
        }
        let syncs = pairs
            .iter()
            .filter_map(|p| Some((&**p, Self::drain_and_request_sync(p)?)))
            .collect();
        self.wait_stop_syncs(syncs);
    }

    /// [`Engine::persist_pairs_for_stop`] for one pair (its host writes stay refused).
    pub fn persist_pair_for_stop(&self, p: &Pair) {
        if let Some(n) = Self::drain_and_request_sync(p) {
            self.wait_stop_syncs(vec![(p, n)]);
        }
    }

    /// Closes a pair's gate, waits for its host writes in flight and asks its metadata to be
    /// cleaned and written out: the sync to wait for (none if the writes did not drain or the
    /// pair keeps no metadata).
    fn drain_and_request_sync(p: &Pair) -> Option<u64> {
        if !p.quiesce(Duration::from_secs(5)) {
            tracing::error!(pair = p.name(), "host writes did not drain before the stop");
            return None;
        }
        let meta = p.metadata()?;
        p.exact_changed_for_stop();
        Some(meta.request_sync())
    }

    /// Waits for the syncs asked for, giving up on them once none has ended for 10 s.
    fn wait_stop_syncs(&self, mut syncs: Vec<(&Pair, u64)>) {
        for r in self.reactors.handles() {
            r.wake_if_parked();
        }
        let mut last_progress = std::time::Instant::now();
        while !syncs.is_empty() {
            let before = syncs.len();
            syncs.retain(|(p, n)| {
                p.metadata()
                    .is_some_and(|m| !m.synced(*n) && m.failure().is_none())
            });
            if syncs.len() < before {
                last_progress = std::time::Instant::now();
            } else if last_progress.elapsed() > Duration::from_secs(10) {
                for (p, _) in &syncs {
                    tracing::error!(pair = p.name(), "pair metadata not written out in 10 s");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A pair by name.
    pub fn pair(&self, name: &str) -> Result<Arc<Pair>, EngineError> {
        self.state()
            .pairs
            .get(name)
            .cloned()
            .ok_or_else(|| PairError::NotFound(name.to_string()).into())
    }

    /// Runs a transition on the control poller and waits for its outcome.
    fn transition(&self, names: &[String], action: Action) -> Result<Outcome, EngineError> {
        if names.is_empty() {
            return Err(PairError::Invalid("no pair named".into()).into());
        }
        // Under one lock: a group split names a thousand pairs.
        let pairs = {
            let st = self.state();
            names
                .iter()
                .map(|n| {
                    st.pairs
                        .get(n)
                        .cloned()
                        .ok_or_else(|| PairError::NotFound(n.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut req = ControlRequest {
            pairs,
            action,
            reply: tx,
        };
        loop {
            match self.control.push(req) {
                Ok(()) => break,
                Err(r) => {
                    req = r;
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        match rx.recv() {
            Ok(r) => Ok(r?),
            Err(_) => Err(PairError::Stopping.into()),
        }
    }

    /// Splits one pair or several at one common instant.
    pub fn pair_split(&self, names: &[String]) -> Result<Outcome, EngineError> {
        self.transition(names, Action::Split)
    }

    /// Starts a backup of a pair's image: through the gate, so writes to S in flight drain
    /// first. Returns the split instant the image stands for.
    pub(crate) fn pair_begin_backup(&self, name: &str) -> Result<u64, EngineError> {
        self.transition(&[name.to_string()], Action::StartBackup)
            .map(|o| o.split_at_ns)
    }

    /// `checkpoint_list`: the checkpoints of one pair, or of every pair, oldest first.
    pub fn checkpoint_list(
        &self,
        pair: Option<&str>,
    ) -> Result<Vec<crate::pair::checkpoints::CheckpointInfo>, EngineError> {
        let pairs = match pair {
            Some(name) => vec![self.pair(name)?],
            None => self.state().pairs.values().cloned().collect(),
        };
        Ok(pairs.iter().flat_map(|p| p.checkpoint_infos()).collect())
    }

    /// `checkpoint_delete`: what the checkpoint covered joins the next older one's.
    pub fn checkpoint_delete(&self, pair: &str, name: &str) -> Result<(), EngineError> {
        let name = name.to_string();
        self.transition(&[pair.to_string()], Action::DeleteCheckpoint { name })
            .map(|_| ())
    }

    /// Resyncs a pair forward (P to S) or in reverse (restore S onto P).
    pub fn pair_resync(&self, name: &str, reverse: bool) -> Result<(), EngineError> {
        self.pair_resync_with(name, reverse, false)
    }

    /// Resyncs a pair; with `full`, every track is copied (forward: P to S, also from PAIR or
    /// COPY; reverse: S to P wherever S holds the image), not only the changed ones.
    pub fn pair_resync_with(
        &self,
        name: &str,
        reverse: bool,
        full: bool,
    ) -> Result<(), EngineError> {
        self.transition(&[name.to_string()], Action::Resync { reverse, full })
            .map(|_| ())
    }

    /// Deletes a pair (its bdevs stay, unclaimed) and its metadata. Refused while it is
    /// exported.
    pub fn pair_delete(&self, name: &str) -> Result<(), EngineError> {
        self.remove_pair(name, true)
    }

    /// Takes a pair out of the engine as `pair_delete` does but keeps its metadata file, so a
    /// later `pair_create` of the same name brings it back (a configuration that brought the
    /// pair back and is then rolled back).
    pub(crate) fn pair_unload(&self, name: &str) -> Result<(), EngineError> {
        self.remove_pair(name, false)
    }

    fn remove_pair(&self, name: &str, remove_metadata: bool) -> Result<(), EngineError> {
        // Checked and deleted under the locks a backup start and an export start hold.
        let _starting = self
            .backup_starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut st = self.state();
        let primary = st
            .pairs
            .get(name)
            .ok_or_else(|| PairError::NotFound(name.to_string()))?
            .primary()
            .name()
            .to_string();
        self.check_pair_not_exported(name, &primary)?;
        if let Some(id) = self.backups.running_for(name) {
            return Err(EngineError::InUse(format!(
                "backup {id} of pair '{name}' is running: cancel it first"
            )));
        }
        if let Some(id) = self.verify_running_for(name) {
            return Err(EngineError::InUse(format!(
                "verification {id} of pair '{name}' is running: cancel it first"
            )));
        }
        let pair = st
            .pairs
            .remove(name)
            .ok_or_else(|| PairError::NotFound(name.to_string()))?;
        pair.mark_deleted();
        st.files
            .remove(&super::bdevs::FileOwner::Metadata(name.to_string()));
        if remove_metadata {
            let _ = std::fs::remove_file(self.metadata_path(name));
        }
        st.bdevs.release(pair.primary().name(), name);
        st.bdevs.release(pair.secondary().name(), name);
        tracing::info!(pair = %name, metadata_kept = !remove_metadata, "pair deleted");
        Ok(())
    }

    /// `pair_get`: every pair, or one.
    pub fn pair_get(&self, name: Option<&str>) -> Result<Vec<PairInfo>, EngineError> {
        let st = self.state();
        match name {
            Some(n) => Ok(vec![st
                .pairs
                .get(n)
                .ok_or_else(|| PairError::NotFound(n.to_string()))?
                .info()]),
            None => Ok(st.pairs.values().map(|p| p.info()).collect()),
        }
    }

    /// A bdev hosts use to reach a pair: P through the pair, or the image.
    pub fn pair_view(&self, name: &str, view: View) -> Result<Arc<dyn drivers::Bdev>, EngineError> {
        Ok(Arc::new(PairView::new(self.pair(name)?, view)))
    }
}
