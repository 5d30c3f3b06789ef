//! The cluster view over a real registry and reporting nodes.

use std::time::Duration;

use anyhow::Result;
use kecho::{Attrs, Node, SinkOptions};
use kecho_metrics::cluster::{self, Reporter, View};

const T: Duration = Duration::from_secs(15);
const EVERY: Duration = Duration::from_millis(100);

async fn wait_for(rx: &mut tokio::sync::watch::Receiver<View>, what: &str, f: impl Fn(&View) -> bool) -> Result<View> {
    let r = tokio::time::timeout(T, rx.wait_for(|v| f(v))).await.map(|r| r.map(|v| v.clone()));
    match r {
        Ok(Ok(v)) => Ok(v),
        _ => anyhow::bail!("no view with {what}; last: {:?}", *rx.borrow()),
    }
}

#[tokio::test]
async fn the_view_shows_channels_members_and_rates() -> Result<()> {
    let server = kecho_registry::RegistryServer::bind("127.0.0.1:0".parse()?).await?.spawn();
    let reg = server.local_addr();
    let mut rx = cluster::watch(vec![reg], EVERY).await?;
    let a = Node::builder().registry(reg).start().await?;
    let b = Node::builder().registry(reg).start().await?;
    let _ra = Reporter::start(&a, EVERY).await?;
    let _rb = Reporter::start(&b, EVERY).await?;
    let ca = a.channel("news").await?;
    let v = wait_for(&mut rx, "channel news", |v| v.channels.iter().any(|c| c.name == "news")).await?;
    assert!(v.channels.iter().all(|c| c.name != cluster::STATS_CHANNEL));

    let cb = b.channel("news").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    wait_for(&mut rx, "a sink listed", |v| v.channels.iter().any(|c| c.name == "news" && c.sinks == Some(1))).await?;
    let mut src = ca.source()?;
    let pump = tokio::spawn(async move {
        loop {
            if src.submit("e", &Attrs::new(), b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let drain = tokio::spawn(async move { while sink.recv().await.is_ok() {} });
    let v = wait_for(&mut rx, "rates on news from both members", |v| {
        v.channels
            .iter()
            .any(|c| c.name == "news" && c.members.len() == 2 && c.submitted_per_s > 10.0 && c.received_per_s > 10.0)
    })
    .await?;
    assert!(v.nodes.iter().all(|n| n.links >= 1), "{:?}", v.nodes);
    pump.abort();
    drain.abort();
    Ok(())
}
