//! Random concurrent I/O from two reactors on malloc and uring bdevs, checked block by block
//! against an in-memory model; invalid requests get errors, not panics.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;

use drivers::{Bdev, IoBufs, IoChannel, IoCompletion, IoError, IoOp, IoRequest, SubmitErrorKind};
use engine::reactor::{IdlePolicy, PollStatus, Poller, ReactorContext, ReactorOptions, Reactors};
use hugepages::BufferPool;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const BLOCKS: u64 = 512;
const STRIPE: u64 = 8;

/// Content of a block as written by (worker, op number): every byte derived from both.
fn pattern(worker: u64, op: u64, block: u64) -> u8 {
    (worker.wrapping_mul(131) ^ op.wrapping_mul(31) ^ block.wrapping_mul(7)) as u8
}

/// A worker's final model and the mismatches it saw.
type WorkerOutcome = (HashMap<u64, u8>, Vec<String>);

struct Inflight {
    op: IoOp,
    first: u64,
    blocks: u64,
    /// Expected byte per block for writes (what the model becomes) and reads (what must come).
    expect: Vec<u8>,
}

/// A worker owns the blocks b with b % workers == id and drives random I/O on them.
struct Worker {
    id: u64,
    workers: u64,
    bdev: Arc<dyn Bdev>,
    channel: Option<Box<dyn IoChannel>>,
    pool: BufferPool,
    rng: rand::rngs::StdRng,
    model: HashMap<u64, u8>,
    busy: Vec<bool>,
    inflight: slab::Slab<Inflight>,
    ops_left: u64,
    op_no: u64,
    failures: Vec<String>,
    done_tx: Option<mpsc::SyncSender<WorkerOutcome>>,
}

impl Worker {
    /// Blocks come in stripes of `STRIPE`; stripe s belongs to worker s % workers.
    fn random_owned_run(&mut self) -> (u64, u64) {
        let stripes = BLOCKS / STRIPE / self.workers;
        let stripe = self.rng.gen_range(0..stripes) * self.workers + self.id;
        let first_in = self.rng.gen_range(0..STRIPE);
        let count = self.rng.gen_range(1..=(STRIPE - first_in).min(4));
        (stripe * STRIPE + first_in, count)
    }

    fn issue(&mut self) -> bool {
        let (first, count) = self.random_owned_run();
        if (first..first + count).any(|b| self.busy[b as usize]) {
            return false;
        }
        let kind = self.rng.gen_range(0..21);
        self.op_no += 1;
        let op = match kind {
            0..=9 => IoOp::Read,
            10 => IoOp::WriteZeroes { deallocate: false },
            20 => IoOp::WriteZeroes { deallocate: true },
            11 => IoOp::Write { fua: true },
            _ => IoOp::Write { fua: false },
        };
        let expect: Vec<u8> = (first..first + count)
            .map(|b| match op {
                IoOp::Read => *self.model.get(&b).unwrap_or(&0),
                IoOp::WriteZeroes { .. } => 0,
                _ => pattern(self.id, self.op_no, b),
            })
            .collect();
        // One buffer per block: a request of several blocks is vectored.
        let mut bufs = IoBufs::new();
        if op.has_data() {
            for &byte in &expect {
                let mut buf = self.pool.get().expect("pool sized for the queue depth");
                buf.set_len(BS as usize).unwrap();
                buf.as_mut_slice()
                    .fill(if op == IoOp::Read { 0xEE } else { byte });
                bufs.push(buf);
            }
        }
        let key = self.inflight.insert(Inflight {
            op,
            first,
            blocks: count,
            expect,
        });
        let req = IoRequest {
            op,
            offset: first * BS,
            len: count * BS,
            bufs,
            tag: key as u64,
        };
        match self.channel.as_mut().unwrap().submit(req) {
            Ok(()) => {
                for b in first..first + count {
                    self.busy[b as usize] = true;
                }
                true
            }
            Err(e) => {
                self.inflight.remove(key);
                assert_eq!(e.error, SubmitErrorKind::QueueFull);
                false
            }
        }
    }

    fn complete(&mut self, c: IoCompletion) {
        let f = self.inflight.remove(c.tag as usize);
        for i in 0..f.blocks {
            self.busy[(f.first + i) as usize] = false;
        }
        if let Err(e) = c.result {
            self.failures
                .push(format!("I/O at block {} failed: {e}", f.first));
            return;
        }
        match f.op {
            IoOp::Read => {
                for (i, buf) in c.bufs.iter().enumerate() {
                    let data = buf.as_slice();
                    if let Some(pos) = data.iter().position(|&x| x != f.expect[i]) {
                        self.failures.push(format!(
                            "worker {} block {} byte {pos}: read {:#x}, model {:#x}",
                            self.id,
                            f.first + i as u64,
                            data[pos],
                            f.expect[i]
                        ));
                    }
                }
            }
            IoOp::Write { .. } | IoOp::WriteZeroes { .. } => {
                for (i, &byte) in f.expect.iter().enumerate() {
                    self.model.insert(f.first + i as u64, byte);
                }
            }
            _ => {}
        }
    }
}

impl Poller for Worker {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.channel.is_none() {
            self.channel = Some(self.bdev.open_channel(&cx.channel_context(16)).unwrap());
        }
        let mut progress = false;
        while self.ops_left > 0 && self.inflight.len() < 8 {
            if !self.issue() {
                break;
            }
            self.ops_left -= 1;
            progress = true;
        }
        let mut out = Vec::new();
        self.channel.as_mut().unwrap().poll(&mut out);
        for c in out {
            self.complete(c);
            progress = true;
        }
        if self.ops_left == 0 && self.inflight.is_empty() {
            let tx = self.done_tx.take().unwrap();
            tx.send((
                std::mem::take(&mut self.model),
                std::mem::take(&mut self.failures),
            ))
            .unwrap();
            return PollStatus::Done;
        }
        if progress {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        "model_worker"
    }
}

fn two_reactors() -> Reactors {
    Reactors::start(&ReactorOptions {
        cores: vec![0, 1],
        idle: IdlePolicy::Adaptive,
        inbox_size: 64,
    })
    .unwrap()
}

/// Reads the whole device on a reactor into a Vec, one byte per block (the blocks are uniform).
fn read_all(reactors: &Reactors, bdev: Arc<dyn Bdev>) -> Vec<Vec<u8>> {
    reactors
        .get(0)
        .call(move |cx| {
            let mut ch = bdev.open_channel(&cx.channel_context(4)).unwrap();
            let pool = BufferPool::new(BS as usize, 1).unwrap();
            let mut all = Vec::new();
            for b in 0..BLOCKS {
                let mut bufs = IoBufs::new();
                bufs.push(pool.get().unwrap());
                ch.submit(IoRequest::read(b * BS, bufs, b)).unwrap();
                let mut out = Vec::new();
                while out.is_empty() {
                    ch.poll(&mut out);
                }
                let c = out.pop().unwrap();
                c.result.unwrap();
                all.push(c.bufs[0].as_slice().to_vec());
            }
            all
        })
        .unwrap()
}

fn run_model(bdev: Arc<dyn Bdev>, seed: u64) {
    let reactors = two_reactors();
    let mut rxs = Vec::new();
    for id in 0..2u64 {
        let (tx, rx) = mpsc::sync_channel(1);
        rxs.push(rx);
        let bdev = Arc::clone(&bdev);
        reactors
            .get(id as usize)
            .send_blocking(Box::new(move |cx| {
                cx.add_poller(Box::new(Worker {
                    id,
                    workers: 2,
                    bdev,
                    channel: None,
                    pool: BufferPool::new(BS as usize, 64).unwrap(),
                    rng: rand::rngs::StdRng::seed_from_u64(seed * 10 + id),
                    model: HashMap::new(),
                    busy: vec![false; BLOCKS as usize],
                    inflight: slab::Slab::new(),
                    ops_left: 3000,
                    op_no: 0,
                    failures: Vec::new(),
                    done_tx: Some(tx),
                }))
            }))
            .unwrap();
    }
    let mut model = HashMap::new();
    for rx in rxs {
        let (m, failures) = rx.recv().unwrap();
        assert!(failures.is_empty(), "seed {seed}: {failures:?}");
        model.extend(m);
    }
    let all = read_all(&reactors, bdev);
    for (b, data) in all.iter().enumerate() {
        let want = *model.get(&(b as u64)).unwrap_or(&0);
        assert!(
            data.iter().all(|&x| x == want),
            "seed {seed}: block {b} holds {:#x}, model {want:#x}",
            data[0]
        );
    }
    reactors.shutdown();
}

#[test]
fn malloc_matches_model_under_two_reactors() {
    for seed in 0..3 {
        let bdev = Arc::new(drivers::malloc::MallocBdev::create("m", BLOCKS * BS, 4096).unwrap());
        run_model(bdev, seed);
    }
}

#[test]
fn uring_matches_model_under_two_reactors() {
    let dir = tempdir();
    for seed in 0..3 {
        let path = dir.join(format!("u{seed}.img"));
        let bdev =
            Arc::new(drivers::uring::UringBdev::open("u", &path, 4096, Some(BLOCKS * BS)).unwrap());
        run_model(bdev, seed);
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qs-bdev-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Submits one request on a fresh channel and returns the submit error or the completion result.
fn try_one(bdev: Arc<dyn Bdev>, make: fn(&BufferPool) -> IoRequest) -> Result<(), IoError> {
    let reactors = Reactors::start(&ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::Adaptive,
        inbox_size: 16,
    })
    .unwrap();
    let r = reactors
        .get(0)
        .call(move |cx| {
            let mut ch = bdev.open_channel(&cx.channel_context(4)).unwrap();
            let pool = BufferPool::new(8192, 4).unwrap();
            match ch.submit(make(&pool)) {
                Err(e) => match e.error {
                    SubmitErrorKind::Invalid(err) => Err(err),
                    SubmitErrorKind::QueueFull => panic!("queue full on an empty channel"),
                },
                Ok(()) => {
                    let mut out = Vec::new();
                    while out.is_empty() {
                        ch.poll(&mut out);
                    }
                    out.pop().unwrap().result
                }
            }
        })
        .unwrap();
    reactors.shutdown();
    r
}

fn one_buf(pool: &BufferPool, len: usize) -> IoBufs {
    let mut b = pool.get().unwrap();
    b.set_len(len).unwrap();
    let mut v = IoBufs::new();
    v.push(b);
    v
}

#[test]
fn invalid_requests_get_errors() {
    let dir = tempdir().join("inv");
    std::fs::create_dir_all(&dir).unwrap();
    let bdevs: Vec<Arc<dyn Bdev>> = vec![
        Arc::new(drivers::malloc::MallocBdev::create("m", 1 << 20, 4096).unwrap()),
        Arc::new(
            drivers::uring::UringBdev::open("u", &dir.join("f"), 4096, Some(1 << 20)).unwrap(),
        ),
    ];
    for bdev in bdevs {
        let unaligned = try_one(Arc::clone(&bdev), |p| {
            IoRequest::read(100, one_buf(p, 4096), 0)
        });
        assert!(
            matches!(unaligned, Err(IoError::Unaligned { .. })),
            "{unaligned:?}"
        );
        let beyond = try_one(Arc::clone(&bdev), |p| {
            IoRequest::write((1 << 20) - 4096, one_buf(p, 8192), 0)
        });
        assert!(
            matches!(beyond, Err(IoError::OutOfRange { .. })),
            "{beyond:?}"
        );
        let huge = try_one(Arc::clone(&bdev), |_| {
            IoRequest::without_data(IoOp::Unmap, u64::MAX - 4095, 4096, 0)
        });
        assert!(matches!(huge, Err(IoError::OutOfRange { .. })), "{huge:?}");
        let mismatch = try_one(Arc::clone(&bdev), |p| {
            let mut r = IoRequest::read(0, one_buf(p, 4096), 0);
            r.len = 8192;
            r
        });
        assert!(
            matches!(mismatch, Err(IoError::BufferMismatch { .. })),
            "{mismatch:?}"
        );
        let ok = try_one(Arc::clone(&bdev), |p| {
            IoRequest::write(4096, one_buf(p, 8192), 0)
        });
        assert_eq!(ok, Ok(()));
        let flush = try_one(bdev, |_| IoRequest::without_data(IoOp::Flush, 0, 0, 0));
        assert_eq!(flush, Ok(()));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_full_inbox_pushes_back() {
    let reactors = Reactors::start(&ReactorOptions {
        cores: vec![0],
        idle: IdlePolicy::Adaptive,
        inbox_size: 16,
    })
    .unwrap();
    // Hold the reactor inside a message so it drains nothing.
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    reactors
        .get(0)
        .send_blocking(Box::new(move |_| {
            entered_tx.send(()).unwrap();
            let _ = hold_rx.recv();
        }))
        .unwrap();
    entered_rx.recv().unwrap();
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut accepted = 0;
    let refused = loop {
        let ran = Arc::clone(&ran);
        let msg: engine::reactor::Message = Box::new(move |_| {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        match reactors.get(0).send(msg) {
            Ok(()) => accepted += 1,
            Err(_) => break true,
        }
        assert!(accepted <= 16, "the inbox grew past its capacity");
    };
    assert!(refused);
    assert_eq!(accepted, 16);
    hold_tx.send(()).unwrap();
    // Once released, every accepted message runs and the inbox takes messages again.
    reactors.get(0).call(|_| ()).unwrap();
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 16);
    reactors.shutdown();
}

#[test]
fn reactors_count_busy_and_idle_time_and_park() {
    let reactors = two_reactors();
    std::thread::sleep(std::time::Duration::from_millis(300));
    for r in reactors.handles() {
        let idle = r.stats().idle_ns.load(std::sync::atomic::Ordering::Relaxed);
        assert!(idle > 0, "reactor {} reported no idle time", r.index());
    }
    let before: Vec<u64> = reactors
        .handles()
        .iter()
        .map(|r| r.stats().busy_ns.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    reactors
        .get(1)
        .call(|_| std::thread::sleep(std::time::Duration::from_millis(20)))
        .unwrap();
    // The turn that ran the message is accounted once it ends, just after the reply.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let counted = loop {
        let after = reactors
            .get(1)
            .stats()
            .busy_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        if after - before[1] >= 20_000_000 {
            break true;
        }
        if std::time::Instant::now() > end {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert!(counted, "busy time did not count a 20 ms message");
    reactors.shutdown();
}
