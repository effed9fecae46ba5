//! The metadata contexts an export offers: named views of its extents that a client asks the
//! status of (NBD block status), each a [`MetaContext`] in the list the export owns.
//!
//! Every export offers `base:allocation`, from its bdev's allocation queries. An image export (a
//! pair's split image) also offers `qemu:dirty-bitmap:<checkpoint>` for each checkpoint the pair
//! has when the client asks ([`DirtyBitmaps`]): the tracks P changed since that checkpoint, a
//! superset of those where the image differs from the checkpoint's, so a pull-mode backup tool
//! copies those extents of the image over its copy of the checkpoint (QEMU's interop document
//! defines the `qemu:` namespace; a dirty extent has status 1).

use std::sync::Arc;

use drivers::nbd::proto::{state, BASE_ALLOCATION};
use drivers::{Allocation, Bdev, IoError};

/// One metadata context of an export.
pub trait MetaContext: Send + Sync {
    /// Its name: a namespace, a colon and a leaf name (`base:allocation`).
    fn name(&self) -> &str;

    /// The status of `len` bytes at `offset` (a range of whole blocks inside the export):
    /// descriptors (length, status flags) of consecutive runs from `offset`, appended to `out`.
    /// At least one; their lengths add up to `len` at most (less when looking further would
    /// take long: the client asks again from where they end). Runs on a reactor: it does not
    /// wait for I/O.
    fn status(&self, offset: u64, len: u32, out: &mut Vec<(u32, u32)>) -> Result<(), IoError>;
}

/// The contexts every export of `bdev` offers.
pub fn contexts_of(bdev: &Arc<dyn Bdev>) -> Vec<Arc<dyn MetaContext>> {
    vec![Arc::new(BaseAllocation {
        bdev: Arc::clone(bdev),
    })]
}

/// `base:allocation`: holes (`NBD_STATE_HOLE`, which read as zeroes too) and zeroes
/// (`NBD_STATE_ZERO`) as the bdev reports them, data elsewhere.
struct BaseAllocation {
    bdev: Arc<dyn Bdev>,
}

impl MetaContext for BaseAllocation {
    fn name(&self) -> &str {
        BASE_ALLOCATION
    }

    fn status(&self, offset: u64, len: u32, out: &mut Vec<(u32, u32)>) -> Result<(), IoError> {
        let mut extents = Vec::new();
        self.bdev.allocation(offset, u64::from(len), &mut extents)?;
        let first = out.len();
        let mut left = len;
        for e in extents {
            // Within `len`, which fits in 32 bits.
            let take = e.len.min(u64::from(left)) as u32;
            if take == 0 {
                break;
            }
            let flags = match e.allocation {
                Allocation::Data => 0,
                Allocation::Zero => state::ZERO,
                Allocation::Hole => state::HOLE | state::ZERO,
            };
            out.push((take, flags));
            left -= take;
        }
        if out.len() == first {
            // A driver that said nothing: data, which is always true.
            out.push((len, 0));
        }
        Ok(())
    }
}

/// Where an image export's `qemu:dirty-bitmap:` contexts come from: its pair's checkpoints.
pub trait DirtyBitmaps: Send + Sync {
    /// The checkpoints now, oldest first.
    fn checkpoints(&self) -> Vec<String>;
    /// The tracks changed since checkpoint `name` (64 a word, a superset of the tracks where
    /// the image differs from the checkpoint's) and the track size; `None` once the checkpoint
    /// is gone.
    fn changed_since(&self, name: &str) -> Option<(Vec<u64>, u64)>;
}

/// The name prefix of the dirty bitmap contexts.
pub const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// The status of a dirty extent.
const DIRTY: u32 = 1;
/// Descriptors one status answer holds at most (the client asks again from where they end).
const MAX_RUNS: usize = 1024;

/// The dirty bitmap contexts of the checkpoints `bitmaps` has now.
pub fn dirty_bitmaps(bitmaps: &Arc<dyn DirtyBitmaps>) -> Vec<Arc<dyn MetaContext>> {
    bitmaps
        .checkpoints()
        .into_iter()
        .map(|checkpoint| {
            Arc::new(DirtyBitmap {
                name: format!("{DIRTY_BITMAP}{checkpoint}"),
                checkpoint,
                bitmaps: Arc::clone(bitmaps),
            }) as Arc<dyn MetaContext>
        })
        .collect()
}

/// `qemu:dirty-bitmap:<checkpoint>`.
struct DirtyBitmap {
    name: String,
    checkpoint: String,
    bitmaps: Arc<dyn DirtyBitmaps>,
}

impl MetaContext for DirtyBitmap {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self, offset: u64, len: u32, out: &mut Vec<(u32, u32)>) -> Result<(), IoError> {
        let Some((words, track_size)) = self.bitmaps.changed_since(&self.checkpoint) else {
            return Err(IoError::Refused(format!(
                "checkpoint '{}' was deleted",
                self.checkpoint
            )));
        };
        dirty_runs(&words, track_size, offset, len, out);
        Ok(())
    }
}

/// Runs of dirty (status 1) and clean (0) tracks over `len` bytes from `offset`.
fn dirty_runs(words: &[u64], track_size: u64, offset: u64, len: u32, out: &mut Vec<(u32, u32)>) {
    let dirty = |t: u64| {
        words
            .get((t / 64) as usize)
            .is_some_and(|w| w >> (t % 64) & 1 != 0)
    };
    let end = offset + u64::from(len);
    let mut at = offset;
    let mut runs = 0;
    while at < end && runs < MAX_RUNS {
        let flag = dirty(at / track_size);
        let mut next = (at / track_size + 1) * track_size;
        while next < end && dirty(next / track_size) == flag {
            next += track_size;
        }
        let next = next.min(end);
        out.push(((next - at) as u32, if flag { DIRTY } else { 0 }));
        at = next;
        runs += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drivers::{push_extent, BdevError, ChannelContext, Extent, Geometry, IoChannel};

    /// A bdev answering allocation queries from a fixed map, one extent per query at most
    /// when `one`.
    struct Mapped {
        map: Vec<(u64, Allocation)>,
        one: bool,
    }

    impl Bdev for Mapped {
        fn name(&self) -> &str {
            "mapped"
        }
        fn driver(&self) -> &'static str {
            "test"
        }
        fn geometry(&self) -> Geometry {
            Geometry {
                block_size: 512,
                num_blocks: self.map.iter().map(|m| m.0).sum::<u64>() / 512,
            }
        }
        fn open_channel(&self, _: &ChannelContext) -> Result<Box<dyn IoChannel>, BdevError> {
            Err(BdevError::Unavailable("no I/O".into()))
        }
        fn config(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn allocation(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), IoError> {
            let (mut start, end) = (0, offset + len);
            for &(n, a) in &self.map {
                let (s, e) = (start.max(offset), (start + n).min(end));
                if s < e {
                    push_extent(out, e - s, a);
                    if self.one {
                        break;
                    }
                }
                start += n;
            }
            Ok(())
        }
    }

    fn status(map: Vec<(u64, Allocation)>, one: bool, offset: u64, len: u32) -> Vec<(u32, u32)> {
        let bdev: Arc<dyn Bdev> = Arc::new(Mapped { map, one });
        let ctx = contexts_of(&bdev);
        assert_eq!(ctx[0].name(), "base:allocation");
        let mut out = Vec::new();
        ctx[0].status(offset, len, &mut out).expect("status");
        out
    }

    #[test]
    fn allocation_states_map_to_the_base_allocation_flags() {
        use Allocation::{Data, Hole, Zero};
        let map = vec![(4096, Data), (8192, Hole), (512, Zero), (1024, Data)];
        assert_eq!(
            status(map.clone(), false, 0, 13824),
            vec![(4096, 0), (8192, 3), (512, 2), (1024, 0)]
        );
        // A range inside the map; a driver's short answer stays short.
        assert_eq!(
            status(map.clone(), false, 2048, 4096),
            vec![(2048, 0), (2048, 3)]
        );
        assert_eq!(status(map, true, 2048, 4096), vec![(2048, 0)]);
    }

    #[test]
    fn a_driver_without_an_answer_reads_as_data() {
        assert_eq!(status(Vec::new(), false, 0, 4096), vec![(4096, 0)]);
    }

    #[test]
    fn dirty_runs_follow_the_tracks_and_stop_at_the_range() {
        // Tracks of 64 KiB: 1, 2 and 5 dirty.
        let words = vec![0b100110u64];
        let mut out = Vec::new();
        dirty_runs(&words, 65536, 0, 8 * 65536, &mut out);
        assert_eq!(
            out,
            vec![
                (65536, 0),
                (2 * 65536, DIRTY),
                (2 * 65536, 0),
                (65536, DIRTY),
                (2 * 65536, 0)
            ]
        );
        // From inside a dirty track, for less than the rest of it.
        out.clear();
        dirty_runs(&words, 65536, 65536 + 4096, 8192, &mut out);
        assert_eq!(out, vec![(8192, DIRTY)]);
        // From inside a clean track into a dirty one.
        out.clear();
        dirty_runs(&words, 65536, 4096, 65536, &mut out);
        assert_eq!(out, vec![(61440, 0), (4096, DIRTY)]);
    }
}
