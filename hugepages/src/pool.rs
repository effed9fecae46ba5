//! The staging pool: fixed-size aligned buffers carved from DMA regions, handed out as owned
//! handles through a lock-free free list.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::region::DmaRegion;
use crate::{iova, DmaError};

/// How long a [`BufferCache`] whose owner has nothing in flight keeps its buffers.
pub const CACHE_IDLE_RELEASE: Duration = Duration::from_millis(10);

/// Largest region a pool maps in one piece: io_uring registers fixed buffers of at most 1 GiB.
const MAX_REGION: usize = 256 << 20;

struct PoolShared {
    regions: Vec<Arc<DmaRegion>>,
    buf_size: usize,
    bufs_per_region: usize,
    count: usize,
    free: ArrayQueue<u32>,
}

/// A pool of `count` buffers of `buf_size` bytes each (a multiple of 4 KiB, so 4 KiB aligned).
///
/// `get` and dropping a [`DmaBuf`] are lock-free (one push or pop on a bounded queue); a buffer
/// is in the free list or in exactly one handle, never both.
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("buf_size", &self.shared.buf_size)
            .field("count", &self.shared.count)
            .field("free", &self.shared.free.len())
            .finish()
    }
}

impl BufferPool {
    /// Maps the regions for `count` buffers of `buf_size` bytes and fills the free list.
    pub fn new(buf_size: usize, count: usize) -> Result<Self, DmaError> {
        if buf_size == 0 || !buf_size.is_multiple_of(4096) || buf_size > MAX_REGION {
            return Err(DmaError::BadBufferSize(buf_size));
        }
        if count == 0 || count > u32::MAX as usize {
            return Err(DmaError::BadCount(count));
        }
        let bufs_per_region = (MAX_REGION / buf_size).min(count);
        let mut regions = Vec::new();
        let mut left = count;
        while left > 0 {
            let n = left.min(bufs_per_region);
            let region = DmaRegion::allocate(n * buf_size)?;
            iova::register_region(&region);
            regions.push(Arc::new(region));
            left -= n;
        }
        let free = ArrayQueue::new(count);
        for i in 0..count {
            // Cannot fail: the queue holds exactly `count` slots.
            let _ = free.push(i as u32);
        }
        Ok(Self {
            shared: Arc::new(PoolShared {
                regions,
                buf_size,
                bufs_per_region,
                count,
                free,
            }),
        })
    }

    /// Takes a free buffer, its length set to its full capacity; `None` when all are in use.
    pub fn get(&self) -> Option<DmaBuf> {
        let index = self.shared.free.pop()?;
        Some(DmaBuf {
            shared: Arc::clone(&self.shared),
            index,
            len: self.shared.buf_size,
        })
    }

    /// Size of every buffer.
    pub fn buf_size(&self) -> usize {
        self.shared.buf_size
    }

    /// Total number of buffers.
    pub fn capacity(&self) -> usize {
        self.shared.count
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.shared.free.len()
    }

    /// The regions backing the pool (drivers register them with io_uring or VFIO).
    pub fn regions(&self) -> impl Iterator<Item = &DmaRegion> {
        self.shared.regions.iter().map(|r| r.as_ref())
    }
}

/// An owned buffer from a [`BufferPool`]. Submitting I/O moves it into the request and the
/// completion hands it back, so no reference to its bytes exists while a device writes them.
pub struct DmaBuf {
    shared: Arc<PoolShared>,
    index: u32,
    len: usize,
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish()
    }
}

impl DmaBuf {
    fn region(&self) -> &DmaRegion {
        &self.shared.regions[self.index as usize / self.shared.bufs_per_region]
    }

    fn offset_in_region(&self) -> usize {
        (self.index as usize % self.shared.bufs_per_region) * self.shared.buf_size
    }

    /// Address of the first byte, for drivers handing the buffer to a device.
    pub fn as_ptr(&self) -> *mut u8 {
        // The offset is below the region's length by construction of the pool.
        self.region().as_ptr().wrapping_add(self.offset_in_region())
    }

    /// Bytes in use (what an I/O transfers).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no byte is in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the underlying buffer.
    pub fn capacity(&self) -> usize {
        self.shared.buf_size
    }

    /// Sets the bytes in use; at most the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<(), DmaError> {
        if len > self.shared.buf_size {
            return Err(DmaError::OutOfRange {
                offset: 0,
                len,
                size: self.shared.buf_size,
            });
        }
        self.len = len;
        Ok(())
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the buffer's bytes lie inside a live region (the handle holds the pool, which
        // holds the region); this handle is the only one for this index (the free list hands an
        // index out once), and no device holds the buffer while the caller has the handle.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The bytes in use, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }

    /// The device-visible address of the first byte.
    pub fn iova(&self) -> u64 {
        iova::iova_of(self.as_ptr() as usize)
    }

    /// Id of the region the buffer lies in, and the buffer's byte offset inside it.
    pub fn region_id(&self) -> u64 {
        self.region().id()
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // Cannot fail: the queue has a slot for every buffer and this index is not in it.
        let _ = self.shared.free.push(self.index);
    }
}

/// A thread's stack of recently freed buffers in front of a [`BufferPool`], like the per-core
/// cache of a DPDK mempool. The pool's free list is first-in first-out, so a buffer taken from
/// it was last touched a whole pool ago and is cold in the CPU caches; a buffer taken back from
/// this stack was used a moment ago and copying into it does not miss.
///
/// Many caches share one pool (one per connection), so none may starve the others: a cache
/// stops keeping buffers when the pool runs short, and its owner's idle cache empties after
/// [`CACHE_IDLE_RELEASE`].
pub struct BufferCache {
    pool: BufferPool,
    stack: Vec<DmaBuf>,
    limit: usize,
    idle_since: Option<Instant>,
}

impl fmt::Debug for BufferCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferCache")
            .field("pool", &self.pool)
            .field("cached", &self.stack.len())
            .finish()
    }
}

impl BufferCache {
    /// A cache of at most `limit` buffers in front of `pool`.
    pub fn new(pool: BufferPool, limit: usize) -> Self {
        Self {
            pool,
            stack: Vec::with_capacity(limit),
            limit,
            idle_since: None,
        }
    }

    /// The most recently returned buffer, else one from the pool; its length set to its full
    /// capacity.
    pub fn get(&mut self) -> Option<DmaBuf> {
        match self.stack.pop() {
            Some(mut b) => {
                b.len = b.shared.buf_size;
                Some(b)
            }
            None => self.pool.get(),
        }
    }

    /// Keeps `buf` for the next `get`, or gives it back to its pool when the cache is full, the
    /// buffer belongs to another pool, or the pool is running short (under a quarter free):
    /// then other users of the pool need it more than this cache does.
    pub fn put(&mut self, buf: DmaBuf) {
        let shared = &self.pool.shared;
        if self.stack.len() < self.limit
            && Arc::ptr_eq(&buf.shared, shared)
            && shared.free.len() * 4 >= shared.count
        {
            self.stack.push(buf);
        }
    }

    /// [`BufferCache::put`] for each of `bufs`.
    pub fn put_all(&mut self, bufs: impl IntoIterator<Item = DmaBuf>) {
        for b in bufs {
            self.put(b);
        }
    }

    /// Buffers held in the cache.
    pub fn cached(&self) -> usize {
        self.stack.len()
    }

    /// Tells the cache, at time `now`, whether its owner has anything in flight. After
    /// [`CACHE_IDLE_RELEASE`] of idleness the cached buffers go back to the pool; while it still
    /// holds some, the answer is when to call again (the owner's wake-up).
    pub fn note_idle(&mut self, idle: bool, now: Instant) -> Option<Instant> {
        if !idle {
            self.idle_since = None;
            return None;
        }
        if self.stack.is_empty() {
            return None;
        }
        let due = *self.idle_since.get_or_insert(now) + CACHE_IDLE_RELEASE;
        if now >= due {
            self.release();
            None
        } else {
            Some(due)
        }
    }

    /// Gives every cached buffer back to the pool (an idle owner should not hold any).
    pub fn release(&mut self) {
        self.stack.clear();
    }

    /// Buffers `get` can hand out now: the cached ones and the pool's free ones.
    pub fn available(&self) -> usize {
        self.stack.len() + self.pool.available()
    }

    /// The pool behind the cache.
    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }
}
