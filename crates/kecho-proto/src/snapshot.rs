//! What one node contributes to one channel: its members and its credential, versioned by the node.

use std::sync::Arc;

use crate::credential::Token;
use crate::types::{MemberInfo, Role};

/// Everything one node contributes to one channel: its members, versioned so that a newer snapshot replaces an older
/// one whatever the order of arrival.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct NodeSnapshot {
    /// Increases by one with every change the node makes to its membership in this channel; starts, at each opening
    /// of the channel, above the versions of the node's openings before
    /// (`membership::ChannelState::start_versions_at`).
    pub version: u64,
    /// Taken each time the node opens the channel (0: unknown), increasing from one opening to the next (the node
    /// layer takes the wall clock in microseconds), so that a member that closed the channel and opened it again is
    /// told from, and ordered after, the instance before it: a source numbers its events to each instance anew
    /// (docs/PROTOCOL.md, "Loss accounting").
    pub instance: u64,
    /// The node's members; empty when it has left.
    pub members: Vec<MemberInfo>,
    /// The node's credential in the channel, for channels with an access policy (see [`crate::access`]).
    pub token: Option<Arc<Token>>,
}

impl NodeSnapshot {
    /// Number of sinks.
    pub fn sinks(&self) -> usize {
        self.members.iter().filter(|m| matches!(m.role, Role::Sink { .. })).count()
    }

    /// Number of sources.
    pub fn sources(&self) -> usize {
        self.members.iter().filter(|m| matches!(m.role, Role::Source)).count()
    }
}
