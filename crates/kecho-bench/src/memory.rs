//! Resident memory: an idle node, per channel, per member. Measured in a fresh child process (so that earlier
//! workloads' heap does not hide or inflate anything) from `VmRSS`, after each step.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Node, SinkOptions};
use serde::{Deserialize, Serialize};

use crate::child::{command, wait_bounded};
use crate::pipe::fresh_name;
use crate::report::{Section, Table};
use crate::util::{count, rss_kib, runtime};
use crate::BenchArgs;

#[derive(Debug, Serialize, Deserialize)]
struct Probe {
    /// The process before any runtime or node (the program itself).
    process_kib: u64,
    /// After starting the two-worker runtime.
    runtime_kib: u64,
    /// After starting one idle node.
    node_kib: u64,
    channels: u64,
    per_channel_bytes: f64,
    members: u64,
    per_sink_bytes: f64,
    per_source_bytes: f64,
    member_nodes: u64,
    /// Per other node joined to a channel of the first, both ends in this process: its node, the link both ways
    /// and the membership state on both sides.
    per_member_node_bytes: f64,
}

/// The child's side: measures and prints one JSON line.
pub fn child(channels: u64, members: u64) -> Result<()> {
    let process_kib = rss_kib();
    let rt = runtime()?;
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    let runtime_kib = rss_kib();
    let probe = rt.block_on(async {
        let node = Node::start().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let node_kib = rss_kib();
        let mut chans = Vec::new();
        for _ in 0..channels {
            chans.push(node.channel(&fresh_name("mem")).await?);
        }
        let after_channels = rss_kib();
        let ch = chans[0].clone();
        let mut sinks = Vec::new();
        for _ in 0..members {
            sinks.push(ch.sink(SinkOptions::new())?);
        }
        let after_sinks = rss_kib();
        let mut sources = Vec::new();
        for _ in 0..members {
            sources.push(ch.source()?);
        }
        let after_sources = rss_kib();
        let member_nodes = (members / 64).max(2);
        let mut others = Vec::new();
        for _ in 0..member_nodes {
            let other = Node::start().await?;
            let och = other.open_channel(ch.name()).await?;
            others.push((other, och));
        }
        // Wait until the first node knows them all (each brings no sink, so count links).
        crate::util::wait_until(Duration::from_secs(10), || node.links() as u64 >= member_nodes).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after_nodes = rss_kib();
        let per = |after: u64, before: u64, n: u64| (after as f64 - before as f64) * 1024.0 / n as f64;
        Ok::<_, anyhow::Error>(Probe {
            process_kib,
            runtime_kib,
            node_kib,
            channels,
            per_channel_bytes: per(after_channels, node_kib, channels),
            members,
            per_sink_bytes: per(after_sinks, after_channels, members),
            per_source_bytes: per(after_sources, after_sinks, members),
            member_nodes,
            per_member_node_bytes: per(after_nodes, after_sources, member_nodes),
        })
    })?;
    println!("{}", serde_json::to_string(&probe)?);
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let channels = count(args, 1_000, 10);
    let members = count(args, 1_000, 10);
    let (exe, argv) = command(args, &format!("memory,{channels},{members}"))?;
    let mut child = Command::new(exe).args(argv).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
    let mut text = String::new();
    child.stdout.take().context("child stdout")?.read_to_string(&mut text)?;
    wait_bounded(&mut child, Duration::from_secs(args.child_timeout))?;
    let Some(line) = text.lines().last() else { bail!("memory probe printed nothing") };
    let p: Probe = serde_json::from_str(line).with_context(|| format!("memory probe output {line:?}"))?;
    let mut s = Section::new("memory");
    let mut t = Table::new("resident memory", &["what", "size"]);
    let kib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    let bytes = |b: f64| if b.abs() >= 10_240.0 { format!("{:.1} KiB", b / 1024.0) } else { format!("{b:.0} B") };
    t.row(vec!["process before the runtime (program text and data)".into(), kib(p.process_kib)]);
    t.row(vec!["with the two-worker runtime".into(), kib(p.runtime_kib)]);
    t.row(vec!["with one idle node (resident size of the process)".into(), kib(p.node_kib)]);
    t.row(vec![
        "an idle node (the node's own increment)".into(),
        bytes((p.node_kib - p.runtime_kib.min(p.node_kib)) as f64 * 1024.0),
    ]);
    t.row(vec![format!("per channel (mean of {})", p.channels), bytes(p.per_channel_bytes)]);
    t.row(vec![format!("per local sink (mean of {}, default capacity 1024)", p.members), bytes(p.per_sink_bytes)]);
    t.row(vec![format!("per local source (mean of {})", p.members), bytes(p.per_source_bytes)]);
    t.row(vec![
        format!("per member node joining (mean of {}; both ends in one process)", p.member_nodes),
        bytes(p.per_member_node_bytes),
    ]);
    s.tables.push(t);
    s.notes.push(
        "VmRSS deltas (pages touched, not bytes allocated), idle members: a sink's queued events come on top; a \
         source's share is mostly its 64 KiB encode buffer, allocated when the source is made."
            .into(),
    );
    s.put("probe", &p);
    Ok(s)
}
