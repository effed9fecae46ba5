//! Backups: starting one (its target checked and connected on this control thread, its staging
//! buffers mapped here, then the job placed on a reactor), listing and cancelling.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use super::{Engine, EngineError};
use crate::backup::job::BackupJob;
use crate::backup::{target, BackupInfo, Mode, NewBackup, Target};
use crate::pair::PairError;

/// What `backup_start` takes beyond the pair, mode, target and limits.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Give the pair checkpoint of this name at the image's split once the backup is done.
    pub checkpoint: Option<String>,
}

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
        self.backup_start_limited(pair, mode, target, rate, crate::backup::DEFAULT_HOST_RATE)
    }

    /// [`Engine::backup_start`] with a throughput limit for while hosts use the pair
    /// (`host_rate`, bytes per second, 0 = none).
    pub fn backup_start_limited(
        &self,
        pair: &str,
        mode: Mode,
        target: Target,
        rate: u64,
        host_rate: u64,
    ) -> Result<u64, EngineError> {
        let limits = crate::backup::Limits { rate, host_rate };
        self.backup_start_with(pair, mode, target, limits, BackupOptions::default())
    }

    /// [`Engine::backup_start_limited`] with the options of `backup_start` beyond the target.
    pub fn backup_start_with(
        &self,
        pair: &str,
        mode: Mode,
        target: Target,
        limits: crate::backup::Limits,
        options: BackupOptions,
    ) -> Result<u64, EngineError> {
        let _starting = self
            .backup_starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let p = self.pair(pair)?;
        if let Some(name) = &options.checkpoint {
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
        }
        // Two backups into one place would interleave their bytes under one SHA-256.
        if let Some(other) = self.backups.running_to(&target) {
            return Err(EngineError::InUse(format!(
                "backup {other} is writing to that target"
            )));
        }
        target::check_params(&target).map_err(|e| match e {
            target::TargetError::Invalid(m) => EngineError::Pair(PairError::Invalid(m)),
            e @ target::TargetError::InUse(_) => EngineError::InUse(e.to_string()),
        })?;
        // A network target is connected here, on the control thread: its handshake blocks.
        let connection = target::connect(&target, &p).map_err(EngineError::Target)?;
        // And the staging buffers are mapped here, not on the reactor that serves hosts too.
        let pool = BackupJob::staging_pool(&p).map_err(|e| {
            EngineError::Unavailable(format!("no memory for the backup's staging buffers: {e}"))
        })?;
        let split_at_ns = self.pair_begin_backup(pair)?;
        let backup = match self.backups.add(NewBackup {
            pair: pair.to_string(),
            mode,
            target,
            bytes_total: p.geometry().size(),
            split_at_ns,
            limits,
            checkpoint: options.checkpoint.clone(),
        }) {
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
        // The SHA-256 on another reactor than the transferrer's, when there is one.
        let hash_reactor =
            (self.reactors.len() > 1).then(|| self.reactors.get(reactor.index() + 1).clone());
        let (b, pr) = (Arc::clone(&backup), Arc::clone(&p));
        let control = Arc::clone(&self.control);
        let sent = reactor.send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(
                BackupJob::new(b, pr, pool, connection, hash_reactor).with_control(control),
            ))
        }));
        if let Err(e) = sent {
            p.end_backup();
            backup.end(
                crate::backup::BackupState::Failed,
                None,
                Some(e.to_string()),
                0,
            );
            return Err(e.into());
        }
        tracing::info!(
            backup = backup.id,
            pair,
            mode = mode.as_str(),
            checkpoint = options.checkpoint.as_deref(),
            "backup started"
        );
        Ok(backup.id)
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
        if b.state() != crate::backup::BackupState::Running {
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
