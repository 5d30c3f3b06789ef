//! Parsing `--attr K=V` and printing events as text or JSON.

use anyhow::{bail, Result};
use base64::Engine;
use kecho::{Attrs, Event, Value};
use serde_json::{json, Map};

/// Parses every `--attr` argument.
pub(crate) fn parse_all(args: &[String]) -> Result<Attrs> {
    let mut attrs = Attrs::new();
    for a in args {
        let (k, v) = parse_one(a)?;
        attrs.set(k, v);
    }
    Ok(attrs)
}

/// Parses `KEY=VALUE` or `KEY:TYPE=VALUE`.
pub(crate) fn parse_one(arg: &str) -> Result<(String, Value)> {
    let Some((key, raw)) = arg.split_once('=') else {
        bail!("malformed --attr {arg:?}: expected KEY=VALUE");
    };
    let (name, ty) = match key.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (key, None),
    };
    if name.is_empty() {
        bail!("malformed --attr {arg:?}: the key is empty");
    }
    let bad = |what: &str| anyhow::anyhow!("malformed --attr {arg:?}: {raw:?} is not {what}");
    let value = match ty {
        None => infer(raw),
        Some("int") => Value::Int(raw.parse().map_err(|_| bad("an integer"))?),
        Some("float") => Value::Float(raw.parse().map_err(|_| bad("a number"))?),
        Some("bool") => Value::Bool(raw.parse().map_err(|_| bad("true or false"))?),
        Some("str") => Value::Str(raw.to_owned()),
        Some("hex") => Value::Bytes(hex(raw).ok_or_else(|| bad("hexadecimal bytes"))?.into()),
        Some(t) => bail!("malformed --attr {arg:?}: unknown type {t:?} (use int, float, bool, str or hex)"),
    };
    Ok((name.to_owned(), value))
}

fn infer(raw: &str) -> Value {
    if let Ok(i) = raw.parse::<i64>() {
        return Value::Int(i);
    }
    if let Ok(f) = raw.parse::<f64>() {
        if f.is_finite() {
            return Value::Float(f);
        }
    }
    match raw {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::Str(raw.to_owned()),
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

pub(crate) fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Bool(b) => json!(b),
        Value::Str(s) => json!(s),
        Value::Bytes(b) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
    }
}

/// One JSON object per event: `type`, `seq`, `attrs`, `payload` and `payload_encoding` (`utf8` or `base64`).
pub(crate) fn event_json(ev: &Event) -> serde_json::Value {
    let mut attrs = Map::new();
    for (k, v) in ev.attrs().iter() {
        attrs.insert(k.to_owned(), value_json(v));
    }
    let (payload, encoding) = match std::str::from_utf8(ev.payload()) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(ev.payload()), "base64"),
    };
    json!({
        "type": ev.ty(),
        "seq": ev.seq(),
        "source": ev.source().to_string(),
        "attrs": attrs,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// One line per event: `TYPE #SEQ k=v ... | payload`.
pub(crate) fn event_text(ev: &Event) -> String {
    let mut s = format!("{} #{}", ev.ty(), ev.seq());
    for (k, v) in ev.attrs().iter() {
        s.push_str(&format!(" {k}={}", value_text(v)));
    }
    match std::str::from_utf8(ev.payload()) {
        Ok(p) if !p.is_empty() => s.push_str(&format!(" | {p}")),
        Ok(_) => {}
        Err(_) => s.push_str(&format!(" | <{} bytes>", ev.payload().len())),
    }
    s
}

/// An attribute value as text: strings without quotes, everything else as it displays.
pub(crate) fn value_text(v: &kecho::Value) -> String {
    match v {
        kecho::Value::Str(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A recorded event (from `kecho record` or a replay) as JSON, like [`event_json`].
pub(crate) fn recorded_json(r: &kecho_store::Recorded) -> serde_json::Value {
    let attrs: Map<String, serde_json::Value> = r.attrs.iter().map(|(k, v)| (k.to_owned(), value_json(v))).collect();
    let (payload, encoding) = match std::str::from_utf8(&r.payload) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(&r.payload), "base64"),
    };
    json!({
        "type": r.ty,
        "seq": r.seq,
        "source": r.source.to_string(),
        "attrs": attrs,
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// A recorded event as one line of text, like [`event_text`].
pub(crate) fn recorded_text(r: &kecho_store::Recorded) -> String {
    let mut s = format!("{} #{}", r.ty, r.seq);
    for (k, v) in r.attrs.iter() {
        s.push_str(&format!(" {k}={}", value_text(v)));
    }
    match std::str::from_utf8(&r.payload) {
        Ok(p) if !p.is_empty() => s.push_str(&format!(" | {p}")),
        Ok(_) => {}
        Err(_) => s.push_str(&format!(" | <{} bytes>", r.payload.len())),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_parsing() {
        assert_eq!(parse_one("n=3").unwrap().1, Value::Int(3));
        assert_eq!(parse_one("f=0.5").unwrap().1, Value::Float(0.5));
        assert_eq!(parse_one("b=true").unwrap().1, Value::Bool(true));
        assert_eq!(parse_one("z=a").unwrap().1, Value::Str("a".into()));
        assert_eq!(parse_one("z:str=7").unwrap().1, Value::Str("7".into()));
        assert_eq!(parse_one("h:hex=00ff").unwrap().1, Value::Bytes(vec![0, 255].into()));
        assert_eq!(parse_one("e=").unwrap().1, Value::Str(String::new()));
        for bad in ["novalue", "=3", "n:int=x", "h:hex=0", "k:wat=1"] {
            let err = parse_one(bad).unwrap_err().to_string();
            assert!(err.starts_with("malformed --attr"), "{bad}: {err}");
        }
    }
}
