//! Copy before write: a host write in PSUS (to P, or to the image) on tracks S still lacks
//! first copies each of them P to S, one at a time under its lock, through a staging buffer,
//! so the image keeps P's data of the split point; a track P stores no data in is not read
//! ([`crate::pair::zero_copy`]): a write into a thin volume's holes costs a few lookups, not a
//! track's read and write. ("cow" in names and phases is short for copy before write.)

use std::sync::atomic::Ordering;
use std::sync::Arc;

use drivers::{IoBufs, IoRequest};

use super::{PairChannel, Phase, Side, Step, SUB_COW, SUB_NODATA};
use crate::pair::zero_copy::{zero_copy, ZeroCopy};

impl PairChannel {
    /// Copy before write, for a write in PSUS (to P or to the image) that entered the gate; the
    /// write goes on once the tracks are copied ([`PairChannel::write_when_durable`]).
    pub(super) fn copy_before_write(&mut self, key: usize, tracks: std::ops::Range<u64>) -> Step {
        // Writes mirrored before the split and still in flight belong to the image: wait for
        // them before looking at the tracks.
        if self.pair.mirrored_writes_in_flight(tracks.clone()) {
            self.ungate(key);
            return Step::Wait;
        }
        // Copy before write: every pending track the write touches is copied P to S first,
        // under its lock, so the image keeps P's data of the split point.
        if !self.lock_pending(key, tracks) {
            self.ungate(key);
            return Step::Wait;
        }
        let p = &mut self.requests[key];
        p.cow = p.locked.clone();
        p.cow_next = 0;
        if p.cow.is_empty() {
            return self.write_when_durable(key);
        }
        match self.staging() {
            Some(buf) => self.requests[key].cow_buf = Some(buf),
            None => {
                self.release_locks(key);
                self.ungate(key);
                return Step::Wait;
            }
        }
        self.cow_read(key)
    }

    /// Copies the next track of write `key`: reads it, writes zeroes, or, for holes over holes,
    /// nothing (then the next, or the write itself once none is left).
    fn cow_read(&mut self, key: usize) -> Step {
        let (off, len) = loop {
            let p = &self.requests[key];
            let (off, len) = self.pair.track_range(p.cow[p.cow_next]);
            let (primary, secondary) = (self.pair.primary(), self.pair.secondary());
            match zero_copy(&**primary, &**secondary, off, len, &mut self.extents) {
                None => break (off, len),
                Some(ZeroCopy::Write(op)) => {
                    self.requests[key].phase = Phase::CowWrite;
                    let req = IoRequest::without_data(op, off, len, 0);
                    self.issue(key, Side::S, req, SUB_NODATA);
                    return Step::Running;
                }
                Some(ZeroCopy::Nothing) => {
                    // Nothing written now, but what the metadata will say relies on S as
                    // written before (a punched hole): flushed first all the same.
                    self.pair.note_write(false);
                    if !self.cow_track_copied(key) {
                        return self.cow_finished(key);
                    }
                }
            }
        };
        let p = &mut self.requests[key];
        let Some(mut buf) = p.cow_buf.take() else {
            return Step::Running;
        };
        // The staging buffer is one track long; the last track may be shorter.
        let _ = buf.set_len(len as usize);
        p.phase = Phase::CowRead;
        let mut bufs = IoBufs::new();
        bufs.push(buf);
        self.issue(key, Side::P, IoRequest::read(off, bufs, 0), SUB_COW);
        Step::Running
    }

    pub(super) fn cow_write(&mut self, key: usize) {
        let p = &mut self.requests[key];
        let track = p.cow[p.cow_next];
        let (off, len) = self.pair.track_range(track);
        let Some(buf) = p.cow_buf.take() else {
            return;
        };
        p.phase = Phase::CowWrite;
        self.pair.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
        let mut bufs = IoBufs::new();
        bufs.push(buf);
        // Not FUA: the metadata writer flushes S once for all the copies a metadata write
        // relies on (FUA copies through io_uring on ext4 were seen taking tens of ms each).
        self.issue(key, Side::S, IoRequest::write(off, bufs, 0), SUB_COW);
    }

    /// S holds the track: it is no longer pending; unlock it and copy the next one, or write.
    pub(super) fn cow_track_done(&mut self, key: usize) {
        if self.cow_track_copied(key) {
            self.cow_read(key);
        } else {
            self.cow_finished(key);
        }
    }

    /// Every track is copied: the write goes on once its metadata is durable.
    fn cow_finished(&mut self, key: usize) -> Step {
        self.requests[key].cow_buf = None;
        self.write_when_durable(key)
    }

    /// S holds the track: it is no longer pending and is unlocked. True if another track of
    /// the write is left to copy.
    fn cow_track_copied(&mut self, key: usize) -> bool {
        let pair = Arc::clone(&self.pair);
        let p = &mut self.requests[key];
        let track = p.cow[p.cow_next];
        let (_, len) = pair.track_range(track);
        pair.stats.move_to_copied(|| {
            pair.pending.clear(track);
            true
        });
        pair.stats.cow_copies.fetch_add(1, Ordering::Relaxed);
        pair.stats.bytes_copied.fetch_add(len, Ordering::Relaxed);
        p.locked.retain(|&t| t != track);
        pair.unlock_track(track);
        p.cow_next += 1;
        p.cow_next < p.cow.len()
    }
}
