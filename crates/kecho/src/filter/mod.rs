//! Channel filters (KECho section 2.3).
//!
//! - An **OUT-filter** on a source chooses, per event, which of the channel's sinks receive it, from the event and
//!   from the attributes every sink supplies ([`OutFilter`], built-ins in [`Selector`]).
//! - An **IN-filter** on a node's channel sees each event before it is dispatched to local sinks and may drop it,
//!   narrow its sinks or add attributes ([`InFilter`], built-ins [`Dedupe`] and [`RateLimit`]).
//! - A **content filter** is an expression a sink gives at subscribe time ([`ContentFilter`], CEL); it is shipped to
//!   every source and evaluated there, so events no sink wants never cross the network.

//!
//! The built-in OUT-filters are in [`Selector`] (module `selector`), the built-in IN-filters [`Dedupe`] and
//! [`RateLimit`] (module `builtin`), content filters in [`ContentFilter`] (module `content`, CEL; needs the `cel`
//! feature, on by default). [`crate::cost`] measures what one call of a filter costs.

mod builtin;
#[cfg(feature = "cel")]
mod content;
#[cfg(not(feature = "cel"))]
#[path = "no_content.rs"]
mod content;
mod selector;

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kecho_proto::{Attrs, LocalId, NodeId, Value};

pub use builtin::{Dedupe, RateLimit};
pub use content::ContentFilter;
#[cfg(feature = "cel")]
pub use content::{add_cel_variables, cel_value};
pub(crate) use content::{CelRoot, FilterContext};
pub use selector::{Selector, SelectorError};

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
