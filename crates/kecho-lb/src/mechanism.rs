//! KECho's load-balancing mechanism on kecho channels (paper, section 4): a *data channel* carries forwarded
//! requests, their responses and cancel events; an OUT-filter sends a forwarded request to the servers an
//! [`Allocator`] picks from the load reports of the *monitoring channel*; an IN-filter (kecho's
//! [`Dedupe`](kecho::filter::Dedupe)) discards duplicate responses, so the first response wins.
//!
//! Event types on the data channel and their attributes:
//!
//! | type | attributes | sent to |
//! |---|---|---|
//! | `request` | `req` (id), `origin` (server id), `arrived` (ns since the farm's epoch), `work` (ns), `claim` (bool) | the servers the OUT-filter picks |
//! | `response` | `rsp` (the request's id), `origin`, `server` | the origin only (its sink's content filter `origin == ID`) |
//! | `cancel` | `req`, `arrived`, `ts` (ns), `server` | every server |
//!
//! Each server's request sink advertises `server = ID`; that is how the OUT-filter maps a sink to a load report.
//! Responses use `rsp`, not `req`, as their key so that the IN-filter's memory of responses never swallows a
//! request or a cancel event with the same id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kecho::filter::{EventView, InDecision, InEvent, InFilter, LocalSinks, OutFilter, SinkView};
use kecho::{Attrs, Value};
use parking_lot::Mutex;

use crate::alloc::{Allocator, Candidate};
use crate::load::{ServerId, SharedTable};
use crate::overhead::Overhead;

/// Which servers each forwarded request was sent to (by request id), as recorded by a [`LoadAwareFilter`].
pub type Placements = Arc<Mutex<HashMap<u64, Vec<ServerId>>>>;

/// The time as kecho's filters see it (tokio's clock, so paused-time tests work).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// An OUT-filter that picks servers with an [`Allocator`] over the load reports of the monitoring channel.
/// Sinks are matched to servers by their `server` attribute; the node's own server is left out, and so is every
/// server whose report aged out (soft state), so a dead server stops receiving work once its report expires.
pub struct LoadAwareFilter {
    table: SharedTable,
    allocator: Mutex<Box<dyn Allocator>>,
    me: Option<ServerId>,
    placements: Option<Placements>,
    overhead: Arc<Overhead>,
    local: Option<LocalLoads>,
}

/// Loads a dispatcher knows itself, e.g. the requests it sent to each server and not yet seen answered.
pub type LocalLoads = Arc<Mutex<HashMap<ServerId, f64>>>;

impl std::fmt::Debug for LoadAwareFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadAwareFilter").field("me", &self.me).finish_non_exhaustive()
    }
}

impl LoadAwareFilter {
    /// Picks with `allocator` among the servers with a valid report in `table`, other than `me`.
    pub fn new(table: SharedTable, allocator: Box<dyn Allocator>, me: Option<ServerId>) -> Self {
        LoadAwareFilter {
            table,
            allocator: Mutex::new(allocator),
            me,
            placements: None,
            overhead: Arc::default(),
            local: None,
        }
    }
    /// Records each request's chosen servers (by its `req` attribute) in `placements`.
    pub fn placements(mut self, placements: Placements) -> Self {
        self.placements = Some(placements);
        self
    }
    /// Ranks servers by `loads` (kept by the caller) instead of their reported index; the reports still decide
    /// which servers are alive.
    pub fn local_loads(mut self, loads: LocalLoads) -> Self {
        self.local = Some(loads);
        self
    }
    /// Adds the time spent choosing to `overhead`.
    pub fn overhead(mut self, overhead: Arc<Overhead>) -> Self {
        self.overhead = overhead;
        self
    }
}

impl OutFilter for LoadAwareFilter {
    fn select(&self, event: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>) {
        let t0 = Instant::now();
        let now = now();
        let mut cands = Vec::with_capacity(sinks.len());
        let mut index = Vec::with_capacity(sinks.len());
        {
            let table = self.table.lock();
            let local = self.local.as_ref().map(|l| l.lock());
            for (i, s) in sinks.iter().enumerate() {
                let Some(id) = s.number("server") else { continue };
                let id = ServerId(id as u32);
                if Some(id) == self.me {
                    continue;
                }
                let Some(mut load) = table.index(id, now) else { continue };
                if let Some(l) = &local {
                    load = l.get(&id).copied().unwrap_or(0.0);
                }
                cands.push(Candidate { server: id, load: Some(load), weight: s.number("weight").unwrap_or(1.0) });
                index.push(i);
            }
        }
        let key = match event.attrs().get("key") {
            Some(Value::Str(s)) => Some(s.as_bytes()),
            Some(Value::Bytes(b)) => Some(&b[..]),
            _ => None,
        };
        let mut out = Vec::new();
        self.allocator.lock().allocate(key, &cands, &mut out);
        chosen.extend(out.iter().map(|&o| index[o]));
        if let (Some(p), Some(Value::Int(req))) = (&self.placements, event.attrs().get("req")) {
            p.lock().insert(*req as u64, out.iter().map(|&o| cands[o].server).collect());
        }
        self.overhead.add_out_filter(t0.elapsed());
    }
}

/// An IN-filter that times another (for the overhead breakdown).
#[derive(Debug)]
pub struct Timed<F> {
    inner: F,
    overhead: Arc<Overhead>,
}

impl<F: InFilter> Timed<F> {
    /// Times `inner` into `overhead`.
    pub fn new(inner: F, overhead: Arc<Overhead>) -> Self {
        Timed { inner, overhead }
    }
}

impl<F: InFilter> InFilter for Timed<F> {
    fn filter(&self, event: &mut InEvent<'_>, sinks: &LocalSinks<'_>) -> InDecision {
        let t0 = Instant::now();
        let d = self.inner.filter(event, sinks);
        self.overhead.add_in_filter(t0.elapsed());
        d
    }
}

/// A request as carried on the data channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestMsg {
    /// Request id, unique in the farm.
    pub req: u64,
    /// The server (or front end) the client sent it to, which gets the response.
    pub origin: ServerId,
    /// When it arrived there, in ns since the farm's epoch.
    pub arrived_ns: u64,
    /// Processing it needs, in ns.
    pub work_ns: u64,
    /// Whether the copies of this request use cancel events (the first to start wins).
    pub claim: bool,
}

impl RequestMsg {
    /// As event attributes.
    pub fn attrs(&self) -> Attrs {
        Attrs::new()
            .with("req", self.req as i64)
            .with("origin", i64::from(self.origin.0))
            .with("arrived", self.arrived_ns as i64)
            .with("work", self.work_ns as i64)
            .with("claim", self.claim)
    }
    /// From event attributes; `None` if one is missing or mistyped.
    pub fn parse(a: &Attrs) -> Option<Self> {
        Some(RequestMsg {
            req: int(a, "req")?,
            origin: ServerId(int(a, "origin")? as u32),
            arrived_ns: int(a, "arrived")?,
            work_ns: int(a, "work")?,
            claim: matches!(a.get("claim"), Some(Value::Bool(true))),
        })
    }
}

/// A non-negative integer attribute.
pub(crate) fn int(a: &Attrs, name: &str) -> Option<u64> {
    match a.get(name)? {
        Value::Int(i) if *i >= 0 => Some(*i as u64),
        _ => None,
    }
}

/// Waits for `cond` to hold, polling every 2 ms, at most `limit`.
pub(crate) async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}
