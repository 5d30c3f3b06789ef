//! Urgent events behind a bulk transfer (issue 16, priorities): one-way latency of 100 B events sent one at a time
//! from node A to node B while a second channel's source on A streams 64 KB events to B as fast as the link takes
//! them. Measured in one run, rounds alternated: on an idle link; behind the bulk with no priority; behind the bulk
//! with the highest priority; the last again without `TCP_NOTSENT_LOWAT` (the kernel's default send buffer), and
//! with a 256 KiB and a 64 KiB receive buffer (on loopback the receiving node is the slower side, so the backlog forms
//! in its kernel receive buffer, where priorities cannot reach it); and over QUIC idle, behind the bulk with no
//! priority, and with the highest (on the link's urgent stream). The target: the urgent event's p99 behind
//! the bulk at most 2x its p99 on the same transport's idle link.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, EventOptions, Node, Overflow, Priority, RecvError, RegistryClient, SinkOptions};
use serde::Serialize;

use crate::pipe::fresh_name;
use crate::report::{fmt_ns, fmt_ratio, Check, Section, Table};
use crate::util::{count, histogram, stamp, stamp_of, stamped, Summary};
use crate::BenchArgs;

/// One configuration of the run.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
enum Case {
    Idle,
    BulkPlain,
    BulkPriority,
    BulkPriorityNoLowat,
    BulkPrioritySmallRcvbuf,
    BulkPriorityRcvbuf64,
    QuicIdle,
    QuicBulkPlain,
    QuicBulkPriority,
}

impl Case {
    const ALL: [Case; 9] = [
        Case::Idle,
        Case::BulkPlain,
        Case::BulkPriority,
        Case::BulkPriorityNoLowat,
        Case::BulkPrioritySmallRcvbuf,
        Case::BulkPriorityRcvbuf64,
        Case::QuicIdle,
        Case::QuicBulkPlain,
        Case::QuicBulkPriority,
    ];

    fn quic(self) -> bool {
        matches!(self, Case::QuicIdle | Case::QuicBulkPlain | Case::QuicBulkPriority)
    }

    fn label(self) -> &'static str {
        match self {
            Case::Idle => "idle link, default priority",
            Case::BulkPlain => "behind 64 KB bulk, default priority",
            Case::BulkPriority => "behind 64 KB bulk, priority 3",
            Case::BulkPriorityNoLowat => "behind 64 KB bulk, priority 3, no TCP_NOTSENT_LOWAT",
            Case::BulkPrioritySmallRcvbuf => "behind 64 KB bulk, priority 3, receive buffer 256 KiB",
            Case::BulkPriorityRcvbuf64 => "behind 64 KB bulk, priority 3, receive buffer 64 KiB",
            Case::QuicIdle => "QUIC: idle link, default priority",
            Case::QuicBulkPlain => "QUIC: behind 64 KB bulk, default priority",
            Case::QuicBulkPriority => "QUIC: behind 64 KB bulk, priority 3 (urgent stream)",
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    case: Case,
    latency: Summary,
    bulk_mb_s: f64,
}

const BULK_SIZE: usize = 64 << 10;
const URGENT_SIZE: usize = 100;
/// Between two urgent events.
const PACE: Duration = Duration::from_micros(1000);

pub fn run(args: &BenchArgs) -> Result<Section> {
    // RUST_LOG=kecho=info (say) shows why a link was lost, on standard error.
    if std::env::var_os("RUST_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::from_default_env();
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let n = count(args, 2000, 20);
    let rounds = if args.scale < 0.1 { 1 } else { 3 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut hists: Vec<_> = Case::ALL.iter().map(|_| histogram()).collect();
    let mut bulk_rate: Vec<Vec<f64>> = Case::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Alternate the order so that the machine's changing load meets every case alike.
        let mut order: Vec<usize> = (0..Case::ALL.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let case = Case::ALL[i];
            eprintln!("kecho-bench: priority round {}: {}", round + 1, case.label());
            let (lat, mb_s) = rt.block_on(one(case, n)).with_context(|| case.label().to_owned())?;
            for v in lat {
                hists[i].record(v.max(1)).context("recording a latency")?;
            }
            bulk_rate[i].push(mb_s);
        }
    }
    let rows: Vec<Row> = Case::ALL
        .iter()
        .zip(&hists)
        .zip(&mut bulk_rate)
        .map(|((c, h), r)| Row { case: *c, latency: Summary::of(h), bulk_mb_s: crate::util::median(r) })
        .collect();
    let mut s = Section::new("priority");
    let idle_of = |c: Case| if c.quic() { rows[6].latency } else { rows[0].latency };
    let mut t = Table::new(
        "urgent 100 B events behind a 64 KB bulk stream (one-way, loopback TCP and QUIC; ratios to the same \
         transport's idle p99)",
        &["case", "p50", "p99", "p99.9", "p99 / idle p99", "bulk MB/s"],
    );
    for r in &rows {
        t.row(vec![
            r.case.label().into(),
            fmt_ns(r.latency.p50),
            fmt_ns(r.latency.p99),
            fmt_ns(r.latency.p999),
            fmt_ratio(r.latency.p99 / idle_of(r.case).p99),
            if matches!(r.case, Case::Idle | Case::QuicIdle) { "-".into() } else { format!("{:.0}", r.bulk_mb_s) },
        ]);
    }
    s.tables.push(t);
    s.checks.push(Check::at_most(
        "urgent p99 behind bulk (priority 3) / idle p99",
        rows[2].latency.p99 / rows[0].latency.p99,
        2.0,
        "x",
    ));
    s.checks.push(Check::at_most(
        "QUIC: urgent p99 behind bulk (priority 3) / QUIC idle p99",
        rows[8].latency.p99 / rows[6].latency.p99,
        2.0,
        "x",
    ));
    s.notes.push(format!(
        "{rounds} round(s) of {n} urgent events per case, paced {} us apart, cases alternated; two nodes in one \
         process (2 runtime workers); the bulk source submits 64 KB events to a Block sink that reads all it gets.",
        PACE.as_micros()
    ));
    s.put("rows", &rows);
    Ok(s)
}

/// One measurement: fresh nodes, the bulk stream if the case has one, `n` urgent events; their one-way latencies in
/// nanoseconds and the bulk's MB/s.
async fn one(case: Case, n: u64) -> Result<(Vec<u64>, f64)> {
    let reg = RegistryClient::in_process_private();
    let builder = || {
        let b = Node::builder().registry_client(reg.clone());
        match case {
            Case::BulkPriorityNoLowat => b.send_lowat(None),
            Case::BulkPrioritySmallRcvbuf => b.recv_buffer(Some(256 << 10)),
            Case::BulkPriorityRcvbuf64 => b.recv_buffer(Some(64 << 10)),
            c if c.quic() => b.transport(kecho::Transport::Quic),
            _ => b,
        }
    };
    let a: Node = builder().start().await?;
    let b: Node = builder().start().await?;
    let urgent_name = fresh_name("urgent");
    let bulk_name = fresh_name("bulk");
    let ch_b = b.channel(&urgent_name).await?;
    let mut urgent_sink = ch_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(4096))?;
    let bulk_b = b.channel(&bulk_name).await?;
    let mut bulk_sink = bulk_b.sink(SinkOptions::new().overflow(Overflow::Block).capacity(1024))?;
    let ch_a = a.channel(&urgent_name).await?;
    let bulk_a = a.channel(&bulk_name).await?;
    ch_a.wait_for_sinks(1, Duration::from_secs(10)).await?;
    bulk_a.wait_for_sinks(1, Duration::from_secs(10)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let bulk_bytes = Arc::new(AtomicU64::new(0));
    let reader = {
        let bytes = bulk_bytes.clone();
        tokio::spawn(async move {
            loop {
                match bulk_sink.recv().await {
                    Ok(e) => {
                        bytes.fetch_add(e.payload().len() as u64, Ordering::Relaxed);
                    }
                    Err(RecvError::Closed) => return,
                    Err(_) => {}
                }
            }
        })
    };
    let writer = if matches!(case, Case::Idle | Case::QuicIdle) {
        None
    } else {
        let mut src = bulk_a.source()?;
        let stop = stop.clone();
        Some(tokio::spawn(async move {
            let payload = vec![0u8; BULK_SIZE];
            while !stop.load(Ordering::Relaxed) {
                src.submit("bulk", &Attrs::new(), &payload).await?;
                // A submit that finds room (or no sink) does not wait: yield, or this loop could keep a runtime
                // worker from the tasks it shares it with.
                tokio::task::yield_now().await;
            }
            anyhow::Ok(())
        }))
    };
    // Let the bulk fill the link's queues before measuring.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let start_bytes = bulk_bytes.load(Ordering::Relaxed);

    let mut src = ch_a.source()?;
    let opts = match case {
        Case::Idle | Case::BulkPlain | Case::QuicIdle | Case::QuicBulkPlain => EventOptions::new(),
        _ => EventOptions::new().priority(Priority::HIGHEST),
    };
    let receive = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n as usize);
        while lat.len() < n as usize {
            match tokio::time::timeout(Duration::from_secs(30), urgent_sink.recv()).await {
                Ok(Ok(e)) => lat.push(crate::util::epoch_ns().saturating_sub(stamp_of(e.payload()))),
                Ok(Err(e)) => bail!("urgent sink: {e}"),
                Err(_) => bail!("urgent events stopped arriving"),
            }
        }
        Ok(lat)
    });
    let mut payload = stamped(URGENT_SIZE);
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..n {
        tick.tick().await;
        stamp(&mut payload);
        src.submit_with("urgent", &Attrs::new(), &payload, opts).await?;
    }
    let lat = match receive.await.context("urgent receiver")? {
        Ok(l) => l,
        Err(e) => {
            // What the channels and links saw, to tell a stalled link from sinks that left the routes.
            eprintln!("kecho-bench: priority: urgent channel at A {:?}, at B {:?}", ch_a.stats(), ch_b.stats());
            eprintln!("kecho-bench: priority: bulk channel at A {:?}; links of A {:?}", bulk_a.stats(), a.link_stats());
            return Err(e);
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let mb_s = (bulk_bytes.load(Ordering::Relaxed) - start_bytes) as f64 / secs / 1e6;
    stop.store(true, Ordering::Relaxed);
    drop(src);
    a.kill();
    b.kill();
    if let Some(w) = writer {
        // The bulk source may be waiting for room on a link that is gone: it ends with an error, which is expected.
        w.abort();
    }
    reader.abort();
    Ok((lat, mb_s))
}
