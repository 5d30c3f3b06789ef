//! Channel filters (KECho section 2.3).
//!
//! - An **OUT-filter** on a source chooses, per event, which of the channel's sinks receive it, from the event and
//!   from the attributes every sink supplies ([`OutFilter`], built-ins in [`Selector`]).
//! - An **IN-filter** on a node's channel sees each event before it is dispatched to local sinks and may drop it,
//!   narrow its sinks or add attributes ([`InFilter`], built-ins [`Dedupe`] and [`RateLimit`]).
//! - A **content filter** is an expression a sink gives at subscribe time ([`ContentFilter`], CEL); it is shipped to
//!   every source and evaluated there, so events no sink wants never cross the network.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kecho_proto::{Attrs, LocalId, NodeId, Value};
use parking_lot::Mutex;

/// An event as filters see it.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub(crate) ty: &'a str,
    pub(crate) attrs: &'a Attrs,
    pub(crate) payload: &'a [u8],
}

impl<'a> EventView<'a> {
    /// Type name.
    pub fn ty(&self) -> &'a str {
        self.ty
    }
    /// Attributes.
    pub fn attrs(&self) -> &'a Attrs {
        self.attrs
    }
    /// Payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// What a source knows of one sink: attributes supplied by the sink, and their age. Opaque otherwise.
#[derive(Debug)]
pub(crate) struct SinkEntry {
    pub(crate) node: NodeId,
    pub(crate) id: LocalId,
    pub(crate) local: bool,
    pub(crate) attrs: Attrs,
    pub(crate) updated: Instant,
}

impl SinkEntry {
    fn key(&self) -> u64 {
        // Cheap and stable: the node id is random already; mix in the local id.
        mix(self.node.0 ^ u64::from(self.id.0).rotate_left(32))
    }
}

/// The sinks an OUT-filter may choose from: those whose type and content filters accept the event.
#[derive(Debug, Clone, Copy)]
pub struct SinkView<'a> {
    pub(crate) entries: &'a [Arc<SinkEntry>],
    pub(crate) now: Instant,
}

impl<'a> SinkView<'a> {
    /// Number of sinks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Sink `i` (`0..len()`).
    pub fn get(&self, i: usize) -> SinkRef<'a> {
        SinkRef { e: &self.entries[i], now: self.now }
    }
    /// All sinks in order.
    pub fn iter(&self) -> impl Iterator<Item = SinkRef<'a>> + 'a {
        let now = self.now;
        self.entries.iter().map(move |e| SinkRef { e, now })
    }
}

/// One sink in a [`SinkView`].
#[derive(Debug, Clone, Copy)]
pub struct SinkRef<'a> {
    e: &'a SinkEntry,
    now: Instant,
}

impl<'a> SinkRef<'a> {
    /// The attributes the sink supplies (its latest values as known here).
    pub fn attrs(&self) -> &'a Attrs {
        &self.e.attrs
    }
    /// One attribute as a number (integers and floats; booleans as 0 or 1).
    pub fn number(&self, name: &str) -> Option<f64> {
        as_number(self.e.attrs.get(name)?)
    }
    /// How long ago this node learnt the sink's current attributes.
    pub fn age(&self) -> Duration {
        self.now.saturating_duration_since(self.e.updated)
    }
    /// True if the sink is on this node.
    pub fn is_local(&self) -> bool {
        self.e.local
    }
    /// A stable opaque key for the sink, for hashing (not its address or identity).
    pub fn key(&self) -> u64 {
        self.e.key()
    }
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

/// Chooses which sinks get an event. Installed on a source with [`crate::Source::set_out_filter`]; called once per
/// submitted event, with the sinks whose type and content filters accept it.
pub trait OutFilter: Send + Sync + 'static {
    /// Pushes the indices (into `sinks`) of the chosen sinks onto `chosen` (empty on entry). Out-of-range and
    /// repeated indices are ignored.
    fn select(&self, event: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>);
}

impl<F> OutFilter for F
where
    F: Fn(&EventView<'_>, &SinkView<'_>, &mut Vec<usize>) + Send + Sync + 'static,
{
    fn select(&self, event: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>) {
        self(event, sinks, chosen)
    }
}

/// The built-in OUT-filters. Parse one from a spec with `str::parse`:
///
/// | spec | chooses |
/// |---|---|
/// | `all` | every sink |
/// | `none` | no sink |
/// | `rr` | one sink, in turn |
/// | `random` | one sink at random |
/// | `weighted:ATTR` | one sink at random, weighted by its numeric attribute (missing or negative: 0) |
/// | `hash:ATTR` | one sink by the event attribute's value (rendezvous hashing: a key keeps its sink while it lives) |
/// | `least:ATTR:N` | the N sinks with the lowest attribute ("n least loaded"; sinks without it come last) |
/// | `most:ATTR:N` | the N sinks with the highest attribute |
/// | `p2c:ATTR` | the lower of two sinks picked at random (power of two choices) |
#[derive(Debug)]
pub struct Selector {
    kind: SelectorKind,
    /// Random state (xorshift).
    state: AtomicU64,
    /// Round-robin position.
    turn: AtomicU64,
}

#[derive(Debug, Clone, PartialEq)]
enum SelectorKind {
    All,
    None,
    RoundRobin,
    Random,
    Weighted(String),
    Hash(String),
    Lowest(String, usize),
    Highest(String, usize),
    PowerOfTwo(String),
}

/// A selector spec that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {spec:?}: {why} (expected all, none, rr, random, weighted:ATTR, hash:ATTR, least:ATTR:N, most:ATTR:N or p2c:ATTR)")]
pub struct SelectorError {
    spec: String,
    why: String,
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(spec: &str) -> Result<Self, SelectorError> {
        let err = |why: &str| SelectorError { spec: spec.to_owned(), why: why.to_owned() };
        let parts: Vec<&str> = spec.split(':').collect();
        let attr = |i: usize| -> Result<String, SelectorError> {
            match parts.get(i) {
                Some(a) if !a.is_empty() => Ok((*a).to_owned()),
                _ => Err(err("an attribute name is missing")),
            }
        };
        let n = |i: usize| -> Result<usize, SelectorError> {
            match parts.get(i) {
                None => Ok(1),
                Some(s) => match s.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(err("N must be a positive integer")),
                },
            }
        };
        let (kind, arity) = match parts[0] {
            "all" => (SelectorKind::All, 1),
            "none" => (SelectorKind::None, 1),
            "rr" => (SelectorKind::RoundRobin, 1),
            "random" => (SelectorKind::Random, 1),
            "weighted" => (SelectorKind::Weighted(attr(1)?), 2),
            "hash" => (SelectorKind::Hash(attr(1)?), 2),
            "least" => (SelectorKind::Lowest(attr(1)?, n(2)?), 3),
            "most" => (SelectorKind::Highest(attr(1)?, n(2)?), 3),
            "p2c" => (SelectorKind::PowerOfTwo(attr(1)?), 2),
            _ => return Err(err("unknown selector")),
        };
        if parts.len() > arity {
            return Err(err("too many parts"));
        }
        Ok(Self::of(kind))
    }
}

impl Selector {
    /// Every sink (the default when no OUT-filter is installed).
    pub fn all() -> Self {
        Self::of(SelectorKind::All)
    }
    /// One sink in turn.
    pub fn round_robin() -> Self {
        Self::of(SelectorKind::RoundRobin)
    }
    /// The `n` sinks with the lowest value of `attr`.
    pub fn least(attr: &str, n: usize) -> Self {
        Self::of(SelectorKind::Lowest(attr.to_owned(), n.max(1)))
    }
    /// Power of two choices on `attr`.
    pub fn p2c(attr: &str) -> Self {
        Self::of(SelectorKind::PowerOfTwo(attr.to_owned()))
    }
    /// One sink by rendezvous hashing of the event attribute `attr`.
    pub fn hash(attr: &str) -> Self {
        Self::of(SelectorKind::Hash(attr.to_owned()))
    }

    fn of(kind: SelectorKind) -> Self {
        Selector { kind, state: AtomicU64::new(0x2545_f491_4f6c_dd1d), turn: AtomicU64::new(0) }
    }

    /// A fast pseudo-random number (xorshift on a shared atomic; statistical quality is enough for load spreading).
    fn next_random(&self) -> u64 {
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        x
    }
}

impl OutFilter for Selector {
    fn select(&self, event: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>) {
        let k = sinks.len();
        if k == 0 {
            return;
        }
        let value = |i: usize, attr: &str| sinks.get(i).number(attr);
        // Attribute values looked up once per call (on the stack for up to 16 sinks).
        let mut stack = [0f64; 16];
        let mut heap = Vec::new();
        match &self.kind {
            SelectorKind::All => chosen.extend(0..k),
            SelectorKind::None => {}
            SelectorKind::RoundRobin => {
                let n = self.turn.fetch_add(1, Ordering::Relaxed);
                chosen.push((n % k as u64) as usize);
            }
            SelectorKind::Random => chosen.push((self.next_random() % k as u64) as usize),
            SelectorKind::Weighted(attr) => {
                let w = attr_values(&mut stack, &mut heap, sinks, attr, 0.0);
                let total: f64 = w.iter().map(|v| v.max(0.0)).sum();
                if total <= 0.0 {
                    chosen.push((self.next_random() % k as u64) as usize);
                    return;
                }
                let mut r = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64 * total;
                for (i, w) in w.iter().enumerate() {
                    let w = w.max(0.0);
                    if r < w {
                        chosen.push(i);
                        return;
                    }
                    r -= w;
                }
                chosen.push(k - 1);
            }
            SelectorKind::Hash(attr) => {
                let mut key = Fnv::default();
                match event.attrs.get(attr) {
                    Some(v) => hash_value(v, &mut key),
                    // Events without the key spread evenly.
                    None => self.next_random().hash(&mut key),
                }
                let key = key.finish();
                let best = (0..k).max_by_key(|&i| mix(key ^ sinks.get(i).key())).unwrap_or(0);
                chosen.push(best);
            }
            SelectorKind::Lowest(attr, n) | SelectorKind::Highest(attr, n) => {
                let lowest = matches!(self.kind, SelectorKind::Lowest(..));
                // Sinks without the attribute rank after every sink that has it.
                let ranks = attr_values(&mut stack, &mut heap, sinks, attr, f64::NAN);
                for r in ranks.iter_mut() {
                    *r = if r.is_nan() {
                        f64::INFINITY
                    } else if lowest {
                        *r
                    } else {
                        -*r
                    };
                }
                chosen.extend(0..k);
                if *n < k {
                    chosen.select_nth_unstable_by(*n - 1, |a, b| ranks[*a].total_cmp(&ranks[*b]));
                    chosen.truncate(*n);
                }
            }
            SelectorKind::PowerOfTwo(attr) => {
                if k == 1 {
                    chosen.push(0);
                    return;
                }
                let r = self.next_random();
                let a = (r % k as u64) as usize;
                let mut b = ((r >> 32) % (k as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let va = value(a, attr).unwrap_or(f64::INFINITY);
                let vb = value(b, attr).unwrap_or(f64::INFINITY);
                chosen.push(if vb < va { b } else { a });
            }
        }
    }
}

/// Every sink's value of `attr` (`missing` where absent), in `stack` when it fits.
fn attr_values<'s>(
    stack: &'s mut [f64; 16],
    heap: &'s mut Vec<f64>,
    sinks: &SinkView<'_>,
    attr: &str,
    missing: f64,
) -> &'s mut [f64] {
    let k = sinks.len();
    let slot: &mut [f64] = if k <= stack.len() {
        &mut stack[..k]
    } else {
        heap.resize(k, 0.0);
        &mut heap[..]
    };
    for (i, v) in slot.iter_mut().enumerate() {
        *v = sinks.get(i).number(attr).unwrap_or(missing);
    }
    slot
}

fn hash_value(v: &Value, h: &mut Fnv) {
    match v {
        Value::Int(i) => i.hash(h),
        Value::Float(f) => f.to_bits().hash(h),
        Value::Bool(b) => b.hash(h),
        Value::Str(s) => s.hash(h),
        Value::Bytes(b) => b.hash(h),
    }
}

/// A 64-bit finaliser (splitmix64), so that rendezvous scores are well spread.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a: small, fast and stable across processes (unlike `DefaultHasher`'s random keys), which affinity needs.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// An event arriving at a node, as an IN-filter sees it; attributes may be added or changed.
#[derive(Debug)]
pub struct InEvent<'a> {
    pub(crate) ty: &'a str,
    pub(crate) attrs: &'a mut Attrs,
    pub(crate) payload: &'a [u8],
}

impl InEvent<'_> {
    /// Type name.
    pub fn ty(&self) -> &str {
        self.ty
    }
    /// Attributes.
    pub fn attrs(&self) -> &Attrs {
        self.attrs
    }
    /// Attributes, to add or change some before dispatch.
    pub fn attrs_mut(&mut self) -> &mut Attrs {
        self.attrs
    }
    /// Payload.
    pub fn payload(&self) -> &[u8] {
        self.payload
    }
}

/// The local sinks an IN-filter may choose from (those whose type accepts the event).
#[derive(Debug, Clone, Copy)]
pub struct LocalSinks<'a> {
    pub(crate) attrs: &'a [Attrs],
}

impl LocalSinks<'_> {
    /// Number of sinks.
    pub fn len(&self) -> usize {
        self.attrs.len()
    }
    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty()
    }
    /// Sink `i`'s attributes.
    pub fn attrs(&self, i: usize) -> &Attrs {
        &self.attrs[i]
    }
}

/// What an IN-filter decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InDecision {
    /// Dispatch to every local sink that accepts the event.
    Deliver,
    /// Discard the event (counted as filtered, not as dropped).
    Drop,
    /// Dispatch only to these local sinks (indices into [`LocalSinks`]).
    Only(Vec<usize>),
}

/// Decides, at the receiving node, what happens to each arriving event. Installed with
/// [`crate::Channel::set_in_filter`].
pub trait InFilter: Send + Sync + 'static {
    /// Called once per event before dispatch.
    fn filter(&self, event: &mut InEvent<'_>, sinks: &LocalSinks<'_>) -> InDecision;
}

impl<F> InFilter for F
where
    F: Fn(&mut InEvent<'_>, &LocalSinks<'_>) -> InDecision + Send + Sync + 'static,
{
    fn filter(&self, event: &mut InEvent<'_>, sinks: &LocalSinks<'_>) -> InDecision {
        self(event, sinks)
    }
}

/// Drops an event whose `key` attribute was seen within the last `window`: the first response wins, as in KECho's
/// load balancer. Events without the key pass. At most `capacity` keys are remembered (oldest forgotten first). Time
/// is tokio's clock, so tests can drive it with paused time.
#[derive(Debug)]
pub struct Dedupe {
    key: String,
    window: Duration,
    capacity: usize,
    seen: Mutex<DedupeState>,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct DedupeState {
    at: HashMap<u64, Instant>,
    order: VecDeque<(u64, Instant)>,
}

impl Dedupe {
    /// Duplicates by `key` within `window`.
    pub fn new(key: &str, window: Duration) -> Self {
        Dedupe {
            key: key.to_owned(),
            window,
            capacity: 1 << 16,
            seen: Mutex::new(DedupeState::default()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Duplicates dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Remembers at most `n` keys.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(1);
        self
    }
}

impl InFilter for Dedupe {
    fn filter(&self, event: &mut InEvent<'_>, _sinks: &LocalSinks<'_>) -> InDecision {
        let Some(v) = event.attrs.get(&self.key) else { return InDecision::Deliver };
        let mut h = Fnv::default();
        hash_value(v, &mut h);
        let key = h.finish();
        let now = crate::node::now();
        let mut s = self.seen.lock();
        while let Some(&(k, t)) = s.order.front() {
            if now.saturating_duration_since(t) < self.window && s.order.len() < self.capacity {
                break;
            }
            s.order.pop_front();
            if s.at.get(&k) == Some(&t) {
                s.at.remove(&k);
            }
        }
        if let Some(t) = s.at.get(&key) {
            if now.saturating_duration_since(*t) < self.window {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return InDecision::Drop;
            }
        }
        s.at.insert(key, now);
        s.order.push_back((key, now));
        InDecision::Deliver
    }
}

/// Lets through at most `rate` events per second on average, with bursts of up to `burst` (a token bucket), on
/// tokio's clock.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// `rate` events per second, bursts of `burst`.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit { rate: rate.max(0.0), burst, bucket: Mutex::new((burst, crate::node::now())) }
    }
}

impl InFilter for RateLimit {
    fn filter(&self, _event: &mut InEvent<'_>, _sinks: &LocalSinks<'_>) -> InDecision {
        let now = crate::node::now();
        let mut b = self.bucket.lock();
        let elapsed = now.saturating_duration_since(b.1).as_secs_f64();
        b.0 = (b.0 + elapsed * self.rate).min(self.burst);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            InDecision::Deliver
        } else {
            InDecision::Drop
        }
    }
}

/// A sink's content filter: a CEL expression over the event's `type` and its attributes (each attribute is a
/// variable of its own name), e.g. `type == "load" && cpu > 0.8 && zone in ["a", "b"]`. Compiled once; an
/// expression that refers to an attribute the event lacks, or does not yield a boolean, rejects the event.
pub struct ContentFilter {
    expr: String,
    program: cel::Program,
    /// The same expression compiled for direct evaluation over attributes, when it stays within the common subset.
    fast: Option<Fast>,
}

impl std::fmt::Debug for ContentFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentFilter").field("expr", &self.expr).finish()
    }
}

/// An expression that does not compile, with the position of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid filter expression at line {line}, column {column}: {message}")]
pub struct FilterError {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    expr: String,
    marker: String,
}

impl FilterError {
    /// The expression with a caret under the position of the problem, for display on two lines.
    pub fn caret(&self) -> String {
        format!("{}\n{}", self.expr, self.marker)
    }
}

impl ContentFilter {
    /// Compiles `expr`.
    pub fn compile(expr: &str) -> Result<Self, FilterError> {
        if expr.trim().is_empty() {
            return Err(FilterError {
                line: 1,
                column: 1,
                message: "the expression is empty".into(),
                expr: expr.to_owned(),
                marker: "^".into(),
            });
        }
        // The parser can panic on some malformed inputs; a sink's bad expression must never take a node down.
        let parsed = std::panic::catch_unwind(|| cel::Program::compile(expr));
        match parsed {
            Ok(Ok(program)) => {
                let fast = Fast::compile(program.expression());
                Ok(ContentFilter { expr: expr.to_owned(), program, fast })
            }
            Ok(Err(errs)) => {
                let first = errs.errors.first();
                // The parser reports 1-based lines and columns.
                let (line, column) = first.map_or((1, 1), |e| (e.pos.0.max(1) as usize, e.pos.1.max(1) as usize));
                let message = first.map_or_else(|| errs.to_string(), |e| e.msg.clone());
                let marker = format!("{}^", " ".repeat(column.saturating_sub(1)));
                Err(FilterError { line, column, message, expr: expr.to_owned(), marker })
            }
            Err(_) => Err(FilterError {
                line: 1,
                column: 1,
                message: "the expression could not be parsed".into(),
                expr: expr.to_owned(),
                marker: "^".into(),
            }),
        }
    }

    /// The source text.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// Evaluates against one event.
    pub fn matches(&self, ty: &str, attrs: &Attrs) -> bool {
        if let Some(m) = self.fast_matches(ty, attrs) {
            return m;
        }
        let root = cel::Context::default();
        let ctx = FilterContext::new(&root, ty, attrs);
        self.matches_in(&ctx)
    }

    /// Evaluates with the direct evaluator; `None` if the expression needs the CEL interpreter.
    pub(crate) fn fast_matches(&self, ty: &str, attrs: &Attrs) -> Option<bool> {
        self.fast.as_ref().map(|f| f.eval(ty, attrs) == Some(true))
    }

    /// True if the direct evaluator handles this expression.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    pub(crate) fn matches_in(&self, ctx: &FilterContext<'_>) -> bool {
        matches!(self.program.execute(&ctx.ctx), Ok(cel::Value::Bool(true)))
    }
}

/// A direct evaluator for the common subset of CEL that content filters use: `type` and attribute variables, int,
/// double, string and bool literals, comparisons, `in` with a literal list, `&&`, `||` and `!`. It walks the AST the
/// `cel` parser produced, over the event's attributes as they are, without building CEL values; anything outside the
/// subset keeps the interpreter. The results follow CEL's: a missing variable or a comparison across types is an
/// error, `&&` and `||` absorb an error when the other side decides, and an error rejects the event.
#[derive(Debug, Clone)]
enum Fast {
    Lit(Lit),
    Type,
    Var(String),
    Not(Box<Fast>),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Cmp(Box<Fast>, CmpOp, Box<Fast>),
    In(Box<Fast>, Vec<Lit>),
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A value during direct evaluation, borrowed from the event.
#[derive(Debug, Clone, Copy)]
enum V<'a> {
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bool(bool),
}

impl Fast {
    fn compile(e: &cel::IdedExpr) -> Option<Fast> {
        use cel::common::ast::{operators as op, Expr, LiteralValue};
        Some(match &e.expr {
            Expr::Ident(name) if name == "type" => Fast::Type,
            Expr::Ident(name) => Fast::Var(name.clone()),
            Expr::Literal(lit) => Fast::Lit(match lit {
                LiteralValue::Boolean(b) => Lit::Bool(**b),
                LiteralValue::Int(i) => Lit::Int(**i),
                LiteralValue::Double(d) => Lit::Float(**d),
                LiteralValue::String(s) => Lit::Str(s.inner().to_owned()),
                _ => return None,
            }),
            Expr::Call(call) if call.target.is_none() => {
                let args = &call.args;
                let bin = |f: fn(Box<Fast>, Box<Fast>) -> Fast| -> Option<Fast> {
                    match args.as_slice() {
                        [a, b] => Some(f(Box::new(Fast::compile(a)?), Box::new(Fast::compile(b)?))),
                        _ => None,
                    }
                };
                let cmp = |o: CmpOp| -> Option<Fast> {
                    match args.as_slice() {
                        [a, b] => Some(Fast::Cmp(Box::new(Fast::compile(a)?), o, Box::new(Fast::compile(b)?))),
                        _ => None,
                    }
                };
                match call.func_name.as_str() {
                    op::LOGICAL_AND => bin(Fast::And)?,
                    op::LOGICAL_OR => bin(Fast::Or)?,
                    op::LOGICAL_NOT => match args.as_slice() {
                        [a] => Fast::Not(Box::new(Fast::compile(a)?)),
                        _ => return None,
                    },
                    op::EQUALS => cmp(CmpOp::Eq)?,
                    op::NOT_EQUALS => cmp(CmpOp::Ne)?,
                    op::LESS => cmp(CmpOp::Lt)?,
                    op::LESS_EQUALS => cmp(CmpOp::Le)?,
                    op::GREATER => cmp(CmpOp::Gt)?,
                    op::GREATER_EQUALS => cmp(CmpOp::Ge)?,
                    op::IN => match args.as_slice() {
                        [a, list] => {
                            let Expr::List(l) = &list.expr else { return None };
                            let mut lits = Vec::new();
                            for el in &l.elements {
                                match Fast::compile(el)? {
                                    Fast::Lit(lit) => lits.push(lit),
                                    _ => return None,
                                }
                            }
                            Fast::In(Box::new(Fast::compile(a)?), lits)
                        }
                        _ => return None,
                    },
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// `Some(bool)`, or `None` for a CEL error (or a non-boolean result at the top).
    fn eval(&self, ty: &str, attrs: &Attrs) -> Option<bool> {
        match self.value(ty, attrs)? {
            V::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn value<'a>(&'a self, ty: &'a str, attrs: &'a Attrs) -> Option<V<'a>> {
        Some(match self {
            Fast::Lit(l) => lit(l),
            Fast::Type => V::Str(ty),
            Fast::Var(name) => match attrs.get(name)? {
                Value::Int(i) => V::Int(*i),
                Value::Float(f) => V::Float(*f),
                Value::Bool(b) => V::Bool(*b),
                Value::Str(s) => V::Str(s),
                // Bytes stay with the interpreter's semantics: treated as an error here.
                Value::Bytes(_) => return None,
            },
            Fast::Not(a) => V::Bool(!a.eval(ty, attrs)?),
            Fast::And(a, b) => match (a.eval(ty, attrs), b.eval(ty, attrs)) {
                (Some(false), _) | (_, Some(false)) => V::Bool(false),
                (Some(true), Some(true)) => V::Bool(true),
                _ => return None,
            },
            Fast::Or(a, b) => match (a.eval(ty, attrs), b.eval(ty, attrs)) {
                (Some(true), _) | (_, Some(true)) => V::Bool(true),
                (Some(false), Some(false)) => V::Bool(false),
                _ => return None,
            },
            Fast::Cmp(a, o, b) => V::Bool(compare(a.value(ty, attrs)?, *o, b.value(ty, attrs)?)?),
            Fast::In(a, list) => {
                let x = a.value(ty, attrs)?;
                let mut found = false;
                for l in list {
                    if compare(x, CmpOp::Eq, lit(l))? {
                        found = true;
                        break;
                    }
                }
                V::Bool(found)
            }
        })
    }
}

fn lit(l: &Lit) -> V<'_> {
    match l {
        Lit::Int(i) => V::Int(*i),
        Lit::Float(f) => V::Float(*f),
        Lit::Str(s) => V::Str(s),
        Lit::Bool(b) => V::Bool(*b),
    }
}

/// CEL comparison: numbers compare across int and double; equality across other types is false; ordering across
/// types is an error.
fn compare(a: V<'_>, o: CmpOp, b: V<'_>) -> Option<bool> {
    use std::cmp::Ordering as O;
    let ord: Option<O> = match (a, b) {
        (V::Int(x), V::Int(y)) => Some(x.cmp(&y)),
        (V::Int(x), V::Float(y)) => (x as f64).partial_cmp(&y),
        (V::Float(x), V::Int(y)) => x.partial_cmp(&(y as f64)),
        (V::Float(x), V::Float(y)) => x.partial_cmp(&y),
        (V::Str(x), V::Str(y)) => Some(x.cmp(y)),
        (V::Bool(x), V::Bool(y)) => Some(x.cmp(&y)),
        _ => {
            return match o {
                CmpOp::Eq => Some(false),
                CmpOp::Ne => Some(true),
                _ => None,
            }
        }
    };
    Some(match (o, ord) {
        (CmpOp::Eq, ord) => ord == Some(O::Equal),
        (CmpOp::Ne, ord) => ord != Some(O::Equal),
        // NaN: every ordering is false.
        (_, None) => false,
        (CmpOp::Lt, Some(x)) => x == O::Less,
        (CmpOp::Le, Some(x)) => x != O::Greater,
        (CmpOp::Gt, Some(x)) => x == O::Greater,
        (CmpOp::Ge, Some(x)) => x != O::Less,
    })
}

/// One event's variables, built once and shared by every sink's content filter.
pub(crate) struct FilterContext<'a> {
    ctx: cel::Context<'a, 'static>,
}

impl<'a> FilterContext<'a> {
    pub(crate) fn new(root: &'a cel::Context<'static, 'static>, ty: &str, attrs: &Attrs) -> Self {
        let mut ctx = root.new_inner_scope();
        ctx.add_variable_from_value("type", ty.to_owned());
        for (k, v) in attrs.iter() {
            let v = match v {
                Value::Int(i) => cel::Value::Int(*i),
                Value::Float(f) => cel::Value::Float(*f),
                Value::Bool(b) => cel::Value::Bool(*b),
                Value::Str(s) => cel::Value::String(Arc::new(s.clone())),
                Value::Bytes(b) => cel::Value::Bytes(Arc::new(b.to_vec())),
            };
            ctx.add_variable_from_value(k.to_owned(), v);
        }
        FilterContext { ctx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(values: &[Option<f64>]) -> Vec<Arc<SinkEntry>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut attrs = Attrs::new();
                if let Some(v) = v {
                    attrs.set("load", *v);
                }
                Arc::new(SinkEntry {
                    node: NodeId(i as u64),
                    id: LocalId(1),
                    local: false,
                    attrs,
                    updated: Instant::now(),
                })
            })
            .collect()
    }

    fn pick(sel: &Selector, entries: &[Arc<SinkEntry>], attrs: &Attrs) -> Vec<usize> {
        let mut chosen = Vec::new();
        let ev = EventView { ty: "t", attrs, payload: b"" };
        sel.select(&ev, &SinkView { entries, now: Instant::now() }, &mut chosen);
        chosen
    }

    #[test]
    fn specs_parse_and_bad_specs_explain() {
        for ok in [
            "all",
            "none",
            "rr",
            "random",
            "weighted:w",
            "hash:session",
            "least:load",
            "least:load:2",
            "most:cpu:3",
            "p2c:load",
        ] {
            assert!(ok.parse::<Selector>().is_ok(), "{ok}");
        }
        for bad in ["", "lest:load", "least", "least:load:0", "least:load:x", "hash:", "rr:x", "p2c:a:b"] {
            let e = bad.parse::<Selector>().unwrap_err().to_string();
            assert!(e.contains("invalid selector"), "{bad}: {e}");
        }
    }

    #[test]
    fn all_none_and_random() {
        let sinks = view(&[None, None, None, None]);
        assert_eq!(pick(&Selector::all(), &sinks, &Attrs::new()), [0, 1, 2, 3]);
        assert!(pick(&"none".parse().unwrap(), &sinks, &Attrs::new()).is_empty());
        let random: Selector = "random".parse().unwrap();
        let mut counts = [0; 4];
        for _ in 0..4000 {
            let p = pick(&random, &sinks, &Attrs::new());
            assert_eq!(p.len(), 1);
            counts[p[0]] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert!(pick(&random, &[], &Attrs::new()).is_empty());
    }

    #[test]
    fn round_robin_is_exact() {
        let sinks = view(&[None, None, None]);
        let rr = Selector::round_robin();
        let picks: Vec<usize> = (0..9).flat_map(|_| pick(&rr, &sinks, &Attrs::new())).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_and_most_pick_the_extremes_and_missing_values_last() {
        let sinks = view(&[Some(0.9), None, Some(0.1), Some(0.5), Some(0.2)]);
        let mut got = pick(&Selector::least("load", 2), &sinks, &Attrs::new());
        got.sort();
        assert_eq!(got, [2, 4]);
        assert_eq!(pick(&"most:load:1".parse().unwrap(), &sinks, &Attrs::new()), [0]);
        let mut all = pick(&Selector::least("load", 9), &sinks, &Attrs::new());
        all.sort();
        assert_eq!(all, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn p2c_never_picks_the_worst_of_two() {
        let sinks = view(&[Some(3.0), Some(1.0), Some(2.0), Some(0.0)]);
        let sel = Selector::p2c("load");
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[pick(&sel, &sinks, &Attrs::new())[0]] += 1;
        }
        // The highest load can only win against itself, which p2c never draws.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[3] > counts[1] && counts[1] > counts[2], "{counts:?}");
    }

    #[test]
    fn hash_is_sticky_and_spreads() {
        let sinks = view(&[None, None, None, None]);
        let sel = Selector::hash("session");
        let mut used = std::collections::HashSet::new();
        for s in 0..64 {
            let attrs = Attrs::new().with("session", format!("user-{s}"));
            let first = pick(&sel, &sinks, &attrs);
            assert_eq!(pick(&sel, &sinks, &attrs), first);
            used.insert(first[0]);
        }
        assert_eq!(used.len(), 4);
        // Removing one sink moves only the keys that were on it (rendezvous hashing).
        let fewer: Vec<_> = sinks[..3].to_vec();
        for s in 0..64 {
            let attrs = Attrs::new().with("session", format!("user-{s}"));
            let before = pick(&sel, &sinks, &attrs)[0];
            if before < 3 {
                assert_eq!(pick(&sel, &fewer, &attrs)[0], before);
            }
        }
    }

    #[test]
    fn weighted_follows_weights() {
        let sinks = view(&[Some(1.0), Some(0.0), Some(3.0)]);
        let sel: Selector = "weighted:load".parse().unwrap();
        let mut counts = [0; 3];
        for _ in 0..8000 {
            counts[pick(&sel, &sinks, &Attrs::new())[0]] += 1;
        }
        assert_eq!(counts[1], 0);
        let ratio = counts[2] as f64 / counts[0] as f64;
        assert!((2.5..3.5).contains(&ratio), "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_first_wins_within_window() {
        let d = Dedupe::new("req", Duration::from_millis(200));
        let sinks = LocalSinks { attrs: &[] };
        let run = |id: i64| {
            let mut attrs = Attrs::new().with("req", id);
            d.filter(&mut InEvent { ty: "resp", attrs: &mut attrs, payload: b"" }, &sinks)
        };
        assert_eq!(run(1), InDecision::Deliver);
        assert_eq!(run(1), InDecision::Drop);
        assert_eq!(run(2), InDecision::Deliver);
        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(run(1), InDecision::Drop, "still within the window");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(run(1), InDecision::Deliver);
        assert_eq!(d.dropped(), 2);
        let mut no_key = Attrs::new();
        assert_eq!(d.filter(&mut InEvent { ty: "x", attrs: &mut no_key, payload: b"" }, &sinks), InDecision::Deliver);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_allows_the_burst_then_the_rate() {
        let r = RateLimit::new(2.0, 3);
        let sinks = LocalSinks { attrs: &[] };
        let mut attrs = Attrs::new();
        let mut passed = |n: usize| {
            (0..n)
                .filter(|_| {
                    r.filter(&mut InEvent { ty: "x", attrs: &mut attrs, payload: b"" }, &sinks) == InDecision::Deliver
                })
                .count()
        };
        assert_eq!(passed(10), 3, "the burst");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(passed(10), 2, "two per second after it");
    }

    #[test]
    fn direct_evaluation_agrees_with_the_interpreter() {
        let exprs = [
            r#"type == "load" && cpu > 0.8 && zone in ["a", "b"]"#,
            "cpu >= 0.5 || n < 3",
            "!(n == 2) && ok",
            "n != 1 || zone == \"c\"",
            "cpu > n",
            "zone < \"b\"",
            "ok == true && n in [1, 2, 3]",
            "missing > 1 || ok",
            "missing > 1 && ok",
            "zone > 1",
            "cpu == 1",
            "type != \"load\"",
        ];
        let mut seed = 12345u64;
        let mut next = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let root = cel::Context::default();
        for expr in exprs {
            let f = ContentFilter::compile(expr).unwrap();
            assert!(f.is_fast(), "{expr} should be in the fast subset");
            for _ in 0..300 {
                let mut attrs = Attrs::new();
                if next(5) > 0 {
                    attrs.set("cpu", next(11) as f64 / 10.0);
                }
                if next(5) > 0 {
                    attrs.set("n", next(5) as i64);
                }
                if next(5) > 0 {
                    attrs.set("zone", ["a", "b", "c"][next(3) as usize]);
                }
                if next(5) > 0 {
                    attrs.set("ok", next(2) == 1);
                }
                let ty = ["load", "other"][next(2) as usize];
                let slow = f.matches_in(&FilterContext::new(&root, ty, &attrs));
                assert_eq!(f.fast_matches(ty, &attrs), Some(slow), "{expr} on {ty} {attrs:?}");
            }
        }
        // Outside the subset the interpreter is used.
        assert!(!ContentFilter::compile("size(zone) > 0").unwrap().is_fast());
    }

    #[test]
    fn content_filters_evaluate_and_errors_have_positions() {
        let f = ContentFilter::compile(r#"type == "load" && cpu > 0.8 && zone in ["a", "b"]"#).unwrap();
        let attrs = |cpu: f64, zone: &str| Attrs::new().with("cpu", cpu).with("zone", zone);
        assert!(f.matches("load", &attrs(0.9, "a")));
        assert!(!f.matches("load", &attrs(0.5, "a")));
        assert!(!f.matches("load", &attrs(0.9, "c")));
        assert!(!f.matches("other", &attrs(0.9, "a")));
        // A missing attribute rejects instead of failing.
        assert!(!f.matches("load", &Attrs::new()));
        let e = ContentFilter::compile("cpu > && zone").unwrap_err();
        assert_eq!((e.line, e.column), (1, 7), "{e:?}");
        assert_eq!(e.caret(), "cpu > && zone\n      ^");
        assert!(e.to_string().contains("column"), "{e}");
        assert!(ContentFilter::compile("   ").is_err());
    }
}

/// Timing hooks for the benchmark programs (not part of the stable API).
#[doc(hidden)]
pub mod bench {
    use super::*;

    fn entries(sinks: &[Attrs]) -> Vec<Arc<SinkEntry>> {
        let at = Instant::now();
        sinks
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Arc::new(SinkEntry {
                    node: NodeId(i as u64 + 1),
                    id: LocalId(1),
                    local: false,
                    attrs: a.clone(),
                    updated: at,
                })
            })
            .collect()
    }

    /// Mean nanoseconds per call of `filter` choosing among `sinks` for an event with `attrs`.
    pub fn out_filter_ns(filter: &dyn OutFilter, sinks: &[Attrs], attrs: &Attrs, iters: u64) -> f64 {
        let entries = entries(sinks);
        let view = SinkView { entries: &entries, now: Instant::now() };
        let ev = EventView { ty: "request", attrs, payload: b"" };
        let mut chosen = Vec::with_capacity(sinks.len());
        let start = Instant::now();
        for _ in 0..iters {
            chosen.clear();
            filter.select(std::hint::black_box(&ev), &view, &mut chosen);
            std::hint::black_box(&chosen);
        }
        start.elapsed().as_nanos() as f64 / iters as f64
    }

    /// Mean nanoseconds per call of an IN-filter deciding on an event with `attrs` for local sinks with `sinks`
    /// attributes. The event's attributes are cloned per call, as an IN-filter may change them; that clone is timed
    /// separately and subtracted.
    pub fn in_filter_ns(filter: &dyn InFilter, sinks: &[Attrs], attrs: &Attrs, iters: u64) -> f64 {
        let local = LocalSinks { attrs: sinks };
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(attrs.clone());
        }
        let clone_ns = start.elapsed().as_nanos() as f64;
        let start = Instant::now();
        for _ in 0..iters {
            let mut a = attrs.clone();
            let mut ev = InEvent { ty: "response", attrs: &mut a, payload: b"" };
            std::hint::black_box(filter.filter(std::hint::black_box(&mut ev), &local));
        }
        ((start.elapsed().as_nanos() as f64 - clone_ns) / iters as f64).max(0.0)
    }

    /// Mean nanoseconds of the direct evaluator (`None` if the expression is outside its subset).
    pub fn content_filter_fast_ns(expr: &str, ty: &str, attrs: &Attrs, iters: u64) -> Result<Option<f64>, FilterError> {
        let f = ContentFilter::compile(expr)?;
        if !f.is_fast() {
            return Ok(None);
        }
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(f.fast_matches(std::hint::black_box(ty), std::hint::black_box(attrs)));
        }
        Ok(Some(start.elapsed().as_nanos() as f64 / iters as f64))
    }

    /// Mean nanoseconds to evaluate one content filter on one event with the CEL interpreter, as the submit path does (the event's variables
    /// are built once per event and shared by all sinks; this counts them for a single sink).
    pub fn content_filter_ns(expr: &str, ty: &str, attrs: &Attrs, iters: u64) -> Result<(f64, f64), FilterError> {
        let f = ContentFilter::compile(expr)?;
        let root = cel::Context::default();
        let start = Instant::now();
        for _ in 0..iters {
            let ctx = FilterContext::new(&root, ty, attrs);
            std::hint::black_box(f.matches_in(&ctx));
        }
        let with_context = start.elapsed().as_nanos() as f64 / iters as f64;
        let ctx = FilterContext::new(&root, ty, attrs);
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(f.matches_in(std::hint::black_box(&ctx)));
        }
        let eval_only = start.elapsed().as_nanos() as f64 / iters as f64;
        Ok((with_context, eval_only))
    }

    /// Mean nanoseconds per call of a sandboxed OUT-filter module.
    pub fn wasm_out_ns(
        module: &[u8],
        sinks: &[Attrs],
        attrs: &Attrs,
        iters: u64,
    ) -> Result<f64, crate::wasm::WasmError> {
        let f = crate::wasm::WasmFilter::new(
            kecho_proto::codec::FilterKind::Out,
            module,
            crate::wasm::WasmLimits::default(),
            Box::new(|_| {}),
        )?;
        let out = crate::wasm::WasmOut(Arc::new(f));
        Ok(out_filter_ns(&out, sinks, attrs, iters))
    }
}
