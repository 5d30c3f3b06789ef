//! A link's reader: reads the byte stream, splits frames off it and decides what each is. Link frames (`Targets`,
//! `Ping`/`Pong`, `Close`) are handled here; membership frames pass the peer's budget first; events are gathered per
//! channel into batches; everything for channels goes up through [`LinkHandler`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kecho_proto::codec::{self, EventMsg};
use kecho_proto::{ChannelId, LocalId, Message};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;

use super::outbox::{SYNC_KIND, WAIT_KIND};

use super::{
    close, Arrived, Batch, Datagrams, LinkError, LinkHandler, LinkLive, Links, Numbered, Peer, MEMBERSHIP_RATE,
};
use crate::clock::now;

/// How much a link's reader reads at a time: on a quiet link, and on a busy one (its last read filled the buffer).
const READ_SMALL: usize = 16 * 1024;
const READ_BIG: usize = 256 * 1024;

/// At most this many events are delivered as one batch (a 256 KiB read holds about 1900 events of 100 B).
const MAX_BATCH: usize = 1024;

/// Runs a link's reader until the link fails; then the link is dropped and, if it was the current one, the peer lost.
/// A QUIC link's reader also takes its datagrams (best-effort events), in the same task, so that they are delivered
/// in turn with the stream's events and never at the same time.
pub(super) async fn reader<H: LinkHandler, R: AsyncRead + Unpin>(
    links: Arc<Links<H>>,
    peer: Arc<Peer>,
    gen: u64,
    (rd, datagrams): (R, Option<Arc<Datagrams>>),
    buf: BytesMut,
    live: Arc<LinkLive>,
    remote: Option<SocketAddr>,
) {
    // The handler lives as long as the node; a reader of a node being dropped has nothing to deliver to.
    let Some(handler) = links.handler.upgrade() else { return };
    let later = std::cell::RefCell::new(Vec::new());
    // A QUIC link with a stream per priority: the peer's urgent stream is read by a second receiver, in a task of its
    // own (see below). A TCP link's urgent connection (`urgent.rs`) plays the same part.
    let tcp_urgent = peer.urgent_tcp.lock().clone();
    let sync = (tcp_urgent.is_some() || datagrams.as_ref().is_some_and(|d| d.has_streams()))
        .then(|| Arc::new(StreamSync::default()));
    let urgent_conn = datagrams.clone();
    let has_urgent = sync.is_some();
    let mut rx = Receiver::new(handler.clone(), peer.clone(), live.clone(), sync.clone().map(|s| (s, 0)));
    let both = async {
        let (links_u, peer_u) = (links.clone(), peer.clone());
        let urgent = async move {
            let (links, peer) = (links_u, peer_u);
            let Some(sync) = sync else { return std::future::pending().await };
            let rd = match (tcp_urgent, urgent_conn) {
                (Some(u), conn) => {
                    // The dialler opens the connection once either side wants it (under the urgent receiver's task,
                    // which ends with the reader, so with the link).
                    let connection = async {
                        if u.dials().is_some() {
                            u.wanted().await;
                            super::dial::dial_urgent(&links, &u).await;
                            // The writer moves the urgent lanes at its next turn: let it have one now.
                            peer.outbox.readable.notify_one();
                        }
                        u.accept_urgent().await
                    };
                    // A QUIC link: a peer that could not make the urgent connection opens an urgent stream instead.
                    // Its writer uses one or the other, so whichever comes first is the one.
                    let stream = async {
                        match conn.filter(|d| d.has_streams()) {
                            Some(d) => d.accept_urgent().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        Some(c) = connection => Some(c),
                        Some(rd) = stream => {
                            // The peer's urgent frames come on a stream: its urgent connection was not made (a
                            // dialler opens the stream only once its dial failed or if it has no urgent endpoint;
                            // an acceptor, once it learnt so here). The accepting end learns it no other way: without this its slot would wait
                            // for the link's lifetime, taking a join for a connection the peer gave up on, and
                            // its own urgent lanes would share the main stream. Its writer now opens an urgent
                            // stream of its own (`UrgentLanes::turn`), and a late join is refused.
                            u.failed();
                            peer.outbox.readable.notify_one();
                            Some((rd, BytesMut::with_capacity(READ_SMALL)))
                        }
                        else => None,
                    }
                }
                (None, Some(d)) => d.accept_urgent().await.map(|rd| (rd, BytesMut::with_capacity(READ_SMALL))),
                (None, None) => None,
            };
            let Some((rd, read)) = rd else { return std::future::pending().await };
            // Read at once: the urgent stream's events do not wait for the main stream's `Sync` (the main connection
            // may hold a backlog before it). An event of a source whose frames went on the main stream before comes
            // after a `Wait` (which holds until the `Sync` is read and beyond); other frames wait for the `Sync`
            // (`Receiver::after_sync`).
            let mut urx = Receiver::new(handler, peer.clone(), live, Some((sync.clone(), 1)));
            match urx.read_loop(&links, rd, None, read, remote).await {
                // The urgent stream ends (between two frames) before the main one, which waits for it to be read: the
                // link goes on, but a `Wait` for more than it carried can never be met and fails the link.
                LinkError::Eof => {
                    sync.end_urgent();
                    std::future::pending().await
                }
                why => why,
            }
        };
        // The urgent receiver runs as a task of its own (with its own deferred wakes), so that it reads its connection
        // as soon as bytes arrive: in the reader's task it was polled only when the main receiver had nothing to read,
        // which under a bulk transfer meant when tokio's budget made the task yield. It ends with the reader. The
        // order between the two connections does not depend on when each is read (`Sync`/`Wait`, `after_sync`).
        // (None on a link that can have no urgent stream or connection.)
        let mut urgent =
            has_urgent.then(|| AbortOnDrop(tokio::spawn(crate::queue::WAKE_LATER.scope(Default::default(), urgent))));
        let urgent_ended = async {
            match urgent.as_mut() {
                Some(task) => (&mut task.0).await.unwrap_or(LinkError::Protocol("the urgent receiver stopped")),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            why = rx.read_loop(&links, rd, datagrams, buf, remote) => why,
            why = urgent_ended => why,
        }
    };
    let why = crate::queue::WAKE_LATER.scope(later, both).await;
    tracing::debug!(peer = %peer.id, "reader stopped: {why}");
    // Give the writer a moment to send a Close we queued, then drop the link.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if peer.link_down(gen) {
        tracing::info!(peer = %peer.id, "link lost: {why}");
        links.peer_lost(peer.id);
    }
}

/// Aborts a task when dropped (the urgent receiver, with its link's reader).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a reader's wait brought: bytes of the stream, or a datagram (`None`: the connection is gone).
enum Got {
    Read(std::io::Result<usize>),
    Datagram(Option<Bytes>),
}

/// The sink ids of a `Targets` frame, held until the event it announces arrives.
struct PendingTargets {
    channel: ChannelId,
    sinks: Vec<LocalId>,
}

/// How far the receivers of a link with a stream per priority have read each stream (docs/PROTOCOL.md, "Priorities and
/// deadlines"): bytes of the main stream after its `Sync` frame (`u64::MAX` before it), and of the urgent stream.
/// A receiver publishes its count only once the events before it are delivered, and a `Wait` frame holds its
/// stream until the other stream's count reaches the frame's value.
#[derive(Debug)]
struct StreamSync {
    read: [AtomicU64; 2],
    /// The urgent stream has ended (its count is final).
    urgent_ended: AtomicBool,
    changed: Notify,
}

impl Default for StreamSync {
    fn default() -> Self {
        StreamSync {
            read: [AtomicU64::new(u64::MAX), AtomicU64::new(0)],
            urgent_ended: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }
}

impl StreamSync {
    /// Waits until stream `stream` has been read (and its events delivered) up to `bytes`; `false` if it never will
    /// be (the urgent stream ended short of it).
    async fn wait(&self, stream: usize, bytes: u64) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let ended = stream == 1 && self.urgent_ended.load(Ordering::Acquire);
            let read = self.read[stream].load(Ordering::Acquire);
            if read != u64::MAX && read >= bytes {
                return true;
            }
            if ended {
                return false;
            }
            changed.await;
        }
    }

    /// The urgent stream ended (after its receiver published its last count).
    fn end_urgent(&self) {
        self.urgent_ended.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn publish(&self, stream: usize, bytes: u64) {
        if self.read[stream].swap(bytes, Ordering::AcqRel) != bytes {
            self.changed.notify_waiters();
        }
    }
}

/// A reader's state between frames.
struct Receiver<H> {
    handler: Arc<H>,
    peer: Arc<Peer>,
    live: Arc<LinkLive>,
    /// Streams mode: the link's [`StreamSync`] and which stream this receiver reads (0 main, 1 urgent).
    sync: Option<(Arc<StreamSync>, usize)>,
    /// Bytes of frames read from this receiver's stream (for the main stream in streams mode: since `Sync`).
    consumed: u64,
    /// Streams mode, main stream: its `Sync` frame was read.
    synced: bool,
    targets: Option<PendingTargets>,
    /// The deadline of a `Deadline` frame (channel, microseconds since the Unix epoch), held for its event.
    deadline: Option<(ChannelId, u64)>,
    /// Consecutive events of one channel (`on`), delivered together.
    batch: Batch,
    on: ChannelId,
}

impl<H: LinkHandler> Receiver<H> {
    fn new(handler: Arc<H>, peer: Arc<Peer>, live: Arc<LinkLive>, sync: Option<(Arc<StreamSync>, usize)>) -> Self {
        let synced = sync.as_ref().is_some_and(|(_, s)| *s == 1);
        Receiver {
            handler,
            peer,
            live,
            sync,
            consumed: 0,
            synced,
            targets: None,
            deadline: None,
            batch: Batch::default(),
            on: ChannelId(0),
        }
    }

    /// Delivers what is staged and, in streams mode, publishes how far this stream is read.
    async fn settle(&mut self) {
        self.deliver().await;
        crate::queue::flush_deferred_wakes();
        if let Some((sync, stream)) = &self.sync {
            if self.synced {
                sync.publish(*stream, self.consumed);
            }
        }
    }

    /// On the urgent stream, a frame other than an event and the frames that come with one (`Routed`, `Targets`,
    /// `Deadline`, `Expired`) waits until the main stream's `Sync` is read: it may depend on what the main stream
    /// carried before the urgent lanes moved (a `Lagged` after its source's events, a join before its channel's
    /// frames). Events need no such wait: a source whose frames went on the main stream before sends a `Wait` first.
    async fn after_sync(&mut self, msg: &Message) {
        let Some((sync, 1)) = self.sync.clone() else { return };
        if matches!(
            msg,
            Message::Routed { .. } | Message::Targets { .. } | Message::Deadline { .. } | Message::Expired { .. }
        ) {
            return;
        }
        self.settle().await;
        sync.wait(0, 0).await;
    }

    /// A `Sync` or `Wait` frame of a link with a stream per priority.
    async fn stream_frame(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        let Some((sync, stream)) = self.sync.clone() else {
            return Err(LinkError::Protocol("a stream frame on a link with one stream"));
        };
        match (frame, stream) {
            ([SYNC_KIND], 0) if !self.synced => {
                self.deliver().await;
                crate::queue::flush_deferred_wakes();
                self.synced = true;
                self.consumed = 0;
                sync.publish(0, 0);
                Ok(())
            }
            ([WAIT_KIND, rest @ ..], _) if rest.len() == 8 && self.synced => {
                self.consumed += frame.len() as u64 + codec::LEN_PREFIX as u64;
                self.settle().await;
                let mut n = [0u8; 8];
                n.copy_from_slice(rest);
                if sync.wait(1 - stream, u64::from_le_bytes(n)).await {
                    Ok(())
                } else {
                    Err(LinkError::Protocol("a Wait for more than the urgent stream carried before it ended"))
                }
            }
            _ => Err(LinkError::Protocol("a malformed or misplaced Sync or Wait frame")),
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        links: &Links<H>,
        mut rd: R,
        mut datagrams: Option<Arc<Datagrams>>,
        mut buf: BytesMut,
        remote: Option<SocketAddr>,
    ) -> LinkError {
        let max_frame = links.cfg.max_frame;
        let mut names = codec::TypeNames::default();
        let mut busy = false;
        // The buffers read into before `buf`: their events may still be queued at sinks, and once they are gone
        // their memory serves again (see `more_room`).
        let mut spare: Vec<BytesMut> = Vec::new();
        // Since when every read has been a quiet one (see `release_when_quiet`).
        let mut quiet_since = None;
        let why = 'outer: loop {
            loop {
                let handled = match codec::split_frame(&mut buf, max_frame) {
                    Ok(Some(frame)) if codec::is_event(&frame) => {
                        self.consumed += (frame.len() + codec::LEN_PREFIX) as u64;
                        match codec::decode_event_with(frame, &mut names) {
                            // The common case without a future per event: only a batch that must go first is awaited.
                            Ok(e) => {
                                if self.must_deliver_before(e.channel) {
                                    self.deliver().await;
                                    self.on = e.channel;
                                }
                                self.arrived(e)
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                    Ok(Some(frame)) if codec::is_event_run(&frame) => {
                        self.consumed += (frame.len() + codec::LEN_PREFIX) as u64;
                        self.event_run(frame, &mut names).await
                    }
                    Ok(Some(frame)) if frame.first() == Some(&super::urgent::WANTED_KIND) && frame.len() == 1 => {
                        // The acceptor asks for the urgent connection (ignored where this node has no slot for one, or
                        // is the acceptor itself).
                        self.consumed += (frame.len() + codec::LEN_PREFIX) as u64;
                        if let Some(u) = self.peer.urgent_tcp.lock().as_ref().filter(|u| u.dials().is_some()) {
                            u.want();
                        }
                        Ok(())
                    }
                    Ok(Some(frame)) if frame.first() == Some(&super::urgent::FAILED_KIND) && frame.len() == 1 => {
                        // The dialler could not make the urgent connection: the slot closes (a late join is refused)
                        // and the writer learns it at its next turn (ignored where this node has no slot, or dials).
                        self.consumed += (frame.len() + codec::LEN_PREFIX) as u64;
                        if let Some(u) = self.peer.urgent_tcp.lock().as_ref().filter(|u| u.dials().is_none()) {
                            tracing::debug!(peer = %self.peer.id, "the peer could not make the urgent connection");
                            u.failed();
                            self.peer.outbox.readable.notify_one();
                        }
                        Ok(())
                    }
                    Ok(Some(frame))
                        if self.sync.is_some() && matches!(frame.first(), Some(&(SYNC_KIND | WAIT_KIND))) =>
                    {
                        self.stream_frame(&frame).await
                    }
                    Ok(Some(frame)) => {
                        self.consumed += (frame.len() + codec::LEN_PREFIX) as u64;
                        match codec::decode_body_with(frame, &mut names) {
                            Ok(msg) => {
                                self.after_sync(&msg).await;
                                self.frame(links, msg).await
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                    Ok(None) => break,
                    Err(e) => Err(e.into()),
                };
                if let Err(why) = handled {
                    match &why {
                        // A peer that closed the link needs no Close back.
                        LinkError::ClosedByPeer { .. } => {}
                        LinkError::Decode(_) => {
                            tracing::warn!(?remote, peer = %self.peer.id, "malformed frame, closing link: {why}");
                            self.peer.outbox.push_control(close(why.close_code(), &why.to_string()));
                        }
                        _ => self.peer.outbox.push_control(close(why.close_code(), &why.to_string())),
                    }
                    break 'outer why;
                }
            }
            // Every complete frame read so far is handled: wake the sinks that got events, once each (and, with a
            // stream per priority, tell the other stream's receiver how far this one is).
            self.settle().await;
            // Reads of up to READ_SMALL on a quiet link; a link whose last read filled the buffer is busy, and larger
            // reads then cost fewer system calls and wake-ups per event.
            release_when_quiet(&mut quiet_since, busy, now(), &mut buf, &mut spare);
            let want = if busy { READ_BIG } else { READ_SMALL };
            if buf.capacity() - buf.len() < want / 4 {
                more_room(&mut buf, &mut spare, want);
            }
            let free = buf.capacity() - buf.len();
            let got = match &datagrams {
                None => Got::Read(rd.read_buf(&mut buf).await),
                // Whichever is ready (at random when both are, so that neither a busy stream nor a flood of
                // datagrams starves the other). A datagram taken before the stream bytes sent ahead of it is dropped
                // and reported missed by the channel's loss accounting (`link::datagram::Verdict::Overtook`).
                Some(d) => tokio::select! {
                    r = rd.read_buf(&mut buf) => Got::Read(r),
                    g = d.recv() => Got::Datagram(g),
                },
            };
            let read = match got {
                Got::Read(r) => r,
                Got::Datagram(Some(dgram)) => {
                    self.peer.counters.datagrams_received.fetch_add(1, Ordering::Relaxed);
                    self.peer.counters.bytes_received.fetch_add(dgram.len() as u64, Ordering::Relaxed);
                    self.live.lock().on_receive(now());
                    if let Err(why) = self.datagram(dgram, &mut names, max_frame).await {
                        tracing::warn!(?remote, peer = %self.peer.id, "malformed datagram, closing link: {why}");
                        self.peer.outbox.push_control(close(why.close_code(), &why.to_string()));
                        break 'outer why;
                    }
                    continue;
                }
                // The connection is gone: the stream's read says why.
                Got::Datagram(None) => {
                    datagrams = None;
                    continue;
                }
            };
            match read {
                // A stream that ends inside a frame was cut (a peer that closes a stream gracefully does so between
                // frames): what it carried is incomplete, and the link fails rather than waits for the rest.
                Ok(0) if !buf.is_empty() => break LinkError::Protocol("the connection ended in the middle of a frame"),
                Ok(0) => break LinkError::Eof,
                Ok(n) => {
                    self.peer.counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    busy = n == free;
                    self.live.lock().on_receive(now());
                }
                // (A reader that was held up by a Block sink resumes here; the data it now reads proves the peer
                // alive.)
                Err(e) => break LinkError::Io(e),
            }
        };
        // Events read before whatever stopped the reader are delivered.
        self.settle().await;
        why
    }

    /// An event: joins the batch of its channel (the batch so far is delivered first if it is another channel's).
    async fn event(&mut self, e: EventMsg) -> Result<(), LinkError> {
        if self.must_deliver_before(e.channel) {
            self.deliver().await;
            self.on = e.channel;
        }
        self.arrived(e)
    }

    /// An `EventRun` frame: checked whole (a damaged run stages none of its events) and staged as one, after the
    /// batch so far if that holds single events or another channel's; its events are built straight into the
    /// sinks' queues at delivery, each treated as if it had come in an `Event` frame of its own.
    async fn event_run(&mut self, frame: Bytes, names: &mut codec::TypeNames) -> Result<(), LinkError> {
        if self.targets.is_some() || self.deadline.is_some() {
            return Err(LinkError::Protocol("a Targets or Deadline frame before an event run"));
        }
        let run = codec::decode_event_run_msg(frame, names)?;
        if run.channel != self.on || !self.batch.events.is_empty() || self.batch.run_events >= MAX_BATCH {
            self.deliver().await;
            self.on = run.channel;
        }
        self.batch.run_events += run.count;
        self.batch.runs.push(run);
        Ok(())
    }

    /// The batch gathered so far must be delivered before an event of `channel` joins: it is another channel's, or
    /// full, or holds runs.
    #[inline]
    fn must_deliver_before(&self, channel: ChannelId) -> bool {
        channel != self.on || self.batch.events.len() >= MAX_BATCH || !self.batch.runs.is_empty()
    }

    /// An event joins the batch (which `must_deliver_before` allowed), with its pending `Targets` and `Deadline`.
    fn arrived(&mut self, e: EventMsg) -> Result<(), LinkError> {
        let targets = match self.targets.take() {
            Some(t) if t.channel == e.channel => Some(t.sinks),
            Some(_) => return Err(LinkError::Protocol("a Targets frame was not followed by its event")),
            None => None,
        };
        let deadline = match self.deadline.take() {
            Some((c, d)) if c == e.channel => Some(d),
            Some(_) => return Err(LinkError::Protocol("a Deadline frame was not followed by its event")),
            None => None,
        };
        debug_assert!(!self.must_deliver_before(e.channel));
        self.batch.events.push(Arrived::new(e, targets, deadline));
        Ok(())
    }

    /// Adds an arrived event to the batch of `channel`.
    async fn stage(&mut self, channel: ChannelId, a: Arrived) {
        if self.must_deliver_before(channel) {
            self.deliver().await;
            self.on = channel;
        }
        self.batch.events.push(a);
    }

    /// A datagram: one best-effort event with its own `Targets` and `Deadline` frames (`datagram.rs`), staged like an
    /// event from the stream, with its numbers for the channel's loss accounting. The stream's pending `Targets` and
    /// `Deadline` frames (for its next event) are not touched.
    async fn datagram(
        &mut self,
        mut d: Bytes,
        names: &mut codec::TypeNames,
        max_frame: usize,
    ) -> Result<(), LinkError> {
        let (number, after) = super::datagram::split_header(&mut d).map_err(LinkError::Protocol)?;
        let mut frames = BytesMut::from(d);
        let (mut targets, mut deadline) = (None, None);
        loop {
            let Some(frame) = codec::split_frame(&mut frames, max_frame)? else {
                return Err(LinkError::Protocol("a datagram without a whole event"));
            };
            if codec::is_event(&frame) {
                let e = codec::decode_event_with(frame, names)?;
                if !frames.is_empty() {
                    return Err(LinkError::Protocol("bytes after a datagram's event"));
                }
                let of = |c: Option<ChannelId>| c.is_none_or(|c| c == e.channel);
                if !of(targets.as_ref().map(|t: &PendingTargets| t.channel)) || !of(deadline.map(|(c, _)| c)) {
                    return Err(LinkError::Protocol("a datagram's frames name different channels"));
                }
                let channel = e.channel;
                let a = Arrived::datagram(
                    e,
                    targets.map(|t| t.sinks),
                    deadline.map(|(_, d)| d),
                    Numbered { number, after },
                );
                self.stage(channel, a).await;
                return Ok(());
            }
            match codec::decode_body_with(frame, names)? {
                Message::Targets { channel, sinks } if targets.is_none() => {
                    targets = Some(PendingTargets { channel, sinks })
                }
                Message::Deadline { channel, unix_us } if deadline.is_none() => deadline = Some((channel, unix_us)),
                _ => return Err(LinkError::Protocol("a datagram holds a frame other than Targets, Deadline or Event")),
            }
        }
    }

    /// Any frame but an event's fast path.
    async fn frame(&mut self, links: &Links<H>, msg: Message) -> Result<(), LinkError> {
        match msg {
            Message::Event(e) => return self.event(e).await,
            Message::Targets { channel, sinks } => {
                if self.targets.replace(PendingTargets { channel, sinks }).is_some() {
                    return Err(LinkError::Protocol("two Targets frames in a row"));
                }
                return Ok(());
            }
            Message::Deadline { channel, unix_us } => {
                if self.deadline.replace((channel, unix_us)).is_some() {
                    return Err(LinkError::Protocol("two Deadline frames in a row"));
                }
                return Ok(());
            }
            _ => {}
        }
        // Frames of other kinds keep their place after the events before them.
        self.deliver().await;
        let peer = &self.peer;
        match msg {
            Message::Ping(n) => {
                // Any frame proves liveness, so a pong is only needed on an idle link. Skipping it otherwise keeps a
                // peer that pings without reading from growing our queue.
                if peer.outbox.is_empty() {
                    peer.outbox.push_link_control(Message::Pong(n).to_bytes());
                }
            }
            Message::Pong(_) => {}
            Message::Close { code, reason } => return Err(LinkError::ClosedByPeer { code, reason }),
            Message::JoinRequest { .. }
            | Message::JoinAccept { .. }
            | Message::JoinRedirect { .. }
            | Message::JoinRefused { .. }
            | Message::ViewSync { .. }
                if !peer.take_membership_token() =>
            {
                // Over budget: a genuine joiner asks again after `MembershipConfig::join_attempt`.
                tracing::debug!(peer = %peer.id, "membership budget spent: dropping a {} message", msg.kind());
            }
            Message::Gossip { ref body, .. } if body.is_membership() && !peer.take_membership_token() => {
                // Over budget: the overlay repairs itself (joins are retried, views refilled on a timer).
                tracing::debug!(peer = %peer.id, "membership budget spent: dropping a gossip message");
            }
            Message::Snapshot { .. } if !peer.take_membership_token() => {
                if peer.defer_snapshot(msg) {
                    let (handler, peer) = (self.handler.clone(), peer.clone());
                    links.tasks.spawn(async move {
                        // Apply the newest of what waited once the budget allows, one pass per refill.
                        let wait = Duration::from_secs_f64(1.0 / MEMBERSHIP_RATE).max(Duration::from_millis(20));
                        tokio::time::sleep(wait).await;
                        for m in peer.take_deferred() {
                            handler.control(peer.id, m);
                        }
                    });
                }
            }
            Message::JoinRequest { .. }
            | Message::JoinAccept { .. }
            | Message::JoinRedirect { .. }
            | Message::JoinRefused { .. }
            | Message::Snapshot { .. }
            | Message::InstallFilter { .. }
            | Message::FilterStatus { .. }
            | Message::Lagged { .. }
            | Message::SourceEnd { .. }
            | Message::Expired { .. }
            | Message::Routed { .. }
            | Message::Gossip { .. }
            | Message::ViewSync { .. } => self.handler.control(peer.id, msg),
            other => return Err(LinkError::Unexpected(other.kind())),
        }
        Ok(())
    }

    /// Delivers the events gathered so far, if any.
    async fn deliver(&mut self) {
        if self.batch.events.is_empty() && self.batch.runs.is_empty() {
            return;
        }
        self.live.reader_waiting.store(true, Ordering::Release);
        self.handler.deliver(self.peer.id, self.on, &mut self.batch).await;
        self.live.reader_waiting.store(false, Ordering::Release);
    }
}

/// How many buffers a reader keeps for use again besides the one it reads into: enough that a busy link whose
/// events wait at a sink for a while finds one of them free rather than allocating (and faulting in) a new one.
const SPARE_BUFFERS: usize = 4;

/// A link whose reads have all been quiet (none filled the buffer) this long gives back what its busy times left it.
const RELEASE_AFTER: Duration = Duration::from_secs(2);

/// Called between reads, with every complete frame handled: once the link has been quiet for [`RELEASE_AFTER`], its
/// spare buffers are dropped, and a large buffer holding no part of a frame is given up for a small one (at the next
/// read). A burst (a join storm's snapshots) left every link that carried it a busy link's buffers, up to about 1.5
/// MiB, for good; most of a tree's links are quiet most of the time.
fn release_when_quiet(
    quiet_since: &mut Option<Instant>,
    busy: bool,
    now: Instant,
    buf: &mut BytesMut,
    spare: &mut Vec<BytesMut>,
) {
    if busy {
        *quiet_since = None;
        return;
    }
    let since = *quiet_since.get_or_insert(now);
    if now.duration_since(since) < RELEASE_AFTER {
        return;
    }
    spare.clear();
    if buf.is_empty() && buf.capacity() > 2 * READ_SMALL {
        *buf = BytesMut::new();
    }
}

/// Gives a reader's buffer at least `want` bytes of free room, keeping the bytes it holds (the start of a frame not
/// read whole yet). Events hold on to the memory they were read into, so a buffer can rarely grow in place; rather than
/// a new allocation each time (whose pages the kernel must fault in afresh, and whose freeing unmaps them), an earlier
/// buffer is used again once nothing refers to it any more. At most [`SPARE_BUFFERS`] are kept, the oldest dropped.
fn more_room(buf: &mut BytesMut, spare: &mut Vec<BytesMut>, want: usize) {
    if buf.try_reclaim(want) {
        return;
    }
    let need = want + buf.len();
    let mut next = match spare.iter_mut().position(|s| s.try_reclaim(need)) {
        Some(i) => spare.remove(i),
        // With room for the start of a frame besides `want`, or a buffer could serve again only when no frame
        // straddled the reads.
        None => BytesMut::with_capacity((want + want / 4).max(2 * buf.len())),
    };
    next.extend_from_slice(buf);
    let mut old = std::mem::replace(buf, next);
    old.clear();
    if spare.len() >= SPARE_BUFFERS {
        spare.remove(0);
    }
    spare.push(old);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `n` bytes into `buf` and takes all but the last 10 as events that stay queued somewhere.
    fn read_and_hold(buf: &mut BytesMut, n: usize) -> Bytes {
        buf.extend_from_slice(&vec![7; n]);
        buf.split_to(buf.len() - 10).freeze()
    }

    #[test]
    fn a_reader_uses_its_earlier_buffers_again_once_their_events_are_gone() {
        let mut buf = BytesMut::with_capacity(1280);
        let mut spare = Vec::new();
        let first = buf.as_ptr();
        let held1 = read_and_hold(&mut buf, 1000);
        more_room(&mut buf, &mut spare, 1024);
        assert_ne!(buf.as_ptr(), first, "the first buffer is still in use");
        assert_eq!(&buf[..], &[7; 10], "the start of a frame moves along");
        let held2 = read_and_hold(&mut buf, 1000);
        more_room(&mut buf, &mut spare, 1024);
        // Events of both earlier buffers wait; once the first buffer's are gone it serves again (the second is
        // still in use): no new allocation.
        drop(held1);
        let _held3 = read_and_hold(&mut buf, 1000);
        more_room(&mut buf, &mut spare, 1024);
        assert_eq!(buf.as_ptr(), first);
        assert!(spare.len() <= SPARE_BUFFERS);
        drop(held2);
    }

    #[test]
    fn a_link_quiet_for_a_while_gives_back_its_busy_buffers() {
        let t0 = Instant::now();
        let big = || BytesMut::with_capacity(READ_BIG + READ_BIG / 4);
        let mut buf = big();
        let mut spare = vec![big(), big()];
        let mut quiet = None;
        // Busy, then quiet for less than RELEASE_AFTER: everything is kept (a link between two bursts).
        release_when_quiet(&mut quiet, true, t0, &mut buf, &mut spare);
        release_when_quiet(&mut quiet, false, t0, &mut buf, &mut spare);
        release_when_quiet(&mut quiet, false, t0 + RELEASE_AFTER / 2, &mut buf, &mut spare);
        assert_eq!((spare.len(), buf.capacity() >= READ_BIG), (2, true));
        // A busy read starts the count again.
        release_when_quiet(&mut quiet, true, t0 + RELEASE_AFTER, &mut buf, &mut spare);
        release_when_quiet(&mut quiet, false, t0 + RELEASE_AFTER, &mut buf, &mut spare);
        release_when_quiet(&mut quiet, false, t0 + RELEASE_AFTER * 3 / 2, &mut buf, &mut spare);
        assert_eq!(spare.len(), 2, "quiet for half of RELEASE_AFTER since the last busy read");
        // Quiet long enough, with the start of a frame in the buffer: the spares go, the buffer (and its bytes) stay.
        buf.extend_from_slice(b"part");
        release_when_quiet(&mut quiet, false, t0 + RELEASE_AFTER * 2, &mut buf, &mut spare);
        assert!(spare.is_empty());
        assert_eq!((&buf[..], buf.capacity() >= READ_BIG), (&b"part"[..], true));
        // And once it holds nothing, the large buffer goes too (the next read takes a small one).
        buf.clear();
        release_when_quiet(&mut quiet, false, t0 + RELEASE_AFTER * 2, &mut buf, &mut spare);
        assert_eq!(buf.capacity(), 0);
    }
}
