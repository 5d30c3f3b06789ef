//! TCP links with an urgent connection (docs/PROTOCOL.md, "Priorities and deadlines"): the urgent lanes pass a
//! stalled bulk connection, a source mixing priorities keeps its order across the two connections, a graceful
//! shutdown delivers both, and a connection that claims a link it does not own is refused.

use std::time::Duration;

use anyhow::{bail, Result};
use bytes::BytesMut;
use kecho::{Attrs, Event, Node, Overflow, RegistryClient, SinkOptions, Transport, Value};
use kecho_proto::codec::{self, CloseCode};
use kecho_proto::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(dead_code)]
mod common;
use common::recv;

const T: Duration = Duration::from_secs(10);

/// Two TCP nodes with a large outbox, so that a bulk backlog waits there and in the sockets rather than being
/// refused.
async fn pair(reg: &RegistryClient) -> Result<(Node, Node)> {
    let start = || Node::builder().registry_client(reg.clone()).link_queue_bytes(64 << 20).start();
    Ok((start().await?, start().await?))
}

fn attr_i(ev: &Event, k: &str) -> i64 {
    match ev.attrs().get(k) {
        Some(Value::Int(i)) => *i,
        other => panic!("attribute {k}: {other:?}"),
    }
}

fn check_tcp(n: &Node) {
    for l in n.link_stats().iter().filter(|l| l.up) {
        assert_eq!(l.transport, Transport::Tcp, "link to {}", l.node);
    }
}

/// An urgent event arrives while the link's main connection is stalled by a bulk backlog the receiving node cannot
/// deliver (its sink is full and not read; its socket buffers and the sender's hold bulk events). On one connection it
/// would wait behind all of them until the bulk sink is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_event_passes_a_stalled_bulk_connection() -> Result<()> {
    const BULK: usize = 400;
    let reg = RegistryClient::in_process_private();
    let (a, b) = pair(&reg).await?;
    let ch_b = b.channel("urgent").await?;
    let mut bulk_sink = ch_b.sink(SinkOptions::new().types(["bulk"]).overflow(Overflow::Block).capacity(8))?;
    let mut urgent_sink = ch_b.sink(SinkOptions::new().types(["warm-up", "urgent"]))?;
    let ch_a = a.channel("urgent").await?;
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    alarm.submit_with("urgent", &Attrs::new(), b"now", urgent).await?;
    assert_eq!(recv(&mut urgent_sink).await?.ty(), "urgent");
    assert!(bulk_sink.len() <= 8, "the bulk sink was read");
    for _ in 0..BULK {
        assert_eq!(recv(&mut bulk_sink).await?.ty(), "bulk");
    }
    check_tcp(&a);
    Ok(())
}

/// A source alternating large default-priority events and small urgent ones has them delivered in its order, none
/// reported missed: an urgent event waits at the receiver (a `Wait` frame) until the main connection has been read
/// past the source's events before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_mixing_priorities_keeps_its_order_over_two_connections() -> Result<()> {
    const N: i64 = 600;
    let reg = RegistryClient::in_process_private();
    let (a, b) = pair(&reg).await?;
    let ch_b = b.channel("mixed").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(8))?;
    let ch_a = a.channel("mixed").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    let sender = tokio::spawn(async move {
        let big = vec![1u8; 32 << 10];
        for k in 1..=N {
            if k % 4 == 0 {
                // A moment for the link's writer to take the events before (the outbox then holds none of this
                // source's: the urgent event goes to the urgent connection while they may still be on their way).
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
        let ev = recv(&mut sink).await?;
        assert_eq!(attr_i(&ev, "k"), k, "out of order");
        if k % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    sender.await??;
    check_tcp(&a);
    Ok(())
}

/// A node that shuts down gracefully right after submitting delivers everything on both connections first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_delivers_both_connections() -> Result<()> {
    const N: i64 = 300;
    let reg = RegistryClient::in_process_private();
    let (a, b) = pair(&reg).await?;
    let ch_b = b.channel("close").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(1024))?;
    let ch_a = a.channel("close").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    let big = vec![2u8; 16 << 10];
    for k in 1..=N {
        if k % 3 == 0 {
            let o = kecho::EventOptions::new().priority(kecho::Priority::HIGHEST);
            src.submit_with("urgent", &Attrs::new().with("k", k), b"u", o).await?;
        } else {
            src.submit("bulk", &Attrs::new().with("k", k), &big).await?;
        }
    }
    drop(src);
    a.shutdown().await;
    for k in 1..=N {
        assert_eq!(attr_i(&recv(&mut sink).await?, "k"), k, "out of order or missing");
    }
    Ok(())
}

/// A connection that presents an `UrgentJoin` for a link it does not own (the right node id, a made-up token) is
/// refused with `Close{Handshake}`, and the real link goes on carrying urgent events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_urgent_connection_is_refused() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let (a, b) = pair(&reg).await?;
    let ch_b = b.channel("forged").await?;
    let mut sink = ch_b.sink(SinkOptions::new())?;
    let ch_a = a.channel("forged").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    let urgent = kecho::EventOptions::new().priority(kecho::Priority::HIGHEST);
    src.submit_with("first", &Attrs::new(), b"", urgent).await?;
    assert_eq!(recv(&mut sink).await?.ty(), "first");

    let mut forged = tokio::net::TcpStream::connect(b.local_addr()).await?;
    let mut join = Vec::new();
    join.extend_from_slice(&25u32.to_le_bytes());
    join.push(66);
    join.extend_from_slice(&a.id().0.to_le_bytes());
    join.extend_from_slice(&[0x5a; 16]);
    forged.write_all(&join).await?;
    let mut buf = BytesMut::new();
    let answer = tokio::time::timeout(T, async {
        loop {
            if let Some(m) = codec::decode_frame(&mut buf, 1 << 20)? {
                return anyhow::Ok(m);
            }
            if forged.read_buf(&mut buf).await? == 0 {
                bail!("closed without a Close frame");
            }
        }
    })
    .await??;
    match answer {
        Message::Close { code: CloseCode::Handshake, .. } => {}
        other => bail!("expected Close{{Handshake}}, got {other:?}"),
    }
    src.submit_with("second", &Attrs::new(), b"", urgent).await?;
    assert_eq!(recv(&mut sink).await?.ty(), "second");
    assert!(a.link_stats().iter().all(|l| l.connects == 1), "the link was replaced");
    check_tcp(&a);
    Ok(())
}
