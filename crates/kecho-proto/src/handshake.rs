//! The connection handshake as pure decisions: what the accepting side does with the first message of a connection,
//! and what the dialling side concludes from the answer to its `Hello`. The node layer does the I/O around them.

use crate::codec::{CloseCode, Message, Purpose};
use crate::types::NodeId;
use crate::PROTOCOL_VERSION;

/// What the accepting side of a node link does with the connection's first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accept {
    /// A node speaking our version: go on with the duplicate rule, then answer `HelloAck`.
    Node {
        /// The dialling node.
        peer: NodeId,
        /// Its listening address.
        addr: String,
    },
    /// Refuse the connection: send `Close` with this code and reason, then close.
    Refuse {
        /// The close code.
        code: CloseCode,
        /// Why, for the peer's logs and errors.
        reason: String,
    },
}

/// Decides on the first message of an inbound connection to node `me`.
pub fn accept_first(first: &Message, me: NodeId) -> Accept {
    let refuse = |code, reason: String| Accept::Refuse { code, reason };
    match first {
        Message::Hello { version, .. } if *version != PROTOCOL_VERSION => refuse(
            CloseCode::VersionMismatch,
            format!(
                "protocol version mismatch: this node speaks version {PROTOCOL_VERSION}, the peer speaks version \
                 {version}"
            ),
        ),
        Message::Hello { purpose: Purpose::Registry, .. } => {
            refuse(CloseCode::Handshake, "this is a kecho node, not a registry".into())
        }
        Message::Hello { node, .. } if *node == me => refuse(CloseCode::Handshake, "connection to self".into()),
        Message::Hello { node, addr, purpose: Purpose::Node, .. } => Accept::Node { peer: *node, addr: addr.clone() },
        other => refuse(CloseCode::Handshake, format!("expected Hello, got message kind {}", other.kind())),
    }
}

/// What a dialling node concludes from the answer to its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dial {
    /// The link is up.
    Up,
    /// The peer has a link with us already (its own dial won the duplicate rule): use that one.
    Duplicate,
    /// The link failed, for this reason.
    Failed(String),
}

/// Decides on the answer to our `Hello`, sent to `addr` where we expected node `expected`.
pub fn dial_answer(answer: &Message, expected: NodeId, addr: &str) -> Dial {
    match answer {
        Message::HelloAck { version, node } if *version == PROTOCOL_VERSION && *node == expected => Dial::Up,
        Message::HelloAck { node, .. } if *node != expected => {
            Dial::Failed(format!("{addr} is node {node}, expected {expected}"))
        }
        Message::HelloAck { version, .. } => {
            Dial::Failed(format!("version mismatch: the peer answered with version {version}"))
        }
        Message::Close { code: CloseCode::Duplicate, .. } => Dial::Duplicate,
        Message::Close { code: CloseCode::VersionMismatch, reason } => {
            Dial::Failed(format!("version mismatch: {reason}"))
        }
        Message::Close { code, reason } => Dial::Failed(format!("refused ({code:?}): {reason}")),
        other => Dial::Failed(format!("unexpected handshake answer kind {}", other.kind())),
    }
}
