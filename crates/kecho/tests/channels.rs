//! Several nodes in one process, real TCP links on loopback.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{
    Attrs, Event, MembershipConfig, Node, Overflow, RecvError, RegistryClient, SinkOptions, TryRecvError, Value,
};
use tokio::time::timeout;

mod common;
use common::{eventually, recv};

const T: Duration = Duration::from_secs(10);

/// Nodes sharing a private in-process registry, with a short heartbeat so failure tests stay quick.
async fn cluster(n: usize) -> Result<(RegistryClient, Vec<Node>)> {
    let reg = RegistryClient::in_process_private();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(node_on(&reg).await?);
    }
    Ok((reg, nodes))
}

async fn node_on(reg: &RegistryClient) -> Result<Node> {
    let m = MembershipConfig { lease_ttl: Duration::from_millis(1500), ..MembershipConfig::default() };
    Ok(Node::builder()
        .registry_client(reg.clone())
        .heartbeat_timeout(Duration::from_millis(600))
        .membership(m)
        .start()
        .await?)
}

fn attr_i(ev: &Event, k: &str) -> i64 {
    match ev.attrs().get(k) {
        Some(Value::Int(i)) => *i,
        other => panic!("attribute {k}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_attributes_cross_nodes() -> Result<()> {
    let (_reg, nodes) = cluster(3).await?;
    let a = nodes[0].create_channel("c").await?;
    let b = nodes[1].open_channel("c").await?;
    let c = nodes[2].open_channel("c").await?;
    let mut sb = b.sink(SinkOptions::new())?;
    let mut sc = c.sink(SinkOptions::new())?;
    a.wait_for_sinks(2, T).await?;
    let mut src = a.source()?;
    let attrs = Attrs::new()
        .with("i", 7i64)
        .with("f", 0.25)
        .with("b", true)
        .with("s", "zone-a")
        .with("raw", bytes::Bytes::from_static(&[0, 1, 2, 255]));
    let seq = src.submit("hello", &attrs, b"payload").await?;
    assert_eq!(seq, 1);
    for s in [&mut sb, &mut sc] {
        let ev = recv(s).await?;
        assert_eq!(ev.ty(), "hello");
        assert_eq!(ev.seq(), 1);
        assert_eq!(ev.attrs(), &attrs);
        assert_eq!(&ev.payload()[..], b"payload");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_sources_and_sinks() -> Result<()> {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Load {
        host: String,
        cpu: f64,
    }
    let (_reg, nodes) = cluster(2).await?;
    let a = nodes[0].channel("typed").await?;
    let b = nodes[1].channel("typed").await?;
    let mut sink = b.typed_sink::<Load>("load", SinkOptions::new())?;
    a.wait_for_sinks(1, T).await?;
    let mut src = a.typed_source::<Load>("load")?;
    let mut other = a.source()?;
    other.submit("noise", &Attrs::new(), b"x").await?;
    let v = Load { host: "h1".into(), cpu: 0.5 };
    src.submit(&v, &Attrs::new().with("cpu", 0.5)).await?;
    let got = timeout(T, sink.recv()).await??;
    assert_eq!(got.value, v);
    assert_eq!(got.event.ty(), "load");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_are_filtered_at_the_source() -> Result<()> {
    let (_reg, nodes) = cluster(2).await?;
    let a = nodes[0].create_channel("f").await?;
    let b = nodes[1].open_channel("f").await?;
    let mut sink = b.sink(SinkOptions::new().types(["wanted"]))?;
    a.wait_for_sinks(1, T).await?;
    let mut src = a.source()?;
    for i in 0..50i64 {
        src.submit("wanted", &Attrs::new().with("i", i), b"").await?;
        src.submit("unwanted", &Attrs::new().with("i", i), &[0u8; 1000]).await?;
    }
    for i in 0..50 {
        let ev = recv(&mut sink).await?;
        assert_eq!(ev.ty(), "wanted");
        assert_eq!(attr_i(&ev, "i"), i);
    }
    let s = a.stats();
    assert_eq!(s.submitted, 100);
    // Only the wanted half left the source node, and none of the 1000-byte payloads.
    assert_eq!(s.sent, 50);
    assert!(s.bytes_sent < 50 * 200, "bytes sent {}", s.bytes_sent);
    // A last wanted event: events of one source arrive in order, so once it is in, every event submitted before it
    // that was going to arrive has.
    src.submit("wanted", &Attrs::new().with("i", 50i64), b"").await?;
    assert_eq!(attr_i(&recv(&mut sink).await?, "i"), 50);
    assert_eq!(b.stats().received, 51);
    assert!(matches!(sink.try_recv(), Err(TryRecvError::Empty)));
    Ok(())
}

/// A burst large enough to arrive in many reads and batches, to three sinks on one node that want different types:
/// each gets exactly its events, in order, with their attributes (the receiving link delivers the events of one read
/// together, choosing per event which sinks get it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_each_local_sink_by_its_types() -> Result<()> {
    const N: i64 = 20_000;
    let (_reg, nodes) = cluster(2).await?;
    let a = nodes[0].create_channel("burst").await?;
    let b = nodes[1].open_channel("burst").await?;
    let opts = || SinkOptions::new().capacity(N as usize).overflow(kecho::Overflow::Block);
    let mut all = b.sink(opts())?;
    let mut only_a = b.sink(opts().types(["a"]))?;
    let mut only_b = b.sink(opts().types(["b"]))?;
    a.wait_for_sinks(3, T).await?;
    let mut src = a.source()?;
    let ty = |i: i64| ["a", "b", "c"][(i % 3) as usize];
    for i in 0..N {
        let attrs = if i % 5 == 0 { Attrs::new().with("i", i) } else { Attrs::new() };
        src.submit(ty(i), &attrs, &i.to_le_bytes()).await?;
    }
    // Everything is queued at the receiving node before anything is taken: `len` counts it all, and still does once
    // a receive has taken the queue's contents to the receiver's side.
    eventually("all queued", || all.len() == N as usize).await?;
    let first = recv(&mut all).await?;
    assert_eq!(first.seq(), 1);
    assert_eq!(all.len(), N as usize - 1);
    for i in 1..N {
        let ev = recv(&mut all).await?;
        assert_eq!((ev.ty(), ev.seq()), (ty(i), i as u64 + 1));
        assert_eq!(ev.payload()[..], i.to_le_bytes());
        assert_eq!(ev.attrs().get("i").is_some(), i % 5 == 0);
    }
    for (sink, want) in [(&mut only_a, "a"), (&mut only_b, "b")] {
        for i in (0..N).filter(|&i| ty(i) == want) {
            let ev = recv(sink).await?;
            assert_eq!((ev.ty(), ev.seq()), (want, i as u64 + 1));
            assert_eq!(ev.payload()[..], i.to_le_bytes());
            if i % 5 == 0 {
                assert_eq!(attr_i(&ev, "i"), i);
            }
        }
        assert!(matches!(sink.try_recv(), Err(TryRecvError::Empty)));
    }
    assert!(matches!(all.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(b.stats().received, N as u64);
    assert_eq!(b.stats().dropped, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_order_with_many_sources() -> Result<()> {
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
                src.submit("e", &Attrs::new().with("src", i as i64).with("k", k), b"").await?;
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
    Ok(())
}

/// Single events on a quiet link are written by the submitting task itself, bursts go through the link's writer;
/// mixed, and with a `Targets` prefix before most events (a second sink on the node takes only some of them, by its
/// content filter), every event still arrives once and in order.
#[cfg(feature = "cel")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_when_direct_and_queued_writes_mix() -> Result<()> {
    let (_reg, nodes) = cluster(2).await?;
    let ch_b = nodes[1].channel("mix").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(64))?;
    let mut some = ch_b.sink(SinkOptions::new().filter("pick == true").overflow(Overflow::Block).capacity(64))?;
    let ch_a = nodes[0].channel("mix").await?;
    ch_a.wait_for_sinks(2, T).await?;
    let mut src = ch_a.source()?;
    let total = 3000i64;
    let sender = tokio::spawn(async move {
        let mut k = 0;
        while k < total {
            // Bursts of 1 to 64 events, then a pause that leaves the link quiet.
            let burst = (k * 7919 % 64) + 1;
            for _ in 0..burst.min(total - k) {
                k += 1;
                let attrs = Attrs::new().with("k", k).with("pick", k % 7 == 0);
                src.submit("e", &attrs, &[k as u8; 40]).await?;
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        anyhow::Ok(())
    });
    for k in 1..=total {
        let ev = recv(&mut sink).await?;
        assert_eq!(attr_i(&ev, "k"), k, "event out of order or missing");
        assert_eq!(ev.payload()[..], [k as u8; 40]);
        if k % 7 == 0 {
            assert_eq!(attr_i(&recv(&mut some).await?, "k"), k, "the filtered sink got an event out of order");
        }
    }
    sender.await??;
    assert!(some.try_recv().is_err(), "the filtered sink got an event it did not ask for");
    assert_eq!(sink.dropped() + some.dropped(), 0);
    Ok(())
}

/// Two Block sinks on one node, read in lockstep by one task: each event must reach both before a full sink holds
/// back the next one, or the reader waits on one sink for an event stuck behind the other (the events of one read
/// from the link were once offered sink by sink, so a full first sink withheld the second sink's share).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_block_sink_does_not_withhold_events_from_another() -> Result<()> {
    let (_reg, nodes) = cluster(2).await?;
    let ch_b = nodes[1].channel("lockstep").await?;
    let mut first = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(2))?;
    let mut second = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(2))?;
    let ch_a = nodes[0].channel("lockstep").await?;
    ch_a.wait_for_sinks(2, T).await?;
    let mut src = ch_a.source()?;
    let total = 3000u64;
    let sender = tokio::spawn(async move {
        for _ in 0..total {
            src.submit("e", &Attrs::new(), &[1u8; 16]).await?;
        }
        anyhow::Ok(())
    });
    for k in 1..=total {
        assert_eq!(recv(&mut first).await.with_context(|| format!("first sink, event {k}"))?.seq(), k);
        assert_eq!(recv(&mut second).await.with_context(|| format!("second sink, event {k}"))?.seq(), k);
    }
    timeout(T, sender).await???;
    assert_eq!(first.dropped() + second.dropped(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave_while_events_flow() -> Result<()> {
    let (_reg, nodes) = cluster(3).await?;
    let a = nodes[0].create_channel("flow").await?;
    let mut src = a.source()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let producer = tokio::spawn(async move {
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            n = src.submit("tick", &Attrs::new(), b"").await?;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        anyhow::Ok(n)
    });
    // A sink joins mid-stream: it sees a gap-free run of sequence numbers from the point it joined.
    let b = nodes[1].open_channel("flow").await?;
    let mut sb = b.sink(SinkOptions::new())?;
    let first = recv(&mut sb).await?.seq();
    for k in 1..200 {
        assert_eq!(recv(&mut sb).await?.seq(), first + k);
    }
    // Another node joins, then the first sink leaves; the source keeps going.
    let c = nodes[2].open_channel("flow").await?;
    let mut sc = c.sink(SinkOptions::new())?;
    let first_c = recv(&mut sc).await?.seq();
    drop(sb);
    eventually("one sink left", || a.sinks() == 1).await?;
    for k in 1..200 {
        assert_eq!(recv(&mut sc).await?.seq(), first_c + k);
    }
    b.close().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = producer.await??;
    assert!(sent > 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_drop_policies_count_what_was_missed() -> Result<()> {
    for overflow in [Overflow::DropOldest, Overflow::DropNewest] {
        let (_reg, nodes) = cluster(3).await?;
        let a = nodes[0].create_channel("slow").await?;
        let b = nodes[1].open_channel("slow").await?;
        let c = nodes[2].open_channel("slow").await?;
        let mut slow = b.sink(SinkOptions::new().capacity(10).overflow(overflow))?;
        let mut fast = c.sink(SinkOptions::new().capacity(10_000))?;
        a.wait_for_sinks(2, T).await?;
        let mut src = a.source()?;
        for _ in 0..1000 {
            src.submit("e", &Attrs::new(), b"").await?;
        }
        // The fast sink gets everything although the slow one never reads.
        for k in 1..=1000 {
            assert_eq!(recv(&mut fast).await?.seq(), k);
        }
        // Every event has reached the slow sink: with DropOldest each one entered the queue (pushing an older one
        // out), with DropNewest each one either entered or was refused.
        eventually("slow sink saw everything", || match overflow {
            Overflow::DropOldest => slow.received() >= 1000,
            _ => slow.received() + slow.dropped() >= 1000,
        })
        .await?;
        let mut got = Vec::new();
        let mut lagged = 0;
        loop {
            match slow.try_recv() {
                Ok(e) => got.push(e.seq()),
                Err(TryRecvError::Lagged(n)) => lagged += n,
                Err(TryRecvError::Empty) => break,
                Err(e) => bail!("{e}"),
            }
        }
        assert_eq!(got.len(), 10);
        assert_eq!(lagged, 990, "{overflow:?}");
        let expect: Vec<u64> = match overflow {
            Overflow::DropOldest => (991..=1000).collect(),
            _ => (1..=10).collect(),
        };
        assert_eq!(got, expect, "{overflow:?}");
        assert_eq!(b.stats().dropped, 990);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_slows_the_source_and_loses_nothing() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a_node = Node::builder().registry_client(reg.clone()).link_queue_bytes(4096).start().await?;
    let b_node = node_on(&reg).await?;
    let a = a_node.create_channel("block").await?;
    let b = b_node.open_channel("block").await?;
    let mut sink = b.sink(SinkOptions::new().capacity(4).overflow(Overflow::Block))?;
    a.wait_for_sinks(1, T).await?;
    let mut src = a.source()?;
    // 32 MiB: more than the sink, the link queue and both sockets' kernel buffers can hold.
    let n = 8000u64;
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            src.submit("e", &Attrs::new(), &[7u8; 4096]).await?;
        }
        anyhow::Ok(src)
    });
    // The sink fills up and its node's reader for the link waits for room.
    eventually("the Block sink full", || sink.len() == 4).await?;
    // Held up longer than the receiving node's heartbeat timeout (600 ms): a reader held up by a Block sink must not
    // be mistaken for a dead peer. This wait is the point of the check, so it is a time, not a condition.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b_node.links(), 1, "the link survived the reader's wait");
    assert!(!producer.is_finished(), "a Block sink must hold the source back");
    for k in 1..=n {
        // On failure, say where and what the links went through (a reconnect or a heartbeat timeout explains a loss).
        let links = || {
            let s = |n: &Node| n.link_stats().iter().map(|l| (l.connects, l.heartbeat_timeouts)).collect::<Vec<_>>();
            format!(
                "event {k}; (connects, heartbeat timeouts) source side {:?}, sink side {:?}",
                s(&a_node),
                s(&b_node)
            )
        };
        assert_eq!(recv(&mut sink).await.with_context(links)?.seq(), k);
    }
    let mut src = timeout(T, producer).await???;
    assert_eq!(sink.dropped(), 0);
    // try_submit never waits: with the sink full it refuses.
    for _ in 0..20_000 {
        if let Err(e) = src.try_submit("e", &Attrs::new(), &[0u8; 4096]) {
            assert!(matches!(e, kecho::Error::WouldBlock), "{e}");
            return Ok(());
        }
    }
    bail!("try_submit never reported a full Block sink");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_receive_style_wakes_on_arrival() -> Result<()> {
    let (_reg, nodes) = cluster(2).await?;
    let a = nodes[0].create_channel("styles").await?;
    let b = nodes[1].open_channel("styles").await?;
    let mut blocking = b.sink(SinkOptions::new().types(["x"]))?;
    let stream_sink = b.sink(SinkOptions::new().types(["x"]))?;
    let handler_sink = b.sink(SinkOptions::new().types(["x"]))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _h = handler_sink.on_event(move |r| {
        let _ = tx.send(r.map(|e| e.seq()));
    });
    a.wait_for_sinks(3, T).await?;
    let mut src = a.source()?;
    let t = std::thread::spawn(move || blocking.recv_blocking(Some(T)).map(|e| e.seq()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    src.submit("x", &Attrs::new(), b"1").await?;
    assert_eq!(t.join().expect("thread").expect("blocking recv"), 1);
    use futures_util::StreamExt;
    let mut stream = Box::pin(stream_sink.into_stream());
    assert_eq!(timeout(T, stream.next()).await?.expect("stream item").expect("event").seq(), 1);
    assert_eq!(timeout(T, rx.recv()).await?.expect("handler"), Ok(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_member_is_removed_within_the_heartbeat_timeout() -> Result<()> {
    let (_reg, nodes) = cluster(3).await?;
    common::a_crashed_member_is_removed_and_the_others_carry_on(&nodes, || {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_survives_its_creator() -> Result<()> {
    for crash in [false, true] {
        let (reg, nodes) = cluster(3).await?;
        let a = nodes[0].create_channel("survive").await?;
        let b = nodes[1].open_channel("survive").await?;
        let _sa = a.sink(SinkOptions::new())?;
        let mut src = b.source()?;
        b.wait_for_sinks(1, T).await?;
        if crash {
            nodes[0].kill();
        } else {
            nodes[0].shutdown().await;
        }
        eventually("creator gone", || b.sinks() == 0).await?;
        // A newcomer still joins (through the member that took over) and gets events from the remaining source.
        let newcomer = node_on(&reg).await?;
        let c = timeout(T, newcomer.open_channel("survive")).await??;
        let mut sc = c.sink(SinkOptions::new())?;
        b.wait_for_sinks(1, T).await?;
        src.submit("after", &Attrs::new(), b"").await?;
        assert_eq!(recv(&mut sc).await?.ty(), "after");
        drop(nodes);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_tells_the_others() -> Result<()> {
    let (_reg, nodes) = cluster(2).await?;
    let a = nodes[0].create_channel("bye").await?;
    let b = nodes[1].open_channel("bye").await?;
    let _s = b.sink(SinkOptions::new())?;
    a.wait_for_sinks(1, T).await?;
    b.close().await;
    // Much faster than the heartbeat timeout: the leave message says so.
    let took = eventually("sink gone", || a.sinks() == 0).await?;
    assert!(took < Duration::from_millis(500), "took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_errors_are_typed() -> Result<()> {
    let (_reg, nodes) = cluster(1).await?;
    match nodes[0].open_channel("nope").await {
        Err(kecho::Error::UnknownChannel(n)) => assert_eq!(n, "nope"),
        other => bail!("expected UnknownChannel, got {other:?}"),
    }
    nodes[0].create_channel("dup").await?;
    match nodes[0].create_channel("dup").await {
        Err(kecho::Error::ChannelExists(_)) => {}
        other => bail!("expected ChannelExists, got {other:?}"),
    }
    let unreachable = Node::builder().registry("127.0.0.1:1".parse()?).start().await?;
    match timeout(T, unreachable.channel("x")).await? {
        Err(e) => assert!(e.to_string().contains("unreachable"), "{e}"),
        Ok(_) => bail!("opened a channel without a registry"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sink_reports_closed() -> Result<()> {
    let (_reg, nodes) = cluster(1).await?;
    let a = nodes[0].channel("closing").await?;
    let mut s = a.sink(SinkOptions::new())?;
    a.close().await;
    assert_eq!(timeout(T, s.recv()).await?.unwrap_err(), RecvError::Closed);
    assert!(a.source().is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_link_per_pair_of_nodes_carries_every_channel() -> Result<()> {
    let (_reg, nodes) = cluster(4).await?;
    // Every node opens every channel at the same time, so pairs of nodes dial each other concurrently.
    let mut sinks = Vec::new();
    let mut chans = Vec::new();
    for c in 0..5 {
        let name = format!("mux{c}");
        let opened = futures_util::future::join_all(nodes.iter().map(|n| n.channel(&name))).await;
        for ch in opened {
            let ch = ch?;
            sinks.push(ch.sink(SinkOptions::new())?);
            chans.push(ch);
        }
    }
    for (i, ch) in chans.iter().enumerate() {
        if let Err(e) = ch.wait_for_sinks(4, T).await {
            // Say who sees whom and what the links went through: a member that never learns of another is a
            // membership defect, and a link replaced while frames were in flight is the suspect.
            let views: Vec<_> = chans
                .iter()
                .map(|c| c.sink_attrs().iter().map(|(n, _)| n.to_string()[..6].to_owned()).collect::<Vec<_>>())
                .collect();
            let links: Vec<_> = nodes
                .iter()
                .map(|n| {
                    let stats = n.link_stats();
                    let l = stats.iter().map(|l| (l.node.to_string()[..6].to_owned(), l.up, l.connects));
                    (n.id().to_string()[..6].to_owned(), l.collect::<Vec<_>>())
                })
                .collect();
            bail!("channel handle {i}: {e}\nsinks seen per handle: {views:?}\nlinks (node, up, connects): {links:?}");
        }
    }
    let mut sources = Vec::new();
    for ch in &chans {
        sources.push(ch.source()?);
    }
    for s in sources.iter_mut() {
        s.submit("e", &Attrs::new(), b"").await?;
    }
    // Each sink gets one event from each of the 4 sources of its channel.
    for s in sinks.iter_mut() {
        for _ in 0..4 {
            recv(s).await?;
        }
    }
    for n in &nodes {
        assert_eq!(n.links(), 3, "one link to each other node");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dropped_at_a_full_link_are_reported_to_the_sink() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a_node = Node::builder().registry_client(reg.clone()).link_queue_bytes(64 * 1024).start().await?;
    let b_node = node_on(&reg).await?;
    common::events_dropped_at_a_full_link_are_reported(&a_node, &b_node, || {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_stops_the_node() -> Result<()> {
    let (_reg, nodes) = cluster(2).await?;
    let a = nodes[0].create_channel("dropped").await?;
    {
        let b = nodes[1].open_channel("dropped").await?;
        let mut sink = b.sink(SinkOptions::new())?;
        a.wait_for_sinks(1, T).await?;
        // The channel and the sink keep the node alive after its own handle is gone: it still receives, and the
        // others still count its sink.
        let mut nodes = nodes;
        drop(nodes.pop());
        a.source()?.submit("e", &Attrs::new(), b"alive").await?;
        assert_eq!(recv(&mut sink).await?.payload().as_ref(), b"alive");
        assert_eq!(a.sinks(), 1, "still alive while a channel handle exists");
    }
    // Now nothing refers to node 1: it stops, its links close and the others drop its members.
    eventually("the dropped node's sink removed", || a.sinks() == 0).await?;
    Ok(())
}
