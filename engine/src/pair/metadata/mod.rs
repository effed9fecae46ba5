//! Crash-safe pair metadata: the pair's header (state, direction, split point, error) and four
//! track bitmaps, kept on a bdev of their own (a file in the state directory) and written
//! through the engine's own I/O path by the [`writer::MetaWriter`] poller.
//!
//! On-disk layout, 4 KiB blocks:
//! - blocks 0 and 1: two header slots. Header number `seq` goes to slot `seq % 2`, so a write
//!   torn or lost by a power cut leaves the other slot, one state older, whole. Each slot holds
//!   a magic, a JSON record and a CRC-32C.
//! - then four maps, each `pages_per_map` pages: pending (the write-intent map, below),
//!   changed on P, changed on S, to restore. A page holds the bits of 32,640 tracks, its own
//!   map and page number, and a CRC-32C over all of it, so a stale, misplaced or damaged page is
//!   detected at load and never trusted.
//!
//! What the pending map on disk means (the contract the host path and the cleaner keep):
//! - in COPY and PAIR it is a write-intent map: a superset of the tracks where S may differ
//!   from P. A host write to P sets the bits of its tracks' regions (a bitmap word, 64 tracks)
//!   durably before it is issued, so random writes wait for a metadata write once per region,
//!   not once per track (what md's write-intent bitmap does with its chunks); bits are cleared
//!   lazily, only in regions untouched for two whole cleaning periods, and only after P and S
//!   were flushed;
//! - in PSUS it is the set of tracks S lacks, with P unchanged since the split on each of them:
//!   a host write (to P or S) on a track clears its bit durably, after S's copy of the track is
//!   durable, before it is issued. A stale bit there (the track was copied but the bit not yet
//!   cleared) is harmless: P still holds the split-point data, and a copy rewrites the same data.
//!
//! The changed maps are supersets: a write sets the bits of its tracks' regions durably before
//! it is issued (a resync copies the few extra tracks, equal on both sides). The restore map is
//! a superset of the tracks P still lacks in a restore.
//!
//! Header writes are numbered: a transition that changes what host writes mean (split, resync,
//! the end of a copy, a suspension) takes a number, and host writes wait until the header of
//! that number is durable, so no write relies on a state the disk does not hold yet.

pub(crate) mod blocking_io;
mod format;
mod headers;
pub mod writer;

use blocking_io::{BlockingIo, Image};
pub use format::*;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use drivers::{Bdev, ChannelContext, IoBufs, IoChannel, IoCompletion, IoOp, IoRequest};
use hugepages::BufferPool;
use serde::{Deserialize, Serialize};

use crate::pair::PairState;
use crate::reactor::PollerWaker;

/// Bytes of a header slot and of a bitmap page.
pub const BLOCK: u64 = 4096;
/// Bitmap words (64 tracks each) in a page; the last 16 bytes are the page's trailer.
pub const WORDS_PER_PAGE: u64 = 510;
/// Tracks one page covers.
pub const TRACKS_PER_PAGE: u64 = WORDS_PER_PAGE * 64;
const HEADER_SLOTS: u64 = 2;
const MAGIC: [u8; 8] = *b"QSPAIRMD";
/// The header format of metadata with checkpoint slots.
const FORMAT: u32 = 2;
/// The header format of metadata made before checkpoints: the four maps only.
const FORMAT_BASE_MAPS_ONLY: u32 = 1;

/// A persisted map: one of the four a pair always has, or a checkpoint slot's
/// ([`MapKind::checkpoint`]). Its number orders the maps on disk and is stored in each page.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MapKind(u8);

#[allow(non_upper_case_globals)]
impl MapKind {
    /// Write-intent map (COPY/PAIR), tracks S lacks (PSUS).
    pub const Pending: MapKind = MapKind(0);
    /// Tracks written on P since the split.
    pub const ChangedP: MapKind = MapKind(1);
    /// Tracks written on S since the split.
    pub const ChangedS: MapKind = MapKind(2);
    /// Tracks P lacks during a restore.
    pub const Restore: MapKind = MapKind(3);

    /// The map of checkpoint slot `slot` (below [`CHECKPOINT_SLOTS`]): tracks P changed in
    /// the span the slot covers (see `pair::checkpoints`).
    pub const fn checkpoint(slot: usize) -> MapKind {
        MapKind(BASE_MAPS as u8 + slot as u8)
    }

    /// The map's number (its place on disk).
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// The checkpoint slot this map is, if it is one.
    pub fn checkpoint_slot(self) -> Option<usize> {
        (self.index() >= BASE_MAPS).then(|| self.index() - BASE_MAPS)
    }
}

impl std::fmt::Debug for MapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => f.write_str("Pending"),
            1 => f.write_str("ChangedP"),
            2 => f.write_str("ChangedS"),
            3 => f.write_str("Restore"),
            n => write!(f, "Checkpoint{}", n as usize - BASE_MAPS),
        }
    }
}

/// The maps every pair has.
pub const BASE_MAPS: usize = 4;
/// Checkpoint slots: a pair holds this many checkpoints at most.
pub const CHECKPOINT_SLOTS: usize = 8;

/// The four maps every pair has, in on-disk order.
pub const MAP_KINDS: [MapKind; 4] = [
    MapKind::Pending,
    MapKind::ChangedP,
    MapKind::ChangedS,
    MapKind::Restore,
];

/// Errors loading or initialising metadata.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MetaError {
    /// The metadata bdev failed an I/O.
    #[error("pair metadata I/O error: {0}")]
    Io(String),
    /// A header or page fails its checks.
    #[error("pair metadata fails its checksum: {0}")]
    Corrupt(String),
    /// The metadata describes another pair or geometry.
    #[error("pair metadata is of another pair: {0}")]
    Mismatch(String),
    /// The metadata bdev is too small for the pair.
    #[error("pair metadata bdev holds {have} bytes, the pair needs {need}")]
    TooSmall {
        /// Bytes the bdev has.
        have: u64,
        /// Bytes the layout needs.
        need: u64,
    },
}

/// One persisted map: what it should hold (`want`, changed by the data path) and what the disk
/// holds (`disk`, changed by the writer once a page is durable).
pub struct PersistedSet {
    want: Box<[AtomicU64]>,
    disk: Box<[AtomicU64]>,
    queued: Box<[AtomicBool]>,
    /// Per page: odd while a write of the page is in flight (the disk then holds either the
    /// old or the new content), even otherwise; bumped when a write starts and when it is
    /// durable. A page has one write in flight at most: a second would make the count even
    /// while the first may still land.
    flight_gen: Box<[AtomicU64]>,
    /// Per page: the `flight_gen` whose copy `flight` holds.
    flight_valid: Box<[AtomicU64]>,
    /// The copy of each page being written.
    flight: Box<[AtomicU64]>,
    /// Held by the cleaner while it clears bits and rechecks them, and by the writer while it
    /// copies a page: a page never goes to disk with a bit the cleaner cleared by mistake.
    lock: Box<[AtomicBool]>,
}

impl PersistedSet {
    fn new(layout: &Layout) -> Self {
        let words = layout.words() as usize;
        let pages = layout.pages_per_map as usize;
        Self {
            want: (0..words).map(|_| AtomicU64::new(0)).collect(),
            disk: (0..words).map(|_| AtomicU64::new(0)).collect(),
            queued: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            flight_gen: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            flight_valid: (0..pages).map(|_| AtomicU64::new(u64::MAX)).collect(),
            flight: (0..words).map(|_| AtomicU64::new(0)).collect(),
            lock: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn bit(t: u64) -> (usize, u64) {
        ((t / 64) as usize, 1u64 << (t % 64))
    }

    /// True when the disk holds the track's bit set (the last write of its page that
    /// completed; see [`PersistedSet::durable`] for what may be relied on).
    pub fn on_disk(&self, t: u64) -> bool {
        let (w, m) = Self::bit(t);
        self.disk[w].load(Ordering::SeqCst) & m != 0
    }

    /// The track's bit as the disk surely holds it, whatever becomes of a write of its page in
    /// flight; `None` when that write may change it. Called after the caller changed what it
    /// wants: a write that started before the change and copied the page without it is marked
    /// in flight first, so the caller then sees `None` and waits for the next write.
    pub fn durable(&self, t: u64) -> Option<bool> {
        let page = (t / TRACKS_PER_PAGE) as usize;
        let (w, m) = Self::bit(t);
        let gen = self.flight_gen[page].load(Ordering::SeqCst);
        let on_disk = self.disk[w].load(Ordering::SeqCst) & m != 0;
        if gen % 2 == 1 {
            // In flight: settled only if the copy being written agrees with the disk.
            if self.flight_valid[page].load(Ordering::SeqCst) != gen {
                return None;
            }
            let written = self.flight[w].load(Ordering::SeqCst) & m != 0;
            if written != on_disk {
                return None;
            }
        }
        (self.flight_gen[page].load(Ordering::SeqCst) == gen).then_some(on_disk)
    }

    /// True while a write of the page holding word `w` is in flight.
    pub fn word_in_flight(&self, w: usize) -> bool {
        self.flight_gen[w / WORDS_PER_PAGE as usize].load(Ordering::SeqCst) % 2 == 1
    }

    /// A write of `page` starts: marked in flight before the page is copied.
    fn begin_flight(&self, page: usize) -> u64 {
        self.flight_gen[page].fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The copy being written (after [`PersistedSet::begin_flight`]).
    fn publish_flight(&self, page: usize, gen: u64, words: &[u64]) {
        let lo = page * WORDS_PER_PAGE as usize;
        for (i, v) in words.iter().enumerate() {
            self.flight[lo + i].store(*v, Ordering::SeqCst);
        }
        self.flight_valid[page].store(gen, Ordering::SeqCst);
    }

    /// The write of `page` is durable (or was not needed): the disk holds `words`.
    fn end_flight(&self, page: usize, words: &[u64]) {
        let lo = page * WORDS_PER_PAGE as usize;
        for (i, v) in words.iter().enumerate() {
            self.disk[lo + i].store(*v, Ordering::SeqCst);
        }
        self.flight_gen[page].fetch_add(1, Ordering::SeqCst);
    }

    /// True when the track's bit should be set.
    pub fn wanted(&self, t: u64) -> bool {
        let (w, m) = Self::bit(t);
        self.want[w].load(Ordering::SeqCst) & m != 0
    }

    /// A word of the wanted bits.
    pub fn want_word(&self, w: usize) -> u64 {
        self.want[w].load(Ordering::SeqCst)
    }

    /// A word of the bits on disk.
    pub fn disk_word(&self, w: usize) -> u64 {
        self.disk[w].load(Ordering::SeqCst)
    }

    fn lock_page(&self, page: usize) {
        while self.lock[page]
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
    }

    fn unlock_page(&self, page: usize) {
        self.lock[page].store(false, Ordering::Release);
    }
}

/// Counters of the metadata writer.
#[derive(Debug, Default)]
pub struct MetaStats {
    /// Pages written.
    pub pages_written: AtomicU64,
    /// Header blocks written.
    pub headers_written: AtomicU64,
    /// Flushes of the metadata bdev.
    pub meta_flushes: AtomicU64,
    /// Flushes of P and S made before clearing bits.
    pub data_flushes: AtomicU64,
    /// Bits cleared by the cleaner.
    pub bits_cleaned: AtomicU64,
    /// Time spent flushing P and S before writing, in writing pages and headers, and in
    /// flushing the metadata bdev, ns (summed over batches: what a host write waiting for a
    /// batch waits for).
    pub data_flush_ns: AtomicU64,
    /// See `data_flush_ns`.
    pub page_write_ns: AtomicU64,
    /// See `data_flush_ns`.
    pub meta_flush_ns: AtomicU64,
    /// Times the writer was polled.
    pub writer_polls: AtomicU64,
    /// The writer's stage (high 32 bits) and requests in flight (low 32 bits).
    pub writer_stage: AtomicU64,
}

/// What the disk held when the pair's metadata was loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The newest valid header.
    pub header: HeaderRecord,
    /// Each map's bits, 64 tracks a word, the four every pair has and then the checkpoint
    /// slots' (none in metadata of format 1).
    pub maps: Vec<Vec<u64>>,
}

/// A pair's persisted metadata: the live maps and the requests for the writer.
pub struct Metadata {
    bdev: Arc<dyn Bdev>,
    layout: Layout,
    maps: Vec<PersistedSet>,
    /// Pages to write, as `map * pages_per_map + page`.
    queue: ArrayQueue<u64>,
    /// Tracks a host write touched since the cleaner last looked (64 a word).
    touched: Box<[AtomicU64]>,
    next_seq: AtomicU64,
    header_wanted: AtomicU64,
    header_durable: AtomicU64,
    /// Headers are not written while set: the pair was split with others and its split is
    /// durable only as a record of the split journal (see `pair::split_journal`), so no header
    /// may show the split on disk before that record does.
    header_held: AtomicBool,
    /// Set by a writer that has a header due while headers are held: the release wakes it.
    /// (A journaled release wakes no writer otherwise: its header is written lazily, and a
    /// group split of a thousand pairs would wake a thousand writers for nothing.)
    header_due_on_release: AtomicBool,
    /// The newest header number a durable split journal record stands for.
    journaled: AtomicU64,
    /// The pair's instance: set when its metadata is made, kept in every header, so a split
    /// journal record of an earlier pair of the same name never applies to a later one.
    instance: AtomicU64,
    /// The next header write must flush P and S first (a copy finished: PAIR must not be
    /// durable before the copied data is).
    header_flush_data: AtomicBool,
    sync_wanted: AtomicU64,
    sync_done: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// How long a track stays untouched before the cleaner clears its write-intent bit, ns.
    clean_interval_ns: AtomicU64,
    /// Wakes the writer from its rest when there is something to write.
    writer_waker: OnceLock<PollerWaker>,
    /// Counters.
    pub stats: MetaStats,
}

/// Default cleaning period (a write-intent bit goes after two periods without writes).
pub const DEFAULT_CLEAN_INTERVAL: Duration = Duration::from_secs(1);

impl Metadata {
    fn with_layout(bdev: Arc<dyn Bdev>, layout: Layout, seq: u64) -> Result<Self, MetaError> {
        let need = layout.size();
        let have = bdev.geometry().size();
        if have < need {
            return Err(MetaError::TooSmall { have, need });
        }
        let words = layout.words() as usize;
        Ok(Self {
            maps: (0..layout.maps)
                .map(|_| PersistedSet::new(&layout))
                .collect(),
            queue: ArrayQueue::new((layout.maps * layout.pages_per_map) as usize),
            touched: (0..words).map(|_| AtomicU64::new(0)).collect(),
            next_seq: AtomicU64::new(seq),
            header_wanted: AtomicU64::new(seq),
            header_durable: AtomicU64::new(seq),
            header_held: AtomicBool::new(false),
            header_due_on_release: AtomicBool::new(false),
            journaled: AtomicU64::new(0),
            instance: AtomicU64::new(0),
            header_flush_data: AtomicBool::new(false),
            sync_wanted: AtomicU64::new(0),
            sync_done: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            clean_interval_ns: AtomicU64::new(DEFAULT_CLEAN_INTERVAL.as_nanos() as u64),
            writer_waker: OnceLock::new(),
            stats: MetaStats::default(),
            bdev,
            layout,
        })
    }

    /// Writes fresh metadata for a new pair (header `rec`, every track pending) through the
    /// bdev, flushed, before the pair serves.
    pub fn initialize(bdev: Arc<dyn Bdev>, rec: &HeaderRecord) -> Result<Self, MetaError> {
        let layout = Layout::new(rec.tracks);
        let meta = Self::with_layout(bdev, layout, rec.seq)?;
        meta.instance.store(rec.instance, Ordering::SeqCst);
        let mut pending = vec![0u64; layout.words() as usize];
        for t in 0..layout.tracks {
            pending[(t / 64) as usize] |= 1 << (t % 64);
        }
        let empty = vec![0u64; layout.words() as usize];
        let mut io = BlockingIo::open(&meta.bdev)?;
        // The whole image in order: both header slots, then every map's pages in on-disk order
        // (contiguous), written in large requests, so a new pair costs a few writes and one
        // flush.
        let mut image = Image::new(&mut io);
        for slot in 0..HEADER_SLOTS {
            // Both slots: the older one is never left from a previous pair of that name.
            let mut r = rec.clone();
            if rec.seq % 2 != slot {
                r.seq = rec.seq.saturating_sub(1);
            }
            encode_header(&r, layout.format, image.next_block()?)?;
        }
        for map in layout.map_kinds() {
            let words = if map == MapKind::Pending {
                &pending
            } else {
                &empty
            };
            for page in 0..layout.pages_per_map {
                debug_assert_eq!(layout.page_offset(map, page), image.offset());
                let block = image.next_block()?;
                encode_page(map, page, &words[layout.page_words(page)], block);
            }
        }
        image.finish()?;
        io.flush()?;
        for (w, v) in pending.iter().enumerate() {
            meta.maps[0].want[w].store(*v, Ordering::SeqCst);
            meta.maps[0].disk[w].store(*v, Ordering::SeqCst);
        }
        Ok(meta)
    }

    /// Reads the metadata of an existing pair: the newest valid header and every page, each
    /// checked. Fails on any damage: such metadata is never trusted.
    pub fn load(bdev: Arc<dyn Bdev>, tracks: u64) -> Result<(Self, Loaded), MetaError> {
        let have = bdev.geometry().size();
        let smallest = Layout::with_format(tracks, FORMAT_BASE_MAPS_ONLY).size();
        if have < smallest {
            return Err(MetaError::TooSmall {
                have,
                need: smallest,
            });
        }
        let mut io = BlockingIo::open(&bdev)?;
        let mut best: Option<(HeaderRecord, u32)> = None;
        let mut errors = Vec::new();
        for slot in 0..HEADER_SLOTS {
            let buf = io.read(slot * BLOCK, BLOCK as usize)?;
            match decode_header(&buf) {
                Ok((h, f)) if best.as_ref().is_none_or(|(b, _)| h.seq > b.seq) => {
                    best = Some((h, f))
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("header slot {slot}: {e}")),
            }
        }
        let (header, format) = best.ok_or_else(|| MetaError::Corrupt(errors.join("; ")))?;
        if header.tracks != tracks {
            return Err(MetaError::Mismatch(format!(
                "{} tracks of {} bytes, not {tracks}",
                header.tracks, header.track_size
            )));
        }
        let layout = Layout::with_format(tracks, format);
        let meta = Self::with_layout(bdev, layout, header.seq)?;
        meta.instance.store(header.instance, Ordering::SeqCst);
        let mut maps = Vec::new();
        for map in layout.map_kinds() {
            let words = io.read_map(&layout, map)?;
            for (w, v) in words.iter().enumerate() {
                meta.maps[map.index()].want[w].store(*v, Ordering::SeqCst);
                meta.maps[map.index()].disk[w].store(*v, Ordering::SeqCst);
            }
            maps.push(words);
        }
        Ok((meta, Loaded { header, maps }))
    }

    /// The cleaning period.
    pub fn clean_interval(&self) -> Duration {
        Duration::from_nanos(self.clean_interval_ns.load(Ordering::Relaxed))
    }

    /// Changes the cleaning period (tests make it short).
    pub fn set_clean_interval(&self, d: Duration) {
        self.clean_interval_ns
            .store(d.as_nanos() as u64, Ordering::Relaxed);
        self.wake_writer();
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The metadata bdev.
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    /// A map.
    pub fn map(&self, map: MapKind) -> &PersistedSet {
        &self.maps[map.index()]
    }

    fn queue_page(&self, map: MapKind, page: u64) {
        let set = &self.maps[map.index()];
        if !set.queued[page as usize].swap(true, Ordering::SeqCst) {
            // The queue holds every page once at most: it cannot be full here.
            let _ = self
                .queue
                .push(map.index() as u64 * self.layout.pages_per_map + page);
            self.wake_writer();
        }
    }

    /// Gives the writer's waker: from now on, new work wakes it.
    pub(crate) fn set_writer_waker(&self, waker: PollerWaker) {
        let _ = self.writer_waker.set(waker);
    }

    /// Has the writer polled soon (it may be resting): called after publishing its work.
    pub(crate) fn wake_writer(&self) {
        if let Some(w) = self.writer_waker.get() {
            w.wake();
        }
    }

    /// Wants the bits of `bits` set in word `w` (tracks `64 * w ..`); queues the page when
    /// that changes it.
    pub fn want_set_word(&self, map: MapKind, w: usize, bits: u64) {
        if bits != 0
            && self.maps[map.index()].want[w].fetch_or(bits, Ordering::SeqCst) & bits != bits
        {
            self.queue_page(map, w as u64 / WORDS_PER_PAGE);
        }
    }

    /// Wants the track's bit clear; queues its page when that changes it. Under the page lock:
    /// the cleaner, which clears bits and sets back those a write shows up for, must not set
    /// back a bit a write wants clear.
    pub fn want_clear(&self, map: MapKind, t: u64) {
        let (w, m) = PersistedSet::bit(t);
        let set = &self.maps[map.index()];
        let page = (t / TRACKS_PER_PAGE) as usize;
        set.lock_page(page);
        let was = set.want[w].fetch_and(!m, Ordering::SeqCst) & m != 0;
        set.unlock_page(page);
        if was {
            self.queue_page(map, page as u64);
        }
    }

    /// Wants a whole map equal to `words` (64 tracks a word); queues the pages that change.
    /// Only for moments when no host write can run (the gate is closed and drained).
    pub fn want_exactly(&self, map: MapKind, words: impl Fn(usize) -> u64) {
        let set = &self.maps[map.index()];
        for (w, slot) in set.want.iter().enumerate() {
            let v = words(w);
            if slot.swap(v, Ordering::SeqCst) != v || set.disk_word(w) != v {
                self.queue_page(map, w as u64 / WORDS_PER_PAGE);
            }
        }
    }

    /// Wants the write-intent bits of the whole region (bitmap word) of track `t` set, for the
    /// tracks below `tracks`; queues the page when that changes it.
    pub fn want_set_region(&self, map: MapKind, t: u64, tracks: u64) {
        let (w, _) = PersistedSet::bit(t);
        let first = w as u64 * 64;
        let bits = match tracks.saturating_sub(first) {
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        };
        self.want_set_word(map, w, bits);
    }

    /// A host write is about to touch the track (the cleaner leaves its region alone for two
    /// periods).
    pub fn touch(&self, t: u64) {
        let (w, m) = PersistedSet::bit(t);
        if self.touched[w].load(Ordering::Relaxed) & m == 0 {
            self.touched[w].fetch_or(m, Ordering::SeqCst);
        }
    }

    /// Asks the writer to clean every bit it can and write everything out (a clean stop);
    /// returns the number to wait for with [`Metadata::synced`].
    pub fn request_sync(&self) -> u64 {
        let n = self.sync_wanted.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake_writer();
        n
    }

    /// True once sync request `n` is done.
    pub fn synced(&self, n: u64) -> bool {
        self.sync_done.load(Ordering::SeqCst) >= n
    }

    /// True when nothing is waiting to be written.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.header_wanted.load(Ordering::SeqCst) <= self.header_durable()
    }

    /// The writer could not write: every host write waiting on it fails.
    pub fn fail(&self, error: String) {
        let mut f = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        f.get_or_insert(error);
        self.failed.store(true, Ordering::SeqCst);
        drop(f);
        self.wake_writer();
    }

    /// Why the metadata cannot be written, if it cannot.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests;
