//! Address translation for devices: the IOVA of a DMA address, and the hook through which a VFIO
//! container learns about every region so it can map it.
//!
//! quicksplit maps DMA memory into IOMMUs with IOVA equal to the process's virtual address (as
//! SPDK does with VFIO), so translation is the identity on addresses inside registered regions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::region::DmaRegion;
use crate::DmaError;

/// Something that makes regions visible to a device (a VFIO container).
pub trait DmaMapper: Send + Sync {
    /// Makes `vaddr..vaddr+len` reachable by the device at `iova`.
    fn map(&self, vaddr: usize, len: usize, iova: u64) -> Result<(), DmaError>;
    /// Undoes `map`.
    fn unmap(&self, iova: u64, len: usize);
}

#[derive(Clone, Copy)]
struct RegionEntry {
    id: u64,
    addr: usize,
    len: usize,
}

struct Registry {
    regions: Vec<RegionEntry>,
    mappers: Vec<Arc<dyn DmaMapper>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    regions: Vec::new(),
    mappers: Vec::new(),
});

/// Bumped whenever a region comes or goes, so a driver that registers regions up front (an
/// io_uring ring) knows when to look at the list again without taking the lock.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The current generation of the region list: it changes whenever a region is made or
/// unmapped.
pub fn regions_generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    let mut guard = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    f(&mut guard)
}

/// The IOVA of an address inside a DMA region.
pub fn iova_of(vaddr: usize) -> u64 {
    vaddr as u64
}

/// The IOVA of `vaddr..vaddr+len` if it lies inside one registered region.
pub fn translate(vaddr: usize, len: usize) -> Option<u64> {
    with_registry(|r| {
        r.regions
            .iter()
            .any(|e| vaddr >= e.addr && vaddr.saturating_add(len) <= e.addr + e.len)
            .then_some(iova_of(vaddr))
    })
}

/// Records a new region and maps it into every registered mapper.
pub(crate) fn register_region(region: &DmaRegion) {
    let entry = RegionEntry {
        id: region.id(),
        addr: region.as_ptr() as usize,
        len: region.len(),
    };
    with_registry(|r| {
        for m in &r.mappers {
            if let Err(err) = m.map(entry.addr, entry.len, iova_of(entry.addr)) {
                tracing::error!(%err, "mapping a new DMA region for a device failed");
            }
        }
        r.regions.push(entry);
        GENERATION.fetch_add(1, Ordering::Release);
    });
}

/// Forgets a region (called when it is unmapped).
pub(crate) fn unregister_region(id: u64) {
    with_registry(|r| {
        if let Some(pos) = r.regions.iter().position(|e| e.id == id) {
            let e = r.regions.swap_remove(pos);
            GENERATION.fetch_add(1, Ordering::Release);
            for m in &r.mappers {
                m.unmap(iova_of(e.addr), e.len);
            }
        }
    });
}

/// Registers a mapper: every live region is mapped now, and every later one when it is made.
pub fn register_mapper(mapper: Arc<dyn DmaMapper>) -> Result<(), DmaError> {
    with_registry(|r| {
        for e in &r.regions {
            mapper.map(e.addr, e.len, iova_of(e.addr))?;
        }
        r.mappers.push(mapper);
        Ok(())
    })
}

/// Removes a mapper (by identity), unmapping every region from it.
pub fn unregister_mapper(mapper: &Arc<dyn DmaMapper>) {
    with_registry(|r| {
        if let Some(pos) = r.mappers.iter().position(|m| Arc::ptr_eq(m, mapper)) {
            let m = r.mappers.swap_remove(pos);
            for e in &r.regions {
                m.unmap(iova_of(e.addr), e.len);
            }
        }
    });
}

/// A live region as drivers see it: id, address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region's id ([`DmaRegion::id`]).
    pub id: u64,
    /// First byte.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Every live region, for drivers that register memory up front (io_uring fixed buffers).
pub fn live_regions() -> Vec<RegionInfo> {
    with_registry(|r| {
        r.regions
            .iter()
            .map(|e| RegionInfo {
                id: e.id,
                addr: e.addr,
                len: e.len,
            })
            .collect()
    })
}
