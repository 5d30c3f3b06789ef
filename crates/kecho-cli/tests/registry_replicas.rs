//! Three `kecho registry` processes on loopback as one replicated registry: channels are created and joined by real
//! nodes in a loop while one replica, then the leader, is killed with SIGKILL. Every create and join must succeed; the
//! longest one around each kill is the interruption, printed in ms.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kecho::{Node, RegistryClient};
use kecho_proto::codec::{RegErrorCode, RegResult};
use kecho_proto::Message;
use support::{free_port, Proc};

/// A replica keeping its state in a directory of its own (so that a restart keeps it).
fn replica(me: &str, all: &[String]) -> Result<Proc> {
    let peers: Vec<&str> = all.iter().map(String::as_str).filter(|a| *a != me).collect();
    let peers = peers.join(",");
    let data = data_dir(me);
    let data = data.to_str().context("path")?;
    let args = ["registry", "--listen", me, "--peers", &peers, "--data", data];
    let mut p = Proc::spawn(&format!("registry {me}"), &args)?;
    p.wait_stderr("listening")?;
    Ok(p)
}

fn data_dir(me: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kecho-replica-test-{}-{}", std::process::id(), me.replace([':', '.'], "_")))
}

/// The replica that answers a listing itself (the others say `NotLeader`).
async fn leader(addrs: &[String]) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (i, a) in addrs.iter().enumerate() {
            let one = RegistryClient::remote(a.parse()?)
                .with_timeouts(Duration::from_millis(300), Duration::from_millis(500));
            match one.request(Message::RegList { req: 0 }).await {
                Ok(RegResult::Entries(_)) => return Ok(i),
                Ok(RegResult::Error { code: RegErrorCode::NotLeader, .. }) | Err(_) => {}
                Ok(other) => bail!("unexpected answer {other:?}"),
            }
        }
        if Instant::now() > deadline {
            bail!("no leader elected");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates and joins channels until `stop`, returning each round's duration (create on `a`, join on `b`).
async fn rounds(a: &Node, b: &Node, prefix: &str, stop: Instant) -> Result<Vec<(Instant, Duration)>> {
    let mut took = Vec::new();
    let mut i = 0;
    while Instant::now() < stop {
        let name = format!("{prefix}-{i}");
        i += 1;
        let t0 = Instant::now();
        let created = a.channel(&name).await.with_context(|| format!("create {name}"))?;
        let joined = b.open_channel(&name).await.with_context(|| format!("join {name}"))?;
        took.push((t0, t0.elapsed()));
        drop(joined);
        drop(created);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(took)
}

/// The longest round that started within 3 s after `kill`.
fn interruption(took: &[(Instant, Duration)], kill: Instant) -> Duration {
    took.iter()
        .filter(|(t, _)| *t + Duration::from_millis(3000) > kill && *t < kill + Duration::from_secs(3))
        .map(|(_, d)| *d)
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_and_joins_survive_kill_9_of_a_follower_and_of_the_leader() -> Result<()> {
    let addrs: Vec<String> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let mut procs: Vec<Option<Proc>> = Vec::new();
    for a in &addrs {
        procs.push(Some(replica(a, &addrs)?));
    }
    let list: Vec<SocketAddr> = addrs.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let a = Node::builder().registry_replicas(list.clone()).start().await?;
    let b = Node::builder().registry_replicas(list.clone()).start().await?;
    let first = leader(&addrs).await?;
    // A channel that lives through both kills: its contact renews its lease through them.
    let long_lived = a.channel("long-lived").await?;

    // Kill a follower.
    let follower = (first + 1) % 3;
    let stop = Instant::now() + Duration::from_secs(4);
    let kill_at = Instant::now() + Duration::from_secs(1);
    let killer = async {
        tokio::time::sleep_until(kill_at.into()).await;
        procs[follower] = None;
    };
    let (took, ()) = tokio::join!(rounds(&a, &b, "f", stop), killer);
    let took = took?;
    let normal = took.iter().filter(|(t, _)| *t < kill_at).map(|(_, d)| *d).max().unwrap_or_default();
    let follower_gap = interruption(&took, kill_at);

    // Bring it back (from its state on disk; it catches up from the leader), then kill the leader.
    procs[follower] = Some(replica(&addrs[follower], &addrs)?);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lead = leader(&addrs).await?;
    let stop = Instant::now() + Duration::from_secs(5);
    let kill_at = Instant::now() + Duration::from_secs(1);
    let killer = async {
        tokio::time::sleep_until(kill_at.into()).await;
        procs[lead] = None;
    };
    let (took2, ()) = tokio::join!(rounds(&a, &b, "l", stop), killer);
    let took2 = took2?;
    let leader_gap = interruption(&took2, kill_at);
    let after = took2.iter().filter(|(t, _)| *t > kill_at + Duration::from_secs(3)).count();
    let new_leader = leader(&addrs).await?;
    eprintln!(
        "create+join rounds: {} before/while killing a follower, {} while killing the leader; slowest normal round \
         {} ms; interruption: follower kill {} ms, leader kill {} ms",
        took.len(),
        took2.len(),
        normal.as_millis(),
        follower_gap.as_millis(),
        leader_gap.as_millis()
    );
    assert_ne!(new_leader, lead, "a new leader took over");
    assert!(after > 0, "creates and joins continue after the leader's death");
    assert!(leader_gap < Duration::from_secs(3), "leader kill interrupted creates for {leader_gap:?}");
    assert!(follower_gap < Duration::from_secs(2), "follower kill interrupted creates for {follower_gap:?}");
    // The long-lived channel is still registered (its lease renewed through both kills) and joinable.
    let again = b.open_channel("long-lived").await?;
    drop(again);
    drop(long_lived);
    drop(procs);
    for a in &addrs {
        let _ = std::fs::remove_dir_all(data_dir(a));
    }
    Ok(())
}

/// One address and no peers is the single registry, as before.
#[tokio::test]
async fn a_single_registry_is_unchanged() -> Result<()> {
    let addr = free_port()?;
    let _r = support::registry(&addr, &[])?;
    let reg: SocketAddr = addr.parse()?;
    let a = Node::builder().registry_replicas(vec![reg]).start().await?;
    let _c = a.channel("solo").await?;
    let client = RegistryClient::remote(reg);
    let list = client.list().await?;
    assert_eq!(list.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["solo"]);
    Ok(())
}
