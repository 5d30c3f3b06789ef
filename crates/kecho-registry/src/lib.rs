//! kecho's channel registry: the KECho paper's group server.
//!
//! A channel's contact stores its contact information here as a lease; joiners look it up. The lease table itself is
//! [`kecho_proto::registry::RegistryTable`] (no I/O); this crate serves it over TCP ([`RegistryServer`]) and talks to
//! it ([`RegistryClient`]), either over TCP or in-process, so that nodes in one process need no server at all.
#![forbid(unsafe_code)]

mod client;
mod server;

pub use client::RegistryClient;
pub use server::{RegistryHandle, RegistryServer};

use std::net::SocketAddr;

use kecho_proto::codec::RegErrorCode;

/// Largest frame the registry accepts or expects.
pub const MAX_REGISTRY_FRAME: usize = 1 << 20;

/// What can go wrong talking to or running a registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The registry could not be reached.
    #[error("registry at {addr} is unreachable: {source}")]
    Unreachable {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The registry did not answer in time.
    #[error("registry at {addr} did not answer in time")]
    Timeout {
        /// Its address.
        addr: SocketAddr,
    },
    /// The registry speaks another protocol version.
    #[error("registry speaks protocol version {theirs}, this program speaks version {ours}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The registry (or whatever answered) broke the protocol.
    #[error("registry protocol error: {0}")]
    Protocol(String),
    /// No such channel.
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    /// The registry refused the request.
    #[error("registry refused: {message}")]
    Refused {
        /// Why, as a code.
        code: RegErrorCode,
        /// Why, for humans.
        message: String,
    },
    /// The server could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why (e.g. address in use).
        #[source]
        source: std::io::Error,
    },
}
