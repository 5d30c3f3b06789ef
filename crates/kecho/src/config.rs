//! A node's configuration, as [`crate::NodeBuilder`] collects it (each setting is documented there).

use std::net::SocketAddr;
use std::time::Duration;

use kecho_proto::membership::MembershipConfig;
use kecho_proto::MAX_FRAME_DEFAULT;

/// TLS for node links as configured: a `TlsConfig`, or nothing at all in a build without the `tls` feature.
#[cfg(feature = "tls")]
pub(crate) type TlsSetting = crate::tls::TlsConfig;
/// TLS for node links as configured: a `TlsConfig`, or nothing at all in a build without the `tls` feature.
#[cfg(not(feature = "tls"))]
pub(crate) type TlsSetting = std::convert::Infallible;

/// The member nodes above which a channel runs in tree mode by default (`NodeBuilder::tree_threshold`): below it a full
/// mesh costs one hop per event and at most this many links per node; above it the overlay's links stay about five.
pub(crate) const DEFAULT_TREE_THRESHOLD: usize = 64;

/// How a node behaves.
#[derive(Clone, Debug)]
pub(crate) struct NodeConfig {
    /// Where the node listens for other nodes. Default `127.0.0.1:0` (any free port).
    pub(crate) listen: SocketAddr,
    /// The address other nodes dial to reach this one, if not the listening address: needed when listening on an
    /// unspecified address (`0.0.0.0`), behind address translation, or through a proxy. A port of 0 means the port
    /// the node listens on.
    pub(crate) advertise: Option<SocketAddr>,
    /// The registry; `None` uses the process-wide in-process registry.
    pub(crate) registry: Option<SocketAddr>,
    /// A link silent for this long is declared dead and its members removed. Default 3 s.
    pub(crate) heartbeat_timeout: Duration,
    /// Bytes of events queued per link before the link counts as full. Default 8 MiB.
    pub(crate) link_queue_bytes: usize,
    /// The same for same-host links (Unix socket or shared memory), which take the lesser of the two. Default 2 MiB.
    pub(crate) same_host_queue_bytes: usize,
    /// Largest frame accepted or sent. Default 16 MiB.
    pub(crate) max_frame: usize,
    /// `TCP_NOTSENT_LOWAT` of a TCP link once it carries an event of a priority above the default: at most about
    /// this many bytes wait unsent in the kernel, so that what is queued in the outbox (where priorities apply) is
    /// not hidden behind megabytes in the socket. `None` leaves the kernel's default. Default 128 KiB.
    pub(crate) send_lowat: Option<u32>,
    /// `SO_RCVBUF` of TCP links (`None`: the kernel's autotuned default). A small one bounds what can wait in the
    /// receiving kernel ahead of an urgent event when the receiver is the slower side. Default `None`.
    pub(crate) recv_buffer: Option<usize>,
    /// TCP links take a second connection for their urgent lanes once they carry priorities (`link/urgent.rs`), if
    /// both nodes allow it. Default on.
    pub(crate) urgent_connection: bool,
    /// This node asks for the urgent connection as soon as a TCP link is up, not once a link carries priorities
    /// (`NodeBuilder::urgent_connection_at_once`). Default off.
    pub(crate) urgent_at_once: bool,
    /// The low-latency receive mode: how long a link's reader keeps polling its socket after it found it empty
    /// before it parks (`link/spin.rs`). `None` (the default) parks at once.
    pub(crate) low_latency: Option<Duration>,
    /// Test hook (`NodeBuilder::drop_datagrams_every`): QUIC links drop every Nth best-effort datagram before it is
    /// sent, as a lossy network would. 0 (the default): none.
    pub(crate) drop_datagrams_every: u64,
    /// Links to nodes of this host go over Unix-domain sockets (`link/local.rs`). Default off.
    pub(crate) same_host: bool,
    /// Same-host links this node dials carry their bytes through shared-memory rings of this many bytes per
    /// direction (the socket then carries wake-ups only); `None`: through the socket. Default 256 KiB.
    pub(crate) shared_memory: Option<usize>,
    /// This node's same-host endpoint (`unix://HOST/PATH`), set when the node starts with `same_host`.
    pub(crate) local_endpoint: Option<String>,
    /// Default capacity of a sink's queue, in events. Default 1024.
    pub(crate) sink_capacity: usize,
    /// How long a dial may take.
    pub(crate) connect_timeout: Duration,
    /// Most inbound connections in their handshake at once; more are closed at once.
    pub(crate) max_connections: usize,
    /// Timing of channel membership (leases, join retries, open timeout).
    pub(crate) membership: MembershipConfig,
    /// How long a source keeps counting the events that a node cut off from a channel (its link lost, not a clean
    /// leave) would have received, to report them to it as missed if it comes back. Default 60 s.
    pub(crate) gap_memory: Duration,
    /// How long a sink's node waits, after losing the node of a source it received from, for that node to come back
    /// or for word of how far the source got, before telling its sinks that the source is gone with an unknown number
    /// of events missed (`RecvError::SourceLost`). Default 10 s.
    pub(crate) source_grace: Duration,
    /// What each source keeps of the events cut-off sinks miss, to replay to them (`NodeBuilder::history`).
    pub(crate) history: History,
    /// A channel whose member nodes number more than this (as this node knows it) runs in tree mode: bounded links
    /// and events forwarded along per-source trees (`channel/tree.rs`, docs/SCALE.md). Default
    /// [`DEFAULT_TREE_THRESHOLD`].
    pub(crate) tree_threshold: usize,
    /// Tree mode probes non-neighbour members (`channel/tree_probe.rs`); off only in tests and benchmarks that
    /// compare with the check off.
    pub(crate) tree_probe: bool,
    /// How often tree mode's liveness check probes a member (`channel/tree_probe.rs`). Default 5 s.
    pub(crate) tree_probe_every: std::time::Duration,
    /// TLS for node links (mutually authenticated against a CA); `None` (the default) runs them in plaintext. Every
    /// node of a deployment must agree: a plaintext node dialling a TLS node is refused with a reason.
    pub(crate) tls: Option<TlsSetting>,
    /// The transports this node listens and dials on. Default TCP.
    pub(crate) transport: crate::transport::Transport,
    /// This node's identity (its signing key; its node id derives from it). `None` (the default) makes a new one at
    /// start; give one to keep a node id across restarts.
    pub(crate) identity: Option<kecho_proto::handshake::Identity>,
    /// Access control: the policies this node requires in channels and the credentials it presents (see
    /// [`AccessConfig`]). Default: none.
    pub(crate) access: AccessConfig,
}

/// Which access policies a node requires and which credentials it presents, per channel (see `kecho_proto::access`).
///
/// A channel created by a node with a policy for its name has that policy; a node joining a channel with a policy
/// of its own refuses a channel with any other (someone else's channel under that name), and a node without one
/// adopts the channel's. Give every node of a deployment the policy, so that whoever creates the channel first
/// creates it protected.
#[derive(Clone, Debug, Default)]
pub(crate) struct AccessConfig {
    /// Policies by channel pattern: a name, or a prefix followed by `*`. The first match applies.
    pub(crate) policies: Vec<(String, kecho_proto::access::Policy)>,
    /// Credentials; for each channel the first one that covers it and was issued to this node is presented.
    pub(crate) tokens: Vec<kecho_proto::access::Token>,
}

impl AccessConfig {
    /// The policy this node requires in channel `name`.
    pub(crate) fn policy_for(&self, name: &str) -> Option<kecho_proto::access::Policy> {
        let matches = |pattern: &str| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => pattern == name,
        };
        self.policies.iter().find(|(p, _)| matches(p)).map(|(_, p)| *p)
    }

    /// The credential a node with public key `holder` presents in channel `name`.
    pub(crate) fn token_for(&self, name: &str, holder: &[u8; 32]) -> Option<kecho_proto::access::Token> {
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
            same_host_queue_bytes: 2 << 20,
            max_frame: MAX_FRAME_DEFAULT,
            send_lowat: Some(128 << 10),
            recv_buffer: None,
            urgent_connection: true,
            urgent_at_once: false,
            low_latency: None,
            drop_datagrams_every: 0,
            same_host: false,
            shared_memory: Some(kecho_shm::DEFAULT_RING),
            local_endpoint: None,
            sink_capacity: 1024,
            connect_timeout: Duration::from_secs(2),
            max_connections: 4096,
            membership: MembershipConfig::default(),
            gap_memory: Duration::from_secs(60),
            source_grace: Duration::from_secs(10),
            history: History::off(),
            tree_threshold: DEFAULT_TREE_THRESHOLD,
            tree_probe: true,
            tree_probe_every: std::time::Duration::from_secs(5),
            tls: None,
            transport: crate::transport::Transport::Tcp,
            identity: None,
            access: AccessConfig::default(),
        }
    }
}

/// How much of the events missed by cut-off sinks a source keeps for them. Every bound that is set applies; the
/// default keeps nothing (gaps are reported, as without durability).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub(crate) events: usize,
    pub(crate) bytes: usize,
    pub(crate) age: Option<Duration>,
}

impl History {
    /// Keeps nothing: sinks that return are told how many events they missed.
    pub fn off() -> Self {
        History::default()
    }

    /// Keeps at most the last `n` events missed by cut-off sinks (further bounded by [`History::bytes`] and
    /// [`History::age`] if set).
    pub fn events(n: usize) -> Self {
        History { events: n, bytes: usize::MAX, age: None }
    }

    /// Also keeps at most `n` bytes of encoded events.
    pub fn bytes(mut self, n: usize) -> Self {
        self.bytes = n;
        self
    }

    /// Also keeps no event older than `t`.
    pub fn age(mut self, t: Duration) -> Self {
        self.age = Some(t);
        self
    }

    /// True if this keeps anything.
    pub fn is_on(&self) -> bool {
        self.events > 0 && self.bytes > 0 && self.age.is_none_or(|a| !a.is_zero())
    }
}
