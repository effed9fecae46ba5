//! Header numbers: a transition takes one and asks for its header; a split made durable by a
//! split journal record holds its header back until the record is, then lets it be written
//! lazily; what is durable is the newer of the header on disk and the journaled split.

use std::sync::atomic::Ordering;

use super::blocking_io::BlockingIo;
use super::{encode_header, HeaderRecord, MetaError, Metadata, BLOCK, HEADER_SLOTS};

impl Metadata {
    /// Takes the next header number (a transition is about to change the state).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Asks for header `seq` (or newer) to be written; `flush_data` makes P and S durable
    /// first.
    pub fn request_header(&self, seq: u64, flush_data: bool) {
        if flush_data {
            self.header_flush_data.store(true, Ordering::SeqCst);
        }
        self.header_wanted.fetch_max(seq, Ordering::SeqCst);
        // A held header cannot be written yet: its release wakes the writer if it must.
        if !self.header_held() {
            self.wake_writer();
        }
    }

    /// The pair's instance (see [`HeaderRecord::instance`]).
    pub fn instance(&self) -> u64 {
        self.instance.load(Ordering::SeqCst)
    }

    /// Holds header writes back: the next transition is a split made durable by a split
    /// journal record. Set before the transition takes its number, so a writer that sees the
    /// number sees the hold.
    pub fn hold_header(&self) {
        self.header_held.store(true, Ordering::SeqCst);
    }

    /// True while header writes are held back.
    pub fn header_held(&self) -> bool {
        self.header_held.load(Ordering::SeqCst)
    }

    /// Header `seq` is durable as a split journal record (`Some`), or will never be (`None`:
    /// the header itself must be written): header writes resume.
    pub fn release_header(&self, journaled: Option<u64>) {
        if let Some(seq) = journaled {
            self.journaled.fetch_max(seq, Ordering::SeqCst);
        }
        self.header_held.store(false, Ordering::SeqCst);
        // Read after the hold is gone, as the writer sets it before it reads the hold: either
        // this sees it or the writer sees no hold.
        if journaled.is_none() || self.header_due_on_release.swap(false, Ordering::SeqCst) {
            self.wake_writer();
        }
    }

    /// A writer has a header due: if headers are held, their release must wake it.
    pub(super) fn note_header_due(&self, due: bool) {
        self.header_due_on_release.store(due, Ordering::SeqCst);
    }

    /// The newest header number whose state is durable, as a header or as a split journal
    /// record.
    pub fn state_durable_seq(&self) -> u64 {
        self.header_durable()
            .max(self.journaled.load(Ordering::SeqCst))
    }

    /// Puts a header recovered from the split journal on disk (in its slot, flushed) before
    /// the pair serves, so the journal record is no longer needed; numbers go on from it.
    pub fn adopt_header(&self, rec: &HeaderRecord) -> Result<(), MetaError> {
        let mut io = BlockingIo::open(&self.bdev)?;
        let mut block = vec![0u8; BLOCK as usize];
        encode_header(rec, self.layout.format, &mut block)?;
        io.write((rec.seq % HEADER_SLOTS) * BLOCK, &[block.as_slice()])?;
        io.flush()?;
        self.next_seq.fetch_max(rec.seq, Ordering::SeqCst);
        self.header_wanted.fetch_max(rec.seq, Ordering::SeqCst);
        self.header_durable.fetch_max(rec.seq, Ordering::SeqCst);
        Ok(())
    }

    /// The newest header number asked for.
    pub fn header_wanted(&self) -> u64 {
        self.header_wanted.load(Ordering::SeqCst)
    }

    /// The newest header number known durable.
    pub fn header_durable(&self) -> u64 {
        self.header_durable.load(Ordering::SeqCst)
    }
}
