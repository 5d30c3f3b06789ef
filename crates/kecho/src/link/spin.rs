//! The low-latency receive mode ([`crate::NodeBuilder::low_latency`]): a link's reader that finds its socket empty
//! keeps asking the kernel for more (non-blocking reads on the socket, one system call each) for a bounded time
//! before it parks, instead of parking at once.
//!
//! Why: a parked reader is woken by the runtime's I/O driver, which itself sleeps in `epoll_wait`; the event then
//! costs the kernel's wake-up of that thread (and, on an idle machine, of its core), about ten times the cost of the
//! socket itself. A reader that is still polling when the bytes arrive takes them at once. The price is CPU: for
//! every quiet gap on a link the reader's thread spins for `min(gap, budget)` (one core while it does). It is an
//! opt-in for latency-critical nodes; the default parks at once.
//!
//! The polling reads bypass tokio's readiness flag (which only the I/O driver sets, and a worker that spins polls
//! the driver only now and then), so they go to the socket itself through a second handle on it (`dup`). Bytes read
//! that way are handed up exactly as the ordinary read would hand them: one byte stream, in order. Only plaintext
//! byte streams whose bytes are the link's own (TCP without TLS, Unix-domain sockets) can be polled so; on the others
//! the mode does nothing.

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

/// How much one polling read takes at most. Polling reads only run on a link that was quiet: what they find is a
/// few frames, and a busy link's reads go through the ordinary path again as soon as its readiness is seen.
const POLL_READ: usize = 64 * 1024;

/// A second handle on a link's socket, read from while spinning. The wall clock times the budget (not tokio's
/// clock: with paused time that would never run out).
pub(crate) struct Poller {
    sock: socket2::Socket,
    budget: Duration,
    scratch: Vec<u8>,
}

impl Poller {
    /// A poller on the socket behind `fd` (duplicated), spinning at most `budget` after each arrival. `None` when
    /// the socket cannot be duplicated (the link then reads as in the default mode).
    pub(crate) fn new(fd: impl std::os::fd::AsFd, budget: Duration) -> Option<Poller> {
        let sock = socket2::SockRef::from(&fd).try_clone().ok()?;
        // The duplicate shares the open file, which tokio made non-blocking; say so again rather than rely on it.
        sock.set_nonblocking(true).ok()?;
        Some(Poller { sock, budget, scratch: vec![0; POLL_READ] })
    }
}

/// A byte stream read in the low-latency mode when it has a [`Poller`], as is otherwise.
pub(crate) struct Spin<R> {
    inner: R,
    poller: Option<Poller>,
    /// When the stream was first found empty since the last bytes arrived.
    quiet_since: Option<Instant>,
}

impl<R> Spin<R> {
    pub(crate) fn new(inner: R, poller: Option<Poller>) -> Self {
        Spin { inner, poller, quiet_since: None }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Spin<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => {
                this.quiet_since = None;
                return ready;
            }
        }
        // The ordinary read registered for a wake-up; until the budget is spent, poll the socket as well.
        let Some(p) = this.poller.as_mut() else { return Poll::Pending };
        let now = Instant::now();
        let since = *this.quiet_since.get_or_insert(now);
        if now.duration_since(since) >= p.budget || buf.remaining() == 0 {
            return Poll::Pending;
        }
        let want = buf.remaining().min(p.scratch.len());
        match (&p.sock).read(&mut p.scratch[..want]) {
            Ok(n) => {
                // n == 0 is the end of the stream, which an empty read reports as the ordinary one would.
                buf.put_slice(&p.scratch[..n]);
                this.quiet_since = None;
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                // Be polled again soon, as a task that yields: tokio runs the other tasks of this thread and polls
                // its I/O driver (without blocking) first, and wakes no other thread for it (a plain self-wake would
                // go to the LIFO slot and then keep waking idle workers to steal it).
                let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes written in pieces, with pauses shorter and longer than the budget, arrive whole and in order through
    /// the spinning reader, and the end of the stream is reported.
    #[tokio::test]
    async fn spinning_reader_keeps_the_stream_whole() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let mut a = a.unwrap();
        let (b, _) = b.unwrap();
        let poller = Poller::new(&b, Duration::from_micros(200));
        assert!(poller.is_some());
        let (rd, _wr) = b.into_split();
        let mut rd = Spin::new(rd, poller);
        let writer = tokio::spawn(async move {
            for i in 0u32..2000 {
                a.write_all(&i.to_le_bytes()).await.unwrap();
                if i % 500 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                } else if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut all = Vec::new();
        rd.read_to_end(&mut all).await.unwrap();
        writer.await.unwrap();
        let got: Vec<u32> = all.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, (0..2000).collect::<Vec<_>>());
    }
}
