//! The built-in IN-filters: [`Dedupe`] (the first response wins) and [`RateLimit`] (a token bucket).

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{hash_value, Fnv, InDecision, InEvent, InFilter, LocalSinks};
use crate::clock::now;

/// Drops an event whose `key` attribute was seen within the last `window`: the first response wins, as in KECho's
/// load balancer. Events without the key pass. At most `capacity` keys are remembered (oldest forgotten first). Time
/// is tokio's clock, so tests can drive it with paused time.
#[derive(Debug)]
pub struct Dedupe {
    key: String,
    window: Duration,
    capacity: usize,
    seen: Mutex<DedupeState>,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct DedupeState {
    at: HashMap<u64, Instant>,
    order: VecDeque<(u64, Instant)>,
}

impl Dedupe {
    /// Duplicates by `key` within `window`.
    pub fn new(key: &str, window: Duration) -> Self {
        Dedupe {
            key: key.to_owned(),
            window,
            capacity: 1 << 16,
            seen: Mutex::new(DedupeState::default()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Duplicates dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Remembers at most `n` keys.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }
}

impl InFilter for Dedupe {
    fn filter(&self, event: &mut InEvent<'_>, _sinks: &LocalSinks<'_>) -> InDecision {
        let Some(v) = event.attrs.get(&self.key) else { return InDecision::Deliver };
        let mut h = Fnv::default();
        hash_value(v, &mut h);
        let key = h.finish();
        let now = now();
        let mut s = self.seen.lock();
        while let Some(&(k, t)) = s.order.front() {
            if now.saturating_duration_since(t) < self.window && s.order.len() < self.capacity {
                break;
            }
            s.order.pop_front();
            if s.at.get(&k) == Some(&t) {
                s.at.remove(&k);
            }
        }
        if let Some(t) = s.at.get(&key) {
            if now.saturating_duration_since(*t) < self.window {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return InDecision::Drop;
            }
        }
        s.at.insert(key, now);
        s.order.push_back((key, now));
        InDecision::Deliver
    }
}

/// Lets through at most `rate` events per second on average, with bursts of up to `burst` (a token bucket), on
/// tokio's clock.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// `rate` events per second, bursts of `burst`.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit { rate: rate.max(0.0), burst, bucket: Mutex::new((burst, now())) }
    }
}

impl InFilter for RateLimit {
    fn filter(&self, _event: &mut InEvent<'_>, _sinks: &LocalSinks<'_>) -> InDecision {
        let now = now();
        let mut b = self.bucket.lock();
        let elapsed = now.saturating_duration_since(b.1).as_secs_f64();
        b.0 = (b.0 + elapsed * self.rate).min(self.burst);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            InDecision::Deliver
        } else {
            InDecision::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use kecho_proto::Attrs;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn dedupe_first_wins_within_window() {
        let d = Dedupe::new("req", Duration::from_millis(200));
        let sinks = LocalSinks { attrs: &[] };
        let run = |id: i64| {
            let mut attrs = Attrs::new().with("req", id);
            d.filter(&mut InEvent { ty: "resp", attrs: &mut attrs, payload: b"" }, &sinks)
        };
        assert_eq!(run(1), InDecision::Deliver);
        assert_eq!(run(1), InDecision::Drop);
        assert_eq!(run(2), InDecision::Deliver);
        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(run(1), InDecision::Drop, "still within the window");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(run(1), InDecision::Deliver);
        assert_eq!(d.dropped(), 2);
        let mut no_key = Attrs::new();
        assert_eq!(d.filter(&mut InEvent { ty: "x", attrs: &mut no_key, payload: b"" }, &sinks), InDecision::Deliver);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_allows_the_burst_then_the_rate() {
        let r = RateLimit::new(2.0, 3);
        let sinks = LocalSinks { attrs: &[] };
        let mut attrs = Attrs::new();
        let mut passed = |n: usize| {
            (0..n)
                .filter(|_| {
                    r.filter(&mut InEvent { ty: "x", attrs: &mut attrs, payload: b"" }, &sinks) == InDecision::Deliver
                })
                .count()
        };
        assert_eq!(passed(10), 3, "the burst");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(passed(10), 2, "two per second after it");
    }
}
