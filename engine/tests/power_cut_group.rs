//! Power cuts during splits of several pairs in one call, over many seeded schedules.
//!
//! Each schedule makes two to five pairs whose P, S and metadata, and the engine's split
//! journal, live on power-cut bdevs of one supply (writes volatile until flushed). It writes
//! every P (FUA, acknowledged), splits all the pairs in one call from a thread that then writes
//! every P again, and cuts the power at a random instant, keeping a random subset of the
//! unflushed writes. The pairs are brought back from what survived, in a random order, and:
//! - either every pair of the group is split at one common instant or none is; a split that was
//!   acknowledged before the cut is there;
//! - a pair split comes back with its image equal to P at the split, block for block;
//! - every write acknowledged to P is on P, a block holding only its last acknowledged write or
//!   a write in flight at the cut;
//! - a pair that comes back mirroring ends with S equal to P.
//!
//! `QS_GROUP_CUTS` sets the number of schedules (default 300), `QS_GROUP_CUT_SEED` runs one.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cut_pair::Devices;
use common::Op;
use drivers::testing::powercut::{PowerCutBdev, PowerSupply};
use drivers::Bdev;
use engine::app::Engine;
use engine::pair::channel::View;
use engine::pair::PairState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Schedules whose group came back not split (0) and split (1).
static OUTCOMES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
const BS: u64 = 4096;
const BLOCKS: u64 = 32;
const TRACK: u64 = 16 << 10;
/// The split journal's device: 256 KiB.
const JOURNAL_BLOCKS: u64 = 64;

fn block_of(id: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    common::fill_block(&mut b, id, block);
    b
}

fn ids(engine: &Engine, bdev: &Arc<dyn Bdev>) -> Vec<u64> {
    let data = common::read(engine, bdev, 0, (BLOCKS * BS) as usize);
    (0..BLOCKS)
        .map(|b| {
            common::decode_block(&data[(b * BS) as usize..((b + 1) * BS) as usize], b)
                .unwrap_or_else(|e| panic!("block {b}: {e}"))
        })
        .collect()
}

/// Up to `most - 1` writes `(block, id)`, each to a block of its own (writes of one batch run
/// at once, so two to one block would leave either).
fn batch(rng: &mut StdRng, next_id: &mut u64, most: usize) -> Vec<(u64, u64)> {
    let mut blocks: Vec<u64> = (0..BLOCKS).collect();
    (0..rng.gen_range(1..most))
        .map(|_| {
            *next_id += 1;
            (blocks.swap_remove(rng.gen_range(0..blocks.len())), *next_id)
        })
        .collect()
}

/// Writes `(block, id)` to P of pair `name` with FUA; the outcome of each.
fn write_p(engine: &Engine, name: &str, writes: &[(u64, u64)]) -> Vec<bool> {
    let pv = engine.pair_view(name, View::Primary).unwrap();
    let ops = writes
        .iter()
        .map(|&(b, id)| Op::WriteFua(b * BS, block_of(id, b)))
        .collect();
    common::run(engine, 0, pv, ops)
        .iter()
        .map(Result::is_ok)
        .collect()
}

fn run_schedule(engine: &Arc<Engine>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let supply = PowerSupply::new();
    let journal =
        Arc::new(PowerCutBdev::new("journal", BS as u32, JOURNAL_BLOCKS).on_supply(&supply));
    engine
        .use_split_journal(Arc::clone(&journal) as Arc<dyn Bdev>)
        .unwrap();
    let n = rng.gen_range(2..=5);
    let members: Vec<(String, Devices)> = (0..n)
        .map(|i| {
            let name = format!("g{seed}-{i}");
            let dev = Devices::with_supply(&name, BLOCKS * BS / TRACK, TRACK, BS, Some(&supply));
            (name, dev)
        })
        .collect();
    for (name, dev) in &members {
        dev.create(engine, name, true);
    }
    let fail = |what: String| -> ! { panic!("seed {seed}: {what}") };

    // Acknowledged writes to every P before the split: the images must hold them.
    let mut next_id = seed << 20;
    let mut p_model: Vec<Vec<u64>> = vec![vec![0; BLOCKS as usize]; n];
    for (i, (name, _)) in members.iter().enumerate() {
        let writes = batch(&mut rng, &mut next_id, 8);
        for (ok, &(b, id)) in write_p(engine, name, &writes).into_iter().zip(&writes) {
            assert!(ok, "seed {seed}: write before the split failed");
            p_model[i][b as usize] = id;
        }
    }
    // Sometimes the mirror is whole at the split, sometimes still copying.
    if rng.gen_bool(0.5) {
        for (name, _) in &members {
            let pair = engine.pair(name).unwrap();
            common::wait_until("the copy", || pair.state() == PairState::Pair);
        }
    }

    // The split of all, then writes to every P, from a thread; the cut from here.
    let names: Vec<String> = members.iter().map(|(name, _)| name.clone()).collect();
    let after: Vec<Vec<(u64, u64)>> = (0..n).map(|_| batch(&mut rng, &mut next_id, 5)).collect();
    let worker = {
        let (engine, names, after) = (Arc::clone(engine), names.clone(), after.clone());
        std::thread::spawn(move || {
            let split = engine.pair_split(&names).map(|o| o.split_at_ns);
            let written: Vec<Vec<bool>> = match split {
                Ok(_) => names
                    .iter()
                    .zip(&after)
                    .map(|(name, w)| write_p(&engine, name, w))
                    .collect(),
                Err(_) => Vec::new(),
            };
            (split, written)
        })
    };
    std::thread::sleep(Duration::from_micros(rng.gen_range(0..1500)));
    supply.off();
    let mut cut_rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    journal.cut(|_| cut_rng.gen_bool(0.5));
    for (_, dev) in &members {
        for d in [&dev.p, &dev.s, &dev.m] {
            d.cut(|_| cut_rng.gen_bool(0.5));
        }
    }
    let (split, written) = worker.join().unwrap();
    // What P may hold: its acknowledged write, or a write in flight at the cut.
    let mut p_allowed: Vec<Vec<Vec<u64>>> = p_model
        .iter()
        .map(|blocks| blocks.iter().map(|&id| vec![id]).collect())
        .collect();
    for (i, outcomes) in written.iter().enumerate() {
        for (&ok, &(b, id)) in outcomes.iter().zip(&after[i]) {
            let allowed = &mut p_allowed[i][b as usize];
            if ok {
                *allowed = vec![id];
            } else {
                allowed.push(id);
            }
        }
    }

    // Bring the group back from what survived, in a random order.
    for (name, _) in &members {
        common::cut_pair::remove(engine, name);
    }
    let journal = Arc::new(journal.durable_copy("journal"));
    engine
        .use_split_journal(Arc::clone(&journal) as Arc<dyn Bdev>)
        .unwrap();
    let back: Vec<(String, Devices)> = members
        .iter()
        .map(|(name, dev)| (name.clone(), dev.after_cut(name)))
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let mut pairs = vec![None; n];
    for &i in &order {
        pairs[i] = Some(back[i].1.create(engine, &back[i].0, false));
    }
    let pairs: Vec<_> = pairs.into_iter().map(Option::unwrap).collect();
    let states: Vec<(PairState, u64)> =
        pairs.iter().map(|p| (p.state(), p.split_at_ns())).collect();
    let split_back = states.iter().filter(|s| s.0 == PairState::Psus).count();
    if split_back != 0 && split_back != n {
        fail(format!(
            "{split_back} of {n} pairs came back split: {states:?}"
        ));
    }
    if let Ok(at) = split {
        if split_back != n {
            fail(format!(
                "the split was acknowledged and the pairs came back {states:?}"
            ));
        }
        if states.iter().any(|s| s.1 != at) {
            fail(format!("split at {at}, came back {states:?}"));
        }
    }
    OUTCOMES[(split_back == n) as usize].fetch_add(1, Ordering::Relaxed);
    if split_back == n && states.iter().any(|s| s.1 != states[0].1) {
        fail(format!(
            "the pairs came back split at different instants: {states:?}"
        ));
    }
    for (i, (name, dev)) in back.iter().enumerate() {
        let p_raw: Arc<dyn Bdev> = dev.p.clone();
        let p_ids = ids(engine, &p_raw);
        for b in 0..BLOCKS as usize {
            if !p_allowed[i][b].contains(&p_ids[b]) {
                fail(format!(
                    "pair {i}: P block {b} holds {:#x}, allowed {:x?}",
                    p_ids[b], p_allowed[i][b]
                ));
            }
        }
        if split_back == n {
            let iv = engine.pair_view(name, View::Image).unwrap();
            let image = ids(engine, &iv);
            if image != p_model[i] {
                fail(format!(
                    "pair {i}: the image is not P at the split: {image:x?} against {:x?}",
                    p_model[i]
                ));
            }
            engine.pair_resync(name, false).unwrap();
        }
        let pair = &pairs[i];
        common::wait_until("the copy after the restart", || {
            pair.state() == PairState::Pair && pair.info().pending_tracks == 0
        });
        let s_raw: Arc<dyn Bdev> = dev.s.clone();
        if ids(engine, &p_raw) != ids(engine, &s_raw) {
            fail(format!("pair {i}: S differs from P once mirrored"));
        }
    }
    for (name, _) in &back {
        common::cut_pair::remove(engine, name);
    }
}

#[test]
fn a_power_cut_during_a_group_split_leaves_all_of_the_group_split_or_none() {
    let engine = common::engine("power-cut-group");
    if let Some(seed) = std::env::var("QS_GROUP_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_schedule(&engine, seed);
        return;
    }
    let n: u64 = std::env::var("QS_GROUP_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for seed in 0..n {
        run_schedule(&engine, seed);
    }
    let [none, all] = [0, 1].map(|i| OUTCOMES[i].load(Ordering::Relaxed));
    println!("{n} schedules: the group came back split in {all}, not split in {none}");
    assert!(
        n < 100 || (none > 0 && all > 0),
        "the cuts must land before and after the split is durable"
    );
}
