//! Shared-memory byte streams between two processes of one host: kecho's same-host links run over them.
//!
//! A link between two nodes of one host is a connected Unix-domain stream socket (the *control socket*) plus a
//! memory file (`memfd`) that the dialling side creates and passes over the socket (`SCM_RIGHTS`) before anything
//! else is said. The file holds two single-producer/single-consumer byte rings, one per direction. The link code above
//! reads and writes them as a byte stream ([`ShmReader`] is a tokio `AsyncRead`, [`ShmWriter`] an `AsyncWrite`), so
//! framing, order, the handshake, heartbeats and loss accounting are the same code as over TCP.
//!
//! The control socket carries only the set-up message and one-byte wake-ups, and its end is the peer's end: a
//! process that exits or crashes closes it, and the reader sees that at once. Wake-ups cost a system call only when
//! the other side said it sleeps: a reader that finds its ring empty sets a flag in the ring's header, checks the ring
//! once more and waits on the socket; a writer that publishes bytes sends a byte on the socket only if that flag was
//! set (and clears it). So a busy stream costs no system call per write. The same holds the other way for a writer
//! that finds the ring full: it waits on a second socket pair of its own (the *room* socket) whose other end the peer
//! holds. In the low-latency mode a reader first polls its ring for a bounded budget before it sleeps (a load from
//! memory per try, no system call).
//!
//! # Layout of the memory file (version 1)
//!
//! ```text
//! 0      header: magic "KECHOSHM" (u64), version (u32), ring size in bytes (u32): written once by the creator
//! 128    ring 0 control: producer's line: head (u64), writer-waiting (u32), closed (u32)
//! 256                     consumer's line: tail (u64), reader-waiting (u32)
//! 384    ring 1 control, the same
//! 4096   ring 0 data (the ring size, a power of two from 4 KiB to 1 GiB): dialler -> acceptor
//! 4096+N ring 1 data: acceptor -> dialler
//! ```
//!
//! `head` and `tail` count bytes since the start and never wrap in practice (u64); a byte at count `i` lives at
//! `i mod N`. The bytes between `tail` and `head` are the consumer's to read; the rest is the producer's to write.
//!
//! # Who writes what, and what a peer can do (the invariants the `unsafe` code rests on)
//!
//! - Only `region.rs` has `unsafe` code: the mapping, the atomics over shared memory and the copies in and out of the
//!   rings. Every other module forbids it.
//! - Each side keeps its own index (the producer's `head`, the consumer's `tail`) in private memory and only
//!   *publishes* it to the shared header; it never reads its own index back from shared memory. It reads the other
//!   side's index with an acquire load and checks it: a `head` more than `N` bytes ahead of our `tail`, or a `tail`
//!   behind our `head` by more than `N` (or ahead of it), is [`ShmError::Corrupt`], which the link reports as a
//!   malformed stream and closes. Every offset into the data area is reduced modulo `N`, and every copy length is at
//!   most what a checked index allows (at most `N`): no access leaves the mapping whatever the peer writes.
//! - No reference (`&[u8]`, `&T`) to shared memory is ever made, only raw pointers, and data is copied between shared
//!   and private memory exactly once: decisions (frame lengths, kinds) are made on the private copy. A peer that
//!   scribbles over the data area while we copy changes only which bytes we get, never where we copy; the frames
//!   they make are decoded with the link's ordinary checks (a malformed frame closes the link).
//! - The header words are accessed only with atomic operations (aligned, inside the first page).
//! - The acceptor maps a file it receives only if it is a regular memory file sealed against shrinking and growing
//!   (`F_SEAL_SHRINK | F_SEAL_GROW`) with a size that matches a valid layout: nobody, not even its creator, can then
//!   truncate it under our mapping (which would fault with SIGBUS).
//! - A peer can make us wait (never publish, never free room) or wake us needlessly; neither is unbounded: the link's
//!   heartbeat finds a peer that stalls, and a wake-up is one byte that we read and drop. Every system call we make
//!   on a descriptor the peer also holds is non-blocking per call (`MSG_DONTWAIT`), so a peer that changes a shared
//!   descriptor's flags cannot block us.
//! - Memory ordering: a producer copies bytes in, then stores `head` with release; a consumer loads `head` with
//!   acquire, copies out, then stores `tail` with release; a producer loads `tail` with acquire before it reuses room.
//!   The sleep flags follow the store-fence-load pattern on both sides (set flag, `SeqCst` fence, re-check the index;
//!   publish the index, `SeqCst` fence, check the flag), so at least one side sees the other: no lost wake-up.
//!
//! Miri cannot map a memory file, and it is not installed where this was built; the ring's logic is tested with
//! random interleavings of two threads over a real mapping (`region.rs`'s tests) and end to end over sockets
//! (`tests/stream.rs`).

#![deny(unsafe_op_in_unsafe_fn)]

mod region;
mod stream;

pub use region::{Consumer, Producer, Region, Side, MAX_RING, MIN_RING};
pub use stream::{accept, connect, Accepted, Options, ShmReader, ShmWriter, DEFAULT_RING};

/// Why a shared-memory stream could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// A system call failed (creating, sealing or mapping the memory file, or on the control socket).
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// The memory file or the set-up message the peer sent is not what this version accepts.
    #[error("peer's shared memory refused: {0}")]
    Invalid(String),
    /// The peer refused our set-up (its reason code).
    #[error("peer refused the shared-memory set-up (code {0})")]
    Refused(u32),
    /// The peer closed the control socket during the set-up.
    #[error("the peer closed the connection during the shared-memory set-up")]
    Closed,
    /// An index the peer wrote into shared memory is impossible: the stream cannot be trusted any more.
    #[error("shared-memory ring corrupt: {0}")]
    Corrupt(&'static str),
}

impl ShmError {
    pub(crate) fn os(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
        move |e| ShmError::Os { what, source: e.into() }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ShmError {
        move |source| ShmError::Os { what, source }
    }
}

impl From<ShmError> for std::io::Error {
    fn from(e: ShmError) -> std::io::Error {
        match e {
            ShmError::Os { source, .. } => source,
            ShmError::Closed => std::io::ErrorKind::UnexpectedEof.into(),
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}
