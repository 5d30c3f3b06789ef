//! The byte stream over a region's rings: the set-up over the control socket, and the tokio reader and writer with
//! their wake-ups. No `unsafe` here.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

use crate::region::{Consumer, Producer, Region, Side, VERSION};
use crate::ShmError;

/// The default size of each ring: about a Unix socket's default send buffer. Rings of 64 KiB to 1 MiB gave a 1->1
/// stream of 100 B events the same rate within noise (2.35-2.65 M events/s, BENCHMARKS.md); the smaller ring keeps
/// less memory per link and less in flight ahead of an urgent frame.
pub const DEFAULT_RING: usize = 256 << 10;

/// The first four bytes of a set-up message. A kecho frame cannot start so (its length would be over 1 GB).
const MAGIC: [u8; 4] = *b"KSHM";
/// A set-up message: magic, version, then the ring size (dialler) or 0 / a refusal code (acceptor).
const SETUP: usize = 12;
/// Refusal codes.
const REFUSE_VERSION: u32 = 1;
const REFUSE_REGION: u32 = 2;

/// How a reader spins in the low-latency mode: it polls its ring inline for at most this long at a time, then lets
/// the runtime run its other tasks before it polls again. Measured between two processes (100 B ping-pong, p50 of
/// rtt/2, runs alternated with a blocking-socket floor of 2.4-2.6 us): 10 us gave 16.9-18.0 us, 4 us 4.9-5.1 us,
/// 2 us 4.4-5.0 us, 0 (one look per turn) 4.8-5.0 us, 1 us 1.7-4.9 us. Long inline spins keep the runtime's other
/// tasks (the sink's receiver, the writer) from running on this thread.
const SPIN_CHUNK: Duration = Duration::from_micros(1);

/// How a stream is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes of each ring (the dialler chooses; rounded up to a power of two between [`crate::MIN_RING`] and
    /// [`crate::MAX_RING`]).
    pub ring_bytes: usize,
    /// The low-latency mode: a reader that finds its ring empty keeps polling it for up to this long before it
    /// sleeps. `None`: it sleeps at once.
    pub spin: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options { ring_bytes: DEFAULT_RING, spin: None }
    }
}

/// What an accepted connection turned out to be.
#[derive(Debug)]
pub enum Accepted {
    /// The dialler set up shared memory: the stream's two halves.
    Shm(ShmReader, ShmWriter),
    /// The dialler speaks over the socket itself. `prefix` holds the bytes already read from it, which come before
    /// whatever is read from `stream` next.
    Plain {
        /// The connection.
        stream: UnixStream,
        /// Bytes read while looking for a set-up message.
        prefix: Vec<u8>,
    },
}

fn setup_message(value: u32) -> [u8; SETUP] {
    let mut m = [0u8; SETUP];
    m[..4].copy_from_slice(&MAGIC);
    m[4..8].copy_from_slice(&VERSION.to_le_bytes());
    m[8..].copy_from_slice(&value.to_le_bytes());
    m
}

fn field(m: &[u8; SETUP], at: usize) -> u32 {
    u32::from_le_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]])
}

/// Sets a connected socket up as a shared-memory stream, as its dialler: creates the region, passes it with the
/// room socket's far end, and waits for the acceptor's answer. Bound it with a timeout.
pub async fn connect(stream: UnixStream, opts: &Options) -> Result<(ShmReader, ShmWriter), ShmError> {
    let region = Region::create(opts.ring_bytes)?;
    let (room_mine, room_theirs) = std::os::unix::net::UnixStream::pair().map_err(ShmError::io("a socket pair"))?;
    let msg = setup_message(region.ring_bytes() as u32);
    send_with_fds(&stream, &msg, &[region.fd(), room_theirs.as_fd()]).await?;
    drop(room_theirs);
    let (reply, got, fds) = recv_setup(&stream).await?;
    if got < SETUP {
        return Err(if got == 0 { ShmError::Closed } else { ShmError::Invalid("a short answer".into()) });
    }
    if reply[..4] != MAGIC || field(&reply, 4) != VERSION {
        return Err(ShmError::Invalid("the answer is no shared-memory set-up of this version".into()));
    }
    match field(&reply, 8) {
        0 => {}
        code => return Err(ShmError::Refused(code)),
    }
    let room_tx = fds.into_iter().next().ok_or_else(|| ShmError::Invalid("no room socket in the answer".into()))?;
    let (producer, consumer) = region.split(Side::Creator);
    Ends { stream, producer, consumer, room_mine, room_tx, spin: opts.spin }.build()
}

/// Takes an accepted connection: if the dialler sends a shared-memory set-up, maps its region and answers; if not,
/// hands the connection back with the bytes read from it. Bound it with a timeout.
pub async fn accept(stream: UnixStream, spin: Option<Duration>) -> Result<Accepted, ShmError> {
    let (msg, got, fds) = recv_setup(&stream).await?;
    if got < MAGIC.len() || msg[..4] != MAGIC {
        return Ok(Accepted::Plain { stream, prefix: msg[..got].to_vec() });
    }
    if got < SETUP {
        return Err(ShmError::Invalid("a short set-up message".into()));
    }
    if field(&msg, 4) != VERSION {
        refuse(&stream, REFUSE_VERSION).await;
        return Err(ShmError::Invalid(format!("set-up version {} (this node speaks {VERSION})", field(&msg, 4))));
    }
    let mut fds = fds.into_iter();
    let (Some(memfd), Some(room_tx)) = (fds.next(), fds.next()) else {
        refuse(&stream, REFUSE_REGION).await;
        return Err(ShmError::Invalid("the set-up message carries no memory file and room socket".into()));
    };
    let region = match Region::open(memfd) {
        Ok(r) if r.ring_bytes() == field(&msg, 8) as usize => r,
        Ok(r) => {
            refuse(&stream, REFUSE_REGION).await;
            return Err(ShmError::Invalid(format!("rings of {} bytes, {} announced", r.ring_bytes(), field(&msg, 8))));
        }
        Err(e) => {
            refuse(&stream, REFUSE_REGION).await;
            return Err(e);
        }
    };
    let (room_mine, room_theirs) = std::os::unix::net::UnixStream::pair().map_err(ShmError::io("a socket pair"))?;
    send_with_fds(&stream, &setup_message(0), &[room_theirs.as_fd()]).await?;
    drop(room_theirs);
    let (producer, consumer) = region.split(Side::Opener);
    let (r, w) = Ends { stream, producer, consumer, room_mine, room_tx, spin }.build()?;
    Ok(Accepted::Shm(r, w))
}

async fn refuse(stream: &UnixStream, code: u32) {
    let _ = send_with_fds(stream, &setup_message(code), &[]).await;
}

/// What both sides have once the set-up is done.
struct Ends {
    stream: UnixStream,
    producer: Producer,
    consumer: Consumer,
    /// This side's room socket: the peer's reader writes a byte to its other end when it freed room we wait for.
    room_mine: std::os::unix::net::UnixStream,
    /// The peer's room socket's far end: we write a byte to it when we freed room the peer's writer waits for.
    room_tx: OwnedFd,
    spin: Option<Duration>,
}

impl Ends {
    fn build(self) -> Result<(ShmReader, ShmWriter), ShmError> {
        self.room_mine.set_nonblocking(true).map_err(ShmError::io("the room socket"))?;
        let room = UnixStream::from_std(self.room_mine).map_err(ShmError::io("the room socket"))?;
        let ctrl = Arc::new(self.stream);
        let reader = ShmReader {
            consumer: self.consumer,
            ctrl: ctrl.clone(),
            room_tx: self.room_tx,
            spin: self.spin,
            quiet_since: None,
            yielded: false,
            peer_gone: false,
        };
        let writer = ShmWriter { producer: self.producer, ctrl, room, shut: false };
        Ok((reader, writer))
    }
}

/// Sends `msg` with the descriptors `fds` attached.
async fn send_with_fds(stream: &UnixStream, msg: &[u8; SETUP], fds: &[BorrowedFd<'_>]) -> Result<(), ShmError> {
    loop {
        stream.writable().await.map_err(ShmError::io("the control socket"))?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(std::io::Error::other("too many descriptors for one message"));
            }
            rustix::net::sendmsg(stream, &[IoSlice::new(msg)], &mut control, SendFlags::NOSIGNAL)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(_) => return Err(ShmError::Invalid("the set-up message went out in part".into())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ShmError::Os { what: "sending the set-up message", source: e }),
        }
    }
}

/// Reads a set-up message, or as much as shows that it is none: the bytes, how many, and the descriptors that came
/// with them (at most four are taken; the kernel closes any more).
async fn recv_setup(stream: &UnixStream) -> Result<([u8; SETUP], usize, Vec<OwnedFd>), ShmError> {
    let mut buf = [0u8; SETUP];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < SETUP && (got < MAGIC.len() || buf[..MAGIC.len()] == MAGIC) {
        stream.readable().await.map_err(ShmError::io("the control socket"))?;
        let read = stream.try_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let m = rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            for c in control.drain() {
                if let RecvAncillaryMessage::ScmRights(it) = c {
                    fds.extend(it);
                }
            }
            Ok(m.bytes)
        });
        match read {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ShmError::Os { what: "reading the set-up message", source: e }),
        }
    }
    Ok((buf, got, fds))
}

/// Writes a one-byte wake-up to a descriptor the peer holds the other end of, never blocking (whatever the
/// descriptor's flags). A full socket means a wake-up is pending already.
fn wake(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    match rustix::net::send(fd, &[1], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
        Ok(_) => Ok(()),
        Err(e) if e == rustix::io::Errno::AGAIN => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn corrupt(e: ShmError) -> std::io::Error {
    e.into()
}

/// The reading half of a shared-memory stream.
pub struct ShmReader {
    consumer: Consumer,
    ctrl: Arc<UnixStream>,
    room_tx: OwnedFd,
    spin: Option<Duration>,
    /// When the ring was first found empty since bytes last came (low-latency mode).
    quiet_since: Option<Instant>,
    /// The last poll found the ring empty and let the runtime run other tasks (low-latency mode).
    yielded: bool,
    /// The control socket ended: the peer closed it or exited.
    peer_gone: bool,
}

impl std::fmt::Debug for ShmReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmReader").field("consumer", &self.consumer).field("spin", &self.spin).finish()
    }
}

impl ShmReader {
    /// Reads the wake-up bytes waiting on the control socket, noting its end.
    fn drain_wakeups(&mut self) -> std::io::Result<()> {
        let mut scratch = [0u8; 64];
        loop {
            match self.ctrl.try_read(&mut scratch) {
                Ok(0) => {
                    self.peer_gone = true;
                    return Ok(());
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    self.peer_gone = true;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes what the ring holds into `buf`; wakes the writer if it waits for room and half the ring is free.
    ///
    /// Waking the writer as soon as any room is free would make it write a little, sleep and be woken again for
    /// every read (a wake-up of the other process each time); a socket's kernel too wakes a writer only once enough
    /// of its buffer is free. This reader reads on until the ring is empty before it sleeps, so a writer that waits
    /// is woken at the latest then.
    fn take(&mut self, buf: &mut ReadBuf<'_>) -> std::io::Result<usize> {
        let n = self.consumer.read_buf(buf).map_err(corrupt)?;
        if n > 0
            && self.consumer.available().map_err(corrupt)? <= self.consumer.capacity() / 2
            && self.consumer.take_writer_asleep()
        {
            // An error means the peer is gone, which the control socket reports to this reader anyway.
            let _ = wake(self.room_tx.as_fd());
        }
        Ok(n)
    }

    /// Low-latency mode: polls the ring for a while before the reader sleeps.
    fn spin(&mut self, cx: &mut Context<'_>) -> std::io::Result<Spun> {
        let Some(budget) = self.spin else { return Ok(Spun::Sleep) };
        let now = Instant::now();
        let since = *self.quiet_since.get_or_insert(now);
        let spent = now.duration_since(since);
        if spent >= budget {
            return Ok(Spun::Sleep);
        }
        if self.yielded {
            // The other tasks had their turn: poll the ring inline for a while (a load per try, no system call).
            let until = now + SPIN_CHUNK.min(budget - spent);
            loop {
                for _ in 0..32 {
                    std::hint::spin_loop();
                }
                if self.consumer.available().map_err(corrupt)? > 0 {
                    return Ok(Spun::Data);
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
        // Let this thread's other tasks run first (the sink this reader just delivered to, the writer): yield as a
        // task that wants to run again, which tokio defers until its other tasks and its I/O driver were polled.
        self.yielded = true;
        let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
        Ok(Spun::Yielded)
    }
}

/// What a reader's spinning came to.
enum Spun {
    /// Bytes arrived.
    Data,
    /// The task will be polled again soon.
    Yielded,
    /// The budget is spent (or there is none): sleep.
    Sleep,
}

impl AsyncRead for ShmReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Whether the stream ended is read before the ring, so that bytes written before the end are not missed.
            let ended = this.peer_gone || this.consumer.is_closed();
            if this.take(buf)? > 0 {
                this.quiet_since = None;
                this.yielded = false;
                return Poll::Ready(Ok(()));
            }
            if ended {
                // The end of the stream: the peer closed its side or is gone, and everything it wrote was read.
                return Poll::Ready(Ok(()));
            }
            match this.spin(cx)? {
                Spun::Data => continue,
                Spun::Yielded => return Poll::Pending,
                Spun::Sleep => {}
            }
            // Sleep: drop stale wake-ups, say we sleep, look once more, then wait for a wake-up or the socket's end.
            this.drain_wakeups()?;
            if this.peer_gone {
                continue;
            }
            if this.consumer.sleep().map_err(corrupt)? > 0 || this.consumer.is_closed() {
                this.consumer.awake();
                continue;
            }
            ready!(this.ctrl.poll_read_ready(cx))?;
        }
    }
}

/// The writing half of a shared-memory stream.
pub struct ShmWriter {
    producer: Producer,
    ctrl: Arc<UnixStream>,
    /// This side's room socket (the peer's reader wakes us through it).
    room: UnixStream,
    shut: bool,
}

impl std::fmt::Debug for ShmWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmWriter").field("producer", &self.producer).field("shut", &self.shut).finish()
    }
}

impl ShmWriter {
    /// Wakes the reader if it sleeps.
    fn wake_reader(&self) -> std::io::Result<()> {
        if self.producer.take_reader_asleep() {
            wake(self.ctrl.as_fd())?;
        }
        Ok(())
    }

    /// Reads the room wake-ups waiting; the room socket's end means the peer is gone.
    fn drain_room(&self) -> std::io::Result<()> {
        let mut scratch = [0u8; 64];
        loop {
            match self.room.try_read(&mut scratch) {
                Ok(0) => return Err(std::io::ErrorKind::BrokenPipe.into()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsyncWrite for ShmWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        loop {
            let n = this.producer.write_vectored(bufs).map_err(corrupt)?;
            if n > 0 {
                this.wake_reader()?;
                return Poll::Ready(Ok(n));
            }
            // The ring is full: wait for the reader to free room.
            this.drain_room()?;
            if this.producer.sleep().map_err(corrupt)? > 0 {
                this.producer.awake();
                continue;
            }
            ready!(this.room.poll_read_ready(cx))?;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            this.shut = true;
            this.producer.close();
            // The reader may sleep: wake it to read the end. Then end the socket's direction too, for a reader that
            // waits on it.
            let _ = this.wake_reader();
            let _ = rustix::net::shutdown(&*this.ctrl, rustix::net::Shutdown::Write);
        }
        Poll::Ready(Ok(()))
    }
}
