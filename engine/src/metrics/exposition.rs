//! What a scrape shows: the engine's figures gathered at once ([`Figures`]), then written in
//! the Prometheus text format (0.0.4) by the `prometheus-client` crate's encoder.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::app::Engine;
use crate::backup::BackupInfo;
use crate::export::ExportInfo;
use crate::pair::PairInfo;
use crate::verify::VerifyInfo;
use drivers::BdevIoStat;

/// Every state a pair can be in, for the state set (one series each, 1 for the current one).
const PAIR_STATES: [&str; 4] = ["COPY", "PAIR", "PSUS", "PSUE"];

/// One reactor's time.
#[derive(Debug)]
struct ReactorTime {
    core: usize,
    busy_ns: u64,
    idle_ns: u64,
}

/// The engine's figures at one scrape.
#[derive(Debug)]
struct Figures {
    tick_rate: f64,
    bdevs: Vec<BdevIoStat>,
    exports: Vec<(&'static str, ExportInfo)>,
    pairs: Vec<PairInfo>,
    backups: Vec<BackupInfo>,
    verifies: Vec<VerifyInfo>,
    reactors: Vec<ReactorTime>,
}

impl Figures {
    fn gather(engine: &Engine) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let bdevs = engine.state().bdevs.iostat(None).unwrap_or_default();
        let mut exports: Vec<(&'static str, ExportInfo)> = Vec::new();
        exports.extend(engine.nbd().list().into_iter().map(|e| ("nbd", e)));
        exports.extend(engine.nvmf().list().into_iter().map(|e| ("nvmf", e)));
        Self {
            tick_rate: drivers::iostat::tick_rate() as f64,
            bdevs,
            exports,
            pairs: engine.pair_get(None).unwrap_or_default(),
            backups: engine.backup_get(None).unwrap_or_default(),
            verifies: engine.verify_get(None).unwrap_or_default(),
            reactors: engine
                .reactors()
                .handles()
                .iter()
                .map(|r| ReactorTime {
                    core: r.core(),
                    busy_ns: r.stats().busy_ns.load(Relaxed),
                    idle_ns: r.stats().idle_ns.load(Relaxed),
                })
                .collect(),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// A value of a counter or a gauge.
#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

/// Writes one metric family: `name` (counters get `_total`), its help, and one series per
/// item. A family without series is left out.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    series: Vec<(Labels, Value)>,
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in &series {
        let mut s = m.encode_family(labels)?;
        match (ty, v) {
            (MetricType::Counter, Value::Int(v)) => {
                s.encode_counter::<NoLabelSet, _, u64>(v, None)?
            }
            (MetricType::Counter, Value::Float(v)) => {
                s.encode_counter::<NoLabelSet, _, u64>(v, None)?
            }
            (_, Value::Int(v)) => s.encode_gauge(v)?,
            (_, Value::Float(v)) => s.encode_gauge(v)?,
        }
    }
    Ok(())
}

impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        use Value::{Float, Int};
        let bdev = |b: &BdevIoStat| vec![("bdev", b.name.clone())];
        let per_bdev = |f: fn(&BdevIoStat) -> u64| -> Vec<(Labels, Value)> {
            self.bdevs.iter().map(|b| (bdev(b), Int(f(b)))).collect()
        };
        family(
            &mut enc,
            "quicksplit_bdev_read_ops",
            "Reads a bdev completed.",
            Counter,
            per_bdev(|b| b.stat.num_read_ops),
        )?;
        family(
            &mut enc,
            "quicksplit_bdev_write_ops",
            "Writes a bdev completed.",
            Counter,
            per_bdev(|b| b.stat.num_write_ops),
        )?;
        family(
            &mut enc,
            "quicksplit_bdev_read_bytes",
            "Bytes a bdev read.",
            Counter,
            per_bdev(|b| b.stat.bytes_read),
        )?;
        family(
            &mut enc,
            "quicksplit_bdev_written_bytes",
            "Bytes a bdev wrote.",
            Counter,
            per_bdev(|b| b.stat.bytes_written),
        )?;
        family(
            &mut enc,
            "quicksplit_bdev_unmap_ops",
            "Unmaps a bdev completed.",
            Counter,
            per_bdev(|b| b.stat.num_unmap_ops),
        )?;
        family(
            &mut enc,
            "quicksplit_bdev_errors",
            "Requests to a bdev that failed.",
            Counter,
            per_bdev(|b| b.stat.num_errors),
        )?;
        for (name, help, read) in [
            (
                "quicksplit_bdev_read_latency_seconds",
                "Latency of a bdev's reads.",
                true,
            ),
            (
                "quicksplit_bdev_write_latency_seconds",
                "Latency of a bdev's writes.",
                false,
            ),
        ] {
            if self.bdevs.is_empty() {
                break;
            }
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for b in &self.bdevs {
                let s = &b.stat;
                let (ticks, count, buckets) = if read {
                    (s.read_latency_ticks, s.read_latency_count, &s.read_buckets)
                } else {
                    (
                        s.write_latency_ticks,
                        s.write_latency_count,
                        &s.write_buckets,
                    )
                };
                let labels = bdev(b);
                let mut series = m.encode_family(&labels)?;
                series.encode_histogram::<NoLabelSet>(
                    ticks as f64 / self.tick_rate,
                    count,
                    buckets,
                    None,
                )?;
            }
        }

        let export =
            |p: &str, e: &ExportInfo| vec![("protocol", p.to_string()), ("export", e.name.clone())];
        let per_export = |f: fn(&ExportInfo) -> u64| -> Vec<(Labels, Value)> {
            self.exports
                .iter()
                .map(|(p, e)| (export(p, e), Int(f(e))))
                .collect()
        };
        family(
            &mut enc,
            "quicksplit_export_read_ops",
            "Reads an export's connections made.",
            Counter,
            per_export(|e| e.io.num_read_ops),
        )?;
        family(
            &mut enc,
            "quicksplit_export_write_ops",
            "Writes an export's connections made.",
            Counter,
            per_export(|e| e.io.num_write_ops),
        )?;
        family(
            &mut enc,
            "quicksplit_export_read_bytes",
            "Bytes an export's connections read.",
            Counter,
            per_export(|e| e.io.bytes_read),
        )?;
        family(
            &mut enc,
            "quicksplit_export_written_bytes",
            "Bytes an export's connections wrote.",
            Counter,
            per_export(|e| e.io.bytes_written),
        )?;
        family(
            &mut enc,
            "quicksplit_export_connections",
            "An export's open connections.",
            Gauge,
            per_export(|e| e.connections as u64),
        )?;

        let pair = |p: &PairInfo| vec![("pair", p.name.clone())];
        let per_pair = |f: fn(&PairInfo) -> u64| -> Vec<(Labels, Value)> {
            self.pairs.iter().map(|p| (pair(p), Int(f(p)))).collect()
        };
        let states = self
            .pairs
            .iter()
            .flat_map(|p| {
                PAIR_STATES.iter().map(move |s| {
                    let on = p.state.as_str() == *s;
                    (
                        vec![("pair", p.name.clone()), ("state", s.to_string())],
                        Int(on as u64),
                    )
                })
            })
            .collect();
        family(
            &mut enc,
            "quicksplit_pair_state",
            "1 for the state a pair is in, 0 for the others.",
            Gauge,
            states,
        )?;
        family(
            &mut enc,
            "quicksplit_pair_pending_tracks",
            "Tracks a pair still has to copy.",
            Gauge,
            per_pair(|p| p.pending_tracks),
        )?;
        family(
            &mut enc,
            "quicksplit_pair_changed_tracks",
            "Tracks written on P or S since the split.",
            Gauge,
            per_pair(|p| p.changed_tracks),
        )?;
        family(
            &mut enc,
            "quicksplit_pair_copied_bytes",
            "Bytes a pair's copies wrote.",
            Counter,
            per_pair(|p| p.bytes_copied),
        )?;
        family(
            &mut enc,
            "quicksplit_pair_cow_copies",
            "Tracks copied before a write.",
            Counter,
            per_pair(|p| p.cow_copies),
        )?;
        family(
            &mut enc,
            "quicksplit_pair_host_read_ops",
            "Reads hosts made through a pair.",
            Counter,
            per_pair(|p| p.host_num_read_ops),
        )?;
        family(
            &mut enc,
            "quicksplit_pair_host_write_ops",
            "Writes hosts made through a pair.",
            Counter,
            per_pair(|p| p.host_num_write_ops),
        )?;

        let backup = |b: &BackupInfo| vec![("id", b.id.to_string()), ("pair", b.pair.clone())];
        family(
            &mut enc,
            "quicksplit_backup_done_bytes",
            "Bytes of the image a backup wrote.",
            Gauge,
            self.backups
                .iter()
                .map(|b| (backup(b), Int(b.bytes_done)))
                .collect(),
        )?;
        family(
            &mut enc,
            "quicksplit_backup_size_bytes",
            "Bytes of the image a backup writes.",
            Gauge,
            self.backups
                .iter()
                .map(|b| (backup(b), Int(b.bytes_total)))
                .collect(),
        )?;
        let verify = |v: &VerifyInfo| vec![("id", v.id.to_string()), ("pair", v.pair.clone())];
        family(
            &mut enc,
            "quicksplit_verify_done_bytes",
            "Bytes a verification compared.",
            Gauge,
            self.verifies
                .iter()
                .map(|v| (verify(v), Int(v.bytes_checked)))
                .collect(),
        )?;
        family(
            &mut enc,
            "quicksplit_verify_size_bytes",
            "Bytes a verification compares.",
            Gauge,
            self.verifies
                .iter()
                .map(|v| (verify(v), Int(v.bytes_total)))
                .collect(),
        )?;

        let core = |r: &ReactorTime| vec![("core", r.core.to_string())];
        family(
            &mut enc,
            "quicksplit_reactor_busy_seconds",
            "Time a reactor spent in loop turns that did work.",
            Counter,
            self.reactors
                .iter()
                .map(|r| (core(r), Float(r.busy_ns as f64 / 1e9)))
                .collect(),
        )?;
        family(
            &mut enc,
            "quicksplit_reactor_idle_seconds",
            "Time a reactor spent idle (spinning or parked).",
            Counter,
            self.reactors
                .iter()
                .map(|r| (core(r), Float(r.idle_ns as f64 / 1e9)))
                .collect(),
        )?;
        Ok(())
    }
}

/// The engine's metrics in the Prometheus text format.
pub fn render(engine: &Engine) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Figures::gather(engine)));
    let mut out = String::new();
    // Writing to a String cannot fail; a collector error would leave a partial text, which
    // the encoder does not produce for the figures above.
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        tracing::warn!("metrics could not be encoded");
    }
    out
}

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
