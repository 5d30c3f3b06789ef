//! The registry server: one task per connection around a shared lease table.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kecho_proto::codec::{decode_frame, CloseCode, Purpose, RegErrorCode, RegResult, LEN_PREFIX};
use kecho_proto::registry::RegistryTable;
use kecho_proto::{Message, NodeId, PROTOCOL_VERSION};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::raft::{Persistent, RaftConfig};
use crate::replica::{self, Input, Members};
use crate::store::Store;
use crate::{now, RegistryError, MAX_REGISTRY_FRAME};

/// How long a client may take to complete its `Hello` before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once by default; connections beyond it are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long writing answers to a client may take before its connection is closed (a client that does not read).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers are collected up to this many bytes before they are written, when more requests are already buffered.
const WRITE_BATCH: usize = 64 << 10;

/// A registry listening on a TCP port, not yet serving.
///
/// [`RegistryServer::bind`] takes the port; [`RegistryServer::run`] serves on the current task, and
/// [`RegistryServer::spawn`] on a task of its own, stopped through the returned [`RegistryHandle`].
#[derive(Debug)]
pub struct RegistryServer {
    listener: TcpListener,
    addr: SocketAddr,
    table: Arc<Mutex<RegistryTable>>,
    max_connections: usize,
    handshake_timeout: Duration,
    /// The other replicas' addresses (none: a single registry).
    peers: Vec<SocketAddr>,
    /// This replica's address as the others know it (default: the listening address).
    advertise: Option<SocketAddr>,
    raft: RaftConfig,
    /// The replica's state on disk, if kept there.
    store: Option<(Store, Persistent)>,
}

/// What answers requests: a table of its own, or the replica driver.
#[derive(Clone)]
enum Backend {
    Single(Arc<Mutex<RegistryTable>>),
    Replicated(mpsc::Sender<Input>, Arc<Members>),
}

impl RegistryServer {
    /// Listens on `addr` (port 0 picks a free port) with `SO_REUSEADDR`, so that a restarted registry gets its port
    /// back at once. A port that is taken is [`RegistryError::Bind`].
    pub async fn bind(addr: SocketAddr) -> Result<RegistryServer, RegistryError> {
        let bind = |source| RegistryError::Bind { addr, source };
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind)?;
        socket.set_reuseaddr(true).map_err(bind)?;
        socket.bind(addr).map_err(bind)?;
        let listener = socket.listen(1024).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        tracing::info!(%addr, "registry listening");
        Ok(RegistryServer {
            listener,
            addr,
            table: Arc::new(Mutex::new(RegistryTable::new())),
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            peers: Vec::new(),
            advertise: None,
            raft: RaftConfig::default(),
            store: None,
        })
    }

    /// Makes this registry one replica of a replicated registry whose other replicas listen at `peers` (every
    /// replica is given the others; the set must be the same everywhere). The replicas elect a leader with Raft and
    /// every change to the table is applied once a majority has it, so any minority of replicas may fail. An empty
    /// list is a single registry (the default). See docs/REGISTRY.md.
    pub fn with_peers(mut self, peers: Vec<SocketAddr>) -> Self {
        self.peers = peers;
        self
    }

    /// The address the other replicas know this one by, when it is not the listening address (e.g. listening on
    /// `0.0.0.0`).
    pub fn with_advertise(mut self, addr: SocketAddr) -> Self {
        self.advertise = Some(addr);
        self
    }

    /// Keeps this replica's Raft state (term, vote, log, snapshots) in `dir`, synced before it answers or votes, so
    /// that it can restart without endangering the others' guarantees. Without it the state is in memory only: a
    /// replica that restarts comes back empty, which is safe as long as no other replica fails before it has caught
    /// up (docs/REGISTRY.md).
    pub fn with_data_dir(mut self, dir: &std::path::Path) -> Result<Self, RegistryError> {
        let store = Store::open(dir).map_err(|source| RegistryError::Storage { path: dir.to_owned(), source })?;
        self.store = Some(store);
        Ok(self)
    }

    /// The replicas' timing (election timeouts, heartbeat); see [`RaftConfig`].
    pub fn with_raft_config(mut self, cfg: RaftConfig) -> Self {
        self.raft = cfg;
        self
    }

    /// Serves at most `n` connections at once (at least 1; default [`MAX_CONNECTIONS`]); further connections are
    /// closed as soon as they are accepted, without a `Close`.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Closes connections that have not completed their `Hello` after `timeout` (default [`HANDSHAKE_TIMEOUT`]).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The address it listens on (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves forever (until the future is dropped, which closes the listener and every connection).
    pub async fn run(self) {
        self.serve(std::future::pending()).await
    }

    /// Serves on a task of its own. [`RegistryHandle::shutdown`] or dropping the handle stops it and closes every
    /// connection; the lease table is lost, as when the process dies.
    pub fn spawn(self) -> RegistryHandle {
        let addr = self.addr;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(async move {
            let _ = stopped.await;
        }));
        RegistryHandle { addr, stop: Some(stop), task }
    }

    async fn serve(self, shutdown: impl Future<Output = ()>) {
        let RegistryServer { listener, addr, table, max_connections, handshake_timeout, peers, advertise, raft, store } =
            self;
        let slots = Arc::new(Semaphore::new(max_connections));
        let mut conns = JoinSet::new();
        let mut replica_tasks = JoinSet::new();
        let backend = if peers.is_empty() {
            Backend::Single(table)
        } else {
            let me = advertise.unwrap_or(addr);
            let mut addrs = peers;
            addrs.push(me);
            addrs.sort();
            addrs.dedup();
            let members = Members { me: addrs.iter().position(|a| *a == me).unwrap_or(0), addrs };
            tracing::info!(%me, replicas = ?members.addrs, "registry replica starting");
            let driver = replica::start(&members, raft, store, &mut replica_tasks);
            Backend::Replicated(driver, Arc::new(members))
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            tracing::error!(%addr, "registry connection task panicked: {e}");
                        }
                    }
                }
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Typically out of file descriptors: wait a little instead of spinning.
                            tracing::warn!(%addr, "registry: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "registry: {max_connections} connections open already; closing this one");
                        drop(stream);
                        continue;
                    };
                    let backend = backend.clone();
                    conns.spawn(async move {
                        let _slot = slot;
                        tracing::debug!(%peer, "registry: connection opened");
                        connection(stream, peer, backend, handshake_timeout).await;
                        tracing::debug!(%peer, "registry: connection closed");
                    });
                }
            }
        }
        drop(listener);
        conns.shutdown().await;
        replica_tasks.shutdown().await;
        tracing::info!(%addr, "registry stopped");
    }
}

/// A registry serving on its own task. Dropping it aborts the registry like a killed process.
#[derive(Debug)]
pub struct RegistryHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RegistryHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the registry. When this returns the port is free and every connection is closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RegistryHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a connection ends.
enum End {
    /// The client closed it (or sent `Close`).
    Gone,
    /// Reading or writing failed.
    Io(std::io::Error),
    /// We close it, telling the client why.
    Refuse(CloseCode, String),
}

/// Serves one connection: the handshake, then requests until the client leaves or breaks the rules.
async fn connection(mut stream: TcpStream, peer: SocketAddr, backend: Backend, hello_within: Duration) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let end = match tokio::time::timeout(hello_within, next_message(&mut stream, &mut buf)).await {
        Err(_) => {
            tracing::warn!(%peer, "registry: no Hello within {hello_within:?}; closing the connection");
            End::Refuse(CloseCode::Timeout, format!("no Hello within {hello_within:?}"))
        }
        Ok(Err(end)) => end,
        Ok(Ok(hello)) => match (handshake(hello), &backend) {
            (Err(end), _) => end,
            (Ok(Purpose::RegistryPeer), Backend::Replicated(driver, members)) => {
                replica::peer_connection(stream, buf, peer, members, driver).await;
                return;
            }
            (Ok(Purpose::RegistryPeer), Backend::Single(_)) => End::Refuse(
                CloseCode::Handshake,
                "this registry is not replicated (it was started without peers)".into(),
            ),
            (Ok(_), Backend::Single(table)) => {
                Message::HelloAck { version: PROTOCOL_VERSION, node: NodeId(0) }.encode(&mut out);
                requests(&mut stream, &mut buf, &mut out, table).await
            }
            (Ok(_), Backend::Replicated(driver, _)) => {
                Message::HelloAck { version: PROTOCOL_VERSION, node: NodeId(0) }.encode(&mut out);
                replicated_requests(&mut stream, &mut buf, &mut out, driver).await
            }
        },
    };
    match end {
        End::Gone => {}
        End::Io(e) => tracing::debug!(%peer, "registry: connection failed: {e}"),
        End::Refuse(code, reason) => {
            if code != CloseCode::Timeout {
                tracing::warn!(%peer, ?code, "registry: closing the connection: {reason}");
            }
            // Answers already owed go first, then the reason; all best effort.
            Message::Close { code, reason }.encode(&mut out);
            let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
        }
    }
}

/// Checks the first message; returns the connection's purpose (a client's, or another replica's).
fn handshake(first: Message) -> Result<Purpose, End> {
    match first {
        Message::Hello { version, .. } if version != PROTOCOL_VERSION => Err(End::Refuse(
            CloseCode::VersionMismatch,
            format!(
                "protocol version mismatch: this registry speaks version {PROTOCOL_VERSION}, the client speaks version \
                 {version}"
            ),
        )),
        Message::Hello { purpose: p @ (Purpose::Registry | Purpose::RegistryPeer), .. } => Ok(p),
        Message::Hello { purpose, .. } => Err(End::Refuse(
            CloseCode::Handshake,
            format!("this is a kecho registry; a {purpose:?} connection was asked for"),
        )),
        other => Err(End::Refuse(CloseCode::Handshake, format!("expected Hello, got message kind {}", other.kind()))),
    }
}

/// Answers requests until the connection ends. `out` holds answers not yet written.
async fn requests(stream: &mut TcpStream, buf: &mut BytesMut, out: &mut BytesMut, table: &Mutex<RegistryTable>) -> End {
    loop {
        // Write what is owed before waiting for more input, or when enough has piled up.
        if !out.is_empty() && (!frame_buffered(buf) || out.len() >= WRITE_BATCH) {
            match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(out)).await {
                Ok(Ok(())) => out.clear(),
                Ok(Err(e)) => return End::Io(e),
                Err(_) => {
                    return End::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client does not read its answers",
                    ))
                }
            }
        }
        let msg = match next_message(stream, buf).await {
            Ok(m) => m,
            Err(end) => return end,
        };
        if let Message::Close { .. } = msg {
            return End::Gone;
        }
        let reply = table.lock().handle(&msg, now());
        match reply {
            Some(reply) => encode_reply(reply, out),
            None => {
                return End::Refuse(
                    CloseCode::Handshake,
                    format!("message kind {} does not belong on a registry connection", msg.kind()),
                )
            }
        }
    }
}

/// Passes requests to the replica driver and writes its answers as they come (pipelined requests may be answered
/// out of order: clients match answers by request id), until the connection ends.
async fn replicated_requests(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    driver: &mpsc::Sender<Input>,
) -> End {
    let (token, mut answers) = mpsc::unbounded_channel::<Message>();
    loop {
        if !out.is_empty() {
            match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(out)).await {
                Ok(Ok(())) => out.clear(),
                Ok(Err(e)) => return End::Io(e),
                Err(_) => {
                    return End::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client does not read its answers",
                    ))
                }
            }
        }
        tokio::select! {
            // Reading is cancel-safe: what was read stays in `buf`.
            msg = next_message(stream, buf) => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(end) => return end,
                };
                match msg {
                    Message::Close { .. } => return End::Gone,
                    Message::RegClaim { .. } | Message::RegLookup { .. } | Message::RegRemove { .. } | Message::RegList { .. } => {
                        if driver.send(Input::Request { token: token.clone(), msg }).await.is_err() {
                            return End::Refuse(CloseCode::Normal, "the registry is stopping".into());
                        }
                    }
                    other => {
                        return End::Refuse(
                            CloseCode::Handshake,
                            format!("message kind {} does not belong on a registry connection", other.kind()),
                        )
                    }
                }
            }
            Some(answer) = answers.recv() => {
                encode_reply(answer, out);
                while let Ok(answer) = answers.try_recv() {
                    encode_reply(answer, out);
                }
            }
        }
    }
}

/// Appends `reply`, replacing it by a refusal if it would not fit in a frame the client accepts (a listing of a huge
/// table).
fn encode_reply(reply: Message, out: &mut BytesMut) {
    let start = out.len();
    reply.encode(out);
    let len = out.len() - start - LEN_PREFIX;
    if len > MAX_REGISTRY_FRAME {
        out.truncate(start);
        let req = match reply {
            Message::RegReply { req, .. } => req,
            _ => 0,
        };
        let message = format!("the answer of {len} bytes exceeds the frame limit of {MAX_REGISTRY_FRAME} bytes");
        tracing::warn!("registry: {message}");
        Message::RegReply { req, result: RegResult::Error { code: RegErrorCode::Invalid, message } }.encode(out);
    }
}

/// True if a complete frame (or a malformed one, which will end the connection) is waiting in `buf`.
fn frame_buffered(buf: &BytesMut) -> bool {
    match buf.get(..LEN_PREFIX) {
        None => false,
        Some(prefix) => {
            let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            len == 0 || len > MAX_REGISTRY_FRAME || buf.len() - LEN_PREFIX >= len
        }
    }
}

/// Reads until `buf` holds a whole message.
async fn next_message(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Message, End> {
    loop {
        match decode_frame(buf, MAX_REGISTRY_FRAME) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(End::Refuse(CloseCode::Malformed, e.to_string())),
        }
        buf.reserve(4096);
        match stream.read_buf(buf).await {
            Ok(0) => return Err(End::Gone),
            Ok(_) => {}
            Err(e) => return Err(End::Io(e)),
        }
    }
}
