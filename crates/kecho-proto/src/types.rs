//! Identifiers, attribute values and member descriptions.

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
