//! Tree mode (docs/SCALE.md): 40 nodes in one process, real TCP links on loopback, a tree threshold of 8. Every
//! sink gets every event in per-source order, each node keeps at most 8 links, each event reaches each node about
//! once, and when a node that forwarded events is killed, the sinks behind it get what they missed by graft or are
//! told of it, and every member drops the killed node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use kecho::{Attrs, Channel, Node, RecvError, RegistryClient, SinkOptions};
use parking_lot::Mutex;

mod common;

const NODES: usize = 40;
const THRESHOLD: usize = 8;
/// Generous: 40 nodes share the test's runtime on a loaded 2-core machine.
const T: Duration = Duration::from_secs(90);

async fn node_on(reg: &RegistryClient) -> Result<Node> {
    common::tree_node(reg, THRESHOLD).await
}

/// What one sink received: per source (each publishes its own type), the sequence numbers in arrival order, and the
/// events reported missed.
#[derive(Default)]
struct Log {
    seqs: HashMap<String, Vec<u64>>,
    lagged: u64,
    other: Vec<String>,
}

impl Log {
    fn count(&self, key: &str) -> usize {
        self.seqs.get(key).map_or(0, Vec::len)
    }
}

/// Waits until `f` holds, polling every 50 ms, at most `T`.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = tokio::time::Instant::now();
    while !f() {
        if start.elapsed() > T {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}

fn up_links(n: &Node) -> usize {
    n.link_stats().iter().filter(|l| l.up).count()
}

/// The most links up at the channel's contact while the survivors of a mass failure repair the overlay: its
/// neighbours (at most 6), and a few others' talk answered lately (6 to 12 seen; 17 in every run before the links
/// kept for others' talk were bounded).
const CONTACT_MOST: usize = 14;

/// One test at a time: each runs its tens of nodes on the test's two worker threads.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_nodes_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let reg = RegistryClient::in_process_private();
    let (nodes, chans, logs) = members(&reg, "big", NODES).await?;
    let joined = eventually("every node to know every sink", || chans.iter().all(|c| c.sinks() == NODES)).await?;
    eprintln!("every node knows the {NODES} sinks {:.1} s after the last join", joined.as_secs_f64());
    for (i, c) in chans.iter().enumerate() {
        assert!(c.tree_stats().on, "node {i} runs the channel in tree mode");
    }
    // Every node lists every sink with its node and attributes, although the table its sources read holds only its
    // own (the others', none of them Block, get events through the overlay).
    let mut all: Vec<String> = nodes.iter().map(|n| n.id().to_string()).collect();
    all.sort();
    for (i, c) in chans.iter().enumerate() {
        let mut listed: Vec<String> = c.sink_attrs().into_iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(listed, all, "node {i}: one sink per node, each listed once");
    }
    let settled =
        eventually(&format!("at most {THRESHOLD} links per node"), || nodes.iter().all(|n| up_links(n) <= THRESHOLD))
            .await?;
    let links: Vec<usize> = nodes.iter().map(up_links).collect();
    eprintln!(
        "links per node {:.1} s later: max {}, mean {:.1}",
        settled.as_secs_f64(),
        links.iter().max().unwrap_or(&0),
        links.iter().sum::<usize>() as f64 / NODES as f64
    );

    // Two sources; their first events shape their trees (duplicates prune links), then the steady state counts.
    let (a, b) = (5, 23);
    let mut src_a = chans[a].source()?;
    let mut src_b = chans[b].source()?;
    let (key_a, key_b) = ("a", "b");
    const WARM: u64 = 20;
    const STEADY: u64 = 200;
    for _ in 0..WARM {
        src_a.submit(key_a, &Attrs::new(), b"warm").await?;
        src_b.submit(key_b, &Attrs::new(), b"warm").await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the warm-up events at every sink", || {
        logs.iter().all(|l| {
            let l = l.lock();
            l.count(key_a) as u64 == WARM && l.count(key_b) as u64 == WARM
        })
    })
    .await?;
    let before: Vec<_> = chans.iter().map(Channel::tree_stats).collect();
    for _ in 0..STEADY {
        src_a.submit(key_a, &Attrs::new(), &[7u8; 100]).await?;
        src_b.submit(key_b, &Attrs::new(), &[8u8; 100]).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = WARM + STEADY;
    eventually("every event at every sink", || {
        logs.iter().all(|l| {
            let l = l.lock();
            l.count(key_a) as u64 == total && l.count(key_b) as u64 == total
        })
    })
    .await?;
    for (i, l) in logs.iter().enumerate() {
        let l = l.lock();
        let want: Vec<u64> = (1..=total).collect();
        assert_eq!(l.seqs[key_a], want, "sink {i}: source a's events, in order");
        assert_eq!(l.seqs[key_b], want, "sink {i}: source b's events, in order");
        assert_eq!(l.lagged, 0, "sink {i}: nothing missed");
        assert!(l.other.is_empty(), "sink {i}: {:?}", l.other);
    }
    let after: Vec<_> = chans.iter().map(Channel::tree_stats).collect();
    let frames: u64 = after.iter().zip(&before).map(|(x, y)| x.event_frames - y.event_frames).sum();
    let delivered: u64 = after.iter().zip(&before).map(|(x, y)| x.delivered - y.delivered).sum();
    let copies = frames as f64 / delivered as f64;
    let d = |f: fn(&kecho::TreeStats) -> u64| after.iter().zip(&before).map(|(x, y)| f(x) - f(y)).sum::<u64>();
    eprintln!(
        "steady state: {frames} event frames for {delivered} deliveries, {copies:.3} copies per event per node; \
         {} grafts ({} needless), {} duplicates",
        d(|t| t.grafts),
        d(|t| t.late_grafts),
        d(|t| t.duplicates),
    );
    assert_eq!(delivered, 2 * STEADY * (NODES as u64 - 1), "each node delivers the other nodes' events once");
    // At most 1.2 copies per event per node, beside what repairs cost: on a starved host (this test's 40 nodes
    // share two worker threads with whatever else runs) tree parents stall, their children graft what their other
    // neighbours announced, and each graft brings a copy and perhaps the stalled parent's late one
    // (kecho-proto's gossip_sim measures that cost deterministically). Copies that no graft explains would be a
    // tree that floods.
    let (grafts, extra) = (d(|t| t.grafts), frames.saturating_sub(delivered));
    assert!(
        extra as f64 <= 0.2 * delivered as f64 + 2.0 * grafts as f64,
        "copies per event per node {copies:.3}: {extra} extra copies, {grafts} grafts"
    );
    // Still bounded once the traffic is over (a link that failed under load is dialled again for a while).
    eventually(&format!("at most {THRESHOLD} links per node after the events"), || {
        nodes.iter().all(|n| up_links(n) <= THRESHOLD)
    })
    .await?;

    // Kill the node (not a source's) that forwarded most of source a's events: a parent in a's tree.
    let forwarded = |i: usize| after[i].forwarded - before[i].forwarded;
    let victim = (0..NODES).filter(|i| *i != a && *i != b).max_by_key(|i| forwarded(*i)).unwrap_or(0);
    assert!(forwarded(victim) > 0, "some node other than the sources forwarded events");
    eprintln!("killing node {victim}, which forwarded {} event frames", forwarded(victim));
    nodes[victim].kill();
    const CUT: u64 = 200;
    for _ in 0..CUT {
        src_a.submit(key_a, &Attrs::new(), b"after").await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let survivors: Vec<usize> = (0..NODES).filter(|i| *i != victim).collect();
    let waited = eventually("every event after the kill received or reported missed", || {
        survivors.iter().all(|i| {
            let l = logs[*i].lock();
            l.count(key_a) as u64 + l.lagged >= total + CUT
        })
    })
    .await?;
    let (mut got, mut missed) = (0, 0);
    for i in &survivors {
        let l = logs[*i].lock();
        let seqs = &l.seqs[key_a];
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sink {i}: source a in order, nothing twice");
        assert_eq!(l.count(key_a) as u64 + l.lagged, total + CUT, "sink {i}: every event received or reported");
        got += l.count(key_a) as u64 - total;
        missed += l.lagged;
    }
    eprintln!(
        "after the kill ({:.1} s): {got} of {} events received by the {} surviving sinks, {missed} reported missed",
        waited.as_secs_f64(),
        CUT * survivors.len() as u64,
        survivors.len()
    );
    // Its neighbours found it gone and told everyone (no other member had a link to it).
    let gone = eventually("every survivor to drop the killed node", || {
        survivors.iter().all(|i| chans[*i].sinks() == NODES - 1)
    })
    .await?;
    eprintln!("every survivor dropped the killed node {:.1} s after the events", gone.as_secs_f64());
    Ok(())
}

/// `n` nodes on channel `name`, a sink on each whose log a task keeps.
async fn members(
    reg: &RegistryClient,
    name: &str,
    n: usize,
) -> Result<(Vec<Node>, Vec<Channel>, Vec<Arc<Mutex<Log>>>)> {
    let (mut nodes, mut chans, mut logs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let node = node_on(reg).await?;
        let ch = if i == 0 { node.create_channel(name).await? } else { node.open_channel(name).await? };
        let mut sink = ch.sink(SinkOptions::new().capacity(100_000))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        tokio::spawn(async move {
            loop {
                match sink.recv().await {
                    Ok(e) => l.lock().seqs.entry(e.ty().to_owned()).or_default().push(e.seq()),
                    Err(RecvError::Lagged(n)) => l.lock().lagged += n,
                    Err(RecvError::Closed) => return,
                    Err(other) => l.lock().other.push(other.to_string()),
                }
            }
        });
        nodes.push(node);
        chans.push(ch);
        logs.push(log);
    }
    Ok((nodes, chans, logs))
}

/// The target in one process: 30 % of the member nodes (10 of 34) are killed at once (no goodbye, links
/// dropped), while a source publishes. Every survivor gets every event published during the repair or is told it
/// missed it (never silent), and every event published once the survivors dropped the dead gets to every survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_of_the_members_killed_at_once_in_tree_mode() -> Result<()> {
    let _serial = SERIAL.lock().await;
    const N: usize = 34;
    const KILLED: usize = 10;
    let reg = RegistryClient::in_process_private();
    let (nodes, chans, logs) = members(&reg, "thirty", N).await?;
    eventually("every node to know every sink", || chans.iter().all(|c| c.sinks() == N)).await?;
    eventually("tree mode everywhere", || chans.iter().all(|c| c.tree_stats().on)).await?;
    let key = "e";
    let mut src = chans[0].source()?;
    const WARM: u64 = 50;
    for _ in 0..WARM {
        src.submit(key, &Attrs::new(), b"warm").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("the warm-up events at every sink", || logs.iter().all(|l| l.lock().count(key) as u64 == WARM)).await?;
    // The killed: every third node but the source's, so that each part of the trees loses some.
    let killed: Vec<usize> = (1..N).filter(|i| i % 3 == 1).take(KILLED).collect();
    assert_eq!(killed.len(), KILLED);
    // The links of the joins and of the switch to tree mode closed.
    eventually("the contact's links to settle", || up_links(&nodes[0]) <= 8).await?;
    for &i in &killed {
        nodes[i].kill();
    }
    let survivors: Vec<usize> = (0..N).filter(|i| !killed.contains(i)).collect();
    const DURING: u64 = 300;
    for _ in 0..DURING {
        src.submit(key, &Attrs::new(), &[1u8; 100]).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = WARM + DURING;
    // The links up at the first node (the channel's contact), looked at while the survivors repair, the most.
    let mut contact_most = 0;
    let waited = eventually("every event of the repair received or reported missed", || {
        contact_most = contact_most.max(up_links(&nodes[0]));
        survivors.iter().all(|i| {
            let l = logs[*i].lock();
            l.count(key) as u64 + l.lagged >= total
        })
    })
    .await?;
    let (mut got, mut missed) = (0, 0);
    for i in &survivors {
        let l = logs[*i].lock();
        let seqs = &l.seqs[key];
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sink {i}: in order, nothing twice");
        assert_eq!(l.count(key) as u64 + l.lagged, total, "sink {i}: every event received or reported");
        assert!(l.other.is_empty(), "sink {i}: {:?}", l.other);
        got += l.count(key) as u64 - WARM;
        missed += l.lagged;
    }
    let share = got as f64 / (DURING * survivors.len() as u64) as f64;
    eprintln!(
        "{KILLED} of {N} nodes killed at once: {got} of {} events received by the {} survivors ({:.2} %), {missed} \
         reported missed, all accounted for {:.1} s after the last",
        DURING * survivors.len() as u64,
        survivors.len(),
        share * 100.0,
        waited.as_secs_f64()
    );
    let gone = match eventually("every survivor to drop the killed nodes", || {
        contact_most = contact_most.max(up_links(&nodes[0]));
        survivors.iter().all(|i| chans[*i].sinks() == N - KILLED)
    })
    .await
    {
        Ok(d) => d,
        Err(e) => {
            // Which survivors still count sinks of the dead, and how many: enough to tell a killed node nobody took
            // for gone (seen by every survivor) from a view that one member keeps (seen by few).
            let late: Vec<(usize, usize)> = survivors
                .iter()
                .filter(|i| chans[**i].sinks() != N - KILLED)
                .map(|i| (*i, chans[*i].sinks()))
                .collect();
            bail!("{e}: survivors (index, sinks known) not at {}: {late:?}", N - KILLED);
        }
    };
    eprintln!("every survivor dropped the killed nodes {:.1} s later", gone.as_secs_f64());
    const AFTER: u64 = 200;
    let lagged: Vec<u64> = survivors.iter().map(|i| logs[*i].lock().lagged).collect();
    for _ in 0..AFTER {
        src.submit(key, &Attrs::new(), &[2u8; 100]).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually("every later event at every survivor", || {
        contact_most = contact_most.max(up_links(&nodes[0]));
        survivors.iter().all(|i| {
            let l = logs[*i].lock();
            l.count(key) as u64 + l.lagged >= total + AFTER
        })
    })
    .await?;
    // The contact, which every joiner goes through, is no neighbour of most survivors: it keeps links for their talk
    // only briefly. Before, every survivor that lost a neighbour joined through it again, and it kept a link to each
    // (17 links here; 270 of 308 survivors at 440 nodes, docs/SCALE.md).
    eprintln!("the contact had at most {contact_most} links up during the repair");
    assert!(contact_most <= CONTACT_MOST, "the contact had {contact_most} links up during the repair");
    for (i, before) in survivors.iter().zip(lagged) {
        let l = logs[*i].lock();
        assert_eq!(l.lagged, before, "sink {i}: nothing of the later events missed");
        let tail: Vec<u64> = l.seqs[key].iter().copied().filter(|s| *s > total).collect();
        assert_eq!(tail, (total + 1..=total + AFTER).collect::<Vec<u64>>(), "sink {i}: every later event, in order");
    }
    Ok(())
}

/// Issue 17's defect, made deterministic: a node killed together with its whole active view has no surviving
/// neighbour to notice its death. The liveness check (one probe per member every 5 s of a non-neighbour member,
/// suspicion, then a goodbye on its behalf) takes it out of every survivor's view within seconds; before it, every
/// survivor kept it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_its_whole_active_view_leaves_every_view() -> Result<()> {
    let _serial = SERIAL.lock().await;
    const N: usize = 24;
    let reg = RegistryClient::in_process_private();
    let (nodes, chans, _logs) = members(&reg, "alone", N).await?;
    eventually("every node to know every sink", || chans.iter().all(|c| c.sinks() == N)).await?;
    eventually("tree mode everywhere", || chans.iter().all(|c| c.tree_stats().on)).await?;
    // A node that is not the first (the contact), and its neighbours, once the overlay settled.
    eventually("the overlay to settle", || chans.iter().all(|c| (2..=6).contains(&c.tree_stats().active))).await?;
    // A node none of whose neighbours is the first (the channel's creator and first contact, kept alive), killed with
    // all of them, so that no survivor is its neighbour.
    let ids: Vec<_> = nodes.iter().map(|n| n.id()).collect();
    let (victim, mut killed) = (N / 2..N)
        .map(|v| {
            let near: Vec<usize> =
                chans[v].tree_neighbours().iter().filter_map(|id| ids.iter().position(|i| i == id)).collect();
            (v, near)
        })
        .find(|(_, near)| !near.contains(&0))
        .expect("a node that is not the first's neighbour");
    killed.push(victim);
    for &i in &killed {
        nodes[i].kill();
    }
    let survivors: Vec<usize> = (0..N).filter(|i| !killed.contains(i)).collect();
    let took = eventually("every survivor to drop the killed nodes", || {
        survivors.iter().all(|i| chans[*i].sinks() == N - killed.len())
    })
    .await?;
    eprintln!(
        "node {victim} killed with its neighbours {killed:?}: out of every survivor's view {:.1} s later",
        took.as_secs_f64()
    );
    // And no survivor was taken for gone on the way.
    for i in &survivors {
        assert_eq!(chans[*i].sinks(), N - killed.len(), "survivor {i}");
    }
    Ok(())
}

/// The liveness check keeps false positives out: in an idle channel of 30 live nodes every node probes one member every
/// 5 s, and none is suspected (before the probe of a link lost before its answer was sent again, a link that the
/// probed node closed as unneeded before reading the probe made 2 suspicions in 10 s here). Prints the membership
/// traffic per member (probes included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_channel_in_tree_mode_suspects_no_member() -> Result<()> {
    let _serial = SERIAL.lock().await;
    const N: usize = 30;
    let reg = RegistryClient::in_process_private();
    let (_nodes, chans, _logs) = members(&reg, "idle", N).await?;
    eventually("every node to know every sink", || chans.iter().all(|c| c.sinks() == N)).await?;
    // Past the overlay's 10 s of summaries after the last snapshot.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let a: Vec<_> = chans.iter().map(Channel::tree_stats).collect();
    const IDLE: u64 = 10;
    tokio::time::sleep(Duration::from_secs(IDLE)).await;
    let b: Vec<_> = chans.iter().map(Channel::tree_stats).collect();
    let frames: u64 = a.iter().zip(&b).map(|(x, y)| y.control_frames - x.control_frames).sum();
    let bytes: u64 = a.iter().zip(&b).map(|(x, y)| y.control_bytes - x.control_bytes).sum();
    let suspicions: u64 = b.iter().map(|x| x.suspicions).sum();
    let per = |v: u64| v as f64 / N as f64 / IDLE as f64;
    eprintln!(
        "idle: {:.2} membership frames and {:.0} bytes per member per second; {suspicions} suspicions",
        per(frames),
        per(bytes)
    );
    assert_eq!(suspicions, 0, "live members suspected");
    assert_eq!(chans.iter().filter(|c| c.sinks() != N).count(), 0, "a live member dropped");
    Ok(())
}
