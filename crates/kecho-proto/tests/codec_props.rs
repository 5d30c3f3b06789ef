//! Codec properties that `codec_roundtrip.rs` does not cover: the filter messages (`InstallFilter`, `FilterStatus`),
//! one hand-written example of every message kind (an exhaustive `match` makes a new variant fail to compile here
//! until it has an example), the normalisation of numeric codes that have names, NaN payloads, and the frame limit.

use bytes::{BufMut, Bytes, BytesMut};
use kecho_proto::access::{Authority, Policy, Roles};
use kecho_proto::codec::*;
use kecho_proto::gossip::{EventId, GossipMsg};
use kecho_proto::*;
use proptest::collection::vec;
use proptest::prelude::*;

/// Decodes frames until the buffer asks for more or fails; the step bound proves the decoder cannot loop forever.
fn drain(buf: &mut BytesMut) -> (Vec<Message>, Option<DecodeError>) {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        match decode_frame(buf, 1 << 20) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
    panic!("decoder did not stop");
}

fn filter_message() -> impl Strategy<Value = Message> {
    let kind = prop_oneof![Just(FilterKind::Out), Just(FilterKind::In)];
    prop_oneof![
        (any::<u64>(), any::<u32>(), kind, vec(any::<u8>(), 0..256)).prop_map(|(ch, req, kind, module)| {
            Message::InstallFilter { channel: ChannelId(ch), req, kind, module: Bytes::from(module) }
        }),
        (any::<u64>(), any::<u32>(), any::<bool>(), ".{0,40}")
            .prop_map(|(ch, req, ok, message)| { Message::FilterStatus { channel: ChannelId(ch), req, ok, message } }),
    ]
}

/// Names the variant; no wildcard arm, so that adding a `Message` variant breaks this file until `one_of_each` has
/// an example of it.
fn variant(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::HelloAck { .. } => "HelloAck",
        Message::Close { .. } => "Close",
        Message::Ping(_) => "Ping",
        Message::Pong(_) => "Pong",
        Message::Proof { .. } => "Proof",
        Message::ProbeHello { .. } => "ProbeHello",
        Message::JoinRequest { .. } => "JoinRequest",
        Message::JoinAccept { .. } => "JoinAccept",
        Message::JoinRefused { .. } => "JoinRefused",
        Message::JoinRedirect { .. } => "JoinRedirect",
        Message::Snapshot { .. } => "Snapshot",
        Message::Event(_) => "Event",
        Message::Targets { .. } => "Targets",
        Message::InstallFilter { .. } => "InstallFilter",
        Message::FilterStatus { .. } => "FilterStatus",
        Message::Lagged { .. } => "Lagged",
        Message::Routed { .. } => "Routed",
        Message::RegClaim { .. } => "RegClaim",
        Message::RegLookup { .. } => "RegLookup",
        Message::RegRemove { .. } => "RegRemove",
        Message::RegList { .. } => "RegList",
        Message::RegReply { .. } => "RegReply",
        Message::SourceEnd { .. } => "SourceEnd",
        Message::Deadline { .. } => "Deadline",
        Message::Expired { .. } => "Expired",
        Message::Gossip { .. } => "Gossip",
        Message::Priority { .. } => "Priority",
        Message::ViewSync { .. } => "ViewSync",
    }
}

const VARIANTS: usize = 29;

fn one_of_each() -> Vec<Message> {
    let sink = MemberInfo {
        id: LocalId(2),
        role: Role::Sink {
            types: TypeFilter::Only(vec!["load".into(), "".into()]),
            overflow: Overflow::Block,
            filter: Some("attrs.cpu > 0.5".into()),
        },
        attrs: Attrs::new().with("zone", "eu").with("w", 3i64),
    };
    let source = MemberInfo { id: LocalId(1), role: Role::Source, attrs: Attrs::new() };
    let holder = handshake::Identity::from_secret([3; 32]).public_key();
    let token = Authority::from_secret([4; 32]).grant("chan", Roles::SOURCE.union(Roles::SINK), holder, 99).unwrap();
    let snapshot = NodeSnapshot { version: 7, instance: 0, members: vec![source, sink], token: Some(token.into()) };
    let entry = RegEntry {
        name: "chan".into(),
        channel: ChannelId(9),
        contact: NodeId(3),
        addr: "10.0.0.1:7000".into(),
        sources: 1,
        sinks: 2,
        expires_in_ms: 9000,
    };
    let mut all = vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            node: NodeId(1),
            addr: "127.0.0.1:1".into(),
            purpose: Purpose::Node,
        },
        Message::HelloAck { version: PROTOCOL_VERSION, node: NodeId(u64::MAX) },
        Message::Close { code: CloseCode::Duplicate, reason: "lower id wins".into() },
        Message::Ping(1),
        Message::Pong(u64::MAX),
        Message::Proof { key: [7; 32], sig: [9; 64] },
        Message::ProbeHello { version: 3, from: NodeId(1), to: NodeId(2), channel: ChannelId(5), nonce: 9 },
        Message::JoinRequest { channel: ChannelId(9), addr: "h:1".into(), snapshot: snapshot.clone() },
        Message::JoinAccept {
            channel: ChannelId(9),
            contact: NodeId(3),
            secret: ChannelSecret(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
            nodes: vec![PeerEntry { node: NodeId(4), addr: "h:4".into(), snapshot: snapshot.clone() }],
            policy: Some(Policy { authority: [5; 32], require: Roles::SOURCE.union(Roles::FILTERS) }),
        },
        Message::JoinRefused { channel: ChannelId(9), reason: "no credential".into() },
        Message::JoinRedirect { channel: ChannelId(9) },
        Message::Snapshot {
            channel: ChannelId(9),
            node: NodeId(4),
            addr: "h:4".into(),
            snapshot: NodeSnapshot { version: 8, instance: 0, members: vec![], token: None },
            left: true,
            reply: true,
        },
        Message::Event(EventMsg {
            channel: ChannelId(9),
            source: LocalId(1),
            seq: 1,
            ty: "load".into(),
            attrs: Attrs::new()
                .with("i", -1i64)
                .with("f", f64::NEG_INFINITY)
                .with("b", false)
                .with("s", "x")
                .with("y", Bytes::from_static(b"\0\xff")),
            payload: Bytes::from_static(b"payload"),
        }),
        Message::Targets { channel: ChannelId(9), sinks: vec![LocalId(2), LocalId(5)] },
        Message::InstallFilter {
            channel: ChannelId(9),
            req: 11,
            kind: FilterKind::In,
            module: Bytes::from_static(b"\0asm\x01\0\0\0"),
        },
        Message::FilterStatus { channel: ChannelId(9), req: 11, ok: false, message: "out of fuel".into() },
        Message::Lagged {
            channel: ChannelId(9),
            source: LocalId(1),
            instance: 0x5eed,
            count: 42,
            sinks: vec![LocalId(3)],
        },
        Message::Routed { channel: ChannelId(9), source: LocalId(1), instance: 0x5eed, origin: 0xfeed, skipped: 7 },
        Message::Deadline { channel: ChannelId(9), unix_us: 1_764_900_000_000_000 },
        Message::Priority { channel: ChannelId(9), level: 2 },
        Message::Expired {
            channel: ChannelId(9),
            source: LocalId(1),
            seq: 12,
            ty: "alarm".into(),
            sinks: vec![LocalId(3), LocalId(4)],
        },
        Message::SourceEnd {
            channel: ChannelId(9),
            origin: NodeId(4),
            origin_instance: 0xfeed,
            source: LocalId(1),
            last: 4000,
            dests: vec![
                EndDest {
                    node: NodeId(5),
                    instance: 0x5eed,
                    routed: 1248,
                    missed: vec![(LocalId(3), 2400), (LocalId(6), 7)],
                },
                EndDest { node: NodeId(6), instance: 0x6eed, routed: 4000, missed: vec![] },
            ],
        },
        Message::RegClaim {
            req: 1,
            name: "chan".into(),
            channel: ChannelId(9),
            node: NodeId(5),
            addr: "h:5".into(),
            ttl_ms: 9000,
            mode: ClaimMode::Takeover(NodeId(3)),
            sources: 1,
            sinks: 2,
            secret: ChannelSecret(u128::MAX),
        },
        Message::RegLookup { req: 2, name: "chan".into() },
        Message::RegRemove {
            req: 3,
            name: "chan".into(),
            channel: ChannelId(9),
            node: NodeId(3),
            secret: ChannelSecret(5),
        },
        Message::RegList { req: 4 },
        Message::RegReply { req: 4, result: RegResult::Entries(vec![entry.clone(), entry]) },
    ];
    // Every gossip message, each in its own frame (the payload of an event is the rest of its frame).
    let id = EventId { source: NodeId(4), seq: 77 };
    let frame =
        Message::Routed { channel: ChannelId(9), source: LocalId(1), instance: 0x5eed, origin: 0xfeed, skipped: 7 }
            .to_bytes();
    let bodies = vec![
        GossipMsg::Join,
        GossipMsg::ForwardJoin { joiner: NodeId(5), ttl: 6 },
        GossipMsg::Neighbor { high: true },
        GossipMsg::NeighborReply { accepted: false },
        GossipMsg::Disconnect,
        GossipMsg::Shuffle { origin: NodeId(5), ttl: 3, peers: vec![NodeId(5), NodeId(6)], back: vec![NodeId(8)] },
        GossipMsg::ShuffleReply { peers: vec![NodeId(7)], back: vec![NodeId(5), NodeId(9)] },
        GossipMsg::Event { id, hops: 3, payload: frame },
        GossipMsg::Event { id, hops: 0, payload: Bytes::new() },
        GossipMsg::IHave { ids: vec![id, EventId { source: NodeId(5), seq: 1 }] },
        GossipMsg::Graft { id },
        GossipMsg::Prune { source: NodeId(4) },
        GossipMsg::Probe { nonce: 77 },
        GossipMsg::ProbeAck { nonce: u64::MAX },
        GossipMsg::Suspect { node: NodeId(6), version: 12 },
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let addrs = if i % 2 == 0 { vec![(NodeId(5), "10.0.0.5:7000".to_owned())] } else { Vec::new() };
        all.push(Message::Gossip { channel: ChannelId(9), addrs, body });
    }
    all.push(Message::ViewSync {
        channel: ChannelId(9),
        count: 3,
        hash: 0x1234_5678_9abc_def0,
        quiet_ms: 1500,
        list: None,
    });
    let entries = vec![
        ViewEntry { node: NodeId(5), version: 4, left: false },
        ViewEntry { node: NodeId(6), version: 9, left: true },
    ];
    all.push(Message::ViewSync {
        channel: ChannelId(9),
        count: 2,
        hash: 7,
        quiet_ms: 0,
        list: Some((true, entries.clone())),
    });
    all.push(Message::ViewSync {
        channel: ChannelId(9),
        count: 2,
        hash: 7,
        quiet_ms: 0,
        list: Some((false, Vec::new())),
    });
    all
}

#[test]
fn every_variant_has_an_example_that_round_trips() {
    let all = one_of_each();
    let mut names: Vec<_> = all.iter().map(variant).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), VARIANTS, "one example per variant");
    let mut kinds: Vec<u8> = all.iter().map(Message::kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), VARIANTS, "every variant has its own kind byte");

    for m in &all {
        let mut buf = m.to_bytes().into();
        assert_eq!(decode_frame(&mut buf, MAX_FRAME_DEFAULT), Ok(Some(m.clone())), "{}", variant(m));
        assert!(buf.is_empty(), "{} consumed exactly its frame", variant(m));
    }

    // All of them back to back, then half a frame: every whole frame comes out in order, the half frame stays put.
    let mut buf = BytesMut::new();
    for m in &all {
        m.encode(&mut buf);
    }
    let half = Message::Ping(5).to_bytes();
    buf.extend_from_slice(&half[..half.len() / 2]);
    let (got, err) = drain(&mut buf);
    assert_eq!(err, None);
    assert_eq!(got, all);
    assert_eq!(&buf[..], &half[..half.len() / 2]);
}

#[test]
fn kinds_without_a_message_are_refused() {
    let kinds: Vec<u8> = one_of_each().iter().map(Message::kind).collect();
    for k in (0..=u8::MAX).filter(|k| !kinds.contains(k)) {
        let mut buf = BytesMut::new();
        buf.put_u32_le(1);
        buf.put_u8(k);
        assert_eq!(decode_frame(&mut buf, MAX_FRAME_DEFAULT), Err(DecodeError::UnknownKind(k)));
    }
}

#[test]
fn named_codes_sent_as_other_come_back_named() {
    for (c, named) in [
        (0, CloseCode::Normal),
        (1, CloseCode::VersionMismatch),
        (2, CloseCode::Malformed),
        (3, CloseCode::Duplicate),
        (4, CloseCode::Handshake),
        (5, CloseCode::Timeout),
    ] {
        let sent = Message::Close { code: CloseCode::Other(c), reason: String::new() };
        let got = decode_frame(&mut sent.to_bytes().into(), MAX_FRAME_DEFAULT).unwrap().unwrap();
        assert_eq!(got, Message::Close { code: named, reason: String::new() });
        assert_eq!(got.to_bytes(), sent.to_bytes(), "same bytes either way");
    }
    for (c, named) in [
        (1, RegErrorCode::UnknownChannel),
        (2, RegErrorCode::Exists),
        (3, RegErrorCode::NotContact),
        (4, RegErrorCode::Invalid),
        (5, RegErrorCode::NotLeader),
    ] {
        let error = |code| Message::RegReply { req: 1, result: RegResult::Error { code, message: String::new() } };
        let got = decode_frame(&mut error(RegErrorCode::Other(c)).to_bytes().into(), MAX_FRAME_DEFAULT);
        assert_eq!(got, Ok(Some(error(named))));
    }
}

#[test]
fn nan_keeps_its_bits() {
    for bits in [f64::NAN.to_bits(), 0x7ff0_0000_0000_0001, 0xfff8_dead_beef_0001] {
        let m = Message::Event(EventMsg {
            channel: ChannelId(1),
            source: LocalId(1),
            seq: 1,
            ty: "".into(),
            attrs: Attrs::new().with("nan", f64::from_bits(bits)),
            payload: Bytes::new(),
        });
        let Ok(Some(Message::Event(e))) = decode_frame(&mut m.to_bytes().into(), MAX_FRAME_DEFAULT) else {
            panic!("event expected");
        };
        let Some(Value::Float(f)) = e.attrs.get("nan") else { panic!("float expected") };
        assert_eq!(f.to_bits(), bits);
        assert_eq!(Message::Event(e).to_bytes(), m.to_bytes(), "re-encodes to the same bytes");
    }
}

#[test]
fn frame_limit_is_kind_plus_body() {
    let m = Message::InstallFilter {
        channel: ChannelId(1),
        req: 1,
        kind: FilterKind::Out,
        module: Bytes::from(vec![0u8; 1000]),
    };
    let bytes = m.to_bytes();
    let len = bytes.len() - LEN_PREFIX;
    assert_eq!(decode_frame(&mut bytes.clone().into(), len), Ok(Some(m)));
    assert_eq!(decode_frame(&mut bytes.into(), len - 1), Err(DecodeError::Oversized { len, max: len - 1 }));
    let mut empty = BytesMut::from(&[0u8; 4][..]);
    assert_eq!(decode_frame(&mut empty, MAX_FRAME_DEFAULT), Err(DecodeError::Empty));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn filter_messages_round_trip(msgs in vec(filter_message(), 1..6), ping in any::<u64>()) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.encode(&mut buf);
            Message::Ping(ping).encode(&mut buf);
        }
        let (got, err) = drain(&mut buf);
        prop_assert_eq!(err, None);
        let expected: Vec<_> = msgs.iter().flat_map(|m| [m.clone(), Message::Ping(ping)]).collect();
        prop_assert_eq!(got, expected);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn filter_message_prefix_needs_more(m in filter_message(), cut in any::<prop::sample::Index>()) {
        let full = m.to_bytes();
        let cut = cut.index(full.len());
        let mut part = BytesMut::from(&full[..cut]);
        prop_assert_eq!(decode_frame(&mut part, 1 << 20), Ok(None));
        prop_assert_eq!(part.len(), cut, "nothing consumed");
    }

    #[test]
    fn damaged_filter_messages_never_panic(m in filter_message(),
                                           flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                           truncate in any::<prop::sample::Index>()) {
        let mut bytes = m.to_bytes().to_vec();
        for (at, v) in flips {
            let i = LEN_PREFIX + at.index(bytes.len() - LEN_PREFIX);
            bytes[i] ^= v;
        }
        // Keep the kind byte and an honest length prefix, so that the damaged body itself is decoded.
        let keep = LEN_PREFIX + 1 + truncate.index(bytes.len() - LEN_PREFIX);
        bytes.truncate(keep.min(bytes.len()));
        let len = (bytes.len() - LEN_PREFIX) as u32;
        bytes[..LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
        let mut buf = BytesMut::from(&bytes[..]);
        if let (decoded, None) = drain(&mut buf) {
            // Whatever still decodes is canonical: it encodes to the bytes it came from.
            let again: Vec<u8> = decoded.iter().flat_map(|m| m.to_bytes().to_vec()).collect();
            prop_assert_eq!(&again[..], &bytes[..bytes.len() - buf.len()]);
        }
    }
}
