//! `kecho undeploy APP`: asks the process that deployed APP to stop it in reverse dependency order.

use std::time::Duration;

use anyhow::Result;
use kecho_exec::remote::{submitter_id, Submitter};
use kecho_exec::service::CHANNEL;
use kecho_exec::wire::ExecMsg;

use crate::commands::agent::host_name;
use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The application.
    app: String,
    /// Seconds to wait for its components to stop.
    #[arg(long, default_value_t = 30.0)]
    wait: f64,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let node = node(&a.reg, &a.node, None).await?;
    let ch = node.channel(CHANNEL).await?;
    let me = submitter_id(&host_name());
    let mut sub = Submitter::on(&ch, me.clone())?;
    let owner = crate::commands::deploy::owner_id(&a.app);
    // The owner's sink must be known before the request can reach it.
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    let known = loop {
        let has = ch
            .sink_attrs()
            .iter()
            .any(|(_, at)| matches!(at.get("submitter"), Some(kecho::Value::Str(s)) if *s == owner));
        if has || tokio::time::Instant::now() >= end {
            break has;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !known {
        node.shutdown().await;
        anyhow::bail!("no deploy of {} is running (no `kecho deploy` owns it)", a.app);
    }
    sub.send(&owner, &ExecMsg::Undeploy { app: a.app.clone(), by: me }).await?;
    // Wait until the owner has left (it stops the components first).
    let end =
        tokio::time::Instant::now() + Duration::from_secs_f64(if a.wait.is_finite() { a.wait.max(0.0) } else { 30.0 });
    loop {
        let has = ch
            .sink_attrs()
            .iter()
            .any(|(_, at)| matches!(at.get("submitter"), Some(kecho::Value::Str(s)) if *s == owner));
        if !has {
            break;
        }
        if tokio::time::Instant::now() >= end {
            node.shutdown().await;
            anyhow::bail!("{} did not stop within {} s", a.app, a.wait);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
    eprintln!("kecho: {} undeployed", a.app);
    Ok(())
}
