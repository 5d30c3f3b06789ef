//! The routing table: every sink of the channel (remote, local, and those of nodes cut off for now) with its type
//! and content filters and where it lives, updated whenever membership changes (only the nodes that changed are
//! recomputed) and read without locks by sources.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kecho_proto::access::Roles;
use kecho_proto::membership::Peer as MemberPeer;
use kecho_proto::{Attrs, NodeId, Overflow, Role, TypeFilter, TypeIndex};

use super::sink::LocalSink;
use super::{ChannelInner, Channels};
use crate::clock::now;
use crate::filter::{ContentFilter, SinkEntry};
use crate::link::Peer;

/// Where a sink lives.
pub(super) enum Dest {
    /// On another node: index into `Routes::peers`.
    Remote(usize),
    /// On this node.
    Local(Arc<LocalSink>),
    /// On a node that left this node's view without saying goodbye (its link was lost, it was taken for gone, a
    /// view from another member no longer lists it...), until the given time: nothing is sent, but events it would
    /// have received are counted, and reported to it as missed if it comes back. With the instance of the channel
    /// there that the sinks were on: counts and replays are for that instance only.
    Ghost(NodeId, u64, Instant),
}

/// The nodes that left the view with sinks in the channel and without a goodbye of their own, remembered for loss
/// accounting (see `ChannelInner::rebuild_routes`), and the nodes whose own goodbye arrived.
#[derive(Default)]
pub(super) struct Ghosts {
    list: Vec<Ghost>,
    /// Nodes that said goodbye themselves, and when: their sinks leaving the view are no loss.
    farewells: IdMap<NodeId, Instant>,
}

/// A node that left the view while it had sinks in the channel.
struct Ghost {
    node: NodeId,
    /// The instance of the channel on the node that the sinks were on.
    instance: u64,
    until: Instant,
    sinks: Vec<GhostSink>,
}

/// A sink of a node that left the view, as it was then.
pub(super) struct GhostSink {
    /// As the node's part had it (its attributes are not read: a ghost is never offered to an OUT-filter).
    entry: Arc<SinkEntry>,
    types: Arc<TypeFilter>,
    overflow: Overflow,
    filter: Option<Arc<ContentFilter>>,
}

/// Hashes ids that are already random (node ids) or small and distinct (local ids) by folding them, which is all a
/// hash map of them needs.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

pub(super) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// One sink of the channel, for the submit path.
pub(super) struct RouteSink {
    pub(super) entry: Arc<SinkEntry>,
    /// The instance of the channel on the sink's node (`NodeSnapshot::instance`; this node's for a local sink).
    pub(super) instance: u64,
    pub(super) types: Arc<TypeFilter>,
    pub(super) overflow: Overflow,
    pub(super) filter: Option<Arc<ContentFilter>>,
    pub(super) dest: Dest,
}

/// Every sink of the channel (remote and local) and the links to their nodes; made anew (from parts kept per node,
/// see `RouteBook`) when membership changes and read without locks on the submit path.
#[derive(Default)]
pub(super) struct Routes {
    pub(super) sinks: Vec<RouteSink>,
    pub(super) peers: Vec<Arc<Peer>>,
    /// Per entry of `peers`: the instance of the channel on that node (`NodeSnapshot::instance`) whose sinks the
    /// table holds, so that a source numbers its events to a node that closed the channel and opened it again anew.
    pub(super) instances: Vec<u64>,
    /// Which of `sinks` accept each event type (see `Routes::accepting`).
    pub(super) by_type: TypeIndex,
    /// Some sink's content filter needs the CEL interpreter.
    pub(super) slow_filter: bool,
    /// Counts the tables built for this process (1 for the first), so that a source can tell a new one from one it
    /// has seen.
    pub(super) generation: u64,
    /// Every remote sink is in the table, with a link (`Dest::Remote`): built in full-mesh mode, or in tree mode
    /// while a local source has an OUT-filter (its own or one installed on the channel) and so sends to chosen sinks
    /// directly. Otherwise, in tree mode, the table holds only the sinks of the nodes with a Block sink (their events
    /// go directly, so they have a link): the others get every event through the overlay, so a node keeps neither
    /// link state nor table rows for the members it never sends to, and a membership change costs the table the
    /// nodes it sends to directly, not the whole channel (docs/SCALE.md). `RouteBook` keeps every member's sinks.
    pub(super) direct: bool,
}

impl Routes {
    /// Indexes the sinks by the types they accept; called once the table holds all of its sinks.
    pub(super) fn index_types(&mut self) {
        self.by_type = TypeIndex::build(self.sinks.iter().map(|r| &*r.types));
    }

    /// The index of every sink whose type filter accepts `ty`, in table order: through the index when it covers the
    /// table (one lookup of the type), comparing the type with each sink's filter otherwise.
    #[inline]
    pub(super) fn accepting<'a>(&'a self, ty: &'a str) -> Accepting<'a> {
        if self.by_type.len() != self.sinks.len() {
            Accepting::Scan(self.sinks.iter().enumerate(), ty)
        } else if self.by_type.accepts_everything() {
            // No sink lists types (the common case): every sink, in order, without looking anything up.
            Accepting::Every(0..self.sinks.len())
        } else {
            Accepting::Indexed(self.by_type.accepting(ty))
        }
    }
}

/// See `Routes::accepting`.
pub(super) enum Accepting<'a> {
    Every(std::ops::Range<usize>),
    Indexed(kecho_proto::Accepting<'a>),
    Scan(std::iter::Enumerate<std::slice::Iter<'a, RouteSink>>, &'a str),
}

impl Iterator for Accepting<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        match self {
            Accepting::Every(r) => r.next(),
            Accepting::Indexed(i) => i.next(),
            Accepting::Scan(sinks, ty) => {
                let ty: &str = ty;
                sinks.find(|(_, r)| r.types.accepts(ty)).map(|(i, _)| i)
            }
        }
    }
}

/// One remote node's sinks as routes, kept between membership changes (see `RouteBook`).
struct NodePart {
    /// What the part was built from: the node's snapshot version, when that snapshot arrived (the sinks' attribute
    /// age) and the instance of the channel there. The membership changes a node's address only with a newer
    /// snapshot (which it stores with the time it arrived), so these say whether the address changed too.
    version: u64,
    instance: u64,
    updated: Instant,
    /// The link to the node, present when it has sinks and the table sends to them directly (`Routes::direct`,
    /// or a Block sink among them).
    peer: Option<Arc<Peer>>,
    /// Built for a table whose every remote sink has a link.
    direct: bool,
    sinks: Vec<PartSink>,
}

/// A remote sink's route, without its place in a table.
struct PartSink {
    entry: Arc<SinkEntry>,
    types: Arc<TypeFilter>,
    overflow: Overflow,
    filter: Option<Arc<ContentFilter>>,
}

/// The remote part of the routing table, kept per node: a membership change recomputes the parts of the nodes whose
/// snapshot, address or link changed and reuses the others, so a join or leave costs the sinks of the node that
/// joined or left (filters looked up, entries and attributes copied once), and assembling the table the sources read
/// costs a copy of reference-counted pointers per sink.
#[derive(Default)]
pub(super) struct RouteBook {
    parts: IdMap<NodeId, NodePart>,
    /// The sinks of all parts.
    sinks: usize,
    /// The nodes whose part has a link.
    linked: IdMap<NodeId, ()>,
    /// The `direct` of the last update (the parts were built with it).
    direct: Option<bool>,
    /// Parts built since the channel opened (each a node's sinks derived from its snapshot), for tests and figures.
    built: u64,
}

impl RouteBook {
    /// Brings the parts up to date with `peers` (the members' snapshots). `direct`: every node with sinks gets a
    /// link (`Routes::direct`); otherwise only those with a Block sink. `changed`: the members added or changed since
    /// the last update, when known to be all of them (tree mode: `ChannelState::take_touched`); then only those, and
    /// the nodes whose part has a link, are looked at, not every member (unless `direct` changed). `link` gives the
    /// current link to a node, created if there is none (a part whose link was replaced is rebuilt); it is called
    /// only for the nodes that get one. `compile` gives a sink's content filter, or `Err` when it cannot be compiled
    /// here (that sink is left out: it gets nothing rather than what it did not ask for). Returns the sinks of the
    /// nodes that left `peers`, by node.
    pub(super) fn update(
        &mut self,
        peers: &BTreeMap<NodeId, MemberPeer>,
        direct: bool,
        changed: Option<&[NodeId]>,
        mut link: impl FnMut(NodeId, &str) -> Arc<Peer>,
        compile: impl Fn(&str) -> Result<Arc<ContentFilter>, ()>,
    ) -> Vec<(NodeId, u64, Vec<GhostSink>)> {
        match changed {
            Some(changed) if self.direct == Some(direct) => {
                for id in changed {
                    if let Some(p) = peers.get(id) {
                        self.refresh(*id, p, direct, &mut link, &compile);
                    }
                }
                // A link replaced since is not a membership change: the parts with one (few, in tree mode) are
                // checked each time.
                let linked: Vec<NodeId> = self.linked.keys().copied().collect();
                for id in linked {
                    if let Some(p) = peers.get(&id) {
                        self.refresh(id, p, direct, &mut link, &compile);
                    }
                }
            }
            _ => {
                for (id, p) in peers {
                    self.refresh(*id, p, direct, &mut link, &compile);
                }
            }
        }
        self.direct = Some(direct);
        // Every member has a part now, so more parts than members means some left.
        let mut left = Vec::new();
        if self.parts.len() > peers.len() {
            let gone: Vec<NodeId> = self.parts.keys().filter(|id| !peers.contains_key(id)).copied().collect();
            for id in gone {
                let Some(part) = self.parts.remove(&id) else { continue };
                self.sinks -= part.sinks.len();
                self.linked.remove(&id);
                let sinks: Vec<GhostSink> = part
                    .sinks
                    .into_iter()
                    .map(|s| GhostSink { entry: s.entry, types: s.types, overflow: s.overflow, filter: s.filter })
                    .collect();
                if !sinks.is_empty() {
                    left.push((id, part.instance, sinks));
                }
            }
        }
        left
    }

    /// Brings node `id`'s part up to date with its snapshot `p` and its link, if either changed.
    fn refresh(
        &mut self,
        id: NodeId,
        p: &MemberPeer,
        direct: bool,
        link: &mut impl FnMut(NodeId, &str) -> Arc<Peer>,
        compile: &impl Fn(&str) -> Result<Arc<ContentFilter>, ()>,
    ) {
        if let Some(part) = self.parts.get(&id) {
            let same = part.version == p.snapshot.version
                && part.instance == p.snapshot.instance
                && part.updated == p.updated
                && part.direct == direct;
            // A link that was dropped and made anew is another `Peer`: the part must send to the new one.
            if same && part.peer.as_ref().is_none_or(|l| Arc::ptr_eq(l, &link(id, &p.addr))) {
                return;
            }
        }
        let part = NodePart::build(id, p, direct, link, compile);
        self.built += 1;
        self.sinks += part.sinks.len();
        if part.peer.is_some() {
            self.linked.insert(id, ());
        } else {
            self.linked.remove(&id);
        }
        if let Some(old) = self.parts.insert(id, part) {
            self.sinks -= old.sinks.len();
        }
    }

    /// Appends the remote sinks that are sent to directly (those of the nodes with a link: every node with sinks
    /// when `routes.direct`) to `routes`, node by node in `peers` order, and returns how many remote sinks there are
    /// in all (the others get events through the overlay).
    pub(super) fn assemble(&self, peers: &BTreeMap<NodeId, MemberPeer>, routes: &mut Routes) -> usize {
        if !routes.direct {
            // Only the few nodes with a Block sink: no pass over the members.
            let mut linked: Vec<NodeId> = self.linked.keys().copied().collect();
            linked.sort_unstable();
            for id in linked {
                if let Some(part) = self.parts.get(&id) {
                    part.append_to(routes);
                }
            }
            return self.sinks;
        }
        for id in peers.keys() {
            if let Some(part) = self.parts.get(id) {
                part.append_to(routes);
            }
        }
        self.sinks
    }

    /// Every remote sink (whether the table holds it or the overlay serves it) with its node and attributes, node
    /// by node in `peers` order.
    pub(super) fn sink_attrs(&self, peers: &BTreeMap<NodeId, MemberPeer>) -> Vec<(NodeId, Attrs)> {
        let parts = peers.keys().filter_map(|id| self.parts.get(id));
        parts.flat_map(|p| p.sinks.iter().map(|s| (s.entry.node, s.entry.attrs.clone()))).collect()
    }

    /// Parts built so far.
    #[cfg(test)]
    fn built(&self) -> u64 {
        self.built
    }
}

impl NodePart {
    /// Appends the part's sinks to `routes` with their link, if the part has one (a part without sinks has none).
    fn append_to(&self, routes: &mut Routes) {
        let Some(peer) = &self.peer else { return };
        routes.peers.push(peer.clone());
        routes.instances.push(self.instance);
        let index = routes.peers.len() - 1;
        routes.sinks.extend(self.sinks.iter().map(|s| RouteSink {
            entry: s.entry.clone(),
            instance: self.instance,
            types: s.types.clone(),
            overflow: s.overflow,
            filter: s.filter.clone(),
            dest: Dest::Remote(index),
        }));
    }

    fn build(
        id: NodeId,
        p: &MemberPeer,
        direct: bool,
        link: &mut impl FnMut(NodeId, &str) -> Arc<Peer>,
        compile: &impl Fn(&str) -> Result<Arc<ContentFilter>, ()>,
    ) -> Self {
        let mut sinks = Vec::new();
        for m in &p.snapshot.members {
            let Role::Sink { types, overflow, filter } = &m.role else { continue };
            let filter = match filter {
                None => None,
                Some(expr) => match compile(expr) {
                    Ok(f) => Some(f),
                    Err(()) => continue,
                },
            };
            sinks.push(PartSink {
                entry: Arc::new(SinkEntry {
                    node: id,
                    id: m.id,
                    local: false,
                    attrs: m.attrs.clone(),
                    updated: p.updated,
                }),
                types: shared_types(types),
                overflow: *overflow,
                filter,
            });
        }
        let linked = direct || sinks.iter().any(|s| s.overflow == Overflow::Block);
        let peer = (linked && !sinks.is_empty()).then(|| link(id, &p.addr));
        NodePart { version: p.snapshot.version, instance: p.snapshot.instance, updated: p.updated, peer, direct, sinks }
    }
}

/// A sink's type filter as the routing table holds it: the filter of every type (most sinks') is one shared value,
/// not an allocation per remote sink in every member.
fn shared_types(types: &TypeFilter) -> Arc<TypeFilter> {
    static ALL: std::sync::LazyLock<Arc<TypeFilter>> = std::sync::LazyLock::new(|| Arc::new(TypeFilter::All));
    match types {
        TypeFilter::All => ALL.clone(),
        only => Arc::new(only.clone()),
    }
}

/// The generation of the next routing table.
static ROUTES_BUILT: AtomicU64 = AtomicU64::new(1);

impl ChannelInner {
    /// The routing table must give every remote sink a link (`Routes::direct`): in full-mesh mode, or while a local
    /// source has an OUT-filter or one is installed on the channel (such sources send to the sinks they choose
    /// directly, in tree mode too).
    pub(super) fn routes_direct(&self) -> bool {
        !self.tree_on() || self.out_sources.load(Ordering::Acquire) > 0 || self.out_default.read().is_some()
    }

    /// The attributes of every sink present (remote, then local) with its node; those of nodes cut off are left
    /// out. Remote sinks as of the last routing-table update (the book holds those the table leaves to the overlay).
    pub(super) fn sink_attrs(&self) -> Vec<(NodeId, Attrs)> {
        let mut all = {
            // The order `rebuild_routes` takes them in.
            let st = self.state.lock();
            let book = self.book.lock();
            book.sink_attrs(st.peers())
        };
        let Some(node) = self.node.upgrade() else { return all };
        all.extend(self.local_sinks.read().iter().map(|s| (node.id, s.attrs.lock().clone())));
        all
    }

    /// The link to node `id` is gone: its members leave the view (its sinks become ghosts, see `rebuild_routes`).
    pub(crate) fn peer_lost(self: &Arc<Self>, id: NodeId) {
        if self.tree_peer_lost(id) {
            return;
        }
        self.state.lock().handle_peer_lost(id, now());
        self.flush();
    }

    /// Node `from`'s own goodbye (a `Snapshot` with the left flag, from the node itself) is about to be handled: its
    /// sinks leave the view by their own word, not as ghosts; a ghost made of it before (from a goodbye relayed on
    /// its behalf, or a lost link) is dropped.
    pub(super) fn farewell(self: &Arc<Self>, from: NodeId) {
        let Some(node) = self.node.upgrade() else { return };
        let had_ghost = {
            let mut g = self.ghosts.lock();
            let at = now();
            let keep = node.cfg.gap_memory;
            g.farewells.retain(|_, t| at.saturating_duration_since(*t) < keep);
            g.farewells.insert(from, at);
            let before = g.list.len();
            g.list.retain(|x| x.node != from);
            g.list.len() != before
        };
        if had_ghost {
            self.rebuild_routes(&node);
        }
    }

    /// Brings the routing table up to date with membership, the cut-off nodes and the local sinks. Only the nodes
    /// whose snapshot, address or link changed since the last update have their routes recomputed (`RouteBook`);
    /// the others' are reused as they were, so a join or a leave costs the joiner's or leaver's sinks, not the whole
    /// channel's.
    ///
    /// Rebuilds are serialised (`rebuilding`): the table, the sink count and the view each rebuild stores are then
    /// those of the latest membership it read, never an older rebuild's finishing late. The caller holds no lock.
    pub(super) fn rebuild_routes(self: &Arc<Self>, node: &Arc<Channels>) {
        self.update_routes(node, None);
    }

    /// `rebuild_routes` after a membership change; `changed`: the members added or changed since the last update,
    /// when known to be all of them (see `RouteBook::update`).
    pub(super) fn update_routes(self: &Arc<Self>, node: &Arc<Channels>, changed: Option<Vec<NodeId>>) {
        let _serial = self.rebuilding.lock();
        let st = self.state.lock();
        let view: Vec<NodeId> = st.peers().keys().copied().collect();
        let instances: Vec<u64> = st.peers().values().map(|p| p.snapshot.instance).collect();
        let direct = self.routes_direct();
        let mut routes =
            Routes { generation: ROUTES_BUILT.fetch_add(1, Ordering::Relaxed), direct, ..Routes::default() };
        let (remote_sinks, left) = {
            let mut book = self.book.lock();
            let left = book.update(
                st.peers(),
                direct,
                changed.as_deref(),
                |id, addr| node.peer(id, addr),
                |expr| {
                    node.content_filter(expr).map_err(|e| {
                        // The sink compiled it with the same rules, so this means a newer peer: send it nothing
                        // rather than what it did not ask for.
                        tracing::warn!(channel = %self.name, "a remote sink's filter does not compile here: {e}");
                    })
                },
            );
            (book.assemble(st.peers(), &mut routes), left)
        };
        let at = now();
        {
            let mut ghosts = self.ghosts.lock();
            let Ghosts { list, farewells } = &mut *ghosts;
            // Whatever way a node with sinks left the view (a lost link, taken for gone, a goodbye relayed on its
            // behalf, a view from another member without it), unless by its own goodbye: its sinks are ghosts, and
            // what they miss is counted and reported to them (replayed from a source's history) should it come back.
            for (id, instance, sinks) in left {
                if farewells.remove(&id).is_none() && !list.iter().any(|g| g.node == id) {
                    tracing::debug!(channel = %self.name, node = %id, "a node with sinks left the view unsaid");
                    list.push(Ghost { node: id, instance, until: at + node.cfg.gap_memory, sinks });
                }
            }
            // A node back in the view is no longer a ghost, and a goodbye of its before does not cover its next exit.
            farewells.retain(|id, _| !st.peers().contains_key(id));
            list.retain(|g| g.until > at && !st.peers().contains_key(&g.node));
            for g in list.iter() {
                for s in &g.sinks {
                    routes.sinks.push(RouteSink {
                        entry: s.entry.clone(),
                        types: s.types.clone(),
                        // Kept: in tree mode a source counts only its Block sinks' events (the overlay accounts
                        // for the others').
                        overflow: s.overflow,
                        filter: s.filter.clone(),
                        instance: g.instance,
                        dest: Dest::Ghost(g.node, g.instance, g.until),
                    });
                }
            }
        }
        // Under a policy that requires a credential for sources, only nodes holding the right may send events.
        let guarded = st.policy().is_some_and(|p| p.require.contains(Roles::SOURCE));
        if guarded {
            let senders = st.peers().iter().filter(|(_, p)| p.rights.contains(Roles::SOURCE)).map(|(n, _)| *n);
            *self.senders.write() = Arc::new(senders.collect());
        }
        self.guard_sources.store(guarded, Ordering::Release);
        drop(st);
        let locals = self.local_sinks.read().clone();
        for s in locals.iter() {
            routes.sinks.push(RouteSink {
                entry: Arc::new(SinkEntry {
                    node: node.id,
                    id: s.id,
                    local: true,
                    attrs: s.attrs.lock().clone(),
                    updated: at,
                }),
                instance: self.instance,
                types: Arc::new(s.types.clone()),
                overflow: s.queue.overflow(),
                filter: s.filter.clone(),
                dest: Dest::Local(s.clone()),
            });
        }
        routes.slow_filter = routes.sinks.iter().any(|r| r.filter.as_ref().is_some_and(|f| !f.is_fast()));
        routes.index_types();
        *self.routes.write() = Arc::new(routes);
        self.routing_gen.fetch_add(1, Ordering::AcqRel);
        self.sinks_present.send_replace(remote_sinks + locals.len());
        self.view_changed(&view, &instances);
        drop(_serial);
        // A node back in the table may have missed events of a local source that submits nothing now.
        self.wake_lenders();
    }

    /// A link to node `id` came up: what its sinks missed while cut off can go to it now.
    pub(crate) fn peer_up(self: &Arc<Self>, id: NodeId) {
        self.tree_link_up(id);
        self.wake_lenders();
    }
}

#[cfg(test)]
mod tests {
    //! The incremental table against a derivation from scratch: after any sequence of joins, leaves, snapshot
    //! updates, refreshes, address changes and replaced links, the table holds exactly the sinks the members'
    //! snapshots list, each pointing at the node's current link, and an update recomputes only the nodes it touched.

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kecho_proto::access::Roles;
    use kecho_proto::membership::Peer as MemberPeer;
    use kecho_proto::{Attrs, LocalId, MemberInfo, NodeId, NodeSnapshot, Overflow, Role, TypeFilter, Value};
    use proptest::prelude::*;

    use super::{Dest, RouteBook, Routes};
    use crate::filter::ContentFilter;
    use crate::link::Peer;

    #[derive(Clone, Debug)]
    enum Op {
        /// A node joins (or rejoins) with these sinks (type filter index, overflow index, filter) and sources.
        Join { node: u8, sinks: Vec<(u8, u8, u8)>, sources: u8 },
        /// A node publishes a new snapshot: one sink more or one fewer, and new attributes.
        Update { node: u8, add: bool, attr: i64 },
        /// The same snapshot arrives again later (its attribute age changes, nothing else).
        Refresh { node: u8 },
        /// A node is now reached at another address (with a newer snapshot: the membership changes it only so).
        Moved { node: u8 },
        /// The link to a node was dropped and made anew.
        Relink { node: u8 },
        /// A node leaves.
        Leave { node: u8 },
        /// A local source's OUT-filter comes or goes in tree mode: every remote sink needs a link, or only the
        /// Block sinks do (`Routes::direct`).
        Flip,
    }

    fn op() -> impl Strategy<Value = Op> {
        let sink = (0u8..3, 0u8..3, 0u8..3);
        prop_oneof![
            3 => (0u8..12, prop::collection::vec(sink, 0..4), 0u8..2)
                .prop_map(|(node, sinks, sources)| Op::Join { node, sinks, sources }),
            3 => (0u8..12, any::<bool>(), any::<i64>()).prop_map(|(node, add, attr)| Op::Update { node, add, attr }),
            1 => (0u8..12).prop_map(|node| Op::Refresh { node }),
            1 => (0u8..12).prop_map(|node| Op::Moved { node }),
            1 => (0u8..12).prop_map(|node| Op::Relink { node }),
            2 => (0u8..12).prop_map(|node| Op::Leave { node }),
            1 => Just(Op::Flip),
        ]
    }

    /// The world the table is derived from: the members' snapshots and the node's links.
    struct World {
        peers: BTreeMap<NodeId, MemberPeer>,
        links: BTreeMap<NodeId, Arc<Peer>>,
        t0: Instant,
        tick: u64,
    }

    fn node_id(n: u8) -> NodeId {
        NodeId(0x9e37_79b9_0000_0000 | u64::from(n))
    }

    fn sink_info(id: u32, (ty, overflow, filter): (u8, u8, u8), attr: i64) -> MemberInfo {
        let types = match ty {
            0 => TypeFilter::All,
            1 => TypeFilter::Only(vec!["a".into()]),
            _ => TypeFilter::Only(vec!["a".into(), "b".into()]),
        };
        let overflow = [Overflow::Block, Overflow::DropOldest, Overflow::DropNewest][usize::from(overflow % 3)];
        // "x > 1" compiles (with the `cel` feature), the other never does: such a sink must be left out.
        let filter = match filter {
            0 => None,
            1 => Some("x > 1".to_owned()),
            _ => Some("this does not ( compile".to_owned()),
        };
        let mut attrs = Attrs::new();
        attrs.set("n".to_owned(), Value::Int(attr));
        MemberInfo { id: LocalId(id), role: Role::Sink { types, overflow, filter }, attrs }
    }

    impl World {
        fn now(&mut self) -> Instant {
            self.tick += 1;
            self.t0 + Duration::from_millis(self.tick)
        }

        fn link(&mut self, id: NodeId, addr: &str) -> Arc<Peer> {
            self.links.entry(id).or_insert_with(|| Arc::new(Peer::new(id, addr.to_owned(), 1 << 16))).clone()
        }

        /// Applies `op`; returns the node it touched if it changed anything the routes depend on.
        fn apply(&mut self, op: &Op) -> Option<NodeId> {
            let now = self.now();
            match op.clone() {
                Op::Join { node, sinks, sources } => {
                    let id = node_id(node);
                    let mut members: Vec<MemberInfo> =
                        sinks.iter().enumerate().map(|(i, s)| sink_info(i as u32 + 1, *s, i as i64)).collect();
                    members.extend((0..sources).map(|i| MemberInfo {
                        id: LocalId(100 + u32::from(i)),
                        role: Role::Source,
                        attrs: Attrs::new(),
                    }));
                    let version = self.peers.get(&id).map_or(1, |p| p.snapshot.version + 1);
                    let snapshot = NodeSnapshot { version, instance: 0, members, token: None };
                    let addr = format!("10.0.0.{node}:7000");
                    self.peers.insert(id, MemberPeer { addr, snapshot, updated: now, rights: Roles::ALL });
                    Some(id)
                }
                Op::Update { node, add, attr } => {
                    let p = self.peers.get_mut(&node_id(node))?;
                    p.snapshot.version += 1;
                    p.updated = now;
                    if add {
                        let next = p.snapshot.members.iter().map(|m| m.id.0).max().unwrap_or(0) + 1;
                        p.snapshot.members.push(sink_info(next, (attr as u8, attr as u8 / 3, attr as u8 / 9), attr));
                    } else if let Some(i) = p.snapshot.members.iter().position(|m| matches!(m.role, Role::Sink { .. }))
                    {
                        p.snapshot.members.remove(i);
                    }
                    for m in &mut p.snapshot.members {
                        m.attrs.set("n".to_owned(), Value::Int(attr));
                    }
                    Some(node_id(node))
                }
                Op::Refresh { node } => {
                    self.peers.get_mut(&node_id(node))?.updated = now;
                    Some(node_id(node))
                }
                Op::Moved { node } => {
                    // As the membership has it: an address comes with a newer snapshot, stored when it arrived.
                    let p = self.peers.get_mut(&node_id(node))?;
                    p.addr = format!("10.1.0.{node}:{}", 7000 + self.tick);
                    p.snapshot.version += 1;
                    p.updated = now;
                    Some(node_id(node))
                }
                Op::Relink { node } => {
                    let id = node_id(node);
                    let addr = self.links.remove(&id)?.addr.lock().clone();
                    self.link(id, &addr);
                    self.peers.contains_key(&id).then_some(id)
                }
                Op::Leave { node } => self.peers.remove(&node_id(node)).map(|_| node_id(node)),
                Op::Flip => None,
            }
        }

        /// Every remote sink as the members' snapshots say they are, derived from scratch, with its link. `direct`:
        /// every node with sinks has a link; otherwise (tree mode) only those with a Block sink (that compiles), and
        /// the table holds only the sinks with a link.
        fn expected(&self, direct: bool) -> Vec<Row> {
            let mut rows = Vec::new();
            for (id, p) in &self.peers {
                let first = rows.len();
                for m in &p.snapshot.members {
                    let Role::Sink { types, overflow, filter } = &m.role else { continue };
                    let filter = match filter {
                        None => false,
                        Some(expr) if ContentFilter::compile(expr).is_ok() => true,
                        Some(_) => continue,
                    };
                    let link = self.links.get(id).map(Arc::as_ptr);
                    rows.push((*id, m.id, types.clone(), *overflow, filter, m.attrs.clone(), p.updated, link));
                }
                if !direct && !rows[first..].iter().any(|r| r.3 == Overflow::Block) {
                    for r in &mut rows[first..] {
                        r.7 = None;
                    }
                }
            }
            rows
        }
    }

    type Row = (NodeId, LocalId, TypeFilter, Overflow, bool, Attrs, Instant, Option<*const Peer>);

    fn table_rows(routes: &Routes) -> Vec<Row> {
        routes
            .sinks
            .iter()
            .map(|r| {
                let peer = match r.dest {
                    Dest::Remote(i) => Some(&routes.peers[i]),
                    _ => panic!("only remote sinks are assembled"),
                };
                assert!(peer.is_none_or(|p| p.id == r.entry.node), "a sink points at another node's link");
                (
                    r.entry.node,
                    r.entry.id,
                    (*r.types).clone(),
                    r.overflow,
                    r.filter.is_some(),
                    r.entry.attrs.clone(),
                    r.entry.updated,
                    peer.map(Arc::as_ptr),
                )
            })
            .collect()
    }

    /// Applies `ops` one by one, updating the book after each: `hinted`, with the members each op changed (as the
    /// membership names them in tree mode), else by a pass over every member; `direct` at the start (`Op::Flip`
    /// turns it).
    fn check(ops: &[Op], mut direct: bool, hinted: bool) {
        let mut world = World { peers: BTreeMap::new(), links: BTreeMap::new(), t0: Instant::now(), tick: 0 };
        let mut book = RouteBook::default();
        let compile = |expr: &str| ContentFilter::compile(expr).map(Arc::new).map_err(|_| ());
        for op in ops {
            let touched = world.apply(op);
            if matches!(op, Op::Flip) {
                direct = !direct;
            }
            // What the membership would name: members added or whose snapshot changed (a relink and a leave are
            // not such changes).
            let changed: Vec<NodeId> = match op {
                Op::Relink { .. } | Op::Leave { .. } | Op::Flip => Vec::new(),
                _ => touched.into_iter().collect(),
            };
            let before = book.built();
            let links = std::mem::take(&mut world.links);
            let links = std::cell::RefCell::new(links);
            book.update(
                &world.peers,
                direct,
                hinted.then_some(&changed[..]),
                |id, addr| {
                    links
                        .borrow_mut()
                        .entry(id)
                        .or_insert_with(|| Arc::new(Peer::new(id, addr.to_owned(), 1 << 16)))
                        .clone()
                },
                compile,
            );
            world.links = links.into_inner();
            let mut routes = Routes { direct, ..Routes::default() };
            let count = book.assemble(&world.peers, &mut routes);
            let got = table_rows(&routes);
            let all = world.expected(direct);
            let linked: Vec<Row> = all.iter().filter(|r| r.7.is_some()).cloned().collect();
            assert_eq!(got, linked, "after {op:?}");
            assert_eq!(count, all.len(), "after {op:?}");
            // The book still knows every sink, those the table leaves to the overlay too.
            let attrs: Vec<(NodeId, Attrs)> = all.iter().map(|r| (r.0, r.5.clone())).collect();
            assert_eq!(book.sink_attrs(&world.peers), attrs, "after {op:?}");
            // The sinks a source finds for a type, before the table is indexed (by comparing) and after (through the
            // index), are those whose type filter accepts it, in table order.
            let scan = |routes: &Routes, ty: &str| -> Vec<usize> {
                routes.sinks.iter().enumerate().filter(|(_, r)| r.types.accepts(ty)).map(|(i, _)| i).collect()
            };
            for indexed in [false, true] {
                if indexed {
                    routes.index_types();
                }
                for ty in ["a", "b", "c"] {
                    assert_eq!(routes.accepting(ty).collect::<Vec<_>>(), scan(&routes, ty), "{ty} after {op:?}");
                }
            }
            // Every peer in the table has a sink, and each appears once.
            let mut ids: Vec<NodeId> = routes.peers.iter().map(|p| p.id).collect();
            ids.dedup();
            assert_eq!(ids.len(), routes.peers.len());
            // Incremental: only the touched node (if still a member) was recomputed, unless `direct` turned.
            if !matches!(op, Op::Flip) {
                let rebuilt = book.built() - before;
                let allowed = u64::from(touched.is_some_and(|id| world.peers.contains_key(&id)));
                assert!(rebuilt <= allowed, "{rebuilt} parts rebuilt after {op:?}, at most {allowed} expected");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn incremental_table_equals_a_full_derivation(
            ops in prop::collection::vec(op(), 1..60),
            direct: bool,
            hinted: bool,
        ) {
            check(&ops, direct, hinted);
        }
    }

    #[test]
    fn a_join_recomputes_the_joiner_only() {
        let mut ops: Vec<Op> = (0..10).map(|n| Op::Join { node: n, sinks: vec![(0, 1, 0); 3], sources: 1 }).collect();
        ops.push(Op::Update { node: 3, add: true, attr: 7 });
        ops.push(Op::Leave { node: 4 });
        ops.push(Op::Relink { node: 5 });
        for hinted in [false, true] {
            check(&ops, true, hinted);
            check(&ops, false, hinted);
        }
    }
}
