//! kecho's protocol core. It does no I/O: it turns bytes into typed messages and back, and keeps the membership and
//! liveness state machines, with the current time passed in by the caller.
//!
//! - [`access`]: per-channel access control: authorities, credentials (tokens) and policies.
//! - [`codec`]: length-prefixed frames and every message kind, as pure functions over bytes.
//! - [`types`]: identifiers, attribute values and member descriptions shared by all crates.
//! - [`NodeSnapshot`]: what one node contributes to one channel (its members and credential).
//! - [`handshake`]: the decisions of both sides of a connection's handshake, and node identities.
//! - [`liveness`]: heartbeat bookkeeping for one link.
//! - [`membership`]: the per-channel membership state machine (join, leave, contact role, takeover).
//! - [`registry`]: the registry's lease table (the KECho paper's group server).
//!
//! The modules import each other without a circle, lowest first: `types`; `credential` (private, re-exported by
//! `access`); `snapshot`; `access`; `codec` (with `codec::registry`, the registry's wire types); `handshake`,
//! `registry`, `membership`; `liveness` stands alone. ARCHITECTURE.md draws the graph.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod codec;
mod credential;
#[doc(hidden)]
pub mod fuzzing;
pub mod gossip;
pub mod handshake;
pub mod liveness;
pub mod membership;
pub mod probe;
pub mod registry;
mod snapshot;
pub mod types;

pub use codec::{DecodeError, Message, MAX_FRAME_DEFAULT, PROTOCOL_VERSION};
pub use snapshot::NodeSnapshot;
pub use types::*;
