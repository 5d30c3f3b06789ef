//! The experiment's errors.

use kecho_lb::LbError;

/// What can go wrong running the web-farm experiment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebfarmError {
    /// An argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The farm (its nodes, channels, load monitoring or forwarding) failed.
    #[error(transparent)]
    Lb(#[from] LbError),
    /// Writing the outputs failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A plot could not be drawn.
    #[error("plot {path}: {why}")]
    Plot {
        /// The output file.
        path: String,
        /// Why.
        why: String,
    },
}

/// Result with [`WebfarmError`].
pub type Result<T, E = WebfarmError> = std::result::Result<T, E>;
