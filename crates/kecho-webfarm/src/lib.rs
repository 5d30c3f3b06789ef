//! KECho's web-farm experiment (Poellabauer et al., section 5.4), extended: the harness that drives `kecho-lb`'s
//! allocators, hedging, load monitoring and forwarding mechanism on real kecho nodes, and reports on them.
//!
//! - [`farm`]: simulated web servers on real kecho nodes (in one process, over loopback), in every distribution mode.
//! - [`webfarm`]: the sweep (`kecho webfarm`): arrival traces, the ideal queue as the bound, every mode at every
//!   rate, the overhead runs, the table, CSV and plots.
//!
//! It lives apart from `kecho-lb` so that a user of the load-distribution library does not compile clap or plotters.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod farm;
pub mod webfarm;

pub use error::{Result, WebfarmError};
pub use webfarm::{demo_webfarm, run_webfarm, Frequencies, WebfarmArgs};
