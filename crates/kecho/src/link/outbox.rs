//! A link's outbox: the bounded queue of encoded frames for one peer node, and the direct-write shortcut that lets a
//! submitting thread write to a quiet link's socket itself (under the outbox's lock, so per-link order holds).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::queue::ChunkBuf;

/// Where a submitting thread writes a quiet link's frame itself (see `Outbox::push_event_with`).
#[derive(Clone)]
pub(crate) enum Direct {
    /// A plain TCP link's socket.
    Tcp(Arc<OwnedWriteHalf>),
    /// A QUIC link's main stream (quinn's connection driver then sends it).
    #[cfg(feature = "quic")]
    Quic(Arc<super::quic::QuicSend>),
}

impl Direct {
    /// Writes `first` and `frame` without waiting; returns how many bytes went.
    fn write_now(&self, first: &[u8], frame: &[u8]) -> usize {
        match self {
            Direct::Tcp(sock) => super::writer::write_now(sock, first, frame),
            #[cfg(feature = "quic")]
            Direct::Quic(s) => s.write_now(first, frame),
        }
    }

    /// Whether a direct write may be tried now, on a link that carries priorities or not. Always on TCP. A QUIC link
    /// takes one only from a task of the runtime: quinn wakes the connection driver while it holds the connection's
    /// lock, and a wake-up from a thread that is not one of the runtime's workers (a `block_on` future, a plain
    /// thread) starts the driver at once on a worker, where it blocks on that lock (seen with `perf`: about one event
    /// in four, with a futex wait and wake-up more, and the idle latency worse than through the writer task; in a
    /// task, the driver is queued behind it on its worker). And only while the link carries no priorities: with
    /// direct writes there, a source mixing priorities lost its order when the urgent connection could not be made
    /// and the urgent lanes moved to an urgent stream (`tests/quic.rs`,
    /// `a_quic_urgent_connection_that_cannot_be_made_falls_back_to_urgent_streams` failed in 11 of 22 runs, an
    /// event arriving ahead of up to 9 before it; the cause was not found).
    #[cfg_attr(not(feature = "quic"), allow(unused_variables))]
    fn takes(&self, prioritised: bool) -> bool {
        match self {
            Direct::Tcp(_) => true,
            #[cfg(feature = "quic")]
            Direct::Quic(_) => !prioritised && tokio::task::try_id().is_some(),
        }
    }

    fn same(&self, other: &Direct) -> bool {
        match (self, other) {
            (Direct::Tcp(a), Direct::Tcp(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "quic")]
            (Direct::Quic(a), Direct::Quic(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "quic")]
            _ => false,
        }
    }
}

/// A link's outgoing frames. Bounded in bytes for events; control frames are always admitted (they are small and
/// rare, and must not be lost to congestion).
///
/// Frames wait in one of [`LANES`] lanes, one per priority: the writer takes the highest lane first, so a frame
/// overtakes every frame queued in lower lanes. Within a lane the order is FIFO. A source never overtakes its own
/// frames: while frames of its are still queued in a lower lane, its next frame goes to that lane (see [`Held`]).
/// Control frames that keep their place among events go to the lowest lane, behind every event queued before them (a
/// `SourceEnd` must follow the source's events); those that need no place (pings, pongs, join messages) go to the
/// highest, ahead of any backlog (`push_link_control`). The rest of a frame begun by a direct write goes first of all.
pub(crate) struct Outbox {
    /// Bytes of events queued before the outbox counts as full: set per link kind when a link comes up
    /// ([`Outbox::set_limit`]).
    limit: AtomicUsize,
    q: Mutex<OutQ>,
    /// The writer waits here for frames.
    pub(crate) readable: Notify,
    /// Sources waiting for room (Block sinks) wait here.
    pub(crate) writable: Notify,
    /// With a stream per priority (see [`Outbox::start_streams`]), the urgent stream's writer waits here for frames of
    /// lanes 1 and up.
    pub(crate) readable_urgent: Notify,
    /// An event went out through a direct write since the writer last looked (it counts as sending for heartbeats).
    sent_direct: AtomicBool,
    /// Events written directly by submitting threads, for tests and statistics.
    pub(crate) direct_writes: AtomicU64,
    /// Bytes written directly by submitting threads, for statistics.
    pub(crate) direct_bytes: AtomicU64,
    /// An event of a priority above the default was queued here (a copy of `OutQ::prioritised`, read by the writer
    /// without the lock).
    pub(crate) prioritised: AtomicBool,
    /// Events that passed their deadline in this outbox and were replaced by their expiry notice.
    pub(crate) expired: AtomicU64,
    /// See [`DIRECT_QUIET`].
    quiet: Duration,
    /// See [`SOURCE_IDLE`].
    source_idle: Duration,
    /// `OutQ::bytes` as of the last change, for a room check without the lock.
    queued: AtomicUsize,
}

/// How many priorities an outbox keeps apart: priorities 0 (the default) to `LANES - 1`; higher goes first.
pub(crate) const LANES: usize = 4;

/// When a frame expires and what is written in its place then (empty: nothing).
pub(crate) struct Expiry {
    pub(crate) deadline: Instant,
    pub(crate) instead: Bytes,
}

/// A queued frame.
struct Queued {
    bytes: Bytes,
    /// Only frames with a deadline have one (boxed: they are the rare case).
    expiry: Option<Box<Expiry>>,
    /// Ends with the prefix (routing and target frames) of the next entry's event: the writer takes both together,
    /// so that no frame of another lane can come between them.
    glued: bool,
    /// Streams mode only (see [`Outbox::start_streams`]): an empty entry that stands for a `Wait` frame on its
    /// stream. The writer of this entry's stream takes it once each lane of the other stream has had
    /// `taken` reach the position given here (0: any), and writes in its place a `Wait` for every byte the other stream
    /// has been given so far: the receiver reads on past it only once it has read that much of the other stream.
    wait: Option<Box<WaitFor>>,
}

/// A `Wait` placeholder's condition and what it writes.
struct WaitFor {
    /// Taken once each lane's `taken` reached this (lanes of the other stream; 0: any).
    after: [u64; LANES],
    /// Writes `Wait` for 0 bytes (the receiver waits only until the main stream's `Sync` is read) rather than for
    /// everything the other stream has been given: for a source whose last frame went on the main connection before
    /// the split, which the `Sync` follows.
    sync_only: bool,
}

/// One priority's queue.
#[derive(Default)]
struct Lane {
    frames: VecDeque<Queued>,
    /// Small event frames copied in by sources, after everything in `frames`: a burst of them is written from here
    /// as one segment, with no reference count per frame and no copy by the writer.
    open: ChunkBuf,
    /// Bytes ever queued in this lane, and ever taken from it (or discarded): a source's frames are all gone once
    /// `taken` reaches the position its last frame ended at.
    pushed: u64,
    taken: u64,
}

impl Lane {
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.open.pending() == 0
    }

    /// Copies bytes into the open run.
    fn append(&mut self, bytes: &[u8]) {
        if self.open.left() < bytes.len() {
            self.seal();
        }
        self.open.room(bytes.len(), OPEN_CHUNK).extend_from_slice(bytes);
        self.pushed += bytes.len() as u64;
    }

    /// Copies a prefix and its frame into the open run, into one segment (never split by a seal between them).
    fn append_both(&mut self, first: &[u8], frame: &[u8]) {
        if self.open.left() < first.len() + frame.len() {
            self.seal();
        }
        self.open.room(first.len() + frame.len(), OPEN_CHUNK).extend_from_slice(first);
        self.open.room(frame.len(), OPEN_CHUNK).extend_from_slice(frame);
        self.pushed += (first.len() + frame.len()) as u64;
    }

    fn push(&mut self, bytes: Bytes, expiry: Option<Box<Expiry>>) {
        self.seal();
        self.pushed += bytes.len() as u64;
        self.frames.push_back(Queued { bytes, expiry, glued: false, wait: None });
    }

    /// Pushes an event frame whose prefix was just copied into the open run: the run is glued to it.
    fn push_after_prefix(&mut self, bytes: Bytes) {
        self.seal();
        if let Some(run) = self.frames.back_mut() {
            run.glued = true;
        }
        self.push(bytes, None);
    }

    /// Queues a `Wait` placeholder (see [`Queued::wait`]).
    fn push_wait(&mut self, after: [u64; LANES], sync_only: bool) {
        self.seal();
        let wait = Some(Box::new(WaitFor { after, sync_only }));
        self.frames.push_back(Queued { bytes: Bytes::new(), expiry: None, glued: false, wait });
    }

    /// Moves the small frames copied so far behind `frames`, so that what is queued next goes after them.
    fn seal(&mut self) {
        if self.open.pending() != 0 {
            let run = self.open.split();
            self.frames.push_back(Queued { bytes: run, expiry: None, glued: false, wait: None });
        }
    }
}

/// Where one source's last frame went in one outbox, so that its next frame does not overtake it: the outbox (by
/// address), the lane and the lane's position after the frame.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct Held(Option<(usize, u8, u64)>);

impl Held {
    /// The lane of the last frame, if any.
    pub(crate) fn lane(&self) -> Option<u8> {
        self.0.map(|(_, l, _)| l)
    }
}

/// How a source wants its next frame queued: the lane of its priority, its deadline (if it has one), and where
/// its frames went before in this outbox.
pub(crate) struct Urgency<'a> {
    pub(crate) lane: u8,
    pub(crate) expiry: Option<Expiry>,
    pub(crate) held: &'a mut Held,
    /// A sink the event goes to has the Block policy: the source waited for room, and the push never refuses it.
    pub(crate) blocks: bool,
}

impl<'a> Urgency<'a> {
    /// The default lane, no deadline.
    pub(crate) fn plain(held: &'a mut Held) -> Self {
        Urgency { lane: 0, expiry: None, held, blocks: false }
    }
}

pub(crate) struct OutQ {
    lanes: [Lane; LANES],
    pub(crate) bytes: usize,
    /// Frames with a deadline queued (the writer reads the clock only when there are some).
    timely: usize,
    /// A frame was queued in a lane above 0 (the writer then shortens the socket's unsent queue and, on a TCP link,
    /// asks for the urgent connection).
    prioritised: bool,
    /// Event frames accepted (written directly or queued), for statistics.
    events: u64,
    /// The writer took frames and has not finished writing them: nothing may be written around it.
    writing: bool,
    /// Where submitting threads write directly (a plain TCP link's socket, a QUIC link's main stream; `None` for TLS,
    /// same-host links and while there is no link).
    direct: Option<Direct>,
    /// When the link counts as quiet (`None`: now): [`DIRECT_QUIET`] after the writer ran out of frames or after the
    /// last direct write. A deadline rather than a time stamp, so that the check is one comparison.
    quiet_at: Option<Instant>,
    /// Streams mode (a QUIC link with a stream per priority, see [`Outbox::start_streams`]): lane 0 goes to the main
    /// stream, lanes 1 and up to the urgent stream, each taken by its own writer.
    streams: Option<Box<Streams>>,
    /// The urgent lanes are held for a second connection that is being made ([`Outbox::hold_urgent`]): the writer
    /// takes lane 0 only, and frames are queued as in streams mode (a source's order across the lanes kept by `Wait`
    /// placeholders), until streams mode starts or the hold is released.
    hold: bool,
    /// Each lane's `taken` when frames started being queued for two streams (the hold or streams mode): a source's
    /// frame of an urgent lane that ended there went on the main stream.
    split_taken: [u64; LANES],
    /// The top lane's position after the rest of a frame begun by a direct write (0: none): that rest must follow its
    /// start on the same connection, so the urgent lanes cannot move to another one until it is taken.
    rest_end: u64,
    /// The link's urgent lanes may move to another stream or connection later ([`Outbox::set_movable`]).
    movable: bool,
}

/// The state of streams mode: what each stream's writer was given, for the `Wait` frames.
#[derive(Default)]
struct Streams {
    /// Bytes given to the main stream's writer after its `Sync` frame, and to the urgent stream's writer.
    given: [u64; 2],
    /// The urgent stream's writer took frames and has not finished writing them.
    writing_urgent: bool,
    /// A stream's writer stopped at a `Wait` placeholder whose condition the other stream's writer must meet first:
    /// wake it when that one takes frames.
    stalled: [bool; 2],
}

/// The stream a lane goes to in streams mode: 0 the main one, 1 the urgent one.
fn stream_of(lane: usize) -> usize {
    usize::from(lane > 0)
}

/// The frame that starts the count of the main stream's bytes (kind [`SYNC_KIND`], empty).
pub(crate) const SYNC_KIND: u8 = 50;
/// The frame that makes the receiver wait for the other stream (kind [`WAIT_KIND`], `u64` bytes).
pub(crate) const WAIT_KIND: u8 = 51;

/// A `Sync` frame, with its length prefix.
pub(crate) fn sync_frame() -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&[SYNC_KIND]);
    b.freeze()
}

/// A `Wait` frame for `bytes` of the other stream, with its length prefix.
pub(crate) fn wait_frame(bytes: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(13);
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&[WAIT_KIND]);
    b.extend_from_slice(&bytes.to_le_bytes());
    b.freeze()
}

/// The size of the memory small frames are copied into (see `Lane::open`).
const OPEN_CHUNK: usize = 64 * 1024;

/// The writer takes at most this many bytes (and at least one frame) at a time: a higher-priority frame queued
/// meanwhile then waits for at most this much (plus what the socket holds), the first one on a link too.
pub(crate) const TAKE_BUDGET: usize = 64 * 1024;

impl OutQ {
    /// Frames are queued for two streams (streams mode, or the urgent lanes held for one).
    fn split(&self) -> bool {
        self.streams.is_some() || self.hold
    }

    /// Remembers that the rest of a frame begun by a direct write was queued in the top lane (`written` > 0).
    fn rest_queued(&mut self, written: usize) {
        if written > 0 {
            self.rest_end = self.lanes[LANES - 1].pushed;
        }
    }

    /// Queues at the front of lane 0 a `Wait` placeholder for everything queued in the urgent lanes, if anything is:
    /// from now on they go to another stream, and a source's frames queued in lane 0 after its urgent ones (before
    /// the split, with no placeholder of their own) must not overtake them. (The other way round, an urgent frame
    /// queued before the split behind its source's frames already taken for the main stream, has its placeholder
    /// from `wait_for_source`.)
    fn wait_for_urgent_lanes(&mut self) {
        if self.lanes[1..].iter().all(Lane::is_empty) {
            return;
        }
        let mut after = [0; LANES];
        for (a, l) in after.iter_mut().zip(&mut self.lanes).skip(1) {
            l.seal();
            *a = l.pushed;
        }
        let l0 = &mut self.lanes[0];
        let wait = Some(Box::new(WaitFor { after, sync_only: false }));
        l0.frames.push_front(Queued { bytes: Bytes::new(), expiry: None, glued: false, wait });
    }

    /// Bytes queued in lane `lane` and above.
    fn bytes_from(&self, lane: u8) -> usize {
        if lane == 0 {
            return self.bytes;
        }
        self.lanes[usize::from(lane).min(LANES - 1)..].iter().map(|l| (l.pushed - l.taken) as usize).sum()
    }

    /// Nothing is queued.
    fn is_empty(&self) -> bool {
        self.lanes.iter().all(Lane::is_empty)
    }

    /// The lane a source's frame goes to: its own, unless frames of this source are still queued in a lower one. In
    /// streams mode also an urgent lane that still holds frames of the source, when it wants lane 0 (they would be on
    /// another stream otherwise).
    fn lane_for(&self, id: usize, u: &Urgency<'_>) -> usize {
        let split = self.split();
        let want = usize::from(u.lane).min(LANES - 1);
        match u.held.0 {
            Some((o, l, pos)) if o == id && usize::from(l) < want && self.lanes[usize::from(l)].taken < pos => {
                usize::from(l)
            }
            Some((o, l, pos))
                if o == id && split && want == 0 && l > 0 && self.lanes[usize::from(l).min(LANES - 1)].taken < pos =>
            {
                usize::from(l).min(LANES - 1)
            }
            _ => want,
        }
    }

    /// A source's frame of lane `lane` was written directly (only on a link with one connection and nothing queued):
    /// its place is recorded as a frame of that lane taken already, so that its next frame is treated as one behind
    /// frames that went on the main connection (a `Wait` for its `Sync` if it goes to the urgent one). Without it, a
    /// new source whose first urgent event was written directly sent its second on a newly made urgent connection
    /// with no `Wait`: it overtook the first (and its `Routed` frame) while the main connection held a bulk backlog,
    /// and the receiver counted it `stale` and then missed.
    fn went_directly(&mut self, id: usize, held: &mut Held, lane: usize) {
        debug_assert!(self.is_empty() && !self.split(), "a direct write with frames queued or lanes split");
        *held = Held(Some((id, lane as u8, self.lanes[lane].taken)));
    }

    /// Streams mode: queues a `Wait` placeholder in `lane` ahead of a source's frame if its last frame went to the
    /// other stream (so that the receiver takes this one only after that one), whose writer took it already.
    /// Before the split, on a link whose urgent lanes may move to another stream ([`Outbox::set_movable`]): an urgent
    /// frame of a source whose last frame was taken already (so went on the main stream) gets a placeholder for the
    /// `Sync` only, which writes nothing unless the frame does move: then the receiver takes it only once it has read
    /// the main stream up to its `Sync`, behind the source's frames from before (seen as events reported missed over
    /// QUIC, whose main stream carried three 32 KiB events more slowly than the urgent connection took to come up).
    fn wait_for_source(&mut self, id: usize, held: &Held, lane: usize) {
        if !self.split() {
            if let Some((o, l, pos)) = held.0.filter(|_| self.movable && lane > 0) {
                if o == id && self.lanes[usize::from(l).min(LANES - 1)].taken >= pos {
                    self.lanes[lane].push_wait([0; LANES], true);
                }
            }
            return;
        }
        if let Some((o, l, pos)) = held.0 {
            let l = usize::from(l).min(LANES - 1);
            // The stream its last frame went to: a frame taken before the split went on the main one, before its
            // `Sync` (the receiver may still be reading it there), whatever its lane.
            let before_split = pos <= self.split_taken[l];
            let went = if before_split { 0 } else { stream_of(l) };
            if o == id && went != stream_of(lane) {
                let mut after = [0; LANES];
                after[l] = pos;
                self.lanes[lane].push_wait(after, before_split);
            }
        }
    }
}

/// The lane a frame is queued in after `written` of its bytes went out through a direct write: a frame begun on the
/// socket must be finished before any other byte is written, so its rest goes to the highest lane (a direct write
/// happens only when nothing is queued, so that puts it first). Anything queued later, whatever its lane, follows it;
/// queued in the frame's own lane, a more urgent frame would be taken first and land in the middle of it.
fn rest_lane(lane: usize, written: usize) -> usize {
    if written > 0 {
        LANES - 1
    } else {
        lane
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

    /// Bytes of events queued before the outbox counts as full.
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the bound (when a link comes up: same-host links may keep a shorter queue than network ones).
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// An outbox whose link counts as quiet after `quiet` (tests use a long one to be independent of timing).
    pub(crate) fn with_quiet(limit: usize, quiet: Duration) -> Self {
        Outbox {
            quiet,
            source_idle: quiet,
            limit: AtomicUsize::new(limit),
            q: Mutex::new(OutQ {
                lanes: Default::default(),
                bytes: 0,
                timely: 0,
                prioritised: false,
                events: 0,
                writing: false,
                direct: None,
                quiet_at: None,
                streams: None,
                hold: false,
                split_taken: [0; LANES],
                rest_end: 0,
                movable: false,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            readable_urgent: Notify::new(),
            sent_direct: AtomicBool::new(false),
            direct_writes: AtomicU64::new(0),
            direct_bytes: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            prioritised: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
        }
    }

    /// This outbox's identity for [`Held`].
    fn id(&self) -> usize {
        self as *const Outbox as usize
    }

    /// Frames of the source whose last frame went where `held` says are still queued here (the writer has not taken
    /// them): its next event must not go around them (as a datagram, say).
    pub(crate) fn holds(&self, held: &Held) -> bool {
        match held.0 {
            Some((o, l, pos)) if o == self.id() => self.q.lock().lanes[usize::from(l).min(LANES - 1)].taken < pos,
            _ => false,
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

    /// True if an event of `len` bytes fits now in lane `lane` (for lane 0 read without the lock: the answer may be
    /// out of date by the time the caller acts on it, as any answer would be once the lock was released). The limit
    /// applies to the bytes queued in that lane and the lanes above it: an urgent event does not wait for room
    /// behind a backlog of lower priority.
    #[inline]
    pub(crate) fn has_room(&self, len: usize, lane: u8) -> bool {
        let bytes = if lane == 0 { self.queued.load(Ordering::Acquire) } else { self.q.lock().bytes_from(lane) };
        bytes == 0 || bytes + len <= self.limit()
    }

    /// Queues a shared event frame, preceded by `first` (its routing and target frames, or empty; copied), if there is
    /// room for both, in the lane `u` says (see [`Outbox`]), or regardless of room if `u.blocks`: a sink it goes to has
    /// the Block policy and the source waited for room before (`wait_room`), so the frame must not be dropped though a
    /// control frame, a replay or the frame's own prefix took some of that room meanwhile (the limit is then exceeded by
    /// at most one event of that source).
    ///
    /// The fast path: when nothing is queued, the writer is not writing and the link has been quiet for
    /// [`DIRECT_QUIET`], the frames are written to the socket here, without waking the writer task (one hop less
    /// for an event on an idle link). The check and the write happen under the queue's lock, so no frame can be
    /// queued or written meanwhile and per-link order holds. What a non-blocking write leaves (a partial write, or a
    /// full socket buffer) is queued for the writer, ahead of anything else.
    ///
    /// The source must have been idle too (see [`SourceGate`]): with several links, a source writing to each itself
    /// would otherwise take so long per event that every link looks quiet again at its next event.
    ///
    /// A frame with an expiry is queued as one entry with `first` (copied together): should it pass its deadline
    /// before the writer takes it, the expiry's notice is written in its place.
    pub(crate) fn push_event_with(&self, first: &[u8], frame: Bytes, gate: &mut SourceGate, u: Urgency<'_>) -> bool {
        let mut q = self.q.lock();
        let len = first.len() + frame.len();
        let lane = q.lane_for(self.id(), &u);
        let queued = q.bytes_from(lane as u8);
        if !u.blocks && queued != 0 && queued + len > self.limit() {
            return false;
        }
        // A prioritised frame marks the link even when it is written directly (a quiet link): from then on takes
        // are budgeted and the kernel's send queue kept short, or the next backlog would go out as one take.
        if lane > 0 && !q.prioritised {
            q.prioritised = true;
            self.prioritised.store(true, Ordering::Release);
            // The writer reacts to it at once (a TCP link asks for its urgent connection), even when this frame is
            // written directly and nothing wakes it otherwise.
            self.readable.notify_one();
        }
        q.events += 1;
        let written = self.try_direct(&mut q, first, &frame, gate);
        if written == len {
            q.went_directly(self.id(), u.held, lane);
            drop(q);
            self.direct_done();
            return true;
        }
        q.bytes += len - written;
        self.queued.store(q.bytes, Ordering::Release);
        let lane = rest_lane(lane, written);
        let timely = written == 0 && u.expiry.is_some();
        q.wait_for_source(self.id(), u.held, lane);
        let l = &mut q.lanes[lane];
        if timely {
            // Both parts in one entry, so that they expire together.
            let mut b = BytesMut::with_capacity(len);
            b.extend_from_slice(first);
            b.extend_from_slice(&frame);
            l.push(b.freeze(), u.expiry.map(Box::new));
        } else if written < first.len() {
            // The target list is small: copied like a small frame, and the shared frame follows it.
            l.append(&first[written..]);
            l.push_after_prefix(frame);
        } else {
            l.push(frame.slice(written - first.len()..), None);
        }
        *u.held = Held(Some((self.id(), lane as u8, l.pushed)));
        q.rest_queued(written);
        q.timely += usize::from(timely);
        self.queued_wake(q, lane);
        true
    }

    /// Queues a small event frame, preceded by `first` (its target list, or empty), by copying both; the same rules as
    /// `push_event_with` otherwise (room, direct writes, lanes). For frames below the writer's copy threshold, where a
    /// copy costs less than sharing the bytes. A frame with an expiry goes through `push_event_with`.
    pub(crate) fn push_event_copied(&self, first: &[u8], frame: &[u8], gate: &mut SourceGate, u: Urgency<'_>) -> bool {
        if u.expiry.is_some() {
            return self.push_event_with(first, Bytes::copy_from_slice(frame), gate, u);
        }
        let mut q = self.q.lock();
        let len = first.len() + frame.len();
        let lane = q.lane_for(self.id(), &u);
        let queued = q.bytes_from(lane as u8);
        if !u.blocks && queued != 0 && queued + len > self.limit() {
            return false;
        }
        // A prioritised frame marks the link even when it is written directly (a quiet link): from then on takes
        // are budgeted and the kernel's send queue kept short, or the next backlog would go out as one take.
        if lane > 0 && !q.prioritised {
            q.prioritised = true;
            self.prioritised.store(true, Ordering::Release);
            // The writer reacts to it at once (a TCP link asks for its urgent connection), even when this frame is
            // written directly and nothing wakes it otherwise.
            self.readable.notify_one();
        }
        q.events += 1;
        let written = self.try_direct(&mut q, first, frame, gate);
        if written == len {
            q.went_directly(self.id(), u.held, lane);
            drop(q);
            self.direct_done();
            return true;
        }
        q.bytes += len - written;
        self.queued.store(q.bytes, Ordering::Release);
        let lane = rest_lane(lane, written);
        q.wait_for_source(self.id(), u.held, lane);
        let l = &mut q.lanes[lane];
        if written < first.len() {
            l.append_both(&first[written..], frame);
        } else {
            l.append(&frame[written - first.len()..]);
        }
        *u.held = Held(Some((self.id(), lane as u8, l.pushed)));
        q.rest_queued(written);
        self.queued_wake(q, lane);
        true
    }

    /// Queues a run of event frames of one source (`run`, frame `i` ending at `ends[i]`, shared rather than copied),
    /// preceded by `first` (the first frame's routing frame, or empty; copied), under one lock with one wake-up of the
    /// writer: the batched form of `push_event_with` (the same lanes and direct writes). Returns how many of the
    /// frames were queued: all if `u.blocks` (the source waited for room for the run; the limit is then exceeded by
    /// at most one run), else those that fit, in order (when nothing is queued the first always goes, as a single
    /// frame would). The caller accounts for the rest as lost. No frame of the run has an expiry.
    pub(crate) fn push_events(
        &self,
        first: &[u8],
        run: &Bytes,
        ends: &[usize],
        gate: &mut SourceGate,
        u: Urgency<'_>,
    ) -> usize {
        debug_assert!(u.expiry.is_none());
        let Some(&last) = ends.last() else { return 0 };
        debug_assert_eq!(last, run.len());
        let mut q = self.q.lock();
        let lane = q.lane_for(self.id(), &u);
        let queued = q.bytes_from(lane as u8);
        let n = if u.blocks {
            ends.len()
        } else {
            let room = self.limit().saturating_sub(queued + first.len());
            let fit = ends.partition_point(|&e| e <= room);
            if queued == 0 {
                fit.max(1)
            } else {
                fit
            }
        };
        if n == 0 {
            return 0;
        }
        let end = ends[n - 1];
        let len = first.len() + end;
        if lane > 0 && !q.prioritised {
            q.prioritised = true;
            self.prioritised.store(true, Ordering::Release);
            // The writer reacts to it at once (a TCP link asks for its urgent connection), even when this frame is
            // written directly and nothing wakes it otherwise.
            self.readable.notify_one();
        }
        q.events += n as u64;
        let written = self.try_direct(&mut q, first, &run[..end], gate);
        if written == len {
            q.went_directly(self.id(), u.held, lane);
            drop(q);
            self.direct_done();
            self.direct_writes.fetch_add(n as u64 - 1, Ordering::Relaxed);
            return n;
        }
        q.bytes += len - written;
        self.queued.store(q.bytes, Ordering::Release);
        let lane = rest_lane(lane, written);
        q.wait_for_source(self.id(), u.held, lane);
        let l = &mut q.lanes[lane];
        if written < first.len() {
            l.append(&first[written..]);
            l.push_after_prefix(run.slice(..end));
        } else {
            l.push(run.slice(written - first.len()..end), None);
        }
        *u.held = Held(Some((self.id(), lane as u8, l.pushed)));
        q.rest_queued(written);
        self.queued_wake(q, lane);
        n
    }

    /// Releases the lock after queueing in `lane`; wakes the writer that takes it if it is idle (one that is writing
    /// comes back for more on its own).
    fn queued_wake(&self, q: parking_lot::MutexGuard<'_, OutQ>, lane: usize) {
        match &q.streams {
            Some(s) if lane > 0 => {
                let idle = !s.writing_urgent;
                drop(q);
                if idle {
                    self.readable_urgent.notify_one();
                }
            }
            _ => {
                let idle = !q.writing;
                drop(q);
                if idle {
                    self.readable.notify_one();
                }
            }
        }
    }

    /// Starts streams mode (a QUIC link whose peer takes a stream per priority; called by the link's writer): from
    /// now on lane 0 goes to the link's main stream and lanes 1 and up to an urgent stream, each taken by its own
    /// writer (`take_all` and `take_urgent`), so that an urgent frame never waits behind bulk bytes in one stream.
    /// Returns the `Sync` frame that the main stream's writer writes first (the receiver counts the main stream's
    /// bytes from it, for `Wait` frames). A source's order across the two streams is kept by `Wait` placeholders
    /// (`wait_for_source`), and a control frame of lane 0 waits for everything queued in the urgent lanes before it.
    /// Frames already queued in the urgent lanes go to the urgent stream too: lane 0 waits for them first (see
    /// `wait_for_urgent_lanes`). Not while the rest of a directly written frame is queued ([`Outbox::may_split`]).
    pub(crate) fn start_streams(&self) -> Bytes {
        let mut q = self.q.lock();
        debug_assert!(q.lanes[LANES - 1].taken >= q.rest_end, "the rest of a direct write is still queued");
        if !q.hold {
            q.wait_for_urgent_lanes();
            q.split_taken = std::array::from_fn(|i| q.lanes[i].taken);
        }
        q.hold = false;
        q.streams = Some(Box::default());
        drop(q);
        self.readable_urgent.notify_one();
        sync_frame()
    }

    /// Whether the current link's urgent lanes may move to another stream or connection later (a QUIC link with a
    /// stream per priority, a link with an urgent connection slot): until they do, an urgent frame queued behind its
    /// source's frames already taken is marked for the move (`wait_for_source`). Set by the link's writer at start.
    pub(crate) fn set_movable(&self, movable: bool) {
        self.q.lock().movable = movable;
    }

    /// Ends streams mode (a new link starts with one stream; its writer starts streams mode again once prioritised).
    pub(crate) fn stop_streams(&self) {
        let mut q = self.q.lock();
        q.streams = None;
        q.hold = false;
    }

    /// No rest of a frame begun by a direct write is queued (it must follow its start on the same connection): the
    /// urgent lanes may be held for, or moved to, another connection.
    pub(crate) fn may_split(&self) -> bool {
        let q = self.q.lock();
        q.lanes[LANES - 1].taken >= q.rest_end
    }

    /// Holds the urgent lanes for a connection of their own that is being made (a TCP link's urgent connection):
    /// until [`Outbox::start_streams`] or [`Outbox::release_hold`], the writer takes lane 0 only, no frame is written
    /// directly, and a source's frames are queued as in streams mode, so that the frames held can go to the new
    /// connection once it is up without any source's order changing. Frames already in the urgent lanes are held
    /// too, and lane 0 waits for them (`wait_for_urgent_lanes`). Not while [`Outbox::may_split`] is false.
    pub(crate) fn hold_urgent(&self) {
        let mut q = self.q.lock();
        debug_assert!(q.lanes[LANES - 1].taken >= q.rest_end, "the rest of a direct write is still queued");
        if q.streams.is_some() || q.hold {
            return;
        }
        q.wait_for_urgent_lanes();
        q.split_taken = std::array::from_fn(|i| q.lanes[i].taken);
        q.hold = true;
    }

    /// Ends a hold without streams mode (the connection did not come, or not in time): the writer takes every lane
    /// again, highest first; the placeholders queued meanwhile keep each source's order and write nothing.
    pub(crate) fn release_hold(&self) {
        let mut q = self.q.lock();
        if !q.hold {
            return;
        }
        q.hold = false;
        drop(q);
        self.readable.notify_one();
    }

    /// Streams mode is on.
    pub(crate) fn has_streams(&self) -> bool {
        self.q.lock().streams.is_some()
    }

    /// Streams mode: nothing is queued in the urgent lanes and their writer is not writing (a graceful shutdown
    /// waits for that before it ends the main stream); then the `Wait` frame for everything the urgent stream was
    /// given, which the main stream ends with, so that the receiver reads the urgent stream to its end first.
    pub(crate) fn urgent_done(&self) -> Option<Bytes> {
        let q = self.q.lock();
        let s = q.streams.as_ref()?;
        if s.writing_urgent || q.lanes[1..].iter().any(|l| !l.is_empty()) {
            return None;
        }
        Some(wait_frame(s.given[1]))
    }

    /// Writes `first` and `frame` to the socket from the submitting thread if the link and the source are quiet (see
    /// `push_event_with`); returns how many bytes went out.
    fn try_direct(&self, q: &mut OutQ, first: &[u8], frame: &[u8], gate: &mut SourceGate) -> usize {
        // In streams mode (a TCP link with an urgent connection) every frame goes through the writers, which count
        // each connection's bytes for the `Wait` frames; a direct write would also split a frame across connections.
        // Nor while the urgent lanes are held for such a connection.
        if !q.is_empty() || q.writing || q.split() {
            return 0;
        }
        let Some(to) = q.direct.as_ref().filter(|d| d.takes(q.prioritised)) else { return 0 };
        let now = gate.now();
        if !(q.quiet_at.is_none_or(|t| now >= t) && gate.idle(self.source_idle)) {
            return 0;
        }
        let written = to.write_now(first, frame);
        self.direct_bytes.fetch_add(written as u64, Ordering::Relaxed);
        q.quiet_at = now.checked_add(self.quiet);
        gate.wrote = true;
        written
    }

    fn direct_done(&self) {
        self.sent_direct.store(true, Ordering::Release);
        self.direct_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives the outbox the link's socket or stream for direct writes (`None`: no more direct writes). The writer is
    /// idle on a new link until it takes frames.
    pub(crate) fn set_direct(&self, to: Option<Direct>) {
        let mut q = self.q.lock();
        q.direct = to;
        q.writing = false;
    }

    /// Stops direct writes to `to` if it is still the outbox's (a newer link's is left alone).
    pub(crate) fn clear_direct(&self, to: &Direct) {
        let mut q = self.q.lock();
        if q.direct.as_ref().is_some_and(|d| d.same(to)) {
            q.direct = None;
        }
    }

    /// True once after events went out through direct writes.
    pub(crate) fn take_sent_direct(&self) -> bool {
        self.sent_direct.swap(false, Ordering::AcqRel)
    }

    /// Queues a control frame regardless of the limit, in the lowest lane (behind every event queued before it).
    pub(crate) fn push_control(&self, frame: Bytes) {
        self.push_control_in(0, frame);
    }

    /// Queues a control frame that no event needs to precede (a ping, a pong, a join message) regardless of the limit,
    /// in the highest lane: it overtakes every event of a lower priority queued before it, so that a link's
    /// heartbeats and a node's joins never wait behind a bulk transfer (with priorities in use, at most one take of
    /// [`TAKE_BUDGET`] bytes and the urgent events queued before it go first; without, the write in progress).
    pub(crate) fn push_link_control(&self, frame: Bytes) {
        self.push_control_in(LANES as u8 - 1, frame);
    }

    /// Queues a control frame regardless of the limit in lane `lane` (a lag notice goes where its source's events
    /// go, so that it keeps its place among them).
    pub(crate) fn push_control_in(&self, lane: u8, frame: Bytes) {
        let lane = usize::from(lane).min(LANES - 1);
        let mut q = self.q.lock();
        q.bytes += frame.len();
        self.queued.store(q.bytes, Ordering::Release);
        if lane == 0 && q.split() {
            // Streams mode: a control frame of lane 0 keeps its place behind every frame queued in the urgent lanes
            // before it (a `SourceEnd` behind its source's urgent events, a `Close` behind everything).
            let mut after = [0; LANES];
            for (a, l) in after.iter_mut().zip(&q.lanes).skip(1) {
                *a = l.pushed;
            }
            q.lanes[0].push_wait(after, false);
        }
        q.lanes[lane].push(frame, None);
        drop(q);
        self.readable.notify_one();
        if lane > 0 {
            self.readable_urgent.notify_one();
        }
    }

    /// Queues a control frame ahead of everything else (the handshake answer).
    pub(crate) fn push_front_control(&self, frame: Bytes) {
        let mut q = self.q.lock();
        q.bytes += frame.len();
        self.queued.store(q.bytes, Ordering::Release);
        let top = &mut q.lanes[LANES - 1];
        top.pushed += frame.len() as u64;
        top.frames.push_front(Queued { bytes: frame, expiry: None, glued: false, wait: None });
        drop(q);
        self.readable.notify_one();
        self.readable_urgent.notify_one();
    }

    /// Takes the queued frames, highest lane first (the caller is the writer: until it comes back for more, it is
    /// writing them). It takes at most [`TAKE_BUDGET`] bytes (at least one frame), so that what is queued in a higher
    /// lane meanwhile goes next. A frame past its deadline at `now` (read
    /// only if a queued frame has one) is replaced by its expiry notice.
    /// In streams mode it takes lane 0 only (the main stream's frames; see [`Outbox::start_streams`]).
    pub(crate) fn take_all(&self, into: &mut VecDeque<Bytes>) {
        self.take(into, crate::clock::now)
    }

    /// Gives back the room emptied lanes kept for a past burst (their queues grow to a burst's frames and would keep
    /// that room for good). For a quiet link: done on a busy one, each burst would grow them again.
    pub(crate) fn shrink_idle(&self) {
        for lane in &mut self.q.lock().lanes {
            if lane.frames.is_empty() {
                kecho_proto::gossip::shrink_idle(&mut lane.frames);
            }
        }
    }

    /// Streams mode: takes the frames of lanes 1 and up for the urgent stream, highest lane first, as `take_all` does.
    pub(crate) fn take_urgent(&self, into: &mut VecDeque<Bytes>) {
        self.take_stream(1, into, crate::clock::now)
    }

    /// `take_all` with the clock passed in.
    pub(crate) fn take(&self, into: &mut VecDeque<Bytes>, clock: impl FnOnce() -> Instant) {
        self.take_stream(0, into, clock)
    }

    /// Takes for stream `stream` (0: the main one, with every lane outside streams mode; 1: the urgent one).
    fn take_stream(&self, stream: usize, into: &mut VecDeque<Bytes>, clock: impl FnOnce() -> Instant) {
        let mut q = self.q.lock();
        let split = q.streams.is_some();
        if stream == 1 && !split {
            return;
        }
        // Holding the urgent lanes: the main writer takes lane 0 only, as in streams mode.
        let held = q.hold && !split;
        let (lo, hi) = match (split || held, stream) {
            (false, _) => (0, LANES),
            (true, 0) => (0, 1),
            (true, _) => (1, LANES),
        };
        let before = into.len();
        let now = if q.timely > 0 { Some(clock()) } else { None };
        // Every link takes at most TAKE_BUDGET a turn, a link that has carried no priority yet too: its first
        // prioritised event then waits behind at most that much of what the writer took before it (the whole outbox,
        // up to `link_queue_bytes`, before). A queue that fits is taken whole, without touching each frame.
        let budget = TAKE_BUDGET;
        let mut took = 0usize;
        let mut expired = 0u64;
        let mut timely_taken = 0usize;
        let whole = q.bytes <= budget && q.timely == 0 && !split && !held;
        let mut stalled = false;
        let OutQ { lanes, streams, .. } = &mut *q;
        let other: [u64; LANES] = std::array::from_fn(|i| lanes[i].taken);
        'lanes: for i in (lo..hi).rev() {
            let lane = &mut lanes[i];
            if lane.is_empty() {
                continue;
            }
            lane.seal();
            if whole && into.is_empty() {
                // The common case (one lane in use, no deadlines): the whole queue at once, without touching each
                // frame.
                let n: usize = lane.frames.iter().map(|f| f.bytes.len()).sum();
                took += n;
                lane.taken += n as u64;
                // Placeholders (see `wait_for_source`) write nothing on one stream.
                into.extend(lane.frames.drain(..).filter(|f| f.wait.is_none()).map(|f| f.bytes));
                continue;
            }
            let mut glued = false;
            while let Some(f) = lane.frames.pop_front() {
                if took >= budget && !into.is_empty() && !glued {
                    lane.frames.push_front(f);
                    break 'lanes;
                }
                glued = f.glued;
                if let Some(w) = &f.wait {
                    // A `Wait` placeholder: its condition is on the other stream's lanes, which this take does not
                    // touch (`other` is their state as of this lock).
                    if w.after.iter().zip(&other).any(|(a, t)| t < a) {
                        lane.frames.push_front(f);
                        stalled = true;
                        break 'lanes;
                    }
                    if let Some(s) = streams.as_deref() {
                        into.push_back(wait_frame(if w.sync_only { 0 } else { s.given[1 - stream] }));
                    }
                    continue;
                }
                let n = f.bytes.len();
                took += n;
                lane.taken += n as u64;
                match f.expiry {
                    None => into.push_back(f.bytes),
                    Some(e) => {
                        timely_taken += 1;
                        if now.is_some_and(|now| now >= e.deadline) {
                            expired += 1;
                            if !e.instead.is_empty() {
                                into.push_back(e.instead);
                            }
                        } else {
                            into.push_back(f.bytes);
                        }
                    }
                }
            }
        }
        q.timely -= timely_taken;
        q.bytes -= took.min(q.bytes);
        self.queued.store(q.bytes, Ordering::Release);
        let took_any = into.len() > before;
        let mut wake_other = false;
        if let Some(s) = q.streams.as_deref_mut() {
            s.given[stream] += into.iter().skip(before).map(|b| b.len() as u64).sum::<u64>();
            s.stalled[stream] = stalled;
            if took_any && s.stalled[1 - stream] {
                s.stalled[1 - stream] = false;
                wake_other = true;
            }
            if stream == 1 {
                s.writing_urgent = !into.is_empty();
            }
        }
        if stream == 0 {
            if into.is_empty() && q.writing {
                q.quiet_at = Instant::now().checked_add(self.quiet);
            }
            q.writing = !into.is_empty();
        }
        drop(q);
        if wake_other {
            if stream == 0 {
                self.readable_urgent.notify_one();
            } else {
                self.readable.notify_one();
            }
        }
        if expired > 0 {
            self.expired.fetch_add(expired, Ordering::Relaxed);
        }
    }

    /// Waits until an event of `len` bytes fits in lane `lane`.
    pub(crate) async fn wait_room(&self, len: usize, lane: u8) {
        loop {
            let room = self.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.has_room(len, lane) {
                return;
            }
            room.await;
        }
    }

    /// Discards everything queued; returns how many frames were dropped.
    pub(crate) fn clear(&self) -> usize {
        let mut q = self.q.lock();
        let mut n = 0;
        for lane in &mut q.lanes {
            lane.seal();
            n += lane.frames.len();
            lane.frames.clear();
            lane.taken = lane.pushed;
        }
        q.bytes = 0;
        q.timely = 0;
        self.queued.store(q.bytes, Ordering::Release);
        drop(q);
        self.writable.notify_waiters();
        n
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.q.lock().is_empty()
    }

    /// What is queued and not taken by the writer yet: frames, the events among them (an event run counts its
    /// events) and bytes. For the report of a shutdown that could not drain the link (cold: it reads every frame's
    /// header).
    pub(crate) fn unsent(&self) -> Unsent {
        let q = self.q.lock();
        let mut u = Unsent { bytes: q.bytes, ..Unsent::default() };
        for (i, lane) in q.lanes.iter().enumerate() {
            let mut entries = lane.frames.iter().filter(|f| f.wait.is_none()).map(|f| &f.bytes[..]).peekable();
            if i == LANES - 1 && q.rest_end > lane.taken {
                // The rest of an event frame begun by a direct write: no header of its own.
                if entries.next().is_some() {
                    u.frames += 1;
                    u.events += 1;
                }
            }
            for bytes in entries.chain(std::iter::once(lane.open.pending_bytes())) {
                u.count(bytes);
            }
        }
        u
    }
}

/// What an outbox still holds (see [`Outbox::unsent`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Unsent {
    pub(crate) frames: u64,
    pub(crate) events: u64,
    pub(crate) bytes: usize,
}

impl Unsent {
    /// Counts the whole frames (length prefix, kind, body) in `bytes`.
    fn count(&mut self, mut bytes: &[u8]) {
        use kecho_proto::codec::{decode_event_run_msg, is_event, is_event_run, TypeNames};
        while bytes.len() > LEN_PREFIX {
            let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            let Some(frame) = bytes.get(LEN_PREFIX..LEN_PREFIX + len) else { break };
            self.frames += 1;
            if is_event(frame) {
                self.events += 1;
            } else if is_event_run(frame) {
                let run = decode_event_run_msg(Bytes::copy_from_slice(frame), &mut TypeNames::default());
                self.events += run.map_or(1, |r| r.count as u64);
            }
            bytes = &bytes[LEN_PREFIX + len..];
        }
    }
}

const LEN_PREFIX: usize = kecho_proto::codec::LEN_PREFIX;

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(l: u8, held: &mut Held) -> Urgency<'_> {
        Urgency { lane: l, expiry: None, held, blocks: false }
    }

    /// Takes what the writer would (the clock at `now`), as one byte string.
    fn take_at(out: &Outbox, now: Instant) -> Vec<u8> {
        let mut frames = VecDeque::new();
        out.take(&mut frames, || now);
        frames.iter().flat_map(|f| f.iter().copied()).collect()
    }

    #[test]
    fn higher_lanes_overtake_lower_ones_but_a_source_never_overtakes_itself() {
        let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        let (mut a, mut b) = (Held::default(), Held::default());
        let t = Instant::now();
        assert!(out.push_event_copied(b"", b"a1", &mut gate, lane(0, &mut a)));
        assert!(out.push_event_with(b"", Bytes::from_static(b"a2"), &mut gate, lane(0, &mut a)));
        assert!(out.push_event_copied(b"", b"b1", &mut gate, lane(3, &mut b)));
        // A's urgent event must not overtake A's own queued ones: it joins them in lane 0.
        assert!(out.push_event_copied(b"", b"a3", &mut gate, lane(3, &mut a)));
        out.push_control(Bytes::from_static(b"c1"));
        assert!(out.push_event_copied(b"t", b"b2", &mut gate, lane(2, &mut b)));
        assert_eq!(take_at(&out, t), b"b1tb2a1a2a3c1");
        // Once A's frames are taken, its urgent events overtake again.
        assert!(out.push_event_copied(b"", b"b3", &mut gate, lane(0, &mut b)));
        assert!(out.push_event_copied(b"", b"a4", &mut gate, lane(3, &mut a)));
        assert!(out.push_event_copied(b"", b"b4", &mut gate, lane(1, &mut b)), "b3 is in a lower lane: b4 joins it");
        assert_eq!(take_at(&out, t), b"a4b3b4");
        assert!(out.is_empty());
        // Discarded frames (a broken link) count as gone.
        assert!(out.push_event_copied(b"", b"a5", &mut gate, lane(0, &mut a)));
        out.clear();
        assert!(out.push_event_copied(b"", b"a6", &mut gate, lane(2, &mut a)));
        assert!(out.push_event_copied(b"", b"b5", &mut gate, lane(1, &mut b)));
        assert_eq!(take_at(&out, t), b"a6b5");
    }

    /// Takes what the urgent stream's writer would, as one byte string.
    fn take_urgent_bytes(out: &Outbox) -> Vec<u8> {
        let mut frames = VecDeque::new();
        out.take_urgent(&mut frames);
        frames.iter().flat_map(|f| f.iter().copied()).collect()
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn in_streams_mode_each_stream_takes_its_lanes_and_a_source_crossing_streams_waits() {
        let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        let (mut a, mut b) = (Held::default(), Held::default());
        let t = Instant::now();
        assert!(take_urgent_bytes(&out).is_empty(), "no urgent stream before streams mode");
        assert_eq!(out.start_streams(), sync_frame());
        assert!(out.push_event_copied(b"", b"a1", &mut gate, lane(0, &mut a)));
        assert!(out.push_event_copied(b"", b"b1", &mut gate, lane(3, &mut b)));
        assert_eq!(take_at(&out, t), b"a1", "the main stream takes lane 0 only");
        assert_eq!(take_urgent_bytes(&out), b"b1");
        // A goes urgent once a1 was taken: a Wait for the 2 bytes the main stream was given comes first.
        assert!(out.push_event_copied(b"", b"a2", &mut gate, lane(3, &mut a)));
        assert_eq!(take_urgent_bytes(&out), cat(&[&wait_frame(2), b"a2"]));
        // Back to lane 0 while its urgent a3 is still queued: a4 follows a3 on the urgent stream.
        assert!(out.push_event_copied(b"", b"a3", &mut gate, lane(3, &mut a)));
        assert!(out.push_event_copied(b"", b"a4", &mut gate, lane(0, &mut a)));
        assert!(take_at(&out, t).is_empty());
        assert_eq!(take_urgent_bytes(&out), b"a3a4");
        // Then lane 0 again: a Wait for all 2 + 13 + 2 + 4 bytes of the urgent stream first.
        assert!(out.push_event_copied(b"", b"a5", &mut gate, lane(0, &mut a)));
        assert_eq!(take_at(&out, t), cat(&[&wait_frame(21), b"a5"]));
        // A control frame of lane 0 waits until the urgent frames queued before it are taken.
        assert!(out.push_event_copied(b"", b"b2", &mut gate, lane(2, &mut b)));
        out.push_control(Bytes::from_static(b"c1"));
        assert!(take_at(&out, t).is_empty(), "c1 waits for b2");
        assert_eq!(take_urgent_bytes(&out), b"b2");
        assert_eq!(take_at(&out, t), cat(&[&wait_frame(23), b"c1"]));
        assert_eq!(out.urgent_done(), None, "the urgent writer has not come back from writing b2");
        assert!(take_urgent_bytes(&out).is_empty());
        assert_eq!(out.urgent_done(), Some(wait_frame(23)));
        assert!(out.is_empty());
        // A new link starts with one stream.
        out.stop_streams();
        assert!(out.push_event_copied(b"", b"b3", &mut gate, lane(3, &mut b)));
        assert_eq!(take_at(&out, t), b"b3");
    }

    /// A TCP link's dialling end holds its urgent lanes while it makes the urgent connection: the writer takes
    /// nothing of them, and lane 0 waits for the urgent frames queued before the hold (a source's frame queued in
    /// lane 0 after its urgent one, with no placeholder while the link had one stream, must not overtake it). Then
    /// either the connection is up (streams mode: the urgent stream takes what was held, and the main one a `Wait`
    /// for it first) or the hold is released (the main stream takes everything, highest lane first, each source in
    /// its order).
    #[test]
    fn held_urgent_lanes_go_to_the_urgent_stream_or_back_to_the_main_one_in_each_sources_order() {
        for up in [true, false] {
            let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
            let mut gate = SourceGate::default();
            let (mut a, mut b, mut c) = (Held::default(), Held::default(), Held::default());
            let t = Instant::now();
            assert!(out.push_event_copied(b"", b"a1", &mut gate, lane(3, &mut a)));
            assert!(out.push_event_copied(b"", b"a2", &mut gate, lane(0, &mut a)));
            assert!(out.push_event_copied(b"", b"b1", &mut gate, lane(0, &mut b)));
            assert!(out.may_split());
            out.hold_urgent();
            assert!(take_at(&out, t).is_empty(), "a2 waits for a1, and b1 behind it ({up})");
            // Held: C's urgent c1 waits with a1; A's urgent a3 joins a2 in lane 0 (a source never overtakes itself).
            assert!(out.push_event_copied(b"", b"c1", &mut gate, lane(3, &mut c)));
            assert!(out.push_event_copied(b"", b"a3", &mut gate, lane(3, &mut a)));
            assert!(out.push_event_copied(b"", b"b2", &mut gate, lane(0, &mut b)));
            assert!(take_at(&out, t).is_empty());
            assert!(take_urgent_bytes(&out).is_empty(), "no urgent stream while held ({up})");
            if up {
                assert_eq!(out.start_streams(), sync_frame());
                assert!(take_at(&out, t).is_empty(), "the main stream waits for the urgent one");
                assert_eq!(take_urgent_bytes(&out), b"a1c1");
                assert_eq!(take_at(&out, t), cat(&[&wait_frame(4), b"a2b1a3b2"]));
            } else {
                out.release_hold();
                let first = take_at(&out, t);
                assert_eq!(cat(&[&first, &take_at(&out, t)]), b"a1c1a2b1a3b2");
                // One stream again: an urgent frame overtakes lane 0 as before.
                assert!(out.push_event_copied(b"", b"b3", &mut gate, lane(0, &mut b)));
                assert!(out.push_event_copied(b"", b"c2", &mut gate, lane(3, &mut c)));
                assert_eq!(take_at(&out, t), b"c2b3");
            }
            assert!(out.is_empty());
        }
    }

    /// A source's frames taken before the urgent stream starts went on the main stream, whatever their lane: its
    /// next urgent frame is preceded by a `Wait` for 0 bytes (the receiver, which reads the urgent stream at once,
    /// holds it until the main stream's `Sync` is read); one of a source that sent nothing before, or only on the
    /// urgent stream since, goes without.
    #[test]
    fn an_urgent_frame_after_the_switch_waits_for_its_sources_frames_from_before() {
        let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        let (mut a, mut b, mut c) = (Held::default(), Held::default(), Held::default());
        let t = Instant::now();
        assert!(out.push_event_copied(b"", b"a1", &mut gate, lane(3, &mut a)));
        assert!(out.push_event_copied(b"", b"b1", &mut gate, lane(0, &mut b)));
        assert_eq!(take_at(&out, t), b"a1b1", "one stream: both on the main one");
        assert_eq!(out.start_streams(), sync_frame());
        assert!(out.push_event_copied(b"", b"a2", &mut gate, lane(3, &mut a)));
        assert!(out.push_event_copied(b"", b"b2", &mut gate, lane(3, &mut b)));
        assert!(out.push_event_copied(b"", b"c1", &mut gate, lane(3, &mut c)));
        assert_eq!(take_urgent_bytes(&out), cat(&[&wait_frame(0), b"a2", &wait_frame(0), b"b2c1"]));
        // From then on A's urgent frames follow each other on the urgent stream.
        assert!(out.push_event_copied(b"", b"a3", &mut gate, lane(3, &mut a)));
        assert_eq!(take_urgent_bytes(&out), b"a3");
        assert!(take_at(&out, t).is_empty());
    }

    /// An urgent frame queued while the link had one stream, behind nothing of its source's in the outbox (the
    /// writer took those already, for the main stream), goes to the urgent stream when the split starts (streams mode,
    /// or a hold for an urgent connection that then comes up): a `Wait` for the main stream's `Sync` goes first, or the
    /// receiver would deliver it ahead of its source's frames still on their way on the main stream (seen as events
    /// reported missed over QUIC, whose main stream is slower than a second connection's handshake). The urgent frame
    /// of a source that sent nothing before goes without (the first urgent event passes a stalled backlog), and on a
    /// link whose urgent lanes never move, nothing is marked and the placeholder writes nothing.
    #[test]
    fn an_urgent_frame_queued_before_the_switch_waits_for_its_sources_frames_taken_before() {
        for (hold, movable) in [(false, true), (true, true), (false, false)] {
            let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
            out.set_movable(movable);
            let mut gate = SourceGate::default();
            let (mut a, mut b) = (Held::default(), Held::default());
            let t = Instant::now();
            assert!(out.push_event_copied(b"", b"a1", &mut gate, lane(0, &mut a)));
            assert_eq!(take_at(&out, t), b"a1", "taken for the main stream");
            assert!(out.push_event_copied(b"", b"a2", &mut gate, lane(3, &mut a)));
            assert!(out.push_event_copied(b"", b"b1", &mut gate, lane(3, &mut b)));
            assert!(out.push_event_with(b"", Bytes::from_static(b"a3"), &mut gate, lane(3, &mut a)));
            if !movable {
                assert_eq!(take_at(&out, t), b"a2b1a3", "one stream: the placeholders write nothing");
                continue;
            }
            if hold {
                out.hold_urgent();
                assert!(take_at(&out, t).is_empty(), "held");
            }
            assert_eq!(out.start_streams(), sync_frame());
            assert_eq!(take_urgent_bytes(&out), cat(&[&wait_frame(0), b"a2b1a3"]), "hold {hold}");
            // Queued after the switch, with nothing of its source's before: no wait.
            assert!(out.push_event_copied(b"", b"b2", &mut gate, lane(2, &mut b)));
            assert_eq!(take_urgent_bytes(&out), b"b2");
            // The main stream's placeholder for the urgent frames queued before the switch.
            assert_eq!(take_at(&out, t), wait_frame(13 + 6 + 2));
            assert!(out.is_empty());
        }
    }

    #[test]
    fn a_take_is_bounded_before_and_after_priorities_and_keeps_prefixes_with_their_events() {
        let out = Outbox::with_quiet(1 << 30, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        let (mut bulk, mut urgent) = (Held::default(), Held::default());
        let t = Instant::now();
        let big = Bytes::from(vec![b'x'; 1000]);
        for _ in 0..300 {
            assert!(out.push_event_with(b"<p>", big.clone(), &mut gate, lane(0, &mut bulk)));
        }
        // Before any priority was used the takes are bounded too: the first prioritised event waits behind at most one
        // of them (it used to be the whole outbox). A queue that fits is taken whole.
        let mut total = 0;
        loop {
            let more = take_at(&out, t);
            if more.is_empty() {
                break;
            }
            assert!(more.len() <= TAKE_BUDGET + 1003, "a take is bounded ({} bytes)", more.len());
            assert_eq!(more.len() % 1003, 0, "no prefix is taken without its event");
            total += more.len();
        }
        assert_eq!(total, 300 * 1003);
        for _ in 0..30 {
            assert!(out.push_event_with(b"<p>", big.clone(), &mut gate, lane(0, &mut bulk)));
        }
        assert_eq!(take_at(&out, t).len(), 30 * 1003);
        for _ in 0..300 {
            assert!(out.push_event_with(b"<p>", big.clone(), &mut gate, lane(0, &mut bulk)));
        }
        assert!(out.push_event_copied(b"", b"URGENT", &mut gate, lane(3, &mut urgent)));
        let first = take_at(&out, t);
        assert!(first.starts_with(b"URGENT"), "the urgent frame goes first");
        assert!(first.len() <= TAKE_BUDGET + 1003 + 6, "a take is bounded ({} bytes)", first.len());
        assert_eq!((first.len() - 6) % 1003, 0, "no prefix is taken without its event");
        assert!(out.push_event_copied(b"", b"URGENT", &mut gate, lane(3, &mut urgent)));
        let second = take_at(&out, t);
        assert!(second.starts_with(b"URGENT<p>x"), "the next urgent frame goes before the rest of the bulk");
        let mut rest = 0;
        loop {
            let more = take_at(&out, t);
            if more.is_empty() {
                break;
            }
            assert_eq!(more.len() % 1003, 0);
            rest += more.len();
        }
        assert_eq!(first.len() + second.len() + rest, 300 * 1003 + 12);
    }

    #[test]
    fn link_control_frames_overtake_event_backlogs_and_ordered_control_frames_do_not() {
        let t = Instant::now();
        let big = Bytes::from(vec![b'x'; 1000]);
        for prioritised in [false, true] {
            let out = Outbox::with_quiet(1 << 30, Duration::from_secs(60));
            let mut gate = SourceGate::default();
            let (mut bulk, mut urgent) = (Held::default(), Held::default());
            if prioritised {
                assert!(out.push_event_copied(b"", b"U0", &mut gate, lane(3, &mut urgent)));
            }
            for _ in 0..300 {
                assert!(out.push_event_with(b"", big.clone(), &mut gate, lane(0, &mut bulk)));
            }
            out.push_control(Bytes::from_static(b"END"));
            out.push_link_control(Bytes::from_static(b"PING"));
            let first = take_at(&out, t);
            let expect: &[u8] = if prioritised { b"U0PING" } else { b"PING" };
            assert!(first.starts_with(expect), "a ping goes before the bulk backlog ({prioritised})");
            let mut all = first;
            loop {
                let more = take_at(&out, t);
                if more.is_empty() {
                    break;
                }
                all.extend_from_slice(&more);
            }
            assert!(all.ends_with(b"xEND"), "an ordered control frame stays behind the events before it");
            assert_eq!(all.len(), expect.len() + 300 * 1000 + 3);
        }
    }

    #[test]
    fn a_frame_past_its_deadline_is_replaced_by_its_notice() {
        let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        let mut held = Held::default();
        let t = Instant::now();
        let expiry = |ms| Some(Expiry { deadline: t + Duration::from_millis(ms), instead: Bytes::from_static(b"X") });
        // Without frames that have a deadline, the writer does not read the clock at all.
        assert!(out.push_event_copied(b"", b"e0", &mut gate, lane(0, &mut held)));
        let mut frames = VecDeque::new();
        out.take(&mut frames, || panic!("the clock was read"));
        assert_eq!(frames.len(), 1);
        frames.clear();
        out.take(&mut frames, || t);
        assert!(out.push_event_copied(
            b"p",
            b"e1",
            &mut gate,
            Urgency { lane: 1, expiry: expiry(10), held: &mut held, blocks: false }
        ));
        assert!(out.push_event_copied(
            b"p",
            b"e2",
            &mut gate,
            Urgency { lane: 1, expiry: expiry(30), held: &mut held, blocks: false }
        ));
        assert!(out.push_event_copied(b"", b"e3", &mut gate, lane(1, &mut held)));
        // At 20 ms the first has expired (its prefix with it), the second has not.
        assert_eq!(take_at(&out, t + Duration::from_millis(20)), b"Xpe2e3");
        assert_eq!(out.expired.load(Ordering::Relaxed), 1);
        assert!(out.push_event_copied(
            b"p",
            b"e4",
            &mut gate,
            Urgency { lane: 0, expiry: expiry(30), held: &mut held, blocks: false }
        ));
        assert_eq!(take_at(&out, t + Duration::from_millis(30)), b"X", "due at the deadline itself");
        assert_eq!(out.expired.load(Ordering::Relaxed), 2);
        assert_eq!(out.queued_bytes(), 0);
    }

    #[test]
    fn copied_frames_keep_their_place_among_shared_and_control_frames() {
        let out = Outbox::with_quiet(1 << 20, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        assert!(out.push_event_copied(b"", b"e1", &mut gate, Urgency::plain(&mut Held::default())));
        assert!(out.push_event_copied(b"", b"e2", &mut gate, Urgency::plain(&mut Held::default())));
        out.push_control(Bytes::from_static(b"c1"));
        assert!(out.push_event_copied(b"t3", b"e3", &mut gate, Urgency::plain(&mut Held::default())));
        assert!(out.push_event_with(b"t4", Bytes::from_static(b"e4"), &mut gate, Urgency::plain(&mut Held::default())));
        assert!(out.push_event_copied(b"", b"e5", &mut gate, Urgency::plain(&mut Held::default())));
        out.push_front_control(Bytes::from_static(b"h0"));
        assert!(!out.has_room(1 << 20, 0), "queued bytes count against the limit");
        let mut frames = VecDeque::new();
        out.take_all(&mut frames);
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(bytes, b"h0e1e2c1t3e3t4e4e5");
        assert!(out.has_room(1 << 20, 0));
        assert!(out.is_empty());
    }

    #[test]
    fn a_full_outbox_refuses_copied_frames() {
        let out = Outbox::with_quiet(8, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        assert!(out.push_event_copied(b"", b"123456", &mut gate, Urgency::plain(&mut Held::default())));
        assert!(!out.push_event_copied(b"", b"789", &mut gate, Urgency::plain(&mut Held::default())));
        let mut frames = VecDeque::new();
        out.take_all(&mut frames);
        assert!(
            out.push_event_copied(b"", b"789", &mut gate, Urgency::plain(&mut Held::default())),
            "room again once the writer took the frames"
        );
        // An event for a Block sink is never refused: its source waited for room, and what took some of that room
        // meanwhile must not make it lose the event.
        assert!(!out.push_event_copied(b"", b"abcdef", &mut gate, Urgency::plain(&mut Held::default())));
        let mut held = Held::default();
        let blocking = Urgency { blocks: true, ..Urgency::plain(&mut held) };
        assert!(out.push_event_copied(b"", b"abcdef", &mut gate, blocking));
        frames.clear();
        out.take_all(&mut frames);
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(bytes, b"789abcdef");
    }

    #[test]
    fn a_run_of_frames_keeps_its_order_and_what_does_not_fit_is_refused_at_its_tail() {
        let out = Outbox::with_quiet(20, Duration::from_secs(60));
        let mut gate = SourceGate::default();
        let mut held = Held::default();
        let mut frames = VecDeque::new();
        let mut taken = || {
            frames.clear();
            out.take_all(&mut frames);
            frames.iter().flat_map(|f| f.iter().copied()).collect::<Vec<u8>>()
        };
        // Room for the prefix and the first three frames (2 + 18 bytes) of six.
        let run = Bytes::from_static(b"aaaaaabbbbbbccccccdddddd");
        let ends = [6, 12, 18, 24];
        assert_eq!(out.push_events(b"pp", &run, &ends, &mut gate, Urgency::plain(&mut held)), 3);
        assert_eq!(out.events(), 3);
        // A single frame after the run comes behind it; nothing fits now.
        assert_eq!(out.push_events(b"", &Bytes::from_static(b"ee"), &[2], &mut gate, Urgency::plain(&mut held)), 0);
        assert_eq!(taken(), b"ppaaaaaabbbbbbcccccc");
        // On an empty outbox the first frame goes whatever its size, as a single frame would.
        let large = Bytes::from_static(b"0123456789012345678901234");
        assert_eq!(out.push_events(b"", &large, &[25], &mut gate, lane(0, &mut held)), 1);
        assert!(!out.push_event_copied(b"", b"x", &mut gate, lane(0, &mut held)), "full behind the large frame");
        assert_eq!(taken(), b"0123456789012345678901234");
        // A run for a Block sink is taken whole (its source waited for room), between the frames around it.
        assert!(out.push_event_copied(b"", b"1", &mut gate, lane(0, &mut held)));
        let blocking = Urgency { blocks: true, ..Urgency::plain(&mut held) };
        assert_eq!(out.push_events(b"r", &run, &ends, &mut gate, blocking), 4);
        out.push_control(Bytes::from_static(b"c"));
        assert!(!out.push_event_copied(b"", b"2", &mut gate, lane(0, &mut held)), "full");
        assert_eq!(taken(), b"1raaaaaabbbbbbccccccddddddc");
        assert_eq!(out.push_events(b"", &Bytes::new(), &[], &mut gate, lane(0, &mut held)), 0, "an empty run");
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
