//! Replays from a recorder: a sink that comes back (a durable sink after a restart) or joins late (`--last N`) asks
//! the channel's recorders for what it missed, and gets it before anything newer.
//!
//! The exchange runs on a companion channel, `CHANNEL.replay`, with ordinary events: the recorder's sink there
//! (types `kecho.replay-request`, attribute `kecho_recorder = true`, and since version 2 the recording's identity in
//! `kecho_recorder_id` and `kecho_replay_version = 2`) takes requests; a request names the requester
//! (`replay_for`), the positions it has (`after`: `KEY:SEQ,...`, source keys in hex) and how many of the newest events
//! it wants (`last`); since version 2 also the recorder it is for (`replay_to`) and a starting point in that
//! recorder's log (`since`): every event of a source not named in `after` recorded at that index or later. The
//! recorder answers with one `kecho.replay` event per recorded event (its source, sequence number and type in
//! `replay_src`, `replay_seq`, `replay_type`, since version 2 `replay_by`, then the event's own attributes; its
//! payload), then `kecho.replay-done` (`replay_count`; since version 2 `replay_by`, and `replay_next`, the index its
//! next record gets: a starting point for the requester's next request). The requester's sink takes only events
//! whose `replay_for` is its own. Version 1 requests (no `replay_version`) are answered as before.
//!
//! A version 2 request may also name sources in `newest` (`KEY,...`): the answer's end then carries `replay_newest`
//! (`KEY:SEQ,...`), the last sequence number recorded of each of them that the recorder has recorded (a source it
//! never recorded is left out). A durable sink asks it of a source whose first live event came past events it may
//! have missed: it tells events recorded before the sink's starting point from events not recorded yet. A recorder
//! that predates it ignores the attribute, and its answer has no `replay_newest`.
//!
//! A version 2 request may also carry the requester's sink's filters ([`Filters`]: `replay_types`, `replay_filter`).
//! The recorder then sends only the events they accept (the newest `last` that they accept), each with the events of
//! its source it lacks before it (`replay_missed`), and ends with `replay_filtered` and, per source whose last events
//! it passed over, the last of them (`replay_passed`), so that the requester counts as missed exactly what it would
//! have counted filtering an unfiltered answer ([`narrow`]). A filter it cannot compile is refused
//! (`replay_bad_filter`) and the requester asks again without it. A recorder that predates filters ignores them.
//!
//! Which records answer is decided by [`Select`] and [`narrow`] (pure); where to read them by [`read_range`] from the
//! recorder's [`Index`], so that an answer reads the recording from near the positions asked, not from its start;
//! [`serve`], [`ReplayClient`] and the `kecho record` command do the I/O.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use kecho::{Attrs, Channel, Event, Node, RecvError, SinkOptions, Source, SourceKey, Value};

use std::ops::ControlFlow;

use crate::record::Recorded;
use crate::recorder::{Index, Recorder, RecorderError, Seen};

/// The type of a request.
pub const REQUEST: &str = "kecho.replay-request";
/// The type of a replayed event.
pub const REPLAY: &str = "kecho.replay";
/// The type of the end of an answer.
pub const DONE: &str = "kecho.replay-done";
/// The attribute a recorder's request sink carries.
pub const RECORDER_ATTR: &str = "kecho_recorder";
/// The attribute holding a recorder's identity (its recording's, 16 hex digits; version 2).
pub const RECORDER_ID_ATTR: &str = "kecho_recorder_id";
/// The attribute holding the exchange's version a recorder speaks (version 2; absent: 1).
pub const RECORDER_VERSION_ATTR: &str = "kecho_replay_version";
/// The version of the exchange this crate speaks (and the highest it answers).
pub const VERSION: u64 = 2;
/// `replay_to` of a request meant for version 1 recorders (which ignore the attribute): no version 2 recorder answers
/// it.
pub const TO_VERSION_1: &str = "-";

/// The companion channel of `channel`.
pub fn channel_of(channel: &str) -> String {
    format!("{channel}.replay")
}

/// A recording's identity: random, made when the recording is created, kept in its directory. A starting point
/// (an index in a recorder's log) means something only to the recorder of that identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecorderId(pub u64);

impl fmt::Display for RecorderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl RecorderId {
    /// Parses 16 hex digits (or fewer).
    pub fn parse(s: &str) -> Option<RecorderId> {
        (!s.is_empty() && s.len() <= 16).then(|| u64::from_str_radix(s, 16).ok().map(RecorderId)).flatten()
    }
}

/// A request for a replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Who asks (unique per requester).
    pub id: String,
    /// The exchange's version the request was written in (1: no `replay_version`, no `replay_to`, no `since`).
    pub version: u64,
    /// Version 2: the recorder it is for; `None` for version 1 recorders only ([`TO_VERSION_1`]).
    pub to: Option<RecorderId>,
    /// Per source, the last sequence number the requester has: it wants the recorded events after it.
    pub after: Vec<(SourceKey, u64)>,
    /// Version 2: every event of a source not named in `after` recorded at this index of the recorder's log or later.
    pub since: Option<u64>,
    /// The newest events it wants, of every source (0: none).
    pub last: u64,
    /// Version 2: sources whose last recorded sequence number it wants to know (`replay_newest` in the answer).
    pub newest: Vec<SourceKey>,
    /// Version 2: the requester's filters, for the recorder to apply ([`Filters`]); none: every event asked for.
    pub filters: Filters,
}

/// A requester's sink's filters, as it was opened with them: a type filter (the types it accepts; `None`: every
/// type) and a content filter expression. A recorder that knows them (version 2 with `replay_types` or
/// `replay_filter`) sends only the events they accept, and says what the others were ([`Narrowed`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    /// The types accepted; `None`: every type.
    pub types: Option<Vec<String>>,
    /// The content filter expression.
    pub expr: Option<String>,
}

impl Filters {
    /// No filter: every event.
    pub fn is_none(&self) -> bool {
        self.types.is_none() && self.expr.is_none()
    }

    /// The filters of `sink`.
    pub fn of(sink: &kecho::Sink) -> Filters {
        let types = match sink.type_filter() {
            kecho::TypeFilter::All => None,
            kecho::TypeFilter::Only(list) => Some(list.clone()),
        };
        Filters { types, expr: sink.filter_expr().map(str::to_owned) }
    }

    /// Compiled for matching; a content filter that does not compile (or is longer than [`MAX_FILTER`]) is refused
    /// with the reason.
    pub fn compile(&self) -> Result<Matcher, String> {
        let content = match &self.expr {
            None => None,
            Some(e) if e.len() > MAX_FILTER => {
                return Err(format!("content filter of {} bytes is longer than the limit of {MAX_FILTER}", e.len()))
            }
            Some(e) => Some(kecho::filter::ContentFilter::compile(e).map_err(|e| format!("content filter: {e}"))?),
        };
        let types = match &self.types {
            Some(list) if !list.is_empty() => kecho::TypeFilter::Only(list.clone()),
            _ => kecho::TypeFilter::All,
        };
        Ok(Matcher { types, content })
    }
}

/// The longest content filter expression a recorder compiles for a requester (16 KiB).
pub const MAX_FILTER: usize = 16 << 10;

/// Compiled [`Filters`]: the rule sources apply to live events (type filter, then content filter).
#[derive(Debug)]
pub struct Matcher {
    types: kecho::TypeFilter,
    content: Option<kecho::filter::ContentFilter>,
}

impl Matcher {
    /// Whether the filters accept an event of type `ty` with `attrs`.
    pub fn accepts(&self, ty: &str, attrs: &Attrs) -> bool {
        self.types.accepts(ty) && self.content.as_ref().is_none_or(|c| c.matches(ty, attrs))
    }
}

/// `list` joined by commas, each item's `%` and `,` escaped (`%25`, `%2C`).
fn join_escaped(list: &[String]) -> String {
    list.iter().map(|t| t.replace('%', "%25").replace(',', "%2C")).collect::<Vec<_>>().join(",")
}

/// The inverse of [`join_escaped`].
fn split_escaped(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    s.split(',').map(|t| t.replace("%2C", ",").replace("%2c", ",").replace("%25", "%")).collect()
}

/// What a filtered answer holds (decided by [`narrow`], pure): the events the filters accept, each with the events
/// of its source the recorder lacks between the requester's position (or the source's previous event in the answer)
/// and it, and per source whose newest events in the answer the filters rejected, the last of them and the events
/// lacking up to it. A requester moves its positions over the rejected events (they count as had, as a live event
/// its filters reject) and reports only the lacking ones missed: what an unfiltered answer filtered by the requester
/// gives.
#[derive(Debug, Default, PartialEq)]
pub struct Narrowed {
    /// The accepted events, oldest first, each with the events lacking before it.
    pub events: Vec<(Recorded, u64)>,
    /// Per source whose last events in the answer were rejected: the last sequence number rejected, and the events
    /// lacking before it since the source's last accepted event (or the position).
    pub passed: Vec<(SourceKey, u64, u64)>,
}

/// Narrows `chosen` (an answer's events, oldest first) to those `accepts` takes, for a requester at positions
/// `after` (pure): the events it has already (at or below its position) are left out; the missed counts follow the
/// rule a requester applies to a replay ([`crate::Positions::replay`]).
pub fn narrow(after: &[(SourceKey, u64)], chosen: Vec<Recorded>, accepts: impl Fn(&Recorded) -> bool) -> Narrowed {
    let mut last: HashMap<SourceKey, u64> = after.iter().copied().collect();
    let mut pending: HashMap<SourceKey, (u64, u64)> = HashMap::new();
    let mut events = Vec::new();
    for r in chosen {
        let missed = match last.get(&r.source) {
            Some(&l) if r.seq <= l => continue,
            Some(&l) => r.seq - l - 1,
            None => 0,
        };
        last.insert(r.source, r.seq);
        let before = pending.remove(&r.source).map_or(0, |(_, m)| m);
        if accepts(&r) {
            events.push((r, before + missed));
        } else {
            pending.insert(r.source, (r.seq, before + missed));
        }
    }
    let mut passed: Vec<(SourceKey, u64, u64)> = pending.into_iter().map(|(k, (s, m))| (k, s, m)).collect();
    passed.sort();
    Narrowed { events, passed }
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

fn opt_int_attr(a: &Attrs, name: &str) -> Result<Option<u64>, Malformed> {
    match a.get(name) {
        None => Ok(None),
        Some(_) => int_attr(a, name).map(Some),
    }
}

fn source_key(k: &str) -> Result<SourceKey, Malformed> {
    u64::from_str_radix(k, 16).map(SourceKey).map_err(|_| Malformed(format!("source key {k:?}")))
}

/// `KEY:SEQ,...` (source keys in hex).
fn positions(list: &str) -> Result<Vec<(SourceKey, u64)>, Malformed> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (k, s) = part.split_once(':').ok_or_else(|| Malformed(format!("position {part:?}")))?;
        let s = s.parse().map_err(|_| Malformed(format!("sequence number {s:?}")))?;
        out.push((source_key(k)?, s));
    }
    Ok(out)
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
        if self.version >= 2 {
            a.set("replay_version", int(self.version));
            a.set("replay_to", self.to.map_or_else(|| TO_VERSION_1.to_owned(), |r| r.to_string()));
            if let Some(s) = self.since {
                a.set("since", int(s));
            }
            if !self.newest.is_empty() {
                let keys: Vec<String> = self.newest.iter().map(ToString::to_string).collect();
                a.set("newest", keys.join(","));
            }
            if let Some(types) = &self.filters.types {
                a.set("replay_types", join_escaped(types));
            }
            if let Some(expr) = &self.filters.expr {
                a.set("replay_filter", expr.as_str());
            }
        }
        a
    }

    /// The request these attributes carry. A version this crate does not speak is malformed (see
    /// [`Request::requester`] to answer it with a refusal).
    pub fn from_attrs(a: &Attrs) -> Result<Request, Malformed> {
        let id = str_attr(a, "replay_for")?.to_owned();
        let after = positions(str_attr(a, "after")?)?;
        let last = int_attr(a, "last")?;
        let version = opt_int_attr(a, "replay_version")?.unwrap_or(1);
        if version == 1 {
            return Ok(Request {
                id,
                version,
                to: None,
                after,
                since: None,
                last,
                newest: Vec::new(),
                filters: Filters::default(),
            });
        }
        if version == 0 || version > VERSION {
            return Err(Malformed(format!(
                "replay request version {version}; this recorder speaks versions 1 to {VERSION}"
            )));
        }
        let to = match str_attr(a, "replay_to")? {
            TO_VERSION_1 => None,
            s => Some(RecorderId::parse(s).ok_or_else(|| Malformed(format!("recorder id {s:?}")))?),
        };
        let since = opt_int_attr(a, "since")?;
        let newest = match a.get("newest") {
            None => Vec::new(),
            Some(_) => {
                str_attr(a, "newest")?.split(',').filter(|p| !p.is_empty()).map(source_key).collect::<Result<_, _>>()?
            }
        };
        let types = match a.get("replay_types") {
            None => None,
            Some(_) => Some(split_escaped(str_attr(a, "replay_types")?)),
        };
        let expr = match a.get("replay_filter") {
            None => None,
            Some(_) => Some(str_attr(a, "replay_filter")?.to_owned()),
        };
        Ok(Request { id, version, to, after, since, last, newest, filters: Filters { types, expr } })
    }

    /// Who asks, if the attributes say so (to answer a request that is not well formed with a refusal).
    pub fn requester(a: &Attrs) -> Option<&str> {
        str_attr(a, "replay_for").ok()
    }

    /// Whether recorder `me` answers it: a version 1 request is for every recorder, a version 2 one for the recorder
    /// it names.
    pub fn is_for(&self, me: RecorderId) -> bool {
        self.version < 2 || self.to == Some(me)
    }
}

/// Which recorded events answer a request (pure): those of the sources named after the positions given, those of
/// every other source recorded at `since` or later, and every one from `tail_from` on (the newest `last`).
#[derive(Debug)]
pub struct Select {
    after: HashMap<SourceKey, u64>,
    since: Option<u64>,
    tail_from: u64,
}

impl Select {
    /// For `req`, its newest `last` events starting at log index `tail_from` (`u64::MAX`: none).
    pub fn new(req: &Request, tail_from: u64) -> Select {
        Select { after: req.after.iter().copied().collect(), since: req.since, tail_from }
    }

    /// Whether record `index`, event `seq` of `source`, is in the answer.
    pub fn wants(&self, index: u64, source: SourceKey, seq: u64) -> bool {
        index >= self.tail_from
            || match self.after.get(&source) {
                Some(p) => seq > *p,
                None => self.since.is_some_and(|s| index >= s),
            }
    }
}

/// The recorded events (oldest first, each with its index in the recorder's log, from some index to the newest)
/// that answer `req` unfiltered: those of the sources named after the positions given, those of every other source
/// recorded at `req.since` or later, and the newest `req.last` of those given (pass the whole recording for
/// `last`); each once, oldest first.
pub fn answer<'a>(req: &Request, recorded: &'a [(u64, Recorded)]) -> Vec<&'a Recorded> {
    let tail = recorded.len().saturating_sub(usize::try_from(req.last).unwrap_or(usize::MAX));
    let tail_from = if req.last == 0 { u64::MAX } else { recorded.get(tail).map_or(u64::MAX, |(i, _)| *i) };
    let select = Select::new(req, tail_from);
    recorded.iter().filter(|(i, r)| select.wants(*i, r.source, r.seq)).map(|(_, r)| r).collect()
}

/// The log indexes an answer to `req` reads between (both included), given where the newest `last` begin
/// (`tail_from`, `u64::MAX` for none), the recording's oldest index and next index, where each source's records
/// are and the last sequence number recorded of each; `None` if it needs none. A known source after its position
/// costs a read from near that position (the index), not from the recording's start.
pub fn read_range(
    req: &Request,
    tail_from: u64,
    first: u64,
    next: u64,
    index: &Index,
    seen: &Seen,
) -> Option<(u64, u64)> {
    let mut from = u64::MAX;
    let mut to = 0;
    if tail_from != u64::MAX {
        from = from.min(tail_from.max(first));
        to = next;
    }
    if let Some(s) = req.since {
        from = from.min(s.max(first));
        to = next;
    }
    for (k, p) in &req.after {
        if seen.get(*k).is_some_and(|s| s > *p) {
            if let Some((a, b)) = index.after(*k, *p) {
                from = from.min(a);
                to = to.max(b);
            }
        }
    }
    (from < next && from <= to).then(|| (from, to.min(next.saturating_sub(1))))
}

/// The attributes of replayed event `r` for requester `id` (from recorder `by`, version 2; in a filtered answer,
/// `missed`: the events of its source the recorder lacks before it).
pub fn replay_attrs(id: &str, by: Option<RecorderId>, missed: Option<u64>, r: &Recorded) -> Attrs {
    let mut a = Attrs::default();
    a.set("replay_for", id);
    a.set("replay_src", r.source.to_string());
    a.set("replay_seq", int(r.seq));
    a.set("replay_type", r.ty.as_str());
    if let Some(by) = by {
        a.set("replay_by", by.to_string());
    }
    if let Some(m) = missed {
        a.set("replay_missed", int(m));
    }
    a.0.extend(r.attrs.0.iter().cloned());
    a
}

/// The recorded event a `kecho.replay` event carries (`by`: whether it was written by a version 2 recorder, which
/// puts `replay_by` fifth; `filtered`: whether it belongs to a filtered answer, which puts `replay_missed` sixth),
/// and in a filtered answer the events lacking before it.
pub fn replayed(ev: &Event, by: bool, filtered: bool) -> Result<(Recorded, u64), Malformed> {
    let a = ev.attrs();
    let k = str_attr(a, "replay_src")?;
    let source = SourceKey(u64::from_str_radix(k, 16).map_err(|_| Malformed(format!("source key {k:?}")))?);
    let seq = int_attr(a, "replay_seq")?;
    let ty = str_attr(a, "replay_type")?.to_owned();
    let missed = if filtered { int_attr(a, "replay_missed")? } else { 0 };
    let skip = 4 + usize::from(by) + usize::from(filtered);
    let attrs = Attrs(a.0.iter().skip(skip).cloned().collect());
    Ok((Recorded { source, seq, ty, attrs, payload: ev.payload().clone() }, missed))
}

/// The recorder that wrote a `kecho.replay` or `kecho.replay-done` event: `None` for a version 1 recorder, or a
/// value that is not an id.
fn replay_by(ev: &Event) -> Option<RecorderId> {
    str_attr(ev.attrs(), "replay_by").ok().and_then(RecorderId::parse)
}

/// Errors of serving a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Reading the recording failed.
    #[error(transparent)]
    Recorder(#[from] RecorderError),
    /// Sending the answer failed.
    #[error(transparent)]
    Kecho(#[from] kecho::Error),
    /// The request's filters cannot be applied (an expression that does not compile): the requester was sent a
    /// refusal saying why, and the recorder goes on.
    #[error("refused the request of {requester}: {why}")]
    BadFilter {
        /// Who asked.
        requester: String,
        /// Why.
        why: String,
    },
}

/// The log index from which the newest `last` events that `matcher` accepts (all if `None`) were recorded:
/// `u64::MAX` for `last` 0. With a filter, the recording is read backwards from its end in growing windows until
/// `last` accepted events are found (or its start is reached).
fn tail_from(rec: &mut Recorder, last: u64, matcher: Option<&Matcher>) -> Result<u64, RecorderError> {
    let (first, next) = (rec.first_index(), rec.next_index());
    if last == 0 {
        return Ok(u64::MAX);
    }
    let Some(m) = matcher else { return Ok(next.saturating_sub(last).max(first)) };
    let (mut hi, mut found, mut window) = (next, 0u64, last.saturating_mul(4).max(1024));
    while hi > first {
        let lo = hi.saturating_sub(window).max(first);
        let mut accepted = Vec::new();
        rec.for_each_decoded(lo, hi - 1, |i, b| {
            let r = Recorded::decode(b)?;
            if m.accepts(&r.ty, &r.attrs) {
                accepted.push(i);
            }
            Ok(ControlFlow::Continue(()))
        })?;
        let need = last - found;
        if accepted.len() as u64 >= need {
            return Ok(accepted[accepted.len() - need as usize]);
        }
        found += accepted.len() as u64;
        hi = lo;
        window = window.saturating_mul(2);
    }
    Ok(first)
}

/// The events that answer `req`, oldest first (see [`Select`], [`read_range`]).
fn chosen(rec: &mut Recorder, req: &Request, tail_from: u64) -> Result<Vec<Recorded>, RecorderError> {
    let Some((from, to)) = read_range(req, tail_from, rec.first_index(), rec.next_index(), rec.index(), rec.seen())
    else {
        return Ok(Vec::new());
    };
    let select = Select::new(req, tail_from);
    let mut out = Vec::new();
    // Only the records in the answer are decoded whole.
    rec.for_each_decoded(from, to, |i, b| {
        let (k, s) = Recorded::peek(b)?;
        if select.wants(i, k, s) {
            out.push(Recorded::decode(b)?);
        }
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(out)
}

/// What an answer to a request holds ([`prepare`]).
#[derive(Debug, Default, PartialEq)]
pub struct Answered {
    /// The events to send, oldest first; in a filtered answer each with the events of its source the recorder lacks
    /// before it.
    pub events: Vec<(Recorded, Option<u64>)>,
    /// In a filtered answer, [`Narrowed::passed`]; `None` for an unfiltered one.
    pub passed: Option<Vec<(SourceKey, u64, u64)>>,
}

/// What to send in answer to `req` from the recording, filtered by `matcher` ([`Filters::compile`] of the request's
/// filters) if given. Reads from near the oldest record the answer needs ([`read_range`]).
pub fn prepare(rec: &mut Recorder, req: &Request, matcher: Option<&Matcher>) -> Result<Answered, RecorderError> {
    let tail = tail_from(rec, req.last, matcher)?;
    let all = chosen(rec, req, tail)?;
    Ok(match matcher {
        None => Answered { events: all.into_iter().map(|r| (r, None)).collect(), passed: None },
        Some(m) => {
            let n = narrow(&req.after, all, |r| m.accepts(&r.ty, &r.attrs));
            Answered { events: n.events.into_iter().map(|(r, m)| (r, Some(m))).collect(), passed: Some(n.passed) }
        }
    })
}

/// Answers request `req` (if it is for this recorder; else `None`) from the recording, on `out`: the events it asks
/// for (only those its filters accept, if it gives them: [`narrow`]), then the end of the answer. Returns how many
/// events were replayed. Filters that cannot be applied are refused ([`ServeError::BadFilter`], after the refusal is
/// sent).
pub async fn serve(rec: &mut Recorder, out: &mut Source, req: &Request) -> Result<Option<u64>, ServeError> {
    if !req.is_for(rec.id()) {
        return Ok(None);
    }
    let by = (req.version >= 2).then(|| rec.id());
    let matcher = if req.filters.is_none() {
        None
    } else {
        match req.filters.compile() {
            Ok(m) => Some(m),
            Err(why) => {
                let mut done = Attrs::default();
                done.set("replay_for", req.id.as_str());
                done.set("replay_count", 0i64);
                done.set("replay_error", why.as_str());
                done.set("replay_bad_filter", true);
                if let Some(by) = by {
                    done.set("replay_by", by.to_string());
                }
                out.submit(DONE, &done, &[]).await?;
                return Err(ServeError::BadFilter { requester: req.id.clone(), why });
            }
        }
    };
    let answered = prepare(rec, req, matcher.as_ref())?;
    let mut done = Attrs::default();
    done.set("replay_for", req.id.as_str());
    for (r, missed) in &answered.events {
        out.submit(REPLAY, &replay_attrs(&req.id, by, *missed, r), &r.payload).await?;
    }
    let count = answered.events.len();
    if let Some(passed) = &answered.passed {
        done.set("replay_filtered", true);
        let passed: Vec<String> = passed.iter().map(|(k, s, m)| format!("{k}:{s}:{m}")).collect();
        done.set("replay_passed", passed.join(","));
    }
    done.set("replay_count", int(count as u64));
    if let Some(by) = by {
        done.set("replay_by", by.to_string());
        done.set("replay_next", int(rec.next_index()));
        done.set("replay_first", int(rec.first_index()));
        if !req.newest.is_empty() {
            let seen = rec.seen();
            let newest: Vec<String> =
                req.newest.iter().filter_map(|k| seen.get(*k).map(|s| format!("{k}:{s}"))).collect();
            done.set("replay_newest", newest.join(","));
        }
    }
    out.submit(DONE, &done, &[]).await?;
    Ok(Some(count as u64))
}

/// `KEY:SEQ:MISSED,...`.
fn passed_list(list: &str) -> Result<Vec<(SourceKey, u64, u64)>, Malformed> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let mut it = part.split(':');
        let (Some(k), Some(s), Some(m), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(Malformed(format!("passed {part:?}")));
        };
        let num = |v: &str| v.parse::<u64>().map_err(|_| Malformed(format!("passed {part:?}")));
        out.push((source_key(k)?, num(s)?, num(m)?));
    }
    Ok(out)
}

/// Refuses a request that is not well formed (a version this recorder does not speak), if it names its requester:
/// an answer with no event and `replay_error`, so that the requester fails at once rather than waiting.
/// Only a request that names recorder `me` (or names none) is refused by it.
pub async fn refuse(out: &mut Source, me: RecorderId, attrs: &Attrs, why: &Malformed) -> Result<bool, kecho::Error> {
    let Some(id) = Request::requester(attrs) else { return Ok(false) };
    let to = match attrs.get("replay_to") {
        Some(Value::Str(to)) => Some(to.as_str()),
        _ => None,
    };
    if to.is_some_and(|to| RecorderId::parse(to) != Some(me)) {
        return Ok(false);
    }
    let mut done = Attrs::default();
    done.set("replay_for", id);
    done.set("replay_count", 0i64);
    done.set("replay_error", why.0.as_str());
    if to.is_some() {
        done.set("replay_by", me.to_string());
    }
    out.submit(DONE, &done, &[]).await?;
    Ok(true)
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
    /// The recorder refused the request.
    #[error("the recorder refused the request: {0}")]
    Refused(String),
    /// The recorder refused the filters the request carried (it is asked again without them).
    #[error("the recorder refused the request's filters: {0}")]
    BadFilter(String),
}

/// What to ask the recorders for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// Per source, the last sequence number the requester has.
    pub after: Vec<(SourceKey, u64)>,
    /// The newest events of every source it wants (0: none).
    pub last: u64,
    /// Its starting points: per recorder, the index from which it wants every event of a source not in `after`.
    /// A recorder named here is preferred (waited for, within the wait given).
    pub since: HashMap<RecorderId, u64>,
    /// Sources whose last recorded sequence number it wants to know ([`Answer::newest`]).
    pub newest: Vec<SourceKey>,
    /// The requester's sink's filters, for the recorder to apply ([`Filters::of`]); a recorder that cannot (it
    /// predates them, or refuses the expression) sends every event asked for, and the requester filters.
    pub filters: Filters,
}

/// A recorder's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    /// Who answered; `None`: a version 1 recorder (which knows no starting points).
    pub recorder: Option<RecorderId>,
    /// The starting point that was asked of it, if any.
    pub since: Option<u64>,
    /// The events, in the order recorded.
    pub events: Vec<Recorded>,
    /// The index its next record gets (version 2): a starting point for the next request.
    pub next: Option<u64>,
    /// The index of the oldest record it holds (version 2).
    pub first: Option<u64>,
    /// For the sources asked about in [`Ask::newest`], the last sequence number recorded of those it recorded;
    /// `None` if the recorder did not say (it predates the question, or none was asked).
    pub newest: Option<HashMap<SourceKey, u64>>,
    /// The recorder applied the filters asked ([`Ask::filters`]): `events` holds only those they accept, `missed`
    /// and `passed` say what the others were ([`Narrowed`]).
    pub filtered: bool,
    /// In a filtered answer, per event (in the order of `events`), the events of its source the recorder lacks before
    /// it.
    pub missed: Vec<u64>,
    /// In a filtered answer, per source whose last events in it the filters rejected: the last of them and the
    /// events the recorder lacks before it ([`Narrowed::passed`]).
    pub passed: Vec<(SourceKey, u64, u64)>,
}

/// A requester's end of the exchange.
#[derive(Debug)]
pub struct ReplayClient {
    ch: Channel,
    src: Source,
    sink: kecho::Sink,
    id: String,
}

/// A recorder present on the replay channel: `Some(id)` for version 2, `None` for version 1.
fn recorders(ch: &Channel) -> Vec<Option<RecorderId>> {
    ch.sink_attrs()
        .iter()
        .filter(|(_, a)| a.get(RECORDER_ATTR).is_some())
        .map(|(_, a)| match (a.get(RECORDER_ID_ATTR), a.get(RECORDER_VERSION_ATTR)) {
            (Some(Value::Str(id)), Some(Value::Int(v))) if *v >= 2 => RecorderId::parse(id),
            _ => None,
        })
        .collect()
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
        self.choose(&HashMap::new(), wait).await.is_some()
    }

    /// The recorder to ask: one named in `since` if one appears within `wait`, else a version 2 recorder present
    /// then, else a version 1 one (`Some(None)`); `None` if none appears within `wait`.
    async fn choose(&self, since: &HashMap<RecorderId, u64>, wait: Duration) -> Option<Option<RecorderId>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let present = recorders(&self.ch);
            if let Some(r) = present.iter().flatten().find(|r| since.contains_key(r)) {
                return Some(Some(*r));
            }
            let over = tokio::time::Instant::now() >= deadline;
            // Without a starting point to honour, the first recorder seen will do.
            if !present.is_empty() && (over || since.is_empty()) {
                let v2 = present.iter().flatten().min().copied();
                return Some(v2);
            }
            if over {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks a recorder for `ask` and returns its complete answer; `None` if no recorder appears within `wait`. A
    /// recorder that refuses the filters asked is asked again without them.
    pub async fn fetch(&mut self, ask: &Ask, wait: Duration) -> Result<Option<Answer>, ReplayError> {
        let Some(to) = self.choose(&ask.since, wait).await else { return Ok(None) };
        let since = to.and_then(|r| ask.since.get(&r).copied());
        let mut req = Request {
            id: self.id.clone(),
            version: VERSION,
            to,
            after: ask.after.clone(),
            since,
            last: ask.last,
            newest: if to.is_some() { ask.newest.clone() } else { Vec::new() },
            filters: if to.is_some() { ask.filters.clone() } else { Filters::default() },
        };
        match self.ask_once(&req).await {
            Err(ReplayError::BadFilter(_)) if !req.filters.is_none() => {
                req.filters = Filters::default();
                self.ask_once(&req).await.map(Some)
            }
            r => r.map(Some),
        }
    }

    async fn ask_once(&mut self, req: &Request) -> Result<Answer, ReplayError> {
        let to = req.to;
        self.src.submit(REQUEST, &req.to_attrs(), &[]).await?;
        let limit = Duration::from_secs(30);
        let mut answer = Answer { recorder: to, since: req.since, ..Answer::default() };
        let mut events = Vec::new();
        let result = tokio::time::timeout(limit, async {
            loop {
                let ev = self.sink.recv().await?;
                // Only the answer of the recorder asked (a version 1 recorder's bears no `replay_by`; a version 2
                // recorder answers only requests naming it, but what is left of an earlier answer is dropped here).
                if replay_by(&ev) != to {
                    continue;
                }
                if ev.ty() == DONE {
                    let a = ev.attrs();
                    if let Ok(why) = str_attr(a, "replay_error") {
                        if matches!(a.get("replay_bad_filter"), Some(Value::Bool(true))) {
                            return Err(ReplayError::BadFilter(why.to_owned()));
                        }
                        return Err(ReplayError::Refused(why.to_owned()));
                    }
                    if to.is_some() {
                        answer.next = Some(int_attr(a, "replay_next")?);
                        answer.first = Some(int_attr(a, "replay_first")?);
                        if let Ok(list) = str_attr(a, "replay_newest") {
                            answer.newest = Some(positions(list)?.into_iter().collect());
                        }
                        // Only a filtered request gets a filtered answer.
                        if !req.filters.is_none() && matches!(a.get("replay_filtered"), Some(Value::Bool(true))) {
                            answer.filtered = true;
                            answer.passed = passed_list(str_attr(a, "replay_passed")?)?;
                        }
                    }
                    return Ok::<_, ReplayError>(());
                }
                events.push(ev);
            }
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ReplayError::Timeout(limit)),
        }
        for ev in &events {
            let (r, missed) = replayed(ev, to.is_some(), answer.filtered)?;
            answer.events.push(r);
            if answer.filtered {
                answer.missed.push(missed);
            }
        }
        Ok(answer)
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

    fn req(after: Vec<(u64, u64)>, since: Option<u64>, last: u64) -> Request {
        Request {
            id: "a".into(),
            version: VERSION,
            to: Some(RecorderId(9)),
            after: after.into_iter().map(|(k, s)| (SourceKey(k), s)).collect(),
            since,
            last,
            newest: Vec::new(),
            filters: Filters::default(),
        }
    }

    #[test]
    fn requests_round_trip_through_attributes() {
        let r = Request {
            id: "n1/d".into(),
            version: 2,
            to: Some(RecorderId(0xfeed)),
            after: vec![(SourceKey(0xab), 7), (SourceKey(2), 0)],
            since: Some(12),
            last: 5,
            newest: vec![SourceKey(0xcd), SourceKey(3)],
            filters: Filters { types: Some(vec!["a,b".into(), "50%".into()]), expr: Some("zone == \"a\"".into()) },
        };
        assert_eq!(Request::from_attrs(&r.to_attrs()), Ok(r.clone()));
        let no_filters = Request { filters: Filters::default(), ..r.clone() };
        assert_eq!(Request::from_attrs(&no_filters.to_attrs()), Ok(no_filters));
        let no_newest = Request { newest: Vec::new(), ..r.clone() };
        assert_eq!(Request::from_attrs(&no_newest.to_attrs()), Ok(no_newest));
        let for_v1 = Request { to: None, since: None, filters: Filters::default(), ..r.clone() };
        assert_eq!(Request::from_attrs(&for_v1.to_attrs()), Ok(for_v1.clone()));
        assert!(!for_v1.is_for(RecorderId(0xfeed)), "a request for version 1 recorders only");
        assert!(r.is_for(RecorderId(0xfeed)) && !r.is_for(RecorderId(1)));
        let mut bad = Attrs::default();
        bad.set("replay_for", "x");
        bad.set("after", "zz:1");
        bad.set("last", 0i64);
        assert!(Request::from_attrs(&bad).is_err());
    }

    #[test]
    fn a_version_1_request_is_read_as_before_and_a_newer_version_is_refused() {
        // What a version 1 requester sends: no replay_version, replay_to or since.
        let mut v1 = Attrs::default();
        v1.set("replay_for", "old");
        v1.set("after", "00000000000000ab:7");
        v1.set("last", 3i64);
        let r = Request::from_attrs(&v1).unwrap();
        assert_eq!(
            r,
            Request {
                id: "old".into(),
                version: 1,
                to: None,
                after: vec![(SourceKey(0xab), 7)],
                since: None,
                last: 3,
                newest: Vec::new(),
                filters: Filters::default(),
            }
        );
        assert!(r.is_for(RecorderId(1)) && r.is_for(RecorderId(2)), "every recorder answers it");
        assert_eq!(r.to_attrs(), v1, "written back as version 1");
        let mut v3 = v1.clone();
        v3.set("replay_version", 3i64);
        v3.set("replay_to", "0000000000000001");
        let e = Request::from_attrs(&v3).unwrap_err();
        assert!(e.0.contains("version 3"), "{e}");
        assert_eq!(Request::requester(&v3), Some("old"));
    }

    #[test]
    fn an_answer_has_what_follows_each_position_and_the_newest_n_once_in_order() {
        let log: Vec<(u64, Recorded)> = [rec(1, 1), rec(2, 1), rec(1, 2), rec(2, 2), rec(1, 3), rec(3, 1)]
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect();
        let seqs =
            |req: &Request| -> Vec<(u64, u64)> { answer(req, &log).iter().map(|r| (r.source.0, r.seq)).collect() };
        assert_eq!(seqs(&req(vec![(1, 1)], None, 0)), vec![(1, 2), (1, 3)]);
        assert_eq!(seqs(&req(vec![], None, 2)), vec![(1, 3), (3, 1)]);
        assert_eq!(seqs(&req(vec![(2, 0)], None, 1)), vec![(2, 1), (2, 2), (3, 1)]);
        assert!(seqs(&req(vec![(1, 3)], None, 0)).is_empty());
    }

    #[test]
    fn an_answer_since_a_starting_point_has_every_other_source_recorded_from_it() {
        // Index: 0 (1,1) 1 (2,1) 2 (1,2) 3 (2,2) 4 (1,3) 5 (3,1) 6 (3,2).
        let log: Vec<(u64, Recorded)> = [rec(1, 1), rec(2, 1), rec(1, 2), rec(2, 2), rec(1, 3), rec(3, 1), rec(3, 2)]
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect();
        let seqs =
            |req: &Request| -> Vec<(u64, u64)> { answer(req, &log).iter().map(|r| (r.source.0, r.seq)).collect() };
        // Source 1 by its position (even before the starting point), the others from index 3 on, in recorded order.
        assert_eq!(seqs(&req(vec![(1, 1)], Some(3), 0)), vec![(1, 2), (2, 2), (1, 3), (3, 1), (3, 2)]);
        // A sink that never received an event: everything from its starting point.
        assert_eq!(seqs(&req(vec![], Some(5), 0)), vec![(3, 1), (3, 2)]);
        // A position beyond what is recorded: nothing of that source, whatever the starting point.
        assert_eq!(seqs(&req(vec![(3, 2)], Some(0), 0)), vec![(1, 1), (2, 1), (1, 2), (2, 2), (1, 3)]);
        assert!(seqs(&req(vec![], Some(7), 0)).is_empty(), "nothing recorded since");
        // With `last` as well, each event once.
        assert_eq!(seqs(&req(vec![], Some(5), 3)), vec![(1, 3), (3, 1), (3, 2)]);
        // What to read: from the starting point when only that is asked.
        let (mut index, mut seen) = (Index::default(), Seen::default());
        for (i, r) in &log {
            seen.fresh(r.source, r.seq);
            index.note(r.source, r.seq, *i);
        }
        let range = |req: &Request, first: u64, index: &Index| read_range(req, u64::MAX, first, 7, index, &seen);
        assert_eq!(range(&req(vec![], Some(5), 0), 0, &index), Some((5, 6)));
        assert_eq!(range(&req(vec![(1, 1)], Some(5), 0), 0, &index), Some((0, 6)));
        assert_eq!(range(&req(vec![(1, 1)], None, 0), 0, &index), Some((0, 4)), "up to source 1's last record");
        assert_eq!(range(&req(vec![(1, 3)], None, 0), 0, &index), None, "it has everything of source 1");
        assert_eq!(range(&req(vec![], None, 0), 0, &index), None, "a request for a starting point only");
        index.forget_before(2);
        assert_eq!(range(&req(vec![], Some(1), 0), 2, &index), Some((2, 6)), "the records before 2 are gone");
        assert_eq!(range(&req(vec![(1, 1)], Some(5), 0), 2, &index), Some((2, 6)));
        assert_eq!(read_range(&req(vec![], None, 2), 5, 0, 7, &index, &seen), Some((5, 6)), "the newest 2");
    }

    #[test]
    fn the_index_starts_a_read_near_a_sources_position() {
        // Two sources interleaved: source 1's event s at index 2(s-1), source 2's at 2(s-1)+1.
        let mut index = Index::default();
        for s in 1..=1000u64 {
            index.note(SourceKey(1), s, 2 * (s - 1));
            index.note(SourceKey(2), s, 2 * (s - 1) + 1);
        }
        let (from, to) = index.after(SourceKey(1), 900).unwrap();
        let wanted = 2 * 900; // the index of event 901
        assert!(from <= wanted && wanted - from <= 2 * crate::recorder::SOURCE_MARK_EVERY, "{from}");
        assert_eq!(to, 2 * 999);
        assert_eq!(index.after(SourceKey(1), 0).unwrap().0, 0, "from its first record");
        assert_eq!(index.after(SourceKey(3), 0), None, "never recorded");
        // Records deleted: a read starts no earlier than the oldest kept, and still before what it needs.
        index.forget_before(1500);
        assert_eq!(index.after(SourceKey(2), 10).unwrap().0, 1500);
        let (from, _) = index.after(SourceKey(2), 800).unwrap();
        assert!((1500..=2 * 800 + 1).contains(&from), "{from}");
        assert!(index.entries() <= 2 * (500 / crate::recorder::SOURCE_MARK_EVERY as usize + 3), "{}", index.entries());
    }

    #[test]
    fn a_filtered_answer_has_the_accepted_events_and_says_what_the_recorder_lacks() {
        let ev = |source: u64, seq: u64, ty: &str| Recorded { ty: ty.into(), ..rec(source, seq) };
        // Source 1: 2 to 9 recorded but 5 (lacking); source 2 from 1, its last two rejected and 3 lacking.
        let chosen = vec![
            ev(1, 2, "no"),
            ev(2, 1, "yes"),
            ev(1, 3, "yes"),
            ev(1, 4, "no"),
            ev(1, 6, "no"),
            ev(2, 2, "no"),
            ev(1, 7, "yes"),
            ev(2, 4, "no"),
            ev(1, 8, "no"),
            ev(1, 9, "yes"),
        ];
        let n = narrow(&[(SourceKey(1), 1)], chosen, |r| r.ty == "yes");
        let got: Vec<(u64, u64, u64)> = n.events.iter().map(|(r, m)| (r.source.0, r.seq, *m)).collect();
        assert_eq!(got, vec![(2, 1, 0), (1, 3, 0), (1, 7, 1), (1, 9, 0)]);
        assert_eq!(n.passed, vec![(SourceKey(2), 4, 1)]);
        // What the requester already has is left out.
        let n = narrow(&[(SourceKey(1), 8)], vec![ev(1, 7, "yes"), ev(1, 9, "yes")], |_| true);
        assert_eq!(n.events.len(), 1);
        // Filters: the types and the expression, as sinks apply them; a bad expression is refused with the reason.
        let f = Filters { types: Some(vec!["yes".into()]), expr: Some("zone == \"a\"".into()) }.compile().unwrap();
        let mut a = Attrs::default();
        a.set("zone", "a");
        assert!(f.accepts("yes", &a) && !f.accepts("no", &a) && !f.accepts("yes", &Attrs::default()));
        let bad = Filters { types: None, expr: Some("zone ==".into()) }.compile().unwrap_err();
        assert!(bad.starts_with("content filter"), "{bad}");
        let long = Filters { types: None, expr: Some("a".repeat(MAX_FILTER + 1)) }.compile().unwrap_err();
        assert!(long.contains("limit"), "{long}");
    }

    #[test]
    fn recorder_ids_print_and_parse_as_16_hex_digits() {
        let r = RecorderId(0xab);
        assert_eq!(r.to_string(), "00000000000000ab");
        assert_eq!(RecorderId::parse(&r.to_string()), Some(r));
        for bad in ["", "-", "xyz", "00000000000000000"] {
            assert_eq!(RecorderId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cel_literals_are_quoted() {
        assert_eq!(serde_quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
