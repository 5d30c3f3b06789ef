//! A TCP link's second connection, for its urgent lanes (outbox lanes 1-3): the TCP counterpart of a QUIC link's
//! urgent stream (docs/PROTOCOL.md, "Priorities and deadlines"). On one TCP connection an urgent frame waits behind
//! every bulk byte already in the kernel's send buffer, in flight and in the receiver's socket buffer; on a
//! connection of its own it waits behind none of them.
//!
//! Set-up: the accepting node ends its handshake answer (`HelloAck` and its proof) with an `UrgentToken` frame (kind
//! [`TOKEN_KIND`], 16 random bytes), sent on the authenticated main connection. The dialler then opens a second TCP
//! connection to the same address (TLS as the first, where configured) whose first frame is `UrgentJoin` (kind
//! [`JOIN_KIND`]: `u64` node id, the 16 token bytes). The acceptor binds it to the current link of that node only if
//! the token is that link's: a connection that claims a link it does not own is refused with a `Close`. Both ends
//! then use the connection as the two urgent streams of a QUIC link (each direction's writer starts using it once it
//! carries priorities, after the main stream's `Sync`); the `Sync`/`Wait` frames keep each source's order.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kecho_proto::codec::LEN_PREFIX;
use kecho_proto::NodeId;
use parking_lot::Mutex;
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;

use super::tls::Rd;

/// The frame that hands the dialler its token (on the main connection, right after the acceptor's proof).
pub(crate) const TOKEN_KIND: u8 = 65;
/// The first frame of an urgent connection: the node id and the token of the link it joins.
pub(crate) const JOIN_KIND: u8 = 66;
/// Token length in bytes.
pub(crate) const TOKEN_LEN: usize = 16;

/// The write half of an urgent connection.
pub(crate) type UrgentWr = Box<dyn AsyncWrite + Unpin + Send>;

/// A TCP link's urgent connection, once it is up: each half goes to the task that asks for it (the writer, the
/// reader).
pub(crate) struct TcpUrgent {
    token: [u8; TOKEN_LEN],
    /// Until the connection is up: where its halves go.
    give: Mutex<Option<(oneshot::Sender<Rd>, oneshot::Sender<UrgentWr>)>>,
    rd: Mutex<Option<oneshot::Receiver<Rd>>>,
    wr: Mutex<Option<oneshot::Receiver<UrgentWr>>>,
}

impl TcpUrgent {
    /// A link's urgent connection slot, for token `token`.
    pub(crate) fn new(token: [u8; TOKEN_LEN]) -> Arc<Self> {
        let (rtx, rrx) = oneshot::channel();
        let (wtx, wrx) = oneshot::channel();
        Arc::new(TcpUrgent {
            token,
            give: Mutex::new(Some((rtx, wtx))),
            rd: Mutex::new(Some(rrx)),
            wr: Mutex::new(Some(wrx)),
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

    /// The token presented by a joining connection is this link's (compared in constant time).
    pub(crate) fn owns(&self, token: &[u8]) -> bool {
        token.len() == TOKEN_LEN && token.iter().zip(self.token.iter()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }

    /// Binds the connection's halves to the link; `false` if it already has one (the new one is then refused).
    pub(crate) fn join(&self, rd: Rd, wr: UrgentWr) -> bool {
        let Some((rtx, wtx)) = self.give.lock().take() else { return false };
        let _ = rtx.send(rd);
        let _ = wtx.send(wr);
        true
    }

    /// The connection could not be made: whoever waits for it goes on with one connection.
    pub(crate) fn failed(&self) {
        self.give.lock().take();
    }

    /// The write half, once the connection is up (bounded by `within`); `None` if it is not up by then.
    pub(crate) async fn open_urgent(&self, within: std::time::Duration) -> Option<UrgentWr> {
        let rx = self.wr.lock().take()?;
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(w)) => Some(w),
            _ => {
                self.failed();
                None
            }
        }
    }

    /// The read half, once the connection is up; `None` if it never comes.
    pub(crate) async fn accept_urgent(&self) -> Option<Rd> {
        let rx = self.rd.lock().take()?;
        rx.await.ok()
    }
}

/// The `UrgentToken` frame.
pub(crate) fn token_frame(token: &[u8; TOKEN_LEN]) -> Bytes {
    let mut b = BytesMut::with_capacity(LEN_PREFIX + 1 + TOKEN_LEN);
    b.put_u32_le((1 + TOKEN_LEN) as u32);
    b.put_u8(TOKEN_KIND);
    b.put_slice(token);
    b.freeze()
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

/// Parses an `UrgentToken` frame's body (kind byte included).
pub(crate) fn parse_token(frame: &[u8]) -> Option<[u8; TOKEN_LEN]> {
    match frame {
        [TOKEN_KIND, rest @ ..] if rest.len() == TOKEN_LEN => rest.try_into().ok(),
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
        let u = TcpUrgent::new(t);
        let f = token_frame(&t);
        assert_eq!(parse_token(&f[LEN_PREFIX..]), Some(t));
        let j = join_frame(NodeId(7), &t);
        let (n, tok) = parse_join(&j[LEN_PREFIX..]).unwrap();
        assert_eq!(n, NodeId(7));
        assert!(u.owns(tok));
        let mut other = t;
        other[3] ^= 1;
        assert!(!u.owns(&other));
        assert!(!u.owns(&t[..8]));
        assert!(parse_join(&f[LEN_PREFIX..]).is_none());
    }
}
