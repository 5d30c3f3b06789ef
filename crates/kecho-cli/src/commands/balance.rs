//! `kecho balance`: an HTTP load balancer (the Front-End Dispatcher) over kecho-lb, with servers given by URL or
//! discovered from a channel's sinks (attributes `http` and `load`), health from channel membership.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_lb::balance::{follow, parse_server, Backend, Balancer, Mode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::node_args::{node, parse_addr, NodeArgs, RegistryArg};
use crate::observe::prometheus_client_registry::Registry;
use kecho_metrics::prometheus_client;

#[derive(clap::Args, Debug)]
// --listen is where HTTP is served; the node (with --pool) listens on --node-listen.
#[command(mut_arg("listen", |a| a.long("node-listen")))]
pub struct Args {
    /// Address to serve HTTP on.
    #[arg(long = "listen", id = "http_listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http_listen: String,
    /// How to pick a server: rr, p2c, jsq, hash:HEADER or kecho:N.
    #[arg(long, default_value = "rr")]
    mode: String,
    /// Servers, as http://HOST:PORT or HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "URL,...", conflicts_with = "pool")]
    servers: Vec<String>,
    /// Discover the servers from the sinks of CHANNEL (attribute `http` = where it serves, `load` = its load), those
    /// whose attributes match the content filter EXPR if given (CHANNEL or CHANNEL/EXPR). A server whose node dies
    /// leaves the pool within the heartbeat timeout.
    #[arg(long, value_name = "CHANNEL/EXPR")]
    pool: Option<String>,
    /// Answer with 307 redirects to the chosen server (direct interaction) instead of proxying.
    #[arg(long)]
    redirect: bool,
    /// Keep a client on its server with a cookie of this name.
    #[arg(long, value_name = "NAME")]
    affinity_cookie: Option<String>,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    observe: crate::observe::ObserveArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let mode: Mode = a.mode.parse()?;
    if a.servers.is_empty() && a.pool.is_none() {
        bail!("give the servers (--servers URL,...) or a channel to discover them from (--pool CHANNEL[/EXPR])");
    }
    if let Some(name) = &a.affinity_cookie {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            bail!("--affinity-cookie: {name:?} is not a cookie name (letters, digits, '_' and '-')");
        }
    }
    let listen = parse_addr("listen", &a.http_listen)?;
    let balancer = Balancer::new(mode, a.redirect, a.affinity_cookie.clone(), rand_seed());
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BalanceCollector(balancer.clone())));
    let mut _follow = None;
    let mut _node = None;
    if a.servers.is_empty() {
        let spec = a.pool.as_deref().unwrap_or_default();
        let (channel, expr) = match spec.split_once('/') {
            Some((c, e)) => (c, Some(e)),
            None => (spec, None),
        };
        let keep = expr.map(kecho::filter::ContentFilter::compile).transpose().context("--pool filter")?;
        let n = node(&a.reg, &a.node, None).await?;
        let _observer_node = kecho_metrics::register_node(&mut registry, &n);
        let ch = n.channel(channel).await?;
        _follow = Some(follow(&balancer, ch, keep, Duration::from_millis(100)));
        _node = Some(n);
    } else {
        let pool = a.servers.iter().map(|s| parse_server(s).map(|addr| Backend { addr, load: None }));
        balancer.set_pool(pool.collect::<Result<Vec<_>, _>>()?);
    }
    let _metrics = a.observe.metrics.serve(registry).await?;
    let _reporter = match (&_node, a.observe.report) {
        (Some(n), true) => Some(kecho_metrics::cluster::Reporter::start(n, crate::observe::REPORT_EVERY).await?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("kecho balance on http://{} ({})", listener.local_addr()?, a.mode);
    let serve = balancer.spawn(listener);
    tokio::select! {
        r = serve => r.context("the balancer stopped")?,
        _ = tokio::signal::ctrl_c() => {}
    }
    if let Some(n) = _node {
        n.shutdown().await;
    }
    Ok(())
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

/// The balancer's counters at scrape time.
#[derive(Debug)]
struct BalanceCollector(Arc<Balancer>);

impl Collector for BalanceCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let b = &self.0;
        let m = enc.encode_descriptor("kecho_balance_servers", "Servers in the pool", None, MetricType::Gauge)?;
        ConstGauge::new(b.pool().len() as i64).encode(m)?;
        let mut m = enc.encode_descriptor(
            "kecho_balance_requests",
            "Requests sent (or redirected) to each server",
            None,
            MetricType::Counter,
        )?;
        let mut per: Vec<_> = b.stats.per_server.lock().iter().map(|(a, n)| (a.to_string(), *n)).collect();
        per.sort();
        for (server, n) in per {
            ConstCounter::new(n).encode(m.encode_family(&[("server", server.as_str())])?)?;
        }
        let m = enc.encode_descriptor(
            "kecho_balance_unavailable",
            "Requests answered 503 for want of a server",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(b.stats.unavailable.load(Ordering::Relaxed)).encode(m)?;
        let m = enc.encode_descriptor(
            "kecho_balance_failed",
            "Requests whose server failed (502)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(b.stats.failed.load(Ordering::Relaxed)).encode(m)?;
        Ok(())
    }
}
