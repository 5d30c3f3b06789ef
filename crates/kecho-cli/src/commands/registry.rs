//! `kecho registry`: serve the channel registry (the KECho group server).

use anyhow::Result;
use kecho_registry::RegistryServer;

use crate::node_args::{parse_addr, DEFAULT_REGISTRY};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_REGISTRY)]
    listen: String,
}

pub async fn run(a: Args) -> Result<()> {
    let listen = a.listen.as_str();
    let addr = parse_addr("listen", listen)?;
    let server = RegistryServer::bind(addr).await?;
    eprintln!("kecho registry listening on {}", server.local_addr());
    tokio::select! {
        _ = server.run() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
