//! The registry server: one task per connection around a shared lease table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kecho_proto::codec::{decode_frame, CloseCode, Purpose};
use kecho_proto::registry::RegistryTable;
use kecho_proto::{Message, NodeId, PROTOCOL_VERSION};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{RegistryError, MAX_REGISTRY_FRAME};

/// How long a client may take to say Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 1024;

/// A registry listening on a TCP port.
#[derive(Debug)]
pub struct RegistryServer {
    listener: TcpListener,
    addr: SocketAddr,
    table: Arc<Mutex<RegistryTable>>,
}

impl RegistryServer {
    /// Listens on `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<RegistryServer, RegistryError> {
        let bind = |source| RegistryError::Bind { addr, source };
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind)?;
        // A restarted registry must get its port back at once, even with old connections in TIME_WAIT.
        socket.set_reuseaddr(true).map_err(bind)?;
        socket.bind(addr).map_err(bind)?;
        let listener = socket.listen(1024).map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        Ok(RegistryServer { listener, addr, table: Arc::new(Mutex::new(RegistryTable::new())) })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the task is dropped or aborted.
    pub async fn run(self) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut conns = JoinSet::new();
        loop {
            let (stream, remote) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("registry accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            while conns.try_join_next().is_some() {}
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "registry: too many connections; closing");
                continue;
            };
            let table = self.table.clone();
            conns.spawn(async move {
                let _slot = slot;
                serve(stream, remote, table).await;
            });
        }
    }

    /// Serves on a task of its own; dropping or shutting down the handle stops it and every connection.
    pub fn spawn(self) -> RegistryHandle {
        let addr = self.addr;
        RegistryHandle { addr, task: tokio::spawn(self.run()) }
    }
}

/// A running registry. Stops when dropped.
#[derive(Debug)]
pub struct RegistryHandle {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RegistryHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the registry and closes every connection; the port is free when this returns.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = (&mut { self }.task).await;
    }
}

impl Drop for RegistryHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, remote: SocketAddr, table: Arc<Mutex<RegistryTable>>) {
    let mut buf = BytesMut::with_capacity(4096);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, next_message(&mut stream, &mut buf)).await;
    let close = |code, reason: String| Message::Close { code, reason }.to_bytes();
    match hello {
        Err(_) => {
            tracing::warn!(%remote, "registry: no Hello within {HANDSHAKE_TIMEOUT:?}; closing");
            return;
        }
        Ok(Err(why)) => {
            tracing::warn!(%remote, "registry: closing connection: {why}");
            let _ = stream.write_all(&close(CloseCode::Malformed, why)).await;
            return;
        }
        Ok(Ok(Message::Hello { version, purpose: Purpose::Registry, .. })) => {
            if version != PROTOCOL_VERSION {
                let why = format!(
                    "protocol version mismatch: this registry speaks version {PROTOCOL_VERSION}, the client speaks version {version}"
                );
                tracing::warn!(%remote, "registry: {why}");
                let _ = stream.write_all(&close(CloseCode::VersionMismatch, why)).await;
                return;
            }
        }
        Ok(Ok(Message::Hello { .. })) => {
            let why = "this is a kecho registry, not a node".to_owned();
            let _ = stream.write_all(&close(CloseCode::Handshake, why)).await;
            return;
        }
        Ok(Ok(other)) => {
            let why = format!("expected Hello, got message kind {}", other.kind());
            tracing::warn!(%remote, "registry: {why}");
            let _ = stream.write_all(&close(CloseCode::Handshake, why)).await;
            return;
        }
    }
    let ack = Message::HelloAck { version: PROTOCOL_VERSION, node: NodeId(0) };
    if stream.write_all(&ack.to_bytes()).await.is_err() {
        return;
    }
    let mut out = BytesMut::new();
    loop {
        let msg = match next_message(&mut stream, &mut buf).await {
            Ok(m) => m,
            Err(why) => {
                if why != "connection closed" {
                    tracing::warn!(%remote, "registry: closing connection: {why}");
                    let _ = stream.write_all(&close(CloseCode::Malformed, why)).await;
                }
                return;
            }
        };
        let now = tokio::time::Instant::now().into_std();
        let reply = table.lock().handle(&msg, now);
        match reply {
            Some(r) => r.encode(&mut out),
            None => {
                let why = format!("message kind {} is not a registry request", msg.kind());
                tracing::warn!(%remote, "registry: {why}");
                let _ = stream.write_all(&close(CloseCode::Handshake, why)).await;
                return;
            }
        }
        // Answer everything already buffered with one write.
        if buf.len() < 4 || decode_ready(&buf) {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

/// True unless a complete frame is already waiting in `buf` (then the write can wait for its answer too).
fn decode_ready(buf: &BytesMut) -> bool {
    if buf.len() < 4 {
        return true;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    buf.len() < 4 + len
}

async fn next_message(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Message, String> {
    loop {
        match decode_frame(buf, MAX_REGISTRY_FRAME) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        buf.reserve(4096);
        match stream.read_buf(buf).await {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}
