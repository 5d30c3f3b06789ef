//! TCP links with an urgent connection (docs/PROTOCOL.md, "Priorities and deadlines"): the urgent lanes pass a
//! stalled bulk connection, a source mixing priorities keeps its order across the two connections, a graceful
//! shutdown delivers both, a link opens its second connection only once it carries priorities (and never with
//! `urgent_connection(false)`), losing the urgent connection is losing the link, and a connection that claims a link
//! it does not own is refused.
//!
//! The nodes here sit behind relays (`Relay`) that count the TCP connections made to them, keep the first bytes of
//! each, and can reset one: the tests see the connections from outside, as a network would.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::BytesMut;
use kecho::{Attrs, Event, EventOptions, Node, Overflow, Priority, RecvError, RegistryClient, SinkOptions, Transport};
use kecho_proto::codec::{self, CloseCode};
use kecho_proto::{Message, NodeId};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

mod common;
use common::{eventually, recv};

const T: Duration = Duration::from_secs(10);

fn urgent() -> EventOptions {
    EventOptions::new().priority(Priority::HIGHEST)
}

/// One connection a relay carried: the first bytes each way, and a second handle on both sockets (to reset them).
struct Carried {
    /// From the dialler, up to 64 bytes (the first frame: `Hello` or `UrgentJoin`).
    from_dialler: Arc<Mutex<Vec<u8>>>,
    /// From the node behind the relay, up to 4 KiB (a handshake answer: `HelloAck`, `Proof`, `UrgentToken`).
    to_dialler: Arc<Mutex<Vec<u8>>>,
    socks: Vec<socket2::Socket>,
    task: JoinHandle<()>,
}

impl Carried {
    /// The kind of the dialler's first frame, once it has been seen.
    fn first_kind(&self) -> Option<u8> {
        self.from_dialler.lock().get(4).copied()
    }
}

/// A TCP relay in front of one node (which advertises the relay's address, so every node dials it there).
struct Relay {
    upstream: Arc<OnceLock<SocketAddr>>,
    conns: Arc<Mutex<Vec<Carried>>>,
    accept: JoinHandle<()>,
    addr: SocketAddr,
}

impl Relay {
    async fn start() -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream: Arc<OnceLock<SocketAddr>> = Arc::default();
        let conns: Arc<Mutex<Vec<Carried>>> = Arc::default();
        let (u, c) = (upstream.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Some(&to) = u.get() else { continue };
                let Ok(up) = TcpStream::connect(to).await else { continue };
                let socks = [&down, &up].iter().filter_map(|s| socket2::SockRef::from(*s).try_clone().ok()).collect();
                let from_dialler: Arc<Mutex<Vec<u8>>> = Arc::default();
                let to_dialler: Arc<Mutex<Vec<u8>>> = Arc::default();
                let (fd, td) = (from_dialler.clone(), to_dialler.clone());
                // Recorded before a byte is carried, so that what the nodes do with it is never seen first.
                let (go, gate) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(async move {
                    if gate.await.is_err() {
                        return;
                    }
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    tokio::select! {
                        _ = pipe(&mut dr, &mut uw, &fd, 64) => {}
                        _ = pipe(&mut ur, &mut dw, &td, 4096) => {}
                    }
                });
                c.lock().push(Carried { from_dialler, to_dialler, socks, task });
                let _ = go.send(());
            }
        });
        Ok(Relay { upstream, conns, accept, addr })
    }

    /// Connections carried so far, and how many of them were urgent ones (first frame `UrgentJoin`, kind 66).
    fn counts(&self) -> (usize, usize) {
        let c = self.conns.lock();
        (c.len(), c.iter().filter(|c| c.first_kind() == Some(66)).count())
    }

    /// Resets (RST) both sides of the first urgent connection carried.
    fn reset_urgent(&self) -> Result<()> {
        let mut c = self.conns.lock();
        let u = c.iter_mut().find(|c| c.first_kind() == Some(66)).context("no urgent connection carried")?;
        for s in &u.socks {
            s.set_linger(Some(Duration::ZERO))?;
        }
        // The relay's own handles go with its task; the last close sends the reset.
        u.socks.clear();
        u.task.abort();
        Ok(())
    }

    /// The token the node behind the relay handed out on the link dialled by `dialler` (the third frame of its
    /// answer to that node's `Hello`).
    fn token_for(&self, dialler: NodeId) -> Result<[u8; 16]> {
        let c = self.conns.lock();
        // A `Hello`: length (4), kind (1), magic (4), version (2), node id (8).
        let hello_of = |c: &&Carried| c.from_dialler.lock().get(11..19) == Some(&dialler.0.to_le_bytes()[..]);
        let first = c.iter().filter(|c| c.first_kind() != Some(66)).find(hello_of).context("no link dialled")?;
        let mut b = BytesMut::from(&first.to_dialler.lock()[..]);
        for _ in 0..2 {
            codec::split_frame(&mut b, 1 << 20)?.context("handshake answer incomplete")?;
        }
        let f = codec::split_frame(&mut b, 1 << 20)?.context("no UrgentToken frame")?;
        ensure!(f.len() == 17 && f[0] == 65, "third frame of the answer is not a token: {:?}", &f[..]);
        Ok(f[1..].try_into()?)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().iter() {
            c.task.abort();
        }
    }
}

async fn pipe(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    keep: &Mutex<Vec<u8>>,
    most: usize,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        {
            let mut k = keep.lock();
            let room = most.saturating_sub(k.len()).min(n);
            k.extend_from_slice(&buf[..room]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP node behind a relay, with a large outbox (a bulk backlog waits there and in the sockets rather than being
/// refused).
async fn node(reg: &RegistryClient, urgent_connection: bool) -> Result<(Node, Relay)> {
    let relay = Relay::start().await?;
    let n = Node::builder()
        .registry_client(reg.clone())
        .link_queue_bytes(64 << 20)
        .advertise(relay.addr)
        .urgent_connection(urgent_connection)
        .start()
        .await?;
    relay.upstream.set(n.local_addr()).ok();
    Ok((n, relay))
}

async fn pair(reg: &RegistryClient) -> Result<(Node, Relay, Node, Relay)> {
    let (a, ra) = node(reg, true).await?;
    let (b, rb) = node(reg, true).await?;
    Ok((a, ra, b, rb))
}

fn attr_i(ev: &Event, k: &str) -> i64 {
    match ev.attrs().get(k) {
        Some(kecho::Value::Int(i)) => *i,
        other => panic!("attribute {k}: {other:?}"),
    }
}

fn link_of(n: &Node, to: &Node) -> kecho::LinkStats {
    try_link_of(n, to).expect("a link to the other node")
}

fn try_link_of(n: &Node, to: &Node) -> Option<kecho::LinkStats> {
    n.link_stats().into_iter().find(|l| l.node == to.id())
}

/// Waits until `a` sends its urgent frames to `b` on a connection of their own.
async fn apart(a: &Node, b: &Node) -> Result<()> {
    eventually("the urgent connection in use", || link_of(a, b).urgent_apart).await?;
    assert_eq!(link_of(a, b).transport, Transport::Tcp);
    Ok(())
}

/// An urgent event arrives while the link's main connection is stalled by a bulk backlog the receiving node cannot
/// deliver (its sink is full and not read; its socket buffers and the sender's hold bulk events). On one connection it
/// would wait behind all of them until the bulk sink is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_event_passes_a_stalled_bulk_connection() -> Result<()> {
    const BULK: usize = 400;
    let reg = RegistryClient::in_process_private();
    let (a, _ra, b, _rb) = pair(&reg).await?;
    let ch_b = b.channel("urgent").await?;
    let mut bulk_sink = ch_b.sink(SinkOptions::new().types(["bulk"]).overflow(Overflow::Block).capacity(8))?;
    let mut urgent_sink = ch_b.sink(SinkOptions::new().types(["warm-up", "urgent"]))?;
    let ch_a = a.channel("urgent").await?;
    ch_a.wait_for_sinks(2, T).await?;
    let mut bulk = ch_a.source()?;
    let mut alarm = ch_a.source()?;
    alarm.submit_with("warm-up", &Attrs::new(), b"", urgent()).await?;
    assert_eq!(recv(&mut urgent_sink).await?.ty(), "warm-up");
    apart(&a, &b).await?;
    let payload = vec![0u8; 64 << 10];
    for _ in 0..BULK {
        bulk.submit("bulk", &Attrs::new(), &payload).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    alarm.submit_with("urgent", &Attrs::new(), b"now", urgent()).await?;
    assert_eq!(recv(&mut urgent_sink).await?.ty(), "urgent");
    assert!(bulk_sink.len() <= 8, "the bulk sink was read");
    for _ in 0..BULK {
        assert_eq!(recv(&mut bulk_sink).await?.ty(), "bulk");
    }
    Ok(())
}

/// A source's urgent event crosses to the urgent connection while the bulk events it sent before are still on the
/// main connection, unread: the receiving node's sink is full (`Block`) and its main reader waits for room. Without
/// the `Wait` frame that holds the urgent connection's reader until the main connection has been read past those
/// events, the urgent event would take the sink's next free place ahead of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_mixing_priorities_keeps_its_order_over_two_connections() -> Result<()> {
    const BULK: i64 = 8;
    let reg = RegistryClient::in_process_private();
    let (a, _ra, b, _rb) = pair(&reg).await?;
    let ch_b = b.channel("mixed").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(2))?;
    let ch_a = a.channel("mixed").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    src.submit_with("urgent", &Attrs::new().with("k", 0), b"u", urgent()).await?;
    assert_eq!(attr_i(&recv(&mut sink).await?, "k"), 0);
    apart(&a, &b).await?;
    let big = vec![1u8; 64 << 10];
    let (mut k, mut next) = (1, 1);
    for round in 0..3 {
        // Bulk events, all taken by the link's writer (on the main connection; most unread at B, whose sink is
        // full), then an urgent one, then the sink is read.
        for _ in 0..BULK {
            src.submit("bulk", &Attrs::new().with("k", k), &big).await?;
            k += 1;
        }
        eventually("the bulk events taken by the writer", || link_of(&a, &b).queued_bytes == 0).await?;
        src.submit_with("urgent", &Attrs::new().with("k", k), b"u", urgent()).await?;
        k += 1;
        // The urgent connection's reader has it by now (loopback), and waits.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while next < k {
            let ev = recv(&mut sink).await?;
            assert_eq!(attr_i(&ev, "k"), next, "out of order (round {round})");
            next += 1;
        }
    }
    assert!(link_of(&a, &b).urgent_apart);
    assert_eq!(link_of(&a, &b).connects, 1, "the link was replaced");
    Ok(())
}

/// A node that shuts down gracefully right after submitting delivers everything on both connections first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_delivers_both_connections() -> Result<()> {
    const N: i64 = 300;
    let reg = RegistryClient::in_process_private();
    let (a, _ra, b, _rb) = pair(&reg).await?;
    let ch_b = b.channel("close").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(1024))?;
    let ch_a = a.channel("close").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    src.submit_with("urgent", &Attrs::new().with("k", 0), b"u", urgent()).await?;
    assert_eq!(attr_i(&recv(&mut sink).await?, "k"), 0);
    apart(&a, &b).await?;
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
        assert_eq!(attr_i(&recv(&mut sink).await?, "k"), k, "out of order or missing");
    }
    Ok(())
}

/// A link that carries no priorities keeps one connection; the first prioritised event brings the second (on the
/// link whichever node dialled it); a node with `urgent_connection(false)` never has one, nor does its peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_connection_comes_with_the_first_prioritised_event_and_only_if_both_allow_it() -> Result<()> {
    for (on_a, on_b) in [(true, true), (true, false), (false, true)] {
        let reg = RegistryClient::in_process_private();
        let (a, ra) = node(&reg, on_a).await?;
        let (b, rb) = node(&reg, on_b).await?;
        let ch_b = b.channel("lazy").await?;
        let mut sink = ch_b.sink(SinkOptions::new())?;
        let ch_a = a.channel("lazy").await?;
        ch_a.wait_for_sinks(1, T).await?;
        let mut src = ch_a.source()?;
        for k in 0..20 {
            src.submit("plain", &Attrs::new().with("k", k), &[0u8; 1000]).await?;
            assert_eq!(attr_i(&recv(&mut sink).await?, "k"), k);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Urgent connections made (the main ones may be two for a moment, when both nodes dial at once).
        let total = |r: &Relay, s: &Relay| r.counts().1 + s.counts().1;
        assert_eq!(total(&ra, &rb), 0, "an urgent connection before any priority ({on_a}, {on_b})");
        src.submit_with("urgent", &Attrs::new().with("k", 20), b"u", urgent()).await?;
        assert_eq!(attr_i(&recv(&mut sink).await?, "k"), 20);
        if on_a && on_b {
            apart(&a, &b).await?;
            // The dialler uses its connection once it is made (the acceptor answers a join with nothing): the relay
            // may count it a moment later.
            eventually("the relay counting the urgent connection", || total(&ra, &rb) >= 1).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(total(&ra, &rb), 1);
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(total(&ra, &rb), 0, "an urgent connection though one node is off ({on_a}, {on_b})");
            assert!(!link_of(&a, &b).urgent_apart);
            src.submit_with("urgent", &Attrs::new().with("k", 21), b"u", urgent()).await?;
            assert_eq!(attr_i(&recv(&mut sink).await?, "k"), 21);
        }
    }
    Ok(())
}

/// Losing the urgent connection (reset) is losing the link: the nodes close its main connection too, a new link
/// comes up (with its own urgent connection), and every event of the source is delivered in order or reported
/// missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_urgent_connection_is_losing_the_link() -> Result<()> {
    const N: i64 = 400;
    let reg = RegistryClient::in_process_private();
    let (a, ra, b, rb) = pair(&reg).await?;
    let ch_b = b.channel("reset").await?;
    let mut sink = ch_b.sink(SinkOptions::new().capacity(4096))?;
    let ch_a = a.channel("reset").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    src.submit_with("urgent", &Attrs::new(), b"u", urgent()).await?;
    recv(&mut sink).await?;
    apart(&a, &b).await?;
    let relay = if ra.counts().1 == 1 { &ra } else { &rb };
    let sender = tokio::spawn(async move {
        for k in 2..=N {
            let o = if k % 2 == 0 { urgent() } else { EventOptions::new() };
            src.submit_with("e", &Attrs::new(), &[0u8; 2000], o).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(src)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.reset_urgent()?;
    // Both connections of the link are closed by the nodes (the relay's other connections, of links that lost the
    // race when both nodes dialled at once, were closed before), and a new link comes up with two connections.
    let before = relay.conns.lock().len();
    eventually("the link's main connection closed", || {
        relay.conns.lock()[..before].iter().all(|c| c.task.is_finished())
    })
    .await?;
    let urgent_before = ra.counts().1 + rb.counts().1;
    let mut src = sender.await??;
    // More urgent events once the sender is done, until a new link carries one (events sent while the link was
    // down may have gone nowhere: the channel had no route to B then; they are reported missed).
    let mut extra = 0;
    loop {
        src.submit_with("e", &Attrs::new(), &[0u8; 2000], urgent()).await?;
        extra += 1;
        let new = try_link_of(&a, &b).is_some_and(|l| l.up && l.urgent_apart);
        if new && ra.counts().1 + rb.counts().1 > urgent_before {
            break;
        }
        ensure!(extra < 200, "no new link with its urgent connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_k = N as u64 + extra;
    // Events 2 to last_k: each delivered once, in order, or reported missed.
    let (mut got, mut lagged, mut gaps, mut last) = (0u64, 0u64, 0u64, 1u64);
    while got + lagged < last_k - 1 {
        match tokio::time::timeout(T, sink.recv()).await.context("events stopped arriving")? {
            Ok(ev) => {
                ensure!(ev.seq() > last, "seq {} after {last} (duplicate or out of order)", ev.seq());
                gaps += ev.seq() - last - 1;
                last = ev.seq();
                got += 1;
            }
            Err(RecvError::Lagged(n)) => lagged += n,
            Err(e) => bail!("recv: {e}"),
        }
    }
    gaps += last_k - last;
    eprintln!("delivered {got}, reported missed {lagged}, gaps {gaps}");
    ensure!(gaps == lagged, "{gaps} events missing but {lagged} reported missed");
    Ok(())
}

/// A connection that presents an `UrgentJoin` for a link it does not own is refused with `Close{Handshake}`: the
/// token of one link with the node id of another, a second join for a link whose urgent connection is up, and a join
/// sent to the dialling end of a link. The real link goes on carrying urgent events, on the same connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_urgent_connection_is_refused() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, ra, b, rb) = pair(&reg).await?;
    let (c, _rc) = node(&reg, true).await?;
    let ch_b = b.channel("forged").await?;
    let mut sink = ch_b.sink(SinkOptions::new())?;
    let ch_a = a.channel("forged").await?;
    let ch_c = c.channel("forged").await?;
    ch_a.wait_for_sinks(1, T).await?;
    ch_c.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    src.submit_with("first", &Attrs::new(), b"", urgent()).await?;
    assert_eq!(recv(&mut sink).await?.ty(), "first");
    apart(&a, &b).await?;
    // The link between A and B, as its relays saw it: who accepted it, and the token it handed out.
    let (acceptor, dialler, token) = match ra.token_for(b.id()) {
        Ok(t) => (&a, &b, t),
        Err(_) => (&b, &a, rb.token_for(a.id())?),
    };
    let other = &c;
    // Another link's token (or one C never had) under C's id; then the real token again; then at the dialler.
    for (to, node, why) in [
        (acceptor, other.id(), "the token of another link"),
        (acceptor, dialler.id(), "a second join for one link"),
        (dialler, acceptor.id(), "a join at the dialling end"),
    ] {
        refused(to.local_addr(), node, &token).await.with_context(|| why.to_owned())?;
    }
    src.submit_with("second", &Attrs::new(), b"", urgent()).await?;
    assert_eq!(recv(&mut sink).await?.ty(), "second");
    assert_eq!(link_of(&a, &b).connects, 1, "the link was replaced");
    assert!(link_of(&a, &b).urgent_apart);
    assert_eq!(ra.counts().1 + rb.counts().1, 1);
    Ok(())
}

/// Sends `UrgentJoin{node, token}` to `to` and expects `Close{Handshake}`.
async fn refused(to: SocketAddr, node: NodeId, token: &[u8; 16]) -> Result<()> {
    let mut forged = TcpStream::connect(to).await?;
    let mut join = Vec::new();
    join.extend_from_slice(&25u32.to_le_bytes());
    join.push(66);
    join.extend_from_slice(&node.0.to_le_bytes());
    join.extend_from_slice(token);
    forged.write_all(&join).await?;
    let mut buf = BytesMut::new();
    let answer = tokio::time::timeout(T, async {
        loop {
            if let Some(m) = codec::decode_frame(&mut buf, 1 << 20)? {
                return anyhow::Ok(m);
            }
            if forged.read_buf(&mut buf).await? == 0 {
                bail!("closed without a Close frame");
            }
        }
    })
    .await??;
    match answer {
        Message::Close { code: CloseCode::Handshake, .. } => Ok(()),
        other => bail!("expected Close{{Handshake}}, got {other:?}"),
    }
}
