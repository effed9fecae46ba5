//! The `quicksplit` binary.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use engine::app::Engine;
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
    },
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUICKSPLIT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let code = match cli.command {
        Command::Serve {
            config,
            rpc_socket: _,
            state_dir,
            cores,
            idle,
        } => serve(config, state_dir, &cores, idle),
    };
    std::process::exit(code);
}

fn serve(config: Option<PathBuf>, state_dir: PathBuf, cores: &str, idle: IdlePolicy) -> i32 {
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
    if config.is_some() {
        eprintln!("quicksplit: --config is not supported by this build yet");
        return EXIT_USAGE;
    }
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
    let engine = match Engine::start(&opts, &state_dir) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("quicksplit: {e}");
            return 1;
        }
    };
    if let Err(e) = engine.create_default() {
        eprintln!("quicksplit: embedded default: {e}");
        return 1;
    }
    tracing::info!(
        state_dir = %state_dir.display(),
        reactors = engine.reactors().len(),
        "quicksplit serving the embedded default: bdevs p0 and s0"
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stopping");
    match Arc::try_unwrap(engine) {
        Ok(engine) => drop(engine),
        Err(_) => tracing::warn!("engine still referenced at exit"),
    }
    0
}
