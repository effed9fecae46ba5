//! What a backup stores ([`crate::backup::plan`]): an incremental's base checked and its
//! changed tracks taken, a full backup's holes found, on the control thread before the job
//! starts.

use std::os::unix::fs::FileTypeExt;

use drivers::digest::ChunkDigests;

use super::{Engine, EngineError};
use crate::backup::plan::{BaseImage, Plan};
use crate::backup::target::Connection;
use crate::backup::{BackupState, Options, Target};
use crate::pair::channel::View;
use crate::pair::{Pair, PairError};

/// An incremental's base, checked before the backup starts.
pub(crate) struct Base {
    image: BaseImage,
    chunks: ChunkDigests,
    split_at_ns: u64,
}

fn invalid(msg: String) -> EngineError {
    EngineError::Pair(PairError::Invalid(msg))
}

/// What a full backup to a target does with what holds no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holes {
    /// Leaves it unwritten: a tape archive's sparse member, a new file's holes.
    Leave,
    /// Writes zeroes over it: the target keeps what it held (a block device, an NBD export
    /// that takes NBD_CMD_WRITE_ZEROES, an NVMe namespace whose controller takes Write Zeroes).
    WriteZeroes,
    /// Writes every byte (an NBD server or NVMe controller without write zeroes).
    Store,
}

fn holes_of(target: &Target, connection: Option<&Connection>) -> Holes {
    match (target, connection) {
        (Target::Tape { .. }, _) => Holes::Leave,
        (Target::File { path }, _) => {
            if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
                Holes::WriteZeroes
            } else {
                Holes::Leave
            }
        }
        (Target::Nbd { .. }, Some(Connection::Nbd(c))) if c.writes_zeroes() => Holes::WriteZeroes,
        (Target::Nvmf { .. }, Some(Connection::Nvmf(c))) if c.writes_zeroes() => Holes::WriteZeroes,
        (Target::Nvmf { .. }, _) => Holes::Store,
        (Target::Nbd { .. }, _) => Holes::Store,
    }
}

/// Refuses a file target whose mark says it holds another image than checkpoint `since`'s
/// (`digest`) of pair `pair`. A file without a mark is taken on trust.
fn check_mark(
    path: &std::path::Path,
    pair: &str,
    since: &str,
    digest: &str,
) -> Result<(), EngineError> {
    let Some(mark) = drivers::sink::image_mark::read(path).map_err(invalid)? else {
        return Ok(());
    };
    if mark.pair != pair || mark.digest != digest {
        let of = match &mark.checkpoint {
            Some(c) => format!("checkpoint '{c}' of pair '{}'", mark.pair),
            None => format!("an image of pair '{}'", mark.pair),
        };
        return Err(invalid(format!(
            "{} holds {of} ({}), not checkpoint '{since}' of pair '{pair}' ({digest}): an \
             incremental backup applies onto its base only",
            path.display(),
            mark.digest
        )));
    }
    Ok(())
}

impl Engine {
    /// Checks `opts.since` for a backup of `p` to `target`: a checkpoint of this pair whose
    /// backup's chunk digests are kept, a target that can hold its image. `None` for a full
    /// backup.
    pub(crate) fn incremental_base(
        &self,
        p: &Pair,
        target: &Target,
        opts: &Options,
    ) -> Result<Option<Base>, EngineError> {
        let Some(since) = opts.since.as_deref() else {
            return Ok(None);
        };
        if opts.flat_sha256 {
            return Err(invalid(
                "flat_sha256 needs every byte of the image: an incremental backup (since) has \
                 only the sha256-tree digest"
                    .into(),
            ));
        }
        let Some(cp) = p.checkpoint_infos().into_iter().find(|c| c.name == since) else {
            let owner = self
                .checkpoint_list(None)?
                .into_iter()
                .find(|c| c.name == since)
                .map(|c| c.pair);
            return Err(invalid(match owner {
                Some(other) => format!(
                    "checkpoint '{since}' is pair '{other}''s, not pair '{}''s: an incremental \
                     backup applies onto an image of its own pair",
                    p.name()
                ),
                None => format!("pair '{}' has no checkpoint named '{since}'", p.name()),
            }));
        };
        if let Target::File { path } = target {
            let m = std::fs::metadata(path).map_err(|e| {
                invalid(format!(
                    "an incremental backup writes onto the image of checkpoint '{since}': {}: {e}",
                    path.display()
                ))
            })?;
            let size = p.geometry().size();
            if m.file_type().is_file() && m.len() != size {
                return Err(invalid(format!(
                    "{} holds {} bytes, not an image of {size}: it cannot hold checkpoint \
                     '{since}'",
                    path.display(),
                    m.len()
                )));
            }
        }
        let backup = self
            .backup_get(Some(cp.backup_id))
            .ok()
            .and_then(|mut v| v.pop());
        let digest = backup
            .filter(|b| b.state == BackupState::Done)
            .and_then(|b| b.digest)
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "checkpoint '{since}': the digest of backup {} that made it is not known; \
                     take a full backup",
                    cp.backup_id
                ))
            })?;
        if let Target::File { path } = target {
            check_mark(path, p.name(), since, &digest)?;
        }
        let chunks = self.backup_chunk_digests(cp.backup_id).map_err(|e| {
            EngineError::NotFound(format!(
                "checkpoint '{since}': {e}; an incremental needs them, take a full backup"
            ))
        })?;
        Ok(Some(Base {
            image: BaseImage {
                checkpoint: since.to_string(),
                digest,
            },
            chunks,
            split_at_ns: cp.split_at_ns,
        }))
    }

    /// What a backup of `p`'s image split at `split_at_ns` stores (the pair is in the backup:
    /// writes to the image wait until the job has read their tracks).
    pub(crate) fn backup_plan(
        &self,
        p: &Pair,
        (target, connection): (&Target, Option<&Connection>),
        opts: &Options,
        base: Option<Base>,
        split_at_ns: u64,
    ) -> Result<Plan, EngineError> {
        let (size, track_size) = (p.geometry().size(), p.track_size());
        if let Some(base) = base {
            if base.split_at_ns > split_at_ns {
                return Err(invalid(format!(
                    "checkpoint '{}' (split at {} ns) is newer than the pair's split (at {} ns)",
                    base.image.checkpoint, base.split_at_ns, split_at_ns
                )));
            }
            let tracks = p.changed_since_for_incremental(&base.image.checkpoint)?;
            return Ok(Plan::incremental(
                size,
                track_size,
                &tracks,
                base.image,
                base.chunks,
            ));
        }
        let holes = holes_of(target, connection);
        if opts.flat_sha256 || holes == Holes::Store {
            return Ok(Plan::whole(size));
        }
        let image = self.pair_view(p.name(), View::Image)?;
        let plan =
            Plan::sparse(image.as_ref(), size, track_size).map_err(EngineError::Unavailable)?;
        Ok(match holes {
            Holes::WriteZeroes => plan.zeroing_holes(),
            _ => plan,
        })
    }
}
