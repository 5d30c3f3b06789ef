//! Membership in tree mode (docs/SCALE.md, "Membership in tree mode"): a storm of joins at once into a channel in
//! tree mode converges (every member knows every sink, every node in tree mode). Real TCP links on loopback, one
//! process, a tree threshold of 8. (The lossy cases, which need stalls this test cannot make, are simulated in
//! `kecho-proto/tests/tree_membership_sim.rs`.)

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use kecho::filter::{EventView, SinkView};
use kecho::{Attrs, Channel, Node, RegistryClient, Sink, SinkOptions};

mod common;

const BEFORE: usize = 24;
const STORM: usize = 12;
const THRESHOLD: usize = 8;
/// Dials in flight a node may have at any moment (refills, shuffle replies, joins).
const MAX_NEVER_LINKED: usize = 3;
/// Generous: 36 nodes share the test's runtime on a loaded 2-core machine.
const T: Duration = Duration::from_secs(60);

async fn node_on(reg: &RegistryClient) -> Result<Node> {
    common::tree_node(reg, THRESHOLD).await
}

async fn join(reg: &RegistryClient) -> Result<(Node, Channel, Sink)> {
    let node = node_on(reg).await?;
    let ch = node.open_channel("storm").await?;
    let sink = ch.sink(SinkOptions::new())?;
    Ok((node, ch, sink))
}

/// Waits until every channel knows `n` sinks; returns how long that took.
async fn converged(members: &[(Node, Channel, Sink)], n: usize) -> Result<Duration> {
    let start = tokio::time::Instant::now();
    loop {
        let behind: Vec<usize> = members.iter().map(|(_, ch, _)| ch.sinks()).filter(|s| *s != n).collect();
        if behind.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > T {
            bail!("{} of {} members do not know {n} sinks: {behind:?}", behind.len(), members.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_joins_converges_in_tree_mode() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let first = node_on(&reg).await?;
    let ch = first.create_channel("storm").await?;
    let sink = ch.sink(SinkOptions::new())?;
    let mut members = vec![(first, ch, sink)];
    for _ in 1..BEFORE {
        members.push(join(&reg).await?);
    }
    converged(&members, BEFORE).await?;
    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..STORM {
        let reg = reg.clone();
        storm.spawn(async move { join(&reg).await });
    }
    while let Some(joined) = storm.join_next().await {
        members.push(joined??);
    }
    let took = converged(&members, BEFORE + STORM).await?;
    eprintln!("storm of {STORM} into {BEFORE}: every member knew every sink {took:?} after the last open");
    for (_, ch, _) in &members {
        assert!(ch.tree_stats().on, "every node runs the channel in tree mode");
    }
    // A joiner's snapshot changes twice in a row: when the contact's answer makes it a member, and when its sink is
    // added just after. Each broadcast on a new membership stream floods the overlay (no tree yet), so the two go as
    // one, with the newest version (docs/SCALE.md, "The storm in real processes"): one broadcast per joiner; a
    // joiner whose sink came later than the window on a loaded machine may have made two, hence the margin (24
    // broadcasts for 12 joiners when each change went on its own).
    let own: Vec<u64> = members[BEFORE..].iter().map(|(_, ch, _)| ch.tree_stats().own_broadcasts).collect();
    eprintln!("own snapshot broadcasts of the storm's joiners: {own:?}");
    assert!(own.iter().all(|n| *n >= 1), "every joiner broadcast its snapshot: {own:?}");
    let sum: u64 = own.iter().sum();
    assert!(sum <= (STORM + STORM / 4) as u64, "the joiners' two changes went as one broadcast: {own:?}");
    // A node keeps per-node link state (a `Peer`: outbox, counters) only for the nodes it links to or sends to, not
    // for every member it knows (docs/SCALE.md, "Memory per member"): an entry of its link table that is not up and
    // never was is state for a node it never dialled (before, every node kept one per other member with sinks, 30 to
    // 35 here). A few may be dials in flight (refills), hence the margin, checked a few times over 3 s.
    for _ in 0..12 {
        let idle: Vec<usize> = members
            .iter()
            .map(|(n, _, _)| n.link_stats().iter().filter(|l| !l.up && l.connects == 0).count())
            .collect();
        let most = idle.iter().copied().max().unwrap_or(0);
        assert!(most <= MAX_NEVER_LINKED, "a node keeps state for {most} nodes it never linked to: {idle:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let tables: Vec<usize> = members.iter().map(|(n, _, _)| n.link_stats().len()).collect();
    eprintln!("link table entries per node (links up or lost lately): {tables:?}");
    Ok(())
}

/// In tree mode a node keeps no link state for members it does not send to, so a source that gets an OUT-filter
/// must find every sink linked before it chooses: the routing table then gives every sink a link again
/// (`Routes::direct`), and the chosen sink gets every event, directly, the others none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_filtered_source_in_tree_mode_reaches_the_sink_it_chooses() -> Result<()> {
    const N: usize = 12;
    let reg = RegistryClient::in_process_private();
    let mut members = Vec::new();
    for i in 0..N {
        let node = common::tree_node(&reg, 4).await?;
        let ch = if i == 0 { node.create_channel("out").await? } else { node.open_channel("out").await? };
        let sink = ch.sink(SinkOptions::new().attr("pick", i64::from(i == N - 1)))?;
        members.push((node, ch, sink));
    }
    converged(&members, N).await?;
    // The source on a late joiner (the first node, the contact, may still have links to most members).
    let (others, last) = members.split_at_mut(N - 2);
    let (source, chosen) = last.split_at_mut(1);
    let (node, ch, _) = &source[0];
    let mut src = ch.source()?;
    src.set_out_filter(Some(Arc::new(|_: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>| {
        chosen.extend((0..sinks.len()).filter(|&i| sinks.get(i).number("pick") == Some(1.0)));
    })));
    for _ in 0..20 {
        src.submit("e", &Attrs::new(), b"x").await?;
    }
    let chosen_id = chosen[0].0.id();
    assert!(node.link_stats().iter().any(|l| l.node == chosen_id), "the chosen sink's node is linked");
    let mut got = 0;
    while got < 20 {
        match tokio::time::timeout(Duration::from_secs(10), chosen[0].2.recv()).await {
            Ok(Ok(_)) => got += 1,
            other => bail!("the chosen sink got {got} of 20, then {other:?}"),
        }
    }
    for (_, _, sink) in others.iter_mut() {
        if let Ok(e) = tokio::time::timeout(Duration::from_millis(100), sink.recv()).await {
            bail!("a sink the OUT-filter did not choose got {e:?}");
        }
    }
    let never_linked = |n: &Node| n.link_stats().iter().filter(|l| !l.up && l.connects == 0).count();
    let entries = node.link_stats().len();
    assert!(entries >= N - 1, "with the OUT-filter on, every sink's node is linked: {entries} of {}", N - 1);
    eprintln!("with the OUT-filter: {entries} link table entries, {} never linked", never_linked(node));
    // Without the filter, the table links no sink (none is a Block sink) and the sweep (every second) forgets the
    // link state it held for nodes never dialled.
    src.set_out_filter(None);
    src.submit("e", &Attrs::new(), b"x").await?;
    let start = tokio::time::Instant::now();
    while never_linked(node) > 0 {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the source's node still keeps state for {} nodes it never linked to", never_linked(node));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("without: {} link table entries", node.link_stats().len());
    Ok(())
}
