//! The metadata writer: one poller per persisted pair, on the copier's reactor. It writes the
//! pages and headers the data path asks for, in batches, and clears write-intent bits lazily.
//!
//! A batch goes through up to three steps, each waiting for the previous one:
//! 1. when it clears a bit of the pending or restore map, or carries the header that ends a
//!    copy: flush P and S, so the data that made those bits unnecessary is durable first;
//! 2. write the pages (a copy of the wanted bits taken under the page lock) and the header;
//! 3. flush the metadata bdev; only then does the writer publish the pages as on disk and the
//!    header number as durable, and wake the host writes waiting for them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use drivers::{IoBufs, IoChannel, IoCompletion, IoOp, IoRequest};
use hugepages::{BufferPool, DmaBuf};

use super::{encode_header, encode_page, MapKind, Metadata, BLOCK, HEADER_SLOTS, WORDS_PER_PAGE};
use crate::pair::Pair;
use crate::reactor::{PollStatus, Poller, PollerWaker, ReactorContext};

/// Pages written per batch at most.
const BATCH_PAGES: usize = 64;
/// Bitmap words the cleaner looks at per poll (a bounded slice of work per reactor turn).
const CLEAN_WORDS_PER_POLL: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Idle,
    FlushingData,
    Writing,
    FlushingMeta,
    /// Waiting for buffers from the reactor's shared pool to write the batch (last: the
    /// stage's number is published in the writer's statistics).
    Buffers,
}

struct PageWrite {
    map: MapKind,
    page: u64,
    words: Vec<u64>,
}

#[derive(Default)]
struct Batch {
    pages: Vec<PageWrite>,
    header: Option<u64>,
    header_block: Option<Vec<u8>>,
}

/// The writer poller of one pair.
pub struct MetaWriter {
    pair: Arc<Pair>,
    meta: Arc<Metadata>,
    name: String,
    ch: Option<Box<dyn IoChannel>>,
    p: Option<Box<dyn IoChannel>>,
    s: Option<Box<dyn IoChannel>>,
    pool: Option<BufferPool>,
    stage: Stage,
    /// When the current stage began (for the stage time statistics).
    stage_began: Instant,
    batch: Batch,
    outstanding: u32,
    error: Option<String>,
    /// When the last cleaning pass ended (the next starts a cleaning period later; a pass cut
    /// into slices goes on at once until its cursor wraps).
    last_pass: Instant,
    clean_cursor: usize,
    /// A clean stop asked for everything: the cleaner's full pass for it is done.
    sync_target: u64,
    /// The cleaner cleared bits whose meaning involves P (mirrored tracks, restored tracks):
    /// P is flushed before they are written.
    p_flush_due: bool,
    /// Per word, the tracks touched in the previous cleaning pass: a bit is cleared only for
    /// a track untouched for two whole passes.
    touched_prev: Vec<u64>,
    /// A cleaning pass or a sync ran: a header the split journal already holds is written now.
    header_due: bool,
    /// The cleaning pass under way has seen a bit it may have to clear one day.
    pass_saw_bits: bool,
    /// The last whole pass saw no bit to clear and no page was written since: the writer
    /// rests until something wakes it, not until its next pass (ten thousand idle pairs'
    /// writers would otherwise each make a pass a second).
    nothing_to_clean: bool,
    scratch: Vec<IoCompletion>,
}

impl MetaWriter {
    /// A writer for `pair`, whose metadata is `meta`.
    pub fn new(pair: Arc<Pair>, meta: Arc<Metadata>) -> Self {
        let name = format!("metadata:{}", pair.name());
        let words = meta.layout.words() as usize;
        Self {
            last_pass: Instant::now(),
            pair,
            meta,
            name,
            ch: None,
            p: None,
            s: None,
            pool: None,
            stage: Stage::Idle,
            stage_began: Instant::now(),
            batch: Batch::default(),
            outstanding: 0,
            error: None,
            clean_cursor: 0,
            sync_target: 0,
            p_flush_due: false,
            touched_prev: vec![0; words],
            header_due: false,
            pass_saw_bits: false,
            nothing_to_clean: false,
            scratch: Vec::new(),
        }
    }

    fn open(&mut self, cx: &ReactorContext) -> bool {
        if self.ch.is_some() {
            return true;
        }
        let ctx = cx.channel_context(BATCH_PAGES as u32 + 2);
        let opened = (|| {
            let ch = self.meta.bdev().open_channel(&ctx)?;
            let p = self.pair.primary().open_channel(&ctx)?;
            let s = self.pair.secondary().open_channel(&ctx)?;
            let pool = crate::staging::shared_pool(BLOCK as usize)?;
            Ok::<_, drivers::BdevError>((ch, p, s, pool))
        })();
        match opened {
            Ok((ch, p, s, pool)) => {
                self.ch = Some(ch);
                self.p = Some(p);
                self.s = Some(s);
                self.pool = Some(pool);
                true
            }
            Err(e) => {
                self.fail(format!("cannot open the metadata writer's channels: {e}"));
                false
            }
        }
    }

    /// Moves to `next`, adding the time spent in the stage it leaves to the statistics.
    fn enter(&mut self, next: Stage) {
        let now = Instant::now();
        let spent = now.duration_since(self.stage_began).as_nanos() as u64;
        let stats = &self.meta.stats;
        let counter = match self.stage {
            Stage::FlushingData => Some(&stats.data_flush_ns),
            Stage::Writing => Some(&stats.page_write_ns),
            Stage::FlushingMeta => Some(&stats.meta_flush_ns),
            Stage::Idle | Stage::Buffers => None,
        };
        if let Some(c) = counter {
            c.fetch_add(spent, Ordering::Relaxed);
        }
        self.stage = next;
        self.stage_began = now;
    }

    fn fail(&mut self, error: String) {
        self.meta.fail(error.clone());
        self.pair
            .fail(format!("pair metadata cannot be written: {error}"));
        self.batch = Batch::default();
        self.stage = Stage::Idle;
    }

    /// Clears the write-intent bits of tracks that no longer need them, over a bounded slice of
    /// the maps: pending bits of tracks S holds (not pending, no write in flight, in a region
    /// no write touched for two passes), restore bits of tracks P holds again. A bit is cleared under its
    /// page lock and set back if a write shows up meanwhile, so a page copy never misses it.
    /// `all` (a clean stop, host writes drained) passes over every word and ignores `touched`.
    fn clean(&mut self, all: bool) -> bool {
        let words = self.meta.layout.words() as usize;
        let limit = if all { words } else { CLEAN_WORDS_PER_POLL };
        let pair = Arc::clone(&self.pair);
        let meta = Arc::clone(&self.meta);
        let mut changed = false;
        // After a split a cleared bit only says S holds the image (P need not be flushed). A
        // split landing during the pass is taken as mirroring: a needless flush at worst.
        let mirroring = !matches!(
            pair.state(),
            crate::pair::PairState::Psus | crate::pair::PairState::Psue
        );
        let start = if all { 0 } else { self.clean_cursor };
        let end = (start + limit).min(words);
        for w in start..end {
            let first = w as u64 * 64;
            if first >= pair.tracks() {
                break;
            }
            let touched_word = &meta.touched[w];
            let now = if all || touched_word.load(Ordering::Relaxed) == 0 {
                0
            } else {
                touched_word.swap(0, Ordering::SeqCst)
            };
            // Write-intent bits go by region (the whole word): a touch keeps all of them.
            let touched = if all || now | std::mem::replace(&mut self.touched_prev[w], now) == 0 {
                0
            } else {
                u64::MAX
            };
            let page = w / WORDS_PER_PAGE as usize;
            // Pending map: a bit may go when S holds the track.
            let d = meta.map(MapKind::Pending);
            if d.want_word(w) | meta.map(MapKind::Restore).want_word(w) != 0 {
                self.pass_saw_bits = true;
            }
            let cand = d.want_word(w) & !pair.pending.bits64(w) & !touched;
            if cand != 0 {
                d.lock_page(page);
                let had = d.want[w].fetch_and(!cand, Ordering::SeqCst) & cand;
                let mut kept = 0u64;
                let mut bits = had;
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let t = first + b;
                    let busy = pair.mirrored_writes_in_flight(t..t + 1)
                        || (!all && touched_word.load(Ordering::SeqCst) != 0)
                        || pair.pending.is_pending(t);
                    if busy {
                        kept |= 1 << b;
                    }
                }
                if kept != 0 {
                    d.want[w].fetch_or(kept, Ordering::SeqCst);
                }
                d.unlock_page(page);
                let cleared = had & !kept;
                tracing::trace!(pair = %pair.name(), word = w, cleared, kept, "pending bits cleared");
                if cleared != 0 && mirroring {
                    self.p_flush_due = true;
                }
                if cleared != 0 {
                    meta.stats
                        .bits_cleaned
                        .fetch_add(cleared.count_ones() as u64, Ordering::Relaxed);
                    meta.queue_page(MapKind::Pending, page as u64);
                    changed = true;
                }
            }
            // Restore map: a bit may go when P holds the track again.
            let r = meta.map(MapKind::Restore);
            // (And when every checkpoint slot host writes mark holds it on disk: the restore
            // changed P, and after a crash the restore map is what adds it to the slot.)
            let cand =
                r.want_word(w) & !pair.restore.raw_word(w) & pair.checkpoint_marks_durable_word(w);
            if cand != 0 {
                r.lock_page(page);
                let had = r.want[w].fetch_and(!cand, Ordering::SeqCst) & cand;
                let back = had & pair.restore.raw_word(w);
                if back != 0 {
                    r.want[w].fetch_or(back, Ordering::SeqCst);
                }
                r.unlock_page(page);
                if had & !back != 0 {
                    meta.queue_page(MapKind::Restore, page as u64);
                    self.p_flush_due = true;
                    changed = true;
                }
            }
        }
        if !all {
            self.clean_cursor = if end >= words { 0 } else { end };
            if self.clean_cursor == 0 {
                self.nothing_to_clean = !std::mem::take(&mut self.pass_saw_bits);
            }
        }
        changed
    }

    /// Gathers the next batch: queued pages and a wanted header.
    fn gather(&mut self) -> bool {
        let meta = Arc::clone(&self.meta);
        let mut batch = Batch::default();
        let mut clears = fill_batch(&meta, &mut batch);
        let mut flush_p = self.p_flush_due && clears;
        let wanted = meta.header_wanted.load(Ordering::SeqCst);
        // A header whose state the split journal already holds is written with the next
        // pages, cleaning pass or sync, not at once: after a split of a thousand pairs, a
        // thousand header writes and flushes would compete with everything else.
        let due = self.header_due || !batch.pages.is_empty() || wanted > meta.state_durable_seq();
        // A pass or sync asked for the header: noted before the hold is read, so a release of
        // the hold wakes this writer (see `Metadata::release_header`).
        meta.note_header_due(self.header_due && wanted > meta.header_durable());
        // The hold is read after the number: it was set before a held number was taken.
        let held = meta.header_held();
        if !held && wanted <= meta.header_durable() {
            // Nothing to write; a header held back keeps the pass or sync that asked for it.
            self.header_due = false;
        }
        if wanted > meta.header_durable() && !held && due {
            self.header_due = false;
            if meta.header_flush_data.swap(false, Ordering::SeqCst) {
                clears = true;
                flush_p = true;
            }
            // The state is read after the number: the header holds at least that state.
            let rec = self.pair.header_record(wanted);
            let mut block = vec![0u8; BLOCK as usize];
            match encode_header(&rec, meta.layout.format, &mut block) {
                Ok(()) => {
                    batch.header = Some(wanted);
                    batch.header_block = Some(block);
                }
                Err(e) => {
                    self.fail(e.to_string());
                    return false;
                }
            }
        }
        if meta.queue.is_empty() {
            // Every page the cleaner queued is in this batch or an earlier one.
            self.p_flush_due = false;
        }
        if !batch.pages.is_empty() {
            // Bits were set or cleared: the cleaner looks again.
            self.nothing_to_clean = false;
        }
        if batch.pages.is_empty() && batch.header.is_none() {
            return false;
        }
        self.batch = batch;
        // Only a device written since its last flush is flushed (read after the copies: a
        // write that made a bit unnecessary was noted before the bit was cleared). S holds the
        // copies every cleared bit relies on; P matters for bits the cleaner cleared while
        // mirroring (S equals P) and for restored tracks.
        let flush_s = clears && self.pair.take_dirty(false);
        let flush_p = flush_p && self.pair.take_dirty(true);
        tracing::trace!(
            pair = %self.pair.name(),
            pages = ?self.batch.pages.iter().map(|pw| (pw.map, pw.page)).collect::<Vec<_>>(),
            header = ?self.batch.header,
            flush_p,
            flush_s,
            "metadata batch gathered"
        );
        if flush_p || flush_s {
            self.enter(Stage::FlushingData);
            let chans = [
                self.p.as_mut().filter(|_| flush_p),
                self.s.as_mut().filter(|_| flush_s),
            ];
            for ch in chans.into_iter().flatten() {
                if ch
                    .submit(IoRequest::without_data(IoOp::Flush, 0, 0, 0))
                    .is_ok()
                {
                    self.outstanding += 1;
                } else {
                    self.error
                        .get_or_insert_with(|| "a data flush was refused".into());
                }
            }
            self.meta.stats.data_flushes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.write_batch();
        }
        true
    }

    fn write_batch(&mut self) {
        let layout = self.meta.layout;
        let mut reqs = Vec::new();
        let Some(pool) = self.pool.as_ref() else {
            return;
        };
        // Every buffer of the batch first, from the reactor's shared pool: when it cannot give
        // them all now, the batch waits for buffers to come back (others' writes complete).
        let wanted = self.batch.pages.len() + usize::from(self.batch.header.is_some());
        let mut bufs: Vec<DmaBuf> = Vec::with_capacity(wanted);
        while bufs.len() < wanted {
            match pool.get() {
                Some(b) => bufs.push(b),
                None => {
                    self.stage = Stage::Buffers;
                    return;
                }
            }
        }
        self.enter(Stage::Writing);
        for pw in &self.batch.pages {
            let Some(mut buf) = bufs.pop() else {
                self.error
                    .get_or_insert_with(|| "no buffer for a metadata page".into());
                break;
            };
            encode_page(pw.map, pw.page, &pw.words, buf.as_mut_slice());
            let mut bufs = IoBufs::new();
            bufs.push(buf);
            reqs.push(IoRequest::write(
                layout.page_offset(pw.map, pw.page),
                bufs,
                0,
            ));
        }
        if let (Some(seq), Some(block)) = (self.batch.header, &self.batch.header_block) {
            match bufs.pop() {
                Some(mut buf) => {
                    buf.as_mut_slice().copy_from_slice(block);
                    let mut bufs = IoBufs::new();
                    bufs.push(buf);
                    reqs.push(IoRequest::write((seq % HEADER_SLOTS) * BLOCK, bufs, 0));
                }
                None => {
                    self.error
                        .get_or_insert_with(|| "no buffer for the pair header".into());
                }
            }
        }
        let Some(ch) = self.ch.as_mut() else { return };
        for req in reqs {
            match ch.submit(req) {
                Ok(()) => self.outstanding += 1,
                Err(e) => {
                    self.error.get_or_insert_with(|| {
                        format!("a metadata write was refused: {:?}", e.error)
                    });
                }
            }
        }
    }

    fn flush_meta(&mut self) {
        self.enter(Stage::FlushingMeta);
        if let Some(ch) = self.ch.as_mut() {
            match ch.submit(IoRequest::without_data(IoOp::Flush, 0, 0, 0)) {
                Ok(()) => self.outstanding += 1,
                Err(_) => {
                    self.error
                        .get_or_insert_with(|| "the metadata flush was refused".into());
                }
            }
        }
        self.meta.stats.meta_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// The batch is durable: publish it.
    fn commit(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        let meta = &self.meta;
        for pw in &batch.pages {
            let set = meta.map(pw.map);
            set.end_flight(pw.page as usize, &pw.words);
        }
        tracing::trace!(pair = %self.pair.name(), header = ?batch.header, "metadata batch durable");
        meta.stats
            .pages_written
            .fetch_add(batch.pages.len() as u64, Ordering::Relaxed);
        if let Some(seq) = batch.header {
            meta.header_durable.fetch_max(seq, Ordering::SeqCst);
            meta.stats.headers_written.fetch_add(1, Ordering::Relaxed);
        }
        self.enter(Stage::Idle);
        self.pair.wake_all();
    }

    /// Nothing more to do: the pair is deleted or its metadata device failed, and no I/O of
    /// the writer is outstanding.
    fn finished(&self) -> bool {
        (self.pair.is_deleted() || self.meta.failure().is_some()) && self.outstanding == 0
    }

    fn advance(&mut self) {
        if self.outstanding > 0 || self.stage == Stage::Idle {
            return;
        }
        if let Some(e) = self.error.take() {
            self.fail(e);
            return;
        }
        match self.stage {
            Stage::FlushingData | Stage::Buffers => self.write_batch(),
            Stage::Writing => self.flush_meta(),
            Stage::FlushingMeta => self.commit(),
            Stage::Idle => {}
        }
        if self.outstanding == 0 && !matches!(self.stage, Stage::Idle | Stage::Buffers) {
            // Nothing could be issued: report it rather than wait forever.
            let e = self
                .error
                .take()
                .unwrap_or_else(|| "metadata I/O could not be issued".into());
            self.fail(e);
        }
    }
}

/// Takes queued pages into `batch` (up to [`BATCH_PAGES`]); true when one clears a pending or
/// restore bit the disk holds.
fn fill_batch(meta: &Metadata, batch: &mut Batch) -> bool {
    let mut clears = false;
    while batch.pages.len() < BATCH_PAGES {
        let Some((map, page)) = next_queued_page(meta, batch) else {
            break;
        };
        if let Some((pw, clear)) = take_page(meta, map, page) {
            clears |= clear;
            batch.pages.push(pw);
        }
    }
    clears
}

/// The next queued page for the batch being gathered. A page already in the batch was queued
/// again after its copy was taken (a bit changed meanwhile): it waits for the next batch. A
/// second flight of the page before the first is durable would end the first one's "in flight"
/// mark, and a host write would trust a disk that the first copy, still to be written, changes.
fn next_queued_page(meta: &Metadata, batch: &Batch) -> Option<(MapKind, u64)> {
    let ppm = meta.layout.pages_per_map;
    let code = meta.queue.pop()?;
    let map = meta.layout.map_at(code / ppm);
    let page = code % ppm;
    if batch
        .pages
        .iter()
        .any(|pw| pw.map == map && pw.page == page)
    {
        // Still marked queued, so back in the queue (it has room: the code just left it).
        let _ = meta.queue.push(code);
        return None;
    }
    Some((map, page))
}

/// Takes a copy of a queued page's wanted bits to write, marked in flight; `None` when the disk
/// already holds them. With the copy: whether it clears a pending or restore bit the disk holds
/// (the data those bits protect is flushed first).
fn take_page(meta: &Metadata, map: MapKind, page: u64) -> Option<(PageWrite, bool)> {
    let set = meta.map(map);
    // Unqueued before the copy: a bit changed after the copy queues the page again.
    set.queued[page as usize].store(false, Ordering::SeqCst);
    // In flight before the copy: whoever changes a bit after the copy sees it and waits for
    // the next write instead of trusting the disk's old content.
    let gen = set.begin_flight(page as usize);
    let range = meta.layout.page_words(page);
    let (lo, hi) = (range.start, range.end);
    set.lock_page(page as usize);
    let words: Vec<u64> = (lo..hi).map(|w| set.want_word(w)).collect();
    set.unlock_page(page as usize);
    if (lo..hi).all(|w| set.disk_word(w) == words[w - lo]) {
        set.end_flight(page as usize, &words);
        return None;
    }
    set.publish_flight(page as usize, gen, &words);
    let clears = matches!(map, MapKind::Pending | MapKind::Restore)
        && (lo..hi).any(|w| set.disk_word(w) & !words[w - lo] != 0);
    Some((PageWrite { map, page, words }, clears))
}

impl Poller for MetaWriter {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.finished() {
            return PollStatus::Done;
        }
        if !self.open(cx) {
            return PollStatus::Done;
        }
        let mut busy = false;
        for which in 0..3 {
            let mut scratch = std::mem::take(&mut self.scratch);
            let ch = match which {
                0 => self.ch.as_mut(),
                1 => self.p.as_mut(),
                _ => self.s.as_mut(),
            };
            if let Some(ch) = ch {
                ch.poll(&mut scratch);
            }
            for c in scratch.drain(..) {
                busy = true;
                self.outstanding = self.outstanding.saturating_sub(1);
                if let Err(e) = c.result {
                    let what = ["metadata", "primary flush", "secondary flush"][which];
                    self.error.get_or_insert_with(|| format!("{what}: {e}"));
                }
            }
            self.scratch = scratch;
        }
        self.advance();
        // Checked again before a new batch is gathered: a failed device would otherwise be
        // retried for ever, and the poller with the pair it holds would never end.
        if self.finished() {
            return PollStatus::Done;
        }
        let stats = &self.meta.stats;
        stats.writer_polls.fetch_add(1, Ordering::Relaxed);
        stats.writer_stage.store(
            (self.stage as u64) << 32 | self.outstanding as u64,
            Ordering::Relaxed,
        );
        if self.stage != Stage::Idle {
            return PollStatus::Busy;
        }
        let now = Instant::now();
        let sync_wanted = self.meta.sync_wanted.load(Ordering::SeqCst);
        if sync_wanted > self.sync_target {
            self.clean(true);
            self.sync_target = sync_wanted;
            self.header_due = true;
        } else if now >= self.last_pass + self.meta.clean_interval() {
            // A pass that changed nothing and is over leaves the turn idle: a thousand idle
            // writers would otherwise make a thousand busy turns a second.
            let changed = self.clean(false);
            self.header_due = true;
            if self.clean_cursor == 0 {
                self.last_pass = now;
            }
            busy |= changed || self.clean_cursor != 0;
        }
        if self.gather() {
            return PollStatus::Busy;
        }
        if self.sync_target > self.meta.sync_done.load(Ordering::SeqCst) && self.meta.idle() {
            self.meta
                .sync_done
                .store(self.sync_target, Ordering::SeqCst);
        }
        let next_pass = self.last_pass + self.meta.clean_interval();
        if busy {
            PollStatus::Busy
        } else if self.outstanding == 0 && self.clean_cursor == 0 {
            // Queued pages, header requests, syncs and failures wake it; the cleaner's timer
            // ends the rest while there may be bits to clear or a header to write lazily.
            let lazy_header = self.meta.header_wanted() > self.meta.header_durable();
            if self.nothing_to_clean && !lazy_header {
                PollStatus::Rest(None)
            } else {
                PollStatus::Rest(Some(next_pass))
            }
        } else {
            cx.wake_at(next_pass);
            PollStatus::Idle
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn attach_waker(&mut self, waker: PollerWaker) {
        self.meta.set_writer_waker(waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::metadata::Layout;
    use drivers::malloc::MallocBdev;
    use drivers::Bdev;

    #[test]
    fn a_page_queued_again_while_its_batch_is_gathered_waits_for_the_next_batch() {
        let layout = Layout::new(64);
        let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::create("m", layout.size(), 4096).unwrap());
        let meta = Metadata::with_layout(bdev, layout, 1).unwrap();
        let pending = meta.map(MapKind::Pending);
        // The disk holds track 3's write-intent bit; the cleaner clears it.
        pending.want[0].store(1 << 3, Ordering::SeqCst);
        pending.disk[0].store(1 << 3, Ordering::SeqCst);
        pending.want[0].fetch_and(!(1 << 3), Ordering::SeqCst);
        meta.queue_page(MapKind::Pending, 0);
        let mut batch = Batch::default();
        assert!(fill_batch(&meta, &mut batch), "the batch clears a bit");
        assert_eq!(batch.pages.len(), 1);
        assert_eq!(batch.pages[0].words[0], 0);
        // A host write on track 3 wants its region back, which queues the page again, while
        // the batch is still being gathered (the gathering goes on after the write).
        meta.want_set_region(MapKind::Pending, 3, 64);
        assert_eq!(pending.durable(3), None);
        fill_batch(&meta, &mut batch);
        // The write keeps waiting: the copy about to be written lacks its bit.
        assert_eq!(pending.durable(3), None);
        assert_eq!(batch.pages.len(), 1, "the page waits for the next batch");
        for pw in &batch.pages {
            pending.end_flight(pw.page as usize, &pw.words);
        }
        assert_eq!(pending.durable(3), Some(false));
        // The next batch writes the bit back; only then may the write go.
        let mut batch = Batch::default();
        fill_batch(&meta, &mut batch);
        assert_eq!(batch.pages.len(), 1);
        assert_eq!(batch.pages[0].words[0], u64::MAX);
        assert_eq!(pending.durable(3), None);
        pending.end_flight(batch.pages[0].page as usize, &batch.pages[0].words);
        assert_eq!(pending.durable(3), Some(true));
    }
}
