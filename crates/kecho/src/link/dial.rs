//! Setting links up: dialling, accepting (with a bound on connections in their handshake), the kecho handshake with
//! its identity proofs and duplicate rule, and starting a link's reader and writer.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use kecho_proto::codec::{self, CloseCode, Purpose};
use kecho_proto::handshake;
use kecho_proto::liveness::Liveness;
use kecho_proto::probe::ProbeFailure;
use kecho_proto::{Message, PROTOCOL_VERSION};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use super::tls::{secure_accept, secure_dial, Rd, Wr};
use super::urgent::{self, TcpUrgent};
use super::{close, Datagrams, LinkError, LinkHandler, LinkLive, LinkState, Links, Peer, HANDSHAKE_TIMEOUT};
use crate::clock::now;
use crate::transport::Transport;

/// Accepts connections from other nodes until the node stops.
pub(crate) async fn accept_loop<H: LinkHandler>(links: Weak<Links<H>>, listener: TcpListener) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(links) = links.upgrade() else { return };
        let Ok(slot) = links.conn_slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "too many connections; refusing");
            continue;
        };
        let l = links.clone();
        links.tasks.spawn(async move {
            let _slot = slot;
            accept(l, stream, remote).await;
        });
    }
}

/// Dials `peer` for the link of generation `gen`; on failure the peer is lost.
pub(crate) async fn dial<H: LinkHandler>(links: Arc<Links<H>>, peer: Arc<Peer>, gen: u64) {
    let addr = peer.addr.lock().clone();
    match dial_inner(&links, &peer, gen, &addr).await {
        Ok(DialOutcome::Up) => {}
        Ok(DialOutcome::Superseded) => {}
        Ok(DialOutcome::Duplicate) => {
            // The peer's own connection to us wins; it is on its way, and what we queued will go over it. If it never
            // comes (its dial failed), try again.
            tracing::debug!(peer = %peer.id, %addr, "refused as a duplicate: the peer's connection is expected");
            if peer.link_end(gen, false) {
                let l = links.clone();
                links.tasks.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if !peer.is_up() && !peer.outbox.is_empty() && l.is_peer_known(peer.id) {
                        peer.ensure_link(&l);
                    }
                });
            }
        }
        Err(why) => {
            // Failures that need an operator (TLS, versions, refusals) are warnings, once each while they repeat.
            let needs_operator = why.needs_operator();
            let text = why.to_string();
            let previous = links.last_error.lock().replace(why.into_failure());
            let repeated = previous.is_some_and(|p| p.to_string() == text);
            if !repeated && needs_operator {
                tracing::warn!(peer = %peer.id, %addr, "dial failed: {text}");
            } else {
                tracing::debug!(peer = %peer.id, %addr, "dial failed: {text}");
            }
            if peer.link_down(gen) {
                links.peer_lost(peer.id);
            }
        }
    }
}

enum DialOutcome {
    Up,
    Superseded,
    Duplicate,
}

/// A new connection to a node, before any kecho frame: its halves, the low-latency poller, a QUIC connection's
/// datagram path, the transport, the address dialled and the remote's socket address (`None` same-host), and
/// whether it is TCP or QUIC with a stream per priority (its handshake answer then ends with an urgent connection's
/// token).
struct Connected {
    rd: Rd,
    wr: Wr,
    poller: Option<super::spin::Poller>,
    datagrams: Option<Arc<Datagrams>>,
    transport: Transport,
    at: String,
    remote: Option<SocketAddr>,
    tcp: bool,
    quic_streams: bool,
}

/// Opens a connection to the node advertising `addr` (same-host if both run so, else the transport both speak; TLS
/// where configured).
async fn connect<H: LinkHandler>(
    links: &Arc<Links<H>>,
    to: kecho_proto::NodeId,
    addr: &str,
) -> Result<Connected, LinkError> {
    let (transport, at) = crate::transport::pick(links.cfg.transport, addr)?;
    let local = match same_host_path(links, addr) {
        Some(path) => match super::local::dial(path, &links.cfg).await {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::debug!(peer = %to, "same-host dial failed, dialling {transport}: {e}");
                None
            }
        },
        None => None,
    };
    #[cfg_attr(not(feature = "quic"), allow(unused_mut))]
    let mut datagrams: Option<Arc<Datagrams>> = None;
    // A TCP link: the acceptor's handshake answer ends with the token of the link's urgent connection (a QUIC link
    // with a stream per priority: with the token and the port of the acceptor's urgent endpoint).
    let mut tcp = false;
    #[cfg_attr(not(feature = "quic"), allow(unused_mut))]
    let mut quic_streams = false;
    let (rd, wr, remote, poller) = match (local, transport) {
        (Some((rd, wr, poller)), _) => (rd, wr, None, poller),
        #[cfg(feature = "quic")]
        (None, Transport::Quic) => {
            let Some(ep) = links.quic.get() else { return Err(LinkError::Handshake("QUIC is not running".into())) };
            let (rd, wr, remote, d) = ep.dial(at, links.cfg.connect_timeout).await?;
            quic_streams = d.has_streams();
            datagrams = Some(d);
            (rd, wr, Some(remote), None)
        }
        (None, _) => {
            let connect = TcpStream::connect(at);
            let stream = tokio::time::timeout(links.cfg.connect_timeout, connect)
                .await
                .map_err(|_| LinkError::ConnectTimeout { addr: at.to_owned() })?
                .map_err(|source| LinkError::Connect { addr: at.to_owned(), source })?;
            tune(&stream, &links.cfg);
            let remote = stream.peer_addr().ok();
            let poller = poller(&stream, &links.cfg);
            let (rd, wr) = secure_dial(links.cfg.tls.as_ref(), stream, at).await?;
            tcp = true;
            (rd, wr, remote, poller)
        }
    };
    Ok(Connected { rd, wr, poller, datagrams, transport, at: at.to_owned(), remote, tcp, quic_streams })
}

async fn dial_inner<H: LinkHandler>(
    links: &Arc<Links<H>>,
    peer: &Arc<Peer>,
    gen: u64,
    addr: &str,
) -> Result<DialOutcome, LinkError> {
    let Connected { mut rd, mut wr, poller, datagrams, transport, at, remote, tcp, quic_streams } =
        connect(links, peer.id, addr).await?;
    let at = at.as_str();
    let my_addr = links.addr.clone();
    let mut hello = BytesMut::new();
    Message::Hello { version: PROTOCOL_VERSION, node: links.id, addr: my_addr.clone(), purpose: Purpose::Node }
        .encode(&mut hello);
    let (identity, to, from) = (links.identity.clone(), peer.id, my_addr.clone());
    off_workers(move || identity.hello_proof(to, &from)).await?.encode(&mut hello);
    wr.write_all(&hello).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let answer = async {
        let first = read_frame(&mut rd, &mut buf, links.cfg.max_frame).await?;
        match handshake::dial_answer(&first, peer.id, addr) {
            handshake::Dial::Up => {}
            handshake::Dial::Duplicate => return Ok((DialOutcome::Duplicate, None)),
            handshake::Dial::Failed(why) => return Err(LinkError::Handshake(why.to_string())),
        }
        // The peer proves it is the node we meant to reach.
        let proof = read_frame(&mut rd, &mut buf, links.cfg.max_frame).await?;
        let (from, me) = (peer.id, links.id);
        off_workers(move || handshake::check_ack_proof(&proof, from, me))
            .await?
            .map_err(|e| LinkError::Handshake(e.to_string()))?;
        if tcp {
            let frame = read_raw_frame(&mut rd, &mut buf, links.cfg.max_frame).await?;
            let token = urgent::parse_token(&frame)
                .ok_or_else(|| LinkError::Handshake("expected the urgent connection's token".into()))?;
            // Dialled later, once one side's outbox carries priorities (see the link's reader), if both allow it.
            let slot = token
                .filter(|_| links.cfg.urgent_connection)
                .map(|t| TcpUrgent::new(t, urgent::Role::Dialler { at: at.to_owned(), quic: None }));
            return Ok((DialOutcome::Up, slot));
        }
        if quic_streams {
            let frame = read_raw_frame(&mut rd, &mut buf, links.cfg.max_frame).await?;
            let token = urgent::parse_quic_token(&frame)
                .ok_or_else(|| LinkError::Handshake("expected the urgent QUIC connection's token".into()))?;
            // The acceptor's urgent endpoint: its port at the address the main connection reached.
            let slot = token
                .zip(remote)
                .filter(|_| links.cfg.urgent_connection && links.quic_urgent_port().is_some())
                .map(|((t, port), r)| {
                    let quic = Some(SocketAddr::new(r.ip(), port));
                    TcpUrgent::new(t, urgent::Role::Dialler { at: at.to_owned(), quic })
                });
            return Ok((DialOutcome::Up, slot));
        }
        Ok((DialOutcome::Up, None))
    };
    let urgent =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, answer).await.map_err(|_| LinkError::HandshakeTimeout)?? {
            (DialOutcome::Up, u) => u,
            (other, _) => return Ok(other),
        };
    let mut link = peer.link.lock();
    if !matches!(*link, LinkState::Dialing { gen: g } if g == gen) {
        // An inbound connection from the peer won meanwhile.
        return Ok(DialOutcome::Superseded);
    }
    let tasks = start_link(links, peer, gen, (rd, wr, poller, datagrams, urgent), remote, buf, transport);
    *link = LinkState::Up { gen, outbound: true, tasks };
    drop(link);
    links.peer_up(peer.id);
    Ok(DialOutcome::Up)
}

/// Dials a link's urgent connection (see `urgent.rs`) to where the main one went, as the main one (TLS where
/// configured; a QUIC link's from this node's urgent endpoint to the peer's), and joins it to the link of slot `u`
/// (called by the dialler's reader once the connection is wanted). If it cannot within the handshake timeout, the
/// link goes on with one connection (a QUIC link: with an urgent stream on it).
pub(super) async fn dial_urgent<H>(links: &Links<H>, u: &TcpUrgent) {
    let (cfg, me) = (&links.cfg, links.id);
    let Some(at) = u.dials() else { return };
    #[cfg(feature = "quic")]
    if let Some(to) = u.dials_quic() {
        let up = async {
            let ep = links.quic_urgent.get().ok_or_else(|| LinkError::Handshake("no urgent QUIC endpoint".into()))?;
            let (rd, wr, _, _) = ep.dial_to(to, at, cfg.connect_timeout).await?;
            let mut wr = wr.into_stream();
            wr.write_all(&urgent::join_frame(me, &u.token())).await?;
            Ok::<_, LinkError>((rd, wr))
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, up).await {
            Ok(Ok((rd, wr))) => {
                u.join(rd, BytesMut::new(), wr);
            }
            Ok(Err(e)) => {
                tracing::debug!(%at, %to, "no urgent QUIC connection, the link keeps an urgent stream: {e}");
                u.failed();
            }
            Err(_) => {
                tracing::debug!(%at, %to, "no urgent QUIC connection within {HANDSHAKE_TIMEOUT:?}");
                u.failed();
            }
        }
        return;
    }
    let up = async {
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(at))
            .await
            .map_err(|_| LinkError::ConnectTimeout { addr: at.to_owned() })?
            .map_err(|source| LinkError::Connect { addr: at.to_owned(), source })?;
        tune(&stream, cfg);
        mark_urgent(socket2::SockRef::from(&stream));
        let (rd, mut wr) = secure_dial(cfg.tls.as_ref(), stream, at).await?;
        wr.write_all(&urgent::join_frame(me, &u.token())).await?;
        Ok::<_, LinkError>((rd, wr))
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, up).await {
        Ok(Ok((rd, wr))) => {
            u.join(rd, BytesMut::new(), Box::new(wr));
        }
        Ok(Err(e)) => {
            tracing::debug!(%at, "no urgent connection, the link keeps one: {e}");
            u.failed();
        }
        Err(_) => {
            tracing::debug!(%at, "no urgent connection within {HANDSHAKE_TIMEOUT:?}, the link keeps one");
            u.failed();
        }
    }
}

/// Socket options of an urgent connection (both ends): a small send buffer, the DSCP class EF (expedited forwarding)
/// and the socket priority 6 (`TC_PRIO_INTERACTIVE`, band 0 of the `prio` and `pfifo_fast` queueing disciplines'
/// default priority map), so that a queueing discipline that honours either serves its packets before bulk ones
/// (docs/PROTOCOL.md, "Priorities and deadlines"). Failures leave the defaults.
fn mark_urgent(sock: socket2::SockRef<'_>) {
    let _ = sock.set_send_buffer_size(64 * 1024);
    // DSCP EF (46) in the upper six bits of the TOS byte.
    let tos = 46 << 2;
    let r = match sock.local_addr().ok().and_then(|a| a.as_socket()) {
        Some(a) if a.is_ipv6() => sock.set_tclass_v6(tos),
        _ => sock.set_tos_v4(tos),
    };
    // After IP_TOS, which sets the socket priority from the TOS byte (EF maps to 4, band 1, as the bulk's 0 does).
    let r = r.and_then(|()| sock.set_priority(6));
    if let Err(e) = r {
        tracing::debug!("urgent connection not marked: {e}");
    }
}

/// Serves an `UrgentJoin`: binds the connection to the current link of the node it names if the token is that
/// link's, and refuses it otherwise.
async fn join_urgent<H>(
    links: &Links<H>,
    frame: &[u8],
    (rd, wr, read): (Rd, Wr, BytesMut),
    remote: Option<SocketAddr>,
    sock: Option<socket2::Socket>,
) {
    let joined = match urgent::parse_join(frame) {
        Some((node, token)) => {
            let peer = links.peers.lock().get(&node).cloned();
            let u = peer.as_ref().and_then(|p| p.urgent_tcp.lock().clone());
            match u {
                Some(u) if u.accepts(token) && u.open() => Ok((u, peer)),
                Some(u) if u.accepts(token) => Err("a second urgent connection for one link"),
                _ => Err("an urgent connection for a link it does not own"),
            }
        }
        None => Err("a malformed UrgentJoin"),
    };
    match joined {
        Ok((u, peer)) => {
            if let Some(s) = &sock {
                mark_urgent(socket2::SockRef::from(s));
            }
            // The bytes read past the join (the dialler writes its first urgent frames right after it) are the
            // connection's: its reader starts with them.
            if !u.join(rd, read, Box::new(wr)) {
                tracing::warn!(?remote, "refusing a second urgent connection for one link");
            }
            // The writer moves the urgent lanes at its next turn: let it have one now.
            if let Some(p) = peer {
                p.outbox.readable.notify_one();
            }
        }
        Err(why) => {
            tracing::warn!(?remote, "refusing connection: {why}");
            refuse(rd, wr, close(CloseCode::Handshake, why)).await;
        }
    }
}

/// Socket options of a TCP link: no Nagle delay, and the receive buffer if one is configured
/// (`NodeBuilder::recv_buffer`). Failures leave the kernel's defaults (a link works without). The short unsent queue
/// (`TCP_NOTSENT_LOWAT`) is set by the writer once the link carries priorities.
fn tune(stream: &TcpStream, cfg: &crate::config::NodeConfig) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    if let Some(n) = cfg.recv_buffer {
        if let Err(e) = sock.set_recv_buffer_size(n) {
            tracing::debug!("SO_RCVBUF not set: {e}");
        }
    }
}

/// The socket path to dial for a same-host link to a node advertising `addr`, if both nodes run same-host on this
/// host.
fn same_host_path<'a, H>(links: &Links<H>, addr: &'a str) -> Option<&'a str> {
    if !links.cfg.same_host {
        return None;
    }
    super::local::reachable(addr, super::local::host_id()?)
}

/// The low-latency mode's second handle on a link's socket, if the node asks for the mode and the link's bytes are
/// the socket's own (no TLS).
pub(super) fn poller(fd: impl std::os::fd::AsFd, cfg: &crate::config::NodeConfig) -> Option<super::spin::Poller> {
    match (cfg.low_latency, &cfg.tls) {
        (Some(budget), None) => super::spin::Poller::new(fd, budget),
        _ => None,
    }
}

/// Serves one inbound TCP connection.
async fn accept<H: LinkHandler>(links: Arc<Links<H>>, stream: TcpStream, remote: SocketAddr) {
    tune(&stream, &links.cfg);
    let poller = poller(&stream, &links.cfg);
    // A second handle on the socket, in case this is an urgent connection (marked then; dropped at once otherwise).
    let sock = links.cfg.urgent_connection.then(|| socket2::SockRef::from(&stream).try_clone().ok()).flatten();
    let Some((rd, wr)) = secure_accept(links.cfg.tls.as_ref(), stream, remote).await else { return };
    accept_link_with(links, rd, wr, Some(remote), Transport::Tcp, poller, None, sock).await;
}

/// Takes the connections of a QUIC endpoint until the node stops, each served by `serve` in a task of its own under
/// one of the node's connection slots (refused when none is free).
#[cfg(feature = "quic")]
async fn quic_accept_each<H, F, Fut>(links: Weak<Links<H>>, ep: super::quic::QuicEndpoint, serve: F)
where
    H: LinkHandler,
    F: Fn(Arc<Links<H>>, super::quic::QuicEndpoint, quinn::Incoming) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Some(incoming) = ep.endpoint.accept().await {
        let Some(links) = links.upgrade() else { return };
        let Ok(slot) = links.conn_slots.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "too many connections; refusing");
            incoming.refuse();
            continue;
        };
        let served = serve(links.clone(), ep.clone(), incoming);
        links.tasks.spawn(async move {
            let _slot = slot;
            served.await
        });
    }
}

/// Accepts QUIC connections from other nodes until the node stops.
#[cfg(feature = "quic")]
pub(crate) async fn quic_accept_loop<H: LinkHandler>(links: Weak<Links<H>>, ep: super::quic::QuicEndpoint) {
    quic_accept_each(links, ep, |l, ep, incoming| async move {
        if let Some((rd, wr, remote, datagrams)) = super::quic::accept(&ep, incoming, HANDSHAKE_TIMEOUT).await {
            accept_link_with(l, rd, wr, Some(remote), Transport::Quic, None, Some(datagrams), None).await;
        }
    })
    .await
}

/// Accepts the urgent connections of this node's QUIC links on its urgent endpoint until the node stops: each must
/// start with an `UrgentJoin` for a link of this node (see `urgent.rs`); anything else is refused.
#[cfg(feature = "quic")]
pub(crate) async fn quic_urgent_accept_loop<H: LinkHandler>(links: Weak<Links<H>>, ep: super::quic::QuicEndpoint) {
    quic_accept_each(links, ep, |l, ep, incoming| async move {
        let Some((mut rd, wr, remote, _)) = super::quic::accept(&ep, incoming, HANDSHAKE_TIMEOUT).await else {
            return;
        };
        let mut buf = BytesMut::with_capacity(4096);
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_raw_frame(&mut rd, &mut buf, l.cfg.max_frame)).await;
        match first {
            Ok(Ok(frame)) if frame.first() == Some(&urgent::JOIN_KIND) => {
                let read = std::mem::take(&mut buf);
                join_urgent(&l, &frame, (rd, wr, read), Some(remote), None).await;
            }
            Ok(Ok(_)) => {
                tracing::warn!(%remote, "refusing connection: not an urgent connection, on the urgent endpoint");
                refuse(rd, wr, close(CloseCode::Handshake, "only urgent connections are taken here")).await;
            }
            Ok(Err(why)) => tracing::debug!(%remote, "urgent QUIC connection closed before its join: {why}"),
            Err(_) => tracing::debug!(%remote, "urgent QUIC connection: no join within {HANDSHAKE_TIMEOUT:?}"),
        }
    })
    .await
}

/// Serves one inbound connection of any transport: handshake, duplicate rule, then the link tasks. `remote` is
/// `None` for a same-host (Unix-domain) connection.
pub(super) async fn accept_link<H: LinkHandler>(
    links: Arc<Links<H>>,
    rd: Rd,
    wr: Wr,
    remote: Option<SocketAddr>,
    transport: Transport,
    poller: Option<super::spin::Poller>,
) {
    accept_link_with(links, rd, wr, remote, transport, poller, None, None).await
}

/// `accept_link` for a connection that has a datagram path besides its byte stream (QUIC), or a second handle on
/// its TCP socket (to mark it if it turns out to be an urgent connection).
#[allow(clippy::too_many_arguments)]
async fn accept_link_with<H: LinkHandler>(
    links: Arc<Links<H>>,
    mut rd: Rd,
    wr: Wr,
    remote: Option<SocketAddr>,
    transport: Transport,
    poller: Option<super::spin::Poller>,
    datagrams: Option<Arc<Datagrams>>,
    sock: Option<socket2::Socket>,
) {
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_raw_frame(&mut rd, &mut buf, links.cfg.max_frame)).await;
    // A TCP link's urgent connection joins its link instead of starting one (a QUIC link's arrives at the urgent
    // endpoint: `quic_urgent_accept_loop`).
    let tcp = transport == Transport::Tcp && remote.is_some();
    let quic_streams = datagrams.as_ref().is_some_and(|d| d.has_streams());
    if let Ok(Ok(frame)) = &first {
        if frame.first() == Some(&urgent::JOIN_KIND) {
            if tcp {
                let read = std::mem::take(&mut buf);
                join_urgent(&links, frame, (rd, wr, read), remote, sock).await;
            } else {
                refuse(rd, wr, close(CloseCode::Handshake, "an urgent connection where none is taken")).await;
            }
            return;
        }
    }
    drop(sock);
    let first = first.map(|r| r.and_then(|f| codec::decode_body(f).map_err(LinkError::from)));
    let first = match first {
        Ok(Ok(m)) => m,
        Ok(Err(why)) => {
            tracing::warn!(?remote, "closing connection before handshake: {why}");
            refuse(rd, wr, close(CloseCode::Malformed, &why.to_string())).await;
            return;
        }
        Err(_) => {
            tracing::warn!(?remote, "closing connection: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let (their, their_addr) = match handshake::accept_first(&first, links.id) {
        handshake::Accept::Node { peer, addr } => (peer, addr),
        handshake::Accept::Probe { from, channel, nonce } => {
            answer_probe(&links, (rd, wr), from, channel, nonce).await;
            return;
        }
        handshake::Accept::Refuse { code, reason } => {
            tracing::warn!(?remote, "refusing connection: {reason}");
            refuse(rd, wr, close(code, &reason)).await;
            return;
        }
    };
    // The dialler proves it is the node it claims to be, before it is let near any channel.
    let proof = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut buf, links.cfg.max_frame)).await;
    let checked = match proof {
        Ok(Ok(p)) => {
            let (addr, me) = (their_addr.clone(), links.id);
            match off_workers(move || handshake::check_hello_proof(&p, their, &addr, me)).await {
                Ok(checked) => checked.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        Ok(Err(why)) => Err(why.to_string()),
        Err(_) => Err(format!("no identity proof within {HANDSHAKE_TIMEOUT:?}")),
    };
    if let Err(why) = checked {
        tracing::warn!(?remote, "refusing connection: {why}");
        refuse(rd, wr, close(CloseCode::Handshake, &why)).await;
        return;
    }
    let identity = links.identity.clone();
    let Ok(proof) = off_workers(move || identity.ack_proof(their)).await else { return };
    let peer = links.peer(their, &their_addr);
    let mut ack = BytesMut::new();
    Message::HelloAck { version: PROTOCOL_VERSION, node: links.id }.encode(&mut ack);
    proof.encode(&mut ack);
    // A TCP link's slot for its urgent connection (an empty token if this node takes none).
    let urgent =
        (tcp && links.cfg.urgent_connection).then(|| TcpUrgent::new(TcpUrgent::random_token(), urgent::Role::Acceptor));
    if tcp {
        ack.extend_from_slice(&urgent::token_frame(urgent.as_ref().map(|u| u.token()).as_ref()));
    }
    // A QUIC link's: with the port of this node's urgent endpoint (an empty frame if it has none).
    let port = links.quic_urgent_port();
    let urgent = match (quic_streams && links.cfg.urgent_connection, port) {
        (true, Some(port)) => {
            let u = TcpUrgent::new(TcpUrgent::random_token(), urgent::Role::Acceptor);
            ack.extend_from_slice(&urgent::quic_token_frame(Some((&u.token(), port))));
            Some(u)
        }
        _ => {
            if quic_streams {
                ack.extend_from_slice(&urgent::quic_token_frame(None));
            }
            urgent
        }
    };
    if let Some(u) = urgent.as_ref().filter(|_| links.cfg.urgent_at_once) {
        // Wanted at once (`NodeBuilder::urgent_connection_at_once`): asked for right after the token, ahead of any
        // event the link will carry (the writer then asks no more).
        u.want();
        ack.extend_from_slice(&urgent::wanted_frame());
    }
    let ack = ack.freeze();
    // Decide under the lock, write (if refused) after it: the guard must not live across an await.
    let refused = {
        let mut link = peer.link.lock();
        let refuse = match &*link {
            // A connection dialled by the lower node id wins over one dialled by the higher.
            LinkState::Up { outbound: true, .. } | LinkState::Dialing { .. } => links.id < their,
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
            let gen = links.next_gen();
            // The ack goes first through the outbox, so nothing can overtake it.
            peer.outbox.push_front_control(ack);
            let tasks = start_link(&links, &peer, gen, (rd, wr, poller, datagrams, urgent), remote, buf, transport);
            *link = LinkState::Up { gen, outbound: false, tasks };
            None
        }
    };
    match refused {
        Some((rd, wr)) => refuse(rd, wr, close(CloseCode::Duplicate, "a connection between these nodes exists")).await,
        None => links.peer_up(their),
    }
}

/// Answers a probe of tree mode's liveness check (`kecho_proto::probe`) before any handshake: this node's signature
/// over the probe if it is a member of `channel`, a refusal if not (its channel is gone); then the connection
/// closes. No peer, no link, no link tasks: one signature.
async fn answer_probe<H: LinkHandler>(
    links: &Arc<Links<H>>,
    (rd, wr): (Rd, Wr),
    from: kecho_proto::NodeId,
    channel: kecho_proto::ChannelId,
    nonce: u64,
) {
    // Every proof frame has the same length: a public key and a signature.
    let proof_len = Message::Proof { key: [0; 32], sig: [0; 64] }.to_bytes().len();
    let member = links.handler.upgrade().is_some_and(|h| h.probed(channel, proof_len));
    let answer = if member {
        let identity = links.identity.clone();
        match off_workers(move || identity.probe_proof(from, channel, nonce)).await {
            Ok(proof) => proof.to_bytes(),
            Err(_) => return,
        }
    } else {
        tracing::debug!(prober = %from, %channel, "probed about a channel this node is no member of");
        close(CloseCode::Handshake, "not a member of the channel")
    };
    refuse(rd, wr, answer).await;
}

/// Probes node `to` at `addr` about `channel` with `nonce` (tree mode's liveness check, `kecho_proto::probe`): a
/// connection, a `ProbeHello`, and the answer's signature checked; no handshake, no link, no link tasks. `None` if
/// nothing was decided within the handshake timeout (the prober's own timeout decides then).
pub(crate) async fn probe<H: LinkHandler>(
    links: &Arc<Links<H>>,
    to: kecho_proto::NodeId,
    addr: &str,
    channel: kecho_proto::ChannelId,
    nonce: u64,
) -> Option<Result<(), ProbeFailure>> {
    let asked = async {
        let Connected { mut rd, mut wr, .. } = match connect(links, to, addr).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(node = %to, %addr, "probe: {e}");
                return Err(ProbeFailure::Lost);
            }
        };
        let hello = Message::ProbeHello { version: PROTOCOL_VERSION, from: links.id, to, channel, nonce };
        let mut buf = BytesMut::with_capacity(256);
        let answer = match wr.write_all(&hello.to_bytes()).await {
            Ok(()) => read_frame(&mut rd, &mut buf, links.cfg.max_frame).await,
            Err(e) => Err(e.into()),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(node = %to, %addr, "probe: no answer: {e}");
                return Err(ProbeFailure::Lost);
            }
        };
        let me = links.id;
        let checked = off_workers(move || handshake::check_probe_answer(&answer, to, me, channel, nonce))
            .await
            .map_err(|_| ProbeFailure::Lost)?;
        match checked {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(node = %to, %addr, "probe failed: {e}");
                Err(match e {
                    handshake::ProbeError::Refused { .. } => ProbeFailure::Refused,
                    _ => ProbeFailure::Identity,
                })
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, asked).await.ok()
}

/// Refuses a connection with a `Close` frame, and keeps it open until the dialler has read it and hung up (at most
/// a second): on QUIC, dropping the connection at once could discard the frame unsent, and the dialler would not
/// know why it was refused (a `Duplicate` refusal is not a failure).
async fn refuse(mut rd: Rd, mut wr: Wr, frame: bytes::Bytes) {
    if wr.write_all(&frame).await.is_err() {
        return;
    }
    let _ = wr.shutdown().await;
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Runs a handshake's signature or check on the blocking pool. Ed25519 costs about 0.1 ms a proof in a release build
/// but 10 to 20 ms in a debug one; on the runtime's workers, a node that opens dozens of links at once (a joiner of a
/// full mesh, or every member after a cut) held them for seconds, and the heartbeats of every other link in the
/// process went unsent and unread until links timed out in bursts.
async fn off_workers<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, LinkError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| LinkError::Handshake(format!("identity proof task: {e}")))
}

/// Reads one whole frame during the handshake.
/// Reads one frame, kind and body without decoding it.
async fn read_raw_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<bytes::Bytes, LinkError> {
    loop {
        if let Some(f) = codec::split_frame(buf, max)? {
            return Ok(f);
        }
        buf.reserve(4096);
        if rd.read_buf(buf).await? == 0 {
            return Err(LinkError::Eof);
        }
    }
}

async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut, max: usize) -> Result<Message, LinkError> {
    loop {
        if let Some(m) = codec::decode_frame(buf, max)? {
            return Ok(m);
        }
        buf.reserve(4096);
        if rd.read_buf(buf).await? == 0 {
            return Err(LinkError::Eof);
        }
    }
}

/// An established link's connection: its halves, the low-latency poller, a QUIC link's datagram path, a TCP link's
/// urgent connection.
type Conn<R> = (R, Wr, Option<super::spin::Poller>, Option<Arc<Datagrams>>, Option<Arc<TcpUrgent>>);

/// Starts the reader and writer of an established link (`remote` is `None` for a same-host link). Generic over the byte stream: this and the dial/accept
/// functions above are all a new transport (QUIC streams, a same-host pipe) has to provide (its write half as
/// `Wr::Stream`).
fn start_link<H: LinkHandler, R>(
    links: &Arc<Links<H>>,
    peer: &Arc<Peer>,
    gen: u64,
    (rd, wr, poller, datagrams, urgent): Conn<R>,
    remote: Option<SocketAddr>,
    buf: BytesMut,
    transport: Transport,
) -> [AbortHandle; 2]
where
    R: AsyncRead + Unpin + Send + 'static,
{
    peer.counters.connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *peer.transport.lock() = transport;
    super::local::mark(peer, remote.is_none(), &wr);
    let cfg = &links.cfg;
    let limit =
        if remote.is_none() { cfg.link_queue_bytes.min(cfg.same_host_queue_bytes) } else { cfg.link_queue_bytes };
    peer.outbox.set_limit(limit);
    *peer.datagrams.lock() = datagrams.clone();
    *peer.urgent_tcp.lock() = urgent;
    let live = Arc::new(LinkLive {
        live: Mutex::new(Liveness::new(now(), links.cfg.heartbeat_timeout)),
        reader_waiting: AtomicBool::new(false),
    });
    let w = links.tasks.spawn(super::writer::writer(links.clone(), peer.clone(), gen, wr, live.clone()));
    let rd = super::spin::Spin::new(rd, poller);
    let r =
        links.tasks.spawn(super::reader::reader(links.clone(), peer.clone(), gen, (rd, datagrams), buf, live, remote));
    tracing::debug!(peer = %peer.id, ?remote, "link up");
    [w, r]
}
