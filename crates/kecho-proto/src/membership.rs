//! The membership state machine of one channel on one node, without I/O.
//!
//! Inputs are the local application's calls ([`ChannelState::open`], [`ChannelState::set_members`],
//! [`ChannelState::leave`]), messages from other nodes, registry replies, lost peers and timeouts, each with the
//! current time. Outputs are drained with [`ChannelState::poll_output`]: messages to send to a node, registry requests,
//! and notices for the owner.
//!
//! The model, following KECho: the channel's creator is its *contact*. A joiner looks the contact up in the registry,
//! sends it a `JoinRequest` with its snapshot and gets back every member node; from then on every node sends its own
//! snapshot directly to every other member node whenever its members change, and answers a newcomer's first snapshot
//! with its own. Snapshots are versioned, so the newest wins whatever the order of arrival, and the contact relays a
//! joiner's snapshot so that nobody depends on the joiner's direct links alone.
//!
//! Beyond the paper: when the contact leaves or is lost, the remaining member with the lowest node id takes the role
//! over through a compare-and-set in the registry; a node that finds it lost a contest (the registry names someone
//! else) joins again through the winner, which merges the two views.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::codec::{ClaimMode, Message, PeerEntry, RegErrorCode, RegResult};
use crate::types::{ChannelId, MemberInfo, NodeId, NodeSnapshot};

/// Timing of the state machine.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Length of the registry lease; the contact renews it every third of this.
    pub lease_ttl: Duration,
    /// How long one join attempt waits for the contact's answer before asking the registry again.
    pub join_attempt: Duration,
    /// How long `open` keeps trying before giving up.
    pub open_timeout: Duration,
    /// Pause between join attempts.
    pub retry: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            lease_ttl: Duration::from_secs(9),
            join_attempt: Duration::from_secs(2),
            open_timeout: Duration::from_secs(10),
            retry: Duration::from_millis(100),
        }
    }
}

/// How `open` treats a missing or existing channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Create it; fail if it exists.
    Create,
    /// Join it; fail if it does not exist.
    Open,
    /// Join it if it exists, create it otherwise.
    OpenOrCreate,
}

/// Why opening a channel failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenFailure {
    /// The registry has no such channel.
    UnknownChannel,
    /// The channel exists already (with [`OpenMode::Create`]).
    Exists,
    /// The registry could not be reached or refused the request.
    Registry(String),
    /// No contact answered in time.
    Timeout,
}

/// A registry request the owner should send; the answer goes to [`ChannelState::handle_registry`].
#[derive(Clone, Debug, PartialEq)]
pub enum RegistryOp {
    /// Look the channel up.
    Lookup,
    /// Create, renew or take over the entry.
    Claim(ClaimMode),
    /// Remove the entry (sent when the last member, the contact, leaves).
    Remove,
}

/// Something the owner must do or know.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send `msg` to node `to`, dialling `addr` if there is no link yet.
    Send {
        /// Destination.
        to: NodeId,
        /// Its listening address.
        addr: String,
        /// The message.
        msg: Message,
    },
    /// Send this registry request (build it with [`ChannelState::registry_message`]).
    Registry(RegistryOp),
    /// The member nodes or their members changed: routes must be recomputed.
    Changed,
    /// `open` succeeded.
    Ready,
    /// `open` failed for good.
    Failed(OpenFailure),
    /// This node now believes `NodeId` holds the contact role.
    Contact(NodeId),
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Idle,
    LookingUp,
    Creating,
    Joining {
        contact: NodeId,
        addr: String,
        since: Instant,
    },
    /// Waiting to retry the lookup.
    Backoff {
        until: Instant,
    },
    Member,
    Left,
}

/// Another node in the channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    /// Its listening address.
    pub addr: String,
    /// Its members.
    pub snapshot: NodeSnapshot,
    /// When this node last received a newer snapshot of it (for the age of member attributes).
    pub updated: Instant,
}

/// Membership of one channel as seen by one node.
#[derive(Debug)]
pub struct ChannelState {
    name: String,
    id: ChannelId,
    me: NodeId,
    my_addr: String,
    cfg: MembershipConfig,
    mode: OpenMode,
    phase: Phase,
    deadline: Option<Instant>,
    local: NodeSnapshot,
    peers: BTreeMap<NodeId, Peer>,
    contact: Option<NodeId>,
    reg_pending: Option<RegistryOp>,
    next_renew: Option<Instant>,
    out: VecDeque<Output>,
}

impl ChannelState {
    /// A channel named `name` on node `me` (listening on `my_addr`). `fresh_id` is used if this node ends up creating
    /// the channel; otherwise the id comes from the registry.
    pub fn new(name: &str, fresh_id: ChannelId, me: NodeId, my_addr: &str, cfg: MembershipConfig) -> Self {
        ChannelState {
            name: name.to_owned(),
            id: fresh_id,
            me,
            my_addr: my_addr.to_owned(),
            cfg,
            mode: OpenMode::OpenOrCreate,
            phase: Phase::Idle,
            deadline: None,
            local: NodeSnapshot::default(),
            peers: BTreeMap::new(),
            contact: None,
            reg_pending: None,
            next_renew: None,
            out: VecDeque::new(),
        }
    }

    /// Channel name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Channel id (final once the channel is open).
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// True once open and not left.
    pub fn is_member(&self) -> bool {
        self.phase == Phase::Member
    }

    /// True once left.
    pub fn has_left(&self) -> bool {
        self.phase == Phase::Left
    }

    /// Who this node believes holds the contact role.
    pub fn contact(&self) -> Option<NodeId> {
        self.contact
    }

    /// The other member nodes.
    pub fn peers(&self) -> &BTreeMap<NodeId, Peer> {
        &self.peers
    }

    /// This node's own snapshot.
    pub fn local(&self) -> &NodeSnapshot {
        &self.local
    }

    /// Sources and sinks in the whole channel as this node knows it.
    pub fn counts(&self) -> (u32, u32) {
        let all = std::iter::once(&self.local).chain(self.peers.values().map(|p| &p.snapshot));
        all.fold((0, 0), |(so, si), s| (so + s.sources() as u32, si + s.sinks() as u32))
    }

    /// Next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`ChannelState::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase_timer = match &self.phase {
            Phase::Joining { since, .. } => Some(*since + self.cfg.join_attempt),
            Phase::Backoff { until } => Some(*until),
            _ => None,
        };
        [phase_timer, self.deadline, self.next_renew].into_iter().flatten().min()
    }

    /// Builds the registry request for `op` with request id `req`.
    pub fn registry_message(&self, op: &RegistryOp, req: u32) -> Message {
        let (sources, sinks) = self.counts();
        match op {
            RegistryOp::Lookup => Message::RegLookup { req, name: self.name.clone() },
            RegistryOp::Claim(mode) => Message::RegClaim {
                req,
                name: self.name.clone(),
                channel: self.id,
                node: self.me,
                addr: self.my_addr.clone(),
                ttl_ms: self.cfg.lease_ttl.as_millis() as u64,
                mode: *mode,
                sources,
                sinks,
            },
            RegistryOp::Remove => Message::RegRemove { req, name: self.name.clone(), channel: self.id, node: self.me },
        }
    }

    /// Starts opening the channel with the local members given so far.
    pub fn open(&mut self, mode: OpenMode, now: Instant) {
        if self.phase != Phase::Idle {
            return;
        }
        self.mode = mode;
        self.deadline = Some(now + self.cfg.open_timeout);
        match mode {
            OpenMode::Create => self.start_create(),
            OpenMode::Open | OpenMode::OpenOrCreate => self.start_lookup(),
        }
    }

    /// Replaces this node's members in the channel and tells every other member node.
    pub fn set_members(&mut self, members: Vec<MemberInfo>, _now: Instant) {
        if self.phase == Phase::Left {
            return;
        }
        self.local.version += 1;
        self.local.members = members;
        if self.phase == Phase::Member {
            let targets: Vec<NodeId> = self.peers.keys().copied().collect();
            for to in targets {
                self.send_snapshot(to, false, false);
            }
        }
    }

    /// Leaves the channel: tells every member node, and removes the registry entry if this node is the contact and
    /// the last member.
    pub fn leave(&mut self, _now: Instant) {
        if self.phase == Phase::Left {
            return;
        }
        let was_member = self.phase == Phase::Member;
        self.local.version += 1;
        self.local.members.clear();
        if was_member {
            let targets: Vec<NodeId> = self.peers.keys().copied().collect();
            for to in targets {
                self.send_snapshot(to, true, false);
            }
            if self.contact == Some(self.me) && self.peers.is_empty() {
                self.registry(RegistryOp::Remove);
            }
        }
        self.phase = Phase::Left;
        self.deadline = None;
        self.next_renew = None;
        self.peers.clear();
    }

    /// A membership message from node `from`.
    pub fn handle_message(&mut self, from: NodeId, msg: Message, now: Instant) {
        if from == self.me {
            // Only a peer lying about its identity can get here; never let it make us our own peer.
            return;
        }
        match msg {
            Message::JoinRequest { addr, snapshot, .. } => self.on_join_request(from, addr, snapshot, now),
            Message::JoinAccept { contact, nodes, .. } => self.on_join_accept(from, contact, nodes, now),
            Message::JoinRedirect { .. } => {
                if matches!(&self.phase, Phase::Joining { contact, .. } if *contact == from) {
                    self.backoff(now);
                }
            }
            Message::Snapshot { node, addr, snapshot, left, reply, .. } => {
                self.on_snapshot(node, addr, snapshot, left, reply, now)
            }
            _ => {}
        }
    }

    /// The answer to the pending registry request: `Err` if the registry could not be reached.
    pub fn handle_registry(&mut self, result: Result<RegResult, String>, now: Instant) {
        let Some(op) = self.reg_pending.take() else { return };
        match (op, result) {
            (RegistryOp::Lookup, Ok(RegResult::Entry(e))) => {
                if self.phase == Phase::Member {
                    // We were told we are not the contact: join through whoever is.
                    self.contact = Some(e.contact);
                    self.out.push_back(Output::Contact(e.contact));
                    if e.contact != self.me {
                        self.id = e.channel;
                        self.send_join_request(e.contact, e.addr);
                    }
                    return;
                }
                if self.phase != Phase::LookingUp {
                    return;
                }
                self.id = e.channel;
                if e.contact == self.me {
                    // A lease of ours outlived our memory of it: we are the contact.
                    self.become_member_as_contact(now);
                    return;
                }
                self.phase = Phase::Joining { contact: e.contact, addr: e.addr.clone(), since: now };
                self.send_join_request(e.contact, e.addr);
            }
            (RegistryOp::Lookup, Ok(RegResult::Error { code: RegErrorCode::UnknownChannel, .. })) => {
                if self.phase != Phase::LookingUp && self.phase != Phase::Member {
                    return;
                }
                if self.phase == Phase::Member {
                    // The entry vanished: claim it for ourselves.
                    self.registry(RegistryOp::Claim(ClaimMode::Renew));
                    return;
                }
                match self.mode {
                    OpenMode::Open => self.fail(OpenFailure::UnknownChannel),
                    _ => self.start_create(),
                }
            }
            (RegistryOp::Claim(ClaimMode::Create), Ok(RegResult::Entry(e))) if self.phase == Phase::Creating => {
                self.id = e.channel;
                self.become_member_as_contact(now);
            }
            (RegistryOp::Claim(ClaimMode::Create), Ok(RegResult::Error { code: RegErrorCode::Exists, .. })) => {
                match self.mode {
                    OpenMode::Create => self.fail(OpenFailure::Exists),
                    // Someone created it between our lookup and our create: join it.
                    _ => self.start_lookup(),
                }
            }
            (RegistryOp::Claim(_), Ok(RegResult::Entry(_))) if self.phase == Phase::Member => {
                if self.contact != Some(self.me) {
                    self.contact = Some(self.me);
                    self.out.push_back(Output::Contact(self.me));
                }
                self.next_renew = Some(now + self.cfg.lease_ttl / 3);
            }
            (RegistryOp::Claim(_), Ok(RegResult::Error { code: RegErrorCode::NotContact, .. }))
                if self.phase == Phase::Member =>
            {
                // Someone else holds the role: find out who and join through them.
                self.next_renew = None;
                self.registry(RegistryOp::Lookup);
            }
            (RegistryOp::Remove, _) => {}
            (_, Err(e)) => match self.phase {
                Phase::LookingUp | Phase::Creating => self.fail(OpenFailure::Registry(e)),
                Phase::Member if self.contact == Some(self.me) => {
                    // Keep the role and try again at the next renewal.
                    self.next_renew = Some(now + self.cfg.lease_ttl / 3);
                }
                Phase::Member => {
                    // A lookup failed while re-checking the contact: try again later through the renewal timer.
                    self.next_renew = Some(now + self.cfg.lease_ttl / 3);
                }
                _ => {}
            },
            (_, Ok(RegResult::Error { message, .. })) => match self.phase {
                Phase::LookingUp | Phase::Creating => self.fail(OpenFailure::Registry(message)),
                _ => {}
            },
            _ => {}
        }
    }

    /// The link to `node` is gone (closed, reset or silent past the heartbeat timeout).
    pub fn handle_peer_lost(&mut self, node: NodeId, now: Instant) {
        if node == self.me {
            return;
        }
        if let Phase::Joining { contact, .. } = &self.phase {
            if *contact == node {
                self.backoff(now);
                return;
            }
        }
        if self.peers.remove(&node).is_some() {
            self.out.push_back(Output::Changed);
            if self.phase == Phase::Member && self.contact == Some(node) {
                self.elect();
            }
        }
    }

    /// Time has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.deadline {
            if now >= d && self.phase != Phase::Member && self.phase != Phase::Left {
                self.fail(OpenFailure::Timeout);
                return;
            }
        }
        match self.phase.clone() {
            Phase::Joining { since, .. } if now >= since + self.cfg.join_attempt => self.start_lookup(),
            Phase::Backoff { until } if now >= until => self.start_lookup(),
            _ => {}
        }
        if let Some(r) = self.next_renew {
            if now >= r && self.phase == Phase::Member {
                self.next_renew = None;
                if self.contact == Some(self.me) {
                    self.registry(RegistryOp::Claim(ClaimMode::Renew));
                } else {
                    self.registry(RegistryOp::Lookup);
                }
            }
        }
    }

    fn start_lookup(&mut self) {
        self.phase = Phase::LookingUp;
        self.registry(RegistryOp::Lookup);
    }

    fn start_create(&mut self) {
        self.phase = Phase::Creating;
        self.registry(RegistryOp::Claim(ClaimMode::Create));
    }

    fn backoff(&mut self, now: Instant) {
        self.phase = Phase::Backoff { until: now + self.cfg.retry };
    }

    fn fail(&mut self, why: OpenFailure) {
        self.phase = Phase::Left;
        self.deadline = None;
        self.out.push_back(Output::Failed(why));
    }

    fn registry(&mut self, op: RegistryOp) {
        // One request at a time: a newer request supersedes a pending one, whose answer is then ignored.
        self.reg_pending = Some(op.clone());
        self.out.push_back(Output::Registry(op));
    }

    fn become_member_as_contact(&mut self, now: Instant) {
        self.phase = Phase::Member;
        self.deadline = None;
        self.contact = Some(self.me);
        self.next_renew = Some(now + self.cfg.lease_ttl / 3);
        self.out.push_back(Output::Contact(self.me));
        self.out.push_back(Output::Ready);
        self.out.push_back(Output::Changed);
    }

    fn send_join_request(&mut self, contact: NodeId, addr: String) {
        let msg = Message::JoinRequest { channel: self.id, addr: self.my_addr.clone(), snapshot: self.local.clone() };
        self.out.push_back(Output::Send { to: contact, addr, msg });
    }

    fn send_snapshot(&mut self, to: NodeId, left: bool, reply: bool) {
        let Some(peer) = self.peers.get(&to) else { return };
        let msg = Message::Snapshot {
            channel: self.id,
            node: self.me,
            addr: self.my_addr.clone(),
            snapshot: self.local.clone(),
            left,
            reply,
        };
        self.out.push_back(Output::Send { to, addr: peer.addr.clone(), msg });
    }

    fn on_join_request(&mut self, from: NodeId, addr: String, snapshot: NodeSnapshot, now: Instant) {
        if self.phase != Phase::Member || self.contact != Some(self.me) {
            let msg = Message::JoinRedirect { channel: self.id };
            self.out.push_back(Output::Send { to: from, addr, msg });
            return;
        }
        let mut nodes = vec![PeerEntry { node: self.me, addr: self.my_addr.clone(), snapshot: self.local.clone() }];
        nodes.extend(self.peers.iter().filter(|(n, _)| **n != from).map(|(n, p)| PeerEntry {
            node: *n,
            addr: p.addr.clone(),
            snapshot: p.snapshot.clone(),
        }));
        // Relay the joiner to everyone else, so that nobody depends on the joiner's own links alone.
        let relay: Vec<(NodeId, String)> =
            self.peers.iter().filter(|(n, _)| **n != from).map(|(n, p)| (*n, p.addr.clone())).collect();
        for (to, to_addr) in relay {
            let msg = Message::Snapshot {
                channel: self.id,
                node: from,
                addr: addr.clone(),
                snapshot: snapshot.clone(),
                left: false,
                reply: false,
            };
            self.out.push_back(Output::Send { to, addr: to_addr, msg });
        }
        self.merge_peer(from, addr.clone(), snapshot, now);
        let msg = Message::JoinAccept { channel: self.id, contact: self.me, nodes };
        self.out.push_back(Output::Send { to: from, addr, msg });
        self.out.push_back(Output::Changed);
    }

    fn on_join_accept(&mut self, from: NodeId, contact: NodeId, nodes: Vec<PeerEntry>, now: Instant) {
        let rejoin = self.phase == Phase::Member;
        if !rejoin && !matches!(&self.phase, Phase::Joining { contact: c, .. } if *c == from) {
            return;
        }
        self.phase = Phase::Member;
        self.deadline = None;
        self.contact = Some(contact);
        self.out.push_back(Output::Contact(contact));
        for n in nodes {
            if n.node == self.me {
                continue;
            }
            let known = self.peers.contains_key(&n.node);
            self.merge_peer(n.node, n.addr, n.snapshot, now);
            // Introduce ourselves to everyone but the contact, who has our snapshot already; ask for theirs in case
            // it changed since the contact's copy.
            if n.node != from || !known {
                self.send_snapshot(n.node, false, n.node != from);
            }
        }
        if !rejoin {
            self.out.push_back(Output::Ready);
        }
        self.out.push_back(Output::Changed);
    }

    fn on_snapshot(
        &mut self,
        node: NodeId,
        addr: String,
        snapshot: NodeSnapshot,
        left: bool,
        reply: bool,
        now: Instant,
    ) {
        if node == self.me || matches!(self.phase, Phase::Left | Phase::Idle) {
            return;
        }
        if left {
            let newer = self.peers.get(&node).is_none_or(|p| snapshot.version >= p.snapshot.version);
            if newer && self.peers.remove(&node).is_some() {
                self.out.push_back(Output::Changed);
                if self.phase == Phase::Member && self.contact == Some(node) {
                    self.elect();
                }
            }
            return;
        }
        let new_node = !self.peers.contains_key(&node);
        if self.merge_peer(node, addr, snapshot, now) {
            self.out.push_back(Output::Changed);
        }
        if (new_node || reply) && self.phase == Phase::Member {
            self.send_snapshot(node, false, false);
        }
    }

    /// Stores a node's snapshot if it is newer than what we have. Returns true if anything changed.
    fn merge_peer(&mut self, node: NodeId, addr: String, snapshot: NodeSnapshot, now: Instant) -> bool {
        match self.peers.get_mut(&node) {
            Some(p) if p.snapshot.version >= snapshot.version => false,
            Some(p) => {
                p.snapshot = snapshot;
                p.addr = addr;
                p.updated = now;
                true
            }
            None => {
                self.peers.insert(node, Peer { addr, snapshot, updated: now });
                true
            }
        }
    }

    /// The contact is gone: the member with the lowest node id takes over.
    fn elect(&mut self) {
        let old = self.contact.unwrap_or(self.me);
        let lowest = self.peers.keys().next().copied().map_or(self.me, |p| p.min(self.me));
        self.contact = Some(lowest);
        self.out.push_back(Output::Contact(lowest));
        if lowest == self.me {
            self.registry(RegistryOp::Claim(ClaimMode::Takeover(old)));
        }
    }
}
