//! A source that begins as a durable sink joins (docs/DURABILITY.md, "Sources that began while the sink was away"):
//! its first events may reach the recorder but not the sink, which is not yet in the source's view. The sink's first
//! live event of the source then comes past them; the sink asks the recorder, which replays those recorded since the
//! sink's starting point (or says they are missed), and nothing of what was recorded before that point.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{names, Pub, Rec, Run, T};
use kecho::{Node, RegistryClient, SinkOptions};
use kecho_store::{Ask, CatchUp, DurableError, DurableSink, ReplayClient};

/// The state the race leaves, made deterministic: the sink has a starting point at the recorder, the source's first
/// five events are recorded after it but never sent to the sink (its node joins only after them), and the sink
/// receives the source from event 6 on. Before the fix it handed over 6 to 8 and never heard of 1 to 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_first_events_recorded_after_the_starting_point_are_replayed_before_its_first_live_one() -> Result<()>
{
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let (run, _) = Run::start(&reg, state.path()).await?;
    assert_eq!(run.sink.starting_points().get(&rec.id), Some(&0));
    run.stop().await;
    let mut p = Pub::start(&reg, 1).await?;
    for i in 1..=5 {
        p.send("t", "a", &format!("e-{i}")).await?;
    }
    rec.wait_recorded(5).await?;
    // The sink's node joins now (its catch-up answered before those five were recorded: none here).
    let mut run = Run::open(&reg, state.path(), SinkOptions::new()).await?;
    p.ch.wait_for_sinks(2, T).await?;
    for i in 6..=8 {
        p.send("t", "a", &format!("e-{i}")).await?;
    }
    let (got, other, fills) = run.take(8).await?;
    assert_eq!(got, names("e", 8), "every event, in order");
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(fills, 1);
    run.stop().await;
    p.stop().await;
    rec.stop().await;
    Ok(())
}

/// A new sink that takes its starting point before its sink joins (`DurableSink::start_at`, as `kecho sub` does when
/// a recorder is there): a source that begins as it joins and whose first events are recorded before its node sees
/// the sink gets them replayed by the first catch-up. (A starting point taken by that catch-up would come after them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sink_that_takes_its_starting_point_before_joining_gets_what_a_source_sent_as_it_joined() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let mut client = ReplayClient::open(&node, common::CH, &format!("{}-b", node.id())).await?;
    // As `kecho sub` asks: without waiting (the recorder is seen as soon as the replay channel is joined).
    let answer = client.fetch(&Ask::default(), Duration::ZERO).await?.context("no recorder seen at once")?;
    let start = (answer.recorder.context("a version 2 recorder")?, answer.next.context("its next index")?);
    assert_eq!(start, (rec.id, 0));
    // The source begins; its first events reach the recorder only.
    let mut p = Pub::start(&reg, 1).await?;
    for i in 1..=5 {
        p.send("t", "a", &format!("e-{i}")).await?;
    }
    rec.wait_recorded(5).await?;
    let ch = node.channel(common::CH).await?;
    let mut sink = DurableSink::open(ch.sink(SinkOptions::new())?, state.path(), "b")?;
    assert!(sink.start_at(start)?, "a new sink takes it");
    let items = sink.catch_up(&mut client, 0, T, true).await?.context("no recorder answered")?;
    let (events, other) = common::replayed(items);
    assert_eq!(events, names("e", 5), "what the source sent before it saw the sink");
    assert!(other.is_empty(), "{other:?}");
    let mut run = Run { node, sink, client };
    p.ch.wait_for_sinks(2, T).await?;
    for i in 6..=8 {
        p.send("t", "a", &format!("e-{i}")).await?;
    }
    let (got, other, _) = run.take(3).await?;
    assert_eq!(got, ["e-6", "e-7", "e-8"]);
    assert!(other.is_empty(), "{other:?}");
    run.stop().await;
    // Opened again, it keeps its own starting point.
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let ch = node.channel(common::CH).await?;
    let mut again = DurableSink::open(ch.sink(SinkOptions::new())?, state.path(), "b")?;
    assert!(!again.start_at((rec.id, 0))?, "a sink that ran before keeps its own");
    drop(again);
    node.shutdown().await;
    p.stop().await;
    rec.stop().await;
    Ok(())
}

/// The other side: events of a source recorded before the sink's starting point are not the sink's. Its first live
/// event of the source comes past them, and they are neither replayed nor counted missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sources_events_recorded_before_the_starting_point_are_neither_replayed_nor_missed() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let mut p = Pub::start(&reg, 1).await?;
    for i in 1..=5 {
        p.send("t", "a", &format!("e-{i}")).await?;
    }
    rec.wait_recorded(5).await?;
    let (mut run, items) = Run::start(&reg, state.path()).await?;
    assert_eq!(items, Some(Vec::new()));
    assert_eq!(run.sink.starting_points().get(&rec.id), Some(&5));
    p.ch.wait_for_sinks(2, T).await?;
    for i in 6..=8 {
        p.send("t", "a", &format!("e-{i}")).await?;
    }
    let (got, other, fills) = run.take(3).await?;
    assert_eq!(got, ["e-6", "e-7", "e-8"]);
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(fills, 1, "the recorder was asked");
    run.stop().await;
    p.stop().await;
    rec.stop().await;
    Ok(())
}

/// With no recorder on the channel any more: a restarted sink's gap after its position is reported missed, and a new
/// source's events before its first one here are said unknown (they may have been sent before its starting point).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_recorder_gone_a_gap_is_reported_missed_and_a_new_sources_said_unknown() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let (mut run, _) = Run::start(&reg, state.path()).await?;
    let mut p = Pub::start(&reg, 2).await?;
    for i in 1..=3 {
        p.send("t", "a", &format!("p-{i}")).await?;
    }
    assert_eq!(run.take(3).await?.0, names("p", 3));
    run.stop().await;
    rec.stop().await;
    let mut q = Pub::start(&reg, 0).await?;
    for i in 4..=6 {
        p.send("t", "a", &format!("p-{i}")).await?;
    }
    for i in 1..=2 {
        q.send("t", "a", &format!("q-{i}")).await?;
    }
    let mut run = Run::open(&reg, state.path(), SinkOptions::new()).await?;
    assert!(!run.sink.starting_points().is_empty(), "it has a starting point at the recorder gone");
    p.ch.wait_for_sinks(1, T).await?;
    q.ch.wait_for_sinks(1, T).await?;
    p.send("t", "a", "p-7").await?;
    q.send("t", "a", "q-3").await?;
    let (mut got, other, fills) = run.take(2).await?;
    got.sort();
    assert_eq!(got, ["p-7", "q-3"]);
    assert_eq!(fills, 2);
    assert_eq!(other.len(), 2, "{other:?}");
    assert!(other.contains(&CatchUp::Missed(3)), "p's 4 to 6: {other:?}");
    assert!(
        other.iter().any(|i| matches!(i, CatchUp::Unknown(kecho_store::Unknown::Began { events: 2, .. }))),
        "q's 1 and 2: {other:?}"
    );
    run.stop().await;
    p.stop().await;
    q.stop().await;
    Ok(())
}

/// The race itself, many times: a durable sink starts (joins, and takes its starting point at the recorder) while a
/// source's node joins and publishes at once, without waiting for sinks. The sink receives every event recorded
/// since its starting point, in order, once, and nothing is reported missed (the recorder has every event); the
/// events it does not get were recorded before its starting point. (It may also get events recorded just before its
/// starting point, live: its node was in the source's view before the recorder answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_starts_as_a_durable_sink_joins_loses_nothing_unreported() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let rec_dir = tempfile::tempdir()?;
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let mut recorded = 0;
    let (mut raced, mut before, rounds) = (0, 0, 40);
    for round in 0..rounds as u64 {
        let state = tempfile::tempdir()?;
        let publish = async {
            let node = Node::builder().registry_client(reg.clone()).start().await?;
            let ch = node.channel(common::CH).await?;
            let mut src = ch.source()?;
            // Each round a little later, so that the rounds sweep the moment the sink's node joins.
            tokio::time::sleep(Duration::from_millis(round % 10)).await;
            for i in 1..=50u64 {
                src.submit("t", &kecho::Attrs::default(), format!("r{round}-{i}").as_bytes()).await?;
                if i.is_multiple_of(2) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            anyhow::Ok((node, src))
        };
        let (started, published) = tokio::join!(Run::start(&reg, state.path()), publish);
        let ((mut run, _), (node, src)) = (started?, published?);
        let start = *run.sink.starting_points().get(&rec.id).context("no starting point")?;
        recorded += 50;
        rec.wait_recorded(recorded).await?;
        // What the sink is owed: the round's events recorded at its starting point or later.
        let owed: Vec<String> = {
            let all = rec.payloads.lock().unwrap();
            let from = usize::try_from(start - rec.first)?;
            all[from.min(all.len())..].iter().filter(|p| p.starts_with(&format!("r{round}-"))).cloned().collect()
        };
        before += 50 - owed.len();
        let (mut got, mut missed) = (Vec::new(), 0u64);
        while owed.last().is_some_and(|l| !got.contains(l)) {
            match tokio::time::timeout(T, run.sink.recv()).await {
                Err(_) => anyhow::bail!(
                    "round {round}: of the {} event(s) recorded since the starting point, {} received, {missed} \
                     reported missed, the rest neither (received: {got:?})",
                    owed.len(),
                    got.len()
                ),
                Ok(Ok(ev)) => got.push(String::from_utf8(ev.payload().to_vec())?),
                Ok(Err(DurableError::Behind(_))) => {
                    raced += 1;
                    for item in run.sink.fill(&mut run.client, 20, Duration::from_millis(100)).await? {
                        match item {
                            CatchUp::Event(r) => got.push(String::from_utf8(r.payload.to_vec())?),
                            CatchUp::Missed(n) => missed += n,
                            other => anyhow::bail!("round {round}: {other:?}"),
                        }
                    }
                }
                Ok(Err(DurableError::Recv(kecho::RecvError::Lagged(n)))) => missed += n,
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        assert_eq!(missed, 0, "round {round}: the recorder has every event");
        let from = 51 - got.len() as u64;
        assert_eq!(
            got,
            names(&format!("r{round}"), 50)[from as usize - 1..],
            "round {round}: in order, once, to the last"
        );
        assert!(got.ends_with(&owed), "round {round}: {got:?} lacks some of {owed:?}");
        drop(src);
        node.shutdown().await;
        run.stop().await;
    }
    eprintln!(
        "{raced} of {rounds} rounds: the sink's first live event of the source came past others; {before} event(s) \
         in all were recorded before a starting point"
    );
    rec.stop().await;
    Ok(())
}
