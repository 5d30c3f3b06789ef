//! Membership and dissemination for large channels, without I/O: HyParView partial views (Leitão, Pereira and
//! Rodrigues, 2007) and Plumtree epidemic broadcast trees (Leitão, Pereira and Rodrigues, 2007), as iroh-gossip keeps
//! them, written for kecho. A channel runs one above its tree threshold (`crates/kecho/src/channel/tree.rs`;
//! docs/SCALE.md has the design and the figures).
//!
//! Each member keeps a small **active view** (its links, at most [`GossipConfig::active`]) and a larger **passive
//! view** (addresses to replace failed links from), both bounded whatever the channel's size. Joins walk the overlay
//! (`ForwardJoin` with a time to live), so a join costs O(walk length) messages, not O(N). Events travel along a
//! spanning tree carved out of the active views: a member sends an event in full to its *eager* peers and announces
//! it (`IHave`) to its *lazy* ones; a duplicate makes the receiver `Prune` the sender to lazy, and an announcement of
//! an event that does not arrive in time makes the receiver `Graft` the announcer back, which repairs the tree after
//! failures. Events carry `(source, seq)`; each member delivers them per source in order and reports gaps it gives up
//! on as lost (never silently skipped).
//!
//! Inputs carry `now` in milliseconds; outputs are drained with [`Gossip::poll_output`]; randomness is seeded.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crate::types::NodeId;

/// Sizes and timers.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// The active view's target size: the links a member keeps. A member asked politely for a link when its view
    /// is full accepts one more, so a view holds at most one more than this.
    pub active: usize,
    /// Largest passive view.
    pub passive: usize,
    /// Length of a join's random walk.
    pub arwl: u8,
    /// At which remaining walk length the joiner is put in passive views.
    pub prwl: u8,
    /// How often a member exchanges passive-view samples (ms).
    pub shuffle_every: u64,
    /// How long an announced event may take before the announcer is grafted (ms).
    pub graft_after: u64,
    /// How long a gap in a source's sequence may stay open before it is reported lost (ms).
    pub loss_after: u64,
    /// Events kept per member to answer grafts.
    pub cache: usize,
    /// How long a received event stays in that cache at most (ms): grafts ask for events announced lately (a
    /// summary names sources active in the last [`GossipConfig::summary_for`]), and an idle member's cache is
    /// then empty rather than one event of every member that ever changed (its memory O(1), not O(members)).
    pub cache_for: u64,
    /// How often a member tells each active peer the newest event it has of every recently active source (ms), so
    /// that a member whose tree parent died learns of events it missed even when no later event comes (Plumtree's
    /// lazy queue, batched).
    pub summary_every: u64,
    /// A source counts as recently active this long after its last event (ms).
    pub summary_for: u64,
    /// How often a member with fewer than half of [`GossipConfig::active`] links asks for more (ms).
    pub refill_every: u64,
    /// Most events of one source a summary can make a member ask for at once.
    pub max_graft_run: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            active: 5,
            passive: 30,
            arwl: 6,
            prwl: 3,
            shuffle_every: 10_000,
            graft_after: 250,
            loss_after: 2_000,
            cache: 4096,
            cache_for: 30_000,
            summary_every: 500,
            summary_for: 10_000,
            refill_every: 500,
            max_graft_run: 256,
        }
    }
}

/// An event's identity: its source and its number there (from 1, consecutive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    /// The member that published it.
    pub source: NodeId,
    /// Its sequence number at that source.
    pub seq: u64,
}

/// A message between members.
#[derive(Clone, Debug, PartialEq)]
pub enum GossipMsg {
    /// A newcomer asks its contact to take it in.
    Join,
    /// A join's random walk.
    ForwardJoin {
        /// The newcomer.
        joiner: NodeId,
        /// Steps left.
        ttl: u8,
    },
    /// Asks to become an active peer (`high`: the asker has no active peer left, so it must be accepted).
    Neighbor {
        /// Priority.
        high: bool,
    },
    /// The answer to `Neighbor`.
    NeighborReply {
        /// Accepted.
        accepted: bool,
    },
    /// The sender drops the receiver from its active view (it stays in passive views).
    Disconnect,
    /// A passive-view sample on its walk.
    Shuffle {
        /// Who started it.
        origin: NodeId,
        /// Steps left.
        ttl: u8,
        /// The sample.
        peers: Vec<NodeId>,
        /// The walk so far, back to its origin: the nodes it passed, the origin first (empty from the origin).
        back: Vec<NodeId>,
    },
    /// The answer to a `Shuffle`, back the way the walk came, from neighbour to neighbour (the answerer sends it to
    /// the node the walk came from, each node on the way to the last of `back`), so that no node links to the
    /// walk's origin only to answer it.
    ShuffleReply {
        /// A sample of the answerer's passive view.
        peers: Vec<NodeId>,
        /// The rest of the way back: empty when it reaches the origin.
        back: Vec<NodeId>,
    },
    /// An event in full.
    Event {
        /// Its identity.
        id: EventId,
        /// Hops from its source.
        hops: u16,
        /// Its bytes.
        payload: bytes::Bytes,
    },
    /// Announces events the sender has.
    IHave {
        /// The events.
        ids: Vec<EventId>,
    },
    /// Asks for an event and makes the link eager again.
    Graft {
        /// The event.
        id: EventId,
    },
    /// Makes the link lazy for events of `source`.
    Prune {
        /// Whose tree.
        source: NodeId,
    },
    /// The liveness check ([`crate::probe`]): is the receiver alive? Version 11.
    Probe {
        /// Echoed in the answer.
        nonce: u64,
    },
    /// The answer to a `Probe`. Version 11.
    ProbeAck {
        /// The probe's nonce.
        nonce: u64,
    },
    /// `node`, at snapshot `version`, did not answer a probe: it is suspected, and refutes by publishing a newer
    /// snapshot. Never sent on a link by itself: broadcast on the suspecting member's membership stream, inside an
    /// encoded `Gossip` frame. Version 11.
    Suspect {
        /// The suspected node.
        node: NodeId,
        /// Its snapshot version the suspicion is about.
        version: u64,
    },
}

impl GossipMsg {
    /// Membership messages (everything but events, announcements, grafts and prunes).
    pub fn is_membership(&self) -> bool {
        !matches!(
            self,
            GossipMsg::Event { .. } | GossipMsg::IHave { .. } | GossipMsg::Graft { .. } | GossipMsg::Prune { .. }
        )
    }
}

/// What a member asks its I/O layer to do or tells its application.
#[derive(Clone, Debug, PartialEq)]
pub enum GossipOut {
    /// Send a message (opening a link if there is none).
    Send {
        /// To whom.
        to: NodeId,
        /// What.
        msg: GossipMsg,
    },
    /// An event for the application, in its source's order.
    Deliver {
        /// Its identity.
        id: EventId,
        /// Its bytes.
        payload: bytes::Bytes,
    },
    /// This member has no link left and no address to make one with: the I/O layer should join again through a
    /// member it finds in the registry ([`Gossip::join`]). Repeated every [`GossipConfig::refill_every`] while
    /// it lasts.
    Isolated,
    /// Events of `source` that will not come: `count` from `first` on.
    Lost {
        /// The source.
        source: NodeId,
        /// The first missing number.
        first: u64,
        /// How many.
        count: u64,
    },
}

/// Per-source delivery state.
#[derive(Debug, Default)]
struct SourceState {
    /// The next number to deliver.
    next: u64,
    /// What only a stream with a gap needs (boxed: a member follows two streams per other member of a channel in
    /// tree mode, nearly all of them without a gap, and each byte here is multiplied by the channel's size).
    held: Option<Box<Held>>,
    /// Since when a gap has been open.
    gap_since: Option<u64>,
    /// The highest number known to exist (received or announced).
    heard: u64,
    /// When its last event arrived or was published (for summaries).
    last_at: u64,
    /// The peer this source's newest event first came from: its tree parent here.
    parent: Option<NodeId>,
}

/// The part of a source's state that matters while events of it are missing.
#[derive(Debug, Default)]
struct Held {
    /// Events received ahead of `next`.
    ahead: BTreeMap<u64, bytes::Bytes>,
    /// Per announcer, the number up to which it is listed among the announcers of every event of this source still
    /// missing: an announcement looks only at the numbers above it, so that a member far behind a busy stream does
    /// not walk its whole gap again for each announcement (quadratic in the gap). Lowered when the announcer is taken
    /// off an event's list (grafted), so that its next announcement lists it again there.
    listed: HashMap<NodeId, u64>,
}

impl SourceState {
    fn held(&mut self) -> &mut Held {
        self.held.get_or_insert_with(Box::default)
    }

    /// The first number held ahead of a gap.
    fn first_ahead(&self) -> Option<u64> {
        self.held.as_ref().and_then(|h| h.ahead.keys().next().copied())
    }

    fn has_ahead(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.ahead.is_empty())
    }

    fn listed_mut(&mut self, p: &NodeId) -> Option<&mut u64> {
        self.held.as_mut().and_then(|h| h.listed.get_mut(p))
    }
}

/// Payloads shorter than this are copied into an allocation of their own when they arrive, before they are kept.
const COMPACT_BELOW: usize = 64 * 1024;

/// A received payload as it is kept (in the cache that answers grafts, ahead of a gap, and forwarded): a payload
/// read from a link is a slice of the reader's buffer (64 KiB and more), and holding it holds that whole buffer. With
/// events that arrive sparsely (a member's snapshot on its membership stream, one per join) the cache of up to
/// [`GossipConfig::cache`] payloads held every buffer a member ever read, about 5 KB per other member at 1,000
/// members (docs/SCALE.md, "Memory per member"). A short payload is copied (one copy per hop, of the payload's
/// length); a long one fills most of its buffer anyway and is kept as it is.
fn compact(payload: bytes::Bytes) -> bytes::Bytes {
    if payload.len() < COMPACT_BELOW {
        bytes::Bytes::copy_from_slice(&payload)
    } else {
        payload
    }
}

/// A small set of peers (a source's eager peers: at most the active view, a handful), kept as a list: a hash set
/// per source cost about twice the memory, for every source a member follows (two per member of a channel in tree
/// mode).
#[derive(Debug, Clone, Default)]
struct PeerSet(Vec<NodeId>);

impl PeerSet {
    fn contains(&self, p: &NodeId) -> bool {
        self.0.contains(p)
    }

    /// Adds `p`; false if it was there.
    fn insert(&mut self, p: NodeId) -> bool {
        if self.contains(&p) {
            return false;
        }
        self.0.push(p);
        true
    }

    /// Removes `p`; false if it was not there.
    fn remove(&mut self, p: &NodeId) -> bool {
        match self.0.iter().position(|x| x == p) {
            Some(i) => {
                self.0.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

/// Gives back most of a queue's memory once it holds far less than it has room for: a burst (the snapshots of a
/// join storm) must not leave every member holding room for it for good.
pub fn shrink_idle<T>(q: &mut VecDeque<T>) {
    if q.capacity() > 64 && q.len() < q.capacity() / 4 {
        q.shrink_to((2 * q.len()).max(16));
    }
}

/// An announced event not received yet.
#[derive(Debug)]
struct Missing {
    /// Who announced it, in order: the next to graft first.
    announcers: VecDeque<NodeId>,
    /// When to graft the next announcer.
    graft_at: u64,
    /// A graft was sent for it.
    grafted: bool,
}

/// What a member's dissemination did, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GossipCounters {
    /// Grafts sent (an announced event that did not come in time, asked of its announcer).
    pub grafts: u64,
    /// Second and later copies of events received.
    pub duplicates: u64,
    /// Grafts that turned out needless: the grafted event's tree copy came too.
    pub late_grafts: u64,
    /// Shuffle answers dropped on their way back because the walk's previous node was no longer a neighbour.
    pub shuffle_replies_dropped: u64,
}

/// The most nodes a `Shuffle` walk passes (its way back is carried in the message): a walk that asks for more ends
/// there.
const MAX_WALK: usize = 32;

/// Grafted events remembered to tell a needless graft from a needed one.
const GRAFTED_KEPT: usize = 4096;

/// One member's HyParView and Plumtree state.
#[derive(Debug)]
pub struct Gossip {
    me: NodeId,
    cfg: GossipConfig,
    active: Vec<NodeId>,
    passive: Vec<NodeId>,
    /// Per source, the active peers its events are pushed to in full (the rest of the active view gets
    /// announcements): one tree per source, so that pruning for one source's events never cuts another's tree. A
    /// source not in the map has every active peer eager.
    eager: HashMap<NodeId, PeerSet>,
    /// Events received (for duplicates and grafts), and when, oldest first.
    seen: HashMap<EventId, bytes::Bytes>,
    order: VecDeque<(EventId, u64)>,
    /// Announced events not received: who announced them, and when to graft.
    missing: HashMap<EventId, Missing>,
    /// Grafted events that arrived (or whose announcers ran out), oldest first: a second copy of one of them means
    /// the graft was needless.
    grafted: HashSet<EventId>,
    grafted_order: VecDeque<EventId>,
    counters: GossipCounters,
    sources: HashMap<NodeId, SourceState>,
    /// The sources with a gap open (`SourceState::gap_since`), in order: the timers look at these only, not at
    /// every stream (two per member in a channel's tree mode, and a tick per node was a pass over all of them).
    gapped: BTreeSet<NodeId>,
    /// The next number of each stream this member publishes on (its own id, and any other of
    /// [`Gossip::broadcast_on`]).
    next_seq: HashMap<NodeId, u64>,
    next_shuffle: u64,
    next_summary: u64,
    next_refill: u64,
    /// Rejected `Neighbor` requests since the last failure.
    refill_tries: u8,
    /// Periodic refills in a row that were needed (the period doubles with each, up to 16 times).
    refill_backoff: u8,
    rng: u64,
    out: VecDeque<GossipOut>,
}

impl Gossip {
    /// A member that knows nobody yet.
    pub fn new(me: NodeId, cfg: GossipConfig, seed: u64, now: u64) -> Self {
        let next_shuffle = now + cfg.shuffle_every;
        let (next_summary, next_refill) = (now + cfg.summary_every, now + cfg.refill_every);
        Gossip {
            me,
            cfg,
            active: Vec::new(),
            passive: Vec::new(),
            eager: HashMap::new(),
            seen: HashMap::new(),
            order: VecDeque::new(),
            missing: HashMap::new(),
            grafted: HashSet::new(),
            grafted_order: VecDeque::new(),
            counters: GossipCounters::default(),
            sources: HashMap::new(),
            gapped: BTreeSet::new(),
            next_seq: HashMap::new(),
            next_shuffle,
            next_summary,
            next_refill,
            refill_tries: 0,
            refill_backoff: 0,
            rng: seed | 1,
            out: VecDeque::new(),
        }
    }

    /// Joins through `contact`, a member found in the registry.
    pub fn join(&mut self, contact: NodeId, _now: u64) {
        if contact != self.me {
            self.add_active(contact);
            self.send(contact, GossipMsg::Join);
        }
    }

    /// The active view: this member's links.
    pub fn active(&self) -> &[NodeId] {
        &self.active
    }

    /// The passive view.
    pub fn passive(&self) -> &[NodeId] {
        &self.passive
    }

    /// This member holds event `id` (to answer a graft for it).
    pub fn cached(&self, id: &EventId) -> bool {
        self.seen.contains_key(id)
    }

    /// The next number of `stream` this member will deliver, if it follows that stream.
    pub fn next_of(&self, stream: NodeId) -> Option<u64> {
        self.sources.get(&stream).map(|s| s.next)
    }

    /// What this member's dissemination did so far.
    pub fn counters(&self) -> GossipCounters {
        self.counters
    }

    /// The next output.
    pub fn poll_output(&mut self) -> Option<GossipOut> {
        let out = self.out.pop_front();
        if out.is_none() {
            shrink_idle(&mut self.out);
        }
        out
    }

    /// When [`Gossip::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> u64 {
        let graft = self.missing.values().map(|m| m.graft_at).min();
        let loss = self
            .gapped
            .iter()
            .filter_map(|src| self.sources.get(src).and_then(|s| s.gap_since))
            .min()
            .map(|t| t + self.cfg.loss_after);
        let refill = (self.active.len() < self.cfg.active / 2).then_some(self.next_refill);
        let summary = (!self.active.is_empty() && !self.sources.is_empty()).then_some(self.next_summary);
        [Some(self.next_shuffle), graft, loss, refill, summary].into_iter().flatten().min().unwrap_or(u64::MAX)
    }

    /// Publishes an event from this member; returns its identity.
    pub fn broadcast(&mut self, payload: bytes::Bytes, now: u64) -> EventId {
        self.broadcast_on(self.me, payload, now)
    }

    /// Publishes an event on `stream`, a sequence of its own numbered from 1 that only this member publishes on
    /// (its own id for [`Gossip::broadcast`]; another id, say, for messages its members must not count as lost
    /// events). Each stream has its own tree, order and loss reports.
    pub fn broadcast_on(&mut self, stream: NodeId, payload: bytes::Bytes, now: u64) -> EventId {
        let next = self.next_seq.entry(stream).or_insert(1);
        let id = EventId { source: stream, seq: *next };
        *next += 1;
        self.remember(id, payload.clone(), now);
        let s = self.sources.entry(stream).or_default();
        s.next = id.seq + 1;
        s.heard = id.seq;
        s.last_at = now;
        self.push(id, 0, payload, None, now);
        id
    }

    /// The link to `peer` failed (or it could not be reached).
    pub fn peer_failed(&mut self, peer: NodeId, _now: u64) {
        self.passive.retain(|p| *p != peer);
        if self.active.contains(&peer) {
            self.remove_active(peer);
            self.refill_tries = 0;
            self.refill();
        }
        for m in self.missing.values_mut() {
            m.announcers.retain(|p| *p != peer);
        }
        for s in self.sources.values_mut() {
            if let Some(h) = s.held.as_mut() {
                h.listed.remove(&peer);
            }
        }
    }

    /// `holder` has event `id` (and may be grafted for it and the events of its source before it), as if it had
    /// announced it, without being a neighbour: the I/O layer's knowledge (a stream's origin holds its own events),
    /// not a message, so it is never answered.
    pub fn held_by(&mut self, holder: NodeId, id: EventId, now: u64) {
        if holder != self.me {
            self.announced(holder, id, now);
        }
    }

    /// A message from `from`.
    pub fn handle(&mut self, from: NodeId, msg: GossipMsg, now: u64) {
        if from == self.me {
            return;
        }
        if matches!(msg, GossipMsg::IHave { .. } | GossipMsg::Prune { .. }) && !self.active.contains(&from) {
            // `from` takes this member for a neighbour and this member does not: the views disagree (a Disconnect
            // or a neighbour request lost or overtaken, a view that dropped `from` while its messages were on
            // their way). Left so, `from` counts on a link that carries nothing to it: every announcement and
            // summary of this member skips it, and with no other neighbour it would miss events without ever
            // learning of them. Told, it drops the link (and refills its view).
            self.send(from, GossipMsg::Disconnect);
        }
        match msg {
            GossipMsg::Join => {
                self.add_active(from);
                for p in self.active.clone() {
                    if p != from {
                        self.send(p, GossipMsg::ForwardJoin { joiner: from, ttl: self.cfg.arwl });
                    }
                }
            }
            GossipMsg::ForwardJoin { joiner, ttl } => {
                if joiner == self.me {
                    return;
                }
                if ttl == 0 || self.active.len() <= 1 {
                    if !self.active.contains(&joiner) {
                        self.add_active(joiner);
                        self.send(joiner, GossipMsg::Neighbor { high: true });
                    }
                    return;
                }
                if ttl == self.cfg.prwl {
                    self.add_passive(joiner);
                }
                match self.random_active_except(&[from, joiner]) {
                    Some(next) => self.send(next, GossipMsg::ForwardJoin { joiner, ttl: ttl - 1 }),
                    None => {
                        if !self.active.contains(&joiner) {
                            self.add_active(joiner);
                            self.send(joiner, GossipMsg::Neighbor { high: true });
                        }
                    }
                }
            }
            GossipMsg::Neighbor { high } => {
                let accepted = self.active.contains(&from) || high || self.active.len() <= self.cfg.active;
                if accepted && !high && self.active.len() == self.cfg.active {
                    // One link over the target for a member short of links: HyParView would refuse, and a member
                    // whose every candidate has a full view would stay with one link. Joins bring the view back
                    // to the target (they replace a link rather than add one).
                    self.passive.retain(|x| *x != from);
                    self.active.push(from);
                    for e in self.eager.values_mut() {
                        e.insert(from);
                    }
                } else if accepted {
                    self.add_active(from);
                }
                if !high {
                    self.send(from, GossipMsg::NeighborReply { accepted });
                }
            }
            GossipMsg::NeighborReply { accepted } => {
                if accepted {
                    self.refill_tries = 0;
                    self.refill_backoff = 0;
                    self.add_active(from);
                } else {
                    self.add_passive(from);
                    // A bounded number of tries per failure, so that full views do not bounce requests forever.
                    if self.refill_tries < 3 {
                        self.refill_tries += 1;
                        self.refill_except(from);
                    }
                }
            }
            GossipMsg::Disconnect => {
                if self.active.contains(&from) {
                    self.remove_active(from);
                    self.add_passive(from);
                    // Dropped to make room for a newcomer: refill only a view that became small.
                    if self.active.len() < self.cfg.active / 2 {
                        self.refill_tries = 0;
                        self.refill_except(from);
                    }
                }
            }
            GossipMsg::Shuffle { origin, ttl, peers, mut back } => {
                if origin == self.me {
                    return;
                }
                match self.random_active_except(&[from, origin]) {
                    Some(next) if ttl > 1 && back.len() < MAX_WALK => {
                        back.push(from);
                        self.send(next, GossipMsg::Shuffle { origin, ttl: ttl - 1, peers, back });
                    }
                    _ => {
                        let sample = self.sample(&self.passive.clone(), peers.len());
                        self.send(from, GossipMsg::ShuffleReply { peers: sample, back });
                        for p in peers {
                            self.add_passive(p);
                        }
                    }
                }
            }
            GossipMsg::ShuffleReply { peers, mut back } => match back.pop() {
                None => {
                    for p in peers {
                        self.add_passive(p);
                    }
                }
                // On its way back: to the previous node of the walk, while it is a neighbour (a shuffle is a
                // best-effort exchange; an answer whose way back broke is dropped rather than sent over a new link).
                Some(prev) if self.active.contains(&prev) => {
                    self.send(prev, GossipMsg::ShuffleReply { peers, back });
                }
                Some(_) => self.counters.shuffle_replies_dropped += 1,
            },
            GossipMsg::Event { id, hops, payload } => {
                if self.seen.contains_key(&id) || id.seq < self.sources.get(&id.source).map_or(1, |s| s.next) {
                    // A second copy: this link need not carry this source's events in full, in either direction.
                    self.counters.duplicates += 1;
                    if self.grafted.remove(&id) {
                        // The graft was needless: the tree's copy was late, not lost.
                        self.counters.late_grafts += 1;
                    }
                    self.eager_of(id.source).remove(&from);
                    self.send(from, GossipMsg::Prune { source: id.source });
                    return;
                }
                if self.missing.remove(&id).is_some_and(|m| m.grafted) {
                    self.remember_grafted(id);
                }
                if self.active.contains(&from) {
                    self.eager_of(id.source).insert(from);
                }
                let payload = compact(payload);
                self.remember(id, payload.clone(), now);
                self.accept(id, payload.clone(), now);
                if let Some(s) = self.sources.get_mut(&id.source) {
                    s.parent = Some(from);
                }
                self.push(id, hops + 1, payload, Some(from), now);
            }
            GossipMsg::IHave { ids } => {
                for id in ids {
                    self.announced(from, id, now);
                }
            }
            GossipMsg::Graft { id } => {
                if self.active.contains(&from) {
                    self.eager_of(id.source).insert(from);
                }
                if let Some(payload) = self.seen.get(&id).cloned() {
                    self.send(from, GossipMsg::Event { id, hops: 0, payload });
                }
            }
            GossipMsg::Prune { source } => {
                self.eager_of(source).remove(&from);
            }
            // The liveness check is the I/O layer's (`crate::probe`).
            GossipMsg::Probe { .. } | GossipMsg::ProbeAck { .. } | GossipMsg::Suspect { .. } => {}
        }
    }

    /// Timers: grafts for announced events that did not come, lost gaps, shuffles.
    pub fn handle_timeout(&mut self, now: u64) {
        self.forget_old(now);
        let mut due: Vec<EventId> = self.missing.iter().filter(|(_, m)| m.graft_at <= now).map(|(id, _)| *id).collect();
        // In a fixed order, so that a run depends on its seed only.
        due.sort_unstable();
        for id in due {
            let Some(m) = self.missing.get_mut(&id) else { continue };
            match m.announcers.pop_front() {
                Some(p) => {
                    m.graft_at = now + self.cfg.graft_after;
                    m.grafted = true;
                    self.counters.grafts += 1;
                    if let Some(mark) = self.sources.get_mut(&id.source).and_then(|s| s.listed_mut(&p)) {
                        *mark = (*mark).min(id.seq.saturating_sub(1));
                    }
                    if self.active.contains(&p) {
                        self.eager_of(id.source).insert(p);
                    }
                    self.send(p, GossipMsg::Graft { id });
                    // The tree parent did not bring it in time: a stalled or slow parent's copies would all come
                    // late, each a duplicate (a parent that resumes after a stall sends its whole backlog before it
                    // reads the prune a duplicate causes). Pruned now, it sends what it already queued, then
                    // announcements only; the grafted announcer is the new parent.
                    let parent = self.sources.get_mut(&id.source).and_then(|s| s.parent.replace(p));
                    if let Some(old) = parent.filter(|old| *old != p) {
                        if self.eager_of(id.source).remove(&old) {
                            self.send(old, GossipMsg::Prune { source: id.source });
                        }
                    }
                }
                None => {
                    if self.missing.remove(&id).is_some_and(|m| m.grafted) {
                        self.remember_grafted(id);
                    }
                }
            }
        }
        let loss_after = self.cfg.loss_after;
        let mut lost = Vec::new();
        // Only sources with a gap open: in any other, nothing is held ahead and nothing is due (in order already).
        let srcs: Vec<NodeId> = self.gapped.iter().copied().collect();
        for src in &srcs {
            let Some(s) = self.sources.get_mut(src) else { continue };
            if s.gap_since.is_some_and(|t| now >= t + loss_after) {
                // Up to the first event held ahead, or, with none held, up to the newest announced.
                let upto = s.first_ahead().unwrap_or(s.heard + 1);
                if upto > s.next {
                    lost.push(GossipOut::Lost { source: *src, first: s.next, count: upto - s.next });
                    for seq in s.next..upto {
                        self.missing.remove(&EventId { source: *src, seq });
                    }
                    s.next = upto;
                }
                s.gap_since = None;
                self.gapped.remove(src);
            }
        }
        for l in lost {
            self.out.push_back(l);
        }
        for src in srcs {
            self.drain_source(src, now);
        }
        if now >= self.next_summary {
            self.next_summary = now + self.cfg.summary_every;
            self.summarize(now);
        }
        if now >= self.next_refill {
            self.next_refill = now + (self.cfg.refill_every << self.refill_backoff);
            if self.active.len() < self.cfg.active / 2 {
                // Refused requests stop after a few tries per failure; a member still short of links tries again
                // here, and one with nobody to ask asks a peer for addresses.
                self.refill_tries = 0;
                if self.active.is_empty() && self.passive.is_empty() {
                    self.out.push_back(GossipOut::Isolated);
                } else if self.passive.is_empty() {
                    if let Some(to) = self.random_active_except(&[]) {
                        let mut peers = vec![self.me];
                        peers.extend(self.sample(&self.active.clone(), 3));
                        self.send(to, GossipMsg::Shuffle { origin: self.me, ttl: 1, peers, back: Vec::new() });
                    }
                } else {
                    // A request that must be accepted would make the asked member drop a random link, which can
                    // cut a small group off the overlay: ask politely, less often each time (up to 16 times the
                    // period), so that members with full views are not asked again and again.
                    self.refill();
                    self.refill_backoff = (self.refill_backoff + 1).min(4);
                }
            }
        }
        if now >= self.next_shuffle {
            self.next_shuffle = now + self.cfg.shuffle_every;
            if let Some(to) = self.random_active_except(&[]) {
                let mut peers = vec![self.me];
                peers.extend(self.sample(&self.active.clone(), 3));
                peers.extend(self.sample(&self.passive.clone(), 4));
                self.send(to, GossipMsg::Shuffle { origin: self.me, ttl: self.cfg.arwl, peers, back: Vec::new() });
            }
        }
    }

    // ---- dissemination ---------------------------------------------------------------------------------------

    /// `from` has event `id`: every event of its source up to it that this member lacks is missing (asked for
    /// with a graft if it does not come within `graft_after`), and a gap opens so that what never comes is reported.
    fn announced(&mut self, from: NodeId, id: EventId, now: u64) {
        let Some(s) = self.sources.get_mut(&id.source) else {
            // A source first heard of through an announcement is followed from that event on, as from an event.
            let s =
                SourceState { next: id.seq, heard: id.seq, last_at: now, gap_since: Some(now), ..Default::default() };
            self.sources.insert(id.source, s);
            self.gapped.insert(id.source);
            self.want(from, id, now);
            return;
        };
        if id.seq < s.next {
            return;
        }
        s.heard = s.heard.max(id.seq);
        s.last_at = s.last_at.max(now);
        if s.gap_since.is_none() {
            s.gap_since = Some(now);
            self.gapped.insert(id.source);
        }
        let listed = s.listed_mut(&from).copied().unwrap_or(0);
        if id.seq <= listed {
            // Every number up to it is missing with `from` listed, or arrived.
            return;
        }
        let first = s.next.max(id.seq.saturating_sub(self.cfg.max_graft_run - 1)).max(listed + 1);
        s.held().listed.insert(from, id.seq);
        for seq in first..=id.seq {
            let e = EventId { source: id.source, seq };
            if !self.seen.contains_key(&e) {
                self.want(from, e, now);
            }
        }
    }

    fn want(&mut self, from: NodeId, id: EventId, now: u64) {
        let graft_at = now + self.cfg.graft_after;
        let entry =
            self.missing.entry(id).or_insert_with(|| Missing { announcers: VecDeque::new(), graft_at, grafted: false });
        if !entry.announcers.contains(&from) {
            entry.announcers.push_back(from);
        }
    }

    /// A grafted event arrived: remembered for a while, so that a second copy tells the graft was needless.
    fn remember_grafted(&mut self, id: EventId) {
        self.grafted.insert(id);
        self.grafted_order.push_back(id);
        while self.grafted_order.len() > GRAFTED_KEPT {
            if let Some(old) = self.grafted_order.pop_front() {
                self.grafted.remove(&old);
            }
        }
    }

    /// Tells every active peer the newest event of each recently active source this member delivered up to.
    fn summarize(&mut self, now: u64) {
        let mut ids: Vec<EventId> = self
            .sources
            .iter()
            .filter(|(_, s)| s.next > 1 && now.saturating_sub(s.last_at) < self.cfg.summary_for)
            .map(|(src, s)| EventId { source: *src, seq: s.next - 1 })
            .collect();
        if ids.is_empty() {
            return;
        }
        ids.sort_unstable();
        for p in self.active.clone() {
            self.send(p, GossipMsg::IHave { ids: ids.clone() });
        }
    }

    fn push(&mut self, id: EventId, hops: u16, payload: bytes::Bytes, from: Option<NodeId>, _now: u64) {
        self.eager_of(id.source);
        let eager = &self.eager[&id.source];
        for &p in &self.active {
            if Some(p) == from {
                continue;
            }
            let msg = if eager.contains(&p) {
                GossipMsg::Event { id, hops, payload: payload.clone() }
            } else {
                GossipMsg::IHave { ids: vec![id] }
            };
            self.out.push_back(GossipOut::Send { to: p, msg });
        }
    }

    fn remember(&mut self, id: EventId, payload: bytes::Bytes, now: u64) {
        self.seen.insert(id, payload);
        self.order.push_back((id, now));
        while self.order.len() > self.cfg.cache {
            if let Some((old, _)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.forget_old(now);
    }

    /// Drops the cached events older than [`GossipConfig::cache_for`].
    fn forget_old(&mut self, now: u64) {
        let before = self.order.len();
        while let Some((old, _)) = self.order.front().filter(|(_, at)| at.saturating_add(self.cfg.cache_for) <= now) {
            self.seen.remove(old);
            self.order.pop_front();
        }
        if self.order.len() < before {
            shrink_idle(&mut self.order);
            if self.seen.capacity() > 4 * self.seen.len().max(16) {
                self.seen.shrink_to(2 * self.seen.len());
            }
        }
    }

    /// Delivers in per-source order, holding events that arrive ahead of a gap.
    fn accept(&mut self, id: EventId, payload: bytes::Bytes, now: u64) {
        // A source first heard of now is followed from this event on (a member that joins late does not count what
        // was published before it joined as lost).
        let s = self.sources.entry(id.source).or_insert_with(|| SourceState { next: id.seq, ..Default::default() });
        s.heard = s.heard.max(id.seq);
        s.last_at = now;
        let before = s.next;
        if id.seq == s.next && !s.has_ahead() {
            // In order (the common case): delivered at once. A map holding one event would keep its node's memory
            // (a few hundred bytes) after the event left it, for every source ever heard.
            self.out.push_back(GossipOut::Deliver { id, payload });
            s.next += 1;
        } else {
            s.held().ahead.insert(id.seq, payload);
        }
        self.drain_source_since(id.source, before, now);
    }

    fn drain_source(&mut self, src: NodeId, now: u64) {
        if let Some(before) = self.sources.get(&src).map(|s| s.next) {
            self.drain_source_since(src, before, now);
        }
    }

    /// Delivers what is held in order and updates the gap's state; `before` is the next number as it was before this
    /// turn (an event delivered at once by `accept` is progress too: it starts the loss timer again).
    fn drain_source_since(&mut self, src: NodeId, before: u64, now: u64) {
        let Some(s) = self.sources.get_mut(&src) else { return };
        while let Some(payload) = s.held.as_mut().and_then(|h| h.ahead.remove(&s.next)) {
            self.out.push_back(GossipOut::Deliver { id: EventId { source: src, seq: s.next }, payload });
            s.next += 1;
        }
        if let Some(h) = s.held.as_mut().filter(|h| h.ahead.is_empty()) {
            // An emptied map keeps its node: let it go.
            h.ahead = BTreeMap::new();
        }
        let gap = s.has_ahead() || s.heard >= s.next;
        // The loss timer counts time without progress: in a busy stream whose announcements run ahead of its events
        // (a slow tree parent), a gap is open all the time, but not for the same events.
        s.gap_since = match (gap, s.next != before) {
            (false, _) => None,
            (true, true) => Some(now),
            (true, false) => Some(s.gap_since.unwrap_or(now)),
        };
        if !gap {
            // Nothing of this source is missing: the announcers' marks only shorten the walk over missing numbers,
            // and an announcement after this one walks from `next` anyway.
            s.held = None;
        }
        if s.gap_since.is_some() {
            self.gapped.insert(src);
        } else {
            self.gapped.remove(&src);
        }
    }

    // ---- views -----------------------------------------------------------------------------------------------

    fn add_active(&mut self, p: NodeId) {
        if p == self.me || self.active.contains(&p) {
            return;
        }
        self.passive.retain(|x| *x != p);
        if self.active.len() >= self.cfg.active {
            let i = self.below(self.active.len());
            let dropped = self.active[i];
            self.remove_active(dropped);
            self.send(dropped, GossipMsg::Disconnect);
            self.add_passive(dropped);
        }
        self.active.push(p);
        // A new link carries every tree in full until duplicates prune it.
        for e in self.eager.values_mut() {
            e.insert(p);
        }
    }

    fn remove_active(&mut self, p: NodeId) {
        self.active.retain(|x| *x != p);
        for e in self.eager.values_mut() {
            e.remove(&p);
        }
    }

    /// The eager peers of `source`'s tree (every active peer for a source not seen before).
    fn eager_of(&mut self, source: NodeId) -> &mut PeerSet {
        let active = &self.active;
        self.eager.entry(source).or_insert_with(|| PeerSet(active.clone()))
    }

    fn add_passive(&mut self, p: NodeId) {
        if p == self.me || self.active.contains(&p) || self.passive.contains(&p) {
            return;
        }
        if self.passive.len() >= self.cfg.passive {
            let i = self.below(self.passive.len());
            self.passive.swap_remove(i);
        }
        self.passive.push(p);
    }

    fn refill(&mut self) {
        self.refill_except(self.me);
    }

    /// Asks a passive peer to become active while the active view has room.
    fn refill_except(&mut self, not: NodeId) {
        let high = self.active.is_empty();
        self.refill_with(not, high);
    }

    /// Asks a passive peer other than `not` to become active (`high`: it must accept, and the link counts at once).
    fn refill_with(&mut self, not: NodeId, high: bool) {
        if self.active.len() >= self.cfg.active {
            return;
        }
        let candidates: Vec<NodeId> = self.passive.iter().copied().filter(|p| *p != not).collect();
        if candidates.is_empty() {
            return;
        }
        let p = candidates[self.below(candidates.len())];
        self.send(p, GossipMsg::Neighbor { high });
        if high {
            self.add_active(p);
        }
    }

    fn random_active_except(&mut self, not: &[NodeId]) -> Option<NodeId> {
        let c: Vec<NodeId> = self.active.iter().copied().filter(|p| !not.contains(p)).collect();
        if c.is_empty() {
            None
        } else {
            Some(c[self.below(c.len())])
        }
    }

    fn sample(&mut self, from: &[NodeId], n: usize) -> Vec<NodeId> {
        let mut v = from.to_vec();
        let mut out = Vec::new();
        while out.len() < n && !v.is_empty() {
            let i = self.below(v.len());
            out.push(v.swap_remove(i));
        }
        out
    }

    fn send(&mut self, to: NodeId, msg: GossipMsg) {
        self.out.push_back(GossipOut::Send { to, msg });
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event a member answers a graft of `id` with, after receiving it from another member.
    fn kept_after_receiving(payload: bytes::Bytes) -> bytes::Bytes {
        let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
        let mut g = Gossip::new(b, GossipConfig::default(), 7, 0);
        let id = EventId { source: a, seq: 1 };
        g.handle(a, GossipMsg::Event { id, hops: 0, payload }, 0);
        while g.poll_output().is_some() {}
        g.handle(c, GossipMsg::Graft { id }, 1);
        std::iter::from_fn(|| g.poll_output())
            .find_map(|o| match o {
                GossipOut::Send { to, msg: GossipMsg::Event { payload, .. } } if to == c => Some(payload),
                _ => None,
            })
            .expect("the graft is answered")
    }

    fn sent(g: &mut Gossip) -> Vec<(NodeId, GossipMsg)> {
        std::iter::from_fn(|| g.poll_output())
            .filter_map(|o| match o {
                GossipOut::Send { to, msg } => Some((to, msg)),
                _ => None,
            })
            .collect()
    }

    /// A shuffle's answer comes back the way the walk went, from neighbour to neighbour: no node sends a `Shuffle`
    /// or a `ShuffleReply` to a node outside its active view (each such send is a link made only for it, kept for
    /// seconds: with a shuffle every 10 s per member, about two extra links at every member of a 100-member channel),
    /// and the walk's origin gets the end's sample. An answer whose way back broke is dropped and counted.
    #[test]
    fn a_shuffle_answer_goes_back_along_the_walk() {
        // A line: o - a - b - c; c also knows x and y (its passive view).
        let ids = [NodeId(1), NodeId(2), NodeId(3), NodeId(4)];
        let (o, a, b, c) = (ids[0], ids[1], ids[2], ids[3]);
        let mut g: HashMap<NodeId, Gossip> =
            ids.iter().map(|&n| (n, Gossip::new(n, GossipConfig::default(), n.0, 0))).collect();
        for w in ids.windows(2) {
            g.get_mut(&w[0]).unwrap().handle(w[1], GossipMsg::Neighbor { high: true }, 0);
            g.get_mut(&w[1]).unwrap().handle(w[0], GossipMsg::Neighbor { high: true }, 0);
        }
        let (x, y) = (NodeId(50), NodeId(51));
        g.get_mut(&c).unwrap().handle(b, GossipMsg::ShuffleReply { peers: vec![x, y], back: Vec::new() }, 0);
        for n in g.values_mut() {
            sent(n);
        }
        assert_eq!(g[&c].passive(), &[x, y]);
        // o's walk (what its timer sends to a neighbour).
        let mut queue =
            vec![(o, a, GossipMsg::Shuffle { origin: o, ttl: 6, peers: vec![o, NodeId(60)], back: Vec::new() })];
        let mut hops = Vec::new();
        while let Some((from, to, msg)) = queue.pop() {
            hops.push((from, to, matches!(msg, GossipMsg::ShuffleReply { .. })));
            let node = g.get_mut(&to).unwrap();
            node.handle(from, msg, 1);
            for (next, m) in sent(node) {
                assert!(node.active().contains(&next), "{to:?} sent {m:?} to {next:?}, no neighbour of it");
                queue.push((to, next, m));
            }
        }
        assert_eq!(
            hops,
            [(o, a, false), (a, b, false), (b, c, false), (c, b, true), (b, a, true), (a, o, true)],
            "out along the line and back"
        );
        assert!(g[&o].passive().contains(&x) && g[&o].passive().contains(&y), "{:?}", g[&o].passive());
        assert!(!g[&a].passive().contains(&x) && !g[&b].passive().contains(&x), "only the origin takes the sample");
        // The way back broken (b no longer a neighbour of a): the answer is dropped at a, not sent over a new link.
        let ga = g.get_mut(&a).unwrap();
        ga.handle(b, GossipMsg::Disconnect, 2);
        sent(ga);
        ga.handle(o, GossipMsg::ShuffleReply { peers: vec![x], back: vec![NodeId(7), b] }, 3);
        assert!(sent(ga).is_empty());
        assert_eq!(ga.counters().shuffle_replies_dropped, 1);
    }

    /// Views that disagree are mended: a member that takes another for a neighbour when the other does not would
    /// get neither its events nor its announcements (the simulation at 5,000 members found a survivor of the 30 %
    /// kill with one such link and nothing else, which missed 50 events without being told).
    #[test]
    fn a_summary_from_a_member_that_is_no_neighbour_is_answered_with_a_disconnect() {
        let (a, b, src) = (NodeId(1), NodeId(2), NodeId(9));
        // `a` takes `b` for a neighbour; `b` has never heard of `a`.
        let mut ga = Gossip::new(a, GossipConfig::default(), 3, 0);
        ga.join(b, 0);
        sent(&mut ga);
        let mut gb = Gossip::new(b, GossipConfig::default(), 5, 0);
        let summary = GossipMsg::IHave { ids: vec![EventId { source: src, seq: 4 }] };
        gb.handle(a, summary.clone(), 10);
        let out = sent(&mut gb);
        assert!(out.iter().any(|(to, m)| *to == a && matches!(m, GossipMsg::Disconnect)), "{out:?}");
        // `a` drops the link on the Disconnect.
        assert_eq!(ga.active(), &[b]);
        ga.handle(b, GossipMsg::Disconnect, 11);
        assert!(ga.active().is_empty());
        // A neighbour's summary is no reason to disconnect.
        let mut gc = Gossip::new(NodeId(3), GossipConfig::default(), 7, 0);
        gc.handle(a, GossipMsg::Join, 0);
        sent(&mut gc);
        gc.handle(a, summary, 10);
        assert!(!sent(&mut gc).iter().any(|(_, m)| matches!(m, GossipMsg::Disconnect)));
    }

    /// A member that grafts an event prunes the peer its source's previous event came from (its tree parent, which
    /// failed to bring this one in time), so that a stalled parent's backlog does not all arrive twice.
    #[test]
    fn a_graft_prunes_the_parent_that_failed() {
        let (me, parent, other, src) = (NodeId(1), NodeId(2), NodeId(3), NodeId(9));
        let cfg = GossipConfig::default();
        let mut g = Gossip::new(me, cfg.clone(), 3, 0);
        g.handle(parent, GossipMsg::Join, 0);
        g.handle(other, GossipMsg::Join, 0);
        g.handle(parent, GossipMsg::Event { id: EventId { source: src, seq: 1 }, hops: 1, payload: "1".into() }, 1);
        sent(&mut g);
        // The next event is announced by `other`, and `parent` does not bring it in time.
        g.handle(other, GossipMsg::IHave { ids: vec![EventId { source: src, seq: 2 }] }, 10);
        g.handle_timeout(10 + cfg.graft_after);
        let out = sent(&mut g);
        assert!(out.iter().any(|(to, m)| *to == other && matches!(m, GossipMsg::Graft { .. })), "{out:?}");
        assert!(out.iter().any(|(to, m)| *to == parent && matches!(m, GossipMsg::Prune { .. })), "{out:?}");
        assert_eq!(g.counters().grafts, 1);
        // The graft's answer, then the stalled parent's late copy: a duplicate, and a needless graft.
        let e2 = |p: &'static str| GossipMsg::Event { id: EventId { source: src, seq: 2 }, hops: 1, payload: p.into() };
        g.handle(other, e2("2"), 300);
        g.handle(parent, e2("2"), 900);
        assert_eq!((g.counters().duplicates, g.counters().late_grafts), (1, 1));
    }

    /// A stream whose announcements run ahead of its events (a slow tree parent): each event that arrives in order
    /// is progress and starts the loss timer again, so events that keep coming, each sooner than `loss_after` after
    /// the one before, are never reported lost, however long the gap stays open.
    #[test]
    fn in_order_events_behind_announcements_are_progress() {
        let cfg = GossipConfig { loss_after: 1_000, ..GossipConfig::default() };
        let mut g = Gossip::new(NodeId(1), cfg, 1, 0);
        for p in [2, 3] {
            g.handle(NodeId(p), GossipMsg::Neighbor { high: true }, 0);
        }
        let src = NodeId(9);
        let ev = |seq| GossipMsg::Event {
            id: EventId { source: src, seq },
            hops: 1,
            payload: bytes::Bytes::from_static(b"e"),
        };
        g.handle(NodeId(2), ev(1), 0);
        g.handle(NodeId(3), GossipMsg::IHave { ids: vec![EventId { source: src, seq: 20 }] }, 0);
        let (mut delivered, mut lost) = (Vec::new(), Vec::new());
        let mut now = 0;
        for seq in 2..=20 {
            now += 600;
            g.handle_timeout(now);
            g.handle(NodeId(2), ev(seq), now);
            while let Some(o) = g.poll_output() {
                match o {
                    GossipOut::Deliver { id, .. } => delivered.push(id.seq),
                    GossipOut::Lost { first, count, .. } => lost.push((first, count)),
                    _ => {}
                }
            }
        }
        assert_eq!(lost, vec![], "reported lost while its events kept coming");
        assert_eq!(delivered, (1..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_short_payload_is_kept_apart_from_the_buffer_it_was_read_from() {
        // A reader's 64 KiB buffer with one 100-byte event in it: keeping the event must not keep the buffer.
        let buf = bytes::Bytes::from(vec![7u8; 64 * 1024]);
        let within = |p: &bytes::Bytes| {
            (buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len()).contains(&(p.as_ptr() as usize))
        };
        let kept = kept_after_receiving(buf.slice(10..110));
        assert_eq!(&kept[..], &buf[10..110]);
        assert!(!within(&kept), "the kept payload still points into the read buffer");
        // A payload of 64 KiB or more fills most of its buffer: kept as it is, not copied.
        let big = bytes::Bytes::from(vec![9u8; 200 * 1024]);
        let kept = kept_after_receiving(big.slice(..100 * 1024));
        assert_eq!(kept.as_ptr(), big.as_ptr());
    }

    /// The index of gapped sources must name exactly the sources with a gap open, whatever arrives: the timers look
    /// at these only, and a source missing from it would never have its gap reported (nor its held events delivered).
    #[test]
    fn the_gapped_index_names_exactly_the_sources_with_a_gap_open() {
        let me = NodeId(100);
        let peers = [NodeId(1), NodeId(2), NodeId(3)];
        let cfg = GossipConfig { loss_after: 300, ..GossipConfig::default() };
        for seed in 1..20u64 {
            let mut g = Gossip::new(me, cfg.clone(), seed, 0);
            for p in peers {
                g.handle(p, GossipMsg::Neighbor { high: true }, 0);
            }
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut now = 0;
            for _ in 0..400 {
                now += next() % 40;
                let from = peers[(next() % 3) as usize];
                let id = EventId { source: NodeId(10 + next() % 5), seq: 1 + next() % 12 };
                match next() % 4 {
                    0 | 1 => {
                        g.handle(from, GossipMsg::Event { id, hops: 0, payload: bytes::Bytes::from_static(b"e") }, now)
                    }
                    2 => g.handle(from, GossipMsg::IHave { ids: vec![id] }, now),
                    _ => {
                        if g.poll_timeout() <= now {
                            g.handle_timeout(now);
                        }
                    }
                }
                while g.poll_output().is_some() {}
                let open: BTreeSet<NodeId> =
                    g.sources.iter().filter(|(_, s)| s.gap_since.is_some()).map(|(n, _)| *n).collect();
                assert_eq!(g.gapped, open, "seed {seed}");
                // Nothing is held ahead of a source that is not in the index.
                assert!(g.sources.iter().all(|(n, s)| !s.has_ahead() || g.gapped.contains(n)), "seed {seed}");
            }
            // Every gap ends (delivered or reported) once its time is up, through the index alone.
            now += 10 * cfg.loss_after + 10 * cfg.graft_after;
            for _ in 0..50 {
                g.handle_timeout(now);
                while g.poll_output().is_some() {}
                now += cfg.loss_after;
            }
            assert!(g.gapped.is_empty(), "seed {seed}: {:?} still gapped", g.gapped);
        }
    }
}
