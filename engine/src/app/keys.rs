//! The keyring's operations on the engine: keys added, listed, and removed only when nothing
//! names them.

use std::path::Path;
use std::sync::Arc;

use drivers::nvmf::auth::{DhchapSecret, HostKeys};

use super::{Engine, EngineError};
use crate::keyring::{KeyInfo, Keyring, KeyringError};

impl Engine {
    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// `keyring_file_add_key`.
    pub fn keyring_file_add_key(&self, name: &str, path: &Path) -> Result<(), EngineError> {
        Ok(self.keyring.add(name, path)?)
    }

    /// `keyring_file_remove_key`: refused while an export's host names the key.
    pub fn keyring_file_remove_key(&self, name: &str) -> Result<(), EngineError> {
        Ok(self.keyring.remove(name, |key| self.key_user(key))?)
    }

    /// `keyring_get_keys`.
    pub fn keyring_get_keys(&self) -> Vec<KeyInfo> {
        self.keyring.list()
    }

    /// What names key `key`, if anything does: an NBD export's TLS or an NVMe/TCP export's host.
    fn key_user(&self, key: &str) -> Option<String> {
        let nbd = self.nbd.list().into_iter().find_map(|e| {
            let o = e
                .options
                .as_any()
                .downcast_ref::<crate::nbd::NbdOptions>()?;
            let psk = o.tls.as_ref()?.tls_params().psk_key.as_deref()?;
            (psk == key).then(|| format!("NBD export '{}' (tls)", e.name))
        });
        if nbd.is_some() {
            return nbd;
        }
        self.nvmf.list().iter().find_map(|e| {
            let access = e
                .options
                .as_any()
                .downcast_ref::<crate::nvmf::hosts::HostAccess>()?;
            let host = access.key_user(key)?;
            Some(format!("NVMe/TCP export '{}' (host '{host}')", e.name))
        })
    }

    /// The DH-HMAC-CHAP keys `dhchap_key` and `dhchap_ctrlr_key` name (a host entry's or an
    /// initiator's), read from the keyring now and parsed; `None` when neither is given. A
    /// controller key alone is refused: the controller proves itself only to a host that
    /// authenticates.
    pub fn dhchap_keys(
        &self,
        key: Option<&str>,
        ctrlr_key: Option<&str>,
    ) -> Result<Option<Arc<HostKeys>>, EngineError> {
        let read = |param: &'static str, name: &str| -> Result<DhchapSecret, EngineError> {
            let secret = self.keyring.secret(name)?;
            DhchapSecret::parse(secret.expose()).map_err(|e| {
                KeyringError::Unusable {
                    param,
                    name: name.to_string(),
                    why: e.to_string(),
                }
                .into()
            })
        };
        match (key, ctrlr_key) {
            (None, None) => Ok(None),
            (None, Some(name)) => Err(match self.keyring.check(name) {
                Err(unknown) => unknown,
                Ok(()) => KeyringError::Unusable {
                    param: "dhchap_ctrlr_key",
                    name: name.to_string(),
                    why: "it needs a dhchap_key too: the controller authenticates only to a \
                          host that does"
                        .into(),
                },
            }
            .into()),
            (Some(k), c) => Ok(Some(Arc::new(HostKeys {
                key: read("dhchap_key", k)?,
                ctrl_key: c.map(|c| read("dhchap_ctrlr_key", c)).transpose()?,
            }))),
        }
    }
}
