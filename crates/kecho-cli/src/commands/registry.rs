//! `kecho registry`: serve the channel registry (the KECho group server).

use anyhow::Result;
use kecho_registry::RegistryServer;

use crate::node_args::{parse_addr, parse_addrs, DEFAULT_REGISTRY};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_REGISTRY)]
    listen: String,
    /// The other replicas of a replicated registry, separated by commas (start each replica with the others'
    /// addresses; 2 or 4 others make 3 or 5 replicas, of which any minority may fail). Without it, a single registry.
    #[arg(long, value_name = "ADDR,ADDR")]
    peers: Option<String>,
    /// The address the other replicas know this one by, if not --listen (needed with --listen 0.0.0.0:PORT).
    #[arg(long, value_name = "ADDR", requires = "peers")]
    advertise: Option<String>,
    /// Keep this replica's state (term, vote, log) in DIR, so that a restart keeps the replicas' guarantees; without
    /// it a restarted replica comes back empty (see docs/REGISTRY.md).
    #[arg(long, value_name = "DIR", requires = "peers")]
    data: Option<std::path::PathBuf>,
    /// Connections served at once (every node keeps one while it is up, so a cluster of more nodes than this needs
    /// a higher limit, and as many open files); further connections are closed with a warning.
    #[arg(long, value_name = "N", default_value_t = kecho_registry::MAX_CONNECTIONS)]
    max_connections: usize,
    #[command(flatten)]
    metrics: crate::observe::MetricsArg,
}

pub async fn run(a: Args) -> Result<()> {
    let listen = a.listen.as_str();
    let addr = parse_addr("listen", listen)?;
    let mut server = RegistryServer::bind(addr).await?.with_max_connections(a.max_connections);
    let mut replicas = vec![server.local_addr()];
    if let Some(peers) = &a.peers {
        let peers = parse_addrs("peer", peers)?;
        let me = match &a.advertise {
            Some(adv) => parse_addr("advertise", adv)?,
            None if server.local_addr().ip().is_unspecified() => {
                anyhow::bail!("listening on {}: give --advertise, the address the other replicas dial", addr)
            }
            None => server.local_addr(),
        };
        replicas = peers.clone();
        replicas.push(me);
        replicas.sort();
        replicas.dedup();
        if replicas.len() < 3 {
            tracing::warn!(
                "{} replicas: a majority is all of them, so no replica may fail; run 3 or 5",
                replicas.len()
            );
        }
        server = server.with_peers(peers).with_advertise(me);
        if let Some(dir) = &a.data {
            server = server.with_data_dir(dir)?;
        }
    }
    // The registry's metrics come from listing it through the replicas' ports, as any client would.
    let mut registry = crate::observe::prometheus_client_registry::Registry::default();
    let client = kecho::RegistryClient::replicated(replicas.clone());
    let _collector = kecho_metrics::register_registry(&mut registry, client, crate::observe::REPORT_EVERY);
    let _metrics = a.metrics.serve(registry).await?;
    // Announced once everything it serves (the registry and its metrics) accepts connections.
    if replicas.len() > 1 {
        let list = replicas.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",");
        eprintln!("kecho registry listening on {} (a replica of {list})", server.local_addr());
    } else {
        eprintln!("kecho registry listening on {}", server.local_addr());
    }
    tokio::select! {
        _ = server.run() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
