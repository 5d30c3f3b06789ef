//! kecho's channel registry: the KECho paper's group server.
//!
//! A channel's contact stores its contact information here as a lease; joiners look it up. The lease table itself is
//! [`kecho_proto::registry::RegistryTable`] (no I/O); this crate serves it over TCP ([`RegistryServer`]) and talks to
//! it ([`RegistryClient`]), either over TCP or in-process, so that nodes in one process need no server at all.
//!
//! Both the server and the in-process client read the time from [`tokio::time::Instant`], so tests with paused time
//! see leases expire when they advance the clock.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
pub mod raft;
mod replica;
mod server;
mod store;
pub mod wire;

pub use client::{
    InProcessRegistry, RegistryClient, RemoteRegistry, CONNECT_TIMEOUT, REPLICA_CONNECT_TIMEOUT, REQUEST_TIMEOUT,
};
pub use server::{RegistryHandle, RegistryServer, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};

use std::net::SocketAddr;

use kecho_proto::codec::RegErrorCode;

/// Largest frame (kind and body, without the length prefix) the registry server and its clients accept.
pub const MAX_REGISTRY_FRAME: usize = 1 << 20;

/// What can go wrong talking to or running a registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The registry could not be reached, or the connection to it was lost.
    #[error("registry at {addr} is unreachable: {source}")]
    Unreachable {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The registry did not accept the connection or answer a request in time.
    #[error("registry at {addr} did not answer in time")]
    Timeout {
        /// Its address.
        addr: SocketAddr,
    },
    /// A replicated registry: no replica answered as the leader before the request's time ran out (no majority is
    /// up, or none can reach the others). Every replica's last outcome, in the order of the addresses given.
    #[error("no registry replica answered as the leader within {waited:?}; {}", replica_outcomes(replicas))]
    NoLeader {
        /// How long the request tried.
        waited: std::time::Duration,
        /// Each replica, with what it said when last asked.
        replicas: Vec<ReplicaOutcome>,
    },
    /// The registry speaks another protocol version.
    #[error("registry speaks protocol version {theirs}, this program speaks version {ours}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The registry (or whatever answered at its address) broke the protocol.
    #[error("registry protocol error: {0}")]
    Protocol(String),
    /// The message handed to [`RegistryClient::request`] is not a registry request.
    #[error("message kind {kind} is not a registry request")]
    NotARequest {
        /// The message's kind byte.
        kind: u8,
    },
    /// No live entry with that name.
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    /// The registry refused the request.
    #[error("registry refused the request: {message}")]
    Refused {
        /// Why, as a code.
        code: RegErrorCode,
        /// Why, for humans.
        message: String,
    },
    /// A replica's state directory could not be read or created.
    #[error("replica state in {}: {source}", path.display())]
    Storage {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server could not listen.
    #[error("cannot listen on {addr}: {}", bind_reason(source))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why (e.g. address in use).
        #[source]
        source: std::io::Error,
    },
}

/// What one replica of a replicated registry did when last asked a request that no leader answered (see
/// [`RegistryError::NoLeader`]).
#[derive(Debug)]
pub struct ReplicaOutcome {
    /// The replica's address.
    pub addr: SocketAddr,
    /// Why it did not answer: unreachable (refused, reset, ...), timed out, not the leader, another protocol version,
    /// not a registry. `None`: the request's time ran out before it was asked.
    pub error: Option<Box<RegistryError>>,
}

fn replica_outcomes(replicas: &[ReplicaOutcome]) -> String {
    let each: Vec<String> = replicas
        .iter()
        .map(|r| {
            let what = match r.error.as_deref() {
                None => "not asked before the time ran out".to_owned(),
                Some(RegistryError::Unreachable { source, .. }) => format!("unreachable: {source}"),
                Some(RegistryError::Timeout { .. }) => "did not answer in time".to_owned(),
                Some(RegistryError::Protocol(why)) => {
                    let own = format!("{}: ", r.addr);
                    why.strip_prefix(&own).unwrap_or(why).to_owned()
                }
                Some(e) => e.to_string(),
            };
            format!("{} {what}", r.addr)
        })
        .collect();
    format!("each replica, as last asked: {}", each.join("; "))
}

fn bind_reason(e: &std::io::Error) -> String {
    let os = e.raw_os_error().map(|n| format!(" (os error {n})")).unwrap_or_default();
    match e.kind() {
        std::io::ErrorKind::AddrInUse => format!("address in use{os}; is another registry running?"),
        std::io::ErrorKind::AddrNotAvailable => format!("address not available on this host{os}"),
        std::io::ErrorKind::PermissionDenied => format!("permission denied{os}"),
        _ => e.to_string(),
    }
}

/// The registry's clock: tokio's, so that paused-time tests control lease expiry.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
