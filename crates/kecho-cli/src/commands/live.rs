//! The set-up `kecho top` and `kecho ui` share: their flags (registry, refresh interval, the resource agents'
//! channel), the registry's cluster view refreshed every interval, and the resource agents followed from their
//! reports by a node of the command's own (docs/RESOURCES.md).

use std::time::Duration;

use anyhow::{bail, Result};
use kecho_metrics::cluster::View;
use kecho_resources::view::ViewEntry;
use tokio::sync::watch;

use crate::node_args::RegistryArg;

/// The flags of a live view.
#[derive(clap::Args, Debug)]
pub struct LiveArgs {
    #[command(flatten)]
    pub reg: RegistryArg,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// The channel resource agents report on (see `kecho agent`).
    #[arg(long, default_value = kecho_resources::wire::CHANNEL)]
    pub resources_channel: String,
    /// Do not show resource agents (the view then starts no node of its own).
    #[arg(long)]
    pub no_agents: bool,
}

/// The agents as last seen, or why they are not known.
#[derive(Clone, Debug, Default)]
pub struct Agents {
    /// One entry per agent, by name.
    pub list: Vec<ViewEntry>,
    /// When the list was taken (ages are counted to it).
    pub at: Option<std::time::Instant>,
    /// Why the agents cannot be followed (the node could not join), while that lasts.
    pub error: Option<String>,
}

/// A live view: the registry's view of the channels and, unless `--no-agents`, the agents.
pub struct Live {
    /// The channels, members and links, refreshed every interval.
    pub views: watch::Receiver<View>,
    /// The agents, updated on every change of the view and every interval (for the ages).
    pub agents: Option<watch::Receiver<Agents>>,
}

impl LiveArgs {
    /// The refresh interval, checked.
    pub fn interval(&self) -> Result<Duration> {
        if !(self.interval > 0.0 && self.interval.is_finite()) {
            bail!("--interval must be a positive number of seconds");
        }
        Ok(Duration::from_secs_f64(self.interval))
    }

    /// Starts watching the registry and (unless `--no-agents`) following the agents.
    pub async fn start(&self) -> Result<Live> {
        let interval = self.interval()?;
        let reg = self.reg.addrs()?;
        let views = kecho_metrics::cluster::watch(reg.clone(), interval).await?;
        let agents = (!self.no_agents).then(|| follow_agents(reg, self.resources_channel.clone(), interval));
        Ok(Live { views, agents })
    }
}

/// Follows the agents' reports from a node of its own; retries (every 2 s) until the registry lets it join.
fn follow_agents(registry: Vec<std::net::SocketAddr>, channel: String, interval: Duration) -> watch::Receiver<Agents> {
    let (tx, rx) = watch::channel(Agents::default());
    tokio::spawn(async move {
        let (_node, mut view) = loop {
            let started = async {
                let node = kecho::Node::builder().registry_replicas(registry.clone()).start().await?;
                let ch = node.channel(&channel).await?;
                let view = kecho_resources::View::start_on(&ch)?;
                anyhow::Ok((node, view))
            };
            match started.await {
                Ok(v) => break v,
                Err(e) => {
                    let error = Some(format!("cannot follow {channel}: {e:#}"));
                    if tx.send(Agents { list: Vec::new(), at: None, error }).is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        loop {
            let at = tokio::time::Instant::now().into_std();
            let list = view.snapshot().iter().cloned().collect();
            if tx.send(Agents { list, at: Some(at), error: None }).is_err() {
                return;
            }
            tokio::select! {
                r = view.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    rx
}
