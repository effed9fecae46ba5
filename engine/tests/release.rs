//! What a deleted pair leaves behind: nothing. After a pair has mirrored, served host writes
//! through its views, split, backed up and been deleted with its bdevs, the pair and both bdevs
//! are freed (no poller, channel or table keeps them), so an engine that creates and deletes
//! pairs for years does not grow. The same holds for a pair whose metadata device failed: its
//! metadata writer stops instead of retrying the dead device.

mod common;

use std::sync::{Arc, Weak};

use common::Op;
use drivers::malloc::MallocBdev;
use drivers::powercut::PowerCutBdev;
use drivers::Bdev;
use engine::app::MetadataDevice;
use engine::backup::{BackupState, Mode, Target};
use engine::pair::channel::View;
use engine::pair::metadata::Layout;
use engine::pair::{PairConfig, PairState};

const SIZE: u64 = 4 << 20;
const BS: u64 = 4096;

#[test]
fn a_deleted_pair_and_its_bdevs_are_freed() {
    let engine = common::engine("release");
    for round in 0..3 {
        let (pn, sn, name) = (
            format!("p{round}"),
            format!("s{round}"),
            format!("r{round}"),
        );
        let mut weak_bdevs: Vec<Weak<dyn Bdev>> = Vec::new();
        for n in [&pn, &sn] {
            let b: Arc<dyn Bdev> = Arc::new(MallocBdev::create(n, SIZE, BS as u32).unwrap());
            weak_bdevs.push(Arc::downgrade(&b));
            engine.bdev_add(b).unwrap();
        }
        let cfg = PairConfig {
            name: name.clone(),
            track_size: 64 << 10,
            copy_rate: 0,
        };
        let weak_pair = Arc::downgrade(&engine.pair_create(&cfg, &pn, &sn).unwrap());
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

#[test]
fn a_pair_whose_metadata_device_failed_is_freed_when_deleted() {
    let engine = common::engine("release-failed");
    let track_size = 64 << 10;
    for round in 0..3 {
        let (pn, sn, name) = (
            format!("p{round}"),
            format!("s{round}"),
            format!("f{round}"),
        );
        for n in [&pn, &sn] {
            engine
                .bdev_add(Arc::new(MallocBdev::create(n, SIZE, BS as u32).unwrap()))
                .unwrap();
        }
        let meta_blocks = Layout::new(SIZE / track_size).size() / BS;
        let meta = Arc::new(PowerCutBdev::new(
            &format!("{name}-m"),
            BS as u32,
            meta_blocks,
        ));
        let cfg = PairConfig {
            name: name.clone(),
            track_size,
            copy_rate: 0,
        };
        let meta_dev: Arc<dyn Bdev> = meta.clone();
        let weak_pair = Arc::downgrade(
            &engine
                .pair_create_on(&cfg, &pn, &sn, MetadataDevice::Fresh(meta_dev))
                .unwrap(),
        );
        let pair = || weak_pair.upgrade().expect("the pair lives while it exists");
        common::wait_until("the first copy", || pair().state() == PairState::Pair);
        // The metadata device dies; host writes go on (they fail once their write-intent bits
        // cannot be written), and the writer's next batch (a write-intent bit cleared, a
        // header) fails and suspends the pair.
        meta.power_off();
        let pv = engine.pair_view(&name, View::Primary).unwrap();
        let ops = (0..8u64)
            .map(|i| Op::Write(i * 97 % (SIZE / BS) * BS, vec![7; BS as usize]))
            .collect();
        common::run(&engine, 1, pv, ops);
        common::wait_until("the pair to be suspended", || {
            pair().state() == PairState::Psue
        });
        engine.pair_delete(&name).unwrap();
        engine.bdev_delete(&pn).unwrap();
        engine.bdev_delete(&sn).unwrap();
        drop(meta);
        common::wait_until("the deleted pair to be freed", || {
            weak_pair.upgrade().is_none()
        });
    }
}

#[test]
fn a_pair_whose_secondary_failed_is_freed_when_deleted() {
    let engine = common::engine("release-s-failed");
    for round in 0..3 {
        let (pn, sn, name) = (
            format!("p{round}"),
            format!("s{round}"),
            format!("g{round}"),
        );
        engine
            .bdev_add(Arc::new(MallocBdev::create(&pn, SIZE, BS as u32).unwrap()))
            .unwrap();
        let s = Arc::new(PowerCutBdev::new(&sn, BS as u32, SIZE / BS));
        engine.bdev_add(s.clone()).unwrap();
        let cfg = PairConfig {
            name: name.clone(),
            track_size: 64 << 10,
            copy_rate: 0,
        };
        let weak_pair = Arc::downgrade(&engine.pair_create(&cfg, &pn, &sn).unwrap());
        let pair = || weak_pair.upgrade().expect("the pair lives while it exists");
        common::wait_until("the first copy", || pair().state() == PairState::Pair);
        // S dies; the next mirrored write fails on it and suspends the pair, whose copier and
        // metadata writer must then end.
        s.power_off();
        let pv = engine.pair_view(&name, View::Primary).unwrap();
        let ops = (0..8u64)
            .map(|i| Op::Write(i * 97 % (SIZE / BS) * BS, vec![7; BS as usize]))
            .collect();
        common::run(&engine, 1, pv, ops);
        common::wait_until("the pair to be suspended", || {
            pair().state() == PairState::Psue
        });
        engine.pair_delete(&name).unwrap();
        engine.bdev_delete(&pn).unwrap();
        engine.bdev_delete(&sn).unwrap();
        drop(s);
        common::wait_until("the deleted pair to be freed", || {
            weak_pair.upgrade().is_none()
        });
    }
}
