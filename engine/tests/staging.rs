//! The reactors' shared staging pools: a pair whose metadata writer finds its reactor's pool
//! of 4 KiB buffers empty waits for buffers instead of failing, and goes on once they return.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::pair::{PairConfig, PairState};
use hugepages::DmaBuf;

/// Takes every 4 KiB buffer of each reactor's shared pool; they go back when dropped.
fn drain_pools(engine: &engine::app::Engine) -> Arc<Mutex<Vec<DmaBuf>>> {
    let held = Arc::new(Mutex::new(Vec::new()));
    for i in 0..engine.reactors().len() {
        let (tx, rx) = mpsc::channel();
        let held = Arc::clone(&held);
        engine
            .reactors()
            .get(i)
            .send_blocking(Box::new(move |_cx| {
                let pool = engine::staging::shared_pool(4096).expect("pool");
                let mut held = held.lock().unwrap();
                while let Some(b) = pool.get() {
                    held.push(b);
                }
                let _ = tx.send(());
            }))
            .unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    held
}

#[test]
fn a_metadata_write_waits_for_buffers_of_the_shared_pool() {
    let engine = common::engine("staging");
    for n in ["p", "s"] {
        engine
            .bdev_add(Arc::new(
                drivers::malloc::MallocBdev::create(n, 4 << 20, 4096).unwrap(),
            ))
            .unwrap();
    }
    let cfg = PairConfig {
        name: "pr".into(),
        track_size: 64 << 10,
        copy_rate: 0,
    };
    let pair = engine.pair_create(&cfg, "p", "s").unwrap();
    common::wait_until("the copy", || pair.state() == PairState::Pair);
    let held = drain_pools(&engine);
    assert!(!held.lock().unwrap().is_empty());
    // The split's header needs a buffer: the split waits, the metadata stays healthy.
    let (tx, rx) = mpsc::channel();
    let splitter = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || {
            let _ = tx.send(
                engine
                    .pair_split(&["pr".to_string()])
                    .map(|o| o.split_at_ns),
            );
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the split was answered without a buffer for its header"
    );
    assert!(!pair.metadata_failed(), "the metadata writer gave up");
    held.lock().unwrap().clear();
    let at = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the split once buffers came back")
        .expect("the split");
    splitter.join().unwrap();
    assert_eq!(pair.state(), PairState::Psus);
    assert_eq!(pair.split_at_ns(), at);
    assert!(pair.state_durable());
}
