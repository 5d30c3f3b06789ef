//! Membership in tree mode (docs/SCALE.md, "Membership in tree mode"): a storm of joins at once into a channel in
//! tree mode converges (every member knows every sink, every node in tree mode). Real TCP links on loopback, one
//! process, a tree threshold of 8. (The lossy cases, which need stalls this test cannot make, are simulated in
//! `kecho-proto/tests/tree_membership_sim.rs`.)

use std::time::Duration;

use anyhow::{bail, Result};
use kecho::{Channel, Node, RegistryClient, Sink, SinkOptions};

mod common;

const BEFORE: usize = 24;
const STORM: usize = 12;
const THRESHOLD: usize = 8;
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
    Ok(())
}
