//! kecho's counters as Prometheus metrics.
//!
//! An application that runs a kecho [`Node`](kecho::Node) registers the node's metrics into its own
//! [`prometheus_client`] registry with [`register_node`], and serves that registry as it likes, or with
//! [`MetricsServer`] (`GET /metrics`). The counters are read from the node at every scrape, so nothing is counted
//! twice and nothing costs anything between scrapes. Delivery latency needs a time stamp in each event: sources
//! [`stamp`] their attributes, sinks [`DeliveryLatency::observe`] what they receive.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let node = kecho::Node::start().await?;
//! let mut registry = prometheus_client::registry::Registry::default();
//! let latency = kecho_metrics::register_node(&mut registry, &node);
//! let server = kecho_metrics::MetricsServer::bind("127.0.0.1:9464".parse()?, Arc::new(registry)).await?;
//! println!("metrics on http://{}/metrics", server.local_addr());
//! # drop(latency); Ok(()) }
//! ```
//!
//! Names follow Prometheus conventions: a `kecho_` prefix, the unit in the name, `_total` on counters.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `kecho_channel_events_submitted_total` | `channel` | events submitted by this node's sources |
//! | `kecho_channel_events_sent_total` | `channel` | event frames queued to other nodes (one per node per event) |
//! | `kecho_channel_sent_bytes_total` | `channel` | bytes of those frames |
//! | `kecho_channel_events_received_total` | `channel` | events delivered to this node's sinks |
//! | `kecho_channel_events_dropped_total` | `channel` | events discarded here (full sink queue, full link) |
//! | `kecho_channel_events_filtered_total` | `channel` | events discarded on purpose (IN-filter, no sink chosen) |
//! | `kecho_channel_events_lagged_total` | `channel` | events meant for this node's sinks that never arrived |
//! | `kecho_channel_frames_stale_total` | `channel` | frames (events, lag notices, source ends) from remote sources meant for another opening of the channel here, ignored ([`kecho::ChannelStats::stale`]) |
//! | `kecho_channel_access_denied_total` | `channel` | refusals under the channel's access policy |
//! | `kecho_channel_sinks`, `kecho_channel_sources` | `channel` | sinks and sources present in the channel |
//! | `kecho_channel_member_nodes` | `channel` | other member nodes |
//! | `kecho_link_up` | `peer`, `addr` | 1 while a connection to the node is up |
//! | `kecho_link_event_frames_sent_total` | `peer`, `addr` | event frames sent on the link (one per event) |
//! | `kecho_link_writes_total` | `peer`, `addr` | writes to the socket, each of one or more frames |
//! | `kecho_link_sent_bytes_total`, `kecho_link_received_bytes_total` | `peer`, `addr` | bytes each way |
//! | `kecho_link_queued_bytes` | `peer`, `addr` | bytes queued, not written yet (queue depth) |
//! | `kecho_link_reconnects_total` | `peer`, `addr` | connections after the first |
//! | `kecho_link_heartbeat_timeouts_total` | `peer`, `addr` | connections declared dead for silence |
//! | `kecho_node_links` | | links up |
//! | `kecho_delivery_latency_seconds` | `channel` | histogram, source's stamp to the sink's receive |
//! | `kecho_registry_*` | | see [`register_registry`] |
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod cluster;
mod error;
mod node;
mod registry;
mod server;
pub mod text;

pub use error::MetricsError;
pub use node::{register_node, stamp, DeliveryLatency, NodeCollector, SENT_AT_ATTR};
pub use registry::{register_registry, RegistryCollector};
pub use server::{render, router, scrape, MetricsServer, CONTENT_TYPE};

/// The crate this one builds on, for applications that want the same version.
pub use prometheus_client;
