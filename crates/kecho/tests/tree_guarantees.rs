//! Tree mode keeps the full mesh's guarantees (docs/SCALE.md, "Tree mode in channels"): a source that ends while a
//! sink's node is cut off from the whole channel is accounted for when the node comes back; a source's node that dies
//! unseen is reported gone; a source's history replays what a returning node missed, in order, without duplicates,
//! before newer events; deadlines are carried. Six nodes in one process with a tree threshold of 3, each reachable only
//! through a proxy on loopback that can cut the links between chosen pairs of nodes.

use std::time::Duration;

use anyhow::{bail, Result};
use kecho::{
    Attrs, Channel, EventOptions, History, MembershipConfig, Node, RecvError, RegistryClient, SinkOptions, SourceKey,
};

mod common;
use common::Proxy;

/// One scenario at a time: each runs six nodes and their proxies on the test's two worker threads.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NODES: usize = 6;
const THRESHOLD: usize = 3;
/// Generous: the nodes share the test's runtime on a loaded 2-core machine.
const T: Duration = Duration::from_secs(60);

/// A node in tree mode above `THRESHOLD` members, reachable only through its own proxy.
async fn proxied_node(reg: &RegistryClient, grace: Duration, heartbeat: Duration) -> Result<(Node, Proxy)> {
    proxied_node_with(reg, grace, heartbeat, THRESHOLD).await
}

/// `proxied_node` with a tree threshold of `threshold`.
async fn proxied_node_with(
    reg: &RegistryClient,
    grace: Duration,
    heartbeat: Duration,
    threshold: usize,
) -> Result<(Node, Proxy)> {
    let m = MembershipConfig { lease_ttl: Duration::from_millis(1500), ..MembershipConfig::default() };
    // The node advertises its proxy's address: the proxy first (towards a placeholder), then the node, then the
    // proxy pointed at the node's listener.
    let (proxy, addr) = Proxy::start("127.0.0.1:9".parse()?).await?;
    let node = Node::builder()
        .registry_client(reg.clone())
        .heartbeat_timeout(heartbeat)
        .membership(m)
        .source_grace(grace)
        .tree_threshold(threshold)
        .advertise(addr)
        .start()
        .await?;
    proxy.point_at(node.local_addr());
    Ok((node, proxy))
}

/// Six nodes on one channel in tree mode, a sink on each.
struct Net {
    nodes: Vec<(Node, Proxy)>,
    chans: Vec<Channel>,
    sinks: Vec<Option<kecho::Sink>>,
}

impl Net {
    async fn start(name: &str, grace: Duration) -> Result<Net> {
        Net::start_with(name, grace, Duration::from_millis(600)).await
    }

    /// `start` with a heartbeat timeout of `heartbeat`.
    async fn start_with(name: &str, grace: Duration, heartbeat: Duration) -> Result<Net> {
        let reg = RegistryClient::in_process_private();
        let mut net = Net { nodes: Vec::new(), chans: Vec::new(), sinks: Vec::new() };
        for i in 0..NODES {
            let (node, proxy) = proxied_node(&reg, grace, heartbeat).await?;
            let ch = if i == 0 { node.create_channel(name).await? } else { node.open_channel(name).await? };
            net.sinks.push(Some(ch.sink(SinkOptions::new().capacity(100_000))?));
            net.nodes.push((node, proxy));
            net.chans.push(ch);
        }
        let chans = net.chans.clone();
        eventually("every node to know every sink", || chans.iter().all(|c| c.sinks() == NODES)).await?;
        eventually("tree mode everywhere", || chans.iter().all(|c| c.tree_stats().on)).await?;
        Ok(net)
    }

    /// Cuts (or heals) every link of node `i`.
    fn isolate(&self, i: usize, on: bool) {
        let (x, px) = &self.nodes[i];
        for (j, (y, py)) in self.nodes.iter().enumerate() {
            if j != i {
                px.cut(y.id(), on);
                py.cut(x.id(), on);
            }
        }
    }

    /// Cuts (or heals) every link of node `i`, and makes the others' dials to it fail at once (or succeed again),
    /// so that they take it for gone.
    fn isolate_refusing(&self, i: usize, on: bool) {
        let (_, px) = &self.nodes[i];
        for (j, (y, _)) in self.nodes.iter().enumerate() {
            if j != i {
                px.refuse(y.id(), on);
            }
        }
        self.isolate(i, on);
    }

    /// Cuts node `i` off and waits until its links are down (their heartbeats timed out).
    async fn cut_off(&self, i: usize) -> Result<()> {
        self.isolate(i, true);
        let node = &self.nodes[i].0;
        eventually("the cut-off node's links down", || node.link_stats().iter().all(|l| !l.up)).await
    }

    fn sink(&mut self, i: usize) -> kecho::Sink {
        self.sinks[i].take().expect("a sink taken once")
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = tokio::time::Instant::now();
    while !f() {
        if start.elapsed() > T {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// What a sink got of one source.
#[derive(Default, Debug)]
struct Tally {
    seqs: Vec<u64>,
    missed: u64,
    expired: u64,
    lost: Vec<SourceKey>,
}

impl Tally {
    /// Receives until `done` holds of the tally, at most `T`.
    async fn until(&mut self, sink: &mut kecho::Sink, what: &str, done: impl Fn(&Tally) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + T;
        while !done(self) {
            let r = match tokio::time::timeout_at(deadline, sink.recv()).await {
                Ok(r) => r,
                Err(_) => bail!("timed out waiting for {what}: {} received, {self:?}", self.seqs.len()),
            };
            match r {
                Ok(ev) => self.seqs.push(ev.seq()),
                Err(RecvError::Lagged(n)) => self.missed += n,
                Err(RecvError::Expired(n)) => self.expired += n,
                Err(RecvError::SourceLost(k)) => self.lost.push(k),
                Err(e) => bail!("sink: {e}"),
            }
        }
        Ok(())
    }

    fn in_order(&self) -> bool {
        self.seqs.windows(2).all(|w| w[0] < w[1])
    }
}

/// Publishes `n` events, one per millisecond.
async fn publish(src: &mut kecho::Source, n: u64) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..n {
        tick.tick().await;
        src.submit("e", &Attrs::new(), b"0123456789").await?;
    }
    Ok(())
}

const SRC: usize = 1;
const CUT: usize = 5;

/// The scenario in tree mode: a node is cut off from the whole channel, the source publishes on, ends and its
/// node leaves; the cut heals only after the overlay's summaries of that source stopped (10 s after its last event).
/// The returning node learns of the end from its new neighbours and gets or is told of every event it missed; it is
/// never left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_ends_while_a_node_is_cut_off_is_accounted_for_in_tree_mode() -> Result<()> {
    back_after_the_summaries_stopped("ends", true).await
}

/// A node cut off from the whole channel while the source publishes and then goes quiet (it does not end, its node
/// stays) comes back after the overlay's summaries of the source stopped (10 s after its last event): its new
/// neighbours name the newest event they have of every event stream, so it grafts or is told of every event it
/// missed. Before, nothing named the stream to it any more, and its sink waited for them unaware for good (at 400
/// nodes: survivors of a 30 % kill whose whole active view died and whose refills took longer than 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_a_source_went_quiet_learns_what_it_missed_in_tree_mode() -> Result<()> {
    back_after_the_summaries_stopped("quiet", false).await
}

/// Node `CUT` gets 200 events, is cut off from the whole channel while the source publishes 300 more, and comes back
/// 11 s later, past the overlay's summaries of the source; meanwhile the source ends and its node leaves (`ends`) or
/// it stays, quiet. The returning sink must receive or be told of all 500, in order, none of it "unknown"; a sink
/// that stayed connected misses nothing.
async fn back_after_the_summaries_stopped(name: &str, ends: bool) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut net = Net::start(name, T * 3).await?;
    let mut back = net.sink(CUT);
    let mut keep = net.sink(0);
    let mut src = net.chans[SRC].source()?;
    publish(&mut src, 200).await?;
    let mut t = Tally::default();
    t.until(&mut back, "the first 200 events", |t| t.seqs.len() == 200).await?;
    net.isolate(CUT, true);
    net.cut_off(CUT).await?;
    publish(&mut src, 300).await?;
    let src = if ends {
        drop(src);
        None
    } else {
        Some(src)
    };
    let mut k = Tally::default();
    k.until(&mut keep, "all 500 events at a connected sink", |t| t.seqs.len() == 500).await?;
    if ends {
        net.nodes[SRC].0.shutdown().await;
    }
    // Past the overlay's summaries of the source (10 s after its last event): only word of its end, or of the
    // newest event of its stream, can tell.
    tokio::time::sleep(Duration::from_secs(11)).await;
    net.isolate(CUT, false);
    t.until(&mut back, "500 events accounted for", |t| t.seqs.len() as u64 + t.missed >= 500).await?;
    assert!(t.in_order(), "in order, nothing twice: {t:?}");
    assert_eq!(t.seqs.len() as u64 + t.missed, 500, "received + missed = published: {t:?}");
    assert!(t.lost.is_empty(), "the loss is known, not unknown: {t:?}");
    assert_eq!((k.missed, k.lost.len()), (0, 0), "the connected sink missed nothing: {k:?}");
    eprintln!("the returning sink received {} and was told of {} missed", t.seqs.len(), t.missed);
    drop(src);
    Ok(())
}

/// A source's node that dies (no end) is reported gone, with an unknown number missed, to every sink once the grace
/// period is over, in tree mode as in full-mesh mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_node_dies_is_reported_gone_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut net = Net::start("gone", Duration::from_millis(500)).await?;
    let mut sinks: Vec<(usize, kecho::Sink)> = (0..NODES).filter(|i| *i != SRC).map(|i| (i, net.sink(i))).collect();
    let mut src = net.chans[SRC].source()?;
    publish(&mut src, 100).await?;
    let mut tallies: Vec<Tally> = sinks.iter().map(|_| Tally::default()).collect();
    for ((_, s), t) in sinks.iter_mut().zip(&mut tallies) {
        t.until(s, "the 100 events", |t| t.seqs.len() == 100).await?;
    }
    net.nodes[SRC].0.kill();
    drop(src);
    for ((i, s), t) in sinks.iter_mut().zip(&mut tallies) {
        t.until(s, &format!("sink {i} told the source is gone"), |t| !t.lost.is_empty()).await?;
        assert_eq!(t.lost.len(), 1, "told once: {t:?}");
        assert_eq!(t.missed, 0, "{t:?}");
    }
    Ok(())
}

/// One cut of node `CUT` while the source (with `history`) publishes `during` events as fast as it can, after 200;
/// then the cut heals and the source publishes 100 more. Returns what the returning sink got.
async fn cut_and_heal(name: &str, history: History, during: u64) -> Result<Tally> {
    let mut net = Net::start(name, T * 3).await?;
    let mut back = net.sink(CUT);
    let mut keep = net.sink(0);
    let mut src = net.chans[SRC].source()?;
    src.set_history(history);
    publish(&mut src, 200).await?;
    let mut t = Tally::default();
    t.until(&mut back, "the first 200 events", |t| t.seqs.len() == 200).await?;
    net.isolate(CUT, true);
    net.cut_off(CUT).await?;
    let ch = net.chans[SRC].clone();
    for i in 0..during {
        src.submit("e", &Attrs::new(), b"0123456789").await?;
        if i % 50 == 49 {
            // 50 events a millisecond at most: a burst, within what the links' queues hold.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    net.isolate(CUT, false);
    let back_node = net.chans[CUT].clone();
    eventually("the returning node back in the channel", || back_node.sinks() == NODES && ch.sinks() == NODES).await?;
    publish(&mut src, 100).await?;
    let total = 300 + during;
    t.until(&mut back, "every event received or reported", |t| t.seqs.len() as u64 + t.missed >= total).await?;
    let mut k = Tally::default();
    k.until(&mut keep, "every event at a connected sink", |t| t.seqs.len() as u64 + t.missed >= total).await?;
    assert!(k.in_order() && k.lost.is_empty(), "the connected sink: {k:?}");
    assert_eq!(k.seqs.len() as u64 + k.missed, total, "the connected sink: {k:?}");
    assert!(t.in_order(), "in order, without duplicates: {t:?}");
    assert_eq!(t.seqs.len() as u64 + t.missed, total, "received + missed = published: {t:?}");
    drop(src);
    Ok(t)
}

/// More events than the overlay's caches hold are published while a node is cut off: with a history at least that
/// long, the source's node replays all of them to it (its neighbours could not), in order, once, before the newer ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_gets_what_it_missed_from_the_source_history_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = cut_and_heal("history", History::events(20_000), 6_000).await?;
    assert_eq!(t.missed, 0, "nothing missed: {t:?}");
    assert_eq!(t.seqs, (1..=6_300).collect::<Vec<u64>>(), "every event, in order, once");
    Ok(())
}

/// The same without a history: what the neighbours' caches no longer hold is reported missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_history_a_returning_node_is_told_what_it_missed_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = cut_and_heal("no-history", History::off(), 6_000).await?;
    assert!(t.missed > 0, "beyond the caches: {t:?}");
    Ok(())
}

/// Deadlines travel the tree: an event whose deadline passed before it was sent reaches every sink as expired, in its
/// place among the source's events; others keep their deadline and arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_priorities_travel_the_tree() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut net = Net::start("timely", T * 3).await?;
    let mut sinks: Vec<kecho::Sink> = (0..NODES).filter(|i| *i != SRC).map(|i| net.sink(i)).collect();
    let mut src = net.chans[SRC].source()?;
    let urgent = EventOptions::new().priority(kecho::Priority::new(3)?).deadline(Duration::from_secs(30));
    src.submit_with("e", &Attrs::new(), b"urgent", urgent).await?;
    src.submit_with("e", &Attrs::new(), b"late", EventOptions::new().deadline(Duration::ZERO)).await?;
    src.submit("e", &Attrs::new(), b"plain").await?;
    for s in &mut sinks {
        let ev = tokio::time::timeout(T, s.recv()).await??;
        assert_eq!((ev.seq(), &ev.payload()[..]), (1, &b"urgent"[..]));
        assert!(ev.deadline().is_some(), "the deadline came with it");
        match tokio::time::timeout(T, s.recv()).await? {
            Err(RecvError::Expired(1)) => {}
            other => bail!("expected the second event expired, got {other:?}"),
        }
        let ev = tokio::time::timeout(T, s.recv()).await??;
        assert_eq!(ev.seq(), 3);
    }
    let expired: u64 = net.chans.iter().map(|c| c.stats().expired).sum();
    assert!(expired >= NODES as u64 - 1, "counted: {expired}");
    Ok(())
}

/// A Block sink in tree mode gets its events directly from the source, which it slows down as in full-mesh mode: a
/// sink that reads slowly behind a small queue misses nothing, while the other sinks get every event once, through
/// the overlay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_sink_slows_the_source_and_misses_nothing_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    const N: u64 = 2_000;
    // A heartbeat timeout that a loaded machine's scheduling cannot reach while a reader waits for the Block sink.
    let mut net = Net::start_with("block", T * 3, Duration::from_secs(3)).await?;
    let mut sinks: Vec<kecho::Sink> = (0..NODES).filter(|i| *i != SRC).map(|i| net.sink(i)).collect();
    let slow = net.chans[4].sink(SinkOptions::new().capacity(8).overflow(kecho::Overflow::Block))?;
    let ch = net.chans[SRC].clone();
    eventually("the source's node knows the Block sink", || ch.sinks() == NODES + 1).await?;
    let reader = tokio::spawn(async move {
        let mut slow = slow;
        let mut t = Tally::default();
        let deadline = tokio::time::Instant::now() + T * 2;
        while (t.seqs.len() as u64) + t.missed < N {
            match tokio::time::timeout_at(deadline, slow.recv()).await {
                Err(_) => bail!("timed out: {} received, {} missed", t.seqs.len(), t.missed),
                Ok(Ok(ev)) => t.seqs.push(ev.seq()),
                Ok(Err(RecvError::Lagged(n))) => t.missed += n,
                Ok(Err(e)) => bail!("slow sink: {e}"),
            }
            if t.seqs.len() < 300 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        anyhow::Ok(t)
    });
    let mut src = ch.source()?;
    let started = tokio::time::Instant::now();
    for i in 0..N {
        if tokio::time::timeout(Duration::from_secs(20), src.submit("e", &Attrs::new(), &[5u8; 1024])).await.is_err() {
            bail!(
                "submit {i} stuck: {:?} / {:?} / {:?}",
                ch.stats(),
                net.chans[4].stats(),
                net.nodes[SRC].0.link_stats()
            );
        }
    }
    let took = started.elapsed();
    let t = match tokio::time::timeout(T, reader).await {
        Ok(r) => r??,
        Err(_) => bail!(
            "the Block sink stalled: src {:?} {:?}\nits node {:?} {:?} sinks {}",
            net.nodes[SRC].0.id(),
            net.nodes[SRC].0.link_stats(),
            net.nodes[4].0.id(),
            net.nodes[4].0.link_stats(),
            ch.sinks()
        ),
    };
    assert_eq!(
        t.missed,
        0,
        "the Block sink missed nothing: {} received; {:?} / {:?} / {:?}",
        t.seqs.len(),
        ch.stats(),
        net.chans[4].stats(),
        net.nodes[SRC].0.link_stats()
    );
    assert_eq!(t.seqs, (1..=N).collect::<Vec<u64>>(), "every event, in order, once");
    for (i, s) in sinks.iter_mut().enumerate() {
        let mut k = Tally::default();
        k.until(s, &format!("sink {i}: every event"), |t| t.seqs.len() as u64 + t.missed >= N).await?;
        let stats: Vec<_> = net.chans.iter().map(|c| (c.tree_stats(), c.stats())).collect();
        assert_eq!((k.missed, k.seqs.len() as u64), (0, N), "sink {i}: {stats:#?}");
        assert!(k.in_order(), "sink {i}: in order, once");
    }
    assert!(net.chans[4].stats().dropped == 0, "nothing dropped at the Block sink's node");
    eprintln!("{N} events submitted in {:.2} s behind a slow Block sink", took.as_secs_f64());
    Ok(())
}

/// A node in tree mode from its channel's second member, not behind a proxy, with the default heartbeat timeout (3 s).
async fn plain_node(reg: &RegistryClient) -> Result<Node> {
    Ok(Node::builder().registry_client(reg.clone()).listen("127.0.0.1:0".parse()?).tree_threshold(1).start().await?)
}

/// How long the source of `contact_killed` goes on after the contact's node died: less than a member waits (two
/// heartbeat timeouts, at most 4 s) before it takes a neighbour whose link failed for gone.
const AFTER_KILL: Duration = Duration::from_millis(2500);

/// The node that created a two-member channel in tree mode (its contact, with a sink of `overflow`) dies; the other
/// member's source publishes on for `AFTER_KILL`. A node that opens the channel after the death joins it through
/// the member that took the contact's role over, switches to tree mode and receives the source's events up to its
/// last, in order, with any gap reported (durability.rs's durable sink killed and restarted, in one process).
async fn contact_killed(name: &str, overflow: kecho::Overflow) -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = plain_node(&reg).await?;
    let ca = a.create_channel(name).await?;
    let _gone = ca.sink(SinkOptions::new().overflow(overflow))?;
    let b = plain_node(&reg).await?;
    let cb = b.open_channel(name).await?;
    eventually("tree mode on both members", || ca.tree_stats().on && cb.tree_stats().on).await?;
    eventually("the source's node knows the sink", || cb.sinks() == 1).await?;
    let mut src = cb.source()?;
    publish(&mut src, 200).await?;
    a.kill();
    let killed = tokio::time::Instant::now();
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut n = 200;
        while killed.elapsed() < AFTER_KILL {
            tick.tick().await;
            src.submit("e", &Attrs::new(), b"0123456789").await?;
            n += 1;
        }
        anyhow::Ok(n)
    });
    let d = plain_node(&reg).await?;
    let cd = tokio::time::timeout(T, d.open_channel(name)).await??;
    let joined = killed.elapsed();
    let mut sink = cd.sink(SinkOptions::new().overflow(overflow).capacity(100_000))?;
    let last = publisher.await??;
    let mut t = Tally::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while t.seqs.last() != Some(&last) {
        match tokio::time::timeout_at(deadline, sink.recv()).await {
            Ok(Ok(ev)) => t.seqs.push(ev.seq()),
            Ok(Err(RecvError::Lagged(n))) => t.missed += n,
            Ok(Err(e)) => bail!("the new sink: {e}"),
            Err(_) => bail!(
                "the new node (in the channel {joined:?} after the kill, tree mode {}) never got event {last}: \
                 {} received, {} missed",
                cd.tree_stats().on,
                t.seqs.len(),
                t.missed
            ),
        }
    }
    assert!(cd.tree_stats().on, "the new node runs the channel in tree mode");
    assert!(t.in_order(), "in order, nothing twice: {t:?}");
    let first = t.seqs[0];
    assert_eq!(t.seqs.len() as u64 + t.missed, last - first + 1, "received + missed from its first: {t:?}");
    eprintln!(
        "{name}: the new node joined {joined:?} after the contact's death and received {} events ({first} to {last}), \
         {} missed",
        t.seqs.len(),
        t.missed
    );
    Ok(())
}

/// The contact's node dies while another member's source publishes: a node that joins next gets in and gets the
/// events, whether the dead node's sink was a Block sink (the source dials its node again and again for its events)
/// or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_after_the_contact_died_gets_tree_mode_and_the_events() -> Result<()> {
    let _serial = SERIAL.lock().await;
    contact_killed("contact-block", kecho::Overflow::Block).await?;
    contact_killed("contact-drop", kecho::Overflow::DropOldest).await
}

/// Tree mode, six nodes: a Block sink on node `CUT` (served directly by the source, not through the overlay) that
/// received the first 200 events of a source on node `SRC` (with `history`).
struct BlockSink {
    net: Net,
    block: kecho::Sink,
    ch: Channel,
    src: kecho::Source,
    t: Tally,
}

impl BlockSink {
    async fn start(name: &str, history: History) -> Result<BlockSink> {
        let net = Net::start(name, T * 3).await?;
        let mut block = net.chans[CUT].sink(SinkOptions::new().capacity(100_000).overflow(kecho::Overflow::Block))?;
        let ch = net.chans[SRC].clone();
        eventually("the source's node knows the Block sink", || ch.sinks() == NODES + 1).await?;
        let mut src = ch.source()?;
        src.set_history(history);
        publish(&mut src, 200).await?;
        let mut t = Tally::default();
        t.until(&mut block, "the first 200 events", |t| t.seqs.len() == 200).await?;
        Ok(BlockSink { net, block, ch, src, t })
    }
}

/// Cuts node `CUT` off until the source's node (channel `ch`) takes it for gone (by its neighbours, not by a link of
/// its own), publishes `n` events on `src` meanwhile, and heals the cut.
async fn taken_for_gone_while_publishing(net: &Net, ch: &Channel, src: &mut kecho::Source, n: u64) -> Result<()> {
    net.isolate_refusing(CUT, true);
    net.cut_off(CUT).await?;
    eventually("the cut-off node's sinks out of the source's view", || ch.sinks() == NODES - 1).await?;
    publish(src, n).await?;
    net.isolate_refusing(CUT, false);
    Ok(())
}

/// A Block sink (served directly by the source, not through the overlay) on a node that is cut off until the source's
/// node takes it for gone (its view changes without a goodbye of the node's own): the events the source publishes
/// meanwhile are counted for the sink and reported to it when its node comes back; none is silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_sink_of_a_node_taken_for_gone_is_told_what_it_missed_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let BlockSink { net, mut block, ch, mut src, mut t } = BlockSink::start("ghost", History::off()).await?;
    taken_for_gone_while_publishing(&net, &ch, &mut src, 300).await?;
    eventually("the node back in the source's view", || ch.sinks() == NODES + 1).await?;
    // What the sink missed is reported on a link that is up, at the source's next event: the source's node dials the
    // returning node itself (the overlay need not link the two).
    let (sn, cid) = (&net.nodes[SRC].0, net.nodes[CUT].0.id());
    eventually("a link from the source's node to the sink's", || sn.link_stats().iter().any(|l| l.node == cid && l.up))
        .await?;
    publish(&mut src, 100).await?;
    t.until(&mut block, "600 events accounted for", |t| t.seqs.len() as u64 + t.missed >= 600).await?;
    assert!(t.in_order(), "in order, nothing twice: {t:?}");
    assert_eq!(t.seqs.len() as u64 + t.missed, 600, "received + missed = published: {t:?}");
    eprintln!("the Block sink received {} and was told of {} missed", t.seqs.len(), t.missed);
    Ok(())
}

/// Tree mode: only the links between the source's node and a Block sink's node are cut (dials between them fail at
/// once), while both reach the other members, so that the source's node may take the sink's node for gone and have
/// it back in its view through the overlay (the node hears it was taken for gone and publishes itself again) with no
/// link to it. After the cut heals, the source's node must dial it itself (the overlay need not link the two): every
/// event is then received or reported, in order, and the events published after the heal are received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_sink_cut_off_from_the_source_alone_gets_the_events_after_the_cut_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let BlockSink { net, mut block, ch, mut src, mut t } = BlockSink::start("ghost-alone", History::off()).await?;
    let ((s, ps), (c, pc)) = (&net.nodes[SRC], &net.nodes[CUT]);
    let cut = |on: bool| {
        pc.refuse(s.id(), on);
        ps.refuse(c.id(), on);
        pc.cut(s.id(), on);
        ps.cut(c.id(), on);
    };
    cut(true);
    let cid = c.id();
    eventually("no link from the source's node to the sink's", || {
        !s.link_stats().iter().any(|l| l.node == cid && l.up)
    })
    .await?;
    for _ in 0..6 {
        publish(&mut src, 50).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cut(false);
    eventually("the node in the source's view", || ch.sinks() == NODES + 1).await?;
    publish(&mut src, 100).await?;
    t.until(&mut block, "600 events accounted for", |t| t.seqs.len() as u64 + t.missed >= 600).await?;
    t.until(&mut block, "the last event", |t| t.seqs.last() == Some(&600)).await?;
    assert!(t.in_order(), "in order, nothing twice: {t:?}");
    assert_eq!(t.seqs.len() as u64 + t.missed, 600, "received + missed = published: {t:?}");
    eprintln!(
        "cut from the source alone: the Block sink received {} and was told of {} missed",
        t.seqs.len(),
        t.missed
    );
    Ok(())
}

/// Full mesh: the link between a source's node and a sink's node is cut (both still reach the channel's contact) for
/// a few seconds, long enough for the source's node to lose the node, take it back from the contact's view and lose it
/// again; every event the source publishes meanwhile is received or reported missed once the cut heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_cut_off_from_the_source_alone_is_told_what_it_missed_in_full_mesh() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = cut_between_source_and_sink("mesh", History::default()).await?;
    // The 800 published during the cut (any of the 100 after it lost in transit would be reported too).
    assert!(t.missed >= 800, "the events of the cut reported missed: {t:?}");
    Ok(())
}

/// The same with a history on the source: the events of the cut are replayed, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_cut_off_from_the_source_alone_gets_what_it_missed_from_the_history_in_full_mesh() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = cut_between_source_and_sink("mesh-history", History::events(10_000)).await?;
    assert_eq!(t.missed, 0, "nothing missed: {t:?}");
    assert_eq!(t.seqs, (1..=1_100).collect::<Vec<u64>>(), "every event, in order, once");
    Ok(())
}

/// Full mesh, three nodes: the link between the source's node and the sink's node is cut for 4 s while the source
/// (with `history`) publishes 800 events; returns what the sink got of the 1,100 published in all.
async fn cut_between_source_and_sink(name: &str, history: History) -> Result<Tally> {
    let reg = RegistryClient::in_process_private();
    let mut nodes = Vec::new();
    let mut chans = Vec::new();
    for i in 0..3 {
        let (node, proxy) = proxied_node_with(&reg, T * 3, Duration::from_millis(600), 64).await?;
        let ch = if i == 0 { node.create_channel(name).await? } else { node.open_channel(name).await? };
        nodes.push((node, proxy));
        chans.push(ch);
    }
    let (p, s) = (1, 2);
    let mut sink = chans[s].sink(SinkOptions::new().capacity(100_000))?;
    let ch = chans[p].clone();
    eventually("the source's node knows the sink", || ch.sinks() == 1).await?;
    assert!(!ch.tree_stats().on, "a full mesh");
    let mut src = ch.source()?;
    src.set_history(history);
    publish(&mut src, 200).await?;
    let mut t = Tally::default();
    t.until(&mut sink, "the first 200 events", |t| t.seqs.len() == 200).await?;
    let cut = |on: bool| {
        nodes[p].1.cut(nodes[s].0.id(), on);
        nodes[s].1.cut(nodes[p].0.id(), on);
    };
    cut(true);
    for _ in 0..8 {
        publish(&mut src, 100).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cut(false);
    let sid = nodes[s].0.id();
    let pn = &nodes[p].0;
    eventually("the link between the two up again", || pn.link_stats().iter().any(|l| l.node == sid && l.up)).await?;
    eventually("the sink back in the source's view", || ch.sinks() == 1).await?;
    publish(&mut src, 100).await?;
    t.until(&mut sink, "1,100 events accounted for", |t| t.seqs.len() as u64 + t.missed >= 1_100).await?;
    assert!(t.in_order(), "in order, nothing twice: {t:?}");
    assert_eq!(t.seqs.len() as u64 + t.missed, 1_100, "received + missed = published: {t:?}");
    eprintln!("{name}: the sink received {} and was told of {} missed", t.seqs.len(), t.missed);
    Ok(t)
}

/// Tree mode: a Block sink's node (its events come directly from the source) is cut off until the source's node takes
/// it for gone; the source publishes 300 events, the cut heals and the source, still open, submits nothing. Returns
/// what the Block sink got once every event was received or reported.
async fn block_sink_back_to_a_quiet_source(name: &str, history: History) -> Result<Tally> {
    let BlockSink { net, mut block, ch, mut src, mut t } = BlockSink::start(name, history).await?;
    taken_for_gone_while_publishing(&net, &ch, &mut src, 300).await?;
    // No event after the heal.
    t.until(&mut block, "500 events accounted for with the source quiet", |t| t.seqs.len() as u64 + t.missed >= 500)
        .await?;
    assert!(t.in_order(), "in order, nothing twice: {t:?}");
    assert_eq!(t.seqs.len() as u64 + t.missed, 500, "received + missed = published: {t:?}");
    publish(&mut src, 10).await?;
    t.until(&mut block, "the events after the report", |t| t.seqs.last() == Some(&510)).await?;
    assert!(t.in_order(), "in order, nothing twice: {t:?}");
    assert_eq!(t.seqs.len() as u64 + t.missed, 510, "received + missed = published: {t:?}");
    eprintln!("{name}: the Block sink received {} and was told of {} missed", t.seqs.len(), t.missed);
    Ok(t)
}

/// A source that goes quiet once a Block sink's node is back (tree mode): the sink is told what it missed without a
/// further event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_source_tells_a_returning_block_sink_what_it_missed_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = block_sink_back_to_a_quiet_source("quiet-block", History::off()).await?;
    assert_eq!(t.missed, 300, "the events of the cut reported: {t:?}");
    Ok(())
}

/// The same with a history: the events of the cut are replayed without a further event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_source_replays_to_a_returning_block_sink_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = block_sink_back_to_a_quiet_source("quiet-block-history", History::events(10_000)).await?;
    assert_eq!(t.missed, 0, "nothing missed: {t:?}");
    assert_eq!(t.seqs, (1..=510).collect::<Vec<u64>>(), "every event, in order, once");
    Ok(())
}
