//! The point-in-time contract against a reference model, over many seeded random schedules.
//!
//! Two writer pollers (one per reactor) write P through the pair, and S through the image after
//! splits, while the test thread splits, resyncs and restores at random moments. Every block
//! write carries its write's id, so a read tells which write a block holds. After each split the
//! image must hold, for every block, the last write acknowledged before the split request, or a
//! write that was in flight during the split (wholly: all its blocks or none); it must never
//! change afterwards except by S's own writes; after a resync S equals P, after a restore P
//! equals the image. `QS_SCHEDULES` sets the number of schedules (default 1000), `QS_SEED` runs
//! one seed.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use drivers::testing::fault::{FaultBdev, FaultConfig};
use drivers::{Bdev, IoBufs, IoChannel, IoRequest};
use engine::app::Engine;
use engine::pair::channel::View;
use engine::pair::{PairConfig, PairState};
use engine::reactor::{IdlePolicy, PollStatus, Poller, ReactorContext, ReactorOptions};
use hugepages::BufferPool;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 4096;
const STRIPE: u64 = 4;

const MODE_QUIESCE: u8 = 0;
const MODE_P: u8 = 1;
const MODE_PS: u8 = 2;
const MODE_STOP: u8 = 3;

#[derive(Debug, Clone)]
struct WriteRecord {
    id: u64,
    to_s: bool,
    first: u64,
    count: u64,
    submit_epoch: u64,
    ack_seq: u64,
}

#[derive(Default)]
struct Shared {
    mode: AtomicU8,
    ack_clock: AtomicU64,
    split_epoch: AtomicU64,
    inflight: AtomicU64,
    /// Writes submitted and not yet completed, per split epoch at submission.
    unacked: Mutex<HashMap<u64, u64>>,
    log: Mutex<Vec<WriteRecord>>,
    failures: Mutex<Vec<String>>,
}

struct Pending {
    rec: WriteRecord,
}

struct Writer {
    id: u64,
    blocks: u64,
    shared: Arc<Shared>,
    views: [Arc<dyn Bdev>; 2],
    channels: [Option<Box<dyn IoChannel>>; 2],
    pool: BufferPool,
    rng: StdRng,
    busy: Vec<bool>,
    inflight: slab::Slab<Pending>,
    qd: usize,
    next: u64,
}

impl Writer {
    /// Issues one write if the mode allows; counted in flight before the mode is read so the
    /// test's quiesce never misses it.
    fn issue(&mut self) -> bool {
        self.shared.inflight.fetch_add(1, Ordering::SeqCst);
        let issued = self.try_issue();
        if !issued {
            self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
        }
        issued
    }

    fn try_issue(&mut self) -> bool {
        let mode = self.shared.mode.load(Ordering::SeqCst);
        if mode != MODE_P && mode != MODE_PS {
            return false;
        }
        let to_s = mode == MODE_PS && self.rng.gen_bool(0.3);
        let stripes = self.blocks / STRIPE;
        let owned: Vec<u64> = (0..stripes).filter(|s| s % 2 == self.id).collect();
        let stripe = owned[self.rng.gen_range(0..owned.len())];
        let start_in = self.rng.gen_range(0..STRIPE);
        let count = self.rng.gen_range(1..=(STRIPE - start_in).min(3));
        let first = stripe * STRIPE + start_in;
        if (first..first + count).any(|b| self.busy[b as usize]) {
            return false;
        }
        self.next += 1;
        let wid = (self.id + 1) << 40 | self.next;
        let mut bufs = IoBufs::new();
        for b in first..first + count {
            let Some(mut buf) = self.pool.get() else {
                return false;
            };
            buf.set_len(BS as usize).unwrap();
            common::fill_block(buf.as_mut_slice(), wid, b);
            bufs.push(buf);
        }
        let rec = WriteRecord {
            id: wid,
            to_s,
            first,
            count,
            submit_epoch: self.shared.split_epoch.load(Ordering::SeqCst),
            ack_seq: 0,
        };
        let submit_epoch = rec.submit_epoch;
        let key = self.inflight.insert(Pending { rec });
        let req = IoRequest::write(first * BS, bufs, key as u64);
        let ch = self.channels[to_s as usize].as_mut().unwrap();
        match ch.submit(req) {
            Ok(()) => {
                for b in first..first + count {
                    self.busy[b as usize] = true;
                }
                *self
                    .shared
                    .unacked
                    .lock()
                    .unwrap()
                    .entry(submit_epoch)
                    .or_default() += 1;
                true
            }
            Err(e) => {
                self.inflight.remove(key);
                self.shared
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("submit refused: {:?}", e.error));
                false
            }
        }
    }
}

impl Poller for Writer {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.channels[0].is_none() {
            for i in 0..2 {
                self.channels[i] =
                    Some(self.views[i].open_channel(&cx.channel_context(16)).unwrap());
            }
        }
        let mut busy = false;
        while self.inflight.len() < self.qd && self.issue() {
            busy = true;
        }
        let mut out = Vec::new();
        for ch in self.channels.iter_mut().flatten() {
            ch.poll(&mut out);
        }
        for c in out {
            busy = true;
            let mut rec = self.inflight.remove(c.tag as usize).rec;
            for b in rec.first..rec.first + rec.count {
                self.busy[b as usize] = false;
            }
            if let Some(n) = self
                .shared
                .unacked
                .lock()
                .unwrap()
                .get_mut(&rec.submit_epoch)
            {
                *n -= 1;
            }
            match c.result {
                Ok(()) => {
                    rec.ack_seq = self.shared.ack_clock.fetch_add(1, Ordering::SeqCst) + 1;
                    self.shared.log.lock().unwrap().push(rec);
                }
                Err(e) => self.shared.failures.lock().unwrap().push(format!(
                    "write {:#x} to {} blocks {}+{} failed: {e}",
                    rec.id,
                    if rec.to_s { "S" } else { "P" },
                    rec.first,
                    rec.count
                )),
            }
            self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
        }
        if self.shared.mode.load(Ordering::SeqCst) == MODE_STOP && self.inflight.is_empty() {
            return PollStatus::Done;
        }
        if busy || !self.inflight.is_empty() {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        "model_writer"
    }
}

/// Reads a whole bdev block by block (a poller, so it never blocks a reactor) and sends the
/// decoded write ids.
struct Reader {
    bdev: Arc<dyn Bdev>,
    blocks: u64,
    channel: Option<Box<dyn IoChannel>>,
    pool: BufferPool,
    next: u64,
    ids: Vec<Option<Result<u64, String>>>,
    left: u64,
    tx: Option<mpsc::SyncSender<Result<Vec<u64>, String>>>,
}

impl Poller for Reader {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.channel.is_none() {
            self.channel = Some(self.bdev.open_channel(&cx.channel_context(8)).unwrap());
        }
        let ch = self.channel.as_mut().unwrap();
        while self.next < self.blocks {
            let Some(buf) = self.pool.get() else { break };
            let mut bufs = IoBufs::new();
            bufs.push(buf);
            ch.submit(IoRequest::read(self.next * BS, bufs, self.next))
                .unwrap();
            self.next += 1;
        }
        let mut out = Vec::new();
        ch.poll(&mut out);
        for c in out {
            let b = c.tag;
            self.ids[b as usize] = Some(match c.result {
                Ok(()) => common::decode_block(c.bufs[0].as_slice(), b),
                Err(e) => Err(format!("read of block {b} failed: {e}")),
            });
            self.left -= 1;
        }
        if self.left == 0 {
            let ids: Result<Vec<u64>, String> =
                self.ids.iter_mut().map(|x| x.take().unwrap()).collect();
            let _ = self.tx.take().unwrap().send(ids);
            return PollStatus::Done;
        }
        PollStatus::Busy
    }

    fn name(&self) -> &str {
        "model_reader"
    }
}

fn read_ids(engine: &Engine, reactor: usize, bdev: Arc<dyn Bdev>) -> Result<Vec<u64>, String> {
    let blocks = bdev.geometry().num_blocks;
    let (tx, rx) = mpsc::sync_channel(1);
    engine
        .reactors()
        .get(reactor)
        .send_blocking(Box::new(move |cx| {
            cx.add_poller(Box::new(Reader {
                bdev,
                blocks,
                channel: None,
                pool: BufferPool::new(BS as usize, 8).unwrap(),
                next: 0,
                ids: (0..blocks).map(|_| None).collect(),
                left: blocks,
                tx: Some(tx),
            }))
        }))
        .unwrap();
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| "read timed out".to_string())?
}

struct Schedule<'a> {
    engine: &'a Engine,
    seed: u64,
    rng: StdRng,
    shared: Arc<Shared>,
    name: String,
    blocks: u64,
    /// P's content per block where no logged write decides it (after a restore).
    p_base: Vec<u64>,
    /// Log index from which P writes count on top of `p_base`.
    p_base_mark: usize,
    history: Mutex<Vec<String>>,
}

impl Schedule<'_> {
    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {}: {what}\nhistory: {:?}",
            self.seed,
            self.history.lock().unwrap()
        )
    }

    fn note(&self, what: String) {
        self.history.lock().unwrap().push(what);
    }

    fn check_failures(&self) {
        let f = self.shared.failures.lock().unwrap();
        if !f.is_empty() {
            self.fail(format!("writer failures: {:?}", &f[..f.len().min(5)]));
        }
    }

    fn quiesce(&self) {
        self.shared.mode.store(MODE_QUIESCE, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(20);
        while self.shared.inflight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > end {
                let report = self
                    .engine
                    .pair(&self.name)
                    .map(|p| p.persistence_report())
                    .unwrap_or_default();
                self.fail(format!("writes did not drain: {report}"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn pause(&mut self) {
        let us = self.rng.gen_range(0..2000);
        std::thread::sleep(Duration::from_micros(us));
    }

    fn log(&self) -> Vec<WriteRecord> {
        self.shared.log.lock().unwrap().clone()
    }

    /// P's content now, from the model (writers quiesced).
    fn p_model(&self) -> Vec<u64> {
        let mut m = self.p_base.clone();
        let mut log: Vec<_> = self.log()[self.p_base_mark..]
            .iter()
            .filter(|r| !r.to_s)
            .cloned()
            .collect();
        log.sort_by_key(|r| r.ack_seq);
        for r in log {
            for b in r.first..r.first + r.count {
                m[b as usize] = r.id;
            }
        }
        m
    }

    /// Waits (writers quiesced, copy at full speed) until the pair is in `want` with nothing
    /// pending.
    fn wait_state(&self, want: PairState) {
        let end = Instant::now() + Duration::from_secs(30);
        let pair = self.engine.pair(&self.name).unwrap();
        let rate = pair.copy_rate();
        pair.set_copy_rate(0);
        loop {
            let info = self.engine.pair_get(Some(&self.name)).unwrap().remove(0);
            if info.state == want && info.pending_tracks == 0 {
                pair.set_copy_rate(rate);
                return;
            }
            if info.state == PairState::Psue {
                self.fail(format!("pair went PSUE: {:?}", info.error));
            }
            if Instant::now() > end {
                self.fail(format!(
                    "pair stuck in {:?} with {} pending",
                    info.state, info.pending_tracks
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Splits while P writes go on and checks the image against the split point. Returns the
    /// image as read.
    fn split_and_check(&mut self) -> Vec<u64> {
        let c0 = self.shared.ack_clock.load(Ordering::SeqCst);
        let outcome = self
            .engine
            .pair_split(std::slice::from_ref(&self.name))
            .unwrap_or_else(|e| self.fail(format!("split failed: {e}")));
        let epoch = self.shared.split_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.note(format!(
            "split epoch {epoch} c0 {c0} pending {:?}",
            outcome.pending_tracks
        ));
        assert!(outcome.split_at_ns > 0);
        let image_view = self.engine.pair_view(&self.name, View::Image).unwrap();
        let reactor = self.rng.gen_range(0..2);
        let image = read_ids(self.engine, reactor, image_view)
            .unwrap_or_else(|e| self.fail(format!("image read: {e}")));
        // Writes submitted before the split returned may be in the image: wait until the
        // writers have logged every one of them (a write can be done in the pair, and so in the
        // image, before its writer polls its completion).
        let end = Instant::now() + Duration::from_secs(20);
        while self
            .shared
            .unacked
            .lock()
            .unwrap()
            .iter()
            .any(|(&e, &n)| e < epoch && n > 0)
        {
            if Instant::now() > end {
                self.fail("writes submitted before the split did not complete".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        // Candidates per block: the state after the last write acked before the split request,
        // then after each write that was in flight during the split, in order.
        let log = self.log();
        let mut per_block: HashMap<u64, Vec<&WriteRecord>> = HashMap::new();
        for r in log[self.p_base_mark..].iter().filter(|r| !r.to_s) {
            for b in r.first..r.first + r.count {
                per_block.entry(b).or_default().push(r);
            }
        }
        let mut position: HashMap<u64, usize> = HashMap::new();
        for b in 0..self.blocks {
            let mut ws = per_block.remove(&b).unwrap_or_default();
            ws.sort_by_key(|r| r.ack_seq);
            let before: Vec<_> = ws.iter().filter(|r| r.ack_seq <= c0).collect();
            let mut candidates = vec![before.last().map_or(self.p_base[b as usize], |r| r.id)];
            let ambiguous: Vec<_> = ws
                .iter()
                .filter(|r| r.ack_seq > c0 && r.submit_epoch < epoch)
                .collect();
            candidates.extend(ambiguous.iter().map(|r| r.id));
            let got = image[b as usize];
            match candidates.iter().position(|&c| c == got) {
                Some(0) => {}
                Some(i) => {
                    // Which in-flight write the block shows: all blocks of that write must show
                    // it (or a later in-flight write), none may show the state before it.
                    position.insert(ambiguous[i - 1].id, i);
                }
                None => self.fail(format!(
                    "image block {b} holds write {got:#x} ({:?}); the split point allows only \
                     {candidates:x?} (acked before split: {}, in flight: {})",
                    log.iter().find(|r| r.id == got),
                    before.len(),
                    ambiguous.len()
                )),
            }
        }
        // Wholly in or out: an in-flight write that shows on one of its blocks shows on all.
        for r in log[self.p_base_mark..].iter().filter(|r| !r.to_s) {
            if position.contains_key(&r.id) {
                for b in r.first..r.first + r.count {
                    let got = image[b as usize];
                    let later_in_flight = log.iter().any(|q| {
                        q.id == got && q.ack_seq > r.ack_seq && q.submit_epoch < epoch && !q.to_s
                    });
                    if got != r.id && !later_in_flight {
                        self.fail(format!(
                            "write {:#x} (blocks {}+{}) is only partly in the image: block {b} holds {got:#x}",
                            r.id, r.first, r.count
                        ));
                    }
                }
            }
        }
        image
    }

    /// The image now: the split image with S's own writes since the split on top.
    fn image_model(&self, at_split: &[u64], s_mark: usize) -> Vec<u64> {
        let mut m = at_split.to_vec();
        let mut log: Vec<_> = self.log()[s_mark..]
            .iter()
            .filter(|r| r.to_s)
            .cloned()
            .collect();
        log.sort_by_key(|r| r.ack_seq);
        for r in log {
            for b in r.first..r.first + r.count {
                m[b as usize] = r.id;
            }
        }
        m
    }

    fn read(&self, bdev: Arc<dyn Bdev>) -> Vec<u64> {
        read_ids(self.engine, 0, bdev).unwrap_or_else(|e| self.fail(e))
    }

    fn run(&mut self) {
        let pair = self.engine.pair(&self.name).unwrap();
        let primary_view = self.engine.pair_view(&self.name, View::Primary).unwrap();
        let s_bdev = Arc::clone(pair.secondary());
        self.shared.mode.store(MODE_P, Ordering::SeqCst);
        if self.rng.gen_bool(0.5) {
            self.pause();
            self.quiesce();
            self.wait_state(PairState::Pair);
            self.shared.mode.store(MODE_P, Ordering::SeqCst);
        }
        self.pause();
        for _round in 0..self.rng.gen_range(1..=2) {
            // Split while P writes are in flight.
            self.shared.mode.store(MODE_P, Ordering::SeqCst);
            let s_mark = self.shared.log.lock().unwrap().len();
            let at_split = self.split_and_check();
            // The image must not move while P (and now S) keep being written.
            self.shared.mode.store(MODE_PS, Ordering::SeqCst);
            self.pause();
            self.quiesce();
            self.check_failures();
            let image_now = self.image_model(&at_split, s_mark);
            let image_view = self.engine.pair_view(&self.name, View::Image).unwrap();
            self.note(format!(
                "image check at clock {}",
                self.shared.ack_clock.load(Ordering::SeqCst)
            ));
            let got = self.read(image_view);
            if got != image_now {
                let b = (0..self.blocks as usize)
                    .find(|&b| got[b] != image_now[b])
                    .unwrap();
                let log = self.log();
                let find = |id: u64| log.iter().find(|r| r.id == id).cloned();
                self.fail(format!(
                    "image changed after the split: block {b} holds {:#x} ({:?}), model {:#x} ({:?}), at split {:#x}",
                    got[b],
                    find(got[b]),
                    image_now[b],
                    find(image_now[b]),
                    at_split[b]
                ));
            }
            let p_now = self.read(Arc::clone(&primary_view));
            if p_now != self.p_model() {
                self.fail("P differs from the model of acknowledged writes".into());
            }
            if self.rng.gen_bool(0.6) {
                // Resync forward while P writes go on; then S must equal P.
                self.note(format!(
                    "resync at clock {}",
                    self.shared.ack_clock.load(Ordering::SeqCst)
                ));
                self.engine.pair_resync(&self.name, false).unwrap();
                self.shared.mode.store(MODE_P, Ordering::SeqCst);
                self.pause();
                self.quiesce();
                self.wait_state(PairState::Pair);
                let p = self.read(Arc::clone(&primary_view));
                let s = self.read(Arc::clone(&s_bdev));
                if p != self.p_model() {
                    self.fail("after resync P differs from the model".into());
                }
                if s != p {
                    let b = (0..self.blocks as usize).find(|&b| s[b] != p[b]).unwrap();
                    self.fail(format!(
                        "after resync S block {b} = {:#x}, P = {:#x}",
                        s[b], p[b]
                    ));
                }
            } else {
                // Restore: P becomes the image.
                self.note(format!(
                    "restore at clock {}",
                    self.shared.ack_clock.load(Ordering::SeqCst)
                ));
                self.engine.pair_resync(&self.name, true).unwrap();
                self.wait_state(PairState::Pair);
                let p = self.read(Arc::clone(&primary_view));
                let s = self.read(Arc::clone(&s_bdev));
                if p != image_now {
                    let b = (0..self.blocks as usize)
                        .find(|&b| p[b] != image_now[b])
                        .unwrap();
                    self.fail(format!(
                        "after restore P block {b} = {:#x}, image {:#x}",
                        p[b], image_now[b]
                    ));
                }
                if s != p {
                    self.fail("after restore S differs from P".into());
                }
                self.p_base = p;
                self.p_base_mark = self.shared.log.lock().unwrap().len();
            }
            self.check_failures();
        }
        self.shared.mode.store(MODE_STOP, Ordering::SeqCst);
    }
}

fn run_schedule(engine: &Engine, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let track_size = [4096u64, 8192, 16384][rng.gen_range(0..3)];
    let blocks = rng.gen_range(4..=12) * STRIPE * 2;
    let size = blocks * BS;
    let (pn, sn, name) = (
        format!("p{seed}"),
        format!("s{seed}"),
        format!("pair{seed}"),
    );
    // RAM disks behind fault bdevs that hold requests for a random number of polls, so writes
    // land at random moments between submission and completion (as on a real device).
    let faults = Arc::new(FaultConfig::default());
    faults
        .max_delay_polls
        .store([0, 2, 8, 30][rng.gen_range(0..4)], Ordering::Relaxed);
    {
        let mut st = engine.state();
        for n in [&pn, &sn] {
            let ram = Arc::new(
                drivers::malloc::MallocBdev::create(&format!("{n}-ram"), size, 4096).unwrap(),
            );
            st.bdevs
                .add(Arc::new(FaultBdev::new(n, ram, Arc::clone(&faults))))
                .unwrap();
        }
    }
    // A slow copy keeps many tracks pending at split time in most schedules.
    let copy_rate = [0, track_size * 200, track_size * 20][rng.gen_range(0..3)];
    engine
        .pair_create(
            &PairConfig {
                name: name.clone(),
                track_size,
                copy_rate,
            },
            &pn,
            &sn,
        )
        .unwrap();
    let shared = Arc::new(Shared::default());
    for id in 0..2u64 {
        let views = [
            engine.pair_view(&name, View::Primary).unwrap(),
            engine.pair_view(&name, View::Image).unwrap(),
        ];
        let writer_seed = rng.gen();
        let shared = Arc::clone(&shared);
        let qd = rng.gen_range(1..=6);
        engine
            .reactors()
            .get(id as usize)
            .send_blocking(Box::new(move |cx| {
                cx.add_poller(Box::new(Writer {
                    id,
                    blocks,
                    shared,
                    views,
                    channels: [None, None],
                    pool: BufferPool::new(BS as usize, 32).unwrap(),
                    rng: StdRng::seed_from_u64(writer_seed),
                    busy: vec![false; blocks as usize],
                    inflight: slab::Slab::new(),
                    qd,
                    next: 0,
                }))
            }))
            .unwrap();
    }
    let mut sched = Schedule {
        engine,
        seed,
        rng,
        shared: Arc::clone(&shared),
        name: name.clone(),
        blocks,
        p_base: vec![0; blocks as usize],
        p_base_mark: 0,
        history: Mutex::new(Vec::new()),
    };
    sched.run();
    sched.quiesce();
    shared.mode.store(MODE_STOP, Ordering::SeqCst);
    engine.pair_delete(&name).unwrap();
    let mut st = engine.state();
    st.bdevs.delete(&pn).unwrap();
    st.bdevs.delete(&sn).unwrap();
}

#[test]
fn image_equals_p_at_the_split_point_over_random_schedules() {
    let dir = std::env::temp_dir().join(format!("qs-pair-model-{}", std::process::id()));
    let engine = Engine::start(
        &ReactorOptions {
            cores: vec![0, 1],
            idle: IdlePolicy::Adaptive,
            inbox_size: 256,
        },
        &dir,
    )
    .unwrap();
    let seeds: Vec<u64> = match std::env::var("QS_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n = std::env::var("QS_SCHEDULES").map_or(1000, |s| s.parse().unwrap());
            (1..=n).collect()
        }
    };
    let start = Instant::now();
    for seed in seeds {
        run_schedule(&engine, seed);
    }
    eprintln!("schedules done in {:?}", start.elapsed());
    let _ = std::fs::remove_dir_all(dir);
}
