//! The remote-execution part of `kecho agent`: `--allow-exec` (off by default) runs submitted tasks within their
//! reservations, and `kecho agent drain NAME` reclaims a node (its tasks are checkpointed, stopped, and moved by
//! their submitters where their policy says).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use kecho_exec::auth::{Credential, ExecPolicy};
use kecho_exec::place::AgentName;
use kecho_exec::remote::{submitter_id, Submitter};
use kecho_exec::service::{ExecService, ServiceConfig, CHANNEL};
use kecho_exec::task::Confinement;

use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Run tasks that others submit (`kecho run`, `kecho deploy`) within their reservations. Off by default:
    /// without it this agent executes nothing.
    #[arg(long)]
    allow_exec: bool,
    /// Where task state (working directories, checkpoints) lives [default: a directory per agent under the
    /// system's temporary directory].
    #[arg(long, value_name = "DIR", requires = "allow_exec")]
    exec_dir: Option<PathBuf>,
    /// The audit log: one JSON line per task, stop, drain and refusal with who asked [default: DIR/audit.jsonl].
    #[arg(long, value_name = "FILE", requires = "allow_exec")]
    audit: Option<PathBuf>,
}

impl ExecArgs {
    /// Whether this agent executes tasks (`--allow-exec`).
    pub fn allows(&self) -> bool {
        self.allow_exec
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentAction {
    /// Drain agent NAME: its owner reclaims the node. Its tasks are checkpointed and stopped; those submitted with
    /// `--restart on-node-loss` (or on-failure) continue on another agent from their last checkpoint.
    Drain(Box<DrainArgs>),
}

#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    /// The agent.
    name: String,
    /// Seconds to wait for the agent to be seen on the exec channel.
    #[arg(long, default_value_t = 5.0)]
    wait: f64,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

/// The exec service and the inspection/configuration agent of one node.
pub struct Exec {
    service: ExecService,
    inspect: tokio::task::JoinHandle<()>,
    repo: (tokio::task::JoinHandle<()>, kecho::Channel),
}

impl Exec {
    /// Stops the tasks and the services.
    pub async fn stop(self) {
        self.inspect.abort();
        self.repo.0.abort();
        self.service.stop().await;
    }
}

/// Starts the exec service beside resource agent `agent` when `--allow-exec` is given, with the inspection and
/// configuration agent (`kecho inspect`, `kecho configure`) over the node's repository store DIR/repo.
pub async fn start(
    a: &ExecArgs,
    node: &kecho::Node,
    agent: &kecho_resources::Agent,
    na: &NodeArgs,
) -> Result<Option<Exec>> {
    if !a.allow_exec {
        return Ok(None);
    }
    let name = agent.name().to_owned();
    let dir = a.exec_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("kecho-exec-{name}")));
    std::fs::create_dir_all(&dir).with_context(|| format!("--exec-dir {}", dir.display()))?;
    let confinement = Confinement::detect(None);
    let mut cfg = ServiceConfig::new(AgentName(name.clone()), dir.join("tasks"), confinement.clone());
    cfg.heartbeat_timeout = Duration::from_secs_f64(na.heartbeat);
    let policy = match &na.access.authority_pub {
        Some(hex) => Some(ExecPolicy::new(
            crate::access::key32(hex).context("--authority-pub must be an authority's public key (64 hex digits)")?,
        )),
        None => None,
    };
    cfg.policy = policy;
    let audit = a.audit.clone().unwrap_or_else(|| dir.join("audit.jsonl"));
    cfg.audit = Some(audit.clone());
    cfg.check = Some(kecho_exec::resplace::ledger_check(agent));
    cfg.host = node.advertised_addr().ip().to_string();
    // The agent's repository store: served to the other nodes, and the cache of what its tasks run.
    let store = kecho_exec::repo::Store::open(dir.join("repo"))?;
    let repo_ch = node.channel(kecho_exec::repo_net::CHANNEL).await?;
    let repo_serve = kecho_exec::repo_net::serve(&repo_ch, &name, store.clone())?;
    let fetch = kecho_exec::repo_net::ChannelFetch::new(&repo_ch, &format!("agent-{name}"), Duration::from_secs(10))?;
    cfg.artifacts = Some(std::sync::Arc::new(kecho_exec::repo::Cache::new(store.clone(), fetch)));
    let ch = node.channel(CHANNEL).await?;
    let service = ExecService::start(&ch, cfg).await?;
    let log = kecho_exec::agent::AuditLog::open(&audit).with_context(|| format!("--audit {}", audit.display()))?;
    let prefix = kecho_exec::inspect::DEFAULT_PREFIX;
    let inspect = kecho_exec::inspect::serve_with(node, prefix, name.clone(), store, Some(log), policy).await?;
    let who = if policy.is_some() { "holders of an exec credential" } else { "anyone on the channel" };
    eprintln!("kecho: agent {name} runs tasks for {who} (exec allowed); limits by {}", confinement.describe());
    Ok(Some(Exec { service, inspect, repo: (repo_serve, repo_ch) }))
}

pub async fn action(act: AgentAction) -> Result<()> {
    match act {
        AgentAction::Drain(d) => {
            let DrainArgs { name, wait, reg, node: na } = *d;
            let node = node(&reg, &na, None).await?;
            let ch = node.channel(CHANNEL).await?;
            let by = submitter_id(&crate::commands::agent::host_name());
            let mut sub = Submitter::on(&ch, by.clone())?.with_credential(credential_of(&na)?);
            let r = sub.drain(&name, &by, Duration::from_secs_f64(wait.max(0.0))).await;
            // Let the event leave before the node goes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            node.shutdown().await;
            r?;
            eprintln!("kecho: agent {name} drained");
            Ok(())
        }
    }
}

/// The exec credential among the node's `--token` files (one granting `exec`, for its `--identity`), if any.
pub fn credential_of(na: &NodeArgs) -> Result<Option<Credential>> {
    credential(na.identity.as_deref(), &na.access.tokens)
}

/// The exec credential among `tokens` (the first granting `exec`), held by the node with identity file `identity`.
pub fn credential(identity: Option<&Path>, tokens: &[PathBuf]) -> Result<Option<Credential>> {
    for file in tokens {
        let token = crate::access::read_token(file)?;
        if !token.roles.contains(kecho::Roles::EXEC) {
            continue;
        }
        let Some(id) = identity else {
            anyhow::bail!("{} grants exec to one node key: pass that node's --identity too", file.display());
        };
        let identity = crate::secrets::read_identity(id)?;
        let c = Credential::new(&identity, token).with_context(|| format!("--token {}", file.display()))?;
        return Ok(Some(c));
    }
    Ok(None)
}

/// Seconds given as a flag (`--wait`), or `default` when not a finite number; never negative.
pub fn wait_secs(v: f64, default: f64) -> Duration {
    Duration::from_secs_f64(if v.is_finite() { v.max(0.0) } else { default })
}

/// Every exec agent's tasks within `wait` (the set-up `kecho ps` and `kecho status` share): starts a node, asks,
/// and stops the node.
pub async fn task_lists(
    reg: &RegistryArg,
    na: &NodeArgs,
    wait: Duration,
) -> Result<Vec<(AgentName, Vec<kecho_exec::wire::TaskRow>)>> {
    let node = node(reg, na, None).await?;
    let answers = kecho_exec::remote::list_tasks(&node, &crate::commands::agent::host_name(), wait).await;
    node.shutdown().await;
    Ok(answers?)
}
