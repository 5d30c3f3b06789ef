//! The flow scheduler's decisions (pure: loads and time are passed in).
//!
//! - [`bottleneck`]: which stage bounds a flow: the one with the most busy time per replica.
//! - [`plan_replicas`]: whether and how far to replicate a stateless stage that bounds its flow.
//! - [`Reorder`]: puts the output of replicated stages back in input order.
//! - [`TokenBucket`]: a flow's rate limit.
//! - [`fair_shares`]: splits a shared byte budget among flows by priority (weighted max-min fairness).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the scheduler knows of one stage (endpoints count as stages: reading and writing take time too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageLoad {
    /// Time the stage spent working (summed over its replicas).
    pub busy: Duration,
    /// True if the stage can run on independent chunks in parallel.
    pub stateless: bool,
    /// Replicas now.
    pub replicas: usize,
}

/// The stage that bounds the flow: the largest busy time per replica. `None` for no stages or no work yet.
pub fn bottleneck(loads: &[StageLoad]) -> Option<usize> {
    let per = |l: &StageLoad| l.busy.as_nanos() / l.replicas.max(1) as u128;
    loads.iter().enumerate().filter(|(_, l)| !l.busy.is_zero()).max_by_key(|(_, l)| per(l)).map(|(i, _)| i)
}

/// Busy fraction (per replica, of the flow's wall time) below which no stage is said to bound the flow: the flow
/// is idle, waiting for input, and which stage spent a few microseconds more is noise.
pub const IDLE_BELOW: f64 = 0.02;

/// The stage that bounds a flow that has run for `wall`: the [`bottleneck`], unless even it was busy for less than
/// [`IDLE_BELOW`] of the time (then `None`: the flow is idle).
pub fn bound(loads: &[StageLoad], wall: Duration) -> Option<usize> {
    let i = bottleneck(loads)?;
    let l = loads[i];
    let busy = l.busy.as_secs_f64() / l.replicas.max(1) as f64;
    (!wall.is_zero() && busy >= IDLE_BELOW * wall.as_secs_f64()).then_some(i)
}

/// Busy fraction above which a bounding stage is worth replicating.
pub const REPLICATE_ABOVE: f64 = 0.6;

/// Decides how many replicas the bounding stage should have: a stateless stage busy for more than
/// [`REPLICATE_ABOVE`] of `wall` per replica gets as many replicas as would bring each to about half busy, at most
/// `cores`. Returns `(stage, replicas)` when that differs from now.
pub fn plan_replicas(loads: &[StageLoad], wall: Duration, cores: usize) -> Option<(usize, usize)> {
    let i = bottleneck(loads)?;
    let l = loads[i];
    if !l.stateless || wall.is_zero() {
        return None;
    }
    let busy = l.busy.as_secs_f64() / wall.as_secs_f64();
    let per_replica = busy / l.replicas.max(1) as f64;
    if per_replica < REPLICATE_ABOVE {
        return None;
    }
    // Each replica should be about 60% busy at the current rate; the others stages then bound the flow.
    let want = ((busy / REPLICATE_ABOVE).ceil() as usize).clamp(1, cores.max(1));
    (want > l.replicas).then_some((i, want))
}

/// Reassembles items numbered 0, 1, 2, ... that arrive in any order.
#[derive(Debug)]
pub struct Reorder<T> {
    next: u64,
    held: BTreeMap<u64, T>,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Reorder { next: 0, held: BTreeMap::new() }
    }
}

impl<T> Reorder<T> {
    /// Starts at sequence number `next`.
    pub fn starting_at(next: u64) -> Self {
        Reorder { next, held: BTreeMap::new() }
    }

    /// Accepts item `seq`; items already released or duplicates are refused (returned).
    pub fn push(&mut self, seq: u64, item: T) -> Result<(), T> {
        if seq < self.next || self.held.contains_key(&seq) {
            return Err(item);
        }
        self.held.insert(seq, item);
        Ok(())
    }

    /// The next item in order, if it has arrived.
    pub fn pop(&mut self) -> Option<T> {
        let item = self.held.remove(&self.next)?;
        self.next += 1;
        Some(item)
    }

    /// Items waiting for an earlier one.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The sequence number expected next.
    pub fn next_seq(&self) -> u64 {
        self.next
    }
}

/// A token bucket: `rate` bytes per second with a burst of `burst` bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket { rate: rate.max(1) as f64, burst, tokens: burst, last: now }
    }

    /// The rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Changes the rate (keeps the tokens).
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1) as f64;
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` bytes' worth at `now`; returns how long the caller must wait before sending them (zero: at once).
    /// The debt is recorded, so the caller sends after the wait without calling again.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Splits `budget` bytes/s among flows with `(priority, demand)` (demand: what the flow would use, or its own rate
/// limit): weighted max-min fairness. A flow never gets more than its demand; what it leaves is shared by the rest
/// in proportion to priority.
pub fn fair_shares(budget: u64, flows: &[(u32, u64)]) -> Vec<u64> {
    let mut share = vec![0u64; flows.len()];
    let mut open: Vec<usize> = (0..flows.len()).filter(|&i| flows[i].1 > 0).collect();
    let mut left = budget;
    while !open.is_empty() && left > 0 {
        let weight: u64 = open.iter().map(|&i| u64::from(flows[i].0.max(1))).sum();
        let mut satisfied = Vec::new();
        let mut given = 0;
        for &i in &open {
            let fair = (u128::from(left) * u128::from(flows[i].0.max(1)) / u128::from(weight)) as u64;
            let want = flows[i].1 - share[i];
            if want <= fair {
                share[i] += want;
                given += want;
                satisfied.push(i);
            }
        }
        if satisfied.is_empty() {
            // Nobody is capped by demand: split what is left by weight and stop.
            for &i in &open {
                share[i] += (u128::from(left) * u128::from(flows[i].0.max(1)) / u128::from(weight)) as u64;
            }
            break;
        }
        left -= given;
        open.retain(|i| !satisfied.contains(i));
    }
    share
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn load(ms: u64, stateless: bool, replicas: usize) -> StageLoad {
        StageLoad { busy: Duration::from_millis(ms), stateless, replicas }
    }

    #[test]
    fn the_busiest_stage_per_replica_bounds() {
        let l = [load(100, false, 1), load(900, true, 1), load(300, false, 1)];
        assert_eq!(bottleneck(&l), Some(1));
        let l = [load(100, false, 1), load(900, true, 4), load(300, false, 1)];
        assert_eq!(bottleneck(&l), Some(2));
        assert_eq!(bottleneck(&[load(0, true, 1)]), None);
    }

    #[test]
    fn an_idle_flow_has_no_bound() {
        // 100 KB through a flow that then waits for more input: microseconds of work in 10 s.
        let l = [load(0, false, 1), load(1, true, 1), load(0, false, 1)];
        assert_eq!(bound(&l, Duration::from_secs(10)), None);
        assert_eq!(bound(&l, Duration::ZERO), None);
        let l = [load(100, false, 1), load(900, true, 1), load(300, false, 1)];
        assert_eq!(bound(&l, Duration::from_secs(1)), Some(1));
        // The busiest stage: 900 ms in 10 s is 9% busy, in 100 s under the 2% threshold.
        assert_eq!(bound(&l, Duration::from_secs(10)), Some(1));
        assert_eq!(bound(&l, Duration::from_secs(100)), None);
    }

    #[test]
    fn replicate_only_a_busy_stateless_bound() {
        let wall = Duration::from_secs(1);
        assert_eq!(plan_replicas(&[load(200, false, 1), load(950, true, 1)], wall, 2), Some((1, 2)));
        assert_eq!(plan_replicas(&[load(200, false, 1), load(950, true, 1)], wall, 8), Some((1, 2)));
        assert_eq!(plan_replicas(&[load(200, false, 1), load(950, false, 1)], wall, 8), None);
        assert_eq!(plan_replicas(&[load(200, false, 1), load(400, true, 1)], wall, 8), None);
        assert_eq!(plan_replicas(&[load(200, false, 1), load(950, true, 2)], wall, 2), None);
        assert_eq!(plan_replicas(&[load(950, true, 1)], wall, 1), None);
    }

    #[test]
    fn token_bucket_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert_eq!(b.take(100, t0), Duration::ZERO);
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // After the wait the debt is paid.
        assert_eq!(b.take(0, t0 + Duration::from_millis(500)), Duration::ZERO);
    }

    #[test]
    fn shares_follow_priority_and_demand() {
        assert_eq!(fair_shares(300, &[(1, 1000), (2, 1000)]), vec![100, 200]);
        assert_eq!(fair_shares(300, &[(1, 50), (2, 1000)]), vec![50, 250]);
        assert_eq!(fair_shares(300, &[(1, 50), (2, 60)]), vec![50, 60]);
        assert_eq!(fair_shares(300, &[(1, 0), (2, 1000)]), vec![0, 300]);
    }

    proptest! {
        #[test]
        fn reorder_releases_in_order(perm in Just((0u64..200).collect::<Vec<_>>()).prop_shuffle()) {
            let mut r = Reorder::default();
            let mut out = Vec::new();
            for s in perm {
                r.push(s, s).unwrap();
                while let Some(x) = r.pop() { out.push(x); }
            }
            prop_assert_eq!(out, (0u64..200).collect::<Vec<_>>());
            prop_assert_eq!(r.held(), 0);
            prop_assert!(r.push(5, 5).is_err());
        }

        #[test]
        fn shares_never_exceed_budget_or_demand(budget in 0u64..1_000_000,
                flows in proptest::collection::vec((1u32..10, 0u64..500_000), 0..8)) {
            let s = fair_shares(budget, &flows);
            prop_assert!(s.iter().sum::<u64>() <= budget);
            for (x, f) in s.iter().zip(&flows) { prop_assert!(*x <= f.1); }
            // Work-conserving: if demand exceeds the budget, at most rounding is left unused.
            let demand: u64 = flows.iter().map(|f| f.1).sum();
            prop_assert!(s.iter().sum::<u64>() + flows.len() as u64 >= budget.min(demand));
        }
    }
}
