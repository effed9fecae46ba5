//! quicksplit's block device layer, and the I/O paths of its backups.
//!
//! This crate owns:
//!
//! - [`bdev`]: the [`Bdev`] trait (a block device with per-reactor, polled [`IoChannel`]s), the
//!   requests and completions, and the [`ChannelContext`] a reactor gives the channels it opens
//!   (its eventfd and its epoll set, [`FdWatch`], so a parked reactor wakes for them);
//! - the drivers: [`malloc`] (a RAM disk in DMA memory), [`uring`] (a file or block device
//!   through io_uring), [`nvme`] (NVMe controllers driven from user space through VFIO) and
//!   [`nvmf`] (namespaces of remote controllers through its NVMe/TCP initiator; the PDUs and
//!   Fabrics commands there are shared with the engine's NVMe/TCP target), each with its RPC glue;
//! - [`table`]: the [`BdevTable`] of named bdevs with their claims, and the registry of create
//!   methods, filled explicitly with [`register`] (`bdev_nvme_attach_controller`, for both nvme
//!   and nvmf, is [`nvme::rpc`]);
//! - [`sink`]: the backup targets (a file or block device, a tape image in a file or on a tape
//!   device or pipe, an NBD export, an NVMe/TCP namespace);
//! - [`tape`]: the backup archive format (pax records and manifests) and the reader that restores
//!   and verifies archives;
//! - [`digest`]: the `sha256-tree` image digest (1 MiB chunks hashed apart, a root over their
//!   digests) and the file a backup's chunk digests are kept in;
//! - [`nbd`]: the NBD wire protocol, shared by the engine's NBD server and the NBD backup target's
//!   client;
//! - [`file_lock`]: the advisory locks on every file a bdev or a backup opens, compatible with
//!   QEMU's image locking;
//! - [`iostat`]: requests, bytes and latencies counted per channel (a wrapper every bdev in the
//!   table, export and pair view goes through) and summed on request, as SPDK's
//!   `bdev_get_iostat` reports them;
//! - [`iov`]: gathering queued pieces into iovecs for vectored socket writes, and [`in_place`]:
//!   a RAM disk's reads sent from its memory, with the stripe locks that keep blocks whole;
//! - [`testing`]: fault-injecting wrappers for tests (delays and I/O errors, power cuts), not
//!   drivers.

pub mod bdev;
pub mod digest;
pub mod file_lock;
pub mod in_place;
pub mod iostat;
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
    push_extent, Allocation, Bdev, BdevError, ChannelContext, Extent, FdWatch, Geometry, IoBufs,
    IoChannel, IoCompletion, IoError, IoOp, IoRequest, SubmitError, SubmitErrorKind, SubmitResult,
    MAX_QUERY_EXTENTS,
};
pub use table::{register, BdevInfo, BdevIoStat, BdevTable, CreateError, DriverRegistry};

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
