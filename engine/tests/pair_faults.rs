//! Faults and costs of pairs: I/O errors suspend the pair (PSUE) without losing an acknowledged
//! write or showing a wrong image; a resync copies only the changed tracks; a split copies and
//! scans nothing, even on a 1 TiB pair with every track pending.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{read, run, wait_until, Op};
use drivers::testing::fault::{FaultBdev, FaultConfig};
use drivers::{Bdev, IoError};
use engine::app::Engine;
use engine::pair::channel::View;
use engine::pair::{PairConfig, PairState};

const MIB: u64 = 1 << 20;
const TRACK: u64 = 64 << 10;

fn faulty_pair(
    engine: &Engine,
    name: &str,
    size: u64,
    copy_rate: u64,
) -> (Arc<FaultConfig>, Arc<FaultConfig>) {
    let configs = (
        Arc::new(FaultConfig::default()),
        Arc::new(FaultConfig::default()),
    );
    {
        let mut st = engine.state();
        for (n, cfg) in [("p", &configs.0), ("s", &configs.1)] {
            let ram = Arc::new(
                drivers::malloc::MallocBdev::create(&format!("{name}-{n}-ram"), size, 4096)
                    .unwrap(),
            );
            st.bdevs
                .add(Arc::new(FaultBdev::new(
                    &format!("{name}-{n}"),
                    ram,
                    Arc::clone(cfg),
                )))
                .unwrap();
        }
    }
    engine
        .pair_create(
            &PairConfig {
                name: name.into(),
                track_size: TRACK,
                copy_rate,
            },
            &format!("{name}-p"),
            &format!("{name}-s"),
        )
        .unwrap();
    configs
}

fn state(engine: &Engine, name: &str) -> engine::pair::PairInfo {
    engine.pair_get(Some(name)).unwrap().remove(0)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn raw(engine: &Engine, name: &str) -> Arc<dyn Bdev> {
    engine.state().bdevs.get(name).unwrap()
}

#[test]
fn a_secondary_write_error_suspends_the_pair_and_loses_nothing() {
    let engine = common::engine("psue-s");
    let (_fp, fs) = faulty_pair(&engine, "a", MIB, 0);
    let pv = engine.pair_view("a", View::Primary).unwrap();
    wait_until("PAIR", || state(&engine, "a").state == PairState::Pair);
    let mut model = vec![0u8; MIB as usize];
    let w1 = pattern(1, 8192);
    assert!(run(&engine, 0, Arc::clone(&pv), vec![Op::Write(0, w1.clone())])[0].is_ok());
    model[..8192].copy_from_slice(&w1);

    fs.fail_writes.store(true, Ordering::SeqCst);
    let w2 = pattern(2, 4096);
    assert!(run(
        &engine,
        1,
        Arc::clone(&pv),
        vec![Op::Write(200 * 1024, w2.clone())]
    )[0]
    .is_ok());
    model[200 * 1024..204 * 1024].copy_from_slice(&w2);
    wait_until("PSUE", || state(&engine, "a").state == PairState::Psue);
    let info = state(&engine, "a");
    let err = info.error.expect("PSUE keeps its error");
    assert!(err.contains("secondary"), "{err}");

    // P stays writable and keeps every acknowledged write.
    let w3 = pattern(3, 4096);
    assert!(run(
        &engine,
        0,
        Arc::clone(&pv),
        vec![Op::Write(512 * 1024, w3.clone())]
    )[0]
    .is_ok());
    model[512 * 1024..516 * 1024].copy_from_slice(&w3);
    assert_eq!(read(&engine, &pv, 0, MIB as usize), model);
    // The image is refused, not silently wrong.
    let iv = engine.pair_view("a", View::Image).unwrap();
    let r = run(&engine, 0, iv, vec![Op::Read(0, 4096)]).remove(0);
    assert!(matches!(r, Err(IoError::Refused(_))), "{r:?}");

    // Once the fault is gone a resync brings S back to P.
    fs.fail_writes.store(false, Ordering::SeqCst);
    engine.pair_resync("a", false).unwrap();
    wait_until("PAIR after resync", || {
        let i = state(&engine, "a");
        i.state == PairState::Pair && i.pending_tracks == 0
    });
    assert_eq!(read(&engine, &raw(&engine, "a-s"), 0, MIB as usize), model);
}

#[test]
fn a_failed_copy_before_write_fails_the_host_write_and_the_image() {
    let engine = common::engine("psue-cow");
    // A copy rate of 1 byte/s: every track stays pending after the split.
    let (_fp, fs) = faulty_pair(&engine, "b", MIB, 1);
    let pv = engine.pair_view("b", View::Primary).unwrap();
    let x = pattern(7, 4096);
    assert!(run(&engine, 0, Arc::clone(&pv), vec![Op::Write(0, x.clone())])[0].is_ok());
    let out = engine.pair_split(&["b".to_string()]).unwrap();
    assert_eq!(out.pending_tracks, vec![MIB / TRACK]);

    fs.fail_writes.store(true, Ordering::SeqCst);
    let y = pattern(8, 4096);
    let r = run(&engine, 1, Arc::clone(&pv), vec![Op::Write(0, y)]).remove(0);
    assert!(
        matches!(r, Err(IoError::Device(_))),
        "the host write must fail: {r:?}"
    );
    assert_eq!(state(&engine, "b").state, PairState::Psue);
    // The failed write did not happen on P; the image is refused.
    assert_eq!(read(&engine, &pv, 0, 4096), x);
    let iv = engine.pair_view("b", View::Image).unwrap();
    let r = run(&engine, 0, iv, vec![Op::Read(0, 4096)]).remove(0);
    assert!(matches!(r, Err(IoError::Refused(_))), "{r:?}");
    // A later write is acknowledged and kept.
    let z = pattern(9, 4096);
    assert!(run(
        &engine,
        0,
        Arc::clone(&pv),
        vec![Op::Write(4096, z.clone())]
    )[0]
    .is_ok());
    assert_eq!(read(&engine, &pv, 4096, 4096), z);
}

#[test]
fn a_primary_read_error_fails_that_read_and_suspends_the_pair() {
    let engine = common::engine("psue-p");
    let (fp, _fs) = faulty_pair(&engine, "c", MIB, 0);
    let pv = engine.pair_view("c", View::Primary).unwrap();
    wait_until("PAIR", || state(&engine, "c").state == PairState::Pair);
    fp.fail_reads.store(true, Ordering::SeqCst);
    let r = run(&engine, 0, Arc::clone(&pv), vec![Op::Read(0, 4096)]).remove(0);
    assert!(matches!(r, Err(IoError::Device(libc::EIO))), "{r:?}");
    let info = state(&engine, "c");
    assert_eq!(info.state, PairState::Psue);
    assert!(info.error.unwrap().contains("primary"));
}

#[test]
fn a_resync_copies_only_the_changed_tracks() {
    let engine = common::engine("resync");
    let (_fp, _fs) = faulty_pair(&engine, "d", 4 * MIB, 0);
    let tracks = 4 * MIB / TRACK;
    wait_until("PAIR", || state(&engine, "d").state == PairState::Pair);
    assert_eq!(state(&engine, "d").copied_tracks, tracks);
    engine.pair_split(&["d".to_string()]).unwrap();
    let pv = engine.pair_view("d", View::Primary).unwrap();
    let iv = engine.pair_view("d", View::Image).unwrap();
    let p_writes: Vec<Op> = [1u64, 5, 9]
        .iter()
        .map(|t| Op::Write(t * TRACK + 4096, pattern(*t as u8, 4096)))
        .collect();
    assert!(run(&engine, 0, Arc::clone(&pv), p_writes)
        .iter()
        .all(Result::is_ok));
    let s_writes = vec![
        Op::Write(5 * TRACK, pattern(50, 8192)),
        Op::Write(20 * TRACK + 8192, pattern(20, 4096)),
    ];
    assert!(run(&engine, 1, iv, s_writes).iter().all(Result::is_ok));
    assert_eq!(state(&engine, "d").changed_tracks, 4);
    engine.pair_resync("d", false).unwrap();
    wait_until("PAIR after resync", || {
        let i = state(&engine, "d");
        i.state == PairState::Pair && i.pending_tracks == 0
    });
    assert_eq!(state(&engine, "d").copied_tracks, tracks + 4);
    let p = read(&engine, &pv, 0, (4 * MIB) as usize);
    assert_eq!(
        read(&engine, &raw(&engine, "d-s"), 0, (4 * MIB) as usize),
        p
    );
}

#[test]
fn a_split_of_a_1tib_pair_with_every_track_pending_reads_and_scans_nothing() {
    let engine = common::engine("split-cost");
    let dir = engine.state_dir().to_path_buf();
    let tib = 1u64 << 40;
    {
        let mut st = engine.state();
        for n in ["bigp", "bigs"] {
            let b =
                drivers::uring::UringBdev::open(n, &dir.join(format!("{n}.img")), 4096, Some(tib))
                    .unwrap();
            st.bdevs.add(Arc::new(b)).unwrap();
        }
    }
    let pair = engine
        .pair_create(
            &PairConfig {
                name: "big".into(),
                track_size: TRACK,
                copy_rate: 1,
            },
            "bigp",
            "bigs",
        )
        .unwrap();
    let tracks = tib / TRACK;
    let before = (
        pair.bitmap_words_visited(),
        pair.stats.bytes_read.load(Ordering::SeqCst),
        pair.stats.tracks_copied.load(Ordering::SeqCst),
    );
    let out = engine.pair_split(&["big".to_string()]).unwrap();
    let after = (
        pair.bitmap_words_visited(),
        pair.stats.bytes_read.load(Ordering::SeqCst),
        pair.stats.tracks_copied.load(Ordering::SeqCst),
    );
    assert_eq!(out.pending_tracks, vec![tracks]);
    assert_eq!(state(&engine, "big").state, PairState::Psus);
    assert_eq!(
        before, after,
        "(bitmap words visited, bytes read, tracks copied) changed"
    );
    // The image of a pending track comes from P.
    let iv = engine.pair_view("big", View::Image).unwrap();
    assert_eq!(read(&engine, &iv, tib - 4096, 4096), vec![0u8; 4096]);
    engine.pair_delete("big").unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
