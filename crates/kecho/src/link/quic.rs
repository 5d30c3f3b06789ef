//! QUIC links (quinn): the node's UDP endpoint, dialling and accepting connections. A link is one QUIC connection per
//! pair of nodes; its frames travel on one bidirectional stream that the dialler opens, so everything above (the
//! kecho handshake with its identity proofs, the reader, the writer, heartbeats, loss accounting) is the same code as
//! over TCP: the stream's halves are a link's `Rd` and `Wr::Quic` (shared with the outbox for direct writes, as a
//! plain TCP link's socket is: [`QuicSend`]).
//!
//! Best-effort events (`EventOptions::best_effort`) that fit in a datagram travel as QUIC datagrams instead
//! ([`Datagrams`]; the layout and the receiver's rule are in `datagram.rs`).
//!
//! TLS: with [`crate::NodeBuilder::tls`], QUIC uses the node's certificates and CA exactly as TLS over TCP does
//! (mutual authentication). Without it, QUIC still encrypts (it has no plaintext mode): each node makes a
//! self-signed certificate at start and a dialler accepts any certificate whose handshake signature verifies. That
//! authenticates nothing, as plaintext TCP does not either; node identities are proven by the kecho handshake above
//! it either way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

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

/// A node's QUIC endpoint: listens and dials on one UDP socket. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct QuicEndpoint {
    pub(crate) endpoint: quinn::Endpoint,
    tls: Option<TlsSetting>,
    /// The test hook of `NodeBuilder::drop_datagrams_every`: every Nth datagram is dropped before it is sent.
    drop_every: u64,
}

/// The largest UDP payload a link sends or takes (its packet size once path MTU discovery found that the path carries
/// it). Larger ones did no better on loopback (32000: no better than quinn's default, in two runs).
const MAX_PACKET: u16 = 16384;

/// The transport parameters of a link: windows sized like the TCP link's queue, and an idle timeout that leaves
/// declaring a peer dead to kecho's heartbeats (it only reaps a connection nobody closed).
fn transport(heartbeat: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let idle = (heartbeat * 3).max(Duration::from_secs(5));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(heartbeat / 3));
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    // Links open one bidirectional stream and, with priorities, one unidirectional stream each way; the rest are
    // bounded.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(16));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    // The receiver acknowledges once more than 8 ack-eliciting packets (or 1 ms) went unacknowledged, not every 2nd
    // (QUIC's ACK frequency extension, which both ends speak): a bulk transfer of 1 KB events is about one packet per
    // event, and each ACK is a packet to build, encrypt, send, receive, decrypt and process. Measured on loopback,
    // 1 KB events: 0.61-0.93x TCP's rate against 0.32-0.39x with the default (BENCHMARKS.md). 1 ms keeps loss
    // detection and the congestion window's growth prompt.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(8)).max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    // Path MTU discovery searches up to `MAX_PACKET` instead of quinn's 1452: where the path takes larger packets
    // (loopback, jumbo frames) a bulk transfer needs several times fewer packets, and QUIC's cost is per packet.
    // Where it does not, the probes above its MTU are lost (a few packets, once per discovery run) and the link keeps
    // what the path takes. Measured on loopback, 1 KB events: about 0.6x TCP's rate against 0.4x (docs/PROTOCOL.md).
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_PACKET);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

impl QuicEndpoint {
    /// Binds the node's UDP socket at `addr`.
    pub(crate) fn bind(
        addr: SocketAddr,
        tls: Option<&TlsSetting>,
        heartbeat: Duration,
        drop_every: u64,
    ) -> Result<Self, BindError> {
        Self::bind_with(addr, tls, heartbeat, drop_every, false)
    }

    /// Binds the node's second UDP socket, for the urgent connections of its QUIC links, at `addr` (the node's
    /// address with port 0): its packets are marked DSCP EF ([`MarkedSocket`]), so that a queueing discipline can
    /// serve them before the bulk of the link's main connection, and each urgent connection has a congestion
    /// window of its own.
    pub(crate) fn bind_urgent(
        addr: SocketAddr,
        tls: Option<&TlsSetting>,
        heartbeat: Duration,
    ) -> Result<Self, BindError> {
        Self::bind_with(addr, tls, heartbeat, 0, true)
    }

    fn bind_with(
        addr: SocketAddr,
        tls: Option<&TlsSetting>,
        heartbeat: Duration,
        drop_every: u64,
        urgent: bool,
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
        let crypto = |e: quinn::crypto::rustls::NoInitialCipherSuite| {
            BindError::Tls(TlsError::Verifier(format!("QUIC needs TLS 1.3 with an AES-GCM suite: {e}")))
        };
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server).map_err(crypto)?));
        server.transport_config(transport(heartbeat));
        let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).map_err(crypto)?));
        client.transport_config(transport(heartbeat));
        // The largest packet this endpoint takes (a transport parameter, which bounds what the peer's MTU discovery
        // tries); quinn's default is 1472.
        let mut config = quinn::EndpointConfig::default();
        config.max_udp_payload_size(MAX_PACKET).map_err(|e| BindError::Io(std::io::Error::other(e.to_string())))?;
        let socket = std::net::UdpSocket::bind(addr).map_err(BindError::Io)?;
        let runtime =
            quinn::default_runtime().ok_or_else(|| BindError::Io(std::io::Error::other("no async runtime found")))?;
        let socket: Arc<dyn quinn::AsyncUdpSocket> = if urgent {
            Arc::new(MarkedSocket::new(socket).map_err(BindError::Io)?)
        } else {
            Arc::new(SplitGso(runtime.wrap_udp_socket(socket).map_err(BindError::Io)?))
        };
        let mut endpoint =
            quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket, runtime).map_err(BindError::Io)?;
        endpoint.set_default_client_config(client);
        Ok(QuicEndpoint { endpoint, tls: tls.cloned(), drop_every })
    }

    /// The UDP address it is bound to.
    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
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
        self.dial_to(to, addr, timeout).await
    }

    /// Dials the socket address `to` of the node advertising `addr` (whose name TLS checks) and opens a stream.
    pub(crate) async fn dial_to(
        &self,
        to: SocketAddr,
        addr: &str,
        timeout: Duration,
    ) -> Result<(Rd, Wr, SocketAddr, Arc<Datagrams>), LinkError> {
        let fail = |why: String| LinkError::Quic { addr: addr.to_owned(), why };
        let name = match &self.tls {
            Some(tls) => tls.name_for(addr).map_err(|e| fail(format!("cannot start: {e}")))?.to_str().into_owned(),
            None => ANONYMOUS_NAME.to_owned(),
        };
        let connecting = self.endpoint.connect(to, &name).map_err(|e| fail(format!("cannot start: {e}")))?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| LinkError::ConnectTimeout { addr: addr.to_owned() })?
            .map_err(|e| fail(format!("handshake failed: {e}")))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| fail(format!("cannot open a stream: {e}")))?;
        Ok((Box::new(recv), Wr::Quic(send), to, Datagrams::new(conn, self.drop_every)))
    }

    /// Closes the endpoint: every connection ends at once.
    pub(crate) fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"node stopped");
    }
}

/// Completes an incoming connection and takes the stream its dialler opens; `None` if it fails in time.
pub(crate) async fn accept(
    ep: &QuicEndpoint,
    incoming: quinn::Incoming,
    timeout: Duration,
) -> Option<(Rd, Wr, SocketAddr, Arc<Datagrams>)> {
    let remote = incoming.remote_address();
    let up = async {
        let conn = incoming.await.map_err(|e| format!("QUIC handshake failed: {e}"))?;
        let (send, recv) = conn.accept_bi().await.map_err(|e| format!("no link stream: {e}"))?;
        Ok::<_, String>((send, recv, conn))
    };
    match tokio::time::timeout(timeout, up).await {
        Ok(Ok((send, recv, conn))) => {
            Some((Box::new(recv), Wr::Quic(send), remote, Datagrams::new(conn, ep.drop_every)))
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

/// A QUIC link's connection as the link uses it besides its stream: the datagram path (best-effort events that fit
/// in one go this way, outside the stream) and the connection's send window.
pub(crate) struct Datagrams {
    conn: quinn::Connection,
    /// The peer takes a stream per priority (ALPN `kecho/2`).
    streams: bool,
    /// Test hook: every `drop_every`th datagram is dropped instead of sent (0: none), as a network would lose it.
    drop_every: u64,
    tried: AtomicU64,
}

impl Datagrams {
    fn new(conn: quinn::Connection, drop_every: u64) -> Arc<Self> {
        let streams = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .is_some_and(|p| p == ALPN_STREAMS);
        Arc::new(Datagrams { conn, streams, drop_every, tried: AtomicU64::new(0) })
    }

    /// The peer takes an urgent stream besides the main one (a stream per priority).
    pub(crate) fn has_streams(&self) -> bool {
        self.streams
    }

    /// Opens the urgent stream: unidirectional, sent ahead of the main stream's data (quinn's stream priority).
    pub(crate) async fn open_urgent(&self) -> Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> {
        let s = self.conn.open_uni().await.ok()?;
        s.set_priority(1).ok()?;
        Some(Box::new(s))
    }

    /// The peer's urgent stream, once it opens it; `None` if the connection is gone.
    pub(crate) async fn accept_urgent(&self) -> Option<Rd> {
        Some(Box::new(self.conn.accept_uni().await.ok()?))
    }

    /// The largest datagram a best-effort event goes in: what the connection takes now (`None`: the peer takes none).
    /// It follows the path's packet size: about 1.2 KB on a path of 1500-byte packets, up to about 16 KB on loopback
    /// once MTU discovery has run, and it shrinks again if a probe finds large packets lost (quinn then drops the
    /// queued datagrams that no longer fit, which the receiver reports as missed like any lost datagram). No bound of
    /// our own: datagrams of several KiB once broke the loss account, but that was the source sending its first
    /// events to a node as datagrams (`datagram::numbers`), not their size.
    pub(crate) fn max_size(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }

    /// Sends one datagram without waiting (quinn may drop older unsent datagrams to make room, which the receiver
    /// finds as a gap): `Some(true)` if it went, `Some(false)` if the test hook dropped it, `None` if it cannot be
    /// sent at all (too large now, not supported, the connection is gone): the caller then sends the event on the
    /// stream instead.
    pub(crate) fn send(&self, d: Bytes) -> Option<bool> {
        let n = self.tried.fetch_add(1, Ordering::Relaxed) + 1;
        if self.drop_every > 0 && n.is_multiple_of(self.drop_every) {
            return Some(false);
        }
        match self.conn.send_datagram(d) {
            Ok(()) => Some(true),
            Err(e) => {
                tracing::debug!("datagram not sent, the stream carries the event: {e}");
                None
            }
        }
    }

    /// Bounds the bytes the connection holds unsent or unacknowledged (quinn's send window; a link with priorities
    /// keeps it short so that its outbox's lanes, not quinn's buffer, decide what waits).
    pub(crate) fn set_send_window(&self, bytes: u64) {
        self.conn.set_send_window(bytes);
    }

    /// The next datagram that arrived; `None` once the connection is gone.
    pub(crate) async fn recv(&self) -> Option<Bytes> {
        self.conn.read_datagram().await.ok()
    }
}

/// A QUIC link's main send stream, shared by the link's writer task and its outbox: a submitting thread writes a
/// quiet link's event into it itself (`Outbox::push_event_with`, under the same rules as a plain TCP link's direct
/// write: nothing queued, the writer idle, one connection for every lane; and, see `Direct::takes`, no priorities on
/// the link and a runtime task submitting), which spares the writer task's wake-up.
/// quinn's connection driver still builds and sends the packet.
pub(crate) struct QuicSend(parking_lot::Mutex<quinn::SendStream>);

impl QuicSend {
    pub(crate) fn new(s: quinn::SendStream) -> Arc<Self> {
        Arc::new(QuicSend(parking_lot::Mutex::new(s)))
    }

    /// Writes `first` and `frame` into the stream without waiting (a submitting thread's direct write); returns how
    /// many bytes it took: all, or 0 when the stream's or the connection's send window is full (quinn then holds a
    /// waker that does nothing; the writer, which takes what was not written, registers its own). An error (the
    /// connection gone) is the writer's or the reader's to find. From a task of the runtime only (see
    /// `Direct::takes`).
    pub(crate) fn write_now(&self, first: &[u8], frame: &[u8]) -> usize {
        let mut one = bytes::BytesMut::with_capacity(first.len() + frame.len());
        one.extend_from_slice(first);
        one.extend_from_slice(frame);
        let mut chunks = [one.freeze()];
        let mut s = self.0.lock();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // One call (one lock of the connection, one wake-up of its driver) for both parts. `write_chunks` is cancel
        // safe: dropped while pending, it wrote nothing.
        let polled = std::future::Future::poll(std::pin::pin!(s.write_chunks(&mut chunks)), &mut cx);
        match polled {
            std::task::Poll::Ready(Ok(w)) => w.bytes,
            _ => 0,
        }
    }

    /// Ends the stream (FIN) once what was written is sent.
    fn finish(&self) -> std::io::Result<()> {
        self.0.lock().finish().map_err(std::io::Error::other)
    }
}

/// The writer task's handle on a [`QuicSend`].
pub(crate) struct QuicWr(pub(crate) Arc<QuicSend>);

impl tokio::io::AsyncWrite for QuicWr {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut s = self.0 .0.lock();
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut *s), cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(self.0.finish())
    }
}

/// The most one `sendmsg` takes: a UDP datagram's payload, or all segments of one segmentation-offload (GSO) batch.
const MAX_SEND: usize = 65_507;

/// The node's UDP socket as quinn uses it, with one change: a segmentation-offload batch longer than the kernel takes
/// in one call (64 KiB) goes out as several calls. quinn batches many packets of the path's MTU into one send; with
/// packets of several KiB (loopback, jumbo frames) the batch exceeds 64 KiB, the kernel refuses all of it
/// (`EMSGSIZE`, seen with `strace`), quinn counts the packets lost, and MTU discovery concludes that large packets do
/// not pass: without this, a link on loopback stays at 1200 bytes once the upper bound is raised.
#[derive(Debug)]
struct SplitGso(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for SplitGso {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
        let seg = match t.segment_size {
            Some(seg) if t.contents.len() > MAX_SEND && seg <= MAX_SEND => seg,
            _ => return self.0.try_send(t),
        };
        let per_call = MAX_SEND / seg * seg;
        for (i, part) in t.contents.chunks(per_call).enumerate() {
            let sub = quinn::udp::Transmit {
                destination: t.destination,
                ecn: t.ecn,
                contents: part,
                segment_size: (part.len() > seg).then_some(seg),
                src_ip: t.src_ip,
            };
            match self.0.try_send(&sub) {
                Ok(()) => {}
                // Nothing went yet: quinn waits for the socket and tries the whole batch again.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch went: the rest counts as lost on the way, which QUIC's loss recovery repairs.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// DSCP EF (46) in the upper six bits of the IP TOS byte (or IPv6 traffic class).
pub(crate) const EF_TOS: u32 = 46 << 2;

/// The UDP socket of a node's urgent QUIC connections: marked DSCP EF (`IP_TOS` / `IPV6_TCLASS`) and socket priority 6,
/// as the urgent TCP connection is (`dial.rs`, `mark_urgent`). quinn's own socket cannot carry the mark: it sends
/// every packet with an `IP_TOS` control message holding the packet's ECN bits, which replaces the socket's TOS byte
/// (DSCP 0). This one sends with plain `sendto`, so the socket's mark applies; in exchange it gives up ECN,
/// segmentation offload and path MTU discovery (it says packets may fragment, which turns discovery off, so the
/// connection keeps QUIC's minimum packet size, 1200 bytes), none of which the few small frames of the urgent lanes
/// need.
#[derive(Debug)]
pub(crate) struct MarkedSocket {
    io: Arc<tokio::net::UdpSocket>,
}

impl MarkedSocket {
    fn new(socket: std::net::UdpSocket) -> std::io::Result<Self> {
        socket.set_nonblocking(true)?;
        let sock = socket2::SockRef::from(&socket);
        let r = match socket.local_addr()? {
            a if a.is_ipv6() => {
                // A dual-stack socket's IPv4 packets take the IPv4 option's mark.
                let _ = sock.set_tos_v4(EF_TOS);
                sock.set_tclass_v6(EF_TOS)
            }
            _ => sock.set_tos_v4(EF_TOS),
        };
        // After IP_TOS, which sets the socket priority from the TOS byte.
        if let Err(e) = r.and_then(|()| sock.set_priority(6)) {
            tracing::debug!("urgent QUIC socket not marked: {e}");
        }
        Ok(MarkedSocket { io: Arc::new(tokio::net::UdpSocket::from_std(socket)?) })
    }
}

/// Waits for the urgent socket to be writable (one per connection: each stores its own waker).
struct Writable {
    io: Arc<tokio::net::UdpSocket>,
    fut: Option<std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send + Sync>>>,
}

impl std::fmt::Debug for Writable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl quinn::UdpPoller for Writable {
    fn poll_writable(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let fut = this.fut.get_or_insert_with(|| {
            let io = this.io.clone();
            Box::pin(async move { io.writable().await })
        });
        let r = fut.as_mut().poll(cx);
        if r.is_ready() {
            this.fut = None;
        }
        r
    }
}

impl quinn::AsyncUdpSocket for MarkedSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable { io: self.io.clone(), fut: None })
    }

    fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
        // One datagram a call (`max_transmit_segments` is 1, so a batch has one segment; split one anyway).
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for (i, part) in t.contents.chunks(seg).enumerate() {
            match self.io.try_send_to(part, t.destination) {
                Ok(_) => {}
                Err(e) if i == 0 => return Err(e),
                // Part of the batch went: the rest counts as lost on the way, which QUIC's loss recovery repairs.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else { return std::task::Poll::Ready(Ok(0)) };
        loop {
            std::task::ready!(self.io.poll_recv_ready(cx))?;
            match self.io.try_recv_from(buf) {
                Ok((len, addr)) => {
                    *m = quinn::udp::RecvMeta { addr, len, stride: len, ecn: None, dst_ip: None };
                    return std::task::Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        true
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
    /// carries a bulk transfer: the endpoints take `MAX_PACKET`, MTU discovery searches up to it, and the socket splits
    /// segmentation-offload batches that the kernel would refuse whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_links_use_large_packets() {
        let hb = Duration::from_secs(5);
        let a = QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), None, hb, 0).unwrap();
        let b = QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), None, hb, 0).unwrap();
        let to = b.local_addr().unwrap().to_string();
        let accepting = {
            let b = b.clone();
            tokio::spawn(async move {
                let incoming = b.endpoint.accept().await.expect("a connection");
                accept(&b, incoming, Duration::from_secs(10)).await.expect("accepted")
            })
        };
        let (_rd, wr, _, conn) = a.dial(&to, Duration::from_secs(10)).await.unwrap();
        let mut w = wr.into_stream();
        // The acceptor sees the stream once the dialler writes on it.
        w.write_all(&[0u8; 1024]).await.unwrap();
        let (mut rd, _wr, _, _) = accepting.await.unwrap();
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while rd.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        // Long enough for the congestion window to grow to segmentation-offload batches of several large packets:
        // if the kernel refused those, the lost packets would make quinn take the path for a black hole and drop back
        // to 1200 bytes.
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..512 {
            w.write_all(&chunk).await.unwrap();
        }
        let mtu = conn.conn.stats().path.current_mtu;
        assert!(mtu > 4096, "after 32 MiB the link's packets are {mtu} bytes");
        reading.abort();
        a.close();
        b.close();
    }

    /// The packets of an urgent endpoint carry DSCP EF on the wire, and those of a node's main endpoint do not
    /// (quinn's own socket sends each packet with an `IP_TOS` control message holding only its ECN bits, which
    /// replaces the socket's mark: bound like the main endpoint, the urgent one's packets would carry DSCP 0 too).
    /// Seen from a raw socket, which needs root (the root-only pass of `.ci/run` runs it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root: a raw socket to see the packets (run by .ci/run)"]
    async fn urgent_endpoint_packets_carry_dscp_ef() {
        use std::io::Read;
        let raw = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::UDP))
            .expect("a raw socket to see the packets with (this test needs root)");
        raw.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let hb = Duration::from_secs(5);
        let u = QuicEndpoint::bind_urgent("127.0.0.1:0".parse().unwrap(), None, hb).unwrap();
        let b = QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), None, hb, 0).unwrap();
        let (up, bp) = (u.local_addr().unwrap().port(), b.local_addr().unwrap().port());
        let accepting = {
            let b = b.clone();
            tokio::spawn(async move {
                let incoming = b.endpoint.accept().await.expect("a connection");
                let (mut rd, wr, _, _) = accept(&b, incoming, Duration::from_secs(10)).await.expect("accepted");
                let mut w = wr.into_stream();
                let mut buf = [0u8; 100];
                rd.read_exact(&mut buf).await.unwrap();
                w.write_all(&buf).await.unwrap();
                w.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            })
        };
        let (mut rd, wr, _, _) = u.dial(&b.local_addr().unwrap().to_string(), Duration::from_secs(10)).await.unwrap();
        let mut w = wr.into_stream();
        w.write_all(&[5u8; 100]).await.unwrap();
        let mut echo = [0u8; 100];
        rd.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [5u8; 100], "the urgent connection carries data both ways");
        accepting.await.unwrap();
        // The TOS byte of each packet seen between the two sockets, by direction.
        let seen = tokio::task::spawn_blocking(move || {
            let mut seen: Vec<(bool, u8)> = Vec::new();
            let mut buf = [0u8; 65536];
            let until = std::time::Instant::now() + Duration::from_millis(300);
            while std::time::Instant::now() < until {
                let Ok(n) = (&raw).read(&mut buf) else { continue };
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                if n < ihl + 4 {
                    continue;
                }
                let src = u16::from_be_bytes([buf[ihl], buf[ihl + 1]]);
                let dst = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
                if (src, dst) == (up, bp) || (src, dst) == (bp, up) {
                    seen.push((src == up, buf[1]));
                }
            }
            seen
        });
        // The raw socket sees packets from the moment it was opened: the whole exchange above.
        let seen = seen.await.unwrap();
        let from_urgent: Vec<u8> = seen.iter().filter(|(u, _)| *u).map(|(_, t)| t & 0xfc).collect();
        let from_main: Vec<u8> = seen.iter().filter(|(u, _)| !*u).map(|(_, t)| t & 0xfc).collect();
        assert!(from_urgent.len() >= 2 && from_main.len() >= 2, "packets seen: {seen:?}");
        assert!(from_urgent.iter().all(|&t| t == EF_TOS as u8), "the urgent endpoint's packets: {from_urgent:?}");
        assert!(from_main.iter().all(|&t| t == 0), "the main endpoint's packets: {from_main:?}");
        u.close();
        b.close();
    }
}
