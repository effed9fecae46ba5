//! What a deleted pair leaves behind: nothing. After a pair has mirrored, served host writes
//! through its views, split, backed up and been deleted with its bdevs, the pair and both bdevs
//! are freed (no poller, channel or table keeps them), so an engine that creates and deletes
//! pairs for years does not grow. The same holds for a pair whose metadata device failed: its
//! metadata writer stops instead of retrying the dead device.

mod common;

use std::sync::{Arc, Weak};

use common::Op;
use drivers::malloc::MallocBdev;
use drivers::testing::powercut::PowerCutBdev;
use drivers::Bdev;
use engine::app::{Engine, MetadataDevice};
use engine::backup::{BackupState, Mode, Target};
use engine::pair::channel::View;
use engine::pair::metadata::Layout;
use engine::pair::{Pair, PairConfig, PairState};

const SIZE: u64 = 4 << 20;
const BS: u64 = 4096;
const TRACK: u64 = 64 << 10;

#[test]
fn a_deleted_pair_and_its_bdevs_are_freed() {
    let engine = common::engine("release");
    for round in 0..3 {
        let (pn, sn, name) = names(round, "r");
        let mut weak_bdevs: Vec<Weak<dyn Bdev>> = Vec::new();
        for n in [&pn, &sn] {
            let b: Arc<dyn Bdev> = Arc::new(MallocBdev::create(n, SIZE, BS as u32).unwrap());
            weak_bdevs.push(Arc::downgrade(&b));
            engine.bdev_add(b).unwrap();
        }
        let weak_pair = Arc::downgrade(&engine.pair_create(&config(&name), &pn, &sn).unwrap());
        let pair = || weak_pair.upgrade().expect("the pair lives while it exists");
        common::wait_until("the first copy", || pair().state() == PairState::Pair);
        {
            let pv = engine.pair_view(&name, View::Primary).unwrap();
            let ops = (0..64u64)
                .map(|i| Op::Write(i * 7 % (SIZE / BS) * BS, vec![round as u8 + 1; BS as usize]))
                .collect();
            assert!(common::run(&engine, 1, pv, ops).iter().all(Result::is_ok));
        }
        engine.pair_split(std::slice::from_ref(&name)).unwrap();
        let path = engine.state_dir().join(format!("{name}-backup.img"));
        let id = engine
            .backup_start(&name, Mode::Merge, Target::File { path: path.clone() }, 0)
            .unwrap();
        common::wait_until("the backup", || {
            engine.backup_get(Some(id)).unwrap()[0].state != BackupState::Running
        });
        assert_eq!(
            engine.backup_get(Some(id)).unwrap()[0].state,
            BackupState::Done
        );
        {
            let iv = engine.pair_view(&name, View::Image).unwrap();
            assert!(common::run(&engine, 0, iv, vec![Op::Read(0, BS as usize)])[0].is_ok());
        }
        engine.pair_delete(&name).unwrap();
        engine.bdev_delete(&pn).unwrap();
        engine.bdev_delete(&sn).unwrap();
        let _ = std::fs::remove_file(&path);
        common::wait_until("the deleted pair to be freed", || {
            weak_pair.upgrade().is_none()
        });
        for w in &weak_bdevs {
            common::wait_until("the deleted bdevs to be freed", || w.upgrade().is_none());
        }
    }
}

/// Waits for `pair`'s first copy, powers `dies` off under host writes until the pair is
/// suspended, deletes the pair and its bdevs, and waits until nothing holds the pair any more.
fn suspend_delete_and_check_freed(engine: &Engine, pair: Arc<Pair>, dies: Arc<PowerCutBdev>) {
    let (name, pn, sn) = (
        pair.name().to_string(),
        pair.primary().name().to_string(),
        pair.secondary().name().to_string(),
    );
    let weak_pair = Arc::downgrade(&pair);
    drop(pair);
    let pair = || weak_pair.upgrade().expect("the pair lives while it exists");
    common::wait_until("the first copy", || pair().state() == PairState::Pair);
    // Host writes go on (they fail once what they need cannot be written); the pair's next
    // write to the dead device fails and suspends it.
    dies.power_off();
    let pv = engine.pair_view(&name, View::Primary).unwrap();
    let ops = (0..8u64)
        .map(|i| Op::Write(i * 97 % (SIZE / BS) * BS, vec![7; BS as usize]))
        .collect();
    common::run(engine, 1, pv, ops);
    common::wait_until("the pair to be suspended", || {
        pair().state() == PairState::Psue
    });
    engine.pair_delete(&name).unwrap();
    engine.bdev_delete(&pn).unwrap();
    engine.bdev_delete(&sn).unwrap();
    drop(dies);
    common::wait_until("the deleted pair to be freed", || {
        weak_pair.upgrade().is_none()
    });
}

/// The names of round `round`'s primary, secondary and pair (`tag` tells the tests' pairs apart).
fn names(round: u32, tag: &str) -> (String, String, String) {
    (
        format!("p{round}"),
        format!("s{round}"),
        format!("{tag}{round}"),
    )
}

fn config(name: &str) -> PairConfig {
    PairConfig {
        name: name.to_string(),
        track_size: TRACK,
        copy_rate: 0,
    }
}

#[test]
fn a_pair_whose_metadata_device_failed_is_freed_when_deleted() {
    let engine = common::engine("release-failed");
    for round in 0..3 {
        let (pn, sn, name) = names(round, "f");
        for n in [&pn, &sn] {
            engine
                .bdev_add(Arc::new(MallocBdev::create(n, SIZE, BS as u32).unwrap()))
                .unwrap();
        }
        let meta_blocks = Layout::new(SIZE / TRACK).size() / BS;
        let meta = Arc::new(PowerCutBdev::new(
            &format!("{name}-m"),
            BS as u32,
            meta_blocks,
        ));
        let meta_dev: Arc<dyn Bdev> = meta.clone();
        let pair = engine
            .pair_create_on(&config(&name), &pn, &sn, MetadataDevice::Fresh(meta_dev))
            .unwrap();
        suspend_delete_and_check_freed(&engine, pair, meta);
    }
}

#[test]
fn a_pair_whose_secondary_failed_is_freed_when_deleted() {
    let engine = common::engine("release-s-failed");
    for round in 0..3 {
        let (pn, sn, name) = names(round, "g");
        engine
            .bdev_add(Arc::new(MallocBdev::create(&pn, SIZE, BS as u32).unwrap()))
            .unwrap();
        let s = Arc::new(PowerCutBdev::new(&sn, BS as u32, SIZE / BS));
        engine.bdev_add(s.clone()).unwrap();
        let pair = engine.pair_create(&config(&name), &pn, &sn).unwrap();
        suspend_delete_and_check_freed(&engine, pair, s);
    }
}
