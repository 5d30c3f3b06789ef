//! A link's byte stream: plain TCP, or TLS over it (rustls) when the node is configured for TLS. Everything above
//! sees the same bytes either way.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use super::LinkError;
#[cfg(feature = "tls")]
use super::{close, HANDSHAKE_TIMEOUT};
use crate::config::TlsSetting;
#[cfg(feature = "tls")]
use kecho_proto::codec::CloseCode;
#[cfg(feature = "tls")]
use std::time::Duration;

/// The two halves of a link's byte stream, plain TCP or TLS over it.
pub(crate) type Rd = Box<dyn AsyncRead + Unpin + Send>;
/// The write half: plain TCP is kept apart so that the link's socket can be shared with its outbox for direct
/// writes (see `Outbox::push_event_with`).
pub(crate) enum Wr {
    Tcp(OwnedWriteHalf),
    /// Any other byte stream (TLS; the hook for other transports).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
    /// A same-host link's shared-memory ring (`link/local.rs`); the writer task takes it as a `Stream`.
    Shm(Box<kecho_shm::ShmWriter>),
    /// A QUIC link's stream: the link's writer shares its main stream with the outbox for direct writes
    /// (`quic::QuicSend`); an urgent connection's is taken as a `Stream`.
    #[cfg(feature = "quic")]
    Quic(quinn::SendStream),
}

impl Wr {
    /// The write half as a plain byte stream (no direct writes).
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    pub(crate) fn into_stream(self) -> Box<dyn AsyncWrite + Unpin + Send> {
        match self {
            Wr::Tcp(w) => Box::new(w),
            Wr::Stream(w) => w,
            Wr::Shm(w) => w,
            #[cfg(feature = "quic")]
            Wr::Quic(w) => Box::new(w),
        }
    }
}

impl AsyncWrite for Wr {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            Wr::Stream(w) => Pin::new(w).poll_write(cx, buf),
            Wr::Shm(w) => Pin::new(w).poll_write(cx, buf),
            #[cfg(feature = "quic")]
            Wr::Quic(w) => tokio::io::AsyncWrite::poll_write(Pin::new(w), cx, buf),
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
            Wr::Shm(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            #[cfg(feature = "quic")]
            Wr::Quic(w) => tokio::io::AsyncWrite::poll_write_vectored(Pin::new(w), cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Wr::Tcp(w) => w.is_write_vectored(),
            Wr::Stream(w) => w.is_write_vectored(),
            Wr::Shm(w) => w.is_write_vectored(),
            #[cfg(feature = "quic")]
            Wr::Quic(w) => tokio::io::AsyncWrite::is_write_vectored(w),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_flush(cx),
            Wr::Stream(w) => Pin::new(w).poll_flush(cx),
            Wr::Shm(w) => Pin::new(w).poll_flush(cx),
            #[cfg(feature = "quic")]
            Wr::Quic(w) => tokio::io::AsyncWrite::poll_flush(Pin::new(w), cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            Wr::Stream(w) => Pin::new(w).poll_shutdown(cx),
            Wr::Shm(w) => Pin::new(w).poll_shutdown(cx),
            #[cfg(feature = "quic")]
            Wr::Quic(w) => tokio::io::AsyncWrite::poll_shutdown(Pin::new(w), cx),
        }
    }
}

/// A plain TCP connection's halves.
fn plain(stream: TcpStream) -> (Rd, Wr) {
    let (rd, wr) = stream.into_split();
    (Box::new(rd), Wr::Tcp(wr))
}

/// Secures a dialled connection if this node uses TLS.
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
pub(crate) async fn secure_dial(
    tls: Option<&TlsSetting>,
    stream: TcpStream,
    addr: &str,
) -> Result<(Rd, Wr), LinkError> {
    match tls {
        None => Ok(plain(stream)),
        #[cfg(feature = "tls")]
        Some(tls) => tls_dial(tls, stream, addr).await,
        #[cfg(not(feature = "tls"))]
        Some(never) => match *never {},
    }
}

/// Secures an accepted connection if this node uses TLS (`None`: the connection was refused or failed).
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
pub(crate) async fn secure_accept(tls: Option<&TlsSetting>, stream: TcpStream, remote: SocketAddr) -> Option<(Rd, Wr)> {
    match tls {
        None => Some(plain(stream)),
        #[cfg(feature = "tls")]
        Some(tls) => tls_accept(tls, stream, remote).await,
        #[cfg(not(feature = "tls"))]
        Some(never) => match *never {},
    }
}

/// The first bytes of a kecho `Hello` frame after its length: kind 1 and the magic "KECH" (little-endian).
#[cfg(feature = "tls")]
const HELLO_START: [u8; 5] = [1, 0x48, 0x43, 0x45, 0x4b];

/// The TLS handshake of a dialled connection.
#[cfg(feature = "tls")]
async fn tls_dial(tls: &crate::tls::TlsConfig, stream: TcpStream, addr: &str) -> Result<(Rd, Wr), LinkError> {
    let tls_error = |why: String| LinkError::Tls { addr: addr.to_owned(), why };
    let name = tls.name_for(addr).map_err(|e| tls_error(format!("cannot start: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
        .await
        .map_err(|_| tls_error("timed out".into()))?
        .map_err(|e| tls_error(format!("failed: {e} (does the peer use TLS with the same CA?)")))?;
    let (rd, wr) = tokio::io::split(s);
    Ok((Box::new(rd), Wr::Stream(Box::new(wr))))
}

/// The TLS handshake of an accepted connection. A plaintext kecho node dialling a TLS node is told why it is
/// refused, in plaintext, rather than left with a failed handshake it cannot explain.
#[cfg(feature = "tls")]
async fn tls_accept(tls: &crate::tls::TlsConfig, stream: TcpStream, remote: SocketAddr) -> Option<(Rd, Wr)> {
    use tokio::io::AsyncWriteExt;
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
