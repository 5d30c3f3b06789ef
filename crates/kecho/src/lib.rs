//! kecho: event channels after KECho (Poellabauer, Schwan, Eisenhauer, Kong).
//!
//! Services on many hosts coordinate through anonymous publish/subscribe channels. A [`Node`] (one per process, one
//! listening port) opens any number of [`Channel`]s; a channel has any number of [`Source`]s and [`Sink`]s that join
//! and leave at run time. Events go directly from each source to each interested sink over one TCP link per pair of
//! nodes; a registry (the paper's group server) only tells joiners whom to contact.
//!
//! ```no_run
//! # async fn demo() -> kecho::Result<()> {
//! use kecho::{Attrs, Node, SinkOptions};
//! let node = Node::start().await?; // in-process registry: nothing to start first
//! let ch = node.channel("load").await?;
//! let mut sink = ch.sink(SinkOptions::new().types(["cpu"]))?;
//! let mut src = ch.source()?;
//! src.submit("cpu", &Attrs::new().with("host", "a").with("util", 0.42), b"").await?;
//! let ev = sink.recv().await.unwrap();
//! assert_eq!(ev.attrs().get("util"), Some(&kecho::Value::Float(0.42)));
//! # Ok(()) }
//! ```
//!
//! For high event rates, [`Source::submit_many`] sends many events of one type and attributes with the per-event
//! routing, room checks and locking paid once per run of them, and [`Sink::recv_many`] takes many queued events under
//! one lock; each event is still numbered, filtered, ordered and accounted for as a single one would be.
//!
//! ```no_run
//! # async fn demo(src: &mut kecho::Source, sink: &mut kecho::Sink) -> kecho::Result<()> {
//! let payloads = vec![[0u8; 100]; 256];
//! let seqs = src.submit_many("tick", &kecho::Attrs::new(), &payloads).await?;
//! assert_eq!(seqs.end - seqs.start, 256);
//! let mut events = Vec::with_capacity(1024);
//! if let Ok(n) = sink.recv_many(&mut events, 1024).await {
//!     assert_eq!(events.len(), n);
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod channel;
mod clock;
mod config;
pub mod cost;
mod error;
pub mod filter;
mod link;
mod node;
mod queue;
mod tasks;
mod timely;
#[cfg(feature = "tls")]
pub mod tls;
mod transport;
pub mod wasm;

pub use channel::{
    Channel, ChannelStats, History, InstallReport, Sink, SinkOptions, Source, SourceFate, TreeStats, Typed, TypedSink,
    TypedSource,
};
pub use error::{Error, LinkFailure, LinkFailureKind, PayloadError, Refusal, Result};
pub use kecho_proto::access::{Authority, Policy, Roles, Token};
pub use kecho_proto::codec::FilterKind;
pub use kecho_proto::handshake::Identity;
pub use kecho_proto::membership::{JoinTrace, MembershipConfig};
pub use kecho_proto::{Attrs, NodeId, Overflow, TypeFilter, Value};
pub use kecho_registry::{RegistryClient, RegistryError};
pub use node::{LinkStats, Node, NodeBuilder, ShutdownReport, Undrained, SHUTDOWN_DRAIN};
pub use queue::{Event, RecvError, SourceKey, TryRecvError};
pub use timely::{EventOptions, InvalidPriority, Priority, BEST_EFFORT_ATTR};
#[cfg(feature = "tls")]
pub use tls::{TlsConfig, TlsError};
pub use transport::{Transport, UnknownTransport};
