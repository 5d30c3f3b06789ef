//! Scenarios that more than one transport's tests run as they are.

// Each test file uses some of these helpers.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Event, MembershipConfig, Node, NodeId, Overflow, RecvError, RegistryClient, SinkOptions};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

#[cfg(feature = "tls")]
mod ca;
// Not every test file that has these helpers makes certificates.
#[cfg(feature = "tls")]
#[allow(unused_imports)]
pub use ca::Ca;

const T: Duration = Duration::from_secs(10);

/// Submits 4 KiB events until five tries in a row, 20 ms apart, are refused (a link behind a Block sink nobody reads
/// is full); returns how many went. An error if 100,000 went without that.
pub async fn fill_until_refused(source: &mut kecho::Source) -> Result<u64> {
    let (mut filled, mut refusals) = (0u64, 0);
    while refusals < 5 {
        match source.try_submit("x", &Attrs::new(), &[0u8; 4096]) {
            Ok(_) => {
                filled += 1;
                refusals = 0;
            }
            Err(_) => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if filled >= 100_000 {
            bail!("the link never filled up");
        }
    }
    Ok(filled)
}

/// A Block sink on `b` that nobody reads stalls the link from `a` (whose link queue must be small); the events of
/// another channel that find the link full are dropped at the source and reported to their sink, exactly, once the
/// link moves again. `linked` runs once both channels have their sink (to check which transport the link took).
pub async fn events_dropped_at_a_full_link_are_reported(
    a_node: &Node,
    b_node: &Node,
    linked: impl FnOnce(),
) -> Result<()> {
    let ax = a_node.create_channel("x").await?;
    let bx = b_node.open_channel("x").await?;
    let mut blocker = bx.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
    let ay = a_node.create_channel("y").await?;
    let by = b_node.open_channel("y").await?;
    let mut lossy = by.sink(SinkOptions::new().capacity(100_000).overflow(Overflow::DropNewest))?;
    ax.wait_for_sinks(1, T).await?;
    ay.wait_for_sinks(1, T).await?;
    linked();
    let mut sx = ax.source()?;
    let mut sy = ay.source()?;
    if let Err(e) = fill_until_refused(&mut sx).await {
        bail!("{e}: {:?} {:?} {}", ax.stats(), bx.stats(), blocker.len());
    }
    let n = 1000u64;
    for _ in 0..n {
        sy.submit("y", &Attrs::new(), b"").await?;
    }
    let dropped_at_source = ay.stats().dropped;
    assert!(dropped_at_source > 0, "nothing was dropped at the full link");
    let drain =
        tokio::spawn(async move { while let Ok(Ok(_)) = timeout(Duration::from_millis(500), blocker.recv()).await {} });
    let (mut got, mut lagged) = (0u64, 0u64);
    while got + lagged < n {
        match timeout(T, lossy.recv()).await.context("y events")? {
            Ok(_) => got += 1,
            Err(RecvError::Lagged(n)) => lagged += n,
            Err(e) => bail!("{e}"),
        }
    }
    assert_eq!(lagged, dropped_at_source);
    assert_eq!(got + lagged, n);
    drain.abort();
    Ok(())
}

/// The next event of `sink`, at most `T`; says whether the event never came or came and the receiver was not woken.
pub async fn recv(sink: &mut kecho::Sink) -> Result<Event> {
    let waited = timeout(T, sink.recv()).await;
    let Ok(got) = waited else {
        bail!("timed out waiting for an event ({} queued at the sink)", sink.len());
    };
    match got {
        Ok(e) => Ok(e),
        Err(e) => bail!("recv: {e}"),
    }
}

/// Waits until `f` holds, polling every 10 ms, at most `T`; how long it took.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = tokio::time::Instant::now();
    while !f() {
        if start.elapsed() > T {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

/// Three member nodes; the second is killed (no goodbye): the first drops its sink within 2 s and still reaches the
/// third. `linked` runs once both sinks are known (to check which transport the links took).
pub async fn a_crashed_member_is_removed_and_the_others_carry_on(nodes: &[Node], linked: impl FnOnce()) -> Result<()> {
    let a = nodes[0].create_channel("crash").await?;
    let b = nodes[1].open_channel("crash").await?;
    let c = nodes[2].open_channel("crash").await?;
    let _sb = b.sink(SinkOptions::new())?;
    let mut sc = c.sink(SinkOptions::new())?;
    a.wait_for_sinks(2, T).await?;
    linked();
    nodes[1].kill();
    let took = eventually("crashed sink removed", || a.sinks() == 1).await?;
    assert!(took < Duration::from_millis(2000), "took {took:?}");
    // The others carry on.
    let mut src = a.source()?;
    src.submit("e", &Attrs::new(), b"").await?;
    assert_eq!(recv(&mut sc).await?.seq(), 1);
    Ok(())
}

/// A node in tree mode above `threshold` member nodes, on loopback (the tree tests' nodes: a lease of 3 s and a
/// heartbeat timeout of 1.5 s, generous on a loaded machine).
pub async fn tree_node(reg: &RegistryClient, threshold: usize) -> Result<Node> {
    let m = MembershipConfig { lease_ttl: Duration::from_secs(3), ..MembershipConfig::default() };
    Ok(Node::builder()
        .registry_client(reg.clone())
        .heartbeat_timeout(Duration::from_millis(1500))
        .membership(m)
        .tree_threshold(threshold)
        .start()
        .await?)
}

/// A TCP relay in front of a node's listener that swallows the bytes of connections dialled by the nodes in `cut`
/// (in both directions; nothing is closed, so only heartbeats notice). A proxy knows who dialled from the node id in
/// the `Hello` frame. It can also refuse the nodes in `refused`: their connections are closed once their `Hello`
/// arrived, so that a dial fails at once, as to a node whose process died. And it can hold the connections of the
/// nodes in `held`: their `Hello` waits in the proxy until the hold ends, as a connection waits in the backlog of a
/// process that is frozen or slow to run.
pub struct Proxy {
    upstream: Arc<Mutex<SocketAddr>>,
    cut: Arc<Mutex<HashSet<u64>>>,
    refused: Arc<Mutex<HashSet<u64>>>,
    held: Arc<Mutex<HashSet<u64>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy towards `upstream` (see [`Proxy::point_at`]), and the address it listens on.
    pub async fn start(upstream: SocketAddr) -> Result<(Proxy, SocketAddr)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(Mutex::new(upstream));
        let target = up.clone();
        let cut: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let refused: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let held: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let (c, r, h) = (cut.clone(), refused.clone(), held.clone());
        let accept = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((down, _)) = listener.accept().await {
                let cut = c.clone();
                let refused = r.clone();
                let held = h.clone();
                let upstream = *target.lock();
                conns.push(tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else { return };
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    // The dialler's node id is in its Hello: length (4), kind (1), magic (4), version (2), node (8).
                    let mut hello = [0u8; 19];
                    if dr.read_exact(&mut hello).await.is_err() {
                        return;
                    }
                    let dialler = u64::from_le_bytes(hello[11..19].try_into().expect("8 bytes"));
                    while held.lock().contains(&dialler) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if refused.lock().contains(&dialler) || uw.write_all(&hello).await.is_err() {
                        return;
                    }
                    let c2 = cut.clone();
                    tokio::select! {
                        _ = relay(&mut dr, &mut uw, &cut, dialler) => {}
                        _ = relay(&mut ur, &mut dw, &c2, dialler) => {}
                    }
                }));
            }
            for c in conns {
                c.abort();
            }
        });
        Ok((Proxy { upstream: up, cut, refused, held, accept }, addr))
    }

    /// Relays the connections accepted from now on to `upstream` (a node started after its proxy, since it must
    /// advertise the proxy's address: binding a port, closing it and listening on it again races other processes).
    pub fn point_at(&self, upstream: SocketAddr) {
        *self.upstream.lock() = upstream;
    }

    /// Refuses (or accepts again) the connections dialled by node `dialler` from now on.
    pub fn refuse(&self, dialler: NodeId, on: bool) {
        let mut refused = self.refused.lock();
        if on {
            refused.insert(dialler.0);
        } else {
            refused.remove(&dialler.0);
        }
    }

    /// Holds (or lets through) the connections dialled by node `dialler` from now on, before their `Hello`.
    pub fn hold(&self, dialler: NodeId, on: bool) {
        let mut held = self.held.lock();
        if on {
            held.insert(dialler.0);
        } else {
            held.remove(&dialler.0);
        }
    }

    /// Cuts (or heals) the connections dialled by node `dialler`.
    pub fn cut(&self, dialler: NodeId, on: bool) {
        let mut cut = self.cut.lock();
        if on {
            cut.insert(dialler.0);
        } else {
            cut.remove(&dialler.0);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    cut: &Mutex<HashSet<u64>>,
    dialler: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.lock().contains(&dialler) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A source at `a` alternating large events of the default priority and small ones of the highest (on the link's
/// urgent stream or connection, once `apart(a, b)` says it is in use) submits 300 of them and its node shuts down
/// gracefully at once: a Block sink at `b` gets them all, in order (the main stream ends with a `Wait` for the whole
/// urgent one, and the node's leave waits for both).
pub async fn a_graceful_shutdown_delivers_both_streams(
    a: &Node,
    b: &Node,
    apart: impl Fn(&Node, &Node) -> bool,
) -> Result<()> {
    const N: i64 = 300;
    let k_of = |ev: &Event| match ev.attrs().get("k") {
        Some(kecho::Value::Int(i)) => *i,
        other => panic!("attribute k: {other:?}"),
    };
    let urgent = || kecho::EventOptions::new().priority(kecho::Priority::HIGHEST);
    let ch_b = b.channel("close").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(1024))?;
    let ch_a = a.channel("close").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    src.submit_with("urgent", &Attrs::new().with("k", 0), b"u", urgent()).await?;
    assert_eq!(k_of(&recv(&mut sink).await?), 0);
    eventually("the urgent stream in use", || apart(a, b)).await?;
    let big = vec![2u8; 16 << 10];
    for k in 1..=N {
        if k % 3 == 0 {
            src.submit_with("urgent", &Attrs::new().with("k", k), b"u", urgent()).await?;
        } else {
            src.submit("bulk", &Attrs::new().with("k", k), &big).await?;
        }
    }
    drop(src);
    a.shutdown().await;
    for k in 1..=N {
        assert_eq!(k_of(&recv(&mut sink).await?), k, "out of order or missing");
    }
    Ok(())
}

/// What a sink got: `(type, seq, events reported missed just before it)` per event, up to and including the first
/// event of type `last`.
pub async fn drain(sink: &mut kecho::Sink, last: &str) -> Result<Vec<(String, u64, u64)>> {
    let mut got = Vec::new();
    let mut missed = 0;
    loop {
        match timeout(T, sink.recv()).await.context("timed out waiting for an event")? {
            Ok(e) => {
                got.push((e.ty().to_owned(), e.seq(), std::mem::take(&mut missed)));
                if e.ty() == last {
                    return Ok(got);
                }
            }
            Err(RecvError::Lagged(n)) => missed += n,
            Err(e) => bail!("recv: {e}"),
        }
    }
}
