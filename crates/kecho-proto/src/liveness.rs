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

    /// What to do at `now`, for a wake-up that was due at `due` (the [`Liveness::deadline`] the owner slept until).
    ///
    /// A wake-up late by half a ping interval or more means this process did not run for that long (its threads
    /// starved of CPU, a long computation on them): whatever the peer sent meanwhile may be waiting unread, so its
    /// silence is not the peer's fault. The peer then gets one more ping interval to be heard from before the link is
    /// declared dead, unless it has been silent for twice the timeout (so that a process that is late all the time
    /// still finds dead peers).
    pub fn poll_due(&mut self, now: Instant, due: Instant) -> LivenessAction {
        let late = now.saturating_duration_since(due);
        let silent = now.saturating_duration_since(self.last_rx);
        if late >= self.interval / 2 && silent < 2 * self.timeout {
            if let Some(floor) = (now + self.interval).checked_sub(self.timeout) {
                self.last_rx = self.last_rx.max(floor);
            }
        }
        self.poll(now)
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
    fn a_late_wake_up_gives_the_peer_one_more_interval() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut l = Liveness::new(t0, Duration::from_millis(300));
        l.on_send(ms(250));
        // Due at 300 (the timeout), woken at 420: this process stalled; the peer's frames may be unread.
        assert_eq!(l.poll_due(ms(420), ms(300)), LivenessAction::SendPing);
        assert!(l.deadline() <= ms(520));
        // Nothing came within the extra interval, and this wake-up is on time: dead.
        assert_eq!(l.poll_due(ms(520), ms(520)), LivenessAction::Dead);
        // On time, the timeout holds exactly.
        let mut l = Liveness::new(t0, Duration::from_millis(300));
        l.on_send(ms(299));
        assert_eq!(l.poll_due(ms(300), ms(300)), LivenessAction::Dead);
        // A process late all the time still finds a peer silent for twice the timeout dead.
        let mut l = Liveness::new(t0, Duration::from_millis(300));
        l.on_send(ms(590));
        assert_eq!(l.poll_due(ms(600), ms(400)), LivenessAction::Dead);
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
