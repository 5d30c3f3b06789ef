//! Tree mode: when a node broadcasts its own snapshot through the overlay (docs/SCALE.md, "The storm in real
//! processes"). A snapshot's first broadcast on a node's membership stream floods the whole overlay (a new stream has
//! no tree yet: every node pushes it to every neighbour and prunes the duplicates), and a joiner changes its snapshot
//! twice in a row: once when the contact's answer makes it a member, once when the application adds its sink or
//! source a moment later. Broadcast each, a storm of joins cost every member two floods per joiner. So a change is
//! broadcast `COALESCE` after the first change that is not yet out, with the newest version then: one flood for the
//! changes of that window. A goodbye goes at once (the node is leaving). Decisions only, time passed in.

use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long a change of the node's own snapshot waits for the next before it is broadcast.
pub(super) const COALESCE: Duration = Duration::from_millis(50);

/// The own snapshot waiting to be broadcast.
#[derive(Debug, Default)]
pub(super) struct OwnBroadcast {
    /// The newest version's message, and when it is due.
    pending: Option<(u64, Bytes, Instant)>,
    /// The newest version broadcast or pending.
    newest: u64,
}

impl OwnBroadcast {
    /// Version `version` is newer than every version offered so far.
    pub(super) fn is_new(&self, version: u64) -> bool {
        version > self.newest
    }

    /// Version `version` of the node's snapshot, as the overlay message `msg`, is to be broadcast (`left`: the node's
    /// goodbye). Returns what to broadcast now: a goodbye at once (and nothing pending is sent after it); a change at
    /// its window's end. A version not newer than the last one offered is ignored.
    pub(super) fn offer(&mut self, version: u64, msg: Bytes, left: bool, now: Instant) -> Option<Bytes> {
        if !self.is_new(version) {
            return None;
        }
        self.newest = version;
        if left {
            self.pending = None;
            return Some(msg);
        }
        let due = self.pending.as_ref().map_or(now + COALESCE, |(_, _, due)| *due);
        self.pending = Some((version, msg, due));
        None
    }

    /// When [`OwnBroadcast::take_due`] has something to give.
    pub(super) fn due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(_, _, due)| *due)
    }

    /// The newest pending version's message once its window has passed.
    pub(super) fn take_due(&mut self, now: Instant) -> Option<Bytes> {
        if self.due().is_some_and(|due| due <= now) {
            return self.pending.take().map(|(_, msg, _)| msg);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_in_one_window_are_broadcast_once_with_the_newest_version() {
        let t0 = Instant::now();
        let mut own = OwnBroadcast::default();
        // A joiner: the version the contact's answer made, then the one with its sink, a moment later.
        assert_eq!(own.offer(1, Bytes::from_static(b"v1"), false, t0), None);
        assert_eq!(own.offer(2, Bytes::from_static(b"v2"), false, t0 + Duration::from_millis(3)), None);
        assert_eq!(own.due(), Some(t0 + COALESCE), "the window runs from the first change not yet out");
        assert_eq!(own.take_due(t0 + COALESCE - Duration::from_millis(1)), None);
        assert_eq!(own.take_due(t0 + COALESCE), Some(Bytes::from_static(b"v2")));
        assert_eq!(own.take_due(t0 + COALESCE * 2), None, "one broadcast for the window");
        assert_eq!(own.due(), None);
        // A later change opens a window of its own; an older version is not broadcast again.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(own.offer(2, Bytes::from_static(b"v2"), false, t1), None);
        assert_eq!(own.due(), None);
        assert_eq!(own.offer(3, Bytes::from_static(b"v3"), false, t1), None);
        assert_eq!(own.take_due(t1 + COALESCE), Some(Bytes::from_static(b"v3")));
    }

    #[test]
    fn a_goodbye_goes_at_once_and_nothing_pending_follows_it() {
        let t0 = Instant::now();
        let mut own = OwnBroadcast::default();
        assert_eq!(own.offer(4, Bytes::from_static(b"v4"), false, t0), None);
        assert_eq!(own.offer(5, Bytes::from_static(b"bye"), true, t0), Some(Bytes::from_static(b"bye")));
        assert_eq!(own.due(), None);
        assert_eq!(own.take_due(t0 + COALESCE), None);
    }
}
