//! The `quicksplit` binary.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use engine::app::Engine;
use engine::logging::LogFormat;
use engine::reactor::{IdlePolicy, ReactorOptions};

/// Exit code for usage errors.
const EXIT_USAGE: i32 = 2;

#[derive(Parser)]
#[command(
    name = "quicksplit",
    version,
    about = "Mirrored volumes with instant split and point-in-time backups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Call one JSON-RPC method and print its result.
    Rpc {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Method name, e.g. pair_get.
        method: String,
        /// Parameters: a JSON object, @FILE to read it from a file, or - to read it from stdin.
        params: Option<String>,
    },
    /// Split one or more pairs at one common instant.
    Split {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Pairs to split.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Back up a split pair's image to a target: file:PATH, tape:PATH[:RECORD_SIZE],
    /// nbd:URI, nvmf:TRADDR:PORT:NQN, or a JSON target object.
    Backup {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The pair.
        pair: String,
        /// Where to.
        #[arg(long)]
        to: String,
        /// wait, reflect or merge.
        #[arg(long, default_value = "merge")]
        mode: String,
        /// Wait for the end, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Throughput limit (bytes per second, e.g. 100M), so hosts keep the disk's attention.
        #[arg(long, default_value = "0", value_parser = engine::units::parse_size)]
        rate: u64,
        /// Once the backup is done, the pair gets a checkpoint of this name at the image's
        /// split (see `quicksplit rpc checkpoint_list`).
        #[arg(long)]
        checkpoint: Option<String>,
        /// An incremental backup: only the tracks changed since this checkpoint of the pair,
        /// written onto a target that holds the checkpoint's image (or, on tape, an archive to
        /// restore after the checkpoint's).
        #[arg(long)]
        since: Option<String>,
        /// Compute the image's flat SHA-256 besides its sha256-tree digest (one stream: the
        /// backup goes no faster than one core hashes).
        #[arg(long)]
        flat_sha256: bool,
    },
    /// Print a file's or block device's sha256-tree digest, the one a backup of that image
    /// reports (hashed by several threads).
    Digest {
        /// The file or block device.
        file: PathBuf,
        /// Hashing threads (default: one per CPU, at most 16).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: Option<u16>,
    },
    /// Restore a tape archive, or a full archive and then its incrementals in order, to a file
    /// or block device, verifying every checksum. A file is written as PATH.partial and renamed
    /// to PATH once verified.
    Restore {
        /// The archive (a file or tape device), or a chain of archive files: the full archive,
        /// then each incremental onto the one before it.
        #[arg(required = true, num_args = 1..)]
        archives: Vec<PathBuf>,
        /// Where the image goes.
        #[arg(long)]
        to: PathBuf,
        /// Replace an existing file, or write a block device in place (never a file or device
        /// another process has locked).
        #[arg(long)]
        force: bool,
        /// Record size the archive was written with.
        #[arg(long, default_value_t = 262_144)]
        record_size: usize,
    },
    /// Show pairs, backups and verifications.
    Status {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print pair_get, backup_get and verify_get as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Resynchronise a split or suspended pair: P onto S, or with --reverse S onto P.
    Resync {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The pair.
        pair: String,
        /// Copy S onto P (restore P from the image).
        #[arg(long)]
        reverse: bool,
        /// Copy every track, not only the changed ones.
        #[arg(long)]
        full: bool,
        /// Wait until the pair is in PAIR, with progress.
        #[arg(long)]
        wait: bool,
    },
    /// Compare P and S where a mirrored pair holds them equal; with --repair, copy the
    /// mismatched tracks again.
    Verify {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The pair.
        pair: String,
        /// Make mismatched tracks pending so that the copier copies them P to S again.
        #[arg(long)]
        repair: bool,
        /// Bytes of the volume compared per second, e.g. 100M (0: the engine's default).
        #[arg(long, default_value = "0", value_parser = engine::units::parse_size)]
        rate: u64,
        /// Wait for the end, with progress; exit 1 when mismatches were found and not repaired.
        #[arg(long)]
        wait: bool,
    },
    /// A live view of reactors, bdevs, exports, pairs and jobs (backups and verifications),
    /// refreshed every interval; q, Esc or Ctrl-C quits.
    Top {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Seconds between refreshes (0.1 to 3600).
        #[arg(long, default_value = "1", value_parser = cli::top::parse_interval)]
        interval: Duration,
    },
    /// Cancel a running backup or verification.
    Cancel {
        /// RPC socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The job's id.
        id: u64,
    },
    /// Run the engine.
    Serve {
        /// Configuration to start from (what save_config returns).
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSON-RPC socket (default: <state-dir>/rpc.sock for the embedded default, else
        /// /var/tmp/quicksplit.sock).
        #[arg(long)]
        rpc_socket: Option<PathBuf>,
        /// Where volumes, metadata and sockets live.
        #[arg(long, default_value = "./quicksplit-state")]
        state_dir: PathBuf,
        /// Cores for reactors, e.g. 0-1.
        #[arg(long, default_value = "0")]
        cores: String,
        /// How idle reactors wait.
        #[arg(long, default_value = "adaptive")]
        idle: IdlePolicy,
        /// Serve Prometheus metrics on HOST:PORT (GET /metrics); off by default.
        #[arg(long, value_parser = parse_metrics_address)]
        metrics: Option<std::net::SocketAddr>,
        /// Do not count I/O statistics (bdev_get_iostat, export and pair figures stay 0).
        #[arg(long)]
        no_stats: bool,
        /// Log lines on stderr: text, or json (one JSON object per line).
        #[arg(long, default_value = "text")]
        log_format: LogFormat,
    },
}

mod cli;

fn parse_metrics_address(s: &str) -> Result<std::net::SocketAddr, String> {
    engine::metrics::parse_address(s).map_err(|e| e.to_string())
}

fn read_config(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("--config {}: not JSON: {e}", path.display()))
}

/// What the embedded default serves and how to use it. A stdout that is gone (`serve | head`)
/// loses the text; the engine goes on serving.
fn print_welcome(socket: &std::path::Path, nbd: &std::path::Path) {
    use std::fmt::Write as _;
    let mut text = String::new();
    macro_rules! w {
        ($($arg:tt)*) => {{
            let _ = writeln!(text, $($arg)*);
        }};
    }
    let s = socket.display();
    let n = nbd.display();
    w!("quicksplit is serving its embedded default:");
    w!("  bdevs p0 and s0 (sparse 1 GiB files), paired as pair0 (initial copy running)");
    w!("  NBD exports p0 (read-write, mirrored to s0) and pair0-image (read-only) on {n}");
    w!("  JSON-RPC on {s}");
    w!("");
    w!("Measure it with fio:");
    w!("  fio --name=t --ioengine=nbd --uri='nbd+unix:///p0?socket={n}' --rw=randwrite --bs=4k \\");
    w!("      --iodepth=32 --size=1g --time_based --runtime=10");
    w!("Copy data in and out with qemu-img or nbdcopy:");
    w!("  qemu-img convert -n -O raw disk.raw 'nbd+unix:///p0?socket={n}'");
    w!("  nbdcopy 'nbd+unix:///pair0-image?socket={n}' image.raw");
    w!("");
    w!("Split, back up, resync:");
    w!("  quicksplit split pair0 --socket {s}");
    w!("  quicksplit backup pair0 --to tape:/var/tmp/pair0.tar --wait --socket {s}");
    w!("  quicksplit restore /var/tmp/pair0.tar --to restored.img");
    w!("  quicksplit status --socket {s}");
    w!("  quicksplit rpc --socket {s} pair_get");
    w!("  quicksplit resync pair0 --wait --socket {s}");
    w!("Stop with Ctrl-C.");
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn main() {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    };
    engine::logging::init(log_format);
    let code = match cli.command {
        Command::Rpc {
            socket,
            method,
            params,
        } => cli::rpc(socket, &method, params.as_deref()),
        Command::Split { socket, pairs } => cli::split(socket, &pairs),
        Command::Status { socket, json } => cli::status(socket, json),
        Command::Resync {
            socket,
            pair,
            reverse,
            full,
            wait,
        } => cli::resync(
            socket,
            &cli::ResyncArgs {
                pair: &pair,
                reverse,
                full,
                wait,
            },
        ),
        Command::Verify {
            socket,
            pair,
            repair,
            rate,
            wait,
        } => cli::verify(
            socket,
            &cli::VerifyArgs {
                pair: &pair,
                repair,
                rate,
                wait,
            },
        ),
        Command::Cancel { socket, id } => cli::cancel(socket, id),
        Command::Top { socket, interval } => cli::top::top(socket, interval),
        Command::Backup {
            socket,
            pair,
            to,
            mode,
            wait,
            rate,
            flat_sha256,
            checkpoint,
            since,
        } => cli::backup(
            socket,
            &cli::BackupArgs {
                pair: &pair,
                to: &to,
                mode: &mode,
                wait,
                rate,
                flat_sha256,
                checkpoint: checkpoint.as_deref(),
                since: since.as_deref(),
            },
        ),
        Command::Digest { file, threads } => cli::digest(&file, threads.map(usize::from)),
        Command::Restore {
            archives,
            to,
            force,
            record_size,
        } => cli::restore(&archives, &to, record_size, force),
        Command::Serve {
            config,
            rpc_socket,
            state_dir,
            cores,
            idle,
            metrics,
            no_stats,
            ..
        } => {
            drivers::iostat::set_enabled(!no_stats);
            serve(config, rpc_socket, state_dir, &cores, idle, metrics)
        }
    };
    std::process::exit(code);
}

/// `--config` replaces what the state directory held: pair metadata there that the new
/// configuration does not name belongs to a pair that is no longer served, which is worth a
/// word (its bitmaps and split point are kept until the file is removed).
fn warn_about_unnamed_pairs(engine: &Engine) {
    let dir = engine.state_dir().join("pairs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".meta"))
        else {
            continue;
        };
        if engine.pair(name).is_err() {
            tracing::warn!(
                pair = name,
                metadata = %path.display(),
                "the state directory holds metadata of pair '{name}', which --config does not \
                 name: the pair is not served (add it to the configuration to bring it back, or \
                 remove the file)"
            );
        }
    }
}

fn serve(
    config: Option<PathBuf>,
    rpc_socket: Option<PathBuf>,
    state_dir: PathBuf,
    cores: &str,
    idle: IdlePolicy,
    metrics: Option<std::net::SocketAddr>,
) -> i32 {
    let cores = match engine::topology::parse_cpu_list(cores) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quicksplit: --cores: {e}");
            return EXIT_USAGE;
        }
    };
    let topo = engine::topology::Topology::detect();
    if let Some(c) = cores.iter().find(|c| !topo.has_cpu(**c)) {
        eprintln!("quicksplit: --cores: core {c} does not exist on this machine");
        return EXIT_USAGE;
    }
    let config = match config.map(|p| read_config(&p)).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quicksplit: {e}");
            return EXIT_USAGE;
        }
    };
    // Bound before anything starts: a port in use stops `serve` here.
    let metrics = match metrics
        .map(engine::metrics::MetricsListener::bind)
        .transpose()
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("quicksplit: {e}");
            return 1;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            eprintln!("quicksplit: cannot handle signal {sig}: {e}");
            return 1;
        }
    }
    let opts = ReactorOptions {
        cores,
        idle,
        inbox_size: 1024,
    };
    raise_open_file_limit();
    // A killed predecessor's files (its split journal, bdevs, pair metadata) stay locked until
    // the kernel has torn down its io_uring rings, a moment after it is gone: opening them
    // waits for that while the engine starts (and a file really in use elsewhere is refused
    // that much later).
    drivers::file_lock::set_lock_patience(RESTART_LOCK_PATIENCE);
    let engine = match Engine::start(&opts, &state_dir) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("quicksplit: {e}");
            return 1;
        }
    };
    let socket = match (&rpc_socket, &config) {
        (Some(s), _) => s.clone(),
        (None, None) => state_dir.join("rpc.sock"),
        (None, Some(_)) => PathBuf::from("/var/tmp/quicksplit.sock"),
    };
    let embedded = config.is_none();
    // A state directory that holds a configuration brings it back (the embedded default's
    // included); `--config` replaces it.
    let (config, origin) = match config {
        Some(c) => (Some(c), "--config"),
        None => match engine::app::config_store::read_kept(&state_dir) {
            Ok(Some(c)) => (Some(c), "the state directory's configuration"),
            Ok(None) => (None, "the embedded default"),
            Err(e) => {
                eprintln!("quicksplit: the state directory's configuration: {e}");
                return 1;
            }
        },
    };
    let restored = restore_configuration(&engine, config, origin);
    drivers::file_lock::set_lock_patience(Duration::ZERO);
    if let Err(code) = restored {
        return code;
    }
    let server = match engine::rpc::RpcServer::start(Arc::clone(&engine), &socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("quicksplit: RPC socket {}: {e}", socket.display());
            return 1;
        }
    };
    let metrics = match metrics.map(|m| {
        let at = m.local_addr();
        m.serve(Arc::clone(&engine)).map(|s| (s, at))
    }) {
        Some(Ok((server, at))) => {
            if let Some(at) = at {
                tracing::info!(address = %at, "metrics served at http://{at}/metrics");
            }
            Some(server)
        }
        Some(Err(e)) => {
            eprintln!("quicksplit: {e}");
            return 1;
        }
        None => None,
    };
    tracing::info!(
        state_dir = %state_dir.display(),
        rpc = %socket.display(),
        reactors = engine.reactors().len(),
        "quicksplit serving"
    );
    if embedded && engine.pair("pair0").is_ok() {
        print_welcome(&socket, &engine.state_dir().join("nbd.sock"));
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stopping");
    drop(metrics);
    drop(server);
    // A clean stop keeps each pair's state and bitmaps for the restart.
    engine.stop_exports();
    engine.persist_pairs_for_stop();
    match Arc::try_unwrap(engine) {
        Ok(engine) => drop(engine),
        Err(_) => tracing::warn!("engine still referenced at exit"),
    }
    0
}

/// How long a restart waits for a file of its configuration that is still locked.
const RESTART_LOCK_PATIENCE: Duration = Duration::from_secs(3);

/// Applies the configuration the engine starts from (or the embedded default); the exit code
/// when that fails.
fn restore_configuration(
    engine: &Arc<Engine>,
    config: Option<serde_json::Value>,
    origin: &str,
) -> Result<(), i32> {
    match config {
        Some(c) => {
            if let Err(e) = engine::rpc::methods::apply_config(engine, c) {
                eprintln!("quicksplit: {origin}: {}", e.message);
                return Err(1);
            }
            tracing::info!("configuration restored from {origin}");
            if origin == "--config" {
                warn_about_unnamed_pairs(engine);
            }
        }
        None => {
            if let Err(e) = engine.create_default() {
                eprintln!("quicksplit: embedded default: {e}");
                return Err(1);
            }
            if let Err(e) = engine.persist_config() {
                eprintln!("quicksplit: saving the configuration: {e}");
                return Err(1);
            }
        }
    }
    Ok(())
}

/// Lifts the soft limit on open files to the hard one: every bdev and pair metadata file is an
/// open file, and an appliance serves thousands of volumes.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    limit.current = limit.maximum;
    if let Err(err) = setrlimit(Resource::Nofile, limit) {
        tracing::warn!(%err, "could not raise the open file limit");
    }
}
