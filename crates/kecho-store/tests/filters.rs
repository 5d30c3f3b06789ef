//! Replays are filtered as live events are (docs/DURABILITY.md, "Durable (named) sinks"): a durable sink with a type
//! and a content filter gets from a recorder only the events its filters accept, and the events they reject are not
//! counted as missed, whether they come in a replay or fall between its position and its first live event.

mod common;

use anyhow::{Context, Result};
use common::{replayed, Pub, Rec, Run, CH, T};
use kecho::{Node, RegistryClient, SinkOptions};
use kecho_store::{DurableSink, ReplayClient};

fn filtered() -> SinkOptions {
    SinkOptions::new().types(["keep"]).filter(r#"zone == "a""#)
}

/// Event `i` of the pattern the tests publish: every third of type `drop`, every fourth in zone `b`.
fn kind(i: u64) -> (&'static str, &'static str) {
    (if i.is_multiple_of(3) { "drop" } else { "keep" }, if i.is_multiple_of(4) { "b" } else { "a" })
}

fn accepted(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.filter(|i| kind(*i) == ("keep", "a")).map(|i| format!("e-{i}")).collect()
}

async fn send(p: &mut Pub, range: std::ops::RangeInclusive<u64>) -> Result<()> {
    for i in range {
        let (ty, zone) = kind(i);
        p.send(ty, zone, &format!("e-{i}")).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_brings_only_what_the_sinks_filters_accept_and_counts_none_of_the_rest_missed() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let (mut run, items) = Run::start_with(&reg, state.path(), filtered()).await?;
    assert_eq!(items, Some(Vec::new()));
    let mut p = Pub::start(&reg, 2).await?;
    send(&mut p, 1..=12).await?;
    // Live, the source filters: 1, 2, 5, then the sink stops with its position at 5.
    let (got, other, _) = run.take(3).await?;
    assert_eq!(got, ["e-1", "e-2", "e-5"]);
    assert!(other.is_empty(), "{other:?}");
    run.stop().await;

    send(&mut p, 13..=24).await?;
    rec.wait_recorded(24).await?;
    let (mut run, items) = Run::start_with(&reg, state.path(), filtered()).await?;
    let (events, other) = replayed(items.context("no recorder answered")?);
    assert_eq!(events, accepted(6..=24), "the replay, filtered as live events are");
    assert!(other.is_empty(), "the events the filters reject are not missed: {other:?}");

    // The next live events: 25 (rejected by type) and 26 (by content) fall between the position the replay left
    // (24) and the first event the sink receives (27). They are not missed either.
    p.send("drop", "a", "e-25").await?;
    p.send("keep", "b", "e-26").await?;
    for i in 27..=29 {
        p.send("keep", "a", &format!("e-{i}")).await?;
    }
    rec.wait_recorded(29).await?;
    let (got, other, _) = run.take(3).await?;
    assert_eq!(got, ["e-27", "e-28", "e-29"]);
    assert!(other.is_empty(), "events the filters reject, counted missed: {other:?}");
    run.stop().await;

    // A late joiner's newest N: the newest N its filters accept (the recorder applies them).
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let ch = node.channel(CH).await?;
    let mut late = DurableSink::in_memory(ch.sink(filtered())?);
    let mut client = ReplayClient::open(&node, CH, &format!("{}-late", node.id())).await?;
    let items = tokio::time::timeout(T, late.catch_up(&mut client, 10, T, true)).await??;
    let (events, other) = replayed(items.context("no recorder answered")?);
    let all: Vec<String> = accepted(1..=24).into_iter().chain(["e-27", "e-28", "e-29"].map(String::from)).collect();
    assert_eq!(events, all[all.len() - 10..]);
    assert!(other.is_empty(), "{other:?}");
    drop((late, client));
    node.shutdown().await;
    p.stop().await;
    rec.stop().await;
    Ok(())
}
