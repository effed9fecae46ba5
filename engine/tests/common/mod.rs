//! Helpers shared by the engine's integration tests: an engine on two adaptive reactors, and
//! running a batch of I/Os on a reactor through a poller (never blocking the reactor).

#![allow(dead_code)]

pub mod cut_pair;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use drivers::{Bdev, IoBufs, IoChannel, IoError, IoRequest};
use engine::app::Engine;
use engine::reactor::{IdlePolicy, PollStatus, Poller, ReactorContext, ReactorOptions};
use hugepages::BufferPool;

/// An engine on cores 0 and 1, adaptive, with its state in a fresh temp dir.
pub fn engine(tag: &str) -> Arc<Engine> {
    let dir = std::env::temp_dir().join(format!(
        "qs-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    Engine::start(
        &ReactorOptions {
            cores: vec![0, 1],
            idle: IdlePolicy::Adaptive,
            inbox_size: 256,
        },
        &dir,
    )
    .unwrap()
}

/// One I/O of a batch.
#[derive(Debug, Clone)]
pub enum Op {
    /// Read `len` bytes at the offset.
    Read(u64, usize),
    /// Write the bytes at the offset.
    Write(u64, Vec<u8>),
    /// Write the bytes at the offset with FUA (durable when acknowledged).
    WriteFua(u64, Vec<u8>),
}

/// What each I/O of a batch gave: the data read (empty for writes) or the error.
pub type Outcomes = Vec<Result<Vec<u8>, IoError>>;

struct Batch {
    bdev: Arc<dyn Bdev>,
    ops: Vec<Op>,
    channel: Option<Box<dyn IoChannel>>,
    results: Vec<Option<Result<Vec<u8>, IoError>>>,
    next: usize,
    left: usize,
    pool: BufferPool,
    tx: Option<mpsc::SyncSender<Outcomes>>,
}

impl Poller for Batch {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.channel.is_none() {
            self.channel = Some(self.bdev.open_channel(&cx.channel_context(32)).unwrap());
        }
        let ch = self.channel.as_mut().unwrap();
        while self.next < self.ops.len() {
            let (off, len, data) = match &self.ops[self.next] {
                Op::Read(o, l) => (*o, *l, None),
                Op::Write(o, d) => (*o, d.len(), Some((d.clone(), false))),
                Op::WriteFua(o, d) => (*o, d.len(), Some((d.clone(), true))),
            };
            let Some(mut buf) = self.pool.get() else {
                break;
            };
            buf.set_len(len).unwrap();
            if let Some((d, _)) = &data {
                buf.as_mut_slice().copy_from_slice(d);
            }
            let mut bufs = IoBufs::new();
            bufs.push(buf);
            let req = if let Some((_, fua)) = data {
                let mut r = IoRequest::write(off, bufs, self.next as u64);
                r.op = drivers::IoOp::Write { fua };
                r
            } else {
                IoRequest::read(off, bufs, self.next as u64)
            };
            if let Err(e) = ch.submit(req) {
                let err = match e.error {
                    drivers::SubmitErrorKind::Invalid(err) => err,
                    drivers::SubmitErrorKind::QueueFull => break,
                };
                self.results[self.next] = Some(Err(err));
                self.left -= 1;
            }
            self.next += 1;
        }
        let mut out = Vec::new();
        ch.poll(&mut out);
        for c in out {
            let i = c.tag as usize;
            self.results[i] = Some(c.result.map(|()| match self.ops[i] {
                Op::Read(..) => c.bufs[0].as_slice().to_vec(),
                Op::Write(..) | Op::WriteFua(..) => Vec::new(),
            }));
            self.left -= 1;
        }
        if self.left == 0 {
            let r = self.results.iter_mut().map(|r| r.take().unwrap()).collect();
            let _ = self.tx.take().unwrap().send(r);
            return PollStatus::Done;
        }
        PollStatus::Busy
    }

    fn name(&self) -> &str {
        "test_batch"
    }
}

/// Runs `ops` on `bdev` from reactor `reactor` and returns their outcomes in order.
pub fn run(engine: &Engine, reactor: usize, bdev: Arc<dyn Bdev>, ops: Vec<Op>) -> Outcomes {
    start(engine, reactor, bdev, ops)
        .recv_timeout(Duration::from_secs(60))
        .expect("I/O batch timed out")
}

/// Starts `ops` on `bdev` from reactor `reactor`; their outcomes come on the receiver.
pub fn start(
    engine: &Engine,
    reactor: usize,
    bdev: Arc<dyn Bdev>,
    ops: Vec<Op>,
) -> mpsc::Receiver<Outcomes> {
    let (tx, rx) = mpsc::sync_channel(1);
    let max = ops
        .iter()
        .map(|o| match o {
            Op::Read(_, l) => *l,
            Op::Write(_, d) | Op::WriteFua(_, d) => d.len(),
        })
        .max()
        .unwrap_or(4096)
        .max(4096);
    let n = ops.len();
    let pool = BufferPool::new(max.next_multiple_of(4096), n.clamp(1, 64)).unwrap();
    engine
        .reactors()
        .get(reactor)
        .send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(Batch {
                bdev,
                ops,
                channel: None,
                results: (0..n).map(|_| None).collect(),
                next: 0,
                left: n,
                pool,
                tx: Some(tx),
            }))
        }))
        .unwrap();
    rx
}

/// Reads `len` bytes at `off`, panicking on error.
pub fn read(engine: &Engine, bdev: &Arc<dyn Bdev>, off: u64, len: usize) -> Vec<u8> {
    run(engine, 0, Arc::clone(bdev), vec![Op::Read(off, len)])
        .remove(0)
        .expect("read")
}

/// Waits until `f` holds (polling every millisecond), panicking after 30 s.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Fills a block with the id of the write and the block's number, 16 bytes at a time.
pub fn fill_block(buf: &mut [u8], id: u64, block: u64) {
    for chunk in buf.chunks_exact_mut(16) {
        chunk[..8].copy_from_slice(&id.to_le_bytes());
        chunk[8..].copy_from_slice(&block.to_le_bytes());
    }
}

/// The write id a block holds (0 = never written); Err if the block is torn or misplaced.
pub fn decode_block(buf: &[u8], block: u64) -> Result<u64, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    let id = word(&buf[..8]);
    for chunk in buf.chunks_exact(16) {
        let (cid, cb) = (word(&chunk[..8]), word(&chunk[8..]));
        if cid != id || cb != block {
            return Err(format!(
                "block {block} is torn or misplaced: starts with write {id:#x}, has write {cid:#x} for block {cb}"
            ));
        }
    }
    Ok(id)
}
