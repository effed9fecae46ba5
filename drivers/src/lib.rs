//! quicksplit's block device layer.
//!
//! This crate owns the [`Bdev`] trait (a block device with per-reactor, polled [`IoChannel`]s),
//! the drivers (`malloc`, `uring`), the [`BdevTable`] of named bdevs with their claims, and each
//! driver's RPC glue. Drivers register their create methods explicitly with [`register`].

pub mod bdev;
pub mod iov;
pub mod malloc;
pub mod nbd;
pub mod nvme;
pub mod nvmf;
pub mod sink;
pub mod table;
pub mod tape;
pub mod testing;
pub mod uring;

pub use bdev::{
    Bdev, BdevError, ChannelContext, FdWatch, Geometry, IoBufs, IoChannel, IoCompletion, IoError,
    IoOp, IoRequest, SubmitError, SubmitErrorKind, SubmitResult,
};
pub use table::{register, BdevInfo, BdevTable, CreateError, DriverRegistry};

pub(crate) fn default_block_size() -> u32 {
    4096
}

/// Checks a requested size and block size and gives the geometry.
pub fn check_geometry(size: u64, block_size: u32) -> Result<Geometry, BdevError> {
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(BdevError::Invalid(format!(
            "block_size {block_size} is not a power of two between 512 and 65536"
        )));
    }
    if size == 0 || !size.is_multiple_of(block_size as u64) {
        return Err(BdevError::Invalid(format!(
            "size {size} is not a non-zero multiple of the block size {block_size}"
        )));
    }
    Ok(Geometry {
        block_size,
        num_blocks: size / block_size as u64,
    })
}
