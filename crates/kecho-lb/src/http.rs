//! Dispatchers over HTTP, after the load-distribution patterns:
//!
//! - [`FrontEnd`] (Front-End Dispatcher): one address in front of a pool. Indirect: a reverse proxy that forwards
//!   method, path, headers and body intact and returns the server's answer as it is (502 if the server cannot be
//!   reached). Direct: a `307` redirect to the chosen server. Session affinity by cookie (the front end sets
//!   `kecho-server=ID` and honours it afterwards) or by a header hashed onto the pool.
//! - [`CooperatingServer`]: every server has a dispatcher in front of its own handler; it serves locally while
//!   fewer than `limit` requests are in progress, and forwards otherwise to another server's dispatcher, picked by
//!   the allocator from the load reports, marking the request so that the receiver serves it itself.
//!   With [`CooperatingServer::join_data_channel`] it forwards over a kecho *data channel* instead: the request
//!   (method, path, headers, body) travels as an `http-request` event to the server the load-aware OUT-filter
//!   picks, and the response (status, headers, body) comes back as an `http-response` event to the origin only;
//!   the first response wins (IN-filter).
//! - [`SmartClient`]: a client that picks the server itself with an allocator, and tries another server when one
//!   cannot be reached.
//! - [`LoadEndpoint`] and [`LoadPuller`]: the pull model of load information. A server answers `GET /load` with
//!   its [`LoadReport`] (JSON); a dispatcher polls its pool and keeps a [`SharedTable`] current, which any
//!   dynamic allocator then reads (a server that stops answering ages out of the table like a silent one).
//!
//! The allocators are the same policy objects as everywhere ([`crate::alloc`]); loads come from a
//! [`SharedTable`](crate::load::SharedTable) fed by the monitoring channel (push) or by a [`LoadPuller`] (pull).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
use kecho::{Attrs, Channel, SinkOptions, Source};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::alloc::{Allocator, Candidate};
use crate::error::{LbError, Result};
use crate::load::{LoadProbe, LoadReport, LoadSample, LoadTable, LoadWeights, ServerId, SharedTable};
use crate::mechanism::{int, now, FirstResponse, LoadAwareFilter, Placements};

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
    serving: AtomicU32,
    data: Mutex<Option<Arc<DataPath>>>,
    seq: AtomicU64,
    /// Requests served here.
    pub served: AtomicU32,
    /// Requests forwarded to other servers.
    pub forwarded: AtomicU32,
}

/// A cooperating server's end of the data channel.
struct DataPath {
    src: tokio::sync::Mutex<Source>,
    placements: Placements,
    pending: Mutex<HashMap<u64, oneshot::Sender<HttpMsg>>>,
    timeout: Duration,
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
            serving: AtomicU32::new(0),
            data: Mutex::new(None),
            seq: AtomicU64::new(0),
            served: AtomicU32::new(0),
            forwarded: AtomicU32::new(0),
        })
    }

    /// This server's load report, for the pull model: requests being served here as the queue, requests in
    /// progress (forwarded ones included) as connections.
    pub fn load_report(&self, weights: &LoadWeights, lifetime: Duration) -> LoadReport {
        let sample = LoadSample {
            queue: self.serving.load(Ordering::Relaxed),
            connections: self.in_progress.load(Ordering::Relaxed),
            ..LoadSample::default()
        };
        LoadReport {
            server: self.me,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            index: weights.index(&sample),
            sample,
            lifetime_ms: lifetime.as_millis() as u64,
            arrivals: 0,
            extra: 0,
            waits: Vec::new(),
        }
    }

    /// Forwards over `data` from now on, instead of to the other servers' dispatchers: a busy server sends the
    /// request as an `http-request` event (attributes `req`, `origin`; the payload is the request) to the server
    /// `allocator` picks among the pool's servers with a valid load report (any other server of the channel if no
    /// report is known), and waits up to `timeout` for the `http-response` event (attributes `rsp`, `origin`,
    /// `server`), answering `504` after that. Requests forwarded to this server arrive the same way and are served
    /// by its handler. Every server of the pool must join the same channel; a server's request sink advertises
    /// `server = ID`. Returns the tasks that serve the channel.
    pub async fn join_data_channel(
        self: &Arc<Self>,
        data: &Channel,
        allocator: Box<dyn Allocator>,
        timeout: Duration,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let me = self.me.0;
        data.set_in_filter(Some(Arc::new(FirstResponse::new("rsp", timeout * 2))));
        let mut requests =
            data.sink(SinkOptions::new().types(["http-request"]).capacity(1 << 14).attr("server", me))?;
        let mut responses = data
            .sink(SinkOptions::new().types(["http-response"]).capacity(1 << 14).filter(&format!("origin == {me}")))?;
        let table = self.pool.table.clone().unwrap_or_default();
        let placements: Placements = Arc::default();
        let mut src = data.source()?;
        src.set_out_filter(Some(Arc::new(
            LoadAwareFilter::new(table, allocator, Some(self.me)).placements(placements.clone()).fallback_to_all(true),
        )));
        let path = Arc::new(DataPath {
            src: tokio::sync::Mutex::new(src),
            placements,
            pending: Mutex::new(HashMap::new()),
            timeout,
        });
        *self.data.lock() = Some(path.clone());
        let mut tasks = Vec::new();
        let p = path.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(ev) = responses.recv().await {
                let (Some(rsp), Ok(msg)) = (int(ev.attrs(), "rsp"), HttpMsg::decode(ev.payload())) else { continue };
                if let Some(tx) = p.pending.lock().remove(&rsp) {
                    let _ = tx.send(msg);
                }
            }
        }));
        let s = self.clone();
        let reply = tokio::sync::Mutex::new(data.source()?);
        let reply = Arc::new(reply);
        tasks.push(tokio::spawn(async move {
            while let Ok(ev) = requests.recv().await {
                let (Some(req), Some(origin)) = (int(ev.attrs(), "req"), int(ev.attrs(), "origin")) else { continue };
                let Ok(msg) = HttpMsg::decode(ev.payload()) else { continue };
                let (s, reply) = (s.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut request = msg.into_request();
                    if let Ok(v) = HeaderValue::from_str(&origin.to_string()) {
                        request.headers_mut().insert(FORWARDED, v);
                    }
                    s.in_progress.fetch_add(1, Ordering::AcqRel);
                    let resp = s.serve(request).await;
                    s.in_progress.fetch_sub(1, Ordering::AcqRel);
                    let Ok(msg) = HttpMsg::from_response(resp).await else { return };
                    let attrs = Attrs::new()
                        .with("rsp", req as i64)
                        .with("origin", origin as i64)
                        .with("server", i64::from(s.me.0));
                    let _ = reply.lock().await.submit("http-response", &attrs, &msg.encode()).await;
                });
            }
        }));
        Ok(tasks)
    }

    async fn serve(&self, req: Request) -> Response {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.serving.fetch_add(1, Ordering::AcqRel);
        let resp = (self.handler)(req).await;
        self.serving.fetch_sub(1, Ordering::AcqRel);
        resp
    }

    /// Forwards over the data channel; gives the request back if no server was chosen.
    async fn forward_over(&self, path: &DataPath, req: Request) -> std::result::Result<Response, Request> {
        let msg = match HttpMsg::from_request(req).await {
            Ok(m) => m,
            Err(e) => return Ok(text(StatusCode::BAD_REQUEST, &e.to_string())),
        };
        let id = (u64::from(self.me.0) << 40) | self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        path.pending.lock().insert(id, tx);
        let attrs = Attrs::new().with("req", id as i64).with("origin", i64::from(self.me.0));
        let sent = path.src.lock().await.submit("http-request", &attrs, &msg.encode()).await;
        let chosen = path.placements.lock().remove(&id).unwrap_or_default();
        if sent.is_err() || chosen.is_empty() {
            path.pending.lock().remove(&id);
            return Err(msg.into_request());
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(path.timeout, rx).await {
            Ok(Ok(m)) => Ok(m.into_response()),
            _ => {
                path.pending.lock().remove(&id);
                Ok(text(StatusCode::GATEWAY_TIMEOUT, &format!("no response from {} over the data channel", chosen[0])))
            }
        }
    }

    /// Serves on `listener`.
    pub fn spawn(self: &Arc<Self>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let app = axum::Router::new().fallback(cooperate).with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }

    /// Serves on `listener`, and answers `GET path` itself with its [`load_report`](Self::load_report) (default
    /// weights, valid for `lifetime`), for dispatchers that pull load ([`LoadPuller`]).
    pub fn spawn_with_load(
        self: &Arc<Self>,
        listener: TcpListener,
        path: &str,
        lifetime: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let load = axum::routing::get(move || {
            let me = me.clone();
            async move { json(&me.load_report(&LoadWeights::default(), lifetime)) }
        });
        let app = axum::Router::new().route(path, load).fallback(cooperate).with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }
}

async fn cooperate(State(s): State<Arc<CooperatingServer>>, req: Request) -> Response {
    let forwarded = req.headers().contains_key(FORWARDED);
    let busy = s.in_progress.fetch_add(1, Ordering::AcqRel) >= s.limit;
    let data = s.data.lock().clone();
    let resp = if busy && !forwarded {
        if let Some(path) = data {
            match s.forward_over(&path, req).await {
                Ok(r) => r,
                Err(req) => s.serve(req).await,
            }
        } else {
            match s.pool.pick(&s.allocator, None, &[s.me]) {
                Some((to, addr)) => {
                    s.forwarded.fetch_add(1, Ordering::Relaxed);
                    let from = s.me.0.to_string();
                    match forward(&s.client, addr, req, &[(FORWARDED, &from)]).await {
                        Ok(r) => r,
                        Err(e) => text(StatusCode::BAD_GATEWAY, &format!("forwarding to {to}: {e}")),
                    }
                }
                None => s.serve(req).await,
            }
        }
    } else {
        s.serve(req).await
    };
    s.in_progress.fetch_sub(1, Ordering::AcqRel);
    resp
}

/// An HTTP request or response as the payload of a data-channel event: method and path (requests) or status
/// (responses), headers less hop-by-hop ones, and the body. Length-prefixed fields, big-endian.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpMsg {
    /// `GET`, `POST`, ... (empty for a response).
    pub method: String,
    /// Path and query (empty for a response).
    pub target: String,
    /// Status (0 for a request).
    pub status: u16,
    /// Headers, in order, repeated names kept.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Bytes,
}

impl HttpMsg {
    fn headers_of(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()) && *k != hyper::header::CONTENT_LENGTH)
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    }
    fn put_headers(&self, h: &mut HeaderMap) {
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_bytes(v)) {
                h.append(k, v);
            }
        }
    }
    /// Takes a request apart (reads its body, at most [`MAX_BODY`]).
    pub async fn from_request(req: Request) -> Result<Self> {
        let (parts, body) = req.into_parts();
        let body =
            axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| LbError::Http(format!("request body: {e}")))?;
        Ok(HttpMsg {
            method: parts.method.as_str().to_owned(),
            target: path_and_query(&parts.uri).to_owned(),
            status: 0,
            headers: Self::headers_of(&parts.headers),
            body,
        })
    }
    /// Takes a response apart (reads its body, at most [`MAX_BODY`]).
    pub async fn from_response(resp: Response) -> Result<Self> {
        let (parts, body) = resp.into_parts();
        let body =
            axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| LbError::Http(format!("response body: {e}")))?;
        Ok(HttpMsg {
            method: String::new(),
            target: String::new(),
            status: parts.status.as_u16(),
            headers: Self::headers_of(&parts.headers),
            body,
        })
    }
    /// The request again.
    pub fn into_request(self) -> Request {
        let mut r = Request::new(Body::from(self.body.clone()));
        *r.method_mut() = hyper::Method::from_bytes(self.method.as_bytes()).unwrap_or(hyper::Method::GET);
        *r.uri_mut() = self.target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        self.put_headers(r.headers_mut());
        r
    }
    /// The response again.
    pub fn into_response(self) -> Response {
        let mut r = Response::new(Body::from(self.body.clone()));
        *r.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        self.put_headers(r.headers_mut());
        r
    }
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        let mut put = |b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        };
        put(self.method.as_bytes());
        put(self.target.as_bytes());
        put(&self.status.to_be_bytes());
        put(&(self.headers.len() as u32).to_be_bytes());
        for (k, v) in &self.headers {
            put(k.as_bytes());
            put(v);
        }
        put(&self.body);
        out
    }
    /// From a payload.
    pub fn decode(mut b: &[u8]) -> Result<Self> {
        let bad = || LbError::Http("malformed HTTP message on the data channel".into());
        let mut field = || -> Result<&[u8]> {
            let len = u32::from_be_bytes(b.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
            let f = b.get(4..4 + len).ok_or_else(bad)?;
            b = &b[4 + len..];
            Ok(f)
        };
        let text = |f: &[u8]| String::from_utf8(f.to_vec()).map_err(|_| bad());
        let method = text(field()?)?;
        let target = text(field()?)?;
        let status = u16::from_be_bytes(field()?.try_into().map_err(|_| bad())?);
        let n = u32::from_be_bytes(field()?.try_into().map_err(|_| bad())?) as usize;
        let mut headers = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            let k = text(field()?)?;
            headers.push((k, field()?.to_vec()));
        }
        let body = Bytes::copy_from_slice(field()?);
        Ok(HttpMsg { method, target, status, headers, body })
    }
}

/// The pull model's server side: answers `GET /load` (or any path it is mounted at) with the node's current
/// [`LoadReport`] as JSON, sampled from a probe when asked.
pub struct LoadEndpoint {
    server: ServerId,
    weights: LoadWeights,
    lifetime: Duration,
    probe: Mutex<Box<dyn LoadProbe>>,
    seq: AtomicU64,
}

impl std::fmt::Debug for LoadEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadEndpoint").field("server", &self.server).finish_non_exhaustive()
    }
}

/// Where [`LoadEndpoint`] answers by default.
pub const LOAD_PATH: &str = "/load";

impl LoadEndpoint {
    /// Reports of `server` from `probe`, each valid for `lifetime` (give the pullers' period times three).
    pub fn new(server: ServerId, probe: Box<dyn LoadProbe>, weights: LoadWeights, lifetime: Duration) -> Arc<Self> {
        Arc::new(LoadEndpoint { server, weights, lifetime, probe: Mutex::new(probe), seq: AtomicU64::new(0) })
    }
    /// A fresh report.
    pub fn report(&self) -> LoadReport {
        let sample = self.probe.lock().sample();
        LoadReport {
            server: self.server,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            index: self.weights.index(&sample),
            sample,
            lifetime_ms: self.lifetime.as_millis() as u64,
            arrivals: 0,
            extra: 0,
            waits: Vec::new(),
        }
    }
    /// A router answering `GET path`; merge it into the application's router.
    pub fn router(self: &Arc<Self>, path: &str) -> axum::Router {
        let me = self.clone();
        axum::Router::new().route(
            path,
            axum::routing::get(move || {
                let me = me.clone();
                async move { json(&me.report()) }
            }),
        )
    }
    /// Serves `GET /load` alone on `listener`.
    pub fn spawn(self: &Arc<Self>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let app = self.router(LOAD_PATH);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }
}

/// The pull model's dispatcher side: every `period`, asks each server for its report (`GET path`, at most
/// `period` per request, all servers at once) and keeps `table` current. A server that cannot be reached is left
/// alone; its last report ages out after its lifetime, so it leaves the allocators' candidates.
#[derive(Debug)]
pub struct LoadPuller;

impl LoadPuller {
    /// Starts polling `servers` into `table`.
    pub fn spawn(
        servers: Vec<(ServerId, SocketAddr)>,
        path: &str,
        period: Duration,
        table: SharedTable,
    ) -> tokio::task::JoinHandle<()> {
        let path = path.to_owned();
        let client = client();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut round = tokio::task::JoinSet::new();
                for (id, addr) in &servers {
                    let (id, client, table) = (*id, client.clone(), table.clone());
                    let uri = format!("http://{addr}{path}");
                    round.spawn(async move {
                        if let Ok(Some(r)) = tokio::time::timeout(period, pull(&client, &uri)).await {
                            if r.server == id {
                                table.lock().update(r, now());
                            }
                        }
                    });
                }
                while round.join_next().await.is_some() {}
            }
        })
    }

    /// Pulls once, into a new table (for a dispatcher that asks before each decision).
    pub async fn pull_once(servers: &[(ServerId, SocketAddr)], path: &str, timeout: Duration) -> LoadTable {
        let client = client();
        let mut table = LoadTable::new();
        for (id, addr) in servers {
            let uri = format!("http://{addr}{path}");
            if let Ok(Some(r)) = tokio::time::timeout(timeout, pull(&client, &uri)).await {
                if r.server == *id {
                    table.update(r, now());
                }
            }
        }
        table
    }
}

/// A load report as a JSON response.
fn json(r: &LoadReport) -> Response {
    let mut resp = Response::new(Body::from(serde_json::to_vec(r).unwrap_or_default()));
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn pull(client: &HttpClient, uri: &str) -> Option<LoadReport> {
    let req = hyper::Request::get(uri).body(Full::new(Bytes::new())).ok()?;
    let resp = client.request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
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
