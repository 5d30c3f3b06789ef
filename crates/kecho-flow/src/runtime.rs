//! The runtime: the builder, the flow's threads, the sinks with their exception ladder, and the handle.
//!
//! A flow runs on its own thread (reading, transforming and, with one sink, writing run to completion on each
//! chunk, so a byte is read once into a pooled buffer and written once from it). A replicated stage adds worker
//! threads and a tail thread that puts chunks back in order; several sinks add one thread and one bounded queue per
//! sink, so that a slow sink never holds up the others (its queue's policy decides what happens to it instead).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::io::Errno;

use crate::endpoint::{self, Conn, DirectEnd, Listener, Method, Moved};
use crate::ladder::{Action, Decision, FaultKind, Ladder};
use crate::sched::{self, Reorder, StageLoad, TokenBucket};
use crate::spec::{Endpoint, EndpointSpec, FlowSpec, FullPolicy, Replicas, StageSpec, TransformSpec};
use crate::stage::{self, Chunk, Parallel, Pool, Stage, Work};
use crate::stats::{Call, FlowStats, StageStat, Timing};
use crate::FlowError;

/// A fault or a step of the exception ladder, as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowEvent {
    /// The flow.
    pub flow: u64,
    /// The ladder's rung (1 retry, 2 redirect, 3 notify, 4 fallback, 5 terminate); 0 for information.
    pub rung: u8,
    /// What happened, in a word: `retry`, `reconnected`, `resumed`, `redirect`, `notify`, `detached`, `fallback`,
    /// `terminated`.
    pub what: String,
    /// The endpoint concerned.
    pub endpoint: String,
    /// Details (the error).
    pub detail: String,
}

/// What the application is asked at rung 3.
pub type FaultCallback = Arc<dyn Fn(&FlowEvent) -> Decision + Send + Sync>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Entry point: `Flow::builder()` or `Flow::from_spec(&spec)`.
#[derive(Debug)]
pub struct Flow;

impl Flow {
    /// An empty builder.
    pub fn builder() -> FlowBuilder {
        FlowBuilder::default()
    }

    /// A builder holding a parsed spec.
    pub fn from_spec(spec: &FlowSpec) -> FlowBuilder {
        let mut b = FlowBuilder { source: Some(spec.source.clone()), ..Default::default() };
        b.stages = spec.stages.clone();
        b.sinks = spec.sinks.clone();
        b.priority = spec.priority;
        b.rate = spec.rate;
        b.chunk = spec.chunk;
        b
    }
}

/// Builds and starts a flow.
pub struct FlowBuilder {
    name: Option<String>,
    source: Option<EndpointSpec>,
    stages: Vec<StageSpec>,
    sinks: Vec<EndpointSpec>,
    priority: u32,
    rate: Option<u64>,
    chunk: usize,
    on_fault: Option<FaultCallback>,
    notify: Option<kecho::Source>,
    channel_in: HashMap<String, kecho::Sink>,
    channel_out: HashMap<String, kecho::Source>,
    app_out: HashMap<String, AppSink>,
    scheduler: Option<Arc<Scheduler>>,
    planner: Option<ReplicaPlanner>,
    warm_up_bytes: u64,
}

/// Decides `replicas=auto` once the flow has warmed up ([`WARM_UP_BYTES`]): given the stages' loads, the wall time
/// so far, how many stages run on the flow's thread, and the cores the flow can count on, the stage to replicate
/// and how many replicas (1: a thread of its own). The default is [`sched::plan_replicas`].
pub type ReplicaPlanner =
    Arc<dyn Fn(&[StageLoad], Duration, usize, sched::Capacity) -> Option<(usize, usize)> + Send + Sync>;

/// Bytes a flow with `replicas=auto` reads before it asks its [`ReplicaPlanner`] (at the end of the chunk that
/// reaches them). A byte count, not a chunk count, so that the chunk size (`chunk=`) does not change when the
/// decision comes or how much it has seen. [`FlowBuilder::warm_up_bytes`] changes it for one flow.
pub const WARM_UP_BYTES: u64 = 16 << 20;

/// The built-in planner is asked no earlier than this either: it reads the machine's idle cores from /proc/stat,
/// which counts in ticks of 10 ms, so the 16 MiB of a fast flow (~20 ms) would give it two or three ticks per core
/// to judge by. An application's own planner is asked after [`WARM_UP_BYTES`] alone.
pub const WARM_UP_TIME: Duration = Duration::from_millis(200);

/// True once a flow that read `bytes` in `elapsed` has warmed up: at least `min_bytes` read and `min_time` passed.
/// Whatever the chunk size, the answer for the same bytes and time is the same.
pub fn warmed_up(bytes: u64, elapsed: Duration, min_bytes: u64, min_time: Duration) -> bool {
    bytes >= min_bytes && elapsed >= min_time
}

impl Default for FlowBuilder {
    fn default() -> Self {
        FlowBuilder {
            name: None,
            source: None,
            stages: Vec::new(),
            sinks: Vec::new(),
            priority: 1,
            rate: None,
            chunk: crate::spec::DEFAULT_CHUNK,
            on_fault: None,
            notify: None,
            channel_in: HashMap::new(),
            channel_out: HashMap::new(),
            app_out: HashMap::new(),
            scheduler: None,
            planner: None,
            warm_up_bytes: WARM_UP_BYTES,
        }
    }
}

impl std::fmt::Debug for FlowBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowBuilder").field("source", &self.source).field("stages", &self.stages).finish()
    }
}

impl From<Endpoint> for EndpointSpec {
    fn from(e: Endpoint) -> Self {
        EndpointSpec::new(e)
    }
}

impl From<TransformSpec> for StageSpec {
    fn from(t: TransformSpec) -> Self {
        StageSpec { transform: t, replicas: Replicas::Fixed(1) }
    }
}

impl FlowBuilder {
    /// A name for stats (default: the stages joined like a spec).
    pub fn name(mut self, n: impl Into<String>) -> Self {
        self.name = Some(n.into());
        self
    }
    /// The source.
    pub fn source(mut self, e: impl Into<EndpointSpec>) -> Self {
        self.source = Some(e.into());
        self
    }
    /// Appends a transform.
    pub fn transform(mut self, t: impl Into<StageSpec>) -> Self {
        self.stages.push(t.into());
        self
    }
    /// Adds a sink (several: fan-out, one queue each).
    pub fn sink(mut self, e: impl Into<EndpointSpec>) -> Self {
        self.sinks.push(e.into());
        self
    }
    /// Priority (shares of a scheduler's budget).
    pub fn priority(mut self, p: u32) -> Self {
        self.priority = p.max(1);
        self
    }
    /// Rate limit, bytes per second.
    pub fn rate(mut self, r: Option<u64>) -> Self {
        self.rate = r;
        self
    }
    /// Source read size.
    pub fn chunk(mut self, n: usize) -> Self {
        self.chunk = n.clamp(4096, 64 << 20);
        self
    }
    /// Rung 3: called when the ladder has nothing left to try; its answer decides.
    pub fn on_fault(mut self, f: impl Fn(&FlowEvent) -> Decision + Send + Sync + 'static) -> Self {
        self.on_fault = Some(Arc::new(f));
        self
    }
    /// Every ladder event is also submitted on this kecho channel source as a `flow.event` (JSON payload).
    pub fn notify_channel(mut self, s: kecho::Source) -> Self {
        self.notify = Some(s);
        self
    }
    /// The kecho sink that a `kecho:NAME` source endpoint reads events from.
    pub fn channel_source(mut self, name: impl Into<String>, sink: kecho::Sink) -> Self {
        self.channel_in.insert(name.into(), sink);
        self
    }
    /// The kecho source that a `kecho:NAME` sink endpoint submits to.
    pub fn channel_sink(mut self, name: impl Into<String>, source: kecho::Source) -> Self {
        self.channel_out.insert(name.into(), source);
        self
    }
    /// The function that an `app:NAME` sink endpoint calls with the flow's output, one call per record or read, in
    /// order, on a thread of the flow's. An `Err` terminates the flow with that reason (rung 5).
    pub fn app_sink(
        mut self,
        name: impl Into<String>,
        f: impl FnMut(&[u8]) -> Result<(), String> + Send + 'static,
    ) -> Self {
        self.app_out.insert(name.into(), Box::new(f));
        self
    }
    /// Registers the flow with a scheduler (priorities share its budget).
    pub fn scheduler(mut self, s: Arc<Scheduler>) -> Self {
        self.scheduler = Some(s);
        self
    }

    /// Replaces the decision `replicas=auto` takes after its warm-up (default: [`sched::plan_replicas`] on the
    /// cores the machine has free). For tests and for applications that know their machine better: a planner that
    /// always answers forces the split, whatever the cores.
    pub fn replica_planner(
        mut self,
        f: impl Fn(&[StageLoad], Duration, usize, sched::Capacity) -> Option<(usize, usize)> + Send + Sync + 'static,
    ) -> Self {
        self.planner = Some(Arc::new(f));
        self
    }

    /// Bytes `replicas=auto` reads before it asks the planner (default [`WARM_UP_BYTES`]): less for short flows,
    /// more to judge a slowly varying one. The built-in planner also waits [`WARM_UP_TIME`].
    pub fn warm_up_bytes(mut self, n: u64) -> Self {
        self.warm_up_bytes = n;
        self
    }

    /// Starts the flow on its own threads. Files named in the spec are read and listeners bound here, so that
    /// configuration errors come back at once.
    pub fn start(mut self) -> Result<FlowHandle, FlowError> {
        let source = self.source.take().ok_or_else(|| FlowError::Config("a flow needs a source".into()))?;
        if let Endpoint::App(n) = &source.endpoint {
            return Err(FlowError::Config(format!(
                "app:{n} is a sink only (a flow's source is a kernel or kecho object)"
            )));
        }
        if let Some(n) = self.sinks.iter().find_map(|s| match &s.endpoint {
            Endpoint::App(n) if !self.app_out.contains_key(n) => Some(n),
            _ => None,
        }) {
            return Err(FlowError::Config(format!("no function given for app:{n} (FlowBuilder::app_sink)")));
        }
        if self.sinks.is_empty() {
            return Err(FlowError::Config("a flow needs at least one sink".into()));
        }
        if source.direct {
            return Err(FlowError::Config("`direct` is an option of a file sink, not of a source".into()));
        }
        if source.sendfile {
            return Err(FlowError::Config("`sendfile` is an option of a socket sink, not of a source".into()));
        }
        if let Some(s) = self.sinks.iter().find(|s| s.sendfile && !s.endpoint.is_socket()) {
            return Err(FlowError::Config(format!("`sendfile` is for socket sinks, not {}", s.endpoint)));
        }
        if let Some(d) = self.sinks.iter().find(|s| s.direct) {
            let why = if self.sinks.len() > 1 {
                Some("a flow with several sinks")
            } else if d.append {
                Some("an `append` sink (O_DIRECT writes whole blocks at block offsets)")
            } else if d.force_copy {
                Some("a `copy` sink")
            } else if matches!(source.endpoint, Endpoint::Channel(_)) {
                Some("a kecho channel source")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(FlowError::Config(format!(
                    "`direct` (on {}) is for a flow with one file sink, not {why}",
                    d.endpoint
                )));
            }
        }
        let mut stages = Vec::new();
        for s in &self.stages {
            stages.push(stage::build(&s.transform)?);
        }
        let name = self.name.clone().unwrap_or_else(|| {
            let mut parts = vec![source.endpoint.to_string()];
            parts.extend(self.stages.iter().map(|s| s.transform.name()));
            parts.push(self.sinks.iter().map(|s| s.endpoint.to_string()).collect::<Vec<_>>().join(" "));
            parts.join(" ! ")
        });
        let listener = Listener::bind(&source.endpoint)
            .map_err(|e| FlowError::Io { what: format!("bind {}", source.endpoint), source: e })?;
        let local_addr = listener.as_ref().and_then(|l| l.local_addr());
        let mut stats = vec![StageStat::new(source.endpoint.to_string(), "source", false)];
        for (s, st) in self.stages.iter().zip(&stages) {
            stats.push(StageStat::new(s.transform.name(), "transform", st.parallel().is_some()));
        }
        for s in &self.sinks {
            stats.push(StageStat::new(s.endpoint.to_string(), "sink", false));
        }
        let now = Instant::now();
        let sh = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            stop: AtomicBool::new(false),
            stats,
            path: Mutex::new("starting".into()),
            state: Mutex::new("running".into()),
            started: now,
            ended: Mutex::new(None),
            priority: AtomicU32::new(self.priority),
            own_rate: Mutex::new(self.rate),
            bucket: Mutex::new(self.rate.map(|r| TokenBucket::new(r, (r / 10).max(self.chunk as u64), now))),
            interrupters: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
            on_fault: self.on_fault.take(),
            notify: Mutex::new(self.notify.take()),
            results: Mutex::new(Vec::new()),
            scheduler: self.scheduler.as_ref().map(Arc::downgrade),
            warm_up: if self.planner.is_some() { Duration::ZERO } else { WARM_UP_TIME },
            warm_up_bytes: self.warm_up_bytes,
            planner: self.planner.take().unwrap_or_else(|| Arc::new(sched::plan_replicas)),
            source_child: Mutex::new(None),
        });
        if let Some(s) = &self.scheduler {
            s.flows.lock().push(Arc::downgrade(&sh));
            s.rebalance();
        }
        let ctx = Ctx {
            source,
            listener,
            specs: self.stages.clone(),
            stages,
            sinks: self.sinks.clone(),
            chunk: self.chunk,
            channel_in: std::mem::take(&mut self.channel_in),
            channel_out: std::mem::take(&mut self.channel_out),
            app_out: std::mem::take(&mut self.app_out),
        };
        let sh2 = sh.clone();
        let join = std::thread::Builder::new()
            .name(format!("kecho-flow-{}", sh.id))
            .spawn(move || {
                let r = run(&sh2, ctx);
                *sh2.ended.lock() = Some(Instant::now());
                *sh2.state.lock() = match &r {
                    Ok(()) => "done".into(),
                    Err(FlowError::Stopped) => "stopped".into(),
                    Err(e) => format!("failed: {e}"),
                };
                r
            })
            .map_err(|e| FlowError::Io { what: "spawn the flow thread".into(), source: e })?;
        Ok(FlowHandle { sh, join: Some(join), local_addr })
    }
}

/// Shares a byte budget among flows by priority.
#[derive(Debug, Default)]
pub struct Scheduler {
    flows: Mutex<Vec<Weak<Shared>>>,
    budget: Mutex<Option<u64>>,
}

impl Scheduler {
    /// A scheduler; `budget` bytes/s shared by its flows (None: flows are limited only by their own rates).
    pub fn new(budget: Option<u64>) -> Arc<Self> {
        Arc::new(Scheduler { flows: Mutex::new(Vec::new()), budget: Mutex::new(budget) })
    }

    /// Changes the budget.
    pub fn set_budget(&self, b: Option<u64>) {
        *self.budget.lock() = b;
        self.rebalance();
    }

    /// Recomputes every flow's rate from the budget, the priorities and the flows' own limits.
    pub fn rebalance(&self) {
        let mut flows = self.flows.lock();
        flows.retain(|w| w.upgrade().is_some_and(|f| f.ended.lock().is_none()));
        let live: Vec<Arc<Shared>> = flows.iter().filter_map(Weak::upgrade).collect();
        drop(flows);
        let now = Instant::now();
        let Some(budget) = *self.budget.lock() else {
            for f in &live {
                f.apply_rate(*f.own_rate.lock(), now);
            }
            return;
        };
        let want: Vec<(u32, u64)> =
            live.iter().map(|f| (f.priority.load(Ordering::Relaxed), f.own_rate.lock().unwrap_or(budget))).collect();
        for (f, share) in live.iter().zip(sched::fair_shares(budget, &want)) {
            f.apply_rate(Some(share.max(1)), now);
        }
    }
}

/// State shared by a flow's threads and its handle.
pub struct Shared {
    id: u64,
    name: String,
    stop: AtomicBool,
    stats: Vec<StageStat>,
    path: Mutex<String>,
    state: Mutex<String>,
    started: Instant,
    ended: Mutex<Option<Instant>>,
    priority: AtomicU32,
    own_rate: Mutex<Option<u64>>,
    bucket: Mutex<Option<TokenBucket>>,
    interrupters: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    events: Mutex<Vec<FlowEvent>>,
    on_fault: Option<FaultCallback>,
    notify: Mutex<Option<kecho::Source>>,
    results: Mutex<Vec<String>>,
    scheduler: Option<Weak<Scheduler>>,
    planner: ReplicaPlanner,
    /// The least time before `replicas=auto` asks the planner (besides [`WARM_UP_BYTES`]).
    warm_up: Duration,
    /// The bytes read before `replicas=auto` asks the planner.
    warm_up_bytes: u64,
    /// An `exec:` source's process (its pid and the endpoint), whose exit status the flow checks once its output ended.
    source_child: Mutex<Option<(u32, String)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("id", &self.id).field("name", &self.name).finish()
    }
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn apply_rate(&self, r: Option<u64>, now: Instant) {
        let mut b = self.bucket.lock();
        match (r, b.as_mut()) {
            (None, _) => *b = None,
            (Some(r), Some(tb)) => tb.set_rate(r, now),
            (Some(r), None) => *b = Some(TokenBucket::new(r, (r / 10).max(64 << 10), now)),
        }
    }

    /// Waits as the rate limit requires before moving `n` bytes; true if it slept.
    fn pace(&self, n: usize) -> bool {
        let wait = match self.bucket.lock().as_mut() {
            Some(b) => b.take(n as u64, Instant::now()),
            None => return false,
        };
        if !wait.is_zero() {
            endpoint::sleep_unless(&self.stop, wait);
        }
        !wait.is_zero()
    }

    fn interrupt_on_stop(&self, c: &Conn) {
        if let Some(f) = c.interrupter() {
            self.interrupters.lock().push(f);
        }
        // A stop that raced with the connection still takes effect.
        if self.stopped() {
            for f in self.interrupters.lock().iter() {
                f();
            }
        }
    }

    /// Records an event, tells the channel, and at rung 3 asks the application.
    fn event(&self, rung: u8, what: &str, endpoint: &str, detail: String) -> Decision {
        let ev = FlowEvent { flow: self.id, rung, what: what.into(), endpoint: endpoint.into(), detail };
        tracing::info!(flow = self.id, rung, what, endpoint, "{}", ev.detail);
        self.events.lock().push(ev.clone());
        if let Some(src) = self.notify.lock().as_mut() {
            if let Ok(json) = serde_json::to_vec(&ev) {
                let _ = src.try_submit("flow.event", &kecho::Attrs::new(), &json);
            }
        }
        match (&self.on_fault, rung) {
            (Some(cb), 3) => cb(&ev),
            _ => Decision::Terminate,
        }
    }

    fn snapshot(&self) -> FlowStats {
        let end = self.ended.lock().unwrap_or_else(Instant::now);
        let wall = end.saturating_duration_since(self.started);
        let stages: Vec<_> = self.stats.iter().map(|s| s.snapshot(wall)).collect();
        let loads: Vec<StageLoad> = self.stats.iter().map(StageStat::load).collect();
        let sinks = stages.iter().filter(|s| s.kind == "sink");
        FlowStats {
            id: self.id,
            name: self.name.clone(),
            state: self.state.lock().clone(),
            path: self.path.lock().clone(),
            elapsed_s: wall.as_secs_f64(),
            bytes_in: stages[0].bytes_in,
            bytes_out: sinks.map(|s| s.bytes_out).sum(),
            user_copied: stages.iter().map(|s| s.copied).sum(),
            syscalls: stages.iter().map(|s| s.syscalls).sum(),
            priority: self.priority.load(Ordering::Relaxed),
            rate: *self.own_rate.lock(),
            effective_rate: self.bucket.lock().as_ref().map(TokenBucket::rate),
            bound: sched::bound(&loads, wall).map(|i| stages[i].name.clone()),
            stages,
            results: self.results.lock().clone(),
        }
    }
}

/// A running flow.
#[derive(Debug)]
pub struct FlowHandle {
    sh: Arc<Shared>,
    join: Option<JoinHandle<Result<(), FlowError>>>,
    local_addr: Option<std::net::SocketAddr>,
}

impl FlowHandle {
    /// The flow's id.
    pub fn id(&self) -> u64 {
        self.sh.id
    }
    /// The address a `tcp-listen` source is bound to.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.local_addr
    }
    /// Counters now.
    pub fn stats(&self) -> FlowStats {
        self.sh.snapshot()
    }
    /// Events so far (the ladder's steps).
    pub fn events(&self) -> Vec<FlowEvent> {
        self.sh.events.lock().clone()
    }
    /// True once the flow ended.
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }
    /// Changes the priority.
    pub fn set_priority(&self, p: u32) {
        self.watcher().set_priority(p);
    }
    /// Changes the rate limit.
    pub fn set_rate(&self, r: Option<u64>) {
        self.watcher().set_rate(r);
    }
    /// Asks the flow to stop (blocked reads and writes on sockets and children are interrupted).
    pub fn stop(&self) {
        self.watcher().stop();
    }
    /// Waits for the end; the final counters, or why the flow failed.
    pub fn wait(mut self) -> Result<FlowStats, FlowError> {
        let r = match self.join.take() {
            Some(j) => j.join().unwrap_or_else(|_| Err(FlowError::Transform("the flow thread panicked".into()))),
            None => Ok(()),
        };
        self.watcher().rebalance();
        r.map(|()| self.sh.snapshot())
    }
    /// A handle to the counters that outlives this handle (for a control socket).
    pub fn watcher(&self) -> FlowWatcher {
        FlowWatcher(self.sh.clone())
    }
}

/// A cloneable remote control of a flow (counters, priority, rate, stop), e.g. for a control socket.
#[derive(Debug, Clone)]
pub struct FlowWatcher(Arc<Shared>);

impl FlowWatcher {
    /// The flow's id.
    pub fn id(&self) -> u64 {
        self.0.id
    }
    /// Counters now.
    pub fn stats(&self) -> FlowStats {
        self.0.snapshot()
    }
    /// Events so far (the ladder's steps and the scheduler's decisions), also after the flow ended.
    pub fn events(&self) -> Vec<FlowEvent> {
        self.0.events.lock().clone()
    }
    /// See [`FlowHandle::stop`].
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::Release);
        for f in self.0.interrupters.lock().iter() {
            f();
        }
    }
    /// See [`FlowHandle::set_priority`].
    pub fn set_priority(&self, p: u32) {
        self.0.priority.store(p.max(1), Ordering::Relaxed);
        self.rebalance();
    }
    /// See [`FlowHandle::set_rate`].
    pub fn set_rate(&self, r: Option<u64>) {
        *self.0.own_rate.lock() = r;
        self.0.apply_rate(r, Instant::now());
        self.rebalance();
    }
    fn rebalance(&self) {
        if let Some(s) = self.0.scheduler.as_ref().and_then(Weak::upgrade) {
            s.rebalance();
        }
    }
}

struct Ctx {
    source: EndpointSpec,
    listener: Option<Listener>,
    specs: Vec<StageSpec>,
    stages: Vec<Box<dyn Stage>>,
    sinks: Vec<EndpointSpec>,
    chunk: usize,
    channel_in: HashMap<String, kecho::Sink>,
    channel_out: HashMap<String, kecho::Source>,
    app_out: HashMap<String, AppSink>,
}

/// The application's own sink function (`app:NAME`).
type AppSink = Box<dyn FnMut(&[u8]) -> Result<(), String> + Send>;

enum SourceIo {
    Fd(Conn),
    Channel(kecho::Sink),
}

fn io_err(what: impl std::fmt::Display, e: io::Error) -> FlowError {
    FlowError::Io { what: what.to_string(), source: e }
}

/// How long a flow waits, once its `exec:` source's output ended, for the process's exit status.
const SOURCE_EXIT_WAIT: Duration = Duration::from_secs(5);

/// Runs the flow; a flow whose `exec:` source failed (exit status other than 0, or killed by a signal) fails, even
/// though everything it read was moved: the process may not have produced all of its output.
fn run(sh: &Arc<Shared>, ctx: Ctx) -> Result<(), FlowError> {
    let r = run_flow(sh, ctx);
    match sh.source_child.lock().take() {
        Some((pid, ep)) if r.is_ok() => source_exit(pid, &ep),
        _ => r,
    }
}

/// The exit status of an `exec:` source whose output ended (the process is reaped here).
fn source_exit(pid: u32, ep: &str) -> Result<(), FlowError> {
    let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return Ok(()) };
    let until = Instant::now() + SOURCE_EXIT_WAIT;
    let failed = |why: String| Err(io_err(format!("source {ep}"), io::Error::other(why)));
    loop {
        match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
            Ok(Some((_, st))) => {
                return match (st.exit_status(), st.terminating_signal()) {
                    (Some(0), _) => Ok(()),
                    (Some(code), _) => failed(format!("the source process exited with status {code}")),
                    (None, Some(sig)) => failed(format!("the source process was killed by signal {sig}")),
                    (None, None) => Ok(()),
                };
            }
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                // It closed its output and goes on (a daemon, say): what it wrote was all moved.
                tracing::warn!(source = ep, "the source process closed its output but has not exited");
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(source = ep, "no exit status for the source process: {e}");
                return Ok(());
            }
        }
    }
}

fn run_flow(sh: &Arc<Shared>, mut ctx: Ctx) -> Result<(), FlowError> {
    let src = match (&ctx.listener, &ctx.source.endpoint) {
        (Some(l), ep) => match l.accept(&sh.stop) {
            Ok(c) => SourceIo::Fd(c),
            Err(_) if sh.stopped() => return Err(FlowError::Stopped),
            Err(e) => return Err(io_err(format!("accept on {ep}"), e)),
        },
        (None, Endpoint::Channel(n)) => SourceIo::Channel(
            ctx.channel_in.remove(n).ok_or_else(|| FlowError::Config(format!("no kecho sink given for kecho:{n}")))?,
        ),
        (None, ep) => SourceIo::Fd(endpoint::open(ep, false, false).map_err(|e| io_err(format!("open {ep}"), e))?),
    };
    drop(ctx.listener.take());
    if let SourceIo::Fd(c) = &src {
        sh.interrupt_on_stop(c);
        if let Conn::ChildOut(child, _) = c {
            *sh.source_child.lock() = Some((child.id(), ctx.source.endpoint.to_string()));
        }
    }
    let t = ctx.stages.len();
    // A file sent untransformed to one sink goes by sendfile, which can resume a dropped connection at any offset
    // the peer names: its sink takes the peer's offset rather than replaying from user memory.
    let zc_file = t == 0
        && ctx.sinks.len() == 1
        && !ctx.source.force_copy
        && !ctx.sinks[0].force_copy
        && matches!(&src, SourceIo::Fd(c) if c.is_file());
    let mut sinks = Vec::new();
    for (j, spec) in ctx.sinks.iter().enumerate() {
        let io = match &spec.endpoint {
            Endpoint::Channel(n) => Some(SinkIo::Channel(
                ctx.channel_out
                    .remove(n)
                    .ok_or_else(|| FlowError::Config(format!("no kecho source given for kecho:{n}")))?,
                spec.event_type.clone(),
            )),
            Endpoint::App(n) => Some(SinkIo::App(
                ctx.app_out.remove(n).ok_or_else(|| FlowError::Config(format!("no function given for app:{n}")))?,
            )),
            _ => None,
        };
        let mut s = SinkRt::new(sh.clone(), spec.clone(), 1 + t + j, io);
        s.zero_copy = zc_file;
        if s.io.is_none() {
            s.connect_or_recover()?;
        }
        sinks.push(s);
    }
    // O_DIRECT (`direct`, checked at start: one file sink) without a transform: one copy per byte into aligned buffers,
    // none into the page cache; a file system that refuses O_DIRECT gets the zero-copy path instead (rung 4).
    if t == 0 && ctx.sinks.len() == 1 && ctx.sinks[0].direct {
        if let (SourceIo::Fd(s), Some(SinkIo::Fd(d))) = (&src, &sinks[0].io) {
            *sh.path.lock() = "direct (reads into aligned buffers, O_DIRECT writes)".into();
            let mut pace = |n| {
                sh.pace(n);
            };
            // Buffers of `chunk=` bytes (default 1 MiB), at least 64 KiB.
            let step = ctx.chunk.max(64 << 10);
            let end =
                endpoint::direct_move(s, d, &sh.stop, step, &mut pace, &sh.stats[0], &sh.stats[1]).map_err(|e| {
                    io_err(format!("O_DIRECT move from {} to {}", ctx.source.endpoint, ctx.sinks[0].endpoint), e)
                })?;
            match end {
                DirectEnd::Done { direct, buffered } => {
                    sh.results.lock().push(format!(
                        "{}: {direct} bytes written with O_DIRECT, {buffered} through the page cache (the unaligned end)",
                        ctx.sinks[0].endpoint
                    ));
                    return sinks.remove(0).close();
                }
                DirectEnd::Stopped => return Err(FlowError::Stopped),
                DirectEnd::Refused(e) => {
                    sh.event(
                        4,
                        "fallback",
                        &ctx.sinks[0].endpoint.to_string(),
                        format!("O_DIRECT: {e}; splicing instead"),
                    );
                    *sh.path.lock() = "starting".into();
                }
            }
        }
    }
    // The zero-copy path: no transform, one sink, two kernel objects.
    if t == 0 && sinks.len() == 1 && !ctx.source.force_copy && !ctx.sinks[0].force_copy {
        // Held apart while the sink's connection is borrowed; put back before the sink is written or closed.
        let mut prealloc = sinks[0].prealloc.take();
        if let (SourceIo::Fd(s), Some(SinkIo::Fd(d))) = (&src, &sinks[0].io) {
            let method = Method::choose(s, d);
            *sh.path.lock() = method.name().into();
            let mut pace = |n| {
                sh.pace(n);
            };
            let step = ctx.chunk.max(1 << 20);
            let moved = if method == Method::Sendfile {
                sinks[0].prealloc = prealloc.take();
                sendfile_with_ladder(sh, s, &mut sinks[0], step)?
            } else {
                let (stats, p) = (&sh.stats, prealloc.as_mut());
                let r = endpoint::zero_copy(s, d, method, &sh.stop, step, &mut pace, &stats[0], &stats[1], p);
                sinks[0].prealloc = prealloc.take();
                r.map_err(|e| {
                    io_err(format!("{} from {} to {}", method.name(), ctx.source.endpoint, ctx.sinks[0].endpoint), e)
                })?
            };
            match moved {
                Moved::Done => {
                    let s0 = sinks.remove(0);
                    return s0.close();
                }
                Moved::Stopped => return Err(FlowError::Stopped),
                Moved::Unsupported(e) => {
                    // The copying path starts where the peer stands (a resumed peer may hold a prefix already).
                    let at = sinks[0].peer_has.take().unwrap_or(0);
                    sinks[0].zero_copy = false;
                    if at > 0 {
                        rustix::fs::seek(s.fd(), rustix::fs::SeekFrom::Start(at))
                            .map_err(|e| io_err("seek the source to the peer's offset", e.into()))?;
                        sinks[0].written = at;
                    }
                    sh.event(
                        4,
                        "fallback",
                        &ctx.sinks[0].endpoint.to_string(),
                        format!("{}: {e}; copying instead", method.name()),
                    );
                    *sh.path.lock() = format!("copy (fallback: {} refused: {e})", method.name());
                }
            }
        }
        if prealloc.is_some() {
            sinks[0].prealloc = prealloc;
        }
    }
    // Zero-copy fan-out: no transform, several sinks, all kernel objects, none resuming (resume keeps the bytes).
    let tee_ok = t == 0
        && sinks.len() > 1
        && !ctx.source.force_copy
        && matches!(src, SourceIo::Fd(_))
        && sinks.iter().all(|s| !s.spec.force_copy && !s.spec.resume && matches!(s.io, Some(SinkIo::Fd(_))));
    if tee_ok {
        if let SourceIo::Fd(s) = &src {
            *sh.path.lock() = "zero-copy (splice + tee)".into();
            return tee_fan_out(sh, s, sinks, ctx.chunk.max(1 << 20));
        }
    }
    if sh.path.lock().as_str() == "starting" {
        *sh.path.lock() = "copy".into();
    }
    pipeline(sh, src, ctx.specs, ctx.stages, sinks, ctx.chunk)
}

/// The zero-copy move of a file to one sink by `sendfile`, with the sink's exception ladder: a dropped connection
/// is re-established (retries, alternates, the application's decision) and, with `resume`, the file is sent again
/// from the offset the new connection's peer names, since a file can be read at any offset without keeping a byte.
/// A peer that already holds a prefix when the flow starts (a restarted transfer) gets only the rest.
fn sendfile_with_ladder(sh: &Arc<Shared>, src: &Conn, sink: &mut SinkRt, step: usize) -> Result<Moved, FlowError> {
    // `off`: the file offset read so far; `piped`: bytes of it still in the flow's pipe (not yet on the socket), so
    // the peer has been sent `off - piped`.
    let mut off = sink.peer_has.take().unwrap_or(0);
    let mut piped = 0usize;
    if off > 0 {
        sh.event(1, "resumed", &sink.current.to_string(), format!("at byte {off}, 0 bytes sent again"));
    }
    // To a socket the file goes through the flow's own pipe of up to 1 MiB (`splice` in, `splice` out with
    // SPLICE_F_MORE): `sendfile` goes through the task's internal pipe of 64 KiB, i.e. 16 rounds of page lookups and
    // socket sends per MiB. The sink's `sendfile` option keeps `sendfile` (to compare the two in one run).
    let mut pipe = match &sink.io {
        Some(SinkIo::Fd(d)) if d.is_socket() && !sink.spec.sendfile => file_pipe(step),
        _ => None,
    };
    if pipe.is_some() {
        *sh.path.lock() = "zero-copy (splice through a pipe)".into();
    }
    let mut total = 0u64;
    // Nagle's algorithm stays on while the file streams: with TCP_NODELAY (which a sink sets so that records go out
    // at once) the kernel pushes the tail of every call as a segment of its own, about 10% more CPU per GB on
    // loopback. Set again at the end, which sends what is left at once.
    let mut streaming = false;
    loop {
        if sh.stopped() {
            return Ok(Moved::Stopped);
        }
        let r = match &sink.io {
            Some(SinkIo::Fd(d)) => {
                if !streaming {
                    let _ = d.set_nodelay(false);
                    streaming = true;
                }
                match &pipe {
                    Some(p) => splice_file_step(sh, src, d, p, &mut off, &mut piped, step),
                    None => {
                        sh.pace(step);
                        let t = Timing::start();
                        sh.stats[0].call(Call::Sendfile);
                        let r = rustix::fs::sendfile(d.fd(), src.fd(), Some(&mut off), step);
                        sh.stats[0].busy(&t);
                        r
                    }
                }
            }
            _ => {
                sink.connect_or_recover()?;
                streaming = false;
                if let Some(has) = sink.peer_has.take() {
                    // A resuming peer names its offset: what is in the pipe is not what it needs next.
                    if piped > 0 {
                        pipe = file_pipe(step);
                        piped = 0;
                    }
                    off = has;
                }
                continue;
            }
        };
        if let (Ok(0), Some(SinkIo::Fd(d))) = (&r, &sink.io) {
            let _ = d.set_nodelay(true);
        }
        let e = match r {
            Ok(0) if sh.stopped() => return Ok(Moved::Stopped),
            Ok(0) if !sink.spec.resume => return Ok(Moved::Done),
            // A resuming peer confirms the end by closing its side; a reset means it lost the tail: resume.
            Ok(0) => match &sink.io {
                Some(SinkIo::Fd(d)) => match d.close_confirmed() {
                    Ok(()) => return Ok(Moved::Done),
                    Err(e) => e,
                },
                _ => return Ok(Moved::Done),
            },
            Ok(n) => {
                total += n as u64;
                if pipe.is_none() {
                    sh.stats[0].moved(n, n);
                }
                sink.stat().moved(n, n);
                sink.written += n as u64;
                sink.ladder.succeeded();
                continue;
            }
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) if total == 0 && piped == 0 && endpoint::unsupported(e) => return Ok(Moved::Unsupported(e.into())),
            Err(e) => io::Error::from(e),
        };
        if sh.stopped() {
            return Ok(Moved::Stopped);
        }
        if !connection_fault(&e) {
            let how = if pipe.is_some() { "splice" } else { "sendfile" };
            return Err(io_err(format!("{how} to {}", sink.current), e));
        }
        sink.io = None;
        sink.recover(e)?;
        let sent = off - piped as u64;
        if sink.spec.resume {
            let has = sink.peer_has.take().unwrap_or(0);
            if has > sent {
                let reason = format!("cannot resume: the peer holds {has} bytes, {sent} were sent");
                sh.event(5, "terminated", &sink.current.to_string(), reason.clone());
                return Err(FlowError::Terminated { endpoint: sink.current.to_string(), reason });
            }
            sh.event(
                1,
                "resumed",
                &sink.current.to_string(),
                format!("at byte {has}, {} bytes sent again", sent - has),
            );
            if piped > 0 {
                pipe = file_pipe(step);
                piped = 0;
            }
            off = has;
        }
    }
}

/// The flow's pipe for moving a file to a socket: as large as `step` allows, up to 1 MiB (the unprivileged
/// `pipe-max-size`); `None` if no pipe can be made (then `sendfile`).
fn file_pipe(step: usize) -> Option<(rustix::fd::OwnedFd, rustix::fd::OwnedFd)> {
    let (r, w) = rustix::pipe::pipe().ok()?;
    let _ = rustix::pipe::fcntl_setpipe_size(&w, step.min(1 << 20));
    Some((r, w))
}

/// One step of a file sent through the flow's pipe: when the pipe is empty, `splice` up to `step` bytes of the
/// file at `off` into it (the page references, no copy); then `splice` what it holds to the socket until it is
/// empty. Returns the bytes put on the socket (0 at the end of the file with the pipe empty); on an error `piped`
/// holds what is still in the pipe, so that a new connection gets those bytes first.
fn splice_file_step(
    sh: &Shared,
    src: &Conn,
    dst: &Conn,
    (r, w): &(rustix::fd::OwnedFd, rustix::fd::OwnedFd),
    off: &mut u64,
    piped: &mut usize,
    step: usize,
) -> rustix::io::Result<usize> {
    use rustix::pipe::SpliceFlags;
    let flags = SpliceFlags::MOVE | SpliceFlags::MORE;
    if *piped == 0 {
        sh.pace(step);
        let t = Timing::start();
        sh.stats[0].call(Call::Splice);
        let n = rustix::pipe::splice(src.fd(), Some(off), w, None, step, flags);
        sh.stats[0].busy(&t);
        let n = n?;
        sh.stats[0].moved(n, n);
        *piped = n;
    }
    let mut sent = 0;
    while *piped > 0 {
        let t = Timing::start();
        sh.stats[0].call(Call::Splice);
        let m = rustix::pipe::splice(r, None, dst.fd(), None, *piped, flags);
        sh.stats[0].busy(&t);
        match m {
            Ok(0) => return Err(Errno::PIPE),
            Ok(m) => {
                *piped -= m;
                sent += m;
            }
            Err(Errno::INTR) => continue,
            // Bytes already on the socket count; the error comes back at the next step.
            Err(_) if sent > 0 => return Ok(sent),
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Pipe size of each sink in a zero-copy fan-out (at most: its `queue=`); 1 MiB is the limit an unprivileged
/// process may set by default (`/proc/sys/fs/pipe-max-size`).
const TEE_PIPE: usize = 1 << 20;

/// How long a fan-out sink's pipe may stay full while another sink waits for it before its `full=` policy applies.
const TEE_GRACE: Duration = Duration::from_millis(500);

/// One sink of a zero-copy fan-out: its pipe's write end (the flow thread `tee`s into it) and its thread, which
/// `splice`s from the pipe's read end into the sink.
struct TeeSink {
    w: Option<rustix::fd::OwnedFd>,
    stat: usize,
    name: String,
    full: FullPolicy,
    /// Bytes of the flow's pipe this sink already has (the pipe is consumed once every live sink has them).
    pos: usize,
    /// Since when its pipe has been full.
    full_since: Option<Instant>,
    thread: Option<JoinHandle<Result<(), FlowError>>>,
}

/// Zero-copy fan-out: the source is spliced into a pipe, `tee` duplicates the pipe's pages (references, no copy)
/// into one pipe per sink, and each sink's thread splices from its pipe into the sink. A sink's pipe is its queue:
/// when it stays full for [`TEE_GRACE`] while another sink waits for it, the sink's policy decides (`detach`: cut
/// off; `drop`: skip these bytes for it, counted; `block`: wait for it), so one slow sink holds up the source and
/// the others for half a second at most unless asked to. When every sink is full the flow waits: it is bound by
/// its sinks, and none is slower than the others.
fn tee_fan_out(sh: &Arc<Shared>, src: &Conn, sinks: Vec<SinkRt>, step: usize) -> Result<(), FlowError> {
    use rustix::pipe::{splice, tee, SpliceFlags};
    let pipe = |size: usize| -> Result<(rustix::fd::OwnedFd, rustix::fd::OwnedFd), FlowError> {
        let (r, w) = rustix::pipe::pipe().map_err(|e| io_err("create a pipe", e.into()))?;
        let _ = rustix::pipe::fcntl_setpipe_size(&w, size);
        Ok((r, w))
    };
    let (mr, mw) = pipe(step.min(TEE_PIPE))?;
    let cap = rustix::pipe::fcntl_getpipe_size(&mw).map_err(|e| io_err("pipe size", e.into()))?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").map_err(|e| io_err("open /dev/null", e))?;
    let mut outs = Vec::new();
    for mut s in sinks {
        let (r, w) = pipe(s.spec.queue.clamp(64 << 10, TEE_PIPE))?;
        let (stat, name, full) = (s.stat, s.current.to_string(), s.spec.full);
        let thread = std::thread::Builder::new()
            .name(format!("kecho-flow-{}-sink{stat}", sh.id))
            .spawn(move || {
                s.splice_from(&r)?;
                s.close()
            })
            .map_err(|e| io_err("spawn a sink thread", e))?;
        outs.push(TeeSink { w: Some(w), stat, name, full, pos: 0, full_since: None, thread: Some(thread) });
    }
    let cut = |t: &mut TeeSink, why: String| {
        drop(t.w.take());
        sh.stats[t.stat].detach();
        sh.event(3, "detached", &t.name, why);
    };
    let result: Result<(), FlowError> = (|| loop {
        if sh.stopped() {
            return Err(FlowError::Stopped);
        }
        sh.pace(cap);
        let t = Timing::start();
        sh.stats[0].call(Call::Splice);
        let r = splice(src.fd(), None, &mw, None, cap, SpliceFlags::MOVE | SpliceFlags::MORE);
        sh.stats[0].busy(&t);
        let mut n = match r {
            Ok(0) if sh.stopped() => return Err(FlowError::Stopped),
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(_) if sh.stopped() => return Err(FlowError::Stopped),
            Err(e) => return Err(io_err("splice from the source", e.into())),
        };
        sh.stats[0].moved(n, n);
        for o in outs.iter_mut() {
            o.pos = 0;
        }
        // `tee` always starts at the front of the flow's pipe: only the sinks that have least of it can take more;
        // what every live sink has is then dropped from the front.
        while n > 0 {
            let live: Vec<usize> = (0..outs.len()).filter(|&j| outs[j].w.is_some()).collect();
            if live.is_empty() {
                return Err(FlowError::Terminated {
                    endpoint: "all sinks".into(),
                    reason: "every sink failed or was detached".into(),
                });
            }
            let least = live.iter().map(|&j| outs[j].pos).min().unwrap_or(n);
            if least > 0 {
                let mut left = least;
                while left > 0 {
                    match splice(&mr, None, &null, None, left, SpliceFlags::MOVE) {
                        Ok(0) => return Err(io_err("drain the flow's pipe", io::ErrorKind::WriteZero.into())),
                        Ok(m) => left -= m,
                        Err(Errno::INTR) => {}
                        Err(e) => return Err(io_err("drain the flow's pipe", e.into())),
                    }
                }
                n -= least;
                for &j in &live {
                    outs[j].pos -= least;
                }
                continue;
            }
            let mut progress = false;
            let held_up = live.iter().any(|&j| outs[j].pos > 0);
            for &j in &live {
                let o = &mut outs[j];
                if o.pos > 0 {
                    continue;
                }
                let Some(w) = &o.w else { continue };
                let st = &sh.stats[o.stat];
                let t = Timing::start();
                st.call(Call::Tee);
                let r = tee(&mr, w, n, SpliceFlags::NONBLOCK);
                st.busy(&t);
                match r {
                    Ok(m) if m > 0 => {
                        o.pos = m;
                        o.full_since = None;
                        progress = true;
                    }
                    Ok(_) | Err(Errno::AGAIN) => {
                        let since = *o.full_since.get_or_insert_with(Instant::now);
                        // A full sink is slow only if another sink is waiting for it, and for a while: when all
                        // sinks are full the flow is simply bound by its sinks and waits.
                        if !held_up || since.elapsed() < TEE_GRACE {
                            continue;
                        }
                        match o.full {
                            FullPolicy::Block => {}
                            FullPolicy::Drop => {
                                // Still full since then: the next bytes are dropped at once, until a tee succeeds.
                                st.dropped(n);
                                o.pos = n;
                                progress = true;
                            }
                            FullPolicy::Detach => {
                                cut(o, format!("its pipe stayed full; the other sinks go on ({n} bytes not sent)"));
                                progress = true;
                            }
                        }
                    }
                    Err(Errno::INTR) => progress = true,
                    // The sink's thread ended (it failed): its pipe has no reader.
                    Err(Errno::PIPE) => {
                        drop(o.w.take());
                        st.detach();
                        progress = true;
                    }
                    Err(e) => return Err(io_err(format!("tee to {}", o.name), e.into())),
                }
            }
            if !progress {
                // Every sink that still needs these bytes blocks on a full pipe (policy `block`): wait for room.
                let fds: Vec<_> =
                    live.iter().filter(|&&j| outs[j].pos == 0).filter_map(|&j| outs[j].w.as_ref()).collect();
                let mut p: Vec<_> =
                    fds.iter().map(|w| rustix::event::PollFd::new(*w, rustix::event::PollFlags::OUT)).collect();
                let t = rustix::time::Timespec { tv_sec: 0, tv_nsec: 20_000_000 };
                let _ = rustix::event::poll(&mut p, Some(&t));
                if sh.stopped() {
                    return Err(FlowError::Stopped);
                }
            }
        }
    })();
    let mut ok = false;
    let mut first = None;
    for mut o in outs {
        drop(o.w.take());
        match o.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) => ok |= !sh.stats[o.stat].snapshot(Duration::ZERO).detached,
            Some(Ok(Err(e))) => {
                sh.stats[o.stat].detach();
                sh.event(0, "sink failed", &o.name, e.to_string());
                first.get_or_insert(e);
            }
            _ => {}
        }
    }
    match (result, ok, first) {
        (Err(e), _, _) => Err(e),
        (Ok(()), false, Some(e)) => Err(e),
        _ => Ok(()),
    }
}

#[allow(clippy::large_enum_variant)]
enum SinkIo {
    Fd(Conn),
    Channel(kecho::Source, String),
    App(AppSink),
}

const REPLAY: usize = 8 << 20;

/// One sink with its ladder.
struct SinkRt {
    sh: Arc<Shared>,
    spec: EndpointSpec,
    current: Endpoint,
    io: Option<SinkIo>,
    ladder: Ladder,
    stat: usize,
    written: u64,
    replay: std::collections::VecDeque<u8>,
    /// The zero-copy path feeds this sink from a file: a resuming peer's offset is kept in `peer_has` for it
    /// rather than answered from `replay`.
    zero_copy: bool,
    /// The offset the last connection's peer reported (zero-copy resume).
    peer_has: Option<u64>,
    /// A `direct` file sink behind a transform: its O_DIRECT writer, once the first chunk came.
    direct: Option<endpoint::DirectWriter>,
    /// Space reserved ahead of the writes of a regular file written from its start (set at each open).
    prealloc: Option<endpoint::Prealloc>,
}

fn connection_fault(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | TimedOut | UnexpectedEof
    ) || e.raw_os_error() == Some(rustix::io::Errno::HOSTUNREACH.raw_os_error())
}

impl SinkRt {
    fn new(sh: Arc<Shared>, spec: EndpointSpec, stat: usize, io: Option<SinkIo>) -> Self {
        let ladder = Ladder::new(spec.retries, spec.alternates.len());
        SinkRt {
            sh,
            current: spec.endpoint.clone(),
            spec,
            io,
            ladder,
            stat,
            written: 0,
            replay: Default::default(),
            zero_copy: false,
            peer_has: None,
            direct: None,
            prealloc: None,
        }
    }

    fn stat(&self) -> &StageStat {
        &self.sh.stats[self.stat]
    }

    fn connect(&mut self) -> io::Result<()> {
        let c = endpoint::open(&self.current, true, self.spec.append)?;
        self.prealloc = endpoint::Prealloc::for_sink(&c, !self.spec.append && !self.spec.direct);
        if self.spec.resume {
            // The resume protocol: the peer first says how many bytes of this stream it holds (u64 BE).
            let mut b = [0u8; 8];
            std::io::Read::read_exact(&mut ConnRead(&c), &mut b)?;
            let has = u64::from_be_bytes(b);
            if self.zero_copy {
                self.peer_has = Some(has);
                self.sh.interrupt_on_stop(&c);
                self.io = Some(SinkIo::Fd(c));
                return Ok(());
            }
            let kept = self.replay.len() as u64;
            if has > self.written || self.written - has > kept {
                return Err(io::Error::other(format!(
                    "cannot resume: the peer holds {has} bytes, {} were sent and the last {kept} are kept",
                    self.written
                )));
            }
            let from = (kept - (self.written - has)) as usize;
            let (a, b) = self.replay.as_slices();
            let mut again = Vec::with_capacity(kept as usize - from);
            again.extend_from_slice(a);
            again.extend_from_slice(b);
            again.drain(..from);
            endpoint::write_ranges(c.fd(), &again, std::slice::from_ref(&(0..again.len())), 0, self.stat())
                .map_err(|(_, e)| e)?;
            if self.written > 0 {
                self.sh.event(
                    1,
                    "resumed",
                    &self.current.to_string(),
                    format!("at byte {has}, {} bytes sent again", again.len()),
                );
            }
        }
        self.sh.interrupt_on_stop(&c);
        self.io = Some(SinkIo::Fd(c));
        Ok(())
    }

    fn connect_or_recover(&mut self) -> Result<(), FlowError> {
        match self.connect() {
            Ok(()) => Ok(()),
            Err(e) if connection_fault(&e) => self.recover(e),
            Err(e) => Err(io_err(format!("open {}", self.current), e)),
        }
    }

    /// Climbs the ladder after a connection fault until connected again or out of rungs.
    fn recover(&mut self, first: io::Error) -> Result<(), FlowError> {
        let mut err = first;
        let mut action = self.ladder.on_fault(FaultKind::Connection);
        loop {
            if self.sh.stopped() {
                return Err(FlowError::Stopped);
            }
            let ep = self.current.to_string();
            // A process's stdin is not a connection to re-establish: started again, the command would get the rest of
            // the stream as if it were all of it. An `exec:` sink that failed goes on to the alternates, the
            // application and the end, never to a retry.
            while matches!(action, Action::Retry { .. }) && matches!(self.current, Endpoint::Exec(_)) {
                action = self.ladder.on_fault(FaultKind::Connection);
            }
            match action {
                Action::Retry { attempt, after } => {
                    self.sh.event(1, "retry", &ep, format!("attempt {attempt} in {after:?} after: {err}"));
                    endpoint::sleep_unless(&self.sh.stop, after);
                }
                Action::Redirect { n } => {
                    self.current = self.spec.alternates[n].clone();
                    self.sh.event(2, "redirect", &ep, format!("to {} after: {err}", self.current));
                }
                Action::Notify => {
                    let d = self.sh.event(3, "notify", &ep, format!("no retries or alternates left: {err}"));
                    action = self.ladder.decided(d);
                    continue;
                }
                Action::Fallback | Action::Terminate => {
                    self.sh.event(5, "terminated", &ep, err.to_string());
                    return Err(FlowError::Terminated { endpoint: ep, reason: err.to_string() });
                }
            }
            match self.connect() {
                Ok(()) => {
                    let ep = self.current.to_string();
                    if self.spec.resume || self.written == 0 {
                        self.sh.event(0, "reconnected", &ep, String::new());
                        return Ok(());
                    }
                    // Without `resume` the peer does not say what it holds: the new connection gets the stream from
                    // the first byte not handed to the last one (each byte is sent once, in order), and what that
                    // connection's peer had not read of the bytes before it is lost. The offset is what the user
                    // needs to know which part, so it is in the event and in the flow's results.
                    let at = self.written;
                    let what = format!(
                        "without resume: the stream goes on at byte {at}; what the last connection's peer had not \
                         read of the first {at} bytes is lost"
                    );
                    self.sh.results.lock().push(format!("{ep}: connection dropped, {what}"));
                    self.sh.event(0, "reconnected", &ep, what);
                    return Ok(());
                }
                Err(e) if connection_fault(&e) => {
                    err = e;
                    action = self.ladder.on_fault(FaultKind::Connection);
                }
                Err(e) => return Err(io_err(format!("open {}", self.current), e)),
            }
        }
    }

    fn keep(&mut self, chunk: &Chunk, from: usize, n: usize) {
        if !self.spec.resume || n == 0 {
            return;
        }
        let (mut skip, mut left) = (from, n);
        for r in &chunk.segs {
            if skip >= r.len() {
                skip -= r.len();
                continue;
            }
            let take = (r.len() - skip).min(left);
            self.replay.extend(&chunk.buf[r.start + skip..r.start + skip + take]);
            left -= take;
            skip = 0;
            if left == 0 {
                break;
            }
        }
        self.stat().copied(n);
        let over = self.replay.len().saturating_sub(REPLAY);
        self.replay.drain(..over);
    }

    fn write(&mut self, chunk: &Chunk) -> Result<(), FlowError> {
        let mut skip = 0;
        let total = chunk.len();
        let t = Timing::start();
        let r = loop {
            match &mut self.io {
                Some(SinkIo::Channel(src, ty)) => {
                    // One event per range: a decrypted record, or what one read delivered.
                    let mut r = Ok(());
                    for seg in &chunk.segs {
                        self.sh.stats[self.stat].syscall();
                        if let Err(e) = src.submit_blocking(ty, &kecho::Attrs::new(), &chunk.buf[seg.clone()]) {
                            r = Err(FlowError::Channel(e.to_string()));
                            break;
                        }
                    }
                    break r;
                }
                Some(SinkIo::App(f)) => {
                    let mut r = Ok(());
                    for seg in &chunk.segs {
                        if let Err(reason) = f(&chunk.buf[seg.clone()]) {
                            r = Err(FlowError::Terminated { endpoint: self.current.to_string(), reason });
                            break;
                        }
                    }
                    break r;
                }
                Some(SinkIo::Fd(c)) if self.spec.direct => {
                    let st = &self.sh.stats[self.stat];
                    if self.direct.is_none() {
                        st.syscall();
                        match endpoint::DirectWriter::new(c.fd(), chunk.buf.capacity().max(1 << 20)) {
                            Ok(w) => self.direct = Some(w),
                            Err(e) => {
                                self.sh.event(
                                    4,
                                    "fallback",
                                    &self.current.to_string(),
                                    format!("O_DIRECT: {e}; writing through the page cache"),
                                );
                                self.spec.direct = false;
                                continue;
                            }
                        }
                    }
                    let w = self.direct.as_mut().expect("set above");
                    break w
                        .write_ranges(c.fd(), &chunk.buf, &chunk.segs, st)
                        .map_err(|e| io_err(format!("write {}", self.current), e));
                }
                Some(SinkIo::Fd(c)) => {
                    let st = &self.sh.stats[self.stat];
                    if let Some(p) = self.prealloc.as_mut() {
                        p.before(c.fd(), total - skip, st);
                    }
                    let r = endpoint::write_ranges(c.fd(), &chunk.buf, &chunk.segs, skip, st);
                    if let (Some(p), Ok(n) | Err((n, _))) = (self.prealloc.as_mut(), &r) {
                        p.wrote(*n);
                    }
                    match r {
                        Ok(n) => {
                            self.keep(chunk, skip, n);
                            self.written += n as u64;
                            self.ladder.succeeded();
                            break Ok(());
                        }
                        Err((n, e)) => {
                            self.keep(chunk, skip, n);
                            self.written += n as u64;
                            skip += n;
                            if !connection_fault(&e) || self.sh.stopped() {
                                break Err(if self.sh.stopped() {
                                    FlowError::Stopped
                                } else {
                                    io_err(format!("write {}", self.current), e)
                                });
                            }
                            self.io = None;
                            if let Err(e) = self.recover(e) {
                                break Err(e);
                            }
                        }
                    }
                }
                None => {
                    if let Err(e) = self.connect_or_recover() {
                        break Err(e);
                    }
                }
            }
        };
        let st = self.stat();
        st.busy(&t);
        st.moved(total, total);
        r
    }

    /// Moves everything from the pipe `r` into the sink with `splice` until the pipe's writer closes it; a
    /// connection fault climbs the ladder (no resume: the bytes were never kept), and a sink that refuses splice
    /// (e.g. a file opened for appending) is written by copying instead (rung 4, for this sink only).
    fn splice_from(&mut self, r: &rustix::fd::OwnedFd) -> Result<(), FlowError> {
        use rustix::pipe::{splice, SpliceFlags};
        let mut copying = false;
        let mut buf = Vec::new();
        let mut nonblocking = false;
        loop {
            let Some(SinkIo::Fd(c)) = &self.io else {
                self.connect_or_recover()?;
                nonblocking = false;
                continue;
            };
            // A splice into a full socket or pipe sleeps holding the pipe's lock, and the flow thread's `tee` into
            // this pipe would wait for that lock however it is flagged: the sink is made non-blocking and waited
            // for with poll instead, so a full sink never holds up the flow thread.
            if !nonblocking && !c.is_file() {
                let _ = rustix::io::ioctl_fionbio(c.fd(), true);
                nonblocking = true;
            }
            let st = &self.sh.stats[self.stat];
            let t = Timing::start();
            let r = if copying {
                buf.clear();
                buf.reserve(TEE_PIPE);
                endpoint::read_into(r.as_fd(), &mut buf, st).map_err(|e| (0, e)).and_then(|n| {
                    st.copied(n);
                    let all = 0..n;
                    endpoint::write_ranges(c.fd(), &buf, std::slice::from_ref(&all), 0, st).map(|_| n)
                })
            } else {
                if let Some(p) = self.prealloc.as_mut() {
                    p.before(c.fd(), TEE_PIPE, st);
                }
                st.call(Call::Splice);
                splice(r, None, c.fd(), None, TEE_PIPE, SpliceFlags::MOVE | SpliceFlags::MORE)
                    .map_err(|e| (0, io::Error::from(e)))
            };
            st.busy(&t);
            match r {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    st.moved(n, n);
                    self.written += n as u64;
                    self.ladder.succeeded();
                    if let Some(p) = self.prealloc.as_mut() {
                        p.wrote(n);
                    }
                }
                Err((_, e)) if e.raw_os_error() == Some(Errno::INTR.raw_os_error()) => {}
                Err((_, e)) if e.raw_os_error() == Some(Errno::AGAIN.raw_os_error()) => {
                    if self.sh.stopped() {
                        return Err(FlowError::Stopped);
                    }
                    let fd = c.fd();
                    let mut p = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::OUT)];
                    let t = rustix::time::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
                    let _ = rustix::event::poll(&mut p, Some(&t));
                }
                Err((_, e))
                    if !copying
                        && self.written == 0
                        && e.raw_os_error().map(Errno::from_raw_os_error).is_some_and(endpoint::unsupported) =>
                {
                    self.sh.event(4, "fallback", &self.current.to_string(), format!("splice: {e}; copying instead"));
                    copying = true;
                }
                Err((n, e)) => {
                    st.moved(n, n);
                    if self.sh.stopped() {
                        return Err(FlowError::Stopped);
                    }
                    if !connection_fault(&e) {
                        return Err(io_err(format!("write {}", self.current), e));
                    }
                    self.io = None;
                    self.recover(e)?;
                }
            }
        }
    }

    fn close(mut self) -> Result<(), FlowError> {
        if let (Some(w), Some(SinkIo::Fd(c))) = (self.direct.as_mut(), &self.io) {
            w.finish(c.fd(), &self.sh.stats[self.stat]).map_err(|e| io_err(format!("write {}", self.current), e))?;
            self.sh.results.lock().push(format!(
                "{}: {} bytes written with O_DIRECT, {} through the page cache (the unaligned end)",
                self.current, w.direct, w.buffered
            ));
        }
        loop {
            match self.io.take() {
                Some(SinkIo::Fd(c)) if self.spec.resume && !self.zero_copy => match c.close_confirmed() {
                    Ok(()) => return Ok(()),
                    // The peer lost the end of the stream: reconnect, which replays from its offset, and confirm
                    // again.
                    Err(e) if connection_fault(&e) && !self.sh.stopped() => self.recover(e)?,
                    Err(e) => return Err(io_err(format!("close {}", self.current), e)),
                },
                Some(SinkIo::Fd(c)) => {
                    if let Some(p) = &self.prealloc {
                        p.release(c.fd(), self.stat()).map_err(|e| io_err(format!("truncate {}", self.current), e))?;
                    }
                    return c.close().map_err(|e| io_err(format!("close {}", self.current), e));
                }
                _ => return Ok(()),
            }
        }
    }
}

struct ConnRead<'a>(&'a Conn);

impl std::io::Read for ConnRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        rustix::io::read(self.0.fd(), buf).map_err(Into::into)
    }
}

/// Where processed chunks go: one sink inline, one sink behind a short queue on its own thread, or one queue and
/// thread per sink.
enum Delivery {
    One(Box<SinkRt>),
    Behind(Behind),
    Fan(Vec<Fan>),
}

/// Bytes a single sink's thread may hold queued: enough that writing overlaps reading and transforming, and that a
/// sink thread preempted for a few milliseconds (two cores shared by the reader, the sink and the peer) does not
/// stop the reader (16 chunks of the default 1 MiB, where 4 chunks were: docs/FLOWS.md has the rounds).
const BEHIND_BYTES: usize = 16 << 20;

/// The sink thread's queue in chunks: [`BEHIND_BYTES`] of them, at least 4 and at most 64.
fn behind_queue(chunk: usize) -> usize {
    (BEHIND_BYTES / chunk.max(1)).clamp(4, 64)
}

/// A single sink written on its own thread: the flow thread reads and transforms the next chunks while this one
/// writes (the paper's devices with command queues: the stages work at once, not in turn). The queue blocks when
/// full: with one sink there is nothing else its pace could hold up.
struct Behind {
    tx: Option<crossbeam_channel::Sender<Chunk>>,
    thread: Option<JoinHandle<Result<(), FlowError>>>,
}

impl Drop for Behind {
    /// However the flow ends (an error in a stage included), what was handed to the sink is written before the flow
    /// reports its end, as when the sink was written inline.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

impl Behind {
    fn start(sh: &Arc<Shared>, mut s: SinkRt, chunk: usize) -> Result<Self, FlowError> {
        let (tx, rx) = crossbeam_channel::bounded::<Chunk>(behind_queue(chunk));
        let thread = std::thread::Builder::new()
            .name(format!("kecho-flow-{}-sink", sh.id))
            .spawn(move || {
                for c in rx {
                    s.write(&c)?;
                }
                s.close()
            })
            .map_err(|e| io_err("spawn the sink thread", e))?;
        Ok(Behind { tx: Some(tx), thread: Some(thread) })
    }

    /// The sink thread's result once it ended (its queue closed or it failed).
    fn join(&mut self) -> Result<(), FlowError> {
        drop(self.tx.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(FlowError::Transform("the sink thread panicked".into())),
            None => Ok(()),
        }
    }
}

struct Fan {
    tx: Option<crossbeam_channel::Sender<Arc<Chunk>>>,
    full: FullPolicy,
    stat: usize,
    name: String,
    thread: Option<JoinHandle<Result<(), FlowError>>>,
}

impl Delivery {
    /// `on_tail`: the delivery runs on a tail thread that does nothing else (the last stage is replicated from the
    /// start), so a single sink is written there rather than behind one more thread and hand-over.
    fn new(sh: &Arc<Shared>, mut sinks: Vec<SinkRt>, chunk: usize, on_tail: bool) -> Result<Self, FlowError> {
        if sinks.len() == 1 {
            let s = sinks.remove(0);
            // A kernel object is written on its own thread (overlapping the flow thread's reads and transforms); a
            // kecho channel's submit is cheap and stays inline.
            return Ok(match s.io {
                Some(SinkIo::Channel(..)) => Delivery::One(Box::new(s)),
                _ if on_tail => Delivery::One(Box::new(s)),
                _ => Delivery::Behind(Behind::start(sh, s, chunk)?),
            });
        }
        let mut fans = Vec::new();
        for mut s in sinks {
            let cap = (s.spec.queue / chunk.max(1)).max(2);
            let (tx, rx) = crossbeam_channel::bounded::<Arc<Chunk>>(cap);
            let (full, stat, name) = (s.spec.full, s.stat, s.spec.endpoint.to_string());
            let thread = std::thread::Builder::new()
                .name(format!("kecho-flow-{}-sink{}", sh.id, stat))
                .spawn(move || {
                    for c in rx {
                        s.write(&c)?;
                    }
                    s.close()
                })
                .map_err(|e| io_err("spawn a sink thread", e))?;
            fans.push(Fan { tx: Some(tx), full, stat, name, thread: Some(thread) });
        }
        Ok(Delivery::Fan(fans))
    }

    fn deliver(&mut self, sh: &Shared, chunk: Chunk) -> Result<(), FlowError> {
        match self {
            Delivery::One(s) => s.write(&chunk),
            Delivery::Behind(b) => {
                let sent = b.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok());
                if sent {
                    return Ok(());
                }
                // The sink thread ended early: its error is the flow's.
                b.join()?;
                Err(FlowError::Terminated { endpoint: "sink".into(), reason: "the sink stopped taking data".into() })
            }
            Delivery::Fan(fans) => {
                let len = chunk.len();
                let c = Arc::new(chunk);
                for f in fans.iter_mut() {
                    let Some(tx) = &f.tx else { continue };
                    let cut = match tx.try_send(c.clone()) {
                        Ok(()) => false,
                        Err(crossbeam_channel::TrySendError::Full(c)) => match f.full {
                            FullPolicy::Block => tx.send(c).is_err(),
                            FullPolicy::Drop => {
                                sh.stats[f.stat].dropped(len);
                                false
                            }
                            FullPolicy::Detach => {
                                sh.event(
                                    3,
                                    "detached",
                                    &f.name,
                                    format!("queue full; the other sinks go on ({len} bytes not sent)"),
                                );
                                true
                            }
                        },
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => true,
                    };
                    if cut {
                        f.tx = None;
                        sh.stats[f.stat].detach();
                    }
                }
                if fans.iter().all(|f| f.tx.is_none()) {
                    return Err(FlowError::Terminated {
                        endpoint: "all sinks".into(),
                        reason: "every sink failed or was detached".into(),
                    });
                }
                Ok(())
            }
        }
    }

    fn close(self, sh: &Shared) -> Result<(), FlowError> {
        match self {
            Delivery::One(s) => s.close(),
            Delivery::Behind(mut b) => b.join(),
            Delivery::Fan(fans) => {
                let mut ok = false;
                let mut first = None;
                for mut f in fans {
                    drop(f.tx.take());
                    match f.thread.take().map(|t| t.join()) {
                        Some(Ok(Ok(()))) => ok |= !sh.stats[f.stat].snapshot(Duration::ZERO).detached,
                        Some(Ok(Err(e))) => {
                            sh.stats[f.stat].detach();
                            sh.event(0, "sink failed", &f.name, e.to_string());
                            first.get_or_insert(e);
                        }
                        _ => {}
                    }
                }
                match (ok, first) {
                    (false, Some(e)) => Err(e),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// The stages from `first` on, and the delivery: run on the flow thread, or on the tail thread once a stage is
/// replicated.
struct Tail {
    sh: Arc<Shared>,
    first: usize,
    stages: Vec<Box<dyn Stage>>,
    parts: Vec<Option<Arc<dyn Parallel>>>,
    work: Vec<Work>,
    delivery: Delivery,
}

impl Tail {
    fn run_stage(
        sh: &Shared,
        gi: usize,
        st: &mut dyn Stage,
        part: Option<&Arc<dyn Parallel>>,
        work: &Work,
        chunk: &mut Chunk,
        par: bool,
    ) -> Result<(), FlowError> {
        // Stage 0 runs on the reading thread, which stamped the chunk when the source's work on it ended.
        let started = if gi == 0 { chunk.started.take() } else { None };
        let t = started.unwrap_or_else(Timing::start);
        let before = chunk.len();
        st.sequential(chunk, work)?;
        if par {
            if let Some(p) = part {
                p.run(chunk, work);
            }
        }
        let stat = &sh.stats[1 + gi];
        stat.busy(&t);
        stat.moved(before, chunk.len());
        stat.copied(work.copied.swap(0, Ordering::Relaxed) as usize);
        chunk.done = gi + 1;
        Ok(())
    }

    fn process(&mut self, mut chunk: Chunk) -> Result<(), FlowError> {
        for k in 0..self.stages.len() {
            let gi = self.first + k;
            if chunk.done > gi {
                continue;
            }
            Self::run_stage(
                &self.sh,
                gi,
                &mut *self.stages[k],
                self.parts[k].as_ref(),
                &self.work[k],
                &mut chunk,
                true,
            )?;
        }
        let err = chunk.error.take();
        self.delivery.deliver(&self.sh, chunk)?;
        err.map_or(Ok(()), Err)
    }

    fn finish(mut self, mut seq: u64, pool: &Arc<Pool>) -> Result<(), FlowError> {
        for k in 0..self.stages.len() {
            if let Some(mut c) = self.stages[k].finish(seq, pool)? {
                seq += 1;
                c.done = self.first + k + 1;
                self.process(c)?;
            }
        }
        for s in &self.stages {
            if let Some(r) = s.summary() {
                self.sh.results.lock().push(format!("{}: {r}", s.name()));
            }
        }
        self.delivery.close(&self.sh)
    }
}

/// The flow thread's view: all stages inline, or a front part feeding replicas of stage `r`.
enum Mode {
    Inline(Tail),
    Split {
        r: usize,
        front: Vec<Box<dyn Stage>>,
        front_work: Vec<Work>,
        tx: Option<crossbeam_channel::Sender<Chunk>>,
        workers: Vec<JoinHandle<()>>,
        tail: Option<JoinHandle<Result<(), FlowError>>>,
        help: Helper,
    },
}

/// The reading thread's share of a replicated stage: when every replica is busy (their queue is full), the
/// reading thread runs the stage's parallel part on the chunk it just read, while the chunk is still in its cache,
/// and hands it to the tail itself, rather than sleep until a replica is free. So the reader, which must keep up
/// with all the replicas, never idles while there is work, and no core waits on another's hand-over.
struct Helper {
    part: Arc<dyn Parallel>,
    done: Option<crossbeam_channel::Sender<Chunk>>,
    work: Work,
    /// Chunks the reading thread ran itself, and all chunks handed on.
    helped: u64,
    chunks: u64,
}

/// Threads of their own for `n` replicas of a stage on `cores` cores: `n`, except that `n` replicas taking every core
/// (n >= cores, n > 1) leave the reading thread to be the last of them, unless `own` asks for a thread each.
pub fn own_threads(n: usize, cores: usize, own: bool) -> usize {
    if n > 1 && n >= cores && !own {
        n - 1
    } else {
        n
    }
}

fn part_name(stages: &[Box<dyn Stage>], r: usize) -> String {
    stages.get(r).map(|s| s.name()).unwrap_or_default()
}

/// Splits the flow at stage `r` into `n` replicas; `next` is the sequence number of the next chunk the source reads
/// (0 from the start; later when `replicas=auto` splits after its warm-up, the chunks before having gone through inline).
/// `declared`: the replicas were declared (`replicas=N`), so the reading thread may be one of them (`own_threads`);
/// `replicas=auto`'s planner counts threads of their own and gets them.
fn split(
    sh: &Arc<Shared>,
    tail: Tail,
    r: usize,
    n: usize,
    pool: Arc<Pool>,
    next: u64,
    declared: bool,
) -> Result<Mode, FlowError> {
    let Tail { sh: _, first, mut stages, parts, work, delivery } = tail;
    debug_assert_eq!(first, 0);
    let rest = stages.split_off(r + 1);
    let mut parts_rest = parts;
    let part = parts_rest[r].clone().ok_or_else(|| FlowError::Config("that stage cannot be replicated".into()))?;
    let parts_rest = parts_rest.split_off(r + 1);
    let mut work = work;
    let work_rest = work.split_off(r + 1);
    // N replicas that would take every core leave none to the reading thread, which must run too: N + 1 busy threads
    // on N cores share them by time slices, and each replica decrypts what the reader copied on another core. Then
    // the reading thread is one of the N: N - 1 threads of their own, and the reader runs the stage on the chunk it
    // just read (still in its cache) whenever they are busy (see `Helper`). `KECHO_FLOW_OWN_REPLICAS=1` gives every
    // replica a thread of its own as before (to compare the two in one run).
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let own = !declared || std::env::var("KECHO_FLOW_OWN_REPLICAS").is_ok_and(|v| v == "1");
    let threads = own_threads(n, cores, own);
    let (tx, rx) = crossbeam_channel::bounded::<Chunk>(2 * threads);
    let (dtx, drx) = crossbeam_channel::bounded::<Chunk>(4 * n);
    let mut workers = Vec::new();
    sh.stats[1 + r].set_replicas(n);
    if threads < n {
        sh.results.lock().push(format!(
            "{}: {n} replicas on {cores} cores: {threads} thread{} of its own and the reading thread",
            part_name(&stages, r),
            if threads == 1 { "" } else { "s" }
        ));
    }
    for i in 0..threads {
        let (rx, dtx, part, sh) = (rx.clone(), dtx.clone(), part.clone(), sh.clone());
        let w = std::thread::Builder::new()
            .name(format!("kecho-flow-{}-s{r}r{i}", sh.id))
            .spawn(move || {
                let work = Work::default();
                for mut c in rx {
                    if c.done <= r {
                        let t = Timing::start();
                        let before = c.len();
                        part.run(&mut c, &work);
                        let st = &sh.stats[1 + r];
                        st.busy(&t);
                        st.moved(before, c.len());
                        st.copied(work.copied.swap(0, Ordering::Relaxed) as usize);
                        c.done = r + 1;
                    }
                    if dtx.send(c).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| io_err("spawn a replica", e))?;
        workers.push(w);
    }
    let dtx_help = dtx;
    let mut t = Tail { sh: sh.clone(), first: r + 1, stages: rest, parts: parts_rest, work: work_rest, delivery };
    let sh2 = sh.clone();
    let tail = std::thread::Builder::new()
        .name(format!("kecho-flow-{}-tail", sh.id))
        .spawn(move || {
            let mut order = Reorder::starting_at(next);
            let mut last = next;
            for c in drx {
                last = last.max(c.seq + 1);
                let _ = order.push(c.seq, c);
                while let Some(c) = order.pop() {
                    t.process(c)?;
                }
            }
            if order.held() > 0 {
                return Err(FlowError::Transform(format!("{} chunks lost between replicas", order.held())));
            }
            let _ = &sh2;
            t.finish(last + 1_000_000, &pool)
        })
        .map_err(|e| io_err("spawn the tail thread", e))?;
    let help = Helper { part, done: Some(dtx_help), work: Work::default(), helped: 0, chunks: 0 };
    Ok(Mode::Split { r, front: stages, front_work: work, tx: Some(tx), workers, tail: Some(tail), help })
}

fn pipeline(
    sh: &Arc<Shared>,
    mut src: SourceIo,
    specs: Vec<StageSpec>,
    mut stages: Vec<Box<dyn Stage>>,
    sinks: Vec<SinkRt>,
    chunk: usize,
) -> Result<(), FlowError> {
    let pool = Pool::new(chunk + 4096);
    let parts: Vec<_> = stages.iter().map(|s| s.parallel()).collect();
    let work = stages.iter().map(|_| Work::default()).collect();
    let fixed = specs.iter().enumerate().find_map(|(i, s)| match s.replicas {
        Replicas::Fixed(n) if n > 1 => Some((i, n)),
        _ => None,
    });
    // Replicating the last stage from the start leaves the tail thread only the reordering and the sink's writes.
    let on_tail = matches!(fixed, Some((r, _)) if r + 1 == stages.len() && parts[r].is_some());
    let delivery = Delivery::new(sh, sinks, chunk, on_tail)?;
    let has_first = !stages.is_empty();
    let tail = Tail { sh: sh.clone(), first: 0, stages: std::mem::take(&mut stages), parts, work, delivery };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let auto = specs.iter().any(|s| s.replicas == Replicas::Auto);
    let mut mode = match fixed {
        Some((r, n)) if tail.parts[r].is_some() => split(sh, tail, r, n, pool.clone(), 0, true)?,
        _ => Mode::Inline(tail),
    };
    let mut carry: Vec<u8> = Vec::new();
    let mut seq = 0u64;
    let mut read_total = 0u64;
    let mut eof = false;
    let mut asked = false;
    let start = Instant::now();
    let machine0 = MachineCpu::now();
    let src_stat = &sh.stats[0];
    let result: Result<(), FlowError> = (|| {
        while !eof {
            if sh.stopped() {
                return Err(FlowError::Stopped);
            }
            let mut buf = pool.get(chunk + carry.len());
            if !carry.is_empty() {
                buf.extend_from_slice(&carry);
                src_stat.copied(carry.len());
                carry.clear();
            }
            let t = Timing::start();
            let n = match &mut src {
                SourceIo::Fd(c) => match endpoint::read_into(c.fd(), &mut buf, src_stat) {
                    Ok(n) => n,
                    Err(_) if sh.stopped() => return Err(FlowError::Stopped),
                    Err(e) => return Err(io_err("read the source", e)),
                },
                SourceIo::Channel(sink) => read_channel(sh, sink, &mut buf, chunk)?,
            };
            // The first stage's timing starts where the source's ends (one CPU clock reading fewer per chunk).
            let t = src_stat.busy_then(&t);
            src_stat.moved(n, n);
            src_stat.copied(n);
            read_total += n as u64;
            if n == 0 && sh.stopped() {
                // An interrupted read looks like the end of input.
                return Err(FlowError::Stopped);
            }
            eof = n == 0;
            // The first stage may take whole units only (records); the rest waits for the next read.
            let take = match (&mut mode, has_first) {
                (Mode::Inline(tail), true) => tail.stages[0].frame(&buf)?,
                (Mode::Split { front, .. }, true) => front[0].frame(&buf)?,
                _ => buf.len(),
            };
            carry.extend_from_slice(&buf[take..]);
            buf.truncate(take);
            if buf.is_empty() {
                continue;
            }
            let slept = sh.pace(buf.len());
            let mut c = Chunk::new(seq, buf, Some(pool.clone()));
            // A wait for the rate limit is not the stage's work: then the stage reads the clocks itself.
            if has_first && !slept {
                c.started = Some(t);
            }
            seq += 1;
            send(sh, &mut mode, c)?;
            // Auto replication: after a warm-up, ask the scheduler once.
            if auto && !asked && warmed_up(read_total, start.elapsed(), sh.warm_up_bytes, sh.warm_up) {
                asked = true;
                if let Mode::Inline(_) = &mode {
                    let loads: Vec<StageLoad> = sh.stats.iter().map(StageStat::load).collect();
                    let cap = machine0.capacity(cores, &loads, start.elapsed());
                    // The source and every transform run on this thread now.
                    let inline = 1 + specs.len();
                    if let Some((i, n)) = (sh.planner)(&loads, start.elapsed(), inline, cap) {
                        if (1..=specs.len()).contains(&i) && specs[i - 1].replicas == Replicas::Auto {
                            let Mode::Inline(tail) = std::mem::replace(&mut mode, Mode::Inline(empty_tail(sh))) else {
                                unreachable!("checked above")
                            };
                            mode = split(sh, tail, i - 1, n, pool.clone(), seq, false)?;
                            let how = if n == 1 { "its own thread".to_owned() } else { format!("{n} replicas") };
                            let how = format!("{how} after {read_total} bytes");
                            sh.event(0, "replicated", &specs[i - 1].transform.name(), how);
                        }
                    }
                }
            }
        }
        Ok(())
    })();
    // Leftover bytes the first stage did not take go through it unframed, so that it can judge them (a decrypt
    // stage reports a truncated record with its offset).
    let result = result.and_then(|()| {
        if !carry.is_empty() {
            let mut buf = pool.get(carry.len());
            buf.extend_from_slice(&carry);
            let c = Chunk::new(seq, buf, Some(pool.clone()));
            seq += 1;
            send(sh, &mut mode, c)?;
        }
        Ok(())
    });
    finish(sh, mode, result, seq, &pool)
}

/// The machine's CPU counters (all cores, from /proc/stat, in clock ticks), to tell how many cores were idle while
/// the flow warmed up. `None` where /proc is not mounted.
struct MachineCpu(Option<(u64, u64)>);

impl MachineCpu {
    fn now() -> Self {
        let read = || -> Option<(u64, u64)> {
            let s = std::fs::read_to_string("/proc/stat").ok()?;
            let f: Vec<u64> =
                s.lines().next()?.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
            let idle = f.get(3)? + f.get(4)?;
            Some((f.iter().sum(), idle))
        };
        MachineCpu(read())
    }

    /// The cores the flow can count on: those it used since this reading plus those idle meanwhile. Without
    /// /proc/stat: all of them.
    fn capacity(&self, cores: usize, loads: &[StageLoad], wall: Duration) -> sched::Capacity {
        let (Some((t0, i0)), Some((t1, i1))) = (self.0, MachineCpu::now().0) else {
            return sched::Capacity::idle(cores);
        };
        let idle = (i1.saturating_sub(i0)) as f64 / (t1.saturating_sub(t0)).max(1) as f64 * cores as f64;
        let used = loads.iter().map(|l| l.cpu.as_secs_f64()).sum::<f64>() / wall.as_secs_f64().max(1e-9);
        sched::Capacity { cores, available: (used + idle).min(cores as f64) }
    }
}

fn empty_tail(sh: &Arc<Shared>) -> Tail {
    Tail {
        sh: sh.clone(),
        first: 0,
        stages: Vec::new(),
        parts: Vec::new(),
        work: Vec::new(),
        delivery: Delivery::Fan(Vec::new()),
    }
}

fn send(sh: &Arc<Shared>, mode: &mut Mode, c: Chunk) -> Result<(), FlowError> {
    match mode {
        Mode::Inline(tail) => tail.process(c),
        Mode::Split { r, front, front_work, tx, help, .. } => {
            front_send(sh, *r, front, front_work, tx.as_ref(), help, c)
        }
    }
}

/// Runs the front stages up to the replicated one's sequential part and hands the chunk to the replicas.
fn front_send(
    sh: &Arc<Shared>,
    r: usize,
    front: &mut [Box<dyn Stage>],
    work: &[Work],
    tx: Option<&crossbeam_channel::Sender<Chunk>>,
    help: &mut Helper,
    mut c: Chunk,
) -> Result<(), FlowError> {
    for k in 0..=r {
        if c.done > k {
            continue;
        }
        let part = front[k].parallel();
        Tail::run_stage(sh, k, &mut *front[k], part.as_ref(), &work[k], &mut c, k < r)?;
        if k == r {
            // The replicas run the parallel part and mark the stage done.
            c.done = r;
        }
    }
    let tx = tx.ok_or(FlowError::Stopped)?;
    let stopped = || FlowError::Transform("the replicas stopped".into());
    help.chunks += 1;
    match tx.try_send(c) {
        Ok(()) => Ok(()),
        Err(crossbeam_channel::TrySendError::Full(mut c)) => {
            // Every replica is busy: run the stage here (see `Helper`), as a replica would.
            let t = Timing::start();
            let before = c.len();
            help.part.run(&mut c, &help.work);
            let st = &sh.stats[1 + r];
            st.busy(&t);
            st.moved(before, c.len());
            st.copied(help.work.copied.swap(0, Ordering::Relaxed) as usize);
            c.done = r + 1;
            help.helped += 1;
            help.done.as_ref().ok_or_else(stopped)?.send(c).map_err(|_| stopped())
        }
        Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(stopped()),
    }
}

fn finish(
    sh: &Arc<Shared>,
    mode: Mode,
    result: Result<(), FlowError>,
    seq: u64,
    pool: &Arc<Pool>,
) -> Result<(), FlowError> {
    match mode {
        Mode::Inline(tail) => match result {
            Ok(()) => tail.finish(seq, pool),
            Err(e) => {
                let _ = tail.delivery.close(sh);
                Err(e)
            }
        },
        Mode::Split { r, mut front, front_work, tx, workers, mut tail, mut help } => {
            let mut result = result;
            let mut seq = seq;
            if result.is_ok() {
                for k in 0..=r {
                    match front[k].finish(seq, pool) {
                        Ok(Some(mut c)) => {
                            seq += 1;
                            c.done = k + 1;
                            if let Err(e) = front_send(sh, r, &mut front, &front_work, tx.as_ref(), &mut help, c) {
                                result = Err(e);
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                for s in &front {
                    if let Some(r) = s.summary() {
                        sh.results.lock().push(format!("{}: {r}", s.name()));
                    }
                }
            }
            drop(tx);
            // The tail ends once every sender is gone: the replicas' and the reading thread's own.
            drop(help.done.take());
            for w in workers {
                let _ = w.join();
            }
            let tail_result = tail
                .take()
                .map(|t| t.join().unwrap_or_else(|_| Err(FlowError::Transform("the tail thread panicked".into()))));
            if help.helped > 0 {
                sh.results.lock().push(format!(
                    "{}: the reading thread ran {} of {} chunks itself (every replica was busy)",
                    front[r].name(),
                    help.helped,
                    help.chunks
                ));
            }
            // The tail's error (an authentication failure found by a replica) explains a front-side send failure.
            match (result, tail_result) {
                (Ok(()), Some(r)) => r,
                (Ok(()), None) => Ok(()),
                (Err(_), Some(Err(e))) => Err(e),
                (Err(e), _) => Err(e),
            }
        }
    }
}

/// Reads events from a kecho sink into `buf` (their payloads back to back), waiting in slices of 100 ms so that a
/// stop request is seen. A closed sink is the end of input.
fn read_channel(sh: &Shared, sink: &mut kecho::Sink, buf: &mut Vec<u8>, chunk: usize) -> Result<usize, FlowError> {
    let start = buf.len();
    loop {
        if sh.stopped() {
            return Err(FlowError::Stopped);
        }
        sh.stats[0].syscall();
        match sink.recv_blocking(Some(Duration::from_millis(100))) {
            Ok(ev) => {
                buf.extend_from_slice(ev.payload());
                break;
            }
            Err(kecho::TryRecvError::Empty) => continue,
            Err(kecho::TryRecvError::Lagged(n)) => {
                sh.stats[0].dropped(n as usize);
                sh.event(0, "lagged", "kecho sink", format!("the channel dropped {n} events for this flow"));
            }
            Err(_) => return Ok(0),
        }
    }
    // Whatever else is queued joins the same chunk.
    while buf.len() - start < chunk {
        match sink.try_recv() {
            Ok(ev) => buf.extend_from_slice(ev.payload()),
            Err(kecho::TryRecvError::Lagged(n)) => sh.stats[0].dropped(n as usize),
            Err(_) => break,
        }
    }
    Ok(buf.len() - start)
}

#[cfg(test)]
mod tests {
    use super::own_threads;

    /// Replicas that would take every core leave the reading thread to be the last of them; fewer replicas than
    /// cores, one replica, or the switch for a thread each keep a thread per replica.
    #[test]
    fn the_reading_thread_is_a_replica_only_when_the_replicas_take_every_core() {
        assert_eq!(own_threads(2, 2, false), 1);
        assert_eq!(own_threads(3, 2, false), 2);
        assert_eq!(own_threads(4, 4, false), 3);
        assert_eq!(own_threads(2, 4, false), 2);
        assert_eq!(own_threads(3, 4, false), 3);
        assert_eq!(own_threads(1, 1, false), 1);
        assert_eq!(own_threads(1, 2, false), 1);
        assert_eq!(own_threads(2, 2, true), 2);
    }
}
