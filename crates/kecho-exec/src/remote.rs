//! The submitter side over kecho channels: the thin I/O layer that carries out a [`RunSession`]'s actions (`kecho
//! run`), and the queries of `kecho ps` and `kecho logs`, and `kecho agent drain`.
//!
//! A submitter has an id ([`submitter_id`]) that addresses its sink on [`CHANNEL`]; it sends a heartbeat to every
//! agent at a third of the heartbeat timeout (agents stop the tasks of a silent submitter), and counts its task's
//! agent as lost when that agent's [`ExecMsg::Alive`] stops for the timeout.

use std::collections::BTreeMap;
use std::time::Duration;

use kecho::{Attrs, Channel, Overflow, Sink, SinkOptions, Source, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::place::{AgentName, Placer};
use crate::service::{CHANNEL, EVERYONE};
use crate::submit::{RunAction, RunSession};
use crate::task::{Stream, TaskId};
use crate::wire::{ExecMsg, LogChunk, TaskRow};

/// The message types a submitter receives.
pub const SUBMITTER_TYPES: &[&str] = &[
    "exec.started",
    "exec.refused",
    "exec.output",
    "exec.exit",
    "exec.checkpoint",
    "exec.drain",
    "exec.alive",
    "exec.tasks",
    "exec.log",
    "exec.undeploy",
    "exec.ready",
];

/// Errors of the submitter's channel layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The channel refused a sink or source, or closed.
    #[error("exec channel: {0}")]
    Channel(#[from] kecho::Error),
    /// The agent named was not seen on the channel in time.
    #[error("agent {agent} is not on channel {CHANNEL} (waited {waited:?})")]
    NoAgent {
        /// The agent.
        agent: String,
        /// How long.
        waited: Duration,
    },
    /// The agent refused the request.
    #[error("agent {agent} refused: {reason}")]
    Refused {
        /// The agent.
        agent: String,
        /// Why.
        reason: String,
    },
    /// The agent did not answer in time.
    #[error("agent {agent} did not answer within {waited:?}")]
    NoAnswer {
        /// The agent.
        agent: String,
        /// How long.
        waited: Duration,
    },
}

/// A new submitter id: `HOST-PID-RANDOM` (letters, digits and `-` only, so that it is safe in a filter).
pub fn submitter_id(host: &str) -> String {
    let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{:08x}", std::process::id(), nanos ^ std::process::id().rotate_left(16))
}

/// A submitter's endpoint on the exec channel.
pub struct Submitter {
    id: String,
    credential: Option<crate::auth::Credential>,
    channel: Channel,
    source: Source,
    sink: Sink,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter").field("id", &self.id).finish()
    }
}

impl Submitter {
    /// Opens a sink for messages to `id` and a source on `channel` (normally [`CHANNEL`]).
    pub fn on(channel: &Channel, id: String) -> Result<Submitter, RemoteError> {
        let sink = channel.sink(
            SinkOptions::new()
                .types(SUBMITTER_TYPES.iter().copied())
                .filter(&format!("to == \"{id}\" || type == \"exec.alive\""))
                .attr("submitter", id.clone())
                .capacity(65_536)
                .overflow(Overflow::Block),
        )?;
        let source = channel.source()?;
        Ok(Submitter { id, credential: None, channel: channel.clone(), source, sink })
    }

    /// Signs every request that starts, stops or moves work with `credential` (the `exec` right an agent under an
    /// access policy asks for; [`crate::auth`]).
    pub fn with_credential(mut self, credential: Option<crate::auth::Credential>) -> Submitter {
        self.credential = credential;
        self
    }

    /// This submitter's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends `msg` to `to` (an agent's name or [`EVERYONE`]).
    pub async fn send(&mut self, to: &str, msg: &ExecMsg) -> Result<(), RemoteError> {
        let mut attrs = Attrs::new().with("to", to.to_owned());
        let payload = msg.encode();
        let request = matches!(msg, ExecMsg::Submit(_) | ExecMsg::Stop { .. } | ExecMsg::Drain { .. });
        if let (true, Some(c)) = (request, &self.credential) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
            attrs = c.sign(attrs, msg.event_type(), to, &payload, now as u64);
        }
        self.source.submit(msg.event_type(), &attrs, &payload).await?;
        Ok(())
    }

    /// The next message, `None` when the channel closed.
    pub async fn recv(&mut self) -> Option<ExecMsg> {
        loop {
            match self.sink.recv().await {
                Ok(ev) => match ExecMsg::decode(ev.payload()) {
                    Ok(m) => return Some(m),
                    Err(e) => tracing::warn!(error = %e, "an exec message that could not be read"),
                },
                Err(kecho::RecvError::Closed) => return None,
                Err(e) => tracing::warn!(error = %e, "exec sink"),
            }
        }
    }

    /// The agents whose exec sinks this node knows.
    pub fn agents(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .channel
            .sink_attrs()
            .into_iter()
            .filter_map(|(_, a)| match a.get("agent") {
                Some(Value::Str(s)) => Some(s.clone()),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Waits until `agent`'s exec sink is known here (at most `timeout`).
    pub async fn wait_for_agent(&self, agent: &str, timeout: Duration) -> Result<(), RemoteError> {
        let end = Instant::now() + timeout;
        loop {
            if self.agents().iter().any(|a| a == agent) {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(RemoteError::NoAgent { agent: agent.to_owned(), waited: timeout });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until at least one exec agent is known (at most `timeout`); returns how many are.
    pub async fn wait_for_agents(&self, timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        loop {
            let n = self.agents().len();
            if n > 0 || Instant::now() >= end {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks every agent for its tasks and gathers the answers for `wait`.
    pub async fn list(&mut self, wait: Duration) -> Result<Vec<(AgentName, Vec<TaskRow>)>, RemoteError> {
        let expected = self.agents().len();
        self.send(EVERYONE, &ExecMsg::List { reply_to: self.id.clone() }).await?;
        let mut got: BTreeMap<AgentName, Vec<TaskRow>> = BTreeMap::new();
        let end = Instant::now() + wait;
        while got.len() < expected {
            match tokio::time::timeout_at(end, self.recv()).await {
                Ok(Some(ExecMsg::Tasks { agent, tasks })) => {
                    got.insert(agent, tasks);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        Ok(got.into_iter().collect())
    }

    /// Asks every agent for a task's recent output; the first answer wins.
    pub async fn logs(
        &mut self,
        task: &TaskId,
        wait: Duration,
    ) -> Result<Option<(AgentName, (u64, u64), Vec<LogChunk>)>, RemoteError> {
        self.send(EVERYONE, &ExecMsg::Logs { reply_to: self.id.clone(), task: task.clone() }).await?;
        let end = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(end, self.recv()).await {
                Ok(Some(ExecMsg::Log { agent, task: t, dropped, chunks })) if t == *task => {
                    return Ok(Some((agent, dropped, chunks)))
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }

    /// Drains `agent`: its tasks are checkpointed and stopped, and it takes no new ones. Waits (at most `wait`) for
    /// the agent's confirmation or refusal.
    pub async fn drain(&mut self, agent: &str, by: &str, wait: Duration) -> Result<(), RemoteError> {
        self.wait_for_agent(agent, wait).await?;
        let name = AgentName(agent.to_owned());
        let msg = ExecMsg::Drain { agent: name.clone(), by: by.to_owned() };
        self.send(agent, &msg).await?;
        let end = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(end, self.recv()).await {
                Ok(Some(ExecMsg::Drain { agent: a, .. })) if a == name => return Ok(()),
                Ok(Some(ExecMsg::Refused { agent: a, reason, .. })) if a == name => {
                    return Err(RemoteError::Refused { agent: agent.to_owned(), reason })
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Err(RemoteError::NoAnswer { agent: agent.to_owned(), waited: wait }),
            }
        }
    }
}

/// Every agent's tasks (`kecho ps`, `kecho status`): opens the exec channel on `node` as a new submitter from host
/// `host`, waits (at most `wait`) until an agent is known, and gathers the answers for `wait`.
pub async fn list_tasks(
    node: &kecho::Node,
    host: &str,
    wait: Duration,
) -> Result<Vec<(AgentName, Vec<TaskRow>)>, RemoteError> {
    let mut sub = Submitter::on(&node.channel(CHANNEL).await?, submitter_id(host))?;
    sub.wait_for_agents(wait).await;
    sub.list(wait).await
}

/// One component of a deployed application as the agents run it: its latest generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentRow {
    /// The generation (one more per restart or replacement).
    pub generation: u64,
    /// The agent running it.
    pub agent: AgentName,
    /// Its task's state.
    pub state: String,
}

/// The latest generation of each component of each application (only `app` if given) in the agents' task lists,
/// from the task ids `APP.COMPONENT.GENERATION` that a deployment gives its components.
pub fn components(
    answers: Vec<(AgentName, Vec<TaskRow>)>,
    app: Option<&str>,
) -> BTreeMap<String, BTreeMap<String, ComponentRow>> {
    let mut apps: BTreeMap<String, BTreeMap<String, ComponentRow>> = BTreeMap::new();
    for (agent, tasks) in answers {
        for t in tasks {
            if !t.submitter.starts_with("app-") {
                continue;
            }
            let Some((rest, generation)) = t.task.0.rsplit_once('.') else { continue };
            let Some((name, component)) = rest.rsplit_once('.') else { continue };
            if app.is_some_and(|want| want != name) {
                continue;
            }
            let Ok(generation) = generation.parse::<u64>() else { continue };
            let row = ComponentRow { generation, agent: agent.clone(), state: t.state };
            let slot = apps.entry(name.to_owned()).or_default().entry(component.to_owned());
            match slot {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(row);
                }
                std::collections::btree_map::Entry::Occupied(mut o) if generation >= o.get().generation => {
                    o.insert(row);
                }
                std::collections::btree_map::Entry::Occupied(_) => {}
            }
        }
    }
    apps
}

/// Where a run's output and notes go.
pub trait RunOutput {
    /// Output of the task.
    fn print(&mut self, stream: Stream, data: &[u8]);
    /// A note for the user (stderr).
    fn note(&mut self, note: &str);
}

/// How a run is driven.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Agents silent this long are lost; heartbeats go out at a third of it.
    pub heartbeat_timeout: Duration,
    /// SIGTERM to SIGKILL when the submitter is interrupted.
    pub stop_grace: Duration,
    /// How long to wait for the placed agent's exec sink to be known here.
    pub agent_wait: Duration,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            heartbeat_timeout: Duration::from_secs(3),
            stop_grace: Duration::from_secs(5),
            agent_wait: Duration::from_secs(5),
        }
    }
}

/// Runs a session to its end: places the task, sends it, prints its output, restarts it where its policy says, and
/// returns the exit status. Reservations are released in the background (a lost agent answers no release). Each message on `interrupts` (Ctrl-C, SIGTERM) stops the remote task; a second one gives
/// up waiting for it (status 130).
pub async fn drive<P: Placer + Send + Sync + 'static>(
    sub: &mut Submitter,
    placer: &std::sync::Arc<P>,
    mut session: RunSession,
    opts: &RunOptions,
    interrupts: &mut mpsc::UnboundedReceiver<()>,
    out: &mut (dyn RunOutput + Send),
) -> Result<i32, RemoteError> {
    let mut queue: Vec<RunAction> = session.start();
    let mut wake: Option<Instant> = None;
    let mut last_alive: Option<Instant> = None;
    let mut interrupted = 0u32;
    // Heartbeats go out three times per timeout, the shorter of this submitter's and any agent's it has heard of.
    let mut beat = opts.heartbeat_timeout / 3;
    let mut heartbeat = tokio::time::interval(beat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while !queue.is_empty() {
            for action in std::mem::take(&mut queue) {
                match action {
                    RunAction::Place { spec, avoid } => match placer.place(&spec, &avoid).await {
                        Ok(p) => {
                            if let Err(e) = sub.wait_for_agent(&p.agent.0, opts.agent_wait).await {
                                out.note(&e.to_string());
                            }
                            last_alive = Some(Instant::now());
                            queue.extend(session.placed(p, Instant::now().into_std()));
                        }
                        Err(e) => queue.extend(session.place_failed(&e.to_string(), Instant::now().into_std())),
                    },
                    RunAction::Release(p) => {
                        // In the background: a lost agent answers no release, and the run must not wait for it.
                        let placer = placer.clone();
                        tokio::spawn(async move {
                            if let Err(e) = placer.release(&p).await {
                                tracing::info!(error = %e, agent = %p.agent, "release failed");
                            }
                        });
                    }
                    RunAction::Send(agent, msg) => sub.send(&agent.0, &msg).await?,
                    RunAction::WakeAt(t) => wake = Some(Instant::from_std(t)),
                    RunAction::Print(stream, data) => out.print(stream, &data),
                    RunAction::Note(n) => out.note(&n),
                    RunAction::Exit(code) => return Ok(code),
                }
            }
        }
        let lost_at = last_alive.map(|t| t + opts.heartbeat_timeout);
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            msg = sub.recv() => {
                let Some(msg) = msg else { return Err(RemoteError::Channel(kecho::Error::Closed(CHANNEL.into()))) };
                if let ExecMsg::Alive { agent, heartbeat_ms, .. } = &msg {
                    if session.placement().is_some_and(|p| p.agent == *agent) {
                        last_alive = Some(Instant::now());
                    }
                    let theirs = Duration::from_millis(*heartbeat_ms) / 3;
                    if *heartbeat_ms > 0 && theirs < beat {
                        beat = theirs.max(Duration::from_millis(10));
                        heartbeat = tokio::time::interval(beat);
                        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    continue;
                }
                queue.extend(session.handle(msg, Instant::now().into_std()));
            }
            _ = tokio::time::sleep_until(wake.unwrap_or(far)), if wake.is_some() => {
                wake = None;
                last_alive = Some(Instant::now());
                queue.extend(session.resubmit(Instant::now().into_std()));
            }
            _ = tokio::time::sleep_until(lost_at.unwrap_or(far)), if lost_at.is_some() && session.placement().is_some() => {
                last_alive = None;
                out.note(&format!(
                    "agent {} silent for {:?}",
                    session.placement().map(|p| p.agent.0.as_str()).unwrap_or("?"),
                    opts.heartbeat_timeout
                ));
                queue.extend(session.agent_lost(Instant::now().into_std()));
            }
            Some(()) = interrupts.recv() => {
                interrupted += 1;
                if interrupted > 1 {
                    out.note("interrupted again: not waiting for the remote task");
                    if let Some(p) = session.placement().cloned() {
                        let _ = placer.release(&p).await;
                    }
                    return Ok(130);
                }
                queue.extend(session.interrupt(opts.stop_grace.as_millis() as u64));
            }
            _ = heartbeat.tick() => {
                sub.send(EVERYONE, &ExecMsg::Heartbeat { submitter: sub.id().to_owned() }).await?;
            }
        }
    }
}

/// Looks an agent's host up in its exec sink's attributes (`host`, the address its node advertises).
pub fn host_lookup(channel: &Channel) -> crate::resplace::HostOf {
    let channel = channel.clone();
    std::sync::Arc::new(move |agent: &str| {
        channel.sink_attrs().into_iter().find_map(|(_, a)| {
            let is = matches!(a.get("agent"), Some(Value::Str(s)) if s == agent);
            match a.get("host") {
                Some(Value::Str(h)) if is && !h.is_empty() => Some(h.clone()),
                _ => None,
            }
        })
    })
}

/// Runs a deployment's components on exec agents ([`crate::deploy::Launcher`] over kecho channels): each component is
/// submitted to the agent its placement names, its output and end come back as messages, a stop is a message; an
/// agent silent for the heartbeat timeout ends its components with status 255 (the deploy's failure policy follows).
#[derive(Debug, Clone)]
pub struct RemoteLauncher {
    cmds: mpsc::UnboundedSender<LaunchCmd>,
}

#[derive(Debug)]
enum LaunchCmd {
    Launch(Box<Launch>),
    Stop(TaskId, Duration),
}

type LaunchReply = tokio::sync::oneshot::Sender<Result<crate::deploy::Launched, crate::task::TaskError>>;

#[derive(Debug)]
struct Launch {
    placement: crate::place::Placement,
    spec: crate::task::TaskSpec,
    ready: Option<crate::app::Readiness>,
    reply: LaunchReply,
}

struct Remote {
    agent: String,
    output: mpsc::Sender<crate::task::OutputChunk>,
    exit: tokio::sync::watch::Sender<Option<crate::task::TaskExit>>,
    pending: Option<(crate::deploy::Launched, LaunchReply)>,
    /// Where the agent's verdict on the readiness command goes (dropped with the task: no verdict).
    ready: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

impl RemoteLauncher {
    /// Starts the launcher's I/O task over `sub`; `undeploy` receives the `kecho undeploy` requests addressed to this
    /// submitter (the application's name).
    pub fn start(mut sub: Submitter, heartbeat_timeout: Duration) -> (RemoteLauncher, mpsc::UnboundedReceiver<String>) {
        let (cmds, mut rx) = mpsc::unbounded_channel::<LaunchCmd>();
        let (undeploy_tx, undeploy) = mpsc::unbounded_channel();
        let stop_tx = cmds.clone();
        tokio::spawn(async move {
            let mut tasks: BTreeMap<TaskId, Remote> = BTreeMap::new();
            let mut alive: BTreeMap<String, Instant> = BTreeMap::new();
            let mut tick = tokio::time::interval(heartbeat_timeout / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        None => break,
                        Some(LaunchCmd::Launch(l)) => {
                            let Launch { placement, spec, ready, reply } = *l;
                            let agent = placement.agent.0.clone();
                            if let Err(e) = sub.wait_for_agent(&agent, Duration::from_secs(5)).await {
                                let _ = reply.send(Err(crate::task::TaskError::Remote(e.to_string())));
                                continue;
                            }
                            // A component that is a repository artifact the deployer did not resolve itself names
                            // it by its digest: the agent fetches and verifies it.
                            let artifact = spec.argv.first().and_then(|a| a.parse::<crate::repo::Digest>().ok());
                            // A readiness command runs on the agent (the component's node); a TCP port is tried
                            // from here, against the node's address, as the component's dependents will reach it.
                            let (probe, verdict, ready_tx) = match ready {
                                Some(crate::app::Readiness { check: crate::app::ReadyCheck::Command(cmd), timeout }) => {
                                    let (tx, rx) = tokio::sync::oneshot::channel();
                                    let probe = crate::wire::ReadyProbe { cmd, timeout_ms: timeout.as_millis() as u64 };
                                    (Some(probe), rx, Some(tx))
                                }
                                other => {
                                    let env = crate::task::ProbeEnv::default();
                                    (None, crate::deploy::check_ready_here(other, placement.host.clone(), env), None)
                                }
                            };
                            let submit = crate::wire::Submit {
                                task: spec.id.clone(),
                                run: 0,
                                submitter: sub.id().to_owned(),
                                argv: spec.argv,
                                env: spec.env,
                                kecho_env: spec.kecho_env,
                                spec: crate::place::ReservationSpec { cpus: spec.limits.cpus, mem: spec.limits.mem, ..Default::default() },
                                placement: Some(placement),
                                restart: crate::restart::RestartPolicy::Never,
                                checkpoint_every_ms: None,
                                state: spec.state,
                                artifact,
                                ready: probe,
                            };
                            if let Err(e) = sub.send(&agent, &ExecMsg::Submit(submit)).await {
                                let _ = reply.send(Err(crate::task::TaskError::Remote(e.to_string())));
                                continue;
                            }
                            let (out_tx, out_rx) = mpsc::channel(1024);
                            let (exit_tx, exit_rx) = tokio::sync::watch::channel(None);
                            let (stop_req, mut stop_rx) = mpsc::unbounded_channel::<Duration>();
                            let (id, cmds) = (spec.id.clone(), stop_tx.clone());
                            tokio::spawn(async move {
                                while let Some(grace) = stop_rx.recv().await {
                                    let _ = cmds.send(LaunchCmd::Stop(id.clone(), grace));
                                }
                            });
                            let task = crate::task::Task {
                                output: out_rx,
                                control: crate::task::TaskControl::remote(spec.id.clone(), exit_rx, stop_req),
                                limits: crate::task::LimitReport::default(),
                            };
                            let launched = crate::deploy::Launched { task, ready: verdict };
                            alive.insert(agent.clone(), Instant::now());
                            let remote = Remote { agent, output: out_tx, exit: exit_tx, pending: Some((launched, reply)), ready: ready_tx };
                            tasks.insert(spec.id, remote);
                        }
                        Some(LaunchCmd::Stop(id, grace)) => {
                            if let Some(r) = tasks.get(&id) {
                                let agent = r.agent.clone();
                                let _ = sub.send(&agent, &ExecMsg::Stop { task: id, grace_ms: grace.as_millis() as u64 }).await;
                            }
                        }
                    },
                    msg = sub.recv() => match msg {
                        None => break,
                        Some(ExecMsg::Started { task, limits, .. }) => {
                            if let Some((mut t, reply)) = tasks.get_mut(&task).and_then(|r| r.pending.take()) {
                                t.task.limits = limits;
                                let _ = reply.send(Ok(t));
                            }
                        }
                        Some(ExecMsg::Ready { task, error, .. }) => {
                            if let Some(tx) = tasks.get_mut(&task).and_then(|r| r.ready.take()) {
                                let _ = tx.send(error.map_or(Ok(()), Err));
                            }
                        }
                        Some(ExecMsg::Refused { task, agent, reason }) => {
                            if let Some(mut r) = tasks.remove(&task) {
                                if let Some((_, reply)) = r.pending.take() {
                                    let _ = reply.send(Err(crate::task::TaskError::Remote(format!("agent {agent} refused: {reason}"))));
                                }
                            }
                        }
                        Some(ExecMsg::Output { task, seq, stream, data, .. }) => {
                            if let Some(r) = tasks.get(&task) {
                                let _ = r.output.send(crate::task::OutputChunk { seq, stream, data }).await;
                            }
                        }
                        Some(ExecMsg::Exit { task, exit, .. }) => {
                            if let Some(r) = tasks.remove(&task) {
                                let _ = r.exit.send(Some(exit.unwrap_or(crate::task::TaskExit { code: 255, signal: None })));
                            }
                        }
                        Some(ExecMsg::Alive { agent, .. }) => {
                            alive.insert(agent.0, Instant::now());
                        }
                        Some(ExecMsg::Undeploy { app, .. }) => {
                            let _ = undeploy_tx.send(app);
                        }
                        Some(_) => {}
                    },
                    _ = tick.tick() => {
                        let _ = sub.send(EVERYONE, &ExecMsg::Heartbeat { submitter: sub.id().to_owned() }).await;
                        let now = Instant::now();
                        let lost: Vec<TaskId> = tasks
                            .iter()
                            .filter(|(_, r)| alive.get(&r.agent).is_none_or(|t| now.duration_since(*t) > heartbeat_timeout))
                            .map(|(id, _)| id.clone())
                            .collect();
                        for id in lost {
                            if let Some(mut r) = tasks.remove(&id) {
                                tracing::warn!(task = %id, agent = %r.agent, "agent silent: its component counts as failed");
                                if let Some((_, reply)) = r.pending.take() {
                                    let _ = reply.send(Err(crate::task::TaskError::Remote(format!("agent {} silent", r.agent))));
                                }
                                let _ = r.exit.send(Some(crate::task::TaskExit { code: 255, signal: None }));
                            }
                        }
                    }
                }
            }
        });
        (RemoteLauncher { cmds }, undeploy)
    }
}

impl crate::deploy::Launcher for RemoteLauncher {
    async fn launch(
        &self,
        placement: &crate::place::Placement,
        spec: crate::task::TaskSpec,
        ready: Option<crate::app::Readiness>,
    ) -> Result<crate::deploy::Launched, crate::task::TaskError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmds
            .send(LaunchCmd::Launch(Box::new(Launch { placement: placement.clone(), spec, ready, reply: tx })))
            .map_err(|_| crate::task::TaskError::Remote("the launcher stopped".into()))?;
        rx.await.map_err(|_| crate::task::TaskError::Remote("the launcher stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(task: &str, submitter: &str, state: &str) -> TaskRow {
        TaskRow {
            task: TaskId(task.into()),
            run: 0,
            submitter: submitter.into(),
            argv: vec![],
            state: state.into(),
            since_ms: 0,
            limits: String::new(),
        }
    }

    #[test]
    fn components_keep_the_latest_generation_of_deployed_tasks_only() {
        let a = AgentName("a".into());
        let b = AgentName("b".into());
        let answers = vec![
            (a.clone(), vec![row("shop.api.0", "app-shop", "exited 137"), row("x-1-2", "host-1", "running")]),
            (b.clone(), vec![row("shop.api.1", "app-shop", "running"), row("shop.db.0", "app-shop", "running")]),
            (a.clone(), vec![row("blog.web.3", "app-blog", "running"), row("odd", "app-odd", "running")]),
        ];
        let all = components(answers.clone(), None);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["blog", "shop"]);
        let api = &all["shop"]["api"];
        assert_eq!((api.generation, &api.agent, api.state.as_str()), (1, &b, "running"));
        assert_eq!(all["shop"].len(), 2);
        let shop = components(answers, Some("shop"));
        assert_eq!(shop.keys().collect::<Vec<_>>(), ["shop"]);
    }
}
