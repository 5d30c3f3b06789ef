//! Resource management on kecho channels, after 2K's resource management service and KECho's first example.
//!
//! An [`Agent`] per host (2K's Local Resource Manager) measures its host, publishes its attributes on the channel
//! `kecho.resources` as soft state with a lifetime, and runs admission control against its own [`Ledger`]: it
//! answers QoS requests with offers held for a short time, and turns a confirmed offer into a leased reservation.
//! Any node can hold a [`View`] of the cluster (2K's Global Resource Manager: an approximate view built from the
//! reports; no single process holds it). A [`Requester`] sends a [`Spec`] (amounts, a CEL requirement over agents'
//! attributes, a rank, a lease, a count) as an event that the source's OUT-filter sends only to agents whose
//! attributes satisfy it, collects offers, confirms the best by rank and response time and declines the rest.
//!
//! The decisions are pure and take the time as an input ([`ledger`], [`negotiate`], [`view`]); the agent, the
//! view and the requester are a thin tokio layer over kecho channels. See docs/RESOURCES.md.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod error;
pub mod expr;
pub mod ledger;
pub mod measure;
pub mod negotiate;
pub mod types;
pub mod view;
pub mod watch;
pub mod wire;

pub use agent::{Agent, AgentConfig};
pub use client::{Held, Requester, Reservation, Spec};
pub use error::{Error, ParseError, Result};
pub use expr::{Rank, Requirement};
pub use ledger::{Ledger, LedgerConfig, LedgerError, Refusal};
pub use types::{Amounts, HolderId, ReservationId};
pub use view::{ClusterView, Report};
pub use watch::View;
