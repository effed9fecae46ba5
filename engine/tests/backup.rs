//! Backups in each mode to each local target, started right after a split with at least half the
//! tracks pending while writers keep writing P and S: the backup equals P at the split point and
//! its digest matches (the `sha256-tree` root and its chunk digests, kept in the state directory;
//! the flat SHA-256 when asked for). Faults end a backup `failed` or `cancelled`, with no digest
//! kept, while the pair keeps serving.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{read, run, wait_until, Op};
use drivers::testing::fault::{FaultBdev, FaultConfig};
use drivers::Bdev;
use engine::app::Engine;
use engine::backup::{BackupInfo, BackupState, Mode, Options, Target};
use engine::pair::channel::View;
use engine::pair::{PairConfig, PairState};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const TRACK: u64 = 64 << 10;
const SIZE: u64 = 8 * MIB;

struct Fixture {
    engine: Arc<Engine>,
    faults_s: Arc<FaultConfig>,
    expected: Vec<u8>,
}

/// A pair of delayed RAM disks, split with more than half its tracks pending; returns the image
/// the backup must reproduce (P at the split).
fn split_pair(tag: &str, seed: u64) -> Fixture {
    let engine = common::engine(tag);
    let faults_p = Arc::new(FaultConfig::default());
    let faults_s = Arc::new(FaultConfig::default());
    faults_p.max_delay_polls.store(3, Ordering::Relaxed);
    faults_s.max_delay_polls.store(3, Ordering::Relaxed);
    for (n, f) in [("p", &faults_p), ("s", &faults_s)] {
        let ram =
            Arc::new(drivers::malloc::MallocBdev::create(&format!("{n}-ram"), SIZE, 4096).unwrap());
        engine
            .bdev_add(Arc::new(FaultBdev::new(n, ram, Arc::clone(f))))
            .unwrap();
    }
    let pair = engine
        .pair_create(
            &PairConfig {
                name: "pr".into(),
                track_size: TRACK,
                copy_rate: 0,
            },
            "p",
            "s",
        )
        .unwrap();
    let pv = engine.pair_view("pr", View::Primary).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut writes = Vec::new();
    // Writes in one batch run concurrently: give each its own 32 KiB slot so the model's
    // order does not matter.
    let mut slots: Vec<u64> = (0..SIZE / 32768).collect();
    for _ in 0..64 {
        let slot = slots.swap_remove(rng.gen_range(0..slots.len()));
        let off = slot * 32768 + rng.gen_range(0..4u64) * 4096;
        let len = rng.gen_range(1..=4u64) * 4096;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        writes.push(Op::Write(off, data));
    }
    assert!(run(&engine, 0, Arc::clone(&pv), writes)
        .iter()
        .all(Result::is_ok));
    wait_until("PAIR", || pair.state() == PairState::Pair);
    // Slow the copy down, then dirty most tracks: they stay pending across the split.
    pair.set_copy_rate(TRACK);
    let mut writes = Vec::new();
    for t in 0..SIZE / TRACK {
        if t % 8 == 7 {
            continue;
        }
        let off = t * TRACK + rng.gen_range(0..TRACK / 4096) * 4096;
        let data: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        writes.push(Op::Write(off, data));
    }
    assert!(run(&engine, 1, Arc::clone(&pv), writes)
        .iter()
        .all(Result::is_ok));
    let out = engine.pair_split(&["pr".to_string()]).unwrap();
    assert!(
        out.pending_tracks[0] * 2 >= SIZE / TRACK,
        "only {} of {} tracks pending at the split",
        out.pending_tracks[0],
        SIZE / TRACK
    );
    Fixture {
        engine,
        faults_s,
        expected: model,
    }
}

/// Writes random data to P and to the image until stopped.
fn writers(
    engine: &Arc<Engine>,
    stop: &Arc<AtomicBool>,
    seed: u64,
) -> Vec<std::thread::JoinHandle<()>> {
    [View::Primary, View::Image]
        .into_iter()
        .enumerate()
        .map(|(i, view)| {
            let (engine, stop) = (Arc::clone(engine), Arc::clone(stop));
            std::thread::spawn(move || {
                let bdev = engine.pair_view("pr", view).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + i as u64);
                while !stop.load(Ordering::SeqCst) {
                    let ops: Vec<Op> = (0..8)
                        .map(|_| {
                            let off = rng.gen_range(0..SIZE / 4096) * 4096;
                            Op::Write(off, vec![rng.gen(); 4096])
                        })
                        .collect();
                    for r in run(&engine, i % 2, Arc::clone(&bdev), ops) {
                        r.expect("host write during the backup");
                    }
                }
            })
        })
        .collect()
}

fn wait_backup(engine: &Engine, id: u64) -> BackupInfo {
    let mut info = engine.backup_get(Some(id)).unwrap().remove(0);
    let end = std::time::Instant::now() + Duration::from_secs(120);
    while info.state == BackupState::Running {
        assert!(
            std::time::Instant::now() < end,
            "backup did not end: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
        info = engine.backup_get(Some(id)).unwrap().remove(0);
    }
    info
}

/// The `sha256-tree` digest of `data`, as `backup_get` reports it: spelled out with sha2.
fn tree(data: &[u8]) -> String {
    let mut digests = Vec::new();
    for chunk in data.chunks(MIB as usize) {
        digests.extend_from_slice(&Sha256::digest(chunk));
    }
    format!("sha256-tree:{}", sha(&digests))
}

/// Checks the chunk digests the engine kept for done backup `id` against the image.
fn check_chunk_digests(engine: &Engine, id: u64, image: &[u8]) {
    let kept = engine.backup_chunk_digests(id).unwrap();
    assert_eq!(kept.image_size, image.len() as u64);
    assert_eq!(kept.chunk_size, MIB);
    assert_eq!(kept.digests.len(), image.len().div_ceil(MIB as usize));
    for (i, chunk) in image.chunks(MIB as usize).enumerate() {
        assert_eq!(kept.digests[i][..], Sha256::digest(chunk)[..], "chunk {i}");
    }
    assert_eq!(kept.root().to_string(), tree(image));
    assert!(engine::backup::digests_path(engine.state_dir(), id).exists());
}

/// A backup that did not complete has no digest and no chunk digests.
fn check_no_digests(engine: &Engine, info: &BackupInfo) {
    assert_eq!(info.digest, None);
    assert_eq!(info.sha256, None);
    assert!(engine.backup_chunk_digests(info.id).is_err());
    let path = engine::backup::digests_path(engine.state_dir(), info.id);
    assert!(!path.exists(), "{} was left", path.display());
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn backup_equals_the_split_image(mode: Mode, tape: bool, seed: u64) {
    let tag = format!(
        "backup-{}-{}",
        mode.as_str(),
        if tape { "tape" } else { "file" }
    );
    let f = split_pair(&tag, seed);
    let dir = f.engine.state_dir().to_path_buf();
    let path = dir.join(if tape { "backup.tar" } else { "backup.img" });
    let target = if tape {
        Target::Tape {
            path: path.clone(),
            record_size: drivers::tape::DEFAULT_RECORD_SIZE,
        }
    } else {
        Target::File { path: path.clone() }
    };
    // The tape also carries the flat SHA-256.
    let opts = Options {
        flat_sha256: tape,
        ..Options::default()
    };
    let id = f
        .engine
        .backup_start_with("pr", mode, target, opts)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = writers(&f.engine, &stop, seed * 10);
    let info = wait_backup(&f.engine, id);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(info.state, BackupState::Done, "{info:?}");
    assert_eq!(info.bytes_done, SIZE);
    assert_eq!(info.bytes_total, SIZE);
    let want = sha(&f.expected);
    if !tape {
        let got = std::fs::read(&path).unwrap();
        if let Some(i) = (0..got.len()).find(|&i| got[i] != f.expected[i]) {
            panic!(
                "{mode:?} file backup differs from P at the split from byte {i} (track {}); sha of the file {}",
                i as u64 / TRACK,
                sha(&got)
            );
        }
    }
    assert_eq!(info.digest, Some(tree(&f.expected)), "{mode:?}");
    assert_eq!(info.flat_sha256, tape);
    if tape {
        assert_eq!(info.sha256.as_deref(), Some(want.as_str()), "{mode:?}");
    } else {
        assert_eq!(
            info.sha256, None,
            "{mode:?}: a flat SHA-256 nobody asked for"
        );
    }
    check_chunk_digests(&f.engine, id, &f.expected);
    let got = if tape {
        let mut out = Vec::new();
        let report = drivers::tape::restore(
            std::fs::File::open(&path).unwrap(),
            &mut out,
            drivers::tape::DEFAULT_RECORD_SIZE,
        )
        .unwrap();
        assert_eq!(report.sha256, Some(want));
        assert_eq!(report.digest, info.digest);
        assert_eq!(report.manifest.mode, mode.as_str());
        assert_eq!(report.manifest.pair, "pr");
        out
    } else {
        std::fs::read(&path).unwrap()
    };
    assert!(
        got == f.expected,
        "{mode:?} backup differs from P at the split"
    );
    if mode == Mode::Merge {
        assert_eq!(
            info.cpu_copied_bytes, 0,
            "merge copied payload with the CPU"
        );
    }
    let pair = f.engine.pair("pr").unwrap();
    assert_eq!(pair.state(), PairState::Psus);
    assert!(!pair.backup_running());
}

#[test]
fn merge_to_file_and_tape() {
    backup_equals_the_split_image(Mode::Merge, false, 1);
    backup_equals_the_split_image(Mode::Merge, true, 2);
}

#[test]
fn reflect_to_file_and_tape() {
    backup_equals_the_split_image(Mode::Reflect, false, 3);
    backup_equals_the_split_image(Mode::Reflect, true, 4);
}

#[test]
fn wait_to_file_and_tape() {
    backup_equals_the_split_image(Mode::Wait, false, 5);
    backup_equals_the_split_image(Mode::Wait, true, 6);
}

#[test]
fn a_source_read_error_fails_the_backup_and_the_pair_keeps_serving() {
    let f = split_pair("backup-src-error", 7);
    let path = f.engine.state_dir().join("b.img");
    f.faults_s.fail_reads.store(true, Ordering::SeqCst);
    let id = f
        .engine
        .backup_start("pr", Mode::Reflect, Target::File { path: path.clone() }, 0)
        .unwrap();
    let info = wait_backup(&f.engine, id);
    assert_eq!(info.state, BackupState::Failed);
    assert!(
        info.error.as_deref().unwrap_or("").contains("I/O error"),
        "{info:?}"
    );
    check_no_digests(&f.engine, &info);
    assert!(
        !path.exists(),
        "a failed file backup leaves no image behind"
    );
    // Hosts keep writing and reading P.
    let pv = f.engine.pair_view("pr", View::Primary).unwrap();
    assert!(run(
        &f.engine,
        0,
        Arc::clone(&pv),
        vec![Op::Write(0, vec![5; 4096])]
    )[0]
    .is_ok());
    assert_eq!(read(&f.engine, &pv, 0, 4096), vec![5; 4096]);
}

#[test]
fn a_cancel_ends_cancelled_and_leaves_nothing_complete() {
    let f = split_pair("backup-cancel", 8);
    let path = f.engine.state_dir().join("c.tar");
    // At 1 MiB/s the 8 MiB backup is still running when the cancel comes.
    let id = f
        .engine
        .backup_start(
            "pr",
            Mode::Merge,
            Target::Tape {
                path: path.clone(),
                record_size: 262_144,
            },
            MIB,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    f.engine.backup_cancel(id).unwrap();
    let info = wait_backup(&f.engine, id);
    assert_eq!(info.state, BackupState::Cancelled);
    check_no_digests(&f.engine, &info);
    assert!(info.bytes_done < SIZE);
    // Nothing under the archive's name, and its partial file is gone.
    assert!(!path.exists(), "a cancelled tape backup left an archive");
    assert!(!f.engine.state_dir().join("c.tar.partial").exists());
    // A second backup can start; a cancel of a finished backup is refused.
    assert!(f.engine.backup_cancel(id).is_err());
    let id2 = f
        .engine
        .backup_start(
            "pr",
            Mode::Merge,
            Target::File {
                path: f.engine.state_dir().join("d.img"),
            },
            0,
        )
        .unwrap();
    assert_eq!(wait_backup(&f.engine, id2).state, BackupState::Done);
}

#[test]
fn backups_need_a_split_pair_and_block_resync_while_running() {
    let f = split_pair("backup-rules", 9);
    let id = f
        .engine
        .backup_start(
            "pr",
            Mode::Merge,
            Target::File {
                path: f.engine.state_dir().join("e.img"),
            },
            // Slow enough to be running through the checks below.
            MIB,
        )
        .unwrap();
    assert!(
        f.engine.pair_resync("pr", false).is_err(),
        "resync during a backup"
    );
    assert!(
        f.engine.pair_delete("pr").is_err(),
        "delete during a backup"
    );
    assert!(
        f.engine
            .backup_start(
                "pr",
                Mode::Merge,
                Target::File {
                    path: f.engine.state_dir().join("f.img")
                },
                0
            )
            .is_err(),
        "two backups of one pair at once"
    );
    f.engine.backup_cancel(id).unwrap();
    assert_eq!(wait_backup(&f.engine, id).state, BackupState::Cancelled);
    f.engine.pair_resync("pr", false).unwrap();
    assert!(
        f.engine
            .backup_start(
                "pr",
                Mode::Merge,
                Target::File {
                    path: f.engine.state_dir().join("g.img")
                },
                0
            )
            .is_err(),
        "a backup of a pair that is not split"
    );
    let _ = read(
        &f.engine,
        &(Arc::clone(f.engine.pair("pr").unwrap().primary()) as Arc<dyn Bdev>),
        0,
        4096,
    );
}

#[test]
fn a_rate_limited_backup_takes_at_least_size_over_rate() {
    let f = split_pair("backup-rate", 10);
    let rate = 32 * MIB;
    let id = f
        .engine
        .backup_start(
            "pr",
            Mode::Merge,
            Target::File {
                path: f.engine.state_dir().join("r.img"),
            },
            rate,
        )
        .unwrap();
    let info = wait_backup(&f.engine, id);
    assert_eq!(info.state, BackupState::Done);
    assert_eq!(info.rate, rate);
    assert_eq!(info.digest, Some(tree(&f.expected)));
    // The limiter starts empty: every byte waits for its share of the rate.
    let floor = SIZE * 1_000_000_000 / rate;
    assert!(
        info.elapsed_ns >= floor,
        "{} bytes at {rate} B/s took {} ns, under {floor}",
        SIZE,
        info.elapsed_ns
    );
}

/// A backup to a pipe, read by GNU tar as it is written: the tape-device path (records in order,
/// exact size), with a record size that splits the pieces and with the default one.
fn backup_to_a_pipe_read_by_tar(record_size: usize, seed: u64) {
    let f = split_pair(&format!("backup-pipe-{record_size}"), seed);
    let dir = f.engine.state_dir().to_path_buf();
    let fifo = dir.join("tape.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let out = dir.join("x");
    std::fs::create_dir_all(&out).unwrap();
    let blocks = (record_size / 512).to_string();
    let mut tar = std::process::Command::new("tar")
        .args(["-x", "-b", &blocks, "-f"])
        .arg(&fifo)
        .arg("-C")
        .arg(&out)
        .spawn()
        .expect("GNU tar");
    let id = f
        .engine
        .backup_start(
            "pr",
            Mode::Merge,
            Target::Tape {
                path: fifo.clone(),
                record_size,
            },
            0,
        )
        .unwrap();
    let info = wait_backup(&f.engine, id);
    assert_eq!(info.state, BackupState::Done, "{info:?}");
    assert!(tar.wait().unwrap().success(), "tar failed to read the pipe");
    let want = tree(&f.expected);
    assert_eq!(info.digest.as_deref(), Some(want.as_str()));
    assert!(std::fs::read(out.join("volume.img")).unwrap() == f.expected);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["digest"], want.as_str());
    assert_eq!(manifest["format"], "quicksplit-backup-2");
    assert!(manifest.get("sha256").is_none(), "{manifest}");
    if (MIB as usize).is_multiple_of(record_size) {
        assert_eq!(info.cpu_copied_bytes, 0, "pieces fill whole records");
    } else {
        assert!(
            info.cpu_copied_bytes > 0,
            "leftovers of records are copied and counted"
        );
    }
}

#[test]
fn a_backup_to_a_pipe_is_a_tar_stream_in_exact_records() {
    backup_to_a_pipe_read_by_tar(262_144, 11);
    backup_to_a_pipe_read_by_tar(10_240, 12);
}

/// While hosts use the pair, a backup keeps only a couple of pieces in flight and says how often
/// it held back for them; with no host I/O it never holds back. Both are exact.
#[test]
fn a_backup_yields_to_host_io_and_not_when_alone() {
    let f = split_pair("backup-yield", 11);
    let dir = f.engine.state_dir().to_path_buf();
    let want = tree(&f.expected);
    // Requests made before a backup starts do not count.
    let alone = f
        .engine
        .backup_start(
            "pr",
            Mode::Merge,
            Target::File {
                path: dir.join("alone.img"),
            },
            0,
        )
        .unwrap();
    let info = wait_backup(&f.engine, alone);
    assert_eq!(info.state, BackupState::Done, "{info:?}");
    assert_eq!(info.digest.as_deref(), Some(want.as_str()));
    assert_eq!(
        info.host_yields, 0,
        "no host wrote, yet the backup held back"
    );

    let pair = f.engine.pair("pr").unwrap();
    let before = pair.stats.host_requests.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    // Hosts read P all along (writes could wait for the backup, and writes to the image would
    // change it between the two backups).
    let threads = readers(&f.engine, &stop);
    wait_until("host reads", || {
        pair.stats.host_requests.load(Ordering::Relaxed) > before
    });
    let busy = f
        .engine
        .backup_start(
            "pr",
            Mode::Merge,
            Target::File {
                path: dir.join("busy.img"),
            },
            0,
        )
        .unwrap();
    let info = wait_backup(&f.engine, busy);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(info.state, BackupState::Done, "{info:?}");
    assert_eq!(info.digest.as_deref(), Some(want.as_str()));
    assert_eq!(std::fs::read(dir.join("busy.img")).unwrap(), f.expected);
    assert!(
        info.host_yields > 0,
        "hosts read during the whole backup, which never held back: {info:?}"
    );
    assert_eq!(info.host_rate, engine::backup::DEFAULT_HOST_RATE);
}

/// Reads P from two threads until stopped.
fn readers(engine: &Arc<Engine>, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..2)
        .map(|i| {
            let (engine, stop) = (Arc::clone(engine), Arc::clone(stop));
            std::thread::spawn(move || {
                let bdev = engine.pair_view("pr", View::Primary).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(110 + i);
                while !stop.load(Ordering::SeqCst) {
                    let ops: Vec<Op> = (0..64)
                        .map(|_| Op::Read(rng.gen_range(0..SIZE / 4096) * 4096, 4096))
                        .collect();
                    for r in run(&engine, i as usize, Arc::clone(&bdev), ops) {
                        r.expect("host read during the backup");
                    }
                }
            })
        })
        .collect()
}
