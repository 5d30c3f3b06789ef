//! Writes seed inputs for the fuzzers: one encoded frame of every message kind, and a few join conversations.
//! `cargo run -p kecho-proto --example fuzz_seeds -- fuzz/corpus`

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use kecho_proto::codec::*;
use kecho_proto::*;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));
    let sink = MemberInfo {
        id: LocalId(2),
        role: Role::Sink {
            types: TypeFilter::Only(vec!["load".into()]),
            overflow: Overflow::DropOldest,
            filter: Some("cpu > 0.5".into()),
        },
        attrs: Attrs::new().with("zone", "a"),
    };
    let source = MemberInfo { id: LocalId(1), role: Role::Source, attrs: Attrs::new() };
    let snap = NodeSnapshot { version: 3, instance: 0x1234_5678, members: vec![source, sink], token: None };
    let ch = ChannelId(1);
    let entry = RegEntry {
        name: "fuzz".into(),
        channel: ch,
        contact: NodeId(25),
        addr: "127.0.0.1:2".into(),
        sources: 1,
        sinks: 1,
        expires_in_ms: 900,
    };
    let msgs = vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            node: NodeId(25),
            addr: "127.0.0.1:2".into(),
            purpose: Purpose::Node,
        },
        Message::HelloAck { version: PROTOCOL_VERSION, node: NodeId(25) },
        Message::Close { code: CloseCode::Duplicate, reason: "dup".into() },
        Message::Ping(1),
        handshake::Identity::from_secret([1; 32]).hello_proof(NodeId(25), "127.0.0.1:2"),
        Message::Pong(1),
        Message::JoinRequest { channel: ch, addr: "127.0.0.1:3".into(), snapshot: snap.clone() },
        Message::JoinAccept {
            channel: ch,
            contact: NodeId(25),
            secret: ChannelSecret(3),
            nodes: vec![PeerEntry { node: NodeId(75), addr: "127.0.0.1:4".into(), snapshot: snap.clone() }],
            policy: Some(access::Policy { authority: [5; 32], require: access::Roles::ALL }),
        },
        Message::JoinRefused { channel: ch, reason: "no credential".into() },
        Message::JoinRedirect { channel: ch },
        Message::Snapshot {
            channel: ch,
            node: NodeId(75),
            addr: "127.0.0.1:4".into(),
            snapshot: snap.clone(),
            left: false,
            reply: true,
        },
        Message::Snapshot {
            channel: ch,
            node: NodeId(25),
            addr: "127.0.0.1:2".into(),
            snapshot: snap.clone(),
            left: true,
            reply: false,
        },
        Message::Event(EventMsg {
            channel: ch,
            source: LocalId(1),
            seq: 7,
            ty: "load".into(),
            attrs: Attrs::new()
                .with("cpu", 0.5)
                .with("n", 3i64)
                .with("ok", true)
                .with("b", Bytes::from_static(b"\x00\x01")),
            payload: Bytes::from_static(b"payload"),
        }),
        Message::Lagged { channel: ch, source: LocalId(1), instance: 3, count: 9, sinks: vec![LocalId(2)] },
        Message::Routed { channel: ch, source: LocalId(1), instance: 3, origin: 5, skipped: 4 },
        Message::SourceEnd {
            channel: ch,
            origin: NodeId(4),
            origin_instance: 5,
            source: LocalId(1),
            last: 40,
            dests: vec![codec::EndDest { node: NodeId(6), instance: 3, routed: 30, missed: vec![(LocalId(2), 9)] }],
        },
        Message::Targets { channel: ch, sinks: vec![LocalId(2), LocalId(5)] },
        Message::InstallFilter {
            channel: ch,
            req: 3,
            kind: FilterKind::Out,
            module: Bytes::from_static(b"\0asm\x01\0\0\0"),
        },
        Message::FilterStatus { channel: ch, req: 3, ok: false, message: "trap".into() },
        Message::RegClaim {
            req: 1,
            name: "fuzz".into(),
            channel: ch,
            node: NodeId(25),
            addr: "127.0.0.1:2".into(),
            ttl_ms: 900,
            mode: ClaimMode::Takeover(NodeId(75)),
            sources: 1,
            sinks: 2,
            secret: ChannelSecret(3),
        },
        Message::RegLookup { req: 2, name: "fuzz".into() },
        Message::RegRemove { req: 3, name: "fuzz".into(), channel: ch, node: NodeId(25), secret: ChannelSecret(3) },
        Message::RegList { req: 4 },
        Message::RegReply { req: 5, result: RegResult::Entry(entry.clone()) },
        Message::RegReply { req: 6, result: RegResult::Entries(vec![entry.clone(), entry]) },
        Message::RegReply { req: 7, result: RegResult::Error { code: RegErrorCode::NotContact, message: "no".into() } },
        Message::RegReply { req: 8, result: RegResult::Ok },
    ];
    for target in ["decode_frame", "membership", "handshake"] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (i, m) in msgs.iter().enumerate() {
            // The membership target reads a control byte before each frame.
            let mut b = BytesMut::new();
            if target == "membership" {
                b.extend_from_slice(&[(i as u8) * 5 + 3]);
            }
            m.encode(&mut b);
            std::fs::write(dir.join(format!("seed-{i:02}")), &b)?;
        }
        // A whole conversation in one input.
        let mut all = BytesMut::new();
        for (i, m) in msgs.iter().enumerate() {
            if target == "membership" {
                all.extend_from_slice(&[(i as u8) * 7 + 2]);
            }
            m.encode(&mut all);
        }
        std::fs::write(dir.join("seed-all"), &all)?;
    }
    Ok(())
}
