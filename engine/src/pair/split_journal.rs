//! The split journal: a split of several pairs in one call is made durable by one record (one
//! write and one flush, whatever the number of pairs) naming each pair and the header number
//! its split took, instead of a header write and a flush per pair.
//!
//! The pairs' own headers are held back until the record is durable (so no header shows the
//! split before the record does) and written lazily after it. Host writes that rely on the
//! split wait for the record, as they wait for a header. A restart that finds a pair's newest
//! header older than a record naming it (same name and instance) applies the split from the
//! record and writes that header before the pair serves. So after a crash or a power cut either
//! the record is durable and every pair of the group comes back split at the common instant, or
//! it is not, no header shows the split and no acknowledged write relied on it: none is split.
//!
//! On disk, records follow each other from offset 0, each starting on a 4 KiB boundary: a
//! 32-byte head (magic, format, payload length, record number, CRC-32C of number and payload)
//! then a JSON payload. A scan reads records while each is whole and numbered above the one
//! before, so the stale tail of an earlier run of the log ends it. Appending starts over at 0
//! once every record is retired: each of its pairs has a newer header of its own on disk, or
//! is gone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use drivers::Bdev;
use serde::{Deserialize, Serialize};

use super::metadata::blocking_io::BlockingIo;
use super::metadata::{MetaError, BLOCK};
use super::Pair;

const MAGIC: [u8; 8] = *b"QSSPLITJ";
const FORMAT: u32 = 1;
const HEAD: usize = 32;
/// How long an append waits for older records to retire when the log is full.
const FULL_WAIT: Duration = Duration::from_secs(10);
/// The journal's file in the state directory.
pub const FILE: &str = "splits.journal";
/// The size of the journal file in the state directory (sparse).
pub const DEFAULT_SIZE: u64 = 64 << 20;

/// A record's payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    /// The split instant, ns since the epoch.
    split_at_ns: u64,
    pairs: Vec<RecordPair>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct RecordPair {
    name: String,
    instance: u64,
    /// The header number the split took.
    seq: u64,
}

/// A split a restart found in the journal for a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredSplit {
    /// The header number the split took.
    pub seq: u64,
    /// The split instant.
    pub split_at_ns: u64,
}

struct Job {
    number: u64,
    bytes: Vec<u8>,
    pairs: Vec<(Arc<Pair>, u64)>,
}

/// A record placed in the log, for its writer to write and flush.
pub(crate) struct Placed {
    number: u64,
    offset: u64,
    bytes: Vec<u8>,
    pairs: Vec<(Arc<Pair>, u64)>,
}

/// Where records go: the control poller's writer ([`JournalWriter`]) takes them in order.
struct Log {
    capacity: u64,
    /// Where the next record goes.
    end: u64,
    /// The pairs of each record written since the log last started over.
    outstanding: Vec<Vec<(Arc<Pair>, u64)>>,
    /// Records handed over, not yet taken by the writer.
    queue: VecDeque<Job>,
    /// Since when the record at the head of the queue has found the log full.
    full_since: Option<Instant>,
}

/// The journal. Records are written, without blocking, by a [`JournalWriter`] the control
/// poller drives on its reactor: a thread of its own would wait for a core the reactors are
/// spinning on.
pub struct SplitJournal {
    bdev: Arc<dyn Bdev>,
    log: Mutex<Log>,
    next: AtomicU64,
    /// The newest record number the writer is done with (durable or failed).
    done: AtomicU64,
    failed: Mutex<HashMap<u64, String>>,
    /// What the scan at open found, by pair name, until the pair is loaded.
    recovered: Mutex<HashMap<String, (u64, RecoveredSplit)>>,
}

impl SplitJournal {
    /// Opens the journal on `bdev`: scans its records, then appends after them.
    pub fn open(bdev: Arc<dyn Bdev>) -> Result<Arc<Self>, MetaError> {
        let capacity = bdev.geometry().size() / BLOCK * BLOCK;
        let mut io = BlockingIo::open(&bdev)?;
        let (end, last, records) = scan(&mut io, capacity)?;
        drop(io);
        let mut recovered = HashMap::new();
        for r in &records {
            for p in &r.pairs {
                let split = RecoveredSplit {
                    seq: p.seq,
                    split_at_ns: r.split_at_ns,
                };
                recovered.insert(p.name.clone(), (p.instance, split));
            }
        }
        if !records.is_empty() {
            tracing::info!(
                records = records.len(),
                pairs = recovered.len(),
                "split journal read"
            );
        }
        Ok(Arc::new(Self {
            bdev,
            log: Mutex::new(Log {
                capacity,
                end,
                outstanding: Vec::new(),
                queue: VecDeque::new(),
                full_since: None,
            }),
            next: AtomicU64::new(last + 1),
            done: AtomicU64::new(last),
            failed: Mutex::new(HashMap::new()),
            recovered: Mutex::new(recovered),
        }))
    }

    /// Hands a record over: `pairs` split at `split_at_ns`, each with the header number its
    /// split took. Returns the record's number, for [`SplitJournal::status`].
    pub fn submit(&self, split_at_ns: u64, pairs: Vec<(Arc<Pair>, u64)>) -> Result<u64, String> {
        let record = Record {
            split_at_ns,
            pairs: pairs
                .iter()
                .map(|(p, seq)| RecordPair {
                    name: p.name().to_string(),
                    instance: p.metadata().map_or(0, |m| m.instance()),
                    seq: *seq,
                })
                .collect(),
        };
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        // Numbered under the lock: records are queued in the order of their numbers.
        let number = self.next.fetch_add(1, Ordering::SeqCst);
        let bytes = encode(number, &record).map_err(|e| e.to_string())?;
        log.queue.push_back(Job {
            number,
            bytes,
            pairs,
        });
        Ok(number)
    }

    /// True while a record handed over is not done with (durable or failed).
    /// True while a record waits to be written (or is being written).
    pub(crate) fn has_unwritten(&self) -> bool {
        self.done.load(Ordering::SeqCst) + 1 < self.next.load(Ordering::SeqCst)
    }

    /// `None` while record `number` is being written; then whether it is durable.
    pub fn status(&self, number: u64) -> Option<Result<(), String>> {
        if self.done.load(Ordering::SeqCst) < number {
            return None;
        }
        let failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        Some(failed.get(&number).map_or(Ok(()), |e| Err(e.clone())))
    }

    /// The split the journal holds for pair `name` of instance `instance` whose newest header
    /// is number `header_seq`, if one is newer than that header. Taken once: the pair writes
    /// the header before it serves.
    pub fn recovered_split(
        &self,
        name: &str,
        instance: u64,
        header_seq: u64,
    ) -> Option<RecoveredSplit> {
        let mut recovered = self
            .recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (inst, split) = recovered.remove(name)?;
        (inst == instance && split.seq > header_seq).then_some(split)
    }

    /// The next record to write, placed in the log; `None` when none is queued or the log is
    /// full (until older records retire, for up to [`FULL_WAIT`]).
    fn take(&self) -> Option<Placed> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let len = log.queue.front()?.bytes.len() as u64;
        if len > log.capacity {
            let capacity = log.capacity;
            let job = log.queue.pop_front()?;
            drop(log);
            self.finish(
                job.number,
                Err(format!(
                    "a record of {len} bytes does not fit the split journal ({capacity} bytes)"
                )),
            );
            return None;
        }
        if self.retire(&mut log) {
            log.end = 0;
        }
        if log.end + len > log.capacity {
            let since = *log.full_since.get_or_insert_with(Instant::now);
            if since.elapsed() <= FULL_WAIT {
                return None;
            }
            log.full_since = None;
            let mut recovered = self
                .recovered
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !log.outstanding.is_empty() {
                let job = log.queue.pop_front()?;
                drop((recovered, log));
                self.finish(job.number, Err("the split journal is full".into()));
                return None;
            }
            // Only splits of pairs this run never loaded hold it: they go.
            tracing::warn!(
                pairs = recovered.len(),
                "split journal full: dropping the splits of pairs not loaded since the restart"
            );
            recovered.clear();
            log.end = 0;
        }
        log.full_since = None;
        let job = log.queue.pop_front()?;
        let offset = log.end;
        log.end += len;
        Some(Placed {
            number: job.number,
            offset,
            bytes: job.bytes,
            pairs: job.pairs,
        })
    }

    /// Record `placed` is durable, or failed: then the next record takes its place, so no
    /// torn record ends the log before a good one.
    fn written(&self, placed: Placed, result: Result<(), String>) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => log.outstanding.push(placed.pairs),
            Err(_) => log.end = placed.offset,
        }
        drop(log);
        self.finish(placed.number, result);
    }

    fn finish(&self, number: u64, result: Result<(), String>) {
        if let Err(e) = result {
            tracing::error!(record = number, %e, "split journal record not written");
            self.failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(number, e);
        }
        self.done.store(number, Ordering::SeqCst);
    }

    /// Drops the records whose pairs all have a newer header of their own on disk (or are
    /// gone); true when none is left and no pair still has to load one.
    fn retire(&self, log: &mut Log) -> bool {
        log.outstanding.retain(|pairs| {
            pairs.iter().any(|(p, seq)| {
                !p.is_deleted()
                    && p.metadata()
                        .is_some_and(|m| m.header_durable() < *seq && m.failure().is_none())
            })
        });
        log.outstanding.is_empty()
            && self
                .recovered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
    }
}

/// A record as written: head and payload, padded to whole blocks.
fn encode(number: u64, record: &Record) -> Result<Vec<u8>, serde_json::Error> {
    let payload = serde_json::to_vec(record)?;
    let total = (HEAD + payload.len()).div_ceil(BLOCK as usize) * BLOCK as usize;
    let mut out = vec![0u8; total];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[16..24].copy_from_slice(&number.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&number.to_le_bytes()), &payload);
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out[HEAD..HEAD + payload.len()].copy_from_slice(&payload);
    Ok(out)
}

/// The record starting with `head` (the first block), given the rest of its blocks from
/// `more`: its number and payload, or `None` where the log ends.
fn decode(
    head: &[u8],
    more: impl FnOnce(usize) -> Result<Vec<u8>, MetaError>,
) -> Result<Option<(u64, Record, u64)>, MetaError> {
    if head.len() < HEAD || head[..8] != MAGIC {
        return Ok(None);
    }
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if u32_at(8) != FORMAT {
        return Ok(None);
    }
    let len = u32_at(12) as usize;
    let mut number = [0u8; 8];
    number.copy_from_slice(&head[16..24]);
    let number = u64::from_le_bytes(number);
    let total = (HEAD + len).div_ceil(BLOCK as usize);
    let mut bytes = head.to_vec();
    if total > 1 {
        bytes.extend(more(total - 1)?);
    }
    let Some(payload) = bytes.get(HEAD..HEAD + len) else {
        return Ok(None);
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(&number.to_le_bytes()), payload);
    if crc != u32_at(24) {
        return Ok(None);
    }
    match serde_json::from_slice::<Record>(payload) {
        Ok(r) => Ok(Some((number, r, (total as u64) * BLOCK))),
        Err(_) => Ok(None),
    }
}

/// Reads the log: where it ends, the newest record number, and the records.
fn scan(io: &mut BlockingIo, capacity: u64) -> Result<(u64, u64, Vec<Record>), MetaError> {
    let (mut end, mut last, mut records) = (0u64, 0u64, Vec::new());
    while end + BLOCK <= capacity {
        let head = io.read(end, BLOCK as usize)?;
        let at = end;
        let found = decode(&head, |blocks| {
            let len = blocks as u64 * BLOCK;
            if at + BLOCK + len > capacity {
                return Ok(Vec::new());
            }
            io.read(at + BLOCK, len as usize)
        })?;
        match found {
            Some((number, record, len)) if number > last => {
                last = number;
                records.push(record);
                end += len;
            }
            _ => break,
        }
    }
    Ok((end, last, records))
}

mod writer;

pub use writer::JournalWriter;

#[cfg(test)]
mod tests;
