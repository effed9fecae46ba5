//! Reads through a pair channel: reads of P (from S, in a restore, where P still lacks a
//! track) and reads of the image (S where copied, P under the track's lock where pending),
//! straight into the host's buffers or through staging buffers when one buffer spans both sides.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use drivers::{IoBufs, IoRequest};

use super::{PairChannel, Phase, Side, Step, STAGING_BUFFERS, SUB_ALL, SUB_BOUNCE};
use crate::pair::PairState;

impl PairChannel {
    /// A read of P: from P, or during a restore from S for the tracks P still lacks.
    pub(super) fn primary_read(&mut self, key: usize) -> Step {
        if self.pair.reversing() {
            let pair = Arc::clone(&self.pair);
            self.read_routed(key, &|t| {
                if pair.restore.contains(t) {
                    Side::S
                } else {
                    Side::P
                }
            })
        } else {
            let p = &mut self.requests[key];
            p.phase = Phase::Reading { bounce: false };
            let bufs = Self::take_all_bufs(p);
            let req = IoRequest::read(p.offset, bufs, 0);
            self.issue(key, Side::P, req, SUB_ALL);
            Step::Running
        }
    }

    /// A read of the image: S for tracks copied, P (under the track's lock) for tracks pending.
    pub(super) fn image_read(&mut self, key: usize) -> Step {
        if self.pair.state() == PairState::Psue {
            return self.refuse(
                key,
                format!(
                    "pair '{}' is suspended on an error (PSUE): its image is not valid",
                    self.pair.name()
                ),
            );
        }
        let (off, len) = (self.requests[key].offset, self.requests[key].len);
        let tracks = self.pair.tracks_of(off, len);
        // After a split, writes mirrored before it and still in flight belong to the image: wait
        // for them. (Before a split the image is not defined and a read does not wait, so busy
        // tracks cannot starve it.)
        if self.pair.state() == PairState::Psus
            && self.pair.mirrored_writes_in_flight(tracks.clone())
        {
            return Step::Wait;
        }
        if !self.lock_pending(key, tracks) {
            return Step::Wait;
        }
        let locked = self.requests[key].locked.clone();
        let step = self.read_routed(key, &|t| {
            if locked.contains(&t) {
                Side::P
            } else {
                Side::S
            }
        });
        if matches!(step, Step::Wait) {
            self.release_locks(key);
        }
        step
    }

    /// Reads each part of the request from the side `source` names for its track. Buffers that
    /// lie within one source go straight to that side; otherwise the data lands in staging
    /// buffers first and is copied (counted) into the host's buffers.
    fn read_routed(&mut self, key: usize, source: &dyn Fn(u64) -> Side) -> Step {
        let ts = self.pair.track_size();
        let p = &self.requests[key];
        let mut off = p.offset;
        let mut direct = true;
        let mut plan = Vec::with_capacity(p.bufs.len());
        for b in p.bufs.iter().flatten() {
            let (first, last) = (off / ts, (off + b.len() as u64 - 1) / ts);
            let src = source(first);
            if (first + 1..=last).any(|t| source(t) != src) {
                direct = false;
                break;
            }
            plan.push((off, src));
            off += b.len() as u64;
        }
        if direct {
            // Consecutive buffers from one side go as one vectored read; its sub id is the index
            // of its first buffer, and the buffers come back in order from there.
            self.requests[key].phase = Phase::Reading { bounce: false };
            let mut i = 0;
            while i < plan.len() {
                let (off, src) = plan[i];
                let mut j = i + 1;
                while j < plan.len() && plan[j].1 == src {
                    j += 1;
                }
                let bufs: IoBufs = self.requests[key].bufs[i..j]
                    .iter_mut()
                    .filter_map(Option::take)
                    .collect();
                self.issue(key, src, IoRequest::read(off, bufs, 0), i as u64);
                i = j;
            }
            return Step::Running;
        }
        // Bounce: one staging buffer per track piece.
        let (start, end) = (p.offset, p.offset + p.len);
        let pieces = self.pair.tracks_of(start, p.len);
        if pieces.end - pieces.start > STAGING_BUFFERS as u64 {
            return self.refuse(
                key,
                format!(
                    "a read crossing {} track boundaries must split its buffers on the {} byte \
                     tracks",
                    pieces.end - pieces.start - 1,
                    ts
                ),
            );
        }
        let mut staged = Vec::new();
        for t in pieces {
            let (lo, hi) = ((t * ts).max(start), ((t + 1) * ts).min(end));
            match self.staging() {
                Some(mut buf) => {
                    let _ = buf.set_len((hi - lo) as usize);
                    staged.push((buf, lo, source(t)));
                }
                None => return Step::Wait,
            }
        }
        self.requests[key].phase = Phase::Reading { bounce: true };
        for (i, (buf, lo, src)) in staged.into_iter().enumerate() {
            self.requests[key].bounce.push((None, lo));
            let mut bufs = IoBufs::new();
            bufs.push(buf);
            self.issue(
                key,
                src,
                IoRequest::read(lo, bufs, 0),
                SUB_BOUNCE + i as u64,
            );
        }
        Step::Running
    }

    /// Copies staged pieces into the host's buffers.
    pub(super) fn unbounce(&mut self, key: usize) {
        let p = &mut self.requests[key];
        let mut copied = 0u64;
        for (piece, lo) in &p.bounce {
            let Some(piece) = piece else { continue };
            let mut src = piece.as_slice();
            let mut pos = *lo - p.offset;
            let mut buf_start = 0u64;
            for b in p.bufs.iter_mut().flatten() {
                let blen = b.len() as u64;
                if src.is_empty() {
                    break;
                }
                if pos < buf_start + blen && pos >= buf_start {
                    let at = (pos - buf_start) as usize;
                    let n = (b.len() - at).min(src.len());
                    b.as_mut_slice()[at..at + n].copy_from_slice(&src[..n]);
                    src = &src[n..];
                    pos += n as u64;
                    copied += n as u64;
                }
                buf_start += blen;
            }
        }
        p.bounce.clear();
        self.cpu_copied += copied;
        self.pair
            .stats
            .cpu_copied_bytes
            .fetch_add(copied, Ordering::Relaxed);
    }
}
