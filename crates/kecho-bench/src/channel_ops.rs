//! Channel creation and opening (Table 1).
//!
//! Both go through a registry server on loopback TCP, as a deployment would (KECho's group server was a separate
//! process too); creation is also measured with the in-process registry, which shows what the round trip costs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kecho::{Node, RegistryClient, SinkOptions};
use serde::Serialize;

use crate::pipe::fresh_name;
use crate::report::{fmt_ns, Check, Section, Table};
use crate::util::{count, histogram, runtime, start_registry, Summary};
use crate::BenchArgs;

#[derive(Debug, Serialize)]
struct CreateRow {
    registry: &'static str,
    summary: Summary,
}

pub fn create(args: &BenchArgs) -> Result<Section> {
    let n = count(args, 300, 5);
    let rt = runtime()?;
    let rows = rt.block_on(async {
        let (addr, reg) = start_registry().await?;
        let mut rows = Vec::new();
        for (label, client) in
            [("TCP (loopback)", RegistryClient::remote(addr)), ("in-process", RegistryClient::in_process_private())]
        {
            let node = Node::builder().registry_client(client).start().await?;
            let mut h = histogram();
            let mut keep = Vec::new();
            for _ in 0..n {
                let name = fresh_name("create");
                let t0 = Instant::now();
                let ch = node.create_channel(&name).await?;
                h.saturating_record(t0.elapsed().as_nanos() as u64);
                keep.push(ch);
            }
            rows.push(CreateRow { registry: label, summary: Summary::of(&h) });
            node.shutdown().await;
        }
        reg.shutdown().await;
        Ok::<_, anyhow::Error>(rows)
    })?;
    let mut s = Section::new("create");
    let mut t =
        Table::new("channel creation (Table 1)", &["registry", "p50", "mean", "p99", "max", "paper (KECho-UL)"]);
    for r in &rows {
        t.row(vec![
            r.registry.into(),
            fmt_ns(r.summary.p50),
            fmt_ns(r.summary.mean),
            fmt_ns(r.summary.p99),
            fmt_ns(r.summary.max),
            "182 us (5 system calls)".into(),
        ]);
    }
    s.tables.push(t);
    s.notes.push(format!("{n} channels created one after another on one node; each stays open."));
    if let Some(r) = rows.first() {
        s.checks.push(Check::at_most("channel creation p50 (TCP registry)", r.summary.p50 / 1e3, 100.0, "us"));
    }
    s.put("rows", &rows);
    Ok(s)
}

#[derive(Debug, Serialize)]
struct OpenRow {
    members: usize,
    /// `open_channel` returned: the contact answered and the member list is known.
    open: Summary,
    /// Until the newcomer knows every member's sinks (it can send to all of them).
    ready: Summary,
}

pub fn open(args: &BenchArgs) -> Result<Section> {
    let reps = count(args, 30, 3);
    let rt = runtime()?;
    let rows = rt.block_on(async {
        let (addr, reg) = start_registry().await?;
        let mut rows = Vec::new();
        for members in [1usize, 2, 4, 8, 16] {
            let row = tokio::time::timeout(Duration::from_secs(120), open_with(addr, members, reps))
                .await
                .with_context(|| format!("open with {members} members timed out"))??;
            rows.push(row);
        }
        reg.shutdown().await;
        Ok::<_, anyhow::Error>(rows)
    })?;
    let mut s = Section::new("open");
    let mut t = Table::new(
        "channel open (join) with existing members (Table 1)",
        &["members", "open p50", "open max", "all members known p50", "all members known max", "paper"],
    );
    for r in &rows {
        t.row(vec![
            r.members.to_string(),
            fmt_ns(r.open.p50),
            fmt_ns(r.open.max),
            fmt_ns(r.ready.p50),
            fmt_ns(r.ready.max),
            "about 1.5 s (5 system calls)".into(),
        ]);
    }
    s.tables.push(t);
    s.notes.push(format!(
        "{reps} joins per row, each by a fresh node (so it dials every member), registry on loopback TCP; each \
         member is a node of its own with one sink."
    ));
    if let Some(r) = rows.iter().find(|r| r.members == 8) {
        s.checks.push(Check::at_most("channel open with 8 members p50 (all known)", r.ready.p50 / 1e6, 5.0, "ms"));
    }
    s.put("rows", &rows);
    Ok(s)
}

async fn open_with(registry: std::net::SocketAddr, members: usize, reps: u64) -> Result<OpenRow> {
    let name = fresh_name("open");
    let mut existing = Vec::new();
    for _ in 0..members {
        let node = Node::builder().registry(registry).start().await?;
        let ch = node.channel(&name).await?;
        let sink = ch.sink(SinkOptions::new())?;
        existing.push((node, ch, sink));
    }
    for (_, ch, _) in &existing {
        ch.wait_for_sinks(members, Duration::from_secs(10)).await?;
    }
    let (mut open, mut ready) = (histogram(), histogram());
    for _ in 0..reps {
        let node = Node::builder().registry(registry).start().await?;
        let t0 = Instant::now();
        let ch = node.open_channel(&name).await?;
        open.saturating_record(t0.elapsed().as_nanos() as u64);
        ch.wait_for_sinks(members, Duration::from_secs(10)).await?;
        ready.saturating_record(t0.elapsed().as_nanos() as u64);
        ch.close().await;
        node.shutdown().await;
    }
    for (node, ch, _) in &existing {
        ch.close().await;
        node.shutdown().await;
    }
    Ok(OpenRow { members, open: Summary::of(&open), ready: Summary::of(&ready) })
}
