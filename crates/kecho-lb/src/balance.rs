//! A load balancer to run (`kecho balance`): an HTTP front end (the Front-End Dispatcher) over a pool that can change
//! while it runs, given by URL or discovered from the sinks of a kecho channel whose attributes say where each server
//! serves (`http`) and how loaded it is (`load`). Health comes from channel membership: a server whose node dies
//! leaves the channel, and so the pool, within the heartbeat timeout.
//!
//! Modes: `rr` (round robin), `p2c` (power of two choices on the reported load, or on requests in flight where no
//! load is reported), `jsq` (join the shortest queue: fewest requests in flight from this balancer), `hash:HEADER`
//! (rendezvous hashing on the header's value), `kecho:N` (KECho's allocation: among the N least loaded by their
//! reports, in turn).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use hyper::header::{HeaderValue, COOKIE, LOCATION, SET_COOKIE};
use hyper::StatusCode;
use kecho::{Attrs, Value};
use parking_lot::{Mutex, RwLock};
use tokio::net::TcpListener;

use crate::alloc::{fnv, Allocator, Candidate, HashAffinity, LeastLoaded, PowerOfTwo, RoundRobin};
use crate::error::{LbError, Result};
use crate::http::{client, forward, HttpClient};
use crate::load::ServerId;

/// The sink attribute naming where a server serves HTTP (`HOST:PORT` or `http://HOST:PORT`).
pub const HTTP_ATTR: &str = "http";
/// The sink attribute carrying a server's load (a number, lower is less loaded).
pub const LOAD_ATTR: &str = "load";

/// How the balancer picks a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Round robin.
    RoundRobin,
    /// Power of two choices.
    PowerOfTwo,
    /// Join the shortest queue (requests in flight).
    ShortestQueue,
    /// Rendezvous hashing on this header's value (round robin without it).
    Hash(String),
    /// Among the N least loaded, in turn.
    Kecho(usize),
}

impl FromStr for Mode {
    type Err = LbError;
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            |why: &str| LbError::Invalid(format!("mode {s:?}: {why} (expected rr, p2c, jsq, hash:HEADER, kecho:N)"));
        match s.split_once(':') {
            None => match s {
                "rr" => Ok(Mode::RoundRobin),
                "p2c" => Ok(Mode::PowerOfTwo),
                "jsq" => Ok(Mode::ShortestQueue),
                "hash" | "kecho" => Err(bad("an argument is missing")),
                _ => Err(bad("unknown mode")),
            },
            Some(("hash", h)) if !h.is_empty() && hyper::header::HeaderName::from_str(h).is_ok() => {
                Ok(Mode::Hash(h.to_owned()))
            }
            Some(("hash", _)) => Err(bad("not a header name")),
            Some(("kecho", n)) => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Mode::Kecho(n)),
                _ => Err(bad("N must be a positive integer")),
            },
            Some(_) => Err(bad("unknown mode")),
        }
    }
}

impl Mode {
    fn allocator(&self, seed: u64) -> Box<dyn Allocator> {
        match self {
            Mode::RoundRobin => Box::new(RoundRobin::default()),
            Mode::PowerOfTwo => Box::new(PowerOfTwo::new(seed)),
            Mode::ShortestQueue => Box::new(LeastLoaded::new(1)),
            Mode::Hash(_) => Box::new(HashAffinity::default()),
            Mode::Kecho(n) => Box::new(LeastLoaded::new(*n)),
        }
    }
}

/// A server of the pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backend {
    /// Where it serves HTTP.
    pub addr: SocketAddr,
    /// Its reported load, if it reports one.
    pub load: Option<f64>,
}

/// Parses `HOST:PORT` or `http://HOST:PORT[/]` into an address.
pub fn parse_server(s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let hostport = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
    if hostport.contains('/') || s.starts_with("https://") {
        return Err(LbError::Invalid(format!("server {s:?}: expected http://HOST:PORT or HOST:PORT")));
    }
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| LbError::Invalid(format!("server {s:?}: not an address")))
}

/// The servers among a channel's sinks: each sink with an [`HTTP_ATTR`] attribute that `keep` accepts, with its
/// [`LOAD_ATTR`]. A server with several sinks counts once (the lowest load).
pub fn discover(sinks: &[(kecho::NodeId, Attrs)], keep: impl Fn(&Attrs) -> bool) -> Vec<Backend> {
    let mut out: Vec<Backend> = Vec::new();
    for (_, attrs) in sinks {
        let Some(Value::Str(http)) = attrs.get(HTTP_ATTR) else { continue };
        let Ok(addr) = parse_server(http) else { continue };
        if !keep(attrs) {
            continue;
        }
        let load = match attrs.get(LOAD_ATTR) {
            Some(Value::Float(f)) if f.is_finite() => Some(*f),
            Some(Value::Int(i)) => Some(*i as f64),
            _ => None,
        };
        match out.iter_mut().find(|b| b.addr == addr) {
            Some(b) => b.load = min_load(b.load, load),
            None => out.push(Backend { addr, load }),
        }
    }
    out.sort_by_key(|b| b.addr);
    out
}

fn min_load(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// A stable server id from its address (cookies and hashing must survive pool changes and restarts).
fn server_id(addr: SocketAddr) -> ServerId {
    ServerId(fnv(addr.to_string().as_bytes()) as u32)
}

/// Counters of a balancer, for its metrics.
#[derive(Debug, Default)]
pub struct BalanceStats {
    /// Requests answered by each server.
    pub per_server: Mutex<HashMap<SocketAddr, u64>>,
    /// Requests answered with 503 because the pool was empty.
    pub unavailable: AtomicU64,
    /// Requests whose server failed (502).
    pub failed: AtomicU64,
}

/// The front end. Cheap to share (`Arc`); the pool can be replaced while it serves.
pub struct Balancer {
    mode: Mode,
    redirect: bool,
    cookie: Option<String>,
    pool: RwLock<Arc<Vec<Backend>>>,
    inflight: Mutex<HashMap<SocketAddr, u64>>,
    allocator: Mutex<Box<dyn Allocator>>,
    turn: AtomicU64,
    client: HttpClient,
    /// What it did.
    pub stats: BalanceStats,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer").field("mode", &self.mode).field("pool", &self.pool.read()).finish_non_exhaustive()
    }
}

impl Balancer {
    /// A balancer in `mode`, answering with redirects (`redirect`) or as a proxy, with affinity by the cookie named
    /// `cookie` if given. The pool starts empty.
    pub fn new(mode: Mode, redirect: bool, cookie: Option<String>, seed: u64) -> Arc<Balancer> {
        Arc::new(Balancer {
            allocator: Mutex::new(mode.allocator(seed)),
            mode,
            redirect,
            cookie,
            pool: RwLock::new(Arc::new(Vec::new())),
            inflight: Mutex::new(HashMap::new()),
            turn: AtomicU64::new(0),
            client: client(),
            stats: BalanceStats::default(),
        })
    }

    /// Replaces the pool.
    pub fn set_pool(&self, mut pool: Vec<Backend>) {
        pool.sort_by_key(|b| b.addr);
        *self.pool.write() = Arc::new(pool);
    }

    /// The pool now.
    pub fn pool(&self) -> Arc<Vec<Backend>> {
        self.pool.read().clone()
    }

    /// Picks a server for a request with this hash key: pure policy over the pool and the requests in flight.
    pub fn pick(&self, key: Option<&[u8]>) -> Option<SocketAddr> {
        let pool = self.pool();
        if pool.is_empty() {
            return None;
        }
        let cands: Vec<Candidate> = {
            let inflight = self.inflight.lock();
            pool.iter()
                .map(|b| {
                    let queued = inflight.get(&b.addr).copied().unwrap_or(0) as f64;
                    let load = match self.mode {
                        Mode::ShortestQueue => Some(queued),
                        Mode::PowerOfTwo => Some(b.load.unwrap_or(queued)),
                        _ => b.load,
                    };
                    Candidate::new(server_id(b.addr), load)
                })
                .collect()
        };
        let mut out = Vec::new();
        self.allocator.lock().allocate(key, &cands, &mut out);
        let i = match self.mode {
            // KECho's n least loaded share the work in turn.
            Mode::Kecho(_) if !out.is_empty() => out[self.turn.fetch_add(1, Ordering::Relaxed) as usize % out.len()],
            _ => *out.first()?,
        };
        pool.get(i).map(|b| b.addr)
    }

    /// Serves on `listener` until the task is aborted.
    pub fn spawn(self: &Arc<Self>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let app = axum::Router::new().fallback(handle).with_state(self.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("balancer stopped: {e}");
            }
        })
    }

    fn cookie_server(&self, req: &Request) -> Option<SocketAddr> {
        let name = self.cookie.as_deref()?;
        let id =
            req.headers().get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(
                |kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then(|| v.parse::<u32>().ok()).flatten()
                },
            )?;
        self.pool().iter().find(|b| server_id(b.addr).0 == id).map(|b| b.addr)
    }
}

async fn handle(State(b): State<Arc<Balancer>>, req: Request) -> Response {
    let sticky = b.cookie_server(&req);
    let key = match &b.mode {
        Mode::Hash(h) => req.headers().get(h.as_str()).map(|v| v.as_bytes().to_vec()),
        _ => None,
    };
    let Some(addr) = sticky.or_else(|| b.pick(key.as_deref())) else {
        b.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        return status(StatusCode::SERVICE_UNAVAILABLE, "no server available\n");
    };
    *b.stats.per_server.lock().entry(addr).or_default() += 1;
    let mut resp = if b.redirect {
        let target = format!("http://{addr}{}", req.uri().path_and_query().map_or("/", |p| p.as_str()));
        let mut r = status(StatusCode::TEMPORARY_REDIRECT, "");
        if let Ok(v) = HeaderValue::from_str(&target) {
            r.headers_mut().insert(LOCATION, v);
        }
        r
    } else {
        *b.inflight.lock().entry(addr).or_default() += 1;
        let r = forward(&b.client, addr, req, &[]).await;
        if let Some(n) = b.inflight.lock().get_mut(&addr) {
            *n = n.saturating_sub(1);
        }
        match r {
            Ok(r) => r,
            Err(e) => {
                b.stats.failed.fetch_add(1, Ordering::Relaxed);
                status(StatusCode::BAD_GATEWAY, &format!("server {addr}: {e}\n"))
            }
        }
    };
    if let (Some(name), None) = (&b.cookie, sticky) {
        if let Ok(v) = HeaderValue::from_str(&format!("{name}={}; Path=/", server_id(addr).0)) {
            resp.headers_mut().append(SET_COOKIE, v);
        }
    }
    resp
}

fn status(code: StatusCode, body: &str) -> Response {
    let mut r = Response::new(Body::from(body.to_owned()));
    *r.status_mut() = code;
    r
}

/// Keeps `balancer`'s pool equal to the servers among `channel`'s sinks (see [`discover`]) that `keep` accepts (a
/// content filter over the sink's attributes, with `type` empty), looking every `every`. Ends when the channel's
/// node stops or the task is aborted.
pub fn follow(
    balancer: &Arc<Balancer>,
    channel: kecho::Channel,
    keep: Option<kecho::filter::ContentFilter>,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    let b = balancer.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pool = discover(&channel.sink_attrs(), |a| keep.as_ref().is_none_or(|f| f.matches("", a)));
            if *b.pool() != pool {
                tracing::info!("pool: {:?}", pool.iter().map(|b| b.addr).collect::<Vec<_>>());
                b.set_pool(pool);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn modes_parse_and_bad_ones_say_why() {
        assert_eq!("rr".parse::<Mode>().unwrap(), Mode::RoundRobin);
        assert_eq!("jsq".parse::<Mode>().unwrap(), Mode::ShortestQueue);
        assert_eq!("hash:x-user".parse::<Mode>().unwrap(), Mode::Hash("x-user".into()));
        assert_eq!("kecho:2".parse::<Mode>().unwrap(), Mode::Kecho(2));
        for bad in ["", "kecho:0", "kecho", "hash:", "hash:a b", "lru"] {
            let e = bad.parse::<Mode>().unwrap_err().to_string();
            assert!(e.contains("expected rr, p2c, jsq"), "{bad}: {e}");
        }
    }

    #[test]
    fn servers_parse_as_urls_or_addresses() {
        assert_eq!(parse_server("http://127.0.0.1:80/").unwrap(), addr(80));
        assert_eq!(parse_server("127.0.0.1:81").unwrap(), addr(81));
        assert!(parse_server("https://127.0.0.1:80").is_err());
        assert!(parse_server("http://127.0.0.1:80/app").is_err());
        assert!(parse_server("nowhere").is_err());
    }

    #[test]
    fn discovery_takes_sinks_with_an_address_and_the_filter() {
        let n = kecho::NodeId(1);
        let sinks = vec![
            (n, Attrs::new().with("http", "127.0.0.1:2").with("load", 0.5).with("zone", "a")),
            (n, Attrs::new().with("http", "http://127.0.0.1:1").with("load", 3).with("zone", "a")),
            (n, Attrs::new().with("http", "127.0.0.1:1").with("load", 1).with("zone", "a")),
            (n, Attrs::new().with("http", "127.0.0.1:3").with("zone", "b")),
            (n, Attrs::new().with("zone", "a")),
            (n, Attrs::new().with("http", "not an address")),
        ];
        let zone_a = |a: &Attrs| a.get("zone") == Some(&Value::Str("a".into()));
        let got = discover(&sinks, zone_a);
        assert_eq!(got, [Backend { addr: addr(1), load: Some(1.0) }, Backend { addr: addr(2), load: Some(0.5) }]);
        assert_eq!(discover(&sinks, |_| true).len(), 3);
    }

    #[test]
    fn policies_pick_as_their_mode_says() {
        let pool = || vec![Backend { addr: addr(1), load: Some(5.0) }, Backend { addr: addr(2), load: Some(1.0) }];
        let rr = Balancer::new(Mode::RoundRobin, false, None, 1);
        assert_eq!(rr.pick(None), None, "empty pool");
        rr.set_pool(pool());
        let picks: Vec<_> = (0..4).map(|_| rr.pick(None).unwrap()).collect();
        assert_eq!(picks.iter().filter(|a| **a == addr(1)).count(), 2, "{picks:?}");

        let k1 = Balancer::new(Mode::Kecho(1), false, None, 1);
        k1.set_pool(pool());
        assert!((0..10).all(|_| k1.pick(None) == Some(addr(2))), "the least loaded");

        let p2c = Balancer::new(Mode::PowerOfTwo, false, None, 1);
        p2c.set_pool(pool());
        assert!((0..10).all(|_| p2c.pick(None) == Some(addr(2))), "of two, the less loaded");

        let jsq = Balancer::new(Mode::ShortestQueue, false, None, 1);
        jsq.set_pool(pool());
        jsq.inflight.lock().insert(addr(1), 0);
        jsq.inflight.lock().insert(addr(2), 3);
        assert!((0..10).all(|_| jsq.pick(None) == Some(addr(1))), "the shortest queue, whatever the reports");

        let h = Balancer::new(Mode::Hash("x".into()), false, None, 1);
        h.set_pool(pool());
        let first = h.pick(Some(b"alice"));
        assert!((0..10).all(|_| h.pick(Some(b"alice")) == first), "a key keeps its server");
    }
}
