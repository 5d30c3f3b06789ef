//! `kecho logs TASK`: replays a task's recent output, as its agent keeps it.

use std::io::Write;

use anyhow::{bail, Result};
use kecho_exec::remote::{submitter_id, Submitter};
use kecho_exec::service::CHANNEL;
use kecho_exec::task::{Stream, TaskId};

use crate::commands::agent::host_name;
use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The task (as `kecho ps` shows it).
    task: String,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 2.0)]
    wait: f64,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let wait = crate::commands::exec_agent::wait_secs(a.wait, 2.0);
    let node = node(&a.reg, &a.node, None).await?;
    let ch = node.channel(CHANNEL).await?;
    let mut sub = Submitter::on(&ch, submitter_id(&host_name()))?;
    sub.wait_for_agents(wait).await;
    let got = sub.logs(&TaskId(a.task.clone()), wait).await;
    node.shutdown().await;
    let Some((agent, (chunks, bytes), log)) = got? else {
        bail!("no agent knows task {}", a.task);
    };
    if chunks > 0 {
        eprintln!("kecho: task {} on {agent}: the first {chunks} chunk(s) ({bytes} bytes) are no longer kept", a.task);
    }
    for c in log {
        let _ = match c.stream {
            Stream::Stdout => std::io::stdout().write_all(&c.data),
            Stream::Stderr => std::io::stderr().write_all(&c.data),
        };
    }
    let _ = std::io::stdout().flush();
    Ok(())
}
