//! The screen of `quicksplit top` as text: which rows and figures are shown, computed from two
//! snapshots (rates are their differences over the time between them) and fitted to the
//! terminal. Pure: drawing it is [`super::draw`]'s business.

use std::time::Duration;

use super::fit::{self, allot, keep_end, printable, table_lines, truncate, Column};
use super::snapshot::{BdevSample, JobKind, JobSample, ReactorSample, Snapshot};

/// What a line of the screen is, for its style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The top line.
    Title,
    /// A panel's header.
    Header,
    /// A row of a panel.
    Row,
    /// "+N more" under a list cut short.
    More,
    /// What could not be read, at the bottom.
    Note,
}

/// One line of the screen, at most the screen's width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Its style.
    pub kind: Kind,
    /// Its text.
    pub text: String,
}

/// What the screen says besides the snapshots.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The RPC socket.
    pub socket: &'a str,
    /// Time between refreshes.
    pub interval: Duration,
    /// The last refresh's failure (the figures shown are then the last ones read).
    pub error: Option<&'a str>,
}

/// Read and write rates of a bdev over the last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IoRates {
    /// Reads per second.
    pub read_iops: f64,
    /// Writes per second.
    pub write_iops: f64,
    /// Bytes read per second.
    pub read_bps: f64,
    /// Bytes written per second.
    pub write_bps: f64,
}

/// Progress of a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobFigures {
    /// Share done, in percent (unknown total: none).
    pub percent: Option<f64>,
    /// Bytes per second: over the last interval while running, the average once ended.
    pub rate: Option<f64>,
    /// Time left at that rate, while running.
    pub eta: Option<Duration>,
}

/// `(cur - prev) / seconds`, or none when the counter went back (a bdev or pair recreated
/// under the same name) or no time passed.
fn per_second(prev: u64, cur: u64, seconds: f64) -> Option<f64> {
    (cur >= prev && seconds > 0.0).then(|| (cur - prev) as f64 / seconds)
}

/// Seconds between two snapshots on `top`'s clock.
fn seconds_between(prev: &Snapshot, cur: &Snapshot) -> f64 {
    cur.at.saturating_sub(prev.at).as_secs_f64()
}

/// A reactor's busy share over the last interval, in percent.
pub fn reactor_busy(prev: Option<&Snapshot>, r: &ReactorSample) -> Option<f64> {
    let before = prev?.reactors.iter().find(|p| p.core == r.core)?;
    let busy = r.busy_ns.checked_sub(before.busy_ns)?;
    let idle = r.idle_ns.checked_sub(before.idle_ns)?;
    let all = busy.saturating_add(idle);
    (all > 0).then(|| 100.0 * busy as f64 / all as f64)
}

/// A bdev's rates over the last interval, measured on the engine's clock when both snapshots
/// carry it.
pub fn bdev_rates(prev: Option<&Snapshot>, cur: &Snapshot, b: &BdevSample) -> Option<IoRates> {
    let prev = prev?;
    let now = b.io?;
    let before = prev.bdevs.iter().find(|p| p.name == b.name)?.io?;
    let seconds = match (prev.clock, cur.clock) {
        (Some(p), Some(c)) if c.tick_rate > 0 && c.ticks > p.ticks => {
            (c.ticks - p.ticks) as f64 / c.tick_rate as f64
        }
        _ => seconds_between(prev, cur),
    };
    Some(IoRates {
        read_iops: per_second(before.num_read_ops, now.num_read_ops, seconds)?,
        write_iops: per_second(before.num_write_ops, now.num_write_ops, seconds)?,
        read_bps: per_second(before.bytes_read, now.bytes_read, seconds)?,
        write_bps: per_second(before.bytes_written, now.bytes_written, seconds)?,
    })
}

/// An export's requests per second, when it reports counters.
pub fn export_iops(prev: Option<&Snapshot>, cur: &Snapshot, index: usize) -> Option<f64> {
    let prev = prev?;
    let e = cur.exports.get(index)?;
    let before = prev
        .exports
        .iter()
        .find(|p| p.protocol == e.protocol && p.name == e.name)?;
    per_second(before.ops?, e.ops?, seconds_between(prev, cur))
}

/// A pair's copy rate (bytes per second, either direction) over the last interval.
pub fn pair_copy_rate(prev: Option<&Snapshot>, cur: &Snapshot, index: usize) -> Option<f64> {
    let prev = prev?;
    let p = cur.pairs.get(index)?;
    let before = prev.pairs.iter().find(|q| q.name == p.name)?;
    per_second(
        before.copied_bytes,
        p.copied_bytes,
        seconds_between(prev, cur),
    )
}

/// A job's share done, rate and time left.
pub fn job_figures(prev: Option<&Snapshot>, cur: &Snapshot, j: &JobSample) -> JobFigures {
    let percent = (j.total > 0).then(|| 100.0 * j.done as f64 / j.total as f64);
    let average = || {
        let seconds = j.elapsed_ns as f64 / 1e9;
        (seconds > 0.0).then(|| j.done as f64 / seconds)
    };
    if !j.running() {
        return JobFigures {
            percent,
            rate: average(),
            eta: None,
        };
    }
    let before = prev.and_then(|p| {
        let b = p
            .jobs
            .iter()
            .find(|b| b.kind == j.kind && b.id == j.id && b.running())?;
        Some((p, b))
    });
    // Over the last interval once there is one; since the start on the first screen.
    let rate = match before {
        Some((p, b)) => per_second(b.done, j.done, seconds_between(p, cur)),
        None => average(),
    };
    let eta = match rate {
        // A rate so small that the time left overflows a Duration has no ETA worth showing.
        Some(r) if r > 0.0 && j.total >= j.done => {
            Duration::try_from_secs_f64((j.total - j.done) as f64 / r).ok()
        }
        _ => None,
    };
    JobFigures { percent, rate, eta }
}

/// A count per second: `950`, `12.3k`, `1.2M`.
pub fn count_rate(v: f64) -> String {
    if v < 9999.5 {
        format!("{v:.0}")
    } else if v < 9_999_500.0 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{:.1}M", v / 1e6)
    }
}

/// Bytes per second in MiB/s: `0.0`, `812.5`, `12034`.
pub fn mib_rate(bytes_per_second: f64) -> String {
    let v = bytes_per_second / (1024.0 * 1024.0);
    if v < 9999.95 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// A time left, short: `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".to_string())
}

/// A panel before fitting to the height: its header line and its body lines, each body line
/// standing for `items` entries (a row, or a line of reactors).
struct Panel {
    header: String,
    body: Vec<(String, usize)>,
}

impl Panel {
    fn from_table(columns: &[Column], rows: &[Vec<String>], width: usize) -> Self {
        let mut lines = table_lines(columns, rows, width).into_iter();
        Panel {
            header: lines.next().unwrap_or_default(),
            body: lines.map(|l| (l, 1)).collect(),
        }
    }
}

/// Cells of reactors, `  0: 12.3%` (core and busy share), and the spaces between them.
const REACTOR_CELL: usize = 10;
const REACTOR_GAP: usize = 2;

fn reactors_panel(prev: Option<&Snapshot>, cur: &Snapshot, width: usize) -> Panel {
    let title = "Reactors";
    let cells: Vec<String> = cur
        .reactors
        .iter()
        .map(|r| {
            let busy = or_dash(reactor_busy(prev, r).map(|b| format!("{b:.1}%")));
            format!("{:>3}:{busy:>6}", r.core)
        })
        .collect();
    // The first line holds the title and as many cells as fit; the next ones line up under
    // its cells.
    let indent = title.len() + 2;
    let per_line =
        ((width.saturating_sub(indent) + REACTOR_GAP) / (REACTOR_CELL + REACTOR_GAP)).max(1);
    let mut chunks = cells.chunks(per_line);
    let line = |chunk: &[String]| chunk.join(&" ".repeat(REACTOR_GAP));
    let header = match chunks.next() {
        Some(first) => truncate(&format!("{title}  {}", line(first)), width),
        None => truncate(&format!("{title}  none"), width),
    };
    let body = chunks
        .map(|c| {
            (
                truncate(&format!("{}{}", " ".repeat(indent), line(c)), width),
                c.len(),
            )
        })
        .collect();
    Panel { header, body }
}

fn bdevs_panel(prev: Option<&Snapshot>, cur: &Snapshot, width: usize) -> Panel {
    let columns = [
        Column::name(format!("Bdevs ({})", cur.bdevs.len())),
        Column::text("driver", 2),
        Column::figure("r/s", 9),
        Column::figure("w/s", 9),
        Column::figure("rMiB/s", 5),
        Column::figure("wMiB/s", 5),
        Column::figure("p99(us)", 3),
    ];
    let rows: Vec<Vec<String>> = cur
        .bdevs
        .iter()
        .map(|b| {
            let rates = bdev_rates(prev, cur, b);
            let fig = |f: fn(&IoRates) -> String| or_dash(rates.as_ref().map(f));
            vec![
                printable(&b.name),
                printable(&b.driver),
                fig(|r| count_rate(r.read_iops)),
                fig(|r| count_rate(r.write_iops)),
                fig(|r| mib_rate(r.read_bps)),
                fig(|r| mib_rate(r.write_bps)),
                or_dash(b.p99_us.map(count_rate)),
            ]
        })
        .collect();
    Panel::from_table(&columns, &rows, width)
}

fn exports_panel(prev: Option<&Snapshot>, cur: &Snapshot, width: usize) -> Panel {
    let columns = [
        Column::name(format!("Exports ({})", cur.exports.len())),
        Column::text("proto", 4),
        Column::name("source"),
        Column::figure("conns", 6),
        Column::figure("IOPS", 7),
    ];
    let rows: Vec<Vec<String>> = cur
        .exports
        .iter()
        .enumerate()
        .map(|(i, e)| {
            vec![
                printable(&e.name),
                e.protocol.label().to_string(),
                printable(&e.source),
                e.connections.to_string(),
                or_dash(export_iops(prev, cur, i).map(count_rate)),
            ]
        })
        .collect();
    Panel::from_table(&columns, &rows, width)
}

fn pairs_panel(prev: Option<&Snapshot>, cur: &Snapshot, width: usize) -> Panel {
    let columns = [
        Column::name(format!("Pairs ({})", cur.pairs.len())),
        Column::text("state", 9),
        Column::text("dir", 3),
        Column::figure("pending", 8),
        Column::figure("changed", 2),
        Column::figure("copy MiB/s", 7),
    ];
    let rows: Vec<Vec<String>> = cur
        .pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            vec![
                printable(&p.name),
                printable(&p.state),
                printable(&p.direction),
                p.pending_tracks.to_string(),
                p.changed_tracks.to_string(),
                or_dash(pair_copy_rate(prev, cur, i).map(mib_rate)),
            ]
        })
        .collect();
    Panel::from_table(&columns, &rows, width)
}

/// Running jobs first, oldest first; then ended ones, newest first.
fn job_order(jobs: &[JobSample]) -> Vec<&JobSample> {
    let mut order: Vec<&JobSample> = jobs.iter().collect();
    order.sort_by_key(|j| {
        if j.running() {
            (0, j.id)
        } else {
            (1, u64::MAX - j.id)
        }
    });
    order
}

fn jobs_panel(prev: Option<&Snapshot>, cur: &Snapshot, width: usize) -> Panel {
    let columns = [
        Column::text(format!("Jobs ({})", cur.jobs.len()), 0),
        Column::name("pair"),
        Column::text("state", 8),
        Column::figure("done", 9),
        Column::figure("MiB/s", 6),
        Column::figure("ETA", 7),
    ];
    let rows: Vec<Vec<String>> = job_order(&cur.jobs)
        .into_iter()
        .map(|j| {
            let f = job_figures(prev, cur, j);
            let kind = match j.kind {
                JobKind::Backup => "backup",
                JobKind::Verify => "verify",
            };
            vec![
                format!("{kind} {}", j.id),
                printable(&j.pair),
                printable(&j.state),
                or_dash(f.percent.map(|p| format!("{p:.1}%"))),
                or_dash(f.rate.map(mib_rate)),
                or_dash(f.eta.map(short_duration)),
            ]
        })
        .collect();
    Panel::from_table(&columns, &rows, width)
}

fn title_line(frame: &Frame<'_>, width: usize) -> String {
    let every = frame.interval.as_secs_f64();
    let left = format!("quicksplit top  every {every}s  ");
    let right = "  q: quit";
    let room = width.saturating_sub(left.len() + right.len());
    // The socket's path keeps its end (the file name) when cut.
    let socket = keep_end(&printable(frame.socket), room);
    let used = left.len() + fit::width(&socket) + right.len();
    let fill = " ".repeat(width.saturating_sub(used));
    truncate(&format!("{left}{socket}{fill}{right}"), width)
}

/// The screen for `cur` (rates against `prev`, the snapshot before it) on a terminal of
/// `width` by `height` cells: a title line, the panels (reactors, bdevs, exports, pairs,
/// jobs) and a note line when something could not be read. Every line fits the width and
/// the lines fit the height.
pub fn screen(
    prev: Option<&Snapshot>,
    cur: &Snapshot,
    frame: &Frame<'_>,
    width: u16,
    height: u16,
) -> Vec<Line> {
    let (width, height) = (usize::from(width), usize::from(height));
    if height == 0 {
        return Vec::new();
    }
    let line = |kind, text: String| Line { kind, text };
    let mut lines = vec![line(Kind::Title, title_line(frame, width))];
    let notes: Vec<&str> = frame
        .error
        .into_iter()
        .chain(cur.notes.iter().map(String::as_str))
        .collect();
    let note = (!notes.is_empty() && height >= 3)
        .then(|| line(Kind::Note, truncate(&printable(&notes.join("; ")), width)));
    let mut panels = vec![
        reactors_panel(prev, cur, width),
        bdevs_panel(prev, cur, width),
        exports_panel(prev, cur, width),
        pairs_panel(prev, cur, width),
        jobs_panel(prev, cur, width),
    ];
    let room = height - 1 - usize::from(note.is_some());
    // Every panel shown has its header; the last panels go when even those do not fit.
    panels.truncate(room);
    let wants: Vec<usize> = panels.iter().map(|p| p.body.len()).collect();
    let given = allot(&wants, room - panels.len());
    for (panel, given) in panels.into_iter().zip(given) {
        lines.push(line(Kind::Header, panel.header));
        if given == panel.body.len() {
            lines.extend(panel.body.into_iter().map(|(t, _)| line(Kind::Row, t)));
            continue;
        }
        // The last line given says what the cut left out.
        let shown = given.saturating_sub(1);
        let hidden: usize = panel.body[shown..].iter().map(|(_, n)| n).sum();
        let mut body = panel.body;
        body.truncate(shown);
        lines.extend(body.into_iter().map(|(t, _)| line(Kind::Row, t)));
        if given > 0 {
            lines.push(line(
                Kind::More,
                truncate(&format!("+{hidden} more"), width),
            ));
        }
    }
    if let Some(note) = note {
        // On the bottom line, where a status line is looked for.
        lines.resize(height - 1, line(Kind::Row, String::new()));
        lines.push(note);
    }
    lines
}
