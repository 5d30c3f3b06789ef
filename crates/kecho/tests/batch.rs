//! Batched submits and receives (`Source::submit_many`, `Sink::recv_many`) over TCP, same-host sockets and shared
//! memory: order (mixed with single submits), every event accounted for, Block back-pressure, type and content
//! filters (a node where only some sinks are chosen gets each event's target list), and local sinks.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Error, Event, Node, Overflow, RecvError, RegistryClient, SinkOptions};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// The transports of the tests: (same host, shared-memory ring).
const MODES: [(bool, Option<usize>); 3] = [(false, None), (true, None), (true, Some(kecho_shm::DEFAULT_RING))];

fn builder(reg: &RegistryClient, (same_host, ring): (bool, Option<usize>)) -> kecho::NodeBuilder {
    Node::builder().registry_client(reg.clone()).same_host(same_host).shared_memory(ring)
}

/// The payload of event `i`: its number, padded to a size that varies (so that runs straddle reads and chunks).
fn payload(i: u32) -> Vec<u8> {
    let mut p = i.to_le_bytes().to_vec();
    p.resize(4 + (i as usize * 37) % 700, 0xa5);
    p
}

/// Receives with `recv_many` (at most `max` at a time) until `n` events came; lag notices are an error.
async fn recv_n(sink: &mut kecho::Sink, n: usize, max: usize) -> Result<Vec<Event>> {
    let mut evs = Vec::with_capacity(n);
    while evs.len() < n {
        let before = evs.len();
        match timeout(T, sink.recv_many(&mut evs, max)).await {
            Err(_) => bail!("timed out after {before} of {n} events ({} queued)", sink.len()),
            Ok(Err(e)) => bail!("after {before} events: {e}"),
            Ok(Ok(k)) => assert!(k >= 1 && k <= max && evs.len() == before + k, "{k} events of at most {max}"),
        }
    }
    Ok(evs)
}

/// Checks that `evs` are events `from..from + len` of the source, in order, whole.
fn check_run(evs: &[Event], from: u32) {
    for (k, ev) in evs.iter().enumerate() {
        let i = from + k as u32;
        let got = u32::from_le_bytes(ev.payload()[..4].try_into().expect("4 bytes"));
        assert_eq!((got, ev.seq()), (i, u64::from(i) + 1), "out of order");
        assert_eq!(&ev.payload()[..], &payload(i)[..], "event {i} changed on the way");
    }
}

/// Batches of varied sizes, mixed with single submits, reach a small Block sink on another node whole and in order
/// (the source waits for room again and again); the numbers `submit_many` returns are the events' sequence numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_arrive_whole_and_in_order_through_a_small_block_sink() -> Result<()> {
    for mode in MODES {
        let reg = RegistryClient::in_process_private();
        let a = builder(&reg, mode).link_queue_bytes(16 * 1024).start().await?;
        let b = builder(&reg, mode).start().await?;
        let ca = a.create_channel("order").await?;
        let cb = b.open_channel("order").await?;
        let mut sink = cb.sink(SinkOptions::new().capacity(64).overflow(Overflow::Block))?;
        ca.wait_for_sinks(1, T).await?;
        let mut src = ca.source()?;
        let n = 20_000u32;
        let sender = tokio::spawn(async move {
            let mut i = 0;
            let mut size = 1;
            while i < n {
                if size % 7 == 0 {
                    assert_eq!(src.submit("e", &Attrs::new(), &payload(i)).await?, u64::from(i) + 1);
                    i += 1;
                } else {
                    let k = size.min(n - i);
                    let batch: Vec<Vec<u8>> = (i..i + k).map(payload).collect();
                    let seqs = src.submit_many("e", &Attrs::new(), &batch).await?;
                    assert_eq!(seqs, u64::from(i) + 1..u64::from(i + k) + 1);
                    i += k;
                }
                size = size * 3 % 1001;
            }
            Ok::<_, anyhow::Error>(src)
        });
        let evs = recv_n(&mut sink, n as usize, 100).await.with_context(|| format!("mode {mode:?}"))?;
        check_run(&evs, 0);
        let src = sender.await??;
        assert_eq!(sink.dropped(), 0);
        assert_eq!(ca.stats().dropped, 0);
        drop(src);
    }
    Ok(())
}

/// Type and content filters choose per batch as per event: a sink for another type gets none, a sink whose filter
/// refuses the batch's attributes gets none (its node gets the events with target lists naming only the other sink),
/// and every sink sees its share in order.
#[cfg(feature = "cel")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_choose_batches_as_they_choose_single_events() -> Result<()> {
    for mode in MODES {
        let reg = RegistryClient::in_process_private();
        let a = builder(&reg, mode).start().await?;
        let b = builder(&reg, mode).start().await?;
        let ca = a.create_channel("filters").await?;
        let cb = b.open_channel("filters").await?;
        let opts = || SinkOptions::new().capacity(100_000).overflow(Overflow::Block);
        let mut all = cb.sink(opts())?;
        let mut odd = cb.sink(opts().filter("k == 1"))?;
        let mut other = cb.sink(opts().types(["other"]))?;
        ca.wait_for_sinks(3, T).await?;
        let mut src = ca.source()?;
        let mut odd_attrs = Attrs::new();
        odd_attrs.set("k", 1i64);
        let mut even_attrs = Attrs::new();
        even_attrs.set("k", 2i64);
        let (batches, per) = (40u32, 50u32);
        for b in 0..batches {
            let attrs = if b % 2 == 1 { &odd_attrs } else { &even_attrs };
            let batch: Vec<Vec<u8>> = (b * per..(b + 1) * per).map(payload).collect();
            src.submit_many("e", attrs, &batch).await?;
        }
        let evs = recv_n(&mut all, (batches * per) as usize, 1000).await?;
        check_run(&evs, 0);
        let evs = recv_n(&mut odd, (batches / 2 * per) as usize, 1000).await?;
        for (j, chunk) in evs.chunks(per as usize).enumerate() {
            check_run(chunk, (2 * j as u32 + 1) * per);
            assert!(chunk.iter().all(|e| e.attrs().get("k") == Some(&kecho::Value::Int(1))));
        }
        // A marker of the other type comes after every event of the batches (the sink of all types gets it too), so
        // nothing of the batches may follow it.
        src.submit("other", &Attrs::new(), b"end").await?;
        for sink in [&mut other, &mut all] {
            let evs = recv_n(sink, 1, 10).await?;
            assert_eq!((evs[0].ty(), &evs[0].payload()[..]), ("other", &b"end"[..]));
        }
        assert!(all.is_empty() && odd.is_empty());
        assert_eq!(all.dropped() + odd.dropped() + other.dropped(), 0);
    }
    Ok(())
}

/// A Block sink that nobody reads stalls the link: `try_submit_many` then sends a prefix of its batch or fails with
/// `WouldBlock`, sending nothing; the events of another channel whose batches find the link full are dropped at the
/// source and reported to their (DropNewest) sink exactly, so that what arrived and what was reported add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_that_find_a_link_full_are_refused_or_reported_exactly() -> Result<()> {
    for mode in MODES {
        let reg = RegistryClient::in_process_private();
        let a = builder(&reg, mode).link_queue_bytes(64 * 1024).start().await?;
        let b = builder(&reg, mode).start().await?;
        let ax = a.create_channel("x").await?;
        let bx = b.open_channel("x").await?;
        let mut blocker = bx.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
        let ay = a.create_channel("y").await?;
        let by = b.open_channel("y").await?;
        let mut lossy = by.sink(SinkOptions::new().capacity(1_000_000).overflow(Overflow::DropNewest))?;
        ax.wait_for_sinks(1, T).await?;
        ay.wait_for_sinks(1, T).await?;
        let (mut sx, mut sy) = (ax.source()?, ay.source()?);
        let big = vec![vec![0u8; 4096]; 8];
        let (mut sent, mut refusals, mut partial) = (0u64, 0, false);
        while refusals < 5 {
            match sx.try_submit_many("x", &Attrs::new(), &big) {
                Ok(seqs) => {
                    assert!(!seqs.is_empty() && seqs.start == sent + 1, "{seqs:?} after {sent}");
                    partial |= seqs.end - seqs.start < big.len() as u64;
                    sent = seqs.end - 1;
                    refusals = 0;
                }
                Err(Error::WouldBlock) => {
                    refusals += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => bail!("{e}"),
            }
            assert!(sent < 100_000, "the link never filled up");
        }
        assert!(partial || sent % big.len() as u64 == 0);
        let (n, per) = (2000u64, 100usize);
        let small = vec![b"y".to_vec(); per];
        for _ in 0..n / per as u64 {
            sy.submit_many("y", &Attrs::new(), &small).await?;
        }
        let dropped_at_source = ay.stats().dropped;
        assert!(dropped_at_source > 0, "nothing was dropped at the full link ({mode:?})");
        let drain = tokio::spawn(async move {
            let mut evs = Vec::new();
            while let Ok(Ok(_)) = timeout(Duration::from_millis(500), blocker.recv_many(&mut evs, 16)).await {
                evs.clear();
            }
        });
        let (mut got, mut lagged) = (0u64, 0u64);
        let mut evs = Vec::new();
        while got + lagged < n {
            match timeout(T, lossy.recv_many(&mut evs, 64)).await.context("y events")? {
                Ok(k) => got += k as u64,
                Err(RecvError::Lagged(k)) => lagged += k,
                Err(e) => bail!("{e}"),
            }
        }
        assert_eq!(lagged, dropped_at_source, "{mode:?}");
        assert_eq!(got + lagged, n);
        assert_eq!(evs.len() as u64, got);
        drain.abort();
    }
    Ok(())
}

/// Local sinks get batches in order too, a Block one making the source wait (its receiver takes them in batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_sinks_get_batches_in_order() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = builder(&reg, (false, None)).start().await?;
    let ch = a.create_channel("local").await?;
    let mut sink = ch.sink(SinkOptions::new().capacity(16).overflow(Overflow::Block))?;
    let mut src = ch.source()?;
    let n = 5000u32;
    let sender = tokio::spawn(async move {
        for b in 0..n / 250 {
            let batch: Vec<Vec<u8>> = (b * 250..(b + 1) * 250).map(payload).collect();
            src.submit_many("e", &Attrs::new(), &batch).await?;
        }
        Ok::<_, anyhow::Error>(src)
    });
    let evs = recv_n(&mut sink, n as usize, 7).await?;
    check_run(&evs, 0);
    let _src = sender.await??;
    // Nothing full, nothing waits: the non-waiting form sends the whole batch.
    let mut src = ch.source()?;
    let mut sink2 = ch.sink(SinkOptions::new())?;
    let seqs = src.try_submit_many("e", &Attrs::new(), &[b"a", b"b", b"c"])?;
    assert_eq!(seqs, 1..4);
    let evs = recv_n(&mut sink2, 3, 10).await?;
    assert_eq!(evs.iter().map(|e| e.payload().to_vec()).collect::<Vec<_>>(), [b"a", b"b", b"c"]);
    assert_eq!(src.submit_many::<&[u8]>("e", &Attrs::new(), &[]).await?, 4..4, "an empty batch sends nothing");
    Ok(())
}

/// A batch with an event over the frame limit fails whole: nothing of it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_an_invalid_event_sends_nothing() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = builder(&reg, (false, None)).start().await?;
    let ch = a.create_channel("invalid").await?;
    let mut sink = ch.sink(SinkOptions::new())?;
    let mut src = ch.source()?;
    let huge = vec![0u8; 64 << 20];
    let batch: [&[u8]; 3] = [b"a", &huge, b"c"];
    assert!(matches!(src.submit_many("e", &Attrs::new(), &batch).await, Err(Error::Invalid(_))));
    assert!(matches!(src.submit_many("", &Attrs::new(), &[b"a"]).await, Err(Error::Invalid(_))));
    assert_eq!(src.submit("e", &Attrs::new(), b"after").await?, 1, "no number was used");
    let evs = recv_n(&mut sink, 1, 10).await?;
    assert_eq!(&evs[0].payload()[..], b"after");
    Ok(())
}

/// A batch goes on the wire in compact `EventRun` frames (one header per run of a source's events, docs/PROTOCOL.md):
/// far fewer bytes than an `Event` frame per event would take, on every transport, and the events arrive as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_go_in_compact_frames_on_every_transport() -> Result<()> {
    for mode in MODES {
        let reg = RegistryClient::in_process_private();
        let a = builder(&reg, mode).start().await?;
        let b = builder(&reg, mode).start().await?;
        let ca = a.create_channel("compact").await?;
        let cb = b.open_channel("compact").await?;
        let mut sink = cb.sink(SinkOptions::new().capacity(10_000).overflow(Overflow::Block))?;
        ca.wait_for_sinks(1, T).await?;
        let mut src = ca.source()?;
        let n = 2_000u32;
        let batch: Vec<Vec<u8>> = (0..n).map(|i| payload(i)[..4].to_vec()).collect();
        src.submit_many("e", &Attrs::new(), &batch).await?;
        let evs = recv_n(&mut sink, n as usize, 500).await.with_context(|| format!("mode {mode:?}"))?;
        for (i, ev) in evs.iter().enumerate() {
            assert_eq!((ev.seq(), &ev.payload()[..]), (i as u64 + 1, &(i as u32).to_le_bytes()[..]));
        }
        // An `Event` frame of type "e" with a 4-byte payload and no attributes takes 38 bytes; in a run, 8.
        let per_event = ca.stats().bytes_sent as f64 / f64::from(n);
        assert!(per_event < 12.0, "{per_event} bytes per event on the wire ({mode:?})");
    }
    Ok(())
}

/// Runs of several sources, types and attribute lists, mixed with single submits, reach a sink of every type in
/// order and whole (each event with its own type and attributes); a small DropNewest sink of the same node reports
/// exactly what its full queue lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_runs_arrive_in_order_with_their_types_and_attributes() -> Result<()> {
    for mode in MODES {
        let reg = RegistryClient::in_process_private();
        let a = builder(&reg, mode).start().await?;
        let b = builder(&reg, mode).start().await?;
        let ca = a.create_channel("mixed").await?;
        let cb = b.open_channel("mixed").await?;
        let mut all = cb.sink(SinkOptions::new().capacity(256).overflow(Overflow::Block))?;
        let mut small = cb.sink(SinkOptions::new().capacity(10).overflow(Overflow::DropNewest))?;
        ca.wait_for_sinks(2, T).await?;
        let (mut s1, mut s2) = (ca.source()?, ca.source()?);
        let tagged = Attrs::new().with("k", 7i64);
        // What each source sent, in order: (type, tagged, payload).
        let (mut sent1, mut sent2) = (Vec::new(), Vec::new());
        let sender = tokio::spawn(async move {
            for round in 0..60u32 {
                for (src, sent, base) in [(&mut s1, &mut sent1, 0u32), (&mut s2, &mut sent2, 1_000_000)] {
                    let ty = if round % 3 == 0 { "a" } else { "bb" };
                    let attrs = if round % 2 == 0 { Attrs::new() } else { tagged.clone() };
                    let k = 1 + (round * 7) % 50;
                    let batch: Vec<Vec<u8>> = (0..k).map(|j| payload(base + round * 100 + j)).collect();
                    if round % 5 == 4 {
                        for p in &batch {
                            src.submit(ty, &attrs, p).await?;
                        }
                    } else {
                        src.submit_many(ty, &attrs, &batch).await?;
                    }
                    sent.extend(batch.into_iter().map(|p| (ty, round % 2 == 1, p)));
                }
            }
            Ok::<_, anyhow::Error>((s1, s2, sent1, sent2))
        });
        let total = (0..60u32).map(|r| 2 * (1 + (r * 7) % 50) as usize).sum::<usize>();
        let evs = recv_n(&mut all, total, 64).await.with_context(|| format!("mode {mode:?}"))?;
        let (_s1, _s2, sent1, sent2) = sender.await??;
        let mut by_source: std::collections::BTreeMap<u64, Vec<&Event>> = Default::default();
        for ev in &evs {
            by_source.entry(ev.source().0).or_default().push(ev);
        }
        assert_eq!(by_source.len(), 2, "{mode:?}");
        for got in by_source.values() {
            let sent = if u32::from_le_bytes(got[0].payload()[..4].try_into()?) < 1_000_000 { &sent1 } else { &sent2 };
            assert_eq!(got.len(), sent.len(), "{mode:?}");
            for (i, (ev, (ty, tagged, p))) in got.iter().zip(sent).enumerate() {
                assert_eq!(ev.seq(), i as u64 + 1, "{mode:?}: out of order");
                assert_eq!((ev.ty(), &ev.payload()[..]), (*ty, &p[..]), "{mode:?}: event {i} changed");
                assert_eq!(ev.attrs().get("k").is_some(), *tagged, "{mode:?}: event {i}'s attributes");
            }
        }
        // The small sink kept its first 10 events and reports the rest as lost, exactly.
        let (mut got, mut lagged) = (0usize, 0u64);
        let mut some = Vec::new();
        while got + (lagged as usize) < total {
            match timeout(T, small.recv_many(&mut some, 64)).await.context("small sink")? {
                Ok(k) => got += k,
                Err(RecvError::Lagged(k)) => lagged += k,
                Err(e) => bail!("{e}"),
            }
        }
        assert_eq!(got, 10, "{mode:?}");
        assert_eq!(lagged as usize, total - 10, "{mode:?}");
        assert_eq!(small.dropped(), lagged, "{mode:?}");
    }
    Ok(())
}

/// Waits until `sink` has counted `n` events as dropped (its queue's policy discarded them).
async fn dropped_reaches(sink: &kecho::Sink, n: u64) -> Result<()> {
    let t0 = std::time::Instant::now();
    while sink.dropped() < n {
        if t0.elapsed() > T {
            bail!("{} of {n} events counted as dropped", sink.dropped());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Drains a sink that holds `kept` events after `lost` were reported lost: its events' numbers in order, and the lag
/// notices as `None` with their count.
async fn drain_exactly(sink: &mut kecho::Sink, total: usize) -> Result<(Vec<u32>, u64)> {
    let (mut got, mut lagged, mut evs) = (Vec::new(), 0u64, Vec::new());
    while got.len() + lagged as usize != total {
        match timeout(T, sink.recv_many(&mut evs, 64)).await.context("draining")? {
            Ok(_) => got.extend(evs.drain(..).map(|e| u32::from_le_bytes(e.payload()[..4].try_into().expect("4")))),
            Err(RecvError::Lagged(k)) => lagged += k,
            Err(e) => bail!("{e}"),
        }
        assert!(got.len() + lagged as usize <= total, "more than {total} events or notices");
    }
    Ok((got, lagged))
}

/// Runs reaching several sinks of which none blocks (each sink's events are built straight into its queue) and,
/// through an IN-filter, the per-event path: each sink gets its share whole and in order, a full queue's drops are
/// reported exactly in their place (DropNewest keeps the first events, DropOldest the last), and the IN-filter
/// decides on every event of a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_reach_several_sinks_with_exact_loss_and_in_filters_per_event() -> Result<()> {
    for mode in MODES {
        for in_filter in [false, true] {
            let reg = RegistryClient::in_process_private();
            let a = builder(&reg, mode).start().await?;
            let b = builder(&reg, mode).start().await?;
            let ca = a.create_channel("several").await?;
            let cb = b.open_channel("several").await?;
            // Every third event is dropped by the IN-filter, if there is one.
            let kept = |i: u32| !in_filter || !i.is_multiple_of(3);
            if in_filter {
                cb.set_in_filter(Some(std::sync::Arc::new(
                    |ev: &mut kecho::filter::InEvent<'_>, _: &kecho::filter::LocalSinks<'_>| {
                        let i = u32::from_le_bytes(ev.payload()[..4].try_into().expect("4 bytes"));
                        if i.is_multiple_of(3) {
                            kecho::filter::InDecision::Drop
                        } else {
                            kecho::filter::InDecision::Deliver
                        }
                    },
                )));
            }
            let mut all = cb.sink(SinkOptions::new().capacity(100_000).overflow(Overflow::DropNewest))?;
            let mut newest = cb.sink(SinkOptions::new().capacity(50).overflow(Overflow::DropNewest))?;
            let mut oldest = cb.sink(SinkOptions::new().capacity(50).overflow(Overflow::DropOldest))?;
            ca.wait_for_sinks(3, T).await?;
            let mut src = ca.source()?;
            let n = 5_000u32;
            for from in (0..n).step_by(250) {
                let batch: Vec<Vec<u8>> = (from..from + 250).map(payload).collect();
                src.submit_many("e", &Attrs::new(), &batch).await?;
            }
            let want: Vec<u32> = (0..n).filter(|&i| kept(i)).collect();
            let ctx = || format!("mode {mode:?}, IN-filter {in_filter}");
            let evs = recv_n(&mut all, want.len(), 100).await.with_context(ctx)?;
            for (ev, &i) in evs.iter().zip(&want) {
                assert_eq!((ev.seq(), &ev.payload()[..]), (u64::from(i) + 1, &payload(i)[..]), "{}", ctx());
            }
            let lost = (want.len() - 50) as u64;
            dropped_reaches(&newest, lost).await.with_context(ctx)?;
            dropped_reaches(&oldest, lost).await.with_context(ctx)?;
            assert_eq!(drain_exactly(&mut newest, want.len()).await?, (want[..50].to_vec(), lost), "{}", ctx());
            assert_eq!(
                drain_exactly(&mut oldest, want.len()).await?,
                (want[want.len() - 50..].to_vec(), lost),
                "{}",
                ctx()
            );
            assert_eq!(all.dropped(), 0, "{}", ctx());
        }
    }
    Ok(())
}

/// The number in event `ev`'s payload (see `payload`).
fn number(ev: &Event) -> u32 {
    u32::from_le_bytes(ev.payload()[..4].try_into().expect("4 bytes"))
}

/// Reads a Block sink with receives of every kind in turn (`recv`, `recv_many`, `try_recv`), slowly at first so that
/// its queue fills and holds up the link, until `n` events came; lag notices are an error.
async fn recv_mixed(sink: &mut kecho::Sink, n: usize) -> Result<Vec<u32>> {
    let (mut got, mut evs) = (Vec::with_capacity(n), Vec::new());
    let mut turn = 0u32;
    while got.len() < n {
        turn += 1;
        if turn < 40 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let before = got.len();
        match turn % 3 {
            0 => match timeout(T, sink.recv()).await {
                Err(_) => bail!("timed out after {before} of {n} events"),
                Ok(r) => got.push(number(&r.with_context(|| format!("after {before} events"))?)),
            },
            1 => match timeout(T, sink.recv_many(&mut evs, 7)).await {
                Err(_) => bail!("timed out after {before} of {n} events"),
                Ok(r) => {
                    r.with_context(|| format!("after {before} events"))?;
                    got.extend(evs.drain(..).map(|e| number(&e)));
                }
            },
            _ => match sink.try_recv() {
                Ok(e) => got.push(number(&e)),
                Err(kecho::TryRecvError::Empty) => {}
                Err(e) => bail!("after {before} events: {e}"),
            },
        }
    }
    Ok(got)
}

/// Runs of two types on one link reach sinks of one node with different type filters: runs of type `b` go to two
/// sinks of which none blocks (built straight into their queues), runs of type `a` to two sinks of which one blocks
/// (the per-event path, offered in step), and with 65 sinks everything takes the per-event path. The blocking sink,
/// read slowly with every kind of receive, holds up the link again and again, so that batches switch paths midway.
/// Every sink gets its share whole and in per-source order (a second source's single events interleaved), and the
/// DropOldest sink reports exactly what it lost, in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_several_types_take_both_delivery_paths_in_order() -> Result<()> {
    for mode in MODES {
        for extra in [0usize, 62] {
            let ctx = || format!("mode {mode:?}, {} sinks", 3 + extra);
            let reg = RegistryClient::in_process_private();
            let a = builder(&reg, mode).start().await?;
            let b = builder(&reg, mode).start().await?;
            let ca = a.create_channel("paths").await?;
            let cb = b.open_channel("paths").await?;
            let mut blocker = cb.sink(SinkOptions::new().types(["a"]).capacity(40).overflow(Overflow::Block))?;
            let mut all = cb.sink(SinkOptions::new().capacity(1_000_000).overflow(Overflow::DropNewest))?;
            let mut only_b = cb.sink(SinkOptions::new().types(["b"]).capacity(30).overflow(Overflow::DropOldest))?;
            let mut more = Vec::new();
            for _ in 0..extra {
                more.push(cb.sink(SinkOptions::new().types(["a"]).capacity(1_000_000).overflow(Overflow::DropNewest))?);
            }
            ca.wait_for_sinks(3 + extra, T).await?;
            let (mut s1, mut s2) = (ca.source()?, ca.source()?);
            // Source 1: runs of `a` and `b` in turn (numbers from 0); source 2: single `a` events (from 1,000,000).
            let (rounds, per) = (40u32, 60u32);
            let sender = tokio::spawn(async move {
                for r in 0..rounds {
                    let ty = if r % 2 == 0 { "a" } else { "b" };
                    let batch: Vec<Vec<u8>> = (r * per..(r + 1) * per).map(payload).collect();
                    s1.submit_many(ty, &Attrs::new(), &batch).await?;
                    s2.submit("a", &Attrs::new(), &payload(1_000_000 + r)).await?;
                }
                Ok::<_, anyhow::Error>((s1, s2))
            });
            let of_a: Vec<u32> = (0..rounds).filter(|r| r % 2 == 0).flat_map(|r| r * per..(r + 1) * per).collect();
            let of_b: Vec<u32> = (0..rounds).filter(|r| r % 2 == 1).flat_map(|r| r * per..(r + 1) * per).collect();
            let singles: Vec<u32> = (0..rounds).map(|r| 1_000_000 + r).collect();
            let split = |got: Vec<u32>| -> (Vec<u32>, Vec<u32>) { got.into_iter().partition(|&i| i < 1_000_000) };
            let got = recv_mixed(&mut blocker, of_a.len() + singles.len()).await.with_context(ctx)?;
            assert_eq!(split(got), (of_a.clone(), singles.clone()), "{}: the Block sink", ctx());
            let _sources = sender.await??;
            let total = (rounds * per + rounds) as usize;
            let (got, lagged) = drain_exactly(&mut all, total).await.with_context(ctx)?;
            assert_eq!(lagged, 0, "{}", ctx());
            let (runs, single) = split(got);
            assert_eq!(runs, (0..rounds * per).collect::<Vec<_>>(), "{}: the sink of every type", ctx());
            assert_eq!(single, singles, "{}: the sink of every type", ctx());
            let lost = of_b.len() - 30;
            dropped_reaches(&only_b, lost as u64).await.with_context(ctx)?;
            let kept = drain_exactly(&mut only_b, of_b.len()).await.with_context(ctx)?;
            assert_eq!(kept, (of_b[lost..].to_vec(), lost as u64), "{}: the DropOldest sink", ctx());
            for s in &mut more {
                let (got, lagged) = drain_exactly(s, of_a.len() + singles.len()).await.with_context(ctx)?;
                assert_eq!((split(got), lagged), ((of_a.clone(), singles.clone()), 0), "{}", ctx());
            }
            assert!(all.is_empty() && blocker.is_empty() && only_b.is_empty(), "{}", ctx());
        }
    }
    Ok(())
}
