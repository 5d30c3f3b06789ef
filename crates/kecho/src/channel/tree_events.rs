//! Tree mode's event path keeps the full mesh's guarantees (docs/SCALE.md, "Tree mode in channels"):
//!
//! - *A source's end* travels its node's event stream as one more item, a `SourceEnd` frame (with an empty list)
//!   after the source's last event. The overlay delivers a stream in order, so a node that delivers the end has
//!   accounted for every earlier item of the stream: each was delivered or reported missed. Every node remembers the
//!   end items it delivered (for `NodeBuilder::gap_memory`) and announces them to each new overlay neighbour, so a node
//!   that comes back after a cut learns of an end broadcast while it was away, grafts what it can of the events before
//!   it and has the rest reported missed. A source's node lost without word of its end is reported gone with an
//!   unknown loss once `NodeBuilder::source_grace` is over, as in full-mesh mode (`ends.rs`).
//! - *Histories.* A source with a history keeps its stream items, within its bounds, at its own node. A node with a gap
//!   in a stream takes the stream's origin as the last announcer of the missing items: when its neighbours cannot answer
//!   its grafts (their caches no longer hold them), it grafts them from the origin over a direct link, and the origin
//!   answers from the history. The overlay delivers the replayed items in order, without duplicates, and holds newer
//!   ones until the gap is filled or given up (then reported missed, as before).
//! - *Priorities and deadlines.* An event with either carries a `Priority` and/or a `Deadline` frame ahead of its
//!   `Event` frame in its stream item. Every node forwards it in that lane of its outboxes; a node that finds its
//!   deadline past forwards an `Expired` notice in its place (so the stream keeps its numbering and nothing downstream
//!   takes it for lost) and tells its own sinks that accept it that it expired.
//!
//! The decisions on kept items (`OwnHistory`) and on a stream item's parts (`split`) are pure.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use kecho_proto::codec::{decode_body, encode_deadline, encode_event};
use kecho_proto::gossip::{EventId, Gossip, GossipMsg};
use kecho_proto::{Attrs, ChannelId, LocalId, Message, NodeId, Overflow};
use parking_lot::Mutex;

use super::super::history::History;
use super::super::routes::Dest;
use super::super::{ChannelInner, Channels};
use crate::clock::now;
use crate::queue::SourceKey;
use crate::timely::unix_us;

/// End items remembered, at most (the oldest go first).
const REMEMBERED_ENDS: usize = 1024;

/// Tree mode's event-path state of one channel on one node.
#[derive(Default)]
pub(super) struct TreeEvents {
    inner: Mutex<EvInner>,
}

#[derive(Default)]
struct EvInner {
    /// End items delivered here, oldest first, to announce to new overlay neighbours.
    ends: VecDeque<EndItem>,
    /// The overlay neighbours the remembered ends were last announced to.
    told: Vec<NodeId>,
    /// This node's stream items kept for its sources' histories.
    own: OwnHistory,
}

/// A stream item carrying a source's end.
struct EndItem {
    at: Instant,
    id: EventId,
    payload: Bytes,
}

/// The lane and deadline a stream item carries ahead of its frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(in crate::channel) struct Head {
    /// The outbox lane (priority level; 0: the default).
    pub(in crate::channel) lane: u8,
    /// The deadline, in microseconds since the Unix epoch.
    pub(in crate::channel) deadline: Option<u64>,
}

impl Head {
    /// The deadline is past at `now_us`.
    pub(super) fn expired(&self, now_us: u64) -> bool {
        self.deadline.is_some_and(|d| now_us >= d)
    }
}

fn priority_kind() -> u8 {
    Message::Priority { channel: ChannelId(0), level: 0 }.kind()
}

fn deadline_kind() -> u8 {
    Message::Deadline { channel: ChannelId(0), unix_us: 0 }.kind()
}

/// Splits a stream item into its head (`Priority` and `Deadline` frames) and the frame after them.
pub(super) fn split(item: &Bytes) -> (Head, Bytes) {
    let mut head = Head::default();
    let mut at = 0usize;
    let (pk, dk) = (priority_kind(), deadline_kind());
    while item.len() >= at + 5 {
        let kind = item[at + 4];
        if kind != pk && kind != dk {
            break;
        }
        let len = u32::from_le_bytes([item[at], item[at + 1], item[at + 2], item[at + 3]]) as usize;
        let end = at + 4 + len;
        if end > item.len() {
            break;
        }
        match decode_body(item.slice(at + 4..end)) {
            Ok(Message::Priority { level, .. }) => head.lane = level,
            Ok(Message::Deadline { unix_us, .. }) => head.deadline = Some(unix_us),
            _ => break,
        }
        at = end;
    }
    (head, item.slice(at..))
}

/// Encodes the head of a stream item (nothing for the default lane and no deadline).
pub(super) fn encode_head(dst: &mut BytesMut, channel: ChannelId, head: Head) {
    if head.lane > 0 {
        Message::Priority { channel, level: head.lane }.encode(dst);
    }
    if let Some(d) = head.deadline {
        encode_deadline(dst, channel, d);
    }
}

/// A source's items kept at its own node to answer grafts of nodes that come back (its history's bounds apply).
#[derive(Default, Debug)]
pub(super) struct OwnHistory {
    /// By stream number: the source, when kept, the item.
    items: BTreeMap<u64, (LocalId, Instant, Bytes)>,
    per: HashMap<LocalId, PerSource>,
}

#[derive(Debug)]
struct PerSource {
    limits: History,
    numbers: VecDeque<u64>,
    bytes: usize,
}

impl OwnHistory {
    /// Keeps item `number` of `source` (whose history is `limits`), then drops what the bounds no longer allow.
    pub(super) fn keep(&mut self, number: u64, source: LocalId, limits: History, item: Bytes, now: Instant) {
        if !limits.is_on() {
            if let Some(p) = self.per.remove(&source) {
                for n in p.numbers {
                    self.items.remove(&n);
                }
            }
            return;
        }
        let p = self.per.entry(source).or_insert_with(|| PerSource { limits, numbers: VecDeque::new(), bytes: 0 });
        p.limits = limits;
        p.bytes += item.len();
        p.numbers.push_back(number);
        self.items.insert(number, (source, now, item));
        self.trim(source, now);
    }

    fn trim(&mut self, source: LocalId, now: Instant) {
        let Some(p) = self.per.get_mut(&source) else { return };
        while let Some(&front) = p.numbers.front() {
            let Some((_, at, item)) = self.items.get(&front) else {
                p.numbers.pop_front();
                continue;
            };
            let old = p.limits.age.is_some_and(|a| now.saturating_duration_since(*at) > a);
            if p.numbers.len() > p.limits.events || p.bytes > p.limits.bytes || old {
                p.bytes -= item.len();
                self.items.remove(&front);
                p.numbers.pop_front();
            } else {
                break;
            }
        }
    }

    /// Item `number`, if it is still within its source's bounds at `now`.
    pub(super) fn get(&self, number: u64, now: Instant) -> Option<Bytes> {
        let (source, at, item) = self.items.get(&number)?;
        let p = self.per.get(source)?;
        let old = p.limits.age.is_some_and(|a| now.saturating_duration_since(*at) > a);
        (!old).then(|| item.clone())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.items.len()
    }
}

impl ChannelInner {
    /// Publishes an event of local source `source` in tree mode: its stream item (head and `Event` frame) is
    /// broadcast on this node's stream (kept for the source's history if it has one), and offered to the local sinks
    /// that accept it. An event whose deadline passed before it was sent goes as an `Expired` notice instead.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::channel) fn submit_tree(
        self: &Arc<Self>,
        source: LocalId,
        key: SourceKey,
        seq: u64,
        ev: (&str, &Attrs, &[u8]),
        head: Head,
        history: History,
    ) {
        let Some(node) = self.node.upgrade() else { return };
        let (ty, attrs, payload) = ev;
        let expired = head.expired(unix_us(std::time::SystemTime::now()));
        let mut b = BytesMut::new();
        if expired {
            let notice = Message::Expired { channel: self.id(), source, seq, ty: ty.to_owned(), sinks: Vec::new() };
            encode_head(&mut b, self.id(), Head { deadline: None, ..head });
            notice.encode(&mut b);
        } else {
            encode_head(&mut b, self.id(), head);
            encode_event(&mut b, self.id(), source, seq, ty, attrs, payload);
        }
        let item = b.freeze();
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        self.tree_broadcast(&node, source, item.clone(), history);
        if expired {
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
            self.expired_here(ty);
            return;
        }
        let payload = item.slice(item.len() - payload.len()..);
        if self.offer_now(Arc::from(ty), attrs.clone(), payload, seq, key, head.deadline) {
            self.counters.received.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Local source `source` ended after event `last`: its end goes as the last item of its stream.
    pub(in crate::channel) fn tree_source_end(self: &Arc<Self>, source: LocalId, last: u64, history: History) {
        let Some(node) = self.node.upgrade() else { return };
        let msg = self.source_end_msg(node.id, source, last, Vec::new());
        self.tree_broadcast(&node, source, msg.to_bytes(), history);
    }

    /// Broadcasts a stream item of local source `source` on this node's stream.
    fn tree_broadcast(self: &Arc<Self>, node: &Arc<Channels>, source: LocalId, item: Bytes, history: History) {
        {
            let at = now();
            let mut t = self.tree.inner.lock();
            let ms = t.ms(at);
            let Some(g) = t.gossip.as_mut() else { return };
            let id = g.broadcast(item.clone(), ms);
            drop(t);
            if history.is_on() {
                self.tree.events.inner.lock().own.keep(id.seq, source, history, item, at);
            }
        }
        self.tree_pump(node);
    }

    /// Sinks that accept type `ty` are told an event expired.
    fn expired_here(&self, ty: &str) {
        for s in self.local_sinks.read().iter().filter(|s| s.types.accepts(ty)) {
            s.queue.add_expired(1);
        }
    }

    /// A stream item of another node, in that stream's order (events; ends; expired notices). Returns false if it
    /// is not one of these.
    pub(super) fn tree_item(self: &Arc<Self>, node: &Arc<Channels>, id: EventId, item: &Bytes) -> Option<Message> {
        let (head, frame) = split(item);
        if frame.len() < 4 {
            return None;
        }
        let msg = match decode_body(frame.slice(4..)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(channel = %self.name, stream = %id.source, "a frame relayed in the overlay: {e}");
                return None;
            }
        };
        let origin = id.source;
        match msg {
            Message::Event(e) if origin != node.id => {
                self.tree.inner.lock().event_streams.insert(origin);
                self.tree.delivered.fetch_add(1, Ordering::Relaxed);
                self.counters.received.fetch_add(1, Ordering::Relaxed);
                self.tracks.lock().entry((origin, e.source)).or_default().tree_arrived(e.seq);
                if head.expired(unix_us(std::time::SystemTime::now())) {
                    // Past its deadline here: it is forwarded as expired (`tree_outgoing`), and reported here.
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    self.expired_here(&e.ty);
                } else {
                    self.offer_now(e.ty, e.attrs, e.payload, e.seq, SourceKey::new(origin, e.source), head.deadline);
                }
                None
            }
            Message::Expired { source, seq, ty, .. } if origin != node.id => {
                self.tree.inner.lock().event_streams.insert(origin);
                self.tracks.lock().entry((origin, source)).or_default().tree_arrived(seq);
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
                self.expired_here(&ty);
                None
            }
            Message::SourceEnd { origin: o, origin_instance, source, last, .. } if o == origin && origin != node.id => {
                tracing::debug!(channel = %self.name, node = %origin, source = source.0, last, "a source's end in the overlay");
                self.heard_end(origin, source, last);
                {
                    let at = now();
                    let gap_memory = node.cfg.gap_memory;
                    let mut ev = self.tree.events.inner.lock();
                    ev.ends.retain(|e| at.saturating_duration_since(e.at) < gap_memory);
                    if ev.ends.len() >= REMEMBERED_ENDS {
                        ev.ends.pop_front();
                    }
                    ev.ends.push_back(EndItem { at, id, payload: item.clone() });
                }
                // Every earlier item of the stream was delivered or reported missed: nothing more to say, unless
                // events also came directly (an OUT-filter, Block sinks), whose account is the direct `SourceEnd`.
                if let Some(t) = self.tracks.lock().get_mut(&(origin, source)) {
                    // Not the end of a later instance's source with the same local id (see `RecvTrack::end_applies`).
                    if t.last == 0 && t.end_applies(origin_instance) {
                        t.settle();
                    }
                }
                None
            }
            Message::Event(_) | Message::Expired { .. } | Message::SourceEnd { .. } => None,
            other => Some(other),
        }
    }

    /// An event item about to go to a neighbour: its lane, and (if its deadline passed) the `Expired` notice that
    /// goes in its place.
    pub(super) fn tree_outgoing(&self, payload: &Bytes) -> (u8, Option<Bytes>) {
        // The common case (no head) costs one byte's look.
        if payload.len() < 5 || (payload[4] != priority_kind() && payload[4] != deadline_kind()) {
            return (0, None);
        }
        let (head, frame) = split(payload);
        if !head.expired(unix_us(std::time::SystemTime::now())) || frame.len() < 4 {
            return (head.lane, None);
        }
        let Ok(Message::Event(e)) = decode_body(frame.slice(4..)) else { return (head.lane, None) };
        let mut b = BytesMut::new();
        encode_head(&mut b, self.id(), Head { deadline: None, ..head });
        Message::Expired { channel: self.id(), source: e.source, seq: e.seq, ty: e.ty.to_string(), sinks: Vec::new() }
            .encode(&mut b);
        (head.lane, Some(b.freeze()))
    }

    /// Before the overlay handles `body` from `from`: a graft this node's overlay cannot answer (its cache no longer
    /// holds the item) is answered from this node's history or remembered ends; and the origins of streams with a
    /// gap become announcers of the missing items (returned, to hand to the overlay after `body`).
    pub(super) fn tree_before(
        &self,
        g: &Gossip,
        from: NodeId,
        body: &GossipMsg,
        known: impl Fn(NodeId) -> bool,
    ) -> (Option<GossipMsg>, Vec<(NodeId, EventId)>) {
        let mut announce = Vec::new();
        match body {
            GossipMsg::Graft { id } if !g.cached(id) => {
                let at = now();
                let ev = self.tree.events.inner.lock();
                let item =
                    if Some(id.source) == self.node.upgrade().map(|n| n.id) { ev.own.get(id.seq, at) } else { None }
                        .or_else(|| ev.ends.iter().find(|e| e.id == *id).map(|e| e.payload.clone()));
                return (item.map(|payload| GossipMsg::Event { id: *id, hops: 0, payload }), announce);
            }
            GossipMsg::IHave { ids } => {
                for id in ids {
                    if id.source != from && known(id.source) && g.next_of(id.source).is_some_and(|n| id.seq >= n) {
                        announce.push((id.source, *id));
                    }
                }
            }
            GossipMsg::Event { id, .. }
                if id.source != from && known(id.source) && g.next_of(id.source).is_some_and(|n| id.seq > n) =>
            {
                announce.push((id.source, EventId { source: id.source, seq: id.seq - 1 }));
            }
            _ => {}
        }
        (None, announce)
    }

    /// The link with node `id` carries events sent directly for a Block sink: node `id` has one (this node's sources
    /// send to it directly), or this node has one (node `id`'s sources may send to it); or, while a local source has
    /// an OUT-filter, node `id` has a sink. Such links stay up.
    pub(super) fn tree_direct(&self, id: NodeId) -> bool {
        if self.local_sinks.read().iter().any(|s| s.queue.overflow() == Overflow::Block) {
            return true;
        }
        let routes = self.routes.read().clone();
        // While a local source has an OUT-filter, every sink's node may be sent to directly (`Routes::direct`).
        let direct = routes.direct && self.routes_direct();
        routes.sinks.iter().any(|r| {
            (direct || r.overflow == Overflow::Block)
                && matches!(r.dest, Dest::Remote(p) if routes.peers.get(p).is_some_and(|p| p.id == id))
        })
    }

    /// The link with node `id` is gone: if it carried events for Block sinks, the routing table takes the node's new
    /// peer (the lost one is forgotten) and the node is dialled again.
    pub(super) fn tree_direct_lost(self: &Arc<Self>, node: &Arc<Channels>, id: NodeId) {
        if self.tree_direct(id) && self.state.lock().peers().contains_key(&id) {
            // No member changed: the parts with a link (this one among them) are checked for a new one, not every
            // member's. A dead node's dials fail at once and come back here until it is taken for gone (100 ms and
            // more): a debug log showed a full pass over the members about every 0.2 ms meanwhile.
            self.update_routes(node, Some(Vec::new()));
            self.tree_dial(id);
        }
    }

    /// Opens a link to node `id` if there is none (for events sent to it directly).
    pub(in crate::channel) fn tree_dial(self: &Arc<Self>, id: NodeId) {
        let Some(node) = self.node.upgrade() else { return };
        if !node.links.is_linked_or_dialing(id) {
            // An empty sample: a message that changes nothing but needs a link.
            self.gossip_send(&node, id, GossipMsg::ShuffleReply { peers: Vec::new(), back: Vec::new() }, &mut None);
        }
    }

    /// After the overlay's outputs were executed: new overlay neighbours hear of the ends remembered here, and of the
    /// newest item this node has of every event stream. The overlay's periodic summaries name a stream only for 10 s
    /// after its last item: a node that comes back later (its whole active view died with 30 % of the channel and
    /// its refills took long on a loaded host, say) would otherwise never learn of the last events of a source that
    /// went quiet, and its sinks would wait for them unaware (seen at 400 nodes: events neither received nor
    /// reported missed).
    pub(super) fn tree_hand_ends(self: &Arc<Self>, node: &Arc<Channels>, active: &[NodeId]) {
        let (fresh, mut ids) = {
            let mut ev = self.tree.events.inner.lock();
            if ev.told == active {
                return;
            }
            let fresh: Vec<NodeId> = active.iter().copied().filter(|p| !ev.told.contains(p)).collect();
            ev.told = active.to_vec();
            let at = now();
            let gap_memory = node.cfg.gap_memory;
            let ids: Vec<EventId> =
                ev.ends.iter().filter(|e| at.saturating_duration_since(e.at) < gap_memory).map(|e| e.id).collect();
            (fresh, ids)
        };
        if fresh.is_empty() {
            return;
        }
        {
            let t = self.tree.inner.lock();
            if let Some(g) = t.gossip.as_ref() {
                // This node's own streams too: its events, and its membership stream, so that a joiner's snapshot
                // spreads from its first neighbours on (it was broadcast when the joiner had none yet).
                let own = [node.id, super::membership_stream(node.id)];
                for stream in t.event_streams.iter().copied().chain(own) {
                    if let Some(next) = g.next_of(stream).filter(|n| *n > 1) {
                        let newest = EventId { source: stream, seq: next - 1 };
                        if !ids.contains(&newest) {
                            ids.push(newest);
                        }
                    }
                }
            }
        }
        if ids.is_empty() {
            return;
        }
        for p in fresh {
            // Announced: a neighbour that has them ignores this; one that lacks them grafts them (and the events
            // before them it can), and has the rest reported missed.
            self.gossip_send(node, p, GossipMsg::IHave { ids: ids.clone() }, &mut None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn item(n: usize) -> Bytes {
        Bytes::from(vec![1u8; n])
    }

    #[test]
    fn a_head_splits_off_its_item() {
        let ch = ChannelId(3);
        let mut b = BytesMut::new();
        let head = Head { lane: 2, deadline: Some(1_764_900_000_000_000) };
        encode_head(&mut b, ch, head);
        encode_event(&mut b, ch, LocalId(1), 7, "t", &Attrs::new(), b"xyz");
        let (h, frame) = split(&b.clone().freeze());
        assert_eq!(h, head);
        let Ok(Message::Event(e)) = decode_body(frame.slice(4..)) else { panic!("an event frame") };
        assert_eq!((e.seq, &*e.payload), (7, &b"xyz"[..]));
        // Without a head the item is the event frame itself.
        let mut plain = BytesMut::new();
        encode_event(&mut plain, ch, LocalId(1), 8, "t", &Attrs::new(), b"");
        let plain = plain.freeze();
        assert_eq!(split(&plain), (Head::default(), plain.clone()));
        assert!(head.expired(1_764_900_000_000_000) && !head.expired(1_764_899_999_999_999));
        assert!(!Head::default().expired(u64::MAX));
    }

    #[test]
    fn own_history_keeps_each_source_within_its_bounds() {
        let t0 = Instant::now();
        let mut h = OwnHistory::default();
        for n in 1..=5 {
            h.keep(n, LocalId(1), History::events(3), item(10), t0);
        }
        h.keep(6, LocalId(2), History::events(10).bytes(25), item(10), t0);
        h.keep(7, LocalId(2), History::events(10).bytes(25), item(10), t0);
        h.keep(8, LocalId(2), History::events(10).bytes(25), item(10), t0);
        let kept: Vec<u64> = (1..=8).filter(|n| h.get(*n, t0).is_some()).collect();
        assert_eq!(kept, vec![3, 4, 5, 7, 8], "3 events of source 1, 25 bytes of source 2");
        // An age bound: too old to answer.
        let mut h = OwnHistory::default();
        h.keep(1, LocalId(1), History::events(10).age(Duration::from_secs(5)), item(1), t0);
        assert!(h.get(1, t0 + Duration::from_secs(4)).is_some());
        assert!(h.get(1, t0 + Duration::from_secs(6)).is_none());
        // Turned off: forgotten.
        h.keep(2, LocalId(1), History::off(), item(1), t0);
        assert_eq!(h.len(), 0);
    }
}
