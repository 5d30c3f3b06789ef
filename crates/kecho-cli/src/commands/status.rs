//! `kecho status [APP]`: the components of deployed applications as the agents run them (component, agent, state,
//! restarts), from the task ids `APP.COMPONENT.GENERATION` that `kecho deploy` gives them.

use anyhow::Result;

use crate::commands::exec_agent::{task_lists, wait_secs};
use crate::node_args::{NodeArgs, RegistryArg};

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
    let answers = task_lists(&a.reg, &a.node, wait_secs(a.wait, 1.0)).await?;
    let apps = kecho_exec::remote::components(answers, a.app.as_deref());
    if apps.is_empty() {
        if let Some(app) = &a.app {
            anyhow::bail!("no agent runs a component of {app}");
        }
    }
    println!("{:<16} {:<16} {:<12} {:<14} {:>10}", "APP", "COMPONENT", "AGENT", "STATE", "GENERATION");
    for (app, comps) in apps {
        for (c, row) in comps {
            println!("{app:<16} {c:<16} {:<12} {:<14} {:>10}", row.agent.0, row.state, row.generation);
        }
    }
    Ok(())
}
