//! `kecho registry`: serve the channel registry (the KECho group server).

use anyhow::Result;
use kecho_registry::RegistryServer;

use crate::node_args::{parse_addr, DEFAULT_REGISTRY};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_REGISTRY)]
    listen: String,
    #[command(flatten)]
    metrics: crate::observe::MetricsArg,
}

pub async fn run(a: Args) -> Result<()> {
    let listen = a.listen.as_str();
    let addr = parse_addr("listen", listen)?;
    let server = RegistryServer::bind(addr).await?;
    // The registry's metrics come from listing it through its own port, as any client would.
    let mut registry = crate::observe::prometheus_client_registry::Registry::default();
    let client = kecho::RegistryClient::remote(server.local_addr());
    let _collector = kecho_metrics::register_registry(&mut registry, client, crate::observe::REPORT_EVERY);
    let _metrics = a.metrics.serve(registry).await?;
    // Announced once everything it serves (the registry and its metrics) accepts connections.
    eprintln!("kecho registry listening on {}", server.local_addr());
    tokio::select! {
        _ = server.run() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
