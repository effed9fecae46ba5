//! The screen model: figures from two snapshots (deltas, rates, ETA), the RPC replies it
//! reads, and fitting to an 80x24 terminal.

use std::time::Duration;

use serde_json::json;

use super::fit::{self, allot, table_lines, Column};
use super::model::{self, Frame, Kind, Line};
use super::snapshot::{
    BdevSample, ExportSample, IoCounters, JobKind, JobSample, PairSample, Protocol, ReactorSample,
    Replies, Snapshot, TickClock,
};

const MIB: u64 = 1 << 20;

fn frame() -> Frame<'static> {
    Frame {
        socket: "/var/tmp/quicksplit.sock",
        interval: Duration::from_secs(1),
        error: None,
    }
}

fn at(secs: f64) -> Snapshot {
    Snapshot {
        at: Duration::from_secs_f64(secs),
        ..Snapshot::default()
    }
}

fn bdev(name: &str, io: Option<IoCounters>) -> BdevSample {
    BdevSample {
        name: name.into(),
        driver: "malloc".into(),
        io,
        p99_us: None,
    }
}

fn io(reads: u64, writes: u64) -> IoCounters {
    IoCounters {
        num_read_ops: reads,
        num_write_ops: writes,
        bytes_read: reads * 4096,
        bytes_written: writes * 4096,
    }
}

fn job(kind: JobKind, id: u64, state: &str, done: u64, total: u64, secs: u64) -> JobSample {
    JobSample {
        kind,
        id,
        pair: "pair0".into(),
        state: state.into(),
        done,
        total,
        elapsed_ns: secs * 1_000_000_000,
    }
}

fn texts(lines: &[Line]) -> Vec<&str> {
    lines.iter().map(|l| l.text.as_str()).collect()
}

/// The row of a panel whose first cell is `name`, split into cells.
fn row<'a>(lines: &'a [Line], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .find(|l| l.kind == Kind::Row && l.text.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in {:#?}", texts(lines)))
        .text
        .split_whitespace()
        .collect()
}

fn fits(lines: &[Line], width: usize, height: usize) {
    assert!(
        lines.len() <= height,
        "{} lines: {:#?}",
        lines.len(),
        texts(lines)
    );
    for l in lines {
        assert!(fit::width(&l.text) <= width, "too wide: {:?}", l.text);
    }
}

#[test]
fn reactor_busy_is_the_share_of_the_interval_and_absent_on_the_first_screen() {
    let r = |busy_ns, idle_ns| ReactorSample {
        core: 3,
        busy_ns,
        idle_ns,
    };
    let mut prev = at(1.0);
    prev.reactors = vec![r(1_000, 9_000)];
    let mut cur = at(2.0);
    cur.reactors = vec![r(1_000 + 250, 9_000 + 750)];
    assert_eq!(
        model::reactor_busy(Some(&prev), &cur.reactors[0]),
        Some(25.0)
    );
    assert_eq!(model::reactor_busy(None, &cur.reactors[0]), None);
    let lines = model::screen(Some(&prev), &cur, &frame(), 80, 24);
    assert!(lines[1].text.starts_with("Reactors"), "{:?}", lines[1]);
    assert_eq!(lines[1].text, "Reactors    3: 25.0%");
    let first = model::screen(None, &cur, &frame(), 80, 24);
    assert!(first[1].text.ends_with('-'), "{:?}", first[1]);
}

#[test]
fn bdev_rates_come_from_counter_deltas_over_the_engine_clock() {
    let mut prev = at(10.0);
    prev.clock = Some(TickClock {
        ticks: 1_000,
        tick_rate: 1_000,
    });
    prev.bdevs = vec![bdev("m0", Some(io(100, 1_000)))];
    let mut cur = at(10.9);
    // Two seconds of the engine's clock, whatever top's own clock says.
    cur.clock = Some(TickClock {
        ticks: 3_000,
        tick_rate: 1_000,
    });
    cur.bdevs = vec![bdev("m0", Some(io(100 + 2_000, 1_000 + 51_200)))];
    let rates = model::bdev_rates(Some(&prev), &cur, &cur.bdevs[0]).expect("rates");
    assert_eq!(rates.read_iops, 1_000.0);
    assert_eq!(rates.write_iops, 25_600.0);
    assert_eq!(rates.write_bps, (100 * MIB) as f64);
    let lines = model::screen(Some(&prev), &cur, &frame(), 80, 24);
    assert_eq!(
        row(&lines, "m0"),
        ["m0", "malloc", "1000", "25.6k", "3.9", "100.0", "-"]
    );
}

#[test]
fn without_iostat_bdevs_are_listed_with_dashes_and_a_note() {
    let replies = Replies {
        bdevs: Some(json!([{"name": "m0", "driver": "malloc", "block_size": 4096}])),
        ..Replies::default()
    };
    let prev = Snapshot::from_replies(Duration::from_secs(1), &replies);
    let cur = Snapshot::from_replies(Duration::from_secs(2), &replies);
    assert_eq!(cur.bdevs, [bdev("m0", None)]);
    let lines = model::screen(Some(&prev), &cur, &frame(), 80, 24);
    assert_eq!(row(&lines, "m0"), ["m0", "malloc", "-", "-", "-", "-", "-"]);
    assert_eq!(lines.len(), 24);
    let note = &lines[23];
    assert_eq!(note.kind, Kind::Note);
    assert!(note.text.contains("bdev_get_iostat"), "{note:?}");
}

#[test]
fn a_counter_that_went_back_or_a_new_bdev_has_no_rate() {
    let mut prev = at(1.0);
    prev.bdevs = vec![bdev("m0", Some(io(500, 500)))];
    let mut cur = at(2.0);
    // m0 deleted and created again; m1 new.
    cur.bdevs = vec![bdev("m0", Some(io(10, 10))), bdev("m1", Some(io(5, 5)))];
    assert_eq!(model::bdev_rates(Some(&prev), &cur, &cur.bdevs[0]), None);
    assert_eq!(model::bdev_rates(Some(&prev), &cur, &cur.bdevs[1]), None);
}

#[test]
fn iostat_replies_are_read_by_spdk_field_names_with_p99_in_microseconds() {
    let replies = Replies {
        bdevs: Some(json!([
            {"name": "a", "driver": "malloc"},
            {"name": "b", "driver": "uring"},
            {"name": "c", "driver": "uring"},
        ])),
        iostat: Some(json!({
            "tick_rate": 1_000_000_000u64,
            "ticks": 77,
            "bdevs": [
                {"name": "a", "bytes_read": 8192, "num_read_ops": 2, "bytes_written": 4096,
                 "num_write_ops": 1, "read_latency_p99_us": 40.0, "write_latency_p99_us": 120,
                 "write_latency_p99_9_us": 900},
                {"name": "b", "num_read_ops": 0, "read_latency_ticks": 5,
                 "latency_us": {"read": 3, "p50": 10, "p99": 55.5, "p99.9": 70}},
            ],
        })),
        ..Replies::default()
    };
    let s = Snapshot::from_replies(Duration::ZERO, &replies);
    assert_eq!(
        s.clock,
        Some(TickClock {
            ticks: 77,
            tick_rate: 1_000_000_000
        })
    );
    assert!(s.notes.is_empty(), "{:?}", s.notes);
    assert_eq!(
        s.bdevs[0].io,
        Some(IoCounters {
            num_read_ops: 2,
            num_write_ops: 1,
            bytes_read: 8192,
            bytes_written: 4096
        })
    );
    assert_eq!(s.bdevs[0].p99_us, Some(120.0));
    assert_eq!(s.bdevs[1].p99_us, Some(55.5));
    // A bdev the statistics do not list has none.
    assert_eq!(s.bdevs[2].io, None);
}

#[test]
fn exports_pairs_and_jobs_are_read_from_their_listings() {
    let replies = Replies {
        nbd: Some(json!([{"name": "p0", "bdev": "p0", "writable": true,
                          "socket": "/s", "connections": 2}])),
        nvmf: Some(
            json!([{"nqn": "nqn.2026-01.io.quicksplit:img", "pair": "pair0",
                           "writable": false, "listen": "127.0.0.1:4420", "connections": 1,
                           "num_read_ops": 7, "num_write_ops": 3}]),
        ),
        pairs: Some(
            json!([{"name": "pair0", "state": "COPY", "direction": "forward",
                            "track_size": 65536, "tracks": 100, "pending_tracks": 40,
                            "changed_tracks": 0, "copied_tracks": 50, "restored_tracks": 10}]),
        ),
        backups: Some(json!([{"id": 4, "pair": "pair0", "state": "running",
                              "bytes_done": 10, "bytes_total": 40, "elapsed_ns": 5}])),
        verifies: Some(json!([{"id": 5, "pair": "pair0", "state": "running",
                               "tracks_checked": 25, "tracks_total": 100,
                               "bytes_total": 6_553_600, "bytes_checked": 0,
                               "elapsed_ns": 9}])),
        ..Replies::default()
    };
    let s = Snapshot::from_replies(Duration::ZERO, &replies);
    assert_eq!(
        s.exports,
        [
            ExportSample {
                protocol: Protocol::Nbd,
                name: "p0".into(),
                source: "bdev p0".into(),
                connections: 2,
                ops: None,
            },
            ExportSample {
                protocol: Protocol::NvmeTcp,
                name: "nqn.2026-01.io.quicksplit:img".into(),
                source: "pair pair0".into(),
                connections: 1,
                ops: Some(10),
            },
        ]
    );
    assert_eq!(
        s.pairs,
        [PairSample {
            name: "pair0".into(),
            state: "COPY".into(),
            direction: "forward".into(),
            pending_tracks: 40,
            changed_tracks: 0,
            copied_bytes: 60 * 65536,
        }]
    );
    assert_eq!(s.jobs[0].kind, JobKind::Backup);
    assert_eq!((s.jobs[0].done, s.jobs[0].total), (10, 40));
    // A verification's progress is the share of tracks gone through.
    assert_eq!(s.jobs[1].kind, JobKind::Verify);
    assert_eq!((s.jobs[1].done, s.jobs[1].total), (1_638_400, 6_553_600));
}

#[test]
fn export_iops_and_pair_copy_rate_are_per_second_deltas() {
    let export = |ops| ExportSample {
        protocol: Protocol::NvmeTcp,
        name: "n".into(),
        source: "bdev m0".into(),
        connections: 1,
        ops,
    };
    let pair = |copied_bytes| PairSample {
        name: "ab".into(),
        state: "COPY".into(),
        direction: "forward".into(),
        pending_tracks: 7,
        changed_tracks: 0,
        copied_bytes,
    };
    let mut prev = at(4.0);
    prev.exports = vec![export(Some(1_000))];
    prev.pairs = vec![pair(0)];
    let mut cur = at(6.0);
    cur.exports = vec![export(Some(9_000))];
    cur.pairs = vec![pair(300 * MIB)];
    assert_eq!(model::export_iops(Some(&prev), &cur, 0), Some(4_000.0));
    assert_eq!(
        model::pair_copy_rate(Some(&prev), &cur, 0),
        Some((150 * MIB) as f64)
    );
    let lines = model::screen(Some(&prev), &cur, &frame(), 80, 24);
    assert_eq!(
        row(&lines, "n"),
        ["n", "NVMe/TCP", "bdev", "m0", "1", "4000"]
    );
    assert_eq!(
        row(&lines, "ab"),
        ["ab", "COPY", "forward", "7", "0", "150.0"]
    );
    // An export without counters shows no IOPS.
    cur.exports = vec![export(None)];
    assert_eq!(model::export_iops(Some(&prev), &cur, 0), None);
}

#[test]
fn job_rate_and_eta_come_from_the_last_interval() {
    let mut prev = at(10.0);
    prev.jobs = vec![job(JobKind::Backup, 3, "running", 100 * MIB, 1000 * MIB, 9)];
    let mut cur = at(12.0);
    cur.jobs = vec![job(
        JobKind::Backup,
        3,
        "running",
        300 * MIB,
        1000 * MIB,
        11,
    )];
    let f = model::job_figures(Some(&prev), &cur, &cur.jobs[0]);
    assert_eq!(f.percent, Some(30.0));
    assert_eq!(f.rate, Some((100 * MIB) as f64));
    assert_eq!(f.eta, Some(Duration::from_secs(7)));
    // The first screen: the average since the start.
    let f = model::job_figures(None, &cur, &cur.jobs[0]);
    assert_eq!(f.rate, Some((300 * MIB) as f64 / 11.0));
    // A job crawling so slowly that its time left overflows has no ETA rather than a panic.
    let mut crawling = cur.clone();
    crawling.jobs[0] = job(
        JobKind::Backup,
        3,
        "running",
        1,
        u64::MAX,
        u64::MAX / 1_000_000_000,
    );
    assert_eq!(
        model::job_figures(None, &crawling, &crawling.jobs[0]).eta,
        None
    );
    // A stalled job has no ETA.
    cur.jobs[0].done = 100 * MIB;
    assert_eq!(
        model::job_figures(Some(&prev), &cur, &cur.jobs[0]).eta,
        None
    );
    let lines = model::screen(Some(&prev), &cur, &frame(), 80, 24);
    assert_eq!(
        row(&lines, "backup"),
        ["backup", "3", "pair0", "running", "10.0%", "0.0", "-"]
    );
}

#[test]
fn ended_jobs_show_their_average_and_no_eta_after_the_running_ones() {
    let mut cur = at(1.0);
    cur.jobs = vec![
        job(JobKind::Backup, 1, "done", 64 * MIB, 64 * MIB, 4),
        job(JobKind::Backup, 2, "failed", 0, 64 * MIB, 1),
        job(JobKind::Verify, 3, "running", MIB, 64 * MIB, 1),
    ];
    let f = model::job_figures(None, &cur, &cur.jobs[0]);
    assert_eq!(
        (f.percent, f.rate, f.eta),
        (Some(100.0), Some((16 * MIB) as f64), None)
    );
    let lines = model::screen(None, &cur, &frame(), 80, 24);
    let header = lines.iter().position(|l| l.text.starts_with("Jobs (3)"));
    let header = header.expect("jobs header");
    let ids: Vec<&str> = lines[header + 1..header + 4]
        .iter()
        .map(|l| l.text.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(ids, ["3", "2", "1"]);
    assert_eq!(
        row(&lines[header + 3..], "backup"),
        ["backup", "1", "pair0", "done", "100.0%", "16.0", "-"]
    );
}

#[test]
fn figures_are_short() {
    assert_eq!(model::count_rate(0.4), "0");
    assert_eq!(model::count_rate(9_999.0), "9999");
    assert_eq!(model::count_rate(123_456.0), "123.5k");
    assert_eq!(model::count_rate(12_345_678.0), "12.3M");
    assert_eq!(model::mib_rate((3 * MIB / 2) as f64), "1.5");
    assert_eq!(model::short_duration(Duration::from_secs(42)), "42s");
    assert_eq!(model::short_duration(Duration::from_secs(185)), "3m05s");
    assert_eq!(model::short_duration(Duration::from_secs(7_620)), "2h07m");
    assert_eq!(model::short_duration(Duration::from_secs(273_600)), "3d04h");
}

/// An engine with more of everything than 80x24 holds.
fn crowded() -> (Snapshot, Snapshot) {
    let mut prev = at(1.0);
    let mut cur = at(2.0);
    for s in [&mut prev, &mut cur] {
        s.reactors = (0..64)
            .map(|core| ReactorSample {
                core,
                busy_ns: 0,
                idle_ns: 0,
            })
            .collect();
        s.bdevs = (0..40)
            .map(|i| {
                bdev(
                    &format!("volume-{i:02}-with-a-name-longer-than-a-line-has-room-for"),
                    None,
                )
            })
            .collect();
        s.exports = (0..10)
            .map(|i| ExportSample {
                protocol: Protocol::Nbd,
                name: format!("e{i}"),
                source: "bdev m0".into(),
                connections: 0,
                ops: None,
            })
            .collect();
        s.pairs = vec![];
        s.jobs = (0..30)
            .map(|i| job(JobKind::Backup, i, "done", 1, 1, 1))
            .collect();
        s.notes = vec!["x".repeat(200)];
    }
    (prev, cur)
}

#[test]
fn a_crowded_engine_fits_80x24_with_more_lines() {
    let (prev, cur) = crowded();
    let lines = model::screen(Some(&prev), &cur, &frame(), 80, 24);
    fits(&lines, 80, 24);
    assert_eq!(lines.len(), 24);
    for header in [
        "Reactors",
        "Bdevs (40)",
        "Exports (10)",
        "Pairs (0)",
        "Jobs (30)",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.kind == Kind::Header && l.text.starts_with(header)),
            "no {header}: {:#?}",
            texts(&lines)
        );
    }
    // Each cut list ends with how many entries it left out, and those plus the rows shown
    // make the whole list.
    let mores: Vec<(usize, usize)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.kind == Kind::More)
        .map(|(i, l)| {
            let n = l.text.trim_start_matches('+').trim_end_matches(" more");
            let rows_above = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.kind == Kind::Row)
                .count();
            (rows_above, n.parse().expect("a count"))
        })
        .collect();
    assert_eq!(mores.len(), 4, "{:#?}", texts(&lines));
    let totals: Vec<usize> = mores.iter().map(|(shown, hidden)| shown + hidden).collect();
    // Reactors count cores, several to a line; the others count rows.
    let reactors_more = lines
        .iter()
        .position(|l| l.kind == Kind::More)
        .expect("more");
    let cores_shown: usize = lines[1..reactors_more]
        .iter()
        .map(|l| l.text.matches(':').count())
        .sum();
    assert_eq!(cores_shown + mores[0].1, 64);
    assert_eq!(&totals[1..], [40, 10, 30]);
    // Long names are cut, marked, and keep the figures beside them.
    let b = lines
        .iter()
        .find(|l| l.text.starts_with("volume"))
        .expect("a bdev row");
    assert!(b.text.contains("~"), "{b:?}");
    assert!(b.text.trim_end().ends_with('-'), "{b:?}");
    assert_eq!(lines[23].kind, Kind::Note);
}

#[test]
fn a_narrow_terminal_drops_the_least_useful_columns_first() {
    let (prev, cur) = crowded();
    let lines = model::screen(Some(&prev), &cur, &frame(), 40, 24);
    fits(&lines, 40, 24);
    let header = lines
        .iter()
        .find(|l| l.text.starts_with("Bdevs"))
        .expect("bdevs header");
    assert!(
        header.text.contains("r/s") && header.text.contains("w/s"),
        "{header:?}"
    );
    assert!(!header.text.contains("driver"), "{header:?}");
    assert!(!header.text.contains("p99"), "{header:?}");
}

#[test]
fn tiny_terminals_keep_the_first_panels_and_never_overflow() {
    let (prev, cur) = crowded();
    for (w, h) in [
        (80, 1),
        (80, 3),
        (80, 6),
        (10, 24),
        (0, 0),
        (1, 2),
        (200, 60),
    ] {
        let lines = model::screen(Some(&prev), &cur, &frame(), w, h);
        fits(&lines, usize::from(w), usize::from(h));
    }
    let lines = model::screen(Some(&prev), &cur, &frame(), 80, 4);
    assert_eq!(lines[0].kind, Kind::Title);
    assert!(lines[1].text.starts_with("Reactors"));
    assert!(lines[2].text.starts_with("Bdevs"));
}

#[test]
fn names_from_the_engine_cannot_write_escape_sequences() {
    let mut cur = at(1.0);
    cur.bdevs = vec![bdev("evil\u{1b}[2J\u{7}", None)];
    let lines = model::screen(None, &cur, &frame(), 80, 24);
    assert!(
        lines.iter().all(|l| !l.text.chars().any(char::is_control)),
        "{:#?}",
        texts(&lines)
    );
    assert_eq!(row(&lines, "evil?[2J?")[0], "evil?[2J?");
}

#[test]
fn wide_characters_are_measured_in_terminal_cells() {
    let mut cur = at(1.0);
    // 30 characters, 60 cells.
    cur.bdevs = vec![bdev(&"\u{5377}".repeat(30), None)];
    let lines = model::screen(None, &cur, &frame(), 60, 24);
    fits(&lines, 60, 24);
    let b = &lines[3];
    assert!(
        b.text.starts_with('\u{5377}') && b.text.contains("~  malloc"),
        "{b:?}"
    );
    let f = Frame {
        socket: "/\u{5377}\u{5377}\u{5377}/rpc.sock",
        ..frame()
    };
    fits(&model::screen(None, &cur, &f, 36, 24), 36, 24);
}

#[test]
fn the_title_names_the_socket_and_the_quit_key_within_the_width() {
    let lines = model::screen(None, &at(0.0), &frame(), 80, 24);
    assert_eq!(lines[0].kind, Kind::Title);
    assert_eq!(lines[0].text.chars().count(), 80);
    assert!(lines[0].text.contains("/var/tmp/quicksplit.sock"));
    assert!(lines[0].text.ends_with("q: quit"));
    let long = "/a/very/long/path/".repeat(10) + "rpc.sock";
    let f = Frame {
        socket: &long,
        ..frame()
    };
    let lines = model::screen(None, &at(0.0), &f, 80, 24);
    assert!(lines[0].text.contains("~"), "{:?}", lines[0]);
    assert!(lines[0].text.contains("rpc.sock"), "{:?}", lines[0]);
    // A failed refresh is said at the bottom.
    let f = Frame {
        error: Some("engine not answering"),
        ..frame()
    };
    let lines = model::screen(None, &at(0.0), &f, 80, 24);
    assert_eq!(lines.last().map(|l| l.kind), Some(Kind::Note));
}

#[test]
fn lists_share_the_height_in_turn() {
    assert_eq!(allot(&[2, 50, 3], 100), [2, 50, 3]);
    assert_eq!(allot(&[2, 50, 3], 7), [2, 3, 2]);
    assert_eq!(allot(&[0, 50, 0], 7), [0, 7, 0]);
    assert_eq!(allot(&[4, 4], 0), [0, 0]);
}

#[test]
fn tables_shorten_names_before_dropping_columns() {
    let columns = [
        Column::name("name"),
        Column::figure("a", 2),
        Column::figure("b", 1),
    ];
    let rows = vec![vec!["x".repeat(30), "1".into(), "2".into()]];
    // Everything fits in 36 cells.
    assert_eq!(
        table_lines(&columns, &rows, 36)[1],
        format!("{}  1  2", "x".repeat(30))
    );
    // In 20, the name gives way.
    let lines = table_lines(&columns, &rows, 20);
    assert_eq!(lines[0], format!("name{}a  b", " ".repeat(12)));
    assert_eq!(lines[1], format!("{}~  1  2", "x".repeat(13)));
    // In 16, a name of 12 cells would still not leave room: column b goes, and the name
    // takes back what it can.
    let lines = table_lines(&columns, &rows, 16);
    assert_eq!(lines[0], format!("name{}a", " ".repeat(11)));
    assert_eq!(lines[1], format!("{}~  1", "x".repeat(12)));
}
