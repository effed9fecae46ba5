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
    /// last written, appended to its journal and made durable (see [`super::config_store`]),
    /// so a restart finds it whole and a change costs the same with 10 objects or 10,000.
    pub fn persist_config(&self) -> std::io::Result<()> {
        let mut store = self
            .config_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let calls = match self.save_config() {
            serde_json::Value::Object(mut m) => match m.remove("config") {
                Some(serde_json::Value::Array(calls)) => calls,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        store.persist(&self.state_dir, calls)
    }

    /// The running configuration: the calls that rebuild every key of the keyring (names and
    /// paths: before anything that names a key), bdev, pair and export, in order.
    pub fn save_config(&self) -> serde_json::Value {
        let mut calls = self.keyring.config();
        let st = self.state();
        calls.extend(st.bdevs.config().into_iter().filter(|c| !c.is_null()));
        for p in st.pairs.values() {
            calls.push(serde_json::json!({
                "method": "pair_create",
                "params": {
                    "name": p.name(),
                    "primary": p.primary().name(),
                    "secondary": p.secondary().name(),
                    "track_size": p.track_size(),
                    "copy_rate": p.copy_rate(),
                }
            }));
        }
        drop(st);
        calls.extend(self.nbd.config());
        calls.extend(self.nvmf.config());
        serde_json::json!({ "config": calls })
    }
}
