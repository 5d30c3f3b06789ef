//! The routing table: every sink of the channel (remote, local, and those of nodes cut off for now) with its type
//! and content filters and where it lives, rebuilt whenever membership changes and read without locks by sources.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kecho_proto::access::Roles;
use kecho_proto::{Attrs, LocalId, NodeId, Overflow, Role, TypeFilter};

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
    /// On a node cut off from the channel (its link was lost) until the given time: nothing is sent, but events it
    /// would have received are counted, and reported to it as missed if it comes back.
    Ghost(NodeId, Instant),
}

/// A node whose link was lost while it had sinks in the channel, remembered for loss accounting.
pub(super) struct Ghost {
    node: NodeId,
    until: Instant,
    sinks: Vec<GhostSink>,
}

/// A sink of a cut-off node, as it was when the node was lost.
struct GhostSink {
    id: LocalId,
    types: TypeFilter,
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
    pub(super) types: TypeFilter,
    pub(super) overflow: Overflow,
    pub(super) filter: Option<Arc<ContentFilter>>,
    pub(super) dest: Dest,
}

/// Every sink of the channel (remote and local) and the links to their nodes; rebuilt when membership changes and
/// read without locks on the submit path.
#[derive(Default)]
pub(super) struct Routes {
    pub(super) sinks: Vec<RouteSink>,
    pub(super) peers: Vec<Arc<Peer>>,
    /// Some sink's content filter needs the CEL interpreter.
    pub(super) slow_filter: bool,
    /// Counts the tables built for this process (1 for the first), so that a source can tell a new one from one it
    /// has seen.
    pub(super) generation: u64,
}

/// The generation of the next routing table.
static ROUTES_BUILT: AtomicU64 = AtomicU64::new(1);

impl ChannelInner {
    /// The link to node `id` is gone: its members leave the view, and its sinks are remembered as cut off.
    pub(crate) fn peer_lost(self: &Arc<Self>, id: NodeId) {
        let mut st = self.state.lock();
        if let (Some(p), Some(node)) = (st.peers().get(&id), self.node.upgrade()) {
            // Remember its sinks: events they would have got while it is cut off are counted and reported to it as
            // missed should it come back.
            let sinks: Vec<_> = p
                .snapshot
                .members
                .iter()
                .filter_map(|m| match &m.role {
                    Role::Sink { types, filter, .. } => {
                        let filter = match filter {
                            None => None,
                            Some(expr) => Some(node.content_filter(expr).ok()?),
                        };
                        Some(GhostSink { id: m.id, types: types.clone(), filter })
                    }
                    Role::Source => None,
                })
                .collect();
            if !sinks.is_empty() {
                let until = now() + node.cfg.gap_memory;
                let mut ghosts = self.ghosts.lock();
                ghosts.retain(|g| g.node != id);
                ghosts.push(Ghost { node: id, until, sinks });
            }
        }
        st.handle_peer_lost(id, now());
        drop(st);
        self.flush();
    }

    /// Builds the routing table anew from membership, the cut-off nodes and the local sinks.
    pub(super) fn rebuild_routes(self: &Arc<Self>, node: &Arc<Channels>) {
        let st = self.state.lock();
        let view: Vec<(NodeId, String)> = st.peers().iter().map(|(id, p)| (*id, p.addr.clone())).collect();
        let mut routes = Routes { generation: ROUTES_BUILT.fetch_add(1, Ordering::Relaxed), ..Routes::default() };
        let mut remote_sinks = 0;
        for (id, p) in st.peers() {
            let mut peer_index = None;
            for m in &p.snapshot.members {
                let Role::Sink { types, overflow, filter } = &m.role else { continue };
                let filter = match filter {
                    None => None,
                    Some(expr) => match node.content_filter(expr) {
                        Ok(f) => Some(f),
                        Err(e) => {
                            // The sink compiled it with the same rules, so this means a newer peer: send it nothing
                            // rather than what it did not ask for.
                            tracing::warn!(channel = %self.name, "a remote sink's filter does not compile here: {e}");
                            continue;
                        }
                    },
                };
                let index = *peer_index.get_or_insert_with(|| {
                    routes.peers.push(node.peer(*id, &p.addr));
                    routes.peers.len() - 1
                });
                remote_sinks += 1;
                routes.sinks.push(RouteSink {
                    entry: Arc::new(SinkEntry {
                        node: *id,
                        id: m.id,
                        local: false,
                        attrs: m.attrs.clone(),
                        updated: p.updated,
                    }),
                    types: types.clone(),
                    overflow: *overflow,
                    filter,
                    dest: Dest::Remote(index),
                });
            }
        }
        let at = now();
        {
            let mut ghosts = self.ghosts.lock();
            ghosts.retain(|g| g.until > at && !st.peers().contains_key(&g.node));
            for g in ghosts.iter() {
                for GhostSink { id, types, filter } in &g.sinks {
                    routes.sinks.push(RouteSink {
                        entry: Arc::new(SinkEntry {
                            node: g.node,
                            id: *id,
                            local: false,
                            attrs: Attrs::new(),
                            updated: at,
                        }),
                        types: types.clone(),
                        overflow: Overflow::DropNewest,
                        filter: filter.clone(),
                        dest: Dest::Ghost(g.node, g.until),
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
                types: s.types.clone(),
                overflow: s.queue.overflow(),
                filter: s.filter.clone(),
                dest: Dest::Local(s.clone()),
            });
        }
        routes.slow_filter = routes.sinks.iter().any(|r| r.filter.as_ref().is_some_and(|f| !f.is_fast()));
        *self.routes.write() = Arc::new(routes);
        self.routing_gen.fetch_add(1, Ordering::AcqRel);
        self.sinks_present.send_replace(remote_sinks + locals.len());
        self.view_changed(&view);
    }
}
