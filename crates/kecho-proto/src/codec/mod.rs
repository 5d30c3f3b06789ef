//! Frames and messages. See docs/PROTOCOL.md for the byte layout.
//!
//! A frame is a little-endian `u32` length, then that many bytes: a one-byte message kind and the message body. The
//! decoder is a pure function over a byte buffer: it returns a message, "need more bytes" (`Ok(None)`), or a typed
//! error. It never panics, and what it allocates follows the items it actually decodes: a lying count reserves at most
//! a few dozen items (decoded attributes and members do take more memory than their wire bytes, up to about 11 times
//! the frame).

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::access::{Policy, Roles, Token};
use crate::snapshot::NodeSnapshot;
use crate::types::*;

mod gossip;
mod registry;
mod run;

// The registry's messages carry these; they are named from here like every other message field.
pub use registry::{ClaimMode, RegEntry, RegErrorCode, RegResult};
pub use run::{
    decode_event_run, decode_event_run_msg, encode_event_run, is_event_run, EventRunMsg, RunPayloads, EVENT_RUN,
};

/// The protocol version this crate speaks. Peers with another version are refused in the handshake.
pub const PROTOCOL_VERSION: u16 = 19;
/// "KECH": the first four bytes of every `Hello`, so a stray client is recognised at once.
pub const MAGIC: u32 = 0x4b45_4348;
/// Default maximum frame length (kind and body), 16 MiB.
pub const MAX_FRAME_DEFAULT: usize = 16 << 20;
/// Bytes before the body: the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Most items reserved up front for a list; longer lists grow as items actually decode, so a lying count reserves
/// nothing beyond this.
const PREALLOC: usize = 64;

/// Why a buffer is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces more than the allowed maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Announced length.
        len: usize,
        /// Allowed maximum.
        max: usize,
    },
    /// A frame with length zero has no kind byte.
    #[error("empty frame")]
    Empty,
    /// The kind byte names no message.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The body ended before a field was complete.
    #[error("message kind {kind} truncated")]
    Truncated {
        /// The message kind being decoded.
        kind: u8,
    },
    /// Bytes were left over after the last field.
    #[error("message kind {kind} has {extra} trailing bytes")]
    Trailing {
        /// The message kind.
        kind: u8,
        /// How many bytes were left.
        extra: usize,
    },
    /// A string was not UTF-8.
    #[error("invalid UTF-8 in message kind {kind}")]
    Utf8 {
        /// The message kind.
        kind: u8,
    },
    /// An enumeration tag had no meaning.
    #[error("invalid {what} tag {tag} in message kind {kind}")]
    BadTag {
        /// The message kind.
        kind: u8,
        /// Which field.
        what: &'static str,
        /// The tag seen.
        tag: u8,
    },
}

/// How a connection is meant to be used, stated in `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A node-to-node link carrying membership and events.
    Node,
    /// A registry client talking to a registry.
    Registry,
    /// A replica of a replicated registry talking to another replica (its frames after `Hello` are the replicas'
    /// own, described in docs/PROTOCOL.md).
    RegistryPeer,
}

/// Reason codes carried by [`Message::Close`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// Normal shutdown.
    Normal,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The peer sent something that is not a valid frame.
    Malformed,
    /// A connection between the two nodes already exists and wins over this one.
    Duplicate,
    /// The peer broke the handshake rules (wrong first message, wrong magic, wrong purpose).
    Handshake,
    /// The peer said nothing for longer than the heartbeat timeout.
    Timeout,
    /// Any other code, kept for forward compatibility.
    Other(u16),
}

impl CloseCode {
    fn to_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::VersionMismatch => 1,
            CloseCode::Malformed => 2,
            CloseCode::Duplicate => 3,
            CloseCode::Handshake => 4,
            CloseCode::Timeout => 5,
            CloseCode::Other(c) => c,
        }
    }
    fn from_u16(v: u16) -> Self {
        match v {
            0 => CloseCode::Normal,
            1 => CloseCode::VersionMismatch,
            2 => CloseCode::Malformed,
            3 => CloseCode::Duplicate,
            4 => CloseCode::Handshake,
            5 => CloseCode::Timeout,
            c => CloseCode::Other(c),
        }
    }
}

/// A node as listed in a join answer: who it is, where it listens, what it contributes.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerEntry {
    /// The node.
    pub node: NodeId,
    /// Its listening address, as `host:port`.
    pub addr: String,
    /// Its members in the channel.
    pub snapshot: NodeSnapshot,
}

/// One node's share of an ended source's events, as the source knew it (in `Message::SourceEnd`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndDest {
    /// The node.
    pub node: NodeId,
    /// The node's instance of the channel ([`crate::NodeSnapshot::instance`]) that `routed` and `missed` are for: a
    /// receiver takes the entry as its own only when it names its own instance (version 16).
    pub instance: u64,
    /// How many of the source's events were queued to that node in all (the receiver's own numbering of the events
    /// meant for it, see `Message::Routed`): whatever of these did not arrive was lost in transit.
    pub routed: u64,
    /// Events sinks of that node would have received while it was cut off, per sink, not yet reported to it.
    pub missed: Vec<(LocalId, u64)>,
}

/// One member node in a [`Message::ViewSync`] list: its snapshot version as the sender knows it, or that it left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewEntry {
    /// The node.
    pub node: NodeId,
    /// The version of its snapshot the sender has (or had when it learnt that the node left).
    pub version: u64,
    /// The sender learnt that the node left (or was taken for gone) at `version`: a tombstone, kept for a while.
    pub left: bool,
}

/// Where a sandboxed filter runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKind {
    /// At each source, choosing sinks.
    Out,
    /// At the receiving node, before dispatch.
    In,
}

/// An event as carried on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct EventMsg {
    /// Channel.
    pub channel: ChannelId,
    /// The source on the sending node.
    pub source: LocalId,
    /// Per-source sequence number, starting at 1.
    pub seq: u64,
    /// Event type name; shared with other events of the type when decoded through a [`TypeNames`] cache.
    pub ty: Arc<str>,
    /// Attribute list.
    pub attrs: Attrs,
    /// Payload, shared with the received frame (no copy).
    pub payload: Bytes,
}

/// Every message kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// First message on every connection, from the side that dialled.
    Hello {
        /// Protocol version of the sender.
        version: u16,
        /// The sender's node id (random for registry clients).
        node: NodeId,
        /// The sender's listening address, empty if it does not listen.
        addr: String,
        /// What the connection is for.
        purpose: Purpose,
    },
    /// The accepting side's answer to `Hello`.
    HelloAck {
        /// Protocol version of the sender.
        version: u16,
        /// The sender's node id.
        node: NodeId,
    },
    /// Sent before closing a connection on purpose.
    Close {
        /// Why.
        code: CloseCode,
        /// For humans and logs.
        reason: String,
    },
    /// Heartbeat request.
    Ping(u64),
    /// Heartbeat answer, echoing the nonce.
    Pong(u64),
    /// Proof of a node's identity, right after its `Hello` (dialler) or `HelloAck` (acceptor) on node links: its
    /// Ed25519 public key, from which its node id derives, and its signature over the handshake (see
    /// `crate::handshake`).
    Proof {
        /// The public key.
        key: [u8; 32],
        /// The signature.
        sig: [u8; 64],
    },
    /// First and only message of a probe connection (tree mode's liveness check, `crate::probe`), in place of
    /// `Hello`: the prober asks node `to` to prove, with no link, that it is alive and still a member of `channel`.
    /// Answered before any handshake with a `Proof` signed over the probe (`crate::handshake::Identity::probe_proof`),
    /// or refused with `Close`; then the connection closes.
    ProbeHello {
        /// Protocol version of the prober.
        version: u16,
        /// The prober's node id.
        from: NodeId,
        /// The node the prober means to reach.
        to: NodeId,
        /// The channel whose membership is checked.
        channel: ChannelId,
        /// Signed in the answer, so an answer is good for this probe only.
        nonce: u64,
    },
    /// A node asks the channel's contact to let it join.
    JoinRequest {
        /// Channel.
        channel: ChannelId,
        /// The joiner's listening address.
        addr: String,
        /// The joiner's members.
        snapshot: NodeSnapshot,
    },
    /// The contact's answer: every node currently in the channel.
    JoinAccept {
        /// Channel.
        channel: ChannelId,
        /// Current contact.
        contact: NodeId,
        /// The channel's secret, for the registry entry.
        secret: ChannelSecret,
        /// Member nodes, excluding the joiner.
        nodes: Vec<PeerEntry>,
        /// The channel's access policy, if it has one: every member checks every other member against it.
        policy: Option<Policy>,
    },
    /// The contact refuses a joiner: its snapshot is not covered by the channel's access policy.
    JoinRefused {
        /// Channel.
        channel: ChannelId,
        /// Why, for the joiner's error.
        reason: String,
    },
    /// The receiver is not (or no longer) the channel's contact; ask the registry again.
    JoinRedirect {
        /// Channel.
        channel: ChannelId,
    },
    /// A node's members in a channel, sent to every other member node whenever they change. The contact also relays
    /// joiners' snapshots, hence the explicit node and address.
    Snapshot {
        /// Channel.
        channel: ChannelId,
        /// Whose snapshot.
        node: NodeId,
        /// That node's address.
        addr: String,
        /// Its members; empty with `left` when it left.
        snapshot: NodeSnapshot,
        /// The node has left the channel.
        left: bool,
        /// The receiver should answer with its own snapshot (sent on first contact).
        reply: bool,
    },
    /// An event.
    Event(EventMsg),
    /// The next `Event` of `channel` on this link goes only to these sinks of the receiving node (chosen by the
    /// source's OUT-filter), instead of to every local sink that accepts its type.
    Targets {
        /// Channel.
        channel: ChannelId,
        /// Sinks on the receiving node.
        sinks: Vec<LocalId>,
    },
    /// Install a sandboxed filter (a WebAssembly module) on the receiving node's channel.
    InstallFilter {
        /// Channel.
        channel: ChannelId,
        /// Request id, echoed in `FilterStatus`.
        req: u32,
        /// Which kind of filter.
        kind: FilterKind,
        /// The module, binary or text format.
        module: Bytes,
    },
    /// The outcome of an `InstallFilter`, or later a fault of the installed module (`ok` false).
    FilterStatus {
        /// Channel.
        channel: ChannelId,
        /// The install request's id.
        req: u32,
        /// Installed and working.
        ok: bool,
        /// What happened.
        message: String,
    },
    /// The sender did not deliver `count` events of `source` meant for sinks of the receiving node: the link was
    /// full, or the node was cut off from the channel when they were submitted.
    Lagged {
        /// Channel.
        channel: ChannelId,
        /// The source whose events were missed.
        source: LocalId,
        /// The instance of the channel on the receiving node ([`crate::NodeSnapshot::instance`]) whose sinks missed
        /// them: a receiver ignores the frame when it names another instance (an earlier opening of the channel
        /// there). Version 16.
        instance: u64,
        /// How many.
        count: u64,
        /// The sinks that missed them; empty means every sink of the channel on the receiving node.
        sinks: Vec<LocalId>,
    },
    /// The next `Event` of `channel` on this link must not be delivered after `unix_us` (microseconds since the Unix
    /// epoch, the sender's clock): a receiver that has it later reports it to its sinks as expired instead.
    Deadline {
        /// Channel.
        channel: ChannelId,
        /// The deadline, in microseconds since the Unix epoch.
        unix_us: u64,
    },
    /// In a tree-mode event's payload (a `Gossip` `Event`), ahead of its `Event` frame: the outbox lane (priority
    /// level, 0 = default) every node forwards it in. Version 8.
    Priority {
        /// Channel.
        channel: ChannelId,
        /// The lane.
        level: u8,
    },
    /// Event `seq` of `source`, of type `ty`, passed its deadline before the sender wrote it: it is not sent, and
    /// stands in its place on the link (it counts in the receiver's numbering of the source's events as the event
    /// would have). The receiver reports it to the sinks that would have received it as expired.
    Expired {
        /// Channel.
        channel: ChannelId,
        /// The source.
        source: LocalId,
        /// The expired event's sequence number.
        seq: u64,
        /// Its type (the sinks that accept it are the ones told).
        ty: String,
        /// The sinks it was meant for on the receiving node; empty means every sink there accepting `ty`.
        sinks: Vec<LocalId>,
    },
    /// Loss accounting: of `source`'s events up to and including the next one it sends on this link, `skipped` in
    /// all were not meant for the receiving node (no sink there wanted them, or the OUT-filter chose others). The
    /// receiver numbers the events meant for it as `seq - skipped`; a jump in that number is a loss in transit (a
    /// link that broke with events on the way). Sent only when the value changes, and before a source's first event
    /// to each instance of the channel on the receiving node.
    Routed {
        /// Channel.
        channel: ChannelId,
        /// The source.
        source: LocalId,
        /// The instance of the channel on the receiving node ([`crate::NodeSnapshot::instance`]) that the source
        /// numbers these events for: a receiver ignores the frame, and the events after it, when it names another
        /// instance (an earlier opening of the channel there, whose events were still in flight).
        instance: u64,
        /// The sender's own instance of the channel, which the source belongs to: a receiver takes a source of a
        /// later instance for a new source (its local id and sequence numbers start again), and ignores frames of an
        /// earlier one. Instances of one node's channel increase with each opening.
        origin: u64,
        /// Its events not meant for the receiving node so far.
        skipped: u64,
    },
    /// Loss accounting when a source ends (it was closed, or its node left): its last sequence number and, per node
    /// it queued events to or counted events for while that node was cut off, what it knows of that node's share. The
    /// source's node sends it to every member node after the source's last event; each receiver relays it once (the
    /// same message, `origin` unchanged) to the other members it knows and to members that appear later, so that a
    /// node cut off from the source learns of the end from anyone. See docs/PROTOCOL.md, "Sources that end".
    SourceEnd {
        /// Channel.
        channel: ChannelId,
        /// The source's node.
        origin: NodeId,
        /// The instance of the channel on the source's node that the source belongs to (as in `Routed`'s `origin`):
        /// a receiver ignores the end of a source of an earlier instance than the one it tracks under that local id.
        /// Version 16.
        origin_instance: u64,
        /// The source.
        source: LocalId,
        /// Its last sequence number (0: it sent nothing).
        last: u64,
        /// What it knows of each node's share; empty when the source's node left without closing the source first.
        dests: Vec<EndDest>,
    },
    /// A channel in tree mode (docs/SCALE.md): one message of its membership and dissemination state machine
    /// ([`crate::gossip`]), with the addresses the sender knows of the nodes the message names (a joiner, shuffled
    /// peers), so that the receiver can dial them. Version 7.
    Gossip {
        /// Channel.
        channel: ChannelId,
        /// Node addresses: those of the nodes `body` names, as far as the sender knows them.
        addrs: Vec<(NodeId, String)>,
        /// The message. An event's payload is an encoded `Event` frame, forwarded unchanged.
        body: crate::gossip::GossipMsg,
    },
    /// Anti-entropy of a channel's membership in tree mode (docs/SCALE.md, "Membership in tree mode"): the digest
    /// of the sender's view, and with `list`, the view itself. Version 8.
    ViewSync {
        /// Channel.
        channel: ChannelId,
        /// How many member nodes the sender knows, itself included.
        count: u32,
        /// An order-independent hash of those nodes and their snapshot versions (`membership::view_hash`).
        hash: u64,
        /// How long the sender's view has not changed, in milliseconds (as far as it noticed; saturating): a
        /// mismatch between views that just changed is most likely a broadcast still on its way.
        quiet_ms: u32,
        /// `None`: the digest alone. `Some((reply, entries))`: every member node the sender knows (itself included)
        /// and its recent departures; `reply` asks the receiver for its own list back.
        list: Option<(bool, Vec<ViewEntry>)>,
    },
    /// Registry: create, renew or take over an entry.
    RegClaim {
        /// Request id, echoed in the reply.
        req: u32,
        /// Channel name.
        name: String,
        /// Channel id.
        channel: ChannelId,
        /// Claiming node.
        node: NodeId,
        /// Its address.
        addr: String,
        /// Lease length.
        ttl_ms: u64,
        /// Which kind of claim.
        mode: ClaimMode,
        /// Current source count.
        sources: u32,
        /// Current sink count.
        sinks: u32,
        /// The channel's secret: set by `Create`, required by every later claim.
        secret: ChannelSecret,
    },
    /// Registry: look a channel up by name.
    RegLookup {
        /// Request id.
        req: u32,
        /// Channel name.
        name: String,
    },
    /// Registry: remove an entry (only its contact may).
    RegRemove {
        /// Request id.
        req: u32,
        /// Channel name.
        name: String,
        /// Channel id.
        channel: ChannelId,
        /// The contact asking.
        node: NodeId,
        /// The channel's secret.
        secret: ChannelSecret,
    },
    /// Registry: list live entries.
    RegList {
        /// Request id.
        req: u32,
    },
    /// Registry: the answer to a request.
    RegReply {
        /// The request's id.
        req: u32,
        /// The outcome.
        result: RegResult,
    },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const CLOSE: u8 = 3;
    pub const PING: u8 = 4;
    pub const PONG: u8 = 5;
    pub const PROOF: u8 = 6;
    pub const PROBE_HELLO: u8 = 7;
    pub const JOIN_REFUSED: u8 = 9;
    pub const JOIN_REQUEST: u8 = 10;
    pub const JOIN_ACCEPT: u8 = 11;
    pub const JOIN_REDIRECT: u8 = 12;
    pub const SNAPSHOT: u8 = 13;
    pub const EVENT: u8 = 14;
    pub const LAGGED: u8 = 15;
    pub const TARGETS: u8 = 16;
    pub const INSTALL_FILTER: u8 = 17;
    pub const FILTER_STATUS: u8 = 18;
    pub const ROUTED: u8 = 19;
    pub const REG_CLAIM: u8 = 20;
    pub const REG_LOOKUP: u8 = 21;
    pub const REG_REMOVE: u8 = 22;
    pub const REG_LIST: u8 = 23;
    pub const REG_REPLY: u8 = 24;
    pub const SOURCE_END: u8 = 25;
    pub const DEADLINE: u8 = 30;
    pub const EXPIRED: u8 = 31;
    pub const GOSSIP: u8 = 40;
    pub const PRIORITY: u8 = 41;
    pub const VIEW_SYNC: u8 = 42;
    /// A run of events in one compact frame (`run.rs`); not a `Message`.
    pub const EVENT_RUN: u8 = 60;
}

impl Message {
    /// The kind byte of this message.
    pub fn kind(&self) -> u8 {
        use kind::*;
        match self {
            Message::Hello { .. } => HELLO,
            Message::HelloAck { .. } => HELLO_ACK,
            Message::Close { .. } => CLOSE,
            Message::Ping(_) => PING,
            Message::Pong(_) => PONG,
            Message::Proof { .. } => PROOF,
            Message::ProbeHello { .. } => PROBE_HELLO,
            Message::JoinRequest { .. } => JOIN_REQUEST,
            Message::JoinAccept { .. } => JOIN_ACCEPT,
            Message::JoinRefused { .. } => JOIN_REFUSED,
            Message::JoinRedirect { .. } => JOIN_REDIRECT,
            Message::Snapshot { .. } => SNAPSHOT,
            Message::Event(_) => EVENT,
            Message::Lagged { .. } => LAGGED,
            Message::Routed { .. } => ROUTED,
            Message::Targets { .. } => TARGETS,
            Message::InstallFilter { .. } => INSTALL_FILTER,
            Message::FilterStatus { .. } => FILTER_STATUS,
            Message::RegClaim { .. } => REG_CLAIM,
            Message::RegLookup { .. } => REG_LOOKUP,
            Message::RegRemove { .. } => REG_REMOVE,
            Message::RegList { .. } => REG_LIST,
            Message::RegReply { .. } => REG_REPLY,
            Message::SourceEnd { .. } => SOURCE_END,
            Message::Deadline { .. } => DEADLINE,
            Message::Expired { .. } => EXPIRED,
            Message::Gossip { .. } => GOSSIP,
            Message::Priority { .. } => PRIORITY,
            Message::ViewSync { .. } => VIEW_SYNC,
        }
    }

    /// Appends this message as one complete frame (length prefix included) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Message::Event(e) => return encode_event(dst, e.channel, e.source, e.seq, &e.ty, &e.attrs, &e.payload),
            Message::Routed { channel, source, instance, origin, skipped } => {
                return encode_routed(dst, *channel, *source, *instance, *origin, *skipped)
            }
            Message::Targets { channel, sinks } => return encode_targets(dst, *channel, sinks),
            Message::Deadline { channel, unix_us } => return encode_deadline(dst, *channel, *unix_us),
            _ => {}
        }
        let start = begin_frame(dst, self.kind());
        match self {
            Message::Hello { version, node, addr, purpose } => {
                dst.put_u32_le(MAGIC);
                dst.put_u16_le(*version);
                dst.put_u64_le(node.0);
                put_str(dst, addr);
                dst.put_u8(match purpose {
                    Purpose::Node => 0,
                    Purpose::Registry => 1,
                    Purpose::RegistryPeer => 2,
                });
            }
            Message::HelloAck { version, node } => {
                dst.put_u16_le(*version);
                dst.put_u64_le(node.0);
            }
            Message::Close { code, reason } => {
                dst.put_u16_le(code.to_u16());
                put_str(dst, reason);
            }
            Message::Ping(n) | Message::Pong(n) => dst.put_u64_le(*n),
            Message::Proof { key, sig } => {
                dst.put_slice(key);
                dst.put_slice(sig);
            }
            Message::ProbeHello { version, from, to, channel, nonce } => {
                dst.put_u32_le(MAGIC);
                dst.put_u16_le(*version);
                dst.put_u64_le(from.0);
                dst.put_u64_le(to.0);
                dst.put_u64_le(channel.0);
                dst.put_u64_le(*nonce);
            }
            Message::JoinRequest { channel, addr, snapshot } => {
                dst.put_u64_le(channel.0);
                put_str(dst, addr);
                put_snapshot(dst, snapshot);
            }
            Message::JoinAccept { channel, contact, secret, nodes, policy } => {
                dst.put_u64_le(channel.0);
                dst.put_u64_le(contact.0);
                dst.put_u128_le(secret.0);
                dst.put_u32_le(nodes.len() as u32);
                for n in nodes {
                    dst.put_u64_le(n.node.0);
                    put_str(dst, &n.addr);
                    put_snapshot(dst, &n.snapshot);
                }
                match policy {
                    None => dst.put_u8(0),
                    Some(p) => {
                        dst.put_u8(1);
                        dst.put_slice(&p.authority);
                        dst.put_u8(p.require.bits());
                    }
                }
            }
            Message::JoinRefused { channel, reason } => {
                dst.put_u64_le(channel.0);
                put_str(dst, reason);
            }
            Message::JoinRedirect { channel } => dst.put_u64_le(channel.0),
            Message::Snapshot { channel, node, addr, snapshot, left, reply } => {
                dst.put_u64_le(channel.0);
                dst.put_u64_le(node.0);
                put_str(dst, addr);
                put_snapshot(dst, snapshot);
                dst.put_u8(u8::from(*left) | (u8::from(*reply) << 1));
            }
            Message::Event(_) | Message::Routed { .. } | Message::Targets { .. } | Message::Deadline { .. } => {
                unreachable!("handled above")
            }
            Message::Expired { channel, source, seq, ty, sinks } => {
                dst.put_u64_le(channel.0);
                dst.put_u32_le(source.0);
                dst.put_u64_le(*seq);
                put_str(dst, ty);
                dst.put_u32_le(sinks.len() as u32);
                for s in sinks {
                    dst.put_u32_le(s.0);
                }
            }
            Message::Gossip { channel, addrs, body } => {
                dst.put_u64_le(channel.0);
                gossip::put_gossip(dst, addrs, body);
            }
            Message::Priority { channel, level } => {
                dst.put_u64_le(channel.0);
                dst.put_u8(*level);
            }
            Message::ViewSync { channel, count, hash, quiet_ms, list } => {
                dst.put_u64_le(channel.0);
                dst.put_u32_le(*count);
                dst.put_u64_le(*hash);
                dst.put_u32_le(*quiet_ms);
                match list {
                    None => dst.put_u8(0),
                    Some((reply, entries)) => {
                        dst.put_u8(if *reply { 2 } else { 1 });
                        dst.put_u32_le(entries.len() as u32);
                        for e in entries {
                            dst.put_u64_le(e.node.0);
                            dst.put_u64_le(e.version);
                            dst.put_u8(u8::from(e.left));
                        }
                    }
                }
            }
            Message::SourceEnd { channel, origin, origin_instance, source, last, dests } => {
                dst.put_u64_le(channel.0);
                dst.put_u64_le(origin.0);
                dst.put_u64_le(*origin_instance);
                dst.put_u32_le(source.0);
                dst.put_u64_le(*last);
                dst.put_u32_le(dests.len() as u32);
                for d in dests {
                    dst.put_u64_le(d.node.0);
                    dst.put_u64_le(d.instance);
                    dst.put_u64_le(d.routed);
                    dst.put_u32_le(d.missed.len() as u32);
                    for (sink, n) in &d.missed {
                        dst.put_u32_le(sink.0);
                        dst.put_u64_le(*n);
                    }
                }
            }
            Message::Lagged { channel, source, instance, count, sinks } => {
                dst.put_u64_le(channel.0);
                dst.put_u32_le(source.0);
                dst.put_u64_le(*instance);
                dst.put_u64_le(*count);
                dst.put_u32_le(sinks.len() as u32);
                for s in sinks {
                    dst.put_u32_le(s.0);
                }
            }
            Message::InstallFilter { channel, req, kind, module } => {
                dst.put_u64_le(channel.0);
                dst.put_u32_le(*req);
                dst.put_u8(match kind {
                    FilterKind::Out => 0,
                    FilterKind::In => 1,
                });
                dst.put_u32_le(module.len() as u32);
                dst.put_slice(module);
            }
            Message::FilterStatus { channel, req, ok, message } => {
                dst.put_u64_le(channel.0);
                dst.put_u32_le(*req);
                dst.put_u8(u8::from(*ok));
                put_str(dst, message);
            }
            Message::RegClaim { req, name, channel, node, addr, ttl_ms, mode, sources, sinks, secret } => {
                dst.put_u32_le(*req);
                put_str(dst, name);
                dst.put_u64_le(channel.0);
                dst.put_u64_le(node.0);
                put_str(dst, addr);
                dst.put_u64_le(*ttl_ms);
                match mode {
                    ClaimMode::Create => dst.put_u8(0),
                    ClaimMode::Renew => dst.put_u8(1),
                    ClaimMode::Takeover(old) => {
                        dst.put_u8(2);
                        dst.put_u64_le(old.0);
                    }
                }
                dst.put_u32_le(*sources);
                dst.put_u32_le(*sinks);
                dst.put_u128_le(secret.0);
            }
            Message::RegLookup { req, name } => {
                dst.put_u32_le(*req);
                put_str(dst, name);
            }
            Message::RegRemove { req, name, channel, node, secret } => {
                dst.put_u32_le(*req);
                put_str(dst, name);
                dst.put_u64_le(channel.0);
                dst.put_u64_le(node.0);
                dst.put_u128_le(secret.0);
            }
            Message::RegList { req } => dst.put_u32_le(*req),
            Message::RegReply { req, result } => {
                dst.put_u32_le(*req);
                match result {
                    RegResult::Ok => dst.put_u8(0),
                    RegResult::Entry(e) => {
                        dst.put_u8(1);
                        put_entry(dst, e);
                    }
                    RegResult::Entries(list) => {
                        dst.put_u8(2);
                        dst.put_u32_le(list.len() as u32);
                        for e in list {
                            put_entry(dst, e);
                        }
                    }
                    RegResult::Error { code, message } => {
                        dst.put_u8(3);
                        dst.put_u8(code.to_u8());
                        put_str(dst, message);
                    }
                }
            }
        }
        end_frame(dst, start);
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

/// Appends an event frame without building a [`Message`] first; this is the hot path of every submit. The result is
/// the same as encoding `Message::Event`.
pub fn encode_event(
    dst: &mut BytesMut,
    channel: ChannelId,
    source: LocalId,
    seq: u64,
    ty: &str,
    attrs: &Attrs,
    payload: &[u8],
) {
    dst.reserve(LEN_PREFIX + 1 + 8 + 4 + 8 + 4 + ty.len() + 4 + attrs.len() * 16 + payload.len());
    let start = begin_frame(dst, kind::EVENT);
    dst.put_u64_le(channel.0);
    dst.put_u32_le(source.0);
    dst.put_u64_le(seq);
    put_str(dst, ty);
    put_attrs(dst, attrs);
    dst.put_slice(payload);
    end_frame(dst, start);
}

/// Appends a `Routed` frame without building a [`Message`] (submit path).
pub fn encode_routed(
    dst: &mut BytesMut,
    channel: ChannelId,
    source: LocalId,
    instance: u64,
    origin: u64,
    skipped: u64,
) {
    dst.reserve(LEN_PREFIX + 1 + 8 + 4 + 8 + 8 + 8);
    let start = begin_frame(dst, kind::ROUTED);
    dst.put_u64_le(channel.0);
    dst.put_u32_le(source.0);
    dst.put_u64_le(instance);
    dst.put_u64_le(origin);
    dst.put_u64_le(skipped);
    end_frame(dst, start);
}

/// Appends a `Targets` frame without building a [`Message`] (submit path).
pub fn encode_targets(dst: &mut BytesMut, channel: ChannelId, sinks: &[LocalId]) {
    dst.reserve(LEN_PREFIX + 1 + 8 + 4 + 4 * sinks.len());
    let start = begin_frame(dst, kind::TARGETS);
    dst.put_u64_le(channel.0);
    dst.put_u32_le(sinks.len() as u32);
    for s in sinks {
        dst.put_u32_le(s.0);
    }
    end_frame(dst, start);
}

/// Appends a `Deadline` frame without building a [`Message`] (submit path).
pub fn encode_deadline(dst: &mut BytesMut, channel: ChannelId, unix_us: u64) {
    dst.reserve(LEN_PREFIX + 1 + 8 + 8);
    let start = begin_frame(dst, kind::DEADLINE);
    dst.put_u64_le(channel.0);
    dst.put_u64_le(unix_us);
    end_frame(dst, start);
}

/// Length of an encoded event frame, for size checks before encoding.
pub fn event_frame_len(ty: &str, attrs: &Attrs, payload_len: usize) -> usize {
    let mut n = LEN_PREFIX + 1 + 8 + 4 + 8 + 4 + ty.len() + 4 + payload_len;
    for (name, v) in attrs.iter() {
        n += 4 + name.len() + 1;
        n += match v {
            Value::Int(_) | Value::Float(_) => 8,
            Value::Bool(_) => 1,
            Value::Str(s) => 4 + s.len(),
            Value::Bytes(b) => 4 + b.len(),
        };
    }
    n
}

fn begin_frame(dst: &mut BytesMut, kind: u8) -> usize {
    let start = dst.len();
    dst.put_u32_le(0);
    dst.put_u8(kind);
    start
}

fn end_frame(dst: &mut BytesMut, start: usize) {
    let len = (dst.len() - start - LEN_PREFIX) as u32;
    dst[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
}

fn put_str(dst: &mut BytesMut, s: &str) {
    dst.put_u32_le(s.len() as u32);
    dst.put_slice(s.as_bytes());
}

/// Appends an attribute list in its wire encoding (also what sandboxed filters read).
pub fn encode_attrs(dst: &mut BytesMut, attrs: &Attrs) {
    put_attrs(dst, attrs)
}

fn put_attrs(dst: &mut BytesMut, attrs: &Attrs) {
    dst.put_u32_le(attrs.len() as u32);
    for (name, v) in attrs.iter() {
        put_str(dst, name);
        match v {
            Value::Int(i) => {
                dst.put_u8(0);
                dst.put_i64_le(*i);
            }
            Value::Float(f) => {
                dst.put_u8(1);
                dst.put_f64_le(*f);
            }
            Value::Bool(b) => {
                dst.put_u8(2);
                dst.put_u8(u8::from(*b));
            }
            Value::Str(s) => {
                dst.put_u8(3);
                put_str(dst, s);
            }
            Value::Bytes(b) => {
                dst.put_u8(4);
                dst.put_u32_le(b.len() as u32);
                dst.put_slice(b);
            }
        }
    }
}

fn put_snapshot(dst: &mut BytesMut, s: &NodeSnapshot) {
    dst.put_u64_le(s.version);
    dst.put_u64_le(s.instance);
    dst.put_u32_le(s.members.len() as u32);
    for m in &s.members {
        dst.put_u32_le(m.id.0);
        match &m.role {
            Role::Source => dst.put_u8(0),
            Role::Sink { types, overflow, filter } => {
                dst.put_u8(1);
                dst.put_u8(match overflow {
                    Overflow::Block => 0,
                    Overflow::DropOldest => 1,
                    Overflow::DropNewest => 2,
                });
                match types {
                    TypeFilter::All => dst.put_u8(0),
                    TypeFilter::Only(list) => {
                        dst.put_u8(1);
                        dst.put_u32_le(list.len() as u32);
                        for t in list {
                            put_str(dst, t);
                        }
                    }
                }
                match filter {
                    None => dst.put_u8(0),
                    Some(f) => {
                        dst.put_u8(1);
                        put_str(dst, f);
                    }
                }
            }
        }
        put_attrs(dst, &m.attrs);
    }
    match &s.token {
        None => dst.put_u8(0),
        Some(t) => {
            dst.put_u8(1);
            let b = t.to_bytes();
            dst.put_u32_le(b.len() as u32);
            dst.put_slice(&b);
        }
    }
}

fn put_entry(dst: &mut BytesMut, e: &RegEntry) {
    put_str(dst, &e.name);
    dst.put_u64_le(e.channel.0);
    dst.put_u64_le(e.contact.0);
    put_str(dst, &e.addr);
    dst.put_u32_le(e.sources);
    dst.put_u32_le(e.sinks);
    dst.put_u64_le(e.expires_in_ms);
}

/// Takes one complete frame off the front of `buf` and decodes it.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed then), and an error for an
/// oversized or malformed frame (the connection should then be closed; what was consumed is unspecified).
pub fn decode_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, DecodeError> {
    match split_frame(buf, max_frame)? {
        Some(frame) => decode_body(frame).map(Some),
        None => Ok(None),
    }
}

/// Takes one complete frame (kind and body, without the length prefix) off the front of `buf`.
pub fn split_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, DecodeError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame {
        return Err(DecodeError::Oversized { len, max: max_frame });
    }
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if buf.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    buf.advance(LEN_PREFIX);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Decodes one frame's kind and body (without the length prefix).
pub fn decode_body(frame: Bytes) -> Result<Message, DecodeError> {
    decode_body_with(frame, &mut TypeNames::default())
}

/// Event type names seen recently on one connection, so that decoding an event of such a type shares the name
/// instead of allocating a new one. A sender uses few types; the cache keeps the last [`TypeNames::SIZE`].
#[derive(Debug, Default)]
pub struct TypeNames {
    /// Each name's bytes (a copy the decoding thread alone reads, so that matching a name does not touch the shared
    /// name's memory, which other threads' reference counting keeps moving between cores) and the shared name.
    names: Vec<(Box<[u8]>, Arc<str>)>,
    /// The slot replaced next once the cache is full.
    next: usize,
}

impl TypeNames {
    /// How many names are kept.
    pub const SIZE: usize = 16;

    fn name(&mut self, raw: &[u8], kind: u8) -> Result<Arc<str>, DecodeError> {
        if let Some((_, n)) = self.names.iter().find(|(b, _)| **b == *raw) {
            return Ok(n.clone());
        }
        let name: Arc<str> = std::str::from_utf8(raw).map_err(|_| DecodeError::Utf8 { kind })?.into();
        let entry = (Box::from(raw), name.clone());
        if self.names.len() < Self::SIZE {
            self.names.push(entry);
        } else {
            self.names[self.next] = entry;
            self.next = (self.next + 1) % Self::SIZE;
        }
        Ok(name)
    }
}

/// True if a frame's body (as `split_frame` returns it) is an event.
pub fn is_event(frame: &[u8]) -> bool {
    frame.first() == Some(&kind::EVENT)
}

/// Decodes an event frame's body (see [`is_event`]) without building a [`Message`]: the hot path of a receiving
/// link, where moving the larger enum around cost more than the decoding.
pub fn decode_event_with(mut frame: Bytes, names: &mut TypeNames) -> Result<EventMsg, DecodeError> {
    if frame.is_empty() {
        return Err(DecodeError::Empty);
    }
    let k = frame.get_u8();
    if k != kind::EVENT {
        return Err(DecodeError::UnknownKind(k));
    }
    Reader { b: frame, kind: k }.event_msg(names)
}

/// [`decode_body`] with a connection's cache of event type names.
pub fn decode_body_with(mut frame: Bytes, names: &mut TypeNames) -> Result<Message, DecodeError> {
    if frame.is_empty() {
        return Err(DecodeError::Empty);
    }
    let k = frame.get_u8();
    if k == kind::EVENT {
        return Reader { b: frame, kind: k }.event(names);
    }
    let mut r = Reader { b: frame, kind: k };
    let msg = r.message()?;
    if !r.b.is_empty() {
        return Err(DecodeError::Trailing { kind: k, extra: r.b.len() });
    }
    Ok(msg)
}

struct Reader {
    b: Bytes,
    kind: u8,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.b.len() < n {
            Err(DecodeError::Truncated { kind: self.kind })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.b.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.b.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.b.get_u64_le())
    }
    fn u128(&mut self) -> Result<u128, DecodeError> {
        self.need(16)?;
        Ok(self.b.get_u128_le())
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.b.split_to(n))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.bytes()?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Utf8 { kind: self.kind })
    }
    /// A count of items each at least `min_size` bytes long, checked against what is left so that a list cannot claim
    /// more items than the frame could hold.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.b.len() {
            return Err(DecodeError::Truncated { kind: self.kind });
        }
        Ok(n)
    }
    /// A `list<u32>` of local ids.
    fn local_ids(&mut self) -> Result<Vec<LocalId>, DecodeError> {
        let n = self.count(4)?;
        let mut ids = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            ids.push(LocalId(self.u32()?));
        }
        Ok(ids)
    }
    fn bad(&self, what: &'static str, tag: u8) -> DecodeError {
        DecodeError::BadTag { kind: self.kind, what, tag }
    }
    fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(self.bad(what, t)),
        }
    }

    /// The body of an event frame (the hot path of every arriving event): its payload is the rest of the frame, so
    /// nothing can trail it.
    fn event(self, names: &mut TypeNames) -> Result<Message, DecodeError> {
        self.event_msg(names).map(Message::Event)
    }

    fn event_msg(mut self, names: &mut TypeNames) -> Result<EventMsg, DecodeError> {
        self.need(8 + 4 + 8 + 4)?;
        let channel = ChannelId(self.b.get_u64_le());
        let source = LocalId(self.b.get_u32_le());
        let seq = self.b.get_u64_le();
        let n = self.b.get_u32_le() as usize;
        self.need(n)?;
        let ty = names.name(&self.b[..n], self.kind)?;
        self.b.advance(n);
        let attrs = self.attrs()?;
        let payload = self.b;
        Ok(EventMsg { channel, source, seq, ty, attrs, payload })
    }

    fn attrs(&mut self) -> Result<Attrs, DecodeError> {
        let n = self.count(5)?;
        let mut v = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            let name = self.string()?;
            let value = match self.u8()? {
                0 => Value::Int(self.u64()? as i64),
                1 => Value::Float(f64::from_bits(self.u64()?)),
                2 => Value::Bool(self.flag("bool")?),
                3 => Value::Str(self.string()?),
                4 => Value::Bytes(self.bytes()?),
                t => return Err(self.bad("value", t)),
            };
            v.push((name, value));
        }
        Ok(Attrs(v))
    }

    fn snapshot(&mut self) -> Result<NodeSnapshot, DecodeError> {
        let version = self.u64()?;
        let instance = self.u64()?;
        let n = self.count(9)?;
        let mut members = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            let id = LocalId(self.u32()?);
            let role = match self.u8()? {
                0 => Role::Source,
                1 => {
                    let overflow = match self.u8()? {
                        0 => Overflow::Block,
                        1 => Overflow::DropOldest,
                        2 => Overflow::DropNewest,
                        t => return Err(self.bad("overflow", t)),
                    };
                    let types = match self.u8()? {
                        0 => TypeFilter::All,
                        1 => {
                            let n = self.count(4)?;
                            let mut list = Vec::with_capacity(n.min(PREALLOC));
                            for _ in 0..n {
                                list.push(self.string()?);
                            }
                            TypeFilter::Only(list)
                        }
                        t => return Err(self.bad("type filter", t)),
                    };
                    let filter = if self.flag("content filter")? { Some(self.string()?) } else { None };
                    Role::Sink { types, overflow, filter }
                }
                t => return Err(self.bad("role", t)),
            };
            let attrs = self.attrs()?;
            members.push(MemberInfo { id, role, attrs });
        }
        let token = if self.flag("token")? {
            let raw = self.bytes()?;
            Some(std::sync::Arc::new(Token::from_bytes(&raw).map_err(|_| self.bad("token", 0))?))
        } else {
            None
        };
        Ok(NodeSnapshot { version, instance, members, token })
    }

    fn entry(&mut self) -> Result<RegEntry, DecodeError> {
        Ok(RegEntry {
            name: self.string()?,
            channel: ChannelId(self.u64()?),
            contact: NodeId(self.u64()?),
            addr: self.string()?,
            sources: self.u32()?,
            sinks: self.u32()?,
            expires_in_ms: self.u64()?,
        })
    }

    fn message(&mut self) -> Result<Message, DecodeError> {
        use kind::*;
        Ok(match self.kind {
            HELLO => {
                let magic = self.u32()?;
                if magic != MAGIC {
                    return Err(DecodeError::BadTag { kind: self.kind, what: "magic", tag: (magic >> 24) as u8 });
                }
                let version = self.u16()?;
                let node = NodeId(self.u64()?);
                let addr = self.string()?;
                let purpose = match self.u8()? {
                    0 => Purpose::Node,
                    1 => Purpose::Registry,
                    2 => Purpose::RegistryPeer,
                    t => return Err(self.bad("purpose", t)),
                };
                Message::Hello { version, node, addr, purpose }
            }
            HELLO_ACK => Message::HelloAck { version: self.u16()?, node: NodeId(self.u64()?) },
            CLOSE => Message::Close { code: CloseCode::from_u16(self.u16()?), reason: self.string()? },
            PING => Message::Ping(self.u64()?),
            PONG => Message::Pong(self.u64()?),
            PROOF => {
                self.need(96)?;
                let mut key = [0u8; 32];
                let mut sig = [0u8; 64];
                self.b.copy_to_slice(&mut key);
                self.b.copy_to_slice(&mut sig);
                Message::Proof { key, sig }
            }
            PROBE_HELLO => {
                let magic = self.u32()?;
                if magic != MAGIC {
                    return Err(DecodeError::BadTag { kind: self.kind, what: "magic", tag: (magic >> 24) as u8 });
                }
                Message::ProbeHello {
                    version: self.u16()?,
                    from: NodeId(self.u64()?),
                    to: NodeId(self.u64()?),
                    channel: ChannelId(self.u64()?),
                    nonce: self.u64()?,
                }
            }
            JOIN_REQUEST => Message::JoinRequest {
                channel: ChannelId(self.u64()?),
                addr: self.string()?,
                snapshot: self.snapshot()?,
            },
            JOIN_ACCEPT => {
                let channel = ChannelId(self.u64()?);
                let contact = NodeId(self.u64()?);
                let secret = ChannelSecret(self.u128()?);
                let n = self.count(24)?;
                let mut nodes = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    nodes.push(PeerEntry {
                        node: NodeId(self.u64()?),
                        addr: self.string()?,
                        snapshot: self.snapshot()?,
                    });
                }
                let policy = if self.flag("policy")? {
                    self.need(33)?;
                    let mut authority = [0u8; 32];
                    self.b.copy_to_slice(&mut authority);
                    let bits = self.u8()?;
                    let require = Roles::from_bits(bits).ok_or_else(|| self.bad("roles", bits))?;
                    Some(Policy { authority, require })
                } else {
                    None
                };
                Message::JoinAccept { channel, contact, secret, nodes, policy }
            }
            JOIN_REFUSED => Message::JoinRefused { channel: ChannelId(self.u64()?), reason: self.string()? },
            JOIN_REDIRECT => Message::JoinRedirect { channel: ChannelId(self.u64()?) },
            SNAPSHOT => {
                let channel = ChannelId(self.u64()?);
                let node = NodeId(self.u64()?);
                let addr = self.string()?;
                let snapshot = self.snapshot()?;
                let flags = self.u8()?;
                if flags > 3 {
                    return Err(self.bad("snapshot flags", flags));
                }
                Message::Snapshot { channel, node, addr, snapshot, left: flags & 1 != 0, reply: flags & 2 != 0 }
            }
            EVENT => unreachable!("decoded by Reader::event"),
            LAGGED => {
                let channel = ChannelId(self.u64()?);
                let source = LocalId(self.u32()?);
                let instance = self.u64()?;
                let count = self.u64()?;
                let sinks = self.local_ids()?;
                Message::Lagged { channel, source, instance, count, sinks }
            }
            SOURCE_END => {
                let channel = ChannelId(self.u64()?);
                let origin = NodeId(self.u64()?);
                let origin_instance = self.u64()?;
                let source = LocalId(self.u32()?);
                let last = self.u64()?;
                let n = self.count(28)?;
                let mut dests = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    let node = NodeId(self.u64()?);
                    let instance = self.u64()?;
                    let routed = self.u64()?;
                    let m = self.count(12)?;
                    let mut missed = Vec::with_capacity(m.min(PREALLOC));
                    for _ in 0..m {
                        missed.push((LocalId(self.u32()?), self.u64()?));
                    }
                    dests.push(EndDest { node, instance, routed, missed });
                }
                Message::SourceEnd { channel, origin, origin_instance, source, last, dests }
            }
            ROUTED => Message::Routed {
                channel: ChannelId(self.u64()?),
                source: LocalId(self.u32()?),
                instance: self.u64()?,
                origin: self.u64()?,
                skipped: self.u64()?,
            },
            INSTALL_FILTER => Message::InstallFilter {
                channel: ChannelId(self.u64()?),
                req: self.u32()?,
                kind: match self.u8()? {
                    0 => FilterKind::Out,
                    1 => FilterKind::In,
                    t => return Err(self.bad("filter kind", t)),
                },
                module: self.bytes()?,
            },
            FILTER_STATUS => Message::FilterStatus {
                channel: ChannelId(self.u64()?),
                req: self.u32()?,
                ok: self.flag("ok")?,
                message: self.string()?,
            },
            TARGETS => {
                let channel = ChannelId(self.u64()?);
                let sinks = self.local_ids()?;
                Message::Targets { channel, sinks }
            }
            DEADLINE => Message::Deadline { channel: ChannelId(self.u64()?), unix_us: self.u64()? },
            PRIORITY => Message::Priority { channel: ChannelId(self.u64()?), level: self.u8()? },
            GOSSIP => {
                let channel = ChannelId(self.u64()?);
                let (addrs, body) = self.gossip()?;
                Message::Gossip { channel, addrs, body }
            }
            VIEW_SYNC => {
                let channel = ChannelId(self.u64()?);
                let count = self.u32()?;
                let hash = self.u64()?;
                let quiet_ms = self.u32()?;
                let list = match self.u8()? {
                    0 => None,
                    t @ (1 | 2) => {
                        let n = self.count(17)?;
                        let mut entries = Vec::with_capacity(n.min(PREALLOC));
                        for _ in 0..n {
                            let node = NodeId(self.u64()?);
                            let version = self.u64()?;
                            let left = self.flag("view entry left")?;
                            entries.push(ViewEntry { node, version, left });
                        }
                        Some((t == 2, entries))
                    }
                    t => return Err(self.bad("view sync list", t)),
                };
                Message::ViewSync { channel, count, hash, quiet_ms, list }
            }
            EXPIRED => {
                let channel = ChannelId(self.u64()?);
                let source = LocalId(self.u32()?);
                let seq = self.u64()?;
                let ty = self.string()?;
                let sinks = self.local_ids()?;
                Message::Expired { channel, source, seq, ty, sinks }
            }
            REG_CLAIM => {
                let req = self.u32()?;
                let name = self.string()?;
                let channel = ChannelId(self.u64()?);
                let node = NodeId(self.u64()?);
                let addr = self.string()?;
                let ttl_ms = self.u64()?;
                let mode = match self.u8()? {
                    0 => ClaimMode::Create,
                    1 => ClaimMode::Renew,
                    2 => ClaimMode::Takeover(NodeId(self.u64()?)),
                    t => return Err(self.bad("claim mode", t)),
                };
                let sources = self.u32()?;
                let sinks = self.u32()?;
                let secret = ChannelSecret(self.u128()?);
                Message::RegClaim { req, name, channel, node, addr, ttl_ms, mode, sources, sinks, secret }
            }
            REG_LOOKUP => Message::RegLookup { req: self.u32()?, name: self.string()? },
            REG_REMOVE => Message::RegRemove {
                req: self.u32()?,
                name: self.string()?,
                channel: ChannelId(self.u64()?),
                node: NodeId(self.u64()?),
                secret: ChannelSecret(self.u128()?),
            },
            REG_LIST => Message::RegList { req: self.u32()? },
            REG_REPLY => {
                let req = self.u32()?;
                let result = match self.u8()? {
                    0 => RegResult::Ok,
                    1 => RegResult::Entry(self.entry()?),
                    2 => {
                        let n = self.count(40)?;
                        let mut list = Vec::with_capacity(n.min(PREALLOC));
                        for _ in 0..n {
                            list.push(self.entry()?);
                        }
                        RegResult::Entries(list)
                    }
                    3 => RegResult::Error { code: RegErrorCode::from_u8(self.u8()?), message: self.string()? },
                    t => return Err(self.bad("registry result", t)),
                };
                Message::RegReply { req, result }
            }
            k => return Err(DecodeError::UnknownKind(k)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(m: Message) {
        let mut b = BytesMut::new();
        m.encode(&mut b);
        let got = decode_frame(&mut b, MAX_FRAME_DEFAULT).unwrap().unwrap();
        assert_eq!(got, m);
        assert!(b.is_empty());
    }

    #[test]
    fn event_round_trip() {
        check(Message::Event(EventMsg {
            channel: ChannelId(7),
            source: LocalId(3),
            seq: 42,
            ty: "load".into(),
            attrs: Attrs::new().with("cpu", 0.5).with("zone", "a").with("n", 3i64).with("ok", true),
            payload: Bytes::from_static(b"hello"),
        }));
    }

    #[test]
    fn partial_frame_needs_more() {
        let mut b = BytesMut::new();
        Message::Ping(9).encode(&mut b);
        let full = b.clone();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode_frame(&mut part, MAX_FRAME_DEFAULT), Ok(None));
            assert_eq!(part.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn oversized_is_refused_before_reading_body() {
        let mut b = BytesMut::new();
        b.put_u32_le(1 << 30);
        assert_eq!(
            decode_frame(&mut b, MAX_FRAME_DEFAULT),
            Err(DecodeError::Oversized { len: 1 << 30, max: MAX_FRAME_DEFAULT })
        );
    }

    #[test]
    fn lying_count_does_not_allocate() {
        let mut b = BytesMut::new();
        b.put_u32_le(1 + 4 + 1 + 4);
        b.put_u8(kind::EVENT);
        b.put_u32_le(u32::MAX);
        b.put_u8(0);
        b.put_u32_le(u32::MAX);
        assert!(matches!(decode_frame(&mut b, MAX_FRAME_DEFAULT), Err(DecodeError::Truncated { .. })));
    }

    fn event_frame(ty: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        let start = begin_frame(&mut b, kind::EVENT);
        b.put_u64_le(1);
        b.put_u32_le(2);
        b.put_u64_le(3);
        b.put_u32_le(ty.len() as u32);
        b.put_slice(ty);
        b.put_u32_le(0);
        b.put_slice(b"payload");
        end_frame(&mut b, start);
        b.freeze().slice(LEN_PREFIX..)
    }

    fn decoded_ty(frame: Bytes, names: &mut TypeNames) -> Arc<str> {
        match decode_body_with(frame, names) {
            Ok(Message::Event(e)) => {
                assert_eq!(&e.payload[..], b"payload");
                e.ty
            }
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn type_names_are_shared_and_evicted() {
        let mut names = TypeNames::default();
        let a = decoded_ty(event_frame(b"load"), &mut names);
        let b = decoded_ty(event_frame(b"load"), &mut names);
        assert_eq!(&*a, "load");
        assert!(Arc::ptr_eq(&a, &b), "a cached name is shared");
        // More types than the cache holds: every name still decodes right, and "load" is evicted.
        for i in 0..TypeNames::SIZE {
            let ty = format!("t{i}");
            assert_eq!(&*decoded_ty(event_frame(ty.as_bytes()), &mut names), ty);
        }
        let c = decoded_ty(event_frame(b"load"), &mut names);
        assert_eq!(&*c, "load");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(
            decode_body_with(event_frame(b"\xff\xfe"), &mut names),
            Err(DecodeError::Utf8 { kind: kind::EVENT })
        );
        assert_eq!(
            decode_body_with(event_frame(b"x").slice(..10), &mut names),
            Err(DecodeError::Truncated { kind: kind::EVENT })
        );
    }
}
