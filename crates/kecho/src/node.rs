//! The node: one process, one listening port, any number of channels. [`NodeBuilder`] configures and starts one;
//! [`Node`] is the handle on it. The work is done below: channels in `channel`, links in `link`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kecho_proto::membership::{MembershipConfig, OpenMode};
use kecho_registry::RegistryClient;
use tokio::net::TcpListener;

use crate::channel::{Channel, Channels, NodeGuard};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::link::dial::accept_loop;
pub use crate::link::{LinkStats, Undrained};
use crate::transport::Transport;

/// How long [`Node::shutdown`] lets the links send what they have queued before it closes them.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// What a shutdown could not send (see [`Node::shutdown_within`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The links that still held frames when the shutdown stopped waiting (or were still writing), with what they
    /// held. Empty: every link sent everything queued for it (what the other nodes do with it is theirs).
    pub undrained: Vec<Undrained>,
}

impl ShutdownReport {
    /// Every link sent everything it had queued.
    pub fn is_clean(&self) -> bool {
        self.undrained.is_empty()
    }

    /// Events that were queued for links and never sent (a lower bound, see [`Undrained::events`]).
    pub fn events_abandoned(&self) -> u64 {
        self.undrained.iter().map(|u| u.events).sum()
    }
}

/// Configures and starts a [`Node`]: the one way to set a node up. Every setting has a default (see each method), so
/// `Node::builder().start()` is a node on loopback with the in-process registry.
#[derive(Clone, Debug, Default)]
pub struct NodeBuilder {
    cfg: NodeConfig,
    registry: Option<RegistryClient>,
}

impl NodeBuilder {
    /// Where the node listens for other nodes. Default `127.0.0.1:0` (any free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.cfg.listen = addr;
        self
    }

    /// The address other nodes dial to reach this one, if not the listening address: needed when listening on an
    /// unspecified address (`0.0.0.0`), behind address translation, or through a proxy. A port of 0 means the port
    /// the node listens on.
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.cfg.advertise = Some(addr);
        self
    }

    /// Uses the registry server at `addr` instead of the process-wide in-process registry (the default).
    pub fn registry(mut self, addr: SocketAddr) -> Self {
        self.cfg.registry = Some(addr);
        self
    }

    /// Uses the replicated registry whose replicas are at `addrs` (see [`RegistryClient::replicated`]): the node asks
    /// the leader and fails over to another replica when one dies. One address is the same as
    /// [`NodeBuilder::registry`].
    pub fn registry_replicas(mut self, addrs: Vec<SocketAddr>) -> Self {
        match addrs.as_slice() {
            [one] => self.cfg.registry = Some(*one),
            _ => self.registry = Some(RegistryClient::replicated(addrs)),
        }
        self
    }

    /// Uses this registry client (e.g. a private in-process registry in tests).
    pub fn registry_client(mut self, client: RegistryClient) -> Self {
        self.registry = Some(client);
        self
    }

    /// A link silent for this long is declared dead and its members removed. Default 3 s.
    pub fn heartbeat_timeout(mut self, t: Duration) -> Self {
        self.cfg.heartbeat_timeout = t;
        self
    }

    /// Bytes of events queued per link before the link counts as full. Default 8 MiB. Same-host links take the
    /// lesser of this and [`NodeBuilder::same_host_queue_bytes`].
    pub fn link_queue_bytes(mut self, n: usize) -> Self {
        self.cfg.link_queue_bytes = n;
        self
    }

    /// Bytes of events queued per same-host link (Unix socket or shared memory, see [`NodeBuilder::same_host`])
    /// before it counts as full, if less than [`NodeBuilder::link_queue_bytes`]. Default 2 MiB: the other end drains
    /// at memory speed, so a deeper queue absorbs no more than this one does and costs the source its caches (every
    /// event is written into memory last touched a whole queue earlier; 8 MiB against 2 MiB halved the source's
    /// throughput in `examples/local`, BENCHMARKS.md).
    pub fn same_host_queue_bytes(mut self, n: usize) -> Self {
        self.cfg.same_host_queue_bytes = n;
        self
    }

    /// Bytes a TCP link may leave unsent in the kernel (`TCP_NOTSENT_LOWAT`) once it carries an event of a priority
    /// above the default: kept short so that a high-priority event queued behind a bulk transfer waits for little
    /// more than the outbox's lanes let it (see [`crate::Priority`]). Links without priorities keep the kernel's
    /// default (which holds megabytes on a busy link), as does `None`. A QUIC link whose peer takes a stream per
    /// priority sends its urgent lanes on a stream of their own instead; with a peer that does not, the same bound
    /// applies to the connection's send window (the bytes quinn holds unsent or unacknowledged). Default 128 KiB.
    pub fn send_lowat(mut self, bytes: Option<u32>) -> Self {
        self.cfg.send_lowat = bytes;
        self
    }

    /// The kernel receive buffer of TCP links (`SO_RCVBUF`; `None`, the default, leaves the kernel's autotuning,
    /// which grows it to megabytes on a busy link). When the receiving node is the slower side of a link, that is
    /// where a backlog waits, in arrival order, ahead of any urgent event: a small buffer (a few hundred KiB) keeps
    /// the backlog at the sender, where priorities apply, at the cost of throughput on links with a large
    /// bandwidth-delay product.
    pub fn recv_buffer(mut self, bytes: Option<usize>) -> Self {
        self.cfg.recv_buffer = bytes;
        self
    }

    /// Whether links may take a second connection for their urgent lanes (priorities 1 to 3). With it, once a link
    /// carries an event of a priority above the default, the dialling node opens a second TCP (or TLS) connection to
    /// the same address and both nodes send their urgent frames on it, so that an urgent event no longer waits behind
    /// the bulk bytes in the kernel's buffers and in flight; the frames that say where each source's events cross
    /// from one connection to the other keep every source's order. The urgent connection is marked for priority
    /// queueing (DSCP EF and `SO_PRIORITY` 6: see docs/PROTOCOL.md, "Priorities and deadlines", for a queueing
    /// discipline that serves it first). QUIC links likewise take a second QUIC connection, with a congestion window
    /// of its own, between a second UDP socket at each node (bound at start on a port of its own, marked the same
    /// way); with this off, or if that connection cannot be made, their urgent frames take a stream of the link's one
    /// connection. A link that never carries priorities keeps one connection, as does every link of a node with this
    /// off (or whose peer has it off). Losing either connection is losing the link. Default on.
    pub fn urgent_connection(mut self, on: bool) -> Self {
        self.cfg.urgent_connection = on;
        self
    }

    /// Whether this node's TCP links open their urgent connection (see [`NodeBuilder::urgent_connection`]) as soon
    /// as they are up rather than when they first carry a prioritised event. The connection is always dialled by the
    /// node that dialled the link; the other node asks for it on the link's connection, and when it asks only once it
    /// has an urgent event to send, that request waits behind whatever backlog that connection already holds, and so
    /// does its first urgent event. Turn this on for nodes whose first urgent event must not wait (an alarm sent
    /// while a bulk transfer saturates the link); it costs a second TCP connection per link (with TLS, a second TLS
    /// handshake) whether or not the link ever carries priorities. Either node turning it on is enough. Default off.
    pub fn urgent_connection_at_once(mut self, on: bool) -> Self {
        self.cfg.urgent_at_once = on;
        self
    }

    /// Largest frame accepted or sent. Default 16 MiB.
    pub fn max_frame(mut self, n: usize) -> Self {
        self.cfg.max_frame = n;
        self
    }

    /// Default capacity of a sink's queue, in events. Default 1024.
    pub fn sink_capacity(mut self, n: usize) -> Self {
        self.cfg.sink_capacity = n;
        self
    }

    /// How long a dial may take. Default 2 s.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.cfg.connect_timeout = t;
        self
    }

    /// Most inbound connections in their handshake at once; more are closed at once. Default 4096.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.cfg.max_connections = n;
        self
    }

    /// Timing of channel membership (leases, join retries, open timeout).
    pub fn membership(mut self, m: MembershipConfig) -> Self {
        self.cfg.membership = m;
        self
    }

    /// How long a source keeps counting the events that a node cut off from a channel (its link lost, not a clean
    /// leave) would have received, to report them to it as missed if it comes back. Default 60 s.
    pub fn gap_memory(mut self, t: Duration) -> Self {
        self.cfg.gap_memory = t;
        self
    }

    /// How long a sink's node waits, after losing the node of a source its sinks received events from, for that node
    /// to come back or for another member to relay how far the source got (`SourceEnd`), before telling its sinks
    /// that the source is gone with an unknown number of events missed ([`crate::RecvError::SourceLost`]).
    /// Default 10 s.
    pub fn source_grace(mut self, t: Duration) -> Self {
        self.cfg.source_grace = t;
        self
    }

    /// The size above which this node runs a channel in tree mode: once it knows more than `n` member nodes (itself
    /// included), or once another member talks to it in tree mode, it stops linking to every member and joins the
    /// channel's overlay instead (HyParView partial views: about 5 links per node whatever the channel's size), and
    /// events travel along a tree per source (Plumtree), each node forwarding them to its tree children and
    /// delivering them to its own sinks in per-source order; gaps the tree cannot repair are reported to the sinks
    /// as missed. A channel of at most `n` nodes stays a full mesh, and so does a channel under an access policy.
    /// Tree mode keeps the full mesh's guarantees (a source's end accounted, histories replayed, priorities and
    /// deadlines; Block sinks get their events directly from each source: see docs/SCALE.md). Default: 64 (below it
    /// a full mesh costs fewer hops and each node's links are still few enough; `usize::MAX` keeps every channel a
    /// full mesh).
    pub fn tree_threshold(mut self, n: usize) -> Self {
        self.cfg.tree_threshold = n.max(1);
        self
    }

    /// Test hook: turns tree mode's liveness check off (docs/SCALE.md, "Liveness check"), to show what it fixes and
    /// to measure its cost. Default on.
    #[doc(hidden)]
    pub fn tree_liveness_check(mut self, on: bool) -> Self {
        self.cfg.tree_probe = on;
        self
    }

    /// How often, in tree mode, this node probes one member that is not its overlay neighbour (the liveness check:
    /// a member killed together with all of its neighbours is noticed by nobody else; docs/SCALE.md, "Liveness
    /// check"). A dead member no neighbour noticed is out of every view a few seconds after some member first
    /// probes it: with N members probing, about `every` x (members / N) after its death on average. Each probe of a
    /// member with no link up costs a dial and a handshake at both ends, so a host running hundreds of nodes on a
    /// few cores wants it rarer; a host per node can afford a second. Default 5 s (at least 100 ms).
    pub fn tree_probe_every(mut self, every: Duration) -> Self {
        self.cfg.tree_probe_every = every.max(Duration::from_millis(100));
        self
    }

    /// What every source of this node keeps, by default, of the events that sinks of cut-off nodes miss, to replay
    /// to them in order should their node come back ([`crate::Source::set_history`] sets it per source). Default:
    /// nothing, and returning sinks are told how many events they missed. See docs/DURABILITY.md.
    pub fn history(mut self, h: crate::History) -> Self {
        self.cfg.history = h;
        self
    }

    /// Runs node links over TLS, mutually authenticated against a CA; without it (the default) they run in
    /// plaintext. Every node of a deployment must agree: a plaintext node dialling a TLS node is refused with a
    /// reason.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::TlsConfig) -> Self {
        self.cfg.tls = Some(tls);
        self
    }

    /// The low-latency receive mode: a link's reader that finds its socket empty keeps polling it (non-blocking
    /// reads, or loads from a shared-memory ring) for up to `budget` before it parks, so that an event arriving
    /// meanwhile is taken at once instead of after the wake-up of a parked thread. It costs CPU: for every quiet gap
    /// on a link, the thread running its reader spins for the shorter of the gap and `budget` (see BENCHMARKS.md for
    /// the figures). Applies to plaintext TCP and same-host links (not TLS or QUIC). A zero budget turns the mode
    /// off; default off.
    pub fn low_latency(mut self, budget: Duration) -> Self {
        self.cfg.low_latency = (!budget.is_zero()).then_some(budget);
        self
    }

    /// Test hook: QUIC links drop every `n`th best-effort datagram before sending it, as a lossy network would, so
    /// that tests can check that the receiver reports each such loss (0, the default: none).
    #[doc(hidden)]
    pub fn drop_datagrams_every(mut self, n: u64) -> Self {
        self.cfg.drop_datagrams_every = n;
        self
    }

    /// Links to other nodes of this host go through shared memory instead of TCP or QUIC when both nodes run with
    /// this on: the node also listens on a Unix-domain socket (a file in `$XDG_RUNTIME_DIR`, or the temporary
    /// directory; removed when the node stops) and its address says which host it is on. A dialler passes the
    /// acceptor a memory file with a byte ring per direction over the socket ([`NodeBuilder::shared_memory`]); the
    /// socket then carries wake-ups only, and its end tells a crashed peer. Everything else about a link is as over
    /// TCP (handshake, order, bounded queues, loss reports, heartbeats). A node on another host, or one that cannot
    /// reach the socket, is dialled as without. Default off. See docs/PROTOCOL.md.
    pub fn same_host(mut self, on: bool) -> Self {
        self.cfg.same_host = on;
        self
    }

    /// The shared-memory rings of the same-host links this node dials ([`NodeBuilder::same_host`]): `Some(bytes)`
    /// per direction (rounded up to a power of two, 4 KiB to 1 GiB), which with the link's queue bounds what waits
    /// for a peer; `None` carries the bytes over the Unix-domain socket itself. A node accepts either. Default
    /// `Some(256 KiB)`.
    pub fn shared_memory(mut self, ring_bytes: Option<usize>) -> Self {
        self.cfg.shared_memory = ring_bytes;
        self
    }

    /// The transports this node's links use (default TCP). A node listens on every transport it speaks (QUIC on
    /// the UDP port with the same number as its TCP port) and says so in the address other nodes read; a dialler
    /// uses QUIC when both nodes speak it and TCP otherwise. With [`NodeBuilder::tls`], QUIC authenticates with the
    /// same certificates. Needs the `quic` feature for [`Transport::Quic`] and [`Transport::Both`].
    pub fn transport(mut self, transport: Transport) -> Self {
        self.cfg.transport = transport;
        self
    }

    /// This node's identity (its signing key; its node id derives from it). By default a new one is made at start;
    /// give one to keep a node id across restarts, and to present credentials issued to it.
    pub fn identity(mut self, identity: kecho_proto::handshake::Identity) -> Self {
        self.cfg.identity = Some(identity);
        self
    }

    /// Requires access policy `policy` in the channels matching `pattern` (a name, or a prefix followed by `*`; the
    /// first match applies).
    ///
    /// A channel created by a node with a policy for its name has that policy; a node joining a channel with a
    /// policy of its own refuses a channel with any other (someone else's channel under that name), and a node
    /// without one adopts the channel's. Give every node of a deployment the policy, so that whoever creates the
    /// channel first creates it protected.
    pub fn policy(mut self, pattern: &str, policy: kecho_proto::access::Policy) -> Self {
        self.cfg.access.policies.push((pattern.to_owned(), policy));
        self
    }

    /// Presents credential `token` in the channels it covers (for each channel, the first one that covers it and
    /// was issued to this node). It must have been issued to this node's identity (see [`NodeBuilder::identity`]).
    pub fn token(mut self, token: kecho_proto::access::Token) -> Self {
        self.cfg.access.tokens.push(token);
        self
    }

    /// Starts the node: binds the listening port and starts accepting links. Needs a tokio runtime.
    pub async fn start(self) -> Result<Node> {
        let mut cfg = self.cfg;
        let (listener, quic, addr) = bind(&cfg).await?;
        let local = match (cfg.same_host, crate::link::local::host_id()) {
            (false, _) => None,
            (true, None) => {
                tracing::warn!("same-host links off: the kernel does not say which host this is (no boot_id)");
                None
            }
            (true, Some(host)) => {
                let l = crate::link::local::LocalListener::bind()
                    .map_err(|e| Error::Invalid(format!("cannot listen for same-host links: {e}")))?;
                cfg.local_endpoint = Some(crate::link::local::endpoint(host, l.path()));
                Some(l)
            }
        };
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
        // The endpoint of the urgent connections of QUIC links (a UDP socket of their own, marked DSCP EF), at the
        // main endpoint's address on a port of its own. Without it, QUIC links keep an urgent stream.
        #[cfg(feature = "quic")]
        let quic_urgent = quic.as_ref().filter(|_| cfg.urgent_connection).and_then(|ep| {
            let at = SocketAddr::new(ep.local_addr().map_or(cfg.listen.ip(), |a| a.ip()), 0);
            crate::link::quic::QuicEndpoint::bind_urgent(at, cfg.tls.as_ref(), cfg.heartbeat_timeout)
                .map_err(|e| tracing::warn!(%at, "no endpoint for urgent QUIC connections: {e}"))
                .ok()
        });
        let channels = Channels::new(identity, advertised, Arc::new(cfg), registry);
        if let Some(listener) = listener {
            channels.spawn(accept_loop(Arc::downgrade(&channels.links), listener));
        }
        if let Some(l) = local {
            channels.spawn(crate::link::local::accept_loop(Arc::downgrade(&channels.links), l));
        }
        #[cfg(feature = "quic")]
        if let Some(ep) = quic {
            if let Some(u) = quic_urgent {
                let _ = channels.links.quic_urgent.set(u.clone());
                channels.spawn(crate::link::dial::quic_urgent_accept_loop(Arc::downgrade(&channels.links), u));
            }
            let _ = channels.links.quic.set(ep.clone());
            channels.spawn(crate::link::dial::quic_accept_loop(Arc::downgrade(&channels.links), ep));
        }
        #[cfg(not(feature = "quic"))]
        let _: Option<std::convert::Infallible> = quic;
        tracing::debug!(node = %channels.id, %addr, "node started");
        let guard = Arc::new(NodeGuard::new(&channels));
        Ok(Node { channels, addr, guard })
    }
}

/// The QUIC endpoint, as `bind` returns it (nothing in a build without QUIC).
#[cfg(feature = "quic")]
type QuicBound = crate::link::quic::QuicEndpoint;
#[cfg(not(feature = "quic"))]
type QuicBound = std::convert::Infallible;

/// Binds the node's TCP listener and QUIC endpoint as its transport asks; returns them and the address bound (one
/// port number for both).
async fn bind(cfg: &NodeConfig) -> Result<(Option<TcpListener>, Option<QuicBound>, SocketAddr)> {
    let listen_err = |source| Error::Listen { addr: cfg.listen, source };
    if !cfg.transport.quic() {
        let listener = TcpListener::bind(cfg.listen).await.map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;
        return Ok((Some(listener), None, addr));
    }
    #[cfg(not(feature = "quic"))]
    return Err(Error::Invalid(format!("transport {} needs kecho built with the quic feature", cfg.transport)));
    #[cfg(feature = "quic")]
    {
        use crate::link::quic::{BindError, QuicEndpoint};
        let quic_at = |addr: SocketAddr| {
            QuicEndpoint::bind(addr, cfg.tls.as_ref(), cfg.heartbeat_timeout, cfg.drop_datagrams_every).map_err(|e| {
                match e {
                    BindError::Io(source) => Error::Listen { addr, source },
                    BindError::Tls(e) => Error::Tls(e),
                }
            })
        };
        if !cfg.transport.tcp() {
            let ep = quic_at(cfg.listen)?;
            let addr = ep.local_addr().map_err(listen_err)?;
            return Ok((None, Some(ep), addr));
        }
        // Both: the UDP port takes the TCP port's number. With port 0, another process may hold that UDP port:
        // try a few TCP ports.
        let mut tries = if cfg.listen.port() == 0 { 16 } else { 1 };
        loop {
            let listener = TcpListener::bind(cfg.listen).await.map_err(listen_err)?;
            let addr = listener.local_addr().map_err(listen_err)?;
            match quic_at(addr) {
                Ok(ep) => return Ok((Some(listener), Some(ep), addr)),
                Err(Error::Listen { .. }) if tries > 1 => tries -= 1,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A kecho node. Cheap to clone; all clones are the same node.
#[derive(Clone)]
pub struct Node {
    channels: Arc<Channels>,
    addr: SocketAddr,
    guard: Arc<NodeGuard>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("addr", &self.addr).finish()
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

    /// This node's id (derived from its identity's public key).
    pub fn id(&self) -> kecho_proto::NodeId {
        self.channels.id
    }

    /// The address this node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address other nodes reach this one at: the advertised address, or the listening one.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.channels.advertised
    }

    /// Open links to other nodes. There is at most one per pair of nodes, whatever the number of shared channels.
    pub fn links(&self) -> usize {
        self.channels.links.up()
    }

    /// Counters of every link this node has had (up or not), one entry per other node, in no particular order.
    pub fn link_stats(&self) -> Vec<LinkStats> {
        self.channels.links.stats()
    }

    /// Handles on the channels this node has open, in no particular order.
    pub fn channels(&self) -> Vec<Channel> {
        self.channels.ready().into_iter().map(|c| Channel::new(c, self.guard.clone())).collect()
    }

    /// The registry this node uses.
    pub fn registry(&self) -> &RegistryClient {
        &self.channels.registry
    }

    /// Creates a channel; fails if it exists.
    pub async fn create_channel(&self, name: &str) -> Result<Channel> {
        self.channels.open(name, OpenMode::Create, &self.guard).await
    }

    /// Opens an existing channel; fails if there is none.
    pub async fn open_channel(&self, name: &str) -> Result<Channel> {
        self.channels.open(name, OpenMode::Open, &self.guard).await
    }

    /// Opens a channel, creating it if it does not exist.
    pub async fn channel(&self, name: &str) -> Result<Channel> {
        self.channels.open(name, OpenMode::OpenOrCreate, &self.guard).await
    }

    /// Leaves every channel cleanly (members are told), lets every link send what it has queued for at most
    /// [`SHUTDOWN_DRAIN`], then closes all links. Returns what could not be sent in that time (see
    /// [`Node::shutdown_within`]).
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shutdown_within(SHUTDOWN_DRAIN).await
    }

    /// [`Node::shutdown`], waiting at most `limit` for the links to send what they have queued. What is still queued
    /// then is dropped with the links; the report says how much, per link, so that a caller can tell a clean end from
    /// one that abandoned events (nothing waits longer than needed: a link that sent everything closes at once).
    pub async fn shutdown_within(&self, limit: Duration) -> ShutdownReport {
        self.channels.leave_all().await;
        // Let every link drain what it has queued (events and leave messages), then close it gracefully.
        let undrained = self.channels.links.drain(limit).await;
        self.channels.stop();
        ShutdownReport { undrained }
    }

    /// Stops everything at once without telling anyone, as if the process crashed. For tests.
    pub fn kill(&self) {
        self.channels.stop();
    }

    /// Test hook: tasks the node's own code asked for after it was stopped (killed or shut down), each refused. A
    /// task that was running when the node stopped runs on to its next await; what it asks for then must not run.
    #[doc(hidden)]
    pub fn tasks_after_stop(&self) -> u64 {
        self.channels.tasks.late()
    }

    /// Test hook: closes this node's endpoint for the urgent connections of its QUIC links (`NodeBuilder::
    /// urgent_connection`), as if its UDP socket became unreachable: the urgent connections up end at once (each
    /// ends its link, as a lost TCP urgent connection does) and later ones are refused (a new link's urgent lanes then
    /// take a stream of its main connection). `false` if the node has no such endpoint.
    #[doc(hidden)]
    pub fn close_urgent_endpoint(&self) -> bool {
        #[cfg(feature = "quic")]
        if let Some(ep) = self.channels.links.quic_urgent.get() {
            ep.close();
            return true;
        }
        false
    }
}
