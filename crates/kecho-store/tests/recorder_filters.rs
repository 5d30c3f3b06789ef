//! The recorder applies a sink's filters (docs/DURABILITY.md, "Filters"; docs/PROTOCOL.md, "Replays from
//! recorders"): a replay request carries the sink's type and content filters, the recorder sends only the events they
//! accept (and `--last N` counts the newest N they accept), says what it lacks as before, refuses a filter it cannot
//! compile, and a recorder that predates this gives the sink the same result (the sink filters).

mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use common::{replayed, Pub, Rec, Run, Speaks, CH, T};
use kecho::{Attrs, Node, RegistryClient, SinkOptions, SourceKey};
use kecho_store::replay::{Ask, Filters, MAX_FILTER};
use kecho_store::{CatchUp, DurableSink, LogOptions, Recorded, Recorder, ReplayClient};

fn filtered() -> SinkOptions {
    SinkOptions::new().types(["keep"]).filter(r#"zone == "a""#)
}

/// Event `i`: every third of type `drop`, every fourth in zone `b`.
fn kind(i: u64) -> (&'static str, &'static str) {
    (if i.is_multiple_of(3) { "drop" } else { "keep" }, if i.is_multiple_of(4) { "b" } else { "a" })
}

fn name(i: u64) -> String {
    format!("e-{i:03}")
}

fn accepted(range: impl Iterator<Item = u64>) -> Vec<String> {
    range.filter(|i| kind(*i) == ("keep", "a")).map(name).collect()
}

async fn send(p: &mut Pub, range: std::ops::RangeInclusive<u64>) -> Result<()> {
    for i in range {
        let (ty, zone) = kind(i);
        p.send(ty, zone, &name(i)).await?;
    }
    Ok(())
}

/// A late joiner's catch-up of the newest `last`.
async fn late(reg: &RegistryClient, opts: SinkOptions, last: u64) -> Result<Vec<CatchUp>> {
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let ch = node.channel(CH).await?;
    let mut sink = DurableSink::in_memory(ch.sink(opts)?);
    let mut client = ReplayClient::open(&node, CH, &format!("{}-late", node.id())).await?;
    let items = tokio::time::timeout(T, sink.catch_up(&mut client, last, T, true)).await??;
    drop((sink, client));
    node.shutdown().await;
    items.context("no recorder answered")
}

/// The durable sink's restart after events 1 to 30 were recorded, and late joiners, against a recorder speaking
/// `speaks`; returns the events the recorder sent for the restart, for the filtered `--last 10` and for the
/// unfiltered `--last 100`.
async fn scenario(speaks: Speaks) -> Result<(u64, u64, u64)> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start_speaking(&reg, rec_dir.path(), speaks).await?;
    let (run, items) = Run::start_with(&reg, state.path(), filtered()).await?;
    assert_eq!(items, Some(Vec::new()), "a new sink: nothing yet");
    run.stop().await;
    let mut p = Pub::start(&reg, 1).await?;
    send(&mut p, 1..=30).await?;
    rec.wait_recorded(30).await?;

    let (sent, bytes) = rec.served();
    let (run, items) = Run::start_with(&reg, state.path(), filtered()).await?;
    let (events, other) = replayed(items.context("no recorder answered")?);
    assert_eq!(events, accepted(1..=30), "the replay, filtered as live events are");
    assert!(other.is_empty(), "events the filters reject are not missed: {other:?}");
    let restart = rec.served().0 - sent;
    if speaks == Speaks::Now {
        let want: usize = events.iter().map(String::len).sum();
        assert_eq!(rec.served().1 - bytes, want as u64, "payload bytes sent: only the accepted events'");
    }
    run.stop().await;

    // `--last 10` with the filters.
    let sent = rec.served().0;
    let (events, other) = replayed(late(&reg, filtered(), 10).await?);
    let last10 = rec.served().0 - sent;
    assert!(other.is_empty(), "{other:?}");
    let all = accepted(1..=30);
    match speaks {
        Speaks::Now => assert_eq!(events, all[all.len() - 10..], "the newest 10 the filters accept"),
        _ => assert_eq!(events, accepted(21..=30), "the recorder does not filter: those of the newest 10 it accepts"),
    }

    // An unfiltered late joiner: every event, as before.
    let sent = rec.served().0;
    let (events, other) = replayed(late(&reg, SinkOptions::new(), 100).await?);
    let unfiltered = rec.served().0 - sent;
    assert_eq!(events, (1..=30).map(name).collect::<Vec<_>>());
    assert!(other.is_empty(), "{other:?}");
    p.stop().await;
    rec.stop().await;
    Ok((restart, last10, unfiltered))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorder_sends_only_what_the_sinks_filters_accept() -> Result<()> {
    let (restart, last10, unfiltered) = scenario(Speaks::Now).await?;
    assert_eq!(restart, accepted(1..=30).len() as u64, "events sent for the restart");
    assert_eq!(last10, 10, "events sent for --last 10");
    assert_eq!(unfiltered, 30, "an unfiltered sink: every event");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_that_ignores_the_filters_gives_the_sink_the_same_events() -> Result<()> {
    let (restart, last10, unfiltered) = scenario(Speaks::NoFilters).await?;
    assert_eq!((restart, last10, unfiltered), (30, 10, 30), "every event asked for is sent");
    Ok(())
}

/// A recording of source 0x77's events 1 to 20 but 5, 6 and 13 (the recorder lacks them).
fn recording_with_gaps(dir: &Path) -> Result<()> {
    let mut rec = Recorder::open(dir, LogOptions::default())?;
    for i in (1..=20).filter(|i| ![5, 6, 13].contains(i)) {
        let (ty, zone) = kind(i);
        let mut attrs = Attrs::default();
        attrs.set("zone", zone);
        rec.record(&Recorded { source: SourceKey(0x77), seq: i, ty: ty.into(), attrs, payload: Bytes::from(name(i)) })?;
    }
    rec.flush()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_recorder_lacks_are_still_reported_missed_and_the_rejected_ones_are_not() -> Result<()> {
    let mut results = Vec::new();
    for speaks in [Speaks::Now, Speaks::NoFilters] {
        let reg = RegistryClient::in_process_private();
        let dir = tempfile::tempdir()?;
        recording_with_gaps(dir.path())?;
        let rec = Rec::start_speaking(&reg, dir.path(), speaks).await?;
        let items = late(&reg, filtered(), 100).await?;
        results.push((items, rec.served().0));
        rec.stop().await;
    }
    let ev = |i: u64| match &results[0].0.iter().find(|c| matches!(c, CatchUp::Event(r) if r.seq == i)) {
        Some(c) => (*c).clone(),
        None => panic!("no event {i}"),
    };
    // 3 and 4 rejected, 5 and 6 lacking, 7; 12 rejected, 13 lacking, 14; 20 rejected.
    let want =
        vec![ev(1), ev(2), CatchUp::Missed(2), ev(7), ev(10), ev(11), CatchUp::Missed(1), ev(14), ev(17), ev(19)];
    assert_eq!(results[0].0, want, "with the recorder filtering");
    assert_eq!(results[1].0, want, "with the sink filtering");
    assert_eq!((results[0].1, results[1].1), (8, 17), "events sent");
    Ok(())
}

/// Durable sink `b`'s state in `state`: a position of 1 at source 0x77 and a starting point at `rec`'s next index.
fn state_at(state: &Path, rec: &Rec, next: u64) -> Result<()> {
    let mut log = kecho_store::Log::open(&state.join("b"), LogOptions::default())?;
    let mut pos = [0u8; 16];
    pos[..8].copy_from_slice(&0x77u64.to_le_bytes());
    pos[8..].copy_from_slice(&1u64.to_le_bytes());
    log.append(&pos)?;
    let mut mark = [0u8; 24];
    mark[..8].copy_from_slice(&kecho_store::positions::MARK_TAG);
    mark[8..16].copy_from_slice(&rec.id.0.to_le_bytes());
    mark[16..].copy_from_slice(&next.to_le_bytes());
    log.append(&mark)?;
    log.flush()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_sinks_position_moves_over_what_the_filters_reject_and_what_the_recorder_lacks_is_missed(
) -> Result<()> {
    let mut results = Vec::new();
    for speaks in [Speaks::Now, Speaks::NoFilters] {
        let reg = RegistryClient::in_process_private();
        let (dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
        recording_with_gaps(dir.path())?;
        let rec = Rec::start_speaking(&reg, dir.path(), speaks).await?;
        state_at(state.path(), &rec, rec.first)?;
        let (run, items) = Run::start_with(&reg, state.path(), filtered()).await?;
        results.push((
            items.context("no recorder answered")?,
            run.sink.positions().get(SourceKey(0x77)),
            rec.served().0,
        ));
        run.stop().await;
        rec.stop().await;
    }
    let seqs = |items: &[CatchUp]| -> Vec<String> {
        items
            .iter()
            .map(|c| match c {
                CatchUp::Event(r) => r.seq.to_string(),
                CatchUp::Missed(n) => format!("missed {n}"),
                CatchUp::Unknown(u) => format!("{u:?}"),
            })
            .collect()
    };
    // After its position (1): 3 and 4 rejected, 5 and 6 lacking; 12 rejected, 13 lacking; 20 rejected, its position.
    let want = ["2", "missed 2", "7", "10", "11", "missed 1", "14", "17", "19"];
    assert_eq!(seqs(&results[0].0), want, "with the recorder filtering");
    assert_eq!(seqs(&results[1].0), want, "with the sink filtering");
    assert_eq!((results[0].1, results[1].1), (Some(20), Some(20)), "the position moved over the rejected 20");
    assert_eq!((results[0].2, results[1].2), (7, 16), "events sent");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_the_recorder_cannot_compile_is_refused_and_asked_again_without_it() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let dir = tempfile::tempdir()?;
    recording_with_gaps(dir.path())?;
    let rec = Rec::start(&reg, dir.path()).await?;
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let mut client = ReplayClient::open(&node, CH, "asker").await?;
    let wait = Duration::from_secs(5);
    for expr in ["zone ==".to_owned(), "(".repeat(3), "a".repeat(MAX_FILTER + 1)] {
        let ask = Ask { last: 100, filters: Filters { types: None, expr: Some(expr) }, ..Ask::default() };
        let answer = tokio::time::timeout(T, client.fetch(&ask, wait)).await??.context("no recorder")?;
        assert!(!answer.filtered, "asked again without the filter");
        assert_eq!(answer.events.len(), 17, "every event: the requester filters");
    }
    assert_eq!(rec.refused.load(std::sync::atomic::Ordering::SeqCst), 3);
    // The recorder goes on: a filter it compiles is applied.
    let ask = Ask {
        last: 100,
        filters: Filters { types: Some(vec!["keep".into()]), expr: Some(r#"zone == "a""#.into()) },
        ..Ask::default()
    };
    let answer = tokio::time::timeout(T, client.fetch(&ask, wait)).await??.context("no recorder")?;
    assert!(answer.filtered);
    let seqs: Vec<u64> = answer.events.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 7, 10, 11, 14, 17, 19]);
    assert_eq!(answer.missed, [0, 0, 2, 0, 0, 1, 0, 0]);
    assert_eq!(answer.passed, [(SourceKey(0x77), 20, 0)]);
    drop(client);
    node.shutdown().await;
    rec.stop().await;
    Ok(())
}
