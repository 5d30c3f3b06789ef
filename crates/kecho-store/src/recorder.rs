//! The recorder's event log: every event of a channel, once, in a [`Log`]. The decisions (what to keep) are pure in
//! [`Seen`]; [`Recorder`] applies them to the log.
//!
//! Opening a recording rebuilds [`Seen`] and the [`Index`] from the log's index files where it can: each sealed
//! segment's index file keeps, beyond the log's own, where each source's records in that segment are
//! ([`SegmentSummary`]), so that opening reads only the records written since the last segment was sealed or the
//! recording closed ([`Recorder::close`]); a segment without a usable index file is read whole, its index file
//! written again, and a warning says so (see docs/DURABILITY.md, "The recorder's index files").
//!
//! A recording has an identity ([`RecorderId`], random, made with the recording and kept in its directory as
//! `recording.id`): a durable sink's starting point is an index in one recording's log and means nothing to
//! another's (a recording started afresh in the same directory numbers its records from 0 again).

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use kecho::SourceKey;

use crate::log::{write_atomically, Fields, IndexState, Log, LogError, LogOptions, Opened};
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

    /// Notes that events of `source` up to `seq` were recorded.
    fn up_to(&mut self, source: SourceKey, seq: u64) {
        let last = self.0.entry(source).or_insert(0);
        *last = (*last).max(seq);
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

/// Where in the log a source's records are (pure, in memory, loaded from the segments' index files or rebuilt from
/// the records when the recording is opened): per source, the sequence number and log index of every
/// [`SOURCE_MARK_EVERY`]th record, and the index of its newest. Bounded by the records kept (one entry per K records
/// of a source, and one per source): marks of deleted records are dropped but the newest of them, which still bounds
/// where the source's next records are. It also keeps the newest segment's part ([`SegmentSummary`]), for that
/// segment's index file.
#[derive(Debug, Default)]
pub struct Index {
    sources: HashMap<SourceKey, SourceMarks>,
    /// The log's oldest index.
    first: u64,
    /// The newest segment's records, per source.
    segment: SegmentSummary,
}

impl Index {
    /// Record `index` of the log is event `seq` of `source` (records are noted in index order, and a source's
    /// sequence numbers grow with them).
    pub fn note(&mut self, source: SourceKey, seq: u64, index: u64) {
        let e = self.sources.entry(source).or_default();
        let mark = e.count.is_multiple_of(SOURCE_MARK_EVERY);
        if mark {
            e.marks.push((seq, index));
        }
        e.count += 1;
        e.last = index;
        let s =
            self.segment.0.entry(source).or_insert_with(|| SourcePart { first: (seq, index), ..SourcePart::default() });
        if mark {
            s.marks.push((seq, index));
        }
        (s.count, s.last_seq, s.last) = (e.count, seq, index);
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

    /// The newest segment's part of the index.
    pub fn segment(&self) -> &SegmentSummary {
        &self.segment
    }

    /// The next records are in a new segment.
    pub fn start_segment(&mut self) {
        self.segment = SegmentSummary::default();
    }

    /// Takes in a segment's part, read from its index file (the segments are taken in order, each after the one
    /// before it), as if its records were noted; it is the newest segment's part from now on.
    pub fn load_segment(&mut self, part: SegmentSummary) {
        for (k, s) in &part.0 {
            let e = self.sources.entry(*k).or_default();
            // A source's oldest record kept is where a read of it from its start begins (its count may not have been
            // a multiple of K there: older records of it were deleted).
            if e.marks.is_empty() && s.marks.first() != Some(&s.first) {
                e.marks.push(s.first);
            }
            e.marks.extend_from_slice(&s.marks);
            (e.count, e.last) = (s.count, s.last);
        }
        self.segment = part;
    }
}

/// Where one segment's records are, per source (what the recorder keeps in the segment's index file, after the
/// log's own part): the source's marks among them ([`Index`]), how many of its records the recording held up to the
/// segment's end (so that marks go on every [`SOURCE_MARK_EVERY`]th record), and its first and last records there.
///
/// Layout (little-endian): `u8` version (1), `u32` count of sources, then per source (by key) `u64` key, `u64`
/// first sequence number, `u64` first log index, `u64` count, `u64` last sequence number, `u64` last log index,
/// `u32` count of marks, each `u64` sequence number and `u64` log index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentSummary(BTreeMap<SourceKey, SourcePart>);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct SourcePart {
    /// The sequence number and log index of its first record in the segment.
    first: (u64, u64),
    count: u64,
    last_seq: u64,
    last: u64,
    marks: Vec<(u64, u64)>,
}

/// The version of [`SegmentSummary`]'s layout.
const SUMMARY_VERSION: u8 = 1;

impl SegmentSummary {
    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![SUMMARY_VERSION];
        b.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (k, s) in &self.0 {
            for v in [k.0, s.first.0, s.first.1, s.count, s.last_seq, s.last] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&(s.marks.len() as u32).to_le_bytes());
            for (seq, i) in &s.marks {
                b.extend_from_slice(&seq.to_le_bytes());
                b.extend_from_slice(&i.to_le_bytes());
            }
        }
        b
    }

    /// Reads the part of the segment whose records are `range` (log indexes), checking that it says only that
    /// (pure); the reason if not.
    pub fn decode(b: &[u8], range: std::ops::Range<u64>) -> Result<SegmentSummary, String> {
        Self::read(b, range).map_err(|why| format!("the recorder's part: {why}"))
    }

    fn read(b: &[u8], range: std::ops::Range<u64>) -> Result<SegmentSummary, String> {
        let mut r = Fields(b);
        let v = r.take(1)?[0];
        if v != SUMMARY_VERSION {
            return Err(format!("version {v}, not {SUMMARY_VERSION}"));
        }
        let mut out = BTreeMap::new();
        let n = r.u32()?;
        for _ in 0..n {
            let k = SourceKey(r.u64()?);
            let first = (r.u64()?, r.u64()?);
            let (count, last_seq, last) = (r.u64()?, r.u64()?, r.u64()?);
            let marks = (0..r.u32()?).map(|_| Ok((r.u64()?, r.u64()?))).collect::<Result<Vec<_>, String>>()?;
            let inside = range.contains(&first.1)
                && first.1 <= last
                && first.0 <= last_seq
                && range.contains(&last)
                && marks.iter().all(|(s, i)| range.contains(i) && *s <= last_seq && *s >= first.0 && *i >= first.1);
            let ordered = marks.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
            if !inside || !ordered || count < marks.len() as u64 || last_seq == 0 || out.contains_key(&k) {
                return Err(format!("source {k} is not of this segment"));
            }
            out.insert(k, SourcePart { first, count, last_seq, last, marks });
        }
        if !r.0.is_empty() || out.len() as u64 > range.end - range.start {
            return Err("it does not end where it should".to_owned());
        }
        Ok(SegmentSummary(out))
    }

    /// The sources in it and the last sequence number of each.
    pub fn sources(&self) -> impl Iterator<Item = (SourceKey, u64)> + '_ {
        self.0.iter().map(|(k, s)| (*k, s.last_seq))
    }
}

/// What opening a recording cost, and which index files it rebuilt.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Records decoded to rebuild the index (those after what the index files describe).
    pub decoded: u64,
    /// Records whose place in the index came from index files (not read).
    pub from_index_files: u64,
    /// Segments whose index file was missing (a sealed segment's) or unusable, and why: their records were read and
    /// (for a sealed segment) the index file written again.
    pub rebuilt: Vec<(PathBuf, String)>,
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
    report: OpenReport,
}

impl Recorder {
    /// Opens (or creates) the recording in `dir`; a torn tail is cut off (see [`Recorder::opened`]). The index is
    /// loaded from the segments' index files and rebuilt from the records after what they describe; a sealed
    /// segment's index file that is missing or unusable is written again from its records, with a tracing warning
    /// naming the file and why (see [`Recorder::open_report`]).
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Recorder, RecorderError> {
        let mut log = Log::open(dir, opts)?;
        let mut seen = Seen::default();
        let mut index = Index { first: log.first_index(), ..Index::default() };
        let mut report = OpenReport::default();
        let segments = log.segments_opened();
        let n = segments.len();
        for (k, seg) in segments.into_iter().enumerate() {
            let (sealed, end) = (k + 1 < n, seg.first + seg.records);
            index.start_segment();
            let mut from = seg.first;
            let mut problem = match seg.index {
                IndexState::Loaded { records, extra } => {
                    match SegmentSummary::decode(&extra, seg.first..seg.first + records) {
                        Ok(part) => {
                            for (src, seq) in part.sources() {
                                seen.up_to(src, seq);
                            }
                            index.load_segment(part);
                            from += records;
                            report.from_index_files += records;
                            None
                        }
                        Err(why) => Some(why),
                    }
                }
                IndexState::Missing => sealed.then(|| "no index file".to_owned()),
                IndexState::Unusable(why) => Some(why),
            };
            if from < end {
                decode_each(&mut log, from, end - 1, |i, b| {
                    let r = Recorded::decode(b)?;
                    report.decoded += 1;
                    if seen.fresh(r.source, r.seq) {
                        index.note(r.source, r.seq, i);
                    }
                    Ok(ControlFlow::Continue(()))
                })?;
                // A sealed segment whose index file described only its first records (a crash as it was sealed).
                if sealed && problem.is_none() {
                    problem = Some("it describes part of the segment".to_owned());
                }
            }
            if let Some(why) = problem {
                if sealed {
                    log.write_index(seg.first, &index.segment().encode())?;
                }
                tracing::warn!(
                    "{}: {why}: the index of the {} record(s) of {} rebuilt from them{}",
                    crate::log::index_path(&seg.path).display(),
                    end - seg.first,
                    seg.path.display(),
                    if sealed { ", and the index file written again" } else { "" }
                );
                report.rebuilt.push((seg.path, why));
            }
        }
        let id = identity(dir)?;
        Ok(Recorder { id, log, seen, index, buf: Vec::new(), read: 0, report })
    }

    /// What opening cost and which index files it rebuilt.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Closes the recording cleanly: what was recorded is handed to the kernel and synced, and the newest segment
    /// gets its index file, so that the next opening reads no record.
    pub fn close(mut self) -> Result<(), RecorderError> {
        let first = self.log.segment_first();
        self.log.write_index(first, &self.index.segment().encode())?;
        Ok(self.log.sync()?)
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

    /// Calls `f` with each record from log index `from` to `to` (both included), oldest first, until it breaks or
    /// fails to decode one ([`Recorded::decode`], [`Recorded::peek`]): that ends the read with
    /// [`RecorderError::Decode`] naming the record.
    pub fn for_each_decoded(
        &mut self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<ControlFlow<()>, DecodeError>,
    ) -> Result<(), RecorderError> {
        let read = &mut self.read;
        decode_each(&mut self.log, from, to, |i, b| {
            *read += 1;
            f(i, b)
        })
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
        if self.log.is_full() {
            self.log.seal(&self.index.segment().encode())?;
            self.index.start_segment();
        }
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

/// Calls `f` with each record of `log` from index `from` to `to` (both included) until it breaks or fails to decode
/// one, which ends the read with [`RecorderError::Decode`] naming the record.
fn decode_each(
    log: &mut Log,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<ControlFlow<()>, DecodeError>,
) -> Result<(), RecorderError> {
    let mut bad = None;
    log.for_each(from, to, |i, b| {
        f(i, b).unwrap_or_else(|source| {
            bad = Some(RecorderError::Decode { index: i, source });
            ControlFlow::Break(())
        })
    })?;
    bad.map_or(Ok(()), Err)
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
    write_atomically(&path, &tmp, format!("{id}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
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

    #[test]
    fn a_segments_part_round_trips_and_one_not_of_its_segment_is_refused() {
        let mut index = Index::default();
        for i in 100..400u64 {
            index.note(SourceKey(i % 3), i, i);
        }
        let part = index.segment().clone();
        let b = part.encode();
        assert_eq!(SegmentSummary::decode(&b, 100..400), Ok(part.clone()));
        for range in [100..300, 200..400] {
            let e = SegmentSummary::decode(&b, range.clone()).unwrap_err();
            assert!(e.contains("not of this segment"), "{range:?}: {e}");
        }
        for n in 0..b.len() {
            assert!(SegmentSummary::decode(&b[..n], 100..400).is_err(), "cut at {n}");
        }
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(SegmentSummary::decode(&v2, 100..400).unwrap_err().contains("version 2"));
        // Taken in, it answers as the records noted one by one do.
        let mut loaded = Index::default();
        loaded.load_segment(part);
        for k in 0..3 {
            for after in [0, 150, 250, 399] {
                assert_eq!(loaded.after(SourceKey(k), after), index.after(SourceKey(k), after), "{k} after {after}");
            }
        }
        assert_eq!(loaded.entries(), index.entries());
    }
}
