//! I/O statistics: requests, bytes and latencies counted per channel, summed on request, in
//! the shape of SPDK's `bdev_get_iostat`.
//!
//! Each channel ([`CountedChannel`], a wrapper any bdev's channel goes through) owns its
//! counters and latency buckets in a cell of its own, which only its reactor writes: once per
//! poll that returned completions or followed requests served in place. One channel counts for
//! an export's view and its bdev at once. A reader
//! ([`IoStats::snapshot`]) locks each cell in turn just long enough to add it to a total, so
//! the data path never writes a cache line another core writes, except during a snapshot.
//! The lock is uncontended otherwise (two atomic operations per poll). A channel that closes
//! adds its counts to its bdev's retired total, so nothing counted is lost with a connection.
//!
//! What a request counts as: a read or a write (its bytes), an unmap or a write-zeroes (its
//! length), a flush (none); only successful requests, as SPDK counts them, and failed ones in
//! `num_errors`. Latency runs from the submission to the poll that returned the completion,
//! in ticks of [`ticks`] (a busy channel times a sample of its requests, see
//! [`CountedChannel`]); read and write latencies are also counted in buckets (`buckets.rs`)
//! that a snapshot turns into an HdrHistogram for percentiles. A RAM disk's read served in
//! place counts when its memory is handed out (the copy happens later, in the socket write),
//! its write in place when the copy is done.

mod buckets;
mod channel;
mod clock;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hdrhistogram::Histogram;
use serde::Serialize;

use buckets::Buckets;

pub use channel::{counted, counted_direct, CountedBdev, CountedChannel};
pub use clock::{tick_rate, ticks, ticks_to_us};

/// Counting on (the default) or off (`serve --no-stats`, `qsbench --no-stats`).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns counting on or off for the channels opened from then on: with it off, counted bdevs
/// hand out their inner channels as they are, and report nothing (what the counting costs is
/// measured against that).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// True while channels are counted.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Counts of one kind of request.
#[derive(Debug, Clone, Copy)]
struct OpCounts {
    ops: u64,
    bytes: u64,
    latency_ticks: u64,
    max_ticks: u64,
    min_ticks: u64,
}

impl Default for OpCounts {
    fn default() -> Self {
        Self {
            ops: 0,
            bytes: 0,
            latency_ticks: 0,
            max_ticks: 0,
            min_ticks: u64::MAX,
        }
    }
}

impl OpCounts {
    #[inline]
    fn record(&mut self, bytes: u64, latency: Option<Timed>) {
        self.ops += 1;
        self.bytes += bytes;
        if let Some(t) = latency {
            self.latency_ticks += t.ticks * t.weight;
            self.max_ticks = self.max_ticks.max(t.ticks);
            self.min_ticks = self.min_ticks.min(t.ticks);
        }
    }

    fn merge(&mut self, o: &OpCounts) {
        self.ops += o.ops;
        self.bytes += o.bytes;
        self.latency_ticks += o.latency_ticks;
        self.max_ticks = self.max_ticks.max(o.max_ticks);
        self.min_ticks = self.min_ticks.min(o.min_ticks);
    }

    /// The minimum as SPDK reports it: 0 when nothing was timed.
    fn min(&self) -> u64 {
        if self.min_ticks == u64::MAX {
            0
        } else {
            self.min_ticks
        }
    }
}

/// The latency of a timed request, and how many requests it stands for (see
/// [`CountedChannel`]: a channel with many requests in flight times one in eight).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timed {
    pub(crate) ticks: u64,
    pub(crate) weight: u64,
}

/// What a request was, for counting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Unmap,
    WriteZeroes,
    Flush,
}

impl Kind {
    pub(crate) fn of(op: crate::IoOp) -> Self {
        match op {
            crate::IoOp::Read => Kind::Read,
            crate::IoOp::Write { .. } => Kind::Write,
            crate::IoOp::Unmap => Kind::Unmap,
            crate::IoOp::WriteZeroes { .. } => Kind::WriteZeroes,
            crate::IoOp::Flush => Kind::Flush,
        }
    }
}

/// The counters of one channel, or a sum of them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    read: OpCounts,
    write: OpCounts,
    unmap: OpCounts,
    write_zeroes: OpCounts,
    flush: OpCounts,
    errors: u64,
    /// Latencies of reads and writes by bucket, made on the first one (when kept at all).
    read_hist: Option<Buckets>,
    write_hist: Option<Buckets>,
}

fn add_buckets(to: &mut Option<Buckets>, from: &Option<Buckets>) {
    let Some(from) = from else {
        return;
    };
    match to {
        Some(to) => to.add(from),
        None => *to = Some(from.clone()),
    }
}

impl Counters {
    /// Counts one request, with its latency if it was timed; `histograms` keeps the latency in
    /// the buckets too.
    #[inline]
    pub(crate) fn record(
        &mut self,
        kind: Kind,
        bytes: u64,
        latency: Option<Timed>,
        histograms: bool,
    ) {
        let (counts, hist) = match kind {
            Kind::Read => (&mut self.read, Some(&mut self.read_hist)),
            Kind::Write => (&mut self.write, Some(&mut self.write_hist)),
            Kind::Unmap => (&mut self.unmap, None),
            Kind::WriteZeroes => (&mut self.write_zeroes, None),
            Kind::Flush => (&mut self.flush, None),
        };
        counts.record(bytes, latency);
        if let (true, Some(hist), Some(t)) = (histograms, hist, latency) {
            hist.get_or_insert_with(Buckets::new)
                .record(t.ticks, t.weight);
        }
    }

    /// Counts one failed request.
    #[inline]
    pub(crate) fn record_error(&mut self) {
        self.errors += 1;
    }

    fn merge(&mut self, o: &Counters) {
        self.read.merge(&o.read);
        self.write.merge(&o.write);
        self.unmap.merge(&o.unmap);
        self.write_zeroes.merge(&o.write_zeroes);
        self.flush.merge(&o.flush);
        self.errors += o.errors;
        add_buckets(&mut self.read_hist, &o.read_hist);
        add_buckets(&mut self.write_hist, &o.write_hist);
    }
}

/// One channel's counters, shared between the channel (the only writer) and snapshots.
pub(crate) type Cell = Arc<Mutex<Counters>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Cells {
    live: Vec<Cell>,
    retired: Counters,
}

/// The statistics of one bdev, export or pair view: the cells of its open channels and the
/// sum of those that closed.
#[derive(Debug, Default)]
pub struct IoStats {
    histograms: bool,
    cells: Mutex<Cells>,
}

impl IoStats {
    /// Statistics with latency histograms (percentiles) when `histograms`, else counts and
    /// latency sums only.
    pub fn new(histograms: bool) -> Arc<Self> {
        Arc::new(Self {
            histograms,
            cells: Mutex::default(),
        })
    }

    /// True when latencies are kept in histograms.
    pub fn histograms(&self) -> bool {
        self.histograms
    }

    /// A new channel's cell.
    pub(crate) fn open(&self) -> Cell {
        let cell = Cell::default();
        lock(&self.cells).live.push(Arc::clone(&cell));
        cell
    }

    /// A closing channel's cell: its counts join the retired total.
    pub(crate) fn close(&self, cell: &Cell) {
        let mut cells = lock(&self.cells);
        cells.live.retain(|c| !Arc::ptr_eq(c, cell));
        let counts = lock(cell);
        cells.retired.merge(&counts);
    }

    /// The sum over every channel, open or closed.
    pub fn snapshot(&self) -> IoStat {
        let cells = lock(&self.cells);
        let mut total = cells.retired.clone();
        for c in &cells.live {
            total.merge(&lock(c));
        }
        drop(cells);
        IoStat::from(&total)
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
}

impl Percentiles {
    fn of(h: &Option<Histogram<u64>>) -> Option<Self> {
        let h = h.as_ref()?;
        let us = |q| (ticks_to_us(h.value_at_quantile(q)) * 1000.0).round() / 1000.0;
        Some(Self {
            p50: us(0.5),
            p99: us(0.99),
            p99_9: us(0.999),
        })
    }
}

/// Counts, bytes and latencies of one bdev: what `bdev_get_iostat` reports of it (SPDK's
/// field names, then quicksplit's own).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IoStat {
    /// Bytes read.
    pub bytes_read: u64,
    /// Reads.
    pub num_read_ops: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Writes.
    pub num_write_ops: u64,
    /// Bytes unmapped (trimmed, deallocated).
    pub bytes_unmapped: u64,
    /// Unmaps.
    pub num_unmap_ops: u64,
    /// Bytes copied by copy commands: always 0 (no bdev here has one), kept for SPDK's shape.
    pub bytes_copied: u64,
    /// Copy commands: always 0.
    pub num_copy_ops: u64,
    /// Sum of the reads' latencies, in ticks (on a busy channel, each timed read counted for
    /// the reads it stands for).
    pub read_latency_ticks: u64,
    /// Longest read.
    pub max_read_latency_ticks: u64,
    /// Shortest read (0 when none).
    pub min_read_latency_ticks: u64,
    /// Sum of the writes' latencies.
    pub write_latency_ticks: u64,
    /// Longest write.
    pub max_write_latency_ticks: u64,
    /// Shortest write (0 when none).
    pub min_write_latency_ticks: u64,
    /// Sum of the unmaps' latencies.
    pub unmap_latency_ticks: u64,
    /// Longest unmap.
    pub max_unmap_latency_ticks: u64,
    /// Shortest unmap (0 when none).
    pub min_unmap_latency_ticks: u64,
    /// Copy latencies: always 0.
    pub copy_latency_ticks: u64,
    /// Always 0.
    pub max_copy_latency_ticks: u64,
    /// Always 0.
    pub min_copy_latency_ticks: u64,
    /// Bytes made zero by write-zeroes requests.
    pub bytes_zeroed: u64,
    /// Write-zeroes requests.
    pub num_write_zeroes_ops: u64,
    /// Flushes.
    pub num_flush_ops: u64,
    /// Requests that failed (not counted above).
    pub num_errors: u64,
    /// Read latency percentiles in microseconds (absent without a histogram or reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_latency_us: Option<Percentiles>,
    /// Write latency percentiles in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_latency_us: Option<Percentiles>,
    /// Read latencies as (upper bound in seconds, requests in that bucket alone), for
    /// exposition; empty without a histogram.
    #[serde(skip)]
    pub read_buckets: Vec<(f64, u64)>,
    /// Write latencies, as `read_buckets`.
    #[serde(skip)]
    pub write_buckets: Vec<(f64, u64)>,
    /// Reads the latency buckets stand for (`num_read_ops`, give or take the sampling of busy
    /// channels).
    #[serde(skip)]
    pub read_latency_count: u64,
    /// Writes the latency buckets stand for.
    #[serde(skip)]
    pub write_latency_count: u64,
}

/// Upper bounds of the exposed latency buckets, in seconds: 5 µs to 1 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
    0.25, 1.0,
];

/// Requests in each of [`LATENCY_BUCKETS`] alone (the last, unbounded bucket is the total's
/// remainder, left to the encoder).
fn buckets(h: &Option<Histogram<u64>>) -> Vec<(f64, u64)> {
    let Some(h) = h else {
        return Vec::new();
    };
    let rate = tick_rate() as f64;
    let mut below = 0u64;
    LATENCY_BUCKETS
        .iter()
        .map(|&secs| {
            let upto = h.count_between(0, (secs * rate) as u64);
            let n = upto.saturating_sub(below);
            below = upto.max(below);
            (secs, n)
        })
        .collect()
}

impl From<&Counters> for IoStat {
    fn from(c: &Counters) -> Self {
        let read_hist = c.read_hist.as_ref().and_then(Buckets::histogram);
        let write_hist = c.write_hist.as_ref().and_then(Buckets::histogram);
        Self {
            bytes_read: c.read.bytes,
            num_read_ops: c.read.ops,
            bytes_written: c.write.bytes,
            num_write_ops: c.write.ops,
            bytes_unmapped: c.unmap.bytes,
            num_unmap_ops: c.unmap.ops,
            bytes_copied: 0,
            num_copy_ops: 0,
            read_latency_ticks: c.read.latency_ticks,
            max_read_latency_ticks: c.read.max_ticks,
            min_read_latency_ticks: c.read.min(),
            write_latency_ticks: c.write.latency_ticks,
            max_write_latency_ticks: c.write.max_ticks,
            min_write_latency_ticks: c.write.min(),
            unmap_latency_ticks: c.unmap.latency_ticks,
            max_unmap_latency_ticks: c.unmap.max_ticks,
            min_unmap_latency_ticks: c.unmap.min(),
            copy_latency_ticks: 0,
            max_copy_latency_ticks: 0,
            min_copy_latency_ticks: 0,
            bytes_zeroed: c.write_zeroes.bytes,
            num_write_zeroes_ops: c.write_zeroes.ops,
            num_flush_ops: c.flush.ops,
            num_errors: c.errors,
            read_latency_us: Percentiles::of(&read_hist),
            write_latency_us: Percentiles::of(&write_hist),
            read_buckets: buckets(&read_hist),
            write_buckets: buckets(&write_hist),
            read_latency_count: c.read_hist.as_ref().map_or(0, Buckets::total),
            write_latency_count: c.write_hist.as_ref().map_or(0, Buckets::total),
        }
    }
}
