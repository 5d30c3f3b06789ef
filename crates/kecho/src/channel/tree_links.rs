//! Tree mode: the links a node keeps for others' talk (docs/SCALE.md, "Links at one node"). The overlay's neighbours
//! are the links a channel needs; every other link is kept only while a message it carried may still need it, and
//! a node opens few links of its own to ask members for snapshots it missed. Decisions only, time passed in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kecho_proto::gossip::GossipMsg;
use kecho_proto::NodeId;

/// A link that carried a channel message this recently is kept even when the overlay does not use it (a join in
/// progress, a neighbour request being answered).
pub(super) const LINK_GRACE: Duration = Duration::from_secs(5);
/// A link whose last message from this node was an answer that ends an exchange (a join's answer) is kept this long
/// after it, not `LINK_GRACE`: a link with anything queued is not closed, so the answer is written first, and the
/// asker, which keeps the link for its own `LINK_GRACE`, does not take the close for a failure (it is later than
/// `TRIED` after its request). The channel's contact answers every joiner: kept for `LINK_GRACE`, the joiners of a
/// storm held 34 to 69 links at the contact.
pub(super) const ANSWER_LINGER: Duration = Duration::from_secs(2);
/// Most links a node opens, within `LINK_GRACE`, to ask members it already knows for snapshots the overlay did not
/// bring it (the rest is left to the anti-entropy with its neighbours). Unbounded, a joiner of a storm asked some 150
/// members at once, one link each.
pub(super) const ASK_LINKS: usize = 2;

/// How long the overlay's message `msg`, sent, keeps its link (unless the overlay uses it): an answer that ends an
/// exchange (a `Disconnect`, a refused neighbour request, a shuffle's answer) for `ANSWER_LINGER`,
/// anything else for `LINK_GRACE`.
pub(super) fn keep_after_sending(msg: &GossipMsg) -> Duration {
    match msg {
        GossipMsg::Disconnect | GossipMsg::NeighborReply { accepted: false } | GossipMsg::ShuffleReply { .. } => {
            ANSWER_LINGER
        }
        _ => LINK_GRACE,
    }
}

/// How long a message keeps its link when `keep` was asked for: an event sent to a node that is no neighbour
/// (`neighbour` false) answers its graft (events go to neighbours only otherwise; a node with a gap grafts from the
/// stream's origin when its neighbours cannot answer, `tree_events.rs`), so it keeps the link for `ANSWER_LINGER` at
/// most. After a mass failure most survivors grafted the events after it from their source's node, and the links
/// kept 5 s after each answer held nearly 300 links there.
pub(super) fn keep_sent(msg: &GossipMsg, neighbour: bool, keep: Duration) -> Duration {
    match msg {
        GossipMsg::Event { .. } if !neighbour => keep.min(ANSWER_LINGER),
        _ => keep,
    }
}

/// How long the overlay's message `msg`, received, keeps its link (`neighbour`: its sender is in this node's active
/// view). A shuffle's answer keeps it for `LINK_GRACE`: an empty one is what a node sends to dial a neighbour whose
/// link failed, and it takes the neighbour for gone if no link is up a few seconds later (a shuffle's answer comes
/// from a neighbour, back along its walk; the contact's answer to a joiner comes on a link its sender closes after
/// `ANSWER_LINGER`). A neighbour's message keeps it for `LINK_GRACE` too (it
/// stays linked as a neighbour anyway), but one that ends an exchange (a `Disconnect`, an answer to a neighbour
/// request) for `ANSWER_LINGER`, and so does any other message from a node that is no neighbour: a stale
/// announcement or event of a former neighbour (answered with a `Disconnect` where the overlay does so), a `Join` or
/// a neighbour request (its sender becomes a neighbour, or is refused with an answer that keeps the link as long).
/// Each joiner's first messages go to the channel's contact, a neighbour of each joiner until the next one evicts
/// it: kept for `LINK_GRACE`, they held 30 to 40 links there.
pub(super) fn keep_after_receiving(msg: &GossipMsg, neighbour: bool) -> Duration {
    match msg {
        GossipMsg::ShuffleReply { .. } => LINK_GRACE,
        _ if !neighbour => ANSWER_LINGER,
        GossipMsg::Disconnect | GossipMsg::NeighborReply { .. } => ANSWER_LINGER,
        _ => LINK_GRACE,
    }
}

/// When this channel last talked with each node, and until when that talk keeps the link.
#[derive(Default)]
pub(super) struct Talks {
    map: HashMap<NodeId, Talk>,
    /// The map is pruned of old talk when it reaches this size (then twice what is left, at least 64).
    prune_at: usize,
}

#[derive(Clone, Copy)]
struct Talk {
    /// The last message sent to or received from the node.
    at: Instant,
    /// The link is kept until then.
    until: Instant,
}

impl Talks {
    /// A message went to or came from `id` at `at`: its link is kept for `keep` after it (or longer, if earlier talk
    /// keeps it longer).
    pub(super) fn note(&mut self, id: NodeId, at: Instant, keep: Duration) {
        if self.map.len() >= self.prune_at.max(64) {
            self.map.retain(|_, t| t.until > at || at.saturating_duration_since(t.at) < LINK_GRACE);
            self.prune_at = self.map.len() * 2;
        }
        let until = at + keep;
        let t = self.map.entry(id).or_insert(Talk { at, until });
        t.at = t.at.max(at);
        t.until = t.until.max(until);
    }

    /// `id` is no neighbour any more (this node sent it a `Disconnect` at `at`): what it said before keeps its link
    /// no longer than `keep` from now.
    pub(super) fn cut(&mut self, id: NodeId, at: Instant, keep: Duration) {
        let t = self.map.entry(id).or_insert(Talk { at, until: at + keep });
        t.at = t.at.max(at);
        t.until = t.until.min(at + keep).max(at);
    }

    /// When this channel last talked with `id`.
    pub(super) fn last(&self, id: NodeId) -> Option<Instant> {
        self.map.get(&id).map(|t| t.at)
    }

    /// The talk with `id` keeps its link at `at`.
    pub(super) fn keeps(&self, id: NodeId, at: Instant) -> bool {
        self.map.get(&id).is_some_and(|t| t.until > at)
    }
}

/// The links opened to ask members for lost snapshots, within the last `LINK_GRACE`.
#[derive(Default)]
pub(super) struct AskBudget {
    asks: VecDeque<Instant>,
}

impl AskBudget {
    /// Whether a new link may be opened at `at` to ask a member directly (counted if so).
    pub(super) fn allow(&mut self, at: Instant) -> bool {
        while self.asks.front().is_some_and(|t| at.saturating_duration_since(*t) >= LINK_GRACE) {
            self.asks.pop_front();
        }
        if self.asks.len() >= ASK_LINKS {
            return false;
        }
        self.asks.push_back(at);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_keeps_the_link_for_less_than_a_request() {
        let t0 = Instant::now();
        let mut talks = Talks::default();
        talks.note(NodeId(1), t0, ANSWER_LINGER);
        talks.note(NodeId(2), t0, LINK_GRACE);
        let after = t0 + ANSWER_LINGER + Duration::from_millis(1);
        assert!(!talks.keeps(NodeId(1), after), "an answered exchange lets its link go after the linger");
        assert!(talks.keeps(NodeId(2), after), "a request keeps its link for the grace");
        assert_eq!(talks.last(NodeId(1)), Some(t0));
        // An answer after a request does not shorten the request's grace; a request after an answer lengthens it.
        talks.note(NodeId(2), t0 + Duration::from_millis(10), ANSWER_LINGER);
        assert!(talks.keeps(NodeId(2), t0 + LINK_GRACE - Duration::from_millis(1)));
        assert_eq!(talks.last(NodeId(2)), Some(t0 + Duration::from_millis(10)));
        talks.note(NodeId(1), after, LINK_GRACE);
        assert!(talks.keeps(NodeId(1), after + LINK_GRACE - Duration::from_millis(1)));
        assert!(!talks.keeps(NodeId(3), t0), "no talk, no link kept");
        // A neighbour dropped (a `Disconnect` sent): its earlier talk keeps the link only for the linger from then.
        talks.note(NodeId(5), t0, LINK_GRACE);
        let dropped = t0 + Duration::from_millis(100);
        talks.cut(NodeId(5), dropped, ANSWER_LINGER);
        assert!(talks.keeps(NodeId(5), dropped + ANSWER_LINGER - Duration::from_millis(1)));
        assert!(!talks.keeps(NodeId(5), dropped + ANSWER_LINGER));
        assert_eq!(talks.last(NodeId(5)), Some(dropped));
    }

    #[test]
    fn the_overlay_s_answers_keep_their_links_briefly_and_the_rest_for_the_grace() {
        let answers = [
            GossipMsg::Disconnect,
            GossipMsg::NeighborReply { accepted: false },
            GossipMsg::ShuffleReply { peers: vec![NodeId(4)], back: Vec::new() },
        ];
        for m in &answers {
            assert_eq!(keep_after_sending(m), ANSWER_LINGER, "{m:?} sent");
        }
        for m in &answers[..2] {
            assert_eq!(keep_after_receiving(m, true), ANSWER_LINGER, "{m:?} received");
        }
        // An empty shuffle answer dials a neighbour whose link failed: the dialled node keeps the link for the grace,
        // neighbour or not, or the dialler would take it for gone.
        for neighbour in [false, true] {
            let dial = GossipMsg::ShuffleReply { peers: Vec::new(), back: Vec::new() };
            assert_eq!(keep_after_receiving(&dial, neighbour), LINK_GRACE);
        }
        // Anything from a node that is no neighbour; a neighbour's announcements and requests keep the grace.
        let ihave = GossipMsg::IHave { ids: Vec::new() };
        for m in
            [GossipMsg::Join, ihave.clone(), GossipMsg::Prune { source: NodeId(4) }, GossipMsg::Neighbor { high: true }]
        {
            assert_eq!(keep_after_receiving(&m, false), ANSWER_LINGER, "{m:?} from a node that is no neighbour");
        }
        let others = [
            GossipMsg::Join,
            GossipMsg::ForwardJoin { joiner: NodeId(4), ttl: 2 },
            GossipMsg::Neighbor { high: false },
            GossipMsg::NeighborReply { accepted: true },
            GossipMsg::Shuffle { origin: NodeId(4), ttl: 2, peers: Vec::new(), back: Vec::new() },
            GossipMsg::IHave { ids: Vec::new() },
        ];
        for m in &others {
            assert_eq!(keep_after_sending(m), LINK_GRACE, "{m:?} sent");
        }
        assert_eq!(keep_after_receiving(&ihave, true), LINK_GRACE);
        assert_eq!(
            keep_after_receiving(
                &GossipMsg::Shuffle { origin: NodeId(4), ttl: 2, peers: Vec::new(), back: Vec::new() },
                true
            ),
            LINK_GRACE
        );
    }

    #[test]
    fn an_event_sent_to_a_node_that_is_no_neighbour_is_a_graft_s_answer() {
        let event = GossipMsg::Event {
            id: kecho_proto::gossip::EventId { source: NodeId(4), seq: 1 },
            hops: 0,
            payload: bytes::Bytes::from_static(b"e"),
        };
        assert_eq!(keep_sent(&event, false, LINK_GRACE), ANSWER_LINGER);
        assert_eq!(keep_sent(&event, true, LINK_GRACE), LINK_GRACE, "a neighbour's tree link");
        let graft = GossipMsg::Graft { id: kecho_proto::gossip::EventId { source: NodeId(4), seq: 1 } };
        assert_eq!(keep_sent(&graft, false, LINK_GRACE), LINK_GRACE, "a request keeps the grace");
    }

    #[test]
    fn old_talk_is_pruned_and_current_talk_is_not() {
        let t0 = Instant::now();
        let mut talks = Talks::default();
        for i in 0..1_000 {
            talks.note(NodeId(i), t0, LINK_GRACE);
        }
        let later = t0 + LINK_GRACE * 2;
        for i in 1_000..1_100 {
            talks.note(NodeId(i), later, LINK_GRACE);
        }
        assert!(talks.map.len() < 300, "{} entries kept", talks.map.len());
        assert!((1_000..1_100).all(|i| talks.keeps(NodeId(i), later)));
    }

    #[test]
    fn asks_on_links_of_their_own_are_bounded_per_grace() {
        let t0 = Instant::now();
        let mut budget = AskBudget::default();
        let allowed = (0..150).filter(|i| budget.allow(t0 + Duration::from_millis(*i))).count();
        assert_eq!(allowed, ASK_LINKS, "a storm joiner's 150 asks at once");
        assert!(!budget.allow(t0 + LINK_GRACE - Duration::from_millis(1)));
        assert!(budget.allow(t0 + LINK_GRACE), "the budget comes back once the first asks' links may be closed");
    }
}
