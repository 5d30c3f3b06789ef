//! Channels, sources and sinks.
//!
//! A channel's membership is decided by its [`ChannelState`] (the sans-IO core); this module executes its outputs and
//! keeps a routing table derived from it, which the submit path reads without touching the state machine.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::Stream;
use kecho_proto::access::Roles;
use kecho_proto::codec::{encode_event, encode_routed, encode_targets, event_frame_len, EventMsg};
use kecho_proto::membership::{ChannelState, OpenFailure, OpenMode, Output, RegistryUnreachable};
use kecho_proto::{Attrs, ChannelId, LocalId, MemberInfo, Message, NodeId, Overflow, Role, TypeFilter, Value};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};

use crate::error::{Error, Result};
use crate::filter::{
    ContentFilter, EventView, FilterContext, InDecision, InEvent, InFilter, LocalSinks, OutFilter, SinkEntry, SinkView,
};
use crate::link::{Peer, COPY_BELOW};
use crate::node::{now, NodeGuard, NodeInner};
use crate::queue::{ChunkBuf, Event, Offer, RecvError, SinkQueue, SourceGate, SourceKey, TryRecvError};

/// Size of a source's encoding chunk (larger frames get a chunk of their own size).
const ENCODE_CHUNK: usize = 64 * 1024;
use crate::wasm::{FilterFault, WasmFilter, WasmIn, WasmLimits, WasmOut};
use kecho_proto::codec::FilterKind;

#[derive(Clone, Debug, PartialEq)]
enum Status {
    Opening,
    Ready,
    Failed(OpenFailure),
    Closed,
}

/// Per-channel counters, as seen by this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Events submitted by local sources.
    pub submitted: u64,
    /// Event frames queued to other nodes (one per destination node per event).
    pub sent: u64,
    /// Bytes of those frames.
    pub bytes_sent: u64,
    /// Events that arrived from other nodes or from local sources for local sinks.
    pub received: u64,
    /// Events discarded here: at a full local sink queue, or at a full link to another node.
    pub dropped: u64,
    /// Events discarded on purpose: by this node's IN-filter, or submitted when no sink was chosen.
    pub filtered: u64,
    /// Events meant for local sinks that never arrived: dropped at the sender's full link, lost in transit when a
    /// link broke, or submitted while this node was cut off from their source. Each was reported to the sinks as a gap
    /// ([`RecvError::Lagged`]).
    pub missed: u64,
    /// Times this node published its members' snapshot (joins, leaves and coalesced attribute updates).
    pub published: u64,
    /// Refusals under the channel's access policy: nodes this node refused or dropped from its view, and events that
    /// arrived from a node holding no source right.
    pub denied: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    sent: AtomicU64,
    bytes_sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    filtered: AtomicU64,
    missed: AtomicU64,
    published: AtomicU64,
    denied: AtomicU64,
}

/// Where a sink lives.
enum Dest {
    /// On another node: index into `Routes::peers`.
    Remote(usize),
    /// On this node.
    Local(Arc<LocalSink>),
    /// On a node cut off from the channel (its link was lost) until the given time: nothing is sent, but events it
    /// would have received are counted, and reported to it as missed if it comes back.
    Ghost(NodeId, Instant),
}

/// A node whose link was lost while it had sinks in the channel, remembered for loss accounting.
struct Ghost {
    node: NodeId,
    until: Instant,
    sinks: Vec<(LocalId, TypeFilter, Option<Arc<ContentFilter>>)>,
}

/// Hashes ids that are already random (node ids) or small and distinct (local ids) by folding them, which is all a
/// hash map of them needs.
#[derive(Default)]
struct IdHasher(u64);

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

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Loss accounting at a source, per destination node: how many of its events were queued to that node, and what the
/// node was last told about the others (see `Message::Routed`).
#[derive(Default)]
struct SendTrack {
    routed: u64,
    /// The `skipped` value last queued to the node, with the peer object and its epoch at the time: a new `Peer`, or
    /// a new epoch of the same one, means queued frames were lost with a broken link, so the node must be told again.
    told: Option<(u64, usize, u64)>,
}

/// Loss accounting at a receiver, per remote source.
#[derive(Default)]
struct RecvTrack {
    skipped: u64,
    /// The per-node number (`seq - skipped`) of the last event that arrived; 0 before the first.
    last: u64,
}

impl RecvTrack {
    /// Event `seq` of the source arrived: returns how many events meant for this node went missing before it.
    fn arrived(&mut self, seq: u64) -> u64 {
        let n = seq.saturating_sub(self.skipped);
        let gap = if self.last != 0 && n > self.last + 1 { n - self.last - 1 } else { 0 };
        self.last = self.last.max(n);
        gap
    }
}

/// One sink of the channel, for the submit path.
struct RouteSink {
    entry: Arc<SinkEntry>,
    types: TypeFilter,
    overflow: Overflow,
    filter: Option<Arc<ContentFilter>>,
    dest: Dest,
}

/// Every sink of the channel (remote and local) and the links to their nodes; rebuilt when membership changes and
/// read without locks on the submit path.
#[derive(Default)]
struct Routes {
    sinks: Vec<RouteSink>,
    peers: Vec<Arc<Peer>>,
    /// Some sink's content filter needs the CEL interpreter.
    slow_filter: bool,
    /// Counts the tables built for this process (1 for the first), so that a source can tell a new one from one it
    /// has seen.
    generation: u64,
}

/// The generation of the next routing table.
static ROUTES_BUILT: AtomicU64 = AtomicU64::new(1);

pub(crate) struct LocalSink {
    id: LocalId,
    types: TypeFilter,
    filter_expr: Option<String>,
    filter: Option<Arc<ContentFilter>>,
    attrs: Mutex<Attrs>,
    queue: SinkQueue,
}

#[derive(Default)]
struct LocalMembers {
    next: u32,
    sources: Vec<(LocalId, Attrs)>,
    sinks: Vec<Arc<LocalSink>>,
}

/// Events that arrived together on one link for one channel (see `ChannelInner::deliver_batch`), each with the sink
/// ids of its `Targets` frame if it had one; and the list they are staged in for delivery, kept for its memory.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) events: Vec<(EventMsg, Option<Vec<LocalId>>)>,
    staged: Vec<(Event, u64)>,
}

/// The bit mask of the sinks (at most 64) for which `f` holds.
fn mask(sinks: &[Arc<LocalSink>], f: impl Fn(&LocalSink) -> bool) -> u64 {
    sinks.iter().enumerate().fold(0, |m, (j, s)| if f(s) { m | 1 << j } else { m })
}

/// The local sinks an event goes to; on the stack for the common case of a few.
type SinkList<'a> = smallvec::SmallVec<[&'a Arc<LocalSink>; 8]>;

/// Sandboxed-filter bookkeeping of a channel.
#[derive(Default)]
struct Sandbox {
    /// Other members may install filters here.
    allowed: bool,
    limits: WasmLimits,
    next_req: u32,
    /// Installs this node started: their kind, and where answers go while someone waits for them.
    installs: std::collections::HashMap<u32, (FilterKind, Option<InstallAnswers>)>,
}

/// Where the answers to an install go: (installed, message) per member node.
type InstallAnswers = tokio::sync::mpsc::UnboundedSender<(bool, String)>;

/// What [`Channel::install_filter`] achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// Member nodes (this one included) where the filter now runs.
    pub installed: usize,
    /// Refusals, one message per refusing node.
    pub refused: Vec<String>,
    /// Member nodes that did not answer in time.
    pub silent: usize,
}

/// Member attribute updates are published at most this often per channel; updates in between are coalesced.
const ATTR_INTERVAL: Duration = Duration::from_millis(20);

pub(crate) struct ChannelInner {
    name: String,
    node: Weak<NodeInner>,
    state: Mutex<ChannelState>,
    id: AtomicU64,
    routes: RwLock<Arc<Routes>>,
    /// Counts changes to `routes` and `out_default`: a source keeps its own copy of both and reads them again only
    /// when this moved.
    routing_gen: AtomicU64,
    local_sinks: RwLock<Arc<Vec<Arc<LocalSink>>>>,
    members: Mutex<LocalMembers>,
    status: watch::Sender<Status>,
    sinks_present: watch::Sender<usize>,
    timer: Notify,
    closed: AtomicBool,
    counters: Counters,
    in_filter: RwLock<Option<Arc<dyn InFilter>>>,
    /// An OUT-filter installed by another member, used by local sources that have none of their own.
    out_default: RwLock<Option<Arc<dyn OutFilter>>>,
    sandbox: Mutex<Sandbox>,
    faults: tokio::sync::broadcast::Sender<FilterFault>,
    attrs_pending: AtomicBool,
    last_publish: Mutex<Option<Instant>>,
    /// Nodes cut off from the channel, for loss accounting at local sources.
    ghosts: Mutex<Vec<Ghost>>,
    /// Loss accounting of events arriving from remote sources.
    tracks: Mutex<IdMap<(NodeId, LocalId), RecvTrack>>,
    /// The channel's policy requires a credential for sources: events are accepted only from `senders`.
    guard_sources: AtomicBool,
    /// The nodes holding the source right, when `guard_sources` is set.
    senders: RwLock<Arc<Vec<NodeId>>>,
}

impl ChannelInner {
    pub(crate) fn new(node: &Arc<NodeInner>, name: &str) -> Arc<Self> {
        let fresh = ChannelId(rand::random());
        let secret = kecho_proto::ChannelSecret(rand::random());
        let addr = node.advertised.to_string();
        let mut state = ChannelState::new(name, fresh, secret, node.id, &addr, node.cfg.membership.clone());
        let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        state.set_wall_clock(now(), epoch);
        state.set_policy(node.cfg.access.policy_for(name));
        let key = node.identity.public_key();
        match node.cfg.access.token_for(name, &key) {
            Some(t) => state.set_token(Some(t), now()),
            None => {
                if let Some(t) = node.cfg.access.tokens.iter().find(|t| t.covers(name)) {
                    tracing::warn!(
                        channel = name,
                        holder = %t.holder_node(),
                        node = %node.id,
                        "the credential for this channel was issued to another node; it is not presented"
                    );
                }
            }
        }
        let ch = Arc::new(ChannelInner {
            name: name.to_owned(),
            node: Arc::downgrade(node),
            state: Mutex::new(state),
            id: AtomicU64::new(fresh.0),
            routes: RwLock::new(Arc::new(Routes::default())),
            routing_gen: AtomicU64::new(1),
            local_sinks: RwLock::new(Arc::new(Vec::new())),
            members: Mutex::new(LocalMembers::default()),
            status: watch::channel(Status::Opening).0,
            sinks_present: watch::channel(0).0,
            timer: Notify::new(),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            in_filter: RwLock::new(None),
            out_default: RwLock::new(None),
            sandbox: Mutex::new(Sandbox::default()),
            faults: tokio::sync::broadcast::channel(64).0,
            attrs_pending: AtomicBool::new(false),
            last_publish: Mutex::new(None),
            ghosts: Mutex::new(Vec::new()),
            tracks: Mutex::new(IdMap::default()),
            guard_sources: AtomicBool::new(false),
            senders: RwLock::new(Arc::new(Vec::new())),
        });
        node.index_channel(None, fresh, &ch);
        let weak = Arc::downgrade(&ch);
        node.spawn(timer_loop(weak));
        ch
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn id(&self) -> ChannelId {
        ChannelId(self.id.load(Ordering::Acquire))
    }

    pub(crate) fn open(self: &Arc<Self>, mode: OpenMode) {
        self.state.lock().open(mode, now());
        self.flush();
    }

    /// The channel is open (not opening, failed or closed).
    pub(crate) fn is_ready(&self) -> bool {
        *self.status.borrow() == Status::Ready
    }

    pub(crate) async fn wait_ready(&self) -> Result<()> {
        let mut rx = self.status.subscribe();
        let status = rx.wait_for(|s| *s != Status::Opening).await.map(|s| s.clone()).unwrap_or(Status::Closed);
        match status {
            Status::Ready => Ok(()),
            Status::Failed(OpenFailure::UnknownChannel) => Err(Error::UnknownChannel(self.name.clone())),
            Status::Failed(OpenFailure::Exists) => Err(Error::ChannelExists(self.name.clone())),
            Status::Failed(OpenFailure::Timeout) => {
                let cause = self.node.upgrade().and_then(|n| n.last_link_error.lock().clone());
                Err(Error::OpenTimeout {
                    channel: self.name.clone(),
                    cause: cause
                        .map_or_else(|| "no contact answered".to_owned(), |c| format!("last link failure: {c}")),
                })
            }
            Status::Failed(OpenFailure::Registry(why)) => Err(Error::RegistryFailed(why.to_string())),
            Status::Failed(OpenFailure::Refused(reason)) => {
                Err(Error::AccessDenied { channel: self.name.clone(), reason: reason.to_string() })
            }
            Status::Opening | Status::Closed => Err(Error::Closed(self.name.clone())),
        }
    }

    pub(crate) fn membership_input(self: &Arc<Self>, from: NodeId, msg: Message) {
        self.state.lock().handle_message(from, msg, now());
        self.flush();
    }

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
                        Some((m.id, types.clone(), filter))
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

    /// Executes everything the state machine asked for.
    fn flush(self: &Arc<Self>) {
        let Some(node) = self.node.upgrade() else { return };
        loop {
            let mut st = self.state.lock();
            // The id is final once the registry named it; index it before sending anything, so that answers find
            // the channel.
            let id = st.id();
            let old = self.id();
            if old != id {
                self.id.store(id.0, Ordering::Release);
                node.index_channel(Some(old), id, self);
            }
            let Some(out) = st.poll_output() else { break };
            match out {
                Output::Send { to, addr, msg } => {
                    drop(st);
                    node.send(to, &addr, &msg);
                }
                Output::Registry(op) => {
                    let msg = st.registry_message(&op, 0);
                    drop(st);
                    let ch = self.clone();
                    let registry = node.registry.clone();
                    node.spawn(async move {
                        let result = registry.request(msg).await.map_err(|e| RegistryUnreachable(e.to_string()));
                        ch.state.lock().handle_registry(result, now());
                        ch.flush();
                    });
                }
                Output::Changed => {
                    drop(st);
                    self.rebuild_routes(&node);
                }
                Output::Ready => {
                    drop(st);
                    self.status.send_replace(Status::Ready);
                }
                Output::Failed(why) => {
                    drop(st);
                    self.status.send_replace(Status::Failed(why));
                }
                Output::Contact(c) => {
                    drop(st);
                    tracing::debug!(channel = %self.name, contact = %c, "contact");
                }
                Output::Denied { node: peer, reason } => {
                    drop(st);
                    self.counters.denied.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(channel = %self.name, node = %peer, "refused a node: {reason}");
                }
                Output::Refused(reason) => {
                    drop(st);
                    tracing::warn!(channel = %self.name, "access refused: {reason}");
                }
            }
        }
        self.timer.notify_one();
    }

    fn rebuild_routes(&self, node: &Arc<NodeInner>) {
        let st = self.state.lock();
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
                for (id, types, filter) in &g.sinks {
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
    }

    /// Publishes the local members to the channel.
    fn publish_members(self: &Arc<Self>) {
        let m = self.members.lock();
        let mut list: Vec<MemberInfo> = m
            .sources
            .iter()
            .map(|(id, attrs)| MemberInfo { id: *id, role: Role::Source, attrs: attrs.clone() })
            .collect();
        list.extend(m.sinks.iter().map(|s| MemberInfo {
            id: s.id,
            role: Role::Sink { types: s.types.clone(), overflow: s.queue.overflow(), filter: s.filter_expr.clone() },
            attrs: s.attrs.lock().clone(),
        }));
        *self.local_sinks.write() = Arc::new(m.sinks.clone());
        drop(m);
        *self.last_publish.lock() = Some(now());
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        self.state.lock().set_members(list, now());
        self.flush();
        if let Some(node) = self.node.upgrade() {
            self.rebuild_routes(&node);
        }
    }

    /// A member's attributes changed: publish soon, coalescing with other changes (at most one publication per
    /// `ATTR_INTERVAL`, so a member updating thousands of times a second does not flood the channel).
    fn attrs_changed(self: &Arc<Self>) {
        if self.attrs_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(node) = self.node.upgrade() else { return };
        let ch = self.clone();
        node.spawn(async move {
            let due = ch.last_publish.lock().map(|t| t + ATTR_INTERVAL);
            if let Some(due) = due {
                tokio::time::sleep_until(due.into()).await;
            }
            ch.attrs_pending.store(false, Ordering::Release);
            if !ch.closed.load(Ordering::Acquire) {
                ch.publish_members();
            }
        });
    }

    fn add_source(self: &Arc<Self>) -> LocalId {
        let mut m = self.members.lock();
        m.next += 1;
        let id = LocalId(m.next);
        m.sources.push((id, Attrs::new()));
        drop(m);
        self.publish_members();
        id
    }

    fn set_source_attr(self: &Arc<Self>, id: LocalId, name: String, value: Value) {
        let mut m = self.members.lock();
        if let Some((_, attrs)) = m.sources.iter_mut().find(|(s, _)| *s == id) {
            attrs.set(name, value);
        }
        drop(m);
        self.attrs_changed();
    }

    fn add_sink(self: &Arc<Self>, opts: SinkOptions, cap: usize) -> Arc<LocalSink> {
        let mut m = self.members.lock();
        m.next += 1;
        let sink = Arc::new(LocalSink {
            id: LocalId(m.next),
            types: opts.types,
            filter_expr: opts.filter.as_ref().map(|f| f.expr().to_owned()),
            filter: opts.filter,
            attrs: Mutex::new(opts.attrs),
            queue: SinkQueue::new(cap, opts.overflow),
        });
        m.sinks.push(sink.clone());
        drop(m);
        self.publish_members();
        sink
    }

    fn remove_member(self: &Arc<Self>, id: LocalId) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut m = self.members.lock();
        m.sources.retain(|(s, _)| *s != id);
        m.sinks.retain(|s| s.id != id);
        drop(m);
        self.publish_members();
    }

    /// Installs a sandboxed filter sent by member node `from` (if this channel allows it) and answers.
    pub(crate) fn install_remote(self: &Arc<Self>, from: NodeId, req: u32, kind: FilterKind, module: bytes::Bytes) {
        let Some(node) = self.node.upgrade() else { return };
        let (addr, permitted) = {
            let st = self.state.lock();
            let addr = st.peers().get(&from).map(|p| p.addr.clone()).unwrap_or_default();
            (addr, st.permits(from, Roles::FILTERS, now()))
        };
        if !permitted {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            let message = format!(
                "access to channel {:?} denied: node {from} holds no credential with the filters role",
                self.name
            );
            node.send(from, &addr, &Message::FilterStatus { channel: self.id(), req, ok: false, message });
            return;
        }
        let (allowed, limits) = {
            let sb = self.sandbox.lock();
            (sb.allowed, sb.limits)
        };
        let channel = self.id();
        if !allowed {
            let message = format!("remote filters are not allowed on channel {:?}", self.name);
            node.send(from, &addr, &Message::FilterStatus { channel, req, ok: false, message });
            return;
        }
        let ch = self.clone();
        node.clone().spawn(async move {
            // Compiling can take milliseconds: keep it off the link's reader.
            let fault_ch = Arc::downgrade(&ch);
            let fault_addr = addr.clone();
            let on_fault = Box::new(move |reason: String| {
                if let Some(ch) = fault_ch.upgrade() {
                    ch.report_fault(kind, reason.clone());
                    if let Some(node) = ch.node.upgrade() {
                        let msg = Message::FilterStatus { channel: ch.id(), req, ok: false, message: reason };
                        node.send(from, &fault_addr, &msg);
                    }
                }
            });
            let built = tokio::task::spawn_blocking(move || WasmFilter::new(kind, &module, limits, on_fault)).await;
            let reply = match built {
                Ok(Ok(f)) => {
                    ch.set_sandboxed(kind, Arc::new(f));
                    Message::FilterStatus { channel, req, ok: true, message: "installed".into() }
                }
                Ok(Err(e)) => Message::FilterStatus { channel, req, ok: false, message: e.to_string() },
                Err(e) => Message::FilterStatus { channel, req, ok: false, message: format!("compile task: {e}") },
            };
            node.send(from, &addr, &reply);
        });
    }

    fn set_sandboxed(&self, kind: FilterKind, f: Arc<WasmFilter>) {
        match kind {
            FilterKind::Out => {
                *self.out_default.write() = Some(Arc::new(WasmOut(f)));
                self.routing_gen.fetch_add(1, Ordering::AcqRel);
            }
            FilterKind::In => *self.in_filter.write() = Some(Arc::new(WasmIn(f))),
        }
    }

    fn report_fault(&self, kind: FilterKind, reason: String) {
        let _ = self.faults.send(FilterFault { channel: self.name.clone(), kind, reason });
    }

    /// A member node answered one of our installs, or reports that the filter it runs for us failed.
    pub(crate) fn filter_status(&self, from: NodeId, req: u32, ok: bool, message: String) {
        let sb = self.sandbox.lock();
        let Some((kind, waiter)) = sb.installs.get(&req) else { return };
        let kind = *kind;
        let delivered = waiter.as_ref().is_some_and(|w| w.send((ok, message.clone())).is_ok());
        drop(sb);
        if !delivered && !ok {
            self.report_fault(kind, format!("on node {from}: {message}"));
        }
    }

    /// Delivers an event that arrived from another node to the local sinks that want it (only to `targets` if the
    /// source's OUT-filter named some).
    pub(crate) async fn deliver_remote(&self, from: NodeId, e: EventMsg, targets: Option<Vec<LocalId>>) {
        if !self.may_send(from) {
            // A node without the source right: whatever it sends is not the channel's.
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sinks = self.local_sinks.read().clone();
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let gap = self.tracks.lock().entry((from, e.source)).or_default().arrived(e.seq);
        if gap > 0 {
            // Events meant for this node were lost on the way (a link broke with them in flight). Which of its sinks
            // wanted them is unknown here, so every sink is told.
            self.counters.missed.fetch_add(gap, Ordering::Relaxed);
            for s in sinks.iter() {
                s.queue.add_lag(gap);
            }
        }
        let chosen: SinkList<'_> = match &targets {
            None => sinks.iter().filter(|s| s.types.accepts(&e.ty)).collect(),
            Some(ids) => sinks.iter().filter(|s| ids.contains(&s.id) && s.types.accepts(&e.ty)).collect(),
        };
        self.dispatch(chosen, e.ty, e.attrs, e.payload, e.seq, SourceKey::new(from, e.source)).await;
    }

    /// Delivers events that arrived together from node `from` (the frames of one read, in order), each with the
    /// sink ids of its `Targets` frame if it had one. The same as `deliver_remote` per event, but the channel's state
    /// is read once and each sink's queue is locked once for the lot instead of once per event.
    pub(crate) async fn deliver_batch(&self, from: NodeId, batch: &mut Batch) {
        let Batch { events, staged } = batch;
        if !self.may_send(from) {
            self.counters.denied.fetch_add(events.len() as u64, Ordering::Relaxed);
            events.clear();
            return;
        }
        let sinks = self.local_sinks.read().clone();
        if sinks.len() > 64 || self.in_filter.read().is_some() {
            // An IN-filter decides per event; more sinks than a mask holds are rare. Both take the per-event path.
            for (e, chosen) in events.drain(..) {
                self.deliver_remote(from, e, chosen).await;
            }
            return;
        }
        self.counters.received.fetch_add(events.len() as u64, Ordering::Relaxed);
        staged.clear();
        // Which sinks accept the last type seen (events of one link share their type name's allocation).
        let mut by_type: Option<(Arc<str>, u64)> = None;
        let mut evs = events.drain(..);
        loop {
            // Loss accounting under one lock for a run of events; a gap ends the run, since the sinks must see its lag
            // notice after the events before it and before the event that revealed it.
            let mut after_gap = None;
            {
                let mut tracks = self.tracks.lock();
                for (e, chosen) in evs.by_ref() {
                    let gap = tracks.entry((from, e.source)).or_default().arrived(e.seq);
                    let types = match &by_type {
                        Some((ty, m)) if Arc::ptr_eq(ty, &e.ty) => *m,
                        _ => {
                            let m = mask(&sinks, |s| s.types.accepts(&e.ty));
                            by_type = Some((e.ty.clone(), m));
                            m
                        }
                    };
                    let m = match &chosen {
                        None => types,
                        Some(ids) => types & mask(&sinks, |s| ids.contains(&s.id)),
                    };
                    let attrs = if e.attrs.is_empty() { None } else { Some(Arc::new(e.attrs)) };
                    let ev = Event {
                        ty: e.ty,
                        attrs,
                        payload: e.payload,
                        seq: e.seq,
                        source: SourceKey::new(from, e.source),
                    };
                    if gap > 0 {
                        after_gap = Some((gap, ev, m));
                        break;
                    }
                    if m != 0 {
                        staged.push((ev, m));
                    }
                }
            }
            self.offer_staged(&sinks, staged).await;
            let Some((gap, ev, m)) = after_gap else { return };
            // Events meant for this node were lost on the way (a link broke with them in flight). Which of its sinks
            // wanted them is unknown here, so every sink is told.
            self.counters.missed.fetch_add(gap, Ordering::Relaxed);
            for s in sinks.iter() {
                s.queue.add_lag(gap);
            }
            if m != 0 {
                staged.push((ev, m));
            }
        }
    }

    /// Offers staged events (each with the mask of the local sinks it goes to) sink by sink, in order, and empties
    /// the list.
    async fn offer_staged(&self, sinks: &[Arc<LocalSink>], staged: &mut Vec<(Event, u64)>) {
        let all = staged.iter().fold(0, |acc, (_, m)| acc | m);
        for (j, s) in sinks.iter().enumerate() {
            let bit = 1u64 << j;
            if all & bit == 0 {
                continue;
            }
            if all >> j == 1 {
                // The last sink takes the events themselves rather than copies.
                self.offer_to(s, staged.drain(..).filter(|(_, m)| m & bit != 0).map(|(e, _)| e)).await;
            } else {
                self.offer_to(s, staged.iter().filter(|(_, m)| m & bit != 0).map(|(e, _)| e.clone())).await;
            }
        }
        staged.clear();
    }

    /// Offers events to one sink under its overflow policy, waiting for room if it blocks.
    async fn offer_to(&self, s: &LocalSink, mut evs: impl Iterator<Item = Event>) {
        loop {
            let (_, dropped, stop) = s.queue.offer_many(&mut evs);
            if dropped > 0 {
                self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
            match stop {
                Some(Offer::Full(ev)) => match s.queue.offer_wait(ev).await {
                    Offer::Dropped => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Offer::Closed => return,
                    _ => {}
                },
                _ => return,
            }
        }
    }

    /// False if the channel's policy requires the source right and node `from` does not hold it.
    fn may_send(&self, from: NodeId) -> bool {
        !self.guard_sources.load(Ordering::Acquire) || self.senders.read().contains(&from)
    }

    /// A remote source says how many of its events so far were not meant for this node (see `Message::Routed`).
    pub(crate) fn routed(&self, from: NodeId, source: LocalId, skipped: u64) {
        self.tracks.lock().entry((from, source)).or_default().skipped = skipped;
    }

    /// Runs the IN-filter, then offers the event to the chosen local sinks under their overflow policies.
    async fn dispatch(
        &self,
        mut sinks: SinkList<'_>,
        ty: Arc<str>,
        mut attrs: Attrs,
        payload: bytes::Bytes,
        seq: u64,
        source: SourceKey,
    ) {
        let filter = self.in_filter.read().clone();
        if let Some(f) = filter {
            let sink_attrs: Vec<Attrs> = sinks.iter().map(|s| s.attrs.lock().clone()).collect();
            let decision = {
                let mut ev = InEvent { ty: &ty, attrs: &mut attrs, payload: &payload };
                f.filter(&mut ev, &LocalSinks { attrs: &sink_attrs })
            };
            match decision {
                InDecision::Deliver => {}
                InDecision::Drop => {
                    self.counters.filtered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                InDecision::Only(keep) => {
                    sinks = sinks.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, s)| s).collect();
                }
            }
        }
        if sinks.is_empty() {
            return;
        }
        let attrs = if attrs.is_empty() { None } else { Some(Arc::new(attrs)) };
        let ev = Event { ty, attrs, payload, seq, source };
        for s in sinks {
            let outcome = if s.queue.overflow() == Overflow::Block {
                s.queue.offer_wait(ev.clone()).await
            } else {
                s.queue.offer(ev.clone())
            };
            if matches!(outcome, Offer::Dropped) {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A source did not deliver `count` events meant for `ids` (every local sink if empty): its link was full, or
    /// this node was cut off from the channel.
    pub(crate) fn remote_lag(&self, from: NodeId, count: u64, ids: &[LocalId]) {
        if !self.may_send(from) {
            // Only a node that may publish can have missed events for our sinks.
            return;
        }
        let sinks = self.local_sinks.read().clone();
        self.counters.missed.fetch_add(count, Ordering::Relaxed);
        for s in sinks.iter().filter(|s| ids.is_empty() || ids.contains(&s.id)) {
            s.queue.add_lag(count);
        }
    }

    pub(crate) async fn leave(self: &Arc<Self>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.lock().leave(now());
        self.flush_leave().await;
        self.close_local();
        if let Some(node) = self.node.upgrade() {
            node.forget_channel(self);
        }
    }

    /// Like `flush`, but waits (briefly) for the registry removal so that a last member's entry is gone on return.
    async fn flush_leave(self: &Arc<Self>) {
        let Some(node) = self.node.upgrade() else { return };
        loop {
            // Take one output under the lock; the guard must be gone before any await.
            let next = {
                let mut st = self.state.lock();
                match st.poll_output() {
                    None => None,
                    Some(Output::Registry(op)) => Some(Err(st.registry_message(&op, 0))),
                    Some(other) => Some(Ok(other)),
                }
            };
            match next {
                None => break,
                Some(Ok(Output::Send { to, addr, msg })) => node.send(to, &addr, &msg),
                Some(Ok(_)) => {}
                Some(Err(registry_msg)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), node.registry.request(registry_msg)).await;
                }
            }
        }
    }

    pub(crate) fn close_local(&self) {
        self.closed.store(true, Ordering::Release);
        let sinks = std::mem::take(&mut self.members.lock().sinks);
        for s in sinks {
            s.queue.close();
        }
        *self.local_sinks.write() = Arc::new(Vec::new());
        self.status.send_if_modified(|s| {
            if *s == Status::Opening {
                *s = Status::Closed;
                true
            } else {
                false
            }
        });
        self.timer.notify_one();
    }

    fn stats(&self) -> ChannelStats {
        let c = &self.counters;
        ChannelStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            filtered: c.filtered.load(Ordering::Relaxed),
            missed: c.missed.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
        }
    }
}

async fn timer_loop(weak: Weak<ChannelInner>) {
    loop {
        let Some(ch) = weak.upgrade() else { return };
        if ch.closed.load(Ordering::Acquire) {
            return;
        }
        let deadline = ch.state.lock().poll_timeout();
        {
            let notified = ch.timer.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match deadline {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(d.into()) => {
                            ch.state.lock().handle_timeout(now());
                            ch.flush();
                        }
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// A handle on an open channel. Cheap to clone.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<ChannelInner>,
    guard: Arc<NodeGuard>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("name", &self.inner.name).finish()
    }
}

/// Options for a new sink.
#[derive(Debug, Default)]
pub struct SinkOptions {
    types: TypeFilter,
    capacity: Option<usize>,
    overflow: Overflow,
    attrs: Attrs,
    filter: Option<Arc<ContentFilter>>,
    filter_error: Option<crate::filter::FilterError>,
}

impl SinkOptions {
    /// Every type, the node's default capacity, drop-oldest.
    pub fn new() -> Self {
        Self::default()
    }
    /// Receive only these event types (sources filter before sending).
    pub fn types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let list: Vec<String> = types.into_iter().map(Into::into).collect();
        self.types = if list.is_empty() { TypeFilter::All } else { TypeFilter::Only(list) };
        self
    }
    /// Queue capacity in events: how many may wait for the sink's receiver. A receive takes every waiting event at
    /// once (except under [`Overflow::DropOldest`], which needs them in the queue to discard the oldest), so while the
    /// receiver works through those, up to this many more may queue behind them.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = Some(n);
        self
    }
    /// What to do when the queue is full.
    pub fn overflow(mut self, o: Overflow) -> Self {
        self.overflow = o;
        self
    }
    /// An attribute this sink supplies to the channel's filters (e.g. its load); change it later with
    /// [`Sink::set_attr`].
    pub fn attr(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.attrs.set(name, value);
        self
    }
    /// A content filter: a CEL expression over the event's `type` and attributes, evaluated at every source (see
    /// [`ContentFilter`]). An invalid expression makes [`Channel::sink`] fail with its position.
    pub fn filter(mut self, expr: &str) -> Self {
        match ContentFilter::compile(expr) {
            Ok(f) => self.filter = Some(Arc::new(f)),
            Err(e) => self.filter_error = Some(e),
        }
        self
    }
}

impl Channel {
    pub(crate) fn new(inner: Arc<ChannelInner>, guard: Arc<NodeGuard>) -> Self {
        Channel { inner, guard }
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Adds a source (publisher). In a channel with an access policy this node's credential must grant the source
    /// role (unless the role is open to all).
    pub fn source(&self) -> Result<Source> {
        self.check_open()?;
        self.check_right(Roles::SOURCE)?;
        let id = self.inner.add_source();
        let node = self.inner.node.upgrade().ok_or_else(|| Error::Closed(self.inner.name.clone()))?;
        Ok(Source {
            _guard: self.guard.clone(),
            ch: self.inner.clone(),
            id,
            seq: 0,
            buf: ChunkBuf::default(),
            max_frame: node.cfg.max_frame,
            out_filter: None,
            cel: None,
            scratch: Scratch::default(),
            ty_name: None,
            routing: (0, Arc::default(), None),
            small: BytesMut::new(),
            prefix: BytesMut::new(),
            gate: SourceGate::default(),
            key: SourceKey::new(node.id, id),
            sent_to: IdMap::default(),
            ghost_missed: IdMap::default(),
            ghosts_seen: 0,
        })
    }

    /// Adds a sink (subscriber). In a channel with an access policy this node's credential must grant the sink role
    /// (unless the role is open to all).
    pub fn sink(&self, mut opts: SinkOptions) -> Result<Sink> {
        self.check_open()?;
        self.check_right(Roles::SINK)?;
        if let Some(e) = opts.filter_error.take() {
            return Err(Error::Filter(e));
        }
        let node = self.inner.node.upgrade().ok_or_else(|| Error::Closed(self.inner.name.clone()))?;
        let cap = opts.capacity.unwrap_or(node.cfg.sink_capacity);
        let sink = self.inner.add_sink(opts, cap);
        Ok(Sink { ch: self.inner.clone(), sink, taken: Default::default(), _guard: self.guard.clone() })
    }

    /// Lets other members install sandboxed filters on this node's part of the channel (default: refused).
    pub fn set_remote_filters(&self, allowed: bool) {
        self.inner.sandbox.lock().allowed = allowed;
    }

    /// Limits for sandboxed filters installed on this node's part of the channel from now on.
    pub fn set_wasm_limits(&self, limits: WasmLimits) {
        self.inner.sandbox.lock().limits = limits;
    }

    /// Reports of sandboxed filters that were disabled: those running here, and those this node installed elsewhere.
    pub fn filter_faults(&self) -> tokio::sync::broadcast::Receiver<FilterFault> {
        self.inner.faults.subscribe()
    }

    /// Installs a sandboxed filter (a WebAssembly module, binary or text format; see docs/FILTERS.md) on every
    /// member node of the channel, this one included: an OUT-filter is used by sources that have none of their own,
    /// an IN-filter replaces the node's IN-filter. Nodes that do not allow remote filters refuse. Waits at most
    /// `timeout` for the answers.
    pub async fn install_filter(&self, kind: FilterKind, module: &[u8], timeout: Duration) -> Result<InstallReport> {
        self.check_right(Roles::FILTERS)?;
        let ch = &self.inner;
        let node = ch.node.upgrade().ok_or_else(|| Error::Closed(ch.name.clone()))?;
        let limits = ch.sandbox.lock().limits;
        // Refuse a broken module here, before bothering anyone.
        let weak = Arc::downgrade(ch);
        let on_fault = Box::new(move |reason: String| {
            if let Some(ch) = weak.upgrade() {
                ch.report_fault(kind, reason);
            }
        });
        let module_bytes = module.to_vec();
        let local = tokio::task::spawn_blocking(move || WasmFilter::new(kind, &module_bytes, limits, on_fault))
            .await
            .map_err(|e| Error::Invalid(format!("compile task: {e}")))?
            .map_err(Error::Wasm)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let req = {
            let mut sb = ch.sandbox.lock();
            sb.next_req = sb.next_req.wrapping_add(1);
            let req = sb.next_req;
            sb.installs.insert(req, (kind, Some(tx)));
            req
        };
        let peers: Vec<(NodeId, String)> =
            ch.state.lock().peers().iter().map(|(id, p)| (*id, p.addr.clone())).collect();
        let msg = Message::InstallFilter { channel: ch.id(), req, kind, module: bytes::Bytes::copy_from_slice(module) };
        for (id, addr) in &peers {
            node.send(*id, addr, &msg);
        }
        ch.set_sandboxed(kind, Arc::new(local));
        let mut report = InstallReport { installed: 1, ..InstallReport::default() };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut answered = 0;
        while answered < peers.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((true, _))) => report.installed += 1,
                Ok(Some((false, why))) => report.refused.push(why),
                Ok(None) | Err(_) => break,
            }
            answered += 1;
        }
        report.silent = peers.len() - answered;
        // Later reports about this filter are faults.
        if let Some(entry) = ch.sandbox.lock().installs.get_mut(&req) {
            entry.1 = None;
        }
        Ok(report)
    }

    /// Installs (or with `None` removes) this node's IN-filter for the channel: it sees every event before it is
    /// dispatched to local sinks. Takes effect for the next event.
    pub fn set_in_filter(&self, filter: Option<Arc<dyn InFilter>>) {
        *self.inner.in_filter.write() = filter;
    }

    /// A source of serde values of type `T`, sent as JSON with event type `ty`.
    pub fn typed_source<T: serde::Serialize>(&self, ty: &str) -> Result<TypedSource<T>> {
        Ok(TypedSource { src: self.source()?, ty: ty.to_owned(), _t: PhantomData })
    }

    /// A sink of serde values of type `T` carried by events of type `ty`.
    pub fn typed_sink<T: serde::de::DeserializeOwned>(&self, ty: &str, opts: SinkOptions) -> Result<TypedSink<T>> {
        Ok(TypedSink { sink: self.sink(opts.types([ty]))?, _t: PhantomData })
    }

    /// Sinks present in the channel (local and remote), as this node knows it.
    pub fn sinks(&self) -> usize {
        *self.inner.sinks_present.borrow()
    }

    /// Sources present in the channel (local and remote), as this node knows it.
    pub fn sources(&self) -> usize {
        self.inner.state.lock().counts().0 as usize
    }

    /// The attributes of every sink present in the channel (local and remote) with the node it lives on, as this
    /// node knows it; sinks of nodes cut off from the channel are left out.
    pub fn sink_attrs(&self) -> Vec<(kecho_proto::NodeId, Attrs)> {
        let routes = self.inner.routes.read().clone();
        routes
            .sinks
            .iter()
            .filter(|s| !matches!(s.dest, Dest::Ghost(..)))
            .map(|s| (s.entry.node, s.entry.attrs.clone()))
            .collect()
    }

    /// Member nodes of the channel other than this one, as this node knows it.
    pub fn member_nodes(&self) -> Vec<kecho_proto::NodeId> {
        self.inner.state.lock().peers().keys().copied().collect()
    }

    /// Waits until at least `n` sinks are present, at most `timeout`.
    pub async fn wait_for_sinks(&self, n: usize, timeout: Duration) -> Result<usize> {
        let mut rx = self.inner.sinks_present.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await.map(|r| r.map(|c| *c));
        match waited {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(_)) => Err(Error::Closed(self.inner.name.clone())),
            Err(_) => Err(Error::Timeout {
                what: format!("{n} sink(s) on channel {:?} (have {})", self.inner.name, self.sinks()),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Counters for this channel on this node.
    pub fn stats(&self) -> ChannelStats {
        self.inner.stats()
    }

    /// Leaves the channel: other members are told, local sinks are closed.
    pub async fn close(&self) {
        self.inner.leave().await;
    }

    /// Presents credential `token` from now on (a renewed one before the current one expires, say); every other
    /// member checks it. `None` withdraws it.
    pub fn set_token(&self, token: Option<kecho_proto::access::Token>) -> Result<()> {
        self.check_open()?;
        let mut st = self.inner.state.lock();
        if let (Some(policy), Some(t)) = (st.policy().copied(), &token) {
            let node = self.inner.node.upgrade().ok_or_else(|| Error::Closed(self.inner.name.clone()))?;
            let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            policy
                .check_token(&self.inner.name, node.id, t, Some(unix))
                .map_err(|e| Error::AccessDenied { channel: self.inner.name.clone(), reason: e.to_string() })?;
        }
        st.set_token(token, now());
        drop(st);
        self.inner.flush();
        Ok(())
    }

    /// This node's rights in the channel under its access policy (every right if it has none).
    pub fn rights(&self) -> Result<Roles> {
        self.inner
            .state
            .lock()
            .local_rights(now())
            .map_err(|e| Error::AccessDenied { channel: self.inner.name.clone(), reason: e.to_string() })
    }

    fn check_right(&self, role: Roles) -> Result<()> {
        let rights = self.rights()?;
        if rights.contains(role) {
            Ok(())
        } else {
            Err(Error::AccessDenied {
                channel: self.inner.name.clone(),
                reason: format!("this node's credential grants {rights}, not the {role} role"),
            })
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::Closed(self.inner.name.clone()))
        } else {
            Ok(())
        }
    }
}

/// Publishes events on a channel. Events from one source reach each sink in submission order.
pub struct Source {
    _guard: Arc<NodeGuard>,
    ch: Arc<ChannelInner>,
    id: LocalId,
    seq: u64,
    /// Where frames shared by several links or local sinks are encoded.
    buf: ChunkBuf,
    max_frame: usize,
    out_filter: Option<Arc<dyn OutFilter>>,
    /// The CEL root context, built on the first event that meets a content filter and kept.
    cel: Option<cel::Context<'static, 'static>>,
    scratch: Scratch,
    /// The type name of the last event given to local sinks.
    ty_name: Option<Arc<str>>,
    /// The channel's routing table and installed OUT-filter as of `ChannelInner::routing_gen` (the first).
    routing: (u64, Arc<Routes>, Option<Arc<dyn OutFilter>>),
    /// The last small event frame, encoded once and copied into each link's outbox.
    small: BytesMut,
    /// The routing and target frames that precede an event on one link.
    prefix: BytesMut,
    /// Whether this source has been idle long enough to write to a quiet link itself.
    gate: SourceGate,
    /// This source as sinks see it.
    key: SourceKey,
    /// Loss accounting per destination node.
    sent_to: IdMap<NodeId, SendTrack>,
    /// Events that sinks of cut-off nodes would have received, to report when those nodes come back.
    ghost_missed: IdMap<(NodeId, LocalId), u64>,
    /// The routing table `ghost_missed` was last checked against: nodes come back (or are forgotten) only when the
    /// table is rebuilt, so the check runs once per table, not once per event while a node is cut off.
    ghosts_seen: u64,
}

/// Buffers the submit path reuses, so that it does not allocate per event.
#[derive(Default)]
struct Scratch {
    candidates: Vec<usize>,
    view: Vec<Arc<SinkEntry>>,
    chosen: Vec<usize>,
    picked: Vec<bool>,
    /// Per peer: sinks there accepting the type, sinks chosen, whether a chosen one blocks, chosen ids.
    peers: Vec<(u32, u32, bool, Vec<LocalId>)>,
    locals: Vec<Arc<LocalSink>>,
    /// Sinks of cut-off nodes that accept the event: (node, sink).
    ghosts: Vec<(NodeId, LocalId)>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("channel", &self.ch.name).field("seq", &self.seq).finish()
    }
}

impl Source {
    /// Submits an event; waits only if a sink with the Block policy is full. Returns the event's sequence number.
    pub async fn submit(&mut self, ty: &str, attrs: &Attrs, payload: &[u8]) -> Result<u64> {
        self.submit_inner(ty, attrs, payload, true).await
    }

    /// Submits without ever waiting: fails with [`Error::WouldBlock`] (sending nothing) if a Block sink is full.
    pub fn try_submit(&mut self, ty: &str, attrs: &Attrs, payload: &[u8]) -> Result<u64> {
        let fut = self.submit_inner(ty, attrs, payload, false);
        // The non-waiting path never awaits anything pending, so one poll completes it.
        futures_util::FutureExt::now_or_never(fut).unwrap_or(Err(Error::WouldBlock))
    }

    /// Blocking form of [`Source::submit`], for threads outside the runtime.
    pub fn submit_blocking(&mut self, ty: &str, attrs: &Attrs, payload: &[u8]) -> Result<u64> {
        block_on(self.submit_inner(ty, attrs, payload, true))?
    }

    /// Sinks present in the channel.
    pub fn sinks(&self) -> usize {
        *self.ch.sinks_present.borrow()
    }

    /// Installs (or with `None` removes) the OUT-filter that chooses which sinks get each event; the default sends
    /// to every sink whose type and content filters accept it. Replacing it between two submits loses or repeats
    /// nothing: each event sees exactly one filter.
    pub fn set_out_filter(&mut self, filter: Option<Arc<dyn OutFilter>>) {
        self.out_filter = filter;
    }

    /// Sets an attribute this source supplies to the channel (published promptly, coalesced).
    pub fn set_attr(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.ch.set_source_attr(self.id, name.into(), value.into());
    }

    async fn submit_inner(&mut self, ty: &str, attrs: &Attrs, payload: &[u8], wait: bool) -> Result<u64> {
        if self.ch.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(self.ch.name.clone()));
        }
        if ty.is_empty() {
            return Err(Error::Invalid("event type must not be empty".into()));
        }
        let len = event_frame_len(ty, attrs, payload.len());
        if len > self.max_frame {
            return Err(Error::Invalid(format!("event of {len} bytes exceeds the frame limit of {}", self.max_frame)));
        }
        let gen = self.ch.routing_gen.load(Ordering::Acquire);
        if self.routing.0 != gen {
            self.routing = (gen, self.ch.routes.read().clone(), self.ch.out_default.read().clone());
        }
        let routes = &*self.routing.1;
        let sc = &mut self.scratch;
        // Reset in place: each peer's list of chosen ids keeps its allocation from one submit to the next.
        sc.peers.truncate(routes.peers.len());
        for e in &mut sc.peers {
            (e.0, e.1, e.2) = (0, 0, false);
            e.3.clear();
        }
        sc.peers.resize_with(routes.peers.len(), || (0, 0, false, Vec::new()));
        sc.locals.clear();

        // 1. The sinks whose type and content filters accept the event.
        sc.candidates.clear();
        if routes.slow_filter && self.cel.is_none() {
            self.cel = Some(cel::Context::default());
        }
        let root = self.cel.as_ref();
        let mut ctx: Option<FilterContext<'_>> = None;
        sc.ghosts.clear();
        let mut at = None;
        for (i, r) in routes.sinks.iter().enumerate() {
            if !r.types.accepts(ty) {
                continue;
            }
            match r.dest {
                Dest::Remote(p) => sc.peers[p].0 += 1,
                Dest::Ghost(_, until) if *at.get_or_insert_with(now) >= until => continue,
                _ => {}
            }
            if let Some(f) = &r.filter {
                let accepted = match (f.fast_matches(ty, attrs), root) {
                    (Some(m), _) => m,
                    (None, Some(root)) => f.matches_in(ctx.get_or_insert_with(|| FilterContext::new(root, ty, attrs))),
                    (None, None) => false,
                };
                if !accepted {
                    continue;
                }
            }
            if let Dest::Ghost(node, _) = r.dest {
                sc.ghosts.push((node, r.entry.id));
                continue;
            }
            sc.candidates.push(i);
        }
        drop(ctx);

        // 2. The OUT-filter chooses among them (the source's own, or one installed on the channel by a member).
        let installed = if self.out_filter.is_none() { self.routing.2.clone() } else { None };
        if let Some(f) = self.out_filter.as_ref().or(installed.as_ref()) {
            // The OUT-filter chooses among present sinks only, so nobody can say whether a cut-off sink would have
            // been chosen: it is not counted as missing anything.
            sc.ghosts.clear();
            sc.view.clear();
            sc.view.extend(sc.candidates.iter().map(|&i| routes.sinks[i].entry.clone()));
            sc.chosen.clear();
            let ev = EventView { ty, attrs, payload };
            f.select(&ev, &SinkView { entries: &sc.view, now: now() }, &mut sc.chosen);
            sc.picked.clear();
            sc.picked.resize(sc.candidates.len(), false);
            for &j in &sc.chosen {
                if let Some(p) = sc.picked.get_mut(j) {
                    *p = true;
                }
            }
            let picked = &sc.picked;
            let mut k = 0;
            sc.candidates.retain(|_| {
                k += 1;
                picked[k - 1]
            });
        }
        for &i in &sc.candidates {
            let r = &routes.sinks[i];
            match &r.dest {
                Dest::Remote(p) => {
                    let e = &mut sc.peers[*p];
                    e.1 += 1;
                    e.2 |= r.overflow == Overflow::Block;
                    e.3.push(r.entry.id);
                }
                Dest::Local(l) => sc.locals.push(l.clone()),
                Dest::Ghost(..) => {}
            }
        }

        // 3. Wait for room at Block sinks before sending anything, so that an event goes to all of its sinks or none.
        for (p, e) in sc.peers.iter().enumerate() {
            if e.1 > 0 && e.2 && !routes.peers[p].outbox.has_room(len) {
                if !wait {
                    return Err(Error::WouldBlock);
                }
                routes.peers[p].outbox.wait_room(len).await;
            }
        }
        let local_block_full = sc.locals.iter().any(|s| s.queue.overflow() == Overflow::Block && s.queue.is_full());
        if !wait && local_block_full {
            return Err(Error::WouldBlock);
        }

        // 4. Send: encoded once, the same bytes on every link; a link where not every sink of the type was chosen
        //    first gets the chosen sinks' ids.
        self.seq += 1;
        let seq = self.seq;
        let channel = self.ch.id();
        let c = &self.ch.counters;
        c.submitted.fetch_add(1, Ordering::Relaxed);
        for g in sc.ghosts.drain(..) {
            *self.ghost_missed.entry(g).or_default() += 1;
        }
        if !self.ghost_missed.is_empty() && self.ghosts_seen != routes.generation {
            self.ghosts_seen = routes.generation;
            report_ghost_missed(&mut self.ghost_missed, routes, channel, self.id);
        }
        if sc.candidates.is_empty() {
            c.filtered.fetch_add(1, Ordering::Relaxed);
            return Ok(seq);
        }
        let mut frame = None;
        // A small event that no local sink shares is copied into each link's outbox (see `Outbox::push_event_copied`)
        // from a buffer used again for the next; larger ones are shared by every link.
        let copied = sc.locals.is_empty() && len < COPY_BELOW;
        if copied {
            self.small.clear();
            encode_event(&mut self.small, channel, self.id, seq, ty, attrs, payload);
        }
        // Counted once per submit rather than per link.
        let (mut sent_to, mut sent_bytes) = (0, 0);
        for (p, e) in sc.peers.iter_mut().enumerate() {
            if e.1 == 0 {
                continue;
            }
            let peer = &routes.peers[p];
            peer.flush_lag();
            // Loss accounting: tell the node how many events were not meant for it whenever that changed, and on
            // every new link.
            let track = self.sent_to.entry(peer.id).or_default();
            let skipped = seq - (track.routed + 1);
            let link = (Arc::as_ptr(peer) as usize, peer.epoch());
            let tell = track.told != Some((skipped, link.0, link.1));
            // Routing and target frames go in a buffer of the source's, copied into the outbox with the event.
            if tell {
                encode_routed(&mut self.prefix, channel, self.id, skipped);
            }
            if e.1 < e.0 {
                encode_targets(&mut self.prefix, channel, &e.3);
            }
            let (pushed, sent) = if copied {
                (peer.outbox.push_event_copied(&self.prefix, &self.small, &mut self.gate), self.small.len())
            } else {
                let f = frame.get_or_insert_with(|| {
                    let b = self.buf.room(len + 16 * attrs.len(), ENCODE_CHUNK);
                    encode_event(b, channel, self.id, seq, ty, attrs, payload);
                    b.split().freeze()
                });
                (peer.outbox.push_event_with(&self.prefix, f.clone(), &mut self.gate), f.len())
            };
            self.prefix.clear();
            if pushed {
                track.routed += 1;
                track.told = Some((skipped, link.0, link.1));
                sent_to += 1;
                sent_bytes += sent as u64;
            } else {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                peer.add_lag(channel, self.id, &e.3, 1);
            }
            e.3.clear();
        }
        if sent_to > 0 {
            c.sent.fetch_add(sent_to, Ordering::Relaxed);
            c.bytes_sent.fetch_add(sent_bytes, Ordering::Relaxed);
        }
        self.gate.done();
        if !sc.locals.is_empty() {
            // Share the encoded payload when there is one; copy it once otherwise.
            let payload = match &frame {
                Some(f) => f.slice(f.len() - payload.len()..),
                None => bytes::Bytes::copy_from_slice(payload),
            };
            self.ch.counters.received.fetch_add(1, Ordering::Relaxed);
            let locals = std::mem::take(&mut sc.locals);
            // The type's name is shared by the events of this source while it keeps sending that type.
            let name = match &self.ty_name {
                Some(n) if **n == *ty => n.clone(),
                _ => self.ty_name.insert(Arc::from(ty)).clone(),
            };
            self.ch.dispatch(locals.iter().collect(), name, attrs.clone(), payload, seq, self.key).await;
            self.scratch.locals = locals;
        }
        Ok(seq)
    }
}

/// Reports the events that sinks of cut-off nodes missed to those that are back (as `Lagged`, ahead of anything else
/// this source sends them), and forgets the counts of nodes that are gone for good.
fn report_ghost_missed(
    missed: &mut IdMap<(NodeId, LocalId), u64>,
    routes: &Routes,
    channel: ChannelId,
    source: LocalId,
) {
    missed.retain(|(node, sink), count| {
        if let Some(peer) = routes.peers.iter().find(|p| p.id == *node) {
            peer.outbox.push_control(Message::Lagged { channel, source, count: *count, sinks: vec![*sink] }.to_bytes());
            return false;
        }
        // Still cut off (and remembered): keep counting.
        routes.sinks.iter().any(|r| matches!(r.dest, Dest::Ghost(n, _) if n == *node))
    });
}

impl Drop for Source {
    fn drop(&mut self) {
        self.ch.remove_member(self.id);
    }
}

/// Receives events from a channel.
pub struct Sink {
    ch: Arc<ChannelInner>,
    sink: Arc<LocalSink>,
    /// Events taken from the queue in one go and not yet returned.
    taken: crate::queue::Taken,
    _guard: Arc<NodeGuard>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("channel", &self.ch.name).finish()
    }
}

impl Sink {
    /// The next event, waiting for one. Returns [`RecvError::Lagged`] once where events were missed.
    pub async fn recv(&mut self) -> Result<Event, RecvError> {
        self.sink.queue.recv(&mut self.taken).await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        self.sink.queue.try_recv(&mut self.taken)
    }

    /// The next event, blocking the thread (for code outside the runtime). `None` waits forever.
    pub fn recv_blocking(&mut self, timeout: Option<Duration>) -> Result<Event, TryRecvError> {
        self.sink.queue.recv_blocking(&mut self.taken, timeout)
    }

    /// Events (and lag notices) as an async stream; ends when the sink is closed.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event, RecvError>> + Send {
        futures_util::stream::unfold(self, |mut s| async move {
            match s.recv().await {
                Err(RecvError::Closed) => None,
                r => Some((r, s)),
            }
        })
    }

    /// Runs `handler` on every event as it arrives, on a task of the current runtime. Lag notices are passed as
    /// `Err`. The task ends when the sink is closed.
    pub fn on_event<F>(mut self, mut handler: F) -> tokio::task::JoinHandle<()>
    where
        F: FnMut(Result<Event, RecvError>) + Send + 'static,
    {
        tokio::spawn(async move {
            loop {
                match self.recv().await {
                    Err(RecvError::Closed) => return,
                    r => handler(r),
                }
            }
        })
    }

    /// Sets an attribute this sink supplies to the channel's filters (published promptly, coalesced).
    pub fn set_attr(&self, name: impl Into<String>, value: impl Into<Value>) {
        self.sink.attrs.lock().set(name, value);
        self.ch.attrs_changed();
    }

    /// Events received into this sink's queue so far.
    pub fn received(&self) -> u64 {
        self.sink.queue.received.load(Ordering::Relaxed)
    }

    /// Events this sink missed so far.
    pub fn dropped(&self) -> u64 {
        self.sink.queue.dropped.load(Ordering::Relaxed)
    }

    /// Events waiting in the queue.
    pub fn len(&self) -> usize {
        self.sink.queue.len(&self.taken)
    }

    /// True if no events are waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.sink.queue.close();
        self.ch.remove_member(self.sink.id);
    }
}

/// A source of serde values, sent as JSON.
pub struct TypedSource<T> {
    src: Source,
    ty: String,
    _t: PhantomData<fn(T)>,
}

impl<T> std::fmt::Debug for TypedSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSource").field("ty", &self.ty).finish()
    }
}

impl<T: serde::Serialize> TypedSource<T> {
    /// Submits a value with attributes.
    pub async fn submit(&mut self, value: &T, attrs: &Attrs) -> Result<u64> {
        let bytes = serde_json::to_vec(value)?;
        self.src.submit(&self.ty, attrs, &bytes).await
    }
}

/// A sink of serde values.
pub struct TypedSink<T> {
    sink: Sink,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TypedSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSink").finish()
    }
}

/// What a typed sink yields.
#[derive(Debug)]
pub struct Typed<T> {
    /// The decoded value.
    pub value: T,
    /// The event it came in (type, attributes, sequence number).
    pub event: Event,
}

impl<T: serde::de::DeserializeOwned> TypedSink<T> {
    /// The next value. A payload that does not decode as `T` is an error for that event only.
    pub async fn recv(&mut self) -> Result<Typed<T>> {
        loop {
            match self.sink.recv().await {
                Ok(event) => return Ok(Typed { value: event.decode()?, event }),
                Err(RecvError::Lagged(n)) => tracing::debug!("typed sink missed {n} events"),
                Err(RecvError::Closed) => return Err(Error::Closed(self.sink.ch.name.clone())),
            }
        }
    }

    /// The underlying untyped sink.
    pub fn inner(&mut self) -> &mut Sink {
        &mut self.sink
    }
}

/// Runs a future to completion from synchronous code: inside a multi-threaded runtime without starving it, outside
/// any runtime on a private one.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => Ok(tokio::task::block_in_place(|| h.block_on(f))),
        Err(_) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| Error::Invalid(format!("cannot start a runtime to block on: {e}")))?;
            Ok(rt.block_on(f))
        }
    }
}
