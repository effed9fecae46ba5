//! The embedded default a `quicksplit serve` without a configuration starts with.

use std::sync::Arc;

use super::{AppError, Engine, EngineError};
use crate::pair::PairConfig;

/// Size of each volume of the embedded default.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

impl Engine {
    /// Creates the embedded default: sparse 1 GiB files `p0.img` and `s0.img` in the state
    /// directory as uring bdevs `p0` and `s0`, paired as `pair0`; NBD exports `p0` (read-write,
    /// through the pair) and `pair0-image` (read-only) on `<state-dir>/nbd.sock`.
    pub fn create_default(&self) -> Result<(), AppError> {
        let mut st = self.state();
        for name in ["p0", "s0"] {
            let path = self.state_dir.join(format!("{name}.img"));
            let bdev =
                drivers::uring::UringBdev::open(name, &path, 4096, Some(DEFAULT_VOLUME_SIZE))?;
            st.bdevs.add(Arc::new(bdev))?;
            st.files
                .insert(super::bdevs::FileOwner::Bdev(name.to_string()), &path);
        }
        drop(st);
        self.pair_create(
            &PairConfig {
                name: "pair0".into(),
                track_size: crate::pair::DEFAULT_TRACK_SIZE,
                copy_rate: 0,
            },
            "p0",
            "s0",
        )
        .map_err(|e| match e {
            EngineError::Bdev(b) => AppError::Bdev(b),
            other => AppError::Default(other.to_string()),
        })?;
        for (export, bdev, pair) in [
            ("p0", Some("p0"), None),
            ("pair0-image", None, Some("pair0")),
        ] {
            self.nbd_export_start(export, (bdev, pair), None, (None, false), None)
                .map_err(|e| AppError::Default(e.to_string()))?;
        }
        Ok(())
    }
}
