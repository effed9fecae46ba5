//! qsbench: drives one bdev from pinned reactors at a fixed queue depth, like SPDK's bdevperf,
//! and prints IOPS, MiB/s and latency percentiles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use drivers::{Bdev, IoBufs, IoChannel, IoCompletion, IoRequest, SubmitErrorKind};
use engine::app::{Engine, MetadataDevice};
use engine::pair::channel::View;
use engine::pair::{PairConfig, PairState};
use engine::reactor::{IdlePolicy, PollStatus, Poller, ReactorContext, ReactorOptions};
use hdrhistogram::Histogram;
use hugepages::{BufferPool, DmaBuf};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Randread,
    Randwrite,
    Randrw,
    Read,
    Write,
}

#[derive(Parser, Debug)]
#[command(about = "Block device benchmark on quicksplit's reactors (like SPDK's bdevperf)")]
struct Args {
    /// malloc:SIZE | uring:PATH[:SIZE] | nvme:PCI_ADDR (a controller bound to vfio-pci) |
    /// nvmf:TRADDR:PORT:NQN (namespace 1 of an NVMe/TCP subsystem)
    #[arg(long)]
    bdev: String,
    /// Access pattern.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Block size of each I/O in bytes.
    #[arg(long, default_value = "4096", value_parser = engine::units::parse_size)]
    bs: u64,
    /// I/Os in flight per core.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 5)]
    time: u64,
    /// Cores to run on, e.g. 0 or 0-1.
    #[arg(long, default_value = "0")]
    cores: String,
    /// Reactor idle policy.
    #[arg(long, default_value = "spin")]
    idle: IdlePolicy,
    /// Percentage of reads in randrw.
    #[arg(long, default_value_t = 50)]
    rwmixread: u32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Pair the bdev (as P) with this one (S, same syntax as --bdev) and drive P through the
    /// pair, as hosts do.
    #[arg(long)]
    secondary: Option<String>,
    /// Track size of the pair.
    #[arg(long, default_value = "64K", value_parser = engine::units::parse_size)]
    track_size: u64,
    /// Copy rate limit of the pair in bytes per second (0 = none).
    #[arg(long, default_value = "0", value_parser = engine::units::parse_size)]
    copy_rate: u64,
    /// When to measure a pair: `pair` (after the initial copy), `copy` (during it), `split`
    /// (right after a split with every track pending: copy before write).
    #[arg(long, value_enum, default_value = "pair")]
    phase: Phase,
    /// Core for the pair's copier (an extra reactor); default: the first job core.
    #[arg(long)]
    copier_core: Option<usize>,
    /// Split the pair this many times while the workload runs (each split followed by a resync
    /// that leaves every track pending) and report the split acknowledgement latency.
    #[arg(long, default_value_t = 0)]
    splits: u32,
    /// Persist the pair's metadata (`off`: in memory only, to measure what persistence costs).
    #[arg(long, value_enum, default_value = "on")]
    persist: Persist,
    /// Do not count I/O statistics (what `bdev_get_iostat` reports), to measure what counting
    /// costs.
    #[arg(long)]
    no_stats: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Persist {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Phase {
    /// Mirrored, once the initial copy is done.
    Pair,
    /// During the initial copy.
    Copy,
    /// Split before anything was copied: every track pending (copy before write).
    Split,
    /// Split once mirrored: nothing pending.
    SplitMirrored,
}

/// Why a run failed: bad usage (exit 2) or a failure while running (exit 1).
#[derive(Debug, thiserror::Error)]
enum Fail {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Run(String),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => {}
        Err(Fail::Usage(m)) => {
            eprintln!("qsbench: {m}");
            std::process::exit(2);
        }
        Err(Fail::Run(m)) => {
            eprintln!("qsbench: {m}");
            std::process::exit(1);
        }
    }
}

fn open_bdev(spec: &str, name: &str) -> Result<Arc<dyn Bdev>, Fail> {
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| Fail::Usage(format!("bad --bdev '{spec}'")))?;
    let run = |e: drivers::BdevError| Fail::Run(e.to_string());
    match kind {
        "malloc" => {
            let size = engine::units::parse_size(rest).map_err(Fail::Usage)?;
            Ok(Arc::new(
                drivers::malloc::MallocBdev::create(name, size, 4096).map_err(run)?,
            ))
        }
        "uring" => {
            let (path, size) = match rest.rsplit_once(':') {
                Some((p, s)) if engine::units::parse_size(s).is_ok() => {
                    (p, Some(engine::units::parse_size(s).map_err(Fail::Usage)?))
                }
                _ => (rest, None),
            };
            Ok(Arc::new(
                drivers::uring::UringBdev::open(name, &PathBuf::from(path), 4096, size)
                    .map_err(run)?,
            ))
        }
        "nvme" => {
            // The controller's first namespace; the controller goes when its last bdev does.
            let mut namespaces = drivers::nvme::rpc::attach_pci(
                name,
                rest,
                drivers::nvme::ControllerOptions::default(),
            )
            .map_err(run)?;
            Ok(Arc::new(namespaces.remove(0)))
        }
        "nvmf" => {
            // TRADDR:PORT:NQN (the NQN itself contains colons).
            let mut it = rest.splitn(3, ':');
            let (Some(addr), Some(port), Some(nqn)) = (it.next(), it.next(), it.next()) else {
                return Err(Fail::Usage(format!(
                    "bad --bdev '{spec}': nvmf:TRADDR:PORT:NQN"
                )));
            };
            let port: u16 = port
                .parse()
                .map_err(|_| Fail::Usage(format!("bad port in --bdev '{spec}'")))?;
            let opts = drivers::nvmf::host::HostOptions::new(addr, port, nqn);
            let mut namespaces =
                drivers::nvmf::attach(name, opts, serde_json::Value::Null).map_err(run)?;
            Ok(Arc::new(namespaces.remove(0)))
        }
        other => Err(Fail::Usage(format!("unknown bdev kind '{other}'"))),
    }
}

/// One core's share of the run.
struct Job {
    name: String,
    workload: Workload,
    bs: u64,
    qd: u32,
    rwmixread: u32,
    blocks: u64,
    seq_next: u64,
    channel: Option<Box<dyn IoChannel>>,
    bdev: Arc<dyn Bdev>,
    pool: BufferPool,
    rng: rand::rngs::SmallRng,
    /// Submission time per slot (the tag is the slot index).
    started: Vec<Instant>,
    idle_bufs: Vec<(usize, DmaBuf)>,
    done: Vec<IoCompletion>,
    hist: Histogram<u64>,
    ios: u64,
    errors: u64,
    stop: bool,
    /// The reactor thread's CPU time at the first poll.
    cpu_start: Option<u64>,
}

/// CPU time of the calling thread, in nanoseconds: what a job costs its core, whatever else
/// the core runs meanwhile.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

impl Job {
    fn next_request(&mut self, slot: usize, buf: DmaBuf) -> IoRequest {
        let block = match self.workload {
            Workload::Read | Workload::Write => {
                let b = self.seq_next;
                self.seq_next = (self.seq_next + 1) % self.blocks;
                b
            }
            _ => self.rng.gen_range(0..self.blocks),
        };
        let is_read = match self.workload {
            Workload::Randread | Workload::Read => true,
            Workload::Randwrite | Workload::Write => false,
            Workload::Randrw => self.rng.gen_range(0..100) < self.rwmixread,
        };
        let mut bufs = IoBufs::new();
        bufs.push(buf);
        if is_read {
            IoRequest::read(block * self.bs, bufs, slot as u64)
        } else {
            IoRequest::write(block * self.bs, bufs, slot as u64)
        }
    }

    fn submit(&mut self, slot: usize, buf: DmaBuf) -> Result<(), DmaBuf> {
        let req = self.next_request(slot, buf);
        self.started[slot] = Instant::now();
        let Some(ch) = self.channel.as_mut() else {
            return Err(req.bufs.into_iter().next().expect("one buffer"));
        };
        match ch.submit(req) {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.error != SubmitErrorKind::QueueFull {
                    self.errors += 1;
                }
                let mut bufs = e.req.bufs;
                Err(bufs.pop().expect("the request had one buffer"))
            }
        }
    }
}

impl Poller for Job {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.channel.is_none() {
            self.cpu_start = Some(thread_cpu_ns());
            match self.bdev.open_channel(&cx.channel_context(self.qd)) {
                Ok(ch) => self.channel = Some(ch),
                Err(e) => {
                    eprintln!("qsbench: open channel: {e}");
                    self.stop = true;
                    return PollStatus::Done;
                }
            }
            for slot in 0..self.qd as usize {
                match self.pool.get() {
                    Some(mut b) => {
                        let _ = b.set_len(self.bs as usize);
                        b.as_mut_slice().fill(slot as u8);
                        self.idle_bufs.push((slot, b));
                    }
                    None => break,
                }
            }
        }
        let mut busy = false;
        if !self.stop {
            let idle = std::mem::take(&mut self.idle_bufs);
            for (slot, buf) in idle {
                if let Err(buf) = self.submit(slot, buf) {
                    self.idle_bufs.push((slot, buf));
                }
            }
        }
        let Some(ch) = self.channel.as_mut() else {
            return PollStatus::Done;
        };
        let mut done = std::mem::take(&mut self.done);
        if ch.poll(&mut done) > 0 {
            busy = true;
            let now = Instant::now();
            for c in done.drain(..) {
                let slot = c.tag as usize;
                let ns = now.duration_since(self.started[slot]).as_nanos() as u64;
                let _ = self.hist.record(ns.max(1));
                if c.result.is_ok() {
                    self.ios += 1;
                } else {
                    self.errors += 1;
                }
                let buf = c.bufs.into_iter().next().expect("one buffer per request");
                if self.stop {
                    self.idle_bufs.push((slot, buf));
                } else if let Err(buf) = self.submit(slot, buf) {
                    self.idle_bufs.push((slot, buf));
                }
            }
        }
        self.done = done;
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

struct JobResult {
    ios: u64,
    errors: u64,
    /// CPU time of the job's reactor thread from its first poll to the end of the drain.
    cpu_ns: u64,
    hist: Histogram<u64>,
}

fn run(args: &Args) -> Result<(), Fail> {
    let cores = engine::topology::parse_cpu_list(&args.cores).map_err(Fail::Usage)?;
    if args.qd == 0 || args.qd > 4096 {
        return Err(Fail::Usage("--qd must be between 1 and 4096".into()));
    }
    if args.bs == 0 || !args.bs.is_multiple_of(4096) {
        return Err(Fail::Usage("--bs must be a multiple of 4096".into()));
    }
    let mut reactor_cores = cores.clone();
    if let Some(c) = args.copier_core {
        if !reactor_cores.contains(&c) {
            reactor_cores.push(c);
        }
    }
    let state_dir = std::env::temp_dir().join(format!("qsbench-{}", std::process::id()));
    let engine = Engine::start(
        &ReactorOptions {
            cores: reactor_cores,
            idle: args.idle,
            inbox_size: 256,
        },
        &state_dir,
    )
    .map_err(|e| Fail::Run(e.to_string()))?;
    drivers::iostat::set_enabled(!args.no_stats);
    let bdev = open_bdev(&args.bdev, "bench")?;
    // Counted as the engine counts a bdev of its table (a pair's are in the table).
    let stats = drivers::iostat::IoStats::new(true);
    let bdev = match &args.secondary {
        None => Arc::new(drivers::iostat::CountedBdev::new(bdev, Arc::clone(&stats))),
        Some(spec) => pair_target(&engine, args, bdev, open_bdev(spec, "bench-s")?)?,
    };
    let geo = bdev.geometry();
    let blocks = geo.size() / args.bs;
    if blocks == 0 {
        return Err(Fail::Usage("the bdev is smaller than one I/O".into()));
    }
    let reactors = engine.reactors();
    // One pool per core so no buffer is shared between reactors.
    let mut slots = Vec::new();
    for (i, r) in reactors.handles().iter().take(cores.len()).enumerate() {
        let pool = BufferPool::new(args.bs as usize, args.qd as usize)
            .map_err(|e| Fail::Run(e.to_string()))?;
        let hist = Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .map_err(|e| Fail::Run(e.to_string()))?;
        let (workload, bs, qd, rwmixread) = (args.workload, args.bs, args.qd, args.rwmixread);
        let seq_next = blocks / cores.len() as u64 * i as u64;
        let bdev = Arc::clone(&bdev);
        let (tx, rx) = std::sync::mpsc::sync_channel::<JobResult>(1);
        slots.push(rx);
        r.send_blocking(Box::new(move |cx| {
            let job = Job {
                name: format!("qsbench_{i}"),
                workload,
                bs,
                qd,
                rwmixread,
                blocks,
                seq_next,
                channel: None,
                bdev,
                pool,
                rng: rand::rngs::SmallRng::seed_from_u64(i as u64 + 1),
                started: vec![Instant::now(); qd as usize],
                idle_bufs: Vec::new(),
                done: Vec::with_capacity(qd as usize),
                hist,
                ios: 0,
                errors: 0,
                stop: false,
                cpu_start: None,
            };
            cx.add_poller(Box::new(Collector { job, tx: Some(tx) }));
        }))
        .map_err(|e| Fail::Run(e.to_string()))?;
    }
    let start = Instant::now();
    let split_lat = if args.splits > 0 {
        Some(split_cycles(&engine, args)?)
    } else {
        std::thread::sleep(Duration::from_secs(args.time));
        None
    };
    STOP.store(true, std::sync::atomic::Ordering::Release);
    // An empty message wakes a parked reactor so it sees the stop flag at once.
    for r in reactors.handles() {
        r.send_blocking(Box::new(|_| {}))
            .map_err(|e| Fail::Run(e.to_string()))?;
    }
    let mut total = JobResult {
        ios: 0,
        errors: 0,
        cpu_ns: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .map_err(|e| Fail::Run(e.to_string()))?,
    };
    for rx in slots {
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| Fail::Run("a job did not finish".into()))?;
        total.ios += r.ios;
        total.errors += r.errors;
        total.cpu_ns += r.cpu_ns;
        let _ = total.hist.add(&r.hist);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let pair = engine.pair_get(None).ok().and_then(|mut v| v.pop());
    let meta_stats = engine.pair("bench").ok().and_then(|p| {
        p.metadata().map(|m| {
            let st = &m.stats;
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            (
                get(&st.pages_written),
                get(&st.headers_written),
                get(&st.meta_flushes),
                get(&st.data_flushes),
                get(&st.bits_cleaned),
                [
                    get(&st.data_flush_ns),
                    get(&st.page_write_ns),
                    get(&st.meta_flush_ns),
                ],
            )
        })
    });
    drop(engine);
    let _ = std::fs::remove_dir_all(&state_dir);
    if let Some(p) = &pair {
        if !args.json {
            println!(
                "  pair {}: state {} pending {} copied {} (copy before write {})",
                p.name,
                p.state.as_str(),
                p.pending_tracks,
                p.copied_tracks,
                p.cow_copies
            );
            if let Some((pages, headers, mflush, dflush, cleaned, ns)) = meta_stats {
                println!(
                    "  metadata: {pages} pages and {headers} headers written, {mflush} flushes, \
                     {dflush} data flushes first, {cleaned} bits cleaned"
                );
                let avg = |ns: u64, n: u64| ns as f64 / 1000.0 / n.max(1) as f64;
                println!(
                    "  metadata batch, mean us: data flush {:.0}, page writes {:.0}, \
                     metadata flush {:.0}",
                    avg(ns[0], dflush),
                    avg(ns[1], mflush),
                    avg(ns[2], mflush)
                );
            }
        }
    }
    // What the bdev's statistics counted, to check them against the jobs' own count.
    let counted = (!args.no_stats && args.secondary.is_none()).then(|| {
        let s = stats.snapshot();
        s.num_read_ops + s.num_write_ops
    });
    report(args, &cores, &total, elapsed, counted);
    if let Some((engine_ns, call_ns)) = split_lat {
        let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "splits": engine_ns.len(),
                    "split_engine_us": { "p50": us(&engine_ns, 0.5), "p99": us(&engine_ns, 0.99), "max": engine_ns.max() as f64 / 1000.0 },
                    "split_call_us": { "p50": us(&call_ns, 0.5), "p99": us(&call_ns, 0.99), "max": call_ns.max() as f64 / 1000.0 },
                })
            );
        } else {
            println!(
                "  {} splits, every track pending: inside the engine p50 {:.1} us p99 {:.1} us max {:.1} us; caller round trip p50 {:.1} us p99 {:.1} us",
                engine_ns.len(),
                us(&engine_ns, 0.5),
                us(&engine_ns, 0.99),
                engine_ns.max() as f64 / 1000.0,
                us(&call_ns, 0.5),
                us(&call_ns, 0.99)
            );
        }
    }
    if total.errors > 0 {
        return Err(Fail::Run(format!("{} I/O errors", total.errors)));
    }
    Ok(())
}

/// Pairs `p` and `s` and returns the primary view to drive, once the pair is in the phase asked.
fn pair_target(
    engine: &Engine,
    args: &Args,
    p: Arc<dyn Bdev>,
    s: Arc<dyn Bdev>,
) -> Result<Arc<dyn Bdev>, Fail> {
    let run = |e: String| Fail::Run(e);
    {
        let mut st = engine.state();
        st.bdevs.add(p).map_err(|e| run(e.to_string()))?;
        st.bdevs.add(s).map_err(|e| run(e.to_string()))?;
    }
    // For the split phase nothing may be copied before the split: every track stays pending.
    let copy_rate = match args.phase {
        _ if args.splits > 0 => 1,
        Phase::Split => 1,
        _ => args.copy_rate,
    };
    let cfg = PairConfig {
        name: "bench".into(),
        track_size: args.track_size,
        copy_rate,
    };
    let pair = match args.persist {
        Persist::On => engine.pair_create(&cfg, "bench", "bench-s"),
        Persist::Off => engine.pair_create_on(&cfg, "bench", "bench-s", MetadataDevice::None),
    }
    .map_err(|e| run(e.to_string()))?;
    match args.phase {
        _ if args.splits > 0 => {}
        Phase::Copy => {}
        Phase::Pair | Phase::SplitMirrored => {
            while pair.state() != PairState::Pair {
                if pair.state() == PairState::Psue {
                    return Err(run(format!("pair failed: {:?}", pair.error())));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if args.phase == Phase::SplitMirrored {
                engine
                    .pair_split(&["bench".to_string()])
                    .map_err(|e| run(e.to_string()))?;
            }
        }
        Phase::Split => {
            engine
                .pair_split(&["bench".to_string()])
                .map_err(|e| run(e.to_string()))?;
        }
    }
    engine
        .pair_view("bench", View::Primary)
        .map_err(|e| run(e.to_string()))
}

/// Splits and resyncs the pair `args.splits` times while the jobs run; returns histograms of
/// the split's time inside the engine and of the caller's round trip, in nanoseconds.
fn split_cycles(engine: &Engine, args: &Args) -> Result<(Histogram<u64>, Histogram<u64>), Fail> {
    let mut inside = Histogram::new(3).map_err(|e| Fail::Run(e.to_string()))?;
    let mut call = Histogram::new(3).map_err(|e| Fail::Run(e.to_string()))?;
    let names = ["bench".to_string()];
    let pause = Duration::from_secs(args.time) / args.splits.max(1) / 2;
    for _ in 0..args.splits {
        std::thread::sleep(pause);
        let t = Instant::now();
        let out = engine
            .pair_split(&names)
            .map_err(|e| Fail::Run(e.to_string()))?;
        let _ = call.record(t.elapsed().as_nanos() as u64);
        let _ = inside.record(out.engine_ns.max(1));
        std::thread::sleep(pause);
        engine
            .pair_resync("bench", false)
            .map_err(|e| Fail::Run(e.to_string()))?;
    }
    Ok((inside, call))
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs a job until the stop flag, drains it, then sends its figures.
struct Collector {
    job: Job,
    tx: Option<std::sync::mpsc::SyncSender<JobResult>>,
}

impl Poller for Collector {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if STOP.load(std::sync::atomic::Ordering::Acquire) {
            self.job.stop = true;
        }
        let status = self.job.poll(cx);
        let drained = self.job.channel.as_ref().is_none_or(|c| c.in_flight() == 0);
        if self.job.stop && drained {
            if let Some(tx) = self.tx.take() {
                let hist = std::mem::replace(
                    &mut self.job.hist,
                    Histogram::new(3).expect("3 significant digits is valid"),
                );
                let cpu_ns = self
                    .job
                    .cpu_start
                    .map_or(0, |s| thread_cpu_ns().saturating_sub(s));
                let _ = tx.send(JobResult {
                    ios: self.job.ios,
                    errors: self.job.errors,
                    cpu_ns,
                    hist,
                });
            }
            return PollStatus::Done;
        }
        status
    }

    fn name(&self) -> &str {
        self.job.name()
    }
}

fn report(args: &Args, cores: &[usize], r: &JobResult, elapsed: f64, counted: Option<u64>) {
    let iops = r.ios as f64 / elapsed;
    let mibps = iops * args.bs as f64 / (1 << 20) as f64;
    let us = |q: f64| r.hist.value_at_quantile(q) as f64 / 1000.0;
    let (p50, p99, p999, max) = (us(0.5), us(0.99), us(0.999), r.hist.max() as f64 / 1000.0);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bdev": args.bdev,
                "workload": format!("{:?}", args.workload).to_lowercase(),
                "bs": args.bs,
                "qd": args.qd,
                "cores": cores,
                "seconds": elapsed,
                "ios": r.ios,
                "counted_ios": counted,
                "cpu_s": r.cpu_ns as f64 / 1e9,
                "errors": r.errors,
                "iops": iops,
                "mibps": mibps,
                "lat_us": { "p50": p50, "p99": p99, "p99_9": p999, "max": max },
            })
        );
    } else {
        println!(
            "qsbench {} {:?} bs={} qd={} cores={:?} time={:.1}s",
            args.bdev, args.workload, args.bs, args.qd, cores, elapsed
        );
        println!(
            "  IOPS {:>12.0}   MiB/s {:>9.1}   errors {}",
            iops, mibps, r.errors
        );
        println!(
            "  latency us: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            p50, p99, p999, max
        );
    }
}
