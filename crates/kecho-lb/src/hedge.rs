//! Beyond the paper: when to send an extra copy of a request, how many extra copies to allow, and which of several
//! copies runs. Pure state machines, time passed in.
//!
//! - [`AdaptiveThreshold`]: hedge after the observed p95 wait (a sliding window of recent waits) instead of a fixed
//!   2.5 s, clamped between a floor and a ceiling.
//! - [`Budget`]: caps extra requests at a share of all requests (e.g. 10 %), counted cluster-wide from the
//!   counters every node puts in its load reports, plus a small burst.
//! - [`ClaimTable`]: cancel events. The first server to start a request claims it and tells the others; a claim is
//!   a timestamp and a server id, and the lowest claim wins ties, so exactly one copy runs to completion.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::load::ServerId;

/// Buckets of the wait histogram: bucket `i` holds waits up to `100 µs * 1.25^(i+1)` (about 160 s for the last).
pub const WAIT_BUCKETS: usize = 64;

fn bucket(wait: Duration) -> usize {
    let x = wait.as_secs_f64() / 100e-6;
    if x <= 1.0 {
        return 0;
    }
    ((x.ln() / 1.25f64.ln()) as usize).min(WAIT_BUCKETS - 1)
}

fn bucket_top(i: usize) -> Duration {
    Duration::from_secs_f64(100e-6 * 1.25f64.powi(i as i32 + 1))
}

/// The wait after which to hedge: a quantile of the waits seen recently in the whole cluster. Each node keeps a
/// histogram of its own waits over a sliding window, publishes it in its load reports, and merges the others'
/// (so a node whose own waits are all long still hedges at the cluster's p95, not at its own). Quantiles are
/// read at bucket resolution (25 %, rounded up).
#[derive(Debug, Clone)]
pub struct AdaptiveThreshold {
    quantile: f64,
    horizon: Duration,
    floor: Duration,
    ceiling: Duration,
    min_samples: u64,
    waits: VecDeque<(Instant, usize)>,
    counts: [u32; WAIT_BUCKETS],
    remote: HashMap<ServerId, (Instant, Vec<u32>)>,
}

impl AdaptiveThreshold {
    /// The `quantile` (e.g. 0.95) of the waits seen in the last `horizon`, within `[floor, ceiling]`; `ceiling`
    /// until 20 waits were seen.
    pub fn new(quantile: f64, horizon: Duration, floor: Duration, ceiling: Duration) -> Self {
        AdaptiveThreshold {
            quantile: quantile.clamp(0.0, 1.0),
            horizon,
            floor,
            ceiling: ceiling.max(floor),
            min_samples: 20,
            waits: VecDeque::new(),
            counts: [0; WAIT_BUCKETS],
            remote: HashMap::new(),
        }
    }
    /// Records how long a request waited before it started.
    pub fn record(&mut self, now: Instant, wait: Duration) {
        let b = bucket(wait);
        self.counts[b] += 1;
        self.waits.push_back((now, b));
        self.expire(now);
    }
    /// Another node's histogram, from its load report.
    pub fn set_remote(&mut self, server: ServerId, now: Instant, counts: Vec<u32>) {
        if counts.len() == WAIT_BUCKETS {
            self.remote.insert(server, (now, counts));
        }
    }
    /// This node's histogram of the window, for its load reports.
    pub fn summary(&mut self, now: Instant) -> Vec<u32> {
        self.expire(now);
        self.counts.to_vec()
    }
    /// The threshold at `now`.
    pub fn threshold(&mut self, now: Instant) -> Duration {
        self.expire(now);
        let mut merged = self.counts.map(u64::from);
        self.remote.retain(|_, (t, _)| now.saturating_duration_since(*t) <= self.horizon);
        for (_, c) in self.remote.values() {
            for (m, c) in merged.iter_mut().zip(c) {
                *m += u64::from(*c);
            }
        }
        let total: u64 = merged.iter().sum();
        if total < self.min_samples {
            return self.ceiling;
        }
        let rank = ((total as f64 * self.quantile).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in merged.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_top(i).clamp(self.floor, self.ceiling);
            }
        }
        self.ceiling
    }
    fn expire(&mut self, now: Instant) {
        // Bound memory whatever the rate: the window keeps at most 65536 waits.
        while let Some(&(t, b)) = self.waits.front() {
            if now.saturating_duration_since(t) <= self.horizon && self.waits.len() <= 65536 {
                break;
            }
            self.waits.pop_front();
            self.counts[b] -= 1;
        }
    }
}

/// A cap on extra requests: extra copies may be at most `ratio` of all requests (plus `burst`), counted over the
/// whole cluster. Each node knows its own counts exactly and the others' from their latest load reports.
#[derive(Debug, Clone)]
pub struct Budget {
    ratio: f64,
    burst: f64,
    arrivals: u64,
    extra: u64,
    others: HashMap<ServerId, (u64, u64)>,
}

impl Budget {
    /// At most `ratio` extra requests per request (0.1: 10 % more), with a burst allowance of `burst` copies.
    pub fn new(ratio: f64, burst: u32) -> Self {
        Budget { ratio: ratio.max(0.0), burst: f64::from(burst), arrivals: 0, extra: 0, others: HashMap::new() }
    }
    /// A request arrived here.
    pub fn on_arrival(&mut self) {
        self.arrivals += 1;
    }
    /// Another node's counters, from its load report.
    pub fn on_report(&mut self, server: ServerId, arrivals: u64, extra: u64) {
        let e = self.others.entry(server).or_insert((0, 0));
        // Counters only grow; a stale report must not roll them back.
        e.0 = e.0.max(arrivals);
        e.1 = e.1.max(extra);
    }
    /// Whether one more extra copy fits; if so it is counted.
    pub fn try_spend(&mut self) -> bool {
        let (a, e) = self.others.values().fold((self.arrivals, self.extra), |(a, e), (oa, oe)| (a + oa, e + oe));
        if (e + 1) as f64 <= self.ratio * a as f64 + self.burst {
            self.extra += 1;
            true
        } else {
            false
        }
    }
    /// Extra copies sent from here.
    pub fn spent(&self) -> u64 {
        self.extra
    }
}

/// A claim on a request: when a server started it, and which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    /// Start time in nanoseconds since a common epoch.
    pub ts: u64,
    /// The claiming server (breaks ties between equal timestamps).
    pub server: ServerId,
}

/// What a server learnt of the claims on each request, from its own starts and the cancel events of others.
#[derive(Debug, Default)]
pub struct ClaimTable {
    best: HashMap<u64, (Claim, Instant)>,
    order: VecDeque<(u64, Instant)>,
}

/// The answer to [`ClaimTable::try_claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimResult {
    /// This server may start the request (and must send a cancel event with its claim).
    Won,
    /// Another server claimed it first: skip it.
    Lost(Claim),
}

impl ClaimTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// Before starting `req`: wins unless a lower claim is known.
    pub fn try_claim(&mut self, req: u64, mine: Claim, now: Instant) -> ClaimResult {
        match self.best.get(&req) {
            Some((c, _)) if *c < mine => ClaimResult::Lost(*c),
            _ => {
                self.insert(req, mine, now);
                ClaimResult::Won
            }
        }
    }
    /// A cancel event from another server. Returns true if its claim now wins (a copy running here with a higher
    /// claim must stop).
    pub fn observe(&mut self, req: u64, theirs: Claim, now: Instant) -> bool {
        match self.best.get(&req) {
            Some((c, _)) if *c <= theirs => false,
            _ => {
                self.insert(req, theirs, now);
                true
            }
        }
    }
    /// The winning claim known for `req`.
    pub fn winner(&self, req: u64) -> Option<Claim> {
        self.best.get(&req).map(|(c, _)| *c)
    }
    /// Forgets claims older than `keep`.
    pub fn expire(&mut self, now: Instant, keep: Duration) {
        while let Some(&(req, t)) = self.order.front() {
            if now.saturating_duration_since(t) < keep {
                break;
            }
            self.order.pop_front();
            if self.best.get(&req).is_some_and(|(_, at)| *at == t) {
                self.best.remove(&req);
            }
        }
    }
    fn insert(&mut self, req: u64, c: Claim, now: Instant) {
        self.best.insert(req, (c, now));
        self.order.push_back((req, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_follows_the_p95_of_recent_waits() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = AdaptiveThreshold::new(0.95, ms(1000), ms(10), ms(2500));
        assert_eq!(a.threshold(t0), ms(2500), "the ceiling until enough waits were seen");
        for i in 1..=100u64 {
            a.record(t0, ms(i));
        }
        let p95 = a.threshold(t0);
        assert!(p95 >= ms(95) && p95 <= ms(95) * 5 / 4, "{p95:?}");
        assert_eq!(a.threshold(t0 + ms(1001)), ms(2500), "old waits leave the window");
        for _ in 0..50 {
            a.record(t0 + ms(1001), ms(1));
        }
        assert_eq!(a.threshold(t0 + ms(1001)), ms(10), "the floor");
        // Other nodes' waits count: 1000 short waits elsewhere pull the p95 down to theirs.
        let mut b = AdaptiveThreshold::new(0.95, ms(1000), ms(1), ms(2500));
        for _ in 0..100 {
            b.record(t0, ms(2000));
        }
        let mut other = AdaptiveThreshold::new(0.95, ms(1000), ms(1), ms(2500));
        for _ in 0..1900 {
            other.record(t0, ms(20));
        }
        b.set_remote(ServerId(3), t0, other.summary(t0));
        let t = b.threshold(t0);
        assert!(t >= ms(20) && t <= ms(25), "{t:?}");
    }

    #[test]
    fn budget_caps_extra_requests_cluster_wide() {
        let mut b = Budget::new(0.1, 0);
        for _ in 0..50 {
            b.on_arrival();
        }
        let mine = (0..10).filter(|_| b.try_spend()).count();
        assert_eq!(mine, 5);
        b.on_report(ServerId(7), 50, 0);
        assert_eq!((0..10).filter(|_| b.try_spend()).count(), 5, "others' arrivals widen the budget");
        b.on_report(ServerId(7), 40, 0);
        assert!(!b.try_spend(), "a stale report does not roll counters back");
        assert_eq!(b.spent(), 10);
    }

    #[test]
    fn lowest_claim_wins() {
        let t = Instant::now();
        let c = |ts, s| Claim { ts, server: ServerId(s) };
        let mut table = ClaimTable::new();
        assert_eq!(table.try_claim(1, c(10, 2), t), ClaimResult::Won);
        assert!(!table.observe(1, c(11, 1), t), "a later claim loses");
        assert!(table.observe(1, c(10, 1), t), "an equal timestamp: the lower server id wins");
        assert_eq!(table.try_claim(1, c(12, 3), t), ClaimResult::Lost(c(10, 1)));
        table.expire(t + Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(table.winner(1), None);
    }
}
