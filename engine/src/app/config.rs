//! The running configuration: what `save_config` returns (the calls that rebuild every bdev,
//! pair and export) and its copy in the state directory, brought up to date after each change.

use std::path::PathBuf;
use std::sync::PoisonError;

use super::Engine;
use crate::export::ExportSet;

/// The running configuration's file in the state directory.
pub const CONFIG_FILE: &str = "config.json";

impl Engine {
    /// Where the running configuration is kept.
    pub fn config_path(&self) -> PathBuf {
        self.state_dir.join(CONFIG_FILE)
    }

    /// Writes the running configuration to the state directory: the changes since it was
    /// last written, appended to its journal and made durable (see [`super::config_store`]).
    pub fn persist_config(&self) -> std::io::Result<()> {
        self.persist_change(None)
    }

    /// [`Engine::persist_config`] after a change of one object, `(kind, name)` (see
    /// [`super::config_store::kind`]), or of anything (`None`). For one object only its call
    /// is rendered and compared, so a change costs the same with 10 objects or 10,000.
    pub fn persist_change(&self, touched: Option<(&'static str, String)>) -> std::io::Result<()> {
        let mut store = self
            .config_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((kind, name)) = touched {
            if store.takes_one_change() {
                let now = self.config_call_of(kind, &name);
                return store.persist_one(kind, &name, now);
            }
        }
        let calls = match self.save_config() {
            serde_json::Value::Object(mut m) => match m.remove("config") {
                Some(serde_json::Value::Array(calls)) => calls,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        store.persist(&self.state_dir, calls)
    }

    /// The call that rebuilds the object `(kind, name)`, if it exists.
    fn config_call_of(&self, kind: &str, name: &str) -> Option<serde_json::Value> {
        let rendered =
            |b: std::sync::Arc<dyn drivers::Bdev>| Some(b.config()).filter(|c| !c.is_null());
        match kind {
            "key" => self.keyring.config_of(name),
            "bdev" => self.state().bdevs.get(name).ok().and_then(rendered),
            "nvme" => {
                let st = self.state();
                let first = st.nvme_controllers.get(name)?.first()?;
                st.bdevs.get(first).ok().and_then(rendered)
            }
            "pair" => self.state().pairs.get(name).map(|p| pair_call(p)),
            "nbd" => self.nbd.config_of(name),
            "nvmf" => self.nvmf.config_of(name),
            _ => None,
        }
    }

    /// The running configuration: the calls that rebuild every key of the keyring (names and
    /// paths: before anything that names a key), bdev, pair and export, in order.
    pub fn save_config(&self) -> serde_json::Value {
        let mut calls = self.keyring.config();
        let st = self.state();
        calls.extend(st.bdevs.config().into_iter().filter(|c| !c.is_null()));
        calls.extend(st.pairs.values().map(|p| pair_call(p)));
        drop(st);
        calls.extend(self.nbd.config());
        calls.extend(self.nvmf.config());
        serde_json::json!({ "config": calls })
    }
}

/// The call that rebuilds pair `p`.
fn pair_call(p: &crate::pair::Pair) -> serde_json::Value {
    serde_json::json!({
        "method": "pair_create",
        "params": {
            "name": p.name(),
            "primary": p.primary().name(),
            "secondary": p.secondary().name(),
            "track_size": p.track_size(),
            "copy_rate": p.copy_rate(),
        }
    })
}
