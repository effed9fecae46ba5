//! DMA regions: one mmap of 2 MiB hugepages, or of locked ordinary pages when no hugepages are
//! reserved. All raw memory calls of the crate live here.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rustix::mm::{MapFlags, ProtFlags};

use crate::DmaError;

/// Size of one hugepage; regions are rounded up to it either way so that IOVA mappings of a
/// region are always 2 MiB granular.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);
static NEXT_REGION_ID: AtomicU64 = AtomicU64::new(1);

/// A contiguous range of pinned memory a device may read and write.
///
/// The region never hands out references to its bytes: devices write it concurrently, and a Rust
/// reference to such memory would be undefined behaviour. Owned buffer handles
/// ([`crate::DmaBuf`]) give access to disjoint parts of it.
#[derive(Debug)]
pub struct DmaRegion {
    ptr: NonNull<u8>,
    len: usize,
    hugepages: bool,
    id: u64,
}

// SAFETY: the region is a plain address range owned by this value; it exposes only its address and
// length, and access to the bytes is disciplined by the owners of the buffers carved from it.
unsafe impl Send for DmaRegion {}
// SAFETY: as above; no method mutates the region through `&self`.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Maps `len` bytes (rounded up to 2 MiB) of hugepage memory, or locked ordinary pages when
    /// the kernel has no free hugepages (one warning per process).
    pub fn allocate(len: usize) -> Result<Self, DmaError> {
        if len == 0 {
            return Err(DmaError::ZeroLength);
        }
        let len = len
            .checked_next_multiple_of(HUGEPAGE_SIZE)
            .ok_or(DmaError::TooLarge(len))?;
        let id = NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed);
        if let Some(ptr) = map_anonymous(len, MapFlags::HUGETLB, true) {
            return Ok(Self {
                ptr,
                len,
                hugepages: true,
                id,
            });
        }
        // Not populated yet: transparent hugepages are asked for first, then mlock faults the
        // pages in (as 2 MiB pages where the kernel can), which cuts TLB misses on RAM disks.
        let ptr = map_anonymous(len, MapFlags::empty(), false).ok_or(DmaError::Map {
            len,
            source: std::io::Error::last_os_error(),
        })?;
        // SAFETY: advice on the mapping made just above; it changes no contents.
        let advised = unsafe {
            rustix::mm::madvise(ptr.as_ptr().cast(), len, rustix::mm::Advice::LinuxHugepage)
        };
        if let Err(err) = advised {
            tracing::debug!(%err, "transparent hugepages unavailable for DMA memory");
        }
        if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "no free 2 MiB hugepages (see /proc/sys/vm/nr_hugepages): DMA memory falls back \
                 to locked ordinary pages"
            );
        }
        // SAFETY: ptr..ptr+len is the mapping made just above, owned by nothing else.
        let locked = unsafe { rustix::mm::mlock(ptr.as_ptr().cast(), len) };
        if let Err(err) = locked {
            tracing::warn!(%err, len, "mlock of DMA memory failed: pages may be swapped");
        }
        Ok(Self {
            ptr,
            len,
            hugepages: false,
            id,
        })
    }

    /// First byte of the region.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a multiple of 2 MiB).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Regions are never empty; present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True when backed by hugepages, false for the locked-pages fallback.
    pub fn is_hugepage_backed(&self) -> bool {
        self.hugepages
    }

    /// A process-unique id, stable for the region's life (drivers key registrations on it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True when `addr..addr+len` lies inside the region.
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        let start = self.ptr.as_ptr() as usize;
        addr >= start && addr.saturating_add(len) <= start + self.len
    }
}

/// A byte range of a shared region read in place: a RAM disk's blocks handed to the kernel to
/// send without copying them into a staging buffer first. Holding it keeps the region mapped.
///
/// Like the region, it gives no Rust reference to its bytes (other threads may write them while
/// it is queued): only its address, for a system call to read, and copies.
#[derive(Debug, Clone)]
pub struct RegionSlice {
    region: Arc<DmaRegion>,
    offset: usize,
    len: usize,
}

impl RegionSlice {
    /// `len` bytes of `region` at `offset`; an error when the range leaves the region.
    pub fn new(region: Arc<DmaRegion>, offset: usize, len: usize) -> Result<Self, DmaError> {
        region.check_range(offset, len)?;
        Ok(Self {
            region,
            offset,
            len,
        })
    }

    /// Address of the first byte, valid while `self` lives.
    pub fn addr(&self) -> *const u8 {
        self.region.as_ptr().wrapping_add(self.offset).cast_const()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the bytes, in order, into `bufs` (staging buffers reserved for them); an error
    /// when the buffers hold more than the slice.
    pub fn read_into(&self, bufs: &mut [crate::DmaBuf]) -> Result<(), DmaError> {
        let mut at = 0;
        for b in bufs {
            self.read_at(at, b.as_mut_slice())?;
            at += b.len();
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes from `at` bytes into the slice into `dst`.
    pub fn read_at(&self, at: usize, dst: &mut [u8]) -> Result<(), DmaError> {
        match at.checked_add(dst.len()) {
            Some(end) if end <= self.len => self.region.read_at(self.offset + at, dst),
            _ => Err(DmaError::OutOfRange {
                offset: at,
                len: dst.len(),
                size: self.len,
            }),
        }
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        crate::iova::unregister_region(self.id);
        // SAFETY: the mapping was made by `map_anonymous` with exactly this address and length,
        // and every buffer handle into it keeps the region alive, so nothing uses it any more.
        let res = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        if let Err(err) = res {
            tracing::error!(%err, "munmap of a DMA region failed");
        }
    }
}

fn map_anonymous(len: usize, extra: MapFlags, populate: bool) -> Option<NonNull<u8>> {
    let populate = if populate {
        MapFlags::POPULATE
    } else {
        MapFlags::empty()
    };
    // SAFETY: an anonymous private mapping at an address the kernel chooses aliases no existing
    // Rust object; its result is checked before use.
    let res = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | populate | extra,
        )
    };
    res.ok().and_then(|p| NonNull::new(p.cast::<u8>()))
}

impl DmaRegion {
    /// Copies `src` into the region at `offset`.
    ///
    /// Callers (the malloc bdev) serialize conflicting accesses to a range the way a disk's
    /// users do; two writers of one range at once leave unspecified bytes, never memory outside
    /// the range.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), DmaError> {
        self.check_range(offset, src.len())?;
        // SAFETY: the range was checked to lie inside the mapping, which lives as long as `self`;
        // no Rust reference to region bytes exists (the region never hands one out), and `src`
        // is a distinct slice, so the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        };
        Ok(())
    }

    /// Copies `src` into the region at `offset` with stores that bypass the CPU caches, for a
    /// RAM disk: the bytes are not read again soon, so pulling each destination line into the
    /// cache first (what an ordinary copy does) costs a memory read per line for nothing and
    /// evicts data that is in use. Falls back to [`DmaRegion::write_at`] where the range is not
    /// 16-byte aligned or the CPU has no such stores.
    pub fn write_streaming_at(&self, offset: usize, src: &[u8]) -> Result<(), DmaError> {
        self.check_range(offset, src.len())?;
        #[cfg(target_arch = "x86_64")]
        {
            let dst = self.ptr.as_ptr().wrapping_add(offset);
            if (dst as usize).is_multiple_of(16) && src.len().is_multiple_of(64) {
                // SAFETY: the range is inside the mapping (checked above), apart from `src` (see
                // `write_at`), 16-byte aligned and a multiple of 64 long, as `stream_copy` needs.
                unsafe { stream_copy(dst, src) };
                return Ok(());
            }
        }
        self.write_at(offset, src)
    }

    /// Copies region bytes at `offset` into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DmaError> {
        self.check_range(offset, dst.len())?;
        // SAFETY: as in `write_at`; `dst` is an exclusive slice outside the region.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with zeroes.
    pub fn zero_at(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        self.check_range(offset, len)?;
        // SAFETY: as in `write_at`.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) };
        Ok(())
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DmaError::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }
}

/// Copies `src` to `dst` with non-temporal 16-byte stores, then fences them so they are
/// ordered before whatever the caller publishes next (the request's completion).
///
/// # Safety
/// `dst` must be 16-byte aligned, valid for `src.len()` bytes of writes and not overlap `src`;
/// `src.len()` must be a multiple of 64.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(dst: *mut u8, src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let s = src.as_ptr();
    let mut i = 0;
    while i < src.len() {
        for k in 0..4 {
            let at = i + 16 * k;
            // SAFETY: `at + 16 <= src.len()` (the length is a multiple of 64); the load takes
            // any alignment and the store's alignment is the caller's promise.
            unsafe {
                let v = _mm_loadu_si128(s.add(at).cast::<__m128i>());
                _mm_stream_si128(dst.add(at).cast::<__m128i>(), v);
            }
        }
        i += 64;
    }
    // SAFETY: a fence has no memory operands.
    unsafe { _mm_sfence() };
}
