//! Checkpoints against a reference model, over seeded random schedules of host writes to P and
//! to the image, splits, forward and reverse resyncs, backups that make checkpoints, and
//! checkpoint deletions: for every checkpoint, the tracks the pair says P changed since it are
//! exactly the tracks the model changed (still exactly after a clean restart, a superset after
//! a power cut, never fewer). Some schedules restart the pair cleanly, others from what a power
//! cut left, and carry on.
//! Bad requests (a duplicate or invalid name, a ninth checkpoint, an unknown checkpoint) get
//! clear errors and change nothing. `QS_CHECKPOINT_RUNS` sets the number of schedules (24),
//! `QS_CHECKPOINT_FIRST` the first seed, `QS_CHECKPOINT_TRACE` prints each step.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::cut_pair::{self, Devices};
use common::Op;
use engine::app::Engine;
use engine::backup::{BackupState, Mode, Options, Target};
use engine::pair::channel::View;
use engine::pair::{Pair, PairState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const TRACK: u64 = 16 << 10;
const TRACKS: u64 = 48;
const BLOCKS: u64 = TRACKS * TRACK / BS;

fn tracks_of(words: &[u64]) -> BTreeSet<u64> {
    (0..TRACKS)
        .filter(|t| words[(t / 64) as usize] >> (t % 64) & 1 != 0)
        .collect()
}

/// What the model knows of a pair: P's changes since each checkpoint and since the split.
#[derive(Default)]
struct Model {
    checkpoints: BTreeMap<String, BTreeSet<u64>>,
    order: Vec<String>,
    changed_p: BTreeSet<u64>,
    changed_s: BTreeSet<u64>,
}

impl Model {
    fn p_changed(&mut self, tracks: impl IntoIterator<Item = u64> + Clone) {
        for set in self.checkpoints.values_mut() {
            set.extend(tracks.clone());
        }
    }
}

fn write(engine: &Engine, name: &str, view: View, rng: &mut StdRng) -> BTreeSet<u64> {
    let bdev = engine.pair_view(name, view).unwrap();
    let mut tracks = BTreeSet::new();
    let ops: Vec<Op> = (0..rng.gen_range(1..6))
        .map(|_| {
            let block = rng.gen_range(0..BLOCKS);
            tracks.insert(block * BS / TRACK);
            Op::WriteFua(block * BS, vec![rng.gen(); BS as usize])
        })
        .collect();
    for r in common::run(engine, rng.gen_range(0..2), bdev, ops) {
        r.expect("host write");
    }
    tracks
}

fn backup(engine: &Engine, name: &str, checkpoint: Option<&str>) -> Result<(), String> {
    let path = engine
        .state_dir()
        .join(format!("{name}-{}.img", rand::random::<u32>()));
    let id = engine
        .backup_start_with(
            name,
            Mode::Merge,
            Target::File { path: path.clone() },
            Options {
                host_rate: 0,
                checkpoint: checkpoint.map(str::to_string),
                ..Options::default()
            },
        )
        .map_err(|e| e.to_string())?;
    let info = || engine.backup_get(Some(id)).unwrap().remove(0);
    common::wait_until("the backup", || info().state != BackupState::Running);
    let _ = std::fs::remove_file(&path);
    match info() {
        i if i.state == BackupState::Done => Ok(()),
        i => Err(format!("backup {:?}: {:?}", i.state, i.error)),
    }
}

fn check(pair: &Pair, model: &Model, exact: bool, seed: u64, step: &str) {
    let listed: Vec<String> = pair
        .checkpoint_infos()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        listed, model.order,
        "seed {seed} {step}: the checkpoints listed"
    );
    for (name, want) in &model.checkpoints {
        let (words, _) = pair.changed_since(name).unwrap();
        let got = tracks_of(&words);
        if exact {
            assert_eq!(&got, want, "seed {seed} {step}: changes since '{name}'");
        } else {
            assert!(
                got.is_superset(want),
                "seed {seed} {step}: changes since '{name}' miss {:?}",
                want.difference(&got).collect::<Vec<_>>()
            );
        }
    }
}

fn wait_state(pair: &Pair, state: PairState) {
    common::wait_until(state.as_str(), || pair.state() == state);
}

fn schedule(engine: &Engine, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = format!("ck{seed}");
    let mut dev = Devices::new(&name, TRACKS, TRACK, BS);
    let mut pair = dev.create(engine, &name, true);
    wait_state(&pair, PairState::Pair);
    let mut model = Model::default();
    let mut exact = true;
    let mut next = 0;
    for step in 0..40 {
        let what = rng.gen_range(0..100);
        let state = pair.state();
        let step_name = format!("step {step} ({what}, {})", state.as_str());
        if std::env::var_os("QS_CHECKPOINT_TRACE").is_some() {
            eprintln!("seed {seed} {step_name}");
        }
        match what {
            0..=34 => {
                let t = write(engine, &name, View::Primary, &mut rng);
                if state != PairState::Pair {
                    model.changed_p.extend(t.iter().copied());
                }
                model.p_changed(t);
            }
            35..=44 if state == PairState::Psus => {
                let t = write(engine, &name, View::Image, &mut rng);
                model.changed_s.extend(t);
            }
            45..=54 if state == PairState::Pair => {
                engine.pair_split(std::slice::from_ref(&name)).unwrap();
            }
            55..=69 if state == PairState::Psus => {
                let make = model.order.len() < 8 && rng.gen_bool(0.8);
                let cp = format!("c{next}");
                next += 1;
                backup(engine, &name, make.then_some(cp.as_str())).unwrap();
                if make {
                    // The image differs from P at the split where hosts wrote to it.
                    let changed = model.changed_p.union(&model.changed_s).copied().collect();
                    model.checkpoints.insert(cp.clone(), changed);
                    model.order.push(cp);
                }
            }
            70..=79 if state == PairState::Psus => {
                let reverse = rng.gen_bool(0.4);
                if reverse {
                    // The tracks restored from S change P.
                    let restored: BTreeSet<u64> =
                        model.changed_p.union(&model.changed_s).copied().collect();
                    model.p_changed(restored);
                }
                engine.pair_resync(&name, reverse).unwrap();
                wait_state(&pair, PairState::Pair);
                model.changed_p.clear();
                model.changed_s.clear();
            }
            80..=87 if !model.order.is_empty() => {
                let i = rng.gen_range(0..model.order.len());
                let gone = model.order.remove(i);
                model.checkpoints.remove(&gone);
                engine.checkpoint_delete(&name, &gone).unwrap();
            }
            88..=93 => {
                // A clean stop and start.
                engine.persist_pair_for_stop(&pair);
                cut_pair::remove(engine, &name);
                // Written out exactly: the changes stay exact (unless a power cut came before).
                pair = dev.create(engine, &name, false);
            }
            94..=99 => {
                // A power cut now (every acknowledged write was FUA: nothing in flight).
                cut_pair::remove(engine, &name);
                dev = dev.after_cut(&name);
                pair = dev.create(engine, &name, false);
                exact = false;
            }
            _ => continue,
        }
        if pair.state() == PairState::Copy {
            wait_state(&pair, PairState::Pair);
        }
        check(&pair, &model, exact, seed, &step_name);
    }
    cut_pair::remove(engine, &name);
}

#[test]
fn checkpoints_hold_every_change_of_p_over_random_schedules_restarts_and_power_cuts() {
    let engine = common::engine("checkpoints");
    let runs: u64 = std::env::var("QS_CHECKPOINT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let first: u64 = std::env::var("QS_CHECKPOINT_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for seed in first..first + runs {
        schedule(&engine, seed);
    }
}

#[test]
fn bad_checkpoint_requests_get_clear_errors_and_change_nothing() {
    let engine = common::engine("checkpoint-errors");
    let dev = Devices::new("bad", TRACKS, TRACK, BS);
    let pair = dev.create(&engine, "bad", true);
    wait_state(&pair, PairState::Pair);
    engine.pair_split(&["bad".to_string()]).unwrap();
    for bad in ["", "a b", "x/y", &"n".repeat(65)] {
        let e = backup(&engine, "bad", Some(bad)).unwrap_err();
        assert!(e.contains("checkpoint name"), "{bad:?}: {e}");
    }
    for i in 0..8 {
        backup(&engine, "bad", Some(&format!("k{i}"))).unwrap();
    }
    let e = backup(&engine, "bad", Some("k0")).unwrap_err();
    assert!(e.contains("already has a checkpoint named 'k0'"), "{e}");
    let e = backup(&engine, "bad", Some("ninth")).unwrap_err();
    assert!(e.contains("holds 8 checkpoints"), "{e}");
    let e = engine
        .checkpoint_delete("bad", "nope")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no checkpoint named 'nope'"), "{e}");
    let e = engine
        .checkpoint_delete("nopair", "k0")
        .unwrap_err()
        .to_string();
    assert!(e.contains("nopair"), "{e}");
    let names: Vec<String> = engine
        .checkpoint_list(Some("bad"))
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, (0..8).map(|i| format!("k{i}")).collect::<Vec<_>>());
    // A backup without a checkpoint still runs with eight.
    backup(&engine, "bad", None).unwrap();
    engine.checkpoint_delete("bad", "k3").unwrap();
    backup(&engine, "bad", Some("ninth")).unwrap();
    assert_eq!(engine.checkpoint_list(Some("bad")).unwrap().len(), 8);
}
