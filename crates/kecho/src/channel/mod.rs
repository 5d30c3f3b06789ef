//! Channels: a channel's state on this node, and the public handles on it ([`Channel`], [`Source`], [`Sink`]).
//!
//! A channel's membership is decided by its [`ChannelState`] (the sans-IO core); this module executes its outputs
//! (`flush`) and drives its timers. The rest is split by job:
//!
//! - `table`: the node's channel table, which the link layer hands arriving frames to (the `LinkHandler`);
//! - `routes`: the routing table derived from membership, which the submit path reads without locks;
//! - `source`: [`Source`] and the submit path;
//! - `deliver`: events arriving from other nodes, loss accounting, the IN-filter, offering to local sinks;
//! - `ends`: sources that end, and what their sinks missed (`SourceEnd`, relayed by every member);
//! - `sink`: [`Sink`], its options and the typed wrappers;
//! - `install`: sandboxed filters installed by members;
//! - `tree`: tree mode, for channels above `NodeBuilder::tree_threshold` member nodes (bounded links, events along
//!   per-source trees).

mod deliver;
mod ends;
mod fate;
mod history;
mod install;
mod routes;
mod sink;
mod source;
mod table;
mod tree;
mod view_sync;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kecho_proto::access::Roles;
use kecho_proto::membership::{ChannelState, OpenFailure, OpenMode, Output};
use kecho_proto::{Attrs, ChannelId, LocalId, MemberInfo, Message, NodeId, Role, Value};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};

use deliver::RecvTrack;
pub use fate::SourceFate;
pub use history::History;
pub use install::InstallReport;
use install::Sandbox;
use routes::{Ghosts, IdMap, RouteBook, Routes};
use sink::LocalSink;
pub use sink::{Sink, SinkOptions, Typed, TypedSink, TypedSource};
pub use source::Source;
pub(crate) use table::{Channels, NodeGuard};
use tree::TreeHead;
pub use tree::TreeStats;

use crate::clock::now;
use crate::error::{Error, Refusal, Result};
use crate::filter::{InFilter, OutFilter};
use crate::queue::{SinkQueue, SourceKey};
use crate::wasm::FilterFault;

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
    /// Events past their deadline, reported to their sinks as expired ([`crate::RecvError::Expired`]) instead of
    /// delivered: at submission (counted once per event), announced by another node whose link held them too long,
    /// or found late at a local sink's receive. Events that expire in this node's link queues are counted per link
    /// ([`crate::LinkStats::expired`]).
    pub expired: u64,
    /// Frames from remote sources meant for another instance of this channel on this node (an earlier opening of
    /// it, whose events, lag notices and source ends were still in flight, or relayed late, when it was opened
    /// again), ends of sources of an earlier instance of their node's channel than the one tracked, and events that
    /// arrive under a source's key after its own end (see docs/PROTOCOL.md, "Loss accounting"): ignored, not
    /// delivered. A datagram of the current instance that overtook the `Routed` frame announcing it is counted here
    /// too, and reported to the sinks as missed (and counted in `missed`) by the gap the next event reveals.
    pub stale: u64,
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
    expired: AtomicU64,
    stale: AtomicU64,
}

#[derive(Default)]
struct LocalMembers {
    next: u32,
    sources: Vec<(LocalId, Attrs)>,
    /// Each local source's last sequence number, for its `SourceEnd` should the node leave while it is open.
    seqs: Vec<(LocalId, Arc<AtomicU64>)>,
    sinks: Vec<Arc<LocalSink>>,
}

/// Member attribute updates are published at most this often per channel; updates in between are coalesced.
const ATTR_INTERVAL: Duration = Duration::from_millis(20);

pub(crate) struct ChannelInner {
    name: String,
    /// This opening of the channel (`NodeSnapshot::instance`: never 0, above the node's earlier openings of the
    /// channel, see `version_base`): remote sources name it in their `Routed` frames, and frames numbered for another
    /// instance are ignored (`RecvTrack::stale`); local sources name it as their origin.
    pub(super) instance: u64,
    node: Weak<Channels>,
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
    /// Local sources with an OUT-filter of their own (they send directly in tree mode: `Routes::direct`).
    out_sources: AtomicUsize,
    sandbox: Mutex<Sandbox>,
    faults: tokio::sync::broadcast::Sender<FilterFault>,
    attrs_pending: AtomicBool,
    last_publish: Mutex<Option<Instant>>,
    /// Nodes cut off from the channel, for loss accounting at local sources.
    ghosts: Mutex<Ghosts>,
    /// The remote part of `routes`, kept per node so that a membership change recomputes only what changed.
    book: Mutex<RouteBook>,
    /// Held for the whole of a routes rebuild, so that rebuilds finish in the order they read membership: two
    /// threads rebuilding at once (two links delivering membership frames) could otherwise store the older table
    /// last, and it would stay until the next change (a member's sink missing from the routes for good).
    rebuilding: Mutex<()>,
    /// Registry requests are sent at once, each from its own task, but the membership state machine must get their
    /// answers in the order of the requests (it matches an answer with the oldest request not answered; applied out
    /// of order, a lookup's entry naming another contact would be taken for our own claim's success). Each request
    /// takes a ticket when the state machine emits it; its answer waits until `reg_answered` reaches the ticket.
    reg_tickets: AtomicU64,
    /// How many registry answers have been given to the state machine, in ticket order.
    reg_answered: watch::Sender<u64>,
    /// Loss accounting of events arriving from remote sources.
    tracks: Mutex<IdMap<(NodeId, LocalId), RecvTrack>>,
    /// Tracks of remote sources gone with an earlier instance of their node's channel, kept apart (by node, local
    /// id and that instance) until their end arrives or a heartbeat timeout passes (see `ChannelInner::retire`).
    retired: Mutex<std::collections::HashMap<(NodeId, LocalId, u64), RecvTrack>>,
    /// Ends of remote sources that arrived from their own node, to relay to members that appear later.
    ends: Mutex<Vec<ends::Remembered>>,
    /// Ends of remote sources heard from anyone, for `Sink::source_fate` (`fate.rs`).
    heard: Mutex<fate::HeardEnds>,
    /// When this node became a member of the channel (first `Ready`).
    member_since: Mutex<Option<Instant>>,
    /// The member nodes as of the last membership change, to tell the ones that appear.
    seen_peers: Mutex<Vec<NodeId>>,
    /// The channel's policy requires a credential for sources: events are accepted only from `senders`.
    guard_sources: AtomicBool,
    /// The nodes holding the source right, when `guard_sources` is set.
    senders: RwLock<Arc<Vec<NodeId>>>,
    /// Tree mode (`tree.rs`).
    tree: tree::Tree,
    /// Local sources whose sinks' missed events wait for their nodes to come back (`source::Lent`).
    lenders: Mutex<Vec<Weak<source::Lent>>>,
}

/// Where the snapshot versions of a channel opened now start (`ChannelState::start_versions_at`): the wall clock in
/// microseconds since the Unix epoch (`epoch`), kept increasing within the process, so that every opening of a channel
/// on this node has versions above those of the openings before it (each opening publishes far fewer snapshots than
/// microseconds pass between two openings).
fn version_base(epoch: std::time::Duration) -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let wall = u64::try_from(epoch.as_micros()).unwrap_or(u64::MAX >> 1);
    let prev = LAST.fetch_max(wall, Ordering::Relaxed);
    if prev >= wall {
        // Several openings within a microsecond, or a clock that went back: above the last one, with room for its
        // versions.
        let next = prev + (1 << 20);
        LAST.fetch_max(next, Ordering::Relaxed);
        next
    } else {
        wall
    }
}

impl ChannelInner {
    pub(crate) fn new(node: &Arc<Channels>, name: &str) -> Arc<Self> {
        let fresh = ChannelId(rand::random());
        let secret = kecho_proto::ChannelSecret(rand::random());
        let addr = node.links.addr.clone();
        let mut state = ChannelState::new(name, fresh, secret, node.id, &addr, node.cfg.membership.clone());
        let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        state.set_wall_clock(now(), epoch);
        // Never 0 (unknown), and above this node's earlier openings of the channel: a node tells this opening of the
        // channel from an earlier or later one by it (`Routed` frames, snapshots), and orders them. Versions start
        // there too.
        let instance = version_base(epoch).max(1);
        state.set_instance(instance);
        state.start_versions_at(instance);
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
            instance,
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
            out_sources: AtomicUsize::new(0),
            sandbox: Mutex::new(Sandbox::default()),
            faults: tokio::sync::broadcast::channel(64).0,
            attrs_pending: AtomicBool::new(false),
            last_publish: Mutex::new(None),
            ghosts: Mutex::new(Ghosts::default()),
            book: Mutex::new(RouteBook::default()),
            rebuilding: Mutex::new(()),
            reg_tickets: AtomicU64::new(0),
            reg_answered: watch::channel(0).0,
            tracks: Mutex::new(IdMap::default()),
            retired: Mutex::new(std::collections::HashMap::new()),
            ends: Mutex::new(Vec::new()),
            heard: Mutex::new(fate::HeardEnds::default()),
            member_since: Mutex::new(None),
            seen_peers: Mutex::new(Vec::new()),
            guard_sources: AtomicBool::new(false),
            senders: RwLock::new(Arc::new(Vec::new())),
            tree: tree::Tree::default(),
            lenders: Mutex::new(Vec::new()),
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
                let cause = self.node.upgrade().and_then(|n| n.links.last_error());
                Err(Error::OpenTimeout { channel: self.name.clone(), cause })
            }
            Status::Failed(OpenFailure::Registry(why)) => Err(Error::RegistryFailed(why)),
            Status::Failed(OpenFailure::Refused(reason)) => {
                Err(Error::AccessDenied { channel: self.name.clone(), reason: Refusal::Refused(reason.to_string()) })
            }
            Status::Opening | Status::Closed => Err(Error::Closed(self.name.clone())),
        }
    }

    pub(crate) fn membership_input(self: &Arc<Self>, from: NodeId, msg: Message) {
        let join = matches!(msg, Message::JoinRequest { .. });
        if matches!(&msg, Message::Snapshot { node, left: true, .. } if *node == from) {
            self.farewell(from);
        }
        self.state.lock().handle_message(from, msg, now());
        self.flush();
        if join {
            self.tree_join_request(from);
        }
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
                    let tree = self.tree_check(&mut st);
                    drop(st);
                    if tree {
                        self.tree_send_membership(&node, to, &addr, msg);
                    } else {
                        node.send(to, &addr, &msg);
                    }
                }
                Output::Registry(op) => {
                    let msg = st.registry_message(&op, 0);
                    // Taken under the state lock: tickets follow the order the state machine emitted the requests.
                    let ticket = self.reg_tickets.fetch_add(1, Ordering::Relaxed);
                    drop(st);
                    let ch = self.clone();
                    let registry = node.registry.clone();
                    node.spawn(async move {
                        let result = registry
                            .request(msg)
                            .await
                            .map_err(|e| kecho_proto::membership::RegistryUnreachable(e.to_string()));
                        // Every request ends (the client bounds each by its timeouts), so the earlier tickets come.
                        let mut answered = ch.reg_answered.subscribe();
                        if answered.wait_for(|n| *n >= ticket).await.is_err() {
                            return;
                        }
                        ch.state.lock().handle_registry(result, now());
                        ch.reg_answered.send_modify(|n| *n += 1);
                        ch.flush();
                    });
                }
                Output::Changed => {
                    let changed = if self.tree_check(&mut st) { self.tree_learn(&mut st) } else { None };
                    drop(st);
                    self.update_routes(&node, changed);
                }
                Output::Ready => {
                    drop(st);
                    self.member_since.lock().get_or_insert_with(now);
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

    fn add_source(self: &Arc<Self>) -> (LocalId, Arc<AtomicU64>) {
        let mut m = self.members.lock();
        m.next += 1;
        let id = LocalId(m.next);
        m.sources.push((id, Attrs::new()));
        let seq = Arc::new(AtomicU64::new(0));
        m.seqs.push((id, seq.clone()));
        drop(m);
        self.publish_members();
        (id, seq)
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
        m.seqs.retain(|(s, _)| *s != id);
        m.sinks.retain(|s| s.id != id);
        drop(m);
        self.publish_members();
    }

    pub(crate) async fn leave(self: &Arc<Self>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        // An end may be in flight behind the last events this node received: hand it on before going.
        self.await_ends_in_flight().await;
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Sources still open end here: the members learn how far each got (though not what it sent where).
        let open: Vec<(LocalId, u64)> =
            self.members.lock().seqs.iter().map(|(id, s)| (*id, s.load(Ordering::Acquire))).collect();
        for (id, last) in open {
            if last > 0 {
                self.source_ended(id, last, Vec::new());
            }
        }
        self.state.lock().leave(now());
        self.flush_leave().await;
        self.tree_leave();
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
                Some(Ok(Output::Send { to, addr, msg })) if self.tree_on() => {
                    self.tree_send_membership(&node, to, &addr, msg)
                }
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
            expired: c.expired.load(Ordering::Relaxed)
                + self.local_sinks.read().iter().map(|s| s.queue.expired.load(Ordering::Relaxed)).sum::<u64>(),
            stale: c.stale.load(Ordering::Relaxed),
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
        let (id, seq) = self.inner.add_source();
        let node = self.inner.node.upgrade().ok_or_else(|| Error::Closed(self.inner.name.clone()))?;
        Ok(Source::new(
            self.inner.clone(),
            self.guard.clone(),
            id,
            SourceKey::new(node.id, id),
            node.cfg.max_frame,
            seq,
            node.cfg.history,
        ))
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
        Ok(Sink::new(self.inner.clone(), sink, self.guard.clone()))
    }

    /// Installs (or with `None` removes) this node's IN-filter for the channel: it sees every event before it is
    /// dispatched to local sinks. Takes effect for the next event.
    pub fn set_in_filter(&self, filter: Option<Arc<dyn InFilter>>) {
        *self.inner.in_filter.write() = filter;
    }

    /// A source of serde values of type `T`, sent as JSON with event type `ty`.
    pub fn typed_source<T: serde::Serialize>(&self, ty: &str) -> Result<TypedSource<T>> {
        Ok(TypedSource::new(self.source()?, ty))
    }

    /// A sink of serde values of type `T` carried by events of type `ty`.
    pub fn typed_sink<T: serde::de::DeserializeOwned>(&self, ty: &str, opts: SinkOptions) -> Result<TypedSink<T>> {
        Ok(TypedSink::new(self.sink(opts.types([ty]))?))
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
        self.inner.sink_attrs()
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

    /// How this node's open of the channel went: registry lookups, join requests, when the contact's answer came
    /// and how many member nodes it listed (for benchmarks and diagnosis).
    pub fn join_trace(&self) -> kecho_proto::membership::JoinTrace {
        self.inner.state.lock().join_trace()
    }

    /// Counters for this channel on this node.
    pub fn stats(&self) -> ChannelStats {
        self.inner.stats()
    }

    /// Counters of tree mode for this channel on this node (see [`crate::NodeBuilder::tree_threshold`]).
    pub fn tree_stats(&self) -> TreeStats {
        self.inner.tree_stats()
    }

    /// Test hook: this node's overlay neighbours in tree mode (none in full-mesh mode).
    #[doc(hidden)]
    pub fn tree_neighbours(&self) -> Vec<NodeId> {
        self.inner.tree_neighbours()
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
                .map_err(|e| Error::AccessDenied { channel: self.inner.name.clone(), reason: e.into() })?;
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
            .map_err(|e| Error::AccessDenied { channel: self.inner.name.clone(), reason: e.into() })
    }

    fn check_right(&self, role: Roles) -> Result<()> {
        let rights = self.rights()?;
        if rights.contains(role) {
            Ok(())
        } else {
            Err(Error::AccessDenied {
                channel: self.inner.name.clone(),
                reason: Refusal::MissingRole { have: rights, need: role },
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
