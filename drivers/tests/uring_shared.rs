//! The uring bdevs of one thread share one io_uring ring: each file is in the ring's fixed-file
//! table once, completions reach the channel that submitted them, a channel closing with
//! requests in flight leaves the others' completions alone, DMA regions made after the ring are
//! registered as fixed buffers, and a dropped bdev's file is unlocked at once. Files are held
//! without descriptors (in a holding ring) or, with holding off, one descriptor each. One test
//! function: it counts the process's descriptors.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use drivers::bdev::{Bdev, ChannelContext, IoBufs, IoChannel, IoCompletion, IoRequest};
use drivers::file_lock::check_unlocked;
use drivers::uring::UringBdev;
use hugepages::BufferPool;

const BS: u64 = 4096;
const BDEVS: usize = 150;
const BLOCKS: u64 = 16;

fn descriptors() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

fn rings() -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|p| p.display().to_string().contains("io_uring"))
                .unwrap_or(false)
        })
        .map(|e| {
            PathBuf::from(format!(
                "/proc/self/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
        })
        .collect()
}

/// The lines under `section` ("UserFiles" or "UserBufs") of a ring's fdinfo.
fn fdinfo_section(fdinfo: &Path, section: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fdinfo).expect("fdinfo");
    let mut lines = text.lines().skip_while(|l| !l.starts_with(section));
    let Some(_) = lines.next() else {
        panic!("no {section} in {}: {text}", fdinfo.display())
    };
    lines
        .take_while(|l| l.starts_with(char::is_whitespace))
        .map(|l| l.trim().to_string())
        .collect()
}

fn pattern(bdev: usize, block: u64) -> u8 {
    (bdev as u64 * 31 + block * 7 + 1) as u8
}

fn one_buf(pool: &BufferPool, fill: u8) -> IoBufs {
    let mut b = pool.get().expect("buffer");
    b.set_len(BS as usize).expect("len");
    b.as_mut_slice().fill(fill);
    let mut v = IoBufs::new();
    v.push(b);
    v
}

/// Polls every channel until none has anything in flight; completions by channel index.
fn drain(channels: &mut [Box<dyn IoChannel>]) -> HashMap<usize, Vec<IoCompletion>> {
    let mut done: HashMap<usize, Vec<IoCompletion>> = HashMap::new();
    while channels.iter().any(|c| c.in_flight() > 0) {
        for (i, c) in channels.iter_mut().enumerate() {
            let mut out = Vec::new();
            c.poll(&mut out);
            done.entry(i).or_default().extend(out);
        }
    }
    done
}

#[test]
fn uring_bdevs_of_a_thread_share_one_ring() {
    // Descriptors first: the holding ring, once made, stays for the process.
    drivers::uring::set_file_holding(false);
    shared_ring_scenario(false);
    drivers::uring::set_file_holding(true);
    // Where the kernel cannot hold files (before Linux 6.8), bdevs keep their descriptors.
    shared_ring_scenario(drivers::uring::file_holding_supported());
    blocking_ring_is_kept_between_uses();
}

/// A thread's ring for channels without a wake-up eventfd (blocking I/O from a control thread)
/// outlives its channels and serves the next ones.
fn blocking_ring_is_kept_between_uses() {
    let path = std::env::temp_dir().join(format!("qs-uring-blocking-{}.img", std::process::id()));
    let bdev = UringBdev::open("blocking", &path, BS as u32, Some(BLOCKS * BS)).expect("open");
    let rings_before = rings().len();
    let ctx = ChannelContext::default();
    let pool = BufferPool::new(BS as usize, 4).expect("pool");
    for round in 0..3u8 {
        let mut ch = bdev.open_channel(&ctx).expect("channel");
        ch.submit(IoRequest::write(0, one_buf(&pool, round), 0))
            .expect("submit");
        let mut out = Vec::new();
        while ch.in_flight() > 0 {
            ch.poll(&mut out);
        }
        out[0].result.as_ref().expect("write");
        drop(ch);
        assert_eq!(
            rings().len(),
            rings_before + 1,
            "round {round}: one ring, kept after its channel closed"
        );
    }
    drop(bdev);
    let _ = std::fs::remove_file(path);
}

fn shared_ring_scenario(held: bool) {
    let dir = std::env::temp_dir().join(format!("qs-uring-shared-{}-{held}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // Channels woken through an eventfd, as a reactor's are.
    let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd");
    let fds_before = descriptors().len();
    let rings_before = rings().len();

    let paths: Vec<PathBuf> = (0..BDEVS).map(|i| dir.join(format!("f{i}.img"))).collect();
    let bdevs: Vec<UringBdev> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            UringBdev::open(&format!("u{i}"), p, BS as u32, Some(BLOCKS * BS)).expect("open")
        })
        .collect();
    let ctx = ChannelContext {
        queue_depth: 32,
        wake_fd: Some(wake.as_raw_fd()),
        ..ChannelContext::default()
    };
    // Two channels per bdev: they share the bdev's slot in the ring.
    let mut channels: Vec<Box<dyn IoChannel>> = bdevs
        .iter()
        .flat_map(|b| {
            [
                b.open_channel(&ctx).expect("ch"),
                b.open_channel(&ctx).expect("ch"),
            ]
        })
        .collect();
    let fds = descriptors();
    let dir_name = dir.display().to_string();
    if held {
        // The thread's ring and one holding ring; no file has a descriptor.
        assert_eq!(fds.len() - fds_before, 2, "two rings: {fds:?}");
        assert!(
            !fds.iter().any(|f| f.contains(&dir_name)),
            "a held file has a descriptor: {fds:?}"
        );
    } else {
        assert_eq!(
            fds.len() - fds_before,
            BDEVS + 1,
            "one descriptor per file and one ring: {fds:?}"
        );
    }
    let ring_info = rings();
    assert_eq!(
        ring_info.len(),
        rings_before + 1 + usize::from(held),
        "one ring for the thread (and one holding ring)"
    );
    let tables: Vec<(PathBuf, Vec<String>)> = ring_info
        .iter()
        .map(|r| (r.clone(), fdinfo_section(r, "UserFiles")))
        .filter(|(_, files)| files.iter().any(|l| l.contains(&dir_name)))
        .collect();
    assert_eq!(
        tables.len(),
        1 + usize::from(held),
        "the files are in the thread's ring (and the holding ring)"
    );
    for (_, files) in &tables {
        for p in &paths {
            let name = p.display().to_string();
            assert_eq!(
                files.iter().filter(|l| l.ends_with(&name)).count(),
                1,
                "{name} in a fixed-file table once: {files:?}"
            );
        }
    }
    // The thread's ring is the one with a long submission queue (a holding ring's is short).
    let ring = tables
        .iter()
        .map(|(r, _)| r.clone())
        .find(|r| {
            std::fs::read_to_string(r)
                .expect("fdinfo")
                .lines()
                .any(|l| l.starts_with("SqMask:") && l.trim_end().ends_with("0x3ff"))
        })
        .expect("the thread's ring");

    // A pool made now: its region is registered as a fixed buffer on first use.
    let pool =
        BufferPool::new(BS as usize, (BDEVS * 2 * BLOCKS as usize / 2).max(64)).expect("pool");
    let region_addr = {
        let b = pool.get().expect("buf");
        b.as_slice().as_ptr() as usize
    };
    // Every channel writes its half of its bdev's blocks, all submitted before any poll.
    for (i, c) in channels.iter_mut().enumerate() {
        let (bdev, half) = (i / 2, (i % 2) as u64);
        for k in 0..BLOCKS / 2 {
            let block = half * (BLOCKS / 2) + k;
            let tag = (i as u64) << 32 | block;
            c.submit(IoRequest::write(
                block * BS,
                one_buf(&pool, pattern(bdev, block)),
                tag,
            ))
            .expect("submit write");
        }
    }
    let done = drain(&mut channels);
    for (i, completions) in &done {
        assert_eq!(completions.len() as u64, BLOCKS / 2, "channel {i}'s writes");
        for c in completions {
            assert_eq!(
                c.tag >> 32,
                *i as u64,
                "a completion reached another channel"
            );
            c.result.as_ref().expect("write");
        }
    }
    drop(done);
    let bufs = fdinfo_section(&ring, "UserBufs");
    assert!(
        bufs.iter().any(|l| l.contains(&format!(
            "{:#x}",
            region_addr & !(hugepages::HUGEPAGE_SIZE - 1)
        )) || l.contains(&format!("{region_addr:#x}"))),
        "the pool made after the ring is a fixed buffer: {bufs:?} (pool at {region_addr:#x})"
    );

    // Channel 0 closes with writes in flight while channel 1 (same bdev) has completions
    // waiting; channel 1 still gets all of its own.
    for block in 0..4 {
        channels[0]
            .submit(IoRequest::write(
                block * BS,
                one_buf(&pool, pattern(0, block)),
                block,
            ))
            .expect("submit");
        channels[1]
            .submit(IoRequest::read(block * BS, one_buf(&pool, 0), 100 + block))
            .expect("submit");
    }
    let first = channels.remove(0);
    drop(first);
    let mut got = Vec::new();
    while channels[0].in_flight() > 0 {
        channels[0].poll(&mut got);
    }
    let mut tags: Vec<u64> = got.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, vec![100, 101, 102, 103]);
    drop(got);
    drop(channels);

    // Read every block back through the other channel of its bdev than wrote it.
    let mut channels: Vec<Box<dyn IoChannel>> = bdevs
        .iter()
        .map(|b| b.open_channel(&ctx).expect("ch"))
        .collect();
    for c in channels.iter_mut() {
        for block in 0..BLOCKS {
            c.submit(IoRequest::read(block * BS, one_buf(&pool, 0), block))
                .expect("submit read");
        }
    }
    let done = drain(&mut channels);
    for (bdev, completions) in &done {
        assert_eq!(completions.len() as u64, BLOCKS);
        for c in completions {
            c.result.as_ref().expect("read");
            let want = pattern(*bdev, c.tag);
            assert!(
                c.bufs[0].as_slice().iter().all(|&b| b == want),
                "bdev {bdev} block {} holds other data",
                c.tag
            );
        }
    }
    drop(done);
    // And through the file system, bypassing the ring.
    for (bdev, p) in paths.iter().enumerate() {
        let data = std::fs::read(p).expect("read file");
        for block in 0..BLOCKS {
            let want = pattern(bdev, block);
            assert!(data[(block * BS) as usize..((block + 1) * BS) as usize]
                .iter()
                .all(|&b| b == want));
        }
    }

    // Each file is locked while its bdev lives, and free as soon as it is gone.
    assert!(
        check_unlocked(&paths[3]).is_err(),
        "a served file is locked"
    );
    drop(channels);
    drop(bdevs);
    for p in &paths {
        check_unlocked(p).expect("unlocked when the bdev is dropped");
    }
    assert_eq!(
        rings().len(),
        rings_before + usize::from(held),
        "the ring goes with its last channel (the holding ring stays)"
    );
    for r in rings() {
        let files = fdinfo_section(&r, "UserFiles");
        assert!(
            !files.iter().any(|l| l.contains(&dir_name)),
            "a dropped bdev's file is still held: {files:?}"
        );
    }
    assert_eq!(descriptors().len(), fds_before + usize::from(held));
    let _ = std::fs::remove_dir_all(dir);
}
