//! The link layer: one TCP (or TLS) link per pair of nodes, multiplexing all channels. It owns everything that is
//! about the link rather than a channel: dialling and accepting with the handshake and its duplicate rule
//! ([`dial`]), TLS ([`tls`]), the outbox and its socket writes ([`outbox`], [`writer`]), heartbeats (Ping/Pong),
//! `Targets` frames, the membership budget, and splitting arriving frames ([`reader`]).
//!
//! What arrives for channels goes up through one narrow interface, [`LinkHandler`]: batches of events, the other
//! channel frames, and the loss of a peer. This module knows nothing about channels.

pub(crate) mod datagram;
pub(crate) mod dial;
pub(crate) mod local;
pub(crate) mod outbox;
#[cfg(feature = "quic")]
pub(crate) mod quic;
pub(crate) mod reader;
mod spin;
pub(crate) mod tls;
pub(crate) mod urgent;
pub(crate) mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use kecho_proto::codec::{CloseCode, EventMsg};
use kecho_proto::handshake::Identity;
use kecho_proto::liveness::Liveness;
use kecho_proto::{ChannelId, LocalId, Message, NodeId};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::config::NodeConfig;
use crate::error::{LinkFailure, LinkFailureKind};
use crate::queue::Event;
use crate::tasks::Tasks;
pub(crate) use outbox::{Expiry, Held, Outbox, SourceGate, Urgency};
pub(crate) use writer::COPY_BELOW;

/// A QUIC link's datagram path (see `quic::Datagrams`).
#[cfg(feature = "quic")]
pub(crate) use quic::Datagrams;

/// Without QUIC no link has datagrams: the type has no values.
#[cfg(not(feature = "quic"))]
pub(crate) enum Datagrams {}

#[cfg(not(feature = "quic"))]
impl Datagrams {
    pub(crate) fn max_size(&self) -> Option<usize> {
        match *self {}
    }
    pub(crate) fn send(&self, _: Bytes) -> Option<bool> {
        match *self {}
    }
    pub(crate) async fn recv(&self) -> Option<Bytes> {
        match *self {}
    }
    pub(crate) fn set_send_window(&self, _: u64) {
        match *self {}
    }
    pub(crate) fn has_streams(&self) -> bool {
        match *self {}
    }
    pub(crate) async fn open_urgent(&self) -> Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> {
        match *self {}
    }
    pub(crate) async fn accept_urgent(&self) -> Option<tls::Rd> {
        match *self {}
    }
}

/// How long a connection may take to complete its handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link layer hands to the channels above it: the one interface between the two.
///
/// Implemented by the node's channel table. Frames arrive in link order; `deliver` may wait (a sink with the Block
/// policy is full), which holds up that link's reader, as back-pressure should.
pub(crate) trait LinkHandler: Send + Sync + 'static {
    /// Events that arrived together on one link from node `from`, all on `channel`, in order. Leaves
    /// `batch.events` and `batch.runs` empty.
    fn deliver<'a>(
        &'a self,
        from: NodeId,
        channel: ChannelId,
        batch: &'a mut Batch,
    ) -> impl Future<Output = ()> + Send + 'a;

    /// A channel frame other than an event (membership, filter installs and their answers, loss accounting) from
    /// node `from`.
    fn control(&self, from: NodeId, msg: Message);

    /// The link to node `id` is gone (and no new one is up): its members left every channel.
    fn peer_lost(&self, id: NodeId);

    /// A link to node `id` is up (dialled or accepted); called with no lock of the link's held.
    fn peer_up(&self, id: NodeId);

    /// A probe of the liveness check asks, before any handshake, whether this node is a member of `channel` now;
    /// if it is, the handler counts the answer (`answer` bytes) as the channel's traffic.
    fn probed(&self, channel: ChannelId, answer: usize) -> bool;
}

/// An event that arrived, with the sink ids of the `Targets` frame before it if it had one, and the deadline of
/// its `Deadline` frame (microseconds since the Unix epoch) if it had one.
/// Both are rare, and boxed together: the reader moves every event's `Arrived` into a batch, and the smaller it is
/// the less that costs (inline, they made it large enough for a call to `memcpy` per event).
pub(crate) struct Arrived {
    event: EventMsg,
    more: Option<Box<TargetsDeadline>>,
}

/// The sink ids of an event's `Targets` frame, the deadline of its `Deadline` frame, and for an event that came as
/// a datagram its header's numbers (`datagram.rs`).
type TargetsDeadline = (Option<Vec<LocalId>>, Option<u64>, Option<Numbered>);

/// A datagram's numbers: the event's number in its source's numbering towards this node, and the number of the
/// source's last event sent before it on the link's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Numbered {
    pub(crate) number: u64,
    pub(crate) after: u64,
}

impl Arrived {
    #[inline]
    pub(crate) fn new(event: EventMsg, targets: Option<Vec<LocalId>>, deadline: Option<u64>) -> Self {
        let more =
            if targets.is_none() && deadline.is_none() { None } else { Some(Box::new((targets, deadline, None))) };
        Arrived { event, more }
    }

    /// An event that came as a datagram.
    pub(crate) fn datagram(
        event: EventMsg,
        targets: Option<Vec<LocalId>>,
        deadline: Option<u64>,
        numbered: Numbered,
    ) -> Self {
        Arrived { event, more: Some(Box::new((targets, deadline, Some(numbered)))) }
    }

    /// The datagram's numbers, if the event came as one.
    #[inline]
    pub(crate) fn numbered(&self) -> Option<Numbered> {
        self.more.as_ref().and_then(|m| m.2)
    }

    /// The event, its targets and its deadline.
    #[inline]
    pub(crate) fn parts(self) -> (EventMsg, Option<Vec<LocalId>>, Option<u64>) {
        match self.more {
            None => (self.event, None, None),
            Some(more) => {
                let (targets, deadline, _) = *more;
                (self.event, targets, deadline)
            }
        }
    }
}

/// Events that arrived together on one link for one channel, and the list the handler stages them in for delivery:
/// both kept from read to read for their memory.
#[derive(Default)]
pub(crate) struct Batch {
    /// Events of single `Event` frames (or datagrams). A batch holds these or `runs`, never both.
    pub(crate) events: Vec<Arrived>,
    /// `EventRun` frames, checked whole and not split into events: the handler builds each event straight into
    /// the sinks' queues.
    pub(crate) runs: Vec<kecho_proto::codec::EventRunMsg>,
    /// Events in `runs`.
    pub(crate) run_events: usize,
    /// The handler's: events with the mask of the local sinks they go to.
    pub(crate) staged: Vec<(Event, u64)>,
}

/// Why a link could not be set up or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LinkError {
    /// The TCP connection could not be made in time.
    #[error("connect to {addr} timed out")]
    ConnectTimeout {
        /// The address dialled.
        addr: String,
    },
    /// The TCP connection failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer's address names no transport this node speaks.
    #[error(transparent)]
    NoTransport(#[from] crate::transport::NoCommonTransport),
    /// The QUIC connection could not be set up.
    #[cfg(feature = "quic")]
    #[error("QUIC link to {addr}: {why}")]
    Quic {
        /// The address dialled.
        addr: String,
        /// What happened.
        why: String,
    },
    /// TLS could not be set up with the peer.
    #[cfg(feature = "tls")]
    #[error("TLS handshake with {addr} {why}")]
    Tls {
        /// The address dialled.
        addr: String,
        /// What happened (timed out, or failed and why).
        why: String,
    },
    /// The kecho handshake failed or was refused (the peer's or this node's reason).
    #[error("{0}")]
    Handshake(String),
    /// The handshake took too long.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The peer closed the link with a reason.
    #[error("peer closed the link ({code:?}): {reason}")]
    ClosedByPeer {
        /// Its close code.
        code: CloseCode,
        /// Its reason.
        reason: String,
    },
    /// The connection ended.
    #[error("connection closed")]
    Eof,
    /// The peer sent something it must not.
    #[error("{0}")]
    Protocol(&'static str),
    /// A frame did not decode.
    #[error(transparent)]
    Decode(#[from] kecho_proto::codec::DecodeError),
    /// A message kind that has no place on a node link.
    #[error("message kind {0} is not allowed on a node link")]
    Unexpected(u8),
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer did not prove liveness in time.
    #[error("heartbeat timeout{0}")]
    Heartbeat(&'static str),
}

impl LinkError {
    /// This failure as the public, typed [`LinkFailure`] (which the error module defines: it imports nothing of the
    /// link layer).
    pub(crate) fn into_failure(self) -> LinkFailure {
        let kind = match &self {
            #[cfg(feature = "tls")]
            LinkError::Tls { .. } => LinkFailureKind::Tls,
            LinkError::Connect { .. } | LinkError::ConnectTimeout { .. } => LinkFailureKind::Connect,
            #[cfg(feature = "quic")]
            LinkError::Quic { .. } => LinkFailureKind::Transport,
            LinkError::NoTransport(_) => LinkFailureKind::Transport,
            LinkError::Handshake(_) | LinkError::HandshakeTimeout | LinkError::ClosedByPeer { .. } => {
                LinkFailureKind::Handshake
            }
            _ => LinkFailureKind::Other,
        };
        LinkFailure::new(kind, self)
    }

    /// True for failures an operator must fix (TLS, versions, refusals by the peer): logged as warnings. A failed
    /// connect is not one: it is what dialling a node that has just left looks like (a normal shutdown), and an open
    /// that times out names the last link failure anyway.
    fn needs_operator(&self) -> bool {
        #[cfg(feature = "tls")]
        if matches!(self, LinkError::Tls { .. }) {
            return true;
        }
        #[cfg(feature = "quic")]
        if matches!(self, LinkError::Quic { .. }) {
            return true;
        }
        if matches!(self, LinkError::Connect { .. } | LinkError::ConnectTimeout { .. }) {
            return false;
        }
        let why = self.to_string();
        why.contains("refused") || why.contains("mismatch")
    }

    /// The close code to tell the peer when this error ends a link.
    fn close_code(&self) -> CloseCode {
        match self {
            LinkError::Decode(_) => CloseCode::Malformed,
            _ => CloseCode::Handshake,
        }
    }
}

/// The node's links: the peer table and what dialling, accepting and running links need. `H` is the handler of
/// what arrives (the node's channel table).
pub(crate) struct Links<H> {
    pub(crate) id: NodeId,
    /// Proves this node's id on every link.
    identity: Identity,
    /// The address as other nodes read it: the endpoints of every transport this node speaks (`transport.rs`).
    pub(crate) addr: String,
    /// The node's QUIC endpoint, if it speaks QUIC (set once, when the node starts).
    #[cfg(feature = "quic")]
    pub(crate) quic: std::sync::OnceLock<quic::QuicEndpoint>,
    /// The node's endpoint for the urgent connections of its QUIC links (`urgent.rs`), if it takes them.
    #[cfg(feature = "quic")]
    pub(crate) quic_urgent: std::sync::OnceLock<quic::QuicEndpoint>,
    cfg: Arc<NodeConfig>,
    pub(crate) tasks: Arc<Tasks>,
    handler: Weak<H>,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    gen: AtomicU64,
    conn_slots: Arc<Semaphore>,
    /// Set by a graceful shutdown: writers finish their queues and close.
    closing: AtomicBool,
    /// Why the last attempt to link with another node failed, to explain a channel that cannot be opened.
    last_error: Mutex<Option<LinkFailure>>,
}

impl<H: LinkHandler> Links<H> {
    pub(crate) fn new(
        identity: Identity,
        advertised: SocketAddr,
        cfg: Arc<NodeConfig>,
        tasks: Arc<Tasks>,
        handler: Weak<H>,
    ) -> Self {
        Links {
            id: identity.node_id(),
            identity,
            addr: match &cfg.local_endpoint {
                Some(local) => format!("{},{local}", crate::transport::advertise(cfg.transport, advertised)),
                None => crate::transport::advertise(cfg.transport, advertised),
            },
            #[cfg(feature = "quic")]
            quic: std::sync::OnceLock::new(),
            #[cfg(feature = "quic")]
            quic_urgent: std::sync::OnceLock::new(),
            conn_slots: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            tasks,
            handler,
            peers: Mutex::new(HashMap::new()),
            gen: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    fn next_gen(&self) -> u64 {
        self.gen.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The peer `id`, created (without a link) if unknown.
    pub(crate) fn peer(&self, id: NodeId, addr: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock();
        let p = peers.entry(id).or_insert_with(|| Arc::new(Peer::new(id, addr.to_owned(), self.cfg.link_queue_bytes)));
        if !addr.is_empty() && *p.addr.lock() != addr {
            *p.addr.lock() = addr.to_owned();
        }
        p.clone()
    }

    fn is_peer_known(&self, id: NodeId) -> bool {
        self.peers.lock().contains_key(&id)
    }

    /// Open links.
    pub(crate) fn up(&self) -> usize {
        self.peers.lock().values().filter(|p| p.is_up()).count()
    }

    /// Counters of every link (up or not), one entry per other node.
    pub(crate) fn stats(&self) -> Vec<LinkStats> {
        let peers: Vec<_> = self.peers.lock().values().cloned().collect();
        peers
            .iter()
            .map(|p| {
                let c = &p.counters;
                // Each lock taken and released alone: in the struct below a guard would live to its end, and the
                // link's lock taken under `transport`'s deadlocked with `start_link`, which takes them the other way
                // round (a test polling `link_stats` hung while a link came up).
                let up = p.is_up();
                let transport = *p.transport.lock();
                let addr = p.addr.lock().clone();
                LinkStats {
                    node: p.id,
                    addr,
                    up,
                    event_frames: p.outbox.events(),
                    writes: p.frames_sent.load(Ordering::Relaxed) + p.outbox.direct_writes.load(Ordering::Relaxed),
                    direct_writes: p.outbox.direct_writes.load(Ordering::Relaxed),
                    bytes_sent: c.bytes_sent.load(Ordering::Relaxed) + p.outbox.direct_bytes.load(Ordering::Relaxed),
                    bytes_received: c.bytes_received.load(Ordering::Relaxed),
                    queued_bytes: p.outbox.queued_bytes(),
                    connects: c.connects.load(Ordering::Relaxed),
                    heartbeat_timeouts: c.heartbeat_timeouts.load(Ordering::Relaxed),
                    expired: p.outbox.expired.load(Ordering::Relaxed),
                    transport,
                    same_host: c.same_host.load(Ordering::Relaxed),
                    shared_memory: c.shared_memory.load(Ordering::Relaxed),
                    datagrams_sent: c.datagrams_sent.load(Ordering::Relaxed),
                    datagrams_received: c.datagrams_received.load(Ordering::Relaxed),
                    urgent_apart: up && p.outbox.has_streams(),
                    urgent_connection: up
                        && p.outbox.has_streams()
                        && p.urgent_tcp.lock().as_ref().is_some_and(|u| u.in_use()),
                    urgent_dialler: up && p.urgent_tcp.lock().as_ref().is_some_and(|u| u.dials().is_some()),
                }
            })
            .collect()
    }

    /// Sends a control message to node `to` (at `addr`), dialling if needed.
    pub(crate) fn send(self: &Arc<Self>, to: NodeId, addr: &str, msg: &Message) {
        if self.tasks.is_closed() {
            return;
        }
        let p = self.peer(to, addr);
        if matches!(
            msg,
            Message::JoinRequest { .. }
                | Message::JoinAccept { .. }
                | Message::JoinRedirect { .. }
                | Message::JoinRefused { .. }
        ) {
            // No event depends on a join message's place among them (the joiner is not a member yet): it goes ahead
            // of any backlog. Snapshots, ends and lag notices keep their place after the events queued before them.
            p.outbox.push_link_control(msg.to_bytes());
        } else {
            p.outbox.push_control(msg.to_bytes());
        }
        p.ensure_link(self);
    }

    /// Sends an encoded frame (a control frame: it keeps its place after the frames queued before it) to node `to`
    /// (at `addr`), dialling if needed.
    pub(crate) fn send_frame(self: &Arc<Self>, to: NodeId, addr: &str, frame: Bytes) {
        if self.tasks.is_closed() {
            return;
        }
        let p = self.peer(to, addr);
        p.outbox.push_control(frame);
        p.ensure_link(self);
    }

    /// [`Links::send_frame`] in outbox lane `lane` (a tree-mode event's priority).
    pub(crate) fn send_frame_in(self: &Arc<Self>, to: NodeId, addr: &str, lane: u8, frame: Bytes) {
        if self.tasks.is_closed() {
            return;
        }
        let p = self.peer(to, addr);
        p.outbox.push_control_in(lane, frame);
        p.ensure_link(self);
    }

    /// A link to `id` is up now.
    pub(crate) fn is_up(&self, id: NodeId) -> bool {
        self.peers.lock().get(&id).is_some_and(|p| p.is_up())
    }

    /// A link to `id` is up or being dialled.
    pub(crate) fn is_linked_or_dialing(&self, id: NodeId) -> bool {
        self.peers.lock().get(&id).is_some_and(|p| !matches!(*p.link.lock(), LinkState::Idle))
    }

    /// The address node `id` is dialled at, if this node knows it.
    pub(crate) fn addr_of(&self, id: NodeId) -> Option<String> {
        let p = self.peers.lock().get(&id).cloned()?;
        let addr = p.addr.lock().clone();
        (!addr.is_empty()).then_some(addr)
    }

    /// The queue for node `id` has room for `len` more bytes of events (true for a node without a queue yet).
    pub(crate) fn has_room(&self, id: NodeId, len: usize) -> bool {
        self.peers.lock().get(&id).is_none_or(|p| p.outbox.has_room(len, 0))
    }

    /// The nodes a link is up to.
    pub(crate) fn up_peers(&self) -> Vec<NodeId> {
        self.peers.lock().values().filter(|p| p.is_up()).map(|p| p.id).collect()
    }

    /// Closes the link to `id` if it is up and has nothing queued (nobody needs it any more); the peer sees the link
    /// end as a lost link. A later message dials it again.
    pub(crate) fn release(&self, id: NodeId) -> bool {
        let Some(p) = self.peers.lock().get(&id).cloned() else { return false };
        if !p.is_up() || !p.outbox.is_empty() {
            return false;
        }
        tracing::debug!(node = %id, "closing a link no channel needs");
        p.abort();
        true
    }

    /// Forgets the peers nothing uses: no link up or being dialled, nothing queued, no lag notice pending, and no
    /// reference but the table's (no routing table sends to it). Such a peer was made for a node this node may have
    /// sent to once (a routing table made while a source had an OUT-filter, say); a later message makes a new one.
    /// Returns how many were forgotten.
    pub(crate) fn forget_unused(&self) -> usize {
        let mut peers = self.peers.lock();
        let before = peers.len();
        peers.retain(|_, p| {
            Arc::strong_count(p) > 1
                || !matches!(*p.link.lock(), LinkState::Idle)
                || !p.outbox.is_empty()
                || !p.lag.lock().is_empty()
        });
        before - peers.len()
    }

    /// Why the last attempt to link with another node failed, if one did.
    pub(crate) fn last_error(&self) -> Option<LinkFailure> {
        self.last_error.lock().clone()
    }

    /// The link to `id` is gone: forget the peer unless a new link is up, and tell the handler.
    fn peer_lost(&self, id: NodeId) {
        if self.tasks.is_closed() {
            return;
        }
        {
            let mut peers = self.peers.lock();
            if peers.get(&id).is_some_and(|p| !p.is_up()) {
                peers.remove(&id);
            }
        }
        if let Some(h) = self.handler.upgrade() {
            h.peer_lost(id);
        }
    }

    /// A link to `id` is up: tell the handler.
    fn peer_up(&self, id: NodeId) {
        if self.tasks.is_closed() {
            return;
        }
        if let Some(h) = self.handler.upgrade() {
            h.peer_up(id);
        }
    }

    /// Lets every link drain what it has queued, then close gracefully (each writer sends FIN once its queue is
    /// empty and the link ends when the peer closes its side); waits at most `limit`. A link still being set up with
    /// frames queued for it (dialled, or waiting for the peer's own connection) is waited for too: its frames go
    /// once it is up, and a node that publishes and leaves at once would otherwise abandon them while the other node
    /// is merely slow to answer. A dial that fails meanwhile ends the wait for that link, as a link that broke before
    /// the shutdown: the other node's loss accounting tells its sinks what they missed.
    /// Returns the links that still held frames when it stopped waiting: those still up at the limit (their writer
    /// had not written everything), and those that were down or still being set up with frames queued.
    pub(crate) async fn drain(&self, limit: Duration) -> Vec<Undrained> {
        self.closing.store(true, Ordering::Release);
        let peers: Vec<_> = self.peers.lock().values().cloned().collect();
        for p in &peers {
            p.outbox.readable.notify_one();
        }
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline && peers.iter().any(|p| p.is_up() || !p.outbox.is_empty()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peers
            .iter()
            .filter_map(|p| {
                let up = p.is_up();
                let left = p.outbox.unsent();
                (up || left.frames > 0).then(|| Undrained {
                    node: p.id,
                    addr: p.addr.lock().clone(),
                    up,
                    events: left.events,
                    frames: left.frames,
                    bytes: left.bytes,
                })
            })
            .collect()
    }

    /// Drops every link at once without telling anyone.
    pub(crate) fn abort_all(&self) {
        for (_, p) in self.peers.lock().drain() {
            p.abort();
        }
        #[cfg(feature = "quic")]
        for ep in [self.quic.get(), self.quic_urgent.get()].into_iter().flatten() {
            ep.close();
        }
    }

    /// The UDP port of the node's endpoint for urgent QUIC connections, if it has one.
    pub(crate) fn quic_urgent_port(&self) -> Option<u16> {
        #[cfg(feature = "quic")]
        return self.quic_urgent.get().and_then(|ep| ep.local_addr().ok()).map(|a| a.port());
        #[cfg(not(feature = "quic"))]
        None
    }
}

/// Heartbeat state shared by a link's reader and writer.
pub(crate) struct LinkLive {
    live: Mutex<Liveness>,
    /// The reader is waiting for room in a Block sink and so not reading: silence then says nothing about the peer.
    reader_waiting: AtomicBool,
}

impl LinkLive {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Liveness> {
        self.live.lock()
    }
}

/// A `Close` frame.
fn close(code: CloseCode, reason: &str) -> Bytes {
    Message::Close { code, reason: reason.to_owned() }.to_bytes()
}

/// Membership messages (joins, snapshots and their answers) a peer may send per second, and in one burst. Joins and
/// attribute updates are rare and coalesced by well-behaved senders; this bounds what a misbehaving or hostile peer
/// can make this node do.
const MEMBERSHIP_RATE: f64 = 500.0;
const MEMBERSHIP_BURST: f64 = 1000.0;

/// The membership budget of one peer.
struct MembershipGate {
    tokens: f64,
    at: std::time::Instant,
    /// Snapshots that arrived over budget, the newest per channel and node: they are applied later, not lost, since
    /// only the newest counts anyway.
    deferred: Vec<Message>,
}

/// Counters of one link (the TCP connection to another node, over all its connections in turn), from
/// `Node::link_stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// The other node.
    pub node: NodeId,
    /// The address it is dialled at.
    pub addr: String,
    /// A connection is up now.
    pub up: bool,
    /// Event frames sent on the link (written or queued), one per event whatever the number of sinks behind it.
    pub event_frames: u64,
    /// Writes to the socket (each carries one or more frames, events and control messages).
    pub writes: u64,
    /// Of those, events a submitting task wrote itself on a quiet link (a plain TCP link's socket, a QUIC link's main
    /// stream) rather than through the link's writer task.
    pub direct_writes: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Bytes read.
    pub bytes_received: u64,
    /// Bytes queued for the link and not written yet.
    pub queued_bytes: usize,
    /// Connections that came up (dialled or accepted); more than one means the link was re-established.
    pub connects: u64,
    /// Connections declared dead because the other node fell silent for the heartbeat timeout.
    pub heartbeat_timeouts: u64,
    /// Events that passed their deadline while queued for this link: not sent, their expiry notice went instead.
    pub expired: u64,
    /// The transport of the current (or last) connection: TCP or QUIC.
    pub transport: crate::Transport,
    /// The current (or last) connection is a same-host one (a Unix-domain socket; see
    /// [`crate::NodeBuilder::same_host`]); `transport` then says `Tcp`, whose link it replaces.
    pub same_host: bool,
    /// The current (or last) connection is a same-host one whose bytes go through shared-memory rings (see
    /// [`crate::NodeBuilder::shared_memory`]); `false` for one over the socket itself.
    pub shared_memory: bool,
    /// Best-effort events sent as QUIC datagrams (see [`crate::EventOptions::best_effort`]); not counted in
    /// `event_frames`, `writes` or `bytes_sent`, which are the stream's.
    pub datagrams_sent: u64,
    /// Datagrams that arrived (each one best-effort event, delivered or, if late, dropped and counted as missed).
    pub datagrams_received: u64,
    /// This node sends its urgent frames (priorities 1 to 3) to the other on a connection of their own (a TCP link,
    /// see [`crate::NodeBuilder::urgent_connection`]) or a stream of their own (QUIC) now.
    pub urgent_apart: bool,
    /// Those urgent frames go on a connection of their own (TCP or QUIC: see
    /// [`crate::NodeBuilder::urgent_connection`]), not a stream of the link's one connection.
    pub urgent_connection: bool,
    /// This node dials the link's urgent connection (it dialled the link, and both nodes take urgent connections); the
    /// other node accepts it.
    pub urgent_dialler: bool,
}

/// A link that a shutdown stopped before it had sent everything (see [`crate::ShutdownReport`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Undrained {
    /// The other node.
    pub node: NodeId,
    /// The address it is dialled at.
    pub addr: String,
    /// The link was up when the shutdown gave up on it (still writing: the other node or the network did not take
    /// its bytes in time); `false`: it was down (it never came up, or broke and was not made again), so nothing
    /// queued for it could go.
    pub up: bool,
    /// Events still queued for the link, not handed to its connection: they are lost. A lower bound of what the
    /// other node never gets: what the link's writer had taken, and what the connection had not delivered yet, is
    /// not counted.
    pub events: u64,
    /// Frames still queued (the events' and control frames, a farewell among them).
    pub frames: u64,
    /// Bytes still queued.
    pub bytes: usize,
}

/// Another node, as this node sees it.
pub(crate) struct Peer {
    pub(crate) id: NodeId,
    /// Unique among the `Peer`s this process ever made (see `Peer::serial`).
    serial: u64,
    pub(crate) addr: Mutex<String>,
    pub(crate) outbox: Outbox,
    link: Mutex<LinkState>,
    /// Events dropped at the full outbox, not reported yet.
    lag: Mutex<Vec<PendingLag>>,
    /// Read by every submit: kept off the cache lines the link's tasks write.
    flags: PeerFlags,
    membership: Mutex<MembershipGate>,
    pub(crate) frames_sent: AtomicU64,
    /// The transport of the current (or last) connection.
    transport: Mutex<crate::Transport>,
    /// The current connection's datagram path (QUIC links only).
    datagrams: Mutex<Option<Arc<Datagrams>>>,
    /// The current link's urgent connection slot (see `urgent.rs`; TCP, or QUIC with a stream per priority), if both
    /// ends set one up.
    pub(crate) urgent_tcp: Mutex<Option<Arc<urgent::TcpUrgent>>>,
    /// Counters for `Node::link_stats`.
    pub(crate) counters: LinkCounters,
}

/// A link's counters beyond `frames_sent`, read by `Node::link_stats`.
#[derive(Default)]
pub(crate) struct LinkCounters {
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) heartbeat_timeouts: AtomicU64,
    /// The current (or last) connection is a same-host one (`local.rs`).
    pub(crate) same_host: AtomicBool,
    /// ... and runs over shared memory.
    pub(crate) shared_memory: AtomicBool,
    pub(crate) datagrams_sent: AtomicU64,
    pub(crate) datagrams_received: AtomicU64,
}

/// A peer's flags that every submit reads, on a cache line of their own.
#[repr(align(64))]
struct PeerFlags {
    /// `Peer::lag` holds something.
    has_lag: AtomicBool,
    /// Counts the times queued frames were thrown away with a broken link; see `Peer::epoch`.
    epoch: AtomicU64,
}

/// Events of one source, meant for the same sinks, dropped at a full outbox.
struct PendingLag {
    /// The outbox lane of the source's events, where the notice keeps its place among them.
    lane: u8,
    channel: ChannelId,
    source: LocalId,
    /// The peer's instance of the channel whose sinks missed the events.
    instance: u64,
    sinks: Vec<LocalId>,
    count: u64,
}

enum LinkState {
    Idle,
    Dialing { gen: u64 },
    Up { gen: u64, outbound: bool, tasks: [AbortHandle; 2] },
}

impl Peer {
    pub(crate) fn new(id: NodeId, addr: String, limit: usize) -> Self {
        static SERIALS: AtomicU64 = AtomicU64::new(1);
        Peer {
            id,
            serial: SERIALS.fetch_add(1, Ordering::Relaxed),
            addr: Mutex::new(addr),
            outbox: Outbox::new(limit),
            link: Mutex::new(LinkState::Idle),
            lag: Mutex::new(Vec::new()),
            flags: PeerFlags { has_lag: AtomicBool::new(false), epoch: AtomicU64::new(0) },
            membership: Mutex::new(MembershipGate {
                tokens: MEMBERSHIP_BURST,
                at: std::time::Instant::now(),
                deferred: Vec::new(),
            }),
            frames_sent: AtomicU64::new(0),
            transport: Mutex::new(crate::Transport::Tcp),
            datagrams: Mutex::new(None),
            urgent_tcp: Mutex::new(None),
            counters: LinkCounters::default(),
        }
    }

    /// Starts dialling if there is no link.
    fn ensure_link<H: LinkHandler>(self: &Arc<Self>, links: &Arc<Links<H>>) {
        let mut link = self.link.lock();
        if matches!(*link, LinkState::Idle) {
            let gen = links.next_gen();
            *link = LinkState::Dialing { gen };
            drop(link);
            links.tasks.spawn(dial::dial(links.clone(), self.clone(), gen));
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        matches!(*self.link.lock(), LinkState::Up { .. })
    }

    /// Sends a best-effort event as a datagram if the link has a datagram path and `len` bytes fit in one now:
    /// `make` writes the datagram. False if it did not go that way (the caller queues the event on the stream); true
    /// if it went, or was dropped by the test hook as a network would.
    pub(crate) fn send_datagram(&self, len: usize, make: impl FnOnce() -> Bytes) -> bool {
        let Some(d) = self.datagrams.lock().clone() else { return false };
        if d.max_size().is_none_or(|max| len > max) {
            return false;
        }
        match d.send(make()) {
            None => false,
            Some(sent) => {
                if sent {
                    self.counters.datagrams_sent.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
        }
    }

    /// Bounds what a QUIC link's connection holds unsent or unacknowledged to `bytes` (the link carries priorities:
    /// see `NodeBuilder::send_lowat`); other links have no such queue outside the kernel's.
    pub(crate) fn shorten_send_queue(&self, bytes: u32) {
        if let Some(d) = self.datagrams.lock().as_ref() {
            d.set_send_window(u64::from(bytes));
        }
    }

    /// The link has a datagram path now.
    pub(crate) fn has_datagrams(&self) -> bool {
        self.datagrams.lock().is_some()
    }

    /// Remembers that `n` events of `source` meant for `sinks` of the peer's instance `instance` of the channel were
    /// dropped for this peer because the link was full. `lane`: the outbox lane of the source's events.
    pub(crate) fn add_lag(
        &self,
        channel: ChannelId,
        source: LocalId,
        instance: u64,
        sinks: &[LocalId],
        n: u64,
        lane: u8,
    ) {
        let mut lag = self.lag.lock();
        let same = |l: &PendingLag| {
            l.channel == channel && l.source == source && l.instance == instance && l.sinks == sinks && l.lane == lane
        };
        match lag.iter_mut().find(|l| same(l)) {
            Some(l) => l.count += n,
            None => lag.push(PendingLag { lane, channel, source, instance, sinks: sinks.to_vec(), count: n }),
        }
        self.flags.has_lag.store(true, Ordering::Release);
    }

    /// Takes one unit of this peer's membership budget; false if it is spent.
    fn take_membership_token(&self) -> bool {
        let mut g = self.membership.lock();
        let now = std::time::Instant::now();
        g.tokens =
            (g.tokens + now.saturating_duration_since(g.at).as_secs_f64() * MEMBERSHIP_RATE).min(MEMBERSHIP_BURST);
        g.at = now;
        if g.tokens >= 1.0 {
            g.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Keeps a snapshot that arrived over budget, in place of an older one of the same channel and node. Returns true
    /// if nothing was waiting before (the caller then schedules `take_deferred`).
    fn defer_snapshot(&self, msg: Message) -> bool {
        let Message::Snapshot { channel, node, .. } = &msg else { return false };
        let mut g = self.membership.lock();
        let first = g.deferred.is_empty();
        let same =
            |m: &Message| matches!(m, Message::Snapshot { channel: c, node: n, .. } if c == channel && n == node);
        match g.deferred.iter_mut().find(|m| same(m)) {
            Some(slot) => *slot = msg,
            None => g.deferred.push(msg),
        }
        first
    }

    /// The deferred snapshots, to apply now.
    fn take_deferred(&self) -> Vec<Message> {
        std::mem::take(&mut self.membership.lock().deferred)
    }

    /// Changes whenever frames queued for this peer were thrown away because its link broke: whatever a source told
    /// the peer before may not have arrived.
    pub(crate) fn epoch(&self) -> u64 {
        self.flags.epoch.load(Ordering::Acquire)
    }

    /// This `Peer` among all a process ever made: unused `Peer`s are dropped (`Links::forget_unused`), and a new one
    /// for the same node may be allocated where the old one was, so its address does not tell them apart.
    pub(crate) fn serial(&self) -> u64 {
        self.serial
    }

    /// Sends pending lag notices, if any, ahead of the next event.
    pub(crate) fn flush_lag(&self) {
        if !self.flags.has_lag.load(Ordering::Acquire) {
            return;
        }
        let pending = std::mem::take(&mut *self.lag.lock());
        self.flags.has_lag.store(false, Ordering::Release);
        for PendingLag { lane, channel, source, instance, sinks, count } in pending {
            self.outbox.push_control_in(lane, Message::Lagged { channel, source, instance, count, sinks }.to_bytes());
        }
    }

    /// Drops the link without telling anyone (used by `Node::kill` to simulate a crash).
    fn abort(&self) {
        let mut link = self.link.lock();
        if let LinkState::Up { tasks, .. } = &*link {
            for t in tasks {
                t.abort();
            }
        }
        *link = LinkState::Idle;
        // The aborted writer's socket must close with it, not live on for direct writes.
        self.outbox.set_direct(None);
        *self.datagrams.lock() = None;
    }

    /// The link with generation `gen` ended. Returns true if it was the current one (the peer is then lost and
    /// whatever was queued for it is dropped).
    fn link_down(&self, gen: u64) -> bool {
        self.link_end(gen, true)
    }

    /// Ends the link with generation `gen`; keeps the queue if `clear` is false (the peer's own connection is coming).
    fn link_end(&self, gen: u64, clear: bool) -> bool {
        let mut link = self.link.lock();
        let current = match &*link {
            LinkState::Up { gen: g, .. } | LinkState::Dialing { gen: g } => *g == gen,
            LinkState::Idle => false,
        };
        if current {
            if let LinkState::Up { tasks, .. } = &*link {
                // Stop the other half of the link too (aborting the caller itself is harmless: it has no await left).
                for t in tasks {
                    t.abort();
                }
            }
            *link = LinkState::Idle;
            // The link's urgent connection goes with it (taken under the link's lock: a new link sets its own under
            // it). The halves that no task took yet (the write half, where this node's outbox never carried
            // priorities) would otherwise stay open until the next link of this peer.
            let urgent = self.urgent_tcp.lock().take();
            drop(link);
            if let Some(u) = urgent {
                u.close();
            }
            self.outbox.set_direct(None);
            *self.datagrams.lock() = None;
            if clear {
                self.outbox.clear();
                self.flags.epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
        current
    }
}
