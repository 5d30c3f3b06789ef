//! Tree mode: a channel that outgrew `NodeBuilder::tree_threshold` member nodes stops linking every member to every
//! other and runs `kecho_proto::gossip` instead (docs/SCALE.md): HyParView partial views decide the links (about
//! five per node whatever the channel's size) and events travel along one Plumtree tree per source.
//!
//! - *Switching.* A node turns tree mode on, for good, when it knows more than the threshold of member nodes
//!   (itself included), or when another member sends it a `Gossip` frame for the channel. It then joins the overlay
//!   through the channel's contact (or the node whose frame switched it). A channel under an access policy stays a
//!   full mesh: messages relayed through the overlay carry no proof of their origin.
//! - *Membership.* `ChannelState` keeps the registry lease, the contact role and every member's snapshot, but a
//!   snapshot no longer goes to every member on its own link: it is broadcast once on the node's membership stream
//!   of the overlay (and sent directly only over links that are up). Joins still go to the contact.
//! - *Events.* A local source encodes its event once (`Event` frame) and broadcasts those bytes on the node's event
//!   stream; every node forwards them unchanged to its eager peers of that stream's tree, announces them to the
//!   lazy ones, delivers them to its own sinks in the node's order (so in each source's order), filtering there by
//!   type and content filter, and reports a gap the tree could not fill as missed (`RecvError::Lagged`) to all its
//!   sinks, as for a loss in transit in full-mesh mode.
//! - *Links.* Every second a node closes the links no channel needs: in tree mode those to nodes out of the active
//!   view, a few seconds after the last message exchanged with them (`tree_links.rs`: 5 s after this node's own
//!   requests, 2 s after answers and others' talk), and it opens few links to ask members for lost snapshots.
//!
//! An event of a source with an OUT-filter goes directly to the chosen sinks' nodes, as in full-mesh mode, and so do
//! events for Block sinks. A source's end, histories, priorities and deadlines: `tree_events.rs`. The whole channel's
//! events reach every node and are filtered at its sinks (no per-subtree aggregate filter).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kecho_proto::gossip::{EventId, Gossip, GossipConfig, GossipMsg, GossipOut};
use kecho_proto::membership::ChannelState;
use kecho_proto::probe::{Prober, Suspicions};
use kecho_proto::{Attrs, Message, NodeId, NodeSnapshot, Overflow};
use parking_lot::Mutex;
use tokio::sync::Notify;

#[path = "tree_events.rs"]
mod events;
#[path = "tree_links.rs"]
mod links;
#[path = "tree_own.rs"]
mod own;
#[path = "tree_probe.rs"]
mod probe;
pub(super) use events::Head as TreeHead;

use super::deliver::SinkList;
use super::sink::LocalSink;
use super::view_sync::SYNC_EVERY;
use super::{ChannelInner, Channels};
use crate::clock::now;
use crate::queue::{Event, Offer, SourceKey};

use links::{AskBudget, Talks, ANSWER_LINGER, LINK_GRACE};

/// A lost link to a node this channel sent to this recently counts as a failure of that node even if it is not an
/// overlay neighbour (a dial that failed).
const TRIED: Duration = Duration::from_secs(1);
/// A link that came up this recently is kept even when nothing uses it yet: the node that dialled it has a message
/// on its way on it (a probe, say), which this node has not read yet. Closing it as unneeded before that made the
/// prober's probe fail (twice, with the retry) and the node suspected.
const FRESH_LINK: Duration = Duration::from_secs(2);
/// How often a node looks again at a failed neighbour's link while it waits to take the neighbour for gone.
const GONE_CHECK: Duration = Duration::from_millis(100);
/// A node asks the contact for its view (having lost snapshots of an unknown member) at most this often.
const RESYNC_EVERY: Duration = Duration::from_secs(10);
/// How often a node in tree mode closes the links no channel needs.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A node's membership stream is its id with these bits flipped: a stream of its own, so that a gap in it is not
/// reported to sinks as missed events.
const MEMBERSHIP_STREAM: u64 = 0x6b65_6368_6f2e_6d62;

/// The overlay's settings: the simulation's, but a gap is given 5 s without progress (not 2 s) before it is reported
/// missed, since a real host can stall for seconds (a loaded machine), and a report is final (an event that comes
/// after it is dropped as old).
fn gossip_config() -> GossipConfig {
    // A gap may be grafted in full (from the stream's origin's history, see `tree_events.rs`), not only its last 256.
    GossipConfig { loss_after: 5_000, max_graft_run: 1 << 16, ..GossipConfig::default() }
}

fn membership_stream(node: NodeId) -> NodeId {
    NodeId(node.0 ^ MEMBERSHIP_STREAM)
}

/// Counters of a channel's tree mode on this node, from [`crate::Channel::tree_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TreeStats {
    /// The channel runs in tree mode on this node.
    pub on: bool,
    /// Overlay neighbours (the links the channel uses).
    pub active: usize,
    /// Addresses kept to replace failed neighbours.
    pub passive: usize,
    /// Frames that arrived carrying an event of another node (first copies and duplicates): divided by
    /// `delivered`, the copies per event this node received.
    pub event_frames: u64,
    /// Events of other nodes' sources delivered here (in order), whether or not a local sink wanted them.
    pub delivered: u64,
    /// Events of other nodes reported missed to the local sinks (gaps the tree could not fill).
    pub lost: u64,
    /// Event frames this node sent in full (its own events and forwarded ones).
    pub forwarded: u64,
    /// Every other frame this channel sent in tree mode: membership (joins, snapshots direct and through the
    /// overlay, view digests and lists) and the overlay's own (neighbour requests, shuffles, announcements, grafts,
    /// prunes). Divided by members and time in an idle channel: membership traffic per member.
    pub control_frames: u64,
    /// The bytes of those frames.
    pub control_bytes: u64,
    /// Members this node suspected (a probe unanswered, `tree_probe.rs`), and suspicions of itself it refuted.
    pub suspicions: u64,
    /// See `suspicions`.
    pub refuted: u64,
    /// `suspicions` by what made the probe fail: no answer in time, the connection failed or ended, the node
    /// refused (no member of the channel, or another node at its address), or an answer that is no proof.
    pub suspicion_causes: Suspicions,
    /// Grafts this node sent: an announced event that did not come by the tree in time, asked of its announcer.
    pub grafts: u64,
    /// Grafts that were needless: the tree's copy came after all (a second copy).
    pub late_grafts: u64,
    /// Second and later copies of events (and membership snapshots) received.
    pub duplicates: u64,
    /// Versions of this node's own snapshot broadcast through the overlay (changes in quick succession go as one,
    /// with the newest version).
    pub own_broadcasts: u64,
}

/// A channel's tree-mode state on one node.
pub(super) struct Tree {
    /// Tree mode is on (it stays on).
    on: AtomicBool,
    /// Someone is executing the overlay's outputs: others leave theirs to it.
    pumping: AtomicBool,
    wake: Notify,
    inner: Mutex<TreeInner>,
    event_frames: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
    forwarded: AtomicU64,
    /// The event path's guarantees (`tree_events.rs`).
    events: events::TreeEvents,
    control_frames: AtomicU64,
    control_bytes: AtomicU64,
    suspicions: AtomicU64,
    refuted: AtomicU64,
    own_broadcasts: AtomicU64,
}

struct TreeInner {
    gossip: Option<Gossip>,
    /// The origin of the overlay's clock (it counts milliseconds).
    base: Instant,
    /// When tree mode went on.
    since: Option<Instant>,
    /// Addresses of nodes, learnt from membership and from `Gossip` frames.
    book: HashMap<NodeId, String>,
    /// When this channel last talked with each node (sent to it, or received the overlay's messages from it), and
    /// until when that keeps the link.
    recent: Talks,
    /// Links opened to ask members for snapshots the overlay lost.
    asks: AskBudget,
    /// The own snapshot's broadcasts, a change waiting briefly for the next (`tree_own.rs`).
    own: own::OwnBroadcast,
    /// Streams known to carry events (a gap in them is reported to sinks), and membership streams.
    event_streams: HashSet<NodeId>,
    /// When this node last asked the contact for its view.
    last_resync: Option<Instant>,
    /// Neighbours whose link failed and that are not yet taken for gone: how many of this node's links to each
    /// failed since (dials that found nothing listening, or handshakes that timed out).
    failing: HashMap<NodeId, u32>,
    /// The liveness check of non-neighbour members (`tree_probe.rs`).
    prober: Option<Prober>,
    /// When links to these nodes came up (kept for `FRESH_LINK`).
    fresh: HashMap<NodeId, Instant>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            on: AtomicBool::new(false),
            pumping: AtomicBool::new(false),
            wake: Notify::new(),
            inner: Mutex::new(TreeInner {
                gossip: None,
                base: now(),
                since: None,
                book: HashMap::new(),
                recent: Talks::default(),
                asks: AskBudget::default(),
                own: own::OwnBroadcast::default(),
                event_streams: HashSet::new(),
                last_resync: None,
                failing: HashMap::new(),
                prober: None,
                fresh: HashMap::new(),
            }),
            event_frames: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            events: events::TreeEvents::default(),
            control_frames: AtomicU64::new(0),
            control_bytes: AtomicU64::new(0),
            suspicions: AtomicU64::new(0),
            refuted: AtomicU64::new(0),
            own_broadcasts: AtomicU64::new(0),
        }
    }
}

impl TreeInner {
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_millis() as u64
    }
}

impl ChannelInner {
    /// The channel runs in tree mode on this node.
    pub(super) fn tree_on(&self) -> bool {
        self.tree.on.load(Ordering::Acquire)
    }

    /// The overlay neighbours.
    pub(super) fn tree_neighbours(&self) -> Vec<NodeId> {
        self.tree.inner.lock().gossip.as_ref().map(|g| g.active().to_vec()).unwrap_or_default()
    }

    /// Counters of tree mode.
    pub(super) fn tree_stats(&self) -> TreeStats {
        let t = &self.tree;
        let (active, passive, suspicion_causes, counters) = {
            let inner = t.inner.lock();
            let g = inner.gossip.as_ref();
            let (a, p) = g.map_or((0, 0), |g| (g.active().len(), g.passive().len()));
            let counters = g.map(Gossip::counters).unwrap_or_default();
            (a, p, inner.prober.as_ref().map(|p| p.suspicions()).unwrap_or_default(), counters)
        };
        TreeStats {
            on: self.tree_on(),
            active,
            passive,
            event_frames: t.event_frames.load(Ordering::Relaxed),
            delivered: t.delivered.load(Ordering::Relaxed),
            lost: t.lost.load(Ordering::Relaxed),
            forwarded: t.forwarded.load(Ordering::Relaxed),
            control_frames: t.control_frames.load(Ordering::Relaxed),
            control_bytes: t.control_bytes.load(Ordering::Relaxed),
            suspicions: t.suspicions.load(Ordering::Relaxed),
            refuted: t.refuted.load(Ordering::Relaxed),
            suspicion_causes,
            grafts: counters.grafts,
            late_grafts: counters.late_grafts,
            duplicates: counters.duplicates,
            own_broadcasts: t.own_broadcasts.load(Ordering::Relaxed),
        }
    }

    /// With the channel's state locked: turns tree mode on if the channel outgrew the threshold. Returns whether
    /// tree mode is on.
    pub(super) fn tree_check(self: &Arc<Self>, st: &mut ChannelState) -> bool {
        if self.tree_on() {
            return true;
        }
        let Some(node) = self.node.upgrade() else { return false };
        if st.policy().is_some() || st.peers().len() < node.cfg.tree_threshold {
            return false;
        }
        let via = st.contact().filter(|c| *c != node.id);
        self.tree_start(&node, st, via);
        true
    }

    /// Turns tree mode on and joins the overlay through `via`.
    fn tree_start(self: &Arc<Self>, node: &Arc<Channels>, st: &mut ChannelState, via: Option<NodeId>) {
        if self.tree.on.swap(true, Ordering::AcqRel) {
            return;
        }
        st.set_relayed(true);
        let at = now();
        {
            let mut t = self.tree.inner.lock();
            let ms = t.ms(at);
            let mut g = Gossip::new(node.id, gossip_config(), rand::random(), ms);
            for (id, p) in st.peers() {
                t.book.insert(*id, p.addr.clone());
            }
            if let Some(via) = via {
                g.join(via, ms);
            }
            t.gossip = Some(g);
            t.prober = node
                .cfg
                .tree_probe
                .then(|| Prober::new(probe::probe_config(node.cfg.tree_probe_every), rand::random(), ms));
            t.since = Some(at);
        }
        tracing::debug!(channel = %self.name, members = st.peers().len() + 1, "tree mode on");
        node.spawn(tree_loop(Arc::downgrade(self)));
        // The loop's first pass sends the join.
        self.tree.wake.notify_one();
    }

    /// Keeps the address book current (after a membership change): only the members that changed are looked at
    /// (a pass over every member on every change, in each of a process's nodes, was a large part of a storm's CPU).
    /// Returns the members that changed when they are known to be all (for the routing table, `RouteBook::update`).
    pub(super) fn tree_learn(&self, st: &mut ChannelState) -> Option<Vec<NodeId>> {
        if !self.tree_on() {
            return None;
        }
        let touched = st.take_touched();
        if !touched.nodes.is_empty() {
            let mut t = self.tree.inner.lock();
            for id in &touched.nodes {
                let Some(p) = st.peers().get(id) else { continue };
                if t.book.get(id) != Some(&p.addr) {
                    t.book.insert(*id, p.addr.clone());
                }
            }
        }
        touched.complete.then_some(touched.nodes)
    }

    /// Sends a message of the membership state machine in tree mode: joins as they are; this node's snapshot over
    /// links that are up, and once per version through the overlay (changes in quick succession once, with the
    /// newest version: `tree_own.rs`); others' snapshots (relays) over links that are up only.
    pub(super) fn tree_send_membership(self: &Arc<Self>, node: &Arc<Channels>, to: NodeId, addr: &str, msg: Message) {
        match &msg {
            Message::Snapshot { channel, node: who, addr: who_addr, snapshot, left, .. } if *who == node.id => {
                if node.links.is_up(to) {
                    self.control_send(node, to, addr, &msg);
                }
                let at = now();
                let mut t = self.tree.inner.lock();
                // Checked before the encoding: the state machine asks this once per member.
                if !t.own.is_new(snapshot.version) {
                    return;
                }
                let copy = Message::Snapshot {
                    channel: *channel,
                    node: *who,
                    addr: who_addr.clone(),
                    snapshot: snapshot.clone(),
                    left: *left,
                    reply: false,
                };
                // A goodbye goes at once; a change when its window ends (the timer loop), with the newest version.
                let Some(now_due) = t.own.offer(snapshot.version, copy.to_bytes(), *left, at) else {
                    drop(t);
                    self.tree.wake.notify_one();
                    return;
                };
                let ms = t.ms(at);
                if let Some(g) = t.gossip.as_mut() {
                    g.broadcast_on(membership_stream(node.id), now_due, ms);
                    self.tree.own_broadcasts.fetch_add(1, Ordering::Relaxed);
                }
                drop(t);
                self.tree_pump(node);
            }
            Message::Snapshot { .. } => {
                if node.links.is_up(to) {
                    self.control_send(node, to, addr, &msg);
                }
            }
            _ => {
                // A join's answer ends the exchange: its link is not kept for long (the contact answers every joiner).
                let answer = matches!(
                    msg,
                    Message::JoinAccept { .. } | Message::JoinRedirect { .. } | Message::JoinRefused { .. }
                );
                let keep = if answer { ANSWER_LINGER } else { LINK_GRACE };
                self.tree.inner.lock().recent.note(to, now(), keep);
                self.control_send(node, to, addr, &msg);
            }
        }
    }

    /// A `JoinRequest` from `from` was handled: a contact in tree mode tells the joiner so (with a sample of its
    /// views to start from), so that a joiner that knows too few members to switch by itself joins the overlay.
    pub(super) fn tree_join_request(self: &Arc<Self>, from: NodeId) {
        if !self.tree_on() || !self.state.lock().peers().contains_key(&from) {
            return;
        }
        let Some(node) = self.node.upgrade() else { return };
        let peers: Vec<NodeId> = {
            let t = self.tree.inner.lock();
            let Some(g) = t.gossip.as_ref() else { return };
            g.active().iter().chain(g.passive()).copied().filter(|p| *p != from).take(8).collect()
        };
        self.gossip_send_keep(
            &node,
            from,
            GossipMsg::ShuffleReply { peers, back: Vec::new() },
            &mut None,
            ANSWER_LINGER,
        );
    }

    /// A `Gossip` frame from `from`.
    pub(crate) fn gossip_input(self: &Arc<Self>, from: NodeId, addrs: Vec<(NodeId, String)>, body: GossipMsg) {
        let Some(node) = self.node.upgrade() else { return };
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let started = !self.tree_on();
        if started {
            let mut st = self.state.lock();
            if st.policy().is_some() {
                tracing::debug!(channel = %self.name, node = %from, "a gossip frame in a channel under a policy");
                return;
            }
            self.tree_start(&node, &mut st, None);
        }
        if matches!(body, GossipMsg::Probe { .. } | GossipMsg::ProbeAck { .. } | GossipMsg::Suspect { .. }) {
            // The liveness check's, not the overlay's (and not a reason to keep the link).
            self.probe_input(&node, from, body);
            return;
        }
        if matches!(body, GossipMsg::Event { .. }) {
            self.tree.event_frames.fetch_add(1, Ordering::Relaxed);
        }
        {
            let at = now();
            let mut t = self.tree.inner.lock();
            // A node that talks to this one keeps its link (it may count this node among its neighbours while a
            // `Disconnect` is on its way; closing the link would make it take this node for gone), for how long
            // depends on the message (`links::keep_after_receiving`).
            let neighbour = t.gossip.as_ref().is_some_and(|g| g.active().contains(&from));
            t.recent.note(from, at, links::keep_after_receiving(&body, neighbour));
            for (id, addr) in addrs {
                if id != node.id && !addr.is_empty() {
                    t.book.insert(id, addr);
                }
            }
            let ms = t.ms(at);
            let Some(g) = t.gossip.as_mut() else { return };
            let links = matches!(
                body,
                GossipMsg::Join
                    | GossipMsg::ForwardJoin { .. }
                    | GossipMsg::Neighbor { .. }
                    | GossipMsg::NeighborReply { .. }
                    | GossipMsg::Disconnect
            );
            if started && !links && g.active().is_empty() {
                // Switched by this frame (a contact's answer to this node's join, say): join through its sender.
                g.join(from, ms);
            }
            let book = &t.book;
            let Some(g) = t.gossip.as_ref() else { return };
            let (answer, announce) = self.tree_before(g, from, &body, |n| book.contains_key(&n));
            if let Some(answer) = answer {
                drop(t);
                self.gossip_send(&node, from, answer, &mut None);
                return;
            }
            let Some(g) = t.gossip.as_mut() else { return };
            g.handle(from, body, ms);
            for (origin, id) in announce {
                g.held_by(origin, id, ms);
            }
        }
        self.tree_pump(&node);
    }

    /// The link to `id` is gone. Returns true if tree mode handled it (the caller then leaves the channel's view
    /// alone). A link that the other side closed as unneeded says nothing about its node. A neighbour's link that
    /// failed may: this node dials it again, and if no link is up two heartbeat timeouts later, takes the node for
    /// gone, as in full-mesh mode, and, since no other member may have a link to it, tells them with a goodbye on
    /// its behalf through the overlay (a node that is alive and hears it publishes a newer snapshot). The dial keeps
    /// a node that only stalled for a while (a loaded host) in the channel.
    pub(super) fn tree_peer_lost(self: &Arc<Self>, id: NodeId) -> bool {
        if !self.tree_on() {
            return false;
        }
        let Some(node) = self.node.upgrade() else { return true };
        // Events for Block sinks go to their nodes directly: the routes take the new peer, which is dialled.
        self.tree_direct_lost(&node, id);
        let neighbour = {
            let at = now();
            let mut t = self.tree.inner.lock();
            let ms = t.ms(at);
            let neighbour = t.gossip.as_ref().is_some_and(|g| g.active().contains(&id));
            if neighbour {
                t.failing.insert(id, 0);
            } else if let Some(n) = t.failing.get_mut(&id) {
                // A dial made since the neighbour's link failed failed too.
                *n += 1;
            }
            // A link that ends without this node having used it lately was closed by the other side as unneeded:
            // the node stays a candidate neighbour (in the passive view). A neighbour's link, or one this node just
            // tried to use (a dial that failed), is a failure.
            let tried = t.recent.last(id).is_some_and(|r| at.saturating_duration_since(r) < TRIED);
            if let Some(g) = t.gossip.as_mut() {
                if tried || neighbour {
                    g.peer_failed(id, ms);
                }
            }
            neighbour
        };
        self.tree_pump(&node);
        let member = self.state.lock().is_member();
        if !member {
            // A joiner (that may have lost its contact): the usual path.
            return false;
        }
        if neighbour {
            // An empty sample: a message that changes nothing but needs a link.
            self.gossip_send(&node, id, GossipMsg::ShuffleReply { peers: Vec::new(), back: Vec::new() }, &mut None);
            let weak = Arc::downgrade(self);
            // Long enough to dial a node whose process runs; shorter than `LINK_GRACE`, so that the link the dial
            // made is still there when looked at.
            let wait = (node.cfg.heartbeat_timeout * 2).min(LINK_GRACE - SWEEP_EVERY);
            node.spawn(async move {
                // Looked at every `GONE_CHECK`: a node whose redial failed is taken for gone then, not at the end of
                // the wait (the channel's contact holds the registry's lease and answers joins: while it is not
                // taken for gone, no member takes its role over, and a node that joins finds only a dead contact).
                let mut left = wait;
                while !left.is_zero() {
                    let step = GONE_CHECK.min(left);
                    tokio::time::sleep(step).await;
                    left -= step;
                    let Some(ch) = weak.upgrade() else { return };
                    if left.is_zero() || ch.tree_gone(id) != Some(false) {
                        ch.tree_confirm_gone(id);
                        return;
                    }
                }
            });
        }
        true
    }

    /// Whether neighbour `id`, whose link failed, is gone: no link to it is up, and none is being dialled or a dial
    /// made since failed. A node that is still being dialled for the first time (its process runs slowly, or a
    /// handshake waits for it) is not; one that a source dials again and again (for a Block sink's events, say) and
    /// that never answers is. None: the channel or node is closed.
    fn tree_gone(&self, id: NodeId) -> Option<bool> {
        let node = self.node.upgrade()?;
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let failed = self.tree.inner.lock().failing.get(&id).is_some_and(|n| *n > 0);
        Some(!node.links.is_up(id) && (failed || !node.links.is_linked_or_dialing(id)))
    }

    /// A neighbour's link failed a while ago: unless a link to it is up again or being dialled, the node is gone.
    fn tree_confirm_gone(self: &Arc<Self>, id: NodeId) {
        let Some(node) = self.node.upgrade() else { return };
        let gone = self.tree_gone(id);
        self.tree.inner.lock().failing.remove(&id);
        if gone != Some(true) {
            return;
        }
        let goodbye = {
            let st = self.state.lock();
            st.peers().get(&id).map(|p| Message::Snapshot {
                channel: self.id(),
                node: id,
                addr: p.addr.clone(),
                snapshot: NodeSnapshot {
                    version: p.snapshot.version,
                    instance: p.snapshot.instance,
                    members: Vec::new(),
                    token: None,
                },
                left: true,
                reply: false,
            })
        };
        let Some(msg) = goodbye else { return };
        tracing::debug!(channel = %self.name, node = %id, "a neighbour is gone: telling the members");
        {
            let at = now();
            let mut t = self.tree.inner.lock();
            let ms = t.ms(at);
            if let Some(g) = t.gossip.as_mut() {
                g.broadcast_on(membership_stream(node.id), msg.to_bytes(), ms);
            }
        }
        self.tree_pump(&node);
        self.state.lock().handle_peer_lost(id, now());
        self.flush();
    }

    /// A link to `id` came up: kept for `FRESH_LINK` whatever uses it.
    pub(super) fn tree_link_up(&self, id: NodeId) {
        if !self.tree_on() {
            return;
        }
        let at = now();
        let mut t = self.tree.inner.lock();
        t.fresh.retain(|_, u| at.saturating_duration_since(*u) < FRESH_LINK);
        t.fresh.insert(id, at);
    }

    /// Leaving: the neighbours are told at once (they replace the link) rather than by its loss.
    pub(super) fn tree_leave(self: &Arc<Self>) {
        if !self.tree_on() {
            return;
        }
        let Some(node) = self.node.upgrade() else { return };
        let active: Vec<NodeId> = {
            let t = self.tree.inner.lock();
            t.gossip.as_ref().map(|g| g.active().to_vec()).unwrap_or_default()
        };
        for p in active {
            self.gossip_send(&node, p, GossipMsg::Disconnect, &mut None);
        }
    }

    /// True if this channel needs the link to `id`.
    pub(super) fn needs_link(&self, id: NodeId) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        if !self.tree_on() {
            if !self.is_ready() {
                return true;
            }
            let st = self.state.lock();
            return st.peers().contains_key(&id) || st.contact() == Some(id);
        }
        let at = now();
        let t = self.tree.inner.lock();
        let used = t.since.is_none_or(|s| at.saturating_duration_since(s) < LINK_GRACE)
            || t.fresh.get(&id).is_some_and(|u| at.saturating_duration_since(*u) < FRESH_LINK)
            || t.gossip.as_ref().is_some_and(|g| g.active().contains(&id))
            || t.recent.keeps(id, at);
        drop(t);
        used || self.tree_direct(id)
    }

    /// Executes the overlay's outputs, then wakes the timer loop (its next deadline may have moved).
    fn tree_pump(self: &Arc<Self>, node: &Arc<Channels>) {
        self.tree_execute(node);
        self.tree.wake.notify_one();
    }

    /// Executes the overlay's outputs until there are none (one thread at a time; others leave theirs to it).
    fn tree_execute(self: &Arc<Self>, node: &Arc<Channels>) {
        if self.tree.pumping.swap(true, Ordering::AcqRel) {
            return;
        }
        // The last event frame encoded, reused for every eager peer it goes to.
        let mut encoded: Option<(EventId, u16, Bytes)> = None;
        loop {
            let outs: Vec<GossipOut> = {
                let mut t = self.tree.inner.lock();
                let outs: Vec<GossipOut> = match t.gossip.as_mut() {
                    Some(g) => std::iter::from_fn(|| g.poll_output()).collect(),
                    None => Vec::new(),
                };
                if outs.is_empty() {
                    // Under the lock that producers hold to add outputs, so that none is left behind.
                    self.tree.pumping.store(false, Ordering::Release);
                    let active = t.gossip.as_ref().map(|g| g.active().to_vec()).unwrap_or_default();
                    drop(t);
                    self.tree_hand_ends(node, &active);
                    break;
                }
                outs
            };
            for out in outs {
                match out {
                    GossipOut::Send { to, msg } => {
                        let keep = links::keep_after_sending(&msg);
                        self.gossip_send_keep(node, to, msg, &mut encoded, keep);
                    }
                    GossipOut::Deliver { id, payload } => self.gossip_deliver(node, id, payload),
                    GossipOut::Lost { source, first, count } => self.gossip_lost(node, source, first, count),
                    GossipOut::Isolated => self.tree_rejoin(node),
                }
            }
        }
    }

    /// Sends one overlay message to `to` (dialling if there is no link). An event is encoded once for all the peers
    /// it goes to (`encoded`), and not queued to a link whose queue is full: the receiver then grafts it from
    /// another peer, or reports it missed.
    fn gossip_send(
        self: &Arc<Self>,
        node: &Arc<Channels>,
        to: NodeId,
        msg: GossipMsg,
        encoded: &mut Option<(EventId, u16, Bytes)>,
    ) {
        self.gossip_send_keep(node, to, msg, encoded, LINK_GRACE);
    }

    /// `gossip_send`, keeping the link for `keep` after it if the overlay does not use it.
    fn gossip_send_keep(
        self: &Arc<Self>,
        node: &Arc<Channels>,
        to: NodeId,
        mut msg: GossipMsg,
        encoded: &mut Option<(EventId, u16, Bytes)>,
        keep: Duration,
    ) {
        let (event, lane) = match msg {
            GossipMsg::Event { id, hops, payload } => {
                // Its priority's lane; an `Expired` notice in its place if its deadline passed.
                let (lane, instead) = self.tree_outgoing(&payload);
                msg = GossipMsg::Event { id, hops, payload: instead.unwrap_or(payload) };
                (Some((id, hops)), lane)
            }
            _ => (None, 0),
        };
        let (addr, frame, control) = {
            let mut t = self.tree.inner.lock();
            let neighbour = t.gossip.as_ref().is_some_and(|g| g.active().contains(&to));
            let keep = links::keep_sent(&msg, neighbour, keep);
            if matches!(msg, GossipMsg::Disconnect) {
                // No neighbour any more: what it said before does not keep the link (`links::keep_after_receiving`).
                t.recent.cut(to, now(), keep);
            } else {
                t.recent.note(to, now(), keep);
            }
            let addr = t.book.get(&to).cloned().or_else(|| node.links.addr_of(to)).unwrap_or_default();
            let frame = match (&event, &*encoded) {
                (Some((id, hops)), Some((i, h, f))) if i == id && h == hops => Some(f.clone()),
                _ => None,
            };
            let frame = frame.unwrap_or_else(|| {
                let named: Vec<NodeId> = match &msg {
                    GossipMsg::ForwardJoin { joiner, .. } => vec![*joiner],
                    GossipMsg::Shuffle { origin, peers, .. } => std::iter::once(*origin).chain(peers.clone()).collect(),
                    GossipMsg::ShuffleReply { peers, .. } => peers.clone(),
                    _ => Vec::new(),
                };
                let addrs: Vec<(NodeId, String)> = named
                    .into_iter()
                    .filter_map(|n| {
                        let a = t.book.get(&n).cloned().or_else(|| node.links.addr_of(n))?;
                        Some((n, a))
                    })
                    .collect();
                let f = Message::Gossip { channel: self.id(), addrs, body: msg }.to_bytes();
                if let Some((id, hops)) = event {
                    *encoded = Some((id, hops, f.clone()));
                }
                f
            });
            // Everything but an event of an event stream counts as control: a membership stream's id XOR the
            // constant is its node's id, in the book; an event stream's is not.
            let control = event.is_none_or(|(id, _)| t.book.contains_key(&membership_stream(id.source)));
            (addr, frame, control)
        };
        if control {
            self.count_control(frame.len());
        }
        if event.is_some() {
            // A node with a Block sink fills its links from the sources' nodes with the events they send it directly
            // (each waiting for room first): the overlay's frames still go, so that its other sinks are served.
            if !node.links.has_room(to, frame.len()) && !self.tree_direct(to) {
                return;
            }
            self.tree.forwarded.fetch_add(1, Ordering::Relaxed);
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        if lane == 0 {
            node.links.send_frame(to, &addr, frame);
        } else {
            node.links.send_frame_in(to, &addr, lane, frame);
        }
    }

    /// An event or a snapshot of another node, in that node's order.
    fn gossip_deliver(self: &Arc<Self>, node: &Arc<Channels>, id: EventId, frame: Bytes) {
        // Events, expired notices and ends (`tree_events.rs`); the rest is membership.
        let Some(msg) = self.tree_item(node, id, &frame) else { return };
        match msg {
            Message::Snapshot { node: who, left: true, .. } if who == node.id => {
                // Another member took this node for gone (its link to it failed): it is not.
                tracing::debug!(channel = %self.name, "taken for gone by a member: publishing again");
                self.publish_members();
            }
            Message::Snapshot { node: who, .. } if membership_stream(who) == id.source => {
                self.membership_input(who, msg);
            }
            Message::Snapshot { left: true, .. } => {
                // A goodbye on behalf of a node whose link to the relaying member failed.
                self.membership_input(NodeId(id.source.0 ^ MEMBERSHIP_STREAM), msg);
            }
            Message::Gossip { body: GossipMsg::Suspect { node: who, version }, .. } => {
                self.suspected(node, who, version);
            }
            other => {
                tracing::debug!(channel = %self.name, "kind {} relayed in the overlay, ignored", other.kind());
            }
        }
    }

    /// Offers an event that arrived through the overlay to the local sinks that accept it, without waiting: the
    /// reader that delivers it also forwards the channel's tree, which must not stop for one full sink.
    /// Returns false if no local sink wanted it.
    fn offer_now(
        &self,
        ty: Arc<str>,
        mut attrs: Attrs,
        payload: Bytes,
        seq: u64,
        key: SourceKey,
        deadline: Option<u64>,
    ) -> bool {
        let sinks = self.local_sinks.read().clone();
        // Block sinks get their events directly from the source (`Source::submit`), not from the overlay.
        let chosen: SinkList<'_> =
            sinks.iter().filter(|s| s.queue.overflow() != Overflow::Block && accepts(s, &ty, &attrs)).collect();
        if chosen.is_empty() {
            return false;
        }
        let Some(chosen) = self.in_filtered(chosen, &ty, &mut attrs, &payload) else { return true };
        let ev = Event::new(ty, attrs, payload, seq, key, deadline);
        for s in chosen {
            match s.queue.offer(ev.clone()) {
                Offer::Queued | Offer::Closed => {}
                Offer::Dropped => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Offer::Full(_) => {
                    // Not a Block sink (those are served directly): the event is lost to it, and it is told.
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    s.queue.add_lag(1);
                }
            }
        }
        true
    }

    /// Events `first..first + count` of stream `stream` will not come.
    fn gossip_lost(&self, node: &Arc<Channels>, stream: NodeId, first: u64, count: u64) {
        let events = {
            let t = self.tree.inner.lock();
            t.event_streams.contains(&stream)
        } || self.state.lock().peers().contains_key(&stream);
        if !events {
            // Snapshots of a member the overlay did not deliver (a graft that took too long on a loaded host, say):
            // ask the member directly, so that this node does not miss its members for good.
            let origin = NodeId(stream.0 ^ MEMBERSHIP_STREAM);
            tracing::debug!(channel = %self.name, node = %origin, first, count, "snapshots lost in the overlay: asking");
            let mut st = self.state.lock();
            let known = st.peers().get(&origin).map(|p| p.addr.clone());
            if known.is_some() && !node.links.is_up(origin) {
                // A member this node knows (most often from the contact's answer to its join, which lists every
                // member's snapshot): asked on a link of its own only within a small budget, or a storm's joiner
                // opens a link to each of the members whose broadcasts passed before it was in the overlay. What is
                // not asked, the anti-entropy with the neighbours repairs; this node's own snapshot, which the ask
                // also carries, reaches the members through the overlay (announced to every new neighbour).
                let at = now();
                if !self.tree.inner.lock().asks.allow(at) {
                    tracing::debug!(channel = %self.name, node = %origin, "snapshots lost: left to the anti-entropy");
                    return;
                }
            }
            let Some(addr) = known
                .or_else(|| self.tree.inner.lock().book.get(&origin).cloned())
                .or_else(|| node.links.addr_of(origin))
            else {
                // A member this node does not know at all: the contact's view lists it (asked at most every
                // `RESYNC_EVERY`, so that a node does not flood the contact with joins).
                let at = now();
                let mut t = self.tree.inner.lock();
                if t.last_resync.is_none_or(|r| at.saturating_duration_since(r) >= RESYNC_EVERY) {
                    t.last_resync = Some(at);
                    drop(t);
                    st.resync(at);
                    drop(st);
                    self.timer.notify_one();
                }
                return;
            };
            let ask = Message::Snapshot {
                channel: self.id(),
                node: node.id,
                addr: node.links.addr.clone(),
                snapshot: st.local().clone(),
                left: false,
                reply: true,
            };
            drop(st);
            self.tree.inner.lock().recent.note(origin, now(), LINK_GRACE);
            self.control_send(node, origin, &addr, &ask);
            return;
        }
        tracing::debug!(channel = %self.name, node = %stream, first, count, "events lost in the overlay");
        self.tree.lost.fetch_add(count, Ordering::Relaxed);
        self.counters.missed.fetch_add(count, Ordering::Relaxed);
        // Which sinks wanted them is unknown here: every sink is told, as for a loss in transit (but Block sinks, whose
        // events come directly from their sources).
        for s in self.local_sinks.read().iter().filter(|s| s.queue.overflow() != Overflow::Block) {
            s.queue.add_lag(count);
        }
    }

    /// The overlay has no neighbour and no address left: join again through the contact, or any member known.
    fn tree_rejoin(self: &Arc<Self>, node: &Arc<Channels>) {
        let via = {
            let st = self.state.lock();
            st.contact().filter(|c| *c != node.id).or_else(|| {
                let peers: Vec<NodeId> = st.peers().keys().copied().collect();
                (!peers.is_empty()).then(|| peers[rand::random::<usize>() % peers.len()])
            })
        };
        let Some(via) = via else { return };
        let at = now();
        let mut t = self.tree.inner.lock();
        let ms = t.ms(at);
        if let Some(g) = t.gossip.as_mut() {
            g.join(via, ms);
        }
        // The outputs are executed by the pump running now.
    }
}

impl ChannelInner {
    /// Sends a membership message directly, counted in [`TreeStats::control_frames`].
    fn control_send(&self, node: &Arc<Channels>, to: NodeId, addr: &str, msg: &Message) {
        // Encoded once more to count it: membership messages are few per node and change.
        self.count_control(msg.to_bytes().len());
        node.send(to, addr, msg);
    }

    fn count_control(&self, bytes: usize) {
        self.tree.control_frames.fetch_add(1, Ordering::Relaxed);
        self.tree.control_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// The sink wants an event of type `ty` with `attrs` (its type filter, then its content filter).
fn accepts(s: &LocalSink, ty: &str, attrs: &Attrs) -> bool {
    s.accepts(ty, attrs)
}

/// Drives the overlay's timers (grafts, loss reports, summaries, refills, shuffles) and closes unneeded links.
async fn tree_loop(weak: Weak<ChannelInner>) {
    let mut next_sweep = now() + SWEEP_EVERY;
    let mut next_sync = now() + SYNC_EVERY;
    loop {
        let Some(ch) = weak.upgrade() else { return };
        if ch.closed.load(Ordering::Acquire) {
            return;
        }
        let due = {
            let t = ch.tree.inner.lock();
            let ms = t.gossip.as_ref().map_or(u64::MAX, |g| g.poll_timeout());
            let ms = ms.min(t.prober.as_ref().map_or(u64::MAX, |p| p.poll_timeout()));
            let next = next_sweep.min(next_sync).min(t.own.due().unwrap_or(next_sweep));
            t.base.checked_add(Duration::from_millis(ms)).map_or(next, |d| d.min(next))
        };
        {
            let notified = ch.tree.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let until = tokio::time::Instant::from_std(due);
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = &mut notified => {}
            }
        }
        let Some(node) = ch.node.upgrade() else { return };
        let at = now();
        {
            let mut t = ch.tree.inner.lock();
            let ms = t.ms(at);
            let own = t.own.take_due(at);
            if let Some(g) = t.gossip.as_mut() {
                if let Some(snapshot) = own {
                    g.broadcast_on(membership_stream(node.id), snapshot, ms);
                    ch.tree.own_broadcasts.fetch_add(1, Ordering::Relaxed);
                }
                if g.poll_timeout() <= ms {
                    g.handle_timeout(ms);
                }
            }
        }
        ch.tree_execute(&node);
        ch.probe_tick(&node);
        if at >= next_sweep {
            next_sweep = at + SWEEP_EVERY;
            node.release_links();
        }
        if at >= next_sync {
            next_sync = at + SYNC_EVERY;
            ch.tree_sync();
        }
    }
}
