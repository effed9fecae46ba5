//! Progress of a job the CLI waits for (`backup --wait`, `verify --wait`, `resync --wait`,
//! `restore`): bytes, rate, elapsed time and ETA on stdout, redrawn in place on a terminal and
//! as plain lines (one every few seconds) otherwise; and what Ctrl-C means while waiting.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::say;

/// A byte count for people: `512.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A duration for people: `42.0 s`, `3 min 05 s`, `2 h 07 min`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{:.1} s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// How often a plain progress line is printed when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One job's progress display.
pub struct Progress {
    label: String,
    started: Instant,
    terminal: bool,
    last_plain: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// A display for `label` (e.g. "backup 4"), its clock starting now.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            started: Instant::now(),
            terminal: std::io::stdout().is_terminal(),
            last_plain: None,
            drawn: false,
        }
    }

    /// The line for `done` of `total` bytes (total 0: unknown) after `elapsed`.
    pub fn line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let mut line = format!("{label}: {}", human_bytes(done));
        if total > 0 {
            line += &format!(
                " of {} ({:.1}%)",
                human_bytes(total),
                100.0 * done as f64 / total as f64
            );
        }
        line += &format!(
            ", {}/s, elapsed {}",
            human_bytes(rate as u64),
            human_duration(elapsed)
        );
        if total > 0 && done < total && rate > 0.0 {
            let eta = Duration::from_secs_f64((total - done) as f64 / rate);
            line += &format!(", ETA {}", human_duration(eta));
        }
        line
    }

    /// Shows `done` of `total` bytes: redrawn on a terminal, a plain line now and then
    /// otherwise.
    pub fn update(&mut self, done: u64, total: u64) {
        let line = Self::line(&self.label, done, total, self.started.elapsed());
        if self.terminal {
            // Clear to the end of the line: the new text may be shorter.
            super::write_stdout(format_args!("\r{line}\x1b[K"));
            self.drawn = true;
        } else if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            say!("{line}");
            self.last_plain = Some(Instant::now());
        }
    }

    /// Ends the display with the final figures on a line of their own.
    pub fn finish(&mut self, done: u64, total: u64) {
        let line = Self::line(&self.label, done, total, self.started.elapsed());
        if self.terminal {
            super::write_stdout(format_args!("\r{line}\x1b[K\n"));
        } else {
            say!("{line}");
        }
        self.drawn = false;
    }

    /// Ends a redrawn line so that what follows starts on a line of its own.
    pub fn break_line(&mut self) {
        if self.drawn {
            say!();
            self.drawn = false;
        }
    }
}

/// Ctrl-C while the CLI waits for a job: the job goes on in the engine, and the user is told
/// so and how to stop it.
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

/// Exit status after Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

impl Interrupt {
    /// Catches SIGINT from now on (without it, Ctrl-C kills the CLI silently).
    pub fn catch() -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&flag))
        {
            super::complain!("cannot catch Ctrl-C: {e}");
        }
        Self { flag }
    }

    /// True once Ctrl-C was pressed.
    pub fn pressed(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Says that `job` goes on and how to stop it (`stop`: a command line, or None when it
    /// cannot be cancelled); the exit status.
    pub fn leave(&self, progress: &mut Progress, job: &str, stop: Option<&str>) -> i32 {
        progress.break_line();
        match stop {
            Some(cmd) => {
                super::complain!("stopped waiting; {job} goes on in the engine (`{cmd}` stops it)")
            }
            None => super::complain!("stopped waiting; {job} goes on in the engine"),
        }
        EXIT_INTERRUPTED
    }
}

/// Sleeps `d` in short steps, returning early when Ctrl-C is pressed.
pub fn nap(d: Duration, interrupt: &Interrupt) {
    let end = Instant::now() + d;
    while Instant::now() < end && !interrupt.pressed() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_has_bytes_share_rate_elapsed_and_eta() {
        let line = Progress::line("backup 4", 512 << 20, 1 << 30, Duration::from_secs(2));
        assert_eq!(
            line,
            "backup 4: 512.0 MiB of 1.0 GiB (50.0%), 256.0 MiB/s, elapsed 2.0 s, ETA 2.0 s"
        );
        // Done, or no total known: no ETA.
        let line = Progress::line("restore", 3 << 30, 0, Duration::from_secs(125));
        assert_eq!(line, "restore: 3.0 GiB, 24.6 MiB/s, elapsed 2 min 05 s");
    }

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(Duration::from_secs(7322)), "2 h 02 min");
    }
}
