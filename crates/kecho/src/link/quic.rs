//! QUIC links: the node's UDP endpoint, dialling and accepting connections, driven here around `quinn-proto` (QUIC's
//! sans-IO core). A link is one QUIC connection per pair of nodes; its frames travel on one bidirectional stream that
//! the dialler opens, so everything above (the kecho handshake with its identity proofs, the reader, the writer,
//! heartbeats, loss accounting) is the same code as over TCP: the stream's halves are a link's `Rd` and `Wr::Stream`.
//!
//! How it is driven (docs/PROTOCOL.md, "QUIC: what bounds latency and throughput"): one task per endpoint owns the
//! receiving side of the UDP socket and every connection's timers. It hands each datagram to its connection's state
//! in that task and wakes the stream reader that became readable: one wake-up per arriving event, as a TCP link's
//! reader is woken by its socket. Whoever writes (the link's writer, a datagram sender) writes into the connection's
//! state under its lock and sends what the connection then has to send at once, from that thread: no wake-up of a
//! driver task on the way out. quinn, which this replaces, runs a driver task per connection besides the endpoint's,
//! and an event crossed both of them each way.
//!
//! Best-effort events (`EventOptions::best_effort`) that fit in a datagram travel as QUIC datagrams instead
//! ([`Datagrams`]; the layout and the receiver's rule are in `datagram.rs`).
//!
//! TLS: with [`crate::NodeBuilder::tls`], QUIC uses the node's certificates and CA exactly as TLS over TCP does
//! (mutual authentication). Without it, QUIC still encrypts (it has no plaintext mode): each node makes a
//! self-signed certificate at start and a dialler accepts any certificate whose handshake signature verifies. That
//! authenticates nothing, as plaintext TCP does not either; node identities are proven by the kecho handshake above
//! it either way.

use std::collections::{HashMap, VecDeque};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{ConnectionHandle, DatagramEvent, Dir, Event, StreamEvent, StreamId, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::sync::Notify;

use super::tls::{Rd, Wr};
use super::LinkError;
use crate::config::TlsSetting;
use crate::tls::TlsError;

/// The ALPN protocol name of kecho links: one stream for everything.
const ALPN: &[u8] = b"kecho/1";
/// The ALPN protocol name of kecho links with a stream per priority: the main stream and, once the link carries
/// prioritised events, an urgent stream each way (docs/PROTOCOL.md, "Priorities and deadlines"). Preferred; a peer
/// that knows only `kecho/1` gets that.
const ALPN_STREAMS: &[u8] = b"kecho/2";

/// The ALPN names offered and accepted, preferred first.
fn alpn() -> Vec<Vec<u8>> {
    vec![ALPN_STREAMS.to_vec(), ALPN.to_vec()]
}
/// The name a dialler asks for when the node has no TLS configuration (nothing checks it).
const ANONYMOUS_NAME: &str = "kecho";

/// The largest UDP payload a link sends or takes (its packet size once path MTU discovery found that the path carries
/// it). Larger ones did no better on loopback (32000: no better than quinn's default, in two runs).
const MAX_PACKET: u16 = 16384;

/// The most one `sendmsg` takes: a UDP datagram's payload, or all segments of one segmentation-offload (GSO) batch.
/// A batch is never built larger: with packets of several KiB (loopback, jumbo frames) a batch of the socket's
/// segment limit would exceed it, the kernel would refuse all of it (`EMSGSIZE`), and MTU discovery would take the
/// lost probes' path for one that does not carry large packets.
const MAX_SEND: usize = 65_507;

/// Connections accepted by the endpoint and not yet taken by the node's accept loop; more are refused.
const MAX_PENDING: usize = 64;

/// Datagrams the endpoint task reads before it lets its connections send (and other tasks run).
const RECV_BATCH: usize = 32;

/// How long a closed endpoint's task keeps answering its connections' last packets before it ends.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The transport parameters of a link: windows sized like the TCP link's queue, and an idle timeout that leaves
/// declaring a peer dead to kecho's heartbeats (it only reaps a connection nobody closed).
fn transport(heartbeat: Duration) -> Arc<quinn_proto::TransportConfig> {
    let mut t = quinn_proto::TransportConfig::default();
    let idle = (heartbeat * 3).max(Duration::from_secs(5));
    t.max_idle_timeout(quinn_proto::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(heartbeat / 3));
    t.stream_receive_window(VarInt::from_u32(8 << 20));
    t.receive_window(VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    // Links open one bidirectional stream and, with priorities, one unidirectional stream each way; the rest are
    // bounded.
    t.max_concurrent_bidi_streams(VarInt::from_u32(16));
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    // The receiver acknowledges once more than 8 ack-eliciting packets (or 1 ms) went unacknowledged, not every 2nd
    // (QUIC's ACK frequency extension, which both ends speak): a bulk transfer of 1 KB events is about one packet per
    // event, and each ACK is a packet to build, encrypt, send, receive, decrypt and process. Measured on loopback,
    // 1 KB events: 0.61-0.93x TCP's rate against 0.32-0.39x with the default (BENCHMARKS.md). 1 ms keeps loss
    // detection and the congestion window's growth prompt.
    let mut ack = quinn_proto::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(8)).max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    // Path MTU discovery searches up to `MAX_PACKET` instead of quinn's 1452: where the path takes larger packets
    // (loopback, jumbo frames) a bulk transfer needs several times fewer packets, and QUIC's cost is per packet.
    // Where it does not, the probes above its MTU are lost (a few packets, once per discovery run) and the link keeps
    // what the path takes. Measured on loopback, 1 KB events: about 0.6x TCP's rate against 0.4x (docs/PROTOCOL.md).
    let mut mtu = quinn_proto::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_PACKET);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// A node's QUIC endpoint: listens and dials on one UDP socket. Cheap to clone; when the last clone is dropped, every
/// connection is closed and the endpoint's task ends.
#[derive(Clone)]
pub(crate) struct QuicEndpoint(Arc<Owner>);

impl std::fmt::Debug for QuicEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicEndpoint").field("addr", &self.0.ep.socket.local_addr().ok()).finish()
    }
}

/// The endpoint's handles' share: closes the endpoint when the last handle goes.
struct Owner {
    ep: Arc<Ep>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.ep.close();
    }
}

/// The endpoint: its socket, `quinn-proto`'s endpoint state and its connections.
struct Ep {
    socket: tokio::net::UdpSocket,
    /// The socket's options and offloads (GSO, GRO, ECN, don't-fragment), as quinn sets them.
    udp: quinn_udp::UdpSocketState,
    state: Mutex<EpState>,
    client: quinn_proto::ClientConfig,
    tls: Option<TlsSetting>,
    /// The test hook of `NodeBuilder::drop_datagrams_every`: every Nth datagram is dropped before it is sent.
    drop_every: u64,
    /// Wakes the endpoint task: a connection's timer moved before the task's, a send found the socket full, the
    /// endpoint closed.
    wake: Notify,
    /// The deadline the endpoint task sleeps to (`None`: none; it is set to "now" while the task computes it, so that
    /// any timer set meanwhile wakes it).
    armed: Mutex<Option<Instant>>,
    /// A connection holds a packet the socket would not take: the task waits for the socket to take more.
    blocked: AtomicBool,
    /// An accepted connection is waiting for the node's accept loop, or the endpoint closed.
    incoming: Notify,
    closed: AtomicBool,
}

/// The endpoint's state under its lock. Lock order: a connection's lock, then the endpoint's, never the other way.
struct EpState {
    proto: quinn_proto::Endpoint,
    conns: HashMap<ConnectionHandle, Arc<Conn>>,
    /// Accepted connections not yet taken by the node's accept loop.
    incoming: VecDeque<Arc<Conn>>,
}

/// One connection: `quinn-proto`'s state under a lock, and what waits on it.
struct Conn {
    ep: Arc<Ep>,
    handle: ConnectionHandle,
    remote: SocketAddr,
    st: Mutex<ConnState>,
    /// Connection-level changes: the handshake completed, the connection was lost, a stream was opened, a datagram
    /// arrived.
    changed: Notify,
    /// The connection's next timer, read by the endpoint task without the connection's lock.
    timeout: Mutex<Option<Instant>>,
    /// Handles held by the link ([`ConnRef`]); the connection closes when the last one goes.
    users: AtomicUsize,
}

struct ConnState {
    proto: quinn_proto::Connection,
    readers: Vec<(StreamId, Waker)>,
    writers: Vec<(StreamId, Waker)>,
    connected: bool,
    /// Why the connection ended, once it did.
    error: Option<quinn_proto::ConnectionError>,
    /// The buffer `poll_transmit` fills.
    out: Vec<u8>,
    /// A packet (or GSO batch, in `out`) the socket would not take: sent before anything else.
    unsent: Option<quinn_proto::Transmit>,
}

impl QuicEndpoint {
    /// Binds the node's UDP socket at `addr` and starts the endpoint's task (within the current tokio runtime).
    pub(crate) fn bind(
        addr: SocketAddr,
        tls: Option<&TlsSetting>,
        heartbeat: Duration,
        drop_every: u64,
    ) -> Result<Self, BindError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (server, client) = match tls {
            Some(tls) => {
                let mut server = (*tls.server).clone();
                let mut client = (*tls.client).clone();
                server.alpn_protocols = alpn();
                client.alpn_protocols = alpn();
                (server, client)
            }
            None => {
                let cert = rcgen::generate_simple_self_signed(vec![ANONYMOUS_NAME.to_owned()])
                    .map_err(|e| BindError::Tls(TlsError::Verifier(format!("self-signed certificate: {e}"))))?;
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
                let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| BindError::Tls(e.into()))?
                    .with_no_client_auth()
                    .with_single_cert(vec![cert.cert.der().clone()], key)
                    .map_err(|e| BindError::Tls(e.into()))?;
                let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| BindError::Tls(e.into()))?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                    .with_no_client_auth();
                server.alpn_protocols = alpn();
                client.alpn_protocols = alpn();
                (server, client)
            }
        };
        let crypto = |e: quinn_proto::crypto::rustls::NoInitialCipherSuite| {
            BindError::Tls(TlsError::Verifier(format!("QUIC needs TLS 1.3 with an AES-GCM suite: {e}")))
        };
        let mut server =
            quinn_proto::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server).map_err(crypto)?));
        server.transport_config(transport(heartbeat));
        let mut client = quinn_proto::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).map_err(crypto)?));
        client.transport_config(transport(heartbeat));
        // The largest packet this endpoint takes (a transport parameter, which bounds what the peer's MTU discovery
        // tries); quinn's default is 1472.
        let mut config = quinn_proto::EndpointConfig::default();
        config.max_udp_payload_size(MAX_PACKET).map_err(|e| BindError::Io(std::io::Error::other(e.to_string())))?;
        let socket = std::net::UdpSocket::bind(addr).map_err(BindError::Io)?;
        let udp = quinn_udp::UdpSocketState::new((&socket).into()).map_err(BindError::Io)?;
        socket.set_nonblocking(true).map_err(BindError::Io)?;
        let socket = tokio::net::UdpSocket::from_std(socket).map_err(BindError::Io)?;
        let proto = quinn_proto::Endpoint::new(Arc::new(config), Some(Arc::new(server)), !udp.may_fragment(), None);
        let ep = Arc::new(Ep {
            socket,
            udp,
            state: Mutex::new(EpState { proto, conns: HashMap::new(), incoming: VecDeque::new() }),
            client,
            tls: tls.cloned(),
            drop_every,
            wake: Notify::new(),
            armed: Mutex::new(None),
            blocked: AtomicBool::new(false),
            incoming: Notify::new(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(run(ep.clone()));
        Ok(QuicEndpoint(Arc::new(Owner { ep })))
    }

    fn ep(&self) -> &Arc<Ep> {
        &self.0.ep
    }

    /// The UDP address it is bound to.
    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.ep().socket.local_addr()
    }

    /// Dials `addr` (`host:port`) and opens the link's stream. Bounded by `timeout` for the QUIC handshake.
    pub(crate) async fn dial(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<(Rd, Wr, SocketAddr, Arc<Datagrams>), LinkError> {
        let fail = |why: String| LinkError::Quic { addr: addr.to_owned(), why };
        let to = tokio::net::lookup_host(addr)
            .await
            .map_err(|source| LinkError::Connect { addr: addr.to_owned(), source })?
            .next()
            .ok_or_else(|| fail("resolves to no address".into()))?;
        let ep = self.ep();
        let name = match &ep.tls {
            Some(tls) => tls.name_for(addr).map_err(|e| fail(format!("cannot start: {e}")))?.to_str().into_owned(),
            None => ANONYMOUS_NAME.to_owned(),
        };
        if ep.closed.load(Ordering::Acquire) {
            return Err(fail("cannot start: the endpoint is closed".into()));
        }
        let (handle, proto) = ep
            .state
            .lock()
            .proto
            .connect(Instant::now(), ep.client.clone(), to, &name)
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        let conn = ConnRef::new(Conn::new(ep, handle, to, proto));
        ep.state.lock().conns.insert(handle, conn.0.clone());
        conn.0.drive(&mut conn.0.st.lock());
        ep.wake.notify_one();
        match tokio::time::timeout(timeout, conn.connected()).await {
            Err(_) => return Err(LinkError::ConnectTimeout { addr: addr.to_owned() }),
            Ok(Err(e)) => return Err(fail(format!("handshake failed: {e}"))),
            Ok(Ok(())) => {}
        }
        let id = conn.0.st.lock().proto.streams().open(Dir::Bi).ok_or_else(|| fail("cannot open a stream".into()))?;
        let (rd, wr) = (RecvStream::new(conn.clone(), id), SendStream::new(conn.clone(), id));
        Ok((Box::new(rd), Wr::Stream(Box::new(wr)), to, Datagrams::new(conn, id, ep.drop_every)))
    }

    /// The next connection a peer made (its handshake under way); `None` once the endpoint is closed.
    pub(crate) async fn accept(&self) -> Option<Incoming> {
        let ep = self.ep();
        loop {
            let wake = ep.incoming.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if ep.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(c) = ep.state.lock().incoming.pop_front() {
                return Some(Incoming(ConnRef::new(c)));
            }
            wake.await;
        }
    }

    /// Closes the endpoint: every connection ends at once.
    pub(crate) fn close(&self) {
        self.ep().close();
    }
}

/// A connection a peer made, as the node's accept loop takes it.
pub(crate) struct Incoming(ConnRef);

impl Incoming {
    /// The peer's UDP address.
    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.0 .0.remote
    }

    /// Closes the connection at once (the node takes no more).
    pub(crate) fn refuse(self) {
        self.0 .0.close(1, b"too many connections");
    }
}

/// Completes an incoming connection and takes the stream its dialler opens; `None` if it fails in time.
pub(crate) async fn accept(
    ep: &QuicEndpoint,
    incoming: Incoming,
    timeout: Duration,
) -> Option<(Rd, Wr, SocketAddr, Arc<Datagrams>)> {
    let conn = incoming.0;
    let remote = conn.0.remote;
    let up = async {
        conn.connected().await.map_err(|e| format!("QUIC handshake failed: {e}"))?;
        let id = conn.accept_stream(Dir::Bi).await.map_err(|e| format!("no link stream: {e}"))?;
        Ok::<_, String>(id)
    };
    match tokio::time::timeout(timeout, up).await {
        Ok(Ok(id)) => {
            let (rd, wr) = (RecvStream::new(conn.clone(), id), SendStream::new(conn.clone(), id));
            Some((Box::new(rd), Wr::Stream(Box::new(wr)), remote, Datagrams::new(conn, id, ep.ep().drop_every)))
        }
        Ok(Err(why)) => {
            tracing::warn!(%remote, "refusing a QUIC connection: {why}");
            None
        }
        Err(_) => {
            tracing::warn!(%remote, "closing a QUIC connection: no link stream within {timeout:?}");
            None
        }
    }
}

impl Ep {
    /// Closes every connection and ends the endpoint's task once they have said so to their peers.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let conns: Vec<Arc<Conn>> = {
            let mut s = self.state.lock();
            s.incoming.clear();
            s.conns.values().cloned().collect()
        };
        for c in conns {
            c.close(0, b"node stopped");
        }
        self.incoming.notify_waiters();
        self.wake.notify_one();
    }

    /// Sends one packet or GSO batch; only `WouldBlock` is an error (others are logged by `quinn-udp` and the packet
    /// counts as lost, which QUIC's loss recovery repairs).
    fn send(&self, t: &quinn_proto::Transmit, contents: &[u8]) -> std::io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t.ecn.and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        self.socket.try_io(Interest::WRITABLE, || self.udp.send((&self.socket).into(), &t))
    }

    /// The most packets one `poll_transmit` may put in a batch whose packets are up to `mtu` bytes.
    fn max_batch(&self, mtu: u16) -> usize {
        (MAX_SEND / usize::from(mtu).max(1)).clamp(1, self.udp.max_gso_segments())
    }

    fn conns(&self) -> Vec<Arc<Conn>> {
        self.state.lock().conns.values().cloned().collect()
    }
}

/// The endpoint's task: reads the socket and hands each datagram to its connection, fires connections' timers, and
/// sends what a full socket held back. Ends once the endpoint is closed and its connections are gone (or after
/// [`CLOSE_LINGER`]).
async fn run(ep: Arc<Ep>) {
    let gro = ep.udp.gro_segments().max(1);
    let mut buf = vec![0u8; usize::from(u16::MAX) * gro];
    let mut resp = Vec::new();
    let mut touched: Vec<Arc<Conn>> = Vec::new();
    let mut closed_at: Option<Instant> = None;
    loop {
        if ep.closed.load(Ordering::Acquire) {
            let at = *closed_at.get_or_insert_with(Instant::now);
            if ep.state.lock().conns.is_empty() || at.elapsed() >= CLOSE_LINGER {
                break;
            }
        }
        let wake = ep.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        // Any timer set from now on wakes the task (see `Conn::drive`) until it knows its next deadline.
        *ep.armed.lock() = Some(Instant::now());
        let conns = ep.conns();
        let mut deadline = conns.iter().filter_map(|c| *c.timeout.lock()).min();
        if closed_at.is_some() {
            let end = closed_at.map(|t| t + CLOSE_LINGER);
            deadline = deadline.min(end).or(end);
        }
        *ep.armed.lock() = deadline;
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let blocked = ep.blocked.load(Ordering::Acquire);
        tokio::select! {
            biased;
            r = ep.socket.readable() => {
                if r.is_err() {
                    break;
                }
                receive(&ep, &mut buf, &mut resp, &mut touched);
            }
            r = ep.socket.writable(), if blocked => {
                if r.is_err() {
                    break;
                }
                ep.blocked.store(false, Ordering::Release);
                for c in &conns {
                    let mut st = c.st.lock();
                    if st.unsent.is_some() {
                        c.drive(&mut st);
                    }
                }
            }
            () = sleep => {
                let now = Instant::now();
                for c in &conns {
                    if c.timeout.lock().is_some_and(|t| t <= now) {
                        let mut st = c.st.lock();
                        st.proto.handle_timeout(now);
                        c.drive(&mut st);
                    }
                }
            }
            () = &mut wake => {}
        }
    }
    // Break the cycle between the endpoint and its connections.
    let conns: Vec<_> = ep.state.lock().conns.drain().map(|(_, c)| c).collect();
    for c in conns {
        let mut st = c.st.lock();
        if st.error.is_none() {
            st.error = Some(quinn_proto::ConnectionError::LocallyClosed);
        }
        c.wake_all(&mut st);
    }
}

/// Reads what the socket holds (up to [`RECV_BATCH`] receive calls) and hands each datagram to its connection; then
/// lets each connection that got some send and wake its readers.
fn receive(ep: &Arc<Ep>, buf: &mut [u8], resp: &mut Vec<u8>, touched: &mut Vec<Arc<Conn>>) {
    for _ in 0..RECV_BATCH {
        let mut meta = [quinn_udp::RecvMeta::default()];
        let r = ep
            .socket
            .try_io(Interest::READABLE, || ep.udp.recv((&ep.socket).into(), &mut [IoSliceMut::new(buf)], &mut meta));
        match r {
            Ok(n) if n > 0 => {
                let m = meta[0];
                let ecn = m.ecn.and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                let stride = m.stride.max(1);
                for seg in buf[..m.len].chunks(stride) {
                    handle(ep, m.addr, m.dst_ip, ecn, BytesMut::from(seg), resp, touched);
                }
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP errors (a peer's port closed) and the like: the connection's timers find out.
            Err(e) => tracing::debug!("QUIC socket: {e}"),
        }
    }
    for c in touched.drain(..) {
        let mut st = c.st.lock();
        c.drive(&mut st);
    }
}

/// Hands one datagram to the endpoint and its connection.
fn handle(
    ep: &Arc<Ep>,
    from: SocketAddr,
    dst: Option<std::net::IpAddr>,
    ecn: Option<quinn_proto::EcnCodepoint>,
    data: BytesMut,
    resp: &mut Vec<u8>,
    touched: &mut Vec<Arc<Conn>>,
) {
    let now = Instant::now();
    resp.clear();
    let mut s = ep.state.lock();
    match s.proto.handle(now, from, dst, ecn, data, resp) {
        Some(DatagramEvent::ConnectionEvent(h, ev)) => {
            let Some(c) = s.conns.get(&h).cloned() else { return };
            drop(s);
            c.st.lock().proto.handle_event(ev);
            if !touched.iter().any(|t| Arc::ptr_eq(t, &c)) {
                touched.push(c);
            }
        }
        Some(DatagramEvent::NewConnection(incoming)) => {
            if ep.closed.load(Ordering::Acquire) || s.incoming.len() >= MAX_PENDING {
                let t = s.proto.refuse(incoming, resp);
                drop(s);
                let _ = ep.send(&t, &resp[..t.size]);
                return;
            }
            match s.proto.accept(incoming, now, resp, None) {
                Ok((h, proto)) => {
                    let c = Conn::new(ep, h, from, proto);
                    s.conns.insert(h, c.clone());
                    s.incoming.push_back(c.clone());
                    drop(s);
                    ep.incoming.notify_one();
                    touched.push(c);
                }
                Err(e) => {
                    drop(s);
                    tracing::debug!(remote = %from, "QUIC connection not accepted: {}", e.cause);
                    if let Some(t) = e.response {
                        let _ = ep.send(&t, &resp[..t.size]);
                    }
                }
            }
        }
        Some(DatagramEvent::Response(t)) => {
            drop(s);
            let _ = ep.send(&t, &resp[..t.size]);
        }
        None => {}
    }
}

impl Conn {
    fn new(ep: &Arc<Ep>, handle: ConnectionHandle, remote: SocketAddr, proto: quinn_proto::Connection) -> Arc<Self> {
        Arc::new(Conn {
            ep: ep.clone(),
            handle,
            remote,
            st: Mutex::new(ConnState {
                proto,
                readers: Vec::new(),
                writers: Vec::new(),
                connected: false,
                error: None,
                out: Vec::new(),
                unsent: None,
            }),
            changed: Notify::new(),
            timeout: Mutex::new(None),
            users: AtomicUsize::new(0),
        })
    }

    /// Runs the connection after a change (a datagram handled, a timer fired, a stream written or read): passes its
    /// endpoint events on, sends what it has to send, wakes what its events concern, and tells the endpoint task if
    /// its next timer moved before the task's.
    fn drive(&self, st: &mut ConnState) {
        let now = Instant::now();
        while let Some(ev) = st.proto.poll_endpoint_events() {
            let drained = ev.is_drained();
            let back = {
                let mut s = self.ep.state.lock();
                let back = s.proto.handle_event(self.handle, ev);
                if drained {
                    s.conns.remove(&self.handle);
                }
                back
            };
            if let Some(back) = back {
                st.proto.handle_event(back);
            }
        }
        self.transmit(st, now);
        while let Some(ev) = st.proto.poll() {
            match ev {
                Event::HandshakeDataReady => {}
                Event::Connected => {
                    st.connected = true;
                    self.changed.notify_waiters();
                }
                Event::ConnectionLost { reason } => {
                    st.error = Some(reason);
                    self.wake_all(st);
                }
                Event::Stream(StreamEvent::Readable { id }) => wake(&mut st.readers, id),
                Event::Stream(StreamEvent::Writable { id }) => wake(&mut st.writers, id),
                Event::Stream(StreamEvent::Stopped { id, .. }) => wake(&mut st.writers, id),
                Event::Stream(StreamEvent::Finished { .. }) => {}
                Event::Stream(StreamEvent::Opened { .. } | StreamEvent::Available { .. })
                | Event::DatagramReceived
                | Event::DatagramsUnblocked => self.changed.notify_waiters(),
            }
        }
        let next = st.proto.poll_timeout();
        let mut slot = self.timeout.lock();
        if *slot != next {
            *slot = next;
            drop(slot);
            if let Some(t) = next {
                if self.ep.armed.lock().is_none_or(|a| t < a) {
                    self.ep.wake.notify_one();
                }
            }
        }
    }

    /// Sends what the connection has to send now, from the calling thread.
    fn transmit(&self, st: &mut ConnState, now: Instant) {
        loop {
            let t = match st.unsent.take() {
                Some(t) => t,
                None => {
                    st.out.clear();
                    let max = self.ep.max_batch(st.proto.current_mtu());
                    match st.proto.poll_transmit(now, max, &mut st.out) {
                        Some(t) => t,
                        None => return,
                    }
                }
            };
            if let Err(e) = self.ep.send(&t, &st.out[..t.size]) {
                debug_assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                st.unsent = Some(t);
                self.ep.blocked.store(true, Ordering::Release);
                self.ep.wake.notify_one();
                return;
            }
        }
    }

    fn wake_all(&self, st: &mut ConnState) {
        for (_, w) in st.readers.drain(..).chain(st.writers.drain(..)) {
            w.wake();
        }
        self.changed.notify_waiters();
    }

    /// Closes the connection (if it is not already): the peer learns it with `code` and `reason`.
    fn close(&self, code: u32, reason: &'static [u8]) {
        let mut st = self.st.lock();
        if st.error.is_none() {
            st.proto.close(Instant::now(), VarInt::from_u32(code), Bytes::from_static(reason));
            st.error = Some(quinn_proto::ConnectionError::LocallyClosed);
        }
        self.drive(&mut st);
        self.wake_all(&mut st);
    }
}

/// Wakes the task waiting on stream `id`, if one is.
fn wake(wakers: &mut Vec<(StreamId, Waker)>, id: StreamId) {
    if let Some(i) = wakers.iter().position(|(s, _)| *s == id) {
        wakers.swap_remove(i).1.wake();
    }
}

/// Registers the task waiting on stream `id`.
fn register(wakers: &mut Vec<(StreamId, Waker)>, id: StreamId, w: &Waker) {
    match wakers.iter_mut().find(|(s, _)| *s == id) {
        Some((_, old)) => old.clone_from(w),
        None => wakers.push((id, w.clone())),
    }
}

fn io_error(e: &quinn_proto::ConnectionError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e.to_string())
}

/// A handle on a connection held by its link (streams, datagram path); the last one closes the connection.
struct ConnRef(Arc<Conn>);

impl ConnRef {
    fn new(c: Arc<Conn>) -> Self {
        c.users.fetch_add(1, Ordering::AcqRel);
        ConnRef(c)
    }

    /// Waits for the handshake to complete.
    async fn connected(&self) -> Result<(), quinn_proto::ConnectionError> {
        loop {
            let n = self.0.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let st = self.0.st.lock();
                if let Some(e) = &st.error {
                    return Err(e.clone());
                }
                if st.connected {
                    return Ok(());
                }
            }
            n.await;
        }
    }

    /// Waits for the peer to open a stream of `dir`.
    async fn accept_stream(&self, dir: Dir) -> Result<StreamId, quinn_proto::ConnectionError> {
        loop {
            let n = self.0.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut st = self.0.st.lock();
                if let Some(id) = st.proto.streams().accept(dir) {
                    // Accepting a stream may raise the peer's stream limit: a frame to send.
                    self.0.drive(&mut st);
                    return Ok(id);
                }
                if let Some(e) = &st.error {
                    return Err(e.clone());
                }
            }
            n.await;
        }
    }
}

impl Clone for ConnRef {
    fn clone(&self) -> Self {
        ConnRef::new(self.0.clone())
    }
}

impl Drop for ConnRef {
    fn drop(&mut self) {
        if self.0.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.close(0, b"");
        }
    }
}

/// The receiving half of a stream, read by the link's reader.
struct RecvStream {
    conn: ConnRef,
    id: StreamId,
    /// The stream ended (read to its end, or reset).
    done: bool,
}

impl RecvStream {
    fn new(conn: ConnRef, id: StreamId) -> Self {
        RecvStream { conn, id, done: false }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.done || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        let c = &this.conn.0;
        let mut st = c.st.lock();
        let mut got = 0;
        let (mut finished, mut reset) = (false, None);
        let mut transmit = false;
        {
            match st.proto.recv_stream(this.id).read(true) {
                Ok(mut chunks) => {
                    loop {
                        if buf.remaining() == 0 {
                            break;
                        }
                        match chunks.next(buf.remaining()) {
                            Ok(Some(chunk)) => {
                                got += chunk.bytes.len();
                                buf.put_slice(&chunk.bytes);
                            }
                            Ok(None) => {
                                finished = true;
                                break;
                            }
                            Err(quinn_proto::ReadError::Blocked) => break,
                            Err(quinn_proto::ReadError::Reset(code)) => {
                                reset = Some(code);
                                break;
                            }
                        }
                    }
                    // Reading opens the peer's flow-control window: a frame to send.
                    transmit = chunks.finalize().should_transmit();
                }
                // Already finished or reset (and forgotten).
                Err(quinn_proto::ReadableError::ClosedStream) => finished = true,
                Err(e @ quinn_proto::ReadableError::IllegalOrderedRead) => {
                    return Poll::Ready(Err(std::io::Error::other(e.to_string())));
                }
            }
        }
        if transmit {
            c.drive(&mut st);
        }
        if finished || reset.is_some() {
            this.done = true;
        }
        if got > 0 || finished {
            return Poll::Ready(Ok(()));
        }
        if let Some(code) = reset {
            let why = format!("the peer reset the stream (code {code})");
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, why)));
        }
        if let Some(e) = &st.error {
            return Poll::Ready(Err(io_error(e)));
        }
        register(&mut st.readers, this.id, cx.waker());
        Poll::Pending
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.conn.0.st.lock();
            if st.error.is_none() && st.proto.recv_stream(self.id).stop(VarInt::from_u32(0)).is_ok() {
                self.conn.0.drive(&mut st);
            }
        }
    }
}

/// The sending half of a stream, written by the link's writer.
struct SendStream {
    conn: ConnRef,
    id: StreamId,
    finished: bool,
}

impl SendStream {
    fn new(conn: ConnRef, id: StreamId) -> Self {
        SendStream { conn, id, finished: false }
    }

    /// Writes as much of `bufs` as the stream takes now, then sends.
    fn write(&mut self, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let c = &self.conn.0;
        let mut st = c.st.lock();
        if let Some(e) = &st.error {
            return Poll::Ready(Err(io_error(e)));
        }
        let mut total = 0;
        let mut fail = None;
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            match st.proto.send_stream(self.id).write(b) {
                Ok(n) => {
                    total += n;
                    if n < b.len() {
                        break;
                    }
                }
                Err(quinn_proto::WriteError::Blocked) => break,
                Err(e) => {
                    fail = Some(e);
                    break;
                }
            }
        }
        if total > 0 {
            c.drive(&mut st);
            return Poll::Ready(Ok(total));
        }
        if let Some(e) = fail {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, e.to_string())));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        register(&mut st.writers, self.id, cx.waker());
        Poll::Pending
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let mut st = self.conn.0.st.lock();
        if st.error.is_none() && st.proto.send_stream(self.id).finish().is_ok() {
            self.conn.0.drive(&mut st);
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.write(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.write(cx, bufs)
    }

    /// No: each write is a chunk of the stream's send buffer, so the link's writer does better to copy its frames into
    /// one large buffer first (one chunk per batch) than to hand over one chunk per frame (measured: one per frame
    /// doubled the CPU per 1 KB event of a bulk transfer).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Everything written was handed to the connection, which sends it as its windows allow.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A link's main stream as the outbox holds it for direct writes: written into the connection's state under its lock
/// and sent at once by the submitting thread, as a plain TCP link's socket is written. Not a handle that keeps the
/// connection open (the link's streams are).
#[derive(Clone)]
pub(crate) struct DirectStream {
    conn: Arc<Conn>,
    id: StreamId,
}

impl DirectStream {
    /// Writes `first` and `frame` as far as the stream takes them now and sends; returns how many bytes it took (the
    /// rest is the writer's to write).
    pub(crate) fn write_now(&self, first: &[u8], frame: &[u8]) -> usize {
        let c = &self.conn;
        let mut st = c.st.lock();
        if st.error.is_some() {
            return 0;
        }
        let mut total = 0;
        for b in [first, frame] {
            if b.is_empty() {
                continue;
            }
            match st.proto.send_stream(self.id).write(b) {
                Ok(n) => {
                    total += n;
                    if n < b.len() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if total > 0 {
            c.drive(&mut st);
        }
        total
    }

    /// The same stream of the same connection.
    pub(crate) fn same(&self, other: &DirectStream) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn) && self.id == other.id
    }
}

/// A QUIC link's connection as the link uses it besides its stream: the datagram path (best-effort events that fit
/// in one go this way, outside the stream), the urgent streams and the connection's send window.
pub(crate) struct Datagrams {
    conn: ConnRef,
    /// The link's main stream.
    main: StreamId,
    /// The peer takes a stream per priority (ALPN `kecho/2`).
    streams: bool,
    /// Test hook: every `drop_every`th datagram is dropped instead of sent (0: none), as a network would lose it.
    drop_every: u64,
    tried: AtomicU64,
}

impl Datagrams {
    fn new(conn: ConnRef, main: StreamId, drop_every: u64) -> Arc<Self> {
        let streams = conn
            .0
            .st
            .lock()
            .proto
            .crypto_session()
            .handshake_data()
            .and_then(|d| d.downcast::<quinn_proto::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .is_some_and(|p| p == ALPN_STREAMS);
        Arc::new(Datagrams { conn, main, streams, drop_every, tried: AtomicU64::new(0) })
    }

    /// The main stream as a submitting thread's direct write takes it (see `Outbox::push_event_with`).
    pub(crate) fn direct(&self) -> super::outbox::Direct {
        super::outbox::Direct::Quic(DirectStream { conn: self.conn.0.clone(), id: self.main })
    }

    /// The peer takes an urgent stream besides the main one (a stream per priority).
    pub(crate) fn has_streams(&self) -> bool {
        self.streams
    }

    /// Opens the urgent stream: unidirectional, sent ahead of the main stream's data (its priority is higher).
    pub(crate) async fn open_urgent(&self) -> Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> {
        let c = &self.conn.0;
        loop {
            let n = c.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut st = c.st.lock();
                if st.error.is_some() {
                    return None;
                }
                if let Some(id) = st.proto.streams().open(Dir::Uni) {
                    st.proto.send_stream(id).set_priority(1).ok()?;
                    return Some(Box::new(SendStream::new(self.conn.clone(), id)));
                }
            }
            // The peer's stream limit is reached: wait for it to raise it.
            n.await;
        }
    }

    /// The peer's urgent stream, once it opens it; `None` if the connection is gone.
    pub(crate) async fn accept_urgent(&self) -> Option<Rd> {
        let id = self.conn.accept_stream(Dir::Uni).await.ok()?;
        Some(Box::new(RecvStream::new(self.conn.clone(), id)))
    }

    /// The largest datagram a best-effort event goes in: what the connection takes now (`None`: the peer takes none).
    /// It follows the path's packet size: about 1.2 KB on a path of 1500-byte packets, up to about 16 KB on loopback
    /// once MTU discovery has run, and it shrinks again if a probe finds large packets lost (the connection then drops
    /// the queued datagrams that no longer fit, which the receiver reports as missed like any lost datagram). No bound
    /// of our own: datagrams of several KiB once broke the loss account, but that was the source sending its first
    /// events to a node as datagrams (`datagram::numbers`), not their size.
    pub(crate) fn max_size(&self) -> Option<usize> {
        self.conn.0.st.lock().proto.datagrams().max_size()
    }

    /// Sends one datagram without waiting (the connection may drop older unsent datagrams to make room, which the
    /// receiver finds as a gap): `Some(true)` if it went, `Some(false)` if the test hook dropped it, `None` if it
    /// cannot be sent at all (too large now, not supported, the connection is gone): the caller then sends the event
    /// on the stream instead.
    pub(crate) fn send(&self, d: Bytes) -> Option<bool> {
        let n = self.tried.fetch_add(1, Ordering::Relaxed) + 1;
        if self.drop_every > 0 && n.is_multiple_of(self.drop_every) {
            return Some(false);
        }
        let c = &self.conn.0;
        let mut st = c.st.lock();
        if st.error.is_some() {
            return None;
        }
        match st.proto.datagrams().send(d, true) {
            Ok(()) => {
                c.drive(&mut st);
                Some(true)
            }
            Err(e) => {
                tracing::debug!("datagram not sent, the stream carries the event: {e}");
                None
            }
        }
    }

    /// Bounds the bytes the connection holds unsent or unacknowledged (its send window; a link with priorities keeps
    /// it short so that its outbox's lanes, not the connection's buffer, decide what waits).
    pub(crate) fn set_send_window(&self, bytes: u64) {
        self.conn.0.st.lock().proto.set_send_window(bytes);
    }

    /// The next datagram that arrived; `None` once the connection is gone.
    pub(crate) async fn recv(&self) -> Option<Bytes> {
        let c = &self.conn.0;
        loop {
            let n = c.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut st = c.st.lock();
                if let Some(d) = st.proto.datagrams().recv() {
                    return Some(d);
                }
                if st.error.is_some() {
                    return None;
                }
            }
            n.await;
        }
    }

    /// The size of the packets the connection sends now (path MTU discovery's result).
    #[cfg(test)]
    fn current_mtu(&self) -> u16 {
        self.conn.0.st.lock().proto.current_mtu()
    }
}

/// Why the QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BindError {
    /// The UDP socket could not be bound.
    #[error("{0}")]
    Io(std::io::Error),
    /// The TLS configuration does not suit QUIC.
    #[error(transparent)]
    Tls(TlsError),
}

/// Accepts any server certificate whose handshake signature verifies: for nodes without a TLS configuration, whose
/// identities the kecho handshake proves instead.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Over loopback (which carries 64 KiB packets) a link's packets grow beyond quinn's default of 1452 bytes once it
    /// carries a bulk transfer: the endpoints take `MAX_PACKET`, MTU discovery searches up to it, and no
    /// segmentation-offload batch is built larger than the kernel takes in one call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_links_use_large_packets() {
        let hb = Duration::from_secs(5);
        let a = QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), None, hb, 0).unwrap();
        let b = QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), None, hb, 0).unwrap();
        let to = b.local_addr().unwrap().to_string();
        let accepting = {
            let b = b.clone();
            tokio::spawn(async move {
                let incoming = b.accept().await.expect("a connection");
                accept(&b, incoming, Duration::from_secs(10)).await.expect("accepted")
            })
        };
        let (_rd, wr, _, conn) = a.dial(&to, Duration::from_secs(10)).await.unwrap();
        let Wr::Stream(mut w) = wr else { panic!("a QUIC link writes to a stream") };
        // The acceptor sees the stream once the dialler writes on it.
        w.write_all(&[0u8; 1024]).await.unwrap();
        let (mut rd, _wr, _, _) = accepting.await.unwrap();
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0usize;
            while let Ok(k) = rd.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k;
            }
            n
        });
        // Long enough for the congestion window to grow to segmentation-offload batches of several large packets:
        // if the kernel refused those, the lost packets would make MTU discovery take the path for one of small
        // packets and drop back to 1200 bytes.
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..512 {
            w.write_all(&chunk).await.unwrap();
        }
        let mtu = conn.current_mtu();
        assert!(mtu > 4096, "after 32 MiB the link's packets are {mtu} bytes");
        w.shutdown().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), reading).await.expect("the stream ends").unwrap();
        assert_eq!(got, 1024 + 512 * 64 * 1024, "every byte arrives, in one stream");
        a.close();
        b.close();
    }
}
