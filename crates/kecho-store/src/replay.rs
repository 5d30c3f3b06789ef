//! Replays from a recorder: a sink that comes back (a durable sink after a restart) or joins late (`--last N`) asks
//! the channel's recorders for what it missed, and gets it before anything newer.
//!
//! The exchange runs on a companion channel, `CHANNEL.replay`, with ordinary events: the recorder's sink there
//! (types `kecho.replay-request`, attribute `kecho_recorder = true`) takes requests; a request names the requester
//! (`replay_for`), the positions it has (`after`: `KEY:SEQ,...`, source keys in hex) and how many of the newest events
//! it wants (`last`); the recorder answers with one `kecho.replay` event per recorded event (its source, sequence
//! number and type in `replay_src`, `replay_seq`, `replay_type`, then the event's own attributes; its payload), then
//! `kecho.replay-done` (`replay_count`). The requester's sink takes only events whose `replay_for` is its own.
//!
//! What to answer is decided by [`answer`] (pure); [`ReplayClient`] and the `kecho record` command do the I/O.

use std::collections::HashMap;
use std::time::Duration;

use kecho::{Attrs, Channel, Event, Node, RecvError, SinkOptions, Source, SourceKey, Value};

use crate::record::Recorded;

/// The type of a request.
pub const REQUEST: &str = "kecho.replay-request";
/// The type of a replayed event.
pub const REPLAY: &str = "kecho.replay";
/// The type of the end of an answer.
pub const DONE: &str = "kecho.replay-done";
/// The attribute a recorder's request sink carries.
pub const RECORDER_ATTR: &str = "kecho_recorder";

/// The companion channel of `channel`.
pub fn channel_of(channel: &str) -> String {
    format!("{channel}.replay")
}

/// A request for a replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Who asks (unique per requester).
    pub id: String,
    /// Per source, the last sequence number the requester has: it wants the recorded events after it.
    pub after: Vec<(SourceKey, u64)>,
    /// The newest events it wants, of every source (0: none).
    pub last: u64,
}

/// A message of the exchange that is not well formed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed replay message: {0}")]
pub struct Malformed(pub String);

fn str_attr<'a>(a: &'a Attrs, name: &str) -> Result<&'a str, Malformed> {
    match a.get(name) {
        Some(Value::Str(s)) => Ok(s),
        _ => Err(Malformed(format!("no string attribute {name}"))),
    }
}

fn int_attr(a: &Attrs, name: &str) -> Result<u64, Malformed> {
    match a.get(name) {
        Some(Value::Int(i)) if *i >= 0 => Ok(*i as u64),
        _ => Err(Malformed(format!("no non-negative integer attribute {name}"))),
    }
}

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

impl Request {
    /// Its attributes.
    pub fn to_attrs(&self) -> Attrs {
        let mut a = Attrs::default();
        a.set("replay_for", self.id.as_str());
        let after: Vec<String> = self.after.iter().map(|(k, s)| format!("{k}:{s}")).collect();
        a.set("after", after.join(","));
        a.set("last", int(self.last));
        a
    }

    /// The request these attributes carry.
    pub fn from_attrs(a: &Attrs) -> Result<Request, Malformed> {
        let id = str_attr(a, "replay_for")?.to_owned();
        let mut after = Vec::new();
        for part in str_attr(a, "after")?.split(',').filter(|p| !p.is_empty()) {
            let (k, s) = part.split_once(':').ok_or_else(|| Malformed(format!("position {part:?}")))?;
            let k = u64::from_str_radix(k, 16).map_err(|_| Malformed(format!("source key {k:?}")))?;
            let s = s.parse().map_err(|_| Malformed(format!("sequence number {s:?}")))?;
            after.push((SourceKey(k), s));
        }
        Ok(Request { id, after, last: int_attr(a, "last")? })
    }
}

/// The recorded events (oldest first) that answer `req`: those of the named sources after the positions given,
/// and the newest `req.last` of all; each once, oldest first.
pub fn answer<'a>(req: &Request, recorded: &'a [Recorded]) -> Vec<&'a Recorded> {
    let after: HashMap<SourceKey, u64> = req.after.iter().copied().collect();
    let tail_from = recorded.len().saturating_sub(usize::try_from(req.last).unwrap_or(usize::MAX));
    recorded
        .iter()
        .enumerate()
        .filter(|(i, r)| *i >= tail_from || after.get(&r.source).is_some_and(|p| r.seq > *p))
        .map(|(_, r)| r)
        .collect()
}

/// The attributes of replayed event `r` for requester `id`.
pub fn replay_attrs(id: &str, r: &Recorded) -> Attrs {
    let mut a = Attrs::default();
    a.set("replay_for", id);
    a.set("replay_src", r.source.to_string());
    a.set("replay_seq", int(r.seq));
    a.set("replay_type", r.ty.as_str());
    a.0.extend(r.attrs.0.iter().cloned());
    a
}

/// The recorded event a `kecho.replay` event carries.
pub fn replayed(ev: &Event) -> Result<Recorded, Malformed> {
    let a = ev.attrs();
    let k = str_attr(a, "replay_src")?;
    let source = SourceKey(u64::from_str_radix(k, 16).map_err(|_| Malformed(format!("source key {k:?}")))?);
    let seq = int_attr(a, "replay_seq")?;
    let ty = str_attr(a, "replay_type")?.to_owned();
    let attrs = Attrs(a.0.iter().skip(4).cloned().collect());
    Ok(Recorded { source, seq, ty, attrs, payload: ev.payload().clone() })
}

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The channel layer failed.
    #[error(transparent)]
    Kecho(#[from] kecho::Error),
    /// The answer's sink failed.
    #[error(transparent)]
    Recv(#[from] RecvError),
    /// A message of the exchange is malformed.
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// The recorder began answering and did not finish in time.
    #[error("the recorder's answer did not finish within {0:?}")]
    Timeout(Duration),
}

/// A requester's end of the exchange.
#[derive(Debug)]
pub struct ReplayClient {
    ch: Channel,
    src: Source,
    sink: kecho::Sink,
    id: String,
}

impl ReplayClient {
    /// Joins `CHANNEL.replay` on `node` as requester `id` (unique among requesters, e.g. the node id and a name).
    pub async fn open(node: &Node, channel: &str, id: &str) -> Result<ReplayClient, ReplayError> {
        let ch = node.channel(&channel_of(channel)).await?;
        let filter = format!("replay_for == {}", serde_quote(id));
        let sink = ch.sink(SinkOptions::new().types([REPLAY, DONE]).capacity(1 << 16).filter(&filter))?;
        let src = ch.source()?;
        Ok(ReplayClient { ch, src, sink, id: id.to_owned() })
    }

    /// A recorder is present (waiting for one at most `wait`).
    pub async fn recorder_present(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.ch.sink_attrs().iter().any(|(_, a)| a.get(RECORDER_ATTR).is_some()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the recorders for `after` and `last` (see [`Request`]) and returns the recorded events of the first
    /// complete answer, oldest first; `None` if no recorder appears within `wait`.
    pub async fn fetch(
        &mut self,
        after: Vec<(SourceKey, u64)>,
        last: u64,
        wait: Duration,
    ) -> Result<Option<Vec<Recorded>>, ReplayError> {
        if !self.recorder_present(wait).await {
            return Ok(None);
        }
        let req = Request { id: self.id.clone(), after, last };
        self.src.submit(REQUEST, &req.to_attrs(), &[]).await?;
        let limit = Duration::from_secs(30);
        let mut out = Vec::new();
        let result = tokio::time::timeout(limit, async {
            loop {
                let ev = self.sink.recv().await?;
                if ev.ty() == DONE {
                    return Ok::<_, ReplayError>(());
                }
                out.push(replayed(&ev)?);
            }
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(Some(out)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ReplayError::Timeout(limit)),
        }
    }
}

/// `s` as a CEL string literal.
fn serde_quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(source: u64, seq: u64) -> Recorded {
        Recorded { source: SourceKey(source), seq, ty: "t".into(), attrs: Attrs::default(), payload: Bytes::new() }
    }

    #[test]
    fn requests_round_trip_through_attributes() {
        let r = Request { id: "n1/d".into(), after: vec![(SourceKey(0xab), 7), (SourceKey(2), 0)], last: 5 };
        assert_eq!(Request::from_attrs(&r.to_attrs()), Ok(r));
        let mut bad = Attrs::default();
        bad.set("replay_for", "x");
        bad.set("after", "zz:1");
        bad.set("last", 0i64);
        assert!(Request::from_attrs(&bad).is_err());
    }

    #[test]
    fn an_answer_has_what_follows_each_position_and_the_newest_n_once_in_order() {
        let log = vec![rec(1, 1), rec(2, 1), rec(1, 2), rec(2, 2), rec(1, 3), rec(3, 1)];
        let seqs =
            |req: &Request| -> Vec<(u64, u64)> { answer(req, &log).iter().map(|r| (r.source.0, r.seq)).collect() };
        let after = Request { id: "a".into(), after: vec![(SourceKey(1), 1)], last: 0 };
        assert_eq!(seqs(&after), vec![(1, 2), (1, 3)]);
        let last = Request { id: "a".into(), after: vec![], last: 2 };
        assert_eq!(seqs(&last), vec![(1, 3), (3, 1)]);
        let both = Request { id: "a".into(), after: vec![(SourceKey(2), 0)], last: 1 };
        assert_eq!(seqs(&both), vec![(2, 1), (2, 2), (3, 1)]);
        let none = Request { id: "a".into(), after: vec![(SourceKey(1), 3)], last: 0 };
        assert!(seqs(&none).is_empty());
    }

    #[test]
    fn cel_literals_are_quoted() {
        assert_eq!(serde_quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
