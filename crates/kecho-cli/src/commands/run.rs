//! `kecho run`: remote execution (the Cooperating Peers pattern). Reserves capacity on a fitting agent, runs the
//! command there, streams its output back live and in order, and exits with its status (128+N for a signal, as a
//! shell reports it). Ctrl-C or SIGTERM stops the remote task (and its children).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_exec::place::ReservationSpec;
use kecho_exec::remote::{drive, submitter_id, RunOptions, RunOutput, Submitter};
use kecho_exec::resplace::ResourcePlacer;
use kecho_exec::restart::{RestartLimits, RestartPolicy};
use kecho_exec::service::CHANNEL;
use kecho_exec::submit::RunSession;
use kecho_exec::task::{Stream, TaskId};
use kecho_exec::wire::Submit;
use kecho_resources::types::parse_size;
use kecho_resources::Requester;
use tokio::sync::mpsc;

use crate::commands::agent::host_name;
use crate::node_args::{parse_addr, RegistryArg, TlsArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A CEL expression over an agent's attributes that must hold, e.g. 'zone == "a"'.
    #[arg(long = "require", id = "requirement", value_name = "EXPR")]
    requirement: Option<String>,
    /// A CEL expression over an agent's attributes, higher is better, e.g. cpus_free.
    #[arg(long, value_name = "EXPR")]
    rank: Option<String>,
    /// CPUs to reserve (and limit the task to, where cgroups allow) [default: 1 when --mem is not given either].
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory to reserve and limit the task to, bytes (suffixes k, M, G, Ki, Mi, Gi).
    #[arg(long, value_name = "BYTES")]
    mem: Option<String>,
    /// When to restart the task: never, on-failure (in place with backoff; elsewhere if its node is lost),
    /// on-node-loss (elsewhere, from its last checkpoint, when its node dies or is drained).
    #[arg(long, default_value = "never")]
    restart: String,
    /// Run K copies of the task, each with its own reservation; exits with the first non-zero status.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// An environment variable for the task, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Seconds between checkpoints shipped back ($KECHO_STATE); a drained task's state is always shipped.
    #[arg(long, value_name = "SECS")]
    checkpoint_every: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when the task is stopped.
    #[arg(long, default_value_t = 5.0)]
    grace: f64,
    /// Seconds to wait for the first agent to be seen.
    #[arg(long, default_value_t = 5.0)]
    wait: f64,
    #[command(flatten)]
    reg: RegistryArg,
    /// Address this node listens on for other nodes.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address other nodes dial to reach this one, if not the listening address.
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Seconds of silence after which an agent (and this submitter, for the agents) counts as gone.
    #[arg(long, default_value_t = 3.0)]
    heartbeat: f64,
    #[command(flatten)]
    tls: TlsArgs,
    /// This node's identity (see `kecho identity new`): the key an exec credential (--token) was issued to.
    #[arg(long, value_name = "FILE", env = "KECHO_IDENTITY")]
    identity: Option<std::path::PathBuf>,
    /// A credential (see `kecho grant`; repeatable): one with the exec right is presented to the agent with every
    /// request (agents under an access policy run work only for its holders); others are presented in channels.
    #[arg(long = "token", value_name = "FILE")]
    tokens: Vec<std::path::PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn positive(what: &str, v: f64) -> Result<Duration> {
    if !(v > 0.0 && v.is_finite()) {
        bail!("--{what} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

pub async fn client_node(
    reg: &RegistryArg,
    listen: &str,
    advertise: Option<&str>,
    heartbeat: f64,
    tls: &TlsArgs,
    identity: Option<&std::path::Path>,
    tokens: &[std::path::PathBuf],
) -> Result<kecho::Node> {
    let mut b = kecho::Node::builder()
        .registry_replicas(reg.addrs()?)
        .listen(parse_addr("listen", listen)?)
        .heartbeat_timeout(positive("heartbeat", heartbeat)?);
    if let Some(adv) = advertise {
        b = b.advertise(parse_addr("advertise", adv)?);
    }
    if let Some(tls) = tls.config()? {
        b = b.tls(tls);
    }
    if let Some(file) = identity {
        let id = crate::secrets::read_identity(file)?;
        let access = crate::access::AccessArgs { tokens: tokens.to_vec(), ..Default::default() };
        b = access.apply(b.identity(id.clone()), Some(&id))?;
    }
    Ok(b.start().await?)
}

struct Terminal;

impl RunOutput for Terminal {
    fn print(&mut self, stream: Stream, data: &[u8]) {
        let _ = match stream {
            Stream::Stdout => std::io::stdout().write_all(data).and_then(|()| std::io::stdout().flush()),
            Stream::Stderr => std::io::stderr().write_all(data).and_then(|()| std::io::stderr().flush()),
        };
    }
    fn note(&mut self, note: &str) {
        eprintln!("kecho: {note}");
    }
}

pub async fn run(a: Args) -> Result<()> {
    let restart: RestartPolicy =
        a.restart.parse().map_err(|e: kecho_exec::restart::UnknownRestartPolicy| anyhow::anyhow!("--restart: {e}"))?;
    let mut env = Vec::new();
    for kv in &a.env {
        let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv}: expected K=V"))?;
        if k.is_empty() {
            bail!("--env {kv}: empty name");
        }
        env.push((k.to_owned(), v.to_owned()));
    }
    if a.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if let Some(c) = a.cpus {
        if !(c > 0.0 && c.is_finite()) {
            bail!("--cpus must be a positive number");
        }
    }
    if let Some(r) = &a.requirement {
        kecho_resources::Requirement::compile(r)?;
    }
    if let Some(r) = &a.rank {
        kecho_resources::Rank::compile(r)?;
    }
    let mem = a.mem.as_deref().map(parse_size).transpose().context("--mem")?;
    let spec = ReservationSpec {
        require: a.requirement.clone(),
        rank: a.rank.clone(),
        // The default reservation (one core) is the task's limit too, so that what applied is said of it.
        cpus: a.cpus.or(if mem.is_none() { Some(1.0) } else { None }),
        mem,
    };
    let checkpoint_every_ms =
        a.checkpoint_every.map(|s| positive("checkpoint-every", s).map(|d| d.as_millis() as u64)).transpose()?;
    let opts = RunOptions {
        heartbeat_timeout: positive("heartbeat", a.heartbeat)?,
        stop_grace: positive("grace", a.grace)?,
        agent_wait: Duration::from_secs(5),
    };
    let credential = crate::commands::exec_agent::credential(a.identity.as_deref(), &a.tokens)?;
    let node =
        client_node(&a.reg, &a.listen, a.advertise.as_deref(), a.heartbeat, &a.tls, a.identity.as_deref(), &a.tokens)
            .await?;
    let requester = Requester::on(&node.channel(kecho_resources::wire::CHANNEL).await?)?;
    let wait = positive("wait", a.wait)?;
    if requester.wait_for_agents(1, wait).await.is_err() {
        node.shutdown().await;
        bail!("no agent on channel {} within {} s", kecho_resources::wire::CHANNEL, a.wait);
    }
    // A lease three heartbeats long, renewed at a third of it: a dead submitter's reservation ends soon after.
    let placer = std::sync::Arc::new(
        ResourcePlacer::new(requester, opts.heartbeat_timeout * 3)
            .also_require(format!("{} == true", kecho_exec::resplace::EXEC_ATTR)),
    );
    let exec = node.channel(CHANNEL).await?;
    let host = host_name();
    let mut interrupt_txs = Vec::new();
    let mut runs = Vec::new();
    for i in 0..a.replicas {
        let id = submitter_id(&host);
        let task = if a.replicas == 1 { TaskId(id.clone()) } else { TaskId(format!("{id}.{i}")) };
        let mut sub = Submitter::on(&exec, id.clone())?.with_credential(credential.clone());
        sub.wait_for_agents(wait).await;
        let submit = Submit {
            task,
            run: 0,
            submitter: id,
            argv: a.cmd.clone(),
            env: env.clone(),
            kecho_env: Vec::new(),
            spec: spec.clone(),
            placement: None,
            restart,
            checkpoint_every_ms,
            state: None,
            artifact: None,
            ready: None,
        };
        let session = RunSession::new(submit, RestartLimits::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        interrupt_txs.push(tx);
        let (placer, opts) = (placer.clone(), opts.clone());
        runs.push(tokio::spawn(async move { drive(&mut sub, &placer, session, &opts, &mut rx, &mut Terminal).await }));
    }
    let signals = tokio::spawn(async move {
        loop {
            crate::commands::agent::wait_for_stop().await;
            for tx in &interrupt_txs {
                let _ = tx.send(());
            }
        }
    });
    let mut code = 0;
    for r in runs {
        let c = r.await.context("run task")??;
        if code == 0 {
            code = c;
        }
    }
    signals.abort();
    // Let the background releases finish (each waits 2 s at most for its agent).
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    while placer.outstanding() > 0 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if tokio::time::timeout(Duration::from_secs(2), node.shutdown()).await.is_err() {
        tracing::warn!("the node did not shut down within 2 s");
    }
    std::process::exit(code);
}
