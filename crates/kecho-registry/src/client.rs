//! Registry clients: over TCP, or in-process on a shared table.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kecho_proto::codec::{decode_frame, CloseCode, Purpose, RegEntry, RegErrorCode, RegResult};
use kecho_proto::registry::RegistryTable;
use kecho_proto::{Message, NodeId, PROTOCOL_VERSION};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::{now, RegistryError, ReplicaOutcome, MAX_REGISTRY_FRAME};

/// Default time allowed for the TCP connection to a registry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time allowed for the handshake and for each request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for the TCP connection to one replica of a replicated registry.
pub const REPLICA_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A replica that failed a request is avoided for this long (unless every replica failed).
const AVOID_FAILED: Duration = Duration::from_secs(2);
/// Requests are written together up to this many bytes.
const WRITE_BATCH: usize = 64 << 10;

/// A way to reach a registry. Cheap to clone; clones share the table or the connection.
#[derive(Clone, Debug)]
pub enum RegistryClient {
    /// A lease table in this process: no server, no sockets.
    InProcess(InProcessRegistry),
    /// A registry server reached over TCP.
    Remote(RemoteRegistry),
}

/// A lease table in this process, shared by every clone.
#[derive(Clone)]
pub struct InProcessRegistry {
    table: Arc<Mutex<RegistryTable>>,
}

impl fmt::Debug for InProcessRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessRegistry").field("entries", &self.table.lock().len()).finish()
    }
}

/// A registry server reached over one persistent TCP connection, made on the first request and made again on the
/// request after a failure. Requests are pipelined on it and matched to answers by their request id. Clones share the
/// connection; each clone has its own timeouts.
#[derive(Clone)]
pub struct RemoteRegistry {
    shared: Arc<Shared>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl fmt::Debug for RemoteRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteRegistry")
            .field("addrs", &self.shared.addrs)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("connected", &self.shared.link.lock().as_ref().is_some_and(|l| l.state.alive()))
            .finish()
    }
}

static GLOBAL: OnceLock<Arc<Mutex<RegistryTable>>> = OnceLock::new();

impl RegistryClient {
    /// A registry at `addr`, reached over TCP. Nothing happens until the first request, which connects (within
    /// [`CONNECT_TIMEOUT`]); every request must be answered within [`REQUEST_TIMEOUT`]. See
    /// [`RegistryClient::with_timeouts`].
    pub fn remote(addr: SocketAddr) -> Self {
        Self::replicated(vec![addr])
    }

    /// A replicated registry whose replicas are at `addrs` (one address is [`RegistryClient::remote`]). Requests go
    /// to the leader: a replica that is not the leader names it, and the client asks there; a replica that is down
    /// or cut off is left for the next. A request fails only when no leader answered within twice the request
    /// timeout; each attempt on one replica gets a quarter of it. An empty list is treated as the default registry
    /// address's absence: every request fails as unreachable.
    pub fn replicated(addrs: Vec<SocketAddr>) -> Self {
        let addrs = if addrs.is_empty() { vec![SocketAddr::from(([127, 0, 0, 1], 0))] } else { addrs };
        // With replicas to fall back on, a replica that does not accept soon is left for the next.
        let connect_timeout = if addrs.len() > 1 { REPLICA_CONNECT_TIMEOUT } else { CONNECT_TIMEOUT };
        let n = addrs.len();
        RegistryClient::Remote(RemoteRegistry {
            shared: Arc::new(Shared {
                addrs,
                current: AtomicUsize::new(0),
                failed: Mutex::new(vec![None; n]),
                node: NodeId(random_u64()),
                next_req: AtomicU32::new(1),
                link: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                attempts: AtomicU64::new(0),
                last_failure: Mutex::new(None),
            }),
            connect_timeout,
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    /// The process-wide in-process registry: every client made this way, in any thread or runtime, shares one table.
    pub fn in_process() -> Self {
        let table = GLOBAL.get_or_init(Default::default).clone();
        RegistryClient::InProcess(InProcessRegistry { table })
    }

    /// A fresh in-process registry shared only by clones of this client (for tests and embedding).
    pub fn in_process_private() -> Self {
        RegistryClient::InProcess(InProcessRegistry { table: Default::default() })
    }

    /// Sets the connect and request timeouts of a remote client (the handshake counts as a request); an in-process
    /// client is returned unchanged.
    pub fn with_timeouts(self, connect: Duration, request: Duration) -> Self {
        match self {
            RegistryClient::Remote(r) => {
                RegistryClient::Remote(RemoteRegistry { connect_timeout: connect, request_timeout: request, ..r })
            }
            other => other,
        }
    }

    /// "in-process", or the registry's address.
    pub fn describe(&self) -> String {
        match self {
            RegistryClient::InProcess(_) => "in-process".to_owned(),
            RegistryClient::Remote(r) => r.shared.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
        }
    }

    /// Sends a registry request (`RegClaim`, `RegLookup`, `RegRemove` or `RegList`, with any `req`: the client
    /// replaces it with its own) and returns the registry's answer. Refusals by the registry come back as
    /// `Ok(RegResult::Error{..})`; errors are about reaching the registry, or [`RegistryError::NotARequest`].
    ///
    /// A remote client that loses a connection it had made earlier retries the request once on a new connection
    /// (registry requests are idempotent), so a registry restart between two requests costs no error.
    pub async fn request(&self, msg: Message) -> Result<RegResult, RegistryError> {
        match self {
            RegistryClient::InProcess(p) => {
                if !is_request(&msg) {
                    return Err(RegistryError::NotARequest { kind: msg.kind() });
                }
                match p.table.lock().handle(&msg, now()) {
                    Some(Message::RegReply { result, .. }) => Ok(result),
                    _ => Err(RegistryError::NotARequest { kind: msg.kind() }),
                }
            }
            RegistryClient::Remote(r) => r.request(msg).await,
        }
    }

    /// Looks a channel up. A missing channel is [`RegistryError::UnknownChannel`].
    pub async fn lookup(&self, name: &str) -> Result<RegEntry, RegistryError> {
        match self.request(Message::RegLookup { req: 0, name: name.to_owned() }).await? {
            RegResult::Entry(e) => Ok(e),
            RegResult::Error { code: RegErrorCode::UnknownChannel, .. } => {
                Err(RegistryError::UnknownChannel(name.to_owned()))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Lists every live channel, sorted by name.
    pub async fn list(&self) -> Result<Vec<RegEntry>, RegistryError> {
        match self.request(Message::RegList { req: 0 }).await? {
            RegResult::Entries(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: RegResult) -> RegistryError {
    match r {
        RegResult::Error { code, message } => RegistryError::Refused { code, message },
        other => RegistryError::Protocol(format!("unexpected answer {other:?}")),
    }
}

fn is_request(msg: &Message) -> bool {
    matches!(
        msg,
        Message::RegClaim { .. } | Message::RegLookup { .. } | Message::RegRemove { .. } | Message::RegList { .. }
    )
}

fn set_req(msg: &mut Message, id: u32) -> Result<(), RegistryError> {
    match msg {
        Message::RegClaim { req, .. }
        | Message::RegLookup { req, .. }
        | Message::RegRemove { req, .. }
        | Message::RegList { req } => {
            *req = id;
            Ok(())
        }
        other => Err(RegistryError::NotARequest { kind: other.kind() }),
    }
}

/// Why a connection (or an attempt to make one) failed, in a form every waiting request can turn into its error.
#[derive(Clone, Debug)]
enum Failure {
    /// Connecting, reading or writing failed, or the registry closed the connection.
    Io { os: Option<i32>, kind: io::ErrorKind, message: String },
    /// No answer in time.
    Timeout,
    /// The registry speaks another version.
    Version(u16),
    /// The registry broke the protocol.
    Protocol(String),
}

impl Failure {
    fn io(e: &io::Error) -> Self {
        Failure::Io { os: e.raw_os_error(), kind: e.kind(), message: e.to_string() }
    }

    fn closed() -> Self {
        Failure::Io {
            os: None,
            kind: io::ErrorKind::ConnectionReset,
            message: "the registry closed the connection".into(),
        }
    }

    fn into_error(self, addr: SocketAddr) -> RegistryError {
        match self {
            Failure::Io { os: Some(code), .. } => {
                RegistryError::Unreachable { addr, source: io::Error::from_raw_os_error(code) }
            }
            Failure::Io { kind, message, .. } => {
                RegistryError::Unreachable { addr, source: io::Error::new(kind, message) }
            }
            Failure::Timeout => RegistryError::Timeout { addr },
            Failure::Version(theirs) => RegistryError::VersionMismatch { ours: PROTOCOL_VERSION, theirs },
            Failure::Protocol(why) => RegistryError::Protocol(format!("{addr}: {why}")),
        }
    }
}

/// State shared by every clone of a remote client.
struct Shared {
    /// The registry's address, or its replicas' addresses.
    addrs: Vec<SocketAddr>,
    /// The replica asked now (the leader, as far as the client knows).
    current: AtomicUsize,
    /// When each replica last failed a request.
    failed: Mutex<Vec<Option<tokio::time::Instant>>>,
    /// The random node id sent in `Hello`.
    node: NodeId,
    next_req: AtomicU32,
    /// The current connection, if any (possibly dead: check [`LinkState::alive`]).
    link: Mutex<Option<Arc<Link>>>,
    /// Held while connecting, so that concurrent requests make one connection.
    connecting: tokio::sync::Mutex<()>,
    /// Number of connection attempts made so far, and how the last failed one failed: a request that waited for
    /// another's attempt takes that attempt's failure instead of trying again.
    attempts: AtomicU64,
    last_failure: Mutex<Option<Failure>>,
}

/// One connection: a writer task fed with whole frames, and a reader task that hands answers to waiting requests.
struct Link {
    state: Arc<LinkState>,
    tx: mpsc::UnboundedSender<Bytes>,
    tasks: [AbortHandle; 2],
}

impl Link {
    fn kill(&self, why: Failure) {
        self.state.fail(why);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Default)]
struct LinkState {
    inner: Mutex<LinkInner>,
}

#[derive(Default)]
struct LinkInner {
    /// Requests waiting for their answer, by request id.
    pending: HashMap<u32, oneshot::Sender<RegResult>>,
    /// Set once the connection is dead; waiting requests then find out why here.
    failure: Option<Failure>,
}

impl LinkState {
    fn alive(&self) -> bool {
        self.inner.lock().failure.is_none()
    }

    /// Marks the connection dead (keeping the first reason) and wakes every waiting request.
    fn fail(&self, why: Failure) {
        let mut inner = self.inner.lock();
        inner.failure.get_or_insert(why);
        inner.pending.clear();
    }

    fn failure(&self) -> Failure {
        self.inner.lock().failure.clone().unwrap_or_else(Failure::closed)
    }
}

/// Marks the connection dead when a connection task ends in any way, including being aborted or its runtime going
/// away.
struct FailOnDrop(Arc<LinkState>);

impl Drop for FailOnDrop {
    fn drop(&mut self) {
        self.0.fail(Failure::closed());
    }
}

/// Forgets a waiting request when its future ends in any way.
struct PendingGuard<'a>(&'a LinkState, u32);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.inner.lock().pending.remove(&self.1);
    }
}

impl RemoteRegistry {
    async fn request(&self, msg: Message) -> Result<RegResult, RegistryError> {
        if self.shared.addrs.len() > 1 {
            return self.request_replicated(msg).await;
        }
        self.request_single(msg).await
    }

    fn addr(&self) -> SocketAddr {
        let i = self.shared.current.load(Ordering::Relaxed) % self.shared.addrs.len();
        self.shared.addrs[i]
    }

    /// Asks the replicas in turn, starting with the one believed to lead, following `NotLeader` hints.
    async fn request_replicated(&self, mut msg: Message) -> Result<RegResult, RegistryError> {
        let id = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
        set_req(&mut msg, id)?;
        let frame = msg.to_bytes();
        let deadline = tokio::time::Instant::now() + 2 * self.request_timeout;
        let attempt = self.request_timeout / 4;
        let n = self.shared.addrs.len();
        let mut misses = 0usize;
        // What each replica said when last asked, for the error should no leader answer in time.
        let mut outcomes: Vec<Option<Failure>> = vec![None; n];
        loop {
            let used = self.shared.current.load(Ordering::Relaxed) % n;
            let addr = self.shared.addrs[used];
            let outcome = match tokio::time::timeout(attempt, async {
                let (link, _) = self.link().await?;
                let r = self.exchange(&link, id, frame.clone()).await;
                if r.is_err() {
                    self.drop_link(&link, Failure::closed());
                }
                r
            })
            .await
            {
                Ok(r) => r,
                Err(_) => Err(Failure::Timeout),
            };
            let failure = match outcome {
                Ok(RegResult::Error { code: RegErrorCode::NotLeader, message }) => {
                    let hint: Option<SocketAddr> = message.parse().ok();
                    match hint.and_then(|h| self.shared.addrs.iter().position(|a| *a == h)) {
                        Some(leader) if leader != used && !self.avoided(leader) => {
                            self.switch(used, leader);
                            continue;
                        }
                        Some(leader) if leader != used => Failure::Protocol(format!(
                            "not the leader; the leader it names, {}, failed a request recently",
                            self.shared.addrs[leader]
                        )),
                        _ => Failure::Protocol("not the leader, and knows of no leader".to_owned()),
                    }
                }
                Ok(result) => {
                    self.shared.failed.lock()[used] = None;
                    return Ok(result);
                }
                Err(f) => f,
            };
            tracing::debug!(%addr, ?failure, "registry replica did not answer; asking the next one");
            misses += 1;
            if !matches!(failure, Failure::Protocol(_)) {
                self.shared.failed.lock()[used] = Some(tokio::time::Instant::now());
            }
            let next = (1..n).map(|k| (used + k) % n).find(|i| !self.avoided(*i)).unwrap_or((used + 1) % n);
            self.switch(used, next);
            outcomes[used] = Some(failure);
            if tokio::time::Instant::now() >= deadline {
                let replicas = self
                    .shared
                    .addrs
                    .iter()
                    .zip(outcomes)
                    .map(|(a, f)| ReplicaOutcome { addr: *a, error: f.map(|f| Box::new(f.into_error(*a))) })
                    .collect();
                return Err(RegistryError::NoLeader { waited: 2 * self.request_timeout, replicas });
            }
            // After a round without an answer (an election is under way), wait a little before the next round.
            if misses.is_multiple_of(n) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Whether replica `i` failed a request recently.
    fn avoided(&self, i: usize) -> bool {
        self.shared.failed.lock()[i].is_some_and(|t| t.elapsed() < AVOID_FAILED)
    }

    /// Asks replica `to` from now on, unless another request moved on from `from` already.
    fn switch(&self, from: usize, to: usize) {
        if self.shared.current.compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            if let Some(link) = self.shared.link.lock().take() {
                link.kill(Failure::closed());
            }
        }
    }

    async fn request_single(&self, mut msg: Message) -> Result<RegResult, RegistryError> {
        let addr = self.addr();
        let id = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
        set_req(&mut msg, id)?;
        let frame = msg.to_bytes();
        let mut retried = false;
        loop {
            let (link, fresh) = self.link().await.map_err(|f| f.into_error(addr))?;
            match self.exchange(&link, id, frame.clone()).await {
                Ok(result) => return Ok(result),
                // The connection was lost. If it is older than this request, the registry may simply have restarted
                // since: try once more on a new one.
                Err(Failure::Io { .. }) if !fresh && !retried => {
                    tracing::debug!(%addr, "registry connection lost; retrying the request on a new one");
                    retried = true;
                }
                Err(f) => return Err(f.into_error(addr)),
            }
        }
    }

    /// Sends one request on `link` and waits for its answer.
    async fn exchange(&self, link: &Arc<Link>, id: u32, frame: Bytes) -> Result<RegResult, Failure> {
        let answer = {
            let mut inner = link.state.inner.lock();
            if let Some(f) = &inner.failure {
                return Err(f.clone());
            }
            let (tx, rx) = oneshot::channel();
            inner.pending.insert(id, tx);
            rx
        };
        let _pending = PendingGuard(&link.state, id);
        if link.tx.send(frame).is_err() {
            return Err(link.state.failure());
        }
        match tokio::time::timeout(self.request_timeout, answer).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(link.state.failure()),
            Err(_) => {
                // A registry that does not answer is treated as gone: the next request connects again.
                tracing::debug!(addr = %self.addr(), "registry request timed out; dropping the connection");
                self.drop_link(link, Failure::Timeout);
                Err(Failure::Timeout)
            }
        }
    }

    fn drop_link(&self, link: &Arc<Link>, why: Failure) {
        let mut slot = self.shared.link.lock();
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
        drop(slot);
        link.kill(why);
    }

    fn live_link(&self) -> Option<Arc<Link>> {
        self.shared.link.lock().as_ref().filter(|l| l.state.alive()).cloned()
    }

    /// The live connection, or a new one; `true` if it was made for (or while) this request waited.
    async fn link(&self) -> Result<(Arc<Link>, bool), Failure> {
        if let Some(link) = self.live_link() {
            return Ok((link, false));
        }
        let seen = self.shared.attempts.load(Ordering::Acquire);
        let wait = self.connect_timeout + self.request_timeout;
        let _connecting =
            tokio::time::timeout(wait, self.shared.connecting.lock()).await.map_err(|_| Failure::Timeout)?;
        if let Some(link) = self.live_link() {
            return Ok((link, true));
        }
        if self.shared.attempts.load(Ordering::Acquire) != seen {
            // Another request tried while this one waited, and failed: do not wait for a second failure.
            if let Some(f) = self.shared.last_failure.lock().clone() {
                return Err(f);
            }
        }
        let result = self.connect().await;
        *self.shared.last_failure.lock() = result.as_ref().err().cloned();
        self.shared.attempts.fetch_add(1, Ordering::AcqRel);
        let link = Arc::new(result?);
        *self.shared.link.lock() = Some(link.clone());
        Ok((link, true))
    }

    /// Connects, says `Hello`, and starts the connection's tasks.
    async fn connect(&self) -> Result<Link, Failure> {
        let addr = self.addr();
        tracing::debug!(%addr, "connecting to the registry");
        let mut stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::io(&e)),
            Err(_) => return Err(Failure::Timeout),
        };
        let _ = stream.set_nodelay(true);
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            node: self.shared.node,
            addr: String::new(),
            purpose: Purpose::Registry,
        };
        let mut buf = BytesMut::with_capacity(4096);
        let answer = tokio::time::timeout(self.request_timeout, async {
            stream.write_all(&hello.to_bytes()).await.map_err(|e| Failure::io(&e))?;
            read_message(&mut stream, &mut buf).await
        })
        .await
        .map_err(|_| Failure::Timeout)??;
        match answer {
            Message::HelloAck { version, .. } if version == PROTOCOL_VERSION => {}
            Message::HelloAck { version, .. } => return Err(Failure::Version(version)),
            Message::Close { code: CloseCode::VersionMismatch, reason } => {
                return Err(match their_version(&reason) {
                    Some(v) => Failure::Version(v),
                    None => Failure::Protocol(format!("refused protocol version {PROTOCOL_VERSION}: {reason}")),
                })
            }
            Message::Close { code, reason } => {
                return Err(Failure::Protocol(format!("refused the connection ({code:?}): {reason}")))
            }
            other => return Err(Failure::Protocol(format!("answered Hello with message kind {}", other.kind()))),
        }
        tracing::debug!(%addr, node = %self.shared.node, "connected to the registry");
        let (read, write) = stream.into_split();
        let state = Arc::new(LinkState::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader(read, buf, FailOnDrop(state.clone())));
        let writer = tokio::spawn(writer(write, rx, FailOnDrop(state.clone())));
        Ok(Link { state, tx, tasks: [reader.abort_handle(), writer.abort_handle()] })
    }
}

/// The version a registry names as its own in a `Close{VersionMismatch}` reason: the first "version N" in it
/// ("this registry speaks version 2, the client speaks version 3").
fn their_version(reason: &str) -> Option<u16> {
    reason.match_indices("version ").find_map(|(at, word)| {
        let rest = &reason[at + word.len()..];
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        rest[..digits].parse().ok()
    })
}

/// Reads one whole message.
async fn read_message(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Message, Failure> {
    loop {
        match decode_frame(buf, MAX_REGISTRY_FRAME) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(Failure::Protocol(e.to_string())),
        }
        buf.reserve(4096);
        match stream.read_buf(buf).await {
            Ok(0) => return Err(Failure::closed()),
            Ok(_) => {}
            Err(e) => return Err(Failure::io(&e)),
        }
    }
}

/// Hands every answer to the request waiting for it, until the connection fails.
async fn reader(mut read: OwnedReadHalf, mut buf: BytesMut, guard: FailOnDrop) {
    let state = &guard.0;
    loop {
        let msg = match decode_frame(&mut buf, MAX_REGISTRY_FRAME) {
            Ok(Some(m)) => m,
            Ok(None) => {
                buf.reserve(4096);
                match read.read_buf(&mut buf).await {
                    Ok(0) => return state.fail(Failure::closed()),
                    Ok(_) => continue,
                    Err(e) => return state.fail(Failure::io(&e)),
                }
            }
            Err(e) => return state.fail(Failure::Protocol(format!("malformed answer: {e}"))),
        };
        match msg {
            Message::RegReply { req, result } => {
                let waiting = state.inner.lock().pending.remove(&req);
                match waiting {
                    Some(tx) => {
                        let _ = tx.send(result);
                    }
                    None => tracing::debug!(req, "registry answer for a request nobody waits for"),
                }
            }
            Message::Close { code: CloseCode::Normal, .. } => return state.fail(Failure::closed()),
            Message::Close { code, reason } => {
                return state.fail(Failure::Protocol(format!("closed the connection ({code:?}): {reason}")))
            }
            other => {
                return state
                    .fail(Failure::Protocol(format!("sent message kind {}, not a registry answer", other.kind())))
            }
        }
    }
}

/// Writes queued requests, several at a time when they pile up.
async fn writer(mut write: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Bytes>, guard: FailOnDrop) {
    let mut out = BytesMut::new();
    while let Some(frame) = rx.recv().await {
        out.extend_from_slice(&frame);
        while out.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(frame) => out.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if let Err(e) = write.write_all(&out).await {
            return guard.0.fail(Failure::io(&e));
        }
        out.clear();
    }
}

/// A random 64-bit number, from the standard library's randomly keyed hasher (no dependency needed for a node id).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::their_version;

    #[test]
    fn their_version_is_the_first_version_number_in_the_reason() {
        let registry = "protocol version mismatch: this registry speaks version 3, the client speaks version 2";
        assert_eq!(their_version(registry), Some(3));
        let node = "protocol version mismatch: this node speaks version 1, the peer speaks version 2";
        assert_eq!(their_version(node), Some(1));
        assert_eq!(their_version("protocol version mismatch"), None);
        assert_eq!(their_version("version 99999999"), None);
        assert_eq!(their_version(""), None);
    }
}
