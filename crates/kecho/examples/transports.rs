//! TCP and QUIC links side by side, in one run, alternated rounds: throughput of 1 KB events, one-way latency of
//! 100 B events on an idle link, and the latency of 100 B events sent while a 64 KB-event bulk stream saturates the
//! same link (on another channel): with the default priority, with the highest, and (QUIC) as best-effort events,
//! which go as datagrams. Prints each figure and QUIC's ratio to TCP.
//! `cargo run --release -p kecho --no-default-features --features quic --example transports -- [rounds] [events]
//! [throughput|idle|idle-task|urgent]` (with `throughput`, only the throughput rounds: for a profile of that workload;
//! with `idle`, only the idle-link latency rounds, `events` unused, and a fourth argument `tcp` or `quic` runs only that
//! transport; `idle-task` is `idle` with each round's events submitted and received in a task of the runtime instead
//! of `main`'s future, which runs on the main thread;
//! with `urgent`, only the idle and priority-3-behind-bulk latency rounds, for TCP and for QUIC with urgent connections
//! on (the default) and off (an urgent stream on the link's one connection), each with its p99 ratio).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{context_switches, cpu_seconds};
use kecho::{Attrs, EventOptions, Node, Overflow, Priority, RecvError, RegistryClient, SinkOptions, Transport};

const T: Duration = Duration::from_secs(10);

/// Two nodes on a private registry, linked by `transport`.
async fn pair(t: Transport) -> kecho::Result<(Node, Node)> {
    pair_with(t, true).await
}

/// Two nodes linked by `transport`, with urgent connections on or off (`NodeBuilder::urgent_connection`).
async fn pair_with(t: Transport, urgent_connection: bool) -> kecho::Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    let start =
        || Node::builder().registry_client(reg.clone()).transport(t).urgent_connection(urgent_connection).start();
    Ok((start().await?, start().await?))
}

/// Events of `size` bytes per second from one node to the other, and the CPU microseconds per event both nodes
/// used (they share the process).
async fn throughput(t: Transport, n: u64, size: usize) -> kecho::Result<(f64, f64)> {
    let (a, b) = pair(t).await?;
    let ca = a.channel("tp").await?;
    let cb = b.channel("tp").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(65536).overflow(Overflow::Block))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    let payload = vec![0u8; size];
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            src.submit("e", &Attrs::new(), &payload).await?;
        }
        Ok::<(), kecho::Error>(())
    });
    for _ in 0..n {
        sink.recv().await.expect("event");
    }
    producer.await.expect("join")?;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let cpu = (cpu_seconds() - cpu0) * 1e6 / n as f64;
    a.shutdown().await;
    b.shutdown().await;
    Ok((rate, cpu))
}

/// How the 100 B events of a latency run are sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Default priority.
    Plain,
    /// The highest priority.
    Urgent,
    /// Best-effort (datagrams over QUIC).
    BestEffort,
}

impl Mode {
    fn options(self) -> EventOptions {
        match self {
            Mode::Plain => EventOptions::new(),
            Mode::Urgent => EventOptions::new().priority(Priority::HIGHEST),
            Mode::BestEffort => EventOptions::new().best_effort(true),
        }
    }
}

/// One-way latencies (us) of `n` 100 B events sent one at a time, and how many were lost (best-effort only); with
/// `bulk`, while another channel's source streams 64 KB events over the same link as fast as it can.
async fn latency(t: Transport, n: usize, bulk: bool, how: Mode) -> kecho::Result<(Vec<f64>, u64)> {
    latency_with(t, true, n, bulk, how).await
}

/// [`latency`] with urgent connections on or off.
async fn latency_with(t: Transport, uc: bool, n: usize, bulk: bool, how: Mode) -> kecho::Result<(Vec<f64>, u64)> {
    let (a, b) = pair_with(t, uc).await?;
    let ca = a.channel("lat").await?;
    let cb = b.channel("lat").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(4096))?;
    ca.wait_for_sinks(1, T).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut bulk_tasks = Vec::new();
    if bulk {
        let ba = a.channel("bulk").await?;
        let bb = b.channel("bulk").await?;
        let mut bsink = bb.sink(SinkOptions::new().capacity(256).overflow(Overflow::Block))?;
        ba.wait_for_sinks(1, T).await?;
        let mut bsrc = ba.source()?;
        let s = stop.clone();
        bulk_tasks.push(tokio::spawn(async move {
            let big = vec![1u8; 64 * 1024];
            while !s.load(Ordering::Relaxed) {
                if bsrc.submit("bulk", &Attrs::new(), &big).await.is_err() {
                    break;
                }
            }
        }));
        let s = stop.clone();
        bulk_tasks.push(tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if tokio::time::timeout(Duration::from_millis(100), bsink.recv()).await.is_ok_and(|r| r.is_err()) {
                    break;
                }
            }
        }));
        // Let the bulk stream fill the link first.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut src = ca.source()?;
    src.set_options(how.options());
    let base = Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut lost = 0;
    for _ in 0..n {
        let sent = base.elapsed().as_nanos() as u64;
        let mut payload = sent.to_le_bytes().to_vec();
        payload.resize(100, 0);
        src.submit("urgent", &Attrs::new(), &payload).await?;
        // A best-effort event may be lost: its loss is reported when the next one arrives, so wait for it only so
        // long.
        let wait = if how == Mode::BestEffort { Duration::from_millis(100) } else { T };
        loop {
            match tokio::time::timeout(wait, sink.recv()).await {
                Err(_) if how == Mode::BestEffort => {
                    lost += 1;
                    break;
                }
                Err(_) => panic!("no event within {T:?}"),
                Ok(Err(RecvError::Lagged(_))) => continue,
                Ok(Err(e)) => panic!("recv: {e}"),
                Ok(Ok(ev)) => {
                    let at = base.elapsed().as_nanos() as u64;
                    let sent = u64::from_le_bytes(ev.payload()[..8].try_into().expect("8 bytes"));
                    out.push((at - sent) as f64 / 1e3);
                    break;
                }
            }
        }
        // Paced: the next event does not queue behind this one.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in bulk_tasks {
        let _ = t.await;
    }
    a.kill();
    b.kill();
    Ok((out, lost))
}

/// The `urgent` mode: idle and priority-3-behind-bulk latencies, alternated rounds, for TCP (urgent connection),
/// QUIC with its urgent connection and QUIC with an urgent stream.
async fn urgent_rounds(rounds: usize) -> kecho::Result<()> {
    let lat_n = 2000;
    let cases = [
        ("TCP, urgent connection", Transport::Tcp, true),
        ("QUIC, urgent connection", Transport::Quic, true),
        ("QUIC, urgent stream", Transport::Quic, false),
    ];
    let mut idle = [Vec::new(), Vec::new(), Vec::new()];
    let mut urgent = [Vec::new(), Vec::new(), Vec::new()];
    for r in 0..rounds {
        let mut order: Vec<usize> = (0..cases.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (_, t, uc) = cases[i];
            idle[i].extend(latency_with(t, uc, lat_n, false, Mode::Plain).await?.0);
            urgent[i].extend(latency_with(t, uc, lat_n / 4, true, Mode::Urgent).await?.0);
        }
    }
    println!("| 100 B one-way ({rounds} rounds, alternated) | idle p50 | idle p99 | behind bulk p50 | behind bulk p99 | p99 / idle p99 |");
    println!("|---|---|---|---|---|---|");
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let (i50, i99) = (pct(&mut idle[i], 0.5), pct(&mut idle[i], 0.99));
        let (u50, u99) = (pct(&mut urgent[i], 0.5), pct(&mut urgent[i], 0.99));
        println!("| {name}, priority 3 | {i50:.1} us | {i99:.1} us | {u50:.1} us | {u99:.1} us | {:.1}x |", u99 / i99);
    }
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> kecho::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let what = args.next();
    let only_throughput = what.as_deref() == Some("throughput");
    let only_idle = matches!(what.as_deref(), Some("idle" | "idle-task"));
    // With `idle-task`, each latency round runs in a task of the runtime rather than in `main`'s own future (which
    // `block_on` polls on the main thread, not on a worker: every wake-up between it and the nodes' tasks crosses
    // threads).
    let in_task = what.as_deref() == Some("idle-task");
    if what.as_deref() == Some("urgent") {
        return urgent_rounds(rounds).await;
    }
    // With `idle`, a fourth argument `tcp` or `quic` runs that transport only (for a profile or a system-call count).
    let only = args.next();
    let lat_n = 2000;
    let transports = [Transport::Tcp, Transport::Quic];
    let mut tp = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    let mut idle = [Vec::new(), Vec::new()];
    let mut busy = [Vec::new(), Vec::new()];
    let mut urgent = [Vec::new(), Vec::new()];
    let (mut be_idle, mut be_busy, mut be_lost) = (Vec::new(), Vec::new(), 0);
    for r in 0..rounds {
        // Alternate which transport goes first, so that neither always runs on a warmer machine.
        let order: Vec<usize> = if r % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for &i in &order {
            if only_idle {
                if only.as_deref().is_some_and(|o| o != transports[i].to_string()) {
                    continue;
                }
                let (cs0, cpu0) = (context_switches(), cpu_seconds());
                let mut v = if in_task {
                    tokio::spawn(latency(transports[i], lat_n, false, Mode::Plain)).await.expect("the round's task")?.0
                } else {
                    latency(transports[i], lat_n, false, Mode::Plain).await?.0
                };
                let cs = (context_switches() - cs0) as f64 / lat_n as f64;
                let cpu = (cpu_seconds() - cpu0) * 1e6 / lat_n as f64;
                println!(
                    "round {r} {}: idle p50 {:.1} us, {cs:.1} voluntary context switches and {cpu:.0} us CPU per event \
                     (both nodes)",
                    transports[i],
                    pct(&mut v, 0.5)
                );
                idle[i].extend(v);
                continue;
            }
            let (rate, us) = throughput(transports[i], n, 1024).await?;
            tp[i].push(rate);
            cpu[i].push(us);
            if only_throughput {
                continue;
            }
            idle[i].extend(latency(transports[i], lat_n, false, Mode::Plain).await?.0);
            busy[i].extend(latency(transports[i], lat_n / 4, true, Mode::Plain).await?.0);
            urgent[i].extend(latency(transports[i], lat_n / 4, true, Mode::Urgent).await?.0);
            if transports[i] == Transport::Quic {
                let (v, l) = latency(Transport::Quic, lat_n, false, Mode::BestEffort).await?;
                be_idle.extend(v);
                let (v, l2) = latency(Transport::Quic, lat_n / 4, true, Mode::BestEffort).await?;
                be_busy.extend(v);
                be_lost += l + l2;
            }
        }
    }
    let median = |v: &mut Vec<f64>| pct(v, 0.5);
    if only_idle {
        if only.is_some() {
            return Ok(());
        }
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (a, b) = (pct(&mut idle[0], p), pct(&mut idle[1], p));
            println!("| one-way latency 100 B, idle link, {name} (us) | {a:.1} | {b:.1} | {:.2} |", b / a);
        }
        return Ok(());
    }
    println!("| figure ({rounds} rounds, alternated) | TCP | QUIC | QUIC/TCP |");
    println!("|---|---|---|---|");
    let (t0, t1) = (median(&mut tp[0]) / 1e3, median(&mut tp[1]) / 1e3);
    println!("| throughput, 1 KB events (k events/s, median round) | {t0:.0} | {t1:.0} | {:.2} |", t1 / t0);
    let (c0, c1) = (median(&mut cpu[0]), median(&mut cpu[1]));
    println!("| CPU per 1 KB event, both nodes (us, median round) | {c0:.2} | {c1:.2} | {:.2} |", c1 / c0);
    if only_throughput {
        return Ok(());
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (pct(&mut idle[0], p), pct(&mut idle[1], p));
        println!("| one-way latency 100 B, idle link, {name} (us) | {a:.1} | {b:.1} | {:.2} |", b / a);
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (pct(&mut busy[0], p), pct(&mut busy[1], p));
        println!("| 100 B behind a 64 KB bulk stream, no priorities, {name} (us) | {a:.1} | {b:.1} | {:.2} |", b / a);
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (pct(&mut urgent[0], p), pct(&mut urgent[1], p));
        println!("| 100 B behind a 64 KB bulk stream, priority 3, {name} (us) | {a:.1} | {b:.1} | {:.2} |", b / a);
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (pct(&mut be_idle, p), pct(&mut be_busy, p));
        println!(
            "| QUIC best-effort (datagrams) 100 B, {name} (us): idle link / behind bulk | {a:.1} | {b:.1} | {:.2} |",
            b / a
        );
    }
    println!("best-effort events lost (not arrived within 100 ms, all rounds): {be_lost}");
    for (i, t) in transports.iter().enumerate() {
        let plain = pct(&mut busy[i], 0.99) / pct(&mut idle[i], 0.99);
        let prio = pct(&mut urgent[i], 0.99) / pct(&mut idle[i], 0.99);
        println!(
            "{t}: p99 behind bulk / p99 idle = {plain:.1} without priorities, {prio:.1} with priority 3 (the issue \
             asks for at most 2)"
        );
    }
    let be = pct(&mut be_busy, 0.99) / pct(&mut idle[1], 0.99);
    println!("quic best-effort: p99 behind bulk / QUIC p99 idle = {be:.1}");
    Ok(())
}
