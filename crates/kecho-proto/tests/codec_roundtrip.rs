//! Property tests of the frame codec: every message survives a round trip, any prefix asks for more bytes, and no
//! input, however broken, makes the decoder panic or loop.

use bytes::{Bytes, BytesMut};
use kecho_proto::access::{Policy, Roles, Token};
use kecho_proto::codec::*;
use kecho_proto::gossip::{EventId, GossipMsg};
use kecho_proto::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9._/-]{0,12}"
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::Int),
        // NaN never equals itself; every other float, infinities included, must survive.
        any::<f64>().prop_filter("not NaN", |f| !f.is_nan()).prop_map(Value::Float),
        any::<bool>().prop_map(Value::Bool),
        ".{0,16}".prop_map(Value::Str),
        vec(any::<u8>(), 0..32).prop_map(|b| Value::Bytes(Bytes::from(b))),
    ]
}

fn attrs() -> impl Strategy<Value = Attrs> {
    vec((name(), value()), 0..6).prop_map(Attrs)
}

fn member() -> impl Strategy<Value = MemberInfo> {
    let overflow = prop_oneof![Just(Overflow::Block), Just(Overflow::DropOldest), Just(Overflow::DropNewest)];
    let types = prop_oneof![Just(TypeFilter::All), vec(name(), 0..4).prop_map(TypeFilter::Only)];
    let role = prop_oneof![
        Just(Role::Source),
        (types, overflow, proptest::option::of(".{0,24}")).prop_map(|(types, overflow, filter)| Role::Sink {
            types,
            overflow,
            filter
        })
    ];
    (any::<u32>(), role, attrs()).prop_map(|(id, role, attrs)| MemberInfo { id: LocalId(id), role, attrs })
}

fn token() -> impl Strategy<Value = Token> {
    // Signatures are not checked by the decoder: any bytes must round-trip.
    ("[a-z*]{1,12}", 0u8..8, any::<[u8; 32]>(), any::<u64>(), any::<[u8; 32]>(), vec(any::<u8>(), 64)).prop_map(
        |(channel, bits, holder, not_after, authority, sig)| Token {
            channel,
            roles: Roles::from_bits(bits).unwrap(),
            holder,
            not_after,
            authority,
            sig: sig.try_into().unwrap(),
        },
    )
}

fn snapshot() -> impl Strategy<Value = NodeSnapshot> {
    (any::<u64>(), vec(member(), 0..4), proptest::option::of(token())).prop_map(|(version, members, token)| {
        NodeSnapshot { version, instance: version.rotate_left(17) ^ 0x9e37_79b9, members, token: token.map(Into::into) }
    })
}

fn policy() -> impl Strategy<Value = Option<Policy>> {
    proptest::option::of(
        (any::<[u8; 32]>(), 0u8..8)
            .prop_map(|(authority, bits)| Policy { authority, require: Roles::from_bits(bits).unwrap() }),
    )
}

fn entry() -> impl Strategy<Value = RegEntry> {
    (name(), any::<u64>(), any::<u64>(), name(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
        |(name, ch, contact, addr, sources, sinks, expires_in_ms)| RegEntry {
            name,
            channel: ChannelId(ch),
            contact: NodeId(contact),
            addr,
            sources,
            sinks,
            expires_in_ms,
        },
    )
}

fn close_code() -> impl Strategy<Value = CloseCode> {
    prop_oneof![
        Just(CloseCode::Normal),
        Just(CloseCode::VersionMismatch),
        Just(CloseCode::Malformed),
        Just(CloseCode::Duplicate),
        Just(CloseCode::Handshake),
        Just(CloseCode::Timeout),
        // Codes 0..=5 have names; an unnamed code must stay unnamed.
        (6u16..).prop_map(CloseCode::Other),
    ]
}

fn reg_result() -> impl Strategy<Value = RegResult> {
    let code = prop_oneof![
        Just(RegErrorCode::UnknownChannel),
        Just(RegErrorCode::Exists),
        Just(RegErrorCode::NotContact),
        Just(RegErrorCode::Invalid),
        Just(RegErrorCode::NotLeader),
        // Codes without a name (5 is `NotLeader`'s: `Other(5)` decodes as `NotLeader`, as the table test below says).
        prop_oneof![Just(0u8), 6u8..].prop_map(RegErrorCode::Other),
    ];
    prop_oneof![
        Just(RegResult::Ok),
        entry().prop_map(RegResult::Entry),
        vec(entry(), 0..4).prop_map(RegResult::Entries),
        (code, ".{0,20}").prop_map(|(code, message)| RegResult::Error { code, message }),
    ]
}

fn gossip_body() -> impl Strategy<Value = GossipMsg> {
    let node = any::<u64>().prop_map(NodeId);
    let id = (any::<u64>(), any::<u64>()).prop_map(|(s, seq)| EventId { source: NodeId(s), seq });
    prop_oneof![
        Just(GossipMsg::Join),
        (node.clone(), any::<u8>()).prop_map(|(joiner, ttl)| GossipMsg::ForwardJoin { joiner, ttl }),
        any::<bool>().prop_map(|high| GossipMsg::Neighbor { high }),
        any::<bool>().prop_map(|accepted| GossipMsg::NeighborReply { accepted }),
        Just(GossipMsg::Disconnect),
        (node.clone(), any::<u8>(), vec(node.clone(), 0..4), vec(node.clone(), 0..4))
            .prop_map(|(origin, ttl, peers, back)| GossipMsg::Shuffle { origin, ttl, peers, back }),
        (vec(node.clone(), 0..4), vec(node.clone(), 0..4))
            .prop_map(|(peers, back)| GossipMsg::ShuffleReply { peers, back }),
        (id.clone(), any::<u16>(), vec(any::<u8>(), 0..64)).prop_map(|(id, hops, payload)| GossipMsg::Event {
            id,
            hops,
            payload: payload.into()
        }),
        vec(id.clone(), 0..4).prop_map(|ids| GossipMsg::IHave { ids }),
        id.prop_map(|id| GossipMsg::Graft { id }),
        node.clone().prop_map(|source| GossipMsg::Prune { source }),
        any::<u64>().prop_map(|nonce| GossipMsg::Probe { nonce }),
        any::<u64>().prop_map(|nonce| GossipMsg::ProbeAck { nonce }),
        (node, any::<u64>()).prop_map(|(node, version)| GossipMsg::Suspect { node, version }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let ch = any::<u64>().prop_map(ChannelId);
    let node = any::<u64>().prop_map(NodeId);
    let mode = prop_oneof![
        Just(ClaimMode::Create),
        Just(ClaimMode::Renew),
        any::<u64>().prop_map(|n| ClaimMode::Takeover(NodeId(n)))
    ];
    prop_oneof![
        (any::<u16>(), node.clone(), name(), any::<bool>()).prop_map(|(version, node, addr, reg)| Message::Hello {
            version,
            node,
            addr,
            purpose: if reg { Purpose::Registry } else { Purpose::Node },
        }),
        (any::<u16>(), node.clone()).prop_map(|(version, node)| Message::HelloAck { version, node }),
        (close_code(), ".{0,20}").prop_map(|(code, reason)| Message::Close { code, reason }),
        any::<u64>().prop_map(Message::Ping),
        any::<u64>().prop_map(Message::Pong),
        (ch.clone(), name(), snapshot()).prop_map(|(channel, addr, snapshot)| Message::JoinRequest {
            channel,
            addr,
            snapshot
        }),
        (ch.clone(), node.clone(), any::<u128>(), vec((node.clone(), name(), snapshot()), 0..3), policy()).prop_map(
            |(channel, contact, secret, nodes, policy)| Message::JoinAccept {
                channel,
                contact,
                secret: ChannelSecret(secret),
                nodes: nodes.into_iter().map(|(node, addr, snapshot)| PeerEntry { node, addr, snapshot }).collect(),
                policy,
            }
        ),
        (ch.clone(), ".{0,20}").prop_map(|(channel, reason)| Message::JoinRefused { channel, reason }),
        ch.clone().prop_map(|channel| Message::JoinRedirect { channel }),
        (ch.clone(), node.clone(), name(), snapshot(), any::<bool>(), any::<bool>()).prop_map(
            |(channel, node, addr, snapshot, left, reply)| Message::Snapshot {
                channel,
                node,
                addr,
                snapshot,
                left,
                reply
            }
        ),
        (ch.clone(), any::<u32>(), any::<u64>(), name(), attrs(), vec(any::<u8>(), 0..64)).prop_map(
            |(channel, source, seq, ty, attrs, payload)| Message::Event(EventMsg {
                channel,
                source: LocalId(source),
                seq,
                ty: ty.into(),
                attrs,
                payload: payload.into(),
            })
        ),
        (ch.clone(), vec(any::<u32>(), 0..8))
            .prop_map(|(channel, ids)| Message::Targets { channel, sinks: ids.into_iter().map(LocalId).collect() }),
        (ch.clone(), any::<u32>(), any::<u64>(), any::<u64>(), vec(any::<u32>(), 0..4)).prop_map(
            |(channel, s, instance, count, ids)| Message::Lagged {
                channel,
                source: LocalId(s),
                instance,
                count,
                sinks: ids.into_iter().map(LocalId).collect(),
            }
        ),
        (any::<[u8; 32]>(), vec(any::<u8>(), 64))
            .prop_map(|(key, sig)| Message::Proof { key, sig: sig.try_into().expect("64 bytes") }),
        (any::<u16>(), node.clone(), node.clone(), ch.clone(), any::<u64>())
            .prop_map(|(version, from, to, channel, nonce)| Message::ProbeHello { version, from, to, channel, nonce }),
        (
            ch.clone(),
            node.clone(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            vec((any::<u64>(), any::<u64>(), any::<u64>(), vec((any::<u32>(), any::<u64>()), 0..3)), 0..3)
        )
            .prop_map(|(channel, origin, origin_instance, s, last, dests)| Message::SourceEnd {
                channel,
                origin,
                origin_instance,
                source: LocalId(s),
                last,
                dests: dests
                    .into_iter()
                    .map(|(n, instance, routed, missed)| EndDest {
                        node: NodeId(n),
                        instance,
                        routed,
                        missed: missed.into_iter().map(|(id, c)| (LocalId(id), c)).collect(),
                    })
                    .collect(),
            }),
        (ch.clone(), any::<u64>()).prop_map(|(channel, unix_us)| Message::Deadline { channel, unix_us }),
        (ch.clone(), any::<u8>()).prop_map(|(channel, level)| Message::Priority { channel, level }),
        (ch.clone(), vec((node.clone(), name()), 0..3), gossip_body())
            .prop_map(|(channel, addrs, body)| Message::Gossip { channel, addrs, body }),
        (
            ch.clone(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            proptest::option::of((any::<bool>(), vec((node.clone(), any::<u64>(), any::<bool>()), 0..4)))
        )
            .prop_map(|(channel, count, hash, quiet_ms, list)| Message::ViewSync {
                channel,
                count,
                hash,
                quiet_ms,
                list: list.map(|(reply, es)| {
                    let entries = es.into_iter().map(|(node, version, left)| ViewEntry { node, version, left });
                    (reply, entries.collect())
                }),
            }),
        (ch.clone(), any::<u32>(), any::<u64>(), name(), vec(any::<u32>(), 0..4)).prop_map(
            |(channel, s, seq, ty, ids)| Message::Expired {
                channel,
                source: LocalId(s),
                seq,
                ty,
                sinks: ids.into_iter().map(LocalId).collect()
            }
        ),
        (ch.clone(), any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(channel, s, instance, origin, skipped)| Message::Routed {
                channel,
                source: LocalId(s),
                instance,
                origin,
                skipped
            }
        ),
        (
            (any::<u32>(), name(), ch.clone(), node.clone(), name(), any::<u64>()),
            (mode, any::<u32>(), any::<u32>(), any::<u128>())
        )
            .prop_map(|((req, name, channel, node, addr, ttl_ms), (mode, sources, sinks, secret))| {
                Message::RegClaim {
                    req,
                    name,
                    channel,
                    node,
                    addr,
                    ttl_ms,
                    mode,
                    sources,
                    sinks,
                    secret: ChannelSecret(secret),
                }
            }),
        (any::<u32>(), name()).prop_map(|(req, name)| Message::RegLookup { req, name }),
        (any::<u32>(), name(), ch, node, any::<u128>()).prop_map(|(req, name, channel, node, secret)| {
            Message::RegRemove { req, name, channel, node, secret: ChannelSecret(secret) }
        }),
        any::<u32>().prop_map(|req| Message::RegList { req }),
        (any::<u32>(), reg_result()).prop_map(|(req, result)| Message::RegReply { req, result }),
    ]
}

/// Decodes frames until the buffer asks for more or fails; a step bound proves it cannot loop forever.
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msgs in vec(message(), 1..6)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        let (got, err) = drain(&mut buf);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, msgs);
        prop_assert!(buf.is_empty(), "decoding consumed exactly the frames");
    }

    #[test]
    fn any_prefix_needs_more(m in message(), cut in any::<prop::sample::Index>()) {
        let full = m.to_bytes();
        let cut = cut.index(full.len());
        let mut part = BytesMut::from(&full[..cut]);
        prop_assert_eq!(decode_frame(&mut part, 1 << 20), Ok(None));
        prop_assert_eq!(part.len(), cut, "nothing consumed");
    }

    #[test]
    fn hot_path_encoder_matches(channel in any::<u64>(), source in any::<u32>(), seq in any::<u64>(),
                                ty in name(), attrs in attrs(), payload in vec(any::<u8>(), 0..256)) {
        let mut fast = BytesMut::new();
        encode_event(&mut fast, ChannelId(channel), LocalId(source), seq, &ty, &attrs, &payload);
        let msg = Message::Event(EventMsg {
            channel: ChannelId(channel), source: LocalId(source), seq, ty: ty.as_str().into(), attrs: attrs.clone(),
            payload: payload.clone().into(),
        });
        prop_assert_eq!(&fast[..], &msg.to_bytes()[..]);
        prop_assert_eq!(event_frame_len(&ty, &attrs, payload.len()), fast.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&bytes[..]);
        drain(&mut buf);
    }

    #[test]
    fn damaged_frames_never_panic(m in message(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                  truncate in any::<prop::sample::Index>()) {
        let mut bytes = m.to_bytes().to_vec();
        // Keep the length prefix honest for the truncated body, so that the damaged body itself is decoded.
        for (at, v) in flips {
            let i = 4 + at.index(bytes.len() - 4);
            bytes[i] ^= v;
        }
        let keep = 5 + truncate.index(bytes.len() - 4);
        bytes.truncate(keep.min(bytes.len()));
        let len = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        let mut buf = BytesMut::from(&bytes[..]);
        drain(&mut buf);
    }
}
