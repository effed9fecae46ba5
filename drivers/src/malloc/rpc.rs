//! `bdev_malloc_create`: parameters and glue.

use serde::Deserialize;

use super::MallocBdev;
use crate::bdev::BdevError;

/// Parameters of `bdev_malloc_create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocCreateParams {
    /// Name of the new bdev.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes (default 4096).
    #[serde(default = "crate::default_block_size")]
    pub block_size: u32,
}

/// Creates the bdev the parameters describe.
pub fn create(p: &MallocCreateParams) -> Result<MallocBdev, BdevError> {
    MallocBdev::create(&p.name, p.size, p.block_size)
}
