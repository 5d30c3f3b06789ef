//! Throughput: events/s and MB/s for 1->1, 1->8 (fan-out) and 8->1 (fan-in), 100 B, 1 KB and 64 KB, with the loss
//! count, for every system of the run. kecho's sinks use the Block policy, so it must lose nothing.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::pipe::stream;
use crate::report::{fmt_num, fmt_ratio, Check, Section, Table};
use crate::systems::Systems;
use crate::util::{count, runtime};
use crate::BenchArgs;

const SIZES: [usize; 3] = [100, 1024, 64 * 1024];
const SHAPES: [(&str, usize, usize); 3] = [("1->1", 1, 1), ("1->8", 1, 8), ("8->1", 8, 1)];

#[derive(Debug, Serialize)]
struct Row {
    system: &'static str,
    shape: &'static str,
    size: usize,
    /// Events each source submitted.
    per_source: u64,
    /// Events delivered (over all sinks) per second.
    delivered_per_sec: f64,
    /// Payload megabytes delivered per second.
    mb_per_sec: f64,
    received: u64,
    expected: u64,
    lost: u64,
    secs: f64,
}

/// Events per source: 100 MB of payload for 100 B, 300 MB for 1 KB, 500 MB for 64 KB (before `--scale`).
fn events(args: &BenchArgs, size: usize, sources: usize, sinks: usize) -> u64 {
    let base: u64 = match size {
        s if s <= 128 => 1_000_000,
        s if s <= 2048 => 300_000,
        _ => 8_000,
    };
    // Fan-out and fan-in deliver each source's events to 8 sinks or from 8 sources: a quarter per source keeps the
    // deliveries per run at twice the 1->1 figure.
    let per_source = if sources * sinks > 1 { base / 4 } else { base };
    count(args, per_source, 10)
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let rt = runtime()?;
    let (rows, notes) = rt.block_on(async {
        let systems = Systems::start(args).await;
        let mut rows = Vec::new();
        for &size in &SIZES {
            for (shape, sources, sinks) in SHAPES {
                for &sys in &systems.list {
                    let n = events(args, size, sources, sinks);
                    let (txs, rxs, per) = systems
                        .topology(sys, sources, sinks, size)
                        .await
                        .with_context(|| format!("{} {shape} setup", sys.name()))?;
                    let per_rx = per * n;
                    // kecho reports every loss at once; the peers may lose silently, so an idle receiver stops.
                    let idle = Duration::from_secs(10);
                    let run = stream(txs, rxs, size, n, per_rx, idle);
                    let r = tokio::time::timeout(Duration::from_secs(300), run)
                        .await
                        .with_context(|| format!("{} {shape} {size} B timed out", sys.name()))??;
                    rows.push(Row {
                        system: sys.name(),
                        shape,
                        size,
                        per_source: n,
                        delivered_per_sec: r.received as f64 / r.secs,
                        mb_per_sec: r.received as f64 * size as f64 / r.secs / 1e6,
                        received: r.received,
                        expected: r.expected,
                        lost: r.lost,
                        secs: r.secs,
                    });
                }
            }
        }
        let notes = systems.notes.clone();
        systems.stop().await;
        Ok::<_, anyhow::Error>((rows, notes))
    })?;
    let mut s = Section::new("throughput");
    s.notes = notes;
    s.notes
        .push("events/s counts deliveries (a 1->8 event delivered to 8 sinks counts 8); MB/s is payload only.".into());
    let floor = |shape: &str, size: usize| {
        rows.iter().find(|r| r.system == "raw TCP" && r.shape == shape && r.size == size).map(|r| r.delivered_per_sec)
    };
    let mut t =
        Table::new("throughput", &["system", "shape", "size", "events/s", "MB/s", "lost", "/ raw TCP", "events"]);
    for r in &rows {
        let ratio = floor(r.shape, r.size).map(|f| r.delivered_per_sec / f).unwrap_or(f64::NAN);
        t.row(vec![
            r.system.into(),
            r.shape.into(),
            size_label(r.size),
            fmt_num(r.delivered_per_sec),
            fmt_num(r.mb_per_sec),
            r.lost.to_string(),
            fmt_ratio(ratio),
            r.expected.to_string(),
        ]);
    }
    s.tables.push(t);
    let kecho_lost: u64 = rows.iter().filter(|r| r.system == "kecho").map(|r| r.lost).sum();
    s.checks.push(Check::at_most("kecho events lost (all shapes and sizes)", kecho_lost as f64, 0.0, "events"));
    let rate = |sys: &str| {
        rows.iter().find(|r| r.system == sys && r.shape == "1->1" && r.size == 100).map(|r| r.delivered_per_sec)
    };
    if let Some(k) = rate("kecho") {
        s.checks.push(Check::at_least("kecho 100 B 1->1 events/s", k, 5e6, "events/s"));
        if let Some(z) = rate("Zenoh") {
            s.checks.push(Check::at_least("kecho 100 B 1->1 / Zenoh", k / z, 1.0, "x"));
        }
    }
    s.put("rows", &rows);
    Ok(s)
}

/// "100 B", "1 KB", "64 KB".
pub fn size_label(size: usize) -> String {
    if size >= 1024 {
        format!("{} KB", size / 1024)
    } else {
        format!("{size} B")
    }
}
