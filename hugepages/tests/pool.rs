//! The staging pool never hands out one buffer twice, also under two threads at once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hugepages::{BufferCache, BufferPool, DmaRegion, CACHE_IDLE_RELEASE};

#[test]
fn every_buffer_is_distinct_aligned_and_returned() {
    let pool = BufferPool::new(8192, 300).unwrap();
    let bufs: Vec<_> = (0..300).map(|_| pool.get().unwrap()).collect();
    assert!(pool.get().is_none(), "a 301st buffer from a pool of 300");
    let addrs: HashSet<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
    assert_eq!(addrs.len(), 300);
    for b in &bufs {
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(hugepages::translate(b.as_ptr() as usize, b.capacity()).is_some());
    }
    // Buffers never overlap.
    let mut sorted: Vec<usize> = addrs.into_iter().collect();
    sorted.sort();
    assert!(sorted.windows(2).all(|w| w[1] - w[0] >= 8192));
    drop(bufs);
    assert_eq!(pool.available(), 300);
}

#[test]
fn two_threads_never_share_a_buffer() {
    let pool = BufferPool::new(4096, 64).unwrap();
    // One owner flag per buffer slot, indexed by address.
    let base = pool.regions().map(|r| r.as_ptr() as usize).min().unwrap();
    let owners: Arc<Vec<AtomicU8>> = Arc::new((0..64 * 2).map(|_| AtomicU8::new(0)).collect());
    let threads: Vec<_> = (1..=2u8)
        .map(|me| {
            let (pool, owners) = (pool.clone(), Arc::clone(&owners));
            std::thread::spawn(move || {
                for round in 0..20_000 {
                    let mut held = Vec::new();
                    for _ in 0..(round % 7 + 1) {
                        if let Some(mut b) = pool.get() {
                            let slot = (b.as_ptr() as usize - base) / 4096;
                            let prev = owners[slot].swap(me, Ordering::SeqCst);
                            assert_eq!(prev, 0, "buffer {slot} handed to two owners");
                            b.as_mut_slice()[0] = me;
                            held.push((slot, b));
                        }
                    }
                    for (slot, b) in held {
                        assert_eq!(b.as_slice()[0], me);
                        owners[slot].store(0, Ordering::SeqCst);
                        drop(b);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(pool.available(), 64);
}

#[test]
fn regions_round_to_hugepages_and_bounds_are_checked() {
    let r = DmaRegion::allocate(5000).unwrap();
    assert_eq!(r.len(), hugepages::HUGEPAGE_SIZE);
    r.write_at(0, &[1, 2, 3]).unwrap();
    let mut out = [0u8; 3];
    r.read_at(0, &mut out).unwrap();
    assert_eq!(out, [1, 2, 3]);
    assert!(r.write_at(r.len() - 1, &[1, 2]).is_err());
    assert!(r.read_at(usize::MAX, &mut out).is_err());
    assert!(DmaRegion::allocate(0).is_err());
    assert!(BufferPool::new(1000, 4).is_err());
    assert!(BufferPool::new(4096, 0).is_err());
}

#[test]
fn cache_hands_back_the_last_freed_buffer_and_returns_the_rest_to_the_pool() {
    let pool = BufferPool::new(4096, 8).unwrap();
    let mut cache = BufferCache::new(pool.clone(), 2);
    let held: Vec<_> = (0..4).map(|_| cache.get().unwrap()).collect();
    let addrs: Vec<usize> = held.iter().map(|b| b.as_ptr() as usize).collect();
    assert_eq!(cache.available(), 4);
    let mut held = held.into_iter();
    for b in held.by_ref().take(3) {
        let mut b = b;
        b.set_len(100).unwrap();
        cache.put(b);
    }
    // Two kept by the cache, the third went back to the pool.
    assert_eq!(pool.available(), 5);
    assert_eq!(cache.available(), 7);
    let again = cache.get().unwrap();
    assert_eq!(again.as_ptr() as usize, addrs[1], "last kept, first given");
    assert_eq!(again.len(), 4096, "length reset to the capacity");
    // A buffer of another pool is never kept.
    let other = BufferPool::new(4096, 1).unwrap();
    cache.put(other.get().unwrap());
    assert_eq!(other.available(), 1);
    drop((again, held, cache));
    assert_eq!(pool.available(), 8);
}

#[test]
fn caches_stop_keeping_buffers_when_the_pool_runs_short_and_release_when_idle() {
    let pool = BufferPool::new(4096, 8).unwrap();
    let mut busy = BufferCache::new(pool.clone(), 8);
    let mut held: Vec<_> = (0..7).map(|_| busy.get().unwrap()).collect();
    // One free in eight: under a quarter, so a freed buffer goes back to the pool.
    busy.put(held.pop().unwrap());
    assert_eq!(pool.available(), 2, "returned, not cached");
    busy.put(held.pop().unwrap());
    assert_eq!(pool.available(), 2, "two free of eight: cached");
    assert_eq!(busy.available(), 3);
    // Another cache on the same pool still gets buffers once this one releases.
    let mut other = BufferCache::new(pool.clone(), 8);
    let a = other.get().unwrap();
    let b = other.get().unwrap();
    assert!(other.get().is_none());
    busy.release();
    assert!(other.get().is_some());
    drop((a, b, held));
}

#[test]
fn streaming_writes_land_like_ordinary_ones() {
    let region = DmaRegion::allocate(1 << 16).unwrap();
    let src: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    // Aligned and a multiple of 64: the streaming path; then unaligned offsets and odd
    // lengths, which fall back to an ordinary copy.
    for (offset, len) in [
        (4096, 4096),
        (0, 64),
        (8192, 8192),
        (17, 4096),
        (40960, 100),
    ] {
        region.write_streaming_at(offset, &src[..len]).unwrap();
        let mut back = vec![0u8; len];
        region.read_at(offset, &mut back).unwrap();
        assert_eq!(back, src[..len], "offset {offset} length {len}");
    }
    assert!(region
        .write_streaming_at(region.len() - 64, &src[..128])
        .is_err());
}

#[test]
fn an_idle_owner_s_cache_empties_after_the_idle_delay() {
    let pool = BufferPool::new(4096, 8).unwrap();
    let mut cache = BufferCache::new(pool.clone(), 4);
    let b = cache.get().unwrap();
    cache.put(b);
    assert_eq!(cache.cached(), 1);
    assert_eq!(
        cache.note_idle(false, Instant::now()),
        None,
        "busy: nothing to do"
    );
    let due = cache
        .note_idle(true, Instant::now())
        .expect("a wake-up to release at");
    assert_eq!(cache.cached(), 1, "kept for the idle delay");
    // Busy again in between: the delay starts over.
    cache.note_idle(false, Instant::now());
    std::thread::sleep(CACHE_IDLE_RELEASE + std::time::Duration::from_millis(5));
    let again = cache.note_idle(true, Instant::now()).expect("a new delay");
    assert!(again > due);
    std::thread::sleep(CACHE_IDLE_RELEASE + std::time::Duration::from_millis(5));
    assert_eq!(cache.note_idle(true, Instant::now()), None);
    assert_eq!(cache.cached(), 0);
    assert_eq!(pool.available(), 8);
}
