//! Sources that end: a sink must never be left unaware that a source it received from is gone with events
//! unaccounted for (docs/PROTOCOL.md, "Sources that end").
//!
//! A source that is closed (or whose node leaves) sends `SourceEnd` to every member node after its last event: its
//! last sequence number and, per node, how many events it queued to that node and how many each sink of a cut-off
//! node would have received. The receivers relay it once to the other members, and again to members that appear later
//! (within `gap_memory`), so that a node cut off from the source learns of the end from anyone. A sink's node then
//! knows exactly how many events it missed: those queued to it and never arrived, plus those counted for its sinks
//! while it was cut off. When the source's node is lost and no word of its end comes within `source_grace`, its sinks
//! are told that the source is gone with an unknown number missed.
//!
//! The decisions (`EndTrack`, `verdict`) are pure and take the time as input; `ChannelInner`'s methods here apply
//! them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kecho_proto::codec::EndDest;
use kecho_proto::{LocalId, Message, NodeId};

use super::deliver::RecvTrack;
use super::ChannelInner;
use crate::clock::now;
use crate::queue::SourceKey;

/// Ends remembered by a node that got them from the source itself, to relay to members that appear later, at most.
const REMEMBERED_ENDS: usize = 1024;

/// How long a node that leaves a channel waits, at most, for the ends of the remote sources it received from, so
/// that it relays an end that was on its way behind their last events (see `ChannelInner::await_ends_in_flight`).
const LEAVE_LINGER: Duration = Duration::from_millis(250);

/// A source's end as a receiver keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct End {
    /// The source's last sequence number.
    pub(super) last: u64,
    /// The source listed what it knew per node (it was closed while its node was up).
    pub(super) listed: bool,
    /// This node's share, if the source listed one.
    pub(super) mine: Option<EndDest>,
}

impl End {
    /// The end carried by a `SourceEnd` message, as instance `instance` of the channel on node `me` sees it: a
    /// share listed for another instance there (an earlier opening of the channel, whose sinks and numbering are not
    /// this one's) is not its own. Also returns whether the list named `me` with another instance only.
    pub(super) fn of(me: NodeId, instance: u64, last: u64, dests: &[EndDest]) -> (End, bool) {
        let mine = dests.iter().find(|d| d.node == me && d.instance == instance).cloned();
        let other = mine.is_none() && dests.iter().any(|d| d.node == me);
        (End { last, listed: !dests.is_empty(), mine }, other)
    }
}

/// What a node's sinks are told about an ended or lost source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Nothing was missed (or nothing is known to have been meant for this node).
    Quiet,
    /// Events were missed: `all` lost in transit (which local sinks wanted them is unknown, so every sink is told) and
    /// per sink those it would have received while its node was cut off.
    Missed { all: u64, sinks: Vec<(LocalId, u64)> },
    /// The source is gone and how many of its events were missed is unknown.
    Unknown,
}

/// What becomes of the track of a source gone with its instance of its node's channel (`RecvTrack::instance_gone`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Gone {
    /// It is accounted for: the sinks are told this (or nothing).
    Now(Option<Verdict>),
    /// No word of its end yet: the track waits apart for it (`ChannelInner::retire`).
    AwaitEnd,
}

/// Where a receiver stands with a remote source's end.
#[derive(Default, Debug)]
pub(super) struct EndTrack {
    /// The end as another member relayed it, kept until the source's node leaves this node's view: the source's own
    /// copy, on the link from it, may still be behind events in flight.
    pending: Option<End>,
    /// The end was accounted for (reported, or found loss-free): nothing more is said of this source.
    settled: bool,
    /// The sinks were told the source is gone with an unknown number missed (an exact account may still follow).
    told_unknown: bool,
    /// When the source's node left this node's view with the source not settled.
    lost_at: Option<Instant>,
    /// The source's node has been in this node's view: only then does its absence mean that it left (events and a
    /// relayed end can arrive before its snapshot does).
    seen: bool,
}

impl EndTrack {
    /// A relayed end waits to be accounted for.
    pub(super) fn has_pending(&self) -> bool {
        self.pending.is_some() && !self.settled
    }

    /// Nothing is known of the source's end yet.
    pub(super) fn open(&self) -> bool {
        !self.settled && self.pending.is_none() && !self.told_unknown
    }

    /// An event of the source arrived: it is alive (its node came back).
    #[inline]
    pub(super) fn alive(&mut self) {
        if self.lost_at.is_some() || self.told_unknown {
            self.lost_at = None;
            self.told_unknown = false;
        }
    }
}

/// What to tell the sinks, given the end `end` and what arrived (`track`); `None` if nothing more is to be said.
pub(super) fn verdict(track: &RecvTrack, end: &End) -> Verdict {
    match &end.mine {
        Some(d) => {
            let all = d.routed.saturating_sub(track.last);
            let sinks: Vec<(LocalId, u64)> = d.missed.iter().copied().filter(|(_, n)| *n > 0).collect();
            if all == 0 && sinks.is_empty() {
                Verdict::Quiet
            } else {
                Verdict::Missed { all, sinks }
            }
        }
        // The source knew what it had sent where, and nothing was meant for this node.
        None if end.listed => Verdict::Quiet,
        // Its node left without closing it first: only its last sequence number is known.
        None if track.last_seq >= end.last => Verdict::Quiet,
        // Every event so far was meant for this node (the source never said otherwise): the rest were too.
        None if track.skipped == 0 && track.last_seq > 0 => {
            Verdict::Missed { all: end.last - track.last_seq, sinks: Vec::new() }
        }
        None => Verdict::Unknown,
    }
}

impl RecvTrack {
    /// The end of a source of instance `origin` of its node's channel concerns this track: not if the track is of a
    /// later instance's source with the same local id (its node opened the channel again since).
    #[inline]
    pub(super) fn end_applies(&self, origin: u64) -> bool {
        origin >= self.origin_instance
    }

    /// A frame of a source of instance `origin` of its node's channel, at least the track's: if it is a later one,
    /// the tracked source is gone with its instance, and the track starts again for the new source (whose local id
    /// is the same). Returns the old source's track, to account for (`ChannelInner::source_gone_with_instance`).
    pub(super) fn started_again(&mut self, origin: u64) -> Option<RecvTrack> {
        if origin <= self.origin_instance {
            return None;
        }
        let old = (self.origin_instance != 0).then(|| std::mem::take(self));
        self.origin_instance = origin;
        old
    }

    /// Event `seq` of the source arrived through the overlay (whose stream order accounts for gaps by itself).
    #[inline]
    pub(super) fn tree_arrived(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
        self.end.alive();
    }

    /// The source's end came through the overlay after every earlier item of its stream: nothing more to say.
    pub(super) fn settle(&mut self) {
        self.end.settled = true;
        self.end.pending = None;
    }

    /// The end of the source arrived on the link from its own node (after all its events) or, `present` false, from
    /// another member while its node is out of this node's view: account for it now. Returns what to tell the sinks.
    pub(super) fn end_now(&mut self, end: &End) -> Option<Verdict> {
        if self.end.settled {
            return None;
        }
        let v = verdict(self, end);
        if v == Verdict::Unknown && self.end.told_unknown {
            return None;
        }
        self.end.settled = v != Verdict::Unknown;
        self.end.told_unknown |= v == Verdict::Unknown;
        self.end.pending = None;
        Some(v)
    }

    /// The end of the source arrived from its own node: `end_now`, and nothing of the source counts any more (see
    /// `RecvTrack::ended`).
    pub(super) fn own_end(&mut self, end: &End) -> Option<Verdict> {
        self.ended = true;
        self.end_now(end)
    }

    /// Another member relayed the source's end while its node is still in this node's view: keep it until the node
    /// leaves the view.
    pub(super) fn end_later(&mut self, end: End) {
        if !self.end.settled {
            self.end.pending = Some(end);
        }
    }

    /// The source's node is out of this node's view at `now`: account for a relayed end if one came; otherwise start
    /// the grace period (returns true when it starts, so that the caller arms the timer).
    pub(super) fn node_gone(&mut self, now: Instant) -> (Option<Verdict>, bool) {
        if self.end.settled || !self.end.seen || self.end.pending.is_some() {
            // A relayed end is accounted for by its own timer (`pending_due`).
            return (None, false);
        }
        if self.end.lost_at.is_none() && !self.end.told_unknown {
            self.end.lost_at = Some(now);
            return (None, true);
        }
        (None, false)
    }

    /// The grace period that started at `since` is over and the node is still out of view: the source is gone with an
    /// unknown number missed, unless something happened in between.
    pub(super) fn grace_over(&mut self, since: Instant) -> Option<Verdict> {
        if self.end.settled || self.end.told_unknown || self.end.lost_at != Some(since) {
            return None;
        }
        self.end.lost_at = None;
        self.end.told_unknown = true;
        Some(Verdict::Unknown)
    }

    /// The source's node opened the channel again (its instance changed), so the source is gone: a relayed end is
    /// accounted for now. With no word of its end yet, the end may still be on its way (on the link from the source's
    /// node, behind frames that news of the new instance overtook: a join goes ahead of a link's backlog, and another
    /// member may tell of it first): the track waits apart for it (`Gone::AwaitEnd`), and the sinks are told the
    /// source is gone with an unknown number missed only if it does not come (`retired_due`).
    pub(super) fn instance_gone(&mut self) -> Gone {
        if let Some(end) = self.end.pending.take() {
            return Gone::Now(self.end_now(&end));
        }
        if self.end.settled || self.end.told_unknown || (self.last_seq == 0 && !self.end.seen) {
            return Gone::Now(None);
        }
        Gone::AwaitEnd
    }

    /// A track that waited apart for its source's end (`Gone::AwaitEnd`) waited long enough: the source is gone
    /// with an unknown number missed, unless its end came meanwhile.
    pub(super) fn retired_due(&mut self) -> Option<Verdict> {
        if self.end.settled || self.end.told_unknown {
            return None;
        }
        self.end.told_unknown = true;
        Some(Verdict::Unknown)
    }

    /// The source's node is (back) in this node's view: stop waiting for it.
    pub(super) fn node_back(&mut self) {
        self.end.lost_at = None;
        self.end.seen = true;
    }

    /// A relayed end waited long enough (see `ChannelInner::source_end`) and the source's node is out of view:
    /// account for it.
    pub(super) fn pending_due(&mut self) -> Option<Verdict> {
        let end = self.end.pending.take()?;
        self.end_now(&end)
    }
}

/// A `SourceEnd` that arrived from the source's own node, kept to relay to members that appear later.
pub(super) struct Remembered {
    at: Instant,
    origin: NodeId,
    msg: Message,
}

impl ChannelInner {
    /// This opening's `SourceEnd` for local source `source` of node `origin` (this node), ended after event `last`,
    /// with what the source knew of each node's share (`dests`).
    pub(super) fn source_end_msg(&self, origin: NodeId, source: LocalId, last: u64, dests: Vec<EndDest>) -> Message {
        Message::SourceEnd { channel: self.id(), origin, origin_instance: self.instance, source, last, dests }
    }

    /// Local source `source` ends after event `last`: every member node is told, with what the source knew of each
    /// node's share (`dests`; empty if it is unknown here).
    pub(super) fn source_ended(self: &Arc<Self>, source: LocalId, last: u64, dests: Vec<EndDest>) {
        let Some(node) = self.node.upgrade() else { return };
        if self.tree_on() {
            // Not to every member in tree mode: the end travels the source's stream after its events
            // (`tree_events.rs`), and goes directly only to the nodes this source sent events to directly (an
            // OUT-filter's choice, Block sinks), with what it knows of their share.
            let direct: Vec<(NodeId, String)> = {
                let st = self.state.lock();
                dests.iter().filter_map(|d| st.peers().get(&d.node).map(|p| (d.node, p.addr.clone()))).collect()
            };
            if !direct.is_empty() {
                let msg = self.source_end_msg(node.id, source, last, dests);
                for (to, addr) in direct {
                    node.send(to, &addr, &msg);
                }
            }
            self.tree_source_end(source, last, super::history::History::off());
            return;
        }
        let msg = self.source_end_msg(node.id, source, last, dests);
        let peers: Vec<(NodeId, String)> =
            self.state.lock().peers().iter().map(|(id, p)| (*id, p.addr.clone())).collect();
        for (to, addr) in peers {
            node.send(to, &addr, &msg);
        }
    }

    /// Before this node leaves: waits (at most `LEAVE_LINGER`) until every remote source it received from, whose
    /// node is in view, has ended, if some other member could need this node to relay that end. A sink that stops as
    /// soon as it has a source's last event (`kecho sub --count`) would otherwise leave before the end that follows
    /// that event arrives, and a member cut off from the source would never hear of it (the source, gone, cannot say
    /// it again).
    pub(super) async fn await_ends_in_flight(&self) {
        let deadline = tokio::time::Instant::now() + LEAVE_LINGER;
        while self.ends_in_flight() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Some remote source this node received from may still end with another member depending on this node's relay.
    fn ends_in_flight(&self) -> bool {
        let peers: Vec<NodeId> = self.state.lock().peers().keys().copied().collect();
        let tracks = self.tracks.lock();
        tracks.iter().any(|((origin, _), t)| {
            t.last > 0 && t.end.open() && peers.contains(origin) && peers.iter().any(|p| p != origin)
        })
    }

    /// A `SourceEnd` arrived from node `from`, of source `source` of instance `origin_instance` of the channel on
    /// node `origin`.
    ///
    /// It is relayed whatever it says (other members may need it), but applied here only as far as it concerns this
    /// instance of the channel: a share listed for another instance of this node's (an earlier opening, whose end
    /// reaches this one late: in flight, or relayed by a member that remembered it) is not this one's, and the end of
    /// a source of an earlier instance of `origin`'s than the one tracked under that local id is not the tracked
    /// source's. Either is counted as stale.
    pub(crate) fn source_end(
        self: &Arc<Self>,
        from: NodeId,
        origin: NodeId,
        origin_instance: u64,
        source: LocalId,
        last: u64,
        dests: Vec<EndDest>,
    ) {
        let Some(node) = self.node.upgrade() else { return };
        if origin == node.id {
            return;
        }
        self.heard_end(origin, source, last);
        let (end, other_instance) = End::of(node.id, self.instance, last, &dests);
        // The instance of `origin`'s channel this node knows now: the tracks of its earlier instances' sources were
        // accounted for and dropped when it changed (`view_changed`).
        let current = self.state.lock().peers().get(&origin).map(|p| p.snapshot.instance);
        let direct = from == origin;
        if direct && !self.tree_on() {
            // Relay it once to every other member, and to members that appear later.
            let msg = Message::SourceEnd { channel: self.id(), origin, origin_instance, source, last, dests };
            let peers: Vec<(NodeId, String)> = self
                .state
                .lock()
                .peers()
                .iter()
                .filter(|(id, _)| **id != origin)
                .map(|(id, p)| (*id, p.addr.clone()))
                .collect();
            for (to, addr) in peers {
                node.send(to, &addr, &msg);
            }
            let at = now();
            let mut ends = self.ends.lock();
            ends.retain(|r| at.duration_since(r.at) < node.cfg.gap_memory);
            if ends.len() >= REMEMBERED_ENDS {
                ends.remove(0);
            }
            ends.push(Remembered { at, origin, msg });
        }
        let key = (origin, source);
        let stale = || _ = self.counters.stale.fetch_add(1, Ordering::Relaxed);
        // The end of a source whose track waits apart, gone with its instance (`retire`): it came after all, behind
        // frames that news of its node's new instance overtook.
        let retired = self.retired.lock().remove(&(origin, source, origin_instance));
        if let Some(mut old) = retired {
            if other_instance {
                stale();
            }
            let v = if direct { old.own_end(&end) } else { old.end_now(&end) };
            if let Some(v) = v {
                self.tell(SourceKey::new(origin, source), v);
            }
            return;
        }
        let (verdict, gone) = {
            let mut tracks = self.tracks.lock();
            // A source this node never heard from matters only if it says something was meant for this node (and
            // is not of an earlier instance of its node's channel, whose sources were accounted for).
            let track = match tracks.get_mut(&key) {
                Some(t) => t,
                None if end.mine.is_some() && current.is_none_or(|c| origin_instance >= c) => {
                    let t = tracks.entry(key).or_default();
                    t.origin_instance = origin_instance;
                    t
                }
                None => {
                    if other_instance || current.is_some_and(|c| origin_instance < c) {
                        stale();
                    }
                    return;
                }
            };
            if !track.end_applies(origin_instance) {
                stale();
                return;
            }
            if other_instance {
                stale();
            }
            // The end of a later instance's source with the tracked one's local id, before its `Routed` frame: the
            // tracked source is gone with its instance (as in `RecvTrack::routed`).
            let gone = track.started_again(origin_instance);
            let verdict = if direct {
                track.own_end(&end)
            } else {
                // Relayed: the source's own copy, on the link from its node, may still be behind events in flight
                // (that link may even still be coming up), so wait a heartbeat timeout, then account for it if the
                // node is out of view by then (else when it leaves the view, see `view_changed`).
                track.end_later(end);
                None
            };
            (verdict, gone)
        };
        if !direct {
            self.pending_later(origin, source, node.cfg.heartbeat_timeout);
        }
        if let Some(old) = gone {
            self.source_gone_with_instance(origin, source, old);
        }
        if let Some(v) = verdict {
            self.tell(SourceKey::new(origin, source), v);
        }
    }

    /// After a membership change: accounts for sources whose node left the view, arms the grace timer for those lost
    /// without word of their end, stops it for those back, and relays remembered ends to members that appeared.
    ///
    /// `peers` are the member nodes now, in order (the membership's map keys): looked up by binary search, so that
    /// a change costs one pass over the tracked sources and, in full-mesh mode, one over the members, with no set
    /// built per change (in tree mode every member of a large channel runs this on every change).
    ///
    /// `instances` are the members' instances of the channel, in the order of `peers`: the remote sources of a member
    /// that is on a later instance than theirs were on an earlier opening of the channel there, which is closed
    /// (whether or not its goodbye arrived). Their tracks are accounted for (`RecvTrack::instance_gone`) and dropped,
    /// so that the new opening's sources, whose local ids and sequence numbers start again, get tracks of their own
    /// (a new source's `Routed` frame, should it come first, starts its track again itself, see `RecvTrack::routed`).
    pub(super) fn view_changed(self: &Arc<Self>, peers: &[NodeId], instances: &[u64]) {
        debug_assert!(peers.windows(2).all(|w| w[0] < w[1]));
        debug_assert_eq!(peers.len(), instances.len());
        let Some(node) = self.node.upgrade() else { return };
        let at = now();
        let mut verdicts = Vec::new();
        let mut pending = Vec::new();
        let mut gone = Vec::new();
        let mut arm = false;
        let present = |n: &NodeId| peers.binary_search(n).is_ok();
        self.tracks.lock().retain(|(origin, source), t| {
            let Ok(i) = peers.binary_search(origin) else { return true };
            // Instances of one node's channel increase with each opening; a track's source is on the one its `Routed`
            // frames named (0: none yet).
            if t.origin_instance == 0 || t.origin_instance >= instances[i] {
                return true;
            }
            gone.push((*origin, *source, std::mem::take(t)));
            false
        });
        for (origin, source, old) in gone {
            self.source_gone_with_instance(origin, source, old);
        }
        {
            let seen = self.seen_peers.lock();
            let before = |n: &NodeId| seen.binary_search(n).is_ok();
            let mut tracks = self.tracks.lock();
            for ((origin, source), t) in tracks.iter_mut() {
                if present(origin) {
                    t.node_back();
                    continue;
                }
                if before(origin) {
                    // In the view before this change (the track may have begun since the last one).
                    t.node_back();
                }
                let (v, start) = t.node_gone(at);
                arm |= start;
                if t.end.has_pending() {
                    pending.push((*origin, *source));
                }
                if let Some(v) = v {
                    verdicts.push((SourceKey::new(*origin, *source), v));
                }
            }
        }
        for (key, v) in verdicts {
            self.tell(key, v);
        }
        for (origin, source) in pending {
            self.pending_later(origin, source, node.cfg.heartbeat_timeout);
        }
        if arm {
            let grace = node.cfg.source_grace;
            let weak = Arc::downgrade(self);
            node.spawn(async move {
                tokio::time::sleep(grace).await;
                if let Some(ch) = weak.upgrade() {
                    ch.grace_over(at);
                }
            });
        }
        // Members that appeared since the last change hear of the ends this node relays (in full-mesh mode; in tree
        // mode ends travel on the overlay).
        let fresh: Vec<NodeId> = {
            let mut seen = self.seen_peers.lock();
            let fresh = if self.tree_on() {
                Vec::new()
            } else {
                peers.iter().filter(|p| seen.binary_search(p).is_err()).copied().collect()
            };
            seen.clear();
            seen.extend_from_slice(peers);
            fresh
        };
        if !fresh.is_empty() && !self.ends.lock().is_empty() {
            let addrs: Vec<(NodeId, String)> = {
                let st = self.state.lock();
                fresh.iter().filter_map(|n| st.peers().get(n).map(|p| (*n, p.addr.clone()))).collect()
            };
            let ends = self.ends.lock();
            for (to, addr) in addrs {
                for r in ends.iter().filter(|r| r.origin != to && at.duration_since(r.at) < node.cfg.gap_memory) {
                    node.send(to, &addr, &r.msg);
                }
            }
        }
    }

    /// The grace period armed at `since` is over: sources whose node is still out of view and of whose end no word
    /// came are reported gone.
    fn grace_over(&self, since: Instant) {
        let verdicts: Vec<(SourceKey, Verdict)> = {
            let peers = self.state.lock().peers().keys().copied().collect::<Vec<_>>();
            let mut tracks = self.tracks.lock();
            tracks
                .iter_mut()
                .filter(|((origin, _), _)| !peers.contains(origin))
                .filter_map(|((origin, source), t)| Some((SourceKey::new(*origin, *source), t.grace_over(since)?)))
                .collect()
        };
        for (key, v) in verdicts {
            self.tell(key, v);
        }
    }

    /// The track `old` of source `source` of node `origin` is of an earlier instance of the channel there, which is
    /// closed: accounts for it, or keeps it apart (`retired`) for its end to come, for a heartbeat timeout at most.
    pub(super) fn source_gone_with_instance(self: &Arc<Self>, origin: NodeId, source: LocalId, mut old: RecvTrack) {
        match old.instance_gone() {
            Gone::Now(Some(v)) => self.tell(SourceKey::new(origin, source), v),
            Gone::Now(None) => {}
            Gone::AwaitEnd => {
                let Some(node) = self.node.upgrade() else { return };
                let instance = old.origin_instance;
                self.retired.lock().insert((origin, source, instance), old);
                let wait = node.cfg.heartbeat_timeout;
                let weak = Arc::downgrade(self);
                node.spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Some(ch) = weak.upgrade() {
                        ch.retired_due(origin, source, instance);
                    }
                });
            }
        }
    }

    /// A track kept apart for its source's end waited long enough: the sinks are told the source is gone, with an
    /// unknown number missed, unless the end came meanwhile.
    fn retired_due(&self, origin: NodeId, source: LocalId, instance: u64) {
        let v = self.retired.lock().remove(&(origin, source, instance)).and_then(|mut t| t.retired_due());
        if let Some(v) = v {
            self.tell(SourceKey::new(origin, source), v);
        }
    }

    /// Calls `pending_due` after `delay`.
    fn pending_later(self: &Arc<Self>, origin: NodeId, source: LocalId, delay: std::time::Duration) {
        let Some(node) = self.node.upgrade() else { return };
        let weak = Arc::downgrade(self);
        node.spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(ch) = weak.upgrade() {
                ch.pending_due(origin, source);
            }
        });
    }

    /// A relayed end has waited: account for it unless the source's node is in view (then it is accounted for when
    /// the node leaves the view, or by the node's own copy).
    fn pending_due(&self, origin: NodeId, source: LocalId) {
        if self.state.lock().peers().contains_key(&origin) {
            return;
        }
        let v = self.tracks.lock().get_mut(&(origin, source)).and_then(RecvTrack::pending_due);
        if let Some(v) = v {
            self.tell(SourceKey::new(origin, source), v);
        }
    }

    /// Tells the local sinks what they missed of source `key`.
    pub(super) fn tell(&self, key: SourceKey, v: Verdict) {
        let sinks = self.local_sinks.read().clone();
        match v {
            Verdict::Quiet => {}
            Verdict::Missed { all, sinks: per_sink } => {
                let per_sink: Vec<_> = per_sink
                    .into_iter()
                    .filter_map(|(id, n)| sinks.iter().find(|s| s.id == id).map(|s| (s, n)))
                    .collect();
                let total = all * sinks.len() as u64 + per_sink.iter().map(|(_, n)| n).sum::<u64>();
                // Counted before any sink is told, so a sink that reads the channel's stats after its lag report sees
                // the loss in them.
                self.counters.missed.fetch_add(total, Ordering::Relaxed);
                tracing::info!(channel = %self.name, source = %key, missed = total, "a source ended; its missed events were reported");
                if all > 0 {
                    for s in sinks.iter() {
                        s.queue.add_lag(all);
                    }
                }
                for (s, n) in per_sink {
                    s.queue.add_lag(n);
                }
            }
            Verdict::Unknown => {
                // The sinks are told; nothing here needs an operator's attention.
                tracing::info!(channel = %self.name, source = %key, "a source is gone; how many of its events were missed is unknown");
                for s in sinks.iter() {
                    s.queue.add_lost(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The instance of the channel on every node in these tests, unless one says otherwise.
    const INSTANCE: u64 = 1;

    fn dest(node: u64, routed: u64, missed: &[(u32, u64)]) -> EndDest {
        EndDest {
            node: NodeId(node),
            instance: INSTANCE,
            routed,
            missed: missed.iter().map(|&(s, n)| (LocalId(s), n)).collect(),
        }
    }

    /// The end as instance `INSTANCE` of the channel on `me` sees it.
    fn end_of(me: NodeId, last: u64, dests: &[EndDest]) -> End {
        End::of(me, INSTANCE, last, dests).0
    }

    /// A track of a source whose node has been in view.
    fn track(last: u64, last_seq: u64) -> RecvTrack {
        let mut t = RecvTrack { last, last_seq, ..RecvTrack::default() };
        t.node_back();
        t
    }

    #[test]
    fn a_node_never_seen_in_view_is_not_taken_for_gone() {
        let me = NodeId(7);
        let mut t = RecvTrack { last: 3, last_seq: 3, ..RecvTrack::default() };
        assert_eq!(t.node_gone(Instant::now()), (None, false), "events came before its snapshot");
        t.end_later(end_of(me, 3, &[dest(7, 3, &[])]));
        assert_eq!(t.pending_due(), Some(Verdict::Quiet), "the grace period over, the relayed end counts");
    }

    #[test]
    fn an_end_counts_what_was_queued_and_not_received_and_what_was_counted_while_cut_off() {
        let me = NodeId(7);
        let end = end_of(me, 4000, &[dest(6, 4000, &[]), dest(7, 1300, &[(2, 2400), (3, 0)])]);
        let mut t = track(1248, 1248);
        assert_eq!(t.end_now(&end), Some(Verdict::Missed { all: 52, sinks: vec![(LocalId(2), 2400)] }));
        assert_eq!(t.end_now(&end), None, "told once");
    }

    #[test]
    fn an_end_with_nothing_missing_or_nothing_meant_here_is_quiet() {
        let me = NodeId(7);
        assert_eq!(track(10, 10).end_now(&end_of(me, 10, &[dest(7, 10, &[])])), Some(Verdict::Quiet));
        assert_eq!(track(0, 0).end_now(&end_of(me, 10, &[dest(6, 10, &[])])), Some(Verdict::Quiet));
        // Without a list (its node left first) only the last sequence number is known.
        assert_eq!(track(9, 10).end_now(&end_of(me, 10, &[])), Some(Verdict::Quiet));
        assert_eq!(track(9, 9).end_now(&end_of(me, 10, &[])), Some(Verdict::Missed { all: 1, sinks: vec![] }));
        let mut filtered = track(9, 9);
        filtered.skipped = 2;
        assert_eq!(filtered.end_now(&end_of(me, 10, &[])), Some(Verdict::Unknown), "some were not meant for it");
    }

    #[test]
    fn a_relayed_end_waits_for_the_node_to_leave_the_view() {
        let me = NodeId(7);
        let t0 = Instant::now();
        let mut t = track(100, 100);
        t.end_later(end_of(me, 500, &[dest(7, 500, &[])]));
        // Events still in flight on the direct link arrive, then the source's own copy of its end.
        t.last = 500;
        t.last_seq = 500;
        assert_eq!(t.end_now(&end_of(me, 500, &[dest(7, 500, &[])])), Some(Verdict::Quiet));
        assert_eq!(t.node_gone(t0), (None, false), "settled: nothing more");
        // The node leaves the view before its own copy arrives: the relayed one is used (once it has waited).
        let mut t = track(100, 100);
        t.end_later(end_of(me, 500, &[dest(7, 500, &[])]));
        assert_eq!(t.node_gone(t0), (None, false));
        assert!(t.end.has_pending());
        assert_eq!(t.pending_due(), Some(Verdict::Missed { all: 400, sinks: vec![] }));
    }

    #[test]
    fn a_lost_node_with_no_word_of_its_end_is_reported_unknown_once_the_grace_is_over() {
        let me = NodeId(7);
        let t0 = Instant::now();
        let mut t = track(100, 100);
        assert_eq!(t.node_gone(t0), (None, true), "the grace period starts");
        assert_eq!(t.node_gone(t0 + Duration::from_secs(1)), (None, false), "armed once");
        assert_eq!(t.grace_over(Instant::now() + Duration::from_secs(99)), None, "another period's timer");
        assert_eq!(t.grace_over(t0), Some(Verdict::Unknown));
        assert_eq!(t.grace_over(t0), None, "told once");
        // Word of the end comes after all: the exact account follows.
        let end = end_of(me, 300, &[dest(7, 300, &[])]);
        assert_eq!(t.end_now(&end), Some(Verdict::Missed { all: 200, sinks: vec![] }));
    }

    /// A share listed for another instance of the channel on this node (an earlier opening) is not this one's.
    #[test]
    fn a_share_listed_for_another_instance_of_this_node_is_not_its_own() {
        let me = NodeId(7);
        let earlier = EndDest { instance: INSTANCE + 1, ..dest(7, 40, &[(1, 5)]) };
        let (end, other) = End::of(me, INSTANCE, 40, &[earlier.clone(), dest(6, 40, &[])]);
        assert!(other && end.mine.is_none() && end.listed);
        assert_eq!(track(0, 0).end_now(&end), Some(Verdict::Quiet), "nothing of it was meant for this instance");
        let (end, other) = End::of(me, INSTANCE + 1, 40, std::slice::from_ref(&earlier));
        assert!(!other);
        assert_eq!(end.mine, Some(earlier));
    }

    /// The end of a source of an earlier instance of its node's channel leaves a later instance's source (same local
    /// id) alone; that of a later instance's source starts the track again, the old source gone.
    #[test]
    fn ends_name_the_instance_their_source_belongs_to() {
        let mut t = track(5, 5);
        t.origin_instance = 6;
        assert!(!t.end_applies(5) && t.end_applies(6) && t.end_applies(7));
        assert!(t.started_again(6).is_none(), "the same instance's source");
        let mut old = t.started_again(7).expect("the tracked source is gone");
        assert_eq!((t.origin_instance, t.last, t.last_seq), (7, 0, 0), "the track starts again");
        assert!(t.started_again(7).is_none());
        assert_eq!((old.origin_instance, old.last), (6, 5), "the old source's track");
        assert_eq!(old.instance_gone(), Gone::AwaitEnd, "no word of its end yet: it may be on its way");
        assert_eq!(old.retired_due(), Some(Verdict::Unknown), "it did not come: its loss unknown");
        assert_eq!(old.retired_due(), None, "said once");
    }

    /// The end of a source gone with its instance, arriving after news of the new instance (which overtook it),
    /// settles the old source's account: nothing is reported if nothing was missed, the exact number if some was,
    /// and the wait's end then says nothing more.
    #[test]
    fn the_end_of_a_source_gone_with_its_instance_settles_it_when_it_comes_late() {
        let me = NodeId(1);
        for (arrived, routed, missed) in [(30, 30, None), (25, 30, Some(Verdict::Missed { all: 5, sinks: Vec::new() }))]
        {
            let mut old = track(arrived, arrived);
            old.origin_instance = 6;
            assert_eq!(old.instance_gone(), Gone::AwaitEnd);
            let (end, _) = End::of(me, INSTANCE, routed, &[dest(1, routed, &[])]);
            assert_eq!(old.own_end(&end), Some(missed.clone().unwrap_or(Verdict::Quiet)));
            assert_eq!(old.retired_due(), None, "accounted for: nothing more said");
        }
        // A relayed end that was waiting is accounted for at once, without a wait.
        let mut old = track(30, 30);
        old.end_later(End::of(me, INSTANCE, 30, &[dest(1, 30, &[])]).0);
        assert_eq!(old.instance_gone(), Gone::Now(Some(Verdict::Quiet)));
        // A source never heard from and never in view: nothing to say.
        assert_eq!(RecvTrack::default().instance_gone(), Gone::Now(None));
    }

    #[test]
    fn a_node_that_comes_back_stops_the_grace_period() {
        let t0 = Instant::now();
        let mut t = track(100, 100);
        assert_eq!(t.node_gone(t0), (None, true));
        t.node_back();
        assert_eq!(t.grace_over(t0), None);
        // Lost again later: a new period.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(t.node_gone(t1), (None, true));
        t.end.alive();
        assert_eq!(t.grace_over(t1), None, "its events flow again");
    }
}
