//! A quick throughput check: one source, one sink on another node, small events, loopback.
//! `cargo run --release -p kecho --example throughput -- [events] [payload bytes] [task|history]`
//!
//! With `history` it measures the source with durability on against off in the same run (alternating, three runs
//! each) and prints the ratio.

use std::time::Instant;

use kecho::{Attrs, History, Node, Overflow, SinkOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> kecho::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let mode = args.next();
    if mode.as_deref() == Some("history") {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            off.push(run(n, size, false, History::off()).await?);
            on.push(run(n, size, false, History::events(100_000)).await?);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (off, on) = (median(&mut off), median(&mut on));
        println!(
            "history off {:.2} M events/s, on (100,000 events) {:.2} M events/s (medians of 3): {:.2}x",
            off / 1e6,
            on / 1e6,
            on / off
        );
        return Ok(());
    }
    run(n, size, mode.as_deref() == Some("task"), History::off()).await?;
    Ok(())
}

/// One run; returns events per second.
async fn run(n: u64, size: usize, task: bool, history: History) -> kecho::Result<f64> {
    let a = Node::start().await?;
    let b = Node::start().await?;
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!("tp{}", RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let ca = a.channel(&name).await?;
    let cb = b.channel(&name).await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(65536).overflow(Overflow::Block))?;
    ca.wait_for_sinks(1, std::time::Duration::from_secs(5)).await?;
    let mut src = ca.source()?;
    src.set_history(history);
    let payload = vec![0u8; size];
    let attrs = Attrs::new();
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            src.submit("e", &attrs, &payload).await?;
        }
        Ok::<(), kecho::Error>(())
    });
    // With a third argument `task`, the sink is read by a task of the runtime instead of the main thread (as in
    // `kecho bench throughput`, where every party is a task).
    let receive = async move {
        let mut last = 0;
        for _ in 0..n {
            last = sink.recv().await.expect("event").seq();
        }
        (last, sink)
    };
    let (last, sink) = if task { tokio::spawn(receive).await.expect("join") } else { receive.await };
    producer.await.expect("join")?;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(last, n);
    println!(
        "{n} events of {size} B in {secs:.3} s: {:.2} M events/s, {:.1} MB/s, lost {}",
        n as f64 / secs / 1e6,
        n as f64 * size as f64 / secs / 1e6,
        sink.dropped()
    );
    drop(sink);
    a.shutdown().await;
    b.shutdown().await;
    Ok(n as f64 / secs)
}
