//! A source's history: the events that sinks of cut-off nodes missed, kept within bounds (events, bytes, age) so
//! that a node that comes back gets them replayed, in order and before anything newer, instead of a gap report.
//! Whatever fell out of the history is still reported as missed (docs/DURABILITY.md).
//!
//! Only events that some cut-off sink would have received are kept: while every sink is connected the history costs
//! nothing on the submit path. The decisions here are pure (the time is passed in).

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use kecho_proto::{LocalId, NodeId};

pub use crate::config::History;

/// A sink on another node, as a source names it: with the instance of the channel there (`NodeSnapshot::instance`)
/// that it belongs to, since a node that opens the channel again numbers its sinks from 1 again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct RemoteSink {
    pub(super) node: NodeId,
    pub(super) instance: u64,
    pub(super) sink: LocalId,
}

/// One kept event: its encoded frame and the cut-off sinks that would have received it (and have not yet).
#[derive(Debug)]
struct Entry {
    seq: u64,
    at: Instant,
    frame: Bytes,
    sinks: Vec<RemoteSink>,
}

/// A source's kept events, oldest first.
#[derive(Debug, Default)]
pub(super) struct Kept {
    limits: History,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Events queued to other nodes, to replay to a node whose link broke with some of them in flight.
    sent: VecDeque<Sent>,
    sent_bytes: usize,
    /// The small frames of `sent`, oldest first, back to back.
    ring: VecDeque<u8>,
}

/// Where one kept event went: the node, the event's number in that node's numbering (see `Message::Routed`), and the
/// sinks it was meant for if not all of the node's accepting sinks (its `Targets`).
pub(super) type SentTo = (NodeId, u64, Option<Vec<LocalId>>);

/// An event queued to other nodes.
#[derive(Debug)]
struct Sent {
    seq: u64,
    /// When it was sent, if the bounds include an age.
    at: Option<Instant>,
    frame: Frame,
    to: smallvec::SmallVec<[SentTo; 1]>,
}

/// A kept frame: shared with the links (a large event), or copied into the history's own ring of bytes (a small
/// one: no allocation, no reference count per event; it is the oldest bytes of the ring once it is the oldest
/// entry).
#[derive(Debug)]
enum Frame {
    Shared(Bytes),
    Ring(u32),
}

impl Frame {
    fn len(&self) -> usize {
        match self {
            Frame::Shared(b) => b.len(),
            Frame::Ring(n) => *n as usize,
        }
    }
}

/// An event to replay to a node that came back: its sequence number, frame, and the node's sinks that want it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Replay {
    pub(super) seq: u64,
    pub(super) frame: Bytes,
    pub(super) sinks: Vec<LocalId>,
}

impl Kept {
    pub(super) fn set_limits(&mut self, limits: History, now: Instant) {
        self.limits = limits;
        self.trim(now);
    }

    /// The bounds.
    pub(super) fn limits(&self) -> History {
        self.limits
    }

    pub(super) fn is_on(&self) -> bool {
        self.limits.is_on()
    }

    /// True if the bounds include an age, so that `sent` needs the time.
    pub(super) fn needs_time(&self) -> bool {
        self.limits.age.is_some()
    }

    /// Keeps event `seq` (encoded as `frame`) for cut-off sinks `sinks`, then drops what the bounds no longer allow.
    pub(super) fn keep(&mut self, seq: u64, frame: Bytes, sinks: &[RemoteSink], now: Instant) {
        if !self.is_on() || sinks.is_empty() {
            return;
        }
        self.bytes += frame.len();
        self.entries.push_back(Entry { seq, at: now, frame, sinks: sinks.to_vec() });
        self.trim(now);
    }

    /// Keeps event `seq` (encoded as `frame`), queued to the nodes in `to`, then drops what the bounds no longer
    /// allow.
    /// `now` is needed only under an age bound ([`Kept::needs_time`]); without one the entries' times are not read.
    pub(super) fn sent(&mut self, seq: u64, frame: Bytes, to: smallvec::SmallVec<[SentTo; 1]>, now: Option<Instant>) {
        if !self.is_on() || to.is_empty() {
            return;
        }
        self.push_sent(seq, Frame::Shared(frame), to, now);
    }

    /// Like [`Kept::sent`] for a small frame, copied into the history's ring.
    pub(super) fn sent_small(
        &mut self,
        seq: u64,
        frame: &[u8],
        to: smallvec::SmallVec<[SentTo; 1]>,
        now: Option<Instant>,
    ) {
        if !self.is_on() || to.is_empty() {
            return;
        }
        let Ok(n) = u32::try_from(frame.len()) else { return };
        self.ring.extend(frame);
        self.push_sent(seq, Frame::Ring(n), to, now);
    }

    fn push_sent(&mut self, seq: u64, frame: Frame, to: smallvec::SmallVec<[SentTo; 1]>, now: Option<Instant>) {
        self.sent_bytes += frame.len();
        let l = self.limits;
        self.sent.push_back(Sent { seq, at: now, frame, to });
        while let Some(front) = self.sent.front() {
            let old = match (l.age, now) {
                (Some(a), Some(now)) => front.at.is_some_and(|at| now.saturating_duration_since(at) > a),
                _ => false,
            };
            if self.sent.len() > l.events || self.sent_bytes > l.bytes || old {
                self.sent_bytes -= front.frame.len();
                if let Frame::Ring(n) = front.frame {
                    self.ring.drain(..n as usize);
                }
                self.sent.pop_front();
            } else {
                break;
            }
        }
    }

    /// The kept events queued to node `node`, oldest first: (sequence number, its number in the node's numbering,
    /// frame, targets).
    pub(super) fn sent_to(&self, node: NodeId) -> impl Iterator<Item = (u64, u64, Bytes, Option<&[LocalId]>)> + '_ {
        let mut at = 0usize;
        self.sent.iter().filter_map(move |s| {
            let start = at;
            if let Frame::Ring(n) = s.frame {
                at += n as usize;
            }
            let (_, n, t) = s.to.iter().find(|(d, _, _)| *d == node)?;
            let frame = match &s.frame {
                Frame::Shared(b) => b.clone(),
                Frame::Ring(len) => self.ring.range(start..start + *len as usize).copied().collect::<Vec<u8>>().into(),
            };
            Some((s.seq, *n, frame, t.as_deref()))
        })
    }

    fn trim(&mut self, now: Instant) {
        let l = self.limits;
        while let Some(front) = self.entries.front() {
            let old = l.age.is_some_and(|a| now.saturating_duration_since(front.at) > a);
            if self.entries.len() > l.events || self.bytes > l.bytes || old || !l.is_on() {
                self.bytes -= front.frame.len();
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Node `node` is back with instance `instance` of the channel: the kept events its sinks (of that instance)
    /// missed, oldest first, each with the sinks that want it. They are forgotten here.
    pub(super) fn take_for(&mut self, node: NodeId, instance: u64, now: Instant) -> Vec<Replay> {
        self.trim(now);
        let mut out = Vec::new();
        for e in self.entries.iter_mut() {
            let mut sinks = Vec::new();
            e.sinks.retain(|s| {
                if s.node == node && s.instance == instance {
                    sinks.push(s.sink);
                    false
                } else {
                    true
                }
            });
            if !sinks.is_empty() {
                out.push(Replay { seq: e.seq, frame: e.frame.clone(), sinks });
            }
        }
        self.drop_done();
        out
    }

    /// Forgets where events went to node `node` (its channel was opened again: they are no longer in flight to it).
    pub(super) fn forget_sent_to(&mut self, node: NodeId) {
        for s in self.sent.iter_mut() {
            s.to.retain(|(d, _, _)| *d != node);
        }
    }

    /// Forgets node `node` (gone for good).
    pub(super) fn forget(&mut self, node: NodeId) {
        for e in self.entries.iter_mut() {
            e.sinks.retain(|s| s.node != node);
        }
        self.drop_done();
    }

    /// Forgets the sinks of node `node` but those of instance `instance` of the channel there (the node opened the
    /// channel again: the sinks of its earlier instances are gone for good).
    pub(super) fn forget_other_instances(&mut self, node: NodeId, instance: u64) {
        for e in self.entries.iter_mut() {
            e.sinks.retain(|s| s.node != node || s.instance == instance);
        }
        self.drop_done();
    }

    fn drop_done(&mut self) {
        let mut bytes = self.bytes;
        self.entries.retain(|e| {
            if e.sinks.is_empty() {
                bytes -= e.frame.len();
            }
            !e.sinks.is_empty()
        });
        self.bytes = bytes;
    }

    /// Events kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rs(node: u64, sink: u32) -> RemoteSink {
        RemoteSink { node: NodeId(node), instance: 1, sink: LocalId(sink) }
    }

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn off_keeps_nothing() {
        let mut k = Kept::default();
        k.keep(1, frame(10), &[rs(1, 1)], Instant::now());
        assert_eq!(k.len(), 0);
        assert!(!History::events(10).age(Duration::ZERO).is_on());
    }

    #[test]
    fn bounds_drop_the_oldest_and_replays_go_oldest_first_per_node() {
        let t0 = Instant::now();
        let mut k = Kept::default();
        k.set_limits(History::events(3).bytes(100), t0);
        for seq in 1..=5 {
            k.keep(seq, frame(10), &[rs(1, 1), rs(2, 7)], t0);
        }
        // Events 1 and 2 fell out (3 events at most).
        let r = k.take_for(NodeId(1), 1, t0);
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(r.iter().all(|r| r.sinks == vec![LocalId(1)]));
        assert!(k.take_for(NodeId(1), 1, t0).is_empty(), "replayed once");
        assert_eq!(k.len(), 3, "still kept for node 2");
        k.forget(NodeId(2));
        assert_eq!(k.len(), 0);
        // Bytes: 100 allow 2 frames of 40.
        k.keep(6, frame(40), &[rs(1, 1)], t0);
        k.keep(7, frame(40), &[rs(1, 1)], t0);
        k.keep(8, frame(40), &[rs(1, 1)], t0);
        assert_eq!(k.take_for(NodeId(1), 1, t0).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7, 8]);
    }

    #[test]
    fn age_drops_old_events() {
        let t0 = Instant::now();
        let mut k = Kept::default();
        k.set_limits(History::events(100).age(Duration::from_secs(5)), t0);
        k.keep(1, frame(1), &[rs(1, 1)], t0);
        k.keep(2, frame(1), &[rs(1, 1)], t0 + Duration::from_secs(4));
        let r = k.take_for(NodeId(1), 1, t0 + Duration::from_secs(6));
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn events_sent_are_kept_with_their_numbers_per_node_within_the_bounds() {
        let t0 = Instant::now();
        let mut k = Kept::default();
        k.sent(1, frame(10), smallvec::smallvec![(NodeId(1), 1, None)], None);
        assert_eq!(k.sent_to(NodeId(1)).count(), 0, "off keeps nothing");
        k.set_limits(History::events(2), t0);
        for seq in 1..=3 {
            let to = smallvec::smallvec![(NodeId(1), seq, None), (NodeId(2), seq * 10, Some(vec![LocalId(4)]))];
            k.sent(seq, frame(10), to, None);
        }
        let one: Vec<(u64, u64)> = k.sent_to(NodeId(1)).map(|(s, n, _, _)| (s, n)).collect();
        assert_eq!(one, vec![(2, 2), (3, 3)], "the oldest fell out");
        let two: Vec<(u64, u64, Option<Vec<LocalId>>)> =
            k.sent_to(NodeId(2)).map(|(s, n, _, t)| (s, n, t.map(<[LocalId]>::to_vec))).collect();
        assert_eq!(two, vec![(2, 20, Some(vec![LocalId(4)])), (3, 30, Some(vec![LocalId(4)]))]);
        assert_eq!(k.sent_to(NodeId(3)).count(), 0);
        // An age bound drops what is older.
        let mut k = Kept::default();
        k.set_limits(History::events(10).age(Duration::from_secs(1)), t0);
        k.sent(4, frame(10), smallvec::smallvec![(NodeId(1), 4, None)], Some(t0));
        k.sent(5, frame(10), smallvec::smallvec![(NodeId(1), 5, None)], Some(t0 + Duration::from_secs(2)));
        let one: Vec<u64> = k.sent_to(NodeId(1)).map(|(s, ..)| s).collect();
        assert_eq!(one, vec![5], "4 is too old");
        // Small frames live in the ring, and leave it with their entry.
        let mut k = Kept::default();
        k.set_limits(History::events(2), t0);
        for seq in 1..=3u8 {
            let f = [seq; 3];
            let to = smallvec::smallvec![(NodeId(1), u64::from(seq), None)];
            if seq == 2 {
                k.sent(u64::from(seq), Bytes::copy_from_slice(&f), to, None);
            } else {
                k.sent_small(u64::from(seq), &f, to, None);
            }
        }
        let frames: Vec<(u64, Bytes)> = k.sent_to(NodeId(1)).map(|(s, _, f, _)| (s, f)).collect();
        assert_eq!(frames, vec![(2, Bytes::from_static(&[2; 3])), (3, Bytes::from_static(&[3; 3]))]);
        assert_eq!(k.ring.len(), 3, "event 1's bytes left with it");
    }
}
