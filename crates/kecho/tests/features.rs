//! A node built without an optional part refuses what needs it, with a reason naming the feature, rather than
//! failing later or panicking: content filters without `cel`, sandboxed filters without `wasm` (asked for locally or
//! sent by a peer), QUIC links without `quic`. With every feature on (the default) this file has nothing to check.
#![cfg(any(not(feature = "cel"), not(feature = "wasm"), not(feature = "quic")))]

use std::time::Duration;

use anyhow::Result;
#[cfg(not(feature = "wasm"))]
use kecho::FilterKind;
use kecho::{Error, Node, RegistryClient, SinkOptions};

const T: Duration = Duration::from_secs(10);

async fn node() -> Result<Node> {
    Ok(Node::builder().registry_client(RegistryClient::in_process_private()).start().await?)
}

#[cfg(not(feature = "quic"))]
#[tokio::test]
async fn quic_without_the_quic_feature_is_refused_with_the_reason() -> Result<()> {
    for t in [kecho::Transport::Quic, kecho::Transport::Both] {
        let started = Node::builder().registry_client(RegistryClient::in_process_private()).transport(t).start().await;
        match started {
            Err(Error::Invalid(why)) => assert!(why.contains("quic feature"), "{why}"),
            other => panic!("expected a refusal naming the feature, got {other:?}"),
        }
    }
    Ok(())
}

#[cfg(not(feature = "cel"))]
#[tokio::test]
async fn a_content_filter_without_cel_is_refused_with_the_reason() -> Result<()> {
    let n = node().await?;
    let ch = n.create_channel("plain").await?;
    match ch.sink(SinkOptions::new().filter("cpu > 0.8")) {
        Err(Error::Filter(e)) => assert!(e.to_string().contains("`cel` feature"), "{e}"),
        other => panic!("expected a filter error, got {other:?}"),
    }
    // Sinks without a content filter work as ever.
    let mut sink = ch.sink(SinkOptions::new())?;
    ch.source()?.submit("t", &kecho::Attrs::new(), b"x").await?;
    assert_eq!(tokio::time::timeout(T, sink.recv()).await??.payload().as_ref(), b"x");
    Ok(())
}

#[cfg(not(feature = "wasm"))]
#[tokio::test]
async fn installing_a_sandboxed_filter_without_wasm_is_refused_with_the_reason() -> Result<()> {
    let n = node().await?;
    let ch = n.create_channel("plain").await?;
    match ch.install_filter(FilterKind::In, b"(module)", T).await {
        Err(Error::Wasm(e)) => {
            assert_eq!(e, kecho::wasm::WasmError::Unsupported);
            assert!(e.to_string().contains("`wasm` feature"), "{e}");
        }
        other => panic!("expected a module error, got {other:?}"),
    }
    Ok(())
}

/// A peer (a hand-made member of an open channel) sends a filter to install: the node answers with the refusal.
#[cfg(not(feature = "wasm"))]
#[tokio::test]
async fn a_sandboxed_filter_from_a_peer_without_wasm_is_refused_with_the_reason() -> Result<()> {
    use anyhow::{bail, Context};
    use bytes::{Bytes, BytesMut};
    use kecho::Identity;
    use kecho_proto::codec::{decode_body, split_frame, Purpose, RegResult};
    use kecho_proto::{Message, NodeSnapshot, PROTOCOL_VERSION};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).start().await?;
    let ca = a.create_channel("open").await?;
    ca.set_remote_filters(true);
    let entry = match reg.request(Message::RegLookup { req: 0, name: "open".into() }).await? {
        RegResult::Entry(e) => e,
        other => bail!("lookup: {other:?}"),
    };
    let peer = Identity::from_secret([0x42; 32]);
    let mut s = tokio::net::TcpStream::connect(a.local_addr()).await?;
    let addr = "127.0.0.1:9";
    let mut out = BytesMut::new();
    Message::Hello { version: PROTOCOL_VERSION, node: peer.node_id(), addr: addr.into(), purpose: Purpose::Node }
        .encode(&mut out);
    // The node's id is needed for the proof; it is the one the registry names as the contact.
    peer.hello_proof(entry.contact, addr).encode(&mut out);
    let snapshot = NodeSnapshot { version: 1, instance: 0, members: vec![], token: None };
    Message::JoinRequest { channel: entry.channel, addr: addr.into(), snapshot }.encode(&mut out);
    let module = Bytes::from_static(b"(module)");
    Message::InstallFilter { channel: entry.channel, req: 7, kind: FilterKind::In, module }.encode(&mut out);
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let (ok, message) = loop {
        if let Some(frame) = split_frame(&mut buf, 1 << 24)? {
            // The urgent TCP connection's frames (kinds 65-67), which this peer, never opening one, ignores.
            if frame.first().is_some_and(|k| (65..=67).contains(k)) {
                continue;
            }
            if let Message::FilterStatus { req: 7, ok, message, .. } = decode_body(frame)? {
                break (ok, message);
            }
            continue;
        }
        let n = tokio::time::timeout(T, s.read_buf(&mut buf)).await.context("no answer")??;
        if n == 0 {
            bail!("connection closed");
        }
    };
    assert!(!ok && message.contains("`wasm` feature"), "{message}");
    Ok(())
}
