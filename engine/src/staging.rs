//! Staging buffers shared by everything a reactor runs: the copiers' track buffers and the pair
//! channels' copy-before-write and bounce buffers come from one pool per buffer size on each
//! reactor thread, not from a region of their own, so a pair costs no locked memory while it
//! copies nothing. A pool is bounded; a copier or a request that finds it empty waits for a
//! buffer to come back, as they did with pools of their own.

use std::cell::RefCell;
use std::collections::HashMap;

use hugepages::{BufferPool, DmaError};

/// Bytes a thread's pool of one buffer size holds.
const POOL_BYTES: usize = 32 << 20;
/// Buffers a pool holds at least, whatever their size: a copier's urgent depth.
const MIN_BUFFERS: usize = 32;

thread_local! {
    static POOLS: RefCell<HashMap<usize, BufferPool>> = RefCell::new(HashMap::new());
}

/// The calling thread's pool of `buf_size`-byte buffers, made on first use.
pub fn shared_pool(buf_size: usize) -> Result<BufferPool, DmaError> {
    POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        if let Some(pool) = pools.get(&buf_size) {
            return Ok(pool.clone());
        }
        let count = (POOL_BYTES / buf_size.max(1)).max(MIN_BUFFERS);
        let pool = BufferPool::new(buf_size, count)?;
        pools.insert(buf_size, pool.clone());
        Ok(pool)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_per_size_per_thread() {
        let a = shared_pool(65536).unwrap();
        let b = shared_pool(65536).unwrap();
        let held = a.get().unwrap();
        assert_eq!(a.available(), b.available(), "the same pool");
        assert_eq!(a.available() + 1, (POOL_BYTES / 65536).max(MIN_BUFFERS));
        drop(held);
        let other = std::thread::spawn(|| shared_pool(65536).unwrap().available())
            .join()
            .unwrap();
        assert_eq!(other, a.available(), "another thread's pool is whole");
        let big = shared_pool(4 << 20).unwrap();
        assert_eq!(big.available(), MIN_BUFFERS);
    }
}
