//! What one filter call costs (the filter figures of KECho's section 5): timing functions for benchmark programs (`kecho bench filters`,
//! `examples/filter_cost.rs`). Each runs a filter in a loop on made-up sinks and returns mean nanoseconds per call.

use std::sync::Arc;
use std::time::Instant;

use kecho_proto::{Attrs, LocalId, NodeId};

#[cfg(feature = "cel")]
use crate::filter::{CelRoot, ContentFilter, FilterContext, FilterError};
use crate::filter::{EventView, InEvent, InFilter, LocalSinks, OutFilter, SinkEntry, SinkView};

fn entries(sinks: &[Attrs]) -> Vec<Arc<SinkEntry>> {
    let at = Instant::now();
    sinks
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Arc::new(SinkEntry {
                node: NodeId(i as u64 + 1),
                id: LocalId(1),
                local: false,
                attrs: a.clone(),
                updated: at,
            })
        })
        .collect()
}

/// Mean nanoseconds per call of `filter` choosing among `sinks` for an event with `attrs`.
pub fn out_filter_ns(filter: &dyn OutFilter, sinks: &[Attrs], attrs: &Attrs, iters: u64) -> f64 {
    let entries = entries(sinks);
    let view = SinkView { entries: &entries, now: Instant::now() };
    let ev = EventView { ty: "request", attrs, payload: b"" };
    let mut chosen = Vec::with_capacity(sinks.len());
    let start = Instant::now();
    for _ in 0..iters {
        chosen.clear();
        filter.select(std::hint::black_box(&ev), &view, &mut chosen);
        std::hint::black_box(&chosen);
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// Mean nanoseconds per call of an IN-filter deciding on an event with `attrs` for local sinks with `sinks`
/// attributes. The event's attributes are cloned per call, as an IN-filter may change them; that clone is timed
/// separately and subtracted.
pub fn in_filter_ns(filter: &dyn InFilter, sinks: &[Attrs], attrs: &Attrs, iters: u64) -> f64 {
    let local = LocalSinks { attrs: sinks };
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(attrs.clone());
    }
    let clone_ns = start.elapsed().as_nanos() as f64;
    let start = Instant::now();
    for _ in 0..iters {
        let mut a = attrs.clone();
        let mut ev = InEvent { ty: "response", attrs: &mut a, payload: b"" };
        std::hint::black_box(filter.filter(std::hint::black_box(&mut ev), &local));
    }
    ((start.elapsed().as_nanos() as f64 - clone_ns) / iters as f64).max(0.0)
}

#[cfg(feature = "cel")]
/// Mean nanoseconds of the direct evaluator (`None` if the expression is outside its subset).
pub fn content_filter_fast_ns(expr: &str, ty: &str, attrs: &Attrs, iters: u64) -> Result<Option<f64>, FilterError> {
    let f = ContentFilter::compile(expr)?;
    if !f.is_fast() {
        return Ok(None);
    }
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(f.fast_matches(std::hint::black_box(ty), std::hint::black_box(attrs)));
    }
    Ok(Some(start.elapsed().as_nanos() as f64 / iters as f64))
}

#[cfg(feature = "cel")]
/// Mean nanoseconds to evaluate one content filter on one event with the CEL interpreter, as the submit path does
/// (the event's variables are built once per event and shared by all sinks; this counts them for a single sink).
pub fn content_filter_ns(expr: &str, ty: &str, attrs: &Attrs, iters: u64) -> Result<(f64, f64), FilterError> {
    let f = ContentFilter::compile(expr)?;
    let root = CelRoot::default();
    let start = Instant::now();
    for _ in 0..iters {
        let ctx = FilterContext::new(&root, ty, attrs);
        std::hint::black_box(f.matches_in(&ctx));
    }
    let with_context = start.elapsed().as_nanos() as f64 / iters as f64;
    let ctx = FilterContext::new(&root, ty, attrs);
    let start = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(f.matches_in(std::hint::black_box(&ctx)));
    }
    let eval_only = start.elapsed().as_nanos() as f64 / iters as f64;
    Ok((with_context, eval_only))
}

#[cfg(feature = "wasm")]
/// Mean nanoseconds per call of a sandboxed OUT-filter module.
pub fn wasm_out_ns(module: &[u8], sinks: &[Attrs], attrs: &Attrs, iters: u64) -> Result<f64, crate::wasm::WasmError> {
    let f = crate::wasm::WasmFilter::new(
        kecho_proto::codec::FilterKind::Out,
        module,
        crate::wasm::WasmLimits::default(),
        Box::new(|_| {}),
    )?;
    let out = crate::wasm::WasmOut(Arc::new(f));
    Ok(out_filter_ns(&out, sinks, attrs, iters))
}
