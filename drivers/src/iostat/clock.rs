//! The tick counter I/O latencies are measured in, as SPDK measures them: the CPU's time stamp
//! counter on x86_64 (about 10 ns to read, against 25 ns for `clock_gettime`), nanoseconds of
//! a monotonic clock elsewhere. [`tick_rate`] says how many ticks make a second.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the tick rate is measured against the monotonic clock, once per process.
const CALIBRATION: Duration = Duration::from_millis(20);

/// The current tick count.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn ticks() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no operands and touches no memory. Every x86_64 CPU
    // has it, and with an invariant TSC (constant_tsc, nonstop_tsc) it advances at one rate on
    // every core.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The current tick count.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub fn ticks() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Ticks per second. Measured once, on the first call (it sleeps 20 ms then): call it when
/// the engine starts so that no request waits for it.
pub fn tick_rate() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(measure_rate)
}

#[cfg(target_arch = "x86_64")]
fn measure_rate() -> u64 {
    let (t0, c0) = (Instant::now(), ticks());
    std::thread::sleep(CALIBRATION);
    let (c1, t1) = (ticks(), Instant::now());
    let ns = t1.duration_since(t0).as_nanos().max(1);
    let rate = u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / ns;
    // Round to kHz: the pairing of the two clocks is good to well under a microsecond.
    (rate as u64 / 1000 * 1000).max(1)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_rate() -> u64 {
    let _ = CALIBRATION;
    1_000_000_000
}

/// `ticks` as microseconds.
pub fn ticks_to_us(ticks: u64) -> f64 {
    ticks as f64 * 1e6 / tick_rate() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_advance_at_the_measured_rate() {
        let rate = tick_rate();
        assert!(rate >= 1_000_000, "tick rate {rate}");
        // Against the monotonic clock the rate was measured with: within 2% on some try (a
        // thread preempted between its two clock reads skews one try, not all of them).
        let mut tries = Vec::new();
        for _ in 0..5 {
            let (t0, c0) = (Instant::now(), ticks());
            std::thread::sleep(Duration::from_millis(50));
            let (c1, t1) = (ticks(), Instant::now());
            let measured = (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64();
            tries.push(measured / rate as f64);
            if (measured / rate as f64 - 1.0).abs() < 0.02 {
                return;
            }
        }
        panic!("tick rate {rate}: measured/rate over five tries {tries:?}");
    }
}
