//! Two processes on one host, as `kecho bench local` measures them, without the suite's heavy dependencies (so that a
//! release build is quick): 100 B ping-pong (half the round trip) between this process and a child, in alternated
//! rounds: blocking std sockets in both (the floor), then kecho over loopback TCP, over same-host links on the Unix
//! socket itself and over same-host links through shared memory, each in the default and the low-latency receive
//! mode; with each process's CPU per message. Then 100 B events 1->1 as fast as the source submits them over the
//! three, in alternated rounds, one at a time (`Source::submit`, `Sink::recv`) and batched (`Source::submit_many`,
//! `Sink::recv_many`), and the transports alone (100 B writes through a shared-memory ring and through a Unix socket,
//! no kecho above them), as the bound a transport puts on the rate.
//! `cargo run --release -p kecho --no-default-features --example local -- [pingpongs per round] [budget us] [events]
//! [links] [ring KiB] [batch]`: 0 ping-pongs skips the latency table; `links` picks the 1->1 runs (digits: 0 TCP, 1
//! same-host socket, 2 shared memory, 3 and 4 the transports alone, 5 to 7 as 0 to 2 batched; default all), e.g. to
//! profile one of them; `ring KiB` sets the shared-memory rings (default `kecho_shm::DEFAULT_RING`, 0: default);
//! `batch` the events per `submit_many` (default 256). `KECHO_LOCAL_QUEUE_KIB` sets the links' queue bound
//! (`NodeBuilder::link_queue_bytes`, KiB) in every process.

mod common;

use common::cpu_seconds;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Node, Overflow, RecvError, SinkOptions};

const SIZE: usize = 100;
const ROUNDS: usize = 4;
const T: Duration = Duration::from_secs(20);

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// The shared-memory rings' size: the fifth argument (KiB), passed to children in `KECHO_LOCAL_RING_KIB`.
fn ring_bytes() -> usize {
    std::env::var("KECHO_LOCAL_RING_KIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(kecho_shm::DEFAULT_RING, |k| k << 10)
}

/// Links: 0 TCP, 1 same-host over the Unix socket, 2 same-host through shared memory. The links' queue bound is the
/// node's default unless `KECHO_LOCAL_QUEUE_KIB` sets it (KiB; read by this process and its children alike).
fn builder(registry: SocketAddr, ll_us: u64, link: u8) -> kecho::NodeBuilder {
    let queue = std::env::var("KECHO_LOCAL_QUEUE_KIB").ok().and_then(|v| v.parse::<usize>().ok());
    let b = match queue {
        Some(k) => Node::builder().link_queue_bytes(k << 10),
        None => Node::builder(),
    };
    b.registry(registry)
        .low_latency(Duration::from_micros(ll_us))
        .same_host(link > 0)
        .shared_memory((link == 2).then(ring_bytes))
}

fn link_name(link: u8) -> &'static str {
    match link {
        0 => "TCP",
        1 => "same-host socket",
        _ => "same-host shared memory",
    }
}

fn child(args: &[String]) -> Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the child")
}

fn line(c: &mut Child) -> Result<String> {
    let out = c.stdout.as_mut().context("stdout")?;
    let mut l = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b)? == 1 && b[0] != b'\n' {
        l.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&l).into_owned())
}

/// The child's last line: its CPU seconds.
fn finish(mut c: Child) -> Result<f64> {
    let l = line(&mut c)?;
    c.wait()?;
    l.strip_prefix("cpu ").and_then(|v| v.parse().ok()).with_context(|| format!("child said {l:?}"))
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("echo-tcp") => return echo_tcp(argv[1].parse()?, argv[2].parse()?),
        Some("echo") => {
            return echo(argv[1].parse()?, &argv[2], argv[3].parse()?, argv[4].parse()?, argv[5].parse()?);
        }
        Some("count") => {
            return count(argv[1].parse()?, &argv[2], argv[3].parse()?, argv[4].parse()?, argv[5].parse()?);
        }
        Some("raw-count") => return raw_count(&argv[1], argv[2] == "shm", argv[3].parse()?),
        _ => {}
    }
    let n: u64 = argv.first().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let budget: u64 = argv.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let events: u64 = argv.get(2).and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let links: String = argv.get(3).cloned().unwrap_or_else(|| "01234567".into());
    let runs = |i: u8| links.contains(char::from(b'0' + i));
    let batch: usize = argv.get(5).and_then(|a| a.parse().ok()).unwrap_or(256).max(1);
    if let Some(kib) = argv.get(4).filter(|k| *k != "0") {
        // Read by this process and inherited by the children.
        std::env::set_var("KECHO_LOCAL_RING_KIB", kib);
    }
    let rt = runtime()?;
    let registry = rt.block_on(async {
        let server = kecho_registry::RegistryServer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = server.local_addr();
        std::mem::forget(server.spawn());
        Ok::<_, anyhow::Error>(addr)
    })?;
    let modes = [(0, 0), (budget, 0), (0, 1), (budget, 1), (0, 2), (budget, 2)];
    let names: Vec<String> =
        std::iter::once("blocking sockets (floor)".to_owned())
            .chain(modes.iter().map(|&(ll, sh)| {
                format!("kecho {}, {}", link_name(sh), if ll > 0 { "low-latency" } else { "default" })
            }))
            .collect();
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut cpus = vec![(0.0, 0.0); names.len()];
    for round in 0..if n > 0 { ROUNDS } else { 0 } {
        let (l, c) = floor(n)?;
        lat[0].extend(l);
        cpus[0].0 += c.0;
        cpus[0].1 += c.1;
        for (i, &(ll, sh)) in modes.iter().enumerate() {
            let channel = format!("pp{round}-{i}");
            let (l, c) = rt.block_on(async move { tokio::spawn(pingpong(registry, channel, ll, sh, n)).await? })?;
            lat[i + 1].extend(l);
            cpus[i + 1].0 += c.0;
            cpus[i + 1].1 += c.1;
        }
    }
    if n > 0 {
        latency_table(n, &names, &mut lat, &cpus);
    }
    println!();
    println!(
        "| 100 B events 1->1, two processes, {events} events, {ROUNDS} alternated rounds | M events/s (median) | rounds \
         | CPU ns/event, source process (median) | sink process |"
    );
    println!("|---|---|---|---|---|");
    // Per run: events per second and CPU nanoseconds per event in the source's and the sink's process (NaN: not
    // measured).
    let mut rates: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); 8];
    for _ in 0..ROUNDS {
        for sh in (0..3u8).filter(|&i| runs(i)) {
            let r = rt.block_on(async move { tokio::spawn(stream(registry, sh, events, 1)).await? })?;
            rates[sh as usize].push(r);
            if runs(sh + 5) {
                let r = rt.block_on(async move { tokio::spawn(stream(registry, sh, events, batch)).await? })?;
                rates[sh as usize + 5].push(r);
            }
        }
        for sh in (0..3u8).filter(|&i| runs(i + 5) && !runs(i)) {
            let r = rt.block_on(async move { tokio::spawn(stream(registry, sh, events, batch)).await? })?;
            rates[sh as usize + 5].push(r);
        }
        for (i, shm) in [(3, true), (4, false)] {
            if runs(i) {
                rates[i as usize].push((raw(shm, events * 4)?, f64::NAN, f64::NAN));
            }
        }
    }
    let names = [
        "kecho TCP".to_owned(),
        format!("kecho {}", link_name(1)),
        format!("kecho {}", link_name(2)),
        "transport alone: shared-memory ring, 100 B writes".to_owned(),
        "transport alone: Unix socket, 100 B blocking writes".to_owned(),
        format!("kecho TCP, batched ({batch} per submit_many, recv_many)"),
        format!("kecho {}, batched", link_name(1)),
        format!("kecho {}, batched", link_name(2)),
    ];
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ns = |x: f64| if x.is_nan() { "-".to_owned() } else { format!("{x:.0}") };
    for (name, r) in names.iter().zip(rates) {
        if r.is_empty() {
            continue;
        }
        let mut rate: Vec<f64> = r.iter().map(|x| x.0).collect();
        rate.sort_by(f64::total_cmp);
        let all: Vec<String> = rate.iter().map(|x| format!("{:.2}", x / 1e6)).collect();
        let (src_ns, sink_ns) = (median(r.iter().map(|x| x.1).collect()), median(r.iter().map(|x| x.2).collect()));
        println!("| {name} | {:.2} | {} | {} | {} |", median(rate) / 1e6, all.join(", "), ns(src_ns), ns(sink_ns));
    }
    Ok(())
}

fn latency_table(n: u64, names: &[String], lat: &mut [Vec<f64>], cpus: &[(f64, f64)]) {
    let total = (n * ROUNDS as u64) as f64;
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
    };
    let floor_p50 = pct(&mut lat[0], 0.5);
    println!("| 100 B ping-pong, rtt/2, {ROUNDS} rounds x {n} | p50 (us) | p99 (us) | p50 / floor | CPU us/msg parent | CPU us/msg child |");
    println!("|---|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let (p50, p99) = (pct(&mut lat[i], 0.5), pct(&mut lat[i], 0.99));
        println!(
            "| {name} | {p50:.1} | {p99:.1} | {:.2} | {:.1} | {:.1} |",
            p50 / floor_p50,
            cpus[i].0 / total * 1e6,
            cpus[i].1 / total * 1e6
        );
    }
}

/// Blocking ping-pong with a child: latencies (us) and CPU seconds (parent, child).
fn floor(n: u64) -> Result<(Vec<f64>, (f64, f64))> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = child(&["echo-tcp".into(), l.local_addr()?.to_string(), n.to_string()])?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let msg = [0x5au8; SIZE];
    let mut back = [0u8; SIZE];
    let mut out = Vec::with_capacity(n as usize);
    let c0 = cpu_seconds();
    for _ in 0..n {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        out.push(t0.elapsed().as_nanos() as f64 / 2e3);
    }
    let mine = cpu_seconds() - c0;
    Ok((out, (mine, finish(c)?)))
}

fn echo_tcp(addr: SocketAddr, n: u64) -> Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; SIZE];
    let c0 = cpu_seconds();
    for _ in 0..n {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
    println!("cpu {}", cpu_seconds() - c0);
    Ok(())
}

async fn pingpong(registry: SocketAddr, channel: String, ll: u64, sh: u8, n: u64) -> Result<(Vec<f64>, (f64, f64))> {
    let node = builder(registry, ll, sh).start().await?;
    let ping = node.create_channel(&format!("{channel}.ping")).await?;
    let pong = node.create_channel(&format!("{channel}.pong")).await?;
    let mut sink = pong.sink(SinkOptions::new().overflow(Overflow::Block))?;
    let mut src = ping.source()?;
    let warm = 200;
    let args =
        ["echo".into(), registry.to_string(), channel.clone(), ll.to_string(), sh.to_string(), (n + warm).to_string()];
    let mut c = child(&args)?;
    let ready = tokio::task::block_in_place(|| line(&mut c))?;
    if ready != "ready" {
        bail!("child said {ready:?}");
    }
    ping.wait_for_sinks(1, T).await?;
    let (attrs, payload) = (Attrs::new(), [0x5au8; SIZE]);
    let mut out = Vec::with_capacity(n as usize);
    let mut c0 = cpu_seconds();
    for i in 0..n + warm {
        if i == warm {
            c0 = cpu_seconds();
        }
        let t0 = Instant::now();
        src.submit("e", &attrs, &payload).await?;
        match tokio::time::timeout(T, sink.recv()).await {
            Ok(Ok(_)) => {}
            other => bail!("pong: {other:?}"),
        }
        if i >= warm {
            out.push(t0.elapsed().as_nanos() as f64 / 2e3);
        }
    }
    let mine = cpu_seconds() - c0;
    let theirs = tokio::task::block_in_place(|| finish(c))?;
    drop((src, sink));
    node.shutdown().await;
    Ok((out, (mine, theirs)))
}

fn echo(registry: SocketAddr, channel: &str, ll: u64, sh: u8, n: u64) -> Result<()> {
    let channel = channel.to_owned();
    let cpu_used = runtime()?.block_on(async move {
        tokio::spawn(async move {
            let node = builder(registry, ll, sh).start().await?;
            let ping = node.open_channel(&format!("{channel}.ping")).await?;
            let pong = node.open_channel(&format!("{channel}.pong")).await?;
            let mut sink = ping.sink(SinkOptions::new().overflow(Overflow::Block))?;
            let mut src = pong.source()?;
            println!("ready");
            std::io::stdout().flush()?;
            pong.wait_for_sinks(1, T).await?;
            let attrs = Attrs::new();
            let mut c0 = cpu_seconds();
            for i in 0..n {
                if i == 200 {
                    c0 = cpu_seconds();
                }
                let ev = match tokio::time::timeout(T, sink.recv()).await {
                    Ok(Ok(ev)) => ev,
                    other => bail!("ping: {other:?}"),
                };
                src.submit("e", &attrs, ev.payload()).await?;
            }
            let used = cpu_seconds() - c0;
            drop((src, sink));
            node.shutdown().await;
            Ok::<_, anyhow::Error>(used)
        })
        .await
    })??;
    println!("cpu {cpu_used}");
    Ok(())
}

/// Events per second from this process's source to a child's sink, submitted one at a time (`batch` 1) or `batch` at a
/// time, and received the same way; with the CPU nanoseconds per event this process and the child used meanwhile.
async fn stream(registry: SocketAddr, sh: u8, n: u64, batch: usize) -> Result<(f64, f64, f64)> {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let node = builder(registry, 0, sh).start().await?;
    let channel = format!("stream-{sh}-{}", RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let ch = node.create_channel(&channel).await?;
    let args = ["count".into(), registry.to_string(), channel, sh.to_string(), n.to_string(), batch.to_string()];
    let mut c = child(&args)?;
    let ready = tokio::task::block_in_place(|| line(&mut c))?;
    if ready != "ready" {
        bail!("child said {ready:?}");
    }
    ch.wait_for_sinks(1, T).await?;
    let mut src = ch.source()?;
    let (attrs, payload) = (Attrs::new(), [0x5au8; SIZE]);
    let payloads = vec![payload; batch];
    let (t0, c0) = (Instant::now(), cpu_seconds());
    if batch == 1 {
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
    let done = tokio::task::block_in_place(|| line(&mut c))?;
    let (secs, mine) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    let theirs = tokio::task::block_in_place(|| finish(c))?;
    if done != format!("received {n} lost 0") {
        bail!("child said {done:?} of {n}");
    }
    drop(src);
    node.shutdown().await;
    Ok((n as f64 / secs, mine / n as f64 * 1e9, theirs / n as f64 * 1e9))
}

fn count(registry: SocketAddr, channel: &str, sh: u8, n: u64, batch: usize) -> Result<()> {
    let channel = channel.to_owned();
    let used = runtime()?.block_on(async move {
        tokio::spawn(async move {
            let node = builder(registry, 0, sh).start().await?;
            let ch = node.open_channel(&channel).await?;
            let mut sink = ch.sink(SinkOptions::new().capacity(65_536).overflow(Overflow::Block))?;
            println!("ready");
            std::io::stdout().flush()?;
            let (mut got, mut lost) = (0u64, 0u64);
            let c0 = cpu_seconds();
            if batch == 1 {
                while got + lost < n {
                    match tokio::time::timeout(T, sink.recv()).await {
                        Ok(Ok(_)) => got += 1,
                        Ok(Err(RecvError::Lagged(k))) => lost += k,
                        _ => break,
                    }
                }
            } else {
                // One timeout per batch, not per event.
                let mut evs = Vec::with_capacity(4096);
                while got + lost < n {
                    match tokio::time::timeout(T, sink.recv_many(&mut evs, 4096)).await {
                        Ok(Ok(k)) => got += k as u64,
                        Ok(Err(RecvError::Lagged(k))) => lost += k,
                        _ => break,
                    }
                    evs.clear();
                }
            }
            println!("received {got} lost {lost}");
            std::io::stdout().flush()?;
            let used = cpu_seconds() - c0;
            drop(sink);
            node.shutdown().await;
            Ok::<_, anyhow::Error>(used)
        })
        .await
    })??;
    println!("cpu {used}");
    Ok(())
}

/// The transport alone: `n` writes of 100 B from this process to a child, through a shared-memory ring (tokio, as a
/// link uses it) or a Unix socket (blocking std writes, one system call each); returns writes per second, timed until
/// the child has read them all.
fn raw(shm: bool, n: u64) -> Result<f64> {
    let path = std::env::temp_dir().join(format!("kecho-local-{}-{}.sock", std::process::id(), u8::from(shm)));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let mut c = child(&[
        "raw-count".into(),
        path.display().to_string(),
        if shm { "shm" } else { "socket" }.into(),
        n.to_string(),
    ])?;
    let (sock, _) = listener.accept()?;
    let _ = std::fs::remove_file(&path);
    let msg = [0x5au8; SIZE];
    let t0;
    if shm {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        t0 = rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            sock.set_nonblocking(true)?;
            let s = tokio::net::UnixStream::from_std(sock)?;
            let (_r, mut w) = kecho_shm::connect(s, &kecho_shm::Options::default()).await?;
            let t0 = Instant::now();
            for _ in 0..n {
                w.write_all(&msg).await?;
            }
            w.shutdown().await?;
            Ok::<_, anyhow::Error>(t0)
        })?;
    } else {
        let mut sock = sock;
        t0 = Instant::now();
        for _ in 0..n {
            sock.write_all(&msg)?;
        }
        drop(sock);
    }
    let done = line(&mut c)?;
    let secs = t0.elapsed().as_secs_f64();
    c.wait()?;
    if done != format!("read {}", n * SIZE as u64) {
        bail!("raw child said {done:?}");
    }
    Ok(n as f64 / secs)
}

/// The child of `raw`: reads to the end of the stream in 64 KiB reads and says how many bytes came.
fn raw_count(path: &str, shm: bool, _n: u64) -> Result<()> {
    let sock = std::os::unix::net::UnixStream::connect(path)?;
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    if shm {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        total = rt.block_on(async {
            use tokio::io::AsyncReadExt;
            sock.set_nonblocking(true)?;
            let s = tokio::net::UnixStream::from_std(sock)?;
            let kecho_shm::Accepted::Shm(mut r, _w) = kecho_shm::accept(s, None).await? else {
                bail!("no shared-memory set-up")
            };
            let mut total = 0u64;
            loop {
                match r.read(&mut buf).await? {
                    0 => return Ok::<_, anyhow::Error>(total),
                    k => total += k as u64,
                }
            }
        })?;
    } else {
        let mut sock = sock;
        loop {
            match sock.read(&mut buf)? {
                0 => break,
                k => total += k as u64,
            }
        }
    }
    println!("read {total}");
    Ok(())
}
