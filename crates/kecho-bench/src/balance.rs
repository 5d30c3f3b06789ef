//! `kecho bench balance`: the HTTP load balancer (`kecho balance`, kecho-lb's `balance` module) against a plain
//! round-robin reverse proxy on the same two servers, and against no proxy at all (the client picks the server in
//! turn itself, the baseline for the latency a proxy adds). For each: the requests/s that 32 clients in a closed loop
//! get through, and the latency of an open-loop load at 5,000 requests/s (measured from each request's scheduled
//! time, so a stall counts for every request it delays), on loopback, one runtime for everything.
//!
//! The three systems are measured in alternating rounds (each round runs every system for a slice of the requests,
//! in a rotated order), so that a stretch of load from other processes on the machine falls on all of them rather
//! than on whichever ran at that moment; the added latency is judged on all rounds together and reported per round.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kecho_lb::balance::{Backend, Balancer, Mode};
use serde::Serialize;

use crate::report::{fmt_ns, fmt_num, Check, Section, Table};
use crate::util::{count, histogram, runtime, Summary};
use crate::BenchArgs;

/// The open-loop rate.
const RATE: f64 = 5_000.0;
/// Concurrent clients of the closed loop.
const CLIENTS: usize = 32;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Rounds of the alternation.
const ROUNDS: usize = 6;

#[derive(Debug, Serialize)]
struct Row {
    system: &'static str,
    requests_per_s: f64,
    open_loop: Summary,
    /// The open loop's p99 in each round, ns.
    round_p99: Vec<f64>,
    errors: u64,
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let rt = runtime()?;
    let open_n = count(args, 25_000, 200);
    let closed_for = Duration::from_secs_f64((3.0 * args.scale).clamp(0.2, 3.0));
    let rows = rt.block_on(async {
        let servers = [server().await?, server().await?];
        let plain = plain_proxy(servers).await?;
        let balancer = Balancer::new(Mode::RoundRobin, false, None, 1);
        balancer.set_pool(servers.iter().map(|&addr| Backend { addr, load: None }).collect());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let kecho_addr = listener.local_addr()?;
        let _serve = balancer.spawn(listener);
        let systems: [(&'static str, Vec<SocketAddr>); 3] = [
            ("direct (no proxy)", servers.to_vec()),
            ("plain rr proxy", vec![plain]),
            ("kecho balance rr", vec![kecho_addr]),
        ];
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let k = systems.len();
        let mut rps = vec![0.0; k];
        let mut errors = vec![0u64; k];
        let mut hist: Vec<_> = (0..k).map(|_| histogram()).collect();
        let mut round_p99 = vec![Vec::new(); k];
        for (_, targets) in &systems {
            // Warm the connection pools.
            for i in 0..200 {
                get(&client, targets[i % targets.len()]).await?;
            }
        }
        let slice = (open_n / ROUNDS as u64).max(1);
        for round in 0..ROUNDS {
            for j in 0..k {
                let s = (round + j) % k;
                let targets = &systems[s].1;
                let (r, e) = closed_loop(&client, targets, closed_for / ROUNDS as u32).await;
                rps[s] += r / ROUNDS as f64;
                errors[s] += e;
                let (h, e) = open_loop(&client, targets, slice).await;
                errors[s] += e;
                round_p99[s].push(h.value_at_quantile(0.99) as f64);
                hist[s].add(&h)?;
            }
        }
        let rows: Vec<Row> = (0..k)
            .map(|s| Row {
                system: systems[s].0,
                requests_per_s: rps[s],
                open_loop: Summary::of(&hist[s]),
                round_p99: std::mem::take(&mut round_p99[s]),
                errors: errors[s],
            })
            .collect();
        anyhow::Ok(rows)
    })?;
    let mut s = Section::new("balance");
    let mut t = Table::new(
        "HTTP load balancing on loopback: two servers, round robin",
        &["system", "requests/s (32 clients)", "p50 at 5,000/s", "p99 at 5,000/s", "added p50", "added p99", "errors"],
    );
    let direct = &rows[0].open_loop;
    for r in &rows {
        t.row(vec![
            r.system.to_owned(),
            fmt_num(r.requests_per_s),
            fmt_ns(r.open_loop.p50),
            fmt_ns(r.open_loop.p99),
            fmt_ns(r.open_loop.p50 - direct.p50),
            fmt_ns(r.open_loop.p99 - direct.p99),
            r.errors.to_string(),
        ]);
    }
    s.tables.push(t);
    let kecho = &rows[2];
    let plain = &rows[1];
    let mut rounds = Table::new(
        "the open loop's p99 per round (rounds alternate the systems; added: kecho balance minus direct)",
        &["round", "direct", "plain rr proxy", "kecho balance rr", "added p99 (kecho - direct)", "kecho - plain"],
    );
    let mut added_rounds = Vec::new();
    for i in 0..ROUNDS.min(rows[0].round_p99.len()) {
        let (d, p, k) = (rows[0].round_p99[i], plain.round_p99[i], kecho.round_p99[i]);
        added_rounds.push(k - d);
        rounds.row(vec![(i + 1).to_string(), fmt_ns(d), fmt_ns(p), fmt_ns(k), fmt_ns(k - d), fmt_ns(k - p)]);
    }
    s.tables.push(rounds);
    added_rounds.sort_by(f64::total_cmp);
    if let Some(m) = added_rounds.get(added_rounds.len() / 2) {
        s.notes.push(format!(
            "added p99 per round: median {}, range {} to {}",
            fmt_ns(*m),
            fmt_ns(added_rounds[0]),
            fmt_ns(added_rounds[added_rounds.len() - 1])
        ));
    }
    s.checks.push(Check::at_most(
        "kecho balance: added p99 at 5,000 req/s over the plain proxy",
        (kecho.open_loop.p99 - plain.open_loop.p99) / 1e6,
        1.0,
        "ms",
    ));
    s.checks.push(Check::at_most(
        "kecho balance: added p99 at 5,000 req/s",
        (kecho.open_loop.p99 - direct.p99) / 1e6,
        1.0,
        "ms",
    ));
    s.checks.push(Check::at_least(
        "kecho balance requests/s / plain proxy",
        kecho.requests_per_s / plain.requests_per_s,
        0.8,
        "x",
    ));
    s.notes.push(format!(
        "{open_n} requests per system at {RATE} req/s in {ROUNDS} alternating rounds, latency from each request's \
         scheduled time; closed loop {CLIENTS} clients for {:.1} s per system (in the same rounds); two workers run \
         the servers, the proxies and the clients alike",
        closed_for.as_secs_f64()
    ));
    s.put("rows", &rows);
    Ok(s)
}

/// A server answering `ok`.
async fn server() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// The baseline: a reverse proxy that only takes the servers in turn (hyper client, no pool changes, no policy).
async fn plain_proxy(servers: [SocketAddr; 2]) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let client = kecho_lb::http::client();
    let next = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let client = client.clone();
        let target = servers[next.fetch_add(1, Ordering::Relaxed) % servers.len()];
        async move {
            match kecho_lb::http::forward(&client, target, req, &[]).await {
                Ok(r) => r,
                Err(e) => {
                    let mut r = axum::response::Response::new(axum::body::Body::from(e.to_string()));
                    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                    r
                }
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn get(client: &HttpClient, addr: SocketAddr) -> Result<()> {
    let req = hyper::Request::get(format!("http://{addr}/")).body(Full::new(Bytes::new()))?;
    let resp = client.request(req).await.context("request")?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    resp.into_body().collect().await.context("body")?;
    Ok(())
}

/// Requests/s with `CLIENTS` clients each sending its next request when the last is answered.
async fn closed_loop(client: &HttpClient, targets: &[SocketAddr], dur: Duration) -> (f64, u64) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        let targets = targets.to_vec();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut err) = (0u64, 0u64);
            let mut i = c;
            while start.elapsed() < dur {
                match get(&client, targets[i % targets.len()]).await {
                    Ok(()) => ok += 1,
                    Err(_) => err += 1,
                }
                i += 1;
            }
            (ok, err)
        }));
    }
    let (mut ok, mut err) = (0, 0);
    for t in tasks {
        if let Ok((o, e)) = t.await {
            ok += o;
            err += e;
        }
    }
    (ok as f64 / start.elapsed().as_secs_f64(), err)
}

/// `n` requests at `RATE`, each on its own task at its scheduled time; latency from that time.
async fn open_loop(client: &HttpClient, targets: &[SocketAddr], n: u64) -> (hdrhistogram::Histogram<u64>, u64) {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + Duration::from_secs_f64(i as f64 / RATE);
        tokio::time::sleep_until(at).await;
        let client = client.clone();
        let target = targets[i as usize % targets.len()];
        tasks.push(tokio::spawn(async move {
            let r = get(&client, target).await;
            (r.is_ok(), at.elapsed())
        }));
    }
    let mut h = histogram();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok((true, d)) => {
                let _ = h.record(d.as_nanos().max(1) as u64);
            }
            _ => errors += 1,
        }
    }
    (h, errors)
}
