//! `kecho release`: free reservations by id (the id is the capability; any process may release).

use std::time::Duration;

use anyhow::{bail, Result};
use kecho_resources::{Error, Requester, ReservationId};

use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Reservation ids, as `kecho reserve` printed them (AGENT:EPOCH:N).
    #[arg(required = true)]
    ids: Vec<String>,
    /// Seconds to keep trying to reach each reservation's agent.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The channel agents and requesters meet on.
    #[arg(long, default_value = kecho_resources::wire::CHANNEL)]
    channel: String,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let ids: Vec<ReservationId> = a.ids.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let node = node(&a.reg, &a.node, None).await?;
    let requester = Requester::on(&node.channel(&a.channel).await?)?;
    let end = tokio::time::Instant::now() + Duration::from_secs_f64(a.timeout);
    let mut failed = Vec::new();
    for id in &ids {
        loop {
            match requester.release(id).await {
                Ok(amounts) => {
                    println!("released {id} ({amounts})");
                    break;
                }
                // The agent may not be known to this fresh node yet: try again until the timeout.
                Err(Error::Timeout { .. }) if tokio::time::Instant::now() < end => continue,
                Err(e @ Error::Refused { .. }) => {
                    failed.push(e.to_string());
                    break;
                }
                Err(e) => {
                    failed.push(format!("{id}: {e}"));
                    break;
                }
            }
        }
    }
    node.shutdown().await;
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}
