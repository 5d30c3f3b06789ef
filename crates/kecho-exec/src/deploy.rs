//! The deployer: the thin I/O layer that carries out the planner's [`Action`]s.
//!
//! [`deploy`] resolves every artifact (fetched once, verified; a wrong one refuses the deploy before anything starts),
//! places every component (all or nothing), then starts a driver task that runs the [`Deployment`] planner: it
//! launches components with their dependencies' addresses in their environment, checks their readiness (a TCP port
//! that accepts, or a command that exits 0, within the timeout), watches their exits, applies the failure policies and
//! publishes [`Notice`]s (the events of the application's channel). [`RunningApp::undeploy`] stops it in reverse
//! order.
//!
//! Components are services: any exit of a component's process counts as a failure.
//!
//! Where components run is behind [`Launcher`]: [`LocalLauncher`] runs them with a [`Supervisor`] on this host (each
//! placement's agent name becomes the task's `KECHO_AGENT`); the agent protocol over kecho channels implements the same
//! trait once the resources crate provides agents.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::app::{expand_vars, AppSpec, ComponentName, Readiness, ReadyCheck, Run};
use crate::place::{place_all, AgentName, PlaceError, Placement, Placer};
use crate::plan::{Action, AppEvent, ComponentState, Deployment};
use crate::repo::{Cache, Digest, Fetch, RepoError};
use crate::task::{Confinement, Limits, ProbeEnv, Supervisor, Task, TaskControl, TaskError, TaskId, TaskSpec};

/// How long a stopped component gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a component must stay ready before its failures in a row are forgotten.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The longest wait before a restart (the first restart is immediate, then 100 ms, doubling).
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);

/// How often a readiness check is retried.
const READY_POLL: Duration = Duration::from_millis(20);

/// How much longer than a readiness check's timeout the deployer waits for the verdict from the component's agent.
const VERDICT_MARGIN: Duration = Duration::from_secs(5);

/// Starts component processes on agents.
pub trait Launcher: Send + Sync + 'static {
    /// Starts `spec` under `placement` (on its agent, within its reservation) and checks its readiness, if it has a
    /// check, where the component runs: a readiness command runs on the component's node, with the component's
    /// environment and in its directory (a command such as `test -e ready.flag` or `pg_isready` means nothing on
    /// the deploying host).
    fn launch(
        &self,
        placement: &Placement,
        spec: TaskSpec,
        ready: Option<Readiness>,
    ) -> impl Future<Output = Result<Launched, TaskError>> + Send;
}

/// A launched component: its task and the verdict of its readiness check to come.
#[derive(Debug)]
pub struct Launched {
    /// The component's task.
    pub task: Task,
    /// `Ok` once it is ready (at once without a check), or why not. A launcher that can no longer tell (the
    /// component ended, its agent was lost) drops the sender.
    pub ready: oneshot::Receiver<Result<(), String>>,
}

/// Runs readiness check `ready` from this host against `host` (a TCP port) or here (a command, with `env`), and
/// sends the verdict; stops checking when the receiver is dropped. Without a check the verdict is `Ok` at once.
pub fn check_ready_here(
    ready: Option<Readiness>,
    host: String,
    env: ProbeEnv,
) -> oneshot::Receiver<Result<(), String>> {
    let (tx, rx) = oneshot::channel();
    match ready {
        None => {
            let _ = tx.send(Ok(()));
        }
        Some(r) => {
            tokio::spawn(async move {
                let mut tx = tx;
                tokio::select! {
                    verdict = wait_ready(&r.check, &host, r.timeout, &env) => {
                        let _ = tx.send(verdict.map_err(|e| e.to_string()));
                    }
                    _ = tx.closed() => {}
                }
            });
        }
    }
    rx
}

/// Runs every component on this host, as if on the agent it was placed on.
#[derive(Debug, Clone)]
pub struct LocalLauncher {
    state_dir: PathBuf,
    confinement: Confinement,
}

impl LocalLauncher {
    /// A launcher keeping task state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>, confinement: Confinement) -> LocalLauncher {
        LocalLauncher { state_dir: state_dir.into(), confinement }
    }
}

impl Launcher for LocalLauncher {
    async fn launch(
        &self,
        placement: &Placement,
        spec: TaskSpec,
        ready: Option<Readiness>,
    ) -> Result<Launched, TaskError> {
        let agent = &placement.agent;
        let dir = self.state_dir.join(&agent.0);
        let supervisor = Supervisor::new(agent.clone(), dir, self.confinement.clone());
        let env = supervisor.probe_env(&spec);
        let task = supervisor.spawn(spec).await?;
        let env = env.within(&task.control);
        Ok(Launched { task, ready: check_ready_here(ready, placement.host.clone(), env) })
    }
}

/// Why a deploy was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// An artifact could not be fetched or failed verification; nothing was started.
    #[error("component `{component}`: {source}")]
    Artifact {
        /// The component.
        component: ComponentName,
        /// The repository error.
        source: RepoError,
    },
    /// A component could not be placed; nothing was started and every reservation made was released.
    #[error("component `{component}` cannot be placed: {source}")]
    Place {
        /// The component.
        component: ComponentName,
        /// The placer's error.
        source: PlaceError,
    },
    /// The application failed while starting and was stopped (nothing is left half-started).
    #[error("component `{component}` could not be made ready ({why}); the application was stopped")]
    Aborted {
        /// The component.
        component: ComponentName,
        /// Its last failure.
        why: String,
    },
    /// The driver is gone.
    #[error("the deployment's driver has ended")]
    Gone,
}

/// An event on the application's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The component it is about.
    pub about: ComponentName,
    /// What happened.
    pub event: AppEvent,
    /// Its dependents, who are told.
    pub to: Vec<ComponentName>,
    /// Where it runs now.
    pub agent: Option<AgentName>,
}

/// One component as `kecho status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentStatus {
    /// Its state.
    pub state: ComponentState,
    /// Its agent.
    pub agent: Option<AgentName>,
    /// Its process id on that agent, while running.
    pub pid: Option<i32>,
    /// How many times it was restarted or replaced.
    pub restarts: u32,
}

/// A deployed application.
#[derive(Debug)]
pub struct RunningApp {
    /// The application's events (failures, recoveries), as its channel carries them.
    pub notices: mpsc::UnboundedReceiver<Notice>,
    status: watch::Receiver<BTreeMap<ComponentName, ComponentStatus>>,
    commands: mpsc::UnboundedSender<Command>,
    done: watch::Receiver<Option<Result<(), (ComponentName, String)>>>,
}

#[derive(Debug)]
enum Command {
    Undeploy(oneshot::Sender<()>),
}

#[derive(Debug)]
enum Internal {
    Ready(ComponentName, u64),
    Stable(ComponentName, u64),
    Launch(ComponentName, u64),
    Failed(ComponentName, u64, String),
    Stopped(ComponentName),
}

impl RunningApp {
    /// Each component's status now.
    pub fn status(&self) -> BTreeMap<ComponentName, ComponentStatus> {
        self.status.borrow().clone()
    }

    /// Waits until every component is ready, or the deploy was aborted.
    pub async fn ready(&mut self) -> Result<(), DeployError> {
        let mut status = self.status.clone();
        let mut done = self.done.clone();
        loop {
            if let Some(Err((component, why))) = done.borrow().clone() {
                return Err(DeployError::Aborted { component, why });
            }
            if status.borrow().values().all(|s| s.state == ComponentState::Ready) {
                return Ok(());
            }
            tokio::select! {
                r = status.changed() => r.map_err(|_| DeployError::Gone)?,
                r = done.changed() => r.map_err(|_| DeployError::Gone)?,
            }
        }
    }

    /// Waits for the status to satisfy `pred`.
    pub async fn wait_status(
        &self,
        pred: impl Fn(&BTreeMap<ComponentName, ComponentStatus>) -> bool,
    ) -> Result<(), DeployError> {
        let mut status = self.status.clone();
        status.wait_for(|s| pred(s)).await.map(|_| ()).map_err(|_| DeployError::Gone)
    }

    /// Stops every component in reverse dependency order and waits until they have stopped.
    pub async fn undeploy(&self) -> Result<(), DeployError> {
        if self.done.borrow().is_some() {
            // Already over (aborted, or undeployed before).
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Undeploy(tx)).map_err(|_| DeployError::Gone)?;
        rx.await.map_err(|_| DeployError::Gone)
    }
}

/// Deploys `app`: resolves artifacts through `cache`, places every component with `placer`, and starts the driver.
/// Without a cache, artifacts are left to the agents: a component's program is then its digest (`sha256:...`), which
/// [`crate::remote::RemoteLauncher`] hands to the agent to fetch and verify.
pub async fn deploy<P, L, F>(
    app: AppSpec,
    placer: Arc<P>,
    launcher: Arc<L>,
    cache: Option<&Cache<F>>,
) -> Result<RunningApp, DeployError>
where
    P: Placer + Send + Sync + 'static,
    L: Launcher,
    F: Fetch,
{
    let order = app.graph.start_order();
    let mut artifacts = BTreeMap::new();
    for c in &order {
        if let Run::Artifact { digest, .. } = &app.components[c].run {
            let Some(cache) = cache else { continue };
            let path = cache.ensure(digest).await;
            let path = path.map_err(|source| DeployError::Artifact { component: c.clone(), source })?;
            artifacts.insert(*digest, path);
        }
    }
    let specs: Vec<_> = order.iter().map(|c| app.components[c].reservation.clone()).collect();
    let placed = place_all(placer.as_ref(), &specs)
        .await
        .map_err(|(i, source)| DeployError::Place { component: order[i].clone(), source })?;
    let placements: BTreeMap<ComponentName, Placement> = order.iter().cloned().zip(placed).collect();

    let deployment = Deployment::new(&app);
    let initial = order
        .iter()
        .map(|c| {
            let s = ComponentStatus {
                state: ComponentState::Waiting,
                agent: Some(placements[c].agent.clone()),
                pid: None,
                restarts: 0,
            };
            (c.clone(), s)
        })
        .collect();
    let (status_tx, status) = watch::channel(initial);
    let (notices_tx, notices) = mpsc::unbounded_channel();
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (done_tx, done) = watch::channel(None);
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let driver = Driver {
        app,
        deployment,
        placer,
        launcher,
        artifacts,
        placements,
        running: BTreeMap::new(),
        checkers: BTreeMap::new(),
        generation: BTreeMap::new(),
        restarts: BTreeMap::new(),
        internal: internal_tx,
        status: status_tx,
        notices: notices_tx,
        done: done_tx,
        undeploy_waiters: Vec::new(),
        last_failure: BTreeMap::new(),
    };
    tokio::spawn(driver.run(internal_rx, commands_rx));
    Ok(RunningApp { notices, status, commands, done })
}

struct Driver<P, L> {
    app: AppSpec,
    deployment: Deployment,
    placer: Arc<P>,
    launcher: Arc<L>,
    artifacts: BTreeMap<Digest, PathBuf>,
    placements: BTreeMap<ComponentName, Placement>,
    running: BTreeMap<ComponentName, TaskControl>,
    /// The readiness check of each component's current instance.
    checkers: BTreeMap<ComponentName, tokio::task::JoinHandle<()>>,
    /// Bumped at every start and stop, so that events of an earlier instance are recognised and ignored.
    generation: BTreeMap<ComponentName, u64>,
    restarts: BTreeMap<ComponentName, u32>,
    internal: mpsc::UnboundedSender<Internal>,
    status: watch::Sender<BTreeMap<ComponentName, ComponentStatus>>,
    notices: mpsc::UnboundedSender<Notice>,
    /// Each component's last failure, for the abort's reason.
    last_failure: BTreeMap<ComponentName, String>,
    done: watch::Sender<Option<Result<(), (ComponentName, String)>>>,
    undeploy_waiters: Vec<oneshot::Sender<()>>,
}

impl<P: Placer + Send + Sync + 'static, L: Launcher> Driver<P, L> {
    async fn run(
        mut self,
        mut internal: mpsc::UnboundedReceiver<Internal>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let actions = self.deployment.start();
        self.execute(actions).await;
        let mut commands_open = true;
        loop {
            tokio::select! {
                Some(ev) = internal.recv() => {
                    let actions = match ev {
                        Internal::Ready(c, g) if self.current(&c, g) => {
                            let internal = self.internal.clone();
                            let name = c.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(STABLE_AFTER).await;
                                let _ = internal.send(Internal::Stable(name, g));
                            });
                            self.deployment.on_ready(&c)
                        }
                        Internal::Stable(c, g) if self.current(&c, g) => {
                            self.deployment.on_stable(&c);
                            Vec::new()
                        }
                        Internal::Launch(c, g) if self.current(&c, g) => {
                            self.start(&c).await;
                            Vec::new()
                        }
                        Internal::Failed(c, g, why) if self.current(&c, g) => {
                            // Info, not a warning: the failure reaches the deployer as a notice (`Failed`), which says
                            // it to the user with what the policy does about it.
                            tracing::info!(app = %self.app.name, component = %c, %why, "component failed");
                            self.last_failure.insert(c.clone(), why.to_string());
                            // A readiness timeout leaves the process running: whatever the policy, it goes.
                            self.kill_instance(&c).await;
                            self.deployment.on_failed(&c)
                        }
                        Internal::Stopped(c) => {
                            self.running.remove(&c);
                            self.deployment.on_stopped(&c)
                        }
                        _ => Vec::new(),
                    };
                    self.execute(actions).await;
                }
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(Command::Undeploy(reply)) => {
                        self.undeploy_waiters.push(reply);
                        let actions = self.deployment.undeploy();
                        self.execute(actions).await;
                    }
                    None => commands_open = false,
                },
                else => break,
            }
            self.publish();
            if self.deployment.all_stopped() && (!self.undeploy_waiters.is_empty() || self.done.borrow().is_some()) {
                for w in self.undeploy_waiters.drain(..) {
                    let _ = w.send(());
                }
                if self.done.borrow().is_none() {
                    let _ = self.done.send(Some(Ok(())));
                }
                for p in std::mem::take(&mut self.placements).into_values() {
                    let _ = self.placer.release(&p).await;
                }
                break;
            }
        }
    }

    fn current(&self, c: &ComponentName, generation: u64) -> bool {
        self.generation.get(c) == Some(&generation)
    }

    fn bump(&mut self, c: &ComponentName) -> u64 {
        let g = self.generation.entry(c.clone()).or_insert(0);
        *g += 1;
        *g
    }

    fn publish(&self) {
        let states = self.deployment.states();
        self.status.send_modify(|m| {
            for (c, state) in states {
                let s = m.entry(c.clone()).or_insert(ComponentStatus { state, agent: None, pid: None, restarts: 0 });
                s.state = state;
                s.agent = self.placements.get(&c).map(|p| p.agent.clone());
                // A component on another node has no pid here (0): shown as `-`.
                s.pid = self.running.get(&c).map(TaskControl::pid).filter(|&p| p > 0);
                s.restarts = self.restarts.get(&c).copied().unwrap_or(0);
            }
        });
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Start(c) => self.start(&c).await,
                Action::Restart(c) => {
                    *self.restarts.entry(c.clone()).or_insert(0) += 1;
                    self.kill_instance(&c).await;
                    self.start_after_backoff(&c).await;
                }
                Action::Replace(c) => {
                    *self.restarts.entry(c.clone()).or_insert(0) += 1;
                    self.kill_instance(&c).await;
                    if let Err(why) = self.replace(&c).await {
                        // No other node fits: that is this attempt's failure; the planner counts it.
                        let g = self.bump(&c);
                        let _ = self.internal.send(Internal::Failed(c.clone(), g, why));
                        continue;
                    }
                    self.start_after_backoff(&c).await;
                }
                Action::Stop(c) => {
                    self.bump(&c);
                    match self.running.get(&c).cloned() {
                        Some(control) => {
                            let internal = self.internal.clone();
                            tokio::spawn(async move {
                                control.stop(STOP_GRACE).await;
                                let _ = internal.send(Internal::Stopped(c));
                            });
                        }
                        None => {
                            let _ = self.internal.send(Internal::Stopped(c));
                        }
                    }
                }
                Action::Notify { about, event, to } => {
                    let agent = self.placements.get(&about).map(|p| p.agent.clone());
                    tracing::info!(app = %self.app.name, component = %about, ?event, "told {} dependents", to.len());
                    let _ = self.notices.send(Notice { about, event, to, agent });
                }
                Action::Abort { component } => {
                    let why = self.last_failure.get(&component).cloned().unwrap_or_else(|| "no reason given".into());
                    tracing::warn!(app = %self.app.name, %component, %why, "deploy aborted");
                    let _ = self.done.send(Some(Err((component, why))));
                }
            }
        }
    }

    /// Starts a failed component again: at once after its first failure, then after 100 ms, doubling up to
    /// [`MAX_RESTART_DELAY`], so that a crash loop does not spin.
    async fn start_after_backoff(&mut self, c: &ComponentName) {
        let attempts = self.deployment.attempts(c);
        if attempts <= 1 {
            self.start(c).await;
            return;
        }
        let delay = Duration::from_millis(100).saturating_mul(1 << (attempts - 2).min(16)).min(MAX_RESTART_DELAY);
        let g = self.bump(c);
        let internal = self.internal.clone();
        let name = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = internal.send(Internal::Launch(name, g));
        });
    }

    /// Kills what is left of a failed instance (a readiness timeout leaves the process running) and ends its
    /// readiness check.
    async fn kill_instance(&mut self, c: &ComponentName) {
        if let Some(checker) = self.checkers.remove(c) {
            checker.abort();
        }
        if let Some(control) = self.running.remove(c) {
            control.stop(Duration::ZERO).await;
        }
    }

    async fn replace(&mut self, c: &ComponentName) -> Result<(), String> {
        let spec = self.app.components[c].reservation.clone();
        let old = self.placements.remove(c);
        let avoid: Vec<AgentName> = old.iter().map(|p| p.agent.clone()).collect();
        let placed = self.placer.place(&spec, &avoid).await;
        if let Some(old) = &old {
            let _ = self.placer.release(old).await;
        }
        match placed {
            Ok(p) => {
                self.placements.insert(c.clone(), p);
                Ok(())
            }
            Err(e) => {
                // Keep running where it was allowed to: take the old node back if it still fits.
                if let Ok(p) = self.placer.place(&spec, &[]).await {
                    self.placements.insert(c.clone(), p);
                }
                Err(format!("no replacement node: {e}"))
            }
        }
    }

    async fn start(&mut self, c: &ComponentName) {
        let generation = self.bump(c);
        let Some(placement) = self.placements.get(c).cloned() else {
            let _ = self.internal.send(Internal::Failed(c.clone(), generation, "no placement".into()));
            return;
        };
        let spec = &self.app.components[c];
        let placements = &self.placements;
        let kecho_env = self.app.dependency_env(c, &|d| placements.get(d).map(|p| p.host.clone()));
        let argv = match &spec.run {
            // The shell expands variables itself.
            Run::Shell(line) => vec!["/bin/sh".to_string(), "-c".to_string(), line.clone()],
            Run::Argv(v) => v.iter().map(|a| expand_vars(a, &kecho_env)).collect(),
            Run::Artifact { digest, args } => {
                let program =
                    self.artifacts.get(digest).map_or_else(|| digest.to_string(), |p| p.display().to_string());
                let mut v = vec![program];
                v.extend(args.iter().map(|a| expand_vars(a, &kecho_env)));
                v
            }
        };
        let task = TaskSpec {
            id: TaskId(format!("{}.{}.{}", self.app.name, c, generation)),
            argv,
            env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            kecho_env,
            limits: Limits { cpus: spec.reservation.cpus, mem: spec.reservation.mem },
            state: None,
        };
        let readiness = spec.readiness.clone();
        // The deployer's own bound on the verdict: the check's timeout and a margin for the messages.
        let bound = readiness.as_ref().map(|r| r.timeout + VERDICT_MARGIN);
        let Launched { task, ready } = match self.launcher.launch(&placement, task, readiness).await {
            Ok(t) => t,
            Err(e) => {
                let _ = self.internal.send(Internal::Failed(c.clone(), generation, e.to_string()));
                return;
            }
        };
        let Task { mut output, control, .. } = task;
        self.running.insert(c.clone(), control.clone());
        // The output is drained so the component never blocks on a full pipe; `kecho logs` will keep the tail.
        let name = c.clone();
        tokio::spawn(async move {
            while let Some(chunk) = output.recv().await {
                tracing::debug!(component = %name, seq = chunk.seq, "{}", String::from_utf8_lossy(&chunk.data).trim_end());
            }
        });
        let internal = self.internal.clone();
        let name = c.clone();
        let exit_control = control.clone();
        tokio::spawn(async move {
            let exit = exit_control.wait().await;
            let _ = internal.send(Internal::Failed(name, generation, format!("exited with status {}", exit.code)));
        });
        let internal = self.internal.clone();
        let name = c.clone();
        let checker = tokio::spawn(async move {
            let verdict = match bound {
                None => ready.await,
                Some(bound) => tokio::time::timeout(bound, ready)
                    .await
                    .unwrap_or_else(|_| Ok(Err(format!("no readiness verdict within {bound:?}")))),
            };
            let _ = internal.send(match verdict {
                Ok(Ok(())) => Internal::Ready(name, generation),
                Ok(Err(why)) => Internal::Failed(name, generation, why),
                Err(_) => Internal::Failed(name, generation, "ended before its readiness was known".into()),
            });
        });
        // A check still polling for an earlier instance has nothing left to check.
        if let Some(old) = self.checkers.insert(c.clone(), checker) {
            old.abort();
        }
    }
}

/// The `kecho status APP` table: one line per component in start order, with its wave, state, agent, pid,
/// restarts and the components it needs.
pub fn render_status(app: &AppSpec, status: &BTreeMap<ComponentName, ComponentStatus>) -> String {
    let mut out = format!(
        "{:<5} {:<20} {:<9} {:<16} {:>8} {:>8}  needs\n",
        "wave", "component", "state", "agent", "pid", "restarts"
    );
    for (wave, names) in app.graph.waves().iter().enumerate() {
        for c in names {
            let s = status.get(c);
            let state = s.map(|s| state_name(s.state)).unwrap_or("unknown");
            let agent = s.and_then(|s| s.agent.as_ref()).map(|a| a.0.as_str()).unwrap_or("-");
            let pid = s.and_then(|s| s.pid).map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let restarts = s.map(|s| s.restarts).unwrap_or(0);
            let needs: Vec<String> = app.graph.needs(c).iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "{wave:<5} {:<20} {state:<9} {agent:<16} {pid:>8} {restarts:>8}  {}\n",
                c.as_str(),
                if needs.is_empty() { "-".to_string() } else { needs.join(", ") }
            ));
        }
    }
    out
}

fn state_name(s: ComponentState) -> &'static str {
    match s {
        ComponentState::Waiting => "waiting",
        ComponentState::Starting => "starting",
        ComponentState::Ready => "ready",
        ComponentState::Failed => "failed",
        ComponentState::Stopping => "stopping",
        ComponentState::Stopped => "stopped",
    }
}

/// Why a readiness check did not pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotReady {
    /// The readiness command could not be started.
    #[error("readiness command cannot start: {0}")]
    CannotStart(#[source] std::io::Error),
    /// The check did not pass in time.
    #[error("not ready within {0:?}")]
    TimedOut(Duration),
}

/// Runs a readiness check until it passes or `timeout` has gone by: a TCP connect to `host`, or a shell command run
/// here with `env` (the component's directory and environment).
pub async fn wait_ready(check: &ReadyCheck, host: &str, timeout: Duration, env: &ProbeEnv) -> Result<(), NotReady> {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let passed = match check {
            ReadyCheck::Tcp(port) => {
                matches!(
                    tokio::time::timeout(remaining, tokio::net::TcpStream::connect((host, *port))).await,
                    Ok(Ok(_))
                )
            }
            ReadyCheck::Command(cmd) => {
                // Within the task's bounds when it has them (its group, its cgroup or rlimits): see ProbeEnv::spawn.
                let mut child = match env.spawn(cmd).await {
                    Ok(c) => c,
                    Err(e) => return Err(NotReady::CannotStart(e)),
                };
                matches!(tokio::time::timeout(remaining, child.wait()).await, Ok(Ok(s)) if s.success())
            }
        };
        if passed {
            return Ok(());
        }
        if Instant::now() + READY_POLL >= deadline {
            return Err(NotReady::TimedOut(timeout));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_readiness_waits_for_the_listener() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(l);
        });
        wait_ready(&ReadyCheck::Tcp(port), "127.0.0.1", Duration::from_secs(5), &ProbeEnv::default()).await.unwrap();
        late.abort();
    }

    #[tokio::test]
    async fn readiness_times_out() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let err = wait_ready(&ReadyCheck::Tcp(port), "127.0.0.1", Duration::from_millis(100), &ProbeEnv::default())
            .await
            .unwrap_err();
        assert!(matches!(err, NotReady::TimedOut(_)), "{err:?}");
        let err = wait_ready(
            &ReadyCheck::Command("exit 1".into()),
            "127.0.0.1",
            Duration::from_millis(100),
            &ProbeEnv::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, NotReady::TimedOut(_)), "{err:?}");
        wait_ready(&ReadyCheck::Command("exit 0".into()), "127.0.0.1", Duration::from_secs(5), &ProbeEnv::default())
            .await
            .unwrap();
    }
}
