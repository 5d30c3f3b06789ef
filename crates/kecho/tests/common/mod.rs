//! Scenarios that more than one transport's tests run as they are.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Node, Overflow, RecvError, SinkOptions};
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
