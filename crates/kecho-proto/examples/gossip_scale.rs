//! Runs the gossip simulation (`tests/gossip/mod.rs`) at 1,000 to 10,000 members and prints the figures of
//! docs/SCALE.md: `cargo run -p kecho-proto --release --example gossip_scale [SEED]`.

#[path = "../tests/gossip/mod.rs"]
mod gossip;

fn main() {
    let seed = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    println!(
        "| members | join of the last (ms) | storm of 100 (ms) | links max / mean | copies per event per member | \
         delivered (steady) | delivered after 30 % killed | reported lost | neither | rejoins | membership msgs per join |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in [1_000, 2_000, 5_000, 10_000] {
        let f = gossip::run(n, seed);
        println!(
            "| {} | {} | {} | {} / {:.1} | {:.3} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {} |",
            f.n,
            f.join_last_ms,
            f.storm_ms,
            f.links_max,
            f.links_mean,
            f.copies_per_event,
            f.delivered_steady,
            f.delivered_after_kill,
            f.reported_after_kill,
            (1.0 - f.delivered_after_kill - f.reported_after_kill).max(0.0),
            f.rejoins,
            f.msgs_per_join
        );
    }
}
