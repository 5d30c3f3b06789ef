//! QUIC links: the channel cases that matter most for a transport (order, loss accounting, liveness, one link per
//! pair under concurrent dials, identity and access, TLS) over QUIC, and the choice of transport between nodes that
//! speak different ones.
#![cfg(feature = "quic")]

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{
    Attrs, Authority, Error, Event, Identity, LinkFailureKind, MembershipConfig, Node, Overflow, RegistryClient, Roles,
    SinkOptions, Transport, Value,
};

mod common;
use common::recv;

const T: Duration = Duration::from_secs(10);

async fn node(reg: &RegistryClient, transport: Transport) -> Result<Node> {
    let m = MembershipConfig {
        lease_ttl: Duration::from_millis(1500),
        open_timeout: Duration::from_secs(3),
        ..MembershipConfig::default()
    };
    Ok(Node::builder()
        .registry_client(reg.clone())
        .transport(transport)
        .heartbeat_timeout(Duration::from_millis(600))
        .membership(m)
        .start()
        .await?)
}

async fn cluster(n: usize) -> Result<(RegistryClient, Vec<Node>)> {
    let reg = RegistryClient::in_process_private();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(node(&reg, Transport::Quic).await?);
    }
    Ok((reg, nodes))
}

fn attr_i(ev: &Event, k: &str) -> i64 {
    match ev.attrs().get(k) {
        Some(Value::Int(i)) => *i,
        other => panic!("attribute {k}: {other:?}"),
    }
}

/// Every link of `n` is up over `want`.
fn check_transport(n: &Node, want: Transport) {
    for l in n.link_stats().iter().filter(|l| l.up) {
        assert_eq!(l.transport, want, "link to {} ({})", l.node, l.addr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_order_with_many_sources_over_quic() -> Result<()> {
    let (_reg, nodes) = cluster(3).await?;
    let sink_ch = nodes[0].channel("order").await?;
    let mut sink = sink_ch.sink(SinkOptions::new().overflow(Overflow::Block).capacity(64))?;
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let ch = n.channel("order").await?;
        ch.wait_for_sinks(1, T).await?;
        let mut src = ch.source()?;
        tasks.push(tokio::spawn(async move {
            for k in 1..=2000i64 {
                src.submit("e", &Attrs::new().with("src", i as i64).with("k", k), &[7u8; 300]).await?;
            }
            anyhow::Ok(())
        }));
    }
    let mut last: HashMap<i64, i64> = HashMap::new();
    for _ in 0..3 * 2000 {
        let ev = recv(&mut sink).await?;
        let (src, k) = (attr_i(&ev, "src"), attr_i(&ev, "k"));
        let prev = last.insert(src, k).unwrap_or(0);
        assert_eq!(k, prev + 1, "source {src} out of order");
        assert_eq!(ev.seq() as i64, k);
    }
    for t in tasks {
        t.await??;
    }
    check_transport(&nodes[0], Transport::Quic);
    assert_eq!(nodes[0].links(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_quic_connection_per_pair_under_concurrent_dials() -> Result<()> {
    let (_reg, nodes) = cluster(4).await?;
    let mut sinks = Vec::new();
    let mut chans = Vec::new();
    for c in 0..3 {
        let name = format!("mux{c}");
        let opened = futures_util::future::join_all(nodes.iter().map(|n| n.channel(&name))).await;
        for ch in opened {
            let ch = ch?;
            sinks.push(ch.sink(SinkOptions::new())?);
            chans.push(ch);
        }
    }
    for ch in &chans {
        ch.wait_for_sinks(4, T).await?;
    }
    let mut sources = Vec::new();
    for ch in &chans {
        sources.push(ch.source()?);
    }
    for s in sources.iter_mut() {
        s.submit("e", &Attrs::new(), b"").await?;
    }
    for s in sinks.iter_mut() {
        for _ in 0..4 {
            recv(s).await?;
        }
    }
    for n in &nodes {
        assert_eq!(n.links(), 3, "one link to each other node");
        check_transport(n, Transport::Quic);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_quic_member_is_removed_and_the_others_carry_on() -> Result<()> {
    let (_reg, nodes) = cluster(3).await?;
    common::a_crashed_member_is_removed_and_the_others_carry_on(&nodes, || {}).await
}

/// A Block sink nobody reads stalls the link; the events of another channel that find the link full are dropped at
/// the source and reported to their sink, exactly, once the link moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dropped_at_a_full_quic_link_are_reported() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a_node = Node::builder()
        .registry_client(reg.clone())
        .transport(Transport::Quic)
        .link_queue_bytes(64 * 1024)
        .start()
        .await?;
    let b_node = node(&reg, Transport::Quic).await?;
    common::events_dropped_at_a_full_link_are_reported(&a_node, &b_node, || ()).await
}

/// Nodes pick what both speak: QUIC between QUIC speakers, TCP with a TCP-only node, and a node that speaks both
/// serves either; a TCP-only and a QUIC-only node have nothing in common and the joiner is told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_pick_the_transport_both_speak() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let both = node(&reg, Transport::Both).await?;
    let tcp = node(&reg, Transport::Tcp).await?;
    let quic = node(&reg, Transport::Quic).await?;
    let ch = both.create_channel("mixed").await?;
    let mut sink = ch.sink(SinkOptions::new())?;
    let ct = tcp.open_channel("mixed").await?;
    let cq = quic.open_channel("mixed").await?;
    ct.wait_for_sinks(1, T).await?;
    cq.wait_for_sinks(1, T).await?;
    let mut st = ct.source()?;
    let mut sq = cq.source()?;
    st.submit("t", &Attrs::new(), b"").await?;
    sq.submit("q", &Attrs::new(), b"").await?;
    let mut types = vec![recv(&mut sink).await?.ty().to_owned(), recv(&mut sink).await?.ty().to_owned()];
    types.sort();
    assert_eq!(types, ["q", "t"]);
    let t_link = tcp.link_stats().into_iter().find(|l| l.up).context("tcp node's link")?;
    let q_link = quic.link_stats().into_iter().find(|l| l.up && l.transport == Transport::Quic);
    assert_eq!(t_link.transport, Transport::Tcp);
    assert!(q_link.is_some(), "the QUIC node reached the other QUIC speaker over QUIC");
    // The TCP-only and QUIC-only nodes share the channel but cannot link: each learns why.
    let lone = node(&reg, Transport::Quic).await?;
    let tcp_only = node(&reg, Transport::Tcp).await?;
    lone.create_channel("apart").await?;
    match tcp_only.open_channel("apart").await {
        Err(e @ Error::OpenTimeout { .. }) => {
            assert!(e.to_string().contains("no transport in common"), "{e}");
            assert!(
                matches!(&e, Error::OpenTimeout { cause: Some(c), .. } if c.kind() == LinkFailureKind::Transport),
                "{e:?}"
            );
        }
        other => bail!("expected a timeout naming the missing transport, got {other:?}"),
    }
    Ok(())
}

/// A protected channel over QUIC: the credential holder is admitted, a node without one is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_access_hold_over_quic() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let authority = Authority::from_secret([0xA5; 32]);
    let policy = authority.policy(Roles::ALL);
    let (ia, ib, ic) = (Identity::from_secret([1; 32]), Identity::from_secret([2; 32]), Identity::from_secret([3; 32]));
    // Nodes with a credential require the policy; the one without does not, so that the contact (over QUIC) is
    // the one to refuse it.
    let start = |id: &Identity, roles: Option<Roles>| {
        let mut b = Node::builder().registry_client(reg.clone()).transport(Transport::Quic).identity(id.clone());
        if let Some(r) = roles {
            b = b.policy("vault", policy).token(authority.grant("vault", r, id.public_key(), 0).unwrap());
        }
        b.start()
    };
    let a = start(&ia, Some(Roles::ALL)).await?;
    let b = start(&ib, Some(Roles::SINK)).await?;
    let c = start(&ic, None).await?;
    let ca = a.create_channel("vault").await?;
    let cb = b.open_channel("vault").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    ca.source()?.submit("e", &Attrs::new(), b"for b").await?;
    assert_eq!(&recv(&mut sink).await?.payload()[..], b"for b");
    // b may not publish; c may do nothing at all.
    assert!(matches!(cb.source(), Err(Error::AccessDenied { .. })), "a sink-only node got a source");
    match c.open_channel("vault").await {
        Err(e @ Error::AccessDenied { .. }) => {
            let why = e.to_string();
            assert!(why.contains("admits only nodes with a credential"), "{why}");
        }
        other => bail!("a node without a credential was not refused: {other:?}"),
    }
    check_transport(&a, Transport::Quic);
    Ok(())
}

/// With a TLS configuration QUIC authenticates against the node's CA: nodes of one CA link, a stranger does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_uses_the_nodes_tls_certificates() -> Result<()> {
    let (ours, theirs) = (common::Ca::new()?, common::Ca::new()?);
    let reg = RegistryClient::in_process_private();
    let m = MembershipConfig { open_timeout: Duration::from_secs(3), ..MembershipConfig::default() };
    let start = |tls: kecho::TlsConfig| {
        Node::builder().registry_client(reg.clone()).membership(m.clone()).transport(Transport::Quic).tls(tls).start()
    };
    let a = start(ours.loopback()?).await?;
    let b = start(ours.loopback()?).await?;
    let ca = a.create_channel("secure").await?;
    let cb = b.open_channel("secure").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    ca.source()?.submit("e", &Attrs::new(), b"secret").await?;
    assert_eq!(&recv(&mut sink).await?.payload()[..], b"secret");
    check_transport(&a, Transport::Quic);
    let stranger = start(theirs.loopback()?).await?;
    match stranger.open_channel("secure").await {
        Err(e @ Error::OpenTimeout { .. }) => assert!(e.to_string().contains("QUIC"), "{e}"),
        other => bail!("a node of another CA linked: {other:?}"),
    }
    Ok(())
}

/// Two QUIC nodes for the priority cases: a large outbox, so that a bulk backlog waits there and in quinn's stream
/// rather than being refused. `urgent_connection` is the second node's setting (off: its links keep an urgent stream
/// on their one connection).
async fn priority_pair(reg: &RegistryClient) -> Result<(Node, Node)> {
    priority_pair_with(reg, true).await
}

async fn priority_pair_with(reg: &RegistryClient, urgent_connection: bool) -> Result<(Node, Node)> {
    let start = |u: bool| {
        Node::builder()
            .registry_client(reg.clone())
            .transport(Transport::Quic)
            .link_queue_bytes(64 << 20)
            .urgent_connection(u)
            .start()
    };
    Ok((start(true).await?, start(urgent_connection).await?))
}

/// How `a` sends its urgent frames to `b` now: `(apart from the bulk, on a connection of their own)`.
fn urgent_path(a: &Node, b: &Node) -> (bool, bool) {
    a.link_stats()
        .iter()
        .find(|l| l.node == b.id() && l.transport == Transport::Quic)
        .map_or((false, false), |l| (l.urgent_apart, l.urgent_connection))
}

/// The urgent lanes have a QUIC connection of their own (docs/PROTOCOL.md, "Priorities and deadlines"): an urgent
/// event arrives while the link's main stream is stalled by a bulk backlog that the receiving node cannot deliver (its
/// sink is full and does not read; the node's QUIC buffers hold the stream's receive window of bulk events). On one
/// stream it would wait behind all of them. Both nodes send theirs on that connection (the one that accepted the link
/// asks the other to make it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_event_passes_a_stalled_bulk_stream_over_quic() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, b) = priority_pair(&reg).await?;
    urgent_passes_stalled_bulk(&a, &b, "one").await?;
    assert_eq!(urgent_path(&a, &b), (true, true), "a's urgent frames on a connection of their own");
    urgent_passes_stalled_bulk(&b, &a, "two").await?;
    assert_eq!(urgent_path(&b, &a), (true, true), "b's urgent frames on a connection of their own");
    Ok(())
}

/// Over QUIC with TLS (both connections authenticated against the nodes' CA), the urgent connection comes up and an
/// urgent event passes a stalled bulk stream on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_urgent_connection_works_over_quic_with_tls() -> Result<()> {
    let ca = common::Ca::new()?;
    let reg = RegistryClient::in_process_private();
    let start = |tls: kecho::TlsConfig| {
        Node::builder()
            .registry_client(reg.clone())
            .transport(Transport::Quic)
            .tls(tls)
            .link_queue_bytes(64 << 20)
            .start()
    };
    let a = start(ca.loopback()?).await?;
    let b = start(ca.loopback()?).await?;
    urgent_passes_stalled_bulk(&a, &b, "tls").await?;
    assert_eq!(urgent_path(&a, &b), (true, true), "a's urgent frames on a connection of their own");
    Ok(())
}

/// A node with urgent connections off (`urgent_connection(false)`) takes none: the link's urgent lanes take a stream
/// of the one QUIC connection each way instead, and an urgent event still passes a stalled bulk stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_urgent_connections_quic_links_keep_an_urgent_stream() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, b) = priority_pair_with(&reg, false).await?;
    urgent_passes_stalled_bulk(&a, &b, "one").await?;
    assert_eq!(urgent_path(&a, &b), (true, false), "a's urgent frames on a stream of the link's connection");
    urgent_passes_stalled_bulk(&b, &a, "two").await?;
    assert_eq!(urgent_path(&b, &a), (true, false), "b's urgent frames on a stream of the link's connection");
    Ok(())
}

/// `a` sends a warm-up urgent event, then 400 bulk events of 64 KiB that `b` cannot read (its bulk sink blocks at 8),
/// then one urgent event: it arrives first, and then every bulk event.
async fn urgent_passes_stalled_bulk(a: &Node, b: &Node, channel: &str) -> Result<()> {
    const BULK: usize = 400;
    let ch_b = b.channel(channel).await?;
    let mut bulk_sink = ch_b.sink(SinkOptions::new().types(["bulk"]).overflow(Overflow::Block).capacity(8))?;
    let mut urgent_sink = ch_b.sink(SinkOptions::new().types(["warm-up", "urgent"]))?;
    let ch_a = a.channel(channel).await?;
    ch_a.wait_for_sinks(2, T).await?;
    let mut bulk = ch_a.source()?;
    let mut alarm = ch_a.source()?;
    let urgent = kecho::EventOptions::new().priority(kecho::Priority::HIGHEST);
    alarm.submit_with("warm-up", &Attrs::new(), b"", urgent).await?;
    assert_eq!(recv(&mut urgent_sink).await?.ty(), "warm-up");
    let payload = vec![0u8; 64 << 10];
    for _ in 0..BULK {
        bulk.submit("bulk", &Attrs::new(), &payload).await?;
    }
    // Let the backlog reach the receiving node (its sink holds 8, its reader waits for room).
    tokio::time::sleep(Duration::from_millis(300)).await;
    alarm.submit_with("urgent", &Attrs::new(), b"now", urgent).await?;
    assert_eq!(recv(&mut urgent_sink).await?.ty(), "urgent");
    assert!(bulk_sink.len() <= 8, "the bulk sink was read");
    for _ in 0..BULK {
        assert_eq!(recv(&mut bulk_sink).await?.ty(), "bulk");
    }
    check_transport(a, Transport::Quic);
    Ok(())
}

/// A source whose events alternate between the default priority (large events, a backlog on the main stream) and the
/// highest (small events, on the urgent connection) still has them delivered in its order, none reported missed: an
/// urgent event waits at the receiver until the main stream has been read past the source's events before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_mixing_priorities_keeps_its_order_over_quic() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, b) = priority_pair(&reg).await?;
    mixing_priorities_keeps_order(&a, &b, "mixed").await?;
    assert_eq!(urgent_path(&a, &b), (true, true), "the urgent events went on a connection of their own");
    Ok(())
}

/// The same with the urgent events on an urgent stream of the link's one connection (the second node takes no
/// urgent connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_mixing_priorities_keeps_its_order_over_a_quic_urgent_stream() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, b) = priority_pair_with(&reg, false).await?;
    mixing_priorities_keeps_order(&a, &b, "mixed").await?;
    assert_eq!(urgent_path(&a, &b), (true, false), "the urgent events went on a stream of the link's connection");
    Ok(())
}

async fn mixing_priorities_keeps_order(a: &Node, b: &Node, channel: &str) -> Result<()> {
    const N: i64 = 600;
    let ch_b = b.channel(channel).await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(8))?;
    let ch_a = a.channel(channel).await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    let sender = tokio::spawn(async move {
        let big = vec![1u8; 32 << 10];
        for k in 1..=N {
            if k % 4 == 0 {
                // A moment for the link's writer to take the events before (the outbox then holds none of this
                // source's: the urgent event goes to the urgent stream while they may still be on their way).
                tokio::time::sleep(Duration::from_micros(500)).await;
                let o = kecho::EventOptions::new().priority(kecho::Priority::HIGHEST);
                src.submit_with("urgent", &Attrs::new().with("k", k), b"u", o).await?;
            } else {
                src.submit("bulk", &Attrs::new().with("k", k), &big).await?;
            }
        }
        anyhow::Ok(())
    });
    for k in 1..=N {
        let ev = recv(&mut sink).await.with_context(|| format!("waiting for event {k}"))?;
        assert_eq!(attr_i(&ev, "k"), k, "out of order");
        if k % 5 == 0 {
            // A slow reader, so that a backlog forms on the main stream at the receiving node.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    sender.await??;
    check_transport(a, Transport::Quic);
    Ok(())
}

/// A quiet QUIC link's events are written into its main stream by the submitting task itself (a direct write, as on
/// plain TCP), and that never reorders or loses one: paced events (written directly) alternate with bursts of large
/// ones that fill the stream's flow-control window while the receiver stalls (the small events sent meanwhile wait
/// behind them), and then with prioritised events (the first may go directly; the urgent connection takes the later
/// ones, which wait for what went on the main stream before them). The sink (Block: nothing may be dropped) gets
/// every event once, in order, and the link counted its direct writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_into_a_quic_stream_keep_order_with_backlogs_and_priorities() -> Result<()> {
    const N: i64 = 420;
    // Phases, by event number: paced small events; a burst of 32 KiB events with small ones among them (9.6 MiB,
    // more than the stream's 8 MiB receive window: the receiver stalls at its start); paced small events again; then
    // urgent events every third, paced, with a burst of 10 large events every 40.
    let phase = |k: i64| match k {
        1..=40 => 0,
        41..=340 => 1,
        341..=380 => 2,
        _ => 3,
    };
    let reg = RegistryClient::in_process_private();
    let (a, b) = priority_pair(&reg).await?;
    let ch_b = b.channel("direct").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(8))?;
    let ch_a = a.channel("direct").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    let (a2, to) = (a.clone(), b.id());
    let sender = tokio::spawn(async move {
        let (small, big) = (vec![1u8; 100], vec![2u8; 32 << 10]);
        let urgent = kecho::EventOptions::new().priority(kecho::Priority::HIGHEST);
        let link = || a2.link_stats().into_iter().find(|l| l.node == to).expect("a's link to b");
        let mut direct_before = 0;
        for k in 1..=N {
            if k == 341 {
                // The burst left the outbox (the stream may still hold it, unsent or unacknowledged): from here the
                // link is quiet again between events.
                common::eventually("the burst written", || link().queued_bytes == 0).await?;
                direct_before = link().direct_writes;
            }
            if k == 381 {
                assert!(link().direct_writes > direct_before, "no direct write after the burst");
            }
            let attrs = Attrs::new().with("k", k);
            match phase(k) {
                1 if k % 10 != 0 => src.submit("bulk", &attrs, &big).await?,
                1 => src.submit("small", &attrs, &small).await?,
                3 if k % 40 < 10 => src.submit("bulk", &attrs, &big).await?,
                3 if k % 3 == 0 => src.submit_with("urgent", &attrs, &small, urgent).await?,
                _ => src.submit("small", &attrs, &small).await?,
            };
            if phase(k) != 1 && !(phase(k) == 3 && k % 40 < 10) {
                // Quiet for the link: the next event may go directly.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        anyhow::Ok(())
    });
    for k in 1..=N {
        if k == 41 {
            // The receiver stalls: the burst fills its node's buffers and the stream's window.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let ev = recv(&mut sink).await.with_context(|| format!("waiting for event {k}"))?;
        assert_eq!(attr_i(&ev, "k"), k, "out of order");
    }
    sender.await??;
    check_transport(&a, Transport::Quic);
    assert_eq!(ch_b.stats().missed, 0);
    let l = a.link_stats().into_iter().find(|l| l.node == b.id()).context("a's link to b")?;
    assert_eq!(l.event_frames, N as u64, "every event went on the link once");
    // Most of the 80 paced events of phases 0 and 2 find the link quiet (some follow a heartbeat or a membership
    // frame in the outbox, or find the stream's window full).
    assert!(l.direct_writes >= 40, "only {} events were written directly into the QUIC stream", l.direct_writes);
    eprintln!("{} of {N} events written directly", l.direct_writes);
    Ok(())
}

/// A QUIC link whose urgent connection cannot be made (the urgent endpoint of one node is closed, as if its UDP socket
/// could not be reached: the dial is refused) takes an urgent stream of its main connection instead, both ways, and
/// no event is lost or reordered on the way: the dialling end falls back once its dial failed, and the accepting end,
/// which is never told of the failure, learns it from the dialler's urgent stream (without that it would keep its
/// urgent frames on the main stream for the link's lifetime, waiting for a connection that never comes). Each
/// direction is run twice, so that whichever node dialled the link, the other's fallback happens mid-link too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_urgent_connection_that_cannot_be_made_falls_back_to_urgent_streams() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, b) = priority_pair(&reg).await?;
    assert!(b.close_urgent_endpoint(), "b has an urgent endpoint");
    mixing_priorities_keeps_order(&a, &b, "one").await?;
    mixing_priorities_keeps_order(&b, &a, "two").await?;
    mixing_priorities_keeps_order(&a, &b, "three").await?;
    mixing_priorities_keeps_order(&b, &a, "four").await?;
    common::eventually("both nodes' urgent frames on streams of the link's connection", || {
        urgent_path(&a, &b) == (true, false) && urgent_path(&b, &a) == (true, false)
    })
    .await?;
    for (n, m) in [(&a, &b), (&b, &a)] {
        let l = n.link_stats().into_iter().find(|l| l.node == m.id()).context("a link")?;
        assert_eq!(l.connects, 1, "the link was never lost");
    }
    Ok(())
}

/// The same when only the accepting end of the link carries priorities: it asks for the urgent connection, the
/// dialler's dial is refused, and the dialler, which has no urgent frames of its own, opens its urgent stream anyway
/// (with a `Ping` on it) so that the acceptor learns it; the acceptor's urgent frames then take a stream too (without
/// that they would share the main stream for the link's lifetime), and the source's order holds throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accepting_end_learns_that_the_quic_urgent_connection_failed() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (x, y) = priority_pair(&reg).await?;
    // Bring the link up and see which node dialled it (when both dial at once, one link is kept: wait for that).
    let (cx, cy) = (x.channel("probe").await?, y.channel("probe").await?);
    let _probe = cx.sink(SinkOptions::new().types(["none"]))?;
    cy.wait_for_sinks(1, T).await?;
    let link = |n: &Node, m: &Node| n.link_stats().into_iter().find(|l| l.node == m.id() && l.up);
    common::eventually("the link up at both ends", || link(&x, &y).is_some() && link(&y, &x).is_some()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (lx, ly) = (link(&x, &y).context("x's link")?, link(&y, &x).context("y's link")?);
    anyhow::ensure!(lx.urgent_dialler != ly.urgent_dialler, "one end dials the urgent connection: {lx:?} {ly:?}");
    let (acceptor, dialler) = if lx.urgent_dialler { (&y, &x) } else { (&x, &y) };
    assert!(acceptor.close_urgent_endpoint(), "the acceptor has an urgent endpoint");
    mixing_priorities_keeps_order(acceptor, dialler, "mixed").await?;
    common::eventually("the acceptor's urgent frames on a stream of the link's connection", || {
        urgent_path(acceptor, dialler) == (true, false)
    })
    .await?;
    assert_eq!(urgent_path(dialler, acceptor), (true, false), "the dialler's urgent stream, opened to tell");
    assert!(link(acceptor, dialler).is_some_and(|l| l.connects == 1), "the link was never lost");
    Ok(())
}

/// Losing a QUIC link's urgent connection mid-run (its endpoint at one node closes, which ends the connection) is
/// losing the link, as for a TCP link's urgent connection: a new link comes up (its urgent connection refused now, so
/// with urgent streams), and every event of a source mixing priorities is delivered once and in order or reported
/// missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_quic_urgent_connection_is_losing_the_link() -> Result<()> {
    const N: u64 = 400;
    let reg = RegistryClient::in_process_private();
    let (a, b) = priority_pair(&reg).await?;
    let ch_b = b.channel("lost").await?;
    let mut sink = ch_b.sink(SinkOptions::new().capacity(4096))?;
    let ch_a = a.channel("lost").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    // b sends urgent events to a too, after the loss: if b dials the new link, only b's urgent stream tells a (the
    // accepting end) that the urgent connection was not made (see the test above).
    let ch_back = a.channel("back").await?;
    let _back_sink = ch_back.sink(SinkOptions::new().capacity(4096))?;
    let ch_back = b.channel("back").await?;
    ch_back.wait_for_sinks(1, T).await?;
    let mut back = ch_back.source()?;
    let urgent = kecho::EventOptions::new().priority(kecho::Priority::HIGHEST);
    src.submit_with("urgent", &Attrs::new(), b"u", urgent).await?;
    recv(&mut sink).await?;
    common::eventually("the urgent connection in use", || urgent_path(&a, &b) == (true, true)).await?;
    let sender = tokio::spawn(async move {
        for k in 2..=N {
            let o = if k % 2 == 0 { urgent } else { kecho::EventOptions::new() };
            src.submit_with("e", &Attrs::new(), &[0u8; 2000], o).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(src)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(b.close_urgent_endpoint(), "b has an urgent endpoint");
    // A link's urgent frames never leave its urgent connection once they took it: a link to b whose urgent frames do
    // not go there is a new one.
    common::eventually("a new link", || {
        a.link_stats().iter().any(|l| l.node == b.id() && l.up && !l.urgent_connection)
    })
    .await?;
    let mut src = sender.await??;
    // More urgent events until the new link carries them, apart from the bulk (events sent while the link was down
    // may have gone nowhere: the channel had no route to b then; they are reported missed once a later one arrives).
    let mut extra = 0;
    let carried = |a: &Node, b: &Node| a.link_stats().iter().any(|l| l.node == b.id() && l.up && l.event_frames > 0);
    while urgent_path(&a, &b) != (true, false) || !carried(&a, &b) {
        src.submit_with("e", &Attrs::new(), &[0u8; 2000], urgent).await?;
        back.submit_with("e", &Attrs::new(), b"b", urgent).await?;
        extra += 1;
        anyhow::ensure!(extra < 200, "no urgent stream on the new link");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_k = N + extra;
    // Events 2 to last_k: each delivered once, in order, or reported missed.
    let (mut got, mut lagged, mut gaps, mut last) = (0u64, 0u64, 0u64, 1u64);
    while got + lagged < last_k - 1 {
        match tokio::time::timeout(T, sink.recv()).await.context("events stopped arriving")? {
            Ok(ev) => {
                anyhow::ensure!(ev.seq() > last, "seq {} after {last} (duplicate or out of order)", ev.seq());
                gaps += ev.seq() - last - 1;
                last = ev.seq();
                got += 1;
            }
            Err(kecho::RecvError::Lagged(n)) => lagged += n,
            Err(e) => bail!("recv: {e}"),
        }
    }
    gaps += last_k - last;
    eprintln!("delivered {got}, reported missed {lagged}, gaps {gaps}");
    anyhow::ensure!(gaps == lagged, "{gaps} events missing but {lagged} reported missed");
    check_transport(&a, Transport::Quic);
    Ok(())
}

/// A node that shuts down gracefully right after submitting delivers everything first, on both connections (or
/// streams): the main stream ends with a `Wait` for everything sent on the urgent one, and the node's leave waits for
/// the urgent frames before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_delivers_both_streams_over_quic() -> Result<()> {
    for urgent_connection in [true, false] {
        let reg = RegistryClient::in_process_private();
        let (a, b) = priority_pair_with(&reg, urgent_connection).await?;
        let apart = |a: &Node, b: &Node| urgent_path(a, b) == (true, urgent_connection);
        common::a_graceful_shutdown_delivers_both_streams(&a, &b, apart).await?;
    }
    Ok(())
}

/// Batches go over QUIC in compact `EventRun` frames too (docs/PROTOCOL.md, "Event runs"): whole and in order through
/// a small Block sink, in far fewer bytes than an `Event` frame per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_go_over_quic_in_compact_frames() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = node(&reg, Transport::Quic).await?;
    let b = node(&reg, Transport::Quic).await?;
    let ca = a.create_channel("runs").await?;
    let cb = b.open_channel("runs").await?;
    let mut sink = cb.sink(kecho::SinkOptions::new().capacity(64).overflow(kecho::Overflow::Block))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    let n = 3_000u32;
    let batch: Vec<[u8; 4]> = (0..n).map(u32::to_le_bytes).collect();
    let sender = tokio::spawn(async move {
        for part in batch.chunks(700) {
            src.submit_many("e", &kecho::Attrs::new(), part).await?;
        }
        Ok::<_, anyhow::Error>(src)
    });
    let mut evs = Vec::new();
    while evs.len() < n as usize {
        tokio::time::timeout(T, sink.recv_many(&mut evs, 100)).await??;
    }
    let _src = sender.await??;
    for (i, ev) in evs.iter().enumerate() {
        assert_eq!((ev.seq(), &ev.payload()[..]), (i as u64 + 1, &(i as u32).to_le_bytes()[..]));
    }
    check_transport(&a, Transport::Quic);
    // An `Event` frame of type "e" with a 4-byte payload takes 38 bytes; in a run, 8.
    let per_event = ca.stats().bytes_sent as f64 / f64::from(n);
    assert!(per_event < 12.0, "{per_event} bytes per event on the wire");
    Ok(())
}
