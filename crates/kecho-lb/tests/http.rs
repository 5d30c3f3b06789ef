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
use kecho_lb::alloc::{HashAffinity, RoundRobin};
use kecho_lb::http::{client, Affinity, CooperatingServer, FrontEnd, Handler, Interaction, Pool, SmartClient};
use kecho_lb::load::ServerId;
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
