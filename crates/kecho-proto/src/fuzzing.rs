//! Entry points shared by the cargo-fuzz targets and the test that replays their corpus, so that both check the same
//! properties.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::access::{Policy, Roles};
use crate::codec::{
    decode_body_with, decode_event_run, decode_event_with, decode_frame, encode_event_run, is_event, is_event_run,
    split_frame, ClaimMode, Message, Purpose, RegEntry, RegErrorCode, RegResult, TypeNames, PROTOCOL_VERSION,
};
use crate::handshake::{accept_first, dial_answer, Accept, Dial};
use crate::membership::{ChannelState, MembershipConfig, OpenMode, RegistryUnreachable};
use crate::types::{ChannelId, ChannelSecret, NodeId};

/// Decodes every frame in `data`; each decoded message must encode to the very bytes it came from.
pub fn decode_frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    // One type-name cache per decoder, kept across frames as a link keeps it.
    let (mut names, mut event_names) = (TypeNames::default(), TypeNames::default());
    for _ in 0..data.len() + 1 {
        let before = buf.clone();
        let frame = match split_frame(&mut buf, 1 << 20) {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => return,
        };
        if is_event_run(&frame) {
            // A run of events is no single message: its own decoder takes all of it or none, and what it takes
            // encodes to the very bytes it came from.
            let mut evs = Vec::new();
            match decode_event_run(frame, &mut event_names, &mut evs) {
                Ok(()) => {
                    let e = &evs[0];
                    let mut again = BytesMut::new();
                    let payloads = evs.iter().map(|e| &e.payload[..]);
                    encode_event_run(&mut again, e.channel, e.source, e.seq, &e.ty, &e.attrs, payloads);
                    let consumed = before.len() - buf.len();
                    assert_eq!(&again[..], &before[..consumed], "re-encoding an event run differs");
                    continue;
                }
                Err(_) => {
                    assert!(evs.is_empty(), "a refused run yielded events");
                    return;
                }
            }
        }
        let decoded = decode_body_with(frame.clone(), &mut names);
        if is_event(&frame) {
            // A receiving link decodes event frames through their own path: it must agree with the general one.
            let fast = decode_event_with(frame, &mut event_names).map(Message::Event);
            match (&fast, &decoded) {
                // Compared by their encoding: an attribute may be a NaN, which equals nothing.
                (Ok(a), Ok(b)) => assert_eq!(a.to_bytes(), b.to_bytes(), "the event decoder disagrees"),
                _ => assert_eq!(fast, decoded, "the event decoder disagrees"),
            }
        }
        match decoded {
            Ok(msg) => {
                let consumed = before.len() - buf.len();
                let again = msg.to_bytes();
                assert_eq!(&again[..], &before[..consumed], "re-encoding differs for {msg:?}");
            }
            Err(_) => return,
        }
    }
    panic!("decoder did not stop");
}

/// Feeds a channel's membership state machine with whatever messages `data` decodes to, from a few made-up peers,
/// with registry answers and timeouts interleaved; it must never panic and its outputs must stay well-formed. The first
/// byte's top bits choose an access policy (none, or one leaving some role open); under a policy, no peer the policy
/// does not admit may ever be in the view (the fuzzer cannot forge a credential, so only nodes without one whose
/// members use open roles are admitted).
pub fn drive_membership(data: &[u8]) {
    let t0 = Instant::now();
    let mut st = ChannelState::new(
        "fuzz",
        ChannelId(1),
        ChannelSecret(1),
        NodeId(50),
        "127.0.0.1:1",
        MembershipConfig::default(),
    );
    let require = match data.first().map(|b| b >> 6) {
        Some(1) => Some(Roles::SOURCE),
        Some(2) => Some(Roles::SINK),
        Some(3) => Some(Roles::SOURCE.union(Roles::FILTERS)),
        _ => None,
    };
    st.set_wall_clock(t0, Duration::from_secs(1_800_000_000));
    st.set_policy(require.map(|require| Policy { authority: [9; 32], require }));
    st.open(OpenMode::OpenOrCreate, t0);
    let mut buf = BytesMut::from(data);
    let mut now = t0;
    for step in 0..256u64 {
        let Some(first) = buf.first().copied() else { break };
        now += Duration::from_millis(u64::from(first) * 10);
        let from = NodeId(u64::from(first % 4) * 25);
        match first % 5 {
            0 => st.handle_timeout(now),
            1 => st.handle_peer_lost(from, now),
            2 => {
                let result = match first % 3 {
                    0 => Ok(RegResult::Entry(RegEntry {
                        name: "fuzz".into(),
                        channel: ChannelId(1),
                        contact: from,
                        addr: "127.0.0.1:2".into(),
                        sources: 0,
                        sinks: 0,
                        expires_in_ms: 1000,
                    })),
                    1 => Ok(RegResult::Error { code: RegErrorCode::UnknownChannel, message: String::new() }),
                    _ => Err(RegistryUnreachable("down".to_owned())),
                };
                st.handle_registry(result, now);
            }
            _ => {}
        }
        match decode_frame(&mut buf, 1 << 20) {
            Ok(Some(msg)) => st.handle_message(from, msg, now),
            Ok(None) | Err(_) => {
                // Skip one byte and go on, so that every input exercises the machine. (An error may already have
                // consumed the rest.)
                if !buf.is_empty() {
                    bytes::Buf::advance(&mut buf, 1);
                }
            }
        }
        while let Some(out) = st.poll_output() {
            if let crate::membership::Output::Registry(op) = out {
                let msg = st.registry_message(&op, step as u32);
                assert!(matches!(
                    msg,
                    Message::RegClaim { .. } | Message::RegLookup { .. } | Message::RegRemove { .. }
                ));
                if let Message::RegClaim { mode: ClaimMode::Takeover(old), .. } = msg {
                    assert_ne!(old, NodeId(50), "a node never takes the role over from itself");
                }
            }
        }
        if let Some(t) = st.poll_timeout() {
            assert!(t >= t0, "timeouts are never in the past of the start");
        }
        if let Some(policy) = st.policy() {
            for (node, p) in st.peers() {
                let verdict = policy.admit("fuzz", *node, &p.snapshot, Some(1_800_000_000));
                assert!(verdict.is_ok(), "node {node} in the view against the policy: {verdict:?}");
            }
        }
    }
}

/// Runs both sides' handshake decisions on every message `data` decodes to: a connection is accepted exactly when its
/// first message is a node's `Hello` of our version from another node, a dial succeeds exactly on a `HelloAck` of our
/// version from the node we meant to reach, and every refusal says why.
pub fn handshake(data: &[u8]) {
    let me = NodeId(7);
    let expected = NodeId(9);
    let mut buf = BytesMut::from(data);
    for _ in 0..64 {
        let msg = match decode_frame(&mut buf, 1 << 20) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return,
        };
        let acceptable = matches!(
            &msg,
            Message::Hello { version, node, purpose: Purpose::Node, .. } if *version == PROTOCOL_VERSION && *node != me
        );
        match accept_first(&msg, me) {
            Accept::Node { peer, addr } => {
                assert!(acceptable, "accepted {msg:?}");
                assert!(matches!(&msg, Message::Hello { node, addr: a, .. } if *node == peer && *a == addr));
            }
            Accept::Probe { from, channel, nonce } => {
                assert!(
                    matches!(&msg, Message::ProbeHello { version, from: f, to, channel: c, nonce: n }
                        if *version == PROTOCOL_VERSION && *to == me && (*f, *c, *n) == (from, channel, nonce)),
                    "probe accepted on {msg:?}"
                );
            }
            Accept::Refuse { reason, .. } => {
                assert!(!acceptable, "refused {msg:?}");
                assert!(!reason.is_empty(), "a refusal says why");
            }
        }
        // Proofs made up by the fuzzer never verify (that would be a forged signature); checking them never panics.
        if let Message::Proof { key, .. } = &msg {
            let claimed = NodeId::from_public_key(key);
            assert!(crate::handshake::check_hello_proof(&msg, claimed, "127.0.0.1:9", me).is_err(), "forged proof");
            assert!(crate::handshake::check_ack_proof(&msg, claimed, me).is_err(), "forged proof");
            let probe = crate::handshake::check_probe_answer(&msg, claimed, me, crate::ChannelId(1), 2);
            assert!(probe.is_err(), "forged probe answer");
        }
        let up = matches!(
            &msg,
            Message::HelloAck { version, node } if *version == PROTOCOL_VERSION && *node == expected
        );
        match dial_answer(&msg, expected, "127.0.0.1:9") {
            Dial::Up => assert!(up, "dial up on {msg:?}"),
            Dial::Duplicate => assert!(matches!(msg, Message::Close { code: crate::codec::CloseCode::Duplicate, .. })),
            Dial::Failed(why) => {
                assert!(!up, "dial failed on {msg:?}");
                assert!(!why.to_string().is_empty());
            }
        }
    }
}
