//! Load distribution over kecho channels, after KECho's cluster load balancer (Poellabauer et al., sections 2.3,
//! 4 and 5.4) and the load-distribution patterns (Front-End Dispatcher, Cooperating Servers, Smart Clients).
//!
//! - [`load`]: the load monitor (a load index from CPU, queue, connections and memory), its reports on a
//!   monitoring channel (push, periodic and on change) and the soft-state table that ages silent nodes out.
//! - [`alloc`]: server allocators, pure policy: round robin, weighted random, schedule, hash affinity, n least
//!   loaded, power of two choices.
//! - [`hedge`]: the adaptive hedging threshold, the budget of extra requests and the claim rule of cancel events.
//! - [`mechanism`]: KECho's mechanism on a data channel: the load-aware OUT-filter and the event formats; the
//!   IN-filter is `FirstResponse` (kecho's `Dedupe` on tokio's clock).
//! - [`balance`]: a load balancer to run (`kecho balance`): a front end over a pool given by URL or discovered
//!   from a channel's sinks, health from channel membership.
//! - [`http`]: dispatchers over HTTP: the front end (proxy or redirect, with affinity), cooperating servers and
//!   the smart client.
//! - [`overhead`]: counters of the time spent on load balancing (monitoring, handling reports, filtering,
//!   forwarding).
//!
//! The web-farm experiment that drives all of this (`kecho webfarm`) is the crate `kecho-webfarm`; this crate has no
//! command-line or plotting dependencies.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alloc;
pub mod balance;
pub mod error;
pub mod hedge;
pub mod http;
pub mod load;
pub mod mechanism;
pub mod overhead;

pub use error::{LbError, Result};
