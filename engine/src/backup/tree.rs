//! The backup's `sha256-tree` digest ([`drivers::digest`]), hashed in parallel: once the target
//! has written a piece (1 MiB, one chunk of the tree, aligned on a chunk), its buffers go into
//! one lock-free ring that a hashing poller on every reactor takes from. Each poller hashes at
//! most [`HASH_SLICE`] bytes per turn (a chunk takes several turns), so a reactor's host
//! connections wait no longer than that, and chunks hash on as many cores as the engine has.
//! The chunk digests land in their slots in any order; the transferrer feeds them to the root in
//! order as they come ([`TreeHash::advance_root`]), a few thousand per turn.
//!
//! When the flat SHA-256 is asked for too, a hashed piece goes on to its poller
//! ([`HashQueue`]), which takes the pieces in image order; the buffers go back to their pool
//! once both are done with them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crossbeam_queue::ArrayQueue;
use drivers::digest::{
    chunk_count, ChunkDigest, ChunkDigests, ChunkHasher, RootBuilder, TreeRoot, TREE_CHUNK_SIZE,
};
use drivers::IoBufs;

use super::hasher::{HashQueue, HASH_SLICE};
use crate::reactor::{PollStatus, Poller, ReactorContext, ReactorHandle};

/// Chunk digests fed to the root per call of [`TreeHash::advance_root`] at most (256 KiB of
/// SHA-256 input, as a hashing poller's slice).
const ROOT_SLICE: u64 = HASH_SLICE / 32;

/// The chunk digests, filled in any order.
struct Slots {
    digests: Vec<ChunkDigest>,
    ready: Vec<bool>,
    /// The root so far, over the chunks before `next`.
    root: RootBuilder,
    next: u64,
    /// The result has been taken.
    taken: bool,
}

/// What the transferrer and the hashing pollers share.
pub struct TreeHash {
    ring: ArrayQueue<(u64, IoBufs)>,
    size: u64,
    chunks: u64,
    slots: Mutex<Slots>,
    hashed: AtomicU64,
    stop: AtomicBool,
    reactors: Vec<ReactorHandle>,
    flat: Option<Arc<HashQueue>>,
}

impl TreeHash {
    /// Starts a hashing poller on each of `reactors` for an image of `size` bytes; hashed pieces
    /// go on to `flat` when given. `known` holds, by chunk, the digests of the chunks the backup
    /// does not store (zeros, or its base's; `None` for a chunk it hashes; empty when it hashes
    /// every one). Called on a control thread: the slots of a large image take a moment to
    /// allocate.
    pub fn start(
        reactors: &[ReactorHandle],
        size: u64,
        flat: Option<Arc<HashQueue>>,
        known: Vec<Option<ChunkDigest>>,
    ) -> Result<Arc<Self>, String> {
        let chunks = chunk_count(size);
        let n = match usize::try_from(chunks) {
            Ok(n) if known.is_empty() || known.len() == n => n,
            _ => {
                if let Some(f) = &flat {
                    f.stop();
                }
                return Err(format!(
                    "an image of {size} bytes has too many chunks, or not {} known",
                    known.len()
                ));
            }
        };
        let mut digests = vec![[0; 32]; n];
        let mut ready = vec![false; n];
        let mut preset = 0;
        for (i, d) in known.into_iter().enumerate() {
            if let Some(d) = d {
                digests[i] = d;
                ready[i] = true;
                preset += 1;
            }
        }
        let q = Arc::new(Self {
            ring: ArrayQueue::new(4096),
            size,
            chunks,
            slots: Mutex::new(Slots {
                digests,
                ready,
                root: RootBuilder::default(),
                next: 0,
                taken: false,
            }),
            hashed: AtomicU64::new(preset),
            stop: AtomicBool::new(false),
            reactors: reactors.to_vec(),
            flat,
        });
        for r in reactors {
            let poller_q = Arc::clone(&q);
            let sent = r.send_blocking(Box::new(move |cx| {
                let name = format!("backup_tree_hash:{}", cx.index());
                cx.add_poller(Box::new(TreeHashPoller {
                    q: poller_q,
                    current: None,
                    hasher: ChunkHasher::default(),
                    to_flat: VecDeque::new(),
                    name,
                }))
            }));
            if let Err(e) = sent {
                q.stop();
                return Err(e.to_string());
            }
        }
        Ok(q)
    }

    /// Hands over a written piece (chunk-aligned); gives it back when the ring is full.
    pub fn push(&self, offset: u64, bufs: IoBufs) -> Result<(), (u64, IoBufs)> {
        self.ring.push((offset, bufs))?;
        for r in &self.reactors {
            r.wake_if_parked();
        }
        Ok(())
    }

    /// The flat SHA-256's queue, when asked for.
    pub fn flat(&self) -> Option<&Arc<HashQueue>> {
        self.flat.as_ref()
    }

    /// The backup ended early: the pollers stop (the flat SHA-256's too).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(f) = &self.flat {
            f.stop();
        }
        for r in &self.reactors {
            r.wake_if_parked();
        }
    }

    /// Feeds the root the chunk digests that are ready in order (a bounded number per call);
    /// once every chunk is in, gives the root and the chunk digests (once).
    pub fn advance_root(&self) -> Option<(TreeRoot, ChunkDigests)> {
        let mut s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let end = self.chunks.min(s.next + ROOT_SLICE);
        while s.next < end && s.ready[s.next as usize] {
            let d = s.digests[s.next as usize];
            s.root.push(&d);
            s.next += 1;
        }
        if s.next < self.chunks || s.taken {
            return None;
        }
        s.taken = true;
        let root = std::mem::take(&mut s.root).finish();
        let digests = std::mem::take(&mut s.digests);
        drop(s);
        ChunkDigests::new(self.size, digests).map(|d| (root, d))
    }

    fn complete(&self, chunk: u64, digest: ChunkDigest) {
        let i = chunk as usize;
        let mut s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if i >= s.ready.len() {
            tracing::error!(
                chunk,
                chunks = self.chunks,
                "a chunk beyond the image was hashed"
            );
            return;
        }
        if !s.ready[i] {
            s.ready[i] = true;
            s.digests[i] = digest;
            self.hashed.fetch_add(1, Ordering::Release);
        }
    }

    fn all_hashed(&self) -> bool {
        self.hashed.load(Ordering::Acquire) >= self.chunks
    }
}

/// A piece being hashed: its next buffer, the byte in it, and the chunk that byte belongs to.
struct Work {
    offset: u64,
    bufs: IoBufs,
    buf: usize,
    at: usize,
    chunk: u64,
}

struct TreeHashPoller {
    q: Arc<TreeHash>,
    current: Option<Work>,
    hasher: ChunkHasher,
    /// Hashed pieces waiting for room in the flat SHA-256's ring.
    to_flat: VecDeque<(u64, IoBufs)>,
    name: String,
}

impl TreeHashPoller {
    /// Hashes up to `budget` bytes of the current piece; the bytes hashed.
    fn hash_some(&mut self, w: &mut Work, budget: usize) -> usize {
        let mut used = 0;
        while w.buf < w.bufs.len() && used < budget {
            let data = &w.bufs[w.buf].as_slice()[w.at..];
            let room = (TREE_CHUNK_SIZE - self.hasher.bytes()) as usize;
            let take = data.len().min(budget - used).min(room);
            self.hasher.update(&data[..take]);
            w.at += take;
            used += take;
            if self.hasher.bytes() == TREE_CHUNK_SIZE {
                self.q.complete(w.chunk, self.hasher.finish_reset());
                w.chunk += 1;
            }
            if w.at == w.bufs[w.buf].len() {
                w.buf += 1;
                w.at = 0;
            }
        }
        used
    }

    /// A piece fully hashed: its short last chunk (the image's end) completes, and its buffers
    /// go on to the flat SHA-256, or back to their pool.
    fn piece_done(&mut self, w: Work) {
        if self.hasher.bytes() > 0 {
            let len: u64 = w.bufs.iter().map(|b| b.len() as u64).sum();
            debug_assert_eq!(w.offset + len, self.q.size, "a piece ends inside a chunk");
            self.q.complete(w.chunk, self.hasher.finish_reset());
        }
        if let Some(f) = self.q.flat() {
            if let Err(back) = f.push(w.offset, w.bufs) {
                self.to_flat.push_back(back);
            }
        }
    }
}

impl Poller for TreeHashPoller {
    fn poll(&mut self, _cx: &mut ReactorContext) -> PollStatus {
        if self.q.stop.load(Ordering::SeqCst) {
            return PollStatus::Done;
        }
        let mut busy = false;
        if let Some(f) = self.q.flat.clone() {
            while let Some((offset, bufs)) = self.to_flat.pop_front() {
                if let Err(back) = f.push(offset, bufs) {
                    self.to_flat.push_front(back);
                    break;
                }
                busy = true;
            }
        }
        let mut budget = HASH_SLICE as usize;
        while budget > 0 {
            let mut w = match self.current.take() {
                Some(w) => w,
                None => match self.q.ring.pop() {
                    Some((offset, bufs)) => Work {
                        offset,
                        bufs,
                        buf: 0,
                        at: 0,
                        chunk: offset / TREE_CHUNK_SIZE,
                    },
                    None => break,
                },
            };
            budget -= self.hash_some(&mut w, budget).min(budget);
            busy = true;
            if w.buf == w.bufs.len() {
                self.piece_done(w);
            } else {
                self.current = Some(w);
            }
        }
        if self.q.all_hashed() && self.current.is_none() && self.to_flat.is_empty() {
            return PollStatus::Done;
        }
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The chunk digests of a backup being made durable, by a thread of their own (the reactor never
/// waits for a disk); the thread wakes the reactor when it is done.
pub struct Seal {
    path: std::path::PathBuf,
    answer: Option<std::sync::mpsc::Receiver<Result<(), String>>>,
    /// The file may be there (written, or its writer died half-way).
    written: bool,
}

/// Where a [`Seal`] stands.
pub enum Sealed {
    /// Still writing.
    Pending,
    /// Durable.
    Done,
    /// Could not be written.
    Failed(String),
}

impl Seal {
    /// A seal for the chunk digest file at `path`; nothing written yet.
    pub fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            answer: None,
            written: false,
        }
    }

    /// Starts writing `digests`; `reactor` is woken when the file is durable (or failed).
    pub fn start(&mut self, digests: ChunkDigests, reactor: ReactorHandle) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("backup-digests".into())
            .spawn(move || {
                let written = digests.write_durably(&path).map_err(|e| e.to_string());
                let _ = tx.send(written);
                reactor.wake_if_parked();
            })
            .map_err(|e| format!("no thread to keep the chunk digests: {e}"))?;
        self.answer = Some(rx);
        Ok(())
    }

    /// Where the writing stands (`Done` also when nothing was started).
    pub fn poll(&mut self) -> Sealed {
        use std::sync::mpsc::TryRecvError;
        let Some(rx) = self.answer.as_ref() else {
            return Sealed::Done;
        };
        let outcome = match rx.try_recv() {
            Err(TryRecvError::Empty) => return Sealed::Pending,
            Ok(Ok(())) => {
                self.written = true;
                Sealed::Done
            }
            Ok(Err(e)) => Sealed::Failed(e),
            Err(TryRecvError::Disconnected) => {
                self.written = true;
                Sealed::Failed("the chunk digests' writer went away".into())
            }
        };
        self.answer = None;
        outcome
    }

    /// For a backup that does not complete: true once no writer runs, its file removed (only a
    /// done backup has chunk digests).
    pub fn discard(&mut self) -> bool {
        if matches!(self.poll(), Sealed::Pending) {
            return false;
        }
        if self.written {
            let _ = std::fs::remove_file(&self.path);
            self.written = false;
        }
        true
    }
}
