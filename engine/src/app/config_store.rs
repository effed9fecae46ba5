//! The running configuration in the state directory, kept at a cost per change that does not
//! grow with the configuration: a base (`config.json`, rewritten atomically only now and then)
//! and a journal (`config.journal`) of the changes since, one JSON line each, appended and made
//! durable with each change.
//!
//! A change is the difference between the calls saved and the calls now: `{"put": call}` (a
//! call added, or one whose parameters changed, by its method and name) or `{"remove": [method,
//! name]}`. The journal's first line names the base it follows (`{"base": generation}`); once it
//! holds as many changes as the base has calls (and at least [`COMPACT_AFTER`]), the base is
//! rewritten with the next generation and a new journal started, so the work stays amortized
//! O(1) per change. Crash safety: the base is replaced by rename; the journal is replaced by
//! rename after it, so a crash between the two leaves a journal naming the older base, which is
//! ignored (the new base holds everything); a journal's last line cut short by a crash was
//! never acknowledged and is ignored.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use super::config::CONFIG_FILE;

/// The journal's file in the state directory.
pub const JOURNAL_FILE: &str = "config.journal";
/// Fewest changes the journal holds before the base is rewritten.
pub const COMPACT_AFTER: usize = 256;

/// What kind of object a create method makes: calls of one kind share their names.
pub fn kind(method: &str) -> &'static str {
    match method {
        m if m.starts_with("keyring_") => "key",
        "bdev_nvme_attach_controller" => "nvme",
        m if m.starts_with("bdev_") => "bdev",
        "pair_create" => "pair",
        m if m.starts_with("nbd_") => "nbd",
        _ => "nvmf",
    }
}

/// A call's identity: the kind of object and the name it creates.
fn identity(call: &Value) -> Option<(&'static str, &str)> {
    let method = call.get("method")?.as_str()?;
    let params = call.get("params")?;
    let name = params.get("name").or_else(|| params.get("nqn"))?.as_str()?;
    Some((kind(method), name))
}

/// The order calls must replay in: keys before the bdevs that may name them, bdevs before
/// pairs, pairs before exports.
fn rank(call: &Value) -> u8 {
    match call.get("method").and_then(Value::as_str).unwrap_or("") {
        m if m.starts_with("keyring_") => 0,
        m if m.starts_with("bdev_") => 1,
        "pair_create" => 2,
        m if m.starts_with("nbd_") => 3,
        _ => 4,
    }
}

/// The calls saved, by identity.
type Saved = HashMap<(&'static str, String), Value>;

fn index(calls: Vec<Value>) -> Saved {
    calls
        .into_iter()
        .filter_map(|c| {
            let (k, n) = identity(&c)?;
            let key = (k, n.to_string());
            Some((key, c))
        })
        .collect()
}

/// The change that makes the object `(kind, name)` what `now` is (`None`: gone), if any.
fn change(saved: &Saved, kind: &'static str, name: &str, now: Option<&Value>) -> Option<Value> {
    let before = saved.get(&(kind, name.to_string()));
    match (before, now) {
        (b, Some(c)) if b != Some(c) => Some(json!({ "put": c })),
        (Some(b), None) => {
            let method = b.get("method").and_then(Value::as_str).unwrap_or_default();
            Some(json!({"remove": [method, name]}))
        }
        _ => None,
    }
}

/// The changes that turn `saved` into `new`.
fn diff(saved: &Saved, new: &[Value]) -> Vec<Value> {
    let after: HashSet<(&'static str, &str)> = new.iter().filter_map(identity).collect();
    let mut ops: Vec<Value> = saved
        .iter()
        .filter(|((k, n), _)| !after.contains(&(*k, n.as_str())))
        .filter_map(|((k, n), _)| change(saved, k, n, None))
        .collect();
    ops.extend(new.iter().filter_map(|c| {
        let (k, n) = identity(c)?;
        change(saved, k, n, Some(c))
    }));
    ops
}

/// Calls being rebuilt from a base and its journal: in their order, each found by identity at
/// once (the journal holds up to as many changes as there are calls: replayed by scanning
/// them, 10,000 pairs took minutes to start).
#[derive(Default)]
struct Replay {
    calls: Vec<Option<Value>>,
    at: HashMap<(&'static str, String), usize>,
}

impl Replay {
    fn new(calls: Vec<Value>) -> Self {
        let mut r = Self::default();
        for c in calls {
            r.put(c);
        }
        r
    }

    fn put(&mut self, c: Value) {
        let Some((k, n)) = identity(&c) else {
            // Kept as it was, in its place (a call without a name is never replaced).
            self.calls.push(Some(c));
            return;
        };
        match self.at.get(&(k, n.to_string())) {
            Some(&i) => self.calls[i] = Some(c),
            None => {
                self.at.insert((k, n.to_string()), self.calls.len());
                self.calls.push(Some(c));
            }
        }
    }

    /// Applies one change.
    fn apply(&mut self, op: &Value) -> Result<(), String> {
        if let Some(c) = op.get("put") {
            identity(c).ok_or("a put without a method and a name")?;
            self.put(c.clone());
            return Ok(());
        }
        let gone = op
            .get("remove")
            .and_then(Value::as_array)
            .and_then(|r| Some((r.first()?.as_str()?, r.get(1)?.as_str()?)))
            .ok_or("neither a put nor a remove")?;
        if let Some(i) = self.at.remove(&(kind(gone.0), gone.1.to_string())) {
            self.calls[i] = None;
        }
        Ok(())
    }

    fn into_calls(self) -> Vec<Value> {
        self.calls.into_iter().flatten().collect()
    }
}

/// The configuration the state directory holds (`{"config": [...]}`), the journal applied to
/// its base; `None` when it holds none.
pub fn read_kept(state_dir: &Path) -> Result<Option<Value>, String> {
    let base_path = state_dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&base_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", base_path.display())),
    };
    let base: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not JSON: {e}", base_path.display()))?;
    let generation = base.get("generation").and_then(Value::as_u64).unwrap_or(0);
    let mut replay = match base.get("config") {
        Some(Value::Array(c)) => Replay::new(c.clone()),
        _ => return Ok(Some(base)),
    };
    let journal_path = state_dir.join(JOURNAL_FILE);
    let journal = match std::fs::read_to_string(&journal_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", journal_path.display())),
    };
    let complete = journal.ends_with('\n');
    let lines: Vec<&str> = journal.lines().collect();
    let damaged = |n: usize, why: String| format!("{} line {}: {why}", journal_path.display(), n);
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // Cut short by a crash while it was written: never acknowledged.
            Err(_) if last && !complete => break,
            Err(e) => return Err(damaged(i + 1, e.to_string())),
        };
        if i == 0 {
            if v.get("base").and_then(Value::as_u64) != Some(generation) {
                // Left by a crash between a new base and its journal: the base has it all.
                break;
            }
            continue;
        }
        replay.apply(&v).map_err(|e| damaged(i + 1, e))?;
    }
    let mut calls = replay.into_calls();
    calls.sort_by_key(rank);
    Ok(Some(json!({ "config": calls })))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `path` whole by way of `path.new`, made durable and renamed over it.
fn replace(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.new"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// What is on disk, as this engine last wrote it.
#[derive(Default)]
pub struct ConfigStore {
    /// The calls saved (base and journal), once this engine wrote them.
    saved: Option<Saved>,
    generation: u64,
    journal: Option<File>,
    changes: usize,
}

impl ConfigStore {
    /// True when a change can go to the journal now: a base was written by this engine and
    /// the journal is not due to be folded into a new one.
    pub fn takes_one_change(&self) -> bool {
        match (&self.saved, &self.journal) {
            (Some(saved), Some(_)) => self.changes + 1 < COMPACT_AFTER.max(saved.len()),
            _ => false,
        }
    }

    /// Records that the object `(kind, name)` is now `now` (`None`: gone). Only when
    /// [`ConfigStore::takes_one_change`] says so; the cost does not depend on how many objects
    /// there are.
    pub fn persist_one(
        &mut self,
        kind: &'static str,
        name: &str,
        now: Option<Value>,
    ) -> std::io::Result<()> {
        let Some(saved) = &self.saved else {
            return Err(std::io::Error::other("no base written yet"));
        };
        let Some(op) = change(saved, kind, name, now.as_ref()) else {
            return Ok(());
        };
        self.append(&[op])?;
        if let Some(saved) = &mut self.saved {
            match now {
                Some(c) => saved.insert((kind, name.to_string()), c),
                None => saved.remove(&(kind, name.to_string())),
            };
        }
        Ok(())
    }

    /// Makes `calls` (the whole configuration) what is on disk: a journal line per change, or
    /// a new base.
    pub fn persist(&mut self, dir: &Path, calls: Vec<Value>) -> std::io::Result<()> {
        let Some(saved) = &self.saved else {
            return self.compact(dir, calls);
        };
        let ops = diff(saved, &calls);
        if ops.is_empty() {
            return Ok(());
        }
        if self.journal.is_none() || self.changes + ops.len() >= COMPACT_AFTER.max(calls.len()) {
            return self.compact(dir, calls);
        }
        self.append(&ops)?;
        self.saved = Some(index(calls));
        Ok(())
    }

    fn append(&mut self, ops: &[Value]) -> std::io::Result<()> {
        let Some(journal) = &mut self.journal else {
            return Err(std::io::Error::other("no journal open"));
        };
        let mut text = Vec::new();
        for op in ops {
            serde_json::to_writer(&mut text, op).map_err(std::io::Error::other)?;
            text.push(b'\n');
        }
        if let Err(e) = journal.write_all(&text).and_then(|()| journal.sync_data()) {
            // What is on disk is unknown now: the next change starts over with a new base.
            self.journal = None;
            self.saved = None;
            return Err(e);
        }
        self.changes += ops.len();
        Ok(())
    }

    /// A new base with the next generation, then an empty journal that follows it.
    fn compact(&mut self, dir: &Path, calls: Vec<Value>) -> std::io::Result<()> {
        self.journal = None;
        self.saved = None;
        let generation = self.generation.max(current_generation(dir)) + 1;
        let base = json!({ "generation": generation, "config": calls });
        let text = serde_json::to_vec_pretty(&base).map_err(std::io::Error::other)?;
        replace(dir, CONFIG_FILE, &text)?;
        replace(
            dir,
            JOURNAL_FILE,
            format!("{}\n", json!({ "base": generation })).as_bytes(),
        )?;
        let journal = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL_FILE))?;
        self.generation = generation;
        self.journal = Some(journal);
        self.changes = 0;
        let Value::Object(mut base) = base else {
            return Ok(());
        };
        if let Some(Value::Array(calls)) = base.remove("config") {
            self.saved = Some(index(calls));
        }
        Ok(())
    }
}

/// The generation of the base on disk (0 when there is none or it has none).
fn current_generation(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("generation").and_then(Value::as_u64))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, name: &str, extra: u64) -> Value {
        json!({"method": method, "params": {"name": name, "size": extra}})
    }

    /// What the directory holds equals `want` (in replay order).
    fn holds(dir: &Path, want: &[Value]) -> bool {
        let mut want = want.to_vec();
        want.sort_by_key(rank);
        read_kept(dir).unwrap().unwrap()["config"].as_array() == Some(&want)
    }

    #[test]
    fn changes_are_journaled_replayed_in_order_and_compacted() {
        let dir = std::env::temp_dir().join(format!("qs-config-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(read_kept(&dir).unwrap().is_none());
        let mut s = ConfigStore::default();
        let mut calls = vec![call("bdev_malloc_create", "a", 1)];
        s.persist(&dir, calls.clone()).unwrap();
        assert!(holds(&dir, &calls));
        // An export, a key (which must replay first), a changed bdev, a removed one.
        calls.push(call("bdev_malloc_create", "b", 2));
        calls.push(json!({"method": "nvmf_export_start", "params": {"nqn": "n", "bdev": "a"}}));
        s.persist(&dir, calls.clone()).unwrap();
        calls.insert(0, call("keyring_file_add_key", "k", 0));
        s.persist(&dir, calls.clone()).unwrap();
        calls[1] = call("bdev_malloc_create", "a", 9);
        calls.remove(2);
        s.persist(&dir, calls.clone()).unwrap();
        let kept = read_kept(&dir).unwrap().unwrap();
        assert_eq!(
            kept["config"][0]["method"], "keyring_file_add_key",
            "keys first"
        );
        assert!(holds(&dir, &calls), "base and journal give the calls");
        let journal = std::fs::read_to_string(dir.join(JOURNAL_FILE)).unwrap();
        assert_eq!(journal.lines().count(), 1 + 5, "{journal}");
        // A torn last line (a crash while it was written) is ignored; a bad line elsewhere is
        // damage.
        std::fs::write(
            dir.join(JOURNAL_FILE),
            format!("{journal}{{\"put\": {{\"meth"),
        )
        .unwrap();
        assert!(holds(&dir, &calls));
        std::fs::write(dir.join(JOURNAL_FILE), format!("{journal}nonsense\n")).unwrap();
        assert!(read_kept(&dir).is_err());
        // A journal naming another base (a crash between the base and its journal) is ignored.
        let mut s = ConfigStore::default();
        s.persist(&dir, calls.clone()).unwrap();
        std::fs::write(
            dir.join(JOURNAL_FILE),
            "{\"base\": 1}\n{\"remove\": [\"bdev_malloc_create\", \"a\"]}\n",
        )
        .unwrap();
        assert!(holds(&dir, &calls));
        // One object's change, without the whole configuration: a put and a remove.
        let mut s = ConfigStore::default();
        s.persist(&dir, calls.clone()).unwrap();
        assert!(s.takes_one_change());
        let x = call("bdev_malloc_create", "x", 5);
        s.persist_one("bdev", "x", Some(x.clone())).unwrap();
        s.persist_one("key", "k", None).unwrap();
        calls.push(x);
        calls.remove(0);
        assert!(holds(&dir, &calls));
        // Many changes: the base is rewritten now and then, the journal stays short.
        let mut s = ConfigStore::default();
        for i in 0..2 * COMPACT_AFTER {
            calls.push(call("bdev_malloc_create", &format!("m{i}"), i as u64));
            s.persist(&dir, calls.clone()).unwrap();
        }
        assert!(holds(&dir, &calls));
        let lines = std::fs::read_to_string(dir.join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= COMPACT_AFTER.max(calls.len()) + 1, "{lines}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
