//! What an NVMe/TCP admin queue costs to bring up: TCP connect, ICReq/ICResp, Connect and,
//! with keys, DH-HMAC-CHAP, timed one after another from quicksplit's initiator. Prints the
//! median and the 99th percentile.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use drivers::nvmf::auth::{DhchapSecret, HostKeys};
use drivers::nvmf::fabrics::CNTLID_DYNAMIC;
use drivers::nvmf::host::{HostOptions, SyncQueue};

#[derive(Parser)]
#[command(about = "Time NVMe/TCP admin queue connects, with or without DH-HMAC-CHAP")]
struct Args {
    /// Target address.
    #[arg(long, default_value = "127.0.0.1")]
    traddr: String,
    /// Target port.
    #[arg(long)]
    port: u16,
    /// Subsystem NQN.
    #[arg(long)]
    nqn: String,
    /// Host NQN.
    #[arg(long)]
    hostnqn: String,
    /// A file holding the host's DHHC-1 secret.
    #[arg(long)]
    dhchap_key: Option<std::path::PathBuf>,
    /// A file holding the controller's DHHC-1 secret (bidirectional).
    #[arg(long)]
    dhchap_ctrl_key: Option<std::path::PathBuf>,
    /// Connects to time.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn secret(path: &std::path::Path) -> Result<DhchapSecret, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    DhchapSecret::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(args: &Args) -> Result<(), String> {
    let mut opts = HostOptions::new(&args.traddr, args.port, &args.nqn);
    opts.hostnqn = args.hostnqn.clone();
    if let Some(k) = &args.dhchap_key {
        opts.dhchap = Some(Arc::new(HostKeys {
            key: secret(k)?,
            ctrl_key: args.dhchap_ctrl_key.as_deref().map(secret).transpose()?,
        }));
    }
    let mut times = Vec::with_capacity(args.count);
    for _ in 0..args.count.max(1) {
        let t = Instant::now();
        let q = SyncQueue::connect(&opts, 0, 32, CNTLID_DYNAMIC, 0).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        drop(q);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let (median, p99) = (at(0.5), at(0.99));
    if args.json {
        println!(
            "{}",
            serde_json::json!({"connects": times.len(), "median_us": median, "p99_us": p99})
        );
    } else {
        println!(
            "{} connects: median {median:.0} us, p99 {p99:.0} us",
            times.len()
        );
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("nvmf-connect: {e}");
        std::process::exit(1);
    }
}
