//! The memory file, its mapping and the two rings in it: the one module with `unsafe` code (see the crate's header
//! for the layout and the invariants).

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{FileType, MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::ShmError;

/// The first word of a region.
const MAGIC: u64 = u64::from_le_bytes(*b"KECHOSHM");
/// The layout's version.
pub(crate) const VERSION: u32 = 1;
/// The header page: the header and both rings' control blocks; the data areas follow.
const HEADER: usize = 4096;
/// Where each ring's control block starts.
const CTRL: [usize; 2] = [128, 384];
/// A control block's two lines (128 bytes, so that adjacent-line prefetch does not make them share).
const LINE: usize = 128;
/// Offsets in a control block. The producer's line:
const HEAD: usize = 0;
const WRITER_WAITING: usize = 8;
const CLOSED: usize = 12;
/// The consumer's line:
const TAIL: usize = LINE;
const READER_WAITING: usize = LINE + 8;

/// The smallest ring, in bytes.
pub const MIN_RING: usize = 4096;
/// The largest ring, in bytes.
pub const MAX_RING: usize = 1 << 30;

/// A mapping of a memory file, unmapped when the last ring end using it goes.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is memory shared with another process. This process touches it only through the atomics and
// raw copies below, never through references, and each ring end (the only users) is owned by one task at a time;
// handing the handle to another thread adds nothing that one thread could not do.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` gives access only through atomics and through the copies of a ring end, which needs
// `&mut` of that end.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are exactly what `mmap` returned, and no pointer into the mapping outlives `self`:
        // every ring end holds an `Arc<Mapping>`, and atomics borrowed from it borrow it.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl Mapping {
    /// Maps `len` bytes of `fd`, which the caller has checked is a memory file of at least `len` bytes that cannot
    /// shrink.
    fn new(fd: OwnedFd, len: usize) -> Result<Mapping, ShmError> {
        // SAFETY: a new shared mapping at an address the kernel picks (null hint) overlaps nothing this process uses;
        // the file is at least `len` bytes long and sealed against shrinking, so every page stays backed and no
        // access through the mapping can fault.
        let p = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, &fd, 0)
        }
        .map_err(ShmError::os("mapping the shared memory"))?;
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| ShmError::Invalid("mapped at address 0".into()))?;
        Ok(Mapping { base, len, fd })
    }

    /// The header word at `off`.
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= HEADER && HEADER <= self.len);
        // SAFETY: in bounds (asserted), aligned (the mapping is page-aligned and `off` a multiple of 8), valid for as
        // long as `&self` (unmapped only on drop). This process accesses the header only through atomics; the peer's
        // accesses are outside its memory model, and an aligned 8-byte access is atomic on the hardware whoever makes
        // it.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    /// The header word at `off` (32 bits).
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= HEADER && HEADER <= self.len);
        // SAFETY: as in `u64_at`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast()) }
    }
}

/// Which end of a link a process is: the dialler creates the region, writes ring 0 and reads ring 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that created the region (writes ring 0).
    Creator,
    /// The side that was handed the region (writes ring 1).
    Opener,
}

/// A mapped region holding two rings.
pub struct Region {
    map: Arc<Mapping>,
    cap: usize,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("ring_bytes", &self.cap).finish()
    }
}

impl Region {
    /// Creates a region whose rings hold `ring_bytes` each (rounded up to a power of two within
    /// [`MIN_RING`]..=[`MAX_RING`]), in a new memory file sealed against resizing.
    pub fn create(ring_bytes: usize) -> Result<Region, ShmError> {
        let cap = ring_bytes.clamp(MIN_RING, MAX_RING).next_power_of_two();
        let len = HEADER + 2 * cap;
        let fd = rustix::fs::memfd_create("kecho-shm", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(ShmError::os("creating a memory file"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(ShmError::os("sizing the memory file"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(ShmError::os("sealing the memory file"))?;
        let map = Arc::new(Mapping::new(fd, len)?);
        // A new memory file reads as zeros: every index and flag starts at 0.
        map.u64_at(0).store(MAGIC, Ordering::Relaxed);
        map.u32_at(8).store(VERSION, Ordering::Relaxed);
        map.u32_at(12).store(cap as u32, Ordering::Relaxed);
        Ok(Region { map, cap })
    }

    /// Maps a region another process created, after checking that it is a memory file that cannot be resized, with
    /// a valid layout of this version.
    pub fn open(fd: OwnedFd) -> Result<Region, ShmError> {
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|e| ShmError::Invalid(format!("not a sealable memory file ({e})")))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(ShmError::Invalid("the memory file is not sealed against resizing".into()));
        }
        let st = rustix::fs::fstat(&fd).map_err(ShmError::os("reading the memory file's size"))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(ShmError::Invalid("not a regular memory file".into()));
        }
        let len = usize::try_from(st.st_size).map_err(|_| ShmError::Invalid("negative size".into()))?;
        let cap = len.checked_sub(HEADER).map_or(0, |d| d / 2);
        if len != HEADER + 2 * cap || !cap.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&cap) {
            return Err(ShmError::Invalid(format!("a size of {len} bytes is no valid layout")));
        }
        let map = Arc::new(Mapping::new(fd, len)?);
        let (magic, version, said) = (
            map.u64_at(0).load(Ordering::Relaxed),
            map.u32_at(8).load(Ordering::Relaxed),
            map.u32_at(12).load(Ordering::Relaxed),
        );
        if magic != MAGIC || version != VERSION || said as usize != cap {
            return Err(ShmError::Invalid(format!(
                "header {magic:#x} version {version} ring {said} (want version {VERSION}, ring {cap})"
            )));
        }
        Ok(Region { map, cap })
    }

    /// The memory file, to pass to the other process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd.as_fd()
    }

    /// Bytes each ring holds.
    pub fn ring_bytes(&self) -> usize {
        self.cap
    }

    /// The ends `side` uses: the producer of the ring it writes and the consumer of the ring it reads. Call it once
    /// per process: two producers of one ring would corrupt it (each keeps its own `head`).
    pub fn split(self, side: Side) -> (Producer, Consumer) {
        let (out, inn) = match side {
            Side::Creator => (0, 1),
            Side::Opener => (1, 0),
        };
        let ring = |i: usize| Ring { map: self.map.clone(), ctrl: CTRL[i], data: HEADER + i * self.cap, cap: self.cap };
        (Producer { ring: ring(out), head: 0 }, Consumer { ring: ring(inn), tail: 0 })
    }
}

/// One ring of a region, as one end sees it.
struct Ring {
    map: Arc<Mapping>,
    /// Offset of its control block.
    ctrl: usize,
    /// Offset of its data area.
    data: usize,
    /// Its size, a power of two; `data + cap <= map.len`.
    cap: usize,
}

impl Ring {
    fn word(&self, off: usize) -> &AtomicU64 {
        self.map.u64_at(self.ctrl + off)
    }

    fn flag(&self, off: usize) -> &AtomicU32 {
        self.map.u32_at(self.ctrl + off)
    }

    /// Where byte count `pos` lives in the data area, and how many bytes of a copy of `len` fit before the end.
    fn place(&self, pos: u64, len: usize) -> (usize, usize) {
        assert!(len <= self.cap && self.data + self.cap <= self.map.len);
        let off = (pos as usize) & (self.cap - 1);
        (off, len.min(self.cap - off))
    }

    /// Copies `src` into the data area from count `pos` on (wrapping at the end). `src.len() <= cap`.
    fn copy_in(&self, pos: u64, src: &[u8]) {
        let (off, first) = self.place(pos, src.len());
        // SAFETY: `off < cap` and `first <= cap - off`, so `[off, off + first)` is inside the data area, and the rest,
        // `src.len() - first <= off` bytes (since `src.len() <= cap`), goes to `[0, rest)`, also inside and not
        // overlapping the first part; the data area lies inside the mapping (`place` asserts it). `src` is private
        // memory of this process (no reference into the mapping is ever handed out), so the copies do not overlap it.
        unsafe {
            let d = self.map.base.as_ptr().add(self.data);
            std::ptr::copy_nonoverlapping(src.as_ptr(), d.add(off), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), d, src.len() - first);
        }
    }

    /// Copies `dst.len()` bytes from count `pos` on out of the data area. `dst.len() <= cap`.
    fn copy_out(&self, pos: u64, dst: &mut [MaybeUninit<u8>]) {
        let (off, first) = self.place(pos, dst.len());
        // SAFETY: the same bounds as in `copy_in`, in the other direction; `dst` is private memory of this process.
        // Writing initialised bytes into `MaybeUninit<u8>` is always sound.
        unsafe {
            let s = self.map.base.as_ptr().add(self.data);
            let d = dst.as_mut_ptr().cast::<u8>();
            std::ptr::copy_nonoverlapping(s.add(off), d, first);
            std::ptr::copy_nonoverlapping(s, d.add(first), dst.len() - first);
        }
    }
}

/// The writing end of a ring.
pub struct Producer {
    ring: Ring,
    /// Bytes written so far (the published `head` is a copy of it).
    head: u64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("head", &self.head).field("cap", &self.ring.cap).finish()
    }
}

impl Producer {
    /// Bytes that can be written now; an error if the consumer's `tail` is impossible.
    pub fn room(&self) -> Result<usize, ShmError> {
        let tail = self.ring.word(TAIL).load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        if used > self.ring.cap as u64 {
            return Err(ShmError::Corrupt("the reader's position is outside the ring"));
        }
        Ok(self.ring.cap - used as usize)
    }

    /// Writes as much of `bufs`, in order, as there is room for, and publishes it; returns how much.
    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, ShmError> {
        let room = self.room()?;
        let mut n = 0;
        for b in bufs {
            if n == room {
                break;
            }
            let k = b.len().min(room - n);
            self.ring.copy_in(self.head.wrapping_add(n as u64), &b[..k]);
            n += k;
        }
        if n > 0 {
            self.head = self.head.wrapping_add(n as u64);
            self.ring.word(HEAD).store(self.head, Ordering::Release);
        }
        Ok(n)
    }

    /// Writes as much of `buf` as there is room for; returns how much.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, ShmError> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// After a write: whether the reader said it sleeps, clearing its flag. `true` means the caller must wake it.
    pub fn take_reader_asleep(&self) -> bool {
        // Publish-then-check: pairs with the fence in `Consumer::sleep`.
        fence(Ordering::SeqCst);
        let f = self.ring.flag(READER_WAITING);
        f.load(Ordering::Relaxed) != 0 && f.swap(0, Ordering::Relaxed) != 0
    }

    /// Says that this writer is about to wait for room, and returns the room there is after saying so: if any, do
    /// not wait (call [`Producer::awake`]); if none, the reader will wake the writer once it frees some.
    pub fn sleep(&self) -> Result<usize, ShmError> {
        self.ring.flag(WRITER_WAITING).store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.room()
    }

    /// Takes back [`Producer::sleep`].
    pub fn awake(&self) {
        self.ring.flag(WRITER_WAITING).store(0, Ordering::Relaxed);
    }

    /// Marks the end of the stream: the reader reads what was written, then the end.
    pub fn close(&mut self) {
        self.ring.flag(CLOSED).store(1, Ordering::Release);
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.head
    }
}

/// The reading end of a ring.
pub struct Consumer {
    ring: Ring,
    /// Bytes read so far (the published `tail` is a copy of it).
    tail: u64,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("tail", &self.tail).field("cap", &self.ring.cap).finish()
    }
}

impl Consumer {
    /// Bytes that can be read now; an error if the producer's `head` is impossible.
    pub fn available(&self) -> Result<usize, ShmError> {
        let head = self.ring.word(HEAD).load(Ordering::Acquire);
        let n = head.wrapping_sub(self.tail);
        if n > self.ring.cap as u64 {
            return Err(ShmError::Corrupt("the writer's position is outside the ring"));
        }
        Ok(n as usize)
    }

    /// Reads up to `dst.len()` bytes into `dst`; returns how many (0: the ring is empty).
    pub fn read_uninit(&mut self, dst: &mut [MaybeUninit<u8>]) -> Result<usize, ShmError> {
        let n = self.available()?.min(dst.len());
        if n > 0 {
            self.ring.copy_out(self.tail, &mut dst[..n]);
            self.tail = self.tail.wrapping_add(n as u64);
            self.ring.word(TAIL).store(self.tail, Ordering::Release);
        }
        Ok(n)
    }

    /// Reads up to `dst.len()` bytes into `dst`; returns how many.
    pub fn read(&mut self, dst: &mut [u8]) -> Result<usize, ShmError> {
        let mut tmp = Vec::new();
        tmp.resize(dst.len(), MaybeUninit::uninit());
        let n = self.read_uninit(&mut tmp)?;
        for (d, s) in dst.iter_mut().zip(&tmp[..n]) {
            // SAFETY: `read_uninit` initialised the first `n` bytes of `tmp`.
            *d = unsafe { s.assume_init_read() };
        }
        Ok(n)
    }

    /// Reads into the unfilled part of `buf` and advances it; returns how many bytes.
    pub fn read_buf(&mut self, buf: &mut tokio::io::ReadBuf<'_>) -> Result<usize, ShmError> {
        // SAFETY: only initialised bytes are written into the unfilled part (`read_uninit` copies whole bytes).
        let unfilled = unsafe { buf.unfilled_mut() };
        let n = self.read_uninit(unfilled)?;
        // SAFETY: `read_uninit` initialised the first `n` bytes of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Ok(n)
    }

    /// After a read: whether the writer said it waits for room, clearing its flag. `true`: the caller must wake it.
    pub fn take_writer_asleep(&self) -> bool {
        fence(Ordering::SeqCst);
        let f = self.ring.flag(WRITER_WAITING);
        f.load(Ordering::Relaxed) != 0 && f.swap(0, Ordering::Relaxed) != 0
    }

    /// Says that this reader is about to sleep, and returns what is readable after saying so: if anything (or the
    /// stream is closed), do not sleep (call [`Consumer::awake`]); if nothing, the writer will wake the reader.
    pub fn sleep(&self) -> Result<usize, ShmError> {
        self.ring.flag(READER_WAITING).store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.available()
    }

    /// Takes back [`Consumer::sleep`].
    pub fn awake(&self) {
        self.ring.flag(READER_WAITING).store(0, Ordering::Relaxed);
    }

    /// The writer closed the stream ([`Producer::close`]); what it wrote before is readable (check
    /// [`Consumer::available`] after this).
    pub fn is_closed(&self) -> bool {
        self.ring.flag(CLOSED).load(Ordering::Acquire) != 0
    }

    /// Bytes read so far.
    pub fn consumed(&self) -> u64 {
        self.tail
    }

    /// Bytes the ring holds.
    pub fn capacity(&self) -> usize {
        self.ring.cap
    }
}

#[cfg(test)]
impl Region {
    /// Overwrites a header word as a misbehaving peer could (tests only).
    fn scribble(&self, ring: usize, consumer_line: bool, value: u64) {
        let off = CTRL[ring] + if consumer_line { TAIL } else { HEAD };
        self.map.u64_at(off).store(value, Ordering::Relaxed);
    }

    /// A second mapping of the same file, as the other process has it.
    fn reopen(&self) -> Region {
        let fd = self.map.fd.try_clone().unwrap();
        Region::open(fd).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pattern(i: u64) -> u8 {
        (i.wrapping_mul(0x9e37_79b9) >> 13) as u8
    }

    #[test]
    fn bytes_wrap_around_the_end_in_order() {
        let r = Region::create(MIN_RING).unwrap();
        let other = r.reopen();
        let (mut p, _) = r.split(Side::Creator);
        let (_, mut c) = other.split(Side::Opener);
        let mut next_in = 0u64;
        let mut next_out = 0u64;
        for round in 0..50u64 {
            let len = (round * 997 % 4000) as usize + 1;
            let chunk: Vec<u8> = (next_in..next_in + len as u64).map(pattern).collect();
            assert_eq!(p.write(&chunk).unwrap(), len);
            next_in += len as u64;
            assert!(!c.take_writer_asleep());
            let mut out = vec![0u8; 5000];
            let n = c.read(&mut out).unwrap();
            assert_eq!(n, len);
            for (k, b) in out[..n].iter().enumerate() {
                assert_eq!(*b, pattern(next_out + k as u64));
            }
            next_out += n as u64;
        }
    }

    #[test]
    fn a_full_ring_takes_no_more_and_frees_room_as_it_is_read() {
        let r = Region::create(MIN_RING).unwrap();
        let other = r.reopen();
        let (mut p, _) = r.split(Side::Creator);
        let (_, mut c) = other.split(Side::Opener);
        assert_eq!(p.write(&[7u8; 5000]).unwrap(), MIN_RING);
        assert_eq!(p.write(&[7u8; 1]).unwrap(), 0);
        assert_eq!(p.sleep().unwrap(), 0);
        let mut out = [0u8; 100];
        assert_eq!(c.read(&mut out).unwrap(), 100);
        assert!(c.take_writer_asleep(), "the writer said it sleeps");
        assert!(!c.take_writer_asleep(), "one wake-up per sleep");
        assert_eq!(p.room().unwrap(), 100);
    }

    #[test]
    fn a_sleeping_reader_is_woken_once() {
        let r = Region::create(MIN_RING).unwrap();
        let other = r.reopen();
        let (mut p, _) = r.split(Side::Creator);
        let (_, c) = other.split(Side::Opener);
        assert_eq!(c.sleep().unwrap(), 0);
        p.write(b"x").unwrap();
        assert!(p.take_reader_asleep());
        p.write(b"y").unwrap();
        assert!(!p.take_reader_asleep(), "already woken");
        assert_eq!(c.available().unwrap(), 2);
        assert!(!c.is_closed());
        p.close();
        assert!(c.is_closed());
    }

    #[test]
    fn impossible_indices_are_errors_not_accesses() {
        let r = Region::create(MIN_RING).unwrap();
        let other = r.reopen();
        let evil = r.reopen();
        let (mut p, _) = r.split(Side::Creator);
        let (_, mut c) = other.split(Side::Opener);
        // A head far ahead of the tail: the reader refuses it.
        evil.scribble(0, false, (MIN_RING as u64) + 1);
        assert!(matches!(c.available(), Err(ShmError::Corrupt(_))));
        let mut out = [0u8; 16];
        assert!(c.read(&mut out).is_err());
        // A head behind the tail (wrapping: huge).
        evil.scribble(0, false, u64::MAX);
        assert!(c.read(&mut out).is_err());
        // A tail ahead of the writer's head: the writer refuses it.
        evil.scribble(0, true, 5);
        assert!(matches!(p.room(), Err(ShmError::Corrupt(_))));
        assert!(p.write(b"abc").is_err());
        // Values within bounds are taken: a malformed stream, not an error here (the frames decide).
        evil.scribble(0, true, 0);
        evil.scribble(0, false, 10);
        assert_eq!(c.read(&mut out).unwrap(), 10);
    }

    #[test]
    fn files_that_could_shrink_or_have_no_layout_are_refused() {
        let fd = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, (HEADER + 2 * MIN_RING) as u64).unwrap();
        let again = fd.try_clone().unwrap();
        assert!(matches!(Region::open(fd), Err(ShmError::Invalid(_))), "not sealed");
        rustix::fs::fcntl_add_seals(&again, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        let e = Region::open(again).unwrap_err();
        assert!(e.to_string().contains("header"), "{e}");
        let odd = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&odd, (HEADER + 3 * MIN_RING) as u64).unwrap();
        rustix::fs::fcntl_add_seals(&odd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        assert!(Region::open(odd).unwrap_err().to_string().contains("no valid layout"));
        let not_memfd = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(Region::open(not_memfd.into()).is_err());
        // A region made here opens, and cannot be shrunk by anyone.
        let r = Region::create(10_000).unwrap();
        assert_eq!(r.ring_bytes(), 16384);
        assert!(rustix::fs::ftruncate(r.fd(), 0).is_err());
    }

    /// Two threads, one writing chunks of random sizes and one reading into buffers of random sizes, each spinning
    /// when it cannot go on: every byte arrives, in order.
    fn interleave(ring: usize, writes: Vec<usize>, reads: Vec<usize>) {
        let r = Region::create(ring).unwrap();
        let other = r.reopen();
        let (mut p, _) = r.split(Side::Creator);
        let (_, mut c) = other.split(Side::Opener);
        let total: u64 = writes.iter().map(|&w| w as u64).sum();
        let writer = std::thread::spawn(move || {
            let mut pos = 0u64;
            for w in writes {
                let chunk: Vec<u8> = (pos..pos + w as u64).map(pattern).collect();
                let mut done = 0;
                while done < chunk.len() {
                    let n = p.write(&chunk[done..]).unwrap();
                    if n == 0 {
                        std::thread::yield_now();
                    }
                    done += n;
                }
                pos += w as u64;
            }
            p.close();
        });
        let mut got = 0u64;
        let mut i = 0;
        loop {
            let mut buf = vec![0u8; reads[i % reads.len()]];
            i += 1;
            let closed = c.is_closed();
            let n = c.read(&mut buf).unwrap();
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(got + k as u64), "byte {} wrong", got + k as u64);
            }
            got += n as u64;
            if n == 0 {
                if closed {
                    break;
                }
                std::thread::yield_now();
            }
        }
        writer.join().unwrap();
        assert_eq!(got, total);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn two_threads_keep_every_byte_in_order(
            ring in prop::sample::select(vec![4096usize, 8192, 65536]),
            writes in prop::collection::vec(1usize..20_000, 1..200),
            reads in prop::collection::vec(1usize..20_000, 1..50),
        ) {
            interleave(ring, writes, reads);
        }
    }
}
