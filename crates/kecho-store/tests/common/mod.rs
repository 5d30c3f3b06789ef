//! What the durable-sink tests share: a recorder member served as `kecho record` serves it, runs of durable sink `b`,
//! publishers, in one process over loopback.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Node, RegistryClient, SinkOptions};
use kecho_store::replay::{self, Request};
use kecho_store::{CatchUp, DurableSink, LogOptions, Recorded, Recorder, RecorderId, ReplayClient};

pub const CH: &str = "orders";
pub const T: Duration = Duration::from_secs(10);

/// A recorder member in its own node: records the channel's events and answers replay requests, as `kecho record`.
pub struct Rec {
    pub node: Node,
    task: tokio::task::JoinHandle<Result<()>>,
    pub id: RecorderId,
    recorded: Arc<AtomicU64>,
    /// The payloads recorded by this run of the recorder, in the order recorded (from index `first`).
    pub payloads: Arc<std::sync::Mutex<Vec<String>>>,
    pub first: u64,
    /// Events sent in answers, and their payload bytes.
    pub served: Arc<(AtomicU64, AtomicU64)>,
    /// Requests refused for their filters.
    pub refused: Arc<AtomicU64>,
}

/// How a test recorder speaks the exchange.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// As `kecho record` does.
    Now,
    /// As a version 1 recorder: no identity advertised, every request answered as version 1.
    V1,
    /// As a version 2 recorder that predates filters: it ignores them and sends every event asked for.
    NoFilters,
}

impl Rec {
    pub async fn start(reg: &RegistryClient, dir: &Path) -> Result<Rec> {
        Rec::start_as(reg, dir, false).await
    }

    /// With `v1`, as a recorder of version 1 of the exchange would: no identity advertised, every request answered
    /// as version 1 (attributes it does not know ignored).
    pub async fn start_as(reg: &RegistryClient, dir: &Path, v1: bool) -> Result<Rec> {
        Rec::start_speaking(reg, dir, if v1 { Speaks::V1 } else { Speaks::Now }).await
    }

    pub async fn start_speaking(reg: &RegistryClient, dir: &Path, speaks: Speaks) -> Result<Rec> {
        let v1 = speaks == Speaks::V1;
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
        let first = rec.next_index();
        let payloads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = payloads.clone();
        let served = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let (sent, refused) = (served.clone(), Arc::new(AtomicU64::new(0)));
        let refusals = refused.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    ev = sink.recv() => {
                        let ev = ev?;
                        if rec.record(&Recorded::of(&ev))? {
                            kept.lock().unwrap().push(String::from_utf8_lossy(ev.payload()).into_owned());
                        }
                        rec.flush()?;
                        count.store(rec.next_index(), Ordering::SeqCst);
                    }
                    req = requests.recv() => {
                        let mut req = Request::from_attrs(req?.attrs())?;
                        if v1 {
                            (req.version, req.to, req.since) = (1, None, None);
                        }
                        if speaks != Speaks::Now {
                            req.filters = replay::Filters::default();
                        }
                        let m = (!req.filters.is_none()).then(|| req.filters.compile()).and_then(Result::ok);
                        if req.is_for(rec.id()) {
                            let a = replay::prepare(&mut rec, &req, m.as_ref())?;
                            sent.0.fetch_add(a.events.len() as u64, Ordering::SeqCst);
                            let bytes: usize = a.events.iter().map(|(r, _)| r.payload.len()).sum();
                            sent.1.fetch_add(bytes as u64, Ordering::SeqCst);
                        }
                        match replay::serve(&mut rec, &mut answers, &req).await {
                            Err(replay::ServeError::BadFilter { .. }) => _ = refusals.fetch_add(1, Ordering::SeqCst),
                            r => _ = r?,
                        }
                    }
                }
            }
        });
        Ok(Rec { node, task, id, recorded, payloads, first, served, refused })
    }

    pub async fn wait_recorded(&self, n: u64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + T;
        while self.recorded.load(Ordering::SeqCst) < n {
            if tokio::time::Instant::now() > deadline {
                bail!("the recorder holds {} event(s), not {n}", self.recorded.load(Ordering::SeqCst));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Events sent in answers so far, and their payload bytes.
    pub fn served(&self) -> (u64, u64) {
        (self.served.0.load(Ordering::SeqCst), self.served.1.load(Ordering::SeqCst))
    }

    pub async fn stop(self) {
        self.task.abort();
        self.node.shutdown().await;
    }
}

/// A run of durable sink `b` in its own node (a new process each time, as after a restart).
pub struct Run {
    pub node: Node,
    pub sink: DurableSink,
    pub client: ReplayClient,
}

impl Run {
    pub async fn start(reg: &RegistryClient, state: &Path) -> Result<(Run, Option<Vec<CatchUp>>)> {
        Run::start_with(reg, state, SinkOptions::new()).await
    }

    /// With these sink options (filters).
    pub async fn start_with(
        reg: &RegistryClient,
        state: &Path,
        opts: SinkOptions,
    ) -> Result<(Run, Option<Vec<CatchUp>>)> {
        let mut run = Run::open(reg, state, opts).await?;
        let items = run.sink.catch_up(&mut run.client, 0, Duration::from_secs(2), true).await?;
        Ok((run, items))
    }

    /// Its node, sink and replay client, without the catch-up a start does.
    pub async fn open(reg: &RegistryClient, state: &Path, opts: SinkOptions) -> Result<Run> {
        let node = Node::builder().registry_client(reg.clone()).start().await?;
        let ch = node.channel(CH).await?;
        let sink = DurableSink::open(ch.sink(opts)?, state, "b")?;
        let client = ReplayClient::open(&node, CH, &format!("{}-b", node.id())).await?;
        Ok(Run { node, sink, client })
    }

    /// Receives until `n` events were handed over (live or filled from the recorder), filling gaps as `kecho sub`
    /// does; returns the (payload) names of the events and the other items, in order, and how many gaps were filled.
    pub async fn take(&mut self, n: usize) -> Result<(Vec<String>, Vec<CatchUp>, usize)> {
        let (mut got, mut other, mut fills) = (Vec::new(), Vec::new(), 0);
        while got.len() < n {
            match tokio::time::timeout(T, self.sink.recv()).await.context("no event")? {
                Ok(ev) => got.push(String::from_utf8(ev.payload().to_vec())?),
                Err(kecho_store::DurableError::Behind(_)) => {
                    fills += 1;
                    let (events, rest) =
                        replayed(self.sink.fill(&mut self.client, 20, Duration::from_millis(100)).await?);
                    got.extend(events);
                    other.extend(rest);
                }
                Err(kecho_store::DurableError::Recv(kecho::RecvError::Lagged(k))) => other.push(CatchUp::Missed(k)),
                Err(e) => return Err(e.into()),
            }
        }
        self.sink.commit()?;
        Ok((got, other, fills))
    }

    /// Receives `n` live events; returns their (payload) names.
    pub async fn recv(&mut self, n: usize) -> Result<Vec<String>> {
        let mut got = Vec::new();
        while got.len() < n {
            let ev = tokio::time::timeout(T, self.sink.recv()).await.context("no event")??;
            got.push(String::from_utf8(ev.payload().to_vec())?);
        }
        self.sink.commit()?;
        Ok(got)
    }

    pub async fn stop(self) {
        drop(self.sink);
        drop(self.client);
        self.node.shutdown().await;
    }
}

/// A source in its own node, once `sinks` sinks are present.
pub struct Pub {
    pub node: Node,
    pub ch: kecho::Channel,
    pub src: kecho::Source,
}

impl Pub {
    pub async fn start(reg: &RegistryClient, sinks: usize) -> Result<Pub> {
        let node = Node::builder().registry_client(reg.clone()).start().await?;
        let ch = node.channel(CH).await?;
        ch.wait_for_sinks(sinks, T).await?;
        let src = ch.source()?;
        Ok(Pub { node, ch, src })
    }

    /// Event `name` of type `ty` with attribute `zone`.
    pub async fn send(&mut self, ty: &str, zone: &str, name: &str) -> Result<()> {
        let mut a = kecho::Attrs::default();
        a.set("zone", zone);
        self.src.submit(ty, &a, name.as_bytes()).await?;
        Ok(())
    }

    pub async fn stop(self) {
        drop(self.src);
        self.node.shutdown().await;
    }
}

/// A publisher in its own node: `n` events named `NAME-1`, ... once `sinks` sinks are present.
pub async fn publish(reg: &RegistryClient, name: &str, n: u64, sinks: usize) -> Result<()> {
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
pub fn replayed(items: Vec<CatchUp>) -> (Vec<String>, Vec<CatchUp>) {
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

pub fn names(name: &str, n: u64) -> Vec<String> {
    (1..=n).map(|i| format!("{name}-{i}")).collect()
}
