//! Errors of the resource layer.

use kecho::filter::FilterError;

/// Text that is not what it should be (an amount list, a reservation id, a wire attribute).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ParseError { message: message.into() }
    }
}

/// Errors of agents, views and requesters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The channel layer failed (node stopped, channel closed, bad credentials).
    #[error(transparent)]
    Channel(#[from] kecho::Error),
    /// A requirement or rank expression does not compile; says where.
    #[error("{which} expression: {source}\n{}", source.caret())]
    Expr {
        /// `require` or `rank`.
        which: &'static str,
        /// The position and the problem.
        source: FilterError,
    },
    /// Malformed input (amounts, ids, configuration).
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// No agent admitted the request; the reason says what was missing and the best that was on offer.
    #[error("{reason}")]
    Unsatisfied {
        /// Why, for people: "no agent has mem_free >= 8.0 GB; best offer 6.1 GB on b".
        reason: String,
    },
    /// The agent refused an operation on a reservation (unknown, lapsed, would exceed capacity).
    #[error("{id}: {reason}")]
    Refused {
        /// The reservation.
        id: String,
        /// The agent's reason.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer from {what} within {ms} ms")]
    Timeout {
        /// What was asked.
        what: String,
        /// How long we waited.
        ms: u64,
    },
    /// The requester or agent was shut down.
    #[error("stopped")]
    Stopped,
    /// Bad configuration (a static attribute that shadows a measured one, a capacity that cannot be known).
    #[error("configuration: {0}")]
    Config(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
