//! A pair on RAM disks that lose what was not flushed at a simulated power cut, and the
//! restarts model tests put it through (clean, or from what a cut left).

use std::sync::Arc;

use drivers::testing::powercut::{PowerCutBdev, PowerSupply};
use drivers::Bdev;
use engine::app::{Engine, MetadataDevice};
use engine::pair::metadata::Layout;
use engine::pair::{Pair, PairConfig};

/// The devices of a pair named `name`: `name-p`, `name-s` and its metadata.
pub struct Devices {
    pub p: Arc<PowerCutBdev>,
    pub s: Arc<PowerCutBdev>,
    pub m: Arc<PowerCutBdev>,
    track_size: u64,
}

impl Devices {
    /// Zeroed devices for `tracks` tracks of `track_size` bytes, in blocks of `block_size`.
    pub fn new(name: &str, tracks: u64, track_size: u64, block_size: u64) -> Self {
        Self::with_supply(name, tracks, track_size, block_size, None)
    }

    /// The same, on `supply` when given: switching it off stops them with every other device
    /// on it, at one instant.
    pub fn with_supply(
        name: &str,
        tracks: u64,
        track_size: u64,
        block_size: u64,
        supply: Option<&PowerSupply>,
    ) -> Self {
        let blocks = tracks * track_size / block_size;
        let meta_blocks = Layout::new(tracks).size().div_ceil(block_size);
        let dev = |suffix: &str, n| {
            let d = PowerCutBdev::new(&format!("{name}-{suffix}"), block_size as u32, n);
            Arc::new(match supply {
                Some(supply) => d.on_supply(supply),
                None => d,
            })
        };
        Self {
            p: dev("p", blocks),
            s: dev("s", blocks),
            m: dev("m", meta_blocks),
            track_size,
        }
    }

    /// What a power cut now leaves of them (only what was flushed).
    pub fn after_cut(&self, name: &str) -> Self {
        Self {
            p: Arc::new(self.p.durable_copy(&format!("{name}-p"))),
            s: Arc::new(self.s.durable_copy(&format!("{name}-s"))),
            m: Arc::new(self.m.durable_copy(&format!("{name}-m"))),
            track_size: self.track_size,
        }
    }

    /// Adds the devices to `engine` and makes pair `name` on them: new (`fresh`) or from
    /// the metadata they hold.
    pub fn create(&self, engine: &Engine, name: &str, fresh: bool) -> Arc<Pair> {
        engine
            .bdev_add(Arc::clone(&self.p) as Arc<dyn Bdev>)
            .unwrap();
        engine
            .bdev_add(Arc::clone(&self.s) as Arc<dyn Bdev>)
            .unwrap();
        let meta: Arc<dyn Bdev> = self.m.clone();
        let device = if fresh {
            MetadataDevice::Fresh(meta)
        } else {
            MetadataDevice::Existing(meta)
        };
        let config = PairConfig {
            name: name.into(),
            track_size: self.track_size,
            copy_rate: 0,
        };
        engine
            .pair_create_on(&config, &format!("{name}-p"), &format!("{name}-s"), device)
            .unwrap()
    }
}

/// Deletes pair `name` and its data devices from `engine` (the devices themselves stay).
pub fn remove(engine: &Engine, name: &str) {
    engine.pair_delete(name).unwrap();
    engine.bdev_delete(&format!("{name}-p")).unwrap();
    engine.bdev_delete(&format!("{name}-s")).unwrap();
}
