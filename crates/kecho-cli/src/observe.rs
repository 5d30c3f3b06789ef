//! Flags every long-running command shares to be observed: `--metrics ADDR` (Prometheus) and `--report` (counters on
//! the stats channel, for `kecho top` and `kecho ui`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kecho::Node;
use kecho_metrics::cluster::Reporter;
use kecho_metrics::{DeliveryLatency, MetricsServer};

use crate::node_args::parse_addr;

/// How often `--report` publishes and the registry's metrics are refreshed.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsArg {
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port, printed on standard error).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub metrics: MetricsArg,
    /// Publish this node's channel and link counters every second on the channel kecho.stats, for `kecho top` and
    /// `kecho ui`.
    #[arg(long)]
    pub report: bool,
}

/// What observes a node; the metrics server and the reporter stop when it is dropped.
#[derive(Debug, Default)]
pub struct Observer {
    _server: Option<MetricsServer>,
    _reporter: Option<Reporter>,
    /// The delivery latency histogram, when metrics are served.
    pub latency: Option<DeliveryLatency>,
}

impl MetricsArg {
    /// Serves `registry` at the address given, if one was.
    pub async fn serve(&self, registry: prometheus_client_registry::Registry) -> Result<Option<MetricsServer>> {
        let Some(addr) = &self.metrics else { return Ok(None) };
        let addr = parse_addr("metrics", addr)?;
        let server = MetricsServer::bind(addr, Arc::new(registry)).await?;
        eprintln!("kecho: metrics on http://{}/metrics", server.local_addr());
        Ok(Some(server))
    }
}

/// The registry type, under a name that says where it comes from.
pub use kecho_metrics::prometheus_client::registry as prometheus_client_registry;

impl ObserveArgs {
    /// Starts what the flags ask for on `node`.
    pub async fn start(&self, node: &Node) -> Result<Observer> {
        let mut obs = Observer::default();
        if self.metrics.metrics.is_some() {
            let mut registry = prometheus_client_registry::Registry::default();
            obs.latency = Some(kecho_metrics::register_node(&mut registry, node));
            obs._server = self.metrics.serve(registry).await?;
        }
        if self.report {
            let r = Reporter::start(node, REPORT_EVERY).await.context("cannot join the stats channel")?;
            obs._reporter = Some(r);
        }
        Ok(obs)
    }
}
