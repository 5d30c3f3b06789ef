//! Priorities and deadlines of events: what a source says about how urgent an event is and how long it is worth
//! delivering. Plain data; the submit path (`channel::source`) turns them into an outbox lane and an expiry, the
//! receiving side into an `Event` deadline.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An event's priority, 0 (the default, lowest) to [`Priority::MAX`]. At the source's outbox and on the link, an
/// event overtakes every queued event of lower priority from other sources; events of one source never overtake
/// each other (a higher-priority event waits behind its own source's earlier events that are still queued).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u8);

impl Priority {
    /// The highest priority.
    pub const MAX: u8 = 3;
    /// The default, lowest priority.
    pub const DEFAULT: Priority = Priority(0);
    /// The highest priority.
    pub const HIGHEST: Priority = Priority(Self::MAX);

    /// Priority `level` (0 to [`Priority::MAX`]).
    pub fn new(level: u8) -> Result<Self, InvalidPriority> {
        if level > Self::MAX {
            return Err(InvalidPriority(level));
        }
        Ok(Priority(level))
    }

    /// Its level, 0 to [`Priority::MAX`].
    pub fn level(self) -> u8 {
        self.0
    }
}

/// A priority level above [`Priority::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("priority {0} is out of range (0 to {max})", max = Priority::MAX)]
pub struct InvalidPriority(pub u8);

/// How an event is sent: its priority, its deadline and whether it is best-effort, for one event ([`crate::Source::submit_with`]) or as a
/// source's default for an event type ([`crate::Source::set_type_options`]). What an event's options leave unset
/// comes from its type's options, then from the source's ([`crate::Source::set_options`]); unset everywhere, an
/// event has the default priority and no deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventOptions {
    priority: Option<Priority>,
    deadline: Option<Duration>,
    best_effort: Option<bool>,
}

impl EventOptions {
    /// Nothing set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The event's priority.
    pub fn priority(mut self, p: Priority) -> Self {
        self.priority = Some(p);
        self
    }

    /// The event must reach its sinks' receivers within `d` of its submission: one that is later is not sent (or
    /// not delivered), and each sink it was meant for is told with [`crate::RecvError::Expired`]. Across hosts this
    /// assumes synchronised clocks (the deadline travels as a wall-clock time).
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Best-effort delivery (`true`) or reliable (`false`, the default). Over a QUIC link, a best-effort event that
    /// fits in one QUIC datagram is sent as one, outside the link's stream: it never waits for a retransmission or
    /// behind the stream's backlog, and may be lost. Losses are still reported (each sink gets
    /// [`crate::RecvError::Lagged`] in its place), and a sink still gets a source's events in submission order (one
    /// that arrives after a later one was delivered is dropped and counted in that report). Larger events, events
    /// for a node with a sink of the Block policy, and every event on other transports travel reliably as before.
    /// Declared per type with [`crate::Source::set_type_options`] or for a whole source with
    /// [`crate::Source::set_options`], which also tell the channel's members (the source's attribute
    /// [`BEST_EFFORT_ATTR`]).
    pub fn best_effort(mut self, on: bool) -> Self {
        self.best_effort = Some(on);
        self
    }

    /// Whether best-effort delivery is set, if it is.
    pub fn best_effort_set(&self) -> Option<bool> {
        self.best_effort
    }

    /// The priority set, if any.
    pub fn priority_set(&self) -> Option<Priority> {
        self.priority
    }

    /// The deadline set, if any.
    pub fn deadline_set(&self) -> Option<Duration> {
        self.deadline
    }

    /// These options, with what they leave unset taken from `fallback`.
    pub(crate) fn or(self, fallback: EventOptions) -> EventOptions {
        EventOptions {
            priority: self.priority.or(fallback.priority),
            deadline: self.deadline.or(fallback.deadline),
            best_effort: self.best_effort.or(fallback.best_effort),
        }
    }
}

/// The attribute through which a source tells the channel's members which of its event types it sends best-effort
/// ([`EventOptions::best_effort`]): a string, `*` when all of them (the source's own options say so), else the type
/// names separated by commas; absent when none.
pub const BEST_EFFORT_ATTR: &str = "kecho.best_effort";

/// `at` in microseconds since the Unix epoch (0 before it), the deadline's form on the wire.
pub(crate) fn unix_us(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_fall_back_field_by_field() {
        let ty = EventOptions::new().priority(Priority::HIGHEST).best_effort(true);
        let src = EventOptions::new().priority(Priority::DEFAULT).deadline(Duration::from_millis(5)).best_effort(false);
        let got = EventOptions::new().or(ty).or(src);
        assert_eq!(got.priority_set(), Some(Priority::HIGHEST));
        assert_eq!(got.deadline_set(), Some(Duration::from_millis(5)));
        assert_eq!(got.best_effort_set(), Some(true));
        assert_eq!(EventOptions::new().best_effort(false).or(ty).best_effort_set(), Some(false));
        assert_eq!(Priority::new(Priority::MAX + 1), Err(InvalidPriority(Priority::MAX + 1)));
        assert_eq!(unix_us(UNIX_EPOCH + Duration::from_micros(7)), 7);
    }
}
