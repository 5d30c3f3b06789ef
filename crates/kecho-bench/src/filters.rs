//! Filter overheads (Fig. 7).
//!
//! (a) IN-filter: a host with 8 local sinks receives events from a remote source; its IN-filter lets each event go
//! to 8, 1 or none of them. The cost is the host's CPU time per arriving event (its node runs on a runtime of its
//! own; the sinks take their events on it too, which is the paper's "handling").
//! (a') OUT-filter: a source with 8 remote sinks whose OUT-filter chooses 8, 1 or none of them; the source node's
//! CPU time per event, measured as in the submission workload.
//! (b) One filter call: native selectors, content-filter expressions and a WebAssembly module, with 8 sinks, from
//! `kecho::cost`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kecho::cost as bench;
use kecho::filter::{EventView, InDecision, InEvent, LocalSinks, OutFilter, Selector, SinkView};
use kecho::{Attrs, Node, Overflow, SinkOptions};
use serde::Serialize;

use crate::pipe::{fresh_name, sink_capacity};
use crate::report::{fmt_ns, Section, Table};
use crate::submit::{source_cost, SourceCost};
use crate::util::{count, metered_runtime};
use crate::BenchArgs;

const SIZE: usize = 100;
const SINKS: usize = 8;

#[derive(Debug, Serialize)]
struct InRow {
    delivered_to: usize,
    host_ns: f64,
    events: u64,
    delivered: u64,
    lost: u64,
}

#[derive(Debug, Serialize)]
struct OutRow {
    delivered_to: usize,
    cost: SourceCost,
}

#[derive(Debug, Serialize)]
struct CallRow {
    filter: String,
    ns: f64,
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let n = count(args, 100_000, 20);
    let warmup = count(args, 10_000, 5);
    let mut ins = Vec::new();
    for k in [8usize, 1, 0] {
        ins.push(host_cost(k, n, warmup).with_context(|| format!("IN-filter delivering to {k}"))?);
    }
    let mut outs = Vec::new();
    for k in [8usize, 1, 0] {
        let filter: Arc<dyn OutFilter> = match k {
            8 => Arc::new(Selector::all()),
            1 => Arc::new(|_: &EventView<'_>, _: &SinkView<'_>, chosen: &mut Vec<usize>| chosen.push(0)),
            _ => Arc::new(|_: &EventView<'_>, _: &SinkView<'_>, _: &mut Vec<usize>| {}),
        };
        let cost = source_cost(SIZE, SINKS, Some(filter), k as u64, n, warmup)
            .with_context(|| format!("OUT-filter choosing {k}"))?;
        outs.push(OutRow { delivered_to: k, cost });
    }
    let calls = call_costs(count(args, 200_000, 100))?;

    let mut s = Section::new("filters");
    let paper_in = ["950 us", "312 us", "a little over 200 us"];
    let paper_out = ["430 us", "156 us", "56 us"];
    let mut t = Table::new(
        "IN-filter: handling at a host with 8 local sinks (Fig. 7a, left)",
        &["IN-filter delivers to", "host CPU / event", "vs 8", "lost", "paper"],
    );
    for (r, p) in ins.iter().zip(paper_in) {
        t.row(vec![
            format!("{} of 8", r.delivered_to),
            fmt_ns(r.host_ns),
            format!("{:.2}", r.host_ns / ins[0].host_ns),
            r.lost.to_string(),
            p.into(),
        ]);
    }
    s.tables.push(t);
    let mut t = Table::new(
        "OUT-filter: submission with 8 remote sinks (Fig. 7a, right)",
        &["OUT-filter sends to", "source node CPU / event", "submit call CPU / event", "vs 8", "lost", "paper"],
    );
    for (r, p) in outs.iter().zip(paper_out) {
        t.row(vec![
            format!("{} of 8", r.delivered_to),
            fmt_ns(r.cost.node_ns),
            fmt_ns(r.cost.call_ns),
            format!("{:.2}", r.cost.node_ns / outs[0].cost.node_ns),
            r.cost.lost.to_string(),
            p.into(),
        ]);
    }
    s.tables.push(t);
    let mut t = Table::new("cost of one filter call, 8 sinks (Fig. 7b)", &["filter", "ns per call", "paper"]);
    for c in &calls {
        let paper = if c.filter.starts_with("native `all`") { "about 1 us (OUT), 0.9 us (IN)" } else { "" };
        t.row(vec![c.filter.clone(), format!("{:.1}", c.ns), paper.into()]);
    }
    s.tables.push(t);
    s.notes.push(format!(
        "{n} events of {SIZE} B per run after {warmup} of warm-up. The paper's handling also copied each event and \
         wrote a timestamp to a file; here a sink only takes the event from its queue."
    ));
    let lost: u64 = ins.iter().map(|r| r.lost).sum::<u64>() + outs.iter().map(|r| r.cost.lost).sum::<u64>();
    s.checks.push(crate::report::Check::at_most("events lost in the filter runs", lost as f64, 0.0, "events"));
    s.put("in_filter", &ins);
    s.put("out_filter", &outs);
    s.put("calls", &calls);
    Ok(s)
}

/// The host's CPU time per arriving event when its IN-filter delivers each event to `k` of its 8 sinks.
fn host_cost(k: usize, n: u64, warmup: u64) -> Result<InRow> {
    let (host_rt, host_meter) = metered_runtime(1, "bench-host")?;
    let (src_rt, _) = metered_runtime(1, "bench-source")?;
    let name = fresh_name("infilter");
    let delivered = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let (host, host_ch) = host_rt.block_on(async {
        let node = Node::start().await?;
        let ch = node.channel(&name).await?;
        let filter = move |_: &mut InEvent<'_>, _: &LocalSinks<'_>| match k {
            0 => InDecision::Drop,
            1 => InDecision::Only(vec![0]),
            _ => InDecision::Deliver,
        };
        ch.set_in_filter(Some(Arc::new(filter)));
        for _ in 0..SINKS {
            let sink = ch.sink(SinkOptions::new().capacity(sink_capacity(SIZE)).overflow(Overflow::Block))?;
            crate::pipe::spawn_counting_sink(sink, delivered.clone(), lost.clone());
        }
        Ok::<_, anyhow::Error>((node, ch))
    })?;
    let (src_node, mut src) = src_rt.block_on(async {
        let node = Node::start().await?;
        let ch = node.channel(&name).await?;
        ch.wait_for_sinks(SINKS, Duration::from_secs(10)).await?;
        Ok::<_, anyhow::Error>((node.clone(), ch.source()?))
    })?;
    // Events the host has handled: delivered (k copies each) or discarded by the IN-filter.
    let handled = || {
        if k == 0 {
            host_ch.stats().filtered
        } else {
            (delivered.load(Ordering::Relaxed) + lost.load(Ordering::Relaxed)) / k as u64
        }
    };
    let wait = |target: u64| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while handled() < target {
            if Instant::now() > deadline {
                bail!("host handled {} of {target} events", handled());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    };
    let payload = [0x5au8; SIZE];
    let attrs = Attrs::new();
    let submit = |src: &mut kecho::Source, count: u64| {
        src_rt.block_on(async {
            for _ in 0..count {
                src.submit("e", &attrs, &payload).await?;
            }
            Ok::<_, kecho::Error>(())
        })
    };
    submit(&mut src, warmup)?;
    wait(warmup)?;
    let cpu0 = host_meter.cpu_ns();
    submit(&mut src, n)?;
    wait(warmup + n)?;
    let host_ns = (host_meter.cpu_ns() - cpu0) as f64 / n as f64;
    let row = InRow {
        delivered_to: k,
        host_ns,
        events: n,
        delivered: delivered.load(Ordering::Relaxed),
        lost: lost.load(Ordering::Relaxed),
    };
    drop(src);
    drop((src_node, host, host_ch));
    src_rt.shutdown_timeout(Duration::from_secs(1));
    host_rt.shutdown_timeout(Duration::from_secs(1));
    Ok(row)
}

/// Cost of one call of each kind of filter, from the library's timing hooks.
fn call_costs(iters: u64) -> Result<Vec<CallRow>> {
    let sinks: Vec<Attrs> =
        (0..SINKS).map(|i| Attrs::new().with("load", (i * 37 % 8) as f64 / 8.0).with("zone", "a")).collect();
    let event = Attrs::new().with("session", "user-42").with("cpu", 0.9).with("zone", "a");
    let mut rows = Vec::new();
    for spec in ["all", "rr", "p2c:load", "least:load:2", "hash:session"] {
        let sel: Selector = spec.parse().map_err(|e| anyhow::anyhow!("{spec}: {e}"))?;
        rows.push(CallRow {
            filter: format!("native `{spec}`"),
            ns: bench::out_filter_ns(&sel, &sinks, &event, iters),
        });
    }
    // IN-filters: duplicate suppression over a window (KECho's "first response wins"), with one key, so that every
    // call after the first looks a duplicate up; and a rate limit that never refuses.
    let dedupe = kecho::filter::Dedupe::new("rsp", Duration::from_secs(1));
    let keyed = event.clone().with("rsp", 7i64);
    rows.push(CallRow {
        filter: "IN-filter `Dedupe(rsp)`".into(),
        ns: bench::in_filter_ns(&dedupe, &sinks, &keyed, iters),
    });
    let limit = kecho::filter::RateLimit::new(1e9, 1_000_000);
    rows.push(CallRow {
        filter: "IN-filter `RateLimit`".into(),
        ns: bench::in_filter_ns(&limit, &sinks, &event, iters),
    });
    let expr = r#"type == "load" && cpu > 0.8 && zone in ["a", "b"]"#;
    if let Some(ns) = bench::content_filter_fast_ns(expr, "load", &event, iters)? {
        rows.push(CallRow { filter: format!("expression `{expr}` (direct evaluation, used)"), ns });
    }
    let (interp, _) = bench::content_filter_ns(expr, "load", &event, (iters / 4).max(1))?;
    rows.push(CallRow { filter: "the same expression, CEL interpreter".into(), ns: interp });
    let module = include_bytes!("../../../examples/filters/round_robin.wat");
    let ns = bench::wasm_out_ns(module, &sinks, &event, (iters / 4).max(1)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    rows.push(CallRow { filter: "WebAssembly `round_robin.wat` (input encoding + call)".into(), ns });
    Ok(rows)
}
