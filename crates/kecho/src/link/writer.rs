//! A link's writer: the task that takes every frame queued in the peer's outbox and writes them with one system call,
//! sends heartbeats, and watches the heartbeat deadline while a write is blocked; and the socket writes themselves,
//! including the direct write a submitting thread makes on a quiet link (see `Outbox::push_event_with`).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kecho_proto::liveness::LivenessAction;
use kecho_proto::Message;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

use super::outbox::{Direct, Outbox};
use super::tls::Wr;
use super::urgent::{Ready, TcpUrgent, UrgentWr};
use super::{LinkError, LinkHandler, LinkLive, Links, Peer};
use crate::clock::now;

/// Largest buffer the writer fills before one write call; many small frames go out in one system call.
const WRITE_BATCH: usize = 256 * 1024;
/// The least room `coalesce` asks for at a time.
const MIN_BATCH: usize = 4 * 1024;
/// Small frames waiting to be copied that make a link busy: `coalesce` then asks for [`WRITE_BATCH`] at once.
const BUSY_RUN: usize = 16 * 1024;
/// Most segments given to one vectored write (Linux takes up to 1024).
const MAX_IOV: usize = 64;
/// Frames this long or longer are written from where they are rather than copied (see `write_frames`).
pub(crate) const COPY_BELOW: usize = 512;
/// How long the dialling end of a TCP link holds its urgent lanes for the urgent connection it is making (see
/// `Outbox::hold_urgent`): on loopback or a LAN the dial takes a few milliseconds, and meanwhile an urgent frame
/// written to the main connection would wait behind everything its socket holds. A dial that takes longer (a
/// distant or lossy peer) releases the hold: held frames, pings among them, then go on the main connection, and the
/// urgent lanes move once the connection is up, as before.
const HOLD_URGENT: std::time::Duration = std::time::Duration::from_millis(200);

/// The dialling end's hold of its urgent lanes for the urgent connection being made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Not yet (the link carries no priorities, or the rest of a direct write is still queued).
    Not,
    /// Holding until then at most.
    Until(tokio::time::Instant),
    /// Over: the connection is up, or it took too long (the urgent lanes move once it is up), or it never comes.
    Over,
}

/// The write half as a link's writer holds it.
enum LinkWr {
    /// Plain TCP, shared with the outbox.
    Tcp(Arc<OwnedWriteHalf>),
    /// A QUIC link's main stream, shared with the outbox.
    #[cfg(feature = "quic")]
    Quic(super::quic::QuicWr),
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
}

impl LinkWr {
    async fn write(&mut self, frames: &mut VecDeque<Bytes>, batch: &mut BytesMut) -> std::io::Result<()> {
        match self {
            LinkWr::Tcp(sock) => write_frames_tcp(sock, frames, batch).await,
            #[cfg(feature = "quic")]
            LinkWr::Quic(w) => write_frames(w, frames, batch).await,
            LinkWr::Stream(w) => write_frames(w, frames, batch).await,
        }
    }

    /// Sends FIN (no more direct writes first).
    async fn shutdown(self, outbox: &Outbox) {
        match self {
            LinkWr::Tcp(sock) => {
                outbox.clear_direct(&Direct::Tcp(sock.clone()));
                // The outbox held the only other reference, and only under its lock: this one is now alone.
                if let Ok(mut w) = Arc::try_unwrap(sock) {
                    let _ = w.shutdown().await;
                }
            }
            #[cfg(feature = "quic")]
            LinkWr::Quic(mut w) => {
                outbox.clear_direct(&Direct::Quic(w.0.clone()));
                let _ = w.shutdown().await;
            }
            LinkWr::Stream(mut w) => {
                let _ = w.shutdown().await;
            }
        }
    }

    /// A stream of the link's connection can carry the urgent lanes (QUIC, TLS; not TCP, whose urgent lanes take a
    /// connection of their own).
    fn is_stream(&self) -> bool {
        !matches!(self, LinkWr::Tcp(_))
    }
}

/// Runs a link's writer until the link fails or, in a graceful shutdown, its outbox is empty.
pub(super) async fn writer<H: LinkHandler>(
    links: Arc<Links<H>>,
    peer: Arc<Peer>,
    gen: u64,
    wr: Wr,
    live: Arc<LinkLive>,
) {
    let mut wr = match wr {
        Wr::Tcp(w) => {
            let sock = Arc::new(w);
            peer.outbox.set_direct(Some(Direct::Tcp(sock.clone())));
            LinkWr::Tcp(sock)
        }
        #[cfg(feature = "quic")]
        Wr::Quic(s) => {
            let s = super::quic::QuicSend::new(s);
            peer.outbox.set_direct(Some(Direct::Quic(s.clone())));
            LinkWr::Quic(super::quic::QuicWr(s))
        }
        Wr::Stream(w) => LinkWr::Stream(w),
        Wr::Shm(w) => LinkWr::Stream(w),
    };
    peer.outbox.stop_streams();
    let mut frames = VecDeque::new();
    let mut batch = BytesMut::new();
    let lowat = links.cfg.send_lowat;
    // The link's reaction to carrying priorities is still to come (once).
    let mut unprioritised = true;
    // A QUIC link whose peer takes a stream per priority gets its urgent stream once it carries priorities; its writer
    // runs alongside this one (`urgent_writer`), so that neither waits for the other's writes.
    let (to_urgent, urgent_stream) = tokio::sync::oneshot::channel();
    let mut lanes = UrgentLanes::new(&peer, to_urgent);
    // Frames `UrgentLanes::turn` gave while a write was in progress, written first at the next turn.
    let mut pending = VecDeque::new();
    if let Some(u) = lanes.slot.as_ref().filter(|u| links.cfg.urgent_at_once && u.dials().is_some()) {
        // The connection is wanted now (`NodeBuilder::urgent_connection_at_once`): the dialler's reader dials at once.
        // (An acceptor asks for it at the end of its handshake answer: `dial.rs`.)
        u.want();
    }
    let urgent = urgent_writer(&peer, urgent_stream, &live);
    tokio::pin!(urgent);
    let main = async {
        loop {
            let wake = peer.outbox.readable.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            // Events dropped while the outbox was full are reported now that it has room, even if no event follows.
            peer.flush_lag();
            frames.append(&mut pending);
            lanes.turn(&peer, &mut frames);
            if links.closing.load(Ordering::Acquire) {
                // A graceful shutdown writes everything queued: nothing is held for a connection still to come.
                lanes.end_hold(&peer);
            }
            peer.outbox.take_all(&mut frames);
            // (Nothing to write but an urgent stream to open to tell the peer: opened below, now.)
            if frames.is_empty() && !lanes.announcing() {
                if links.closing.load(Ordering::Acquire) {
                    if peer.outbox.has_streams() {
                        // The main stream ends with a `Wait` for the whole urgent stream, once that is written, so that
                        // the receiver reads it to its end before it sees this one's.
                        match peer.outbox.urgent_done() {
                            Some(w) => frames.push_back(w),
                            None => {
                                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                                continue;
                            }
                        }
                        if let Err(e) = wr.write(&mut frames, &mut batch).await {
                            break Some(LinkError::Io(e));
                        }
                    }
                    // Graceful shutdown: everything queued is written. Send FIN and let the reader see the peer's EOF, so
                    // that no unread data makes the kernel reset the connection and discard what we sent.
                    break None;
                }
                // While the urgent lanes are held: woken when the connection joins or fails, and when the hold ends.
                let held = lanes.held();
                let settled = async {
                    match held {
                        Some((t, u)) => {
                            let n = u.settled();
                            tokio::pin!(n);
                            n.as_mut().enable();
                            if !u.open() {
                                return;
                            }
                            tokio::select! {
                                _ = n => {}
                                _ = tokio::time::sleep_until(t) => {}
                            }
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(settled);
                let deadline = live.lock().deadline();
                tokio::select! {
                    _ = &mut wake => continue,
                    _ = &mut settled => continue,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        // Nothing to write for a heartbeat's interval: a quiet link gives back the room a past burst
                        // left it (on a busy one each burst would only take it again).
                        kecho_proto::gossip::shrink_idle(&mut frames);
                        peer.outbox.shrink_idle();
                        if batch.is_empty() && batch.capacity() > BUSY_RUN {
                            batch = BytesMut::new();
                        }
                        if live.reader_waiting.load(Ordering::Acquire) {
                            live.lock().on_receive(now());
                        }
                        if peer.outbox.take_sent_direct() {
                            live.lock().on_send(now());
                        }
                        let action = live.lock().poll_due(now(), deadline);
                        match action {
                            LivenessAction::Wait => continue,
                            // Through the outbox, so that no direct write can interleave with it; in its highest lane, so
                            // that no backlog of events delays it.
                            LivenessAction::SendPing => {
                                peer.outbox.push_link_control(Message::Ping(gen).to_bytes());
                                continue;
                            }
                            LivenessAction::Dead => {
                                peer.counters.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                                break Some(LinkError::Heartbeat(""));
                            }
                        }
                    }
                }
            }
            peer.outbox.writable.notify_waiters();
            if unprioritised && peer.outbox.prioritised.load(Ordering::Acquire) {
                unprioritised = false;
                if let (Some(n), LinkWr::Tcp(sock)) = (lowat, &wr) {
                    let stream: &tokio::net::TcpStream = (**sock).as_ref();
                    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(n) {
                        tracing::debug!(peer = %peer.id, "TCP_NOTSENT_LOWAT not set: {e}");
                    }
                }
            }
            // QUIC, TLS: the urgent lanes may take a stream of the link's connection (`UrgentLanes::open_stream`).
            if lanes.stream_wanted && wr.is_stream() {
                lanes.open_stream(&peer, gen, lowat, &mut frames).await;
            }
            let n = frames.len() as u64;
            let bytes: usize = frames.iter().map(Bytes::len).sum();
            // A write blocks while the peer's receive window is full, which is exactly what a cut-off or frozen peer
            // causes: keep watching the heartbeat deadline meanwhile, or a busy link to a dead peer would never be
            // declared dead.
            let write = wr.write(&mut frames, &mut batch);
            tokio::pin!(write);
            let mut was_woken = false;
            let written = loop {
                let deadline = live.lock().deadline();
                // A TCP link that may still move its urgent lanes looks again when an event is queued (the first
                // prioritised one among them), when the urgent connection joins or fails, and when a hold ends.
                let (watch, until) = lanes.watched();
                // This turn's `wake` (enabled at its start, unused by a turn that writes) tells of the queueing
                // (once it fired, it stays ready).
                let woken = &mut wake;
                let nudge = async {
                    let Some(u) = watch else { return std::future::pending::<bool>().await };
                    tokio::select! {
                        _ = woken, if !was_woken => true,
                        // Once this turn's `wake` fired (a control frame queued, say), a fresh wait: the next
                        // queueing may be the first prioritised event, while this write never ends (a stalled peer).
                        _ = peer.outbox.readable.notified(), if was_woken => false,
                        _ = u.settled() => false,
                        _ = async {
                            match until {
                                Some(t) => tokio::time::sleep_until(t).await,
                                None => std::future::pending().await,
                            }
                        } => false,
                    }
                };
                tokio::select! {
                    r = &mut write => break r.map_err(LinkError::Io),
                    woke = nudge => {
                        was_woken |= woke;
                        lanes.turn(&peer, &mut pending);
                    }
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        if live.reader_waiting.load(Ordering::Acquire) {
                            live.lock().on_receive(now());
                        }
                        // Pings are not sent from here: the write in progress shows the peer we are alive once it
                        // drains, and a ping could not overtake it anyway.
                        if live.lock().poll_due(now(), deadline) == LivenessAction::Dead {
                            peer.counters.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                            break Err(LinkError::Heartbeat(" while writing"));
                        }
                    }
                }
            };
            if let Err(e) = written {
                break Some(e);
            }
            peer.frames_sent.fetch_add(n, Ordering::Relaxed);
            peer.counters.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
            live.lock().on_send(now());
        }
    };
    let why = tokio::select! {
        why = main => why,
        why = &mut urgent => Some(why),
    };
    let Some(why) = why else {
        wr.shutdown(&peer.outbox).await;
        tracing::debug!(peer = %peer.id, "writer finished for shutdown");
        return;
    };
    tracing::debug!(peer = %peer.id, "writer stopped: {why}");
    wr.shutdown(&peer.outbox).await;
    if peer.link_down(gen) {
        tracing::info!(peer = %peer.id, "link lost: {why}");
        links.peer_lost(peer.id);
    }
}

/// Where a link's urgent lanes (outbox lanes 1-3) go, as the writer decides it: the link's urgent connection slot
/// (`urgent.rs`: TCP, or QUIC with a stream per priority), the connection's write half once it is up but not yet in
/// use, the hold of the lanes while the dialling end makes it, and a QUIC link's urgent stream of its main connection
/// (wanted, or to be opened to tell the peer).
struct UrgentLanes {
    /// The link's urgent connection slot, if it has one.
    slot: Option<Arc<TcpUrgent>>,
    /// Hands the urgent lanes' stream or connection to `urgent_writer`; `None` once given, or once the lanes stay on
    /// the main connection for good.
    to_writer: Option<tokio::sync::oneshot::Sender<UrgentWr>>,
    /// The urgent connection's write half, taken from the slot and not yet given to `urgent_writer`.
    conn: Option<UrgentWr>,
    hold: Hold,
    /// The urgent lanes may take a stream of the link's connection once it carries priorities: a stream link without
    /// an urgent connection slot, or a QUIC link whose urgent connection could not be made.
    stream_wanted: bool,
    /// The urgent stream is to be opened before this end carries priorities, to tell the peer (see `turn`).
    announce: bool,
}

impl UrgentLanes {
    /// The state of a new link of `peer`; `to_writer` hands the lanes' stream or connection to `urgent_writer`.
    fn new(peer: &Peer, to_writer: tokio::sync::oneshot::Sender<UrgentWr>) -> Self {
        let slot = peer.urgent_tcp.lock().clone();
        let streams = peer.datagrams.lock().as_ref().is_some_and(|d| d.has_streams());
        peer.outbox.set_movable(slot.is_some() || streams);
        UrgentLanes {
            stream_wanted: slot.is_none(),
            slot,
            to_writer: Some(to_writer),
            conn: None,
            hold: Hold::Not,
            announce: false,
        }
    }

    /// Nothing to write but an urgent stream to open to tell the peer (the writer opens it now).
    fn announcing(&self) -> bool {
        self.announce && self.stream_wanted
    }

    /// A graceful shutdown: nothing more is held for a connection still to come.
    fn end_hold(&mut self, peer: &Peer) {
        if self.hold != Hold::Over {
            peer.outbox.release_hold();
            self.hold = Hold::Over;
        }
    }

    /// While the urgent lanes are held: until when, and the slot whose connection they wait for.
    fn held(&self) -> Option<(tokio::time::Instant, &TcpUrgent)> {
        match (self.hold, &self.slot) {
            (Hold::Until(t), Some(u)) => Some((t, u)),
            _ => None,
        }
    }

    /// While a write is in progress: the slot to watch, if the urgent lanes may still move to its connection, and
    /// when the hold ends.
    fn watched(&self) -> (Option<&TcpUrgent>, Option<tokio::time::Instant>) {
        let watch = self.slot.as_deref().filter(|_| self.to_writer.is_some());
        let until = match self.hold {
            Hold::Until(t) => Some(t),
            _ => None,
        };
        (watch, until)
    }

    /// One look at the link's urgent connection, at each turn of the writer and while a write of the main
    /// connection is in progress (a write into a full socket buffer can take tens of milliseconds, which the first
    /// urgent frame must not wait for before the connection is even asked for). Frames for the main connection go to
    /// `next`, ahead of anything taken later. A QUIC link whose urgent connection will never come sets
    /// `stream_wanted`: its urgent lanes take a stream of the main connection instead.
    fn turn(&mut self, peer: &Peer, next: &mut VecDeque<Bytes>) {
        // A TCP link with an urgent connection slot (`urgent.rs`), once it carries priorities: the connection is
        // asked for (the acceptor asks the dialler), and once it is up the urgent lanes go there from now on,
        // after a `Sync` on this connection, as on a QUIC link's urgent stream, with the frames they hold (lane 0
        // waits for those: `Outbox::start_streams`). Meanwhile the dialling end holds its urgent lanes (at most
        // `HOLD_URGENT`): written here, the first urgent frames would wait behind everything this connection's
        // socket holds. The accepting end does not hold them: its `UrgentWanted` crosses this connection behind
        // that same backlog before the dial even starts, so a held frame could only arrive later. Not while the
        // rest of a frame begun on this connection by a direct write is queued (it goes first, here).
        let Some(u) = &self.slot else { return };
        if self.stream_wanted || self.to_writer.is_none() {
            return;
        }
        // (The cheap checks first: `may_split` takes the outbox's lock, at every turn of a busy writer.)
        if !peer.outbox.prioritised.load(Ordering::Acquire) {
            // The dialling end of a QUIC link whose acceptor asked for the urgent connection (its own outbox carries
            // priorities) and whose dial failed: the acceptor learns that only from this end's urgent stream, so it
            // is opened now, with a `Ping` on it, rather than once this end carries priorities itself (which may be
            // never: the acceptor's urgent frames would share the main stream for the link's lifetime).
            if self.conn.is_none() && u.dials().is_some() && u.is_wanted() && peer.outbox.may_split() {
                match u.try_writer() {
                    Ready::Up(w) => self.conn = Some(w),
                    Ready::NotYet => {}
                    Ready::Never => {
                        if peer.datagrams.lock().as_ref().is_some_and(|d| d.has_streams()) {
                            tracing::debug!(peer = %peer.id, "no urgent connection, an urgent stream tells the peer");
                            self.stream_wanted = true;
                            self.announce = true;
                        } else {
                            // A TCP link: an `UrgentFailed` tells the acceptor, which closes its slot (it would
                            // otherwise wait for the connection, and take a late join, for the link's lifetime).
                            tracing::debug!(peer = %peer.id, "no urgent connection, the peer is told");
                            next.push_back(super::urgent::failed_frame());
                            self.to_writer = None;
                        }
                    }
                }
            }
            return;
        }
        if !peer.outbox.may_split() {
            return;
        }
        // (The dialler's `want` starts its dial; the acceptor asks for the connection once, unless it joined already
        // or the dialler said it could not be made.)
        if u.want() && u.dials().is_none() && u.open() {
            // Written next, ahead of anything taken (the urgent lanes included).
            next.push_back(super::urgent::wanted_frame());
        }
        if self.conn.is_none() {
            match u.try_writer() {
                Ready::Up(w) => self.conn = Some(w),
                Ready::NotYet => {}
                Ready::Never => {
                    peer.outbox.release_hold();
                    self.hold = Hold::Over;
                    if peer.datagrams.lock().as_ref().is_some_and(|d| d.has_streams()) {
                        tracing::debug!(peer = %peer.id, "no urgent connection, urgent frames take a stream of the link's");
                        self.stream_wanted = true;
                        return;
                    }
                    tracing::debug!(peer = %peer.id, "no urgent connection, urgent frames share the link's");
                    if u.dials().is_some() {
                        // The dialler's dial failed: the acceptor is told (see above).
                        next.push_back(super::urgent::failed_frame());
                    }
                    self.to_writer = None;
                }
            }
        }
        if let Some(w) = self.conn.take() {
            if let Some(tx) = self.to_writer.take() {
                next.push_back(peer.outbox.start_streams());
                let _ = tx.send(w);
                u.set_in_use();
                self.hold = Hold::Over;
            }
        } else if self.to_writer.is_some() && u.dials().is_some() {
            match self.hold {
                Hold::Not => {
                    peer.outbox.hold_urgent();
                    self.hold = Hold::Until(tokio::time::Instant::now() + HOLD_URGENT);
                }
                Hold::Until(t) if tokio::time::Instant::now() >= t => {
                    tracing::debug!(peer = %peer.id, "no urgent connection within {HOLD_URGENT:?} yet");
                    peer.outbox.release_hold();
                    self.hold = Hold::Over;
                }
                _ => {}
            }
        }
    }

    /// A stream link whose urgent lanes may take a stream of its connection (`stream_wanted`), once it carries
    /// priorities or has to tell the peer: opens the stream (QUIC with a stream per priority) and starts streams mode
    /// with its `Sync` in `frames`; a link without one (TLS, or QUIC without) shortens its send queue instead.
    ///
    /// QUIC: the connection's send window plays the part of TCP_NOTSENT_LOWAT (what quinn holds unsent or
    /// unacknowledged), unless the urgent lanes get a stream of their own, which the peer may take: from then on the
    /// main writer takes lane 0 only, after a `Sync` that starts the count of its stream's bytes (behind the frames
    /// taken before). quinn sends the urgent stream's data first, and the send window stays wide, so that writing an
    /// urgent frame never waits for bulk bytes to be acknowledged. (Not a link with an urgent connection slot, TLS or
    /// QUIC, until its connection failed: that one moves its urgent lanes in `turn`.)
    async fn open_stream(&mut self, peer: &Peer, gen: u64, lowat: Option<u32>, frames: &mut VecDeque<Bytes>) {
        if !(self.announce || peer.outbox.prioritised.load(Ordering::Acquire)) {
            return;
        }
        // Not while the rest of a frame begun by a direct write is queued (it goes first, on the main stream: at the
        // next turn). While the stream is being opened, the urgent lanes are held as for an urgent connection being
        // made, which also stops direct writes: one written then, and cut short by a full window, would leave its
        // rest in the top lane, for the urgent stream.
        if !peer.outbox.may_split() {
            return;
        }
        self.stream_wanted = false;
        peer.outbox.hold_urgent();
        let conn = peer.datagrams.lock().clone();
        let urgent = match conn.filter(|d| d.has_streams()) {
            Some(d) => d.open_urgent().await,
            None => None,
        };
        if urgent.is_none() || self.to_writer.is_none() {
            peer.outbox.release_hold();
        }
        match (urgent, self.to_writer.take()) {
            (Some(u), Some(tx)) => {
                frames.push_back(peer.outbox.start_streams());
                let _ = tx.send(u);
                if self.announce {
                    // The stream's first frame, so that the peer sees it (quinn sends nothing for a stream before its
                    // first byte); a `Ping` has no effect but its `Pong`.
                    peer.outbox.push_link_control(Message::Ping(gen).to_bytes());
                }
            }
            _ => {
                if let Some(n) = lowat.filter(|_| !self.announce) {
                    peer.shorten_send_queue(n);
                }
            }
        }
    }
}

/// The writer of a QUIC link's urgent stream (streams mode, see `Outbox::start_streams`): waits for the stream, then
/// writes what `take_urgent` gives until the link fails (it returns why; the main writer handles a graceful end).
async fn urgent_writer(
    peer: &Peer,
    stream: tokio::sync::oneshot::Receiver<Box<dyn AsyncWrite + Unpin + Send>>,
    live: &LinkLive,
) -> LinkError {
    let Ok(mut w) = stream.await else { return std::future::pending().await };
    let mut frames = VecDeque::new();
    let mut batch = BytesMut::with_capacity(super::outbox::TAKE_BUDGET);
    loop {
        let wake = peer.outbox.readable_urgent.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        peer.outbox.take_urgent(&mut frames);
        if frames.is_empty() {
            wake.await;
            continue;
        }
        peer.outbox.writable.notify_waiters();
        let n = frames.len() as u64;
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        if let Err(e) = write_frames(&mut w, &mut frames, &mut batch).await {
            return LinkError::Io(e);
        }
        peer.frames_sent.fetch_add(n, Ordering::Relaxed);
        peer.counters.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        live.lock().on_send(now());
    }
}

/// Writes frames, a burst in one system call. Where the stream takes vectored writes (plain TCP), frames of
/// [`COPY_BELOW`] bytes or more go out from where they are, without a copy: an event frame is shared by every link it
/// is sent on and by local sinks, so copying it into each link's buffer cost one copy per link. Runs of smaller frames
/// are still copied into one segment, which costs less than one vector entry each. Other streams (TLS) get every
/// frame copied into one buffer.
async fn write_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frames: &mut VecDeque<Bytes>,
    batch: &mut BytesMut,
) -> std::io::Result<()> {
    if !wr.is_write_vectored() {
        return write_frames_copied(wr, frames, batch).await;
    }
    coalesce(frames, batch);
    // Bytes of the first segment already written by an earlier, partial write.
    let mut done = 0;
    while !frames.is_empty() {
        let written = {
            let mut iov: smallvec::SmallVec<[IoSlice<'_>; MAX_IOV]> = smallvec::SmallVec::new();
            for f in frames.iter().take(MAX_IOV) {
                iov.push(IoSlice::new(&f[if iov.is_empty() { done } else { 0 }..]));
            }
            wr.write_vectored(&iov).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done = consume(frames, done, written);
    }
    Ok(())
}

/// Replaces each run of frames shorter than [`COPY_BELOW`] by one segment holding their bytes (cut from `batch`,
/// whose memory is used again once the segments are written and dropped). The buffer is as large as the small
/// frames need: a busy link's [`WRITE_BATCH`] once [`BUSY_RUN`] bytes of them wait, else a few KiB (most of a tree's
/// links only ever carry a few small frames at a time).
fn coalesce(frames: &mut VecDeque<Bytes>, batch: &mut BytesMut) {
    if frames.iter().all(|f| f.len() >= COPY_BELOW) {
        return;
    }
    let n = frames.len();
    for i in 0..n {
        let Some(f) = frames.pop_front() else { break };
        if f.len() < COPY_BELOW {
            let room = batch.capacity() - batch.len();
            // Also at a run's start in little room (a quiet time's small buffer), so that a burst is one segment.
            if room < f.len() || (batch.is_empty() && room < BUSY_RUN) {
                // The frames of this turn not copied yet: the first `n - i - 1` of the queue.
                let want = room_for(f.len(), frames.iter().take(n - i - 1).map(Bytes::len));
                if room < want {
                    // Never let the buffer grow under a run: that would move the bytes copied so far. Close the
                    // run and start the next in reclaimed (or new) memory instead.
                    if !batch.is_empty() {
                        frames.push_back(batch.split().freeze());
                    }
                    batch.reserve(want);
                }
            }
            batch.extend_from_slice(&f);
            if batch.len() < WRITE_BATCH {
                continue;
            }
        } else if !batch.is_empty() {
            frames.push_back(batch.split().freeze());
        }
        if f.len() >= COPY_BELOW {
            frames.push_back(f);
        } else {
            frames.push_back(batch.split().freeze());
        }
    }
    if !batch.is_empty() {
        frames.push_back(batch.split().freeze());
    }
}

/// The room to ask for a run of small frames that starts with one of `first` bytes, followed by frames of `rest`
/// bytes: [`WRITE_BATCH`] once [`BUSY_RUN`] bytes of small frames are seen (the scan stops there), else what they
/// need, at least [`MIN_BATCH`].
fn room_for(first: usize, rest: impl Iterator<Item = usize>) -> usize {
    let mut small = first;
    for len in rest {
        if small >= BUSY_RUN {
            break;
        }
        if len < COPY_BELOW {
            small += len;
        }
    }
    if small >= BUSY_RUN {
        WRITE_BATCH
    } else {
        small.max(MIN_BATCH)
    }
}

/// `write_frames` for the shared plain TCP socket (non-blocking writes, waiting for the socket in between).
async fn write_frames_tcp(
    sock: &OwnedWriteHalf,
    frames: &mut VecDeque<Bytes>,
    batch: &mut BytesMut,
) -> std::io::Result<()> {
    coalesce(frames, batch);
    let mut done = 0;
    while !frames.is_empty() {
        let tried = {
            let mut iov: smallvec::SmallVec<[IoSlice<'_>; MAX_IOV]> = smallvec::SmallVec::new();
            for f in frames.iter().take(MAX_IOV) {
                iov.push(IoSlice::new(&f[if iov.is_empty() { done } else { 0 }..]));
            }
            sock.try_write_vectored(&iov)
        };
        match tried {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done = consume(frames, done, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sock.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes the frames a write of `written` bytes completed, `done` bytes of the first having been written before;
/// returns how much of the new first frame is written.
fn consume(frames: &mut VecDeque<Bytes>, mut done: usize, mut written: usize) -> usize {
    while written > 0 {
        let Some(rest) = frames.front().map(|f| f.len() - done) else { break };
        if written < rest {
            return done + written;
        }
        written -= rest;
        done = 0;
        frames.pop_front();
    }
    done
}

/// Writes frames, copying small ones into one buffer so that a burst costs one system call.
async fn write_frames_copied<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frames: &mut VecDeque<Bytes>,
    batch: &mut BytesMut,
) -> std::io::Result<()> {
    while let Some(f) = frames.pop_front() {
        if f.len() >= WRITE_BATCH / 4 {
            if !batch.is_empty() {
                wr.write_all(batch).await?;
                batch.clear();
            }
            wr.write_all(&f).await?;
            continue;
        }
        if batch.len() + f.len() > WRITE_BATCH {
            wr.write_all(batch).await?;
            batch.clear();
        }
        batch.extend_from_slice(&f);
    }
    if !batch.is_empty() {
        wr.write_all(batch).await?;
        batch.clear();
    }
    Ok(())
}

/// Writes `first` and `frame` to the socket without waiting (a submitting thread's direct write); returns how many
/// bytes went out. An error is the writer's (or reader's) to find; what was not written is then queued like any
/// other frame.
pub(super) fn write_now(sock: &OwnedWriteHalf, first: &[u8], frame: &[u8]) -> usize {
    let iov = [IoSlice::new(first), IoSlice::new(frame)];
    sock.try_write_vectored(&iov).unwrap_or(0)
}
#[cfg(test)]
mod tests {
    use super::super::outbox::{Held, SourceGate, Urgency};
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    /// A stream that takes at most `chunk` bytes per write call, as a socket with a nearly full send buffer does.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
        vectored: bool,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.chunk;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            self.calls += 1;
            Poll::Ready(Ok(self.chunk - left))
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes `n` frames of 1 to 1301 bytes (small ones copied, large ones not) through `Trickle`; returns the calls.
    fn check(chunk: usize, vectored: bool, n: u32) -> usize {
        let frames: Vec<Bytes> = (0..n)
            .map(|i| Bytes::from((0..(i * 397 % 1301 + 1)).map(|j| (i + j) as u8).collect::<Vec<u8>>()))
            .collect();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let mut q: VecDeque<Bytes> = frames.into_iter().collect();
        let mut wr = Trickle { out: Vec::new(), chunk, vectored, calls: 0 };
        let mut batch = BytesMut::new();
        futures_util::FutureExt::now_or_never(write_frames(&mut wr, &mut q, &mut batch)).unwrap().unwrap();
        assert!(q.is_empty());
        assert_eq!(wr.out.len(), want.len(), "chunk {chunk}, vectored {vectored}");
        assert!(wr.out == want, "bytes out of order with chunk {chunk}, vectored {vectored}");
        wr.calls
    }

    #[test]
    fn partial_writes_keep_every_byte_in_order() {
        for chunk in [1, 7, 100, 151, 4096, 1 << 20] {
            check(chunk, true, 300);
            check(chunk, false, 300);
        }
    }

    #[test]
    fn a_burst_is_one_write_call() {
        // 40 frames, about 60 % of them large: fewer segments than one vectored write takes.
        assert_eq!(check(1 << 20, true, 40), 1);
        assert_eq!(check(1 << 20, false, 40), 1);
    }

    #[test]
    fn the_copy_buffer_is_as_large_as_the_small_frames_need() {
        // A few small frames (a quiet link's gossip): a few KiB, not WRITE_BATCH.
        let mut q: VecDeque<Bytes> = (0..5u8).map(|i| frame(i, 100)).collect();
        let mut batch = BytesMut::new();
        coalesce(&mut q, &mut batch);
        assert_eq!(q.len(), 1, "one segment");
        assert!(batch.capacity() <= 2 * MIN_BATCH, "{} bytes of room for 500 bytes of frames", batch.capacity());
        // A burst of small frames: the whole burst (up to WRITE_BATCH) in one segment, as before.
        drop(q);
        let mut q: VecDeque<Bytes> = (0..2000u32).map(|i| frame(i as u8, 100)).collect();
        coalesce(&mut q, &mut batch);
        assert_eq!(q.len(), 1, "one segment for 200,000 bytes");
        assert_eq!(q[0].len(), 200_000);
    }

    #[test]
    fn consume_counts_partial_frames() {
        let mut q: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fghi"].into_iter().map(Bytes::from_static).collect();
        assert_eq!(consume(&mut q, 0, 2), 2);
        assert_eq!(q.len(), 3);
        assert_eq!(consume(&mut q, 2, 1), 0);
        assert_eq!(q.len(), 2);
        assert_eq!(consume(&mut q, 0, 3), 1);
        assert_eq!(q.front().map(|f| &f[..]), Some(&b"fghi"[..]));
        assert_eq!(consume(&mut q, 1, 3), 0);
        assert!(q.is_empty());
    }

    /// A connected loopback pair: the write half of one end (shared, as a link's writer holds it) and the other end.
    async fn socket_pair() -> (Arc<OwnedWriteHalf>, tokio::net::tcp::OwnedReadHalf, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (b, _) = listener.accept().await.unwrap();
        let (ra, wa) = a.into_split();
        (Arc::new(wa), ra, b)
    }

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    /// How long the tests' links take to count as quiet: long enough that a slow debug build cannot pass it by
    /// accident between two pushes.
    const QUIET: Duration = Duration::from_millis(200);

    /// Lets the link count as quiet for a direct write.
    fn quiet() {
        std::thread::sleep(QUIET + Duration::from_millis(10));
    }

    fn direct(out: &Outbox) -> u64 {
        out.direct_writes.load(Ordering::Relaxed)
    }

    /// Reads what `want` holds from `b` and checks it arrived as `want`.
    async fn expect(b: &mut TcpStream, want: &[u8]) {
        let mut got = vec![0; want.len()];
        b.read_exact(&mut got).await.unwrap();
        assert!(got == want, "bytes on the wire differ from the frames in their order");
    }

    #[tokio::test]
    async fn direct_writes_never_overtake_queued_frames() {
        let (sock, _ra, mut b) = socket_pair().await;
        let out = Outbox::with_quiet(1 << 30, QUIET);
        out.set_direct(Some(Direct::Tcp(sock.clone())));
        let mut batch = BytesMut::new();
        let mut taken = VecDeque::new();
        let mut wire = Vec::new();
        let mut push = |out: &Outbox, first: Option<Bytes>, f: Bytes| {
            if f[0] != 6 {
                wire.extend_from_slice(first.as_deref().unwrap_or_default());
                wire.extend_from_slice(&f);
            }
            assert!(out.push_event_with(
                first.as_deref().unwrap_or_default(),
                f,
                &mut SourceGate::default(),
                Urgency::plain(&mut Held::default())
            ));
            wire.clone()
        };
        // A quiet link: written at once, with its prefix.
        quiet();
        push(&out, Some(frame(0, 3)), frame(1, 100));
        assert_eq!((direct(&out), out.is_empty()), (1, true));
        // Right after that the link is not quiet: queued for the writer.
        push(&out, None, frame(2, 100));
        assert_eq!((direct(&out), out.is_empty()), (1, false));
        // Quiet again, but a frame is queued: this one must queue behind it.
        quiet();
        push(&out, None, frame(3, 600));
        assert_eq!(direct(&out), 1);
        // The writer took them and is writing: nothing may go around it either.
        out.take_all(&mut taken);
        quiet();
        push(&out, None, frame(4, 100));
        assert_eq!(direct(&out), 1);
        write_frames_tcp(&sock, &mut taken, &mut batch).await.unwrap();
        out.take_all(&mut taken);
        write_frames_tcp(&sock, &mut taken, &mut batch).await.unwrap();
        // The writer comes back to an empty queue: it is idle, and the next event on a quiet link goes directly.
        out.take_all(&mut taken);
        assert!(taken.is_empty());
        quiet();
        let wire = push(&out, None, frame(5, 100));
        assert_eq!((direct(&out), out.is_empty()), (2, true));
        assert!(out.take_sent_direct());
        expect(&mut b, &wire).await;
        // Without a socket (TLS, or the link is gone) everything is queued.
        out.set_direct(None);
        quiet();
        push(&out, None, frame(6, 100));
        assert_eq!((direct(&out), out.is_empty()), (2, false));
    }

    #[tokio::test]
    async fn a_partial_direct_write_leaves_the_rest_queued_in_order() {
        let (sock, _ra, mut b) = socket_pair().await;
        let out = Outbox::with_quiet(1 << 30, QUIET);
        out.set_direct(Some(Direct::Tcp(sock.clone())));
        // Far more than the socket buffers take while nobody reads: the direct write is partial.
        let big: Bytes = (0..32u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        quiet();
        assert!(out.push_event_with(
            &frame(7, 5),
            big.clone(),
            &mut SourceGate::default(),
            Urgency::plain(&mut Held::default())
        ));
        assert_eq!(direct(&out), 0, "the write cannot have been complete");
        assert!(out.push_event_with(
            &[],
            frame(8, 100),
            &mut SourceGate::default(),
            Urgency::plain(&mut Held::default())
        ));
        let mut taken = VecDeque::new();
        out.take_all(&mut taken);
        let rest = taken.front().map_or(0, Bytes::len);
        assert!(rest < big.len() + 5 && rest > 0, "the queue holds the remainder ({rest} bytes)");
        // A turn takes at most TAKE_BUDGET past its first frame: the remainder alone, the next frame at the next turn.
        assert_eq!(taken.len(), 1);
        let mut wire = frame(7, 5).to_vec();
        wire.extend_from_slice(&big);
        wire.extend_from_slice(&frame(8, 100));
        let reader = tokio::spawn(async move {
            expect(&mut b, &wire).await;
        });
        write_frames_tcp(&sock, &mut taken, &mut BytesMut::new()).await.unwrap();
        out.take_all(&mut taken);
        assert_eq!(taken.len(), 1, "the frame queued after the partial write");
        write_frames_tcp(&sock, &mut taken, &mut BytesMut::new()).await.unwrap();
        reader.await.unwrap();
    }

    /// The rest of a partially written frame is finished before any other frame, whatever its lane: an urgent event
    /// or a ping queued after it must not be written into the middle of it (the peer would read garbage and close the
    /// link; seen as links re-established under a bulk transfer once urgent events were in use).
    #[tokio::test]
    async fn nothing_overtakes_the_rest_of_a_partial_direct_write() {
        let (sock, _ra, mut b) = socket_pair().await;
        let out = Outbox::with_quiet(1 << 30, QUIET);
        out.set_direct(Some(Direct::Tcp(sock.clone())));
        let big: Bytes = (0..8u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        quiet();
        let mut bulk = Held::default();
        assert!(out.push_event_with(&frame(7, 5), big.clone(), &mut SourceGate::default(), Urgency::plain(&mut bulk)));
        assert!(out.direct_bytes.load(Ordering::Relaxed) > 0, "part of the frame went out directly");
        let mut urgent = Held::default();
        let top = Urgency { lane: 3, expiry: None, held: &mut urgent, blocks: false };
        assert!(out.push_event_with(&[], frame(8, 100), &mut SourceGate::default(), top));
        out.push_link_control(frame(9, 10));
        // The bulk source's next event, in its own lane, comes after all of it.
        assert!(out.push_event_copied(&[], &frame(10, 50), &mut SourceGate::default(), Urgency::plain(&mut bulk)));
        let mut wire = frame(7, 5).to_vec();
        wire.extend_from_slice(&big);
        wire.extend_from_slice(&frame(8, 100));
        wire.extend_from_slice(&frame(9, 10));
        wire.extend_from_slice(&frame(10, 50));
        let reader = tokio::spawn(async move {
            expect(&mut b, &wire).await;
        });
        let mut taken = VecDeque::new();
        loop {
            out.take_all(&mut taken);
            if taken.is_empty() {
                break;
            }
            write_frames_tcp(&sock, &mut taken, &mut BytesMut::new()).await.unwrap();
        }
        reader.await.unwrap();
    }
}
