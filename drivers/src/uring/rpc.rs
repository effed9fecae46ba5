//! `bdev_uring_create`: parameters and glue.

use std::path::PathBuf;

use serde::Deserialize;

use super::UringBdev;
use crate::bdev::BdevError;

/// Parameters of `bdev_uring_create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UringCreateParams {
    /// Name of the new bdev.
    pub name: String,
    /// File or block device.
    pub filename: PathBuf,
    /// Block size in bytes (default 4096).
    #[serde(default = "crate::default_block_size")]
    pub block_size: u32,
    /// Create or extend the file to this many bytes.
    #[serde(default)]
    pub size: Option<u64>,
}

/// Creates the bdev the parameters describe.
pub fn create(p: &UringCreateParams) -> Result<UringBdev, BdevError> {
    UringBdev::open(&p.name, &p.filename, p.block_size, p.size)
}
