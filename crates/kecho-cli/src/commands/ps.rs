//! `kecho ps`: the tasks the exec agents run or ran recently (agent, state, since, restarts).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::json;

use crate::commands::exec_agent::{task_lists, wait_secs};
use crate::node_args::{NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds to wait for the agents' answers.
    #[arg(long, default_value_t = 1.0)]
    wait: f64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::commands::resources::Format::Text)]
    format: crate::commands::resources::Format,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let answers = task_lists(&a.reg, &a.node, wait_secs(a.wait, 1.0)).await?;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let text = matches!(a.format, crate::commands::resources::Format::Text);
    if text {
        println!("{:<28} {:<10} {:<14} {:>8} {:>8}  COMMAND", "TASK", "AGENT", "STATE", "SINCE", "RESTARTS");
    }
    for (agent, tasks) in answers {
        for t in tasks {
            let ago = now_ms.saturating_sub(t.since_ms) / 1000;
            if text {
                println!(
                    "{:<28} {:<10} {:<14} {:>7}s {:>8}  {}",
                    t.task.0,
                    agent.0,
                    t.state,
                    ago,
                    t.run,
                    t.argv.join(" ")
                );
            } else {
                println!(
                    "{}",
                    json!({"task": t.task.0, "agent": agent.0, "state": t.state, "since_ms": t.since_ms,
                           "restarts": t.run, "submitter": t.submitter, "argv": t.argv, "limits": t.limits})
                );
            }
        }
    }
    Ok(())
}
