//! Two processes on one host: 100 B latency and 1->1 throughput between a node in this process and one in a child.
//!
//! Latency is a ping-pong (half the round trip, which needs no clock shared between the processes), one message in
//! flight. The floor is the same ping-pong over a plain TCP socket with blocking reads and writes in both processes,
//! measured in the same run, in turns with kecho (short rounds, so that a burst of other work on the machine hits
//! every configuration alike). kecho runs in its default mode and in the low-latency receive mode
//! (`NodeBuilder::low_latency`), over loopback TCP and over the same-host transport (through shared memory, and over
//! the Unix socket itself). The CPU each process spent per message is printed beside, since the low-latency mode
//! trades CPU for wake-ups.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use kecho::{Attrs, Node, Overflow, RecvError, SinkOptions};
use serde::Serialize;

use crate::child::{command, wait_bounded};
use crate::report::{fmt_ns, fmt_ratio, Check, Section, Table};
use crate::util::{count, histogram, runtime, start_registry, Summary};
use crate::BenchArgs;

const SIZE: usize = 100;
const ROUNDS: u64 = 4;
/// The spin budget of the low-latency runs.
const BUDGET: Duration = Duration::from_micros(200);

/// The links of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Link {
    Tcp,
    /// Same-host, over the Unix socket itself.
    Socket,
    /// Same-host, through shared memory.
    Shm,
}

/// How a kecho node of the run is configured (passed to the child as `LOWLAT_US,LINK`, LINK 0, 1 or 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct Mode {
    low_latency_us: u64,
    link: Link,
}

impl Mode {
    fn name(self) -> String {
        let t = match self.link {
            Link::Tcp => "kecho TCP",
            Link::Socket => "kecho same-host socket",
            Link::Shm => "kecho same-host shm",
        };
        if self.low_latency_us > 0 {
            format!("{t}, low-latency {} us", self.low_latency_us)
        } else {
            format!("{t}, default")
        }
    }

    fn arg(self) -> String {
        format!("{},{}", self.low_latency_us, self.link as u8)
    }

    fn parse(ll: &str, link: &str) -> Result<Mode> {
        let link = match link {
            "0" => Link::Tcp,
            "1" => Link::Socket,
            "2" => Link::Shm,
            other => bail!("link {other:?}"),
        };
        Ok(Mode { low_latency_us: ll.parse()?, link })
    }

    fn builder(self, registry: SocketAddr) -> kecho::NodeBuilder {
        Node::builder()
            .registry(registry)
            .low_latency(Duration::from_micros(self.low_latency_us))
            .same_host(self.link != Link::Tcp)
            .shared_memory((self.link == Link::Shm).then_some(256 << 10))
    }
}

const LL: u64 = BUDGET.as_micros() as u64;
const MODES: [Mode; 6] = [
    Mode { low_latency_us: 0, link: Link::Tcp },
    Mode { low_latency_us: LL, link: Link::Tcp },
    Mode { low_latency_us: 0, link: Link::Socket },
    Mode { low_latency_us: LL, link: Link::Socket },
    Mode { low_latency_us: 0, link: Link::Shm },
    Mode { low_latency_us: LL, link: Link::Shm },
];

#[derive(Debug, Serialize)]
struct LatencyRow {
    system: String,
    summary: Summary,
    /// CPU ns per message of the parent and of the child process (each process's whole CPU time).
    cpu_parent_ns: f64,
    cpu_child_ns: f64,
}

#[derive(Debug, Serialize)]
struct ThroughputRow {
    system: String,
    events: u64,
    secs: f64,
    rate: f64,
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let n = count(args, 20_000, 20);
    let warmup = count(args, 1_000, 5);
    let per_round = n.div_ceil(ROUNDS);
    let mut cells: Vec<(String, Histogram<u64>, f64, f64, u64)> = Vec::new();
    let mut add = |name: String, h: Histogram<u64>, cpu: (u64, u64), msgs: u64| -> Result<()> {
        match cells.iter_mut().find(|c| c.0 == name) {
            Some(c) => {
                c.1.add(&h).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
                c.2 += cpu.0 as f64;
                c.3 += cpu.1 as f64;
                c.4 += msgs;
            }
            None => cells.push((name, h, cpu.0 as f64, cpu.1 as f64, msgs)),
        }
        Ok(())
    };
    let rt = runtime()?;
    let (registry, reg) = rt.block_on(start_registry())?;
    for round in 0..ROUNDS {
        let (h, cpu) = blocking_pingpong(args, per_round, warmup).context("blocking socket")?;
        add("blocking socket".into(), h, cpu, per_round)?;
        for mode in MODES {
            let channel = format!("local-{round}-{}", mode.arg().replace(',', "-"));
            // On a worker thread of the runtime, as an application's tasks are (not on the thread blocked in
            // `block_on`, which every wake-up would have to unpark).
            let a = args.clone();
            let (h, cpu) = rt
                .block_on(async move {
                    tokio::spawn(async move { kecho_pingpong(&a, registry, &channel, mode, per_round, warmup).await })
                        .await?
                })
                .with_context(|| mode.name())?;
            add(mode.name(), h, cpu, per_round)?;
        }
    }
    let rows: Vec<LatencyRow> = cells
        .iter()
        .map(|(name, h, p, c, msgs)| LatencyRow {
            system: name.clone(),
            summary: Summary::of(h),
            cpu_parent_ns: p / *msgs as f64,
            cpu_child_ns: c / *msgs as f64,
        })
        .collect();

    let tn = count(args, 2_000_000, 1_000);
    let mut trows = Vec::new();
    for mode in [MODES[0], MODES[2], MODES[4]] {
        for batch in [1, STREAM_BATCH] {
            let channel = format!("local-stream-{}-{batch}", mode.arg().replace(',', "-"));
            let (events, secs) =
                rt.block_on(kecho_stream(args, registry, &channel, mode, tn, batch)).with_context(|| mode.name())?;
            let system = if batch == 1 { mode.name() } else { batched_name(mode) };
            trows.push(ThroughputRow { system, events, secs, rate: events as f64 / secs });
        }
    }
    rt.block_on(reg.shutdown());

    let mut s = Section::new("local");
    s.notes.push(format!(
        "{n} ping-pongs of {SIZE} B per configuration in {ROUNDS} rounds taken in turn, {warmup} before each round \
         not recorded; latency is half the round trip. CPU is each process's whole CPU time over the round, per \
         message. Low-latency budget {} us.",
        BUDGET.as_micros()
    ));
    let floor = rows.iter().find(|r| r.system == "blocking socket").map(|r| r.summary.p50).unwrap_or(f64::NAN);
    let mut t = Table::new(
        "two processes, 100 B ping-pong (rtt/2)",
        &["system", "p50", "p99", "p99.9", "p50 / blocking", "CPU/msg parent", "CPU/msg child"],
    );
    for r in &rows {
        t.row(vec![
            r.system.clone(),
            fmt_ns(r.summary.p50),
            fmt_ns(r.summary.p99),
            fmt_ns(r.summary.p999),
            fmt_ratio(r.summary.p50 / floor),
            fmt_ns(r.cpu_parent_ns),
            fmt_ns(r.cpu_child_ns),
        ]);
    }
    s.tables.push(t);
    let mut t = Table::new("two processes, 100 B events 1->1", &["system", "events", "seconds", "events/s"]);
    for r in &trows {
        t.row(vec![r.system.clone(), r.events.to_string(), format!("{:.2}", r.secs), format!("{:.2} M", r.rate / 1e6)]);
    }
    s.tables.push(t);
    let p50 = |name: &str| rows.iter().find(|r| r.system == name).map(|r| r.summary.p50);
    if let Some(ll) = p50(&MODES[1].name()) {
        s.checks.push(Check::at_most("low-latency p50 (TCP) / blocking socket p50", ll / floor, 2.0, "x"));
    }
    if let Some(ll) = p50(&MODES[5].name()) {
        s.checks.push(Check::at_most("low-latency p50 (same-host shm) / blocking socket p50", ll / floor, 2.0, "x"));
        s.checks.push(Check::at_most("low-latency p50 (same-host shm)", ll / 1000.0, 5.0, "us"));
    }
    if let Some(r) = trows.iter().find(|r| r.system == batched_name(MODES[4])) {
        s.checks.push(Check::at_least("same-host shm 100 B 1->1 (batched)", r.rate / 1e6, 15.0, "M/s"));
    }
    s.put("latency", &rows);
    s.put("throughput", &trows);
    Ok(s)
}

/// CPU time of this whole process, in ns.
fn process_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Starts a child with `role`, its standard output piped.
fn spawn(args: &BenchArgs, role: &str) -> Result<std::process::Child> {
    let (exe, argv) = command(args, role)?;
    Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the child")
}

/// Reads one line of a child's output.
fn line(child: &mut std::process::Child) -> Result<String> {
    let out = child.stdout.as_mut().context("child stdout")?;
    let mut l = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b)? == 1 && b[0] != b'\n' {
        l.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&l).into_owned())
}

/// The child's last line, `cpu NS`.
fn finish(args: &BenchArgs, mut child: std::process::Child) -> Result<u64> {
    let l = line(&mut child)?;
    wait_bounded(&mut child, Duration::from_secs(args.child_timeout))?;
    l.strip_prefix("cpu ").and_then(|v| v.parse().ok()).with_context(|| format!("child said {l:?}"))
}

fn blocking_pingpong(args: &BenchArgs, n: u64, warmup: u64) -> Result<(Histogram<u64>, (u64, u64))> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let child = spawn(args, &format!("local-echo,{addr},{}", n + warmup))?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut h = histogram();
    let mut msg = vec![0x5au8; SIZE + 4];
    msg[..4].copy_from_slice(&(SIZE as u32).to_le_bytes());
    let mut back = vec![0u8; SIZE + 4];
    let cpu0 = process_cpu_ns();
    for i in 0..n + warmup {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= warmup {
            h.saturating_record((t0.elapsed().as_nanos() as u64 / 2).max(1));
        }
    }
    let cpu = process_cpu_ns() - cpu0;
    drop(s);
    Ok((h, (cpu, finish(args, child)?)))
}

/// The child of the blocking floor: echoes `n` length-prefixed messages with blocking reads and writes.
pub fn echo_child(addr: SocketAddr, n: u64) -> Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; SIZE + 4];
    let cpu0 = process_cpu_ns();
    for _ in 0..n {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
    println!("cpu {}", process_cpu_ns() - cpu0);
    Ok(())
}

async fn kecho_pingpong(
    args: &BenchArgs,
    registry: SocketAddr,
    channel: &str,
    mode: Mode,
    n: u64,
    warmup: u64,
) -> Result<(Histogram<u64>, (u64, u64))> {
    let node = mode.builder(registry).start().await?;
    let ping = node.create_channel(&format!("{channel}.ping")).await?;
    let pong = node.create_channel(&format!("{channel}.pong")).await?;
    let mut sink = pong.sink(SinkOptions::new().capacity(1024).overflow(Overflow::Block))?;
    let mut src = ping.source()?;
    let mut child = spawn(args, &format!("local-kecho,{registry},{channel},{},{}", mode.arg(), n + warmup))?;
    let ready = tokio::task::block_in_place(|| line(&mut child))?;
    if ready != "ready" {
        bail!("child said {ready:?}");
    }
    ping.wait_for_sinks(1, Duration::from_secs(10)).await?;
    let attrs = Attrs::new();
    let payload = vec![0x5au8; SIZE];
    let mut h = histogram();
    let cpu0 = process_cpu_ns();
    for i in 0..n + warmup {
        let t0 = Instant::now();
        src.submit("e", &attrs, &payload).await?;
        match tokio::time::timeout(Duration::from_secs(10), sink.recv()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("pong sink: {e}"),
            Err(_) => bail!("no pong within 10 s"),
        }
        if i >= warmup {
            h.saturating_record((t0.elapsed().as_nanos() as u64 / 2).max(1));
        }
    }
    let cpu = process_cpu_ns() - cpu0;
    let child_cpu = tokio::task::block_in_place(|| finish(args, child))?;
    drop((src, sink));
    node.shutdown().await;
    Ok((h, (cpu, child_cpu)))
}

/// The child of a kecho ping-pong: a sink on `CHANNEL.ping` whose events go back on `CHANNEL.pong`.
pub fn kecho_child(registry: SocketAddr, channel: &str, ll: &str, sh: &str, n: u64) -> Result<()> {
    let mode = Mode::parse(ll, sh)?;
    let rt = runtime()?;
    let channel = channel.to_owned();
    // Spawned inside the runtime (`tokio::spawn` outside `block_on` panics: no reactor), on a worker thread.
    let cpu = rt.block_on(async move {
        tokio::spawn(async move {
            let node = mode.builder(registry).start().await?;
            let ping = node.open_channel(&format!("{channel}.ping")).await?;
            let pong = node.open_channel(&format!("{channel}.pong")).await?;
            let mut sink = ping.sink(SinkOptions::new().capacity(1024).overflow(Overflow::Block))?;
            let mut src = pong.source()?;
            println!("ready");
            std::io::stdout().flush()?;
            pong.wait_for_sinks(1, Duration::from_secs(10)).await?;
            let attrs = Attrs::new();
            let cpu0 = process_cpu_ns();
            for _ in 0..n {
                let ev = match tokio::time::timeout(Duration::from_secs(10), sink.recv()).await {
                    Ok(Ok(ev)) => ev,
                    Ok(Err(e)) => bail!("ping sink: {e}"),
                    Err(_) => bail!("no ping within 10 s"),
                };
                src.submit("e", &attrs, ev.payload()).await?;
            }
            let cpu = process_cpu_ns() - cpu0;
            drop((src, sink));
            node.shutdown().await;
            Ok::<_, anyhow::Error>(cpu)
        })
        .await
    })??;
    println!("cpu {cpu}");
    Ok(())
}

/// Events per `Source::submit_many` (and at most 16 times as many per `Sink::recv_many`) in the batched 1->1 runs.
const STREAM_BATCH: usize = 256;

/// The name of a batched 1->1 run.
fn batched_name(mode: Mode) -> String {
    format!("{}, batched ({STREAM_BATCH} per submit_many)", mode.name())
}

/// 1->1 throughput: this process's source submits `n` events as fast as it can, one at a time (`batch` 1) or `batch`
/// at a time; the child counts them, received the same way. Returns the events received and the seconds from the
/// first submit to the child's last arrival (the child reports when).
async fn kecho_stream(
    args: &BenchArgs,
    registry: SocketAddr,
    channel: &str,
    mode: Mode,
    n: u64,
    batch: usize,
) -> Result<(u64, f64)> {
    let node = mode.builder(registry).start().await?;
    let ch = node.create_channel(channel).await?;
    let mut child = spawn(args, &format!("local-count,{registry},{channel},{},{n},{batch}", mode.arg()))?;
    let ready = tokio::task::block_in_place(|| line(&mut child))?;
    if ready != "ready" {
        bail!("child said {ready:?}");
    }
    ch.wait_for_sinks(1, Duration::from_secs(10)).await?;
    let mut src = ch.source()?;
    let attrs = Attrs::new();
    let payload = vec![0x5au8; SIZE];
    let payloads = vec![payload.clone(); batch];
    let t0 = Instant::now();
    if batch <= 1 {
        for _ in 0..n {
            src.submit("e", &attrs, &payload).await?;
        }
    } else {
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(batch);
            src.submit_many("e", &attrs, &payloads[..k]).await?;
            left -= k;
        }
    }
    let done = tokio::task::block_in_place(|| line(&mut child))?;
    let secs = t0.elapsed().as_secs_f64();
    let _ = tokio::task::block_in_place(|| finish(args, child));
    drop(src);
    node.shutdown().await;
    let got: u64 = done
        .strip_prefix("received ")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("child said {done:?}"))?;
    if got != n {
        bail!("{done} of {n} (a Block sink must lose nothing)");
    }
    Ok((got, secs))
}

/// The child of a throughput run: a Block sink that counts `n` events (received one at a time for `batch` 1, else
/// with `recv_many` and one timeout per call), says when it has them all, and leaves.
pub fn count_child(registry: SocketAddr, channel: &str, ll: &str, sh: &str, n: u64, batch: usize) -> Result<()> {
    let mode = Mode::parse(ll, sh)?;
    let rt = runtime()?;
    let (got, lost, cpu) = rt.block_on(async {
        let node = mode.builder(registry).start().await?;
        let ch = node.open_channel(channel).await?;
        let mut sink = ch.sink(SinkOptions::new().capacity(65_536).overflow(Overflow::Block))?;
        println!("ready");
        std::io::stdout().flush()?;
        let (mut got, mut lost) = (0u64, 0u64);
        let cpu0 = process_cpu_ns();
        let mut evs = Vec::with_capacity(16 * batch);
        while got + lost < n {
            if batch <= 1 {
                match tokio::time::timeout(Duration::from_secs(30), sink.recv()).await {
                    Ok(Ok(_)) => got += 1,
                    Ok(Err(RecvError::Lagged(k))) => lost += k,
                    Ok(Err(_)) | Err(_) => break,
                }
            } else {
                match tokio::time::timeout(Duration::from_secs(30), sink.recv_many(&mut evs, 16 * batch)).await {
                    Ok(Ok(k)) => got += k as u64,
                    Ok(Err(RecvError::Lagged(k))) => lost += k,
                    Ok(Err(_)) | Err(_) => break,
                }
                evs.clear();
            }
        }
        println!("received {got} lost {lost}");
        std::io::stdout().flush()?;
        let cpu = process_cpu_ns() - cpu0;
        drop(sink);
        node.shutdown().await;
        Ok::<_, anyhow::Error>((got, lost, cpu))
    })?;
    let _ = (got, lost);
    println!("cpu {cpu}");
    Ok(())
}
