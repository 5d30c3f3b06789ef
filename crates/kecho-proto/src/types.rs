//! Identifiers, attribute values and member descriptions.

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;

/// A node: one process with one listening port. Chosen at random when the node starts, so a restarted process is a new
/// node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The node id that belongs to an Ed25519 public key: the key's first eight bytes (see `crate::handshake` for
    /// why a node id cannot be claimed without the key).
    pub fn from_public_key(key: &[u8; 32]) -> NodeId {
        let mut id = [0u8; 8];
        id.copy_from_slice(&key[..8]);
        NodeId(u64::from_le_bytes(id))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Longest channel name, in bytes: the registry refuses longer names, and a credential's channel pattern is no longer.
pub const MAX_CHANNEL_NAME: usize = 255;

/// A channel's identity on the wire. The creator picks it at random and stores it in the registry beside the name, so
/// events carry eight bytes instead of the name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ChannelId(pub u64);

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A channel's secret: 128 random bits that the creator registers with the name and that members learn when they are
/// let in. Renewing, taking over or removing the registry entry needs it, so nobody outside the channel can hijack or
/// delete the entry. Never shown in `Debug` output, logs or registry answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChannelSecret(pub u128);

impl fmt::Debug for ChannelSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChannelSecret(..)")
    }
}

/// A source or sink, local to its node. Together with the node it names a member of a channel.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct LocalId(pub u32);

/// One attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A signed 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// Opaque bytes.
    Bytes(Bytes),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(v) => write!(f, "{v:?}"),
            Value::Bytes(v) => write!(f, "<{} bytes>", v.len()),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<Bytes> for Value {
    fn from(v: Bytes) -> Self {
        Value::Bytes(v)
    }
}

/// An attribute list: name-value pairs piggybacked on events and on member descriptions. Order is kept as given; a
/// later entry with the same name replaces an earlier one when set through [`Attrs::set`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attrs(pub Vec<(String, Value)>);

impl Attrs {
    /// An empty list.
    pub fn new() -> Self {
        Attrs(Vec::new())
    }

    /// Sets `name` to `value`, replacing an earlier value of the same name.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Builder form of [`Attrs::set`].
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.set(name, value);
        self
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Number of attributes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are no attributes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over name-value pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }
}

/// What a sink does when its queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    /// The event waits for room; the source is slowed down (back-pressure over the link).
    Block,
    /// The oldest queued event is discarded to make room; the sink is told how many it missed.
    #[default]
    DropOldest,
    /// The arriving event is discarded; the sink is told how many it missed.
    DropNewest,
}

/// Which event types a sink wants.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum TypeFilter {
    /// Every type.
    #[default]
    All,
    /// Only these type names.
    Only(Vec<String>),
}

impl TypeFilter {
    /// True if an event of type `ty` passes.
    pub fn accepts(&self, ty: &str) -> bool {
        match self {
            TypeFilter::All => true,
            TypeFilter::Only(list) => list.iter().any(|t| t == ty),
        }
    }
}

/// The sinks of a table (numbered in table order) that accept each event type, found without matching the type
/// against every sink's [`TypeFilter`]: built once from the filters when the table is made, then asked once per event.
/// Sources route every event through their channel's table, so with many sinks a per-sink comparison of type names
/// was the largest cost of sending a small event; with the index an event costs one lookup of its type plus the
/// sinks that accept it.
#[derive(Clone, Debug, Default)]
pub struct TypeIndex {
    /// The sinks that accept every type, ascending.
    all: Vec<usize>,
    /// Per type name that some filter lists: the sinks that list it, ascending (each once).
    named: Vec<(Box<str>, Vec<usize>)>,
    /// Positions in `named` by name, once there are more names than a scan of them finds quickly.
    lookup: Option<HashMap<Box<str>, usize>>,
    /// How many filters the index was built from.
    len: usize,
}

impl TypeIndex {
    /// Up to this many type names are found by comparing them in turn (a channel's sinks usually name a few); more
    /// are hashed.
    const SCAN: usize = 8;

    /// Indexes `filters`, the `i`-th being sink `i`'s.
    pub fn build<'a>(filters: impl IntoIterator<Item = &'a TypeFilter>) -> TypeIndex {
        let mut ix = TypeIndex::default();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for (i, f) in filters.into_iter().enumerate() {
            ix.len = i + 1;
            match f {
                TypeFilter::All => ix.all.push(i),
                TypeFilter::Only(list) => {
                    for name in list {
                        match at.get(name.as_str()) {
                            // A name listed twice by one filter names the sink once.
                            Some(&k) if ix.named[k].1.last() == Some(&i) => {}
                            Some(&k) => ix.named[k].1.push(i),
                            None => {
                                at.insert(name, ix.named.len());
                                ix.named.push((name.as_str().into(), vec![i]));
                            }
                        }
                    }
                }
            }
        }
        if ix.named.len() > Self::SCAN {
            ix.lookup = Some(ix.named.iter().enumerate().map(|(k, (n, _))| (n.clone(), k)).collect());
        }
        ix
    }

    /// How many filters (sinks) the index covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if it covers no sink.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if every sink accepts every type (no filter lists types), so that nothing needs looking up.
    pub fn accepts_everything(&self) -> bool {
        self.all.len() == self.len
    }

    /// The sinks whose filter accepts type `ty`, ascending: exactly those `i` for which the `i`-th filter's
    /// [`TypeFilter::accepts`] is true.
    #[inline]
    pub fn accepting(&self, ty: &str) -> Accepting<'_> {
        // Where every sink takes every type (the common case of a channel without typed sinks), nothing is compared.
        let named = if self.named.is_empty() {
            &[][..]
        } else {
            let k = match &self.lookup {
                Some(map) => map.get(ty).copied(),
                None => self.named.iter().position(|(n, _)| **n == *ty),
            };
            k.map_or(&[][..], |k| self.named[k].1.as_slice())
        };
        Accepting { all: &self.all, named }
    }
}

/// The sinks accepting one type, ascending: see [`TypeIndex::accepting`].
#[derive(Clone, Debug)]
pub struct Accepting<'a> {
    all: &'a [usize],
    named: &'a [usize],
}

impl Iterator for Accepting<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        // A merge of two ascending lists without common entries (a sink either accepts every type or lists some).
        match (self.all.split_first(), self.named.split_first()) {
            (Some((&a, rest)), Some((&n, _))) if a < n => {
                self.all = rest;
                Some(a)
            }
            (_, Some((&n, rest))) => {
                self.named = rest;
                Some(n)
            }
            (Some((&a, rest)), None) => {
                self.all = rest;
                Some(a)
            }
            (None, None) => None,
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.all.len() + self.named.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Accepting<'_> {}

/// The role of a channel member.
#[derive(Clone, Debug, PartialEq)]
pub enum Role {
    /// Publishes events.
    Source,
    /// Receives events of the types it asked for.
    Sink {
        /// The types it wants; sources filter on this before sending.
        types: TypeFilter,
        /// Its overflow policy, so a source knows whether to wait for it.
        overflow: Overflow,
        /// Its content filter: an expression over the event's type and attributes, evaluated at the source.
        filter: Option<String>,
    },
}

/// One member of a channel as all other members see it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberInfo {
    /// Its id on its node.
    pub id: LocalId,
    /// Source or sink.
    pub role: Role,
    /// Attributes it supplies to filters (used by channel filters).
    pub attrs: Attrs,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{TypeFilter, TypeIndex};

    /// The index against the filters themselves: for every type, the sinks it yields are exactly those whose filter
    /// accepts the type, in table order.
    fn check(filters: &[TypeFilter], types: &[&str]) {
        let ix = TypeIndex::build(filters);
        assert_eq!(ix.len(), filters.len());
        for ty in types {
            let want: Vec<usize> = (0..filters.len()).filter(|&i| filters[i].accepts(ty)).collect();
            let got: Vec<usize> = ix.accepting(ty).collect();
            assert_eq!(got, want, "type {ty:?} over {filters:?}");
            assert_eq!(ix.accepting(ty).len(), want.len());
        }
    }

    /// More names than `TypeIndex::SCAN`, so that both ways of finding a name are exercised.
    const NAMES: [&str; 12] = ["a", "b", "ab", "ba", "", "request", "op", "offer", "c", "d", "e", "free"];

    fn filter() -> impl Strategy<Value = TypeFilter> {
        prop_oneof![
            1 => Just(TypeFilter::All),
            3 => prop::collection::vec(0..NAMES.len(), 0..6)
                .prop_map(|l| TypeFilter::Only(l.into_iter().map(|n| NAMES[n].to_owned()).collect())),
        ]
    }

    proptest! {
        #[test]
        fn the_index_accepts_what_the_filters_accept(filters in prop::collection::vec(filter(), 0..40)) {
            // Every listed name, names no filter lists, and names that differ from listed ones in case or length.
            let mut types = NAMES.to_vec();
            types.extend(["A", "requests", "reques", "g", "offe"]);
            check(&filters, &types);
        }
    }

    #[test]
    fn duplicates_all_and_empty_lists() {
        let only = |l: &[&str]| TypeFilter::Only(l.iter().map(|s| (*s).to_owned()).collect());
        let filters = [only(&["x", "x", "y"]), TypeFilter::All, only(&[]), only(&["y"]), TypeFilter::All, only(&["x"])];
        check(&filters, &["x", "y", "z"]);
        let ix = TypeIndex::build(&filters);
        assert_eq!(ix.accepting("x").collect::<Vec<_>>(), [0, 1, 4, 5]);
        assert_eq!(ix.accepting("z").collect::<Vec<_>>(), [1, 4]);
        assert!(TypeIndex::build(std::iter::empty()).is_empty());
        // Past `TypeIndex::SCAN` names the index hashes them.
        let many: Vec<TypeFilter> =
            (0..20).map(|i| only(&[format!("t{i}").as_str(), format!("t{}", i / 2).as_str()])).collect();
        let ix = TypeIndex::build(&many);
        assert!(ix.lookup.is_some());
        assert_eq!(ix.accepting("t3").collect::<Vec<_>>(), [3, 6, 7]);
        check(&many, &["t0", "t9", "t19", "t20", "t"]);
        assert_eq!(TypeIndex::default().accepting("x").count(), 0);
        assert!(TypeIndex::build(&[TypeFilter::All, TypeFilter::All]).accepts_everything());
        assert!(!TypeIndex::build(&[TypeFilter::All, only(&[])]).accepts_everything());
    }
}
