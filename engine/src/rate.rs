//! A token bucket for pollers that must not exceed a byte rate (the copier's `copy_rate`, a
//! backup's or a verification's `rate`). It never sleeps: a poller that must wait asks its
//! reactor to poll it again when enough tokens will have accumulated. And the rate a background
//! job goes at while hosts use its pair.

use std::time::{Duration, Instant};

use crate::reactor::ReactorContext;

/// Bytes allowed so far, topped up at the rate as time passes; at most one second's worth (or
/// one request) is saved up.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self {
            tokens: 0.0,
            refilled: Instant::now(),
        }
    }
}

impl TokenBucket {
    /// True when `bytes` may go now at `rate` bytes per second (0 = no limit) and takes them;
    /// otherwise asks `cx` to poll again when they will be there.
    pub fn take(&mut self, cx: &mut ReactorContext, rate: u64, bytes: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let now = Instant::now();
        let add = now.duration_since(self.refilled).as_secs_f64() * rate as f64;
        self.refilled = now;
        self.tokens = (self.tokens + add).min((rate as f64).max(bytes as f64));
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            return true;
        }
        let wait = (bytes as f64 - self.tokens) / rate as f64;
        cx.wake_at(now + Duration::from_secs_f64(wait.min(0.1)));
        false
    }

    /// Empties the bucket: a limit that applies again later starts from nothing instead of
    /// the tokens gathered while it did not apply.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The rate a background job (a backup, a verification) goes at, bytes per second (0 = no
/// limit): `rate` always, and no more than `host_rate` while hosts use the pair.
pub fn effective_rate(rate: u64, host_rate: u64, hosts_active: bool) -> u64 {
    match (rate, host_rate) {
        (r, h) if h == 0 || !hosts_active => r,
        (0, h) => h,
        (r, h) => r.min(h),
    }
}

#[cfg(test)]
mod tests {
    use super::effective_rate;

    #[test]
    fn host_rate_applies_only_while_hosts_are_active_and_never_raises_rate() {
        // Alone: the job's own limit (none, or `rate`).
        assert_eq!(effective_rate(0, 100, false), 0);
        assert_eq!(effective_rate(50, 100, false), 50);
        // With hosts: `host_rate`, or `rate` when that is lower.
        assert_eq!(effective_rate(0, 100, true), 100);
        assert_eq!(effective_rate(500, 100, true), 100);
        assert_eq!(effective_rate(50, 100, true), 50);
        // `host_rate` 0: no yield.
        assert_eq!(effective_rate(0, 0, true), 0);
        assert_eq!(effective_rate(50, 0, true), 50);
    }
}
