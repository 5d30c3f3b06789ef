//! A quick throughput check: one source, one sink on another node, small events, loopback.
//! `cargo run --release -p kecho --example throughput -- [events] [payload bytes]`

use std::time::Instant;

use kecho::{Attrs, Node, Overflow, SinkOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> kecho::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let a = Node::start().await?;
    let b = Node::start().await?;
    let ca = a.channel("tp").await?;
    let cb = b.channel("tp").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(65536).overflow(Overflow::Block))?;
    ca.wait_for_sinks(1, std::time::Duration::from_secs(5)).await?;
    let mut src = ca.source()?;
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
    let (last, sink) =
        if args.next().as_deref() == Some("task") { tokio::spawn(receive).await.expect("join") } else { receive.await };
    producer.await.expect("join")?;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(last, n);
    println!(
        "{n} events of {size} B in {secs:.3} s: {:.2} M events/s, {:.1} MB/s, lost {}",
        n as f64 / secs / 1e6,
        n as f64 * size as f64 / secs / 1e6,
        sink.dropped()
    );
    Ok(())
}
