//! `quicksplit top [--socket PATH] [--interval SECS]`: a live view of the engine, like
//! `spdk_top` or `iostat -x 1`. A sampler thread reads the listing RPCs every interval
//! ([`snapshot`]); the screen is a pure function of the last two snapshots ([`model`], fitted
//! by [`fit`]) that [`draw`] puts on the terminal. `q`, Esc and Ctrl-C quit; the terminal is
//! given back as it was on every way out (quit, error, panic, SIGTERM).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::rpc::client::{Client, ClientError};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::Terminal;
use serde_json::{json, Value};

use super::{complain, socket_path, EXIT_CONNECT, EXIT_ERROR, EXIT_USAGE};

mod draw;
mod fit;
mod model;
mod snapshot;
#[cfg(test)]
mod tests;

use snapshot::{Replies, Snapshot};

/// The shortest and longest refresh intervals.
const INTERVAL_RANGE: (f64, f64) = (0.1, 3600.0);

/// How often keys and signals are looked at between refreshes.
const KEY_POLL: Duration = Duration::from_millis(100);

/// `--interval SECS`: seconds between refreshes, a decimal number from 0.1 to 3600.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    let (min, max) = INTERVAL_RANGE;
    if !(min..=max).contains(&secs) {
        return Err(format!("must be from {min} to {max} seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The terminal in raw mode on its alternate screen, with the cursor hidden, until dropped.
struct TerminalMode;

impl TerminalMode {
    fn enter() -> std::io::Result<Self> {
        terminal::enable_raw_mode()?;
        // From here on, dropping the guard undoes whatever part was done.
        let mode = TerminalMode;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(mode)
    }
}

/// Gives the terminal back: main screen, cursor shown, cooked mode. Idempotent.
fn leave_terminal() {
    let _ = execute!(
        std::io::stdout(),
        cursor::Show,
        terminal::LeaveAlternateScreen
    );
    let _ = terminal::disable_raw_mode();
}

impl Drop for TerminalMode {
    fn drop(&mut self) {
        leave_terminal();
    }
}

/// Restores the terminal before a panic's message is printed, so that the message is
/// readable and the shell usable.
fn restore_terminal_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        leave_terminal();
        previous(info);
    }));
}

/// One call: its result, `None` when this engine does not have the method or cannot answer
/// it now, or the connection's failure.
fn call(c: &mut Client, method: &str, notes: &mut Vec<String>) -> Result<Option<Value>, String> {
    match c.call(method, json!({})) {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::Reply { code: -32601, .. }) => Ok(None),
        Err(ClientError::Reply { message, .. }) => {
            notes.push(format!("{method}: {message}"));
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Reads every listing method once.
fn sample(c: &mut Client, at: Duration) -> Result<Snapshot, String> {
    let mut notes = Vec::new();
    let mut get = |method| call(c, method, &mut notes);
    let replies = Replies {
        reactors: get("framework_get_reactors")?,
        bdevs: get("bdev_get_bdevs")?,
        iostat: get("bdev_get_iostat")?,
        nbd: get("nbd_get_exports")?,
        nvmf: get("nvmf_get_exports")?,
        pairs: get("pair_get")?,
        backups: get("backup_get")?,
        verifies: get("verify_get")?,
    };
    let mut snap = Snapshot::from_replies(at, &replies);
    snap.notes.extend(notes);
    Ok(snap)
}

/// Samples every `interval` and sends the outcome until the receiver is gone; a lost
/// connection is made again at the next tick.
fn sampler(
    socket: PathBuf,
    mut client: Option<Client>,
    interval: Duration,
    started: Instant,
    tx: mpsc::Sender<Result<Snapshot, String>>,
) {
    let mut next = Instant::now();
    loop {
        let outcome = match client.as_mut() {
            Some(c) => sample(c, started.elapsed()),
            None => match Client::connect(&socket) {
                Ok(c) => sample(client.insert(c), started.elapsed()),
                Err(e) => Err(e.to_string()),
            },
        };
        if outcome.is_err() {
            client = None;
        }
        if tx.send(outcome).is_err() {
            return;
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            // Late (a slow engine): the next refresh is an interval from now.
            next = now;
        }
    }
}

/// Why the view stopped.
enum Stop {
    /// A quit key.
    Quit,
    /// A signal (its number).
    Signal(usize),
}

/// What the terminal on stdin has for top.
enum Input {
    /// Nothing within the wait (or a signal cut it short).
    None,
    /// Bytes to read.
    Ready,
    /// The terminal hung up.
    HungUp,
}

/// Waits up to `timeout` for input on the terminal: `tty` (the controlling terminal, which
/// the event reader reads when stdin is not a terminal), else stdin.
fn wait_for_input(tty: Option<&std::fs::File>, timeout: Duration) -> Input {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let fd = match tty {
        Some(t) => t.as_fd(),
        None => stdin.as_fd(),
    };
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match poll(&mut fds, Some(&timeout)) {
        Ok(0) | Err(_) => Input::None,
        Ok(_) if fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR) => Input::HungUp,
        Ok(_) => Input::Ready,
    }
}

/// `quicksplit top`.
pub fn top(socket: Option<PathBuf>, interval: Duration) -> i32 {
    // Keys are read from the controlling terminal whatever stdin is; the screen goes to stdout.
    if !std::io::stdout().is_terminal() {
        complain!(
            "top draws on a terminal; for scripts, use `quicksplit status --json` or \
             `quicksplit rpc bdev_get_iostat`"
        );
        return EXIT_USAGE;
    }
    let socket = socket_path(socket);
    let client = match Client::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            complain!("{e}");
            return EXIT_CONNECT;
        }
    };
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        if let Err(e) = signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize) {
            complain!("cannot handle signal {sig}: {e}");
            return EXIT_ERROR;
        }
    }
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let sampler_socket = socket.clone();
    let spawned = std::thread::Builder::new()
        .name("top-sampler".into())
        .spawn(move || sampler(sampler_socket, Some(client), interval, started, tx));
    if let Err(e) = spawned {
        complain!("cannot start the sampler: {e}");
        return EXIT_ERROR;
    }
    restore_terminal_on_panic();
    match run(&socket.display().to_string(), interval, &rx, &signal) {
        Ok(Stop::Quit) => 0,
        Ok(Stop::Signal(sig)) => 128 + sig as i32,
        Err(e) => {
            complain!("terminal: {e}");
            EXIT_ERROR
        }
    }
}

/// The view's loop, on the terminal it takes over and gives back.
fn run(
    socket: &str,
    interval: Duration,
    rx: &mpsc::Receiver<Result<Snapshot, String>>,
    signal: &AtomicUsize,
) -> std::io::Result<Stop> {
    let _mode = TerminalMode::enter()?;
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut prev: Option<Snapshot> = None;
    let mut cur: Option<Snapshot> = None;
    // What is shown until the first snapshot arrives.
    let empty = Snapshot::default();
    let mut error: Option<String> = None;
    let mut dirty = true;
    let tty = if std::io::stdin().is_terminal() {
        None
    } else {
        std::fs::File::open("/dev/tty").ok()
    };
    loop {
        match signal.load(Ordering::Relaxed) {
            0 => {}
            sig => return Ok(Stop::Signal(sig)),
        }
        loop {
            match rx.try_recv() {
                Ok(Ok(snap)) => {
                    prev = cur.replace(snap);
                    error = None;
                    dirty = true;
                }
                Ok(Err(e)) => {
                    error = Some(format!("engine not answering (retrying): {e}"));
                    dirty = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(std::io::Error::other("the sampler stopped"));
                }
            }
        }
        if dirty {
            let frame = model::Frame {
                socket,
                interval,
                error: error.as_deref(),
            };
            let now = cur.as_ref().unwrap_or(&empty);
            term.draw(|f| {
                let area = f.area();
                let lines = model::screen(prev.as_ref(), now, &frame, area.width, area.height);
                draw::draw(f, &lines);
            })?;
            dirty = false;
        }
        // Waits for input here, not in the event reader: a terminal that went away (its window
        // closed, tmux killed) reads as end of input forever, which the reader retries without
        // end. A hang-up ends top as SIGHUP does.
        match wait_for_input(tty.as_ref(), KEY_POLL) {
            Input::HungUp => return Ok(Stop::Signal(signal_hook::consts::SIGHUP as usize)),
            Input::None => continue,
            Input::Ready => {}
        }
        match event::poll(Duration::ZERO) {
            Ok(true) => {}
            Ok(false) => continue,
            // A signal arrived: it is looked at on the next turn.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        match event::read()? {
            Event::Key(k) if k.kind == KeyEventKind::Press => {
                let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers == KeyModifiers::CONTROL;
                if ctrl_c || matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                    return Ok(Stop::Quit);
                }
            }
            Event::Resize(..) => dirty = true,
            _ => {}
        }
    }
}
