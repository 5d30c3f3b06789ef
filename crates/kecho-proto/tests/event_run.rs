//! The compact frame for a run of events (`EventRun`, kind 60): it decodes to the very events that `Event` frames of
//! their own would have carried; a truncated or damaged run is a clear error that yields none of its events.

use bytes::{BufMut, Bytes, BytesMut};
use kecho_proto::codec::*;
use kecho_proto::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn attrs_strategy() -> impl Strategy<Value = Attrs> {
    vec(("[a-z]{1,6}", any::<i64>()), 0..3)
        .prop_map(|kv| Attrs(kv.into_iter().map(|(k, v)| (k, Value::Int(v))).collect()))
}

/// One frame of `payloads` as a run, split off its length prefix as a link does.
fn run_frame(first: u64, ty: &str, attrs: &Attrs, payloads: &[Vec<u8>]) -> Bytes {
    let mut buf = BytesMut::new();
    encode_event_run(&mut buf, ChannelId(7), LocalId(3), first, ty, attrs, payloads.iter().map(|p| &p[..]));
    let frame = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
    assert!(buf.is_empty());
    frame
}

/// The events as single `Event` frames would carry them, decoded by the single-event path.
fn singles(first: u64, ty: &str, attrs: &Attrs, payloads: &[Vec<u8>]) -> Vec<EventMsg> {
    let mut names = TypeNames::default();
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut buf = BytesMut::new();
            encode_event(&mut buf, ChannelId(7), LocalId(3), first + i as u64, ty, attrs, p);
            decode_event_with(split_frame(&mut buf, 1 << 20).unwrap().unwrap(), &mut names).unwrap()
        })
        .collect()
}

#[test]
fn a_run_is_not_a_message_and_says_so() {
    let frame = run_frame(1, "t", &Attrs::default(), &[b"x".to_vec()]);
    assert!(is_event_run(&frame));
    assert!(!is_event(&frame));
    assert_eq!(frame[0], EVENT_RUN);
    assert_eq!(decode_body(frame), Err(DecodeError::UnknownKind(EVENT_RUN)));
}

#[test]
fn a_run_of_no_events_or_numbers_past_the_end_is_refused() {
    let mut names = TypeNames::default();
    let mut out = Vec::new();
    // Built by hand: the encoder never writes these.
    for (first, count) in [(1u64, 0u32), (0, 1), (u64::MAX, 2)] {
        let mut b = BytesMut::new();
        b.put_u8(EVENT_RUN);
        b.put_u64_le(7);
        b.put_u32_le(3);
        b.put_u64_le(first);
        b.put_u32_le(1);
        b.put_u8(b't');
        b.put_u32_le(0);
        b.put_u32_le(count);
        for _ in 0..count {
            b.put_u32_le(0);
        }
        let err = decode_event_run(b.freeze(), &mut names, &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::BadTag { kind: EVENT_RUN, .. }), "{first} {count}: {err}");
        assert!(out.is_empty());
    }
}

/// `EventRunMsg`'s fields are public, so a caller may change a decoded run: its payloads and events then end where
/// its body does (a count past the body, a body cut short, a length past the body, numbers up to `u64::MAX`), with
/// no panic.
#[test]
fn a_run_changed_after_decoding_never_panics() {
    let frame = run_frame(u64::MAX - 2, "t", &Attrs::default(), &[b"one".to_vec(), b"two".to_vec(), b"3".to_vec()]);
    let run = decode_event_run_msg(frame, &mut TypeNames::default()).unwrap();
    assert_eq!(run.payloads().count(), 3);
    assert_eq!(run.clone().events().map(|e| e.seq).collect::<Vec<_>>(), [u64::MAX - 2, u64::MAX - 1, u64::MAX]);
    let changed = |f: &dyn Fn(&mut EventRunMsg)| {
        let mut r = run.clone();
        f(&mut r);
        r
    };
    let cases = [
        ("count past the body", changed(&|r| r.count = 5), 3, 3),
        ("body cut short", changed(&|r| r.body.truncate(r.body.len() - 1)), 2, 2),
        ("body cut in a length", changed(&|r| r.body.truncate(9)), 1, 1),
        ("a length past the body", changed(&|r| r.body = Bytes::from_static(&[1, 0, 0, 0, 7, 9, 0, 0, 0, 1])), 1, 1),
        // The events end at the last number there is.
        ("numbers past u64::MAX", changed(&|r| r.first = u64::MAX), 3, 1),
    ];
    for (what, r, n, events) in cases {
        assert_eq!(r.payloads().count(), n, "{what}");
        let evs: Vec<EventMsg> = r.clone().events().collect();
        assert_eq!(evs.len(), events, "{what}");
        assert!(evs.iter().enumerate().all(|(i, e)| e.seq == r.first + i as u64), "{what}");
        for (e, p) in evs.iter().zip(r.payloads()) {
            assert_eq!(e.payload, r.body.slice(p), "{what}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_run_decodes_to_the_events_single_frames_carry(
        first in 1u64..u64::MAX / 2,
        ty in "[a-z]{1,12}",
        attrs in attrs_strategy(),
        payloads in vec(vec(any::<u8>(), 0..200), 1..40),
    ) {
        let frame = run_frame(first, &ty, &attrs, &payloads);
        let mut out = vec![];
        decode_event_run(frame, &mut TypeNames::default(), &mut out).unwrap();
        prop_assert_eq!(out, singles(first, &ty, &attrs, &payloads));
    }

    #[test]
    fn a_truncated_run_is_an_error_and_yields_nothing(
        attrs in attrs_strategy(),
        payloads in vec(vec(any::<u8>(), 0..50), 1..10),
        cut in any::<prop::sample::Index>(),
    ) {
        let frame = run_frame(5, "ty", &attrs, &payloads);
        let cut = cut.index(frame.len());
        let mut out = vec![];
        let err = decode_event_run(frame.slice(..cut), &mut TypeNames::default(), &mut out);
        prop_assert!(err.is_err(), "a run cut at {} of {} bytes decoded", cut, frame.len());
        prop_assert!(out.is_empty());
        // On the stream a cut frame waits for the rest.
        let mut buf = BytesMut::new();
        encode_event_run(&mut buf, ChannelId(7), LocalId(3), 5, "ty", &attrs, payloads.iter().map(|p| &p[..]));
        let whole = buf.len();
        let mut part = BytesMut::from(&buf[..cut.min(whole - 1)]);
        prop_assert_eq!(split_frame(&mut part, 1 << 20), Ok(None));
    }

    #[test]
    fn a_damaged_run_never_panics_and_is_all_or_nothing(
        payloads in vec(vec(any::<u8>(), 0..50), 1..10),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = run_frame(9, "ty", &Attrs::default(), &payloads).to_vec();
        // The kind byte stays: the body is damaged.
        for (at, v) in flips {
            let i = 1 + at.index(bytes.len() - 1);
            bytes[i] ^= v;
        }
        let mut out = vec![];
        match decode_event_run(Bytes::from(bytes.clone()), &mut TypeNames::default(), &mut out) {
            Err(_) => prop_assert!(out.is_empty()),
            Ok(()) => {
                // Whatever still decodes is a well-formed run: its events' payloads account for every byte.
                prop_assert!(!out.is_empty());
                let payload_bytes: usize = out.iter().map(|e| 4 + e.payload.len()).sum();
                prop_assert!(payload_bytes < bytes.len());
                let seqs: Vec<u64> = out.iter().map(|e| e.seq).collect();
                let want: Vec<u64> = (out[0].seq..out[0].seq + out.len() as u64).collect();
                prop_assert_eq!(seqs, want);
            }
        }
    }
}
