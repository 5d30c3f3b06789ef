//! The exception ladder (pure): what a flow does about a fault, rung by rung, after the paper's section 3.
//!
//! 1. Retry a transient fault (a refused or dropped connection), with backoff, `retries` times; a dropped
//!    connection is resumed at the offset the peer reports when the endpoint has `resume`.
//! 2. Redirect to the next alternate destination given in the spec (`alt=`), with a fresh retry budget.
//! 3. Notify the application (callback and an event on a channel) and let it decide: retry once more or give up.
//! 4. Fall back to the copying path when the zero-copy path is unavailable (splice unsupported for the file type).
//! 5. Terminate the flow and notify. Corrupt input to a decrypting flow goes straight here: it is never retried
//!    (the bytes would be the same) and never written out.

use std::time::Duration;

/// What went wrong, as far as the ladder cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FaultKind {
    /// Connecting failed or an established connection dropped: may go away.
    Connection,
    /// The zero-copy path is not available for this pair of objects.
    FastPathUnsupported,
    /// The data is bad (authentication failure, corrupt frame): retrying cannot help.
    Data,
    /// Anything else (a file cannot be opened, a sandboxed transform trapped).
    Fatal,
}

/// What the application answers when notified (rung 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try the endpoint again (one more round of retries on the current destination).
    Retry,
    /// Stop the flow.
    Terminate,
}

/// The ladder's verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    /// Rung 1: try again after this long.
    Retry {
        /// Attempt number (1-based) on the current destination.
        attempt: u32,
        /// Wait first.
        after: Duration,
    },
    /// Rung 2: switch to alternate number `n` (0-based in the spec's `alt=` list).
    Redirect {
        /// Which alternate.
        n: usize,
    },
    /// Rung 3: ask the application; call [`Ladder::decided`] with its answer.
    Notify,
    /// Rung 4: use the copying path from now on.
    Fallback,
    /// Rung 5: stop the flow.
    Terminate,
}

/// Per-endpoint ladder state.
#[derive(Debug, Clone)]
pub struct Ladder {
    retries: u32,
    attempts: u32,
    alternates: usize,
    next_alt: usize,
    asked: bool,
}

impl Ladder {
    /// A ladder for an endpoint with `retries` retries and `alternates` alternate destinations.
    pub fn new(retries: u32, alternates: usize) -> Self {
        Ladder { retries, attempts: 0, alternates, next_alt: 0, asked: false }
    }

    /// The action for `fault`.
    pub fn on_fault(&mut self, fault: FaultKind) -> Action {
        match fault {
            FaultKind::FastPathUnsupported => Action::Fallback,
            FaultKind::Data | FaultKind::Fatal => Action::Terminate,
            FaultKind::Connection => {
                if self.attempts < self.retries {
                    self.attempts += 1;
                    return Action::Retry { attempt: self.attempts, after: crate::spec::backoff(self.attempts - 1) };
                }
                if self.next_alt < self.alternates {
                    self.next_alt += 1;
                    self.attempts = 0;
                    return Action::Redirect { n: self.next_alt - 1 };
                }
                if !self.asked {
                    self.asked = true;
                    return Action::Notify;
                }
                Action::Terminate
            }
        }
    }

    /// The application's answer to [`Action::Notify`]: the next action.
    pub fn decided(&mut self, d: Decision) -> Action {
        match d {
            Decision::Retry => {
                self.attempts = 0;
                self.asked = false;
                self.on_fault(FaultKind::Connection)
            }
            Decision::Terminate => Action::Terminate,
        }
    }

    /// A success: the retry budget of the current destination is restored.
    pub fn succeeded(&mut self) {
        self.attempts = 0;
        self.asked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn climbs_rung_by_rung() {
        let mut l = Ladder::new(2, 1);
        assert!(matches!(l.on_fault(FaultKind::Connection), Action::Retry { attempt: 1, .. }));
        assert!(matches!(l.on_fault(FaultKind::Connection), Action::Retry { attempt: 2, .. }));
        assert_eq!(l.on_fault(FaultKind::Connection), Action::Redirect { n: 0 });
        assert!(matches!(l.on_fault(FaultKind::Connection), Action::Retry { attempt: 1, .. }));
        assert!(matches!(l.on_fault(FaultKind::Connection), Action::Retry { attempt: 2, .. }));
        assert_eq!(l.on_fault(FaultKind::Connection), Action::Notify);
        assert!(matches!(l.decided(Decision::Retry), Action::Retry { attempt: 1, .. }));
        l.on_fault(FaultKind::Connection);
        assert_eq!(l.on_fault(FaultKind::Connection), Action::Notify);
        assert_eq!(l.decided(Decision::Terminate), Action::Terminate);
    }

    #[test]
    fn success_restores_the_budget_and_data_faults_terminate() {
        let mut l = Ladder::new(1, 0);
        assert!(matches!(l.on_fault(FaultKind::Connection), Action::Retry { .. }));
        l.succeeded();
        assert!(matches!(l.on_fault(FaultKind::Connection), Action::Retry { .. }));
        assert_eq!(l.on_fault(FaultKind::Connection), Action::Notify);
        assert_eq!(l.on_fault(FaultKind::Connection), Action::Terminate);
        assert_eq!(Ladder::new(5, 5).on_fault(FaultKind::Data), Action::Terminate);
        assert_eq!(Ladder::new(5, 5).on_fault(FaultKind::FastPathUnsupported), Action::Fallback);
    }
}
