//! What became of a source that a sink received from in an earlier life: a durable sink's process that was killed
//! and started again is a new node, which no source knew and no end was meant for. It asks, per source it has a
//! position for and has heard nothing of since, whether the source is still a member, ended (and after which event),
//! or is gone without a word this node heard (`Sink::source_fate`, docs/DURABILITY.md "Sources gone while the sink
//! was away").

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kecho_proto::membership::ChannelState;
use kecho_proto::{LocalId, NodeId, Role};

use super::ChannelInner;
use crate::clock::now;
use crate::queue::SourceKey;

/// Ends heard, at most (the oldest go first).
const HEARD_ENDS: usize = 4096;

/// What this node knows of a source ([`crate::Sink::source_fate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceFate {
    /// A member of the channel has it open: its events come, or its end.
    Present,
    /// It ended after event `last`: its end reached this node (from the source, relayed by a member, or through the
    /// overlay in tree mode) within the node's gap memory.
    Ended {
        /// Its last sequence number.
        last: u64,
    },
    /// No member has it and no end of it reached this node, which has been a member for its source grace: gone,
    /// how far it got unknown.
    Absent,
    /// Not known yet: this node is no member (yet), or became one less than its source grace ago (ends that members
    /// remember are relayed to a node that appears, and may still be on their way).
    Undecided,
}

/// Ends of remote sources this node heard of, whoever told it, for a while.
#[derive(Default)]
pub(super) struct HeardEnds {
    list: VecDeque<(SourceKey, u64, Instant)>,
}

impl HeardEnds {
    /// Source `key` ended after event `last`, heard at `at`; ends older than `memory` are forgotten.
    pub(super) fn heard(&mut self, key: SourceKey, last: u64, at: Instant, memory: Duration) {
        self.forget(at, memory);
        if let Some(e) = self.list.iter_mut().find(|e| e.0 == key) {
            e.1 = e.1.max(last);
            return;
        }
        if self.list.len() >= HEARD_ENDS {
            self.list.pop_front();
        }
        self.list.push_back((key, last, at));
    }

    /// The last event of `key`, if its end was heard within `memory` of `at`.
    pub(super) fn get(&self, key: SourceKey, at: Instant, memory: Duration) -> Option<u64> {
        self.list.iter().find(|e| e.0 == key && at.saturating_duration_since(e.2) < memory).map(|e| e.1)
    }

    fn forget(&mut self, at: Instant, memory: Duration) {
        while self.list.front().is_some_and(|e| at.saturating_duration_since(e.2) >= memory) {
            self.list.pop_front();
        }
    }
}

/// The fate of source `key` given what a node knows: an end heard, the view (`st`, this node's own sources
/// `local`), and how long the node has been a member (`member_for`) against its source grace.
pub(super) fn decide(
    key: SourceKey,
    ended: Option<u64>,
    st: &ChannelState,
    local: (NodeId, &[LocalId]),
    member_for: Option<Duration>,
    grace: Duration,
) -> SourceFate {
    if let Some(last) = ended {
        return SourceFate::Ended { last };
    }
    let (me, mine) = local;
    let present = mine.iter().any(|l| SourceKey::new(me, *l) == key)
        || st.peers().iter().any(|(node, p)| {
            p.snapshot.members.iter().any(|m| matches!(m.role, Role::Source) && SourceKey::new(*node, m.id) == key)
        });
    if present {
        return SourceFate::Present;
    }
    match member_for {
        Some(t) if st.is_member() && t >= grace => SourceFate::Absent,
        _ => SourceFate::Undecided,
    }
}

impl ChannelInner {
    /// Source `source` of node `origin` ended after event `last` (whoever said so).
    pub(super) fn heard_end(&self, origin: NodeId, source: LocalId, last: u64) {
        let Some(node) = self.node.upgrade() else { return };
        self.heard.lock().heard(SourceKey::new(origin, source), last, now(), node.cfg.gap_memory);
    }

    /// See [`crate::Sink::source_fate`].
    pub(super) fn source_fate(&self, key: SourceKey) -> SourceFate {
        let Some(node) = self.node.upgrade() else { return SourceFate::Undecided };
        let at = now();
        let ended = self.heard.lock().get(key, at, node.cfg.gap_memory);
        let mine: Vec<LocalId> = self.members.lock().sources.iter().map(|(id, _)| *id).collect();
        let member_for = self.member_since.lock().map(|t| at.saturating_duration_since(t));
        let st = self.state.lock();
        decide(key, ended, &st, (node.id, &mine), member_for, node.cfg.source_grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heard_ends_keep_the_furthest_and_forget_old_ones() {
        let (a, b) = (SourceKey(1), SourceKey(2));
        let t0 = Instant::now();
        let memory = Duration::from_secs(60);
        let mut h = HeardEnds::default();
        h.heard(a, 10, t0, memory);
        h.heard(a, 7, t0, memory);
        assert_eq!(h.get(a, t0, memory), Some(10));
        assert_eq!(h.get(b, t0, memory), None);
        h.heard(b, 3, t0 + Duration::from_secs(30), memory);
        assert_eq!(h.get(a, t0 + Duration::from_secs(61), memory), None);
        assert_eq!(h.get(b, t0 + Duration::from_secs(61), memory), Some(3));
        // Adding after the memory passed drops the old ones.
        h.heard(b, 4, t0 + Duration::from_secs(100), memory);
        assert_eq!(h.list.len(), 1);
    }

    #[test]
    fn a_bounded_number_of_ends_is_kept() {
        let t0 = Instant::now();
        let memory = Duration::from_secs(60);
        let mut h = HeardEnds::default();
        for i in 0..HEARD_ENDS as u64 + 5 {
            h.heard(SourceKey(i), i, t0, memory);
        }
        assert_eq!(h.list.len(), HEARD_ENDS);
        assert_eq!(h.get(SourceKey(0), t0, memory), None);
        assert_eq!(h.get(SourceKey(HEARD_ENDS as u64 + 4), t0, memory), Some(HEARD_ENDS as u64 + 4));
    }
}
