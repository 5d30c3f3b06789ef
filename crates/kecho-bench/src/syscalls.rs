//! System calls per event under sustained load (Table 1: KECho-UL needed 2 per event).
//!
//! The measured side (the source node, then the sink node) runs in a child process under a tracer; its peer runs in
//! this process. Each side runs twice, with N events and with none, and the difference divided by N is the marginal
//! count per event: start-up, joining, leaving and heartbeats cancel out. Two tracers when available: `perf stat`
//! counts in the kernel without slowing the process, `strace -c -f` stops it at every call (so writes coalesce more
//! than they would) but names the calls.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Node, Overflow, RecvError, SinkOptions};
use serde::Serialize;

use crate::child::{Counts, Traced, Tracer};
use crate::pipe::fresh_name;
use crate::report::{fmt_num, Check, Section, Table};
use crate::util::{count, runtime, start_registry};
use crate::BenchArgs;

const SIZE: usize = 100;

#[derive(Debug, Serialize)]
struct Row {
    tracer: Tracer,
    side: &'static str,
    events: u64,
    with_events: Counts,
    without: Counts,
    per_event: f64,
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let n = count(args, 200_000, 100);
    let mut s = Section::new("syscalls");
    let tracers: Vec<Tracer> = [Tracer::Perf, Tracer::Strace].into_iter().filter(|t| t.available()).collect();
    if tracers.is_empty() {
        s.notes.push("neither perf nor strace is usable here: system calls not counted".into());
        return Ok(s);
    }
    let rt = runtime()?;
    let (addr, reg) = rt.block_on(start_registry())?;
    let mut rows = Vec::new();
    for &tracer in &tracers {
        for side in ["source", "sink"] {
            let mut runs = Vec::new();
            for events in [n, 0] {
                let counts = measure(args, &rt, addr, tracer, side, events)
                    .with_context(|| format!("{} {side} with {events} events", tracer.name()))?;
                runs.push(counts);
            }
            let without = runs.pop().unwrap_or_default();
            let with_events = runs.pop().unwrap_or_default();
            let per_event = (with_events.total as f64 - without.total as f64).max(0.0) / n as f64;
            rows.push(Row { tracer, side, events: n, with_events, without, per_event });
        }
    }
    rt.block_on(reg.shutdown());
    let mut t = Table::new(
        "system calls per event under sustained load (100 B, one source node, one sink node)",
        &[
            "counted with",
            "side",
            "events",
            "calls (N events)",
            "calls (no events)",
            "per event",
            "most frequent (per event)",
            "paper (KECho-UL)",
        ],
    );
    for r in &rows {
        // The calls that grew most with the events (strace names them; perf only counts).
        let mut marginal: Vec<(&str, u64)> = r
            .with_events
            .by_name
            .iter()
            .map(|(name, c)| {
                let base = r.without.by_name.iter().find(|(b, _)| b == name).map(|x| x.1).unwrap_or(0);
                (name.as_str(), c.saturating_sub(base))
            })
            .collect();
        marginal.sort_by_key(|x| std::cmp::Reverse(x.1));
        let top: Vec<String> = marginal
            .iter()
            .take(4)
            .map(|(name, c)| format!("{name} {}", fmt_num(*c as f64 / r.events as f64)))
            .collect();
        t.row(vec![
            r.tracer.name().into(),
            r.side.into(),
            r.events.to_string(),
            r.with_events.total.to_string(),
            r.without.total.to_string(),
            format!("{:.4}", r.per_event),
            top.join(", "),
            "2 per event".into(),
        ]);
    }
    s.tables.push(t);
    // perf is the undisturbed count; strace's stops change the batching, so it only stands in when perf cannot run.
    let best = rows.first().map(|r| r.tracer);
    for r in rows.iter().filter(|r| Some(r.tracer) == best) {
        s.checks.push(Check::at_most(format!("system calls per event, {} side", r.side), r.per_event, 0.05, "calls"));
    }
    s.put("rows", &rows);
    Ok(s)
}

/// One child run: the measured side in the child, its peer here.
fn measure(
    args: &BenchArgs,
    rt: &tokio::runtime::Runtime,
    registry: std::net::SocketAddr,
    tracer: Tracer,
    side: &str,
    events: u64,
) -> Result<Counts> {
    let timeout = Duration::from_secs(args.child_timeout);
    // Sinks and sources are made and dropped out here; they expect to be inside the runtime.
    let _in_rt = rt.enter();
    let name = fresh_name("sys");
    let out = std::env::temp_dir().join(format!("{name}.trace"));
    let (node, ch) = rt.block_on(async {
        let node = Node::builder().registry(registry).start().await?;
        let ch = node.create_channel(&name).await?;
        Ok::<_, anyhow::Error>((node, ch))
    })?;
    let result = if side == "source" {
        let mut sink = ch.sink(SinkOptions::new().capacity(65_536).overflow(Overflow::Block))?;
        let role = format!("source,{registry},{name},{events},{SIZE}");
        let mut child = Traced::spawn(args, &role, tracer, out)?;
        let got = rt.block_on(async {
            let mut got = 0u64;
            while got < events {
                match tokio::time::timeout(timeout, sink.recv()).await {
                    Ok(Ok(_)) => got += 1,
                    Ok(Err(RecvError::Lagged(k))) => bail!("{k} events lost"),
                    Ok(Err(e)) => bail!("sink: {e}"),
                    Err(_) => bail!("only {got} of {events} events arrived"),
                }
            }
            Ok(got)
        });
        child.close_stdin();
        let counts = child.finish(timeout);
        got?;
        counts
    } else {
        let role = format!("sink,{registry},{name},{events}");
        let mut child = Traced::spawn(args, &role, tracer, out)?;
        let ready = child.read_line()?;
        if ready != "ready" {
            bail!("sink child said {ready:?}");
        }
        if events > 0 {
            rt.block_on(async {
                ch.wait_for_sinks(1, Duration::from_secs(10)).await?;
                let mut src = ch.source()?;
                let payload = [0x5au8; SIZE];
                let attrs = Attrs::new();
                for _ in 0..events {
                    src.submit("e", &attrs, &payload).await?;
                }
                Ok::<_, anyhow::Error>(())
            })?;
        }
        let line = child.read_line()?;
        let counts = child.finish(timeout)?;
        if line != format!("received {events} lost 0") {
            bail!("sink child: {line}");
        }
        Ok(counts)
    };
    rt.block_on(node.shutdown());
    result
}
