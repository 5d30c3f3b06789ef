//! Registry clients: over TCP, or in-process on a shared table.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use kecho_proto::codec::{decode_frame, CloseCode, Purpose, RegEntry, RegErrorCode, RegResult};
use kecho_proto::registry::RegistryTable;
use kecho_proto::{Message, NodeId, PROTOCOL_VERSION};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{RegistryError, MAX_REGISTRY_FRAME};

/// A way to reach a registry. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RegistryClient {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    InProcess(Arc<Mutex<RegistryTable>>),
    Remote(Arc<Remote>),
}

struct Remote {
    addr: SocketAddr,
    connect_timeout: Duration,
    request_timeout: Duration,
    conn: tokio::sync::Mutex<Option<Conn>>,
    next_req: AtomicU32,
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryClient({})", self.describe())
    }
}

static GLOBAL: OnceLock<Arc<Mutex<RegistryTable>>> = OnceLock::new();

impl RegistryClient {
    /// A registry at `addr`, reached over TCP. Connects on first use and again after a failure.
    pub fn remote(addr: SocketAddr) -> Self {
        Self::remote_with_timeouts(addr, Duration::from_secs(2), Duration::from_secs(5))
    }

    /// Like [`RegistryClient::remote`] with explicit connect and request timeouts.
    pub fn remote_with_timeouts(addr: SocketAddr, connect: Duration, request: Duration) -> Self {
        RegistryClient {
            kind: Kind::Remote(Arc::new(Remote {
                addr,
                connect_timeout: connect,
                request_timeout: request,
                conn: tokio::sync::Mutex::new(None),
                next_req: AtomicU32::new(1),
            })),
        }
    }

    /// The process-wide in-process registry: every client made this way shares one table.
    pub fn in_process() -> Self {
        RegistryClient { kind: Kind::InProcess(GLOBAL.get_or_init(Default::default).clone()) }
    }

    /// A fresh in-process registry shared only by clones of this client (for tests and embedding).
    pub fn in_process_private() -> Self {
        RegistryClient { kind: Kind::InProcess(Default::default()) }
    }

    /// "in-process" or the registry's address.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::InProcess(_) => "in-process".to_owned(),
            Kind::Remote(r) => r.addr.to_string(),
        }
    }

    /// Sends a registry request (`RegClaim`, `RegLookup`, `RegRemove` or `RegList`; its `req` is replaced) and
    /// returns the registry's answer. Refusals come back as `Ok(RegResult::Error{..})`.
    pub async fn request(&self, msg: Message) -> Result<RegResult, RegistryError> {
        match &self.kind {
            Kind::InProcess(t) => {
                let now = tokio::time::Instant::now().into_std();
                match t.lock().handle(&msg, now) {
                    Some(Message::RegReply { result, .. }) => Ok(result),
                    _ => Err(RegistryError::Protocol(format!("message kind {} is not a registry request", msg.kind()))),
                }
            }
            Kind::Remote(r) => r.request(msg).await,
        }
    }

    /// Looks a channel up.
    pub async fn lookup(&self, name: &str) -> Result<RegEntry, RegistryError> {
        match self.request(Message::RegLookup { req: 0, name: name.to_owned() }).await? {
            RegResult::Entry(e) => Ok(e),
            RegResult::Error { code: RegErrorCode::UnknownChannel, .. } => {
                Err(RegistryError::UnknownChannel(name.to_owned()))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Lists every live channel.
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

fn set_req(msg: &mut Message, id: u32) -> Result<(), RegistryError> {
    match msg {
        Message::RegClaim { req, .. }
        | Message::RegLookup { req, .. }
        | Message::RegRemove { req, .. }
        | Message::RegList { req } => {
            *req = id;
            Ok(())
        }
        other => Err(RegistryError::Protocol(format!("message kind {} is not a registry request", other.kind()))),
    }
}

impl Remote {
    async fn request(&self, mut msg: Message) -> Result<RegResult, RegistryError> {
        let id = self.next_req.fetch_add(1, Ordering::Relaxed);
        set_req(&mut msg, id)?;
        let bytes = msg.to_bytes();
        let mut guard = self.conn.lock().await;
        // A kept connection may have died since (a restarted registry): then reconnect and try once more.
        for attempt in 0..2 {
            let reused = guard.is_some();
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let conn = guard.as_mut().expect("just set");
            match tokio::time::timeout(self.request_timeout, exchange(conn, &bytes, id)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => {
                    *guard = None;
                    if !(reused && attempt == 0) {
                        return Err(e);
                    }
                }
                Err(_) => {
                    *guard = None;
                    return Err(RegistryError::Timeout { addr: self.addr });
                }
            }
        }
        Err(RegistryError::Timeout { addr: self.addr })
    }

    async fn connect(&self) -> Result<Conn, RegistryError> {
        let addr = self.addr;
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(RegistryError::Unreachable { addr, source }),
            Err(_) => return Err(RegistryError::Timeout { addr }),
        };
        let _ = stream.set_nodelay(true);
        let mut conn = Conn { stream, buf: BytesMut::with_capacity(4096) };
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            node: NodeId(rand_id()),
            addr: String::new(),
            purpose: Purpose::Registry,
        };
        let answer = tokio::time::timeout(self.request_timeout, async {
            conn.stream
                .write_all(&hello.to_bytes())
                .await
                .map_err(|source| RegistryError::Unreachable { addr, source })?;
            read_message(&mut conn).await
        })
        .await
        .map_err(|_| RegistryError::Timeout { addr })??;
        match answer {
            Message::HelloAck { version, .. } if version == PROTOCOL_VERSION => Ok(conn),
            Message::HelloAck { version, .. } => {
                Err(RegistryError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version })
            }
            Message::Close { code: CloseCode::VersionMismatch, reason } => Err(RegistryError::Protocol(reason)),
            Message::Close { reason, .. } => {
                Err(RegistryError::Protocol(format!("{addr} refused the connection: {reason}")))
            }
            other => Err(RegistryError::Protocol(format!("{addr} answered Hello with message kind {}", other.kind()))),
        }
    }
}

async fn exchange(conn: &mut Conn, bytes: &[u8], id: u32) -> Result<RegResult, RegistryError> {
    let addr = conn
        .stream
        .peer_addr()
        .map_err(|source| RegistryError::Unreachable { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
    conn.stream.write_all(bytes).await.map_err(|source| RegistryError::Unreachable { addr, source })?;
    loop {
        match read_message(conn).await? {
            Message::RegReply { req, result } if req == id => return Ok(result),
            // An answer to an earlier request that timed out: skip it.
            Message::RegReply { .. } => {}
            Message::Close { reason, .. } => return Err(RegistryError::Protocol(format!("registry closed: {reason}"))),
            other => return Err(RegistryError::Protocol(format!("unexpected message kind {}", other.kind()))),
        }
    }
}

async fn read_message(conn: &mut Conn) -> Result<Message, RegistryError> {
    let addr = conn.stream.peer_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    loop {
        match decode_frame(&mut conn.buf, MAX_REGISTRY_FRAME) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(RegistryError::Protocol(e.to_string())),
        }
        conn.buf.reserve(4096);
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                return Err(RegistryError::Unreachable {
                    addr,
                    source: std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "connection closed by the registry",
                    ),
                })
            }
            Ok(_) => {}
            Err(source) => return Err(RegistryError::Unreachable { addr, source }),
        }
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}
