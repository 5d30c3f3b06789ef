//! Priorities and deadlines over real TCP links on loopback: an urgent event overtakes a low-priority backlog queued
//! for the link (and, with no priority, waits behind it), and an event whose deadline passes while it waits is
//! reported to its sink as expired, never delivered.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, EventOptions, Node, Overflow, Priority, RecvError, RegistryClient, Sink, SinkOptions};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);
/// Bulk events: 64 KiB each, far more than the socket buffers hold, so most wait in the source node's outbox.
const BULK: usize = 600;
const BULK_SIZE: usize = 64 << 10;

async fn pair() -> Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    // A short receive buffer, so that the backlog waits at the sender (where priorities apply), not in the sink
    // node's kernel (see `NodeBuilder::recv_buffer`).
    let start =
        || Node::builder().registry_client(reg.clone()).link_queue_bytes(64 << 20).recv_buffer(Some(256 << 10)).start();
    Ok((start().await?, start().await?))
}

/// What a sink saw, in order: "bulk", "urgent", "late" (an event with a deadline that arrived) or "expired<n>".
async fn drain(sink: &mut Sink, events: usize) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    let mut got = 0;
    while got < events {
        match timeout(T, sink.recv()).await.context("timed out receiving")? {
            Ok(e) => {
                seen.push(e.ty().to_owned());
                got += 1;
            }
            Err(RecvError::Expired(n)) => {
                seen.push(format!("expired{n}"));
                got += n as usize;
            }
            Err(e) => bail!("unexpected: {e}"),
        }
    }
    Ok(seen)
}

/// A backlog of bulk events from one source of node `a` to a Block sink on `b` that does not read yet, then one
/// "urgent" event from another source with `urgent` options; returns the order the sink sees them in.
async fn urgent_behind_bulk(urgent: EventOptions) -> Result<Vec<String>> {
    let (a, b) = pair().await?;
    let ch_b = b.channel("timely").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(8))?;
    let ch_a = a.channel("timely").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut bulk = ch_a.source()?;
    let mut alarm = ch_a.source()?;
    // One prioritised event first: from then on the link keeps its kernel send queue short (TCP_NOTSENT_LOWAT).
    alarm.submit_with("warm-up", &Attrs::new(), b"", EventOptions::new().priority(Priority::HIGHEST)).await?;
    // ... and sends its urgent lanes on a connection of their own once that is up: wait for it, so that the test does
    // not depend on how long the dial takes on a loaded machine (a dial slower than the writer's hold sends the
    // warm-up on the main connection, and the source's later urgent event then follows it behind the backlog).
    timeout(T, async {
        while !a.link_stats().iter().any(|l| l.node == b.id() && l.urgent_apart) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .context("the urgent connection did not come up")?;
    let payload = vec![0u8; BULK_SIZE];
    for _ in 0..BULK {
        bulk.submit("bulk", &Attrs::new(), &payload).await?;
    }
    alarm.submit_with("urgent", &Attrs::new(), b"now", urgent).await?;
    let mut seen = drain(&mut sink, BULK + 2).await?;
    assert_eq!(seen.first().map(String::as_str), Some("warm-up"));
    seen.remove(0);
    Ok(seen)
}

fn position(seen: &[String], what: &str) -> Result<usize> {
    seen.iter().position(|s| s == what).with_context(|| format!("no {what} in {seen:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_event_overtakes_a_low_priority_backlog() -> Result<()> {
    let plain = urgent_behind_bulk(EventOptions::new()).await?;
    assert_eq!(position(&plain, "urgent")?, BULK, "without a priority the event waits behind the whole backlog");
    let urgent = urgent_behind_bulk(EventOptions::new().priority(Priority::HIGHEST)).await?;
    let at = position(&urgent, "urgent")?;
    // What was already taken by the writer, in the socket buffers and in the sink's queue goes first; the outbox's
    // backlog does not.
    eprintln!("the urgent event came after {at} of {BULK} bulk events");
    assert!(at < BULK / 4, "the urgent event came after {at} of {BULK} bulk events");
    assert_eq!(urgent.iter().filter(|s| *s == "bulk").count(), BULK, "every bulk event arrived");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_past_its_deadline_is_reported_as_expired_not_delivered() -> Result<()> {
    let (a, b) = pair().await?;
    let ch_b = b.channel("deadline").await?;
    let mut sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(8))?;
    let ch_a = a.channel("deadline").await?;
    ch_a.wait_for_sinks(1, T).await?;
    let mut src = ch_a.source()?;
    let payload = vec![0u8; BULK_SIZE];
    for _ in 0..BULK / 2 {
        src.submit("bulk", &Attrs::new(), &payload).await?;
    }
    // Behind the backlog (same source, default priority), with 50 ms to live; then one that has all the time it needs.
    src.submit_with("late", &Attrs::new(), b"x", EventOptions::new().deadline(Duration::from_millis(50))).await?;
    src.submit_with("fresh", &Attrs::new(), b"y", EventOptions::new().deadline(Duration::from_secs(60))).await?;
    // The sink starts reading only once the first deadline has passed.
    tokio::time::sleep(Duration::from_millis(80)).await;
    let seen = drain(&mut sink, BULK / 2 + 2).await?;
    assert_eq!(&seen[BULK / 2..], ["expired1", "fresh"], "the late event is reported in its place");
    assert!(!seen.iter().any(|s| s == "late"), "an expired event was delivered");
    assert_eq!(ch_b.stats().expired, 1, "counted once at the sink's node");
    assert_eq!(ch_b.stats().missed, 0, "an expired event is not a loss");
    let link_expired: u64 = a.link_stats().iter().map(|l| l.expired).sum();
    assert!(link_expired <= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_sink_gets_expired_events_reported_too() -> Result<()> {
    let (a, _b) = pair().await?;
    let ch = a.channel("local").await?;
    let mut sink = ch.sink(SinkOptions::new().overflow(Overflow::Block).capacity(16))?;
    let mut src = ch.source()?;
    src.set_type_options("tick", EventOptions::new().deadline(Duration::from_millis(20)));
    src.submit("tick", &Attrs::new(), b"1").await?;
    src.submit_with("tick", &Attrs::new(), b"2", EventOptions::new().deadline(Duration::from_secs(60))).await?;
    src.submit("tock", &Attrs::new(), b"3").await?;
    tokio::time::sleep(Duration::from_millis(40)).await;
    let seen = drain(&mut sink, 3).await?;
    assert_eq!(seen, ["expired1", "tick", "tock"]);
    assert_eq!(ch.stats().expired, 1);
    Ok(())
}

/// A saturating bulk stream and urgent events on one link, as `kecho-bench priority` runs them: the link must stay up
/// (one connection, no heartbeat timeout) and every urgent event arrive, none reported missed. The rest of a 64 KB
/// frame begun by a direct write was once overtaken by an urgent frame, which the peer read as garbage: the link was
/// dropped and re-established, and events were lost with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_with_urgent_events_keeps_its_link() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let start = || Node::builder().registry_client(reg.clone()).start();
    let (a, b) = (start().await?, start().await?);
    let ch_b = b.channel("urgent").await?;
    let mut urgent_sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(4096))?;
    let bulk_b = b.channel("bulk").await?;
    let mut bulk_sink = bulk_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(1024))?;
    let ch_a = a.channel("urgent").await?;
    let bulk_a = a.channel("bulk").await?;
    ch_a.wait_for_sinks(1, T).await?;
    bulk_a.wait_for_sinks(1, T).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = tokio::spawn(async move {
        let mut bulk = 0u64;
        loop {
            match bulk_sink.recv().await {
                Ok(_) => bulk += 1,
                Err(RecvError::Closed) => return Ok(bulk),
                Err(e) => bail!("bulk sink: {e}"),
            }
        }
    });
    let writer = {
        let mut src = bulk_a.source()?;
        let stop = stop.clone();
        tokio::spawn(async move {
            let payload = vec![0u8; BULK_SIZE];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                src.submit("bulk", &Attrs::new(), &payload).await?;
                tokio::task::yield_now().await;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut src = ch_a.source()?;
    const URGENT: usize = 400;
    for i in 0..URGENT {
        let opts = EventOptions::new().priority(Priority::HIGHEST);
        src.submit_with("urgent", &Attrs::new(), &(i as u64).to_le_bytes(), opts).await?;
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    for i in 0..URGENT {
        let e = match timeout(T, urgent_sink.recv()).await.context("urgent events stopped arriving")? {
            Ok(e) => e,
            Err(e) => bail!("urgent event {i}: {e} (links of A: {:?})", a.link_stats()),
        };
        assert_eq!(e.payload()[..], (i as u64).to_le_bytes(), "urgent events arrive in order");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    timeout(T, writer).await.context("bulk source stuck")???;
    let links = a.link_stats();
    assert_eq!(links.len(), 1);
    assert_eq!((links[0].connects, links[0].heartbeat_timeouts), (1, 0), "the link stayed up: {links:?}");
    assert_eq!(ch_b.stats().missed + bulk_b.stats().missed, 0, "nothing was lost");
    drop(bulk_b);
    b.kill();
    let bulk = timeout(T, reader).await.context("bulk sink")???;
    assert!(bulk > 0, "bulk events arrived");
    Ok(())
}
