//! One interface over every system measured (kecho, raw TCP, and with the `peers` feature NATS and Zenoh), and the
//! latency and throughput drivers written once against it, so that every system is measured by the same code.
//!
//! The systems are an enum rather than trait objects: the calls are async and the set is closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use kecho::{Attrs, RecvError};

use crate::util::{epoch_ns, histogram, stamp, stamp_of, stamped};

/// The sending end of one source.
pub enum AnyTx {
    /// A kecho source (the node is kept alive by the source's handle).
    Kecho { src: Box<kecho::Source>, attrs: Attrs, _nodes: Vec<kecho::Node> },
    /// One or more raw TCP connections (several for fan-out: the message is written to each).
    Raw(Vec<crate::rawtcp::RawTx>),
    /// A NATS publisher.
    #[cfg(feature = "peers")]
    Nats(crate::peers::NatsTx),
    /// A Zenoh publisher.
    #[cfg(feature = "peers")]
    Zenoh(crate::peers::ZenohTx),
}

/// What a receiving end got.
pub enum Got {
    /// A message: its timestamp (first 8 bytes) and length.
    Msg(u64, usize),
    /// The system reports this many messages lost.
    Lost(u64),
}

/// The receiving end of one sink.
pub enum AnyRx {
    /// A kecho sink.
    Kecho { sink: kecho::Sink, _nodes: Vec<kecho::Node> },
    /// One raw TCP connection.
    Raw(crate::rawtcp::RawRx),
    /// A NATS subscription.
    #[cfg(feature = "peers")]
    Nats(crate::peers::NatsRx),
    /// A Zenoh subscriber.
    #[cfg(feature = "peers")]
    Zenoh(crate::peers::ZenohRx),
}

impl AnyTx {
    /// Sends one message (its first 8 bytes are the timestamp).
    pub async fn send(&mut self, buf: &[u8]) -> Result<()> {
        match self {
            AnyTx::Kecho { src, attrs, .. } => {
                src.submit("e", attrs, buf).await?;
            }
            AnyTx::Raw(conns) => {
                for c in conns {
                    c.send(buf).await?;
                }
            }
            #[cfg(feature = "peers")]
            AnyTx::Nats(t) => t.send(buf).await?,
            #[cfg(feature = "peers")]
            AnyTx::Zenoh(t) => t.send(buf).await?,
        }
        Ok(())
    }

    /// Pushes out whatever the system buffers (the end of a throughput run).
    pub async fn flush(&mut self) -> Result<()> {
        match self {
            AnyTx::Kecho { .. } => {}
            AnyTx::Raw(conns) => {
                for c in conns {
                    c.flush().await?;
                }
            }
            #[cfg(feature = "peers")]
            AnyTx::Nats(t) => t.flush().await?,
            #[cfg(feature = "peers")]
            AnyTx::Zenoh(_) => {}
        }
        Ok(())
    }

    /// Latency mode: every message leaves at once (raw TCP otherwise batches in a user-space buffer).
    pub fn set_immediate(&mut self, on: bool) {
        if let AnyTx::Raw(conns) = self {
            for c in conns {
                c.immediate = on;
            }
        }
    }
}

impl AnyRx {
    /// The next message.
    pub async fn recv(&mut self) -> Result<Got> {
        match self {
            AnyRx::Kecho { sink, .. } => match sink.recv().await {
                Ok(ev) => Ok(Got::Msg(stamp_of(ev.payload()), ev.payload().len())),
                Err(RecvError::Lagged(n)) => Ok(Got::Lost(n)),
                Err(e) => bail!("kecho sink: {e}"),
            },
            AnyRx::Raw(r) => r.recv().await,
            #[cfg(feature = "peers")]
            AnyRx::Nats(r) => r.recv().await,
            #[cfg(feature = "peers")]
            AnyRx::Zenoh(r) => r.recv().await,
        }
    }

    /// The next message, failing on a loss report (latency runs must not lose anything).
    async fn recv_msg(&mut self) -> Result<(u64, usize)> {
        match self.recv().await? {
            Got::Msg(ts, len) => Ok((ts, len)),
            Got::Lost(n) => bail!("{n} message(s) lost in a latency run"),
        }
    }
}

/// Ping-pong: A sends, B echoes, A records half the round trip. `warmup` exchanges are not recorded.
pub async fn pingpong(
    mut a_tx: AnyTx,
    mut a_rx: AnyRx,
    mut b_tx: AnyTx,
    mut b_rx: AnyRx,
    size: usize,
    n: u64,
    warmup: u64,
) -> Result<Histogram<u64>> {
    a_tx.set_immediate(true);
    b_tx.set_immediate(true);
    let total = n + warmup;
    let echo = tokio::spawn(async move {
        let mut buf = stamped(size);
        for _ in 0..total {
            let (ts, len) = b_rx.recv_msg().await?;
            buf[..8].copy_from_slice(&ts.to_le_bytes());
            b_tx.send(&buf[..len]).await?;
        }
        Ok::<_, anyhow::Error>((b_tx, b_rx))
    });
    let mut h = histogram();
    let mut buf = stamped(size);
    for i in 0..total {
        let t0 = Instant::now();
        stamp(&mut buf);
        a_tx.send(&buf).await?;
        a_rx.recv_msg().await?;
        if i >= warmup {
            h.saturating_record((t0.elapsed().as_nanos() as u64 / 2).max(1));
        }
    }
    let _keep = echo.await??;
    Ok(h)
}

/// One-way latency from the timestamp in the payload to its arrival. With `pace` the sender sends one message per
/// period whatever happens (the receiver sleeps in between: this measures its wake-up); without, it sends the next
/// one as soon as the receiver has the previous one (back-to-back, one in flight).
pub async fn oneway(
    mut tx: AnyTx,
    mut rx: AnyRx,
    size: usize,
    n: u64,
    warmup: u64,
    pace: Option<Duration>,
) -> Result<Histogram<u64>> {
    tx.set_immediate(true);
    let total = n + warmup;
    // The receiver tells the sender through memory, not through the system measured.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::channel::<()>(1);
    let receiver = tokio::spawn(async move {
        let mut h = histogram();
        for i in 0..total {
            let (ts, _) = rx.recv_msg().await?;
            let lat = epoch_ns().saturating_sub(ts).max(1);
            if i >= warmup {
                h.saturating_record(lat);
            }
            if ack_tx.try_send(()).is_err() && pace.is_none() {
                bail!("acknowledgement channel closed");
            }
        }
        Ok::<_, anyhow::Error>((h, rx))
    });
    let mut buf = stamped(size);
    let start = tokio::time::Instant::now();
    for i in 0..total {
        if let Some(p) = pace {
            tokio::time::sleep_until(start + p * (i as u32 + 1)).await;
        } else if i > 0 && ack_rx.recv().await.is_none() {
            break;
        }
        stamp(&mut buf);
        tx.send(&buf).await?;
    }
    let (h, _rx) = tokio::time::timeout(Duration::from_secs(30), receiver).await???;
    drop(tx);
    Ok(h)
}

/// A throughput run's outcome.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stream {
    /// Messages each source sent.
    pub sent_per_source: u64,
    /// Messages received over all receivers.
    pub received: u64,
    /// Messages the receivers should have got in all.
    pub expected: u64,
    /// Messages lost (reported by the system, or missing when the receivers went idle).
    pub lost: u64,
    /// Seconds from the first send to the last arrival.
    pub secs: f64,
}

/// Every source sends `n` messages as fast as it can; every receiver expects `per_rx` messages. A receiver that
/// sees nothing for `idle` stops and counts the rest as lost.
pub async fn stream(
    txs: Vec<AnyTx>,
    rxs: Vec<AnyRx>,
    size: usize,
    n: u64,
    per_rx: u64,
    idle: Duration,
) -> Result<Stream> {
    let received = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let expected = per_rx * rxs.len() as u64;
    let mut receivers = Vec::new();
    for mut rx in rxs {
        let received = received.clone();
        let lost = lost.clone();
        receivers.push(tokio::spawn(async move {
            // No clock read and no shared counter per message: the end time is taken once, when the last expected
            // message is in (or, after an idle timeout, when the last one came), and the counts are added at the
            // end. The idle timer is armed only when a receive has to wait: arming one per message (a clock read
            // and a timer entry on the runtime's shared handle) cost every system about 100 ns per message.
            let (mut got, mut msgs, mut missed) = (0, 0, 0);
            let mut end = None;
            while got < per_rx {
                let next = {
                    let recv = rx.recv();
                    tokio::pin!(recv);
                    match poll_once(recv.as_mut()).await {
                        Some(r) => Ok(r),
                        None => tokio::time::timeout(idle, recv).await,
                    }
                };
                match next {
                    Ok(Ok(Got::Msg(..))) => {
                        got += 1;
                        msgs += 1;
                    }
                    Ok(Ok(Got::Lost(k))) => {
                        missed += k;
                        got += k;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        end = Some(Instant::now() - idle);
                        break;
                    }
                }
            }
            received.fetch_add(msgs, Ordering::Relaxed);
            lost.fetch_add(missed, Ordering::Relaxed);
            Ok::<_, anyhow::Error>((end.unwrap_or_else(Instant::now), rx))
        }));
    }
    let start = Instant::now();
    let mut senders = Vec::new();
    for mut tx in txs {
        senders.push(tokio::spawn(async move {
            // Throughput needs no timestamps: the payload is sent as it is, for every system.
            let buf = stamped(size);
            for _ in 0..n {
                tx.send(&buf).await?;
            }
            tx.flush().await?;
            Ok::<_, anyhow::Error>(tx)
        }));
    }
    let mut keep_tx = Vec::new();
    for s in senders {
        keep_tx.push(s.await??);
    }
    let mut end = start;
    let mut keep_rx = Vec::new();
    for r in receivers {
        let (last, rx) = r.await??;
        end = end.max(last);
        keep_rx.push(rx);
    }
    let received = received.load(Ordering::Relaxed);
    let reported = lost.load(Ordering::Relaxed);
    Ok(Stream {
        sent_per_source: n,
        received,
        expected,
        lost: reported.max(expected.saturating_sub(received)),
        secs: (end - start).as_secs_f64().max(1e-9),
    })
}

/// Polls `fut` once: its output if it is ready, `None` if it would wait (it may then be polled again).
async fn poll_once<F: std::future::Future>(mut fut: std::pin::Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match fut.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// A channel name not used before in this process (the in-process registry is shared by all workloads).
pub fn fresh_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Drains `sink` on the current runtime until it closes, counting the events delivered and those it was told it
/// missed.
pub fn spawn_counting_sink(
    mut sink: kecho::Sink,
    delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    lost: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        loop {
            match sink.recv().await {
                Ok(ev) => {
                    std::hint::black_box(ev.payload().len());
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(kecho::RecvError::Lagged(k)) => {
                    lost.fetch_add(k, Ordering::Relaxed);
                }
                Err(_) => return,
            }
        }
    });
}

/// Sink queue capacity for a payload size: deep enough to keep the link busy, bounded in bytes (Block policy, so a
/// full queue back-pressures the source instead of losing events).
pub fn sink_capacity(size: usize) -> usize {
    ((64 << 20) / size.max(64)).clamp(256, 65_536)
}

/// kecho with `sources` source nodes and `sinks` sink nodes on one channel (each member on its own node, over
/// loopback TCP). Returns one sender per source, one receiver per sink, and how many events each sink gets per event
/// a source submits (every sink gets every source's events).
pub async fn kecho_topology(sources: usize, sinks: usize, size: usize) -> Result<(Vec<AnyTx>, Vec<AnyRx>, u64)> {
    let name = fresh_name("tp");
    let mut rxs = Vec::new();
    for _ in 0..sinks {
        let node = kecho::Node::start().await?;
        let ch = node.channel(&name).await?;
        let sink = ch.sink(kecho::SinkOptions::new().capacity(sink_capacity(size)).overflow(kecho::Overflow::Block))?;
        rxs.push(AnyRx::Kecho { sink, _nodes: vec![node] });
    }
    let mut txs = Vec::new();
    for _ in 0..sources {
        let node = kecho::Node::start().await?;
        let ch = node.channel(&name).await?;
        ch.wait_for_sinks(sinks, Duration::from_secs(10)).await?;
        txs.push(AnyTx::Kecho { src: Box::new(ch.source()?), attrs: Attrs::new(), _nodes: vec![node] });
    }
    Ok((txs, rxs, sources as u64))
}

/// Two kecho nodes with a channel in each direction: (A->B sender, A's receiver, B->A sender, B's receiver).
pub async fn kecho_pair() -> Result<(AnyTx, AnyRx, AnyTx, AnyRx)> {
    let a = kecho::Node::start().await?;
    let b = kecho::Node::start().await?;
    let (ping, pong) = (fresh_name("ping"), fresh_name("pong"));
    let opts = || kecho::SinkOptions::new().capacity(1024).overflow(kecho::Overflow::Block);
    let b_ping = b.channel(&ping).await?;
    let b_sink = b_ping.sink(opts())?;
    let a_pong = a.channel(&pong).await?;
    let a_sink = a_pong.sink(opts())?;
    let a_ping = a.channel(&ping).await?;
    a_ping.wait_for_sinks(1, Duration::from_secs(10)).await?;
    let b_pong = b.channel(&pong).await?;
    b_pong.wait_for_sinks(1, Duration::from_secs(10)).await?;
    Ok((
        AnyTx::Kecho { src: Box::new(a_ping.source()?), attrs: Attrs::new(), _nodes: vec![a.clone()] },
        AnyRx::Kecho { sink: a_sink, _nodes: vec![a] },
        AnyTx::Kecho { src: Box::new(b_pong.source()?), attrs: Attrs::new(), _nodes: vec![b.clone()] },
        AnyRx::Kecho { sink: b_sink, _nodes: vec![b] },
    ))
}
