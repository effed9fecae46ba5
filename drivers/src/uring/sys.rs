//! The io_uring calls of the uring driver: the ring a thread's uring channels share, its
//! fixed-file and fixed-buffer tables, submission and reaping. The unsafe contract of io_uring
//! (buffers outlive their operation) is kept here: every buffer and iovec array of a submitted
//! request stays in the in-flight slab until its completion is reaped, and a channel closes only
//! once none of its requests is in flight.
//!
//! One ring serves every uring channel a thread opens with the same wake-up eventfd (in the
//! engine: every uring bdev on a reactor), as SPDK's uring bdev shares one ring per poll group:
//! a thousand bdevs cost a thousand open files, not a ring each per reactor. Files sit in the
//! ring's fixed-file table (one slot per file, whatever the number of its channels), made at its
//! full size (the open file limit); a file the table cannot take is used through a descriptor.
//! Completions are sorted into their channels' queues by whichever channel polls first.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use slab::Slab;

use super::errno_error;
use super::held::{open_file_limit, BdevFile};
use crate::bdev::{queue_full, IoBufs, IoCompletion, IoError, IoOp, IoRequest, SubmitResult};

/// Submission queue entries of a shared ring.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: requests in flight on one ring, all channels together.
const CQ_ENTRIES: u32 = 4096;
/// The most slots a fixed-file table has (fewer when the open file limit is lower). The table
/// is made at its full size: files held without a descriptor could not be registered again in a
/// larger one.
const MAX_FILE_SLOTS: u32 = 1 << 15;
/// Fixed-buffer slots: one per DMA region.
const BUFFER_SLOTS: u32 = 1024;

/// How a request names its file: a slot of the fixed-file table or a descriptor.
#[derive(Debug, Clone, Copy)]
enum Target {
    Fixed(u32),
    Fd(RawFd),
}

/// Builds an opcode against `target` (the opcode constructors are generic over the two kinds).
macro_rules! on_target {
    ($target:expr, |$t:ident| $build:expr) => {
        match $target {
            Target::Fixed(slot) => {
                let $t = types::Fixed(slot);
                $build
            }
            Target::Fd(fd) => {
                let $t = types::Fd(fd);
                $build
            }
        }
    };
}

/// A channel's place on the shared ring.
pub(super) type ChannelKey = usize;
/// The channel of requests whose channel closed without waiting for them (see
/// `SharedRing::close_channel`).
const ORPHANED: ChannelKey = usize::MAX;

struct Inflight {
    channel: ChannelKey,
    target: Target,
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    bufs: IoBufs,
    /// The iovec array of a vectored request; the kernel reads it until completion.
    _iov: Option<Box<[libc::iovec]>>,
    /// A write-zeroes the file system refused in its first form (a punched hole or a zeroed
    /// range) is tried again in the other.
    fallback: bool,
}

/// What the ring keeps for one channel.
struct ChannelQueue {
    target: Target,
    file_key: usize,
    /// Completions reaped for this channel, not yet handed to it.
    done: Vec<IoCompletion>,
    in_flight: usize,
    depth: usize,
}

/// A file of the ring's channels: its slot in the fixed-file table, or the descriptor its
/// requests use when the table could not take it.
struct FileSlot {
    target: Target,
    /// A descriptor made for this ring from a held file, kept while requests use it.
    _descriptor: Option<File>,
    users: usize,
}

/// DMA regions registered as fixed buffers.
struct BufferTable {
    /// Region id to fixed-buffer index.
    index: HashMap<u64, u16>,
    free: Vec<u16>,
    /// The region list's generation this table last matched.
    generation: Option<u64>,
    /// Regions that could not be registered (no slot free, or refused) in this generation.
    refused: std::collections::HashSet<u64>,
    usable: bool,
}

struct Inner {
    ring: IoUring,
    inflight: Slab<Inflight>,
    channels: Slab<ChannelQueue>,
    /// Files by the address of their shared `File`.
    files: HashMap<usize, FileSlot>,
    free_file_slots: Vec<u32>,
    buffers: BufferTable,
    unsubmitted: bool,
}

/// The ring a thread's uring channels with one wake-up eventfd share.
pub(super) struct SharedRing {
    inner: RefCell<Inner>,
}

thread_local! {
    static RINGS: RefCell<Vec<(Option<RawFd>, Weak<SharedRing>)>> = const { RefCell::new(Vec::new()) };
    /// The thread's ring without a wake-up eventfd, kept between uses: a thread doing blocking
    /// I/O now and then (an RPC connection creating pairs) would otherwise make and tear down
    /// a ring each time. It goes with the thread.
    static BLOCKING_RING: RefCell<Option<Rc<SharedRing>>> = const { RefCell::new(None) };
}

impl SharedRing {
    /// This thread's ring for channels woken through `wake_fd`, made on first use.
    pub(super) fn for_thread(wake_fd: Option<RawFd>) -> std::io::Result<Rc<SharedRing>> {
        RINGS.with(|rings| {
            let mut rings = rings.borrow_mut();
            rings.retain(|(_, r)| r.strong_count() > 0);
            if let Some(ring) = rings
                .iter()
                .find(|(fd, _)| *fd == wake_fd)
                .and_then(|(_, r)| r.upgrade())
            {
                return Ok(ring);
            }
            let ring = Rc::new(SharedRing::new(wake_fd)?);
            rings.push((wake_fd, Rc::downgrade(&ring)));
            if wake_fd.is_none() {
                BLOCKING_RING.with(|kept| *kept.borrow_mut() = Some(Rc::clone(&ring)));
            }
            Ok(ring)
        })
    }

    fn new(wake_fd: Option<RawFd>) -> std::io::Result<Self> {
        // Cooperative task run: a completion does not interrupt the reactor with an IPI to
        // post it; the kernel flags the ring instead (`taskrun`), and `reap` enters the kernel
        // to run the work when the flag is up.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .build(SQ_ENTRIES)
            })?;
        if let Some(fd) = wake_fd {
            ring.submitter().register_eventfd(fd)?;
        }
        let file_slots = open_file_limit().min(MAX_FILE_SLOTS);
        let file_slots = match ring.submitter().register_files_sparse(file_slots) {
            Ok(()) => file_slots,
            Err(err) => {
                tracing::debug!(%err, "io_uring fixed files unavailable: requests name descriptors");
                0
            }
        };
        let usable = match ring.submitter().register_buffers_sparse(BUFFER_SLOTS) {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(%err, "io_uring fixed buffers unavailable");
                false
            }
        };
        let capacity = ring.params().cq_entries() as usize;
        if !ring.params().is_feature_nodrop() {
            tracing::warn!("this kernel's io_uring may drop completions when its queue is full");
        }
        Ok(Self {
            inner: RefCell::new(Inner {
                ring,
                inflight: Slab::with_capacity(capacity),
                channels: Slab::new(),
                files: HashMap::new(),
                free_file_slots: (0..file_slots).rev().collect(),
                buffers: BufferTable {
                    index: HashMap::new(),
                    free: (0..BUFFER_SLOTS as u16).rev().collect(),
                    generation: None,
                    refused: std::collections::HashSet::new(),
                    usable,
                },
                unsubmitted: false,
            }),
        })
    }

    /// Adds a channel doing I/O on `file` with at most `depth` requests in flight. Every
    /// channel of a bdev shares its file (one slot); the caller keeps `file` alive until the
    /// channel is closed.
    pub(super) fn open_channel(
        &self,
        file: &Arc<BdevFile>,
        depth: usize,
    ) -> std::io::Result<ChannelKey> {
        let mut inner = self.inner.borrow_mut();
        inner.sync_buffers(None);
        let file_key = Arc::as_ptr(file) as usize;
        let target = inner.attach_file(file_key, file)?;
        Ok(inner.channels.insert(ChannelQueue {
            target,
            file_key,
            done: Vec::new(),
            in_flight: 0,
            depth,
        }))
    }

    /// Waits for the channel's requests in flight, then forgets it (and its file, if it was the
    /// file's last channel on this ring).
    pub(super) fn close_channel(&self, key: ChannelKey) {
        let mut inner = self.inner.borrow_mut();
        while inner.channels.get(key).is_some_and(|c| c.in_flight > 0) {
            if let Err(err) = inner.wait_and_reap() {
                // The kernel may still use these buffers: the requests stay in the slab (their
                // keys are not reused) as orphans, dropped only when they complete.
                tracing::error!(%err, "io_uring wait failed while closing a channel");
                for (_, e) in inner.inflight.iter_mut() {
                    if e.channel == key {
                        e.channel = ORPHANED;
                    }
                }
                break;
            }
        }
        if let Some(channel) = inner.channels.try_remove(key) {
            inner.detach_file(channel.file_key);
        }
    }

    /// Requests of the channel submitted and not yet handed back.
    pub(super) fn in_flight(&self, key: ChannelKey) -> usize {
        let inner = self.inner.borrow();
        inner
            .channels
            .get(key)
            .map_or(0, |c| c.in_flight + c.done.len())
    }

    pub(super) fn push(&self, key: ChannelKey, req: IoRequest) -> SubmitResult {
        let mut inner = self.inner.borrow_mut();
        let Some(channel) = inner.channels.get(key) else {
            return queue_full(req);
        };
        let target = channel.target;
        // Only the channel's own depth limits it, as when each channel had a ring: callers
        // size their work by that depth. Completions beyond the completion queue's size wait
        // in the kernel (no drop) until `reap_all` makes room.
        if channel.in_flight + channel.done.len() >= channel.depth {
            return queue_full(req);
        }
        let IoRequest {
            op,
            offset,
            len,
            bufs,
            tag,
        } = req;
        let mut entry = Inflight {
            channel: key,
            target,
            tag,
            op,
            offset,
            len,
            bufs,
            _iov: None,
            fallback: false,
        };
        let sqe = inner.build(&mut entry);
        let slot = inner.inflight.insert(entry);
        if inner.push_sqe(&sqe.user_data(slot as u64)).is_err() {
            let e = inner.inflight.remove(slot);
            return queue_full(IoRequest {
                op: e.op,
                offset: e.offset,
                len: e.len,
                bufs: e.bufs,
                tag: e.tag,
            });
        }
        if let Some(channel) = inner.channels.get_mut(key) {
            channel.in_flight += 1;
        }
        Ok(())
    }

    /// Submits what is queued, sorts finished requests to their channels and moves this
    /// channel's into `out`.
    pub(super) fn reap(&self, key: ChannelKey, out: &mut Vec<IoCompletion>) -> usize {
        let mut inner = self.inner.borrow_mut();
        // An idle channel touches none of the ring's memory: with thousands of channels on a
        // reactor, looking at the completion queue for each of them is what the turn costs.
        let Some(channel) = inner.channels.get(key) else {
            return 0;
        };
        if channel.in_flight > 0 {
            inner.reap_all();
        }
        let Some(channel) = inner.channels.get_mut(key) else {
            return 0;
        };
        let n = channel.done.len();
        out.append(&mut channel.done);
        n
    }
}

impl Inner {
    /// The file's slot in the fixed-file table, or a descriptor when the table is full.
    fn attach_file(&mut self, file_key: usize, file: &BdevFile) -> std::io::Result<Target> {
        if let Some(f) = self.files.get_mut(&file_key) {
            f.users += 1;
            return Ok(f.target);
        }
        // A held file has no descriptor: one is made to register it, and closed once the
        // table holds it.
        let (fd, made) = match file {
            BdevFile::Descriptor(locked) => (locked.file().as_raw_fd(), None),
            BdevFile::Held(held) => {
                let made = held.descriptor()?;
                (made.as_raw_fd(), Some(made))
            }
        };
        let slot = self.free_file_slots.pop().and_then(|slot| {
            match self.ring.submitter().register_files_update(slot, &[fd]) {
                Ok(_) => Some(slot),
                Err(err) => {
                    tracing::debug!(%err, "io_uring fixed file slot refused; using the descriptor");
                    self.free_file_slots.push(slot);
                    None
                }
            }
        });
        let target = match slot {
            Some(slot) => Target::Fixed(slot),
            None => Target::Fd(fd),
        };
        self.files.insert(
            file_key,
            FileSlot {
                target,
                _descriptor: if slot.is_some() { None } else { made },
                users: 1,
            },
        );
        Ok(target)
    }

    fn detach_file(&mut self, file_key: usize) {
        let Some(f) = self.files.get_mut(&file_key) else {
            return;
        };
        f.users -= 1;
        if f.users > 0 {
            return;
        }
        let Some(f) = self.files.remove(&file_key) else {
            return;
        };
        if let Target::Fixed(slot) = f.target {
            // The kernel drops its reference once no request uses the slot; the file's lock is
            // released by its owner, not by this.
            match self.ring.submitter().register_files_update(slot, &[-1]) {
                Ok(_) => self.free_file_slots.push(slot),
                Err(err) => tracing::warn!(%err, slot, "io_uring fixed file slot not cleared"),
            }
        }
    }

    /// Submits what is queued, waits for at least one completion and sorts what finished into
    /// the channels' queues.
    fn wait_and_reap(&mut self) -> std::io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
                Err(err) => return Err(err),
            }
        }
        self.unsubmitted = false;
        self.reap_all();
        Ok(())
    }

    /// Frees the fixed-buffer slots of regions gone since last time, and registers region
    /// `wanted` (one a request uses) if it is live and a slot is free. Only the regions a ring's
    /// requests use are registered: a ring made for a moment's blocking I/O does not pin every
    /// pool of the process.
    fn sync_buffers(&mut self, wanted: Option<u64>) {
        if !self.buffers.usable {
            return;
        }
        let generation = hugepages::regions_generation();
        let changed = self.buffers.generation != Some(generation);
        if !changed && wanted.is_none_or(|id| self.buffers.refused.contains(&id)) {
            return;
        }
        let live = hugepages::live_regions();
        let submitter = self.ring.submitter();
        if changed {
            self.buffers.generation = Some(generation);
            self.buffers.refused.clear();
            let gone: Vec<u64> = self
                .buffers
                .index
                .keys()
                .filter(|id| !live.iter().any(|r| r.id == **id))
                .copied()
                .collect();
            for id in gone {
                let Some(index) = self.buffers.index.remove(&id) else {
                    continue;
                };
                let empty = libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                // SAFETY: an empty iovec registers nothing; the slot's old buffer is released
                // by the kernel once no request uses it.
                match unsafe { submitter.register_buffers_update(index as u32, &[empty], None) } {
                    Ok(()) => self.buffers.free.push(index),
                    Err(err) => tracing::debug!(%err, "io_uring fixed buffer slot not cleared"),
                }
            }
        }
        let Some(id) = wanted else {
            return;
        };
        if self.buffers.index.contains_key(&id) {
            return;
        }
        // The region first: a slot is taken only for a region that is there.
        let Some(region) = live.iter().find(|r| r.id == id) else {
            self.buffers.refused.insert(id);
            return;
        };
        let Some(index) = self.buffers.free.pop() else {
            self.buffers.refused.insert(id);
            return;
        };
        let iov = libc::iovec {
            iov_base: region.addr as *mut libc::c_void,
            iov_len: region.len,
        };
        // SAFETY: the iovec describes a live DMA region. The kernel pins its pages, so they stay
        // valid for fixed operations even after the region is unmapped; fixed operations are
        // built only for buffers of regions found in `index`, which holds live regions only (a
        // region's id is never reused, and gone ones are dropped when the generation moves).
        match unsafe { submitter.register_buffers_update(index as u32, &[iov], None) } {
            Ok(()) => {
                self.buffers.index.insert(id, index);
            }
            Err(err) => {
                tracing::debug!(%err, "io_uring fixed buffer not registered");
                self.buffers.free.push(index);
                self.buffers.refused.insert(id);
            }
        }
    }

    fn fixed_index(&mut self, region_id: u64) -> Option<u16> {
        if let Some(&i) = self.buffers.index.get(&region_id) {
            return Some(i);
        }
        self.sync_buffers(Some(region_id));
        self.buffers.index.get(&region_id).copied()
    }

    fn push_sqe(&mut self, sqe: &io_uring::squeue::Entry) -> Result<(), ()> {
        for _ in 0..2 {
            // SAFETY: the buffers and iovecs the entry points to live in the in-flight slab
            // until its completion is reaped (the iovec array is boxed, so moving the entry
            // does not move it; buffers are DMA memory owned by the entry).
            let pushed = unsafe { self.ring.submission().push(sqe) };
            if pushed.is_ok() {
                self.unsubmitted = true;
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try once more.
            if self.ring.submit().is_err() {
                break;
            }
            self.unsubmitted = false;
        }
        Err(())
    }

    fn build(&mut self, e: &mut Inflight) -> io_uring::squeue::Entry {
        match e.op {
            IoOp::Read | IoOp::Write { .. } => self.build_rw(e),
            IoOp::Flush => on_target!(e.target, |t| opcode::Fsync::new(t)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            // Zeroes that may be deallocated are a punched hole, the others a zeroed range;
            // where the file system lacks the one, the other (`fallback`).
            IoOp::WriteZeroes { deallocate } if deallocate == e.fallback => {
                on_target!(e.target, |t| opcode::Fallocate::new(t, e.len)
                    .offset(e.offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build())
            }
            IoOp::WriteZeroes { .. } | IoOp::Unmap => {
                on_target!(e.target, |t| opcode::Fallocate::new(t, e.len)
                    .offset(e.offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build())
            }
        }
    }

    fn build_rw(&mut self, e: &mut Inflight) -> io_uring::squeue::Entry {
        let rw_flags = match e.op {
            IoOp::Write { fua: true } => libc::RWF_DSYNC,
            _ => 0,
        };
        let is_read = e.op == IoOp::Read;
        if let [buf] = e.bufs.as_slice() {
            let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
            let fixed = self.fixed_index(buf.region_id());
            return match (fixed, is_read) {
                (Some(i), true) => on_target!(e.target, |t| opcode::ReadFixed::new(t, ptr, len, i)
                    .offset(e.offset)
                    .build()),
                (Some(i), false) => {
                    on_target!(e.target, |t| opcode::WriteFixed::new(t, ptr, len, i)
                        .offset(e.offset)
                        .rw_flags(rw_flags)
                        .build())
                }
                (None, true) => on_target!(e.target, |t| opcode::Read::new(t, ptr, len)
                    .offset(e.offset)
                    .build()),
                (None, false) => on_target!(e.target, |t| opcode::Write::new(t, ptr, len)
                    .offset(e.offset)
                    .rw_flags(rw_flags)
                    .build()),
            };
        }
        let iov: Box<[libc::iovec]> = e
            .bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
        e._iov = Some(iov);
        if is_read {
            on_target!(e.target, |t| opcode::Readv::new(t, ptr, n)
                .offset(e.offset)
                .build())
        } else {
            on_target!(e.target, |t| opcode::Writev::new(t, ptr, n)
                .offset(e.offset)
                .rw_flags(rw_flags)
                .build())
        }
    }

    /// Submits what is queued and sorts every finished request into its channel's queue.
    fn reap_all(&mut self) {
        let mut finished = Vec::new();
        loop {
            let sq = self.ring.submission();
            // Entering the kernel also moves completions that overflowed the queue into it.
            let enter = self.unsubmitted
                || (!self.inflight.is_empty() && (sq.taskrun() || sq.cq_overflow()));
            drop(sq);
            if enter {
                match self.ring.submit() {
                    Ok(_) => self.unsubmitted = false,
                    Err(err) => tracing::debug!(%err, "io_uring submit deferred"),
                }
            }
            let before = finished.len();
            for cqe in self.ring.completion() {
                finished.push((cqe.user_data() as usize, cqe.result()));
            }
            if finished.len() == before || !self.ring.submission().cq_overflow() {
                break;
            }
        }
        let mut retry = Vec::new();
        for (key, res) in finished {
            let Some(mut e) = self.inflight.try_remove(key) else {
                tracing::error!(key, "io_uring completion for an unknown request");
                continue;
            };
            let result = match e.op {
                IoOp::WriteZeroes { .. } if res == -libc::EOPNOTSUPP && !e.fallback => {
                    e.fallback = true;
                    retry.push(e);
                    continue;
                }
                // Unmap is advisory: a file system without hole punching keeps the data.
                IoOp::Unmap if res == -libc::EOPNOTSUPP => Ok(()),
                _ if res < 0 => Err(errno_error(res)),
                IoOp::Read | IoOp::Write { .. } if res as u64 != e.len => {
                    tracing::warn!(expected = e.len, got = res, "short transfer");
                    Err(IoError::Device(libc::EIO))
                }
                _ => Ok(()),
            };
            self.finish(
                e.channel,
                IoCompletion {
                    tag: e.tag,
                    result,
                    bufs: e.bufs,
                },
            );
        }
        for mut e in retry {
            let sqe = self.build(&mut e);
            let (channel, tag) = (e.channel, e.tag);
            let key = self.inflight.insert(e);
            if self.push_sqe(&sqe.user_data(key as u64)).is_err() {
                let e = self.inflight.remove(key);
                self.finish(
                    channel,
                    IoCompletion {
                        tag,
                        result: Err(IoError::Device(libc::EAGAIN)),
                        bufs: e.bufs,
                    },
                );
            }
        }
    }

    fn finish(&mut self, channel: ChannelKey, completion: IoCompletion) {
        match self.channels.get_mut(channel) {
            Some(c) => {
                c.in_flight -= 1;
                c.done.push(completion);
            }
            // Done at last: its buffers can go back.
            None if channel == ORPHANED => {}
            None => tracing::error!("io_uring completion for a closed channel"),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every channel waited for its requests before it closed; anything still here is
        // memory the kernel may write: never give it back.
        if !self.inflight.is_empty() {
            std::mem::forget(std::mem::take(&mut self.inflight));
        }
    }
}
