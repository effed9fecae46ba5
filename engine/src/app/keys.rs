//! The keyring's operations on the engine: keys added, listed, and removed only when nothing
//! names them.

use std::path::Path;

use super::{Engine, EngineError};
use crate::keyring::{KeyInfo, Keyring};

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

    /// What names key `key`, if anything does: an NVMe/TCP export's host.
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

    /// Checks the key names a host entry or an initiator gives: each must be in the keyring.
    /// Then refuses them: DH-HMAC-CHAP is not there yet, and a key must never be accepted
    /// without the authentication it asks for.
    pub fn check_dhchap_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'static str, &'a str)>,
    ) -> Result<(), EngineError> {
        let keys: Vec<_> = keys.into_iter().collect();
        for (_, key) in &keys {
            self.keyring.check(key)?;
        }
        match keys.first() {
            Some((param, _)) => Err(EngineError::Unavailable(format!(
                "parameter '{param}': DH-HMAC-CHAP authentication is not supported yet"
            ))),
            None => Ok(()),
        }
    }
}
