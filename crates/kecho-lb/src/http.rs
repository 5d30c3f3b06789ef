//! Dispatchers over HTTP, after the load-distribution patterns:
//!
//! - [`FrontEnd`] (Front-End Dispatcher): one address in front of a pool. Indirect: a reverse proxy that forwards
//!   method, path, headers and body intact and returns the server's answer as it is (502 if the server cannot be
//!   reached). Direct: a `307` redirect to the chosen server. Session affinity by cookie (the front end sets
//!   `kecho-server=ID` and honours it afterwards) or by a header hashed onto the pool.
//! - [`CooperatingServer`]: every server has a dispatcher in front of its own handler; it serves locally while
//!   fewer than `limit` requests are in progress, and forwards otherwise to another server's dispatcher, picked by
//!   the allocator from the load reports, marking the request so that the receiver serves it itself.
//! - [`SmartClient`]: a client that picks the server itself with an allocator, and tries another server when one
//!   cannot be reached.
//!
//! The allocators are the same policy objects as everywhere ([`crate::alloc`]); loads come from a
//! [`SharedTable`](crate::load::SharedTable) fed by the monitoring channel (push) or filled by the caller (pull).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, COOKIE, LOCATION, SET_COOKIE};
use hyper::{HeaderMap, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::alloc::{Allocator, Candidate};
use crate::error::{LbError, Result};
use crate::load::{ServerId, SharedTable};
use crate::mechanism::now;

/// Largest request or response body a dispatcher buffers.
pub const MAX_BODY: usize = 16 << 20;

/// The header a cooperating server puts on a request it forwards: the receiver serves it without forwarding again.
pub const FORWARDED: &str = "x-kecho-forwarded";

/// The affinity cookie's name.
pub const COOKIE_NAME: &str = "kecho-server";

/// Headers that concern one connection only and are never forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The servers of a pool, with their addresses, and where their loads come from.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Each server and its HTTP address.
    pub servers: Vec<(ServerId, SocketAddr)>,
    /// Load reports, if the allocator needs them (servers without a valid report are still candidates, ranked
    /// last by dynamic allocators).
    pub table: Option<SharedTable>,
}

impl Pool {
    fn candidates(&self) -> Vec<(Candidate, SocketAddr)> {
        let t = now();
        let table = self.table.as_ref().map(|t| t.lock());
        self.servers
            .iter()
            .map(|(id, addr)| (Candidate::new(*id, table.as_ref().and_then(|tb| tb.index(*id, t))), *addr))
            .collect()
    }

    fn pick(
        &self,
        alloc: &Mutex<Box<dyn Allocator>>,
        key: Option<&[u8]>,
        except: &[ServerId],
    ) -> Option<(ServerId, SocketAddr)> {
        let all = self.candidates();
        let cands: Vec<(Candidate, SocketAddr)> =
            all.into_iter().filter(|(c, _)| !except.contains(&c.server)).collect();
        let plain: Vec<Candidate> = cands.iter().map(|(c, _)| *c).collect();
        let mut out = Vec::new();
        alloc.lock().allocate(key, &plain, &mut out);
        out.first().map(|&i| (cands[i].0.server, cands[i].1))
    }
}

/// How a front end answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// Forwards the request and returns the server's response (a reverse proxy).
    Indirect,
    /// Answers `307 Temporary Redirect` to the chosen server.
    Direct,
}

/// Session affinity of a front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    /// None: every request is allocated afresh.
    None,
    /// A cookie naming the server (set on the first response, honoured while the server is in the pool).
    Cookie,
    /// The value of this header is the allocator's key (use a hash allocator to make it sticky).
    Header(String),
}

/// The HTTP client the dispatchers use.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A Front-End Dispatcher.
pub struct FrontEnd {
    pool: Pool,
    allocator: Mutex<Box<dyn Allocator>>,
    interaction: Interaction,
    affinity: Affinity,
    client: HttpClient,
}

impl std::fmt::Debug for FrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontEnd").field("interaction", &self.interaction).finish_non_exhaustive()
    }
}

impl FrontEnd {
    /// A front end over `pool` choosing with `allocator`.
    pub fn new(pool: Pool, allocator: Box<dyn Allocator>, interaction: Interaction, affinity: Affinity) -> Self {
        FrontEnd { pool, allocator: Mutex::new(allocator), interaction, affinity, client: client() }
    }

    /// Serves on `listener` until the task is aborted.
    pub fn spawn(self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let app = axum::Router::new().fallback(front_end).with_state(Arc::new(self));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }
}

async fn front_end(State(fe): State<Arc<FrontEnd>>, req: Request) -> Response {
    let from_cookie = match fe.affinity {
        Affinity::Cookie => {
            cookie_server(req.headers()).and_then(|id| fe.pool.servers.iter().find(|(s, _)| *s == id).copied())
        }
        _ => None,
    };
    let key = match &fe.affinity {
        Affinity::Header(h) => req.headers().get(h.as_str()).map(|v| v.as_bytes().to_vec()),
        _ => None,
    };
    let Some((server, addr)) = from_cookie.or_else(|| fe.pool.pick(&fe.allocator, key.as_deref(), &[])) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no server available");
    };
    let mut resp = match fe.interaction {
        Interaction::Direct => {
            let target = format!("http://{addr}{}", path_and_query(req.uri()));
            let mut r = text(StatusCode::TEMPORARY_REDIRECT, "");
            if let Ok(v) = HeaderValue::from_str(&target) {
                r.headers_mut().insert(LOCATION, v);
            }
            r
        }
        Interaction::Indirect => match forward(&fe.client, addr, req, &[]).await {
            Ok(r) => r,
            Err(e) => text(StatusCode::BAD_GATEWAY, &format!("upstream {server}: {e}")),
        },
    };
    if fe.affinity == Affinity::Cookie && from_cookie.is_none() {
        if let Ok(v) = HeaderValue::from_str(&format!("{COOKIE_NAME}={}; Path=/", server.0)) {
            resp.headers_mut().append(SET_COOKIE, v);
        }
    }
    resp
}

/// The server named by the affinity cookie, if any.
fn cookie_server(h: &HeaderMap) -> Option<ServerId> {
    h.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == COOKIE_NAME).then(|| v.parse::<u32>().ok().map(ServerId)).flatten()
    })
}

fn path_and_query(u: &Uri) -> &str {
    u.path_and_query().map_or("/", |p| p.as_str())
}

fn text(status: StatusCode, body: &str) -> Response {
    let mut r = Response::new(Body::from(body.to_owned()));
    *r.status_mut() = status;
    r
}

/// Forwards `req` to `addr` with its method, path, headers (less hop-by-hop ones) and body, adding `extra`
/// headers; returns the upstream response with its status, headers and body.
pub async fn forward(client: &HttpClient, addr: SocketAddr, req: Request, extra: &[(&str, &str)]) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| LbError::Http(format!("request body: {e}")))?;
    let uri: Uri = format!("http://{addr}{}", path_and_query(&parts.uri))
        .parse()
        .map_err(|e| LbError::Http(format!("uri: {e}")))?;
    let mut up = hyper::Request::builder().method(parts.method).uri(uri);
    if let Some(h) = up.headers_mut() {
        for (k, v) in parts.headers.iter() {
            if !HOP_BY_HOP.contains(&k.as_str()) {
                h.append(k.clone(), v.clone());
            }
        }
        for (k, v) in extra {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(*k), HeaderValue::from_str(v)) {
                h.insert(k, v);
            }
        }
    }
    let up = up.body(Full::new(body)).map_err(|e| LbError::Http(e.to_string()))?;
    let resp = client.request(up).await.map_err(|e| LbError::Http(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| LbError::Http(format!("response body: {e}")))?.to_bytes();
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = parts.status;
    for (k, v) in parts.headers.iter() {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != hyper::header::CONTENT_LENGTH {
            out.headers_mut().append(k.clone(), v.clone());
        }
    }
    Ok(out)
}

/// The application behind a cooperating server: turns a request into a response.
pub type Handler = Arc<dyn Fn(Request) -> futures_lite::BoxedResponse + Send + Sync>;

/// Minimal boxed-future alias, so handlers can be async without another dependency.
pub mod futures_lite {
    /// A handler's future.
    pub type BoxedResponse = std::pin::Pin<Box<dyn std::future::Future<Output = axum::response::Response> + Send>>;
}

/// A Cooperating Server: a dispatcher in front of a local handler that serves locally or forwards to another
/// server's dispatcher.
pub struct CooperatingServer {
    me: ServerId,
    pool: Pool,
    allocator: Mutex<Box<dyn Allocator>>,
    limit: u32,
    in_progress: AtomicU32,
    handler: Handler,
    client: HttpClient,
    /// Requests served here.
    pub served: AtomicU32,
    /// Requests forwarded to other servers.
    pub forwarded: AtomicU32,
}

impl std::fmt::Debug for CooperatingServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CooperatingServer").field("me", &self.me).finish_non_exhaustive()
    }
}

impl CooperatingServer {
    /// Server `me` of `pool`, serving with `handler` while fewer than `limit` requests are in progress.
    pub fn new(me: ServerId, pool: Pool, allocator: Box<dyn Allocator>, limit: u32, handler: Handler) -> Arc<Self> {
        Arc::new(CooperatingServer {
            me,
            pool,
            allocator: Mutex::new(allocator),
            limit,
            in_progress: AtomicU32::new(0),
            handler,
            client: client(),
            served: AtomicU32::new(0),
            forwarded: AtomicU32::new(0),
        })
    }

    /// Serves on `listener`.
    pub fn spawn(self: &Arc<Self>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let app = axum::Router::new().fallback(cooperate).with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }
}

async fn cooperate(State(s): State<Arc<CooperatingServer>>, req: Request) -> Response {
    let forwarded = req.headers().contains_key(FORWARDED);
    let busy = s.in_progress.fetch_add(1, Ordering::AcqRel) >= s.limit;
    let resp = if busy && !forwarded {
        match s.pool.pick(&s.allocator, None, &[s.me]) {
            Some((to, addr)) => {
                s.forwarded.fetch_add(1, Ordering::Relaxed);
                let from = s.me.0.to_string();
                match forward(&s.client, addr, req, &[(FORWARDED, &from)]).await {
                    Ok(r) => r,
                    Err(e) => text(StatusCode::BAD_GATEWAY, &format!("forwarding to {to}: {e}")),
                }
            }
            None => {
                s.served.fetch_add(1, Ordering::Relaxed);
                (s.handler)(req).await
            }
        }
    } else {
        s.served.fetch_add(1, Ordering::Relaxed);
        (s.handler)(req).await
    };
    s.in_progress.fetch_sub(1, Ordering::AcqRel);
    resp
}

/// A Smart Client: picks the server itself.
pub struct SmartClient {
    pool: Pool,
    allocator: Mutex<Box<dyn Allocator>>,
    client: HttpClient,
}

impl std::fmt::Debug for SmartClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartClient").field("servers", &self.pool.servers.len()).finish_non_exhaustive()
    }
}

impl SmartClient {
    /// A client of `pool` choosing with `allocator`.
    pub fn new(pool: Pool, allocator: Box<dyn Allocator>) -> Self {
        SmartClient { pool, allocator: Mutex::new(allocator), client: client() }
    }

    /// Sends a request to a server of the allocator's choice (`key`: affinity key); a server that cannot be
    /// reached is left out and another is tried. Returns the server and its response.
    pub async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        key: Option<&[u8]>,
        body: Bytes,
    ) -> Result<(ServerId, hyper::Response<Bytes>)> {
        let mut failed = Vec::new();
        let mut last = LbError::NoServer;
        while let Some((server, addr)) = self.pool.pick(&self.allocator, key, &failed) {
            let uri: Uri = format!("http://{addr}{path}").parse().map_err(|e| LbError::Http(format!("uri: {e}")))?;
            let req = hyper::Request::builder()
                .method(method.clone())
                .uri(uri)
                .body(Full::new(body.clone()))
                .map_err(|e| LbError::Http(e.to_string()))?;
            match self.client.request(req).await {
                Ok(resp) => {
                    let (parts, b) = resp.into_parts();
                    let b = b.collect().await.map_err(|e| LbError::Http(e.to_string()))?.to_bytes();
                    return Ok((server, hyper::Response::from_parts(parts, b)));
                }
                Err(e) => {
                    last = LbError::Http(format!("{server}: {e}"));
                    failed.push(server);
                }
            }
        }
        Err(last)
    }
}
