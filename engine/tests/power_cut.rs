//! Power cuts against a reference model, over many seeded schedules.
//!
//! P, S and the pair's metadata live on power-cut bdevs: writes are volatile until flushed
//! (host writes here use FUA, so an acknowledged write is durable). Each schedule creates a
//! pair, writes P (and the image after a split) with random splits and resyncs, then cuts the
//! power of all three devices while a batch of writes is in flight, keeping a random subset of
//! their unflushed writes. The pair is brought back from what survived, and:
//! - every acknowledged write is on P, and a block holds only its last acknowledged write or a
//!   write in flight at the cut;
//! - a pair split before the cut is still split, its image equal to P at the split point plus
//!   the image's own acknowledged writes;
//! - a pair mirroring before the cut comes back mirroring, and once its copy is done S equals
//!   P byte for byte (the write-intent bitmap missed nothing);
//! - a backup done before the cut holds exactly the image as it was when it started (some
//!   schedules back the image up after a split, in each mode, and cut during or after it);
//! - a checkpoint such a backup made (half of them make one) holds every block of P written
//!   since its split and acknowledged, and a backup done before the cut left its checkpoint.
//!
//! Until a schedule's first split, a watcher thread also checks the write-intent contract all
//! along (every track whose S could come back from a cut unlike P has its bit in every version
//! of the metadata a cut could leave), so a window too short for a cut to land in still shows.
//!
//! `QS_CUTS` sets the number of schedules (default 1000), `QS_CUT_SEED` runs one, `QS_TRACE`
//! keeps a failing schedule's engine trace (see [`trace`]).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Op;
use drivers::testing::powercut::{PowerCutBdev, PowerSupply};
use drivers::Bdev;
use engine::app::{Engine, MetadataDevice};
use engine::backup::{BackupState, Mode, Options, Target};
use engine::pair::channel::View;
use engine::pair::metadata::{decode_page, Layout, MapKind, WORDS_PER_PAGE};
use engine::pair::{PairConfig, PairState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;

/// Backups that ended with the cut (0) and that were done before it (1).
static BACKUPS_ENDED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
const BLOCKS: u64 = 64;
const TRACK: u64 = 16 << 10;

fn block_of(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    common::fill_block(&mut b, id, block);
    b
}

/// The write id each block of a volume's content holds.
fn ids_of(data: &[u8]) -> Result<Vec<u64>, String> {
    (0..BLOCKS)
        .map(|b| common::decode_block(&data[(b * BS) as usize..((b + 1) * BS) as usize], b))
        .collect()
}

fn ids(engine: &Engine, bdev: &Arc<dyn Bdev>) -> Result<Vec<u64>, String> {
    ids_of(&common::read(engine, bdev, 0, (BLOCKS * BS) as usize))
}

/// A write of the plan: (to the image, block, write id).
type Planned = (bool, u64, u64);

/// Starts the planned writes: those to P from reactor 0, those to the image from reactor 1, at
/// once. Gives each side's outcomes (P first).
fn start_writes(
    engine: &Engine,
    pv: &Arc<dyn Bdev>,
    iv: &Arc<dyn Bdev>,
    plan: &[Planned],
    ops: Vec<Op>,
) -> [(bool, std::sync::mpsc::Receiver<common::Outcomes>); 2] {
    let (p_ops, i_ops): (Vec<_>, Vec<_>) = plan.iter().zip(ops).partition(|(p, _)| !p.0);
    let only = |v: Vec<(&Planned, Op)>| v.into_iter().map(|x| x.1).collect();
    [
        (false, common::start(engine, 0, Arc::clone(pv), only(p_ops))),
        (true, common::start(engine, 1, Arc::clone(iv), only(i_ops))),
    ]
}

#[derive(Clone)]
struct Devices {
    p: Arc<PowerCutBdev>,
    s: Arc<PowerCutBdev>,
    m: Arc<PowerCutBdev>,
}

fn add(engine: &Engine, d: &Devices) {
    engine.bdev_add(Arc::clone(&d.p) as Arc<dyn Bdev>).unwrap();
    engine.bdev_add(Arc::clone(&d.s) as Arc<dyn Bdev>).unwrap();
}

/// The write-intent bits (tracks 0 to 63, all the pair has) set in every version of the metadata
/// a cut could leave: the durable pending page and each unflushed write of it. A version that
/// is not a whole valid page holds none.
fn intents_surely_set(meta: &[u8], unflushed: &[(u64, Vec<u8>, bool)]) -> u64 {
    let at = Layout::new(BLOCKS * BS / TRACK).page_offset(MapKind::Pending, 0) as usize;
    let end = at + BS as usize;
    let first_word = |block: Option<&[u8]>| {
        let mut words = vec![0u64; WORDS_PER_PAGE as usize];
        block
            .filter(|b| decode_page(MapKind::Pending, 0, b, &mut words).is_ok())
            .map_or(0, |_| words[0])
    };
    unflushed
        .iter()
        .filter(|(off, data, _)| (*off as usize) < end && *off as usize + data.len() > at)
        .map(|(off, data, _)| {
            first_word(
                at.checked_sub(*off as usize)
                    .and_then(|o| data.get(o..o + BS as usize)),
            )
        })
        .fold(first_word(meta.get(at..end)), |all, w| all & w)
}

/// The write-intent contract at one instant of a pair that was never split: a track whose S
/// may come back from a cut different from P has its bit in every surviving version of the
/// metadata. (Host writes to P use FUA, so P is what it holds now.) Gives the first track that
/// breaks it, with what was seen.
fn intent_violation(dev: &Devices) -> Option<String> {
    dev.p.inspect(|p, _, _| {
        dev.s.inspect(|s_now, s_durable, s_unflushed| {
            let (intents, m_unflushed) = dev.m.inspect(|_, durable, unflushed| {
                (intents_surely_set(durable, unflushed), unflushed.len())
            });
            (0..BLOCKS * BS / TRACK).find_map(|t| {
                let (lo, hi) = ((t * TRACK) as usize, ((t + 1) * TRACK) as usize);
                let may_differ = s_durable[lo..hi] != p[lo..hi]
                    || s_unflushed.iter().any(|(off, data, _)| {
                        let (a, b) = (*off as usize, *off as usize + data.len());
                        a < hi && b > lo && data[..] != p[a..b]
                    });
                (may_differ && intents & 1 << t == 0).then(|| {
                    format!(
                        "track {t}: S may differ from P (S now equal: {}, S durable equal: {}, \
                         {} unflushed S writes, {m_unflushed} unflushed metadata writes) and \
                         its write-intent bit may be lost",
                        s_now[lo..hi] == p[lo..hi],
                        s_durable[lo..hi] == p[lo..hi],
                        s_unflushed.len(),
                    )
                })
            })
        })
    })
}

/// `QS_TRACE=1` keeps the engine's trace events (state changes, write-intent bits cleared,
/// metadata batches, copies, host writes) in memory; a failing schedule writes those of its pair
/// to `qs-trace-SEED.log` in the temp dir, to read the interleaving that broke it.
mod trace {
    use std::sync::Mutex;

    static EVENTS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    struct Sink;

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            EVENTS.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub fn init() {
        if std::env::var_os("QS_TRACE").is_some() {
            tracing_subscriber::fmt()
                .with_writer(|| Sink)
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    "engine=trace,power_cut=trace",
                ))
                .with_thread_ids(true)
                .with_ansi(false)
                .init();
        }
    }

    /// Forgets the events so far (a new schedule starts).
    pub fn clear() {
        EVENTS.lock().unwrap().clear();
    }

    /// Writes the events of pair `name` to the schedule's file; gives its path.
    pub fn dump(seed: u64, name: &str) -> Option<std::path::PathBuf> {
        std::env::var_os("QS_TRACE")?;
        let events = EVENTS.lock().unwrap();
        let text = String::from_utf8_lossy(&events);
        let tag = format!("pair={name}");
        let mine: Vec<&str> = text
            .lines()
            .filter(|l| l.split([' ', ':']).any(|w| w == tag))
            .collect();
        let path = std::env::temp_dir().join(format!("qs-trace-{seed}.log"));
        std::fs::write(&path, mine.join("\n")).ok()?;
        Some(path)
    }
}

fn run_schedule(engine: &Engine, seed: u64) {
    trace::clear();
    let mut rng = StdRng::seed_from_u64(seed);
    let name = format!("cut{seed}");
    let (pn, sn) = (format!("{name}-p"), format!("{name}-s"));
    let meta_blocks = Layout::new(BLOCKS * BS / TRACK).size() / BS;
    // One supply: the cut stops the three devices at one instant.
    let supply = PowerSupply::new();
    let dev = Devices {
        p: Arc::new(PowerCutBdev::new(&pn, BS as u32, BLOCKS).on_supply(&supply)),
        s: Arc::new(PowerCutBdev::new(&sn, BS as u32, BLOCKS).on_supply(&supply)),
        m: Arc::new(
            PowerCutBdev::new(&format!("{name}-m"), BS as u32, meta_blocks).on_supply(&supply),
        ),
    };
    add(engine, &dev);
    let cfg = PairConfig {
        name: name.clone(),
        track_size: TRACK,
        copy_rate: if rng.gen_bool(0.5) { 0 } else { 1 },
    };
    let meta: Arc<dyn Bdev> = dev.m.clone();
    let first = engine
        .pair_create_on(&cfg, &pn, &sn, MetadataDevice::Fresh(meta))
        .unwrap();
    // The cleaner runs often here, so that cuts land at every step of its work too.
    if let Some(m) = first.metadata() {
        m.set_clean_interval(Duration::from_millis(rng.gen_range(1..20)));
    }
    let pv = engine.pair_view(&name, View::Primary).unwrap();
    let iv = engine.pair_view(&name, View::Image).unwrap();
    // Until the first split, the write-intent contract is checked all along, not only at the
    // cut. (The flag says stop; a check runs under its lock, so none overlaps a split.)
    let watch_stop = Arc::new(std::sync::Mutex::new(false));
    let watcher = {
        let (dev, stop, pair) = (dev.clone(), Arc::clone(&watch_stop), Arc::clone(&first));
        std::thread::spawn(move || loop {
            {
                let stopped = stop.lock().unwrap();
                if *stopped {
                    return None;
                }
                if let Some(v) = intent_violation(&dev) {
                    return Some(format!("{v}; {}", pair.persistence_report()));
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        })
    };
    let mut history = Vec::new();
    let fail = |history: &Vec<String>, what: String| -> ! {
        let trace = trace::dump(seed, &name).map(|p| format!("\ntrace: {}", p.display()));
        panic!(
            "seed {seed}: {what}\nhistory: {history:?}{}",
            trace.unwrap_or_default()
        )
    };

    // Model: the acknowledged write of each block of P, and of the image while split.
    let mut p_model = vec![0u64; BLOCKS as usize];
    let mut image: Option<Vec<u64>> = None;
    let mut backup: Option<(u64, std::path::PathBuf, Vec<u64>)> = None;
    // Blocks of P written (acknowledged) since the split the backup's checkpoint stands for,
    // when the backup makes one: every one must be in the checkpoint's changes.
    let mut checkpoint: Option<std::collections::BTreeSet<u64>> = None;
    let mut since_split: std::collections::BTreeSet<u64> = Default::default();
    let mut next_id = seed << 20;
    let mut batch = |rng: &mut StdRng, split: bool| -> (Vec<Planned>, Vec<Op>) {
        let n = rng.gen_range(1..=8);
        let mut blocks: Vec<u64> = (0..BLOCKS).collect();
        let mut plan = Vec::new();
        let mut ops = Vec::new();
        for _ in 0..n {
            let b = blocks.swap_remove(rng.gen_range(0..blocks.len()));
            next_id += 1;
            let to_image = split && rng.gen_bool(0.3);
            plan.push((to_image, b, next_id));
            ops.push(Op::WriteFua(b * BS, block_of(next_id, b)));
        }
        (plan, ops)
    };
    let steps = rng.gen_range(1..6);
    for _ in 0..steps {
        let state = engine.pair(&name).unwrap().state();
        match state {
            PairState::Copy | PairState::Pair if rng.gen_bool(0.4) => {
                *watch_stop.lock().unwrap() = true;
                engine.pair_split(std::slice::from_ref(&name)).unwrap();
                since_split.clear();
                image = Some(p_model.clone());
                history.push("split".to_string());
            }
            PairState::Psus if backup.is_none() && rng.gen_bool(0.3) => {
                let mode = [Mode::Wait, Mode::Reflect, Mode::Merge][rng.gen_range(0..3)];
                let path = engine.state_dir().join(format!("{name}-backup.img"));
                let make = rng.gen_bool(0.5);
                let options = Options {
                    checkpoint: make.then(|| "cp".to_string()),
                    ..Options::default()
                };
                let id = engine
                    .backup_start_with(&name, mode, Target::File { path: path.clone() }, options)
                    .unwrap();
                // The backup holds the image as it is now: later writes to S wait for it.
                backup = Some((id, path, image.clone().unwrap_or_default()));
                if make {
                    checkpoint = Some(since_split.clone());
                }
                history.push(format!(
                    "backup {id} ({}, checkpoint {make})",
                    mode.as_str()
                ));
            }
            PairState::Psus
                if rng.gen_bool(0.2) && !engine.pair(&name).unwrap().backup_running() =>
            {
                engine.pair_resync(&name, false).unwrap();
                image = None;
                history.push("resync".to_string());
            }
            _ => {}
        }
        let (plan, ops) = batch(&mut rng, image.is_some());
        tracing::trace!(pair = %name, ?plan, "test: writes (to the image, block, id)");
        for (to_image, rx) in start_writes(engine, &pv, &iv, &plan, ops) {
            let out = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            let mine = plan.iter().filter(|p| p.0 == to_image);
            for (r, &(_, b, id)) in out.iter().zip(mine) {
                if let Err(e) = r {
                    fail(&history, format!("write {id} to block {b} failed: {e}"));
                }
                match (to_image, image.as_mut()) {
                    (true, Some(img)) => img[b as usize] = id,
                    _ => {
                        p_model[b as usize] = id;
                        since_split.insert(b);
                        if let Some(c) = checkpoint.as_mut() {
                            c.insert(b);
                        }
                    }
                }
            }
        }
        history.push(format!("{} writes", plan.len()));
        if rng.gen_bool(0.5) {
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..3000)));
        }
    }

    *watch_stop.lock().unwrap() = true;
    if let Ok(Some(v)) = watcher.join() {
        fail(&history, format!("write-intent contract broken: {v}"));
    }

    // The cut, with a batch in flight.
    let state_before = engine.pair(&name).unwrap().state();
    let (plan, ops) = batch(&mut rng, image.is_some());
    tracing::trace!(pair = %name, ?plan, "test: writes in flight at the cut");
    let running = start_writes(engine, &pv, &iv, &plan, ops);
    std::thread::sleep(Duration::from_micros(rng.gen_range(0..1500)));
    let mut cut_rng = StdRng::seed_from_u64(seed ^ 0xc0ffee);
    let mut kept = 0;
    tracing::trace!(pair = %name, "test: power off");
    supply.off();
    for d in [&dev.p, &dev.s, &dev.m] {
        kept += d.cut(|_| cut_rng.gen_bool(0.5)).1;
    }
    // Allowed ids per block: the acknowledged one, or one in flight at the cut.
    let mut p_allowed: Vec<Vec<u64>> = p_model.iter().map(|&id| vec![id]).collect();
    let mut i_allowed: Option<Vec<Vec<u64>>> = image
        .as_ref()
        .map(|img| img.iter().map(|&id| vec![id]).collect());
    for (to_image, rx) in running {
        let out = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let mine = plan.iter().filter(|p| p.0 == to_image);
        for (r, &(_, b, id)) in out.iter().zip(mine) {
            let allowed = match (to_image, i_allowed.as_mut()) {
                (true, Some(a)) => &mut a[b as usize],
                _ => &mut p_allowed[b as usize],
            };
            if r.is_ok() {
                // Acknowledged before the cut, with FUA: it must be there.
                *allowed = vec![id];
                if let (false, Some(c)) = (to_image && i_allowed.is_some(), checkpoint.as_mut()) {
                    c.insert(b);
                }
            } else {
                allowed.push(id);
            }
        }
    }
    history.push(format!(
        "cut in {} with {} writes in flight, {kept} unflushed writes kept",
        state_before.as_str(),
        plan.len()
    ));

    let mut backup_done = false;
    // A backup ends with the cut (its reads fail) unless it was done before: then it is the
    // image as it was when it started.
    if let Some((id, path, expected)) = backup.take() {
        let info = || engine.backup_get(Some(id)).unwrap().remove(0);
        let waited = std::time::Instant::now();
        while info().state == BackupState::Running {
            if waited.elapsed() > Duration::from_secs(30) {
                let p = engine.pair(&name).unwrap();
                fail(
                    &history,
                    format!(
                        "backup {id} did not end after the cut: {:?}; {}; pair {:?}",
                        info(),
                        p.persistence_report(),
                        p.info()
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let info = info();
        history.push(format!("backup {id} {:?}", info.state));
        BACKUPS_ENDED[(info.state == BackupState::Done) as usize].fetch_add(1, Ordering::Relaxed);
        if info.state == BackupState::Done {
            backup_done = true;
            let got = ids_of(&std::fs::read(&path).unwrap());
            if got.as_ref() != Ok(&expected) {
                fail(
                    &history,
                    format!("backup {id} is done but is not the image"),
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    // Bring the pair back from what survived.
    engine.pair_delete(&name).unwrap();
    engine.bdev_delete(&pn).unwrap();
    engine.bdev_delete(&sn).unwrap();
    let after = Devices {
        p: Arc::new(dev.p.durable_copy(&pn)),
        s: Arc::new(dev.s.durable_copy(&sn)),
        m: Arc::new(dev.m.durable_copy(&format!("{name}-m"))),
    };
    add(engine, &after);
    tracing::trace!(pair = %name, "test: restart");
    let meta: Arc<dyn Bdev> = after.m.clone();
    let pair = engine
        .pair_create_on(&cfg, &pn, &sn, MetadataDevice::Existing(meta))
        .unwrap();
    let state = pair.state();
    let expected_ok = match state_before {
        PairState::Copy | PairState::Pair => matches!(state, PairState::Copy | PairState::Pair),
        s => state == s,
    };
    if !expected_ok {
        fail(
            &history,
            format!(
                "came back in {} ({:?}), was {}",
                state.as_str(),
                pair.error(),
                state_before.as_str()
            ),
        );
    }
    // A checkpoint the cut left listed holds every write to P acknowledged since its split; a
    // backup done before the cut left its checkpoint.
    if let Some(blocks) = &checkpoint {
        let listed = pair.checkpoint_infos().iter().any(|c| c.name == "cp");
        if backup_done && !listed {
            fail(
                &history,
                "the backup was done but its checkpoint is gone".into(),
            );
        }
        if listed {
            let (words, _) = pair.changed_since("cp").unwrap();
            for b in blocks {
                let t = b * BS / TRACK;
                if words[(t / 64) as usize] >> (t % 64) & 1 == 0 {
                    fail(
                        &history,
                        format!("checkpoint 'cp' lost block {b} (track {t}) written after it"),
                    );
                }
            }
        }
    }
    let p_raw: Arc<dyn Bdev> = after.p.clone();
    let s_raw: Arc<dyn Bdev> = after.s.clone();
    let p_ids = ids(engine, &p_raw).unwrap_or_else(|e| fail(&history, e));
    for b in 0..BLOCKS as usize {
        if !p_allowed[b].contains(&p_ids[b]) {
            fail(
                &history,
                format!(
                    "P block {b} holds write {:#x}, allowed {:x?}",
                    p_ids[b], p_allowed[b]
                ),
            );
        }
    }
    let iv = engine.pair_view(&name, View::Image).unwrap();
    if let Some(allowed) = &i_allowed {
        let i_ids = ids(engine, &iv).unwrap_or_else(|e| fail(&history, e));
        for b in 0..BLOCKS as usize {
            if !allowed[b].contains(&i_ids[b]) {
                fail(
                    &history,
                    format!(
                        "image block {b} holds write {:#x}, allowed {:x?}",
                        i_ids[b], allowed[b]
                    ),
                );
            }
        }
        engine.pair_resync(&name, false).unwrap();
    }
    // Once mirrored again, S equals P.
    pair.set_copy_rate(0);
    common::wait_until("the copy after the restart", || {
        pair.state() == PairState::Pair && pair.info().pending_tracks == 0
    });
    let (p_ids, s_ids) = (
        ids(engine, &p_raw).unwrap_or_else(|e| fail(&history, e)),
        ids(engine, &s_raw).unwrap_or_else(|e| fail(&history, e)),
    );
    if p_ids != s_ids {
        let diff: Vec<usize> = (0..BLOCKS as usize)
            .filter(|&b| p_ids[b] != s_ids[b])
            .collect();
        fail(
            &history,
            format!("S differs from P at blocks {diff:?} once mirrored"),
        );
    }
    engine.pair_delete(&name).unwrap();
    engine.bdev_delete(&pn).unwrap();
    engine.bdev_delete(&sn).unwrap();
}

#[test]
fn a_power_cut_loses_nothing_acknowledged_and_keeps_every_image() {
    trace::init();
    let engine = common::engine("power-cut");
    if let Some(seed) = std::env::var("QS_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_schedule(&engine, seed);
        return;
    }
    let n: u64 = std::env::var("QS_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    for seed in 0..n {
        run_schedule(&engine, seed);
    }
    let [cut, done] = [0, 1].map(|i| BACKUPS_ENDED[i].load(Ordering::Relaxed));
    println!("{n} schedules; backups: {done} done before the cut, {cut} ended by it");
    assert!(
        n < 100 || (done > 0 && cut > 0),
        "the schedules must cut during backups and after finished ones"
    );
}
