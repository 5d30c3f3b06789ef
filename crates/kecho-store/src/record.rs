//! An event as the recorder keeps it: its source, sequence number, type, attributes and payload in one record.
//!
//! Layout (little-endian): `u64` source key, `u64` seq, `u16` type length, type, `u16` attribute count, each attribute
//! (`u16` name length, name, `u8` tag, value), then the payload to the end. Values: 0 Int `i64`, 1 Float `f64` bits,
//! 2 Bool `u8`, 3 Str and 4 Bytes (`u32` length, bytes). Decoding is pure and fails with a reason, never a panic.

use bytes::Bytes;
use kecho::{Attrs, SourceKey, Value};

/// A recorded event.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// The source it came from.
    pub source: SourceKey,
    /// Its sequence number at that source.
    pub seq: u64,
    /// Its type.
    pub ty: String,
    /// Its attributes.
    pub attrs: Attrs,
    /// Its payload.
    pub payload: Bytes,
}

/// A record that is not an event of this layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a recorded event: {0}")]
pub struct DecodeError(pub String);

impl Recorded {
    /// The record of event `ev`.
    pub fn of(ev: &kecho::Event) -> Recorded {
        Recorded {
            source: ev.source(),
            seq: ev.seq(),
            ty: ev.ty().to_owned(),
            attrs: ev.attrs().clone(),
            payload: ev.payload().clone(),
        }
    }

    /// Encodes it into `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.source.0.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        put_str16(out, &self.ty);
        out.extend_from_slice(&(self.attrs.0.len().min(u16::MAX as usize) as u16).to_le_bytes());
        for (name, v) in self.attrs.0.iter().take(u16::MAX as usize) {
            put_str16(out, name);
            match v {
                Value::Int(i) => {
                    out.push(0);
                    out.extend_from_slice(&i.to_le_bytes());
                }
                Value::Float(f) => {
                    out.push(1);
                    out.extend_from_slice(&f.to_bits().to_le_bytes());
                }
                Value::Bool(b) => out.extend_from_slice(&[2, u8::from(*b)]),
                Value::Str(s) => {
                    out.push(3);
                    put_bytes32(out, s.as_bytes());
                }
                Value::Bytes(b) => {
                    out.push(4);
                    put_bytes32(out, b);
                }
            }
        }
        out.extend_from_slice(&self.payload);
    }

    /// The source and sequence number of a record, without decoding the rest.
    pub fn peek(b: &[u8]) -> Result<(SourceKey, u64), DecodeError> {
        let mut r = Reader(b);
        Ok((SourceKey(r.u64()?), r.u64()?))
    }

    /// Decodes a record.
    pub fn decode(b: &[u8]) -> Result<Recorded, DecodeError> {
        let mut r = Reader(b);
        let source = SourceKey(r.u64()?);
        let seq = r.u64()?;
        let ty = r.str16()?;
        let n = r.u16()?;
        let mut attrs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let name = r.str16()?;
            let v = match r.take(1)?[0] {
                0 => Value::Int(r.u64()? as i64),
                1 => Value::Float(f64::from_bits(r.u64()?)),
                2 => Value::Bool(r.take(1)?[0] != 0),
                3 => {
                    let len = r.u32()? as usize;
                    Value::Str(utf8(r.take(len)?)?)
                }
                4 => {
                    let len = r.u32()? as usize;
                    Value::Bytes(Bytes::copy_from_slice(r.take(len)?))
                }
                t => return Err(DecodeError(format!("unknown value tag {t}"))),
            };
            attrs.push((name, v));
        }
        Ok(Recorded { source, seq, ty, attrs: Attrs(attrs), payload: Bytes::copy_from_slice(r.0) })
    }
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn utf8(b: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError("a string is not UTF-8".into()))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError(format!("{} byte(s) where {n} were expected", self.0.len())));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap_or_default()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }
    fn str16(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        utf8(self.take(n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_truncations_fail_with_a_reason() {
        let mut attrs = Attrs::default();
        attrs.set("i", -3i64);
        attrs.set("f", 1.5f64);
        attrs.set("b", true);
        attrs.set("s", "héllo");
        attrs.0.push(("raw".into(), Value::Bytes(Bytes::from_static(b"\0\x01"))));
        let r = Recorded {
            source: SourceKey(0xdead_beef),
            seq: 42,
            ty: "tick".into(),
            attrs,
            payload: Bytes::from_static(b"payload"),
        };
        let mut b = Vec::new();
        r.encode(&mut b);
        assert_eq!(Recorded::decode(&b), Ok(r));
        for cut in 0..20 {
            assert!(Recorded::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
    }
}
