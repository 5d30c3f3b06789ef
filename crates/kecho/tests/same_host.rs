//! Same-host links (Unix-domain sockets, `NodeBuilder::same_host`) and the low-latency receive mode
//! (`NodeBuilder::low_latency`): the cases that matter for a transport (order, loss accounting, a crashed peer, the
//! choice of transport) over them.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Event, MembershipConfig, Node, Overflow, RegistryClient, SinkOptions};
use tokio::time::timeout;

mod common;

const T: Duration = Duration::from_secs(10);

/// How the nodes of a test run.
#[derive(Clone, Copy)]
struct Mode {
    same_host: bool,
    low_latency: Duration,
}

const SAME_HOST: Mode = Mode { same_host: true, low_latency: Duration::ZERO };

fn builder(reg: &RegistryClient, mode: Mode) -> kecho::NodeBuilder {
    let m = MembershipConfig {
        lease_ttl: Duration::from_millis(1500),
        open_timeout: Duration::from_secs(3),
        ..MembershipConfig::default()
    };
    Node::builder()
        .registry_client(reg.clone())
        .same_host(mode.same_host)
        .low_latency(mode.low_latency)
        .heartbeat_timeout(Duration::from_millis(600))
        .membership(m)
}

async fn recv(sink: &mut kecho::Sink) -> Result<Event> {
    match timeout(T, sink.recv()).await.context("timed out waiting for an event")? {
        Ok(e) => Ok(e),
        Err(e) => bail!("recv: {e}"),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = tokio::time::Instant::now();
    while !f() {
        if start.elapsed() > T {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

/// Every link of `n` that is up is same-host (or not, as `want` says).
fn check_same_host(n: &Node, want: bool) {
    let up: Vec<_> = n.link_stats().into_iter().filter(|l| l.up).collect();
    assert!(!up.is_empty(), "no link up");
    for l in up {
        assert_eq!(l.same_host, want, "link to {} ({})", l.node, l.addr);
    }
}

/// `n` events from one source, each carrying its number, arrive at a Block sink on another node all and in order.
async fn in_order(mode: Mode, n: u32) -> Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    let a = builder(&reg, mode).start().await?;
    let b = builder(&reg, mode).start().await?;
    let ca = a.create_channel("order").await?;
    let cb = b.open_channel("order").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(256).overflow(Overflow::Block))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            // Sizes vary so that frames straddle the reads.
            let mut payload = i.to_le_bytes().to_vec();
            payload.resize(4 + (i as usize * 37) % 3000, 0xa5);
            src.submit("e", &Attrs::new(), &payload).await?;
        }
        Ok::<_, anyhow::Error>(src)
    });
    for i in 0..n {
        let ev = recv(&mut sink).await?;
        let got = u32::from_le_bytes(ev.payload()[..4].try_into()?);
        assert_eq!((got, ev.seq()), (i, u64::from(i) + 1), "out of order");
        assert_eq!(ev.payload().len(), 4 + (i as usize * 37) % 3000);
    }
    let _src = sender.await??;
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_whole_and_in_order_over_a_same_host_link() -> Result<()> {
    let (a, b) = in_order(SAME_HOST, 20_000).await?;
    check_same_host(&a, true);
    check_same_host(&b, true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_whole_and_in_order_in_low_latency_mode() -> Result<()> {
    let low = Duration::from_micros(100);
    let (a, _b) = in_order(Mode { same_host: false, low_latency: low }, 20_000).await?;
    check_same_host(&a, false);
    let (a, _b) = in_order(Mode { same_host: true, low_latency: low }, 20_000).await?;
    check_same_host(&a, true);
    Ok(())
}

/// A node without same-host links is reached over TCP by one with them, and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_same_host_links_is_reached_over_tcp() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let local = builder(&reg, SAME_HOST).start().await?;
    let plain = builder(&reg, Mode { same_host: false, low_latency: Duration::ZERO }).start().await?;
    let ch = local.create_channel("mixed").await?;
    let mut sink = ch.sink(SinkOptions::new())?;
    let cp = plain.open_channel("mixed").await?;
    cp.wait_for_sinks(1, T).await?;
    cp.source()?.submit("e", &Attrs::new(), b"x").await?;
    assert_eq!(&recv(&mut sink).await?.payload()[..], b"x");
    check_same_host(&local, false);
    check_same_host(&plain, false);
    Ok(())
}

/// A member whose process dies is found at once (its socket closes), removed, and the others carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_same_host_member_is_removed_and_the_others_carry_on() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let nodes = [
        builder(&reg, SAME_HOST).start().await?,
        builder(&reg, SAME_HOST).start().await?,
        builder(&reg, SAME_HOST).start().await?,
    ];
    let a = nodes[0].create_channel("crash").await?;
    let b = nodes[1].open_channel("crash").await?;
    let c = nodes[2].open_channel("crash").await?;
    let _sb = b.sink(SinkOptions::new())?;
    let mut sc = c.sink(SinkOptions::new())?;
    a.wait_for_sinks(2, T).await?;
    check_same_host(&nodes[0], true);
    nodes[1].kill();
    let took = eventually("crashed sink removed", || a.sinks() == 1).await?;
    assert!(took < Duration::from_millis(2000), "took {took:?}");
    let mut src = a.source()?;
    src.submit("e", &Attrs::new(), b"").await?;
    assert_eq!(recv(&mut sc).await?.seq(), 1);
    Ok(())
}

/// A Block sink nobody reads stalls the link; the events of another channel that find the link full are dropped at
/// the source and reported to their sink, exactly, once the link moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dropped_at_a_full_same_host_link_are_reported() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a_node = builder(&reg, SAME_HOST).link_queue_bytes(64 * 1024).start().await?;
    let b_node = builder(&reg, SAME_HOST).start().await?;
    common::events_dropped_at_a_full_link_are_reported(&a_node, &b_node, || check_same_host(&a_node, true)).await
}
