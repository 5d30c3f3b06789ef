//! The recorder's event log: every event of a channel, once, in a [`Log`]. The decisions (what to keep) are pure in
//! [`Seen`]; [`Recorder`] applies them to the log.
//!
//! A recording has an identity ([`RecorderId`], random, made with the recording and kept in its directory as
//! `recording.id`): a durable sink's starting point is an index in one recording's log and means nothing to
//! another's (a recording started afresh in the same directory numbers its records from 0 again).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use kecho::SourceKey;

use crate::log::{Log, LogError, LogOptions, Opened};
use crate::record::{DecodeError, Recorded};
use crate::replay::RecorderId;

/// The file holding a recording's identity (16 hex digits and a newline).
pub const ID_FILE: &str = "recording.id";

/// Errors of the recorder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecorderError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A whole record (its checksum matched) is not an event: written by something else.
    #[error("record {index}: {source}")]
    Decode {
        /// The record's index.
        index: u64,
        /// Why.
        source: DecodeError,
    },
    /// The identity file cannot be read or written, or does not hold an identity.
    #[error("{path}: {why}")]
    Id {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
}

/// The last sequence number recorded per source: an event at or below it is not recorded again.
#[derive(Debug, Default)]
pub struct Seen(HashMap<SourceKey, u64>);

impl Seen {
    /// True (and noted) if event `seq` of `source` is new.
    pub fn fresh(&mut self, source: SourceKey, seq: u64) -> bool {
        let last = self.0.entry(source).or_insert(0);
        if seq <= *last {
            return false;
        }
        *last = seq;
        true
    }

    /// The last sequence number recorded of `source`, if any.
    pub fn get(&self, source: SourceKey) -> Option<u64> {
        self.0.get(&source).copied().filter(|s| *s > 0)
    }

    /// Sources recorded and their last sequence numbers.
    pub fn sources(&self) -> impl Iterator<Item = (SourceKey, u64)> + '_ {
        self.0.iter().map(|(k, v)| (*k, *v))
    }
}

/// Every `SOURCE_MARK_EVERY`th record of a source is in the [`Index`].
pub const SOURCE_MARK_EVERY: u64 = 64;

#[derive(Debug, Default)]
struct SourceMarks {
    /// `(seq, log index)` of the source's records 0, K, 2K, ... (K = [`SOURCE_MARK_EVERY`]), oldest first; the first
    /// may be older than the log's oldest record (then read as the log's oldest).
    marks: Vec<(u64, u64)>,
    /// Records of the source indexed.
    count: u64,
    /// The log index of its newest record.
    last: u64,
}

/// Where in the log a source's records are (pure, in memory, rebuilt when the recording is opened): per source, the
/// sequence number and log index of every [`SOURCE_MARK_EVERY`]th record, and the index of its newest. Bounded by
/// the records kept (one entry per K records of a source, and one per source): marks of deleted records are dropped
/// but the newest of them, which still bounds where the source's next records are.
#[derive(Debug, Default)]
pub struct Index {
    sources: HashMap<SourceKey, SourceMarks>,
    /// The log's oldest index.
    first: u64,
}

impl Index {
    /// Record `index` of the log is event `seq` of `source` (records are noted in index order, and a source's
    /// sequence numbers grow with them).
    pub fn note(&mut self, source: SourceKey, seq: u64, index: u64) {
        let e = self.sources.entry(source).or_default();
        if e.count.is_multiple_of(SOURCE_MARK_EVERY) {
            e.marks.push((seq, index));
        }
        e.count += 1;
        e.last = index;
    }

    /// The records before `first` were deleted.
    pub fn forget_before(&mut self, first: u64) {
        if first <= self.first {
            return;
        }
        self.first = first;
        self.sources.retain(|_, e| e.last >= first);
        for e in self.sources.values_mut() {
            let k = e.marks.partition_point(|(_, i)| *i < first);
            if k > 1 {
                e.marks.drain(..k - 1);
            }
        }
    }

    /// The log indexes between which every kept record of `source` with a sequence number above `after` lies (the
    /// read may start a little before the first: at most K records of the source); `None` if it has none kept.
    pub fn after(&self, source: SourceKey, after: u64) -> Option<(u64, u64)> {
        let e = self.sources.get(&source)?;
        let k = e.marks.partition_point(|(s, _)| *s <= after);
        let (_, start) = e.marks.get(k.saturating_sub(1))?;
        Some(((*start).max(self.first), e.last))
    }

    /// Index entries held (a measure of its memory).
    pub fn entries(&self) -> usize {
        self.sources.values().map(|e| e.marks.len() + 1).sum()
    }
}

/// A channel's recorded events on disk.
#[derive(Debug)]
pub struct Recorder {
    id: RecorderId,
    log: Log,
    seen: Seen,
    index: Index,
    buf: Vec<u8>,
    /// Records read by [`Recorder::for_each`] since the recording was opened.
    read: u64,
}

impl Recorder {
    /// Opens (or creates) the recording in `dir`; a torn tail is cut off (see [`Recorder::opened`]).
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Recorder, RecorderError> {
        let mut log = Log::open(dir, opts)?;
        let mut seen = Seen::default();
        let mut index = Index { first: log.first_index(), ..Index::default() };
        let mut bad = None;
        log.for_each(0, u64::MAX, |i, rec| match Recorded::decode(rec) {
            Ok(r) => {
                if seen.fresh(r.source, r.seq) {
                    index.note(r.source, r.seq, i);
                }
                ControlFlow::Continue(())
            }
            Err(source) => {
                bad = Some(RecorderError::Decode { index: i, source });
                ControlFlow::Break(())
            }
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        let id = identity(dir)?;
        Ok(Recorder { id, log, seen, index, buf: Vec::new(), read: 0 })
    }

    /// The recording's identity.
    pub fn id(&self) -> RecorderId {
        self.id
    }

    /// The index the next recorded event gets.
    pub fn next_index(&self) -> u64 {
        self.log.next_index()
    }

    /// The index of the oldest event kept.
    pub fn first_index(&self) -> u64 {
        self.log.first_index()
    }

    /// Calls `f` with each record from log index `from` to `to` (both included), oldest first, until it breaks: its
    /// index and its bytes ([`Recorded::decode`], [`Recorded::peek`]).
    pub fn for_each(
        &mut self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), RecorderError> {
        let read = &mut self.read;
        Ok(self.log.for_each(from, to, |i, b| {
            *read += 1;
            f(i, b)
        })?)
    }

    /// Records read by [`Recorder::for_each`] (answers) since the recording was opened: what an answer cost.
    pub fn records_read(&self) -> u64 {
        self.read
    }

    /// Where the records of each source are.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The recorded events from log index `from` on, oldest first, each with its index.
    pub fn indexed(&mut self, from: u64) -> Result<Vec<(u64, Recorded)>, RecorderError> {
        self.log
            .read_from(from)?
            .into_iter()
            .map(|(index, rec)| {
                Recorded::decode(&rec).map(|r| (index, r)).map_err(|source| RecorderError::Decode { index, source })
            })
            .collect()
    }

    /// What opening found.
    pub fn opened(&self) -> &Opened {
        self.log.opened()
    }

    /// Records an event unless it was recorded before; returns whether it was.
    pub fn record(&mut self, r: &Recorded) -> Result<bool, RecorderError> {
        if !self.seen.fresh(r.source, r.seq) {
            return Ok(false);
        }
        self.buf.clear();
        r.encode(&mut self.buf);
        let i = self.log.append(&self.buf)?;
        self.index.forget_before(self.log.first_index());
        self.index.note(r.source, r.seq, i);
        Ok(true)
    }

    /// Hands what was recorded to the kernel.
    pub fn flush(&mut self) -> Result<(), RecorderError> {
        Ok(self.log.flush()?)
    }

    /// The recorded events from log index `from` on, oldest first.
    pub fn events(&mut self, from: u64) -> Result<Vec<Recorded>, RecorderError> {
        self.log
            .read_from(from)?
            .into_iter()
            .map(|(index, rec)| Recorded::decode(&rec).map_err(|source| RecorderError::Decode { index, source }))
            .collect()
    }

    /// The last sequence number recorded per source.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }
}

/// The identity of the recording in `dir`, made (at random, never 0) if it has none: written to a temporary file,
/// synced, then renamed, so that a crash leaves either no identity or a whole one.
fn identity(dir: &Path) -> Result<RecorderId, RecorderError> {
    let path = dir.join(ID_FILE);
    let err = |why: String| RecorderError::Id { path: path.clone(), why };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return RecorderId::parse(text.trim())
                .filter(|id| id.0 != 0)
                .ok_or_else(|| err(format!("not a recording identity: {:?}", text.trim())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let id = RecorderId(random_u64());
    let tmp = dir.join(format!("{ID_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{id}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| err(e.to_string()))?;
    Ok(id)
}

/// A random non-zero `u64` (the standard library's randomly keyed hasher over the time and the process id).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        let v = h.finish();
        if v != 0 {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kecho::Attrs;

    fn ev(source: u64, seq: u64) -> Recorded {
        Recorded {
            source: SourceKey(source),
            seq,
            ty: "t".into(),
            attrs: Attrs::default(),
            payload: Bytes::from(format!("{source}:{seq}")),
        }
    }

    #[test]
    fn events_are_recorded_once_across_reopening_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::open(dir.path(), LogOptions::default()).unwrap();
        assert!(r.record(&ev(1, 1)).unwrap());
        assert!(r.record(&ev(1, 2)).unwrap());
        assert!(!r.record(&ev(1, 2)).unwrap(), "a duplicate");
        assert!(r.record(&ev(2, 1)).unwrap());
        r.flush().unwrap();
        drop(r);
        // A torn last record: cut off on opening, and recorded again when it comes again.
        let seg = dir.path().join("00000000000000000000.log");
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 1).unwrap();
        let mut r = Recorder::open(dir.path(), LogOptions::default()).unwrap();
        assert!(r.opened().truncated.is_some());
        assert!(!r.record(&ev(1, 2)).unwrap());
        assert!(r.record(&ev(2, 1)).unwrap());
        let got: Vec<(u64, u64)> = r.events(0).unwrap().iter().map(|e| (e.source.0, e.seq)).collect();
        assert_eq!(got, vec![(1, 1), (1, 2), (2, 1)]);
        assert_eq!(r.events(0).unwrap()[2], ev(2, 1));
    }

    #[test]
    fn a_recording_keeps_its_identity_and_numbers_its_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::open(dir.path(), LogOptions::default()).unwrap();
        let id = r.id();
        assert_ne!(id.0, 0);
        assert_eq!((r.first_index(), r.next_index()), (0, 0));
        r.record(&ev(1, 1)).unwrap();
        r.record(&ev(2, 1)).unwrap();
        assert_eq!(r.next_index(), 2);
        drop(r);
        let mut r = Recorder::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(r.id(), id, "the same recording");
        let got: Vec<(u64, u64)> = r.indexed(1).unwrap().iter().map(|(i, e)| (*i, e.source.0)).collect();
        assert_eq!(got, vec![(1, 2)]);
        // Another recording has another identity.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Recorder::open(other.path(), LogOptions::default()).unwrap().id(), id);
        // An identity file that holds something else is refused, with the file named.
        std::fs::write(dir.path().join(ID_FILE), "garbage\n").unwrap();
        let e = Recorder::open(dir.path(), LogOptions::default()).unwrap_err();
        assert!(e.to_string().contains(ID_FILE), "{e}");
    }
}
