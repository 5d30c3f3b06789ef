//! Event submission cost at the source (Fig. 6): CPU time per event for 100 B and 1 KB payloads with 1, 2, 4 and 8
//! sinks, each on its own node.
//!
//! The source node runs on a runtime of its own (one worker) and events are submitted from the thread that drives
//! it, so the source's cost is the CPU time of exactly those two threads, read from the kernel's per-thread
//! accounting: the submit calls themselves ("submit call") and everything else the node does for them, chiefly the
//! link writer's system calls ("source node"). The sinks run on another runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kecho::filter::OutFilter;
use kecho::{Attrs, Node, Overflow, SinkOptions};
use serde::Serialize;

use crate::pipe::{fresh_name, sink_capacity};
use crate::report::{fmt_ns, fmt_ratio, Check, Section, Table};
use crate::util::{count, metered_runtime, self_cpu_ns};
use crate::BenchArgs;

/// What one source-cost run measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SourceCost {
    /// Events measured (after the warm-up).
    pub events: u64,
    /// CPU ns per event of the whole source node (submitting thread and the node's worker).
    pub node_ns: f64,
    /// CPU ns per event of the submit calls alone.
    pub call_ns: f64,
    /// Wall-clock ns per event from the first submit to the last delivery.
    pub wall_ns: f64,
    /// Events delivered over all sinks.
    pub delivered: u64,
    /// Events the sinks should have got.
    pub expected: u64,
    /// Events lost.
    pub lost: u64,
}

/// Measures the source's cost with `sinks` remote sinks (each on its own node). `per_event` is how many sinks get
/// each event (all of them unless an OUT-filter chooses fewer).
pub fn source_cost(
    size: usize,
    sinks: usize,
    out_filter: Option<Arc<dyn OutFilter>>,
    per_event: u64,
    n: u64,
    warmup: u64,
) -> Result<SourceCost> {
    let (src_rt, src_meter) = metered_runtime(1, "bench-source")?;
    let (sink_rt, _) = metered_runtime(1, "bench-sinks")?;
    let name = fresh_name("submit");
    let delivered = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let sink_nodes = sink_rt.block_on(async {
        let mut nodes = Vec::new();
        for _ in 0..sinks {
            let node = Node::start().await?;
            let ch = node.channel(&name).await?;
            let sink = ch.sink(SinkOptions::new().capacity(sink_capacity(size)).overflow(Overflow::Block))?;
            crate::pipe::spawn_counting_sink(sink, delivered.clone(), lost.clone());
            nodes.push(node);
        }
        Ok::<_, anyhow::Error>(nodes)
    })?;
    let (src_node, mut src) = src_rt.block_on(async {
        let node = Node::start().await?;
        let ch = node.channel(&name).await?;
        ch.wait_for_sinks(sinks, Duration::from_secs(10)).await?;
        let mut src = ch.source()?;
        src.set_out_filter(out_filter);
        Ok::<_, anyhow::Error>((node, src))
    })?;
    let payload = vec![0x5au8; size];
    let attrs = Attrs::new();
    let wait_delivered = |target: u64| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while delivered.load(Ordering::Relaxed) + lost.load(Ordering::Relaxed) < target {
            if Instant::now() > deadline {
                bail!("sinks got {} of {target} events", delivered.load(Ordering::Relaxed));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    };
    src_rt.block_on(async {
        for _ in 0..warmup {
            src.submit("e", &attrs, &payload).await?;
        }
        Ok::<_, kecho::Error>(())
    })?;
    wait_delivered(warmup * per_event)?;

    let node0 = src_meter.cpu_ns();
    let (call0, t0) = (self_cpu_ns(), Instant::now());
    src_rt.block_on(async {
        for _ in 0..n {
            src.submit("e", &attrs, &payload).await?;
        }
        Ok::<_, kecho::Error>(())
    })?;
    let call = self_cpu_ns() - call0;
    let expected = (warmup + n) * per_event;
    wait_delivered(expected)?;
    let wall = t0.elapsed();
    let node = call + (src_meter.cpu_ns() - node0);
    let out = SourceCost {
        events: n,
        node_ns: node as f64 / n as f64,
        call_ns: call as f64 / n as f64,
        wall_ns: wall.as_nanos() as f64 / n as f64,
        delivered: delivered.load(Ordering::Relaxed) - warmup * per_event,
        expected: n * per_event,
        lost: lost.load(Ordering::Relaxed),
    };
    drop(src);
    drop(src_node);
    drop(sink_nodes);
    src_rt.shutdown_timeout(Duration::from_secs(1));
    sink_rt.shutdown_timeout(Duration::from_secs(1));
    Ok(out)
}

#[derive(Debug, Serialize)]
struct Row {
    size: usize,
    sinks: usize,
    cost: SourceCost,
    /// The raw TCP floor: CPU ns per message of one thread writing it to this many sockets (NaN with --no-peers).
    raw_ns: f64,
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let n = count(args, 200_000, 20);
    let warmup = count(args, 20_000, 5);
    let mut rows = Vec::new();
    for size in [100, 1024] {
        for sinks in [1, 2, 4, 8] {
            let cost = source_cost(size, sinks, None, sinks as u64, n, warmup)
                .with_context(|| format!("{size} B to {sinks} sinks"))?;
            let raw_ns = if args.no_peers {
                f64::NAN
            } else {
                crate::rawtcp::source_cost(size, sinks, n).with_context(|| format!("raw TCP {size} B to {sinks}"))?
            };
            rows.push(Row { size, sinks, cost, raw_ns });
        }
    }
    let mut s = Section::new("submit");
    let mut t = Table::new(
        "event submission cost at the source (Fig. 6)",
        &[
            "payload",
            "sinks",
            "source node CPU / event",
            "submit call CPU / event",
            "wall / event",
            "node CPU vs 1 sink",
            "raw TCP writer CPU / message",
            "raw TCP vs 1 socket",
            "lost",
        ],
    );
    for r in &rows {
        let first = rows.iter().find(|x| x.size == r.size && x.sinks == 1);
        let one = first.map(|x| x.cost.node_ns).unwrap_or(f64::NAN);
        let raw_one = first.map(|x| x.raw_ns).unwrap_or(f64::NAN);
        t.row(vec![
            format!("{} B", r.size),
            r.sinks.to_string(),
            fmt_ns(r.cost.node_ns),
            fmt_ns(r.cost.call_ns),
            fmt_ns(r.cost.wall_ns),
            fmt_ratio(r.cost.node_ns / one),
            fmt_ns(r.raw_ns),
            fmt_ratio(r.raw_ns / raw_one),
            r.cost.lost.to_string(),
        ]);
    }
    s.tables.push(t);
    s.notes.push(format!(
        "{n} events per run after {warmup} of warm-up; sinks on other nodes (Block policy). Paper (Table 1): 95 us per \
         event for KECho-UL, 85 us for KECho-KL, about 100 us per subscriber for ECho."
    ));
    for size in [100, 1024] {
        let cost = |k| rows.iter().find(|x| x.size == size && x.sinks == k).map(|x| x.cost.node_ns);
        if let (Some(one), Some(eight)) = (cost(1), cost(8)) {
            s.checks.push(Check::at_most(format!("source cost 8 sinks / 1 sink, {size} B"), eight / one, 3.0, "x"));
        }
    }
    let lost: u64 = rows.iter().map(|r| r.cost.lost + r.cost.expected.saturating_sub(r.cost.delivered)).sum();
    s.checks.push(Check::at_most("events lost in the submission runs", lost as f64, 0.0, "events"));
    s.put("rows", &rows);
    Ok(s)
}
