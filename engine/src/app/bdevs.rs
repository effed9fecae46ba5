//! Bdevs: adding and deleting them, NVMe controllers attached and detached, and the check that
//! no file is opened as two bdevs or as a bdev and one of the engine's own files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use drivers::BdevError;

use super::{Engine, EngineError, State, CONFIG_FILE};
use crate::export::Address;

/// A file's identity, whatever the path naming it: device and inode, or the device number of
/// a block device.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).ok()?;
    if m.file_type().is_block_device() {
        Some((u64::MAX, m.rdev()))
    } else {
        Some((m.dev(), m.ino()))
    }
}

/// Who holds a file of the [`FileIndex`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum FileOwner {
    /// The bdev of this name.
    Bdev(String),
    /// The metadata of the pair of this name.
    Metadata(String),
}

/// The files the bdevs and the pairs' metadata are, by identity, taken when each is added:
/// what checking a new bdev's file looks up, so that check costs the same with 10 bdevs or
/// 10,000 (no file of them is examined again).
#[derive(Default)]
pub struct FileIndex {
    by_id: HashMap<(u64, u64), String>,
    by_owner: HashMap<FileOwner, (u64, u64)>,
}

impl FileIndex {
    /// `owner` holds the file at `path` (nothing when it cannot be examined).
    pub(crate) fn insert(&mut self, owner: FileOwner, path: &Path) {
        self.remove(&owner);
        let Some(id) = file_id(path) else {
            return;
        };
        let what = match &owner {
            FileOwner::Bdev(n) => format!("the file of bdev '{n}'"),
            FileOwner::Metadata(p) => format!("the metadata of pair '{p}'"),
        };
        self.by_id.insert(id, what);
        self.by_owner.insert(owner, id);
    }

    /// `owner` holds its file no more.
    pub(crate) fn remove(&mut self, owner: &FileOwner) {
        if let Some(id) = self.by_owner.remove(owner) {
            self.by_id.remove(&id);
        }
    }

    fn holder(&self, id: (u64, u64)) -> Option<&String> {
        self.by_id.get(&id)
    }
}

impl Engine {
    /// Adds a bdev to the table.
    pub fn bdev_add(&self, bdev: Arc<dyn drivers::Bdev>) -> Result<(), EngineError> {
        let mut st = self.state();
        if let Some(f) = bdev.backing_file() {
            self.check_unused_file(&st, f)?;
        }
        let (name, file) = (
            bdev.name().to_string(),
            bdev.backing_file().map(Path::to_path_buf),
        );
        st.bdevs.add(bdev)?;
        if let Some(f) = file {
            st.files.insert(FileOwner::Bdev(name), &f);
        }
        Ok(())
    }

    /// Fails when `path` is already one of the engine's files (checked before a bdev opens it,
    /// which may extend it): one file as two bdevs would let one write past the other's pair.
    pub fn check_bdev_file(&self, path: &Path) -> Result<(), EngineError> {
        self.check_unused_file(&self.state(), path)
    }

    fn check_unused_file(&self, st: &State, path: &Path) -> Result<(), EngineError> {
        match self.engine_file(st, path) {
            Some(what) => Err(EngineError::InUse(format!(
                "{} is {what}: a file is opened as one bdev only",
                path.display()
            ))),
            None => Ok(()),
        }
    }

    /// What of the engine's own `path` is, if anything: a bdev's file, a pair's metadata, or
    /// the state directory's configuration or backup records. Files are compared by identity,
    /// so another name for the same file (a link, `..`) is caught too.
    pub(super) fn engine_file(&self, st: &State, path: &Path) -> Option<String> {
        let id = file_id(path)?;
        if let Some(what) = st.files.holder(id) {
            return Some(what.clone());
        }
        let own = [
            CONFIG_FILE,
            &format!("{CONFIG_FILE}.new"),
            super::config_store::JOURNAL_FILE,
            &format!("{}.new", super::config_store::JOURNAL_FILE),
            "backups.json",
            "backups.json.new",
            super::LOCK_FILE,
            crate::pair::split_journal::FILE,
        ];
        if own
            .iter()
            .any(|f| file_id(&self.state_dir.join(f)) == Some(id))
        {
            return Some("a file of the engine's state directory".into());
        }
        None
    }

    /// Attaches an NVMe controller (`bdev_nvme_attach_controller`): every namespace becomes a
    /// bdev, or none does. Gives the bdevs' names.
    pub fn nvme_attach(
        &self,
        params: serde_json::Value,
        dhchap: Option<Arc<drivers::nvmf::auth::HostKeys>>,
    ) -> Result<Vec<String>, EngineError> {
        let create_error = |e| match e {
            drivers::CreateError::Bdev(b) => EngineError::Bdev(b),
            drivers::CreateError::Params(m) => EngineError::Bdev(BdevError::Invalid(m)),
        };
        let mut p: drivers::nvme::rpc::AttachParams =
            drivers::table::parse_params(params).map_err(create_error)?;
        p.dhchap = dhchap;
        let name = p.name.clone();
        if self.state().nvme_controllers.contains_key(&name) {
            return Err(EngineError::InUse(format!(
                "an NVMe controller named '{name}' is already attached"
            )));
        }
        // This engine's own export as a bdev would be a second name for a bdev it has (past
        // the checks that protect pairs), and a restart would replay the attach before the
        // export listens.
        if let Ok(drivers::nvme::rpc::Transport::Tcp {
            trsvcid, subnqn, ..
        }) = p.transport()
        {
            let port_of = |a: &Address| match a {
                Address::Tcp(listen) => listen
                    .rsplit(':')
                    .next()
                    .and_then(|port| port.parse::<u16>().ok()),
                Address::Unix(_) => None,
            };
            if let Some(own) = self
                .nvmf
                .list()
                .into_iter()
                .find(|e| e.name == subnqn && port_of(&e.address) == Some(trsvcid))
            {
                return Err(EngineError::InUse(format!(
                    "'{}' is this engine's own NVMe/TCP export: use its bdev or pair directly",
                    own.name
                )));
            }
        }
        let bdevs = drivers::nvme::rpc::attach_with(p).map_err(create_error)?;
        let mut st = self.state();
        if st.nvme_controllers.contains_key(&name) {
            return Err(EngineError::InUse(format!(
                "an NVMe controller named '{name}' is already attached"
            )));
        }
        let names: Vec<String> = bdevs.iter().map(|b| b.name().to_string()).collect();
        if let Some(taken) = names.iter().find(|n| st.bdevs.contains(n)) {
            return Err(BdevError::Exists(taken.clone()).into());
        }
        for b in bdevs {
            st.bdevs.add(b)?;
        }
        st.nvme_controllers.insert(name, names.clone());
        Ok(names)
    }

    /// Detaches an NVMe controller: its namespaces' bdevs go, unless one is claimed or exported.
    pub fn nvme_detach(&self, name: &str) -> Result<(), EngineError> {
        // Checked and detached under one lock: an export starts under it too.
        let mut st = self.state();
        let names =
            st.nvme_controllers.get(name).cloned().ok_or_else(|| {
                EngineError::NotFound(format!("no NVMe controller named '{name}'"))
            })?;
        for n in &names {
            self.check_not_exported(n)?;
        }
        for n in &names {
            if let Some(by) = st
                .bdevs
                .list(Some(n))?
                .first()
                .and_then(|i| i.claimed_by.clone())
            {
                return Err(BdevError::Claimed {
                    name: n.clone(),
                    by,
                }
                .into());
            }
        }
        for n in &names {
            st.bdevs.delete(n)?;
            st.files.remove(&FileOwner::Bdev(n.clone()));
        }
        st.nvme_controllers.remove(name);
        tracing::info!(
            controller = name,
            "NVMe controller detached from the bdev table"
        );
        Ok(())
    }

    /// Deletes an unclaimed, unexported bdev.
    pub fn bdev_delete(&self, name: &str) -> Result<(), EngineError> {
        // Checked and deleted under one lock: an export starts under it too.
        let mut st = self.state();
        if let Some((ctrl, _)) = st
            .nvme_controllers
            .iter()
            .find(|(_, ns)| ns.iter().any(|n| n == name))
        {
            return Err(EngineError::InUse(format!(
                "bdev '{name}' is a namespace of NVMe controller '{ctrl}': use \
                 bdev_nvme_detach_controller"
            )));
        }
        self.check_not_exported(name)?;
        st.bdevs.delete(name)?;
        st.files.remove(&FileOwner::Bdev(name.to_string()));
        Ok(())
    }
}
