//! The restart decision of `kecho run --restart`, pure: time is passed in.
//!
//! - `never`: the task runs once; whatever happens is reported to the submitter.
//! - `on-failure`: a task that fails (non-zero exit, death by signal) is restarted in place, with exponential
//!   backoff; a task whose node is lost or drained is restarted on another agent at once.
//! - `on-node-loss`: only the loss or drain of the task's node restarts it, on another agent (the Cooperating Peers
//!   case: the owner reclaims the workstation and the task moves on, from its last checkpoint); the task's own exit
//!   ends it.
//!
//! A task that succeeds, or that the submitter stopped, is never restarted. A task restarted more than `max_restarts`
//! times within `window` is given up (a crash loop, or a task that takes every node down with it). Backoff resets
//! once a run has lasted `reset_after`.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// When a task is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    #[default]
    Never,
    /// When it fails (in place) or its node is lost (elsewhere).
    OnFailure,
    /// Only when its node is lost or drained (elsewhere).
    OnNodeLoss,
}

/// A restart policy name that is not `never`, `on-failure` or `on-node-loss`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a restart policy (never, on-failure, on-node-loss)")]
pub struct UnknownRestartPolicy(pub String);

impl FromStr for RestartPolicy {
    type Err = UnknownRestartPolicy;

    fn from_str(s: &str) -> Result<RestartPolicy, UnknownRestartPolicy> {
        match s {
            "never" => Ok(RestartPolicy::Never),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "on-node-loss" => Ok(RestartPolicy::OnNodeLoss),
            _ => Err(UnknownRestartPolicy(s.to_owned())),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::OnNodeLoss => "on-node-loss",
        })
    }
}

/// How a run of a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Ending {
    /// The process ended with this status (128 + N for signal N).
    Exited(i32),
    /// The submitter stopped it.
    Stopped,
    /// Its node died (the agent's heartbeats stopped).
    NodeLost,
    /// Its node was drained (its owner reclaimed it).
    Drained,
}

/// What to do after a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// The task is over; report `Ending` to the submitter.
    Finished,
    /// Restart it on the same agent after `after`.
    RestartInPlace {
        /// The backoff delay.
        after: Duration,
    },
    /// Restart it on another agent (from its last checkpoint) after `after`.
    RestartElsewhere {
        /// The delay (none for a node loss: it was not the task's fault).
        after: Duration,
    },
    /// It was restarted too often; stop trying.
    GiveUp {
        /// Restarts within the window.
        restarts: u32,
    },
}

/// Backoff and crash-loop settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartLimits {
    /// The first in-place restart's delay.
    pub initial_backoff: Duration,
    /// The largest delay.
    pub max_backoff: Duration,
    /// A run that lasted this long resets the backoff.
    pub reset_after: Duration,
    /// At most this many restarts within `window`.
    pub max_restarts: u32,
    /// The window of `max_restarts`.
    pub window: Duration,
}

impl Default for RestartLimits {
    fn default() -> RestartLimits {
        RestartLimits {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            max_restarts: 10,
            window: Duration::from_secs(600),
        }
    }
}

/// The restart bookkeeping of one task.
#[derive(Debug, Clone)]
pub struct Restarts {
    policy: RestartPolicy,
    limits: RestartLimits,
    recent: VecDeque<Instant>,
    failures_in_a_row: u32,
    total: u32,
}

impl Restarts {
    /// Bookkeeping for a task with this policy.
    pub fn new(policy: RestartPolicy, limits: RestartLimits) -> Restarts {
        Restarts { policy, limits, recent: VecDeque::new(), failures_in_a_row: 0, total: 0 }
    }

    /// How many times the task has been restarted.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Decides what follows a run that started at `started` and ended as `ending` at `now`; a restart is counted.
    pub fn decide(&mut self, ending: Ending, started: Instant, now: Instant) -> Decision {
        let ran = now.saturating_duration_since(started);
        if ran >= self.limits.reset_after {
            self.failures_in_a_row = 0;
        }
        let wanted = match (ending, self.policy) {
            (Ending::Stopped | Ending::Exited(0), _) | (_, RestartPolicy::Never) => None,
            (Ending::Exited(_), RestartPolicy::OnFailure) => {
                self.failures_in_a_row += 1;
                let shift = (self.failures_in_a_row - 1).min(20);
                let backoff = self.limits.initial_backoff.saturating_mul(1 << shift).min(self.limits.max_backoff);
                Some(Decision::RestartInPlace { after: backoff })
            }
            (Ending::Exited(_), RestartPolicy::OnNodeLoss) => None,
            (Ending::NodeLost | Ending::Drained, RestartPolicy::OnFailure | RestartPolicy::OnNodeLoss) => {
                Some(Decision::RestartElsewhere { after: Duration::ZERO })
            }
        };
        let Some(decision) = wanted else { return Decision::Finished };
        while self.recent.front().is_some_and(|t| now.saturating_duration_since(*t) > self.limits.window) {
            self.recent.pop_front();
        }
        if self.recent.len() as u32 >= self.limits.max_restarts {
            return Decision::GiveUp { restarts: self.recent.len() as u32 };
        }
        self.recent.push_back(now);
        self.total += 1;
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn policy_table() {
        let t0 = Instant::now();
        let t1 = t0 + ms(10);
        let case = |p: RestartPolicy, e: Ending| Restarts::new(p, RestartLimits::default()).decide(e, t0, t1);
        use Decision::*;
        use Ending::*;
        use RestartPolicy::*;
        for p in [Never, OnFailure, OnNodeLoss] {
            assert_eq!(case(p, Exited(0)), Finished, "{p}: success ends");
            assert_eq!(case(p, Stopped), Finished, "{p}: a stop by the submitter ends");
        }
        assert_eq!(case(Never, Exited(1)), Finished);
        assert_eq!(case(Never, NodeLost), Finished);
        assert_eq!(case(OnFailure, Exited(137)), RestartInPlace { after: ms(100) });
        assert_eq!(case(OnFailure, NodeLost), RestartElsewhere { after: Duration::ZERO });
        assert_eq!(case(OnNodeLoss, Exited(1)), Finished);
        assert_eq!(case(OnNodeLoss, NodeLost), RestartElsewhere { after: Duration::ZERO });
        assert_eq!(case(OnNodeLoss, Drained), RestartElsewhere { after: Duration::ZERO });
        assert_eq!("on-node-loss".parse::<RestartPolicy>(), Ok(OnNodeLoss));
        assert_eq!("always".parse::<RestartPolicy>(), Err(UnknownRestartPolicy("always".into())));
    }

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_long_run() {
        let limits = RestartLimits { max_restarts: 100, ..RestartLimits::default() };
        let mut r = Restarts::new(RestartPolicy::OnFailure, limits);
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..12 {
            let start = now;
            now += ms(5);
            match r.decide(Ending::Exited(1), start, now) {
                Decision::RestartInPlace { after } => delays.push(after),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(&delays[..4], &[ms(100), ms(200), ms(400), ms(800)]);
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(30));
        let start = now;
        now += Duration::from_secs(61);
        assert_eq!(r.decide(Ending::Exited(1), start, now), Decision::RestartInPlace { after: ms(100) });
        assert_eq!(r.total(), 13);
    }

    #[test]
    fn a_crash_loop_is_given_up_and_the_window_slides() {
        let limits = RestartLimits { max_restarts: 3, window: Duration::from_secs(10), ..RestartLimits::default() };
        let mut r = Restarts::new(RestartPolicy::OnNodeLoss, limits);
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(matches!(r.decide(Ending::NodeLost, t0, t0 + ms(i)), Decision::RestartElsewhere { .. }));
        }
        assert_eq!(r.decide(Ending::NodeLost, t0, t0 + ms(5)), Decision::GiveUp { restarts: 3 });
        // Eleven seconds later the old restarts have left the window.
        assert!(matches!(
            r.decide(Ending::Drained, t0, t0 + Duration::from_secs(11)),
            Decision::RestartElsewhere { .. }
        ));
    }

    proptest! {
        #[test]
        fn never_more_restarts_in_a_window_than_allowed(
            gaps in proptest::collection::vec(0u64..3000, 1..200),
            max in 1u32..8,
        ) {
            let limits = RestartLimits { max_restarts: max, window: Duration::from_secs(5), ..RestartLimits::default() };
            let mut r = Restarts::new(RestartPolicy::OnFailure, limits);
            let t0 = Instant::now();
            let mut now = t0;
            let mut restarts: Vec<Instant> = Vec::new();
            for g in gaps {
                let start = now;
                now += ms(g);
                match r.decide(Ending::Exited(2), start, now) {
                    Decision::RestartInPlace { after } => {
                        prop_assert!(after <= limits.max_backoff);
                        restarts.push(now);
                    }
                    Decision::GiveUp { .. } => {}
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
                let in_window = restarts.iter().filter(|t| now.saturating_duration_since(**t) <= limits.window).count();
                prop_assert!(in_window as u32 <= max);
            }
        }
    }
}
