//! Heartbeat bookkeeping for one link, with time passed in.
//!
//! A link is alive while something arrives at least once per `timeout`. When nothing has been sent for `interval`, the
//! owner sends a ping so that the far side sees traffic too; the far side answers with a pong.

use std::time::{Duration, Instant};

/// What the owner of a link should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessAction {
    /// Nothing until [`Liveness::deadline`].
    Wait,
    /// Send a ping.
    SendPing,
    /// Nothing arrived for longer than the timeout: the link is dead.
    Dead,
}

/// Heartbeat state of one link.
#[derive(Clone, Debug)]
pub struct Liveness {
    last_rx: Instant,
    last_tx: Instant,
    interval: Duration,
    timeout: Duration,
}

impl Liveness {
    /// A link that just came up at `now`. `timeout` is how long silence is tolerated; pings go out every
    /// `timeout / 3` of idleness, so two pings may be lost before the link is declared dead.
    pub fn new(now: Instant, timeout: Duration) -> Self {
        Liveness { last_rx: now, last_tx: now, interval: timeout / 3, timeout }
    }

    /// Something arrived.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = self.last_rx.max(now);
    }

    /// Something was sent.
    pub fn on_send(&mut self, now: Instant) {
        self.last_tx = self.last_tx.max(now);
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> LivenessAction {
        if now.saturating_duration_since(self.last_rx) >= self.timeout {
            return LivenessAction::Dead;
        }
        if now.saturating_duration_since(self.last_tx) >= self.interval {
            self.last_tx = now;
            return LivenessAction::SendPing;
        }
        LivenessAction::Wait
    }

    /// When [`Liveness::poll`] next has something to say.
    pub fn deadline(&self) -> Instant {
        (self.last_rx + self.timeout).min(self.last_tx + self.interval)
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_link_dies_after_timeout_and_pings_before() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Duration::from_millis(300));
        assert_eq!(l.poll(t0 + Duration::from_millis(50)), LivenessAction::Wait);
        assert_eq!(l.poll(t0 + Duration::from_millis(100)), LivenessAction::SendPing);
        assert_eq!(l.poll(t0 + Duration::from_millis(150)), LivenessAction::Wait);
        assert_eq!(l.poll(t0 + Duration::from_millis(299)), LivenessAction::SendPing);
        assert_eq!(l.poll(t0 + Duration::from_millis(300)), LivenessAction::Dead);
    }

    #[test]
    fn traffic_keeps_link_alive() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Duration::from_millis(300));
        for i in 1..20u64 {
            let now = t0 + Duration::from_millis(i * 200);
            l.on_receive(now);
            assert_ne!(l.poll(now), LivenessAction::Dead);
        }
        assert!(l.deadline() > t0 + Duration::from_millis(3800));
    }
}
