//! Errors of the node library.

use std::net::SocketAddr;

use kecho_proto::access::{Denied, Roles};
use std::sync::Arc;

use kecho_registry::RegistryError;

/// Everything that can go wrong in the node library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node could not listen on its address.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be used.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The registry refused a request or could not be reached while opening a channel.
    #[error("{0}")]
    RegistryFailed(kecho_proto::membership::RegistryFailure),
    /// The channel does not exist (opened without creating).
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    /// The channel exists already (created without opening).
    #[error("channel {0:?} exists already")]
    ChannelExists(String),
    /// Opening the channel took longer than allowed.
    #[error("timed out opening channel {channel:?}: {}", open_timeout_cause(.cause.as_ref()))]
    OpenTimeout {
        /// The channel.
        channel: String,
        /// What went wrong as far as this node can tell: the last failure to link with another node, or `None` when
        /// no link failed (no contact answered).
        cause: Option<LinkFailure>,
    },
    /// The TLS configuration could not be used.
    #[cfg(feature = "tls")]
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Waiting for something took longer than allowed.
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: f64,
    },
    /// The channel or node has been closed.
    #[error("channel {0:?} is closed")]
    Closed(String),
    /// An argument was invalid (empty type name, event too large, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A typed payload could not be encoded or decoded.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// A content filter expression is invalid.
    #[error(transparent)]
    Filter(#[from] crate::filter::FilterError),
    /// A sandboxed filter module is invalid.
    #[error(transparent)]
    Wasm(#[from] crate::wasm::WasmError),
    /// The channel's access policy does not allow this: joining it, adding a source or sink, installing filters.
    #[error("access to channel {channel:?} denied: {reason}")]
    AccessDenied {
        /// The channel.
        channel: String,
        /// Why.
        reason: Refusal,
    },
    /// An event could not be delivered without waiting and the caller asked not to wait.
    #[error("a sink with the Block policy is full")]
    WouldBlock,
}

/// Why the access policy of a channel refused something (see [`Error::AccessDenied`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// This node's credential does not cover it, as the channel's policy decides (no credential, wrong channel,
    /// authority or holder, expired).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// This node's credential is valid but does not grant the role.
    #[error("this node's credential grants {have}, not the {need} role")]
    MissingRole {
        /// The rights the credential grants.
        have: Roles,
        /// The role asked for.
        need: Roles,
    },
    /// The channel's members refused this node (or it refused the channel's policy), with the reason given.
    #[error("{0}")]
    Refused(String),
}

/// A typed payload could not be encoded or decoded (see [`crate::TypedSource`], [`crate::Event::decode`]).
#[derive(Debug, thiserror::Error)]
#[error("payload codec: {0}")]
pub struct PayloadError(#[source] serde_json::Error);

impl PayloadError {
    pub(crate) fn new(e: serde_json::Error) -> Self {
        PayloadError(e)
    }

    /// The position in the payload where decoding failed: line and column, from 1 (0 when not known, as for
    /// encoding errors).
    pub fn position(&self) -> (usize, usize) {
        (self.0.line(), self.0.column())
    }
}

/// Why an attempt to link with another node failed (see [`Error::OpenTimeout`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{source}")]
pub struct LinkFailure {
    kind: LinkFailureKind,
    source: Arc<dyn std::error::Error + Send + Sync>,
}

/// What kind of failure a [`LinkFailure`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkFailureKind {
    /// The connection could not be made (refused, unreachable, timed out): the node may have left.
    Connect,
    /// TLS could not be set up with the peer (certificates, names, a plaintext peer).
    Tls,
    /// The nodes have no transport in common, or the QUIC connection could not be set up (its TLS included).
    Transport,
    /// The peer or this node refused the kecho handshake (versions, identity proofs, access), or it timed out.
    Handshake,
    /// The link ended otherwise (the connection closed, a malformed frame, a heartbeat timeout).
    Other,
}

impl LinkFailure {
    pub(crate) fn new(kind: LinkFailureKind, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        LinkFailure { kind, source: Arc::new(source) }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> LinkFailureKind {
        self.kind
    }
}

fn open_timeout_cause(cause: Option<&LinkFailure>) -> String {
    cause.map_or_else(|| "no contact answered".to_owned(), |c| format!("last link failure: {c}"))
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
