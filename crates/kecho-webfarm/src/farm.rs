//! A farm of simulated web servers on real kecho nodes: the web-farm experiment's servers and the test bed of the
//! KECho mechanism. Every server is a [`kecho::Node`] on loopback with a monitoring channel and a data channel;
//! forwarding, responses, cancel events and load reports all travel over them, through the real OUT- and
//! IN-filters. Only the processing is simulated: a worker "processes" a request by waiting for its work time.
//!
//! A server's queue is ordered by the time a request first arrived in the farm (earliest first): a forwarded
//! request, which has already waited at its origin, goes ahead of younger local ones. A worker takes the earliest
//! request, drops it if it is older than the time-out (its client has given up), skips it if another copy was
//! claimed by another server (cancel events), and otherwise processes it. Workers keep a virtual clock: the next
//! request starts when the previous one finished (or when it arrived, if later), not when the timer fired, so timer
//! lateness never lowers a server's capacity.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kecho::filter::Selector;
use kecho::{Attrs, Channel, Node, SinkOptions, Source};
use parking_lot::Mutex;
use tokio::sync::Notify;

use kecho_lb::alloc::{LeastLoaded, PowerOfTwo};
use kecho_lb::hedge::{AdaptiveThreshold, Budget, Claim, ClaimResult, ClaimTable};
use kecho_lb::load::{
    LoadListener, LoadMonitor, LoadProbe, LoadReport, LoadSample, LoadTable, LoadWeights, MonitorConfig, ReportPolicy,
    RequestCounters, ServerId, SharedTable,
};
use kecho_lb::mechanism::{int, now, FirstResponse, LoadAwareFilter, LocalLoads, Placements, RequestMsg, Timed};
use kecho_lb::overhead::{Overhead, OverheadSnapshot};
use kecho_lb::{LbError, Result};

/// How the farm distributes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every server serves what it gets.
    None,
    /// KECho: a request that waited longer than the threshold is forwarded over the data channel to the `n`
    /// least-loaded other servers; all of them process it and the origin keeps the first response.
    Kecho {
        /// Servers per forwarded request.
        n: usize,
    },
    /// As `Kecho`, but the copies use cancel events: the first server to start wins, the others skip it.
    Cancel {
        /// Servers per forwarded request.
        n: usize,
    },
    /// A front end sends every request to the servers in turn (kecho's `rr` selector).
    FrontRoundRobin,
    /// A front end sends every request to the lower-loaded of two servers drawn at random, loads being the
    /// requests it sent each server and has not seen answered (the load reports say who is alive).
    FrontP2c,
    /// A front end sends every request to the server with the fewest requests it sent and has not seen answered
    /// (join the shortest queue; ties rotate).
    FrontJsq,
    /// Adaptive hedging: a request that would wait here at least its own work (queued work plus what is left of
    /// the running request) is moved at once to the least-loaded other server if that one's queue is at least one
    /// request shorter (no extra request; loads as in [`FarmConfig::fresh_loads`]); a request that has waited the
    /// cluster's observed p95 wait gets a copy at a server picked by power of two choices, within the budget, and
    /// the copies use cancel events; over budget it is moved instead. The fixed threshold stays as a backstop.
    Hedge,
    /// Tied requests: a request that would wait is also queued on a second server (power of two choices), within
    /// the budget; the first to start cancels the other.
    Tied,
}

impl Mode {
    fn front_end(self) -> bool {
        matches!(self, Mode::FrontRoundRobin | Mode::FrontP2c | Mode::FrontJsq)
    }
}

/// Settings of a farm; times are wall-clock times (already scaled).
#[derive(Debug, Clone)]
pub struct FarmConfig {
    /// Number of servers.
    pub servers: usize,
    /// Workers per server (requests processed at once).
    pub workers: usize,
    /// A request not answered within this time has timed out; servers drop requests older than this.
    pub timeout: Duration,
    /// KECho's forwarding threshold (also the hedging ceiling).
    pub forward_after: Duration,
    /// Period of load reports.
    pub report_period: Duration,
    /// Change of the load index that triggers an early report.
    pub report_threshold: f64,
    /// Lifetime of a load report.
    pub lifetime: Duration,
    /// Quantile of waits after which to hedge.
    pub hedge_quantile: f64,
    /// The hedging threshold's floor.
    pub hedge_floor: Duration,
    /// Window of waits for the adaptive threshold.
    pub hedge_window: Duration,
    /// Extra requests allowed per request (0.1: 10 %).
    pub budget_ratio: f64,
    /// Extra requests allowed beyond the ratio.
    pub budget_burst: u32,
    /// Distribution mode.
    pub mode: Mode,
    /// Seed of randomised allocators.
    pub seed: u64,
    /// Prefix of the channel names (unique per farm in one process).
    pub name: String,
    /// Heartbeat timeout of the nodes.
    pub heartbeat_timeout: Duration,
    /// Servers rank the others by their reported load plus the requests they forwarded or copied to each since
    /// that report (fresher than the report alone); false: by the reported load only, as in the paper.
    pub fresh_loads: bool,
}

impl FarmConfig {
    /// Paper-like settings at time scale 1, for `servers` servers in `mode`.
    pub fn new(servers: usize, mode: Mode, name: &str) -> Self {
        FarmConfig {
            servers,
            workers: 1,
            timeout: Duration::from_secs(5),
            forward_after: Duration::from_millis(2500),
            report_period: Duration::from_secs(1),
            report_threshold: 4.0,
            lifetime: Duration::from_secs(3),
            hedge_quantile: 0.95,
            hedge_floor: Duration::from_millis(76),
            hedge_window: Duration::from_secs(10),
            budget_ratio: 0.1,
            budget_burst: 5,
            mode,
            seed: 1,
            name: name.to_owned(),
            heartbeat_timeout: Duration::from_secs(3),
            fresh_loads: true,
        }
    }
}

/// The outcome of one request, as its origin saw it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Where the client sent it.
    pub origin: ServerId,
    /// When it arrived.
    pub arrived: Instant,
    /// When the origin had the (first) response, and from which server.
    pub done: Option<(Instant, ServerId)>,
}

/// Counters of a server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests that arrived from clients.
    pub arrivals: AtomicU64,
    /// Requests started (processing began).
    pub started: AtomicU64,
    /// Requests processed to the end.
    pub completed: AtomicU64,
    /// Copies skipped because another server claimed them.
    pub skipped: AtomicU64,
    /// Copies stopped mid-way by a winning claim.
    pub aborted: AtomicU64,
    /// Requests dropped because they were older than the time-out.
    pub expired: AtomicU64,
    /// Requests forwarded (moved) to other servers.
    pub forwarded: AtomicU64,
    /// Extra copies sent (hedged, tied, or the n-1 extra servers of a forward).
    pub extra: AtomicU64,
    /// Forwarded requests sent again because their servers' reports aged out.
    pub resent: AtomicU64,
    /// Requests served here for other servers.
    pub served_remote: AtomicU64,
}

/// Records what happened to every request.
#[derive(Debug, Default)]
pub struct Recorder {
    outcomes: Mutex<HashMap<u64, Outcome>>,
}

impl Recorder {
    fn arrive(&self, req: u64, origin: ServerId, at: Instant) {
        self.outcomes.lock().insert(req, Outcome { origin, arrived: at, done: None });
    }
    fn complete(&self, req: u64, at: Instant, by: ServerId) -> bool {
        match self.outcomes.lock().get_mut(&req) {
            Some(o) if o.done.is_none() => {
                o.done = Some((at, by));
                true
            }
            _ => false,
        }
    }
    /// Every outcome so far, by request id.
    pub fn outcomes(&self) -> HashMap<u64, Outcome> {
        self.outcomes.lock().clone()
    }
    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.outcomes.lock().values().filter(|o| o.done.is_some()).count()
    }
}

#[derive(Debug, Clone, Copy)]
struct Job {
    msg: RequestMsg,
    /// When it entered this server's queue.
    enqueued: Instant,
    /// A copy has been sent elsewhere (hedged or tied); the local copy stays.
    hedged: bool,
    /// Never forward it (no server was available when it was due).
    stay: bool,
}

/// One simulated server.
pub struct Server {
    id: ServerId,
    cfg: Arc<FarmConfig>,
    epoch: Instant,
    queue: Mutex<BTreeMap<(u64, u64), Job>>,
    work_ready: Notify,
    fwd_ready: Notify,
    claims: Mutex<ClaimTable>,
    running: Mutex<HashMap<u64, Claim>>,
    abort: Notify,
    busy_ns: AtomicU64,
    busy_now: AtomicU32,
    ends: Mutex<HashMap<u64, Instant>>,
    table: SharedTable,
    counters: Arc<RequestCounters>,
    budget: Mutex<Budget>,
    threshold: Mutex<AdaptiveThreshold>,
    inflight: Mutex<HashMap<u64, (RequestMsg, Instant)>>,
    placements: Placements,
    est: LocalLoads,
    recorder: Arc<Recorder>,
    /// Time spent on load balancing here.
    pub overhead: Arc<Overhead>,
    /// Counters.
    pub stats: ServerStats,
    fwd_src: tokio::sync::Mutex<Option<Source>>,
    copy_src: tokio::sync::Mutex<Option<Source>>,
    data: Mutex<Option<Channel>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Server {
    /// Its id.
    pub fn id(&self) -> ServerId {
        self.id
    }
    /// Requests queued or running.
    pub fn backlog(&self) -> usize {
        self.queue.lock().len() + self.busy_now.load(Ordering::Relaxed) as usize
    }
    /// Which servers the forwarded requests went to.
    pub fn placements(&self) -> HashMap<u64, Vec<ServerId>> {
        self.placements.lock().clone()
    }
    /// The load reports this server knows, valid now.
    pub fn known_servers(&self) -> Vec<ServerId> {
        let mut v: Vec<_> = self.table.lock().fresh(now()).map(|r| r.server).collect();
        v.sort();
        v
    }
    /// Counters of this server's part of the data channel (`filtered`: duplicate responses discarded).
    pub fn data_stats(&self) -> Option<kecho::ChannelStats> {
        self.data.lock().as_ref().map(Channel::stats)
    }
    /// Forwarded requests still waiting for a response.
    pub fn inflight(&self) -> Vec<u64> {
        self.inflight.lock().keys().copied().collect()
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
    fn at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    fn enqueue(&self, job: Job) {
        self.queue.lock().insert((job.msg.arrived_ns, job.msg.req), job);
        self.work_ready.notify_one();
        self.fwd_ready.notify_one();
    }

    /// A client request arrives here.
    /// How long a request arriving now would wait here: the work of every queued request and what is left of the
    /// running ones, spread over the workers.
    fn expected_wait(&self, t: Instant) -> Duration {
        let queued: u64 = self.queue.lock().values().map(|j| j.msg.work_ns).sum();
        let running: Duration = self.ends.lock().values().map(|e| e.saturating_duration_since(t)).sum();
        (Duration::from_nanos(queued) + running) / self.cfg.workers as u32
    }

    async fn arrive(&self, req: u64, work: Duration) {
        let t = now();
        self.stats.arrivals.fetch_add(1, Ordering::Relaxed);
        self.counters.arrivals.fetch_add(1, Ordering::Relaxed);
        self.budget.lock().on_arrival();
        self.recorder.arrive(req, self.id, t);
        let msg =
            RequestMsg { req, origin: self.id, arrived_ns: self.ns(t), work_ns: work.as_nanos() as u64, claim: false };
        let mut job = Job { msg, enqueued: t, hedged: false, stay: false };
        if self.cfg.mode == Mode::Hedge {
            // Move at arrival a request that would wait here at least its own work, if a queue at least one
            // request shorter is known (no extra request: it leaves this queue).
            let expected = self.expected_wait(t);
            let ahead = expected.as_secs_f64() / work.as_secs_f64().max(1e-9);
            if expected >= work && self.shorter_queue_elsewhere(ahead) && self.forward(msg).await {
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if self.cfg.mode == Mode::Tied {
            // Tie only a request that would wait longer than the cluster's recent p95 here.
            let expected = self.expected_wait(t);
            let long = expected >= self.threshold.lock().threshold(t);
            if long && self.budget.lock().try_spend() {
                job.msg.claim = true;
                job.hedged = self.send_copy(job.msg).await;
            }
        }
        self.enqueue(job);
    }

    /// Sends a claimable copy of `msg` to one other server (power of two choices); true if one was chosen.
    async fn send_copy(&self, mut msg: RequestMsg) -> bool {
        msg.claim = true;
        let t0 = Instant::now();
        let mut src = self.copy_src.lock().await;
        let Some(src) = src.as_mut() else { return false };
        self.placements.lock().remove(&msg.req);
        let sent = src.submit("request", &msg.attrs(), b"GET /").await.is_ok();
        self.overhead.add_forward(t0.elapsed());
        let chosen = self.placed(msg.req) > 0;
        if sent && chosen {
            self.stats.extra.fetch_add(1, Ordering::Relaxed);
            self.counters.extra.fetch_add(1, Ordering::Relaxed);
            self.inflight.lock().insert(msg.req, (msg, now()));
        }
        sent && chosen
    }

    /// How many servers `req` was just sent to; each counts one more request in their estimated load.
    fn placed(&self, req: u64) -> usize {
        let p = self.placements.lock();
        let Some(p) = p.get(&req) else { return 0 };
        let mut est = self.est.lock();
        for s in p {
            *est.entry(*s).or_insert(0.0) += 1.0;
        }
        p.len()
    }

    /// Whether some other server's estimated load (requests) is at least one request below `mine`, the requests'
    /// worth of work ahead of a new request here.
    fn shorter_queue_elsewhere(&self, mine: f64) -> bool {
        let t = now();
        let table = self.table.lock();
        let est = self.est.lock();
        let shorter = table.fresh(t).filter(|r| r.server != self.id).any(|r| {
            let load = if self.cfg.fresh_loads { est.get(&r.server).copied().unwrap_or(r.index) } else { r.index };
            load + 1.0 <= mine
        });
        shorter
    }

    /// Forwards (moves) `msg` to the n least-loaded other servers; false if none was available.
    async fn forward(&self, msg: RequestMsg) -> bool {
        let t0 = Instant::now();
        let mut src = self.fwd_src.lock().await;
        let Some(src) = src.as_mut() else { return false };
        self.placements.lock().remove(&msg.req);
        let sent = src.submit("request", &msg.attrs(), b"GET /").await.is_ok();
        self.overhead.add_forward(t0.elapsed());
        let n = self.placed(msg.req);
        if !sent || n == 0 {
            return false;
        }
        self.inflight.lock().insert(msg.req, (msg, now()));
        true
    }

    async fn worker(self: Arc<Self>, mut src: Source) {
        let mut free_at = now();
        loop {
            let job = loop {
                let ready = self.work_ready.notified();
                if let Some((_, j)) = self.queue.lock().pop_first() {
                    break j;
                }
                ready.await;
            };
            let msg = job.msg;
            let t = now();
            let arrived = self.at(msg.arrived_ns);
            if t.saturating_duration_since(arrived) >= self.cfg.timeout {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // The virtual clock: start when the previous request finished or when this one was queued.
            let start = free_at.max(job.enqueued).min(t);
            let mut mine = None;
            if msg.claim {
                let claim = Claim { ts: self.ns(start), server: self.id };
                let won = self.claims.lock().try_claim(msg.req, claim, t);
                if let ClaimResult::Lost(_) = won {
                    self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                mine = Some(claim);
                self.running.lock().insert(msg.req, claim);
                let attrs = Attrs::new()
                    .with("req", msg.req as i64)
                    .with("arrived", msg.arrived_ns as i64)
                    .with("ts", claim.ts as i64)
                    .with("server", i64::from(self.id.0));
                let t0 = Instant::now();
                if src.submit("cancel", &attrs, b"").await.is_err() {
                    return;
                }
                self.overhead.add_forward(t0.elapsed());
            }
            {
                let mut th = self.threshold.lock();
                th.record(t, start.saturating_duration_since(arrived));
                *self.counters.waits.lock() = th.summary(t);
            }
            self.stats.started.fetch_add(1, Ordering::Relaxed);
            self.busy_now.fetch_add(1, Ordering::Relaxed);
            let deadline = start + Duration::from_nanos(msg.work_ns);
            self.ends.lock().insert(msg.req, deadline);
            let finished = match mine {
                None => {
                    tokio::time::sleep_until(deadline.into()).await;
                    true
                }
                Some(claim) => self.process_claimed(msg.req, claim, deadline).await,
            };
            self.busy_now.fetch_sub(1, Ordering::Relaxed);
            self.ends.lock().remove(&msg.req);
            self.running.lock().remove(&msg.req);
            let end = if finished { deadline } else { now().min(deadline) };
            self.busy_ns.fetch_add(end.saturating_duration_since(start).as_nanos() as u64, Ordering::Relaxed);
            free_at = end;
            if !finished {
                self.stats.aborted.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            if msg.origin == self.id {
                self.recorder.complete(msg.req, now(), self.id);
                self.inflight.lock().remove(&msg.req);
            } else {
                self.stats.served_remote.fetch_add(1, Ordering::Relaxed);
                let attrs = Attrs::new()
                    .with("rsp", msg.req as i64)
                    .with("origin", i64::from(msg.origin.0))
                    .with("server", i64::from(self.id.0));
                let t0 = Instant::now();
                if src.submit("response", &attrs, b"200 OK").await.is_err() {
                    return;
                }
                self.overhead.add_forward(t0.elapsed());
            }
        }
    }

    /// Processes a claimed copy until `deadline`, unless a lower claim arrives; true if it ran to the end.
    async fn process_claimed(&self, req: u64, mine: Claim, deadline: Instant) -> bool {
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::pin!(sleep);
        loop {
            let aborted = self.abort.notified();
            if self.claims.lock().winner(req).is_some_and(|w| w < mine) {
                return false;
            }
            tokio::select! {
                _ = &mut sleep => return true,
                _ = aborted => {}
            }
        }
    }

    /// Forwards, hedges and re-sends. Wakes at the next deadline of the oldest local request, on every arrival,
    /// and every quarter of a report lifetime to re-send requests whose servers aged out.
    async fn forwarder(self: Arc<Self>) {
        let mode = self.cfg.mode;
        let recheck = self.cfg.lifetime / 4;
        let mut next_resend = now() + recheck;
        loop {
            let woken = self.fwd_ready.notified();
            let t = now();
            let adaptive = if mode == Mode::Hedge { Some(self.threshold.lock().threshold(t)) } else { None };
            let fixed = self.cfg.forward_after;
            let mut moves = Vec::new();
            let mut hedges = Vec::new();
            let mut next = next_resend;
            {
                let mut q = self.queue.lock();
                for (key, job) in q.iter_mut() {
                    if job.msg.origin != self.id || job.stay {
                        continue;
                    }
                    let arrived = self.at(job.msg.arrived_ns);
                    // Younger requests than one not yet due are not due either: the queue is in arrival order.
                    let mut not_due = false;
                    if let Some(h) = adaptive.filter(|_| !job.hedged) {
                        if arrived + h <= t {
                            job.hedged = true;
                            hedges.push(job.msg);
                        } else {
                            next = next.min(arrived + h);
                            not_due = true;
                        }
                    }
                    if arrived + fixed <= t {
                        moves.push(*key);
                    } else {
                        next = next.min(arrived + fixed);
                        if adaptive.is_none() || not_due {
                            break;
                        }
                    }
                }
                if matches!(mode, Mode::None | Mode::Tied) {
                    moves.clear();
                    next = next_resend;
                }
            }
            for msg in hedges {
                let key = (msg.arrived_ns, msg.req);
                if self.budget.lock().try_spend() && self.send_copy(msg).await {
                    if let Some(j) = self.queue.lock().get_mut(&key) {
                        j.msg.claim = true;
                    }
                } else if !moves.contains(&key) {
                    // Over budget: no copy, but the request still leaves this queue; moving it costs no extra.
                    moves.push(key);
                }
            }
            for key in moves {
                let Some(job) = self.queue.lock().remove(&key) else { continue };
                let mut msg = job.msg;
                if let Mode::Cancel { .. } = mode {
                    msg.claim = true;
                }
                if job.hedged {
                    // A copy is out already; this one moves with the same claim rule.
                    msg.claim = true;
                }
                if self.forward(msg).await {
                    self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    let n = self.placements.lock().get(&msg.req).map_or(0, Vec::len) as u64;
                    self.stats.extra.fetch_add(n.saturating_sub(1), Ordering::Relaxed);
                } else {
                    // Nobody to forward to: keep it, and do not try again.
                    self.queue.lock().insert(key, Job { stay: true, ..job });
                }
            }
            if t >= next_resend {
                next_resend = t + recheck;
                self.resend(t).await;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next.max(t + Duration::from_micros(200)).into()) => {}
                _ = woken => {}
            }
        }
    }

    /// Re-sends forwarded requests none of whose servers has a valid report any more, and forgets old ones.
    async fn resend(&self, t: Instant) {
        let mut again = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            let table = self.table.lock();
            let placements = self.placements.lock();
            inflight.retain(|req, (msg, _)| {
                if t.saturating_duration_since(self.at(msg.arrived_ns)) >= self.cfg.timeout {
                    return false;
                }
                let targets = placements.get(req).map(Vec::as_slice).unwrap_or(&[]);
                if !targets.is_empty() && targets.iter().all(|s| table.index(*s, t).is_none()) {
                    again.push(*msg);
                }
                true
            });
        }
        for msg in again {
            if self.forward(msg).await {
                self.stats.resent.fetch_add(1, Ordering::Relaxed);
            }
        }
        let live: std::collections::HashSet<u64> = self.inflight.lock().keys().copied().collect();
        self.placements.lock().retain(|req, _| live.contains(req));
        self.claims.lock().expire(t, self.cfg.timeout * 2);
    }
}

/// A load probe reading a simulated server: the share of time its workers were busy since the last sample, and
/// its backlog.
struct SimProbe {
    server: Arc<Server>,
    last: (Instant, u64),
}

impl LoadProbe for SimProbe {
    fn sample(&mut self) -> LoadSample {
        let t = now();
        let busy = self.server.busy_ns.load(Ordering::Relaxed);
        let span = t.saturating_duration_since(self.last.0).as_nanos() as f64 * self.server.cfg.workers as f64;
        let cpu = if span > 0.0 { ((busy - self.last.1) as f64 / span).clamp(0.0, 1.0) } else { 0.0 };
        self.last = (t, busy);
        LoadSample { cpu, queue: self.server.backlog() as u32, connections: 0, memory: 0.0 }
    }
}

/// A front end: a node that sends every client request to a server over the data channel.
struct FrontEnd {
    id: ServerId,
    table: SharedTable,
    placements: Placements,
    outstanding: LocalLoads,
    src: tokio::sync::Mutex<Source>,
    epoch: Instant,
}

/// The farm: servers, their nodes, and the front end if the mode has one.
pub struct Farm {
    cfg: Arc<FarmConfig>,
    servers: Vec<Arc<Server>>,
    nodes: Vec<Node>,
    tasks: Vec<Vec<tokio::task::AbortHandle>>,
    front: Option<(FrontEnd, Node, Vec<tokio::task::AbortHandle>)>,
    recorder: Arc<Recorder>,
    fe_overhead: Arc<Overhead>,
    epoch: Instant,
    unplaced: AtomicU64,
}

impl std::fmt::Debug for Farm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Farm").field("servers", &self.servers.len()).field("mode", &self.cfg.mode).finish()
    }
}

/// Sinks of one server on the data channel: requests, responses (for its own requests) and cancel events.
const SINKS_PER_SERVER: usize = 3;

impl Farm {
    /// Starts the servers (and the front end), wires the channels and waits until every server knows every
    /// other's load report.
    pub async fn start(cfg: FarmConfig) -> Result<Farm> {
        if cfg.servers == 0 || cfg.workers == 0 {
            return Err(LbError::Invalid("a farm needs at least one server and one worker".into()));
        }
        let cfg = Arc::new(cfg);
        let epoch = now();
        let recorder = Arc::new(Recorder::default());
        let mon_name = format!("{}-monitoring", cfg.name);
        let data_name = format!("{}-data", cfg.name);
        let mut nodes = Vec::new();
        let mut chans = Vec::new();
        for _ in 0..cfg.servers {
            let node = Node::builder().heartbeat_timeout(cfg.heartbeat_timeout).sink_capacity(1 << 16).start().await?;
            let mon = node.channel(&mon_name).await?;
            let data = node.channel(&data_name).await?;
            nodes.push(node);
            chans.push((mon, data));
        }
        let mut servers = Vec::new();
        let mut tasks = Vec::new();
        for (i, (mon, data)) in chans.iter().enumerate() {
            let id = ServerId(i as u32);
            let overhead = Arc::new(Overhead::default());
            let server = Arc::new(Server {
                id,
                cfg: cfg.clone(),
                epoch,
                queue: Mutex::new(BTreeMap::new()),
                work_ready: Notify::new(),
                fwd_ready: Notify::new(),
                claims: Mutex::new(ClaimTable::new()),
                running: Mutex::new(HashMap::new()),
                abort: Notify::new(),
                busy_ns: AtomicU64::new(0),
                busy_now: AtomicU32::new(0),
                ends: Mutex::new(HashMap::new()),
                table: Arc::new(Mutex::new(LoadTable::new())),
                counters: Arc::default(),
                budget: Mutex::new(Budget::new(cfg.budget_ratio, cfg.budget_burst)),
                threshold: Mutex::new(AdaptiveThreshold::new(
                    cfg.hedge_quantile,
                    cfg.hedge_window,
                    cfg.hedge_floor,
                    cfg.forward_after,
                )),
                inflight: Mutex::new(HashMap::new()),
                placements: Arc::default(),
                est: Arc::default(),
                recorder: recorder.clone(),
                overhead: overhead.clone(),
                stats: ServerStats::default(),
                fwd_src: tokio::sync::Mutex::new(None),
                copy_src: tokio::sync::Mutex::new(None),
                data: Mutex::new(None),
            });
            tasks.push(Self::wire(&server, mon, data).await?);
            servers.push(server);
        }
        let fe_overhead = Arc::new(Overhead::default());
        let front = if cfg.mode.front_end() {
            let node = Node::builder().heartbeat_timeout(cfg.heartbeat_timeout).sink_capacity(1 << 16).start().await?;
            let mon = node.channel(&mon_name).await?;
            let data = node.channel(&data_name).await?;
            let id = ServerId(cfg.servers as u32);
            let table: SharedTable = Arc::new(Mutex::new(LoadTable::new()));
            let listener = LoadListener::spawn(&mon, table.clone(), fe_overhead.clone())?;
            data.set_in_filter(Some(Arc::new(Timed::new(
                FirstResponse::new("rsp", cfg.timeout * 2),
                fe_overhead.clone(),
            ))));
            let mut src = data.source()?;
            let placements: Placements = Arc::default();
            let outstanding: LocalLoads = Arc::default();
            match cfg.mode {
                Mode::FrontRoundRobin => src.set_out_filter(Some(Arc::new(Selector::round_robin()))),
                // The front end knows exactly what it sent to each server and what came back: power of two
                // choices (or the least) ranks on that, and the load reports only say who is alive.
                _ => src.set_out_filter(Some(Arc::new(
                    LoadAwareFilter::new(
                        table.clone(),
                        if cfg.mode == Mode::FrontJsq {
                            Box::new(LeastLoaded::new(1))
                        } else {
                            Box::new(PowerOfTwo::new(cfg.seed))
                        },
                        None,
                    )
                    .placements(placements.clone())
                    .local_loads(outstanding.clone())
                    .fallback_to_all(true)
                    .overhead(fe_overhead.clone()),
                ))),
            }
            let mut responses = data.sink(
                SinkOptions::new().types(["response"]).capacity(1 << 16).filter(&format!("origin == {}", id.0)),
            )?;
            let rec = recorder.clone();
            let out = outstanding.clone();
            let resp_task = tokio::spawn(async move {
                while let Ok(ev) = responses.recv().await {
                    if let (Some(req), Some(by)) = (int(ev.attrs(), "rsp"), int(ev.attrs(), "server")) {
                        let by = ServerId(by as u32);
                        *out.lock().entry(by).or_insert(0.0) -= 1.0;
                        rec.complete(req, now(), by);
                    }
                }
            });
            let handles = vec![listener.task.abort_handle(), resp_task.abort_handle()];
            let fe = FrontEnd { id, table, placements, outstanding, src: tokio::sync::Mutex::new(src), epoch };
            Some((fe, node, handles))
        } else {
            None
        };
        let farm = Farm {
            cfg: cfg.clone(),
            servers,
            nodes,
            tasks,
            front,
            recorder,
            fe_overhead,
            epoch,
            unplaced: AtomicU64::new(0),
        };
        // Everyone sees every sink, and every server (and the front end) knows every server's load.
        let fe = usize::from(farm.front.is_some());
        let data_sinks = cfg.servers * SINKS_PER_SERVER + fe;
        for (_, data) in &chans {
            data.wait_for_sinks(data_sinks, Duration::from_secs(10)).await?;
        }
        let all = cfg.servers;
        // The front end's table too: before, a release build could start sending while the front end knew no
        // server, and the OUT-filter sent those requests nowhere.
        let tables: Vec<SharedTable> = farm
            .servers
            .iter()
            .map(|s| s.table.clone())
            .chain(farm.front.iter().map(|(fe, ..)| fe.table.clone()))
            .collect();
        let ready = until(Duration::from_secs(10) + cfg.report_period * 3, || {
            tables.iter().all(|t| t.lock().fresh(now()).count() >= all)
        })
        .await;
        if !ready {
            return Err(LbError::Invalid("the servers did not learn each other's load in time".into()));
        }
        Ok(farm)
    }

    async fn wire(server: &Arc<Server>, mon: &Channel, data: &Channel) -> Result<Vec<tokio::task::AbortHandle>> {
        let cfg = &server.cfg;
        let id = server.id;
        let mut handles = Vec::new();
        // The monitoring channel: this server's reports out, everyone's reports in (the budget reads them too).
        let mcfg = MonitorConfig {
            server: id,
            weights: LoadWeights::default(),
            policy: ReportPolicy::new(cfg.report_period, cfg.report_threshold),
            sample_every: cfg.report_period / 4,
            lifetime: cfg.lifetime,
        };
        let probe = Box::new(SimProbe { server: server.clone(), last: (now(), 0) });
        handles.push(
            LoadMonitor::spawn(mon, probe, mcfg, server.counters.clone(), server.overhead.clone())?.task.abort_handle(),
        );
        let mut reports = mon.sink(SinkOptions::new().types(["load"]).capacity(4096))?;
        let s = server.clone();
        handles.push(
            tokio::spawn(async move {
                while let Ok(ev) = reports.recv().await {
                    let t0 = Instant::now();
                    if let Ok(r) = serde_json::from_slice::<LoadReport>(ev.payload()) {
                        if r.server != s.id {
                            s.budget.lock().on_report(r.server, r.arrivals, r.extra);
                            s.threshold.lock().set_remote(r.server, now(), r.waits.clone());
                        }
                        let (server, index) = (r.server, r.index);
                        if s.table.lock().update(r, now()) {
                            // A new report: what was sent there before it is in its index now.
                            s.est.lock().insert(server, index);
                        }
                    }
                    s.overhead.add_handling(t0.elapsed());
                }
            })
            .abort_handle(),
        );
        *server.data.lock() = Some(data.clone());
        // The data channel: the IN-filter keeps the first response per request.
        data.set_in_filter(Some(Arc::new(Timed::new(
            FirstResponse::new("rsp", cfg.timeout * 2),
            server.overhead.clone(),
        ))));
        let mut requests = data.sink(SinkOptions::new().types(["request"]).capacity(1 << 16).attr("server", id.0))?;
        let mut responses =
            data.sink(SinkOptions::new().types(["response"]).capacity(1 << 16).filter(&format!("origin == {}", id.0)))?;
        let mut cancels = data.sink(SinkOptions::new().types(["cancel"]).capacity(1 << 16))?;
        let n = match cfg.mode {
            Mode::Kecho { n } | Mode::Cancel { n } => n,
            _ => 1,
        };
        let filter = |alloc: Box<dyn kecho_lb::alloc::Allocator>| {
            let f = LoadAwareFilter::new(server.table.clone(), alloc, Some(id))
                .placements(server.placements.clone())
                .overhead(server.overhead.clone());
            Arc::new(if cfg.fresh_loads { f.local_loads(server.est.clone()) } else { f })
        };
        let mut fwd = data.source()?;
        fwd.set_out_filter(Some(filter(Box::new(LeastLoaded::new(n)))));
        *server.fwd_src.lock().await = Some(fwd);
        let mut copy = data.source()?;
        copy.set_out_filter(Some(filter(Box::new(PowerOfTwo::new(cfg.seed ^ u64::from(id.0))))));
        *server.copy_src.lock().await = Some(copy);
        let s = server.clone();
        handles.push(
            tokio::spawn(async move {
                while let Ok(ev) = requests.recv().await {
                    if let Some(msg) = RequestMsg::parse(ev.attrs()) {
                        s.enqueue(Job { msg, enqueued: now(), hedged: false, stay: false });
                    }
                }
            })
            .abort_handle(),
        );
        let s = server.clone();
        handles.push(
            tokio::spawn(async move {
                while let Ok(ev) = responses.recv().await {
                    if let (Some(req), Some(by)) = (int(ev.attrs(), "rsp"), int(ev.attrs(), "server")) {
                        s.inflight.lock().remove(&req);
                        s.recorder.complete(req, now(), ServerId(by as u32));
                    }
                }
            })
            .abort_handle(),
        );
        let s = server.clone();
        handles.push(
            tokio::spawn(async move {
                while let Ok(ev) = cancels.recv().await {
                    let a = ev.attrs();
                    let (Some(req), Some(ts), Some(by), Some(arrived)) =
                        (int(a, "req"), int(a, "ts"), int(a, "server"), int(a, "arrived"))
                    else {
                        continue;
                    };
                    let by = ServerId(by as u32);
                    if by == s.id {
                        continue;
                    }
                    let t = now();
                    if s.claims.lock().observe(req, Claim { ts, server: by }, t) {
                        s.abort.notify_waiters();
                        // The copy queued here will never run: take it out of the queue (and the load index).
                        if s.queue.lock().remove(&(arrived, req)).is_some() {
                            s.stats.skipped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // The origin's copy was won elsewhere; its response will come over the channel.
                }
            })
            .abort_handle(),
        );
        for _ in 0..cfg.workers {
            let src = data.source()?;
            handles.push(tokio::spawn(server.clone().worker(src)).abort_handle());
        }
        if !matches!(cfg.mode, Mode::None) && !cfg.mode.front_end() {
            handles.push(tokio::spawn(server.clone().forwarder()).abort_handle());
        }
        Ok(handles)
    }

    /// A client request with id `req` (unique in the farm) and processing time `work` arrives at server `at` (or
    /// at the front end, in the front-end modes).
    pub async fn arrive(&self, at: usize, req: u64, work: Duration) -> Result<()> {
        if let Some((fe, ..)) = &self.front {
            let t = now();
            self.recorder.arrive(req, fe.id, t);
            let msg = RequestMsg {
                req,
                origin: fe.id,
                arrived_ns: t.saturating_duration_since(fe.epoch).as_nanos() as u64,
                work_ns: work.as_nanos() as u64,
                claim: false,
            };
            let t0 = Instant::now();
            fe.src.lock().await.submit("request", &msg.attrs(), b"GET /").await?;
            self.fe_overhead.add_forward(t0.elapsed());
            let placed = fe.placements.lock().remove(&req).unwrap_or_default();
            if placed.is_empty() && self.cfg.mode != Mode::FrontRoundRobin {
                // No server to send it to: the client's request is lost, and counted.
                self.unplaced.fetch_add(1, Ordering::Relaxed);
            }
            let mut out = fe.outstanding.lock();
            for s in placed {
                *out.entry(s).or_insert(0.0) += 1.0;
            }
            return Ok(());
        }
        let s = self.servers.get(at).ok_or_else(|| LbError::Invalid(format!("no server {at}")))?;
        s.arrive(req, work).await;
        Ok(())
    }

    /// Client requests the front end could send to no server (lost).
    pub fn unplaced(&self) -> u64 {
        self.unplaced.load(Ordering::Relaxed)
    }
    /// The servers.
    pub fn servers(&self) -> &[Arc<Server>] {
        &self.servers
    }
    /// What happened to each request.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }
    /// The farm's epoch (its start).
    pub fn epoch(&self) -> Instant {
        self.epoch
    }
    /// Every node's overhead, summed (front end included).
    pub fn overhead(&self) -> OverheadSnapshot {
        let mut total = self.fe_overhead.snapshot();
        for s in &self.servers {
            total += s.overhead.snapshot();
        }
        total
    }
    /// Stops server `i` at once, as if its host crashed: no goodbye, its load reports stop.
    pub fn kill(&self, i: usize) {
        if let Some(t) = self.tasks.get(i) {
            for h in t {
                h.abort();
            }
        }
        if let Some(n) = self.nodes.get(i) {
            n.kill();
        }
    }
    /// Stops everything.
    pub async fn shutdown(self) {
        for t in self.tasks.iter().flatten() {
            t.abort();
        }
        if let Some((_, node, handles)) = &self.front {
            for h in handles {
                h.abort();
            }
            node.kill();
        }
        for n in &self.nodes {
            n.kill();
        }
    }
}

/// Waits for `cond` to hold, polling every 2 ms, at most `limit` (tokio's clock).
pub(crate) async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}
