//! Host writes through a pair channel: the gate a write passes, the state it relies on (and
//! waits to be durable), what it means in that state (mirrored, or a change since the split),
//! the metadata it needs durable before it is issued, the write itself, and the track sets it
//! marks when it is done. Copy before write is in `copy_before_write.rs`.

use drivers::{IoError, IoRequest};

use super::{PairChannel, Phase, Side, Step, SUB_ALL, SUB_NODATA};
use crate::pair::{Durability, HostWrite, PairState};

impl PairChannel {
    /// A host write to P (primary view) or S (image view).
    pub(super) fn host_write(&mut self, key: usize, side: Side) -> Step {
        if !self.pair.enter_gate() {
            return Step::Wait;
        }
        if side == Side::S {
            // A backup running on the image reads these tracks first. (Checked inside the gate:
            // a backup starts through the gate, after the S writes in flight have drained.)
            let p = &self.requests[key];
            if self.pair.backup_holds(self.pair.tracks_of(p.offset, p.len)) {
                self.pair.leave_gate();
                return Step::Wait;
            }
        }
        self.requests[key].gated = true;
        let tracks = {
            let p = &self.requests[key];
            self.pair.tracks_of(p.offset, p.len)
        };
        let mut state = self.pair.state();
        if side == Side::P
            && matches!(state, PairState::Copy | PairState::Pair)
            && !self.pair.reversing()
        {
            // A mirrored write counts itself on its tracks before it trusts the state, so a
            // split that lands meanwhile sees it and post-split users of those tracks wait for
            // it (it is then wholly in the image).
            self.pair.begin_mirrored_write(tracks.clone());
            state = self.pair.state();
            if matches!(state, PairState::Copy | PairState::Pair) {
                self.requests[key].counted = true;
            } else {
                self.pair.end_mirrored_write(tracks.clone());
            }
        }
        let write_kind = match (side, state) {
            (Side::P, PairState::Copy) if self.pair.reversing() => {
                return self.refuse(
                    key,
                    format!(
                        "pair '{}' is restoring P from S: P is read-only until the pair is in PAIR",
                        self.pair.name()
                    ),
                );
            }
            (Side::P, PairState::Copy | PairState::Pair) => HostWrite::Mirror,
            (Side::P, PairState::Psus | PairState::Psue) => HostWrite::ChangedP {
                split: state == PairState::Psus,
            },
            (Side::S, PairState::Psus) => HostWrite::ChangedS,
            (Side::S, _) => {
                return self.refuse(
                    key,
                    format!(
                        "the image of pair '{}' is writable only while the pair is split (PSUS), \
                         not in {}",
                        self.pair.name(),
                        state.as_str()
                    ),
                );
            }
        };
        // A write relies on the state it saw: it waits until that state is durable.
        if !self.pair.state_durable() {
            if self.requests[key].counted {
                self.pair.end_mirrored_write(tracks.clone());
                self.requests[key].counted = false;
            }
            self.ungate(key);
            if let Some(e) = self.pair.metadata().and_then(|m| m.failure()) {
                return self.fail_unpersisted(key, e);
            }
            return Step::Wait;
        }
        let p = &mut self.requests[key];
        p.side = side;
        p.write_kind = Some(write_kind);
        if state != PairState::Psus {
            return self.write_when_durable(key);
        }
        self.copy_before_write(key, tracks)
    }

    /// Persists what the write needs (write-intent, changed and pending bits, see
    /// [`crate::pair::metadata`]) and issues it once that is durable.
    pub(super) fn write_when_durable(&mut self, key: usize) -> Step {
        let p = &self.requests[key];
        let Some(kind) = p.write_kind else {
            return self.issue_write(key);
        };
        let tracks = self.pair.tracks_of(p.offset, p.len);
        self.pair.prepare_write(kind, tracks);
        self.meta_check(key)
    }

    /// Issues a write whose metadata is durable, fails it if the metadata cannot be written, or
    /// keeps it waiting.
    pub(super) fn meta_check(&mut self, key: usize) -> Step {
        let p = &self.requests[key];
        let (kind, tracks) = match p.write_kind {
            Some(k) => (k, self.pair.tracks_of(p.offset, p.len)),
            None => return self.issue_write(key),
        };
        match self.pair.write_durability(kind, tracks) {
            Durability::Ready => self.issue_write(key),
            Durability::Wait => {
                self.requests[key].phase = Phase::MetaWait;
                self.meta_waiting.push_back(key);
                Step::Running
            }
            Durability::Failed(e) => self.fail_unpersisted(key, e),
        }
    }

    /// Fails a write whose metadata can no longer be written.
    fn fail_unpersisted(&mut self, key: usize, error: String) -> Step {
        self.requests[key].error = Some(IoError::Aborted(format!(
            "pair metadata cannot be written: {error}"
        )));
        self.finish(key);
        Step::Running
    }

    /// A write that entered the gate gives up for now (it starts over on a later poll).
    pub(super) fn ungate(&mut self, key: usize) {
        self.pair.leave_gate();
        self.requests[key].gated = false;
    }

    /// Issues the host's write to its side.
    fn issue_write(&mut self, key: usize) -> Step {
        let p = &mut self.requests[key];
        tracing::trace!(pair = %self.pair.name(), offset = p.offset, len = p.len, write_kind = ?p.write_kind, "host write issued");
        p.phase = Phase::Writing;
        let (op, offset, len, side) = (p.op, p.offset, p.len, p.side);
        let req = if op.has_data() {
            let bufs = Self::take_all_bufs(p);
            let mut r = IoRequest::write(offset, bufs, 0);
            r.op = op;
            r
        } else {
            IoRequest::without_data(op, offset, len, 0)
        };
        let sub = if op.has_data() { SUB_ALL } else { SUB_NODATA };
        self.issue(key, side, req, sub);
        Step::Running
    }

    /// Records a finished write in the pair's track sets.
    pub(super) fn record_write(&mut self, key: usize) {
        let p = &self.requests[key];
        let tracks = self.pair.tracks_of(p.offset, p.len);
        match p.write_kind {
            Some(HostWrite::Mirror) => {
                let mut newly = false;
                tracing::trace!(pair = %self.pair.name(), ?tracks, "mirrored write done");
                for t in tracks {
                    newly |= self.pair.pending.mark_written(t);
                }
                if newly {
                    self.pair.wake_copier();
                }
            }
            Some(HostWrite::ChangedP { .. }) => tracks.for_each(|t| {
                self.pair.changed_p.insert(t);
            }),
            Some(HostWrite::ChangedS) => tracks.for_each(|t| {
                self.pair.changed_s.insert(t);
            }),
            None => {}
        }
    }
}
