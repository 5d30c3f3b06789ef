//! `kecho demo`: an embedded registry and four nodes on loopback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use kecho::filter::{Dedupe, Selector};
use kecho::{Attrs, Node, SinkOptions, Value};
use kecho_registry::RegistryServer;
use serde::{Deserialize, Serialize};

/// A load report, as in KECho's monitoring channel.
#[derive(Serialize, Deserialize, Debug)]
struct LoadReport {
    node: String,
    cpu: f64,
    queue: u32,
}

/// `kecho demo`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events per source in the latency run.
    #[arg(long, default_value_t = 2000)]
    events: u64,
    /// Leave out the web-farm part.
    #[arg(long)]
    no_webfarm: bool,
    /// Leave out the deploy part.
    #[arg(long)]
    no_deploy: bool,
}

pub async fn run(a: Args) -> Result<()> {
    channels(a.events).await?;
    if !a.no_deploy {
        deploy_demo().await?;
    }
    if !a.no_webfarm {
        println!();
        kecho_webfarm::demo_webfarm().await?;
    }
    Ok(())
}

/// The channel part: typed events among four nodes, what each sink got and the delivery latency.
async fn channels(events: u64) -> Result<()> {
    let server = RegistryServer::bind(([127, 0, 0, 1], 0).into()).await?;
    let reg_addr = server.local_addr();
    let _registry = server.spawn();
    println!("kecho demo: embedded registry on {reg_addr}, 4 nodes on loopback\n");

    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(Node::builder().registry(reg_addr).start().await?);
    }
    let names = ["node0", "node1", "node2", "node3"];

    // 1. A monitoring channel: every node publishes typed load reports; node0 collects them.
    let t0 = Instant::now();
    let mon0 = nodes[0].create_channel("monitoring").await?;
    let created = t0.elapsed();
    let mut collector = mon0.typed_sink::<LoadReport>("load", SinkOptions::new())?;
    let mut mon = vec![mon0.clone()];
    let t1 = Instant::now();
    for n in &nodes[1..] {
        mon.push(n.open_channel("monitoring").await?);
    }
    let opened = t1.elapsed() / 3;
    let mut reporters = Vec::new();
    for ch in &mon {
        reporters.push(ch.typed_source::<LoadReport>("load")?);
    }
    mon0.wait_for_sinks(1, Duration::from_secs(5)).await?;
    for ch in &mon[1..] {
        ch.wait_for_sinks(1, Duration::from_secs(5)).await?;
    }
    for (i, r) in reporters.iter_mut().enumerate() {
        for round in 0..2u32 {
            let cpu = ((i as f64 + 1.0) * 17.0 + round as f64 * 5.0).min(100.0) / 100.0;
            let report = LoadReport { node: names[i].into(), cpu, queue: i as u32 * 3 + round };
            let attrs = Attrs::new().with("host", names[i]).with("cpu", cpu);
            r.submit(&report, &attrs).await?;
        }
    }
    println!("channel \"monitoring\" (created in {created:?}, opened in {opened:?} on average):");
    println!("  sink on node0 (type \"load\") received:");
    for _ in 0..reporters.len() * 2 {
        let got = tokio::time::timeout(Duration::from_secs(5), collector.recv()).await.context("load reports")??;
        println!(
            "    load #{} from {:<5} cpu={:.2} queue={}  attrs: {}",
            got.event.seq(),
            got.value.node,
            got.value.cpu,
            got.value.queue,
            fmt_attrs(got.event.attrs())
        );
    }

    // 2. A request channel with type filters: each sink gets only the types it asked for, filtered at the source.
    let req0 = nodes[0].create_channel("requests").await?;
    let mut sinks = Vec::new();
    let wanted: [&[&str]; 3] = [&["get"], &["put"], &[]];
    let mut req = Vec::new();
    for (i, types) in wanted.iter().enumerate() {
        let ch = nodes[i + 1].open_channel("requests").await?;
        sinks.push(ch.sink(SinkOptions::new().types(types.iter().copied()))?);
        req.push(ch);
    }
    req0.wait_for_sinks(3, Duration::from_secs(5)).await?;
    let mut src = req0.source()?;
    let kinds = ["get", "put", "delete"];
    let total = 30u64;
    for i in 0..total {
        let ty = kinds[(i % 3) as usize];
        let attrs = Attrs::new().with("path", format!("/item/{i}")).with("size", (i * 100) as i64);
        src.submit(ty, &attrs, format!("request {i}").as_bytes()).await?;
    }
    println!("\nchannel \"requests\": node0 submitted {total} events (get, put, delete in turn):");
    for (i, s) in sinks.iter_mut().enumerate() {
        let expect = if wanted[i].is_empty() { total } else { total / 3 };
        let mut by_type = BTreeMap::new();
        let mut first = None;
        for _ in 0..expect {
            let ev = tokio::time::timeout(Duration::from_secs(5), s.recv()).await.context("requests")??;
            *by_type.entry(ev.ty().to_owned()).or_insert(0u64) += 1;
            first.get_or_insert_with(|| format!("{} #{} {}", ev.ty(), ev.seq(), fmt_attrs(ev.attrs())));
        }
        let types = if wanted[i].is_empty() { "all types".to_owned() } else { format!("types {:?}", wanted[i]) };
        println!(
            "  sink on {} ({types}): {} events {:?}; first: {}",
            names[i + 1],
            expect,
            by_type,
            first.unwrap_or_default()
        );
    }
    let stats = req0.stats();
    println!(
        "  source side: {} events submitted, {} frames sent of {} without type filtering: each event went only to the \
         nodes with a sink for its type",
        stats.submitted,
        stats.sent,
        stats.submitted * 3
    );

    // 3. KECho's load balancer in miniature: a data channel where node0 forwards requests to the 2 least-loaded
    //    servers (OUT-filter on the servers' load attribute) and keeps only the first response (IN-filter).
    let fwd = nodes[0].create_channel("data").await?;
    fwd.set_in_filter(Some(std::sync::Arc::new(Dedupe::new("req", Duration::from_secs(5)))));
    let mut responses = fwd.sink(SinkOptions::new().types(["response"]))?;
    let mut forwarder = fwd.source()?;
    forwarder.set_out_filter(Some(std::sync::Arc::new("least:load:2".parse::<Selector>()?)));
    let loads = [0.8, 0.2, 0.4];
    let mut servers = Vec::new();
    for (i, load) in loads.iter().enumerate() {
        let ch = nodes[i + 1].open_channel("data").await?;
        let requests = ch.sink(SinkOptions::new().types(["request"]).attr("load", *load))?;
        let answer = ch.source()?;
        servers.push((ch, requests, answer));
    }
    fwd.wait_for_sinks(4, Duration::from_secs(5)).await?;
    for (ch, ..) in &servers {
        ch.wait_for_sinks(1, Duration::from_secs(5)).await?;
    }
    let requests = 12i64;
    for r in 0..requests {
        forwarder.submit("request", &Attrs::new().with("req", r), b"GET /").await?;
    }
    let mut handled = Vec::new();
    for (i, (_, sink, answer)) in servers.iter_mut().enumerate() {
        let mut n = 0;
        while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(300), sink.recv()).await {
            let req = ev.attrs().get("req").cloned().unwrap_or(Value::Int(-1));
            answer.submit("response", &Attrs::new().with("req", req).with("server", names[i + 1]), b"200 OK").await?;
            n += 1;
        }
        handled.push(n);
    }
    let mut first = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), responses.recv()).await {
        first += 1;
    }
    println!("\nchannel \"data\": KECho's load balancer, {requests} requests forwarded to the 2 least-loaded servers:");
    for (i, n) in handled.iter().enumerate() {
        println!("  {} (load {:.1}) handled {n}", names[i + 1], loads[i]);
    }
    println!(
        "  node0 kept {first} responses and its IN-filter discarded {} duplicates (first response wins)",
        fwd.stats().filtered
    );

    // 4. Delivery latency: node2 -> node3, one event in flight at a time (no queueing), timestamps in attributes.
    let lat_src_ch = nodes[2].channel("latency").await?;
    let lat_sink_ch = nodes[3].open_channel("latency").await?;
    let mut lat_sink = lat_sink_ch.sink(SinkOptions::new().types(["ping"]))?;
    lat_src_ch.wait_for_sinks(1, Duration::from_secs(5)).await?;
    let mut lat_src = lat_src_ch.source()?;
    let epoch = Arc::new(Instant::now());
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let payload = vec![0u8; 100];
    for _ in 0..events {
        let sent_ns = epoch.elapsed().as_nanos() as i64;
        lat_src.submit("ping", &Attrs::new().with("t", sent_ns), &payload).await?;
        let ev = tokio::time::timeout(Duration::from_secs(5), lat_sink.recv()).await.context("latency events")??;
        let now_ns = epoch.elapsed().as_nanos() as i64;
        if let Some(Value::Int(t)) = ev.attrs().get("t") {
            hist.record(((now_ns - t).max(1) / 1000).max(1) as u64).ok();
        }
    }
    println!("\ndelivery latency node2 -> node3 over TCP loopback, {events} events of 100 B, one in flight:");
    println!(
        "  p50 {} us   p90 {} us   p99 {} us   p99.9 {} us   max {} us",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    println!("  (KECho reported 250-300 us from socket arrival to handler in the kernel)");

    for n in &nodes {
        n.shutdown().await;
    }
    Ok(())
}

fn fmt_attrs(a: &Attrs) -> String {
    a.iter().map(|(k, v)| format!("{k}={}", crate::attrs::value_text(v))).collect::<Vec<_>>().join(" ")
}

/// The deploy part (2K's automatic configuration, docs/CONFIG.md): a three-component application on three simulated
/// agents of this host, started in dependency order; its middle component is killed and comes back, its dependent
/// told; then it is stopped in reverse order.
async fn deploy_demo() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kecho-demo-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let result = deploy_in(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn deploy_in(dir: &std::path::Path) -> Result<()> {
    use kecho_exec::app::{AppSpec, ComponentName};
    use kecho_exec::deploy::{deploy, render_status, LocalLauncher};
    use kecho_exec::place::{AgentName, InMemoryPlacer, MemAgent};
    use kecho_exec::plan::AppEvent;
    use kecho_exec::task::Confinement;

    let d = dir.display();
    let component = |name: &str, after: &str| {
        format!(
            "[component.{name}]\ncmd = \"echo $$ > {d}/{name}.pid; exec sleep 300\"\nafter = [{after}]\ncpus = 1\n\
             ready = {{ cmd = \"kill -0 $(cat {d}/{name}.pid 2>/dev/null) 2>/dev/null\" }}\n"
        )
    };
    let text = [component("db", ""), component("api", "\"db\""), component("web", "\"api\"")].concat();
    let app = AppSpec::parse(&text, Some("shop"))?;
    let agents = (0..3)
        .map(|i| MemAgent {
            name: AgentName(format!("agent-{i}")),
            host: "127.0.0.1".into(),
            cpus: 1.0,
            mem: 1 << 30,
            labels: Default::default(),
        })
        .collect();
    let launcher = Arc::new(LocalLauncher::new(dir.join("agents"), Confinement::detect(None)));
    let started = Instant::now();
    let mut running =
        deploy::<_, _, kecho_exec::repo::Store>(app.clone(), Arc::new(InMemoryPlacer::new(agents)), launcher, None)
            .await?;
    running.ready().await?;
    println!(
        "\ndeploy: application \"shop\" (db <- api <- web, one CPU each on three agents), ready in {:.1} ms:",
        started.elapsed().as_secs_f64() * 1e3
    );
    print!("{}", render_status(&app, &running.status()));
    let pid = std::fs::read_to_string(dir.join("api.pid"))?.trim().to_owned();
    let killed = Instant::now();
    let status = std::process::Command::new("kill").args(["-9", &pid]).status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    let api: ComponentName = "api".parse()?;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), running.notices.recv()).await?.context("closed")?;
        let told = n.to.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
        println!("  api killed (-9): {} {:?}, told: {told}", n.about, n.event);
        if n.about == api && n.event == AppEvent::Recovered {
            break;
        }
    }
    println!("  recovered in {:.1} ms (policy: restart in place)", killed.elapsed().as_secs_f64() * 1e3);
    running.undeploy().await?;
    println!("  undeployed in reverse order (web, api, db)");
    Ok(())
}
