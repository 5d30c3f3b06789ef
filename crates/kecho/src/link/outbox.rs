//! A link's outbox: the bounded queue of encoded frames for one peer node, and the direct-write shortcut that lets a
//! submitting thread write to a quiet link's socket itself (under the outbox's lock, so per-link order holds).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::queue::ChunkBuf;

/// A link's outgoing frames. Bounded in bytes for events; control frames are always admitted (they are small and
/// rare, and must not be lost to congestion).
pub(crate) struct Outbox {
    limit: usize,
    q: Mutex<OutQ>,
    /// The writer waits here for frames.
    pub(crate) readable: Notify,
    /// Sources waiting for room (Block sinks) wait here.
    pub(crate) writable: Notify,
    /// An event went out through a direct write since the writer last looked (it counts as sending for heartbeats).
    sent_direct: AtomicBool,
    /// Events written directly by submitting threads, for tests and statistics.
    pub(crate) direct_writes: AtomicU64,
    /// Bytes written directly by submitting threads, for statistics.
    pub(crate) direct_bytes: AtomicU64,
    /// See [`DIRECT_QUIET`].
    quiet: Duration,
    /// See [`SOURCE_IDLE`].
    source_idle: Duration,
    /// `OutQ::bytes` as of the last change, for a room check without the lock.
    queued: AtomicUsize,
}

pub(crate) struct OutQ {
    pub(crate) frames: VecDeque<Bytes>,
    /// Small event frames copied in by sources, after everything in `frames`: a burst of them is written from here
    /// as one segment, with no reference count per frame and no copy by the writer.
    open: ChunkBuf,
    pub(crate) bytes: usize,
    /// Event frames accepted (written directly or queued), for statistics.
    events: u64,
    /// The writer took frames and has not finished writing them: nothing may be written around it.
    writing: bool,
    /// The link's socket, for direct writes by submitting threads (plain TCP links; `None` for TLS and while there
    /// is no link).
    direct: Option<Arc<OwnedWriteHalf>>,
    /// When the link counts as quiet (`None`: now): [`DIRECT_QUIET`] after the writer ran out of frames or after the
    /// last direct write. A deadline rather than a time stamp, so that the check is one comparison.
    quiet_at: Option<Instant>,
}

/// The size of the memory small frames are copied into (see `OutQ::open`).
const OPEN_CHUNK: usize = 64 * 1024;

impl OutQ {
    /// Nothing is queued.
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.open.pending() == 0
    }

    /// Copies bytes into the open run.
    fn append(&mut self, bytes: &[u8]) {
        if self.open.left() < bytes.len() {
            self.seal();
        }
        self.open.room(bytes.len(), OPEN_CHUNK).extend_from_slice(bytes);
    }

    /// Moves the small frames copied so far behind `frames`, so that what is queued next goes after them.
    fn seal(&mut self) {
        if self.open.pending() != 0 {
            let run = self.open.split();
            self.frames.push_back(run);
        }
    }
}

/// A submitting thread writes an event to the socket itself only if the link and the source have been quiet this long:
/// under load the writer task batches many events per system call, which a write per event would undo.
pub(crate) const DIRECT_QUIET: Duration = Duration::from_micros(5);

/// How long a source must have been idle for its submit to write directly: measured from the end of its last direct
/// write, so shorter than [`DIRECT_QUIET`] (which the link measures from the start of its last write). A source in a
/// loop comes back within a microsecond or so; one waiting for anything at all (an answer, a timer) takes longer.
pub(crate) const SOURCE_IDLE: Duration = Duration::from_micros(2);

/// A source's side of the direct-write rule: it was idle for [`SOURCE_IDLE`] before this submit (since the end of
/// its last submit that wrote directly, or the start of the last one that did not). The clock is read at most once
/// per submit, and only when a link could take a direct write.
#[derive(Default)]
pub(crate) struct SourceGate {
    last: Option<Instant>,
    now: Option<Instant>,
    wrote: bool,
}

impl SourceGate {
    fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }

    fn idle(&mut self, quiet: Duration) -> bool {
        let now = self.now();
        self.last.is_none_or(|t| now.saturating_duration_since(t) >= quiet)
    }

    /// Ends a submit.
    pub(crate) fn done(&mut self) {
        if let Some(now) = self.now.take() {
            self.last = Some(if std::mem::take(&mut self.wrote) { Instant::now() } else { now });
        }
    }
}

impl Outbox {
    pub(crate) fn new(limit: usize) -> Self {
        Outbox { source_idle: SOURCE_IDLE, ..Self::with_quiet(limit, DIRECT_QUIET) }
    }

    /// An outbox whose link counts as quiet after `quiet` (tests use a long one to be independent of timing).
    pub(crate) fn with_quiet(limit: usize, quiet: Duration) -> Self {
        Outbox {
            quiet,
            source_idle: quiet,
            limit,
            q: Mutex::new(OutQ {
                frames: VecDeque::new(),
                open: ChunkBuf::default(),
                bytes: 0,
                events: 0,
                writing: false,
                direct: None,
                quiet_at: None,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            sent_direct: AtomicBool::new(false),
            direct_writes: AtomicU64::new(0),
            direct_bytes: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
        }
    }

    /// Event frames accepted so far (written directly or queued).
    pub(crate) fn events(&self) -> u64 {
        self.q.lock().events
    }

    /// Bytes queued and not yet written, as of the last change.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// True if an event of `len` bytes fits now (read without the lock: the answer may be out of date by the time
    /// the caller acts on it, as any answer would be once the lock was released).
    pub(crate) fn has_room(&self, len: usize) -> bool {
        let bytes = self.queued.load(Ordering::Acquire);
        bytes == 0 || bytes + len <= self.limit
    }

    /// Queues a shared event frame, preceded by `first` (its routing and target frames, or empty; copied), if there is
    /// room for both, or regardless if `blocks`: a sink it goes to has the Block policy and the source waited for room
    /// before (`wait_room`), so the frame must not be dropped though a control frame, a replay or the frame's own
    /// prefix took some of that room meanwhile (the limit is then exceeded by at most one event of that source).
    ///
    /// The fast path: when nothing is queued, the writer is not writing and the link has been quiet for
    /// [`DIRECT_QUIET`], the frames are written to the socket here, without waking the writer task (one hop less
    /// for an event on an idle link). The check and the write happen under the queue's lock, so no frame can be
    /// queued or written meanwhile and per-link order holds. What a non-blocking write leaves (a partial write, or a
    /// full socket buffer) is queued for the writer, ahead of anything else.
    ///
    /// The source must have been idle too (see [`SourceGate`]): with several links, a source writing to each itself
    /// would otherwise take so long per event that every link looks quiet again at its next event.
    pub(crate) fn push_event_with(&self, first: &[u8], frame: Bytes, gate: &mut SourceGate, blocks: bool) -> bool {
        let mut q = self.q.lock();
        let len = first.len() + frame.len();
        if !blocks && q.bytes != 0 && q.bytes + len > self.limit {
            return false;
        }
        q.events += 1;
        let written = self.try_direct(&mut q, first, &frame, gate);
        if written == len {
            drop(q);
            self.direct_done();
            return true;
        }
        q.bytes += len - written;
        self.queued.store(q.bytes, Ordering::Release);
        if written < first.len() {
            // The target list is small: copied like a small frame, and the shared frame follows it.
            q.append(&first[written..]);
            q.seal();
            q.frames.push_back(frame);
        } else {
            q.seal();
            q.frames.push_back(frame.slice(written - first.len()..));
        }
        self.queued_wake(q);
        true
    }

    /// Queues a small event frame, preceded by `first` (its target list, or empty), by copying both; the same rules as
    /// `push_event_with` otherwise (room, direct writes). For frames below the writer's copy threshold, where a
    /// copy costs less than sharing the bytes.
    pub(crate) fn push_event_copied(&self, first: &[u8], frame: &[u8], gate: &mut SourceGate, blocks: bool) -> bool {
        let mut q = self.q.lock();
        let len = first.len() + frame.len();
        if !blocks && q.bytes != 0 && q.bytes + len > self.limit {
            return false;
        }
        q.events += 1;
        let written = self.try_direct(&mut q, first, frame, gate);
        if written == len {
            drop(q);
            self.direct_done();
            return true;
        }
        q.bytes += len - written;
        self.queued.store(q.bytes, Ordering::Release);
        if written < first.len() {
            q.append(&first[written..]);
            q.append(frame);
        } else {
            q.append(&frame[written - first.len()..]);
        }
        self.queued_wake(q);
        true
    }

    /// Releases the lock after queueing; wakes the writer if it is idle (one that is writing comes back for more on
    /// its own).
    fn queued_wake(&self, q: parking_lot::MutexGuard<'_, OutQ>) {
        let idle = !q.writing;
        drop(q);
        if idle {
            self.readable.notify_one();
        }
    }

    /// Writes `first` and `frame` to the socket from the submitting thread if the link and the source are quiet (see
    /// `push_event_with`); returns how many bytes went out.
    fn try_direct(&self, q: &mut OutQ, first: &[u8], frame: &[u8], gate: &mut SourceGate) -> usize {
        if !q.is_empty() || q.writing {
            return 0;
        }
        let Some(sock) = &q.direct else { return 0 };
        let now = gate.now();
        if !(q.quiet_at.is_none_or(|t| now >= t) && gate.idle(self.source_idle)) {
            return 0;
        }
        let written = super::writer::write_now(sock, first, frame);
        self.direct_bytes.fetch_add(written as u64, Ordering::Relaxed);
        q.quiet_at = now.checked_add(self.quiet);
        gate.wrote = true;
        written
    }

    fn direct_done(&self) {
        self.sent_direct.store(true, Ordering::Release);
        self.direct_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives the outbox the link's socket for direct writes (`None`: no more direct writes). The writer is idle on a
    /// new link until it takes frames.
    pub(crate) fn set_direct(&self, sock: Option<Arc<OwnedWriteHalf>>) {
        let mut q = self.q.lock();
        q.direct = sock;
        q.writing = false;
    }

    /// Stops direct writes to `sock` if it is still the outbox's socket (a newer link's is left alone).
    pub(crate) fn clear_direct(&self, sock: &Arc<OwnedWriteHalf>) {
        let mut q = self.q.lock();
        if q.direct.as_ref().is_some_and(|d| Arc::ptr_eq(d, sock)) {
            q.direct = None;
        }
    }

    /// True once after events went out through direct writes.
    pub(crate) fn take_sent_direct(&self) -> bool {
        self.sent_direct.swap(false, Ordering::AcqRel)
    }

    /// Queues a control frame regardless of the limit.
    pub(crate) fn push_control(&self, frame: Bytes) {
        let mut q = self.q.lock();
        q.seal();
        q.bytes += frame.len();
        self.queued.store(q.bytes, Ordering::Release);
        q.frames.push_back(frame);
        drop(q);
        self.readable.notify_one();
    }

    /// Queues a control frame ahead of everything else (the handshake answer).
    pub(crate) fn push_front_control(&self, frame: Bytes) {
        let mut q = self.q.lock();
        q.bytes += frame.len();
        self.queued.store(q.bytes, Ordering::Release);
        q.frames.push_front(frame);
        drop(q);
        self.readable.notify_one();
    }

    /// Takes every queued frame (the caller is the writer: until it comes back for more, it is writing them).
    pub(crate) fn take_all(&self, into: &mut VecDeque<Bytes>) {
        let mut q = self.q.lock();
        q.seal();
        std::mem::swap(&mut q.frames, into);
        q.bytes = 0;
        self.queued.store(q.bytes, Ordering::Release);
        if into.is_empty() && q.writing {
            q.quiet_at = Instant::now().checked_add(self.quiet);
        }
        q.writing = !into.is_empty();
    }

    /// Waits until an event of `len` bytes fits.
    pub(crate) async fn wait_room(&self, len: usize) {
        loop {
            let room = self.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.has_room(len) {
                return;
            }
            room.await;
        }
    }

    /// Discards everything queued; returns how many frames were dropped.
    pub(crate) fn clear(&self) -> usize {
        let mut q = self.q.lock();
        q.seal();
        let n = q.frames.len();
        q.frames.clear();
        q.bytes = 0;
        self.queued.store(q.bytes, Ordering::Release);
        drop(q);
        self.writable.notify_waiters();
        n
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.q.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_frames_keep_their_place_among_shared_and_control_frames() {
        let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        assert!(out.push_event_copied(b"", b"e1", &mut gate, false));
        assert!(out.push_event_copied(b"", b"e2", &mut gate, false));
        out.push_control(Bytes::from_static(b"c1"));
        assert!(out.push_event_copied(b"t3", b"e3", &mut gate, false));
        assert!(out.push_event_with(b"t4", Bytes::from_static(b"e4"), &mut gate, false));
        assert!(out.push_event_copied(b"", b"e5", &mut gate, false));
        out.push_front_control(Bytes::from_static(b"h0"));
        assert!(!out.has_room(1 << 20), "queued bytes count against the limit");
        let mut frames = VecDeque::new();
        out.take_all(&mut frames);
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(bytes, b"h0e1e2c1t3e3t4e4e5");
        assert!(out.has_room(1 << 20));
        assert!(out.is_empty());
    }

    #[test]
    fn a_full_outbox_refuses_copied_frames() {
        let out = Outbox::with_quiet(8, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        assert!(out.push_event_copied(b"", b"123456", &mut gate, false));
        assert!(!out.push_event_copied(b"", b"789", &mut gate, false));
        let mut frames = VecDeque::new();
        out.take_all(&mut frames);
        assert!(out.push_event_copied(b"", b"789", &mut gate, false), "room again once the writer took the frames");
        // An event for a Block sink is never refused: its source waited for room, and what took some of that room
        // meanwhile must not make it lose the event.
        assert!(!out.push_event_copied(b"", b"abcdef", &mut gate, false));
        assert!(out.push_event_copied(b"", b"abcdef", &mut gate, true));
        out.take_all(&mut frames);
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(bytes, b"789abcdef");
    }

    #[test]
    fn a_source_that_just_wrote_directly_is_not_idle() {
        let quiet = Duration::from_millis(200);
        let mut gate = SourceGate::default();
        assert!(gate.idle(quiet), "a source's first event finds it idle");
        assert!(gate.idle(quiet), "every link of one submit sees the same answer");
        gate.wrote = true;
        // The direct writes took long: idleness counts from their end, not from the submit's start.
        std::thread::sleep(quiet + Duration::from_millis(10));
        gate.done();
        assert!(!gate.idle(quiet), "the next submit right after is not idle");
        gate.done();
        assert!(!gate.idle(quiet), "nor the one after (measured from the start of the last)");
        std::thread::sleep(quiet + Duration::from_millis(10));
        assert!(!gate.idle(quiet), "the answer is fixed at the first look within a submit");
        gate.done();
        std::thread::sleep(quiet + Duration::from_millis(10));
        assert!(gate.idle(quiet), "after a pause the source is idle again");
    }
}
