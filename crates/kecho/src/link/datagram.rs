//! Best-effort events as unreliable datagrams (QUIC links): the datagram's layout and the receiver's decision on
//! each one. Pure, no I/O; `quic.rs` sends and receives the bytes, the reader and the channel's loss accounting apply
//! the rules (docs/PROTOCOL.md, "Best-effort events").
//!
//! A datagram carries one event: a one-byte tag ([`TAG_EVENT`]), the event's number in its source's numbering towards
//! the receiving node (`u64`, the number a `Routed` frame makes derivable on the stream), the number of the source's
//! last event sent to that node on the link's stream before it (`u64`, 0 for none), then the frames that would have
//! gone on the stream: an optional `Targets`, an optional `Deadline`, and the `Event` frame, nothing after it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The tag of a datagram holding one best-effort event.
pub(crate) const TAG_EVENT: u8 = 1;

/// Bytes of the header before the frames.
pub(crate) const HEADER: usize = 17;

/// Writes a datagram's header.
pub(crate) fn encode_header(dst: &mut BytesMut, number: u64, after: u64) {
    dst.put_u8(TAG_EVENT);
    dst.put_u64_le(number);
    dst.put_u64_le(after);
}

/// Takes the header off a datagram: `(number, after)`.
pub(crate) fn split_header(d: &mut Bytes) -> Result<(u64, u64), &'static str> {
    if d.len() < HEADER {
        return Err("a datagram shorter than its header");
    }
    if d[0] != TAG_EVENT {
        return Err("a datagram of an unknown kind");
    }
    d.advance(1);
    let number = d.get_u64_le();
    let after = d.get_u64_le();
    if number == 0 || after >= number {
        return Err("a datagram numbered out of its own order");
    }
    Ok((number, after))
}

/// The sender's rule: the numbers a best-effort event's datagram carries, `(number, after)`, when the source queued
/// `routed` events to the node before it and the last of them that went on the link's stream was `stream_last` (0:
/// none); `None` if the event must go on the stream instead.
///
/// A source's first event to a node always goes on the stream. The receiver takes the first stream event of a source
/// it sees as its baseline (docs/PROTOCOL.md, "Loss accounting": a node that opens a channel late must not be told of
/// events before it), and a datagram sent before it (`after` 0) may be lost, dropped by QUIC's buffers or read after
/// it: that stream event would then hide the datagrams' loss (seen as events skipped before a reliable event without
/// a report, once events of several KiB went as datagrams so that a source's first events all did). After the first
/// stream event, every datagram names a stream event (`after` at least 1), which the receiver has delivered before it
/// delivers the datagram, so its baseline is set by then and every gap is counted.
pub(crate) fn numbers(routed: u64, stream_last: u64) -> Option<(u64, u64)> {
    (stream_last > 0).then_some((routed + 1, stream_last))
}

/// What a receiver does with a datagram of a source, given the number of the last event of that source it delivered
/// (`last`, 0 before the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Deliver it; `gap` events before it (meant for this node) went missing and are reported first.
    Deliver { gap: u64 },
    /// Late: an event after it was delivered already (it was counted in that event's gap). Dropped.
    Late,
    /// It overtook an event its source sent before it on the stream, which has not arrived yet. Dropped (delivered
    /// after that event it would break the source's order, before it the stream's event would be late); the gap the
    /// stream's next event after it reveals reports it.
    Overtook,
}

/// The receiver's rule for a datagram numbered `number` that its source sent after stream event `after`, when the last
/// event delivered from that source was `last`. Unlike on the stream, the first datagram of a source to arrive does
/// not set a baseline: a source numbers its events to each node from 1, so when nothing of it arrived before and it
/// sent nothing on the stream (`after` 0), the events before it were datagrams that were lost.
pub(crate) fn verdict(last: u64, number: u64, after: u64) -> Verdict {
    if after > last {
        return Verdict::Overtook;
    }
    if number <= last {
        return Verdict::Late;
    }
    Verdict::Deliver { gap: number - last - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_refuses_nonsense() {
        let mut b = BytesMut::new();
        encode_header(&mut b, 7, 3);
        b.extend_from_slice(b"frames");
        let mut d = b.freeze();
        assert_eq!(split_header(&mut d), Ok((7, 3)));
        assert_eq!(&d[..], b"frames");
        assert!(split_header(&mut Bytes::from_static(&[1, 2, 3])).is_err());
        let mut bad = BytesMut::new();
        encode_header(&mut bad, 3, 3);
        assert!(split_header(&mut bad.freeze()).is_err(), "an event cannot follow itself");
        let mut other = BytesMut::new();
        encode_header(&mut other, 3, 1);
        other[0] = 9;
        assert!(split_header(&mut other.freeze()).is_err());
    }

    /// Runs datagrams numbered `arrivals` (each with its `after`) through the rule from `last`; returns what was
    /// delivered (with the gap reported before it) and the final `last`.
    fn run(mut last: u64, arrivals: &[(u64, u64)]) -> (Vec<(u64, u64)>, u64) {
        let mut out = Vec::new();
        for &(n, after) in arrivals {
            if let Verdict::Deliver { gap } = verdict(last, n, after) {
                out.push((n, gap));
                last = n;
            }
        }
        (out, last)
    }

    #[test]
    fn reordered_datagrams_are_never_delivered_out_of_order_and_every_gap_is_counted() {
        // 1, 3, 2, 4, 6, 5, 7: 2 and 5 come late.
        let (got, last) = run(0, &[(1, 0), (3, 0), (2, 0), (4, 0), (6, 0), (5, 0), (7, 0)]);
        assert_eq!(got, vec![(1, 0), (3, 1), (4, 0), (6, 1), (7, 0)]);
        assert_eq!(last, 7);
        let delivered: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert!(delivered.windows(2).all(|w| w[0] < w[1]));
        // Delivered plus reported: every number up to the last, once.
        assert_eq!(got.len() as u64 + got.iter().map(|g| g.1).sum::<u64>(), last);
    }

    #[test]
    fn a_datagram_never_overtakes_its_sources_stream_events() {
        // Stream event 4 not here yet (last is 3): datagram 5 sent after it is dropped, not delivered before it.
        assert_eq!(verdict(3, 5, 4), Verdict::Overtook);
        // Once it is, the next datagram goes through and reports 5 as missing.
        assert_eq!(verdict(4, 6, 4), Verdict::Deliver { gap: 1 });
        assert_eq!(verdict(0, 1, 0), Verdict::Deliver { gap: 0 });
        assert_eq!(verdict(6, 6, 4), Verdict::Late);
        // The first datagrams were lost: reported, not taken as a baseline.
        assert_eq!(verdict(0, 4, 0), Verdict::Deliver { gap: 3 });
    }
}
