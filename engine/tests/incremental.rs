//! Full, sparse and incremental backups against a reference model of the bytes of P and of
//! the image, over seeded random schedules of host writes to P and to the image, splits,
//! forward and reverse resyncs, backups in every mode (full ones, and incremental ones since a
//! random checkpoint written onto a copy of that checkpoint's image), checkpoint deletions,
//! clean restarts and simulated power cuts. After every backup the target holds the image at
//! the split byte for byte, and its tree digest is the backup's; an incremental stores every
//! chunk where the image differs from its base's and no more than a full backup would.
//! Bad `since` requests get clear errors and change nothing. `QS_INCREMENTAL_RUNS` sets the
//! number of schedules (16), `QS_INCREMENTAL_FIRST` the first seed, `QS_INCREMENTAL_TRACE`
//! prints each step.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::cut_pair::{self, Devices};
use common::Op;
use drivers::digest::{tree_root, TREE_CHUNK_SIZE};
use engine::app::Engine;
use engine::backup::{BackupInfo, BackupState, Mode, Options, Target};
use engine::pair::channel::View;
use engine::pair::{Pair, PairState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const TRACK: u64 = 256 << 10;
const TRACKS: u64 = 24;
const SIZE: u64 = TRACKS * TRACK;

/// Where a checkpoint's image is: a file holding it, or a chain of tape archives (a full one,
/// then incrementals) that restores to it.
#[derive(Clone)]
enum Kept {
    File(PathBuf),
    Tapes(Vec<PathBuf>),
}

impl Kept {
    fn remove(self) {
        let files = match self {
            Kept::File(f) => vec![f],
            Kept::Tapes(t) => t,
        };
        for f in files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// What the model knows: the bytes of P, of the image while split, and the checkpoints with
/// where each one's image is.
struct Model {
    p: Vec<u8>,
    image: Vec<u8>,
    checkpoints: Vec<(String, Kept)>,
}

/// Restores a chain of archives with `quicksplit restore` and returns the image.
fn restore_chain(chain: &[PathBuf], dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("restored-{}.img", rand::random::<u32>()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_quicksplit"))
        .arg("restore")
        .args(chain)
        .arg("--to")
        .arg(&out)
        .output()
        .expect("quicksplit restore");
    assert!(
        run.status.success(),
        "restore {chain:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let image = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    image
}

fn write(engine: &Engine, name: &str, view: View, rng: &mut StdRng, bytes: &mut [u8]) {
    let bdev = engine.pair_view(name, view).unwrap();
    // Writes cluster in a few tracks, so some chunks stay empty and some change. The writes of
    // a batch run at once: each goes to a block of its own, or which one lands last is open.
    let hot = rng.gen_range(0..TRACKS);
    let blocks: std::collections::BTreeSet<u64> = (0..rng.gen_range(1..5))
        .map(|_| {
            let track = if rng.gen_bool(0.7) {
                hot
            } else {
                rng.gen_range(0..TRACKS)
            };
            track * (TRACK / BS) + rng.gen_range(0..TRACK / BS)
        })
        .collect();
    let ops: Vec<Op> = blocks
        .into_iter()
        .map(|block| {
            let data: Vec<u8> = (0..BS).map(|_| rng.gen()).collect();
            let at = (block * BS) as usize;
            bytes[at..at + BS as usize].copy_from_slice(&data);
            Op::WriteFua(block * BS, data)
        })
        .collect();
    if std::env::var_os("QS_INCREMENTAL_TRACE").is_some() {
        let at: Vec<u64> = ops
            .iter()
            .filter_map(|o| match o {
                Op::WriteFua(at, _) => Some(at / TRACK),
                _ => None,
            })
            .collect();
        eprintln!("  {view:?} writes to tracks {at:?}");
    }
    for r in common::run(engine, rng.gen_range(0..2), bdev, ops) {
        r.expect("host write");
    }
}

fn backup(engine: &Engine, name: &str, mode: Mode, target: Target, opts: Options) -> BackupInfo {
    let id = engine
        .backup_start_with(name, mode, target, opts)
        .expect("backup_start");
    let info = || engine.backup_get(Some(id)).unwrap().remove(0);
    common::wait_until("the backup", || info().state != BackupState::Running);
    info()
}

/// The bytes of the 1 MiB chunks where `a` and `b` differ.
fn differing_chunk_bytes(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(TREE_CHUNK_SIZE as usize)
        .zip(b.chunks(TREE_CHUNK_SIZE as usize))
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.len() as u64)
        .sum()
}

fn trace(seed: u64, what: &str) {
    if std::env::var_os("QS_INCREMENTAL_TRACE").is_some() {
        eprintln!("seed {seed} {what}");
    }
}

/// A backup of the split image, full or since a random checkpoint, checked against the model.
fn backup_step(
    engine: &Engine,
    name: &str,
    model: &mut Model,
    rng: &mut StdRng,
    seed: u64,
    step: &str,
) {
    let mode = [Mode::Merge, Mode::Reflect, Mode::Wait][rng.gen_range(0..3)];
    let dir = engine.state_dir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.img", rand::random::<u32>()));
    let base = (!model.checkpoints.is_empty() && rng.gen_bool(0.6))
        .then(|| model.checkpoints[rng.gen_range(0..model.checkpoints.len())].clone());
    // A full backup goes to a file or a tape; an incremental to where its base is.
    let tape = match &base {
        Some((_, kept)) => matches!(kept, Kept::Tapes(_)),
        None => rng.gen_bool(0.5),
    };
    let base_image = base.as_ref().map(|(_, kept)| match kept {
        Kept::File(file) => {
            std::fs::copy(file, &path).unwrap();
            std::fs::read(file).unwrap()
        }
        Kept::Tapes(chain) => restore_chain(chain, &dir),
    });
    let target = if tape {
        Target::Tape {
            path: path.clone(),
            record_size: drivers::tape::DEFAULT_RECORD_SIZE,
        }
    } else {
        Target::File { path: path.clone() }
    };
    let checkpoint = (model.checkpoints.len() < 8 && rng.gen_bool(0.8))
        .then(|| format!("c{}", rand::random::<u32>()));
    let opts = Options {
        host_rate: 0,
        checkpoint: checkpoint.clone(),
        since: base.as_ref().map(|(n, _)| n.clone()),
        ..Options::default()
    };
    trace(
        seed,
        &format!("{step}: {mode:?} since {:?}, tape {tape}", opts.since),
    );
    let info = backup(engine, name, mode, target, opts);
    assert_eq!(
        info.state,
        BackupState::Done,
        "seed {seed} {step}: {:?}",
        info.error
    );
    let kept = match &base {
        _ if !tape => Kept::File(path.clone()),
        Some((_, Kept::Tapes(chain))) => {
            Kept::Tapes(chain.iter().cloned().chain([path.clone()]).collect())
        }
        _ => Kept::Tapes(vec![path.clone()]),
    };
    let got = match &kept {
        Kept::File(file) => std::fs::read(file).unwrap(),
        Kept::Tapes(chain) => restore_chain(chain, &dir),
    };
    if got != model.image {
        let at = got.iter().zip(&model.image).position(|(a, b)| a != b);
        let show = |v: &[u8]| at.map(|a| v[a..a + 16].to_vec());
        panic!(
            "seed {seed} {step}: the target is not the image (since {:?}, {} bytes stored); \
             first difference at {at:?}: {:?} instead of {:?}",
            info.since,
            info.bytes_stored,
            show(&got),
            show(&model.image)
        );
    }
    assert_eq!(
        info.digest,
        Some(tree_root(&got).to_string()),
        "seed {seed} {step}: digest"
    );
    assert_eq!(info.bytes_done, SIZE, "seed {seed} {step}");
    let zeros = vec![0u8; SIZE as usize];
    let must = differing_chunk_bytes(&model.image, base_image.as_deref().unwrap_or(&zeros));
    assert!(
        info.bytes_stored >= must && info.bytes_stored <= SIZE,
        "seed {seed} {step}: {} bytes stored, {must} at least",
        info.bytes_stored
    );
    match checkpoint {
        Some(c) => model.checkpoints.push((c, kept)),
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// P, and the image while split, read through the pair hold what the model says.
fn check_views(engine: &Engine, name: &str, pair: &Pair, model: &Model, seed: u64, step: &str) {
    let mut views = vec![(View::Primary, &model.p)];
    if pair.state() == PairState::Psus {
        views.push((View::Image, &model.image));
    }
    for (view, want) in views {
        let bdev = engine.pair_view(name, view).unwrap();
        // Track by track: a read of the image must not mix pending and copied tracks.
        let reads = (0..TRACKS)
            .map(|t| Op::Read(t * TRACK, TRACK as usize))
            .collect();
        let mut got = Vec::with_capacity(SIZE as usize);
        for r in common::run(engine, 0, bdev, reads) {
            got.extend_from_slice(&r.expect("read"));
        }
        if &got != want {
            let at = got.iter().zip(want.iter()).position(|(a, b)| a != b);
            let show = |v: &[u8]| at.map(|a| v[a..a + 8].to_vec());
            panic!(
                "seed {seed} {step}: {view:?} differs from the model first at {at:?} (track {:?}): \
                 {:?} instead of {:?}",
                at.map(|a| a as u64 / TRACK),
                show(&got),
                show(want)
            );
        }
    }
}

fn wait_state(pair: &Pair, state: PairState) {
    common::wait_until(state.as_str(), || pair.state() == state);
}

fn schedule(engine: &Engine, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = format!("inc{seed}");
    let mut dev = Devices::new(&name, TRACKS, TRACK, BS);
    let mut pair = dev.create(engine, &name, true);
    wait_state(&pair, PairState::Pair);
    let mut model = Model {
        p: vec![0; SIZE as usize],
        image: Vec::new(),
        checkpoints: Vec::new(),
    };
    for step in 0..60 {
        let what = rng.gen_range(0..100);
        let state = pair.state();
        let step_name = format!("step {step} ({what}, {})", state.as_str());
        trace(seed, &step_name);
        match what {
            0..=29 => write(engine, &name, View::Primary, &mut rng, &mut model.p),
            30..=39 if state == PairState::Psus => {
                write(engine, &name, View::Image, &mut rng, &mut model.image)
            }
            40..=49 if state == PairState::Pair => {
                engine.pair_split(std::slice::from_ref(&name)).unwrap();
                model.image = model.p.clone();
            }
            50..=69 if state == PairState::Psus => {
                backup_step(engine, &name, &mut model, &mut rng, seed, &step_name)
            }
            70..=79 if state == PairState::Psus => {
                let reverse = rng.gen_bool(0.4);
                trace(seed, &format!("  resync, reverse: {reverse}"));
                engine.pair_resync(&name, reverse).unwrap();
                if reverse {
                    model.p = model.image.clone();
                }
                wait_state(&pair, PairState::Pair);
            }
            80..=86 if !model.checkpoints.is_empty() => {
                let (gone, _) = model
                    .checkpoints
                    .remove(rng.gen_range(0..model.checkpoints.len()));
                engine.checkpoint_delete(&name, &gone).unwrap();
            }
            87..=93 => {
                engine.persist_pair_for_stop(&pair);
                cut_pair::remove(engine, &name);
                pair = dev.create(engine, &name, false);
            }
            94..=99 => {
                trace(seed, "  power cut");
                // Every acknowledged write was FUA: a cut loses none of them.
                cut_pair::remove(engine, &name);
                dev = dev.after_cut(&name);
                pair = dev.create(engine, &name, false);
            }
            _ => continue,
        }
        if pair.state() == PairState::Copy {
            wait_state(&pair, PairState::Pair);
        }
        check_views(engine, &name, &pair, &model, seed, &step_name);
    }
    cut_pair::remove(engine, &name);
    for (_, kept) in model.checkpoints {
        kept.remove();
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn incremental_and_sparse_backups_equal_the_image_over_random_schedules() {
    let engine = common::engine("incremental");
    let first = env("QS_INCREMENTAL_FIRST", 1);
    for seed in first..first + env("QS_INCREMENTAL_RUNS", 16) {
        schedule(&engine, seed);
    }
}

#[test]
fn bad_since_requests_get_clear_errors_and_change_nothing() {
    let engine = common::engine("incremental-errors");
    let dev = Devices::new("a", TRACKS, TRACK, BS);
    let pair = dev.create(&engine, "a", true);
    let other = Devices::new("b", TRACKS, TRACK, BS);
    let pair_b = other.create(&engine, "b", true);
    wait_state(&pair, PairState::Pair);
    wait_state(&pair_b, PairState::Pair);
    engine
        .pair_split(&["a".to_string(), "b".to_string()])
        .unwrap();
    let dir = engine.state_dir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let full = dir.join("b-full.img");
    let opts = |checkpoint: Option<&str>, since: Option<&str>| Options {
        checkpoint: checkpoint.map(str::to_string),
        since: since.map(str::to_string),
        ..Options::default()
    };
    let file = |path: &Path| Target::File {
        path: path.to_path_buf(),
    };
    let info = backup(
        &engine,
        "b",
        Mode::Merge,
        file(&full),
        opts(Some("cb"), None),
    );
    assert_eq!(info.state, BackupState::Done, "{:?}", info.error);
    let start = |pair: &str, path: &Path, o: Options| {
        let target = Target::File {
            path: path.to_path_buf(),
        };
        engine
            .backup_start_with(pair, Mode::Merge, target, o)
            .unwrap_err()
            .to_string()
    };
    let before = engine.backup_get(None).unwrap().len();
    let target = dir.join("a-inc.img");
    std::fs::copy(&full, &target).unwrap();
    let e = start("a", &target, opts(None, Some("nothing")));
    assert!(e.contains("no checkpoint named 'nothing'"), "{e}");
    let e = start("a", &target, opts(None, Some("cb")));
    assert!(e.contains("is pair 'b''s"), "{e}");
    let missing = dir.join("missing.img");
    let e = start("b", &missing, opts(None, Some("cb")));
    assert!(e.contains("missing.img"), "{e}");
    let short = dir.join("short.img");
    std::fs::write(&short, b"short").unwrap();
    let e = start("b", &short, opts(None, Some("cb")));
    assert!(e.contains("holds 5 bytes"), "{e}");
    let mut flat = opts(None, Some("cb"));
    flat.flat_sha256 = true;
    let e = start("b", &target, flat);
    assert!(e.contains("flat_sha256"), "{e}");
    // Nothing started, nothing written, both pairs still split and backing up.
    assert_eq!(engine.backup_get(None).unwrap().len(), before);
    assert_eq!(std::fs::read(&short).unwrap(), b"short");
    assert!(!missing.exists());
    assert_eq!(pair.state(), PairState::Psus);
    let info = backup(
        &engine,
        "b",
        Mode::Merge,
        file(&target),
        opts(None, Some("cb")),
    );
    assert_eq!(info.state, BackupState::Done, "{:?}", info.error);
    assert_eq!(info.bytes_stored, 0, "nothing changed since 'cb'");
    // A file holding another image of the pair (its mark says so) is not the base.
    let image = engine.pair_view("b", View::Image).unwrap();
    let op = Op::WriteFua(0, vec![0x5a; BS as usize]);
    for r in common::run(&engine, 0, image, vec![op]) {
        r.expect("image write");
    }
    let other = dir.join("b-other.img");
    let info = backup(
        &engine,
        "b",
        Mode::Merge,
        file(&other),
        opts(Some("cb2"), None),
    );
    assert_eq!(info.state, BackupState::Done, "{:?}", info.error);
    match drivers::sink::image_mark::read(&other).unwrap() {
        Some(mark) => {
            assert_eq!(mark.checkpoint.as_deref(), Some("cb2"));
            assert_eq!(Some(mark.digest), info.digest);
            let n = engine.backup_get(None).unwrap().len();
            let e = start("b", &other, opts(None, Some("cb")));
            assert!(e.contains("holds checkpoint 'cb2' of pair 'b'"), "{e}");
            assert_eq!(engine.backup_get(None).unwrap().len(), n);
            // Onto its own base it goes, and the file's mark follows the new image.
            let info = backup(
                &engine,
                "b",
                Mode::Merge,
                file(&other),
                opts(None, Some("cb2")),
            );
            assert_eq!(info.state, BackupState::Done, "{:?}", info.error);
            let mark = drivers::sink::image_mark::read(&other).unwrap().unwrap();
            assert_eq!((Some(mark.digest), mark.checkpoint), (info.digest, None));
        }
        None => eprintln!("no user extended attributes here: the base check is not tested"),
    }
}

/// A restore's bits stay on disk until the cleaner's next pass; a split and a power cut before
/// it must not bring them back as a restore to do (it would copy S over P's newer writes).
#[test]
fn a_power_cut_soon_after_a_finished_restore_keeps_the_writes_made_since() {
    let engine = common::engine("restore-cut");
    let name = "rc".to_string();
    let mut dev = Devices::new(&name, TRACKS, TRACK, BS);
    let pair = dev.create(&engine, &name, true);
    wait_state(&pair, PairState::Pair);
    let p = engine.pair_view(&name, View::Primary).unwrap();
    let write_p = |block: u64, byte: u8| {
        let op = Op::WriteFua(block * BS, vec![byte; BS as usize]);
        for r in common::run(&engine, 0, Arc::clone(&p), vec![op]) {
            r.expect("host write");
        }
    };
    let mut model = Model {
        p: vec![0; SIZE as usize],
        image: Vec::new(),
        checkpoints: Vec::new(),
    };
    engine.pair_split(std::slice::from_ref(&name)).unwrap();
    model.image = model.p.clone();
    // Track 5 changes on P, is restored from S, and after the next split changes again.
    write_p(5 * TRACK / BS, 0xaa);
    engine.pair_resync(&name, true).unwrap();
    wait_state(&pair, PairState::Pair);
    engine.pair_split(std::slice::from_ref(&name)).unwrap();
    model.image = model.p.clone();
    write_p(5 * TRACK / BS + 1, 0xbb);
    let at = ((5 * TRACK / BS + 1) * BS) as usize;
    model.p[at..at + BS as usize].fill(0xbb);
    drop(p);
    cut_pair::remove(&engine, &name);
    dev = dev.after_cut(&name);
    let pair = dev.create(&engine, &name, false);
    assert_eq!(pair.state(), PairState::Psus);
    // Long enough for a copier that took the restore as live to have copied.
    std::thread::sleep(std::time::Duration::from_millis(300));
    check_views(&engine, &name, &pair, &model, 7, "after the cut");
}
