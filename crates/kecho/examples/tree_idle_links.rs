//! N member nodes of one channel in tree mode, in this process, one sink each: joins them one at a time, waits until
//! each knows every sink, then prints the links up (at every node, and the most at one node) once a second for IDLE
//! seconds (docs/SCALE.md). `tree_idle_links N [THRESHOLD] [IDLE_SECS]`; under heaptrack it shows where memory goes
//! (it exits with the nodes held, so heaptrack's leaks are the live heap at the end, per allocation site).

use std::time::Duration;

use kecho::{Node, RegistryClient, SinkOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().unwrap_or_else(|| "100".into()).parse()?;
    let threshold: usize = args.next().unwrap_or_else(|| "8".into()).parse()?;
    let idle: u64 = args.next().unwrap_or_else(|| "5".into()).parse()?;
    let reg = RegistryClient::in_process_private();
    let mut held = Vec::new();
    for k in 1..=n {
        let node = Node::builder().registry_client(reg.clone()).tree_threshold(threshold).start().await?;
        let ch = node.channel("heap").await?;
        let sink = ch.sink(SinkOptions::new())?;
        ch.wait_for_sinks(k, Duration::from_secs(30)).await?;
        held.push((node, ch, sink));
    }
    for (_, ch, _) in &held {
        ch.wait_for_sinks(n, Duration::from_secs(60)).await?;
    }
    let ids: Vec<kecho::NodeId> = held.iter().map(|(node, _, _)| node.id()).collect();
    for sec in 0..idle {
        let links: Vec<usize> = held.iter().map(|(node, _, _)| node.links()).collect();
        let (imax, max) = links.iter().copied().enumerate().max_by_key(|(_, l)| *l).unwrap_or((0, 0));
        let over = links.iter().filter(|l| **l > 8).count();
        let neigh: usize = held.iter().map(|(_, ch, _)| ch.tree_neighbours().len()).sum();
        // Who the busiest node's links go to, and how much they carried.
        let st = held[imax].0.link_stats();
        let ups: Vec<usize> =
            st.iter().filter(|l| l.up).filter_map(|l| ids.iter().position(|i| *i == l.node)).collect();
        let quiet = st.iter().filter(|l| l.up && l.bytes_sent < 2048).count();
        eprintln!(
            "t={sec:>2}s links {} (neighbours {neigh}) max {max} at node #{imax} ({over} over 8); its links: {quiet} quiet (<2 KB sent), peers #{:?}",
            links.iter().sum::<usize>(),
            &ups[..ups.len().min(12)]
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rss = std::fs::read_to_string("/proc/self/status")?;
    eprintln!("{}", rss.lines().find(|l| l.starts_with("VmRSS")).unwrap_or(""));
    // Exit with every node still held: under heaptrack, what is "leaked" is then what the nodes hold, per site.
    std::process::exit(0)
}
