//! What `top` reads from the engine at one instant: the counters of the listing RPCs, parsed
//! from their replies. Parsing is lenient (a field missing reads as absent or zero) so that an
//! engine a version older or newer than this CLI still shows what it has.

use std::time::Duration;

use serde_json::Value;

/// One reactor's cumulative time counters (`framework_get_reactors`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReactorSample {
    /// The core it is pinned to.
    pub core: u64,
    /// Nanoseconds spent polling with work.
    pub busy_ns: u64,
    /// Nanoseconds spent polling without work or parked.
    pub idle_ns: u64,
}

/// A bdev's cumulative I/O counters, named as SPDK's `bdev_get_iostat` names them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IoCounters {
    /// Reads completed.
    pub num_read_ops: u64,
    /// Writes completed.
    pub num_write_ops: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// One bdev: from `bdev_get_bdevs`, with its counters from `bdev_get_iostat` when the engine
/// has that method.
#[derive(Debug, Clone, PartialEq)]
pub struct BdevSample {
    /// Name.
    pub name: String,
    /// Driver (`malloc`, `uring`, `nvme`, ...).
    pub driver: String,
    /// Counters, absent without `bdev_get_iostat`.
    pub io: Option<IoCounters>,
    /// The worse of the read and write 99th percentile latencies, in microseconds, when the
    /// statistics carry percentiles.
    pub p99_us: Option<f64>,
}

/// The engine's clock as `bdev_get_iostat` reports it: counters divided by its ticks give
/// rates over exactly the engine's interval, whatever the delays of the RPC round trips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TickClock {
    /// Ticks at the snapshot.
    pub ticks: u64,
    /// Ticks per second.
    pub tick_rate: u64,
}

/// The protocol of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `nbd_get_exports`.
    Nbd,
    /// `nvmf_get_exports`.
    NvmeTcp,
}

impl Protocol {
    /// How the screen names it.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Nbd => "NBD",
            Protocol::NvmeTcp => "NVMe/TCP",
        }
    }
}

/// One export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSample {
    /// Its protocol.
    pub protocol: Protocol,
    /// Name (NBD) or NQN (NVMe/TCP).
    pub name: String,
    /// What it shows: `bdev NAME` or `pair NAME`.
    pub source: String,
    /// Open connections.
    pub connections: u64,
    /// Requests served (reads plus writes), when the export reports counters.
    pub ops: Option<u64>,
}

/// One pair (`pair_get`).
#[derive(Debug, Clone, PartialEq)]
pub struct PairSample {
    /// Name.
    pub name: String,
    /// State (`COPY`, `PAIR`, `SPLIT`, `PSUE`, ...).
    pub state: String,
    /// `forward` or `reverse`.
    pub direction: String,
    /// Tracks still to copy.
    pub pending_tracks: u64,
    /// Tracks written since the split.
    pub changed_tracks: u64,
    /// Bytes copied so far, either way (copied and restored tracks times the track size).
    pub copied_bytes: u64,
}

/// Backups and verifications share one sequence of ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `backup_get`.
    Backup,
    /// `verify_get`.
    Verify,
}

/// One backup or verification.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSample {
    /// Backup or verify.
    pub kind: JobKind,
    /// Its id.
    pub id: u64,
    /// The pair.
    pub pair: String,
    /// `running`, `done`, `failed`, `cancelled`.
    pub state: String,
    /// Bytes gone through.
    pub done: u64,
    /// Bytes in all (0: unknown).
    pub total: u64,
    /// Nanoseconds since its start (until its end once ended).
    pub elapsed_ns: u64,
}

impl JobSample {
    /// Still going.
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// Everything one refresh read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// When it was taken, on `top`'s own monotonic clock.
    pub at: Duration,
    /// The engine's clock, with `bdev_get_iostat`.
    pub clock: Option<TickClock>,
    /// Reactors.
    pub reactors: Vec<ReactorSample>,
    /// Bdevs.
    pub bdevs: Vec<BdevSample>,
    /// NBD and NVMe/TCP exports.
    pub exports: Vec<ExportSample>,
    /// Pairs.
    pub pairs: Vec<PairSample>,
    /// Backups and verifications.
    pub jobs: Vec<JobSample>,
    /// What could not be read, for the status line.
    pub notes: Vec<String>,
}

/// The replies one refresh gathered; `None` for a method the engine does not have.
#[derive(Debug, Default)]
pub struct Replies {
    /// `framework_get_reactors`.
    pub reactors: Option<Value>,
    /// `bdev_get_bdevs`.
    pub bdevs: Option<Value>,
    /// `bdev_get_iostat`.
    pub iostat: Option<Value>,
    /// `nbd_get_exports`.
    pub nbd: Option<Value>,
    /// `nvmf_get_exports`.
    pub nvmf: Option<Value>,
    /// `pair_get`.
    pub pairs: Option<Value>,
    /// `backup_get`.
    pub backups: Option<Value>,
    /// `verify_get`.
    pub verifies: Option<Value>,
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_string()
}

fn items(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

impl Snapshot {
    /// The snapshot the replies describe, taken at `at`.
    pub fn from_replies(at: Duration, r: &Replies) -> Self {
        let mut notes = Vec::new();
        if r.iostat.is_none() {
            notes.push("no bdev_get_iostat in this engine: bdev rates shown as -".to_string());
        }
        let clock = r.iostat.as_ref().and_then(|s| {
            Some(TickClock {
                ticks: s.get("ticks")?.as_u64()?,
                tick_rate: s.get("tick_rate")?.as_u64()?,
            })
        });
        let tick_rate = clock.map(|c| c.tick_rate);
        let stats: Vec<&Value> = items(r.iostat.as_ref().and_then(|s| s.get("bdevs"))).collect();
        let bdevs = items(r.bdevs.as_ref())
            .map(|b| {
                let name = text(b, "name");
                let stat = stats.iter().find(|s| s.get("name") == b.get("name"));
                BdevSample {
                    io: stat.map(|s| IoCounters {
                        num_read_ops: num(s, "num_read_ops"),
                        num_write_ops: num(s, "num_write_ops"),
                        bytes_read: num(s, "bytes_read"),
                        bytes_written: num(s, "bytes_written"),
                    }),
                    p99_us: stat.and_then(|s| worst_p99_us(s, tick_rate)),
                    driver: text(b, "driver"),
                    name,
                }
            })
            .collect();
        let reactors = items(r.reactors.as_ref())
            .map(|x| ReactorSample {
                core: num(x, "core"),
                busy_ns: num(x, "busy_ns"),
                idle_ns: num(x, "idle_ns"),
            })
            .collect();
        let exports = [(Protocol::Nbd, &r.nbd), (Protocol::NvmeTcp, &r.nvmf)]
            .into_iter()
            .flat_map(|(protocol, list)| items(list.as_ref()).map(move |e| export(protocol, e)))
            .collect();
        let pairs = items(r.pairs.as_ref())
            .map(|p| PairSample {
                name: text(p, "name"),
                state: text(p, "state"),
                direction: text(p, "direction"),
                pending_tracks: num(p, "pending_tracks"),
                changed_tracks: num(p, "changed_tracks"),
                copied_bytes: (num(p, "copied_tracks").saturating_add(num(p, "restored_tracks")))
                    .saturating_mul(num(p, "track_size")),
            })
            .collect();
        let backups = items(r.backups.as_ref()).map(|b| JobSample {
            kind: JobKind::Backup,
            id: num(b, "id"),
            pair: text(b, "pair"),
            state: text(b, "state"),
            done: num(b, "bytes_done"),
            total: num(b, "bytes_total"),
            elapsed_ns: num(b, "elapsed_ns"),
        });
        let verifies = items(r.verifies.as_ref()).map(|v| {
            // The share of the volume gone through (compared or skipped), as `verify --wait`
            // reports it.
            let total = num(v, "bytes_total");
            let done = match num(v, "tracks_total") {
                0 => 0,
                tracks => {
                    (u128::from(total) * u128::from(num(v, "tracks_checked")) / u128::from(tracks))
                        as u64
                }
            };
            JobSample {
                kind: JobKind::Verify,
                id: num(v, "id"),
                pair: text(v, "pair"),
                state: text(v, "state"),
                done,
                total,
                elapsed_ns: num(v, "elapsed_ns"),
            }
        });
        Snapshot {
            at,
            clock,
            reactors,
            bdevs,
            exports,
            pairs,
            jobs: backups.chain(verifies).collect(),
            notes,
        }
    }
}

fn export(protocol: Protocol, e: &Value) -> ExportSample {
    let name_key = match protocol {
        Protocol::Nbd => "name",
        Protocol::NvmeTcp => "nqn",
    };
    let source = match (e.get("bdev"), e.get("pair")) {
        (Some(b), _) => format!("bdev {}", b.as_str().unwrap_or("?")),
        (None, Some(p)) => format!("pair {}", p.as_str().unwrap_or("?")),
        (None, None) => "-".to_string(),
    };
    // Counters under SPDK's names, or plain ones.
    let count = |a: &str, b: &str| e.get(a).or_else(|| e.get(b)).and_then(Value::as_u64);
    let ops = match (
        count("num_read_ops", "read_ops"),
        count("num_write_ops", "write_ops"),
    ) {
        (None, None) => None,
        (r, w) => Some(r.unwrap_or(0).saturating_add(w.unwrap_or(0))),
    };
    ExportSample {
        protocol,
        name: text(e, name_key),
        source,
        connections: num(e, "connections"),
        ops,
    }
}

/// A 99th percentile latency field, not the 99.9th: `p99` followed by nothing, a unit or `_`,
/// but not by `9`, `.9` or `_9` (`p999`, `p99.9`, `p99_9`).
fn is_p99(key: &str) -> bool {
    key.match_indices("p99").any(|(i, m)| {
        let rest = &key[i + m.len()..];
        match rest.as_bytes() {
            [] => true,
            [b'9', ..] | [b'.', ..] | [b'_', b'9', ..] => false,
            _ => true,
        }
    })
}

/// A latency in microseconds from its field name's unit (`_us`, `_ns`, `_ms`, `_ticks`;
/// microseconds when the name has none, as the engine reports percentiles).
fn to_us(key: &str, value: f64, tick_rate: Option<u64>) -> Option<f64> {
    if key.ends_with("_ns") {
        Some(value / 1000.0)
    } else if key.ends_with("_ms") {
        Some(value * 1000.0)
    } else if key.ends_with("_ticks") {
        let rate = tick_rate.filter(|r| *r > 0)? as f64;
        Some(value * 1e6 / rate)
    } else {
        Some(value)
    }
}

/// The worst 99th percentile latency of a bdev's statistics, in microseconds: flat fields
/// (`read_latency_p99_us`) or one level of nesting (`read_latency_us: {p99}`).
fn worst_p99_us(stat: &Value, tick_rate: Option<u64>) -> Option<f64> {
    let obj = stat.as_object()?;
    let mut worst: Option<f64> = None;
    let mut note = |key: &str, v: &Value| {
        if let Some(us) = v.as_f64().and_then(|x| to_us(key, x, tick_rate)) {
            worst = Some(worst.map_or(us, |w| w.max(us)));
        }
    };
    for (key, v) in obj {
        if let Some(inner) = v.as_object() {
            for (k, x) in inner {
                if is_p99(k) {
                    // The unit is on the outer name (`read_latency_us`) or on the inner one.
                    let unit_key = if k.contains('_') { k } else { key };
                    note(unit_key, x);
                }
            }
        } else if is_p99(key) {
            note(key, v);
        }
    }
    worst
}
