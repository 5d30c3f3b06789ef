//! A sink's bounded event queue (with its overflow policy and lag markers), the events it holds, and the chunked
//! memory that frames are cut from.
//!
//! The queue wakes async waiters through `tokio::sync::Notify` and blocking waiters through a condition variable, so that a
//! receiver sleeps until something arrives: there is no polling interval anywhere.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kecho_proto::{Attrs, Overflow};
use parking_lot::{Condvar, Mutex};
use tokio::sync::Notify;

/// An event as a sink receives it. Cloning is cheap (two or three reference counts, no allocation).
///
/// Its parts are shared rather than the whole: the type name with every event of that type that arrived on the same
/// link, the payload with the frame it arrived in, the attributes (when there are any) with the event's copies in
/// other sinks. So an arriving event without attributes costs no allocation of its own.
#[derive(Clone)]
pub struct Event {
    pub(crate) ty: Arc<str>,
    /// The attributes and the deadline; `None` when there are neither (the common case: no allocation, and an
    /// `Event` no bigger than it was before deadlines existed, which every sink queue moves).
    pub(crate) extra: Option<Arc<Extra>>,
    pub(crate) payload: Bytes,
    pub(crate) seq: u64,
    pub(crate) source: SourceKey,
}

/// What an event carries besides its type, payload and numbering, when it carries any of it.
pub(crate) struct Extra {
    attrs: Attrs,
    /// When it must be received by, in microseconds since the Unix epoch; a receive after that reports it as
    /// [`RecvError::Expired`] instead.
    deadline: Option<std::num::NonZeroU64>,
}

/// What [`Event::attrs`] returns for an event without attributes.
static NO_ATTRS: Attrs = Attrs(Vec::new());

/// An opaque name for the source an event came from: the same for every event of one source, different for different
/// sources (with overwhelming probability), and saying nothing about the source's node or address. Together with
/// [`Event::seq`] it lets a sink check per-source order and spot gaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(pub u64);

impl SourceKey {
    /// The key of source `local` on node `node`: a bijective mix, so distinct sources never share a key on one node.
    pub(crate) fn new(node: kecho_proto::NodeId, local: kecho_proto::LocalId) -> Self {
        let mut x = node.0 ^ u64::from(local.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // splitmix64's finaliser.
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        SourceKey(x ^ (x >> 31))
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Event {
    /// An event as a sink queue holds it. `deadline`: microseconds since the Unix epoch (0 or `None`: none).
    #[inline]
    pub(crate) fn new(
        ty: Arc<str>,
        attrs: Attrs,
        payload: Bytes,
        seq: u64,
        source: SourceKey,
        deadline: Option<u64>,
    ) -> Event {
        let deadline = deadline.and_then(std::num::NonZeroU64::new);
        let extra =
            if attrs.is_empty() && deadline.is_none() { None } else { Some(Arc::new(Extra { attrs, deadline })) };
        Event { ty, extra, payload, seq, source }
    }

    /// The deadline in microseconds since the Unix epoch, if it has one.
    #[inline]
    fn deadline_us(&self) -> Option<u64> {
        self.extra.as_ref().and_then(|x| x.deadline).map(std::num::NonZeroU64::get)
    }

    /// The event's type name.
    pub fn ty(&self) -> &str {
        &self.ty
    }
    /// Its attribute list.
    pub fn attrs(&self) -> &Attrs {
        self.extra.as_ref().map_or(&NO_ATTRS, |x| &x.attrs)
    }
    /// Its payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// Its per-source sequence number (1 for a source's first event). A sink sees gaps where the source's OUT-filter
    /// or content filters sent events elsewhere; events that were meant for it and lost are reported as
    /// [`RecvError::Lagged`] instead.
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// The source it came from, as an opaque key.
    pub fn source(&self) -> SourceKey {
        self.source
    }
    /// The time it had to be received by, if its source gave it a deadline.
    pub fn deadline(&self) -> Option<std::time::SystemTime> {
        self.deadline_us().map(|us| std::time::UNIX_EPOCH + Duration::from_micros(us))
    }
    /// Decodes a payload sent by a [`crate::TypedSource`].
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| crate::Error::Payload(crate::error::PayloadError::new(e)))
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("ty", &self.ty)
            .field("seq", &self.seq)
            .field("source", &self.source)
            .field("attrs", self.attrs())
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The events of an `EventRun` frame as a sink queue holds them, built one at a time (straight into a queue by
/// [`SinkQueue::offer_many`]). The run's events share one type name, one attribute list and one payload buffer of
/// their own: what the receiving link's reader adds to their reference counts per event stays in its core's cache,
/// and the sink's thread drops them later with the run's other events, instead of both threads counting on a link's
/// type name and read buffer at the same time.
#[derive(Clone)]
pub(crate) struct RunEvents {
    ty: Arc<str>,
    extra: Option<Arc<Extra>>,
    /// `len u32 | payload` per event, checked when the frame was decoded.
    body: Bytes,
    at: usize,
    left: usize,
    seq: u64,
    source: SourceKey,
}

impl RunEvents {
    /// The events of `run` from its source `source`, skipping its first `skip` (which arrived before).
    pub(crate) fn new(run: kecho_proto::codec::EventRunMsg, skip: usize, source: SourceKey) -> RunEvents {
        let ty: Arc<str> = Arc::from(&*run.ty);
        let extra = (!run.attrs.is_empty()).then(|| Arc::new(Extra { attrs: run.attrs, deadline: None }));
        let mut evs =
            RunEvents { ty, extra, body: Bytes::from_owner(run.body), at: 0, left: run.count, seq: run.first, source };
        for _ in 0..skip.min(run.count) {
            evs.next_payload();
        }
        evs
    }

    /// The next event's place in `body` and its sequence number.
    #[inline]
    fn next_payload(&mut self) -> Option<(std::ops::Range<usize>, u64)> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let b = self.body.get(self.at..self.at + 4)?;
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let start = self.at + 4;
        self.at = start + len;
        let seq = self.seq;
        // Wrapping: a run's last number may be `u64::MAX` (the decoder allows it), and nothing follows it.
        self.seq = seq.wrapping_add(1);
        Some((start..self.at, seq))
    }
}

impl Iterator for RunEvents {
    type Item = Event;

    #[inline]
    fn next(&mut self) -> Option<Event> {
        let (r, seq) = self.next_payload()?;
        Some(Event {
            ty: self.ty.clone(),
            extra: self.extra.clone(),
            payload: self.body.slice(r),
            seq,
            source: self.source,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// Why a receive returned no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The sink missed this many events here (its queue overflowed, or a link to it did). The next receive continues
    /// with the events that followed.
    #[error("missed {0} events")]
    Lagged(u64),
    /// A source this sink received events from is gone (its node was lost and did not come back, or it ended without
    /// saying how far it got), and how many of its events this sink missed is unknown. Where the number is known it
    /// comes as [`RecvError::Lagged`] instead.
    #[error("source {0} is gone; an unknown number of its events may have been missed")]
    SourceLost(SourceKey),
    /// This many events meant for the sink passed their deadline before it could receive them (at the source's
    /// node, on the way, or waiting in this queue): they were not delivered. The next receive continues with the
    /// events that followed.
    #[error("{0} events expired")]
    Expired(u64),
    /// The sink or its channel is closed and the queue is empty.
    #[error("sink closed")]
    Closed,
}

/// Why a non-blocking receive returned no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TryRecvError {
    /// Nothing queued.
    #[error("no event queued")]
    Empty,
    /// See [`RecvError::Lagged`].
    #[error("missed {0} events")]
    Lagged(u64),
    /// See [`RecvError::SourceLost`].
    #[error("source {0} is gone; an unknown number of its events may have been missed")]
    SourceLost(SourceKey),
    /// See [`RecvError::Expired`].
    #[error("{0} events expired")]
    Expired(u64),
    /// See [`RecvError::Closed`].
    #[error("sink closed")]
    Closed,
}

enum Item {
    Event(Event),
    /// Events of one run not yet received, built one by one as the receiver takes them: a run queued whole costs the
    /// reader one item, not one `Event` written here and moved again by the receiver. Never empty; runs carry no
    /// deadlines. Boxed so that the common `Event` item stays as small as it was.
    Run(Box<RunEvents>),
    Lagged(u64),
    /// A source is gone with an unknown number of events missed.
    Lost(SourceKey),
    /// Events that passed their deadline before they got here.
    Expired(u64),
}

struct SinkQ {
    items: VecDeque<Item>,
    /// Events (not lag markers) in `items`.
    events: usize,
    /// An event with a deadline was ever queued here: only then does a receive look at deadlines.
    timely: bool,
    closed: bool,
    /// An offer found the queue full (Block policy) and its offerer waits on `writable`: the receiver must notify
    /// when it makes room. Without it the receiver would notify on every event it takes.
    blocked: bool,
}

/// The events a sink's receiver has taken from the shared queue and not yet returned: a receiver takes everything
/// queued under one lock (except under DropOldest, which must be able to discard the oldest event until it is
/// received), so that a busy sink locks the queue once per batch, not once per event.
#[derive(Default)]
pub(crate) struct Taken {
    items: VecDeque<Item>,
    /// Events (not lag markers) in `items`.
    events: usize,
    /// Some of `items` may have a deadline (see `SinkQ::timely`).
    timely: bool,
}

impl Taken {
    /// The next item; events past their deadline at `now_us` (microseconds since the Unix epoch, read only when an
    /// event has a deadline) are returned as one `Expired` for each run of them, and counted in `expired`.
    #[inline]
    fn pop(&mut self, now_us: impl Fn() -> u64, expired: &AtomicU64) -> Option<Result<Event, TryRecvError>> {
        if self.timely {
            if let Some(late) = self.pop_late(now_us, expired) {
                return Some(Err(late));
            }
        }
        while let Some(Item::Run(r)) = self.items.front_mut() {
            let e = r.next();
            // (A run's body was checked when its frame was decoded, so `next` yields `left` events.)
            if r.left == 0 || e.is_none() {
                self.items.pop_front();
            }
            if let Some(e) = e {
                self.events -= 1;
                return Some(Ok(e));
            }
        }
        Some(match self.items.pop_front()? {
            Item::Event(e) => {
                self.events -= 1;
                Ok(e)
            }
            Item::Run(_) => unreachable!("runs at the front were handled above"),
            Item::Lagged(n) => Err(TryRecvError::Lagged(n)),
            Item::Lost(k) => Err(TryRecvError::SourceLost(k)),
            Item::Expired(n) => Err(TryRecvError::Expired(n)),
        })
    }

    /// Moves up to `max` events from the front into `out`, stopping at a notice or at an event past its deadline
    /// (`now_us` is read once, and only if an event may have a deadline); returns how many it moved.
    fn pop_events(&mut self, out: &mut Vec<Event>, max: usize, now_us: impl Fn() -> u64) -> usize {
        let now = self.timely.then(now_us);
        if now.is_none() {
            // No deadlines to look at: the events before the first notice move in one go, and runs are built
            // straight into `out`.
            let mut n = 0;
            loop {
                let k = self.items.iter().take(max - n).take_while(|i| matches!(i, Item::Event(_))).count();
                out.extend(self.items.drain(..k).filter_map(|i| match i {
                    Item::Event(e) => Some(e),
                    _ => None,
                }));
                n += k;
                if n == max || !self.pop_run(out, max - n, &mut n) {
                    break;
                }
            }
            self.events -= n;
            return n;
        }
        let mut n = 0;
        while n < max {
            match self.items.front() {
                Some(Item::Event(e)) if now.is_none_or(|t| e.deadline_us().is_none_or(|d| t <= d)) => {}
                Some(Item::Run(_)) => {
                    // Runs carry no deadlines.
                    let _ = self.pop_run(out, max - n, &mut n);
                    continue;
                }
                _ => break,
            }
            if let Some(Item::Event(e)) = self.items.pop_front() {
                out.push(e);
                n += 1;
            }
        }
        self.events -= n;
        n
    }

    /// Builds up to `max` events of the run at the front (if the front is a run) into `out`, adding them to `n`;
    /// false if the front is not a run. (`events` is the caller's to update.)
    #[inline]
    fn pop_run(&mut self, out: &mut Vec<Event>, max: usize, n: &mut usize) -> bool {
        let Some(Item::Run(r)) = self.items.front_mut() else {
            return false;
        };
        let (k, before) = (r.left.min(max), out.len());
        out.extend((&mut **r).take(k));
        let got = out.len() - before;
        *n += got;
        if r.left == 0 || got < k {
            self.items.pop_front();
        }
        true
    }

    /// Removes the run of events past their deadline at the front, if there is one, and reports it (only for sinks
    /// that were ever sent an event with a deadline: the default path does not look).
    #[cold]
    fn pop_late(&mut self, now_us: impl Fn() -> u64, expired: &AtomicU64) -> Option<TryRecvError> {
        let mut late = 0;
        let mut now = None;
        loop {
            let is_late = match self.items.front() {
                Some(Item::Event(e)) => e.deadline_us().is_some_and(|d| *now.get_or_insert_with(&now_us) > d),
                _ => false,
            };
            if !is_late {
                break;
            }
            self.items.pop_front();
            self.events -= 1;
            late += 1;
        }
        if late == 0 {
            return None;
        }
        expired.fetch_add(late, Ordering::Relaxed);
        Some(TryRecvError::Expired(late))
    }
}

/// Now, in microseconds since the Unix epoch (the clock deadlines are in).
pub(crate) fn unix_now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// How a sink's receivers are woken: async ones through `readable`, blocking ones through `cv`.
pub(crate) struct Wake {
    cv: Condvar,
    readable: Notify,
}

impl Wake {
    fn now(&self) {
        self.readable.notify_one();
        self.cv.notify_one();
    }
}

tokio::task_local! {
    /// Set while a link's reader handles the frames of one read: the sinks that got events then are woken once, when
    /// the reader has handled every frame it read, instead of once per event. Waking a sleeping receiver can cost a
    /// system call (a futex to unpark its thread); in a burst this turns one per event into one per read.
    pub(crate) static WAKE_LATER: std::cell::RefCell<Vec<Arc<Wake>>>;
}

/// Wakes the receivers whose wake-up was deferred by the current task (a link reader), if any.
pub(crate) fn flush_deferred_wakes() {
    let _ = WAKE_LATER.try_with(|later| {
        let mut pending = std::mem::take(&mut *later.borrow_mut());
        for w in pending.drain(..) {
            w.now();
        }
        // Give the list back, so that its memory serves the next read too.
        let mut slot = later.borrow_mut();
        if slot.is_empty() {
            *slot = pending;
        }
    });
}

/// The queue behind one sink.
pub(crate) struct SinkQueue {
    cap: usize,
    overflow: Overflow,
    q: Mutex<SinkQ>,
    /// Wakes receivers; shared so that a wake can be deferred to the end of a link's read (see `WAKE_LATER`).
    wake: Arc<Wake>,
    writable: Notify,
    pub(crate) received: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Events found past their deadline at a receive, reported to this sink as expired.
    pub(crate) expired: AtomicU64,
}

/// What happened to an offered event.
pub(crate) enum Offer {
    Queued,
    /// Queued, and this many older events were discarded (DropOldest) or the event itself was (DropNewest).
    Dropped,
    /// The queue is full and the policy is Block: wait for room and offer again.
    Full(Event),
    Closed,
}

impl SinkQueue {
    pub(crate) fn new(cap: usize, overflow: Overflow) -> Self {
        SinkQueue {
            cap: cap.max(1),
            overflow,
            // Sized on demand: an idle sink holds little, a busy one grows its queue once.
            q: Mutex::new(SinkQ {
                items: VecDeque::with_capacity(cap.clamp(1, 32)),
                events: 0,
                timely: false,
                closed: false,
                blocked: false,
            }),
            wake: Arc::new(Wake { cv: Condvar::new(), readable: Notify::new() }),
            writable: Notify::new(),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    pub(crate) fn overflow(&self) -> Overflow {
        self.overflow
    }

    /// Offers an event according to the overflow policy; never waits.
    pub(crate) fn offer(&self, ev: Event) -> Offer {
        let mut q = self.q.lock();
        let outcome = self.offer_locked(&mut q, ev);
        drop(q);
        self.after_offer(&outcome, 1);
        outcome
    }

    /// Queues a run whole, as one item whose events the receiver builds as it takes them, if it fits the queue (every
    /// policy queues events that fit); otherwise gives it back for `offer_many`, which decides event by event.
    pub(crate) fn offer_run(&self, evs: RunEvents) -> Result<(), RunEvents> {
        let n = evs.left;
        if n == 0 {
            return Ok(());
        }
        let mut q = self.q.lock();
        if q.closed || n > self.cap.saturating_sub(q.events) {
            return Err(evs);
        }
        q.items.push_back(Item::Run(Box::new(evs)));
        q.events += n;
        drop(q);
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        self.wake_readers();
        Ok(())
    }

    /// Offers events in order under one lock. Stops at the first that does not fit a full Block queue and returns
    /// it (the caller waits for room, then offers it and the rest again), or at a closed queue. Returns how many
    /// were queued (whole or in place of discarded ones) and what stopped it.
    pub(crate) fn offer_many(&self, mut evs: impl Iterator<Item = Event>) -> (u64, u64, Option<Offer>) {
        let mut q = self.q.lock();
        let (mut queued, mut dropped) = (0, 0);
        let mut stop = None;
        // As many as surely fit go in without a decision each (every policy queues an event that fits).
        let fit = evs.size_hint().0.min(self.cap.saturating_sub(q.events));
        if fit > 0 && !q.closed {
            let (mut timely, before) = (false, q.items.len());
            q.items.extend(evs.by_ref().take(fit).inspect(|e| timely |= e.deadline_us().is_some()).map(Item::Event));
            let n = q.items.len() - before;
            q.timely |= timely;
            q.events += n;
            queued += n as u64;
        }
        for ev in evs {
            match self.offer_locked(&mut q, ev) {
                Offer::Queued => queued += 1,
                Offer::Dropped => {
                    queued += u64::from(self.overflow == Overflow::DropOldest);
                    dropped += 1;
                }
                other => {
                    stop = Some(other);
                    break;
                }
            }
        }
        drop(q);
        self.received.fetch_add(queued, Ordering::Relaxed);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        if queued + dropped > 0 || matches!(stop, Some(Offer::Full(_))) {
            self.wake_readers();
        }
        (queued, dropped, stop)
    }

    /// The policy's decision for one event, under the queue's lock; counters and wake-ups are the caller's.
    fn offer_locked(&self, q: &mut SinkQ, ev: Event) -> Offer {
        if q.closed {
            return Offer::Closed;
        }
        let mut outcome = Offer::Queued;
        if q.events >= self.cap {
            match self.overflow {
                Overflow::Block => {
                    q.blocked = true;
                    return Offer::Full(ev);
                }
                Overflow::DropNewest => {
                    push_lag(&mut q.items, 1);
                    return Offer::Dropped;
                }
                Overflow::DropOldest => {
                    // Discard the oldest event; a lag marker takes its place (merged with one already there).
                    let mut lag = 1;
                    let mut lost = Vec::new();
                    while let Some(front) = q.items.pop_front() {
                        match front {
                            Item::Lagged(n) => lag += n,
                            marker @ (Item::Lost(_) | Item::Expired(_)) => lost.push(marker),
                            Item::Event(_) | Item::Run(_) => {
                                if let Item::Run(mut r) = front {
                                    // Its first event is the oldest: discard that one only.
                                    r.next_payload();
                                    if r.left > 0 {
                                        q.items.push_front(Item::Run(r));
                                    }
                                }
                                q.events -= 1;
                                if let Some(Item::Lagged(n)) = q.items.front() {
                                    lag += n;
                                    q.items.pop_front();
                                }
                                break;
                            }
                        }
                    }
                    q.items.push_front(Item::Lagged(lag));
                    for marker in lost.into_iter().rev() {
                        q.items.push_front(marker);
                    }
                    outcome = Offer::Dropped;
                }
            }
        }
        q.timely |= ev.extra.as_ref().is_some_and(|x| x.deadline.is_some());
        q.items.push_back(Item::Event(ev));
        q.events += 1;
        outcome
    }

    /// Counters and wake-ups after `offer_locked` decided on `n` events.
    fn after_offer(&self, outcome: &Offer, n: u64) {
        match outcome {
            Offer::Queued => {
                self.received.fetch_add(n, Ordering::Relaxed);
            }
            Offer::Dropped => {
                if self.overflow == Overflow::DropOldest {
                    self.received.fetch_add(n, Ordering::Relaxed);
                }
                self.dropped.fetch_add(n, Ordering::Relaxed);
            }
            Offer::Full(_) | Offer::Closed => return,
        }
        self.wake_readers();
    }

    /// Offers an event, waiting for room if the policy is Block and the queue is full.
    pub(crate) async fn offer_wait(&self, ev: Event) -> Offer {
        // Fast path: room now, so no need to register for a wake-up.
        let mut ev = match self.offer(ev) {
            Offer::Full(back) => back,
            other => return other,
        };
        loop {
            let room = self.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.offer(ev) {
                Offer::Full(back) => ev = back,
                other => return other,
            }
            // The receivers must run to make room: wake whoever waits for events now.
            flush_deferred_wakes();
            room.await;
        }
    }

    /// Records that `n` events meant for this sink were lost before reaching it.
    pub(crate) fn add_lag(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut q = self.q.lock();
        push_lag(&mut q.items, n);
        drop(q);
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.wake_readers();
    }

    /// Records that `n` events meant for this sink passed their deadline before they got here (the caller counts
    /// them; `expired` counts only those found late in this queue).
    pub(crate) fn add_expired(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut q = self.q.lock();
        match q.items.back_mut() {
            Some(Item::Expired(m)) => *m += n,
            _ => q.items.push_back(Item::Expired(n)),
        }
        drop(q);
        self.wake_readers();
    }

    /// The next item the receiver took, with expired events reported as such.
    #[inline]
    fn pop(&self, taken: &mut Taken) -> Option<Result<Event, TryRecvError>> {
        taken.pop(unix_now_us, &self.expired)
    }

    /// Records that source `key` is gone with an unknown number of events meant for this sink missed.
    pub(crate) fn add_lost(&self, key: SourceKey) {
        self.q.lock().items.push_back(Item::Lost(key));
        self.wake_readers();
    }

    pub(crate) fn close(&self) {
        self.q.lock().closed = true;
        self.wake.now();
        self.writable.notify_waiters();
    }

    /// Events queued, counting those a receiver took and has not returned yet.
    pub(crate) fn len(&self, taken: &Taken) -> usize {
        self.q.lock().events + taken.events
    }

    pub(crate) fn is_full(&self) -> bool {
        self.q.lock().events >= self.cap
    }

    fn wake_readers(&self) {
        let deferred = WAKE_LATER.try_with(|later| {
            let mut later = later.borrow_mut();
            if !later.iter().any(|w| Arc::ptr_eq(w, &self.wake)) {
                later.push(self.wake.clone());
            }
        });
        if deferred.is_err() {
            self.wake.now();
        }
    }

    /// The next event: from what the receiver took before, else from the queue (taking everything queued).
    pub(crate) fn try_recv(&self, taken: &mut Taken) -> Result<Event, TryRecvError> {
        if let Some(r) = self.pop(taken) {
            return r;
        }
        let mut q = self.q.lock();
        if q.items.is_empty() {
            return Err(if q.closed { TryRecvError::Closed } else { TryRecvError::Empty });
        }
        self.take(&mut q, taken);
        drop(q);
        self.pop(taken).expect("took a non-empty queue")
    }

    /// Moves queued items to the receiver's side (all of them, or the oldest under DropOldest) and lets a blocked
    /// offerer know there is room.
    fn take(&self, q: &mut parking_lot::MutexGuard<'_, SinkQ>, taken: &mut Taken) {
        if self.overflow == Overflow::DropOldest {
            let item = match q.items.front_mut() {
                // One event of a run: the rest stays where an offer can still discard it.
                Some(Item::Run(r)) if r.left > 1 => r.next().map(Item::Event),
                _ => q.items.pop_front(),
            };
            if let Some(item) = item {
                if matches!(item, Item::Event(_) | Item::Run(_)) {
                    q.events -= 1;
                    taken.events += 1;
                }
                taken.items.push_back(item);
            }
            taken.timely = q.timely;
        } else {
            // The receiver's buffer is empty here: swapping hands its allocation to the queue. Cleared first, so
            // that the queue fills it from its start again rather than from where the receiver's last pop left off:
            // a busy sink then cycles through the first slots of its buffer (warm in the cache) instead of through
            // the whole capacity (a cache miss per event once it outgrows the cache).
            debug_assert!(taken.items.is_empty());
            taken.items.clear();
            std::mem::swap(&mut q.items, &mut taken.items);
            taken.events = std::mem::take(&mut q.events);
            taken.timely = q.timely;
        }
        if std::mem::take(&mut q.blocked) {
            self.writable.notify_waiters();
        }
    }

    pub(crate) async fn recv(&self, taken: &mut Taken) -> Result<Event, RecvError> {
        // Fast path: something is queued, no need to register for a wake-up.
        match self.try_recv(taken) {
            Ok(e) => return Ok(e),
            Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
            Err(TryRecvError::SourceLost(k)) => return Err(RecvError::SourceLost(k)),
            Err(TryRecvError::Expired(n)) => return Err(RecvError::Expired(n)),
            Err(TryRecvError::Closed) => return Err(RecvError::Closed),
            Err(TryRecvError::Empty) => {}
        }
        loop {
            let arrived = self.wake.readable.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            match self.try_recv(taken) {
                Ok(e) => return Ok(e),
                Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(TryRecvError::SourceLost(k)) => return Err(RecvError::SourceLost(k)),
                Err(TryRecvError::Expired(n)) => return Err(RecvError::Expired(n)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => arrived.await,
            }
        }
    }

    /// Moves up to `max` events into `out`, in order: those the receiver took before, then the queue's (taking
    /// everything queued under one lock). Stops before a notice (lag, a lost source, expired events) once it has
    /// events, so that the notice comes with the next call in its place; returns it if it comes first.
    pub(crate) fn try_recv_many(
        &self,
        taken: &mut Taken,
        out: &mut Vec<Event>,
        max: usize,
    ) -> Result<usize, TryRecvError> {
        let mut n = 0;
        while n < max {
            if taken.items.is_empty() {
                let mut q = self.q.lock();
                if q.items.is_empty() {
                    if n > 0 {
                        break;
                    }
                    return Err(if q.closed { TryRecvError::Closed } else { TryRecvError::Empty });
                }
                self.take(&mut q, taken);
            }
            n += taken.pop_events(out, max - n, unix_now_us);
            if n == 0 {
                // A notice (or a run of expired events) is first. (An event if the wall clock went back meanwhile.)
                match self.pop(taken) {
                    Some(Ok(e)) => {
                        out.push(e);
                        n = 1;
                        continue;
                    }
                    Some(Err(notice)) => return Err(notice),
                    None => continue,
                }
            }
            if !taken.items.is_empty() {
                // Stopped at a notice, or at `max`.
                break;
            }
        }
        Ok(n)
    }

    /// `try_recv_many`, waiting until there is an event or a notice.
    pub(crate) async fn recv_many(
        &self,
        taken: &mut Taken,
        out: &mut Vec<Event>,
        max: usize,
    ) -> Result<usize, RecvError> {
        let now = |r: Result<usize, TryRecvError>| match r {
            Ok(n) => Some(Ok(n)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
            Err(TryRecvError::SourceLost(k)) => Some(Err(RecvError::SourceLost(k))),
            Err(TryRecvError::Expired(n)) => Some(Err(RecvError::Expired(n))),
            Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
        };
        if max == 0 {
            return Ok(0);
        }
        // Fast path: something is queued, no need to register for a wake-up.
        if let Some(r) = now(self.try_recv_many(taken, out, max)) {
            return r;
        }
        loop {
            let arrived = self.wake.readable.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            match now(self.try_recv_many(taken, out, max)) {
                Some(r) => return r,
                None => arrived.await,
            }
        }
    }

    pub(crate) fn recv_blocking(&self, taken: &mut Taken, timeout: Option<Duration>) -> Result<Event, TryRecvError> {
        if let Some(r) = self.pop(taken) {
            return r;
        }
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut q = self.q.lock();
        loop {
            if !q.items.is_empty() {
                self.take(&mut q, taken);
                drop(q);
                return self.pop(taken).expect("took a non-empty queue");
            }
            if q.closed {
                return Err(TryRecvError::Closed);
            }
            match deadline {
                Some(d) => {
                    if self.wake.cv.wait_until(&mut q, d).timed_out() && q.items.is_empty() {
                        return Err(TryRecvError::Empty);
                    }
                }
                None => self.wake.cv.wait(&mut q),
            }
        }
    }
}

fn push_lag(items: &mut VecDeque<Item>, n: u64) {
    if let Some(Item::Lagged(m)) = items.back_mut() {
        *m += n;
    } else {
        items.push_back(Item::Lagged(n));
    }
}

/// How much memory of earlier chunks a [`ChunkBuf`] keeps to use again: twice the default bound of a link's queue
/// (`NodeBuilder::link_queue_bytes`), since a busy link's queue pins that much of a source's frames until the writer
/// has sent them, and the chunks holding them are larger: a frame that does not fit the rest of a chunk starts the
/// next one, so chunks are filled to between about half and all of their size (two 27 KiB batches of 256 small
/// events to a 64 KiB chunk, in `examples/local`, which pinned about 9.4 MiB of chunks for the 8 MiB queue). With less
/// kept, a source that its link holds back finds the kept chunks still pinned and allocates a fresh one for most of
/// its frames, and the allocator hands back memory that the kernel must fault in page by page (a fifth to a third of
/// such a source's CPU in `examples/local`, before). A source that was never held back keeps little: chunks are kept
/// only once they were needed, and given back once a backlog has drained.
const SPARE_BYTES: usize = 16 << 20;

/// How many of the oldest kept chunks [`ChunkBuf::next_chunk`] tries before it allocates: links send frames in the
/// order they were queued, so the oldest chunks are the first to be free again, and trying every kept chunk (a
/// couple of hundred while a link holds a source back) cost more per event than the encoding of the event itself.
const SPARES_TRIED: usize = 4;

/// Memory that frames are cut from (and share until they are written): chunks of a given size. A chunk whose frames
/// are all gone is used again rather than freed, so that a busy sender neither allocates nor touches fresh pages per
/// chunk (freed chunks of this size tend to go back to the system and come back as page faults); nothing is
/// allocated before the first use, and at most [`SPARE_BYTES`] of earlier chunks are kept.
#[derive(Default)]
pub(crate) struct ChunkBuf {
    cur: BytesMut,
    /// Chunks used before `cur`, oldest first (the first to be free again), kept to be reclaimed once their last
    /// frame is dropped.
    spares: VecDeque<BytesMut>,
    /// Chunks allocated so far (tests check that a steady stream allocates none).
    #[cfg(test)]
    allocated: usize,
}

impl ChunkBuf {
    /// Room left in the current chunk.
    pub(crate) fn left(&self) -> usize {
        self.cur.capacity() - self.cur.len()
    }

    /// The buffer to write into, with room for at least `need` more bytes (in a chunk of `chunk` bytes or more). If
    /// the current chunk lacks room, what was written to it must have been cut off (`split`) first.
    #[inline]
    pub(crate) fn room(&mut self, need: usize, chunk: usize) -> &mut BytesMut {
        if self.left() < need {
            self.next_chunk(need.max(chunk));
        }
        &mut self.cur
    }

    /// Makes a chunk with room for `want` bytes current: the current one if all its frames are gone, else the oldest
    /// kept one that is free, else a new one.
    #[cold]
    fn next_chunk(&mut self, want: usize) {
        debug_assert!(self.cur.is_empty(), "bytes not cut off would be left behind");
        if self.cur.try_reclaim(want) {
            // Every frame cut from the current chunk is gone, so whatever backlog the kept chunks served has drained:
            // give their memory back rather than keep a burst's high-water mark for the life of the source or link.
            self.spares.clear();
            return;
        }
        let next = match self.spares.iter_mut().take(SPARES_TRIED).position(|s| s.try_reclaim(want)) {
            Some(i) => self.spares.remove(i).unwrap_or_default(),
            None => {
                #[cfg(test)]
                {
                    self.allocated += 1;
                }
                BytesMut::with_capacity(want)
            }
        };
        let old = std::mem::replace(&mut self.cur, next);
        if old.capacity() > 0 {
            if (self.spares.len() + 1) * want > SPARE_BYTES {
                self.spares.pop_front();
            }
            self.spares.push_back(old);
        }
    }

    /// The bytes written since the last `split`.
    pub(crate) fn pending(&self) -> usize {
        self.cur.len()
    }

    /// The bytes written since the last `split`, to read.
    pub(crate) fn pending_bytes(&self) -> &[u8] {
        &self.cur
    }

    /// Cuts off the bytes written since the last `split`.
    pub(crate) fn split(&mut self) -> Bytes {
        self.cur.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> Event {
        let source = SourceKey(1);
        Event::new("t".into(), Attrs::new(), Bytes::new(), seq, source, None)
    }

    fn drain(q: &SinkQueue) -> Vec<String> {
        drain_with(q, &mut Taken::default())
    }

    fn drain_with(q: &SinkQueue, taken: &mut Taken) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match q.try_recv(taken) {
                Ok(e) => out.push(e.seq().to_string()),
                Err(TryRecvError::Lagged(n)) => out.push(format!("lag{n}")),
                Err(_) => return out,
            }
        }
    }

    /// Receives with `try_recv_many` (at most `max` at a time) until the queue is empty: each call's events as one
    /// group of numbers, notices as such.
    fn drain_many(q: &SinkQueue, taken: &mut Taken, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut evs = Vec::new();
        loop {
            match q.try_recv_many(taken, &mut evs, max) {
                Ok(n) => {
                    assert!(n > 0 && n <= max && n == evs.len(), "{n} events of at most {max}");
                    out.push(evs.drain(..).map(|e| e.seq().to_string()).collect::<Vec<_>>().join(","));
                }
                Err(TryRecvError::Lagged(n)) => out.push(format!("lag{n}")),
                Err(TryRecvError::Expired(n)) => out.push(format!("expired{n}")),
                Err(_) => return out,
            }
        }
    }

    #[test]
    fn a_batched_receive_keeps_order_and_never_takes_events_across_a_notice() {
        for overflow in [Overflow::Block, Overflow::DropNewest, Overflow::DropOldest] {
            let q = SinkQueue::new(100, overflow);
            let mut taken = Taken::default();
            for i in 1..=5 {
                q.offer(ev(i));
            }
            q.add_lag(2);
            for i in 8..=9 {
                q.offer(ev(i));
            }
            assert_eq!(drain_many(&q, &mut taken, 3), ["1,2,3", "4,5", "lag2", "8,9"], "{overflow:?}");
            assert!(matches!(q.try_recv_many(&mut taken, &mut Vec::new(), 3), Err(TryRecvError::Empty)));
            // Mixed with single receives: nothing is taken twice or skipped.
            for i in 10..=13 {
                q.offer(ev(i));
            }
            assert_eq!(q.try_recv(&mut taken).map(|e| e.seq()).ok(), Some(10));
            assert_eq!(drain_many(&q, &mut taken, 100), ["11,12,13"], "{overflow:?}");
            q.close();
            assert!(matches!(q.try_recv_many(&mut taken, &mut Vec::new(), 3), Err(TryRecvError::Closed)));
        }
    }

    #[test]
    fn a_batched_receive_reports_expired_events_in_their_place() {
        let q = SinkQueue::new(100, Overflow::Block);
        let mut taken = Taken::default();
        let timed =
            |seq, deadline| Event::new("t".into(), Attrs::new(), Bytes::new(), seq, SourceKey(1), Some(deadline));
        let far = unix_now_us() + 3_600_000_000;
        q.offer(ev(1));
        q.offer(timed(2, 1));
        q.offer(timed(3, 1));
        q.offer(timed(4, far));
        assert_eq!(drain_many(&q, &mut taken, 10), ["1", "expired2", "4"]);
        assert_eq!(q.expired.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_batched_receive_waits_for_events_and_frees_a_blocked_offerer() {
        let q = Arc::new(SinkQueue::new(2, Overflow::Block));
        let q2 = q.clone();
        let offerer = tokio::spawn(async move {
            for i in 1..=5 {
                assert!(matches!(q2.offer_wait(ev(i)).await, Offer::Queued));
            }
        });
        let (mut taken, mut evs) = (Taken::default(), Vec::new());
        while evs.len() < 5 {
            let n = q.recv_many(&mut taken, &mut evs, 10).await.expect("events");
            assert!((1..=2).contains(&n), "at most the capacity is queued at a time: {n}");
        }
        offerer.await.expect("offerer");
        assert_eq!(evs.iter().map(Event::seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(q.recv_many(&mut taken, &mut evs, 0).await.ok(), Some(0));
    }

    #[test]
    fn events_past_their_deadline_are_reported_as_expired_at_the_receive() {
        // Block: the receiver takes the whole queue at once, so a run of late events is one report.
        let q = SinkQueue::new(16, Overflow::Block);
        let timely = |seq, d| Event::new("t".into(), Attrs::new(), Bytes::new(), seq, SourceKey(1), Some(d));
        for e in [timely(1, 100), timely(2, 120), ev(3), timely(4, 200), timely(5, 90)] {
            q.offer(e);
        }
        q.add_expired(2);
        q.add_expired(1);
        q.offer(ev(6));
        let mut taken = Taken::default();
        let mut out = Vec::new();
        // The receiver reads the clock at 150 us: events 1 and 2 are late (one report for the run), 4 is not, and 5
        // is late again.
        loop {
            let take = |t: &mut Taken| {
                if t.items.is_empty() {
                    let mut g = q.q.lock();
                    q.take(&mut g, t);
                }
            };
            take(&mut taken);
            match taken.pop(|| 150, &q.expired) {
                Some(Ok(e)) => out.push(e.seq().to_string()),
                Some(Err(TryRecvError::Expired(n))) => out.push(format!("expired{n}")),
                Some(Err(other)) => out.push(format!("{other:?}")),
                None => break,
            }
        }
        assert_eq!(out, ["expired2", "3", "4", "expired1", "expired3", "6"]);
        assert_eq!(q.expired.load(Ordering::Relaxed), 3, "only those found late here count in the queue");
    }

    #[test]
    fn drop_oldest_reports_lag_in_place() {
        let q = SinkQueue::new(2, Overflow::DropOldest);
        for i in 1..=5 {
            q.offer(ev(i));
        }
        assert_eq!(drain(&q), ["lag3", "4", "5"]);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn drop_newest_keeps_oldest() {
        let q = SinkQueue::new(2, Overflow::DropNewest);
        for i in 1..=5 {
            q.offer(ev(i));
        }
        assert_eq!(drain(&q), ["1", "2", "lag3"]);
    }

    #[test]
    fn block_refuses_when_full() {
        let q = SinkQueue::new(1, Overflow::Block);
        assert!(matches!(q.offer(ev(1)), Offer::Queued));
        assert!(matches!(q.offer(ev(2)), Offer::Full(_)));
        assert_eq!(drain(&q), ["1"]);
    }

    #[test]
    fn a_receiver_takes_the_queue_in_one_go_and_order_holds() {
        let q = SinkQueue::new(4, Overflow::Block);
        let mut taken = Taken::default();
        for i in 1..=4 {
            assert!(matches!(q.offer(ev(i)), Offer::Queued));
        }
        assert!(matches!(q.offer(ev(5)), Offer::Full(_)), "the queue is full before anything is received");
        assert_eq!(q.try_recv(&mut taken).map(|e| e.seq()), Ok(1));
        // The rest went to the receiver's side with it: the queue has room for a whole capacity again, and `len`
        // still counts what the receiver holds.
        assert_eq!(q.len(&taken), 3);
        let (queued, dropped, stop) = q.offer_many((5..=9).map(ev));
        assert_eq!((queued, dropped), (4, 0));
        assert!(matches!(stop, Some(Offer::Full(e)) if e.seq() == 9), "the fifth of a full Block queue comes back");
        assert_eq!(q.len(&taken), 7);
        let mut got = Vec::new();
        while let Ok(e) = q.try_recv(&mut taken) {
            got.push(e.seq());
        }
        assert_eq!(got, [2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(q.received.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn drop_oldest_still_drops_the_oldest_not_yet_received() {
        // Under DropOldest a receiver takes one event at a time, so that the policy can still discard the oldest.
        let q = SinkQueue::new(2, Overflow::DropOldest);
        let mut taken = Taken::default();
        q.offer(ev(1));
        q.offer(ev(2));
        assert_eq!(q.try_recv(&mut taken).map(|e| e.seq()), Ok(1));
        q.offer(ev(3));
        q.offer(ev(4));
        assert_eq!(drain(&q), ["lag1", "3", "4"]);
    }

    #[test]
    fn offer_many_under_drop_policies_counts_what_it_dropped() {
        let q = SinkQueue::new(2, Overflow::DropNewest);
        let (queued, dropped, stop) = q.offer_many((1..=5).map(ev));
        assert_eq!((queued, dropped), (2, 3));
        assert!(stop.is_none());
        assert_eq!(drain(&q), ["1", "2", "lag3"]);
        let q = SinkQueue::new(2, Overflow::DropOldest);
        let (queued, dropped, _) = q.offer_many((1..=5).map(ev));
        assert_eq!((queued, dropped), (5, 3));
        assert_eq!(drain(&q), ["lag3", "4", "5"]);
        q.close();
        assert!(matches!(q.offer_many((6..=7).map(ev)).2, Some(Offer::Closed)));
    }

    // Paused time: the sleep below ends only once every task is idle, so the offer has run up to its wait by then.
    #[tokio::test(start_paused = true)]
    async fn a_blocked_offer_resumes_when_the_receiver_takes() {
        let q = Arc::new(SinkQueue::new(2, Overflow::Block));
        q.offer(ev(1));
        q.offer(ev(2));
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { matches!(q.offer_wait(ev(3)).await, Offer::Queued) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a full Block queue holds the offer back");
        let mut taken = Taken::default();
        assert_eq!(q.try_recv(&mut taken).map(|e| e.seq()), Ok(1));
        let queued = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("offer woken").unwrap();
        assert!(queued);
        assert_eq!(drain_with(&q, &mut taken), ["2", "3"]);
    }

    /// A run whose last event has the largest sequence number there is (which the decoder accepts: the numbers do not
    /// pass `u64::MAX`) yields its events with their numbers and no overflow, whole or after a skipped prefix, into a
    /// queue as one at a time.
    #[test]
    fn a_run_ending_at_the_last_sequence_number_is_built_whole() {
        use kecho_proto::codec::{decode_event_run_msg, encode_event_run, split_frame, TypeNames};
        let payloads: [&[u8]; 3] = [b"a", b"bb", b"ccc"];
        let first = u64::MAX - 2;
        let mut buf = BytesMut::new();
        let (channel, local) = (kecho_proto::ChannelId(1), kecho_proto::LocalId(1));
        encode_event_run(&mut buf, channel, local, first, "t", &Attrs::new(), payloads.into_iter());
        let frame = split_frame(&mut buf, 1 << 20).expect("a frame").expect("whole");
        let run = decode_event_run_msg(frame, &mut TypeNames::default()).expect("a valid run");
        for skip in 0..3 {
            let evs: Vec<(u64, Bytes)> =
                RunEvents::new(run.clone(), skip, SourceKey(1)).map(|e| (e.seq, e.payload)).collect();
            let want: Vec<(u64, Bytes)> =
                (skip..3).map(|i| (first + i as u64, Bytes::copy_from_slice(payloads[i]))).collect();
            assert_eq!(evs, want, "skipping {skip}");
            let q = SinkQueue::new(2, Overflow::DropNewest);
            let (queued, dropped, stop) = q.offer_many(RunEvents::new(run.clone(), skip, SourceKey(1)));
            assert_eq!((queued, dropped, stop.is_none()), ((3 - skip).min(2) as u64, (1 - skip.min(1)) as u64, true));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// The events a sink's queue builds from a run (`RunEvents`, which walks the run's body itself) are those the
        /// codec's own split yields, from any skipped prefix on: numbers, payloads, type and attributes.
        #[test]
        fn a_run_builds_the_events_the_codec_splits_it_into(
            payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 1..40),
            first in proptest::prop_oneof![1u64..1_000, (u64::MAX - 100)..u64::MAX],
            tagged in proptest::prelude::any::<bool>(),
            skip in 0usize..45,
        ) {
            use kecho_proto::codec::{decode_event_run_msg, encode_event_run, split_frame, TypeNames};
            let first = first.min(u64::MAX - (payloads.len() as u64 - 1));
            let attrs = if tagged { Attrs::new().with("k", 7i64) } else { Attrs::new() };
            let mut buf = BytesMut::new();
            let (channel, local) = (kecho_proto::ChannelId(1), kecho_proto::LocalId(1));
            encode_event_run(&mut buf, channel, local, first, "ty", &attrs, payloads.iter().map(|p| &p[..]));
            let frame = split_frame(&mut buf, 1 << 20).expect("a frame").expect("whole");
            let run = decode_event_run_msg(frame, &mut TypeNames::default()).expect("a valid run");
            let want: Vec<_> = run.clone().events().skip(skip).map(|e| (e.seq, e.payload, e.ty, e.attrs)).collect();
            let evs = RunEvents::new(run, skip, SourceKey(1));
            proptest::prop_assert_eq!(evs.size_hint(), (want.len(), Some(want.len())));
            let got: Vec<_> = evs.map(|e| (e.seq, e.payload.clone(), Arc::from(&*e.ty), e.attrs().clone())).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    /// A run of `count` events numbered from `first`, each payload its number's bytes.
    fn run_of(first: u64, count: usize) -> RunEvents {
        use kecho_proto::codec::{decode_event_run_msg, encode_event_run, split_frame, TypeNames};
        let payloads: Vec<[u8; 8]> = (0..count as u64).map(|i| (first + i).to_le_bytes()).collect();
        let mut buf = BytesMut::new();
        let (channel, local) = (kecho_proto::ChannelId(1), kecho_proto::LocalId(1));
        encode_event_run(&mut buf, channel, local, first, "t", &Attrs::new(), payloads.iter().map(|p| &p[..]));
        let frame = split_frame(&mut buf, 1 << 20).expect("a frame").expect("whole");
        let run = decode_event_run_msg(frame, &mut TypeNames::default()).expect("a valid run");
        RunEvents::new(run, 0, SourceKey(1))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Offer,
        Run(usize),
        Lag(u64),
        Recv,
        RecvMany(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            2 => Just(Op::Offer),
            3 => (1usize..12).prop_map(Op::Run),
            1 => (1u64..4).prop_map(Op::Lag),
            2 => Just(Op::Recv),
            2 => (1usize..10).prop_map(Op::RecvMany),
        ]
    }

    /// What a receive returned: events as their numbers (checked against their payloads), notices as such.
    fn received(r: Result<Vec<Event>, TryRecvError>) -> String {
        match r {
            Ok(evs) => evs
                .iter()
                .map(|e| {
                    if e.payload.len() == 8 {
                        assert_eq!(e.payload[..], e.seq().to_le_bytes(), "payload of {}", e.seq());
                    }
                    e.seq().to_string()
                })
                .collect::<Vec<_>>()
                .join(","),
            Err(e) => format!("{e:?}"),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// A run queued whole (one item, its events built as the receiver takes them) behaves exactly as its events
        /// offered one by one: the same events and notices in the same order to `try_recv` and `try_recv_many`, the
        /// same counters and lengths, under every overflow policy and whether or not it fits.
        #[test]
        fn a_run_queued_whole_is_received_as_its_events_offered_one_by_one(
            ops in proptest::collection::vec(op(), 1..60),
            cap in 1usize..20,
            policy in 0u8..3,
        ) {
            let overflow = [Overflow::Block, Overflow::DropOldest, Overflow::DropNewest][policy as usize];
            let (runs, events) = (SinkQueue::new(cap, overflow), SinkQueue::new(cap, overflow));
            let (mut taken_r, mut taken_e) = (Taken::default(), Taken::default());
            let mut next = 1u64;
            for op in ops {
                match op {
                    Op::Offer => {
                        let a = !matches!(runs.offer(ev(next)), Offer::Full(_));
                        let b = !matches!(events.offer(ev(next)), Offer::Full(_));
                        proptest::prop_assert_eq!(a, b);
                        next += 1;
                    }
                    Op::Run(k) => {
                        // As the reader does: whole if it fits, else event by event (a Block queue keeps what fits).
                        if let Err(mut rest) = runs.offer_run(run_of(next, k)) {
                            runs.offer_many(&mut rest);
                        }
                        let mut each = run_of(next, k);
                        events.offer_many(&mut each);
                        next += k as u64;
                    }
                    Op::Lag(n) => {
                        runs.add_lag(n);
                        events.add_lag(n);
                    }
                    Op::Recv => {
                        let a = received(runs.try_recv(&mut taken_r).map(|e| vec![e]));
                        let b = received(events.try_recv(&mut taken_e).map(|e| vec![e]));
                        proptest::prop_assert_eq!(a, b);
                    }
                    Op::RecvMany(max) => {
                        let (mut a, mut b) = (Vec::new(), Vec::new());
                        let ra = runs.try_recv_many(&mut taken_r, &mut a, max).map(|_| a);
                        let rb = events.try_recv_many(&mut taken_e, &mut b, max).map(|_| b);
                        proptest::prop_assert_eq!(received(ra), received(rb));
                    }
                }
                proptest::prop_assert_eq!(runs.len(&taken_r), events.len(&taken_e));
                proptest::prop_assert_eq!(runs.is_full(), events.is_full());
                proptest::prop_assert_eq!(runs.received.load(Ordering::Relaxed), events.received.load(Ordering::Relaxed));
                proptest::prop_assert_eq!(runs.dropped.load(Ordering::Relaxed), events.dropped.load(Ordering::Relaxed));
            }
            // And what is left comes out the same.
            let (mut a, mut b) = (Vec::new(), Vec::new());
            loop {
                let (ra, rb) = (runs.try_recv(&mut taken_r), events.try_recv(&mut taken_e));
                let done = matches!(ra, Err(TryRecvError::Empty));
                a.push(received(ra.map(|e| vec![e])));
                b.push(received(rb.map(|e| vec![e])));
                if done {
                    break;
                }
            }
            proptest::prop_assert_eq!(a, b);
        }
    }

    /// A run queued whole is one item: the receiver builds its events, and `try_recv_many` splits it at `max`.
    #[test]
    fn a_run_that_fits_is_queued_as_one_item_and_split_by_the_receiver() {
        let q = SinkQueue::new(100, Overflow::DropNewest);
        assert!(q.offer_run(run_of(1, 10)).is_ok());
        assert_eq!(q.q.lock().items.len(), 1, "one item for ten events");
        assert_eq!(q.len(&Taken::default()), 10);
        let mut taken = Taken::default();
        assert_eq!(drain_many(&q, &mut taken, 4), ["1,2,3,4", "5,6,7,8", "9,10"]);
        // One that does not fit is given back whole.
        let q = SinkQueue::new(5, Overflow::Block);
        let back = q.offer_run(run_of(1, 6)).expect_err("does not fit");
        assert_eq!(back.size_hint().0, 6);
        assert_eq!(q.len(&Taken::default()), 0);
    }

    /// A sender whose frames stay queued for many chunks (a link's queue holding about 6.5 MB of them) uses its
    /// chunks again once their frames are sent, rather than allocating one after the other.
    #[test]
    fn chunks_pinned_by_a_long_queue_are_used_again() {
        let mut c = ChunkBuf::default();
        let mut queued = VecDeque::new();
        let (mut bases, mut fresh_later) = (std::collections::HashSet::new(), 0);
        for i in 0..30_000 {
            let switch = c.left() < 1_000;
            let b = c.room(1_000, 64 * 1024);
            if switch && bases.insert(b.as_ptr() as usize) && i > 10_000 {
                fresh_later += 1;
            }
            b.extend_from_slice(&[i as u8; 1_000]);
            queued.push_back(c.split());
            // The writer sends the oldest frame once 6,500 wait.
            if queued.len() > 6_500 {
                queued.pop_front();
            }
        }
        assert_eq!(fresh_later, 0, "chunks allocated in the steady state (of {} in all)", bases.len());
        assert!(bases.len() < 110, "{} chunks for about 100 in flight", bases.len());
        assert!(!c.spares.is_empty(), "a held-back sender keeps its chunks");
        // The backlog drains, and the sender goes on with a writer that keeps up: the kept chunks are given back.
        queued.clear();
        for i in 0..200 {
            let b = c.room(1_000, 64 * 1024);
            b.extend_from_slice(&[i as u8; 1_000]);
            drop(c.split());
        }
        assert!(c.spares.is_empty(), "{} chunks kept after the backlog drained", c.spares.len());
    }

    /// Batches of small events as `Source::submit_many` encodes them (two 27 KiB runs to a 64 KiB chunk, so chunks are
    /// only 85% full) from a source that its link holds back by the default queue bound, 8 MiB of frames: the chunks
    /// pinned by the queue (about 9.4 MiB) are all kept and used again once sent, none allocated in the steady state.
    #[test]
    fn chunks_filled_in_part_by_a_full_default_queue_are_used_again() {
        let (run, room) = (27_000, 28_000);
        let mut c = ChunkBuf::default();
        let mut queued: VecDeque<Bytes> = VecDeque::new();
        let (mut queued_bytes, mut warm) = (0usize, 0);
        for i in 0..6_000 {
            if i == 2_000 {
                warm = c.allocated;
            }
            c.room(room, 64 * 1024).extend_from_slice(&vec![i as u8; run]);
            let f = c.split();
            queued_bytes += f.len();
            queued.push_back(f);
            // The writer sends the oldest frames while more than the default link queue bound waits.
            while queued_bytes > 8 << 20 {
                queued_bytes -= queued.pop_front().map_or(0, |f| f.len());
            }
        }
        assert!((150..170).contains(&warm), "{warm} chunks for about 155 in flight");
        assert_eq!(c.allocated, warm, "chunks allocated in the steady state");
    }

    /// Events of mixed sizes (a large one now and then among small ones) from a sender whose link holds back more of
    /// its frames than `SPARE_BYTES` (a link queue configured larger than the default): the earlier chunks kept for use
    /// again stay within `SPARE_BYTES`, counted in bytes, plus at most one chunk, whatever the size asked for now.
    #[test]
    fn chunks_kept_stay_within_their_byte_bound_for_mixed_sizes() {
        for (every, big) in [(8, 1 << 20), (2, 200_000), (64, 16 << 20)] {
            let mut c = ChunkBuf::default();
            let mut queued: VecDeque<Bytes> = VecDeque::new();
            let (mut queued_bytes, mut worst, mut biggest) = (0usize, 0usize, 0usize);
            // A chunk's size by where it ends (which splitting frames off its front does not move): its capacity
            // when it became current, whole.
            let mut sizes = std::collections::HashMap::new();
            let end = |b: &BytesMut| b.as_ptr() as usize + b.capacity();
            for i in 0..3_000usize {
                let len = if i % every == 0 { big } else { 1_000 };
                let b = c.room(len, 64 * 1024);
                let size = sizes.entry(end(b)).or_insert(0);
                *size = b.capacity().max(*size);
                b.extend_from_slice(&vec![i as u8; len]);
                let f = c.split();
                queued_bytes += f.len();
                queued.push_back(f);
                // The link sends the oldest frames once more than 32 MiB wait.
                while queued_bytes > 32 << 20 {
                    queued_bytes -= queued.pop_front().map_or(0, |f| f.len());
                }
                let kept: Vec<usize> = c.spares.iter().map(|s| sizes[&end(s)]).collect();
                biggest = biggest.max(kept.iter().copied().max().unwrap_or(0));
                worst = worst.max(kept.iter().sum());
            }
            let case = (every, big);
            assert!(worst <= SPARE_BYTES + biggest, "{case:?}: {worst} bytes of chunks kept, chunks up to {biggest}");
        }
    }

    #[test]
    fn chunk_memory_is_used_again_once_its_frames_are_gone() {
        let mut c = ChunkBuf::default();
        c.room(10, 64).extend_from_slice(&[1; 60]);
        let first = c.split();
        let at = first.as_ptr();
        // The first chunk's frame is still alive: a new chunk is needed.
        c.room(10, 64).extend_from_slice(&[2; 60]);
        let second = c.split();
        assert_ne!(second.as_ptr(), at);
        drop(first);
        // The first chunk is free again and comes back instead of a new allocation.
        let again = c.room(10, 64).as_ptr();
        assert_eq!(again, at);
        drop(second);
    }
}
