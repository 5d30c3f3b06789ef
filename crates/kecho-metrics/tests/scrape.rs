//! Metrics of real nodes, scraped and parsed: the values move when events flow.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kecho::{Attrs, Node, Overflow, RegistryClient, SinkOptions};
use kecho_metrics::text::{parse, value, Sample};
use prometheus_client::registry::Registry;

const T: Duration = Duration::from_secs(10);

fn samples(reg: &Registry) -> Result<Vec<Sample>> {
    Ok(parse(&kecho_metrics::render(reg))?)
}

fn check(s: &[Sample], name: &str, labels: &[(&str, &str)], want: f64) {
    assert_eq!(value(s, name, labels), Some(want), "{name}{labels:?}");
}

async fn pair() -> Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).start().await?;
    let b = Node::builder().registry_client(reg).start().await?;
    Ok((a, b))
}

#[tokio::test]
async fn channel_link_and_latency_metrics_follow_the_events_over_http() -> Result<()> {
    let (a, b) = pair().await?;
    let mut reg_a = Registry::default();
    kecho_metrics::register_node(&mut reg_a, &a);
    let mut reg_b = Registry::default();
    let latency = kecho_metrics::register_node(&mut reg_b, &b);
    let server = kecho_metrics::MetricsServer::bind("127.0.0.1:0".parse()?, Arc::new(reg_b)).await?;

    let ca = a.create_channel("news").await?;
    let cb = b.open_channel("news").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    let before = samples(&reg_a)?;
    check(&before, "kecho_channel_events_submitted_total", &[("channel", "news")], 0.0);
    check(&before, "kecho_channel_sinks", &[("channel", "news")], 1.0);
    check(&before, "kecho_node_links", &[], 1.0);

    let mut src = ca.source()?;
    for i in 0..10i64 {
        let mut attrs = Attrs::new().with("i", i);
        kecho_metrics::stamp(&mut attrs);
        src.submit("e", &attrs, b"hello").await?;
    }
    for _ in 0..10 {
        let ev = tokio::time::timeout(T, sink.recv()).await?.context("sink closed")?;
        let secs = latency.observe("news", &ev).context("stamped event has a latency")?;
        assert!((0.0..10.0).contains(&secs), "latency {secs}");
    }

    let s = samples(&reg_a)?;
    check(&s, "kecho_channel_events_submitted_total", &[("channel", "news")], 10.0);
    check(&s, "kecho_channel_events_sent_total", &[("channel", "news")], 10.0);
    assert!(value(&s, "kecho_channel_sent_bytes_total", &[("channel", "news")]).unwrap() >= 50.0);
    check(&s, "kecho_channel_sources", &[("channel", "news")], 1.0);
    check(&s, "kecho_channel_member_nodes", &[("channel", "news")], 1.0);
    let peer = a.link_stats()[0].node.to_string();
    check(&s, "kecho_link_up", &[("peer", &peer)], 1.0);
    check(&s, "kecho_link_reconnects_total", &[("peer", &peer)], 0.0);
    check(&s, "kecho_link_heartbeat_timeouts_total", &[("peer", &peer)], 0.0);
    check(&s, "kecho_link_event_frames_sent_total", &[("peer", &peer)], 10.0);
    assert!(value(&s, "kecho_link_writes_total", &[("peer", &peer)]).unwrap() >= 1.0);
    assert!(value(&s, "kecho_link_sent_bytes_total", &[("peer", &peer)]).unwrap() >= 50.0);

    // Node b, over HTTP.
    let s = parse(&kecho_metrics::scrape(server.local_addr()).await?)?;
    check(&s, "kecho_channel_events_received_total", &[("channel", "news")], 10.0);
    check(&s, "kecho_channel_events_dropped_total", &[("channel", "news")], 0.0);
    check(&s, "kecho_channel_frames_stale_total", &[("channel", "news")], 0.0);
    check(&s, "kecho_delivery_latency_seconds_count", &[("channel", "news")], 10.0);
    check(&s, "kecho_delivery_latency_seconds_bucket", &[("channel", "news"), ("le", "+Inf")], 10.0);
    let a_id = b.link_stats()[0].node.to_string();
    assert!(value(&s, "kecho_link_received_bytes_total", &[("peer", &a_id)]).unwrap() >= 50.0);
    Ok(())
}

/// A node that closes a channel and opens it again: a source's end meant for its earlier opening, which another
/// member remembered and relays to it when it appears again, is ignored there and counted as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_for_an_earlier_opening_of_a_channel_are_counted_as_stale() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).start().await?;
    let b = Node::builder().registry_client(reg.clone()).start().await?;
    let c = Node::builder().registry_client(reg).start().await?;
    let mut reg_b = Registry::default();
    kecho_metrics::register_node(&mut reg_b, &b);
    let cc = c.create_channel("again").await?;
    let ca = a.open_channel("again").await?;
    let cb = b.open_channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    for _ in 0..5 {
        src.submit("e", &Attrs::new(), b"").await?;
    }
    for _ in 0..5 {
        tokio::time::timeout(T, sink.recv()).await?.context("sink closed")?;
    }
    // The source's end goes to `b` and `c`; `c` remembers it for members that appear later.
    drop(src);
    tokio::time::sleep(Duration::from_millis(500)).await;
    check(&samples(&reg_b)?, "kecho_channel_frames_stale_total", &[("channel", "again")], 0.0);
    drop(sink);
    cb.close().await;
    drop(cb);
    let start = tokio::time::Instant::now();
    while cc.member_nodes().contains(&b.id()) {
        assert!(start.elapsed() < T, "b never left c's view");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cb = b.open_channel("again").await?;
    while cb.stats().stale == 0 {
        assert!(start.elapsed() < 2 * T, "the earlier opening's end never reached the new one");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stale = cb.stats().stale;
    check(&samples(&reg_b)?, "kecho_channel_frames_stale_total", &[("channel", "again")], stale as f64);
    Ok(())
}

#[tokio::test]
async fn drops_at_a_full_sink_are_counted() -> Result<()> {
    let (a, b) = pair().await?;
    let mut reg_b = Registry::default();
    kecho_metrics::register_node(&mut reg_b, &b);
    let ca = a.create_channel("burst").await?;
    let cb = b.open_channel("burst").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(4).overflow(Overflow::DropNewest))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    for _ in 0..50 {
        src.submit("e", &Attrs::new(), b"x").await?;
    }
    // Wait until every event arrived or was dropped at the sink.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = samples(&reg_b)?;
        let got = value(&s, "kecho_channel_events_received_total", &[("channel", "burst")]).unwrap_or(0.0);
        let dropped = value(&s, "kecho_channel_events_dropped_total", &[("channel", "burst")]).unwrap_or(0.0);
        if got + dropped >= 50.0 {
            assert!(dropped >= 46.0, "dropped {dropped}, received {got}");
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "events missing: {got} + {dropped}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sink.try_recv().is_ok());
    Ok(())
}

#[tokio::test]
async fn a_registry_lists_its_channels_and_their_members() -> Result<()> {
    let server = kecho_registry::RegistryServer::bind("127.0.0.1:0".parse()?).await?.spawn();
    let client = RegistryClient::remote(server.local_addr());
    let mut reg = Registry::default();
    kecho_metrics::register_registry(&mut reg, client.clone(), Duration::from_millis(50));
    let node = Node::builder().registry(server.local_addr()).start().await?;
    let ch = node.channel("jobs").await?;
    let _sink = ch.sink(SinkOptions::new())?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = samples(&reg)?;
        if value(&s, "kecho_registry_channel_sinks", &[("channel", "jobs")]) == Some(1.0) {
            check(&s, "kecho_registry_up", &[], 1.0);
            check(&s, "kecho_registry_channels", &[], 1.0);
            check(&s, "kecho_registry_channel_sources", &[("channel", "jobs")], 0.0);
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no sink in the registry's listing: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
    server.shutdown().await;
    let deadline = tokio::time::Instant::now() + T;
    while value(&samples(&reg)?, "kecho_registry_up", &[]) != Some(0.0) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "registry still up after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(value(&samples(&reg)?, "kecho_registry_list_failures_total", &[]).unwrap() >= 1.0);
    Ok(())
}
