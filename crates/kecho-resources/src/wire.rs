//! The protocol on the channel `kecho.resources`: event types and the attributes each carries (see
//! docs/RESOURCES.md). Every message is a kecho event with an empty payload; everything is in attributes, so content
//! filters and OUT-filters can route on it.

use std::time::Duration;

use kecho::{Attrs, Value};

use crate::error::ParseError;
use crate::types::{Amounts, HolderId, ReservationId};

/// The channel.
pub const CHANNEL: &str = "kecho.resources";

/// Agent to everyone: its attributes, as soft state with a lifetime.
pub const REPORT: &str = "report";
/// Agent to everyone: it is leaving (its reports stop).
pub const BYE: &str = "bye";
/// Requester to the agents whose attributes satisfy it: a QoS request.
pub const REQUEST: &str = "request";
/// Agent to requester: capacity held for it.
pub const OFFER: &str = "offer";
/// Agent to requester: not admitted, with the reason.
pub const REFUSE: &str = "refuse";
/// Requester to agent: operations on an offer or reservation (`op` says which).
pub const OP: &str = "op";
/// Agent to requester: the answer to an operation.
pub const ACK: &str = "ack";
/// Agent probe that is never delivered: its OUT-filter reads which holders are members of the channel.
pub const HOLDERS: &str = "holders";

/// Operations carried by [`OP`] events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Confirm an offer.
    Confirm,
    /// Withdraw an offer.
    Decline,
    /// Extend a lease.
    Renew,
    /// Change the amounts.
    Resize,
    /// Free it.
    Release,
}

impl Op {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Confirm => "confirm",
            Op::Decline => "decline",
            Op::Renew => "renew",
            Op::Resize => "resize",
            Op::Release => "release",
        }
    }
    /// From the wire name.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "confirm" => Op::Confirm,
            "decline" => Op::Decline,
            "renew" => Op::Renew,
            "resize" => Op::Resize,
            "release" => Op::Release,
            _ => return None,
        })
    }
}

/// Attribute names that agents set themselves; a static attribute may not use them.
pub const RESERVED_ATTRS: &[&str] =
    &["agent", "epoch", "seq", "lifetime_ms", "lv", "resources", "unknown", "holder", "to"];

pub(crate) fn str_attr<'a>(a: &'a Attrs, name: &str) -> Result<&'a str, ParseError> {
    match a.get(name) {
        Some(Value::Str(s)) => Ok(s),
        _ => Err(ParseError::new(format!("attribute `{name}` missing or not a string"))),
    }
}

pub(crate) fn int_attr(a: &Attrs, name: &str) -> Result<i64, ParseError> {
    match a.get(name) {
        Some(Value::Int(i)) => Ok(*i),
        _ => Err(ParseError::new(format!("attribute `{name}` missing or not an integer"))),
    }
}

pub(crate) fn opt_str<'a>(a: &'a Attrs, name: &str) -> Option<&'a str> {
    match a.get(name) {
        Some(Value::Str(s)) => Some(s),
        _ => None,
    }
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn dur(a: &Attrs, name: &str) -> Result<Duration, ParseError> {
    let v = int_attr(a, name)?;
    u64::try_from(v).map(Duration::from_millis).map_err(|_| ParseError::new(format!("`{name}` is negative")))
}

/// Epochs are random `u64`s carried in an `i64` attribute bit for bit.
pub(crate) fn epoch_attr(v: u64) -> i64 {
    v as i64
}

pub(crate) fn epoch_of(a: &Attrs, name: &str) -> Result<u64, ParseError> {
    Ok(int_attr(a, name)? as u64)
}

/// The id carried in `id` (agent name, epoch and number in their own attributes, so no parsing of names).
pub(crate) fn id_attrs(a: &mut Attrs, id: &ReservationId) {
    a.set("agent", id.agent.clone());
    a.set("epoch", epoch_attr(id.epoch));
    a.set("n", i64::try_from(id.n).unwrap_or(i64::MAX));
}

pub(crate) fn id_of(a: &Attrs) -> Result<ReservationId, ParseError> {
    Ok(ReservationId {
        agent: str_attr(a, "agent")?.to_owned(),
        epoch: epoch_of(a, "epoch")?,
        n: u64::try_from(int_attr(a, "n")?).map_err(|_| ParseError::new("`n` is negative"))?,
    })
}

pub(crate) fn amounts_of(a: &Attrs) -> Result<Amounts, ParseError> {
    opt_str(a, "amounts").unwrap_or("").parse()
}

pub(crate) fn holder_of(a: &Attrs) -> Result<HolderId, ParseError> {
    Ok(HolderId(str_attr(a, "from")?.to_owned()))
}
