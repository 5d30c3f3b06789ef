//! Tree mode's liveness check (docs/SCALE.md, "Guarantees in tree mode") against a hand-made member or prober whose
//! every move the test chooses: a probe needs no link (a `ProbeHello` on a connection of its own, answered before any
//! handshake with a signature over the probe), proves the probed node's identity and membership, and does not wait on
//! a link that stalls.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use kecho::{Attrs, Channel, Identity, Node, RegistryClient};
use kecho_proto::codec::{decode_body, split_frame, Purpose, RegResult};
use kecho_proto::gossip::GossipMsg;
use kecho_proto::handshake::check_probe_answer;
use kecho_proto::{
    ChannelId, LocalId, MemberInfo, Message, NodeId, NodeSnapshot, Overflow, Role, TypeFilter, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// The next message from `s` (skipping the urgent connection's link-internal frames, kinds 65 to 67), or `None` if
/// none came within `wait`.
async fn next_msg(s: &mut TcpStream, buf: &mut BytesMut, wait: Duration) -> Result<Option<Message>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        while let Some(frame) = split_frame(buf, 1 << 24)? {
            if frame.first().is_some_and(|k| (65..=67).contains(k)) {
                continue;
            }
            return Ok(Some(decode_body(frame)?));
        }
        match tokio::time::timeout_at(deadline, s.read_buf(buf)).await {
            Err(_) => return Ok(None),
            Ok(n) => {
                if n? == 0 {
                    bail!("the node closed the connection");
                }
            }
        }
    }
}

/// A node in tree mode that probes every 200 ms, with a channel `name`, and a hand-made member of it: a listener at
/// the member's address (for the node's connections; the member advertises `advertise` instead if given), and the
/// member's own link to the node, on which it joined.
/// The member sends the node a `Disconnect` (an overlay link message: the node does not take its sender as a
/// neighbour) so that the channel is in tree mode and the member is probed; the caller sends it again to keep the
/// link in use.
struct Setup {
    node: Node,
    ch: Channel,
    channel: ChannelId,
    me: Identity,
    listener: TcpListener,
    link: TcpStream,
    disconnect: bytes::Bytes,
}

async fn setup(name: &str, advertise: Option<String>) -> Result<Setup> {
    let reg = RegistryClient::in_process_private();
    let node = Node::builder()
        .registry_client(reg.clone())
        .heartbeat_timeout(Duration::from_secs(30))
        .tree_probe_every(Duration::from_millis(200))
        .start()
        .await?;
    let ch = node.create_channel(name).await?;
    let channel = match reg.request(Message::RegLookup { req: 0, name: name.into() }).await? {
        RegResult::Entry(e) => e.channel,
        other => bail!("lookup: {other:?}"),
    };
    let me = Identity::from_secret([0x31; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = advertise.unwrap_or(listener.local_addr()?.to_string());
    let sink = MemberInfo {
        id: LocalId(1),
        role: Role::Sink { types: TypeFilter::All, overflow: Overflow::DropOldest, filter: None },
        attrs: Attrs::new(),
    };
    let mut out = BytesMut::new();
    Message::Hello { version: PROTOCOL_VERSION, node: me.node_id(), addr: addr.clone(), purpose: Purpose::Node }
        .encode(&mut out);
    me.hello_proof(node.id(), &addr).encode(&mut out);
    let snapshot = NodeSnapshot { version: 1, instance: 0, members: vec![sink], token: None };
    Message::JoinRequest { channel, addr: addr.clone(), snapshot }.encode(&mut out);
    let disconnect = Message::Gossip { channel, addrs: Vec::new(), body: GossipMsg::Disconnect }.to_bytes();
    out.extend_from_slice(&disconnect);
    let mut link = TcpStream::connect(node.local_addr()).await?;
    link.write_all(&out).await?;
    ch.wait_for_sinks(1, T).await?;
    Ok(Setup { node, ch, channel, me, listener, link, disconnect })
}

/// The next probe on a connection the node opened to the member's listener: its nonce and the connection. Fails on
/// anything else (a `Hello`: the node dialled a link to probe). Meanwhile the member keeps sending `Disconnect` on
/// its link (every 100 ms: the overlay would otherwise take it as a neighbour, which is not probed).
async fn next_probe(s: &mut Setup, prober: NodeId) -> Result<(u64, TcpStream)> {
    let start = tokio::time::Instant::now();
    let mut c = loop {
        if start.elapsed() > T {
            bail!("no probe connection in {T:?}");
        }
        s.link.write_all(&s.disconnect).await?;
        if let Ok(accepted) = timeout(Duration::from_millis(100), s.listener.accept()).await {
            break accepted?.0;
        }
    };
    let mut buf = BytesMut::new();
    match next_msg(&mut c, &mut buf, T).await? {
        Some(Message::ProbeHello { version, from, to, channel, nonce }) => {
            assert_eq!((version, from, to, channel), (PROTOCOL_VERSION, prober, s.me.node_id(), s.channel));
            Ok((nonce, c))
        }
        other => bail!("expected a ProbeHello, got {other:?}"),
    }
}

/// A live member whose link to the prober stalls (the member reads nothing from it: a reader held up by a slow sink,
/// a full queue) is not suspected: the probes come on connections of their own, not on that link, and are answered
/// at once, with no link dialled for them. Before, a probe went on the link that was up and waited there unanswered
/// until the member was suspected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_member_whose_link_stalls_is_not_suspected() -> Result<()> {
    let mut s = setup("stalled", None).await?;
    let prober = s.node.id();
    let start = tokio::time::Instant::now();
    let mut answered = 0;
    // Answering every probe for 4 s: more than a probe's timeout (2 s) after the first.
    while answered < 5 || start.elapsed() < Duration::from_secs(4) {
        if start.elapsed() > T {
            bail!("{answered} probes in {T:?}");
        }
        // The link stays up and in use (`next_probe`), but nothing is ever read from it.
        let (nonce, mut c) =
            next_probe(&mut s, prober).await.with_context(|| format!("after {answered}: {:?}", s.ch.tree_stats()))?;
        c.write_all(&s.me.probe_proof(prober, s.channel, nonce).to_bytes()).await?;
        answered += 1;
    }
    let t = s.ch.tree_stats();
    assert!(t.on, "tree mode");
    assert_eq!(t.suspicions, 0, "a live member suspected: {:?}", t.suspicion_causes);
    assert!(s.ch.member_nodes().contains(&s.me.node_id()), "the member is in the view");
    Ok(())
}

/// A probe answered by another key than the member's (something else at the member's address) fails as no proof
/// of identity, and the member is suspected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_signed_by_another_identity_fails_the_probe() -> Result<()> {
    let mut s = setup("impostor", None).await?;
    let prober = s.node.id();
    let (nonce, mut c) = next_probe(&mut s, prober).await?;
    let impostor = Identity::from_secret([0x32; 32]);
    c.write_all(&impostor.probe_proof(prober, s.channel, nonce).to_bytes()).await?;
    let start = tokio::time::Instant::now();
    loop {
        let t = s.ch.tree_stats();
        if t.suspicion_causes.identity == 1 && t.suspicions == 1 {
            break;
        }
        if start.elapsed() > T {
            bail!("a wrong identity did not fail the probe: {t:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The member's address is now another node's (a process restarted there with a new identity: a real node, in no
/// channel): the probes of the member fail, counted as refused (the node at the address is another one, and says
/// so without a signature), with no link brought up at that node; once the member's own link is gone too, the
/// suspicion is not refuted and the member is taken out of the view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_at_its_address_with_another_identity_fails_the_probe() -> Result<()> {
    let restarted = Node::builder().registry_client(RegistryClient::in_process_private()).start().await?;
    let s = setup("restarted", Some(restarted.local_addr().to_string())).await?;
    let Setup { ch, me, mut link, disconnect, .. } = s;
    assert_ne!(restarted.id(), me.node_id());
    link.write_all(&disconnect).await?;
    let start = tokio::time::Instant::now();
    while ch.tree_stats().suspicion_causes.refused == 0 {
        if start.elapsed() > T {
            bail!("the probe did not fail: {:?}", ch.tree_stats());
        }
        link.write_all(&disconnect).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(restarted.link_stats().len(), 0, "a probe brought a link up at the node at the address");
    drop(link);
    let start = tokio::time::Instant::now();
    while ch.member_nodes().contains(&me.node_id()) {
        if start.elapsed() > T {
            bail!("the member stayed in the view: {:?}", ch.tree_stats());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A hand-made prober against a real node: a `ProbeHello` is answered before any handshake with the node's signature
/// over the probe while the node is a member of the channel, with no link (no peer) at the node; refused when it
/// names another node or a channel the node is not in, and once the node's channel is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_is_answered_without_a_link_only_by_a_member_of_the_channel() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let node = Node::builder().registry_client(reg.clone()).start().await?;
    let ch = node.create_channel("probed").await?;
    let channel = match reg.request(Message::RegLookup { req: 0, name: "probed".into() }).await? {
        RegResult::Entry(e) => e.channel,
        other => bail!("lookup: {other:?}"),
    };
    let prober = Identity::from_secret([0x33; 32]).node_id();
    let ask = |to: NodeId, channel: ChannelId, nonce: u64| {
        let at = node.local_addr();
        async move {
            let mut c = TcpStream::connect(at).await?;
            let hello = Message::ProbeHello { version: PROTOCOL_VERSION, from: prober, to, channel, nonce };
            c.write_all(&hello.to_bytes()).await?;
            let mut buf = BytesMut::new();
            next_msg(&mut c, &mut buf, T).await?.context("no answer to the probe")
        }
    };
    let answer = ask(node.id(), channel, 41).await?;
    check_probe_answer(&answer, node.id(), prober, channel, 41).context("the member's answer")?;
    assert!(check_probe_answer(&answer, node.id(), prober, channel, 42).is_err(), "good for its nonce only");
    assert_eq!(node.link_stats().len(), 0, "the probe made a link");
    let refused = |m: &Message| matches!(m, Message::Close { .. });
    let other = ask(NodeId(node.id().0 ^ 1), channel, 43).await?;
    assert!(refused(&other), "a probe of another node: {other:?}");
    let unknown = ask(node.id(), ChannelId(channel.0 ^ 1), 44).await?;
    assert!(refused(&unknown), "a probe about another channel: {unknown:?}");
    ch.close().await;
    let gone = ask(node.id(), channel, 45).await?;
    assert!(refused(&gone), "a probe about a channel that is gone: {gone:?}");
    Ok(())
}
