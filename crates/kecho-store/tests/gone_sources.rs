//! Sources that end, or go away, while a durable sink is away (docs/DURABILITY.md, "Sources gone while the sink was
//! away"). The sink's restarted process is a new node, which no source knew and no end was meant for: it must still
//! be told what it missed of a source it has a position for, exactly when an end of the source reaches its node,
//! as "gone, unknown" when none does, and only once across later restarts. Without a recorder, in a full mesh and
//! in tree mode.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Node, RecvError, RegistryClient, SinkOptions, SourceFate};
use kecho_store::{DurableError, DurableSink};

const CH: &str = "gone";
const T: Duration = Duration::from_secs(15);

/// Past `b`'s source grace, with room.
fn past_grace(tree: bool) -> Duration {
    Duration::from_secs(if tree { 10 } else { 3 })
}

async fn node(reg: &RegistryClient, tree: bool, grace: Duration) -> Result<Node> {
    let mut b = Node::builder().registry_client(reg.clone()).source_grace(grace).gap_memory(Duration::from_secs(3));
    if tree {
        b = b.tree_threshold(1);
    }
    Ok(b.start().await?)
}

/// Durable sink `b` of a new node (a restarted process). Its source grace is short (a second; the default is 10 s),
/// longer in tree mode: there a node that appears hears of an end remembered by a neighbour as an announcement in
/// the overlay, whose stream it then fills (or gives up on) before it delivers the end (2 to 5 s seen).
async fn open_b(reg: &RegistryClient, tree: bool, state: &Path) -> Result<(Node, DurableSink)> {
    let n = node(reg, tree, Duration::from_secs(if tree { 8 } else { 1 })).await?;
    let ch = n.channel(CH).await?;
    let sink = DurableSink::open(ch.sink(SinkOptions::new())?, state, "b")?;
    Ok((n, sink))
}

/// What the sink says within `within`: an event's payload, or its report; None if it says nothing.
async fn next(sink: &mut DurableSink, within: Duration) -> Result<Option<Result<String, RecvError>>> {
    match tokio::time::timeout(within, sink.recv()).await {
        Err(_) => Ok(None),
        Ok(Ok(ev)) => Ok(Some(Ok(String::from_utf8(ev.payload().to_vec())?))),
        Ok(Err(DurableError::Recv(e))) => Ok(Some(Err(e))),
        Ok(Err(e)) => bail!("durable sink: {e}"),
    }
}

/// Source node `a` publishes 1 to 5, which durable sink `b` takes, and `b`'s process is killed. Returns `a`'s node,
/// its channel and source, and the plain sink node `c` that stays (it remembers what it hears of `a`'s source).
async fn first_run(
    reg: &RegistryClient,
    tree: bool,
    state: &Path,
) -> Result<(Node, kecho::Channel, kecho::Source, Node, kecho::Sink)> {
    let a = node(reg, tree, Duration::from_secs(1)).await?;
    let a_ch = a.channel(CH).await?;
    let c = node(reg, tree, Duration::from_secs(1)).await?;
    let c_sink = c.channel(CH).await?.sink(SinkOptions::new())?;
    let (b, mut sink) = open_b(reg, tree, state).await?;
    let mut src = a_ch.source()?;
    a_ch.wait_for_sinks(2, T).await?;
    for i in 1..=5 {
        src.submit("t", &Attrs::new(), format!("e-{i}").as_bytes()).await?;
    }
    for i in 1..=5 {
        let got = next(&mut sink, T).await?.context("b took nothing")?;
        assert_eq!(got, Ok(format!("e-{i}")));
    }
    sink.commit()?;
    b.kill();
    drop(sink);
    Ok((a, a_ch, src, c, c_sink))
}

async fn ended_while_away(tree: bool) -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let state = tempfile::tempdir()?;
    let (a, a_ch, mut src, c, mut c_sink) = first_run(&reg, tree, state.path()).await?;
    for i in 6..=10 {
        src.submit("t", &Attrs::new(), format!("e-{i}").as_bytes()).await?;
    }
    // `c` has every event before the source ends, and then its end.
    for _ in 0..10 {
        tokio::time::timeout(T, c_sink.recv()).await.context("c")??;
    }
    // The source ends (its end goes to every member), then its node leaves.
    drop(src);
    drop(a_ch);
    a.shutdown().await;
    // Restarted, `b` is told it missed 6 to 10 (the end, remembered by `c`, reaches its new node).
    let (b, mut sink) = open_b(&reg, tree, state.path()).await?;
    // Told of 6 to 10 as missed. In tree mode the newest may come instead from a neighbour's cache of the source's
    // stream (the overlay hands a node that appears the items it announces): then those are delivered, in order,
    // after the report of the ones before them.
    let (mut missed, mut got) = (0u64, Vec::new());
    while missed + (got.len() as u64) < 5 {
        match next(&mut sink, T).await?.context("not told of the events after its position")? {
            Ok(p) => got.push(p),
            Err(RecvError::Lagged(n)) if got.is_empty() => missed += n,
            Err(e) => bail!("{e} after {missed} missed and {got:?}"),
        }
    }
    assert_eq!(missed + got.len() as u64, 5, "6 to 10 accounted for: {missed} missed, {got:?}");
    let newest: Vec<String> = (11 - got.len()..=10).map(|i| format!("e-{i}")).collect();
    assert_eq!(got, newest, "what was delivered");
    assert!(tree || got.is_empty(), "a full mesh has no cache to deliver from: {got:?}");
    assert_eq!(next(&mut sink, Duration::from_secs(2)).await?, None, "once");
    b.kill();
    drop(sink);
    // Started once more after `c` forgot the end (its gap memory is 3 s): the source was accounted for, so nothing
    // is said (it would be "gone, unknown" otherwise: no member has the source and no end is heard).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (b, mut sink) = open_b(&reg, tree, state.path()).await?;
    assert_eq!(next(&mut sink, past_grace(tree)).await?, None, "told again");
    assert!(sink.positions().all().next().is_none(), "the ended source is forgotten");
    b.kill();
    drop(c_sink);
    c.shutdown().await;
    Ok(())
}

async fn gone_while_away(tree: bool) -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let state = tempfile::tempdir()?;
    let (a, _a_ch, src, c, c_sink) = first_run(&reg, tree, state.path()).await?;
    drop(c_sink);
    c.kill();
    // The source's node dies without a word.
    a.kill();
    drop(src);
    let (b, mut sink) = open_b(&reg, tree, state.path()).await?;
    let key = *sink.positions().resumed_sources().first().context("a position")?;
    assert_eq!(sink.sink().source_fate(key), SourceFate::Undecided, "before its source grace");
    match next(&mut sink, T).await? {
        Some(Err(RecvError::SourceLost(k))) => assert_eq!(k, key),
        other => bail!("not told the source is gone: {other:?}"),
    }
    assert_eq!(next(&mut sink, Duration::from_secs(2)).await?, None, "once");
    b.kill();
    drop(sink);
    let (b, mut sink) = open_b(&reg, tree, state.path()).await?;
    assert_eq!(next(&mut sink, past_grace(tree)).await?, None, "told again");
    b.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_durable_sink_is_told_what_a_source_that_ended_while_it_was_away_sent() -> Result<()> {
    ended_while_away(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_tree_mode_a_restarted_durable_sink_is_told_what_a_source_that_ended_while_it_was_away_sent() -> Result<()> {
    ended_while_away(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_durable_sink_is_told_a_source_that_died_while_it_was_away_is_gone() -> Result<()> {
    gone_while_away(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_tree_mode_a_restarted_durable_sink_is_told_a_source_that_died_while_it_was_away_is_gone() -> Result<()> {
    gone_while_away(true).await
}
