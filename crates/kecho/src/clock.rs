//! The node's one clock.

use std::time::Instant;

/// The current time as the protocol core wants it. Taken from tokio's clock so that tests with paused time work.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
