//! The node: one process, one listening port, any number of channels. It owns the links to other nodes and drives
//! each channel's membership state machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kecho_proto::membership::{MembershipConfig, OpenMode};
use kecho_proto::{ChannelId, LocalId, Message, NodeId, MAX_FRAME_DEFAULT};
use kecho_registry::RegistryClient;
use parking_lot::{Mutex, RwLock};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::channel::{Channel, ChannelInner};
use crate::error::{Error, Result};
use crate::filter::ContentFilter;
use crate::link::{self, Peer};

/// The current time as the protocol core wants it. Taken from tokio's clock so that tests with paused time work.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// How a node behaves. Build with [`Node::builder`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where the node listens for other nodes. Default `127.0.0.1:0` (any free port).
    pub listen: SocketAddr,
    /// The address other nodes dial to reach this one, if not the listening address: needed when listening on an
    /// unspecified address (`0.0.0.0`), behind address translation, or through a proxy. A port of 0 means the port
    /// the node listens on.
    pub advertise: Option<SocketAddr>,
    /// The registry; `None` uses the process-wide in-process registry.
    pub registry: Option<SocketAddr>,
    /// A link silent for this long is declared dead and its members removed. Default 3 s.
    pub heartbeat_timeout: Duration,
    /// Bytes of events queued per link before the link counts as full. Default 8 MiB.
    pub link_queue_bytes: usize,
    /// Largest frame accepted or sent. Default 16 MiB.
    pub max_frame: usize,
    /// Default capacity of a sink's queue, in events. Default 1024.
    pub sink_capacity: usize,
    /// How long a dial may take.
    pub connect_timeout: Duration,
    /// Most inbound connections in their handshake at once; more are closed at once.
    pub max_connections: usize,
    /// Timing of channel membership (leases, join retries, open timeout).
    pub membership: MembershipConfig,
    /// How long a source keeps counting the events that a node cut off from a channel (its link lost, not a clean
    /// leave) would have received, to report them to it as missed if it comes back. Default 60 s.
    pub gap_memory: Duration,
    /// TLS for node links (mutually authenticated against a CA); `None` (the default) runs them in plaintext. Every
    /// node of a deployment must agree: a plaintext node dialling a TLS node is refused with a reason.
    pub tls: Option<crate::TlsConfig>,
    /// This node's identity (its signing key; its node id derives from it). `None` (the default) makes a new one at
    /// start; give one to keep a node id across restarts.
    pub identity: Option<kecho_proto::handshake::Identity>,
    /// Access control: the policies this node requires in channels and the credentials it presents (see
    /// [`AccessConfig`]). Default: none.
    pub access: AccessConfig,
}

/// Which access policies a node requires and which credentials it presents, per channel (see `kecho_proto::access`).
///
/// A channel created by a node with a policy for its name has that policy; a node joining a channel with a policy
/// of its own refuses a channel with any other (someone else's channel under that name), and a node without one
/// adopts the channel's. Give every node of a deployment the policy, so that whoever creates the channel first
/// creates it protected.
#[derive(Clone, Debug, Default)]
pub struct AccessConfig {
    /// Policies by channel pattern: a name, or a prefix followed by `*`. The first match applies.
    pub policies: Vec<(String, kecho_proto::access::Policy)>,
    /// Credentials; for each channel the first one that covers it and was issued to this node is presented.
    pub tokens: Vec<kecho_proto::access::Token>,
}

impl AccessConfig {
    /// The policy this node requires in channel `name`.
    pub fn policy_for(&self, name: &str) -> Option<kecho_proto::access::Policy> {
        let matches = |pattern: &str| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => pattern == name,
        };
        self.policies.iter().find(|(p, _)| matches(p)).map(|(_, p)| *p)
    }

    /// The credential a node with public key `holder` presents in channel `name`.
    pub fn token_for(&self, name: &str, holder: &[u8; 32]) -> Option<kecho_proto::access::Token> {
        self.tokens.iter().find(|t| t.covers(name) && &t.holder == holder).cloned()
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            registry: None,
            heartbeat_timeout: Duration::from_secs(3),
            link_queue_bytes: 8 << 20,
            max_frame: MAX_FRAME_DEFAULT,
            sink_capacity: 1024,
            connect_timeout: Duration::from_secs(2),
            max_connections: 4096,
            membership: MembershipConfig::default(),
            gap_memory: Duration::from_secs(60),
            tls: None,
            identity: None,
            access: AccessConfig::default(),
        }
    }
}

/// Builds a [`Node`].
#[derive(Clone, Debug, Default)]
pub struct NodeBuilder {
    cfg: NodeConfig,
    registry: Option<RegistryClient>,
}

impl NodeBuilder {
    /// Listening address.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.cfg.listen = addr;
        self
    }
    /// Requires access policy `policy` in the channels matching `pattern` (a name, or a prefix followed by `*`).
    pub fn policy(mut self, pattern: &str, policy: kecho_proto::access::Policy) -> Self {
        self.cfg.access.policies.push((pattern.to_owned(), policy));
        self
    }

    /// Presents credential `token` in the channels it covers. It must have been issued to this node's identity
    /// (see [`NodeBuilder::identity`]).
    pub fn token(mut self, token: kecho_proto::access::Token) -> Self {
        self.cfg.access.tokens.push(token);
        self
    }

    /// This node's identity (see [`NodeConfig::identity`]).
    pub fn identity(mut self, identity: kecho_proto::handshake::Identity) -> Self {
        self.cfg.identity = Some(identity);
        self
    }
    /// Runs node links over TLS (see [`NodeConfig::tls`]).
    pub fn tls(mut self, tls: crate::TlsConfig) -> Self {
        self.cfg.tls = Some(tls);
        self
    }
    /// The address other nodes dial to reach this one (see [`NodeConfig::advertise`]).
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.cfg.advertise = Some(addr);
        self
    }
    /// Use the registry at `addr` instead of the in-process one.
    pub fn registry(mut self, addr: SocketAddr) -> Self {
        self.cfg.registry = Some(addr);
        self
    }
    /// Use this registry client (e.g. a private in-process registry in tests).
    pub fn registry_client(mut self, client: RegistryClient) -> Self {
        self.registry = Some(client);
        self
    }
    /// Heartbeat timeout.
    pub fn heartbeat_timeout(mut self, t: Duration) -> Self {
        self.cfg.heartbeat_timeout = t;
        self
    }
    /// Per-link queue limit in bytes.
    pub fn link_queue_bytes(mut self, n: usize) -> Self {
        self.cfg.link_queue_bytes = n;
        self
    }
    /// Default sink capacity.
    pub fn sink_capacity(mut self, n: usize) -> Self {
        self.cfg.sink_capacity = n;
        self
    }
    /// Largest frame.
    pub fn max_frame(mut self, n: usize) -> Self {
        self.cfg.max_frame = n;
        self
    }
    /// Membership timing.
    pub fn membership(mut self, m: MembershipConfig) -> Self {
        self.cfg.membership = m;
        self
    }
    /// Replaces the whole configuration.
    pub fn config(mut self, cfg: NodeConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Starts the node: binds the listening port and starts accepting links. Needs a tokio runtime.
    pub async fn start(self) -> Result<Node> {
        let cfg = self.cfg;
        let listener =
            TcpListener::bind(cfg.listen).await.map_err(|source| Error::Listen { addr: cfg.listen, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Listen { addr: cfg.listen, source })?;
        let advertised = match cfg.advertise {
            Some(mut a) => {
                if a.port() == 0 {
                    a.set_port(addr.port());
                }
                a
            }
            None => addr,
        };
        if advertised.ip().is_unspecified() {
            return Err(Error::Invalid(format!(
                "this node listens on {addr}, which other nodes cannot dial: give an address to advertise"
            )));
        }
        let registry = match (self.registry, cfg.registry) {
            (Some(c), _) => c,
            (None, Some(a)) => RegistryClient::remote(a),
            (None, None) => RegistryClient::in_process(),
        };
        let identity =
            cfg.identity.clone().unwrap_or_else(|| kecho_proto::handshake::Identity::from_secret(rand::random()));
        let inner = Arc::new(NodeInner {
            id: identity.node_id(),
            identity,
            addr,
            advertised,
            last_link_error: Mutex::new(None),
            conn_slots: Arc::new(Semaphore::new(cfg.max_connections)),
            filters: Mutex::new(HashMap::new()),
            cfg,
            registry,
            peers: Mutex::new(HashMap::new()),
            by_id: RwLock::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
            gen: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            runtime: tokio::runtime::Handle::current(),
            closed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        inner.spawn(accept_loop(weak, listener));
        tracing::debug!(node = %inner.id, %addr, "node started");
        let guard = Arc::new(NodeGuard { node: Arc::downgrade(&inner) });
        Ok(Node { inner, guard })
    }
}

/// Counters of one link (the TCP connection to another node, over all its connections in turn), from
/// [`Node::link_stats`].
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
}

/// A kecho node. Cheap to clone; all clones are the same node.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
    pub(crate) guard: Arc<NodeGuard>,
}

/// Stops the node when the last handle on it (node, channel, source or sink) is dropped, as if the process ended:
/// the node's tasks hold the node themselves, so without this it would run on unseen.
pub(crate) struct NodeGuard {
    node: std::sync::Weak<NodeInner>,
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if let Some(n) = self.node.upgrade() {
            if !n.closed.load(Ordering::Acquire) {
                tracing::debug!(node = %n.id, "last handle dropped; stopping the node");
                n.stop();
            }
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("addr", &self.inner.addr).finish()
    }
}

impl Node {
    /// A builder with the default configuration.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// Starts a node with the default configuration (loopback, any port, in-process registry).
    pub async fn start() -> Result<Node> {
        NodeBuilder::default().start().await
    }

    /// The address this node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The address other nodes reach this one at: the advertised address, or the listening one.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.inner.advertised
    }

    /// Open links to other nodes. There is at most one per pair of nodes, whatever the number of shared channels.
    pub fn links(&self) -> usize {
        self.inner.peers.lock().values().filter(|p| p.is_up()).count()
    }

    /// Counters of every link this node has had (up or not), one entry per other node, in no particular order.
    pub fn link_stats(&self) -> Vec<LinkStats> {
        let peers: Vec<_> = self.inner.peers.lock().values().cloned().collect();
        peers
            .iter()
            .map(|p| {
                let c = &p.counters;
                LinkStats {
                    node: p.id,
                    addr: p.addr.lock().clone(),
                    up: p.is_up(),
                    event_frames: p.outbox.events(),
                    writes: p.frames_sent.load(Ordering::Relaxed) + p.outbox.direct_writes.load(Ordering::Relaxed),
                    bytes_sent: c.bytes_sent.load(Ordering::Relaxed) + p.outbox.direct_bytes.load(Ordering::Relaxed),
                    bytes_received: c.bytes_received.load(Ordering::Relaxed),
                    queued_bytes: p.outbox.queued_bytes(),
                    connects: c.connects.load(Ordering::Relaxed),
                    heartbeat_timeouts: c.heartbeat_timeouts.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Handles on the channels this node has open, in no particular order.
    pub fn channels(&self) -> Vec<Channel> {
        let chans: Vec<_> = self.inner.by_name.lock().values().cloned().collect();
        chans.into_iter().filter(|c| c.is_ready()).map(|c| Channel::new(c, self.guard.clone())).collect()
    }

    /// The registry this node uses.
    pub fn registry(&self) -> &RegistryClient {
        &self.inner.registry
    }

    /// Creates a channel; fails if it exists.
    pub async fn create_channel(&self, name: &str) -> Result<Channel> {
        self.open_with(name, OpenMode::Create).await
    }

    /// Opens an existing channel; fails if there is none.
    pub async fn open_channel(&self, name: &str) -> Result<Channel> {
        self.open_with(name, OpenMode::Open).await
    }

    /// Opens a channel, creating it if it does not exist.
    pub async fn channel(&self, name: &str) -> Result<Channel> {
        self.open_with(name, OpenMode::OpenOrCreate).await
    }

    async fn open_with(&self, name: &str, mode: OpenMode) -> Result<Channel> {
        if name.is_empty() || name.len() > kecho_proto::registry::MAX_NAME {
            return Err(Error::Invalid(format!("channel name must be 1 to {} bytes", kecho_proto::registry::MAX_NAME)));
        }
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(name.to_owned()));
        }
        let existing = self.inner.by_name.lock().get(name).cloned();
        if let Some(ch) = existing {
            ch.wait_ready().await?;
            if mode == OpenMode::Create {
                return Err(Error::ChannelExists(name.to_owned()));
            }
            return Ok(Channel::new(ch, self.guard.clone()));
        }
        let ch = ChannelInner::new(&self.inner, name);
        self.inner.by_name.lock().insert(name.to_owned(), ch.clone());
        ch.open(mode);
        match ch.wait_ready().await {
            Ok(()) => Ok(Channel::new(ch, self.guard.clone())),
            Err(e) => {
                self.inner.forget_channel(&ch);
                Err(e)
            }
        }
    }

    /// Leaves every channel cleanly (members are told), then closes all links.
    pub async fn shutdown(&self) {
        let chans: Vec<_> = self.inner.by_name.lock().values().cloned().collect();
        for ch in chans {
            ch.leave().await;
        }
        // Let every link drain what it has queued (events and leave messages), then close it gracefully: each writer
        // sends FIN once its queue is empty and the link ends when the peer closes its side.
        self.inner.closing.store(true, Ordering::Release);
        let peers: Vec<_> = self.inner.peers.lock().values().cloned().collect();
        for p in &peers {
            p.outbox.readable.notify_one();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline && peers.iter().any(|p| p.is_up()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.stop();
    }

    /// Stops everything at once without telling anyone, as if the process crashed. For tests.
    pub fn kill(&self) {
        self.inner.stop();
    }
}

pub(crate) struct NodeInner {
    pub(crate) id: NodeId,
    pub(crate) addr: SocketAddr,
    /// Proves this node's id on every link.
    pub(crate) identity: kecho_proto::handshake::Identity,
    /// The address other nodes dial (`NodeConfig::advertise`, or the listening address).
    pub(crate) advertised: SocketAddr,
    /// Why the last attempt to link with another node failed, to explain a channel that cannot be opened.
    pub(crate) last_link_error: Mutex<Option<String>>,
    pub(crate) cfg: NodeConfig,
    pub(crate) registry: RegistryClient,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    by_id: RwLock<HashMap<ChannelId, Arc<ChannelInner>>>,
    by_name: Mutex<HashMap<String, Arc<ChannelInner>>>,
    gen: AtomicU64,
    tasks: Mutex<Vec<AbortHandle>>,
    /// The runtime the node started on: its tasks run there even when the call that needs one comes from another
    /// thread (a `Source` dropped on a plain thread must still be able to dial to announce its departure).
    runtime: tokio::runtime::Handle,
    conn_slots: Arc<Semaphore>,
    filters: Mutex<HashMap<String, Arc<ContentFilter>>>,
    pub(crate) closed: AtomicBool,
    /// Set by a graceful shutdown: writers finish their queues and close.
    pub(crate) closing: AtomicBool,
}

impl NodeInner {
    pub(crate) fn next_gen(&self) -> u64 {
        self.gen.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Spawns a task that dies with the node.
    pub(crate) fn spawn<F>(&self, fut: F) -> AbortHandle
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let h = self.runtime.spawn(fut).abort_handle();
        let mut tasks = self.tasks.lock();
        tasks.retain(|t| !t.is_finished());
        tasks.push(h.clone());
        h
    }

    fn stop(&self) {
        self.closed.store(true, Ordering::Release);
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        for p in self.peers.lock().drain() {
            p.1.abort();
        }
        for ch in self.by_name.lock().drain() {
            ch.1.close_local();
        }
        self.by_id.write().clear();
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

    pub(crate) fn is_peer_known(&self, id: NodeId) -> bool {
        self.peers.lock().contains_key(&id)
    }

    /// Sends a membership message, dialling if needed.
    pub(crate) fn send(self: &Arc<Self>, to: NodeId, addr: &str, msg: &Message) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let p = self.peer(to, addr);
        p.send_control(self, msg);
    }

    /// The link to `id` is gone: every channel drops its members.
    pub(crate) fn peer_lost(&self, id: NodeId) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut peers = self.peers.lock();
            if let Some(p) = peers.get(&id) {
                if !p.is_up() {
                    peers.remove(&id);
                }
            }
        }
        let chans: Vec<_> = self.by_name.lock().values().cloned().collect();
        for ch in chans {
            ch.peer_lost(id);
        }
    }

    /// A content filter compiled once per node and expression, shared by every route that uses it.
    pub(crate) fn content_filter(&self, expr: &str) -> Result<Arc<ContentFilter>, crate::filter::FilterError> {
        let mut cache = self.filters.lock();
        if let Some(f) = cache.get(expr) {
            return Ok(f.clone());
        }
        let f = Arc::new(ContentFilter::compile(expr)?);
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(expr.to_owned(), f.clone());
        Ok(f)
    }

    pub(crate) fn channel_by_id(&self, id: ChannelId) -> Option<Arc<ChannelInner>> {
        self.by_id.read().get(&id).cloned()
    }

    pub(crate) fn index_channel(&self, old: Option<ChannelId>, new: ChannelId, ch: &Arc<ChannelInner>) {
        let mut map = self.by_id.write();
        if let Some(old) = old {
            if map.get(&old).is_some_and(|c| Arc::ptr_eq(c, ch)) {
                map.remove(&old);
            }
        }
        map.insert(new, ch.clone());
    }

    pub(crate) fn forget_channel(&self, ch: &Arc<ChannelInner>) {
        let mut by_name = self.by_name.lock();
        if by_name.get(ch.name()).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            by_name.remove(ch.name());
        }
        drop(by_name);
        self.by_id.write().retain(|_, c| !Arc::ptr_eq(c, ch));
    }

    /// Handles one frame from an established link. An error closes the link.
    /// `targets` holds the sink list of a `Targets` frame until the event it announces arrives.
    /// Delivers events that arrived together on one link, all on `channel` (see `ChannelInner::deliver_batch`).
    pub(crate) async fn deliver_events(&self, peer: &Peer, channel: ChannelId, batch: &mut crate::channel::Batch) {
        match self.channel_by_id(channel) {
            Some(ch) => ch.deliver_batch(peer.id, batch).await,
            None => batch.events.clear(),
        }
    }

    pub(crate) async fn handle_frame(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        msg: Message,
        targets: &mut Option<(ChannelId, Vec<LocalId>)>,
    ) -> Result<(), String> {
        match msg {
            Message::Event(e) => {
                let chosen = take_targets(targets, e.channel)?;
                if let Some(ch) = self.channel_by_id(e.channel) {
                    ch.deliver_remote(peer.id, e, chosen).await;
                }
            }
            Message::InstallFilter { channel, req, kind, module } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.install_remote(peer.id, req, kind, module);
                }
            }
            Message::FilterStatus { channel, req, ok, message } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.filter_status(peer.id, req, ok, message);
                }
            }
            Message::Targets { channel, sinks } => {
                if targets.replace((channel, sinks)).is_some() {
                    return Err("two Targets frames in a row".into());
                }
            }
            Message::Lagged { channel, count, sinks, .. } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.remote_lag(peer.id, count, &sinks);
                }
            }
            Message::Routed { channel, source, skipped } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.routed(peer.id, source, skipped);
                }
            }
            Message::Ping(n) => {
                // Any frame proves liveness, so a pong is only needed on an idle link. Skipping it otherwise keeps a
                // peer that pings without reading from growing our queue.
                if peer.outbox.is_empty() {
                    peer.outbox.push_control(Message::Pong(n).to_bytes());
                }
            }
            Message::Pong(_) => {}
            Message::Close { code, reason } => return Err(format!("peer closed the link ({code:?}): {reason}")),
            Message::JoinRequest { .. }
            | Message::JoinAccept { .. }
            | Message::JoinRedirect { .. }
            | Message::JoinRefused { .. }
                if !peer.take_membership_token() =>
            {
                // Over budget: a genuine joiner asks again after `MembershipConfig::join_attempt`.
                tracing::debug!(peer = %peer.id, "membership budget spent: dropping a {} message", msg.kind());
            }
            Message::Snapshot { .. } if !peer.take_membership_token() => {
                if peer.defer_snapshot(msg) {
                    let (node, peer) = (self.clone(), peer.clone());
                    self.spawn(async move {
                        // Apply the newest of what waited once the budget allows, one pass per refill.
                        let wait =
                            Duration::from_secs_f64(1.0 / crate::link::MEMBERSHIP_RATE).max(Duration::from_millis(20));
                        tokio::time::sleep(wait).await;
                        for m in peer.take_deferred() {
                            if let Message::Snapshot { channel, .. } = &m {
                                if let Some(ch) = node.channel_by_id(*channel) {
                                    ch.membership_input(peer.id, m);
                                }
                            }
                        }
                    });
                }
            }
            Message::JoinRequest { channel, ref addr, .. } => match self.channel_by_id(channel) {
                Some(ch) => ch.membership_input(peer.id, msg),
                None => {
                    let addr = addr.clone();
                    self.send(peer.id, &addr, &Message::JoinRedirect { channel });
                }
            },
            Message::JoinAccept { channel, .. }
            | Message::JoinRedirect { channel }
            | Message::JoinRefused { channel, .. }
            | Message::Snapshot { channel, .. } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.membership_input(peer.id, msg);
                }
            }
            other => return Err(format!("message kind {} is not allowed on a node link", other.kind())),
        }
        Ok(())
    }
}

/// The sink ids of the `Targets` frame before an event on `channel`, if there was one.
pub(crate) fn take_targets(
    targets: &mut Option<(ChannelId, Vec<LocalId>)>,
    channel: ChannelId,
) -> Result<Option<Vec<LocalId>>, String> {
    match targets.take() {
        Some((c, ids)) if c == channel => Ok(Some(ids)),
        Some(_) => Err("a Targets frame was not followed by its event".into()),
        None => Ok(None),
    }
}

async fn accept_loop(node: Weak<NodeInner>, listener: TcpListener) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(node) = node.upgrade() else { return };
        let Ok(slot) = node.conn_slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "too many connections; refusing");
            continue;
        };
        let n = node.clone();
        node.spawn(async move {
            let _slot = slot;
            link::accept(n, stream, remote).await;
        });
    }
}
