//! `kecho status [APP]`: the components of deployed applications as the agents run them (component, agent, state,
//! restarts), from the task ids `APP.COMPONENT.GENERATION` that `kecho deploy` gives them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use kecho_exec::remote::{submitter_id, Submitter};
use kecho_exec::service::CHANNEL;

use crate::commands::agent::host_name;
use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this application.
    app: Option<String>,
    /// Seconds to wait for the agents' answers.
    #[arg(long, default_value_t = 1.0)]
    wait: f64,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let wait = Duration::from_secs_f64(if a.wait.is_finite() { a.wait.max(0.0) } else { 1.0 });
    let node = node(&a.reg, &a.node, None).await?;
    let ch = node.channel(CHANNEL).await?;
    let mut sub = Submitter::on(&ch, submitter_id(&host_name()))?;
    sub.wait_for_agents(wait).await;
    let answers = sub.list(wait).await;
    node.shutdown().await;
    // The latest generation of each component, by application.
    let mut apps: BTreeMap<String, BTreeMap<String, (u64, String, String)>> = BTreeMap::new();
    for (agent, tasks) in answers? {
        for t in tasks {
            if !t.submitter.starts_with("app-") {
                continue;
            }
            let Some((rest, generation)) = t.task.0.rsplit_once('.') else { continue };
            let Some((app, component)) = rest.rsplit_once('.') else { continue };
            if a.app.as_deref().is_some_and(|want| want != app) {
                continue;
            }
            let generation: u64 = generation.parse().unwrap_or(0);
            let slot = apps.entry(app.to_owned()).or_default().entry(component.to_owned()).or_default();
            if generation >= slot.0 {
                *slot = (generation, agent.0.clone(), t.state.clone());
            }
        }
    }
    if apps.is_empty() {
        if let Some(app) = &a.app {
            anyhow::bail!("no agent runs a component of {app}");
        }
    }
    println!("{:<16} {:<16} {:<12} {:<14} {:>10}", "APP", "COMPONENT", "AGENT", "STATE", "GENERATION");
    for (app, comps) in apps {
        for (c, (g, agent, state)) in comps {
            println!("{app:<16} {c:<16} {agent:<12} {state:<14} {g:>10}");
        }
    }
    Ok(())
}
