//! The HTTP dispatchers on loopback: the front end as proxy and redirector with affinity, cooperating servers
//! and the smart client.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use kecho_lb::alloc::{HashAffinity, LeastLoaded, RoundRobin};
use kecho_lb::http::{
    client, Affinity, CooperatingServer, FrontEnd, Handler, HttpMsg, Interaction, LoadEndpoint, LoadPuller, Pool,
    SmartClient, LOAD_PATH,
};
use kecho_lb::load::{LoadProbe, LoadReport, LoadSample, LoadWeights, ServerId, SharedTable};
use parking_lot::Mutex;
use std::time::Duration;
use tokio::net::TcpListener;

/// An upstream that echoes the request as text, names itself in `x-server`, and answers 503 on `/fail`.
async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |req: Request| async move { echo(name, req).await });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn echo(name: &str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let test = parts.headers.get("x-test").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = format!("{name} {} {} x-test={test} body={}", parts.method, parts.uri, String::from_utf8_lossy(&body));
    let mut r = Response::new(Body::from(text));
    if parts.uri.path() == "/fail" {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut().insert("x-why", "maintenance".parse().unwrap());
    }
    r.headers_mut().insert("x-server", name.parse().unwrap());
    r
}

async fn front(pool: Pool, alloc: Box<dyn kecho_lb::alloc::Allocator>, i: Interaction, a: Affinity) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    FrontEnd::new(pool, alloc, i, a).spawn(listener);
    addr
}

async fn send(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut req = hyper::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client().request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await.unwrap();
    let (parts, b) = resp.into_parts();
    let body = String::from_utf8(b.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Reply { status: parts.status, headers: parts.headers, body }
}

struct Reply {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn pool(servers: &[SocketAddr]) -> Pool {
    Pool { servers: servers.iter().enumerate().map(|(i, a)| (ServerId(i as u32), *a)).collect(), table: None }
}

#[tokio::test]
async fn the_proxy_forwards_requests_intact_and_errors_faithfully() {
    let a = upstream("a").await;
    let fe = front(pool(&[a]), Box::new(RoundRobin::default()), Interaction::Indirect, Affinity::None).await;
    let r = send(fe, Method::PUT, "/x/y?q=1&r=2", &[("x-test", "kept")], "payload bytes").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "a PUT /x/y?q=1&r=2 x-test=kept body=payload bytes");
    assert_eq!(r.header("x-server"), Some("a"), "response headers come back");
    let r = send(fe, Method::POST, "/fail", &[], "").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "the upstream's status as it was");
    assert_eq!(r.header("x-why"), Some("maintenance"));
    assert_eq!(r.body, "a POST /fail x-test= body=");
    // An upstream that cannot be reached is a 502.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let fe = front(pool(&[dead]), Box::new(RoundRobin::default()), Interaction::Indirect, Affinity::None).await;
    assert_eq!(send(fe, Method::GET, "/", &[], "").await.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn the_direct_front_end_redirects() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let fe = front(pool(&[a, b]), Box::new(RoundRobin::default()), Interaction::Direct, Affinity::None).await;
    let r1 = send(fe, Method::GET, "/page?id=3", &[], "").await;
    let r2 = send(fe, Method::GET, "/page?id=3", &[], "").await;
    assert_eq!(r1.status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r1.header("location"), Some(format!("http://{a}/page?id=3").as_str()));
    assert_eq!(r2.header("location"), Some(format!("http://{b}/page?id=3").as_str()), "round robin");
}

#[tokio::test]
async fn cookie_affinity_is_sticky() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let fe = front(pool(&[a, b]), Box::new(RoundRobin::default()), Interaction::Indirect, Affinity::Cookie).await;
    let first = send(fe, Method::GET, "/", &[], "").await;
    let cookie = first.header("set-cookie").unwrap().split(';').next().unwrap().to_owned();
    let server = first.header("x-server").unwrap().to_owned();
    for _ in 0..6 {
        let r = send(fe, Method::GET, "/", &[("cookie", &cookie)], "").await;
        assert_eq!(r.header("x-server"), Some(server.as_str()), "the session stays");
        assert_eq!(r.header("set-cookie"), None);
    }
    // Without the cookie, round robin moves on.
    assert_ne!(send(fe, Method::GET, "/", &[], "").await.header("x-server"), Some(server.as_str()));
}

#[tokio::test]
async fn header_affinity_hashes_sessions() {
    let ups = [upstream("a").await, upstream("b").await, upstream("c").await];
    let fe = front(
        pool(&ups),
        Box::new(HashAffinity::default()),
        Interaction::Indirect,
        Affinity::Header("x-session".into()),
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    for s in 0..12 {
        let session = format!("user-{s}");
        let first = send(fe, Method::GET, "/", &[("x-session", &session)], "").await;
        let server = first.header("x-server").unwrap().to_owned();
        for _ in 0..3 {
            let r = send(fe, Method::GET, "/", &[("x-session", &session)], "").await;
            assert_eq!(r.header("x-server"), Some(server.as_str()));
        }
        seen.insert(server);
    }
    assert!(seen.len() >= 2, "sessions spread over the servers: {seen:?}");
}

#[tokio::test]
async fn cooperating_servers_forward_when_busy() {
    let handler = |name: &'static str| -> Handler { Arc::new(move |req| Box::pin(echo(name, req))) };
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a0, a1) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let p = pool(&[a0, a1]);
    // Server 0 takes no request itself (limit 0); server 1 serves everything.
    let s0 = CooperatingServer::new(ServerId(0), p.clone(), Box::new(RoundRobin::default()), 0, handler("a"));
    let s1 = CooperatingServer::new(ServerId(1), p, Box::new(RoundRobin::default()), 100, handler("b"));
    s0.spawn(la);
    s1.spawn(lb);
    for i in 0..4 {
        let r = send(a1, Method::POST, &format!("/item/{i}"), &[("x-test", "t")], "data").await;
        assert_eq!(r.body, format!("b POST /item/{i} x-test=t body=data"));
    }
    for i in 0..4 {
        let r = send(a0, Method::POST, &format!("/item/{i}"), &[("x-test", "t")], "data").await;
        assert_eq!(r.body, format!("b POST /item/{i} x-test=t body=data"), "forwarded to server 1");
    }
    use std::sync::atomic::Ordering;
    assert_eq!(s0.forwarded.load(Ordering::Relaxed), 4);
    assert_eq!(s0.served.load(Ordering::Relaxed), 0);
    assert_eq!(s1.served.load(Ordering::Relaxed), 8, "forwarded requests are served, not forwarded again");
}

#[tokio::test]
async fn the_smart_client_picks_and_fails_over() {
    let a = upstream("a").await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let c = SmartClient::new(pool(&[dead, a]), Box::new(RoundRobin::default()));
    for _ in 0..4 {
        let (server, r) = c.send(Method::GET, "/s", None, Bytes::new()).await.unwrap();
        assert_eq!(server, ServerId(1), "the dead server is skipped");
        assert_eq!(r.body().as_ref(), b"a GET /s x-test= body=");
    }
    let none = SmartClient::new(pool(&[dead]), Box::new(RoundRobin::default()));
    assert!(none.send(Method::GET, "/", None, Bytes::new()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperating_servers_forward_over_the_data_channel() {
    let handler = |name: &'static str| -> Handler { Arc::new(move |req| Box::pin(echo(name, req))) };
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a0, a1) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    // Both servers' loads are known (as the monitoring channel or a puller would fill the table).
    let table: SharedTable = Arc::default();
    for id in 0..2 {
        let r = LoadReport {
            server: ServerId(id),
            seq: 1,
            index: 0.0,
            sample: LoadSample::default(),
            lifetime_ms: 60_000,
            arrivals: 0,
            extra: 0,
            waits: Vec::new(),
        };
        table.lock().update(r, tokio::time::Instant::now().into_std());
    }
    let p = Pool { servers: vec![(ServerId(0), a0), (ServerId(1), a1)], table: Some(table) };
    let s0 = CooperatingServer::new(ServerId(0), p.clone(), Box::new(RoundRobin::default()), 0, handler("a"));
    let s1 = CooperatingServer::new(ServerId(1), p, Box::new(RoundRobin::default()), 100, handler("b"));
    let n0 = kecho::Node::start().await.unwrap();
    let n1 = kecho::Node::start().await.unwrap();
    let d0 = n0.channel("coop-data").await.unwrap();
    let d1 = n1.channel("coop-data").await.unwrap();
    let t = Duration::from_secs(5);
    let _t0 = s0.join_data_channel(&d0, Box::new(LeastLoaded::new(1)), t).await.unwrap();
    let _t1 = s1.join_data_channel(&d1, Box::new(LeastLoaded::new(1)), t).await.unwrap();
    // Each server has a request sink and a response sink on the channel.
    d0.wait_for_sinks(4, t).await.unwrap();
    d1.wait_for_sinks(4, t).await.unwrap();
    s0.spawn(la);
    s1.spawn(lb);
    for i in 0..4 {
        let r = send(a0, Method::POST, &format!("/item/{i}?q=1"), &[("x-test", "t")], "data").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, format!("b POST /item/{i}?q=1 x-test=t body=data"), "served by server 1");
        assert_eq!(r.header("x-server"), Some("b"));
    }
    // An upstream error comes back as it is, status and headers.
    let r = send(a0, Method::GET, "/fail", &[], "").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("x-why"), Some("maintenance"));
    use std::sync::atomic::Ordering;
    assert_eq!(s0.forwarded.load(Ordering::Relaxed), 5);
    assert_eq!(s0.served.load(Ordering::Relaxed), 0);
    assert_eq!(s1.served.load(Ordering::Relaxed), 5, "forwarded requests are served, not forwarded again");
    assert_eq!(s1.forwarded.load(Ordering::Relaxed), 0);
}

#[test]
fn http_messages_survive_the_payload_format() {
    let m = HttpMsg {
        method: "PATCH".into(),
        target: "/a/b?c=d".into(),
        status: 0,
        headers: vec![("x-a".into(), b"1".to_vec()), ("x-a".into(), b"2".to_vec()), ("cookie".into(), vec![])],
        body: Bytes::from_static(b"\x00\xffbody"),
    };
    assert_eq!(HttpMsg::decode(&m.encode()).unwrap(), m);
    let enc = m.encode();
    for cut in 0..enc.len() {
        assert!(HttpMsg::decode(&enc[..cut]).is_err(), "a payload cut at {cut} is refused");
    }
}

/// A probe whose queue the test sets.
struct Set(Arc<Mutex<u32>>);

impl LoadProbe for Set {
    fn sample(&mut self) -> LoadSample {
        LoadSample { queue: *self.0.lock(), ..LoadSample::default() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocator_fed_by_pull_follows_the_loads() {
    let (q0, q1) = (Arc::new(Mutex::new(5)), Arc::new(Mutex::new(0)));
    let life = Duration::from_millis(300);
    let e0 = LoadEndpoint::new(ServerId(0), Box::new(Set(q0.clone())), LoadWeights::default(), life);
    let e1 = LoadEndpoint::new(ServerId(1), Box::new(Set(q1.clone())), LoadWeights::default(), life);
    // Each upstream serves the application and `GET /load` on the same address.
    let mut addrs = Vec::new();
    let mut stops = Vec::new();
    for (name, e) in [("a", &e0), ("b", &e1)] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap());
        let app = e.router(LOAD_PATH).fallback(move |req: Request| async move { echo(name, req).await });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(async move {
            axum::serve(l, app).with_graceful_shutdown(async move { stopped.await.unwrap_or(()) }).await.unwrap()
        });
    }
    // The endpoint answers the report as JSON.
    let r = send(addrs[0], Method::GET, LOAD_PATH, &[], "").await;
    let rep: LoadReport = serde_json::from_str(&r.body).unwrap();
    assert_eq!((rep.server, rep.index, rep.lifetime_ms), (ServerId(0), 5.0, 300));
    let servers = vec![(ServerId(0), addrs[0]), (ServerId(1), addrs[1])];
    let table: SharedTable = Arc::default();
    let puller = LoadPuller::spawn(servers.clone(), LOAD_PATH, Duration::from_millis(50), table.clone());
    let now = || tokio::time::Instant::now().into_std();
    let known = |id, v| table.lock().index(ServerId(id), now()) == Some(v);
    wait(|| known(0, 5.0) && known(1, 0.0)).await;
    let fe = front(
        Pool { servers, table: Some(table.clone()) },
        Box::new(LeastLoaded::new(1)),
        Interaction::Indirect,
        Affinity::None,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(send(fe, Method::GET, "/", &[], "").await.header("x-server"), Some("b"), "the less loaded");
    }
    *q0.lock() = 0;
    *q1.lock() = 7;
    wait(|| known(0, 0.0) && known(1, 7.0)).await;
    for _ in 0..3 {
        assert_eq!(send(fe, Method::GET, "/", &[], "").await.header("x-server"), Some("a"), "the next pull moved it");
    }
    // Server 0 stops answering: its report ages out, and it ranks last although its last load was the lowest.
    let _ = stops.remove(0).send(());
    wait(|| table.lock().index(ServerId(0), now()).is_none()).await;
    assert!(table.lock().index(ServerId(1), now()).is_some());
    let once = LoadPuller::pull_once(&[(ServerId(1), addrs[1])], LOAD_PATH, Duration::from_secs(1)).await;
    assert_eq!(once.index(ServerId(1), now()), Some(7.0));
    puller.abort();
}

async fn wait(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
