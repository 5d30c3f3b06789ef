//! The registry's wire types: what its requests ask for and what its replies carry. They are plain data; their byte
//! layout is encoded and decoded with every other message in the parent module.

use crate::types::{ChannelId, NodeId};

/// What a registry claim asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimMode {
    /// Create the entry; fails if a live entry with this name exists.
    Create,
    /// Renew the caller's lease (re-creating the entry if the registry forgot it, e.g. after a restart); fails if
    /// another node holds the contact role.
    Renew,
    /// Take over the contact role from `old`, which has left or died; fails if the holder is not `old`.
    Takeover(NodeId),
}

/// A registry entry as the registry reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct RegEntry {
    /// Channel name.
    pub name: String,
    /// Channel id.
    pub channel: ChannelId,
    /// The node that holds the contact role.
    pub contact: NodeId,
    /// Its address.
    pub addr: String,
    /// Sources in the channel, as last reported by the contact.
    pub sources: u32,
    /// Sinks in the channel, as last reported by the contact.
    pub sinks: u32,
    /// Milliseconds until the lease expires.
    pub expires_in_ms: u64,
}

/// Error codes in registry replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegErrorCode {
    /// No live entry with that name.
    UnknownChannel,
    /// A live entry with that name exists already.
    Exists,
    /// The caller does not hold the contact role (or the expected holder changed).
    NotContact,
    /// The request was invalid.
    Invalid,
    /// This replica of a replicated registry is not its leader; the message is the leader's address when known
    /// (empty otherwise): the client asks there, or another replica.
    NotLeader,
    /// Any other code.
    Other(u8),
}

impl RegErrorCode {
    pub(super) fn to_u8(self) -> u8 {
        match self {
            RegErrorCode::UnknownChannel => 1,
            RegErrorCode::Exists => 2,
            RegErrorCode::NotContact => 3,
            RegErrorCode::Invalid => 4,
            RegErrorCode::NotLeader => 5,
            RegErrorCode::Other(c) => c,
        }
    }
    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            1 => RegErrorCode::UnknownChannel,
            2 => RegErrorCode::Exists,
            3 => RegErrorCode::NotContact,
            4 => RegErrorCode::Invalid,
            5 => RegErrorCode::NotLeader,
            c => RegErrorCode::Other(c),
        }
    }
}

/// A registry reply body.
#[derive(Clone, Debug, PartialEq)]
pub enum RegResult {
    /// Done, nothing to report.
    Ok,
    /// One entry.
    Entry(RegEntry),
    /// A listing.
    Entries(Vec<RegEntry>),
    /// Refused.
    Error {
        /// Why.
        code: RegErrorCode,
        /// For humans.
        message: String,
    },
}
