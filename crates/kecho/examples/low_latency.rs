//! kecho's one-way latency against a blocking-socket floor, in one run, alternated rounds: 100 B events sent one at a
//! time (paced 200 us apart) between two nodes on loopback TCP, received by `recv().await` (the default) or by an
//! application that polls its sink with `try_recv` for up to a spin budget before it waits; and the CPU the process
//! used per second of the run. The floor is two threads with blocking std sockets doing the same.
//! `cargo run --release -p kecho --no-default-features --features quic --example low_latency -- [rounds] [spin us]`

mod common;

use common::cpu_seconds;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use kecho::{Attrs, Node, RegistryClient, SinkOptions};

const T: Duration = Duration::from_secs(10);
const N: usize = 2000;
const PACE: Duration = Duration::from_micros(200);

/// One-way latencies (us) between two threads over blocking loopback TCP, and CPU per wall second.
fn floor() -> std::io::Result<(Vec<f64>, f64)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut tx = std::net::TcpStream::connect(l.local_addr()?)?;
    let (mut rx, _) = l.accept()?;
    tx.set_nodelay(true)?;
    let base = Instant::now();
    let (c0, w0) = (cpu_seconds(), Instant::now());
    let reader = std::thread::spawn(move || {
        let mut out = Vec::with_capacity(N);
        let mut buf = [0u8; 100];
        for _ in 0..N {
            rx.read_exact(&mut buf)?;
            let sent = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            out.push((base.elapsed().as_nanos() as u64 - sent) as f64 / 1e3);
        }
        std::io::Result::Ok(out)
    });
    let mut msg = [0u8; 100];
    for _ in 0..N {
        msg[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
        tx.write_all(&msg)?;
        std::thread::sleep(PACE);
    }
    let out = reader.join().expect("reader")?;
    Ok((out, (cpu_seconds() - c0) / w0.elapsed().as_secs_f64()))
}

/// The same between two kecho nodes; the receiver polls its sink for up to `spin` first (zero: `recv().await` only).
async fn kecho(spin: Duration) -> kecho::Result<(Vec<f64>, f64)> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).start().await?;
    let b = Node::builder().registry_client(reg).start().await?;
    let ca = a.channel("lat").await?;
    let cb = b.channel("lat").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    let base = Instant::now();
    let (c0, w0) = (cpu_seconds(), Instant::now());
    let mut out = Vec::with_capacity(N);
    for _ in 0..N {
        let mut payload = (base.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
        payload.resize(100, 0);
        src.submit("e", &Attrs::new(), &payload).await?;
        let ev = if spin.is_zero() {
            tokio::time::timeout(T, sink.recv()).await.expect("in time").expect("event")
        } else {
            receive_spinning(&mut sink, spin).await
        };
        let sent = u64::from_le_bytes(ev.payload()[..8].try_into().expect("8 bytes"));
        out.push((base.elapsed().as_nanos() as u64 - sent) as f64 / 1e3);
        // A blocking sleep, as the floor's sender does: the runtime's other thread is what receives.
        std::thread::sleep(PACE);
    }
    let load = (cpu_seconds() - c0) / w0.elapsed().as_secs_f64();
    a.kill();
    b.kill();
    Ok((out, load))
}

/// The sink's half of the low-latency mode: poll the sink for up to `spin` (this thread stays awake), then wait.
async fn receive_spinning(sink: &mut kecho::Sink, spin: Duration) -> kecho::Event {
    let until = Instant::now() + spin;
    loop {
        match sink.try_recv() {
            Ok(ev) => return ev,
            Err(kecho::TryRecvError::Empty) if Instant::now() < until => std::hint::spin_loop(),
            Err(kecho::TryRecvError::Empty) => {
                return tokio::time::timeout(T, sink.recv()).await.expect("in time").expect("event")
            }
            Err(e) => panic!("sink: {e}"),
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let spin = Duration::from_micros(args.next().and_then(|a| a.parse().ok()).unwrap_or(50));
    let names = ["blocking sockets (floor)", "kecho, recv().await", "kecho, sink polled with try_recv"];
    let mut lat: [Vec<f64>; 3] = Default::default();
    let mut load: [Vec<f64>; 3] = Default::default();
    for r in 0..rounds {
        for k in 0..3 {
            let i = (k + r) % 3;
            let (l, c) = match i {
                0 => floor()?,
                1 => kecho(Duration::ZERO).await?,
                _ => kecho(spin).await?,
            };
            lat[i].extend(l);
            load[i].push(c);
        }
    }
    let floor_p50 = pct(&mut lat[0], 0.5);
    println!("| 100 B one-way, loopback TCP, {rounds} rounds x {N}, spin {spin:?} | p50 (us) | p99 (us) | p50 / floor | CPU (cores, median round) |");
    println!("|---|---|---|---|---|");
    for i in 0..3 {
        let (p50, p99) = (pct(&mut lat[i], 0.5), pct(&mut lat[i], 0.99));
        let c = pct(&mut load[i], 0.5);
        println!("| {} | {p50:.1} | {p99:.1} | {:.2} | {c:.2} |", names[i], p50 / floor_p50);
    }
    Ok(())
}
