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
//! joiner's snapshot so that nobody depends on the joiner's direct links alone. A node's versions start, at each
//! opening of the channel, above those of its openings before ([`ChannelState::start_versions_at`]): a reopened
//! channel's snapshots replace the old instance's at members that missed its goodbye, and a late snapshot of the old
//! instance is stale.
//!
//! Beyond the paper: when the contact leaves or is lost, the remaining member with the lowest node id takes the role
//! over through a compare-and-set in the registry; a node that finds it lost a contest (the registry names someone
//! else) joins again through the winner, which merges the two views.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::access::{Denied, Policy, Roles, Token};
use crate::codec::{ClaimMode, Message, PeerEntry, RegEntry, RegErrorCode, RegResult, ViewEntry};
use crate::snapshot::NodeSnapshot;
use crate::types::{ChannelId, ChannelSecret, MemberInfo, NodeId};

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
    /// How soon after the channel's member counts change the contact tells the registry (so that listings are
    /// current); changes within this delay go out together.
    pub counts_delay: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            lease_ttl: Duration::from_secs(9),
            join_attempt: Duration::from_secs(2),
            open_timeout: Duration::from_secs(10),
            retry: Duration::from_millis(100),
            counts_delay: Duration::from_millis(250),
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
///
/// Not `#[non_exhaustive]` on purpose: the node layer maps every failure to an error of its own, and a new kind of
/// failure should make it decide how.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenFailure {
    /// The registry has no such channel.
    #[error("unknown channel")]
    UnknownChannel,
    /// The channel exists already (with [`OpenMode::Create`]).
    #[error("the channel exists already")]
    Exists,
    /// The registry could not be reached or refused the request.
    #[error(transparent)]
    Registry(RegistryFailure),
    /// No contact answered in time.
    #[error("no contact answered in time")]
    Timeout,
    /// The channel's access policy does not let this node in (the contact refused it, or this node's own credential
    /// does not cover it), or the channel's policy is not the one this node was configured with.
    #[error(transparent)]
    Refused(Refusal),
}

/// The node layer could not get an answer from the registry: the I/O layer's description of what went wrong (this
/// crate does no I/O, so it only carries it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RegistryUnreachable(pub String);

/// Why the registry did not serve a request of the channel.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryFailure {
    /// No answer: the registry could not be reached.
    #[error(transparent)]
    Unreachable(#[from] RegistryUnreachable),
    /// The registry answered with an error.
    #[error("{message}")]
    Refused {
        /// The registry's error code.
        code: RegErrorCode,
        /// The registry's explanation.
        message: String,
    },
}

/// Why this node is not let into a channel, or is dropped from it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// This node's own credential does not cover its members (checked before asking anyone).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The contact refused this node, with this reason (the contact's words, from its `JoinRefused`).
    #[error("{0}")]
    ByContact(String),
    /// The channel's access policy is not the one this node was configured with.
    #[error("channel {channel:?} has {}, but this node expects {}", describe_policy(.found), describe_policy(.expected))]
    PolicyMismatch {
        /// The channel.
        channel: String,
        /// The policy the contact announced.
        found: Option<Policy>,
        /// The policy this node was configured with.
        expected: Option<Policy>,
    },
    /// This node's credential expired; the other members drop it until it presents a valid one.
    #[error(
        "this node's credential for channel {channel:?} expired; the other members drop it until it presents a valid \
         one"
    )]
    Expired {
        /// The channel.
        channel: String,
    },
}

fn describe_policy(p: &Option<Policy>) -> String {
    match p {
        None => "no access policy".to_owned(),
        Some(p) => format!("a policy of authority {} requiring credentials for {}", hex8(&p.authority), p.require),
    }
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
    /// This node refused node `node` (or dropped it from its view): its snapshot is not covered by the channel's
    /// access policy.
    Denied {
        /// The node refused.
        node: NodeId,
        /// Why.
        reason: Denied,
    },
    /// The contact refused to take this node in again (its credential expired, say), or answered with another
    /// access policy than this node's; the node stays in its current view and tries again later.
    Refused(Refusal),
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

/// How this node's `open` went, step by step (for benchmarks and diagnosis: where a joiner's time goes).
/// Times are from the call to [`ChannelState::open`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JoinTrace {
    /// Registry lookups sent until the channel was open (one per join attempt).
    pub lookups: u32,
    /// `JoinRequest`s sent until the channel was open.
    pub requests: u32,
    /// Until the first lookup's answer arrived.
    pub first_lookup: Option<Duration>,
    /// Until the last `JoinRequest` before the answer that counted was sent.
    pub last_request: Option<Duration>,
    /// Until the contact's `JoinAccept` was taken (the channel open).
    pub accepted: Option<Duration>,
    /// Member nodes that `JoinAccept` listed with their snapshots (the contact included).
    pub accept_entries: usize,
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
    /// Its rights under the channel's access policy (every right when the channel has none).
    pub rights: Roles,
}

/// The members [`ChannelState::take_touched`] names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Added, or whose snapshot (and with it, possibly, the address) changed since the last take; each once, in
    /// order.
    pub nodes: Vec<NodeId>,
    /// `nodes` names every member added or changed since the last take. False while relaying is off, and for the
    /// first take after it was turned on (changes before it were not recorded): the owner then looks at every
    /// member.
    pub complete: bool,
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
    /// The channel's secret (see `ChannelSecret`): ours if we created the channel, the contact's once we joined.
    secret: ChannelSecret,
    local: NodeSnapshot,
    peers: BTreeMap<NodeId, Peer>,
    contact: Option<NodeId>,
    /// Registry requests sent and not answered yet, oldest first. The registry answers in order, so each answer
    /// belongs to the oldest; only the newest one's answer is acted upon.
    reg_pending: VecDeque<RegistryOp>,
    /// When a member next talks to the registry: the contact renews its lease; any other member checks who the contact
    /// is (only while it has reason to doubt it, see `check_contact`).
    next_renew: Option<Instant>,
    /// The claim the contact sends at its next renewal: `Renew`, or `Takeover(old)` until a takeover went through.
    claim: ClaimMode,
    /// The node our last `JoinRequest` went to, with its address and the snapshot version it carried.
    join_sent: Option<(NodeId, String, u64)>,
    /// The next contact check must join through the contact again even if we know it: we lost a link to a member,
    /// which may well be alive (the link broke, not the node), and only the contact can introduce it to us again.
    resync: bool,
    /// Peers we heard of only from a third party (a relayed snapshot, a join answer's list), with the time by which
    /// they must have spoken to us themselves. A node that left the channel (or never made it in) but is still up
    /// answers nothing in it, yet its links live on: without this, stale news of it would keep it in views forever.
    unconfirmed: BTreeMap<NodeId, Instant>,
    /// Nodes outside our view that may count us in, with their address and since when: those our JoinRequests went
    /// to (until they answer; a request held up in the network may still get us taken in), and peers dropped for not
    /// confirming (our snapshot may have reached them). They hear our goodbye too when we leave. Kept for a lease.
    outsiders: BTreeMap<NodeId, (String, Instant)>,
    /// The id we moved away from when we joined a channel created anew under another id (see `on_contact_found`).
    old_id: Option<ChannelId>,
    /// The member counts the registry got with our last claim.
    registered_counts: Option<(u32, u32)>,
    /// The channel's access policy: configured here (`policy_pinned`), or learnt from the contact.
    policy: Option<Policy>,
    /// The policy was configured on this node: a channel with another policy is refused rather than adopted.
    policy_pinned: bool,
    /// An instant and the time since the Unix epoch at that instant, for credentials' expiry.
    wall: Option<(Instant, Duration)>,
    /// The owner was told that this node's own credential expired (`Output::Refused`).
    expiry_told: bool,
    /// Members' snapshots reach this node through an overlay (a channel in tree mode), not each on its own link:
    /// a member heard of from a third party is not dropped for not speaking to this node directly.
    relayed: bool,
    /// Tree mode: members that left or were taken for gone, with their address, the snapshot version at which they
    /// went and when this node learnt it (tombstones, kept for [`TOMBSTONE_FOR`]; see `bury`).
    departed: BTreeMap<NodeId, (String, u64, Instant)>,
    /// When this node's own snapshot last changed or a member was last dropped (see `quiet`).
    view_changed: Option<Instant>,
    /// Tree mode: when this node last sent its view as a list.
    last_list: Option<Instant>,
    /// Tree mode (`relayed`): members added or whose snapshot or address changed since the owner last took them
    /// ([`ChannelState::take_touched`]), so that the owner's per-change work is about the members that changed, not
    /// about every member.
    touched: Vec<NodeId>,
    /// Every change since the last take is in `touched` (relaying was on throughout).
    touched_whole: bool,
    /// When `open` was called, and how it went (see [`JoinTrace`]).
    opened_at: Option<Instant>,
    trace: JoinTrace,
    out: VecDeque<Output>,
}

impl ChannelState {
    /// A channel named `name` on node `me` (listening on `my_addr`). `fresh_id` is used if this node ends up creating
    /// the channel; otherwise the id comes from the registry.
    ///
    /// `fresh_id` and `fresh_secret` (both random, from the caller: the core has no randomness of its own) are used if
    /// this node creates the channel; a joiner takes the channel's from the contact.
    pub fn new(
        name: &str,
        fresh_id: ChannelId,
        fresh_secret: ChannelSecret,
        me: NodeId,
        my_addr: &str,
        cfg: MembershipConfig,
    ) -> Self {
        ChannelState {
            name: name.to_owned(),
            id: fresh_id,
            secret: fresh_secret,
            me,
            my_addr: my_addr.to_owned(),
            cfg,
            mode: OpenMode::OpenOrCreate,
            phase: Phase::Idle,
            deadline: None,
            local: NodeSnapshot::default(),
            peers: BTreeMap::new(),
            contact: None,
            reg_pending: VecDeque::new(),
            next_renew: None,
            claim: ClaimMode::Renew,
            join_sent: None,
            resync: false,
            unconfirmed: BTreeMap::new(),
            outsiders: BTreeMap::new(),
            old_id: None,
            registered_counts: None,
            policy: None,
            policy_pinned: false,
            wall: None,
            expiry_told: false,
            relayed: false,
            departed: BTreeMap::new(),
            view_changed: None,
            last_list: None,
            touched: Vec::new(),
            touched_whole: false,
            opened_at: None,
            trace: JoinTrace::default(),
            out: VecDeque::new(),
        }
    }

    /// How this node's `open` went (see [`JoinTrace`]).
    pub fn join_trace(&self) -> JoinTrace {
        self.trace
    }

    /// Tree mode: the members added, or whose snapshot or address changed, since the last call (each once, in no
    /// particular order). Kept only while members' snapshots are relayed (`set_relayed`); the owner learns the
    /// others from [`ChannelState::peers`] when it turns that on.
    pub fn take_touched(&mut self) -> Touched {
        let mut nodes = std::mem::take(&mut self.touched);
        nodes.sort_unstable();
        nodes.dedup();
        let complete = self.relayed && self.touched_whole;
        self.touched_whole = self.relayed;
        Touched { nodes, complete }
    }

    fn since_open(&self, now: Instant) -> Option<Duration> {
        self.opened_at.map(|t| now.saturating_duration_since(t))
    }

    /// Members' snapshots reach this node through an overlay from now on (the node layer's tree mode), not each on
    /// the member's own link: members heard of from a third party (a join answer, a relay) are not dropped for not
    /// speaking to this node directly.
    pub fn set_relayed(&mut self, on: bool) {
        if on != self.relayed {
            // Changes before relaying was on were not recorded: the next take cannot name them all.
            self.touched_whole = false;
        }
        self.relayed = on;
        if on {
            self.unconfirmed.clear();
        } else {
            self.touched.clear();
        }
    }

    /// Asks the contact for its view again soon (a lookup in the registry, then a `JoinRequest` whose answer lists
    /// every member): the node layer's overlay lost snapshots of a member this node may not know of.
    pub fn resync(&mut self, now: Instant) {
        if self.phase == Phase::Member && self.contact != Some(self.me) {
            self.resync = true;
            self.check_contact(now);
        }
    }

    /// The digest of this node's view (tree mode's anti-entropy, see [`ChannelState::sync_with`]): how many member
    /// nodes it knows, itself included, and [`view_hash`] of them with their snapshot versions. Two members with
    /// the same digest know the same members at the same versions.
    pub fn view_digest(&self) -> (u32, u64) {
        let me = std::iter::once((self.me, self.local.version));
        let all = me.chain(self.peers.iter().map(|(n, p)| (*n, p.snapshot.version)));
        ((self.peers.len() + 1) as u32, view_hash(all))
    }

    /// Tree mode's anti-entropy: sends member `to` (an overlay neighbour) the digest of this node's view. The
    /// overlay broadcasts every snapshot once, and a member that missed one (a stall on a loaded host, a graft
    /// that failed, a broadcast made before it was in the overlay) would otherwise never learn it. Where the
    /// digests differ, the two exchange their lists of (node, version) and then only the snapshots and departures
    /// the other lacks; where they agree, the cost is one small message. Called by the node layer every second or so.
    pub fn sync_with(&mut self, to: NodeId, now: Instant) {
        if self.phase != Phase::Member || to == self.me {
            return;
        }
        let Some(addr) = self.peers.get(&to).map(|p| p.addr.clone()) else { return };
        let msg = self.view_sync(None, now);
        self.out.push_back(Output::Send { to, addr, msg });
    }

    /// How long this node's view has not changed: no member's snapshot arrived newer, none was dropped, its own
    /// did not change.
    fn quiet(&self, now: Instant) -> Duration {
        let last = self.peers.values().map(|p| p.updated).chain(self.view_changed).max();
        last.map_or(Duration::MAX, |t| now.saturating_duration_since(t))
    }

    fn view_sync(&mut self, list: Option<(bool, Vec<ViewEntry>)>, now: Instant) -> Message {
        let quiet_ms = self.quiet(now).as_millis().min(u128::from(u32::MAX)) as u32;
        let (count, hash) = self.view_digest();
        if list.is_some() {
            self.last_list = Some(now);
        }
        Message::ViewSync { channel: self.id, count, hash, quiet_ms, list }
    }

    /// This node's view as a list: every member node it knows (itself included) and its recent departures.
    fn view_entries(&self) -> Vec<ViewEntry> {
        let me = ViewEntry { node: self.me, version: self.local.version, left: false };
        let peers = self.peers.iter().map(|(n, p)| ViewEntry { node: *n, version: p.snapshot.version, left: false });
        let gone = self.departed.iter().filter(|(n, _)| !self.peers.contains_key(n)).map(|(n, (_, v, _))| ViewEntry {
            node: *n,
            version: *v,
            left: true,
        });
        std::iter::once(me).chain(peers).chain(gone).collect()
    }

    /// A `ViewSync` from `from` (see [`ChannelState::sync_with`]).
    fn on_view_sync(
        &mut self,
        from: NodeId,
        count: u32,
        hash: u64,
        quiet_ms: u32,
        list: Option<(bool, Vec<ViewEntry>)>,
        now: Instant,
    ) {
        if self.phase != Phase::Member {
            return;
        }
        let Some(from_addr) = self.peers.get(&from).map(|p| p.addr.clone()) else { return };
        let Some((reply, entries)) = list else {
            // A list costs O(members): not for views that differ only by a broadcast still on its way (one of them
            // changed within `VIEW_SETTLE`), unless this node sent none for `VIEW_LIST_FLOOR` (under continuous
            // churn views are never quiet, and what a member missed must still be repaired).
            let quiet = self.quiet(now).min(Duration::from_millis(u64::from(quiet_ms)));
            let floor = self.last_list.is_none_or(|t| now.saturating_duration_since(t) >= VIEW_LIST_FLOOR);
            if self.view_digest() != (count, hash) && (quiet >= VIEW_SETTLE || floor) {
                let list = Some((true, self.view_entries()));
                let msg = self.view_sync(list, now);
                self.out.push_back(Output::Send { to: from, addr: from_addr, msg });
            }
            return;
        };
        let theirs: BTreeMap<NodeId, (u64, bool)> = entries.iter().map(|e| (e.node, (e.version, e.left))).collect();
        // This node itself: taken for gone by someone (its link failed), or unknown or old there.
        match theirs.get(&self.me) {
            Some((v, true)) if *v >= self.local.version => self.publish_local(now),
            Some((v, false)) if *v >= self.local.version => {}
            _ => self.send_snapshot(from, false, false),
        }
        // Departures this node knows of and the other does not: a goodbye, as the departed node's own would be.
        for (node, v, addr) in self.departed.iter().map(|(n, (a, v, _))| (*n, *v, a.clone())).collect::<Vec<_>>() {
            if self.peers.contains_key(&node) || node == from {
                continue;
            }
            if theirs.get(&node).is_some_and(|(tv, tl)| !*tl && *tv <= v) {
                let snapshot = NodeSnapshot { version: v, instance: 0, members: Vec::new(), token: None };
                let msg = self.snapshot_message(node, addr, snapshot, true, false);
                self.out.push_back(Output::Send { to: from, addr: from_addr.clone(), msg });
            }
        }
        // Members this node knows at a newer version (or at all); members the other knows to have left.
        let mine: Vec<(NodeId, u64)> = self.peers.iter().map(|(n, p)| (*n, p.snapshot.version)).collect();
        for (node, v) in mine {
            if node == from {
                continue;
            }
            match theirs.get(&node) {
                Some((tv, true)) if *tv >= v => {
                    if self.drop_peer(node, now) {
                        self.after_departure(node, now);
                    }
                }
                Some((tv, _)) if *tv >= v => {}
                _ => {
                    let p = &self.peers[&node];
                    let msg = self.snapshot_message(node, p.addr.clone(), p.snapshot.clone(), false, false);
                    self.out.push_back(Output::Send { to: from, addr: from_addr.clone(), msg });
                }
            }
        }
        // What the other knows that this node does not: it sends it on seeing this node's list.
        let more = theirs.iter().any(|(n, (v, left))| {
            *n != self.me && !*left && !self.buried(*n, *v) && self.peers.get(n).is_none_or(|p| p.snapshot.version < *v)
        });
        if reply && more {
            let list = Some((false, self.view_entries()));
            let msg = self.view_sync(list, now);
            self.out.push_back(Output::Send { to: from, addr: from_addr, msg });
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

    /// Requires the access policy `policy` in this channel (see `crate::access`); `None` requires nothing and
    /// adopts the channel's policy when joining. Call before [`ChannelState::open`].
    pub fn set_policy(&mut self, policy: Option<Policy>) {
        self.policy = policy;
        self.policy_pinned = policy.is_some();
    }

    /// The channel's access policy, as configured or learnt from the contact.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// Tells the state machine the wall-clock time: at `now`, `since_epoch` has passed since the Unix epoch.
    /// Credentials with an expiry are refused until it is known.
    pub fn set_wall_clock(&mut self, now: Instant, since_epoch: Duration) {
        self.wall = Some((now, since_epoch));
    }

    /// Unix time in seconds at `now`.
    fn unix(&self, now: Instant) -> Option<u64> {
        self.wall.map(|(at, epoch)| (epoch + now.saturating_duration_since(at)).as_secs())
    }

    /// This node's rights in the channel with its credential, or why it has none.
    pub fn local_rights(&self, now: Instant) -> Result<Roles, Denied> {
        match &self.policy {
            None => Ok(Roles::ALL),
            Some(p) => p.rights(&self.name, self.me, self.local.token.as_deref(), self.unix(now)),
        }
    }

    /// True if node `node` (this node included) holds `role` in the channel.
    pub fn permits(&self, node: NodeId, role: Roles, now: Instant) -> bool {
        if self.policy.is_none() {
            return true;
        }
        if node == self.me {
            return self.local_rights(now).is_ok_and(|r| r.contains(role));
        }
        self.peers.get(&node).is_some_and(|p| p.rights.contains(role))
    }

    /// Sets the instance this node's snapshots carry ([`NodeSnapshot::instance`]): a number the caller takes for each
    /// opening of the channel, above those of the node's earlier openings, before [`ChannelState::open`].
    pub fn set_instance(&mut self, instance: u64) {
        self.local.instance = instance;
    }

    /// Starts this opening's snapshot versions above `base` (call before [`ChannelState::open`]). Versions order a
    /// node's snapshots whatever the order of arrival; a node that closes the channel and opens it again must have
    /// its new instance's snapshots taken as newer than the old one's by members that missed the goodbye, and a late
    /// snapshot of the old instance taken as stale. The caller passes the wall clock in microseconds since the Unix
    /// epoch (kept increasing by the node between its openings of a channel), so that an instance's versions start
    /// above those of every instance before it on that node, restarts included, unless the clock went back by more
    /// than the time between the two openings (members that missed the goodbye then keep the old instance's snapshot
    /// until the new one's versions pass it).
    pub fn start_versions_at(&mut self, base: u64) {
        if self.phase == Phase::Idle {
            self.local.version = self.local.version.max(base);
        }
    }

    /// Replaces this node's credential in the channel (a renewed one, say) and tells every other member node.
    pub fn set_token(&mut self, token: Option<Token>, now: Instant) {
        if self.phase == Phase::Left {
            return;
        }
        self.local.token = token.map(std::sync::Arc::new);
        self.expiry_told = false;
        self.publish_local(now);
    }

    /// Node `node`'s rights if its snapshot `snapshot` is covered by the channel's policy.
    fn admit(&self, node: NodeId, snapshot: &NodeSnapshot, now: Instant) -> Result<Roles, Denied> {
        let Some(policy) = &self.policy else { return Ok(Roles::ALL) };
        let unix = self.unix(now);
        if let Some(p) = self.peers.get(&node) {
            // The same credential as before needs no second signature check, only the expiry.
            let valid = Policy::expiry(snapshot).is_none_or(|t| unix.is_some_and(|u| u < t));
            if p.snapshot.token == snapshot.token && valid {
                return policy.check_members(&self.name, snapshot, p.rights);
            }
        }
        policy.admit(&self.name, node, snapshot, unix)
    }

    /// Like `admit`, reporting a refusal as `Output::Denied`.
    fn checked(&mut self, node: NodeId, snapshot: &NodeSnapshot, now: Instant) -> Option<Roles> {
        match self.admit(node, snapshot, now) {
            Ok(r) => Some(r),
            Err(why) => {
                self.out.push_back(Output::Denied { node, reason: why });
                None
            }
        }
    }

    /// Checks every peer again (after the policy changed, or credentials expired) and drops those no longer covered.
    fn recheck_peers(&mut self, now: Instant) {
        let nodes: Vec<NodeId> = self.peers.keys().copied().collect();
        for node in nodes {
            let Some(p) = self.peers.get(&node) else { continue };
            let verdict = match &self.policy {
                None => Ok(Roles::ALL),
                Some(policy) => policy.admit(&self.name, node, &p.snapshot, self.unix(now)),
            };
            match verdict {
                Ok(r) => {
                    if let Some(p) = self.peers.get_mut(&node) {
                        p.rights = r;
                    }
                }
                Err(why) => {
                    self.out.push_back(Output::Denied { node, reason: why });
                    if self.drop_peer(node, now) && self.phase == Phase::Member {
                        self.after_departure(node, now);
                    }
                }
            }
        }
    }

    /// When the first peer credential expires.
    fn next_expiry(&self) -> Option<Instant> {
        self.policy?;
        let (at, epoch) = self.wall?;
        let first = self.peers.values().filter_map(|p| Policy::expiry(&p.snapshot)).min()?;
        Some(at + Duration::from_secs(first).saturating_sub(epoch))
    }

    /// When this node's own credential expires, unless the owner was told already.
    fn own_expiry(&self) -> Option<Instant> {
        self.policy?;
        if self.expiry_told {
            return None;
        }
        let (at, epoch) = self.wall?;
        Some(at + Duration::from_secs(Policy::expiry(&self.local)?).saturating_sub(epoch))
    }

    /// Next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.out.pop_front();
        if out.is_none() {
            crate::gossip::shrink_idle(&mut self.out);
        }
        out
    }

    /// When [`ChannelState::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase_timer = match &self.phase {
            Phase::Joining { since, .. } => Some(*since + self.cfg.join_attempt),
            Phase::Backoff { until } => Some(*until),
            _ => None,
        };
        let unconfirmed =
            self.unconfirmed.values().min().copied().filter(|_| self.phase == Phase::Member && !self.relayed);
        let expiry = self.next_expiry().filter(|_| self.phase == Phase::Member);
        let own = self.own_expiry().filter(|_| self.phase == Phase::Member);
        [phase_timer, self.deadline, self.next_renew, unconfirmed, expiry, own].into_iter().flatten().min()
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
                secret: self.secret,
            },
            RegistryOp::Remove => Message::RegRemove {
                req,
                name: self.name.clone(),
                channel: self.id,
                node: self.me,
                secret: self.secret,
            },
        }
    }

    /// Starts opening the channel with the local members given so far.
    pub fn open(&mut self, mode: OpenMode, now: Instant) {
        if self.phase != Phase::Idle {
            return;
        }
        self.mode = mode;
        self.deadline = Some(now + self.cfg.open_timeout);
        self.opened_at = Some(now);
        if let Some(policy) = &self.policy {
            // Our own credential first: better a clear error here than a refusal from every other member.
            if let Err(why) = policy.admit(&self.name, self.me, &self.local, self.unix(now)) {
                self.fail(OpenFailure::Refused(Refusal::Denied(why)));
                return;
            }
        }
        match mode {
            OpenMode::Create => self.start_create(),
            OpenMode::Open | OpenMode::OpenOrCreate => self.start_lookup(),
        }
    }

    /// Replaces this node's members in the channel and tells every other member node.
    pub fn set_members(&mut self, members: Vec<MemberInfo>, now: Instant) {
        if self.phase == Phase::Left {
            return;
        }
        self.local.members = members;
        self.publish_local(now);
    }

    /// Tells every other member node our new snapshot.
    fn publish_local(&mut self, now: Instant) {
        self.local.version += 1;
        self.view_changed = Some(now);
        if self.phase == Phase::Member {
            let targets: Vec<NodeId> = self.peers.keys().copied().collect();
            for to in targets {
                self.send_snapshot(to, false, false);
            }
        }
        self.note_counts(now);
    }

    /// As the contact, renews soon when the member counts differ from what the registry has, so that `kecho channels`
    /// and other listings show the channel as it is rather than as it was at the last renewal.
    fn note_counts(&mut self, now: Instant) {
        if self.phase != Phase::Member || self.contact != Some(self.me) || !self.reg_pending.is_empty() {
            return;
        }
        if self.registered_counts == Some(self.counts()) {
            return;
        }
        let soon = now + self.cfg.counts_delay;
        if self.next_renew.is_none_or(|r| r > soon) {
            self.next_renew = Some(soon);
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
            let targets: Vec<(NodeId, String)> = self.peers.iter().map(|(n, p)| (*n, p.addr.clone())).collect();
            for (to, addr) in targets {
                self.goodbye(to, addr);
            }
            if self.contact == Some(self.me) && self.peers.is_empty() {
                self.registry(RegistryOp::Remove);
            }
        }
        self.say_goodbye_to_others();
        self.phase = Phase::Left;
        self.deadline = None;
        self.next_renew = None;
        self.peers.clear();
        self.unconfirmed.clear();
    }

    /// A membership message from node `from`.
    pub fn handle_message(&mut self, from: NodeId, msg: Message, now: Instant) {
        self.message(from, msg, now);
        self.note_counts(now);
    }

    /// A membership message from node `from`.
    fn message(&mut self, from: NodeId, msg: Message, now: Instant) {
        if from == self.me {
            // Only a peer lying about its identity can get here; never let it make us our own peer.
            return;
        }
        // A node that speaks for itself in the channel is confirmed to be in it.
        match &msg {
            Message::JoinRequest { .. } | Message::JoinAccept { .. } => _ = self.unconfirmed.remove(&from),
            Message::Snapshot { node, left: false, .. } if *node == from => _ = self.unconfirmed.remove(&from),
            _ => {}
        }
        match msg {
            Message::JoinRequest { addr, snapshot, .. } => self.on_join_request(from, addr, snapshot, now),
            Message::JoinAccept { contact, secret, nodes, policy, .. } => {
                self.on_join_accept(from, contact, secret, nodes, policy, now)
            }
            Message::JoinRedirect { .. } => {
                // It did not take us in.
                self.outsiders.remove(&from);
                self.on_join_redirect(from, now)
            }
            Message::JoinRefused { reason, .. } => self.on_join_refused(from, Refusal::ByContact(reason)),
            Message::Snapshot { node, addr, snapshot, left, reply, .. } => {
                self.on_snapshot(from, node, addr, snapshot, left, reply, now)
            }
            Message::ViewSync { count, hash, quiet_ms, list, .. } => {
                self.on_view_sync(from, count, hash, quiet_ms, list, now)
            }
            _ => {}
        }
    }

    /// The answer to the oldest registry request not answered yet: `Err` if the registry could not be reached.
    /// Answers must be given in the order of the requests (the registry answers in order).
    pub fn handle_registry(&mut self, result: Result<RegResult, RegistryUnreachable>, now: Instant) {
        self.registry_answer(result, now);
        self.note_counts(now);
    }

    /// The answer to the oldest registry request not answered yet: `Err` if the registry could not be reached.
    /// Answers must be given in the order of the requests (the registry answers in order).
    fn registry_answer(&mut self, result: Result<RegResult, RegistryUnreachable>, now: Instant) {
        // Match the answer with its request: acting on the answer to an older request as if it answered the newest
        // one took, for instance, a lookup's entry for a successful takeover.
        let Some(op) = self.reg_pending.pop_front() else { return };
        if !self.reg_pending.is_empty() || self.phase == Phase::Left {
            // Superseded by a newer request, whose answer is still to come; or too late to matter (a late answer must
            // neither fail a failed open again nor start a lookup after the channel was given up).
            return;
        }
        if op == RegistryOp::Lookup && self.phase == Phase::LookingUp && self.trace.first_lookup.is_none() {
            self.trace.first_lookup = self.since_open(now);
        }
        match (op, result) {
            (RegistryOp::Lookup, Ok(RegResult::Entry(e))) => {
                if self.phase == Phase::Member {
                    self.on_contact_found(e, now);
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
                self.trace.requests += 1;
                self.trace.last_request = self.since_open(now);
                self.send_join_request(e.contact, e.addr, now);
            }
            (RegistryOp::Lookup, Ok(RegResult::Error { code: RegErrorCode::UnknownChannel, .. })) => {
                if self.phase == Phase::Member {
                    // The entry vanished: claim it for ourselves.
                    self.claim = ClaimMode::Renew;
                    self.registry(RegistryOp::Claim(ClaimMode::Renew));
                    return;
                }
                if self.phase != Phase::LookingUp {
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
            (RegistryOp::Claim(ClaimMode::Create), Ok(RegResult::Error { code: RegErrorCode::Exists, .. }))
                if self.phase == Phase::Creating =>
            {
                match self.mode {
                    OpenMode::Create => self.fail(OpenFailure::Exists),
                    // Someone created it between our lookup and our create: join it.
                    _ => self.start_lookup(),
                }
            }
            (RegistryOp::Claim(_), Ok(RegResult::Entry(_))) if self.phase == Phase::Member => {
                self.set_contact(self.me);
                self.claim = ClaimMode::Renew;
                self.next_renew = Some(now + self.cfg.lease_ttl / 3);
            }
            (RegistryOp::Claim(_), Ok(RegResult::Error { code: RegErrorCode::NotContact, .. }))
                if self.phase == Phase::Member =>
            {
                // Someone else holds the role: find out who and join through them.
                self.next_renew = None;
                self.claim = ClaimMode::Renew;
                self.registry(RegistryOp::Lookup);
            }
            (RegistryOp::Remove, _) => {}
            (_, Err(e)) => match self.phase {
                Phase::LookingUp | Phase::Creating => self.fail(OpenFailure::Registry(e.into())),
                // The contact keeps the role (and a pending takeover) and tries again at the next renewal; another
                // member checks the contact again then.
                Phase::Member => self.next_renew = Some(now + self.cfg.lease_ttl / 3),
                _ => {}
            },
            (_, Ok(RegResult::Error { code, message })) => match self.phase {
                Phase::LookingUp | Phase::Creating => {
                    self.fail(OpenFailure::Registry(RegistryFailure::Refused { code, message }))
                }
                Phase::Member => self.next_renew = Some(now + self.cfg.lease_ttl / 3),
                _ => {}
            },
            _ => {}
        }
    }

    /// The link to `node` is gone (closed, reset or silent past the heartbeat timeout).
    pub fn handle_peer_lost(&mut self, node: NodeId, now: Instant) {
        self.peer_lost(node, now);
        self.note_counts(now);
    }

    /// The link to `node` is gone (closed, reset or silent past the heartbeat timeout).
    fn peer_lost(&mut self, node: NodeId, now: Instant) {
        if node == self.me {
            return;
        }
        if let Phase::Joining { contact, .. } = &self.phase {
            if *contact == node {
                self.backoff(now);
                return;
            }
        }
        if self.drop_peer(node, now) {
            if self.phase == Phase::Member {
                self.lost_member(node, now);
            }
        } else if self.phase == Phase::Member && self.contact == Some(node) {
            // The contact the registry named, which we were joining again through, cannot be reached: without this,
            // a member that learnt of a dead contact from the registry would wait for it forever.
            self.elect(node, now);
        }
    }

    /// Time has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.timeout(now);
        self.note_counts(now);
    }

    /// Time has passed.
    fn timeout(&mut self, now: Instant) {
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
        if self.phase == Phase::Member && self.next_expiry().is_some_and(|t| t <= now) {
            self.recheck_peers(now);
        }
        if self.phase == Phase::Member && self.own_expiry().is_some_and(|t| t <= now) {
            // The others drop this node now: say so, so that the owner renews (`set_token`).
            self.expiry_told = true;
            self.out.push_back(Output::Refused(Refusal::Expired { channel: self.name.clone() }));
        }
        if self.relayed {
            self.unconfirmed.clear();
        }
        if self.phase == Phase::Member {
            let silent: Vec<NodeId> = self.unconfirmed.iter().filter(|(_, t)| **t <= now).map(|(n, _)| *n).collect();
            for node in silent {
                if let Some(p) = self.peers.get(&node) {
                    self.add_outsider(node, p.addr.clone(), now);
                }
                if self.drop_peer(node, now) {
                    self.lost_member(node, now);
                }
            }
        }
        if let Some(r) = self.next_renew {
            if now >= r && self.phase == Phase::Member {
                self.next_renew = None;
                if self.contact == Some(self.me) {
                    self.registry(RegistryOp::Claim(self.claim));
                } else {
                    self.registry(RegistryOp::Lookup);
                }
            }
        }
    }

    fn start_lookup(&mut self) {
        self.trace.lookups += 1;
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

    /// On leaving or giving up, says goodbye to nodes outside our view that may still count us in: a node that our
    /// JoinRequest reached may have taken us in (and told the others) although its answer has not reached us (when
    /// joining, or joining again after a split), and peers we dropped for not confirming may have got our snapshot.
    /// Their links to our node live on after we forget the channel, so nothing else would ever remove us.
    fn say_goodbye_to_others(&mut self) {
        self.join_sent = None;
        let others: Vec<(NodeId, String)> = std::mem::take(&mut self.outsiders)
            .into_iter()
            .filter(|(n, _)| !self.peers.contains_key(n))
            .map(|(n, (a, _))| (n, a))
            .collect();
        for (to, addr) in others {
            self.goodbye(to, addr);
        }
    }

    fn add_outsider(&mut self, node: NodeId, addr: String, now: Instant) {
        let keep = self.cfg.lease_ttl;
        self.outsiders.retain(|_, (_, t)| now.saturating_duration_since(*t) < keep);
        self.outsiders.insert(node, (addr, now));
    }

    /// Sends our last snapshot with the *left* flag; also under the id we moved away from, if any, since nodes that
    /// have not followed us to the new channel drop whatever comes under its id.
    fn goodbye(&mut self, to: NodeId, addr: String) {
        for channel in std::iter::once(self.id).chain(self.old_id) {
            let msg = Message::Snapshot {
                channel,
                node: self.me,
                addr: self.my_addr.clone(),
                snapshot: self.local.clone(),
                left: true,
                reply: false,
            };
            self.out.push_back(Output::Send { to, addr: addr.clone(), msg });
        }
    }

    fn fail(&mut self, why: OpenFailure) {
        self.local.version += 1;
        self.local.members.clear();
        self.say_goodbye_to_others();
        self.peers.clear();
        self.unconfirmed.clear();
        self.phase = Phase::Left;
        self.deadline = None;
        self.out.push_back(Output::Failed(why));
    }

    fn registry(&mut self, op: RegistryOp) {
        if matches!(op, RegistryOp::Claim(_)) {
            self.registered_counts = Some(self.counts());
        }
        // One request at a time matters: a newer request supersedes pending ones, whose answers are then ignored.
        self.reg_pending.push_back(op.clone());
        self.out.push_back(Output::Registry(op));
    }

    fn set_contact(&mut self, contact: NodeId) {
        if self.contact != Some(contact) {
            self.contact = Some(contact);
            self.out.push_back(Output::Contact(contact));
            // A new contact may know nodes we do not (it may have taken the role over after a split, or have been
            // elected with a view that differs from ours): the next check joins through it to get its view.
            self.resync = contact != self.me;
        }
    }

    /// Asks the registry who the contact is at `at` (or earlier if already due), unless we are the contact.
    fn check_contact(&mut self, at: Instant) {
        if self.phase == Phase::Member && self.contact != Some(self.me) {
            self.next_renew = Some(self.next_renew.map_or(at, |t| t.min(at)));
        }
    }

    fn become_member_as_contact(&mut self, now: Instant) {
        self.phase = Phase::Member;
        self.deadline = None;
        self.contact = Some(self.me);
        self.claim = ClaimMode::Renew;
        self.next_renew = Some(now + self.cfg.lease_ttl / 3);
        self.out.push_back(Output::Contact(self.me));
        self.out.push_back(Output::Ready);
        self.out.push_back(Output::Changed);
    }

    fn send_join_request(&mut self, contact: NodeId, addr: String, now: Instant) {
        self.join_sent = Some((contact, addr.clone(), self.local.version));
        self.add_outsider(contact, addr.clone(), now);
        let msg = Message::JoinRequest { channel: self.id, addr: self.my_addr.clone(), snapshot: self.local.clone() };
        self.out.push_back(Output::Send { to: contact, addr, msg });
    }

    fn snapshot_message(&self, node: NodeId, addr: String, snapshot: NodeSnapshot, left: bool, reply: bool) -> Message {
        Message::Snapshot { channel: self.id, node, addr, snapshot, left, reply }
    }

    fn send_snapshot(&mut self, to: NodeId, left: bool, reply: bool) {
        let Some(peer) = self.peers.get(&to) else { return };
        let addr = peer.addr.clone();
        let msg = self.snapshot_message(self.me, self.my_addr.clone(), self.local.clone(), left, reply);
        self.out.push_back(Output::Send { to, addr, msg });
    }

    fn on_join_request(&mut self, from: NodeId, addr: String, snapshot: NodeSnapshot, now: Instant) {
        if self.phase != Phase::Member || self.contact != Some(self.me) {
            let msg = Message::JoinRedirect { channel: self.id };
            self.out.push_back(Output::Send { to: from, addr, msg });
            // Whoever sent this was told (by the registry) that we are the contact. Should the registry be right and
            // our belief wrong, nobody would renew the lease nor let anyone in: check.
            self.check_contact(now + self.cfg.retry);
            return;
        }
        let rights = match self.admit(from, &snapshot, now) {
            Ok(r) => r,
            Err(why) => {
                let msg = Message::JoinRefused { channel: self.id, reason: why.to_string() };
                self.out.push_back(Output::Denied { node: from, reason: why });
                self.out.push_back(Output::Send { to: from, addr, msg });
                // A member joining again that is no longer covered (its credential expired) is a member no longer.
                if self.drop_peer(from, now) {
                    self.after_departure(from, now);
                }
                return;
            }
        };
        let mut nodes = vec![PeerEntry { node: self.me, addr: self.my_addr.clone(), snapshot: self.local.clone() }];
        nodes.extend(self.peers.iter().filter(|(n, _)| **n != from).map(|(n, p)| PeerEntry {
            node: *n,
            addr: p.addr.clone(),
            snapshot: p.snapshot.clone(),
        }));
        // Relay the joiner to everyone else, so that nobody depends on the joiner's own links alone. A member joining
        // again that we know as it is needs no relay: the members it does not know hear from it (it introduces
        // itself to every listed node new to it), and those it knows know it.
        let relay: Vec<(NodeId, String)> =
            self.peers.iter().filter(|(n, _)| **n != from).map(|(n, p)| (*n, p.addr.clone())).collect();
        if self.merge_peer(from, addr.clone(), snapshot.clone(), rights, now) {
            for (to, to_addr) in relay {
                let msg = self.snapshot_message(from, addr.clone(), snapshot.clone(), false, false);
                self.out.push_back(Output::Send { to, addr: to_addr, msg });
            }
        }
        let msg =
            Message::JoinAccept { channel: self.id, contact: self.me, secret: self.secret, nodes, policy: self.policy };
        self.out.push_back(Output::Send { to: from, addr, msg });
        self.out.push_back(Output::Changed);
    }

    fn on_join_accept(
        &mut self,
        from: NodeId,
        contact: NodeId,
        secret: ChannelSecret,
        nodes: Vec<PeerEntry>,
        policy: Option<Policy>,
        now: Instant,
    ) {
        let rejoin = self.phase == Phase::Member;
        let asked = matches!(&self.join_sent, Some((to, ..)) if *to == from);
        if rejoin {
            // Only the answer of the node we last asked, and still take for the contact, counts: a late answer must
            // not override what we learnt since (say, that we hold the role ourselves now).
            if !asked || self.contact != Some(from) {
                return;
            }
        } else {
            let waiting = matches!(&self.phase, Phase::Joining { contact: c, .. } if *c == from);
            // The answer to a request given up on after the attempt's time still counts (a process that stalled
            // runs the attempt's timer before reading the answer that came meanwhile; dropping it made the joiner
            // ask again, at the cost of another `JoinAccept` listing every member, and under load again and again).
            let late = asked && matches!(self.phase, Phase::LookingUp | Phase::Backoff { .. } | Phase::Joining { .. });
            if !(waiting || late) {
                return;
            }
        }
        if policy != self.policy {
            let why = Refusal::PolicyMismatch { channel: self.name.clone(), found: policy, expected: self.policy };
            if rejoin {
                // Not the channel we are in (created anew by someone else while we were cut off, say): stay apart.
                self.join_sent = None;
                self.out.push_back(Output::Refused(why));
                return;
            }
            if self.policy_pinned {
                // It took us in: our goodbye tells it (and fail's goodbye reaches it as an outsider).
                self.fail(OpenFailure::Refused(why));
                return;
            }
            self.policy = policy;
            // Anyone we heard of before knowing the policy must pass it now.
            self.recheck_peers(now);
        }
        if !rejoin {
            self.trace.accepted = self.since_open(now);
            self.trace.accept_entries = nodes.len();
        }
        let sent_version = self.join_sent.take().map(|(_, _, v)| v);
        self.secret = secret;
        self.phase = Phase::Member;
        self.deadline = None;
        self.set_contact(contact);
        self.resync = false;
        if contact != self.me {
            // The contact answered: no need to check on it.
            self.next_renew = None;
        }
        let listed: Vec<NodeId> = nodes.iter().map(|n| n.node).collect();
        for n in nodes {
            if n.node == self.me || self.buried(n.node, n.snapshot.version) {
                continue;
            }
            let stale = self.peers.get(&n.node).is_some_and(|p| p.snapshot.version >= n.snapshot.version);
            let rights = if stale { Some(Roles::NONE) } else { self.checked(n.node, &n.snapshot, now) };
            let Some(rights) = rights else { continue };
            if n.node != from && !self.peers.contains_key(&n.node) {
                self.unconfirmed.insert(n.node, now + self.cfg.join_attempt);
            }
            let changed = self.merge_peer(n.node, n.addr, n.snapshot, rights, now);
            // Introduce ourselves to everyone but the contact, which has our snapshot already; ask for theirs in case
            // it changed since the contact's copy. When joining again, the nodes we know already (at the version the
            // contact has) know us too: whenever a node learns of another, it sends that node its snapshot.
            if n.node != from && (changed || !rejoin) {
                self.send_snapshot(n.node, false, true);
            }
        }
        if sent_version != Some(self.local.version) {
            // Our members changed after we sent the JoinRequest: the contact has an old snapshot of us.
            self.send_snapshot(from, false, false);
        }
        // Nodes we heard of from others while joining have not been asked yet; everyone gets the time from now.
        let waiting: Vec<NodeId> = self.unconfirmed.keys().copied().collect();
        for node in waiting {
            self.unconfirmed.insert(node, now + self.cfg.join_attempt);
            if !listed.contains(&node) {
                self.send_snapshot(node, false, true);
            }
        }
        if !rejoin {
            self.out.push_back(Output::Ready);
        }
        self.out.push_back(Output::Changed);
    }

    fn on_join_refused(&mut self, from: NodeId, reason: Refusal) {
        match &self.phase {
            Phase::Joining { contact, .. } if *contact == from => {
                self.outsiders.remove(&from);
                self.fail(OpenFailure::Refused(reason));
            }
            Phase::Member if matches!(&self.join_sent, Some((to, ..)) if *to == from) => {
                self.join_sent = None;
                self.outsiders.remove(&from);
                self.out.push_back(Output::Refused(reason));
            }
            _ => {}
        }
    }

    fn on_join_redirect(&mut self, from: NodeId, now: Instant) {
        match &self.phase {
            Phase::Joining { contact, .. } if *contact == from => self.backoff(now),
            Phase::Member if self.contact == Some(from) => {
                if self.peers.contains_key(&from) {
                    // A member we took for the contact says it is not (it lost the role): ask the registry who is,
                    // after a pause so that no redirect loop can spin.
                    self.check_contact(now + self.cfg.retry);
                } else {
                    // The contact the registry named, which we asked to take us in again, has no such channel any
                    // more (it left): the role is vacant.
                    self.elect(from, now);
                }
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_snapshot(
        &mut self,
        from: NodeId,
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
            if newer && self.relayed {
                self.bury(node, addr.clone(), snapshot.version, now);
            }
            if newer && self.drop_peer(node, now) && self.phase == Phase::Member {
                if self.contact == Some(self.me) {
                    // The contact relays departures as it relays arrivals. A member whose relayed copy of a joiner's
                    // snapshot arrived after the joiner's own goodbye (another link, another latency), or that joined
                    // with a list naming a node that was leaving, would otherwise keep a node that left for as long as
                    // the link to it lives.
                    let relay: Vec<(NodeId, String)> = self.peers.iter().map(|(n, p)| (*n, p.addr.clone())).collect();
                    for (to, to_addr) in relay {
                        let msg = self.snapshot_message(node, addr.clone(), snapshot.clone(), true, false);
                        self.out.push_back(Output::Send { to, addr: to_addr, msg });
                    }
                }
                self.after_departure(node, now);
            }
            return;
        }
        if from != node && self.buried(node, snapshot.version) {
            // Relayed news of a node that left at this version or later (anti-entropy from a member that missed the
            // departure, say): stale.
            return;
        }
        let stale = self.peers.get(&node).is_some_and(|p| p.snapshot.version >= snapshot.version);
        let rights = if stale {
            Roles::NONE
        } else {
            match self.checked(node, &snapshot, now) {
                Some(r) => r,
                None => {
                    // Not covered (a member without the credential its members need, or whose credential expired):
                    // it is no member of ours, and we relay nothing of it.
                    if self.drop_peer(node, now) && self.phase == Phase::Member {
                        self.after_departure(node, now);
                    }
                    return;
                }
            }
        };
        let new_node = !self.peers.contains_key(&node);
        if new_node && self.phase == Phase::Member && self.contact == Some(self.me) {
            // The contact relays every node it learns of, not only those that join through it. When two halves of a
            // channel merge, nodes of one half that reach the contact directly (they learnt of it from a member of
            // their half) would otherwise stay unknown to the members of the other half.
            let relay: Vec<(NodeId, String)> = self.peers.iter().map(|(n, p)| (*n, p.addr.clone())).collect();
            for (to, to_addr) in relay {
                let msg = self.snapshot_message(node, addr.clone(), snapshot.clone(), false, false);
                self.out.push_back(Output::Send { to, addr: to_addr, msg });
            }
        }
        if self.merge_peer(node, addr, snapshot, rights, now) {
            self.out.push_back(Output::Changed);
        }
        let direct = from == node;
        if new_node && !direct {
            self.unconfirmed.insert(node, now + self.cfg.join_attempt);
        }
        if (new_node || reply) && self.phase == Phase::Member {
            // Introduce ourselves to a node we just heard of; if we heard of it from someone else, ask it to answer.
            self.send_snapshot(node, false, new_node && !direct);
        }
    }

    /// A member's registry lookup named the contact.
    fn on_contact_found(&mut self, e: RegEntry, now: Instant) {
        let was_contact = self.contact == Some(self.me);
        if e.contact == self.me {
            // The registry names us (a lease of ours outlived our memory of it): we are the contact, and renew.
            self.set_contact(self.me);
            self.claim = ClaimMode::Renew;
            self.next_renew = Some(now + self.cfg.lease_ttl / 3);
            return;
        }
        if was_contact {
            // We lost the role (our renewal was refused, e.g. after a partition during which a member took over).
            // Members that still take us for the contact must ask the registry too, or our half of the channel would
            // never merge with the other.
            let old: Vec<(NodeId, String)> = self.peers.iter().map(|(n, p)| (*n, p.addr.clone())).collect();
            for (to, addr) in old {
                self.out.push_back(Output::Send { to, addr, msg: Message::JoinRedirect { channel: self.id } });
            }
        }
        self.set_contact(e.contact);
        if !was_contact && !self.resync && e.channel == self.id && self.peers.contains_key(&e.contact) {
            // The contact is a member we know: all is well.
            self.next_renew = None;
            return;
        }
        if e.channel != self.id {
            // The channel was created anew while we were cut off, and we move to the new one. Whatever our peers
            // send under the old id is lost from now on (their goodbyes too): they must speak up in the new channel
            // (they do once they follow us there), or we drop them.
            let deadline = now + self.cfg.join_attempt;
            for node in self.peers.keys() {
                self.unconfirmed.insert(*node, deadline);
            }
            self.old_id = Some(self.id);
            self.id = e.channel;
        }
        // Join (again) through it: it merges our view with its own. Ask again if no answer comes.
        self.send_join_request(e.contact, e.addr, now);
        self.next_renew = Some(now + self.cfg.join_attempt);
    }

    /// Stores a node's snapshot if it is newer than what we have. Returns true if anything changed.
    /// `rights` are the node's rights under this snapshot (see `admit`).
    fn merge_peer(&mut self, node: NodeId, addr: String, snapshot: NodeSnapshot, rights: Roles, now: Instant) -> bool {
        match self.peers.get_mut(&node) {
            Some(p) if p.snapshot.version >= snapshot.version => false,
            Some(p) => {
                p.snapshot = snapshot;
                p.addr = addr;
                p.updated = now;
                p.rights = rights;
                self.touch(node);
                true
            }
            None => {
                self.departed.remove(&node);
                self.peers.insert(node, Peer { addr, snapshot, updated: now, rights });
                self.touch(node);
                true
            }
        }
    }

    fn touch(&mut self, node: NodeId) {
        if self.relayed {
            // Bounded by the members: a burst of changes of the same members between two takes adds no more.
            if self.touched.len() > 2 * self.peers.len() + 16 {
                self.touched.sort_unstable();
                self.touched.dedup();
            }
            self.touched.push(node);
        }
    }

    /// Removes a peer; true if it was one (and `Changed` was reported). In tree mode the departure is remembered
    /// for a while (see `bury`).
    fn drop_peer(&mut self, node: NodeId, now: Instant) -> bool {
        self.unconfirmed.remove(&node);
        let Some(p) = self.peers.remove(&node) else { return false };
        self.view_changed = Some(now);
        if self.relayed {
            self.bury(node, p.addr, p.snapshot.version, now);
        }
        self.out.push_back(Output::Changed);
        true
    }

    /// Remembers (in tree mode) that `node` left or was taken for gone at snapshot `version`, for
    /// [`TOMBSTONE_FOR`]: anti-entropy then spreads the departure instead of bringing the node back from a member
    /// that missed it, and relayed news of the node at that version or older is stale.
    fn bury(&mut self, node: NodeId, addr: String, version: u64, now: Instant) {
        self.departed.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < TOMBSTONE_FOR);
        let e = self.departed.entry(node).or_insert((addr, version, now));
        if version >= e.1 {
            e.1 = version;
            e.2 = now;
        }
    }

    /// Relayed news of `node` at `version` is older than its departure, as this node knows it (tree mode).
    fn buried(&self, node: NodeId, version: u64) -> bool {
        self.relayed && self.departed.get(&node).is_some_and(|(_, v, _)| *v >= version)
    }

    /// Member node `node` was lost without saying goodbye (its link broke, or it never confirmed).
    fn lost_member(&mut self, node: NodeId, now: Instant) {
        // In tree mode (`relayed`) the node layer compares views with an overlay neighbour every second (`sync_with`),
        // which repairs what a lost link hid, without the contact: after a mass failure every survivor that lost a
        // neighbour joined through the contact again, and the contact kept a link to each of them (270 links, each
        // answered with every member's snapshot).
        if !self.relayed && self.contact != Some(node) && self.contact != Some(self.me) {
            // A lost link is not a dead node: after a partition between two members that both still reach the
            // contact, neither would ever hear of the other again. Ask the contact for its view a little later (by
            // then it has dropped the node too if the node died).
            self.resync = true;
            self.check_contact(now + self.cfg.join_attempt);
        }
        self.after_departure(node, now);
    }

    /// The member node with the lowest id, this one included.
    fn lowest(&self) -> NodeId {
        self.peers.keys().next().copied().map_or(self.me, |p| p.min(self.me))
    }

    /// Member node `node` is gone (left or lost).
    fn after_departure(&mut self, node: NodeId, now: Instant) {
        if self.contact == Some(node) {
            self.elect(node, now);
        } else if self.contact != Some(self.me) && self.lowest() == self.me {
            // Had the departed node held the role without our knowing it, we would be the one to take over: check.
            self.check_contact(now + self.cfg.join_attempt);
        }
    }

    /// The contact `old` is gone: the member with the lowest node id takes over.
    fn elect(&mut self, old: NodeId, now: Instant) {
        let lowest = self.lowest();
        self.set_contact(lowest);
        if lowest == self.me {
            self.claim = ClaimMode::Takeover(old);
            self.next_renew = None;
            self.registry(RegistryOp::Claim(self.claim));
        } else {
            // Make sure it did: our view may differ from its view, and only the registry knows.
            self.check_contact(now + self.cfg.join_attempt);
        }
    }
}

/// How long a node in tree mode remembers that a member left (see `ChannelState::bury`).
pub const TOMBSTONE_FOR: Duration = Duration::from_secs(60);
/// Anti-entropy: views that differ are exchanged as lists once both have been unchanged this long (a change the
/// overlay is still spreading explains a younger difference).
pub const VIEW_SETTLE: Duration = Duration::from_millis(500);
/// Anti-entropy: a member whose view keeps changing still sends its list this often when asked by a digest that
/// differs.
pub const VIEW_LIST_FLOOR: Duration = Duration::from_secs(5);

/// An order-independent hash of member nodes and their snapshot versions (the digest of
/// [`ChannelState::view_digest`]; the same on every node, whatever its architecture).
pub fn view_hash(entries: impl Iterator<Item = (NodeId, u64)>) -> u64 {
    entries.fold(0u64, |h, (n, v)| h.wrapping_add(mix(n.0 ^ mix(v.wrapping_add(0x9e37_79b9_7f4a_7c15)))))
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first eight hex digits of a key, to name it in messages.
fn hex8(key: &[u8; 32]) -> String {
    key[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHANNEL: ChannelId = ChannelId(9);

    /// The registry's entry of the channel: node 1 (at "a:1") is its contact.
    fn entry() -> RegEntry {
        RegEntry {
            name: "c".into(),
            channel: CHANNEL,
            contact: NodeId(1),
            addr: "a:1".into(),
            sources: 0,
            sinks: 0,
            expires_in_ms: 9_000,
        }
    }

    /// A node that created the channel (its contact), with `relayed` as given, and the time it became a member.
    fn contact(relayed: bool) -> (ChannelState, Instant) {
        let now = Instant::now();
        let mut st = ChannelState::new("c", CHANNEL, ChannelSecret(1), NodeId(1), "a:1", Default::default());
        st.set_relayed(relayed);
        st.open(OpenMode::Create, now);
        st.handle_registry(Ok(RegResult::Entry(entry())), now);
        assert!(st.is_member(), "the creator is a member");
        while st.poll_output().is_some() {}
        (st, now)
    }

    fn check_touched(st: &mut ChannelState, expected: &[u64]) {
        let touched = st.take_touched();
        assert!(touched.complete, "relaying was on since the last take");
        let got: Vec<u64> = touched.nodes.into_iter().map(|n| n.0).collect();
        assert_eq!(got, expected);
    }

    fn snapshot(version: u64) -> NodeSnapshot {
        NodeSnapshot { version, ..NodeSnapshot::default() }
    }

    fn relayed(node: u64, version: u64) -> Message {
        Message::Snapshot {
            channel: CHANNEL,
            node: NodeId(node),
            addr: format!("n:{node}"),
            snapshot: snapshot(version),
            left: false,
            reply: false,
        }
    }

    #[test]
    fn in_tree_mode_the_owner_learns_which_members_changed_and_only_those() {
        let (mut st, now) = contact(true);
        // The first take after relaying was turned on cannot vouch for what came before.
        assert!(!st.take_touched().complete);
        check_touched(&mut st, &[]);
        let join = Message::JoinRequest { channel: CHANNEL, addr: "n:5".into(), snapshot: snapshot(1) };
        st.handle_message(NodeId(5), join, now);
        st.handle_message(NodeId(7), relayed(3, 2), now);
        st.handle_message(NodeId(7), relayed(3, 4), now);
        check_touched(&mut st, &[3, 5]);
        // Taken: the next change names only its own member.
        st.handle_message(NodeId(7), relayed(5, 2), now);
        check_touched(&mut st, &[5]);
        // An older or equal snapshot changes nothing.
        st.handle_message(NodeId(7), relayed(3, 4), now);
        st.handle_message(NodeId(7), relayed(3, 1), now);
        check_touched(&mut st, &[]);
        // Many changes of the same members between two takes stay bounded.
        for v in 5..1_000 {
            st.handle_message(NodeId(7), relayed(3, v), now);
        }
        assert!(st.touched.len() <= 2 * st.peers().len() + 17, "{} kept", st.touched.len());
        check_touched(&mut st, &[3]);
    }

    #[test]
    fn in_full_mesh_mode_nothing_is_kept_for_the_owner_to_take() {
        let (mut st, now) = contact(false);
        for v in 1..100 {
            let msg = Message::Snapshot {
                channel: CHANNEL,
                node: NodeId(3),
                addr: "n:3".into(),
                snapshot: snapshot(v),
                left: false,
                reply: false,
            };
            st.handle_message(NodeId(3), msg, now);
        }
        assert!(st.peers().contains_key(&NodeId(3)));
        assert!(st.touched.is_empty());
        assert!(!st.take_touched().complete, "nothing was recorded");
        // Turned on now: the changes before were not recorded, so the first take says so; the next one vouches.
        st.set_relayed(true);
        assert!(!st.take_touched().complete);
        st.handle_message(NodeId(7), relayed(4, 1), now);
        let touched = st.take_touched();
        assert!(touched.complete);
        assert_eq!(touched.nodes, vec![NodeId(4)]);
        // Off and on again between two takes: what happened while off is unknown.
        st.set_relayed(false);
        st.handle_message(NodeId(7), relayed(4, 2), now);
        st.set_relayed(true);
        assert!(!st.take_touched().complete);
    }

    /// Node `me` joins the channel whose contact is `contact` (from `contact()`), with `relayed` as given; the
    /// contact's answers are handed over. Returns the member.
    fn join(contact: &mut ChannelState, me: u64, relayed: bool, now: Instant) -> ChannelState {
        let mut st =
            ChannelState::new("c", ChannelId(99), ChannelSecret(2), NodeId(me), &format!("n:{me}"), Default::default());
        st.set_relayed(relayed);
        st.open(OpenMode::Open, now);
        st.handle_registry(Ok(RegResult::Entry(entry())), now);
        let mut to_contact = Vec::new();
        while let Some(out) = st.poll_output() {
            if let Output::Send { to: NodeId(1), msg, .. } = out {
                to_contact.push(msg);
            }
        }
        assert!(!to_contact.is_empty(), "a join request to the contact");
        for msg in to_contact {
            contact.handle_message(NodeId(me), msg, now);
        }
        while let Some(out) = contact.poll_output() {
            if let Output::Send { to, msg, .. } = out {
                if to == NodeId(me) {
                    st.handle_message(NodeId(1), msg, now);
                }
            }
        }
        assert!(st.is_member(), "node {me} joined");
        while st.poll_output().is_some() {}
        st
    }

    /// Whether `st`, given time up to `until`, asks the registry for the contact or sends the contact a join request.
    fn rejoins_through_the_contact(st: &mut ChannelState, from: Instant, until: Duration) -> bool {
        let mut asked = false;
        let mut at = from;
        while at <= from + until {
            st.handle_timeout(at);
            while let Some(out) = st.poll_output() {
                match out {
                    Output::Registry(RegistryOp::Lookup) => asked = true,
                    Output::Send { msg: Message::JoinRequest { .. }, .. } => asked = true,
                    _ => {}
                }
            }
            at += Duration::from_millis(100);
        }
        asked
    }

    #[test]
    fn in_tree_mode_a_lost_member_is_left_to_the_neighbours_not_to_the_contact() {
        // Full mesh: a member whose link to another member broke asks the contact for its view again (a lost link is
        // not a dead node, and only the contact can introduce it again).
        for (relayed, expected) in [(false, true), (true, false)] {
            let (mut c, now) = contact(relayed);
            let mut a = join(&mut c, 2, relayed, now);
            let _b = join(&mut c, 3, relayed, now);
            // The contact's view reaches `a` (a relay, or the overlay in tree mode).
            a.handle_message(NodeId(1), relayed_snapshot(3), now);
            assert!(a.peers().contains_key(&NodeId(3)), "a knows b");
            while a.poll_output().is_some() {}
            a.handle_peer_lost(NodeId(3), now);
            assert!(!a.peers().contains_key(&NodeId(3)), "b dropped");
            let wait = a.cfg.join_attempt * 3;
            let asked = rejoins_through_the_contact(&mut a, now, wait);
            // In tree mode the survivors of a mass failure all did so at once, and the contact kept a link to each.
            assert_eq!(asked, expected, "relayed {relayed}: a rejoin through the contact");
        }
    }

    fn relayed_snapshot(node: u64) -> Message {
        relayed(node, 1)
    }
}
