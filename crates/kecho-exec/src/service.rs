//! The agent side of remote execution over kecho channels (`kecho agent --allow-exec`): the thin I/O layer around
//! [`Supervisor`] and the pure bookkeeping of [`crate::agent`].
//!
//! Everyone meets on the channel [`CHANNEL`]. Every message is one event of type [`ExecMsg::event_type`] with a `to`
//! attribute: an agent's sink takes events addressed to its name or to everyone ([`EVERYONE`]), a submitter's sink
//! those addressed to its id, plus every agent's [`ExecMsg::Alive`]. A submitted task runs only within the
//! reservation the submitter made for it (the agent checks its id and fence with its resource ledger first); its
//! output goes back chunk by chunk in the order the agent read it; its end is reported with its status. A submitter
//! silent for the heartbeat timeout has its tasks stopped. A drain checkpoints and stops every task and tells each
//! submitter, who restarts it elsewhere if its policy says so. Every action is written to the audit log with who
//! asked.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kecho::{Attrs, Channel, Overflow, Sink, SinkOptions, Source, Value};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::agent::{AuditLog, CheckpointShipper, OutputLog, SubmitterLeases};
use crate::app::ReadyCheck;
use crate::auth::{AuthError, ExecPolicy};
use crate::deploy::wait_ready;
use crate::place::{AgentName, Placement};
use crate::reaper::Reaper;
use crate::repo::Cache;
use crate::repo_net::ChannelFetch;
use crate::restart::{Ending, RestartPolicy};
use crate::task::{Confinement, Limits, OutputChunk, Supervisor, TaskControl, TaskExit, TaskId, TaskSpec};
use crate::wire::{ExecMsg, LogChunk, Submit, TaskRow};

/// The channel submitters and agents meet on.
pub const CHANNEL: &str = "kecho.exec";
/// The `to` address of a message for every agent.
pub const EVERYONE: &str = "*";
/// Every message type an agent receives.
pub const AGENT_TYPES: &[&str] =
    &["exec.submit", "exec.stop", "exec.drain", "exec.heartbeat", "exec.list", "exec.logs"];

/// Checks that a placement names a live reservation of this agent (its id and fence), with the reason when not.
pub type ReservationCheck = Arc<dyn Fn(&Placement) -> Result<(), NoReservation> + Send + Sync>;

/// Why a placement does not name a live reservation of this agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NoReservation {
    /// The submission carries no reservation id.
    #[error("the submission carries no reservation id")]
    Missing,
    /// The reservation id does not parse.
    #[error(transparent)]
    BadId(#[from] kecho_resources::ParseError),
    /// The agent's ledger does not confirm it (unknown, expired, released or fenced off).
    #[error(transparent)]
    Ledger(#[from] kecho_resources::LedgerError),
}

/// How an exec agent runs.
#[derive(Clone)]
pub struct ServiceConfig {
    /// The agent's name (`KECHO_AGENT`; submitters address it by this name).
    pub name: AgentName,
    /// Where task state directories live.
    pub state_dir: PathBuf,
    /// cgroup v2 or rlimits.
    pub confinement: Confinement,
    /// A submitter silent this long has its tasks stopped.
    pub heartbeat_timeout: Duration,
    /// SIGTERM to SIGKILL when the agent stops a task on its own (silent submitter, drain).
    pub stop_grace: Duration,
    /// The audit log (one JSON line per action), if any.
    pub audit: Option<PathBuf>,
    /// Bytes of recent output kept per task for `kecho logs`.
    pub log_bytes: usize,
    /// Ended tasks remembered for `kecho ps` and `kecho logs`.
    pub keep_ended: usize,
    /// The reservation check; `None` runs tasks without one (tests, a host without a resource agent).
    pub check: Option<ReservationCheck>,
    /// The address other nodes reach this host at (a deployed component's dependents get it); empty: unknown.
    pub host: String,
    /// Under an access policy: only holders of this authority's `exec` credential may submit, stop or drain
    /// ([`crate::auth`]). `None`: anyone who reaches the channel may (the agent still runs only with
    /// `--allow-exec`).
    pub policy: Option<ExecPolicy>,
    /// The agent's artifact cache in front of the repository nodes: a submission that names an artifact runs its
    /// verified copy. `None`: such submissions are refused.
    pub artifacts: Option<Arc<Cache<ChannelFetch>>>,
    /// The program every task starts under ([`crate::reaper`]).
    pub reaper: Reaper,
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("name", &self.name)
            .field("state_dir", &self.state_dir)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("audit", &self.audit)
            .field("checks_reservations", &self.check.is_some())
            .field("policy", &self.policy)
            .finish()
    }
}

impl ServiceConfig {
    /// Defaults: a 3 s heartbeat timeout, 5 s grace, 256 KiB of output per task, 64 ended tasks remembered, no
    /// audit log, no reservation check, the reaper [`Reaper::locate`] finds.
    pub fn new(name: AgentName, state_dir: impl Into<PathBuf>, confinement: Confinement) -> ServiceConfig {
        ServiceConfig {
            name,
            state_dir: state_dir.into(),
            confinement,
            heartbeat_timeout: Duration::from_secs(3),
            stop_grace: Duration::from_secs(5),
            audit: None,
            log_bytes: 256 << 10,
            keep_ended: 64,
            check: None,
            host: String::new(),
            policy: None,
            artifacts: None,
            reaper: Reaper::locate(),
        }
    }
}

/// Why the exec service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The channel refused a sink or source.
    #[error("exec channel: {0}")]
    Channel(#[from] kecho::Error),
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A running exec agent. Stopping it stops its tasks.
#[derive(Debug)]
pub struct ExecService {
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ExecService {
    /// Starts serving on `channel` (normally [`CHANNEL`]).
    pub async fn start(channel: &Channel, cfg: ServiceConfig) -> Result<ExecService, ServiceError> {
        let sink = channel.sink(
            SinkOptions::new()
                .types(AGENT_TYPES.iter().copied())
                .filter(&format!("to == \"{}\" || to == \"{EVERYONE}\"", cfg.name.0))
                .attr("agent", cfg.name.0.clone())
                .attr("host", cfg.host.clone())
                .capacity(65_536)
                .overflow(Overflow::Block),
        )?;
        let source = channel.source()?;
        let audit = match &cfg.audit {
            Some(p) => Some(AuditLog::open(p).map_err(|source| ServiceError::Audit { path: p.clone(), source })?),
            None => None,
        };
        let stop = Arc::new(Notify::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let st = State {
            supervisor: Supervisor::new(cfg.name.clone(), cfg.state_dir.clone(), cfg.confinement.clone())
                .with_reaper(cfg.reaper.clone()),
            leases: SubmitterLeases::new(cfg.heartbeat_timeout),
            cfg,
            channel: channel.clone(),
            source,
            audit,
            runs: BTreeMap::new(),
            ended: VecDeque::new(),
            drained: false,
            internal: tx,
            next_alive: now,
        };
        let task = tokio::spawn(serve(st, sink, rx, stop.clone()));
        Ok(ExecService { stop, task })
    }

    /// Stops every task (SIGTERM, then SIGKILL after the grace) and the service.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

enum Internal {
    Chunk(TaskId, u32, OutputChunk),
    Ended(TaskId, u32, TaskExit),
    /// The verdict of a task's readiness command.
    Ready(TaskId, u32, Result<(), String>),
}

struct Run {
    submitter: String,
    /// The node whose `exec` credential signed the submission (only it may stop the task), if signed.
    by_node: Option<kecho::NodeId>,
    run: u32,
    argv: Vec<String>,
    control: TaskControl,
    shipper: Option<CheckpointShipper>,
    since_ms: u64,
    limits: String,
    state: String,
    log: OutputLog,
    draining: bool,
    stopping: bool,
    /// Whether the submitter may restart the task after a failure (its last state then goes back with its end).
    restarts_on_failure: bool,
}

struct State {
    cfg: ServiceConfig,
    supervisor: Supervisor,
    channel: Channel,
    source: Source,
    audit: Option<AuditLog>,
    leases: SubmitterLeases,
    runs: BTreeMap<TaskId, Run>,
    ended: VecDeque<(TaskId, Run)>,
    drained: bool,
    internal: mpsc::UnboundedSender<Internal>,
    next_alive: Instant,
}

/// Who asked, for the audit log: the node that signed the request and the submitter's id, or the id alone.
fn who_text(node: Option<kecho::NodeId>, submitter: &str) -> String {
    match node {
        Some(n) => format!("{submitter} (node {n})"),
        None => submitter.to_owned(),
    }
}

fn refusal_detail(who: &Result<Option<kecho::NodeId>, AuthError>, needed: &str) -> String {
    match who {
        Err(e) => format!("not allowed: {e}"),
        Ok(_) => format!("not allowed: only {needed} may"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn serve(mut st: State, mut sink: Sink, mut rx: mpsc::UnboundedReceiver<Internal>, stop: Arc<Notify>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            ev = sink.recv() => match ev {
                Ok(ev) => match ExecMsg::decode(ev.payload()) {
                    Ok(msg) => {
                        let who = st.authenticate(&ev);
                        st.on_message(msg, who).await
                    }
                    Err(e) => tracing::warn!(error = %e, "an exec message that could not be read"),
                },
                Err(kecho::RecvError::Closed) => break,
                Err(e) => tracing::warn!(error = %e, "exec sink"),
            },
            Some(i) = rx.recv() => st.on_internal(i).await,
            _ = tick.tick() => st.on_tick().await,
        }
    }
    // Stop every task at once, and report their ends as far as the channel still carries them.
    let grace = st.cfg.stop_grace;
    for r in st.runs.values_mut() {
        r.stopping = true;
    }
    let stops: Vec<_> = st
        .runs
        .values()
        .map(|r| {
            let c = r.control.clone();
            tokio::spawn(async move { c.stop(grace).await })
        })
        .collect();
    for s in stops {
        let _ = s.await;
    }
    while let Ok(i) = rx.try_recv() {
        st.on_internal(i).await;
    }
}

impl State {
    async fn send(&mut self, to: &str, msg: &ExecMsg) {
        let attrs = Attrs::new().with("to", to.to_owned());
        if let Err(e) = self.source.submit(msg.event_type(), &attrs, &msg.encode()).await {
            tracing::warn!(error = %e, ty = msg.event_type(), "could not send an exec message");
        }
    }

    fn audit(&mut self, who: &str, action: &str, target: &str, detail: &str) {
        tracing::info!(who, action, target, detail, "exec");
        if let Some(a) = &mut self.audit {
            if let Err(e) = a.record(who, action, target, detail) {
                tracing::warn!(error = %e, "audit log write failed");
            }
        }
    }

    /// Who signed a request: under a policy, the node holding the `exec` right or why the request is refused;
    /// without one, the node whose credential signed it, if any.
    fn authenticate(&self, ev: &kecho::Event) -> Result<Option<kecho::NodeId>, AuthError> {
        let to = match ev.attrs().get("to") {
            Some(Value::Str(s)) => s.as_str(),
            _ => "",
        };
        match &self.cfg.policy {
            Some(p) => p.verify(self.channel.name(), ev.ty(), to, ev.payload(), ev.attrs(), unix_ms()).map(Some),
            None => Ok(crate::auth::signer(ev.ty(), to, ev.payload(), ev.attrs())),
        }
    }

    async fn on_message(&mut self, msg: ExecMsg, who: Result<Option<kecho::NodeId>, AuthError>) {
        let now = Instant::now();
        match msg {
            ExecMsg::Submit(s) => match who {
                Ok(node) => self.submit(s, node).await,
                Err(e) => {
                    self.wait_for_submitter(&s.submitter).await;
                    let by = s.submitter.clone();
                    self.refuse(&s, &by, format!("not allowed: {e}")).await
                }
            },
            ExecMsg::Stop { task, grace_ms } => {
                let Some(r) = self.runs.get_mut(&task) else { return };
                let asked = who.as_ref().ok().copied().flatten();
                if self.cfg.policy.is_some() && (asked.is_none() || asked != r.by_node) {
                    let (target, detail) = (task.0.clone(), refusal_detail(&who, "the task's submitter"));
                    return self.audit(&who_text(asked, "?"), "refuse-stop", &target, &detail);
                }
                r.stopping = true;
                let by = who_text(r.by_node, &r.submitter);
                let control = r.control.clone();
                tokio::spawn(async move { control.stop(Duration::from_millis(grace_ms)).await });
                self.audit(&by, "stop", &task.0, &format!("grace {grace_ms} ms"));
            }
            ExecMsg::Drain { agent, by } if agent == self.cfg.name => match who {
                Ok(node) => self.drain(&by, node).await,
                Err(e) => {
                    let reason = format!("not allowed: {e}");
                    self.audit(&by, "refuse-drain", &agent.0, &reason);
                    let msg = ExecMsg::Refused { task: TaskId(format!("drain:{agent}")), agent, reason };
                    self.send(&by, &msg).await;
                }
            },
            ExecMsg::Heartbeat { submitter } => self.leases.heard(&submitter, now.into_std()),
            ExecMsg::List { reply_to } => {
                let tasks: Vec<TaskRow> = self
                    .runs
                    .iter()
                    .chain(self.ended.iter().map(|(t, r)| (t, r)))
                    .map(|(t, r)| TaskRow {
                        task: t.clone(),
                        run: r.run,
                        submitter: r.submitter.clone(),
                        argv: r.argv.clone(),
                        state: r.state.clone(),
                        since_ms: r.since_ms,
                        limits: r.limits.clone(),
                    })
                    .collect();
                let msg = ExecMsg::Tasks { agent: self.cfg.name.clone(), tasks };
                self.send(&reply_to, &msg).await;
            }
            ExecMsg::Logs { reply_to, task } => {
                let found =
                    self.runs.get(&task).or_else(|| self.ended.iter().rev().find(|(t, _)| *t == task).map(|x| &x.1));
                let Some(r) = found else { return };
                let chunks = r.log.since(0).map(|c| LogChunk { stream: c.stream, data: c.data.clone() }).collect();
                let msg = ExecMsg::Log { agent: self.cfg.name.clone(), task, dropped: r.log.dropped(), chunks };
                self.send(&reply_to, &msg).await;
            }
            _ => {}
        }
    }

    /// Waits (2 s at most) until the submitter's sink is known here, so that the first answer reaches it.
    async fn wait_for_submitter(&self, submitter: &str) -> bool {
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let known = self
                .channel
                .sink_attrs()
                .iter()
                .any(|(_, a)| matches!(a.get("submitter"), Some(Value::Str(s)) if s == submitter));
            if known {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn refuse(&mut self, s: &Submit, who: &str, reason: String) {
        self.audit(who, "refuse", &s.task.0, &reason);
        let msg = ExecMsg::Refused { task: s.task.clone(), agent: self.cfg.name.clone(), reason };
        self.send(&s.submitter, &msg).await;
    }

    async fn submit(&mut self, s: Submit, node: Option<kecho::NodeId>) {
        let who = who_text(node, &s.submitter);
        if !self.wait_for_submitter(&s.submitter).await {
            tracing::warn!(submitter = %s.submitter, task = %s.task, "the submitter's sink is not known here yet");
        }
        if let Some(r) = self.runs.get(&s.task) {
            if r.run >= s.run {
                // A duplicate of a submission already running.
                return;
            }
        }
        if self.drained {
            return self.refuse(&s, &who, format!("agent {} is drained", self.cfg.name)).await;
        }
        if s.argv.is_empty() {
            return self.refuse(&s, &who, "no command".into()).await;
        }
        match (&s.placement, &self.cfg.check) {
            (Some(p), _) if p.agent != self.cfg.name => {
                return self.refuse(&s, &who, format!("placed on {}, not here", p.agent)).await;
            }
            (None, Some(_)) => return self.refuse(&s, &who, "no reservation".into()).await,
            (Some(p), Some(check)) => {
                if let Err(reason) = check(p) {
                    return self.refuse(&s, &who, format!("reservation: {reason}")).await;
                }
            }
            _ => {}
        }
        let mut argv = s.argv.clone();
        if let Some(digest) = &s.artifact {
            let Some(cache) = self.cfg.artifacts.clone() else {
                return self
                    .refuse(&s, &who, format!("task names artifact {digest}, and this agent has no repository"))
                    .await;
            };
            // A wrong or damaged artifact is refused here (the cache verifies it against its digest): never run.
            match cache.ensure(digest).await {
                Ok(path) => argv[0] = path.display().to_string(),
                Err(e) => return self.refuse(&s, &who, e.to_string()).await,
            }
        }
        let mut detail = format!("run {}: {}", s.run, s.argv.join(" "));
        if let Some(probe) = &s.ready {
            detail.push_str(&format!(" (readiness: {})", probe.cmd));
        }
        self.audit(&who, "task", &s.task.0, &detail);
        let spec = TaskSpec {
            id: s.task.clone(),
            argv,
            env: s.env.clone(),
            kecho_env: s.kecho_env.clone(),
            limits: Limits { cpus: s.spec.cpus, mem: s.spec.mem },
            state: s.state.clone(),
        };
        self.supersede(&s.task, s.run, &who);
        let probe_env = self.supervisor.probe_env(&spec);
        let mut task = match self.supervisor.spawn(spec).await {
            Ok(t) => t,
            Err(e) => return self.refuse(&s, &who, e.to_string()).await,
        };
        // The readiness command runs within the task's bounds: its process group, its cgroup or its rlimits.
        let probe_env = probe_env.within(&task.control);
        let now = Instant::now();
        let limits = task.limits.to_string();
        let started = ExecMsg::Started {
            task: s.task.clone(),
            run: s.run,
            agent: self.cfg.name.clone(),
            limits: task.limits.clone(),
        };
        self.send(&s.submitter, &started).await;
        self.leases.track(&s.submitter, s.task.clone(), now.into_std());
        let control = task.control.clone();
        let mut output = std::mem::replace(&mut task.output, mpsc::channel(1).1);
        let tx = self.internal.clone();
        let (id, run, waiter) = (s.task.clone(), s.run, control.clone());
        tokio::spawn(async move {
            while let Some(chunk) = output.recv().await {
                let _ = tx.send(Internal::Chunk(id.clone(), run, chunk));
            }
            let exit = waiter.wait().await;
            let _ = tx.send(Internal::Ended(id, run, exit));
        });
        if let Some(probe) = s.ready.clone() {
            // The readiness command runs here, on the component's node, until it passes, its timeout passes, or the
            // task ends (its exit then says enough).
            let (tx, id, run, waiter) = (self.internal.clone(), s.task.clone(), s.run, control.clone());
            let check = ReadyCheck::Command(probe.cmd);
            let timeout = Duration::from_millis(probe.timeout_ms);
            tokio::spawn(async move {
                tokio::select! {
                    verdict = wait_ready(&check, "127.0.0.1", timeout, &probe_env) => {
                        let _ = tx.send(Internal::Ready(id, run, verdict.map_err(|e| e.to_string())));
                    }
                    _ = waiter.wait() => {}
                }
            });
        }
        let shipper = s.checkpoint_every().map(|every| CheckpointShipper::new(every, now.into_std()));
        let run = Run {
            submitter: s.submitter,
            by_node: node,
            run: s.run,
            argv: s.argv,
            control,
            shipper,
            since_ms: unix_ms(),
            limits,
            state: "running".into(),
            log: OutputLog::new(self.cfg.log_bytes),
            draining: false,
            stopping: false,
            restarts_on_failure: s.restart == RestartPolicy::OnFailure,
        };
        if let Some(old) = self.runs.insert(s.task.clone(), run) {
            self.remember(s.task, old);
        }
    }

    /// A newer run `run` of `task` is about to start here: an older run of it that still runs here is stopped. Its
    /// submitter gave it up (this agent fell silent for longer than the heartbeat timeout, a freeze or a cut, and the
    /// task was restarted: here again, since no other agent fitted), and two runs of one task must not go on side by
    /// side. Its end is not reported: the submitter follows the newer run only.
    fn supersede(&mut self, task: &TaskId, run: u32, who: &str) {
        let Some(old) = self.runs.get_mut(task).filter(|r| r.run < run && r.state == "running") else { return };
        old.stopping = true;
        old.state = format!("superseded by run {run}");
        let control = old.control.clone();
        let grace = self.cfg.stop_grace;
        let detail = format!("run {} superseded by run {run}", old.run);
        tokio::spawn(async move { control.stop(grace).await });
        self.audit(who, "stop", &task.0, &detail);
    }

    fn remember(&mut self, task: TaskId, run: Run) {
        self.ended.push_back((task, run));
        while self.ended.len() > self.cfg.keep_ended {
            self.ended.pop_front();
        }
    }

    async fn drain(&mut self, by: &str, node: Option<kecho::NodeId>) {
        self.drained = true;
        let name = self.cfg.name.clone();
        self.audit(&who_text(node, by), "drain", &name.0, &format!("{} task(s)", self.runs.len()));
        let mut told = Vec::new();
        for r in self.runs.values_mut() {
            if r.state != "running" {
                continue;
            }
            r.draining = true;
            told.push(r.submitter.clone());
            let control = r.control.clone();
            let grace = self.cfg.stop_grace;
            tokio::spawn(async move { control.stop(grace).await });
        }
        // The one who asked is told too: that is its confirmation.
        told.push(by.to_owned());
        told.sort();
        told.dedup();
        for s in told {
            self.send(&s, &ExecMsg::Drain { agent: name.clone(), by: by.to_owned() }).await;
        }
    }

    async fn on_internal(&mut self, i: Internal) {
        match i {
            Internal::Ready(task, run, verdict) => {
                let Some(r) = self.runs.get(&task).filter(|r| r.run == run) else { return };
                let to = r.submitter.clone();
                let msg = ExecMsg::Ready { task, run, agent: self.cfg.name.clone(), error: verdict.err() };
                self.send(&to, &msg).await;
            }
            Internal::Chunk(task, run, chunk) => {
                let Some(r) = self.runs.get_mut(&task).filter(|r| r.run == run) else { return };
                r.log.push(chunk.clone());
                let to = r.submitter.clone();
                self.send(&to, &ExecMsg::output(&task, run, chunk)).await;
            }
            Internal::Ended(task, run, exit) => {
                let Some(r) = self.runs.get_mut(&task).filter(|r| r.run == run) else { return };
                self.leases.untrack(&task);
                let to = r.submitter.clone();
                let (ending, status, state) = if r.draining {
                    (Ending::Drained, None, "drained".to_owned())
                } else if r.stopping {
                    (Ending::Stopped, Some(exit), format!("stopped ({})", exit.code))
                } else {
                    (Ending::Exited(exit.code), Some(exit), format!("exited {}", exit.code))
                };
                r.state = state;
                // A drained task's last state goes back so that it continues elsewhere, and so does a failed one's
                // that its submitter restarts on failure: the restarted run starts from the last state it saved.
                let failed_restartable = r.restarts_on_failure && !r.stopping && !exit.success();
                let checkpoint =
                    if r.draining || failed_restartable { r.control.checkpoint().await.ok().flatten() } else { None };
                if let Some(state) = checkpoint {
                    self.send(&to, &ExecMsg::Checkpoint { task: task.clone(), run, state }).await;
                }
                self.send(&to, &ExecMsg::Exit { task: task.clone(), run, ending, exit: status }).await;
                if let Some(r) = self.runs.remove(&task) {
                    self.remember(task, r);
                }
            }
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        if now >= self.next_alive {
            // Three announcements per heartbeat timeout (at most one a second), so one lost event is no loss.
            self.next_alive = now + (self.cfg.heartbeat_timeout / 3).min(Duration::from_secs(1));
            let msg = ExecMsg::Alive {
                agent: self.cfg.name.clone(),
                drained: self.drained,
                heartbeat_ms: self.cfg.heartbeat_timeout.as_millis() as u64,
            };
            self.send(EVERYONE, &msg).await;
        }
        for (submitter, tasks) in self.leases.expire(now.into_std()) {
            for task in tasks {
                let Some(r) = self.runs.get_mut(&task) else { continue };
                r.stopping = true;
                let control = r.control.clone();
                let grace = self.cfg.stop_grace;
                tokio::spawn(async move { control.stop(grace).await });
                let detail = format!("submitter {submitter} silent for {:?}", self.cfg.heartbeat_timeout);
                self.audit("agent", "stop", &task.0, &detail);
            }
        }
        let due: Vec<TaskId> = self
            .runs
            .iter()
            .filter(|(_, r)| r.state == "running" && r.shipper.as_ref().is_some_and(|s| s.due(now.into_std())))
            .map(|(t, _)| t.clone())
            .collect();
        for task in due {
            let Some(r) = self.runs.get_mut(&task) else { continue };
            let state = r.control.checkpoint().await.ok().flatten();
            let ship = r.shipper.as_mut().is_some_and(|s| s.offer(state.as_deref(), now.into_std(), false));
            if let (true, Some(state)) = (ship, state) {
                let (to, run) = (r.submitter.clone(), r.run);
                self.send(&to, &ExecMsg::Checkpoint { task, run, state }).await;
            }
        }
    }
}
