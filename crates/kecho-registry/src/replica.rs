//! The I/O around a [`Replica`]: one driver task owns it; client connections and replica connections feed it; one
//! sender task per other replica carries its messages out.
//!
//! Replica connections are one-way: each replica dials every other one and only writes on that connection, after a
//! `Hello{purpose: RegistryPeer}` and a [`PeerFrame::Hello`] naming itself and the replica list. What it receives
//! comes on the connections the others dialled. A message that cannot be sent (the peer is down, or its connection
//! is congested) is dropped; Raft retransmits.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use kecho_proto::codec::Purpose;
use kecho_proto::{Message, NodeId, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::raft::{Output, PeerMsg, Persistent, RaftConfig, Replica, ReplicaId};
use crate::store::Store;
use crate::wire::PeerFrame;

/// How a replica connection waits before dialling again after a failure.
const REDIAL: Duration = Duration::from_millis(100);
/// A write to another replica that takes longer than this drops the connection (it is unreachable or stuck).
const PEER_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Messages queued for one other replica; beyond, new ones are dropped.
const PEER_QUEUE: usize = 4096;

/// Where a client's answer goes: its connection's writer.
pub(crate) type Token = mpsc::UnboundedSender<Message>;

/// What the driver task receives.
pub(crate) enum Input {
    /// A client's registry request.
    Request { token: Token, msg: Message },
    /// A message from another replica.
    Peer { from: ReplicaId, msg: PeerMsg },
}

/// The cluster clock: wall-clock milliseconds, advanced by tokio's clock (so that paused-time tests control it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    unix_ms: u64,
    start: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Clock { unix_ms, start: tokio::time::Instant::now() }
    }

    pub(crate) fn now(&self) -> u64 {
        self.unix_ms + self.start.elapsed().as_millis() as u64
    }

    fn instant(&self, ms: u64) -> tokio::time::Instant {
        self.start + Duration::from_millis(ms.saturating_sub(self.unix_ms))
    }
}

/// The replicas of one cluster, as this replica knows them.
#[derive(Clone, Debug)]
pub(crate) struct Members {
    /// Every replica's address, sorted; a replica's id is its position.
    pub addrs: Vec<SocketAddr>,
    /// This replica's id.
    pub me: ReplicaId,
}

impl Members {
    pub(crate) fn names(&self) -> Vec<String> {
        self.addrs.iter().map(|a| a.to_string()).collect()
    }
}

/// Starts the driver and the senders; returns the driver's input.
pub(crate) fn start(
    members: &Members,
    cfg: RaftConfig,
    store: Option<(Store, Persistent)>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> mpsc::Sender<Input> {
    let clock = Clock::new();
    let seed = clock.now() ^ u64::from(std::process::id()) << 32;
    let (store, saved) = match store {
        Some((s, p)) => (Some(s), p),
        None => (None, Persistent::default()),
    };
    let replica = Replica::recover(members.me, members.names(), cfg, seed, saved, clock.now());
    let (tx, rx) = mpsc::channel(4096);
    let mut peers = Vec::new();
    for (id, addr) in members.addrs.iter().enumerate() {
        if id == members.me {
            peers.push(None);
            continue;
        }
        let (ptx, prx) = mpsc::channel(PEER_QUEUE);
        peers.push(Some(ptx));
        let hello = PeerFrame::Hello { me: members.addrs[members.me].to_string(), members: members.names() };
        tasks.spawn(sender(*addr, hello, prx));
    }
    tasks.spawn(drive(replica, rx, peers, clock, store));
    tx
}

async fn drive(
    mut replica: Replica<Token>,
    mut rx: mpsc::Receiver<Input>,
    peers: Vec<Option<mpsc::Sender<PeerMsg>>>,
    clock: Clock,
    mut store: Option<Store>,
) {
    let handle = |replica: &mut Replica<Token>, input: Input| match input {
        Input::Request { token, msg } => replica.handle_request(token, msg, clock.now()),
        Input::Peer { from, msg } => replica.handle_peer(from, msg, clock.now()),
    };
    loop {
        let deadline = clock.instant(replica.poll_timeout());
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { return };
                handle(&mut replica, input);
                // Take what else is waiting, so that a burst of requests goes out in few appends.
                for _ in 0..256 {
                    match rx.try_recv() {
                        Ok(input) => handle(&mut replica, input),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => replica.handle_timeout(clock.now()),
        }
        // Votes, terms and entries reach the disk before anything that depends on them leaves. The write blocks this
        // task (a sync per batch of requests); the registry does nothing else that could wait for it.
        let changes = replica.take_changes();
        if let (Some(s), false) = (&mut store, changes.is_empty()) {
            if let Err(e) = s.write(&changes, replica.persistent()) {
                tracing::error!("cannot write the replica's state: {e}; this replica stops answering");
                return;
            }
        }
        while let Some(out) = replica.poll_output() {
            match out {
                Output::Send { to, msg } => {
                    if let Some(Some(p)) = peers.get(to) {
                        let _ = p.try_send(msg);
                    }
                }
                Output::Reply { token, reply } => {
                    let _ = token.send(reply);
                }
            }
        }
    }
}

/// Keeps a connection to one other replica and writes its messages there.
async fn sender(addr: SocketAddr, hello: PeerFrame, mut rx: mpsc::Receiver<PeerMsg>) {
    let mut out = BytesMut::new();
    loop {
        let stream = match tokio::time::timeout(PEER_WRITE_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => Some(s),
            _ => None,
        };
        if let Some(mut stream) = stream {
            let _ = stream.set_nodelay(true);
            out.clear();
            let me = match &hello {
                PeerFrame::Hello { me, .. } => me.clone(),
                PeerFrame::Raft(_) => String::new(),
            };
            Message::Hello { version: PROTOCOL_VERSION, node: NodeId(0), addr: me, purpose: Purpose::RegistryPeer }
                .encode(&mut out);
            hello.encode(&mut out);
            // Messages queued while there was no connection are stale: Raft sends again what still matters.
            while rx.try_recv().is_ok() {}
            loop {
                if !out.is_empty() {
                    match tokio::time::timeout(PEER_WRITE_TIMEOUT, stream.write_all(&out)).await {
                        Ok(Ok(())) => out.clear(),
                        _ => break,
                    }
                }
                let Some(msg) = rx.recv().await else { return };
                PeerFrame::Raft(msg).encode(&mut out);
                while out.len() < 256 << 10 {
                    match rx.try_recv() {
                        Ok(msg) => PeerFrame::Raft(msg).encode(&mut out),
                        Err(_) => break,
                    }
                }
            }
            tracing::debug!(peer = %addr, "registry replica connection lost");
        }
        tokio::time::sleep(REDIAL).await;
        if rx.is_closed() {
            return;
        }
    }
}

/// Reads another replica's messages from a connection it dialled (after its `Hello`), until it closes or breaks
/// the protocol.
pub(crate) async fn peer_connection(
    mut stream: TcpStream,
    mut buf: BytesMut,
    peer: SocketAddr,
    members: &Members,
    driver: &mpsc::Sender<Input>,
) {
    let names = members.names();
    let mut from = None;
    loop {
        let frame = match PeerFrame::decode(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => {
                buf.reserve(64 << 10);
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
            Err(e) => {
                tracing::warn!(%peer, "registry replica sent a bad frame: {e}; closing its connection");
                return;
            }
        };
        match (frame, from) {
            (PeerFrame::Hello { me, members: theirs }, None) => {
                if theirs != names {
                    tracing::error!(
                        %peer,
                        "a registry replica was started with replicas {theirs:?}, this one with {names:?}: refusing it \
                         (every replica must be given the same set)"
                    );
                    return;
                }
                match names.iter().position(|n| *n == me) {
                    Some(id) if id != members.me => from = Some(id),
                    _ => {
                        tracing::warn!(%peer, "registry replica {me} is not another replica of the list; closing");
                        return;
                    }
                }
            }
            (PeerFrame::Raft(msg), Some(from)) => {
                if driver.send(Input::Peer { from, msg }).await.is_err() {
                    return;
                }
            }
            _ => {
                tracing::warn!(%peer, "registry replica connection out of order; closing");
                return;
            }
        }
    }
}
