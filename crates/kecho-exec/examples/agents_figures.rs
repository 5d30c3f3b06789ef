//! 2K's mobile-agent measurements (section 5.1 and Figure 3) for kecho's inspection and configuration agents, on
//! loopback in one process: inspecting 6 nodes (2K: 101 ms), loading a 30 KB component onto 6 nodes (2K: 265 ms),
//! and the time against the number of nodes and the component's size, kecho's fan-out against the point-to-point
//! baseline (one node after another) measured in the same run.
//!
//! `cargo run -p kecho-exec --example agents_figures [-- RUNS]`

use std::time::{Duration, Instant};

use anyhow::Result;
use kecho::Node;
use kecho_exec::inspect::{serve, Inspector};
use kecho_exec::repo::Store;

const BOUND: Duration = Duration::from_secs(30);

struct Cluster {
    _dir: tempfile::TempDir,
    _nodes: Vec<Node>,
    _serving: Vec<tokio::task::JoinHandle<()>>,
    inspector: Inspector,
    direct: Vec<kecho::Source>,
    _channels: Vec<kecho::Channel>,
    n: usize,
}

async fn cluster(n: usize, prefix: &str) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    let mut serving = Vec::new();
    for i in 0..n {
        let node = Node::start().await?;
        let name = format!("node-{i}");
        serving.push(serve(&node, prefix, name, Store::open(dir.path().join(format!("n{i}")))?).await?);
        nodes.push(node);
    }
    let home = Node::start().await?;
    let inspector = Inspector::new(&home, prefix, "figures", n, BOUND).await?;
    let mut direct = Vec::new();
    let mut channels = Vec::new();
    for i in 0..n {
        let (ch, src) = Inspector::direct(&home, prefix, &format!("node-{i}"), BOUND).await?;
        channels.push(ch);
        direct.push(src);
    }
    nodes.push(home);
    Ok(Cluster { _dir: dir, _nodes: nodes, _serving: serving, inspector, direct, _channels: channels, n })
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

/// Median milliseconds of the fan-out and of the one-by-one baseline, alternating runs.
async fn measure(c: &mut Cluster, load: Option<&[u8]>, runs: usize) -> Result<(f64, f64)> {
    // One warm-up of each path: first use of a link and of a store directory.
    match load {
        Some(b) => c.inspector.configure(b, c.n, BOUND).await.map(|_| ())?,
        None => c.inspector.inspect(c.n, BOUND).await.map(|_| ())?,
    }
    c.inspector.one_by_one(&mut c.direct, load, BOUND).await?;
    let mut fan = Vec::new();
    let mut p2p = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        match load {
            Some(b) => c.inspector.configure(b, c.n, BOUND).await.map(|_| ())?,
            None => c.inspector.inspect(c.n, BOUND).await.map(|_| ())?,
        }
        fan.push(t.elapsed());
        let t = Instant::now();
        c.inspector.one_by_one(&mut c.direct, load, BOUND).await?;
        p2p.push(t.elapsed());
    }
    Ok((median(fan), median(p2p)))
}

fn component(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let runs: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(20).max(1);
    println!(
        "inspection and configuration agents, loopback, one process, median of {runs} runs ({} build)",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    let thirty_k = component(30 * 1024);
    let mut six = cluster(6, "fig6").await?;
    let (fan, p2p) = measure(&mut six, None, runs).await?;
    println!(
        "inspect 6 nodes:               fan-out {fan:>7.2} ms   one by one {p2p:>7.2} ms   ratio {:.2}   (2K: 101 ms)",
        p2p / fan
    );
    let (fan, p2p) = measure(&mut six, Some(&thirty_k), runs).await?;
    println!(
        "load 30 KB onto 6 nodes:       fan-out {fan:>7.2} ms   one by one {p2p:>7.2} ms   ratio {:.2}   (2K: 265 ms)",
        p2p / fan
    );

    println!("load 30 KB against the number of nodes:");
    let mut first = None;
    for n in [1usize, 2, 4, 8, 12] {
        let mut c = cluster(n, &format!("count{n}")).await?;
        let (fan, p2p) = measure(&mut c, Some(&thirty_k), runs).await?;
        let base = *first.get_or_insert(fan);
        println!(
            "  {n:>2} nodes: fan-out {fan:>7.2} ms ({:>5.2}x one node)   one by one {p2p:>7.2} ms   ratio {:.2}",
            fan / base,
            p2p / fan
        );
    }

    println!("load onto 6 nodes against the component's size (2K Figure 3):");
    for size in [1usize << 10, 10 << 10, 30 << 10, 100 << 10, 300 << 10] {
        let (fan, p2p) = measure(&mut six, Some(&component(size)), runs).await?;
        println!("  {:>4} KB: fan-out {fan:>7.2} ms   one by one {p2p:>7.2} ms   ratio {:.2}", size >> 10, p2p / fan);
    }
    Ok(())
}
