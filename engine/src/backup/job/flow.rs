//! The job's flow: reading the plan's pieces of the image within the window and the rate
//! limits, and feeding what was read, in order, to the target (with the plan's writes of
//! zeroes).

use drivers::sink::SinkFull;
use drivers::{IoBufs, IoRequest, SubmitErrorKind};
use std::sync::atomic::Ordering;

use super::{BackupJob, HOST_WINDOW, WINDOW};
use crate::backup::Mode;
use crate::rate::effective_rate;
use crate::reactor::ReactorContext;

impl BackupJob {
    /// True when the piece of `len` bytes at `offset` can be read from S now (reflect asks the
    /// copier for the tracks still pending, looking ahead over the window). Each track is asked
    /// for once: the copier keeps what it is asked for until the track is copied, and a track
    /// the ring had no room for is asked for on the next call. The copier is woken as soon as
    /// it is asked for something, not once the backup reaches a track still pending: a copier
    /// that had caught up rests, and its reactor may have parked.
    pub(super) fn reflected(&mut self, offset: u64, len: u64) -> bool {
        let ts = self.pair.track_size();
        let horizon = (offset + WINDOW).min(self.size);
        self.asked = self.asked.max(offset);
        let mut asked_any = false;
        while self.asked < horizon {
            let t = self.asked / ts;
            if self.pair.pending.is_pending(t) {
                if self.pair.urgent.push(t).is_err() {
                    break;
                }
                asked_any = true;
            }
            self.asked = (t + 1) * ts;
        }
        let ready = self
            .pair
            .tracks_of(offset, len)
            .all(|t| !self.pair.pending.is_pending(t));
        if asked_any || !ready {
            self.pair.wake_copier();
        }
        ready
    }

    /// Staging buffers for `len` bytes, one per track; `None` when the pool is short.
    pub(super) fn piece_buffers(&self, len: u64) -> Option<IoBufs> {
        let buf_size = self.pool.buf_size() as u64;
        let n = len.div_ceil(buf_size) as usize;
        if self.pool.available() < n {
            return None;
        }
        let mut bufs = IoBufs::new();
        let mut left = len;
        for _ in 0..n {
            let mut b = self.pool.get()?;
            b.set_len(left.min(buf_size) as usize).ok()?;
            left -= b.len() as u64;
            bufs.push(b);
        }
        Some(bufs)
    }

    /// True when `len` bytes may be read now under the backup's rate limit, and under its
    /// limit for while hosts use the pair.
    pub(super) fn within_rate(&mut self, cx: &mut ReactorContext, len: u64) -> bool {
        let hosts = self.backup.host_rate != 0 && self.hosts.active(&self.pair);
        let rate = effective_rate(self.backup.rate, self.backup.host_rate, hosts);
        if rate == 0 {
            // Unlimited for now: no burst gathers for when hosts come back.
            self.bucket.reset();
        }
        let ok = self.bucket.take(cx, rate, len);
        if !ok && rate != self.backup.rate {
            self.note_yield();
        }
        ok
    }

    /// Counts a stretch of reads held back for hosts (once per stretch; not the gentle start
    /// when no host has shown up).
    pub(super) fn note_yield(&mut self) {
        if !self.yielding && self.hosts.seen_any() {
            self.yielding = true;
            self.backup.host_yields.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes the backup may have between reading and the target's acknowledgement: the whole
    /// window alone, a couple of pieces while hosts use the pair (host requests first).
    pub(super) fn window(&mut self) -> u64 {
        if self.hosts.active(&self.pair) {
            HOST_WINDOW
        } else {
            WINDOW
        }
    }

    pub(super) fn issue_reads(&mut self, cx: &mut ReactorContext) -> bool {
        let mut issued = false;
        let window = self.window();
        while let Some((offset, left)) = self.read_at.next(&self.plan) {
            let len = self.piece.min(left);
            let held = self.issued - self.acked;
            if held > 0 && held + len > window {
                self.note_yield();
                break;
            }
            if self.backup.mode == Mode::Reflect && !self.reflected(offset, len) {
                break;
            }
            // Buffers first, so rate tokens are only taken for a piece that can be read now;
            // buffers not used go straight back to the pool.
            let Some(bufs) = self.piece_buffers(len) else {
                break;
            };
            if !self.within_rate(cx, len) {
                break;
            }
            self.yielding = false;
            let Some(src) = self.src.as_mut() else { break };
            match src.channel().submit(IoRequest::read(offset, bufs, offset)) {
                Ok(()) => {
                    self.reading.insert(offset, ());
                    self.read_at.advance(len);
                    self.issued += len;
                    issued = true;
                }
                Err(e) => match e.error {
                    SubmitErrorKind::QueueFull => break,
                    SubmitErrorKind::Invalid(err) => {
                        self.fail(format!("reading the image at {offset}: {err}"));
                        break;
                    }
                },
            }
        }
        issued
    }

    /// Tracks before the lowest piece not yet read are captured (or not part of the backup): S
    /// may be written there.
    pub(super) fn advance_frontier(&mut self) {
        let next = match self.read_at.next(&self.plan) {
            Some((offset, _)) => offset,
            None => self.size,
        };
        let lowest = self.reading.keys().next().copied().unwrap_or(next);
        let frontier = if lowest >= self.size {
            self.pair.tracks()
        } else {
            lowest / self.pair.track_size()
        };
        self.pair.set_backup_frontier(frontier);
    }

    pub(super) fn feed_sink(&mut self) -> bool {
        let mut fed = false;
        while let Some(bufs) = self
            .sink_at
            .next(&self.plan)
            .and_then(|(offset, _)| self.ready.remove(&offset))
        {
            let offset = self.sink_at.position();
            let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
            let Some(sink) = self.sink.as_mut() else {
                break;
            };
            // Checksum each piece once, in image order, before handing its buffers over: the
            // target reads them, nothing copies them. (A piece the target was busy for comes
            // back here and is not counted twice.)
            if let Some(c) = self.crcs.as_mut().filter(|c| c.bytes() == self.sunk) {
                for b in &bufs {
                    c.update(b.as_slice());
                }
            }
            match sink.submit(offset, bufs) {
                Ok(()) => {}
                Err(SinkFull::Busy(bufs)) => {
                    self.ready.insert(offset, bufs);
                    break;
                }
                Err(SinkFull::Failed(e, _)) => {
                    let what = sink.describe();
                    self.fail(format!("{what}: {e}"));
                    break;
                }
            }
            fed = true;
            self.sink_at.advance(len);
            self.sunk += len;
        }
        fed
    }

    /// Asks the target for the plan's writes of zeroes, as many as it takes now.
    pub(super) fn feed_zeroes(&mut self) -> bool {
        let mut fed = false;
        while let Some(r) = self.plan.zeroes().get(self.next_zeroes).cloned() {
            let Some(sink) = self.sink.as_mut() else {
                break;
            };
            match sink.write_zeroes(r.start, r.end - r.start) {
                Ok(()) => {}
                Err(SinkFull::Busy(_)) => break,
                Err(SinkFull::Failed(e, _)) => {
                    let what = sink.describe();
                    self.fail(format!("{what}: zeroing {}..{}: {e}", r.start, r.end));
                    break;
                }
            }
            self.next_zeroes += 1;
            self.zeroing += 1;
            fed = true;
        }
        fed
    }

    /// True once every byte is written: the stored ranges and the zeroes.
    pub(super) fn all_written(&self) -> bool {
        self.acked == self.plan.stored_bytes()
            && self.next_zeroes == self.plan.zeroes().len()
            && self.zeroing == 0
    }
}
