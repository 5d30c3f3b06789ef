//! Tree mode's liveness check (docs/SCALE.md, "Guarantees in tree mode") against a hand-made member whose every move
//! the test chooses: what the probing node does when probes cross or a probe's link is lost.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use kecho::{Attrs, Identity, Node, RegistryClient};
use kecho_proto::codec::{decode_body, split_frame, Purpose, RegResult};
use kecho_proto::gossip::GossipMsg;
use kecho_proto::{LocalId, MemberInfo, Message, NodeSnapshot, Overflow, Role, TypeFilter, PROTOCOL_VERSION};
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

/// A node probes a member (this test's hand-made one) and, before answering, the member probes the node: the probes
/// cross. The connection then ends before the member answered. The node's probe is still unanswered, so it must be
/// sent once more on a new link (as for any probe whose link is lost: the far side may have closed a link it took for
/// unneeded), not given up because answering the member's probe overwrote the node's own record of its probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_crossed_by_one_of_the_probed_node_is_sent_again_when_its_link_is_lost() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).heartbeat_timeout(Duration::from_secs(30)).start().await?;
    let ca = a.create_channel("crossed").await?;
    let entry = match reg.request(Message::RegLookup { req: 0, name: "crossed".into() }).await? {
        RegResult::Entry(e) => e,
        other => bail!("lookup: {other:?}"),
    };
    let channel = entry.channel;
    // The member: a listener at its address (for the node's dials), and a connection of its own to the node.
    let me = Identity::from_secret([0x31; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let sink = MemberInfo {
        id: LocalId(1),
        role: Role::Sink { types: TypeFilter::All, overflow: Overflow::DropOldest, filter: None },
        attrs: Attrs::new(),
    };
    let mut out = BytesMut::new();
    Message::Hello { version: PROTOCOL_VERSION, node: me.node_id(), addr: addr.clone(), purpose: Purpose::Node }
        .encode(&mut out);
    me.hello_proof(a.id(), &addr).encode(&mut out);
    let snapshot = NodeSnapshot { version: 1, members: vec![sink], token: None };
    Message::JoinRequest { channel, addr: addr.clone(), snapshot }.encode(&mut out);
    let mut s = TcpStream::connect(a.local_addr()).await?;
    s.write_all(&out).await?;
    ca.wait_for_sinks(1, T).await?;
    // Tree mode, with the member no overlay neighbour of the node (a `Disconnect` is one of the overlay's link
    // messages: the node does not join the overlay through its sender), so that the node probes it. Sent every half
    // second, it also keeps the link in use until the probe (the first is due 2.5 to 7.5 s after tree mode began).
    let disconnect = Message::Gossip { channel, addrs: Vec::new(), body: GossipMsg::Disconnect }.to_bytes();
    let mut buf = BytesMut::new();
    let start = tokio::time::Instant::now();
    let probe = loop {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("no probe in 20 s");
        }
        s.write_all(&disconnect).await?;
        if let Some(Message::Gossip { body: GossipMsg::Probe { nonce }, .. }) =
            next_msg(&mut s, &mut buf, Duration::from_millis(500)).await?
        {
            break nonce;
        }
    };
    assert!(ca.tree_stats().on, "tree mode");
    // The member probes the node before answering, and sees the node's answer.
    let crossing = probe.wrapping_add(1);
    s.write_all(&Message::Gossip { channel, addrs: Vec::new(), body: GossipMsg::Probe { nonce: crossing } }.to_bytes())
        .await?;
    loop {
        match next_msg(&mut s, &mut buf, T).await?.context("no answer to the member's probe")? {
            Message::Gossip { body: GossipMsg::ProbeAck { nonce }, .. } if nonce == crossing => break,
            _ => {}
        }
    }
    // Dials that came before do not count.
    while let Ok(Ok(_)) = timeout(Duration::ZERO, listener.accept()).await {}
    // The link ends with the node's probe unanswered: the node dials the member again and sends the same probe.
    drop(s);
    let (mut again, _) = timeout(T, listener.accept()).await.context("the node did not dial the member again")??;
    let mut buf = BytesMut::new();
    match next_msg(&mut again, &mut buf, T).await? {
        Some(Message::Hello { node, .. }) => assert_eq!(node, a.id(), "the node's dial"),
        other => bail!("expected the node's Hello, got {other:?}"),
    }
    // The acceptor's answer: `HelloAck`, its proof, and an `UrgentToken` frame without a token (kind 65).
    let mut answer = Message::HelloAck { version: PROTOCOL_VERSION, node: me.node_id() }.to_bytes().to_vec();
    answer.extend_from_slice(&me.ack_proof(a.id()).to_bytes());
    answer.extend_from_slice(&[1, 0, 0, 0, 65]);
    again.write_all(&answer).await?;
    let start = tokio::time::Instant::now();
    loop {
        match next_msg(&mut again, &mut buf, T).await?.context("nothing from the node on its new link")? {
            Message::Gossip { body: GossipMsg::Probe { nonce }, .. } => {
                assert_eq!(nonce, probe, "the unanswered probe sent again (not a later one)");
                break;
            }
            _ if start.elapsed() > T => bail!("no probe on the new link"),
            _ => {}
        }
    }
    Ok(())
}
