//! Loss accounting: events a sink missed because its node was cut off, or because a link broke with events on the
//! way, are reported to it as gaps (`RecvError::Lagged`), never skipped silently. Nodes reach each other through
//! proxies on loopback that the test can cut (bytes are swallowed, as on a dead network path) and heal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, MembershipConfig, Node, RecvError, RegistryClient, SinkOptions, SourceKey, TryRecvError};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(20);

/// A TCP relay in front of a node's listener. While cut, it swallows whatever arrives in either direction (nothing
/// is closed, so only heartbeats can notice); healing kills the connections that lived through the cut, as a real
/// path outage would have, so that nodes dial afresh.
struct Proxy {
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn bind() -> Result<(TcpListener, SocketAddr)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let a = l.local_addr()?;
        Ok((l, a))
    }

    fn start(listener: TcpListener, upstream: SocketAddr) -> Proxy {
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, k) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let cut = c.clone();
                let task = tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else { return };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    // Ends when either side closes (the other direction is then cut short too), or when aborted.
                    tokio::select! { _ = relay(dr, uw, cut.clone()) => {}, _ = relay(ur, dw, cut) => {} }
                });
                k.lock().push(task);
            }
        });
        Proxy { cut, conns, accept }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    fn heal(&self) {
        for t in self.conns.lock().drain(..) {
            t.abort();
        }
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.conns.lock().drain(..) {
            t.abort();
        }
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A node reachable only through its own proxy.
async fn proxied_node(reg: &RegistryClient) -> Result<(Node, Proxy)> {
    let (listener, addr) = Proxy::bind().await?;
    let m = MembershipConfig { lease_ttl: Duration::from_millis(1500), ..MembershipConfig::default() };
    let node = Node::builder()
        .registry_client(reg.clone())
        .heartbeat_timeout(Duration::from_millis(600))
        .membership(m)
        .advertise(addr)
        .start()
        .await?;
    let proxy = Proxy::start(listener, node.local_addr());
    Ok((node, proxy))
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = tokio::time::Instant::now();
    while !f() {
        if start.elapsed() > T {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// What a sink got: per source, the sequence numbers received and the events reported missed.
#[derive(Default, Debug)]
struct Tally {
    seqs: Vec<u64>,
    missed: u64,
    sources: Vec<SourceKey>,
}

fn drain(sink: &mut kecho::Sink, tally: &mut Tally) -> Result<()> {
    loop {
        match sink.try_recv() {
            Ok(ev) => {
                if !tally.sources.contains(&ev.source()) {
                    tally.sources.push(ev.source());
                }
                tally.seqs.push(ev.seq());
            }
            Err(TryRecvError::Lagged(n)) => tally.missed += n,
            Err(TryRecvError::Empty) => return Ok(()),
            Err(e) => bail!("sink: {e}"),
        }
    }
}

/// One source publishes 1 event per millisecond while the link between its node and the sink's node is cut for a
/// while (long enough for both sides to drop each other) and then healed. Every event is either received, in order,
/// or counted in a gap the sink was told about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_missed_while_cut_off_are_reported_as_gaps() -> Result<()> {
    missed_while_cut_off(1).await
}

/// The same with batches of 20 events every 20 ms (`submit_many`, compact `EventRun` frames that the receiving node
/// delivers straight into the sink's queue): a run cut short by the link breaking is reported as a gap, and what the
/// sink's node missed while it was cut off is reported once it is back, though the source sends only batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_missed_while_cut_off_are_reported_as_gaps() -> Result<()> {
    missed_while_cut_off(20).await
}

/// One source publishes `per_tick` events every `per_tick` milliseconds (one at a time, or as one batch), the link
/// between its node and the sink's node cut for a while and then healed; see the tests above.
async fn missed_while_cut_off(per_tick: u64) -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, pa) = proxied_node(&reg).await?;
    let (b, pb) = proxied_node(&reg).await?;
    let ca = a.create_channel("loss").await?;
    let cb = b.open_channel("loss").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(100_000))?;
    ca.wait_for_sinks(1, T).await?;

    const TOTAL: u64 = 4000;
    let published = Arc::new(AtomicU64::new(0));
    let p = published.clone();
    let mut src = ca.source()?;
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(per_tick));
        let batch = vec![b"0123456789"; per_tick as usize];
        for _ in 0..TOTAL / per_tick {
            tick.tick().await;
            if per_tick == 1 {
                src.submit("e", &Attrs::new(), b"0123456789").await?;
            } else {
                src.submit_many("e", &Attrs::new(), &batch).await?;
            }
            p.fetch_add(per_tick, Ordering::SeqCst);
        }
        anyhow::Ok(src)
    });

    let mut tally = Tally::default();
    eventually("300 events published", || published.load(Ordering::SeqCst) >= 300).await?;
    pa.cut();
    pb.cut();
    eventually("the sink's node dropped", || ca.sinks() == 0).await?;
    let missed_from = published.load(Ordering::SeqCst);
    eventually("100 events published during the cut", || published.load(Ordering::SeqCst) > missed_from + 100).await?;
    pa.heal();
    pb.heal();
    eventually("the sink's node back", || ca.sinks() == 1).await?;
    drain(&mut sink, &mut tally)?;
    let _src = tokio::time::timeout(T, publisher).await.context("publisher")???;

    // Everything after the heal arrives: wait for the last event (sequence numbers start at 1).
    let last = TOTAL;
    let deadline = tokio::time::Instant::now() + T;
    while tally.seqs.last() != Some(&last) {
        if tokio::time::Instant::now() > deadline {
            bail!("the last event never came: {} received, {} missed", tally.seqs.len(), tally.missed);
        }
        match tokio::time::timeout(Duration::from_millis(200), sink.recv()).await {
            Ok(Ok(ev)) => {
                if !tally.sources.contains(&ev.source()) {
                    tally.sources.push(ev.source());
                }
                tally.seqs.push(ev.seq());
            }
            Ok(Err(RecvError::Lagged(n))) => tally.missed += n,
            Ok(Err(e)) => bail!("sink: {e}"),
            Err(_) => {}
        }
    }
    drain(&mut sink, &mut tally)?;

    assert_eq!(tally.sources.len(), 1, "one source, one key");
    assert!(tally.seqs.windows(2).all(|w| w[0] < w[1]), "per-source order");
    let received = tally.seqs.len() as u64;
    assert!(tally.missed > 0, "the cut cost events: {tally:?}");
    assert!(received > TOTAL / 2, "most events arrived: {received}");
    assert_eq!(
        received + tally.missed,
        TOTAL,
        "every event received or reported missed ({received} + {})",
        tally.missed
    );
    assert_eq!(cb.stats().missed, tally.missed, "the channel counts what its sinks were told");
    drop((pa, pb));
    Ok(())
}

/// A shutdown that cannot drain a link (the other node's Block sink is full and unread, so its reader stops and the
/// connection stalls) says what it abandoned: the link, still up, and the events still queued for it. One that can
/// drain says nothing was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_reports_the_events_it_could_not_send() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).start().await?;
    let b = Node::builder().registry_client(reg.clone()).start().await?;
    let ca = a.channel("stall").await?;
    let cb = b.channel("stall").await?;
    let _sink = cb.sink(SinkOptions::new().capacity(4).overflow(kecho::Overflow::Block))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    let payload = vec![5u8; 4096];
    // Until the link's queue is full: the sink is never read, so nothing more leaves this node.
    let mut queued = 0u64;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match src.try_submit("bulk", &Attrs::new(), &payload) {
            Ok(_) => queued += 1,
            Err(kecho::Error::WouldBlock) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if src.try_submit("bulk", &Attrs::new(), &payload).is_err() {
                    break;
                }
                queued += 1;
            }
            Err(e) => bail!("submit: {e}"),
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the link never filled after {queued} events");
        }
    }
    drop(src);
    let started = std::time::Instant::now();
    let report = a.shutdown_within(Duration::from_millis(500)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the shutdown took {took:?} with a limit of 500 ms");
    assert!(!report.is_clean(), "a stalled link was reported drained: {report:?}");
    let u = report.undrained.iter().find(|u| u.node == b.id()).context("no report for the stalled link")?;
    eprintln!("{queued} events submitted; after {took:?}: {u:?}");
    assert!(u.up, "{u:?}");
    assert!(u.events > 0 && u.events <= queued, "{} of {queued} events reported abandoned", u.events);
    assert!(u.frames >= u.events && u.bytes as u64 >= u.events * 4096, "{u:?}");
    assert_eq!(report.events_abandoned(), u.events);
    b.kill();

    // A link that drains: nothing abandoned.
    let c = Node::builder().registry_client(reg.clone()).start().await?;
    let d = Node::builder().registry_client(reg).start().await?;
    let cc = c.channel("drains").await?;
    let cd = d.channel("drains").await?;
    let mut sink = cd.sink(SinkOptions::new().capacity(1 << 16))?;
    cc.wait_for_sinks(1, T).await?;
    let mut src = cc.source()?;
    for _ in 0..1000 {
        src.submit("e", &Attrs::new(), &payload).await?;
    }
    drop(src);
    let report = c.shutdown_within(Duration::from_secs(10)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.events_abandoned(), 0);
    let mut got = 0;
    while got < 1000 {
        tokio::time::timeout(T, sink.recv()).await?.map_err(|e| anyhow::anyhow!("recv: {e}"))?;
        got += 1;
    }
    d.shutdown().await;
    Ok(())
}
