//! Allocation queries through a pair view, answered per track from the side a read of the
//! track would go to: the image from S where the track is copied and from P (under the track's
//! lock, as a read takes it) where it is pending; P from P, or during a restore "data" for the
//! tracks P still lacks. A track whose answer could change under the query (its lock taken by
//! a copy, a write mirrored before the split still in flight) is "data", which is always true.

use drivers::{push_extent, Allocation, Bdev, Extent, IoError, MAX_QUERY_EXTENTS};

use super::View;
use crate::pair::{Pair, PairState};

/// Tracks one query looks at, at most (4 GiB of the default 1 MiB tracks).
const MAX_TRACKS: u64 = 4096;

/// Where the allocation of a track comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AskFrom {
    P,
    S,
    /// A pending track of the image: P, under the track's lock.
    PendingP,
    /// Not known without waiting: data.
    Data,
}

fn source(pair: &Pair, view: View, track: u64, split: bool) -> AskFrom {
    match view {
        View::Primary if pair.restore.contains(track) => AskFrom::Data,
        View::Primary => AskFrom::P,
        View::Image if split && pair.mirrored_writes_in_flight(track..track + 1) => AskFrom::Data,
        View::Image if pair.pending.is_pending(track) => AskFrom::PendingP,
        View::Image => AskFrom::S,
    }
}

/// Appends the extents of `len` bytes at `offset` of `view` to `out` (see [`Bdev::allocation`]).
pub(super) fn allocation(
    pair: &Pair,
    view: View,
    offset: u64,
    len: u64,
    out: &mut Vec<Extent>,
) -> Result<(), IoError> {
    if view == View::Primary && !pair.reversing() {
        return pair.primary().allocation(offset, len, out);
    }
    if view == View::Image && pair.state() == PairState::Psue {
        return Err(IoError::Refused(format!(
            "pair '{}' is suspended on an error (PSUE): its image is not valid",
            pair.name()
        )));
    }
    let split = pair.state() == PairState::Psus;
    let ts = pair.track_size();
    let end = offset + len;
    let (first_extent, mut at, mut tracks) = (out.len(), offset, 0);
    while at < end && out.len() - first_extent < MAX_QUERY_EXTENTS && tracks < MAX_TRACKS {
        let track = at / ts;
        let from = source(pair, view, track, split);
        tracks += 1;
        let mut run_end = ((track + 1) * ts).min(end);
        // Runs of tracks read from one side are asked in one query; a pending track is asked
        // alone, under its lock.
        if from != AskFrom::PendingP {
            while run_end < end
                && tracks < MAX_TRACKS
                && source(pair, view, run_end / ts, split) == from
            {
                run_end = (run_end + ts).min(end);
                tracks += 1;
            }
        }
        let want = run_end - at;
        let covered = match from {
            AskFrom::Data => {
                push_extent(out, want, Allocation::Data);
                want
            }
            AskFrom::P => ask(pair.primary().as_ref(), at, want, out)?,
            AskFrom::S => ask(pair.secondary().as_ref(), at, want, out)?,
            AskFrom::PendingP if pair.locks.try_lock(track) => {
                // Copied between the look and the lock: S has it now.
                let side = if pair.pending.is_pending(track) {
                    pair.primary()
                } else {
                    pair.secondary()
                };
                let asked = ask(side.as_ref(), at, want, out);
                pair.unlock_track(track);
                asked?
            }
            AskFrom::PendingP => {
                push_extent(out, want, Allocation::Data);
                want
            }
        };
        at += covered;
        if covered < want {
            // The side stopped early: the caller asks again from here.
            break;
        }
    }
    Ok(())
}

/// Asks `bdev` about `len` bytes at `offset`, appending its extents to `out`; the bytes they
/// cover.
fn ask(bdev: &dyn Bdev, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<u64, IoError> {
    let mut part = Vec::new();
    bdev.allocation(offset, len, &mut part)?;
    let mut covered = 0;
    for e in part {
        // A driver answers within the range; more would misplace what follows.
        let take = e.len.min(len - covered);
        push_extent(out, take, e.allocation);
        covered += take;
        if covered == len {
            break;
        }
    }
    Ok(covered)
}
