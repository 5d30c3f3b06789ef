//! Node-to-node links over TCP: dialling, the handshake with its duplicate rule, and one reader and one writer task
//! per connection. This is the transport boundary: everything above it sees a [`Peer`] with an outbox.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kecho_proto::codec::{self, CloseCode, Purpose};
use kecho_proto::handshake;
use kecho_proto::liveness::{Liveness, LivenessAction};
use kecho_proto::{ChannelId, LocalId, Message, NodeId, PROTOCOL_VERSION};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use crate::node::{now, NodeInner};
use crate::queue::Outbox;

/// Largest buffer the writer fills before one write call; many small frames go out in one system call.
const WRITE_BATCH: usize = 256 * 1024;
/// Most segments given to one vectored write (Linux takes up to 1024).
const MAX_IOV: usize = 64;
/// Frames this long or longer are written from where they are rather than copied (see `write_frames`).
pub(crate) const COPY_BELOW: usize = 512;
/// How long a connection may take to complete its handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The two halves of a link's byte stream, plain TCP or TLS over it.
type Rd = Box<dyn AsyncRead + Unpin + Send>;
/// The write half: plain TCP is kept apart so that the link's socket can be shared with its outbox for direct
/// writes (see `Outbox::push_event_with`).
enum Wr {
    Tcp(OwnedWriteHalf),
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
}

impl AsyncWrite for Wr {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            Wr::Stream(w) => Pin::new(w).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            Wr::Stream(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Wr::Tcp(w) => w.is_write_vectored(),
            Wr::Stream(w) => w.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_flush(cx),
            Wr::Stream(w) => Pin::new(w).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            Wr::Stream(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// The write half as a link's writer holds it.
enum LinkWr {
    /// Plain TCP, shared with the outbox.
    Tcp(Arc<OwnedWriteHalf>),
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
}

impl LinkWr {
    async fn write(&mut self, frames: &mut VecDeque<Bytes>, batch: &mut BytesMut) -> std::io::Result<()> {
        match self {
            LinkWr::Tcp(sock) => write_frames_tcp(sock, frames, batch).await,
            LinkWr::Stream(w) => write_frames(w, frames, batch).await,
        }
    }

    /// Sends FIN (no more direct writes first).
    async fn shutdown(self, outbox: &Outbox) {
        match self {
            LinkWr::Tcp(sock) => {
                outbox.clear_direct(&sock);
                // The outbox held the only other reference, and only under its lock: this one is now alone.
                if let Ok(mut w) = Arc::try_unwrap(sock) {
                    let _ = w.shutdown().await;
                }
            }
            LinkWr::Stream(mut w) => {
                let _ = w.shutdown().await;
            }
        }
    }
}

/// The first bytes of a kecho `Hello` frame after its length: kind 1 and the magic "KECH" (little-endian).
const HELLO_START: [u8; 5] = [1, 0x48, 0x43, 0x45, 0x4b];

/// Secures a dialled connection if this node uses TLS.
async fn secure_dial(node: &NodeInner, stream: TcpStream, addr: &str) -> Result<(Rd, Wr), String> {
    let Some(tls) = &node.cfg.tls else {
        let (rd, wr) = stream.into_split();
        return Ok((Box::new(rd), Wr::Tcp(wr)));
    };
    let name = tls.name_for(addr)?;
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
        .await
        .map_err(|_| format!("TLS handshake with {addr} timed out"))?
        .map_err(|e| format!("TLS handshake with {addr} failed: {e} (does the peer use TLS with the same CA?)"))?;
    let (rd, wr) = tokio::io::split(s);
    Ok((Box::new(rd), Wr::Stream(Box::new(wr))))
}

/// Secures an accepted connection if this node uses TLS. A plaintext kecho node dialling a TLS node is told why it
/// is refused, in plaintext, rather than left with a failed handshake it cannot explain.
async fn secure_accept(node: &NodeInner, stream: TcpStream, remote: SocketAddr) -> Option<(Rd, Wr)> {
    let Some(tls) = &node.cfg.tls else {
        let (rd, wr) = stream.into_split();
        return Some((Box::new(rd), Wr::Tcp(wr)));
    };
    let mut head = [0u8; 9];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match stream.peek(&mut head).await {
                Ok(n) if n >= head.len() || n == 0 => return n,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => return 0,
            }
        }
    })
    .await;
    match peeked {
        Ok(n) if n == head.len() && head[4..] == HELLO_START => {
            tracing::warn!(%remote, "refusing a plaintext connection: this node requires TLS");
            let mut stream = stream;
            let _ = stream.write_all(&close(CloseCode::Handshake, "this node requires TLS")).await;
            return None;
        }
        Ok(n) if n > 0 => {}
        _ => return None,
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            let (rd, wr) = tokio::io::split(s);
            Some((Box::new(rd), Wr::Stream(Box::new(wr))))
        }
        Ok(Err(e)) => {
            tracing::warn!(%remote, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(%remote, "closing connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// Membership messages (joins, snapshots and their answers) a peer may send per second, and in one burst. Joins and
/// attribute updates are rare and coalesced by well-behaved senders; this bounds what a misbehaving or hostile peer
/// can make this node do.
pub(crate) const MEMBERSHIP_RATE: f64 = 500.0;
pub(crate) const MEMBERSHIP_BURST: f64 = 1000.0;

/// The membership budget of one peer.
struct MembershipGate {
    tokens: f64,
    at: std::time::Instant,
    /// Snapshots that arrived over budget, the newest per channel and node: they are applied later, not lost, since
    /// only the newest counts anyway.
    deferred: Vec<Message>,
}

/// Another node, as this node sees it.
pub(crate) struct Peer {
    pub(crate) id: NodeId,
    pub(crate) addr: Mutex<String>,
    pub(crate) outbox: Outbox,
    link: Mutex<LinkState>,
    /// Events dropped at the full outbox, not reported yet.
    lag: Mutex<Vec<PendingLag>>,
    /// Read by every submit: kept off the cache lines the link's tasks write.
    flags: PeerFlags,
    membership: Mutex<MembershipGate>,
    pub(crate) frames_sent: AtomicU64,
    /// Counters for `Node::link_stats`.
    pub(crate) counters: LinkCounters,
}

/// A link's counters beyond `frames_sent`, read by `Node::link_stats`.
#[derive(Default)]
pub(crate) struct LinkCounters {
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) heartbeat_timeouts: AtomicU64,
}

/// A peer's flags that every submit reads, on a cache line of their own.
#[repr(align(64))]
struct PeerFlags {
    /// `Peer::lag` holds something.
    has_lag: AtomicBool,
    /// Counts the times queued frames were thrown away with a broken link; see `Peer::epoch`.
    epoch: AtomicU64,
}

/// Events of one source, meant for the same sinks, dropped at a full outbox.
struct PendingLag {
    channel: ChannelId,
    source: LocalId,
    sinks: Vec<LocalId>,
    count: u64,
}

enum LinkState {
    Idle,
    Dialing { gen: u64 },
    Up { gen: u64, outbound: bool, tasks: [AbortHandle; 2] },
}

impl Peer {
    pub(crate) fn new(id: NodeId, addr: String, limit: usize) -> Self {
        Peer {
            id,
            addr: Mutex::new(addr),
            outbox: Outbox::new(limit),
            link: Mutex::new(LinkState::Idle),
            lag: Mutex::new(Vec::new()),
            flags: PeerFlags { has_lag: AtomicBool::new(false), epoch: AtomicU64::new(0) },
            membership: Mutex::new(MembershipGate {
                tokens: MEMBERSHIP_BURST,
                at: std::time::Instant::now(),
                deferred: Vec::new(),
            }),
            frames_sent: AtomicU64::new(0),
            counters: LinkCounters::default(),
        }
    }

    /// Queues a control message and makes sure a link is up or coming.
    pub(crate) fn send_control(self: &Arc<Self>, node: &Arc<NodeInner>, msg: &Message) {
        self.outbox.push_control(msg.to_bytes());
        self.ensure_link(node);
    }

    /// Starts dialling if there is no link.
    pub(crate) fn ensure_link(self: &Arc<Self>, node: &Arc<NodeInner>) {
        let mut link = self.link.lock();
        if matches!(*link, LinkState::Idle) {
            let gen = node.next_gen();
            *link = LinkState::Dialing { gen };
            drop(link);
            let peer = self.clone();
            let node = node.clone();
            node.clone().spawn(async move { dial(node, peer, gen).await });
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        matches!(*self.link.lock(), LinkState::Up { .. })
    }

    /// Remembers that `n` events of `source` meant for `sinks` were dropped for this peer because the link was full.
    pub(crate) fn add_lag(&self, channel: ChannelId, source: LocalId, sinks: &[LocalId], n: u64) {
        let mut lag = self.lag.lock();
        match lag.iter_mut().find(|l| l.channel == channel && l.source == source && l.sinks == sinks) {
            Some(l) => l.count += n,
            None => lag.push(PendingLag { channel, source, sinks: sinks.to_vec(), count: n }),
        }
        self.flags.has_lag.store(true, Ordering::Release);
    }

    /// Takes one unit of this peer's membership budget; false if it is spent.
    pub(crate) fn take_membership_token(&self) -> bool {
        let mut g = self.membership.lock();
        let now = std::time::Instant::now();
        g.tokens =
            (g.tokens + now.saturating_duration_since(g.at).as_secs_f64() * MEMBERSHIP_RATE).min(MEMBERSHIP_BURST);
        g.at = now;
        if g.tokens >= 1.0 {
            g.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Keeps a snapshot that arrived over budget, in place of an older one of the same channel and node. Returns true
    /// if nothing was waiting before (the caller then schedules `take_deferred`).
    pub(crate) fn defer_snapshot(&self, msg: Message) -> bool {
        let Message::Snapshot { channel, node, .. } = &msg else { return false };
        let mut g = self.membership.lock();
        let first = g.deferred.is_empty();
        let same =
            |m: &Message| matches!(m, Message::Snapshot { channel: c, node: n, .. } if c == channel && n == node);
        match g.deferred.iter_mut().find(|m| same(m)) {
            Some(slot) => *slot = msg,
            None => g.deferred.push(msg),
        }
        first
    }

    /// The deferred snapshots, to apply now.
    pub(crate) fn take_deferred(&self) -> Vec<Message> {
        std::mem::take(&mut self.membership.lock().deferred)
    }

    /// Changes whenever frames queued for this peer were thrown away because its link broke: whatever a source told
    /// the peer before may not have arrived.
    pub(crate) fn epoch(&self) -> u64 {
        self.flags.epoch.load(Ordering::Acquire)
    }

    /// Sends pending lag notices, if any, ahead of the next event.
    pub(crate) fn flush_lag(&self) {
        if !self.flags.has_lag.load(Ordering::Acquire) {
            return;
        }
        let pending = std::mem::take(&mut *self.lag.lock());
        self.flags.has_lag.store(false, Ordering::Release);
        for PendingLag { channel, source, sinks, count } in pending {
            self.outbox.push_control(Message::Lagged { channel, source, count, sinks }.to_bytes());
        }
    }

    /// Drops the link without telling anyone (used by `Node::kill` to simulate a crash).
    pub(crate) fn abort(&self) {
        let mut link = self.link.lock();
        if let LinkState::Up { tasks, .. } = &*link {
            for t in tasks {
                t.abort();
            }
        }
        *link = LinkState::Idle;
        // The aborted writer's socket must close with it, not live on for direct writes.
        self.outbox.set_direct(None);
    }

    /// The link with generation `gen` ended. Returns true if it was the current one (the peer is then lost and
    /// whatever was queued for it is dropped).
    fn link_down(&self, gen: u64) -> bool {
        self.link_end(gen, true)
    }

    /// Ends the link with generation `gen`; keeps the queue if `clear` is false (the peer's own connection is coming).
    fn link_end(&self, gen: u64, clear: bool) -> bool {
        let mut link = self.link.lock();
        let current = match &*link {
            LinkState::Up { gen: g, .. } | LinkState::Dialing { gen: g } => *g == gen,
            LinkState::Idle => false,
        };
        if current {
            if let LinkState::Up { tasks, .. } = &*link {
                // Stop the other half of the link too (aborting the caller itself is harmless: it has no await left).
                for t in tasks {
                    t.abort();
                }
            }
            *link = LinkState::Idle;
            drop(link);
            self.outbox.set_direct(None);
            if clear {
                self.outbox.clear();
                self.flags.epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
        current
    }
}

async fn dial(node: Arc<NodeInner>, peer: Arc<Peer>, gen: u64) {
    let addr = peer.addr.lock().clone();
    match dial_inner(&node, &peer, gen, &addr).await {
        Ok(DialOutcome::Up) => {}
        Ok(DialOutcome::Superseded) => {}
        Ok(DialOutcome::Duplicate) => {
            // The peer's own connection to us wins; it is on its way, and what we queued will go over it. If it never
            // comes (its dial failed), try again.
            if peer.link_end(gen, false) {
                let node2 = node.clone();
                node.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if !peer.is_up() && !peer.outbox.is_empty() && node2.is_peer_known(peer.id) {
                        peer.ensure_link(&node2);
                    }
                });
            }
        }
        Err(why) => {
            // Failures that need an operator (TLS, versions, refusals by the peer) are warnings, once each while they
            // repeat. A failed connect is not: it is what dialling a node that has just left looks like (a normal
            // shutdown), and an open that times out names the last link failure anyway.
            let repeated = node.last_link_error.lock().replace(why.clone()).as_deref() == Some(why.as_str());
            let connect_failed = why.starts_with("connect to ");
            if !repeated
                && !connect_failed
                && (why.starts_with("TLS") || why.contains("refused") || why.contains("mismatch"))
            {
                tracing::warn!(peer = %peer.id, %addr, "dial failed: {why}");
            } else {
                tracing::debug!(peer = %peer.id, %addr, "dial failed: {why}");
            }
            if peer.link_down(gen) {
                node.peer_lost(peer.id);
            }
        }
    }
}

enum DialOutcome {
    Up,
    Superseded,
    Duplicate,
}

async fn dial_inner(node: &Arc<NodeInner>, peer: &Arc<Peer>, gen: u64, addr: &str) -> Result<DialOutcome, String> {
    let connect = TcpStream::connect(addr);
    let stream = tokio::time::timeout(node.cfg.connect_timeout, connect)
        .await
        .map_err(|_| format!("connect to {addr} timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let remote = stream.peer_addr().ok();
    let (mut rd, mut wr) = secure_dial(node, stream, addr).await?;
    let my_addr = node.advertised.to_string();
    let mut hello = BytesMut::new();
    Message::Hello { version: PROTOCOL_VERSION, node: node.id, addr: my_addr.clone(), purpose: Purpose::Node }
        .encode(&mut hello);
    node.identity.hello_proof(peer.id, &my_addr).encode(&mut hello);
    wr.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(4096);
    let answer = async {
        let first = read_frame(&mut rd, &mut buf, node.cfg.max_frame).await?;
        match handshake::dial_answer(&first, peer.id, addr) {
            handshake::Dial::Up => {}
            handshake::Dial::Duplicate => return Ok(DialOutcome::Duplicate),
            handshake::Dial::Failed(why) => return Err(why.to_string()),
        }
        // The peer proves it is the node we meant to reach.
        let proof = read_frame(&mut rd, &mut buf, node.cfg.max_frame).await?;
        handshake::check_ack_proof(&proof, peer.id, node.id).map_err(|e| e.to_string())?;
        Ok(DialOutcome::Up)
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, answer).await.map_err(|_| "handshake timed out".to_owned())?? {
        DialOutcome::Up => {}
        other => return Ok(other),
    }
    let mut link = peer.link.lock();
    if !matches!(*link, LinkState::Dialing { gen: g } if g == gen) {
        // An inbound connection from the peer won meanwhile.
        return Ok(DialOutcome::Superseded);
    }
    let tasks = start_link(node, peer, gen, (rd, wr), remote, buf);
    *link = LinkState::Up { gen, outbound: true, tasks };
    Ok(DialOutcome::Up)
}

/// Serves one inbound connection: handshake, duplicate rule, then the link tasks.
pub(crate) async fn accept(node: Arc<NodeInner>, stream: TcpStream, remote: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Some((mut rd, mut wr)) = secure_accept(&node, stream, remote).await else { return };
    let mut buf = BytesMut::with_capacity(4096);
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut buf, node.cfg.max_frame)).await {
        Ok(Ok(m)) => m,
        Ok(Err(why)) => {
            tracing::warn!(%remote, "closing connection before handshake: {why}");
            let _ = wr.write_all(&close(CloseCode::Malformed, &why)).await;
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "closing connection: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let (their, their_addr) = match handshake::accept_first(&first, node.id) {
        handshake::Accept::Node { peer, addr } => (peer, addr),
        handshake::Accept::Refuse { code, reason } => {
            tracing::warn!(%remote, "refusing connection: {reason}");
            let _ = wr.write_all(&close(code, &reason)).await;
            return;
        }
    };
    // The dialler proves it is the node it claims to be, before it is let near any channel.
    let proof = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut buf, node.cfg.max_frame)).await;
    let checked = match proof {
        Ok(Ok(p)) => handshake::check_hello_proof(&p, their, &their_addr, node.id).map_err(|e| e.to_string()),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!("no identity proof within {HANDSHAKE_TIMEOUT:?}")),
    };
    if let Err(why) = checked {
        tracing::warn!(%remote, "refusing connection: {why}");
        let _ = wr.write_all(&close(CloseCode::Handshake, &why)).await;
        return;
    }
    let peer = node.peer(their, &their_addr);
    let mut ack = BytesMut::new();
    Message::HelloAck { version: PROTOCOL_VERSION, node: node.id }.encode(&mut ack);
    node.identity.ack_proof(their).encode(&mut ack);
    let ack = ack.freeze();
    // Decide under the lock, write (if refused) after it: the guard must not live across an await.
    let refused = {
        let mut link = peer.link.lock();
        let refuse = match &*link {
            // A connection dialled by the lower node id wins over one dialled by the higher.
            LinkState::Up { outbound: true, .. } | LinkState::Dialing { .. } => node.id < their,
            // The peer dialled again: it believes the old link dead. The new one replaces it.
            LinkState::Up { outbound: false, .. } | LinkState::Idle => false,
        };
        if refuse {
            Some((rd, wr))
        } else {
            if let LinkState::Up { tasks, .. } = &*link {
                for t in tasks {
                    t.abort();
                }
            }
            let gen = node.next_gen();
            // The ack goes first through the outbox, so nothing can overtake it.
            peer.outbox.push_front_control(ack);
            let tasks = start_link(&node, &peer, gen, (rd, wr), Some(remote), buf);
            *link = LinkState::Up { gen, outbound: false, tasks };
            None
        }
    };
    if let Some((_rd, mut wr)) = refused {
        let _ = wr.write_all(&close(CloseCode::Duplicate, "a connection between these nodes exists")).await;
    }
}

/// Heartbeat state shared by a link's reader and writer.
struct LinkLive {
    live: Mutex<Liveness>,
    /// The reader is waiting for room in a Block sink and so not reading: silence then says nothing about the peer.
    reader_waiting: AtomicBool,
}

impl LinkLive {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Liveness> {
        self.live.lock()
    }
}

fn close(code: CloseCode, reason: &str) -> Bytes {
    Message::Close { code, reason: reason.to_owned() }.to_bytes()
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut, max: usize) -> Result<Message, String> {
    loop {
        match codec::decode_frame(buf, max) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        buf.reserve(4096);
        match rd.read_buf(buf).await {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Starts the reader and writer of an established link. Generic over the byte stream: this and the dial/accept
/// functions above are all a new transport (QUIC streams, a same-host pipe) has to provide (its write half as
/// `Wr::Stream`).
fn start_link<R>(
    node: &Arc<NodeInner>,
    peer: &Arc<Peer>,
    gen: u64,
    (rd, wr): (R, Wr),
    remote: Option<SocketAddr>,
    buf: BytesMut,
) -> [AbortHandle; 2]
where
    R: AsyncRead + Unpin + Send + 'static,
{
    peer.counters.connects.fetch_add(1, Ordering::Relaxed);
    let live = Arc::new(LinkLive {
        live: Mutex::new(Liveness::new(now(), node.cfg.heartbeat_timeout)),
        reader_waiting: AtomicBool::new(false),
    });
    let w = node.spawn(writer(node.clone(), peer.clone(), gen, wr, live.clone()));
    let r = node.spawn(reader(node.clone(), peer.clone(), gen, rd, buf, live, remote));
    tracing::debug!(peer = %peer.id, ?remote, "link up");
    [w, r]
}

async fn writer(node: Arc<NodeInner>, peer: Arc<Peer>, gen: u64, wr: Wr, live: Arc<LinkLive>) {
    let mut wr = match wr {
        Wr::Tcp(w) => {
            let sock = Arc::new(w);
            peer.outbox.set_direct(Some(sock.clone()));
            LinkWr::Tcp(sock)
        }
        Wr::Stream(w) => LinkWr::Stream(w),
    };
    let mut frames = VecDeque::new();
    let mut batch = BytesMut::with_capacity(WRITE_BATCH);
    let why = loop {
        let wake = peer.outbox.readable.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        // Events dropped while the outbox was full are reported now that it has room, even if no event follows.
        peer.flush_lag();
        peer.outbox.take_all(&mut frames);
        if frames.is_empty() {
            if node.closing.load(Ordering::Acquire) {
                // Graceful shutdown: everything queued is written. Send FIN and let the reader see the peer's EOF, so
                // that no unread data makes the kernel reset the connection and discard what we sent.
                wr.shutdown(&peer.outbox).await;
                tracing::debug!(peer = %peer.id, "writer finished for shutdown");
                return;
            }
            let deadline = live.lock().deadline();
            tokio::select! {
                _ = &mut wake => continue,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if live.reader_waiting.load(Ordering::Acquire) {
                        live.lock().on_receive(now());
                    }
                    if peer.outbox.take_sent_direct() {
                        live.lock().on_send(now());
                    }
                    let action = live.lock().poll(now());
                    match action {
                        LivenessAction::Wait => continue,
                        // Through the outbox, so that no direct write can interleave with it.
                        LivenessAction::SendPing => {
                            peer.outbox.push_control(Message::Ping(gen).to_bytes());
                            continue;
                        }
                        LivenessAction::Dead => {
                            peer.counters.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                            break "heartbeat timeout".to_owned();
                        }
                    }
                }
            }
        }
        peer.outbox.writable.notify_waiters();
        let n = frames.len() as u64;
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        // A write blocks while the peer's receive window is full, which is exactly what a cut-off or frozen peer
        // causes: keep watching the heartbeat deadline meanwhile, or a busy link to a dead peer would never be
        // declared dead.
        let write = wr.write(&mut frames, &mut batch);
        tokio::pin!(write);
        let written = loop {
            let deadline = live.lock().deadline();
            tokio::select! {
                r = &mut write => break r.map_err(|e| e.to_string()),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if live.reader_waiting.load(Ordering::Acquire) {
                        live.lock().on_receive(now());
                    }
                    // Pings are not sent from here: the write in progress shows the peer we are alive once it
                    // drains, and a ping could not overtake it anyway.
                    if live.lock().poll(now()) == LivenessAction::Dead {
                        peer.counters.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                        break Err("heartbeat timeout while writing".to_owned());
                    }
                }
            }
        };
        if let Err(e) = written {
            break e;
        }
        peer.frames_sent.fetch_add(n, Ordering::Relaxed);
        peer.counters.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        live.lock().on_send(now());
    };
    tracing::debug!(peer = %peer.id, "writer stopped: {why}");
    wr.shutdown(&peer.outbox).await;
    if peer.link_down(gen) {
        tracing::info!(peer = %peer.id, "link lost: {why}");
        node.peer_lost(peer.id);
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
/// whose memory is used again once the segments are written and dropped).
fn coalesce(frames: &mut VecDeque<Bytes>, batch: &mut BytesMut) {
    if frames.iter().all(|f| f.len() >= COPY_BELOW) {
        return;
    }
    for _ in 0..frames.len() {
        let Some(f) = frames.pop_front() else { break };
        if f.len() < COPY_BELOW {
            if batch.capacity() - batch.len() < f.len() {
                // Never let the buffer grow under a run: that would move the bytes copied so far. Close the run and
                // start the next in reclaimed (or new) memory instead.
                if !batch.is_empty() {
                    frames.push_back(batch.split().freeze());
                }
                batch.reserve(WRITE_BATCH);
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

async fn reader<R: AsyncRead + Unpin>(
    node: Arc<NodeInner>,
    peer: Arc<Peer>,
    gen: u64,
    rd: R,
    buf: BytesMut,
    live: Arc<LinkLive>,
    remote: Option<SocketAddr>,
) {
    let later = std::cell::RefCell::new(Vec::new());
    crate::queue::WAKE_LATER.scope(later, read_loop(node, peer, gen, rd, buf, live, remote)).await
}

async fn read_loop<R: AsyncRead + Unpin>(
    node: Arc<NodeInner>,
    peer: Arc<Peer>,
    gen: u64,
    mut rd: R,
    mut buf: BytesMut,
    live: Arc<LinkLive>,
    remote: Option<SocketAddr>,
) {
    let mut targets = None;
    let mut names = codec::TypeNames::default();
    // Consecutive events of one channel, delivered together (see `ChannelInner::deliver_batch`).
    let mut events = crate::channel::Batch::default();
    let mut events_on = ChannelId(0);
    let mut busy = false;
    // The buffer read into before `buf`: its events may still be queued at sinks, and once they are gone its memory
    // serves again (see `more_room`).
    let mut spare = BytesMut::new();
    let why: String = 'outer: loop {
        loop {
            match codec::split_frame(&mut buf, node.cfg.max_frame) {
                Ok(Some(frame)) if codec::is_event(&frame) => match codec::decode_event_with(frame, &mut names) {
                    Ok(e) => {
                        let chosen = match crate::node::take_targets(&mut targets, e.channel) {
                            Ok(c) => c,
                            Err(why) => {
                                peer.outbox.push_control(close(CloseCode::Handshake, &why));
                                break 'outer why;
                            }
                        };
                        if e.channel != events_on || events.events.len() >= MAX_BATCH {
                            deliver(&node, &peer, &live, events_on, &mut events).await;
                            events_on = e.channel;
                        }
                        events.events.push((e, chosen));
                    }
                    Err(e) => {
                        tracing::warn!(?remote, peer = %peer.id, "malformed frame, closing link: {e}");
                        peer.outbox.push_control(close(CloseCode::Malformed, &e.to_string()));
                        break 'outer e.to_string();
                    }
                },
                Ok(Some(frame)) => match codec::decode_body_with(frame, &mut names) {
                    Ok(msg) => {
                        deliver(&node, &peer, &live, events_on, &mut events).await;
                        let was_close = matches!(msg, Message::Close { .. });
                        live.reader_waiting.store(true, Ordering::Release);
                        let handled = node.handle_frame(&peer, msg, &mut targets).await;
                        live.reader_waiting.store(false, Ordering::Release);
                        if let Err(why) = handled {
                            // A peer that closed the link needs no Close back.
                            if !was_close {
                                peer.outbox.push_control(close(CloseCode::Handshake, &why));
                            }
                            break 'outer why;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(?remote, peer = %peer.id, "malformed frame, closing link: {e}");
                        peer.outbox.push_control(close(CloseCode::Malformed, &e.to_string()));
                        break 'outer e.to_string();
                    }
                },
                Ok(None) => {
                    deliver(&node, &peer, &live, events_on, &mut events).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(?remote, peer = %peer.id, "bad frame, closing link: {e}");
                    peer.outbox.push_control(close(CloseCode::Malformed, &e.to_string()));
                    break 'outer e.to_string();
                }
            }
        }
        // Every complete frame read so far is handled: wake the sinks that got events, once each.
        crate::queue::flush_deferred_wakes();
        // Reads of up to READ_SMALL on a quiet link; a link whose last read filled the buffer is busy, and larger
        // reads then cost fewer system calls and wake-ups per event.
        let want = if busy { READ_BIG } else { READ_SMALL };
        if buf.capacity() - buf.len() < want / 4 {
            more_room(&mut buf, &mut spare, want);
        }
        let free = buf.capacity() - buf.len();
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "closed by peer".to_owned(),
            Ok(n) => {
                peer.counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                busy = n == free;
                live.lock().on_receive(now());
            }
            // (A reader that was held up by a Block sink resumes here; the data it now reads proves the peer alive.)
            Err(e) => break e.to_string(),
        }
    };
    // Events read before whatever stopped the reader are delivered.
    deliver(&node, &peer, &live, events_on, &mut events).await;
    crate::queue::flush_deferred_wakes();
    tracing::debug!(peer = %peer.id, "reader stopped: {why}");
    // Give the writer a moment to send a Close we queued, then drop the link.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if peer.link_down(gen) {
        tracing::info!(peer = %peer.id, "link lost: {why}");
        node.peer_lost(peer.id);
    }
}

/// How much a link's reader reads at a time: on a quiet link, and on a busy one (its last read filled the buffer).
const READ_SMALL: usize = 64 * 1024;
const READ_BIG: usize = 256 * 1024;

/// Gives a reader's buffer at least `want` bytes of free room, keeping the bytes it holds (the start of a frame not
/// read whole yet). Events hold on to the memory they were read into, so a buffer can rarely grow in place; rather than
/// a new allocation each time (whose pages the kernel must fault in afresh), the previous buffer is used again once
/// nothing refers to it any more.
fn more_room(buf: &mut BytesMut, spare: &mut BytesMut, want: usize) {
    if buf.try_reclaim(want) {
        return;
    }
    let mut next = if spare.try_reclaim(want + buf.len()) {
        std::mem::take(spare)
    } else {
        BytesMut::with_capacity(want.max(2 * buf.len()))
    };
    next.extend_from_slice(buf);
    *spare = std::mem::replace(buf, next);
    spare.clear();
}

/// At most this many events are delivered as one batch.
const MAX_BATCH: usize = 256;

/// Delivers the events gathered so far, if any.
async fn deliver(
    node: &NodeInner,
    peer: &Peer,
    live: &LinkLive,
    channel: ChannelId,
    batch: &mut crate::channel::Batch,
) {
    if batch.events.is_empty() {
        return;
    }
    live.reader_waiting.store(true, Ordering::Release);
    node.deliver_events(peer, channel, batch).await;
    live.reader_waiting.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::SourceGate;

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
        out.set_direct(Some(sock.clone()));
        let mut batch = BytesMut::new();
        let mut taken = VecDeque::new();
        let mut wire = Vec::new();
        let mut push = |out: &Outbox, first: Option<Bytes>, f: Bytes| {
            if f[0] != 6 {
                wire.extend_from_slice(first.as_deref().unwrap_or_default());
                wire.extend_from_slice(&f);
            }
            assert!(out.push_event_with(first.as_deref().unwrap_or_default(), f, &mut SourceGate::default()));
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
        out.set_direct(Some(sock.clone()));
        // Far more than the socket buffers take while nobody reads: the direct write is partial.
        let big: Bytes = (0..32u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        quiet();
        assert!(out.push_event_with(&frame(7, 5), big.clone(), &mut SourceGate::default()));
        assert_eq!(direct(&out), 0, "the write cannot have been complete");
        assert!(out.push_event_with(&[], frame(8, 100), &mut SourceGate::default()));
        let mut taken = VecDeque::new();
        out.take_all(&mut taken);
        let rest = taken.front().map_or(0, Bytes::len);
        assert!(rest < big.len() + 5 && rest > 0, "the queue holds the remainder ({rest} bytes)");
        assert_eq!(taken.len(), 2);
        let mut wire = frame(7, 5).to_vec();
        wire.extend_from_slice(&big);
        wire.extend_from_slice(&frame(8, 100));
        let reader = tokio::spawn(async move {
            expect(&mut b, &wire).await;
        });
        write_frames_tcp(&sock, &mut taken, &mut BytesMut::new()).await.unwrap();
        reader.await.unwrap();
    }
}
