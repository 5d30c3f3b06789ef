//! A durable sink and the sources that began while it was away (docs/DURABILITY.md, "Durable (named) sinks"): in one
//! process, over loopback, with recorders served by `kecho_store::replay::serve` as `kecho record` does. The sink takes
//! a starting point at a recorder when it first runs; after a restart it gets the events of sources it never heard
//! of recorded since then, in the order recorded, and says what it cannot know (no starting point at the recorder
//! that answers).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Node, RegistryClient, SinkOptions};
use kecho_store::replay::{self, Request};
use kecho_store::{CatchUp, DurableSink, LogOptions, Recorded, Recorder, RecorderId, ReplayClient, Unknown};

const CH: &str = "orders";
const T: Duration = Duration::from_secs(10);

/// A recorder member in its own node: records the channel's events and answers replay requests, as `kecho record`.
struct Rec {
    node: Node,
    task: tokio::task::JoinHandle<Result<()>>,
    id: RecorderId,
    recorded: Arc<AtomicU64>,
}

impl Rec {
    async fn start(reg: &RegistryClient, dir: &Path) -> Result<Rec> {
        Rec::start_as(reg, dir, false).await
    }

    /// With `v1`, as a recorder of version 1 of the exchange would: no identity advertised, every request answered
    /// as version 1 (attributes it does not know ignored).
    async fn start_as(reg: &RegistryClient, dir: &Path, v1: bool) -> Result<Rec> {
        let mut rec = Recorder::open(dir, LogOptions::default())?;
        let id = rec.id();
        let node = Node::builder().registry_client(reg.clone()).start().await?;
        let ch = node.channel(CH).await?;
        let mut sink = ch.sink(SinkOptions::new().capacity(65_536))?;
        let rch = node.channel(&replay::channel_of(CH)).await?;
        let mut opts = SinkOptions::new().types([replay::REQUEST]).attr(replay::RECORDER_ATTR, true);
        if !v1 {
            opts = opts
                .attr(replay::RECORDER_ID_ATTR, id.to_string())
                .attr(replay::RECORDER_VERSION_ATTR, replay::VERSION as i64);
        }
        let mut requests = rch.sink(opts)?;
        let mut answers = rch.source()?;
        let recorded = Arc::new(AtomicU64::new(rec.next_index()));
        let count = recorded.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    ev = sink.recv() => {
                        let ev = ev?;
                        rec.record(&Recorded::of(&ev))?;
                        rec.flush()?;
                        count.store(rec.next_index(), Ordering::SeqCst);
                    }
                    req = requests.recv() => {
                        let mut req = Request::from_attrs(req?.attrs())?;
                        if v1 {
                            (req.version, req.to, req.since) = (1, None, None);
                        }
                        replay::serve(&mut rec, &mut answers, &req).await?;
                    }
                }
            }
        });
        Ok(Rec { node, task, id, recorded })
    }

    async fn wait_recorded(&self, n: u64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + T;
        while self.recorded.load(Ordering::SeqCst) < n {
            if tokio::time::Instant::now() > deadline {
                bail!("the recorder holds {} event(s), not {n}", self.recorded.load(Ordering::SeqCst));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn stop(self) {
        self.task.abort();
        self.node.shutdown().await;
    }
}

/// A run of durable sink `b` in its own node (a new process each time, as after a restart).
struct Run {
    node: Node,
    sink: DurableSink,
    client: ReplayClient,
}

impl Run {
    async fn start(reg: &RegistryClient, state: &Path) -> Result<(Run, Option<Vec<CatchUp>>)> {
        let node = Node::builder().registry_client(reg.clone()).start().await?;
        let ch = node.channel(CH).await?;
        let mut sink = DurableSink::open(ch.sink(SinkOptions::new())?, state, "b")?;
        let mut client = ReplayClient::open(&node, CH, &format!("{}-b", node.id())).await?;
        let items = sink.catch_up(&mut client, 0, Duration::from_secs(2), true).await?;
        Ok((Run { node, sink, client }, items))
    }

    /// Receives `n` live events; returns their (payload) names.
    async fn recv(&mut self, n: usize) -> Result<Vec<String>> {
        let mut got = Vec::new();
        while got.len() < n {
            let ev = tokio::time::timeout(T, self.sink.recv()).await.context("no event")??;
            got.push(String::from_utf8(ev.payload().to_vec())?);
        }
        self.sink.commit()?;
        Ok(got)
    }

    async fn stop(self) {
        drop(self.sink);
        drop(self.client);
        self.node.shutdown().await;
    }
}

/// A publisher in its own node: `n` events named `NAME-1`, ... once `sinks` sinks are present.
async fn publish(reg: &RegistryClient, name: &str, n: u64, sinks: usize) -> Result<()> {
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let ch = node.channel(CH).await?;
    ch.wait_for_sinks(sinks, T).await?;
    let mut src = ch.source()?;
    for i in 1..=n {
        src.submit("t", &kecho::Attrs::default(), format!("{name}-{i}").as_bytes()).await?;
    }
    drop(src);
    node.shutdown().await;
    Ok(())
}

/// The events a catch-up replayed (their payloads) and anything else it said.
fn replayed(items: Vec<CatchUp>) -> (Vec<String>, Vec<CatchUp>) {
    let mut events = Vec::new();
    let mut other = Vec::new();
    for i in items {
        match i {
            CatchUp::Event(ref r) => events.push(String::from_utf8_lossy(&r.payload).into_owned()),
            i => other.push(i),
        }
    }
    (events, other)
}

fn names(name: &str, n: u64) -> Vec<String> {
    (1..=n).map(|i| format!("{name}-{i}")).collect()
}

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
