//! DMA memory for quicksplit.
//!
//! This crate owns every byte a device reads or writes directly: [`DmaRegion`]s mapped from 2 MiB
//! hugepages (or locked ordinary pages when none are reserved), the staging [`BufferPool`] of
//! fixed-size buffers handed out as owned [`DmaBuf`] handles without a lock (with a per-thread
//! [`BufferCache`] of recently freed ones in front), and the IOVA translation and [`DmaMapper`]
//! hook the VFIO NVMe driver uses to map regions into an IOMMU.

mod iova;
mod pool;
mod region;

pub use iova::{
    iova_of, live_regions, regions_generation, register_mapper, translate, unregister_mapper,
    DmaMapper, RegionInfo,
};
pub use pool::{BufferCache, BufferPool, DmaBuf, CACHE_IDLE_RELEASE};
pub use region::{DmaRegion, RegionSlice, HUGEPAGE_SIZE};

/// Errors of DMA memory management.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// A region of zero bytes was asked for.
    #[error("a DMA region cannot be empty")]
    ZeroLength,
    /// The size overflows when rounded up to hugepages.
    #[error("a DMA region of {0} bytes is too large")]
    TooLarge(usize),
    /// mmap refused the region.
    #[error("mapping {len} bytes of DMA memory failed: {source}")]
    Map {
        /// Bytes asked for.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// Buffer sizes are non-zero multiples of 4 KiB up to 256 MiB.
    #[error("buffer size {0} is not a non-zero multiple of 4096 up to 256 MiB")]
    BadBufferSize(usize),
    /// Buffer counts are between 1 and 2^32-1.
    #[error("buffer count {0} is out of range")]
    BadCount(usize),
    /// A range reaches outside its region or buffer.
    #[error("range {offset}+{len} is outside {size} bytes")]
    OutOfRange {
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// Size of the region or buffer.
        size: usize,
    },
    /// A device mapper (VFIO) refused a mapping.
    #[error("mapping DMA memory for a device failed: {0}")]
    Mapper(String),
}
