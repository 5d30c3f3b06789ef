//! What a misbehaving peer can do to a node: nothing beyond losing its own connection.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use kecho::{Attrs, Identity, Node, RegistryClient, SinkOptions};
use kecho_proto::codec::{decode_frame, CloseCode, Purpose};
use kecho_proto::{Message, NodeId, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// Two nodes with a channel and a flowing event, to show that they are unaffected.
async fn pair() -> Result<(Node, Node, kecho::Source, kecho::Sink)> {
    let reg = RegistryClient::in_process_private();
    // Node a's identity is known, so that the tests can address proofs to it.
    let a = Node::builder().identity(Identity::from_secret(A_SECRET)).registry_client(reg.clone()).start().await?;
    let b = Node::builder().registry_client(reg).start().await?;
    let ca = a.create_channel("robust").await?;
    let cb = b.open_channel("robust").await?;
    let sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    let src = ca.source()?;
    Ok((a, b, src, sink))
}

async fn still_flows(src: &mut kecho::Source, sink: &mut kecho::Sink) -> Result<()> {
    let seq = src.submit("ok", &Attrs::new(), b"still here").await?;
    let ev = timeout(T, sink.recv()).await?.context("recv")?;
    assert_eq!(ev.seq(), seq);
    Ok(())
}

/// Reads until the node closes the connection; returns every message it sent.
async fn read_until_closed(s: &mut TcpStream) -> Result<Vec<Message>> {
    let mut buf = BytesMut::new();
    let mut msgs = Vec::new();
    loop {
        let n = timeout(T, s.read_buf(&mut buf)).await.context("node did not close the connection")?.unwrap_or(0);
        while let Ok(Some(m)) = decode_frame(&mut buf, 1 << 20) {
            msgs.push(m);
        }
        if n == 0 {
            return Ok(msgs);
        }
    }
}

const A_SECRET: [u8; 32] = [0xa; 32];

/// A `Hello` from a made-up node, with its identity proof for node a.
fn hello(version: u16) -> Vec<u8> {
    let me = Identity::from_secret([0x42; 32]);
    let to = Identity::from_secret(A_SECRET).node_id();
    let addr = "127.0.0.1:9";
    let mut b = BytesMut::new();
    Message::Hello { version, node: me.node_id(), addr: addr.into(), purpose: Purpose::Node }.encode(&mut b);
    me.hello_proof(to, addr).encode(&mut b);
    b.to_vec()
}

/// A node that claims another node's id is refused: it cannot prove it. Nor can a proof made for another node or
/// another address be used, and a `Hello` without a proof is refused after the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_claim_another_nodes_id() -> Result<()> {
    let (a, _b, mut src, mut sink) = pair().await?;
    let a_id = Identity::from_secret(A_SECRET).node_id();
    let victim = Identity::from_secret([0x55; 32]);
    let mallory = Identity::from_secret([0x66; 32]);
    let addr = "127.0.0.1:9";
    let as_victim = |proof: Message, addr: &str| {
        let mut b = BytesMut::new();
        Message::Hello { version: PROTOCOL_VERSION, node: victim.node_id(), addr: addr.into(), purpose: Purpose::Node }
            .encode(&mut b);
        proof.encode(&mut b);
        b
    };
    let forged = match mallory.hello_proof(a_id, addr) {
        Message::Proof { sig, .. } => Message::Proof { key: victim.public_key(), sig },
        other => bail!("{other:?}"),
    };
    let cases = [
        ("mallory's own proof", as_victim(mallory.hello_proof(a_id, addr), addr)),
        ("the victim's key with mallory's signature", as_victim(forged, addr)),
        ("a proof made for another node", as_victim(victim.hello_proof(NodeId(1), addr), addr)),
        ("a proof made for another address", as_victim(victim.hello_proof(a_id, "127.0.0.1:8"), addr)),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(a.local_addr()).await?;
        s.write_all(&bytes).await?;
        let msgs = read_until_closed(&mut s).await?;
        match msgs.as_slice() {
            [Message::Close { code: CloseCode::Handshake, reason }] => {
                assert!(reason.contains("proof"), "{what}: {reason}")
            }
            other => bail!("{what}: expected one Close(Handshake), got {other:?}"),
        }
    }
    // The genuine article gets in.
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&as_victim(victim.hello_proof(a_id, addr), addr)).await?;
    let mut buf = BytesMut::new();
    let ack = loop {
        timeout(T, s.read_buf(&mut buf)).await??;
        if let Some(m) = decode_frame(&mut buf, 1 << 20)? {
            break m;
        }
    };
    assert!(matches!(ack, Message::HelloAck { node, .. } if node == a_id), "{ack:?}");
    drop(s);
    still_flows(&mut src, &mut sink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() -> Result<()> {
    let (a, _b, mut src, mut sink) = pair().await?;
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let msgs = read_until_closed(&mut s).await?;
    assert!(msgs.iter().all(|m| matches!(m, Message::Close { .. })), "only a Close may come back: {msgs:?}");
    still_flows(&mut src, &mut sink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_after_handshake_closes_only_that_connection() -> Result<()> {
    let (a, _b, mut src, mut sink) = pair().await?;
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&hello(PROTOCOL_VERSION)).await?;
    // Announce a 1 GiB frame.
    s.write_all(&(1u32 << 30).to_le_bytes()).await?;
    let msgs = read_until_closed(&mut s).await?;
    assert!(matches!(msgs.first(), Some(Message::HelloAck { .. })), "{msgs:?}");
    assert!(
        msgs.iter().any(|m| matches!(m, Message::Close { code: CloseCode::Malformed, .. })),
        "expected a Close(Malformed): {msgs:?}"
    );
    still_flows(&mut src, &mut sink).await
}

/// An `EventRun` frame whose last payload runs past the frame closes that connection with `Close(Malformed)`;
/// nothing else notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_event_run_closes_only_that_connection() -> Result<()> {
    let (a, _b, mut src, mut sink) = pair().await?;
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&hello(PROTOCOL_VERSION)).await?;
    let mut run = BytesMut::new();
    let payloads: [&[u8]; 2] = [b"one", b"two"];
    kecho_proto::codec::encode_event_run(
        &mut run,
        kecho_proto::ChannelId(1),
        kecho_proto::LocalId(1),
        1,
        "t",
        &Attrs::new(),
        payloads.into_iter(),
    );
    // One byte short of the last payload, with a length prefix that says so.
    run.truncate(run.len() - 1);
    let len = (run.len() - 4) as u32;
    run[..4].copy_from_slice(&len.to_le_bytes());
    s.write_all(&run).await?;
    let msgs = read_until_closed(&mut s).await?;
    assert!(matches!(msgs.first(), Some(Message::HelloAck { .. })), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Close { code: CloseCode::Malformed, reason } if reason.contains("60"))),
        "expected a Close(Malformed) naming kind 60: {msgs:?}"
    );
    still_flows(&mut src, &mut sink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_mismatch_is_refused_with_a_reason() -> Result<()> {
    let (a, _b, mut src, mut sink) = pair().await?;
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&hello(PROTOCOL_VERSION + 1)).await?;
    let msgs = read_until_closed(&mut s).await?;
    match msgs.as_slice() {
        [Message::Close { code: CloseCode::VersionMismatch, reason }] => {
            assert!(reason.contains(&format!("version {PROTOCOL_VERSION}")), "{reason}");
            assert!(reason.contains(&format!("version {}", PROTOCOL_VERSION + 1)), "{reason}");
        }
        other => bail!("expected one Close(VersionMismatch), got {other:?}"),
    }
    still_flows(&mut src, &mut sink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_after_the_handshake_timeout() -> Result<()> {
    let (a, _b, mut src, mut sink) = pair().await?;
    let mut s = TcpStream::connect(a.local_addr()).await?;
    let start = tokio::time::Instant::now();
    let msgs = read_until_closed(&mut s).await?;
    assert!(msgs.is_empty(), "{msgs:?}");
    assert!(start.elapsed() >= Duration::from_secs(4), "closed too early: {:?}", start.elapsed());
    still_flows(&mut src, &mut sink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_messages_on_a_node_link_close_it() -> Result<()> {
    let (a, _b, mut src, mut sink) = pair().await?;
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&hello(PROTOCOL_VERSION)).await?;
    s.write_all(&Message::RegList { req: 1 }.to_bytes()).await?;
    let msgs = read_until_closed(&mut s).await?;
    assert!(msgs.iter().any(|m| matches!(m, Message::Close { .. })), "{msgs:?}");
    still_flows(&mut src, &mut sink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_member_is_removed_by_heartbeat_expiry() -> Result<()> {
    use kecho_proto::codec::RegResult;
    use kecho_proto::{LocalId, MemberInfo, NodeSnapshot, Overflow, Role, TypeFilter};
    let reg = RegistryClient::in_process_private();
    let hb = Duration::from_millis(600);
    let a = Node::builder()
        .identity(Identity::from_secret(A_SECRET))
        .registry_client(reg.clone())
        .heartbeat_timeout(hb)
        .start()
        .await?;
    let ch = a.create_channel("hb").await?;
    let entry = match reg.request(Message::RegLookup { req: 0, name: "hb".into() }).await? {
        RegResult::Entry(e) => e,
        other => bail!("lookup: {other:?}"),
    };
    // A hand-made member: handshake, join with one sink, then never say anything again (a frozen process).
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&hello(PROTOCOL_VERSION)).await?;
    let sink = MemberInfo {
        id: LocalId(1),
        role: Role::Sink { types: TypeFilter::All, overflow: Overflow::DropOldest, filter: None },
        attrs: Default::default(),
    };
    let join = Message::JoinRequest {
        channel: entry.channel,
        addr: "127.0.0.1:9".into(),
        snapshot: NodeSnapshot { version: 1, instance: 0, members: vec![sink], token: None },
    };
    s.write_all(&join.to_bytes()).await?;
    ch.wait_for_sinks(1, T).await?;
    let joined = tokio::time::Instant::now();
    while ch.sinks() != 0 {
        assert!(joined.elapsed() < T, "the silent member was never removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = joined.elapsed();
    assert!(took >= hb - Duration::from_millis(50), "removed before the timeout: {took:?}");
    assert!(took < hb * 3, "removed too late: {took:?}");
    Ok(())
}

/// A member that floods the node with snapshots and join requests costs the others nothing: events keep flowing, its
/// snapshots are coalesced (the newest wins, none is lost) and its join requests beyond the budget go unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_floods_are_rate_limited_and_coalesced() -> Result<()> {
    use kecho_proto::codec::RegResult;
    use kecho_proto::{LocalId, MemberInfo, NodeSnapshot, Overflow, Role, TypeFilter};
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().identity(Identity::from_secret(A_SECRET)).registry_client(reg.clone()).start().await?;
    let b = Node::builder().registry_client(reg.clone()).start().await?;
    let ca = a.create_channel("flood").await?;
    let cb = b.open_channel("flood").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    let entry = match reg.request(Message::RegLookup { req: 0, name: "flood".into() }).await? {
        RegResult::Entry(e) => e,
        other => bail!("lookup: {other:?}"),
    };
    let sinks = |n: u32| NodeSnapshot {
        version: 0,
        instance: 0,
        members: (1..=n)
            .map(|i| MemberInfo {
                id: LocalId(i),
                role: Role::Sink { types: TypeFilter::All, overflow: Overflow::DropOldest, filter: None },
                attrs: Default::default(),
            })
            .collect(),
        token: None,
    };
    let me = Identity::from_secret([0x42; 32]);
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&hello(PROTOCOL_VERSION)).await?;
    let join = |snapshot| Message::JoinRequest { channel: entry.channel, addr: "127.0.0.1:9".into(), snapshot };
    let mut first = sinks(1);
    first.version = 1;
    s.write_all(&join(first).to_bytes()).await?;
    ca.wait_for_sinks(2, T).await?;

    // The flood: 20,000 snapshots (1 to 4 sinks, the last with 3) and 3,000 join requests, as fast as TCP takes them.
    const SNAPSHOTS: u64 = 20_000;
    const JOINS: u64 = 3_000;
    let (mut rd, mut wr) = s.into_split();
    let answers = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut accepts = 0u64;
        while let Ok(Ok(n)) = timeout(Duration::from_secs(3), rd.read_buf(&mut buf)).await {
            if n == 0 {
                break;
            }
            while let Ok(Some(m)) = decode_frame(&mut buf, 1 << 24) {
                accepts += u64::from(matches!(m, Message::JoinAccept { .. }));
            }
        }
        accepts
    });
    let started = tokio::time::Instant::now();
    let mut out = BytesMut::new();
    for v in 0..SNAPSHOTS {
        let n = if v == SNAPSHOTS - 1 { 3 } else { (v % 4) as u32 + 1 };
        let mut snap = sinks(n);
        snap.version = v + 2;
        Message::Snapshot {
            channel: entry.channel,
            node: me.node_id(),
            addr: "127.0.0.1:9".into(),
            snapshot: snap,
            left: false,
            reply: false,
        }
        .encode(&mut out);
        if v % 7 == 0 && v / 7 < JOINS {
            let mut again = sinks(1);
            again.version = 1;
            join(again).encode(&mut out);
        }
        if out.len() > 64 * 1024 {
            wr.write_all(&out).await?;
            out.clear();
        }
    }
    wr.write_all(&out).await?;
    let flood_took = started.elapsed();
    // Events flow meanwhile, and the last snapshot wins.
    still_flows(&mut src, &mut sink).await?;
    let deadline = tokio::time::Instant::now() + T;
    while ca.sinks() != 1 + 3 {
        assert!(tokio::time::Instant::now() < deadline, "the newest snapshot was not applied: {} sinks", ca.sinks());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    still_flows(&mut src, &mut sink).await?;
    drop(wr);
    let accepts = timeout(T, answers).await??;
    let allowed = 1.0 + 1000.0 + 500.0 * (started.elapsed().as_secs_f64() + 1.0);
    assert!(
        (accepts as f64) <= allowed && accepts < JOINS,
        "{accepts} join answers to {JOINS} join requests sent in {flood_took:?}: more than the budget ({allowed:.0})"
    );
    Ok(())
}

/// How long this test's runtime's worker threads were busy in all (the nodes of a test run on its runtime).
fn busy() -> Duration {
    let m = tokio::runtime::Handle::current().metrics();
    (0..m.num_workers()).map(|w| m.worker_total_busy_duration(w)).sum()
}

/// A gossip frame switches a channel that is still opening to tree mode (a joiner may hear the overlay before its
/// `JoinAccept`); its liveness check falls due a few seconds later, while the node is no member yet. The check then
/// has nothing to do, and the channel's tree loop must sleep until the next period, not wake again at once: here the
/// channel's contact (a node id in the registry, at an address nothing listens on) never answers, so the node stays
/// a joiner for the whole open timeout, and a hand-made peer sends it a `Probe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_channel_in_tree_mode_does_not_spin() -> Result<()> {
    use kecho_proto::codec::ClaimMode;
    use kecho_proto::gossip::GossipMsg;
    use kecho_proto::{ChannelId, ChannelSecret};
    let reg = RegistryClient::in_process_private();
    let ghost = Identity::from_secret([0x77; 32]);
    let channel = ChannelId(0x5eed);
    let claim = Message::RegClaim {
        req: 0,
        name: "joining".into(),
        channel,
        node: ghost.node_id(),
        addr: "127.0.0.1:9".into(),
        ttl_ms: 120_000,
        mode: ClaimMode::Create,
        sources: 0,
        sinks: 1,
        secret: ChannelSecret(5),
    };
    reg.request(claim).await?;
    let m = kecho::MembershipConfig { open_timeout: Duration::from_secs(40), ..Default::default() };
    let b = Node::builder().registry_client(reg.clone()).membership(m).start().await?;
    let opening = {
        let b = b.clone();
        tokio::spawn(async move { b.open_channel("joining").await.map(|_| ()) })
    };
    // The joiner has looked the channel up (and keeps dialling its contact in vain).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let me = Identity::from_secret([0x42; 32]);
    let addr = "127.0.0.1:9";
    let mut out = BytesMut::new();
    Message::Hello { version: PROTOCOL_VERSION, node: me.node_id(), addr: addr.into(), purpose: Purpose::Node }
        .encode(&mut out);
    me.hello_proof(b.id(), addr).encode(&mut out);
    Message::Gossip { channel, addrs: Vec::new(), body: GossipMsg::Probe { nonce: 1 } }.encode(&mut out);
    let mut s = TcpStream::connect(b.local_addr()).await?;
    s.write_all(&out).await?;
    // The answer shows that the channel took the frame (and switched to tree mode).
    let mut buf = BytesMut::new();
    let answered = timeout(T, async {
        loop {
            while let Some(frame) = kecho_proto::codec::split_frame(&mut buf, 1 << 20)? {
                // (The urgent connection's link-internal frames, kinds 65 to 67, are skipped.)
                if frame.first().is_some_and(|k| (65..=67).contains(k)) {
                    continue;
                }
                let m = kecho_proto::codec::decode_body(frame)?;
                if let Message::Gossip { body: GossipMsg::ProbeAck { nonce: 1 }, .. } = m {
                    return anyhow::Ok(());
                }
            }
            if s.read_buf(&mut buf).await? == 0 {
                bail!("closed");
            }
        }
    })
    .await;
    answered.context("no ProbeAck")??;
    // The first probe falls due 2.5 to 7.5 s after tree mode began; the node stays a joiner until 40 s.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!opening.is_finished(), "the open ended early: {:?}", opening.await);
    let (t0, b0) = (std::time::Instant::now(), busy());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (wall, busy) = (t0.elapsed(), busy() - b0);
    eprintln!("a joining node in tree mode: its runtime's workers busy {busy:?} in {wall:?}");
    // Idle but for its dials to the contact: a few tens of milliseconds. A loop that never sleeps keeps a worker
    // busy the whole time, however little CPU a loaded machine gives it.
    assert!(busy < Duration::from_millis(800), "workers busy {busy:?} in {wall:?}: something spins");
    opening.abort();
    Ok(())
}
