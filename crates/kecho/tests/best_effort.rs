//! Best-effort events (`EventOptions::best_effort`): over QUIC they travel as datagrams, every loss is reported to the
//! sinks in its place, a sink never gets a source's events out of order and reliable events of the same source are
//! never lost; over TCP, and towards Block sinks, nothing changes.
#![cfg(feature = "quic")]

use std::time::Duration;

use anyhow::Result;
use kecho::{Attrs, EventOptions, LinkStats, Node, Overflow, RegistryClient, SinkOptions, Transport};

mod common;
use common::drain;

const T: Duration = Duration::from_secs(10);

/// Two nodes linked by `transport`; the first drops every `drop_every`th datagram it would send (0: none).
async fn pair(transport: Transport, drop_every: u64) -> Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).transport(transport).drop_datagrams_every(drop_every);
    let b = Node::builder().registry_client(reg).transport(transport);
    Ok((a.start().await?, b.start().await?))
}

/// Checks the per-source account: sequence numbers only grow, and every number skipped between two delivered events
/// was reported missed right there (all events of the source go to this sink).
fn check_account(got: &[(String, u64, u64)]) {
    let mut prev = 0;
    for (ty, seq, missed) in got {
        assert!(*seq > prev, "event {seq} ({ty}) delivered after {prev}: order broken");
        assert_eq!(*missed, seq - prev - 1, "events missed before {seq} ({ty}) not reported exactly in place");
        prev = *seq;
    }
}

/// Checks the account of `n` events sent to a sink that joined after the source had numbered others, the first of
/// them numbered `first`: every one delivered or reported missed, the first delivered with nothing missed before it,
/// and from there the account of [`check_account`]. Returns how many were reported missed. `to`: the sink's node, as
/// the failures name it.
fn check_from(got: &[(String, u64, u64)], first: u64, n: u64, to: &str) -> u64 {
    let missed: u64 = got.iter().map(|g| g.2).sum();
    assert_eq!(
        got.len() as u64 + missed,
        n,
        "every event sent to {to} delivered or reported missed ({} delivered, {missed} missed)",
        got.len()
    );
    assert_eq!(
        got.first().map(|g| (g.1, g.2)),
        Some((first, 0)),
        "{to}: nothing from before it joined, then the first"
    );
    let rebased: Vec<(String, u64, u64)> = got.iter().map(|(t, s, m)| (t.clone(), s - first + 1, *m)).collect();
    check_account(&rebased);
    missed
}

fn link_to(n: &Node, other: &Node) -> LinkStats {
    n.link_stats().into_iter().find(|l| l.node == other.id()).expect("a link between the two nodes")
}

/// Sends `n` best-effort events of `size` bytes of type `be` (a little paced: the datagram buffers are not what is
/// tested), then one reliable event of type `end`.
async fn send_best_effort(src: &mut kecho::Source, n: u64, size: usize) -> Result<()> {
    src.set_type_options("be", EventOptions::new().best_effort(true));
    let payload = vec![7u8; size];
    for i in 0..n {
        src.submit("be", &Attrs::new(), &payload).await?;
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    src.submit("end", &Attrs::new(), b"").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_events_go_as_datagrams_over_quic() -> Result<()> {
    let (a, b) = pair(Transport::Quic, 0).await?;
    let ca = a.channel("be").await?;
    let cb = b.channel("be").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropNewest))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    send_best_effort(&mut src, 2000, 100).await?;
    let got = drain(&mut sink, "end").await?;
    check_account(&got);
    assert_eq!(got.last().map(|g| g.1), Some(2001));
    let delivered = got.iter().filter(|g| g.0 == "be").count();
    assert!(delivered >= 1000, "only {delivered} of 2000 best-effort events arrived on loopback");
    let (sent, received) = (link_to(&a, &b), link_to(&b, &a));
    // The source's first event to the node goes on the stream (the receiver's baseline), and so do those submitted
    // while it still waits in the link's outbox (a datagram would overtake it); the others go as datagrams.
    assert_eq!(got.first().map(|g| (g.1, g.2)), Some((1, 0)), "the first event arrived");
    assert_eq!(sent.datagrams_sent + sent.event_frames, 2001, "every event went one way or the other");
    assert!(sent.datagrams_sent >= 1900, "only {} best-effort events went as datagrams", sent.datagrams_sent);
    assert!(received.datagrams_received >= delivered as u64 - (sent.event_frames - 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_datagram_is_reported_as_missed_in_its_place() -> Result<()> {
    let (a, b) = pair(Transport::Quic, 5).await?;
    let ca = a.channel("loss").await?;
    let cb = b.channel("loss").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    send_best_effort(&mut src, 1000, 64).await?;
    let got = drain(&mut sink, "end").await?;
    check_account(&got);
    let missed: u64 = got.iter().map(|g| g.2).sum();
    // The source's first events went on the stream (see `best_effort_events_go_as_datagrams_over_quic`), the others
    // as datagrams, of which every fifth was dropped.
    let l = link_to(&a, &b);
    let tried = 1001 - l.event_frames;
    assert!(tried >= 900, "only {tried} best-effort events went as datagrams");
    assert_eq!(l.datagrams_sent, tried - tried / 5);
    assert!(missed >= tried / 5, "{} datagrams were dropped at the sender, {missed} reported missed", tried / 5);
    assert_eq!(got.len() as u64 + missed, 1001, "every event delivered or reported missed");
    assert_eq!(cb.stats().missed, missed);
    Ok(())
}

/// A best-effort source whose large events (above a datagram) go on the stream and small ones as datagrams, with a
/// reliable type in between and datagrams dropped: order holds, every reliable event arrives, the account is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_paths_keep_order_and_reliable_events() -> Result<()> {
    let (a, b) = pair(Transport::Quic, 3).await?;
    let ca = a.channel("mixed").await?;
    let cb = b.channel("mixed").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    src.set_type_options("be", EventOptions::new().best_effort(true));
    let (small, large) = (vec![1u8; 80], vec![2u8; 6000]);
    let mut reliable = 0;
    for i in 0..3000u32 {
        match i % 7 {
            0 => src.submit("be", &Attrs::new(), &large).await?,
            3 => {
                reliable += 1;
                src.submit("rel", &Attrs::new(), &small).await?
            }
            _ => src.submit("be", &Attrs::new(), &small).await?,
        };
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let got = drain(&mut sink, "end").await?;
    check_account(&got);
    assert_eq!(got.iter().filter(|g| g.0 == "rel").count(), reliable, "a reliable event was lost");
    assert!(link_to(&a, &b).datagrams_sent > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_is_reliable_over_tcp_and_towards_block_sinks() -> Result<()> {
    for (transport, overflow) in [(Transport::Tcp, Overflow::DropNewest), (Transport::Quic, Overflow::Block)] {
        let (a, b) = pair(transport, 2).await?;
        let ca = a.channel("plain").await?;
        let cb = b.channel("plain").await?;
        let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(overflow))?;
        ca.wait_for_sinks(1, T).await?;
        let mut src = ca.source()?;
        send_best_effort(&mut src, 500, 100).await?;
        let got = drain(&mut sink, "end").await?;
        check_account(&got);
        assert_eq!(got.len(), 501, "{transport}, {overflow:?}: every event arrives");
        assert_eq!(link_to(&a, &b).datagrams_sent, 0, "{transport}, {overflow:?}: no datagram");
        a.shutdown().await;
        b.shutdown().await;
    }
    Ok(())
}

/// A sink's node closes the channel and opens it again, on the same link (another channel keeps it up): the source's
/// best-effort events to the new instance are delivered or reported missed, never lost silently. (The source used to
/// number them on from where it was with the old instance, whose receiver state is gone: every datagram then named a
/// stream event the new instance never saw and was dropped as one that overtook it, with no report.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_events_to_a_reopened_channel_are_delivered_or_reported() -> Result<()> {
    let (a, b) = pair(Transport::Quic, 4).await?;
    // Keeps the link between the two nodes up while the channel under test is closed.
    let _keep_a = a.channel("keep").await?;
    let _keep_b = b.channel("keep").await?;
    let ca = a.channel("again").await?;
    let cb = b.channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    send_best_effort(&mut src, 300, 64).await?;
    let got = drain(&mut sink, "end").await?;
    check_account(&got);
    let links_before = link_to(&a, &b);
    drop(sink);
    cb.close().await;
    drop(cb);
    let deadline = tokio::time::Instant::now() + T;
    while src.sinks() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the source still sees the closed channel's sink");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cb = b.channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let first = src.submit("be", &Attrs::new(), b"first").await?;
    send_best_effort(&mut src, 300, 64).await?;
    let got = drain(&mut sink, "end").await?;
    let missed = check_from(&got, first, 302, "the new instance");
    let l = link_to(&a, &b);
    assert!(l.datagrams_sent > links_before.datagrams_sent + 100, "the events went as datagrams");
    assert_eq!(cb.stats().missed, missed);
    Ok(())
}

/// A sink's process crashes (its node stops without a word) and starts again at the same address, as a new node:
/// the source's datagrams for the dead node's connection go nowhere (and are not delivered to the new node, which
/// never had its numbering), and the new node gets every best-effort event sent after it joined, delivered or
/// reported missed, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_restarted_at_the_same_address_gets_best_effort_events_delivered_or_reported() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    // A port free for TCP and UDP, taken by the sink's node, then by its restart.
    let addr = {
        let t = std::net::TcpListener::bind("127.0.0.1:0")?;
        let a = t.local_addr()?;
        std::net::UdpSocket::bind(a)?;
        a
    };
    let quic = |n: kecho::NodeBuilder| n.registry_client(reg.clone()).transport(Transport::Quic);
    let a = quic(Node::builder()).drop_datagrams_every(4).heartbeat_timeout(Duration::from_millis(600)).start().await?;
    let b = quic(Node::builder()).listen(addr).start().await?;
    let ca = a.channel("crash").await?;
    let cb = b.channel("crash").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    send_best_effort(&mut src, 200, 64).await?;
    check_account(&drain(&mut sink, "end").await?);
    // The crash: no goodbye, no close; the source goes on sending to the dead node for a while.
    b.kill();
    drop(sink);
    drop(cb);
    drop(b);
    send_best_effort(&mut src, 100, 64).await?;
    // The killed node's sockets close as its tasks wind down (a crashed process's at once).
    let deadline = tokio::time::Instant::now() + T;
    let b2 = loop {
        match quic(Node::builder()).listen(addr).start().await {
            Ok(n) => break n,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let cb2 = b2.channel("crash").await?;
    let mut sink = cb2.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    // The source sees the new node's sink (the old one's is gone: lost link, then taken for gone).
    let deadline = tokio::time::Instant::now() + T;
    while ca.member_nodes() != [b2.id()] || src.sinks() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the source never saw the restarted node alone");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = src.submit("be", &Attrs::new(), b"first").await?;
    send_best_effort(&mut src, 300, 64).await?;
    let got = drain(&mut sink, "end").await?;
    let missed = check_from(&got, first, 302, "the restarted node");
    assert!(link_to(&a, &b2).datagrams_sent > 100, "the events went as datagrams");
    assert_eq!(cb2.stats().missed, missed);
    Ok(())
}
