//! A token bucket for pollers that must not exceed a byte rate (the copier's `copy_rate`, a
//! backup's `rate`). It never sleeps: a poller that must wait asks its reactor to poll it again
//! when enough tokens will have accumulated.

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
