//! What a split of many pairs in one call sets in motion: nothing but the split. The pairs'
//! headers are made durable by one split journal record and written later, lazily; the
//! metadata writers are not woken for them, so a split of a thousand pairs does not make both
//! reactors poll a thousand writers while the reply is on its way. Their headers still reach
//! the disk (the journal can only start over once they have), and host writes go on. And an
//! idle pair's writer rests until a write wakes it, not a cleaning pass a second.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::Op;
use drivers::malloc::MallocBdev;
use drivers::Bdev;
use engine::pair::channel::View;
use engine::pair::{Pair, PairConfig, PairState};

const PAIRS: usize = 64;
const SIZE: u64 = 1 << 20;
const BS: u64 = 4096;

fn writer_polls(pair: &Pair) -> u64 {
    pair.metadata()
        .expect("pairs of an engine with a state directory have metadata")
        .stats
        .writer_polls
        .load(Ordering::SeqCst)
}

#[test]
fn a_group_split_wakes_no_metadata_writer_and_its_headers_are_written_later() {
    let engine = common::engine("group-split");
    let mut names = Vec::new();
    for i in 0..PAIRS {
        for side in ["p", "s"] {
            let b: Arc<dyn Bdev> =
                Arc::new(MallocBdev::create(&format!("{side}{i}"), SIZE, BS as u32).unwrap());
            engine.bdev_add(b).unwrap();
        }
        let name = format!("g{i}");
        let config = PairConfig {
            name: name.clone(),
            track_size: 64 << 10,
            copy_rate: 0,
        };
        engine
            .pair_create(&config, &format!("p{i}"), &format!("s{i}"))
            .unwrap();
        names.push(name);
    }
    let pairs: Vec<Arc<Pair>> = names.iter().map(|n| engine.pair(n).unwrap()).collect();
    common::wait_until("every pair mirrored and its metadata written", || {
        pairs
            .iter()
            .all(|p| p.state() == PairState::Pair && p.metadata().is_some_and(|m| m.idle()))
    });

    let before: Vec<u64> = pairs.iter().map(|p| writer_polls(p)).collect();
    let out = engine.pair_split(&names).unwrap();
    // Long enough for every woken writer to have polled, short next to their rests.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let polled = pairs
        .iter()
        .zip(&before)
        .filter(|(p, b)| writer_polls(p) != **b)
        .count();
    assert!(pairs.iter().all(|p| p.state() == PairState::Psus));
    assert!(pairs.iter().all(|p| p.split_at_ns() == out.split_at_ns));
    // A writer rests up to a second between cleaning passes, so a few come due in those
    // 50 ms; woken by the split, every one of them would have polled.
    assert!(
        polled < PAIRS / 4,
        "{polled} of {PAIRS} metadata writers polled during a group split"
    );

    // The split is durable as the journal's record; each header follows on its own.
    common::wait_until("every pair's header written after the group split", || {
        pairs.iter().all(|p| {
            let m = p.metadata().unwrap();
            m.header_durable() >= m.header_wanted()
        })
    });
    for (i, name) in names.iter().enumerate().step_by(7) {
        let pv = engine.pair_view(name, View::Primary).unwrap();
        let block = vec![i as u8 + 1; BS as usize];
        let done = common::run(&engine, i % 2, pv, vec![Op::WriteFua(0, block)]);
        assert!(
            done[0].is_ok(),
            "a host write to split pair {name}: {:?}",
            done[0]
        );
    }
}

#[test]
fn an_idle_pairs_metadata_writer_rests_until_a_write_wakes_it() {
    let engine = common::engine("idle-writer");
    for side in ["p", "s"] {
        let b: Arc<dyn Bdev> = Arc::new(MallocBdev::create(side, SIZE, BS as u32).unwrap());
        engine.bdev_add(b).unwrap();
    }
    let config = PairConfig {
        name: "idle".into(),
        track_size: 64 << 10,
        copy_rate: 0,
    };
    let pair = engine.pair_create(&config, "p", "s").unwrap();
    common::wait_until("the pair mirrored and its metadata written", || {
        pair.state() == PairState::Pair && pair.metadata().is_some_and(|m| m.idle())
    });
    // The write-intent bits of the first copy go two cleaning passes (a second each) later;
    // a pass after that sees nothing left to clear.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let before = writer_polls(&pair);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let idle_polls = writer_polls(&pair) - before;
    // Making a pass a second, it would have polled at least twice.
    assert!(
        idle_polls <= 1,
        "an idle writer polled {idle_polls} times in 2.5 s"
    );

    // A host write sets a write-intent bit: the writer wakes, writes it, and later clears it.
    let pv = engine.pair_view("idle", View::Primary).unwrap();
    let done = common::run(&engine, 0, pv, vec![Op::Write(0, vec![7u8; BS as usize])]);
    assert!(done[0].is_ok(), "{:?}", done[0]);
    let meta = Arc::clone(pair.metadata().unwrap());
    assert!(writer_polls(&pair) > before + idle_polls);
    common::wait_until("the write-intent bit cleared again", || {
        !meta
            .map(engine::pair::metadata::MapKind::Pending)
            .on_disk(0)
    });
}
