//! The library's errors.

/// What can go wrong in load distribution.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LbError {
    /// A schedule file could not be read.
    #[error("cannot read schedule file {path}: {source}")]
    ScheduleIo {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line of a schedule is malformed.
    #[error("schedule {path}, line {line}: {why}")]
    Schedule {
        /// The file (or `<text>`).
        path: String,
        /// Line number, from 1.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// An allocation policy spec could not be parsed.
    #[error("invalid policy {spec:?}: {why} (expected rr, weighted, schedule:FILE, hash, least:N or p2c)")]
    Policy {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// An argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// No server is available for a request.
    #[error("no server available")]
    NoServer,
    /// An event channel operation failed.
    #[error(transparent)]
    Kecho(#[from] kecho::Error),
    /// An HTTP exchange failed.
    #[error("http: {0}")]
    Http(String),
    /// An I/O operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with [`LbError`].
pub type Result<T, E = LbError> = std::result::Result<T, E>;
