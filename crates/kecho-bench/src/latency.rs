//! Delivery latency: ping-pong (round trip / 2) and one-way (timestamp in the payload; sender and receiver share the
//! process clock), back-to-back (one message in flight) and paced at 1 kHz (the receiver sleeps between messages, so
//! this includes its wake-up), 100 B and 1 KB, for every system of the run.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::pipe::{oneway, pingpong};
use crate::report::{fmt_ns, fmt_ratio, Check, Section, Table};
use crate::systems::{System, Systems};
use crate::util::{cdf_points, count, runtime, Summary};
use crate::BenchArgs;

const SIZES: [usize; 2] = [100, 1024];
const MODES: [&str; 3] = ["rtt/2", "one-way", "one-way 1 kHz"];
const ROUNDS: u64 = 4;

#[derive(Debug, Serialize)]
struct Row {
    system: &'static str,
    size: usize,
    mode: &'static str,
    summary: Summary,
    /// CDF points (ns, fraction) for the plots.
    cdf: Vec<(f64, f64)>,
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let rt = runtime()?;
    let n = count(args, 20_000, 20);
    let paced_n = count(args, 3_000, 10);
    let warmup = count(args, 1_000, 5);
    let rows = rt.block_on(async {
        let systems = Systems::start(args).await;
        // The systems take turns in short rounds, so that a burst of other work on the machine hits them all alike
        // instead of whichever happened to run at that moment; each cell merges its rounds.
        let mut cells: Vec<(System, usize, &'static str, hdrhistogram::Histogram<u64>)> = Vec::new();
        for round in 0..ROUNDS {
            for &size in &SIZES {
                for &sys in &systems.list {
                    for mode in MODES {
                        // The paced runs are bounded by the clock (1 ms per message): one round is enough.
                        if mode == "one-way 1 kHz" && round > 0 {
                            continue;
                        }
                        let per_round = if mode == "one-way 1 kHz" { paced_n } else { n.div_ceil(ROUNDS) };
                        let h = measure(&systems, sys, mode, size, per_round, warmup)
                            .await
                            .with_context(|| format!("{} {mode} {size} B", sys.name()))?;
                        match cells.iter_mut().find(|c| c.0 == sys && c.1 == size && c.2 == mode) {
                            Some(c) => c.3.add(&h).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?,
                            None => cells.push((sys, size, mode, h)),
                        }
                    }
                }
            }
        }
        let rows: Vec<Row> = cells
            .iter()
            .map(|(sys, size, mode, h)| Row {
                system: sys.name(),
                size: *size,
                mode,
                summary: Summary::of(h),
                cdf: cdf_points(h),
            })
            .collect();
        let notes = systems.notes.clone();
        systems.stop().await;
        Ok::<_, anyhow::Error>((rows, notes))
    })?;
    let (rows, notes) = rows;
    let mut s = Section::new("latency");
    s.notes = notes;
    s.notes.push(format!(
        "{n} messages per back-to-back cell in {ROUNDS} rounds taken in turn by the systems, {paced_n} per paced \
         cell; {warmup} messages before each round not recorded."
    ));
    let floor = |size: usize, mode: &str| {
        rows.iter().find(|r| r.system == "raw TCP" && r.size == size && r.mode == mode).map(|r| r.summary.p50)
    };
    let mut t =
        Table::new("delivery latency", &["system", "size", "mode", "p50", "p99", "p99.9", "max", "p50 / raw TCP p50"]);
    for r in &rows {
        let ratio = floor(r.size, r.mode).map(|f| r.summary.p50 / f).unwrap_or(f64::NAN);
        t.row(vec![
            r.system.into(),
            format!("{} B", r.size),
            r.mode.into(),
            fmt_ns(r.summary.p50),
            fmt_ns(r.summary.p99),
            fmt_ns(r.summary.p999),
            fmt_ns(r.summary.max),
            fmt_ratio(ratio),
        ]);
    }
    s.tables.push(t);
    for &size in &SIZES {
        let p50 = |sys: &str| {
            rows.iter().find(|r| r.system == sys && r.size == size && r.mode == "one-way").map(|r| r.summary.p50)
        };
        if let (Some(k), Some(raw)) = (p50("kecho"), p50("raw TCP")) {
            s.checks.push(Check::at_most(format!("one-way p50 {size} B / raw TCP"), k / raw, 1.5, "x"));
        }
        if let (Some(k), Some(z)) = (p50("kecho"), p50("Zenoh")) {
            s.checks.push(Check::at_most(format!("one-way p50 {size} B / Zenoh"), k / z, 0.35, "x"));
        }
    }
    s.put("rows", &rows);
    Ok(s)
}

async fn measure(
    systems: &Systems,
    sys: System,
    mode: &str,
    size: usize,
    n: u64,
    warmup: u64,
) -> Result<hdrhistogram::Histogram<u64>> {
    let (a_tx, a_rx, b_tx, b_rx) = systems.pair(sys).await?;
    let bound = Duration::from_secs(120);
    let run = async {
        match mode {
            "rtt/2" => pingpong(a_tx, a_rx, b_tx, b_rx, size, n, warmup).await,
            "one-way" => oneway(a_tx, b_rx, size, n, warmup, None).await,
            _ => oneway(a_tx, b_rx, size, n, warmup.min(n), Some(Duration::from_millis(1))).await,
        }
    };
    tokio::time::timeout(bound, run).await.context("timed out")?
}
