//! How long the first prioritised event on a busy TCP link takes: a source streams 64 KiB events of the default
//! priority to a Block sink on another node, read at a paced rate (about 25 MB/s) so that the link's outbox and its
//! sockets fill up, then submits one event of the highest priority and the other node times its arrival.
//! `cargo run --release -p kecho --example first_urgent -- [rounds] [same|apart]`, a fresh pair of nodes per round.
//! `same` (the default): the bulk source submits the urgent event too, which then keeps its place behind the source's
//! own bulk events (a source's order holds across priorities). `apart`: a second source of the same node submits it,
//! so that it can overtake the bulk backlog.

use std::time::{Duration, Instant};

use kecho::{Attrs, EventOptions, Node, Overflow, Priority, RegistryClient, SinkOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> kecho::Result<()> {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let apart = std::env::args().nth(2).is_some_and(|m| m == "apart");
    let mut ms = Vec::new();
    for _ in 0..rounds {
        let reg = RegistryClient::in_process_private();
        let a = Node::builder().registry_client(reg.clone()).start().await?;
        let b = Node::builder().registry_client(reg.clone()).start().await?;
        let ch_b = b.channel("busy").await?;
        let mut bulk = ch_b.sink(SinkOptions::new().types(["bulk"]).overflow(Overflow::Block).capacity(16))?;
        let mut urgent = ch_b.sink(SinkOptions::new().types(["urgent"]))?;
        let ch_a = a.channel("busy").await?;
        ch_a.wait_for_sinks(2, Duration::from_secs(10)).await?;
        let reader = tokio::spawn(async move {
            // 64 KiB every 2.6 ms: about 25 MB/s.
            let mut next = tokio::time::Instant::now();
            while bulk.recv().await.is_ok() {
                next += Duration::from_micros(2600);
                tokio::time::sleep_until(next).await;
            }
        });
        let mut src = ch_a.source()?;
        let mut other = if apart { Some(ch_a.source()?) } else { None };
        let payload = vec![0u8; 64 << 10];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            src.submit("bulk", &Attrs::new(), &payload).await?;
        }
        let queued = a.link_stats().iter().map(|l| l.queued_bytes).sum::<usize>();
        let sent = Instant::now();
        let urgent_src = other.as_mut().unwrap_or(&mut src);
        urgent_src
            .submit_with("urgent", &Attrs::new(), b"now", EventOptions::new().priority(Priority::HIGHEST))
            .await?;
        let submitted = sent.elapsed();
        let got = tokio::time::timeout(Duration::from_secs(30), urgent.recv()).await;
        let took = sent.elapsed();
        if got.is_err() {
            eprintln!("no urgent event within 30 s");
        }
        let apart_now = a.link_stats().iter().any(|l| l.urgent_apart);
        println!(
            "first urgent event: {:.1} ms (submit {:.1} ms; outbox held {} KiB; urgent connection in use after it: \
             {apart_now})",
            took.as_secs_f64() * 1e3,
            submitted.as_secs_f64() * 1e3,
            queued >> 10
        );
        ms.push(took.as_secs_f64() * 1e3);
        reader.abort();
        a.shutdown().await;
        b.shutdown().await;
    }
    ms.sort_by(f64::total_cmp);
    println!("median {:.1} ms of {}: {:?}", ms[ms.len() / 2], ms.len(), ms);
    Ok(())
}
