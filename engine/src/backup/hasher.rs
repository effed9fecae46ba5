//! The backup's flat SHA-256 (`flat_sha256`), computed off the transferrer's reactor when there
//! is another: once the tree digest's pollers ([`super::tree`]) have hashed a piece, its
//! buffers travel over a lock-free ring to a poller on that reactor, which feeds them to the
//! SHA-256 in image order and lets them go back to their pool. The transferrer keeps streaming
//! (and computes the per-chunk CRC-32C, which costs a tenth as much) meanwhile; the backup
//! closes once all are done. One SHA-256 stream is one core's work at most: that bounds a
//! backup that asks for it to what one core hashes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crossbeam_queue::ArrayQueue;
use drivers::tape::ImageSha;
use drivers::IoBufs;

use crate::reactor::{PollStatus, Poller, ReactorContext, ReactorHandle};

/// Bytes hashed per poll at most (a buffer is never split): the reactor's other pollers, hosts'
/// connections among them, wait no longer than this takes, about 0.15 ms at 1.8 GB/s, instead
/// of the whole backlog's time.
pub(super) const HASH_SLICE: u64 = 256 << 10;

/// What the transferrer and the hashing poller share.
pub struct HashQueue {
    ring: ArrayQueue<(u64, IoBufs)>,
    hashed: AtomicU64,
    /// The SHA-256 (hex) once the whole image is hashed.
    result: Mutex<Option<String>>,
    stop: AtomicBool,
    reactor: ReactorHandle,
}

impl HashQueue {
    /// Starts a hashing poller for an image of `size` bytes on `reactor`.
    pub fn start(reactor: ReactorHandle, size: u64) -> Result<Arc<Self>, String> {
        let q = Arc::new(Self {
            ring: ArrayQueue::new(4096),
            hashed: AtomicU64::new(0),
            result: Mutex::new(None),
            stop: AtomicBool::new(false),
            reactor: reactor.clone(),
        });
        let poller_q = Arc::clone(&q);
        reactor
            .send_blocking(Box::new(move |cx| {
                cx.add_poller(Box::new(HashPoller {
                    q: poller_q,
                    sha: Some(ImageSha::default()),
                    next: 0,
                    size,
                    waiting: BTreeMap::new(),
                    current: None,
                }))
            }))
            .map_err(|e| e.to_string())?;
        Ok(q)
    }

    /// Hands over a written piece; gives it back when the ring is full.
    pub fn push(&self, offset: u64, bufs: IoBufs) -> Result<(), (u64, IoBufs)> {
        self.ring.push((offset, bufs))?;
        self.reactor.wake_if_parked();
        Ok(())
    }

    /// Bytes hashed so far (in order from the start).
    pub fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Acquire)
    }

    /// The SHA-256 (hex) once the whole image is hashed.
    pub fn take_result(&self) -> Option<String> {
        self.result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The backup ended early: the poller stops.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.reactor.wake_if_parked();
    }
}

struct HashPoller {
    q: Arc<HashQueue>,
    sha: Option<ImageSha>,
    next: u64,
    size: u64,
    waiting: BTreeMap<u64, IoBufs>,
    /// The piece being hashed and its next buffer.
    current: Option<(IoBufs, usize)>,
}

impl Poller for HashPoller {
    fn poll(&mut self, _cx: &mut ReactorContext) -> PollStatus {
        if self.q.stop.load(Ordering::SeqCst) {
            return PollStatus::Done;
        }
        let mut busy = false;
        while let Some((offset, bufs)) = self.q.ring.pop() {
            self.waiting.insert(offset, bufs);
            busy = true;
        }
        let mut budget = HASH_SLICE;
        while budget > 0 {
            if self.current.is_none() {
                self.current = self.waiting.remove(&self.next).map(|bufs| (bufs, 0));
            }
            let (Some((bufs, i)), Some(d)) = (self.current.as_mut(), self.sha.as_mut()) else {
                break;
            };
            while *i < bufs.len() && budget > 0 {
                let b = bufs[*i].as_slice();
                d.update(b);
                self.next += b.len() as u64;
                budget = budget.saturating_sub(b.len() as u64);
                *i += 1;
            }
            if *i == bufs.len() {
                // The piece's buffers go back to their pool.
                self.current = None;
            }
            self.q.hashed.store(self.next, Ordering::Release);
            busy = true;
        }
        if self.next >= self.size {
            if let Some(d) = self.sha.take() {
                *self.q.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(d.finish());
            }
            return PollStatus::Done;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        "backup_hash"
    }
}
