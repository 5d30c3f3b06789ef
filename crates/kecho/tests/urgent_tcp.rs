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
use kecho::{
    Attrs, Channel, Event, EventOptions, Node, Overflow, Priority, RecvError, RegistryClient, SinkOptions, Transport,
};
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

    /// Stops taking connections: the relay's listening socket closes, so that a connection dialled to it now is refused
    /// (as a firewall that lets no new connection through would), while those it carries go on.
    async fn stop_accepting(&self) -> Result<()> {
        self.accept.abort();
        for _ in 0..500 {
            if TcpStream::connect(self.addr).await.is_err() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("the relay at {} still takes connections", self.addr)
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
    node_with(reg, |b| b.urgent_connection(urgent_connection)).await
}

/// As [`node`], with the builder set by `how`.
async fn node_with(
    reg: &RegistryClient,
    how: impl FnOnce(kecho::NodeBuilder) -> kecho::NodeBuilder,
) -> Result<(Node, Relay)> {
    let relay = Relay::start().await?;
    let n = how(Node::builder().registry_client(reg.clone()).link_queue_bytes(64 << 20).advertise(relay.addr))
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

/// Two nodes as from [`pair`], with channel `name` open at both and the link between them up at both ends (a probe
/// sink at `x` that takes nothing makes `y` want it), then settled: a second dial made at the same moment (both nodes
/// dialling at once; one link is kept) has reached its relay.
struct Linked {
    x: Node,
    rx: Relay,
    y: Node,
    ry: Relay,
    cx: Channel,
    cy: Channel,
    _probe: kecho::Sink,
}

async fn linked_pair(reg: &RegistryClient, name: &str) -> Result<Linked> {
    let (x, rx, y, ry) = pair(reg).await?;
    let (cx, cy) = (x.channel(name).await?, y.channel(name).await?);
    let _probe = cx.sink(SinkOptions::new().types(["none"]))?;
    cy.wait_for_sinks(1, T).await?;
    eventually("the link up at both ends", || {
        try_link_of(&x, &y).is_some_and(|l| l.up) && try_link_of(&y, &x).is_some_and(|l| l.up)
    })
    .await?;
    // A second dial made at the same moment may reach its relay a little later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Linked { x, rx, y, ry, cx, cy, _probe })
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

/// The first urgent event on a link whose main connection is stalled by a bulk backlog (as above, but with no urgent
/// event before it: the urgent connection is made for this one) passes the backlog when its node dialled the link:
/// the writer holds the urgent lanes for the moment the connection takes to come up, then sends them there. Before,
/// it went on the main connection, behind the backlog, and arrived only once the bulk sink was read. (At the
/// accepting end nothing is held: its `UrgentWanted` would cross the same backlog before the dial could start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_urgent_event_of_the_dialling_node_passes_a_stalled_bulk_connection() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    // Bring the link up, then send from the node that dialled it (the relays count the connections made to their
    // node; when both nodes dialled at once, the connection dialled by the lower node id is the one kept).
    let Linked { x, rx, y, ry, cx, cy, _probe } = linked_pair(&reg, "first").await?;
    let to = |r: &Relay| r.counts().0 - r.counts().1;
    let x_dialled = match (to(&rx), to(&ry)) {
        (0, _) => true,
        (_, 0) => false,
        _ => x.id() < y.id(),
    };
    let ((a, ch_a), (b, ch_b)) = if x_dialled { ((&x, cx), (&y, cy)) } else { ((&y, cy), (&x, cx)) };
    // The probe and the two sinks (the count includes local sinks).
    urgent_passes_backlog(a, b, &ch_a, &ch_b, 3, || {
        let urgent_conns = rx.counts().1 + ry.counts().1;
        format!(
            "the first urgent event waited behind the stalled bulk backlog (connections to x {:?}, to y {:?}; urgent \
             connections {urgent_conns}, in use {})",
            rx.counts(),
            ry.counts(),
            link_of(a, b).urgent_apart
        )
    })
    .await
}

/// Node `a` sends 400 bulk events of 64 KiB that `b` cannot read (its bulk sink blocks at 8), then one urgent event:
/// it must reach `b`'s urgent sink within 5 s, on the urgent connection, and every bulk event must follow in order
/// once read. `sinks`: how many sinks `ch_a` must see before sending; `why`: the failure's context.
async fn urgent_passes_backlog(
    a: &Node,
    b: &Node,
    ch_a: &Channel,
    ch_b: &Channel,
    sinks: usize,
    why: impl FnOnce() -> String,
) -> Result<()> {
    const BULK: usize = 400;
    let mut bulk_sink = ch_b.sink(SinkOptions::new().types(["bulk"]).overflow(Overflow::Block).capacity(8))?;
    let mut urgent_sink = ch_b.sink(SinkOptions::new().types(["urgent"]))?;
    ch_a.wait_for_sinks(sinks, T).await?;
    let mut bulk = ch_a.source()?;
    let mut alarm = ch_a.source()?;
    let payload = vec![0u8; 64 << 10];
    for _ in 0..BULK {
        bulk.submit("bulk", &Attrs::new(), &payload).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!link_of(a, b).urgent_apart, "an urgent connection in use before any priority");
    alarm.submit_with("urgent", &Attrs::new(), b"now", urgent()).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), recv(&mut urgent_sink)).await.with_context(why)??;
    assert_eq!(got.ty(), "urgent");
    assert!(link_of(a, b).urgent_apart);
    assert!(bulk_sink.len() <= 8, "the bulk sink was read");
    for _ in 0..BULK {
        assert_eq!(recv(&mut bulk_sink).await?.ty(), "bulk");
    }
    Ok(())
}

/// With `urgent_connection_at_once` the urgent connection comes up with the link, before any priority, and the
/// first urgent event of the node that *accepted* the link passes a stalled bulk backlog: that node asks for the
/// connection with the first frame it writes, ahead of any backlog. (Without it, its `UrgentWanted` would cross the
/// backlog first, and the event with it.) Only the accepting node has the setting on: either end is enough. The
/// other node cannot be dialled (its relay refuses every connection), so the node with the setting is the acceptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_once_the_first_urgent_event_of_the_accepting_node_passes_a_stalled_bulk_connection() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, ra) = node_with(&reg, |b| b.urgent_connection_at_once(true)).await?;
    // B's relay never learns where B is: every connection to it is dropped, so only B dials.
    let rb = Relay::start().await?;
    let b = Node::builder().registry_client(reg.clone()).link_queue_bytes(64 << 20).advertise(rb.addr).start().await?;
    let ch_a = a.channel("first").await?;
    let ch_b = b.channel("first").await?;
    // A sink, so that the link comes up before the events.
    let _probe = ch_b.sink(SinkOptions::new().types(["none"]))?;
    ch_a.wait_for_sinks(1, T).await?;
    eventually("the link up at both ends", || {
        try_link_of(&a, &b).is_some_and(|l| l.up) && try_link_of(&b, &a).is_some_and(|l| l.up)
    })
    .await?;
    ensure!(ra.counts().0 >= 1, "B did not dial A: {:?}", ra.counts());
    // The urgent connection, dialled by B as soon as A asked, before any event of any priority.
    eventually("the urgent connection made with the link", || ra.counts().1 == 1).await?;
    // The probe and the two sinks.
    urgent_passes_backlog(&a, &b, &ch_a, &ch_b, 3, || {
        "the first urgent event of the accepting node waited behind the stalled bulk backlog".to_owned()
    })
    .await
}

/// A source's urgent event crosses to the urgent connection while the bulk events it sent before are still on the
/// main connection, unread: the receiving node's sink is full (`Block`) and its main reader waits for room. Without
/// the `Wait` frame that holds the urgent connection's reader until the main connection has been read past those
/// events, the urgent event would take the sink's next free place ahead of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_mixing_priorities_keeps_its_order_over_two_connections() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, _ra, b, _rb) = pair(&reg).await?;
    mixed_order(&a, &b).await
}

/// A source at `a` mixes priorities towards a full `Block` sink at `b` (see the test above).
async fn mixed_order(a: &Node, b: &Node) -> Result<()> {
    const BULK: i64 = 8;
    let ch_b = b.channel("mixed").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(2))?;
    let ch_a = a.channel("mixed").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    src.submit_with("urgent", &Attrs::new().with("k", 0), b"u", urgent()).await?;
    assert_eq!(attr_i(&recv(&mut sink).await?, "k"), 0);
    apart(a, b).await?;
    let big = vec![1u8; 64 << 10];
    let (mut k, mut next) = (1, 1);
    for round in 0..3 {
        // Bulk events, all taken by the link's writer (on the main connection; most unread at B, whose sink is
        // full), then an urgent one, then the sink is read.
        for _ in 0..BULK {
            src.submit("bulk", &Attrs::new().with("k", k), &big).await?;
            k += 1;
        }
        eventually("the bulk events taken by the writer", || link_of(a, b).queued_bytes == 0).await?;
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
    assert!(link_of(a, b).urgent_apart);
    assert_eq!(link_of(a, b).connects, 1, "the link was replaced");
    Ok(())
}

/// Over TLS (both connections, each authenticated against the nodes' CA), the urgent connection comes up and a
/// source mixing priorities keeps its order; a plaintext `UrgentJoin` sent to a TLS node is closed unread.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_urgent_connection_works_over_tls() -> Result<()> {
    let ours = common::Ca::new()?;
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).tls(ours.loopback()?).start().await?;
    let b = Node::builder().registry_client(reg.clone()).tls(ours.loopback()?).start().await?;
    mixed_order(&a, &b).await?;
    let ports = [a.local_addr().port(), b.local_addr().port()];
    assert!(open_sockets_of(&ports) >= 4, "two connections, both ends: {}", open_sockets_of(&ports));
    // A plaintext UrgentJoin to a TLS node is not even read as one (the TLS handshake fails first): it is closed.
    let mut plain = TcpStream::connect(b.local_addr()).await?;
    let mut join = vec![25, 0, 0, 0, 66];
    join.extend_from_slice(&a.id().0.to_le_bytes());
    join.extend_from_slice(&[0; 16]);
    plain.write_all(&join).await?;
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(T, plain.read(&mut buf)).await.context("a plaintext join left open")?;
    ensure!(matches!(r, Ok(0) | Err(_)) || r.as_ref().is_ok_and(|_| buf[0] == 0x15), "answered: {r:?}");
    assert_eq!(link_of(&a, &b).connects, 1);
    assert!(link_of(&a, &b).urgent_apart);
    Ok(())
}

/// A node that shuts down gracefully right after submitting delivers everything on both connections first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_delivers_both_connections() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, _ra, b, _rb) = pair(&reg).await?;
    common::a_graceful_shutdown_delivers_both_streams(&a, &b, |a, b| link_of(a, b).urgent_apart).await
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

/// The dialler's urgent connection cannot be made (the accepting node's relay takes no new connection once the link is
/// up: the dial is refused): the dialler tells the acceptor with an `UrgentFailed` frame on the main connection, so the
/// acceptor closes its slot for the connection, and a late `UrgentJoin` with the link's token is refused as a second
/// one. Without the frame the acceptor would wait for the connection for the link's lifetime and bind the late join
/// (then move its urgent lanes onto a connection the dialler gave up on). Run with only the acceptor carrying
/// priorities (the dialler's dial follows its `UrgentWanted`), and with both. The urgent events keep flowing on the
/// main connection, in order, and the link is never replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acceptor_learns_that_the_urgent_connection_failed() -> Result<()> {
    for dialler_urgent in [false, true] {
        let reg = RegistryClient::in_process_private();
        // Bring the link up and see which node dialled it (when both dial at once, one link is kept: wait for that).
        let Linked { x, rx, y, ry, cx, cy, _probe } = linked_pair(&reg, "failed").await?;
        let (lx, ly) = (link_of(&x, &y), link_of(&y, &x));
        ensure!(lx.urgent_dialler != ly.urgent_dialler, "one end dials the urgent connection: {lx:?} {ly:?}");
        let ((acceptor, ch_acc, r_acc), (dialler, ch_dia)) =
            if lx.urgent_dialler { ((&y, &cy, &ry), (&x, &cx)) } else { ((&x, &cx, &rx), (&y, &cy)) };
        let token = r_acc.token_for(dialler.id())?;
        r_acc.stop_accepting().await?;
        // The acceptor's urgent events (and the dialler's, in the second run) reach the other node (each sink takes the
        // other node's events only: a source's events reach its own node's sinks too).
        let mut at_dialler = ch_dia.sink(SinkOptions::new().types(["from-acceptor"]))?;
        let mut at_acceptor = ch_acc.sink(SinkOptions::new().types(["from-dialler"]))?;
        ch_acc.wait_for_sinks(3, T).await?;
        ch_dia.wait_for_sinks(3, T).await?;
        let mut from_acceptor = ch_acc.source()?;
        let mut from_dialler = ch_dia.source()?;
        for k in 0..20 {
            from_acceptor.submit_with("from-acceptor", &Attrs::new().with("k", k), b"a", urgent()).await?;
            if dialler_urgent {
                from_dialler.submit_with("from-dialler", &Attrs::new().with("k", k), b"d", urgent()).await?;
            }
        }
        for k in 0..20 {
            ensure!(attr_i(&recv(&mut at_dialler).await?, "k") == k, "the acceptor's urgent events out of order");
            if dialler_urgent {
                ensure!(attr_i(&recv(&mut at_acceptor).await?, "k") == k, "the dialler's urgent events out of order");
            }
        }
        // The dial was refused at once; its `UrgentFailed` follows on the main connection.
        tokio::time::sleep(Duration::from_millis(500)).await;
        refused(acceptor.local_addr(), dialler.id(), &token)
            .await
            .with_context(|| format!("a late join was taken (dialler sends priorities: {dialler_urgent})"))?;
        from_acceptor.submit_with("from-acceptor", &Attrs::new().with("k", 20), b"a", urgent()).await?;
        ensure!(attr_i(&recv(&mut at_dialler).await?, "k") == 20);
        for (n, m) in [(acceptor, dialler), (dialler, acceptor)] {
            let l = link_of(n, m);
            ensure!(l.up && l.connects == 1 && !l.urgent_apart, "{l:?}");
        }
        ensure!(r_acc.counts().1 == 0, "an urgent connection was carried: {:?}", r_acc.counts());
    }
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
    let mut join = Vec::new();
    join.extend_from_slice(&25u32.to_le_bytes());
    join.push(66);
    join.extend_from_slice(&node.0.to_le_bytes());
    join.extend_from_slice(token);
    refused_raw(to, &join).await
}

/// The TCP sockets of this machine (IPv4 and IPv6) that touch one of `ports` (as their local or their remote port)
/// and are open at this end: established, or closed by the other end but not by this one (`CLOSE_WAIT`). Listening sockets
/// and those in `TIME_WAIT` hold no descriptor.
fn open_sockets_of(ports: &[u16]) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            let (Some(l), Some(r), Some(st)) = (f.get(1), f.get(2), f.get(3)) else { continue };
            // 01 ESTABLISHED, 08 CLOSE_WAIT.
            let touches = |a: &str| port_of(a).is_some_and(|p| ports.contains(&p));
            if (touches(l) || touches(r)) && matches!(*st, "01" | "08") {
                n += 1;
            }
        }
    }
    n
}

/// Nodes come, link with a node that stays (each way, the new node's events urgent, the staying node's not), and
/// leave, again and again: the staying node keeps no socket of theirs open, urgent connections included (the halves
/// of one that no task took, at the end whose outbox never carried priorities, go with the link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_connection_closes_with_its_link() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let b = Node::builder().registry_client(reg.clone()).start().await?;
    let ch_b = b.channel("churn").await?;
    let mut sink_b = ch_b.sink(SinkOptions::new().types(["urgent"]))?;
    // One source at B for the whole test: it keeps the routing table of its last submit until its next.
    let mut src_b = ch_b.source()?;
    for round in 0..6 {
        let a = Node::builder().registry_client(reg.clone()).start().await?;
        let ports = [a.local_addr().port(), b.local_addr().port()];
        let ch_a = a.channel("churn").await?;
        let mut sink_a = ch_a.sink(SinkOptions::new().types(["plain"]))?;
        ch_a.wait_for_sinks(2, T).await?;
        ch_b.wait_for_sinks(2, T).await?;
        let mut src_a = ch_a.source()?;
        src_a.submit_with("urgent", &Attrs::new(), b"u", urgent()).await?;
        assert_eq!(recv(&mut sink_b).await?.ty(), "urgent");
        src_b.submit("plain", &Attrs::new(), b"p").await?;
        assert_eq!(recv(&mut sink_a).await?.ty(), "plain");
        apart(&a, &b).await?;
        eventually("two connections between the nodes", || open_sockets_of(&ports) >= 4).await?;
        drop((src_a, sink_a, ch_a));
        a.shutdown().await;
        eventually("B's link to A gone", || try_link_of(&b, &a).is_none_or(|l| !l.up)).await?;
        let r = eventually("every socket of A's link closed at B", || open_sockets_of(&ports) == 0).await;
        r.with_context(|| format!("round {round}: {} sockets left open", open_sockets_of(&ports)))?;
    }
    Ok(())
}

/// Connections that are not urgent connections of a link this node accepted are closed, and the links it has are not
/// disturbed: a malformed `UrgentJoin`, a join naming a node this node has no link with, and a connection that sends
/// nothing (closed once the handshake time is up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_joins_and_silent_connections_leave_the_links_alone() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, _ra, b, _rb) = pair(&reg).await?;
    let ch_b = b.channel("bad").await?;
    let mut sink = ch_b.sink(SinkOptions::new())?;
    let ch_a = a.channel("bad").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    src.submit_with("e", &Attrs::new().with("k", 0), b"", urgent()).await?;
    assert_eq!(attr_i(&recv(&mut sink).await?, "k"), 0);
    apart(&a, &b).await?;
    let silent = [TcpStream::connect(a.local_addr()).await?, TcpStream::connect(b.local_addr()).await?];
    let mut short = vec![];
    short.extend_from_slice(&9u32.to_le_bytes());
    short.push(66);
    short.extend_from_slice(&a.id().0.to_le_bytes());
    for to in [a.local_addr(), b.local_addr()] {
        refused_raw(to, &short).await.context("a join without its token")?;
        refused(to, NodeId(0x5eed), &[7; 16]).await.context("a join for a node without a link")?;
    }
    for k in 1..=20 {
        let o = if k % 2 == 0 { urgent() } else { EventOptions::new() };
        src.submit_with("e", &Attrs::new().with("k", k), b"", o).await?;
        assert_eq!(attr_i(&recv(&mut sink).await?, "k"), k);
    }
    // The silent connections are closed after the handshake time (5 s), without an answer.
    for mut s in silent {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await.context("left open")?;
        ensure!(matches!(n, Ok(0) | Err(_)), "a silent connection got an answer: {n:?}");
    }
    assert_eq!(link_of(&a, &b).connects, 1, "the link was replaced");
    assert!(link_of(&a, &b).urgent_apart);
    Ok(())
}

/// A hand-made node (identity `me`) links with `to` over TCP and opens the link's urgent connection, whose first
/// write is its `UrgentJoin` and `then`: the main and urgent connections.
async fn hand_made_link(to: &Node, me: &kecho::Identity, then: &[u8]) -> Result<(TcpStream, TcpStream)> {
    let addr = "127.0.0.1:9";
    let mut main = TcpStream::connect(to.local_addr()).await?;
    let mut out = BytesMut::new();
    Message::Hello {
        version: kecho_proto::PROTOCOL_VERSION,
        node: me.node_id(),
        addr: addr.into(),
        purpose: codec::Purpose::Node,
    }
    .encode(&mut out);
    me.hello_proof(to.id(), addr).encode(&mut out);
    main.write_all(&out).await?;
    // The answer: `HelloAck`, `Proof`, `UrgentToken`.
    let mut buf = BytesMut::new();
    let mut frames = vec![];
    while frames.len() < 3 {
        if let Some(f) = codec::split_frame(&mut buf, 1 << 20)? {
            frames.push(f);
            continue;
        }
        let n = tokio::time::timeout(T, main.read_buf(&mut buf)).await.context("no answer")??;
        ensure!(n > 0, "closed during the handshake");
    }
    ensure!(frames[2].len() == 17 && frames[2][0] == 65, "no token: {:?}", &frames[2][..]);
    let mut urgent = TcpStream::connect(to.local_addr()).await?;
    let mut join = Vec::new();
    join.extend_from_slice(&25u32.to_le_bytes());
    join.push(66);
    join.extend_from_slice(&me.node_id().0.to_le_bytes());
    join.extend_from_slice(&frames[2][1..]);
    join.extend_from_slice(then);
    urgent.write_all(&join).await?;
    Ok((main, urgent))
}

/// How long until `to` closes `main` (reading and dropping whatever it sends), at most `most`.
async fn closed_within(main: &mut TcpStream, most: Duration) -> Result<Duration> {
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + most).into(), main.read(&mut buf)).await {
            Err(_) => bail!("still open after {most:?}"),
            Ok(Ok(0) | Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// An urgent connection that ends inside a frame, or before the bytes a `Wait` on the main connection names, fails
/// the link at once: its events are incomplete, and waiting would hold the link's reader until the heartbeat timeout
/// (here a minute) while the peer may answer pings all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_connection_cut_short_fails_the_link_at_once() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let b = Node::builder().registry_client(reg.clone()).heartbeat_timeout(Duration::from_secs(60)).start().await?;
    let me = kecho::Identity::from_secret([0x17; 32]);
    // 10 bytes of a frame of 100.
    let mut part = 100u32.to_le_bytes().to_vec();
    part.extend_from_slice(&[3; 10]);
    // Cut inside a frame, written with the `UrgentJoin` (the node must keep what it read past the join) or after it.
    for with_join in [true, false] {
        let (mut main, mut urgent) = hand_made_link(&b, &me, if with_join { &part } else { &[] }).await?;
        // The main connection's `Sync` (the urgent connection's bytes count from there).
        main.write_all(&[1, 0, 0, 0, 50]).await?;
        if !with_join {
            tokio::time::sleep(Duration::from_millis(100)).await;
            urgent.write_all(&part).await?;
        }
        urgent.shutdown().await?;
        let took = closed_within(&mut main, Duration::from_secs(10))
            .await
            .with_context(|| format!("urgent connection cut in a frame (written with the join: {with_join})"))?;
        eprintln!("cut in a frame (with the join: {with_join}): link closed after {took:?}");
        eventually("the link gone", || b.link_stats().iter().all(|l| !l.up)).await?;
    }
    // Ended between frames (at once), with a `Wait` for 100 of its bytes on the main connection after its `Sync`.
    let (mut main, mut urgent) = hand_made_link(&b, &me, &[]).await?;
    urgent.shutdown().await?;
    let mut frames = vec![1, 0, 0, 0, 50, 9, 0, 0, 0, 51];
    frames.extend_from_slice(&100u64.to_le_bytes());
    main.write_all(&frames).await?;
    let took = closed_within(&mut main, Duration::from_secs(10)).await.context("a Wait past the urgent end")?;
    eprintln!("a Wait past the end: link closed after {took:?}");
    Ok(())
}

/// Sends `bytes` as a connection's first bytes to `to` and expects `Close{Handshake}`.
async fn refused_raw(to: SocketAddr, bytes: &[u8]) -> Result<()> {
    let mut forged = TcpStream::connect(to).await?;
    forged.write_all(bytes).await?;
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

/// A new source's first urgent event is written directly to the main connection of a quiet link (nothing queued)
/// whose receiver is stalled by a few bulk events it cannot deliver (its Block sink is full): the event waits in the
/// sockets behind them. The link's dialler then makes the urgent connection, and the source's next urgent events go
/// there. They must wait for the first (a `Wait` for the main connection's `Sync`): before, the source's place after
/// a direct write was not recorded, so the second event went with no `Wait`, arrived ahead of the first and of its
/// `Routed` frame, was counted `stale` at the sink's node and reported to the sink as missed (as
/// `kecho-bench priority` saw, with the urgent connection read at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_first_urgent_event_was_written_directly_keeps_its_order() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    // A dials B: A's relay never learns where A is.
    let (ra, rb) = (Relay::start().await?, Relay::start().await?);
    let a = Node::builder().registry_client(reg.clone()).advertise(ra.addr).start().await?;
    let b = Node::builder().registry_client(reg.clone()).advertise(rb.addr).start().await?;
    rb.upstream.set(b.local_addr()).ok();
    let urgent_b = b.channel("urgent").await?;
    let bulk_b = b.channel("bulk").await?;
    let mut urgent_sink = urgent_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(64))?;
    let mut bulk_sink = bulk_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(1))?;
    let urgent_a = a.channel("urgent").await?;
    let bulk_a = a.channel("bulk").await?;
    urgent_a.wait_for_sinks(1, T).await?;
    bulk_a.wait_for_sinks(1, T).await?;
    // A few bulk events: B's reader waits for room at the bulk sink, the rest stay in the sockets' buffers (far
    // from full), and A's outbox is empty.
    const BULK: usize = 4;
    let mut bulk = bulk_a.source()?;
    let payload = vec![0u8; 64 << 10];
    for _ in 0..BULK {
        bulk.submit("bulk", &Attrs::new(), &payload).await?;
    }
    eventually("the bulk events written", || link_of(&a, &b).queued_bytes == 0).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let writes = link_of(&a, &b).writes;
    let mut src = urgent_a.source()?;
    src.submit_with("urgent", &Attrs::new().with("k", 0), b"first", urgent()).await?;
    // The urgent connection comes up (A dials it for this event), and the next events take it.
    apart(&a, &b).await?;
    for k in 1..4 {
        src.submit_with("urgent", &Attrs::new().with("k", k), b"next", urgent()).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(link_of(&a, &b).writes > writes);
    for _ in 0..BULK {
        assert_eq!(recv(&mut bulk_sink).await?.ty(), "bulk");
    }
    for k in 0..4 {
        let got = recv(&mut urgent_sink).await.with_context(|| format!("event {k}: at B {:?}", urgent_b.stats()))?;
        assert_eq!(attr_i(&got, "k"), k);
    }
    let sb = urgent_b.stats();
    assert_eq!((sb.stale, sb.missed), (0, 0), "at B {sb:?}");
    Ok(())
}
