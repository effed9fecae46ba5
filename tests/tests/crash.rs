//! Process crashes: the real binary is killed with SIGKILL at random moments (100 by default,
//! `QS_KILLS` to change, `QS_KILL_SEED` for another seed) while a writer writes P through NBD,
//! during the initial copy, right after splits with pending tracks, during backups of each mode
//! and during resyncs. After each restart:
//! - every write acknowledged before the kill is on P (read from P's file), and a block holds
//!   only its last acknowledged write or the one in flight at the kill;
//! - a pair that was split is still split and its image (read through NBD) is P at the split;
//! - a pair that was copying or mirroring is copying or mirroring, never split or suspended;
//! - the copy after the restart copies only the tracks it found pending (the copied-track
//!   counter), and a mirrored pair comes back with no more pending than the tracks written
//!   and the write-intent bits the metadata file held at the kill (so a pair whose bits were
//!   cleaned comes back without a full copy);
//! - a backup that was running is reported failed, "interrupted by restart"; a backup reported
//!   done holds exactly the image;
//! - a checkpoint (half the backups make one) survives every later kill once its backup was
//!   reported done, and counts at least the tracks whose blocks P holds differently from its
//!   split (acknowledged writes, and writes in flight that reached P: their bits were durable
//!   before they were issued);
//! - an incremental backup since a checkpoint, written onto a file holding that checkpoint's
//!   image, gives the image exactly (so no kill lost a change the checkpoint must cover).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::pair::metadata::{decode_page, Layout, MapKind, BLOCK, WORDS_PER_PAGE};
use quicksplit_tests::nbd::{NbdClient, WRITE};
use quicksplit_tests::{wait_for, RpcConn, Server, TempDir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const BS: u64 = 4096;
const SIZE: u64 = 16 << 20;
const BLOCKS: u64 = SIZE / BS;
const TRACK: u64 = 64 << 10;
const TRACKS: u64 = SIZE / TRACK;

fn block_of(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    for c in b.chunks_exact_mut(16) {
        c[..8].copy_from_slice(&id.to_le_bytes());
        c[8..].copy_from_slice(&block.to_le_bytes());
    }
    b
}

fn id_of(data: &[u8], block: u64) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let first = u64::from_le_bytes(data[..8].try_into().map_err(|_| "short")?);
    for c in data.chunks_exact(16) {
        let id = u64::from_le_bytes(c[..8].try_into().map_err(|_| "short")?);
        let b = u64::from_le_bytes(c[8..].try_into().map_err(|_| "short")?);
        if id != first || b != block {
            return Err(format!("block {block} is torn or misplaced"));
        }
    }
    Ok(first)
}

fn ids_of(data: &[u8]) -> Result<Vec<u64>, String> {
    (0..BLOCKS)
        .map(|b| id_of(&data[(b * BS) as usize..((b + 1) * BS) as usize], b))
        .collect()
}

/// What the writer knows: per block, the last acknowledged write and the one in flight.
#[derive(Default)]
struct Model {
    acked: Vec<u64>,
    in_flight: Vec<Option<u64>>,
}

struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

/// Writes random blocks of P through NBD until stopped or the connection breaks; returns the
/// number of acknowledged writes.
fn start_writer(nbd: &Path, model: Arc<Mutex<Model>>, seed: u64, first_id: u64) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, nbd) = (Arc::clone(&stop), nbd.to_path_buf());
    let thread = std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let Ok(mut c) = NbdClient::connect(&nbd, "p") else {
            return 0;
        };
        let mut id = first_id;
        let mut acked = 0;
        while !stop2.load(Ordering::SeqCst) {
            // The first half only: the other half's tracks are never rewritten, so a restart
            // of a clean mirror must not find them pending.
            let b = rng.gen_range(0..BLOCKS / 2);
            id += 1;
            model.lock().unwrap().in_flight[b as usize] = Some(id);
            let Ok(cookie) = c.try_send(WRITE, 0, b * BS, BS as u32, &block_of(id, b)) else {
                break;
            };
            match c.recv(0) {
                Ok((ck, 0, _)) if ck == cookie => {
                    let mut m = model.lock().unwrap();
                    m.acked[b as usize] = id;
                    m.in_flight[b as usize] = None;
                    acked += 1;
                }
                Ok((_, err, _)) => panic!("write {id} to block {b} failed with NBD error {err}"),
                Err(_) => break,
            }
        }
        acked
    });
    Writer { stop, thread }
}

impl Writer {
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("writer thread")
    }
}

fn read_export(nbd: &Path, export: &str) -> Vec<u8> {
    let mut c = NbdClient::connect(nbd, export).expect("connect to the export");
    let mut out = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(1 << 20) {
        out.extend(c.read(off, 1 << 20).expect("read the export"));
    }
    out
}

/// Write-intent bits set in the metadata file's pending map for the tracks the writer never
/// writes (the second half). Bits are only cleared there while the pair stays in PAIR (the
/// writer sets only first-half ones), so this bounds what a kill after the read can leave.
fn unwritten_marked(meta: &Path) -> Result<u32, String> {
    let at = Layout::new(TRACKS).page_offset(MapKind::Pending, 0) as usize;
    let mut words = vec![0u64; WORDS_PER_PAGE as usize];
    let mut last = String::new();
    for _ in 0..100 {
        let file = std::fs::read(meta).map_err(|e| format!("read {}: {e}", meta.display()))?;
        let block = file
            .get(at..at + BLOCK as usize)
            .ok_or_else(|| format!("{} is too short", meta.display()))?;
        // A page write landing during the read leaves a torn block: read again.
        match decode_page(MapKind::Pending, 0, block, &mut words) {
            Ok(()) => {
                let n = (TRACKS / 64) as usize;
                return Ok(words[n / 2..n].iter().map(|w| w.count_ones()).sum());
            }
            Err(e) => last = e,
        }
    }
    Err(format!("{}: {last}", meta.display()))
}

fn pair(rpc: &mut RpcConn) -> Value {
    rpc.ok("pair_get", json!({"name": "cp"}))[0].clone()
}

struct Harness {
    dir: TempDir,
    state: PathBuf,
    args: Vec<String>,
}

impl Harness {
    fn start(&self) -> (Server, RpcConn) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let server = Server::start(&args);
        let rpc = RpcConn::connect(&self.state.join("rpc.sock"));
        (server, rpc)
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let kills: u64 = std::env::var("QS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("QS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = TempDir::new("crash");
    let state = dir.path().join("state");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"config": []}"#).unwrap();
    let base = vec![
        "--state-dir".to_string(),
        state.to_str().unwrap().to_string(),
        "--cores".into(),
        "0-1".into(),
        "--idle".into(),
        "adaptive".into(),
        "--rpc-socket".into(),
        state.join("rpc.sock").to_str().unwrap().to_string(),
    ];
    let mut first = base.clone();
    first.extend(["--config".to_string(), empty.to_str().unwrap().to_string()]);
    let h = Harness {
        dir,
        state: state.clone(),
        args: first,
    };
    let (mut server, mut rpc) = h.start();
    let p_file = state.join("p.img");
    for (n, f) in [("p", &p_file), ("s", &state.join("s.img"))] {
        rpc.ok(
            "bdev_uring_create",
            json!({"name": n, "filename": f, "size": SIZE}),
        );
    }
    rpc.ok(
        "pair_create",
        json!({"name": "cp", "primary": "p", "secondary": "s", "track_size": TRACK,
               "copy_rate": 4 << 20}),
    );
    rpc.ok("nbd_export_start", json!({"name": "p", "bdev": "p"}));
    rpc.ok("nbd_export_start", json!({"name": "img", "pair": "cp"}));
    let h = Harness { args: base, ..h };
    let nbd = state.join("nbd.sock");

    let model = Arc::new(Mutex::new(Model {
        acked: vec![0; BLOCKS as usize],
        in_flight: vec![None; BLOCKS as usize],
    }));
    let mut image: Option<Vec<u64>> = None;
    let mut backup: Option<(u64, PathBuf)> = None;
    // Checkpoints known to exist, with P's blocks at their split; and the one a running
    // backup is to make.
    let mut checkpoints: Vec<(String, Vec<u64>)> = Vec::new();
    let mut making: Option<(String, Vec<u64>)> = None;
    let mut checkpoints_checked = 0;
    let mut incrementals_checked = 0;
    let mut history: Vec<String> = Vec::new();
    let mut full_copies_avoided = 0;
    let mut next_id = 0u64;
    for kill in 0..kills {
        // Work: a transition, then writes for a while, then the kill.
        let info = pair(&mut rpc);
        let st = info["state"].as_str().unwrap_or("").to_string();
        let choice = rng.gen_range(0..10);
        match st.as_str() {
            "COPY" | "PAIR" if choice < 4 => {
                rpc.ok("pair_split", json!({"name": "cp"}));
                image = Some(model.lock().unwrap().acked.clone());
                history.push(format!("{kill}: split"));
            }
            "PSUS" if choice < 3 && backup.is_none() => {
                let mode = ["wait", "reflect", "merge"][rng.gen_range(0..3)];
                let path = h.dir.path().join(format!("backup-{kill}.img"));
                let mut params =
                    json!({"pair": "cp", "mode": mode, "target": {"type": "file", "path": path}});
                if rng.gen_bool(0.5) {
                    if checkpoints.len() == 8 {
                        let (oldest, _) = checkpoints.remove(0);
                        rpc.ok("checkpoint_delete", json!({"pair": "cp", "name": oldest}));
                    }
                    let name = format!("k{kill}");
                    params["checkpoint"] = json!(name);
                    making = Some((name, image.clone().unwrap_or_default()));
                }
                let id = rpc.ok("backup_start", params)["id"].as_u64().unwrap();
                if making.is_some() && rng.gen_bool(0.8) {
                    // Most checkpoints are made before the kill, so later kills find them.
                    assert!(wait_for(Duration::from_secs(30), || rpc
                        .ok("backup_get", json!({ "id": id }))[0]["state"]
                        != "running"));
                    let b = rpc.ok("backup_get", json!({ "id": id }))[0].clone();
                    assert_eq!(b["state"], "done", "kill {kill}: {b}");
                }
                backup = Some((id, path));
                let cp = making.as_ref().map(|(n, _)| n.as_str());
                history.push(format!("{kill}: backup {id} ({mode}, checkpoint {cp:?})"));
            }
            "PSUS" if choice < 6 && backup.is_none() => {
                rpc.ok("pair_resync", json!({"name": "cp"}));
                image = None;
                history.push(format!("{kill}: resync"));
            }
            _ => {}
        }
        let writer = (image.is_none() || rng.gen_bool(0.7)).then(|| {
            next_id += 1 << 32;
            start_writer(&nbd, Arc::clone(&model), seed ^ kill, next_id)
        });
        // Now and then a mirror stays up for more than two cleaning periods (1 s each), so the
        // cleaner clears the unwritten half's write-intent bits before the kill (the writer
        // touches the other half only): that restart must copy the written half alone. Left to
        // chance, a fast machine's short iterations never got there.
        let pause = rng.gen_range(5..400);
        let pause = if st == "PAIR" && kill % 8 == 3 {
            2500
        } else {
            pause
        };
        std::thread::sleep(Duration::from_millis(pause));
        let was = pair(&mut rpc);
        let backup_was = backup
            .as_ref()
            .map(|(id, _)| rpc.ok("backup_get", json!({"id": id}))[0]["state"].clone());
        // What the metadata file says the restart may have to copy besides the written half.
        let marked = (was["state"] == "PAIR")
            .then(|| unwritten_marked(&state.join("pairs").join("cp.meta")))
            .transpose()
            .unwrap_or_else(|e| panic!("kill {kill}: {e}"));
        server.signal(libc::SIGKILL);
        assert!(server.wait_exit(Duration::from_secs(20)).is_some());
        let acked = writer.map_or(0, Writer::stop);
        let was_state = was["state"].as_str().unwrap_or("").to_string();
        history.push(format!(
            "{kill}: killed in {was_state} (pending {}) after {acked} writes",
            was["pending_tracks"]
        ));
        let past = history.join("; ");
        let fail = |what: String| -> ! { panic!("kill {kill}: {what}\nhistory: {past}") };

        // Restart and check.
        let (s2, r2) = h.start();
        server = s2;
        rpc = r2;
        assert!(wait_for(Duration::from_secs(10), || nbd.exists()));
        let back = pair(&mut rpc);
        let back_state = back["state"].as_str().unwrap_or("").to_string();
        let state_ok = match was_state.as_str() {
            "COPY" | "PAIR" => back_state == "COPY" || back_state == "PAIR",
            s => back_state == s,
        };
        if !state_ok {
            fail(format!("came back {back} after being {was_state}"));
        }
        // Tracks pending when the pair came back (some may be copied already).
        let pending_at_start = back["pending_tracks"].as_u64().unwrap_or(u64::MAX)
            + back["copied_tracks"].as_u64().unwrap_or(u64::MAX);
        if let Some(marked) = marked.filter(|_| was_state == "PAIR") {
            // Mirrored: only the written half and the bits still on disk can be pending.
            if pending_at_start > TRACKS / 2 + u64::from(marked) {
                fail(format!(
                    "{pending_at_start} tracks to copy after the restart, {marked} of the \
                     unwritten half were marked: {back}"
                ));
            }
            // The cleaner had cleared the unwritten half's bits: no full copy.
            if marked == 0 {
                full_copies_avoided += 1;
            }
        }
        // P holds every acknowledged write.
        let p = std::fs::read(&p_file).unwrap();
        let p_ids = ids_of(&p).unwrap_or_else(|e| fail(e));
        {
            let mut m = model.lock().unwrap();
            for (b, &id) in p_ids.iter().enumerate() {
                let ok = id == m.acked[b] || Some(id) == m.in_flight[b];
                if !ok {
                    fail(format!(
                        "P block {b} holds {id:#x}; acknowledged {:#x}, in flight {:x?}",
                        m.acked[b], m.in_flight[b]
                    ));
                }
                // What is there now is what a later check starts from.
                m.acked[b] = id;
                m.in_flight[b] = None;
            }
        }
        // The image is P at the split.
        if let Some(img) = &image {
            let got = ids_of(&read_export(&nbd, "img")).unwrap_or_else(|e| fail(e));
            if let Some(b) = (0..BLOCKS as usize).find(|&b| got[b] != img[b]) {
                fail(format!(
                    "image block {b} holds {:#x}, the split left {:#x}",
                    got[b], img[b]
                ));
            }
        }
        // A backup that was running is failed, never done; a done one is exact.
        if let Some((id, path)) = backup.take() {
            let b = rpc.ok("backup_get", json!({ "id": id }))[0].clone();
            match b["state"].as_str() {
                Some("failed") if backup_was == Some(json!("running")) => {
                    let err = b["error"].as_str().unwrap_or("");
                    if !err.contains("interrupted by restart") {
                        fail(format!("backup {id}: {b}"));
                    }
                }
                Some("done") => {
                    let got = ids_of(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| fail(e));
                    if Some(&got) != image.as_ref() {
                        fail(format!("backup {id} is done but is not the image"));
                    }
                }
                _ => fail(format!("backup {id} was {backup_was:?}, is {b}")),
            }
            history.push(format!("{kill}: backup {id} {}", b["state"]));
        }
        // Checkpoints: one whose backup was done is there, and none lost a change.
        let listed = rpc.ok("checkpoint_list", json!({"pair": "cp"}));
        let listed: Vec<(String, u64)> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let name = c["name"].as_str().unwrap().to_string();
                (name, c["changed_tracks"].as_u64().unwrap())
            })
            .collect();
        if let Some((name, at_split)) = making.take() {
            let there = listed.iter().any(|(n, _)| *n == name);
            if backup_was == Some(json!("done")) && !there {
                fail(format!(
                    "checkpoint {name}'s backup was done, but it is gone"
                ));
            }
            if there {
                checkpoints.push((name, at_split));
            }
        }
        {
            let m = model.lock().unwrap();
            for (name, at_split) in &checkpoints {
                let Some((_, counted)) = listed.iter().find(|(n, _)| n == name) else {
                    fail(format!("checkpoint {name} is gone: {listed:?}"));
                };
                let changed: std::collections::BTreeSet<u64> = (0..BLOCKS as usize)
                    .filter(|&b| m.acked[b] != at_split[b])
                    .map(|b| b as u64 * BS / TRACK)
                    .collect();
                checkpoints_checked += 1;
                if *counted < changed.len() as u64 {
                    fail(format!(
                        "checkpoint {name} counts {counted} changed tracks, P changed {}",
                        changed.len()
                    ));
                }
            }
        }
        // An incremental backup since a checkpoint, onto a file holding that checkpoint's
        // image, is the image: the checkpoint lost no change across the kills.
        if let (true, Some(img), false) = (back_state == "PSUS", &image, checkpoints.is_empty()) {
            if rng.gen_bool(0.5) {
                let (name, at_split) = &checkpoints[rng.gen_range(0..checkpoints.len())];
                let path = h.dir.path().join(format!("incremental-{kill}.img"));
                let base: Vec<u8> = (0..BLOCKS)
                    .flat_map(|b| block_of(at_split[b as usize], b))
                    .collect();
                std::fs::write(&path, base).unwrap();
                let mode = ["wait", "reflect", "merge"][rng.gen_range(0..3)];
                let id = rpc.ok(
                    "backup_start",
                    json!({"pair": "cp", "mode": mode, "since": name,
                           "target": {"type": "file", "path": path}}),
                )["id"]
                    .as_u64()
                    .unwrap();
                let b = quicksplit_tests::wait_backup(&mut rpc, id, Duration::from_secs(60));
                if b["state"] != "done" {
                    fail(format!("incremental since {name}: {b}"));
                }
                let got = ids_of(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| fail(e));
                if let Some(blk) = (0..BLOCKS as usize).find(|&x| got[x] != img[x]) {
                    fail(format!(
                        "incremental since {name}: block {blk} holds {:#x}, the image {:#x}",
                        got[blk], img[blk]
                    ));
                }
                let _ = std::fs::remove_file(&path);
                incrementals_checked += 1;
                history.push(format!("{kill}: incremental since {name} ({mode}) exact"));
            }
        }
        // The copy after the restart copies only what was pending.
        if back_state == "COPY" || back_state == "PAIR" {
            let start = Instant::now();
            loop {
                let now = pair(&mut rpc);
                if now["state"] == "PAIR" && now["pending_tracks"] == 0 {
                    let copied = now["copied_tracks"].as_u64().unwrap_or(u64::MAX);
                    if copied > pending_at_start {
                        fail(format!(
                            "copied {copied} tracks, {pending_at_start} were pending: {now}"
                        ));
                    }
                    // Mirrored again: S equals P (the write-intent bits missed no track).
                    let s_ids = ids_of(&std::fs::read(state.join("s.img")).unwrap())
                        .unwrap_or_else(|e| fail(e));
                    let p_ids =
                        ids_of(&std::fs::read(&p_file).unwrap()).unwrap_or_else(|e| fail(e));
                    if let Some(b) = (0..BLOCKS as usize).find(|&b| s_ids[b] != p_ids[b]) {
                        fail(format!(
                            "mirrored, but S block {b} holds {:#x} and P {:#x}",
                            s_ids[b], p_ids[b]
                        ));
                    }
                    break;
                }
                if start.elapsed() > Duration::from_secs(60) {
                    fail(format!("copy did not finish: {now}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    drop(rpc);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).is_some());
    println!(
        "{kills} kills; {full_copies_avoided} restarts of a clean mirror without a full copy; \
         {checkpoints_checked} checkpoint checks; {incrementals_checked} incremental backups"
    );
    assert!(
        kills < 40 || incrementals_checked > 0,
        "no incremental backup after a kill: its check never ran: {history:?}"
    );
    assert!(
        kills < 20 || checkpoints_checked > 0,
        "no checkpoint was made: the checkpoint checks never ran: {history:?}"
    );
    assert!(
        kills < 20 || full_copies_avoided > 0,
        "no restart found a clean mirror: the no-full-copy check never ran"
    );
}
