//! Writes the split journal's records without blocking: each record's blocks, then a flush,
//! through a channel of the thread that drives it (the control poller's reactor).

use std::sync::Arc;

use drivers::{
    Bdev, ChannelContext, IoBufs, IoChannel, IoCompletion, IoOp, IoRequest, SubmitErrorKind,
};
use hugepages::BufferPool;

use super::{Placed, SplitJournal};
use crate::pair::metadata::blocking_io::PAGES_PER_IO;
use crate::pair::metadata::BLOCK;

/// The record being written.
struct Current {
    placed: Placed,
    /// Bytes of the record submitted so far.
    sent: usize,
    in_flight: bool,
    flushing: bool,
    error: Option<String>,
}

/// Moves a journal's records to its device, a step at a time (see [`JournalWriter::pump`]).
#[derive(Default)]
pub struct JournalWriter {
    /// The journal the record being written belongs to (it is finished there even if the
    /// engine switched journals meanwhile).
    journal: Option<Arc<SplitJournal>>,
    /// The journal's device the channel writes to.
    bdev: Option<Arc<dyn Bdev>>,
    ch: Option<Box<dyn IoChannel>>,
    pool: Option<BufferPool>,
    current: Option<Current>,
    done: Vec<IoCompletion>,
}

impl JournalWriter {
    /// Does what can be done now for `journal`'s records (opening a channel with `ctx` on
    /// first use); true when it did anything.
    pub fn pump(&mut self, journal: &Arc<SplitJournal>, ctx: &ChannelContext) -> bool {
        // The usual case, on every turn of the control poller's reactor: nothing to write.
        if self.current.is_none() && !journal.has_unwritten() {
            return false;
        }
        let journal_arc = match (&self.current, &self.journal) {
            (Some(_), Some(own)) => Arc::clone(own),
            _ => Arc::clone(journal),
        };
        let journal = journal_arc.as_ref();
        if self.current.is_none() && !self.open_for(journal, ctx) {
            return false;
        }
        let mut busy = false;
        if let Some(ch) = self.ch.as_mut() {
            ch.poll(&mut self.done);
        }
        for c in self.done.drain(..) {
            busy = true;
            if let Some(cur) = self.current.as_mut() {
                cur.in_flight = false;
                if let Err(e) = c.result {
                    cur.error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        if self.current.is_none() {
            let Some(placed) = journal.take() else {
                return busy;
            };
            self.journal = Some(Arc::clone(&journal_arc));
            self.current = Some(Current {
                placed,
                sent: 0,
                in_flight: false,
                flushing: false,
                error: None,
            });
        }
        busy | self.step(journal)
    }

    /// True when no record is being written.
    pub fn is_idle(&self) -> bool {
        self.current.is_none()
    }

    /// Keeps a channel to `journal`'s device; false when there is none.
    fn open_for(&mut self, journal: &SplitJournal, ctx: &ChannelContext) -> bool {
        let same = self
            .bdev
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, &journal.bdev));
        if same && self.ch.is_some() {
            return true;
        }
        let ch = journal.bdev.open_channel(&ChannelContext {
            queue_depth: 4,
            ..ctx.clone()
        });
        let pool = BufferPool::new(BLOCK as usize, PAGES_PER_IO);
        match (ch, pool) {
            (Ok(ch), Ok(pool)) => {
                self.bdev = Some(Arc::clone(&journal.bdev));
                self.ch = Some(ch);
                self.pool = Some(pool);
                true
            }
            (ch, pool) => {
                let e = ch
                    .err()
                    .map(|e| e.to_string())
                    .or(pool.err().map(|e| e.to_string()))
                    .unwrap_or_default();
                // Every record queued fails now; the next one tries again.
                while let Some(placed) = journal.take() {
                    journal.written(placed, Err(format!("split journal: {e}")));
                }
                false
            }
        }
    }

    /// Submits the record's next request, or ends it; true when it did anything.
    fn step(&mut self, journal: &SplitJournal) -> bool {
        let Some(cur) = self.current.as_mut() else {
            return false;
        };
        if cur.in_flight {
            return false;
        }
        let finished = cur.error.is_some() || (cur.flushing && cur.sent == cur.placed.bytes.len());
        if finished {
            if let Some(cur) = self.current.take() {
                let result = cur.error.map_or(Ok(()), Err);
                journal.written(cur.placed, result);
            }
            return true;
        }
        let (Some(ch), Some(pool)) = (self.ch.as_mut(), self.pool.as_ref()) else {
            cur.error = Some("split journal channel closed".into());
            return true;
        };
        let (req, advance) = if cur.sent < cur.placed.bytes.len() {
            let chunk = &cur.placed.bytes[cur.sent..];
            let chunk = &chunk[..chunk.len().min(PAGES_PER_IO * BLOCK as usize)];
            let mut bufs = IoBufs::new();
            for block in chunk.chunks(BLOCK as usize) {
                let Some(mut buf) = pool.get() else {
                    // The previous request's buffers are back once it completed: not here.
                    cur.error = Some("no buffer for the split journal".into());
                    return true;
                };
                buf.as_mut_slice()[..block.len()].copy_from_slice(block);
                bufs.push(buf);
            }
            let at = cur.placed.offset + cur.sent as u64;
            let mut write = IoRequest::write(at, bufs, 0);
            // A record in one request is made durable by it (FUA): one round trip to the
            // device instead of a write and then a flush. A longer one ends with a flush.
            if cur.sent == 0 && chunk.len() == cur.placed.bytes.len() {
                write.op = IoOp::Write { fua: true };
                cur.flushing = true;
            }
            (write, chunk.len())
        } else {
            (IoRequest::without_data(IoOp::Flush, 0, 0, 0), 0)
        };
        match ch.submit(req) {
            Ok(()) => {
                cur.in_flight = true;
                cur.sent += advance;
                cur.flushing |= advance == 0;
            }
            // Tried again on the next pump.
            Err(e) if matches!(e.error, SubmitErrorKind::QueueFull) => {}
            Err(e) => cur.error = Some(format!("split journal write refused: {:?}", e.error)),
        }
        true
    }
}
