//! Urgent events behind a bulk stream where the link, not the CPU, is the bottleneck (issue 16): two network
//! namespaces joined by a veth pair whose ends are shaped to 200 Mbit/s (`tbf rate 200mbit burst 32kb latency 5ms`),
//! node B (and the registry) in one, node A in the other, each in a process of its own. A sends 100 B events paced
//! 2 ms apart to B, on an idle link or while a second channel's source on A streams 64 KB events to B as fast as the
//! link takes them; B measures each one-way latency (one clock: the namespaces share the host). Cases: TCP with one
//! connection without priorities and with priority 3, TCP with the urgent connection (priority 3), QUIC (priority 3)
//! with its urgent stream (urgent connections off) and with its urgent connection, each with its idle baseline; under three shapers: tbf with its own FIFO, tbf with
//! `pfifo_fast` inside (three bands by socket priority: 6, the urgent connection's mark, goes to the first; `prio`
//! would do the same, but this kernel lacks it), and `htb` at the same rate with a class for DSCP EF (the urgent
//! connection's other mark, matched by a `u32` filter) served before the rest. The veth ends' transmit queue is 100
//! packets, so that the queues hold about as much (tbf's own: 5 ms at the rate, 125 KB plus the 32 KB burst).
//! Rounds alternate the order. While a bulk case runs, the shaper's queue (backlog) is sampled, to say how long a packet waits there.
//!
//! Needs root (namespaces, tc); not part of `all`. `kecho-bench urgent-net`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, EventOptions, Node, Overflow, Priority, RecvError, SinkOptions, Transport};

use crate::report::{fmt_ns, fmt_ratio, Check, Section, Table};
use crate::util::{count, histogram, stamp_of, Summary};
use crate::BenchArgs;

const RATE: &str = "200mbit";
const BULK_SIZE: usize = 64 << 10;
const PACE: Duration = Duration::from_millis(2);
const B_IP: &str = "10.77.7.2";
const A_IP: &str = "10.77.7.1";
const REG_PORT: u16 = 7401;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Case {
    name: &'static str,
    quic: bool,
    two: bool,
    prio: bool,
    bulk: bool,
    /// The idle case this one is compared with.
    idle: &'static str,
}

const CASES: [Case; 9] = [
    Case { name: "tcp1-idle", quic: false, two: false, prio: true, bulk: false, idle: "tcp1-idle" },
    Case { name: "tcp1-bulk-noprio", quic: false, two: false, prio: false, bulk: true, idle: "tcp1-idle" },
    Case { name: "tcp1-bulk-prio", quic: false, two: false, prio: true, bulk: true, idle: "tcp1-idle" },
    Case { name: "tcp2-idle", quic: false, two: true, prio: true, bulk: false, idle: "tcp2-idle" },
    Case { name: "tcp2-bulk-prio", quic: false, two: true, prio: true, bulk: true, idle: "tcp2-idle" },
    Case { name: "quic-idle", quic: true, two: false, prio: true, bulk: false, idle: "quic-idle" },
    Case { name: "quic-bulk-prio", quic: true, two: false, prio: true, bulk: true, idle: "quic-idle" },
    Case { name: "quic2-idle", quic: true, two: true, prio: true, bulk: false, idle: "quic2-idle" },
    Case { name: "quic2-bulk-prio", quic: true, two: true, prio: true, bulk: true, idle: "quic2-idle" },
];

fn label(c: &Case) -> String {
    let t = match (c.quic, c.two) {
        (true, true) => "QUIC, urgent connection",
        (true, false) => "QUIC, urgent stream",
        (false, true) => "TCP, urgent connection",
        (false, false) => "TCP, one connection",
    };
    let p = if c.prio { "priority 3" } else { "default priority" };
    let l = if c.bulk { "behind 64 KB bulk" } else { "idle link" };
    format!("{t}: {l}, {p}")
}

fn sh(args: &[&str]) -> Result<String> {
    let out =
        Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().with_context(|| args[0].to_owned())?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces and the shaped veth pair between them; deleted on drop.
struct Net {
    a: String,
    b: String,
}

impl Net {
    fn new() -> Result<Net> {
        let id = std::process::id();
        let net = Net { a: format!("ku7a{id}"), b: format!("ku7b{id}") };
        sh(&["ip", "netns", "add", &net.a])?;
        sh(&["ip", "netns", "add", &net.b])?;
        sh(&["ip", "link", "add", "ku7va", "netns", &net.a, "type", "veth", "peer", "name", "ku7vb", "netns", &net.b])?;
        for (ns, dev, ip) in [(&net.a, "ku7va", A_IP), (&net.b, "ku7vb", B_IP)] {
            sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "txqueuelen", "100"])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The shaper on both ends, with `inner` (`fifo` or `pfifo_fast`) as its queue.
    fn shape(&self, inner: &str) -> Result<()> {
        for (ns, dev) in [(&self.a, "ku7va"), (&self.b, "ku7vb")] {
            let _ = sh(&["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"]);
            if inner == "htb-ef" {
                // The same rate from an htb shaper, with a class served first for DSCP EF (the urgent connection).
                let tc = |args: &[&str]| {
                    let mut v = vec!["ip", "netns", "exec", ns.as_str(), "tc"];
                    v.extend_from_slice(args);
                    sh(&v)
                };
                tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20"])?;
                tc(&[
                    "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", RATE, "burst", "32kb",
                ])?;
                for (id, rate, prio) in [("1:10", "20mbit", "0"), ("1:20", "180mbit", "1")] {
                    tc(&[
                        "class", "add", "dev", dev, "parent", "1:1", "classid", id, "htb", "rate", rate, "ceil", RATE,
                        "prio", prio, "burst", "32kb",
                    ])?;
                }
                tc(&[
                    "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
                    "tos", "0xb8", "0xfc", "flowid", "1:10",
                ])?;
                continue;
            }
            sh(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate",
                RATE, "burst", "32kb", "latency", "5ms",
            ])?;
            if inner == "prio" {
                sh(&[
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                    "prio",
                ])?;
            }
        }
        Ok(())
    }

    /// Packets A's shaper sent in its class for DSCP EF (the `htb-ef` set-up), for the record.
    fn ef_packets(&self) -> Option<String> {
        let out = sh(&["ip", "netns", "exec", &self.a, "tc", "-s", "class", "show", "dev", "ku7va", "classid", "1:10"])
            .ok()?;
        out.lines().find(|l| l.trim_start().starts_with("Sent")).map(|l| l.trim().to_owned())
    }

    /// Bytes queued in A's shaper now.
    fn backlog(&self) -> Option<u64> {
        let out = sh(&["ip", "netns", "exec", &self.a, "tc", "-s", "qdisc", "show", "dev", "ku7va"]).ok()?;
        // "backlog 151396b 101p requeues 0" of the root (first) qdisc.
        let l = out.lines().find(|l| l.trim_start().starts_with("backlog"))?;
        let v = l.split_whitespace().nth(1)?;
        let n: f64 = v.trim_end_matches('b').trim_end_matches('K').trim_end_matches('M').parse().ok()?;
        let mult = if v.ends_with("Kb") {
            1024.0
        } else if v.ends_with("Mb") {
            1048576.0
        } else {
            1.0
        };
        Some((n * mult) as u64)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.a]);
        let _ = sh(&["ip", "netns", "del", &self.b]);
    }
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let n = count(args, 1000, 20);
    let rounds = if args.scale < 0.1 { 1 } else { 3 };
    let net = Net::new().context("building the namespaces (needs root, iproute2 and tc)")?;
    let qdiscs = ["fifo", "pfifo_fast", "htb-ef"];
    let mut hists: Vec<Vec<_>> = qdiscs.iter().map(|_| CASES.iter().map(|_| histogram()).collect()).collect();
    let mut backlogs: Vec<Vec<Vec<u64>>> = qdiscs.iter().map(|_| CASES.iter().map(|_| Vec::new()).collect()).collect();
    for round in 0..rounds {
        for (qi, q) in qdiscs.iter().enumerate() {
            net.shape(q)?;
            let mut order: Vec<usize> = (0..CASES.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let c = &CASES[i];
                eprintln!("kecho-bench: urgent-net round {} qdisc {q}: {}", round + 1, label(c));
                let (lat, bl) = one(args, &net, c, n).with_context(|| format!("{q} {}", c.name))?;
                for v in lat {
                    hists[qi][i].record(v.max(1))?;
                }
                backlogs[qi][i].extend(bl);
                if *q == "htb-ef" {
                    eprintln!("kecho-bench: urgent-net: A's EF class so far: {}", net.ef_packets().unwrap_or_default());
                }
            }
        }
    }
    let mut s = Section::new("urgent-net");
    for (qi, q) in qdiscs.iter().enumerate() {
        let sum: Vec<Summary> = hists[qi].iter().map(Summary::of).collect();
        let idle_of = |c: &Case| sum[CASES.iter().position(|x| x.name == c.idle).unwrap_or(0)];
        let mut t = Table::new(
            format!(
                "urgent 100 B events, namespaces joined by a veth pair shaped to {RATE} ({}); ratio to the same \
                 configuration's idle p99; backlog: A's shaper queue sampled during the bulk cases (median)",
                match *q {
                    "htb-ef" => "htb, DSCP EF in a class served first",
                    "fifo" => "tbf, its own FIFO",
                    _ => "tbf, pfifo_fast inside: socket priority 6 served first",
                }
            ),
            &["case", "p50", "p99", "p99.9", "p99 / idle p99", "shaper backlog", "its wait at the rate"],
        );
        for (i, c) in CASES.iter().enumerate() {
            let mut b = backlogs[qi][i].clone();
            b.sort_unstable();
            let med = b.get(b.len() / 2).copied();
            t.row(vec![
                label(c),
                fmt_ns(sum[i].p50),
                fmt_ns(sum[i].p99),
                fmt_ns(sum[i].p999),
                fmt_ratio(sum[i].p99 / idle_of(c).p99),
                med.map_or("-".into(), |m| format!("{} KB", m / 1000)),
                med.map_or("-".into(), |m| fmt_ns(m as f64 * 8.0 / 200e6 * 1e9)),
            ]);
            if c.bulk && c.prio {
                s.checks.push(Check::at_most(
                    format!("{q}: {} p99 / idle p99", c.name),
                    sum[i].p99 / idle_of(c).p99,
                    2.0,
                    "x",
                ));
            }
        }
        s.tables.push(t);
    }
    s.notes.push(format!(
        "{rounds} round(s) of {n} urgent events per case and queueing discipline, paced {} ms apart, cases alternated; \
         node A and node B each in a process and a network namespace of its own; the bulk source submits 64 KB events \
         to a Block sink at B that reads all it gets.",
        PACE.as_millis()
    ));
    Ok(s)
}

/// One case: B (registry, sinks) then A (sources) in their namespaces; B's latencies, and backlog samples.
fn one(args: &BenchArgs, net: &Net, c: &Case, n: u64) -> Result<(Vec<u64>, Vec<u64>)> {
    let role = |side: &str| format!("urgent-net-{side},{},{},{},{},{n}", c.quic, c.two, c.prio, c.bulk);
    let spawn = |ns: &str, role: String| -> Result<std::process::Child> {
        let (exe, argv) = crate::child::command(args, &role)?;
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a child")
    };
    let mut b = spawn(&net.b, role("b"))?;
    let mut b_out = BufReader::new(b.stdout.take().context("stdout")?);
    let mut line = String::new();
    b_out.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("node B: {line:?}");
    }
    let mut a = spawn(&net.a, role("a"))?;
    let mut backlog = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = if c.bulk {
        let (stop, a_ns) = (stop.clone(), net.a.clone());
        Some(std::thread::spawn(move || {
            let net = Net { a: a_ns, b: String::new() };
            let mut v = Vec::new();
            std::thread::sleep(Duration::from_millis(800));
            while !stop.load(Ordering::Relaxed) {
                if let Some(x) = net.backlog() {
                    v.push(x);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            std::mem::forget(net);
            v
        }))
    } else {
        None
    };
    line.clear();
    b_out.read_line(&mut line)?;
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        backlog = s.join().unwrap_or_default();
    }
    drop(a.stdin.take());
    drop(b.stdin.take());
    let _ = a.wait();
    let _ = b.wait();
    let lat: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if lat.len() as u64 != n {
        bail!("node B reported {} latencies of {n}: {line:?}", lat.len());
    }
    let _ = std::io::stdout().flush();
    Ok((lat, backlog))
}

fn builder(quic: bool, two: bool, ip: &str) -> Result<kecho::NodeBuilder> {
    let b = Node::builder()
        .listen(format!("{ip}:0").parse()?)
        .registry(format!("{B_IP}:{REG_PORT}").parse()?)
        .urgent_connection(two);
    Ok(if quic { b.transport(Transport::Quic) } else { b })
}

/// Nanoseconds of the wall clock: the two processes share the host's (the namespaces are network ones only), so a
/// send time stamped by A is read against it by B.
fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Waits for standard input to close (the parent says the run is over).
async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut s);
    })
    .await;
}

/// Node B: the registry, the urgent and bulk sinks; prints `ready`, then the urgent events' latencies (ns).
pub fn child_b(quic: bool, two: bool, n: u64) -> Result<()> {
    let rt = crate::util::runtime()?;
    rt.block_on(async {
        let server = kecho_registry::RegistryServer::bind(format!("{B_IP}:{REG_PORT}").parse()?).await?;
        let _reg = server.spawn();
        let b = builder(quic, two, B_IP)?.start().await?;
        let ch = b.create_channel("urgent").await?;
        // The warm-up event must reach B (a source does not send an event of a type no sink takes): it is what makes
        // the link carry priorities before the bulk starts.
        let sink = SinkOptions::new().types(["warm-up", "urgent"]).overflow(Overflow::Block).capacity(4096);
        let mut urgent = ch.sink(sink)?;
        let bulk = b.create_channel("bulk").await?;
        let mut bulk_sink = bulk.sink(SinkOptions::new().overflow(Overflow::Block).capacity(1024))?;
        let drain = tokio::spawn(async move {
            loop {
                match bulk_sink.recv().await {
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        println!("ready");
        let mut lat = Vec::with_capacity(n as usize);
        while (lat.len() as u64) < n {
            match tokio::time::timeout(Duration::from_secs(30), urgent.recv()).await {
                Ok(Ok(e)) if e.ty() == "urgent" => lat.push(wall_ns().saturating_sub(stamp_of(e.payload()))),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("urgent sink: {e}"),
                Err(_) => bail!("urgent events stopped arriving"),
            }
        }
        if std::env::var_os("URGENT_NET_DEBUG").is_some() {
            eprintln!("B links: {:?}", b.link_stats());
            eprintln!("B latencies: {:?}", &lat[..lat.len().min(20)]);
        }
        let line: Vec<String> = lat.iter().map(u64::to_string).collect();
        println!("{}", line.join(" "));
        until_stdin_closes().await;
        drain.abort();
        b.kill();
        anyhow::Ok(())
    })
}

/// Node A: the bulk source (if `bulk`) and the urgent one (`n` events, paced).
pub fn child_a(quic: bool, two: bool, prio: bool, bulk: bool, n: u64) -> Result<()> {
    let rt = crate::util::runtime()?;
    rt.block_on(async {
        let a = builder(quic, two, A_IP)?.start().await?;
        let ch = a.open_channel("urgent").await?;
        let bulk_ch = a.open_channel("bulk").await?;
        ch.wait_for_sinks(1, Duration::from_secs(10)).await?;
        bulk_ch.wait_for_sinks(1, Duration::from_secs(10)).await?;
        let opts = if prio { EventOptions::new().priority(Priority::HIGHEST) } else { EventOptions::new() };
        let mut src = ch.source()?;
        // A warm-up event (B's sink does not take its type), before the bulk: a link that carries priorities has
        // its urgent connection up by the time the measured events come.
        src.submit_with("warm-up", &Attrs::new(), b"", opts).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = if bulk {
            let mut src = bulk_ch.source()?;
            let stop = stop.clone();
            Some(tokio::spawn(async move {
                let payload = vec![0u8; BULK_SIZE];
                while !stop.load(Ordering::Relaxed) {
                    if src.submit("bulk", &Attrs::new(), &payload).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            }))
        } else {
            None
        };
        // A moment for the bulk to fill the link's queues.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut payload = vec![0x5au8; 100];
        let mut tick = tokio::time::interval(PACE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..n {
            tick.tick().await;
            payload[..8].copy_from_slice(&wall_ns().to_le_bytes());
            src.submit_with("urgent", &Attrs::new(), &payload, opts).await?;
        }
        if std::env::var_os("URGENT_NET_DEBUG").is_some() {
            eprintln!("A links: {:?}", a.link_stats());
        }
        until_stdin_closes().await;
        stop.store(true, Ordering::Relaxed);
        if let Some(w) = writer {
            w.abort();
        }
        a.kill();
        anyhow::Ok(())
    })
}
