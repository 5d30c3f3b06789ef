//! A deterministic simulator for the membership state machine: nodes, links, one registry and virtual time.
//!
//! - Virtual time is an `Instant` base plus an offset; the simulator jumps from one due event to the next (message
//!   deliveries, registry answers, heartbeat deadlines, state machine timers), so a run is exactly reproducible.
//! - Links behave like TCP connections: messages on one direction of a link are delivered in order after the link's
//!   latency; a partition holds them back (they arrive after it heals, unless the connection died in between); a
//!   connection is declared dead by the `Liveness` heartbeat machine of either side (pings go out on idle links,
//!   anything that arrives counts), which then calls `handle_peer_lost` on every channel of that node and tells the far
//!   side if it is reachable (the FIN/RST of a closed socket). A crashed node answers nothing and sends nothing.
//! - The registry is one shared `RegistryTable`, reached with a fixed latency each way; it can be switched off (every
//!   request fails) or cut from single nodes, and replaced by an empty table (a restart).
//! - Like the node layer, a node forgets a channel once it has left it: later membership messages for that channel are
//!   dropped, and a `JoinRequest` is answered with `JoinRedirect`.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use kecho_proto::codec::{ClaimMode, Message, RegEntry, RegResult};
use kecho_proto::gossip::GossipMsg;
use kecho_proto::liveness::{Liveness, LivenessAction};
use kecho_proto::membership::{ChannelState, MembershipConfig, OpenFailure, OpenMode, Output, RegistryUnreachable};
use kecho_proto::probe::{ProbeConfig, ProbeOut, Prober};
use kecho_proto::registry::RegistryTable;
use kecho_proto::{Attrs, ChannelId, ChannelSecret, LocalId, MemberInfo, NodeId, Overflow, Role, TypeFilter};

/// Timing of a simulation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Given to every channel.
    pub membership: MembershipConfig,
    /// Heartbeat timeout of every link (pings go out after a third of it).
    pub heartbeat: Duration,
    /// One-way latency of links without their own.
    pub latency: Duration,
    /// One-way latency to the registry.
    pub registry_latency: Duration,
    /// Upper bound of processing steps of one simulation; exceeding it fails the test.
    pub max_steps: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            membership: MembershipConfig {
                lease_ttl: Duration::from_millis(3000),
                join_attempt: Duration::from_millis(500),
                open_timeout: Duration::from_millis(5000),
                retry: Duration::from_millis(100),
                counts_delay: Duration::from_millis(100),
            },
            heartbeat: Duration::from_millis(600),
            latency: Duration::from_millis(5),
            registry_latency: Duration::from_millis(3),
            max_steps: 2_000_000,
        }
    }
}

/// One channel on one node, with what it reported.
#[derive(Debug)]
pub struct Chan {
    /// The state machine.
    pub st: ChannelState,
    /// Every output but `Send` and `Registry`, with its virtual time.
    pub notices: Vec<(Duration, Output)>,
    /// The outcome of `open`, with its virtual time.
    pub result: Option<(Duration, Result<(), OpenFailure>)>,
}

#[derive(Debug)]
struct Link {
    live: Liveness,
    /// The connection this side believes in; messages of an older connection are lost.
    conn: u64,
    /// Identifies this link's entries in the heartbeat wake-up queue.
    wake: u64,
}

/// A simulated process.
#[derive(Debug)]
pub struct SimNode {
    /// Its id.
    pub id: NodeId,
    /// Its listening address.
    pub addr: String,
    /// Crashed: frozen, sends and receives nothing.
    pub crashed: bool,
    /// Channels it is in (or opening), by name.
    pub chans: BTreeMap<String, Chan>,
    /// Channels it left, by name (kept for assertions only; the node has forgotten them).
    pub left: BTreeMap<String, Chan>,
    /// When it declared which peer lost (its own heartbeat expiry or the far side's close).
    pub lost: Vec<(Duration, NodeId)>,
    links: BTreeMap<NodeId, Link>,
    nonce: u64,
}

#[derive(Debug)]
struct InFlight {
    at: Instant,
    conn: u64,
    /// `None`: the connection was closed by the sender (FIN/RST).
    msg: Option<Message>,
}

#[derive(Debug)]
enum RegEvent {
    Request { from: NodeId, chan: String, msg: Message },
    Reply { to: NodeId, chan: String, result: Result<RegResult, RegistryUnreachable> },
}

/// A registry request as it reached the registry.
#[derive(Clone, Debug)]
pub struct RegRecord {
    /// Virtual time of arrival.
    pub at: Duration,
    /// Sender.
    pub from: NodeId,
    /// The request.
    pub msg: Message,
    /// Whether the registry answered (it was up and reachable).
    pub answered: bool,
}

/// The simulation.
#[derive(Debug)]
pub struct Sim {
    /// Virtual time zero.
    pub t0: Instant,
    /// Current virtual time.
    pub now: Instant,
    /// Timing.
    pub cfg: SimConfig,
    /// Every node ever added.
    pub nodes: BTreeMap<NodeId, SimNode>,
    /// The registry's table.
    pub registry: RegistryTable,
    /// False: every registry request fails.
    pub registry_up: bool,
    /// Nodes that cannot reach the registry.
    pub registry_cut: BTreeSet<NodeId>,
    /// Every registry request that reached the registry.
    pub reg_log: Vec<RegRecord>,
    /// Processing steps so far.
    pub steps: u64,
    /// Recent events, for failure messages.
    pub trace: VecDeque<String>,
    /// How many events `trace` keeps (`KECHO_SIM_TRACE` overrides the default of 400).
    pub trace_cap: usize,
    cut: BTreeSet<(NodeId, NodeId)>,
    link_latency: BTreeMap<(NodeId, NodeId), Duration>,
    wires: BTreeMap<(NodeId, NodeId), VecDeque<InFlight>>,
    /// When a wire may have something to deliver (entries may be stale).
    wire_wake: BinaryHeap<Reverse<(Instant, u64, NodeId, NodeId)>>,
    /// When a link's heartbeat machine is due: (time, link's wake id, node, peer).
    link_wake: BinaryHeap<Reverse<(Instant, u64, NodeId, NodeId)>>,
    conns: BTreeMap<(NodeId, NodeId), u64>,
    reg_events: BTreeMap<(Instant, u64), RegEvent>,
    seq: u64,
    next_channel: u64,
    /// Tree mode, modelled (see [`TreeModel`]); `None`: every channel is a full mesh.
    pub tree: Option<TreeModel>,
    /// Tree mode: the overlay's links (symmetric).
    pub overlay: BTreeMap<NodeId, BTreeSet<NodeId>>,
    /// Tree mode: `ViewSync` messages sent with a list, and without.
    pub view_lists: u64,
    /// Tree mode: `ViewSync` digests sent.
    pub view_digests: u64,
    overlay_q: BTreeMap<(Instant, u64), (NodeId, NodeId, String, Message)>,
    broadcast_version: BTreeMap<(NodeId, String), u64>,
    next_sync: Option<Instant>,
    /// Tree mode with [`TreeModel::probe`]: each member's liveness check, per channel.
    probers: BTreeMap<(NodeId, String), Prober>,
    /// Answers to probes on their way: when, to which prober, from which node, nonce.
    probe_acks: Vec<(Instant, NodeId, String, NodeId, u64)>,
    next_probe_tick: Option<Instant>,
    /// Tree mode: probes sent, suspicions broadcast, nodes taken for gone by the liveness check.
    pub probes: u64,
    /// See `probes`.
    pub suspicions: u64,
    /// See `probes`.
    pub probe_deaths: u64,
    /// Tree mode: members that answer probes this much later than a round trip (a process that stalls).
    pub slow_answers: BTreeMap<NodeId, Duration>,
    /// Tree mode: members the liveness check took for gone while they were alive.
    pub live_taken_for_gone: u64,
}

/// Tree mode as the node layer runs it (`crates/kecho/src/channel/tree.rs`), for its membership: every channel is
/// relayed (`ChannelState::set_relayed`); a node's own snapshot goes directly only to its overlay neighbours and is
/// broadcast once per version through the overlay, which delivers it to every other member after a few hops or, with
/// probability `loss_permille`, never (the overlay gave up: a stall, a graft that failed, a member not yet in the
/// overlay); others' snapshots (relays) go to overlay neighbours only; a lost link does not drop a member (only a
/// goodbye does, see [`Sim::take_for_gone`]). With `sync_every`, every member sends a random neighbour the digest
/// of its view that often (`ChannelState::sync_with`).
#[derive(Clone, Debug)]
pub struct TreeModel {
    /// Overlay neighbours a newcomer links to (fewer while the channel is smaller).
    pub degree: usize,
    /// Share of overlay deliveries lost, per mille.
    pub loss_permille: u64,
    /// Latency of one overlay hop; a delivery takes one to three.
    pub hop: Duration,
    /// Anti-entropy period; `None`: off.
    pub sync_every: Option<Duration>,
    /// The liveness check (`kecho_proto::probe`) as the node layer runs it; `None`: off (a crashed member is
    /// dropped only by a goodbye of a neighbour that noticed, `Sim::crash_noticed`). A probe is answered after a
    /// round trip unless its target crashed or is cut off from the prober.
    pub probe: Option<ProbeConfig>,
    /// The model's randomness.
    pub rng: XorShift,
}

/// Records a line in the trace, formatting it only if the trace keeps anything.
macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.trace_cap > 0 {
            let line = format!($($arg)*);
            $sim.log(line);
        }
    };
}

/// How often the simulation runs the members' liveness checks (their timers are due at most this late).
const PROBE_TICK: Duration = Duration::from_millis(50);

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

/// The members every node contributes unless a test says otherwise: a sink for type "x" and a source.
pub fn standard_members(node: u64) -> Vec<MemberInfo> {
    vec![
        MemberInfo {
            id: LocalId(1),
            role: Role::Sink {
                types: TypeFilter::Only(vec!["x".into()]),
                overflow: Overflow::DropOldest,
                filter: None,
            },
            attrs: Attrs::new().with("node", node as i64),
        },
        MemberInfo { id: LocalId(2), role: Role::Source, attrs: Attrs::new() },
    ]
}

/// A small xorshift generator, so that randomized runs are reproducible.
#[derive(Clone, Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

impl Sim {
    /// An empty simulation.
    pub fn new(cfg: SimConfig) -> Self {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            cfg,
            nodes: BTreeMap::new(),
            registry: RegistryTable::new(),
            registry_up: true,
            registry_cut: BTreeSet::new(),
            reg_log: Vec::new(),
            steps: 0,
            trace: VecDeque::new(),
            trace_cap: std::env::var("KECHO_SIM_TRACE").ok().and_then(|v| v.parse().ok()).unwrap_or(400),
            cut: BTreeSet::new(),
            link_latency: BTreeMap::new(),
            wires: BTreeMap::new(),
            wire_wake: BinaryHeap::new(),
            link_wake: BinaryHeap::new(),
            conns: BTreeMap::new(),
            reg_events: BTreeMap::new(),
            seq: 0,
            next_channel: 1,
            tree: None,
            overlay: BTreeMap::new(),
            view_lists: 0,
            view_digests: 0,
            overlay_q: BTreeMap::new(),
            broadcast_version: BTreeMap::new(),
            next_sync: None,
            probers: BTreeMap::new(),
            probe_acks: Vec::new(),
            next_probe_tick: None,
            probes: 0,
            suspicions: 0,
            probe_deaths: 0,
            slow_answers: BTreeMap::new(),
            live_taken_for_gone: 0,
        }
    }

    /// Virtual time elapsed.
    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    fn log(&mut self, line: String) {
        if self.trace.len() >= self.trace_cap {
            self.trace.pop_front();
        }
        let t = self.elapsed().as_secs_f64() * 1000.0;
        self.trace.push_back(format!("{t:10.3}ms {line}"));
    }

    /// The recent trace, for failure messages.
    pub fn dump(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Fails the test with the recent trace.
    pub fn fail(&self, why: &str) -> ! {
        panic!("{why}\n--- last simulation events ---\n{}\n--- at {:?} ---", self.dump(), self.elapsed())
    }

    // ----- setup and actions -----

    /// Adds a node (idempotent).
    pub fn add_node(&mut self, id: u64) {
        let id = NodeId(id);
        self.nodes.entry(id).or_insert_with(|| SimNode {
            id,
            addr: format!("10.0.{}.{}:7000", id.0 / 256, id.0 % 256),
            crashed: false,
            chans: BTreeMap::new(),
            left: BTreeMap::new(),
            lost: Vec::new(),
            links: BTreeMap::new(),
            nonce: 0,
        });
    }

    /// Node `id` (added if needed) opens channel `name` with `members`.
    pub fn open_with(&mut self, id: u64, name: &str, mode: OpenMode, members: Vec<MemberInfo>) {
        self.open_configured(id, name, mode, members, |_| {});
    }

    /// Like `open_with`, with `configure` applied to the state machine first (access policy, credential, clock).
    pub fn open_configured(
        &mut self,
        id: u64,
        name: &str,
        mode: OpenMode,
        members: Vec<MemberInfo>,
        configure: impl FnOnce(&mut ChannelState),
    ) {
        self.add_node(id);
        let fresh = ChannelId(0xC000_0000 + self.next_channel);
        self.next_channel += 1;
        let now = self.now;
        let cfg = self.cfg.membership.clone();
        let node = self.nodes.get_mut(&NodeId(id)).expect("node");
        assert!(!node.crashed, "a crashed node opens nothing");
        assert!(!node.chans.contains_key(name), "node {id} has {name:?} open already");
        // Each node's would-be secret differs, as random ones would; the channel's is the creator's.
        let secret = ChannelSecret(u128::from(fresh.0) << 64 | u128::from(id));
        let mut st = ChannelState::new(name, fresh, secret, NodeId(id), &node.addr, cfg);
        configure(&mut st);
        if self.tree.is_some() {
            st.set_relayed(true);
        }
        st.set_members(members, now);
        st.open(mode, now);
        node.chans.insert(name.to_owned(), Chan { st, notices: Vec::new(), result: None });
        trace!(self, "n{id} open {name:?} {mode:?}");
        if let Some(tree) = self.tree.as_mut() {
            let mut others: Vec<NodeId> = self.overlay.keys().copied().filter(|n| *n != NodeId(id)).collect();
            let mut picked = Vec::new();
            while picked.len() < tree.degree && !others.is_empty() {
                let i = tree.rng.below(others.len() as u64) as usize;
                picked.push(others.swap_remove(i));
            }
            self.overlay.entry(NodeId(id)).or_default().extend(picked.iter().copied());
            for p in picked {
                self.overlay.entry(p).or_default().insert(NodeId(id));
            }
            if self.next_sync.is_none() {
                self.next_sync = tree.sync_every.map(|d| self.now + d);
            }
            if let Some(cfg) = tree.probe {
                let seed = tree.rng.below(u64::MAX);
                let ms = (self.now - self.t0).as_millis() as u64;
                self.probers.insert((NodeId(id), name.to_owned()), Prober::new(cfg, seed, ms));
                self.next_probe_tick.get_or_insert(self.now + PROBE_TICK);
            }
        }
        self.pump(NodeId(id), name);
    }

    /// Node `id` opens channel `name` with [`standard_members`].
    pub fn open(&mut self, id: u64, name: &str, mode: OpenMode) {
        self.open_with(id, name, mode, standard_members(id));
    }

    /// Node `id` replaces its members in `name`.
    pub fn set_members(&mut self, id: u64, name: &str, members: Vec<MemberInfo>) {
        let now = self.now;
        self.chan_mut(id, name).st.set_members(members, now);
        trace!(self, "n{id} set_members {name:?}");
        self.pump(NodeId(id), name);
    }

    /// Node `id` leaves `name` cleanly and then forgets the channel, like the node layer.
    pub fn leave(&mut self, id: u64, name: &str) {
        let now = self.now;
        self.chan_mut(id, name).st.leave(now);
        trace!(self, "n{id} leave {name:?}");
        self.pump(NodeId(id), name);
        let node = self.nodes.get_mut(&NodeId(id)).expect("node");
        let chan = node.chans.remove(name).expect("chan");
        node.left.insert(name.to_owned(), chan);
    }

    /// Node `id` closes `name` and its goodbye is lost: the channel is forgotten there, no member is told (messages
    /// for it that arrive later go to a new opening of the channel, if any, as on a real node).
    pub fn vanish(&mut self, id: u64, name: &str) {
        let node = self.nodes.get_mut(&NodeId(id)).expect("node");
        node.chans.remove(name).expect("chan");
        trace!(self, "n{id} closes {name:?}, its goodbye lost");
    }

    /// Node `from` sends `msg` to node `to` over their link, as if its channel had (a late copy, say).
    pub fn inject(&mut self, from: u64, to: u64, msg: Message) {
        trace!(self, "n{from} -> n{to} injected: {}", short(&msg));
        self.send(NodeId(from), NodeId(to), msg);
    }

    /// The node stops dead: no answers, no close, nothing.
    pub fn crash(&mut self, id: u64) {
        self.nodes.get_mut(&NodeId(id)).expect("node").crashed = true;
        trace!(self, "n{id} CRASH");
    }

    /// Cuts every link between a node of `a` and a node of `b`.
    pub fn partition(&mut self, a: &[u64], b: &[u64]) {
        for x in a {
            for y in b {
                self.cut.insert(pair(NodeId(*x), NodeId(*y)));
            }
        }
        trace!(self, "PARTITION {a:?} | {b:?}");
    }

    /// Heals every partition; held messages flow again.
    pub fn heal(&mut self) {
        self.cut.clear();
        let held: Vec<(NodeId, NodeId)> = self.wires.iter().filter(|(_, w)| !w.is_empty()).map(|(k, _)| *k).collect();
        for (a, b) in held {
            self.seq += 1;
            self.wire_wake.push(Reverse((self.now, self.seq, a, b)));
        }
        trace!(self, "HEAL");
    }

    /// Sets the one-way latency between two nodes.
    pub fn set_latency(&mut self, a: u64, b: u64, d: Duration) {
        assert!(!d.is_zero(), "latency must be positive");
        self.link_latency.insert(pair(NodeId(a), NodeId(b)), d);
    }

    // ----- observers -----

    /// Channel `name` on node `id`.
    pub fn chan(&self, id: u64, name: &str) -> &Chan {
        let node = &self.nodes[&NodeId(id)];
        node.chans.get(name).or_else(|| node.left.get(name)).unwrap_or_else(|| panic!("n{id} never opened {name:?}"))
    }

    fn chan_mut(&mut self, id: u64, name: &str) -> &mut Chan {
        self.nodes.get_mut(&NodeId(id)).and_then(|n| n.chans.get_mut(name)).expect("open channel")
    }

    /// The state machine of `name` on `id`.
    pub fn st(&self, id: u64, name: &str) -> &ChannelState {
        &self.chan(id, name).st
    }

    /// True once `open` succeeded on `id`.
    pub fn ready(&self, id: u64, name: &str) -> bool {
        matches!(self.chan(id, name).result, Some((_, Ok(()))))
    }

    /// The outcome of `open` on `id`, if any.
    pub fn result(&self, id: u64, name: &str) -> Option<Result<(), OpenFailure>> {
        self.chan(id, name).result.as_ref().map(|(_, r)| r.clone())
    }

    /// Nodes that are alive and members of `name`.
    pub fn live_members(&self, name: &str) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| !n.crashed && n.chans.get(name).is_some_and(|c| c.st.is_member()))
            .map(|n| n.id)
            .collect()
    }

    /// Nodes that are alive and have `name` open but are not members yet.
    pub fn opening(&self, name: &str) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| !n.crashed && n.chans.get(name).is_some_and(|c| !c.st.is_member() && !c.st.has_left()))
            .map(|n| n.id)
            .collect()
    }

    /// `Ok` if every live member of `name` sees exactly the other live members, each with its current snapshot.
    pub fn views_agree(&self, name: &str) -> Result<(), String> {
        let live = self.live_members(name);
        for id in &live {
            let st = &self.nodes[id].chans[name].st;
            let peers: Vec<NodeId> = st.peers().keys().copied().collect();
            let others: Vec<NodeId> = live.iter().copied().filter(|n| n != id).collect();
            if peers != others {
                return Err(format!("{id:?} sees {peers:?}, live others are {others:?}"));
            }
            for o in &others {
                let theirs = self.nodes[o].chans[name].st.local();
                if st.peers()[o].snapshot != *theirs {
                    return Err(format!(
                        "{id:?} has snapshot v{} of {o:?}, which is at v{}",
                        st.peers()[o].snapshot.version,
                        theirs.version
                    ));
                }
            }
        }
        Ok(())
    }

    /// The registry's entry for `name` now (without a simulated round trip).
    pub fn entry(&mut self, name: &str) -> Option<RegEntry> {
        match self.registry.handle(&Message::RegLookup { req: 0, name: name.into() }, self.now) {
            Some(Message::RegReply { result: RegResult::Entry(e), .. }) => Some(e),
            _ => None,
        }
    }

    /// The contact the registry names for `name`.
    pub fn entry_contact(&mut self, name: &str) -> Option<NodeId> {
        self.entry(name).map(|e| e.contact)
    }

    /// Registry claims that reached the registry from `from`, with their mode and time.
    pub fn claims_by(&self, from: u64) -> Vec<(Duration, ClaimMode)> {
        self.reg_log
            .iter()
            .filter(|r| r.from == NodeId(from))
            .filter_map(|r| match &r.msg {
                Message::RegClaim { mode, .. } => Some((r.at, *mode)),
                _ => None,
            })
            .collect()
    }

    /// The earliest time at or after `after` at which `who` declared `lost` lost.
    pub fn lost_at(&self, who: u64, lost: u64, after: Duration) -> Option<Duration> {
        self.nodes[&NodeId(who)].lost.iter().find(|(t, n)| *t >= after && *n == NodeId(lost)).map(|(t, _)| *t)
    }

    // ----- running -----

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.next_time().filter(|t| *t <= end) {
            self.now = self.now.max(t);
            self.process_due();
        }
        self.now = self.now.max(end);
    }

    /// Runs until `f` holds, failing the test if it does not within `limit` of virtual time. Returns the time taken.
    pub fn run_until(&mut self, limit: Duration, what: &str, f: impl Fn(&mut Sim) -> bool) -> Duration {
        let start = self.now;
        let end = start + limit;
        loop {
            if f(self) {
                return self.now - start;
            }
            match self.next_time() {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.process_due();
                }
                _ => self.fail(&format!("{what}: not reached within {limit:?} of virtual time")),
            }
        }
    }

    fn latency(&self, a: NodeId, b: NodeId) -> Duration {
        self.link_latency.get(&pair(a, b)).copied().unwrap_or(self.cfg.latency)
    }

    fn is_cut(&self, a: NodeId, b: NodeId) -> bool {
        self.cut.contains(&pair(a, b))
    }

    fn conn(&self, a: NodeId, b: NodeId) -> u64 {
        self.conns.get(&pair(a, b)).copied().unwrap_or(0)
    }

    fn enqueue(&mut self, from: NodeId, to: NodeId, conn: u64, msg: Option<Message>) {
        let lat = self.latency(from, to);
        let wire = self.wires.entry((from, to)).or_default();
        // In order on one direction of a link, whatever the latency did meanwhile.
        let at = wire.back().map_or(self.now + lat, |last| last.at.max(self.now + lat));
        wire.push_back(InFlight { at, conn, msg });
        self.seq += 1;
        self.wire_wake.push(Reverse((at, self.seq, from, to)));
    }

    /// A fresh link of `id` to `peer`, replacing any other.
    fn new_link(&mut self, id: NodeId, peer: NodeId, conn: u64) {
        self.seq += 1;
        let live = Liveness::new(self.now, self.cfg.heartbeat);
        self.link_wake.push(Reverse((live.deadline(), self.seq, id, peer)));
        let node = self.nodes.get_mut(&id).expect("node");
        node.links.insert(peer, Link { live, conn, wake: self.seq });
    }

    /// A node sends a message to another over their link, opening one if needed.
    fn send(&mut self, from: NodeId, to: NodeId, msg: Message) {
        let now = self.now;
        if !self.nodes[&from].links.contains_key(&to) {
            let current = self.conn(from, to);
            self.new_link(from, to, current);
        }
        let link = self.nodes.get_mut(&from).and_then(|n| n.links.get_mut(&to)).expect("link");
        link.live.on_send(now);
        let conn = link.conn;
        self.enqueue(from, to, conn, Some(msg));
    }

    /// Drains the outputs of one channel into the network and the registry.
    fn pump(&mut self, id: NodeId, name: &str) {
        loop {
            let elapsed = self.elapsed();
            let node = self.nodes.get_mut(&id).expect("node");
            if node.crashed {
                return;
            }
            let Some(chan) = node.chans.get_mut(name) else { return };
            let Some(out) = chan.st.poll_output() else { return };
            match out {
                Output::Send { to, addr, msg } => {
                    let Some(dest) = self.nodes.get(&to) else {
                        self.fail(&format!("{id:?} sends to unknown node {to:?}"));
                    };
                    if dest.addr != addr {
                        self.fail(&format!("{id:?} sends to {to:?} at {addr:?}, which listens at {:?}", dest.addr));
                    }
                    trace!(self, "n{} -> n{}: {}", id.0, to.0, short(&msg));
                    if self.tree.is_some() {
                        self.tree_send(id, name, to, msg);
                    } else {
                        self.send(id, to, msg);
                    }
                }
                Output::Registry(op) => {
                    self.seq += 1;
                    let msg = chan.st.registry_message(&op, self.seq as u32);
                    let at = self.now + self.cfg.registry_latency;
                    self.reg_events.insert((at, self.seq), RegEvent::Request { from: id, chan: name.to_owned(), msg });
                    trace!(self, "n{} -> registry: {op:?}", id.0);
                }
                other => {
                    match &other {
                        Output::Ready => chan.result = Some((elapsed, Ok(()))),
                        Output::Failed(why) => chan.result = Some((elapsed, Err(why.clone()))),
                        _ => {}
                    }
                    chan.notices.push((elapsed, other.clone()));
                    trace!(self, "n{} {name:?}: {other:?}", id.0);
                }
            }
        }
    }

    fn pump_all(&mut self, id: NodeId) {
        let names: Vec<String> = self.nodes[&id].chans.keys().cloned().collect();
        for name in names {
            self.pump(id, &name);
        }
    }

    /// The earliest time something is due.
    fn next_time(&self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut consider = |t: Instant| best = Some(best.map_or(t, |b: Instant| b.min(t)));
        if let Some(Reverse((t, ..))) = self.wire_wake.peek() {
            consider(*t);
        }
        if let Some(Reverse((t, ..))) = self.link_wake.peek() {
            consider(*t);
        }
        if let Some(((t, _), _)) = self.reg_events.first_key_value() {
            consider(*t);
        }
        if let Some(((t, _), _)) = self.overlay_q.first_key_value() {
            consider(*t);
        }
        if let Some(t) = self.next_sync {
            consider(t);
        }
        if let Some(t) = self.next_probe_tick {
            consider(t);
        }
        for node in self.nodes.values().filter(|n| !n.crashed) {
            for chan in node.chans.values() {
                if let Some(t) = chan.st.poll_timeout() {
                    consider(t);
                }
            }
        }
        best
    }

    /// Processes everything due at `self.now`.
    fn process_due(&mut self) {
        loop {
            self.steps += 1;
            if self.steps > self.cfg.max_steps {
                self.fail("step limit exceeded");
            }
            let mut progressed = false;
            // Deliveries.
            while let Some(Reverse((at, _, from, to))) = self.wire_wake.peek().copied() {
                if at > self.now {
                    break;
                }
                self.wire_wake.pop();
                while !self.is_cut(from, to)
                    && self.wires.get(&(from, to)).and_then(|w| w.front()).is_some_and(|f| f.at <= self.now)
                {
                    let item = self.wires.get_mut(&(from, to)).and_then(|w| w.pop_front()).expect("front");
                    self.deliver(from, to, item);
                    progressed = true;
                }
            }
            // Registry.
            while let Some(entry) = self.reg_events.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let ev = entry.remove();
                self.registry_event(ev);
                progressed = true;
            }
            // Tree mode: overlay deliveries, anti-entropy.
            while let Some(entry) = self.overlay_q.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (from, to, name, msg) = entry.remove();
                self.overlay_deliver(from, to, &name, msg);
                progressed = true;
            }
            if self.next_sync.is_some_and(|t| t <= self.now) {
                self.sync_round();
                progressed = true;
            }
            if self.next_probe_tick.is_some_and(|t| t <= self.now) {
                self.probe_round();
                progressed = true;
            }
            // Heartbeats.
            while let Some(Reverse((at, wake, id, peer))) = self.link_wake.peek().copied() {
                if at > self.now {
                    break;
                }
                self.link_wake.pop();
                progressed = true;
                let now = self.now;
                let node = self.nodes.get_mut(&id).expect("node");
                if node.crashed {
                    continue;
                }
                let Some(link) = node.links.get_mut(&peer).filter(|l| l.wake == wake) else { continue };
                let action = if link.live.deadline() <= now { link.live.poll(now) } else { LivenessAction::Wait };
                if action != LivenessAction::Dead {
                    self.link_wake.push(Reverse((link.live.deadline(), wake, id, peer)));
                }
                match action {
                    LivenessAction::Wait => {}
                    LivenessAction::SendPing => {
                        node.nonce += 1;
                        let n = node.nonce;
                        self.send(id, peer, Message::Ping(n));
                    }
                    LivenessAction::Dead => self.link_dead(id, peer),
                }
            }
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            // Timers.
            for id in &ids {
                if self.nodes[id].crashed {
                    continue;
                }
                let names: Vec<String> = self.nodes[id].chans.keys().cloned().collect();
                for name in names {
                    let now = self.now;
                    let chan = self.nodes.get_mut(id).and_then(|n| n.chans.get_mut(&name)).expect("chan");
                    if chan.st.poll_timeout().is_some_and(|t| t <= now) {
                        chan.st.handle_timeout(now);
                        if chan.st.poll_timeout().is_some_and(|t| t <= now) {
                            let st = format!("{:?}", chan.st);
                            self.fail(&format!("n{} {name:?}: timer still due after handle_timeout: {st}", id.0));
                        }
                        self.pump(*id, &name);
                        progressed = true;
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// `id` declares its link to `peer` dead.
    fn link_dead(&mut self, id: NodeId, peer: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node");
        let link = node.links.remove(&peer).expect("link");
        let current = self.conn(id, peer);
        if link.conn == current {
            // Close the connection: whatever is still on its way is lost; the far side hears of it if reachable.
            self.conns.insert(pair(id, peer), current + 1);
            self.enqueue(id, peer, current, None);
        }
        trace!(self, "n{} link to n{} DEAD", id.0, peer.0);
        self.peer_lost(id, peer);
    }

    fn peer_lost(&mut self, id: NodeId, peer: NodeId) {
        let now = self.now;
        let elapsed = self.elapsed();
        let node = self.nodes.get_mut(&id).expect("node");
        node.lost.push((elapsed, peer));
        let tree = self.tree.is_some();
        for chan in node.chans.values_mut() {
            // In tree mode a lost link says nothing of a member's node (the node layer confirms a neighbour gone
            // and broadcasts a goodbye for it: `take_for_gone`).
            if !(tree && chan.st.is_member()) {
                chan.st.handle_peer_lost(peer, now);
            }
        }
        self.pump_all(id);
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, item: InFlight) {
        if self.nodes[&from].crashed || self.nodes[&to].crashed {
            return;
        }
        let now = self.now;
        let Some(msg) = item.msg else {
            // The sender closed the connection.
            let node = self.nodes.get_mut(&to).expect("node");
            if node.links.get(&from).is_some_and(|l| l.conn == item.conn) {
                node.links.remove(&from);
                trace!(self, "n{} link to n{} CLOSED by far side", to.0, from.0);
                self.peer_lost(to, from);
            }
            return;
        };
        if item.conn != self.conn(from, to) {
            return; // Sent on a connection that has died since.
        }
        // A new connection from the far side (it dialled again) replaces an old one.
        if self.nodes[&to].links.get(&from).is_none_or(|l| l.conn != item.conn) {
            self.new_link(to, from, item.conn);
        }
        let link = self.nodes.get_mut(&to).and_then(|n| n.links.get_mut(&from)).expect("link");
        link.live.on_receive(now);
        match msg {
            Message::Ping(n) => self.send(to, from, Message::Pong(n)),
            Message::Pong(_) => {}
            Message::JoinRequest { channel, .. }
            | Message::JoinAccept { channel, .. }
            | Message::JoinRedirect { channel }
            | Message::JoinRefused { channel, .. }
            | Message::Snapshot { channel, .. }
            | Message::ViewSync { channel, .. } => {
                trace!(self, "n{} <- n{}: {}", to.0, from.0, short(&msg));
                let node = self.nodes.get_mut(&to).expect("node");
                let name = node.chans.iter().find(|(_, c)| c.st.id() == channel).map(|(n, _)| n.clone());
                match name {
                    Some(name) => {
                        node.chans.get_mut(&name).expect("chan").st.handle_message(from, msg, now);
                        self.pump(to, &name);
                    }
                    None => {
                        if matches!(msg, Message::JoinRequest { .. }) {
                            // Like the node layer: a join for a channel we do not have is redirected.
                            self.send(to, from, Message::JoinRedirect { channel });
                        }
                    }
                }
            }
            other => self.fail(&format!("unexpected message on a node link: {other:?}")),
        }
    }

    /// Tree mode: what the node layer does with a membership message of node `id` (`tree_send_membership`).
    fn tree_send(&mut self, id: NodeId, name: &str, to: NodeId, msg: Message) {
        let neighbour = self.overlay.get(&id).is_some_and(|n| n.contains(&to));
        match &msg {
            Message::Snapshot { node, snapshot, .. } if *node == id => {
                let version = snapshot.version;
                if neighbour {
                    self.send(id, to, msg.clone());
                }
                let last = self.broadcast_version.entry((id, name.to_owned())).or_insert(0);
                if version > *last {
                    *last = version;
                    self.overlay_broadcast(id, name, msg);
                }
            }
            Message::Snapshot { .. } => {
                if neighbour {
                    self.send(id, to, msg);
                }
            }
            Message::ViewSync { list, .. } => {
                if list.is_some() {
                    self.view_lists += 1;
                } else {
                    self.view_digests += 1;
                }
                self.send(id, to, msg);
            }
            _ => self.send(id, to, msg),
        }
    }

    /// Tree mode: `msg` of `origin` reaches every other node with channel `name` open, each after one to three
    /// hops, unless lost.
    fn overlay_broadcast(&mut self, origin: NodeId, name: &str, msg: Message) {
        let dests: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.id != origin && !n.crashed && n.chans.contains_key(name))
            .map(|n| n.id)
            .collect();
        let tree = self.tree.as_mut().expect("tree mode");
        let mut plan = Vec::new();
        for to in dests {
            if tree.rng.below(1000) < tree.loss_permille {
                continue;
            }
            let hops = 1 + tree.rng.below(3) as u32;
            plan.push((self.now + tree.hop * hops, to));
        }
        for (at, to) in plan {
            self.seq += 1;
            self.overlay_q.insert((at, self.seq), (origin, to, name.to_owned(), msg.clone()));
        }
    }

    /// Tree mode: a broadcast reaches `to` (applied as the node layer's `gossip_deliver` does).
    fn overlay_deliver(&mut self, origin: NodeId, to: NodeId, name: &str, msg: Message) {
        let now = self.now;
        let node = &self.nodes[&to];
        if node.crashed || !node.chans.contains_key(name) {
            return;
        }
        trace!(self, "n{} <~ n{} (overlay): {}", to.0, origin.0, short(&msg));
        let chan = self.nodes.get_mut(&to).and_then(|n| n.chans.get_mut(name)).expect("chan");
        match msg {
            Message::Snapshot { node, left: true, .. } if node == to => {
                // Taken for gone by a member: publish a newer snapshot.
                let members = chan.st.local().members.clone();
                chan.st.set_members(members, now);
            }
            Message::Gossip { body: GossipMsg::Suspect { node, version }, .. } => {
                // Suspected by a member's liveness check: refute with a newer snapshot (its incarnation).
                if node == to && version >= chan.st.local().version {
                    let members = chan.st.local().members.clone();
                    chan.st.set_members(members, now);
                }
            }
            Message::Snapshot { node, .. } if node == origin => chan.st.handle_message(node, msg, now),
            other => chan.st.handle_message(origin, other, now),
        }
        self.pump(to, name);
    }

    /// Tree mode: `relayer` takes its neighbour `gone` for gone (its link failed and was not dialled again in
    /// time): it broadcasts a goodbye on `gone`'s behalf, at the version it knows, and drops it.
    pub fn take_for_gone(&mut self, relayer: u64, gone: u64, name: &str) {
        let now = self.now;
        let st = &self.chan(relayer, name).st;
        let Some(p) = st.peers().get(&NodeId(gone)) else { return };
        let msg = Message::Snapshot {
            channel: st.id(),
            node: NodeId(gone),
            addr: p.addr.clone(),
            snapshot: kecho_proto::NodeSnapshot {
                version: p.snapshot.version,
                instance: p.snapshot.instance,
                members: Vec::new(),
                token: None,
            },
            left: true,
            reply: false,
        };
        trace!(self, "n{relayer} takes n{gone} for gone");
        self.overlay_broadcast(NodeId(relayer), name, msg);
        self.chan_mut(relayer, name).st.handle_peer_lost(NodeId(gone), now);
        self.pump(NodeId(relayer), name);
    }

    /// Tree mode: the members in `ids` crash at once; each of their overlay neighbours that survives notices (its
    /// link failed) and takes the crashed neighbour for gone, as the node layer does. A crashed member whose
    /// neighbours all crashed with it is noticed by nobody.
    pub fn crash_noticed(&mut self, ids: &[u64], name: &str) {
        for id in ids {
            self.crash(*id);
        }
        for id in ids {
            let neighbours: Vec<NodeId> =
                self.overlay.get(&NodeId(*id)).map(|n| n.iter().copied().collect()).unwrap_or_default();
            for n in neighbours {
                if !self.nodes[&n].crashed && self.nodes[&n].chans.contains_key(name) {
                    self.take_for_gone(n.0, *id, name);
                }
            }
        }
    }

    /// Tree mode: the liveness check of every live member, every `PROBE_TICK`.
    fn probe_round(&mut self) {
        self.next_probe_tick = Some(self.now + PROBE_TICK);
        let now = self.now;
        let ms = (now - self.t0).as_millis() as u64;
        let rtt = self.cfg.latency * 2;
        let due: Vec<_> = self.probe_acks.iter().filter(|a| a.0 <= now).cloned().collect();
        self.probe_acks.retain(|a| a.0 > now);
        for (_, prober, name, from, nonce) in due {
            if let Some(p) = self.probers.get_mut(&(prober, name)) {
                p.ack(from, nonce);
            }
        }
        let keys: Vec<(NodeId, String)> = self.probers.keys().cloned().collect();
        for (id, name) in keys {
            let node = &self.nodes[&id];
            let Some(chan) = node.chans.get(&name).filter(|c| !node.crashed && c.st.is_member()) else { continue };
            let members: BTreeMap<NodeId, u64> =
                chan.st.peers().iter().map(|(n, p)| (*n, p.snapshot.version)).collect();
            let neighbours: BTreeSet<NodeId> = self
                .overlay
                .get(&id)
                .map(|n| n.iter().copied().filter(|p| !self.nodes[p].crashed).collect())
                .unwrap_or_default();
            let channel = chan.st.id();
            let prober = self.probers.get_mut(&(id, name.clone())).expect("prober");
            if prober.poll_timeout() > ms {
                continue;
            }
            prober.handle_timeout(ms, &members, &neighbours);
            let outs: Vec<ProbeOut> = std::iter::from_fn(|| prober.poll_output()).collect();
            for out in outs {
                match out {
                    ProbeOut::Probe { node, nonce } => {
                        self.probes += 1;
                        let alive = self.nodes.get(&node).is_some_and(|n| !n.crashed && n.chans.contains_key(&name));
                        if alive && !self.is_cut(id, node) {
                            let slow = self.slow_answers.get(&node).copied().unwrap_or_default();
                            self.probe_acks.push((now + rtt + slow, id, name.clone(), node, nonce));
                        }
                    }
                    ProbeOut::Suspect { node, version } => {
                        self.suspicions += 1;
                        trace!(self, "n{} suspects n{} at v{version}", id.0, node.0);
                        let msg =
                            Message::Gossip { channel, addrs: Vec::new(), body: GossipMsg::Suspect { node, version } };
                        self.overlay_broadcast(id, &name, msg);
                    }
                    ProbeOut::Dead { node, .. } => {
                        self.probe_deaths += 1;
                        if self.nodes.get(&node).is_some_and(|n| !n.crashed) {
                            self.live_taken_for_gone += 1;
                        }
                        self.take_for_gone(id.0, node.0, &name);
                    }
                }
            }
        }
    }

    /// Tree mode: every member sends a random overlay neighbour the digest of its view.
    fn sync_round(&mut self) {
        let Some(every) = self.tree.as_ref().and_then(|t| t.sync_every) else { return };
        self.next_sync = Some(self.now + every);
        let ids: Vec<NodeId> = self.nodes.values().filter(|n| !n.crashed).map(|n| n.id).collect();
        for id in ids {
            let names: Vec<String> = self.nodes[&id].chans.keys().cloned().collect();
            for name in names {
                let neighbours: Vec<NodeId> =
                    self.overlay.get(&id).map(|n| n.iter().copied().collect()).unwrap_or_default();
                if neighbours.is_empty() {
                    continue;
                }
                let tree = self.tree.as_mut().expect("tree mode");
                let to = neighbours[tree.rng.below(neighbours.len() as u64) as usize];
                let now = self.now;
                self.chan_mut(id.0, &name).st.sync_with(to, now);
                self.pump(id, &name);
            }
        }
    }

    fn registry_event(&mut self, ev: RegEvent) {
        match ev {
            RegEvent::Request { from, chan, msg } => {
                if self.nodes[&from].crashed {
                    return;
                }
                let reachable = self.registry_up && !self.registry_cut.contains(&from);
                let result = if reachable {
                    match self.registry.handle(&msg, self.now) {
                        Some(Message::RegReply { result, .. }) => Ok(result),
                        other => self.fail(&format!("registry answered {other:?}")),
                    }
                } else {
                    Err(RegistryUnreachable("registry unreachable".to_owned()))
                };
                trace!(self, "registry <- n{}: {} => {}", from.0, short(&msg), short_result(&result));
                self.reg_log.push(RegRecord { at: self.elapsed(), from, msg, answered: reachable });
                self.seq += 1;
                let at = self.now + self.cfg.registry_latency;
                self.reg_events.insert((at, self.seq), RegEvent::Reply { to: from, chan, result });
            }
            RegEvent::Reply { to, chan, result } => {
                let now = self.now;
                let node = self.nodes.get_mut(&to).expect("node");
                if node.crashed {
                    return;
                }
                if let Some(c) = node.chans.get_mut(&chan) {
                    c.st.handle_registry(result, now);
                    self.pump(to, &chan);
                }
            }
        }
    }
}

fn short(msg: &Message) -> String {
    let ch = |c: &kecho_proto::ChannelId| c.0 & 0xfff;
    match msg {
        Message::JoinRequest { channel, snapshot, .. } => {
            format!("JoinRequest(v{}) [ch {:x}]", snapshot.version, ch(channel))
        }
        Message::JoinAccept { channel, contact, nodes, .. } => {
            let ids: Vec<u64> = nodes.iter().map(|n| n.node.0).collect();
            format!("JoinAccept(contact n{}, nodes {ids:?}) [ch {:x}]", contact.0, ch(channel))
        }
        Message::JoinRedirect { channel } => format!("JoinRedirect [ch {:x}]", ch(channel)),
        Message::Snapshot { channel, node, snapshot, left, reply, .. } => format!(
            "Snapshot(n{} v{}{}{}) [ch {:x}]",
            node.0,
            snapshot.version,
            if *left { " LEFT" } else { "" },
            if *reply { " reply" } else { "" },
            ch(channel)
        ),
        Message::RegClaim { node, mode, channel, .. } => format!("Claim({mode:?} by n{} ch {:x})", node.0, ch(channel)),
        Message::RegLookup { .. } => "Lookup".to_owned(),
        Message::RegRemove { node, .. } => format!("Remove(by n{})", node.0),
        other => format!("{other:?}"),
    }
}

fn short_result(r: &Result<RegResult, RegistryUnreachable>) -> String {
    match r {
        Ok(RegResult::Entry(e)) => {
            format!("Entry(contact n{}, ch {:x}, {}/{})", e.contact.0, e.channel.0 & 0xfff, e.sources, e.sinks)
        }
        Ok(RegResult::Error { code, .. }) => format!("{code:?}"),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("Err({e})"),
    }
}

/// Convenience for tests: the open mode used by a node that must find the channel.
pub const JOIN: OpenMode = OpenMode::Open;
