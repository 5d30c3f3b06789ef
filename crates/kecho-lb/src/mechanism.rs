//! KECho's load-balancing mechanism on kecho channels (paper, section 4): a *data channel* carries forwarded
//! requests, their responses and cancel events; an OUT-filter sends a forwarded request to the servers an
//! [`Allocator`] picks from the load reports of the *monitoring channel*; an IN-filter ([`FirstResponse`], kecho's
//! `Dedupe` on tokio's clock) discards duplicate responses, so the first response wins.
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
    fallback: bool,
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
            fallback: false,
        }
    }
    /// When no server has a valid report (at start, or when every report aged out), chooses among all the
    /// servers' sinks, their load unknown (or the local loads, if kept), instead of none. For a front end, which
    /// cannot serve a request itself: without it, a request submitted while it knows no load reaches no server and
    /// is lost. A forwarding server leaves it off: with nobody known, it keeps the request.
    pub fn fallback_to_all(mut self, on: bool) -> Self {
        self.fallback = on;
        self
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
            // First the servers with a valid report; if there is none and the fallback is on, every server.
            for all in [false, true] {
                if all && (!self.fallback || !cands.is_empty()) {
                    break;
                }
                for (i, s) in sinks.iter().enumerate() {
                    let Some(id) = s.number("server") else { continue };
                    let id = ServerId(id as u32);
                    if Some(id) == self.me {
                        continue;
                    }
                    let mut load = table.index(id, now);
                    if load.is_none() && !all {
                        continue;
                    }
                    if let Some(l) = &local {
                        load = Some(l.get(&id).copied().unwrap_or(0.0));
                    }
                    cands.push(Candidate { server: id, load, weight: s.number("weight").unwrap_or(1.0) });
                    index.push(i);
                }
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

/// The first response wins: an IN-filter that drops an event whose `key` attribute (e.g. `rsp`) was seen within
/// the last `window`; events without the key pass. It does what kecho's [`Dedupe`](kecho::filter::Dedupe) does, on
/// the same clock (tokio's), and adds [`FirstResponse::decide`], so that a test outside the core can drive the
/// decision itself (an IN-filter's input cannot be built outside `kecho`); at most `capacity` keys are remembered
/// (oldest forgotten first).
#[derive(Debug)]
pub struct FirstResponse {
    key: String,
    seen: Mutex<FirstWins>,
    dropped: std::sync::atomic::AtomicU64,
}

impl FirstResponse {
    /// Duplicates by `key` within `window`.
    pub fn new(key: &str, window: Duration) -> Self {
        FirstResponse { key: key.to_owned(), seen: Mutex::new(FirstWins::new(window, 1 << 16)), dropped: 0.into() }
    }
    /// Remembers at most `n` keys.
    pub fn capacity(self, n: usize) -> Self {
        let window = self.seen.lock().window;
        *self.seen.lock() = FirstWins::new(window, n);
        self
    }
    /// The decision for an event whose key attribute is `value`, at tokio's `now`.
    pub fn decide(&self, value: &Value) -> InDecision {
        if self.seen.lock().first(value_key(value), now()) {
            InDecision::Deliver
        } else {
            self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            InDecision::Drop
        }
    }
    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl InFilter for FirstResponse {
    fn filter(&self, event: &mut InEvent<'_>, _sinks: &LocalSinks<'_>) -> InDecision {
        match event.attrs().get(&self.key) {
            Some(v) => self.decide(v),
            None => InDecision::Deliver,
        }
    }
}

/// A stable 64-bit key of an attribute value.
fn value_key(v: &Value) -> u64 {
    match v {
        Value::Int(i) => crate::alloc::mix(*i as u64),
        Value::Str(s) => crate::alloc::fnv(s.as_bytes()),
        Value::Bytes(b) => crate::alloc::fnv(b),
        other => crate::alloc::fnv(format!("{other:?}").as_bytes()),
    }
}

/// Which keys were seen within a window: the pure state machine behind [`FirstResponse`], time passed in.
#[derive(Debug)]
pub struct FirstWins {
    window: Duration,
    capacity: usize,
    at: HashMap<u64, Instant>,
    order: std::collections::VecDeque<(u64, Instant)>,
}

impl FirstWins {
    /// Keys seen within `window`, at most `capacity` of them.
    pub fn new(window: Duration, capacity: usize) -> Self {
        FirstWins { window, capacity: capacity.max(1), at: HashMap::new(), order: Default::default() }
    }
    /// True if `key` was not seen within the window before `now` (and remembers it); false for a duplicate.
    pub fn first(&mut self, key: u64, now: Instant) -> bool {
        while let Some(&(k, t)) = self.order.front() {
            if now.saturating_duration_since(t) < self.window && self.order.len() < self.capacity {
                break;
            }
            self.order.pop_front();
            if self.at.get(&k) == Some(&t) {
                self.at.remove(&k);
            }
        }
        if self.at.get(&key).is_some_and(|t| now.saturating_duration_since(*t) < self.window) {
            return false;
        }
        self.at.insert(key, now);
        self.order.push_back((key, now));
        true
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

/// The attribute `name` of `a` as a non-negative integer, if it is one (request ids, server ids and times in the
/// events of the mechanism are carried so).
pub fn int(a: &Attrs, name: &str) -> Option<u64> {
    match a.get(name)? {
        Value::Int(i) if *i >= 0 => Some(*i as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_response_wins_within_the_window_on_tokios_clock() {
        let s = Duration::from_secs;
        let f = FirstResponse::new("rsp", s(10));
        assert_eq!(f.decide(&Value::Int(7)), InDecision::Deliver);
        assert_eq!(f.decide(&Value::Int(7)), InDecision::Drop, "a duplicate");
        assert_eq!(f.decide(&Value::Int(8)), InDecision::Deliver);
        tokio::time::advance(s(9)).await;
        assert_eq!(f.decide(&Value::Int(7)), InDecision::Drop, "still within the window");
        tokio::time::advance(s(2)).await;
        // Eleven seconds passed on tokio's (paused) clock and none on the wall clock: only a filter on tokio's
        // clock forgets the key here.
        assert_eq!(f.decide(&Value::Int(7)), InDecision::Deliver, "the window passed");
        assert_eq!(f.dropped(), 2);
        let f = FirstResponse::new("rsp", s(10)).capacity(2);
        for k in [1, 2, 3] {
            assert_eq!(f.decide(&Value::Int(k)), InDecision::Deliver);
        }
        assert_eq!(f.decide(&Value::Int(1)), InDecision::Deliver, "beyond the capacity the oldest key is forgotten");
        assert_eq!(f.decide(&Value::Str("a".into())), InDecision::Deliver);
        assert_eq!(f.decide(&Value::Str("a".into())), InDecision::Drop);
    }
}
