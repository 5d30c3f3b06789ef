//! A replicated registry on three hosts: the leader's host is cut off (a partition of one replica) while channels are
//! created and joined by `kecho sub` and `kecho pub` processes on other hosts; every round must succeed, and a
//! channel created before the cut keeps its registration (its contact renews through the failover). The longest round
//! around the cut is the interruption. The harness is `hosts/harness.rs`; these tests need root, so they are marked
//! ignored with that reason; `.ci/run` (as root) runs them with `--ignored`.

#[path = "hosts/cli.rs"]
mod cli;
#[path = "hosts/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cli::{HEARTBEAT, WAIT};
use harness::{Net, Proc, NODE_PORT, REGISTRY_PORT};

const REPLICAS: [usize; 3] = [1, 2, 3];

fn replicas(net: &Net) -> String {
    REPLICAS.map(|h| net.addr(h, REGISTRY_PORT)).join(",")
}

fn start_replica(net: &Net, h: usize) -> Result<Proc> {
    let peers: Vec<String> = REPLICAS.iter().filter(|o| **o != h).map(|o| net.addr(*o, REGISTRY_PORT)).collect();
    let me = net.addr(h, REGISTRY_PORT);
    let args = ["registry", "--listen", &me, "--peers", &peers.join(","), "--log", "kecho_registry=info"];
    let mut r = net.kecho(h, &format!("registry{h}"), &args)?;
    r.wait_stderr("listening", WAIT)?;
    Ok(r)
}

fn node_args(net: &Net, h: usize) -> Vec<String> {
    ["--registry", &replicas(net), "--listen", &net.addr(h, NODE_PORT), "--heartbeat", HEARTBEAT]
        .map(str::to_owned)
        .to_vec()
}

/// One round: a channel created by a sink on host 5 and joined by a publisher on host 6, one event through it.
fn round(net: &Net, name: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let mut args =
        vec!["sub".to_owned(), name.to_owned(), "--count".into(), "1".into(), "--timeout".into(), "20".into()];
    args.extend(node_args(net, 5));
    let mut sub = net.kecho(5, "sub", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    sub.wait_stderr("subscribed", WAIT)?;
    let mut args =
        vec!["pub".to_owned(), name.to_owned(), "--count".into(), "1".into(), "--wait-sinks".into(), "1".into()];
    args.extend(node_args(net, 6));
    args.push("hello".into());
    let mut publ = net.kecho(6, "pub", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let p = publ.finish(WAIT)?;
    ensure!(p.success(), "pub {name} failed: {}", publ.stderr_text());
    let s = sub.finish(WAIT)?;
    ensure!(s.success(), "sub {name} failed: {}", sub.stderr_text());
    Ok(t0.elapsed())
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn creates_and_joins_continue_while_the_leader_is_cut_off() -> Result<()> {
    let net = Net::new(6)?;
    let mut regs = Vec::new();
    for h in REPLICAS {
        regs.push(start_replica(&net, h)?);
    }
    // The replica that logged its election last is the leader.
    let leader_host = {
        let deadline = Instant::now() + WAIT;
        loop {
            let newest = regs
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    r.stderr().iter().rev().find(|l| l.text.contains("elected leader")).map(|l| (l.at, i))
                })
                .max();
            if let Some((_, i)) = newest {
                break REPLICAS[i];
            }
            ensure!(Instant::now() < deadline, "no replica was elected");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A channel that lives through the partition.
    let mut args = vec!["sub".to_owned(), "steady".into(), "--timeout".into(), "60".into()];
    args.extend(node_args(&net, 4));
    let mut steady = net.kecho(4, "steady", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    steady.wait_stderr("subscribed", WAIT)?;

    let mut normal = Vec::new();
    for i in 0..3 {
        normal.push(round(&net, &format!("before-{i}"))?);
    }
    let cut = Instant::now();
    net.cut(leader_host)?;
    let mut during = Vec::new();
    let mut i = 0;
    while cut.elapsed() < Duration::from_secs(4) {
        during.push(round(&net, &format!("during-{i}")).with_context(|| format!("round {i} with the leader cut off"))?);
        i += 1;
    }
    net.heal(leader_host)?;
    let healed = Instant::now();
    let mut after = Vec::new();
    while healed.elapsed() < Duration::from_secs(3) {
        after.push(round(&net, &format!("after-{i}"))?);
        i += 1;
    }
    let old = REPLICAS.iter().position(|h| *h == leader_host).context("leader")?;
    let normal_max = normal.iter().max().copied().unwrap_or_default();
    let first = during.first().copied().unwrap_or_default();
    eprintln!(
        "FIGURE registry leader cut off: create+join round normally {} ms, first round after the cut {} ms \
         (interruption {} ms), {} rounds during the 4 s cut, {} in the 3 s after the heal",
        normal_max.as_millis(),
        first.as_millis(),
        first.saturating_sub(normal_max).as_millis(),
        during.len(),
        after.len()
    );
    ensure!(during.len() >= 2, "creates and joins continued during the cut");
    ensure!(first < Duration::from_secs(5), "the first round after the cut took {first:?}");
    ensure!(!regs[old].exited()?, "the cut replica is still running");
    // The channel made before the cut is still registered: a publisher joins it.
    let mut args =
        vec!["pub".to_owned(), "steady".into(), "--count".into(), "1".into(), "--wait-sinks".into(), "1".into()];
    args.extend(node_args(&net, 6));
    args.push("still here".into());
    let mut p = net.kecho(6, "pub", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(p.finish(WAIT)?.success(), "joining the channel made before the cut failed: {}", p.stderr_text());
    drop(steady);
    Ok(())
}
