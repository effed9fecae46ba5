//! Verification against concurrent host writes, in process: P and S behind fault bdevs that
//! hold every request for a random number of polls, so a host write to P lands at a random
//! moment while a track is being compared. No write may show as a mismatch, and a track S
//! really lacks is still found.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{run, wait_until, Op};
use drivers::testing::fault::{FaultBdev, FaultConfig};
use engine::app::Engine;
use engine::pair::channel::View;
use engine::pair::{PairConfig, PairState};
use engine::verify::{VerifyInfo, VerifyParams, VerifyState};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const TRACK: u64 = 64 << 10;
const SIZE: u64 = 4 * MIB;

/// A pair `v` over RAM disks behind fault bdevs delaying each request up to `delay` polls.
fn delayed_pair(engine: &Engine, delay: u32) {
    let mut st = engine.state();
    for n in ["p", "s"] {
        let ram =
            Arc::new(drivers::malloc::MallocBdev::create(&format!("{n}-ram"), SIZE, 4096).unwrap());
        let cfg = Arc::new(FaultConfig::default());
        cfg.max_delay_polls.store(delay, Ordering::SeqCst);
        st.bdevs.add(Arc::new(FaultBdev::new(n, ram, cfg))).unwrap();
    }
    drop(st);
    engine
        .pair_create(
            &PairConfig {
                name: "v".into(),
                track_size: TRACK,
                copy_rate: 0,
            },
            "p",
            "s",
        )
        .unwrap();
}

fn verified(engine: &Engine, params: VerifyParams) -> VerifyInfo {
    let id = engine.verify_start("v", params).unwrap();
    let mut info = None;
    wait_until("the verification's end", || {
        let i = engine.verify_get(Some(id)).unwrap().remove(0);
        let ended = i.state != VerifyState::Running;
        info = Some(i);
        ended
    });
    info.unwrap()
}

#[test]
fn host_writes_racing_the_comparison_never_show_as_mismatches() {
    let engine = common::engine("verify-race");
    delayed_pair(&engine, 8);
    wait_until("PAIR", || {
        engine.pair_get(Some("v")).unwrap()[0].state == PairState::Pair
    });
    let pv = engine.pair_view("v", View::Primary).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (engine, pv, stop) = (Arc::clone(&engine), Arc::clone(&pv), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            let mut written = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // A few writes at a time, so that most tracks are copied (not pending) when
                // the next ones land on them.
                let ops = (0..4)
                    .map(|_| {
                        let off = rng.gen_range(0..SIZE / 4096) * 4096;
                        Op::Write(off, vec![rng.gen::<u8>() | 1; 4096])
                    })
                    .collect();
                let reactor = (written % 2) as usize;
                for r in run(&engine, reactor, Arc::clone(&pv), ops) {
                    r.expect("host write");
                }
                written += 4;
                std::thread::sleep(Duration::from_micros(200));
            }
            written
        })
    };
    // Unlimited and never yielding: as many comparisons in flight as the job allows.
    let fast = VerifyParams {
        repair: false,
        rate: 1 << 40,
        host_rate: 0,
    };
    let mut compared = 0;
    for _ in 0..40 {
        let info = verified(&engine, fast);
        assert_eq!(info.state, VerifyState::Done, "{info:?}");
        assert_eq!(
            info.mismatched_tracks, 0,
            "a host write showed as a mismatch: {info:?}"
        );
        assert_eq!(info.tracks_checked, SIZE / TRACK);
        compared += info.tracks_checked - info.tracks_skipped;
    }
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert!(written > 100, "the hosts wrote only {written} blocks");
    assert!(
        compared > 40 * 8,
        "only {compared} tracks compared in 40 passes"
    );
}
