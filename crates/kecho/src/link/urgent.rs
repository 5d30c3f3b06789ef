//! A TCP link's second connection, for its urgent lanes (outbox lanes 1-3): the TCP counterpart of a QUIC link's
//! urgent stream (docs/PROTOCOL.md, "Priorities and deadlines"). On one TCP connection an urgent frame waits behind
//! every bulk byte already in the kernel's send buffer, in flight and in the receiver's socket buffer; on a
//! connection of its own it waits behind none of them.
//!
//! Set-up: the accepting node ends its handshake answer (`HelloAck` and its proof) with an `UrgentToken` frame (kind
//! [`TOKEN_KIND`], 16 random bytes, or none if the acceptor does not take urgent connections), sent on the
//! authenticated main connection. Nothing more happens until one side's outbox carries a prioritised event: the
//! dialler then opens a second TCP connection to the same address (TLS as the first, where configured) whose first
//! frame is `UrgentJoin` (kind [`JOIN_KIND`]: `u64` node id, the 16 token bytes); the acceptor, in that case, first
//! asks the dialler for it with an `UrgentWanted` frame (kind [`WANTED_KIND`], empty) on the main connection. The
//! acceptor binds the joining connection to the current link of that node only if the token is that link's: a
//! connection that claims a link it does not own is refused with a `Close`. Both ends then use the connection as the
//! two urgent streams of a QUIC link (each direction's writer starts using it once it carries priorities and the
//! connection is up, after the main stream's `Sync`); the `Sync`/`Wait` frames keep each source's order. A link whose
//! urgent connection is never wanted has one connection, as does a link where either node has urgent connections
//! off (`NodeBuilder::urgent_connection`).
//!
//! If the dialler cannot make the connection (refused, timed out), it says so with an `UrgentFailed` frame (kind
//! [`FAILED_KIND`], empty) on the main connection, and the acceptor closes its slot: a late `UrgentJoin` is then
//! refused, and neither side waits for the connection any longer (on QUIC the dialler's urgent stream tells it, below).
//!
//! A QUIC link whose peer takes a stream per priority gets the same slot: the acceptor's answer ends with an
//! `UrgentQuicToken` frame (kind [`QUIC_TOKEN_KIND`]: the token and the UDP port of the acceptor's urgent endpoint, or
//! empty), and the urgent connection is a second QUIC connection between the two nodes' urgent endpoints (a UDP
//! socket of their own, marked DSCP EF, see `quic::MarkedSocket`), whose bidirectional stream starts with the same
//! `UrgentJoin`. With its own socket and its own congestion window, an urgent frame no longer waits for the bulk's
//! packets in flight, and a queueing discipline can tell its packets from the bulk's. If that connection cannot be
//! made, the link's urgent lanes take a stream of the main connection instead, as with a peer that has none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kecho_proto::codec::LEN_PREFIX;
use kecho_proto::NodeId;
use parking_lot::Mutex;
use tokio::io::AsyncWrite;
use tokio::sync::{oneshot, Notify};

use super::tls::Rd;

/// The frame that hands the dialler its token (on the main connection, right after the acceptor's proof).
pub(crate) const TOKEN_KIND: u8 = 65;
/// The first frame of an urgent connection: the node id and the token of the link it joins.
pub(crate) const JOIN_KIND: u8 = 66;
/// The acceptor asks the dialler to open the urgent connection (on the main connection, once).
pub(crate) const WANTED_KIND: u8 = 67;
/// The frame that hands a QUIC link's dialler its token and the port of the acceptor's urgent endpoint.
pub(crate) const QUIC_TOKEN_KIND: u8 = 68;
/// The dialler could not make the urgent connection (on a TCP link's main connection, once): the acceptor closes its
/// slot.
pub(crate) const FAILED_KIND: u8 = 69;
/// Token length in bytes.
pub(crate) const TOKEN_LEN: usize = 16;

/// The read half of an urgent connection, with the bytes already read from it past the `UrgentJoin` (at the acceptor:
/// the dialler's first frames may come in the same read).
pub(crate) type UrgentRd = (Rd, BytesMut);

/// The write half of an urgent connection.
pub(crate) type UrgentWr = Box<dyn AsyncWrite + Unpin + Send>;

/// Which end of the link this node is: the dialler opens the urgent connection (to `at`, the address it dialled; a
/// QUIC link's to `quic`, the acceptor's urgent endpoint), the acceptor takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    Dialler { at: String, quic: Option<std::net::SocketAddr> },
    Acceptor,
}

/// A TCP link's urgent connection slot: until the connection is up, where its halves go; then each half goes to the
/// task that asks for it (the writer, the reader).
pub(crate) struct TcpUrgent {
    token: [u8; TOKEN_LEN],
    role: Role,
    /// Until the connection is up: where its halves go.
    give: Mutex<Option<(oneshot::Sender<UrgentRd>, oneshot::Sender<UrgentWr>)>>,
    rd: Mutex<Option<oneshot::Receiver<UrgentRd>>>,
    wr: Mutex<Option<oneshot::Receiver<UrgentWr>>>,
    /// One side's writer wants the connection (its outbox carries priorities), or the acceptor asked for it.
    wanted: AtomicBool,
    want: Notify,
    /// Notified when the connection joins or fails (the writer waits for it while it holds the urgent lanes).
    settled: Notify,
    /// This node's writer sends its urgent lanes on the connection (for `LinkStats::urgent_connection`).
    in_use: AtomicBool,
}

/// What the writer finds when it looks for the urgent connection's write half.
pub(crate) enum Ready {
    /// Up: here it is (given once).
    Up(UrgentWr),
    /// Not up yet.
    NotYet,
    /// It will never be up (the dial failed, the link has none): the link keeps one connection.
    Never,
}

impl TcpUrgent {
    /// A link's urgent connection slot, for token `token`, at this node's end `role`.
    pub(crate) fn new(token: [u8; TOKEN_LEN], role: Role) -> Arc<Self> {
        let (rtx, rrx) = oneshot::channel();
        let (wtx, wrx) = oneshot::channel();
        Arc::new(TcpUrgent {
            token,
            role,
            give: Mutex::new(Some((rtx, wtx))),
            rd: Mutex::new(Some(rrx)),
            wr: Mutex::new(Some(wrx)),
            wanted: AtomicBool::new(false),
            want: Notify::new(),
            settled: Notify::new(),
            in_use: AtomicBool::new(false),
        })
    }

    /// A fresh random token.
    pub(crate) fn random_token() -> [u8; TOKEN_LEN] {
        rand::random()
    }

    /// The token, for the acceptor's `UrgentToken` frame and the dialler's `UrgentJoin`.
    pub(crate) fn token(&self) -> [u8; TOKEN_LEN] {
        self.token
    }

    /// The address to dial, at the dialler's end; `None` at the acceptor's.
    pub(crate) fn dials(&self) -> Option<&str> {
        match &self.role {
            Role::Dialler { at, .. } => Some(at),
            Role::Acceptor => None,
        }
    }

    /// The acceptor's urgent QUIC endpoint, at the dialler's end of a QUIC link.
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    pub(crate) fn dials_quic(&self) -> Option<std::net::SocketAddr> {
        match &self.role {
            Role::Dialler { quic, .. } => *quic,
            Role::Acceptor => None,
        }
    }

    /// This node's writer sends its urgent lanes on the connection.
    pub(crate) fn in_use(&self) -> bool {
        self.in_use.load(Ordering::Acquire)
    }

    /// This node's writer has started sending its urgent lanes on the connection.
    pub(crate) fn set_in_use(&self) {
        self.in_use.store(true, Ordering::Release);
    }

    /// A joining connection that presents `token` may take this slot: this is the acceptor's end of the link and the
    /// token is the link's (compared in constant time). The dialler's end takes no connection from outside.
    pub(crate) fn accepts(&self, token: &[u8]) -> bool {
        self.role == Role::Acceptor
            && token.len() == TOKEN_LEN
            && token.iter().zip(self.token.iter()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }

    /// The connection is wanted (the first call returns `true`: the acceptor then asks the dialler with an
    /// `UrgentWanted` frame; the dialler's reader starts dialling).
    pub(crate) fn want(&self) -> bool {
        let first = !self.wanted.swap(true, Ordering::AcqRel);
        if first {
            self.want.notify_waiters();
        }
        first
    }

    /// The connection has been wanted (by either side).
    pub(crate) fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// Waits until the connection is wanted.
    pub(crate) async fn wanted(&self) {
        loop {
            let n = self.want.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.wanted.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }

    /// Binds the connection's halves to the link (`read`: the bytes already read from it past the `UrgentJoin`, which
    /// its reader takes first); `false` if it already has one (the new one is then refused).
    pub(crate) fn join(&self, rd: Rd, read: BytesMut, wr: UrgentWr) -> bool {
        let Some((rtx, wtx)) = self.give.lock().take() else { return false };
        let _ = rtx.send((rd, read));
        let _ = wtx.send(wr);
        self.settled.notify_waiters();
        true
    }

    /// No connection has joined (or failed) yet.
    pub(crate) fn open(&self) -> bool {
        self.give.lock().is_some()
    }

    /// The connection could not be made: whoever waits for it goes on with one connection.
    pub(crate) fn failed(&self) {
        self.give.lock().take();
        self.settled.notify_waiters();
    }

    /// Notified when the connection joins or fails: create (and enable) before looking with [`TcpUrgent::try_writer`].
    pub(crate) fn settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.settled.notified()
    }

    /// The link is gone: drops whatever halves of the connection no task took (closing it), and refuses any later.
    pub(crate) fn close(&self) {
        self.give.lock().take();
        self.rd.lock().take();
        self.wr.lock().take();
    }

    /// The write half, if the connection is up (without waiting; see [`Ready`]).
    pub(crate) fn try_writer(&self) -> Ready {
        let mut slot = self.wr.lock();
        let Some(rx) = slot.as_mut() else { return Ready::Never };
        match rx.try_recv() {
            Ok(w) => {
                *slot = None;
                Ready::Up(w)
            }
            Err(oneshot::error::TryRecvError::Empty) => Ready::NotYet,
            Err(oneshot::error::TryRecvError::Closed) => {
                *slot = None;
                Ready::Never
            }
        }
    }

    /// The read half and the bytes already read from it, once the connection is up; `None` if it never comes.
    pub(crate) async fn accept_urgent(&self) -> Option<UrgentRd> {
        let rx = self.rd.lock().take()?;
        rx.await.ok()
    }
}

/// The `UrgentWanted` frame.
pub(crate) fn wanted_frame() -> Bytes {
    let mut b = BytesMut::with_capacity(LEN_PREFIX + 1);
    b.put_u32_le(1);
    b.put_u8(WANTED_KIND);
    b.freeze()
}

/// The `UrgentFailed` frame.
pub(crate) fn failed_frame() -> Bytes {
    let mut b = BytesMut::with_capacity(LEN_PREFIX + 1);
    b.put_u32_le(1);
    b.put_u8(FAILED_KIND);
    b.freeze()
}

/// The `UrgentToken` frame; without a token (the acceptor takes no urgent connections), an empty one.
pub(crate) fn token_frame(token: Option<&[u8; TOKEN_LEN]>) -> Bytes {
    let token: &[u8] = token.map_or(&[], |t| t);
    let mut b = BytesMut::with_capacity(LEN_PREFIX + 1 + TOKEN_LEN);
    b.put_u32_le((1 + token.len()) as u32);
    b.put_u8(TOKEN_KIND);
    b.put_slice(token);
    b.freeze()
}

/// The `UrgentQuicToken` frame: the token and the UDP port of the acceptor's urgent endpoint; without them (the
/// acceptor takes no urgent connections), an empty one.
pub(crate) fn quic_token_frame(token: Option<(&[u8; TOKEN_LEN], u16)>) -> Bytes {
    let len = if token.is_some() { 1 + TOKEN_LEN + 2 } else { 1 };
    let mut b = BytesMut::with_capacity(LEN_PREFIX + len);
    b.put_u32_le(len as u32);
    b.put_u8(QUIC_TOKEN_KIND);
    if let Some((t, port)) = token {
        b.put_slice(t);
        b.put_u16_le(port);
    }
    b.freeze()
}

/// Parses an `UrgentQuicToken` frame's body (kind byte included): `Some(None)` for an empty one.
pub(crate) fn parse_quic_token(frame: &[u8]) -> Option<Option<([u8; TOKEN_LEN], u16)>> {
    match frame {
        [QUIC_TOKEN_KIND] => Some(None),
        [QUIC_TOKEN_KIND, rest @ ..] if rest.len() == TOKEN_LEN + 2 => {
            let token = rest[..TOKEN_LEN].try_into().ok()?;
            let port = u16::from_le_bytes(rest[TOKEN_LEN..].try_into().ok()?);
            (port != 0).then_some(Some((token, port)))
        }
        _ => None,
    }
}

/// The `UrgentJoin` frame.
pub(crate) fn join_frame(node: NodeId, token: &[u8; TOKEN_LEN]) -> Bytes {
    let mut b = BytesMut::with_capacity(LEN_PREFIX + 1 + 8 + TOKEN_LEN);
    b.put_u32_le((1 + 8 + TOKEN_LEN) as u32);
    b.put_u8(JOIN_KIND);
    b.put_u64_le(node.0);
    b.put_slice(token);
    b.freeze()
}

/// Parses an `UrgentToken` frame's body (kind byte included): `Some(None)` for an empty one.
pub(crate) fn parse_token(frame: &[u8]) -> Option<Option<[u8; TOKEN_LEN]>> {
    match frame {
        [TOKEN_KIND] => Some(None),
        [TOKEN_KIND, rest @ ..] if rest.len() == TOKEN_LEN => rest.try_into().ok().map(Some),
        _ => None,
    }
}

/// Parses an `UrgentJoin` frame's body (kind byte included).
pub(crate) fn parse_join(frame: &[u8]) -> Option<(NodeId, &[u8])> {
    match frame {
        [JOIN_KIND, rest @ ..] if rest.len() == 8 + TOKEN_LEN => {
            let id = u64::from_le_bytes(rest[..8].try_into().ok()?);
            Some((NodeId(id), &rest[8..]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_tokens_are_checked() {
        let t = TcpUrgent::random_token();
        let u = TcpUrgent::new(t, Role::Acceptor);
        let f = token_frame(Some(&t));
        assert_eq!(parse_token(&f[LEN_PREFIX..]), Some(Some(t)));
        assert_eq!(parse_token(&token_frame(None)[LEN_PREFIX..]), Some(None));
        assert_eq!(parse_token(&f[LEN_PREFIX..LEN_PREFIX + 9]), None);
        let j = join_frame(NodeId(7), &t);
        let (n, tok) = parse_join(&j[LEN_PREFIX..]).unwrap();
        assert_eq!(n, NodeId(7));
        assert!(u.accepts(tok));
        let mut other = t;
        other[3] ^= 1;
        assert!(!u.accepts(&other));
        assert!(!u.accepts(&t[..8]));
        assert!(parse_join(&f[LEN_PREFIX..]).is_none());
        // The dialler's end never takes a connection from outside, whatever it presents.
        let d = TcpUrgent::new(t, Role::Dialler { at: "a:1".into(), quic: None });
        assert!(!d.accepts(&t));
        // A QUIC link's token frame carries the port of the acceptor's urgent endpoint.
        let q = quic_token_frame(Some((&t, 4433)));
        assert_eq!(parse_quic_token(&q[LEN_PREFIX..]), Some(Some((t, 4433))));
        assert_eq!(parse_quic_token(&quic_token_frame(None)[LEN_PREFIX..]), Some(None));
        assert_eq!(parse_quic_token(&q[LEN_PREFIX..q.len() - 1]), None, "short");
        assert_eq!(parse_quic_token(&quic_token_frame(Some((&t, 0)))[LEN_PREFIX..]), None, "port 0");
        assert_eq!(parse_quic_token(&f[LEN_PREFIX..]), None, "a TCP link's token frame");
        assert_eq!(parse_token(&q[LEN_PREFIX..]), None);
    }

    #[test]
    fn the_writer_gets_the_connection_once_and_learns_when_it_never_comes() {
        let u = TcpUrgent::new(TcpUrgent::random_token(), Role::Acceptor);
        assert!(matches!(u.try_writer(), Ready::NotYet));
        assert!(u.want());
        assert!(!u.want(), "asked for once");
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        assert!(u.join(Box::new(r), BytesMut::new(), Box::new(w)));
        assert!(matches!(u.try_writer(), Ready::Up(_)));
        assert!(matches!(u.try_writer(), Ready::Never));
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        assert!(!u.join(Box::new(r), BytesMut::new(), Box::new(w)), "a second connection is refused");
        let v = TcpUrgent::new(TcpUrgent::random_token(), Role::Acceptor);
        v.failed();
        assert!(matches!(v.try_writer(), Ready::Never));
        // A failed slot (the dialler's `UrgentFailed`) takes no late connection.
        assert!(!v.open());
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        assert!(!v.join(Box::new(r), BytesMut::new(), Box::new(w)), "a late connection is refused");
        assert_eq!(parse_token(&failed_frame()[LEN_PREFIX..]), None);
        assert_eq!(&failed_frame()[..], &[1, 0, 0, 0, FAILED_KIND]);
    }
}
