//! Per-user token buckets, owned by the room actor (no locks).

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

/// The limit's settings; a rate of 0 disables it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Bucket size.
    pub burst: f64,
}

impl RateLimit {
    /// Whether the limit is off.
    pub fn disabled(&self) -> bool {
        self.per_sec <= 0.0
    }
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            tokens: limit.burst.max(1.0),
            last: now,
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * limit.per_sec).min(limit.burst.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / limit.per_sec))
        }
    }

    /// Whether the bucket is full again (so it can be forgotten).
    pub fn is_full(&self, limit: RateLimit, now: Instant) -> bool {
        self.tokens + now.duration_since(self.last).as_secs_f64() * limit.per_sec >= limit.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let l = RateLimit {
            per_sec: 10.0,
            burst: 20.0,
        };
        let t = Instant::now();
        let mut b = TokenBucket::new(l, t);
        for _ in 0..20 {
            assert!(b.take(l, t).is_ok());
        }
        let wait = b.take(l, t).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(90));
        assert!(b.take(l, t + Duration::from_millis(100)).is_ok());
        assert!(b.is_full(l, t + Duration::from_secs(3)));
    }
}
