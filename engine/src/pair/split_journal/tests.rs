use std::sync::Arc;
use std::time::{Duration, Instant};

use drivers::malloc::MallocBdev;
use drivers::Bdev;

use super::*;
use crate::pair::metadata::blocking_io::PAGES_PER_IO;
use crate::pair::metadata::{HeaderRecord, Metadata};
use crate::pair::{PairConfig, PairState};

fn bdev(name: &str, size: u64) -> Arc<dyn Bdev> {
    Arc::new(MallocBdev::create(name, size, 4096).unwrap())
}

/// A pair with metadata of instance `instance`, header number 1.
fn pair(name: &str, instance: u64) -> Arc<Pair> {
    let rec = HeaderRecord {
        seq: 1,
        name: name.into(),
        primary: "p".into(),
        secondary: "s".into(),
        track_size: 65536,
        tracks: 16,
        state: PairState::Pair.into(),
        reverse: false,
        split_at_ns: 0,
        error: None,
        instance,
        checkpoints: Vec::new(),
    };
    let meta = Metadata::initialize(bdev("m", 1 << 20), &rec).unwrap();
    let cfg = PairConfig {
        name: name.into(),
        track_size: 65536,
        copy_rate: 0,
    };
    Pair::with_metadata(
        &cfg,
        bdev("p", 1 << 20),
        bdev("s", 1 << 20),
        Vec::new(),
        None,
        Some(Arc::new(meta)),
    )
    .unwrap()
}

/// Writes the journal's queued records (as the control poller does) until record `number` is
/// done.
fn wait(journal: &Arc<SplitJournal>, number: u64) -> Result<(), String> {
    let t = Instant::now();
    let mut writer = JournalWriter::default();
    loop {
        writer.pump(journal, &drivers::ChannelContext::default());
        if let Some(r) = journal.status(number) {
            return r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "record {number} never done"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The record number in the block at `offset`, if a record starts there.
fn number_at(dev: &Arc<dyn Bdev>, offset: u64) -> Option<u64> {
    let mut io = BlockingIo::open(dev).unwrap();
    let head = io.read(offset, BLOCK as usize).unwrap();
    (head[..8] == MAGIC).then(|| u64::from_le_bytes(head[16..24].try_into().unwrap()))
}

#[test]
fn records_come_back_after_a_restart_for_the_pair_they_name_only() {
    let dev = bdev("j", 1 << 20);
    let (a, b) = (pair("a", 11), pair("b", 12));
    {
        let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
        let n1 = j.submit(100, vec![(a.clone(), 5), (b.clone(), 9)]).unwrap();
        wait(&j, n1).unwrap();
        let n2 = j.submit(200, vec![(a.clone(), 7)]).unwrap();
        wait(&j, n2).unwrap();
        assert_eq!((n1, n2), (1, 2));
    }
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    // The newest record naming a pair is the one that counts.
    assert_eq!(
        j.recovered_split("a", 11, 6),
        Some(RecoveredSplit {
            seq: 7,
            split_at_ns: 200
        })
    );
    // Taken once.
    assert_eq!(j.recovered_split("a", 11, 6), None);
    // Another instance of that name, or a header as new as the record: nothing.
    assert_eq!(j.recovered_split("b", 99, 1), None);
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    assert_eq!(j.recovered_split("b", 12, 9), None);
    assert_eq!(j.recovered_split("nobody", 0, 0), None);
    // Numbers go on after the ones on disk.
    let n3 = j.submit(300, vec![(b.clone(), 10)]).unwrap();
    assert_eq!(n3, 3);
    wait(&j, n3).unwrap();
}

#[test]
fn a_torn_or_damaged_record_ends_the_log() {
    let dev = bdev("j", 1 << 20);
    let a = pair("a", 1);
    {
        let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
        wait(&j, j.submit(100, vec![(a.clone(), 5)]).unwrap()).unwrap();
        wait(&j, j.submit(200, vec![(a.clone(), 6)]).unwrap()).unwrap();
    }
    assert_eq!(number_at(&dev, BLOCK), Some(2));
    // One flipped byte in the second record's payload.
    let mut io = BlockingIo::open(&dev).unwrap();
    let mut block = io.read(BLOCK, BLOCK as usize).unwrap();
    block[HEAD + 3] ^= 0x20;
    io.write(BLOCK, &[block.as_slice()]).unwrap();
    drop(io);
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    assert_eq!(
        j.recovered_split("a", 1, 1),
        Some(RecoveredSplit {
            seq: 5,
            split_at_ns: 100
        })
    );
    // Nothing read is left to load, nothing written since: the log starts over, numbered on
    // from the last whole record.
    let n = j.submit(300, vec![(a.clone(), 8)]).unwrap();
    wait(&j, n).unwrap();
    assert_eq!((n, number_at(&dev, 0)), (2, Some(2)));
    drop(j);
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    assert_eq!(j.recovered_split("a", 1, 1).map(|s| s.seq), Some(8));
}

#[test]
fn the_log_starts_over_once_every_pair_has_its_own_header() {
    let dev = bdev("j", 1 << 20);
    let (a, b) = (pair("a", 1), pair("b", 2));
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    wait(
        &j,
        j.submit(100, vec![(a.clone(), 2), (b.clone(), 2)]).unwrap(),
    )
    .unwrap();
    // b's header caught up, a's not: the record stays, the next one follows it.
    let caught_up = |p: &Arc<Pair>, seq: u64| {
        let m = p.metadata().unwrap();
        m.adopt_header(&p.header_record(seq)).unwrap();
    };
    caught_up(&b, 2);
    wait(
        &j,
        j.submit(200, vec![(a.clone(), 3), (b.clone(), 3)]).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (number_at(&dev, 0), number_at(&dev, BLOCK)),
        (Some(1), Some(2))
    );
    caught_up(&a, 3);
    caught_up(&b, 3);
    wait(&j, j.submit(300, vec![(a.clone(), 4)]).unwrap()).unwrap();
    assert_eq!(
        (number_at(&dev, 0), number_at(&dev, BLOCK)),
        (Some(3), Some(2))
    );
    drop(j);
    // The stale record after the new one is not read: numbered lower.
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    assert_eq!(j.recovered_split("b", 2, 1), None);
    assert_eq!(j.recovered_split("a", 1, 3).map(|s| s.seq), Some(4));
}

#[test]
fn a_record_of_thousands_of_pairs_spans_many_blocks_and_reads_back() {
    let dev = bdev("j", 4 << 20);
    let record = Record {
        split_at_ns: 5,
        pairs: (0..10_000)
            .map(|i| RecordPair {
                name: format!("volume-{i:05}"),
                instance: i,
                seq: i + 2,
            })
            .collect(),
    };
    let bytes = encode(7, &record).unwrap();
    // More than one request's worth, written and read back.
    assert!(bytes.len() > PAGES_PER_IO * BLOCK as usize);
    let mut io = BlockingIo::open(&dev).unwrap();
    let blocks: Vec<&[u8]> = bytes.chunks(BLOCK as usize).collect();
    io.write(0, &blocks).unwrap();
    let (end, last, records) = scan(&mut io, 4 << 20).unwrap();
    assert_eq!((end, last), (bytes.len() as u64, 7));
    assert_eq!(records, vec![record]);
}

#[test]
fn a_record_of_thousands_of_pairs_goes_through_the_writer_in_several_requests() {
    // Pairs in memory only, all on the same two devices: the record is what matters.
    let (p_dev, s_dev) = (bdev("p", 4096), bdev("s", 4096));
    let cfg = |name: String| PairConfig {
        name,
        track_size: 4096,
        copy_rate: 0,
    };
    let pairs: Vec<(Arc<Pair>, u64)> = (0..6000u64)
        .map(|i| {
            let p = Pair::with_metadata(
                &cfg(format!("volume-{i:05}")),
                Arc::clone(&p_dev),
                Arc::clone(&s_dev),
                Vec::new(),
                None,
                None,
            )
            .unwrap();
            (p, i + 2)
        })
        .collect();
    let dev = bdev("j", 4 << 20);
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    let n = j.submit(42, pairs).unwrap();
    wait(&j, n).unwrap();
    drop(j);
    let mut io = BlockingIo::open(&dev).unwrap();
    let (end, last, records) = scan(&mut io, 4 << 20).unwrap();
    assert!(
        end > (PAGES_PER_IO * BLOCK as usize) as u64,
        "more than one request: {end}"
    );
    assert_eq!((last, records.len()), (n, 1));
    assert_eq!(records[0].pairs.len(), 6000);
    assert_eq!(records[0].pairs[5999].name, "volume-05999");
}

#[test]
fn a_record_that_fails_to_write_leaves_its_place_to_the_next() {
    use drivers::testing::fault::{FaultBdev, FaultConfig};
    use std::sync::atomic::Ordering;
    let inner = bdev("j", 1 << 20);
    let config = Arc::new(FaultConfig::default());
    let dev: Arc<dyn Bdev> = Arc::new(FaultBdev::new(
        "jf",
        Arc::clone(&inner),
        Arc::clone(&config),
    ));
    let a = pair("a", 1);
    let j = SplitJournal::open(Arc::clone(&dev)).unwrap();
    wait(&j, j.submit(100, vec![(a.clone(), 5)]).unwrap()).unwrap();
    config.fail_writes.store(true, Ordering::SeqCst);
    let failed = j.submit(200, vec![(a.clone(), 6)]).unwrap();
    assert!(
        wait(&j, failed).is_err(),
        "the failed record reports its error"
    );
    config.fail_writes.store(false, Ordering::SeqCst);
    let n = j.submit(300, vec![(a.clone(), 7)]).unwrap();
    wait(&j, n).unwrap();
    // Written where the failed record would have been, right after the first.
    assert_eq!(number_at(&inner, BLOCK), Some(n));
    drop(j);
    let j = SplitJournal::open(inner).unwrap();
    assert_eq!(j.recovered_split("a", 1, 1).map(|s| s.seq), Some(7));
}
