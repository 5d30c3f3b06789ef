//! Sources and the submit path: choosing the sinks an event goes to, waiting for room at Block sinks, encoding it
//! once and queueing it on every chosen link, loss accounting towards each node, and handing it to local sinks.
//!
//! `Source::submit_inner` runs the steps in order; each is a method of the part of the source it works on, so that
//! the routing table can stay borrowed (not cloned) through all of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use std::time::Instant;

use kecho_proto::codec::{encode_deadline, encode_event, encode_routed, encode_targets, event_frame_len, EndDest};
use kecho_proto::{Attrs, ChannelId, LocalId, Message, NodeId, Overflow, Value};
use parking_lot::Mutex;

use super::deliver::SinkList;
use super::history::{History, Kept, RemoteSink, SentTo};
use super::routes::{Dest, IdMap, Routes};
use super::sink::LocalSink;
use super::{block_on, ChannelInner, Counters, NodeGuard};
use crate::clock::now;
use crate::error::{Error, Result};
use crate::filter::{CelRoot, EventView, FilterContext, OutFilter, SinkEntry, SinkView};
use crate::link::datagram;
use crate::link::{Expiry, Held, Peer, SourceGate, Urgency, COPY_BELOW};
use crate::queue::{ChunkBuf, SourceKey};
use crate::timely::{unix_us, EventOptions, Priority, BEST_EFFORT_ATTR};

mod batch;

/// Size of a source's encoding chunk (larger frames get a chunk of their own size).
const ENCODE_CHUNK: usize = 64 * 1024;

/// Publishes events on a channel. Events from one source reach each sink in submission order.
pub struct Source {
    _guard: Arc<NodeGuard>,
    ch: Arc<ChannelInner>,
    id: LocalId,
    /// This source as sinks see it.
    key: SourceKey,
    seq: u64,
    /// `seq` as the channel sees it, for the source's end should the node leave while the source is open.
    shared_seq: Arc<AtomicU64>,
    max_frame: usize,
    /// Events submitted since this source's task last gave its worker back (see [`Source::cooperate`]).
    unyielded: u32,
    out_filter: Option<Arc<dyn OutFilter>>,
    routing: Routing,
    pick: Pick,
    enc: Encoder,
    loss: LossTrack,
    /// Events cut-off sinks missed, kept to replay to them should their node come back.
    kept: Kept,
    /// `loss`, `kept` and `enc` are lent to the channel (held in `slot`) between submits, see [`Lent`].
    lent: bool,
    /// Where they are lent, made the first time they are.
    slot: Option<Arc<Lent>>,
    /// The type name of the last event given to local sinks.
    ty_name: Option<Arc<str>>,
    /// The priority and deadline of events that set none themselves: per type, then for all.
    type_opts: Vec<(String, EventOptions)>,
    opts: EventOptions,
    /// The value of the source's [`BEST_EFFORT_ATTR`] attribute as last published (empty: none).
    best_effort_attr: String,
}

/// An event's priority and deadline, as the submit path uses them.
#[derive(Clone, Copy, Default)]
struct Timing {
    /// The outbox lane (the priority's level).
    lane: u8,
    /// The deadline: on this node's clock, and as sent (microseconds since the Unix epoch).
    deadline: Option<(Instant, u64)>,
    /// Best-effort: sent as a datagram where the link has them and it fits.
    best_effort: bool,
}

impl Timing {
    /// The timing of an event submitted now with options `o`.
    fn of(o: EventOptions) -> Timing {
        Timing {
            lane: o.priority_set().unwrap_or(Priority::DEFAULT).level(),
            deadline: o.deadline_set().map(|d| {
                let at = now().checked_add(d).unwrap_or_else(|| now() + std::time::Duration::from_secs(1 << 32));
                (at, unix_us(std::time::SystemTime::now()).saturating_add(d.as_micros() as u64))
            }),
            best_effort: o.best_effort_set() == Some(true),
        }
    }

    /// The outbox placement of this event for one node.
    fn urgency<'a>(&self, held: &'a mut Held, expiry: Option<Expiry>, blocks: bool) -> Urgency<'a> {
        Urgency { lane: self.lane, expiry, held, blocks }
    }
}

/// The channel's routing table and installed OUT-filter, as of a routing generation: a source reads the channel's
/// again only when the generation moved.
struct Routing {
    /// `ChannelInner::routing_gen` when read (0: never).
    gen: u64,
    routes: Arc<Routes>,
    /// An OUT-filter installed on the channel by a member, for sources without one of their own.
    installed: Option<Arc<dyn OutFilter>>,
    /// Some sink of the channel has the Block policy (in tree mode, such sinks get events directly).
    blocks: bool,
}

/// Choosing an event's sinks: buffers reused from one submit to the next, so that the path does not allocate per
/// event.
#[derive(Default)]
struct Pick {
    /// The CEL root context, built on the first event that meets a content filter needing the interpreter, and kept.
    cel: Option<CelRoot>,
    /// Indices into `Routes::sinks` of the sinks that get the event.
    candidates: Vec<usize>,
    /// The OUT-filter's view of the candidates, its choice, and that choice as a mask over the candidates.
    view: Vec<Arc<SinkEntry>>,
    chosen: Vec<usize>,
    picked: Vec<bool>,
    /// Per peer (as `Routes::peers`): what goes to that node.
    peers: Vec<PeerPick>,
    /// The peers with sinks accepting the event (indices into `peers`, in table order): the only ones the later
    /// steps visit and the next reset clears, so that an event costs the nodes it may go to, not every node of the
    /// channel.
    touched: Vec<usize>,
    /// Local sinks that get the event.
    locals: Vec<Arc<LocalSink>>,
    /// Sinks of cut-off nodes that accept the event.
    ghosts: Vec<RemoteSink>,
}

/// What one peer node gets of an event.
#[derive(Default)]
struct PeerPick {
    /// Its sinks that accept the event's type.
    accepting: u32,
    /// Those chosen (by content filters and the OUT-filter).
    chosen: u32,
    /// A chosen one has the Block policy.
    blocks: bool,
    /// The chosen sinks' ids (sent as a `Targets` frame when not all accepting sinks were chosen).
    ids: Vec<LocalId>,
}

/// Encoding: the event is encoded once per submit, whatever the number of links.
#[derive(Default)]
struct Encoder {
    /// This node's instance of the channel (`ChannelInner::instance`), which `Routed` frames name as their origin.
    me: u64,
    /// Where frames shared by several links or local sinks are encoded.
    buf: ChunkBuf,
    /// The last small event frame, encoded once and copied into each link's outbox.
    small: BytesMut,
    /// The routing and target frames that precede an event on one link.
    prefix: BytesMut,
    /// Whether this source has been idle long enough to write to a quiet link itself.
    gate: SourceGate,
    /// Where each event of a batch's run of frames ends (`Source::submit_many`); and where each ends in the run
    /// with every event preceded by its `Targets` frame, for a node where not every accepting sink was chosen.
    ends: Vec<usize>,
    targeted_ends: Vec<usize>,
}

/// Loss accounting at the source (see docs/PROTOCOL.md, "Loss accounting").
#[derive(Default)]
struct LossTrack {
    /// Per destination node.
    sent_to: IdMap<NodeId, SendTrack>,
    /// Events that sinks of cut-off nodes would have received, to report when those nodes come back.
    ghost_missed: IdMap<RemoteSink, u64>,
    /// The routing table `ghost_missed` was last checked against: nodes come back (or are forgotten) only when the
    /// table is rebuilt, so the check runs once per table, not once per event while a node is cut off.
    ghosts_seen: u64,
    /// Nodes with counts in `ghost_missed` back in the table whose link is not up yet: the check runs at every event
    /// until it is (what they missed is reported on a link that is up, not queued on one that may still fail and
    /// throw its queue away), and their sinks stay ghosts meanwhile (events for them are counted and kept, not
    /// queued), so that everything they missed is replayed by one path, in order.
    waiting: Vec<NodeId>,
}

/// A source's loss accounting, history and encoder, lent to its channel between submits while sinks of cut-off nodes
/// have missed events not yet reported: the source's task owns the [`Source`] and may submit nothing for a long time,
/// so that the report (or the replay from the history) could not wait for its next event. The channel calls
/// [`Lent::wake`] when a node may be back (its routing table changed, a link came up); the source takes its parts
/// back at the start of its next submit, so the report goes ahead of that submit's event. In the common case (no
/// count pending) nothing is lent and the submit path takes no lock for this.
pub(super) struct Lent {
    source: LocalId,
    state: Mutex<LentState>,
}

#[derive(Default)]
struct LentState {
    /// The parts, while lent.
    core: Option<Core>,
    /// A wake came while the source held its parts (in a submit): it reports when it lends them again.
    kicked: bool,
}

/// What a report needs of a source.
#[derive(Default)]
struct Core {
    loss: LossTrack,
    kept: Kept,
    enc: Encoder,
}

impl Lent {
    /// A node may be back: what its sinks missed is reported (or replayed) now if its link is up. Called with no lock
    /// held.
    pub(super) fn wake(&self, ch: &Arc<ChannelInner>) {
        let waiting = {
            let mut st = self.state.lock();
            match st.core.as_mut() {
                Some(core) => core.report_due(ch, self.source),
                None => {
                    st.kicked = true;
                    return;
                }
            }
        };
        dial_waiting(ch, waiting);
    }
}

impl Core {
    /// Reports what is due against the channel's current routing table; returns the nodes back in it whose link is
    /// not up yet (in tree mode, to dial).
    fn report_due(&mut self, ch: &ChannelInner, source: LocalId) -> Vec<NodeId> {
        let routes = ch.routes.read().clone();
        self.loss.report_if_due(&routes, ch.id(), source, &mut self.kept, &mut self.enc);
        self.enc.gate.done();
        if ch.tree_on() {
            self.loss.waiting.clone()
        } else {
            Vec::new()
        }
    }
}

/// In tree mode nothing else makes this node dial a node back in the view whose sinks wait for what they missed
/// (see `submit_inner`). From a task of its own: the caller may hold the overlay's locks.
fn dial_waiting(ch: &Arc<ChannelInner>, waiting: Vec<NodeId>) {
    if waiting.is_empty() {
        return;
    }
    let Some(node) = ch.node.upgrade() else { return };
    let ch = ch.clone();
    node.spawn(async move {
        for id in waiting {
            ch.tree_dial(id);
        }
    });
}

/// Lends a source's parts to its channel when dropped (the end of a submit, or its cancellation).
struct LendOnExit<'a>(&'a mut Source);

impl Drop for LendOnExit<'_> {
    fn drop(&mut self) {
        self.0.lend_if_due();
    }
}

impl Source {
    /// Takes back the parts lent to the channel, if they are.
    #[inline]
    pub(super) fn reclaim(&mut self) {
        if self.lent {
            self.take_back();
        }
    }

    #[cold]
    fn take_back(&mut self) {
        self.lent = false;
        let Some(slot) = &self.slot else { return };
        let core = slot.state.lock().core.take();
        debug_assert!(core.is_some(), "lent parts are in the slot");
        if let Some(Core { loss, kept, enc }) = core {
            (self.loss, self.kept, self.enc) = (loss, kept, enc);
        }
    }

    /// Lends the parts to the channel if some sink's missed events are still to be reported.
    #[inline]
    pub(super) fn lend_if_due(&mut self) {
        if !self.lent && self.loss.has_ghost_counts() {
            self.lend();
        }
    }

    #[cold]
    fn lend(&mut self) {
        let slot = match &self.slot {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Lent { source: self.id, state: Mutex::new(LentState::default()) });
                let mut lenders = self.ch.lenders.lock();
                // Sources dropped since are forgotten here too, so that the list stays as long as the live ones.
                lenders.retain(|w| w.strong_count() > 0);
                lenders.push(Arc::downgrade(&s));
                drop(lenders);
                self.slot = Some(s.clone());
                s
            }
        };
        let mut core = Core {
            loss: std::mem::take(&mut self.loss),
            kept: std::mem::take(&mut self.kept),
            enc: std::mem::take(&mut self.enc),
        };
        let mut st = slot.state.lock();
        // A wake that came during the submit is answered now, under the lock: none is lost between the two.
        let waiting = if std::mem::take(&mut st.kicked) { core.report_due(&self.ch, self.id) } else { Vec::new() };
        if core.loss.has_ghost_counts() {
            st.core = Some(core);
            self.lent = true;
        } else {
            drop(st);
            (self.loss, self.kept, self.enc) = (core.loss, core.kept, core.enc);
        }
        dial_waiting(&self.ch, waiting);
    }
}

impl ChannelInner {
    /// A node may be back in this channel (the routing table changed, or a link came up): sources that lent their
    /// parts report what is due. Called with no lock held.
    pub(super) fn wake_lenders(self: &Arc<Self>) {
        let lenders: Vec<Arc<Lent>> = {
            let mut l = self.lenders.lock();
            if l.is_empty() {
                return;
            }
            l.retain(|w| w.strong_count() > 0);
            l.iter().filter_map(Weak::upgrade).collect()
        };
        for lent in lenders {
            lent.wake(self);
        }
    }
}

/// Loss accounting at a source, per destination node: how many of its events were queued to that node, and what the
/// node was last told about the others (see `Message::Routed`).
#[derive(Default)]
struct SendTrack {
    /// The instance of the channel on the node (`Routes::instances`) that this numbering is towards: a node that
    /// closed the channel and opened it again knows nothing of the numbers before, so its new instance gets a new
    /// track (`track_for`).
    instance: u64,
    routed: u64,
    /// The number (in `routed`'s count) of the last event sent to the node on the link's stream: a datagram sent
    /// after it names it, so that the node never delivers the datagram ahead of it (`link::datagram`).
    stream_last: u64,
    /// What was last told to the node, if anything.
    told: Option<Told>,
    /// The link (`Peer::serial` and epoch) the kept events in flight were last replayed on.
    replayed_on: Option<(u64, u64)>,
    /// Where this source's last frame to the node went in the link's outbox (its next must not overtake it).
    held: Held,
}

/// The `skipped` value last queued to a node, with the link it went on: a new `Peer`, or a new epoch of the same one,
/// means queued frames were lost with a broken link, so the node must be told again.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Told {
    skipped: u64,
    /// The `Peer` object, by `Peer::serial` (not by address: a dropped `Peer`'s successor may reuse it).
    peer: u64,
    /// Its epoch (`Peer::epoch`).
    epoch: u64,
}

/// Which event is being sent: what its frames carry besides the event itself.
#[derive(Clone, Copy)]
struct Head {
    channel: ChannelId,
    source: LocalId,
    seq: u64,
}

/// How many events a source's task submits before it gives its worker back once (see [`Source::cooperate`]).
const YIELD_EVERY: u32 = 1024;

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("channel", &self.ch.name).field("seq", &self.seq).finish()
    }
}

impl Source {
    pub(super) fn new(
        ch: Arc<ChannelInner>,
        guard: Arc<NodeGuard>,
        id: LocalId,
        key: SourceKey,
        max_frame: usize,
        shared_seq: Arc<AtomicU64>,
        history: History,
    ) -> Self {
        let mut kept = Kept::default();
        kept.set_limits(history, now());
        let me = ch.instance;
        Source {
            _guard: guard,
            ch,
            id,
            key,
            seq: 0,
            shared_seq,
            max_frame,
            unyielded: 0,
            out_filter: None,
            routing: Routing { gen: 0, routes: Arc::default(), installed: None, blocks: false },
            pick: Pick::default(),
            enc: Encoder { me, ..Encoder::default() },
            loss: LossTrack::default(),
            kept,
            lent: false,
            slot: None,
            ty_name: None,
            type_opts: Vec::new(),
            opts: EventOptions::default(),
            best_effort_attr: String::new(),
        }
    }

    /// Submits an event; waits only if a sink with the Block policy is full. Returns the event's sequence number.
    pub async fn submit(&mut self, ty: &str, attrs: &Attrs, payload: &[u8]) -> Result<u64> {
        self.cooperate(1).await;
        self.submit_inner(ty, attrs, payload, true, EventOptions::default()).await
    }

    /// Submits an event with its own priority and deadline (see [`EventOptions`]; what it leaves unset comes from
    /// [`Source::set_type_options`] and [`Source::set_options`]). An event whose deadline passes before it reaches a
    /// sink's receiver is not delivered: the sink gets [`crate::RecvError::Expired`] in its place.
    pub async fn submit_with(&mut self, ty: &str, attrs: &Attrs, payload: &[u8], opts: EventOptions) -> Result<u64> {
        self.cooperate(1).await;
        self.submit_inner(ty, attrs, payload, true, opts).await
    }

    /// Gives the worker back once every [`YIELD_EVERY`] events (`n` more now). A submit that finds room returns
    /// without ever being pending, so a loop of them would keep its worker to itself: the link writer it wakes waits
    /// in that worker's next-task slot, which other workers do not steal, so nothing reached the wire, and the node
    /// answered no heartbeat, until the loop blocked on a full link (under CPU starvation the peer declared the link
    /// dead again and again). Every 1,024 events rather than tokio's cooperative budget (about every 128): that one
    /// cost the single-event path about 100 ns of CPU per event in `examples/local`. Before anything is sent, so a
    /// submit cancelled here has sent nothing.
    pub(super) async fn cooperate(&mut self, n: u32) {
        self.unyielded = self.unyielded.saturating_add(n);
        if self.unyielded >= YIELD_EVERY {
            self.unyielded = 0;
            tokio::task::yield_now().await;
        }
    }

    /// Submits without ever waiting: fails with [`Error::WouldBlock`] (sending nothing) if a Block sink is full.
    pub fn try_submit(&mut self, ty: &str, attrs: &Attrs, payload: &[u8]) -> Result<u64> {
        self.try_submit_with(ty, attrs, payload, EventOptions::default())
    }

    /// [`Source::try_submit`] with the event's own priority and deadline.
    pub fn try_submit_with(&mut self, ty: &str, attrs: &Attrs, payload: &[u8], opts: EventOptions) -> Result<u64> {
        let fut = self.submit_inner(ty, attrs, payload, false, opts);
        // The non-waiting path never awaits anything pending, so one poll completes it.
        futures_util::FutureExt::now_or_never(fut).unwrap_or(Err(Error::WouldBlock))
    }

    /// Blocking form of [`Source::submit`], for threads outside the runtime.
    pub fn submit_blocking(&mut self, ty: &str, attrs: &Attrs, payload: &[u8]) -> Result<u64> {
        block_on(self.submit_inner(ty, attrs, payload, true, EventOptions::default()))?
    }

    /// Sets the priority and deadline of this source's events that set none themselves (and whose type has none,
    /// see [`Source::set_type_options`]).
    pub fn set_options(&mut self, opts: EventOptions) {
        self.opts = opts;
        self.publish_best_effort();
    }

    /// Sets the priority, deadline and best-effort delivery of this source's events of type `ty` that set none
    /// themselves.
    pub fn set_type_options(&mut self, ty: &str, opts: EventOptions) {
        match self.type_opts.iter_mut().find(|(t, _)| t == ty) {
            Some((_, o)) => *o = opts,
            None => self.type_opts.push((ty.to_owned(), opts)),
        }
        self.publish_best_effort();
    }

    /// Tells the channel's members which types this source declared best-effort (its [`BEST_EFFORT_ATTR`]
    /// attribute), when that changed.
    fn publish_best_effort(&mut self) {
        let value = if self.opts.best_effort_set() == Some(true) {
            "*".to_owned()
        } else {
            let types: Vec<&str> = self
                .type_opts
                .iter()
                .filter(|(_, o)| o.best_effort_set() == Some(true))
                .map(|(t, _)| t.as_str())
                .collect();
            types.join(",")
        };
        if value != self.best_effort_attr {
            self.best_effort_attr = value.clone();
            self.ch.set_source_attr(self.id, BEST_EFFORT_ATTR.to_owned(), Value::Str(value));
        }
    }

    /// The options an event of type `ty` submitted with `opts` gets.
    #[inline]
    fn options(&self, ty: &str, opts: EventOptions) -> EventOptions {
        if self.type_opts.is_empty() {
            return opts.or(self.opts);
        }
        let by_type = self.type_opts.iter().find(|(t, _)| t == ty).map(|(_, o)| *o).unwrap_or_default();
        opts.or(by_type).or(self.opts)
    }

    /// Sinks present in the channel.
    pub fn sinks(&self) -> usize {
        *self.ch.sinks_present.borrow()
    }

    /// Installs (or with `None` removes) the OUT-filter that chooses which sinks get each event; the default sends
    /// to every sink whose type and content filters accept it. Replacing it between two submits loses or repeats
    /// nothing: each event sees exactly one filter.
    pub fn set_out_filter(&mut self, filter: Option<Arc<dyn OutFilter>>) {
        match (self.out_filter.is_some(), filter.is_some()) {
            (false, true) => _ = self.ch.out_sources.fetch_add(1, Ordering::AcqRel),
            (true, false) => {
                self.out_filter = None;
                // In tree mode the table need not link every sink any more (its idle links are then forgotten).
                if self.ch.out_sources.fetch_sub(1, Ordering::AcqRel) == 1 && self.routing.routes.direct {
                    if let Some(node) = self.ch.node.upgrade() {
                        if self.ch.tree_on() {
                            self.ch.rebuild_routes(&node);
                        }
                    }
                }
                self.routing.refresh(&self.ch);
            }
            _ => {}
        }
        self.out_filter = filter;
    }

    /// Sets how much of the events that sinks of cut-off nodes miss this source keeps, to replay to them (in order,
    /// before anything newer) should their node come back; what falls outside is reported to them as missed. The
    /// default is the node's ([`crate::NodeBuilder::history`]). See docs/DURABILITY.md.
    pub fn set_history(&mut self, history: History) {
        self.reclaim();
        self.kept.set_limits(history, now());
        self.lend_if_due();
    }

    /// Sets an attribute this source supplies to the channel (published promptly, coalesced).
    pub fn set_attr(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.ch.set_source_attr(self.id, name.into(), value.into());
    }

    /// The submit path. `wait`: wait for room at full Block sinks (else fail with `WouldBlock`, sending nothing).
    async fn submit_inner(
        &mut self,
        ty: &str,
        attrs: &Attrs,
        payload: &[u8],
        wait: bool,
        opts: EventOptions,
    ) -> Result<u64> {
        self.reclaim();
        // Lent again once the submit is over, whether it finished or was cancelled at an await. The steps are in this
        // function rather than one it awaits: a future nested one level deeper cost about 10 ns of CPU per event
        // (`examples/local`, single submits).
        let lend = LendOnExit(self);
        let this = &mut *lend.0;
        let len = this.check(ty, attrs, payload)?;
        let opts = this.options(ty, opts);
        let timing = if opts == EventOptions::default() { Timing::default() } else { Timing::of(opts) };
        // Tree mode (`tree.rs`): along the overlay, unless an OUT-filter must choose the sinks (then directly). Block
        // sinks get the event directly, so that they slow the source as in full-mesh mode (docs/SCALE.md).
        let tree = this.ch.tree_on() && this.out_filter.is_none() && this.ch.out_default.read().is_none();
        if tree {
            this.routing.refresh(&this.ch);
        }
        if tree && !this.routing.blocks {
            this.seq += 1;
            this.shared_seq.store(this.seq, Ordering::Release);
            let head = super::TreeHead { lane: timing.lane, deadline: timing.deadline.map(|(_, unix)| unix) };
            let history = this.kept.limits();
            this.ch.submit_tree(this.id, this.key, this.seq, (ty, attrs, payload), head, history);
            return Ok(this.seq);
        }
        this.routing.refresh(&this.ch);
        if !tree && !this.routing.routes.direct && this.ch.tree_on() {
            // An OUT-filter in tree mode: the table must give every sink a link (it gives them only to the nodes
            // with Block sinks while no source needs more). Set now, so it stays so while the filter is on.
            if let Some(node) = this.ch.node.upgrade() {
                this.ch.rebuild_routes(&node);
            }
            this.routing.refresh(&this.ch);
        }
        let routes = &*this.routing.routes;
        // 0. Nodes whose sinks missed events and that are back get what they missed ahead of this event; those whose
        // link is not up yet stay ghosts for it.
        this.loss.report_if_due(routes, this.ch.id(), this.id, &mut this.kept, &mut this.enc);
        if tree {
            // Nothing is queued to a waiting node (its sinks are ghosts until its link is up), so nothing else makes
            // this node dial it in tree mode, where only overlay neighbours keep links: without a dial its link would
            // come up only if the overlay happened to pick it, and until then it would miss every event.
            for &id in &this.loss.waiting {
                this.ch.tree_dial(id);
            }
        }
        let pick = &mut this.pick;
        pick.reset(routes);
        // 1. The sinks whose type and content filters accept the event.
        pick.accepting(routes, ty, attrs, tree, &this.loss.waiting);
        // 2. The OUT-filter chooses among them (the source's own, or one installed on the channel by a member).
        if let Some(f) = this.out_filter.as_ref().or(this.routing.installed.as_ref()) {
            pick.out_filter(&**f, routes, &EventView { ty, attrs, payload });
        }
        // 3. Where they are: per peer node, and local.
        pick.by_place(routes);
        if this.ch.tree_on() {
            // Block sinks' nodes (and, with an OUT-filter, the chosen sinks' nodes) get the event directly: a link to
            // each, whether or not the overlay uses it.
            for &p in &pick.touched {
                let peer = &routes.peers[p];
                if pick.peers[p].chosen > 0 && !peer.is_up() {
                    this.ch.tree_dial(peer.id);
                }
            }
        }
        // 4. Wait for room at Block sinks before sending anything, so that an event goes to all of its sinks or none.
        pick.wait_for_room(routes, len, wait, timing.lane).await?;

        // 5. Number and count it, and what cut-off nodes missed.
        this.seq += 1;
        this.shared_seq.store(this.seq, Ordering::Release);
        let head = Head { channel: this.ch.id(), source: this.id, seq: this.seq };
        let c = &this.ch.counters;
        if tree {
            // Along the overlay for every sink but the Block ones, which the rest of this path serves.
            let head = super::TreeHead { lane: timing.lane, deadline: timing.deadline.map(|(_, unix)| unix) };
            let history = this.kept.limits();
            this.ch.submit_tree(this.id, this.key, this.seq, (ty, attrs, payload), head, history);
        } else {
            c.submitted.fetch_add(1, Ordering::Relaxed);
        }
        if !pick.ghosts.is_empty() && this.kept.is_on() {
            // Kept for the cut-off sinks that would have received it (only while some node is cut off).
            let b = this.enc.buf.room(len + 16 * attrs.len(), ENCODE_CHUNK);
            encode_event(b, head.channel, head.source, head.seq, ty, attrs, payload);
            this.kept.keep(head.seq, b.split().freeze(), &pick.ghosts, now());
        }
        this.loss.count_ghosts(&mut pick.ghosts, routes, head, &mut this.kept, &mut this.enc);
        if pick.candidates.is_empty() {
            c.filtered.fetch_add(1, Ordering::Relaxed);
            return Ok(head.seq);
        }
        if timing.deadline.is_some_and(|(at, _)| now() >= at) {
            // It expired while waiting for room: its sinks are told, nothing is sent.
            c.expired.fetch_add(1, Ordering::Relaxed);
            this.enc.send_expired(
                &mut pick.peers,
                &pick.touched,
                routes,
                &mut this.loss,
                &mut this.kept,
                head,
                ty,
                timing,
            );
            for l in &pick.locals {
                l.queue.add_expired(1);
            }
            return Ok(head.seq);
        }
        // 6. Send: encoded once, the same bytes on every link.
        let ev = EventView { ty, attrs, payload };
        let frame = this.enc.send(
            &mut pick.peers,
            &pick.touched,
            routes,
            &mut this.loss,
            c,
            head,
            ev,
            len,
            pick.locals.is_empty(),
            &mut this.kept,
            timing,
        );
        // 7. Local sinks get the event without any encoding.
        if !pick.locals.is_empty() {
            // Share the encoded payload when there is one; copy it once otherwise.
            let payload = match &frame {
                Some(f) => f.slice(f.len() - payload.len()..),
                None => Bytes::copy_from_slice(payload),
            };
            c.received.fetch_add(1, Ordering::Relaxed);
            let locals = std::mem::take(&mut pick.locals);
            // The type's name is shared by the events of this source while it keeps sending that type.
            let name = match &this.ty_name {
                Some(n) if **n == *ty => n.clone(),
                _ => this.ty_name.insert(Arc::from(ty)).clone(),
            };
            this.ch
                .dispatch(
                    locals.iter().collect::<SinkList<'_>>(),
                    name,
                    attrs.clone(),
                    payload,
                    head.seq,
                    this.key,
                    timing.deadline.map(|(_, unix)| unix),
                )
                .await;
            this.pick.locals = locals;
        }
        Ok(head.seq)
    }

    /// Checks that the event may be submitted; returns its frame's length.
    fn check(&self, ty: &str, attrs: &Attrs, payload: &[u8]) -> Result<usize> {
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
        Ok(len)
    }
}

impl Routing {
    /// Reads the channel's routing table and installed OUT-filter again if they changed.
    fn refresh(&mut self, ch: &ChannelInner) {
        let gen = ch.routing_gen.load(Ordering::Acquire);
        if self.gen != gen {
            let routes = ch.routes.read().clone();
            let blocks = routes.sinks.iter().any(|r| r.overflow == Overflow::Block);
            *self = Routing { gen, routes, installed: ch.out_default.read().clone(), blocks };
        }
    }
}

impl Pick {
    /// Empties the buffers for an event, one `PeerPick` per peer of `routes` (each keeping its list's memory).
    fn reset(&mut self, routes: &Routes) {
        // Only the peers the last event touched can hold anything.
        for &p in &self.touched {
            if let Some(p) = self.peers.get_mut(p) {
                (p.accepting, p.chosen, p.blocks) = (0, 0, false);
                p.ids.clear();
            }
        }
        self.touched.clear();
        self.peers.truncate(routes.peers.len());
        self.peers.resize_with(routes.peers.len(), PeerPick::default);
        self.locals.clear();
        self.candidates.clear();
        self.ghosts.clear();
    }

    /// Step 1: the sinks whose type and content filters accept the event go to `candidates` (sinks of cut-off nodes
    /// to `ghosts`); each peer counts its sinks accepting the type.
    /// `blocks_only` (tree mode): only Block sinks are candidates (the others get the event through the overlay), but
    /// every sink accepting the type still counts, so that a node with others gets a `Targets` frame naming them.
    /// `waiting`: nodes whose sinks are still ghosts although back in the table (see `LossTrack::waiting`).
    fn accepting(&mut self, routes: &Routes, ty: &str, attrs: &Attrs, blocks_only: bool, waiting: &[NodeId]) {
        if routes.slow_filter && self.cel.is_none() {
            self.cel = Some(CelRoot::default());
        }
        let root = self.cel.as_ref();
        let mut ctx: Option<FilterContext<'_>> = None;
        let mut at = None;
        for i in routes.accepting(ty) {
            let r = &routes.sinks[i];
            match r.dest {
                Dest::Remote(p) => {
                    let pick = &mut self.peers[p];
                    if pick.accepting == 0 {
                        self.touched.push(p);
                    }
                    pick.accepting += 1;
                }
                Dest::Ghost(_, _, until) if *at.get_or_insert_with(now) >= until => continue,
                _ => {}
            }
            if blocks_only && r.overflow != Overflow::Block {
                continue;
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
            if let Dest::Ghost(node, instance, _) = r.dest {
                self.ghosts.push(RemoteSink { node, instance, sink: r.entry.id });
                continue;
            }
            if !waiting.is_empty() && !r.entry.local && waiting.contains(&r.entry.node) {
                self.ghosts.push(RemoteSink { node: r.entry.node, instance: r.instance, sink: r.entry.id });
                continue;
            }
            self.candidates.push(i);
        }
    }

    /// Step 2: keeps the candidates the OUT-filter chooses.
    fn out_filter(&mut self, f: &dyn OutFilter, routes: &Routes, ev: &EventView<'_>) {
        // The OUT-filter chooses among present sinks only, so nobody can say whether a cut-off sink would have been
        // chosen: it is not counted as missing anything.
        self.ghosts.clear();
        self.view.clear();
        self.view.extend(self.candidates.iter().map(|&i| routes.sinks[i].entry.clone()));
        self.chosen.clear();
        f.select(ev, &SinkView { entries: &self.view, now: now() }, &mut self.chosen);
        self.picked.clear();
        self.picked.resize(self.candidates.len(), false);
        for &j in &self.chosen {
            if let Some(p) = self.picked.get_mut(j) {
                *p = true;
            }
        }
        let picked = &self.picked;
        let mut k = 0;
        self.candidates.retain(|_| {
            k += 1;
            picked[k - 1]
        });
    }

    /// Step 3: sorts the candidates by where they live.
    fn by_place(&mut self, routes: &Routes) {
        for &i in &self.candidates {
            let r = &routes.sinks[i];
            match &r.dest {
                Dest::Remote(p) => {
                    let p = &mut self.peers[*p];
                    p.chosen += 1;
                    p.blocks |= r.overflow == Overflow::Block;
                    p.ids.push(r.entry.id);
                }
                Dest::Local(l) => self.locals.push(l.clone()),
                Dest::Ghost(..) => {}
            }
        }
    }

    /// Step 4: waits until every chosen Block sink has room for an event of `len` bytes (or, if not `wait`, fails
    /// when one has none).
    async fn wait_for_room(&self, routes: &Routes, len: usize, wait: bool, lane: u8) -> Result<()> {
        for &p in &self.touched {
            let pick = &self.peers[p];
            if pick.chosen > 0 && pick.blocks && !routes.peers[p].outbox.has_room(len, lane) {
                if !wait {
                    return Err(Error::WouldBlock);
                }
                routes.peers[p].outbox.wait_room(len, lane).await;
            }
        }
        if !wait && self.locals.iter().any(|s| s.queue.overflow() == Overflow::Block && s.queue.is_full()) {
            return Err(Error::WouldBlock);
        }
        Ok(())
    }
}

impl LossTrack {
    /// Counts the event for sinks of cut-off nodes that would have got it, and reports what they missed to nodes
    /// that are back.
    fn count_ghosts(
        &mut self,
        ghosts: &mut Vec<RemoteSink>,
        routes: &Routes,
        head: Head,
        kept: &mut Kept,
        enc: &mut Encoder,
    ) {
        for g in ghosts.drain(..) {
            *self.ghost_missed.entry(g).or_default() += 1;
        }
        self.report_if_due(routes, head.channel, head.source, kept, enc);
    }

    /// Some sink's missed events are still to be reported.
    fn has_ghost_counts(&self) -> bool {
        !self.ghost_missed.is_empty()
    }

    /// `report_ghost_missed` once per routing table, and at every event while a node waits for its link.
    fn report_if_due(
        &mut self,
        routes: &Routes,
        channel: ChannelId,
        source: LocalId,
        kept: &mut Kept,
        enc: &mut Encoder,
    ) {
        if !self.ghost_missed.is_empty() && (self.ghosts_seen != routes.generation || !self.waiting.is_empty()) {
            self.ghosts_seen = routes.generation;
            self.report_ghost_missed(routes, channel, source, kept, enc);
        }
    }

    /// Nodes that are back get what their sinks missed while cut off: the kept events, replayed in order (ahead of
    /// anything newer this source sends them), and a `Lagged` frame per sink for those that fell out of the history
    /// (ahead of the replay, since they are older). The counts of nodes gone for good are forgotten.
    fn report_ghost_missed(
        &mut self,
        routes: &Routes,
        channel: ChannelId,
        source: LocalId,
        kept: &mut Kept,
        enc: &mut Encoder,
    ) {
        let mut back: Vec<NodeId> = Vec::new();
        let mut gone: Vec<NodeId> = Vec::new();
        let mut reopened: Vec<(NodeId, u64)> = Vec::new();
        self.waiting.clear();
        for g in self.ghost_missed.keys() {
            if let Some(at_p) = routes.peers.iter().position(|p| p.id == g.node) {
                let p = &routes.peers[at_p];
                if routes.instances[at_p] != g.instance {
                    // Back with another instance of the channel: the sinks counted for are gone with theirs, and the
                    // new instance's (numbered from 1 again) must get nothing of theirs.
                    if !reopened.iter().any(|(n, _)| *n == g.node) {
                        reopened.push((g.node, routes.instances[at_p]));
                    }
                } else if !p.is_up() {
                    // Back in the view (a member's view listed it again, say) but not reached yet: if the dial
                    // fails, it leaves the view again and the count goes on.
                    if !self.waiting.contains(&g.node) {
                        self.waiting.push(g.node);
                    }
                } else if !back.contains(&g.node) {
                    back.push(g.node);
                }
            } else if !routes.sinks.iter().any(|r| matches!(r.dest, Dest::Ghost(n, _, _) if n == g.node)) {
                gone.push(g.node);
            }
        }
        for node in gone {
            self.ghost_missed.retain(|g, _| g.node != node);
            kept.forget(node);
        }
        for (node, instance) in reopened {
            tracing::debug!(node = %node, "a cut-off node came back with the channel opened again: what its earlier sinks missed is forgotten");
            self.ghost_missed.retain(|g, _| g.node != node || g.instance == instance);
            kept.forget_other_instances(node, instance);
        }
        let at = now();
        for node in back {
            let Some(at_p) = routes.peers.iter().position(|p| p.id == node) else { continue };
            let (peer, instance) = (&routes.peers[at_p], routes.instances[at_p]);
            if kept.is_on() {
                let track = track_for(&mut self.sent_to, node, instance, kept);
                if track.relinked(peer) {
                    track.replay_in_flight(peer, kept, channel, source, enc);
                }
            }
            let replays = kept.take_for(node, instance, at);
            let mut replayed: IdMap<LocalId, u64> = IdMap::default();
            for r in &replays {
                for s in &r.sinks {
                    *replayed.entry(*s).or_default() += 1;
                }
            }
            self.ghost_missed.retain(|g, count| {
                if g.node != node || g.instance != instance {
                    return true;
                }
                let left = count.saturating_sub(replayed.get(&g.sink).copied().unwrap_or(0));
                if left > 0 {
                    let msg = Message::Lagged { channel, source, instance, count: left, sinks: vec![g.sink] };
                    peer.outbox.push_control(msg.to_bytes());
                }
                false
            });
            let track = track_for(&mut self.sent_to, node, instance, kept);
            for r in replays {
                let (told, tell) = track.before(peer, r.seq);
                if tell {
                    encode_routed(&mut enc.prefix, channel, source, track.instance, enc.me, told.skipped);
                }
                encode_targets(&mut enc.prefix, channel, &r.sinks);
                if peer.outbox.push_event_with(&enc.prefix, r.frame, &mut enc.gate, Urgency::plain(&mut track.held)) {
                    track.sent(told);
                } else {
                    peer.add_lag(channel, source, track.instance, &r.sinks, 1, 0);
                }
                enc.prefix.clear();
            }
        }
    }
}

impl LossTrack {
    /// What this source knows of each node's share of its events, for its `SourceEnd`.
    fn dests(&self) -> Vec<EndDest> {
        let mut out: Vec<EndDest> = self
            .sent_to
            .iter()
            .map(|(n, t)| EndDest { node: *n, instance: t.instance, routed: t.routed, missed: Vec::new() })
            .collect();
        // Per node and instance: counts kept for sinks of an earlier instance of a node's channel are not the
        // numbering of its current one.
        for (g, n) in &self.ghost_missed {
            match out.iter_mut().find(|d| d.node == g.node && d.instance == g.instance) {
                Some(d) => d.missed.push((g.sink, *n)),
                None => out.push(EndDest { node: g.node, instance: g.instance, routed: 0, missed: vec![(g.sink, *n)] }),
            }
        }
        out
    }
}

/// The track of node `node` for `instance` of the channel there. When the node opened the channel again since the
/// track was last used, the new instance's receiver has no state for this source: the numbering starts again (its
/// first event goes on the stream and sets its baseline, with a `Routed` frame, see `datagram::numbers`), and the
/// events kept for replay to the old instance are forgotten (they were never meant for the new one). Only the
/// source's place in the link's outbox (`held`) carries over, so that its frames still never overtake each other.
fn track_for<'a>(
    sent_to: &'a mut IdMap<NodeId, SendTrack>,
    node: NodeId,
    instance: u64,
    kept: &mut Kept,
) -> &'a mut SendTrack {
    let track = sent_to.entry(node).or_default();
    if track.instance != instance {
        if track.instance != 0 {
            kept.forget_sent_to(node);
            *track = SendTrack { held: std::mem::take(&mut track.held), ..SendTrack::default() };
        }
        track.instance = instance;
    }
    track
}

impl SendTrack {
    /// Before event `seq` goes to `peer`: what the node must know of the events not meant for it, and whether it must
    /// be told (whenever that changed, and on every new link). Call `sent` once the event is queued.
    fn before(&self, peer: &Arc<Peer>, seq: u64) -> (Told, bool) {
        let now = Told { skipped: seq.saturating_sub(self.routed + 1), peer: peer.serial(), epoch: peer.epoch() };
        (now, self.told != Some(now))
    }

    /// True if events went to the node on a link that is not `peer`'s current one (it broke, perhaps with some of
    /// them in flight) and they were not replayed on this one yet.
    fn relinked(&self, peer: &Arc<Peer>) -> bool {
        let link = (peer.serial(), peer.epoch());
        self.replayed_on != Some(link) && self.told.is_some_and(|t| (t.peer, t.epoch) != link)
    }

    /// Replays to `peer` the kept events queued to it before (on a link that broke), with their original numbers so
    /// that the node drops those it has and counts nothing twice; ahead of anything newer.
    fn replay_in_flight(
        &mut self,
        peer: &Arc<Peer>,
        kept: &Kept,
        channel: ChannelId,
        source: LocalId,
        enc: &mut Encoder,
    ) {
        self.replayed_on = Some((peer.serial(), peer.epoch()));
        for (seq, n, frame, targets) in kept.sent_to(peer.id) {
            self.stream_last = self.stream_last.max(n);
            encode_routed(&mut enc.prefix, channel, source, self.instance, enc.me, seq.saturating_sub(n));
            if let Some(t) = targets {
                encode_targets(&mut enc.prefix, channel, t);
            }
            // A full link drops the copy; the node then reports the gap in transit as for any lost event.
            let _ =
                peer.outbox.push_event_with(&enc.prefix, frame.clone(), &mut enc.gate, Urgency::plain(&mut self.held));
            enc.prefix.clear();
        }
        // The next event tells the node its current numbering again.
        self.told = None;
    }

    /// The event was queued to the node, which then knows `told`.
    fn sent(&mut self, told: Told) {
        self.routed += 1;
        self.stream_last = self.routed;
        self.told = Some(told);
    }

    /// The event went to the node as a datagram, which carries its number itself: what the stream told the node
    /// stays as it was.
    fn sent_datagram(&mut self) {
        self.routed += 1;
    }
}

impl Encoder {
    /// Step 6: encodes the event once and queues it on every link with chosen sinks, each preceded by its routing and
    /// target frames where needed. `copy`: no local sink shares the frame, so a small one is copied into each outbox.
    /// Returns the shared frame, if one was made.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        peers: &mut [PeerPick],
        touched: &[usize],
        routes: &Routes,
        loss: &mut LossTrack,
        c: &Counters,
        head: Head,
        ev: EventView<'_>,
        len: usize,
        copy: bool,
        kept: &mut Kept,
        timing: Timing,
    ) -> Option<Bytes> {
        let keep = kept.is_on();
        let mut went: smallvec::SmallVec<[SentTo; 1]> = smallvec::SmallVec::new();
        let mut frame = None;
        // A small event that no local sink shares is copied into each link's outbox (see `Outbox::push_event_copied`)
        // from a buffer used again for the next; larger ones are shared by every link.
        let copied = copy && len < COPY_BELOW;
        if copied {
            self.small.clear();
            encode_event(&mut self.small, head.channel, head.source, head.seq, ev.ty, ev.attrs, ev.payload);
        }
        // Counted once per submit rather than per link.
        let (mut sent_to, mut sent_bytes) = (0, 0);
        for &p in touched {
            let pick = &mut peers[p];
            if pick.chosen == 0 {
                continue;
            }
            let peer = &routes.peers[p];
            peer.flush_lag();
            // Loss accounting: tell the node how many events were not meant for it whenever that changed, and on
            // every new link.
            let track = track_for(&mut loss.sent_to, peer.id, routes.instances[p], kept);
            if keep && track.relinked(peer) {
                track.replay_in_flight(peer, kept, head.channel, head.source, self);
            }
            let (told, tell) = track.before(peer, head.seq);
            // A best-effort event goes as a datagram where the link has them, it fits, no sink there waits for room
            // (a Block sink is promised every event) and none of the source's frames wait in the outbox ahead of it.
            // Not the source's first event to the node: that one goes on the stream (see `datagram::numbers`).
            let numbers = datagram::numbers(track.routed, track.stream_last);
            if let Some(numbers) = numbers.filter(|_| {
                timing.best_effort && !pick.blocks && peer.has_datagrams() && !peer.outbox.holds(&track.held)
            }) {
                let bytes: &[u8] = if copied {
                    &self.small
                } else {
                    frame.get_or_insert_with(|| {
                        let b = self.buf.room(len + 16 * ev.attrs.len(), ENCODE_CHUNK);
                        encode_event(b, head.channel, head.source, head.seq, ev.ty, ev.attrs, ev.payload);
                        b.split().freeze()
                    })
                };
                let targets = (pick.chosen < pick.accepting).then_some(&pick.ids[..]);
                if send_datagram(peer, &mut self.prefix, head, numbers, targets, timing, bytes) {
                    track.sent_datagram();
                    if keep {
                        went.push((peer.id, track.routed, targets.map(<[LocalId]>::to_vec)));
                    }
                    sent_to += 1;
                    sent_bytes += bytes.len() as u64;
                    pick.ids.clear();
                    continue;
                }
            }
            // Routing and target frames go in a buffer of the source's, copied into the outbox with the event.
            if tell {
                encode_routed(&mut self.prefix, head.channel, head.source, track.instance, self.me, told.skipped);
            }
            if pick.chosen < pick.accepting {
                encode_targets(&mut self.prefix, head.channel, &pick.ids);
            }
            // With a deadline: the frame carries it, and the outbox knows what to send instead should it pass.
            let expiry = timing.deadline.map(|(at, unix)| {
                encode_deadline(&mut self.prefix, head.channel, unix);
                let targets = if pick.chosen < pick.accepting { &pick.ids[..] } else { &[] };
                Expiry {
                    deadline: at,
                    instead: expired_notice(
                        head,
                        ev.ty,
                        targets,
                        tell.then_some((track.instance, self.me, told.skipped)),
                    ),
                }
            });
            let urgency = timing.urgency(&mut track.held, expiry, pick.blocks);
            let (pushed, sent) = if copied {
                (peer.outbox.push_event_copied(&self.prefix, &self.small, &mut self.gate, urgency), self.small.len())
            } else {
                let f = frame.get_or_insert_with(|| {
                    let b = self.buf.room(len + 16 * ev.attrs.len(), ENCODE_CHUNK);
                    encode_event(b, head.channel, head.source, head.seq, ev.ty, ev.attrs, ev.payload);
                    b.split().freeze()
                });
                (peer.outbox.push_event_with(&self.prefix, f.clone(), &mut self.gate, urgency), f.len())
            };
            self.prefix.clear();
            if pushed {
                track.sent(told);
                if keep {
                    let targets = (pick.chosen < pick.accepting).then(|| pick.ids.clone());
                    went.push((peer.id, track.routed, targets));
                }
                sent_to += 1;
                sent_bytes += sent as u64;
            } else {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                let lane = track.held.lane().map_or(timing.lane, |l| l.min(timing.lane));
                peer.add_lag(head.channel, head.source, track.instance, &pick.ids, 1, lane);
            }
            pick.ids.clear();
        }
        if sent_to > 0 {
            c.sent.fetch_add(sent_to, Ordering::Relaxed);
            c.bytes_sent.fetch_add(sent_bytes, Ordering::Relaxed);
        }
        self.gate.done();
        if !went.is_empty() {
            // Kept for a node whose link breaks with it in flight.
            let at = kept.needs_time().then(now);
            match &frame {
                Some(f) => kept.sent(head.seq, f.clone(), went, at),
                None => kept.sent_small(head.seq, &self.small, went, at),
            }
        }
        frame
    }
}

impl Encoder {
    /// Sends, in place of an event that expired before it was sent, its expiry notice to every node with chosen
    /// sinks (in the event's place in the node's numbering, so that it is not taken for a loss).
    #[allow(clippy::too_many_arguments)]
    fn send_expired(
        &mut self,
        peers: &mut [PeerPick],
        touched: &[usize],
        routes: &Routes,
        loss: &mut LossTrack,
        kept: &mut Kept,
        head: Head,
        ty: &str,
        timing: Timing,
    ) {
        for &p in touched {
            let pick = &mut peers[p];
            if pick.chosen == 0 {
                continue;
            }
            let peer = &routes.peers[p];
            peer.flush_lag();
            let track = track_for(&mut loss.sent_to, peer.id, routes.instances[p], kept);
            let (told, tell) = track.before(peer, head.seq);
            let targets = if pick.chosen < pick.accepting { &pick.ids[..] } else { &[] };
            let notice = expired_notice(head, ty, targets, tell.then_some((track.instance, self.me, told.skipped)));
            let urgency = timing.urgency(&mut track.held, None, pick.blocks);
            if peer.outbox.push_event_with(&[], notice, &mut self.gate, urgency) {
                track.sent(told);
            } else {
                peer.add_lag(head.channel, head.source, track.instance, &pick.ids, 1, timing.lane);
            }
            pick.ids.clear();
        }
        self.gate.done();
    }
}

/// Sends event frame `ev` to `peer` as a datagram if it fits (see `link::datagram` for the layout), with `numbers`
/// (its number towards the node, and that of the source's last event sent on the stream) and its `Targets` and
/// `Deadline` frames; `buf` is scratch space, left empty. False if it did not go (the caller sends it on the
/// stream).
fn send_datagram(
    peer: &Peer,
    buf: &mut BytesMut,
    head: Head,
    (number, after): (u64, u64),
    targets: Option<&[LocalId]>,
    timing: Timing,
    ev: &[u8],
) -> bool {
    buf.clear();
    datagram::encode_header(buf, number, after);
    if let Some(ids) = targets {
        encode_targets(buf, head.channel, ids);
    }
    if let Some((_, unix)) = timing.deadline {
        encode_deadline(buf, head.channel, unix);
    }
    let len = buf.len() + ev.len();
    let sent = peer.send_datagram(len, || {
        buf.extend_from_slice(ev);
        buf.split().freeze()
    });
    buf.clear();
    sent
}

/// The frames that stand in for an expired event on one link: its `Routed` frame if it had one (`(instance, origin,
/// skipped)`), and `Expired`.
fn expired_notice(head: Head, ty: &str, targets: &[LocalId], routed: Option<(u64, u64, u64)>) -> Bytes {
    let mut b = BytesMut::new();
    if let Some((instance, origin, skipped)) = routed {
        encode_routed(&mut b, head.channel, head.source, instance, origin, skipped);
    }
    Message::Expired {
        channel: head.channel,
        source: head.source,
        seq: head.seq,
        ty: ty.to_owned(),
        sinks: targets.to_vec(),
    }
    .encode(&mut b);
    b.freeze()
}

impl Drop for Source {
    fn drop(&mut self) {
        self.reclaim();
        if self.out_filter.is_some() {
            self.ch.out_sources.fetch_sub(1, Ordering::AcqRel);
        }
        if self.seq > 0 && !self.ch.closed.load(Ordering::Acquire) {
            // The end: nodes that are back get what they missed while cut off, pending lag notices go out, and then
            // every member learns how far this source got and what it sent where (docs/PROTOCOL.md, "Sources that
            // end").
            self.routing.refresh(&self.ch);
            let routes = &*self.routing.routes;
            if !self.loss.ghost_missed.is_empty() {
                self.loss.report_ghost_missed(routes, self.ch.id(), self.id, &mut self.kept, &mut self.enc);
                self.enc.gate.done();
            }
            for p in &routes.peers {
                p.flush_lag();
            }
            self.ch.source_ended(self.id, self.seq, self.loss.dests());
        }
        self.ch.remove_member(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Peer` dropped as unused (`Links::forget_unused`) and made again for the same node is a new link: the node
    /// must be told again what it skipped, and events kept in flight must be replayed on it, even where the new
    /// `Peer` was allocated at the old one's address with the same epoch (0). Many rounds, so that the allocator
    /// reuses the address in some of them (it does in most with the system allocator).
    #[test]
    fn a_peer_made_again_for_the_same_node_is_a_new_link_to_a_source() {
        let node = NodeId(7);
        let mut reused = 0;
        for _ in 0..100 {
            let mut track = SendTrack::default();
            let old = Arc::new(Peer::new(node, "old".into(), 1 << 20));
            let (told, tell) = track.before(&old, 5);
            assert!(tell, "a first event is always told");
            track.sent(told);
            assert!(!track.before(&old, 6).1, "the same link, nothing skipped: nothing to tell");
            assert!(!track.relinked(&old));
            let at = Arc::as_ptr(&old) as usize;
            drop(old);
            let new = Arc::new(Peer::new(node, "new".into(), 1 << 20));
            reused += usize::from(Arc::as_ptr(&new) as usize == at);
            assert!(track.before(&new, 6).1, "a new Peer is a new link: the node is told again");
            assert!(track.relinked(&new), "events sent on the old Peer are replayed on the new one");
        }
        eprintln!("the new Peer reused the old one's address in {reused} of 100 rounds");
    }

    /// A node that opened the channel again (a new instance) gets a new numbering: its first event goes on the stream
    /// and tells it `Routed`, and nothing sent to the old instance is replayed to it.
    #[test]
    fn a_new_instance_of_the_channel_at_a_node_gets_a_new_track() {
        let node = NodeId(3);
        let peer = Arc::new(Peer::new(node, "n".into(), 1 << 20));
        let mut kept = Kept::default();
        kept.set_limits(History::events(100), now());
        let mut sent_to: IdMap<NodeId, SendTrack> = IdMap::default();
        for seq in 1..=5 {
            let track = track_for(&mut sent_to, node, 11, &mut kept);
            let (told, _) = track.before(&peer, seq);
            track.sent(told);
            kept.sent_small(seq, b"frame", smallvec::smallvec![(node, track.routed, None)], None);
        }
        let track = track_for(&mut sent_to, node, 11, &mut kept);
        assert_eq!((track.routed, track.stream_last), (5, 5), "the same instance: the numbering goes on");
        assert!(datagram::numbers(track.routed, track.stream_last).is_some());
        assert_eq!(kept.sent_to(node).count(), 5);
        let track = track_for(&mut sent_to, node, 12, &mut kept);
        assert_eq!((track.routed, track.stream_last, track.instance), (0, 0, 12), "a new instance starts again");
        assert!(datagram::numbers(track.routed, track.stream_last).is_none(), "its first event goes on the stream");
        assert!(track.before(&peer, 6).1, "and is preceded by Routed");
        assert_eq!(kept.sent_to(node).count(), 0, "nothing of the old instance's is replayed to the new one");
    }

    /// What sinks of a cut-off node missed is counted and kept for the instance of the channel they were on: when the
    /// node is back with the channel opened again (another instance), the counts and kept events are forgotten, not
    /// reported or replayed to the new instance's sinks (whose local ids start at 1 again); back with the same
    /// instance, they wait for its link as before.
    #[test]
    fn what_sinks_of_an_earlier_instance_missed_never_goes_to_a_new_one() {
        let node = NodeId(3);
        let peer = Arc::new(Peer::new(node, "n".into(), 1 << 20));
        let mut kept = Kept::default();
        kept.set_limits(History::events(100), now());
        let old = RemoteSink { node, instance: 11, sink: LocalId(1) };
        let mut loss = LossTrack::default();
        loss.ghost_missed.insert(old, 4);
        kept.keep(1, Bytes::from_static(b"frame"), &[old], now());
        let mut enc = Encoder::default();
        let table = |generation: u64, instance: u64| Routes {
            generation,
            peers: vec![peer.clone()],
            instances: vec![instance],
            ..Routes::default()
        };
        loss.report_if_due(&table(1, 11), ChannelId(1), LocalId(1), &mut kept, &mut enc);
        assert!(loss.has_ghost_counts(), "back with the same instance, its link not up yet: the counts wait");
        assert_eq!(loss.waiting, vec![node]);
        loss.report_if_due(&table(2, 12), ChannelId(1), LocalId(1), &mut kept, &mut enc);
        assert!(!loss.has_ghost_counts(), "back with another instance: the old sinks' counts are forgotten");
        assert!(loss.waiting.is_empty(), "and nothing waits for the node's link to report them");
        assert!(kept.take_for(node, 11, now()).is_empty(), "the events kept for the old sinks are forgotten");
        assert!(peer.outbox.is_empty(), "nothing was queued to the node");
    }
}
