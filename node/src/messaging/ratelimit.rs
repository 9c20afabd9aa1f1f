//! A token bucket, I/O-free: the caller passes `now`.
//!
//! Used per peer on inbound envelopes, so one flooding peer is slowed down while everyone
//! else is served.

use std::time::Instant;

/// Up to `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, rate: u32, now: Instant) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            rate: f64::from(rate),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Whether the bucket would be full at `now` (the peer has been quiet long enough).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, 10, t0);
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), 5);
        // 100 ms later: one more token.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(t1));
        assert!(!b.take(t1));
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(t2)).count(), 5);
        // Time going backwards takes nothing and gives nothing.
        assert!(!b.take(t0));
        assert!(!b.is_full(t2));
        assert!(b.is_full(t2 + Duration::from_secs(1)));
    }
}
