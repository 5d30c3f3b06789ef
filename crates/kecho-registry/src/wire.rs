//! The frames replicas send each other after their `Hello{purpose: RegistryPeer}` (docs/PROTOCOL.md, "Replicated
//! registry"). Every frame is `u32 length (LE) | u8 kind | body`; integers are little-endian; a registry request
//! inside an entry or a snapshot is a whole kecho frame (its own length prefix included).

use bytes::{Buf, BufMut, BytesMut};
use kecho_proto::codec::{decode_frame, Message};

use crate::raft::{Command, Entry, PeerMsg, Snapshot};
use crate::MAX_REGISTRY_FRAME;

/// Largest replica frame: a snapshot of a large table, or a batch of entries.
pub const MAX_PEER_FRAME: usize = 64 << 20;

const HELLO: u8 = 0;
const VOTE: u8 = 1;
const VOTE_REPLY: u8 = 2;
const APPEND: u8 = 3;
const APPEND_REPLY: u8 = 4;
const INSTALL: u8 = 5;

/// A frame between replicas: the opening one, or a Raft message.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerFrame {
    /// The first frame on a replica connection: the sender's own address and the whole sorted list of replicas it
    /// was started with (a replica refuses a peer with another list: two lists would make two majorities).
    Hello {
        /// The sender's address.
        me: String,
        /// Every replica's address, sorted.
        members: Vec<String>,
    },
    /// A Raft message.
    Raft(PeerMsg),
}

/// A replica frame that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame ends before its fields do.
    #[error("replica frame truncated")]
    Truncated,
    /// The length prefix exceeds [`MAX_PEER_FRAME`] or is zero.
    #[error("replica frame of {0} bytes is empty or too large")]
    Length(usize),
    /// An unknown frame kind or tag.
    #[error("unknown {what} {tag} in a replica frame")]
    Tag {
        /// Which field.
        what: &'static str,
        /// Its value.
        tag: u8,
    },
    /// A registry request inside it does not decode, or is not a registry request.
    #[error("bad registry request in a replica frame: {0}")]
    Request(String),
    /// A string is not UTF-8.
    #[error("replica frame string is not UTF-8")]
    Utf8,
}

impl PeerFrame {
    /// Appends the frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u32_le(0);
        match self {
            PeerFrame::Hello { me, members } => {
                dst.put_u8(HELLO);
                put_str(dst, me);
                dst.put_u32_le(members.len() as u32);
                for m in members {
                    put_str(dst, m);
                }
            }
            PeerFrame::Raft(PeerMsg::Vote { term, pre, last_index, last_term }) => {
                dst.put_u8(VOTE);
                dst.put_u64_le(*term);
                dst.put_u8(*pre as u8);
                dst.put_u64_le(*last_index);
                dst.put_u64_le(*last_term);
            }
            PeerFrame::Raft(PeerMsg::VoteReply { term, pre, granted }) => {
                dst.put_u8(VOTE_REPLY);
                dst.put_u64_le(*term);
                dst.put_u8(*pre as u8);
                dst.put_u8(*granted as u8);
            }
            PeerFrame::Raft(PeerMsg::Append { term, prev_index, prev_term, entries, commit, sent }) => {
                dst.put_u8(APPEND);
                for v in [*term, *prev_index, *prev_term, *commit, *sent] {
                    dst.put_u64_le(v);
                }
                dst.put_u32_le(entries.len() as u32);
                for e in entries {
                    put_entry(dst, e);
                }
            }
            PeerFrame::Raft(PeerMsg::AppendReply { term, ok, index, sent }) => {
                dst.put_u8(APPEND_REPLY);
                dst.put_u64_le(*term);
                dst.put_u8(*ok as u8);
                dst.put_u64_le(*index);
                dst.put_u64_le(*sent);
            }
            PeerFrame::Raft(PeerMsg::Install { term, snap, sent }) => {
                dst.put_u8(INSTALL);
                for v in [*term, *sent] {
                    dst.put_u64_le(v);
                }
                put_snapshot(dst, snap);
            }
        }
        let len = (dst.len() - start - 4) as u32;
        dst[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Takes one whole frame off the front of `src`: `Ok(None)` if more bytes are needed.
    pub fn decode(src: &mut BytesMut) -> Result<Option<PeerFrame>, WireError> {
        let Some(prefix) = src.get(..4) else { return Ok(None) };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len == 0 || len > MAX_PEER_FRAME {
            return Err(WireError::Length(len));
        }
        if src.len() < 4 + len {
            return Ok(None);
        }
        src.advance(4);
        let mut body = src.split_to(len);
        decode_body(&mut body).map(Some)
    }
}

fn decode_body(b: &mut BytesMut) -> Result<PeerFrame, WireError> {
    let kind = u8_(b)?;
    let msg = match kind {
        HELLO => {
            let me = string(b)?;
            let n = u32_(b)? as usize;
            let mut members = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                members.push(string(b)?);
            }
            return Ok(PeerFrame::Hello { me, members });
        }
        VOTE => PeerMsg::Vote { term: u64_(b)?, pre: bool_(b)?, last_index: u64_(b)?, last_term: u64_(b)? },
        VOTE_REPLY => PeerMsg::VoteReply { term: u64_(b)?, pre: bool_(b)?, granted: bool_(b)? },
        APPEND => {
            let (term, prev_index, prev_term, commit, sent) = (u64_(b)?, u64_(b)?, u64_(b)?, u64_(b)?, u64_(b)?);
            let n = u32_(b)? as usize;
            let mut entries = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                entries.push(get_entry(b)?);
            }
            PeerMsg::Append { term, prev_index, prev_term, entries, commit, sent }
        }
        APPEND_REPLY => PeerMsg::AppendReply { term: u64_(b)?, ok: bool_(b)?, index: u64_(b)?, sent: u64_(b)? },
        INSTALL => {
            let (term, sent) = (u64_(b)?, u64_(b)?);
            PeerMsg::Install { term, snap: get_snapshot(b)?, sent }
        }
        tag => return Err(WireError::Tag { what: "frame kind", tag }),
    };
    Ok(PeerFrame::Raft(msg))
}

/// One log entry: term, stamp, then 0 (no-op) or 1 and the request's frame.
pub(crate) fn put_entry(dst: &mut BytesMut, e: &Entry) {
    dst.put_u64_le(e.term);
    dst.put_u64_le(e.stamp);
    match &e.cmd {
        Command::Noop => dst.put_u8(0),
        Command::Request(m) => {
            dst.put_u8(1);
            m.encode(dst);
        }
    }
}

pub(crate) fn get_entry(b: &mut BytesMut) -> Result<Entry, WireError> {
    let (term, stamp) = (u64_(b)?, u64_(b)?);
    let cmd = match u8_(b)? {
        0 => Command::Noop,
        1 => Command::Request(request(b)?),
        tag => return Err(WireError::Tag { what: "command", tag }),
    };
    Ok(Entry { term, stamp, cmd })
}

/// A snapshot: index, term, stamp, then the claims.
pub(crate) fn put_snapshot(dst: &mut BytesMut, snap: &Snapshot) {
    for v in [snap.index, snap.term, snap.stamp] {
        dst.put_u64_le(v);
    }
    dst.put_u32_le(snap.claims.len() as u32);
    for m in &snap.claims {
        m.encode(dst);
    }
}

pub(crate) fn get_snapshot(b: &mut BytesMut) -> Result<Snapshot, WireError> {
    let (index, term, stamp) = (u64_(b)?, u64_(b)?, u64_(b)?);
    let n = u32_(b)? as usize;
    let mut claims = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        claims.push(request(b)?);
    }
    Ok(Snapshot { index, term, stamp, claims })
}

/// A whole kecho frame holding a registry request that changes the table.
fn request(b: &mut BytesMut) -> Result<Message, WireError> {
    match decode_frame(b, MAX_REGISTRY_FRAME) {
        Ok(Some(m @ (Message::RegClaim { .. } | Message::RegRemove { .. } | Message::RegLookup { .. }))) => Ok(m),
        Ok(Some(m @ Message::RegList { .. })) => Ok(m),
        Ok(Some(other)) => Err(WireError::Request(format!("message kind {}", other.kind()))),
        Ok(None) => Err(WireError::Truncated),
        Err(e) => Err(WireError::Request(e.to_string())),
    }
}

fn need(b: &BytesMut, n: usize) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

pub(crate) fn u8_(b: &mut BytesMut) -> Result<u8, WireError> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn bool_(b: &mut BytesMut) -> Result<bool, WireError> {
    match u8_(b)? {
        0 => Ok(false),
        1 => Ok(true),
        tag => Err(WireError::Tag { what: "boolean", tag }),
    }
}

fn u32_(b: &mut BytesMut) -> Result<u32, WireError> {
    need(b, 4)?;
    Ok(b.get_u32_le())
}

pub(crate) fn u64_(b: &mut BytesMut) -> Result<u64, WireError> {
    need(b, 8)?;
    Ok(b.get_u64_le())
}

fn put_str(dst: &mut BytesMut, s: &str) {
    dst.put_u32_le(s.len() as u32);
    dst.put_slice(s.as_bytes());
}

fn string(b: &mut BytesMut) -> Result<String, WireError> {
    let n = u32_(b)? as usize;
    need(b, n)?;
    String::from_utf8(b.split_to(n).to_vec()).map_err(|_| WireError::Utf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kecho_proto::codec::ClaimMode;
    use kecho_proto::{ChannelId, ChannelSecret, NodeId};

    fn claim() -> Message {
        Message::RegClaim {
            req: 9,
            name: "ch".into(),
            channel: ChannelId(1),
            node: NodeId(2),
            addr: "127.0.0.1:5".into(),
            ttl_ms: 1000,
            mode: ClaimMode::Create,
            sources: 1,
            sinks: 0,
            secret: ChannelSecret(3),
        }
    }

    #[test]
    fn every_frame_round_trips_and_every_prefix_asks_for_more() {
        let frames = vec![
            PeerFrame::Hello { me: "a:1".into(), members: vec!["a:1".into(), "b:2".into()] },
            PeerFrame::Raft(PeerMsg::Vote { term: 3, pre: true, last_index: 4, last_term: 2 }),
            PeerFrame::Raft(PeerMsg::VoteReply { term: 3, pre: false, granted: true }),
            PeerFrame::Raft(PeerMsg::Append {
                term: 5,
                prev_index: 6,
                prev_term: 4,
                entries: vec![
                    Entry { term: 5, stamp: 77, cmd: Command::Noop },
                    Entry { term: 5, stamp: 78, cmd: Command::Request(claim()) },
                ],
                commit: 6,
                sent: 99,
            }),
            PeerFrame::Raft(PeerMsg::AppendReply { term: 5, ok: false, index: 2, sent: 99 }),
            PeerFrame::Raft(PeerMsg::Install {
                term: 5,
                snap: Snapshot { index: 10, term: 4, stamp: 1234, claims: vec![claim()] },
                sent: 1,
            }),
        ];
        for f in frames {
            let mut buf = BytesMut::new();
            f.encode(&mut buf);
            let whole = buf.clone();
            for cut in 0..whole.len() {
                let mut part = BytesMut::from(&whole[..cut]);
                assert!(matches!(PeerFrame::decode(&mut part), Ok(None) | Err(WireError::Truncated)), "{f:?} {cut}");
            }
            assert_eq!(PeerFrame::decode(&mut buf).expect("decodes"), Some(f));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut bytes = BytesMut::new();
            let n = (seed % 64) as usize;
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.put_u8(seed as u8);
            }
            let len = bytes.len().saturating_sub(4) as u32;
            if bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&len.to_le_bytes());
            }
            let _ = PeerFrame::decode(&mut bytes);
        }
    }
}
