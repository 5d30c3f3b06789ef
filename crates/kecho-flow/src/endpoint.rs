//! Endpoints: opening kernel objects, reading into pooled buffers, vectored writes, and the zero-copy moves
//! (copy_file_range, sendfile, splice) with their "unsupported" verdict for the ladder's fallback rung.

use std::fs::File;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::io::Errno;

use crate::spec::Endpoint;
use crate::stats::{Call, StageStat};

/// An open kernel object.
#[derive(Debug)]
pub enum Conn {
    /// A file.
    File(File),
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream connection.
    Unix(UnixStream),
    /// A child's stdout (source).
    ChildOut(Child, ChildStdout),
    /// A child's stdin (sink).
    ChildIn(Child, ChildStdin),
    /// This process's stdin.
    Stdin(io::Stdin),
    /// This process's stdout.
    Stdout(io::Stdout),
}

impl Conn {
    /// The file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::File(f) => f.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
            Conn::ChildOut(_, o) => o.as_fd(),
            Conn::ChildIn(_, i) => i.as_fd(),
            Conn::Stdin(s) => s.as_fd(),
            Conn::Stdout(s) => s.as_fd(),
        }
    }

    /// Sets `TCP_NODELAY` on a TCP connection (nothing on other objects).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nodelay(on),
            _ => Ok(()),
        }
    }

    /// True for regular files (copy_file_range and sendfile sources).
    pub fn is_file(&self) -> bool {
        matches!(self, Conn::File(f) if f.metadata().is_ok_and(|m| m.is_file()))
    }

    /// A TCP or Unix stream connection.
    pub fn is_socket(&self) -> bool {
        matches!(self, Conn::Tcp(_) | Conn::Unix(_))
    }

    /// Something that, called from another thread, makes blocked reads and writes on this object return.
    pub fn interrupter(&self) -> Option<Box<dyn Fn() + Send + Sync>> {
        match self {
            Conn::Tcp(s) => {
                let s = s.try_clone().ok()?;
                Some(Box::new(move || {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }))
            }
            Conn::Unix(s) => {
                let s = s.try_clone().ok()?;
                Some(Box::new(move || {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }))
            }
            Conn::ChildOut(c, _) | Conn::ChildIn(c, _) => {
                let pid = rustix::process::Pid::from_raw(c.id() as i32)?;
                Some(Box::new(move || {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }))
            }
            _ => None,
        }
    }

    /// Ends a connection whose peer speaks the resume protocol: half-closes it and waits for the peer to close its
    /// side, which it does once it has read everything. A reset instead means the peer lost the end of the
    /// stream: the error is a connection fault, and the caller resumes.
    pub fn close_confirmed(&self) -> io::Result<()> {
        let (sock, fd) = match self {
            Conn::Tcp(s) => (s.shutdown(std::net::Shutdown::Write), s.as_fd()),
            Conn::Unix(s) => (s.shutdown(std::net::Shutdown::Write), s.as_fd()),
            _ => return Ok(()),
        };
        sock?;
        let mut b = [0u8; 512];
        loop {
            match rustix::io::read(fd, &mut b) {
                Ok(0) => return Ok(()),
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Ends the object cleanly after the last write (sockets: half-close; children: close stdin and wait).
    pub fn close(self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write).or_else(ignore_not_connected),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write).or_else(ignore_not_connected),
            Conn::ChildIn(mut c, i) => {
                // The end of input for the child; its exit status says whether it took the data.
                drop(i);
                let status = c.wait()?;
                if status.success() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!("the sink process exited with {status}")))
                }
            }
            Conn::ChildOut(mut c, o) => {
                drop(o);
                c.wait().map(|_| ())
            }
            Conn::File(f) => {
                drop(f);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn ignore_not_connected(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotConnected {
        Ok(())
    } else {
        Err(e)
    }
}

/// A bound listener, ready before the flow's thread starts (so that a port 0 is known at once).
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix.
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `ep` if it is a listening endpoint.
    pub fn bind(ep: &Endpoint) -> io::Result<Option<Listener>> {
        Ok(match ep {
            Endpoint::TcpListen(a) => {
                let l = TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Some(Listener::Tcp(l))
            }
            Endpoint::UnixListen(p) => {
                if std::fs::symlink_metadata(p).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)?;
                l.set_nonblocking(true)?;
                Some(Listener::Unix(l, p.clone()))
            }
            _ => None,
        })
    }

    /// The bound TCP address.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Waits for the first connection, checking `stop` every 100 ms.
    pub fn accept(&self, stop: &AtomicBool) -> io::Result<Conn> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
            }
            let r = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    s.set_nonblocking(false).map(|_| Conn::Tcp(s))
                }),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| s.set_nonblocking(false).map(|_| Conn::Unix(s))),
            };
            match r {
                Ok(c) => return c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let fd = match self {
                        Listener::Tcp(l) => l.as_fd(),
                        Listener::Unix(l, _) => l.as_fd(),
                    };
                    let mut p = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
                    let t = rustix::time::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
                    match rustix::event::poll(&mut p, Some(&t)) {
                        Ok(_) | Err(Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Opens a non-listening endpoint as a source (`sink == false`) or sink.
pub fn open(ep: &Endpoint, sink: bool, append: bool) -> io::Result<Conn> {
    Ok(match ep {
        Endpoint::File(p) if sink => {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true);
            if append {
                o.append(true);
            } else {
                o.truncate(true);
            }
            Conn::File(o.open(p)?)
        }
        Endpoint::File(p) => Conn::File(File::open(p)?),
        Endpoint::TcpConnect(a) => {
            let s = TcpStream::connect(a)?;
            let _ = s.set_nodelay(true);
            Conn::Tcp(s)
        }
        Endpoint::UnixConnect(p) => Conn::Unix(UnixStream::connect(p)?),
        Endpoint::Exec(cmd) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(cmd);
            if sink {
                let mut child = c.stdin(Stdio::piped()).spawn()?;
                let i = child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?;
                Conn::ChildIn(child, i)
            } else {
                let mut child = c.stdout(Stdio::piped()).spawn()?;
                let o = child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
                Conn::ChildOut(child, o)
            }
        }
        Endpoint::Stdio if sink => Conn::Stdout(io::stdout()),
        Endpoint::Stdio => Conn::Stdin(io::stdin()),
        Endpoint::TcpListen(_) | Endpoint::UnixListen(_) | Endpoint::Channel(_) | Endpoint::App(_) => {
            return Err(io::Error::other(format!("{ep} is not opened directly")))
        }
    })
}

/// Reads once into the spare capacity of `buf` (no zero-fill); returns the bytes read (0 at end of input).
pub fn read_into(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, stat: &StageStat) -> io::Result<usize> {
    loop {
        stat.syscall();
        match rustix::io::read(fd, rustix::buffer::spare_capacity(buf)) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes the ranges of `buf` with as few `writev` calls as the kernel allows (at most 1024 ranges per call),
/// starting `skip` bytes into the data. On failure returns the bytes written by this call and the error.
pub fn write_ranges(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    segs: &[std::ops::Range<usize>],
    mut skip: usize,
    stat: &StageStat,
) -> Result<usize, (usize, io::Error)> {
    const MAX_IOV: usize = 1024;
    let mut written = 0;
    let mut i = 0;
    // Skip whole ranges already written.
    while i < segs.len() && skip >= segs[i].len() {
        skip -= segs[i].len();
        i += 1;
    }
    let mut first_off = skip;
    while i < segs.len() {
        let end = (i + MAX_IOV).min(segs.len());
        let mut iov: Vec<io::IoSlice<'_>> = Vec::with_capacity(end - i);
        iov.push(io::IoSlice::new(&buf[segs[i].start + first_off..segs[i].end]));
        for r in &segs[i + 1..end] {
            iov.push(io::IoSlice::new(&buf[r.clone()]));
        }
        stat.syscall();
        let n = match rustix::io::writev(fd, &iov) {
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err((written, e.into())),
        };
        if n == 0 {
            return Err((written, io::Error::new(io::ErrorKind::WriteZero, "wrote nothing")));
        }
        written += n;
        // Advance over what was written.
        let mut left = n;
        while i < segs.len() && left > 0 {
            let avail = segs[i].len() - first_off;
            if left >= avail {
                left -= avail;
                first_off = 0;
                i += 1;
            } else {
                first_off += left;
                left = 0;
            }
        }
    }
    Ok(written)
}

/// How the zero-copy path moves bytes between two objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `copy_file_range` (file to file, in the kernel, possibly by reflink).
    CopyFileRange,
    /// `sendfile` (file to anything).
    Sendfile,
    /// `splice` through a pipe (socket or pipe to anything).
    Splice,
}

impl Method {
    /// Picks the call for a source and sink.
    pub fn choose(src: &Conn, dst: &Conn) -> Method {
        match (src.is_file(), dst.is_file()) {
            (true, true) => Method::CopyFileRange,
            (true, false) => Method::Sendfile,
            _ => Method::Splice,
        }
    }

    /// Name for stats.
    pub fn name(self) -> &'static str {
        match self {
            Method::CopyFileRange => "zero-copy (copy_file_range)",
            Method::Sendfile => "zero-copy (sendfile)",
            Method::Splice => "zero-copy (splice)",
        }
    }
}

/// The zero-copy move's end.
#[derive(Debug)]
pub enum Moved {
    /// All input moved.
    Done,
    /// Stopped on request.
    Stopped,
    /// The kernel refused the method before any byte moved: use the copying path (ladder rung 4).
    Unsupported(io::Error),
}

/// True for the errors with which the kernel refuses a zero-copy call for these objects (the ladder's rung 4).
pub(crate) fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP | Errno::XDEV | Errno::BADF)
}

/// Moves everything from `src` to `dst` without the bytes entering user space. `pace(n)` is called before each
/// call with the most it may move (rate limits); `stat_in`/`stat_out` count bytes and calls.
#[allow(clippy::too_many_arguments)]
pub fn zero_copy(
    src: &Conn,
    dst: &Conn,
    method: Method,
    stop: &AtomicBool,
    step: usize,
    pace: &mut dyn FnMut(usize),
    stat_in: &StageStat,
    stat_out: &StageStat,
    mut prealloc: Option<&mut Prealloc>,
) -> io::Result<Moved> {
    let mut total = 0u64;
    let pipe = if method == Method::Splice {
        let (r, w) = rustix::pipe::pipe()?;
        // A bigger pipe means fewer calls; the default (64 KiB) is the fallback if the limit forbids it.
        let _ = rustix::pipe::fcntl_setpipe_size(&w, step.min(1 << 20));
        Some((r, w))
    } else {
        None
    };
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(Moved::Stopped);
        }
        pace(step);
        let t = crate::stats::Timing::start();
        if let (Method::CopyFileRange, Some(p)) = (method, prealloc.as_deref_mut()) {
            p.before(dst.fd(), step, stat_out);
        }
        stat_in.call(match method {
            Method::CopyFileRange => Call::CopyFileRange,
            Method::Sendfile => Call::Sendfile,
            Method::Splice => Call::Splice,
        });
        let r = match method {
            Method::CopyFileRange => rustix::fs::copy_file_range(src.fd(), None, dst.fd(), None, step),
            Method::Sendfile => rustix::fs::sendfile(dst.fd(), src.fd(), None, step),
            Method::Splice => {
                let (_, w) = pipe.as_ref().expect("a pipe for splice");
                rustix::pipe::splice(
                    src.fd(),
                    None,
                    w,
                    None,
                    step,
                    rustix::pipe::SpliceFlags::MOVE | rustix::pipe::SpliceFlags::MORE,
                )
            }
        };
        stat_in.busy(&t);
        let n = match r {
            Ok(0) if stop.load(Ordering::Acquire) => return Ok(Moved::Stopped),
            Ok(0) => return Ok(Moved::Done),
            Ok(n) => n,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) if total == 0 && unsupported(e) => return Ok(Moved::Unsupported(e.into())),
            Err(e) => return Err(e.into()),
        };
        total += n as u64;
        stat_in.moved(n, n);
        if let Some((r, _)) = &pipe {
            if let Some(p) = prealloc.as_deref_mut() {
                p.before(dst.fd(), n, stat_out);
            }
            let mut left = n;
            while left > 0 {
                let t = crate::stats::Timing::start();
                stat_out.call(Call::Splice);
                let m = rustix::pipe::splice(
                    r,
                    None,
                    dst.fd(),
                    None,
                    left,
                    rustix::pipe::SpliceFlags::MOVE | rustix::pipe::SpliceFlags::MORE,
                );
                stat_out.busy(&t);
                match m {
                    Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "splice wrote nothing")),
                    Ok(m) => {
                        left -= m;
                        stat_out.moved(m, m);
                        if let Some(p) = prealloc.as_deref_mut() {
                            p.wrote(m);
                        }
                    }
                    Err(Errno::INTR | Errno::AGAIN) => continue,
                    Err(e) if total == n as u64 && left == n && unsupported(e) => {
                        // The sink refuses splice (e.g. a file opened for appending): hand over what is in the
                        // pipe by copying, then let the ladder switch the flow to the copying path.
                        let mut buf = Vec::with_capacity(n);
                        while buf.len() < n {
                            if read_into(r.as_fd(), &mut buf, stat_out)? == 0 {
                                break;
                            }
                        }
                        stat_out.copied(buf.len());
                        let all = 0..buf.len();
                        write_ranges(dst.fd(), &buf, std::slice::from_ref(&all), 0, stat_out).map_err(|(_, e)| e)?;
                        stat_out.moved(0, buf.len());
                        if let Some(p) = prealloc.as_deref_mut() {
                            p.wrote(buf.len());
                        }
                        return Ok(Moved::Unsupported(e.into()));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        } else {
            stat_out.moved(n, n);
            if let Some(p) = prealloc.as_deref_mut() {
                p.wrote(n);
            }
        }
    }
}

/// Disk space reserved ahead of a file sink's writes (`fallocate` with `FALLOC_FL_KEEP_SIZE`, [`Prealloc::STEP`] at a
/// time), so that each write lands in blocks already allocated instead of reserving its own (on ext4 a quarter of a
/// page-cache write's CPU at 1 MiB writes). The file's size still grows only with what is written: a reader never sees
/// reserved space, and [`Prealloc::release`] gives back what was not written when the sink closes (a process that
/// dies before leaves it allocated past the end of the file, where a truncate or delete frees it). A sink that is
/// not a regular file, is appended to (another writer may share the file), or whose file system refuses, reserves
/// nothing.
#[derive(Debug, Default)]
pub struct Prealloc {
    /// The file offset the next write starts at (the sink opened the file truncated).
    pos: u64,
    /// Space is reserved up to here.
    end: u64,
    /// Something was reserved (and is released at close).
    used: bool,
    /// Refused once: not asked again.
    off: bool,
}

impl Prealloc {
    /// Reserved at a time: few calls per GB, little left over at a crash.
    pub const STEP: u64 = 16 << 20;

    /// For a sink just opened on `conn`: `None` unless it is a regular file and `from_start` (opened truncated, and
    /// written through the page cache: not appended to, not `direct`).
    pub fn for_sink(conn: &Conn, from_start: bool) -> Option<Prealloc> {
        (from_start && conn.is_file()).then(Prealloc::default)
    }

    /// Before writing `len` bytes: reserves the next step if they would pass the reserved end.
    pub fn before(&mut self, fd: BorrowedFd<'_>, len: usize, stat: &StageStat) {
        let want = self.pos + len as u64;
        if self.off || want <= self.end {
            return;
        }
        let from = self.end.max(self.pos);
        let n = (want - from).max(Self::STEP);
        stat.syscall();
        match rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::KEEP_SIZE, from, n) {
            Ok(()) => {
                self.end = from + n;
                self.used = true;
            }
            // EOPNOTSUPP (the file system), ENOSPC (the write reports it), anything else: write without.
            Err(_) => self.off = true,
        }
    }

    /// After `n` bytes were written.
    pub fn wrote(&mut self, n: usize) {
        self.pos += n as u64;
    }

    /// Frees what was reserved past the file's end (a truncate to its own size), at close.
    pub fn release(&self, fd: BorrowedFd<'_>, stat: &StageStat) -> io::Result<()> {
        if !self.used {
            return Ok(());
        }
        stat.syscall();
        let size = rustix::fs::fstat(fd)?.st_size;
        stat.syscall();
        rustix::fs::ftruncate(fd, size.max(0) as u64)?;
        Ok(())
    }
}

/// The alignment `O_DIRECT` asks of a buffer's address, a write's length and its file offset: the page size, which
/// is a multiple of every logical block size Linux file systems use.
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer of `len` bytes whose start is [`DIRECT_ALIGN`]-aligned, made without `unsafe`: a zeroed vector one
/// alignment longer, used from the first aligned byte. Allocated once and reused, so the zeroing is paid once.
pub struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// `len` is rounded up to [`DIRECT_ALIGN`].
    pub fn new(len: usize) -> Self {
        let len = len.div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN;
        let v = vec![0u8; len + DIRECT_ALIGN];
        let off = (DIRECT_ALIGN - (v.as_ptr() as usize) % DIRECT_ALIGN) % DIRECT_ALIGN;
        AlignedBuf { v, off, len }
    }

    /// The aligned bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }

    /// The aligned bytes, to read into.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Buffers of the direct move: one being filled, the rest written or waiting to be.
const DIRECT_BUFFERS: usize = 4;

/// How [`direct_move`] wrote the file.
#[derive(Debug)]
pub enum DirectEnd {
    /// Everything written: `direct` bytes with `O_DIRECT`, `buffered` through the page cache after clearing
    /// `O_DIRECT`: the unaligned end (under [`DIRECT_ALIGN`] bytes; a direct write must be whole blocks), or every
    /// byte if the file system refused the first direct write.
    Done {
        /// Bytes written with `O_DIRECT`.
        direct: u64,
        /// Bytes written through the page cache.
        buffered: u64,
    },
    /// The file refused `O_DIRECT` before any byte was written (e.g. tmpfs): nothing was read, use another path.
    Refused(io::Error),
    /// Stopped on request.
    Stopped,
}

/// Moves everything from `src` into the regular file `dst` (opened for writing at offset 0, truncated) through
/// aligned user buffers of `step` bytes written with `O_DIRECT`: each byte is copied once, by the receive into a
/// buffer the writer then hands to the device, and never into the page cache. The flow thread fills a buffer
/// completely (several reads), a writer thread writes it, so receiving overlaps the device's writes. A direct write
/// must be whole blocks: the last `len % 4096` bytes are written after clearing `O_DIRECT`, through the page cache.
/// A file that refuses `O_DIRECT` in `fcntl` gets [`DirectEnd::Refused`] before any byte is read; one that refuses
/// the first direct write is written through the page cache from there on (see [`DirectEnd::Done`]).
pub fn direct_move(
    src: &Conn,
    dst: &Conn,
    stop: &AtomicBool,
    step: usize,
    pace: &mut dyn FnMut(usize),
    stat_in: &StageStat,
    stat_out: &StageStat,
) -> io::Result<DirectEnd> {
    let flags = rustix::fs::fcntl_getfl(dst.fd())?;
    stat_out.syscall();
    if let Err(e) = rustix::fs::fcntl_setfl(dst.fd(), flags | rustix::fs::OFlags::DIRECT) {
        return Ok(DirectEnd::Refused(e.into()));
    }
    let (full_tx, full_rx) = crossbeam_channel::bounded::<(AlignedBuf, usize)>(DIRECT_BUFFERS);
    let (free_tx, free_rx) = crossbeam_channel::bounded::<AlignedBuf>(DIRECT_BUFFERS);
    // Buffers are made as the move needs them (a small move pays for one), up to DIRECT_BUFFERS.
    let mut made = 0;
    std::thread::scope(|scope| {
        // The writer: whole blocks with O_DIRECT at increasing offsets, then the tail through the page cache.
        let writer = scope.spawn(move || -> io::Result<(u64, u64)> {
            let (mut direct, mut buffered) = (0u64, 0u64);
            let mut at = 0u64;
            let mut direct_on = true;
            for (buf, len) in full_rx {
                let t = crate::stats::Timing::start();
                let aligned = len / DIRECT_ALIGN * DIRECT_ALIGN;
                let mut done = 0;
                while done < len {
                    if direct_on && done >= aligned {
                        // The unaligned end: O_DIRECT writes whole blocks only, so it goes through the page cache.
                        stat_out.syscall();
                        rustix::fs::fcntl_setfl(dst.fd(), flags)?;
                        direct_on = false;
                    }
                    let end = if direct_on { aligned } else { len };
                    stat_out.syscall();
                    match rustix::io::pwrite(dst.fd(), &buf.bytes()[done..end], at) {
                        Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing")),
                        Ok(n) => {
                            if direct_on {
                                direct += n as u64;
                            } else {
                                buffered += n as u64;
                            }
                            done += n;
                            at += n as u64;
                        }
                        Err(Errno::INTR) => {}
                        Err(Errno::INVAL) if direct_on && at == 0 => {
                            // Accepted by fcntl, refused by the file system's write path: no O_DIRECT for this
                            // file, every byte goes through the page cache (still one copy, from a hot buffer).
                            stat_out.syscall();
                            rustix::fs::fcntl_setfl(dst.fd(), flags)?;
                            direct_on = false;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                stat_out.busy(&t);
                stat_out.moved(len, len);
                if free_tx.send(buf).is_err() {
                    break;
                }
            }
            Ok((direct, buffered))
        });
        let read = (|| -> io::Result<bool> {
            loop {
                let mut buf = match free_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) if made < DIRECT_BUFFERS => {
                        made += 1;
                        AlignedBuf::new(step)
                    }
                    Err(_) => match free_rx.recv() {
                        Ok(b) => b,
                        // The writer failed: its error is the move's.
                        Err(_) => return Ok(true),
                    },
                };
                let mut len = 0;
                let mut eof = false;
                let cap = buf.bytes().len();
                while len < cap {
                    if stop.load(Ordering::Acquire) {
                        return Ok(false);
                    }
                    pace(cap - len);
                    let t = crate::stats::Timing::start();
                    stat_in.syscall();
                    let r = rustix::io::read(src.fd(), &mut buf.bytes_mut()[len..]);
                    stat_in.busy(&t);
                    match r {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => {
                            stat_in.moved(n, n);
                            stat_in.copied(n);
                            len += n;
                        }
                        Err(Errno::INTR | Errno::AGAIN) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                if eof && stop.load(Ordering::Acquire) {
                    // An interrupted read looks like the end of input.
                    return Ok(false);
                }
                if len > 0 && full_tx.send((buf, len)).is_err() {
                    // The writer failed: its error is the move's.
                    return Ok(true);
                }
                if eof {
                    return Ok(true);
                }
            }
        })();
        drop(full_tx);
        let written = writer.join().map_err(|_| io::Error::other("the direct writer panicked"))?;
        // Leave the descriptor as it was found, whatever happened.
        let _ = rustix::fs::fcntl_setfl(dst.fd(), flags);
        match read {
            Ok(false) => Ok(DirectEnd::Stopped),
            Err(e) => Err(e),
            Ok(true) => {
                let (direct, buffered) = written?;
                Ok(DirectEnd::Done { direct, buffered })
            }
        }
    })
}

/// A file sink written with `O_DIRECT` behind a transform: the chunk's ranges (e.g. decrypted records, which lie
/// between their headers and tags) are gathered into an aligned buffer, cache-hot right after the transform
/// wrote them, and each full buffer is written with one direct write; nothing is copied into the page cache. The
/// unaligned end is written through the page cache by [`DirectWriter::finish`].
#[derive(Debug)]
pub struct DirectWriter {
    buf: AlignedBuf,
    fill: usize,
    at: u64,
    on: bool,
    flags: rustix::fs::OFlags,
    /// Bytes written with `O_DIRECT` and through the page cache.
    pub direct: u64,
    /// Bytes written through the page cache (the unaligned end, or all if the file system refused direct writes).
    pub buffered: u64,
}

impl DirectWriter {
    /// Sets `O_DIRECT` on `fd` (a regular file opened for writing, at offset 0); an error if the file refuses it.
    pub fn new(fd: BorrowedFd<'_>, cap: usize) -> io::Result<Self> {
        let flags = rustix::fs::fcntl_getfl(fd)?;
        rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::DIRECT)?;
        Ok(DirectWriter { buf: AlignedBuf::new(cap), fill: 0, at: 0, on: true, flags, direct: 0, buffered: 0 })
    }

    /// Gathers the ranges and writes every full buffer.
    pub fn write_ranges(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: &[u8],
        segs: &[std::ops::Range<usize>],
        stat: &StageStat,
    ) -> io::Result<()> {
        let cap = self.buf.bytes().len();
        let mut total = 0;
        for r in segs {
            let mut src = &buf[r.clone()];
            while !src.is_empty() {
                let n = (cap - self.fill).min(src.len());
                self.buf.bytes_mut()[self.fill..self.fill + n].copy_from_slice(&src[..n]);
                self.fill += n;
                total += n;
                src = &src[n..];
                if self.fill == cap {
                    self.flush(fd, stat, false)?;
                }
            }
        }
        stat.copied(total);
        Ok(())
    }

    /// Writes what the buffer holds: its whole blocks with `O_DIRECT`; with `all`, the rest too, through the page
    /// cache.
    fn flush(&mut self, fd: BorrowedFd<'_>, stat: &StageStat, all: bool) -> io::Result<()> {
        let aligned = self.fill / DIRECT_ALIGN * DIRECT_ALIGN;
        let mut done = 0;
        let upto = if all { self.fill } else { aligned };
        while done < upto {
            if self.on && done >= aligned {
                stat.syscall();
                rustix::fs::fcntl_setfl(fd, self.flags)?;
                self.on = false;
            }
            let end = if self.on { aligned } else { upto };
            stat.syscall();
            match rustix::io::pwrite(fd, &self.buf.bytes()[done..end], self.at) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing")),
                Ok(n) => {
                    if self.on {
                        self.direct += n as u64;
                    } else {
                        self.buffered += n as u64;
                    }
                    done += n;
                    self.at += n as u64;
                }
                Err(Errno::INTR) => {}
                Err(Errno::INVAL) if self.on && self.at == 0 => {
                    // Refused by the file system's write path: through the page cache from here on.
                    stat.syscall();
                    rustix::fs::fcntl_setfl(fd, self.flags)?;
                    self.on = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if done < self.fill {
            self.buf.bytes_mut().copy_within(done..self.fill, 0);
        }
        self.fill -= done;
        Ok(())
    }

    /// Writes everything left (the unaligned end through the page cache) and restores the descriptor's flags.
    pub fn finish(&mut self, fd: BorrowedFd<'_>, stat: &StageStat) -> io::Result<()> {
        let r = self.flush(fd, stat, true);
        let _ = rustix::fs::fcntl_setfl(fd, self.flags);
        self.on = false;
        r
    }
}

/// Sleeps up to `d`, waking early when `stop` is set.
pub fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = std::time::Instant::now() + d;
    while !stop.load(Ordering::Acquire) {
        let now = std::time::Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}
