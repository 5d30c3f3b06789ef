//! A node that closes a channel and opens it again: events and accounts meant for the earlier opening (instance) of
//! the channel never reach the new one's sinks as theirs, and the new one's events are delivered or reported missed
//! (docs/PROTOCOL.md, "Loss accounting", "A channel opened again").

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Node, Overflow, RegistryClient, SinkOptions, Transport};
use tokio::time::timeout;

mod common;
use common::drain;

const T: Duration = Duration::from_secs(10);

async fn pair() -> Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).transport(Transport::Tcp);
    let b = Node::builder().registry_client(reg).transport(Transport::Tcp);
    Ok((a.start().await?, b.start().await?))
}

/// Waits until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    while !f() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Events a source sent to the earlier instance of a channel, still in flight when the node opened the channel again
/// (they wait on the link behind an event for a full Block sink of another channel), reach the new instance: they are
/// ignored there (counted as stale), and the new instance's own events are all delivered. (They used to set the new
/// instance's baseline in the old numbering: the new numbering's events were then dropped as ones it had, silently,
/// and the end event below never came.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_flight_to_an_earlier_instance_do_not_set_the_new_ones_baseline() -> Result<()> {
    let (a, b) = pair().await?;
    let keep_a = a.channel("keep").await?;
    let keep_b = b.channel("keep").await?;
    let mut stall = keep_b.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
    let ca = a.channel("again").await?;
    let cb = b.channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    keep_a.wait_for_sinks(1, T).await?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    for _ in 0..20 {
        src.submit("old", &Attrs::new(), b"before").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let got = drain(&mut sink, "end").await?;
    assert_eq!(got.len(), 21);

    // b's link reader stops at the second event for the full Block sink of "keep": what a sends after it waits.
    let mut keep_src = keep_a.source()?;
    keep_src.submit("k", &Attrs::new(), b"1").await?;
    keep_src.submit("k", &Attrs::new(), b"2").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last_old = {
        let mut last = 0;
        for _ in 0..200 {
            last = src.submit("old", &Attrs::new(), b"in flight").await?;
        }
        last
    };

    // b closes the channel (a hears of it: that way is not stalled) and opens it again.
    drop(sink);
    cb.close().await;
    drop(cb);
    until("the source no longer sees the closed channel's sink", || src.sinks() == 0).await?;
    let b2 = b.clone();
    let reopen = tokio::spawn(async move { b2.channel("again").await });
    // The new instance has the channel's id (from the registry) before the stalled events move on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        timeout(T, stall.recv()).await.context("the stalled Block sink's events")?.context("recv")?;
    }
    let cb = reopen.await??;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let first = src.submit("new", &Attrs::new(), b"first").await?;
    for _ in 0..50 {
        src.submit("new", &Attrs::new(), b"after").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let got = drain(&mut sink, "end").await?;
    assert!(got.iter().all(|(_, seq, _)| *seq > last_old), "an event meant for the earlier instance was delivered");
    assert_eq!(got.first().map(|g| (g.1, g.2)), Some((first, 0)), "the new instance's first event arrived");
    assert_eq!(got.len(), 52, "every event to the new instance delivered: {got:?}");
    let stale = cb.stats().stale;
    assert!(stale > 0, "the earlier instance's events reached the new one (else the test shows nothing)");
    assert_eq!(cb.stats().missed, 0);
    Ok(())
}

/// A source's node closes the channel and opens it again: the new instance's sources (whose local ids and sequence
/// numbers start again at 1) are delivered from their first event, not taken for the old instance's sources, whose
/// account at the sink is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_of_a_reopened_channel_are_not_taken_for_the_old_ones() -> Result<()> {
    let (a, b) = pair().await?;
    let _keep_a = a.channel("keep").await?;
    let _keep_b = b.channel("keep").await?;
    let ca = a.channel("again").await?;
    let mut sink = ca.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    let cb = b.channel("again").await?;
    cb.wait_for_sinks(1, T).await?;
    let mut src = cb.source()?;
    for _ in 0..30 {
        src.submit("old", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let old_key = {
        let e = timeout(T, sink.recv()).await?;
        e.map_err(|e| anyhow::anyhow!("recv: {e}"))?.source()
    };
    assert_eq!(drain(&mut sink, "end").await?.len(), 30);
    drop(src);
    cb.close().await;
    drop(cb);

    let cb = b.channel("again").await?;
    cb.wait_for_sinks(1, T).await?;
    let mut src = cb.source()?;
    for _ in 0..5 {
        src.submit("new", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let e = timeout(T, sink.recv()).await.context("timed out waiting for the new source's first event")?;
    let e = e.map_err(|e| anyhow::anyhow!("recv: {e}"))?;
    assert_eq!((e.ty(), e.seq()), ("new", 1), "the new source's first event");
    assert_eq!(e.source(), old_key, "the new source has the old one's key (else the test shows nothing)");
    let got = drain(&mut sink, "end").await?;
    let seqs: Vec<u64> = got.iter().map(|g| g.1).collect();
    assert_eq!(seqs, vec![2, 3, 4, 5, 6], "the new source's events: {got:?}");
    assert!(got.iter().all(|g| g.2 == 0), "nothing reported missed: {got:?}");
    Ok(())
}
