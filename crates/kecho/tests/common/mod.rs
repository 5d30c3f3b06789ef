//! Scenarios that more than one transport's tests run as they are.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Event, Node, Overflow, RecvError, SinkOptions};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// A Block sink on `b` that nobody reads stalls the link from `a` (whose link queue must be small); the events of
/// another channel that find the link full are dropped at the source and reported to their sink, exactly, once the
/// link moves again. `linked` runs once both channels have their sink (to check which transport the link took).
pub async fn events_dropped_at_a_full_link_are_reported(
    a_node: &Node,
    b_node: &Node,
    linked: impl FnOnce(),
) -> Result<()> {
    let ax = a_node.create_channel("x").await?;
    let bx = b_node.open_channel("x").await?;
    let mut blocker = bx.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
    let ay = a_node.create_channel("y").await?;
    let by = b_node.open_channel("y").await?;
    let mut lossy = by.sink(SinkOptions::new().capacity(100_000).overflow(Overflow::DropNewest))?;
    ax.wait_for_sinks(1, T).await?;
    ay.wait_for_sinks(1, T).await?;
    linked();
    let mut sx = ax.source()?;
    let mut sy = ay.source()?;
    let mut filled = 0u64;
    let mut refusals = 0;
    while refusals < 5 {
        match sx.try_submit("x", &Attrs::new(), &[0u8; 4096]) {
            Ok(_) => {
                filled += 1;
                refusals = 0;
            }
            Err(_) => {
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(filled < 100_000, "the link never filled up: {:?} {:?} {}", ax.stats(), bx.stats(), blocker.len());
    }
    let n = 1000u64;
    for _ in 0..n {
        sy.submit("y", &Attrs::new(), b"").await?;
    }
    let dropped_at_source = ay.stats().dropped;
    assert!(dropped_at_source > 0, "nothing was dropped at the full link");
    let drain =
        tokio::spawn(async move { while let Ok(Ok(_)) = timeout(Duration::from_millis(500), blocker.recv()).await {} });
    let (mut got, mut lagged) = (0u64, 0u64);
    while got + lagged < n {
        match timeout(T, lossy.recv()).await.context("y events")? {
            Ok(_) => got += 1,
            Err(RecvError::Lagged(n)) => lagged += n,
            Err(e) => bail!("{e}"),
        }
    }
    assert_eq!(lagged, dropped_at_source);
    assert_eq!(got + lagged, n);
    drain.abort();
    Ok(())
}

/// The next event of `sink`, at most `T`; says whether the event never came or came and the receiver was not woken.
pub async fn recv(sink: &mut kecho::Sink) -> Result<Event> {
    let waited = timeout(T, sink.recv()).await;
    let Ok(got) = waited else {
        bail!("timed out waiting for an event ({} queued at the sink)", sink.len());
    };
    match got {
        Ok(e) => Ok(e),
        Err(e) => bail!("recv: {e}"),
    }
}

/// Waits until `f` holds, polling every 10 ms, at most `T`; how long it took.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = tokio::time::Instant::now();
    while !f() {
        if start.elapsed() > T {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}

/// Three member nodes; the second is killed (no goodbye): the first drops its sink within 2 s and still reaches the
/// third. `linked` runs once both sinks are known (to check which transport the links took).
pub async fn a_crashed_member_is_removed_and_the_others_carry_on(nodes: &[Node], linked: impl FnOnce()) -> Result<()> {
    let a = nodes[0].create_channel("crash").await?;
    let b = nodes[1].open_channel("crash").await?;
    let c = nodes[2].open_channel("crash").await?;
    let _sb = b.sink(SinkOptions::new())?;
    let mut sc = c.sink(SinkOptions::new())?;
    a.wait_for_sinks(2, T).await?;
    linked();
    nodes[1].kill();
    let took = eventually("crashed sink removed", || a.sinks() == 1).await?;
    assert!(took < Duration::from_millis(2000), "took {took:?}");
    // The others carry on.
    let mut src = a.source()?;
    src.submit("e", &Attrs::new(), b"").await?;
    assert_eq!(recv(&mut sc).await?.seq(), 1);
    Ok(())
}
