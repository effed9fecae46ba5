//! Which hosts may connect to an NVMe/TCP export: its `hosts` (by host NQN, each with the names
//! of its DH-HMAC-CHAP keys, whose secrets are read when the host is allowed) and
//! `allow_any_host`, as SPDK's subsystems keep them.
//!
//! The list is checked at every Connect (admin and I/O queues) and filters the discovery log.
//! It may change while the export runs (`nvmf_export_add_host`, `nvmf_export_remove_host`):
//! each change bumps a revision that the export's connections watch, and a connection whose
//! host is no longer allowed closes.

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use drivers::nvmf::auth::HostKeys;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::export::{ExportError, ExportOptions};

/// One host allowed to connect: its NQN and the names of its keys in the keyring.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedHost {
    /// Host NQN.
    pub nqn: String,
    /// The key the host authenticates with (DH-HMAC-CHAP).
    #[serde(default)]
    pub dhchap_key: Option<String>,
    /// The key the controller authenticates with to the host (bidirectional DH-HMAC-CHAP).
    #[serde(default)]
    pub dhchap_ctrlr_key: Option<String>,
}

impl AllowedHost {
    /// A host named by its NQN alone.
    pub fn new(nqn: &str) -> Self {
        Self {
            nqn: nqn.to_string(),
            dhchap_key: None,
            dhchap_ctrlr_key: None,
        }
    }

    /// The key names it holds, with the parameter naming each.
    pub fn keys(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("dhchap_key", self.dhchap_key.as_deref()),
            ("dhchap_ctrlr_key", self.dhchap_ctrlr_key.as_deref()),
        ]
        .into_iter()
        .filter_map(|(param, key)| key.map(|k| (param, k)))
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("nqn".into(), self.nqn.clone().into());
        for (param, key) in self.keys() {
            m.insert(param.into(), key.into());
        }
        Value::Object(m)
    }
}

/// One entry of `hosts`: a plain string is the host's NQN, an object `{nqn, dhchap_key?,
/// dhchap_ctrlr_key?}` names its keys too. Only the form is checked here.
pub fn host_from_json(v: Value) -> Result<AllowedHost, ExportError> {
    let host = match v {
        Value::String(nqn) => AllowedHost::new(&nqn),
        v @ Value::Object(_) => drivers::table::parse_params(v)
            .map_err(|e| ExportError::Invalid(format!("parameter 'hosts': {e}")))?,
        other => {
            return Err(ExportError::Invalid(format!(
                "parameter 'hosts': an entry is a host NQN or {{nqn, dhchap_key?, \
                 dhchap_ctrlr_key?}}, not {other}"
            )))
        }
    };
    check_host_nqn(&host.nqn)?;
    Ok(host)
}

/// Checks a host NQN as the Connect data carries it (at most 223 bytes).
pub fn check_host_nqn(nqn: &str) -> Result<(), ExportError> {
    drivers::nvmf::fabrics::check_host_nqn(nqn)
        .map_err(|e| ExportError::Invalid(format!("host NQN {e}")))
}

/// True when every address `listen` (`host:port`) names is a loopback address (127.0.0.0/8,
/// ::1). A wildcard (0.0.0.0, ::) is not: it listens on every interface.
pub fn is_loopback_listen(listen: &str) -> bool {
    let Some((host, _)) = listen.rsplit_once(':') else {
        return false;
    };
    let host = host.trim_matches(['[', ']']);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    // A name: loopback only when everything it resolves to is.
    match (host, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// An allowed host with its DH-HMAC-CHAP keys, read from the keyring when it was allowed.
#[derive(Debug)]
struct Entry {
    host: AllowedHost,
    keys: Option<Arc<HostKeys>>,
}

/// The hosts an NVMe/TCP export allows.
#[derive(Debug)]
pub struct HostAccess {
    allow_any_host: bool,
    hosts: Mutex<Vec<Entry>>,
    /// Bumped by every change of `hosts`.
    revision: AtomicU64,
}

impl HostAccess {
    /// Access with `hosts` and their keys (checked by the caller: NQNs, no duplicates, keys
    /// read).
    pub fn new(allow_any_host: bool, hosts: Vec<(AllowedHost, Option<Arc<HostKeys>>)>) -> Self {
        Self {
            allow_any_host,
            hosts: Mutex::new(
                hosts
                    .into_iter()
                    .map(|(host, keys)| Entry { host, keys })
                    .collect(),
            ),
            revision: AtomicU64::new(0),
        }
    }

    fn hosts(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Any host may connect.
    pub fn allow_any_host(&self) -> bool {
        self.allow_any_host
    }

    /// True when host `nqn` may connect.
    pub fn allows(&self, nqn: &str) -> bool {
        self.allow_any_host || self.hosts().iter().any(|h| h.host.nqn == nqn)
    }

    /// The DH-HMAC-CHAP keys host `nqn` must authenticate with, if its entry names any.
    pub fn keys_of(&self, nqn: &str) -> Option<Arc<HostKeys>> {
        self.hosts()
            .iter()
            .find(|h| h.host.nqn == nqn)
            .and_then(|h| h.keys.clone())
    }

    /// The allowed hosts.
    pub fn list(&self) -> Vec<AllowedHost> {
        self.hosts().iter().map(|h| h.host.clone()).collect()
    }

    /// Changes whenever a host is added or removed.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    /// Allows one more host, with its keys.
    pub fn add(&self, host: AllowedHost, keys: Option<Arc<HostKeys>>) -> Result<(), ExportError> {
        let mut hosts = self.hosts();
        if hosts.iter().any(|h| h.host.nqn == host.nqn) {
            return Err(ExportError::Invalid(format!(
                "host '{}' is already allowed",
                host.nqn
            )));
        }
        hosts.push(Entry { host, keys });
        self.revision.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// No longer allows host `nqn`.
    pub fn remove(&self, nqn: &str) -> Option<AllowedHost> {
        let mut hosts = self.hosts();
        let at = hosts.iter().position(|h| h.host.nqn == nqn)?;
        let removed = hosts.remove(at).host;
        self.revision.fetch_add(1, Ordering::SeqCst);
        Some(removed)
    }

    /// The host whose entry names key `key`, if one does.
    pub fn key_user(&self, key: &str) -> Option<String> {
        self.hosts()
            .iter()
            .find(|h| h.host.keys().any(|(_, k)| k == key))
            .map(|h| h.host.nqn.clone())
    }
}

impl ExportOptions for HostAccess {
    fn params(&self, m: &mut Map<String, Value>) {
        let hosts: Vec<Value> = self.hosts().iter().map(|h| h.host.to_json()).collect();
        m.insert("allow_any_host".into(), self.allow_any_host.into());
        m.insert("hosts".into(), json!(hosts));
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_listens_are_told_from_others() {
        assert!(is_loopback_listen("127.0.0.1:4420"));
        assert!(is_loopback_listen("127.3.2.1:4420"));
        assert!(is_loopback_listen("[::1]:4420"));
        assert!(is_loopback_listen("localhost:4420"));
        assert!(!is_loopback_listen("0.0.0.0:4420"));
        assert!(!is_loopback_listen("[::]:4420"));
        assert!(!is_loopback_listen("192.168.1.10:4420"));
        assert!(!is_loopback_listen("no-such-host.invalid:4420"));
    }

    #[test]
    fn hosts_are_allowed_added_removed_and_their_keys_found() {
        let a = HostAccess::new(false, vec![(AllowedHost::new("nqn.a"), None)]);
        assert!(a.allows("nqn.a") && !a.allows("nqn.b"));
        let r = a.revision();
        let mut b = AllowedHost::new("nqn.b");
        b.dhchap_key = Some("kb".into());
        a.add(b.clone(), None).unwrap();
        assert!(a.add(b, None).is_err(), "a duplicate");
        assert!(a.allows("nqn.b") && a.revision() != r);
        assert_eq!(a.key_user("kb").as_deref(), Some("nqn.b"));
        assert_eq!(a.key_user("other"), None);
        assert!(a.remove("nqn.b").is_some());
        assert!(!a.allows("nqn.b") && a.remove("nqn.b").is_none());
        let mut m = Map::new();
        a.params(&mut m);
        assert_eq!(
            Value::Object(m),
            json!({"allow_any_host": false, "hosts": [{"nqn": "nqn.a"}]})
        );
        assert!(HostAccess::new(true, vec![]).allows("nqn.anyone"));
        assert_eq!(
            host_from_json(json!("nqn.x")).unwrap(),
            AllowedHost::new("nqn.x")
        );
        let y = host_from_json(json!({"nqn": "nqn.y", "dhchap_key": "k"})).unwrap();
        assert_eq!(y.dhchap_key.as_deref(), Some("k"));
        let e = host_from_json(json!({"nqn": "nqn.y", "key": "k"})).unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
        assert!(host_from_json(json!("host-a")).is_err());
        assert!(host_from_json(json!(7)).is_err());
    }
}
