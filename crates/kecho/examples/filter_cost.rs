//! Cost of one filter call: native selectors, CEL content filters and sandboxed WebAssembly, with 8 sinks.
//! `cargo run --release -p kecho --example filter_cost`

use kecho::cost as bench;
use kecho::filter::Selector;
use kecho::Attrs;

fn main() {
    let iters = 200_000;
    let sinks: Vec<Attrs> =
        (0..8).map(|i| Attrs::new().with("load", f64::from(i * 37 % 8) / 8.0).with("zone", "a")).collect();
    let event = Attrs::new().with("session", "user-42").with("cpu", 0.9).with("zone", "a");
    println!("| filter | ns per call (8 sinks) |");
    println!("|---|---|");
    for spec in ["all", "rr", "random", "weighted:load", "hash:session", "least:load:2", "p2c:load"] {
        let sel: Selector = spec.parse().expect("spec");
        println!("| native `{spec}` | {:.1} |", bench::out_filter_ns(&sel, &sinks, &event, iters));
    }
    let expr = r#"type == "load" && cpu > 0.8 && zone in ["a", "b"]"#;
    let (full, eval) = bench::content_filter_ns(expr, "load", &event, iters / 4).expect("expression");
    let fast = bench::content_filter_fast_ns(expr, "load", &event, iters).expect("expression").expect("fast subset");
    println!("| content filter `{expr}`, direct evaluation (used) | {fast:.1} |");
    println!("| the same with the CEL interpreter: variables + evaluation | {full:.1} |");
    println!("| the same with the CEL interpreter, evaluation only | {eval:.1} |");
    let rr = include_bytes!("../../../examples/filters/round_robin.wat");
    println!(
        "| WebAssembly `round_robin.wat` | {:.1} |",
        bench::wasm_out_ns(rr, &sinks, &event, iters / 4).expect("module")
    );
}
