//! A durable sink and the sources that began while it was away (docs/DURABILITY.md, "Durable (named) sinks"): in one
//! process, over loopback, with recorders served by `kecho_store::replay::serve` as `kecho record` does. The sink takes
//! a starting point at a recorder when it first runs; after a restart it gets the events of sources it never heard
//! of recorded since then, in the order recorded, and says what it cannot know (no starting point at the recorder
//! that answers).

mod common;

use anyhow::{Context, Result};
use common::{names, publish, replayed, Rec, Run, CH, T};
use kecho::{Node, RegistryClient};
use kecho_store::{CatchUp, LogOptions, Unknown};

/// The scenario of the defect: the sink receives 3 events of one source, is stopped; a second source sends 4 (only
/// the recorder receives them); restarted, the sink gets those 4 from the recorder, in order, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_began_while_the_sink_was_away_is_replayed_from_the_recorder() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let (mut run, items) = Run::start(&reg, state.path()).await?;
    assert_eq!(items, Some(Vec::new()), "nothing to replay to a new sink");
    assert_eq!(run.sink.starting_points().get(&rec.id), Some(&0), "its starting point at the recorder");
    publish(&reg, "a", 3, 2).await?;
    assert_eq!(run.recv(3).await?, names("a", 3));
    run.stop().await;

    publish(&reg, "b", 4, 1).await?;
    rec.wait_recorded(7).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    let (events, other) = replayed(items.context("no recorder answered")?);
    assert_eq!(events, names("b", 4), "the events of the source that began while the sink was away");
    assert!(other.is_empty(), "nothing missed or unknown: {other:?}");
    assert_eq!(run.sink.starting_points().get(&rec.id), Some(&7), "moved to the recorder's next index");

    // The third run: nothing again, and events of a third source go live as before.
    run.stop().await;
    let (mut run, items) = Run::start(&reg, state.path()).await?;
    assert_eq!(items, Some(Vec::new()));
    publish(&reg, "c", 2, 2).await?;
    assert_eq!(run.recv(2).await?, names("c", 2));
    run.stop().await;
    rec.stop().await;
    Ok(())
}

/// A durable sink that never received an event: restarted, it gets every event recorded since it first ran (and none
/// recorded before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_never_received_an_event_gets_what_was_recorded_since_it_first_ran() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    publish(&reg, "before", 5, 1).await?;
    rec.wait_recorded(5).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    assert_eq!(items, Some(Vec::new()));
    assert!(run.sink.positions().all().next().is_none());
    run.stop().await;
    publish(&reg, "away", 4, 1).await?;
    rec.wait_recorded(9).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    let (events, other) = replayed(items.context("no recorder answered")?);
    assert_eq!(events, names("away", 4), "what was recorded since it first ran, and only that");
    assert!(other.is_empty(), "{other:?}");
    run.stop().await;
    rec.stop().await;
    Ok(())
}

/// Two recorders: the sink asks the one it has a starting point at, and gets its answer only (not two interleaved);
/// with that one gone, the other answers and the sink is told that what came before cannot be known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_recorders_the_sink_asks_its_own_and_says_what_the_other_cannot_know() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (d1, d2, state) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
    let r1 = Rec::start(&reg, d1.path()).await?;
    let (run, _) = Run::start(&reg, state.path()).await?;
    let first = *run.sink.starting_points().keys().next().context("no starting point")?;
    assert_eq!(first, r1.id);
    run.stop().await;
    let r2 = Rec::start(&reg, d2.path()).await?;
    publish(&reg, "a", 3, 2).await?;
    r1.wait_recorded(3).await?;
    r2.wait_recorded(3).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    let (events, other) = replayed(items.context("no recorder answered")?);
    assert_eq!(events, names("a", 3), "one answer, each event once");
    assert!(other.is_empty(), "{other:?}");
    run.stop().await;

    let (r1_id, r2_id) = (r1.id, r2.id);
    r1.stop().await;
    publish(&reg, "b", 2, 1).await?;
    r2.wait_recorded(5).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    let items = items.context("no recorder answered")?;
    // Source a is known (by its position): nothing of it; source b is not, and recorder 2 has no starting point of
    // this sink's: said, not replayed.
    let (events, other) = replayed(items);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(other, vec![CatchUp::Unknown(Unknown::NoStart { recorder: r2_id, others: vec![r1_id] })]);
    assert!(run.sink.starting_points().contains_key(&r2_id), "it has one now");
    run.stop().await;
    r2.stop().await;
    Ok(())
}

/// State written before starting points existed (positions only) opens; its first answer says that sources it
/// never heard of cannot be known, and gives it a starting point from which the next restart gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_of_the_previous_format_opens_and_gets_a_starting_point() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    {
        // The previous format: 16-byte positions (source key, seq) in a log in STATE/b.
        let mut log = kecho_store::Log::open(&state.path().join("b"), LogOptions::default())?;
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&0xabu64.to_le_bytes());
        r[8..].copy_from_slice(&3u64.to_le_bytes());
        log.append(&r)?;
        log.flush()?;
    }
    let rec = Rec::start(&reg, rec_dir.path()).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    assert_eq!(run.sink.positions().get(kecho::SourceKey(0xab)), Some(3));
    assert_eq!(items, Some(vec![CatchUp::Unknown(Unknown::NoStart { recorder: rec.id, others: vec![] })]));
    run.stop().await;
    publish(&reg, "later", 2, 1).await?;
    rec.wait_recorded(2).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    let (events, other) = replayed(items.context("no recorder answered")?);
    assert_eq!(events, names("later", 2));
    assert!(other.is_empty(), "{other:?}");
    run.stop().await;
    rec.stop().await;
    Ok(())
}

/// A recorder of version 1 of the exchange (an earlier `kecho record`): the sink's known sources are replayed after
/// their positions as before, and it is told that sources it never heard of cannot be known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_version_1_recorder_known_sources_are_replayed_and_the_rest_is_said_unknown() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (rec_dir, state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let rec = Rec::start_as(&reg, rec_dir.path(), true).await?;
    let (mut run, items) = Run::start(&reg, state.path()).await?;
    assert_eq!(items, Some(vec![CatchUp::Unknown(Unknown::OldRecorder)]));
    assert!(run.sink.starting_points().is_empty(), "a version 1 recorder gives none");
    // One source, half received: the other half replayed after the position, as with version 1.
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let ch = node.channel(CH).await?;
    ch.wait_for_sinks(2, T).await?;
    let mut src = ch.source()?;
    for i in 1..=2 {
        src.submit("t", &kecho::Attrs::default(), format!("a-{i}").as_bytes()).await?;
    }
    assert_eq!(run.recv(2).await?, names("a", 2));
    run.stop().await;
    for i in 3..=4 {
        src.submit("t", &kecho::Attrs::default(), format!("a-{i}").as_bytes()).await?;
    }
    rec.wait_recorded(4).await?;
    let (run, items) = Run::start(&reg, state.path()).await?;
    let (events, other) = replayed(items.context("no recorder answered")?);
    assert_eq!(events, vec!["a-3".to_owned(), "a-4".to_owned()]);
    assert_eq!(other, vec![CatchUp::Unknown(Unknown::OldRecorder)]);
    run.stop().await;
    drop(src);
    node.shutdown().await;
    rec.stop().await;
    Ok(())
}
