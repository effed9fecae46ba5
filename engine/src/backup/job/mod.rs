//! The backup job: a poller that reads the ranges of the image its plan stores
//! ([`super::plan`]), piece by piece, and streams them, in order, to the target ([`flow`]), computing the per-chunk CRC-32C on the way and handing written pieces to the tree
//! digest's hashing pollers ([`super::tree`]). Before the backup is done, its chunk digests are
//! made durable in the state directory (by a thread: the reactor never waits for a disk).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::digest::{ChunkDigests, TREE_CHUNK_SIZE};
use drivers::sink::{Sink, SinkDone};
use drivers::tape::{ChunkCrcs, ImageChecksums, Manifest, CHUNK_SIZE, FORMAT};
use drivers::{IoBufs, IoChannel, IoCompletion};
use hugepages::BufferPool;

mod flow;

use super::plan::{Cursor, Plan};
use super::target::{open_sink, Connection};
use super::tree::{Seal, Sealed, TreeHash};
use super::{Backup, BackupState, Checksums, Mode};
use crate::pair::channel::{PairChannel, View};
use crate::pair::control::{Action, ControlQueue, OutcomeReceiver};
use crate::pair::{now_ns, HostWatch, Pair, PairState};
use crate::rate::TokenBucket;
use crate::reactor::{PollStatus, Poller, ReactorContext};

/// A piece of the image read and written as one vectored request: staging buffers of one track
/// each (at most 1 MiB), so a buffer never holds parts of two tracks.
const PIECE: u64 = 1 << 20;
/// Largest staging buffer.
const MAX_BUF: u64 = 1 << 20;

// A piece holds whole chunks of the tree digest (the image's last piece ends with its last
// chunk), so each hashing poller hashes whole chunks.
const _: () = assert!(PIECE.is_multiple_of(TREE_CHUNK_SIZE) && MAX_BUF <= PIECE);

/// The piece size for staging buffers of `buf_size` bytes: [`PIECE`], or one buffer if larger.
fn piece_size(buf_size: u64) -> u64 {
    PIECE.max(buf_size)
}
/// Bytes of the image between reading and the target's acknowledgement.
const WINDOW: u64 = 32 << 20;
/// The same while hosts use the pair: two pieces, one read while the other is written, so
/// a host request never queues behind more than a piece or two of backup I/O.
const HOST_WINDOW: u64 = 2 * PIECE;

enum Source {
    /// The image through the pair (merge).
    Image(Box<PairChannel>),
    /// S itself (wait, reflect).
    Secondary(Box<dyn IoChannel>),
}

impl Source {
    fn channel(&mut self) -> &mut dyn IoChannel {
        match self {
            Source::Image(c) => c.as_mut(),
            Source::Secondary(c) => c.as_mut(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// `wait`: the copier runs at full speed until nothing is pending.
    Waiting,
    Streaming,
    /// Every piece is written and hashed: the chunk digests are being made durable.
    Sealing,
    Finishing,
    /// Written and durable: the pair's checkpoint is being made (the backup still holds the
    /// pair in its split meanwhile).
    Checkpointing,
    /// Letting reads and writes in flight finish before ending in this state.
    Draining(BackupState),
}

/// The job.
pub struct BackupJob {
    backup: Arc<Backup>,
    pair: Arc<Pair>,
    name: String,
    phase: Phase,
    src: Option<Source>,
    sink: Option<Box<dyn Sink>>,
    /// Staging buffers of one track each, at most [`MAX_BUF`].
    pool: BufferPool,
    piece: u64,
    size: u64,
    /// The ranges of the image to store.
    plan: Plan,
    /// The next piece to read.
    read_at: Cursor,
    /// Bytes read or being read.
    issued: u64,
    reading: BTreeMap<u64, ()>,
    ready: BTreeMap<u64, IoBufs>,
    /// The next piece for the target.
    sink_at: Cursor,
    /// Bytes handed to the target.
    sunk: u64,
    /// Bytes the target acknowledged.
    acked: u64,
    /// The next of the plan's writes of zeroes to ask the target for.
    next_zeroes: usize,
    /// Writes of zeroes the target has not acknowledged yet.
    zeroing: usize,
    /// The CRC-32C of each chunk, computed here on the way to the target.
    crcs: Option<ChunkCrcs>,
    /// The initial manifest; the final one once every checksum is known.
    manifest: Manifest,
    /// Reflect: image offset up to which on-demand copies have been asked for.
    asked: u64,
    started: Instant,
    error: Option<String>,
    src_done: Vec<IoCompletion>,
    sink_done: Vec<SinkDone>,
    /// A network target's connection, made by the control thread.
    connection: Option<Connection>,
    /// The tree digest's hashing pollers (and the flat SHA-256's, when asked for).
    tree: Arc<TreeHash>,
    /// The root (`sha256-tree:<hex>`) and the chunk digests, once every chunk is hashed.
    root: Option<String>,
    chunk_digests: Option<ChunkDigests>,
    /// Written pieces waiting for room in the hashers' ring.
    to_hash: VecDeque<(u64, IoBufs)>,
    /// The chunk digests being made durable in the state directory.
    seal: Seal,
    /// The backup's rate limit.
    bucket: TokenBucket,
    /// Whether hosts use the pair.
    hosts: HostWatch,
    /// Where the checkpoint is made (set when the backup makes one).
    control: Option<Arc<ControlQueue>>,
    /// The outcome of the checkpoint asked for.
    checkpoint_reply: Option<OutcomeReceiver>,
    /// Reads are held back for hosts (counted once per stretch).
    yielding: bool,
    /// The target's socket is watched by the reactor.
    watching: bool,
}

impl BackupJob {
    /// The staging buffers a backup of `pair` streams through. Made by the caller, off the
    /// reactor: mapping and locking tens of MiB of fresh memory takes milliseconds (70 ms on a
    /// virtual machine that gives freed pages back to its host), which the reactor's other
    /// pollers, hosts' connections among them, would wait through.
    pub fn staging_pool(pair: &Pair) -> Result<BufferPool, String> {
        let buf_size = pair.track_size().min(MAX_BUF);
        let piece = piece_size(buf_size);
        // The window between reading and the target's acknowledgement, and as much again for
        // pieces written and waiting for the hashers: a hash running behind must not take
        // buffers from the reads.
        let count = (2 * WINDOW / buf_size).max(2 * piece / buf_size) as usize;
        BufferPool::new(buf_size as usize, count).map_err(|e| e.to_string())
    }

    /// A job for `backup` of the ranges `plan` stores of `pair`'s image, streaming through
    /// `pool` (from [`BackupJob::staging_pool`]); `connection` is a network target's, from
    /// [`super::target::connect`]; `tree` hashes the written pieces; the chunk digests are kept
    /// at `digests_path`.
    pub fn new(
        backup: Arc<Backup>,
        pair: Arc<Pair>,
        plan: Plan,
        pool: BufferPool,
        connection: Option<Connection>,
        tree: Arc<TreeHash>,
        digests_path: PathBuf,
    ) -> Self {
        let g = pair.geometry();
        let hosts = HostWatch::new(&pair);
        let manifest = Manifest {
            format: FORMAT.to_string(),
            pair: pair.name().to_string(),
            volume_size: g.size(),
            block_size: g.block_size,
            track_size: pair.track_size(),
            split_at_ns: backup.split_at_ns,
            mode: backup.mode.as_str().to_string(),
            created_at_ns: now_ns(),
            chunk_size: CHUNK_SIZE,
            flat_sha256: backup.flat_sha256,
            digest: None,
            sha256: None,
            chunks_crc32c: None,
            kind: plan.kind(),
            checkpoint: backup.checkpoint.clone(),
            base_checkpoint: plan.base().map(|b| b.checkpoint.clone()),
            base_digest: plan.base().map(|b| b.digest.clone()),
        };
        Self {
            name: format!("backup:{}", backup.id),
            piece: piece_size(pool.buf_size() as u64),
            size: g.size(),
            backup,
            pair,
            phase: Phase::Open,
            src: None,
            sink: None,
            pool,
            plan,
            read_at: Cursor::default(),
            issued: 0,
            reading: BTreeMap::new(),
            ready: BTreeMap::new(),
            sink_at: Cursor::default(),
            sunk: 0,
            acked: 0,
            next_zeroes: 0,
            zeroing: 0,
            crcs: None,
            manifest,
            control: None,
            checkpoint_reply: None,
            asked: 0,
            started: Instant::now(),
            error: None,
            src_done: Vec::new(),
            sink_done: Vec::new(),
            connection,
            tree,
            root: None,
            chunk_digests: None,
            to_hash: VecDeque::new(),
            seal: Seal::new(digests_path),
            bucket: TokenBucket::default(),
            hosts,
            yielding: false,
            watching: false,
        }
    }

    fn open(&mut self, cx: &ReactorContext) -> Result<(), String> {
        let ctx = cx.channel_context(64);
        let src = match self.backup.mode {
            Mode::Merge => Source::Image(Box::new(
                PairChannel::new(Arc::clone(&self.pair), View::Image, &ctx)
                    .map_err(|e| e.to_string())?,
            )),
            Mode::Wait | Mode::Reflect => Source::Secondary(
                self.pair
                    .secondary()
                    .open_channel(&ctx)
                    .map_err(|e| e.to_string())?,
            ),
        };
        let block_size = self.pair.geometry().block_size;
        let sink = open_sink(
            &self.backup.target,
            self.connection.take(),
            &self.manifest,
            (self.size, block_size),
            self.plan.stored(),
            &ctx,
        )?;
        self.crcs = Some(ChunkCrcs::new(CHUNK_SIZE).map_err(|e| e.to_string())?);
        self.src = Some(src);
        self.sink = Some(sink);
        Ok(())
    }

    /// Asks the control poller for the backup's checkpoint, if it makes one.
    fn request_checkpoint(&mut self) -> Result<Option<OutcomeReceiver>, String> {
        let (Some(name), Some(control)) = (&self.backup.checkpoint, &self.control) else {
            return Ok(None);
        };
        let action = Action::Checkpoint {
            name: name.clone(),
            backup_id: self.backup.id,
            split_at_ns: self.backup.split_at_ns,
        };
        control
            .submit(vec![Arc::clone(&self.pair)], action)
            .map(Some)
    }

    fn fail_checkpoint(&mut self, error: String) {
        let name = self.backup.checkpoint.clone().unwrap_or_default();
        self.fail(format!(
            "the image was written, but checkpoint '{name}' could not be made: {error}"
        ));
    }

    /// Has the job make the backup's checkpoint through `control` when it is done.
    pub fn with_control(mut self, control: Arc<ControlQueue>) -> Self {
        self.control = Some(control);
        self
    }

    fn fail(&mut self, msg: String) {
        if self.error.is_none() {
            tracing::warn!(backup = self.backup.id, error = %msg, "backup failed");
            self.error = Some(msg);
        }
        if !matches!(self.phase, Phase::Draining(_)) {
            self.phase = Phase::Draining(BackupState::Failed);
        }
    }

    fn end(&mut self, state: BackupState) -> PollStatus {
        self.tree.stop();
        if state != BackupState::Done {
            if let Some(s) = self.sink.as_mut() {
                s.abandon();
            }
            self.seal.discard();
        }
        let read_copies = match &self.src {
            Some(Source::Image(c)) => c.cpu_copied_bytes(),
            _ => 0,
        };
        let sink_copies = self.sink.as_ref().map_or(0, |s| s.cpu_copied_bytes());
        self.backup
            .cpu_copied
            .store(read_copies + sink_copies, Ordering::Relaxed);
        let checksums = match (&self.manifest.digest, state) {
            (Some(digest), BackupState::Done) => Some(Checksums {
                digest: digest.clone(),
                sha256: self.manifest.sha256.clone(),
            }),
            _ => None,
        };
        let error = match state {
            BackupState::Cancelled => Some("cancelled".to_string()),
            _ => self.error.clone(),
        };
        self.backup.end(
            state,
            checksums,
            error,
            self.started.elapsed().as_nanos() as u64,
        );
        self.pair.end_backup();
        tracing::info!(backup = self.backup.id, state = ?state, "backup ended");
        PollStatus::Done
    }
}

impl Poller for BackupJob {
    fn poll(&mut self, cx: &mut ReactorContext) -> PollStatus {
        let status = self.turn(cx);
        // A socket target's replies wake the reactor when it parks: without that, a reactor
        // waiting on the target parks until its next timer.
        let socket = self.sink.as_ref().and_then(|s| s.socket());
        match (socket, status == PollStatus::Done, self.watching) {
            (Some(fd), true, true) => {
                cx.unwatch_fd(fd);
                self.watching = false;
            }
            (Some(fd), false, false) => self.watching = cx.watch_fd(fd).is_ok(),
            _ => {}
        }
        status
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl BackupJob {
    /// One turn of the job.
    fn turn(&mut self, cx: &mut ReactorContext) -> PollStatus {
        if self.phase == Phase::Open {
            if let Err(e) = self.open(cx) {
                self.error = Some(e);
                return self.end(BackupState::Failed);
            }
            self.phase = if self.backup.mode == Mode::Wait {
                self.pair.full_speed.store(true, Ordering::SeqCst);
                self.pair.wake_copier();
                Phase::Waiting
            } else {
                Phase::Streaming
            };
            self.advance_frontier();
        }
        // Once the checkpoint is asked for, the backup ends with it (done or failed).
        if self.backup.cancel.load(Ordering::SeqCst)
            && !matches!(self.phase, Phase::Draining(_) | Phase::Checkpointing)
        {
            self.phase = Phase::Draining(BackupState::Cancelled);
        }
        // pair_delete refuses while a backup runs; should a pair go anyway, its image is gone.
        if self.pair.is_deleted() && !matches!(self.phase, Phase::Draining(_)) {
            self.fail(format!("pair {} was deleted", self.pair.name()));
        }
        if self.pair.state() == PairState::Psue
            && !matches!(self.phase, Phase::Draining(_) | Phase::Checkpointing)
        {
            self.fail(format!(
                "pair {} was suspended: {}",
                self.pair.name(),
                self.pair.error().unwrap_or_default()
            ));
        }
        let mut busy = false;
        if self.phase == Phase::Waiting {
            if self.pair.pending.count() == 0 {
                self.phase = Phase::Streaming;
                busy = true;
            } else {
                cx.wake_at(Instant::now() + Duration::from_millis(1));
                return PollStatus::Idle;
            }
        }
        if self.phase == Phase::Streaming {
            busy |= self.issue_reads(cx);
        }
        // Reads that finished become ready, in order of the image.
        if let Some(src) = self.src.as_mut() {
            src.channel().poll(&mut self.src_done);
        }
        let done = std::mem::take(&mut self.src_done);
        for c in done {
            busy = true;
            self.reading.remove(&c.tag);
            match c.result {
                Ok(()) => {
                    self.ready.insert(c.tag, c.bufs);
                }
                Err(e) => self.fail(format!("reading the image at {}: {e}", c.tag)),
            }
        }
        if !matches!(self.phase, Phase::Draining(_)) {
            self.advance_frontier();
            busy |= self.feed_sink();
            if matches!(self.phase, Phase::Streaming) {
                busy |= self.feed_zeroes();
            }
        }
        if let Some(sink) = self.sink.as_mut() {
            sink.poll(&mut self.sink_done);
        }
        let done = std::mem::take(&mut self.sink_done);
        for d in done {
            busy = true;
            if d.bufs.is_empty() && d.len == 0 {
                // A write of zeroes.
                self.zeroing = self.zeroing.saturating_sub(1);
                if let Err(e) = d.result {
                    let what = self.sink.as_ref().map(|s| s.describe()).unwrap_or_default();
                    self.fail(format!("{what}: zeroing at {}: {e}", d.offset));
                }
                continue;
            }
            match d.result {
                Ok(()) => {
                    self.acked += d.len;
                    // Bytes not stored count as done once the target is past them.
                    let done = (self.acked + self.sink_at.skipped()).min(self.size);
                    self.backup.bytes_done.store(done, Ordering::Relaxed);
                    self.to_hash.push_back((d.offset, d.bufs));
                }
                Err(e) => {
                    let what = self.sink.as_ref().map(|s| s.describe()).unwrap_or_default();
                    self.fail(format!("{what}: {e}"));
                }
            }
        }
        while let Some((offset, bufs)) = self.to_hash.pop_front() {
            if let Err(back) = self.tree.push(offset, bufs) {
                self.to_hash.push_front(back);
                break;
            }
            busy = true;
        }
        if self.root.is_none() && !matches!(self.phase, Phase::Draining(_)) {
            // The root takes the chunk digests in order as the hashers finish them.
            if let Some((root, digests)) = self.tree.advance_root() {
                self.root = Some(root.to_string());
                self.chunk_digests = Some(digests);
            }
        }
        match self.phase {
            Phase::Streaming if self.all_written() => {
                self.backup.bytes_done.store(self.size, Ordering::Relaxed);
                let Some(digest) = self.root.clone() else {
                    // The last chunks are still being hashed.
                    return PollStatus::Busy;
                };
                let sha256 = match self.tree.flat() {
                    Some(h) => match h.take_result() {
                        Some(sha) => Some(sha),
                        // The flat SHA-256 is still behind on its reactor.
                        None => return PollStatus::Busy,
                    },
                    None => None,
                };
                let (Some(crcs), Some(digests)) = (self.crcs.take(), self.chunk_digests.take())
                else {
                    self.fail("checksums lost".into());
                    return PollStatus::Busy;
                };
                self.manifest = self.manifest.finalized(ImageChecksums {
                    digest: Some(digest),
                    sha256,
                    chunks_crc32c: crcs.finish(),
                });
                if let Err(e) = self.seal.start(digests, cx.handle().clone()) {
                    self.fail(e);
                    return PollStatus::Busy;
                }
                self.phase = Phase::Sealing;
                busy = true;
            }
            Phase::Sealing => match self.seal.poll() {
                Sealed::Pending => {}
                Sealed::Done => {
                    if let Some(sink) = self.sink.as_mut() {
                        if let Err(e) = sink.finish(&self.manifest) {
                            self.fail(format!("closing the backup: {e}"));
                            return PollStatus::Busy;
                        }
                    }
                    self.phase = Phase::Finishing;
                    busy = true;
                }
                Sealed::Failed(e) => self.fail(format!("keeping the chunk digests: {e}")),
            },
            Phase::Finishing => match self.sink.as_mut().and_then(|s| s.finished()) {
                Some(Ok(())) => match self.request_checkpoint() {
                    Ok(Some(reply)) => {
                        self.checkpoint_reply = Some(reply);
                        self.phase = Phase::Checkpointing;
                        busy = true;
                    }
                    Ok(None) => return self.end(BackupState::Done),
                    Err(e) => self.fail_checkpoint(e),
                },
                Some(Err(e)) => self.fail(format!("closing the backup: {e}")),
                // A file's rename runs on a thread that cannot wake a parked reactor: look
                // again in a millisecond rather than at the reactor's next timer.
                None => cx.wake_at(Instant::now() + Duration::from_millis(1)),
            },
            Phase::Checkpointing => match self
                .checkpoint_reply
                .as_ref()
                .map_or(Err(TryRecvError::Disconnected), Receiver::try_recv)
            {
                Ok(Ok(_)) => return self.end(BackupState::Done),
                Ok(Err(e)) => self.fail_checkpoint(e.to_string()),
                Err(TryRecvError::Empty) => busy = true,
                Err(TryRecvError::Disconnected) => {
                    self.fail_checkpoint("the engine is stopping".into())
                }
            },
            Phase::Draining(state) => {
                let sink_idle = self.sink.as_ref().is_none_or(|s| s.in_flight() == 0);
                if self.reading.is_empty() && sink_idle && self.seal.discard() {
                    self.ready.clear();
                    return self.end(state);
                }
            }
            _ => {}
        }
        if busy || !self.reading.is_empty() {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}
