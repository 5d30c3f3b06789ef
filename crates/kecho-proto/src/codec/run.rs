//! The compact frame for a run of events (`EventRun`, kind 60, protocol version 9): consecutive events of one source,
//! one type and one attribute list, with one header for the lot instead of one per event.
//!
//! ```text
//! kind u8 = 60 | channel u64 | source u32 | first seq u64 | type str | attrs | count u32 | count × (len u32 | payload)
//! ```
//!
//! Event `i` (from 0) of the run has sequence number `first + i`, the run's type and attributes, and its own payload;
//! a receiver treats it exactly as the `Event` frame that single submits would have sent. A run is not a
//! [`Message`](super::Message): `decode_body` refuses its kind, and links decode it with [`decode_event_run`].

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{begin_frame, end_frame, kind, put_attrs, put_str, DecodeError, EventMsg, Reader, TypeNames};
use crate::types::{Attrs, ChannelId, LocalId};

/// The kind byte of an event run.
pub const EVENT_RUN: u8 = kind::EVENT_RUN;

/// True if a frame's body (as `split_frame` returns it) is an event run.
pub fn is_event_run(frame: &[u8]) -> bool {
    frame.first() == Some(&kind::EVENT_RUN)
}

/// Appends an event run's frame (`event_frame_len(ty, attrs, 0) + 4` bytes and 4 more per event besides the
/// payloads, length prefix included): `payloads` as events `first`, `first + 1`, ... of `source`, all of type `ty` with
/// attributes `attrs`. At least one payload.
pub fn encode_event_run<'a>(
    dst: &mut BytesMut,
    channel: ChannelId,
    source: LocalId,
    first: u64,
    ty: &str,
    attrs: &Attrs,
    payloads: impl ExactSizeIterator<Item = &'a [u8]>,
) {
    debug_assert!(payloads.len() > 0, "an empty event run");
    let start = begin_frame(dst, kind::EVENT_RUN);
    dst.put_u64_le(channel.0);
    dst.put_u32_le(source.0);
    dst.put_u64_le(first);
    put_str(dst, ty);
    put_attrs(dst, attrs);
    dst.put_u32_le(payloads.len() as u32);
    for p in payloads {
        dst.put_u32_le(p.len() as u32);
        dst.put_slice(p);
    }
    end_frame(dst, start);
}

/// An event run's frame, checked whole and not yet split into events: its header, and the events' lengths and
/// payloads (`body`) as on the wire. [`EventRunMsg::events`] yields the very events [`decode_event_run`] does; a
/// receiver may instead walk [`EventRunMsg::payloads`] and build its own representation of each event, without an
/// [`EventMsg`] in between.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRunMsg {
    /// Channel.
    pub channel: ChannelId,
    /// The source on the sending node.
    pub source: LocalId,
    /// The first event's sequence number (at least 1; `first + count - 1` does not pass `u64::MAX`).
    pub first: u64,
    /// The run's type name (shared through the decoder's [`TypeNames`] cache).
    pub ty: Arc<str>,
    /// The run's attribute list.
    pub attrs: Attrs,
    /// Number of events, at least 1.
    pub count: usize,
    /// `count` times `len u32 | payload`, checked: the lengths add up to the body exactly.
    pub body: Bytes,
}

impl EventRunMsg {
    /// The payloads' places in `body`, in order. A decoded run holds `count` of them; one that a caller changed
    /// afterwards yields those its body holds (up to `count`).
    pub fn payloads(&self) -> RunPayloads<'_> {
        RunPayloads { body: &self.body, at: 0, left: self.count }
    }

    /// The run's events as `Event` frames of their own would carry them; the payloads share `body`'s memory. (Of a
    /// run that a caller changed after decoding: those of [`EventRunMsg::payloads`] numbered up to `u64::MAX`.)
    pub fn events(self) -> impl ExactSizeIterator<Item = EventMsg> {
        let numbered = usize::try_from(u64::MAX - self.first).map_or(usize::MAX, |n| n.saturating_add(1));
        let ranges: Vec<std::ops::Range<usize>> = self.payloads().take(numbered).collect();
        let EventRunMsg { channel, source, first, ty, attrs, body, .. } = self;
        ranges.into_iter().enumerate().map(move |(i, r)| EventMsg {
            channel,
            source,
            seq: first + i as u64,
            ty: ty.clone(),
            attrs: attrs.clone(),
            payload: body.slice(r),
        })
    }
}

/// The places of a run's payloads in its body (see [`EventRunMsg::payloads`]).
#[derive(Debug)]
pub struct RunPayloads<'a> {
    body: &'a [u8],
    at: usize,
    left: usize,
}

impl Iterator for RunPayloads<'_> {
    type Item = std::ops::Range<usize>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Checked at decoding; the checks here keep a run that a caller changed afterwards from panicking.
        let Some(&[a, b, c, d]) = self.body.get(self.at..self.at + 4) else {
            self.left = 0;
            return None;
        };
        let start = self.at + 4;
        let end = start + u32::from_le_bytes([a, b, c, d]) as usize;
        if end > self.body.len() {
            self.left = 0;
            return None;
        }
        self.at = end;
        Some(start..end)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for RunPayloads<'_> {}

/// Decodes an event run's frame body (see [`is_event_run`]) and appends its events to `out`, in order; the payloads
/// share the frame's memory. The whole frame is checked before anything is appended: on an error `out` is as it
/// was. A run of no events, one whose numbers would pass `u64::MAX`, a length beyond the frame or bytes after the last
/// event are errors.
pub fn decode_event_run(frame: Bytes, names: &mut TypeNames, out: &mut Vec<EventMsg>) -> Result<(), DecodeError> {
    let run = decode_event_run_msg(frame, names)?;
    out.reserve(run.count);
    out.extend(run.events());
    Ok(())
}

/// Decodes and checks an event run's frame body whole (the errors of [`decode_event_run`]) without splitting it into
/// events.
pub fn decode_event_run_msg(mut frame: Bytes, names: &mut TypeNames) -> Result<EventRunMsg, DecodeError> {
    if frame.is_empty() {
        return Err(DecodeError::Empty);
    }
    let k = frame.get_u8();
    if k != kind::EVENT_RUN {
        return Err(DecodeError::UnknownKind(k));
    }
    let mut r = Reader { b: frame, kind: k };
    r.need(8 + 4 + 8 + 4)?;
    let channel = ChannelId(r.b.get_u64_le());
    let source = LocalId(r.b.get_u32_le());
    let first = r.b.get_u64_le();
    let n = r.b.get_u32_le() as usize;
    r.need(n)?;
    let ty = names.name(&r.b[..n], k)?;
    r.b.advance(n);
    let attrs = r.attrs()?;
    let count = r.count(4)?;
    if count == 0 || first == 0 || first.checked_add(count as u64 - 1).is_none() {
        return Err(DecodeError::BadTag { kind: k, what: "event run numbering", tag: 0 });
    }
    // Checked whole: the payloads' lengths must add up to the rest of the frame exactly.
    let body = r.b;
    let mut at = 0usize;
    for _ in 0..count {
        if body.len() - at < 4 {
            return Err(DecodeError::Truncated { kind: k });
        }
        let len = u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]) as usize;
        at += 4;
        if body.len() - at < len {
            return Err(DecodeError::Truncated { kind: k });
        }
        at += len;
    }
    if at != body.len() {
        return Err(DecodeError::Trailing { kind: k, extra: body.len() - at });
    }
    Ok(EventRunMsg { channel, source, first, ty, attrs, count, body })
}
