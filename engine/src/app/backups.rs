//! Backups: starting one (its target checked and connected on this control thread, its staging
//! buffers mapped and its hashing pollers placed from here, then the job placed on a reactor),
//! listing and cancelling; a done backup's chunk digests.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use drivers::digest::{ChunkDigests, DigestFileError};

use super::{Engine, EngineError};
use crate::backup::hasher::HashQueue;
use crate::backup::job::BackupJob;
use crate::backup::tree::TreeHash;
use crate::backup::{target, BackupInfo, BackupState, Mode, Options, Target};
use crate::pair::PairError;

impl Engine {
    /// Starts a backup of a split pair's image, at most `rate` bytes per second (0 = no limit);
    /// returns its id. The job runs on a reactor other than the copier's when there are two or
    /// more.
    pub fn backup_start(
        &self,
        pair: &str,
        mode: Mode,
        target: Target,
        rate: u64,
    ) -> Result<u64, EngineError> {
        let opts = Options {
            rate,
            ..Options::default()
        };
        self.backup_start_with(pair, mode, target, opts)
    }

    /// [`Engine::backup_start`] with every option: a throughput limit for while hosts use the
    /// pair (`host_rate`, bytes per second, 0 = none), the flat SHA-256 besides the tree digest
    /// (`flat_sha256`), and the checkpoint the pair gets once the backup is done.
    pub fn backup_start_with(
        &self,
        pair: &str,
        mode: Mode,
        target: Target,
        opts: Options,
    ) -> Result<u64, EngineError> {
        let _starting = self
            .backup_starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let p = self.pair(pair)?;
        if let Some(name) = &opts.checkpoint {
            p.check_new_checkpoint(name)?;
            if let Some(other) = self.backups.running_with_checkpoint(pair, name) {
                return Err(EngineError::InUse(format!(
                    "backup {other} is making checkpoint '{name}' of pair '{pair}'"
                )));
            }
        }
        if let Target::File { path } | Target::Tape { path, .. } = &target {
            let mut partial = path.as_os_str().to_owned();
            partial.push(".partial");
            let st = self.state();
            for candidate in [path.as_path(), Path::new(&partial)] {
                if let Some(what) = self.engine_file(&st, candidate) {
                    return Err(EngineError::InUse(format!(
                        "backup target {} is {what}",
                        candidate.display()
                    )));
                }
            }
            // The chunk digest files are the engine's, made later: their folder is refused whole.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let digests = self.state_dir.join(crate::backup::DIGESTS_DIR);
            if dir.and_then(|d| d.canonicalize().ok()) == digests.canonicalize().ok()
                && digests.exists()
            {
                return Err(EngineError::InUse(format!(
                    "backup target {} is in the engine's folder of chunk digests",
                    path.display()
                )));
            }
        }
        // Two backups into one place would interleave their bytes under one digest.
        if let Some(other) = self.backups.running_to(&target) {
            return Err(EngineError::InUse(format!(
                "backup {other} is writing to that target"
            )));
        }
        target::check_params(&target).map_err(|e| match e {
            target::TargetError::Invalid(m) => EngineError::Pair(PairError::Invalid(m)),
            e @ target::TargetError::InUse(_) => EngineError::InUse(e.to_string()),
        })?;
        let base = self.incremental_base(&p, &target, &opts)?;
        // A network target is connected here, on the control thread: its handshake blocks.
        let connection =
            target::connect(&target, &p, &self.keyring).map_err(EngineError::Target)?;
        // And the staging buffers are mapped here, not on the reactor that serves hosts too.
        let pool = BackupJob::staging_pool(&p).map_err(|e| {
            EngineError::Unavailable(format!("no memory for the backup's staging buffers: {e}"))
        })?;
        let digests_dir = self.state_dir.join(crate::backup::DIGESTS_DIR);
        std::fs::create_dir_all(&digests_dir)
            .map_err(|e| EngineError::Unavailable(format!("{}: {e}", digests_dir.display())))?;
        let split_at_ns = self.pair_begin_backup(pair)?;
        let size = p.geometry().size();
        let plan =
            match self.backup_plan(&p, (&target, connection.as_ref()), &opts, base, split_at_ns) {
                Ok(plan) => plan,
                Err(e) => {
                    p.end_backup();
                    return Err(e);
                }
            };
        let backup = match self.backups.add(
            pair,
            (mode, target),
            (size, plan.stored_bytes()),
            split_at_ns,
            opts.clone(),
        ) {
            Ok(b) => b,
            Err(e) => {
                p.end_backup();
                return Err(EngineError::Target(format!(
                    "the backup's record cannot be written: {e}"
                )));
            }
        };
        // The transferrer goes next to the pair's copier, on another core when there is one.
        let reactor = self.reactors.get(p.copier_reactor_index() + 1).clone();
        // The tree digest's chunks hash on every reactor; the flat SHA-256, one stream, on
        // another reactor than the transferrer's when there is one.
        let hashing = opts
            .flat_sha256
            .then(|| HashQueue::start(self.reactors.get(reactor.index() + 1).clone(), size))
            .transpose()
            .and_then(|flat| {
                let known = plan.unstored_digests();
                TreeHash::start(self.reactors.handles(), size, flat, known)
            });
        let fail = |e: String| {
            p.end_backup();
            backup.end(BackupState::Failed, None, Some(e.clone()), 0);
            EngineError::Unavailable(e)
        };
        let tree = hashing.map_err(|e| fail(format!("starting the backup's hashing: {e}")))?;
        let digests_path = crate::backup::digests_path(&self.state_dir, backup.id);
        let (b, pr, t) = (Arc::clone(&backup), Arc::clone(&p), Arc::clone(&tree));
        let control = Arc::clone(&self.control);
        let sent = reactor.send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(
                BackupJob::new(b, pr, plan, pool, connection, t, digests_path)
                    .with_control(control),
            ))
        }));
        if let Err(e) = sent {
            tree.stop();
            fail(e.to_string());
            return Err(e.into());
        }
        tracing::info!(
            backup = backup.id,
            pair,
            mode = mode.as_str(),
            checkpoint = opts.checkpoint.as_deref(),
            since = opts.since.as_deref(),
            "backup started"
        );
        Ok(backup.id)
    }

    /// The chunk digests of done backup `id`, kept in the state directory (an incremental
    /// backup computes its root from them and its changed chunks').
    pub fn backup_chunk_digests(&self, id: u64) -> Result<ChunkDigests, EngineError> {
        let b = self
            .backups
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no backup with id {id}")))?;
        if b.state() != BackupState::Done {
            return Err(EngineError::NotFound(format!(
                "backup {id} is {:?}: only a done backup has chunk digests",
                b.state()
            )));
        }
        let path = crate::backup::digests_path(&self.state_dir, id);
        ChunkDigests::load(&path).map_err(|e| match e {
            DigestFileError::Io { ref source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                EngineError::NotFound(format!("backup {id} has no chunk digests: {e}"))
            }
            e => EngineError::Unavailable(e.to_string()),
        })
    }

    /// `backup_get`.
    pub fn backup_get(&self, id: Option<u64>) -> Result<Vec<BackupInfo>, EngineError> {
        self.backups
            .infos(id)
            .ok_or_else(|| EngineError::NotFound(format!("no backup with id {}", id.unwrap_or(0))))
    }

    /// `backup_cancel`: asks a running backup to stop (it ends `cancelled`).
    pub fn backup_cancel(&self, id: u64) -> Result<(), EngineError> {
        let b = self
            .backups
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no backup with id {id}")))?;
        if b.state() != BackupState::Running {
            return Err(EngineError::InUse(format!(
                "backup {id} is not running ({:?})",
                b.state()
            )));
        }
        b.cancel();
        for r in self.reactors.handles() {
            r.wake_if_parked();
        }
        Ok(())
    }
}
