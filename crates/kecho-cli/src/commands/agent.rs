//! `kecho agent`: a resource agent for this host (2K's Local Resource Manager).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_resources::types::parse_size;
use kecho_resources::{Agent, AgentConfig, Amounts};

use crate::attrs;
use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    action: Option<crate::commands::exec_agent::AgentAction>,
    #[command(flatten)]
    exec: crate::commands::exec_agent::ExecArgs,
    /// The agent's name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// A static attribute, KEY=VALUE (repeatable; typed as for pub), e.g. --attr zone=a.
    #[arg(long = "attr", value_name = "K=V")]
    attrs: Vec<String>,
    /// Cores it offers to others [default: all it measures].
    #[arg(long)]
    cpus: Option<u64>,
    /// Memory it offers in bytes (suffixes k, M, G, Ki, Mi, Gi) [default: all it measures].
    #[arg(long, value_name = "BYTES")]
    mem: Option<String>,
    /// Another counted resource, NAME=COUNT (repeatable), e.g. --resource gpu=2.
    #[arg(long = "resource", value_name = "NAME=COUNT")]
    resources: Vec<String>,
    /// Seconds between reports when nothing changes.
    #[arg(long, default_value_t = 1.0)]
    report: f64,
    /// Seconds a report stays valid (a silent agent drops out of every view after this).
    #[arg(long, default_value_t = 3.0)]
    lifetime: f64,
    /// Seconds an offer holds capacity for the requester to confirm it.
    #[arg(long, default_value_t = 2.0)]
    hold: f64,
    /// Seconds a running holder's reservation outlives the holder once its node has left the channel.
    #[arg(long, default_value_t = 3.0)]
    holder_grace: f64,
    /// Do not measure the host: offer only --cpus, --mem and --resource, publish no host_* attributes.
    #[arg(long)]
    no_measure: bool,
    /// The channel agents and requesters meet on.
    #[arg(long, default_value = kecho_resources::wire::CHANNEL)]
    channel: String,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
    // `--metrics ADDR` only: `--report` is the report period here.
    #[command(flatten)]
    metrics: crate::observe::MetricsArg,
}

fn secs(what: &str, v: f64) -> Result<Duration> {
    if !(v > 0.0 && v.is_finite()) {
        bail!("--{what} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "agent".into())
}

pub async fn run(a: Args) -> Result<()> {
    if let Some(act) = a.action {
        return crate::commands::exec_agent::action(act).await;
    }
    let mut cfg = AgentConfig::new(a.name.clone().unwrap_or_else(host_name));
    cfg.attrs = attrs::parse_all(&a.attrs)?;
    if a.exec.allows() {
        // Submitters place tasks only on agents that run them (`exec == true`).
        let set = std::mem::take(&mut cfg.attrs);
        cfg.attrs = set.with(kecho_exec::resplace::EXEC_ATTR, true);
    }
    cfg.cpus = a.cpus;
    cfg.mem = a.mem.as_deref().map(parse_size).transpose().context("--mem")?;
    let mut res = Amounts::new();
    for r in &a.resources {
        let one: Amounts = r.parse().with_context(|| format!("--resource {r}"))?;
        for (k, v) in one.iter() {
            res.set(k, v);
        }
    }
    cfg.resources = res;
    cfg.measure = !a.no_measure;
    cfg.report_every = secs("report", a.report)?;
    cfg.lifetime = secs("lifetime", a.lifetime)?;
    cfg.ledger.hold = secs("hold", a.hold)?;
    cfg.ledger.holder_grace = secs("holder-grace", a.holder_grace)?;
    kecho_resources::agent::check_agent_name(&cfg.name)?;
    let node = node(&a.reg, &a.node, None).await?;
    let mut registry = crate::observe::prometheus_client_registry::Registry::default();
    let _latency = a.metrics.metrics.is_some().then(|| kecho_metrics::register_node(&mut registry, &node));
    let _metrics = a.metrics.serve(registry).await?;
    let Some(ch) = open_waiting_for_the_registry(&node, &a.channel).await? else {
        node.shutdown().await;
        return Ok(());
    };
    let agent = Agent::start_on(&ch, cfg).await?;
    let offered = agent.with_ledger(|l| l.capacity().to_string());
    eprintln!("kecho: agent {} offering {offered} on {:?}", agent.name(), a.channel);
    let exec = crate::commands::exec_agent::start(&a.exec, &node, &agent, &a.node).await?;
    wait_for_stop().await;
    if let Some(e) = exec {
        e.stop().await;
    }
    agent.stop().await;
    node.shutdown().await;
    Ok(())
}

/// Opens the agents' channel; while the registry cannot be reached (an agent started by its init system before the
/// registry, or a registry restarting), says so and tries again, backing off from 0.5 s to 5 s, until it opens or the
/// agent is stopped (`None`). Any other failure is returned at once.
async fn open_waiting_for_the_registry(node: &kecho::Node, channel: &str) -> Result<Option<kecho::Channel>> {
    let mut pause = std::time::Duration::from_millis(500);
    let stop = wait_for_stop();
    tokio::pin!(stop);
    loop {
        match node.channel(channel).await {
            Ok(ch) => return Ok(Some(ch)),
            Err(e) if registry_unreachable(&e) => {
                eprintln!("kecho: the registry cannot be reached ({e}); trying again in {:.1} s", pause.as_secs_f64());
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = &mut stop => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Whether opening a channel failed only because no registry answered (as opposed to a refusal, bad credentials or
/// a bad name, which waiting does not mend).
fn registry_unreachable(e: &kecho::Error) -> bool {
    use kecho_proto::membership::RegistryFailure;
    match e {
        kecho::Error::RegistryFailed(RegistryFailure::Unreachable(_)) => true,
        kecho::Error::Registry(r) => {
            matches!(
                r,
                kecho::RegistryError::Unreachable { .. }
                    | kecho::RegistryError::Timeout { .. }
                    | kecho::RegistryError::NoLeader { .. }
            )
        }
        _ => false,
    }
}

/// Ctrl-C or SIGTERM.
pub async fn wait_for_stop() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
