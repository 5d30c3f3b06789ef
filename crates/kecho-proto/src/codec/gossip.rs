//! The `Gossip` frame's body: one [`GossipMsg`] of a channel in tree mode, with the addresses of the nodes it names
//! (docs/PROTOCOL.md, "Tree mode").

use bytes::{BufMut, BytesMut};

use super::{put_str, Reader, PREALLOC};
use crate::gossip::{EventId, GossipMsg};
use crate::types::NodeId;

const JOIN: u8 = 0;
const FORWARD_JOIN: u8 = 1;
const NEIGHBOR: u8 = 2;
const NEIGHBOR_REPLY: u8 = 3;
const DISCONNECT: u8 = 4;
const SHUFFLE: u8 = 5;
const SHUFFLE_REPLY: u8 = 6;
const EVENT: u8 = 7;
const IHAVE: u8 = 8;
const GRAFT: u8 = 9;
const PRUNE: u8 = 10;
const PROBE: u8 = 11;
const PROBE_ACK: u8 = 12;
const SUSPECT: u8 = 13;

/// Appends the address list and the message (everything after the channel id).
pub(super) fn put_gossip(dst: &mut BytesMut, addrs: &[(NodeId, String)], body: &GossipMsg) {
    dst.put_u32_le(addrs.len() as u32);
    for (node, addr) in addrs {
        dst.put_u64_le(node.0);
        put_str(dst, addr);
    }
    match body {
        GossipMsg::Join => dst.put_u8(JOIN),
        GossipMsg::ForwardJoin { joiner, ttl } => {
            dst.put_u8(FORWARD_JOIN);
            dst.put_u64_le(joiner.0);
            dst.put_u8(*ttl);
        }
        GossipMsg::Neighbor { high } => {
            dst.put_u8(NEIGHBOR);
            dst.put_u8(u8::from(*high));
        }
        GossipMsg::NeighborReply { accepted } => {
            dst.put_u8(NEIGHBOR_REPLY);
            dst.put_u8(u8::from(*accepted));
        }
        GossipMsg::Disconnect => dst.put_u8(DISCONNECT),
        GossipMsg::Shuffle { origin, ttl, peers, back } => {
            dst.put_u8(SHUFFLE);
            dst.put_u64_le(origin.0);
            dst.put_u8(*ttl);
            put_nodes(dst, peers);
            put_nodes(dst, back);
        }
        GossipMsg::ShuffleReply { peers, back } => {
            dst.put_u8(SHUFFLE_REPLY);
            put_nodes(dst, peers);
            put_nodes(dst, back);
        }
        GossipMsg::Event { id, hops, payload } => {
            dst.put_u8(EVENT);
            dst.put_u64_le(id.source.0);
            dst.put_u64_le(id.seq);
            dst.put_u16_le(*hops);
            dst.put_slice(payload);
        }
        GossipMsg::IHave { ids } => {
            dst.put_u8(IHAVE);
            dst.put_u32_le(ids.len() as u32);
            for id in ids {
                dst.put_u64_le(id.source.0);
                dst.put_u64_le(id.seq);
            }
        }
        GossipMsg::Graft { id } => {
            dst.put_u8(GRAFT);
            dst.put_u64_le(id.source.0);
            dst.put_u64_le(id.seq);
        }
        GossipMsg::Prune { source } => {
            dst.put_u8(PRUNE);
            dst.put_u64_le(source.0);
        }
        GossipMsg::Probe { nonce } => {
            dst.put_u8(PROBE);
            dst.put_u64_le(*nonce);
        }
        GossipMsg::ProbeAck { nonce } => {
            dst.put_u8(PROBE_ACK);
            dst.put_u64_le(*nonce);
        }
        GossipMsg::Suspect { node, version } => {
            dst.put_u8(SUSPECT);
            dst.put_u64_le(node.0);
            dst.put_u64_le(*version);
        }
    }
}

fn put_nodes(dst: &mut BytesMut, nodes: &[NodeId]) {
    dst.put_u32_le(nodes.len() as u32);
    for n in nodes {
        dst.put_u64_le(n.0);
    }
}

impl Reader {
    /// The address list and the message (everything after the channel id). An event's payload is the rest of the
    /// frame.
    pub(super) fn gossip(&mut self) -> Result<(Vec<(NodeId, String)>, GossipMsg), super::DecodeError> {
        let n = self.count(12)?;
        let mut addrs = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            addrs.push((NodeId(self.u64()?), self.string()?));
        }
        let body = match self.u8()? {
            JOIN => GossipMsg::Join,
            FORWARD_JOIN => GossipMsg::ForwardJoin { joiner: NodeId(self.u64()?), ttl: self.u8()? },
            NEIGHBOR => GossipMsg::Neighbor { high: self.flag("neighbor priority")? },
            NEIGHBOR_REPLY => GossipMsg::NeighborReply { accepted: self.flag("neighbor reply")? },
            DISCONNECT => GossipMsg::Disconnect,
            SHUFFLE => {
                let origin = NodeId(self.u64()?);
                let ttl = self.u8()?;
                GossipMsg::Shuffle { origin, ttl, peers: self.nodes()?, back: self.nodes()? }
            }
            SHUFFLE_REPLY => GossipMsg::ShuffleReply { peers: self.nodes()?, back: self.nodes()? },
            EVENT => {
                let id = EventId { source: NodeId(self.u64()?), seq: self.u64()? };
                let hops = self.u16()?;
                let payload = std::mem::take(&mut self.b);
                GossipMsg::Event { id, hops, payload }
            }
            IHAVE => {
                let n = self.count(16)?;
                let mut ids = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    ids.push(EventId { source: NodeId(self.u64()?), seq: self.u64()? });
                }
                GossipMsg::IHave { ids }
            }
            GRAFT => GossipMsg::Graft { id: EventId { source: NodeId(self.u64()?), seq: self.u64()? } },
            PRUNE => GossipMsg::Prune { source: NodeId(self.u64()?) },
            PROBE => GossipMsg::Probe { nonce: self.u64()? },
            PROBE_ACK => GossipMsg::ProbeAck { nonce: self.u64()? },
            SUSPECT => GossipMsg::Suspect { node: NodeId(self.u64()?), version: self.u64()? },
            t => return Err(self.bad("gossip message", t)),
        };
        Ok((addrs, body))
    }

    fn nodes(&mut self) -> Result<Vec<NodeId>, super::DecodeError> {
        let n = self.count(8)?;
        let mut v = Vec::with_capacity(n.min(PREALLOC));
        for _ in 0..n {
            v.push(NodeId(self.u64()?));
        }
        Ok(v)
    }
}
